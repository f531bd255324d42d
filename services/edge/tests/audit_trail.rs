//! The audit trail end to end, on the secured platform: changes and denied
//! access decisions are written to each service's outbox in the same
//! transaction, relayed to the audit service, and read back through the
//! edge by an auditor; the chains they land in verify.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use socle_testkit::secure::SecurePlatform;

async fn create_entity(p: &SecurePlatform, parent: &str, kind: &str, code: &str) -> String {
    let (status, body) = p
        .call(
            Some(&p.admin_token),
            Method::POST,
            "/api/v1/entities",
            None,
            Some(json!({ "requestId": uuid::Uuid::new_v4().to_string(),
                         "entity": { "parentId": parent, "kind": kind, "displayName": code, "code": code, "slug": code.to_lowercase() } })),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    body["entity"]["id"].as_str().unwrap().to_owned()
}

async fn role_id(p: &SecurePlatform, name: &str) -> String {
    let (status, roles) =
        p.call(Some(&p.admin_token), Method::GET, "/api/v1/roles?pageSize=500", Some(&p.root), None).await.unwrap();
    assert_eq!(status, 200, "{roles}");
    roles["roles"].as_array().unwrap().iter().find(|r| r["name"] == name).unwrap()["id"].as_str().unwrap().to_owned()
}

async fn grant(p: &SecurePlatform, user: uuid::Uuid, role: &str, entity: &str) -> String {
    let (status, body) = p
        .call(
            Some(&p.admin_token),
            Method::POST,
            "/api/v1/grants",
            None,
            Some(json!({ "requestId": uuid::Uuid::new_v4().to_string(),
                         "grant": { "principal": { "kind": "ACTOR_KIND_USER", "id": user.to_string() },
                                    "roleId": role_id(p, role).await, "entityId": entity, "scope": "GRANT_SCOPE_ENTITY_ONLY" } })),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    body["grant"]["id"].as_str().unwrap().to_owned()
}

/// Polls the entity's audit events (read by the national administrator)
/// until one matches `wanted`: delivery through the outbox is asynchronous.
async fn wait_for_event(p: &SecurePlatform, entity: &str, wanted: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = p
            .call(
                Some(&p.admin_token),
                Method::GET,
                &format!("/api/v1/audit/events?entityId={entity}&pageSize=500"),
                None,
                None,
            )
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        if let Some(event) = body["events"].as_array().and_then(|events| events.iter().find(|e| wanted(e))) {
            return event.clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "no matching audit event on {entity}; last page: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn changes_and_denied_decisions_reach_the_audit_trail_through_the_outbox() {
    let p = SecurePlatform::start().await.unwrap();
    let (status, me) = p.call(Some(&p.admin_token), Method::GET, "/api/v1/me", None, None).await.unwrap();
    assert_eq!(status, 200, "{me}");
    let admin_id = me["user"]["id"].as_str().unwrap().to_owned();
    let region = create_entity(&p, &p.root, "ENTITY_KIND_REGION", "REGION").await;
    let branch_a = create_entity(&p, &region, "ENTITY_KIND_BRANCH", "BRANCH-A").await;
    let branch_b = create_entity(&p, &region, "ENTITY_KIND_BRANCH", "BRANCH-B").await;
    let (staff, staff_token) = p.user_with_password("staff.a@socle.test", &branch_a).await.unwrap();
    grant(&p, staff, "staff", &branch_a).await;
    let (branch_admin, branch_admin_token) = p.user_with_password("admin.a@socle.test", &branch_a).await.unwrap();
    grant(&p, branch_admin, "entity_admin", &branch_a).await;
    let (other, _) = p.user_with_password("staff.b@socle.test", &branch_b).await.unwrap();
    let grant_b = grant(&p, other, "staff", &branch_b).await;

    // A change: the creation of branch A, by the national administrator,
    // in branch A's chain, with the fields it set.
    let created = wait_for_event(&p, &branch_a, |e| e["action"] == "tenancy.entities.create").await;
    assert_eq!(created["actor"]["id"], admin_id.as_str());
    assert_eq!(created["outcome"], "OUTCOME_OK");
    assert_eq!(created["service"], "tenancy");
    assert_eq!(created["resourceType"], "tenancy.entity");
    assert_eq!(created["resourceId"], branch_a.as_str());
    let display_name =
        created["changes"].as_array().unwrap().iter().find(|c| c["fieldPath"] == "display_name").unwrap();
    assert_eq!(display_name["after"], "BRANCH-A");
    assert!(display_name.get("before").is_none_or(Value::is_null));
    assert!(!created["requestId"].as_str().unwrap().is_empty());

    // The grant to the other branch's person, in branch B's chain.
    let granted = wait_for_event(&p, &branch_b, |e| e["action"] == "tenancy.grants.create").await;
    assert_eq!(granted["resourceId"], grant_b.as_str());

    // A denied decision of the authorization layer: staff of A reading B.
    let (status, refusal) =
        p.call(Some(&staff_token), Method::GET, &format!("/api/v1/entities/{branch_b}"), None, None).await.unwrap();
    assert_eq!(status, 403, "{refusal}");
    let request_id = refusal["requestId"].as_str().unwrap().to_owned();
    let denied = wait_for_event(&p, &branch_b, |e| e["requestId"] == request_id.as_str()).await;
    assert_eq!(denied["outcome"], "OUTCOME_DENIED");
    assert_eq!(denied["actor"]["id"], staff.to_string());
    assert_eq!(denied["permission"], "tenancy.entities.read");
    assert_eq!(denied["statusCode"], "PERMISSION_DENIED");
    assert_eq!(denied["action"], "tenancy.get_entity");

    // A denied record-level check: A's administrator naming B's grant by id.
    let (status, refusal) = p
        .call(Some(&branch_admin_token), Method::GET, &format!("/api/v1/grants/{grant_b}"), Some(&branch_a), None)
        .await
        .unwrap();
    assert_eq!(status, 404, "{refusal}");
    let request_id = refusal["requestId"].as_str().unwrap().to_owned();
    let denied = wait_for_event(&p, &branch_b, |e| e["requestId"] == request_id.as_str()).await;
    assert_eq!(denied["outcome"], "OUTCOME_DENIED");
    assert_eq!(denied["actor"]["id"], branch_admin.to_string());
    assert_eq!(denied["statusCode"], "NOT_FOUND");
    assert_eq!(denied["reason"], "record_in_other_entity");

    // The chains the events landed in verify.
    for entity in [&branch_a, &branch_b] {
        let (status, verdict) = p
            .call(
                Some(&p.admin_token),
                Method::POST,
                &format!("/api/v1/audit/chains/{entity}:verify"),
                None,
                Some(json!({})),
            )
            .await
            .unwrap();
        assert_eq!(status, 200, "{verdict}");
        assert_eq!(verdict["status"], "CHAIN_STATUS_OK", "{verdict}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sign_in_failures_locks_successes_and_refresh_reuse_are_audited_on_the_home_entity() {
    let p = SecurePlatform::start().await.unwrap();
    let branch = create_entity(&p, &p.root, "ENTITY_KIND_BRANCH", "BRANCH-L").await;
    let (user, _) = p.user_with_password("camille@socle.test", &branch).await.unwrap();
    let login = |password: &'static str| {
        let p = &p;
        async move {
            p.call(
                None,
                Method::POST,
                "/api/v1/auth:login",
                None,
                Some(json!({ "email": "Camille@socle.test", "password": password })),
            )
            .await
            .unwrap()
        }
    };
    // Five wrong passwords from one address start a lock.
    for _ in 0..socle_identity::throttle::PAIR_THRESHOLD {
        let (status, body) = login("pas le bon mot de passe").await;
        assert_eq!(status, 401, "{body}");
    }
    let failed = wait_for_event(&p, &branch, |e| e["action"] == "identity.auth.login_failed").await;
    assert_eq!(failed["outcome"], "OUTCOME_DENIED");
    assert_eq!(failed["actor"]["id"], user.to_string());
    assert_eq!(failed["reason"], "bad_password");
    assert!(!failed["clientAddress"].as_str().unwrap().is_empty(), "{failed}");
    let locked = wait_for_event(&p, &branch, |e| e["action"] == "identity.auth.locked").await;
    assert_eq!(locked["details"]["lock_scope"], "pair", "{locked}");

    // Lift the lock as the administrator, then sign in and reuse a refresh token.
    let (status, body) = p
        .call(
            Some(&p.admin_token),
            Method::POST,
            &format!("/api/v1/users/{user}:unlock"),
            Some(&p.root),
            Some(json!({})),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, session) = login(socle_testkit::secure::TEST_PASSWORD).await;
    assert_eq!(status, 200, "{session}");
    let refresh = session["tokens"]["refreshToken"].as_str().unwrap().to_owned();
    let signed_in = wait_for_event(&p, &branch, |e| e["action"] == "identity.auth.login").await;
    assert_eq!(signed_in["outcome"], "OUTCOME_OK");
    for expected in [200, 401] {
        let (status, body) = p
            .call(None, Method::POST, "/api/v1/auth:refresh", None, Some(json!({ "refreshToken": refresh })))
            .await
            .unwrap();
        assert_eq!(status, expected, "{body}");
    }
    let reused = wait_for_event(&p, &branch, |e| e["action"] == "identity.auth.refresh_reused").await;
    assert_eq!(reused["outcome"], "OUTCOME_DENIED");
    assert_eq!(reused["actor"]["id"], user.to_string());
}
