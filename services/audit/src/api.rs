//! The gRPC adapters of `socle.audit.v1`: request validation, the
//! record-level and subtree authorization the layer cannot do, and the
//! conversion of the store's results.

use std::{pin::Pin, sync::Arc};

use chrono::{DateTime, Utc};
use futures::Stream;
use socle_api::{PageToken, Violations, from_timestamp, page_size, parse_id, parse_optional_id};
use socle_errors::{Code, Error};
use socle_proto::socle::{
    audit::v1::{audit_event_service_server::AuditEventService, checkpoint_service_server::CheckpointService, *},
    tenancy::v1::{ListAccessibleEntitiesRequest, access_service_client::AccessServiceClient},
};
use socle_server::{
    Principal, principal_of,
    remote_auth::{PlatformClients, actor},
    reply,
    request_id::owned as rid,
    token_authz::{AccessCheck, check_record},
};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::{
    export,
    store::{EventFilter, Store, VerifyRange},
    validate,
};

/// Both services of the contract over one store.
#[derive(Clone)]
pub struct AuditApi {
    store: Store,
    platform: Option<PlatformClients>,
    access: Option<Arc<dyn AccessCheck>>,
}

impl AuditApi {
    /// The API; `platform` and `access` are `None` in `declared` mode.
    pub fn new(store: Store, platform: Option<PlatformClients>, access: Option<Arc<dyn AccessCheck>>) -> Self {
        AuditApi { store, platform, access }
    }

    /// The entity named by `value`, or the one the caller acts for.
    fn entity<T>(request: &Request<T>, value: &str) -> Result<Uuid, Error> {
        let acting = request.metadata().get("x-socle-entity").and_then(|v| v.to_str().ok()).unwrap_or_default();
        parse_id("entity_id", if value.is_empty() { acting } else { value })
    }

    /// `root` alone, or with the descendants where the caller holds
    /// `permission` (tenancy's `ListAccessibleEntities`, asked as this
    /// service's account on behalf of the caller).
    async fn scope(
        &self,
        principal: Option<&Principal>,
        permission: &str,
        root: Uuid,
        descendants: bool,
    ) -> Result<Vec<Uuid>, Error> {
        if !descendants {
            return Ok(vec![root]);
        }
        let (Some(platform), Some(who)) = (self.platform.as_ref(), principal.and_then(actor)) else {
            return Err(Error::new(
                Code::FailedPrecondition,
                "reading descendants needs the entity tree: run with auth.mode = \"tokens\"",
            ));
        };
        let mut request = platform
            .request(ListAccessibleEntitiesRequest {
                principal: Some(who),
                permission: permission.to_owned(),
                root_entity_id: root.to_string(),
                include_archived: true,
            })
            .await?;
        request.metadata_mut().insert(
            "x-socle-entity",
            root.to_string().parse().map_err(|_| Error::internal("entity id is not a header value"))?,
        );
        let reply = AccessServiceClient::new(platform.tenancy.clone())
            .list_accessible_entities(request)
            .await
            .map_err(|status| {
                tracing::warn!(code = ?status.code(), "tenancy ListAccessibleEntities failed");
                Error::unavailable("the access service is unreachable, retry later")
            })?
            .into_inner();
        let mut entities: Vec<Uuid> = reply.entity_ids.iter().filter_map(|id| Uuid::parse_str(id).ok()).collect();
        if !entities.contains(&root) {
            // The layer checked the permission on the root itself.
            entities.push(root);
        }
        entities.sort();
        Ok(entities)
    }

    async fn check_append(&self, principal: Option<&Principal>, events: &[AuditEvent]) -> Result<(), Error> {
        let (Some(access), Some(principal)) = (self.access.as_ref(), principal) else { return Ok(()) };
        if matches!(principal, Principal::Anonymous) {
            return Ok(());
        }
        let mut checked = std::collections::HashSet::new();
        for (i, event) in events.iter().enumerate() {
            if checked.insert(event.entity_id.clone())
                && !access.check(principal, "audit.events.append", &event.entity_id).await?.allowed
            {
                return Err(Error::permission_denied(format!(
                    "you lack `audit.events.append` on the entity of events[{i}]"
                )));
            }
        }
        Ok(())
    }
}

