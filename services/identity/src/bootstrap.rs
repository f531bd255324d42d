//! Direct database bootstraps, for what must exist before anyone can call
//! the API: the first administrator (invited: no default password; the
//! invitation link is printed to the operator) and the platform's own
//! service accounts (with secrets from Vault).

use chrono::{Duration, Utc};
use diesel::sql_types::{Bytea, Text, Timestamptz, Uuid as SqlUuid};
use diesel_async::RunQueryDsl;
use socle_config::{ExposeSecret, SecretString};
use socle_db::{Database, DbError, EntityScope};
use socle_errors::Error;
use uuid::Uuid;

use crate::{
    audit::{self, By},
    service::{load_user, normalize_email},
    service_accounts,
    tokens::{hash_token, new_refresh_token},
};

/// Invites `email` (home entity `entity`) unless the address is taken;
/// returns the user id and, for a new invitation, its token.
pub async fn invite_user(
    db: &Database,
    email: &str,
    display_name: &str,
    entity: Uuid,
) -> Result<(Uuid, Option<String>), Error> {
    let token = new_refresh_token();
    let (email, display_name, hash) = (email.trim().to_owned(), display_name.to_owned(), hash_token(&token));
    let created = db
        .transaction(&EntityScope::System, move |conn| {
            Box::pin(async move {
                #[derive(diesel::QueryableByName)]
                struct Id {
                    #[diesel(sql_type = SqlUuid)]
                    id: Uuid,
                }
                let existing: Vec<Id> = diesel::sql_query("SELECT id FROM users WHERE email_normalized = $1")
                    .bind::<Text, _>(normalize_email(&email))
                    .load(conn)
                    .await
                    .map_err(DbError::from)?;
                if let Some(user) = <[Id]>::first(&existing) {
                    return Ok::<_, Error>((user.id, false));
                }
                let id = Uuid::now_v7();
                diesel::sql_query(
                    "INSERT INTO users (id, entity_id, email, email_normalized, display_name, state, invitation_hash, invitation_expire_time)
                     VALUES ($1, $2, $3, $4, $5, 1, $6, $7)",
                )
                .bind::<SqlUuid, _>(id)
                .bind::<SqlUuid, _>(entity)
                .bind::<Text, _>(&email)
                .bind::<Text, _>(normalize_email(&email))
                .bind::<Text, _>(&display_name)
                .bind::<Bytea, _>(&hash)
                .bind::<Timestamptz, _>(Utc::now() + Duration::days(7))
                .execute(conn)
                .await
                .map_err(DbError::from)?;
                // Outside any call: the system is the actor.
                let created = load_user(conn, id).await?;
                audit::user_changed(
                    conn,
                    "identity.users.create",
                    By::Caller,
                    None,
                    Some(&created),
                    &[("via", audit::text("operator"))],
                )
                .await?;
                Ok((id, true))
            })
        })
        .await?;
    Ok((created.0, created.1.then_some(token)))
}

/// Creates or updates the service account `client_id` with `secret`;
/// returns its id.
pub async fn ensure_service_account(
    db: &Database,
    name: &str,
    entity: Uuid,
    client_id: &str,
    secret: &SecretString,
) -> Result<Uuid, Error> {
    let (name, client_id, hash) = (name.to_owned(), client_id.to_owned(), hash_token(secret.expose_secret()));
    db.transaction(&EntityScope::System, move |conn| {
        Box::pin(async move {
            #[derive(diesel::QueryableByName)]
            struct Id {
                #[diesel(sql_type = SqlUuid)]
                id: Uuid,
            }
            let before = service_accounts::load(conn, "client_id = $1", &client_id).await?;
            let row: Id = diesel::sql_query(
                "INSERT INTO service_accounts (id, entity_id, name, display_name, client_id, secret_hash)
                 VALUES ($1, $2, $3, $3, $4, $5)
                 ON CONFLICT (client_id) DO UPDATE
                    SET secret_hash = EXCLUDED.secret_hash,
                        secret_create_time = CASE WHEN service_accounts.secret_hash = EXCLUDED.secret_hash
                                                  THEN service_accounts.secret_create_time ELSE now() END,
                        previous_secret_hash = NULL, previous_secret_expire_time = NULL,
                        version = service_accounts.version + (service_accounts.secret_hash <> EXCLUDED.secret_hash)::int,
                        update_time = now()
                 RETURNING id",
            )
            .bind::<SqlUuid, _>(Uuid::now_v7())
            .bind::<SqlUuid, _>(entity)
            .bind::<Text, _>(&name)
            .bind::<Text, _>(&client_id)
            .bind::<Bytea, _>(&hash)
            .get_result(conn)
            .await
            .map_err(DbError::from)?;
            // Outside any call: the system is the actor. Re-running with the
            // same secret changes nothing and records nothing.
            let action = match &before {
                None => "identity.service_accounts.create",
                Some(previous) if previous.secret_hash != hash => "identity.service_accounts.rotate_secret",
                Some(_) => return Ok(row.id),
            };
            let after = service_accounts::load(conn, "id = $1", &row.id.to_string())
                .await?
                .ok_or_else(|| Error::not_found("service account", row.id))?;
            audit::service_account_changed(
                conn,
                action,
                before.map(|b| b.to_proto()).as_ref(),
                Some(&after.to_proto()),
                &[("via", audit::text("operator"))],
            )
            .await?;
            Ok(row.id)
        })
    })
    .await
}
