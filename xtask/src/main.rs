//! `cargo xtask dev`: the whole platform on this machine.
//! `cargo xtask test`: every test, with what the tests need.
//! `cargo xtask lint`: formatting, clippy and the contract checks CI runs.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

mod crm_seed;
mod postgres;
mod seed;

#[derive(Parser)]
#[command(about = "Socle developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Start every service and the edge on this machine (Ctrl-C stops all).
    Dev {
        /// Edge listen address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        edge: String,
        /// Build in release mode.
        #[arg(long)]
        release: bool,
    },
    /// Run every test (PostgreSQL and RustyVault are provided).
    Test {
        /// Extra arguments for the test runner.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmarks (release build): `auth`, `audit`, `relay`, `crm`.
    Bench {
        /// Which benchmark.
        name: String,
    },
    /// cargo fmt --check, clippy -D warnings, buf lint and buf breaking.
    Lint {
        /// The git ref `buf breaking` compares against.
        #[arg(long)]
        against: Option<String>,
    },
}

/// The backend services: (crate, binary, database, gRPC port).
pub(crate) const SERVICES: &[(&str, &str, u16)] = &[
    ("identity", "socle_identity", 50051),
    ("tenancy", "socle_tenancy", 50052),
    ("crm", "socle_crm", 50053),
    ("cms", "socle_cms", 50054),
    ("audit", "socle_audit", 50055),
    ("ai-proxy", "socle_ai", 50056),
];

/// The proto package each service serves (edge upstreams).
fn package(service: &str) -> &'static str {
    match service {
        "identity" => "socle.identity.v1",
        "tenancy" => "socle.tenancy.v1",
        "crm" => "socle.crm.v1",
        "cms" => "socle.cms.v1",
        "audit" => "socle.audit.v1",
        "ai-proxy" => "socle.ai.v1",
        other => unreachable!("unknown service {other}"),
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        match cli.command {
            Task::Dev { edge, release } => dev(&edge, release).await,
            Task::Test { args } => test(args).await,
            Task::Lint { against } => lint(against),
            Task::Bench { name } => bench(&name).await,
        }
    })
}

fn cargo() -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(root());
    command
}

fn check(status: std::process::ExitStatus, what: &str) -> anyhow::Result<()> {
    if status.success() { Ok(()) } else { bail!("{what} failed ({status})") }
}

fn target_dir(release: bool) -> PathBuf {
    let base = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from);
    base.join(if release { "release" } else { "debug" })
}

/// Reads or creates the development secrets file (gitignored): one random
/// password per service role.
fn dev_secrets(path: &Path, admin_password: Option<&str>) -> anyhow::Result<toml::Table> {
    let mut table: toml::Table = match std::fs::read_to_string(path) {
        Ok(text) => text.parse().context("dev-secrets.toml is not valid TOML")?,
        Err(_) => toml::Table::new(),
    };
    let mut changed = false;
    for (service, _, _) in SERVICES {
        for kind in ["db_password", "client_secret"] {
            let key = format!("{}_{kind}", service.replace('-', "_"));
            if !table.contains_key(&key) {
                let secret = uuid::Uuid::new_v4().simple().to_string() + &uuid::Uuid::new_v4().simple().to_string();
                table.insert(key, toml::Value::String(secret));
                changed = true;
            }
        }
    }
    for (email, ..) in seed::DEMO_USERS {
        let key = seed::password_key(email);
        if !table.contains_key(&key) {
            table.insert(key, toml::Value::String(seed::generate_password()));
            changed = true;
        }
    }
    // Ed25519 keys: identity signs access tokens, audit signs checkpoints.
    for name in ["identity_signing_key", "audit_signing_key"] {
        if !table.contains_key(name) {
            let key = socle_identity::keys::SigningKey::generate_pkcs8_base64();
            table.insert(name.into(), toml::Value::String(socle_config::ExposeSecret::expose_secret(&key).to_owned()));
            changed = true;
        }
    }
    // AES-256 key of identity's TOTP secrets at rest.
    if !table.contains_key("identity_totp_encryption_key") {
        let key = socle_identity::totp_keys::TotpKey::generate_base64();
        table.insert(
            "identity_totp_encryption_key".into(),
            toml::Value::String(socle_config::ExposeSecret::expose_secret(&key).to_owned()),
        );
        changed = true;
    }
    if let Some(password) = admin_password
        && table.get("pg_admin_password").and_then(|v| v.as_str()) != Some(password)
    {
        table.insert("pg_admin_password".into(), toml::Value::String(password.into()));
        changed = true;
    }
    if changed {
        std::fs::write(
            path,
            format!(
                "# Development secrets, generated by `cargo xtask dev`. Never commit.\n{}",
                toml::to_string(&table)?
            ),
        )?;
    }
    Ok(table)
}

