//! Configuration layers against real sources: a TOML file, environment
//! variables given as data (never `set_var`), and a real Vault-API server
//! (RustyVault).

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use socle_config::{ExposeSecret, HasSecretSources, SecretRef, SecretsSettings, Sources, VaultSettings, load};
use socle_testkit::vault::Vault;

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct TestConfig {
    server: Server,
    database: Database,
    vault: VaultSettings,
    secrets: SecretsSettings,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Server {
    name: String,
    port: u16,
    workers: u32,
}

impl Default for Server {
    fn default() -> Self {
        Server { name: "default".into(), port: 0, workers: 0 }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Database {
    password: Option<SecretRef>,
}

impl HasSecretSources for TestConfig {
    fn vault(&self) -> &VaultSettings {
        &self.vault
    }
    fn secrets(&self) -> &SecretsSettings {
        &self.secrets
    }
}

fn file(contents: &str) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), contents).unwrap();
    file
}

#[tokio::test]
async fn defaults_then_file_then_env() {
    let f = file("[server]\nname = \"from-file\"\nport = 1\nworkers = 1\n");
    let sources = Sources::file(f.path()).with_env("SOCLE_SERVER__WORKERS", "2").with_env("UNRELATED", "x");
    let (config, _) = load::<TestConfig>(&sources).await.unwrap();
    assert_eq!(config.server.name, "from-file");
    assert_eq!(config.server.port, 1);
    assert_eq!(config.server.workers, 2, "env beats the file");
    let (config, _) = load::<TestConfig>(&Sources::default()).await.unwrap();
    assert_eq!(config.server.name, "default");
}

#[tokio::test(flavor = "multi_thread")]
async fn vault_beats_env_beats_file_and_resolves_secrets() {
    let vault = Vault::start().await.expect("rvault starts");
    vault.put("socle/test/config", serde_json::json!({ "server.port": "3" })).await.unwrap();
    vault.put("socle/test/secrets", serde_json::json!({ "db_password": "s3cr3t-from-vault" })).await.unwrap();
    let f = file(&format!(
        "[server]\nname = \"from-file\"\nport = 1\nworkers = 1\n\
         [database]\npassword = \"vault:secret/socle/test/secrets#db_password\"\n\
         [vault]\naddress = \"{}\"\nmount = \"secret\"\nconfig_path = \"socle/test/config\"\nkv_version = 1\n",
        vault.address
    ));
    let sources = Sources::file(f.path())
        .with_env("SOCLE_SERVER__PORT", "2")
        .with_env("SOCLE_SERVER__WORKERS", "2")
        .with_env("SOCLE_VAULT__TOKEN", vault.token.clone());
    let (config, secrets) = load::<TestConfig>(&sources).await.unwrap();
    assert_eq!(config.server.port, 3, "vault beats env and file");
    assert_eq!(config.server.workers, 2, "env beats file");
    assert_eq!(config.server.name, "from-file");
    let password = secrets.resolve(config.database.password.as_ref().unwrap()).await.unwrap();
    assert_eq!(password.expose_secret(), "s3cr3t-from-vault");

    // A locator naming a missing key is an error naming the locator only.
    let missing = SecretRef::parse("vault:secret/socle/test/secrets#nope").unwrap();
    let error = secrets.resolve(&missing).await.unwrap_err().to_string();
    assert!(error.contains("vault:secret/socle/test/secrets#nope"), "{error}");
    assert!(!error.contains("s3cr3t"), "{error}");

    // A wrong token is refused at start-up, without echoing the token.
    let sources = Sources::file(f.path()).with_env("SOCLE_VAULT__TOKEN", "not-a-token");
    let error = load::<TestConfig>(&sources).await.unwrap_err().to_string();
    assert!(error.contains("vault"), "{error}");
    assert!(!error.contains("not-a-token"), "{error}");
}

#[tokio::test]
async fn unknown_keys_and_invalid_values_name_the_key() {
    let f = file("[server]\nprot = 8080\n");
    let error = load::<TestConfig>(&Sources::file(f.path())).await.unwrap_err().to_string();
    assert!(error.contains("prot"), "{error}");
    assert!(error.contains("server"), "{error}");

    let sources = Sources::default().with_env("SOCLE_SERVER__PORT", "eighty");
    let error = load::<TestConfig>(&sources).await.unwrap_err().to_string();
    assert!(error.contains("SOCLE_SERVER__PORT"), "{error}");
    assert!(error.contains("eighty"), "{error}");

    let sources = Sources::default().with_env("SOCLE_DATABSE__PASSWORD", "file:x");
    let error = load::<TestConfig>(&sources).await.unwrap_err().to_string();
    assert!(error.contains("databse"), "{error}");

    let missing = Sources::file("/nonexistent/socle.toml");
    let error = load::<TestConfig>(&missing).await.unwrap_err().to_string();
    assert!(error.contains("/nonexistent/socle.toml"), "{error}");
}

/// Captures everything logged on this thread.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn secret_values_never_reach_logs_debug_or_errors() {
    const SECRET: &str = "Tr0ub4dor&3-never-print";
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber =
        tracing_subscriber::fmt().with_max_level(tracing::Level::TRACE).with_writer(move || writer.clone()).finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let secrets_file = file(&format!("db_password = \"{SECRET}\"\n"));
    let f = file(&format!(
        "[database]\npassword = \"file:db_password\"\n[secrets]\nfile = \"{}\"\n",
        secrets_file.path().display()
    ));
    let sources = Sources::file(f.path()).with_env("SOCLE_VAULT__TOKEN", SECRET);
    let (config, secrets) = load::<TestConfig>(&sources).await.unwrap();
    let password = secrets.resolve(config.database.password.as_ref().unwrap()).await.unwrap();
    assert_eq!(password.expose_secret(), SECRET);
    tracing::info!(?config, ?password, ?secrets, "loaded");

    let printed = [
        format!("{config:?}"),
        format!("{password:?}"),
        format!("{secrets:?}"),
        format!("{:?}", config.vault),
        String::from_utf8(capture.0.lock().unwrap().clone()).unwrap(),
    ];
    for text in &printed {
        assert!(!text.contains(SECRET), "secret printed in: {text}");
    }
    assert!(printed[4].contains("loaded"), "the log line was captured");

    // A literal where a locator belongs is refused without being echoed.
    let f = file(&format!("[database]\npassword = \"{SECRET}\"\n"));
    let error = load::<TestConfig>(&Sources::file(f.path())).await.unwrap_err().to_string();
    assert!(error.contains("locator"), "{error}");
    assert!(!error.contains(SECRET), "{error}");
}