fn time(field: &str, t: &Option<prost_types::Timestamp>) -> Result<Option<DateTime<Utc>>, Error> {
    t.as_ref().map(|t| from_timestamp(field, t)).transpose()
}

fn optional(text: &str) -> Option<String> {
    (!text.is_empty()).then(|| text.to_owned())
}

fn is_action_pattern(action: &str) -> bool {
    let segments: Vec<&str> = action.split('.').collect();
    let name = |s: &&str| {
        let mut chars = s.chars();
        matches!(chars.next(), Some('a'..='z')) && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
    };
    match segments.split_last() {
        Some((&"*", rest)) => !rest.is_empty() && rest.len() < 3 && rest.iter().all(name),
        _ => (2..=3).contains(&segments.len()) && segments.iter().all(name),
    }
}

/// The validated filters of a query and their fingerprint (page tokens).
fn filter_of(r: &QueryEventsRequest, entities: Vec<Uuid>) -> Result<(EventFilter, String), Error> {
    let mut v = Violations::new();
    let actor_id = parse_optional_id("actor_id", &r.actor_id);
    if let Err(e) = &actor_id {
        v.add("actor_id", e.violations().first().map(|x| x.description.clone()).unwrap_or_default());
    }
    let (mut actions, mut action_prefixes) = (Vec::new(), Vec::new());
    for (i, action) in r.actions.iter().enumerate() {
        if !is_action_pattern(action) {
            v.add(format!("actions[{i}]"), "must be `<service>.<collection>.<verb>` or a prefix ending with `.*`");
        } else if let Some(prefix) = action.strip_suffix('*') {
            action_prefixes.push(prefix.to_owned());
        } else {
            actions.push(action.clone());
        }
    }
    let mut outcomes = Vec::new();
    for (i, outcome) in r.outcomes.iter().enumerate() {
        match Outcome::try_from(*outcome) {
            Ok(Outcome::Ok | Outcome::Denied | Outcome::Error) => outcomes.push(*outcome as i16),
            _ => v.add(format!("outcomes[{i}]"), "must be OK, DENIED or ERROR"),
        }
    }
    let ascending = match r.order_by.trim() {
        "" | "occur_time desc" => false,
        "occur_time" | "occur_time asc" => true,
        _ => {
            v.add("order_by", "must be `occur_time desc` or `occur_time`");
            false
        }
    };
    let start_time = time("start_time", &r.start_time);
    let end_time = time("end_time", &r.end_time);
    for (field, t) in [("start_time", &start_time), ("end_time", &end_time)] {
        if t.is_err() {
            v.add(field, "is not a valid time");
        }
    }
    v.into_result()?;
    let filter = EventFilter {
        entities,
        actor_id: actor_id?,
        resource_type: optional(&r.resource_type),
        resource_id: optional(&r.resource_id),
        actions,
        action_prefixes,
        outcomes,
        start_time: start_time?,
        end_time: end_time?,
        request_id: optional(&r.request_id),
        trace_id: optional(&r.trace_id),
        ascending,
    };
    let fingerprint = format!(
        "{:?}|{}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{}",
        filter.entities.first(),
        r.include_descendants,
        filter.actor_id,
        filter.resource_type,
        filter.resource_id,
        filter.actions,
        filter.action_prefixes,
        filter.outcomes,
        filter.start_time,
        filter.end_time,
        filter.request_id,
        filter.trace_id,
        filter.ascending
    );
    Ok((filter, fingerprint))
}

/// The server-streaming body of `ExportEvents`.
pub type ExportStream = Pin<Box<dyn Stream<Item = Result<ExportEventsResponse, Status>> + Send + 'static>>;

/// Bytes per streamed chunk.
const CHUNK: usize = 64 * 1024;

