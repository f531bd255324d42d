//! Through the edge with real tokens: a service account appends events of
//! two branches; a branch auditor reads its branch only (query and get),
//! a national auditor with the subtree reads both.

use reqwest::Method;
use serde_json::{Value, json};
use socle_config::SecretString;
use socle_proto::socle::tenancy::v1::GrantScope;
use socle_testkit::{Service, secure::SecurePlatform};
use uuid::Uuid;

async fn create_entity(p: &SecurePlatform, parent: &str, code: &str) -> String {
    let (status, body) = p
        .call(
            Some(&p.admin_token),
            Method::POST,
            "/api/v1/entities",
            None,
            Some(json!({ "requestId": Uuid::new_v4().to_string(),
                         "entity": { "parentId": parent, "kind": "ENTITY_KIND_BRANCH", "displayName": code,
                                     "code": code, "slug": code.to_lowercase() } })),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    body["entity"]["id"].as_str().unwrap().to_owned()
}

async fn database(p: &SecurePlatform, service: Service) -> socle_db::Database {
    socle_db::Database::connect(
        &SecretString::from(p.services[&service].database.app_url_with_password()),
        2,
        std::time::Duration::from_secs(5),
    )
    .await
    .unwrap()
}

/// A service account holding `platform_service` on the root's subtree, and
/// its access token.
async fn writer_token(p: &SecurePlatform) -> String {
    let root = Uuid::parse_str(&p.root).unwrap();
    let secret = Uuid::new_v4().simple().to_string() + &Uuid::new_v4().simple().to_string();
    let account = socle_identity::bootstrap::ensure_service_account(
        &database(p, Service::Identity).await,
        "audit-test-writer",
        root,
        "sa-audit-test-writer",
        &SecretString::from(secret.clone()),
    )
    .await
    .unwrap();
    socle_tenancy::bootstrap_grant(
        &database(p, Service::Tenancy).await,
        2,
        account,
        "platform_service",
        root,
        GrantScope::Subtree,
    )
    .await
    .unwrap();
    let (status, body) = p
        .call(
            None,
            Method::POST,
            "/api/v1/service-accounts:issueToken",
            None,
            Some(json!({ "clientId": "sa-audit-test-writer", "clientSecret": secret })),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    body["accessToken"].as_str().unwrap().to_owned()
}

fn event(entity: &str) -> Value {
    json!({
        "id": Uuid::now_v7().to_string(),
        "entityId": entity,
        "actor": { "kind": "ACTOR_KIND_USER", "id": Uuid::new_v4().to_string() },
        "service": "crm",
        "action": "crm.organizations.update",
        "resourceType": "crm.organization",
        "resourceId": Uuid::new_v4().to_string(),
        "outcome": "OUTCOME_OK",
        "occurTime": "2025-06-01T12:00:00Z",
        "changes": [{ "fieldPath": "legal_name", "before": "Ancien", "after": "Nouveau" }]
    })
}

async fn grant(p: &SecurePlatform, user: Uuid, entity: &str, scope: GrantScope) {
    let (status, roles) =
        p.call(Some(&p.admin_token), Method::GET, "/api/v1/roles?pageSize=500", Some(&p.root), None).await.unwrap();
    assert_eq!(status, 200, "{roles}");
    let auditor = roles["roles"].as_array().unwrap().iter().find(|r| r["name"] == "auditor").unwrap()["id"].clone();
    let (status, body) = p
        .call(
            Some(&p.admin_token),
            Method::POST,
            "/api/v1/grants",
            None,
            Some(json!({ "requestId": Uuid::new_v4().to_string(),
                         "grant": { "principal": { "kind": "ACTOR_KIND_USER", "id": user.to_string() },
                                    "roleId": auditor, "entityId": entity, "scope": scope.as_str_name() } })),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
}

fn ids(body: &Value) -> Vec<String> {
    body["events"]
        .as_array()
        .map(|a| a.iter().map(|e| e["id"].as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_branch_auditor_reads_its_branch_only_and_a_national_auditor_reads_the_subtree() {
    let p = SecurePlatform::start().await.expect("secured platform");
    let branch_a = create_entity(&p, &p.root, "AUDIT-A").await;
    let branch_b = create_entity(&p, &p.root, "AUDIT-B").await;

    let writer = writer_token(&p).await;
    let (in_a, in_b) = (event(&branch_a), event(&branch_b));
    let (status, body) = p
        .call(
            Some(&writer),
            Method::POST,
            "/api/v1/audit/events:append",
            Some(&p.root),
            Some(json!({ "events": [in_a, in_b] })),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let (a_id, b_id) = (in_a["id"].as_str().unwrap(), in_b["id"].as_str().unwrap());

    // A person cannot append, even a national administrator.
    let (status, _) = p
        .call(
            Some(&p.admin_token),
            Method::POST,
            "/api/v1/audit/events:append",
            Some(&p.root),
            Some(json!({ "events": [event(&branch_a)] })),
        )
        .await
        .unwrap();
    assert_eq!(status, 403);

    let (auditor_a, token_a) = p.user_with_password("auditeur.a@socle.test", &branch_a).await.unwrap();
    grant(&p, auditor_a, &branch_a, GrantScope::EntityOnly).await;
    let (national, token_n) = p.user_with_password("auditeur.national@socle.test", &p.root).await.unwrap();
    grant(&p, national, &p.root, GrantScope::Subtree).await;

    // Branch A's auditor: A's events, not B's, by query or by id.
    let query = |entity: &str, subtree: bool| {
        // Only the events written here (denials may be audited too).
        format!("/api/v1/audit/events?entityId={entity}&includeDescendants={subtree}&actions=crm.organizations.update")
    };
    let (status, body) = p.call(Some(&token_a), Method::GET, &query(&branch_a, false), None, None).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(ids(&body), [a_id]);
    assert_eq!(body["events"][0]["changes"][0]["after"], "Nouveau");
    let (status, _) = p.call(Some(&token_a), Method::GET, &query(&branch_b, false), None, None).await.unwrap();
    assert_eq!(status, 403);
    let (status, _) = p.call(Some(&token_a), Method::GET, &query(&p.root, true), None, None).await.unwrap();
    assert_eq!(status, 403);
    let get = |id: &str| format!("/api/v1/audit/events/{id}");
    let (status, body) = p.call(Some(&token_a), Method::GET, &get(a_id), Some(&branch_a), None).await.unwrap();
    assert_eq!((status, body["event"]["id"].as_str()), (200, Some(a_id)));
    let (status, _) = p.call(Some(&token_a), Method::GET, &get(b_id), Some(&branch_a), None).await.unwrap();
    assert_eq!(status, 404, "another branch's event does not exist for this auditor");
    let verify = format!("/api/v1/audit/chains/{branch_b}:verify");
    let (status, _) = p.call(Some(&token_a), Method::POST, &verify, None, Some(json!({}))).await.unwrap();
    assert_eq!(status, 403);

    // The national auditor with the subtree: both branches.
    let (status, body) = p.call(Some(&token_n), Method::GET, &query(&p.root, true), None, None).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let mut seen = ids(&body);
    seen.sort();
    let mut expected = vec![a_id.to_owned(), b_id.to_owned()];
    expected.sort();
    assert_eq!(seen, expected);
    let (status, body) = p.call(Some(&token_n), Method::GET, &get(b_id), Some(&p.root), None).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, body) = p.call(Some(&token_n), Method::POST, &verify, None, Some(json!({}))).await.unwrap();
    assert_eq!((status, body["status"].as_str()), (200, Some("CHAIN_STATUS_OK")), "{body}");
}
