//! The audit store: append to the hash chains, read (decrypting personal
//! values), verify, checkpoint, erase data subjects (events carrying
//! `erase_subject_ids`, or `shred_subject`). Takes and returns the
//! contract's messages; no gRPC types besides them.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::Arc,
};

use chrono::{DateTime, SubsecRound, Utc};
use diesel::{
    QueryableByName,
    result::Error as DieselError,
    sql_types::{Array, BigInt, Bytea, Nullable, SmallInt, Text, Timestamptz, Uuid as SqlUuid},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use serde_json::Value as Json;
use socle_db::{Database, DbError, EntityScope};
use socle_errors::{Code, Error};
use socle_proto::socle::{audit::v1::*, r#type::v1::ActorRef};
use uuid::Uuid;

use crate::{
    canonical::{self, ENCODING_VERSION, GENESIS_HASH},
    keys::{ALGORITHM, Keys, SubjectKey},
    verify::{ChainVerifier, PublicKeys, checkpoint_payload},
};

/// Largest batch of `AppendEvents`.
pub const MAX_BATCH: usize = 500;

/// Store settings.
#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    /// A chain gets a checkpoint once this many events are unsealed.
    pub checkpoint_every: i64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions { checkpoint_every: 1000 }
    }
}

/// The audit store.
#[derive(Clone)]
pub struct Store {
    db: Database,
    keys: Arc<Keys>,
    options: StoreOptions,
}

pub(crate) fn db(error: DieselError) -> Error {
    DbError::from(error).into()
}

fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    socle_api::timestamp(t)
}

/// A row of `audit_events`.
#[derive(Debug, Clone, QueryableByName)]
pub struct EventRow {
    #[diesel(sql_type = SqlUuid)]
    entity_id: Uuid,
    #[diesel(sql_type = BigInt)]
    sequence: i64,
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = SmallInt)]
    encoding_version: i16,
    #[diesel(sql_type = SmallInt)]
    actor_kind: i16,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    actor_id: Option<Uuid>,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    acting_entity_id: Option<Uuid>,
    #[diesel(sql_type = Text)]
    service: String,
    #[diesel(sql_type = Text)]
    action: String,
    #[diesel(sql_type = Text)]
    resource_type: String,
    #[diesel(sql_type = Text)]
    resource_id: String,
    #[diesel(sql_type = SmallInt)]
    outcome: i16,
    #[diesel(sql_type = Text)]
    status_code: String,
    #[diesel(sql_type = Text)]
    reason: String,
    #[diesel(sql_type = Text)]
    permission: String,
    #[diesel(sql_type = Text)]
    request_id: String,
    #[diesel(sql_type = Text)]
    trace_id: String,
    #[diesel(sql_type = Text)]
    client_address: String,
    #[diesel(sql_type = Timestamptz)]
    occur_time: DateTime<Utc>,
    #[diesel(sql_type = Timestamptz)]
    record_time: DateTime<Utc>,
    #[diesel(sql_type = Text)]
    changes: String,
    #[diesel(sql_type = Text)]
    details: String,
    #[diesel(sql_type = Text)]
    prev_hash: String,
    #[diesel(sql_type = Text)]
    hash: String,
    #[diesel(sql_type = Text)]
    erase_subject_ids: String,
}

/// The columns of [`EventRow`].
pub const EVENT_COLUMNS: &str = "entity_id, sequence, id, encoding_version, actor_kind, actor_id, acting_entity_id,
    service, action, resource_type, resource_id, outcome, status_code, reason, permission, request_id, trace_id,
    client_address, occur_time, record_time, changes, details, prev_hash, hash, erase_subject_ids";

impl EventRow {
    /// The event in its stored form (personal values sealed). A row whose
    /// `changes`, `details` or `erase_subject_ids` no longer parse keeps them
    /// empty: its hash then fails to verify, which is the point.
    pub fn to_proto(&self) -> AuditEvent {
        let changes: Vec<FieldChange> = serde_json::from_str::<Vec<Json>>(&self.changes)
            .map(|items| items.iter().filter_map(|c| canonical::change_from_json(c).ok()).collect())
            .unwrap_or_default();
        let details = serde_json::from_str::<Json>(&self.details).ok().map(|d| canonical::json_to_struct(&d));
        let erase_subject_ids = serde_json::from_str::<Vec<String>>(&self.erase_subject_ids).unwrap_or_default();
        AuditEvent {
            id: self.id.to_string(),
            entity_id: self.entity_id.to_string(),
            sequence: self.sequence,
            actor: Some(ActorRef {
                kind: i32::from(self.actor_kind),
                id: self.actor_id.map(|a| a.to_string()).unwrap_or_default(),
                display_name: String::new(),
            }),
            acting_entity_id: self.acting_entity_id.map(|a| a.to_string()).unwrap_or_default(),
            service: self.service.clone(),
            action: self.action.clone(),
            resource_type: self.resource_type.clone(),
            resource_id: self.resource_id.clone(),
            outcome: i32::from(self.outcome),
            status_code: self.status_code.clone(),
            reason: self.reason.clone(),
            permission: self.permission.clone(),
            request_id: self.request_id.clone(),
            trace_id: self.trace_id.clone(),
            client_address: self.client_address.clone(),
            occur_time: Some(ts(self.occur_time)),
            record_time: Some(ts(self.record_time)),
            changes,
            details: details.filter(|d| !d.fields.is_empty()),
            prev_hash: self.prev_hash.clone(),
            hash: self.hash.clone(),
            encoding_version: i32::from(self.encoding_version),
            erase_subject_ids,
        }
    }
}

/// A row of `audit_checkpoints`.
#[derive(Debug, Clone, QueryableByName)]
pub struct CheckpointRow {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    entity_id: Uuid,
    #[diesel(sql_type = BigInt)]
    sequence: i64,
    #[diesel(sql_type = Text)]
    head_hash: String,
    #[diesel(sql_type = Text)]
    signing_key_id: String,
    #[diesel(sql_type = Text)]
    algorithm: String,
    #[diesel(sql_type = Text)]
    signed_payload: String,
    #[diesel(sql_type = Bytea)]
    signature: Vec<u8>,
    #[diesel(sql_type = Timestamptz)]
    create_time: DateTime<Utc>,
}

const CHECKPOINT_COLUMNS: &str =
    "id, entity_id, sequence, head_hash, signing_key_id, algorithm, signed_payload, signature, create_time";

impl CheckpointRow {
    /// As the contract's message.
    pub fn to_proto(&self) -> Checkpoint {
        Checkpoint {
            id: self.id.to_string(),
            entity_id: self.entity_id.to_string(),
            sequence: self.sequence,
            head_hash: self.head_hash.clone(),
            signing_key_id: self.signing_key_id.clone(),
            algorithm: self.algorithm.clone(),
            signed_payload: self.signed_payload.clone(),
            signature: self.signature.clone(),
            create_time: Some(ts(self.create_time)),
        }
    }
}

#[derive(QueryableByName)]
struct KeyRow {
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = Text)]
    algorithm: String,
    #[diesel(sql_type = Bytea)]
    public_key: Vec<u8>,
    #[diesel(sql_type = Timestamptz)]
    activate_time: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    retire_time: Option<DateTime<Utc>>,
}

#[derive(QueryableByName)]
struct SubjectKeyRow {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = Text)]
    subject_id: String,
    #[diesel(sql_type = Text)]
    kek_id: String,
    #[diesel(sql_type = Bytea)]
    wrapped: Vec<u8>,
}

