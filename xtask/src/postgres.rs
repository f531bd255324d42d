//! A PostgreSQL cluster for the local platform and the tests: the one at
//! `SOCLE_PG_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`) if
//! it answers, otherwise a private cluster under `.local/pg`, installing the
//! server with apt when it is missing and we are root.

use std::{path::Path, time::Duration};

use anyhow::bail;
use socle_db::cluster::PrivateCluster;

/// Port of the private cluster (chosen away from the default 5432).
const PRIVATE_PORT: u16 = 55432;

/// A reachable cluster; stops the private one on drop.
pub struct Postgres {
    /// Maintenance URL, as a superuser.
    pub admin_url: String,
    private: Option<PrivateCluster>,
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(cluster) = &self.private {
            println!("xtask: stopping the private PostgreSQL cluster");
            let _ = cluster.stop();
        }
    }
}

async fn answers(url: &str) -> bool {
    tokio::time::timeout(Duration::from_secs(3), socle_db::admin::connect(url)).await.is_ok_and(|r| r.is_ok())
}

/// Finds or starts a cluster.
pub async fn ensure(root: &Path) -> anyhow::Result<Postgres> {
    let url = std::env::var("SOCLE_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    if answers(&url).await {
        println!("xtask: using PostgreSQL at {}", redact(&url));
        return Ok(Postgres { admin_url: url, private: None });
    }
    println!("xtask: no PostgreSQL at {}; starting a private cluster under .local/pg", redact(&url));
    let cluster = PrivateCluster::prepare(&root.join(".local/pg"), PRIVATE_PORT, true)?;
    if cluster.is_running() {
        println!("xtask: reusing the private cluster already running under .local/pg");
    } else {
        cluster.start()?;
    }
    let admin_url = cluster.admin_url();
    for _ in 0..50 {
        if answers(&admin_url).await {
            return Ok(Postgres { admin_url, private: Some(cluster) });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("the private cluster did not answer; see {}", cluster.log().display())
}

/// The URL without its password, for display.
pub fn redact(url: &str) -> String {
    match url.split_once("://").and_then(|(s, rest)| Some((s, rest.split_once('@')?))) {
        Some((scheme, (user, host))) => format!("{scheme}://{}@{host}", user.split(':').next().unwrap_or("")),
        None => url.to_owned(),
    }
}

/// Drops the databases and roles left by earlier test runs.
pub async fn drop_test_leftovers(admin_url: &str) -> anyhow::Result<usize> {
    use diesel::{QueryableByName, sql_types::Text};
    use diesel_async::RunQueryDsl;
    #[derive(QueryableByName)]
    struct Name {
        #[diesel(sql_type = Text)]
        name: String,
    }
    let mut conn = socle_db::admin::connect(admin_url).await?;
    let databases: Vec<Name> =
        diesel::sql_query("SELECT datname AS name FROM pg_database WHERE datname LIKE 'socle\\_test\\_%'")
            .load(&mut conn)
            .await?;
    for db in &databases {
        socle_db::admin::drop_database(&mut conn, &db.name).await?;
    }
    let roles: Vec<Name> =
        diesel::sql_query("SELECT rolname AS name FROM pg_roles WHERE rolname LIKE 'socle\\_test\\_%'")
            .load(&mut conn)
            .await?;
    for role in &roles {
        if socle_db::admin::is_identifier(&role.name) {
            diesel_async::SimpleAsyncConnection::batch_execute(
                &mut conn,
                &format!("DROP ROLE IF EXISTS {}", role.name),
            )
            .await?;
        }
    }
    Ok(databases.len())
}
