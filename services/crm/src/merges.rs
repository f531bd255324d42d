//! Merges of duplicate organisations and contacts, and their undoing
//! (`PreviewOrganizationMerge`, `MergeOrganizations`, `PreviewContactMerge`,
//! `MergeContacts`, `socle.crm.v1.MergeService`).
//!
//! A merge takes the target's values field by field unless the caller chose
//! another record's, unions the repeated fields (addresses, e-mails, phones,
//! consents, tags, external references), moves the sources' affiliations,
//! memberships and interactions to the target and marks the sources
//! `MERGED`. Nothing is destroyed: the merge record keeps the target before
//! and after, and every row it moved, so that an undo puts everything back
//! (keeping the target's later changes). All in one transaction, audited.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use diesel::{
    QueryableByName,
    sql_types::{Array, BigInt, Bytea, Jsonb, Nullable, SmallInt, Text, Timestamptz, Uuid as SqlUuid},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use prost::Message;
use serde_json::{Map, Value as Json, json};
use socle_api::{PageToken, Violations, check_etag, page_size, parse_id};
use socle_db::{DbError, idempotency};
use socle_errors::{Code, Error};
use socle_proto::socle::{
    crm::v1::{merge_service_server::MergeService, *},
    r#type::v1::ActorRef,
};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::{
    common::{Audited, Caller, Crm, audit, etag, reply, rid, timestamp},
    contacts, organizations,
    organizations::scope_ids,
};

/// The fields a merge takes from one record (the default or the choice).
const ORGANIZATION_SCALARS: &[&str] = &[
    "legal_name",
    "trade_name",
    "siret",
    "siren",
    "naf_code",
    "legal_form_code",
    "headcount_band",
    "website",
    "email",
    "phone",
    "description",
];
/// The fields a merge unions (unless a record is chosen for them).
const ORGANIZATION_UNIONS: &[&str] = &["addresses", "tags", "external_refs"];
const CONTACT_SCALARS: &[&str] = &["civility", "given_name", "family_name", "job_title", "address"];
const CONTACT_UNIONS: &[&str] = &["emails", "phones", "consents", "tags", "external_refs"];

impl Audited for Merge {
    const RESOURCE_TYPE: &'static str = "crm.merge";
    fn record_id(&self) -> &str {
        &self.id
    }
    fn owner(&self) -> &str {
        &self.entity_id
    }
}

/// A message as proto3 JSON keyed by proto field names (defaults omitted).
fn to_json<M: prost::Message + prost::Name>(message: &M) -> Map<String, Json> {
    let Some(descriptor) = socle_proto::descriptor_pool().get_message_by_name(&M::full_name()) else {
        return Map::new();
    };
    let Ok(dynamic) = prost_reflect::DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice()) else {
        return Map::new();
    };
    let options = prost_reflect::SerializeOptions::new().use_proto_field_name(true);
    match dynamic.serialize_with_options(serde_json::value::Serializer, &options) {
        Ok(Json::Object(map)) => map,
        _ => Map::new(),
    }
}

/// The message of a proto3 JSON object (proto or JSON field names).
fn from_json<M: prost::Message + prost::Name + Default>(map: Map<String, Json>) -> Result<M, Error> {
    let descriptor = socle_proto::descriptor_pool()
        .get_message_by_name(&M::full_name())
        .ok_or_else(|| Error::internal("message descriptor missing"))?;
    let dynamic = prost_reflect::DynamicMessage::deserialize(descriptor, Json::Object(map)).map_err(Error::internal)?;
    dynamic.transcode_to::<M>().map_err(Error::internal)
}