#[derive(QueryableByName)]
struct ChainRow {
    #[diesel(sql_type = SqlUuid)]
    entity_id: Uuid,
    #[diesel(sql_type = BigInt)]
    head_sequence: i64,
    #[diesel(sql_type = Text)]
    head_hash: String,
    #[diesel(sql_type = BigInt)]
    checkpoint_sequence: i64,
}

#[derive(QueryableByName)]
struct Existing {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = BigInt)]
    sequence: i64,
    #[diesel(sql_type = Text)]
    hash: String,
    #[diesel(sql_type = Bytea)]
    content_digest: Vec<u8>,
}

#[derive(QueryableByName)]
struct Tombstone {
    #[diesel(sql_type = Text)]
    subject_id: String,
}

#[derive(QueryableByName)]
struct OptSeq {
    #[diesel(sql_type = Nullable<BigInt>)]
    n: Option<i64>,
}

/// The columns of a multi-row insert (one `unnest` of arrays).
#[derive(Default)]
struct Columns {
    entity_id: Vec<Uuid>,
    sequence: Vec<i64>,
    id: Vec<Uuid>,
    encoding_version: Vec<i16>,
    actor_kind: Vec<i16>,
    actor_id: Vec<Option<Uuid>>,
    acting_entity_id: Vec<Option<Uuid>>,
    service: Vec<String>,
    action: Vec<String>,
    resource_type: Vec<String>,
    resource_id: Vec<String>,
    outcome: Vec<i16>,
    status_code: Vec<String>,
    reason: Vec<String>,
    permission: Vec<String>,
    request_id: Vec<String>,
    trace_id: Vec<String>,
    client_address: Vec<String>,
    occur_time: Vec<DateTime<Utc>>,
    record_time: Vec<DateTime<Utc>>,
    changes: Vec<String>,
    details: Vec<String>,
    prev_hash: Vec<String>,
    hash: Vec<String>,
    erase_subject_ids: Vec<String>,
    content_digest: Vec<Vec<u8>>,
}

fn uuid_or_none(text: &str) -> Option<Uuid> {
    Uuid::parse_str(text).ok()
}

fn time_of(t: &Option<prost_types::Timestamp>) -> DateTime<Utc> {
    t.as_ref().and_then(|t| DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32)).unwrap_or(DateTime::UNIX_EPOCH)
}

impl Columns {
    fn push(&mut self, event: &AuditEvent, digest: Vec<u8>) -> Result<(), Error> {
        let changes = event.changes.iter().map(canonical::change_to_json).collect::<Result<Vec<_>, _>>();
        let changes = changes.map_err(Error::internal)?;
        let details = match &event.details {
            Some(d) => canonical::struct_to_json(d).map_err(Error::internal)?,
            None => Json::Object(Default::default()),
        };
        self.push_encoded(event, canonical::jcs(&Json::Array(changes)), canonical::jcs(&details), digest)
    }

    /// Adds a row whose `changes` and `details` are already canonical JSON.
    fn push_encoded(
        &mut self,
        event: &AuditEvent,
        changes: String,
        details: String,
        digest: Vec<u8>,
    ) -> Result<(), Error> {
        let actor = event.actor.clone().unwrap_or_default();
        self.entity_id.push(Uuid::parse_str(&event.entity_id).map_err(Error::internal)?);
        self.sequence.push(event.sequence);
        self.id.push(Uuid::parse_str(&event.id).map_err(Error::internal)?);
        self.encoding_version.push(event.encoding_version as i16);
        self.actor_kind.push(actor.kind as i16);
        self.actor_id.push(uuid_or_none(&actor.id));
        self.acting_entity_id.push(uuid_or_none(&event.acting_entity_id));
        self.service.push(event.service.clone());
        self.action.push(event.action.clone());
        self.resource_type.push(event.resource_type.clone());
        self.resource_id.push(event.resource_id.clone());
        self.outcome.push(event.outcome as i16);
        self.status_code.push(event.status_code.clone());
        self.reason.push(event.reason.clone());
        self.permission.push(event.permission.clone());
        self.request_id.push(event.request_id.clone());
        self.trace_id.push(event.trace_id.clone());
        self.client_address.push(event.client_address.clone());
        self.occur_time.push(time_of(&event.occur_time));
        self.record_time.push(time_of(&event.record_time));
        self.changes.push(changes);
        self.details.push(details);
        self.prev_hash.push(event.prev_hash.clone());
        self.hash.push(event.hash.clone());
        self.erase_subject_ids.push(canonical::jcs(&Json::from(event.erase_subject_ids.clone())));
        self.content_digest.push(digest);
        Ok(())
    }

    /// Inserts every row with one statement into `table`.
    async fn insert(self, conn: &mut AsyncPgConnection, table: &str) -> Result<(), DieselError> {
        if self.id.is_empty() {
            return Ok(());
        }
        diesel::sql_query(format!(
            "INSERT INTO {table} ({EVENT_COLUMNS}, content_digest)
             SELECT * FROM unnest($1::uuid[], $2::int8[], $3::uuid[], $4::int2[], $5::int2[], $6::uuid[], $7::uuid[],
                $8::text[], $9::text[], $10::text[], $11::text[], $12::int2[], $13::text[], $14::text[], $15::text[],
                $16::text[], $17::text[], $18::text[], $19::timestamptz[], $20::timestamptz[], $21::text[],
                $22::text[], $23::text[], $24::text[], $25::text[], $26::bytea[])"
        ))
        .bind::<Array<SqlUuid>, _>(self.entity_id)
        .bind::<Array<BigInt>, _>(self.sequence)
        .bind::<Array<SqlUuid>, _>(self.id)
        .bind::<Array<SmallInt>, _>(self.encoding_version)
        .bind::<Array<SmallInt>, _>(self.actor_kind)
        .bind::<Array<Nullable<SqlUuid>>, _>(self.actor_id)
        .bind::<Array<Nullable<SqlUuid>>, _>(self.acting_entity_id)
        .bind::<Array<Text>, _>(self.service)
        .bind::<Array<Text>, _>(self.action)
        .bind::<Array<Text>, _>(self.resource_type)
        .bind::<Array<Text>, _>(self.resource_id)
        .bind::<Array<SmallInt>, _>(self.outcome)
        .bind::<Array<Text>, _>(self.status_code)
        .bind::<Array<Text>, _>(self.reason)
        .bind::<Array<Text>, _>(self.permission)
        .bind::<Array<Text>, _>(self.request_id)
        .bind::<Array<Text>, _>(self.trace_id)
        .bind::<Array<Text>, _>(self.client_address)
        .bind::<Array<Timestamptz>, _>(self.occur_time)
        .bind::<Array<Timestamptz>, _>(self.record_time)
        .bind::<Array<Text>, _>(self.changes)
        .bind::<Array<Text>, _>(self.details)
        .bind::<Array<Text>, _>(self.prev_hash)
        .bind::<Array<Text>, _>(self.hash)
        .bind::<Array<Text>, _>(self.erase_subject_ids)
        .bind::<Array<Bytea>, _>(self.content_digest)
        .execute(conn)
        .await
        .map(|_| ())
    }
}

/// Rows as an insert into `table` (the benchmark's plain-INSERT baseline
/// writes the very rows the store would write).
pub async fn insert_plain(conn: &mut AsyncPgConnection, table: &str, events: &[AuditEvent]) -> Result<(), Error> {
    let mut columns = Columns::default();
    for event in events {
        columns.push(event, canonical::sha256(event.id.as_bytes()))?;
    }
    columns.insert(conn, table).await.map_err(db)
}

