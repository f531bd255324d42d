//! What every CRM handler shares: the service state, the caller's entity
//! scope, audit events, duplicate candidates and small SQL helpers.

use std::sync::Arc;

use diesel::{
    QueryableByName,
    sql_types::{Array, BigInt, Double, SmallInt, Uuid as SqlUuid},
};
use diesel_async::AsyncPgConnection;
use socle_db::{Database, EntityScope};
use socle_errors::{Code, Error};
use socle_proto::socle::crm::v1::{DuplicateCandidate, DuplicateConflict, DuplicateReason, RecordKind};
use socle_server::{Principal, scope::ScopeResolver};
use tonic::Request;
use uuid::Uuid;

pub use socle_api::{etag, timestamp};
pub use socle_server::{reply, request_id::owned as rid};

/// The state every CRM API shares.
#[derive(Clone)]
pub struct Crm {
    /// The CRM database (the application role: row-level security applies).
    pub db: Database,
    /// The entities a caller may touch, from tenancy.
    pub scopes: Arc<ScopeResolver>,
}

/// Who calls, and for which entity.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The principal the authorization layer attached (none in `declared` mode).
    pub principal: Option<Principal>,
    /// The entity the caller acts for (`x-socle-entity`), if given.
    pub acting: Option<String>,
}

impl Caller {
    /// The caller of `request`.
    pub fn of<T>(request: &Request<T>) -> Self {
        Caller {
            principal: socle_server::principal_of(request),
            acting: request.metadata().get("x-socle-entity").and_then(|v| v.to_str().ok()).map(str::to_owned),
        }
    }

    /// The same caller, acting for `entity` (an entity the layer authorized).
    pub fn with_acting(&self, entity: Uuid) -> Self {
        Caller { principal: self.principal.clone(), acting: Some(entity.to_string()) }
    }

    /// The entity named by `value`, else the acting entity.
    pub fn entity_or_acting(&self, field: &str, value: &str) -> Result<Uuid, Error> {
        let text = if value.is_empty() { self.acting.clone().unwrap_or_default() } else { value.to_owned() };
        if text.is_empty() {
            return Err(Error::invalid_field(field, "is required (or the x-socle-entity header)"));
        }
        socle_api::parse_id(field, &text)
    }
}

impl Crm {
    /// Every entity where the caller holds `permission`: the scope of calls
    /// naming a record by id (a record elsewhere is then simply not found).
    pub async fn scope(&self, caller: &Caller, permission: &str) -> Result<EntityScope, Error> {
        let via = caller.acting.clone().unwrap_or_default();
        self.scopes.entities(caller.principal.as_ref(), permission, None, &via).await
    }

    /// The scope of a list: `entity` alone (the layer checked it), or the
    /// part of its subtree where the caller holds `permission`.
    pub async fn list_scope(
        &self,
        caller: &Caller,
        permission: &str,
        entity: Uuid,
        include_descendants: bool,
    ) -> Result<EntityScope, Error> {
        if !include_descendants {
            return Ok(EntityScope::entity(entity));
        }
        let scope = self.scopes.entities(caller.principal.as_ref(), permission, Some(entity), "").await?;
        Ok(match scope {
            // `declared` mode: only the named entity is known.
            EntityScope::System => EntityScope::entity(entity),
            scoped => scoped,
        })
    }

    /// A record that row-level security hid: if it exists in another
    /// entity, the refusal is audited like the layer's (`NOT_FOUND`, so
    /// that ids from elsewhere reveal nothing). `table` is a constant.
    pub async fn not_found(
        &self,
        caller: &Caller,
        table: &'static str,
        id: Uuid,
        permission: &str,
        what: &str,
    ) -> Error {
        #[derive(QueryableByName)]
        struct Owner {
            #[diesel(sql_type = SqlUuid)]
            entity_id: Uuid,
        }
        let owner = self
            .db
            .transaction(&EntityScope::System, move |conn| {
                Box::pin(async move {
                    use diesel_async::RunQueryDsl;
                    diesel::sql_query(format!("SELECT entity_id FROM {table} WHERE id = $1"))
                        .bind::<SqlUuid, _>(id)
                        .get_result::<Owner>(conn)
                        .await
                        .map_err(socle_db::DbError::from)
                })
            })
            .await;
        if let (Ok(owner), Some(principal)) = (owner, caller.principal.as_ref())
            && !matches!(principal, Principal::Anonymous)
        {
            socle_server::audit::record_denial(
                principal,
                permission,
                &owner.entity_id.to_string(),
                Code::NotFound,
                "record_in_other_entity",
            )
            .await;
        }
        Error::new(Code::NotFound, format!("{what} not found"))
    }
}

