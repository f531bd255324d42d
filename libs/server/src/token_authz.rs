//! The authorizer of a running platform: verifies the caller's access token
//! against identity's published keys and asks tenancy whether the caller
//! holds the RPC's permission on the target entity.
//!
//! - Keys come from a [`KeySource`] (identity's JWKS over gRPC) and are
//!   fetched again when a token names an unknown `kid` (key rotation), at
//!   most every 10 s.
//! - Decisions come from an [`AccessCheck`] (tenancy's `CheckAccess` over
//!   gRPC with this service's own service-account token, or tenancy's local
//!   evaluation inside tenancy) and are cached for 5 s; a decision carrying a
//!   newer `policy_version` empties the cache, so grant changes apply at
//!   once after the first fresh answer.
//! - The target entity is the request field named by the rule's
//!   `entity_field`, else the `x-socle-entity` header.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use socle_errors::{Code, Error};
use tokio::sync::RwLock;

use crate::{
    Principal,
    authn::{VerifyingKeys, bearer},
    authz::{Authorizer, CallInfo, check_rule_shape},
};

/// Where verification keys come from.
pub trait KeySource: Send + Sync + 'static {
    /// The current public keys.
    fn fetch(&self) -> BoxFuture<'_, Result<VerifyingKeys, Error>>;
}

/// An access decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Whether the permission is held.
    pub allowed: bool,
    /// The version of the grants the decision was made from.
    pub policy_version: i64,
}

/// Who decides access.
pub trait AccessCheck: Send + Sync + 'static {
    /// Does `principal` hold `permission` on `entity`?
    fn check<'a>(
        &'a self,
        principal: &'a Principal,
        permission: &'a str,
        entity: &'a str,
    ) -> BoxFuture<'a, Result<Decision, Error>>;
}

const CACHE_TTL: Duration = Duration::from_secs(5);
const KEY_REFRESH_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Cache {
    version: i64,
    decisions: HashMap<(String, String, String), (bool, Instant)>,
}

/// See the module docs.
pub struct TokenAuthorizer {
    issuer: String,
    audience: String,
    keys: RwLock<(VerifyingKeys, Option<Instant>)>,
    source: Arc<dyn KeySource>,
    access: Arc<dyn AccessCheck>,
    cache: Mutex<Cache>,
    cache_ttl: Duration,
}

impl TokenAuthorizer {
    /// An authorizer for tokens of `issuer` and `audience`.
    pub fn new(issuer: String, audience: String, source: Arc<dyn KeySource>, access: Arc<dyn AccessCheck>) -> Self {
        TokenAuthorizer {
            issuer,
            audience,
            keys: RwLock::new((VerifyingKeys::default(), None)),
            source,
            access,
            cache: Mutex::new(Cache::default()),
            cache_ttl: CACHE_TTL,
        }
    }

    /// Does not cache decisions (tenancy itself decides locally, at the
    /// cost of one indexed query, and sees grant changes at once).
    pub fn without_cache(mut self) -> Self {
        self.cache_ttl = Duration::ZERO;
        self
    }

    async fn principal(&self, headers: &http::HeaderMap) -> Result<Principal, Error> {
        let token =
            bearer(headers).ok_or_else(|| Error::unauthenticated("sign in: this call needs an access token"))?;
        let kid = VerifyingKeys::kid_of(token).unwrap_or_default();
        let stale = {
            let keys = self.keys.read().await;
            !keys.0.knows(&kid) && keys.1.is_none_or(|at| at.elapsed() > KEY_REFRESH_INTERVAL)
        };
        if stale {
            let mut keys = self.keys.write().await;
            if !keys.0.knows(&kid) && keys.1.is_none_or(|at| at.elapsed() > KEY_REFRESH_INTERVAL) {
                match self.source.fetch().await {
                    Ok(fresh) => *keys = (fresh, Some(Instant::now())),
                    Err(error) => {
                        tracing::warn!(error = %error, "cannot fetch the verification keys");
                        return Err(Error::unavailable("the identity service is unreachable, retry later"));
                    }
                }
            }
        }
        let claims = self.keys.read().await.0.verify(token, &self.issuer, &self.audience)?;
        let acting = headers.get("x-socle-entity").and_then(|v| v.to_str().ok()).map(str::to_owned);
        Ok(match claims.socle_kind.as_str() {
            "service_account" => Principal::Service { account_id: claims.sub },
            _ => Principal::User {
                user_id: claims.sub,
                entity_id: acting,
                session_id: Some(claims.sid).filter(|s| !s.is_empty()),
            },
        })
    }

