//! The tower layers of every gRPC server, outermost first:
//!
//! 1. [`RequestIdLayer`](crate::request_id::RequestIdLayer): accept or mint `x-request-id`.
//! 2. [`ObserveLayer`]: a span per RPC (child of the caller's W3C trace
//!    context), RED metrics and one log line when the RPC finishes. It sits
//!    outside the guards so that shed and timed-out calls are counted too.
//! 3. [`GuardLayer`]: global concurrency limit with load shedding
//!    (`RESOURCE_EXHAUSTED` at once rather than queueing) and a per-call
//!    timeout (`DEADLINE_EXCEEDED`; the shorter of the server's and the
//!    client's `grpc-timeout`).
//! 4. [`AuthzLayer`](crate::authz::AuthzLayer): the declared access rule.

use std::{
    collections::HashSet,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body::{Body as HttpBody, Frame};
use socle_errors::{Code, Error, reason};
use socle_telemetry::RpcMetrics;
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::request_id::RequestId;

type GrpcResponse = http::Response<tonic::body::Body>;

/// See the module docs.
#[derive(Clone)]
pub struct ObserveLayer {
    metrics: RpcMetrics,
}

impl ObserveLayer {
    /// Records into `metrics`.
    pub fn new(metrics: RpcMetrics) -> Self {
        ObserveLayer { metrics }
    }
}

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = ObserveService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ObserveService { inner, metrics: self.metrics.clone() }
    }
}

/// See [`ObserveLayer`].
#[derive(Clone)]
pub struct ObserveService<S> {
    inner: S,
    metrics: RpcMetrics,
}

impl<S, B> tower::Service<http::Request<B>> for ObserveService<S>
where
    S: tower::Service<http::Request<B>, Response = GrpcResponse> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = GrpcResponse;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<GrpcResponse, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path().trim_start_matches('/');
        let (service, method) = path.split_once('/').unwrap_or((path, ""));
        let (service, method) = (service.to_owned(), method.to_owned());
        let request_id = request.extensions().get::<RequestId>().map(|r| r.0.clone()).unwrap_or_default();
        let span = tracing::info_span!(
            "rpc",
            otel.kind = "server",
            otel.name = %format!("{service}/{method}"),
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            request_id = %request_id,
        );
        socle_telemetry::set_parent_from(&span, request.headers());
        let started = Instant::now();
        let future = self.inner.call(request).instrument(span.clone());
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let response = future.await?;
            // Errors answered before any message are "trailers-only": the
            // status is in the headers. Otherwise it comes in the trailers.
            let finish = Finish {
                metrics,
                service,
                method,
                started,
                span,
                code: response.headers().get("grpc-status").map(|v| v.as_bytes().to_vec()),
                done: false,
            };
            let (parts, body) = response.into_parts();
            Ok(http::Response::from_parts(parts, tonic::body::Body::new(ObservedBody { inner: body, finish })))
        })
    }
}

struct Finish {
    metrics: RpcMetrics,
    service: String,
    method: String,
    started: Instant,
    span: tracing::Span,
    code: Option<Vec<u8>>,
    done: bool,
}

impl Finish {
    fn record(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        let code = self
            .code
            .as_deref()
            .and_then(|c| std::str::from_utf8(c).ok())
            .and_then(|c| c.parse::<i32>().ok())
            .map(tonic::Code::from_i32)
            // A stream dropped before its trailers was cancelled by the peer.
            .unwrap_or(tonic::Code::Cancelled);
        let elapsed = self.started.elapsed();
        let name = socle_errors::code_name(code);
        self.metrics.record("grpc", &self.service, &self.method, name, elapsed);
        let _entered = self.span.enter();
        tracing::info!(code = name, elapsed_ms = elapsed.as_millis() as u64, "rpc finished");
    }
}

pin_project_lite::pin_project! {
    struct ObservedBody {
        #[pin]
        inner: tonic::body::Body,
        finish: Finish,
    }

    impl PinnedDrop for ObservedBody {
        fn drop(this: Pin<&mut Self>) {
            this.project().finish.record();
        }
    }
}

impl HttpBody for ObservedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(code) = frame.trailers_ref().and_then(|t| t.get("grpc-status"))
        {
            this.finish.code = Some(code.as_bytes().to_vec());
        }
        if let Poll::Ready(None) = &polled {
            this.finish.record();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// See the module docs.
#[derive(Clone)]
pub struct GuardLayer {
    permits: Arc<Semaphore>,
    timeout: Duration,
    stream_timeout: Duration,
    streaming: Arc<HashSet<String>>,
}

impl GuardLayer {
    /// At most `max_in_flight` concurrent calls, each at most `timeout`
    /// long — or `stream_timeout` for the client-streaming RPCs in
    /// `streaming` (uploads), whose duration the client chooses.
    pub fn new(max_in_flight: usize, timeout: Duration, stream_timeout: Duration, streaming: HashSet<String>) -> Self {
        GuardLayer {
            permits: Arc::new(Semaphore::new(max_in_flight)),
            timeout,
            stream_timeout,
            streaming: Arc::new(streaming),
        }
    }
}

impl<S> tower::Layer<S> for GuardLayer {
    type Service = GuardService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GuardService {
            inner,
            permits: self.permits.clone(),
            timeout: self.timeout,
            stream_timeout: self.stream_timeout,
            streaming: self.streaming.clone(),
        }
    }
}

/// See [`GuardLayer`].
#[derive(Clone)]
pub struct GuardService<S> {
    inner: S,
    permits: Arc<Semaphore>,
    timeout: Duration,
    stream_timeout: Duration,
    streaming: Arc<HashSet<String>>,
}

impl<S, B> tower::Service<http::Request<B>> for GuardService<S>
where
    S: tower::Service<http::Request<B>, Response = GrpcResponse> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = GrpcResponse;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<GrpcResponse, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let request_id = request.extensions().get::<RequestId>().map(|r| r.0.clone());
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            let error = Error::new(Code::ResourceExhausted, "the server is at capacity, retry with backoff")
                .with_reason(reason::OVERLOADED);
            let response = error.into_status(request_id.as_deref()).into_http();
            return Box::pin(async move { Ok(response) });
        };
        let bound = if self.streaming.contains(request.uri().path()) { self.stream_timeout } else { self.timeout };
        let timeout = client_timeout(request.headers()).map_or(bound, |t| t.min(bound));
        let future = self.inner.call(request);
        Box::pin(async move {
            let result = tokio::time::timeout(timeout, future).await;
            drop(permit);
            match result {
                Ok(response) => response,
                Err(_) => Ok(Error::new(Code::DeadlineExceeded, "the request took too long")
                    .into_status(request_id.as_deref())
                    .into_http()),
            }
        })
    }
}

/// Parses the gRPC `grpc-timeout` header (`<digits><unit>`).
fn client_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        let mut h = http::HeaderMap::new();
        h.insert("grpc-timeout", "250m".parse().unwrap());
        assert_eq!(client_timeout(&h), Some(Duration::from_millis(250)));
        h.insert("grpc-timeout", "2S".parse().unwrap());
        assert_eq!(client_timeout(&h), Some(Duration::from_secs(2)));
        h.insert("grpc-timeout", "x".parse().unwrap());
        assert_eq!(client_timeout(&h), None);
    }
}