fn to_value(json: &Json) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match json {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(*b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Json::String(s) => Kind::StringValue(s.clone()),
        Json::Array(items) => Kind::ListValue(prost_types::ListValue { values: items.iter().map(to_value).collect() }),
        Json::Object(map) => Kind::StructValue(prost_types::Struct {
            fields: map.iter().map(|(k, v)| (k.clone(), to_value(v))).collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

fn empty(value: Option<&Json>) -> bool {
    match value {
        None | Some(Json::Null) => true,
        Some(Json::String(s)) => s.is_empty(),
        Some(Json::Array(a)) => a.is_empty(),
        Some(Json::Object(o)) => o.is_empty(),
        Some(_) => false,
    }
}

/// One record taking part in a merge, as JSON.
struct Part {
    id: Uuid,
    json: Map<String, Json>,
}

/// The merged record and the preview of each field.
struct Plan {
    merged: Map<String, Json>,
    fields: Vec<MergeFieldPreview>,
}

/// The identity of an item of a repeated field, for unions.
fn item_key(field: &str, item: &Json) -> String {
    let text = |path: &[&str]| {
        let mut v = item;
        for p in path {
            v = v.get(*p).unwrap_or(&Json::Null);
        }
        v.as_str().map(|s| s.to_lowercase()).unwrap_or_else(|| v.to_string())
    };
    match field {
        "addresses" => format!(
            "{}|{}|{}",
            text(&["kind"]),
            text(&["address", "postal_code"]),
            crate::common::sql_fold(&text(&["address", "street_line"]))
        ),
        "emails" => text(&["address"]),
        "phones" => text(&["number"]),
        "consents" => format!("{}|{}", text(&["topic"]), text(&["channel"])),
        _ => item.as_str().map(str::to_owned).unwrap_or_else(|| item.to_string()),
    }
}

/// The union of a repeated (or map) field over the records, first seen
/// first; a single `primary` kept (the first); for consents, the latest
/// decision per topic and channel.
fn union(field: &str, values: &[&Json]) -> Json {
    if field == "external_refs" {
        let mut out = Map::new();
        for value in values {
            if let Json::Object(map) = value {
                for (k, v) in map {
                    out.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
        }
        return Json::Object(out);
    }
    let mut out: Vec<Json> = Vec::new();
    let mut keys: Vec<String> = Vec::new();
    for value in values {
        for item in value.as_array().into_iter().flatten() {
            let key = item_key(field, item);
            match keys.iter().position(|k| *k == key) {
                Some(i) if field == "consents" => {
                    let newer =
                        item["record_time"].as_str().unwrap_or("") > out[i]["record_time"].as_str().unwrap_or("");
                    if newer {
                        out[i] = item.clone();
                    }
                }
                Some(_) => {}
                None => {
                    keys.push(key);
                    out.push(item.clone());
                }
            }
        }
    }
    if matches!(field, "addresses" | "emails" | "phones") {
        let mut seen = false;
        for item in &mut out {
            if let Some(obj) = item.as_object_mut() {
                let primary = obj.get("primary").and_then(Json::as_bool).unwrap_or(false) && !seen;
                seen |= primary;
                if primary {
                    obj.insert("primary".into(), Json::Bool(true));
                } else {
                    obj.remove("primary");
                }
            }
        }
    }
    Json::Array(out)
}

/// Computes the merged record: `parts[0]` is the target, the sources follow
/// most recently updated first.
fn plan(scalars: &[&str], unions: &[&str], parts: &[Part], choices: &[MergeFieldChoice]) -> Result<Plan, Error> {
    let mut v = Violations::new();
    let mut chosen: HashMap<&str, Uuid> = HashMap::new();
    for (i, choice) in choices.iter().enumerate() {
        if !scalars.contains(&choice.field_path.as_str()) && !unions.contains(&choice.field_path.as_str()) {
            v.add(format!("field_choices[{i}].field_path"), "champ non fusionnable");
            continue;
        }
        match Uuid::parse_str(&choice.record_id).ok().filter(|id| parts.iter().any(|p| p.id == *id)) {
            Some(id) => {
                chosen.insert(
                    scalars.iter().chain(unions).find(|f| **f == choice.field_path).copied().unwrap_or_default(),
                    id,
                );
            }
            None => v.add(format!("field_choices[{i}].record_id"), "doit être la cible ou l'une des sources"),
        }
    }
    v.into_result()?;
    let mut merged = parts[0].json.clone();
    let mut fields = Vec::new();
    let value_of = |id: Uuid, field: &str| parts.iter().find(|p| p.id == id).and_then(|p| p.json.get(field)).cloned();
    // The SIREN follows the SIRET's record unless chosen on its own.
    let siret_record = chosen.get("siret").copied();
    for field in scalars {
        let explicit = chosen.get(field).copied().or(if *field == "siren" { siret_record } else { None });
        let from = explicit.or_else(|| parts.iter().find(|p| !empty(p.json.get(*field))).map(|p| p.id));
        let from = from.unwrap_or(parts[0].id);
        match value_of(from, field) {
            Some(value) if !empty(Some(&value)) => merged.insert((*field).to_owned(), value),
            _ => merged.remove(*field),
        };
        let values: Vec<&Json> = parts.iter().filter_map(|p| p.json.get(*field)).filter(|v| !empty(Some(v))).collect();
        let conflicting = values.windows(2).any(|w| w[0] != w[1]);
        fields.push(MergeFieldPreview {
            field_path: (*field).to_owned(),
            values: parts
                .iter()
                .map(|p| MergeFieldValue {
                    record_id: p.id.to_string(),
                    value: Some(to_value(p.json.get(*field).unwrap_or(&Json::Null))),
                })
                .collect(),
            chosen_record_id: from.to_string(),
            conflicting,
        });
    }
    for field in unions {
        let value = match chosen.get(field) {
            Some(id) => value_of(*id, field).unwrap_or(Json::Null),
            None => union(field, &parts.iter().filter_map(|p| p.json.get(*field)).collect::<Vec<_>>()),
        };
        if empty(Some(&value)) {
            merged.remove(*field);
        } else {
            merged.insert((*field).to_owned(), value);
        }
        let values: Vec<&Json> = parts.iter().filter_map(|p| p.json.get(*field)).filter(|v| !empty(Some(v))).collect();
        fields.push(MergeFieldPreview {
            field_path: (*field).to_owned(),
            values: parts
                .iter()
                .map(|p| MergeFieldValue {
                    record_id: p.id.to_string(),
                    value: Some(to_value(p.json.get(*field).unwrap_or(&Json::Null))),
                })
                .collect(),
            chosen_record_id: chosen.get(field).map(Uuid::to_string).unwrap_or_default(),
            conflicting: values.windows(2).any(|w| w[0] != w[1]),
        });
    }
    Ok(Plan { merged, fields })
}

/// The record ids of a merge request, validated: 1 to 10 distinct sources,
/// none the target.
fn ids(target: &str, sources: &[String], field: &str) -> Result<(Uuid, Vec<Uuid>), Error> {
    let mut v = Violations::new();
    let target = parse_id(field, target);
    let mut ids = Vec::new();
    for (i, s) in sources.iter().enumerate() {
        match Uuid::parse_str(s) {
            Ok(id) if ids.contains(&id) => v.add(format!("source_ids[{i}]"), "source en double"),
            Ok(id) if target.as_ref().is_ok_and(|t| *t == id) => {
                v.add(format!("source_ids[{i}]"), "la cible ne peut pas être une source")
            }
            Ok(id) => ids.push(id),
            Err(_) => v.add(format!("source_ids[{i}]"), "doit être un UUID"),
        }
    }
    v.check((1..=10).contains(&sources.len()), "source_ids", "de 1 à 10 sources");
    if let Err(e) = &target {
        for violation in e.violations() {
            v.add(violation.field.clone(), violation.description.clone());
        }
    }
    v.into_result()?;
    Ok((target?, ids))
}

#[derive(QueryableByName)]
struct MovedRow {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    src: Uuid,
}

/// Moves the rows of `table` whose `column` names a source to the target,
/// returning what moved (for the undo). `table` and `column` are constants.
async fn move_rows(
    conn: &mut AsyncPgConnection,
    table: &'static str,
    column: &'static str,
    sources: &[Uuid],
    target: Uuid,
) -> Result<Vec<Json>, Error> {
    let rows: Vec<MovedRow> = diesel::sql_query(format!(
        "WITH moved AS (SELECT id, {column} AS src FROM {table} WHERE {column} = ANY($1) FOR UPDATE)
         UPDATE {table} t SET {column} = $2 FROM moved WHERE t.id = moved.id RETURNING t.id, moved.src"
    ))
    .bind::<Array<SqlUuid>, _>(sources)
    .bind::<SqlUuid, _>(target)
    .load(conn)
    .await
    .map_err(DbError::from)?;
    Ok(rows.into_iter().map(|r| json!({ "table": table, "column": column, "id": r.id, "from": r.src })).collect())
}

#[derive(QueryableByName)]
struct Participation {
    #[diesel(sql_type = SqlUuid)]
    interaction_id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    contact_id: Uuid,
}

/// Moves the sources' interaction participations to the target; where the
/// target already takes part (or another source moved there first), the
/// source's row is removed instead. Returns what changed, for the undo.
async fn move_participations(conn: &mut AsyncPgConnection, sources: &[Uuid], target: Uuid) -> Result<Vec<Json>, Error> {
    let mut all = sources.to_vec();
    all.push(target);
    let rows: Vec<Participation> = diesel::sql_query(
        "SELECT interaction_id, contact_id FROM interaction_contacts WHERE contact_id = ANY($1)
          ORDER BY interaction_id, contact_id FOR UPDATE",
    )
    .bind::<Array<SqlUuid>, _>(&all)
    .load(conn)
    .await
    .map_err(DbError::from)?;
    let mut present: std::collections::HashSet<Uuid> =
        rows.iter().filter(|r| r.contact_id == target).map(|r| r.interaction_id).collect();
    let (mut moved_i, mut moved_c, mut deleted_i, mut deleted_c, mut log) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for row in rows.iter().filter(|r| r.contact_id != target) {
        if present.insert(row.interaction_id) {
            moved_i.push(row.interaction_id);
            moved_c.push(row.contact_id);
            log.push(json!({ "table": "interaction_contacts", "interaction_id": row.interaction_id, "from": row.contact_id }));
        } else {
            deleted_i.push(row.interaction_id);
            deleted_c.push(row.contact_id);
            log.push(json!({ "table": "interaction_contacts", "interaction_id": row.interaction_id,
                             "from": row.contact_id, "deleted": true }));
        }
    }
    diesel::sql_query(
        "DELETE FROM interaction_contacts ic USING unnest($1::uuid[], $2::uuid[]) AS d(i, c)
          WHERE ic.interaction_id = d.i AND ic.contact_id = d.c",
    )
    .bind::<Array<SqlUuid>, _>(deleted_i)
    .bind::<Array<SqlUuid>, _>(deleted_c)
    .execute(conn)
    .await
    .map_err(DbError::from)?;
    diesel::sql_query(
        "UPDATE interaction_contacts ic SET contact_id = $3 FROM unnest($1::uuid[], $2::uuid[]) AS m(i, c)
          WHERE ic.interaction_id = m.i AND ic.contact_id = m.c",
    )
    .bind::<Array<SqlUuid>, _>(moved_i)
    .bind::<Array<SqlUuid>, _>(moved_c)
    .bind::<SqlUuid, _>(target)
    .execute(conn)
    .await
    .map_err(DbError::from)?;
    Ok(log)
}

#[derive(QueryableByName)]
struct ImpactRow {
    #[diesel(sql_type = BigInt)]
    affiliations: i64,
    #[diesel(sql_type = BigInt)]
    memberships: i64,
    #[diesel(sql_type = BigInt)]
    interactions: i64,
    #[diesel(sql_type = BigInt)]
    overlapping: i64,
}

/// What a merge of `sources` would move, in one statement.
async fn impact(
    conn: &mut AsyncPgConnection,
    kind: RecordKind,
    sources: &[Uuid],
    target: Uuid,
) -> Result<MergeImpact, Error> {
    let sql = match kind {
        RecordKind::Organization => {
            "SELECT (SELECT count(*) FROM affiliations WHERE organization_id = ANY($1)) AS affiliations,
                    (SELECT count(*) FROM memberships WHERE organization_id = ANY($1)) AS memberships,
                    (SELECT count(*) FROM interactions WHERE organization_id = ANY($1)) AS interactions,
                    (SELECT count(*) FROM memberships s JOIN memberships t ON t.organization_id = $2
                      WHERE s.organization_id = ANY($1) AND s.cancel_date IS NULL AND t.cancel_date IS NULL
                        AND s.start_date <= t.end_date AND t.start_date <= s.end_date) AS overlapping"
        }
        _ => {
            "SELECT (SELECT count(*) FROM affiliations WHERE contact_id = ANY($1)) AS affiliations,
                    0::bigint AS memberships,
                    (SELECT count(*) FROM interaction_contacts WHERE contact_id = ANY($1)) AS interactions,
                    0::bigint AS overlapping"
        }
    };
    let row: ImpactRow = diesel::sql_query(sql)
        .bind::<Array<SqlUuid>, _>(sources)
        .bind::<SqlUuid, _>(target)
        .get_result(conn)
        .await
        .map_err(DbError::from)?;
    let mut warnings = Vec::new();
    if row.overlapping > 0 {
        warnings.push(format!(
            "{} période(s) d'adhésion des sources chevauchent celles de la cible : vérifiez les cotisations",
            row.overlapping
        ));
    }
    Ok(MergeImpact {
        affiliation_count: row.affiliations as i32,
        membership_count: row.memberships as i32,
        interaction_count: row.interactions as i32,
        warnings,
    })
}

/// Loads the target and the sources of a merge (visible in the scope, all
/// active and in one entity), target first then the sources most recently
/// updated first.
async fn load_parts<M: prost::Message + prost::Name + Clone>(
    target: (Uuid, Option<M>),
    sources: Vec<(Uuid, Option<M>)>,
    what: &str,
    state_of: fn(&M) -> i32,
    entity_of: fn(&M) -> &str,
    updated: fn(&M) -> i64,
) -> Result<(M, Vec<M>), Error> {
    let mut v = Violations::new();
    let Some(target_record) = target.1 else {
        return Err(Error::new(Code::NotFound, format!("{what} not found")));
    };
    if state_of(&target_record) != 1 {
        return Err(Error::new(Code::FailedPrecondition, "la cible n'est pas active (fusionnée ou effacée)"));
    }
    let mut records = Vec::new();
    for (i, (_, record)) in sources.into_iter().enumerate() {
        match record {
            None => v.add(format!("source_ids[{i}]"), format!("{what} introuvable")),
            Some(r) if state_of(&r) != 1 => {
                v.add(format!("source_ids[{i}]"), "n'est pas active (fusionnée ou effacée)")
            }
            Some(r) if entity_of(&r) != entity_of(&target_record) => {
                v.add(format!("source_ids[{i}]"), "appartient à une autre entité que la cible")
            }
            Some(r) => records.push(r),
        }
    }
    v.into_result()?;
    records.sort_by_key(|r| std::cmp::Reverse(updated(r)));
    Ok((target_record, records))
}

fn updated_org(o: &Organization) -> i64 {
    o.update_time.as_ref().map_or(0, |t| t.seconds * 1_000_000_000 + i64::from(t.nanos))
}

fn updated_contact(c: &Contact) -> i64 {
    c.update_time.as_ref().map_or(0, |t| t.seconds * 1_000_000_000 + i64::from(t.nanos))
}

fn check_etags(etags: &std::collections::HashMap<String, String>, records: &[(String, String)]) -> Result<(), Error> {
    let mut v = Violations::new();
    for (id, current) in records {
        match etags.get(id) {
            None => v.add(format!("etags[{id}]"), "l'etag de chaque fiche prévisualisée est obligatoire"),
            Some(given) if given != current => return Err(Error::etag_mismatch()),
            Some(_) => {}
        }
    }
    v.into_result()
}

/// One row of `merges`.
#[derive(QueryableByName)]
struct MergeRow {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    entity_id: Uuid,
    #[diesel(sql_type = SmallInt)]
    record_kind: i16,
    #[diesel(sql_type = SqlUuid)]
    target_id: Uuid,
    #[diesel(sql_type = Array<SqlUuid>)]
    source_ids: Vec<Uuid>,
    #[diesel(sql_type = Jsonb)]
    field_choices: Json,
    #[diesel(sql_type = Jsonb)]
    impact: Json,
    #[diesel(sql_type = Bytea)]
    target_before: Vec<u8>,
    #[diesel(sql_type = Bytea)]
    target_after: Vec<u8>,
    #[diesel(sql_type = Jsonb)]
    moved: Json,
    #[diesel(sql_type = SmallInt)]
    state: i16,
    #[diesel(sql_type = SmallInt)]
    creator_kind: i16,
    #[diesel(sql_type = Text)]
    creator_id: String,
    #[diesel(sql_type = SmallInt)]
    undoer_kind: i16,
    #[diesel(sql_type = Text)]
    undoer_id: String,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    undo_time: Option<DateTime<Utc>>,
    #[diesel(sql_type = BigInt)]
    version: i64,
    #[diesel(sql_type = Timestamptz)]
    create_time: DateTime<Utc>,
    #[diesel(sql_type = Timestamptz)]
    update_time: DateTime<Utc>,
    /// Why the merge cannot be undone any more (computed), empty when it can.
    #[diesel(sql_type = Text)]
    blocker: String,
}

/// The columns of [`MergeRow`] over `merges m`, with the undo blocker
/// computed in the same statement.
const MERGE_COLUMNS: &str = "m.id, m.entity_id, m.record_kind, m.target_id, m.source_ids, m.field_choices, m.impact,
    m.target_before, m.target_after, m.moved, m.state, m.creator_kind, m.creator_id, m.undoer_kind, m.undoer_id,
    m.undo_time, m.version, m.create_time, m.update_time,
    CASE
      WHEN m.state = 2 THEN 'la fusion a déjà été annulée'
      WHEN m.record_kind = 1 AND NOT EXISTS (SELECT 1 FROM organizations t WHERE t.id = m.target_id AND t.state = 1)
        THEN 'la fiche cible a été supprimée ou fusionnée depuis'
      WHEN m.record_kind = 2 AND NOT EXISTS (SELECT 1 FROM contacts t WHERE t.id = m.target_id AND t.state = 1)
        THEN 'la fiche cible a été supprimée, fusionnée ou effacée depuis'
      WHEN m.record_kind = 1 AND (SELECT count(*) FROM organizations s WHERE s.id = ANY(m.source_ids)
                                     AND s.state = 2 AND s.merged_into_id = m.target_id) < cardinality(m.source_ids)
        THEN 'une fiche source a été supprimée depuis'
      WHEN m.record_kind = 2 AND (SELECT count(*) FROM contacts s WHERE s.id = ANY(m.source_ids)
                                     AND s.state = 2 AND s.merged_into_id = m.target_id) < cardinality(m.source_ids)
        THEN 'une fiche source a été supprimée ou effacée depuis'
      ELSE ''
    END AS blocker";

fn actor(kind: i16, id: &str) -> Option<ActorRef> {
    (kind != 0).then(|| ActorRef { kind: i32::from(kind), id: id.to_owned(), display_name: String::new() })
}

impl MergeRow {
    fn to_proto(&self) -> Merge {
        let choices: Vec<(String, String)> = serde_json::from_value(self.field_choices.clone()).unwrap_or_default();
        let impact = &self.impact;
        Merge {
            id: self.id.to_string(),
            entity_id: self.entity_id.to_string(),
            record_kind: i32::from(self.record_kind),
            target_id: self.target_id.to_string(),
            source_ids: self.source_ids.iter().map(Uuid::to_string).collect(),
            field_choices: choices
                .into_iter()
                .map(|(field_path, record_id)| MergeFieldChoice { field_path, record_id })
                .collect(),
            impact: Some(MergeImpact {
                affiliation_count: impact["affiliation_count"].as_i64().unwrap_or(0) as i32,
                membership_count: impact["membership_count"].as_i64().unwrap_or(0) as i32,
                interaction_count: impact["interaction_count"].as_i64().unwrap_or(0) as i32,
                warnings: serde_json::from_value(impact["warnings"].clone()).unwrap_or_default(),
            }),
            state: i32::from(self.state),
            undoable: self.blocker.is_empty(),
            not_undoable_reason: self.blocker.clone(),
            creator: actor(self.creator_kind, &self.creator_id),
            undoer: actor(self.undoer_kind, &self.undoer_id),
            undo_time: self.undo_time.map(timestamp),
            create_time: Some(timestamp(self.create_time)),
            update_time: Some(timestamp(self.update_time)),
            etag: etag(self.version),
        }
    }
}

async fn load_merge(conn: &mut AsyncPgConnection, id: Uuid, lock: bool) -> Result<Option<MergeRow>, Error> {
    let lock = if lock { " FOR UPDATE OF m" } else { "" };
    let rows: Vec<MergeRow> = diesel::sql_query(format!("SELECT {MERGE_COLUMNS} FROM merges m WHERE m.id = $1{lock}"))
        .bind::<SqlUuid, _>(id)
        .load(conn)
        .await
        .map_err(DbError::from)?;
    Ok(rows.into_iter().next())
}

/// The merges a record took part in, as target or source, newest first.
pub(crate) async fn involving(conn: &mut AsyncPgConnection, record: Uuid) -> Result<Vec<Merge>, Error> {
    let rows: Vec<MergeRow> = diesel::sql_query(format!(
        "SELECT {MERGE_COLUMNS} FROM merges m WHERE m.target_id = $1 OR $1 = ANY(m.source_ids)
          ORDER BY m.create_time DESC, m.id DESC"
    ))
    .bind::<SqlUuid, _>(record)
    .load(conn)
    .await
    .map_err(DbError::from)?;
    Ok(rows.iter().map(MergeRow::to_proto).collect())
}

/// Records a merge.
#[allow(clippy::too_many_arguments)]
async fn insert_merge(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    entity: Uuid,
    kind: RecordKind,
    target: Uuid,
    sources: &[Uuid],
    choices: &[MergeFieldChoice],
    impact: &MergeImpact,
    before: Vec<u8>,
    after: Vec<u8>,
    moved: Vec<Json>,
    creator: &ActorRef,
) -> Result<Merge, Error> {
    let choices: Vec<(String, String)> = choices.iter().map(|c| (c.field_path.clone(), c.record_id.clone())).collect();
    let impact = json!({ "affiliation_count": impact.affiliation_count, "membership_count": impact.membership_count,
                         "interaction_count": impact.interaction_count, "warnings": impact.warnings });
    diesel::sql_query(
        "INSERT INTO merges (id, entity_id, record_kind, target_id, source_ids, field_choices, impact, target_before,
                             target_after, moved, creator_kind, creator_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind::<SqlUuid, _>(id)
    .bind::<SqlUuid, _>(entity)
    .bind::<SmallInt, _>(kind as i16)
    .bind::<SqlUuid, _>(target)
    .bind::<Array<SqlUuid>, _>(sources)
    .bind::<Jsonb, _>(serde_json::to_value(choices).unwrap_or_default())
    .bind::<Jsonb, _>(impact)
    .bind::<Bytea, _>(before)
    .bind::<Bytea, _>(after)
    .bind::<Jsonb, _>(Json::Array(moved))
    .bind::<SmallInt, _>(creator.kind as i16)
    .bind::<Text, _>(&creator.id)
    .execute(conn)
    .await
    .map_err(DbError::from)?;
    let merge = load_merge(conn, id, false).await?.ok_or_else(|| Error::internal("merge not found"))?.to_proto();
    audit(conn, "crm.merges.create", None, Some(&merge)).await?;
    Ok(merge)
}

/// Marks the sources `MERGED` into the target (audited one by one).
async fn mark_sources(
    conn: &mut AsyncPgConnection,
    kind: RecordKind,
    sources: &[Uuid],
    target: Uuid,
) -> Result<(), Error> {
    let table = if kind == RecordKind::Organization { "organizations" } else { "contacts" };
    diesel::sql_query(format!(
        "UPDATE {table} SET state = 2, merged_into_id = $2, version = version + 1, update_time = now()
          WHERE id = ANY($1)"
    ))
    .bind::<Array<SqlUuid>, _>(sources)
    .bind::<SqlUuid, _>(target)
    .execute(conn)
    .await
    .map_err(DbError::from)?;
    Ok(())
}

impl Crm {
    /// The parts of an organisation merge, loaded in the transaction.
    async fn organization_parts(
        conn: &mut AsyncPgConnection,
        target: Uuid,
        sources: &[Uuid],
    ) -> Result<(Organization, Vec<Organization>), Error> {
        let mut all = vec![target];
        all.extend_from_slice(sources);
        let rows = organizations::load_many(conn, &all).await?;
        let find = |id: Uuid| rows.iter().find(|r| r.id == id).map(organizations::OrganizationRow::to_proto);
        load_parts(
            (target, find(target)),
            sources.iter().map(|s| (*s, find(*s))).collect(),
            "organisation",
            |o| o.state,
            |o| &o.entity_id,
            updated_org,
        )
        .await
    }

    async fn contact_parts(
        conn: &mut AsyncPgConnection,
        target: Uuid,
        sources: &[Uuid],
    ) -> Result<(Contact, Vec<Contact>), Error> {
        let mut all = vec![target];
        all.extend_from_slice(sources);
        let rows = contacts::load_many(conn, &all).await?;
        let find = |id: Uuid| rows.iter().find(|r| r.id == id).map(contacts::ContactRow::to_proto);
        load_parts(
            (target, find(target)),
            sources.iter().map(|s| (*s, find(*s))).collect(),
            "contact",
            |c| c.state,
            |c| &c.entity_id,
            updated_contact,
        )
        .await
    }

    /// `PreviewOrganizationMerge`.
    pub async fn preview_organization_merge(
        &self,
        caller: &Caller,
        r: PreviewOrganizationMergeRequest,
    ) -> Result<PreviewOrganizationMergeResponse, Error> {
        let (target, sources) = ids(&r.organization_id, &r.source_organization_ids, "organization_id")?;
        let scope = self.scope(caller, "crm.organizations.merge").await?;
        let choices = r.field_choices;
        let result = self
            .db
            .transaction(&scope, move |conn| {
                Box::pin(async move {
                    let (t, s) = Crm::organization_parts(conn, target, &sources).await?;
                    let parts = parts_of(&t, &s, |o| &o.id);
                    let plan = plan(ORGANIZATION_SCALARS, ORGANIZATION_UNIONS, &parts, &choices)?;
                    let mut merged: Organization = overlay(&t, plan.merged)?;
                    merged.etag.clear();
                    let mut impact = impact(conn, RecordKind::Organization, &sources, target).await?;
                    let sirets: std::collections::BTreeSet<&str> =
                        std::iter::once(&t).chain(&s).map(|o| o.siret.as_str()).filter(|x| !x.is_empty()).collect();
                    if sirets.len() > 1 {
                        impact.warnings.push(format!(
                            "les fiches ont {} SIRET différents : ce sont peut-être des établissements distincts",
                            sirets.len()
                        ));
                    }
                    let etags = std::iter::once(&t).chain(&s).map(|o| (o.id.clone(), o.etag.clone())).collect();
                    Ok::<_, Error>(PreviewOrganizationMergeResponse {
                        merged_organization: Some(merged),
                        fields: plan.fields,
                        impact: Some(impact),
                        etags,
                    })
                })
            })
            .await;
        self.hidden_target(result, caller, "organizations", target, "crm.organizations.merge", "organization").await
    }

    /// `MergeOrganizations`.
    pub async fn merge_organizations(
        &self,
        caller: &Caller,
        r: MergeOrganizationsRequest,
    ) -> Result<MergeOrganizationsResponse, Error> {
        let key = parse_id("request_id", &r.request_id)?;
        let (target, sources) = ids(&r.organization_id, &r.source_organization_ids, "organization_id")?;
        let scope = self.scope(caller, "crm.organizations.merge").await?;
        let creator = socle_server::audit::actor(caller.principal.as_ref());
        let (choices, etags) = (r.field_choices, r.etags);
        let result = self
            .db
            .transaction(&scope, move |conn| {
                Box::pin(async move {
                    let merge_id = match idempotency::claim(conn, "MergeOrganizations", key, Uuid::now_v7()).await? {
                        idempotency::Claim::Existing(id) => {
                            let merge = load_merge(conn, id, false).await?.ok_or_else(|| {
                                Error::new(Code::AlreadyExists, "this request_id was used for another record")
                            })?;
                            let target = organizations::load(conn, merge.target_id).await?;
                            return Ok(MergeOrganizationsResponse {
                                organization: target.map(|t| t.to_proto()),
                                merge: Some(merge.to_proto()),
                            });
                        }
                        idempotency::Claim::New(id) => id,
                    };
                    lock(conn, "organizations", target, &sources).await?;
                    let (t, s) = Crm::organization_parts(conn, target, &sources).await?;
                    check_etags(
                        &etags,
                        &std::iter::once(&t).chain(&s).map(|o| (o.id.clone(), o.etag.clone())).collect::<Vec<_>>(),
                    )?;
                    let parts = parts_of(&t, &s, |o| &o.id);
                    let plan = plan(ORGANIZATION_SCALARS, ORGANIZATION_UNIONS, &parts, &choices)?;
                    let merged: Organization = overlay(&t, plan.merged)?;
                    let input = organizations::validate(&merged, "organization", true)?;
                    let impact = impact(conn, RecordKind::Organization, &sources, target).await?;
                    organizations::write(conn, target, version_of(&t.etag), &input).await?;
                    let mut moved = move_rows(conn, "affiliations", "organization_id", &sources, target).await?;
                    moved.extend(move_rows(conn, "memberships", "organization_id", &sources, target).await?);
                    moved.extend(move_rows(conn, "interactions", "organization_id", &sources, target).await?);
                    mark_sources(conn, RecordKind::Organization, &sources, target).await?;
                    refresh_memberships(conn, target, &sources).await?;
                    let after =
                        organizations::load(conn, target).await?.ok_or_else(|| Error::internal("target gone"))?;
                    let after = after.to_proto();
                    let entity = parse_id("organization.entity_id", &t.entity_id)?;
                    let merge = insert_merge(
                        conn,
                        merge_id,
                        entity,
                        RecordKind::Organization,
                        target,
                        &sources,
                        &choices,
                        &impact,
                        t.encode_to_vec(),
                        after.encode_to_vec(),
                        moved,
                        &creator,
                    )
                    .await?;
                    crate::duplicates::resolve_merged(
                        conn,
                        RecordKind::Organization,
                        target,
                        &sources,
                        merge_id,
                        &creator,
                    )
                    .await?;
                    audit(conn, "crm.organizations.merge", Some(&t), Some(&after)).await?;
                    for before in &s {
                        let now = organizations::load(conn, parse_id("id", &before.id)?).await?;
                        audit(conn, "crm.organizations.merge", Some(before), now.map(|n| n.to_proto()).as_ref())
                            .await?;
                    }
                    Ok(MergeOrganizationsResponse { organization: Some(after), merge: Some(merge) })
                })
            })
            .await;
        self.hidden_target(result, caller, "organizations", target, "crm.organizations.merge", "organization").await
    }

    /// `PreviewContactMerge`.
    pub async fn preview_contact_merge(
        &self,
        caller: &Caller,
        r: PreviewContactMergeRequest,
    ) -> Result<PreviewContactMergeResponse, Error> {
        let (target, sources) = ids(&r.contact_id, &r.source_contact_ids, "contact_id")?;
        let scope = self.scope(caller, "crm.contacts.merge").await?;
        let choices = r.field_choices;
        let result = self
            .db
            .transaction(&scope, move |conn| {
                Box::pin(async move {
                    let (t, s) = Crm::contact_parts(conn, target, &sources).await?;
                    let parts = parts_of(&t, &s, |c| &c.id);
                    let plan = plan(CONTACT_SCALARS, CONTACT_UNIONS, &parts, &choices)?;
                    let mut merged: Contact = overlay(&t, plan.merged)?;
                    merged.etag.clear();
                    let impact = impact(conn, RecordKind::Contact, &sources, target).await?;
                    let etags = std::iter::once(&t).chain(&s).map(|c| (c.id.clone(), c.etag.clone())).collect();
                    Ok::<_, Error>(PreviewContactMergeResponse {
                        merged_contact: Some(merged),
                        fields: plan.fields,
                        impact: Some(impact),
                        etags,
                    })
                })
            })
            .await;
        self.hidden_target(result, caller, "contacts", target, "crm.contacts.merge", "contact").await
    }

    /// `MergeContacts`.
    pub async fn merge_contacts(
        &self,
        caller: &Caller,
        r: MergeContactsRequest,
    ) -> Result<MergeContactsResponse, Error> {
        let key = parse_id("request_id", &r.request_id)?;
        let (target, sources) = ids(&r.contact_id, &r.source_contact_ids, "contact_id")?;
        let scope = self.scope(caller, "crm.contacts.merge").await?;
        let creator = socle_server::audit::actor(caller.principal.as_ref());
        let (choices, etags) = (r.field_choices, r.etags);
        let result = self
            .db
            .transaction(&scope, move |conn| {
                Box::pin(async move {
                    let merge_id = match idempotency::claim(conn, "MergeContacts", key, Uuid::now_v7()).await? {
                        idempotency::Claim::Existing(id) => {
                            let merge = load_merge(conn, id, false).await?.ok_or_else(|| {
                                Error::new(Code::AlreadyExists, "this request_id was used for another record")
                            })?;
                            let target = contacts::load(conn, merge.target_id).await?;
                            return Ok(MergeContactsResponse {
                                contact: target.map(|t| t.to_proto()),
                                merge: Some(merge.to_proto()),
                            });
                        }
                        idempotency::Claim::New(id) => id,
                    };
                    lock(conn, "contacts", target, &sources).await?;
                    let (t, s) = Crm::contact_parts(conn, target, &sources).await?;
                    check_etags(
                        &etags,
                        &std::iter::once(&t).chain(&s).map(|c| (c.id.clone(), c.etag.clone())).collect::<Vec<_>>(),
                    )?;
                    let parts = parts_of(&t, &s, |c| &c.id);
                    let plan = plan(CONTACT_SCALARS, CONTACT_UNIONS, &parts, &choices)?;
                    let merged: Contact = overlay(&t, plan.merged)?;
                    let input = contacts::validate(&merged, "contact", true)?;
                    let impact = impact(conn, RecordKind::Contact, &sources, target).await?;
                    // The sources leave the duplicate keys first (their
                    // e-mails now belong to the target).
                    mark_sources(conn, RecordKind::Contact, &sources, target).await?;
                    contacts::write(conn, target, version_of(&t.etag), &input).await?;
                    let mut moved = move_rows(conn, "affiliations", "contact_id", &sources, target).await?;
                    moved.extend(move_participations(conn, &sources, target).await?);
                    let after = contacts::load(conn, target).await?.ok_or_else(|| Error::internal("target gone"))?;
                    let after = after.to_proto();
                    let entity = parse_id("contact.entity_id", &t.entity_id)?;
                    let merge = insert_merge(
                        conn,
                        merge_id,
                        entity,
                        RecordKind::Contact,
                        target,
                        &sources,
                        &choices,
                        &impact,
                        t.encode_to_vec(),
                        after.encode_to_vec(),
                        moved,
                        &creator,
                    )
                    .await?;
                    crate::duplicates::resolve_merged(conn, RecordKind::Contact, target, &sources, merge_id, &creator)
                        .await?;
                    audit(conn, "crm.contacts.merge", Some(&t), Some(&after)).await?;
                    for before in &s {
                        let now = contacts::load(conn, parse_id("id", &before.id)?).await?;
                        audit(conn, "crm.contacts.merge", Some(before), now.map(|n| n.to_proto()).as_ref()).await?;
                    }
                    Ok(MergeContactsResponse { contact: Some(after), merge: Some(merge) })
                })
            })
            .await;
        self.hidden_target(result, caller, "contacts", target, "crm.contacts.merge", "contact").await
    }

    /// A target hidden by row-level security is audited like a record check.
    async fn hidden_target<T>(
        &self,
        result: Result<T, Error>,
        caller: &Caller,
        table: &'static str,
        target: Uuid,
        permission: &str,
        what: &str,
    ) -> Result<T, Error> {
        match result {
            Err(e) if e.code() == Code::NotFound => Err(self.not_found(caller, table, target, permission, what).await),
            other => other,
        }
    }

    /// `GetMerge`.
    pub async fn get_merge(&self, caller: &Caller, id: &str) -> Result<Merge, Error> {
        let id = parse_id("merge_id", id)?;
        let scope = self.scope(caller, "crm.merges.read").await?;
        let row =
            self.db.transaction(&scope, move |conn| Box::pin(async move { load_merge(conn, id, false).await })).await?;
        match row {
            Some(row) => Ok(row.to_proto()),
            None => Err(self.not_found(caller, "merges", id, "crm.merges.read", "merge").await),
        }
    }

    /// `ListMerges`: newest first, keyset pages.
    pub async fn list_merges(&self, caller: &Caller, r: ListMergesRequest) -> Result<ListMergesResponse, Error> {
        let size = page_size(r.page_size)?;
        let entity = caller.entity_or_acting("entity_id", &r.entity_id)?;
        let mut v = Violations::new();
        let kind = match RecordKind::try_from(r.record_kind) {
            Ok(RecordKind::Unspecified) => 0i16,
            Ok(RecordKind::Organization) => 1,
            Ok(RecordKind::Contact) => 2,
            _ => {
                v.add("record_kind", "seuls ORGANIZATION et CONTACT sont fusionnables");
                0
            }
        };
        let record =
            socle_api::parse_optional_id("record_id", &r.record_id).map_err(|e| crate::common::absorb(&mut v, e));
        let mut states = Vec::new();
        for (i, s) in r.states.iter().enumerate() {
            match MergeState::try_from(*s) {
                Ok(MergeState::Applied) => states.push(1i16),
                Ok(MergeState::Undone) => states.push(2),
                _ => v.add(format!("states[{i}]"), "état inconnu"),
            }
        }
        v.into_result()?;
        let Ok(record) = record else { return Err(Error::internal("violations")) };
        states.sort_unstable();
        states.dedup();
        let fingerprint = format!("{entity}|{}|{kind}|{record:?}|{states:?}", r.include_descendants);
        let after = PageToken::<(String, Uuid)>::decode(&r.page_token, &fingerprint)?.map(|t| t.after);
        let scope = self.list_scope(caller, "crm.merges.read", entity, r.include_descendants).await?;
        let entities = scope_ids(&scope, entity);
        let sql = format!(
            "SELECT {MERGE_COLUMNS} FROM merges m
              WHERE m.entity_id = ANY($1) AND ($2 = 0 OR m.record_kind = $2)
                AND ($3::uuid IS NULL OR m.target_id = $3 OR $3 = ANY(m.source_ids))
                AND (cardinality($4::smallint[]) = 0 OR m.state = ANY($4))
                AND ($5::text IS NULL OR (m.create_time, m.id) < ($5::timestamptz, $6::uuid))
              ORDER BY m.create_time DESC, m.id DESC LIMIT {}",
            size + 1
        );
        let mut rows: Vec<MergeRow> = self
            .db
            .transaction(&scope, move |conn| {
                Box::pin(async move {
                    diesel::sql_query(sql)
                        .bind::<Array<SqlUuid>, _>(entities)
                        .bind::<SmallInt, _>(kind)
                        .bind::<Nullable<SqlUuid>, _>(record)
                        .bind::<Array<SmallInt>, _>(states)
                        .bind::<Nullable<Text>, _>(after.as_ref().map(|a| a.0.clone()))
                        .bind::<Nullable<SqlUuid>, _>(after.as_ref().map(|a| a.1))
                        .load(conn)
                        .await
                        .map_err(DbError::from)
                })
            })
            .await?;
        let next_page_token = if rows.len() > size {
            rows.truncate(size);
            let last = rows.last().expect("a full page");
            PageToken::encode(
                (last.create_time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true), last.id),
                &fingerprint,
            )
        } else {
            String::new()
        };
        Ok(ListMergesResponse { merges: rows.iter().map(MergeRow::to_proto).collect(), next_page_token })
    }

    /// `UndoMerge`.
    pub async fn undo_merge(&self, caller: &Caller, r: UndoMergeRequest) -> Result<Merge, Error> {
        let id = parse_id("merge_id", &r.merge_id)?;
        let key = parse_id("request_id", &r.request_id)?;
        let scope = self.scope(caller, "crm.merges.undo").await?;
        let undoer = socle_server::audit::actor(caller.principal.as_ref());
        let etag_given = r.etag;
        let result = self
            .db
            .transaction(&scope, move |conn| {
                Box::pin(async move {
                    if let idempotency::Claim::Existing(_) = idempotency::claim(conn, "UndoMerge", key, id).await? {
                        return Ok(load_merge(conn, id, false).await?.map(|m| m.to_proto()));
                    }
                    let Some(merge) = load_merge(conn, id, true).await? else { return Ok(None) };
                    check_etag(&etag_given, merge.version, false)?;
                    if !merge.blocker.is_empty() {
                        return Err(Error::new(
                            Code::FailedPrecondition,
                            format!("la fusion ne peut plus être annulée : {}", merge.blocker),
                        )
                        .with_reason("MERGE_NOT_UNDOABLE"));
                    }
                    let before_merge = merge.to_proto();
                    let kind = if merge.record_kind == 1 { RecordKind::Organization } else { RecordKind::Contact };
                    let table = if kind == RecordKind::Organization { "organizations" } else { "contacts" };
                    lock(conn, table, merge.target_id, &merge.source_ids).await?;
                    // The rows the merge moved go back where they came from
                    // (unless they moved again since).
                    for item in merge.moved.as_array().into_iter().flatten() {
                        move_back(conn, item, merge.target_id, merge.entity_id).await?;
                    }
                    // The sources come back with their own values.
                    diesel::sql_query(format!(
                        "UPDATE {table} SET state = 1, merged_into_id = NULL, version = version + 1,
                            update_time = now() WHERE id = ANY($1)"
                    ))
                    .bind::<Array<SqlUuid>, _>(&merge.source_ids)
                    .execute(conn)
                    .await
                    .map_err(DbError::from)?;
                    // The target gets back its own values for the fields
                    // the merge changed and nobody changed since.
                    match kind {
                        RecordKind::Organization => {
                            let before =
                                Organization::decode(merge.target_before.as_slice()).map_err(Error::internal)?;
                            let after = Organization::decode(merge.target_after.as_slice()).map_err(Error::internal)?;
                            let current = organizations::load(conn, merge.target_id)
                                .await?
                                .ok_or_else(|| Error::internal("target gone"))?
                                .to_proto();
                            let restored: Organization =
                                restore(&current, &before, &after, ORGANIZATION_SCALARS, ORGANIZATION_UNIONS)?;
                            let input = organizations::validate(&restored, "organization", true)?;
                            organizations::write(conn, merge.target_id, version_of(&current.etag), &input).await?;
                            refresh_memberships(conn, merge.target_id, &merge.source_ids).await?;
                            let now = organizations::load(conn, merge.target_id).await?.map(|o| o.to_proto());
                            audit(conn, "crm.organizations.unmerge", Some(&current), now.as_ref()).await?;
                        }
                        _ => {
                            let before = Contact::decode(merge.target_before.as_slice()).map_err(Error::internal)?;
                            let after = Contact::decode(merge.target_after.as_slice()).map_err(Error::internal)?;
                            let current = contacts::load(conn, merge.target_id)
                                .await?
                                .ok_or_else(|| Error::internal("target gone"))?
                                .to_proto();
                            let restored: Contact =
                                restore(&current, &before, &after, CONTACT_SCALARS, CONTACT_UNIONS)?;
                            let input = contacts::validate(&restored, "contact", true)?;
                            contacts::write(conn, merge.target_id, version_of(&current.etag), &input).await?;
                            let now = contacts::load(conn, merge.target_id).await?.map(|c| c.to_proto());
                            audit(conn, "crm.contacts.unmerge", Some(&current), now.as_ref()).await?;
                        }
                    }
                    crate::duplicates::reopen_unmerged(conn, id).await?;
                    diesel::sql_query(
                        "UPDATE merges SET state = 2, undoer_kind = $2, undoer_id = $3, undo_time = now(),
                            version = version + 1, update_time = now() WHERE id = $1",
                    )
                    .bind::<SqlUuid, _>(id)
                    .bind::<SmallInt, _>(undoer.kind as i16)
                    .bind::<Text, _>(&undoer.id)
                    .execute(conn)
                    .await
                    .map_err(DbError::from)?;
                    let undone =
                        load_merge(conn, id, false).await?.ok_or_else(|| Error::internal("merge gone"))?.to_proto();
                    audit(conn, "crm.merges.undo", Some(&before_merge), Some(&undone)).await?;
                    Ok(Some(undone))
                })
            })
            .await?;
        match result {
            Some(merge) => Ok(merge),
            None => Err(self.not_found(caller, "merges", id, "crm.merges.undo", "merge").await),
        }
    }
}

/// The version in an etag (`"3"` → 3).
fn version_of(etag: &str) -> i64 {
    etag.trim_matches('"').parse().unwrap_or(-1)
}

fn parts_of<M: prost::Message + prost::Name>(target: &M, sources: &[M], id: fn(&M) -> &String) -> Vec<Part> {
    std::iter::once(target)
        .chain(sources)
        .map(|m| Part { id: Uuid::parse_str(id(m)).unwrap_or_default(), json: to_json(m) })
        .collect()
}

/// `base` with the mergeable fields of `merged` (output-only fields kept).
fn overlay<M: prost::Message + prost::Name + Default>(base: &M, merged: Map<String, Json>) -> Result<M, Error> {
    let mut json = to_json(base);
    for (k, v) in merged {
        json.insert(k, v);
    }
    from_json(json)
}

/// The target after an undo: each field the merge changed (`before` →
/// `after`) and that still holds the merged value goes back to `before`.
fn restore<M: prost::Message + prost::Name + Default>(
    current: &M,
    before: &M,
    after: &M,
    scalars: &[&str],
    unions: &[&str],
) -> Result<M, Error> {
    let (mut now, before, after) = (to_json(current), to_json(before), to_json(after));
    for field in scalars.iter().chain(unions) {
        if now.get(*field) == after.get(*field) && before.get(*field) != after.get(*field) {
            match before.get(*field) {
                Some(v) => now.insert((*field).to_owned(), v.clone()),
                None => now.remove(*field),
            };
        }
    }
    from_json(now)
}

/// Locks the target and the sources, in id order (no deadlock between
/// concurrent merges).
async fn lock(conn: &mut AsyncPgConnection, table: &'static str, target: Uuid, sources: &[Uuid]) -> Result<(), Error> {
    let mut all = vec![target];
    all.extend_from_slice(sources);
    diesel::sql_query(format!("SELECT id FROM {table} WHERE id = ANY($1) ORDER BY id FOR UPDATE"))
        .bind::<Array<SqlUuid>, _>(all)
        .execute(conn)
        .await
        .map_err(DbError::from)?;
    Ok(())
}

async fn refresh_memberships(conn: &mut AsyncPgConnection, target: Uuid, sources: &[Uuid]) -> Result<(), Error> {
    let mut all = vec![target];
    all.extend_from_slice(sources);
    diesel::sql_query("SELECT crm_refresh_membership(o) FROM unnest($1::uuid[]) AS o")
        .bind::<Array<SqlUuid>, _>(all)
        .execute(conn)
        .await
        .map_err(DbError::from)?;
    Ok(())
}

/// Puts back one row a merge moved (see `merges.moved`). Table and column
/// names come from a fixed list, never from the stored text.
async fn move_back(conn: &mut AsyncPgConnection, item: &Json, target: Uuid, entity: Uuid) -> Result<(), Error> {
    let uuid = |name: &str| item[name].as_str().and_then(|s| Uuid::parse_str(s).ok());
    let Some(from) = uuid("from") else { return Ok(()) };
    let table = item["table"].as_str().unwrap_or("");
    if table == "interaction_contacts" {
        let Some(interaction) = uuid("interaction_id") else { return Ok(()) };
        let sql = if item["deleted"].as_bool().unwrap_or(false) {
            "INSERT INTO interaction_contacts (interaction_id, contact_id, entity_id)
             SELECT $1, $2, $4 WHERE EXISTS (SELECT 1 FROM interactions WHERE id = $1) ON CONFLICT DO NOTHING"
        } else {
            "UPDATE interaction_contacts SET contact_id = $2 WHERE interaction_id = $1 AND contact_id = $3
               AND NOT EXISTS (SELECT 1 FROM interaction_contacts WHERE interaction_id = $1 AND contact_id = $2)"
        };
        diesel::sql_query(sql)
            .bind::<SqlUuid, _>(interaction)
            .bind::<SqlUuid, _>(from)
            .bind::<SqlUuid, _>(target)
            .bind::<SqlUuid, _>(entity)
            .execute(conn)
            .await
            .map_err(DbError::from)?;
        return Ok(());
    }
    let (table, column): (&'static str, &'static str) = match (table, item["column"].as_str().unwrap_or("")) {
        ("affiliations", "organization_id") => ("affiliations", "organization_id"),
        ("affiliations", "contact_id") => ("affiliations", "contact_id"),
        ("memberships", "organization_id") => ("memberships", "organization_id"),
        ("interactions", "organization_id") => ("interactions", "organization_id"),
        _ => return Err(Error::internal("unknown moved row in a merge record")),
    };
    let Some(id) = uuid("id") else { return Ok(()) };
    diesel::sql_query(format!("UPDATE {table} SET {column} = $2 WHERE id = $1 AND {column} = $3"))
        .bind::<SqlUuid, _>(id)
        .bind::<SqlUuid, _>(from)
        .bind::<SqlUuid, _>(target)
        .execute(conn)
        .await
        .map_err(DbError::from)?;
    Ok(())
}

/// The gRPC adapter of `MergeService`.
#[tonic::async_trait]
impl MergeService for Crm {
    async fn get_merge(&self, request: Request<GetMergeRequest>) -> Result<Response<GetMergeResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        let result = Crm::get_merge(self, &caller, &request.get_ref().merge_id).await;
        reply(result.map(|m| GetMergeResponse { merge: Some(m) }), request_id)
    }

    async fn list_merges(&self, request: Request<ListMergesRequest>) -> Result<Response<ListMergesResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        reply(Crm::list_merges(self, &caller, request.into_inner()).await, request_id)
    }

    async fn undo_merge(&self, request: Request<UndoMergeRequest>) -> Result<Response<UndoMergeResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        let result = Crm::undo_merge(self, &caller, request.into_inner()).await;
        reply(result.map(|m| UndoMergeResponse { merge: Some(m) }), request_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unions_keep_one_primary_and_the_latest_consent() {
        let a = json!([{ "address": "a@x.fr", "primary": true }, { "address": "b@x.fr" }]);
        let b = json!([{ "address": "A@X.FR", "primary": true }, { "address": "c@x.fr" }]);
        let merged = union("emails", &[&a, &b]);
        assert_eq!(
            merged,
            json!([{ "address": "a@x.fr", "primary": true }, { "address": "b@x.fr" }, { "address": "c@x.fr" }])
        );
        let old = json!([{ "topic": "T", "channel": "C", "granted": true, "record_time": "2025-01-01T00:00:00Z" }]);
        let new = json!([{ "topic": "T", "channel": "C", "granted": false, "record_time": "2026-01-01T00:00:00Z" }]);
        assert_eq!(union("consents", &[&old, &new])[0]["granted"], false);
        let refs = union("external_refs", &[&json!({ "dolibarr": "1" }), &json!({ "dolibarr": "2", "csv": "9" })]);
        assert_eq!(refs, json!({ "dolibarr": "1", "csv": "9" }));
    }

    #[test]
    fn plans_take_the_target_then_the_latest_source_unless_chosen() {
        let (t, s1, s2) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let parts = vec![
            Part { id: t, json: json!({ "legal_name": "A", "tags": ["x"] }).as_object().unwrap().clone() },
            Part {
                id: s1,
                json: json!({ "legal_name": "B", "phone": "+33478000000", "tags": ["y"] }).as_object().unwrap().clone(),
            },
            Part {
                id: s2,
                json: json!({ "phone": "+33478000001", "siret": "73282932000074", "siren": "732829320" })
                    .as_object()
                    .unwrap()
                    .clone(),
            },
        ];
        let plan = plan(ORGANIZATION_SCALARS, ORGANIZATION_UNIONS, &parts, &[]).unwrap();
        assert_eq!(plan.merged["legal_name"], "A");
        assert_eq!(plan.merged["phone"], "+33478000000");
        assert_eq!(plan.merged["siret"], "73282932000074");
        assert_eq!(plan.merged["tags"], json!(["x", "y"]));
        let name = plan.fields.iter().find(|f| f.field_path == "legal_name").unwrap();
        assert!(name.conflicting);
        assert_eq!(name.chosen_record_id, t.to_string());
        let choice = MergeFieldChoice { field_path: "legal_name".into(), record_id: s1.to_string() };
        let chosen = super::plan(ORGANIZATION_SCALARS, ORGANIZATION_UNIONS, &parts, &[choice]).unwrap();
        assert_eq!(chosen.merged["legal_name"], "B");
        let bad = MergeFieldChoice { field_path: "state".into(), record_id: Uuid::new_v4().to_string() };
        let error = super::plan(ORGANIZATION_SCALARS, ORGANIZATION_UNIONS, &parts, &[bad]).err().unwrap();
        assert_eq!(error.violations().len(), 1);
    }
}
