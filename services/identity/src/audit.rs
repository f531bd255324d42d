//! The audit events of sign-in: successes, failures, the locks they start
//! and refresh-token reuse, each written in the transaction that records
//! it (ADR 0006). An event goes to the chain of the account's home entity,
//! with the account as actor; attempts on addresses that match no account
//! are only logged (there is no entity to chain them to, and the address
//! typed is personal data of someone who may not be a user).
//!
//! Changes to accounts and service accounts are audited by their handlers
//! with [`socle_server::audit::change`].

use diesel::{QueryableByName, sql_types::Uuid as SqlUuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use socle_db::DbError;
use socle_errors::Error;
use socle_proto::socle::{
    audit::v1::Outcome,
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
    if !details.is_empty() {
        event.details =
            Some(prost_types::Struct { fields: details.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect() });
    }
    socle_outbox::enqueue(conn, &event).await
}

fn text(value: &str) -> prost_types::Value {
    prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(value.to_owned())) }
}

fn flag(value: bool) -> prost_types::Value {
    prost_types::Value { kind: Some(prost_types::value::Kind::BoolValue(value)) }
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
        let seconds = prost_types::Value { kind: Some(prost_types::value::Kind::NumberValue(*seconds as f64)) };
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
