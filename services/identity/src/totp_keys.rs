//! TOTP secrets at rest: AES-256-GCM with a random 96-bit nonce per value
//! and the account id as associated data, so a value copied onto another
//! account does not decrypt.
//!
//! A stored value is `v1:<kid>:<base64 of nonce ‖ ciphertext ‖ tag>`. The
//! `kid` is derived from the key, so keys rotate without metadata: the
//! current key (`auth.totp_encryption_key`) seals, previous keys
//! (`auth.previous_totp_encryption_keys`) still open, and identity re-seals
//! at start-up whatever is not under the current key — previous keys and
//! `clear:<hex>` values left by the migration that introduced encryption
//! (the key is not in the database, so SQL cannot encrypt them).

use std::sync::Arc;

use aws_lc_rs::{
    aead::{AES_256_GCM, Aad, NONCE_LEN, Nonce, RandomizedNonceKey},
    digest,
    rand::SecureRandom,
};
use base64::{Engine, engine::general_purpose::STANDARD, engine::general_purpose::URL_SAFE_NO_PAD};
use diesel::{
    QueryableByName,
    sql_types::{Nullable, Text, Uuid as SqlUuid},
};
use diesel_async::RunQueryDsl;
use socle_config::{ExposeSecret, SecretString};
use socle_db::{Database, DbError, EntityScope};
use socle_errors::{Code, Error};
use uuid::Uuid;

/// The prefix of sealed values (format version 1).
const SEALED: &str = "v1:";
/// The prefix of values the migration could not encrypt.
const CLEAR: &str = "clear:";

/// One AES-256-GCM key.
pub struct TotpKey {
    kid: String,
    key: RandomizedNonceKey,
}

impl TotpKey {
    /// Parses a key: 32 bytes, base64 (`openssl rand -base64 32`).
    pub fn from_base64(secret: &SecretString) -> Result<Self, String> {
        let bytes =
            STANDARD.decode(secret.expose_secret().trim()).ok().filter(|b| b.len() == 32).ok_or_else(|| {
                "a TOTP encryption key must be 32 bytes in base64 (openssl rand -base64 32)".to_owned()
            })?;
        Self::from_bytes(&bytes)
    }

    fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        let key = RandomizedNonceKey::new(&AES_256_GCM, bytes).map_err(|_| "not an AES-256 key".to_owned())?;
        // A label keeps this hash apart from any other use of the key.
        let mut context = digest::Context::new(&digest::SHA256);
        context.update(b"socle identity totp key id\0");
        context.update(bytes);
        let kid = URL_SAFE_NO_PAD.encode(&context.finish().as_ref()[..8]);
        Ok(TotpKey { kid, key })
    }

    /// Generates a new key (development and tests), as the base64 text to
    /// store in a secret.
    pub fn generate_base64() -> SecretString {
        let mut bytes = [0u8; 32];
        aws_lc_rs::rand::SystemRandom::new().fill(&mut bytes).expect("system randomness");
        SecretString::from(STANDARD.encode(bytes))
    }

    /// The key id written with every value it seals.
    pub fn kid(&self) -> &str {
        &self.kid
    }
}

/// The current key, if any, and the previous ones.
#[derive(Default)]
pub struct TotpKeys {
    current: Option<TotpKey>,
    previous: Vec<TotpKey>,
}

impl TotpKeys {
    /// A key set; previous keys need a current one.
    pub fn new(current: Option<TotpKey>, previous: Vec<TotpKey>) -> Result<Self, String> {
        if current.is_none() && !previous.is_empty() {
            return Err("auth.previous_totp_encryption_keys needs auth.totp_encryption_key".into());
        }
        Ok(TotpKeys { current, previous })
    }

    /// The id of the key that seals, if one is configured.
    pub fn current_kid(&self) -> Option<&str> {
        self.current.as_ref().map(TotpKey::kid)
    }

    /// `FAILED_PRECONDITION` when no key seals: enrolment must not store a
    /// secret in clear.
    pub fn require(&self) -> Result<&TotpKey, Error> {
        self.current.as_ref().ok_or_else(|| {
            Error::new(
                Code::FailedPrecondition,
                "the second factor cannot be enrolled: identity has no key to encrypt TOTP secrets \
                 (auth.totp_encryption_key)",
            )
        })
    }