/// Now, at the precision the database keeps.
fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// Which part of a chain to verify.
#[derive(Debug, Clone, Default)]
pub struct VerifyRange {
    /// First sequence (0: from the start or `start_time`).
    pub start_sequence: i64,
    /// Last sequence (0: to the head or `end_time`).
    pub end_sequence: i64,
    /// First event recorded at or after.
    pub start_time: Option<DateTime<Utc>>,
    /// Last event recorded before.
    pub end_time: Option<DateTime<Utc>>,
}

/// The filters of `QueryEvents`, validated.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// The entities to read (already authorized).
    pub entities: Vec<Uuid>,
    /// By actor.
    pub actor_id: Option<Uuid>,
    /// By resource type.
    pub resource_type: Option<String>,
    /// By resource id.
    pub resource_id: Option<String>,
    /// Exact actions.
    pub actions: Vec<String>,
    /// Action prefixes (without the `*`).
    pub action_prefixes: Vec<String>,
    /// Outcomes.
    pub outcomes: Vec<i16>,
    /// Occurred at or after.
    pub start_time: Option<DateTime<Utc>>,
    /// Occurred before.
    pub end_time: Option<DateTime<Utc>>,
    /// By request id.
    pub request_id: Option<String>,
    /// By trace id.
    pub trace_id: Option<String>,
    /// Oldest first instead of newest first.
    pub ascending: bool,
}

/// A keyset position: (occur_time in microseconds, event id).
pub type Cursor = (i64, String);

fn like_prefix(prefix: &str) -> String {
    let escaped = prefix.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
    format!("{escaped}%")
}

impl Store {
    /// A store over `db`, registering the public keys of `keys` (the current
    /// one active, any other retired).
    pub async fn open(database: Database, keys: Keys, options: StoreOptions) -> Result<Self, Error> {
        let keys = Arc::new(keys);
        let registered = keys.clone();
        database
            .transaction(&EntityScope::System, move |conn| {
                Box::pin(async move {
                    for (i, key) in registered.all().iter().enumerate() {
                        diesel::sql_query(
                            "INSERT INTO audit_signing_keys (id, algorithm, public_key, retire_time)
                         VALUES ($1, $2, $3, CASE WHEN $4 THEN NULL ELSE now() END)
                         ON CONFLICT (id) DO UPDATE SET retire_time = CASE WHEN $4 THEN NULL
                             ELSE coalesce(audit_signing_keys.retire_time, now()) END",
                        )
                        .bind::<Text, _>(&key.id)
                        .bind::<Text, _>(ALGORITHM)
                        .bind::<Bytea, _>(&key.public)
                        .bind::<diesel::sql_types::Bool, _>(i == 0)
                        .execute(conn)
                        .await
                        .map_err(db)?;
                    }
                    diesel::sql_query(
                        "UPDATE audit_signing_keys SET retire_time = now() WHERE retire_time IS NULL AND id <> $1",
                    )
                    .bind::<Text, _>(&registered.current().id)
                    .execute(conn)
                    .await
                    .map_err(db)?;
                    Ok::<_, Error>(())
                })
            })
            .await?;
        Ok(Store { db: database, keys, options })
    }

    /// The database.
    pub fn database(&self) -> &Database {
        &self.db
    }

    /// Appends a validated batch (see [`crate::validate`]): all or nothing.
    ///
    /// Erasures (`erase_subject_ids`) apply in batch order: the personal
    /// values of a subject in the events before the erasing one are sealed
    /// under the subject's key, which the transaction then deletes; those of
    /// the erasing event itself and of the events after it (or of a subject
    /// erased by an earlier transaction) are sealed under a key that is
    /// never stored.
    pub async fn append(&self, events: Vec<AuditEvent>) -> Result<Vec<AppendEventResult>, Error> {
        let entities: BTreeSet<Uuid> =
            events.iter().map(|e| Uuid::parse_str(&e.entity_id)).collect::<Result<_, _>>().map_err(Error::internal)?;
        let entities: Vec<Uuid> = entities.into_iter().collect();
        let subjects: BTreeSet<String> = events
            .iter()
            .flat_map(|e| e.changes.iter().filter(|c| c.personal_data).map(|c| c.subject_id.clone()))
            .collect();
        let subjects: Vec<String> = subjects.into_iter().collect();
        let erasing: BTreeSet<&str> =
            events.iter().flat_map(|e| e.erase_subject_ids.iter().map(String::as_str)).collect();
        let locks = subject_locks(
            subjects
                .iter()
                .map(|s| (s.as_str(), erasing.contains(s.as_str())))
                .chain(erasing.iter().map(|s| (*s, true))),
        );
        let ids: Vec<Uuid> =
            events.iter().map(|e| Uuid::parse_str(&e.id)).collect::<Result<_, _>>().map_err(Error::internal)?;
        let (keys, options) = (self.keys.clone(), self.options);
        let scope = EntityScope::Entities(entities.clone());
        self.db
            .transaction(&scope, move |conn| {
                Box::pin(async move {
                    // One lock per chain, in a fixed order (no deadlock).
                    diesel::sql_query(
                        "INSERT INTO audit_chains (entity_id) SELECT unnest($1::uuid[]) ON CONFLICT DO NOTHING",
                    )
                    .bind::<Array<SqlUuid>, _>(&entities)
                    .execute(conn)
                    .await
                    .map_err(db)?;
                    let chains: Vec<ChainRow> = diesel::sql_query(
                        "SELECT entity_id, head_sequence, head_hash, checkpoint_sequence FROM audit_chains
                          WHERE entity_id = ANY($1) ORDER BY entity_id FOR UPDATE",
                    )
                    .bind::<Array<SqlUuid>, _>(&entities)
                    .load(conn)
                    .await
                    .map_err(db)?;
                    let mut heads: HashMap<Uuid, ChainRow> = chains.into_iter().map(|c| (c.entity_id, c)).collect();
                    let existing: Vec<Existing> = diesel::sql_query(
                        "SELECT id, sequence, hash, content_digest FROM audit_events WHERE id = ANY($1)",
                    )
                    .bind::<Array<SqlUuid>, _>(&ids)
                    .load(conn)
                    .await
                    .map_err(db)?;
                    let existing: HashMap<Uuid, Existing> = existing.into_iter().map(|e| (e.id, e)).collect();
                    // Erasures and appends of one subject are serialised, so
                    // that none of them misses the other (then the tombstones
                    // read next are the ones committed).
                    lock_subjects(conn, &locks).await?;
                    let tombstoned = tombstones(conn, &subjects).await?;
                    // The subjects whose key seals or commits to values: those
                    // not erased yet where their values appear in the batch.
                    let mut erased = tombstoned.clone();
                    let mut live = BTreeSet::new();
                    for event in &events {
                        erased.extend(event.erase_subject_ids.iter().cloned());
                        let personal = event.changes.iter().filter(|c| c.personal_data);
                        live.extend(personal.filter(|c| !erased.contains(&c.subject_id)).map(|c| c.subject_id.clone()));
                    }
                    let live: Vec<String> = live.into_iter().collect();
                    let subject_keys = subject_keys(conn, &keys, &live, true).await?;

                    let record_time = ts(now());
                    let mut columns = Columns::default();
                    let mut results = Vec::with_capacity(events.len());
                    let mut erased = tombstoned;
                    let mut erasures: Vec<(String, Option<Uuid>)> = Vec::new();
                    for (i, (mut event, id)) in events.into_iter().zip(ids).enumerate() {
                        let found = existing.get(&id);
                        for subject in &event.erase_subject_ids {
                            if erased.insert(subject.clone()) && found.is_none() {
                                erasures.push((subject.clone(), Some(id)));
                            }
                        }
                        let (digest, json) = content_digest(&event, &subject_keys, &erased)?;
                        if let Some(found) = found {
                            if found.content_digest != digest && stored_digest(conn, id, &erased).await? != digest {
                                return Err(Error::new(
                                    Code::AlreadyExists,
                                    "an event with this id and different content is already stored",
                                )
                                .with_violation(format!("events[{i}].id"), "already used by another event"));
                            }
                            results.push(AppendEventResult {
                                event_id: event.id,
                                sequence: found.sequence,
                                hash: found.hash.clone(),
                                duplicate: true,
                            });
                            continue;
                        }
                        let entity = Uuid::parse_str(&event.entity_id).map_err(Error::internal)?;
                        let head = heads.get_mut(&entity).ok_or_else(|| Error::internal("chain not locked"))?;
                        event.sequence = head.head_sequence + 1;
                        event.prev_hash = head.head_hash.clone();
                        event.record_time = Some(record_time);
                        event.encoding_version = ENCODING_VERSION;
                        seal(&mut event, &subject_keys, &erased)?;
                        let json = finish_canonical(json, &event)?;
                        let bytes = canonical::jcs(&json);
                        event.hash =
                            canonical::chain_hash(&event.prev_hash, bytes.as_bytes()).map_err(Error::internal)?;
                        head.head_sequence = event.sequence;
                        head.head_hash = event.hash.clone();
                        columns.push_encoded(
                            &event,
                            canonical::jcs(&json["changes"]),
                            canonical::jcs(&json["details"]),
                            digest,
                        )?;
                        results.push(AppendEventResult {
                            event_id: event.id,
                            sequence: event.sequence,
                            hash: event.hash,
                            duplicate: false,
                        });
                    }
                    if columns.id.is_empty() {
                        return Ok(results);
                    }
                    columns.insert(conn, "audit_events").await.map_err(db)?;
                    erase(conn, erasures).await?;
                    let (mut chain_ids, mut sequences, mut hashes) = (Vec::new(), Vec::new(), Vec::new());
                    let mut due = Vec::new();
                    for head in heads.values() {
                        chain_ids.push(head.entity_id);
                        sequences.push(head.head_sequence);
                        hashes.push(head.head_hash.clone());
                        if head.head_sequence - head.checkpoint_sequence >= options.checkpoint_every {
                            due.push((head.entity_id, head.head_sequence, head.head_hash.clone()));
                        }
                    }
                    diesel::sql_query(
                        "UPDATE audit_chains c SET head_sequence = u.sequence, head_hash = u.hash, update_time = now()
                           FROM unnest($1::uuid[], $2::int8[], $3::text[]) AS u(entity_id, sequence, hash)
                          WHERE c.entity_id = u.entity_id AND c.head_sequence < u.sequence",
                    )
                    .bind::<Array<SqlUuid>, _>(chain_ids)
                    .bind::<Array<BigInt>, _>(sequences)
                    .bind::<Array<Text>, _>(hashes)
                    .execute(conn)
                    .await
                    .map_err(db)?;
                    for (entity, sequence, hash) in due {
                        insert_checkpoint(conn, &keys, entity, sequence, &hash).await?;
                    }
                    Ok(results)
                })
            })
            .await
    }

