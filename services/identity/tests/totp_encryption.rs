//! TOTP secrets are encrypted at rest (AES-256-GCM, bound to the account,
//! with a key id): what the database holds is not the secret, a value copied
//! onto another account does not open, keys rotate, clear values left by the
//! migration are encrypted at start-up, and without a key enrolment is
//! refused.

use std::sync::Arc;

use base64::Engine;
use diesel::{
    QueryableByName,
    sql_types::{Nullable, Text, Uuid as SqlUuid},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use reqwest::Method;
use serde_json::{Value, json};
use socle_config::{SecretRef, SecretString};
use socle_identity::{
    totp,
    totp_keys::{Resealed, TotpKey, TotpKeys, seal_at_rest},
};
use socle_testkit::{
    RunningEdge, RunningService, Service, TestDatabase, respawn_service_with,
    secure::{SecurePlatform, TEST_PASSWORD},
    spawn_edge, spawn_service_on,
};
use uuid::Uuid;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn code_now(secret: &[u8]) -> String {
    totp::code(secret, totp::step_of(chrono::Utc::now().timestamp()))
}

fn key_of(secret: &SecretString) -> TotpKey {
    TotpKey::from_base64(secret).unwrap()
}

fn keys(current: &SecretString, previous: &[&SecretString]) -> Arc<TotpKeys> {
    Arc::new(TotpKeys::new(Some(key_of(current)), previous.iter().map(|k| key_of(k)).collect()).unwrap())
}

fn expose(secret: &SecretString) -> String {
    socle_config::ExposeSecret::expose_secret(secret).to_owned()
}

fn locator(key: &str) -> SecretRef {
    SecretRef::parse(&format!("file:{key}")).unwrap()
}

/// What the database holds for a user's TOTP secrets.
#[derive(QueryableByName, Debug, Clone, PartialEq)]
struct Stored {
    #[diesel(sql_type = Nullable<Text>)]
    totp_secret: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    totp_pending_secret: Option<String>,
}

async fn stored(database: &TestDatabase, user: Uuid) -> Stored {
    let mut conn = socle_db::admin::connect(&database.owner_url).await.unwrap();
    diesel::sql_query("SELECT totp_secret, totp_pending_secret FROM users WHERE id = $1")
        .bind::<SqlUuid, _>(user)
        .get_result(&mut conn)
        .await
        .unwrap()
}

async fn write(conn: &mut AsyncPgConnection, user: Uuid, secret: Option<&str>, pending: Option<&str>) {
    diesel::sql_query(
        "UPDATE users SET totp_secret = $2, totp_pending_secret = $3,
                totp_pending_expire_time = CASE WHEN $3 IS NULL THEN NULL ELSE now() + interval '10 minutes' END
          WHERE id = $1",
    )
    .bind::<SqlUuid, _>(user)
    .bind::<Nullable<Text>, _>(secret)
    .bind::<Nullable<Text>, _>(pending)
    .execute(conn)
    .await
    .unwrap();
}

/// `v1:<kid>:…` → the kid.
fn kid(value: &str) -> &str {
    let rest = value.strip_prefix("v1:").unwrap_or_else(|| panic!("not sealed: {value}"));
    rest.split_once(':').unwrap().0
}

/// The stored value reveals nothing of `secret`, in any encoding the API or
/// the migration uses.
fn assert_hides(value: &str, secret: &[u8]) {
    let base64 = base64::engine::general_purpose::STANDARD.encode(secret);
    for form in [totp::base32(secret), hex(secret), base64] {
        assert!(!value.contains(&form), "{value} holds {form}");
    }
}

async fn login(p: &SecurePlatform, body: Value) -> (u16, Value) {
    p.call(None, Method::POST, "/api/v1/auth:login", None, Some(body)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_are_sealed_for_their_account_under_the_current_key_and_earlier_keys_still_open() {
    let old = TotpKey::generate_base64();
    let old_kid = key_of(&old).kid().to_owned();
    let p = SecurePlatform::start_with(&[("old_totp_key", expose(&old))], |c| {
        c.auth.previous_totp_encryption_keys = vec![locator("old_totp_key")];
    })
    .await
    .unwrap();
    let database = &p.services[&Service::Identity].database;
    let (alice, token) = p.user_with_password("alice@socle.test", &p.root).await.unwrap();
    let t = Some(token.as_str());

    // Enrolment: the pending secret is sealed under the current key.
    let (status, enrolled) = p
        .call(t, Method::POST, "/api/v1/me/totp:enroll", None, Some(json!({ "currentPassword": TEST_PASSWORD })))
        .await
        .unwrap();
    assert_eq!(status, 200, "{enrolled}");
    let secret = socle_identity::totp::base32_decode(enrolled["secret"].as_str().unwrap()).expect("base32");
    let pending = stored(database, alice).await.totp_pending_secret.expect("pending secret");
    assert_hides(&pending, &secret);
    let current_kid = kid(&pending).to_owned();
    assert_ne!(current_kid, old_kid, "new values use the current key, not the previous one");

    let (status, confirmed) = p
        .call(t, Method::POST, "/api/v1/me/totp:confirm", None, Some(json!({ "code": code_now(&secret) })))
        .await
        .unwrap();
    assert_eq!(status, 200, "{confirmed}");
    let after = stored(database, alice).await;
    assert_eq!(after.totp_pending_secret, None);
    let active = after.totp_secret.expect("active secret");
    assert_hides(&active, &secret);
    assert_eq!(kid(&active), current_kid);

    // Sign-in with the second factor, end to end.
    let (status, first) = login(&p, json!({ "email": "alice@socle.test", "password": TEST_PASSWORD })).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["status"], "LOGIN_STATUS_SECOND_FACTOR_REQUIRED");
    let next = totp::code(&secret, totp::step_of(chrono::Utc::now().timestamp()) + 1);
    let (status, signed_in) = login(&p, json!({ "challengeToken": first["challengeToken"], "totpCode": next })).await;
    assert_eq!(status, 200, "{signed_in}");
    assert_eq!(signed_in["status"], "LOGIN_STATUS_SUCCEEDED");

    let mut conn = socle_db::admin::connect(&database.owner_url).await.unwrap();
    // A secret sealed under the previous key (an instance not yet restarted
    // after a rotation wrote it) still verifies.
    let (bruno, _) = p.user_with_password("bruno@socle.test", &p.root).await.unwrap();
    let bruno_secret = totp::new_secret();
    let old_keys = keys(&old, &[]);
    write(&mut conn, bruno, Some(&old_keys.seal(bruno, &bruno_secret).unwrap()), None).await;
    let (status, body) = login(
        &p,
        json!({ "email": "bruno@socle.test", "password": TEST_PASSWORD, "totpCode": code_now(&bruno_secret) }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "LOGIN_STATUS_SUCCEEDED");

    // Alice's ciphertext copied onto Carole's account does not decrypt:
    // Alice's codes do not open Carole's account.
    let (carole, _) = p.user_with_password("carole@socle.test", &p.root).await.unwrap();
    write(&mut conn, carole, Some(&active), None).await;
    let (status, body) =
        login(&p, json!({ "email": "carole@socle.test", "password": TEST_PASSWORD, "totpCode": code_now(&secret) }))
            .await;
    assert_eq!(status, 500, "{body}");
    assert!(body.get("tokens").is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_key_identity_starts_but_refuses_to_enrol() {
    let p = SecurePlatform::start_with(&[], |c| c.auth.totp_encryption_key = None).await.unwrap();
    let (user, token) = p.user_with_password("nokey@socle.test", &p.root).await.unwrap();
    let (status, body) = p
        .call(
            Some(&token),
            Method::POST,
            "/api/v1/me/totp:enroll",
            None,
            Some(json!({ "currentPassword": TEST_PASSWORD })),
        )
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "FAILED_PRECONDITION", "{body}");
    assert!(body["detail"].as_str().unwrap().contains("auth.totp_encryption_key"), "{body}");
    let database = &p.services[&Service::Identity].database;
    assert_eq!(stored(database, user).await, Stored { totp_secret: None, totp_pending_secret: None });
    // Everything else works.
    let (status, body) = login(&p, json!({ "email": "nokey@socle.test", "password": TEST_PASSWORD })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "LOGIN_STATUS_SUCCEEDED");
}

const ENTITY: &str = "6f1f2a0f-0a11-4c8e-9d43-8b7d7d0e4b1a";

/// An active user created through the edge (declared mode).
async fn active_user(http: &reqwest::Client, edge: &RunningEdge, email: &str) -> Uuid {
    let post = |path: &str, body: Value| {
        let request = http.post(format!("{}{path}", edge.url())).json(&body);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    let (status, invited) = post(
        "/api/v1/users",
        json!({ "requestId": Uuid::new_v4().to_string(), "user": { "email": email, "entityId": ENTITY, "displayName": email },
                "invitationDelivery": "INVITATION_DELIVERY_RETURN_LINK" }),
    )
    .await;
    assert_eq!(status, 200, "{invited}");
    let token = invited["invitationUrl"].as_str().unwrap().split("#token=").nth(1).unwrap().to_owned();
    let (status, accepted) =
        post("/api/v1/auth:acceptInvitation", json!({ "invitationToken": token, "password": TEST_PASSWORD })).await;
    assert_eq!(status, 200, "{accepted}");
    Uuid::parse_str(invited["user"]["id"].as_str().unwrap()).unwrap()
}

async fn login_with_code(http: &reqwest::Client, edge: &RunningEdge, email: &str, secret: &[u8]) -> (u16, Value) {
    let response = http
        .post(format!("{}/api/v1/auth:login", edge.url()))
        .json(&json!({ "email": email, "password": TEST_PASSWORD, "totpCode": code_now(secret) }))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn clear_leftovers_and_earlier_keys_are_encrypted_at_start_up_once() {
    let (old, new) = (TotpKey::generate_base64(), TotpKey::generate_base64());
    let new_kid = key_of(&new).kid().to_owned();
    let secrets = [("old_totp_key", expose(&old)), ("new_totp_key", expose(&new))];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let identity: RunningService = spawn_service_on(Service::Identity, listener, &secrets, |c| {
        c.auth.totp_encryption_key = Some(locator("old_totp_key"));
    })
    .await
    .unwrap();
    let mut config = socle_edge::EdgeConfig::default();
    config.upstreams.insert("socle.identity.v1".into(), identity.url());
    let edge = spawn_edge(&socle_edge::default_pool(), config).await.unwrap();
    let http = reqwest::Client::new();
    let leftover = active_user(&http, &edge, "leftover@socle.test").await;
    let earlier = active_user(&http, &edge, "earlier@socle.test").await;

    // What the migration leaves (`clear:<hex>`), and a value of the old key.
    let (leftover_secret, leftover_pending, earlier_secret) =
        (totp::new_secret(), totp::new_secret(), totp::new_secret());
    let database = identity.database.clone();
    let mut conn = socle_db::admin::connect(&database.owner_url).await.unwrap();
    let clear = format!("clear:{}", hex(&leftover_secret));
    let clear_pending = format!("clear:{}", hex(&leftover_pending));
    write(&mut conn, leftover, Some(&clear), Some(&clear_pending)).await;
    write(&mut conn, earlier, Some(&keys(&old, &[]).seal(earlier, &earlier_secret).unwrap()), None).await;
    assert_eq!(login_with_code(&http, &edge, "leftover@socle.test", &leftover_secret).await.0, 200);

    // Rotation: the new key becomes current, the old one previous.
    let rotate = |c: &mut socle_server::ServiceConfig| {
        c.auth.totp_encryption_key = Some(locator("new_totp_key"));
        c.auth.previous_totp_encryption_keys = vec![locator("old_totp_key")];
    };
    let stopped = identity.stop_for_restart().await.unwrap();
    let identity = respawn_service_with(stopped, &secrets, rotate).await.unwrap();

    let after = stored(&database, leftover).await;
    let (active, pending) = (after.totp_secret.clone().unwrap(), after.totp_pending_secret.clone().unwrap());
    assert_eq!((kid(&active), kid(&pending)), (new_kid.as_str(), new_kid.as_str()));
    assert_hides(&active, &leftover_secret);
    assert_hides(&pending, &leftover_pending);
    let rotated = stored(&database, earlier).await.totp_secret.unwrap();
    assert_eq!(kid(&rotated), new_kid, "values of the previous key are sealed again under the current one");
    let current = keys(&new, &[]);
    assert_eq!(current.open(leftover, &active).unwrap(), leftover_secret);
    assert_eq!(current.open(leftover, &pending).unwrap(), leftover_pending);
    assert_eq!(current.open(earlier, &rotated).unwrap(), earlier_secret);
    let (status, body) = login_with_code(&http, &edge, "earlier@socle.test", &earlier_secret).await;
    assert_eq!(status, 200, "{body}");
    let next = totp::code(&leftover_secret, totp::step_of(chrono::Utc::now().timestamp()) + 1);
    let response = http
        .post(format!("{}/api/v1/auth:login", edge.url()))
        .json(&json!({ "email": "leftover@socle.test", "password": TEST_PASSWORD, "totpCode": next }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200, "the encrypted leftover still verifies");

    // Idempotent: a second start with the same keys changes nothing.
    let before = (stored(&database, leftover).await, stored(&database, earlier).await);
    let stopped = identity.stop_for_restart().await.unwrap();
    let _identity = respawn_service_with(stopped, &secrets, rotate).await.unwrap();
    assert_eq!((stored(&database, leftover).await, stored(&database, earlier).await), before);

    // The start-up pass itself, with its counts: a new leftover is
    // encrypted once; a value no configured key opens is left as it is.
    let stray = active_user(&http, &edge, "stray@socle.test").await;
    let foreign = keys(&TotpKey::generate_base64(), &[]).seal(stray, b"12345678901234567890").unwrap();
    write(&mut conn, stray, Some(&foreign), Some(&format!("clear:{}", hex(&leftover_secret)))).await;
    let app = socle_db::Database::connect(
        &SecretString::from(database.app_url_with_password()),
        2,
        std::time::Duration::from_secs(5),
    )
    .await
    .unwrap();
    let keys = keys(&new, &[&old]);
    assert_eq!(
        seal_at_rest(&app, keys.clone()).await.unwrap(),
        Resealed { encrypted: 1, unreadable: 1, ..Default::default() }
    );
    assert_eq!(seal_at_rest(&app, keys.clone()).await.unwrap(), Resealed { unreadable: 1, ..Default::default() });
    let stray_after = stored(&database, stray).await;
    assert_eq!(stray_after.totp_secret.as_deref(), Some(foreign.as_str()));
    assert_eq!(kid(stray_after.totp_pending_secret.as_deref().unwrap()), new_kid);
    // Without a key nothing is written, and clear values are counted.
    write(&mut conn, stray, None, Some(&format!("clear:{}", hex(&leftover_secret)))).await;
    assert_eq!(
        seal_at_rest(&app, Arc::new(TotpKeys::default())).await.unwrap(),
        Resealed { left_clear: 1, unreadable: 3, ..Default::default() }
    );
    assert!(stored(&database, stray).await.totp_pending_secret.unwrap().starts_with("clear:"));
}
