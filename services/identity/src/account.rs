//! The caller's own account (`socle.identity.v1.AccountService`). `GetMe`
//! answers "who am I, what do I hold, which entity do I act for", asking
//! tenancy as identity's own service account.

use socle_errors::{Code, Error};
use socle_proto::socle::{
    identity::v1::{account_service_server::AccountService, *},
    tenancy::v1::{
        ExplainAccessRequest, GetEntityRequest, ListGrantsRequest, access_service_client::AccessServiceClient,
        entity_service_client::EntityServiceClient, grant_service_client::GrantServiceClient,
    },
    r#type::v1::{ActorKind, ActorRef},
};
use socle_server::{Principal, reply, request_id::owned as rid};
use tonic::{Request, Response, Status};

use crate::service::Identity;

fn upstream(what: &str) -> impl Fn(tonic::Status) -> Error + '_ {
    move |status| {
        tracing::warn!(code = ?status.code(), what, "tenancy call failed");
        Error::unavailable(format!("{what} is unavailable, retry later"))
    }
}

/// The calling user and session, or `UNAUTHENTICATED`.
fn caller(principal: Option<&Principal>) -> Result<(uuid::Uuid, Option<uuid::Uuid>), Error> {
    match principal {
        Some(Principal::User { user_id, session_id, .. }) => Ok((
            socle_api::parse_id("user_id", user_id)?,
            session_id.as_deref().and_then(|s| uuid::Uuid::parse_str(s).ok()),
        )),
        _ => Err(Error::unauthenticated("sign in: this call is about your own account")),
    }
}

#[tonic::async_trait]
impl AccountService for Identity {
    async fn update_me(&self, request: Request<UpdateMeRequest>) -> Result<Response<UpdateMeResponse>, Status> {
        let request_id = rid(&request);
        let principal = socle_server::principal_of(&request);
        let r = request.into_inner();
        let result = async {
            let (user, _) = caller(principal.as_ref())?;
            self.update_profile(principal.as_ref(), &user.to_string(), r.user, r.update_mask.as_ref(), &r.etag, false)
                .await
        }
        .await;
        reply(result.map(|user| UpdateMeResponse { user: Some(user) }), request_id)
    }

    async fn change_password(
        &self,
        request: Request<ChangePasswordRequest>,
    ) -> Result<Response<ChangePasswordResponse>, Status> {
        let request_id = rid(&request);
        let principal = socle_server::principal_of(&request);
        let (_, ip) = crate::service::client_of(&request);
        let r = request.into_inner();
        let result = async {
            let (user, session) = caller(principal.as_ref())?;
            let revoked = Identity::change_password(self, user, session, &ip, r).await?;
            Ok(ChangePasswordResponse { revoked_session_count: revoked })
        }
        .await;
        reply(result, request_id)
    }

    async fn enroll_totp(&self, request: Request<EnrollTotpRequest>) -> Result<Response<EnrollTotpResponse>, Status> {
        let request_id = rid(&request);
        let principal = socle_server::principal_of(&request);
        let r = request.into_inner();
        let result = async {
            let (user, _) = caller(principal.as_ref())?;
            // Refused before the password is checked: a secret is never stored in clear.
            self.totp_keys().require()?;
            let row = self.check_password(user, r.current_password).await?;
            let (secret, expire) = Identity::enroll_totp(self, user).await?;
            let secret = crate::totp::base32(&secret);
            let label: String =
                row.email.chars().filter(|c| c.is_ascii_alphanumeric() || "@.-_".contains(*c)).collect();
            Ok(EnrollTotpResponse {
                otpauth_uri: format!(
                    "otpauth://totp/Socle:{label}?secret={secret}&issuer=Socle&algorithm=SHA1&digits=6&period=30"
                ),
                secret,
                expire_time: Some(socle_api::timestamp(expire)),
            })
        }
        .await;
        reply(result, request_id)
    }

    async fn confirm_totp(
        &self,
        request: Request<ConfirmTotpRequest>,
    ) -> Result<Response<ConfirmTotpResponse>, Status> {
        let request_id = rid(&request);
        let principal = socle_server::principal_of(&request);
        let r = request.into_inner();
        let result = async {
            let (user, _) = caller(principal.as_ref())?;
            Ok(ConfirmTotpResponse { recovery_codes: Identity::confirm_totp(self, user, &r.code).await? })
        }
        .await;
        reply(result, request_id)
    }

