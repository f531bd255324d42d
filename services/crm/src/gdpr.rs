//! The GDPR rights of a person known as a contact: access (everything the
//! CRM holds about them, `ExportContactData`) and erasure (`EraseContact`).
//!
//! Erasure clears every personal field of the contact and of the contacts
//! merged into it (the same person), which stay as anonymous `ERASED`
//! placeholders so that organisations' histories remain consistent;
//! anonymises its affiliations; removes it from interactions and deletes
//! those left without participant. The audit event of the erasure names
//! the erased subjects (`erase_subject_ids`): the audit store destroys their
//! keys when it stores the event, which crypto-shreds their personal values
//! in the whole trail. The event travels through the outbox, in the
//! transaction of the erasure: the shredding cannot be lost.

use diesel::{
    QueryableByName,
    sql_types::{Array, Uuid as SqlUuid},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use socle_api::{check_etag, parse_id};
use socle_db::{DbError, idempotency};
use socle_errors::{Code, Error};
use socle_proto::socle::crm::v1::*;
use uuid::Uuid;

use crate::{
    common::{Audited, Caller, Crm},
    contacts,
};

#[derive(QueryableByName)]
struct Counts {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    affiliations: i32,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    interactions: i32,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    deleted: i32,
}

#[derive(QueryableByName)]
struct Id {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
}

/// The contact and every contact merged into it, directly or not.
async fn same_person(conn: &mut AsyncPgConnection, id: Uuid) -> Result<Vec<Uuid>, Error> {
    let rows: Vec<Id> = diesel::sql_query(
        "WITH RECURSIVE person AS (
            SELECT id FROM contacts WHERE id = $1
            UNION SELECT c.id FROM contacts c JOIN person p ON c.merged_into_id = p.id)
         SELECT id FROM person",
    )
    .bind::<SqlUuid, _>(id)
    .load(conn)
    .await
    .map_err(DbError::from)?;
    Ok(rows.into_iter().map(|r| r.id).collect())
}

/// Clears the personal data of `ids` and of their links, in one statement;
/// returns the counts of the response.
async fn clear(conn: &mut AsyncPgConnection, ids: &[Uuid]) -> Result<Counts, Error> {
    Ok(diesel::sql_query(
        "WITH erased AS (
            UPDATE contacts SET civility = 0, given_name = '', family_name = '', job_title = '', emails = '[]',
                   phones = '[]', address = NULL, consents = '[]', tags = '{}', external_refs = '{}',
                   email_keys = '{}', phone_keys = '{}', postal_code = '', state = 3, erase_time = now(),
                   version = version + 1, update_time = now()
             WHERE id = ANY($1) RETURNING id),
          links AS (
            UPDATE affiliations SET job_title = '', version = version + 1, update_time = now()
             WHERE contact_id = ANY($1) RETURNING id),
          left_out AS (
            DELETE FROM interaction_contacts WHERE contact_id = ANY($1) RETURNING interaction_id),
          emptied AS (
            DELETE FROM interactions i WHERE i.id IN (SELECT interaction_id FROM left_out)
               AND NOT EXISTS (SELECT 1 FROM interaction_contacts ic
                                WHERE ic.interaction_id = i.id AND NOT (ic.contact_id = ANY($1)))
            RETURNING id)
         SELECT (SELECT count(*) FROM links)::int AS affiliations,
                (SELECT count(DISTINCT interaction_id) FROM left_out)::int AS interactions,
                (SELECT count(*) FROM emptied)::int AS deleted",
    )
    .bind::<Array<SqlUuid>, _>(ids)
    .get_result(conn)
    .await
    .map_err(DbError::from)?)
}

