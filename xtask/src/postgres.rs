//! A PostgreSQL cluster for the local platform and the tests: the one at
//! `SOCLE_PG_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`) if
//! it answers, otherwise a private cluster under `.local/pg`, installing the
//! server with apt when it is missing and we are root.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, bail};

/// Port of the private cluster (chosen away from the default 5432).
const PRIVATE_PORT: u16 = 55432;

/// A reachable cluster; stops the private one on drop.
pub struct Postgres {
    /// Maintenance URL, as a superuser.
    pub admin_url: String,
    private: Option<PrivateCluster>,
}

struct PrivateCluster {
    pg_ctl: PathBuf,
    data: PathBuf,
    run_as: Option<String>,
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(cluster) = &self.private {
            println!("xtask: stopping the private PostgreSQL cluster");
            let _ =
                run_as(&cluster.run_as, &cluster.pg_ctl, &["-D", path_str(&cluster.data), "-m", "fast", "-w", "stop"]);
        }
    }
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
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
    let bin = server_binaries()?;
    let base = root.join(".local/pg");
    let data = base.join("data");
    let socket = base.join("socket");
    std::fs::create_dir_all(&socket)?;
    // initdb and postgres refuse to run as root: use the `postgres` account.
    let run_as_user = is_root().then(|| "postgres".to_owned());
    if let Some(user) = &run_as_user {
        chown_recursive(&base, user)?;
    }
    let pg_ctl = bin.join("pg_ctl");
    if !data.join("PG_VERSION").exists() {
        run_as(
            &run_as_user,
            &bin.join("initdb"),
            &["-D", path_str(&data), "-U", "postgres", "--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8"],
        )
        .context("initdb")?;
    }
    let options = format!("-p {PRIVATE_PORT} -c listen_addresses=127.0.0.1 -k {} -c fsync=on", path_str(&socket));
    let log = base.join("server.log");
    let running = data.join("postmaster.pid").exists()
        && run_as(&run_as_user, &pg_ctl, &["-D", path_str(&data), "status"]).is_ok();
    if running {
        println!("xtask: reusing the private cluster already running under .local/pg");
    } else {
        run_as(
            &run_as_user,
            &pg_ctl,
            &["-D", path_str(&data), "-o", &options, "-l", path_str(&log), "-w", "-t", "60", "start"],
        )
        .with_context(|| format!("pg_ctl start (see {})", log.display()))?;
    }
    let admin_url = format!("postgres://postgres@127.0.0.1:{PRIVATE_PORT}/postgres");
    for _ in 0..50 {
        if answers(&admin_url).await {
            return Ok(Postgres { admin_url, private: Some(PrivateCluster { pg_ctl, data, run_as: run_as_user }) });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("the private cluster did not answer; see {}", log.display())
}

/// The URL without its password, for display.
pub fn redact(url: &str) -> String {
    match url.split_once("://").and_then(|(s, rest)| Some((s, rest.split_once('@')?))) {
        Some((scheme, (user, host))) => format!("{scheme}://{}@{host}", user.split(':').next().unwrap_or("")),
        None => url.to_owned(),
    }
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn chown_recursive(path: &Path, user: &str) -> anyhow::Result<()> {
    let status = Command::new("chown").args(["-R", user, path_str(path)]).status()?;
    anyhow::ensure!(status.success(), "chown {} failed (does the `{user}` account exist?)", path.display());
    Ok(())
}

fn run_as(user: &Option<String>, program: &Path, args: &[&str]) -> anyhow::Result<()> {
    let status = match user {
        Some(user) => Command::new("runuser").args(["-u", user, "--"]).arg(program).args(args).status()?,
        None => Command::new(program).args(args).status()?,
    };
    anyhow::ensure!(status.success(), "{} exited with {status}", program.display());
    Ok(())
}

/// The newest `/usr/lib/postgresql/<version>/bin`, installed with apt if
/// needed and possible.
fn server_binaries() -> anyhow::Result<PathBuf> {
    fn find() -> Option<PathBuf> {
        let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|bin| bin.join("initdb").exists() && bin.join("pg_ctl").exists())
            .collect();
        versions.sort();
        versions.pop()
    }
    if let Some(bin) = find() {
        return Ok(bin);
    }
    if !is_root() {
        bail!("PostgreSQL server binaries are missing: install the `postgresql` package, or set SOCLE_PG_URL");
    }
    println!("xtask: installing PostgreSQL with apt-get");
    let ok = Command::new("apt-get").arg("update").status()?.success()
        && Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", "postgresql"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()?
            .success();
    anyhow::ensure!(ok, "apt-get install postgresql failed");
    find().context("postgresql installed but initdb/pg_ctl not found under /usr/lib/postgresql")
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
