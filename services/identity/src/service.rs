//! The identity handlers: invitations, login, refresh-token rotation with
//! reuse detection, logout, and the JWKS.

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use diesel::{
    QueryableByName,
    result::{DatabaseErrorKind, Error as DieselError},
    sql_types::{BigInt, Bytea, Nullable, SmallInt, Text, Timestamptz, Uuid as SqlUuid},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use socle_api::{Violations, etag, parse_id, parse_optional_id, timestamp};
use socle_db::{Database, DbError, EntityScope, idempotency};
use socle_errors::{Code, Error};
use socle_proto::socle::identity::v1::{
    auth_service_server::AuthService, jwks_service_server::JwksService, user_service_server::UserService, *,
};
use socle_server::AuthSettings;
use socle_server::{reply, request_id::owned as rid};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::{
    audit::{By, text},
    keys::KeySet,
    passwords::{Hasher, check_policy},
    throttle,
    tokens::{self, hash_token, issue_access, new_refresh_token},
};

/// Everything the handlers share.
#[derive(Clone)]
pub struct Identity {
    db: Database,
    hasher: Hasher,
    keys: Arc<KeySet>,
    totp_keys: Arc<crate::totp_keys::TotpKeys>,
    settings: Arc<AuthSettings>,
    platform: Option<socle_server::remote_auth::PlatformClients>,
    mailer: Arc<crate::mail::Mailer>,
}

impl Identity {
    /// The identity service state.
    pub fn new(
        db: Database,
        keys: KeySet,
        totp_keys: Arc<crate::totp_keys::TotpKeys>,
        settings: AuthSettings,
        platform: Option<socle_server::remote_auth::PlatformClients>,
        mailer: crate::mail::Mailer,
    ) -> Self {
        let parallelism = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        Identity {
            db,
            hasher: Hasher::new(parallelism),
            keys: Arc::new(keys),
            totp_keys,
            settings: Arc::new(settings),
            platform,
            mailer: Arc::new(mailer),
        }
    }

    /// The outgoing mail transport.
    pub(crate) fn mailer(&self) -> &crate::mail::Mailer {
        &self.mailer
    }

    /// The password hasher.
    pub(crate) fn hasher(&self) -> &Hasher {
        &self.hasher
    }

    /// Checks `permission` on a loaded record's entity for the caller
    /// (`NOT_FOUND` when refused); nothing to check in `declared` mode.
    pub(crate) async fn check_record(
        &self,
        principal: Option<&socle_server::Principal>,
        permission: &str,
        entity: &str,
        what: &str,
    ) -> Result<(), Error> {
        let Some(platform) = &self.platform else { return Ok(()) };
        let access =
            socle_server::remote_auth::RemoteAccessCheck::new(platform.tenancy.clone(), platform.token.clone());
        socle_server::token_authz::check_record(principal, &access, permission, entity, what).await
    }

    /// The active sessions of `user`, newest first; `current` is flagged.
    pub(crate) async fn sessions(
        &self,
        user: Uuid,
        current: Option<Uuid>,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Vec<Session>, String), Error> {
        let size = socle_api::page_size(page_size)?;
        let filters = format!("user={user}");
        let after = socle_api::PageToken::<String>::decode(page_token, &filters)?.map(|t| t.after);
        self.db
            .transaction(&EntityScope::System, move |conn| {
                Box::pin(async move {
                    #[derive(QueryableByName)]
                    struct Row {
                        #[diesel(sql_type = SqlUuid)]
                        id: Uuid,
                        #[diesel(sql_type = Timestamptz)]
                        create_time: DateTime<Utc>,
                        #[diesel(sql_type = Timestamptz)]
                        last_refresh_time: DateTime<Utc>,
                        #[diesel(sql_type = Timestamptz)]
                        expire_time: DateTime<Utc>,
                        #[diesel(sql_type = Text)]
                        user_agent: String,
                        #[diesel(sql_type = Text)]
                        ip_address: String,
                        #[diesel(sql_type = Text)]
                        sort_key: String,
                    }
                    let rows: Vec<Row> = diesel::sql_query(
                        "SELECT * FROM (SELECT id, create_time, last_refresh_time, expire_time, user_agent, ip_address,
                                to_char(create_time AT TIME ZONE 'UTC', 'YYYYMMDDHH24MISSUS') || id::text AS sort_key
                           FROM sessions WHERE user_id = $1 AND revoke_time IS NULL AND expire_time > now()) s
                          WHERE $2::text IS NULL OR sort_key < $2 ORDER BY sort_key DESC LIMIT $3",
                    )
                    .bind::<SqlUuid, _>(user)
                    .bind::<Nullable<Text>, _>(after)
                    .bind::<BigInt, _>(size as i64 + 1)
                    .load(conn)
                    .await
                    .map_err(DbError::from)?;
                    let more = rows.len() > size;
                    let rows = &rows[..rows.len().min(size)];
                    let next = match (more, rows.last()) {
                        (true, Some(last)) => socle_api::PageToken::encode(last.sort_key.clone(), &filters),
                        _ => String::new(),
                    };
                    let sessions = rows
                        .iter()
                        .map(|r| Session {
                            id: r.id.to_string(),
                            user_id: user.to_string(),
                            create_time: Some(timestamp(r.create_time)),
                            last_refresh_time: Some(timestamp(r.last_refresh_time)),
                            expire_time: Some(timestamp(r.expire_time)),
                            user_agent: r.user_agent.clone(),
                            ip_address: r.ip_address.clone(),
                            second_factor_used: false,
                            current: current == Some(r.id),
                        })
                        .collect();
                    Ok((sessions, next))
                })
            })
            .await
    }

    /// Revokes a session of `user` (`NOT_FOUND` if it is not theirs).
    pub(crate) async fn revoke_session(&self, user: Uuid, session: Uuid, reason: &'static str) -> Result<(), Error> {
        self.db
            .transaction(&EntityScope::System, move |conn| {
                Box::pin(async move {
                    let revoked = diesel::sql_query(
                        "UPDATE sessions SET revoke_time = now(), revoke_reason = $3
                          WHERE id = $1 AND user_id = $2 AND revoke_time IS NULL",
                    )
                    .bind::<SqlUuid, _>(session)
                    .bind::<SqlUuid, _>(user)
                    .bind::<Text, _>(reason)
                    .execute(conn)
                    .await
                    .map_err(DbError::from)?;
                    if revoked == 0 {
                        return Err(Error::not_found("session", session));
                    }
                    let account = load_user(conn, user).await?;
                    crate::audit::user_changed(
                        conn,
                        "identity.sessions.revoke",
                        By::Caller,
                        Some(&account),
                        Some(&account),
                        &[("session_id", text(&session.to_string())), ("reason", text(reason))],
                    )
                    .await
                })
            })
            .await
    }

    /// The user and whether `password` is theirs (for self-service changes).
    pub(crate) async fn check_password(&self, user: Uuid, password: String) -> Result<UserRow, Error> {
        let row = self
            .db
            .transaction(&EntityScope::System, move |conn| {
                Box::pin(async move {
                    user_where(conn, "id = $1", UserKey::Id(user)).await?.ok_or_else(|| Error::not_found("user", user))
                })
            })
            .await?;
        if self.hasher.verify(row.password_hash.clone(), password).await? {
            Ok(row)
        } else {
            Err(Error::invalid_field("current_password", "is not your password"))
        }
    }

    /// Clients of identity and tenancy, in `tokens` mode.
    pub(crate) fn platform(&self) -> Option<&socle_server::remote_auth::PlatformClients> {
        self.platform.as_ref()
    }

    /// A user, as the API shows it.
    pub(crate) async fn user_by_id(&self, id: &str) -> Result<User, Error> {
        let id = parse_id("user_id", id)?;
        self.db
            .transaction(&EntityScope::System, move |conn| {
                Box::pin(async move {
                    let row = user_where(conn, "id = $1", UserKey::Id(id))
                        .await?
                        .ok_or_else(|| Error::not_found("user", id))?;
                    Ok(row.to_proto())
                })
            })
            .await
    }

    /// Whether an invitation goes by e-mail (`EMAIL` or unspecified) rather
    /// than back to the caller; e-mail without a mail transport is
    /// `UNIMPLEMENTED`.
    pub(crate) fn invitation_by_mail(&self, delivery: i32) -> Result<bool, Error> {
        match InvitationDelivery::try_from(delivery) {
            Ok(InvitationDelivery::ReturnLink) => Ok(false),
            Ok(InvitationDelivery::Email) | Ok(InvitationDelivery::Unspecified) if self.mailer.delivers() => Ok(true),
            Ok(InvitationDelivery::Email) | Ok(InvitationDelivery::Unspecified) => Err(Error::new(
                Code::Unimplemented,
                "e-mail delivery is not configured (auth.mail_transport): use INVITATION_DELIVERY_RETURN_LINK",
            )),
            Err(_) => Err(Error::invalid_field("invitation_delivery", "is unknown")),
        }
    }

    /// The database.
    pub(crate) fn db(&self) -> &Database {
        &self.db
    }

    /// The signing keys.
    pub(crate) fn keys(&self) -> &KeySet {
        &self.keys
    }

    /// The keys of TOTP secrets at rest.
    pub(crate) fn totp_keys(&self) -> &crate::totp_keys::TotpKeys {
        &self.totp_keys
    }

    /// The `[auth]` settings.
    pub(crate) fn settings(&self) -> &AuthSettings {
        &self.settings
    }
}