    /// One event, decrypted, whatever its entity (the caller checks access
    /// on the event's entity).
    pub async fn get(&self, id: Uuid) -> Result<Option<AuditEvent>, Error> {
        let keys = self.keys.clone();
        self.db
            .transaction(&EntityScope::System, move |conn| {
                Box::pin(async move {
                    let rows: Vec<EventRow> =
                        diesel::sql_query(format!("SELECT {EVENT_COLUMNS} FROM audit_events WHERE id = $1"))
                            .bind::<SqlUuid, _>(id)
                            .load(conn)
                            .await
                            .map_err(db)?;
                    let mut events: Vec<AuditEvent> = rows.iter().map(EventRow::to_proto).collect();
                    open_all(conn, &keys, &mut events).await?;
                    Ok(events.pop())
                })
            })
            .await
    }

    /// A page of events matching `filter` after `after`, decrypted; and the
    /// cursor of the next page.
    pub async fn query(
        &self,
        filter: EventFilter,
        after: Option<Cursor>,
        limit: usize,
    ) -> Result<(Vec<AuditEvent>, Option<Cursor>), Error> {
        let keys = self.keys.clone();
        let scope = EntityScope::Entities(filter.entities.clone());
        self.db
            .transaction(&scope, move |conn| {
                Box::pin(async move {
                    let (direction, comparison) = if filter.ascending { ("ASC", ">") } else { ("DESC", "<") };
                    let (after_time, after_id) = match &after {
                        Some((micros, id)) => (
                            DateTime::from_timestamp_micros(*micros),
                            Some(Uuid::parse_str(id).map_err(|_| {
                                Error::invalid_field("page_token", "is not a token returned by this list")
                            })?),
                        ),
                        None => (None, None),
                    };
                    let prefixes: Vec<String> = filter.action_prefixes.iter().map(|p| like_prefix(p)).collect();
                    let rows: Vec<EventRow> = diesel::sql_query(format!(
                        "SELECT {EVENT_COLUMNS} FROM audit_events
                          WHERE entity_id = ANY($1)
                            AND ($2::uuid IS NULL OR actor_id = $2)
                            AND ($3::text IS NULL OR resource_type = $3)
                            AND ($4::text IS NULL OR resource_id = $4)
                            AND ((cardinality($5::text[]) = 0 AND cardinality($6::text[]) = 0)
                                 OR action = ANY($5) OR action LIKE ANY($6))
                            AND (cardinality($7::int2[]) = 0 OR outcome = ANY($7))
                            AND ($8::timestamptz IS NULL OR occur_time >= $8)
                            AND ($9::timestamptz IS NULL OR occur_time < $9)
                            AND ($10::text IS NULL OR request_id = $10)
                            AND ($11::text IS NULL OR trace_id = $11)
                            AND ($12::timestamptz IS NULL OR (occur_time, id) {comparison} ($12, $13::uuid))
                          ORDER BY occur_time {direction}, id {direction}
                          LIMIT $14"
                    ))
                    .bind::<Array<SqlUuid>, _>(&filter.entities)
                    .bind::<Nullable<SqlUuid>, _>(filter.actor_id)
                    .bind::<Nullable<Text>, _>(&filter.resource_type)
                    .bind::<Nullable<Text>, _>(&filter.resource_id)
                    .bind::<Array<Text>, _>(&filter.actions)
                    .bind::<Array<Text>, _>(&prefixes)
                    .bind::<Array<SmallInt>, _>(&filter.outcomes)
                    .bind::<Nullable<Timestamptz>, _>(filter.start_time)
                    .bind::<Nullable<Timestamptz>, _>(filter.end_time)
                    .bind::<Nullable<Text>, _>(&filter.request_id)
                    .bind::<Nullable<Text>, _>(&filter.trace_id)
                    .bind::<Nullable<Timestamptz>, _>(after_time)
                    .bind::<Nullable<SqlUuid>, _>(after_id)
                    .bind::<BigInt, _>(limit as i64 + 1)
                    .load(conn)
                    .await
                    .map_err(db)?;
                    let more = rows.len() > limit;
                    let rows = &rows[..rows.len().min(limit)];
                    let next = if more {
                        rows.last().map(|r| (r.occur_time.timestamp_micros(), r.id.to_string()))
                    } else {
                        None
                    };
                    let mut events: Vec<AuditEvent> = rows.iter().map(EventRow::to_proto).collect();
                    open_all(conn, &keys, &mut events).await?;
                    Ok((events, next))
                })
            })
            .await
    }

