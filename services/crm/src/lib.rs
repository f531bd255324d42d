//! CRM: member companies, contacts, memberships and interactions.
//!
//! The service's contract is `socle.crm.v1` (see `proto/socle/crm/v1/`).
//! Every RPC already exists, guarded by the authorization layer; those not
//! implemented yet answer `UNIMPLEMENTED`.

use socle_db::{EmbeddedMigrations, embed_migrations};
use socle_proto::socle::crm::v1::*;
use socle_server::{MigrateFuture, ServerError, ServiceConfig, ServiceContext, ServiceHost};

/// The default gRPC port.
pub const DEFAULT_PORT: u16 = 50053;

/// The service name (logs, metrics, health).
pub const NAME: &str = "crm";

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
        affiliation_service_server::{AffiliationServiceServer, AffiliationService},
        contact_service_server::{ContactServiceServer, ContactService},
        duplicate_service_server::{DuplicateServiceServer, DuplicateService},
        import_job_service_server::{ImportJobServiceServer, ImportJobService},
        interaction_service_server::{InteractionServiceServer, InteractionService},
        membership_service_server::{MembershipServiceServer, MembershipService},
        membership_type_service_server::{MembershipTypeServiceServer, MembershipTypeService},
        merge_service_server::{MergeServiceServer, MergeService},
        organization_service_server::{OrganizationServiceServer, OrganizationService},
        search_service_server::{SearchServiceServer, SearchService},
        tag_service_server::{TagServiceServer, TagService},
    );
    host.serve(ctx.listener, ctx.shutdown).await
}

/// Runs the migrations only (`crm migrate`, the deployment job).
pub fn migrate(config: ServiceConfig, secrets: socle_server::SecretResolver) -> MigrateFuture {
    Box::pin(async move { socle_server::migrate_only(&config.database, &secrets, MIGRATIONS).await })
}