/// The e-mail as compared: trimmed, lower case.
pub fn normalize_email(email: &str) -> String {
    email.trim().to_lowercase()
}

pub(crate) fn valid_email(email: &str) -> bool {
    let email = email.trim();
    email.len() <= 254
        && !email.contains(char::is_whitespace)
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty() && domain.contains('.') && !domain.starts_with('.') && !domain.ends_with('.')
        })
}

#[derive(Debug, Clone, QueryableByName)]
pub(crate) struct UserRow {
    #[diesel(sql_type = SqlUuid)]
    pub(crate) id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    pub(crate) entity_id: Uuid,
    #[diesel(sql_type = Text)]
    pub(crate) email: String,
    #[diesel(sql_type = Text)]
    pub(crate) given_name: String,
    #[diesel(sql_type = Text)]
    pub(crate) family_name: String,
    #[diesel(sql_type = Text)]
    pub(crate) display_name: String,
    #[diesel(sql_type = Text)]
    pub(crate) locale: String,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    pub(crate) default_entity_id: Option<Uuid>,
    #[diesel(sql_type = SmallInt)]
    pub(crate) state: i16,
    #[diesel(sql_type = Nullable<Text>)]
    pub(crate) password_hash: Option<String>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub(crate) password_update_time: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub(crate) last_login_time: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub(crate) invitation_expire_time: Option<DateTime<Utc>>,
    #[diesel(sql_type = Timestamptz)]
    pub(crate) create_time: DateTime<Utc>,
    #[diesel(sql_type = Timestamptz)]
    pub(crate) update_time: DateTime<Utc>,
    #[diesel(sql_type = BigInt)]
    pub(crate) version: i64,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    pub(crate) totp_enabled: bool,
}

