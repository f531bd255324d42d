//! The outbox relay against the real audit service and real PostgreSQL:
//! crashes between the audit's append and the relay's commit, the audit
//! service down for a while, PostgreSQL restarted under load, and several
//! workers sharing one outbox. In every case each committed event ends up
//! stored exactly once.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use diesel::{
    QueryableByName,
    sql_types::{Array, BigInt, Text, Uuid as SqlUuid},
};
use diesel_async::SimpleAsyncConnection;
use futures::future::BoxFuture;
use socle_config::SecretString;
use socle_db::{Database, EntityScope};
use socle_errors::Error;
use socle_outbox::{AuditEvent, Relay, RelaySettings, Sink, backlog, enqueue, enqueue_all};
use socle_proto::socle::{
    audit::v1::Outcome,
    r#type::v1::{ActorKind, ActorRef},
};
use socle_server::audit::GrpcSink;
use socle_testkit::{RunningService, Service, TestDatabase, respawn_service, spawn_service};
use tokio::sync::Notify;
use uuid::Uuid;

/// A service database with the platform SQL (the outbox table) installed,
/// opened as its application role.
async fn emitter(database: &TestDatabase) -> anyhow::Result<Database> {
    let mut owner = socle_db::admin::connect(&database.owner_url).await?;
    owner.batch_execute(socle_db::SCOPE_FUNCTIONS_SQL).await?;
    socle_db::admin::grant_app_role(&mut owner, &database.app_role).await?;
    Ok(Database::connect(&SecretString::from(database.app_url_with_password()), 8, Duration::from_secs(5)).await?)
}

fn event(entity: Uuid, n: usize) -> AuditEvent {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    AuditEvent {
        id: Uuid::now_v7().to_string(),
        entity_id: entity.to_string(),
        actor: Some(ActorRef {
            kind: ActorKind::ServiceAccount as i32,
            id: Uuid::new_v4().to_string(),
            display_name: String::new(),
        }),
        acting_entity_id: entity.to_string(),
        service: "crm".into(),
        action: "crm.organizations.update".into(),
        resource_type: "crm.organization".into(),
        resource_id: format!("org-{n}"),
        outcome: Outcome::Ok as i32,
        request_id: format!("req-{n}"),
        occur_time: Some(prost_types::Timestamp { seconds: now.as_secs() as i64, nanos: now.subsec_nanos() as i32 }),
        ..AuditEvent::default()
    }
}

fn ids(events: &[AuditEvent]) -> Vec<Uuid> {
    events.iter().map(|e| Uuid::parse_str(&e.id).unwrap()).collect()
}

async fn commit(db: &Database, events: Vec<AuditEvent>) -> Result<(), Error> {
    db.transaction(&EntityScope::System, |conn| Box::pin(async move { enqueue_all(conn, &events).await })).await
}

fn sink_to(audit_url: &str) -> GrpcSink {
    GrpcSink::new(socle_server::remote_auth::channel(audit_url).unwrap(), None)
}

fn quick() -> RelaySettings {
    RelaySettings {
        workers: 2,
        batch_size: 100,
        poll_interval: Duration::from_millis(100),
        min_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(500),
    }
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = BigInt)]
    copies: i64,
}

/// How many times each of `ids` is stored in the audit service's database
/// (read as the cluster superuser, past row-level security).
async fn stored(audit: &RunningService, ids: &[Uuid]) -> anyhow::Result<HashMap<Uuid, i64>> {
    use diesel_async::RunQueryDsl;
    let mut conn = socle_db::admin::connect(&audit.database.owner_url).await?;
    let rows: Vec<Count> =
        diesel::sql_query("SELECT id::text AS id, count(*) AS copies FROM audit_events WHERE id = ANY($1) GROUP BY id")
            .bind::<Array<SqlUuid>, _>(ids.to_vec())
            .load(&mut conn)
            .await?;
    Ok(rows.into_iter().map(|r| (Uuid::parse_str(&r.id).unwrap(), r.copies)).collect())
}

