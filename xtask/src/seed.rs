//! Demo data for `cargo xtask dev`, created through the public API (so that
//! it exercises the same paths as users) with fixed request ids (so that a
//! restart finds it instead of duplicating it).

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// The national root (bootstrap), a region and three branches — the
/// branches of the fictional documents in `shared/data/ai-corpus`.
pub async fn demo_tree(edge: &str, tenancy_url: &str, password: &str) -> anyhow::Result<()> {
    let db = socle_db::Database::connect(
        &socle_db::with_password(tenancy_url, Some(&socle_config::SecretString::from(password.to_owned()))),
        2,
        std::time::Duration::from_secs(5),
    )
    .await?;
    let root = socle_tenancy::ensure_root(&db, "Fédération patronale nationale", "NATIONAL", "national")
        .await
        .map_err(|e| anyhow::anyhow!("bootstrap of the national entity: {e}"))?;
    let http = reqwest::Client::new();
    let create = |request_id: &'static str,
                  parent: String,
                  kind: &'static str,
                  name: &'static str,
                  code: &'static str,
                  slug: &'static str| {
        let http = http.clone();
        let url = format!("{edge}/api/v1/entities");
        async move {
            let body = json!({
                "requestId": request_id,
                "entity": { "parentId": parent, "kind": kind, "displayName": name, "code": code, "slug": slug }
            });
            let response = http.post(url).json(&body).send().await?;
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
    create("5d0c1a5e-0000-4000-8000-000000000002", region, "ENTITY_KIND_BRANCH", "Antenne de Lyon", "ARA-LYON", "lyon")
        .await?;
    create(
        "5d0c1a5e-0000-4000-8000-000000000003",
        root.id.clone(),
        "ENTITY_KIND_BRANCH",
        "Antenne de Lille",
        "HDF-LILLE",
        "lille",
    )
    .await?;
    create(
        "5d0c1a5e-0000-4000-8000-000000000004",
        root.id.clone(),
        "ENTITY_KIND_BRANCH",
        "Antenne de Bordeaux",
        "NAQ-BORDEAUX",
        "bordeaux",
    )
    .await?;
    println!("xtask: demo entity tree ready (national → Auvergne-Rhône-Alpes → Lyon; Lille; Bordeaux)");
    Ok(())
}