    /// Encrypts `secret` for `account` under the current key.
    pub fn seal(&self, account: Uuid, secret: &[u8]) -> Result<String, Error> {
        let key = self.require()?;
        let mut in_out = secret.to_vec();
        let nonce = key
            .key
            .seal_in_place_append_tag(Aad::from(account.as_bytes()), &mut in_out)
            .map_err(|_| Error::internal("TOTP secret encryption failed"))?;
        let mut sealed = nonce.as_ref().to_vec();
        sealed.extend_from_slice(&in_out);
        Ok(format!("{SEALED}{}:{}", key.kid, STANDARD.encode(sealed)))
    }

    /// Decrypts a stored value of `account` (a `clear:` value is decoded).
    /// A value under an unknown key, damaged or sealed for another account
    /// is an internal error, logged: nobody can use that factor until it is
    /// reset or the right key is configured.
    pub fn open(&self, account: Uuid, stored: &str) -> Result<Vec<u8>, Error> {
        self.try_open(account, stored).map_err(|why| {
            tracing::error!(user = %account, why, "a stored TOTP secret does not decrypt");
            Error::internal("the stored TOTP secret cannot be decrypted")
        })
    }

    fn try_open(&self, account: Uuid, stored: &str) -> Result<Vec<u8>, &'static str> {
        if let Some(hex) = stored.strip_prefix(CLEAR) {
            return decode_hex(hex).ok_or("invalid clear value");
        }
        let (kid, data) = stored.strip_prefix(SEALED).and_then(|rest| rest.split_once(':')).ok_or("unknown format")?;
        let key = self.current.iter().chain(self.previous.iter()).find(|k| k.kid == kid).ok_or("unknown key id")?;
        let data = STANDARD.decode(data).map_err(|_| "invalid base64")?;
        if data.len() < NONCE_LEN {
            return Err("too short");
        }
        let (nonce, ciphertext) = data.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| "invalid nonce")?;
        let mut in_out = ciphertext.to_vec();
        let plain = key
            .key
            .open_in_place(nonce, Aad::from(account.as_bytes()), &mut in_out)
            .map_err(|_| "authentication failed")?;
        Ok(plain.to_vec())
    }

    /// Whether `stored` is sealed under the current key.
    fn is_current(&self, stored: &str) -> bool {
        self.current_kid().is_some_and(|kid| {
            stored.strip_prefix(SEALED).and_then(|rest| rest.split_once(':')).is_some_and(|(k, _)| k == kid)
        })
    }
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()).collect()
}

/// What [`seal_at_rest`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Resealed {
    /// Clear values encrypted under the current key.
    pub encrypted: usize,
    /// Values under a previous key re-encrypted under the current one.
    pub rekeyed: usize,
    /// Clear values left as they are (no current key).
    pub left_clear: usize,
    /// Values no configured key opens, left as they are.
    pub unreadable: usize,
}

