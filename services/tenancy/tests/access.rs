//! Roles, grants and access decisions through the edge's REST API, on a
//! real PostgreSQL: the deciding grant is explained, scopes and expiry are
//! honoured, a moved branch changes who can reach it.

use diesel_async::SimpleAsyncConnection;
use serde_json::{Value, json};
use socle_config::SecretString;
use socle_testkit::{RunningEdge, RunningService, Service, spawn_edge, spawn_service};

struct Fixture {
    tenancy: RunningService,
    edge: RunningEdge,
    http: reqwest::Client,
    root: String,
    region: String,
    lyon: String,
    lille: String,
}

async fn fixture() -> Fixture {
    let tenancy = spawn_service(Service::Tenancy).await.unwrap();
    let db = socle_db::Database::connect(
        &SecretString::from(tenancy.database.app_url_with_password()),
        2,
        std::time::Duration::from_secs(5),
    )
    .await
    .unwrap();
    let root = socle_tenancy::ensure_root(&db, "National", "NATIONAL", "national").await.unwrap().id;
    let mut config = socle_edge::EdgeConfig::default();
    config.upstreams.insert("socle.tenancy.v1".into(), tenancy.url());
    let edge = spawn_edge(&socle_edge::default_pool(), config).await.unwrap();
    let mut f = Fixture {
        tenancy,
        edge,
        http: reqwest::Client::new(),
        root,
        region: String::new(),
        lyon: String::new(),
        lille: String::new(),
    };
    f.region = f.entity(&f.root.clone(), "ENTITY_KIND_REGION", "ARA").await;
    f.lyon = f.entity(&f.region.clone(), "ENTITY_KIND_BRANCH", "LYON").await;
    f.lille = f.entity(&f.root.clone(), "ENTITY_KIND_BRANCH", "LILLE").await;
    f
}

fn user(id: &str) -> Value {
    json!({ "kind": "ACTOR_KIND_USER", "id": id })
}

const ALICE: &str = "0a1b2c3d-0000-4000-8000-00000000a11c";

