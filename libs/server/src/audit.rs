//! Audit events from inside a service (ADR 0006).
//!
//! The authorization layer runs every call inside a [`CallContext`]: the
//! service, the RPC, the caller once authorized, the entity acted for, the
//! request id, the trace id and the client's address. Handlers build their
//! events with [`event`], which fills those in, and write them with
//! `socle_outbox::enqueue` in the transaction of the change.
//!
//! Denied access decisions are recorded here, in one place: the token
//! authorizer calls [`record_denial`] when tenancy refuses a permission, and
//! `token_authz::check_record` when a record of another entity is asked for
//! by id. Both write to the service's outbox in their own transaction,
//! before the refusal is returned.
//!
//! [`GrpcSink`] delivers outbox batches to the audit service's
//! `AppendEvents` with this service's own service-account token.

use std::sync::{Arc, OnceLock};

use futures::future::BoxFuture;
use prost_types::Timestamp;
use serde::{Deserialize, Serialize};
use socle_db::{Database, EntityScope};
use socle_errors::{Code, Error};
use socle_outbox::{AuditEvent, Sink};
use socle_proto::socle::{
    audit::v1::{AppendEventsRequest, FieldChange, Outcome, audit_event_service_client::AuditEventServiceClient},
    r#type::v1::{ActorKind, ActorRef},
};
use tonic::transport::Channel;

use crate::{Principal, remote_auth::ServiceToken};

/// `[audit]`: where this service's audit events go.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSettings {
    /// The audit service's gRPC URL. When unset no relay runs and events
    /// wait in the outbox (they are delivered once it is configured).
    pub url: Option<String>,
    /// Relay worker tasks in this process.
    pub relay_workers: usize,
    /// Largest batch per `AppendEvents` call (the audit service accepts 500).
    pub batch_size: usize,
    /// How often an idle relay looks for due events without a notification.
    pub poll_interval_ms: u64,
    /// First retry delay after a failed delivery.
    pub min_backoff_ms: u64,
    /// Largest retry delay.
    pub max_backoff_ms: u64,
}

impl Default for AuditSettings {
    fn default() -> Self {
        let relay = socle_outbox::RelaySettings::default();
        AuditSettings {
            url: None,
            relay_workers: relay.workers,
            batch_size: relay.batch_size,
            poll_interval_ms: relay.poll_interval.as_millis() as u64,
            min_backoff_ms: relay.min_backoff.as_millis() as u64,
            max_backoff_ms: relay.max_backoff.as_millis() as u64,
        }
    }
}

impl AuditSettings {
    /// The relay settings these describe.
    pub fn relay(&self) -> socle_outbox::RelaySettings {
        use std::time::Duration;
        socle_outbox::RelaySettings {
            workers: self.relay_workers.max(1),
            batch_size: self.batch_size.clamp(1, 500),
            poll_interval: Duration::from_millis(self.poll_interval_ms.max(10)),
            min_backoff: Duration::from_millis(self.min_backoff_ms.max(1)),
            max_backoff: Duration::from_millis(self.max_backoff_ms.max(self.min_backoff_ms.max(1))),
        }
    }
}

/// What the audit trail records about the call being served.
#[derive(Debug)]
pub struct CallContext {
    /// The serving service (`identity`, `crm`, …).
    pub service: &'static str,
    /// The gRPC path, `/package.Service/Method`.
    pub rpc: String,
    /// The request id.
    pub request_id: String,
    /// The W3C trace id (32 hex), when the call carries one.
    pub trace_id: String,
    /// The client's address as forwarded by the edge.
    pub client_address: String,
    /// The entity the caller acts for (`x-socle-entity`).
    pub acting_entity: Option<String>,
    principal: OnceLock<Principal>,
    outbox: Option<Database>,
}

