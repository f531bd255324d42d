fn main() -> anyhow::Result<()> {
    socle_server::run_main(socle_audit::NAME, socle_audit::DEFAULT_PORT, socle_audit::run, socle_audit::migrate)
}
