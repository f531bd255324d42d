//! PostgreSQL access shared by every service.
//!
//! - [`Database`]: a bb8 pool of `diesel-async` connections.
//! - [`Database::transaction`]: the one transaction helper. It begins a
//!   transaction, sets the caller's [`EntityScope`] (transaction-local), runs
//!   the closure and commits on `Ok`, rolls back on `Err`. PostgreSQL
//!   row-level security policies read the scope through
//!   `socle_entity_visible(entity_id)`, so a query that forgets its entity
//!   filter still sees only allowed rows.
//! - [`migrate`]: embedded diesel migrations, run as the owner role, after
//!   installing the scope functions ([`SCOPE_FUNCTIONS_SQL`]).
//! - [`DbError`] → [`socle_errors::Error`]: the SQLSTATE mapping, in one place.
//! - [`admin`]: create databases and roles (local platform and tests).

use std::{future::Future, pin::Pin, time::Duration};

use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel_async::{
    AnsiTransactionManager, AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection, TransactionManager,
    pooled_connection::{AsyncDieselConnectionManager, bb8},
};
pub use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use serde::{Deserialize, Serialize};
use socle_config::{SecretRef, SecretResolver, SecretString};
use socle_errors::{Code, Error};
use uuid::Uuid;

pub mod admin;
pub mod cluster;
pub mod idempotency;
pub mod statements;

pub use diesel_async::AsyncPgConnection as Connection;

/// A boxed future borrowing the connection, as returned by transaction bodies.
pub type BoxFuture<'c, T> = Pin<Box<dyn Future<Output = T> + Send + 'c>>;

/// SQL functions the row-level security policies of every service use.
/// Installed (idempotently) before each service's own migrations.
pub const SCOPE_FUNCTIONS_SQL: &str = r#"
CREATE OR REPLACE FUNCTION socle_entity_scope() RETURNS uuid[]
LANGUAGE sql STABLE PARALLEL SAFE AS $$
  SELECT CASE
    WHEN coalesce(current_setting('socle.entity_scope', true), '') IN ('', '*') THEN '{}'::uuid[]
    ELSE string_to_array(current_setting('socle.entity_scope', true), ',')::uuid[]
  END
$$;
CREATE OR REPLACE FUNCTION socle_entity_visible(entity uuid) RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE AS $$
  SELECT current_setting('socle.entity_scope', true) = '*' OR entity = ANY (socle_entity_scope())
$$;
-- Accent- and case-insensitive folding for French text search that needs no
-- extension (unaccent needs the contrib package on the server).
CREATE OR REPLACE FUNCTION socle_fold(value text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT translate(lower(value), 'àâäáãåçéèêëíìîïñóòôöõúùûüýÿœæ', 'aaaaaaceeeeiiiinooooouuuuyyoa')
$$;
-- Idempotency keys of creates: `request_id` → the resource first created.
CREATE TABLE IF NOT EXISTS socle_idempotency (
  method text NOT NULL,
  request_id uuid NOT NULL,
  resource_id uuid NOT NULL,
  create_time timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (method, request_id)
);
-- The transactional outbox (ADR 0006): audit events written in the same
-- transaction as the change they describe, delivered by the relay
-- (`socle-outbox`) and deleted once the audit service has stored them.
CREATE TABLE IF NOT EXISTS socle_outbox (
  id uuid PRIMARY KEY,
  payload bytea NOT NULL,
  create_time timestamptz NOT NULL DEFAULT clock_timestamp(),
  attempts integer NOT NULL DEFAULT 0,
  next_attempt_time timestamptz NOT NULL DEFAULT clock_timestamp(),
  last_error text
);
CREATE INDEX IF NOT EXISTS socle_outbox_due ON socle_outbox (next_attempt_time, create_time);
"#;

/// `[database]` settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    /// Connection URL of the service's application role (no password in it).
    pub url: String,
    /// Password of the application role, as a secret locator.
    pub password: Option<SecretRef>,
    /// Pool size.
    pub max_connections: u32,
    /// How long to wait for a pooled connection, in milliseconds.
    pub acquire_timeout_ms: u64,
    /// Run migrations at start-up (development). In production a job runs
    /// `<service> migrate` before the rollout.
    pub migrate_on_start: bool,
    /// Connection URL of the owner role that runs migrations; defaults to `url`.
    pub owner_url: Option<String>,
    /// Password of the owner role, as a secret locator.
    pub owner_password: Option<SecretRef>,
    /// After migrating, grant table access to this (non-owner) role.
    pub app_role: Option<String>,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        DatabaseSettings {
            url: String::new(),
            password: None,
            max_connections: 10,
            acquire_timeout_ms: 5_000,
            migrate_on_start: false,
            owner_url: None,
            owner_password: None,
            app_role: None,
        }
    }
}

