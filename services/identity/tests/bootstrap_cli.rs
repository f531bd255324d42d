//! The operator command of the identity binary: the first administrator is
//! invited; no password exists until they accept.

use std::process::Command;

use diesel::{
    QueryableByName,
    sql_types::{Nullable, SmallInt, Text},
};
use diesel_async::RunQueryDsl;
use socle_testkit::TestDatabase;

#[tokio::test(flavor = "multi_thread")]
async fn the_first_administrator_is_invited_by_a_command() {
    let db = TestDatabase::create("identity_cli").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets.toml");
    let key = socle_identity::keys::SigningKey::generate_pkcs8_base64();
    std::fs::write(
        &secrets,
        format!(
            "db_password = \"{}\"\nsigning_key = \"{}\"\n",
            db.app_password,
            socle_config::ExposeSecret::expose_secret(&key)
        ),
    )
    .unwrap();
    let config = dir.path().join("identity.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = \"{}\"\npassword = \"file:db_password\"\nowner_url = \"{}\"\nmigrate_on_start = true\napp_role = \"{}\"\n\n\
             [secrets]\nfile = \"{}\"\n\n[auth]\nsigning_key = \"file:signing_key\"\nconsole_url = \"https://console.socle.example\"\n",
            db.app_url,
            db.owner_url,
            db.app_role,
            secrets.display()
        ),
    )
    .unwrap();
    let root = uuid::Uuid::new_v4().to_string();
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_socle-identity"))
            .args(["bootstrap-admin", "Admin@Federation.fr", &root])
            .env_clear()
            .env("SOCLE_CONFIG", &config)
            .output()
            .expect("the identity binary runs")
    };
    let first = run();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let stdout = String::from_utf8(first.stdout).unwrap();
    assert!(stdout.contains("invitation_url = https://console.socle.example/invitation#token="), "{stdout}");

    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = SmallInt)]
        state: i16,
        #[diesel(sql_type = Nullable<Text>)]
        password_hash: Option<String>,
    }
    let mut conn = socle_db::admin::connect(&db.owner_url).await.unwrap();
    let rows: Vec<Row> =
        diesel::sql_query("SELECT state, password_hash FROM users WHERE email_normalized = 'admin@federation.fr'")
            .load(&mut conn)
            .await
            .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].state, 1, "invited");
    assert!(rows[0].password_hash.is_none(), "no password exists until the invitation is accepted");

    let second = run();
    assert!(second.status.success());
    assert!(String::from_utf8(second.stdout).unwrap().contains("already exists"), "no second account, no second link");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_platform_service_account_is_ensured_by_a_command_without_printing_its_secret() {
    use std::io::Write;
    let db = TestDatabase::create("identity_sa_cli").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets.toml");
    let first_secret = "premier-secret-0123456789abcdefghijklmnop";
    std::fs::write(
        &secrets,
        format!("db_password = \"{}\"\ncrm_client_secret = \"{first_secret}\"\n", db.app_password),
    )
    .unwrap();
    let config = dir.path().join("identity.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = \"{}\"\npassword = \"file:db_password\"\nowner_url = \"{}\"\nmigrate_on_start = true\napp_role = \"{}\"\n\n\
             [secrets]\nfile = \"{}\"\n",
            db.app_url,
            db.owner_url,
            db.app_role,
            secrets.display()
        ),
    )
    .unwrap();
    let root = uuid::Uuid::new_v4().to_string();
    let run = |locator: &str, stdin: Option<&str>| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_socle-identity"))
            .args(["ensure-service-account", "crm-service", &root, "sa-crm", locator])
            .env_clear()
            .env("SOCLE_CONFIG", &config)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("the identity binary runs");
        if let Some(text) = stdin {
            child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        }
        drop(child.stdin.take());
        child.wait_with_output().unwrap()
    };
    #[derive(QueryableByName)]
    struct Account {
        #[diesel(sql_type = diesel::sql_types::Uuid)]
        id: uuid::Uuid,
        #[diesel(sql_type = diesel::sql_types::Bytea)]
        secret_hash: Vec<u8>,
    }
    let accounts = || async {
        let mut conn = socle_db::admin::connect(&db.owner_url).await.unwrap();
        diesel::sql_query("SELECT id, secret_hash FROM service_accounts WHERE client_id = 'sa-crm'")
            .load::<Account>(&mut conn)
            .await
            .unwrap()
    };

    let created = run("file:crm_client_secret", None);
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let stdout = String::from_utf8(created.stdout).unwrap();
    assert!(!stdout.contains(first_secret), "the secret is never printed");
    let rows = accounts().await;
    assert_eq!(rows.len(), 1);
    assert!(stdout.contains(&format!("service_account_id = {}", rows[0].id)), "{stdout}");
    assert_eq!(rows[0].secret_hash, socle_identity::tokens::hash_token(first_secret));

    // Rotated from standard input: the same account, the new secret.
    let second_secret = "second-secret-abcdefghijklmnopqrstuvwxyz0123";
    let rotated = run("-", Some(&format!("{second_secret}\n")));
    assert!(rotated.status.success(), "{}", String::from_utf8_lossy(&rotated.stderr));
    assert!(!String::from_utf8(rotated.stdout).unwrap().contains(second_secret));
    let rows = accounts().await;
    assert_eq!(rows.len(), 1, "updated, not duplicated");
    assert_eq!(rows[0].secret_hash, socle_identity::tokens::hash_token(second_secret));

    let weak = run("-", Some("short\n"));
    assert!(!weak.status.success(), "a short secret is refused");
    assert_eq!(accounts().await[0].secret_hash, socle_identity::tokens::hash_token(second_secret));
}