/// A CRM record whose changes are audited.
pub trait Audited: prost::Message + prost::Name {
    /// The audit resource type, e.g. `crm.organization`.
    const RESOURCE_TYPE: &'static str;
    /// Fields holding personal data of the record's subject (sealed by the
    /// audit store, erasable by crypto-shredding).
    const PERSONAL: &'static [&'static str] = &[];
    /// The record's id.
    fn record_id(&self) -> &str;
    /// The owning entity (the chain the events go to).
    fn owner(&self) -> &str;
    /// The person the personal fields are about.
    fn subject(&self) -> &str {
        ""
    }
}

/// Writes the audit event of a change to the outbox, in the transaction of
/// the change.
pub async fn audit<M: Audited>(
    conn: &mut AsyncPgConnection,
    action: &str,
    before: Option<&M>,
    after: Option<&M>,
) -> Result<(), Error> {
    let Some(record) = after.or(before) else { return Ok(()) };
    let event = socle_server::audit::change(
        crate::NAME,
        action,
        M::RESOURCE_TYPE,
        record.record_id(),
        record.owner(),
        before,
        after,
        M::PERSONAL,
        record.subject(),
    );
    socle_outbox::enqueue(conn, &event).await
}

/// A row of a `crm_*_duplicate_hints` function.
#[derive(Debug, Clone, QueryableByName)]
pub struct Hint {
    #[diesel(sql_type = SqlUuid)]
    pub id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    pub entity_id: Uuid,
    #[diesel(sql_type = Array<SmallInt>)]
    pub reasons: Vec<i16>,
    #[diesel(sql_type = Double)]
    pub score: f64,
}

/// Duplicate candidates from hints: records in entities the caller may read
/// get their id, entity, name and summary (from `describe`); the others
/// only their kind, score and reasons, flagged `in_other_entity`.
pub fn candidates(
    kind: RecordKind,
    hints: Vec<Hint>,
    readable: &EntityScope,
    describe: impl Fn(Uuid) -> Option<(String, String)>,
) -> Vec<DuplicateCandidate> {
    hints
        .into_iter()
        .map(|hint| {
            let reasons = hint
                .reasons
                .iter()
                .filter_map(|r| DuplicateReason::try_from(i32::from(*r)).ok())
                .map(|r| r as i32)
                .collect::<Vec<_>>();
            let score = (hint.score * 1000.0).round() / 1000.0;
            match readable.allows(hint.entity_id).then(|| describe(hint.id)).flatten() {
                Some((display_name, summary)) => DuplicateCandidate {
                    record_kind: kind as i32,
                    record_id: hint.id.to_string(),
                    score,
                    reasons,
                    in_other_entity: false,
                    entity_id: hint.entity_id.to_string(),
                    display_name,
                    summary,
                },
                None => DuplicateCandidate {
                    record_kind: kind as i32,
                    score,
                    reasons,
                    in_other_entity: true,
                    ..DuplicateCandidate::default()
                },
            }
        })
        .collect()
}

/// The `ALREADY_EXISTS` error of a create or update that found likely
/// duplicates, with the candidates as a `DuplicateConflict` detail.
pub fn duplicate_conflict(candidates: Vec<DuplicateCandidate>) -> Error {
    Error::new(
        Code::AlreadyExists,
        "des doublons probables existent : vérifiez-les, ou confirmez la création (allow_duplicates)",
    )
    .with_reason("DUPLICATE_SUSPECTED")
    .with_detail(&DuplicateConflict { candidates })
}

/// `%`, `_` and `\` taken literally in a `LIKE` pattern.
pub fn like_literal(text: &str) -> String {
    text.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")
}

/// A `count(*) AS n` row.
#[derive(QueryableByName)]
pub struct Count {
    /// The count.
    #[diesel(sql_type = BigInt)]
    pub n: i64,
}

/// Adds the violations of `error` (an `INVALID_ARGUMENT`) to `violations`;
/// other errors are returned.
pub fn absorb(violations: &mut socle_api::Violations, error: Error) -> Result<(), Error> {
    if error.code() != Code::InvalidArgument || error.violations().is_empty() {
        return Err(error);
    }
    for v in error.violations() {
        violations.add(v.field.clone(), v.description.clone());
    }
    Ok(())
}

/// Today in Europe/Paris, as SQL (membership statuses follow French dates).
pub const TODAY_SQL: &str = "(now() AT TIME ZONE 'Europe/Paris')::date";

/// The accent- and case-insensitive key PostgreSQL's `socle_fold` computes
/// (stored columns and indexes use it): [`crate::validate::fold`], except
/// that `œ` and `æ` fold to one letter, as in SQL.
pub fn sql_fold(text: &str) -> String {
    let single: String = text
        .chars()
        .map(|c| match c {
            'œ' | 'Œ' => 'o',
            'æ' | 'Æ' => 'a',
            c => c,
        })
        .collect();
    crate::validate::fold(&single)
}