impl CallContext {
    /// The context of a call with these headers.
    pub fn new(service: &'static str, rpc: String, headers: &http::HeaderMap, outbox: Option<Database>) -> Self {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let client_address = header("x-forwarded-for").split(',').next().unwrap_or("").trim().to_owned();
        let acting_entity = Some(header("x-socle-entity")).filter(|e| !e.is_empty());
        CallContext {
            service,
            rpc,
            request_id: header(crate::request_id::HEADER),
            trace_id: trace_id_of(headers),
            client_address,
            acting_entity,
            principal: OnceLock::new(),
            outbox,
        }
    }

    /// Records the authorized caller.
    pub fn set_principal(&self, principal: Principal) {
        let _ = self.principal.set(principal);
    }

    /// The authorized caller, once known.
    pub fn principal(&self) -> Option<&Principal> {
        self.principal.get()
    }
}

tokio::task_local! {
    static CALL: Arc<CallContext>;
}

/// Runs `future` as the call described by `context`.
pub async fn scope<F: Future>(context: Arc<CallContext>, future: F) -> F::Output {
    CALL.scope(context, future).await
}

/// The context of the call being served, if any.
pub fn current() -> Option<Arc<CallContext>> {
    CALL.try_with(Arc::clone).ok()
}

/// The trace id of `headers`' W3C `traceparent`, else of the current span.
fn trace_id_of(headers: &http::HeaderMap) -> String {
    let from_header = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split('-').nth(1))
        .filter(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) && *id != "0".repeat(32))
        .map(str::to_ascii_lowercase);
    from_header.unwrap_or_else(socle_telemetry::current_trace_id)
}

/// The actor of `principal` (the system for anonymous work).
pub fn actor(principal: Option<&Principal>) -> ActorRef {
    principal.and_then(crate::remote_auth::actor).unwrap_or(ActorRef {
        kind: ActorKind::System as i32,
        id: String::new(),
        display_name: String::new(),
    })
}

fn now() -> Timestamp {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    Timestamp { seconds: now.as_secs() as i64, nanos: now.subsec_nanos() as i32 }
}

/// A new event of the current call: a fresh UUIDv7 id, the actor, the
/// acting entity (also the chain's `entity_id` until the caller sets the
/// entity owning the resource), the service, the request and trace ids,
/// the client address and the time. Outside a call (jobs, operator
/// commands) the actor is the system.
pub fn event(service: &'static str, action: &str, outcome: Outcome) -> AuditEvent {
    let context = current();
    let context = context.as_deref();
    let acting = context.and_then(|c| c.acting_entity.clone()).unwrap_or_default();
    AuditEvent {
        id: uuid::Uuid::now_v7().to_string(),
        entity_id: acting.clone(),
        actor: Some(actor(context.and_then(CallContext::principal))),
        acting_entity_id: acting,
        service: context.map_or(service, |c| c.service).to_owned(),
        action: action.to_owned(),
        outcome: outcome as i32,
        request_id: context.map(|c| c.request_id.clone()).unwrap_or_default(),
        trace_id: context.map(|c| c.trace_id.clone()).unwrap_or_default(),
        client_address: context.map(|c| c.client_address.clone()).unwrap_or_default(),
        occur_time: Some(now()),
        ..AuditEvent::default()
    }
}

/// Fields that change on every write and say nothing about the change.
const UNAUDITED_FIELDS: &[&str] = &["etag", "update_time", "create_time"];

