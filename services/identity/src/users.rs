//! Account administration beyond the lifecycle calls: listing accounts,
//! profile updates (by an administrator, `UpdateUser`, or by the person,
//! `UpdateMe`), deletion and second-factor resets, and the tenancy calls
//! they need (readable entities, grant checks, grant removal), made with
//! identity's own service-account token.
//!
//! Each write is one `db.transaction`, so that an audit event can be
//! written next to it.

use diesel::{
    QueryableByName,
    result::{DatabaseErrorKind, Error as DieselError},
    sql_types::{Array, BigInt, Nullable, SmallInt, Text, Uuid as SqlUuid},
};
use diesel_async::RunQueryDsl;
use socle_api::{FieldMask, PageToken, Violations, check_etag, page_size, parse_id, parse_optional_id};
use socle_db::{DbError, EntityScope};
use socle_errors::{Code, Error};
use socle_proto::socle::{
    identity::v1::{ListUsersRequest, User, UserState},
    tenancy::v1::{
        DeletePrincipalGrantsRequest, ExplainAccessRequest, ListAccessibleEntitiesRequest,
        access_service_client::AccessServiceClient, grant_service_client::GrantServiceClient,
    },
    r#type::v1::{ActorKind, ActorRef},
};
use socle_server::Principal;
use uuid::Uuid;

use crate::{
    administration::etag_version,
    audit::{self, By},
    service::{Identity, SELECT_USER, UserKey, UserRow, load_user, normalize_email, user_where, valid_email},
};

/// Fields an administrator may change (`UpdateUser`).
pub(crate) const ADMIN_FIELDS: &[&str] =
    &["entity_id", "email", "given_name", "family_name", "display_name", "locale", "default_entity_id"];
/// Fields a person may change on their own account (`UpdateMe`).
pub(crate) const SELF_FIELDS: &[&str] = &["given_name", "family_name", "display_name", "locale", "default_entity_id"];

/// A principal as tenancy names it.
pub(crate) fn actor_of(principal: &Principal) -> Option<ActorRef> {
    match principal {
        Principal::User { user_id, .. } => {
            Some(ActorRef { kind: ActorKind::User as i32, id: user_id.clone(), display_name: String::new() })
        }
        Principal::Service { account_id } => Some(ActorRef {
            kind: ActorKind::ServiceAccount as i32,
            id: account_id.clone(),
            display_name: String::new(),
        }),
        Principal::Anonymous => None,
    }
}

fn tenancy_down(what: &'static str) -> impl Fn(tonic::Status) -> Error {
    move |status| {
        tracing::warn!(code = ?status.code(), message = status.message(), what, "tenancy call failed");
        Error::unavailable(format!("{what}: tenancy is unavailable, retry later"))
    }
}

/// A BCP 47 tag, loosely: `fr`, `fr-FR`, `en-GB`, `zh-Hant-TW`.
fn valid_locale(tag: &str) -> bool {
    let mut parts = tag.split('-');
    let first = parts.next().unwrap_or_default();
    (2..=3).contains(&first.len())
        && first.chars().all(|c| c.is_ascii_alphabetic())
        && parts.all(|p| (2..=8).contains(&p.len()) && p.chars().all(|c| c.is_ascii_alphanumeric()))
}

/// `%`, `_` and `\` taken literally in a `LIKE` pattern.
fn like_literal(text: &str) -> String {
    text.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")
}

impl Identity {
    /// A request to tenancy with identity's token, acting for `entity`.
    async fn tenancy_request<T>(&self, message: T, entity: &str) -> Result<tonic::Request<T>, Error> {
        let platform = self.platform().ok_or_else(|| Error::internal("no platform clients"))?;
        let mut request = platform.request(message).await?;
        request.metadata_mut().insert(
            "x-socle-entity",
            entity.parse().map_err(|_| Error::invalid_field("entity_id", "is not a valid entity id"))?,
        );
        Ok(request)
    }

    /// The entities of `root`'s subtree where `principal` holds `permission`.
    pub(crate) async fn readable_entities(
        &self,
        principal: &Principal,
        permission: &str,
        root: Uuid,
    ) -> Result<Vec<Uuid>, Error> {
        let platform = self.platform().ok_or_else(|| Error::internal("no platform clients"))?;
        let Some(actor) = actor_of(principal) else { return Ok(Vec::new()) };
        let request = self
            .tenancy_request(
                ListAccessibleEntitiesRequest {
                    principal: Some(actor),
                    permission: permission.to_owned(),
                    root_entity_id: root.to_string(),
                    include_archived: true,
                },
                &root.to_string(),
            )
            .await?;
        let reply = AccessServiceClient::new(platform.tenancy.clone())
            .list_accessible_entities(request)
            .await
            .map_err(tenancy_down("the entities you may read"))?
            .into_inner();
        Ok(reply.entity_ids.iter().filter_map(|id| Uuid::parse_str(id).ok()).collect())
    }

