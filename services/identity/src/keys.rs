//! Ed25519 signing keys for access tokens.
//!
//! Keys are PKCS#8 documents (base64) resolved from secret locators at
//! start-up: the current key signs, earlier keys are kept for verification
//! and published in the JWKS until the tokens they signed have expired. The
//! `kid` is derived from the public key, so it is stable and never chosen
//! by hand.

use aws_lc_rs::{
    digest,
    signature::{Ed25519KeyPair, KeyPair},
};
use base64::{Engine, engine::general_purpose::STANDARD, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{DecodingKey, EncodingKey};
use socle_config::{ExposeSecret, SecretString};
use socle_proto::socle::identity::v1::JsonWebKey;

/// One key: private part only for the current key.
pub struct SigningKey {
    /// Key id, in token headers and the JWKS.
    pub kid: String,
    public: Vec<u8>,
    encoding: Option<EncodingKey>,
}

impl SigningKey {
    /// Parses a base64 PKCS#8 Ed25519 key (`signing` = may sign).
    pub fn from_pkcs8_base64(secret: &SecretString, signing: bool) -> Result<Self, String> {
        let der = STANDARD
            .decode(secret.expose_secret().trim())
            .map_err(|_| "a signing key must be base64 PKCS#8".to_owned())?;
        let pair = Ed25519KeyPair::from_pkcs8(&der).map_err(|_| "not an Ed25519 PKCS#8 key".to_owned())?;
        let public = pair.public_key().as_ref().to_vec();
        let hash = digest::digest(&digest::SHA256, &public);
        Ok(SigningKey {
            kid: URL_SAFE_NO_PAD.encode(&hash.as_ref()[..12]),
            public,
            encoding: signing.then(|| EncodingKey::from_ed_der(&der)),
        })
    }

    /// Generates a new key (development and tests), returned as the base64
    /// PKCS#8 document to store.
    pub fn generate_pkcs8_base64() -> SecretString {
        let document = Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new()).expect("key generation");
        SecretString::from(STANDARD.encode(document.as_ref()))
    }

    /// The private key, when this key signs.
    pub fn encoding(&self) -> Option<&EncodingKey> {
        self.encoding.as_ref()
    }

    /// The public key for verification.
    pub fn decoding(&self) -> DecodingKey {
        DecodingKey::from_ed_der(&self.public)
    }

    /// The public key as a JWK.
    pub fn jwk(&self) -> JsonWebKey {
        JsonWebKey {
            kty: "OKP".into(),
            crv: "Ed25519".into(),
            x: URL_SAFE_NO_PAD.encode(&self.public),
            kid: self.kid.clone(),
            alg: "EdDSA".into(),
            r#use: "sig".into(),
        }
    }
}

/// The current key and the earlier ones.
pub struct KeySet {
    /// Signs new tokens.
    pub current: SigningKey,
    /// Verify tokens signed before a rotation.
    pub previous: Vec<SigningKey>,
}

impl KeySet {
    /// The key with this id.
    pub fn find(&self, kid: &str) -> Option<&SigningKey> {
        std::iter::once(&self.current).chain(self.previous.iter()).find(|k| k.kid == kid)
    }

    /// Every public key.
    pub fn jwks(&self) -> Vec<JsonWebKey> {
        std::iter::once(&self.current).chain(self.previous.iter()).map(SigningKey::jwk).collect()
    }
}
