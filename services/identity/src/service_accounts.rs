//! Service accounts (`socle.identity.v1.ServiceAccountService`): client
//! credentials for service-to-service calls. The secret is shown once, at
//! creation or rotation; a rotation keeps the previous secret valid for a
//! grace period so that deployments can roll over.

use aws_lc_rs::constant_time::verify_slices_are_equal;
use chrono::{DateTime, Duration, Utc};
use diesel::{
    QueryableByName,
    result::{DatabaseErrorKind, Error as DieselError},
    sql_types::{Array, BigInt, Bool, Bytea, Nullable, Text, Timestamptz, Uuid as SqlUuid},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use socle_api::{FieldMask, PageToken, Violations, check_etag, etag, page_size, parse_id, timestamp};
use socle_db::{DbError, EntityScope, idempotency};
use socle_errors::{Code, Error};
use socle_proto::socle::{
    identity::v1::{service_account_service_server::ServiceAccountService, *},
    r#type::v1::ActorKind,
};
use socle_server::{reply, request_id::owned as rid};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::{
    audit,
    service::Identity,
    tokens::{Subject, hash_token, issue_access, new_refresh_token},
};

#[derive(Debug, Clone, QueryableByName)]
pub(crate) struct AccountRow {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    entity_id: Uuid,
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = Text)]
    display_name: String,
    #[diesel(sql_type = Text)]
    description: String,
    #[diesel(sql_type = Text)]
    client_id: String,
    #[diesel(sql_type = Bytea)]
    pub(crate) secret_hash: Vec<u8>,
    #[diesel(sql_type = Timestamptz)]
    secret_create_time: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Bytea>)]
    previous_secret_hash: Option<Vec<u8>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    previous_secret_expire_time: Option<DateTime<Utc>>,
    #[diesel(sql_type = Bool)]
    disabled: bool,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    last_token_time: Option<DateTime<Utc>>,
    #[diesel(sql_type = Timestamptz)]
    create_time: DateTime<Utc>,
    #[diesel(sql_type = Timestamptz)]
    update_time: DateTime<Utc>,
    #[diesel(sql_type = BigInt)]
    version: i64,
}

const SELECT: &str =
    "SELECT id, entity_id, name, display_name, description, client_id, secret_hash, secret_create_time,
        previous_secret_hash, previous_secret_expire_time, disabled, last_token_time, create_time, update_time, version
   FROM service_accounts";

impl AccountRow {
    pub(crate) fn to_proto(&self) -> ServiceAccount {
        ServiceAccount {
            id: self.id.to_string(),
            entity_id: self.entity_id.to_string(),
            name: self.name.clone(),
            display_name: self.display_name.clone(),
            description: self.description.clone(),
            client_id: self.client_id.clone(),
            disabled: self.disabled,
            secret_create_time: Some(timestamp(self.secret_create_time)),
            previous_secret_expire_time: self.previous_secret_expire_time.map(timestamp),
            last_token_time: self.last_token_time.map(timestamp),
            create_time: Some(timestamp(self.create_time)),
            update_time: Some(timestamp(self.update_time)),
            etag: etag(self.version),
        }
    }

    /// Whether `secret` is the current one, or the previous one within its grace.
    fn accepts(&self, secret: &str) -> bool {
        let presented = hash_token(secret);
        let current = verify_slices_are_equal(&presented, &self.secret_hash).is_ok();
        let previous = match (&self.previous_secret_hash, self.previous_secret_expire_time) {
            (Some(hash), Some(until)) if until > Utc::now() => verify_slices_are_equal(&presented, hash).is_ok(),
            _ => false,
        };
        current || previous
    }
}

