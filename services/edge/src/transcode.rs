//! REST/JSON ⇄ gRPC transcoding with dynamic messages: the request message
//! is built from the path variables, the query string and the JSON body
//! following the route's binding, validated by the proto3 JSON parser
//! (unknown fields and wrong types are refused), sent to the upstream, and
//! the response rendered in proto3 JSON (int64 as strings, enums as names,
//! timestamps in RFC 3339).

use std::time::Duration;

use axum::body::Body;
use bytes::{Buf, BufMut, Bytes};
use futures::StreamExt;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use http_body_util::BodyExt;
use prost::Message;
use prost_reflect::{
    Cardinality, DescriptorPool, DeserializeOptions, DynamicMessage, Kind, MessageDescriptor, ReflectMessage,
    SerializeOptions,
};
use serde_json::{Map, Value as Json};
use socle_errors::{Code, Error, Problem, reason};
use socle_server::RequestId;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use crate::{
    EdgeState,
    routes::{BodyRule, Match, Route},
    upstream::Upstream,
};

/// Headers forwarded from the HTTP request to gRPC metadata. The trace
/// context is forwarded as received, then replaced by the edge's own span
/// when tracing is exported (so the upstream span is a child of the edge's).
const FORWARDED_HEADERS: &[&str] =
    &["authorization", "x-request-id", "x-socle-entity", "accept-language", "traceparent", "tracestate"];

/// Handles one REST request.
pub async fn handle(state: &EdgeState, request: http::Request<Body>) -> http::Response<Body> {
    let request_id = request.extensions().get::<RequestId>().map(|r| r.0.clone());
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    match transcode(state, request).await {
        Ok(response) => response,
        Err(status) => {
            let mut response = problem_response(&state.pool, &status, request_id.as_deref());
            if response.status() == StatusCode::METHOD_NOT_ALLOWED
                && let Match::WrongVerb(verbs) = state.routes.find(&method, &path)
            {
                let allow = verbs.iter().map(Method::as_str).collect::<Vec<_>>().join(", ");
                if let Ok(value) = HeaderValue::from_str(&allow) {
                    response.headers_mut().insert(header::ALLOW, value);
                }
            }
            response
        }
    }
}

/// The problem document of a status, with its service-specific details
/// rendered in proto3 JSON when their types are in `pool`.
pub fn problem(pool: &DescriptorPool, status: &tonic::Status, request_id: Option<&str>) -> Problem {
    let mut problem = Problem::from_status(status, request_id);
    for any in Problem::custom_details(status) {
        let name = any.type_url.rsplit('/').next().unwrap_or("");
        let Some(descriptor) = pool.get_message_by_name(name) else { continue };
        let Ok(message) = DynamicMessage::decode(descriptor, any.value.as_slice()) else { continue };
        if let Ok(Json::Object(mut map)) = serde_json::to_value(&message) {
            map.insert("@type".into(), Json::String(any.type_url.clone()));
            problem.details.push(Json::Object(map));
        }
    }
    problem
}

