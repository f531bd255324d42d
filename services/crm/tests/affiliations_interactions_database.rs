//! Affiliations and interactions at the database level, on a real
//! PostgreSQL: their lists send the same number of SQL statements whatever
//! the page size (names, contacts and current links come in the same
//! statement), and two concurrent creates of the same current link cannot
//! both succeed.

use std::sync::Arc;

use socle_config::SecretString;
use socle_crm::{Caller, Crm};
use socle_db::{Database, statements};
use socle_errors::Code;
use socle_proto::socle::crm::v1::{
    Affiliation, AffiliationRole, Contact, CreateAffiliationRequest, CreateContactRequest, CreateInteractionRequest,
    CreateOrganizationRequest, Interaction, InteractionKind, ListAffiliationsRequest, ListInteractionsRequest,
    Organization,
};
use socle_server::scope::ScopeResolver;
use socle_testkit::TestDatabase;
use uuid::Uuid;

/// A migrated CRM database and the CRM API over its application role, in
/// `declared` mode (no tenancy: the scope is the entity a call names).
async fn crm() -> Crm {
    let db = TestDatabase::create("crm_timeline_db").await.unwrap();
    socle_db::migrate(&SecretString::from(db.owner_url.clone()), socle_crm::MIGRATIONS, Some(&db.app_role))
        .await
        .unwrap();
    let app = Database::connect(&SecretString::from(db.app_url_with_password()), 4, std::time::Duration::from_secs(5))
        .await
        .unwrap();
    Crm { db: app, scopes: Arc::new(ScopeResolver::new(None)) }
}

fn caller(entity: Uuid) -> Caller {
    Caller { principal: None, acting: Some(entity.to_string()) }
}

async fn create_org(crm: &Crm, entity: Uuid, name: &str) -> String {
    let org = Organization { entity_id: entity.to_string(), legal_name: name.to_owned(), ..Organization::default() };
    let request = CreateOrganizationRequest {
        request_id: Uuid::new_v4().to_string(),
        organization: Some(org),
        allow_duplicates: true,
    };
    crm.create_organization(&caller(entity), request).await.unwrap().organization.unwrap().id
}

async fn create_contact(crm: &Crm, entity: Uuid, family_name: &str) -> String {
    let contact = Contact { entity_id: entity.to_string(), family_name: family_name.to_owned(), ..Contact::default() };
    let request =
        CreateContactRequest { request_id: Uuid::new_v4().to_string(), contact: Some(contact), allow_duplicates: true };
    crm.create_contact(&caller(entity), request).await.unwrap().contact.unwrap().id
}

fn affiliation(entity: Uuid, contact: &str, org: &str) -> CreateAffiliationRequest {
    CreateAffiliationRequest {
        request_id: Uuid::new_v4().to_string(),
        affiliation: Some(Affiliation {
            entity_id: entity.to_string(),
            contact_id: contact.to_owned(),
            organization_id: org.to_owned(),
            roles: vec![AffiliationRole::PrimaryContact as i32],
            job_title: "Gérant".into(),
            ..Affiliation::default()
        }),
    }
}

/// A name sorting as its index: `aa`, `ab`, … `cz`.
fn letters(i: usize) -> String {
    format!("{}{}", char::from(b'a' + (i / 26) as u8), char::from(b'a' + (i % 26) as u8))
}

