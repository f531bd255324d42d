//! Demo data for `cargo xtask dev`, created like a real deployment: the
//! national root and the platform's service accounts by the bootstrap
//! functions (nothing can call the API before they exist), then the demo
//! tree through the API as the national administrator, and demo people
//! invited and activated with generated passwords (kept in
//! `dev-secrets.toml`, printed at start; no password is written in the code).

use anyhow::{Context, bail};
use serde_json::{Value, json};
use socle_config::SecretString;
use socle_proto::socle::tenancy::v1::GrantScope;
use uuid::Uuid;

/// The demo people: e-mail, built-in role, entity code (granted on its subtree).
pub const DEMO_USERS: &[(&str, &str, &str)] = &[
    ("admin@socle.local", "national_admin", "NATIONAL"),
    ("region.ara@socle.local", "entity_admin", "ARA"),
    ("staff.lyon@socle.local", "staff", "ARA-LYON"),
    ("staff.lille@socle.local", "staff", "HDF-LILLE"),
    ("staff.bordeaux@socle.local", "staff", "NAQ-BORDEAUX"),
    ("auditeur@socle.local", "auditor", "NATIONAL"),
];

/// The key of a demo password in `dev-secrets.toml`.
pub fn password_key(email: &str) -> String {
    format!("demo_password_{}", email.split('@').next().unwrap_or(email).replace('.', "_"))
}

/// A random, readable password that meets the policy.
pub fn generate_password() -> String {
    let raw = Uuid::new_v4().simple().to_string();
    format!("{}-{}-{}", &raw[..6], &raw[6..12], &raw[12..18])
}

async fn connect((url, password): (String, String)) -> anyhow::Result<socle_db::Database> {
    Ok(socle_db::Database::connect(
        &socle_db::with_password(&url, Some(&SecretString::from(password))),
        2,
        std::time::Duration::from_secs(5),
    )
    .await?)
}

