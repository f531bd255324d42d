//! Operator commands of the tenancy binary.

use socle_proto::socle::tenancy::v1::GrantScope;
use socle_server::{SecretResolver, ServiceConfig};
use uuid::Uuid;

/// `socle-tenancy bootstrap-root [<display-name> <code> <slug>]`: creates the
/// national root if the tree is empty and prints its id.
pub async fn bootstrap_root(config: ServiceConfig, secrets: SecretResolver, args: Vec<String>) -> anyhow::Result<()> {
    let (name, code, slug) = match args.as_slice() {
        [] => ("Fédération nationale", "NATIONAL", "national"),
        [name, code, slug] => (name.as_str(), code.as_str(), slug.as_str()),
        _ => anyhow::bail!("usage: socle-tenancy bootstrap-root [<display-name> <code> <slug>]"),
    };
    let database = socle_server::open_database(&config.database, &secrets, crate::MIGRATIONS).await?;
    let root = crate::ensure_root(&database, name, code, slug).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("root_entity_id = {}", root.id);
    Ok(())
}

/// `socle-tenancy bootstrap-grant [--service-account] <principal-id> <built-in-role> [<entity-id>]`:
/// grants a built-in role to a user (or, with `--service-account`, to a
/// service account) on an entity's subtree (the root by default) — the
/// first administrator's and the platform's service accounts', before
/// anyone can call the API.
pub async fn bootstrap_grant(config: ServiceConfig, secrets: SecretResolver, args: Vec<String>) -> anyhow::Result<()> {
    let (kind, args) = match args.split_first() {
        Some((flag, rest)) if flag == "--service-account" => (2i16, rest.to_vec()),
        _ => (1i16, args),
    };
    let (user, role, entity) = match args.as_slice() {
        [user, role] => (user, role, None),
        [user, role, entity] => (user, role, Some(entity)),
        _ => anyhow::bail!(
            "usage: socle-tenancy bootstrap-grant [--service-account] <principal-id> <built-in-role> [<entity-id>]"
        ),
    };
    let user = Uuid::parse_str(user).map_err(|_| anyhow::anyhow!("`{user}` is not a principal id"))?;
    let database = socle_server::open_database(&config.database, &secrets, crate::MIGRATIONS).await?;
    crate::roles::ensure_built_in(&database).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let entity = match entity {
        Some(entity) => Uuid::parse_str(entity).map_err(|_| anyhow::anyhow!("`{entity}` is not an entity id"))?,
        None => {
            let root = crate::ensure_root(&database, "Fédération nationale", "NATIONAL", "national")
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            Uuid::parse_str(&root.id)?
        }
    };
    if !crate::roles::catalogue_role_exists(role) {
        anyhow::bail!("`{role}` is not a built-in role");
    }
    crate::bootstrap_grant(&database, kind, user, role, entity, GrantScope::Subtree)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("granted {role} on {entity} (subtree) to {user}");
    Ok(())
}
