//! Batch duplicate scans and the GDPR erasure of a contact, through the
//! edge on the secured platform, down to the audit trail.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use support::Branches;
use uuid::Uuid;

mod support;

/// The two branches.
type World = Branches;

impl Branches {
    async fn as_admin(&self, method: Method, path: &str, entity: &str, body: Option<Value>) -> (u16, Value) {
        self.p.call(Some(&self.p.admin_token), method, path, Some(entity), body).await.unwrap()
    }

    async fn create(&self, path: &str, field: &str, mut record: Value) -> String {
        record["entityId"] = json!(self.lyon);
        let body = json!({ "requestId": Uuid::new_v4().to_string(), field: record, "allowDuplicates": true });
        let (status, created) = self.as_admin(Method::POST, path, &self.lyon, Some(body)).await;
        assert_eq!(status, 200, "{created}");
        created[field]["id"].as_str().unwrap().to_owned()
    }
}

fn address(postal: &str) -> Value {
    json!([{ "kind": "ADDRESS_KIND_HEAD_OFFICE", "address": { "postalCode": postal, "city": "Lyon" } }])
}

fn pairs(list: &Value) -> Vec<Value> {
    list["duplicatePairs"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scan_finds_pairs_that_are_reviewed_dismissed_or_merged() {
    let w = Branches::start().await;
    let lyon = w.lyon.clone();
    let a = w
        .create(
            "/api/v1/organizations",
            "organization",
            json!({ "legalName": "Garage Central", "siret": "73282932000074" }),
        )
        .await;
    let b = w
        .create(
            "/api/v1/organizations",
            "organization",
            json!({ "legalName": "SARL Garage Central", "siret": "73282932000074" }),
        )
        .await;
    let c = w
        .create(
            "/api/v1/organizations",
            "organization",
            json!({ "legalName": "Boulangerie du Parc", "addresses": address("69006") }),
        )
        .await;
    let d = w
        .create(
            "/api/v1/organizations",
            "organization",
            json!({ "legalName": "Boulangerie du Parc SAS", "addresses": address("69006") }),
        )
        .await;
    w.create(
        "/api/v1/organizations",
        "organization",
        json!({ "legalName": "Transports Rhodaniens", "addresses": address("69006") }),
    )
    .await;
    let p1 = w
        .create(
            "/api/v1/contacts",
            "contact",
            json!({ "familyName": "Durand", "emails": [{ "address": "c.durand@exemple.fr" }] }),
        )
        .await;
    let p2 = w
        .create(
            "/api/v1/contacts",
            "contact",
            json!({ "familyName": "Dupont", "emails": [{ "address": "C.Durand@exemple.fr" }] }),
        )
        .await;

    // Staff may read pairs but not start scans.
    let scan = json!({ "requestId": Uuid::new_v4().to_string(), "duplicateScan": { "entityId": lyon } });
    let (status, _) =
        w.p.call(Some(&w.lyon_staff), Method::POST, "/api/v1/duplicate-scans", Some(&lyon), Some(scan.clone()))
            .await
            .unwrap();
    assert_eq!(status, 403);
    let (status, started) = w.as_admin(Method::POST, "/api/v1/duplicate-scans", &lyon, Some(scan.clone())).await;
    assert_eq!(status, 200, "{started}");
    let scan_id = started["duplicateScan"]["id"].as_str().unwrap().to_owned();
    let (_, again) = w.as_admin(Method::POST, "/api/v1/duplicate-scans", &lyon, Some(scan)).await;
    assert_eq!(again["duplicateScan"]["id"], scan_id.as_str(), "a retry returns the first scan");
    let done = wait_for_scan(&w, &scan_id).await;
    assert_eq!(done["scannedRecordCount"], "7", "{done}");
    assert_eq!(done["pairCount"], "3", "{done}");

    let (status, list) =
        w.p.call(Some(&w.lyon_staff), Method::GET, "/api/v1/duplicate-pairs", Some(&lyon), None).await.unwrap();
    assert_eq!(status, 200, "{list}");
    let found = pairs(&list);
    assert_eq!(found.len(), 3, "{list}");
    let ids = |p: &Value| {
        let mut v =
            vec![p["firstRecordId"].as_str().unwrap().to_owned(), p["secondRecordId"].as_str().unwrap().to_owned()];
        v.sort();
        v
    };
    let sorted = |x: &str, y: &str| {
        let mut v = vec![x.to_owned(), y.to_owned()];
        v.sort();
        v
    };
    let siret_pair = found.iter().find(|p| ids(p) == sorted(&a, &b)).expect("the SIRET pair");
    assert_eq!(siret_pair["firstRecordId"], a.as_str(), "the older record first");
    assert!(siret_pair["reasons"].as_array().unwrap().contains(&json!("DUPLICATE_REASON_SAME_SIRET")));
    assert_eq!(siret_pair["firstDisplayName"], "Garage Central");
    let name_pair = found.iter().find(|p| ids(p) == sorted(&c, &d)).expect("the similar names pair");
    assert_eq!(name_pair["reasons"], json!(["DUPLICATE_REASON_FUZZY_NAME_POSTAL_CODE"]));
    let people = found.iter().find(|p| ids(p) == sorted(&p1, &p2)).expect("the e-mail pair");
    assert_eq!(people["recordKind"], "RECORD_KIND_CONTACT");
    // Highest score first.
    assert_eq!(found[0]["id"], siret_pair["id"]);

    // Lille sees nothing of it.
    let (status, theirs) =
        w.p.call(Some(&w.lille_staff), Method::GET, "/api/v1/duplicate-pairs", Some(&w.lille), None).await.unwrap();
    assert_eq!(status, 200);
    assert!(pairs(&theirs).is_empty(), "{theirs}");
    let (status, _) = w
        .p
        .call(Some(&w.lille_staff), Method::GET, &format!("/api/v1/duplicate-scans/{scan_id}"), Some(&w.lille), None)
        .await
        .unwrap();
    assert_eq!(status, 404);

    // Dismissed: not proposed again, even by a new scan.
    let name_pair_id = name_pair["id"].as_str().unwrap().to_owned();
    let (status, dismissed) = w
        .as_admin(
            Method::POST,
            &format!("/api/v1/duplicate-pairs/{name_pair_id}:dismiss"),
            &lyon,
            Some(json!({ "reason": "Deux établissements distincts" })),
        )
        .await;
    assert_eq!(status, 200, "{dismissed}");
    assert_eq!(dismissed["duplicatePair"]["state"], "DUPLICATE_PAIR_STATE_DISMISSED");
    let (_, rescan) = w
        .as_admin(
            Method::POST,
            "/api/v1/duplicate-scans",
            &lyon,
            Some(json!({ "requestId": Uuid::new_v4().to_string(), "duplicateScan": { "entityId": lyon } })),
        )
        .await;
    let rescan_done = wait_for_scan(&w, rescan["duplicateScan"]["id"].as_str().unwrap()).await;
    assert_eq!(rescan_done["pairCount"], "2", "{rescan_done}");
    let (_, open) = w.as_admin(Method::GET, "/api/v1/duplicate-pairs", &lyon, None).await;
    assert!(pairs(&open).iter().all(|p| p["id"] != name_pair_id.as_str()), "{open}");

    // Merged: the pair is resolved by the merge.
    let (_, preview) = w
        .as_admin(
            Method::POST,
            &format!("/api/v1/organizations/{a}:previewMerge"),
            &lyon,
            Some(json!({ "sourceOrganizationIds": [b] })),
        )
        .await;
    let (status, merged) = w
        .as_admin(
            Method::POST,
            &format!("/api/v1/organizations/{a}:merge"),
            &lyon,
            Some(json!({ "requestId": Uuid::new_v4().to_string(), "sourceOrganizationIds": [b], "etags": preview["etags"] })),
        )
        .await;
    assert_eq!(status, 200, "{merged}");
    let (_, resolved) =
        w.as_admin(Method::GET, "/api/v1/duplicate-pairs?states=DUPLICATE_PAIR_STATE_MERGED", &lyon, None).await;
    let resolved = pairs(&resolved);
    assert_eq!(resolved.len(), 1, "{resolved:?}");
    assert_eq!(resolved[0]["mergeId"], merged["merge"]["id"]);
}

async fn wait_for_scan(w: &World, id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, scan) = w.as_admin(Method::GET, &format!("/api/v1/duplicate-scans/{id}"), &w.lyon, None).await;
        assert_eq!(status, 200, "{scan}");
        let scan = scan["duplicateScan"].clone();
        if scan["state"] == "DUPLICATE_SCAN_STATE_SUCCEEDED" {
            return scan;
        }
        assert_ne!(scan["state"], "DUPLICATE_SCAN_STATE_FAILED", "{scan}");
        assert!(tokio::time::Instant::now() < deadline, "scan not finished: {scan}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn events_of(w: &World, resource: &str) -> Vec<Value> {
    let (status, body) =
        w.p.call(
            Some(&w.p.admin_token),
            Method::GET,
            &format!("/api/v1/audit/events?entityId={}&pageSize=500", w.lyon),
            None,
            None,
        )
        .await
        .unwrap();
    assert!(status == 200 || status == 503, "{body}");
    body["events"].as_array().into_iter().flatten().filter(|e| e["resourceId"] == resource).cloned().collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn erasing_a_contact_clears_it_everywhere_and_shreds_its_audit_values() {
    let w = Branches::start().await;
    let lyon = w.lyon.clone();
    let org = w.create("/api/v1/organizations", "organization", json!({ "legalName": "Atelier Numérique" })).await;
    let person = w
        .create(
            "/api/v1/contacts",
            "contact",
            json!({ "civility": "CIVILITY_MADAME", "givenName": "Camille", "familyName": "Durand", "jobTitle": "Gérante",
                    "emails": [{ "address": "camille.durand@exemple.fr" }], "phones": [{ "number": "06 12 34 56 78" }] }),
        )
        .await;
    let colleague =
        w.create("/api/v1/contacts", "contact", json!({ "givenName": "Paul", "familyName": "Martin" })).await;
    let (status, link) = w
        .as_admin(
            Method::POST,
            "/api/v1/affiliations",
            &lyon,
            Some(json!({ "requestId": Uuid::new_v4().to_string(),
                         "affiliation": { "entityId": lyon, "contactId": person, "organizationId": org,
                                          "jobTitle": "Gérante", "roles": ["AFFILIATION_ROLE_LEGAL_REPRESENTATIVE"] } })),
        )
        .await;
    assert_eq!(status, 200, "{link}");
    let interaction = |contacts: Vec<&str>, subject: &str| {
        json!({ "requestId": Uuid::new_v4().to_string(),
                "interaction": { "entityId": lyon, "kind": "INTERACTION_KIND_CALL", "subject": subject,
                                 "occurTime": "2026-11-02T10:00:00Z", "contactIds": contacts } })
    };
    let (status, alone) = w
        .as_admin(Method::POST, "/api/v1/interactions", &lyon, Some(interaction(vec![&person], "Appel de Camille")))
        .await;
    assert_eq!(status, 200, "{alone}");
    let (status, shared) = w
        .as_admin(Method::POST, "/api/v1/interactions", &lyon, Some(interaction(vec![&person, &colleague], "Réunion")))
        .await;
    assert_eq!(status, 200, "{shared}");
    // The creation is in the trail with readable personal values.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while events_of(&w, &person).await.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no audit event for the contact");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let created = events_of(&w, &person).await.into_iter().find(|e| e["action"] == "crm.contacts.create").unwrap();
    let family =
        created["changes"].as_array().unwrap().iter().find(|c| c["fieldPath"] == "family_name").unwrap().clone();
    assert_eq!(family["after"], "Durand", "{created}");

    // The right of access: everything about the person, and the access recorded.
    let (status, _) =
        w.p.call(
            Some(&w.lyon_staff),
            Method::POST,
            &format!("/api/v1/contacts/{person}:exportData"),
            Some(&lyon),
            Some(json!({})),
        )
        .await
        .unwrap();
    assert_eq!(status, 403, "staff may not export a person's data");
    let (status, export) = w
        .as_admin(
            Method::POST,
            &format!("/api/v1/contacts/{person}:exportData"),
            &lyon,
            Some(json!({ "requestReference": "Courrier du 2 novembre" })),
        )
        .await;
    assert_eq!(status, 200, "{export}");
    assert_eq!(export["contact"]["familyName"], "Durand");
    assert_eq!(export["affiliations"].as_array().unwrap().len(), 1);
    assert_eq!(export["affiliations"][0]["organizationId"], org.as_str());
    assert_eq!(export["interactions"].as_array().unwrap().len(), 2);
    assert!(export["exportTime"].is_string());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let events = events_of(&w, &person).await;
        if let Some(access) = events.iter().find(|e| e["action"] == "crm.contacts.export_personal_data") {
            assert_eq!(access["details"]["request_reference"], "Courrier du 2 novembre", "{access}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no access event");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Staff may not erase; a reason is required.
    let path = format!("/api/v1/contacts/{person}:erase");
    let body = json!({ "requestId": Uuid::new_v4().to_string(), "reason": "Demande RGPD n° 2026-117" });
    let (status, _) =
        w.p.call(Some(&w.lyon_staff), Method::POST, &path, Some(&lyon), Some(body.clone())).await.unwrap();
    assert_eq!(status, 403);
    let (status, problem) =
        w.as_admin(Method::POST, &path, &lyon, Some(json!({ "requestId": Uuid::new_v4().to_string() }))).await;
    assert_eq!(status, 400, "{problem}");
    assert_eq!(problem["violations"][0]["field"], "reason");

    let (status, erased) = w.as_admin(Method::POST, &path, &lyon, Some(body.clone())).await;
    assert_eq!(status, 200, "{erased}");
    assert_eq!(erased["affiliationCount"], 1);
    assert_eq!(erased["interactionCount"], 2);
    assert_eq!(erased["deletedInteractionCount"], 1);
    let contact = &erased["contact"];
    assert_eq!(contact["state"], "CONTACT_STATE_ERASED");
    assert!(contact["eraseTime"].is_string());
    for field in ["givenName", "familyName", "jobTitle", "emails", "phones", "displayName"] {
        assert!(contact.get(field).is_none_or(|v| v == "" || v == &json!([])), "{field} left: {contact}");
    }
    // A retry answers the same; a second erasure is refused.
    let (status, _) = w.as_admin(Method::POST, &path, &lyon, Some(body)).await;
    assert_eq!(status, 200);
    let (status, problem) = w
        .as_admin(Method::POST, &path, &lyon, Some(json!({ "requestId": Uuid::new_v4().to_string(), "reason": "x" })))
        .await;
    assert_eq!(status, 400, "{problem}");
    assert_eq!(problem["code"], "FAILED_PRECONDITION");

    // The links: the affiliation anonymised, the lone interaction deleted,
    // the shared one kept without the person.
    let (_, links) = w.as_admin(Method::GET, &format!("/api/v1/affiliations?organizationId={org}"), &lyon, None).await;
    let link = &links["affiliations"][0];
    assert!(link.get("jobTitle").is_none_or(|t| t == ""), "{links}");
    let (status, _) = w
        .as_admin(
            Method::GET,
            &format!("/api/v1/interactions/{}", alone["interaction"]["id"].as_str().unwrap()),
            &lyon,
            None,
        )
        .await;
    assert_eq!(status, 404);
    let (status, kept) = w
        .as_admin(
            Method::GET,
            &format!("/api/v1/interactions/{}", shared["interaction"]["id"].as_str().unwrap()),
            &lyon,
            None,
        )
        .await;
    assert_eq!(status, 200, "{kept}");
    assert_eq!(kept["interaction"]["contactIds"], json!([colleague]));
    // The e-mail is free again: no duplicate candidate.
    let (_, dups) = w
        .as_admin(
            Method::POST,
            "/api/v1/contacts:findDuplicates",
            &lyon,
            Some(json!({ "contact": { "entityId": lyon, "familyName": "X",
                                      "emails": [{ "address": "camille.durand@exemple.fr" }] } })),
        )
        .await;
    assert!(dups["candidates"].as_array().is_none_or(|c| c.is_empty()), "{dups}");

    // The trail: every personal value of the person reads back erased, the
    // erasure is recorded with its reason, and the chain still verifies.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let events = events_of(&w, &person).await;
        if let Some(erasure) = events.iter().find(|e| e["action"] == "crm.contacts.erase") {
            assert_eq!(erasure["details"]["reason"], "Demande RGPD n° 2026-117");
            let created = events.iter().find(|e| e["action"] == "crm.contacts.create").unwrap();
            let family =
                created["changes"].as_array().unwrap().iter().find(|c| c["fieldPath"] == "family_name").unwrap();
            assert_eq!(family["erased"], true, "{created}");
            assert!(family.get("after").is_none_or(Value::is_null), "{created}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no erasure event: {events:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, verdict) =
        w.as_admin(Method::POST, &format!("/api/v1/audit/chains/{lyon}:verify"), &lyon, Some(json!({}))).await;
    assert_eq!(status, 200, "{verdict}");
    assert_eq!(verdict["status"], "CHAIN_STATUS_OK", "{verdict}");
    // The colleague's values are untouched.
    let other = events_of(&w, &colleague).await;
    let created = other.iter().find(|e| e["action"] == "crm.contacts.create").unwrap();
    let family = created["changes"].as_array().unwrap().iter().find(|c| c["fieldPath"] == "family_name").unwrap();
    assert_eq!(family["after"], "Martin");
}