    /// Events `from..=to` of a chain in their stored form (exports, tests).
    pub async fn chain_events(&self, entity: Uuid, from: i64, to: i64) -> Result<Vec<AuditEvent>, Error> {
        self.db
            .transaction(&EntityScope::entity(entity), move |conn| {
                Box::pin(async move {
                    Ok(load_range(conn, entity, from, to).await?.iter().map(EventRow::to_proto).collect())
                })
            })
            .await
    }

    /// Verifies a chain over a range.
    pub async fn verify(&self, entity: Uuid, range: VerifyRange) -> Result<VerifyChainResponse, Error> {
        self.db
            .transaction(&EntityScope::entity(entity), move |conn| {
                Box::pin(async move {
                    let keys = public_keys(conn).await?;
                    let (start, end) = resolve_range(conn, entity, &range).await?;
                    let mut response = VerifyChainResponse {
                        status: ChainStatus::Ok as i32,
                        start_sequence: start,
                        end_sequence: end,
                        verify_time: Some(ts(Utc::now())),
                        ..Default::default()
                    };
                    if start > end {
                        response.end_sequence = start - 1;
                        return Ok(response);
                    }
                    let prev = if start == 1 {
                        Some(GENESIS_HASH.to_owned())
                    } else {
                        load_range(conn, entity, start - 1, start - 1).await?.pop().map(|r| r.hash)
                    };
                    let Some(prev) = prev else {
                        response.status = ChainStatus::Broken as i32;
                        response.first_break = Some(ChainBreak {
                            sequence: start - 1,
                            reason: BreakReason::SequenceGap as i32,
                            detail: format!("event {} before the range is missing", start - 1),
                            ..Default::default()
                        });
                        return Ok(response);
                    };
                    let checkpoints: Vec<CheckpointRow> = diesel::sql_query(format!(
                        "SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints
                          WHERE entity_id = $1 AND sequence BETWEEN $2 AND $3 ORDER BY sequence, create_time, id"
                    ))
                    .bind::<SqlUuid, _>(entity)
                    .bind::<BigInt, _>(start)
                    .bind::<BigInt, _>(end)
                    .load(conn)
                    .await
                    .map_err(db)?;
                    let mut verifier = ChainVerifier::new(&keys, start, prev);
                    let mut pending = checkpoints.iter().map(CheckpointRow::to_proto).peekable();
                    let outcome: Result<(), ChainBreak> = async {
                        let mut from = start;
                        while from <= end {
                            let to = end.min(from + 999);
                            let rows = load_range(conn, entity, from, to).await.map_err(|e| ChainBreak {
                                detail: format!("cannot read the chain: {e}"),
                                ..Default::default()
                            })?;
                            for row in &rows {
                                verifier.event(&row.to_proto())?;
                                while let Some(checkpoint) = pending.next_if(|c| c.sequence <= row.sequence) {
                                    verifier.checkpoint(&checkpoint)?;
                                }
                            }
                            from = to + 1;
                        }
                        if verifier.next_sequence() <= end {
                            return Err(ChainBreak {
                                sequence: verifier.next_sequence(),
                                reason: BreakReason::SequenceGap as i32,
                                detail: format!("events {} to {end} are missing", verifier.next_sequence()),
                                ..Default::default()
                            });
                        }
                        Ok(())
                    }
                    .await;
                    response.verified_event_count = verifier.verified_events;
                    response.verified_checkpoint_count = verifier.verified_checkpoints;
                    response.head_hash = verifier.head_hash().to_owned();
                    if let Err(first_break) = outcome {
                        if first_break.reason == BreakReason::Unspecified as i32 {
                            return Err(Error::unavailable(first_break.detail));
                        }
                        response.status = ChainStatus::Broken as i32;
                        response.end_sequence = start + verifier.verified_events - 1;
                        response.first_break = Some(first_break);
                    }
                    Ok(response)
                })
            })
            .await
    }

    /// Seals the head of every chain with unsealed events (the timer).
    pub async fn checkpoint_pending(&self) -> Result<usize, Error> {
        let keys = self.keys.clone();
        self.db
            .transaction(&EntityScope::System, move |conn| {
                Box::pin(async move {
                    let chains: Vec<ChainRow> = diesel::sql_query(
                        "SELECT entity_id, head_sequence, head_hash, checkpoint_sequence FROM audit_chains
                          WHERE head_sequence > checkpoint_sequence ORDER BY entity_id FOR UPDATE SKIP LOCKED",
                    )
                    .load(conn)
                    .await
                    .map_err(db)?;
                    for chain in &chains {
                        insert_checkpoint(conn, &keys, chain.entity_id, chain.head_sequence, &chain.head_hash).await?;
                    }
                    Ok(chains.len())
                })
            })
            .await
    }

    /// A checkpoint of `entity` at `sequence`, made from the stored hash
    /// (exports seal their last event this way).
    pub async fn checkpoint_at(&self, entity: Uuid, sequence: i64, head_hash: String) -> Result<Checkpoint, Error> {
        let keys = self.keys.clone();
        self.db
            .transaction(&EntityScope::entity(entity), move |conn| {
                Box::pin(async move { insert_checkpoint(conn, &keys, entity, sequence, &head_hash).await })
            })
            .await
    }

    /// An entity's checkpoints, newest first, after a (create time, id) cursor.
    pub async fn list_checkpoints(
        &self,
        entity: Uuid,
        start: Option<DateTime<Utc>>,
        end: Option<DateTime<Utc>>,
        after: Option<Cursor>,
        limit: usize,
    ) -> Result<(Vec<Checkpoint>, Option<Cursor>), Error> {
        self.db
            .transaction(&EntityScope::entity(entity), move |conn| {
                Box::pin(async move {
                    let (after_time, after_id) = match &after {
                        Some((micros, id)) => (DateTime::from_timestamp_micros(*micros), Uuid::parse_str(id).ok()),
                        None => (None, None),
                    };
                    let rows: Vec<CheckpointRow> = diesel::sql_query(format!(
                        "SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints
                          WHERE entity_id = $1
                            AND ($2::timestamptz IS NULL OR create_time >= $2)
                            AND ($3::timestamptz IS NULL OR create_time < $3)
                            AND ($4::timestamptz IS NULL OR (create_time, id) < ($4, $5::uuid))
                          ORDER BY create_time DESC, id DESC LIMIT $6"
                    ))
                    .bind::<SqlUuid, _>(entity)
                    .bind::<Nullable<Timestamptz>, _>(start)
                    .bind::<Nullable<Timestamptz>, _>(end)
                    .bind::<Nullable<Timestamptz>, _>(after_time)
                    .bind::<Nullable<SqlUuid>, _>(after_id)
                    .bind::<BigInt, _>(limit as i64 + 1)
                    .load(conn)
                    .await
                    .map_err(db)?;
                    let more = rows.len() > limit;
                    let rows = &rows[..rows.len().min(limit)];
                    let next = more.then(|| rows.last().map(|r| (r.create_time.timestamp_micros(), r.id.to_string())));
                    Ok((rows.iter().map(CheckpointRow::to_proto).collect(), next.flatten()))
                })
            })
            .await
    }