async fn drained(db: &Database, within: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match backlog(db).await {
            Ok(b) if b.pending == 0 => return Ok(()),
            Ok(b) if tokio::time::Instant::now() > deadline => anyhow::bail!("the outbox did not drain: {b:?}"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn assert_exactly_once(counts: &HashMap<Uuid, i64>, expected: &[Uuid]) {
    let missing: Vec<_> = expected.iter().filter(|id| !counts.contains_key(id)).collect();
    assert!(missing.is_empty(), "{} events lost, e.g. {:?}", missing.len(), missing.first());
    let doubled: Vec<_> = counts.iter().filter(|(_, n)| **n != 1).collect();
    assert!(doubled.is_empty(), "events stored more than once: {doubled:?}");
}

/// Appends for real, then hangs as if the process died before committing
/// the deletion of the delivered rows.
struct CrashAfterAppend {
    inner: GrpcSink,
    appended: Arc<Notify>,
}

impl Sink for CrashAfterAppend {
    fn append(&self, events: Vec<AuditEvent>) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            self.inner.append(events).await?;
            self.appended.notify_one();
            futures::future::pending().await
        })
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_killed_after_the_append_but_before_its_commit_delivers_again_and_the_event_is_stored_once() {
    let audit = spawn_service(Service::Audit).await.unwrap();
    let database = TestDatabase::create("outbox_kill").await.unwrap();
    let db = emitter(&database).await.unwrap();
    let entity = Uuid::new_v4();
    let events = vec![event(entity, 1), event(entity, 2)];
    let expected = ids(&events);
    commit(&db, events).await.unwrap();

    // The first relay has its own pool, like a process of its own.
    let first_db = emitter(&database).await.unwrap();
    let appended = Arc::new(Notify::new());
    let sink = CrashAfterAppend { inner: sink_to(&audit.url()), appended: appended.clone() };
    let relay = Relay::start("test", first_db.clone(), Arc::new(sink), quick());
    tokio::time::timeout(Duration::from_secs(20), appended.notified()).await.expect("the first relay appended");
    // The audit service has the events; the outbox still has them too.
    assert_exactly_once(&stored(&audit, &expected).await.unwrap(), &expected);
    relay.abort();
    drop(first_db);
    assert_eq!(backlog(&db).await.unwrap().pending, 2, "the killed relay's batch is rolled back");

    let relay = Relay::start("test", db.clone(), Arc::new(sink_to(&audit.url())), quick());
    drained(&db, Duration::from_secs(30)).await.unwrap();
    relay.stop().await;
    assert_exactly_once(&stored(&audit, &expected).await.unwrap(), &expected);
}

#[derive(QueryableByName)]
struct Retried {
    #[diesel(sql_type = BigInt)]
    retried: i64,
}

#[tokio::test(flavor = "multi_thread")]
async fn while_the_audit_service_is_down_events_wait_and_the_backlog_drains_when_it_returns() {
    let audit = spawn_service(Service::Audit).await.unwrap();
    let database = TestDatabase::create("outbox_down").await.unwrap();
    let db = emitter(&database).await.unwrap();
    let relay = Relay::start("test", db.clone(), Arc::new(sink_to(&audit.url())), quick());
    let stopped = audit.stop_for_restart().await.unwrap();

    let entity_a = Uuid::new_v4();
    let entity_b = Uuid::new_v4();
    let mut expected = Vec::new();
    for batch in 0..30 {
        let events: Vec<_> =
            (0..10).map(|n| event(if n % 2 == 0 { entity_a } else { entity_b }, batch * 10 + n)).collect();
        expected.extend(ids(&events));
        commit(&db, events).await.unwrap();
    }
    // The relay tries, fails and backs off; nothing leaves the outbox.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        use diesel_async::RunQueryDsl;
        let retried: Retried = diesel::sql_query("SELECT count(*) AS retried FROM socle_outbox WHERE attempts > 0")
            .get_result(&mut socle_db::admin::connect(&database.owner_url).await.unwrap())
            .await
            .unwrap();
        if retried.retried > 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the relay never tried to deliver");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(backlog(&db).await.unwrap().pending, 300);

    let audit = respawn_service(stopped, |_| {}).await.unwrap();
    drained(&db, Duration::from_secs(60)).await.unwrap();
    relay.stop().await;
    assert_exactly_once(&stored(&audit, &expected).await.unwrap(), &expected);
}

/// Counts what the relay hands over, per event id.
struct Counting {
    inner: GrpcSink,
    seen: Mutex<HashMap<String, usize>>,
}

impl Sink for Counting {
    fn append(&self, events: Vec<AuditEvent>) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let names: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
            self.inner.append(events).await?;
            let mut seen = self.seen.lock().unwrap();
            for id in names {
                *seen.entry(id).or_default() += 1;
            }
            Ok(())
        })
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn several_workers_never_deliver_the_same_row_twice() {
    let audit = spawn_service(Service::Audit).await.unwrap();
    let database = TestDatabase::create("outbox_workers").await.unwrap();
    let db = emitter(&database).await.unwrap();
    let sink = Arc::new(Counting { inner: sink_to(&audit.url()), seen: Mutex::new(HashMap::new()) });
    let settings = RelaySettings { workers: 4, batch_size: 25, ..quick() };
    let relay = Relay::start("test", db.clone(), sink.clone(), settings);
    let entities: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    let mut expected = Vec::new();
    for batch in 0..40 {
        let events: Vec<_> = (0..25).map(|n| event(entities[n % entities.len()], batch * 25 + n)).collect();
        expected.extend(ids(&events));
        commit(&db, events).await.unwrap();
    }
    drained(&db, Duration::from_secs(60)).await.unwrap();
    relay.stop().await;
    let seen = sink.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), expected.len());
    assert!(seen.values().all(|n| *n == 1), "a row was delivered by two workers");
    assert_exactly_once(&stored(&audit, &expected).await.unwrap(), &expected);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_written_in_a_rolled_back_transaction_is_never_delivered() {
    let audit = spawn_service(Service::Audit).await.unwrap();
    let database = TestDatabase::create("outbox_rollback").await.unwrap();
    let db = emitter(&database).await.unwrap();
    let entity = Uuid::new_v4();
    let kept = event(entity, 1);
    let dropped = event(entity, 2);
    commit(&db, vec![kept.clone()]).await.unwrap();
    let failed: Result<(), Error> = db
        .transaction(&EntityScope::System, |conn| {
            let dropped = dropped.clone();
            Box::pin(async move {
                enqueue(conn, &dropped).await?;
                Err(Error::invalid_argument("the change itself failed"))
            })
        })
        .await;
    assert!(failed.is_err());
    let relay = Relay::start("test", db.clone(), Arc::new(sink_to(&audit.url())), quick());
    drained(&db, Duration::from_secs(30)).await.unwrap();
    relay.stop().await;
    let both = [ids(std::slice::from_ref(&kept)), ids(std::slice::from_ref(&dropped))].concat();
    let counts = stored(&audit, &both).await.unwrap();
    assert_eq!(counts.get(&both[0]), Some(&1));
    assert_eq!(counts.get(&both[1]), None, "the rolled-back event reached the audit trail");
}

