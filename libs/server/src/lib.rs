//! gRPC server bootstrap shared by every Socle service.
//!
//! A service is a library exposing `run(ServiceContext)`; its `main.rs`
//! calls [`run_main`], and tests call `run` directly with a listener on port
//! 0 (see `socle-testkit`). [`ServiceHost`] serves the service's tonic
//! services with gRPC health and reflection, the shared tower stack (see
//! [`layers`]) and graceful shutdown: on the signal, health flips to
//! `NOT_SERVING`, the listener closes and in-flight calls drain for up to
//! `server.shutdown_grace_ms`.

use std::{collections::BTreeMap, convert::Infallible, future::Future, net::SocketAddr, sync::Arc, time::Duration};

use prost_reflect::DescriptorPool;
use serde::{Deserialize, Serialize};
use socle_config::{HasSecretSources, SecretsSettings, Sources, VaultSettings};
use socle_db::DatabaseSettings;
use socle_telemetry::{RpcMetrics, TelemetrySettings};
use tokio::net::TcpListener;
use tonic::{server::NamedService, service::RoutesBuilder};
use tower::ServiceBuilder;

pub mod audit;
pub mod authn;
pub mod authz;
pub mod layers;
pub mod remote_auth;
pub mod request_id;
pub mod scope;
pub mod token_authz;

pub use authz::{Authorizer, DeclaredRulesOnly, Principal};
pub use request_id::RequestId;
pub use socle_config::SecretResolver;

/// `[server]` settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Listen address. Services default to loopback: expose them on purpose.
    pub listen: SocketAddr,
    /// Upper bound of any call, in milliseconds (a shorter `grpc-timeout` wins).
    pub request_timeout_ms: u64,
    /// Upper bound of a client-streaming call (an upload), in milliseconds.
    pub stream_timeout_ms: u64,
    /// Calls handled at once; beyond, calls are shed with `RESOURCE_EXHAUSTED`.
    pub max_in_flight: usize,
    /// How long in-flight calls may drain after the shutdown signal.
    pub shutdown_grace_ms: u64,
    /// How often readiness checks the database, in milliseconds.
    pub readiness_probe_ms: u64,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 50050)),
            request_timeout_ms: 30_000,
            stream_timeout_ms: 600_000,
            max_in_flight: 512,
            shutdown_grace_ms: 10_000,
            readiness_probe_ms: 5_000,
        }
    }
}

/// How a service authorizes calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Only the declared rules are enforced (no identity yet; tests of a
    /// single service).
    #[default]
    Declared,
    /// Access tokens are verified and permissions checked with tenancy.
    Tokens,
}

/// `[auth]`: how tokens are issued (identity) and verified (every service).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// The `iss` claim of access tokens.
    pub issuer: String,
    /// The `aud` claim of access tokens.
    pub audience: String,
    /// Access token lifetime, in seconds (at most 900).
    pub access_token_ttl_secs: u64,
    /// Refresh token (and session) lifetime, in seconds.
    pub refresh_token_ttl_secs: u64,
    /// `declared` or `tokens` (see [`AuthMode`]).
    pub mode: AuthMode,
    /// The identity service (JWKS, service tokens), for `tokens`.
    pub identity_url: Option<String>,
    /// The tenancy service (access decisions), for `tokens`.
    pub tenancy_url: Option<String>,
    /// This service's service-account client id, for `tokens`.
    pub client_id: Option<String>,
    /// This service's service-account secret, as a locator.
    pub client_secret: Option<socle_config::SecretRef>,
    /// Identity only: the console's base URL, for invitation links.
    pub console_url: String,
    /// Identity only: how long an invitation link stays valid, in seconds.
    pub invitation_ttl_secs: u64,
    /// Identity and audit: the current Ed25519 signing key (PKCS#8,
    /// base64), as a secret locator. Identity signs access tokens with it;
    /// audit signs its checkpoints and derives the key-encryption key of the
    /// per-person keys from it (ADR 0011).
    pub signing_key: Option<socle_config::SecretRef>,
    /// Identity and audit: earlier signing keys. Identity still publishes
    /// them in the JWKS so that tokens they signed stay valid until they
    /// expire; audit verifies older checkpoints and unwraps older keys.
    pub previous_signing_keys: Vec<socle_config::SecretRef>,
    /// Identity only: how e-mails (invitations, password resets) leave:
    /// `none` (kept queued in `outgoing_mail`; e-mail delivery is refused)
    /// or `directory` (RFC 5322 `.eml` files in `mail_directory`, for
    /// development and tests). No SMTP transport exists yet.
    pub mail_transport: String,
    /// Identity only: the folder of the `directory` mail transport.
    pub mail_directory: Option<String>,
    /// Identity only: the `From` address of e-mails.
    pub mail_from: String,
    /// Identity only: how long a password reset link stays valid, in seconds.
    pub password_reset_ttl_secs: u64,
    /// Identity only: the current AES-256 key (32 bytes, base64) that
    /// encrypts TOTP secrets at rest, as a secret locator. Unset: identity
    /// starts but refuses to enrol a second factor.
    pub totp_encryption_key: Option<socle_config::SecretRef>,
    /// Identity only: earlier TOTP encryption keys, kept to decrypt (and
    /// re-encrypt at start-up) secrets sealed before a rotation.
    pub previous_totp_encryption_keys: Vec<socle_config::SecretRef>,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            issuer: "socle".into(),
            audience: "socle-api".into(),
            access_token_ttl_secs: 900,
            refresh_token_ttl_secs: 30 * 24 * 3600,
            mode: AuthMode::Declared,
            identity_url: None,
            tenancy_url: None,
            client_id: None,
            client_secret: None,
            console_url: "http://localhost:4200".into(),
            invitation_ttl_secs: 7 * 24 * 3600,
            signing_key: None,
            previous_signing_keys: Vec::new(),
            mail_transport: "none".into(),
            mail_directory: None,
            mail_from: "Socle <ne-pas-repondre@socle.local>".into(),
            password_reset_ttl_secs: 30 * 60,
            totp_encryption_key: None,
            previous_totp_encryption_keys: Vec::new(),
        }
    }
}

