fn main() -> anyhow::Result<()> {
    use socle_tenancy::{DEFAULT_PORT, NAME};
    match std::env::args().nth(1).as_deref() {
        Some("bootstrap-root") => socle_server::run_command(NAME, DEFAULT_PORT, socle_tenancy::cli::bootstrap_root),
        Some("bootstrap-grant") => socle_server::run_command(NAME, DEFAULT_PORT, socle_tenancy::cli::bootstrap_grant),
        _ => socle_server::run_main(NAME, DEFAULT_PORT, socle_tenancy::run, socle_tenancy::migrate),
    }
}