pub(crate) async fn load(conn: &mut AsyncPgConnection, clause: &str, key: &str) -> Result<Option<AccountRow>, DbError> {
    let query = diesel::sql_query(format!("{SELECT} WHERE {clause} FOR UPDATE"));
    let result = match Uuid::parse_str(key) {
        Ok(id) if clause.starts_with("id") => query.bind::<SqlUuid, _>(id).get_result(conn).await,
        _ => query.bind::<Text, _>(key).get_result(conn).await,
    };
    match result {
        Ok(row) => Ok(Some(row)),
        Err(DieselError::NotFound) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

impl Identity {
    async fn account(&self, id: Uuid) -> Result<ServiceAccount, Error> {
        self.db()
            .transaction(&EntityScope::System, move |conn| {
                Box::pin(async move {
                    let row = load(conn, "id = $1", &id.to_string())
                        .await?
                        .ok_or_else(|| Error::not_found("service account", id))?;
                    Ok(row.to_proto())
                })
            })
            .await
    }
}

#[tonic::async_trait]
impl ServiceAccountService for Identity {
    async fn list_service_accounts(
        &self,
        request: Request<ListServiceAccountsRequest>,
    ) -> Result<Response<ListServiceAccountsResponse>, Status> {
        let request_id = rid(&request);
        let principal = socle_server::principal_of(&request);
        let acting = request.metadata().get("x-socle-entity").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let r = request.into_inner();
        let result = async {
            let size = page_size(r.page_size)?;
            let entity_text = if r.entity_id.is_empty() { acting.unwrap_or_default() } else { r.entity_id.clone() };
            if entity_text.is_empty() {
                return Err(Error::invalid_field("entity_id", "is required (or the x-socle-entity header)"));
            }
            let entity = parse_id("entity_id", &entity_text)?;
            let order = r.order_by.trim().to_owned();
            let (key, descending) = match order.as_str() {
                "" | "name" => ("name || chr(1) || id::text", false),
                "create_time desc" => {
                    ("to_char(create_time AT TIME ZONE 'UTC', 'YYYYMMDDHH24MISSUS') || chr(1) || id::text", true)
                }
                "last_token_time desc" => (
                    "coalesce(to_char(last_token_time AT TIME ZONE 'UTC', 'YYYYMMDDHH24MISSUS'), '0') || chr(1) || id::text",
                    true,
                ),
                _ => {
                    return Err(Error::invalid_field(
                        "order_by",
                        "must be one of: name, create_time desc, last_token_time desc",
                    ));
                }
            };
            let query = r.query.trim().to_owned();
            let filters = format!("e={entity};d={};q={query};o={order}", r.include_descendants);
            let after = PageToken::<String>::decode(&r.page_token, &filters)?.map(|t| t.after);
            let entities = if r.include_descendants {
                match (self.platform(), principal.as_ref()) {
                    (Some(_), Some(p)) if !matches!(p, socle_server::Principal::Anonymous) => {
                        let mut readable = self.readable_entities(p, "identity.service_accounts.read", entity).await?;
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
            let pattern = query.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
            self.db()
                .transaction(&EntityScope::System, move |conn| {
                    Box::pin(async move {
                        #[derive(QueryableByName)]
                        struct Keyed {
                            #[diesel(embed)]
                            account: AccountRow,
                            #[diesel(sql_type = Text)]
                            sort_key: String,
                        }
                        let columns = SELECT.trim_end_matches("FROM service_accounts").trim_end().trim_start_matches("SELECT");
                        let rows: Vec<Keyed> = diesel::sql_query(format!(
                            "SELECT * FROM (SELECT {columns}, {key} COLLATE \"C\" AS sort_key FROM service_accounts
                               WHERE entity_id = ANY($1)
                                 AND ($2 = '' OR socle_fold(name || ' ' || display_name) LIKE '%' || socle_fold($2) || '%')) a
                              WHERE $3::text IS NULL OR sort_key {cmp} $3
                              ORDER BY sort_key {dir} LIMIT $4",
                            cmp = if descending { "<" } else { ">" },
                            dir = if descending { "DESC" } else { "ASC" },
                        ))
                        .bind::<Array<SqlUuid>, _>(&entities)
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
                        Ok(ListServiceAccountsResponse {
                            service_accounts: rows.iter().map(|k| k.account.to_proto()).collect(),
                            next_page_token: next,
                        })
                    })
                })
                .await
        }
        .await;
        reply(result, request_id)
    }

    async fn update_service_account(
        &self,
        request: Request<UpdateServiceAccountRequest>,
    ) -> Result<Response<UpdateServiceAccountResponse>, Status> {
        let request_id = rid(&request);
        let principal = socle_server::principal_of(&request);
        let r = request.into_inner();
        let result = async {
            let mask = FieldMask::new(r.update_mask.as_ref(), &["display_name", "description", "disabled"])?;
            let changes = r.service_account.ok_or_else(|| Error::invalid_field("service_account", "is required"))?;
            let id = parse_id("service_account_id", &r.service_account_id)?;
            let account = self.account(id).await?;
            self.check_record(
                principal.as_ref(),
                "identity.service_accounts.manage",
                &account.entity_id,
                "service account",
            )
            .await?;
            if r.etag.is_empty() {
                return Err(Error::invalid_field("etag", "is required: send the etag last read"));
            }
            let mut v = Violations::new();
            if mask.contains("display_name") {
                v.check(
                    (1..=120).contains(&changes.display_name.trim().chars().count()),
                    "service_account.display_name",
                    "is required, at most 120 characters",
                );
            }
            if mask.contains("description") {
                v.check(
                    changes.description.chars().count() <= 1000,
                    "service_account.description",
                    "at most 1000 characters",
                );
            }
            v.into_result()?;
            let etag_given = r.etag;
            let row = self
                .db()
                .transaction(&EntityScope::System, move |conn| {
                    Box::pin(async move {
                        let current = load(conn, "id = $1", &id.to_string())
                            .await?
                            .ok_or_else(|| Error::not_found("service account", id))?;
                        check_etag(&etag_given, current.version, true)?;
                        let display = if mask.contains("display_name") {
                            changes.display_name.trim().to_owned()
                        } else {
                            current.display_name.clone()
                        };
                        let description = if mask.contains("description") {
                            changes.description.trim().to_owned()
                        } else {
                            current.description.clone()
                        };
                        let disabled = if mask.contains("disabled") { changes.disabled } else { current.disabled };
                        diesel::sql_query(
                            "UPDATE service_accounts SET display_name = $2, description = $3, disabled = $4,
                                    version = version + 1, update_time = now()
                              WHERE id = $1",
                        )
                        .bind::<SqlUuid, _>(id)
                        .bind::<Text, _>(&display)
                        .bind::<Text, _>(&description)
                        .bind::<Bool, _>(disabled)
                        .execute(conn)
                        .await
                        .map_err(DbError::from)?;
                        let after = load(conn, "id = $1", &id.to_string())
                            .await?
                            .ok_or_else(|| Error::not_found("service account", id))?;
                        audit::service_account_changed(
                            conn,
                            "identity.service_accounts.update",
                            Some(&current.to_proto()),
                            Some(&after.to_proto()),
                            &[],
                        )
                        .await?;
                        Ok::<_, Error>(after)
                    })
                })
                .await?;
            Ok(UpdateServiceAccountResponse { service_account: Some(row.to_proto()) })
        }
        .await;
        reply(result, request_id)
    }

    async fn delete_service_account(
        &self,
        request: Request<DeleteServiceAccountRequest>,
    ) -> Result<Response<DeleteServiceAccountResponse>, Status> {
        let request_id = rid(&request);
        let principal = socle_server::principal_of(&request);
        let r = request.into_inner();
        let result = async {
            let id = parse_id("service_account_id", &r.service_account_id)?;
            let account = self.account(id).await?;
            self.check_record(
                principal.as_ref(),
                "identity.service_accounts.manage",
                &account.entity_id,
                "service account",
            )
            .await?;
            check_etag(&r.etag, crate::administration::etag_version(&account.etag), false)?;
            // The grants first: a failure leaves the account whole, and a
            // retry after a later failure finds no grant left to remove.
            let acting = match principal.as_ref() {
                Some(socle_server::Principal::User { entity_id: Some(e), .. }) if !e.is_empty() => e.clone(),
                _ => account.entity_id.clone(),
            };
            let removed = self.purge_grants(ActorKind::ServiceAccount, id, &acting).await?;
            let etag_given = r.etag;
            self.db()
                .transaction(&EntityScope::System, move |conn| {
                    Box::pin(async move {
                        let current = load(conn, "id = $1", &id.to_string())
                            .await?
                            .ok_or_else(|| Error::not_found("service account", id))?;
                        check_etag(&etag_given, current.version, false)?;
                        diesel::sql_query("DELETE FROM service_accounts WHERE id = $1")
                            .bind::<SqlUuid, _>(id)
                            .execute(conn)
                            .await
                            .map_err(DbError::from)?;
                        audit::service_account_changed(
                            conn,
                            "identity.service_accounts.delete",
                            Some(&current.to_proto()),
                            None,
                            &[("grants_removed", audit::number(i64::from(removed)))],
                        )
                        .await?;
                        Ok::<_, Error>(())
                    })
                })
                .await?;
            tracing::info!(service_account = %id, grants_removed = removed, "service account deleted");
            Ok(DeleteServiceAccountResponse {})
        }
        .await;
        reply(result, request_id)
    }

    async fn create_service_account(
        &self,
        request: Request<CreateServiceAccountRequest>,
    ) -> Result<Response<CreateServiceAccountResponse>, Status> {
        let request_id = rid(&request);
        let r = request.into_inner();
        let result = async {
            let key = parse_id("request_id", &r.request_id)?;
            let account = r.service_account.ok_or_else(|| Error::invalid_field("service_account", "is required"))?;
            let entity = parse_id("service_account.entity_id", &account.entity_id)?;
            let mut v = Violations::new();
            let name_ok = (2..=63).contains(&account.name.len())
                && account.name.starts_with(|c: char| c.is_ascii_lowercase())
                && account.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
            v.check(name_ok, "service_account.name", "is required: lower case letters, digits and dashes, e.g. crm-service");
            v.check(
                (1..=120).contains(&account.display_name.trim().chars().count()),
                "service_account.display_name",
                "is required, at most 120 characters",
            );
            v.into_result()?;
            let secret = new_refresh_token();
            let client_id = format!("sa-{}", Uuid::new_v4().simple());
            let secret_hash = hash_token(&secret);
            let (row, created) = self
                .db()
                .transaction(&EntityScope::System, move |conn| {
                    Box::pin(async move {
                        let id = match idempotency::claim(conn, "CreateServiceAccount", key, Uuid::now_v7()).await? {
                            idempotency::Claim::Existing(id) => {
                                let row = load(conn, "id = $1", &id.to_string()).await?.ok_or_else(|| Error::not_found("service account", id))?;
                                return Ok((row, false));
                            }
                            idempotency::Claim::New(id) => id,
                        };
                        let inserted = diesel::sql_query(
                            "INSERT INTO service_accounts (id, entity_id, name, display_name, description, client_id, secret_hash)
                             VALUES ($1, $2, $3, $4, $5, $6, $7)",
                        )
                        .bind::<SqlUuid, _>(id)
                        .bind::<SqlUuid, _>(entity)
                        .bind::<Text, _>(&account.name)
                        .bind::<Text, _>(account.display_name.trim())
                        .bind::<Text, _>(account.description.trim())
                        .bind::<Text, _>(&client_id)
                        .bind::<Bytea, _>(&secret_hash)
                        .execute(conn)
                        .await;
                        match inserted {
                            Err(DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _)) => {
                                return Err(Error::new(Code::AlreadyExists, "a service account with this name exists on this entity")
                                    .with_violation("service_account.name", "is already used"));
                            }
                            other => other.map_err(DbError::from)?,
                        };
                        let row = load(conn, "id = $1", &id.to_string()).await?.ok_or_else(|| Error::not_found("service account", id))?;
                        audit::service_account_changed(conn, "identity.service_accounts.create", None, Some(&row.to_proto()), &[])
                            .await?;
                        Ok((row, true))
                    })
                })
                .await?;
            // A retried create does not show a secret it no longer has.
            Ok(CreateServiceAccountResponse {
                service_account: Some(row.to_proto()),
                client_secret: if created { secret } else { String::new() },
            })
        }
        .await;
        reply(result, request_id)
    }

    async fn get_service_account(
        &self,
        request: Request<GetServiceAccountRequest>,
    ) -> Result<Response<GetServiceAccountResponse>, Status> {
        let request_id = rid(&request);
        let principal = socle_server::principal_of(&request);
        let result = async {
            let id = parse_id("service_account_id", &request.get_ref().service_account_id)?;
            let account = self.account(id).await?;
            self.check_record(
                principal.as_ref(),
                "identity.service_accounts.read",
                &account.entity_id,
                "service account",
            )
            .await?;
            Ok(GetServiceAccountResponse { service_account: Some(account) })
        }
        .await;
        reply(result, request_id)
    }

    async fn rotate_service_account_secret(
        &self,
        request: Request<RotateServiceAccountSecretRequest>,
    ) -> Result<Response<RotateServiceAccountSecretResponse>, Status> {
        let request_id = rid(&request);
        let principal = socle_server::principal_of(&request);
        let r = request.into_inner();
        let result = async {
            let id = parse_id("service_account_id", &r.service_account_id)?;
            let account = self.account(id).await?;
            self.check_record(principal.as_ref(), "identity.service_accounts.manage", &account.entity_id, "service account")
                .await?;
            let grace = match r.previous_secret_grace {
                None => Duration::hours(1),
                Some(d) if d.seconds >= 0 && d.seconds <= 7 * 24 * 3600 => Duration::seconds(d.seconds),
                Some(_) => return Err(Error::invalid_field("previous_secret_grace", "must be between 0 and 7 days")),
            };
            let etag_given = r.etag;
            let secret = new_refresh_token();
            let secret_hash = hash_token(&secret);
            let row = self
                .db()
                .transaction(&EntityScope::System, move |conn| {
                    Box::pin(async move {
                        let current = load(conn, "id = $1", &id.to_string()).await?.ok_or_else(|| Error::not_found("service account", id))?;
                        check_etag(&etag_given, current.version, false)?;
                        diesel::sql_query(
                            "UPDATE service_accounts SET previous_secret_hash = secret_hash, previous_secret_expire_time = $2,
                                    secret_hash = $3, secret_create_time = now(), version = version + 1, update_time = now()
                              WHERE id = $1",
                        )
                        .bind::<SqlUuid, _>(id)
                        .bind::<Timestamptz, _>(Utc::now() + grace)
                        .bind::<Bytea, _>(&secret_hash)
                        .execute(conn)
                        .await
                        .map_err(DbError::from)?;
                        let after = load(conn, "id = $1", &id.to_string()).await?.ok_or_else(|| Error::not_found("service account", id))?;
                        // The times of the secrets change; no secret nor hash is recorded.
                        audit::service_account_changed(
                            conn,
                            "identity.service_accounts.rotate_secret",
                            Some(&current.to_proto()),
                            Some(&after.to_proto()),
                            &[("previous_secret_grace_seconds", audit::number(grace.num_seconds()))],
                        )
                        .await?;
                        Ok::<_, Error>(after)
                    })
                })
                .await?;
            Ok(RotateServiceAccountSecretResponse { service_account: Some(row.to_proto()), client_secret: secret })
        }
        .await;
        reply(result, request_id)
    }

    async fn issue_service_account_token(
        &self,
        request: Request<IssueServiceAccountTokenRequest>,
    ) -> Result<Response<IssueServiceAccountTokenResponse>, Status> {
        let request_id = rid(&request);
        let r = request.into_inner();
        let result = async {
            let refuse = || Error::unauthenticated("invalid client credentials");
            if r.client_id.is_empty() || r.client_secret.is_empty() {
                return Err(refuse());
            }
            let client_id = r.client_id;
            let account = self
                .db()
                .transaction(&EntityScope::System, move |conn| {
                    Box::pin(async move {
                        let row = load(conn, "client_id = $1", &client_id).await?;
                        if let Some(row) = &row {
                            diesel::sql_query("UPDATE service_accounts SET last_token_time = now() WHERE id = $1")
                                .bind::<SqlUuid, _>(row.id)
                                .execute(conn)
                                .await
                                .map_err(DbError::from)?;
                        }
                        Ok::<_, Error>(row)
                    })
                })
                .await?
                .filter(|a| !a.disabled && a.accepts(&r.client_secret))
                .ok_or_else(refuse)?;
            let now = Utc::now().timestamp();
            let settings = self.settings();
            let (token, exp) = issue_access(
                self.keys(),
                &settings.issuer,
                &settings.audience,
                Subject::ServiceAccount(account.id),
                now,
                settings.access_token_ttl_secs,
            )?;
            Ok(IssueServiceAccountTokenResponse {
                access_token: token,
                token_type: "Bearer".into(),
                expires_in: (exp - now) as i32,
                expire_time: Some(prost_types::Timestamp { seconds: exp, nanos: 0 }),
            })
        }
        .await;
        reply(result, request_id)
    }
}