    /// Whether `user` holds any (unexpired) grant reaching `entity`; false
    /// for an entity that does not exist.
    async fn holds_grant_on(&self, user: Uuid, entity: Uuid) -> Result<bool, Error> {
        let platform = self.platform().ok_or_else(|| Error::internal("no platform clients"))?;
        let request = self
            .tenancy_request(
                ExplainAccessRequest {
                    principal: Some(ActorRef {
                        kind: ActorKind::User as i32,
                        id: user.to_string(),
                        display_name: String::new(),
                    }),
                    entity_id: entity.to_string(),
                    service: String::new(),
                },
                &entity.to_string(),
            )
            .await?;
        match AccessServiceClient::new(platform.tenancy.clone()).explain_access(request).await {
            Ok(reply) => Ok(!reply.into_inner().permissions.is_empty()),
            // Tenancy's layer refuses a lookup on an entity that does not exist.
            Err(status) if matches!(status.code(), tonic::Code::PermissionDenied | tonic::Code::NotFound) => Ok(false),
            Err(status) => Err(tenancy_down("the grants")(status)),
        }
    }

    /// Removes every grant of a principal in tenancy (`DeletePrincipalGrants`,
    /// reserved to identity's service account), acting for `entity`. Nothing
    /// to do without platform clients (`declared` mode).
    pub(crate) async fn purge_grants(&self, kind: ActorKind, id: Uuid, entity: &str) -> Result<i32, Error> {
        let Some(platform) = self.platform() else { return Ok(0) };
        let request = self
            .tenancy_request(
                DeletePrincipalGrantsRequest {
                    principal: Some(ActorRef { kind: kind as i32, id: id.to_string(), display_name: String::new() }),
                },
                entity,
            )
            .await?;
        let reply = GrantServiceClient::new(platform.tenancy.clone())
            .delete_principal_grants(request)
            .await
            .map_err(tenancy_down("removing the grants (nothing was deleted)"))?;
        Ok(reply.into_inner().deleted_grant_count)
    }

