//! Identity: accounts, credentials, sessions, tokens and service accounts.
//!
//! The service's contract is `socle.identity.v1` (see `proto/socle/identity/v1/`).
//! Built: invitations (`CreateUser` with a returned link, `AcceptInvitation`),
//! `Login`, refresh-token rotation with reuse detection, `Logout` and the
//! JWKS. The other RPCs answer `UNIMPLEMENTED` until they are built (issue 3).

pub mod account;
pub mod administration;
mod audit;
pub mod bootstrap;
pub mod cli;
pub mod credentials;
pub mod keys;
pub mod mail;
pub mod passwords;
pub mod second_factor;
pub mod service;
pub mod service_accounts;
pub mod throttle;
pub mod tokens;
pub mod totp;
pub mod totp_keys;
pub mod users;

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
    let keys = signing_keys(&ctx.config.auth, &ctx.secrets).await?;
    let totp_keys = totp_encryption_keys(&ctx.config.auth, &ctx.secrets).await?;
    let database = socle_server::open_database(&ctx.config.database, &ctx.secrets, MIGRATIONS).await?;
    seal_totp_secrets(&database, &totp_keys).await?;
    let authorizer = socle_server::authorizer_for(&ctx.config.auth, &ctx.secrets, ctx.authorizer.clone(), None).await?;
    let platform = socle_server::platform_clients(&ctx.config.auth, &ctx.secrets).await?;
    let host = ServiceHost::new(NAME, socle_proto::descriptor_pool(), ctx.config.server.clone())
        .authorizer(authorizer)
        .readiness_database(database.clone())
        .audit(database.clone(), &ctx.config.audit, platform.as_ref())?;
    let mailer = mail::Mailer::from_settings(&ctx.config.auth).map_err(ServerError::Other)?;
    // Mails left queued (a failed or interrupted delivery) go out within 30 s.
    let delivery = {
        let (mailer, database) = (mailer.clone(), database.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(30));
            loop {
                every.tick().await;
                mailer.flush(&database).await;
            }
        })
    };
    let identity = service::Identity::new(database, keys, totp_keys, ctx.config.auth.clone(), platform, mailer);
    let host = host
        .add_service(user_service_server::UserServiceServer::new(identity.clone()))
        .add_service(auth_service_server::AuthServiceServer::new(identity.clone()))
        .add_service(jwks_service_server::JwksServiceServer::new(identity.clone()))
        .add_service(service_account_service_server::ServiceAccountServiceServer::new(identity.clone()))
        .add_service(account_service_server::AccountServiceServer::new(identity));
    let served = host.serve(ctx.listener, ctx.shutdown).await;
    delivery.abort();
    served
}

/// Resolves the signing keys named in `[auth]`: the current one is required.
async fn signing_keys(
    settings: &socle_server::AuthSettings,
    secrets: &socle_server::SecretResolver,
) -> Result<keys::KeySet, ServerError> {
    let locator = settings
        .signing_key
        .as_ref()
        .ok_or_else(|| ServerError::Other("auth.signing_key is required by identity".into()))?;
    let parse = |secret, signing| keys::SigningKey::from_pkcs8_base64(&secret, signing).map_err(ServerError::Other);
    let current = parse(secrets.resolve(locator).await?, true)?;
    let mut previous = Vec::new();
    for locator in &settings.previous_signing_keys {
        previous.push(parse(secrets.resolve(locator).await?, false)?);
    }
    Ok(keys::KeySet { current, previous })
}

/// Resolves the TOTP encryption keys named in `[auth]`. None configured is
/// allowed: identity then refuses to enrol a second factor.
async fn totp_encryption_keys(
    settings: &socle_server::AuthSettings,
    secrets: &socle_server::SecretResolver,
) -> Result<std::sync::Arc<totp_keys::TotpKeys>, ServerError> {
    let parse = |secret, what: &str| {
        totp_keys::TotpKey::from_base64(&secret).map_err(|e| ServerError::Other(format!("auth.{what}: {e}")))
    };
    let current = match &settings.totp_encryption_key {
        Some(locator) => Some(parse(secrets.resolve(locator).await?, "totp_encryption_key")?),
        None => None,
    };
    let mut previous = Vec::new();
    for locator in &settings.previous_totp_encryption_keys {
        previous.push(parse(secrets.resolve(locator).await?, "previous_totp_encryption_keys")?);
    }
    let keys = totp_keys::TotpKeys::new(current, previous).map_err(ServerError::Other)?;
    match keys.current_kid() {
        Some(kid) => tracing::info!(kid, "TOTP secrets are encrypted with this key"),
        None => tracing::warn!("auth.totp_encryption_key is not set: second-factor enrolment is refused"),
    }
    Ok(std::sync::Arc::new(keys))
}

/// Start-up: encrypts TOTP secrets left in clear or under a previous key.
async fn seal_totp_secrets(
    database: &socle_db::Database,
    keys: &std::sync::Arc<totp_keys::TotpKeys>,
) -> Result<(), ServerError> {
    let done = totp_keys::seal_at_rest(database, keys.clone()).await.map_err(|e| ServerError::Other(e.to_string()))?;
    let totp_keys::Resealed { encrypted, rekeyed, left_clear, unreadable } = done;
    tracing::info!(encrypted, rekeyed, "TOTP secrets at rest: clear values encrypted, earlier keys replaced");
    if left_clear > 0 {
        tracing::warn!(left_clear, "TOTP secrets remain in clear: set auth.totp_encryption_key");
    }
    if unreadable > 0 {
        tracing::error!(
            unreadable,
            "TOTP secrets no configured key decrypts: those people cannot use their second factor until it is reset \
             or the key is configured again"
        );
    }
    Ok(())
}

/// Runs the migrations only (`identity migrate`, the deployment job).
pub fn migrate(config: ServiceConfig, secrets: socle_server::SecretResolver) -> MigrateFuture {
    Box::pin(async move { socle_server::migrate_only(&config.database, &secrets, MIGRATIONS).await })
}
