//! Operator commands of the identity binary.

use socle_server::{SecretResolver, ServiceConfig};
use uuid::Uuid;

/// `socle-identity bootstrap-admin <email> <entity-id>`: invites the first
/// administrator (no password exists until they accept) and prints the user
/// id and the invitation link, once. Grant them a role with
/// `socle-tenancy bootstrap-grant <user-id> national_admin`.
pub async fn bootstrap_admin(config: ServiceConfig, secrets: SecretResolver, args: Vec<String>) -> anyhow::Result<()> {
    let [email, entity] = args.as_slice() else {
        anyhow::bail!("usage: socle-identity bootstrap-admin <email> <entity-id>");
    };
    let entity = Uuid::parse_str(entity).map_err(|_| anyhow::anyhow!("`{entity}` is not an entity id"))?;
    let database = socle_server::open_database(&config.database, &secrets, crate::MIGRATIONS).await?;
    let (user, token) =
        crate::bootstrap::invite_user(&database, email, email, entity).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("user_id = {user}");
    match token {
        Some(token) => {
            println!("invitation_url = {}/invitation#token={token}", config.auth.console_url.trim_end_matches('/'));
            println!("(valid 7 days, shown once: the administrator opens it and chooses a password)");
        }
        None => {
            println!("the account already exists: ask its owner to sign in, or reissue an invitation from the console")
        }
    }
    Ok(())
}
