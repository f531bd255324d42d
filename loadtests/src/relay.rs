//! `cargo xtask bench relay`: end-to-end lag of audit events through the
//! transactional outbox under load.
//!
//! Writers commit transactions that each enqueue one audit event (the shape
//! of a business write's event) into a service database, as fast as they
//! can, for `RUN`; the outbox relay (default settings: 2 workers, batches of
//! 200, woken by `NOTIFY`) delivers them to the real audit service over
//! gRPC. Reported: the write rate, the delivery rate, the lag of each event
//! from its commit to its record in the audit chain (p50/p95/p99/max), and
//! how long the backlog takes to drain once the writers stop. The baseline
//! is the write rate itself: the relay keeps up when delivered/written ≈ 1.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use diesel::{QueryableByName, sql_types::Double};
use diesel_async::{RunQueryDsl as _, SimpleAsyncConnection};
use socle_config::SecretString;
use socle_db::{Database, EntityScope};
use socle_outbox::{AuditEvent, Relay, RelaySettings, backlog, enqueue};
use socle_proto::socle::{
    audit::v1::Outcome,
    r#type::v1::{ActorKind, ActorRef},
};
use socle_testkit::{Service, TestDatabase, spawn_service};
use uuid::Uuid;

const RUN: Duration = Duration::from_secs(10);
const WRITERS: usize = 8;

fn event(entity: Uuid, actor: &str, n: u64) -> AuditEvent {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    AuditEvent {
        id: Uuid::now_v7().to_string(),
        entity_id: entity.to_string(),
        actor: Some(ActorRef { kind: ActorKind::User as i32, id: actor.to_owned(), display_name: String::new() }),
        acting_entity_id: entity.to_string(),
        service: "crm".into(),
        action: "crm.organizations.update".into(),
        resource_type: "crm.organization".into(),
        resource_id: format!("{n}"),
        outcome: Outcome::Ok as i32,
        request_id: Uuid::now_v7().to_string(),
        occur_time: Some(prost_types::Timestamp { seconds: now.as_secs() as i64, nanos: now.subsec_nanos() as i32 }),
        ..AuditEvent::default()
    }
}

#[derive(QueryableByName)]
struct Lag {
    #[diesel(sql_type = Double)]
    p50: f64,
    #[diesel(sql_type = Double)]
    p95: f64,
    #[diesel(sql_type = Double)]
    p99: f64,
    #[diesel(sql_type = Double)]
    max: f64,
}

/// Runs the benchmark and prints its figures.
pub async fn relay() -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    println!("relay benchmark: {cores} cores, {WRITERS} writers for {}s", RUN.as_secs());
    let audit = spawn_service(Service::Audit).await?;
    let database = TestDatabase::create("bench_relay").await?;
    {
        let mut owner = socle_db::admin::connect(&database.owner_url).await?;
        owner.batch_execute(socle_db::SCOPE_FUNCTIONS_SQL).await?;
        socle_db::admin::grant_app_role(&mut owner, &database.app_role).await?;
    }
    let db =
        Database::connect(&SecretString::from(database.app_url_with_password()), 16, Duration::from_secs(5)).await?;
    let channel = socle_server::remote_auth::channel(&audit.url()).map_err(anyhow::Error::msg)?;
    let relay = Relay::start(
        "bench",
        db.clone(),
        Arc::new(socle_server::audit::GrpcSink::new(channel, None)),
        RelaySettings::default(),
    );

    // Ten entities (chains), like a handful of busy branches.
    let entities: Arc<Vec<Uuid>> = Arc::new((0..10).map(|_| Uuid::new_v4()).collect());
    let running = Arc::new(AtomicBool::new(true));
    let written = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let (db, running, written, entities) = (db.clone(), running.clone(), written.clone(), entities.clone());
        writers.push(tokio::spawn(async move {
            let actor = Uuid::new_v4().to_string();
            let mut n = 0u64;
            while AtomicBool::load(&running, Ordering::Relaxed) {
                n += 1;
                let one = event(entities[(writer + n as usize) % entities.len()], &actor, n);
                let result = db
                    .transaction(&EntityScope::System, |conn| Box::pin(async move { enqueue(conn, &one).await }))
                    .await;
                if result.is_ok() {
                    written.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(RUN).await;
    running.store(false, Ordering::Relaxed);
    for writer in writers {
        writer.await?;
    }
    let load_time = started.elapsed();
    let written = AtomicU64::load(&written, Ordering::Relaxed);
    let waiting = backlog(&db).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let stopped = Instant::now();
    loop {
        let current = backlog(&db).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        if current.pending == 0 {
            break;
        }
        anyhow::ensure!(stopped.elapsed() < Duration::from_secs(300), "the outbox did not drain: {current:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drain = stopped.elapsed();
    let total = started.elapsed();
    relay.stop().await;

    let mut conn = socle_db::admin::connect(&audit.database.owner_url).await?;
    let lag: Lag = diesel::sql_query(
        "SELECT percentile_cont(0.50) WITHIN GROUP (ORDER BY s) AS p50,
                percentile_cont(0.95) WITHIN GROUP (ORDER BY s) AS p95,
                percentile_cont(0.99) WITHIN GROUP (ORDER BY s) AS p99,
                max(s) AS max
           FROM (SELECT extract(epoch FROM record_time - occur_time)::float8 AS s FROM audit_events
                  WHERE service = 'crm') lags",
    )
    .get_result(&mut conn)
    .await?;
    #[derive(QueryableByName)]
    struct Stored {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let stored: Stored =
        diesel::sql_query("SELECT count(*) AS n FROM audit_events WHERE service = 'crm'").get_result(&mut conn).await?;
    anyhow::ensure!(stored.n as u64 == written, "{written} events committed but {} stored", stored.n);

    let write_rate = written as f64 / load_time.as_secs_f64();
    let delivery_rate = written as f64 / total.as_secs_f64();
    println!("  events committed          {written:8} ({write_rate:.0}/s, one event per transaction)");
    println!("  backlog when writers stop {:8}", waiting.pending);
    println!("  drain after the load      {:8.2} s", drain.as_secs_f64());
    println!("  delivered / committed     {:8.2}   (rates over the whole run; 1.00 = the relay keeps up)", {
        delivery_rate / write_rate
    });
    println!(
        "  commit → audit chain lag  p50 {:.3} s  p95 {:.3} s  p99 {:.3} s  max {:.3} s",
        lag.p50, lag.p95, lag.p99, lag.max
    );
    println!("  stored exactly once       {} of {written}", stored.n);
    Ok(())
}