#[tokio::test(flavor = "multi_thread")]
async fn postgresql_restarted_under_load_loses_no_committed_event() {
    // A cluster of our own: restarting the shared one would disturb the
    // tests running beside this one.
    let base = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cluster = socle_db::cluster::PrivateCluster::prepare(base.path(), port, false).unwrap();
    cluster.start().unwrap();
    let database = TestDatabase::create_on(&cluster.admin_url(), "outbox_restart").await.unwrap();
    let db = emitter(&database).await.unwrap();
    let audit = spawn_service(Service::Audit).await.unwrap();
    let relay = Relay::start("test", db.clone(), Arc::new(sink_to(&audit.url())), quick());

    let running = Arc::new(AtomicBool::new(true));
    let committed = Arc::new(Mutex::new(Vec::new()));
    let attempted = Arc::new(Mutex::new(HashSet::new()));
    let mut writers = Vec::new();
    for writer in 0..4 {
        let (db, running, committed, attempted) = (db.clone(), running.clone(), committed.clone(), attempted.clone());
        writers.push(tokio::spawn(async move {
            let entity = Uuid::new_v4();
            let mut n = 0;
            while running.load(Ordering::Relaxed) {
                n += 1;
                let one = event(entity, writer * 1_000_000 + n);
                let id = Uuid::parse_str(&one.id).unwrap();
                attempted.lock().unwrap().insert(id);
                match commit(&db, vec![one]).await {
                    Ok(()) => committed.lock().unwrap().push(id),
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = committed.lock().unwrap().len();
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.stop().unwrap();
        std::thread::sleep(Duration::from_millis(500));
        cluster.start().unwrap();
        cluster
    })
    .await
    .unwrap();
    let after_restart = committed.lock().unwrap().len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    running.store(false, Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }
    let committed = committed.lock().unwrap().clone();
    assert!(before > 0, "no load before the restart");
    assert!(committed.len() > after_restart, "writes did not resume after the restart");

    drained(&db, Duration::from_secs(60)).await.unwrap();
    relay.stop().await;
    let attempted: Vec<Uuid> = attempted.lock().unwrap().iter().copied().collect();
    let counts = stored(&audit, &attempted).await.unwrap();
    // Every committed event exactly once; an event whose commit answer was
    // lost in the restart may be stored too, never twice.
    assert_exactly_once(
        &counts.iter().filter(|(id, _)| committed.contains(id)).map(|(k, v)| (*k, *v)).collect(),
        &committed,
    );
    assert!(counts.values().all(|n| *n == 1));
    drop(db);
    let _ = cluster.stop();
}
