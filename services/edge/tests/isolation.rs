//! Multi-entity isolation through the edge, with real tokens and real
//! access decisions: every cell of principal × operation is asserted.

use reqwest::Method;
use serde_json::{Value, json};
use socle_testkit::secure::SecurePlatform;

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

    async fn grant(&self, user: uuid::Uuid, role: &str, entity: &str, scope: &str) {
        let (status, body) = self
            .p
            .call(
                Some(&self.p.admin_token),
                Method::POST,
                "/api/v1/grants",
                None,
                Some(json!({ "requestId": uuid::Uuid::new_v4().to_string(),
                             "grant": { "principal": { "kind": "ACTOR_KIND_USER", "id": user.to_string() },
                                        "roleId": self.role(role), "entityId": entity, "scope": scope } })),
            )
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
    }

    async fn user(&self, email: &str) -> (uuid::Uuid, String) {
        self.p.user_with_password(email, &self.branch_a).await.unwrap()
    }

    /// The five operations on branch A, as HTTP statuses.
    async fn operations(&self, token: Option<&str>) -> [u16; 5] {
        let p = &self.p;
        let a = &self.branch_a;
        let read = p.call(token, Method::GET, &format!("/api/v1/entities/{a}"), None, None).await.unwrap().0;
        let list =
            p.call(token, Method::GET, &format!("/api/v1/entities?rootEntityId={a}"), None, None).await.unwrap().0;
        let (_, current) =
            p.call(Some(&p.admin_token), Method::GET, &format!("/api/v1/entities/{a}"), None, None).await.unwrap();
        let update = p
            .call(
                token,
                Method::PATCH,
                &format!("/api/v1/entities/{a}"),
                None,
                Some(json!({ "entity": { "displayName": format!("A {}", uuid::Uuid::new_v4()) }, "updateMask": "displayName",
                             "etag": current["entity"]["etag"] })),
            )
            .await
            .unwrap()
            .0;
        // "Delete": archive a fresh child of A (entities are archived, never deleted).
        let child = create_entity(
            p,
            a,
            "ENTITY_KIND_BRANCH",
            &format!("C{}", &uuid::Uuid::new_v4().simple().to_string()[..8]).to_uppercase(),
        )
        .await;
        let delete = p
            .call(token, Method::POST, &format!("/api/v1/entities/{child}:archive"), None, Some(json!({})))
            .await
            .unwrap()
            .0;
        let administer = p
            .call(
                token,
                Method::POST,
                "/api/v1/grants",
                None,
                Some(json!({ "requestId": uuid::Uuid::new_v4().to_string(),
                             "grant": { "principal": { "kind": "ACTOR_KIND_USER", "id": uuid::Uuid::new_v4().to_string() },
                                        "roleId": self.role("viewer"), "entityId": a, "scope": "GRANT_SCOPE_ENTITY_ONLY" } })),
            )
            .await
            .unwrap()
            .0;
        [read, list, update, delete, administer]
    }
}

const ALLOWED: u16 = 200;
const DENIED: u16 = 403;

