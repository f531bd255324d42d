//! The edge: the one public entry of Socle.
//!
//! Everything is derived from the descriptor pool at start-up — there is no
//! hand-written handler per RPC:
//!
//! - REST/JSON routes from each RPC's `(socle.api.v1.http)` option
//!   ([`routes`]), transcoded with dynamic messages ([`transcode`]);
//! - native gRPC and gRPC-web (`tonic-web`) passed through to the upstream
//!   owning the service ([`upstream`]);
//! - OpenAPI 3.1 at `/api/v1/openapi.json` and a readable page at
//!   `/api/v1/docs` ([`openapi`]);
//! - `grpc.health.v1.Health` as an aggregator over the upstreams ([`health`]).
//!
//! Errors are `application/problem+json`; client mistakes are 4xx, never 5xx.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{Router, body::Body, extract::State, response::IntoResponse, routing::get};
use http::{HeaderValue, Method, header};
use prost_reflect::DescriptorPool;
use serde::{Deserialize, Serialize};
use socle_config::{HasSecretSources, SecretsSettings, Sources, VaultSettings};
use socle_server::{Shutdown, request_id::RequestIdLayer};
use socle_telemetry::TelemetrySettings;
use tokio::net::TcpListener;
use tower::{Layer, ServiceExt};
use tower_http::cors::{AllowOrigin, CorsLayer};

pub mod health;
pub mod openapi;
pub mod routes;
pub mod transcode;
pub mod upstream;

use routes::{ExtraHttpRule, RouteTable};
use upstream::{GrpcProxy, Upstreams};

/// `[server]` of the edge.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeServerSettings {
    /// Listen address; loopback by default.
    pub listen: SocketAddr,
    /// Largest accepted REST request body, in bytes.
    pub max_body_bytes: usize,
    /// Upper bound of a REST call, in milliseconds.
    pub request_timeout_ms: u64,
    /// How long in-flight requests may drain after the shutdown signal.
    pub shutdown_grace_ms: u64,
    /// Largest accepted upload (client-streaming RPCs such as CSV imports), in bytes.
    pub max_upload_bytes: usize,
    /// Upper bound of an upload, in milliseconds.
    pub upload_timeout_ms: u64,
}

impl Default for EdgeServerSettings {
    fn default() -> Self {
        EdgeServerSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 1024 * 1024,
            request_timeout_ms: 30_000,
            shutdown_grace_ms: 10_000,
            max_upload_bytes: 64 * 1024 * 1024,
            upload_timeout_ms: 600_000,
        }
    }
}

/// `[cors]`: browsers on these origins may call the edge.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorsSettings {
    /// Allowed origins, e.g. `https://console.socle.example`. Empty: same-origin only.
    pub allowed_origins: Vec<String>,
    /// How long browsers may cache a preflight answer.
    pub max_age_secs: u64,
}

impl Default for CorsSettings {
    fn default() -> Self {
        CorsSettings { allowed_origins: Vec::new(), max_age_secs: 600 }
    }
}

/// The edge configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeConfig {
    /// `[server]`.
    pub server: EdgeServerSettings,
    /// `[upstreams]`: package (`socle.crm.v1`) or service name → `http://host:port`.
    pub upstreams: BTreeMap<String, String>,
    /// `[cors]`.
    pub cors: CorsSettings,
    /// Extra HTTP rules for RPCs whose protos carry none.
    pub http_rules: Vec<ExtraHttpRule>,
    /// `[telemetry]`.
    pub telemetry: TelemetrySettings,
    /// `[vault]`.
    pub vault: VaultSettings,
    /// `[secrets]`.
    pub secrets: SecretsSettings,
}

impl HasSecretSources for EdgeConfig {
    fn vault(&self) -> &VaultSettings {
        &self.vault
    }
    fn secrets(&self) -> &SecretsSettings {
        &self.secrets
    }
}

/// Shared state of the request handlers.
pub struct EdgeState {
    /// REST routes.
    pub routes: RouteTable,
    /// Upstreams by service.
    pub upstreams: Upstreams,
    /// Body limit.
    pub max_body_bytes: usize,
    /// REST call timeout.
    pub timeout: Duration,
    /// Upload limit.
    pub max_upload_bytes: usize,
    /// Upload timeout.
    pub upload_timeout: Duration,
    /// The descriptors (to render error details).
    pub pool: DescriptorPool,
    openapi: bytes::Bytes,
    docs: bytes::Bytes,
}

/// The pool the edge serves by default: every Socle contract plus
/// `grpc.health.v1`.
pub fn default_pool() -> DescriptorPool {
    let mut pool = socle_proto::descriptor_pool().clone();
    pool.decode_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .expect("tonic-health ships a valid descriptor set");
    pool
}