impl Fixture {
    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let response = self.http.post(format!("{}{path}", self.edge.url())).json(&body).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let response = self.http.get(format!("{}{path}", self.edge.url())).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    async fn entity(&self, parent: &str, kind: &str, code: &str) -> String {
        let (status, body) = self
            .post(
                "/api/v1/entities",
                json!({ "requestId": uuid::Uuid::new_v4().to_string(),
                        "entity": { "parentId": parent, "kind": kind, "displayName": code, "code": code, "slug": code.to_lowercase() } }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body["entity"]["id"].as_str().unwrap().to_owned()
    }

    async fn role_id(&self, name: &str) -> String {
        let (_, roles) = self.get("/api/v1/roles?pageSize=500").await;
        roles["roles"].as_array().unwrap().iter().find(|r| r["name"] == name).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn grant(&self, principal: Value, role: &str, entity: &str, scope: &str) -> (u16, Value) {
        let role_id = self.role_id(role).await;
        self.post(
            "/api/v1/grants",
            json!({ "requestId": uuid::Uuid::new_v4().to_string(),
                    "grant": { "principal": principal, "roleId": role_id, "entityId": entity, "scope": scope } }),
        )
        .await
    }

    async fn check(&self, who: &str, permission: &str, entity: &str) -> Value {
        let (status, body) = self
            .post(
                "/api/v1/access:check",
                json!({ "principal": user(who), "permission": permission, "entityId": entity }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_catalogue_comes_from_the_contracts_and_built_in_roles_use_it() {
    let f = fixture().await;
    let (_, permissions) = f.get("/api/v1/permissions?service=crm&pageSize=500").await;
    let names: Vec<&str> =
        permissions["permissions"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"crm.organizations.read") && names.iter().all(|n| n.starts_with("crm.")), "{names:?}");

    let (_, roles) = f.get("/api/v1/roles?pageSize=500").await;
    let staff = roles["roles"].as_array().unwrap().iter().find(|r| r["name"] == "staff").unwrap();
    assert_eq!(staff["builtIn"], true);
    assert!(staff["permissions"].as_array().unwrap().contains(&json!("crm.organizations.update")));
    assert!(!staff["permissions"].as_array().unwrap().contains(&json!("tenancy.grants.manage")));

    let (status, problem) = f
        .post(
            "/api/v1/roles",
            json!({ "requestId": uuid::Uuid::new_v4().to_string(),
                    "role": { "entityId": f.lyon, "name": "gestion_adhesions", "displayName": "Gestion des adhésions",
                              "permissions": ["crm.memberships.update", "crm.nothing.fly"] } }),
        )
        .await;
    assert_eq!(status, 400, "{problem}");
    assert_eq!(problem["violations"][0]["field"], "role.permissions[1]");

    // A role holding a service-account-only permission cannot go to a user.
    let (status, relay) = f
        .post(
            "/api/v1/roles",
            json!({ "requestId": uuid::Uuid::new_v4().to_string(),
                    "role": { "entityId": f.root, "name": "audit_relay", "displayName": "Relais d'audit",
                              "permissions": ["audit.events.append"] } }),
        )
        .await;
    assert_eq!(status, 200, "{relay}");
    let grant = |kind: &str| {
        json!({ "requestId": uuid::Uuid::new_v4().to_string(),
                "grant": { "principal": { "kind": kind, "id": ALICE }, "roleId": relay["role"]["id"],
                           "entityId": f.root, "scope": "GRANT_SCOPE_SUBTREE" } })
    };
    let (status, problem) = f.post("/api/v1/grants", grant("ACTOR_KIND_USER")).await;
    assert_eq!(status, 400, "{problem}");
    assert_eq!(problem["violations"][0]["field"], "grant.roleId");
    assert_eq!(f.post("/api/v1/grants", grant("ACTOR_KIND_SERVICE_ACCOUNT")).await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_subtree_grant_reaches_descendants_and_explains_itself() {
    let f = fixture().await;
    let (status, grant) = f.grant(user(ALICE), "staff", &f.region, "GRANT_SCOPE_SUBTREE").await;
    assert_eq!(status, 200, "{grant}");

    let decision = f.check(ALICE, "crm.organizations.update", &f.lyon).await;
    assert_eq!(decision["allowed"], true, "{decision}");
    let path = &decision["decidedBy"];
    assert_eq!(path["grantId"], grant["grant"]["id"]);
    assert_eq!(path["roleName"], "staff");
    assert_eq!(path["grantedEntityId"], f.region);
    assert_eq!(path["entityPath"], json!([f.region, f.lyon]));

    let other = f.check(ALICE, "crm.organizations.update", &f.lille).await;
    assert!(!other["allowed"].as_bool().unwrap_or(false));
    assert_eq!(other["denyReason"], "DENY_REASON_NO_MATCHING_GRANT");
    let not_in_role = f.check(ALICE, "tenancy.grants.manage", &f.lyon).await;
    assert_eq!(not_in_role["denyReason"], "DENY_REASON_NO_MATCHING_GRANT");
    let unknown = f.check(ALICE, "crm.nothing.fly", &f.lyon).await;
    assert_eq!(unknown["denyReason"], "DENY_REASON_UNKNOWN_PERMISSION");

    let (_, accessible) = f
        .post(
            "/api/v1/access:listAccessibleEntities",
            json!({ "principal": user(ALICE), "permission": "crm.organizations.read" }),
        )
        .await;
    let mut ids: Vec<String> =
        accessible["entityIds"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect();
    ids.sort();
    let mut expected = vec![f.region.clone(), f.lyon.clone()];
    expected.sort();
    assert_eq!(ids, expected);

    let (_, explained) = f
        .post("/api/v1/access:explain", json!({ "principal": user(ALICE), "entityId": f.lyon, "service": "crm" }))
        .await;
    let permissions = explained["permissions"].as_array().unwrap();
    assert!(permissions.iter().all(|p| p["permission"].as_str().unwrap().starts_with("crm.")));
    let update = permissions.iter().find(|p| p["permission"] == "crm.organizations.update").unwrap();
    assert_eq!(update["grantedBy"][0]["grantedEntityId"], f.region);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_entity_only_grant_stops_at_its_entity() {
    let f = fixture().await;
    f.grant(user(ALICE), "viewer", &f.region, "GRANT_SCOPE_ENTITY_ONLY").await;
    assert_eq!(f.check(ALICE, "crm.organizations.read", &f.region).await["allowed"], true);
    assert_eq!(f.check(ALICE, "crm.organizations.read", &f.lyon).await["denyReason"], "DENY_REASON_NO_MATCHING_GRANT");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_grant_no_longer_applies() {
    let f = fixture().await;
    let (_, grant) = f.grant(user(ALICE), "staff", &f.lyon, "GRANT_SCOPE_ENTITY_ONLY").await;
    assert_eq!(f.check(ALICE, "crm.contacts.read", &f.lyon).await["allowed"], true);
    // Time passes: the grant's expiry is now behind us.
    let mut admin = socle_db::admin::connect(&f.tenancy.database.owner_url).await.unwrap();
    admin
        .batch_execute(&format!(
            "UPDATE grants SET expire_time = now() - interval '1 second' WHERE id = '{}'",
            grant["grant"]["id"].as_str().unwrap()
        ))
        .await
        .unwrap();
    let decision = f.check(ALICE, "crm.contacts.read", &f.lyon).await;
    assert_eq!(decision["denyReason"], "DENY_REASON_GRANT_EXPIRED", "{decision}");
    let (_, explained) =
        f.post("/api/v1/access:explain", json!({ "principal": user(ALICE), "entityId": f.lyon })).await;
    assert!(explained["permissions"].as_array().is_none_or(|p| p.is_empty()), "{explained}");
    assert_eq!(explained["expiredGrants"][0]["grantId"], grant["grant"]["id"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn moving_a_branch_changes_who_can_reach_it() {
    let f = fixture().await;
    f.grant(user(ALICE), "staff", &f.region, "GRANT_SCOPE_SUBTREE").await;
    let before = f.check(ALICE, "crm.organizations.read", &f.lyon).await;
    assert_eq!(before["allowed"], true);

    let (_, lyon) = f.get(&format!("/api/v1/entities/{}", f.lyon)).await;
    let (status, moved) = f
        .post(
            &format!("/api/v1/entities/{}:move", f.lyon),
            json!({ "newParentId": f.root, "etag": lyon["entity"]["etag"] }),
        )
        .await;
    assert_eq!(status, 200, "{moved}");
    let after = f.check(ALICE, "crm.organizations.read", &f.lyon).await;
    assert_eq!(after["denyReason"], "DENY_REASON_NO_MATCHING_GRANT", "{after}");
    let version = |v: &Value| v["policyVersion"].as_str().unwrap().parse::<i64>().unwrap();
    assert!(version(&after) > version(&before), "decisions made before the move are stale");
}

#[tokio::test(flavor = "multi_thread")]
async fn archived_entities_are_read_only() {
    let f = fixture().await;
    f.grant(user(ALICE), "staff", &f.lille, "GRANT_SCOPE_SUBTREE").await;
    let (status, _) = f.post(&format!("/api/v1/entities/{}:archive", f.lille), json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(f.check(ALICE, "crm.organizations.read", &f.lille).await["allowed"], true);
    assert_eq!(f.check(ALICE, "crm.organizations.update", &f.lille).await["denyReason"], "DENY_REASON_ENTITY_ARCHIVED");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_granted_role_cannot_be_deleted_and_built_in_roles_never() {
    let f = fixture().await;
    let (status, role) = f
        .post(
            "/api/v1/roles",
            json!({ "requestId": uuid::Uuid::new_v4().to_string(),
                    "role": { "entityId": f.region, "name": "tresorier", "displayName": "Trésorier",
                              "permissions": ["crm.memberships.read", "crm.memberships.update"] } }),
        )
        .await;
    assert_eq!(status, 200, "{role}");
    let role_id = role["role"]["id"].as_str().unwrap().to_owned();
    // Usable on the region's subtree only.
    let grant = |entity: &str| {
        json!({ "requestId": uuid::Uuid::new_v4().to_string(),
                "grant": { "principal": user(ALICE), "roleId": role_id, "entityId": entity, "scope": "GRANT_SCOPE_ENTITY_ONLY" } })
    };
    let (status, problem) = f.post("/api/v1/grants", grant(&f.lille)).await;
    assert_eq!(status, 400, "{problem}");
    assert_eq!(f.post("/api/v1/grants", grant(&f.lyon)).await.0, 200);
    assert_eq!(f.check(ALICE, "crm.memberships.update", &f.lyon).await["decidedBy"]["roleName"], "tresorier");

    let delete = f.http.delete(format!("{}/api/v1/roles/{role_id}", f.edge.url())).send().await.unwrap();
    assert_eq!(delete.status(), 400, "still granted");
    let staff = f.role_id("staff").await;
    let delete = f.http.delete(format!("{}/api/v1/roles/{staff}", f.edge.url())).send().await.unwrap();
    assert_eq!(delete.status(), 400, "built-in");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_grant_of_a_deleted_principal_goes_at_once_and_decisions_follow() {
    let f = fixture().await;
    const BOB: &str = "0a1b2c3d-0000-4000-8000-0000000000b0";
    assert_eq!(f.grant(user(ALICE), "staff", &f.region, "GRANT_SCOPE_SUBTREE").await.0, 200);
    assert_eq!(f.grant(user(ALICE), "viewer", &f.lille, "GRANT_SCOPE_ENTITY_ONLY").await.0, 200);
    assert_eq!(f.grant(user(BOB), "staff", &f.lyon, "GRANT_SCOPE_ENTITY_ONLY").await.0, 200);
    let before = f.check(ALICE, "crm.organizations.update", &f.lyon).await;
    assert_eq!(before["allowed"], true);

    let (status, purged) = f.post("/api/v1/grants:deletePrincipalGrants", json!({ "principal": user(ALICE) })).await;
    assert_eq!(status, 200, "{purged}");
    assert_eq!(purged["deletedGrantCount"], 2);
    let after = f.check(ALICE, "crm.organizations.update", &f.lyon).await;
    assert!(!after["allowed"].as_bool().unwrap_or(false), "{after}");
    assert!(
        after["policyVersion"].as_str().unwrap().parse::<i64>().unwrap()
            > before["policyVersion"].as_str().unwrap().parse::<i64>().unwrap(),
        "cached decisions are dropped"
    );
    let (_, left) = f.get(&format!("/api/v1/grants?principalId={ALICE}")).await;
    assert!(left["grants"].as_array().is_none_or(|g| g.is_empty()), "{left}");
    let (_, bob) = f.get(&format!("/api/v1/grants?principalId={BOB}")).await;
    assert_eq!(bob["grants"].as_array().unwrap().len(), 1, "other principals keep theirs");

    // A retry deletes nothing more and succeeds.
    let (status, again) = f.post("/api/v1/grants:deletePrincipalGrants", json!({ "principal": user(ALICE) })).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["deletedGrantCount"].as_i64().unwrap_or(0), 0);

    // The permission is reserved to service accounts: no role a person may hold has it.
    let (_, roles) = f.get("/api/v1/roles?pageSize=500").await;
    let holders: Vec<&str> = roles["roles"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["permissions"].as_array().unwrap().contains(&json!("tenancy.principals.purge")))
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(holders, ["identity_service"]);
}
