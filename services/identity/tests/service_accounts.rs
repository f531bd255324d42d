//! Service accounts and client credentials through the edge's REST API.

use serde_json::{Value, json};
use socle_testkit::{RunningEdge, RunningService, Service, spawn_edge, spawn_service};

struct Fixture {
    _identity: RunningService,
    edge: RunningEdge,
    http: reqwest::Client,
}

async fn fixture() -> Fixture {
    let identity = spawn_service(Service::Identity).await.unwrap();
    let mut config = socle_edge::EdgeConfig::default();
    config.upstreams.insert("socle.identity.v1".into(), identity.url());
    let edge = spawn_edge(&socle_edge::default_pool(), config).await.unwrap();
    Fixture { _identity: identity, edge, http: reqwest::Client::new() }
}

impl Fixture {
    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let response = self.http.post(format!("{}{path}", self.edge.url())).json(&body).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn token(&self, client_id: &Value, secret: &Value) -> (u16, Value) {
        self.post("/api/v1/service-accounts:issueToken", json!({ "clientId": client_id, "clientSecret": secret })).await
    }
}

fn claims(token: &str) -> Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn client_credentials_give_service_tokens_and_rotation_has_a_grace_period() {
    let f = fixture().await;
    let (status, created) = f
        .post(
            "/api/v1/service-accounts",
            json!({ "requestId": uuid::Uuid::new_v4().to_string(),
                    "serviceAccount": { "entityId": uuid::Uuid::new_v4().to_string(), "name": "crm-service", "displayName": "Service CRM" } }),
        )
        .await;
    assert_eq!(status, 200, "{created}");
    let account = &created["serviceAccount"];
    let (client_id, first_secret) = (account["clientId"].clone(), created["clientSecret"].clone());
    assert!(first_secret.as_str().is_some_and(|s| s.len() >= 43), "256-bit secret shown once");

    let (status, issued) = f.token(&client_id, &first_secret).await;
    assert_eq!(status, 200, "{issued}");
    let c = claims(issued["accessToken"].as_str().unwrap());
    assert_eq!(c["sub"], account["id"]);
    assert_eq!(c["socle_kind"], "service_account");
    assert!(issued["expiresIn"].as_i64().unwrap() <= 900);

    assert_eq!(f.token(&client_id, &json!("not-the-secret")).await.0, 401);
    assert_eq!(f.token(&json!("sa-unknown"), &first_secret).await.0, 401);

    // Rotation: the new secret works at once, the old one during the grace.
    let path = format!("/api/v1/service-accounts/{}:rotateSecret", account["id"].as_str().unwrap());
    let (status, rotated) = f.post(&path, json!({ "previousSecretGrace": "3600s" })).await;
    assert_eq!(status, 200, "{rotated}");
    let second_secret = rotated["clientSecret"].clone();
    assert_eq!(f.token(&client_id, &second_secret).await.0, 200);
    assert_eq!(f.token(&client_id, &first_secret).await.0, 200, "still in its grace period");

    // A rotation without grace ends the previous secret at once.
    let (_, again) = f.post(&path, json!({ "previousSecretGrace": "0s" })).await;
    assert_eq!(f.token(&client_id, &second_secret).await.0, 401);
    assert_eq!(f.token(&client_id, &again["clientSecret"]).await.0, 200);
}
