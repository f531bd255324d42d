//! The gRPC-backed parts of [`TokenAuthorizer`](crate::token_authz::TokenAuthorizer):
//! identity's JWKS, a service-account token (client credentials, renewed
//! before it expires) and tenancy's `CheckAccess`.

use std::{sync::Arc, time::Duration};

use futures::future::BoxFuture;
use socle_config::{ExposeSecret, SecretString};
use socle_errors::Error;
use socle_proto::socle::{
    identity::v1::{
        GetJwksRequest, IssueServiceAccountTokenRequest, jwks_service_client::JwksServiceClient,
        service_account_service_client::ServiceAccountServiceClient,
    },
    tenancy::v1::{CheckAccessRequest, access_service_client::AccessServiceClient},
    r#type::v1::{ActorKind, ActorRef},
};
use tokio::sync::Mutex;
use tonic::transport::Channel;

use crate::{
    Principal,
    authn::VerifyingKeys,
    token_authz::{AccessCheck, Decision, KeySource},
};

/// A lazily connected channel to `url`.
pub fn channel(url: &str) -> Result<Channel, String> {
    Ok(tonic::transport::Endpoint::from_shared(url.to_owned())
        .map_err(|e| format!("invalid URL `{url}`: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect_lazy())
}

/// What a service needs to call identity and tenancy as itself.
#[derive(Clone)]
pub struct PlatformClients {
    /// The identity service.
    pub identity: Channel,
    /// The tenancy service.
    pub tenancy: Channel,
    /// This service's access token.
    pub token: Arc<ServiceToken>,
}

impl PlatformClients {
    /// A request carrying this service's token.
    pub async fn request<T>(&self, message: T) -> Result<tonic::Request<T>, Error> {
        let token = self.token.get().await?;
        let mut request = tonic::Request::new(message);
        let bearer = format!("Bearer {}", token.expose_secret());
        request.metadata_mut().insert(
            "authorization",
            bearer.parse().map_err(|_| Error::internal("the service token is not a valid header"))?,
        );
        Ok(request)
    }
}

/// Identity's published keys.
pub struct GrpcKeySource {
    identity: Channel,
}

impl GrpcKeySource {
    /// Keys from the identity service at `identity`.
    pub fn new(identity: Channel) -> Self {
        GrpcKeySource { identity }
    }
}

impl KeySource for GrpcKeySource {
    fn fetch(&self) -> BoxFuture<'_, Result<VerifyingKeys, Error>> {
        Box::pin(async move {
            let reply = JwksServiceClient::new(self.identity.clone())
                .get_jwks(GetJwksRequest {})
                .await
                .map_err(|e| Error::unavailable(format!("jwks: {}", e.code())))?
                .into_inner();
            Ok(VerifyingKeys::from_jwks(
                reply.keys.iter().map(|k| (k.kid.as_str(), k.kty.as_str(), k.crv.as_str(), k.x.as_str())),
            ))
        })
    }
}

/// This service's own access token, from its client credentials.
pub struct ServiceToken {
    identity: Channel,
    client_id: String,
    client_secret: SecretString,
    current: Mutex<Option<(SecretString, tokio::time::Instant)>>,
}

impl ServiceToken {
    /// Tokens for `client_id` from identity.
    pub fn new(identity: Channel, client_id: String, client_secret: SecretString) -> Self {
        ServiceToken { identity, client_id, client_secret, current: Mutex::new(None) }
    }

    /// A valid token, renewed a minute before it expires.
    pub async fn get(&self) -> Result<SecretString, Error> {
        let mut current = self.current.lock().await;
        if let Some((token, renew_at)) = current.as_ref()
            && tokio::time::Instant::now() < *renew_at
        {
            return Ok(token.clone());
        }
        let reply = ServiceAccountServiceClient::new(self.identity.clone())
            .issue_service_account_token(IssueServiceAccountTokenRequest {
                client_id: self.client_id.clone(),
                client_secret: self.client_secret.expose_secret().to_owned(),
            })
            .await
            .map_err(|e| Error::unavailable(format!("service token: {}", e.code())))?
            .into_inner();
        let lifetime = Duration::from_secs(reply.expires_in.max(0) as u64);
        let renew_at = tokio::time::Instant::now() + lifetime.saturating_sub(Duration::from_secs(60));
        let token = SecretString::from(reply.access_token);
        *current = Some((token.clone(), renew_at));
        Ok(token)
    }
}

/// Tenancy's `CheckAccess`, called with this service's token.
pub struct RemoteAccessCheck {
    tenancy: Channel,
    token: Arc<ServiceToken>,
}

impl RemoteAccessCheck {
    /// Decisions from the tenancy service at `tenancy`.
    pub fn new(tenancy: Channel, token: Arc<ServiceToken>) -> Self {
        RemoteAccessCheck { tenancy, token }
    }
}

/// The principal as an `ActorRef`.
pub fn actor(principal: &Principal) -> Option<ActorRef> {
    match principal {
        Principal::User { user_id, .. } => {
            Some(ActorRef { kind: ActorKind::User as i32, id: user_id.clone(), display_name: String::new() })
        }
        Principal::Service { account_id } => Some(ActorRef {
            kind: ActorKind::ServiceAccount as i32,
            id: account_id.clone(),
            display_name: String::new(),
        }),
        Principal::Anonymous => None,
    }
}

impl AccessCheck for RemoteAccessCheck {
    fn check<'a>(
        &'a self,
        principal: &'a Principal,
        permission: &'a str,
        entity: &'a str,
    ) -> BoxFuture<'a, Result<Decision, Error>> {
        Box::pin(async move {
            let token = self.token.get().await?;
            let mut request = tonic::Request::new(CheckAccessRequest {
                principal: actor(principal),
                permission: permission.to_owned(),
                entity_id: entity.to_owned(),
            });
            let bearer = format!("Bearer {}", token.expose_secret());
            request.metadata_mut().insert(
                "authorization",
                bearer.parse().map_err(|_| Error::internal("the service token is not a valid header"))?,
            );
            match AccessServiceClient::new(self.tenancy.clone()).check_access(request).await {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    Ok(Decision { allowed: reply.allowed, policy_version: reply.policy_version })
                }
                // A malformed or unknown target (not a UUID, no such entity:
                // tenancy refuses this service on it) is a refusal, not an outage.
                Err(status)
                    if matches!(
                        status.code(),
                        tonic::Code::InvalidArgument | tonic::Code::PermissionDenied | tonic::Code::NotFound
                    ) =>
                {
                    Ok(Decision { allowed: false, policy_version: 0 })
                }
                Err(status) => {
                    tracing::warn!(code = ?status.code(), "tenancy access check failed");
                    Err(Error::unavailable("the access service is unreachable, retry later"))
                }
            }
        })
    }
}
