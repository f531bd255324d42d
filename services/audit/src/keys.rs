//! Key material (ADR 0011): the Ed25519 keys that sign checkpoints, the
//! key-encryption keys (KEK) that wrap the per-subject keys, and the
//! per-subject keys that seal personal values.
//!
//! - A checkpoint key is a PKCS#8 Ed25519 document (base64), resolved from
//!   a secret locator; its id is derived from the public key.
//! - A KEK is derived from a checkpoint key's secret with HKDF-SHA256
//!   (`info = "socle-audit subject-key wrapping v1"`): the service
//!   configuration has no dedicated locator yet (see the ADR). Its id is
//!   the checkpoint key's id; every wrapped key records the KEK id.
//! - A subject key is 32 random bytes, stored wrapped (AES-256-GCM under the
//!   KEK, bound to its id and subject). From it, two keys are derived with
//!   HMAC-SHA256: one encrypts (AES-256-GCM), one commits (HMAC-SHA256).

use aws_lc_rs::{
    aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey},
    digest, hmac,
    rand::{SecureRandom, SystemRandom},
    signature::{self, Ed25519KeyPair, KeyPair},
};
use base64::{Engine, engine::general_purpose::STANDARD, engine::general_purpose::URL_SAFE_NO_PAD};
use serde_json::{Value as Json, json};
use socle_config::{ExposeSecret, SecretString};
use socle_proto::socle::audit::v1::SealedValues;

/// The only signature algorithm.
pub const ALGORITHM: &str = "Ed25519";

/// A checkpoint signing key: the private half only for keys that sign.
pub struct CheckpointKey {
    /// Key id (base64url of the first 12 bytes of SHA-256 of the public key).
    pub id: String,
    /// The raw 32-byte public key.
    pub public: Vec<u8>,
    pair: Option<Ed25519KeyPair>,
    kek: [u8; 32],
}

impl CheckpointKey {
    /// Parses a base64 PKCS#8 Ed25519 key.
    pub fn from_pkcs8_base64(secret: &SecretString, signing: bool) -> Result<Self, String> {
        let der = STANDARD
            .decode(secret.expose_secret().trim())
            .map_err(|_| "a checkpoint signing key must be base64 PKCS#8".to_owned())?;
        let pair = Ed25519KeyPair::from_pkcs8(&der).map_err(|_| "not an Ed25519 PKCS#8 key".to_owned())?;
        let public = pair.public_key().as_ref().to_vec();
        Ok(CheckpointKey {
            id: key_id(&public),
            public,
            pair: signing.then_some(pair),
            kek: hkdf_sha256(b"socle-audit", &der, b"socle-audit subject-key wrapping v1"),
        })
    }

    /// Signs `payload` (current key only).
    fn sign(&self, payload: &[u8]) -> Option<Vec<u8>> {
        self.pair.as_ref().map(|pair| pair.sign(payload).as_ref().to_vec())
    }
}

/// A new base64 PKCS#8 Ed25519 key (development secrets, tests).
pub fn generate_pkcs8_base64() -> SecretString {
    let document = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("key generation");
    SecretString::from(STANDARD.encode(document.as_ref()))
}

/// The id of a public key.
pub fn key_id(public: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(&digest::digest(&digest::SHA256, public).as_ref()[..12])
}

/// Whether `signature` is `public`'s Ed25519 signature of `payload`.
pub fn verify_signature(public: &[u8], payload: &[u8], signature: &[u8]) -> bool {
    signature::UnparsedPublicKey::new(&signature::ED25519, public).verify(payload, signature).is_ok()
}

/// RFC 5869 with one output block (32 bytes).
fn hkdf_sha256(salt: &[u8], ikm: &[u8], info: &[u8]) -> [u8; 32] {
    let prk = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, salt), ikm);
    let mut block = info.to_vec();
    block.push(1);
    let okm = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, prk.as_ref()), &block);
    okm.as_ref().try_into().expect("32 bytes")
}

fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    SystemRandom::new().fill(&mut bytes).expect("system randomness");
    bytes
}

fn aead_seal(key: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("AES-256 key"));
    let nonce = random::<NONCE_LEN>();
    let mut in_out = plaintext.to_vec();
    key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut in_out).expect("seal");
    let mut out = nonce.to_vec();
    out.extend_from_slice(&in_out);
    out
}

fn aead_open(key: &[u8; 32], aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < NONCE_LEN + 16 {
        return None;
    }
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).ok()?);
    let (nonce, body) = sealed.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
    let mut in_out = body.to_vec();
    let plain = key.open_in_place(nonce, Aad::from(aad), &mut in_out).ok()?;
    Some(plain.to_vec())
}

/// Every key the service holds: the current checkpoint key first.
pub struct Keys {
    keys: Vec<CheckpointKey>,
}

impl Keys {
    /// The current key and earlier ones (which still unwrap subject keys).
    pub fn new(current: CheckpointKey, previous: Vec<CheckpointKey>) -> Result<Self, String> {
        if current.pair.is_none() {
            return Err("the current checkpoint key must be able to sign".into());
        }
        Ok(Keys { keys: std::iter::once(current).chain(previous).collect() })
    }

    /// A fresh, unsaved key (tests; development without a configured key).
    pub fn ephemeral() -> Self {
        let current = CheckpointKey::from_pkcs8_base64(&generate_pkcs8_base64(), true).expect("generated key");
        Keys { keys: vec![current] }
    }

    /// The key that signs and wraps now.
    pub fn current(&self) -> &CheckpointKey {
        &self.keys[0]
    }

    /// Every key, current first.
    pub fn all(&self) -> &[CheckpointKey] {
        &self.keys
    }