/// The edge could not start.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// A contract or configuration error found while building routes.
    #[error("edge: {0}")]
    Setup(String),
    /// Serving failed.
    #[error("edge: {0}")]
    Io(#[from] std::io::Error),
}

/// The edge, built and ready to serve.
pub struct Edge {
    /// The HTTP router (REST, gRPC, gRPC-web, OpenAPI).
    pub router: Router,
    serving: Arc<AtomicBool>,
    grace: Duration,
}

/// Builds the edge's router from a descriptor pool and configuration.
pub fn router(pool: &DescriptorPool, config: &EdgeConfig) -> Result<Router, EdgeError> {
    build(pool, config).map(|edge| edge.router)
}

/// Builds the edge from a descriptor pool and configuration: routes are
/// derived from the descriptors; a malformed or conflicting rule fails here.
pub fn build(pool: &DescriptorPool, config: &EdgeConfig) -> Result<Edge, EdgeError> {
    let serving = Arc::new(AtomicBool::new(true));
    let mut pool = pool.clone();
    if pool.get_service_by_name("grpc.health.v1.Health").is_none() {
        pool.decode_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .map_err(|e| EdgeError::Setup(e.to_string()))?;
    }
    let mut upstreams = Upstreams::default();
    for (key, url) in &config.upstreams {
        upstreams.connect(key, url).map_err(EdgeError::Setup)?;
    }
    // The edge answers health itself, aggregating the upstreams.
    let health =
        tonic_health::pb::health_server::HealthServer::new(health::EdgeHealth::new(upstreams.clone(), serving.clone()));
    upstreams.insert("grpc.health.v1.Health", upstream::boxed(health));
    // And gRPC reflection over everything it routes, so that `buf curl` or
    // `grpcurl` need no local schema.
    let descriptors = {
        use prost::Message;
        prost_types::FileDescriptorSet { file: pool.file_descriptor_protos().cloned().collect() }.encode_to_vec()
    };
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(&descriptors)
        .build_v1()
        .map_err(|e| EdgeError::Setup(format!("reflection: {e}")))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(&descriptors)
        .build_v1alpha()
        .map_err(|e| EdgeError::Setup(format!("reflection: {e}")))?;
    upstreams.insert("grpc.reflection.v1.ServerReflection", upstream::boxed(reflection_v1));
    upstreams.insert("grpc.reflection.v1alpha.ServerReflection", upstream::boxed(reflection_v1alpha));

    let mut extra = vec![ExtraHttpRule {
        selector: "grpc.health.v1.Health.Check".into(),
        verb: "get".into(),
        path: "/api/v1/health".into(),
        body: String::new(),
        public: true,
    }];
    extra.extend(config.http_rules.iter().cloned());
    let routes = RouteTable::build(&pool, &extra).map_err(EdgeError::Setup)?;
    for route in routes.iter() {
        let service = route.method.parent_service().full_name();
        if upstreams.for_service(service).is_none() {
            tracing::warn!(service, "no upstream configured: its routes will answer 503");
        }
    }
    let document = openapi::document(&pool, &routes, "Socle API", env!("CARGO_PKG_VERSION"));
    let docs = openapi::docs_page(&document);
    let state = Arc::new(EdgeState {
        routes,
        upstreams: upstreams.clone(),
        max_body_bytes: config.server.max_body_bytes,
        timeout: Duration::from_millis(config.server.request_timeout_ms),
        max_upload_bytes: config.server.max_upload_bytes,
        upload_timeout: Duration::from_millis(config.server.upload_timeout_ms),
        pool: pool.clone(),
        openapi: serde_json::to_vec(&document).expect("serialisable").into(),
        docs: docs.into(),
    });
    let grpc = tonic_web::GrpcWebLayer::new().layer(GrpcProxy::new(upstreams));

    let router = Router::new()
        .route("/api/v1/openapi.json", get(openapi_json))
        .route("/api/v1/docs", get(docs_html))
        .route("/healthz", get(|| async { "ok" }))
        .fallback(move |State(state): State<Arc<EdgeState>>, request: http::Request<Body>| {
            let grpc = grpc.clone();
            async move {
                if is_grpc(&request) {
                    match grpc.oneshot(upstream::to_tonic(request)).await {
                        Ok(response) => response.map(Body::new),
                        Err(never) => match never {},
                    }
                } else {
                    transcode::handle(&state, request).await
                }
            }
        })
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(socle_telemetry::HttpMetrics::new("edge"), observe))
        .layer(cors(&config.cors)?)
        .layer(RequestIdLayer);
    Ok(Edge { router, serving, grace: Duration::from_millis(config.server.shutdown_grace_ms) })
}