/// The configuration shared by every backend service.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig {
    /// `[server]`.
    pub server: ServerSettings,
    /// `[database]`.
    pub database: DatabaseSettings,
    /// `[telemetry]`.
    pub telemetry: TelemetrySettings,
    /// `[vault]`.
    pub vault: VaultSettings,
    /// `[secrets]`.
    pub secrets: SecretsSettings,
    /// `[auth]`.
    pub auth: AuthSettings,
    /// `[audit]`.
    pub audit: audit::AuditSettings,
    /// `[features]`: flags for capabilities rolled out gradually.
    pub features: BTreeMap<String, bool>,
}

impl HasSecretSources for ServiceConfig {
    fn vault(&self) -> &VaultSettings {
        &self.vault
    }
    fn secrets(&self) -> &SecretsSettings {
        &self.secrets
    }
}

/// A server could not start or failed while running.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Configuration is invalid.
    #[error(transparent)]
    Config(#[from] socle_config::ConfigError),
    /// The database is unreachable or a migration failed.
    #[error(transparent)]
    Database(#[from] socle_db::DbError),
    /// The transport failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Anything else at start-up.
    #[error("{0}")]
    Other(String),
}

/// A shutdown signal that can be awaited once.
pub type Shutdown = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// Everything a service needs to run.
pub struct ServiceContext {
    /// Its configuration.
    pub config: ServiceConfig,
    /// Its secret resolver.
    pub secrets: SecretResolver,
    /// A bound listener (port 0 in tests).
    pub listener: TcpListener,
    /// Resolves when the service must stop.
    pub shutdown: Shutdown,
    /// The authorizer; [`DeclaredRulesOnly`] until identity provides one.
    pub authorizer: Arc<dyn Authorizer>,
}

/// Builds and serves one service's gRPC endpoints.
pub struct ServiceHost {
    name: &'static str,
    pool: &'static DescriptorPool,
    routes: RoutesBuilder,
    served: Vec<&'static str>,
    authorizer: Arc<dyn Authorizer>,
    settings: ServerSettings,
    database: Option<socle_db::Database>,
    metrics: Option<RpcMetrics>,
    outbox: Option<socle_db::Database>,
    relay: Option<(Arc<dyn socle_outbox::Sink>, socle_outbox::RelaySettings)>,
}

impl ServiceHost {
    /// A host for service `name` whose RPCs are described in `pool`.
    pub fn new(name: &'static str, pool: &'static DescriptorPool, settings: ServerSettings) -> Self {
        ServiceHost {
            name,
            pool,
            routes: RoutesBuilder::default(),
            served: Vec::new(),
            authorizer: Arc::new(DeclaredRulesOnly),
            settings,
            database: None,
            metrics: None,
            outbox: None,
            relay: None,
        }
    }

    /// Audits through `outbox` (the service database): denied access
    /// decisions are written there, and, when `settings.url` names the audit
    /// service, relay workers deliver the outbox for as long as the host
    /// serves, authenticated with `clients`' service token (if any).
    pub fn audit(
        mut self,
        outbox: socle_db::Database,
        settings: &audit::AuditSettings,
        clients: Option<&remote_auth::PlatformClients>,
    ) -> Result<Self, ServerError> {
        if let Some(url) = &settings.url {
            let channel = remote_auth::channel(url).map_err(ServerError::Other)?;
            let sink = audit::GrpcSink::new(channel, clients.map(|c| c.token.clone()));
            self.relay = Some((Arc::new(sink), settings.relay()));
        }
        self.outbox = Some(outbox);
        Ok(self)
    }

    /// Reports `NOT_SERVING` on gRPC health while `database` cannot be
    /// reached (checked every 5 s), so that readiness follows the database.
    pub fn readiness_database(mut self, database: socle_db::Database) -> Self {
        self.database = Some(database);
        self
    }

    /// Records RED metrics with these instruments instead of the global meter's.
    pub fn metrics(mut self, metrics: RpcMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Replaces the authorizer.
    pub fn authorizer(mut self, authorizer: Arc<dyn Authorizer>) -> Self {
        self.authorizer = authorizer;
        self
    }

    /// Adds a tonic service; it is reported `SERVING` by gRPC health.
    pub fn add_service<S>(mut self, service: S) -> Self
    where
        S: tower::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = Infallible,
            > + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.served.push(S::NAME);
        self.routes.add_service(service);
        self
    }

    /// Serves until `shutdown` resolves, then drains.
    pub async fn serve(self, listener: TcpListener, shutdown: Shutdown) -> Result<(), ServerError> {
        let (health, health_service) = tonic_health::server::health_reporter();
        for name in &self.served {
            health.set_service_status(*name, tonic_health::ServingStatus::Serving).await;
        }
        health.set_service_status("", tonic_health::ServingStatus::Serving).await;
        let every = Duration::from_millis(self.settings.readiness_probe_ms.max(10));
        let probe =
            self.database.map(|db| tokio::spawn(probe_database(db, every, health.clone(), self.served.clone())));

        // Reflection describes what this server serves, not every contract.
        let descriptors = served_descriptor_set(self.pool, &self.served);
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(&descriptors)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| ServerError::Other(format!("reflection: {e}")))?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(&descriptors)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(|e| ServerError::Other(format!("reflection: {e}")))?;

        let mut routes = self.routes;
        routes.add_service(health_service).add_service(reflection_v1).add_service(reflection_v1alpha);

        let table = authz::AccessTable::from_pool(self.pool);
        // Outermost first; see `layers` for why this order.
        let stack = ServiceBuilder::new()
            .layer(request_id::RequestIdLayer)
            .layer(layers::ObserveLayer::new(self.metrics.unwrap_or_else(|| RpcMetrics::new(self.name))))
            .layer(layers::GuardLayer::new(
                self.settings.max_in_flight,
                Duration::from_millis(self.settings.request_timeout_ms),
                Duration::from_millis(self.settings.stream_timeout_ms),
                client_streaming_paths(self.pool),
            ))
            .layer(authz::AuthzLayer::new(table, self.authorizer).audited(self.name, self.outbox.clone()))
            .into_inner();
        let relay = match (&self.relay, &self.outbox) {
            (Some((sink, settings)), Some(outbox)) => {
                Some(socle_outbox::Relay::start(self.name, outbox.clone(), sink.clone(), settings.clone()))
            }
            _ => None,
        };

        let address = listener.local_addr().map_err(|e| ServerError::Other(e.to_string()))?;
        tracing::info!(service = self.name, %address, "serving");
        let grace = Duration::from_millis(self.settings.shutdown_grace_ms);
        let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
        let signal = {
            let health = health.clone();
            let served = self.served.clone();
            async move {
                shutdown.await;
                tracing::info!("shutting down: draining in-flight calls");
                health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
                for name in served {
                    health.set_service_status(name, tonic_health::ServingStatus::NotServing).await;
                }
                let _ = drained_tx.send(());
            }
        };
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let server = tonic::transport::Server::builder()
            .layer(stack)
            .add_routes(routes.routes())
            .serve_with_incoming_shutdown(incoming, signal);
        tokio::pin!(server);
        tokio::select! {
            result = &mut server => result?,
            _ = async { let _ = drained_rx.await; tokio::time::sleep(grace).await } => {
                tracing::warn!("shutdown grace period elapsed, closing remaining calls");
            }
        }
        if let Some(probe) = probe {
            probe.abort();
        }
        if let Some(relay) = relay {
            relay.stop().await;
        }
        tracing::info!(service = self.name, "stopped");
        Ok(())
    }
}

