//! The Socle test kit.
//!
//! - [`TestDatabase`]: a fresh PostgreSQL database and its own non-owner
//!   login role, on the cluster named by `SOCLE_TEST_PG_URL` (default
//!   `postgres://postgres@127.0.0.1:5432/postgres`; `cargo xtask test` sets
//!   it, starting a private cluster when none is reachable).
//! - [`spawn_service`]: one real service on port 0 with its own database,
//!   its password given through a secrets file, migrated at start-up.
//! - [`spawn_edge`] and [`Platform::start`]: the edge, and every service plus
//!   the edge in one process, for end-to-end tests.
//! - [`vault::Vault`]: a real Vault-API server (RustyVault `rvault`).
//!
//! Nothing here reads or writes process-wide state: configuration is passed
//! in, every test gets its own databases and ports.

use std::{collections::BTreeMap, future::Future, net::SocketAddr, path::PathBuf, pin::Pin, sync::Arc, time::Duration};

use socle_config::{SecretRef, SecretsSettings};
use socle_server::{DeclaredRulesOnly, ServerError, ServiceConfig, ServiceContext};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

pub mod example;
pub mod grpc_web;
pub mod secure;
pub mod vault;

/// The maintenance URL of the test cluster.
pub fn pg_admin_url() -> String {
    std::env::var("SOCLE_TEST_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn with_database(url: &str, database: &str) -> String {
    let (base, _) = url.rsplit_once('/').unwrap_or((url, ""));
    format!("{base}/{database}")
}

fn with_user(url: &str, user: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let host = rest.split_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{user}@{host}")
}

/// A database created for one test, with its own application role.
#[derive(Debug, Clone)]
pub struct TestDatabase {
    /// The database name (`socle_test_<label>_<random>`).
    pub name: String,
    /// The owner connection URL (the cluster's admin user).
    pub owner_url: String,
    /// The application role (non-owner, no superuser: RLS applies).
    pub app_role: String,
    /// The application URL, without password.
    pub app_url: String,
    /// The application role's password.
    pub app_password: String,
}

impl TestDatabase {
    /// Creates the database and its role. Databases are dropped by `cargo
    /// xtask test` at its next start (an async drop cannot run here).
    pub async fn create(label: &str) -> anyhow::Result<Self> {
        Self::create_on(&pg_admin_url(), label).await
    }

    /// Like [`TestDatabase::create`], on the cluster of `admin` (a superuser URL).
    pub async fn create_on(admin: &str, label: &str) -> anyhow::Result<Self> {
        let admin = admin.to_owned();
        let suffix = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let label: String =
            label.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).collect();
        let name = format!("socle_test_{label}_{suffix}");
        let app_role = format!("{name}_app");
        let app_password = uuid::Uuid::new_v4().simple().to_string();
        let mut conn = socle_db::admin::connect(&admin).await?;
        socle_db::admin::create_database(&mut conn, &name).await?;
        socle_db::admin::ensure_login_role(&mut conn, &app_role, &app_password).await?;
        let owner_url = with_database(&admin, &name);
        let app_url = with_user(&owner_url, &app_role);
        Ok(TestDatabase { name, owner_url, app_role, app_url, app_password })
    }

    /// The application URL with its password (for direct test queries).
    pub fn app_url_with_password(&self) -> String {
        let Some((scheme, rest)) = self.app_url.split_once("://") else { return self.app_url.clone() };
        let (user, host) = rest.split_once('@').unwrap_or(("", rest));
        format!("{scheme}://{user}:{}@{host}", self.app_password)
    }
}

/// The backend services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Service {
    /// identity
    Identity,
    /// tenancy
    Tenancy,
    /// crm
    Crm,
    /// cms
    Cms,
    /// audit
    Audit,
    /// ai-proxy
    AiProxy,
}

type RunFuture = Pin<Box<dyn Future<Output = Result<(), ServerError>> + Send>>;

impl Service {
    /// Every backend service.
    pub const ALL: [Service; 6] =
        [Service::Identity, Service::Tenancy, Service::Crm, Service::Cms, Service::Audit, Service::AiProxy];

    /// The service name.
    pub fn name(self) -> &'static str {
        match self {
            Service::Identity => socle_identity::NAME,
            Service::Tenancy => socle_tenancy::NAME,
            Service::Crm => socle_crm::NAME,
            Service::Cms => socle_cms::NAME,
            Service::Audit => socle_audit::NAME,
            Service::AiProxy => socle_ai_proxy::NAME,
        }
    }

    /// The proto package the service serves.
    pub fn package(self) -> &'static str {
        match self {
            Service::Identity => "socle.identity.v1",
            Service::Tenancy => "socle.tenancy.v1",
            Service::Crm => "socle.crm.v1",
            Service::Cms => "socle.cms.v1",
            Service::Audit => "socle.audit.v1",
            Service::AiProxy => "socle.ai.v1",
        }
    }

    fn run(self, ctx: ServiceContext) -> RunFuture {
        match self {
            Service::Identity => Box::pin(socle_identity::run(ctx)),
            Service::Tenancy => Box::pin(socle_tenancy::run(ctx)),
            Service::Crm => Box::pin(socle_crm::run(ctx)),
            Service::Cms => Box::pin(socle_cms::run(ctx)),
            Service::Audit => Box::pin(socle_audit::run(ctx)),
            Service::AiProxy => Box::pin(socle_ai_proxy::run(ctx)),
        }
    }
}

