//! The connection pool on a real PostgreSQL: a transaction costs its own
//! statements only (no test query at checkout, the scope sent with the
//! BEGIN), and a connection the server ended is replaced without the caller
//! seeing an error.

use diesel::{
    QueryableByName,
    sql_types::{Bool, Integer},
};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use socle_config::SecretString;
use socle_db::{Database, DbError, EntityScope, statements};
use socle_testkit::TestDatabase;

#[derive(QueryableByName)]
struct Pid {
    #[diesel(sql_type = Integer)]
    pid: i32,
}

#[derive(QueryableByName)]
struct Done {
    #[diesel(sql_type = Bool)]
    done: bool,
}

async fn backend_pid(db: &Database) -> Result<i32, DbError> {
    db.transaction(&EntityScope::none(), |conn| {
        Box::pin(async move {
            let row: Pid = diesel::sql_query("SELECT pg_backend_pid() AS pid").get_result(conn).await?;
            Ok::<_, DbError>(row.pid)
        })
    })
    .await
}

async fn pool(database: &TestDatabase) -> Database {
    // One connection, so that the next transaction reuses the same one.
    Database::connect(&SecretString::from(database.app_url_with_password()), 1, std::time::Duration::from_secs(5))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_sends_begin_with_its_scope_then_body_then_commit() {
    let database = TestDatabase::create("db_pool").await.unwrap();
    let db = pool(&database).await;
    backend_pid(&db).await.unwrap(); // the connection exists and is idle
    let (pid, sent) = statements::count(backend_pid(&db)).await;
    pid.unwrap();
    // BEGIN with set_config (the scope) in one round trip, the body's
    // statement, COMMIT: no test query at checkout, no separate scope.
    assert_eq!(sent, 3, "a transaction costs more round trips than its own");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_the_server_ended_is_replaced_silently() {
    let database = TestDatabase::create("db_pool").await.unwrap();
    let db = pool(&database).await;
    let first = backend_pid(&db).await.unwrap();

    // The server ends the pooled (idle) connection, as a restart or an
    // operator's pg_terminate_backend would.
    let mut admin = AsyncPgConnection::establish(&socle_testkit::pg_admin_url()).await.unwrap();
    let ended: Done = diesel::sql_query("SELECT pg_terminate_backend($1) AS done")
        .bind::<Integer, _>(first)
        .get_result(&mut admin)
        .await
        .unwrap();
    assert!(ended.done);

    // The next transaction runs, on a new connection.
    let second = backend_pid(&db).await.expect("the closed connection was not replaced");
    assert_ne!(first, second);
    assert_eq!(backend_pid(&db).await.unwrap(), second, "the new connection is pooled");
}
