//! Search (`socle.crm.v1.SearchService`): organisations and contacts from
//! free text. French full text on accent-folded words (prefixes match, so
//! results come while typing), trigram similarity on names and e-mail
//! addresses (typos), exact SIREN, SIRET and phone numbers. One ranked
//! statement finds the page, one statement per record kind loads it: the
//! number of statements does not depend on the page size.

use diesel::{
    QueryableByName,
    sql_types::{Array, Bool, Double, Nullable, SmallInt, Text, Uuid as SqlUuid},
};
use diesel_async::RunQueryDsl;
use socle_api::{PageToken, Violations, page_size};
use socle_db::{DbError, EntityScope};
use socle_errors::Error;
use socle_proto::socle::crm::v1::{search_service_server::SearchService, *};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::{
    common::{Caller, Crm, TODAY_SQL, reply, rid, sql_fold},
    contacts, organizations,
    organizations::scope_ids,
    validate,
};

#[derive(QueryableByName)]
struct HitRow {
    #[diesel(sql_type = SmallInt)]
    kind: i16,
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = Double)]
    score: f64,
}

/// The words of a query, folded, as a French prefix `tsquery` text:
/// `boulangerie martin` → `boulangerie:* & martin:*`.
fn prefix_tsquery(folded: &str) -> String {
    folded
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .take(12)
        .map(|w| format!("{w}:*"))
        .collect::<Vec<_>>()
        .join(" & ")
}

/// `text` with the parts matching a query word between `<mark>` and
/// `</mark>` (accent- and case-insensitive), HTML-escaped; `None` when
/// nothing matches.
pub(crate) fn highlight(text: &str, words: &[String]) -> Option<String> {
    let chars: Vec<char> = text.chars().collect();
    let folded: Vec<String> = chars.iter().map(|c| validate::fold(&c.to_string())).collect();
    let mut marked = vec![false; chars.len()];
    for word in words.iter().filter(|w| w.chars().count() >= 2) {
        let target: Vec<char> = word.chars().collect();
        for start in 0..chars.len() {
            // Match on folded characters, one source character at a time.
            let (mut i, mut j) = (start, 0);
            while i < chars.len() && j < target.len() {
                let piece: Vec<char> = folded[i].chars().collect();
                if target[j..].starts_with(&piece) {
                    j += piece.len();
                    i += 1;
                } else {
                    break;
                }
            }
            if j == target.len() {
                marked[start..i].iter_mut().for_each(|m| *m = true);
            }
        }
    }
    if !marked.iter().any(|m| *m) {
        return None;
    }
    let mut out = String::new();
    let mut open = false;
    for (c, m) in chars.iter().zip(&marked) {
        if *m != open {
            out.push_str(if *m { "<mark>" } else { "</mark>" });
            open = *m;
        }
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(*c),
        }
    }
    if open {
        out.push_str("</mark>");
    }
    Some(out)
}

fn highlights(fields: &[(&str, &str)], words: &[String]) -> Vec<SearchHighlight> {
    fields
        .iter()
        .filter_map(|(path, text)| {
            highlight(text, words).map(|snippet| SearchHighlight { field_path: (*path).to_owned(), snippet })
        })
        .collect()
}

impl Crm {
    pub async fn search(&self, caller: &Caller, r: SearchRequest) -> Result<SearchResponse, Error> {
        let size = page_size(r.page_size)?;
        let entity = caller.entity_or_acting("entity_id", &r.entity_id)?;
        let mut v = Violations::new();
        let text = r.query.trim().to_owned();
        v.check(text.chars().count() >= 2, "query", "au moins 2 caractères");
        v.check(text.chars().count() <= 200, "query", "au plus 200 caractères");
        let mut kinds = Vec::new();
        for (i, k) in r.record_kinds.iter().enumerate() {
            match RecordKind::try_from(*k) {
                Ok(RecordKind::Organization) => kinds.push(RecordKind::Organization),
                Ok(RecordKind::Contact) => kinds.push(RecordKind::Contact),
                _ => v.add(format!("record_kinds[{i}]"), "seuls ORGANIZATION et CONTACT sont cherchés"),
            }
        }
        if kinds.is_empty() {
            kinds = vec![RecordKind::Organization, RecordKind::Contact];
        }
        let mut statuses = Vec::new();
        for (i, s) in r.membership_statuses.iter().enumerate() {
            match MembershipStatus::try_from(*s) {
                Ok(MembershipStatus::Unspecified) | Err(_) => {
                    v.add(format!("membership_statuses[{i}]"), "statut inconnu")
                }
                Ok(s) => statuses.push(s as i16),
            }
        }
        let tags = validate::normalize_tags(&r.tags)
            .map_err(|(i, reason)| v.add(format!("tags[{i}]"), validate::describe(reason)))
            .unwrap_or_default();
        v.into_result()?;
        statuses.sort_unstable();
        statuses.dedup();
        kinds.sort_unstable();
        kinds.dedup();

        let folded = sql_fold(&text);
        let words: Vec<String> =
            folded.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_owned).collect();
        let tsquery = prefix_tsquery(&folded);
        let digits: String = text.chars().filter(|c| !c.is_whitespace() && *c != '.').collect();
        let digits =
            if digits.len() >= 9 && digits.chars().all(|c| c.is_ascii_digit()) { digits } else { String::new() };
        let phone = validate::normalize_phone(&text).unwrap_or_default();
        let email = if text.contains('@') { text.to_lowercase() } else { String::new() };