/// The password in a `postgres://user:password@host/db` URL, if any.
fn url_password(url: &str) -> Option<String> {
    let (_, rest) = url.split_once("://")?;
    let (userinfo, _) = rest.split_once('@')?;
    userinfo.split_once(':').map(|(_, p)| p.to_owned()).filter(|p| !p.is_empty())
}

fn with_database(url: &str, database: &str) -> String {
    let (base, _) = url.rsplit_once('/').unwrap_or((url, ""));
    format!("{base}/{database}")
}

fn with_user(url: &str, user: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("postgres", url));
    let host = rest.split_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{user}@{host}")
}

async fn dev(edge_addr: &str, release: bool) -> anyhow::Result<()> {
    let root = root();
    let pg = postgres::ensure(&root).await?;

    println!("xtask: building the services");
    let mut build = cargo();
    build.args(["build", "--quiet"]);
    if release {
        build.arg("--release");
    }
    for (service, _, _) in SERVICES {
        build.args(["-p", &format!("socle-{service}")]);
    }
    build.args(["-p", "socle-edge"]);
    check(build.status()?, "cargo build")?;

    let dev_dir = root.join(".local/dev");
    std::fs::create_dir_all(&dev_dir)?;
    let secrets_path = root.join("dev-secrets.toml");
    let admin_password = url_password(&pg.admin_url);
    let secrets = dev_secrets(&secrets_path, admin_password.as_deref())?;

    let mut admin = socle_db::admin::connect(&pg.admin_url).await?;
    let mut upstreams = toml::Table::new();
    let mut children: Vec<(String, Child)> = Vec::new();
    for (service, database, port) in SERVICES {
        let role = format!("{database}_app");
        let key = format!("{}_db_password", service.replace('-', "_"));
        let password = secrets[&key].as_str().expect("string password");
        if socle_db::admin::create_database(&mut admin, database).await? {
            println!("xtask: created database {database}");
        }
        socle_db::admin::ensure_login_role(&mut admin, &role, password).await?;
        let owner_url = with_database(&postgres::redact(&pg.admin_url), database);
        // Every service verifies tokens and asks tenancy, as its own account.
        let auth = format!(
            "\n[auth]\nmode = \"tokens\"\nidentity_url = \"http://127.0.0.1:50051\"\ntenancy_url = \"http://127.0.0.1:50052\"\n\
             client_id = \"sa-{service}\"\nclient_secret = \"file:{key_prefix}_client_secret\"\n{signing}",
            key_prefix = service.replace('-', "_"),
            signing = match *service {
                // Identity mails invitations and reset links into a folder.
                "identity" => format!(
                    "signing_key = \"file:identity_signing_key\"\ntotp_encryption_key = \"file:identity_totp_encryption_key\"\nmail_transport = \"directory\"\nmail_directory = \"{}\"\n",
                    dev_dir.join("mail").display()
                ),
                "audit" => "signing_key = \"file:audit_signing_key\"\n".to_owned(),
                _ => String::new(),
            },
        );
        let config = format!(
            "# Generated by `cargo xtask dev`.\n\
             [server]\nlisten = \"127.0.0.1:{port}\"\n\n\
             [database]\nurl = \"{app_url}\"\npassword = \"file:{key}\"\nowner_url = \"{owner_url}\"\n{owner_password}\
             migrate_on_start = true\napp_role = \"{role}\"\n\n\
             [secrets]\nfile = \"{secrets}\"\n\n\
             [telemetry]\nlog_format = \"pretty\"\n\n\
             # Audit events leave each service's outbox for the audit service.\n\
             [audit]\nurl = \"http://127.0.0.1:50055\"\n{auth}",
            app_url = with_user(&owner_url, &role),
            owner_password =
                if admin_password.is_some() { "owner_password = \"file:pg_admin_password\"\n" } else { "" },
            secrets = secrets_path.display(),
        );
        let config_path = dev_dir.join(format!("{service}.toml"));
        std::fs::write(&config_path, config)?;
        upstreams.insert(package(service).into(), toml::Value::String(format!("http://127.0.0.1:{port}")));
        let binary = target_dir(release).join(format!("socle-{service}"));
        children.push((service.to_string(), spawn(&binary, &config_path, service)?));
    }
    let mut edge_config = toml::Table::new();
    let mut server = toml::Table::new();
    server.insert("listen".into(), toml::Value::String(edge_addr.into()));
    edge_config.insert("server".into(), toml::Value::Table(server));
    edge_config.insert("upstreams".into(), toml::Value::Table(upstreams));
    let mut cors = toml::Table::new();
    cors.insert(
        "allowed_origins".into(),
        toml::Value::Array(vec![toml::Value::String("http://localhost:4200".into())]),
    );
    edge_config.insert("cors".into(), toml::Value::Table(cors));
    let mut telemetry = toml::Table::new();
    telemetry.insert("log_format".into(), toml::Value::String("pretty".into()));
    edge_config.insert("telemetry".into(), toml::Value::Table(telemetry));
    let edge_path = dev_dir.join("edge.toml");
    std::fs::write(&edge_path, format!("# Generated by `cargo xtask dev`.\n{}", toml::to_string(&edge_config)?))?;
    children.push(("edge".into(), spawn(&target_dir(release).join("socle-edge"), &edge_path, "edge")?));

    let base = format!("http://{edge_addr}");
    let mut ready = wait_ready(&base, &mut children).await;
    let mut credentials = Vec::new();
    if ready.is_ok() {
        let database = |name: &str, service: &str| {
            let url = with_user(&with_database(&postgres::redact(&pg.admin_url), name), &format!("{name}_app"));
            let password =
                secrets[&format!("{}_db_password", service.replace('-', "_"))].as_str().expect("password").to_owned();
            (url, password)
        };
        let seeded =
            seed::demo(&base, database("socle_tenancy", "tenancy"), database("socle_identity", "identity"), &secrets)
                .await;
        match seeded {
            Ok(users) => credentials = users,
            Err(e) => ready = Err(e),
        }
    }
    match &ready {
        Ok(()) => {
            println!("\nSocle is running.");
            println!("  REST API       {base}/api/v1/…");
            println!("  API docs       {base}/api/v1/docs");
            println!("  OpenAPI 3.1    {base}/api/v1/openapi.json");
            println!("  gRPC/gRPC-web  {base} (every service, via the edge)");
            println!("  health         {base}/api/v1/health?service=socle.crm.v1.OrganizationService");
            for (service, _, port) in SERVICES {
                println!("  {service:<14} grpc://127.0.0.1:{port}");
            }
            println!("  PostgreSQL     {}", postgres::redact(&pg.admin_url));
            println!("  Mail (files)   {}", dev_dir.join("mail").display());
            println!("  configuration  .local/dev/*.toml; secrets in dev-secrets.toml");
            println!("\nDemo accounts (passwords generated once, kept in dev-secrets.toml):");
            for (email, password, role) in &credentials {
                println!("  {email:<28} {password:<24} {role}");
            }
            println!("\nPress Ctrl-C to stop everything.");
            wait_for_stop(&mut children).await;
        }
        Err(e) => eprintln!("xtask: the platform did not become ready: {e:#}"),
    }
    stop(children);
    drop(pg);
    ready
}