pub(crate) const SELECT_USER: &str = "SELECT id, entity_id, email, given_name, family_name, display_name, locale, default_entity_id,
        state, password_hash, password_update_time, last_login_time, invitation_expire_time, create_time, update_time, version,
        totp_secret IS NOT NULL AS totp_enabled
   FROM users";

impl UserRow {
    pub(crate) fn to_proto(&self) -> User {
        User {
            id: self.id.to_string(),
            entity_id: self.entity_id.to_string(),
            email: self.email.clone(),
            given_name: self.given_name.clone(),
            family_name: self.family_name.clone(),
            display_name: self.display_name.clone(),
            locale: self.locale.clone(),
            default_entity_id: self.default_entity_id.map(|e| e.to_string()).unwrap_or_default(),
            state: i32::from(self.state),
            totp_enabled: self.totp_enabled,
            last_login_time: self.last_login_time.map(timestamp),
            password_update_time: self.password_update_time.map(timestamp),
            lock_expire_time: None,
            invitation_expire_time: self.invitation_expire_time.map(timestamp),
            create_time: Some(timestamp(self.create_time)),
            update_time: Some(timestamp(self.update_time)),
            etag: etag(self.version),
        }
    }
}

pub(crate) async fn user_where(
    conn: &mut AsyncPgConnection,
    clause: &str,
    bind: UserKey,
) -> Result<Option<UserRow>, DbError> {
    let query = diesel::sql_query(format!("{SELECT_USER} WHERE {clause} FOR UPDATE"));
    let result = match bind {
        UserKey::Id(id) => query.bind::<SqlUuid, _>(id).get_result(conn).await,
        UserKey::Email(email) => query.bind::<Text, _>(email).get_result(conn).await,
        UserKey::Invitation(hash) => query.bind::<Bytea, _>(hash).get_result(conn).await,
    };
    match result {
        Ok(row) => Ok(Some(row)),
        Err(DieselError::NotFound) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The account `id` as the API shows it, locked for update.
pub(crate) async fn load_user(conn: &mut AsyncPgConnection, id: Uuid) -> Result<User, Error> {
    Ok(user_where(conn, "id = $1", UserKey::Id(id)).await?.ok_or_else(|| Error::not_found("user", id))?.to_proto())
}

pub(crate) enum UserKey {
    Id(Uuid),
    Email(String),
    Invitation(Vec<u8>),
}

/// Opens a session and returns its token pair.
pub(crate) async fn open_session(
    conn: &mut AsyncPgConnection,
    identity: &Identity,
    user: Uuid,
    user_agent: &str,
    ip: &str,
) -> Result<TokenPair, Error> {
    let now = Utc::now();
    let session = Uuid::now_v7();
    let expire = now + Duration::seconds(identity.settings.refresh_token_ttl_secs as i64);
    diesel::sql_query(
        "INSERT INTO sessions (id, user_id, expire_time, user_agent, ip_address) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind::<SqlUuid, _>(session)
    .bind::<SqlUuid, _>(user)
    .bind::<Timestamptz, _>(expire)
    .bind::<Text, _>(user_agent.chars().take(300).collect::<String>())
    .bind::<Text, _>(ip)
    .execute(conn)
    .await
    .map_err(DbError::from)?;
    tokens_for(conn, identity, user, session, expire).await
}

/// Issues a refresh token in `session` and an access token.
async fn tokens_for(
    conn: &mut AsyncPgConnection,
    identity: &Identity,
    user: Uuid,
    session: Uuid,
    session_expire: DateTime<Utc>,
) -> Result<TokenPair, Error> {
    let refresh = new_refresh_token();
    diesel::sql_query("INSERT INTO refresh_tokens (token_hash, session_id) VALUES ($1, $2)")
        .bind::<Bytea, _>(hash_token(&refresh))
        .bind::<SqlUuid, _>(session)
        .execute(conn)
        .await
        .map_err(DbError::from)?;
    let now = Utc::now();
    let (access, exp) = issue_access(
        &identity.keys,
        &identity.settings.issuer,
        &identity.settings.audience,
        tokens::Subject::User { user, session },
        now.timestamp(),
        identity.settings.access_token_ttl_secs,
    )?;
    Ok(TokenPair {
        access_token: access,
        token_type: "Bearer".into(),
        expires_in: (exp - now.timestamp()) as i32,
        access_token_expire_time: Some(prost_types::Timestamp { seconds: exp, nanos: 0 }),
        refresh_token: refresh,
        refresh_token_expire_time: Some(timestamp(session_expire)),
        session_id: session.to_string(),
    })
}

pub(crate) fn client_of<T>(request: &Request<T>) -> (String, String) {
    let header = |name: &str| request.metadata().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let ip = header("x-forwarded-for").split(',').next().unwrap_or_default().trim().to_owned();
    let ip = if ip.is_empty() { request.remote_addr().map(|a| a.ip().to_string()).unwrap_or_default() } else { ip };
    (header("user-agent"), ip)
}

/// Wrong e-mail, wrong password, disabled or invited account: one answer,
/// so that the reply reveals nothing about which it was.
pub(crate) fn bad_credentials() -> Error {
    Error::unauthenticated("invalid e-mail or password")
}

#[tonic::async_trait]
impl UserService for Identity {
    async fn list_users(&self, request: Request<ListUsersRequest>) -> Result<Response<ListUsersResponse>, Status> {
        let request_id = rid(&request);
        let principal = socle_server::principal_of(&request);
        let acting = request.metadata().get("x-socle-entity").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let r = request.into_inner();
        let result = Identity::list_users(self, principal.as_ref(), acting, r).await;
        reply(result.map(|(users, next_page_token)| ListUsersResponse { users, next_page_token }), request_id)
    }

    async fn update_user(&self, request: Request<UpdateUserRequest>) -> Result<Response<UpdateUserResponse>, Status> {
        let request_id = rid(&request);
        let principal = socle_server::principal_of(&request);
        let r = request.into_inner();
        let result =
            self.update_profile(principal.as_ref(), &r.user_id, r.user, r.update_mask.as_ref(), &r.etag, true).await;
        reply(result.map(|user| UpdateUserResponse { user: Some(user) }), request_id)
    }

    async fn delete_user(&self, request: Request<DeleteUserRequest>) -> Result<Response<DeleteUserResponse>, Status> {
        let request_id = rid(&request);
        let principal = socle_server::principal_of(&request);
        let r = request.into_inner();
        let result = Identity::delete_user(self, principal.as_ref(), &r.user_id, &r.etag).await;
        reply(result.map(|()| DeleteUserResponse {}), request_id)
    }

    async fn reset_user_second_factor(
        &self,
        request: Request<ResetUserSecondFactorRequest>,
    ) -> Result<Response<ResetUserSecondFactorResponse>, Status> {
        let request_id = rid(&request);
        let principal = socle_server::principal_of(&request);
        let r = request.into_inner();
        let result = self.reset_second_factor(principal.as_ref(), &r.user_id, &r.reason).await;
        reply(result.map(|user| ResetUserSecondFactorResponse { user: Some(user) }), request_id)
    }

    async fn disable_user(
        &self,
        request: Request<DisableUserRequest>,
    ) -> Result<Response<DisableUserResponse>, Status> {
        let request_id = rid(&request);
        let principal = socle_server::principal_of(&request);
        let r = request.into_inner();
        let result = Identity::disable_user(self, principal.as_ref(), &r.user_id, &r.etag, &r.reason).await;
        reply(result.map(|user| DisableUserResponse { user: Some(user) }), request_id)
    }

    async fn activate_user(
        &self,
        request: Request<ActivateUserRequest>,
    ) -> Result<Response<ActivateUserResponse>, Status> {
        let request_id = rid(&request);
        let principal = socle_server::principal_of(&request);
        let r = request.into_inner();
        let result = Identity::activate_user(self, principal.as_ref(), &r.user_id, &r.etag).await;
        reply(result.map(|user| ActivateUserResponse { user: Some(user) }), request_id)
    }

    async fn unlock_user(&self, request: Request<UnlockUserRequest>) -> Result<Response<UnlockUserResponse>, Status> {
        let request_id = rid(&request);
        let principal = socle_server::principal_of(&request);
        let r = request.into_inner();
        let result = Identity::unlock_user(self, principal.as_ref(), &r.user_id).await;
        reply(result.map(|user| UnlockUserResponse { user: Some(user) }), request_id)
    }

    async fn resend_invitation(
        &self,
        request: Request<ResendInvitationRequest>,
    ) -> Result<Response<ResendInvitationResponse>, Status> {
        let request_id = rid(&request);
        let principal = socle_server::principal_of(&request);
        let r = request.into_inner();
        let result = Identity::resend_invitation(self, principal.as_ref(), &r.user_id, r.invitation_delivery).await;
        reply(
            result.map(|(user, invitation_url)| ResendInvitationResponse { user: Some(user), invitation_url }),
            request_id,
        )
    }

    async fn list_user_sessions(
        &self,
        request: Request<ListUserSessionsRequest>,
    ) -> Result<Response<ListUserSessionsResponse>, Status> {
        let request_id = rid(&request);
        let principal = socle_server::principal_of(&request);
        let r = request.into_inner();
        let result = async {
            let user = self.user_by_id(&r.user_id).await?;
            self.check_record(principal.as_ref(), "identity.users.manage", &user.entity_id, "user").await?;
            let id = parse_id("user_id", &r.user_id)?;
            let (sessions, next_page_token) = self.sessions(id, None, r.page_size, &r.page_token).await?;
            Ok(ListUserSessionsResponse { sessions, next_page_token })
        }
        .await;
        reply(result, request_id)
    }

    async fn revoke_user_session(
        &self,
        request: Request<RevokeUserSessionRequest>,
    ) -> Result<Response<RevokeUserSessionResponse>, Status> {
        let request_id = rid(&request);
        let principal = socle_server::principal_of(&request);
        let r = request.into_inner();
        let result = async {
            let user = self.user_by_id(&r.user_id).await?;
            self.check_record(principal.as_ref(), "identity.users.manage", &user.entity_id, "user").await?;
            let (id, session) = (parse_id("user_id", &r.user_id)?, parse_id("session_id", &r.session_id)?);
            self.revoke_session(id, session, "revoked by an administrator").await?;
            Ok(RevokeUserSessionResponse {})
        }
        .await;
        reply(result, request_id)
    }

    async fn create_user(&self, request: Request<CreateUserRequest>) -> Result<Response<CreateUserResponse>, Status> {
        let request_id = rid(&request);
        let r = request.into_inner();
        let result = async {
            let key = parse_id("request_id", &r.request_id)?;
            let user = r.user.ok_or_else(|| Error::invalid_field("user", "is required"))?;
            let mut v = Violations::new();
            v.check(valid_email(&user.email), "user.email", "must be an e-mail address");
            let entity = parse_id("user.entity_id", &user.entity_id);
            let default_entity = parse_optional_id("user.default_entity_id", &user.default_entity_id);
            if let Err(e) = &entity {
                v.add("user.entity_id", e.violations()[0].description.clone());
            }
            if let Err(e) = &default_entity {
                v.add("user.default_entity_id", e.violations()[0].description.clone());
            }
            let display = if user.display_name.trim().is_empty() {
                format!("{} {}", user.given_name.trim(), user.family_name.trim()).trim().to_owned()
            } else {
                user.display_name.trim().to_owned()
            };
            v.check((1..=120).contains(&display.chars().count()), "user.display_name", "is required (or given and family names)");
            v.into_result()?;
            let by_mail = self.invitation_by_mail(r.invitation_delivery)?;
            let (entity, default_entity) = (entity?, default_entity?);
            let token = new_refresh_token();
            let expire = Utc::now() + Duration::seconds(self.settings.invitation_ttl_secs as i64);
            let console = self.settings.console_url.trim_end_matches('/').to_owned();
            let token_for_reply = token.clone();
            let invitation_link = format!("{console}/invitation#token={token}");
            let row = self
                .db
                .transaction(&EntityScope::System, move |conn| {
                    Box::pin(async move {
                        let id = match idempotency::claim(conn, "CreateUser", key, Uuid::now_v7()).await? {
                            idempotency::Claim::Existing(id) => {
                                let row = user_where(conn, "id = $1", UserKey::Id(id)).await?.ok_or_else(|| Error::not_found("user", id))?;
                                return Ok((row, false));
                            }
                            idempotency::Claim::New(id) => id,
                        };
                        let inserted = diesel::sql_query(
                            "INSERT INTO users (id, entity_id, email, email_normalized, given_name, family_name, display_name,
                                                locale, default_entity_id, state, invitation_hash, invitation_expire_time)
                             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 1, $10, $11)",
                        )
                        .bind::<SqlUuid, _>(id)
                        .bind::<SqlUuid, _>(entity)
                        .bind::<Text, _>(user.email.trim())
                        .bind::<Text, _>(normalize_email(&user.email))
                        .bind::<Text, _>(user.given_name.trim())
                        .bind::<Text, _>(user.family_name.trim())
                        .bind::<Text, _>(&display)
                        .bind::<Text, _>(if user.locale.is_empty() { "fr-FR" } else { user.locale.as_str() })
                        .bind::<Nullable<SqlUuid>, _>(default_entity)
                        .bind::<Bytea, _>(hash_token(&token))
                        .bind::<Timestamptz, _>(expire)
                        .execute(conn)
                        .await;
                        match inserted {
                            Err(DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, info))
                                if info.constraint_name() == Some("users_email_key") =>
                            {
                                return Err(Error::new(Code::AlreadyExists, "a user with this e-mail already exists")
                                    .with_violation("user.email", "is already used"));
                            }
                            other => other.map_err(DbError::from)?,
                        };
                        let row = user_where(conn, "id = $1", UserKey::Id(id)).await?.ok_or_else(|| Error::not_found("user", id))?;
                        if by_mail {
                            let (subject, body) = crate::mail::invitation(&row.display_name, &invitation_link, expire);
                            crate::mail::enqueue(conn, Some(id), &row.email, &subject, &body).await?;
                        }
                        crate::audit::user_changed(
                            conn,
                            "identity.users.create",
                            By::Caller,
                            None,
                            Some(&row.to_proto()),
                            &[("invitation_delivery", text(if by_mail { "email" } else { "return_link" }))],
                        )
                        .await?;
                        Ok((row, true))
                    })
                })
                .await?;
            let (row, created) = row;
            if by_mail {
                self.mailer().flush(&self.db).await;
            }
            // A retried create does not reissue the link: the first one stands.
            let invitation_url = if created && !by_mail {
                format!("{console}/invitation#token={token_for_reply}")
            } else {
                String::new()
            };
            Ok(CreateUserResponse { user: Some(row.to_proto()), invitation_url })
        }
        .await;
        reply(result, request_id)
    }

    async fn get_user(&self, request: Request<GetUserRequest>) -> Result<Response<GetUserResponse>, Status> {
        let request_id = rid(&request);
        let principal = socle_server::principal_of(&request);
        let result = async {
            let id = parse_id("user_id", &request.get_ref().user_id)?;
            let user = self
                .db
                .transaction(&EntityScope::System, move |conn| {
                    Box::pin(async move {
                        let row = user_where(conn, "id = $1", UserKey::Id(id))
                            .await?
                            .ok_or_else(|| Error::not_found("user", id))?;
                        Ok::<_, Error>(row.to_proto())
                    })
                })
                .await?;
            self.check_record(principal.as_ref(), "identity.users.read", &user.entity_id, "user").await?;
            Ok(GetUserResponse { user: Some(user) })
        }
        .await;
        reply(result, request_id)
    }
}