/// Seeds everything; returns (e-mail, password, role) of the demo people.
pub async fn demo(
    edge: &str,
    tenancy: (String, String),
    identity: (String, String),
    secrets: &toml::Table,
) -> anyhow::Result<Vec<(String, String, String)>> {
    let tenancy = connect(tenancy).await?;
    let identity = connect(identity).await?;
    let fail = |e: socle_errors::Error| anyhow::anyhow!("{e}");
    let root = socle_tenancy::ensure_root(&tenancy, "Fédération patronale nationale", "NATIONAL", "national")
        .await
        .map_err(fail)?;
    let root_id = Uuid::parse_str(&root.id)?;

    // The platform's service accounts, allowed to read the tree and decide access.
    for (service, ..) in crate::SERVICES {
        let secret =
            secrets[&format!("{}_client_secret", service.replace('-', "_"))].as_str().context("client secret")?;
        let account = socle_identity::bootstrap::ensure_service_account(
            &identity,
            &format!("{service}-service"),
            root_id,
            &format!("sa-{service}"),
            &SecretString::from(secret.to_owned()),
        )
        .await
        .map_err(fail)?;
        // Identity also removes the grants of the accounts it deletes.
        let role = if *service == "identity" { "identity_service" } else { "platform_service" };
        socle_tenancy::bootstrap_grant(&tenancy, 2, account, role, root_id, GrantScope::Subtree).await.map_err(fail)?;
    }

    let http = reqwest::Client::new();
    let password_of = |email: &str| secrets[&password_key(email)].as_str().map(str::to_owned).context("demo password");
    // Invites (unless already there) and activates a person at home in `entity`.
    let person = |email: &'static str, entity: Uuid| {
        let (identity, http) = (identity.clone(), http.clone());
        let password = password_of(email);
        let edge = edge.to_owned();
        async move {
            let password = password?;
            let (id, invitation) = socle_identity::bootstrap::invite_user(&identity, email, email, entity)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            if let Some(token) = invitation {
                let reply = http
                    .post(format!("{edge}/api/v1/auth:acceptInvitation"))
                    .json(&json!({ "invitationToken": token, "password": password }))
                    .send()
                    .await?;
                if !reply.status().is_success() {
                    bail!("activating {email}: {}", reply.text().await.unwrap_or_default());
                }
            }
            Ok::<_, anyhow::Error>(id)
        }
    };
    let (admin_email, admin_role, _) = DEMO_USERS[0];
    let admin = person(admin_email, root_id).await?;
    socle_tenancy::bootstrap_grant(&tenancy, 1, admin, admin_role, root_id, GrantScope::Subtree).await.map_err(fail)?;

    // The tree, through the API, as the national administrator.
    let login: Value = http
        .post(format!("{edge}/api/v1/auth:login"))
        .json(&json!({ "email": admin_email, "password": password_of(admin_email)? }))
        .send()
        .await?
        .json()
        .await?;
    let token = login["tokens"]["accessToken"].as_str().context("the demo administrator cannot sign in")?.to_owned();
    let create = |request_id: &'static str,
                  parent: String,
                  kind: &'static str,
                  name: &'static str,
                  code: &'static str,
                  slug: &'static str| {
        let (http, token) = (http.clone(), token.clone());
        let url = format!("{edge}/api/v1/entities");
        async move {
            let body = json!({
                "requestId": request_id,
                "entity": { "parentId": parent, "kind": kind, "displayName": name, "code": code, "slug": slug }
            });
            let response = http.post(url).bearer_auth(token).json(&body).send().await?;
            let status = response.status();
            let reply: Value = response.json().await?;
            if !status.is_success() {
                bail!("creating {name}: {reply}");
            }
            reply["entity"]["id"].as_str().map(str::to_owned).context("no entity id")
        }
    };
    let region = create(
        "5d0c1a5e-0000-4000-8000-000000000001",
        root.id.clone(),
        "ENTITY_KIND_REGION",
        "Région Auvergne-Rhône-Alpes",
        "ARA",
        "auvergne-rhone-alpes",
    )
    .await?;
    let lyon = create(
        "5d0c1a5e-0000-4000-8000-000000000002",
        region.clone(),
        "ENTITY_KIND_BRANCH",
        "Antenne de Lyon",
        "ARA-LYON",
        "lyon",
    )
    .await?;
    let lille = create(
        "5d0c1a5e-0000-4000-8000-000000000003",
        root.id.clone(),
        "ENTITY_KIND_BRANCH",
        "Antenne de Lille",
        "HDF-LILLE",
        "lille",
    )
    .await?;
    let bordeaux = create(
        "5d0c1a5e-0000-4000-8000-000000000004",
        root.id.clone(),
        "ENTITY_KIND_BRANCH",
        "Antenne de Bordeaux",
        "NAQ-BORDEAUX",
        "bordeaux",
    )
    .await?;
    let entity_of = |code: &str| match code {
        "ARA" => region.clone(),
        "ARA-LYON" => lyon.clone(),
        "HDF-LILLE" => lille.clone(),
        "NAQ-BORDEAUX" => bordeaux.clone(),
        _ => root.id.clone(),
    };
    let mut credentials = Vec::new();
    for (email, role, code) in DEMO_USERS {
        let entity = Uuid::parse_str(&entity_of(code))?;
        let id = person(email, entity).await?;
        socle_tenancy::bootstrap_grant(&tenancy, 1, id, role, entity, GrantScope::Subtree).await.map_err(fail)?;
        credentials.push((email.to_string(), password_of(email)?, format!("{role} on {code}")));
    }
    println!(
        "xtask: demo data ready (national → Auvergne-Rhône-Alpes → Lyon; Lille; Bordeaux; {} people)",
        credentials.len()
    );
    // CRM demo records, through the API as the national administrator.
    crate::crm_seed::demo(edge, &http, &token, &root.id).await.context("CRM demo data")?;
    Ok(credentials)
}