fn spawn(binary: &Path, config: &Path, name: &str) -> anyhow::Result<Child> {
    let mut command = Command::new(binary);
    // Every `SOCLE_*` variable is a configuration key to a service, and an
    // unknown key stops it: pass only the configuration file.
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("SOCLE_")) {
        command.env_remove(key);
    }
    let mut child = command
        .env("SOCLE_CONFIG", config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    for stream in [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let prefix = format!("[{name:>8}] ");
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                println!("{prefix}{line}");
            }
        });
    }
    Ok(child)
}

async fn wait_ready(base: &str, children: &mut [(String, Child)]) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let probes: Vec<String> = SERVICES
        .iter()
        .map(|(service, _, _)| format!("{base}/api/v1/health?service={}", first_service(service)))
        .collect();
    for _ in 0..600 {
        for (name, child) in children.iter_mut() {
            if let Some(status) = child.try_wait()? {
                bail!("{name} exited early ({status})");
            }
        }
        let mut all = true;
        for probe in &probes {
            let serving = match http.get(probe).send().await {
                Ok(r) => r.json::<serde_json::Value>().await.is_ok_and(|v| v["status"] == "SERVING"),
                Err(_) => false,
            };
            all &= serving;
        }
        if all {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("not ready after 120 s")
}

/// A gRPC service of each backend, for readiness probes.
fn first_service(service: &str) -> &'static str {
    match service {
        "identity" => "socle.identity.v1.AuthService",
        "tenancy" => "socle.tenancy.v1.EntityService",
        "crm" => "socle.crm.v1.OrganizationService",
        "cms" => "socle.cms.v1.ContentService",
        "audit" => "socle.audit.v1.AuditEventService",
        "ai-proxy" => "socle.ai.v1.AssistantService",
        other => unreachable!("unknown service {other}"),
    }
}

