//! Tenancy: the entity tree, roles, grants and access decisions.
//!
//! The service's contract is `socle.tenancy.v1` (see `proto/socle/tenancy/v1/`).
//! Built: the entity tree ([`entities`]), roles and the permission catalogue
//! ([`roles`]), grants ([`grants`]) and access decisions with the grant that
//! decided them ([`access`]).

pub mod access;
pub mod cli;
mod common;
pub mod entities;
pub mod grants;
pub mod roles;

pub use entities::ensure_root;
pub use grants::bootstrap_grant;
use socle_db::{EmbeddedMigrations, embed_migrations};
use socle_proto::socle::tenancy::v1::*;
use socle_server::{MigrateFuture, ServerError, ServiceConfig, ServiceContext, ServiceHost};

/// The default gRPC port.
pub const DEFAULT_PORT: u16 = 50052;

/// The service name (logs, metrics, health).
pub const NAME: &str = "tenancy";

/// The embedded migrations of the service database.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Runs the service until `ctx.shutdown` resolves.
pub async fn run(ctx: ServiceContext) -> Result<(), ServerError> {
    let database = socle_server::open_database(&ctx.config.database, &ctx.secrets, MIGRATIONS).await?;
    let authorizer = socle_server::authorizer_for(
        &ctx.config.auth,
        &ctx.secrets,
        ctx.authorizer.clone(),
        Some(std::sync::Arc::new(access::LocalAccessCheck::new(database.clone()))),
    )
    .await?;
    let platform = socle_server::platform_clients(&ctx.config.auth, &ctx.secrets).await?;
    let host = ServiceHost::new(NAME, socle_proto::descriptor_pool(), ctx.config.server.clone())
        .authorizer(authorizer)
        .readiness_database(database.clone())
        .audit(database.clone(), &ctx.config.audit, platform.as_ref())?
        .add_service(entity_service_server::EntityServiceServer::new(entities::EntityApi::new(database.clone())))
        .add_service(role_service_server::RoleServiceServer::new(roles::RoleApi::new(database.clone())))
        .add_service(grant_service_server::GrantServiceServer::new(grants::GrantApi::new(database.clone())))
        .add_service(access_service_server::AccessServiceServer::new(access::AccessApi::new(database.clone())));
    roles::ensure_built_in(&database).await.map_err(|e| ServerError::Other(format!("built-in roles: {e}")))?;
    host.serve(ctx.listener, ctx.shutdown).await
}

/// Runs the migrations only (`tenancy migrate`, the deployment job).
pub fn migrate(config: ServiceConfig, secrets: socle_server::SecretResolver) -> MigrateFuture {
    Box::pin(async move { socle_server::migrate_only(&config.database, &secrets, MIGRATIONS).await })
}