/// A service running in the test process.
pub struct RunningService {
    /// Which service.
    pub service: Service,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its database.
    pub database: TestDatabase,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
    _dir: tempfile::TempDir,
}

impl RunningService {
    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the service and waits for it to drain.
    pub async fn stop(mut self) -> Result<(), ServerError> {
        self.halt().await
    }

    async fn halt(&mut self) -> Result<(), ServerError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.task.take() {
            Some(task) => task.await.map_err(|e| ServerError::Other(e.to_string()))?,
            None => Ok(()),
        }
    }

    /// Stops the service and returns what it needs to start again on the
    /// same address with the same database (see [`respawn_service`]).
    pub async fn stop_for_restart(mut self) -> anyhow::Result<Stopped> {
        self.halt().await?;
        let database = self.database.clone();
        Ok(Stopped { service: self.service, addr: self.addr, database })
    }
}

/// A service stopped by [`RunningService::stop_for_restart`].
pub struct Stopped {
    /// Which service.
    pub service: Service,
    /// The address it listened on.
    pub addr: SocketAddr,
    /// Its database, kept.
    pub database: TestDatabase,
}

/// Starts a stopped service again on its address, with its database. Its
/// secrets file is new: identity gets new signing and TOTP keys.
pub async fn respawn_service(
    stopped: Stopped,
    adjust: impl FnOnce(&mut ServiceConfig),
) -> anyhow::Result<RunningService> {
    respawn_service_with(stopped, &[], adjust).await
}

/// Like [`respawn_service`], with extra entries in its secrets file.
pub async fn respawn_service_with(
    stopped: Stopped,
    extra_secrets: &[(&str, String)],
    adjust: impl FnOnce(&mut ServiceConfig),
) -> anyhow::Result<RunningService> {
    let listener = TcpListener::bind(stopped.addr).await?;
    spawn_on_database(stopped.service, listener, stopped.database, extra_secrets, adjust).await
}

impl Drop for RunningService {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

fn shutdown_pair() -> (oneshot::Sender<()>, socle_server::Shutdown) {
    let (tx, rx) = oneshot::channel::<()>();
    (
        tx,
        Box::pin(async move {
            let _ = rx.await;
        }),
    )
}

/// Starts `service` on `127.0.0.1:0` with a fresh database (migrated at
/// start-up by the service itself, as the owner) and waits until its gRPC
/// health reports `SERVING`.
pub async fn spawn_service(service: Service) -> anyhow::Result<RunningService> {
    spawn_service_with(service, |_| {}).await
}

/// Like [`spawn_service`], with configuration adjusted by `adjust`.
pub async fn spawn_service_with(
    service: Service,
    adjust: impl FnOnce(&mut ServiceConfig),
) -> anyhow::Result<RunningService> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    spawn_service_on(service, listener, &[], adjust).await
}

/// Like [`spawn_service_with`], on a listener bound beforehand (so that
/// services can be told each other's addresses) and with extra entries in
/// its secrets file.
pub async fn spawn_service_on(
    service: Service,
    listener: TcpListener,
    extra_secrets: &[(&str, String)],
    adjust: impl FnOnce(&mut ServiceConfig),
) -> anyhow::Result<RunningService> {
    let database = TestDatabase::create(service.name()).await?;
    spawn_on_database(service, listener, database, extra_secrets, adjust).await
}

async fn spawn_on_database(
    service: Service,
    listener: TcpListener,
    database: TestDatabase,
    extra_secrets: &[(&str, String)],
    adjust: impl FnOnce(&mut ServiceConfig),
) -> anyhow::Result<RunningService> {
    let dir = tempfile::tempdir()?;
    let secrets_file = dir.path().join("secrets.toml");
    let signing_key = socle_identity::keys::SigningKey::generate_pkcs8_base64();
    let totp_key = socle_identity::totp_keys::TotpKey::generate_base64();
    let mut secrets_text = format!(
        "db_password = \"{}\"\nsigning_key = \"{}\"\ntotp_encryption_key = \"{}\"\n",
        database.app_password,
        socle_config::ExposeSecret::expose_secret(&signing_key),
        socle_config::ExposeSecret::expose_secret(&totp_key)
    );
    for (key, value) in extra_secrets {
        secrets_text.push_str(&format!("{key} = \"{value}\"\n"));
    }
    std::fs::write(&secrets_file, secrets_text)?;

    let mut config = ServiceConfig::default();
    config.database.url = database.app_url.clone();
    config.database.password = Some(SecretRef::parse("file:db_password").map_err(anyhow::Error::msg)?);
    config.database.owner_url = Some(database.owner_url.clone());
    config.database.migrate_on_start = true;
    config.database.app_role = Some(database.app_role.clone());
    config.database.max_connections = 4;
    if service == Service::Identity {
        config.auth.signing_key = Some(SecretRef::parse("file:signing_key").map_err(anyhow::Error::msg)?);
        config.auth.totp_encryption_key =
            Some(SecretRef::parse("file:totp_encryption_key").map_err(anyhow::Error::msg)?);
    }
    if service == Service::Audit {
        // The checkpoint key (and the root of the per-person keys), so that
        // an audit service restarted in a test reads what it wrote.
        config.auth.signing_key = Some(SecretRef::parse("file:signing_key").map_err(anyhow::Error::msg)?);
    }
    adjust(&mut config);
    config.secrets = SecretsSettings { file: Some(secrets_file.clone()) };
    let secrets = load_resolver(&config).await?;

    let addr = listener.local_addr()?;
    let (tx, shutdown) = shutdown_pair();
    let ctx = ServiceContext { config, secrets, listener, shutdown, authorizer: Arc::new(DeclaredRulesOnly) };
    let task = tokio::spawn(service.run(ctx));
    let running = RunningService { service, addr, database, shutdown: Some(tx), task: Some(task), _dir: dir };
    wait_serving(&running.url(), "").await?;
    Ok(running)
}

