//! The CRM's guarantees at the database level, on a real PostgreSQL:
//! row-level security hides other entities from a query that forgets its
//! entity filter, and a list sends the same number of SQL statements
//! whatever its page size (no query per row).

use std::sync::Arc;

use diesel::{
    QueryableByName,
    sql_types::{BigInt, Uuid as SqlUuid},
};
use diesel_async::RunQueryDsl;
use socle_config::SecretString;
use socle_crm::{Caller, Crm};
use socle_db::{Database, EntityScope, statements};
use socle_proto::socle::{
    crm::v1::{
        AddressKind, Contact, CreateContactRequest, CreateOrganizationRequest, ListContactsRequest,
        ListOrganizationsRequest, Organization, OrganizationAddress, SearchRequest,
    },
    r#type::v1::PostalAddress,
};
use socle_server::scope::ScopeResolver;
use socle_testkit::TestDatabase;
use uuid::Uuid;

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// A migrated CRM database and the CRM API over its application role, in
/// `declared` mode (no tenancy: the scope is the entity a call names).
async fn crm() -> (Crm, Database) {
    let db = TestDatabase::create("crm_db").await.unwrap();
    socle_db::migrate(&SecretString::from(db.owner_url.clone()), socle_crm::MIGRATIONS, Some(&db.app_role))
        .await
        .unwrap();
    let app = Database::connect(&SecretString::from(db.app_url_with_password()), 4, std::time::Duration::from_secs(5))
        .await
        .unwrap();
    (Crm { db: app.clone(), scopes: Arc::new(ScopeResolver::new(None)) }, app)
}

fn caller(entity: Uuid) -> Caller {
    Caller { principal: None, acting: Some(entity.to_string()) }
}

async fn create_org(crm: &Crm, entity: Uuid, name: &str, postal: &str) -> Organization {
    let org = Organization {
        entity_id: entity.to_string(),
        legal_name: name.to_owned(),
        addresses: vec![OrganizationAddress {
            kind: AddressKind::HeadOffice as i32,
            primary: true,
            address: Some(PostalAddress {
                postal_code: postal.to_owned(),
                city: "Lyon".to_owned(),
                ..PostalAddress::default()
            }),
        }],
        ..Organization::default()
    };
    let request = CreateOrganizationRequest {
        request_id: Uuid::new_v4().to_string(),
        organization: Some(org),
        allow_duplicates: true,
    };
    crm.create_organization(&caller(entity), request).await.unwrap().organization.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn row_level_security_hides_other_entities_from_a_query_without_filter() {
    let (crm, db) = crm().await;
    let (lyon, lille) = (Uuid::new_v4(), Uuid::new_v4());
    for i in 0..3 {
        create_org(&crm, lyon, &format!("Lyon {i}"), "69001").await;
    }
    let lille_org = create_org(&crm, lille, "Lille 0", "59000").await;

    // The query forgets its entity filter: only Lyon's rows come back.
    let count = |scope: EntityScope, sql: &'static str| {
        let db = db.clone();
        async move {
            db.transaction(&scope, move |conn| {
                Box::pin(async move {
                    diesel::sql_query(sql).get_result::<Count>(conn).await.map_err(socle_db::DbError::from)
                })
            })
            .await
            .map(|c| c.n)
        }
    };
    assert_eq!(count(EntityScope::entity(lyon), "SELECT count(*) AS n FROM organizations").await.unwrap(), 3);
    assert_eq!(count(EntityScope::entity(lille), "SELECT count(*) AS n FROM organizations").await.unwrap(), 1);
    assert_eq!(count(EntityScope::none(), "SELECT count(*) AS n FROM organizations").await.unwrap(), 0);
    assert_eq!(
        count(EntityScope::Entities(vec![lyon, lille]), "SELECT count(*) AS n FROM organizations").await.unwrap(),
        4
    );

    // Writing into another entity is refused by the policy's check.
    let refused: Result<usize, socle_db::DbError> = db
        .transaction(&EntityScope::entity(lyon), move |conn| {
            Box::pin(async move {
                diesel::sql_query("INSERT INTO organizations (id, entity_id, legal_name) VALUES ($1, $2, 'Intrus')")
                    .bind::<SqlUuid, _>(Uuid::new_v4())
                    .bind::<SqlUuid, _>(lille)
                    .execute(conn)
                    .await
                    .map_err(socle_db::DbError::from)
            })
        })
        .await;
    assert!(refused.is_err(), "an insert into another entity went through");
    // Updating another entity's row touches nothing.
    let lille_id = Uuid::parse_str(&lille_org.id).unwrap();
    let touched = db
        .transaction(&EntityScope::entity(lyon), move |conn| {
            Box::pin(async move {
                diesel::sql_query("UPDATE organizations SET legal_name = 'Volé' WHERE id = $1")
                    .bind::<SqlUuid, _>(lille_id)
                    .execute(conn)
                    .await
                    .map_err(socle_db::DbError::from)
            })
        })
        .await
        .unwrap();
    assert_eq!(touched, 0);
    // Every CRM table is protected the same way.
    let unprotected = db
        .transaction(&EntityScope::System, |conn| {
            Box::pin(async move {
                diesel::sql_query(
                    "SELECT count(*) AS n FROM pg_class c JOIN pg_namespace s ON s.oid = c.relnamespace
                      WHERE s.nspname = 'public' AND c.relkind = 'r' AND NOT c.relrowsecurity
                        AND c.relname NOT IN ('socle_idempotency', 'socle_outbox', '__diesel_schema_migrations')",
                )
                .get_result::<Count>(conn)
                .await
                .map_err(socle_db::DbError::from)
            })
        })
        .await
        .unwrap();
    assert_eq!(unprotected.n, 0, "a CRM table without row-level security");
}

