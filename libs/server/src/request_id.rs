//! `x-request-id`: accepted from the caller when well-formed, minted
//! otherwise, stored in the request extensions, forwarded to upstreams and
//! echoed on the response.

use std::task::{Context, Poll};

use futures::future::BoxFuture;

/// The request id header.
pub const HEADER: &str = "x-request-id";

/// The request id of the current call, in the request extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

impl RequestId {
    /// The caller's id if it is 1–128 visible ASCII characters, else a new UUIDv7.
    pub fn from_headers(headers: &http::HeaderMap) -> Self {
        headers
            .get(HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
            .map(|v| RequestId(v.to_owned()))
            .unwrap_or_else(|| RequestId(uuid::Uuid::now_v7().to_string()))
    }
}

/// Reads the request id a handler runs under.
pub fn of<T>(request: &tonic::Request<T>) -> Option<&str> {
    request.extensions().get::<RequestId>().map(|r| r.0.as_str())
}

/// The request id of a call, owned (to keep across `into_inner`).
pub fn owned<T>(request: &tonic::Request<T>) -> Option<String> {
    of(request).map(str::to_owned)
}

/// See the module docs.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestIdLayer;

impl<S> tower::Layer<S> for RequestIdLayer {
    type Service = RequestIdService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequestIdService { inner }
    }
}

/// See [`RequestIdLayer`].
#[derive(Debug, Clone)]
pub struct RequestIdService<S> {
    inner: S,
}

impl<S, B, R> tower::Service<http::Request<B>> for RequestIdService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let id = RequestId::from_headers(request.headers());
        let value = http::HeaderValue::from_str(&id.0).expect("validated request id");
        request.headers_mut().insert(HEADER, value.clone());
        request.extensions_mut().insert(id);
        let future = self.inner.call(request);
        Box::pin(async move {
            let mut response = future.await?;
            response.headers_mut().insert(HEADER, value);
            Ok(response)
        })
    }
}
