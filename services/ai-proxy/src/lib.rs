//! AI proxy: the assistant, its knowledge base, providers, quotas and evaluations.
//!
//! The service's contract is `socle.ai.v1` (see `proto/socle/ai/v1/`).
//! Every RPC already exists, guarded by the authorization layer; those not
//! implemented yet answer `UNIMPLEMENTED`.

use socle_db::{EmbeddedMigrations, embed_migrations};
use socle_proto::socle::ai::v1::*;
use socle_server::{MigrateFuture, ServerError, ServiceConfig, ServiceContext, ServiceHost};

/// The default gRPC port.
pub const DEFAULT_PORT: u16 = 50056;

/// The service name (logs, metrics, health).
pub const NAME: &str = "ai-proxy";

/// The embedded migrations of the service database.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Runs the service until `ctx.shutdown` resolves.
pub async fn run(ctx: ServiceContext) -> Result<(), ServerError> {
    let database = socle_server::open_database(&ctx.config.database, &ctx.secrets, MIGRATIONS).await?;
    let authorizer = socle_server::authorizer_for(&ctx.config.auth, &ctx.secrets, ctx.authorizer.clone(), None).await?;
    let platform = socle_server::platform_clients(&ctx.config.auth, &ctx.secrets).await?;
    let host = ServiceHost::new(NAME, socle_proto::descriptor_pool(), ctx.config.server.clone())
        .authorizer(authorizer)
        .readiness_database(database.clone())
        .audit(database, &ctx.config.audit, platform.as_ref())?;
    let host = socle_server::unimplemented_services!(
        host,
        assistant_service_server::{AssistantServiceServer, AssistantService},
        evaluation_service_server::{EvaluationServiceServer, EvaluationService},
        knowledge_document_service_server::{KnowledgeDocumentServiceServer, KnowledgeDocumentService},
        provider_service_server::{ProviderServiceServer, ProviderService},
        usage_service_server::{UsageServiceServer, UsageService},
    );
    host.serve(ctx.listener, ctx.shutdown).await
}

/// Runs the migrations only (`ai-proxy migrate`, the deployment job).
pub fn migrate(config: ServiceConfig, secrets: socle_server::SecretResolver) -> MigrateFuture {
    Box::pin(async move { socle_server::migrate_only(&config.database, &secrets, MIGRATIONS).await })
}