enum RefreshOutcome {
    Rotated(TokenPair),
    Reused,
    Refused,
}

#[tonic::async_trait]
impl AuthService for Identity {
    async fn login(&self, request: Request<LoginRequest>) -> Result<Response<LoginResponse>, Status> {
        let request_id = rid(&request);
        let (user_agent, ip) = client_of(&request);
        let r = request.into_inner();
        let result = async {
            // Second step of a sign-in with a second factor.
            if !r.challenge_token.is_empty() {
                return self.login_with_challenge(&r.challenge_token, &r.totp_code).await;
            }
            let mut v = Violations::new();
            v.check(!r.email.trim().is_empty(), "email", "is required");
            v.check(!r.password.is_empty(), "password", "is required");
            v.into_result()?;
            let email = normalize_email(&r.email);
            let keys = Arc::new(throttle::Keys::new(&email, &ip));
            let lookup = (email.clone(), keys.clone());
            let (found, locked) = self
                .db
                .transaction(&EntityScope::System, move |conn| {
                    Box::pin(async move {
                        let locked = throttle::locked_for(conn, &lookup.1).await?;
                        let found = user_where(conn, "email_normalized = $1", UserKey::Email(lookup.0)).await?;
                        Ok::<_, Error>((found, locked))
                    })
                })
                .await?;
            // A locked attempt is refused before any password check.
            if let Some(wait) = locked {
                tracing::warn!(outcome = "denied", reason = "locked", "login refused");
                return Err(Error::new(Code::ResourceExhausted, "too many failed sign-in attempts: retry later")
                    .with_retry_after(wait.max(std::time::Duration::from_secs(1))));
            }
            // Always verify (against a dummy hash when needed): timing does
            // not tell whether the account exists.
            let hash = found.as_ref().and_then(|u| u.password_hash.clone());
            let target = found.as_ref().map(|u| u.id);
            let matches = self.hasher.verify(hash, r.password).await?;
            let user = match found {
                Some(user) if matches && user.state == UserState::Active as i16 => user,
                _ => {
                    let failure_keys = keys.clone();
                    let lock = self
                        .db
                        .transaction(&EntityScope::System, move |conn| {
                            Box::pin(async move {
                                let lock = throttle::record_failure(conn, &failure_keys).await?;
                                if let Some(user) = target {
                                    crate::audit::sign_in_failed(conn, user, "bad_password", lock.as_ref()).await?;
                                }
                                Ok::<_, Error>(lock)
                            })
                        })
                        .await?;
                    match lock {
                        Some((scope, seconds)) => {
                            tracing::warn!(outcome = "denied", lock = %scope, seconds, "login failed: lock started")
                        }
                        None => tracing::info!(outcome = "denied", "login failed"),
                    }
                    return Err(bad_credentials());
                }
            };
            if user.totp_enabled {
                if r.totp_code.trim().is_empty() {
                    let (challenge, expire) = self.open_challenge(user.id, &user_agent, &ip).await?;
                    return Ok(LoginResponse {
                        status: LoginStatus::SecondFactorRequired as i32,
                        tokens: None,
                        challenge_token: challenge,
                        challenge_expire_time: Some(timestamp(expire)),
                    });
                }
                if !self.second_factor(user.id, &r.totp_code).await? {
                    let failure_keys = keys.clone();
                    let user_id = user.id;
                    self.db
                        .transaction(&EntityScope::System, move |conn| {
                            Box::pin(async move {
                                let lock = throttle::record_failure(conn, &failure_keys).await?;
                                crate::audit::sign_in_failed(conn, user_id, "bad_second_factor", lock.as_ref()).await?;
                                Ok::<_, Error>(lock)
                            })
                        })
                        .await?;
                    tracing::info!(outcome = "denied", "login failed: second factor");
                    return Err(bad_credentials());
                }
            }
            let identity = self.clone();
            let tokens = self
                .db
                .transaction(&EntityScope::System, move |conn| {
                    Box::pin(async move {
                        throttle::record_success(conn, &keys).await?;
                        diesel::sql_query("UPDATE users SET last_login_time = now() WHERE id = $1")
                            .bind::<SqlUuid, _>(user.id)
                            .execute(conn)
                            .await
                            .map_err(DbError::from)?;
                        let tokens = open_session(conn, &identity, user.id, &user_agent, &ip).await?;
                        crate::audit::signed_in(conn, user.id, user.totp_enabled).await?;
                        Ok::<_, Error>(tokens)
                    })
                })
                .await?;
            Ok(LoginResponse { status: LoginStatus::Succeeded as i32, tokens: Some(tokens), ..Default::default() })
        }
        .await;
        reply(result, request_id)
    }