    /// `ListUsers`.
    pub(crate) async fn list_users(
        &self,
        principal: Option<&Principal>,
        acting: Option<String>,
        r: ListUsersRequest,
    ) -> Result<(Vec<User>, String), Error> {
        let size = page_size(r.page_size)?;
        let entity_text = if r.entity_id.is_empty() { acting.unwrap_or_default() } else { r.entity_id.clone() };
        if entity_text.is_empty() {
            return Err(Error::invalid_field("entity_id", "is required (or the x-socle-entity header)"));
        }
        let entity = parse_id("entity_id", &entity_text)?;
        let mut states = Vec::new();
        for state in &r.states {
            match UserState::try_from(*state) {
                Ok(UserState::Unspecified) | Err(_) => {
                    return Err(Error::invalid_field("states", "contains an unknown state"));
                }
                Ok(s) => states.push(s as i16),
            }
        }
        states.sort_unstable();
        states.dedup();
        let order = r.order_by.trim().to_owned();
        let (key, descending) = match order.as_str() {
            "" | "family_name" => {
                ("socle_fold(family_name) || chr(1) || socle_fold(given_name) || chr(1) || id::text", false)
            }
            "email" => ("email_normalized || chr(1) || id::text", false),
            "create_time desc" => {
                ("to_char(create_time AT TIME ZONE 'UTC', 'YYYYMMDDHH24MISSUS') || chr(1) || id::text", true)
            }
            "last_login_time desc" => (
                "coalesce(to_char(last_login_time AT TIME ZONE 'UTC', 'YYYYMMDDHH24MISSUS'), '0') || chr(1) || id::text",
                true,
            ),
            _ => {
                return Err(Error::invalid_field(
                    "order_by",
                    "must be one of: family_name, email, create_time desc, last_login_time desc",
                ));
            }
        };
        let query = r.query.trim().to_owned();
        let filters = format!("e={entity};d={};s={states:?};q={query};o={order}", r.include_descendants);
        let after = PageToken::<String>::decode(&r.page_token, &filters)?.map(|t| t.after);
        // The entity itself was checked by the layer; its descendants are
        // those where the caller may read accounts, as tenancy says.
        let entities = if r.include_descendants {
            match (self.platform(), principal) {
                (Some(_), Some(p)) if !matches!(p, Principal::Anonymous) => {
                    let mut readable = self.readable_entities(p, "identity.users.read", entity).await?;
                    if !readable.contains(&entity) {
                        readable.push(entity);
                    }
                    readable
                }
                (None, _) => {
                    return Err(Error::new(
                        Code::FailedPrecondition,
                        "include_descendants needs the entity tree: identity must run with [auth] mode = \"tokens\"",
                    ));
                }
                _ => vec![entity],
            }
        } else {
            vec![entity]
        };
        let pattern = like_literal(&query);
        self.db()
            .transaction(&EntityScope::System, move |conn| {
                Box::pin(async move {
                    #[derive(QueryableByName)]
                    struct Keyed {
                        #[diesel(embed)]
                        user: UserRow,
                        #[diesel(sql_type = Text)]
                        sort_key: String,
                    }
                    let select = SELECT_USER.trim_end_matches("FROM users").trim_end().trim_start_matches("SELECT");
                    let rows: Vec<Keyed> = diesel::sql_query(format!(
                        "SELECT * FROM (SELECT {select}, {key} COLLATE \"C\" AS sort_key FROM users
                           WHERE entity_id = ANY($1)
                             AND (cardinality($2::smallint[]) = 0 OR state = ANY($2))
                             AND ($3 = '' OR socle_fold(given_name || ' ' || family_name || ' ' || display_name || ' ' || email)
                                             LIKE '%' || socle_fold($3) || '%')) u
                          WHERE $4::text IS NULL OR sort_key {cmp} $4
                          ORDER BY sort_key {dir} LIMIT $5",
                        cmp = if descending { "<" } else { ">" },
                        dir = if descending { "DESC" } else { "ASC" },
                    ))
                    .bind::<Array<SqlUuid>, _>(&entities)
                    .bind::<Array<SmallInt>, _>(&states)
                    .bind::<Text, _>(&pattern)
                    .bind::<Nullable<Text>, _>(after)
                    .bind::<BigInt, _>(size as i64 + 1)
                    .load(conn)
                    .await
                    .map_err(DbError::from)?;
                    let more = rows.len() > size;
                    let rows = &rows[..rows.len().min(size)];
                    let next = match (more, rows.last()) {
                        (true, Some(last)) => PageToken::encode(last.sort_key.clone(), &filters),
                        _ => String::new(),
                    };
                    Ok((rows.iter().map(|k| k.user.to_proto()).collect(), next))
                })
            })
            .await
    }

    /// `UpdateUser` (`admin`, record-checked) and `UpdateMe`: the fields of
    /// `mask` (within `allowed`), under the current etag.
    pub(crate) async fn update_profile(
        &self,
        principal: Option<&Principal>,
        user_id: &str,
        changes: Option<User>,
        mask: Option<&prost_types::FieldMask>,
        etag: &str,
        admin: bool,
    ) -> Result<User, Error> {
        let mask = FieldMask::new(mask, if admin { ADMIN_FIELDS } else { SELF_FIELDS })?;
        let changes = changes.ok_or_else(|| Error::invalid_field("user", "is required"))?;
        let current = if admin { self.managed(principal, user_id).await?.1 } else { self.user_by_id(user_id).await? };
        let id = parse_id("user_id", user_id)?;
        check_etag(etag, etag_version(&current.etag), true)?;

        let mut v = Violations::new();
        let mut entity = None;
        if mask.contains("entity_id") {
            match parse_id("user.entity_id", &changes.entity_id) {
                Ok(e) => entity = Some(e),
                Err(_) => v.add("user.entity_id", "must be a UUID"),
            }
        }
        if mask.contains("email") {
            v.check(valid_email(&changes.email), "user.email", "must be an e-mail address");
        }
        for (field, value) in [("given_name", &changes.given_name), ("family_name", &changes.family_name)] {
            if mask.contains(field) {
                v.check(value.trim().chars().count() <= 100, &format!("user.{field}"), "at most 100 characters");
            }
        }
        if mask.contains("locale") && !changes.locale.trim().is_empty() {
            v.check(valid_locale(changes.locale.trim()), "user.locale", "must be a BCP 47 tag, e.g. fr-FR");
        }
        let mut default_entity = None;
        if mask.contains("default_entity_id") {
            match parse_optional_id("user.default_entity_id", &changes.default_entity_id) {
                Ok(d) => default_entity = d,
                Err(_) => v.add("user.default_entity_id", "must be a UUID"),
            }
        }
        v.into_result()?;

        // Moving the account: the caller must manage accounts at the destination too.
        if let Some(destination) = entity
            && destination.to_string() != current.entity_id
            && self.check_record(principal, "identity.users.manage", &destination.to_string(), "entity").await.is_err()
        {
            return Err(Error::invalid_field(
                "user.entity_id",
                "names no entity where you may manage accounts (identity.users.manage)",
            ));
        }
        if let Some(default) = default_entity
            && self.platform().is_some()
            && !self.holds_grant_on(id, default).await?
        {
            return Err(Error::invalid_field(
                "user.default_entity_id",
                "must be an entity where the user holds a grant",
            ));
        }

        let etag_given = etag.to_owned();
        self.db()
            .transaction(&EntityScope::System, move |conn| {
                Box::pin(async move {
                    let row = user_where(conn, "id = $1", UserKey::Id(id)).await?.ok_or_else(|| Error::not_found("user", id))?;
                    check_etag(&etag_given, row.version, true)?;
                    let mut next = row.clone();
                    if let Some(entity) = entity {
                        next.entity_id = entity;
                    }
                    if mask.contains("email") {
                        next.email = changes.email.trim().to_owned();
                    }
                    if mask.contains("given_name") {
                        next.given_name = changes.given_name.trim().to_owned();
                    }
                    if mask.contains("family_name") {
                        next.family_name = changes.family_name.trim().to_owned();
                    }
                    if mask.contains("locale") {
                        let locale = changes.locale.trim();
                        next.locale = if locale.is_empty() { "fr-FR".to_owned() } else { locale.to_owned() };
                    }
                    if mask.contains("default_entity_id") {
                        next.default_entity_id = default_entity;
                    }
                    if mask.contains("display_name") {
                        let display = changes.display_name.trim();
                        next.display_name = if display.is_empty() {
                            format!("{} {}", next.given_name, next.family_name).trim().to_owned()
                        } else {
                            display.to_owned()
                        };
                    }
                    if !(1..=120).contains(&next.display_name.chars().count()) {
                        return Err(Error::invalid_field(
                            "user.display_name",
                            "is required (or given and family names), at most 120 characters",
                        ));
                    }
                    let updated = diesel::sql_query(
                        "UPDATE users SET entity_id = $2, email = $3, email_normalized = $4, given_name = $5, family_name = $6,
                                display_name = $7, locale = $8, default_entity_id = $9, version = version + 1, update_time = now()
                          WHERE id = $1",
                    )
                    .bind::<SqlUuid, _>(id)
                    .bind::<SqlUuid, _>(next.entity_id)
                    .bind::<Text, _>(&next.email)
                    .bind::<Text, _>(normalize_email(&next.email))
                    .bind::<Text, _>(&next.given_name)
                    .bind::<Text, _>(&next.family_name)
                    .bind::<Text, _>(&next.display_name)
                    .bind::<Text, _>(&next.locale)
                    .bind::<Nullable<SqlUuid>, _>(next.default_entity_id)
                    .execute(conn)
                    .await;
                    match updated {
                        Err(DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, info))
                            if info.constraint_name() == Some("users_email_key") =>
                        {
                            return Err(Error::new(Code::AlreadyExists, "a user with this e-mail already exists")
                                .with_violation("user.email", "is already used"));
                        }
                        other => other.map_err(DbError::from)?,
                    };
                    let after = load_user(conn, id).await?;
                    audit::user_changed(conn, "identity.users.update", By::Caller, Some(&row.to_proto()), Some(&after), &[])
                        .await?;
                    Ok(after)
                })
            })
            .await
    }

    /// `DeleteUser`: the grants first (tenancy), then, in one transaction,
    /// the account with its sessions, tokens, challenges, reset links,
    /// queued mails and sign-in counters. A failure after the grants are
    /// gone leaves an account without grants; the retry finishes.
    pub(crate) async fn delete_user(
        &self,
        principal: Option<&Principal>,
        user_id: &str,
        etag: &str,
    ) -> Result<(), Error> {
        let (id, user) = self.managed(principal, user_id).await?;
        check_etag(etag, etag_version(&user.etag), false)?;
        // Tenancy checks the permission on the entity the caller acts for
        // (active, since the caller manages accounts there), else the home one.
        let acting = match principal {
            Some(Principal::User { entity_id: Some(e), .. }) if !e.is_empty() => e.clone(),
            _ => user.entity_id.clone(),
        };
        let removed = self.purge_grants(ActorKind::User, id, &acting).await?;
        let etag_given = etag.to_owned();
        self.db()
            .transaction(&EntityScope::System, move |conn| {
                Box::pin(async move {
                    let Some(row) = user_where(conn, "id = $1", UserKey::Id(id)).await? else {
                        return Err(Error::not_found("user", id));
                    };
                    check_etag(&etag_given, row.version, false)?;
                    let email = normalize_email(&row.email);
                    diesel::sql_query("DELETE FROM login_throttle WHERE key = ANY($1) OR starts_with(key, $2) OR starts_with(key, $3)")
                        .bind::<Array<Text>, _>(vec![format!("account:{email}"), format!("reset-account:{email}")])
                        .bind::<Text, _>(format!("pair:{email}|"))
                        .bind::<Text, _>(format!("reset-pair:{email}|"))
                        .execute(conn)
                        .await
                        .map_err(DbError::from)?;
                    // Sessions, refresh tokens, challenges, reset links and
                    // queued mails go with the row (ON DELETE CASCADE).
                    diesel::sql_query("DELETE FROM users WHERE id = $1")
                        .bind::<SqlUuid, _>(id)
                        .execute(conn)
                        .await
                        .map_err(DbError::from)?;
                    // The values of the deleted account stay in the trail
                    // sealed only (personal fields, per subject: erasable).
                    audit::user_changed(
                        conn,
                        "identity.users.delete",
                        By::Caller,
                        Some(&row.to_proto()),
                        None,
                        &[("grants_removed", audit::number(i64::from(removed)))],
                    )
                    .await?;
                    Ok::<_, Error>(())
                })
            })
            .await?;
        tracing::info!(user = %id, grants_removed = removed, "user deleted");
        Ok(())
    }

    /// `ResetUserSecondFactor`: no more TOTP nor recovery codes; every
    /// session ends.
    pub(crate) async fn reset_second_factor(
        &self,
        principal: Option<&Principal>,
        user_id: &str,
        reason: &str,
    ) -> Result<User, Error> {
        let (id, _) = self.managed(principal, user_id).await?;
        let reason = reason.trim().to_owned();
        self.db()
            .transaction(&EntityScope::System, move |conn| {
                Box::pin(async move {
                    let before = load_user(conn, id).await?;
                    diesel::sql_query(
                        "UPDATE users SET totp_secret = NULL, totp_pending_secret = NULL, totp_pending_expire_time = NULL,
                                totp_last_step = NULL, totp_recovery_hashes = '{}', version = version + 1, update_time = now()
                          WHERE id = $1",
                    )
                    .bind::<SqlUuid, _>(id)
                    .execute(conn)
                    .await
                    .map_err(DbError::from)?;
                    diesel::sql_query("DELETE FROM login_challenges WHERE user_id = $1")
                        .bind::<SqlUuid, _>(id)
                        .execute(conn)
                        .await
                        .map_err(DbError::from)?;
                    let revoked = diesel::sql_query(
                        "UPDATE sessions SET revoke_time = now(), revoke_reason = 'second factor reset by an administrator'
                          WHERE user_id = $1 AND revoke_time IS NULL",
                    )
                    .bind::<SqlUuid, _>(id)
                    .execute(conn)
                    .await
                    .map_err(DbError::from)?;
                    let after = load_user(conn, id).await?;
                    audit::user_changed(
                        conn,
                        "identity.second_factor.reset",
                        By::Caller,
                        Some(&before),
                        Some(&after),
                        &[("reason", audit::text(&reason)), ("revoked_session_count", audit::number(revoked as i64))],
                    )
                    .await?;
                    Ok::<_, Error>(())
                })
            })
            .await?;
        self.user_by_id(user_id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locales_and_like_patterns() {
        assert!(valid_locale("fr-FR") && valid_locale("fr") && valid_locale("zh-Hant-TW"));
        assert!(!valid_locale("français") && !valid_locale("f") && !valid_locale("fr_FR"));
        assert_eq!(like_literal("50%_a\\"), "50\\%\\_a\\\\");
    }
}
