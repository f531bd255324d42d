//! Account administration and credentials with real tokens, through the
//! edge: listing accounts, profile updates, deletion (grants included),
//! second-factor resets, password changes and resets by e-mail.

use diesel::{QueryableByName, sql_types::BigInt};
use diesel_async::RunQueryDsl;
use reqwest::Method;
use serde_json::{Value, json};
use socle_testkit::{
    Service,
    secure::{SecurePlatform, TEST_PASSWORD},
};
use uuid::Uuid;

struct World {
    p: SecurePlatform,
    region: String,
    branch_a: String,
    branch_b: String,
    roles: Value,
}

async fn create_entity(p: &SecurePlatform, parent: &str, kind: &str, code: &str) -> String {
    p.create_entity(parent, kind, code).await.unwrap()
}

/// Percent-encodes a query parameter value.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl World {
    async fn new() -> World {
        let p = SecurePlatform::start().await.expect("secured platform");
        let root = p.root.clone();
        let region = create_entity(&p, &root, "ENTITY_KIND_REGION", "REGION").await;
        let branch_a = create_entity(&p, &region, "ENTITY_KIND_BRANCH", "BRANCH-A").await;
        let branch_b = create_entity(&p, &region, "ENTITY_KIND_BRANCH", "BRANCH-B").await;
        let (status, roles) =
            p.call(Some(&p.admin_token), Method::GET, "/api/v1/roles?pageSize=500", Some(&root), None).await.unwrap();
        assert_eq!(status, 200, "{roles}");
        World { p, region, branch_a, branch_b, roles }
    }

    fn role(&self, name: &str) -> String {
        self.roles["roles"].as_array().unwrap().iter().find(|r| r["name"] == name).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn grant(&self, user: Uuid, role: &str, entity: &str, scope: &str) {
        let (status, body) = self
            .admin(
                Method::POST,
                "/api/v1/grants",
                Some(json!({ "requestId": Uuid::new_v4().to_string(),
                             "grant": { "principal": { "kind": "ACTOR_KIND_USER", "id": user.to_string() },
                                        "roleId": self.role(role), "entityId": entity, "scope": scope } })),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }

    /// A call as the national administrator, acting for the root.
    async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        self.p.call(Some(&self.p.admin_token), method, path, Some(&self.p.root), body).await.unwrap()
    }

    async fn as_user(
        &self,
        token: &str,
        method: Method,
        path: &str,
        entity: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.p.call(Some(token), method, path, Some(entity), body).await.unwrap()
    }

    async fn login(&self, email: &str, password: &str) -> (u16, Value) {
        self.p
            .call(None, Method::POST, "/api/v1/auth:login", None, Some(json!({ "email": email, "password": password })))
            .await
            .unwrap()
    }

    async fn refresh(&self, token: &Value) -> u16 {
        self.p
            .call(None, Method::POST, "/api/v1/auth:refresh", None, Some(json!({ "refreshToken": token })))
            .await
            .unwrap()
            .0
    }

    /// Creates an invited account through the API.
    async fn invite(&self, email: &str, entity: &str, given: &str, family: &str) -> Value {
        let (status, body) = self
            .admin(
                Method::POST,
                "/api/v1/users",
                Some(json!({ "requestId": Uuid::new_v4().to_string(),
                             "user": { "email": email, "entityId": entity, "givenName": given, "familyName": family },
                             "invitationDelivery": "INVITATION_DELIVERY_RETURN_LINK" })),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body["user"].clone()
    }
}

fn emails(list: &Value) -> Vec<String> {
    list["users"]
        .as_array()
        .map(|u| u.iter().map(|u| u["email"].as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn accounts_are_listed_by_entity_subtree_state_and_text_in_pages() {
    let w = World::new().await;
    w.p.user_with_password("alice.a@socle.test", &w.branch_a).await.unwrap();
    w.invite("elodie.a@socle.test", &w.branch_a, "Élodie", "Lefèvre").await;
    w.invite("bruno.b@socle.test", &w.branch_b, "Bruno", "Martin").await;
    w.invite("regine.r@socle.test", &w.region, "Régine", "Durand").await;

    let (status, a) = w.admin(Method::GET, &format!("/api/v1/users?entityId={}", w.branch_a), None).await;
    assert_eq!(status, 200, "{a}");
    let mut found = emails(&a);
    found.sort();
    assert_eq!(found, ["alice.a@socle.test", "elodie.a@socle.test"]);

    // The subtree, for a caller who may read everything.
    let (_, all) =
        w.admin(Method::GET, &format!("/api/v1/users?entityId={}&includeDescendants=true", w.region), None).await;
    let mut found = emails(&all);
    found.sort();
    assert_eq!(found, ["alice.a@socle.test", "bruno.b@socle.test", "elodie.a@socle.test", "regine.r@socle.test"]);

    // A reader of the region and of branch A only does not see branch B's accounts.
    let (reader, reader_token) = w.p.user_with_password("reader@socle.test", &w.p.root).await.unwrap();
    w.grant(reader, "viewer", &w.region, "GRANT_SCOPE_ENTITY_ONLY").await;
    w.grant(reader, "viewer", &w.branch_a, "GRANT_SCOPE_SUBTREE").await;
    let (status, partial) = w
        .as_user(
            &reader_token,
            Method::GET,
            &format!("/api/v1/users?entityId={}&includeDescendants=true", w.region),
            &w.region,
            None,
        )
        .await;
    assert_eq!(status, 200, "{partial}");
    let mut found = emails(&partial);
    found.sort();
    assert_eq!(found, ["alice.a@socle.test", "elodie.a@socle.test", "regine.r@socle.test"]);
    let (status, _) =
        w.as_user(&reader_token, Method::GET, &format!("/api/v1/users?entityId={}", w.branch_b), &w.region, None).await;
    assert_eq!(status, 403, "branch B itself is refused by the layer");

    // States, and text without case or accents.
    let (_, invited) = w
        .admin(
            Method::GET,
            &format!("/api/v1/users?entityId={}&includeDescendants=true&states=USER_STATE_INVITED", w.region),
            None,
        )
        .await;
    assert_eq!(emails(&invited).len(), 3, "{invited}");
    for query in ["lefevre", "ÉLODIE", "elodie.a@"] {
        let (_, hit) =
            w.admin(Method::GET, &format!("/api/v1/users?entityId={}&query={}", w.branch_a, encode(query)), None).await;
        assert_eq!(emails(&hit), ["elodie.a@socle.test"], "{query}");
    }

    // Pages in e-mail order, the token bound to its filters.
    let base = format!("/api/v1/users?entityId={}&includeDescendants=true&orderBy=email&pageSize=1", w.region);
    let (mut seen, mut token) = (Vec::new(), String::new());
    loop {
        let path = if token.is_empty() { base.clone() } else { format!("{base}&pageToken={}", encode(&token)) };
        let (status, page) = w.admin(Method::GET, &path, None).await;
        assert_eq!(status, 200, "{page}");
        seen.extend(emails(&page));
        token = page["nextPageToken"].as_str().unwrap_or_default().to_owned();
        if token.is_empty() {
            break;
        }
        let (status, _) = w
            .admin(
                Method::GET,
                &format!("/api/v1/users?entityId={}&orderBy=email&pageSize=1&pageToken={}", w.region, encode(&token)),
                None,
            )
            .await;
        assert_eq!(status, 400, "a token is refused with other filters");
    }
    assert_eq!(
        seen,
        ["alice.a@socle.test", "bruno.b@socle.test", "elodie.a@socle.test", "regine.r@socle.test"],
        "each once, in order"
    );
    let (_, by_name) =
        w.admin(Method::GET, &format!("/api/v1/users?entityId={}&includeDescendants=true", w.region), None).await;
    // By family name (Alice, invited by the bootstrap path, has none), accents folded.
    assert_eq!(
        emails(&by_name),
        ["alice.a@socle.test", "regine.r@socle.test", "elodie.a@socle.test", "bruno.b@socle.test"]
    );
    let (status, _) =
        w.admin(Method::GET, &format!("/api/v1/users?entityId={}&orderBy=shoe_size", w.region), None).await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread")]
async fn profiles_change_under_the_current_etag_and_moves_need_both_entities() {
    let w = World::new().await;
    let (staff, staff_token) = w.p.user_with_password("staff.update@socle.test", &w.branch_a).await.unwrap();
    w.grant(staff, "staff", &w.branch_a, "GRANT_SCOPE_SUBTREE").await;
    let (admin_b, admin_b_token) = w.p.user_with_password("admin.b@socle.test", &w.branch_b).await.unwrap();
    w.grant(admin_b, "entity_admin", &w.branch_b, "GRANT_SCOPE_SUBTREE").await;
    let path = format!("/api/v1/users/{staff}");
    let (_, current) = w.admin(Method::GET, &path, None).await;
    let etag = current["user"]["etag"].clone();

    let patch = |mask: &str, user: Value, etag: &Value| json!({ "user": user, "updateMask": mask, "etag": etag });
    let (status, updated) = w
        .admin(
            Method::PATCH,
            &path,
            Some(patch(
                "givenName,familyName,displayName",
                json!({ "givenName": "Anaïs", "familyName": "Roux" }),
                &etag,
            )),
        )
        .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["user"]["displayName"], "Anaïs Roux", "an empty display name defaults to the names");
    let (status, _) = w.admin(Method::PATCH, &path, Some(patch("givenName", json!({ "givenName": "X" }), &etag))).await;
    assert_eq!(status, 412, "a stale etag is refused");
    let etag = updated["user"]["etag"].clone();

    let (status, problem) =
        w.admin(Method::PATCH, &path, Some(patch("email", json!({ "email": " ADMIN.B@socle.test " }), &etag))).await;
    assert_eq!(status, 409, "{problem}");
    assert_eq!(problem["violations"][0]["field"], "user.email");
    let (status, _) = w.admin(Method::PATCH, &path, Some(patch("state", json!({}), &etag))).await;
    assert_eq!(status, 400, "only the fields of the contract");
    let (status, problem) = w
        .admin(Method::PATCH, &path, Some(patch("defaultEntityId", json!({ "defaultEntityId": w.branch_b }), &etag)))
        .await;
    assert_eq!(status, 400, "no grant on branch B: {problem}");
    assert_eq!(problem["violations"][0]["field"], "user.defaultEntityId");
    let (status, ok) = w
        .admin(Method::PATCH, &path, Some(patch("defaultEntityId", json!({ "defaultEntityId": w.branch_a }), &etag)))
        .await;
    assert_eq!(status, 200, "{ok}");
    let etag = ok["user"]["etag"].clone();

    // Branch B's administrator can neither see the account nor take it.
    let b = &w.branch_b;
    let take = patch("entityId", json!({ "entityId": b }), &etag);
    assert_eq!(w.as_user(&admin_b_token, Method::PATCH, &path, b, Some(take.clone())).await.0, 404);
    // A user of B moved to A by B's administrator: managing A is needed too.
    let (mover, _) = w.p.user_with_password("mover@socle.test", b).await.unwrap();
    let mover_path = format!("/api/v1/users/{mover}");
    let (_, m) = w.as_user(&admin_b_token, Method::GET, &mover_path, b, None).await;
    let (status, problem) = w
        .as_user(
            &admin_b_token,
            Method::PATCH,
            &mover_path,
            b,
            Some(patch("entityId", json!({ "entityId": w.branch_a }), &m["user"]["etag"])),
        )
        .await;
    assert_eq!(status, 400, "{problem}");
    assert_eq!(problem["violations"][0]["field"], "user.entityId");
    let (status, moved) = w
        .admin(
            Method::PATCH,
            &mover_path,
            Some(patch("entityId", json!({ "entityId": w.branch_a }), &m["user"]["etag"])),
        )
        .await;
    assert_eq!(status, 200, "{moved}");
    assert_eq!(moved["user"]["entityId"], w.branch_a.as_str());
    assert_eq!(w.as_user(&admin_b_token, Method::GET, &mover_path, b, None).await.0, 404, "no longer B's");

    // People change their own profile, not their e-mail.
    let (_, me) = w.p.call(Some(&staff_token), Method::GET, "/api/v1/me", None, None).await.unwrap();
    let (status, mine) =
        w.p.call(
            Some(&staff_token),
            Method::PATCH,
            "/api/v1/me",
            None,
            Some(patch(
                "displayName,locale",
                json!({ "displayName": "Anaïs R.", "locale": "en-GB" }),
                &me["user"]["etag"],
            )),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{mine}");
    assert_eq!(
        (mine["user"]["displayName"].as_str(), mine["user"]["locale"].as_str()),
        (Some("Anaïs R."), Some("en-GB"))
    );
    let (status, _) =
        w.p.call(
            Some(&staff_token),
            Method::PATCH,
            "/api/v1/me",
            None,
            Some(patch("email", json!({ "email": "other@socle.test" }), &mine["user"]["etag"])),
        )
        .await
        .unwrap();
    assert_eq!(status, 400);
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_user_removes_grants_sessions_and_personal_data() {
    let w = World::new().await;
    let email = "leaving@socle.test";
    let (leaving, _) = w.p.user_with_password(email, &w.branch_a).await.unwrap();
    w.grant(leaving, "staff", &w.branch_a, "GRANT_SCOPE_SUBTREE").await;
    w.grant(leaving, "viewer", &w.branch_b, "GRANT_SCOPE_ENTITY_ONLY").await;
    let (admin_b, admin_b_token) = w.p.user_with_password("admin.b.del@socle.test", &w.branch_b).await.unwrap();
    w.grant(admin_b, "entity_admin", &w.branch_b, "GRANT_SCOPE_SUBTREE").await;
    let (status, session) = w.login(email, TEST_PASSWORD).await;
    assert_eq!(status, 200, "{session}");
    let access = session["tokens"]["accessToken"].as_str().unwrap().to_owned();
    assert_eq!(w.login(email, "not the password at all").await.0, 401, "sign-in counters hold the e-mail");
    let path = format!("/api/v1/users/{leaving}");
    let grants = format!("/api/v1/grants?principalId={leaving}");
    assert_eq!(w.admin(Method::GET, &grants, None).await.1["grants"].as_array().unwrap().len(), 2);

    // Another branch's administrator: not found, nothing touched.
    assert_eq!(w.as_user(&admin_b_token, Method::DELETE, &path, &w.branch_b, None).await.0, 404);
    assert_eq!(w.admin(Method::GET, &grants, None).await.1["grants"].as_array().unwrap().len(), 2);
    // Removing someone's grants wholesale is for identity's service account only.
    let (status, _) = w
        .admin(
            Method::POST,
            "/api/v1/grants:deletePrincipalGrants",
            Some(json!({ "principal": { "kind": "ACTOR_KIND_USER", "id": leaving.to_string() } })),
        )
        .await;
    assert_eq!(status, 403);

    let (status, deleted) = w.admin(Method::DELETE, &path, None).await;
    assert_eq!(status, 200, "{deleted}");
    let mut conn =
        socle_db::admin::connect(&w.p.services[&Service::Identity].database.owner_url).await.expect("identity db");
    let remaining: Count = diesel::sql_query(
        "SELECT (SELECT count(*) FROM users WHERE email_normalized = $1)
              + (SELECT count(*) FROM sessions WHERE user_id = $2)
              + (SELECT count(*) FROM login_throttle WHERE key LIKE '%' || $1 || '%') AS n",
    )
    .bind::<diesel::sql_types::Text, _>(email)
    .bind::<diesel::sql_types::Uuid, _>(leaving)
    .get_result(&mut conn)
    .await
    .unwrap();
    assert_eq!(remaining.n, 0, "no personal data is left");
    let (_, left) = w.admin(Method::GET, &grants, None).await;
    assert!(left["grants"].as_array().is_none_or(|g| g.is_empty()), "{left}");
    assert_eq!(w.refresh(&session["tokens"]["refreshToken"]).await, 401);
    assert_eq!(w.login(email, TEST_PASSWORD).await.0, 401);
    let (status, _) =
        w.p.call(Some(&access), Method::GET, &format!("/api/v1/entities/{}", w.branch_a), None, None).await.unwrap();
    assert_eq!(status, 403, "the access token still verifies but gives nothing");
    assert_eq!(w.admin(Method::GET, &path, None).await.0, 404);
    assert_eq!(w.admin(Method::DELETE, &path, None).await.0, 404, "already gone");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_administrator_resets_a_lost_second_factor_and_ends_the_sessions() {
    let w = World::new().await;
    let email = "lost.phone@socle.test";
    let (user, token) = w.p.user_with_password(email, &w.branch_a).await.unwrap();
    let t = Some(token.as_str());
    let (_, enrolled) =
        w.p.call(t, Method::POST, "/api/v1/me/totp:enroll", None, Some(json!({ "currentPassword": TEST_PASSWORD })))
            .await
            .unwrap();
    let secret = socle_identity::totp::base32_decode(enrolled["secret"].as_str().unwrap()).expect("base32");
    let code = socle_identity::totp::code(&secret, socle_identity::totp::step_of(chrono::Utc::now().timestamp()));
    let (status, _) =
        w.p.call(t, Method::POST, "/api/v1/me/totp:confirm", None, Some(json!({ "code": code }))).await.unwrap();
    assert_eq!(status, 200);
    let (_, challenged) = w.login(email, TEST_PASSWORD).await;
    assert_eq!(challenged["status"], "LOGIN_STATUS_SECOND_FACTOR_REQUIRED");

    let path = format!("/api/v1/users/{user}:resetSecondFactor");
    let (status, reset) = w.admin(Method::POST, &path, Some(json!({ "reason": "téléphone perdu" }))).await;
    assert_eq!(status, 200, "{reset}");
    assert!(reset["user"]["totpEnabled"].as_bool() != Some(true), "{reset}");
    let (_, sessions) = w.admin(Method::GET, &format!("/api/v1/users/{user}/sessions"), None).await;
    assert!(sessions["sessions"].as_array().is_none_or(|s| s.is_empty()), "every session ended: {sessions}");
    let (status, signed_in) = w.login(email, TEST_PASSWORD).await;
    assert_eq!(status, 200);
    assert_eq!(signed_in["status"], "LOGIN_STATUS_SUCCEEDED", "the password alone signs in again");
}

#[tokio::test(flavor = "multi_thread")]
async fn changing_the_password_keeps_the_calling_session_and_ends_the_others_on_request() {
    let w = World::new().await;
    let email = "changer@socle.test";
    w.p.user_with_password(email, &w.branch_a).await.unwrap();
    let (_, other) = w.login(email, TEST_PASSWORD).await;
    let (_, current) = w.login(email, TEST_PASSWORD).await;
    let token = current["tokens"]["accessToken"].as_str().unwrap().to_owned();
    let change = |current: &str, new: &str, revoke: bool| json!({ "currentPassword": current, "newPassword": new, "revokeOtherSessions": revoke });
    let call = |body: Value| {
        let token = token.clone();
        let p = &w.p;
        async move { p.call(Some(&token), Method::POST, "/api/v1/me:changePassword", None, Some(body)).await.unwrap() }
    };
    let new_password = "girafe lampadaire confiture bleue";

    let (status, problem) = call(change("not my password at all", new_password, true)).await;
    assert_eq!(status, 400, "{problem}");
    assert_eq!(problem["violations"][0]["field"], "currentPassword");
    let (status, problem) = call(change(TEST_PASSWORD, TEST_PASSWORD, true)).await;
    assert_eq!((status, problem["violations"][0]["field"].as_str()), (400, Some("newPassword")));
    let (status, problem) = call(change(TEST_PASSWORD, "motdepasse2026", true)).await;
    assert_eq!((status, problem["violations"][0]["field"].as_str()), (400, Some("newPassword")));

    let (status, changed) = call(change(TEST_PASSWORD, new_password, true)).await;
    assert_eq!(status, 200, "{changed}");
    assert_eq!(changed["revokedSessionCount"], 2, "the invitation's session and the other login");
    assert_eq!(w.refresh(&other["tokens"]["refreshToken"]).await, 401);
    assert_eq!(w.refresh(&current["tokens"]["refreshToken"]).await, 200, "the calling session stays");
    assert_eq!(w.login(email, TEST_PASSWORD).await.0, 401);
    let (status, _) = w.login(email, new_password).await;
    assert_eq!(status, 200);

    // Without the flag, the other sessions stay.
    let (status, kept) = call(change(new_password, "parapluie orange sous la neige", false)).await;
    assert_eq!(status, 200, "{kept}");
    assert_eq!(kept["revokedSessionCount"].as_i64().unwrap_or(0), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn password_resets_go_by_mail_once_reveal_nothing_and_end_every_session() {
    let w = World::new().await;
    let email = "forgetful@socle.test";
    w.p.user_with_password(email, &w.branch_a).await.unwrap();
    let (_, before) = w.login(email, TEST_PASSWORD).await;
    let request = |address: &str| {
        let p = &w.p;
        let body = json!({ "email": address });
        async move { p.call(None, Method::POST, "/api/v1/auth:requestPasswordReset", None, Some(body)).await.unwrap() }
    };

    let known = request("Forgetful@socle.test").await;
    let unknown = request("nobody.here@socle.test").await;
    assert_eq!(known, unknown, "the same answer whether the account exists or not");
    assert_eq!(known.0, 200);
    assert!(w.p.mails_to("nobody.here@socle.test").is_empty());
    let mails = w.p.mails_to(email);
    assert_eq!(mails.len(), 1);
    assert!(mails[0].contains("Subject: =?UTF-8?B?") && mails[0].contains("Bonjour"), "{}", mails[0]);
    let first = w.p.mailed_token(email, "/password-reset").expect("a reset link");

    // A new request voids the previous link.
    assert_eq!(request(email).await.0, 200);
    let second = w.p.mailed_token(email, "/password-reset").unwrap();
    assert_ne!(first, second);
    let reset = |token: &str, password: &str| {
        let p = &w.p;
        let body = json!({ "resetToken": token, "newPassword": password });
        async move { p.call(None, Method::POST, "/api/v1/auth:resetPassword", None, Some(body)).await.unwrap() }
    };
    let new_password = "hibou fenêtre tartine violette";
    assert_eq!(reset(&first, new_password).await.0, 401, "the first link no longer works");
    let (status, problem) = reset(&second, "azertyuiop123").await;
    assert_eq!((status, problem["violations"][0]["field"].as_str()), (400, Some("newPassword")), "{problem}");
    let (status, done) = reset(&second, new_password).await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(reset(&second, "une autre phrase de passe").await.0, 401, "single use");
    assert_eq!(w.refresh(&before["tokens"]["refreshToken"]).await, 401, "every session ended");
    assert_eq!(w.login(email, TEST_PASSWORD).await.0, 401);
    assert_eq!(w.login(email, new_password).await.0, 200);

    // Requests are throttled, apart from sign-ins.
    let target = "throttled@socle.test";
    w.p.user_with_password(target, &w.branch_a).await.unwrap();
    for _ in 0..5 {
        assert_eq!(request(target).await.0, 200);
    }
    assert_eq!(request(target).await.0, 429);
    assert_eq!(w.login(target, TEST_PASSWORD).await.0, 200, "sign-in is not locked by reset requests");
}

#[tokio::test(flavor = "multi_thread")]
async fn invitations_go_by_mail() {
    let w = World::new().await;
    let (status, created) = w
        .admin(
            Method::POST,
            "/api/v1/users",
            Some(json!({ "requestId": Uuid::new_v4().to_string(),
                         "user": { "email": "Invitee@socle.test", "entityId": w.branch_a, "givenName": "Inès", "familyName": "Caron" },
                         "invitationDelivery": "INVITATION_DELIVERY_EMAIL" })),
        )
        .await;
    assert_eq!(status, 200, "{created}");
    assert!(created["invitationUrl"].as_str().unwrap_or_default().is_empty(), "the link goes to the person only");
    let mail = w.p.mails_to("Invitee@socle.test").pop().expect("an invitation mail");
    assert!(mail.contains("Bonjour Inès Caron") && mail.contains("https://console.socle.test/invitation#token="));
    let token = w.p.mailed_token("Invitee@socle.test", "/invitation").unwrap();
    let (status, accepted) =
        w.p.call(
            None,
            Method::POST,
            "/api/v1/auth:acceptInvitation",
            None,
            Some(json!({ "invitationToken": token, "password": TEST_PASSWORD })),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{accepted}");

    // A reissued invitation by mail: a new link, the previous one void.
    let user = created["user"]["id"].as_str().unwrap();
    let (_, again) = w
        .admin(
            Method::POST,
            "/api/v1/users",
            Some(json!({ "requestId": Uuid::new_v4().to_string(),
                         "user": { "email": "second.invitee@socle.test", "entityId": w.branch_a, "displayName": "Second" } })),
        )
        .await;
    let second = again["user"]["id"].as_str().unwrap();
    let first_link = w.p.mailed_token("second.invitee@socle.test", "/invitation").unwrap();
    let (status, _) = w.admin(Method::POST, &format!("/api/v1/users/{second}:resendInvitation"), Some(json!({}))).await;
    assert_eq!(status, 200);
    assert_eq!(w.p.mails_to("second.invitee@socle.test").len(), 2);
    assert_ne!(w.p.mailed_token("second.invitee@socle.test", "/invitation").unwrap(), first_link);
    let _ = user;
}

#[tokio::test(flavor = "multi_thread")]
async fn service_accounts_are_listed_updated_disabled_and_deleted_with_their_grants() {
    let w = World::new().await;
    let (admin_b, admin_b_token) = w.p.user_with_password("admin.b.sa@socle.test", &w.branch_b).await.unwrap();
    w.grant(admin_b, "entity_admin", &w.branch_b, "GRANT_SCOPE_SUBTREE").await;
    let create = |entity: &str, name: &str, display: &str| {
        json!({ "requestId": Uuid::new_v4().to_string(),
                "serviceAccount": { "entityId": entity, "name": name, "displayName": display } })
    };
    let (status, site) = w
        .admin(Method::POST, "/api/v1/service-accounts", Some(create(&w.branch_a, "site-web-a", "Site Web Élysée")))
        .await;
    assert_eq!(status, 200, "{site}");
    let (_, other) =
        w.admin(Method::POST, "/api/v1/service-accounts", Some(create(&w.branch_b, "import-b", "Import B"))).await;
    let id = site["serviceAccount"]["id"].as_str().unwrap().to_owned();
    let (client_id, secret) = (site["serviceAccount"]["clientId"].clone(), site["clientSecret"].clone());
    let (status, _) = w
        .admin(
            Method::POST,
            "/api/v1/grants",
            Some(json!({ "requestId": Uuid::new_v4().to_string(),
                         "grant": { "principal": { "kind": "ACTOR_KIND_SERVICE_ACCOUNT", "id": id },
                                    "roleId": w.role("viewer"), "entityId": w.branch_a, "scope": "GRANT_SCOPE_SUBTREE" } })),
        )
        .await;
    assert_eq!(status, 200);
    let issue = || {
        let p = &w.p;
        let body = json!({ "clientId": client_id, "clientSecret": secret });
        async move { p.call(None, Method::POST, "/api/v1/service-accounts:issueToken", None, Some(body)).await.unwrap().0 }
    };
    assert_eq!(issue().await, 200);

    // Lists: by entity, subtree, text without accents, pages by name.
    let names = |v: &Value| -> Vec<String> {
        v["serviceAccounts"]
            .as_array()
            .map(|a| a.iter().map(|s| s["name"].as_str().unwrap().to_owned()).collect())
            .unwrap_or_default()
    };
    let (status, listed) =
        w.admin(Method::GET, &format!("/api/v1/service-accounts?entityId={}", w.branch_a), None).await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(names(&listed), ["site-web-a"]);
    let (_, all) = w
        .admin(
            Method::GET,
            &format!("/api/v1/service-accounts?entityId={}&includeDescendants=true&pageSize=1", w.region),
            None,
        )
        .await;
    assert_eq!(names(&all), ["import-b"]);
    let token = all["nextPageToken"].as_str().unwrap();
    let (_, rest) = w
        .admin(
            Method::GET,
            &format!(
                "/api/v1/service-accounts?entityId={}&includeDescendants=true&pageSize=1&pageToken={}",
                w.region,
                encode(token)
            ),
            None,
        )
        .await;
    assert_eq!(names(&rest), ["site-web-a"]);
    let (_, found) = w
        .admin(
            Method::GET,
            &format!("/api/v1/service-accounts?entityId={}&includeDescendants=true&query=elysee", w.region),
            None,
        )
        .await;
    assert_eq!(names(&found), ["site-web-a"]);
    let (_, of_b) = w
        .as_user(
            &admin_b_token,
            Method::GET,
            &format!("/api/v1/service-accounts?entityId={}&includeDescendants=true", w.branch_b),
            &w.branch_b,
            None,
        )
        .await;
    assert_eq!(names(&of_b), ["import-b"]);

    // Updates under the etag; a disabled account gets no token.
    let path = format!("/api/v1/service-accounts/{id}");
    let etag = site["serviceAccount"]["etag"].clone();
    let (status, updated) = w
        .admin(
            Method::PATCH,
            &path,
            Some(json!({ "serviceAccount": { "description": "Formulaire de contact", "disabled": true },
                         "updateMask": "description,disabled", "etag": etag })),
        )
        .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["serviceAccount"]["disabled"], true);
    assert_eq!(issue().await, 401);
    let stale = json!({ "serviceAccount": { "disabled": false }, "updateMask": "disabled", "etag": etag });
    assert_eq!(w.admin(Method::PATCH, &path, Some(stale)).await.0, 412);
    let (_, enabled) = w
        .admin(
            Method::PATCH,
            &path,
            Some(json!({ "serviceAccount": { "disabled": false }, "updateMask": "disabled",
                         "etag": updated["serviceAccount"]["etag"] })),
        )
        .await;
    assert!(!enabled["serviceAccount"]["disabled"].as_bool().unwrap_or(false));
    assert_eq!(issue().await, 200);
    let name_change =
        json!({ "serviceAccount": { "name": "x" }, "updateMask": "name", "etag": enabled["serviceAccount"]["etag"] });
    assert_eq!(w.admin(Method::PATCH, &path, Some(name_change)).await.0, 400);

    // Deletion: another branch's administrator cannot; the account's grants go with it.
    assert_eq!(w.as_user(&admin_b_token, Method::DELETE, &path, &w.branch_b, None).await.0, 404);
    let (status, deleted) = w.admin(Method::DELETE, &path, None).await;
    assert_eq!(status, 200, "{deleted}");
    let (_, grants) = w.admin(Method::GET, &format!("/api/v1/grants?principalId={id}"), None).await;
    assert!(grants["grants"].as_array().is_none_or(|g| g.is_empty()), "{grants}");
    assert_eq!(issue().await, 401);
    assert_eq!(w.admin(Method::GET, &path, None).await.0, 404);
    let _ = other;
}