/// Database settings with their secrets resolved.
pub struct ResolvedDatabase {
    /// The application connection string (may contain a password: never log it).
    pub url: SecretString,
    /// The owner connection string, for migrations.
    pub owner_url: SecretString,
    /// Pool size.
    pub max_connections: u32,
    /// Pool acquire timeout.
    pub acquire_timeout: Duration,
    /// Whether to migrate at start-up.
    pub migrate_on_start: bool,
    /// The role to grant access to after migrating.
    pub app_role: Option<String>,
}

impl DatabaseSettings {
    /// Resolves the passwords into full connection strings.
    pub async fn resolve(&self, secrets: &SecretResolver) -> Result<ResolvedDatabase, socle_config::ConfigError> {
        if self.url.is_empty() {
            return Err(socle_config::ConfigError::invalid("database.url is required"));
        }
        let password = secrets.resolve_opt(self.password.as_ref()).await?;
        let owner_password = secrets.resolve_opt(self.owner_password.as_ref()).await?;
        let owner_url = self.owner_url.as_deref().unwrap_or(&self.url);
        let owner_password = owner_password.or_else(|| if self.owner_url.is_none() { password.clone() } else { None });
        Ok(ResolvedDatabase {
            url: with_password(&self.url, password.as_ref()),
            owner_url: with_password(owner_url, owner_password.as_ref()),
            max_connections: self.max_connections,
            acquire_timeout: Duration::from_millis(self.acquire_timeout_ms),
            migrate_on_start: self.migrate_on_start,
            app_role: self.app_role.clone(),
        })
    }
}

/// Inserts a password into a `postgres://user@host/db` URL.
pub fn with_password(url: &str, password: Option<&SecretString>) -> SecretString {
    use socle_config::ExposeSecret;
    let Some(password) = password else { return SecretString::from(url.to_owned()) };
    let Some((scheme, rest)) = url.split_once("://") else { return SecretString::from(url.to_owned()) };
    let Some((user, host)) = rest.split_once('@') else { return SecretString::from(url.to_owned()) };
    let user = user.split(':').next().unwrap_or(user);
    let encoded: String = password
        .expose_secret()
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    SecretString::from(format!("{scheme}://{user}:{encoded}@{host}"))
}

/// Which entities' rows the current transaction may see and write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntityScope {
    /// These entities only (the caller's accessible entities).
    Entities(Vec<Uuid>),
    /// Every entity: only for system work (relays, scheduled jobs), never for
    /// a request made on behalf of a person.
    System,
}

impl EntityScope {
    /// One entity.
    pub fn entity(id: Uuid) -> Self {
        EntityScope::Entities(vec![id])
    }

    /// No entity at all: every RLS-protected table looks empty.
    pub fn none() -> Self {
        EntityScope::Entities(Vec::new())
    }

    /// Whether rows of `entity` are visible in this scope.
    pub fn allows(&self, entity: Uuid) -> bool {
        match self {
            EntityScope::System => true,
            EntityScope::Entities(ids) => ids.contains(&entity),
        }
    }

    fn setting(&self) -> String {
        match self {
            EntityScope::System => "*".into(),
            EntityScope::Entities(ids) => ids.iter().map(Uuid::to_string).collect::<Vec<_>>().join(","),
        }
    }
}

/// A database failure.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// No pooled connection could be obtained in time.
    #[error("database pool: {0}")]
    Pool(String),
    /// A connection could not be established.
    #[error("database connection: {0}")]
    Connect(#[from] diesel::ConnectionError),
    /// A query failed.
    #[error(transparent)]
    Query(#[from] DieselError),
    /// Migrations failed.
    #[error("migration: {0}")]
    Migration(String),
}

impl DbError {
    /// True for failures worth retrying (serialization failure, lost connection).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            DbError::Pool(_)
                | DbError::Connect(_)
                | DbError::Query(DieselError::DatabaseError(
                    DatabaseErrorKind::SerializationFailure
                        | DatabaseErrorKind::ClosedConnection
                        | DatabaseErrorKind::UnableToSendCommand,
                    _
                ))
        )
    }
}