/// Renders a status as `application/problem+json`.
pub fn problem_response(
    pool: &DescriptorPool,
    status: &tonic::Status,
    request_id: Option<&str>,
) -> http::Response<Body> {
    let problem = problem(pool, status, request_id);
    let mut response = http::Response::new(Body::from(problem.to_json()));
    *response.status_mut() = StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(socle_errors::PROBLEM_CONTENT_TYPE));
    if let Some(seconds) = problem.retry_after_seconds {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

fn status(error: Error, request_id: Option<&str>) -> tonic::Status {
    error.into_status(request_id)
}

/// Statuses made by the gRPC client itself (not by the upstream) carry
/// transport details: replace them with our own.
fn upstream_status(status: tonic::Status, rid: Option<&str>) -> tonic::Status {
    let from_upstream = !status.details().is_empty() || status.metadata().get("content-type").is_some();
    match status.code() {
        // The client-side deadline of the call.
        tonic::Code::Cancelled if status.message().contains("Timeout expired") => {
            self::status(Error::new(Code::DeadlineExceeded, "the upstream did not answer in time"), rid)
        }
        tonic::Code::Unavailable | tonic::Code::Unknown if !from_upstream => {
            tracing::warn!(error = %status.message(), "upstream call failed");
            self::status(Error::unavailable("the service is unavailable, retry later"), rid)
        }
        _ => status,
    }
}

async fn transcode(state: &EdgeState, request: http::Request<Body>) -> Result<http::Response<Body>, tonic::Status> {
    let (parts, body) = request.into_parts();
    let request_id = parts.extensions.get::<RequestId>().map(|r| r.0.clone());
    let rid = request_id.as_deref();
    let (route, vars) = match state.routes.find(&parts.method, parts.uri.path()) {
        Match::Found(route, vars) => (route, vars),
        Match::WrongVerb(verbs) => {
            let allowed = verbs.iter().map(Method::as_str).collect::<Vec<_>>().join(", ");
            return Err(status(
                Error::new(Code::InvalidArgument, format!("{} is not allowed here; allowed: {allowed}", parts.method))
                    .with_reason(reason::METHOD_NOT_ALLOWED),
                rid,
            ));
        }
        Match::NotFound => {
            return Err(status(
                Error::new(Code::NotFound, format!("no API route matches {}", parts.uri.path()))
                    .with_reason(reason::ROUTE_NOT_FOUND),
                rid,
            ));
        }
    };

    let input = route.method.input();
    if route.method.is_client_streaming() {
        return upload(state, &parts, body, route, vars, rid).await;
    }
    let body = read_body(state, &parts.headers, &route.body, body, rid).await?;
    let mut object = match (&route.body, body) {
        (BodyRule::None, _) | (_, None) => Map::new(),
        (BodyRule::All, Some(Json::Object(map))) => map,
        (BodyRule::All, Some(_)) => {
            return Err(status(Error::invalid_argument("the request body must be a JSON object"), rid));
        }
        (BodyRule::Field(field), Some(value)) => {
            let mut map = Map::new();
            map.insert(field.json_name().to_owned(), value);
            map
        }
    };
    bind_query(&input, parts.uri.query().unwrap_or(""), route, &mut object).map_err(|e| status(e, rid))?;
    bind_path(&input, vars, &mut object).map_err(|e| status(e, rid))?;

    let message = DynamicMessage::deserialize_with_options(
        input.clone(),
        Json::Object(object),
        &DeserializeOptions::new().deny_unknown_fields(true),
    )
    .map_err(|e| status(Error::invalid_argument(format!("invalid request: {e}")), rid))?;

    let upstream = state
        .upstreams
        .for_service(route.method.parent_service().full_name())
        .ok_or_else(|| status(Error::unavailable("no upstream serves this API"), rid))?;
    let mut grpc_request = tonic::Request::new(message);
    forward_headers(&parts.headers, peer(&parts.extensions), grpc_request.metadata_mut());
    grpc_request.set_timeout(state.timeout);
    let path: http::uri::PathAndQuery = route.grpc_path().parse().expect("valid gRPC path");
    let codec = DynamicCodec(route.method.output());

    if route.method.is_server_streaming() {
        return stream_response(state, upstream, grpc_request, path, codec, route, rid).await;
    }
    let mut grpc = tonic::client::Grpc::new(upstream);
    let call = async {
        grpc.ready().await.map_err(|e| tonic::Status::unavailable(format!("upstream unavailable: {e}")))?;
        grpc.unary(grpc_request, path, codec).await
    };
    let response = match tokio::time::timeout(state.timeout, call).await {
        Ok(result) => result.map_err(|s| upstream_status(s, rid))?,
        Err(_) => return Err(status(Error::new(Code::DeadlineExceeded, "the upstream did not answer in time"), rid)),
    };
    let message = response.into_inner();
    let json = render(&message, route).map_err(|e| status(Error::internal(e), rid))?;
    let mut http_response = http::Response::new(Body::from(json));
    http_response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(http_response)
}

async fn stream_response(
    state: &EdgeState,
    upstream: Upstream,
    request: tonic::Request<DynamicMessage>,
    path: http::uri::PathAndQuery,
    codec: DynamicCodec,
    route: &Route,
    rid: Option<&str>,
) -> Result<http::Response<Body>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(upstream);
    let call = async {
        grpc.ready().await.map_err(|e| tonic::Status::unavailable(format!("upstream unavailable: {e}")))?;
        grpc.server_streaming(request, path, codec).await
    };
    let mut stream = match tokio::time::timeout(state.timeout, call).await {
        Ok(result) => result.map_err(|s| upstream_status(s, rid))?.into_inner(),
        Err(_) => return Err(status(Error::new(Code::DeadlineExceeded, "the upstream did not answer in time"), rid)),
    };
    if let Some(field) = route.response_body.as_ref().filter(|f| f.kind() == Kind::Bytes) {
        return raw_download(state, &mut stream, field.clone(), rid).await.map(|(mut response, first)| {
            let (head, field) = first;
            // An error after the first bytes can only cut the download short:
            // the status line is already sent.
            let rest = stream.map(move |item| {
                item.map(|m| chunk_of(&m, &field)).map_err(|s| std::io::Error::other(s.message().to_owned()))
            });
            let body = futures::stream::once(async move { Ok::<_, std::io::Error>(head) }).chain(rest);
            *response.body_mut() = Body::from_stream(body);
            response
        });
    }
    let route = route.clone();
    let request_id = rid.map(str::to_owned);
    // One JSON document per line; an error after the first message becomes
    // a last line `{"error": <problem>}` since the status line is sent.
    let lines = stream.map(move |item| {
        let line = match item {
            Ok(message) => render(&message, &route).unwrap_or_else(|e| {
                tracing::error!(error = %e, "cannot render a streamed message");
                br#"{"error":{"status":500,"detail":"internal error"}}"#.to_vec()
            }),
            Err(status) => {
                let problem = Problem::from_status(&status, request_id.as_deref());
                serde_json::to_vec(&serde_json::json!({ "error": problem })).expect("serialisable")
            }
        };
        let mut bytes = line;
        bytes.push(b'\n');
        Ok::<_, std::convert::Infallible>(Bytes::from(bytes))
    });
    let mut response = http::Response::new(Body::from_stream(lines));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
    Ok(response)
}

