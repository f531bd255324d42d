fn main() -> anyhow::Result<()> {
    socle_server::run_main(socle_cms::NAME, socle_cms::DEFAULT_PORT, socle_cms::run, socle_cms::migrate)
}
