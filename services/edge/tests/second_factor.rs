//! The TOTP second factor through the edge, with real tokens.

use reqwest::Method;
use serde_json::{Value, json};
use socle_testkit::secure::{SecurePlatform, TEST_PASSWORD};

fn code_at(secret: &[u8], offset_steps: i64) -> String {
    let step = socle_identity::totp::step_of(chrono::Utc::now().timestamp()) + offset_steps;
    socle_identity::totp::code(secret, step)
}

async fn login(p: &SecurePlatform, body: Value) -> (u16, Value) {
    p.call(None, Method::POST, "/api/v1/auth:login", None, Some(body)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_factor_is_enrolled_confirmed_and_then_required() {
    let p = SecurePlatform::start().await.unwrap();
    let (_, token) = p.user_with_password("totp@socle.test", &p.root).await.unwrap();
    let t = Some(token.as_str());

    let (status, _) = p
        .call(t, Method::POST, "/api/v1/me/totp:enroll", None, Some(json!({ "currentPassword": "wrong" })))
        .await
        .unwrap();
    assert_eq!(status, 400);
    let (status, enrolled) = p
        .call(t, Method::POST, "/api/v1/me/totp:enroll", None, Some(json!({ "currentPassword": TEST_PASSWORD })))
        .await
        .unwrap();
    assert_eq!(status, 200, "{enrolled}");
    assert!(enrolled["otpauthUri"].as_str().unwrap().starts_with("otpauth://totp/Socle:totp@socle.test?secret="));
    let secret = socle_identity::totp::base32_decode(enrolled["secret"].as_str().unwrap()).expect("base32");

    let (status, _) =
        p.call(t, Method::POST, "/api/v1/me/totp:confirm", None, Some(json!({ "code": "000000" }))).await.unwrap();
    assert_eq!(status, 400, "a wrong first code does not enable the factor");
    let (status, confirmed) = p
        .call(t, Method::POST, "/api/v1/me/totp:confirm", None, Some(json!({ "code": code_at(&secret, 0) })))
        .await
        .unwrap();
    assert_eq!(status, 200, "{confirmed}");
    let recovery: Vec<String> =
        confirmed["recoveryCodes"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_owned()).collect();
    assert_eq!(recovery.len(), 8);

    // The password alone now opens a challenge, not a session.
    let password_only = json!({ "email": "totp@socle.test", "password": TEST_PASSWORD });
    let (status, first) = login(&p, password_only.clone()).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["status"], "LOGIN_STATUS_SECOND_FACTOR_REQUIRED");
    assert!(first.get("tokens").is_none());
    let challenge = first["challengeToken"].clone();
    let (status, _) = login(&p, json!({ "challengeToken": challenge, "totpCode": "123456" })).await;
    assert_eq!(status, 401);
    // The confirmation used the current step: the next one is accepted, once.
    let (status, second) = login(&p, json!({ "challengeToken": challenge, "totpCode": code_at(&secret, 1) })).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["status"], "LOGIN_STATUS_SUCCEEDED");
    let (status, _) = login(&p, json!({ "challengeToken": challenge, "totpCode": code_at(&secret, 1) })).await;
    assert_eq!(status, 401, "a challenge is used once");

    // A recovery code works once.
    let (_, again) = login(&p, password_only.clone()).await;
    let (status, recovered) =
        login(&p, json!({ "challengeToken": again["challengeToken"], "totpCode": recovery[0] })).await;
    assert_eq!(status, 200, "{recovered}");
    let (_, third) = login(&p, password_only).await;
    let (status, _) = login(&p, json!({ "challengeToken": third["challengeToken"], "totpCode": recovery[0] })).await;
    assert_eq!(status, 401, "a recovery code is used once");

    let (_, me) = p.call(t, Method::GET, "/api/v1/me", Some(&p.root), None).await.unwrap();
    assert_eq!(me["user"]["totpEnabled"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_codes_count_toward_the_sign_in_locks_across_challenges() {
    let p = SecurePlatform::start().await.unwrap();
    let (_, token) = p.user_with_password("guessed@socle.test", &p.root).await.unwrap();
    let t = Some(token.as_str());
    let (_, enrolled) = p
        .call(t, Method::POST, "/api/v1/me/totp:enroll", None, Some(json!({ "currentPassword": TEST_PASSWORD })))
        .await
        .unwrap();
    let secret = socle_identity::totp::base32_decode(enrolled["secret"].as_str().unwrap()).expect("base32");
    let (status, _) = p
        .call(t, Method::POST, "/api/v1/me/totp:confirm", None, Some(json!({ "code": code_at(&secret, 0) })))
        .await
        .unwrap();
    assert_eq!(status, 200);

    // Someone who knows the password guesses codes, one fresh challenge each time.
    let password = json!({ "email": "guessed@socle.test", "password": TEST_PASSWORD });
    let mut last = 0;
    for _ in 0..6 {
        let (status, opened) = login(&p, password.clone()).await;
        if status != 200 {
            last = status;
            break;
        }
        last = login(&p, json!({ "challengeToken": opened["challengeToken"], "totpCode": "000000" })).await.0;
        if last == 429 {
            break;
        }
    }
    assert_eq!(last, 429, "the guesses lock the account from this address");
}