        let fingerprint = format!("{entity}|{}|{kinds:?}|{statuses:?}|{tags:?}|{text}", r.include_descendants);
        let after = PageToken::<(f64, i16, Uuid)>::decode(&r.page_token, &fingerprint)?.map(|t| t.after);

        let org_scope = self.list_scope(caller, "crm.organizations.read", entity, r.include_descendants).await?;
        // Contacts only where the caller also reads contacts.
        let contact_scope = {
            let readable =
                self.scopes.entities(caller.principal.as_ref(), "crm.contacts.read", Some(entity), "").await?;
            match readable {
                EntityScope::System => EntityScope::entity(entity),
                EntityScope::Entities(ids) if r.include_descendants => EntityScope::Entities(ids),
                EntityScope::Entities(ids) => {
                    EntityScope::Entities(ids.into_iter().filter(|id| *id == entity).collect())
                }
            }
        };
        let org_entities =
            if kinds.contains(&RecordKind::Organization) { scope_ids(&org_scope, entity) } else { Vec::new() };
        let contact_entities =
            if kinds.contains(&RecordKind::Contact) { scope_ids(&contact_scope, entity) } else { Vec::new() };
        let mut union = org_entities.clone();
        union.extend(contact_entities.iter().copied());
        union.sort_unstable();
        union.dedup();
        let scope = EntityScope::Entities(union);

