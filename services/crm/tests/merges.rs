//! Merges through the edge, on the secured platform: a field-by-field
//! preview, a merge that moves the links and hides the sources, and an undo
//! that puts everything back while keeping later changes to the target.

use reqwest::Method;
use serde_json::{Value, json};
use socle_testkit::secure::SecurePlatform;
use uuid::Uuid;

struct World {
    p: SecurePlatform,
    lyon: String,
    lille: String,
    staff: String,
}

impl World {
    async fn new() -> World {
        let p = SecurePlatform::start().await.expect("secured platform");
        let lyon = p.create_entity(&p.root, "ENTITY_KIND_BRANCH", "ARA-LYON").await.unwrap();
        let lille = p.create_entity(&p.root, "ENTITY_KIND_BRANCH", "HDF-LILLE").await.unwrap();
        let (user, staff) = p.user_with_password("staff.lyon@socle.test", &lyon).await.unwrap();
        p.grant_user(user, "staff", &lyon, "GRANT_SCOPE_SUBTREE").await.unwrap();
        World { p, lyon, lille, staff }
    }

    async fn admin(&self, method: Method, path: &str, entity: &str, body: Option<Value>) -> (u16, Value) {
        self.p.call(Some(&self.p.admin_token), method, path, Some(entity), body).await.unwrap()
    }

    async fn create(&self, path: &str, field: &str, entity: &str, mut record: Value) -> Value {
        record["entityId"] = json!(entity);
        let body = json!({ "requestId": Uuid::new_v4().to_string(), field: record, "allowDuplicates": true });
        let (status, created) = self.admin(Method::POST, path, entity, Some(body)).await;
        assert_eq!(status, 200, "{created}");
        created[field].clone()
    }
}

