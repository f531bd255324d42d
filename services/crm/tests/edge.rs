//! The CRM through the edge (REST) and over native gRPC, on the secured
//! platform: real tokens, real access decisions from tenancy, real
//! PostgreSQL with row-level security, audit events through the outbox.

use reqwest::Method;
use serde_json::{Value, json};
use socle_crm::validate::luhn_check_digit;
use socle_proto::socle::crm::v1::{
    GetOrganizationRequest, Organization, UpdateOrganizationRequest,
    organization_service_client::OrganizationServiceClient,
};
use socle_testkit::secure::SecurePlatform;
use uuid::Uuid;

/// A platform with two branches under a region and one staff member in each.
struct World {
    p: SecurePlatform,
    lyon: String,
    lille: String,
    lyon_staff: String,
    lille_staff: String,
}

impl World {
    async fn new() -> World {
        let p = SecurePlatform::start().await.expect("secured platform");
        let region = p.create_entity(&p.root, "ENTITY_KIND_REGION", "ARA").await.unwrap();
        let lyon = p.create_entity(&region, "ENTITY_KIND_BRANCH", "ARA-LYON").await.unwrap();
        let lille = p.create_entity(&p.root, "ENTITY_KIND_BRANCH", "HDF-LILLE").await.unwrap();
        let (lyon_user, lyon_staff) = p.user_with_password("staff.lyon@socle.test", &lyon).await.unwrap();
        p.grant_user(lyon_user, "staff", &lyon, "GRANT_SCOPE_SUBTREE").await.unwrap();
        let (lille_user, lille_staff) = p.user_with_password("staff.lille@socle.test", &lille).await.unwrap();
        p.grant_user(lille_user, "staff", &lille, "GRANT_SCOPE_SUBTREE").await.unwrap();
        World { p, lyon, lille, lyon_staff, lille_staff }
    }

    async fn call(&self, token: &str, method: Method, path: &str, entity: &str, body: Option<Value>) -> (u16, Value) {
        self.p.call(Some(token), method, path, Some(entity), body).await.unwrap()
    }

    async fn create_org(&self, token: &str, entity: &str, org: Value) -> (u16, Value) {
        let mut org = org;
        org["entityId"] = json!(entity);
        let body = json!({ "requestId": Uuid::new_v4().to_string(), "organization": org });
        self.call(token, Method::POST, "/api/v1/organizations", entity, Some(body)).await
    }
}