    /// Signs with the current key: (key id, signature).
    pub fn sign(&self, payload: &[u8]) -> (String, Vec<u8>) {
        let current = self.current();
        (current.id.clone(), current.sign(payload).expect("the current key signs"))
    }

    fn kek(&self, id: &str) -> Option<&[u8; 32]> {
        self.keys.iter().find(|k| k.id == id).map(|k| &k.kek)
    }

    /// Wraps a subject key under the current KEK: (KEK id, wrapped bytes).
    pub fn wrap(&self, key_id: &str, subject: &str, key: &SubjectKey) -> (String, Vec<u8>) {
        let current = self.current();
        (current.id.clone(), aead_seal(&current.kek, &wrap_aad(key_id, subject), &key.0))
    }

    /// Unwraps a subject key; `None` if the KEK is unknown or the bytes do
    /// not authenticate.
    pub fn unwrap(&self, kek_id: &str, key_id: &str, subject: &str, wrapped: &[u8]) -> Option<SubjectKey> {
        let plain = aead_open(self.kek(kek_id)?, &wrap_aad(key_id, subject), wrapped)?;
        Some(SubjectKey(plain.try_into().ok()?))
    }
}

fn wrap_aad(key_id: &str, subject: &str) -> Vec<u8> {
    format!("socle-audit-subject-key/v1\n{key_id}\n{subject}").into_bytes()
}

/// A data subject's key.
#[derive(Clone)]
pub struct SubjectKey([u8; 32]);

impl SubjectKey {
    /// A new random key.
    pub fn generate() -> Self {
        SubjectKey(random())
    }

    fn derive(&self, label: &[u8]) -> [u8; 32] {
        hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &self.0), label).as_ref().try_into().expect("32 bytes")
    }

    fn plaintext(before: &Json, after: &Json) -> Vec<u8> {
        crate::canonical::jcs(&json!({ "before": before, "after": after })).into_bytes()
    }

    fn commitment(&self, event_id: &str, field_path: &str, plaintext: &[u8]) -> Vec<u8> {
        hmac::sign(&self.commit_key(), &Self::commit_message(event_id, field_path, plaintext)).as_ref().to_vec()
    }

    fn commit_key(&self) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, &self.derive(b"socle-audit commit v1"))
    }

    fn commit_message(event_id: &str, field_path: &str, plaintext: &[u8]) -> Vec<u8> {
        let mut message = format!("socle-audit-commitment/v1\n{event_id}\n{field_path}\n").into_bytes();
        message.extend_from_slice(plaintext);
        message
    }

    fn aad(event_id: &str, field_path: &str) -> Vec<u8> {
        format!("socle-audit-values/v1\n{event_id}\n{field_path}").into_bytes()
    }

    /// Encrypts and commits to a change's values.
    pub fn seal(&self, key_id: &str, event_id: &str, field_path: &str, before: &Json, after: &Json) -> SealedValues {
        let plaintext = Self::plaintext(before, after);
        SealedValues {
            key_id: key_id.to_owned(),
            ciphertext: aead_seal(
                &self.derive(b"socle-audit encrypt v1"),
                &Self::aad(event_id, field_path),
                &plaintext,
            ),
            commitment: self.commitment(event_id, field_path, &plaintext),
        }
    }

    /// The commitment the values would get (duplicate detection).
    pub fn commit(&self, event_id: &str, field_path: &str, before: &Json, after: &Json) -> Vec<u8> {
        self.commitment(event_id, field_path, &Self::plaintext(before, after))
    }

    /// Decrypts sealed values and checks their commitment: (before, after).
    pub fn open(&self, sealed: &SealedValues, event_id: &str, field_path: &str) -> Option<(Json, Json)> {
        let plain =
            aead_open(&self.derive(b"socle-audit encrypt v1"), &Self::aad(event_id, field_path), &sealed.ciphertext)?;
        hmac::verify(&self.commit_key(), &Self::commit_message(event_id, field_path, &plain), &sealed.commitment)
            .ok()?;
        let value: Json = serde_json::from_slice(&plain).ok()?;
        Some((value.get("before").cloned().unwrap_or(Json::Null), value.get("after").cloned().unwrap_or(Json::Null)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_with_their_key_only() {
        let key = SubjectKey::generate();
        let sealed = key.seal("k", "e", "email", &json!("a@b.fr"), &json!("c@d.fr"));
        assert_eq!(key.open(&sealed, "e", "email"), Some((json!("a@b.fr"), json!("c@d.fr"))));
        assert_eq!(key.open(&sealed, "e", "phone"), None, "bound to its field");
        assert_eq!(SubjectKey::generate().open(&sealed, "e", "email"), None);
        assert_eq!(sealed.commitment, key.commit("e", "email", &json!("a@b.fr"), &json!("c@d.fr")));
    }

    #[test]
    fn subject_keys_wrap_under_the_current_kek_and_unwrap_with_any_known_one() {
        let old = Keys::ephemeral();
        let subject = SubjectKey::generate();
        let (kek_id, wrapped) = old.wrap("k1", "s1", &subject);
        assert!(old.unwrap(&kek_id, "k1", "s1", &wrapped).is_some());
        assert!(old.unwrap(&kek_id, "k1", "s2", &wrapped).is_none(), "bound to its subject");
        assert!(Keys::ephemeral().unwrap(&kek_id, "k1", "s1", &wrapped).is_none());
    }

    #[test]
    fn signatures_verify_with_the_public_key() {
        let keys = Keys::ephemeral();
        let (id, signature) = keys.sign(b"payload");
        assert_eq!(id, keys.current().id);
        assert!(verify_signature(&keys.current().public, b"payload", &signature));
        assert!(!verify_signature(&keys.current().public, b"payloaD", &signature));
    }
}
