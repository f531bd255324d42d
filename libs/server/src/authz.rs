//! The authorization layer: the one place where every RPC's declared
//! access rule is enforced, before any handler runs.
//!
//! At start-up the layer builds an [`AccessTable`] from the descriptor pool:
//! for each gRPC path, the `(socle.api.v1.access)` rule declared in the
//! proto. At call time:
//!
//! - an infrastructure path (health, reflection) is public;
//! - a path unknown to the descriptors is answered `UNIMPLEMENTED`;
//! - an RPC that declares no access rule is refused (`PERMISSION_DENIED`,
//!   reason `ACCESS_RULE_MISSING`) — so a handler cannot forget its check;
//! - otherwise the configured [`Authorizer`] decides and returns the
//!   [`Principal`], which handlers read from the request extensions.

use std::{collections::HashMap, sync::Arc, task::Poll};

use futures::{StreamExt, future::BoxFuture};
use http_body_util::BodyExt;
use prost_reflect::DescriptorPool;
use prost_reflect::ReflectMessage;
use socle_errors::{Error, reason};
use socle_proto::options::{AccessRule, access_rule};

use crate::{audit, request_id::RequestId};

/// The largest first message the authorization layer reads to find the
/// target entity (beyond, the call is refused rather than buffered). Only
/// the first message is read: the rest of a client stream (an upload's
/// chunks) flows to the handler untouched, whatever its total size.
const MAX_INSPECTED_BODY: usize = 8 * 1024 * 1024;

/// Reads `body` until its first gRPC message is complete (or the body
/// ends); returns those bytes and a body replaying them before the rest.
async fn first_message(body: tonic::body::Body) -> Result<(bytes::Bytes, tonic::body::Body), ()> {
    let mut body = body;
    let mut buffered = bytes::BytesMut::new();
    loop {
        if buffered.len() >= 5 {
            let length = u32::from_be_bytes([buffered[1], buffered[2], buffered[3], buffered[4]]) as usize;
            if length > MAX_INSPECTED_BODY {
                return Err(());
            }
            if buffered.len() >= 5 + length {
                break;
            }
        }
        match body.frame().await {
            None => break,
            Some(Err(_)) => return Err(()),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => buffered.extend_from_slice(&data),
                // Trailers before the first message is complete: nothing more to read.
                Err(_) => break,
            },
        }
    }
    let head = buffered.freeze();
    let replay = futures::stream::once({
        let head = head.clone();
        async move { Ok::<_, tonic::Status>(http_body::Frame::data(head)) }
    })
    .chain(http_body_util::BodyStream::new(body).map(|frame| frame.map_err(|e| tonic::Status::from_error(e.into()))));
    Ok((head, tonic::body::Body::new(http_body_util::StreamBody::new(replay))))
}

/// The value of a (dotted) string field in the first gRPC message of `body`.
fn entity_of(body: &[u8], method: &prost_reflect::MethodDescriptor, path: &str) -> Option<String> {
    // gRPC framing: 1 byte compressed flag, 4 bytes length, the message.
    if body.len() < 5 || body[0] != 0 {
        return None;
    }
    let length = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    let message = body.get(5..5 + length)?;
    let mut current = prost_reflect::DynamicMessage::decode(method.input(), message).ok()?;
    let segments: Vec<&str> = path.split('.').collect();
    for (i, segment) in segments.iter().enumerate() {
        let field = current.descriptor().get_field_by_name(segment)?;
        let value = current.get_field(&field).into_owned();
        if i + 1 == segments.len() {
            return value.as_str().filter(|s| !s.is_empty()).map(str::to_owned);
        }
        current = value.as_message()?.clone();
    }
    None
}

/// Paths answered by every server without credentials.
const INFRASTRUCTURE_SERVICES: &[&str] =
    &["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"];

/// What the access table knows about a gRPC path.
#[derive(Debug, Clone)]
pub enum Access {
    /// Health and reflection.
    Infrastructure,
    /// An RPC with its declared rule.
    Declared(Arc<AccessRule>, prost_reflect::MethodDescriptor),
    /// An RPC of our contracts that declares no rule: always refused.
    Undeclared,
}

/// gRPC path → declared access, built once from the descriptors.
#[derive(Debug, Clone, Default)]
pub struct AccessTable {
    by_path: HashMap<String, Access>,
}

impl AccessTable {
    /// Reads the access rule of every method of every service in `pool`.
    pub fn from_pool(pool: &DescriptorPool) -> Self {
        let mut by_path = HashMap::new();
        for service in pool.services() {
            for method in service.methods() {
                let path = format!("/{}/{}", service.full_name(), method.name());
                let access = match access_rule(&method) {
                    Some(rule) => Access::Declared(Arc::new(rule), method.clone()),
                    None => Access::Undeclared,
                };
                by_path.insert(path, access);
            }
        }
        AccessTable { by_path }
    }

    /// The access of `path`, `None` when the path is unknown.
    pub fn lookup(&self, path: &str) -> Option<Access> {
        let service = path.strip_prefix('/').and_then(|p| p.split_once('/')).map(|(s, _)| s);
        if service.is_some_and(|s| INFRASTRUCTURE_SERVICES.contains(&s)) {
            return Some(Access::Infrastructure);
        }
        self.by_path.get(path).cloned()
    }
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// No credential (public RPCs).
    Anonymous,
    /// A person.
    User {
        /// The user id.
        user_id: String,
        /// The entity the user acts for.
        entity_id: Option<String>,
        /// The session of the calling token.
        session_id: Option<String>,
    },
    /// Another service, by its service account.
    Service {
        /// The service account id.
        account_id: String,
    },
}

