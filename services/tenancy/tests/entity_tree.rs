//! The entity tree through the edge's REST API, on a real PostgreSQL.

use serde_json::{Value, json};
use socle_config::SecretString;
use socle_testkit::{RunningEdge, RunningService, Service, spawn_edge, spawn_service};

struct Tree {
    _tenancy: RunningService,
    edge: RunningEdge,
    http: reqwest::Client,
    root: String,
}

async fn tree() -> Tree {
    let tenancy = spawn_service(Service::Tenancy).await.unwrap();
    let db = socle_db::Database::connect(
        &SecretString::from(tenancy.database.app_url_with_password()),
        2,
        std::time::Duration::from_secs(5),
    )
    .await
    .unwrap();
    let root = socle_tenancy::ensure_root(&db, "Fédération nationale", "NATIONAL", "national").await.unwrap();
    // Idempotent: the bootstrap can run again.
    let again = socle_tenancy::ensure_root(&db, "Autre", "OTHER", "other").await.unwrap();
    assert_eq!(again.id, root.id);
    let mut config = socle_edge::EdgeConfig::default();
    config.upstreams.insert("socle.tenancy.v1".into(), tenancy.url());
    let edge = spawn_edge(&socle_edge::default_pool(), config).await.unwrap();
    Tree { _tenancy: tenancy, edge, http: reqwest::Client::new(), root: root.id }
}

