fn main() -> anyhow::Result<()> {
    socle_server::run_main(
        socle_ai_proxy::NAME,
        socle_ai_proxy::DEFAULT_PORT,
        socle_ai_proxy::run,
        socle_ai_proxy::migrate,
    )
}
