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

/// `socle-identity ensure-service-account <name> <entity-id> <client-id> <secret-locator | ->`:
/// creates the service account `client-id` (machine name `name`, owned by
/// `entity-id`) or, when it exists, sets its secret. The secret is read
/// from a locator (`vault:mount/path#key`, `file:key`) or, with `-`, from
/// the first line of standard input; it is never printed. Prints the
/// account id. Grant it a role with
/// `socle-tenancy bootstrap-grant --service-account <id> platform_service`.
pub async fn ensure_service_account(
    config: ServiceConfig,
    secrets: SecretResolver,
    args: Vec<String>,
) -> anyhow::Result<()> {
    let [name, entity, client_id, locator] = args.as_slice() else {
        anyhow::bail!(
            "usage: socle-identity ensure-service-account <name> <entity-id> <client-id> <secret-locator | ->"
        );
    };
    let name_ok = (2..=63).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    anyhow::ensure!(name_ok, "`{name}` is not a machine name: lower case letters, digits and dashes, e.g. crm-service");
    anyhow::ensure!(
        !client_id.is_empty() && client_id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        "the client id must be letters, digits, dashes or underscores"
    );
    let entity = Uuid::parse_str(entity).map_err(|_| anyhow::anyhow!("`{entity}` is not an entity id"))?;
    let secret = if locator == "-" {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        socle_config::SecretString::from(line.trim_end_matches(['\r', '\n']).to_owned())
    } else {
        let reference = socle_config::SecretRef::parse(locator).map_err(|e| anyhow::anyhow!("{e}"))?;
        secrets.resolve(&reference).await?
    };
    // 32 characters of a generated secret carry well over 128 bits.
    anyhow::ensure!(
        socle_config::ExposeSecret::expose_secret(&secret).chars().count() >= 32,
        "the secret is too short: use at least 32 random characters (e.g. openssl rand -base64 32)"
    );
    let database = socle_server::open_database(&config.database, &secrets, crate::MIGRATIONS).await?;
    let id = crate::bootstrap::ensure_service_account(&database, name, entity, client_id, &secret)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("service_account_id = {id}");
    println!("client_id = {client_id}");
    println!("(the secret is set and not shown; a previous secret stops working at once)");
    Ok(())
}