async fn wait_for_stop(children: &mut [(String, Child)]) {
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                println!("\nxtask: stopping");
                return;
            }
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                for (name, child) in children.iter_mut() {
                    if let Ok(Some(status)) = child.try_wait() {
                        eprintln!("xtask: {name} exited ({status}); stopping the platform");
                        return;
                    }
                }
            }
        }
    }
}

/// SIGTERM every child (they drain), then SIGKILL what is left after 15 s.
fn stop(mut children: Vec<(String, Child)>) {
    for (_, child) in &children {
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    for (name, child) in &mut children {
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                _ if std::time::Instant::now() > deadline => {
                    eprintln!("xtask: {name} did not stop in time, killing it");
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
    println!("xtask: every process stopped");
}

/// `rvault` (RustyVault) for the Vault tests: on PATH, in `.tools/bin`, or
/// installed there with cargo.
fn ensure_rvault(root: &Path) -> anyhow::Result<PathBuf> {
    let local = root.join(".tools/bin/rvault");
    if local.exists() {
        return Ok(local);
    }
    if let Some(found) = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|p| p.join("rvault")).find(|p| p.exists()))
    {
        return Ok(found);
    }
    println!("xtask: installing RustyVault (rvault) into .tools/ — a one-time build of several minutes");
    let status = cargo()
        .args(["install", "--locked", "--quiet", "--root"])
        .arg(root.join(".tools"))
        .args(["rusty_vault", "--version", "0.2.1"])
        .status()?;
    check(status, "cargo install rusty_vault")?;
    Ok(local)
}

fn has_nextest() -> bool {
    cargo()
        .args(["nextest", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

async fn test(args: Vec<String>) -> anyhow::Result<()> {
    let root = root();
    let pg = postgres::ensure(&root).await?;
    let dropped = postgres::drop_test_leftovers(&pg.admin_url).await?;
    if dropped > 0 {
        println!("xtask: dropped {dropped} databases left by earlier test runs");
    }
    let rvault = ensure_rvault(&root)?;
    let mut command = cargo();
    if has_nextest() {
        command.args(["nextest", "run", "--workspace", "--no-fail-fast"]);
    } else {
        command.args(["test", "--workspace", "--no-fail-fast"]);
    }
    command.args(&args).env("SOCLE_TEST_PG_URL", &pg.admin_url).env("SOCLE_RVAULT", &rvault);
    let status = command.status()?;
    // Leave nothing behind on a shared cluster.
    let _ = postgres::drop_test_leftovers(&pg.admin_url).await;
    drop(pg);
    check(status, "tests")
}

async fn bench(name: &str) -> anyhow::Result<()> {
    let pg = postgres::ensure(&root()).await?;
    let status = cargo()
        .args(["run", "--release", "--quiet", "-p", "socle-loadtests", "--", name])
        .env("SOCLE_TEST_PG_URL", &pg.admin_url)
        .status()?;
    let _ = postgres::drop_test_leftovers(&pg.admin_url).await;
    drop(pg);
    check(status, "benchmark")
}

/// npm-installed `buf` under `.tools/`.
fn ensure_buf(root: &Path) -> anyhow::Result<PathBuf> {
    let buf = root.join(".tools/node_modules/.bin/buf");
    if !buf.exists() {
        println!("xtask: installing buf (npm @bufbuild/buf) into .tools/");
        let status = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--silent", "--prefix"])
            .arg(root.join(".tools"))
            .arg("@bufbuild/buf@1.75.0")
            .status()
            .context("npm is required to install buf")?;
        check(status, "npm install @bufbuild/buf")?;
    }
    Ok(buf)
}

fn lint(against: Option<String>) -> anyhow::Result<()> {
    let root = root();
    check(cargo().args(["fmt", "--all", "--check"]).status()?, "cargo fmt --check")?;
    let buf = ensure_buf(&root)?;
    check(Command::new(&buf).arg("lint").current_dir(&root).status()?, "buf lint")?;
    breaking(&root, &buf, against)?;
    check(
        cargo().args(["clippy", "--workspace", "--all-targets", "--quiet", "--", "-D", "warnings"]).status()?,
        "cargo clippy",
    )?;
    println!("xtask: lint passed");
    Ok(())
}

/// `buf breaking` against `against`, or against `origin/main` when it is not
/// this commit, or else against the previous commit. Skipped,
/// with a message, when the reference has no contracts yet.
fn breaking(root: &Path, buf: &Path, against: Option<String>) -> anyhow::Result<()> {
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git").args(args).current_dir(root).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let head = git(&["rev-parse", "HEAD"]).context("not a git checkout")?;
    let reference = against.or_else(|| {
        let main = git(&["rev-parse", "--verify", "--quiet", "origin/main"]).filter(|m| *m != head);
        main.map(|_| "origin/main".to_owned())
            .or_else(|| git(&["rev-parse", "--verify", "--quiet", "HEAD~1"]).map(|_| "HEAD~1".to_owned()))
    });
    let Some(reference) = reference else {
        println!("xtask: buf breaking skipped: no earlier commit to compare with");
        return Ok(());
    };
    let has_protos =
        git(&["ls-tree", "-r", "--name-only", &reference, "proto/socle"]).is_some_and(|l| l.contains(".proto"));
    if !has_protos {
        println!("xtask: buf breaking skipped: {reference} has no contracts yet");
        return Ok(());
    }
    let commit = git(&["rev-parse", &reference]).context("cannot resolve the reference")?;
    println!("xtask: buf breaking against {reference} ({})", &commit[..12]);
    let against = format!(".git#ref={commit}");
    check(Command::new(buf).args(["breaking", "--against", &against]).current_dir(root).status()?, "buf breaking")
}