#[tonic::async_trait]
impl AuditEventService for AuditApi {
    async fn append_events(
        &self,
        request: Request<AppendEventsRequest>,
    ) -> Result<Response<AppendEventsResponse>, Status> {
        let request_id = rid(&request);
        let principal = principal_of(&request);
        let result = async {
            let events = validate::events(request.into_inner().events)?;
            self.check_append(principal.as_ref(), &events).await?;
            let results = self.store.append(events).await?;
            Ok(AppendEventsResponse { results })
        }
        .await;
        reply(result, request_id)
    }

    async fn get_event(&self, request: Request<GetEventRequest>) -> Result<Response<GetEventResponse>, Status> {
        let request_id = rid(&request);
        let principal = principal_of(&request);
        let result = async {
            let id = parse_id("event_id", &request.get_ref().event_id)?;
            let event = self.store.get(id).await?.ok_or_else(|| Error::not_found("event", id))?;
            if let Some(access) = &self.access {
                check_record(principal.as_ref(), access.as_ref(), "audit.events.read", &event.entity_id, "event")
                    .await?;
            }
            Ok(GetEventResponse { event: Some(event) })
        }
        .await;
        reply(result, request_id)
    }

    async fn query_events(
        &self,
        request: Request<QueryEventsRequest>,
    ) -> Result<Response<QueryEventsResponse>, Status> {
        let request_id = rid(&request);
        let principal = principal_of(&request);
        let result = async {
            let root = Self::entity(&request, &request.get_ref().entity_id)?;
            let r = request.get_ref();
            let limit = page_size(r.page_size)?;
            let entities = self.scope(principal.as_ref(), "audit.events.read", root, r.include_descendants).await?;
            let (filter, fingerprint) = filter_of(r, entities)?;
            let after = PageToken::<(i64, String)>::decode(&r.page_token, &fingerprint)?.map(|t| t.after);
            let (events, next) = self.store.query(filter, after, limit).await?;
            Ok(QueryEventsResponse {
                events,
                next_page_token: next.map(|k| PageToken::encode(k, &fingerprint)).unwrap_or_default(),
            })
        }
        .await;
        reply(result, request_id)
    }

    async fn verify_chain(
        &self,
        request: Request<VerifyChainRequest>,
    ) -> Result<Response<VerifyChainResponse>, Status> {
        let request_id = rid(&request);
        let result = async {
            let r = request.into_inner();
            let entity = parse_id("entity_id", &r.entity_id)?;
            let mut v = Violations::new();
            v.check(r.start_sequence >= 0, "start_sequence", "must not be negative");
            v.check(r.end_sequence >= 0, "end_sequence", "must not be negative");
            v.check(
                r.start_sequence == 0 || r.start_time.is_none(),
                "start_time",
                "give start_sequence or start_time, not both",
            );
            v.check(r.end_sequence == 0 || r.end_time.is_none(), "end_time", "give end_sequence or end_time, not both");
            v.check(
                r.end_sequence == 0 || r.end_sequence >= r.start_sequence,
                "end_sequence",
                "must not be before start_sequence",
            );
            v.into_result()?;
            let range = VerifyRange {
                start_sequence: r.start_sequence,
                end_sequence: r.end_sequence,
                start_time: time("start_time", &r.start_time)?,
                end_time: time("end_time", &r.end_time)?,
            };
            self.store.verify(entity, range).await
        }
        .await;
        reply(result, request_id)
    }