/// The SQLSTATE → error mapping, in one place. Constraint names (never
/// values) may appear in messages; SQL text never does.
impl From<DbError> for Error {
    fn from(error: DbError) -> Self {
        match &error {
            DbError::Pool(_) | DbError::Connect(_) => {
                Error::unavailable("the database is busy, retry later").with_source(error)
            }
            DbError::Query(DieselError::NotFound) => Error::new(Code::NotFound, "not found"),
            DbError::Query(DieselError::DatabaseError(kind, info)) => {
                let constraint = info.constraint_name().unwrap_or("").to_owned();
                let mapped = match kind {
                    DatabaseErrorKind::UniqueViolation => {
                        Error::new(Code::AlreadyExists, "a record with the same identity already exists")
                            .with_metadata("constraint", constraint)
                    }
                    DatabaseErrorKind::ForeignKeyViolation => Error::new(
                        Code::FailedPrecondition,
                        "a referenced record does not exist or is still referenced",
                    )
                    .with_metadata("constraint", constraint),
                    DatabaseErrorKind::CheckViolation | DatabaseErrorKind::NotNullViolation => {
                        let field = info.column_name().unwrap_or(&constraint).to_owned();
                        Error::invalid_field(field, "violates a database constraint")
                    }
                    DatabaseErrorKind::SerializationFailure => {
                        Error::new(Code::Aborted, "concurrent update, retry the request")
                    }
                    DatabaseErrorKind::ReadOnlyTransaction => {
                        Error::unavailable("the database is read-only (failover in progress)")
                    }
                    DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand => {
                        Error::unavailable("the database connection was lost, retry")
                    }
                    _ if info.message().contains("deadlock detected") => {
                        Error::new(Code::Aborted, "concurrent update, retry the request")
                    }
                    _ if info.message().contains("row-level security") => {
                        Error::permission_denied("the record belongs to an entity outside your scope")
                    }
                    _ if info.message().contains("canceling statement due to statement timeout") => {
                        Error::new(Code::DeadlineExceeded, "the database query took too long")
                    }
                    _ => Error::internal("database error"),
                };
                mapped.with_source(error)
            }
            _ => Error::internal(error),
        }
    }
}

/// A pool of connections to one service database.
#[derive(Clone)]
pub struct Database {
    pool: bb8::Pool<AsyncPgConnection>,
    url: std::sync::Arc<SecretString>,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database").field("state", &self.pool.state()).finish()
    }
}

impl Database {
    /// Opens a pool. Connections are made lazily except the first, which is
    /// checked so that a wrong URL fails at start-up.
    pub async fn connect(url: &SecretString, max_connections: u32, acquire_timeout: Duration) -> Result<Self, DbError> {
        use socle_config::ExposeSecret;
        let mut config = diesel_async::pooled_connection::ManagerConfig::<AsyncPgConnection>::default();
        // No `SELECT 1` at checkout (diesel-async's default): it would be
        // one more round trip per transaction, a fifth of a short read's.
        // A connection whose socket is known closed (the server ended it)
        // is dropped at checkout at no cost; one that died unnoticed fails
        // its BEGIN, which `transaction` retries once on a new connection.
        config.recycling_method = diesel_async::pooled_connection::RecyclingMethod::CustomFunction(Box::new(|conn| {
            Box::pin(async move {
                use diesel_async::pooled_connection::PoolableConnection;
                if conn.is_broken() { Err(DieselError::BrokenTransactionManager) } else { Ok(()) }
            })
        }));
        config.custom_setup = Box::new(|url| {
            Box::pin(async move {
                let mut conn = AsyncPgConnection::establish(url).await?;
                conn.set_instrumentation(statements::Counter);
                Ok(conn)
            })
        });
        let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(url.expose_secret(), config);
        let pool = bb8::Pool::builder()
            .max_size(max_connections)
            .connection_timeout(acquire_timeout)
            .build(manager)
            .await
            .map_err(|e| DbError::Pool(e.to_string()))?;
        let db = Database { pool, url: std::sync::Arc::new(url.clone()) };
        db.ping().await?;
        Ok(db)
    }

    /// A connection outside the pool, for long-lived sessions such as
    /// `LISTEN` (a pooled connection would be held forever).
    pub async fn dedicated_connection(&self) -> Result<AsyncPgConnection, DbError> {
        use socle_config::ExposeSecret;
        Ok(AsyncPgConnection::establish(self.url.expose_secret()).await?)
    }

    /// Checks that a connection can run a query (readiness).
    pub async fn ping(&self) -> Result<(), DbError> {
        let mut conn = self.pool.get().await.map_err(|e| DbError::Pool(e.to_string()))?;
        diesel::sql_query("SELECT 1").execute(&mut *conn).await?;
        Ok(())
    }

