//! Batch duplicate scans (`socle.crm.v1.DuplicateService`).
//!
//! A scan compares the active organisations and contacts of an entity (or
//! of the part of its subtree the caller reads) with each other in a few
//! set-based statements: same SIRET or SIREN, same e-mail or phone, similar
//! name (trigrams) with the same postal code. Pairs join two records of one
//! entity (a merge needs both there), the older first; a later scan updates
//! the open ones and never proposes a dismissed or merged pair again. Scans
//! run in the background: a scan interrupted by a restart is marked failed
//! when the service starts again.

use chrono::{DateTime, Utc};
use diesel::{
    QueryableByName,
    sql_types::{Array, BigInt, Double, Nullable, SmallInt, Text, Timestamptz, Uuid as SqlUuid},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use socle_api::{PageToken, Violations, check_etag, page_size, parse_id};
use socle_db::{Database, DbError, EntityScope, idempotency};
use socle_errors::{Code, Error};
use socle_proto::socle::{
    crm::v1::{duplicate_service_server::DuplicateService, *},
    r#type::v1::ActorRef,
};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::{
    common::{Audited, Caller, Crm, absorb, audit, etag, reply, rid, timestamp},
    organizations::scope_ids,
};

impl Audited for DuplicateScan {
    const RESOURCE_TYPE: &'static str = "crm.duplicate_scan";
    fn record_id(&self) -> &str {
        &self.id
    }
    fn owner(&self) -> &str {
        &self.entity_id
    }
}

impl Audited for DuplicatePair {
    const RESOURCE_TYPE: &'static str = "crm.duplicate_pair";
    fn record_id(&self) -> &str {
        &self.id
    }
    fn owner(&self) -> &str {
        &self.entity_id
    }
}

fn actor(kind: i16, id: &str) -> Option<ActorRef> {
    (kind != 0).then(|| ActorRef { kind: i32::from(kind), id: id.to_owned(), display_name: String::new() })
}

#[derive(QueryableByName)]
struct ScanRow {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    entity_id: Uuid,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    include_descendants: bool,
    #[diesel(sql_type = Array<SmallInt>)]
    record_kinds: Vec<i16>,
    #[diesel(sql_type = Double)]
    min_score: f64,
    #[diesel(sql_type = SmallInt)]
    state: i16,
    #[diesel(sql_type = BigInt)]
    scanned_record_count: i64,
    #[diesel(sql_type = BigInt)]
    pair_count: i64,
    #[diesel(sql_type = Text)]
    error: String,
    #[diesel(sql_type = SmallInt)]
    creator_kind: i16,
    #[diesel(sql_type = Text)]
    creator_id: String,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    complete_time: Option<DateTime<Utc>>,
    #[diesel(sql_type = BigInt)]
    version: i64,
    #[diesel(sql_type = Timestamptz)]
    create_time: DateTime<Utc>,
    #[diesel(sql_type = Timestamptz)]
    update_time: DateTime<Utc>,
}

const SCAN_COLUMNS: &str = "s.id, s.entity_id, s.include_descendants, s.record_kinds, s.min_score,
    s.state, s.scanned_record_count, s.pair_count, s.error, s.creator_kind, s.creator_id, s.complete_time,
    s.version, s.create_time, s.update_time";

impl ScanRow {
    fn to_proto(&self) -> DuplicateScan {
        DuplicateScan {
            id: self.id.to_string(),
            entity_id: self.entity_id.to_string(),
            include_descendants: self.include_descendants,
            record_kinds: self.record_kinds.iter().map(|k| i32::from(*k)).collect(),
            min_score: self.min_score,
            state: i32::from(self.state),
            scanned_record_count: self.scanned_record_count,
            pair_count: self.pair_count,
            error: self.error.clone(),
            creator: actor(self.creator_kind, &self.creator_id),
            create_time: Some(timestamp(self.create_time)),
            complete_time: self.complete_time.map(timestamp),
            update_time: Some(timestamp(self.update_time)),
            etag: etag(self.version),
        }
    }
}

#[derive(QueryableByName)]
struct PairRow {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    entity_id: Uuid,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    duplicate_scan_id: Option<Uuid>,
    #[diesel(sql_type = SmallInt)]
    record_kind: i16,
    #[diesel(sql_type = SqlUuid)]
    first_record_id: Uuid,
    #[diesel(sql_type = Text)]
    first_display_name: String,
    #[diesel(sql_type = SqlUuid)]
    second_record_id: Uuid,
    #[diesel(sql_type = Text)]
    second_display_name: String,
    #[diesel(sql_type = Double)]
    score: f64,
    #[diesel(sql_type = Array<SmallInt>)]
    reasons: Vec<i16>,
    #[diesel(sql_type = SmallInt)]
    state: i16,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    merge_id: Option<Uuid>,
    #[diesel(sql_type = Text)]
    dismiss_reason: String,
    #[diesel(sql_type = SmallInt)]
    resolver_kind: i16,
    #[diesel(sql_type = Text)]
    resolver_id: String,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    resolve_time: Option<DateTime<Utc>>,
    #[diesel(sql_type = BigInt)]
    version: i64,
    #[diesel(sql_type = Timestamptz)]
    create_time: DateTime<Utc>,
    #[diesel(sql_type = Timestamptz)]
    update_time: DateTime<Utc>,
}

/// The columns of [`PairRow`] over [`PAIR_FROM`]: names and states of both
/// records in the same statement.
const PAIR_COLUMNS: &str = "p.id, p.entity_id, p.duplicate_scan_id, p.record_kind, p.first_record_id,
    coalesce(o1.legal_name, btrim(c1.given_name || ' ' || c1.family_name), '') AS first_display_name,
    p.second_record_id,
    coalesce(o2.legal_name, btrim(c2.given_name || ' ' || c2.family_name), '') AS second_display_name,
    p.score, p.reasons, p.state, p.merge_id, p.dismiss_reason, p.resolver_kind, p.resolver_id, p.resolve_time,
    p.version, p.create_time, p.update_time";
const PAIR_FROM: &str = "duplicate_pairs p
    LEFT JOIN organizations o1 ON p.record_kind = 1 AND o1.id = p.first_record_id
    LEFT JOIN organizations o2 ON p.record_kind = 1 AND o2.id = p.second_record_id
    LEFT JOIN contacts c1 ON p.record_kind = 2 AND c1.id = p.first_record_id
    LEFT JOIN contacts c2 ON p.record_kind = 2 AND c2.id = p.second_record_id";

impl PairRow {
    fn to_proto(&self) -> DuplicatePair {
        DuplicatePair {
            id: self.id.to_string(),
            entity_id: self.entity_id.to_string(),
            duplicate_scan_id: self.duplicate_scan_id.map(|s| s.to_string()).unwrap_or_default(),
            record_kind: i32::from(self.record_kind),
            first_record_id: self.first_record_id.to_string(),
            first_display_name: self.first_display_name.clone(),
            second_record_id: self.second_record_id.to_string(),
            second_display_name: self.second_display_name.clone(),
            score: (self.score * 1000.0).round() / 1000.0,
            reasons: self.reasons.iter().map(|r| i32::from(*r)).collect(),
            state: i32::from(self.state),
            merge_id: self.merge_id.map(|m| m.to_string()).unwrap_or_default(),
            dismiss_reason: self.dismiss_reason.clone(),
            resolver: actor(self.resolver_kind, &self.resolver_id),
            resolve_time: self.resolve_time.map(timestamp),
            create_time: Some(timestamp(self.create_time)),
            update_time: Some(timestamp(self.update_time)),
            etag: etag(self.version),
        }
    }
}

/// The organisation pairs of a scan: $1 entities, $2 scan, $3 minimum score.
const ORGANIZATION_PAIRS_SQL: &str = "
WITH o AS (SELECT id, entity_id, siren, siret, email_key, phone, name_key, postal_code, create_time
             FROM organizations WHERE state = 1 AND entity_id = ANY($1)),
hits AS (
    SELECT a.id AS a, b.id AS b, a.entity_id, 2::smallint AS r, 1.0::float8 AS s
      FROM o a JOIN o b ON b.entity_id = a.entity_id AND b.siret = a.siret AND (a.create_time, a.id) < (b.create_time, b.id)
    UNION ALL
    SELECT a.id, b.id, a.entity_id, 1::smallint, 0.9
      FROM o a JOIN o b ON b.entity_id = a.entity_id AND b.siren = a.siren AND (a.create_time, a.id) < (b.create_time, b.id)
    UNION ALL
    SELECT a.id, b.id, a.entity_id, 3::smallint, 0.8
      FROM o a JOIN o b ON b.entity_id = a.entity_id AND a.email_key <> '' AND b.email_key = a.email_key
                       AND (a.create_time, a.id) < (b.create_time, b.id)
    UNION ALL
    SELECT a.id, b.id, a.entity_id, 4::smallint, 0.7
      FROM o a JOIN o b ON b.entity_id = a.entity_id AND a.phone <> '' AND b.phone = a.phone
                       AND (a.create_time, a.id) < (b.create_time, b.id)
    UNION ALL
    SELECT a.id, b.id, a.entity_id, 5::smallint, 0.4 + 0.5 * similarity(a.name_key, b.name_key)
      FROM o a JOIN o b ON b.entity_id = a.entity_id AND a.postal_code <> '' AND b.postal_code = a.postal_code
                       AND (a.create_time, a.id) < (b.create_time, b.id)
     WHERE similarity(a.name_key, b.name_key) >= 0.45
),
pairs AS (
    SELECT a, b, entity_id, array_agg(r ORDER BY s DESC, r) AS reasons,
           least(1.0, max(s) + 0.05 * (count(*) - 1)) AS score
      FROM hits GROUP BY a, b, entity_id
)
INSERT INTO duplicate_pairs (id, entity_id, duplicate_scan_id, record_kind, first_record_id, second_record_id, score, reasons)
SELECT gen_random_uuid(), entity_id, $2, 1, a, b, score, reasons FROM pairs WHERE score >= $3
ON CONFLICT (record_kind, first_record_id, second_record_id) DO UPDATE
   SET score = EXCLUDED.score, reasons = EXCLUDED.reasons, duplicate_scan_id = EXCLUDED.duplicate_scan_id,
       version = duplicate_pairs.version + 1, update_time = now()
 WHERE duplicate_pairs.state = 1";

/// The contact pairs of a scan.
const CONTACT_PAIRS_SQL: &str = "
WITH c AS (SELECT id, entity_id, email_keys, phone_keys, name_key, postal_code, create_time
             FROM contacts WHERE state = 1 AND entity_id = ANY($1)),
hits AS (
    SELECT a.id AS a, b.id AS b, a.entity_id, 3::smallint AS r, 0.95::float8 AS s
      FROM c a JOIN c b ON b.entity_id = a.entity_id AND a.email_keys && b.email_keys
                       AND (a.create_time, a.id) < (b.create_time, b.id)
    UNION ALL
    SELECT a.id, b.id, a.entity_id, 4::smallint, 0.75
      FROM c a JOIN c b ON b.entity_id = a.entity_id AND a.phone_keys && b.phone_keys
                       AND (a.create_time, a.id) < (b.create_time, b.id)
    UNION ALL
    SELECT a.id, b.id, a.entity_id, 5::smallint, 0.4 + 0.5 * similarity(a.name_key, b.name_key)
      FROM c a JOIN c b ON b.entity_id = a.entity_id AND a.postal_code <> '' AND b.postal_code = a.postal_code
                       AND (a.create_time, a.id) < (b.create_time, b.id)
     WHERE similarity(a.name_key, b.name_key) >= 0.6
),
pairs AS (
    SELECT a, b, entity_id, array_agg(r ORDER BY s DESC, r) AS reasons,
           least(1.0, max(s) + 0.05 * (count(*) - 1)) AS score
      FROM hits GROUP BY a, b, entity_id
)
INSERT INTO duplicate_pairs (id, entity_id, duplicate_scan_id, record_kind, first_record_id, second_record_id, score, reasons)
SELECT gen_random_uuid(), entity_id, $2, 2, a, b, score, reasons FROM pairs WHERE score >= $3
ON CONFLICT (record_kind, first_record_id, second_record_id) DO UPDATE
   SET score = EXCLUDED.score, reasons = EXCLUDED.reasons, duplicate_scan_id = EXCLUDED.duplicate_scan_id,
       version = duplicate_pairs.version + 1, update_time = now()
 WHERE duplicate_pairs.state = 1";

async fn load_scan(conn: &mut AsyncPgConnection, id: Uuid) -> Result<Option<ScanRow>, Error> {
    let rows: Vec<ScanRow> = diesel::sql_query(format!("SELECT {SCAN_COLUMNS} FROM duplicate_scans s WHERE s.id = $1"))
        .bind::<SqlUuid, _>(id)
        .load(conn)
        .await
        .map_err(DbError::from)?;
    Ok(rows.into_iter().next())
}

async fn load_pair(conn: &mut AsyncPgConnection, id: Uuid) -> Result<Option<PairRow>, Error> {
    let rows: Vec<PairRow> = diesel::sql_query(format!("SELECT {PAIR_COLUMNS} FROM {PAIR_FROM} WHERE p.id = $1"))
        .bind::<SqlUuid, _>(id)
        .load(conn)
        .await
        .map_err(DbError::from)?;
    Ok(rows.into_iter().next())
}

/// Runs a scan to its end (in the background task of `ScanDuplicates`).
async fn run_scan(db: Database, id: Uuid, entities: Vec<Uuid>, kinds: Vec<i16>, min_score: f64) {
    let scope = EntityScope::Entities(entities.clone());
    let compared = entities.clone();
    let result = db
        .transaction(&scope, move |conn| {
            Box::pin(async move {
                diesel::sql_query("UPDATE duplicate_scans SET state = 2, update_time = now() WHERE id = $1")
                    .bind::<SqlUuid, _>(id)
                    .execute(conn)
                    .await
                    .map_err(DbError::from)?;
                let mut scanned = 0i64;
                for kind in &kinds {
                    let (sql, table) = if *kind == 1 {
                        (ORGANIZATION_PAIRS_SQL, "organizations")
                    } else {
                        (CONTACT_PAIRS_SQL, "contacts")
                    };
                    diesel::sql_query(sql)
                        .bind::<Array<SqlUuid>, _>(&compared)
                        .bind::<SqlUuid, _>(id)
                        .bind::<Double, _>(min_score)
                        .execute(conn)
                        .await
                        .map_err(DbError::from)?;
                    let count: crate::common::Count = diesel::sql_query(format!(
                        "SELECT count(*) AS n FROM {table} WHERE state = 1 AND entity_id = ANY($1)"
                    ))
                    .bind::<Array<SqlUuid>, _>(&compared)
                    .get_result(conn)
                    .await
                    .map_err(DbError::from)?;
                    scanned += count.n;
                }
                diesel::sql_query(
                    "UPDATE duplicate_scans SET state = 3, scanned_record_count = $2, complete_time = now(),
                        pair_count = (SELECT count(*) FROM duplicate_pairs WHERE duplicate_scan_id = $1 AND state = 1),
                        version = version + 1, update_time = now()
                      WHERE id = $1",
                )
                .bind::<SqlUuid, _>(id)
                .bind::<BigInt, _>(scanned)
                .execute(conn)
                .await
                .map_err(DbError::from)?;
                Ok::<_, Error>(())
            })
        })
        .await;
    if let Err(error) = result {
        tracing::warn!(scan = %id, error = %error, "duplicate scan failed");
        let scope = EntityScope::Entities(entities);
        let _ = db
            .transaction(&scope, move |conn| {
                Box::pin(async move {
                    diesel::sql_query(
                        "UPDATE duplicate_scans SET state = 4, error = $2, complete_time = now(),
                            version = version + 1, update_time = now() WHERE id = $1",
                    )
                    .bind::<SqlUuid, _>(id)
                    .bind::<Text, _>(
                        "l'analyse n'a pas pu aboutir ; relancez-la (détails dans les journaux du service)",
                    )
                    .execute(conn)
                    .await
                    .map_err(DbError::from)
                })
            })
            .await;
    }
}

/// Marks the scans a stopped process left unfinished as failed (at start-up).
pub async fn fail_interrupted_scans(db: &Database) -> Result<usize, Error> {
    db.transaction(&EntityScope::System, |conn| {
        Box::pin(async move {
            diesel::sql_query(
                "UPDATE duplicate_scans SET state = 4, error = 'interrompue par un redémarrage du service : relancez-la',
                    complete_time = now(), version = version + 1, update_time = now()
                  WHERE state IN (1, 2)",
            )
            .execute(conn)
            .await
            .map_err(|e| Error::from(DbError::from(e)))
        })
    })
    .await
}

/// Marks the open pairs between a merge's target and sources as merged
/// (called in the merge's transaction).
pub(crate) async fn resolve_merged(
    conn: &mut AsyncPgConnection,
    kind: RecordKind,
    target: Uuid,
    sources: &[Uuid],
    merge: Uuid,
    resolver: &ActorRef,
) -> Result<(), Error> {
    diesel::sql_query(
        "UPDATE duplicate_pairs SET state = 2, merge_id = $4, resolver_kind = $5, resolver_id = $6, resolve_time = now(),
            version = version + 1, update_time = now()
          WHERE record_kind = $1 AND state = 1
            AND ((first_record_id = $2 AND second_record_id = ANY($3))
              OR (second_record_id = $2 AND first_record_id = ANY($3)))",
    )
    .bind::<SmallInt, _>(kind as i16)
    .bind::<SqlUuid, _>(target)
    .bind::<Array<SqlUuid>, _>(sources)
    .bind::<SqlUuid, _>(merge)
    .bind::<SmallInt, _>(resolver.kind as i16)
    .bind::<Text, _>(&resolver.id)
    .execute(conn)
    .await
    .map_err(DbError::from)?;
    Ok(())
}

/// Opens again the pairs a merge resolved (its undo).
pub(crate) async fn reopen_unmerged(conn: &mut AsyncPgConnection, merge: Uuid) -> Result<(), Error> {
    diesel::sql_query(
        "UPDATE duplicate_pairs SET state = 1, merge_id = NULL, resolver_kind = 0, resolver_id = '', resolve_time = NULL,
            version = version + 1, update_time = now()
          WHERE merge_id = $1 AND state = 2",
    )
    .bind::<SqlUuid, _>(merge)
    .execute(conn)
    .await
    .map_err(DbError::from)?;
    Ok(())
}

#[derive(QueryableByName)]
struct Partner {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
}

/// The records a pair dismissal declared not duplicates of `record`.
pub(crate) async fn dismissed_partners(
    conn: &mut AsyncPgConnection,
    kind: RecordKind,
    record: Uuid,
) -> Result<Vec<Uuid>, Error> {
    let rows: Vec<Partner> = diesel::sql_query(
        "SELECT CASE WHEN first_record_id = $2 THEN second_record_id ELSE first_record_id END AS id
           FROM duplicate_pairs WHERE record_kind = $1 AND state = 3 AND (first_record_id = $2 OR second_record_id = $2)",
    )
    .bind::<SmallInt, _>(kind as i16)
    .bind::<SqlUuid, _>(record)
    .load(conn)
    .await
    .map_err(DbError::from)?;
    Ok(rows.into_iter().map(|r| r.id).collect())
}

impl Crm {
    /// `ScanDuplicates`: records the scan and starts it in the background.
    pub async fn scan_duplicates(&self, caller: &Caller, r: ScanDuplicatesRequest) -> Result<DuplicateScan, Error> {
        let mut v = Violations::new();
        let key = parse_id("request_id", &r.request_id).map_err(|e| absorb(&mut v, e));
        let scan = r.duplicate_scan.unwrap_or_default();
        let entity = parse_id("duplicate_scan.entity_id", &scan.entity_id).map_err(|e| absorb(&mut v, e));
        let mut kinds = Vec::new();
        for (i, k) in scan.record_kinds.iter().enumerate() {
            match RecordKind::try_from(*k) {
                Ok(RecordKind::Organization) => kinds.push(1i16),
                Ok(RecordKind::Contact) => kinds.push(2),
                _ => v.add(format!("duplicate_scan.record_kinds[{i}]"), "seuls ORGANIZATION et CONTACT sont analysés"),
            }
        }
        let min_score = if scan.min_score == 0.0 { 0.6 } else { scan.min_score };
        v.check((0.0..=1.0).contains(&min_score), "duplicate_scan.min_score", "entre 0 et 1");
        v.into_result()?;
        let (Ok(key), Ok(entity)) = (key, entity) else { return Err(Error::internal("violations")) };
        if kinds.is_empty() {
            kinds = vec![1, 2];
        }
        kinds.sort_unstable();
        kinds.dedup();
        // The compared entities: those the caller reads, fixed when the scan starts.
        let organizations = self.list_scope(caller, "crm.organizations.read", entity, scan.include_descendants).await?;
        let entities = scope_ids(&organizations, entity);
        let creator = socle_server::audit::actor(caller.principal.as_ref());
        let include_descendants = scan.include_descendants;
        let (stored_entities, stored_kinds) = (entities.clone(), kinds.clone());
        let (row, fresh) = self
            .db
            .transaction(&EntityScope::entity(entity), move |conn| {
                Box::pin(async move {
                    let id = match idempotency::claim(conn, "ScanDuplicates", key, Uuid::now_v7()).await? {
                        idempotency::Claim::Existing(id) => {
                            let row = load_scan(conn, id).await?.ok_or_else(|| {
                                Error::new(Code::AlreadyExists, "this request_id was used for another record")
                            })?;
                            return Ok((row, false));
                        }
                        idempotency::Claim::New(id) => id,
                    };
                    diesel::sql_query(
                        "INSERT INTO duplicate_scans (id, entity_id, include_descendants, entity_ids, record_kinds,
                            min_score, creator_kind, creator_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                    )
                    .bind::<SqlUuid, _>(id)
                    .bind::<SqlUuid, _>(entity)
                    .bind::<diesel::sql_types::Bool, _>(include_descendants)
                    .bind::<Array<SqlUuid>, _>(&stored_entities)
                    .bind::<Array<SmallInt>, _>(&stored_kinds)
                    .bind::<Double, _>(min_score)
                    .bind::<SmallInt, _>(creator.kind as i16)
                    .bind::<Text, _>(&creator.id)
                    .execute(conn)
                    .await
                    .map_err(DbError::from)?;
                    let row = load_scan(conn, id).await?.ok_or_else(|| Error::internal("scan not found"))?;
                    audit(conn, "crm.duplicate_scans.create", None, Some(&row.to_proto())).await?;
                    Ok::<_, Error>((row, true))
                })
            })
            .await?;
        if fresh {
            tokio::spawn(run_scan(self.db.clone(), row.id, entities, kinds, min_score));
        }
        Ok(row.to_proto())
    }

    /// `GetDuplicateScan`.
    pub async fn get_duplicate_scan(&self, caller: &Caller, id: &str) -> Result<DuplicateScan, Error> {
        let id = parse_id("duplicate_scan_id", id)?;
        let scope = self.scope(caller, "crm.duplicates.read").await?;
        let row = self.db.transaction(&scope, move |conn| Box::pin(async move { load_scan(conn, id).await })).await?;
        match row {
            Some(row) => Ok(row.to_proto()),
            None => Err(self.not_found(caller, "duplicate_scans", id, "crm.duplicates.read", "duplicate scan").await),
        }
    }

    /// `ListDuplicateScans`: newest first.
    pub async fn list_duplicate_scans(
        &self,
        caller: &Caller,
        r: ListDuplicateScansRequest,
    ) -> Result<ListDuplicateScansResponse, Error> {
        let size = page_size(r.page_size)?;
        let entity = caller.entity_or_acting("entity_id", &r.entity_id)?;
        let mut v = Violations::new();
        let mut states = Vec::new();
        for (i, s) in r.states.iter().enumerate() {
            match DuplicateScanState::try_from(*s) {
                Ok(DuplicateScanState::Unspecified) | Err(_) => v.add(format!("states[{i}]"), "état inconnu"),
                Ok(s) => states.push(s as i16),
            }
        }
        v.into_result()?;
        states.sort_unstable();
        states.dedup();
        let fingerprint = format!("{entity}|{states:?}");
        let after = PageToken::<(String, Uuid)>::decode(&r.page_token, &fingerprint)?.map(|t| t.after);
        let sql = format!(
            "SELECT {SCAN_COLUMNS} FROM duplicate_scans s
              WHERE s.entity_id = $1 AND (cardinality($2::smallint[]) = 0 OR s.state = ANY($2))
                AND ($3::text IS NULL OR (s.create_time, s.id) < ($3::timestamptz, $4::uuid))
              ORDER BY s.create_time DESC, s.id DESC LIMIT {}",
            size + 1
        );
        let mut rows: Vec<ScanRow> = self
            .db
            .transaction(&EntityScope::entity(entity), move |conn| {
                Box::pin(async move {
                    diesel::sql_query(sql)
                        .bind::<SqlUuid, _>(entity)
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
        Ok(ListDuplicateScansResponse {
            duplicate_scans: rows.iter().map(ScanRow::to_proto).collect(),
            next_page_token,
        })
    }

    /// `ListDuplicatePairs`: open pairs of active records by default,
    /// highest score first.
    pub async fn list_duplicate_pairs(
        &self,
        caller: &Caller,
        r: ListDuplicatePairsRequest,
    ) -> Result<ListDuplicatePairsResponse, Error> {
        let size = page_size(r.page_size)?;
        let entity = caller.entity_or_acting("entity_id", &r.entity_id)?;
        let mut v = Violations::new();
        let scan =
            socle_api::parse_optional_id("duplicate_scan_id", &r.duplicate_scan_id).map_err(|e| absorb(&mut v, e));
        let record = socle_api::parse_optional_id("record_id", &r.record_id).map_err(|e| absorb(&mut v, e));
        let kind = match RecordKind::try_from(r.record_kind) {
            Ok(RecordKind::Unspecified) => 0i16,
            Ok(RecordKind::Organization) => 1,
            Ok(RecordKind::Contact) => 2,
            _ => {
                v.add("record_kind", "seuls ORGANIZATION et CONTACT ont des doublons");
                0
            }
        };
        let mut states = Vec::new();
        for (i, s) in r.states.iter().enumerate() {
            match DuplicatePairState::try_from(*s) {
                Ok(DuplicatePairState::Unspecified) | Err(_) => v.add(format!("states[{i}]"), "état inconnu"),
                Ok(s) => states.push(s as i16),
            }
        }
        if states.is_empty() {
            states.push(DuplicatePairState::Open as i16);
        }
        v.check((0.0..=1.0).contains(&r.min_score), "min_score", "entre 0 et 1");
        let (order, after_sql) = match r.order_by.trim() {
            "" | "score desc" => ("p.score DESC, p.id DESC", "(p.score, p.id) < ($7::float8, $8::uuid)"),
            "create_time desc" => {
                ("p.create_time DESC, p.id DESC", "(p.create_time, p.id) < (to_timestamp($7::float8), $8::uuid)")
            }
            _ => {
                v.add("order_by", "must be one of: score desc, create_time desc");
                ("", "")
            }
        };
        v.into_result()?;
        let (Ok(scan), Ok(record)) = (scan, record) else { return Err(Error::internal("violations")) };
        states.sort_unstable();
        states.dedup();
        let fingerprint =
            format!("{entity}|{}|{scan:?}|{kind}|{states:?}|{}|{record:?}|{order}", r.include_descendants, r.min_score);
        let after = PageToken::<(f64, Uuid)>::decode(&r.page_token, &fingerprint)?.map(|t| t.after);
        let list_scope = self.list_scope(caller, "crm.duplicates.read", entity, r.include_descendants).await?;
        let entities = scope_ids(&list_scope, entity);
        let sql = format!(
            "SELECT {PAIR_COLUMNS} FROM {PAIR_FROM}
              WHERE p.entity_id = ANY($1) AND ($2::uuid IS NULL OR p.duplicate_scan_id = $2)
                AND ($3 = 0 OR p.record_kind = $3) AND p.state = ANY($4) AND p.score >= $5
                AND ($6::uuid IS NULL OR p.first_record_id = $6 OR p.second_record_id = $6)
                AND (p.state <> 1 OR (coalesce(o1.state, c1.state) = 1 AND coalesce(o2.state, c2.state) = 1))
                AND ($7::float8 IS NULL OR {after_sql})
              ORDER BY {order} LIMIT {}",
            size + 1
        );
        let by_time = order.starts_with("p.create_time");
        let min_score = r.min_score;
        let mut rows: Vec<PairRow> = self
            .db
            .transaction(&list_scope, move |conn| {
                Box::pin(async move {
                    diesel::sql_query(sql)
                        .bind::<Array<SqlUuid>, _>(entities)
                        .bind::<Nullable<SqlUuid>, _>(scan)
                        .bind::<SmallInt, _>(kind)
                        .bind::<Array<SmallInt>, _>(states)
                        .bind::<Double, _>(min_score)
                        .bind::<Nullable<SqlUuid>, _>(record)
                        .bind::<Nullable<Double>, _>(after.as_ref().map(|a| a.0))
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
            let key = if by_time { last.create_time.timestamp_micros() as f64 / 1e6 } else { last.score };
            PageToken::encode((key, last.id), &fingerprint)
        } else {
            String::new()
        };
        Ok(ListDuplicatePairsResponse {
            duplicate_pairs: rows.iter().map(PairRow::to_proto).collect(),
            next_page_token,
        })
    }

    /// `DismissDuplicatePair`.
    pub async fn dismiss_duplicate_pair(
        &self,
        caller: &Caller,
        r: DismissDuplicatePairRequest,
    ) -> Result<DuplicatePair, Error> {
        let id = parse_id("duplicate_pair_id", &r.duplicate_pair_id)?;
        let reason = r.reason.trim().to_owned();
        if reason.chars().count() > 500 {
            return Err(Error::invalid_field("reason", "au plus 500 caractères"));
        }
        let scope = self.scope(caller, "crm.duplicates.manage").await?;
        let resolver = socle_server::audit::actor(caller.principal.as_ref());
        let etag_given = r.etag;
        let result = self
            .db
            .transaction(&scope, move |conn| {
                Box::pin(async move {
                    diesel::sql_query("SELECT 1 FROM duplicate_pairs WHERE id = $1 FOR UPDATE")
                        .bind::<SqlUuid, _>(id)
                        .execute(conn)
                        .await
                        .map_err(DbError::from)?;
                    let Some(current) = load_pair(conn, id).await? else { return Ok(None) };
                    check_etag(&etag_given, current.version, false)?;
                    if current.state != DuplicatePairState::Open as i16 {
                        return Err(Error::new(Code::FailedPrecondition, "cette paire a déjà été traitée"));
                    }
                    diesel::sql_query(
                        "UPDATE duplicate_pairs SET state = 3, dismiss_reason = $2, resolver_kind = $3, resolver_id = $4,
                            resolve_time = now(), version = version + 1, update_time = now() WHERE id = $1",
                    )
                    .bind::<SqlUuid, _>(id)
                    .bind::<Text, _>(&reason)
                    .bind::<SmallInt, _>(resolver.kind as i16)
                    .bind::<Text, _>(&resolver.id)
                    .execute(conn)
                    .await
                    .map_err(DbError::from)?;
                    let after = load_pair(conn, id).await?.ok_or_else(|| Error::internal("pair gone"))?.to_proto();
                    audit(conn, "crm.duplicate_pairs.dismiss", Some(&current.to_proto()), Some(&after)).await?;
                    Ok(Some(after))
                })
            })
            .await?;
        match result {
            Some(pair) => Ok(pair),
            None => Err(self.not_found(caller, "duplicate_pairs", id, "crm.duplicates.manage", "duplicate pair").await),
        }
    }
}

/// The gRPC adapter.
#[tonic::async_trait]
impl DuplicateService for Crm {
    async fn scan_duplicates(
        &self,
        request: Request<ScanDuplicatesRequest>,
    ) -> Result<Response<ScanDuplicatesResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        let result = Crm::scan_duplicates(self, &caller, request.into_inner()).await;
        reply(result.map(|s| ScanDuplicatesResponse { duplicate_scan: Some(s) }), request_id)
    }

    async fn get_duplicate_scan(
        &self,
        request: Request<GetDuplicateScanRequest>,
    ) -> Result<Response<GetDuplicateScanResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        let result = Crm::get_duplicate_scan(self, &caller, &request.get_ref().duplicate_scan_id).await;
        reply(result.map(|s| GetDuplicateScanResponse { duplicate_scan: Some(s) }), request_id)
    }

    async fn list_duplicate_scans(
        &self,
        request: Request<ListDuplicateScansRequest>,
    ) -> Result<Response<ListDuplicateScansResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        reply(Crm::list_duplicate_scans(self, &caller, request.into_inner()).await, request_id)
    }

    async fn list_duplicate_pairs(
        &self,
        request: Request<ListDuplicatePairsRequest>,
    ) -> Result<Response<ListDuplicatePairsResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        reply(Crm::list_duplicate_pairs(self, &caller, request.into_inner()).await, request_id)
    }

    async fn dismiss_duplicate_pair(
        &self,
        request: Request<DismissDuplicatePairRequest>,
    ) -> Result<Response<DismissDuplicatePairResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        let result = Crm::dismiss_duplicate_pair(self, &caller, request.into_inner()).await;
        reply(result.map(|p| DismissDuplicatePairResponse { duplicate_pair: Some(p) }), request_id)
    }
}
