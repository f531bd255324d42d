//! Access tokens (JWT, EdDSA) and refresh tokens (opaque, stored hashed).

use aws_lc_rs::{digest, rand::SecureRandom};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, Header};
use socle_errors::Error;
use uuid::Uuid;

use crate::keys::KeySet;

pub use socle_server::authn::Claims;

/// What an access token is for: a person's session or a service account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    /// A user, in a session.
    User {
        /// The user id.
        user: Uuid,
        /// The session id.
        session: Uuid,
    },
    /// A service account (client credentials, no session).
    ServiceAccount(Uuid),
}

/// Signs an access token for `subject`, valid `ttl_secs` (at most 15 minutes).
pub fn issue_access(
    keys: &KeySet,
    issuer: &str,
    audience: &str,
    subject: Subject,
    now: i64,
    ttl_secs: u64,
) -> Result<(String, i64), Error> {
    let (sub, sid, kind) = match subject {
        Subject::User { user, session } => (user.to_string(), session.to_string(), "user"),
        Subject::ServiceAccount(account) => (account.to_string(), String::new(), "service_account"),
    };
    let exp = now + ttl_secs.min(900) as i64;
    let claims = Claims {
        iss: issuer.into(),
        aud: audience.into(),
        sub,
        sid,
        iat: now,
        nbf: now,
        exp,
        jti: Uuid::new_v4().to_string(),
        socle_kind: kind.into(),
    };
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(keys.current.kid.clone());
    let key = keys.current.encoding().ok_or_else(|| Error::internal("the current key cannot sign"))?;
    let token = jsonwebtoken::encode(&header, &claims, key).map_err(|e| Error::internal(e.to_string()))?;
    Ok((token, exp))
}

/// Verifies an access token against `keys` (see `socle_server::authn`).
pub fn verify_access(keys: &KeySet, issuer: &str, audience: &str, token: &str) -> Result<Claims, Error> {
    let jwks = keys.jwks();
    socle_server::authn::VerifyingKeys::from_jwks(
        jwks.iter().map(|k| (k.kid.as_str(), k.kty.as_str(), k.crv.as_str(), k.x.as_str())),
    )
    .verify(token, issuer, audience)
}

/// A new opaque refresh token (256 random bits).
pub fn new_refresh_token() -> String {
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::SystemRandom::new().fill(&mut bytes).expect("system randomness");
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The SHA-256 of a token, as stored.
pub fn hash_token(token: &str) -> Vec<u8> {
    digest::digest(&digest::SHA256, token.as_bytes()).as_ref().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{KeySet, SigningKey};

    fn keys() -> KeySet {
        KeySet {
            current: SigningKey::from_pkcs8_base64(&SigningKey::generate_pkcs8_base64(), true).unwrap(),
            previous: vec![],
        }
    }

    fn now() -> i64 {
        chrono::Utc::now().timestamp()
    }

    #[test]
    fn a_fresh_token_verifies_with_its_claims() {
        let k = keys();
        let (user, session) = (Uuid::new_v4(), Uuid::new_v4());
        let (token, exp) =
            issue_access(&k, "socle", "socle-api", Subject::User { user, session }, now(), 3600).unwrap();
        assert!(exp - now() <= 900, "lifetime capped at 15 minutes");
        let claims = verify_access(&k, "socle", "socle-api", &token).unwrap();
        assert_eq!(claims.sub, user.to_string());
        assert_eq!(claims.sid, session.to_string());
    }

    #[test]
    fn tampered_tokens_are_refused() {
        let k = keys();
        let (token, _) = issue_access(
            &k,
            "socle",
            "socle-api",
            Subject::User { user: Uuid::new_v4(), session: Uuid::new_v4() },
            now(),
            900,
        )
        .unwrap();
        let parts: Vec<&str> = token.split('.').collect();

        // alg: none, no signature.
        let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        assert!(verify_access(&k, "socle", "socle-api", &format!("{none_header}.{}.", parts[1])).is_err());

        // Modified claims under the original signature.
        let mut claims: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        claims["sub"] = serde_json::json!(Uuid::new_v4().to_string());
        let forged = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
        assert!(verify_access(&k, "socle", "socle-api", &format!("{}.{forged}.{}", parts[0], parts[2])).is_err());

        // Signed by another key that claims the same kid.
        let other = keys();
        let (foreign, _) = issue_access(
            &other,
            "socle",
            "socle-api",
            Subject::User { user: Uuid::new_v4(), session: Uuid::new_v4() },
            now(),
            900,
        )
        .unwrap();
        let foreign_parts: Vec<&str> = foreign.split('.').collect();
        assert!(
            verify_access(&k, "socle", "socle-api", &format!("{}.{}.{}", parts[0], foreign_parts[1], foreign_parts[2]))
                .is_err()
        );
        assert!(verify_access(&k, "socle", "socle-api", &foreign).is_err(), "unknown kid");

        // Wrong audience, wrong issuer, expired.
        assert!(verify_access(&k, "socle", "another-api", &token).is_err());
        assert!(verify_access(&k, "someone-else", "socle-api", &token).is_err());
        let (old, _) = issue_access(
            &k,
            "socle",
            "socle-api",
            Subject::User { user: Uuid::new_v4(), session: Uuid::new_v4() },
            now() - 3600,
            900,
        )
        .unwrap();
        assert!(verify_access(&k, "socle", "socle-api", &old).is_err());

        // HMAC with the public key as secret (algorithm confusion).
        let mut hs = Header::new(Algorithm::HS256);
        hs.kid = Some(k.current.kid.clone());
        let public = URL_SAFE_NO_PAD.decode(k.current.jwk().x).unwrap();
        let confused = jsonwebtoken::encode(&hs, &claims, &jsonwebtoken::EncodingKey::from_secret(&public)).unwrap();
        assert!(verify_access(&k, "socle", "socle-api", &confused).is_err());
    }

    #[test]
    fn rotated_keys_still_verify_their_tokens() {
        let old = keys();
        let (token, _) = issue_access(
            &old,
            "socle",
            "socle-api",
            Subject::User { user: Uuid::new_v4(), session: Uuid::new_v4() },
            now(),
            900,
        )
        .unwrap();
        let rotated = KeySet { current: keys().current, previous: vec![old.current] };
        assert!(verify_access(&rotated, "socle", "socle-api", &token).is_ok());
        assert_eq!(rotated.jwks().len(), 2);
    }
}
