//! Upstreams: which backend serves which gRPC service, and the gRPC
//! passthrough (native gRPC and, behind `tonic-web`, gRPC-web).

use std::{collections::BTreeMap, task::Poll};

use axum::body::Body;
use futures::future::BoxFuture;
use socle_errors::{Code, Error};
use socle_server::RequestId;
use tower::{BoxError, Service, ServiceExt, util::BoxCloneSyncService};

/// Anything that answers gRPC over HTTP/2: a remote channel or a local service.
pub type Upstream =
    BoxCloneSyncService<http::Request<tonic::body::Body>, http::Response<tonic::body::Body>, UpstreamError>;

/// A transport failure reaching an upstream. A concrete type (rather than a
/// boxed trait object) keeps tonic's client bounds free of higher-ranked
/// lifetime trouble.
#[derive(Debug)]
pub struct UpstreamError(BoxError);

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for UpstreamError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// Wraps a tower service as an [`Upstream`].
pub fn boxed<S>(service: S) -> Upstream
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    BoxCloneSyncService::new(service.map_err(|e| UpstreamError(e.into())))
}

/// Service name or package prefix → upstream.
#[derive(Clone, Default)]
pub struct Upstreams {
    by_key: BTreeMap<String, Upstream>,
}

impl Upstreams {
    /// Adds an upstream for a full service name (`socle.crm.v1.ContactService`)
    /// or a package (`socle.crm.v1`).
    pub fn insert(&mut self, key: impl Into<String>, upstream: Upstream) {
        self.by_key.insert(key.into(), upstream);
    }

    /// Connects lazily to `url` for `key`.
    pub fn connect(&mut self, key: &str, url: &str) -> Result<(), String> {
        let endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())
            .map_err(|e| format!("upstreams.{key}: invalid URL `{url}`: {e}"))?
            .tcp_nodelay(true)
            .http2_keep_alive_interval(std::time::Duration::from_secs(30))
            .keep_alive_while_idle(true);
        self.insert(key, boxed(endpoint.connect_lazy()));
        Ok(())
    }

    /// The upstream of a service: exact service name first, then the
    /// longest package prefix.
    pub fn for_service(&self, service: &str) -> Option<Upstream> {
        if let Some(u) = self.by_key.get(service) {
            return Some(u.clone());
        }
        let mut package = service;
        while let Some((prefix, _)) = package.rsplit_once('.') {
            if let Some(u) = self.by_key.get(prefix) {
                return Some(u.clone());
            }
            package = prefix;
        }
        None
    }

    /// The configured keys.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.by_key.keys().map(String::as_str)
    }
}

/// Forwards gRPC calls, unchanged, to the upstream owning the service in
/// the path. `tonic-web` sits in front of it for gRPC-web.
#[derive(Clone)]
pub struct GrpcProxy {
    upstreams: Upstreams,
}

impl GrpcProxy {
    /// A proxy over `upstreams`.
    pub fn new(upstreams: Upstreams) -> Self {
        GrpcProxy { upstreams }
    }
}

impl Service<http::Request<tonic::body::Body>> for GrpcProxy {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        let request_id = request.extensions().get::<RequestId>().map(|r| r.0.clone());
        let service = request.uri().path().trim_start_matches('/').split('/').next().unwrap_or("").to_owned();
        let upstream = self.upstreams.for_service(&service);
        socle_telemetry::inject_context(request.headers_mut());
        let client = crate::transcode::peer(request.extensions());
        crate::transcode::set_client_address(request.headers_mut(), client);
        Box::pin(async move {
            let Some(upstream) = upstream else {
                let error = Error::new(Code::Unimplemented, format!("unknown service {service}"));
                return Ok(error.into_status(request_id.as_deref()).into_http());
            };
            match upstream.oneshot(request).await {
                Ok(response) => Ok(response),
                Err(e) => {
                    tracing::warn!(service = %service, error = %e, "upstream unreachable");
                    let error = Error::unavailable("the service is unavailable, retry later");
                    Ok(error.into_status(request_id.as_deref()).into_http())
                }
            }
        })
    }
}

/// Converts an axum request body for the proxy.
pub fn to_tonic(request: http::Request<Body>) -> http::Request<tonic::body::Body> {
    request.map(tonic::body::Body::new)
}
