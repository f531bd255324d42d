//! Password changes: by the signed-in person (`ChangePassword`) and by a
//! reset link sent by e-mail (`RequestPasswordReset`, `ResetPassword`).
//!
//! A reset token is 256 random bits, stored as SHA-256 in
//! `password_resets`, valid `auth.password_reset_ttl_secs` (30 minutes by
//! default) and once; a new request voids the previous links. The request
//! always answers the same (whether the address has an account or not), is
//! counted under `reset-` throttle keys (per address + e-mail, e-mail, and
//! address, the sign-in thresholds) so that requests cannot lock anyone out
//! of signing in, and wrong tokens count per client address.

use chrono::{Duration, Utc};
use diesel::sql_types::{Bytea, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use diesel_async::RunQueryDsl;
use socle_db::{DbError, EntityScope};
use socle_errors::{Code, Error};
use socle_proto::socle::identity::v1::{ChangePasswordRequest, UserState};
use uuid::Uuid;

use crate::{
    audit::{self, By},
    mail,
    passwords::check_policy,
    service::{Identity, UserKey, load_user, normalize_email, user_where},
    throttle,
    tokens::{hash_token, new_refresh_token},
};

fn throttled(wait: std::time::Duration) -> Error {
    Error::new(Code::ResourceExhausted, "too many attempts: retry later")
        .with_retry_after(wait.max(std::time::Duration::from_secs(1)))
}

/// Ends the sign-in locks of an e-mail (its owner proved who they are).
async fn clear_sign_in_locks(conn: &mut diesel_async::AsyncPgConnection, email: &str) -> Result<(), DbError> {
    diesel::sql_query("DELETE FROM login_throttle WHERE key = $1 OR starts_with(key, $2)")
        .bind::<Text, _>(format!("account:{email}"))
        .bind::<Text, _>(format!("pair:{email}|"))
        .execute(conn)
        .await?;
    Ok(())
}

impl Identity {
    /// `ChangePassword`: the current password (wrong ones count toward the
    /// sign-in locks), a new one under the policy and different from it;
    /// with `revoke_other_sessions`, every session but the calling one ends.
    pub(crate) async fn change_password(
        &self,
        user: Uuid,
        session: Option<Uuid>,
        ip: &str,
        r: ChangePasswordRequest,
    ) -> Result<i32, Error> {
        let mut v = socle_api::Violations::new();
        v.check(!r.current_password.is_empty(), "current_password", "is required");
        v.check(!r.new_password.is_empty(), "new_password", "is required");
        v.into_result()?;
        let ip = ip.to_owned();
        let (row, keys, locked) = self
            .db()
            .transaction(&EntityScope::System, move |conn| {
                Box::pin(async move {
                    let row = user_where(conn, "id = $1", UserKey::Id(user))
                        .await?
                        .ok_or_else(|| Error::not_found("user", user))?;
                    let keys = std::sync::Arc::new(throttle::Keys::new(&normalize_email(&row.email), &ip));
                    let locked = throttle::locked_for(conn, &keys).await?;
                    Ok::<_, Error>((row, keys, locked))
                })
            })
            .await?;
        if let Some(wait) = locked {
            return Err(throttled(wait));
        }
        if !self.hasher().verify(row.password_hash.clone(), r.current_password).await? {
            let failure = keys.clone();
            self.db()
                .transaction(&EntityScope::System, move |conn| {
                    Box::pin(async move { Ok::<_, Error>(throttle::record_failure(conn, &failure).await?) })
                })
                .await?;
            tracing::info!(outcome = "denied", "password change refused: wrong current password");
            return Err(Error::invalid_field("current_password", "is not your password"));
        }
        check_policy("new_password", &r.new_password, &row.email)?;
        if self.hasher().verify(row.password_hash.clone(), r.new_password.clone()).await? {
            return Err(Error::invalid_field("new_password", "must differ from the current password"));
        }
        let hash = self.hasher().hash(r.new_password).await?;
        let revoke_others = r.revoke_other_sessions;
        self.db()
            .transaction(&EntityScope::System, move |conn| {
                Box::pin(async move {
                    let before = load_user(conn, user).await?;
                    diesel::sql_query(
                        "UPDATE users SET password_hash = $2, password_update_time = now(), version = version + 1,
                                update_time = now()
                          WHERE id = $1",
                    )
                    .bind::<SqlUuid, _>(user)
                    .bind::<Text, _>(&hash)
                    .execute(conn)
                    .await
                    .map_err(DbError::from)?;
                    throttle::record_success(conn, &keys).await?;
                    // Reset links asked for before the change are void.
                    diesel::sql_query(
                        "UPDATE password_resets SET use_time = now() WHERE user_id = $1 AND use_time IS NULL",
                    )
                    .bind::<SqlUuid, _>(user)
                    .execute(conn)
                    .await
                    .map_err(DbError::from)?;
                    let revoked = if revoke_others {
                        diesel::sql_query(
                            "UPDATE sessions SET revoke_time = now(), revoke_reason = 'password changed'
                              WHERE user_id = $1 AND revoke_time IS NULL AND ($2::uuid IS NULL OR id <> $2)",
                        )
                        .bind::<SqlUuid, _>(user)
                        .bind::<Nullable<SqlUuid>, _>(session)
                        .execute(conn)
                        .await
                        .map_err(DbError::from)?
                    } else {
                        0
                    };
                    // No password value: the change shows as
                    // `password_update_time` only.
                    let after = load_user(conn, user).await?;
                    audit::user_changed(
                        conn,
                        "identity.auth.password_change",
                        By::Caller,
                        Some(&before),
                        Some(&after),
                        &[
                            ("revoke_other_sessions", audit::flag(revoke_others)),
                            ("revoked_session_count", audit::number(revoked as i64)),
                        ],
                    )
                    .await?;
                    Ok::<_, Error>(revoked as i32)
                })
            })
            .await
    }

    /// `RequestPasswordReset`: the same answer whatever the address; an
    /// active account gets a link by e-mail.
    pub(crate) async fn request_password_reset(&self, email: &str, ip: &str) -> Result<(), Error> {
        if email.trim().is_empty() {
            return Err(Error::invalid_field("email", "is required"));
        }
        let email = normalize_email(email);
        let keys = throttle::Keys::reset(&email, ip);
        let token = new_refresh_token();
        let hash = hash_token(&token);
        let ttl = self.settings().password_reset_ttl_secs.max(60);
        let expire = Utc::now() + Duration::seconds(ttl as i64);
        let url = format!("{}/password-reset#token={token}", self.settings().console_url.trim_end_matches('/'));
        let locked = self
            .db()
            .transaction(&EntityScope::System, move |conn| {
                Box::pin(async move {
                    if let Some(wait) = throttle::locked_for(conn, &keys).await? {
                        return Ok::<_, Error>(Some(wait));
                    }
                    throttle::record_failure(conn, &keys).await?;
                    let Some(user) = user_where(conn, "email_normalized = $1", UserKey::Email(email)).await? else {
                        return Ok(None);
                    };
                    if user.state != UserState::Active as i16 {
                        return Ok(None);
                    }
                    // Only the latest link works.
                    diesel::sql_query(
                        "UPDATE password_resets SET use_time = now() WHERE user_id = $1 AND use_time IS NULL",
                    )
                    .bind::<SqlUuid, _>(user.id)
                    .execute(conn)
                    .await
                    .map_err(DbError::from)?;
                    diesel::sql_query(
                        "INSERT INTO password_resets (token_hash, user_id, expire_time) VALUES ($1, $2, $3)",
                    )
                    .bind::<Bytea, _>(&hash)
                    .bind::<SqlUuid, _>(user.id)
                    .bind::<Timestamptz, _>(expire)
                    .execute(conn)
                    .await
                    .map_err(DbError::from)?;
                    let (subject, body) = mail::password_reset(&user.display_name, &url, ttl / 60);
                    mail::enqueue(conn, Some(user.id), &user.email, &subject, &body).await?;
                    // Recorded only when a link went out, on the account's
                    // home entity; the caller's answer stays the same.
                    let account = user.to_proto();
                    audit::user_changed(
                        conn,
                        "identity.auth.password_reset_request",
                        By::Account,
                        Some(&account),
                        Some(&account),
                        &[],
                    )
                    .await?;
                    Ok(None)
                })
            })
            .await?;
        if let Some(wait) = locked {
            tracing::warn!(outcome = "denied", reason = "throttled", "password reset request refused");
            return Err(throttled(wait));
        }
        if !self.mailer().delivers() {
            tracing::warn!("password reset requested but auth.mail_transport is `none`: the mail stays queued");
        }
        self.mailer().flush(self.db()).await;
        Ok(())
    }

    /// `ResetPassword`: a valid link sets the password, ends every session
    /// and lifts the account's sign-in locks.
    pub(crate) async fn reset_password(&self, token: &str, password: String, ip: &str) -> Result<(), Error> {
        let mut v = socle_api::Violations::new();
        v.check(!token.is_empty(), "reset_token", "is required");
        v.check(!password.is_empty(), "new_password", "is required");
        v.into_result()?;
        let hash = hash_token(token);
        let keys = throttle::Keys::reset_address(ip);
        let lookup = hash.clone();
        let found = self
            .db()
            .transaction(&EntityScope::System, move |conn| {
                Box::pin(async move {
                    if let Some(wait) = throttle::locked_for(conn, &keys).await? {
                        return Ok::<_, Error>(Err(wait));
                    }
                    let user = user_where(
                        conn,
                        "id = (SELECT user_id FROM password_resets WHERE token_hash = $1 AND use_time IS NULL AND expire_time > now())",
                        UserKey::Invitation(lookup),
                    )
                    .await?
                    .filter(|u| u.state == UserState::Active as i16);
                    if user.is_none() {
                        throttle::record_failure(conn, &keys).await?;
                    }
                    Ok(Ok(user))
                })
            })
            .await?;
        let user = match found {
            Err(wait) => return Err(throttled(wait)),
            Ok(None) => {
                tracing::info!(outcome = "denied", "password reset refused: invalid or expired link");
                return Err(Error::unauthenticated("the password reset link is invalid or expired: ask for a new one"));
            }
            Ok(Some(user)) => user,
        };
        check_policy("new_password", &password, &user.email)?;
        let password_hash = self.hasher().hash(password).await?;
        self.db()
            .transaction(&EntityScope::System, move |conn| {
                Box::pin(async move {
                    let spent = diesel::sql_query(
                        "UPDATE password_resets SET use_time = now()
                          WHERE token_hash = $1 AND use_time IS NULL AND expire_time > now()",
                    )
                    .bind::<Bytea, _>(&hash)
                    .execute(conn)
                    .await
                    .map_err(DbError::from)?;
                    if spent == 0 {
                        return Err(Error::unauthenticated("the password reset link was already used"));
                    }
                    let before = load_user(conn, user.id).await?;
                    diesel::sql_query(
                        "UPDATE users SET password_hash = $2, password_update_time = now(), version = version + 1,
                                update_time = now()
                          WHERE id = $1",
                    )
                    .bind::<SqlUuid, _>(user.id)
                    .bind::<Text, _>(&password_hash)
                    .execute(conn)
                    .await
                    .map_err(DbError::from)?;
                    diesel::sql_query(
                        "UPDATE password_resets SET use_time = now() WHERE user_id = $1 AND use_time IS NULL",
                    )
                    .bind::<SqlUuid, _>(user.id)
                    .execute(conn)
                    .await
                    .map_err(DbError::from)?;
                    let revoked = diesel::sql_query(
                        "UPDATE sessions SET revoke_time = now(), revoke_reason = 'password reset'
                          WHERE user_id = $1 AND revoke_time IS NULL",
                    )
                    .bind::<SqlUuid, _>(user.id)
                    .execute(conn)
                    .await
                    .map_err(DbError::from)?;
                    diesel::sql_query("DELETE FROM login_challenges WHERE user_id = $1")
                        .bind::<SqlUuid, _>(user.id)
                        .execute(conn)
                        .await
                        .map_err(DbError::from)?;
                    clear_sign_in_locks(conn, &normalize_email(&user.email)).await?;
                    let after = load_user(conn, user.id).await?;
                    audit::user_changed(
                        conn,
                        "identity.auth.password_reset",
                        By::Account,
                        Some(&before),
                        Some(&after),
                        &[("revoked_session_count", audit::number(revoked as i64))],
                    )
                    .await
                })
            })
            .await
    }
}