    async fn export_events(&self, request: Request<ExportEventsRequest>) -> Result<Response<ExportStream>, Status> {
        let request_id = rid(&request);
        let principal = principal_of(&request);
        let prepared = async {
            let root = Self::entity(&request, &request.get_ref().entity_id)?;
            let r = request.get_ref();
            let start = time("start_time", &r.start_time)?;
            let end = time("end_time", &r.end_time)?;
            let entities = self.scope(principal.as_ref(), "audit.events.export", root, r.include_descendants).await?;
            Ok::<_, Error>((root, entities, start, end))
        }
        .await;
        let (root, entities, start, end) = match prepared {
            Ok(prepared) => prepared,
            Err(e) => return Err(e.into_status(request_id.as_deref())),
        };
        let (out, stream) = mpsc::channel::<Result<ExportEventsResponse, Status>>(8);
        let store = self.store.clone();
        tokio::spawn(async move {
            let (lines, mut received) = mpsc::channel::<String>(256);
            let producer = async move {
                let result = export::export(&store, &entities, start, end, &lines).await;
                drop(lines);
                result
            };
            let out_chunks = out.clone();
            let chunker = async move {
                let mut first = true;
                let mut buffer = String::new();
                let flush = |buffer: &mut String, first: &mut bool| {
                    let chunk = ExportEventsResponse {
                        chunk: std::mem::take(buffer).into_bytes(),
                        content_type: if *first { "application/jsonl".into() } else { String::new() },
                        filename: if *first {
                            format!("audit-{root}-{}.jsonl", Utc::now().format("%Y-%m-%d"))
                        } else {
                            String::new()
                        },
                    };
                    *first = false;
                    chunk
                };
                while let Some(line) = received.recv().await {
                    buffer.push_str(&line);
                    if buffer.len() >= CHUNK && out_chunks.send(Ok(flush(&mut buffer, &mut first))).await.is_err() {
                        return;
                    }
                }
                if !buffer.is_empty() || first {
                    let _ = out_chunks.send(Ok(flush(&mut buffer, &mut first))).await;
                }
            };
            let (result, ()) = tokio::join!(producer, chunker);
            if let Err(error) = result {
                let _ = out.send(Err(error.into_status(request_id.as_deref()))).await;
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(stream))))
    }
}

#[tonic::async_trait]
impl CheckpointService for AuditApi {
    async fn list_checkpoints(
        &self,
        request: Request<ListCheckpointsRequest>,
    ) -> Result<Response<ListCheckpointsResponse>, Status> {
        let request_id = rid(&request);
        let result = async {
            let entity = Self::entity(&request, &request.get_ref().entity_id)?;
            let r = request.get_ref();
            let limit = page_size(r.page_size)?;
            let (start, end) = (time("start_time", &r.start_time)?, time("end_time", &r.end_time)?);
            let fingerprint = format!("{entity}|{start:?}|{end:?}");
            let after = PageToken::<(i64, String)>::decode(&r.page_token, &fingerprint)?.map(|t| t.after);
            let (checkpoints, next) = self.store.list_checkpoints(entity, start, end, after, limit).await?;
            Ok(ListCheckpointsResponse {
                checkpoints,
                next_page_token: next.map(|k| PageToken::encode(k, &fingerprint)).unwrap_or_default(),
            })
        }
        .await;
        reply(result, request_id)
    }

    async fn get_checkpoint(
        &self,
        request: Request<GetCheckpointRequest>,
    ) -> Result<Response<GetCheckpointResponse>, Status> {
        let request_id = rid(&request);
        let principal = principal_of(&request);
        let result = async {
            let id = parse_id("checkpoint_id", &request.get_ref().checkpoint_id)?;
            let checkpoint = self.store.get_checkpoint(id).await?.ok_or_else(|| Error::not_found("checkpoint", id))?;
            if let Some(access) = &self.access {
                let entity = &checkpoint.entity_id;
                check_record(principal.as_ref(), access.as_ref(), "audit.checkpoints.read", entity, "checkpoint")
                    .await?;
            }
            Ok(GetCheckpointResponse { checkpoint: Some(checkpoint) })
        }
        .await;
        reply(result, request_id)
    }

    async fn list_signing_keys(
        &self,
        request: Request<ListSigningKeysRequest>,
    ) -> Result<Response<ListSigningKeysResponse>, Status> {
        let request_id = rid(&request);
        let result = async {
            let r = request.into_inner();
            let limit = page_size(r.page_size)?;
            let after = PageToken::<usize>::decode(&r.page_token, "signing-keys")?.map(|t| t.after).unwrap_or(0);
            let keys = self.store.signing_keys().await?;
            let page: Vec<SigningKey> = keys.iter().skip(after).take(limit).cloned().collect();
            let next = after + page.len();
            Ok(ListSigningKeysResponse {
                signing_keys: page,
                next_page_token: if next < keys.len() {
                    PageToken::encode(next, "signing-keys")
                } else {
                    String::new()
                },
            })
        }
        .await;
        reply(result, request_id)
    }
}