fn id(v: &Value) -> String {
    v["id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn organisations_merge_after_a_preview_and_the_merge_can_be_undone() {
    let w = World::new().await;
    let lyon = w.lyon.clone();
    let target = w
        .create(
            "/api/v1/organizations",
            "organization",
            &lyon,
            json!({ "legalName": "Boulangerie Martin", "siret": "73282932000074", "tags": ["artisanat"],
                    "externalRefs": { "dolibarr": "12" } }),
        )
        .await;
    let source = w
        .create(
            "/api/v1/organizations",
            "organization",
            &lyon,
            json!({ "legalName": "Boulangerie Martin SARL", "phone": "04 78 00 00 00", "tags": ["adherent-historique"],
                    "email": "contact@martin.fr", "externalRefs": { "dolibarr": "57", "csv": "A-3" } }),
        )
        .await;
    let contact =
        w.create("/api/v1/contacts", "contact", &lyon, json!({ "givenName": "Paul", "familyName": "Martin" })).await;
    let (status, affiliation) = w
        .admin(
            Method::POST,
            "/api/v1/affiliations",
            &lyon,
            Some(json!({ "requestId": Uuid::new_v4().to_string(),
                         "affiliation": { "entityId": lyon, "contactId": id(&contact), "organizationId": id(&source),
                                          "roles": ["AFFILIATION_ROLE_LEGAL_REPRESENTATIVE"] } })),
        )
        .await;
    assert_eq!(status, 200, "{affiliation}");
    let (t, s) = (id(&target), id(&source));

    // The preview changes nothing and says what would happen.
    let preview_path = format!("/api/v1/organizations/{t}:previewMerge");
    let (status, preview) =
        w.admin(Method::POST, &preview_path, &lyon, Some(json!({ "sourceOrganizationIds": [s] }))).await;
    assert_eq!(status, 200, "{preview}");
    let merged = &preview["mergedOrganization"];
    assert_eq!(merged["legalName"], "Boulangerie Martin", "the target's value by default");
    assert_eq!(merged["phone"], "+33478000000", "a source fills what the target lacks");
    assert_eq!(merged["tags"], json!(["artisanat", "adherent-historique"]));
    assert_eq!(merged["externalRefs"], json!({ "dolibarr": "12", "csv": "A-3" }));
    assert_eq!(preview["impact"]["affiliationCount"], 1);
    let name = preview["fields"].as_array().unwrap().iter().find(|f| f["fieldPath"] == "legal_name").unwrap();
    assert_eq!(name["conflicting"], true);
    assert_eq!(name["chosenRecordId"], t.as_str());
    let etags = preview["etags"].clone();
    assert_eq!(etags.as_object().unwrap().len(), 2);
    let (_, still) = w.admin(Method::GET, &format!("/api/v1/organizations/{s}"), &lyon, None).await;
    assert_eq!(still["organization"]["state"], "ORGANIZATION_STATE_ACTIVE");

    // Staff may not merge; a source from another branch is refused.
    let merge_path = format!("/api/v1/organizations/{t}:merge");
    let request = json!({ "requestId": Uuid::new_v4().to_string(), "sourceOrganizationIds": [s], "etags": etags,
                          "fieldChoices": [{ "fieldPath": "legal_name", "recordId": s }] });
    let (status, _) =
        w.p.call(Some(&w.staff), Method::POST, &merge_path, Some(&lyon), Some(request.clone())).await.unwrap();
    assert_eq!(status, 403);
    let elsewhere = w
        .create("/api/v1/organizations", "organization", &w.lille.clone(), json!({ "legalName": "Martin Nord" }))
        .await;
    let (status, problem) = w
        .admin(
            Method::POST,
            &merge_path,
            &lyon,
            Some(json!({ "requestId": Uuid::new_v4().to_string(), "sourceOrganizationIds": [id(&elsewhere)],
                         "etags": { t.clone(): target["etag"], id(&elsewhere): elsewhere["etag"] } })),
        )
        .await;
    assert_eq!(status, 400, "{problem}");
    assert_eq!(problem["violations"][0]["field"], "sourceIds[0]", "{problem}");

    // A stale etag: nothing merged.
    let mut stale = request.clone();
    stale["etags"][&t] = json!("\"99\"");
    stale["requestId"] = json!(Uuid::new_v4().to_string());
    let (status, _) = w.admin(Method::POST, &merge_path, &lyon, Some(stale)).await;
    assert_eq!(status, 412);

    // The merge: the chosen name, the links moved, the source hidden.
    let (status, done) = w.admin(Method::POST, &merge_path, &lyon, Some(request.clone())).await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["organization"]["legalName"], "Boulangerie Martin SARL");
    assert_eq!(done["organization"]["contactCount"], 1);
    let merge = done["merge"].clone();
    assert_eq!(merge["state"], "MERGE_STATE_APPLIED");
    assert_eq!(merge["undoable"], true);
    let (status, again) = w.admin(Method::POST, &merge_path, &lyon, Some(request)).await;
    assert_eq!(status, 200, "a retry answers the first merge: {again}");
    assert_eq!(again["merge"]["id"], merge["id"]);
    let (_, merged_source) = w.admin(Method::GET, &format!("/api/v1/organizations/{s}"), &lyon, None).await;
    assert_eq!(merged_source["organization"]["state"], "ORGANIZATION_STATE_MERGED");
    assert_eq!(merged_source["organization"]["mergedIntoId"], t.as_str());
    let (_, list) = w.admin(Method::GET, "/api/v1/organizations", &lyon, None).await;
    let listed: Vec<&str> =
        list["organizations"].as_array().unwrap().iter().map(|o| o["id"].as_str().unwrap()).collect();
    assert_eq!(listed, vec![t.as_str()], "merged records are hidden from lists");
    let (_, person) = w.admin(Method::GET, &format!("/api/v1/contacts/{}", id(&contact)), &lyon, None).await;
    assert_eq!(person["contact"]["organizations"][0]["organizationId"], t.as_str());

    // A change to the target after the merge survives the undo.
    let (status, changed) = w
        .admin(
            Method::PATCH,
            &format!("/api/v1/organizations/{t}"),
            &lyon,
            Some(json!({ "organization": { "description": "Fournil au feu de bois" }, "updateMask": "description",
                         "etag": done["organization"]["etag"] })),
        )
        .await;
    assert_eq!(status, 200, "{changed}");

    let merge_id = merge["id"].as_str().unwrap().to_owned();
    let undo_path = format!("/api/v1/merges/{merge_id}:undo");
    let (status, _) =
        w.p.call(
            Some(&w.staff),
            Method::POST,
            &undo_path,
            Some(&lyon),
            Some(json!({ "requestId": Uuid::new_v4().to_string() })),
        )
        .await
        .unwrap();
    assert_eq!(status, 403, "staff may not undo");
    let (status, undone) =
        w.admin(Method::POST, &undo_path, &lyon, Some(json!({ "requestId": Uuid::new_v4().to_string() }))).await;
    assert_eq!(status, 200, "{undone}");
    assert_eq!(undone["merge"]["state"], "MERGE_STATE_UNDONE");
    assert!(undone["merge"].get("undoable").is_none_or(|u| u == false), "{undone}");
    let (_, back) = w.admin(Method::GET, &format!("/api/v1/organizations/{s}"), &lyon, None).await;
    assert_eq!(back["organization"]["state"], "ORGANIZATION_STATE_ACTIVE");
    assert_eq!(back["organization"]["legalName"], "Boulangerie Martin SARL");
    assert_eq!(back["organization"]["contactCount"], 1, "the affiliation came back");
    let (_, restored) = w.admin(Method::GET, &format!("/api/v1/organizations/{t}"), &lyon, None).await;
    let restored = &restored["organization"];
    assert_eq!(restored["legalName"], "Boulangerie Martin");
    assert_eq!(restored["tags"], json!(["artisanat"]));
    assert!(restored.get("phone").is_none_or(|p| p == ""), "{restored}");
    assert_eq!(restored["description"], "Fournil au feu de bois", "later changes are kept");
    assert!(restored.get("contactCount").is_none_or(|c| c == 0), "{restored}");
    let (status, problem) =
        w.admin(Method::POST, &undo_path, &lyon, Some(json!({ "requestId": Uuid::new_v4().to_string() }))).await;
    assert_eq!(status, 400, "{problem}");
    assert_eq!(problem["code"], "FAILED_PRECONDITION");

    // The history: both merges listed for the record, newest first.
    let (status, merges) = w.admin(Method::GET, &format!("/api/v1/merges?recordId={s}"), &lyon, None).await;
    assert_eq!(status, 200, "{merges}");
    assert_eq!(merges["merges"].as_array().unwrap().len(), 1);
    assert_eq!(merges["merges"][0]["id"], merge_id.as_str());
    w.p.wait_for_event(&lyon, |e| e["action"] == "crm.merges.undo" && e["resourceId"] == merge_id.as_str()).await;
    w.p.wait_for_event(&lyon, |e| e["action"] == "crm.organizations.merge" && e["resourceId"] == s.as_str()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn contacts_merge_their_addresses_and_links_and_come_apart_again() {
    let w = World::new().await;
    let lyon = w.lyon.clone();
    let org =
        w.create("/api/v1/organizations", "organization", &lyon, json!({ "legalName": "Atelier Numérique" })).await;
    let target = w
        .create(
            "/api/v1/contacts",
            "contact",
            &lyon,
            json!({ "givenName": "Camille", "familyName": "Durand", "emails": [{ "address": "camille@atelier.fr" }] }),
        )
        .await;
    let source = w
        .create(
            "/api/v1/contacts",
            "contact",
            &lyon,
            json!({ "givenName": "Camille", "familyName": "Durand", "jobTitle": "Gérante",
                    "emails": [{ "address": "c.durand@gmail.com", "kind": "EMAIL_KIND_PERSONAL" }],
                    "phones": [{ "number": "06 12 34 56 78" }] }),
        )
        .await;
    let (t, s) = (id(&target), id(&source));
    let (status, linked) = w
        .admin(
            Method::POST,
            "/api/v1/affiliations",
            &lyon,
            Some(json!({ "requestId": Uuid::new_v4().to_string(),
                         "affiliation": { "entityId": lyon, "contactId": s, "organizationId": id(&org) } })),
        )
        .await;
    assert_eq!(status, 200, "{linked}");

    let (status, preview) = w
        .admin(
            Method::POST,
            &format!("/api/v1/contacts/{t}:previewMerge"),
            &lyon,
            Some(json!({ "sourceContactIds": [s] })),
        )
        .await;
    assert_eq!(status, 200, "{preview}");
    let (status, done) = w
        .admin(
            Method::POST,
            &format!("/api/v1/contacts/{t}:merge"),
            &lyon,
            Some(
                json!({ "requestId": Uuid::new_v4().to_string(), "sourceContactIds": [s], "etags": preview["etags"] }),
            ),
        )
        .await;
    assert_eq!(status, 200, "{done}");
    let merged = &done["contact"];
    let emails: Vec<&str> =
        merged["emails"].as_array().unwrap().iter().map(|e| e["address"].as_str().unwrap()).collect();
    assert_eq!(emails, vec!["camille@atelier.fr", "c.durand@gmail.com"]);
    assert_eq!(merged["emails"][0]["primary"], true);
    assert!(merged["emails"][1].get("primary").is_none_or(|p| p == false));
    assert_eq!(merged["phones"][0]["number"], "+33612345678");
    assert_eq!(merged["jobTitle"], "Gérante");
    assert_eq!(merged["organizations"][0]["organizationId"], id(&org).as_str());
    // The merged contact's e-mail is no longer a duplicate candidate of its own.
    let (status, dups) = w
        .admin(
            Method::POST,
            "/api/v1/contacts:findDuplicates",
            &lyon,
            Some(json!({ "contact": { "entityId": lyon, "familyName": "X", "emails": [{ "address": "c.durand@gmail.com" }] } })),
        )
        .await;
    assert_eq!(status, 200, "{dups}");
    let candidates: Vec<&str> =
        dups["candidates"].as_array().unwrap().iter().map(|c| c["recordId"].as_str().unwrap()).collect();
    assert_eq!(candidates, vec![t.as_str()]);

    let merge_id = done["merge"]["id"].as_str().unwrap().to_owned();
    let (status, undone) = w
        .admin(
            Method::POST,
            &format!("/api/v1/merges/{merge_id}:undo"),
            &lyon,
            Some(json!({ "requestId": Uuid::new_v4().to_string(), "etag": done["merge"]["etag"] })),
        )
        .await;
    assert_eq!(status, 200, "{undone}");
    let (_, back) = w.admin(Method::GET, &format!("/api/v1/contacts/{s}"), &lyon, None).await;
    assert_eq!(back["contact"]["state"], "CONTACT_STATE_ACTIVE");
    assert_eq!(back["contact"]["organizations"][0]["organizationId"], id(&org).as_str());
    let (_, target_now) = w.admin(Method::GET, &format!("/api/v1/contacts/{t}"), &lyon, None).await;
    assert_eq!(target_now["contact"]["emails"].as_array().unwrap().len(), 1);
    assert!(target_now["contact"].get("organizations").is_none_or(|o| o.as_array().is_some_and(Vec::is_empty)));
}