    async fn decide(&self, principal: &Principal, permission: &str, entity: &str) -> Result<bool, Error> {
        let subject = match principal {
            Principal::User { user_id, .. } => format!("user:{user_id}"),
            Principal::Service { account_id } => format!("service:{account_id}"),
            Principal::Anonymous => return Ok(false),
        };
        let key = (subject, permission.to_owned(), entity.to_owned());
        if let Some((allowed, at)) = self.cache.lock().expect("cache").decisions.get(&key)
            && at.elapsed() < self.cache_ttl
        {
            return Ok(*allowed);
        }
        let decision = self.access.check(principal, permission, entity).await?;
        let mut cache = self.cache.lock().expect("cache");
        if decision.policy_version > cache.version {
            cache.version = decision.policy_version;
            cache.decisions.clear();
        }
        cache.decisions.insert(key, (decision.allowed, Instant::now()));
        Ok(decision.allowed)
    }
}

impl Authorizer for TokenAuthorizer {
    fn authorize<'a>(&'a self, call: CallInfo<'a>) -> BoxFuture<'a, Result<Principal, Error>> {
        Box::pin(async move {
            check_rule_shape(call.rule)?;
            if call.rule.public {
                return Ok(Principal::Anonymous);
            }
            let principal = self.principal(call.headers).await?;
            if call.rule.authenticated {
                return Ok(principal);
            }
            let entity = call
                .entity
                .clone()
                .or_else(|| call.headers.get("x-socle-entity").and_then(|v| v.to_str().ok()).map(str::to_owned))
                .ok_or_else(|| {
                    Error::permission_denied(
                        "the call names no entity: set the x-socle-entity header to the entity you act for",
                    )
                })?;
            if self.decide(&principal, &call.rule.permission, &entity).await? {
                Ok(principal)
            } else {
                tracing::info!(rpc = call.path, permission = %call.rule.permission, entity = %entity, "access denied");
                crate::audit::record_denial(
                    &principal,
                    &call.rule.permission,
                    &entity,
                    Code::PermissionDenied,
                    "no_matching_grant",
                )
                .await;
                Err(Error::new(Code::PermissionDenied, format!("you lack `{}` on this entity", call.rule.permission)))
            }
        })
    }
}

/// The record-level check of RPCs that name a record by id: the layer
/// checked the permission on the entity the caller acts for; the handler,
/// once it has loaded the record, checks the same permission on the
/// record's own entity. A refusal is `NOT_FOUND`, so that ids from other
/// entities reveal nothing; the refusal is audited like the layer's.
/// Anonymous callers (the `declared` mode of tests
/// and public RPCs) are not checked here.
pub async fn check_record(
    principal: Option<&Principal>,
    access: &dyn AccessCheck,
    permission: &str,
    entity: &str,
    what: &str,
) -> Result<(), Error> {
    match principal {
        None | Some(Principal::Anonymous) => Ok(()),
        Some(principal) => {
            if access.check(principal, permission, entity).await?.allowed {
                Ok(())
            } else {
                crate::audit::record_denial(principal, permission, entity, Code::NotFound, "record_in_other_entity")
                    .await;
                Err(Error::new(Code::NotFound, format!("{what} not found")))
            }
        }
    }
}