fn client_streaming_paths(pool: &DescriptorPool) -> std::collections::HashSet<String> {
    pool.services()
        .flat_map(|s| s.methods().collect::<Vec<_>>())
        .filter(|m| m.is_client_streaming())
        .map(|m| format!("/{}/{}", m.parent_service().full_name(), m.name()))
        .collect()
}

/// The pool's files with only the services in `served` left in them.
fn served_descriptor_set(pool: &DescriptorPool, served: &[&'static str]) -> Vec<u8> {
    use prost::Message;
    let file = pool
        .file_descriptor_protos()
        .map(|file| {
            let mut file = file.clone();
            let package = file.package().to_owned();
            file.service.retain(|s| served.contains(&format!("{package}.{}", s.name()).as_str()));
            file
        })
        .collect();
    prost_types::FileDescriptorSet { file }.encode_to_vec()
}

async fn probe_database(
    db: socle_db::Database,
    every: Duration,
    health: tonic_health::server::HealthReporter,
    served: Vec<&'static str>,
) {
    let mut serving = true;
    loop {
        tokio::time::sleep(every).await;
        let ok = db.ping().await.is_ok();
        if ok != serving {
            serving = ok;
            let status = if ok {
                tracing::info!("database reachable again: serving");
                tonic_health::ServingStatus::Serving
            } else {
                tracing::warn!("database unreachable: not serving");
                tonic_health::ServingStatus::NotServing
            };
            health.set_service_status("", status).await;
            for name in &served {
                health.set_service_status(*name, status).await;
            }
        }
    }
}

/// Registers tonic servers whose every RPC answers `UNIMPLEMENTED` (the
/// generated default bodies) until the service implements them.
///
/// ```ignore
/// let host = socle_server::unimplemented_services!(host,
///     organization_service_server::{OrganizationServiceServer, OrganizationService},
/// );
/// ```
#[macro_export]
macro_rules! unimplemented_services {
    ($host:expr, $($module:ident :: { $server:ident, $service:ident }),+ $(,)?) => {{
        #[derive(Debug, Clone, Copy)]
        struct Unimplemented;
        $( impl $module::$service for Unimplemented {} )+
        let host = $host;
        $( let host = host.add_service($module::$server::new(Unimplemented)); )+
        host
    }};
}

/// Resolves on SIGTERM or Ctrl-C.
pub fn shutdown_signal() -> Shutdown {
    Box::pin(async {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("install SIGTERM handler");
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = ctrl_c.await;
        }
    })
}

