fn main() -> anyhow::Result<()> {
    use socle_identity::{DEFAULT_PORT, NAME};
    match std::env::args().nth(1).as_deref() {
        Some("bootstrap-admin") => socle_server::run_command(NAME, DEFAULT_PORT, socle_identity::cli::bootstrap_admin),
        Some("ensure-service-account") => {
            socle_server::run_command(NAME, DEFAULT_PORT, socle_identity::cli::ensure_service_account)
        }
        _ => socle_server::run_main(NAME, DEFAULT_PORT, socle_identity::run, socle_identity::migrate),
    }
}
