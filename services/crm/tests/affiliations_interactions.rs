//! Affiliations and interactions through the edge (REST), on the secured
//! platform: real tokens, real access decisions from tenancy, real
//! PostgreSQL with row-level security, audit events through the outbox.

use reqwest::Method;
use serde_json::{Value, json};
use socle_testkit::secure::SecurePlatform;
use uuid::Uuid;

/// A platform with two branches under a region and one staff member in each.
struct World {
    p: SecurePlatform,
    lyon: String,
    lille: String,
    lyon_user: Uuid,
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
        World { p, lyon, lille, lyon_user, lyon_staff, lille_staff }
    }

    async fn call(&self, token: &str, method: Method, path: &str, entity: &str, body: Option<Value>) -> (u16, Value) {
        self.p.call(Some(token), method, path, Some(entity), body).await.unwrap()
    }

    /// The staff token of `entity`.
    fn staff(&self, entity: &str) -> &str {
        if entity == self.lyon { &self.lyon_staff } else { &self.lille_staff }
    }

    async fn create_org(&self, entity: &str, name: &str) -> String {
        let body = json!({ "requestId": Uuid::new_v4().to_string(), "allowDuplicates": true,
                           "organization": { "entityId": entity, "legalName": name } });
        let (status, created) =
            self.call(self.staff(entity), Method::POST, "/api/v1/organizations", entity, Some(body)).await;
        assert_eq!(status, 200, "{created}");
        created["organization"]["id"].as_str().unwrap().to_owned()
    }

    async fn create_contact(&self, entity: &str, given: &str, family: &str) -> String {
        let body = json!({ "requestId": Uuid::new_v4().to_string(), "allowDuplicates": true,
                           "contact": { "entityId": entity, "givenName": given, "familyName": family } });
        let (status, created) =
            self.call(self.staff(entity), Method::POST, "/api/v1/contacts", entity, Some(body)).await;
        assert_eq!(status, 200, "{created}");
        created["contact"]["id"].as_str().unwrap().to_owned()
    }

    /// POSTs an affiliation of `entity` as `token`.
    async fn affiliate(&self, token: &str, entity: &str, affiliation: Value) -> (u16, Value) {
        let mut affiliation = affiliation;
        affiliation["entityId"] = json!(entity);
        let body = json!({ "requestId": Uuid::new_v4().to_string(), "affiliation": affiliation });
        self.call(token, Method::POST, "/api/v1/affiliations", entity, Some(body)).await
    }

    /// POSTs an interaction of `entity` as `token`.
    async fn record(&self, token: &str, entity: &str, interaction: Value) -> (u16, Value) {
        let mut interaction = interaction;
        interaction["entityId"] = json!(entity);
        let body = json!({ "requestId": Uuid::new_v4().to_string(), "interaction": interaction });
        self.call(token, Method::POST, "/api/v1/interactions", entity, Some(body)).await
    }

    /// GETs `path` as Lyon's staff, expecting 200.
    async fn get(&self, path: &str) -> Value {
        let (status, body) = self.call(&self.lyon_staff, Method::GET, path, &self.lyon, None).await;
        assert_eq!(status, 200, "{path}: {body}");
        body
    }
}

