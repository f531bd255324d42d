//! Row-level security with the entity scope, on a real PostgreSQL, as the
//! non-owner application role every service uses.

use diesel::{QueryableByName, sql_types::Text};
use diesel_async::RunQueryDsl;
use socle_config::SecretString;
use socle_db::{Database, DbError, EmbeddedMigrations, EntityScope, embed_migrations};
use socle_errors::Code;
use socle_testkit::TestDatabase;
use uuid::Uuid;

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("tests/migrations");

#[derive(QueryableByName)]
struct Label {
    #[diesel(sql_type = Text)]
    label: String,
}

/// Inserts one row (the caller's transaction decides the scope).
async fn insert(conn: &mut socle_db::Connection, entity: Uuid, label: &str) -> Result<(), DbError> {
    diesel::sql_query("INSERT INTO things (id, entity_id, label) VALUES ($1, $2, $3)")
        .bind::<diesel::sql_types::Uuid, _>(Uuid::new_v4())
        .bind::<diesel::sql_types::Uuid, _>(entity)
        .bind::<Text, _>(label.to_owned())
        .execute(conn)
        .await?;
    Ok(())
}

struct Fixture {
    db: Database,
    a: Uuid,
    b: Uuid,
    _database: TestDatabase,
}

async fn fixture() -> Fixture {
    let database = TestDatabase::create("db_rls").await.unwrap();
    let applied =
        socle_db::migrate(&SecretString::from(database.owner_url.clone()), MIGRATIONS, Some(&database.app_role))
            .await
            .unwrap();
    assert_eq!(applied.len(), 1);
    let db =
        Database::connect(&SecretString::from(database.app_url_with_password()), 2, std::time::Duration::from_secs(5))
            .await
            .unwrap();
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    db.transaction(&EntityScope::System, |conn| {
        Box::pin(async move {
            for (entity, label) in [(a, "a1"), (a, "a2"), (b, "b1")] {
                insert(conn, entity, label).await?;
            }
            Ok::<_, DbError>(())
        })
    })
    .await
    .unwrap();
    Fixture { db, a, b, _database: database }
}

async fn visible(db: &Database, scope: EntityScope) -> Vec<String> {
    db.transaction(&scope, |conn| {
        Box::pin(async move {
            // No entity filter: row-level security alone decides.
            let rows: Vec<Label> = diesel::sql_query("SELECT label FROM things ORDER BY label").load(conn).await?;
            Ok::<_, DbError>(rows.into_iter().map(|r| r.label).collect())
        })
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_query_without_entity_filter_sees_only_the_scope() {
    let f = fixture().await;
    assert_eq!(visible(&f.db, EntityScope::entity(f.a)).await, ["a1", "a2"]);
    assert_eq!(visible(&f.db, EntityScope::entity(f.b)).await, ["b1"]);
    assert_eq!(visible(&f.db, EntityScope::Entities(vec![f.a, f.b])).await, ["a1", "a2", "b1"]);
    assert!(visible(&f.db, EntityScope::none()).await.is_empty());
    // The scope is transaction-local: a pooled connection does not keep it.
    assert!(visible(&f.db, EntityScope::none()).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn writing_into_another_entity_is_refused_and_rolled_back() {
    let f = fixture().await;
    let b = f.b;
    let result =
        f.db.transaction(&EntityScope::entity(f.a), |conn| {
            Box::pin(async move {
                insert(conn, b, "intruder").await?;
                Ok::<_, DbError>(())
            })
        })
        .await;
    let error = socle_errors::Error::from(result.unwrap_err());
    assert_eq!(error.code(), Code::PermissionDenied);
    assert_eq!(visible(&f.db, EntityScope::entity(b)).await, ["b1"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_error_rolls_back_the_whole_transaction() {
    let f = fixture().await;
    let a = f.a;
    let result =
        f.db.transaction(&EntityScope::entity(a), |conn| {
            Box::pin(async move {
                insert(conn, a, "a3").await?;
                // Duplicate label: unique violation after a successful insert.
                insert(conn, a, "a1").await?;
                Ok::<_, DbError>(())
            })
        })
        .await;
    let error = socle_errors::Error::from(result.unwrap_err());
    assert_eq!(error.code(), Code::AlreadyExists);
    assert_eq!(visible(&f.db, EntityScope::entity(a)).await, ["a1", "a2"], "a3 was rolled back");
}

#[tokio::test(flavor = "multi_thread")]
async fn constraint_violations_map_to_field_errors_without_sql() {
    let f = fixture().await;
    let a = f.a;
    let result =
        f.db.transaction(&EntityScope::entity(a), |conn| {
            Box::pin(async move {
                insert(conn, a, "").await?;
                Ok::<_, DbError>(())
            })
        })
        .await;
    let status = socle_errors::Error::from(result.unwrap_err()).into_status(None);
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(!status.message().contains("INSERT"), "{}", status.message());
}