/// A download: the bytes field named by `response_body` of every streamed
/// message, concatenated. The first message's `content_type` and `filename`
/// fields, when the response declares them, set the HTTP headers.
async fn raw_download(
    state: &EdgeState,
    stream: &mut tonic::Streaming<DynamicMessage>,
    field: prost_reflect::FieldDescriptor,
    rid: Option<&str>,
) -> Result<(http::Response<Body>, (Bytes, prost_reflect::FieldDescriptor)), tonic::Status> {
    let first = match tokio::time::timeout(state.timeout, stream.message()).await {
        Ok(Ok(first)) => first,
        Ok(Err(status)) => return Err(status),
        Err(_) => return Err(status(Error::new(Code::DeadlineExceeded, "the upstream did not answer in time"), rid)),
    };
    let mut response = http::Response::new(Body::empty());
    let text = |name: &str| {
        first.as_ref().and_then(|m| {
            let f = m.descriptor().get_field_by_name(name)?;
            m.get_field(&f).as_str().filter(|s| !s.is_empty()).map(str::to_owned)
        })
    };
    let content_type = text("content_type").unwrap_or_else(|| "application/octet-stream".into());
    if let Ok(value) = HeaderValue::from_str(&content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    if let Some(filename) = text("filename") {
        let safe: String = filename.chars().filter(|c| c.is_ascii_graphic() && *c != '"' && *c != '\\').collect();
        if let Ok(value) = HeaderValue::from_str(&format!("attachment; filename=\"{safe}\"")) {
            response.headers_mut().insert(header::CONTENT_DISPOSITION, value);
        }
    }
    let bytes = first.as_ref().map(|m| chunk_of(m, &field)).unwrap_or_default();
    Ok((response, (bytes, field)))
}

fn chunk_of(message: &DynamicMessage, field: &prost_reflect::FieldDescriptor) -> Bytes {
    message.get_field(field).as_bytes().cloned().unwrap_or_default()
}

/// An upload: the message fields come from the path and the query string;
/// the raw HTTP body is streamed into the route's bytes field, at most
/// 1 MiB per message. A body over the upload limit cancels the call, so the
/// upstream never sees a truncated file as complete.
async fn upload(
    state: &EdgeState,
    parts: &http::request::Parts,
    body: Body,
    route: &Route,
    vars: Vec<(String, String)>,
    rid: Option<&str>,
) -> Result<http::Response<Body>, tonic::Status> {
    const CHUNK: usize = 1024 * 1024;
    let BodyRule::Field(field) = &route.body else { unreachable!("checked when the route was built") };
    let too_large = || {
        status(
            Error::invalid_argument(format!("the upload exceeds {} bytes", state.max_upload_bytes))
                .with_reason(reason::PAYLOAD_TOO_LARGE),
            rid,
        )
    };
    let declared = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|length| length > state.max_upload_bytes) {
        return Err(too_large());
    }
    let input = route.method.input();
    let mut object = Map::new();
    bind_query(&input, parts.uri.query().unwrap_or(""), route, &mut object).map_err(|e| status(e, rid))?;
    bind_path(&input, vars, &mut object).map_err(|e| status(e, rid))?;
    let first =
        DynamicMessage::deserialize_with_options(input.clone(), Json::Object(object), &DeserializeOptions::new())
            .map_err(|e| status(Error::invalid_argument(format!("invalid request: {e}")), rid))?;

    // A failed upload (too large, or the client went away) must reach the
    // upstream as an error, never as the end of a shorter file: the request
    // body is then failed, which resets the HTTP/2 stream.
    let (overflow_tx, overflow_rx) = tokio::sync::oneshot::channel::<tonic::Status>();
    let (abort_tx, abort_rx) = futures::channel::oneshot::channel::<()>();
    let limit = state.max_upload_bytes;
    let field = field.clone();
    let messages = futures::stream::unfold(
        (body.into_data_stream(), Some(first), 0usize, Some((overflow_tx, abort_tx)), Bytes::new()),
        move |(mut data, mut first, mut total, mut overflow, mut pending)| {
            let field = field.clone();
            let input = input.clone();
            async move {
                loop {
                    if !pending.is_empty() {
                        let piece = pending.split_to(pending.len().min(CHUNK));
                        let mut message = first.take().unwrap_or_else(|| DynamicMessage::new(input.clone()));
                        message.set_field(&field, prost_reflect::Value::Bytes(piece));
                        return Some((message, (data, first, total, overflow, pending)));
                    }
                    match data.next().await {
                        Some(Ok(bytes)) => {
                            total += bytes.len();
                            if total > limit {
                                if let Some((reason, abort)) = overflow.take() {
                                    let _ = reason.send(tonic::Status::invalid_argument("upload too large"));
                                    let _ = abort.send(());
                                }
                                // Never end the stream: the body fails instead.
                                futures::future::pending::<()>().await;
                            }
                            pending = bytes;
                        }
                        Some(Err(_)) => {
                            if let Some((reason, abort)) = overflow.take() {
                                let _ = reason.send(tonic::Status::invalid_argument("the upload was interrupted"));
                                let _ = abort.send(());
                            }
                            futures::future::pending::<()>().await;
                        }
                        None => {
                            // An empty upload still sends its first message.
                            return first.take().map(|m| (m, (data, None, total, overflow, pending)));
                        }
                    }
                }
            }
        },
    );
    let upstream = state
        .upstreams
        .for_service(route.method.parent_service().full_name())
        .ok_or_else(|| status(Error::unavailable("no upstream serves this API"), rid))?;
    let abort = std::sync::Arc::new(std::sync::Mutex::new(Some(abort_rx)));
    let upstream = crate::upstream::boxed(tower::ServiceExt::map_request(
        upstream,
        move |request: http::Request<tonic::body::Body>| {
            let abort = abort.lock().expect("abort lock").take();
            request.map(|inner| tonic::body::Body::new(AbortableBody { inner, abort }))
        },
    ));
    let mut request = tonic::Request::new(messages);
    forward_headers(&parts.headers, peer(&parts.extensions), request.metadata_mut());
    request.set_timeout(state.upload_timeout);
    let path: http::uri::PathAndQuery = route.grpc_path().parse().expect("valid gRPC path");
    let codec = DynamicCodec(route.method.output());
    let mut grpc = tonic::client::Grpc::new(upstream);
    let call = async move {
        grpc.ready().await.map_err(|e| tonic::Status::unavailable(format!("upstream unavailable: {e}")))?;
        grpc.client_streaming(request, path, codec).await
    };
    let mut call = Box::pin(tokio::time::timeout(state.upload_timeout, call));
    let mut overflow_rx = overflow_rx;
    let outcome = tokio::select! {
        // The upload's own failure explains a failed call: check it first.
        biased;
        Ok(problem) = &mut overflow_rx => Err(problem),
        result = &mut call => match overflow_rx.try_recv() {
            // The upstream saw the reset before we saw the reason.
            Ok(problem) => Err(problem),
            Err(_) => Ok(result),
        },
    };
    let response = match outcome {
        Ok(Ok(result)) => result.map_err(|s| upstream_status(s, rid))?,
        Ok(Err(_)) => return Err(status(Error::new(Code::DeadlineExceeded, "the upload took too long"), rid)),
        Err(problem) => {
            // Let the failed body reset the upstream stream before answering.
            let _ = tokio::time::timeout(Duration::from_secs(5), &mut call).await;
            return Err(if problem.message() == "upload too large" {
                too_large()
            } else {
                status(Error::invalid_argument(problem.message().to_owned()), rid)
            });
        }
    };
    let json = render(&response.into_inner(), route).map_err(|e| status(Error::internal(e), rid))?;
    let mut http_response = http::Response::new(Body::from(json));
    http_response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(http_response)
}