    /// Runs `body` in a transaction with `scope` set for row-level security:
    /// commit on `Ok`, roll back on `Err`.
    ///
    /// ```ignore
    /// db.transaction(&scope, |conn| Box::pin(async move {
    ///     organizations::insert(conn, &new).await
    /// })).await
    /// ```
    pub async fn transaction<R, E, F>(&self, scope: &EntityScope, body: F) -> Result<R, E>
    where
        F: for<'c> FnOnce(&'c mut AsyncPgConnection) -> BoxFuture<'c, Result<R, E>> + Send,
        E: From<DbError>,
    {
        // BEGIN and the scope in one round trip (simple protocol): the
        // setting is made of UUIDs, commas or `*` only, never of input.
        let setting = scope.setting();
        debug_assert!(setting.chars().all(|c| c.is_ascii_hexdigit() || matches!(c, '-' | ',' | '*')));
        let begin = format!("BEGIN; SELECT set_config('socle.entity_scope', '{setting}', true)");
        let mut pooled = self.pool.get().await.map_err(|e| E::from(DbError::Pool(e.to_string())))?;
        if let Err(error) = begin_with(&mut pooled, &begin).await {
            // Nothing was done: a connection that turns out closed (the
            // server restarted or ended it) is discarded and replaced once.
            let closed = match &error {
                DieselError::DatabaseError(
                    DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand,
                    _,
                ) => true,
                // The server's last words (SQLSTATE 57P01, 57P02).
                DieselError::DatabaseError(_, info) => info.message().starts_with("terminating connection"),
                _ => false,
            };
            if !closed {
                return Err(E::from(error.into()));
            }
            tracing::debug!(%error, "a pooled connection was closed; retrying on a new one");
            // Marked broken, so that the pool drops it rather than keep it.
            AnsiTransactionManager::transaction_manager_status_mut(&mut *pooled).set_in_error();
            drop(pooled);
            pooled = self.pool.get().await.map_err(|e| E::from(DbError::Pool(e.to_string())))?;
            begin_with(&mut pooled, &begin).await.map_err(|e| E::from(e.into()))?;
        }
        let conn: &mut AsyncPgConnection = &mut pooled;
        match body(conn).await {
            Ok(value) => {
                AnsiTransactionManager::commit_transaction(conn).await.map_err(|e| E::from(e.into()))?;
                Ok(value)
            }
            Err(error) => {
                if let Err(rollback) = AnsiTransactionManager::rollback_transaction(conn).await {
                    tracing::warn!(error = %rollback, "rollback failed");
                }
                Err(error)
            }
        }
    }
}

/// Runs `sql` (a BEGIN and what goes with it) as the start of a transaction;
/// if it fails after the BEGIN took effect, rolls back so that the
/// connection returns clean.
async fn begin_with(conn: &mut AsyncPgConnection, sql: &str) -> Result<(), DieselError> {
    let result = AnsiTransactionManager::begin_transaction_sql(conn, sql).await;
    if result.is_err() {
        // Best effort: on a closed connection this fails at once.
        let _ = conn.batch_execute("ROLLBACK").await;
    }
    result
}

/// Sets the entity scope of the current transaction (`SET LOCAL`).
pub async fn set_scope(conn: &mut AsyncPgConnection, scope: &EntityScope) -> Result<(), DieselError> {
    diesel::sql_query("SELECT set_config('socle.entity_scope', $1, true)")
        .bind::<diesel::sql_types::Text, _>(scope.setting())
        .execute(conn)
        .await
        .map(|_| ())
}

/// Installs the scope functions, runs pending embedded migrations as the
/// owner and, when `app_role` is given, grants it table access. Returns the
/// versions applied.
pub async fn migrate(
    owner_url: &SecretString,
    migrations: EmbeddedMigrations,
    app_role: Option<&str>,
) -> Result<Vec<String>, DbError> {
    use diesel_migrations::MigrationHarness;
    use socle_config::ExposeSecret;

    let mut conn = AsyncPgConnection::establish(owner_url.expose_secret()).await?;
    conn.batch_execute(SCOPE_FUNCTIONS_SQL).await?;
    let mut harness = diesel_async::AsyncMigrationHarness::new(conn);
    let applied = tokio::task::block_in_place(|| harness.run_pending_migrations(migrations))
        .map_err(|e| DbError::Migration(e.to_string()))?
        .into_iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>();
    let mut conn = harness.into_inner();
    if let Some(role) = app_role {
        admin::grant_app_role(&mut conn, role).await?;
    }
    Ok(applied)
}
