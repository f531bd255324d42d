//! Identity: accounts, credentials, sessions, tokens and service accounts.
//!
//! The service's contract is `socle.identity.v1` (see `proto/socle/identity/v1/`).
//! Every RPC already exists, guarded by the authorization layer; those not
//! implemented yet answer `UNIMPLEMENTED`.

use socle_db::{EmbeddedMigrations, embed_migrations};
use socle_proto::socle::identity::v1::*;
use socle_server::{MigrateFuture, ServerError, ServiceConfig, ServiceContext, ServiceHost};

/// The default gRPC port.
pub const DEFAULT_PORT: u16 = 50051;

/// The service name (logs, metrics, health).
pub const NAME: &str = "identity";

/// The embedded migrations of the service database.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Runs the service until `ctx.shutdown` resolves.
pub async fn run(ctx: ServiceContext) -> Result<(), ServerError> {
    let database = socle_server::open_database(&ctx.config.database, &ctx.secrets, MIGRATIONS).await?;
    let host = ServiceHost::new(NAME, socle_proto::descriptor_pool(), ctx.config.server.clone())
        .authorizer(ctx.authorizer)
        .readiness_database(database);
    let host = socle_server::unimplemented_services!(
        host,
        account_service_server::{AccountServiceServer, AccountService},
        auth_service_server::{AuthServiceServer, AuthService},
        jwks_service_server::{JwksServiceServer, JwksService},
        service_account_service_server::{ServiceAccountServiceServer, ServiceAccountService},
        user_service_server::{UserServiceServer, UserService},
    );
    host.serve(ctx.listener, ctx.shutdown).await
}

/// Runs the migrations only (`identity migrate`, the deployment job).
pub fn migrate(config: ServiceConfig, secrets: socle_server::SecretResolver) -> MigrateFuture {
    Box::pin(async move { socle_server::migrate_only(&config.database, &secrets, MIGRATIONS).await })
}