    async fn refresh(&self, request: Request<RefreshRequest>) -> Result<Response<RefreshResponse>, Status> {
        let request_id = rid(&request);
        let r = request.into_inner();
        let result = async {
            if r.refresh_token.is_empty() {
                return Err(Error::invalid_field("refresh_token", "is required"));
            }
            let presented = hash_token(&r.refresh_token);
            let identity = self.clone();
            // Reuse detection must commit the revocation, so the transaction
            // returns an outcome rather than an error.
            let outcome = self
                .db
                .transaction(&EntityScope::System, move |conn| {
                    Box::pin(async move {
                        #[derive(QueryableByName)]
                        struct Presented {
                            #[diesel(sql_type = SqlUuid)]
                            session_id: Uuid,
                            #[diesel(sql_type = SqlUuid)]
                            user_id: Uuid,
                            #[diesel(sql_type = Nullable<Timestamptz>)]
                            spend_time: Option<DateTime<Utc>>,
                            #[diesel(sql_type = Nullable<Timestamptz>)]
                            revoke_time: Option<DateTime<Utc>>,
                            #[diesel(sql_type = Timestamptz)]
                            expire_time: DateTime<Utc>,
                            #[diesel(sql_type = SmallInt)]
                            state: i16,
                        }
                        let found: Result<Presented, _> = diesel::sql_query(
                            "SELECT t.session_id, s.user_id, t.spend_time, s.revoke_time, s.expire_time, u.state
                               FROM refresh_tokens t JOIN sessions s ON s.id = t.session_id JOIN users u ON u.id = s.user_id
                              WHERE t.token_hash = $1 FOR UPDATE OF t, s",
                        )
                        .bind::<Bytea, _>(&presented)
                        .get_result(conn)
                        .await;
                        let token = match found {
                            Ok(token) => token,
                            Err(DieselError::NotFound) => return Ok(RefreshOutcome::Refused),
                            Err(e) => return Err(Error::from(DbError::from(e))),
                        };
                        if token.spend_time.is_some() {
                            diesel::sql_query(
                                "UPDATE sessions SET revoke_time = now(), revoke_reason = 'refresh token reuse'
                                  WHERE id = $1 AND revoke_time IS NULL",
                            )
                            .bind::<SqlUuid, _>(token.session_id)
                            .execute(conn)
                            .await
                            .map_err(DbError::from)?;
                            crate::audit::refresh_reused(conn, token.user_id, token.session_id).await?;
                            return Ok(RefreshOutcome::Reused);
                        }
                        if token.revoke_time.is_some() || token.expire_time <= Utc::now() || token.state != UserState::Active as i16 {
                            return Ok(RefreshOutcome::Refused);
                        }
                        diesel::sql_query("UPDATE refresh_tokens SET spend_time = now() WHERE token_hash = $1")
                            .bind::<Bytea, _>(&presented)
                            .execute(conn)
                            .await
                            .map_err(DbError::from)?;
                        diesel::sql_query("UPDATE sessions SET last_refresh_time = now() WHERE id = $1")
                            .bind::<SqlUuid, _>(token.session_id)
                            .execute(conn)
                            .await
                            .map_err(DbError::from)?;
                        let pair = tokens_for(conn, &identity, token.user_id, token.session_id, token.expire_time).await?;
                        Ok(RefreshOutcome::Rotated(pair))
                    })
                })
                .await?;
            match outcome {
                RefreshOutcome::Rotated(tokens) => Ok(RefreshResponse { tokens: Some(tokens) }),
                RefreshOutcome::Reused => {
                    tracing::warn!(outcome = "denied", "refresh token reused: session revoked");
                    Err(Error::unauthenticated("the refresh token was already used: the session is revoked, sign in again"))
                }
                RefreshOutcome::Refused => Err(Error::unauthenticated("the refresh token is invalid or expired")),
            }
        }
        .await;
        reply(result, request_id)
    }