#[tokio::test(flavor = "multi_thread")]
async fn affiliation_and_interaction_lists_do_not_grow_with_the_page_size() {
    let crm = crm().await;
    let entity = Uuid::new_v4();
    let who = caller(entity);
    let mut first_org = String::new();
    for i in 0..60 {
        let org = create_org(&crm, entity, &format!("Entreprise {}", letters(i))).await;
        let contact = create_contact(&crm, entity, &format!("Personne {}", letters(i))).await;
        crm.create_affiliation(&who, affiliation(entity, &contact, &org)).await.unwrap();
        // One interaction naming the organisation and the contact, one
        // naming only the contact (in the organisation's timeline with its
        // contacts' interactions).
        for organization_id in [org.clone(), String::new()] {
            let interaction = Interaction {
                entity_id: entity.to_string(),
                kind: InteractionKind::Note as i32,
                subject: format!("Note {i}"),
                occur_time: Some(prost_types::Timestamp { seconds: 1_750_000_000 + i as i64 * 60, nanos: 0 }),
                organization_id,
                contact_ids: vec![contact.clone()],
                ..Interaction::default()
            };
            let request =
                CreateInteractionRequest { request_id: Uuid::new_v4().to_string(), interaction: Some(interaction) };
            crm.create_interaction(&who, request).await.unwrap();
        }
        if i == 0 {
            first_org = org;
        }
    }

    for order_by in ["", "organization_legal_name", "start_date desc"] {
        let page = |size: i32| {
            let request = ListAffiliationsRequest {
                page_size: size,
                order_by: order_by.into(),
                ..ListAffiliationsRequest::default()
            };
            crm.list_affiliations(&who, request)
        };
        let (small, small_count) = statements::count(page(5)).await;
        let (large, large_count) = statements::count(page(50)).await;
        assert_eq!(small.unwrap().affiliations.len(), 5);
        let large = large.unwrap();
        assert_eq!(large.affiliations.len(), 50);
        assert!(
            large.affiliations.iter().all(|a| a.contact_display_name.starts_with("Personne")
                && a.organization_legal_name.starts_with("Entreprise")
                && a.current),
            "the names are filled"
        );
        assert!(small_count > 0, "the counter counts");
        assert_eq!(small_count, large_count, "affiliations ({order_by:?}): statements grow with the page size");
    }

    let page = |size: i32, organization_id: &str, with_contacts: bool| {
        let request = ListInteractionsRequest {
            page_size: size,
            organization_id: organization_id.to_owned(),
            include_contact_interactions: with_contacts,
            ..ListInteractionsRequest::default()
        };
        crm.list_interactions(&who, request)
    };
    let (small, small_count) = statements::count(page(5, "", false)).await;
    let (large, large_count) = statements::count(page(50, "", false)).await;
    assert_eq!(small.unwrap().interactions.len(), 5);
    let large = large.unwrap();
    assert_eq!(large.interactions.len(), 50);
    assert!(large.interactions.iter().all(|i| i.contact_ids.len() == 1), "the contacts are filled");
    assert!(large.interactions.iter().any(|i| i.organization_legal_name.starts_with("Entreprise")));
    assert!(small_count > 0);
    assert_eq!(small_count, large_count, "interactions: statements grow with the page size");

    // An organisation's timeline with its contacts' interactions.
    let (small, small_count) = statements::count(page(1, &first_org, true)).await;
    let (large, large_count) = statements::count(page(50, &first_org, true)).await;
    assert_eq!(small.unwrap().interactions.len(), 1);
    assert_eq!(large.unwrap().interactions.len(), 2, "its own interaction and its contact's");
    assert_eq!(small_count, large_count, "timeline: statements grow with the page size");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_creates_of_the_same_current_link_give_one_affiliation() {
    let crm = crm().await;
    let entity = Uuid::new_v4();
    let org = create_org(&crm, entity, "Entreprise concurrente").await;
    let contact = create_contact(&crm, entity, "Simultané").await;
    let who = caller(entity);
    let attempts: Vec<_> = (0..6)
        .map(|_| {
            let (crm, who, request) = (crm.clone(), who.clone(), affiliation(entity, &contact, &org));
            tokio::spawn(async move { crm.create_affiliation(&who, request).await })
        })
        .collect();
    let mut created = 0;
    for attempt in attempts {
        match attempt.await.unwrap() {
            Ok(_) => created += 1,
            Err(e) => assert_eq!(e.code(), Code::AlreadyExists, "{e:?}"),
        }
    }
    assert_eq!(created, 1, "exactly one current link");
    let list = crm.list_affiliations(&who, ListAffiliationsRequest::default()).await.unwrap();
    assert_eq!(list.affiliations.len(), 1);
}