fn violation_fields(problem: &Value) -> Vec<String> {
    problem["violations"]
        .as_array()
        .map(|v| v.iter().filter_map(|x| x["field"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

fn assert_violations(status: u16, problem: &Value, fields: &[&str]) {
    assert_eq!(status, 400, "{problem}");
    let found = violation_fields(problem);
    for field in fields {
        assert!(found.iter().any(|f| f == field), "no violation on {field}: {problem}");
    }
}

fn description_of<'a>(problem: &'a Value, field: &str) -> &'a str {
    problem["violations"]
        .as_array()
        .and_then(|v| v.iter().find(|x| x["field"] == field))
        .and_then(|x| x["description"].as_str())
        .unwrap_or_default()
}

fn ids(list: &Value, collection: &str) -> Vec<String> {
    list[collection].as_array().into_iter().flatten().map(|o| o["id"].as_str().unwrap().to_owned()).collect()
}

fn field_of(list: &Value, collection: &str, field: &str) -> Vec<String> {
    list[collection].as_array().into_iter().flatten().map(|o| o[field].as_str().unwrap_or("").to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn affiliations_are_validated_idempotent_versioned_and_isolated() {
    let w = World::new().await;
    let (lyon, lille) = (w.lyon.clone(), w.lille.clone());
    let boulangerie = w.create_org(&lyon, "Boulangerie Martin").await;
    let garage = w.create_org(&lyon, "Garage du Rhône").await;
    let camille = w.create_contact(&lyon, "Camille", "Durand").await;
    let bruno = w.create_contact(&lyon, "Bruno", "Aubert").await;
    let filature = w.create_org(&lille, "Filature du Nord").await;

    // Every invalid field is reported at once, as field violations.
    let (status, problem) = w
        .affiliate(
            &w.lyon_staff,
            &lyon,
            json!({ "contactId": "pas-un-uuid", "roles": ["AFFILIATION_ROLE_UNSPECIFIED"],
                    "jobTitle": "x".repeat(151), "startDate": "2025-13-01", "endDate": "hier" }),
        )
        .await;
    assert_violations(
        status,
        &problem,
        &[
            "affiliation.contactId",
            "affiliation.organizationId",
            "affiliation.roles[0]",
            "affiliation.jobTitle",
            "affiliation.startDate",
            "affiliation.endDate",
        ],
    );
    let (status, problem) = w
        .affiliate(
            &w.lyon_staff,
            &lyon,
            json!({ "contactId": camille, "organizationId": boulangerie, "startDate": "2025-06-01",
                    "endDate": "2025-01-31" }),
        )
        .await;
    assert_violations(status, &problem, &["affiliation.endDate"]);
    let (status, problem) = w
        .call(
            &w.lyon_staff,
            Method::POST,
            "/api/v1/affiliations",
            &lyon,
            Some(json!({ "requestId": "encore", "affiliation": { "entityId": lyon, "contactId": camille,
                         "organizationId": boulangerie } })),
        )
        .await;
    assert_violations(status, &problem, &["requestId"]);

    // A Lyon contact cannot be linked with a Lille organisation: Lyon's staff
    // does not see it, and even the national administrator, who sees both,
    // is refused because the entities differ.
    let (status, problem) =
        w.affiliate(&w.lyon_staff, &lyon, json!({ "contactId": camille, "organizationId": filature })).await;
    assert_violations(status, &problem, &["affiliation.organizationId"]);
    assert!(description_of(&problem, "affiliation.organizationId").contains("aucune organisation"), "{problem}");
    let (status, problem) =
        w.affiliate(&w.p.admin_token, &lyon, json!({ "contactId": camille, "organizationId": filature })).await;
    assert_violations(status, &problem, &["affiliation.organizationId"]);
    assert!(description_of(&problem, "affiliation.organizationId").contains("entité"), "{problem}");
    let (status, problem) =
        w.affiliate(&w.p.admin_token, &lille, json!({ "contactId": camille, "organizationId": filature })).await;
    assert_violations(status, &problem, &["affiliation.contactId"]);
    let (status, _) =
        w.affiliate(&w.lille_staff, &lyon, json!({ "contactId": camille, "organizationId": boulangerie })).await;
    assert_eq!(status, 403, "Lille's staff cannot write in Lyon");

    // A valid link: roles deduplicated, job title normalised, names joined.
    let request_id = Uuid::new_v4().to_string();
    let body = json!({ "requestId": request_id, "affiliation": {
        "entityId": lyon, "contactId": camille, "organizationId": boulangerie,
        "roles": ["AFFILIATION_ROLE_LEGAL_REPRESENTATIVE", "AFFILIATION_ROLE_PRIMARY_CONTACT",
                  "AFFILIATION_ROLE_LEGAL_REPRESENTATIVE"],
        "jobTitle": "  Gérante   associée ", "startDate": "2020-01-15" } });
    let (status, created) =
        w.call(&w.lyon_staff, Method::POST, "/api/v1/affiliations", &lyon, Some(body.clone())).await;
    assert_eq!(status, 200, "{created}");
    let link = &created["affiliation"];
    assert_eq!(link["roles"], json!(["AFFILIATION_ROLE_LEGAL_REPRESENTATIVE", "AFFILIATION_ROLE_PRIMARY_CONTACT"]));
    assert_eq!(link["jobTitle"], "Gérante associée");
    assert_eq!(link["startDate"], "2020-01-15");
    assert_eq!(link["current"], true);
    assert_eq!(link["contactDisplayName"], "Camille Durand");
    assert_eq!(link["organizationLegalName"], "Boulangerie Martin");
    let id = link["id"].as_str().unwrap().to_owned();
    let etag = link["etag"].as_str().unwrap().to_owned();

    // A retry with the same request id returns the first link.
    let (status, again) = w.call(&w.lyon_staff, Method::POST, "/api/v1/affiliations", &lyon, Some(body)).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["affiliation"]["id"], id.as_str());
    // A second current link between the same people is refused…
    let (status, conflict) = w
        .affiliate(
            &w.lyon_staff,
            &lyon,
            json!({ "contactId": camille, "organizationId": boulangerie, "endDate": "2099-12-31" }),
        )
        .await;
    assert_eq!(status, 409, "{conflict}");
    // …but a past one is history.
    let (status, past) = w
        .affiliate(
            &w.lyon_staff,
            &lyon,
            json!({ "contactId": camille, "organizationId": boulangerie, "startDate": "2010-09-01",
                    "endDate": "2015-08-31", "jobTitle": "Apprentie" }),
        )
        .await;
    assert_eq!(status, 200, "{past}");
    assert!(!past["affiliation"]["current"].as_bool().unwrap_or(false), "ended links are not current");
    let past_id = past["affiliation"]["id"].as_str().unwrap().to_owned();
    for (contact, org) in [(&camille, &garage), (&bruno, &boulangerie)] {
        let (status, body) =
            w.affiliate(&w.lyon_staff, &lyon, json!({ "contactId": contact, "organizationId": org })).await;
        assert_eq!(status, 200, "{body}");
    }

    // The organisation counts its current contacts; the contact lists its
    // current organisations.
    let org = w.get(&format!("/api/v1/organizations/{boulangerie}")).await;
    assert_eq!(org["organization"]["contactCount"], 2, "{org}");
    let contact = w.get(&format!("/api/v1/contacts/{camille}")).await;
    let mut names = field_of(&contact["contact"], "organizations", "legalName");
    names.sort();
    assert_eq!(names, vec!["Boulangerie Martin", "Garage du Rhône"], "{contact}");
    let links = contact["contact"]["organizations"].as_array().unwrap();
    assert!(links.iter().any(|l| l["affiliationId"] == id.as_str() && l["jobTitle"] == "Gérante associée"));

    // Lists: an organisation's contacts by name, a contact's organisations,
    // ended links on demand, roles.
    let list = w.get(&format!("/api/v1/affiliations?organizationId={boulangerie}")).await;
    assert_eq!(field_of(&list, "affiliations", "contactDisplayName"), vec!["Bruno Aubert", "Camille Durand"]);
    let list = w.get(&format!("/api/v1/affiliations?organizationId={boulangerie}&includeEnded=true")).await;
    assert_eq!(ids(&list, "affiliations").len(), 3);
    let list = w
        .get(&format!("/api/v1/affiliations?organizationId={boulangerie}&includeEnded=true&orderBy=start_date%20desc"))
        .await;
    assert_eq!(field_of(&list, "affiliations", "startDate"), vec!["2020-01-15", "2010-09-01", ""]);
    let list = w.get(&format!("/api/v1/affiliations?contactId={camille}&orderBy=organization_legal_name")).await;
    assert_eq!(field_of(&list, "affiliations", "organizationLegalName"), vec!["Boulangerie Martin", "Garage du Rhône"]);
    let list =
        w.get("/api/v1/affiliations?roles=AFFILIATION_ROLE_PRIMARY_CONTACT&roles=AFFILIATION_ROLE_HR_CONTACT").await;
    assert_eq!(ids(&list, "affiliations"), vec![id.clone()]);
    let (status, problem) = w.call(&w.lyon_staff, Method::GET, "/api/v1/affiliations?orderBy=id", &lyon, None).await;
    assert_violations(status, &problem, &["orderBy"]);

    // Keyset pages of one: every link once, in order; tokens bound to filters.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = w.get(&format!("/api/v1/affiliations?includeEnded=true&pageSize=1&pageToken={token}")).await;
        seen.extend(field_of(&page, "affiliations", "contactDisplayName"));
        token = page["nextPageToken"].as_str().unwrap_or("").to_owned();
        if token.is_empty() {
            break;
        }
        let (status, problem) = w
            .call(
                &w.lyon_staff,
                Method::GET,
                &format!("/api/v1/affiliations?pageSize=1&pageToken={token}"),
                &lyon,
                None,
            )
            .await;
        assert_violations(status, &problem, &["pageToken"]);
    }
    assert_eq!(seen, vec!["Bruno Aubert", "Camille Durand", "Camille Durand", "Camille Durand"]);

    // Updates: ending a link, stale etags refused, the mask checked.
    let path = format!("/api/v1/affiliations/{id}");
    let end =
        |etag: &str, date: &str| json!({ "affiliation": { "endDate": date }, "updateMask": "endDate", "etag": etag });
    let (status, ended) = w.call(&w.lyon_staff, Method::PATCH, &path, &lyon, Some(end(&etag, "2023-06-30"))).await;
    assert_eq!(status, 200, "{ended}");
    assert!(!ended["affiliation"]["current"].as_bool().unwrap_or(false), "ended links are not current");
    assert_eq!(ended["affiliation"]["jobTitle"], "Gérante associée", "fields outside the mask are kept");
    let (status, stale) = w.call(&w.lyon_staff, Method::PATCH, &path, &lyon, Some(end(&etag, "2024-01-31"))).await;
    assert_eq!(status, 412, "{stale}");
    let org = w.get(&format!("/api/v1/organizations/{boulangerie}")).await;
    assert_eq!(org["organization"]["contactCount"], 1, "an ended link no longer counts");
    let etag = ended["affiliation"]["etag"].as_str().unwrap().to_owned();
    let (status, problem) = w
        .call(
            &w.lyon_staff,
            Method::PATCH,
            &path,
            &lyon,
            Some(json!({ "affiliation": { "contactId": bruno }, "updateMask": "contactId", "etag": etag })),
        )
        .await;
    assert_violations(status, &problem, &["updateMask"]);
    let (status, problem) = w.call(&w.lyon_staff, Method::PATCH, &path, &lyon, Some(end(&etag, "2019-12-31"))).await;
    assert_violations(status, &problem, &["affiliation.endDate"]);
    // A new current link; re-opening an ended one beside it is refused.
    let (status, body) =
        w.affiliate(&w.lyon_staff, &lyon, json!({ "contactId": camille, "organizationId": boulangerie })).await;
    assert_eq!(status, 200, "{body}");
    let (status, conflict) = w.call(&w.lyon_staff, Method::PATCH, &path, &lyon, Some(end(&etag, ""))).await;
    assert_eq!(status, 409, "{conflict}");

    // Isolation: Lille sees nothing of Lyon's links.
    let (status, _) = w.call(&w.lille_staff, Method::GET, &path, &lille, None).await;
    assert_eq!(status, 404);
    let (status, _) = w.call(&w.lille_staff, Method::GET, "/api/v1/affiliations", &lyon, None).await;
    assert_eq!(status, 403);
    let (status, _) = w.call(&w.lille_staff, Method::PATCH, &path, &lille, Some(end(&etag, "2024-01-31"))).await;
    assert_eq!(status, 404);
    let (status, list) =
        w.call(&w.lille_staff, Method::GET, "/api/v1/affiliations?includeEnded=true", &lille, None).await;
    assert_eq!(status, 200, "{list}");
    assert!(ids(&list, "affiliations").is_empty(), "{list}");

    // Deleting needs crm.affiliations.delete, which staff lacks.
    let past_path = format!("/api/v1/affiliations/{past_id}");
    let (status, _) = w.call(&w.lyon_staff, Method::DELETE, &past_path, &lyon, None).await;
    assert_eq!(status, 403);
    let (status, stale) =
        w.call(&w.p.admin_token, Method::DELETE, &format!("{past_path}?etag=%22999%22"), &lyon, None).await;
    assert_eq!(status, 412, "{stale}");
    let (status, body) = w.call(&w.p.admin_token, Method::DELETE, &past_path, &lyon, None).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = w.call(&w.lyon_staff, Method::GET, &past_path, &lyon, None).await;
    assert_eq!(status, 404);

    // The changes reach Lyon's audit trail, the contact's name sealed.
    let event =
        w.p.wait_for_event(&lyon, |e| e["action"] == "crm.affiliations.create" && e["resourceId"] == id.as_str()).await;
    let name = event["changes"].as_array().unwrap().iter().find(|c| c["fieldPath"] == "contact_display_name").cloned();
    let name = name.expect("contact_display_name change");
    assert_eq!(name["personalData"], true, "{event}");
    assert_eq!(name["subjectId"], camille.as_str());
    let event =
        w.p.wait_for_event(&lyon, |e| e["action"] == "crm.affiliations.update" && e["resourceId"] == id.as_str()).await;
    assert!(event["changes"].as_array().unwrap().iter().any(|c| c["fieldPath"] == "end_date"), "{event}");
    w.p.wait_for_event(&lyon, |e| e["action"] == "crm.affiliations.delete" && e["resourceId"] == past_id.as_str())
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn interactions_are_validated_and_form_timelines_newest_first() {
    let w = World::new().await;
    let (lyon, lille) = (w.lyon.clone(), w.lille.clone());
    let boulangerie = w.create_org(&lyon, "Boulangerie Martin").await;
    let garage = w.create_org(&lyon, "Garage du Rhône").await;
    let camille = w.create_contact(&lyon, "Camille", "Durand").await;
    let bruno = w.create_contact(&lyon, "Bruno", "Aubert").await;
    let chloe = w.create_contact(&lyon, "Chloé", "Petit").await;
    let filature = w.create_org(&lille, "Filature du Nord").await;
    let louise = w.create_contact(&lille, "Louise", "Lefebvre").await;
    // Camille works at the bakery; Bruno used to.
    for (contact, end) in [(&camille, ""), (&bruno, "2020-12-31")] {
        let (status, body) = w
            .affiliate(
                &w.lyon_staff,
                &lyon,
                json!({ "contactId": contact, "organizationId": boulangerie, "endDate": end }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }

    // Every invalid field is reported at once, as field violations.
    let (status, problem) = w.record(&w.lyon_staff, &lyon, json!({ "subject": "  " })).await;
    assert_violations(
        status,
        &problem,
        &["interaction.kind", "interaction.subject", "interaction.occurTime", "interaction.organizationId"],
    );
    let (status, problem) = w
        .record(
            &w.lyon_staff,
            &lyon,
            json!({ "kind": "INTERACTION_KIND_NOTE", "subject": "x".repeat(201), "occurTime": "2025-03-01T09:00:00Z",
                    "direction": "INTERACTION_DIRECTION_INBOUND", "duration": "600s", "eventName": "AG 2025",
                    "location": "Lyon", "contactIds": ["pas-un-uuid", camille, camille],
                    "participantUserIds": ["personne"],
                    "tags": ["pas valide !"], "body": "y".repeat(20_001) }),
        )
        .await;
    assert_violations(
        status,
        &problem,
        &[
            "interaction.subject",
            "interaction.body",
            "interaction.direction",
            "interaction.duration",
            "interaction.eventName",
            "interaction.location",
            "interaction.contactIds[0]",
            "interaction.contactIds[2]",
            "interaction.participantUserIds[0]",
            "interaction.tags[0]",
        ],
    );
    let (status, problem) = w
        .record(
            &w.lyon_staff,
            &lyon,
            json!({ "kind": "INTERACTION_KIND_CALL", "subject": "Appel", "occurTime": "2025-03-01T09:00:00Z",
                    "duration": "-60s", "organizationId": boulangerie }),
        )
        .await;
    assert_violations(status, &problem, &["interaction.duration"]);
    // Records of another branch: invisible to Lyon's staff, of another
    // entity for the national administrator.
    let note = |org: &str, contact: &str| {
        json!({ "kind": "INTERACTION_KIND_NOTE", "subject": "Note", "occurTime": "2025-03-01T09:00:00Z",
                "organizationId": org, "contactIds": [contact] })
    };
    let (status, problem) = w.record(&w.lyon_staff, &lyon, note(&filature, &louise)).await;
    assert_violations(status, &problem, &["interaction.organizationId", "interaction.contactIds[0]"]);
    let (status, problem) = w.record(&w.p.admin_token, &lyon, note(&boulangerie, &louise)).await;
    assert_violations(status, &problem, &["interaction.contactIds[0]"]);
    assert!(description_of(&problem, "interaction.contactIds[0]").contains("entité"), "{problem}");
    let (status, _) = w.record(&w.lille_staff, &lyon, note(&boulangerie, &camille)).await;
    assert_eq!(status, 403);

    // A call: the author is the caller whatever the client says, names joined.
    let request_id = Uuid::new_v4().to_string();
    let participant = Uuid::new_v4().to_string();
    let body = json!({ "requestId": request_id, "interaction": {
        "entityId": lyon, "kind": "INTERACTION_KIND_CALL", "subject": "  Relance   cotisation 2025 ",
        "body": "Appel à Camille pour la relance de la cotisation.", "occurTime": "2025-03-01T09:00:00Z",
        "duration": "900s", "direction": "INTERACTION_DIRECTION_OUTBOUND", "organizationId": boulangerie,
        "contactIds": [camille], "participantUserIds": [participant], "tags": ["Cotisation"],
        "author": { "kind": "ACTOR_KIND_USER", "id": Uuid::new_v4().to_string() } } });
    let (status, created) =
        w.call(&w.lyon_staff, Method::POST, "/api/v1/interactions", &lyon, Some(body.clone())).await;
    assert_eq!(status, 200, "{created}");
    let call = &created["interaction"];
    assert_eq!(call["subject"], "Relance cotisation 2025");
    assert_eq!(call["duration"], "900s");
    assert_eq!(call["direction"], "INTERACTION_DIRECTION_OUTBOUND");
    assert_eq!(call["contactIds"], json!([camille]));
    assert_eq!(call["participantUserIds"], json!([participant]));
    assert_eq!(call["tags"], json!(["cotisation"]));
    assert_eq!(call["organizationLegalName"], "Boulangerie Martin");
    assert_eq!(call["author"]["kind"], "ACTOR_KIND_USER", "{call}");
    assert_eq!(call["author"]["id"], w.lyon_user.to_string());
    let call_id = call["id"].as_str().unwrap().to_owned();
    let (status, again) = w.call(&w.lyon_staff, Method::POST, "/api/v1/interactions", &lyon, Some(body)).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["interaction"]["id"], call_id.as_str(), "same request id, same interaction");

    // More of the timeline.
    let record = |kind: &str, subject: &str, time: &str, org: &str, contacts: Value| {
        let mut interaction = json!({ "kind": kind, "subject": subject, "occurTime": time, "contactIds": contacts });
        if !org.is_empty() {
            interaction["organizationId"] = json!(org);
        }
        let w = &w;
        async move {
            let (status, body) = w.record(&w.lyon_staff, &w.lyon, interaction).await;
            assert_eq!(status, 200, "{body}");
            body["interaction"]["id"].as_str().unwrap().to_owned()
        }
    };
    let email = record(
        "INTERACTION_KIND_EMAIL",
        "Envoi de l'appel à cotisation",
        "2025-02-01T08:00:00Z",
        &boulangerie,
        json!([]),
    )
    .await;
    let camille_note = record(
        "INTERACTION_KIND_NOTE",
        "Souhaite rejoindre la commission",
        "2025-03-05T10:00:00Z",
        "",
        json!([camille]),
    )
    .await;
    let bruno_meeting =
        record("INTERACTION_KIND_MEETING", "Déjeuner", "2025-03-10T12:00:00Z", "", json!([bruno])).await;
    let chloe_event =
        record("INTERACTION_KIND_EVENT_ATTENDANCE", "Assemblée générale", "2025-03-20T14:00:00Z", "", json!([chloe]))
            .await;
    let garage_note =
        record("INTERACTION_KIND_NOTE", "Rachat du garage", "2025-03-15T16:00:00Z", &garage, json!([camille])).await;
    let all = [&chloe_event, &garage_note, &bruno_meeting, &camille_note, &call_id, &email];

    // The organisation's timeline, newest first; with its current contacts'
    // interactions that name no organisation (not its former contacts', not
    // those naming another organisation).
    let list = w.get(&format!("/api/v1/interactions?organizationId={boulangerie}")).await;
    assert_eq!(ids(&list, "interactions"), vec![call_id.clone(), email.clone()]);
    let list =
        w.get(&format!("/api/v1/interactions?organizationId={boulangerie}&includeContactInteractions=true")).await;
    assert_eq!(ids(&list, "interactions"), vec![camille_note.clone(), call_id.clone(), email.clone()]);
    let (status, problem) =
        w.call(&w.lyon_staff, Method::GET, "/api/v1/interactions?includeContactInteractions=true", &lyon, None).await;
    assert_violations(status, &problem, &["includeContactInteractions"]);
    // The contact's timeline.
    let list = w.get(&format!("/api/v1/interactions?contactId={camille}")).await;
    assert_eq!(ids(&list, "interactions"), vec![garage_note.clone(), camille_note.clone(), call_id.clone()]);
    let list = w.get(&format!("/api/v1/interactions?contactId={camille}&orderBy=occur_time")).await;
    assert_eq!(ids(&list, "interactions"), vec![call_id.clone(), camille_note.clone(), garage_note.clone()]);

    // Filters: kinds, period, author, tags, accent-insensitive full text.
    let list = w.get("/api/v1/interactions?kinds=INTERACTION_KIND_NOTE&kinds=INTERACTION_KIND_MEETING").await;
    assert_eq!(ids(&list, "interactions"), vec![garage_note.clone(), bruno_meeting.clone(), camille_note.clone()]);
    let list = w.get("/api/v1/interactions?startTime=2025-03-01T09:00:00Z&endTime=2025-03-10T12:00:00Z").await;
    assert_eq!(ids(&list, "interactions"), vec![camille_note.clone(), call_id.clone()]);
    let list = w.get(&format!("/api/v1/interactions?authorId={}", w.lyon_user)).await;
    assert_eq!(ids(&list, "interactions").len(), 6);
    let list = w.get(&format!("/api/v1/interactions?authorId={}", Uuid::new_v4())).await;
    assert!(ids(&list, "interactions").is_empty(), "{list}");
    let list = w.get("/api/v1/interactions?tags=COTISATION").await;
    assert_eq!(ids(&list, "interactions"), vec![call_id.clone()]);
    let list = w.get("/api/v1/interactions?query=COTISATION").await;
    assert_eq!(ids(&list, "interactions"), vec![call_id.clone(), email.clone()]);
    let list = w.get("/api/v1/interactions?query=assemblee%20gener").await;
    assert_eq!(ids(&list, "interactions"), vec![chloe_event.clone()]);
    let list = w.get("/api/v1/interactions?query=camille").await;
    assert_eq!(ids(&list, "interactions"), vec![call_id.clone()], "the body is searched too");
    let (status, problem) = w
        .call(
            &w.lyon_staff,
            Method::GET,
            "/api/v1/interactions?startTime=2025-03-10T00:00:00Z&endTime=2025-03-01T00:00:00Z&orderBy=subject",
            &lyon,
            None,
        )
        .await;
    assert_violations(status, &problem, &["orderBy"]);
    let (status, problem) = w
        .call(
            &w.lyon_staff,
            Method::GET,
            "/api/v1/interactions?startTime=2025-03-10T00:00:00Z&endTime=2025-03-01T00:00:00Z",
            &lyon,
            None,
        )
        .await;
    assert_violations(status, &problem, &["endTime"]);

    // Keyset pages of two: every interaction once, newest first; tokens
    // bound to their filters.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = w.get(&format!("/api/v1/interactions?pageSize=2&pageToken={token}")).await;
        let page_ids = ids(&page, "interactions");
        assert!(page_ids.len() <= 2);
        seen.extend(page_ids);
        token = page["nextPageToken"].as_str().unwrap_or("").to_owned();
        if token.is_empty() {
            break;
        }
        let (status, problem) = w
            .call(
                &w.lyon_staff,
                Method::GET,
                &format!("/api/v1/interactions?pageSize=2&kinds=INTERACTION_KIND_NOTE&pageToken={token}"),
                &lyon,
                None,
            )
            .await;
        assert_violations(status, &problem, &["pageToken"]);
    }
    assert_eq!(seen, all.iter().map(|s| s.to_string()).collect::<Vec<_>>());

    // Updates: contacts replaced in order, stale etags refused, the result
    // validated as a whole.
    let path = format!("/api/v1/interactions/{call_id}");
    let etag = call["etag"].as_str().unwrap().to_owned();
    let (status, updated) = w
        .call(
            &w.lyon_staff,
            Method::PATCH,
            &path,
            &lyon,
            Some(json!({ "interaction": { "subject": "Relance cotisation 2025 (2)", "contactIds": [chloe, camille] },
                         "updateMask": "subject,contactIds", "etag": etag })),
        )
        .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["interaction"]["contactIds"], json!([chloe, camille]));
    assert_eq!(updated["interaction"]["duration"], "900s", "fields outside the mask are kept");
    assert_eq!(updated["interaction"]["author"]["id"], w.lyon_user.to_string());
    let list = w.get(&format!("/api/v1/interactions?contactId={chloe}")).await;
    assert_eq!(ids(&list, "interactions"), vec![chloe_event.clone(), call_id.clone()]);
    let stale = json!({ "interaction": { "subject": "Écrasé" }, "updateMask": "subject", "etag": etag });
    let (status, body) = w.call(&w.lyon_staff, Method::PATCH, &path, &lyon, Some(stale)).await;
    assert_eq!(status, 412, "{body}");
    let etag = updated["interaction"]["etag"].as_str().unwrap().to_owned();
    let (status, problem) = w
        .call(
            &w.lyon_staff,
            Method::PATCH,
            &path,
            &lyon,
            Some(json!({ "interaction": { "kind": "INTERACTION_KIND_NOTE" }, "updateMask": "kind", "etag": etag })),
        )
        .await;
    assert_violations(status, &problem, &["interaction.direction", "interaction.duration"]);
    let (status, problem) = w
        .call(
            &w.lyon_staff,
            Method::PATCH,
            &path,
            &lyon,
            Some(json!({ "interaction": { "contactIds": [louise] }, "updateMask": "contactIds", "etag": etag })),
        )
        .await;
    assert_violations(status, &problem, &["interaction.contactIds[0]"]);
    let (status, problem) = w
        .call(
            &w.lyon_staff,
            Method::PATCH,
            &path,
            &lyon,
            Some(json!({ "interaction": { "author": { "id": "x" } }, "updateMask": "author", "etag": etag })),
        )
        .await;
    assert_violations(status, &problem, &["updateMask"]);

    // Isolation: Lille sees nothing of Lyon's interactions.
    let (status, _) = w.call(&w.lille_staff, Method::GET, &path, &lille, None).await;
    assert_eq!(status, 404);
    let (status, _) = w.call(&w.lille_staff, Method::GET, "/api/v1/interactions", &lyon, None).await;
    assert_eq!(status, 403);
    let (status, list) = w.call(&w.lille_staff, Method::GET, "/api/v1/interactions", &lille, None).await;
    assert_eq!(status, 200, "{list}");
    assert!(ids(&list, "interactions").is_empty(), "{list}");
    let (status, all_branches) =
        w.call(&w.p.admin_token, Method::GET, "/api/v1/interactions?includeDescendants=true", &w.p.root, None).await;
    assert_eq!(status, 200, "{all_branches}");
    assert_eq!(ids(&all_branches, "interactions").len(), 6);

    // Deleting needs crm.interactions.delete, which staff lacks.
    let (status, _) = w.call(&w.lyon_staff, Method::DELETE, &path, &lyon, None).await;
    assert_eq!(status, 403);
    let (status, body) = w.call(&w.p.admin_token, Method::DELETE, &path, &lyon, None).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = w.call(&w.lyon_staff, Method::GET, &path, &lyon, None).await;
    assert_eq!(status, 404);

    // The changes reach Lyon's audit trail.
    let event =
        w.p.wait_for_event(&lyon, |e| e["action"] == "crm.interactions.update" && e["resourceId"] == call_id.as_str())
            .await;
    let changes = event["changes"].as_array().unwrap();
    assert!(changes.iter().any(|c| c["fieldPath"] == "subject"), "{event}");
    assert!(changes.iter().any(|c| c["fieldPath"] == "contact_ids"), "{event}");
    w.p.wait_for_event(&lyon, |e| e["action"] == "crm.interactions.create" && e["resourceId"] == email.as_str()).await;
    w.p.wait_for_event(&lyon, |e| e["action"] == "crm.interactions.delete" && e["resourceId"] == call_id.as_str())
        .await;
}