#[tokio::test(flavor = "multi_thread")]
async fn each_principal_reaches_exactly_what_its_grants_give() {
    let w = World::new().await;
    let (region_admin, region_admin_token) = w.user("region.admin@socle.test").await;
    w.grant(region_admin, "entity_admin", &w.region, "GRANT_SCOPE_SUBTREE").await;
    let (staff_a, staff_a_token) = w.user("staff.a@socle.test").await;
    w.grant(staff_a, "staff", &w.branch_a, "GRANT_SCOPE_SUBTREE").await;
    let (staff_b, staff_b_token) = w.user("staff.b@socle.test").await;
    w.grant(staff_b, "staff", &w.branch_b, "GRANT_SCOPE_SUBTREE").await;
    let (viewer, viewer_token) = w.user("viewer.a@socle.test").await;
    w.grant(viewer, "viewer", &w.branch_a, "GRANT_SCOPE_ENTITY_ONLY").await;
    let (_, nobody_token) = w.user("nobody@socle.test").await;

    //                                 read     list     update   delete   administer
    let expected: [(&str, Option<&str>, [u16; 5]); 7] = [
        ("national admin", Some(&w.p.admin_token), [ALLOWED, ALLOWED, ALLOWED, ALLOWED, ALLOWED]),
        ("region admin", Some(&region_admin_token), [ALLOWED, ALLOWED, ALLOWED, ALLOWED, ALLOWED]),
        ("staff of branch A", Some(&staff_a_token), [ALLOWED, ALLOWED, DENIED, DENIED, DENIED]),
        ("staff of branch B", Some(&staff_b_token), [DENIED, DENIED, DENIED, DENIED, DENIED]),
        ("viewer of branch A", Some(&viewer_token), [ALLOWED, ALLOWED, DENIED, DENIED, DENIED]),
        ("user with no grant", Some(&nobody_token), [DENIED, DENIED, DENIED, DENIED, DENIED]),
        ("no token", None, [401, 401, 401, 401, 401]),
    ];
    let mut failures = Vec::new();
    for (who, token, cells) in expected {
        let got = w.operations(token).await;
        if got != cells {
            failures.push(format!("{who}: expected {cells:?} (read, list, update, delete, administer), got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn moving_a_branch_out_of_a_region_takes_it_away_from_the_region_admin() {
    let w = World::new().await;
    let (region_admin, token) = w.user("region.admin@socle.test").await;
    w.grant(region_admin, "entity_admin", &w.region, "GRANT_SCOPE_SUBTREE").await;
    let read = |t: String| {
        let path = format!("/api/v1/entities/{}", w.branch_a);
        let p = &w.p;
        async move { p.call(Some(&t), Method::GET, &path, None, None).await.unwrap().0 }
    };
    assert_eq!(read(token.clone()).await, ALLOWED);
    let (_, current) =
        w.p.call(Some(&w.p.admin_token), Method::GET, &format!("/api/v1/entities/{}", w.branch_a), None, None)
            .await
            .unwrap();
    let (status, moved) =
        w.p.call(
            Some(&w.p.admin_token),
            Method::POST,
            &format!("/api/v1/entities/{}:move", w.branch_a),
            None,
            Some(json!({ "newParentId": w.p.root, "etag": current["entity"]["etag"] })),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{moved}");
    assert_eq!(read(token).await, DENIED, "the branch left the region the grant covers");
}

#[tokio::test(flavor = "multi_thread")]
async fn tampered_and_foreign_tokens_are_refused_by_every_service() {
    use base64::Engine;
    let w = World::new().await;
    let path = format!("/api/v1/entities/{}", w.branch_a);
    // Modified claims under the original signature.
    let parts: Vec<&str> = w.p.admin_token.split('.').collect();
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut claims: Value = serde_json::from_slice(&engine.decode(parts[1]).unwrap()).unwrap();
    claims["sub"] = json!(uuid::Uuid::new_v4().to_string());
    let forged = format!("{}.{}.{}", parts[0], engine.encode(serde_json::to_vec(&claims).unwrap()), parts[2]);
    assert_eq!(w.p.call(Some(&forged), Method::GET, &path, None, None).await.unwrap().0, 401);
    // alg: none.
    let none = format!("{}.{}.", engine.encode(br#"{"alg":"none","typ":"JWT"}"#), parts[1]);
    assert_eq!(w.p.call(Some(&none), Method::GET, &path, None, None).await.unwrap().0, 401);
    // Garbage.
    assert_eq!(w.p.call(Some("not-a-token"), Method::GET, &path, None, None).await.unwrap().0, 401);
    // The genuine token works.
    assert_eq!(w.p.call(Some(&w.p.admin_token), Method::GET, &path, None, None).await.unwrap().0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn me_says_who_i_am_what_i_hold_and_where_i_act() {
    let w = World::new().await;
    let (staff, token) = w.user("claire@socle.test").await;
    w.grant(staff, "staff", &w.branch_a, "GRANT_SCOPE_SUBTREE").await;
    let (status, me) = w.p.call(Some(&token), Method::GET, "/api/v1/me", Some(&w.branch_a), None).await.unwrap();
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["principal"]["id"], staff.to_string());
    assert_eq!(me["user"]["email"], "claire@socle.test");
    assert_eq!(me["actingEntity"]["id"], w.branch_a);
    assert!(!me["sessionId"].as_str().unwrap_or_default().is_empty());
    let grants = me["grants"].as_array().unwrap();
    assert_eq!(grants.len(), 1);
    assert_eq!(grants[0]["roleName"], "staff");
    let permissions: Vec<&str> = me["permissions"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    assert!(permissions.contains(&"crm.organizations.update"), "{permissions:?}");
    assert!(!permissions.contains(&"tenancy.grants.manage"), "{permissions:?}");

    // Acting for an entity where nothing is granted: no permission there.
    let (_, elsewhere) = w.p.call(Some(&token), Method::GET, "/api/v1/me", Some(&w.branch_b), None).await.unwrap();
    assert!(elsewhere["permissions"].as_array().is_none_or(|p| p.is_empty()), "{elsewhere}");
    assert_eq!(w.p.call(None, Method::GET, "/api/v1/me", None, None).await.unwrap().0, 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn records_named_by_id_in_another_entity_are_not_found() {
    let w = World::new().await;
    let (staff_a, _) = w.user("staff.a@socle.test").await;
    w.grant(staff_a, "staff", &w.branch_a, "GRANT_SCOPE_SUBTREE").await;
    let (admin_b, admin_b_token) = w.user("admin.b@socle.test").await;
    w.grant(admin_b, "entity_admin", &w.branch_b, "GRANT_SCOPE_SUBTREE").await;

    // The grant on branch A, found by the national admin.
    let (_, grants) =
        w.p.call(Some(&w.p.admin_token), Method::GET, &format!("/api/v1/grants?entityId={}", w.branch_a), None, None)
            .await
            .unwrap();
    let grant_a = grants["grants"][0]["id"].as_str().unwrap().to_owned();

    // Branch B's admin, acting for B where it may manage grants, names it.
    let b = Some(w.branch_b.as_str());
    let path = format!("/api/v1/grants/{grant_a}");
    assert_eq!(w.p.call(Some(&admin_b_token), Method::GET, &path, b, None).await.unwrap().0, 404);
    assert_eq!(w.p.call(Some(&admin_b_token), Method::DELETE, &path, b, None).await.unwrap().0, 404);
    let root = Some(w.p.root.as_str());
    assert_eq!(w.p.call(Some(&w.p.admin_token), Method::GET, &path, root, None).await.unwrap().0, 200, "still there");

    // Listing someone's grants across entities shows only what the caller may see.
    let (status, listed) =
        w.p.call(Some(&admin_b_token), Method::GET, &format!("/api/v1/grants?principalId={staff_a}"), b, None)
            .await
            .unwrap();
    assert_eq!(status, 200, "{listed}");
    assert!(listed["grants"].as_array().is_none_or(|g| g.is_empty()), "{listed}");

    // Moving branch A requires managing the destination too.
    let (_, a) =
        w.p.call(Some(&w.p.admin_token), Method::GET, &format!("/api/v1/entities/{}", w.branch_a), None, None)
            .await
            .unwrap();
    let (_, b_entity) =
        w.p.call(Some(&w.p.admin_token), Method::GET, &format!("/api/v1/entities/{}", w.branch_b), None, None)
            .await
            .unwrap();
    let moved =
        w.p.call(
            Some(&admin_b_token),
            Method::POST,
            &format!("/api/v1/entities/{}:move", w.branch_b),
            None,
            Some(json!({ "newParentId": w.p.root, "etag": b_entity["entity"]["etag"] })),
        )
        .await
        .unwrap();
    assert_eq!(moved.0, 400, "B's admin may manage B, not the root: {}", moved.1);
    assert!(a["entity"]["id"].is_string());
}

#[tokio::test(flavor = "multi_thread")]
async fn people_see_and_end_their_own_sessions_only() {
    let w = World::new().await;
    let (claire, first_token) = w.user("claire.sessions@socle.test").await;
    let (_, other_token) = w.user("bruno.sessions@socle.test").await;
    let p = &w.p;
    let login = |email: &'static str| async move {
        let (status, reply) = p
            .call(
                None,
                Method::POST,
                "/api/v1/auth:login",
                None,
                Some(json!({ "email": email, "password": socle_testkit::secure::TEST_PASSWORD })),
            )
            .await
            .unwrap();
        assert_eq!(status, 200, "{reply}");
        reply["tokens"].clone()
    };
    let second = login("claire.sessions@socle.test").await;
    let second_token = second["accessToken"].as_str().unwrap().to_owned();

    let (status, sessions) =
        w.p.call(Some(&second_token), Method::GET, "/api/v1/me/sessions", None, None).await.unwrap();
    assert_eq!(status, 200, "{sessions}");
    let list = sessions["sessions"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{sessions}");
    let current: Vec<&Value> = list.iter().filter(|s| s["current"] == true).collect();
    assert_eq!(current.len(), 1);
    assert_eq!(current[0]["id"], second["sessionId"]);
    let first_session = list.iter().find(|s| s["current"] != true).unwrap()["id"].as_str().unwrap().to_owned();

    // Another person cannot end it, even knowing its id.
    let path = format!("/api/v1/me/sessions/{first_session}");
    assert_eq!(w.p.call(Some(&other_token), Method::DELETE, &path, None, None).await.unwrap().0, 404);
    // Its owner can.
    assert_eq!(w.p.call(Some(&second_token), Method::DELETE, &path, None, None).await.unwrap().0, 200);
    let (_, after) = w.p.call(Some(&second_token), Method::GET, "/api/v1/me/sessions", None, None).await.unwrap();
    assert_eq!(after["sessions"].as_array().unwrap().len(), 1);

    // Logging out with someone else's refresh token is refused.
    let bruno = login("bruno.sessions@socle.test").await;
    let (status, _) =
        w.p.call(
            Some(&second_token),
            Method::POST,
            "/api/v1/auth:logout",
            None,
            Some(json!({ "refreshToken": bruno["refreshToken"] })),
        )
        .await
        .unwrap();
    assert_eq!(status, 404);
    // Without a refresh token, logout ends the calling session.
    let (status, out) =
        w.p.call(Some(&second_token), Method::POST, "/api/v1/auth:logout", None, Some(json!({}))).await.unwrap();
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["revokedSessionCount"], 1);
    let (status, _) = w
        .p
        .call(None, Method::POST, "/api/v1/auth:refresh", None, Some(json!({ "refreshToken": second["refreshToken"] })))
        .await
        .unwrap();
    assert_eq!(status, 401);
    let _ = (claire, first_token);
}

#[tokio::test(flavor = "multi_thread")]
async fn administrators_disable_enable_unlock_and_reinvite_accounts_of_their_entities() {
    let w = World::new().await;
    let (staff, _) = w.user("claire.admin@socle.test").await;
    w.grant(staff, "staff", &w.branch_a, "GRANT_SCOPE_SUBTREE").await;
    let (admin_b, admin_b_token) = w.user("admin.b2@socle.test").await;
    w.grant(admin_b, "entity_admin", &w.branch_b, "GRANT_SCOPE_SUBTREE").await;
    let p = &w.p;
    let root = Some(p.root.as_str());
    let password = socle_testkit::secure::TEST_PASSWORD;
    let login = |pw: &'static str| async move {
        p.call(
            None,
            Method::POST,
            "/api/v1/auth:login",
            None,
            Some(json!({ "email": "claire.admin@socle.test", "password": pw })),
        )
        .await
        .unwrap()
    };

    // Another branch's administrator cannot touch the account.
    let disable = format!("/api/v1/users/{staff}:disable");
    let b = Some(w.branch_b.as_str());
    assert_eq!(p.call(Some(&admin_b_token), Method::POST, &disable, b, Some(json!({}))).await.unwrap().0, 404);

    let (status, disabled) = p.call(Some(&p.admin_token), Method::POST, &disable, root, Some(json!({}))).await.unwrap();
    assert_eq!(status, 200, "{disabled}");
    assert_eq!(disabled["user"]["state"], "USER_STATE_DISABLED");
    assert_eq!(login(password).await.0, 401, "a disabled account cannot sign in");
    let activate = format!("/api/v1/users/{staff}:activate");
    assert_eq!(p.call(Some(&p.admin_token), Method::POST, &activate, root, Some(json!({}))).await.unwrap().0, 200);
    assert_eq!(login(password).await.0, 200);

    // Five failures lock the account from this address; an administrator lifts it.
    for _ in 0..5 {
        assert_eq!(login("not the right password").await.0, 401);
    }
    assert_eq!(login(password).await.0, 429);
    let unlock = format!("/api/v1/users/{staff}:unlock");
    assert_eq!(p.call(Some(&p.admin_token), Method::POST, &unlock, root, Some(json!({}))).await.unwrap().0, 200);
    assert_eq!(login(password).await.0, 200);

    // A new invitation replaces the previous link.
    let (status, invited) = p
        .call(
            Some(&p.admin_token),
            Method::POST,
            "/api/v1/users",
            None,
            Some(json!({ "requestId": uuid::Uuid::new_v4().to_string(),
                         "user": { "email": "new.person@socle.test", "entityId": w.branch_a, "displayName": "Nouvelle" },
                         "invitationDelivery": "INVITATION_DELIVERY_RETURN_LINK" })),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{invited}");
    let first_link = invited["invitationUrl"].as_str().unwrap().split("#token=").nth(1).unwrap().to_owned();
    let resend = format!("/api/v1/users/{}:resendInvitation", invited["user"]["id"].as_str().unwrap());
    let (status, resent) = p
        .call(
            Some(&p.admin_token),
            Method::POST,
            &resend,
            root,
            Some(json!({ "invitationDelivery": "INVITATION_DELIVERY_RETURN_LINK" })),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{resent}");
    let second_link = resent["invitationUrl"].as_str().unwrap().split("#token=").nth(1).unwrap().to_owned();
    let accept = |token: String| async move {
        p.call(
            None,
            Method::POST,
            "/api/v1/auth:acceptInvitation",
            None,
            Some(json!({ "invitationToken": token, "password": password })),
        )
        .await
        .unwrap()
        .0
    };
    assert_eq!(accept(first_link).await, 401, "the previous link stopped working");
    assert_eq!(accept(second_link).await, 200);
}