    /// One checkpoint, whatever its entity (the caller checks access).
    pub async fn get_checkpoint(&self, id: Uuid) -> Result<Option<Checkpoint>, Error> {
        self.db
            .transaction(&EntityScope::System, move |conn| {
                Box::pin(async move {
                    let rows: Vec<CheckpointRow> =
                        diesel::sql_query(format!("SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints WHERE id = $1"))
                            .bind::<SqlUuid, _>(id)
                            .load(conn)
                            .await
                            .map_err(db)?;
                    Ok(rows.into_iter().next().map(|r| r.to_proto()))
                })
            })
            .await
    }

    /// Every signing key, current first.
    pub async fn signing_keys(&self) -> Result<Vec<SigningKey>, Error> {
        self.db
            .transaction(&EntityScope::System, |conn| {
                Box::pin(async move {
                    let rows: Vec<KeyRow> = diesel::sql_query(
                        "SELECT id, algorithm, public_key, activate_time, retire_time FROM audit_signing_keys
                          ORDER BY retire_time DESC NULLS FIRST, activate_time DESC, id",
                    )
                    .load(conn)
                    .await
                    .map_err(db)?;
                    Ok(rows
                        .into_iter()
                        .map(|k| SigningKey {
                            id: k.id,
                            algorithm: k.algorithm,
                            public_key: k.public_key,
                            activate_time: Some(ts(k.activate_time)),
                            retire_time: k.retire_time.map(ts),
                        })
                        .collect())
                })
            })
            .await
    }

    /// Erases a data subject by crypto-shredding, without an event: destroys
    /// every key of the subject and tombstones it, as an event carrying the
    /// subject in `erase_subject_ids` does. Events keep their sealed values
    /// and still verify; reads report the values as erased, and values of
    /// the subject appended later are stored erased. Returns the number of
    /// keys destroyed. (Tests and operators; services erase by event.)
    pub async fn shred_subject(&self, subject_id: &str) -> Result<usize, Error> {
        let subject = subject_id.to_owned();
        self.db
            .transaction(&EntityScope::System, move |conn| {
                Box::pin(async move {
                    lock_subjects(conn, &subject_locks([(subject.as_str(), true)])).await?;
                    erase(conn, vec![(subject, None)]).await
                })
            })
            .await
    }

    /// The first and last sequence of an export of `entity` between times,
    /// and the checkpoint to anchor it on when it does not start at 1.
    pub async fn export_bounds(
        &self,
        entity: Uuid,
        start: Option<DateTime<Utc>>,
        end: Option<DateTime<Utc>>,
    ) -> Result<Option<(i64, i64, Option<Checkpoint>)>, Error> {
        self.db
            .transaction(&EntityScope::entity(entity), move |conn| {
                Box::pin(async move {
                    let range = VerifyRange { start_time: start, end_time: end, ..Default::default() };
                    let (first, last) = resolve_range(conn, entity, &range).await?;
                    if first > last {
                        return Ok(None);
                    }
                    if first == 1 {
                        return Ok(Some((1, last, None)));
                    }
                    let anchor: Vec<CheckpointRow> = diesel::sql_query(format!(
                        "SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints WHERE entity_id = $1 AND sequence < $2
                          ORDER BY sequence DESC, create_time DESC LIMIT 1"
                    ))
                    .bind::<SqlUuid, _>(entity)
                    .bind::<BigInt, _>(first)
                    .load(conn)
                    .await
                    .map_err(db)?;
                    Ok(Some(match anchor.into_iter().next() {
                        Some(cp) => (cp.sequence + 1, last, Some(cp.to_proto())),
                        None => (1, last, None),
                    }))
                })
            })
            .await
    }

    /// Checkpoints of `entity` sealing events `from..=to`, in chain order.
    pub async fn checkpoints_between(&self, entity: Uuid, from: i64, to: i64) -> Result<Vec<Checkpoint>, Error> {
        self.db
            .transaction(&EntityScope::entity(entity), move |conn| {
                Box::pin(async move {
                    let rows: Vec<CheckpointRow> = diesel::sql_query(format!(
                        "SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints
                          WHERE entity_id = $1 AND sequence BETWEEN $2 AND $3 ORDER BY sequence, create_time, id"
                    ))
                    .bind::<SqlUuid, _>(entity)
                    .bind::<BigInt, _>(from)
                    .bind::<BigInt, _>(to)
                    .load(conn)
                    .await
                    .map_err(db)?;
                    Ok(rows.iter().map(CheckpointRow::to_proto).collect())
                })
            })
            .await
    }
}

async fn load_range(conn: &mut AsyncPgConnection, entity: Uuid, from: i64, to: i64) -> Result<Vec<EventRow>, Error> {
    diesel::sql_query(format!(
        "SELECT {EVENT_COLUMNS} FROM audit_events WHERE entity_id = $1 AND sequence BETWEEN $2 AND $3 ORDER BY sequence"
    ))
    .bind::<SqlUuid, _>(entity)
    .bind::<BigInt, _>(from)
    .bind::<BigInt, _>(to)
    .load(conn)
    .await
    .map_err(db)
}

async fn public_keys(conn: &mut AsyncPgConnection) -> Result<PublicKeys, Error> {
    let rows: Vec<KeyRow> =
        diesel::sql_query("SELECT id, algorithm, public_key, activate_time, retire_time FROM audit_signing_keys")
            .load(conn)
            .await
            .map_err(db)?;
    Ok(rows.into_iter().map(|k| (k.id, k.public_key)).collect())
}

/// The sequences a range covers: explicit bounds, else times, else the
/// whole chain (to the head the chain row records, or beyond if rows say so).
async fn resolve_range(conn: &mut AsyncPgConnection, entity: Uuid, range: &VerifyRange) -> Result<(i64, i64), Error> {
    let scalar = |sql: &'static str, time: Option<DateTime<Utc>>| {
        diesel::sql_query(sql).bind::<SqlUuid, _>(entity).bind::<Nullable<Timestamptz>, _>(time)
    };
    let start = if range.start_sequence > 0 {
        range.start_sequence
    } else if let Some(t) = range.start_time {
        let row: OptSeq =
            scalar("SELECT min(sequence) AS n FROM audit_events WHERE entity_id = $1 AND record_time >= $2", Some(t))
                .get_result(conn)
                .await
                .map_err(db)?;
        row.n.unwrap_or(i64::MAX)
    } else {
        1
    };
    let end = if range.end_sequence > 0 {
        range.end_sequence
    } else if let Some(t) = range.end_time {
        let row: OptSeq =
            scalar("SELECT max(sequence) AS n FROM audit_events WHERE entity_id = $1 AND record_time < $2", Some(t))
                .get_result(conn)
                .await
                .map_err(db)?;
        row.n.unwrap_or(0)
    } else {
        let row: OptSeq = scalar(
            "SELECT greatest((SELECT head_sequence FROM audit_chains WHERE entity_id = $1),
                             (SELECT max(sequence) FROM audit_events WHERE entity_id = $1 AND $2::timestamptz IS NULL)) AS n",
            None,
        )
        .get_result(conn)
        .await
        .map_err(db)?;
        row.n.unwrap_or(0)
    };
    Ok((start, end))
}

