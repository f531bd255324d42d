//! CRM: member companies, contacts, memberships and interactions.
//!
//! The service's contract is `socle.crm.v1` (see `proto/socle/crm/v1/`).
//! Every record belongs to one entity; each transaction runs with the
//! caller's entity scope, so PostgreSQL row-level security hides other
//! entities' rows whatever the query (ADR 0004, ADR 0012).
//!
//! Built: organisations ([`organizations`]) and contacts ([`contacts`])
//! with validation, duplicate detection, keyset lists, etags and idempotent
//! creates; affiliations ([`affiliations`]), membership types and
//! memberships ([`membership_types`], [`memberships`]), interactions
//! ([`interactions`]); accent-insensitive and fuzzy search ([`search`]) and
//! tags in use ([`tags`]); merges and their undoing ([`merges`]), batch
//! duplicate scans ([`duplicates`]); CSV imports with per-row reports
//! ([`imports`]) and streamed CSV / JSON Lines exports ([`exports`]) of
//! organisations, contacts, memberships and interactions; GDPR access and
//! erasure ([`gdpr`]). Every RPC of `socle.crm.v1` is built.

pub mod affiliations;
pub mod ancestry;
mod common;
pub mod contacts;
pub mod duplicates;
pub mod exports;
pub mod gdpr;
pub mod imports;
pub mod interactions;
pub mod membership_types;
pub mod memberships;
pub mod merges;
pub mod organizations;
pub mod search;
pub mod tags;
pub mod validate;

use std::sync::Arc;

pub use common::{Caller, Crm};
use socle_db::{EmbeddedMigrations, embed_migrations};
use socle_proto::socle::crm::v1::*;
use socle_server::{MigrateFuture, ServerError, ServiceConfig, ServiceContext, ServiceHost, scope::ScopeResolver};

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
    let crm = Crm { db: database.clone(), scopes: Arc::new(ScopeResolver::new(platform.clone())) };
    let interrupted = duplicates::fail_interrupted_scans(&database)
        .await
        .map_err(|e| ServerError::Other(format!("duplicate scans: {e}")))?;
    if interrupted > 0 {
        tracing::warn!(count = interrupted, "duplicate scans interrupted by a restart marked failed");
    }
    let host = ServiceHost::new(NAME, socle_proto::descriptor_pool(), ctx.config.server.clone())
        .authorizer(authorizer)
        .readiness_database(database.clone())
        .audit(database, &ctx.config.audit, platform.as_ref())?
        .add_service(organization_service_server::OrganizationServiceServer::new(crm.clone()))
        .add_service(contact_service_server::ContactServiceServer::new(crm.clone()))
        .add_service(affiliation_service_server::AffiliationServiceServer::new(crm.clone()))
        .add_service(interaction_service_server::InteractionServiceServer::new(crm.clone()))
        .add_service(merge_service_server::MergeServiceServer::new(crm.clone()))
        .add_service(duplicate_service_server::DuplicateServiceServer::new(crm.clone()))
        .add_service(membership_service_server::MembershipServiceServer::new(memberships::Memberships::new(
            crm.clone(),
            platform.clone(),
        )))
        .add_service(membership_type_service_server::MembershipTypeServiceServer::new(memberships::Memberships::new(
            crm.clone(),
            platform.clone(),
        )))
        .add_service(search_service_server::SearchServiceServer::new(crm.clone()))
        .add_service(import_job_service_server::ImportJobServiceServer::new(crm.clone()))
        .add_service(tag_service_server::TagServiceServer::new(crm.clone()));
    host.serve(ctx.listener, ctx.shutdown).await
}

/// Runs the migrations only (`crm migrate`, the deployment job).
pub fn migrate(config: ServiceConfig, secrets: socle_server::SecretResolver) -> MigrateFuture {
    Box::pin(async move { socle_server::migrate_only(&config.database, &secrets, MIGRATIONS).await })
}
