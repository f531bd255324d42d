//! The audit trail end to end, on the secured platform: changes and denied
//! access decisions are written to each service's outbox in the same
//! transaction, relayed to the audit service, and read back through the
//! edge by an auditor; the chains they land in verify.

use reqwest::Method;
use serde_json::{Value, json};
use socle_testkit::secure::SecurePlatform;

async fn create_entity(p: &SecurePlatform, parent: &str, kind: &str, code: &str) -> String {
    p.create_entity(parent, kind, code).await.unwrap()
}

async fn grant(p: &SecurePlatform, user: uuid::Uuid, role: &str, entity: &str) -> String {
    p.grant_user(user, role, entity, "GRANT_SCOPE_ENTITY_ONLY").await.unwrap()
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
    let created = p.wait_for_event(&branch_a, |e| e["action"] == "tenancy.entities.create").await;
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
    let granted = p.wait_for_event(&branch_b, |e| e["action"] == "tenancy.grants.create").await;
    assert_eq!(granted["resourceId"], grant_b.as_str());

    // A denied decision of the authorization layer: staff of A reading B.
    let (status, refusal) =
        p.call(Some(&staff_token), Method::GET, &format!("/api/v1/entities/{branch_b}"), None, None).await.unwrap();
    assert_eq!(status, 403, "{refusal}");
    let request_id = refusal["requestId"].as_str().unwrap().to_owned();
    let denied = p.wait_for_event(&branch_b, |e| e["requestId"] == request_id.as_str()).await;
    assert_eq!(denied["outcome"], "OUTCOME_DENIED");
    assert_eq!(denied["actor"]["id"], staff.to_string());
    assert_eq!(denied["permission"], "tenancy.entities.read");
    assert_eq!(denied["statusCode"], "PERMISSION_DENIED");
    assert_eq!(denied["action"], "tenancy.entities.get");

    // A denied record-level check: A's administrator naming B's grant by id.
    let (status, refusal) = p
        .call(Some(&branch_admin_token), Method::GET, &format!("/api/v1/grants/{grant_b}"), Some(&branch_a), None)
        .await
        .unwrap();
    assert_eq!(status, 404, "{refusal}");
    let request_id = refusal["requestId"].as_str().unwrap().to_owned();
    let denied = p.wait_for_event(&branch_b, |e| e["requestId"] == request_id.as_str()).await;
    assert_eq!(denied["outcome"], "OUTCOME_DENIED");
    assert_eq!(denied["actor"]["id"], branch_admin.to_string());
    assert_eq!(denied["statusCode"], "NOT_FOUND");
    assert_eq!(denied["reason"], "record_in_other_entity");

    // The audit service's own refusals are audited too.
    let (status, refusal) = p
        .call(Some(&staff_token), Method::GET, &format!("/api/v1/audit/events?entityId={branch_b}"), None, None)
        .await
        .unwrap();
    assert_eq!(status, 403, "{refusal}");
    let request_id = refusal["requestId"].as_str().unwrap().to_owned();
    let denied = p.wait_for_event(&branch_b, |e| e["requestId"] == request_id.as_str()).await;
    assert_eq!(denied["service"], "audit");
    assert_eq!(denied["action"], "audit.events.query");
    assert_eq!(denied["permission"], "audit.events.read");

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
    let failed = p.wait_for_event(&branch, |e| e["action"] == "identity.auth.login_failed").await;
    assert_eq!(failed["outcome"], "OUTCOME_DENIED");
    assert_eq!(failed["actor"]["id"], user.to_string());
    assert_eq!(failed["reason"], "bad_password");
    assert!(!failed["clientAddress"].as_str().unwrap().is_empty(), "{failed}");
    let locked = p.wait_for_event(&branch, |e| e["action"] == "identity.auth.locked").await;
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
    let signed_in = p.wait_for_event(&branch, |e| e["action"] == "identity.auth.login").await;
    assert_eq!(signed_in["outcome"], "OUTCOME_OK");
    for expected in [200, 401] {
        let (status, body) = p
            .call(None, Method::POST, "/api/v1/auth:refresh", None, Some(json!({ "refreshToken": refresh })))
            .await
            .unwrap();
        assert_eq!(status, expected, "{body}");
    }
    let reused = p.wait_for_event(&branch, |e| e["action"] == "identity.auth.refresh_reused").await;
    assert_eq!(reused["outcome"], "OUTCOME_DENIED");
    assert_eq!(reused["actor"]["id"], user.to_string());
}