#[tokio::test(flavor = "multi_thread")]
async fn list_and_search_statements_do_not_grow_with_the_page_size() {
    let (crm, db) = crm().await;
    let entity = Uuid::new_v4();
    let mut orgs = Vec::new();
    for i in 0..60 {
        orgs.push(create_org(&crm, entity, &format!("Entreprise {i:02}"), "69001").await);
    }
    // Contacts affiliated with the organisations, so that the computed
    // columns (contact count, inherited status, organisations) have rows.
    for (i, org) in orgs.iter().enumerate() {
        let contact = Contact {
            entity_id: entity.to_string(),
            family_name: format!("Personne {}{}", char::from(b'a' + (i / 26) as u8), char::from(b'a' + (i % 26) as u8)),
            ..Contact::default()
        };
        let request = CreateContactRequest {
            request_id: Uuid::new_v4().to_string(),
            contact: Some(contact),
            allow_duplicates: true,
        };
        let contact = crm.create_contact(&caller(entity), request).await.unwrap().contact.unwrap();
        let (org_id, contact_id) = (Uuid::parse_str(&org.id).unwrap(), Uuid::parse_str(&contact.id).unwrap());
        db.transaction(&EntityScope::entity(entity), move |conn| {
            Box::pin(async move {
                diesel::sql_query(
                    "INSERT INTO affiliations (id, entity_id, contact_id, organization_id) VALUES ($1, $2, $3, $4)",
                )
                .bind::<SqlUuid, _>(Uuid::new_v4())
                .bind::<SqlUuid, _>(entity)
                .bind::<SqlUuid, _>(contact_id)
                .bind::<SqlUuid, _>(org_id)
                .execute(conn)
                .await
                .map_err(socle_db::DbError::from)
            })
        })
        .await
        .unwrap();
    }

    let who = caller(entity);
    let orgs_page = |size: i32| {
        let request = ListOrganizationsRequest { page_size: size, ..ListOrganizationsRequest::default() };
        crm.list_organizations(&who, request)
    };
    let (small, small_count) = statements::count(orgs_page(5)).await;
    let (large, large_count) = statements::count(orgs_page(50)).await;
    assert_eq!(small.unwrap().organizations.len(), 5);
    let large = large.unwrap();
    assert_eq!(large.organizations.len(), 50);
    assert!(large.organizations.iter().all(|o| o.contact_count == 1), "the computed columns are filled");
    assert!(small_count > 0, "the counter counts");
    assert_eq!(small_count, large_count, "organisations: statements grow with the page size");

    let contacts_page = |size: i32| {
        let request = ListContactsRequest { page_size: size, ..ListContactsRequest::default() };
        crm.list_contacts(&who, request)
    };
    let (small, small_count) = statements::count(contacts_page(5)).await;
    let (large, large_count) = statements::count(contacts_page(50)).await;
    assert_eq!(small.unwrap().contacts.len(), 5);
    let large = large.unwrap();
    assert!(large.contacts.iter().all(|c| c.organizations.len() == 1), "the organisations are filled");
    assert_eq!(small_count, large_count, "contacts: statements grow with the page size");

    let search = |size: i32| {
        let request = SearchRequest { query: "entreprise".into(), page_size: size, ..SearchRequest::default() };
        crm.search(&who, request)
    };
    let (small, small_count) = statements::count(search(5)).await;
    let (large, large_count) = statements::count(search(50)).await;
    assert_eq!(small.unwrap().hits.len(), 5);
    assert_eq!(large.unwrap().hits.len(), 50);
    assert_eq!(small_count, large_count, "search: statements grow with the page size");
}