fn is_grpc(request: &http::Request<Body>) -> bool {
    request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

async fn openapi_json(State(state): State<Arc<EdgeState>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], state.openapi.clone())
}

async fn docs_html(State(state): State<Arc<EdgeState>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], state.docs.clone())
}

/// A span per HTTP request (child of the caller's `traceparent`), HTTP RED
/// metrics and an access log line.
async fn observe(
    State(metrics): State<socle_telemetry::HttpMetrics>,
    request: http::Request<Body>,
    next: axum::middleware::Next,
) -> http::Response<Body> {
    let protocol = match request.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) {
        Some(t) if t.starts_with("application/grpc-web") => "grpc-web",
        Some(t) if t.starts_with("application/grpc") => "grpc",
        _ => "rest",
    };
    let request_id = request.extensions().get::<socle_server::RequestId>().map(|r| r.0.clone()).unwrap_or_default();
    let span = tracing::info_span!(
        "http",
        otel.kind = "server",
        http.request.method = %request.method(),
        url.path = %request.uri().path(),
        request_id = %request_id,
    );
    socle_telemetry::set_parent_from(&span, request.headers());
    let started = std::time::Instant::now();
    let method = request.method().clone();
    let response = tracing::Instrument::instrument(next.run(request), span.clone()).await;
    let elapsed = started.elapsed();
    metrics.record(method.as_str(), response.status().as_u16(), protocol, elapsed);
    let _entered = span.enter();
    tracing::info!(%method, status = response.status().as_u16(), protocol, elapsed_ms = elapsed.as_millis() as u64, "request finished");
    response
}

fn cors(settings: &CorsSettings) -> Result<CorsLayer, EdgeError> {
    let origins = settings
        .allowed_origins
        .iter()
        .map(|o| {
            HeaderValue::from_str(o).map_err(|_| EdgeError::Setup(format!("cors.allowed_origins: `{o}` is not valid")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let expose = ["grpc-status", "grpc-message", "grpc-status-details-bin", "x-request-id", "etag"];
    let allow = [
        "authorization",
        "content-type",
        "x-request-id",
        "x-socle-entity",
        "x-grpc-web",
        "x-user-agent",
        "grpc-timeout",
        "traceparent",
        "tracestate",
        "if-match",
    ];
    Ok(CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE])
        .allow_headers(allow.map(http::HeaderName::from_static))
        .expose_headers(expose.map(http::HeaderName::from_static))
        .max_age(Duration::from_secs(settings.max_age_secs)))
}

impl Edge {
    /// Serves HTTP/1.1 and HTTP/2 cleartext on `listener` until `shutdown`:
    /// then its own health turns `NOT_SERVING`, the listener closes and
    /// in-flight requests have `server.shutdown_grace_ms` to finish.
    pub async fn serve(self, listener: TcpListener, shutdown: Shutdown) -> std::io::Result<()> {
        let address = listener.local_addr()?;
        tracing::info!(%address, "edge serving");
        let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
        let serving = self.serving.clone();
        let signal = async move {
            shutdown.await;
            serving.store(false, Ordering::SeqCst);
            tracing::info!("edge shutting down: draining in-flight requests");
            let _ = stopping_tx.send(());
        };
        let server = axum::serve(listener, self.router.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(signal);
        let grace = self.grace;
        tokio::select! {
            result = server => result?,
            _ = async { if stopping_rx.await.is_ok() { tokio::time::sleep(grace).await } else { std::future::pending().await } } => {
                tracing::warn!("edge shutdown grace period elapsed, closing remaining requests");
            }
        }
        tracing::info!("edge stopped");
        Ok(())
    }
}

/// Serves the edge on `listener` until `shutdown`.
pub async fn serve(
    pool: &DescriptorPool,
    config: &EdgeConfig,
    listener: TcpListener,
    shutdown: Shutdown,
) -> Result<(), EdgeError> {
    build(pool, config)?.serve(listener, shutdown).await?;
    Ok(())
}

/// The edge binary.
pub fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let (config, _secrets) = socle_config::load::<EdgeConfig>(&Sources::from_process())
            .await
            .map_err(|e| anyhow::anyhow!("edge: {e}"))?;
        let _telemetry = socle_telemetry::init("edge", &config.telemetry)?;
        match std::env::args().nth(1).as_deref() {
            None | Some("serve") => {}
            Some("check-config") => {
                let _edge = build(&default_pool(), &config)?;
                println!("edge: configuration is valid");
                return Ok(());
            }
            Some(other) => anyhow::bail!("edge: unknown command `{other}` (serve, check-config)"),
        }
        let listener = TcpListener::bind(config.server.listen).await?;
        serve(&default_pool(), &config, listener, socle_server::shutdown_signal()).await?;
        Ok(())
    })
}
