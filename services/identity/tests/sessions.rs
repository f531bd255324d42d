//! Invitations, login, tokens and sessions through the edge's REST API, on a
//! real PostgreSQL.

use serde_json::{Value, json};
use socle_testkit::{RunningEdge, RunningService, Service, spawn_edge, spawn_service};

struct Fixture {
    _identity: RunningService,
    edge: RunningEdge,
    http: reqwest::Client,
}

const ENTITY: &str = "6f1f2a0f-0a11-4c8e-9d43-8b7d7d0e4b1a";
const PASSWORD: &str = "cheval agrafe batterie correcte";

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

    async fn invite(&self, email: &str) -> (u16, Value) {
        self.post(
            "/api/v1/users",
            json!({ "requestId": uuid::Uuid::new_v4().to_string(),
                    "user": { "email": email, "entityId": ENTITY, "givenName": "Claire", "familyName": "Martin" },
                    "invitationDelivery": "INVITATION_DELIVERY_RETURN_LINK" }),
        )
        .await
    }

    /// An active user: invited, then the invitation accepted.
    async fn active_user(&self, email: &str) -> Value {
        let (status, invited) = self.invite(email).await;
        assert_eq!(status, 200, "{invited}");
        let url = invited["invitationUrl"].as_str().unwrap();
        let token = url.split("#token=").nth(1).unwrap();
        let (status, accepted) =
            self.post("/api/v1/auth:acceptInvitation", json!({ "invitationToken": token, "password": PASSWORD })).await;
        assert_eq!(status, 200, "{accepted}");
        accepted["tokens"].clone()
    }

    async fn login(&self, email: &str, password: &str) -> (u16, Value) {
        self.post("/api/v1/auth:login", json!({ "email": email, "password": password })).await
    }

    async fn refresh(&self, token: &Value) -> (u16, Value) {
        self.post("/api/v1/auth:refresh", json!({ "refreshToken": token })).await
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invitation_sets_the_first_password_and_signs_in() {
    let f = fixture().await;
    let (status, invited) = f.invite("Claire.Martin@Exemple.fr").await;
    assert_eq!(status, 200, "{invited}");
    assert_eq!(invited["user"]["state"], "USER_STATE_INVITED");
    assert_eq!(invited["user"]["displayName"], "Claire Martin");
    let token = invited["invitationUrl"].as_str().unwrap().split("#token=").nth(1).unwrap().to_owned();

    // No password exists before the invitation is accepted.
    let (status, _) = f.login("claire.martin@exemple.fr", PASSWORD).await;
    assert_eq!(status, 401);

    let (status, problem) = f
        .post("/api/v1/auth:acceptInvitation", json!({ "invitationToken": token, "password": "motdepasse2026" }))
        .await;
    assert_eq!(status, 400);
    assert_eq!(problem["violations"][0]["field"], "password");

    let (status, accepted) =
        f.post("/api/v1/auth:acceptInvitation", json!({ "invitationToken": token, "password": PASSWORD })).await;
    assert_eq!(status, 200, "{accepted}");
    assert_eq!(accepted["tokens"]["tokenType"], "Bearer");
    let (status, _) =
        f.post("/api/v1/auth:acceptInvitation", json!({ "invitationToken": token, "password": PASSWORD })).await;
    assert_eq!(status, 401, "an invitation is used once");

    // E-mails are unique after normalisation.
    let (status, problem) = f.invite("  claire.martin@EXEMPLE.fr ").await;
    assert_eq!(status, 409, "{problem}");
    assert_eq!(problem["violations"][0]["field"], "user.email");
}

#[tokio::test(flavor = "multi_thread")]
async fn access_tokens_are_short_lived_eddsa_jwts_verifiable_with_the_jwks() {
    let f = fixture().await;
    let tokens = f.active_user("jwks@exemple.fr").await;
    let jwks: Value =
        f.http.get(format!("{}/.well-known/jwks.json", f.edge.url())).send().await.unwrap().json().await.unwrap();
    let key = &jwks["keys"][0];
    assert_eq!(
        (key["kty"].as_str(), key["crv"].as_str(), key["alg"].as_str()),
        (Some("OKP"), Some("Ed25519"), Some("EdDSA"))
    );

    let access = tokens["accessToken"].as_str().unwrap();
    let header = jsonwebtoken::decode_header(access).unwrap();
    assert_eq!(header.kid.as_deref(), key["kid"].as_str());
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(key.clone()).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
    validation.set_audience(&["socle-api"]);
    validation.set_issuer(&["socle"]);
    let claims =
        jsonwebtoken::decode::<Value>(access, &jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap(), &validation)
            .unwrap()
            .claims;
    let lifetime = claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap();
    assert!(lifetime > 0 && lifetime <= 900, "{lifetime}");
    assert_eq!(claims["sid"], tokens["sessionId"]);
    assert_eq!(claims["socle_kind"], "user");
    assert_eq!(tokens["expiresIn"].as_i64(), Some(lifetime));
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_credentials_get_one_answer_whatever_was_wrong() {
    let f = fixture().await;
    f.active_user("login@exemple.fr").await;
    let (status, ok) = f.login("LOGIN@exemple.fr", PASSWORD).await;
    assert_eq!(status, 200, "{ok}");
    assert_eq!(ok["status"], "LOGIN_STATUS_SUCCEEDED");
    let (status, wrong_password) = f.login("login@exemple.fr", "not the password at all").await;
    let (status2, unknown_user) = f.login("nobody@exemple.fr", PASSWORD).await;
    assert_eq!((status, status2), (401, 401));
    assert_eq!(wrong_password["detail"], unknown_user["detail"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn refresh_tokens_rotate_and_a_reused_one_revokes_the_session() {
    let f = fixture().await;
    let first = f.active_user("refresh@exemple.fr").await;
    let (status, second) = f.refresh(&first["refreshToken"]).await;
    assert_eq!(status, 200, "{second}");
    let second = second["tokens"].clone();
    assert_ne!(second["refreshToken"], first["refreshToken"]);
    assert_eq!(second["sessionId"], first["sessionId"]);

    // The first token is spent: presenting it again is a replay.
    let (status, problem) = f.refresh(&first["refreshToken"]).await;
    assert_eq!(status, 401, "{problem}");
    // The whole family is revoked, including the token issued last.
    let (status, _) = f.refresh(&second["refreshToken"]).await;
    assert_eq!(status, 401);
    // Other sessions are untouched.
    let (status, other) = f.login("refresh@exemple.fr", PASSWORD).await;
    assert_eq!(status, 200);
    assert_eq!(f.refresh(&other["tokens"]["refreshToken"]).await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn logout_ends_the_session() {
    let f = fixture().await;
    let tokens = f.active_user("logout@exemple.fr").await;
    let (status, reply) = f.post("/api/v1/auth:logout", json!({ "refreshToken": tokens["refreshToken"] })).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["revokedSessionCount"], 1);
    assert_eq!(f.refresh(&tokens["refreshToken"]).await.0, 401);
}