/// Signs and stores a checkpoint of `entity` at `sequence`.
async fn insert_checkpoint(
    conn: &mut AsyncPgConnection,
    keys: &Keys,
    entity: Uuid,
    sequence: i64,
    head_hash: &str,
) -> Result<Checkpoint, Error> {
    let create_time = ts(now());
    let payload = checkpoint_payload(
        &entity.to_string(),
        sequence,
        head_hash,
        &canonical::format_time(&create_time).map_err(Error::internal)?,
    );
    let (key_id, signature) = keys.sign(payload.as_bytes());
    let checkpoint = Checkpoint {
        id: Uuid::now_v7().to_string(),
        entity_id: entity.to_string(),
        sequence,
        head_hash: head_hash.to_owned(),
        signing_key_id: key_id,
        algorithm: ALGORITHM.into(),
        signed_payload: payload,
        signature,
        create_time: Some(create_time),
    };
    diesel::sql_query(format!(
        "INSERT INTO audit_checkpoints ({CHECKPOINT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
    ))
    .bind::<SqlUuid, _>(Uuid::parse_str(&checkpoint.id).map_err(Error::internal)?)
    .bind::<SqlUuid, _>(entity)
    .bind::<BigInt, _>(sequence)
    .bind::<Text, _>(&checkpoint.head_hash)
    .bind::<Text, _>(&checkpoint.signing_key_id)
    .bind::<Text, _>(&checkpoint.algorithm)
    .bind::<Text, _>(&checkpoint.signed_payload)
    .bind::<Bytea, _>(&checkpoint.signature)
    .bind::<Timestamptz, _>(time_of(&checkpoint.create_time))
    .execute(conn)
    .await
    .map_err(db)?;
    diesel::sql_query(
        "UPDATE audit_chains SET checkpoint_sequence = greatest(checkpoint_sequence, $2) WHERE entity_id = $1",
    )
    .bind::<SqlUuid, _>(entity)
    .bind::<BigInt, _>(sequence)
    .execute(conn)
    .await
    .map_err(db)?;
    Ok(checkpoint)
}

async fn load_subject_keys(conn: &mut AsyncPgConnection, subjects: &[String]) -> Result<Vec<SubjectKeyRow>, Error> {
    diesel::sql_query("SELECT id, subject_id, kek_id, wrapped FROM audit_subject_keys WHERE subject_id = ANY($1)")
        .bind::<Array<Text>, _>(subjects)
        .load(conn)
        .await
        .map_err(db)
}

/// The keys of `subjects` by subject id, created when missing and `create`.
async fn subject_keys(
    conn: &mut AsyncPgConnection,
    keys: &Keys,
    subjects: &[String],
    create: bool,
) -> Result<HashMap<String, (Uuid, SubjectKey)>, Error> {
    if subjects.is_empty() {
        return Ok(HashMap::new());
    }
    let mut rows = load_subject_keys(conn, subjects).await?;
    if create && rows.len() < subjects.len() {
        let known: BTreeSet<&str> = rows.iter().map(|r| r.subject_id.as_str()).collect();
        let (mut ids, mut subject_ids, mut kek_ids, mut wrapped) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for subject in subjects.iter().filter(|s| !known.contains(s.as_str())) {
            let id = Uuid::new_v4();
            let (kek_id, bytes) = keys.wrap(&id.to_string(), subject, &SubjectKey::generate());
            ids.push(id);
            subject_ids.push(subject.clone());
            kek_ids.push(kek_id);
            wrapped.push(bytes);
        }
        diesel::sql_query(
            "INSERT INTO audit_subject_keys (id, subject_id, kek_id, wrapped)
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bytea[]) ON CONFLICT (subject_id) DO NOTHING",
        )
        .bind::<Array<SqlUuid>, _>(ids)
        .bind::<Array<Text>, _>(subject_ids)
        .bind::<Array<Text>, _>(kek_ids)
        .bind::<Array<Bytea>, _>(wrapped)
        .execute(conn)
        .await
        .map_err(db)?;
        rows = load_subject_keys(conn, subjects).await?;
    }
    let mut out = HashMap::new();
    for row in rows {
        let key = keys
            .unwrap(&row.kek_id, &row.id.to_string(), &row.subject_id, &row.wrapped)
            .ok_or_else(|| Error::internal(format!("subject key {} cannot be unwrapped (unknown KEK?)", row.id)))?;
        out.insert(row.subject_id, (row.id, key));
    }
    Ok(out)
}

/// The advisory locks of data subjects, in the order to take them: by key,
/// exclusive (`true`) for the subjects erased, shared for the others.
fn subject_locks<'a>(subjects: impl IntoIterator<Item = (&'a str, bool)>) -> Vec<(i64, bool)> {
    let mut locks: BTreeMap<i64, bool> = BTreeMap::new();
    for (subject, exclusive) in subjects {
        let digest = canonical::sha256(format!("socle-audit-subject\n{subject}").as_bytes());
        let key = i64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
        *locks.entry(key).or_default() |= exclusive;
    }
    locks.into_iter().collect()
}

/// Takes the advisory locks of [`subject_locks`] for the transaction: an
/// erasure waits for the appends of the subject in flight and the other way
/// round, so an append reads the tombstones of the erasures committed before
/// it, and an erasure deletes the keys the appends before it created. Taken
/// after the chain locks, in key order (no deadlock).
async fn lock_subjects(conn: &mut AsyncPgConnection, locks: &[(i64, bool)]) -> Result<(), Error> {
    if locks.is_empty() {
        return Ok(());
    }
    let (keys, exclusive): (Vec<i64>, Vec<bool>) = locks.iter().copied().unzip();
    // `unnest` yields the keys in array order, locked one row at a time.
    diesel::sql_query(
        "SELECT CASE WHEN x THEN pg_advisory_xact_lock(k) ELSE pg_advisory_xact_lock_shared(k) END
           FROM unnest($1::int8[], $2::bool[]) AS u(k, x)",
    )
    .bind::<Array<BigInt>, _>(keys)
    .bind::<Array<diesel::sql_types::Bool>, _>(exclusive)
    .execute(conn)
    .await
    .map_err(db)?;
    Ok(())
}

/// Which of `subjects` are erased (tombstoned).
async fn tombstones(conn: &mut AsyncPgConnection, subjects: &[String]) -> Result<HashSet<String>, Error> {
    if subjects.is_empty() {
        return Ok(HashSet::new());
    }
    let rows: Vec<Tombstone> =
        diesel::sql_query("SELECT subject_id FROM audit_erased_subjects WHERE subject_id = ANY($1)")
            .bind::<Array<Text>, _>(subjects)
            .load(conn)
            .await
            .map_err(db)?;
    Ok(rows.into_iter().map(|r| r.subject_id).collect())
}

/// Erases subjects: deletes their keys and tombstones them (with the event
/// erasing them, if any). Returns the number of keys deleted.
async fn erase(conn: &mut AsyncPgConnection, erasures: Vec<(String, Option<Uuid>)>) -> Result<usize, Error> {
    if erasures.is_empty() {
        return Ok(0);
    }
    let (subjects, events): (Vec<String>, Vec<Option<Uuid>>) = erasures.into_iter().unzip();
    let deleted = diesel::sql_query("DELETE FROM audit_subject_keys WHERE subject_id = ANY($1)")
        .bind::<Array<Text>, _>(&subjects)
        .execute(conn)
        .await
        .map_err(db)?;
    // The first erasure of a subject is kept.
    diesel::sql_query(
        "INSERT INTO audit_erased_subjects (subject_id, event_id)
         SELECT * FROM unnest($1::text[], $2::uuid[]) ON CONFLICT (subject_id) DO NOTHING",
    )
    .bind::<Array<Text>, _>(&subjects)
    .bind::<Array<Nullable<SqlUuid>>, _>(events)
    .execute(conn)
    .await
    .map_err(db)?;
    Ok(deleted)
}

