//! The operator commands of the tenancy binary, run as an operator would.

use std::process::Command;

use diesel::{QueryableByName, sql_types::Text};
use diesel_async::RunQueryDsl;
use socle_testkit::TestDatabase;

fn run(config: &std::path::Path, args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_socle-tenancy"))
        .args(args)
        .env_clear()
        .env("SOCLE_CONFIG", config)
        .env("SOCLE_TELEMETRY__LOG_LEVEL", "warn")
        .output()
        .expect("the tenancy binary runs");
    assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

fn value<'a>(stdout: &'a str, key: &str) -> &'a str {
    stdout.lines().find_map(|l| l.strip_prefix(&format!("{key} = "))).unwrap_or_else(|| panic!("no {key} in {stdout}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_first_administrator_is_granted_by_a_command() {
    let db = TestDatabase::create("tenancy_cli").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets.toml");
    std::fs::write(&secrets, format!("db_password = \"{}\"\n", db.app_password)).unwrap();
    let config = dir.path().join("tenancy.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = \"{}\"\npassword = \"file:db_password\"\nowner_url = \"{}\"\nmigrate_on_start = true\napp_role = \"{}\"\n\n[secrets]\nfile = \"{}\"\n",
            db.app_url,
            db.owner_url,
            db.app_role,
            secrets.display()
        ),
    )
    .unwrap();

    let root = run(&config, &["bootstrap-root"]);
    let root_id = value(&root, "root_entity_id").to_owned();
    assert_eq!(value(&run(&config, &["bootstrap-root"]), "root_entity_id"), root_id, "idempotent");

    let admin = uuid::Uuid::new_v4().to_string();
    let granted = run(&config, &["bootstrap-grant", &admin, "national_admin"]);
    assert!(granted.contains(&root_id), "{granted}");
    run(&config, &["bootstrap-grant", &admin, "national_admin"]);

    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = Text)]
        role: String,
    }
    let mut conn = socle_db::admin::connect(&db.owner_url).await.unwrap();
    let rows: Vec<Row> = diesel::sql_query(format!(
        "SELECT r.name AS role FROM grants g JOIN roles r ON r.id = g.role_id WHERE g.principal_id = '{admin}' AND g.scope = 2"
    ))
    .load(&mut conn)
    .await
    .unwrap();
    assert_eq!(rows.iter().map(|r| r.role.as_str()).collect::<Vec<_>>(), ["national_admin"], "granted once");

    // A platform service account (identity's deletes grants, so it holds identity_service).
    let account = uuid::Uuid::new_v4().to_string();
    run(&config, &["bootstrap-grant", "--service-account", &account, "identity_service"]);
    #[derive(QueryableByName)]
    struct Kind {
        #[diesel(sql_type = diesel::sql_types::SmallInt)]
        principal_kind: i16,
    }
    let kinds: Vec<Kind> =
        diesel::sql_query(format!("SELECT principal_kind FROM grants WHERE principal_id = '{account}'"))
            .load(&mut conn)
            .await
            .unwrap();
    assert_eq!(kinds.iter().map(|k| k.principal_kind).collect::<Vec<_>>(), [2], "granted to a service account");

    let refused = Command::new(env!("CARGO_BIN_EXE_socle-tenancy"))
        .args(["bootstrap-grant", &admin, "superuser"])
        .env_clear()
        .env("SOCLE_CONFIG", &config)
        .output()
        .unwrap();
    assert!(!refused.status.success(), "only built-in roles");
}