/// One call to authorize.
pub struct CallInfo<'a> {
    /// The gRPC path, `/package.Service/Method`.
    pub path: &'a str,
    /// The rule declared on the RPC.
    pub rule: &'a AccessRule,
    /// The request headers (authorization, `x-socle-entity`, …).
    pub headers: &'a http::HeaderMap,
    /// The entity named by the request field of the rule's `entity_field`,
    /// when the rule has one and the field is set.
    pub entity: Option<String>,
}

/// Decides whether a call that declares a rule may proceed.
pub trait Authorizer: Send + Sync + 'static {
    /// The principal on success; `UNAUTHENTICATED`, `PERMISSION_DENIED` or
    /// `NOT_FOUND` otherwise.
    fn authorize<'a>(&'a self, call: CallInfo<'a>) -> BoxFuture<'a, Result<Principal, Error>>;
}

/// The authorizer of the spine, before identity and tenancy exist: it
/// enforces that a rule is declared and that it is well-formed (`public`,
/// `authenticated` or a permission — exactly one), and lets declared calls
/// through as [`Principal::Anonymous`]. Identity replaces it with token
/// verification and tenancy's `CheckAccess`.
#[derive(Debug, Default, Clone, Copy)]
pub struct DeclaredRulesOnly;

impl Authorizer for DeclaredRulesOnly {
    fn authorize<'a>(&'a self, call: CallInfo<'a>) -> BoxFuture<'a, Result<Principal, Error>> {
        Box::pin(async move {
            check_rule_shape(call.rule)?;
            Ok(Principal::Anonymous)
        })
    }
}

/// A rule must say exactly one of: public, authenticated, a permission.
pub fn check_rule_shape(rule: &AccessRule) -> Result<(), Error> {
    let kinds = usize::from(rule.public) + usize::from(rule.authenticated) + usize::from(!rule.permission.is_empty());
    if kinds == 1 {
        Ok(())
    } else {
        Err(Error::permission_denied("this RPC declares an invalid access rule")
            .with_reason(reason::ACCESS_RULE_MISSING))
    }
}

/// Tower layer enforcing the access table.
#[derive(Clone)]
pub struct AuthzLayer {
    table: Arc<AccessTable>,
    authorizer: Arc<dyn Authorizer>,
    service: &'static str,
    outbox: Option<socle_db::Database>,
}

impl AuthzLayer {
    /// A layer over `table` deciding with `authorizer`.
    pub fn new(table: AccessTable, authorizer: Arc<dyn Authorizer>) -> Self {
        AuthzLayer { table: Arc::new(table), authorizer, service: "", outbox: None }
    }

    /// Runs each call in an [`audit::CallContext`] of `service`, whose
    /// denied decisions are written to `outbox`.
    pub fn audited(mut self, service: &'static str, outbox: Option<socle_db::Database>) -> Self {
        self.service = service;
        self.outbox = outbox;
        self
    }
}

impl<S> tower::Layer<S> for AuthzLayer {
    type Service = AuthzService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthzService {
            inner,
            table: self.table.clone(),
            authorizer: self.authorizer.clone(),
            service: self.service,
            outbox: self.outbox.clone(),
        }
    }
}

/// See [`AuthzLayer`].
#[derive(Clone)]
pub struct AuthzService<S> {
    inner: S,
    table: Arc<AccessTable>,
    authorizer: Arc<dyn Authorizer>,
    service: &'static str,
    outbox: Option<socle_db::Database>,
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for AuthzService<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        // Take the service that was polled ready, leave a fresh clone.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let table = self.table.clone();
        let authorizer = self.authorizer.clone();
        let (service, outbox) = (self.service, self.outbox.clone());
        Box::pin(async move {
            let path = request.uri().path().to_owned();
            let context = Arc::new(audit::CallContext::new(service, path.clone(), request.headers(), outbox));
            let request_id = request.extensions().get::<RequestId>().map(|r| r.0.clone());
            let deny = |error: Error| Ok(error.into_status(request_id.as_deref()).into_http());
            match table.lookup(&path) {
                Some(Access::Infrastructure) => {
                    request.extensions_mut().insert(Principal::Anonymous);
                }
                None => {
                    return deny(Error::new(socle_errors::Code::Unimplemented, format!("unknown method {path}")));
                }
                Some(Access::Undeclared) => {
                    tracing::warn!(rpc = %path, "refused: the rpc declares no access rule");
                    return deny(
                        Error::permission_denied("this RPC declares no access rule and is refused")
                            .with_reason(reason::ACCESS_RULE_MISSING),
                    );
                }
                Some(Access::Declared(rule, method)) => {
                    // The target entity is in the request message: read it
                    // from the first message, then hand the body on intact.
                    let mut entity = None;
                    if !rule.entity_field.is_empty() {
                        let (parts, body) = request.into_parts();
                        let Ok((head, body)) = first_message(body).await else {
                            return deny(Error::invalid_argument("the request could not be read for authorization"));
                        };
                        entity = entity_of(&head, &method, &rule.entity_field);
                        request = http::Request::from_parts(parts, body);
                    }
                    let decision = audit::scope(
                        context.clone(),
                        authorizer.authorize(CallInfo { path: &path, rule: &rule, headers: request.headers(), entity }),
                    )
                    .await;
                    match decision {
                        Ok(principal) => {
                            context.set_principal(principal.clone());
                            request.extensions_mut().insert(principal);
                        }
                        Err(error) => {
                            tracing::info!(rpc = %path, code = ?error.code(), "access denied");
                            return deny(error);
                        }
                    }
                }
            }
            audit::scope(context, inner.call(request)).await
        })
    }
}