impl Crm {
    /// `ExportContactData`: everything the CRM holds about the person, in
    /// one read-only transaction; the access is audited with the request's
    /// reference.
    pub async fn export_contact_data(
        &self,
        caller: &Caller,
        r: ExportContactDataRequest,
    ) -> Result<ExportContactDataResponse, Error> {
        let id = parse_id("contact_id", &r.contact_id)?;
        let reference = r.request_reference.trim().to_owned();
        if reference.chars().count() > 200 {
            return Err(Error::invalid_field("request_reference", "au plus 200 caractères"));
        }
        let scope = self.scope(caller, "crm.contacts.export_personal_data").await?;
        let result = self
            .db
            .transaction(&scope, move |conn| {
                Box::pin(async move {
                    let Some(contact) = contacts::load(conn, id).await? else { return Ok(None) };
                    let contact = contact.to_proto();
                    let affiliations = crate::affiliations::of_contact(conn, id).await?;
                    let interactions = crate::interactions::of_contact(conn, id).await?;
                    let merges = crate::merges::involving(conn, id).await?;
                    // Reading someone's whole record is itself recorded.
                    let mut event = socle_server::audit::event(
                        crate::NAME,
                        "crm.contacts.export_personal_data",
                        socle_proto::socle::audit::v1::Outcome::Ok,
                    );
                    event.entity_id = contact.entity_id.clone();
                    event.resource_type = Contact::RESOURCE_TYPE.to_owned();
                    event.resource_id = contact.id.clone();
                    event.details = Some(prost_types::Struct {
                        fields: [(
                            "request_reference".to_owned(),
                            prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(reference)) },
                        )]
                        .into(),
                    });
                    socle_outbox::enqueue(conn, &event).await?;
                    Ok::<_, Error>(Some(ExportContactDataResponse {
                        contact: Some(contact),
                        affiliations: affiliations.iter().map(|a| a.to_proto()).collect(),
                        interactions: interactions.iter().map(|i| i.to_proto()).collect(),
                        merges,
                        export_time: Some(socle_api::timestamp(chrono::Utc::now())),
                    }))
                })
            })
            .await?;
        match result {
            Some(export) => Ok(export),
            None => Err(self.not_found(caller, "contacts", id, "crm.contacts.export_personal_data", "contact").await),
        }
    }

    /// `EraseContact`.
    pub async fn erase_contact(&self, caller: &Caller, r: EraseContactRequest) -> Result<EraseContactResponse, Error> {
        let mut v = socle_api::Violations::new();
        let id = parse_id("contact_id", &r.contact_id).map_err(|e| crate::common::absorb(&mut v, e));
        let key = parse_id("request_id", &r.request_id).map_err(|e| crate::common::absorb(&mut v, e));
        let reason = r.reason.trim().to_owned();
        v.check(!reason.is_empty(), "reason", "la référence de la demande ou le fondement est obligatoire");
        v.check(reason.chars().count() <= 500, "reason", "au plus 500 caractères");
        v.into_result()?;
        let (Ok(id), Ok(key)) = (id, key) else { return Err(Error::internal("violations")) };
        let scope = self.scope(caller, "crm.contacts.erase").await?;
        let etag_given = r.etag;
        let result = self
            .db
            .transaction(&scope, move |conn| {
                Box::pin(async move {
                    if let idempotency::Claim::Existing(_) = idempotency::claim(conn, "EraseContact", key, id).await? {
                        let contact = contacts::load(conn, id).await?.map(|c| c.to_proto());
                        return Ok(contact.map(|c| EraseContactResponse { contact: Some(c), ..Default::default() }));
                    }
                    diesel::sql_query("SELECT 1 FROM contacts WHERE id = $1 FOR UPDATE")
                        .bind::<SqlUuid, _>(id)
                        .execute(conn)
                        .await
                        .map_err(DbError::from)?;
                    let Some(current) = contacts::load(conn, id).await? else { return Ok(None) };
                    check_etag(&etag_given, current.version, false)?;
                    let before = current.to_proto();
                    if before.state == ContactState::Erased as i32 {
                        return Err(Error::new(Code::FailedPrecondition, "ce contact est déjà effacé"));
                    }
                    let person = same_person(conn, id).await?;
                    let mut befores = Vec::new();
                    for row in contacts::load_many(conn, &person).await? {
                        befores.push(row.to_proto());
                    }
                    let counts = clear(conn, &person).await?;
                    let mut events = Vec::new();
                    for before in &befores {
                        let after = contacts::load(conn, parse_id("id", &before.id)?)
                            .await?
                            .ok_or_else(|| Error::internal("erased contact gone"))?
                            .to_proto();
                        let mut event = socle_server::audit::change(
                            crate::NAME,
                            "crm.contacts.erase",
                            Contact::RESOURCE_TYPE,
                            before.record_id(),
                            before.owner(),
                            Some(before),
                            Some(&after),
                            Contact::PERSONAL,
                            before.subject(),
                        );
                        event.erase_subject_ids = vec![before.id.clone()];
                        event.details = Some(prost_types::Struct {
                            fields: [(
                                "reason".to_owned(),
                                prost_types::Value {
                                    kind: Some(prost_types::value::Kind::StringValue(reason.clone())),
                                },
                            )]
                            .into(),
                        });
                        events.push(event);
                    }
                    socle_outbox::enqueue_all(conn, &events).await?;
                    let contact =
                        contacts::load(conn, id).await?.ok_or_else(|| Error::internal("erased contact gone"))?;
                    Ok(Some(EraseContactResponse {
                        contact: Some(contact.to_proto()),
                        affiliation_count: counts.affiliations,
                        interaction_count: counts.interactions,
                        deleted_interaction_count: counts.deleted,
                    }))
                })
            })
            .await?;
        match result {
            Some(response) => Ok(response),
            None => Err(self.not_found(caller, "contacts", id, "crm.contacts.erase", "contact").await),
        }
    }
}