/// The `main` of every backend service: `<binary> [serve]` loads the
/// configuration, sets up telemetry, binds `server.listen` and calls `run`;
/// `<binary> migrate` only runs the migrations (the Kubernetes job);
/// `<binary> check-config` validates the configuration and exits.
pub fn run_main<F, Fut>(
    name: &'static str,
    port: u16,
    run: F,
    migrate: fn(ServiceConfig, SecretResolver) -> MigrateFuture,
) -> anyhow::Result<()>
where
    F: FnOnce(ServiceContext) -> Fut,
    Fut: Future<Output = Result<(), ServerError>>,
{
    let command = std::env::args().nth(1).unwrap_or_else(|| "serve".into());
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let mut defaults = ServiceConfig::default();
        defaults.server.listen = SocketAddr::from(([127, 0, 0, 1], port));
        let (config, secrets) = socle_config::load_with_defaults(defaults, &Sources::from_process())
            .await
            .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        let _telemetry = socle_telemetry::init(name, &config.telemetry)?;
        match command.as_str() {
            "check-config" => {
                // Secrets are resolved too: a wrong locator fails here, not at start.
                config.database.resolve(&secrets).await?;
                println!("{name}: configuration is valid");
                Ok(())
            }
            "migrate" => {
                let applied = migrate(config, secrets).await?;
                tracing::info!(count = applied.len(), "migrations applied");
                Ok(())
            }
            "serve" => {
                let listener = TcpListener::bind(config.server.listen).await?;
                run(ServiceContext {
                    config,
                    secrets,
                    listener,
                    shutdown: shutdown_signal(),
                    authorizer: Arc::new(DeclaredRulesOnly),
                })
                .await?;
                Ok(())
            }
            other => anyhow::bail!("{name}: unknown command `{other}` (serve, migrate, check-config)"),
        }
    })
}

/// The gRPC answer of a handler's result: the one place where a handler's
/// error becomes a status, with the call's request id.
pub fn reply<T>(
    result: Result<T, socle_errors::Error>,
    request_id: Option<String>,
) -> Result<tonic::Response<T>, tonic::Status> {
    result.map(tonic::Response::new).map_err(|e| e.into_status(request_id.as_deref()))
}

