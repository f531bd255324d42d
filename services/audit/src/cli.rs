//! Operator commands of the audit binary.

use std::io::BufReader;

/// `socle-audit verify FILE`: verifies an export offline (no database, no
/// configuration). Prints a summary and exits 0, or prints the first bad
/// line and why and exits 1 (2 when the file cannot be read).
pub fn verify(args: &[String]) -> i32 {
    let [path] = args else {
        eprintln!("usage: socle-audit verify FILE");
        return 2;
    };
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) => {
            eprintln!("socle-audit verify: cannot read {path}: {e}");
            return 2;
        }
    };
    match crate::export::verify_export(BufReader::new(file)) {
        Ok(report) => {
            println!(
                "OK: {} events of {} entities and {} checkpoints verified",
                report.events, report.entities, report.checkpoints
            );
            println!("Pin the signing keys of the header against ListSigningKeys before trusting this result.");
            0
        }
        Err(failure) => {
            println!("BROKEN: {failure}");
            1
        }
    }
}
