//! Account administration: disable and re-enable, lift a lockout, reissue
//! an invitation. Each call is checked by the layer on the acting entity and
//! here on the account's home entity (`identity.users.manage`).

use chrono::{Duration, Utc};
use diesel::sql_types::{Bytea, SmallInt, Text, Timestamptz, Uuid as SqlUuid};
use diesel_async::RunQueryDsl;
use socle_api::{check_etag, parse_id};
use socle_db::{DbError, EntityScope};
use socle_errors::{Code, Error};
use socle_proto::socle::identity::v1::{User, UserState};
use socle_server::Principal;
use uuid::Uuid;

use crate::{
    audit::{self, By},
    service::{Identity, load_user, normalize_email},
    tokens::{hash_token, new_refresh_token},
};

impl Identity {
    /// Loads an account the caller may manage.
    pub(crate) async fn managed(&self, principal: Option<&Principal>, user_id: &str) -> Result<(Uuid, User), Error> {
        let id = parse_id("user_id", user_id)?;
        let user = self.user_by_id(user_id).await?;
        self.check_record(principal, "identity.users.manage", &user.entity_id, "user").await?;
        Ok((id, user))
    }

    /// `DisableUser`: no more sign-in, every session ends at once.
    pub(crate) async fn disable_user(
        &self,
        principal: Option<&Principal>,
        user_id: &str,
        etag: &str,
        reason: &str,
    ) -> Result<User, Error> {
        let (id, user) = self.managed(principal, user_id).await?;
        let version = etag_version(&user.etag);
        check_etag(etag, version, false)?;
        let details = vec![("reason", audit::text(reason.trim()))];
        self.set_state(id, UserState::Disabled, "account disabled", "identity.users.disable", details).await?;
        self.user_by_id(user_id).await
    }

    /// `ActivateUser`: re-enables a disabled account.
    pub(crate) async fn activate_user(
        &self,
        principal: Option<&Principal>,
        user_id: &str,
        etag: &str,
    ) -> Result<User, Error> {
        let (id, user) = self.managed(principal, user_id).await?;
        check_etag(etag, etag_version(&user.etag), false)?;
        if user.state != UserState::Disabled as i32 {
            return Err(Error::new(
                Code::FailedPrecondition,
                "only a disabled account can be re-enabled (an invited one is activated by accepting its invitation)",
            ));
        }
        self.set_state(
            id,
            UserState::Active,
            "",
            "identity.users.activate",
            vec![("via", audit::text("administrator"))],
        )
        .await?;
        self.user_by_id(user_id).await
    }

    async fn set_state(
        &self,
        id: Uuid,
        state: UserState,
        revoke_reason: &'static str,
        action: &'static str,
        mut details: Vec<(&'static str, prost_types::Value)>,
    ) -> Result<(), Error> {
        self.db()
            .transaction(&EntityScope::System, move |conn| {
                Box::pin(async move {
                    let before = load_user(conn, id).await?;
                    diesel::sql_query("UPDATE users SET state = $2, version = version + 1, update_time = now() WHERE id = $1")
                        .bind::<SqlUuid, _>(id)
                        .bind::<SmallInt, _>(state as i16)
                        .execute(conn)
                        .await
                        .map_err(DbError::from)?;
                    if state == UserState::Disabled {
                        let revoked = diesel::sql_query(
                            "UPDATE sessions SET revoke_time = now(), revoke_reason = $2 WHERE user_id = $1 AND revoke_time IS NULL",
                        )
                        .bind::<SqlUuid, _>(id)
                        .bind::<Text, _>(revoke_reason)
                        .execute(conn)
                        .await
                        .map_err(DbError::from)?;
                        details.push(("revoked_session_count", audit::number(revoked as i64)));
                    }
                    let after = load_user(conn, id).await?;
                    audit::user_changed(conn, action, By::Caller, Some(&before), Some(&after), &details).await?;
                    Ok::<_, Error>(())
                })
            })
            .await
    }

    /// `UnlockUser`: lifts the account's sign-in locks (every address).
    pub(crate) async fn unlock_user(&self, principal: Option<&Principal>, user_id: &str) -> Result<User, Error> {
        let (id, user) = self.managed(principal, user_id).await?;
        let email = normalize_email(&user.email);
        self.db()
            .transaction(&EntityScope::System, move |conn| {
                Box::pin(async move {
                    let current = load_user(conn, id).await?;
                    let lifted = diesel::sql_query("DELETE FROM login_throttle WHERE key = $1 OR starts_with(key, $2)")
                        .bind::<Text, _>(format!("account:{email}"))
                        .bind::<Text, _>(format!("pair:{email}|"))
                        .execute(conn)
                        .await
                        .map_err(DbError::from)?;
                    // Sign-in counters are not part of the account: the event
                    // has no field change, only how many counters were reset.
                    audit::user_changed(
                        conn,
                        "identity.users.unlock",
                        By::Caller,
                        Some(&current),
                        Some(&current),
                        &[("counters_reset", audit::number(lifted as i64))],
                    )
                    .await?;
                    Ok::<_, Error>(())
                })
            })
            .await?;
        self.user_by_id(user_id).await
    }

    /// `ResendInvitation`: a new link; the previous one stops working.
    pub(crate) async fn resend_invitation(
        &self,
        principal: Option<&Principal>,
        user_id: &str,
        delivery: i32,
    ) -> Result<(User, String), Error> {
        let (id, user) = self.managed(principal, user_id).await?;
        if user.state != UserState::Invited as i32 {
            return Err(Error::new(Code::FailedPrecondition, "only an invited account has an invitation"));
        }
        let by_mail = self.invitation_by_mail(delivery)?;
        let token = new_refresh_token();
        let (hash, expire) =
            (hash_token(&token), Utc::now() + Duration::seconds(self.settings().invitation_ttl_secs as i64));
        let console = self.settings().console_url.trim_end_matches('/').to_owned();
        let link = format!("{console}/invitation#token={token}");
        let mail = by_mail.then(|| (user.email.clone(), crate::mail::invitation(&user.display_name, &link, expire)));
        let delivery = if by_mail { "email" } else { "return_link" };
        self.db()
            .transaction(&EntityScope::System, move |conn| {
                Box::pin(async move {
                    let before = load_user(conn, id).await?;
                    diesel::sql_query(
                        "UPDATE users SET invitation_hash = $2, invitation_expire_time = $3, version = version + 1, update_time = now()
                          WHERE id = $1 AND state = 1",
                    )
                    .bind::<SqlUuid, _>(id)
                    .bind::<Bytea, _>(&hash)
                    .bind::<Timestamptz, _>(expire)
                    .execute(conn)
                    .await
                    .map_err(DbError::from)?;
                    if let Some((to, (subject, body))) = mail {
                        crate::mail::enqueue(conn, Some(id), &to, &subject, &body).await?;
                    }
                    let after = load_user(conn, id).await?;
                    audit::user_changed(
                        conn,
                        "identity.users.resend_invitation",
                        By::Caller,
                        Some(&before),
                        Some(&after),
                        &[("delivery", audit::text(delivery))],
                    )
                    .await?;
                    Ok::<_, Error>(())
                })
            })
            .await?;
        if by_mail {
            self.mailer().flush(self.db()).await;
            return Ok((self.user_by_id(user_id).await?, String::new()));
        }
        Ok((self.user_by_id(user_id).await?, link))
    }
}

/// The version an etag stands for (`"3"` → 3).
pub(crate) fn etag_version(etag: &str) -> i64 {
    etag.trim_matches('"').parse().unwrap_or(0)
}