/// A request body that fails when `abort` fires, so that HTTP/2 resets the
/// stream instead of ending it.
struct AbortableBody {
    inner: tonic::body::Body,
    abort: Option<futures::channel::oneshot::Receiver<()>>,
}

impl http_body::Body for AbortableBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        use std::{future::Future, task::Poll};
        if let Some(abort) = self.abort.as_mut() {
            match std::pin::Pin::new(abort).poll(cx) {
                Poll::Ready(Ok(())) => {
                    self.abort = None;
                    return Poll::Ready(Some(Err(tonic::Status::cancelled("the upload was aborted"))));
                }
                // The stream finished normally: nothing can abort it now.
                Poll::Ready(Err(_)) => self.abort = None,
                Poll::Pending => {}
            }
        }
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.abort.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

fn render(message: &DynamicMessage, route: &Route) -> Result<Vec<u8>, serde_json::Error> {
    let options = SerializeOptions::new().stringify_64_bit_integers(true);
    let mut serializer = serde_json::Serializer::new(Vec::new());
    match &route.response_body {
        None => message.serialize_with_options(&mut serializer, &options)?,
        Some(field) => match message.get_field(field).as_ref() {
            prost_reflect::Value::Message(inner) => inner.serialize_with_options(&mut serializer, &options)?,
            _ => message.serialize_with_options(&mut serializer, &options)?,
        },
    }
    Ok(serializer.into_inner())
}