    async fn disable_totp(
        &self,
        request: Request<DisableTotpRequest>,
    ) -> Result<Response<DisableTotpResponse>, Status> {
        let request_id = rid(&request);
        let principal = socle_server::principal_of(&request);
        let r = request.into_inner();
        let result = async {
            let (user, _) = caller(principal.as_ref())?;
            self.check_password(user, r.current_password).await?;
            if !self.second_factor(user, &r.code).await? {
                return Err(Error::invalid_field("code", "is not a valid code or recovery code"));
            }
            Identity::disable_totp(self, user).await?;
            Ok(DisableTotpResponse {})
        }
        .await;
        reply(result, request_id)
    }

    async fn list_my_sessions(
        &self,
        request: Request<ListMySessionsRequest>,
    ) -> Result<Response<ListMySessionsResponse>, Status> {
        let request_id = rid(&request);
        let principal = socle_server::principal_of(&request);
        let r = request.into_inner();
        let result = async {
            let (user, current) = caller(principal.as_ref())?;
            let (sessions, next_page_token) = self.sessions(user, current, r.page_size, &r.page_token).await?;
            Ok(ListMySessionsResponse { sessions, next_page_token })
        }
        .await;
        reply(result, request_id)
    }

    async fn revoke_my_session(
        &self,
        request: Request<RevokeMySessionRequest>,
    ) -> Result<Response<RevokeMySessionResponse>, Status> {
        let request_id = rid(&request);
        let principal = socle_server::principal_of(&request);
        let r = request.into_inner();
        let result = async {
            let (user, _) = caller(principal.as_ref())?;
            let session = socle_api::parse_id("session_id", &r.session_id)?;
            self.revoke_session(user, session, "revoked by its user").await?;
            Ok(RevokeMySessionResponse {})
        }
        .await;
        reply(result, request_id)
    }

    async fn get_me(&self, request: Request<GetMeRequest>) -> Result<Response<GetMeResponse>, Status> {
        let request_id = rid(&request);
        let principal = socle_server::principal_of(&request);
        let result = async {
            let (user_id, acting, session_id) = match principal {
                Some(Principal::User { user_id, entity_id, session_id }) => (user_id, entity_id, session_id),
                Some(Principal::Service { account_id }) => {
                    return Ok(GetMeResponse {
                        principal: Some(ActorRef {
                            kind: ActorKind::ServiceAccount as i32,
                            id: account_id,
                            display_name: String::new(),
                        }),
                        ..Default::default()
                    });
                }
                _ => return Err(Error::unauthenticated("sign in: GetMe needs an access token")),
            };
            let user = self.user_by_id(&user_id).await?;
            let acting = acting
                .filter(|e| !e.is_empty())
                .or_else(|| Some(user.default_entity_id.clone()).filter(|e| !e.is_empty()))
                .unwrap_or_else(|| user.entity_id.clone());
            let principal =
                ActorRef { kind: ActorKind::User as i32, id: user_id.clone(), display_name: user.display_name.clone() };
            let mut me = GetMeResponse {
                principal: Some(principal.clone()),
                user: Some(user),
                session_id: session_id.unwrap_or_default(),
                ..Default::default()
            };
            let Some(platform) = self.platform() else {
                return Ok(me);
            };
            let entity = EntityServiceClient::new(platform.tenancy.clone())
                .get_entity(platform.request(GetEntityRequest { entity_id: acting.clone() }).await?)
                .await;
            match entity {
                Ok(reply) => me.acting_entity = reply.into_inner().entity,
                Err(status) if status.code() == tonic::Code::NotFound => {}
                Err(status) => return Err(upstream("the entity tree")(status)),
            }
            let mut grants_request = platform
                .request(ListGrantsRequest { principal_id: user_id, page_size: 500, ..Default::default() })
                .await?;
            grants_request.metadata_mut().insert(
                "x-socle-entity",
                acting.parse().map_err(|_| Error::new(Code::InvalidArgument, "invalid entity"))?,
            );
            me.grants = GrantServiceClient::new(platform.tenancy.clone())
                .list_grants(grants_request)
                .await
                .map_err(upstream("the grants"))?
                .into_inner()
                .grants;
            let explained = AccessServiceClient::new(platform.tenancy.clone())
                .explain_access(
                    platform
                        .request(ExplainAccessRequest {
                            principal: Some(principal),
                            entity_id: acting,
                            service: String::new(),
                        })
                        .await?,
                )
                .await
                .map_err(upstream("access decisions"))?
                .into_inner();
            me.permissions = explained.permissions.into_iter().map(|p| p.permission).collect();
            Ok(me)
        }
        .await;
        reply(result, request_id)
    }
}