fn violation_fields(problem: &Value) -> Vec<String> {
    problem["violations"]
        .as_array()
        .map(|v| v.iter().filter_map(|x| x["field"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

fn org_ids(list: &Value) -> Vec<String> {
    list["organizations"].as_array().into_iter().flatten().map(|o| o["id"].as_str().unwrap().to_owned()).collect()
}

/// A valid SIRET with the given 8-digit prefix (SIREN and SIRET Luhn keys computed).
fn siret(prefix8: u32) -> String {
    let luhn_key = luhn_check_digit;
    let siren = format!("{prefix8:08}{}", luhn_key(&format!("{prefix8:08}")));
    let body = format!("{siren}0001");
    format!("{body}{}", luhn_key(&body))
}

#[tokio::test(flavor = "multi_thread")]
async fn organisations_are_validated_idempotent_versioned_and_isolated() {
    let w = World::new().await;
    let (lyon, lille) = (w.lyon.clone(), w.lille.clone());

    // Every invalid field is reported at once, as field violations.
    let (status, problem) = w
        .create_org(
            &w.lyon_staff,
            &lyon,
            json!({ "legalName": "", "siret": "73282932000075", "phone": "12345", "nafCode": "00.00Z",
                    "email": "pas-un-email", "addresses": [{ "kind": "ADDRESS_KIND_HEAD_OFFICE",
                    "address": { "postalCode": "6900", "city": "Lyon" } }] }),
        )
        .await;
    assert_eq!(status, 400, "{problem}");
    let fields = violation_fields(&problem);
    for field in [
        "organization.legalName",
        "organization.siret",
        "organization.phone",
        "organization.nafCode",
        "organization.email",
        "organization.addresses[0].address.postalCode",
    ] {
        assert!(fields.iter().any(|f| f == field), "no violation on {field}: {problem}");
    }

    // A valid organisation is normalised.
    let request_id = Uuid::new_v4().to_string();
    let body = json!({ "requestId": request_id, "organization": {
        "entityId": lyon, "legalName": "  Boulangerie   Martin SARL ", "siret": "732 829 320 00074",
        "nafCode": "1071c", "legalFormCode": "5499", "phone": "04 78 00 00 00", "email": "Contact@Boulangerie-MARTIN.fr",
        "website": "boulangerie-martin.fr", "tags": ["Artisanat", "jeune entreprise"],
        "addresses": [{ "kind": "ADDRESS_KIND_HEAD_OFFICE", "address":
            { "streetLine": "12 rue de la République", "postalCode": "69002", "city": "Lyon" } }] } });
    let (status, created) =
        w.call(&w.lyon_staff, Method::POST, "/api/v1/organizations", &lyon, Some(body.clone())).await;
    assert_eq!(status, 200, "{created}");
    let org = &created["organization"];
    assert_eq!(org["legalName"], "Boulangerie Martin SARL");
    assert_eq!(org["siret"], "73282932000074");
    assert_eq!(org["siren"], "732829320", "the SIREN is filled from the SIRET");
    assert_eq!(org["nafCode"], "10.71C");
    assert_eq!(org["phone"], "+33478000000");
    assert_eq!(org["email"], "Contact@boulangerie-martin.fr");
    assert_eq!(org["website"], "https://boulangerie-martin.fr");
    assert_eq!(org["tags"], json!(["artisanat", "jeune-entreprise"]));
    assert_eq!(org["addresses"][0]["primary"], true);
    assert_eq!(org["addresses"][0]["address"]["departmentCode"], "69");
    assert_eq!(org["membershipStatus"], "MEMBERSHIP_STATUS_NONE");
    let id = org["id"].as_str().unwrap().to_owned();
    let etag = org["etag"].as_str().unwrap().to_owned();

    // A retry with the same request id returns the first record, never a second one.
    let (status, again) = w.call(&w.lyon_staff, Method::POST, "/api/v1/organizations", &lyon, Some(body)).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["organization"]["id"], id.as_str());
    let (_, list) = w.call(&w.lyon_staff, Method::GET, "/api/v1/organizations", &lyon, None).await;
    assert_eq!(org_ids(&list), vec![id.clone()]);

    // Same SIRET: refused with the candidate and why, unless confirmed.
    let (status, conflict) = w
        .create_org(&w.lyon_staff, &lyon, json!({ "legalName": "Martin Boulangerie", "siret": "73282932000074" }))
        .await;
    assert_eq!(status, 409, "{conflict}");
    let candidate = &conflict["details"][0]["candidates"][0];
    assert_eq!(candidate["recordId"], id.as_str(), "{conflict}");
    assert_eq!(candidate["displayName"], "Boulangerie Martin SARL");
    let reasons = candidate["reasons"].as_array().unwrap();
    assert!(reasons.contains(&json!("DUPLICATE_REASON_SAME_SIRET")), "{conflict}");
    assert!(reasons.contains(&json!("DUPLICATE_REASON_SAME_SIREN")), "{conflict}");
    // Same phone and a similar name in the same postal code are caught too.
    let (status, conflict) = w
        .create_org(
            &w.lyon_staff,
            &lyon,
            json!({ "legalName": "Boulangerie Martin", "addresses": [{ "kind": "ADDRESS_KIND_HEAD_OFFICE",
                     "address": { "postalCode": "69002", "city": "Lyon" } }], "phone": "+33 4 78 00 00 00" }),
        )
        .await;
    assert_eq!(status, 409, "{conflict}");
    let reasons = conflict["details"][0]["candidates"][0]["reasons"].as_array().unwrap().clone();
    assert!(reasons.contains(&json!("DUPLICATE_REASON_SAME_PHONE")), "{conflict}");
    assert!(reasons.contains(&json!("DUPLICATE_REASON_FUZZY_NAME_POSTAL_CODE")), "{conflict}");

    // In another branch, the duplicate is flagged without revealing anything.
    let (status, conflict) =
        w.create_org(&w.lille_staff, &lille, json!({ "legalName": "BM Nord", "siret": "73282932000074" })).await;
    assert_eq!(status, 409, "{conflict}");
    let hidden = &conflict["details"][0]["candidates"][0];
    assert_eq!(hidden["inOtherEntity"], true, "{conflict}");
    for field in ["recordId", "displayName", "summary", "entityId"] {
        assert!(hidden.get(field).is_none_or(|v| v == ""), "{field} revealed: {conflict}");
    }
    // "Create anyway" works and keeps the overridden candidates.
    let (status, forced) = w
        .call(
            &w.lille_staff,
            Method::POST,
            "/api/v1/organizations",
            &lille,
            Some(json!({ "requestId": Uuid::new_v4().to_string(), "allowDuplicates": true,
                         "organization": { "entityId": lille, "legalName": "BM Nord", "siret": "73282932000074" } })),
        )
        .await;
    assert_eq!(status, 200, "{forced}");
    assert_eq!(forced["duplicates"][0]["inOtherEntity"], true);
    let lille_org = forced["organization"]["id"].as_str().unwrap().to_owned();

    // Isolation: Lille sees nothing of Lyon, by id, by list or by writing there.
    let (status, _) = w.call(&w.lille_staff, Method::GET, &format!("/api/v1/organizations/{id}"), &lille, None).await;
    assert_eq!(status, 404);
    let (status, _) =
        w.call(&w.lyon_staff, Method::GET, &format!("/api/v1/organizations/{lille_org}"), &lyon, None).await;
    assert_eq!(status, 404);
    let (status, _) = w.call(&w.lille_staff, Method::GET, "/api/v1/organizations", &lyon, None).await;
    assert_eq!(status, 403);
    let (status, _) = w.create_org(&w.lille_staff, &lyon, json!({ "legalName": "Intrus" })).await;
    assert_eq!(status, 403);
    let (_, list) = w.call(&w.lille_staff, Method::GET, "/api/v1/organizations", &lille, None).await;
    assert_eq!(org_ids(&list), vec![lille_org.clone()]);
    // The national administrator sees both branches from the root.
    let (status, all) =
        w.call(&w.p.admin_token, Method::GET, "/api/v1/organizations?includeDescendants=true", &w.p.root, None).await;
    assert_eq!(status, 200, "{all}");
    assert_eq!(org_ids(&all).len(), 2, "{all}");

    // Updates: a stale etag is refused with 412 and nothing is written.
    let path = format!("/api/v1/organizations/{id}");
    let update = |etag: &str, name: &str| json!({ "organization": { "legalName": name }, "updateMask": "legalName", "etag": etag });
    let (status, updated) =
        w.call(&w.lyon_staff, Method::PATCH, &path, &lyon, Some(update(&etag, "Boulangerie Martin & Fils"))).await;
    assert_eq!(status, 200, "{updated}");
    assert_ne!(updated["organization"]["etag"], etag.as_str());
    assert_eq!(updated["organization"]["siret"], "73282932000074", "fields outside the mask are kept");
    let (status, stale) = w.call(&w.lyon_staff, Method::PATCH, &path, &lyon, Some(update(&etag, "Écrasé"))).await;
    assert_eq!(status, 412, "{stale}");
    let (_, now) = w.call(&w.lyon_staff, Method::GET, &path, &lyon, None).await;
    assert_eq!(now["organization"]["legalName"], "Boulangerie Martin & Fils");
    let (status, bad_mask) = w
        .call(
            &w.lyon_staff,
            Method::PATCH,
            &path,
            &lyon,
            Some(json!({ "organization": { "state": "ORGANIZATION_STATE_MERGED" }, "updateMask": "state",
                         "etag": now["organization"]["etag"] })),
        )
        .await;
    assert_eq!(status, 400, "{bad_mask}");
    assert_eq!(violation_fields(&bad_mask), vec!["updateMask"]);
    // Lille cannot update Lyon's record, even with its etag.
    let (status, _) = w
        .call(
            &w.lille_staff,
            Method::PATCH,
            &path,
            &lille,
            Some(update(now["organization"]["etag"].as_str().unwrap(), "x")),
        )
        .await;
    assert_eq!(status, 404);

    // The changes reach the audit trail of Lyon's chain.
    let event =
        w.p.wait_for_event(&lyon, |e| e["action"] == "crm.organizations.update" && e["resourceId"] == id.as_str())
            .await;
    let changes = event["changes"].as_array().unwrap();
    assert!(changes.iter().any(|c| c["fieldPath"] == "legal_name"), "{event}");

    // Deleting needs crm.organizations.delete, which staff lacks.
    let (status, _) = w.call(&w.lyon_staff, Method::DELETE, &path, &lyon, None).await;
    assert_eq!(status, 403);
    let (status, body) = w.call(&w.p.admin_token, Method::DELETE, &path, &lyon, None).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = w.call(&w.lyon_staff, Method::GET, &path, &lyon, None).await;
    assert_eq!(status, 404);
    w.p.wait_for_event(&lyon, |e| e["action"] == "crm.organizations.delete" && e["resourceId"] == id.as_str()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn lists_filter_order_and_page_with_stable_tokens_and_search_ignores_accents_and_typos() {
    let w = World::new().await;
    let lyon = w.lyon.clone();
    let names = [
        ("Société Générale de Boulangerie", "10.71C", "69003", "Lyon", vec!["artisanat"]),
        ("Élégance Pâtisserie", "10.71D", "69100", "Villeurbanne", vec!["artisanat", "jeune-entreprise"]),
        ("Transports Rhodaniens", "49.41A", "69200", "Vénissieux", vec![]),
        ("Atelier Numérique", "62.01Z", "69007", "Lyon", vec!["jeune-entreprise"]),
        ("Bâtiment Confluence", "41.20A", "69002", "Lyon", vec![]),
        ("Café des Terreaux", "56.30Z", "69001", "Lyon", vec![]),
        ("Imprimerie Croix-Rousse", "18.12Z", "69004", "Lyon", vec!["artisanat"]),
    ];
    for (i, (name, naf, postal, city, tags)) in names.iter().enumerate() {
        let (status, body) = w
            .create_org(
                &w.lyon_staff,
                &lyon,
                json!({ "legalName": name, "nafCode": naf, "siret": siret(10_000_000 + i as u32 * 7919), "tags": tags,
                        "addresses": [{ "kind": "ADDRESS_KIND_HEAD_OFFICE",
                                        "address": { "postalCode": postal, "city": city } }] }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }

    // Keyset pages of 3: every organisation once, in accent-insensitive name order.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let (status, page) = w
            .call(
                &w.lyon_staff,
                Method::GET,
                &format!("/api/v1/organizations?pageSize=3&pageToken={token}"),
                &lyon,
                None,
            )
            .await;
        assert_eq!(status, 200, "{page}");
        let orgs = page["organizations"].as_array().unwrap();
        assert!(orgs.len() <= 3);
        seen.extend(orgs.iter().map(|o| o["legalName"].as_str().unwrap().to_owned()));
        token = page["nextPageToken"].as_str().unwrap_or("").to_owned();
        if token.is_empty() {
            break;
        }
        // A token replayed with other filters is refused.
        let (status, problem) = w
            .call(
                &w.lyon_staff,
                Method::GET,
                &format!("/api/v1/organizations?pageSize=3&tags=artisanat&pageToken={token}"),
                &lyon,
                None,
            )
            .await;
        assert_eq!(status, 400, "{problem}");
    }
    let expected = [
        "Atelier Numérique",
        "Bâtiment Confluence",
        "Café des Terreaux",
        "Élégance Pâtisserie",
        "Imprimerie Croix-Rousse",
        "Société Générale de Boulangerie",
        "Transports Rhodaniens",
    ];
    assert_eq!(seen, expected);

    let names_of = |list: &Value| -> Vec<String> {
        list["organizations"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|o| o["legalName"].as_str().unwrap().to_owned())
            .collect()
    };
    let get = |query: &str| {
        let path = format!("/api/v1/organizations?{query}");
        let w = &w;
        async move {
            let (status, body) = w.call(&w.lyon_staff, Method::GET, &path, &w.lyon, None).await;
            assert_eq!(status, 200, "{path}: {body}");
            body
        }
    };
    assert_eq!(names_of(&get("tags=artisanat&tags=jeune-entreprise").await), vec!["Élégance Pâtisserie"]);
    assert_eq!(names_of(&get("nafCodes=10.71").await), vec!["Élégance Pâtisserie", "Société Générale de Boulangerie"]);
    assert_eq!(names_of(&get("city=venissieux").await), vec!["Transports Rhodaniens"]);
    assert_eq!(names_of(&get("postalCode=6910").await), vec!["Élégance Pâtisserie"]);
    assert_eq!(names_of(&get("query=societe").await), vec!["Société Générale de Boulangerie"]);
    assert_eq!(names_of(&get("membershipStatuses=MEMBERSHIP_STATUS_ACTIVE").await), Vec::<String>::new());
    assert_eq!(names_of(&get("membershipStatuses=MEMBERSHIP_STATUS_NONE").await).len(), 7);
    let newest = names_of(&get("orderBy=create_time%20desc&pageSize=2").await);
    assert_eq!(newest, vec!["Imprimerie Croix-Rousse", "Café des Terreaux"]);
    let (status, problem) =
        w.call(&w.lyon_staff, Method::GET, "/api/v1/organizations?orderBy=siret", &lyon, None).await;
    assert_eq!(status, 400, "{problem}");
    assert_eq!(violation_fields(&problem), vec!["orderBy"]);

    // Tags in use, most used first, by prefix, in pages.
    let (status, tags) = w.call(&w.lyon_staff, Method::GET, "/api/v1/tags?pageSize=1", &lyon, None).await;
    assert_eq!(status, 200, "{tags}");
    assert_eq!(tags["tags"], json!([{ "tag": "artisanat", "recordCount": "3" }]));
    let next = tags["nextPageToken"].as_str().unwrap().to_owned();
    let (_, tags) =
        w.call(&w.lyon_staff, Method::GET, &format!("/api/v1/tags?pageSize=1&pageToken={next}"), &lyon, None).await;
    assert_eq!(tags["tags"], json!([{ "tag": "jeune-entreprise", "recordCount": "2" }]));
    assert!(tags.get("nextPageToken").is_none_or(|t| t == ""), "{tags}");
    let (_, tags) = w.call(&w.lyon_staff, Method::GET, "/api/v1/tags?prefix=JEU", &lyon, None).await;
    assert_eq!(tags["tags"], json!([{ "tag": "jeune-entreprise", "recordCount": "2" }]));
    let (_, tags) = w.call(&w.lille_staff, Method::GET, "/api/v1/tags", &w.lille, None).await;
    assert!(tags.get("tags").is_none(), "Lille sees no tag of Lyon: {tags}");

    // Search: accents and case ignored, typos tolerated, identifiers exact.
    let search = |query: &str| {
        let body = json!({ "query": query });
        let w = &w;
        async move {
            let (status, body) = w.call(&w.lyon_staff, Method::POST, "/api/v1/crm:search", &w.lyon, Some(body)).await;
            assert_eq!(status, 200, "{body}");
            body["hits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| h["organization"]["legalName"].as_str().unwrap_or_default().to_owned())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(search("societe generale").await.first().map(String::as_str), Some("Société Générale de Boulangerie"));
    assert_eq!(search("ELEGANCE patiss").await.first().map(String::as_str), Some("Élégance Pâtisserie"));
    assert_eq!(search("Imprimrie Croix Rouse").await.first().map(String::as_str), Some("Imprimerie Croix-Rousse"));
    let siret3 = siret(10_000_000 + 2 * 7919);
    assert_eq!(search(&siret3).await, vec!["Transports Rhodaniens"]);
    let (status, body) =
        w.call(&w.lyon_staff, Method::POST, "/api/v1/crm:search", &lyon, Some(json!({ "query": "societe" }))).await;
    assert_eq!(status, 200);
    assert_eq!(body["hits"][0]["highlights"][0]["snippet"], "<mark>Société</mark> Générale de Boulangerie");
    // Lille finds nothing of Lyon.
    let (status, body) = w
        .call(
            &w.lille_staff,
            Method::POST,
            "/api/v1/crm:search",
            &w.lille,
            Some(json!({ "query": "societe generale" })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["hits"].as_array().is_none_or(|h| h.is_empty()), "{body}");
    let (status, body) =
        w.call(&w.lyon_staff, Method::POST, "/api/v1/crm:search", &lyon, Some(json!({ "query": "s" }))).await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn contacts_are_normalised_deduplicated_and_isolated() {
    let w = World::new().await;
    let (lyon, lille) = (w.lyon.clone(), w.lille.clone());
    let create = |entity: &str, contact: Value, allow: bool| {
        let mut contact = contact;
        contact["entityId"] = json!(entity);
        let body = json!({ "requestId": Uuid::new_v4().to_string(), "contact": contact, "allowDuplicates": allow });
        let (w, entity, token) =
            (&w, entity.to_owned(), if entity == lyon { w.lyon_staff.clone() } else { w.lille_staff.clone() });
        async move { w.call(&token, Method::POST, "/api/v1/contacts", &entity, Some(body)).await }
    };

    let (status, problem) = create(
        &lyon,
        json!({ "givenName": "Camille", "emails": [{ "address": "camille@" }], "phones": [{ "number": "06 12" }] }),
        false,
    )
    .await;
    assert_eq!(status, 400, "{problem}");
    let fields = violation_fields(&problem);
    for field in ["contact.familyName", "contact.emails[0].address", "contact.phones[0].number"] {
        assert!(fields.iter().any(|f| f == field), "no violation on {field}: {problem}");
    }

    let (status, created) = create(
        &lyon,
        json!({ "civility": "CIVILITY_MADAME", "givenName": "Camille", "familyName": "Durand", "jobTitle": "Gérante",
                "emails": [{ "address": " Camille.Durand@Exemple.FR ", "kind": "EMAIL_KIND_WORK" }],
                "phones": [{ "number": "06.12.34.56.78", "kind": "PHONE_KIND_MOBILE" }],
                "consents": [{ "topic": "CONSENT_TOPIC_NEWSLETTER", "channel": "CONSENT_CHANNEL_EMAIL", "granted": true }] }),
        false,
    )
    .await;
    assert_eq!(status, 200, "{created}");
    let contact = &created["contact"];
    assert_eq!(contact["displayName"], "Camille Durand");
    assert_eq!(contact["emails"][0]["address"], "Camille.Durand@exemple.fr");
    assert_eq!(contact["emails"][0]["primary"], true);
    assert_eq!(contact["phones"][0]["number"], "+33612345678");
    assert_eq!(contact["membershipStatus"], "MEMBERSHIP_STATUS_NONE");
    let id = contact["id"].as_str().unwrap().to_owned();

    // Same e-mail (any case) or same phone: a duplicate, named in the same branch…
    let (status, conflict) = create(
        &lyon,
        json!({ "givenName": "C.", "familyName": "Durand-Martin", "emails": [{ "address": "camille.durand@exemple.fr" }] }),
        false,
    )
    .await;
    assert_eq!(status, 409, "{conflict}");
    let candidate = &conflict["details"][0]["candidates"][0];
    assert_eq!(candidate["recordId"], id.as_str());
    assert_eq!(candidate["recordKind"], "RECORD_KIND_CONTACT");
    assert!(candidate["reasons"].as_array().unwrap().contains(&json!("DUPLICATE_REASON_SAME_EMAIL")));
    // …and anonymous in another branch.
    let (status, conflict) =
        create(&lille, json!({ "familyName": "Autre", "phones": [{ "number": "+33 6 12 34 56 78" }] }), false).await;
    assert_eq!(status, 409, "{conflict}");
    let hidden = &conflict["details"][0]["candidates"][0];
    assert_eq!(hidden["inOtherEntity"], true);
    assert!(hidden.get("displayName").is_none_or(|v| v == ""), "{conflict}");
    let (status, _) = w.call(&w.lille_staff, Method::GET, &format!("/api/v1/contacts/{id}"), &lille, None).await;
    assert_eq!(status, 404);

    // Lists: prefix of a name or an e-mail, consent filters, stale etags refused.
    let (status, list) = w.call(&w.lyon_staff, Method::GET, "/api/v1/contacts?query=duran", &lyon, None).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["contacts"].as_array().unwrap().len(), 1);
    let (_, list) = w.call(&w.lyon_staff, Method::GET, "/api/v1/contacts?query=camille.d", &lyon, None).await;
    assert_eq!(list["contacts"].as_array().unwrap().len(), 1);
    let (_, list) = w
        .call(
            &w.lyon_staff,
            Method::GET,
            "/api/v1/contacts?consentTopic=CONSENT_TOPIC_NEWSLETTER&consentChannel=CONSENT_CHANNEL_SMS",
            &lyon,
            None,
        )
        .await;
    assert!(list["contacts"].as_array().is_none_or(|c| c.is_empty()), "{list}");
    let path = format!("/api/v1/contacts/{id}");
    let etag = contact["etag"].as_str().unwrap().to_owned();
    let (status, updated) = w
        .call(
            &w.lyon_staff,
            Method::PATCH,
            &path,
            &lyon,
            Some(json!({ "contact": { "jobTitle": "Directrice" }, "updateMask": "jobTitle", "etag": etag })),
        )
        .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["contact"]["jobTitle"], "Directrice");
    assert_eq!(updated["contact"]["emails"][0]["address"], "Camille.Durand@exemple.fr");
    let (status, _) = w
        .call(
            &w.lyon_staff,
            Method::PATCH,
            &path,
            &lyon,
            Some(json!({ "contact": { "jobTitle": "Perdu" }, "updateMask": "jobTitle", "etag": etag })),
        )
        .await;
    assert_eq!(status, 412);

    // Personal fields reach the audit trail sealed for the contact.
    let event =
        w.p.wait_for_event(&lyon, |e| e["action"] == "crm.contacts.create" && e["resourceId"] == id.as_str()).await;
    let family = event["changes"].as_array().unwrap().iter().find(|c| c["fieldPath"] == "family_name").cloned();
    let family = family.expect("family_name change");
    assert_eq!(family["personalData"], true, "{event}");
    assert_eq!(family["subjectId"], id.as_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_clients_get_typed_errors() {
    let w = World::new().await;
    let lyon = w.lyon.clone();
    let (status, created) =
        w.create_org(&w.lyon_staff, &lyon, json!({ "legalName": "Garage du Rhône", "siret": siret(44_444_444) })).await;
    assert_eq!(status, 200, "{created}");
    let id = created["organization"]["id"].as_str().unwrap().to_owned();
    let mut client = OrganizationServiceClient::connect(w.p.edge.url()).await.unwrap();
    let token = w.lyon_staff.clone();
    let request = |message| authed(message, &token, &lyon);
    let request_update = |message| authed(message, &token, &lyon);
    let got = client
        .get_organization(request(GetOrganizationRequest { organization_id: id.clone() }))
        .await
        .unwrap()
        .into_inner()
        .organization
        .unwrap();
    assert_eq!(got.legal_name, "Garage du Rhône");

    // A stale etag: ABORTED, nothing written.
    let stale = client
        .update_organization(request_update(UpdateOrganizationRequest {
            organization_id: id.clone(),
            organization: Some(Organization { legal_name: "Écrasé".into(), ..Organization::default() }),
            update_mask: Some(prost_types::FieldMask { paths: vec!["legal_name".into()] }),
            etag: "\"999\"".into(),
            allow_duplicates: false,
        }))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), tonic::Code::Aborted);

    // An invalid SIRET: INVALID_ARGUMENT with a BadRequest field violation.
    let invalid = client
        .update_organization(request_update(UpdateOrganizationRequest {
            organization_id: id.clone(),
            organization: Some(Organization { siret: "12345678901234".into(), ..Organization::default() }),
            update_mask: Some(prost_types::FieldMask { paths: vec!["siret".into()] }),
            etag: got.etag.clone(),
            allow_duplicates: false,
        }))
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);
    use tonic_types::StatusExt;
    let bad_request = invalid.get_details_bad_request().expect("BadRequest detail");
    assert_eq!(bad_request.field_violations[0].field, "organization.siret");
    let after = client
        .get_organization(request(GetOrganizationRequest { organization_id: id }))
        .await
        .unwrap()
        .into_inner()
        .organization
        .unwrap();
    assert_eq!(after.legal_name, "Garage du Rhône");
    assert_eq!(after.etag, got.etag);
}

fn authed<T>(message: T, token: &str, entity: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    request.metadata_mut().insert("x-socle-entity", entity.parse().unwrap());
    request
}