async fn read_body(
    state: &EdgeState,
    headers: &HeaderMap,
    rule: &BodyRule,
    body: Body,
    rid: Option<&str>,
) -> Result<Option<Json>, tonic::Status> {
    let too_large = || {
        status(
            Error::invalid_argument(format!("the request body exceeds {} bytes", state.max_body_bytes))
                .with_reason(reason::PAYLOAD_TOO_LARGE),
            rid,
        )
    };
    if let Some(length) = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        && length > state.max_body_bytes
    {
        return Err(too_large());
    }
    let bytes = http_body_util::Limited::new(body, state.max_body_bytes)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                too_large()
            } else {
                status(Error::invalid_argument("the request body could not be read"), rid)
            }
        })?
        .to_bytes();
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    if matches!(rule, BodyRule::None) {
        return Err(status(Error::invalid_argument("this route takes no request body"), rid));
    }
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
        .is_some_and(|v| v == "application/json" || v.ends_with("+json"));
    if !is_json {
        return Err(status(
            Error::invalid_argument("the request body must be `application/json`")
                .with_reason(reason::UNSUPPORTED_MEDIA_TYPE),
            rid,
        ));
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| status(Error::invalid_argument(format!("malformed JSON: {e}")), rid))
}

/// Puts the path variables into the request object. A body value for the
/// same field must agree with the path.
fn bind_path(
    input: &MessageDescriptor,
    vars: Vec<(String, String)>,
    object: &mut Map<String, Json>,
) -> Result<(), Error> {
    for (name, text) in vars {
        let field = input.get_field_by_name(&name).expect("checked when the route was built");
        let value = scalar_json(&field, &text)?;
        let json_name = field.json_name().to_owned();
        for key in [json_name.as_str(), name.as_str()] {
            if let Some(existing) = object.get(key)
                && existing != &value
                && existing != &Json::String(text.clone())
            {
                return Err(Error::invalid_field(
                    name.clone(),
                    "the body disagrees with the path; omit it from the body",
                ));
            }
        }
        object.remove(&name);
        object.insert(json_name, value);
    }
    Ok(())
}

