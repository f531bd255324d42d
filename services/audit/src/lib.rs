//! Audit: the append-only, hash-chained audit trail.
//!
//! The service's contract is `socle.audit.v1` (see `proto/socle/audit/v1/`);
//! the design is in ADR 0006 (outbox, idempotent delivery) and ADR 0011
//! (canonical encoding, checkpoints, crypto-shredding).
//!
//! - [`store`]: appends (one lock per chain per batch, one multi-row insert),
//!   reads, verification, checkpoints, erasing data subjects (by event or by
//!   `shred_subject`);
//! - [`canonical`] and [`verify`]: the hash chain, shared by `VerifyChain`
//!   and the offline verifier;
//! - [`keys`]: checkpoint signing keys, KEKs and per-subject keys;
//! - [`export`]: JSON Lines exports and `socle-audit verify FILE`;
//! - [`api`]: the gRPC adapters.

pub mod api;
pub mod canonical;
pub mod cli;
pub mod export;
pub mod keys;
pub mod store;
pub mod validate;
pub mod verify;

use std::{sync::Arc, time::Duration};

use diesel_async::SimpleAsyncConnection;
use socle_db::{EmbeddedMigrations, embed_migrations};
use socle_proto::socle::audit::v1::*;
use socle_server::{MigrateFuture, ServerError, ServiceConfig, ServiceContext, ServiceHost};

/// The default gRPC port.
pub const DEFAULT_PORT: u16 = 50055;

/// The service name (logs, metrics, health).
pub const NAME: &str = "audit";

/// The embedded migrations of the service database.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// How often chains with unsealed events get a checkpoint.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(60);

/// The tables no role may change once written.
const APPEND_ONLY_TABLES: &str = "audit_events, audit_checkpoints, audit_erased_subjects";

/// Runs the service until `ctx.shutdown` resolves.
pub async fn run(ctx: ServiceContext) -> Result<(), ServerError> {
    let keys = checkpoint_keys(&ctx.config.auth, &ctx.secrets).await?;
    let database = socle_server::open_database(&ctx.config.database, &ctx.secrets, MIGRATIONS).await?;
    if ctx.config.database.migrate_on_start {
        restrict_app_role(&ctx.config, &ctx.secrets).await?;
    }
    let authorizer = socle_server::authorizer_for(&ctx.config.auth, &ctx.secrets, ctx.authorizer.clone(), None).await?;
    let platform = socle_server::platform_clients(&ctx.config.auth, &ctx.secrets).await?;
    let access: Option<Arc<dyn socle_server::token_authz::AccessCheck>> = platform.as_ref().map(|p| {
        Arc::new(socle_server::remote_auth::RemoteAccessCheck::new(p.tenancy.clone(), p.token.clone())) as Arc<_>
    });
    let store = store::Store::open(database.clone(), keys, store::StoreOptions::default())
        .await
        .map_err(|e| ServerError::Other(format!("audit store: {e}")))?;
    let timer = tokio::spawn(checkpoint_timer(store.clone()));
    // Its own denied reads and exports go through its outbox like any
    // service's (delivered to itself when `[audit] url` names it).
    let host = ServiceHost::new(NAME, socle_proto::descriptor_pool(), ctx.config.server.clone())
        .authorizer(authorizer)
        .readiness_database(database.clone())
        .audit(database, &ctx.config.audit, platform.as_ref())?;
    let api = api::AuditApi::new(store, platform, access);
    let host = host
        .add_service(audit_event_service_server::AuditEventServiceServer::new(api.clone()))
        .add_service(checkpoint_service_server::CheckpointServiceServer::new(api));
    let served = host.serve(ctx.listener, ctx.shutdown).await;
    timer.abort();
    served
}

async fn checkpoint_timer(store: store::Store) {
    let mut every = tokio::time::interval(CHECKPOINT_INTERVAL);
    every.tick().await;
    loop {
        every.tick().await;
        match store.checkpoint_pending().await {
            Ok(0) => {}
            Ok(count) => tracing::info!(count, "chains sealed by a checkpoint"),
            Err(error) => tracing::warn!(error = %error, "periodic checkpoints failed"),
        }
    }
}

/// The checkpoint keys named in `[auth]` (`signing_key`, the current one,
/// and `previous_signing_keys`). Without `signing_key` the service runs with
/// an ephemeral key and says so: checkpoints made then cannot be re-signed
/// and personal values appended then become unreadable at the next start.
/// That is for tests and throwaway environments only.
pub async fn checkpoint_keys(
    settings: &socle_server::AuthSettings,
    secrets: &socle_server::SecretResolver,
) -> Result<keys::Keys, ServerError> {
    let Some(locator) = settings.signing_key.as_ref() else {
        tracing::warn!(
            "auth.signing_key is not set: checkpoints are signed with an ephemeral key and personal values are \
             sealed under an ephemeral key-encryption key (unreadable after a restart); never run so in production"
        );
        return Ok(keys::Keys::ephemeral());
    };
    let parse = |secret, signing| keys::CheckpointKey::from_pkcs8_base64(&secret, signing).map_err(ServerError::Other);
    let current = parse(secrets.resolve(locator).await?, true)?;
    let mut previous = Vec::new();
    for locator in &settings.previous_signing_keys {
        previous.push(parse(secrets.resolve(locator).await?, false)?);
    }
    keys::Keys::new(current, previous).map_err(ServerError::Other)
}

/// Takes UPDATE, DELETE and TRUNCATE on the append-only tables back from
/// the application role, after the generic grant that follows migrations
/// (which grants every table of the schema). The trigger refuses them for
/// every role anyway; this makes the refusal a privilege error too.
pub async fn restrict_app_role(
    config: &ServiceConfig,
    secrets: &socle_server::SecretResolver,
) -> Result<(), ServerError> {
    let resolved = config.database.resolve(secrets).await?;
    match resolved.app_role.as_deref() {
        Some(role) => restrict_role(socle_config::ExposeSecret::expose_secret(&resolved.owner_url), role).await,
        None => Ok(()),
    }
}

/// [`restrict_app_role`] for a role, connecting with `owner_url`.
pub async fn restrict_role(owner_url: &str, role: &str) -> Result<(), ServerError> {
    if !socle_db::admin::is_identifier(role) {
        return Err(ServerError::Other(format!("database.app_role `{role}` is not a valid identifier")));
    }
    let mut conn = socle_db::admin::connect(owner_url).await?;
    conn.batch_execute(&format!("REVOKE UPDATE, DELETE, TRUNCATE ON {APPEND_ONLY_TABLES} FROM {role}"))
        .await
        .map_err(socle_db::DbError::from)?;
    Ok(())
}

/// Runs the migrations only (`audit migrate`, the deployment job).
pub fn migrate(config: ServiceConfig, secrets: socle_server::SecretResolver) -> MigrateFuture {
    Box::pin(async move {
        let applied = socle_server::migrate_only(&config.database, &secrets, MIGRATIONS).await?;
        restrict_app_role(&config, &secrets).await?;
        Ok(applied)
    })
}