/// The authorizer a service runs with: in `tokens` mode a
/// [`token_authz::TokenAuthorizer`] (with `local` access decisions when the
/// service is tenancy itself), otherwise the one in the context.
pub async fn authorizer_for(
    auth: &AuthSettings,
    secrets: &SecretResolver,
    fallback: Arc<dyn Authorizer>,
    local: Option<Arc<dyn token_authz::AccessCheck>>,
) -> Result<Arc<dyn Authorizer>, ServerError> {
    if auth.mode == AuthMode::Declared {
        return Ok(fallback);
    }
    let clients = platform_clients(auth, secrets).await?.expect("tokens mode");
    let is_local = local.is_some();
    let access: Arc<dyn token_authz::AccessCheck> = match local {
        Some(local) => local,
        None => Arc::new(remote_auth::RemoteAccessCheck::new(clients.tenancy.clone(), clients.token.clone())),
    };
    let authorizer = token_authz::TokenAuthorizer::new(
        auth.issuer.clone(),
        auth.audience.clone(),
        Arc::new(remote_auth::GrpcKeySource::new(clients.identity.clone())),
        access,
    );
    Ok(Arc::new(if is_local { authorizer.without_cache() } else { authorizer }))
}

/// The channels and service token a service uses to call identity and
/// tenancy in `tokens` mode; `None` in `declared` mode.
pub async fn platform_clients(
    auth: &AuthSettings,
    secrets: &SecretResolver,
) -> Result<Option<remote_auth::PlatformClients>, ServerError> {
    if auth.mode == AuthMode::Declared {
        return Ok(None);
    }
    let required = |value: &Option<String>, key: &str| {
        value.clone().ok_or_else(|| ServerError::Other(format!("auth.{key} is required when auth.mode = \"tokens\"")))
    };
    let identity = remote_auth::channel(&required(&auth.identity_url, "identity_url")?).map_err(ServerError::Other)?;
    let tenancy = remote_auth::channel(&required(&auth.tenancy_url, "tenancy_url")?).map_err(ServerError::Other)?;
    let secret = auth
        .client_secret
        .as_ref()
        .ok_or_else(|| ServerError::Other("auth.client_secret is required when auth.mode = \"tokens\"".into()))?;
    let token = remote_auth::ServiceToken::new(
        identity.clone(),
        required(&auth.client_id, "client_id")?,
        secrets.resolve(secret).await?,
    );
    Ok(Some(remote_auth::PlatformClients { identity, tenancy, token: Arc::new(token) }))
}

/// The principal the authorization layer attached to a call, if any.
pub fn principal_of<T>(request: &tonic::Request<T>) -> Option<Principal> {
    request.extensions().get::<Principal>().cloned()
}

/// Runs an operator command of a service binary (`<binary> <command>
/// args…`) with the service's configuration: bootstraps that must happen
/// before anyone can call the API.
pub fn run_command<F, Fut>(name: &'static str, port: u16, command: F) -> anyhow::Result<()>
where
    F: FnOnce(ServiceConfig, SecretResolver, Vec<String>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let args: Vec<String> = std::env::args().skip(2).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let mut defaults = ServiceConfig::default();
        defaults.server.listen = SocketAddr::from(([127, 0, 0, 1], port));
        let (config, secrets) = socle_config::load_with_defaults(defaults, &Sources::from_process())
            .await
            .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        command(config, secrets, args).await
    })
}

/// The future returned by a service's `migrate` function.
pub type MigrateFuture = std::pin::Pin<Box<dyn Future<Output = Result<Vec<String>, ServerError>> + Send>>;

/// Connects to the service database, migrating first when configured to.
pub async fn open_database(
    settings: &DatabaseSettings,
    secrets: &SecretResolver,
    migrations: socle_db::EmbeddedMigrations,
) -> Result<socle_db::Database, ServerError> {
    let resolved = settings.resolve(secrets).await?;
    if resolved.migrate_on_start {
        let applied = socle_db::migrate(&resolved.owner_url, migrations, resolved.app_role.as_deref()).await?;
        tracing::info!(count = applied.len(), "migrations applied");
    }
    Ok(socle_db::Database::connect(&resolved.url, resolved.max_connections, resolved.acquire_timeout).await?)
}

/// Runs the migrations only (the `migrate` command).
pub async fn migrate_only(
    settings: &DatabaseSettings,
    secrets: &SecretResolver,
    migrations: socle_db::EmbeddedMigrations,
) -> Result<Vec<String>, ServerError> {
    let resolved = settings.resolve(secrets).await?;
    Ok(socle_db::migrate(&resolved.owner_url, migrations, resolved.app_role.as_deref()).await?)
}
