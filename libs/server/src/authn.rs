//! Access-token verification, shared by identity (which signs) and every
//! service's authorization layer (which verifies with the published JWKS).
//!
//! Only EdDSA is accepted, so `alg: none` and HMAC-with-the-public-key
//! confusions are refused; the `kid` must name a known key; issuer,
//! audience, expiry and not-before are checked with 30 s of leeway.

use std::collections::HashMap;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use socle_errors::Error;

/// The claims of an access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Issuer.
    pub iss: String,
    /// Audience.
    pub aud: String,
    /// The user or service account id.
    pub sub: String,
    /// The session id (empty for service accounts).
    #[serde(default)]
    pub sid: String,
    /// Issued at (seconds since the epoch).
    pub iat: i64,
    /// Not before.
    pub nbf: i64,
    /// Expiry.
    pub exp: i64,
    /// Unique token id.
    pub jti: String,
    /// `user` or `service_account`.
    pub socle_kind: String,
}

/// Public keys by `kid`.
#[derive(Clone, Default)]
pub struct VerifyingKeys {
    keys: HashMap<String, DecodingKey>,
}

impl std::fmt::Debug for VerifyingKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyingKeys").field("kids", &self.keys.keys().collect::<Vec<_>>()).finish()
    }
}

impl VerifyingKeys {
    /// Keys from JWKS entries `(kid, kty, crv, x)`; non-Ed25519 keys are skipped.
    pub fn from_jwks<'a>(keys: impl IntoIterator<Item = (&'a str, &'a str, &'a str, &'a str)>) -> Self {
        let keys = keys
            .into_iter()
            .filter(|(_, kty, crv, _)| *kty == "OKP" && *crv == "Ed25519")
            .filter_map(|(kid, _, _, x)| DecodingKey::from_ed_components(x).ok().map(|key| (kid.to_owned(), key)))
            .collect();
        VerifyingKeys { keys }
    }

    /// Whether a key has this id.
    pub fn knows(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    /// The `kid` of a token, if its header is readable.
    pub fn kid_of(token: &str) -> Option<String> {
        jsonwebtoken::decode_header(token).ok().and_then(|h| h.kid)
    }

    /// Verifies `token` and returns its claims.
    pub fn verify(&self, token: &str, issuer: &str, audience: &str) -> Result<Claims, Error> {
        let refuse = || Error::unauthenticated("the access token is invalid or expired");
        let header = jsonwebtoken::decode_header(token).map_err(|_| refuse())?;
        if header.alg != Algorithm::EdDSA {
            return Err(refuse());
        }
        let key = header.kid.as_deref().and_then(|kid| self.keys.get(kid)).ok_or_else(refuse)?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub", "nbf"]);
        validation.validate_nbf = true;
        validation.leeway = 30;
        jsonwebtoken::decode::<Claims>(token, key, &validation).map(|data| data.claims).map_err(|_| refuse())
    }
}

/// The bearer token of a request, if any.
pub fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}
