//! Tags in use (`socle.crm.v1.TagService`): the free tags of organisations,
//! contacts and interactions, counted per tag, most used first, for
//! autocompletion and filters. One statement per page.

use diesel::{
    QueryableByName,
    sql_types::{Array, BigInt, Nullable, SmallInt, Text, Uuid as SqlUuid},
};
use diesel_async::RunQueryDsl;
use socle_api::{PageToken, page_size};
use socle_db::DbError;
use socle_errors::Error;
use socle_proto::socle::crm::v1::{tag_service_server::TagService, *};
use tonic::{Request, Response, Status};

use crate::{
    common::{Caller, Crm, like_literal, reply, rid, sql_fold},
    organizations::scope_ids,
};

#[derive(QueryableByName)]
struct TagRow {
    #[diesel(sql_type = Text)]
    tag: String,
    #[diesel(sql_type = BigInt)]
    record_count: i64,
}

impl Crm {
    /// `ListTags`.
    pub async fn list_tags(&self, caller: &Caller, r: ListTagsRequest) -> Result<ListTagsResponse, Error> {
        let size = page_size(r.page_size)?;
        let entity = caller.entity_or_acting("entity_id", &r.entity_id)?;
        let kind = match RecordKind::try_from(r.record_kind) {
            Ok(RecordKind::Unspecified) => 0i16,
            Ok(RecordKind::Organization) => 1,
            Ok(RecordKind::Contact) => 2,
            Ok(RecordKind::Interaction) => 5,
            _ => {
                return Err(Error::invalid_field(
                    "record_kind",
                    "seuls ORGANIZATION, CONTACT et INTERACTION portent des étiquettes",
                ));
            }
        };
        let prefix = sql_fold(r.prefix.trim());
        if prefix.chars().count() > 50 {
            return Err(Error::invalid_field("prefix", "au plus 50 caractères"));
        }
        let fingerprint = format!("{entity}|{}|{kind}|{prefix}", r.include_descendants);
        let after = PageToken::<(i64, String)>::decode(&r.page_token, &fingerprint)?.map(|t| t.after);
        let scope = self.list_scope(caller, "crm.tags.read", entity, r.include_descendants).await?;
        let entities = scope_ids(&scope, entity);
        let sql = format!(
            "WITH tags AS (
                SELECT unnest(tags) AS tag FROM organizations
                 WHERE ($2 = 0 OR $2 = 1) AND entity_id = ANY($1) AND state = 1
                UNION ALL
                SELECT unnest(tags) FROM contacts WHERE ($2 = 0 OR $2 = 2) AND entity_id = ANY($1) AND state = 1
                UNION ALL
                SELECT unnest(tags) FROM interactions WHERE ($2 = 0 OR $2 = 5) AND entity_id = ANY($1)
             ), counted AS (
                SELECT tag, count(*) AS record_count FROM tags
                 WHERE $3 = '' OR socle_fold(tag) LIKE $3 || '%' GROUP BY tag
             )
             SELECT tag, record_count FROM counted
              WHERE $4::bigint IS NULL OR record_count < $4
                 OR (record_count = $4 AND tag COLLATE \"C\" < $5::text COLLATE \"C\")
              ORDER BY record_count DESC, tag COLLATE \"C\" DESC LIMIT {}",
            size + 1
        );
        let mut rows: Vec<TagRow> = self
            .db
            .transaction(&scope, move |conn| {
                Box::pin(async move {
                    diesel::sql_query(sql)
                        .bind::<Array<SqlUuid>, _>(entities)
                        .bind::<SmallInt, _>(kind)
                        .bind::<Text, _>(like_literal(&prefix))
                        .bind::<Nullable<BigInt>, _>(after.as_ref().map(|a| a.0))
                        .bind::<Nullable<Text>, _>(after.as_ref().map(|a| a.1.clone()))
                        .load(conn)
                        .await
                        .map_err(DbError::from)
                })
            })
            .await?;
        let next_page_token = if rows.len() > size {
            rows.truncate(size);
            let last = rows.last().expect("a full page");
            PageToken::encode((last.record_count, last.tag.clone()), &fingerprint)
        } else {
            String::new()
        };
        Ok(ListTagsResponse {
            tags: rows.into_iter().map(|r| TagCount { tag: r.tag, record_count: r.record_count }).collect(),
            next_page_token,
        })
    }
}

/// The gRPC adapter.
#[tonic::async_trait]
impl TagService for Crm {
    async fn list_tags(&self, request: Request<ListTagsRequest>) -> Result<Response<ListTagsResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        reply(Crm::list_tags(self, &caller, request.into_inner()).await, request_id)
    }
}