    async fn logout(&self, request: Request<LogoutRequest>) -> Result<Response<LogoutResponse>, Status> {
        let request_id = rid(&request);
        let principal = socle_server::principal_of(&request);
        let r = request.into_inner();
        let result = async {
            // The caller ends its own sessions only: the session of the
            // refresh token given (it must be the caller's), else the
            // session of the calling token; with `all_sessions`, every one.
            let (caller, current) = match &principal {
                Some(socle_server::Principal::User { user_id, session_id, .. }) => {
                    (Some(parse_id("user_id", user_id)?), session_id.as_deref().map(|s| parse_id("session_id", s)).transpose()?)
                }
                _ => (None, None),
            };
            if r.refresh_token.is_empty() && current.is_none() {
                return Err(Error::invalid_field("refresh_token", "is required without a signed-in session"));
            }
            let presented = (!r.refresh_token.is_empty()).then(|| hash_token(&r.refresh_token));
            let all = r.all_sessions;
            self.db
                .transaction(&EntityScope::System, move |conn| {
                    Box::pin(async move {
                        #[derive(QueryableByName)]
                        struct Owner {
                            #[diesel(sql_type = SqlUuid)]
                            session_id: Uuid,
                            #[diesel(sql_type = SqlUuid)]
                            user_id: Uuid,
                        }
                        let target: Option<Owner> = match (&presented, current, caller) {
                            (Some(hash), _, _) => diesel::sql_query(
                                "SELECT s.id AS session_id, s.user_id FROM refresh_tokens t JOIN sessions s ON s.id = t.session_id
                                  WHERE t.token_hash = $1",
                            )
                            .bind::<Bytea, _>(hash)
                            .get_result(conn)
                            .await
                            .map(Some)
                            .or_else(|e| if e == DieselError::NotFound { Ok(None) } else { Err(e) })
                            .map_err(DbError::from)?,
                            (None, Some(session), Some(user)) => Some(Owner { session_id: session, user_id: user }),
                            _ => None,
                        };
                        let Some(target) = target else { return Ok(LogoutResponse { revoked_session_count: 0 }) };
                        if caller.is_some_and(|c| c != target.user_id) {
                            return Err(Error::not_found("session", "of this refresh token"));
                        }
                        let revoked = diesel::sql_query(
                            "UPDATE sessions SET revoke_time = now(), revoke_reason = 'logout'
                              WHERE revoke_time IS NULL AND (id = $1 OR ($2 AND user_id = $3))",
                        )
                        .bind::<SqlUuid, _>(target.session_id)
                        .bind::<diesel::sql_types::Bool, _>(all)
                        .bind::<SqlUuid, _>(target.user_id)
                        .execute(conn)
                        .await
                        .map_err(DbError::from)?;
                        if revoked > 0 {
                            // Without a signed-in caller, the refresh token
                            // speaks for its account.
                            let account = load_user(conn, target.user_id).await?;
                            crate::audit::user_changed(
                                conn,
                                "identity.auth.logout",
                                if caller.is_some() { By::Caller } else { By::Account },
                                Some(&account),
                                Some(&account),
                                &[
                                    ("session_id", text(&target.session_id.to_string())),
                                    ("all_sessions", crate::audit::flag(all)),
                                    ("revoked_session_count", crate::audit::number(revoked as i64)),
                                ],
                            )
                            .await?;
                        }
                        Ok(LogoutResponse { revoked_session_count: revoked as i32 })
                    })
                })
                .await
        }
        .await;
        reply(result, request_id)
    }

