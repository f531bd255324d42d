//! The audit events of sign-in: successes, failures, the locks they start
//! and refresh-token reuse, each written in the transaction that records
//! it (ADR 0006). An event goes to the chain of the account's home entity,
//! with the account as actor; attempts on addresses that match no account
//! are only logged (there is no entity to chain them to, and the address
//! typed is personal data of someone who may not be a user).
//!
//! Changes to accounts and service accounts are audited by their handlers
//! with [`user_changed`] and [`service_account_changed`] (built on
//! [`socle_server::audit::change`]), in the transaction of the change and
//! never on an idempotent replay.

use diesel::{QueryableByName, sql_types::Uuid as SqlUuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use socle_db::DbError;
use socle_errors::Error;
use socle_proto::socle::{
    audit::v1::Outcome,
    identity::v1::{ServiceAccount, User},
    r#type::v1::{ActorKind, ActorRef},
};
use uuid::Uuid;

#[derive(QueryableByName)]
struct Home {
    #[diesel(sql_type = SqlUuid)]
    entity_id: Uuid,
}

async fn home_entity(conn: &mut AsyncPgConnection, user: Uuid) -> Result<Uuid, Error> {
    let home: Home = diesel::sql_query("SELECT entity_id FROM users WHERE id = $1")
        .bind::<SqlUuid, _>(user)
        .get_result(conn)
        .await
        .map_err(DbError::from)?;
    Ok(home.entity_id)
}

async fn write(
    conn: &mut AsyncPgConnection,
    user: Uuid,
    action: &str,
    outcome: Outcome,
    reason: &str,
    details: &[(&str, prost_types::Value)],
) -> Result<(), Error> {
    let entity = home_entity(conn, user).await?;
    let mut event = socle_server::audit::event(crate::NAME, action, outcome);
    event.actor = Some(ActorRef { kind: ActorKind::User as i32, id: user.to_string(), display_name: String::new() });
    event.entity_id = entity.to_string();
    if event.acting_entity_id.is_empty() {
        event.acting_entity_id = entity.to_string();
    }
    event.resource_type = "identity.user".into();
    event.resource_id = user.to_string();
    if outcome != Outcome::Ok {
        event.status_code = "UNAUTHENTICATED".into();
        event.reason = reason.to_owned();
    }
    with_details(&mut event, details);
    socle_outbox::enqueue(conn, &event).await
}

/// A successful sign-in of `user`.
pub(crate) async fn signed_in(conn: &mut AsyncPgConnection, user: Uuid, second_factor: bool) -> Result<(), Error> {
    write(conn, user, "identity.auth.login", Outcome::Ok, "", &[("second_factor", flag(second_factor))]).await
}

/// A failed sign-in of `user` (`reason`: `bad_password`,
/// `bad_second_factor`), and the lock it started, if any.
pub(crate) async fn sign_in_failed(
    conn: &mut AsyncPgConnection,
    user: Uuid,
    reason: &str,
    lock: Option<&(String, i64)>,
) -> Result<(), Error> {
    write(conn, user, "identity.auth.login_failed", Outcome::Denied, reason, &[]).await?;
    if let Some((scope, seconds)) = lock {
        let seconds = number(*seconds);
        write(
            conn,
            user,
            "identity.auth.locked",
            Outcome::Denied,
            "too_many_failures",
            &[("lock_scope", text(scope)), ("lock_seconds", seconds)],
        )
        .await?;
    }
    Ok(())
}

/// A spent refresh token presented again: the session was revoked.
pub(crate) async fn refresh_reused(conn: &mut AsyncPgConnection, user: Uuid, session: Uuid) -> Result<(), Error> {
    write(
        conn,
        user,
        "identity.auth.refresh_reused",
        Outcome::Denied,
        "refresh_token_reuse",
        &[("session_id", text(&session.to_string()))],
    )
    .await
}

/// The resource type of accounts.
pub(crate) const USER: &str = "identity.user";
/// The resource type of service accounts.
pub(crate) const SERVICE_ACCOUNT: &str = "identity.service_account";
/// The fields of a `User` that are personal data: marked so, with the user
/// as data subject, the audit store seals their values per person.
pub(crate) const PERSONAL_FIELDS: &[&str] = &["email", "given_name", "family_name", "display_name"];

/// Who an account event names as actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum By {
    /// The authorized caller (the system outside a call: operator commands).
    Caller,
    /// The account itself: anonymous calls made in its name (accepting an
    /// invitation, a password reset, a logout with a refresh token).
    Account,
}

fn with_details(event: &mut socle_outbox::AuditEvent, details: &[(&str, prost_types::Value)]) {
    if !details.is_empty() {
        event.details =
            Some(prost_types::Struct { fields: details.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect() });
    }
}

/// Records a change of an account, from `before` to `after` (either absent
/// for a creation or a deletion), in the chain of its home entity: the
/// fields that differ, personal ones marked with the user as subject. A
/// move between entities is recorded in both chains. The `User` message
/// carries no credential (no password, hash, token nor TOTP secret), so no
/// secret can reach the event through it; `details` must hold none either.
pub(crate) async fn user_changed(
    conn: &mut AsyncPgConnection,
    action: &str,
    by: By,
    before: Option<&User>,
    after: Option<&User>,
    details: &[(&str, prost_types::Value)],
) -> Result<(), Error> {
    let Some(user) = after.or(before) else { return Ok(()) };
    let mut event = socle_server::audit::change(
        crate::NAME,
        action,
        USER,
        &user.id,
        &user.entity_id,
        before,
        after,
        PERSONAL_FIELDS,
        &user.id,
    );
    if by == By::Account {
        event.actor = Some(ActorRef { kind: ActorKind::User as i32, id: user.id.clone(), display_name: String::new() });
        if event.acting_entity_id.is_empty() {
            event.acting_entity_id = user.entity_id.clone();
        }
    }
    with_details(&mut event, details);
    let mut events = vec![event];
    if let (Some(b), Some(a)) = (before, after)
        && b.entity_id != a.entity_id
    {
        let mut previous_home = events[0].clone();
        previous_home.id = Uuid::now_v7().to_string();
        previous_home.entity_id = b.entity_id.clone();
        events.push(previous_home);
    }
    socle_outbox::enqueue_all(conn, &events).await
}

/// Records a change of a service account (see [`user_changed`]); the
/// `ServiceAccount` message carries no secret nor secret hash.
pub(crate) async fn service_account_changed(
    conn: &mut AsyncPgConnection,
    action: &str,
    before: Option<&ServiceAccount>,
    after: Option<&ServiceAccount>,
    details: &[(&str, prost_types::Value)],
) -> Result<(), Error> {
    let Some(account) = after.or(before) else { return Ok(()) };
    let mut event = socle_server::audit::change(
        crate::NAME,
        action,
        SERVICE_ACCOUNT,
        &account.id,
        &account.entity_id,
        before,
        after,
        &[],
        "",
    );
    with_details(&mut event, details);
    socle_outbox::enqueue(conn, &event).await
}

/// A text detail.
pub(crate) fn text(value: &str) -> prost_types::Value {
    prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(value.to_owned())) }
}

/// A boolean detail.
pub(crate) fn flag(value: bool) -> prost_types::Value {
    prost_types::Value { kind: Some(prost_types::value::Kind::BoolValue(value)) }
}

/// A number detail.
pub(crate) fn number(value: i64) -> prost_types::Value {
    prost_types::Value { kind: Some(prost_types::value::Kind::NumberValue(value as f64)) }
}
