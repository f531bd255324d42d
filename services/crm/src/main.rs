fn main() -> anyhow::Result<()> {
    socle_server::run_main(socle_crm::NAME, socle_crm::DEFAULT_PORT, socle_crm::run, socle_crm::migrate)
}