    async fn request_password_reset(
        &self,
        request: Request<RequestPasswordResetRequest>,
    ) -> Result<Response<RequestPasswordResetResponse>, Status> {
        let request_id = rid(&request);
        let (_, ip) = client_of(&request);
        let r = request.into_inner();
        let result = Identity::request_password_reset(self, &r.email, &ip).await;
        reply(result.map(|()| RequestPasswordResetResponse {}), request_id)
    }

    async fn reset_password(
        &self,
        request: Request<ResetPasswordRequest>,
    ) -> Result<Response<ResetPasswordResponse>, Status> {
        let request_id = rid(&request);
        let (_, ip) = client_of(&request);
        let r = request.into_inner();
        let result = Identity::reset_password(self, &r.reset_token, r.new_password, &ip).await;
        reply(result.map(|()| ResetPasswordResponse {}), request_id)
    }

    async fn accept_invitation(
        &self,
        request: Request<AcceptInvitationRequest>,
    ) -> Result<Response<AcceptInvitationResponse>, Status> {
        let request_id = rid(&request);
        let (user_agent, ip) = client_of(&request);
        let r = request.into_inner();
        let result = async {
            if r.invitation_token.is_empty() {
                return Err(Error::invalid_field("invitation_token", "is required"));
            }
            let invitation = hash_token(&r.invitation_token);
            let lookup = invitation.clone();
            let user = self
                .db
                .transaction(&EntityScope::System, move |conn| {
                    Box::pin(async move {
                        Ok::<_, Error>(user_where(conn, "invitation_hash = $1", UserKey::Invitation(lookup)).await?)
                    })
                })
                .await?
                .filter(|u| {
                    u.state == UserState::Invited as i16 && u.invitation_expire_time.is_some_and(|t| t > Utc::now())
                })
                .ok_or_else(|| Error::unauthenticated("the invitation is invalid or expired: ask for a new one"))?;
            check_policy("password", &r.password, &user.email)?;
            let hash = self.hasher.hash(r.password).await?;
            let identity = self.clone();
            let tokens = self
                .db
                .transaction(&EntityScope::System, move |conn| {
                    Box::pin(async move {
                        let before = load_user(conn, user.id).await?;
                        let updated = diesel::sql_query(
                            "UPDATE users SET state = 2, password_hash = $2, password_update_time = now(),
                                    invitation_hash = NULL, invitation_expire_time = NULL, last_login_time = now(),
                                    version = version + 1, update_time = now()
                              WHERE id = $1 AND invitation_hash = $3 AND state = 1",
                        )
                        .bind::<SqlUuid, _>(user.id)
                        .bind::<Text, _>(&hash)
                        .bind::<Bytea, _>(&invitation)
                        .execute(conn)
                        .await
                        .map_err(DbError::from)?;
                        if updated == 0 {
                            return Err(Error::unauthenticated("the invitation was already used"));
                        }
                        let after = load_user(conn, user.id).await?;
                        crate::audit::user_changed(
                            conn,
                            "identity.users.activate",
                            By::Account,
                            Some(&before),
                            Some(&after),
                            &[("via", text("invitation"))],
                        )
                        .await?;
                        open_session(conn, &identity, user.id, &user_agent, &ip).await
                    })
                })
                .await?;
            Ok(AcceptInvitationResponse { tokens: Some(tokens) })
        }
        .await;
        reply(result, request_id)
    }
}

#[tonic::async_trait]
impl JwksService for Identity {
    async fn get_jwks(&self, _request: Request<GetJwksRequest>) -> Result<Response<GetJwksResponse>, Status> {
        Ok(Response::new(GetJwksResponse { keys: self.keys.jwks() }))
    }
}
