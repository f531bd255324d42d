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
