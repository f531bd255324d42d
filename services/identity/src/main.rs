fn main() -> anyhow::Result<()> {
    socle_server::run_main(
        socle_identity::NAME,
        socle_identity::DEFAULT_PORT,
        socle_identity::run,
        socle_identity::migrate,
    )
}