        let org_status = format!(
            "crm_membership_status(o.latest_membership_id, o.latest_membership_cancelled, o.member_since,
                o.latest_membership_end, o.latest_membership_grace_end, {TODAY_SQL})"
        );
        let sql = format!(
            "WITH candidates AS MATERIALIZED (
               -- One index scan per way of matching, typos only when the
               -- words match little (migration 000007: why a SECURITY
               -- DEFINER function).
               SELECT kind, id FROM crm_search_candidates($1, $2, $3, $4, $5, $6, $7)
             ), hits AS (
               SELECT 1::smallint AS kind, o.id, greatest(
                        CASE WHEN $5 <> '' AND (o.siren = $5 OR o.siret = $5) THEN 1.0 END,
                        CASE WHEN $6 <> '' AND o.phone = $6 THEN 1.0 END,
                        CASE WHEN $7 <> '' AND o.email_key = $7 THEN 1.0 END,
                        CASE WHEN $3 <> '' AND o.search_vector @@ to_tsquery('french', $3)
                             THEN 0.5 + 0.45 * ts_rank(o.search_vector, to_tsquery('french', $3), 32) END,
                        0.9 * greatest(similarity(o.name_key, $4), similarity(o.trade_key, $4),
                                       word_similarity($4, o.name_key))
                      )::float8 AS score
                 FROM candidates k JOIN organizations o ON o.id = k.id AND k.kind = 1
                WHERE o.entity_id = ANY($1) AND o.state = 1
                  AND (cardinality($8::smallint[]) = 0 OR {org_status} = ANY($8))
                  AND o.tags @> $9
               UNION ALL
               SELECT 2::smallint, c.id, greatest(
                        CASE WHEN $6 <> '' AND c.phone_keys @> ARRAY[$6] THEN 1.0 END,
                        CASE WHEN $7 <> '' AND c.email_keys @> ARRAY[$7] THEN 1.0 END,
                        CASE WHEN $3 <> '' AND c.search_vector @@ to_tsquery('simple', $3)
                             THEN 0.5 + 0.45 * ts_rank(c.search_vector, to_tsquery('simple', $3), 32) END,
                        0.9 * greatest(similarity(c.name_key, $4), word_similarity($4, c.name_key),
                                       similarity(crm_join(c.email_keys), $4))
                      )::float8
                 FROM candidates k JOIN contacts c ON c.id = k.id AND k.kind = 2
                WHERE c.entity_id = ANY($2) AND c.state = 1
                  AND (cardinality($8::smallint[]) = 0 OR {contact_status} = ANY($8))
                  AND c.tags @> $9
             )
             SELECT kind, id, round(score::numeric, 6)::float8 AS score FROM hits
              WHERE NOT $10 OR (round(score::numeric, 6)::float8, -kind, id) < ($11, -$12::smallint, $13::uuid)
              ORDER BY 3 DESC, kind, id
              LIMIT {limit}",
            contact_status = contacts_status(),
            limit = size + 1
        );
        let (orgs, people, mut hits) = self
            .db
            .transaction(&scope, move |conn| {
                Box::pin(async move {
                    let mut hits: Vec<HitRow> = diesel::sql_query(sql)
                        .bind::<Array<SqlUuid>, _>(org_entities)
                        .bind::<Array<SqlUuid>, _>(contact_entities)
                        .bind::<Text, _>(tsquery)
                        .bind::<Text, _>(folded)
                        .bind::<Text, _>(digits)
                        .bind::<Text, _>(phone)
                        .bind::<Text, _>(email)
                        .bind::<Array<SmallInt>, _>(statuses)
                        .bind::<Array<Text>, _>(tags)
                        .bind::<Bool, _>(after.is_some())
                        .bind::<Nullable<Double>, _>(after.map(|a| a.0))
                        .bind::<Nullable<SmallInt>, _>(after.map(|a| a.1))
                        .bind::<Nullable<SqlUuid>, _>(after.map(|a| a.2))
                        .load(conn)
                        .await
                        .map_err(DbError::from)?;
                    hits.truncate(size + 1);
                    let org_ids: Vec<Uuid> = hits.iter().filter(|h| h.kind == 1).map(|h| h.id).collect();
                    let contact_ids: Vec<Uuid> = hits.iter().filter(|h| h.kind == 2).map(|h| h.id).collect();
                    let orgs = organizations::load_many(conn, &org_ids).await?;
                    let people = contacts::load_many(conn, &contact_ids).await?;
                    Ok::<_, Error>((orgs, people, hits))
                })
            })
            .await?;
        let next_page_token = if hits.len() > size {
            hits.truncate(size);
            let last = hits.last().expect("a full page");
            PageToken::encode((last.score, last.kind, last.id), &fingerprint)
        } else {
            String::new()
        };
        let results = hits
            .iter()
            .filter_map(|hit| {
                if hit.kind == 1 {
                    let org = orgs.iter().find(|o| o.id == hit.id)?.to_proto();
                    let mut fields =
                        vec![("legal_name", org.legal_name.as_str()), ("trade_name", org.trade_name.as_str())];
                    fields.extend([("siret", org.siret.as_str()), ("siren", org.siren.as_str())]);
                    let city = org.addresses.iter().find(|a| a.primary).and_then(|a| a.address.as_ref());
                    let city = city.map(|a| a.city.clone()).unwrap_or_default();
                    let mut marks = highlights(&fields, &words);
                    marks.extend(highlights(&[("addresses.city", city.as_str())], &words));
                    Some(SearchHit {
                        record_kind: RecordKind::Organization as i32,
                        score: hit.score.clamp(0.0, 1.0),
                        record: Some(search_hit::Record::Organization(org)),
                        highlights: marks,
                    })
                } else {
                    let contact = people.iter().find(|c| c.id == hit.id)?.to_proto();
                    let mut marks = highlights(&[("display_name", contact.display_name.as_str())], &words);
                    for (i, e) in contact.emails.iter().enumerate() {
                        if let Some(snippet) = highlight(&e.address, &words) {
                            marks.push(SearchHighlight { field_path: format!("emails[{i}].address"), snippet });
                        }
                    }
                    Some(SearchHit {
                        record_kind: RecordKind::Contact as i32,
                        score: hit.score.clamp(0.0, 1.0),
                        record: Some(search_hit::Record::Contact(contact)),
                        highlights: marks,
                    })
                }
            })
            .collect();
        Ok(SearchResponse { hits: results, next_page_token })
    }
}

fn contacts_status() -> String {
    format!(
        "coalesce((SELECT s FROM (
            SELECT crm_membership_status(o.latest_membership_id, o.latest_membership_cancelled, o.member_since,
                   o.latest_membership_end, o.latest_membership_grace_end, {TODAY_SQL}) AS s
              FROM affiliations a JOIN organizations o ON o.id = a.organization_id
             WHERE a.contact_id = c.id AND (a.end_date IS NULL OR a.end_date >= {TODAY_SQL})) x
          ORDER BY array_position(ARRAY[3, 4, 2, 5, 6, 1]::smallint[], x.s) LIMIT 1), 1)::smallint"
    )
}

/// The gRPC adapter.
#[tonic::async_trait]
impl SearchService for Crm {
    async fn search(&self, request: Request<SearchRequest>) -> Result<Response<SearchResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        reply(Crm::search(self, &caller, request.into_inner()).await, request_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn highlights_ignore_accents_and_escape_html() {
        let words = vec!["societe".to_owned(), "generale".to_owned()];
        assert_eq!(
            highlight("Société <Générale>", &words).as_deref(),
            Some("<mark>Société</mark> &lt;<mark>Générale</mark>&gt;")
        );
        assert_eq!(highlight("Boulangerie", &words), None);
    }

    #[test]
    fn queries_become_prefix_tsqueries() {
        assert_eq!(prefix_tsquery("boulangerie martin"), "boulangerie:* & martin:*");
        assert_eq!(prefix_tsquery("l'atelier & co"), "l:* & atelier:* & co:*");
        assert_eq!(prefix_tsquery("!!"), "");
    }
}