/// Puts query parameters (by JSON or proto name, dotted for nested
/// messages, repeated by repetition) into the request object.
fn bind_query(
    input: &MessageDescriptor,
    query: &str,
    route: &Route,
    object: &mut Map<String, Json>,
) -> Result<(), Error> {
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (raw_key, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = form_decode(raw_key).ok_or_else(|| Error::invalid_argument("the query string is not valid UTF-8"))?;
        let value =
            form_decode(raw_value).ok_or_else(|| Error::invalid_argument("the query string is not valid UTF-8"))?;
        let mut message = input.clone();
        let mut target = &mut *object;
        let segments: Vec<&str> = key.split('.').collect();
        for (i, segment) in segments.iter().enumerate() {
            let field = message
                .get_field_by_json_name(segment)
                .or_else(|| message.get_field_by_name(segment))
                .ok_or_else(|| Error::invalid_field(key.clone(), "unknown query parameter"))?;
            if i == 0 && route.template.variables().any(|v| v == field.name()) {
                return Err(Error::invalid_field(key.clone(), "already bound by the path"));
            }
            let json_name = field.json_name().to_owned();
            let last = i + 1 == segments.len();
            match (last, field.kind()) {
                (false, Kind::Message(inner)) if field.cardinality() != Cardinality::Repeated => {
                    let entry = target.entry(json_name).or_insert_with(|| Json::Object(Map::new()));
                    let Json::Object(map) = entry else {
                        return Err(Error::invalid_field(key.clone(), "conflicts with another parameter"));
                    };
                    target = map;
                    message = inner;
                }
                (false, _) => return Err(Error::invalid_field(key.clone(), "unknown query parameter")),
                (true, _) => {
                    if field.is_map() || (matches!(field.kind(), Kind::Message(ref m) if !is_string_like(m))) {
                        return Err(Error::invalid_field(key.clone(), "cannot be given in the query string"));
                    }
                    let scalar = scalar_json(&field, &value).map_err(|e| rename_violation(e, &key))?;
                    if field.cardinality() == Cardinality::Repeated {
                        let entry = target.entry(json_name).or_insert_with(|| Json::Array(Vec::new()));
                        let Json::Array(items) = entry else {
                            return Err(Error::invalid_field(key.clone(), "conflicts with another parameter"));
                        };
                        items.push(scalar);
                    } else if target.insert(json_name, scalar).is_some() {
                        return Err(Error::invalid_field(key.clone(), "given more than once"));
                    }
                    break;
                }
            }
        }
    }
    Ok(())
}

/// Well-known types whose JSON form is a string, usable in paths and queries.
fn is_string_like(message: &MessageDescriptor) -> bool {
    matches!(
        message.full_name(),
        "google.protobuf.Timestamp"
            | "google.protobuf.Duration"
            | "google.protobuf.FieldMask"
            | "google.protobuf.StringValue"
            | "google.protobuf.Int64Value"
            | "google.protobuf.UInt64Value"
            | "google.protobuf.Int32Value"
            | "google.protobuf.UInt32Value"
            | "google.protobuf.BoolValue"
            | "google.protobuf.DoubleValue"
            | "google.protobuf.FloatValue"
    )
}

fn rename_violation(error: Error, key: &str) -> Error {
    let description =
        error.violations().first().map(|v| v.description.clone()).unwrap_or_else(|| error.message().to_owned());
    Error::invalid_field(key.to_owned(), description)
}