fn sides(change: &FieldChange) -> Result<(Json, Json), Error> {
    let side = |v: &Option<prost_types::Value>| {
        v.as_ref().map(canonical::value_to_json).transpose().map(|v| v.unwrap_or(Json::Null))
    };
    Ok((side(&change.before).map_err(Error::internal)?, side(&change.after).map_err(Error::internal)?))
}

/// Encrypts the personal values of an event (in place). The values of
/// `erased` subjects are stored already erased: sealed under a fresh key,
/// with a fresh key id, that is never stored (reads report them erased).
fn seal(
    event: &mut AuditEvent,
    keys: &HashMap<String, (Uuid, SubjectKey)>,
    erased: &HashSet<String>,
) -> Result<(), Error> {
    for change in event.changes.iter_mut().filter(|c| c.personal_data) {
        let (before, after) = sides(change)?;
        let throwaway;
        let (key_id, key) = if erased.contains(&change.subject_id) {
            throwaway = (Uuid::new_v4(), SubjectKey::generate());
            (&throwaway.0, &throwaway.1)
        } else {
            let (key_id, key) = keys.get(&change.subject_id).ok_or_else(|| Error::internal("subject key missing"))?;
            (key_id, key)
        };
        change.sealed = Some(key.seal(&key_id.to_string(), &event.id, &change.field_path, &before, &after));
        change.before = None;
        change.after = None;
    }
    Ok(())
}

/// What personal values of an erased subject enter the content digest by,
/// in place of their commitment: they cannot be committed to any more (the
/// key is gone), so redeliveries compare everything else.
fn erased_commitment() -> Vec<u8> {
    canonical::sha256(b"socle-audit erased subject v1")
}

/// An event without what the store adds (sequence, record time, hashes),
/// personal values replaced by the commitment `commit` gives: the canonical
/// object the content digest is the hash of.
fn digest_form(
    event: &AuditEvent,
    mut commit: impl FnMut(&FieldChange) -> Result<Vec<u8>, Error>,
) -> Result<Json, Error> {
    let mut copy = event.clone();
    copy.sequence = 0;
    copy.record_time = None;
    copy.prev_hash.clear();
    copy.hash.clear();
    copy.encoding_version = ENCODING_VERSION;
    for change in copy.changes.iter_mut().filter(|c| c.personal_data) {
        let commitment = commit(change)?;
        change.sealed = Some(SealedValues { key_id: String::new(), ciphertext: Vec::new(), commitment });
        change.before = None;
        change.after = None;
    }
    canonical::canonical_json(&copy).map_err(Error::internal)
}

/// What identifies an event's content for redeliveries: its canonical
/// encoding without what the store adds, personal values by commitment
/// under the subject's key, or by [`erased_commitment`] for the `erased`
/// subjects. Tombstones are never removed, so the digest of values stored
/// erased is stable; see [`stored_digest`] for values erased after.
fn content_digest(
    event: &AuditEvent,
    keys: &HashMap<String, (Uuid, SubjectKey)>,
    erased: &HashSet<String>,
) -> Result<(Vec<u8>, Json), Error> {
    let json = digest_form(event, |change| {
        if erased.contains(&change.subject_id) {
            return Ok(erased_commitment());
        }
        let (_, key) = keys.get(&change.subject_id).ok_or_else(|| Error::internal("subject key missing"))?;
        let (before, after) = sides(change)?;
        Ok(key.commit(&event.id, &change.field_path, &before, &after))
    })?;
    Ok((canonical::sha256(canonical::jcs(&json).as_bytes()), json))
}

/// The content digest a redelivery of stored event `id` has when its
/// content is the stored one, with `erased` the subjects erased now: the
/// stored commitments, except for the subjects erased since the event was
/// stored, whose values enter by [`erased_commitment`] (their key is gone:
/// nothing can tell whether the redelivered values are the stored ones).
/// Without erasures since, this is the stored `content_digest`; it is only
/// computed when that differs.
async fn stored_digest(conn: &mut AsyncPgConnection, id: Uuid, erased: &HashSet<String>) -> Result<Vec<u8>, Error> {
    let rows: Vec<EventRow> = diesel::sql_query(format!("SELECT {EVENT_COLUMNS} FROM audit_events WHERE id = $1"))
        .bind::<SqlUuid, _>(id)
        .load(conn)
        .await
        .map_err(db)?;
    let stored = rows.into_iter().next().ok_or_else(|| Error::internal("a stored event disappeared"))?.to_proto();
    let json = digest_form(&stored, |change| {
        if erased.contains(&change.subject_id) {
            return Ok(erased_commitment());
        }
        let sealed = change.sealed.as_ref().ok_or_else(|| Error::internal("stored personal values are not sealed"))?;
        Ok(sealed.commitment.clone())
    })?;
    Ok(canonical::sha256(canonical::jcs(&json).as_bytes()))
}

/// The canonical object of a new event, from its digest form: only what
/// the store added differs (sequence, record time, sealed values), so the
/// object is patched rather than built again (appends are CPU-bound here).
fn finish_canonical(mut json: Json, event: &AuditEvent) -> Result<Json, Error> {
    json["sequence"] = Json::from(event.sequence);
    let record_time = event.record_time.as_ref().map(canonical::format_time).transpose().map_err(Error::internal)?;
    json["record_time"] = record_time.map(Json::String).unwrap_or(Json::Null);
    for (k, change) in event.changes.iter().enumerate().filter(|(_, c)| c.personal_data) {
        json["changes"][k] = canonical::change_to_json(change).map_err(Error::internal)?;
    }
    Ok(json)
}

/// Decrypts the personal values of events read back: `erased` when the
/// subject's key is gone. The sealed form is not returned by reads.
async fn open_all(conn: &mut AsyncPgConnection, keys: &Keys, events: &mut [AuditEvent]) -> Result<(), Error> {
    let key_ids: BTreeSet<Uuid> = events
        .iter()
        .flat_map(|e| {
            e.changes.iter().filter_map(|c| c.sealed.as_ref()).filter_map(|s| Uuid::parse_str(&s.key_id).ok())
        })
        .collect();
    let mut subject_keys: HashMap<String, SubjectKey> = HashMap::new();
    if !key_ids.is_empty() {
        let rows: Vec<SubjectKeyRow> =
            diesel::sql_query("SELECT id, subject_id, kek_id, wrapped FROM audit_subject_keys WHERE id = ANY($1)")
                .bind::<Array<SqlUuid>, _>(key_ids.into_iter().collect::<Vec<_>>())
                .load(conn)
                .await
                .map_err(db)?;
        for row in rows {
            if let Some(key) = keys.unwrap(&row.kek_id, &row.id.to_string(), &row.subject_id, &row.wrapped) {
                subject_keys.insert(row.id.to_string(), key);
            } else {
                tracing::warn!(key_id = %row.id, "a subject key cannot be unwrapped");
            }
        }
    }
    for event in events.iter_mut() {
        let event_id = event.id.clone();
        for change in event.changes.iter_mut() {
            let Some(sealed) = change.sealed.take() else { continue };
            match subject_keys.get(&sealed.key_id) {
                None => change.erased = true,
                Some(key) => match key.open(&sealed, &event_id, &change.field_path) {
                    Some((before, after)) => {
                        change.before = (!before.is_null()).then(|| canonical::json_to_value(&before));
                        change.after = (!after.is_null()).then(|| canonical::json_to_value(&after));
                    }
                    None => {
                        tracing::warn!(event_id = %event_id, field = %change.field_path, "sealed values do not open");
                    }
                },
            }
        }
    }
    Ok(())
}
