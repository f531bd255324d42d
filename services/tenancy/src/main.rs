fn main() -> anyhow::Result<()> {
    socle_server::run_main(socle_tenancy::NAME, socle_tenancy::DEFAULT_PORT, socle_tenancy::run, socle_tenancy::migrate)
}