/// The JSON value for a path or query text, checked against the field kind
/// so that a bad value is reported on its field.
fn scalar_json(field: &prost_reflect::FieldDescriptor, text: &str) -> Result<Json, Error> {
    let name = field.name().to_owned();
    let bad = |what: &str| Error::invalid_field(name.clone(), format!("`{text}` is not {what}"));
    Ok(match field.kind() {
        Kind::Bool => match text {
            "true" => Json::Bool(true),
            "false" => Json::Bool(false),
            _ => return Err(bad("a boolean (true or false)")),
        },
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            text.parse::<i32>().map_err(|_| bad("a 32-bit integer"))?;
            Json::String(text.to_owned())
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            text.parse::<i64>().map_err(|_| bad("a 64-bit integer"))?;
            Json::String(text.to_owned())
        }
        Kind::Uint32 | Kind::Fixed32 => {
            text.parse::<u32>().map_err(|_| bad("an unsigned 32-bit integer"))?;
            Json::String(text.to_owned())
        }
        Kind::Uint64 | Kind::Fixed64 => {
            text.parse::<u64>().map_err(|_| bad("an unsigned 64-bit integer"))?;
            Json::String(text.to_owned())
        }
        Kind::Float | Kind::Double => {
            text.parse::<f64>().map_err(|_| bad("a number"))?;
            Json::String(text.to_owned())
        }
        Kind::Enum(e) => {
            if e.get_value_by_name(text).is_none() {
                let names = e.values().map(|v| v.name().to_owned()).collect::<Vec<_>>().join(", ");
                return Err(bad(&format!("one of {names}")));
            }
            Json::String(text.to_owned())
        }
        Kind::String | Kind::Bytes | Kind::Message(_) => Json::String(text.to_owned()),
    })
}

fn form_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Copies the forwarded headers and the current trace context into metadata.
pub fn forward_headers(
    headers: &HeaderMap,
    peer: Option<std::net::IpAddr>,
    metadata: &mut tonic::metadata::MetadataMap,
) {
    let mut out = HeaderMap::new();
    for name in FORWARDED_HEADERS {
        if let Some(value) = headers.get(*name) {
            out.insert(*name, value.clone());
        }
    }
    set_client_address(&mut out, peer);
    socle_telemetry::inject_context(&mut out);
    for (name, value) in &out {
        if let Ok(key) = tonic::metadata::MetadataKey::from_bytes(name.as_str().as_bytes())
            && let Ok(value) = tonic::metadata::MetadataValue::try_from(value.as_bytes())
        {
            metadata.insert(key, value);
        }
    }
}

/// The address of the client connected to the edge.
pub fn peer(extensions: &http::Extensions) -> Option<std::net::IpAddr> {
    extensions.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.ip())
}

/// The edge is the public entry: it states the client address itself
/// (`x-forwarded-for`), replacing whatever the client claimed, so services
/// can rely on it (sessions, brute-force limits).
pub fn set_client_address(headers: &mut HeaderMap, peer: Option<std::net::IpAddr>) {
    headers.remove("x-forwarded-for");
    if let Some(ip) = peer
        && let Ok(value) = HeaderValue::from_str(&ip.to_string())
    {
        headers.insert("x-forwarded-for", value);
    }
}

/// A codec for dynamic messages of a known response type.
#[derive(Clone)]
pub struct DynamicCodec(pub MessageDescriptor);

impl Codec for DynamicCodec {
    type Encode = DynamicMessage;
    type Decode = DynamicMessage;
    type Encoder = DynamicEncoder;
    type Decoder = DynamicDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        DynamicEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        DynamicDecoder(self.0.clone())
    }
}

/// Encodes dynamic messages.
pub struct DynamicEncoder;

impl Encoder for DynamicEncoder {
    type Item = DynamicMessage;
    type Error = tonic::Status;

    fn encode(&mut self, item: DynamicMessage, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        item.encode(dst).map_err(|e| tonic::Status::internal(e.to_string()))?;
        Ok(())
    }
}

/// Decodes dynamic messages of one type.
pub struct DynamicDecoder(MessageDescriptor);

impl Decoder for DynamicDecoder {
    type Item = DynamicMessage;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<DynamicMessage>, tonic::Status> {
        let mut bytes = bytes::BytesMut::with_capacity(src.remaining());
        bytes.put(src);
        DynamicMessage::decode(self.0.clone(), bytes.freeze())
            .map(Some)
            .map_err(|e| tonic::Status::internal(format!("undecodable upstream message: {e}")))
    }
}