#[derive(QueryableByName)]
struct Id {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
}

/// The search's candidate function runs as the owner (so that its indexes
/// serve despite row-level security) and must apply the caller's scope
/// itself: asked for another entity, it returns nothing.
#[tokio::test(flavor = "multi_thread")]
async fn search_candidates_stay_within_the_callers_scope() {
    let (crm, db) = crm().await;
    let (lyon, lille) = (Uuid::new_v4(), Uuid::new_v4());
    let ours = create_org(&crm, lyon, "Boulangerie Martin", "69001").await;
    let theirs = create_org(&crm, lille, "Boulangerie Martinez", "59000").await;
    let (ours, theirs) = (Uuid::parse_str(&ours.id).unwrap(), Uuid::parse_str(&theirs.id).unwrap());
    let mut both = vec![ours, theirs];
    both.sort();
    let query = ("boulangerie:*", "boulangerie martin");
    // Within Lyon's scope, asking for Lille too yields Lyon's only.
    assert_eq!(candidates(&db, EntityScope::entity(lyon), vec![lyon, lille], query).await, vec![ours]);
    assert_eq!(candidates(&db, EntityScope::entity(lyon), vec![lille], query).await, Vec::<Uuid>::new());
    assert_eq!(candidates(&db, EntityScope::none(), vec![lyon, lille], query).await, Vec::<Uuid>::new());
    // With both in scope, both match.
    assert_eq!(candidates(&db, EntityScope::Entities(vec![lyon, lille]), vec![lyon, lille], query).await, both);
    // Nothing asked, nothing read.
    assert_eq!(candidates(&db, EntityScope::Entities(vec![lyon, lille]), vec![], query).await, Vec::<Uuid>::new());
}

/// Typos are a fallback: a misspelt name is a candidate while the words
/// themselves match fewer than 20 records, and no longer once they match
/// more (the trigram scans are skipped).
#[tokio::test(flavor = "multi_thread")]
async fn typo_matches_are_a_fallback_when_the_words_match_little() {
    let (crm, db) = crm().await;
    let lyon = Uuid::new_v4();
    let misspelt = create_org(&crm, lyon, "Dupond Transports", "69002").await;
    let misspelt = Uuid::parse_str(&misspelt.id).unwrap();
    let query = ("dupont:*", "dupont");
    let scope = || EntityScope::entity(lyon);
    assert_eq!(candidates(&db, scope(), vec![lyon], query).await, vec![misspelt], "the typo is found");
    for i in 0..20 {
        create_org(&crm, lyon, &format!("Dupont {i:02}"), "69003").await;
    }
    let found = candidates(&db, scope(), vec![lyon], query).await;
    assert_eq!(found.len(), 20, "the 20 exact matches");
    assert!(!found.contains(&misspelt), "typos are not looked for when the words match 20 records");
}

/// The organisations `crm_search_candidates` returns for a query
/// (`tsquery`, folded text) asked within `asked`, under `scope`.
async fn candidates(db: &Database, scope: EntityScope, asked: Vec<Uuid>, query: (&str, &str)) -> Vec<Uuid> {
    let (tsquery, folded) = (query.0.to_owned(), query.1.to_owned());
    let mut ids: Vec<Uuid> = db
        .transaction(&scope, move |conn| {
            Box::pin(async move {
                diesel::sql_query("SELECT id FROM crm_search_candidates($1, '{}', $2, $3, '', '', '') WHERE kind = 1")
                    .bind::<diesel::sql_types::Array<SqlUuid>, _>(asked)
                    .bind::<diesel::sql_types::Text, _>(tsquery)
                    .bind::<diesel::sql_types::Text, _>(folded)
                    .load::<Id>(conn)
                    .await
                    .map_err(socle_db::DbError::from)
            })
        })
        .await
        .unwrap()
        .into_iter()
        .map(|row| row.id)
        .collect();
    ids.sort();
    ids
}
