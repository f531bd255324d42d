//! Passwords: argon2id with OWASP parameters (19 MiB, 2 passes, 1 lane —
//! the `argon2` crate's defaults), computed off the async runtime on a
//! bounded pool so that a burst of logins cannot starve other requests; and
//! the policy new passwords must meet.

use std::sync::Arc;

use argon2::{
    Argon2,
    password_hash::{PasswordHasher, PasswordVerifier, phc::PasswordHash},
};
use socle_errors::Error;
use tokio::sync::Semaphore;

/// Passwords refused whatever their length: the most common ones, French
/// ones included (shipped with the service, compared case-insensitively).
const COMMON: &str = include_str!("common-passwords.txt");

/// Minimum length (NIST SP 800-63B / ANSSI recommend 12+ without
/// composition rules).
pub const MIN_LENGTH: usize = 12;
/// Maximum length (bounds hashing cost).
pub const MAX_LENGTH: usize = 128;

/// Checks a new password; `field` names it in the violation.
pub fn check_policy(field: &str, password: &str, email: &str) -> Result<(), Error> {
    let length = password.chars().count();
    if length < MIN_LENGTH {
        return Err(Error::invalid_field(field, format!("must be at least {MIN_LENGTH} characters")));
    }
    if length > MAX_LENGTH {
        return Err(Error::invalid_field(field, format!("must be at most {MAX_LENGTH} characters")));
    }
    let lower = password.to_lowercase();
    // `Motdepasse2026!` is `motdepasse` with a suffix anyone would try.
    let stem = lower.trim_end_matches(|c: char| c.is_ascii_digit() || c.is_ascii_punctuation());
    if COMMON.lines().map(str::trim).any(|common| !common.is_empty() && (lower == common || stem == common)) {
        return Err(Error::invalid_field(field, "is too common: choose a less predictable password"));
    }
    let local = email.split('@').next().unwrap_or("").to_lowercase();
    if local.len() >= 4 && lower.contains(&local) {
        return Err(Error::invalid_field(field, "must not contain the e-mail address"));
    }
    Ok(())
}

/// Hashes and verifies on a bounded pool of blocking threads.
#[derive(Clone)]
pub struct Hasher {
    permits: Arc<Semaphore>,
}

impl Hasher {
    /// At most `parallelism` hashes at once.
    pub fn new(parallelism: usize) -> Self {
        Hasher { permits: Arc::new(Semaphore::new(parallelism.max(1))) }
    }

    /// A PHC-format argon2id hash.
    pub async fn hash(&self, password: String) -> Result<String, Error> {
        let _permit = self.permits.acquire().await.map_err(Error::internal)?;
        tokio::task::spawn_blocking(move || Argon2::default().hash_password(password.as_bytes()).map(|h| h.to_string()))
            .await
            .map_err(Error::internal)?
            .map_err(|e| Error::internal(e.to_string()))
    }

    /// Whether `password` matches `hash`. With no hash (no password set), a
    /// dummy verification still runs so that timing does not reveal it.
    pub async fn verify(&self, hash: Option<String>, password: String) -> Result<bool, Error> {
        let _permit = self.permits.acquire().await.map_err(Error::internal)?;
        tokio::task::spawn_blocking(move || {
            let stored = hash.unwrap_or_else(|| DUMMY_HASH.to_owned());
            let parsed = PasswordHash::new(&stored).map_err(|e| e.to_string())?;
            let ok = Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok();
            Ok::<_, String>(ok && stored != DUMMY_HASH)
        })
        .await
        .map_err(Error::internal)?
        .map_err(Error::internal)
    }
}

/// The hash of a random string nobody knows, for constant-time refusals.
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c29jbGVkdW1teXNhbHQ$QmZb5wq+RJ7F8vQ0VqR1Q0oXG0xOKh4cV4n2ZbIuYkA";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_refuses_short_common_and_personal_passwords() {
        assert!(check_policy("p", "court", "a@b.fr").is_err());
        assert!(check_policy("p", "motdepasse123", "a@b.fr").is_err(), "common, whatever the length");
        assert!(check_policy("p", "Azertyuiop123", "a@b.fr").is_err(), "case-insensitive, suffix ignored");
        assert!(check_policy("p", "Motdepasse2026!", "a@b.fr").is_err());
        assert!(check_policy("p", "claire.martin-2026!", "claire.martin@exemple.fr").is_err());
        assert!(check_policy("p", "cheval agrafe batterie", "claire@exemple.fr").is_ok());
    }

    #[tokio::test]
    async fn hashes_verify_and_wrong_passwords_do_not() {
        let hasher = Hasher::new(2);
        let hash = hasher.hash("cheval agrafe batterie".into()).await.unwrap();
        assert!(hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "OWASP parameters: {hash}");
        assert!(hasher.verify(Some(hash.clone()), "cheval agrafe batterie".into()).await.unwrap());
        assert!(!hasher.verify(Some(hash), "cheval agrafe batteries".into()).await.unwrap());
        assert!(!hasher.verify(None, "anything at all".into()).await.unwrap());
    }
}