impl Tree {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.edge.url()));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    async fn create(&self, parent: &str, kind: &str, name: &str, code: &str, slug: &str) -> Value {
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                "/api/v1/entities",
                Some(json!({
                    "requestId": uuid::Uuid::new_v4().to_string(),
                    "entity": { "parentId": parent, "kind": kind, "displayName": name, "code": code, "slug": slug }
                })),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body["entity"].clone()
    }

    async fn verb(&self, id: &Value, verb: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, &format!("/api/v1/entities/{}:{verb}", id.as_str().unwrap()), Some(body)).await
    }

    async fn get(&self, id: &Value) -> Value {
        let (status, body) =
            self.call(reqwest::Method::GET, &format!("/api/v1/entities/{}", id.as_str().unwrap()), None).await;
        assert_eq!(status, 200, "{body}");
        body["entity"].clone()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn entities_are_created_under_a_parent_with_their_ancestors() {
    let t = tree().await;
    let region = t.create(&t.root, "ENTITY_KIND_REGION", "Auvergne-Rhône-Alpes", "ARA", "ara").await;
    let lyon =
        t.create(region["id"].as_str().unwrap(), "ENTITY_KIND_BRANCH", "Antenne de Lyon", "ARA-LYON", "lyon").await;
    assert_eq!(lyon["ancestorIds"], json!([t.root, region["id"]]));
    assert_eq!(lyon["depth"], 2);
    assert_eq!(lyon["state"], "ENTITY_STATE_ACTIVE");
    assert!(lyon["etag"].as_str().is_some_and(|e| !e.is_empty()));
    assert_eq!(t.get(&region["id"]).await["childCount"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_create_returns_the_first_entity() {
    let t = tree().await;
    let body = json!({
        "requestId": "0e3c1c9a-5a53-4a5e-8a86-5a8e1f2b7d10",
        "entity": { "parentId": t.root, "kind": "ENTITY_KIND_BRANCH", "displayName": "Antenne d'Évry", "code": "EVRY", "slug": "evry" }
    });
    let (_, first) = t.call(reqwest::Method::POST, "/api/v1/entities", Some(body.clone())).await;
    let (status, second) = t.call(reqwest::Method::POST, "/api/v1/entities", Some(body)).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(first["entity"]["id"], second["entity"]["id"]);
    let (_, list) = t.call(reqwest::Method::GET, "/api/v1/entities", None).await;
    assert_eq!(list["totalSize"], 1, "{list}");
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_entities_get_one_violation_per_field_and_nothing_is_written() {
    let t = tree().await;
    let (status, problem) = t
        .call(
            reqwest::Method::POST,
            "/api/v1/entities",
            Some(json!({
                "requestId": uuid::Uuid::new_v4().to_string(),
                "entity": { "parentId": t.root, "kind": "ENTITY_KIND_BRANCH", "displayName": " ",
                            "code": "lyon", "slug": "Lyon!", "phone": "04 78 00 00 00", "website": "http://x.fr" }
            })),
        )
        .await;
    assert_eq!(status, 400);
    let fields: Vec<&str> =
        problem["violations"].as_array().unwrap().iter().map(|v| v["field"].as_str().unwrap()).collect();
    assert_eq!(fields, ["entity.displayName", "entity.code", "entity.slug", "entity.phone", "entity.website"]);

    t.create(&t.root, "ENTITY_KIND_BRANCH", "Lyon", "LYON", "lyon").await;
    let (status, problem) = t
        .call(
            reqwest::Method::POST,
            "/api/v1/entities",
            Some(json!({
                "requestId": uuid::Uuid::new_v4().to_string(),
                "entity": { "parentId": t.root, "kind": "ENTITY_KIND_BRANCH", "displayName": "Lyon bis", "code": "LYON", "slug": "lyon-bis" }
            })),
        )
        .await;
    assert_eq!(status, 409, "{problem}");
    assert_eq!(problem["violations"][0]["field"], "entity.code");

    let (status, problem) = t
        .call(
            reqwest::Method::POST,
            "/api/v1/entities",
            Some(json!({
                "requestId": uuid::Uuid::new_v4().to_string(),
                "entity": { "parentId": uuid::Uuid::new_v4().to_string(), "kind": "ENTITY_KIND_BRANCH",
                            "displayName": "Orphan", "code": "ORPHAN", "slug": "orphan" }
            })),
        )
        .await;
    assert_eq!(status, 400, "{problem}");
    assert_eq!(problem["violations"][0]["field"], "entity.parentId");
    let (_, list) = t.call(reqwest::Method::GET, "/api/v1/entities", None).await;
    assert_eq!(list["totalSize"], 1, "only the valid branch exists: {list}");
}

#[tokio::test(flavor = "multi_thread")]
async fn updates_need_a_mask_and_the_current_etag() {
    let t = tree().await;
    let lyon = t.create(&t.root, "ENTITY_KIND_BRANCH", "Lyon", "LYON", "lyon").await;
    let path = format!("/api/v1/entities/{}", lyon["id"].as_str().unwrap());
    let (status, renamed) = t
        .call(
            reqwest::Method::PATCH,
            &path,
            Some(json!({ "entity": { "displayName": "Antenne de Lyon", "code": "IGNORED" }, "updateMask": "displayName", "etag": lyon["etag"] })),
        )
        .await;
    assert_eq!(status, 200, "{renamed}");
    assert_eq!(renamed["entity"]["displayName"], "Antenne de Lyon");
    assert_eq!(renamed["entity"]["code"], "LYON", "fields outside the mask are untouched");
    assert_ne!(renamed["entity"]["etag"], lyon["etag"]);

    let (status, problem) = t
        .call(
            reqwest::Method::PATCH,
            &path,
            Some(json!({ "entity": { "displayName": "Stale" }, "updateMask": "displayName", "etag": lyon["etag"] })),
        )
        .await;
    assert_eq!(status, 412, "{problem}");
    assert_eq!(t.get(&lyon["id"]).await["displayName"], "Antenne de Lyon", "nothing overwritten");

    let (status, problem) = t
        .call(
            reqwest::Method::PATCH,
            &path,
            Some(json!({ "entity": {}, "updateMask": "kind", "etag": renamed["entity"]["etag"] })),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(problem["violations"][0]["field"], "updateMask");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_moved_branch_takes_its_subtree_and_cycles_are_refused() {
    let t = tree().await;
    let ara = t.create(&t.root, "ENTITY_KIND_REGION", "ARA", "ARA", "ara").await;
    let idf = t.create(&t.root, "ENTITY_KIND_REGION", "IDF", "IDF", "idf").await;
    let lyon = t.create(ara["id"].as_str().unwrap(), "ENTITY_KIND_BRANCH", "Lyon", "LYON", "lyon").await;
    let annex = t.create(lyon["id"].as_str().unwrap(), "ENTITY_KIND_BRANCH", "Lyon annexe", "LYON-2", "lyon-2").await;

    let (status, moved) = t
        .call(
            reqwest::Method::POST,
            &format!("/api/v1/entities/{}:move", lyon["id"].as_str().unwrap()),
            Some(json!({ "newParentId": idf["id"], "etag": lyon["etag"] })),
        )
        .await;
    assert_eq!(status, 200, "{moved}");
    assert_eq!(moved["movedEntityCount"], 2);
    assert_eq!(t.get(&annex["id"]).await["ancestorIds"], json!([t.root, idf["id"], lyon["id"]]));
    // Proto3 JSON omits fields at their default value (here 0).
    assert_eq!(t.get(&ara["id"]).await["childCount"].as_i64().unwrap_or(0), 0);

    let idf_now = t.get(&idf["id"]).await;
    let (status, problem) = t
        .call(
            reqwest::Method::POST,
            &format!("/api/v1/entities/{}:move", idf["id"].as_str().unwrap()),
            Some(json!({ "newParentId": annex["id"], "etag": idf_now["etag"] })),
        )
        .await;
    assert_eq!(status, 400, "{problem}");
    assert_eq!(problem["code"], "FAILED_PRECONDITION");
    assert_eq!(t.get(&idf["id"]).await["ancestorIds"], json!([t.root]), "nothing moved");
}

#[tokio::test(flavor = "multi_thread")]
async fn archiving_a_region_needs_its_descendants_and_restoring_goes_top_down() {
    let t = tree().await;
    let ara = t.create(&t.root, "ENTITY_KIND_REGION", "ARA", "ARA", "ara").await;
    let lyon = t.create(ara["id"].as_str().unwrap(), "ENTITY_KIND_BRANCH", "Lyon", "LYON", "lyon").await;
    let (status, _) = t.verb(&ara["id"], "archive", json!({ "includeDescendants": false })).await;
    assert_eq!(status, 400);
    let (status, archived) = t.verb(&ara["id"], "archive", json!({ "includeDescendants": true })).await;
    assert_eq!(status, 200, "{archived}");
    assert_eq!(archived["archivedEntityCount"], 2);
    assert_eq!(t.get(&lyon["id"]).await["state"], "ENTITY_STATE_ARCHIVED");

    let (status, _) = t.verb(&lyon["id"], "unarchive", json!({})).await;
    assert_eq!(status, 400, "the parent is still archived");
    assert_eq!(t.verb(&ara["id"], "unarchive", json!({})).await.0, 200);
    assert_eq!(t.verb(&lyon["id"], "unarchive", json!({})).await.0, 200);
    assert_eq!(t.get(&lyon["id"]).await["state"], "ENTITY_STATE_ACTIVE");
}

#[tokio::test(flavor = "multi_thread")]
async fn lists_page_through_a_subtree_in_tree_order_and_search_without_accents() {
    let t = tree().await;
    let idf = t.create(&t.root, "ENTITY_KIND_REGION", "Île-de-France", "IDF", "idf").await;
    let ara = t.create(&t.root, "ENTITY_KIND_REGION", "Auvergne-Rhône-Alpes", "ARA", "ara").await;
    for (name, code, parent) in
        [("Évry", "IDF-EVRY", &idf), ("Créteil", "IDF-CRETEIL", &idf), ("Lyon", "ARA-LYON", &ara)]
    {
        t.create(parent["id"].as_str().unwrap(), "ENTITY_KIND_BRANCH", name, code, &code.to_lowercase()).await;
    }
    let mut names = Vec::new();
    let mut token = String::new();
    loop {
        let (status, page) =
            t.call(reqwest::Method::GET, &format!("/api/v1/entities?pageSize=2&pageToken={token}"), None).await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["totalSize"], 5);
        names
            .extend(page["entities"].as_array().unwrap().iter().map(|e| e["displayName"].as_str().unwrap().to_owned()));
        token = page["nextPageToken"].as_str().unwrap_or_default().to_owned();
        if token.is_empty() {
            break;
        }
        let (status, problem) = t
            .call(
                reqwest::Method::GET,
                &format!("/api/v1/entities?pageSize=2&pageToken={token}&kinds=ENTITY_KIND_BRANCH"),
                None,
            )
            .await;
        assert_eq!(status, 400, "a token is bound to its filters: {problem}");
    }
    // Depth-first, siblings by name, accents ignored for the order.
    assert_eq!(names, ["Auvergne-Rhône-Alpes", "Lyon", "Île-de-France", "Créteil", "Évry"]);

    let (_, found) = t.call(reqwest::Method::GET, "/api/v1/entities?query=EVRY", None).await;
    assert_eq!(found["entities"][0]["displayName"], "Évry", "{found}");
    let (_, children) = t
        .call(
            reqwest::Method::GET,
            &format!("/api/v1/entities?rootEntityId={}&maxDepth=1", idf["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(children["totalSize"], 2);
    let (_, regions) =
        t.call(reqwest::Method::GET, "/api/v1/entities?kinds=ENTITY_KIND_REGION&orderBy=code", None).await;
    let codes: Vec<&str> =
        regions["entities"].as_array().unwrap().iter().map(|e| e["code"].as_str().unwrap()).collect();
    assert_eq!(codes, ["ARA", "IDF"]);
}