/// Start-up: seals under the current key every TOTP secret (active or
/// pending) that is in clear or under a previous key, in one transaction.
/// Idempotent: a second run finds nothing to do. Without a current key it
/// changes nothing and counts what stays in clear or cannot be opened.
pub async fn seal_at_rest(db: &Database, keys: Arc<TotpKeys>) -> Result<Resealed, Error> {
    // Without a current key every stored value is listed (only '' is LIKE '').
    let current = keys.current_kid().map(|kid| format!("{SEALED}{kid}:%")).unwrap_or_default();
    db.transaction(&EntityScope::System, move |conn| {
        Box::pin(async move {
            #[derive(QueryableByName)]
            struct Row {
                #[diesel(sql_type = SqlUuid)]
                id: Uuid,
                #[diesel(sql_type = Nullable<Text>)]
                totp_secret: Option<String>,
                #[diesel(sql_type = Nullable<Text>)]
                totp_pending_secret: Option<String>,
            }
            let rows: Vec<Row> = diesel::sql_query(
                "SELECT id, totp_secret, totp_pending_secret FROM users
                  WHERE totp_secret NOT LIKE $1 OR totp_pending_secret NOT LIKE $1
                  ORDER BY id FOR UPDATE",
            )
            .bind::<Text, _>(&current)
            .load(conn)
            .await
            .map_err(DbError::from)?;
            let mut done = Resealed::default();
            for row in rows {
                let mut reseal = |stored: &Option<String>| -> Result<Option<String>, Error> {
                    let Some(stored) = stored else { return Ok(None) };
                    if keys.is_current(stored) {
                        return Ok(Some(stored.clone()));
                    }
                    let clear = stored.starts_with(CLEAR);
                    let opened = keys.try_open(row.id, stored);
                    match (opened, keys.current_kid().is_some()) {
                        (Ok(secret), true) => {
                            if clear {
                                done.encrypted += 1;
                            } else {
                                done.rekeyed += 1;
                            }
                            keys.seal(row.id, &secret).map(Some)
                        }
                        (Ok(_), false) => {
                            done.left_clear += usize::from(clear);
                            Ok(Some(stored.clone()))
                        }
                        (Err(_), _) => {
                            done.unreadable += 1;
                            Ok(Some(stored.clone()))
                        }
                    }
                };
                let secret = reseal(&row.totp_secret)?;
                let pending = reseal(&row.totp_pending_secret)?;
                if secret == row.totp_secret && pending == row.totp_pending_secret {
                    continue;
                }
                diesel::sql_query("UPDATE users SET totp_secret = $2, totp_pending_secret = $3 WHERE id = $1")
                    .bind::<SqlUuid, _>(row.id)
                    .bind::<Nullable<Text>, _>(secret)
                    .bind::<Nullable<Text>, _>(pending)
                    .execute(conn)
                    .await
                    .map_err(DbError::from)?;
            }
            Ok(done)
        })
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> TotpKey {
        TotpKey::from_base64(&TotpKey::generate_base64()).unwrap()
    }

    #[test]
    fn a_sealed_secret_opens_for_its_account_only() {
        let keys = TotpKeys::new(Some(key()), vec![]).unwrap();
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let secret = b"12345678901234567890";
        let sealed = keys.seal(alice, secret).unwrap();
        assert!(sealed.starts_with(&format!("v1:{}:", keys.current_kid().unwrap())), "{sealed}");
        assert!(!sealed.contains("12345678901234567890") && !sealed.contains(&STANDARD.encode(secret)));
        assert_eq!(keys.open(alice, &sealed).unwrap(), secret);
        assert_eq!(keys.open(bob, &sealed).unwrap_err().code(), Code::Internal, "another account's value");
        assert_ne!(keys.seal(alice, secret).unwrap(), sealed, "a random nonce per value");
    }

    #[test]
    fn damaged_or_foreign_values_do_not_open() {
        let keys = TotpKeys::new(Some(key()), vec![]).unwrap();
        let other = TotpKeys::new(Some(key()), vec![]).unwrap();
        let alice = Uuid::new_v4();
        let sealed = keys.seal(alice, b"secret").unwrap();
        assert!(other.open(alice, &sealed).is_err(), "unknown key id");
        let (head, data) = sealed.rsplit_once(':').unwrap();
        let mut bytes = STANDARD.decode(data).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        assert!(keys.open(alice, &format!("{head}:{}", STANDARD.encode(&bytes))).is_err(), "tag checked");
        assert!(keys.open(alice, "v1:nokid").is_err());
        assert!(keys.open(alice, "v2:x:y").is_err());
        assert_eq!(keys.open(alice, "clear:00ff10").unwrap(), [0, 255, 16]);
    }

    #[test]
    fn previous_keys_open_and_the_current_key_seals() {
        let old = TotpKeys::new(Some(key()), vec![]).unwrap();
        let alice = Uuid::new_v4();
        let sealed_before = old.seal(alice, b"before").unwrap();
        let old_key = old.current.unwrap();
        let old_kid = old_key.kid.clone();
        let rotated = TotpKeys::new(Some(key()), vec![old_key]).unwrap();
        assert_eq!(rotated.open(alice, &sealed_before).unwrap(), b"before");
        let sealed_after = rotated.seal(alice, b"after").unwrap();
        let new_kid = rotated.current_kid().unwrap();
        assert_ne!(new_kid, old_kid);
        assert!(sealed_after.starts_with(&format!("v1:{new_kid}:")));
        assert!(rotated.is_current(&sealed_after) && !rotated.is_current(&sealed_before));
    }

    #[test]
    fn keys_are_32_bytes_of_base64_and_required_to_seal() {
        assert!(TotpKey::from_base64(&SecretString::from(STANDARD.encode([7u8; 16]))).is_err());
        assert!(TotpKey::from_base64(&SecretString::from("not base64!")).is_err());
        let a = TotpKey::from_base64(&SecretString::from(STANDARD.encode([7u8; 32]))).unwrap();
        let b = TotpKey::from_base64(&SecretString::from(STANDARD.encode([7u8; 32]))).unwrap();
        assert_eq!(a.kid(), b.kid(), "the key id is derived from the key");
        assert!(TotpKeys::new(None, vec![a]).is_err(), "previous keys need a current one");
        let none = TotpKeys::default();
        assert_eq!(none.seal(Uuid::new_v4(), b"x").unwrap_err().code(), Code::FailedPrecondition);
    }
}