/// Every event of `entity`'s chain as read back by the national administrator.
async fn events_of(p: &SecurePlatform, entity: &str) -> Vec<Value> {
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
    body["events"].as_array().cloned().unwrap_or_default()
}

/// The changed field names of `event` with their personal-data flags, sorted.
fn changed(event: &Value) -> Vec<(String, bool)> {
    let mut fields: Vec<(String, bool)> = event["changes"]
        .as_array()
        .map(|changes| {
            changes
                .iter()
                .map(|c| (c["fieldPath"].as_str().unwrap().to_owned(), c["personalData"].as_bool().unwrap_or(false)))
                .collect()
        })
        .unwrap_or_default();
    fields.sort();
    fields
}

fn change<'a>(event: &'a Value, field: &str) -> &'a Value {
    event["changes"]
        .as_array()
        .and_then(|changes| changes.iter().find(|c| c["fieldPath"] == field))
        .unwrap_or_else(|| panic!("no change of {field} in {event}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn account_and_service_account_changes_are_audited_on_the_home_entity_without_secrets() {
    let p = SecurePlatform::start().await.unwrap();
    let (status, me) = p.call(Some(&p.admin_token), Method::GET, "/api/v1/me", None, None).await.unwrap();
    assert_eq!(status, 200, "{me}");
    let admin_id = me["user"]["id"].as_str().unwrap().to_owned();
    let branch = create_entity(&p, &p.root, "ENTITY_KIND_BRANCH", "BRANCH-I").await;
    let admin = |method: Method, path: String, body: Option<Value>| {
        let p = &p;
        async move { p.call(Some(&p.admin_token), method, &path, Some(&p.root), body).await.unwrap() }
    };

    // The operator bootstraps (the test kit runs them): the system is the actor.
    let bootstrapped = p
        .wait_for_event(&p.root, |e| {
            e["action"] == "identity.service_accounts.create" && e["actor"]["kind"] == "ACTOR_KIND_SYSTEM"
        })
        .await;
    assert_eq!(bootstrapped["resourceType"], "identity.service_account");
    assert!(bootstrapped["actor"].get("id").is_none_or(|id| id == ""), "{bootstrapped}");
    let invited_admin = p
        .wait_for_event(&p.root, |e| e["action"] == "identity.users.create" && e["resourceId"] == admin_id.as_str())
        .await;
    assert_eq!(invited_admin["actor"]["kind"], "ACTOR_KIND_SYSTEM");

    // An account: created (invitation link returned), updated, disabled, deleted.
    let email = "dominique.martin@socle.test";
    let (status, created) = admin(
        Method::POST,
        "/api/v1/users".into(),
        Some(json!({ "requestId": uuid::Uuid::new_v4().to_string(),
                     "user": { "email": email, "entityId": branch, "givenName": "Dominique", "familyName": "Martin" },
                     "invitationDelivery": "INVITATION_DELIVERY_RETURN_LINK" })),
    )
    .await;
    assert_eq!(status, 200, "{created}");
    let user = created["user"]["id"].as_str().unwrap().to_owned();
    let invitation = created["invitationUrl"].as_str().unwrap().split_once("#token=").unwrap().1.to_owned();
    let path = format!("/api/v1/users/{user}");
    let (status, updated) = admin(
        Method::PATCH,
        path.clone(),
        Some(json!({ "user": { "givenName": "Dominika", "familyName": "Martins" },
                     "updateMask": "givenName,familyName,displayName", "etag": created["user"]["etag"] })),
    )
    .await;
    assert_eq!(status, 200, "{updated}");
    let (status, disabled) =
        admin(Method::POST, format!("{path}:disable"), Some(json!({ "reason": "départ de l'association" }))).await;
    assert_eq!(status, 200, "{disabled}");
    let (status, deleted) = admin(Method::DELETE, path.clone(), None).await;
    assert_eq!(status, 200, "{deleted}");

    let of_user = |action: &'static str| {
        let user = user.clone();
        move |e: &Value| e["action"] == action && e["resourceId"] == user.as_str()
    };
    let create = p.wait_for_event(&branch, of_user("identity.users.create")).await;
    assert_eq!(create["actor"]["id"], admin_id.as_str());
    assert_eq!(create["actor"]["kind"], "ACTOR_KIND_USER");
    assert_eq!(create["entityId"], branch.as_str(), "the account's home entity holds the event");
    assert_eq!(create["service"], "identity");
    assert_eq!(create["outcome"], "OUTCOME_OK");
    assert_eq!(create["resourceType"], "identity.user");
    let email_set = change(&create, "email");
    assert_eq!((email_set["personalData"].as_bool(), email_set["subjectId"].as_str()), (Some(true), Some(&*user)));
    assert_eq!(email_set["after"], email);
    assert!(!change(&create, "state")["personalData"].as_bool().unwrap_or(false));
    assert_eq!(create["details"]["invitation_delivery"], "return_link");

    let update = p.wait_for_event(&branch, of_user("identity.users.update")).await;
    assert_eq!(update["actor"]["id"], admin_id.as_str());
    assert_eq!(
        changed(&update),
        [("display_name".to_owned(), true), ("family_name".to_owned(), true), ("given_name".to_owned(), true)]
    );
    assert_eq!(change(&update, "given_name")["before"], "Dominique");
    assert_eq!(change(&update, "given_name")["after"], "Dominika");

    let disable = p.wait_for_event(&branch, of_user("identity.users.disable")).await;
    assert_eq!(changed(&disable), [("state".to_owned(), false)]);
    assert_eq!(change(&disable, "state")["after"], "USER_STATE_DISABLED");
    assert_eq!(disable["details"]["reason"], "départ de l'association");

    let delete = p.wait_for_event(&branch, of_user("identity.users.delete")).await;
    assert_eq!(delete["actor"]["id"], admin_id.as_str());
    for field in ["email", "given_name", "family_name", "display_name"] {
        let gone = change(&delete, field);
        assert_eq!(gone["personalData"], true, "{field}: {delete}");
        assert_eq!(gone["subjectId"], user.as_str());
        assert!(gone.get("after").is_none_or(Value::is_null), "{gone}");
    }
    assert!(!change(&delete, "state")["personalData"].as_bool().unwrap_or(false));

    // A service account: created, updated, its secret rotated, deleted.
    let (status, account) = admin(
        Method::POST,
        "/api/v1/service-accounts".into(),
        Some(json!({ "requestId": uuid::Uuid::new_v4().to_string(),
                     "serviceAccount": { "entityId": branch, "name": "crm-sync", "displayName": "Synchro CRM" } })),
    )
    .await;
    assert_eq!(status, 200, "{account}");
    let first_secret = account["clientSecret"].as_str().unwrap().to_owned();
    let account_id = account["serviceAccount"]["id"].as_str().unwrap().to_owned();
    let account_path = format!("/api/v1/service-accounts/{account_id}");
    let (status, renamed) = admin(
        Method::PATCH,
        account_path.clone(),
        Some(json!({ "serviceAccount": { "displayName": "Synchronisation CRM", "description": "nuit" },
                     "updateMask": "displayName,description", "etag": account["serviceAccount"]["etag"] })),
    )
    .await;
    assert_eq!(status, 200, "{renamed}");
    let (status, rotated) =
        admin(Method::POST, format!("{account_path}:rotateSecret"), Some(json!({ "previousSecretGrace": "60s" })))
            .await;
    assert_eq!(status, 200, "{rotated}");
    let second_secret = rotated["clientSecret"].as_str().unwrap().to_owned();
    let (status, removed) = admin(Method::DELETE, account_path, None).await;
    assert_eq!(status, 200, "{removed}");

    let of_account = |action: &'static str| {
        let id = account_id.clone();
        move |e: &Value| e["action"] == action && e["resourceId"] == id.as_str()
    };
    let sa_create = p.wait_for_event(&branch, of_account("identity.service_accounts.create")).await;
    assert_eq!(sa_create["actor"]["id"], admin_id.as_str());
    assert_eq!(sa_create["resourceType"], "identity.service_account");
    assert_eq!(change(&sa_create, "name")["after"], "crm-sync");
    assert!(changed(&sa_create).iter().all(|(_, personal)| !personal), "{sa_create}");
    let sa_update = p.wait_for_event(&branch, of_account("identity.service_accounts.update")).await;
    assert_eq!(changed(&sa_update), [("description".to_owned(), false), ("display_name".to_owned(), false)]);
    let sa_rotate = p.wait_for_event(&branch, of_account("identity.service_accounts.rotate_secret")).await;
    let rotated_fields: Vec<String> = changed(&sa_rotate).into_iter().map(|(f, _)| f).collect();
    assert!(rotated_fields.contains(&"secret_create_time".to_owned()), "{sa_rotate}");
    assert!(rotated_fields.iter().all(|f| !f.contains("hash")), "{sa_rotate}");
    let sa_delete = p.wait_for_event(&branch, of_account("identity.service_accounts.delete")).await;
    assert_eq!(sa_delete["actor"]["id"], admin_id.as_str());

    // A password change by its owner: the time of the change, no value.
    let new_password = "girafe lampadaire confiture bleue";
    let (changer, changer_token) = p.user_with_password("camille.martin@socle.test", &branch).await.unwrap();
    let (status, body) = p
        .call(
            Some(&changer_token),
            Method::POST,
            "/api/v1/me:changePassword",
            None,
            Some(json!({ "currentPassword": socle_testkit::secure::TEST_PASSWORD, "newPassword": new_password })),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let activated = p
        .wait_for_event(&branch, |e| e["action"] == "identity.users.activate" && e["resourceId"] == changer.to_string())
        .await;
    assert_eq!(activated["actor"]["id"], changer.to_string(), "accepting an invitation is the account's own act");
    assert_eq!(change(&activated, "state")["after"], "USER_STATE_ACTIVE");
    let password = p.wait_for_event(&branch, |e| e["action"] == "identity.auth.password_change").await;
    assert_eq!(password["actor"]["id"], changer.to_string());
    assert_eq!(password["resourceId"], changer.to_string());
    assert_eq!(password["entityId"], branch.as_str());
    assert_eq!(changed(&password), [("password_update_time".to_owned(), false)]);

    // The second factor: enabled, then disabled with a recovery code, by its
    // owner; reset by an administrator (which ends every session).
    let t = Some(changer_token.as_str());
    let (status, enrolled) = p
        .call(t, Method::POST, "/api/v1/me/totp:enroll", None, Some(json!({ "currentPassword": new_password })))
        .await
        .unwrap();
    assert_eq!(status, 200, "{enrolled}");
    let totp_secret = enrolled["secret"].as_str().unwrap().to_owned();
    let code = socle_identity::totp::code(
        &socle_identity::totp::base32_decode(&totp_secret).expect("base32"),
        socle_identity::totp::step_of(chrono::Utc::now().timestamp()),
    );
    let (status, confirmed) =
        p.call(t, Method::POST, "/api/v1/me/totp:confirm", None, Some(json!({ "code": code }))).await.unwrap();
    assert_eq!(status, 200, "{confirmed}");
    let recovery: Vec<String> =
        confirmed["recoveryCodes"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_owned()).collect();
    let (status, body) = p
        .call(
            t,
            Method::POST,
            "/api/v1/me/totp:disable",
            None,
            Some(json!({ "currentPassword": new_password, "code": recovery[0] })),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, body) = admin(
        Method::POST,
        format!("/api/v1/users/{changer}:resetSecondFactor"),
        Some(json!({ "reason": "téléphone perdu" })),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let enabled = p.wait_for_event(&branch, |e| e["action"] == "identity.second_factor.enable").await;
    assert_eq!(enabled["actor"]["id"], changer.to_string());
    assert_eq!(changed(&enabled), [("totp_enabled".to_owned(), false)]);
    assert_eq!(change(&enabled, "totp_enabled")["after"], true);
    let disabled = p.wait_for_event(&branch, |e| e["action"] == "identity.second_factor.disable").await;
    assert_eq!(changed(&disabled), [("totp_enabled".to_owned(), false)]);
    let reset = p.wait_for_event(&branch, |e| e["action"] == "identity.second_factor.reset").await;
    assert_eq!(reset["actor"]["id"], admin_id.as_str());
    assert_eq!(reset["resourceId"], changer.to_string());
    assert_eq!(reset["details"]["reason"], "téléphone perdu");

    // Sessions: one revoked by an administrator, one ended by its owner.
    let login = || {
        let p = &p;
        async move {
            let body = json!({ "email": "camille.martin@socle.test", "password": new_password });
            let (status, session) = p.call(None, Method::POST, "/api/v1/auth:login", None, Some(body)).await.unwrap();
            assert_eq!(status, 200, "{session}");
            session["tokens"].clone()
        }
    };
    let (first, second) = (login().await, login().await);
    let first_session = first["sessionId"].as_str().unwrap().to_owned();
    let (status, body) = admin(Method::DELETE, format!("/api/v1/users/{changer}/sessions/{first_session}"), None).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = p
        .call(
            second["accessToken"].as_str(),
            Method::POST,
            "/api/v1/auth:logout",
            None,
            Some(json!({ "refreshToken": second["refreshToken"] })),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let revoked = p.wait_for_event(&branch, |e| e["action"] == "identity.sessions.revoke").await;
    assert_eq!(revoked["actor"]["id"], admin_id.as_str());
    assert_eq!(revoked["resourceId"], changer.to_string());
    assert_eq!(revoked["details"]["session_id"], first_session.as_str());
    let logout = p.wait_for_event(&branch, |e| e["action"] == "identity.auth.logout").await;
    assert_eq!(logout["actor"]["id"], changer.to_string());
    assert_eq!(logout["details"]["session_id"], second["sessionId"]);

    // A password reset by e-mail: the request (only for an existing account)
    // and the reset, both in the account's name.
    let (status, body) = p
        .call(
            None,
            Method::POST,
            "/api/v1/auth:requestPasswordReset",
            None,
            Some(json!({ "email": "camille.martin@socle.test" })),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let reset_token = p.mailed_token("camille.martin@socle.test", "/password-reset").expect("a reset link");
    let third_password = "escargot violon nuage printanier";
    let (status, body) = p
        .call(
            None,
            Method::POST,
            "/api/v1/auth:resetPassword",
            None,
            Some(json!({ "resetToken": reset_token, "newPassword": third_password })),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let requested = p.wait_for_event(&branch, |e| e["action"] == "identity.auth.password_reset_request").await;
    assert_eq!(requested["actor"]["id"], changer.to_string());
    assert_eq!(requested["resourceId"], changer.to_string());
    let reset_done = p.wait_for_event(&branch, |e| e["action"] == "identity.auth.password_reset").await;
    assert_eq!(reset_done["actor"]["id"], changer.to_string());
    assert_eq!(changed(&reset_done), [("password_update_time".to_owned(), false)]);

    // A move to another entity is recorded in both chains.
    let other_branch = create_entity(&p, &p.root, "ENTITY_KIND_BRANCH", "BRANCH-J").await;
    let (_, current) = admin(Method::GET, format!("/api/v1/users/{changer}"), None).await;
    let (status, moved) = admin(
        Method::PATCH,
        format!("/api/v1/users/{changer}"),
        Some(
            json!({ "user": { "entityId": other_branch }, "updateMask": "entityId", "etag": current["user"]["etag"] }),
        ),
    )
    .await;
    assert_eq!(status, 200, "{moved}");
    let is_move = |e: &Value| e["action"] == "identity.users.update" && e["resourceId"] == changer.to_string();
    let arrived = p.wait_for_event(&other_branch, is_move).await;
    let left = p.wait_for_event(&branch, is_move).await;
    assert_eq!(changed(&arrived), [("entity_id".to_owned(), false)]);
    assert_eq!(change(&left, "entity_id")["after"], other_branch.as_str());
    assert_ne!(arrived["id"], left["id"]);

    // No secret anywhere in the trail: passwords, client secrets, invitation,
    // access, refresh and reset tokens, the TOTP secret, recovery codes.
    let trail = serde_json::to_string(&events_of(&p, &branch).await).unwrap();
    let secrets = [socle_testkit::secure::TEST_PASSWORD, new_password, third_password, &first_secret, &second_secret];
    let tokens = [&invitation, &changer_token, &reset_token, &totp_secret];
    let refresh = [&first["refreshToken"], &second["refreshToken"]].map(|t| t.as_str().unwrap().to_owned());
    for secret in secrets.into_iter().chain(tokens.map(String::as_str)).chain(refresh.iter().map(String::as_str)) {
        assert!(!trail.contains(secret), "a secret reached the audit trail");
    }
    for code in &recovery {
        assert!(!trail.contains(code.as_str()), "a recovery code reached the audit trail");
    }
    assert!(!trail.contains("password_hash") && !trail.contains("totp_secret") && !trail.contains("secret_hash"));

    // At rest (and in exports) the deleted account's personal values are
    // sealed: the export holds the deletion, not the address.
    let export = reqwest::Client::new()
        .post(format!("{}/api/v1/audit/events:export", p.edge.url()))
        .bearer_auth(&p.admin_token)
        .json(&json!({ "entityId": branch }))
        .send()
        .await
        .unwrap();
    assert_eq!(export.status().as_u16(), 200);
    let export = export.text().await.unwrap();
    assert!(export.contains(delete["id"].as_str().unwrap()), "the deletion is exported");
    assert!(!export.contains(email) && !export.contains("Dominika"), "personal values are sealed in exports");

    let (status, verdict) = p
        .call(
            Some(&p.admin_token),
            Method::POST,
            &format!("/api/v1/audit/chains/{branch}:verify"),
            None,
            Some(json!({})),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{verdict}");
    assert_eq!(verdict["status"], "CHAIN_STATUS_OK", "{verdict}");
}
