fn main() -> anyhow::Result<()> {
    use socle_audit::{DEFAULT_PORT, NAME};
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("verify") => std::process::exit(socle_audit::cli::verify(&args[2..])),
        _ => socle_server::run_main(NAME, DEFAULT_PORT, socle_audit::run, socle_audit::migrate),
    }
}