/// An event recording that the resource `resource_type`/`resource_id` of
/// `entity` changed from `before` to `after` (either absent for a creation
/// or a deletion), with one [`FieldChange`] per top-level field that
/// differs, by proto field name. Fields named in `personal` are marked as
/// personal data of `subject` (the audit store seals them per subject).
#[allow(clippy::too_many_arguments)]
pub fn change<M: prost::Message + prost::Name>(
    service: &'static str,
    action: &str,
    resource_type: &str,
    resource_id: &str,
    entity: &str,
    before: Option<&M>,
    after: Option<&M>,
    personal: &[&str],
    subject: &str,
) -> AuditEvent {
    let mut event = event(service, action, Outcome::Ok);
    event.entity_id = entity.to_owned();
    event.resource_type = resource_type.to_owned();
    event.resource_id = resource_id.to_owned();
    let (before, after) = (before.map(fields_of), after.map(fields_of));
    let empty = serde_json::Map::new();
    let (b, a) = (before.as_ref().unwrap_or(&empty), after.as_ref().unwrap_or(&empty));
    let mut names: Vec<&String> = b.keys().chain(a.keys()).collect();
    names.sort();
    names.dedup();
    for name in names {
        if UNAUDITED_FIELDS.contains(&name.as_str()) || b.get(name) == a.get(name) {
            continue;
        }
        let personal_data = personal.contains(&name.as_str());
        event.changes.push(FieldChange {
            field_path: name.clone(),
            before: before.as_ref().and_then(|_| b.get(name)).map(to_value),
            after: after.as_ref().and_then(|_| a.get(name)).map(to_value),
            personal_data,
            subject_id: if personal_data { subject.to_owned() } else { String::new() },
            ..FieldChange::default()
        });
    }
    event
}

/// The message's set fields as proto3 JSON values keyed by proto field name.
fn fields_of<M: prost::Message + prost::Name>(message: &M) -> serde_json::Map<String, serde_json::Value> {
    let Some(descriptor) = socle_proto::descriptor_pool().get_message_by_name(&M::full_name()) else {
        return serde_json::Map::new();
    };
    let Ok(dynamic) = prost_reflect::DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice()) else {
        return serde_json::Map::new();
    };
    let options = prost_reflect::SerializeOptions::new().use_proto_field_name(true);
    match dynamic.serialize_with_options(serde_json::value::Serializer, &options) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    }
}