async fn load_resolver(config: &ServiceConfig) -> anyhow::Result<socle_config::SecretResolver> {
    // Go through the real loader with the same values, so that tests use
    // the production resolution path.
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), toml_of(config)?)?;
    let (_, resolver) = socle_config::load::<ServiceConfig>(&socle_config::Sources::file(file.path())).await?;
    Ok(resolver)
}

fn toml_of(config: &ServiceConfig) -> anyhow::Result<String> {
    let value = serde_json::to_value(config)?;
    let mut table = toml_value(value);
    if let toml::Value::Table(t) = &mut table {
        // Empty sections and nulls are not representable; drop them.
        t.retain(|_, v| !matches!(v, toml::Value::Table(inner) if inner.is_empty()));
    }
    Ok(toml::to_string(&table)?)
}

fn toml_value(value: serde_json::Value) -> toml::Value {
    match value {
        serde_json::Value::Null => toml::Value::Table(Default::default()),
        serde_json::Value::Bool(b) => toml::Value::Boolean(b),
        serde_json::Value::Number(n) => {
            n.as_i64().map(toml::Value::Integer).unwrap_or_else(|| toml::Value::Float(n.as_f64().unwrap_or_default()))
        }
        serde_json::Value::String(s) => toml::Value::String(s),
        serde_json::Value::Array(a) => toml::Value::Array(a.into_iter().map(toml_value).collect()),
        serde_json::Value::Object(o) => {
            toml::Value::Table(o.into_iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k, toml_value(v))).collect())
        }
    }
}

/// Polls gRPC health at `url` until `service` is `SERVING` (10 s at most).
pub async fn wait_serving(url: &str, service: &str) -> anyhow::Result<()> {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = async {
            let channel = tonic::transport::Endpoint::from_shared(url.to_owned()).ok()?.connect().await.ok()?;
            let mut client = HealthClient::new(channel);
            let response = client.check(HealthCheckRequest { service: service.to_owned() }).await.ok()?;
            Some(response.into_inner().status)
        }
        .await;
        if status == Some(ServingStatus::Serving as i32) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("{url} did not report SERVING within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The edge running in the test process.
pub struct RunningEdge {
    /// Where it listens.
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
}

impl RunningEdge {
    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for RunningEdge {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Starts the edge on port 0 over `pool` with `config` (its `upstreams`
/// pointing at running services).
pub async fn spawn_edge(
    pool: &prost_reflect::DescriptorPool,
    config: socle_edge::EdgeConfig,
) -> anyhow::Result<RunningEdge> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (tx, shutdown) = shutdown_pair();
    let edge = socle_edge::build(pool, &config)?;
    tokio::spawn(async move {
        if let Err(e) = edge.serve(listener, shutdown).await {
            tracing::error!(error = %e, "test edge failed");
        }
    });
    Ok(RunningEdge { addr, shutdown: Some(tx) })
}

/// Every service and the edge, in this process.
pub struct Platform {
    /// The services, by kind.
    pub services: BTreeMap<Service, RunningService>,
    /// The edge.
    pub edge: RunningEdge,
}

impl Platform {
    /// Starts every backend service (each with its own database) and the
    /// edge routing to them.
    pub async fn start() -> anyhow::Result<Self> {
        let mut services = BTreeMap::new();
        for service in Service::ALL {
            services.insert(service, spawn_service(service).await?);
        }
        let mut config = socle_edge::EdgeConfig::default();
        for (service, running) in &services {
            config.upstreams.insert(service.package().to_owned(), running.url());
        }
        let edge = spawn_edge(&socle_edge::default_pool(), config).await?;
        Ok(Platform { services, edge })
    }

    /// The edge URL.
    pub fn edge_url(&self) -> String {
        self.edge.url()
    }
}

/// The workspace root (for tools installed under `.tools/`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}
