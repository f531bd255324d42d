//! Cluster administration used by the local platform (`cargo xtask dev`),
//! the test kit and operators' jobs: databases, roles and grants.

use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};

use crate::DbError;

/// True if `name` is a safe unquoted PostgreSQL identifier.
pub fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some('a'..='z' | '_'))
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
        && name.len() <= 63
}

fn check(name: &str) -> Result<(), DbError> {
    if is_identifier(name) { Ok(()) } else { Err(DbError::Migration(format!("`{name}` is not a valid identifier"))) }
}

/// Connects to the maintenance database of a cluster.
pub async fn connect(admin_url: &str) -> Result<AsyncPgConnection, DbError> {
    Ok(AsyncPgConnection::establish(admin_url).await?)
}

/// Creates `name` if it does not exist.
pub async fn create_database(conn: &mut AsyncPgConnection, name: &str) -> Result<bool, DbError> {
    check(name)?;
    match conn.batch_execute(&format!("CREATE DATABASE {name}")).await {
        Ok(()) => Ok(true),
        Err(diesel::result::Error::DatabaseError(_, info)) if info.message().contains("already exists") => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Drops `name` (and disconnects its sessions).
pub async fn drop_database(conn: &mut AsyncPgConnection, name: &str) -> Result<(), DbError> {
    check(name)?;
    conn.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await?;
    Ok(())
}

/// Creates a login role that is neither superuser nor owner of anything,
/// so row-level security applies to it. Idempotent; resets the password.
pub async fn ensure_login_role(conn: &mut AsyncPgConnection, role: &str, password: &str) -> Result<(), DbError> {
    check(role)?;
    let password = password.replace('\'', "''");
    let sql = format!(
        "DO $$ BEGIN
           CREATE ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS;
         EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
         ALTER ROLE {role} WITH LOGIN NOSUPERUSER NOBYPASSRLS PASSWORD '{password}';"
    );
    conn.batch_execute(&sql).await?;
    Ok(())
}

/// Grants `role` data access (not DDL) on everything in `public`.
pub async fn grant_app_role(conn: &mut AsyncPgConnection, role: &str) -> Result<(), DbError> {
    check(role)?;
    conn.batch_execute(&format!(
        "GRANT USAGE ON SCHEMA public TO {role};
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role};
         GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role};
         GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO {role};"
    ))
    .await?;
    Ok(())
}