fn to_value(json: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match json {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(items) => {
            Kind::ListValue(prost_types::ListValue { values: items.iter().map(to_value).collect() })
        }
        serde_json::Value::Object(map) => Kind::StructValue(prost_types::Struct {
            fields: map.iter().map(|(k, v)| (k.clone(), to_value(v))).collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

/// The audit action of a call refused `permission`, in the contract's
/// `<service>.<collection>.<verb>` shape: the permission's service and
/// collection, and the RPC's verb (the first word of the method), e.g.
/// `/socle.tenancy.v1.GrantService/DeleteGrant` refused
/// `tenancy.grants.manage` → `tenancy.grants.delete`.
pub fn action_of(rpc: &str, permission: &str) -> String {
    let method = rpc.rsplit('/').next().unwrap_or(rpc);
    let verb: String = method
        .char_indices()
        .take_while(|(i, c)| *i == 0 || !c.is_ascii_uppercase())
        .map(|(_, c)| c.to_ascii_lowercase())
        .collect();
    let mut segments = permission.split('.');
    match (segments.next(), segments.next()) {
        (Some(service), Some(collection)) => format!("{service}.{collection}.{verb}"),
        _ => format!("unknown.calls.{verb}"),
    }
}

/// Records a denied access decision of the current call: `principal` was
/// refused `permission` on `entity`, answered with `code`. Written to the
/// service's outbox before the refusal is returned; a failure to write is
/// logged, never turned into an error for the caller (the refusal stands).
pub async fn record_denial(principal: &Principal, permission: &str, entity: &str, code: Code, reason: &str) {
    let Some(context) = current() else { return };
    let Some(outbox) = context.outbox.clone() else { return };
    if uuid::Uuid::parse_str(entity).is_err() {
        // Not an entity id: nothing to chain the event to (the request
        // named garbage; it is refused as such).
        return;
    }
    let mut event = event(context.service, &action_of(&context.rpc, permission), Outcome::Denied);
    event.actor = Some(actor(Some(principal)));
    event.entity_id = entity.to_owned();
    event.status_code = code.name().to_owned();
    event.reason = reason.to_owned();
    event.permission = permission.to_owned();
    let written = outbox
        .transaction(&EntityScope::System, |conn| Box::pin(async move { socle_outbox::enqueue(conn, &event).await }))
        .await;
    if let Err(error) = written {
        tracing::error!(error = %error, rpc = %context.rpc, "could not record a denied access in the outbox");
    }
}

/// Delivers outbox batches to the audit service.
pub struct GrpcSink {
    client: AuditEventServiceClient<Channel>,
    token: Option<Arc<ServiceToken>>,
}

impl GrpcSink {
    /// A sink calling the audit service at `channel`, authenticated with
    /// `token` (none in `declared` mode).
    pub fn new(channel: Channel, token: Option<Arc<ServiceToken>>) -> Self {
        GrpcSink { client: AuditEventServiceClient::new(channel), token }
    }
}

impl Sink for GrpcSink {
    fn append(&self, events: Vec<AuditEvent>) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            // The layer checks `audit.events.append` on the entity the call
            // names; the audit service checks every other entity of the batch.
            let entity = events.first().map(|e| e.entity_id.clone()).unwrap_or_default();
            let mut request = tonic::Request::new(AppendEventsRequest { events });
            if let Ok(entity) = entity.parse() {
                request.metadata_mut().insert("x-socle-entity", entity);
            }
            if let Some(token) = &self.token {
                use socle_config::ExposeSecret;
                let bearer = format!("Bearer {}", token.get().await?.expose_secret());
                request.metadata_mut().insert(
                    "authorization",
                    bearer.parse().map_err(|_| Error::internal("the service token is not a valid header"))?,
                );
            }
            self.client
                .clone()
                .append_events(request)
                .await
                .map(|_| ())
                .map_err(|status| Error::new(Code::from_grpc(status.code()), format!("audit: {}", status.message())))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_are_named_after_the_rpc() {
        assert_eq!(
            action_of("/socle.tenancy.v1.GrantService/DeleteGrant", "tenancy.grants.manage"),
            "tenancy.grants.delete"
        );
        assert_eq!(action_of("/socle.identity.v1.UserService/ListUsers", "identity.users.read"), "identity.users.list");
        assert_eq!(
            action_of("/socle.crm.v1.OrganizationService/Get", "crm.organizations.read"),
            "crm.organizations.get"
        );
    }

    #[test]
    fn a_change_lists_the_fields_that_differ_and_marks_personal_ones() {
        use socle_proto::socle::tenancy::v1::Entity;
        let before = Entity {
            id: "e".into(),
            display_name: "Lyon".into(),
            email: "a@x.fr".into(),
            etag: "1".into(),
            ..Default::default()
        };
        let after = Entity {
            display_name: "Lyon Métropole".into(),
            email: "b@x.fr".into(),
            etag: "2".into(),
            ..before.clone()
        };
        let event = change(
            "tenancy",
            "tenancy.entities.update",
            "tenancy.entity",
            "e",
            "e",
            Some(&before),
            Some(&after),
            &["email"],
            "e",
        );
        let fields: Vec<_> = event.changes.iter().map(|c| (c.field_path.as_str(), c.personal_data)).collect();
        assert_eq!(fields, vec![("display_name", false), ("email", true)]);
        let created = change::<Entity>(
            "tenancy",
            "tenancy.entities.create",
            "tenancy.entity",
            "e",
            "e",
            None,
            Some(&after),
            &[],
            "",
        );
        assert!(created.changes.iter().all(|c| c.before.is_none() && c.after.is_some()));
        assert!(created.changes.iter().any(|c| c.field_path == "display_name"));
    }

    #[test]
    fn the_trace_id_comes_from_traceparent() {
        let mut headers = http::HeaderMap::new();
        headers.insert("traceparent", "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01".parse().unwrap());
        assert_eq!(trace_id_of(&headers), "4bf92f3577b34da6a3ce929d0e0e4736");
    }
}
