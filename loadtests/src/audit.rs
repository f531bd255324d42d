//! `cargo xtask bench audit`: append throughput of the audit store
//! (validation, one chain lock per entity per batch, SHA-256 chaining,
//! sealing of personal values, one multi-row insert, checkpoints, a durable
//! commit per batch) against plain multi-row INSERTs of the very same rows
//! into a table with the same columns and indexes, measured in the same run.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use diesel::QueryableByName;
use diesel_async::{RunQueryDsl, SimpleAsyncConnection};
use socle_audit::{
    keys::Keys,
    store::{EVENT_COLUMNS, EventRow, Store, StoreOptions},
};
use socle_config::SecretString;
use socle_db::{Database, EntityScope};
use socle_proto::socle::{
    audit::v1::{AuditEvent, FieldChange, Outcome},
    r#type::v1::{ActorKind, ActorRef},
};
use socle_testkit::TestDatabase;
use uuid::Uuid;

const BATCH: usize = 500;
const BATCHES: usize = 80;
const WORKERS: usize = 4;
const ENTITIES: usize = 40;
/// Entities per batch: a relay's batch holds the events of a few entities.
const ENTITIES_PER_BATCH: usize = 5;

fn text(s: &str) -> prost_types::Value {
    prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(s.into())) }
}

fn events(entities: &[Uuid]) -> Vec<Vec<AuditEvent>> {
    (0..BATCHES)
        .map(|b| {
            let group = b % (ENTITIES / ENTITIES_PER_BATCH);
            (0..BATCH)
                .map(|i| {
                    let entity = entities[group * ENTITIES_PER_BATCH + i % ENTITIES_PER_BATCH];
                    let mut changes = vec![FieldChange {
                        field_path: "legal_name".into(),
                        before: Some(text("Boulangerie Martin")),
                        after: Some(text("Boulangerie Martin et Fils")),
                        ..Default::default()
                    }];
                    if i % 10 == 0 {
                        changes.push(FieldChange {
                            field_path: "email".into(),
                            before: Some(text("jeanne.martin@exemple.fr")),
                            after: Some(text("j.martin@exemple.fr")),
                            personal_data: true,
                            ..Default::default()
                        });
                    }
                    AuditEvent {
                        id: Uuid::now_v7().to_string(),
                        entity_id: entity.to_string(),
                        actor: Some(ActorRef {
                            kind: ActorKind::User as i32,
                            id: Uuid::new_v4().to_string(),
                            display_name: String::new(),
                        }),
                        acting_entity_id: entity.to_string(),
                        service: "crm".into(),
                        action: "crm.contacts.update".into(),
                        resource_type: "crm.contact".into(),
                        resource_id: Uuid::new_v4().to_string(),
                        outcome: Outcome::Ok as i32,
                        request_id: Uuid::new_v4().to_string(),
                        trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
                        client_address: "203.0.113.7".into(),
                        occur_time: Some(socle_api::timestamp(chrono::Utc::now())),
                        changes,
                        ..Default::default()
                    }
                })
                .collect()
        })
        .collect()
}

/// Runs `work` on every batch with `WORKERS` tasks; events per second.
async fn run<F, Fut>(batches: Vec<Vec<AuditEvent>>, work: F) -> anyhow::Result<f64>
where
    F: Fn(Vec<AuditEvent>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let total: usize = batches.iter().map(Vec::len).sum();
    let queue = Arc::new(Mutex::new(batches.into_iter().rev().collect::<Vec<_>>()));
    let work = Arc::new(work);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..WORKERS {
        let (queue, work) = (queue.clone(), work.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let next = queue.lock().expect("queue").pop();
                let Some(batch) = next else { return Ok::<_, anyhow::Error>(()) };
                work(batch).await?;
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

#[derive(QueryableByName)]
struct Setting {
    #[diesel(sql_type = diesel::sql_types::Text)]
    value: String,
}

async fn setting(db: &Database, name: &'static str) -> anyhow::Result<String> {
    Ok(db
        .transaction(&EntityScope::System, move |conn| {
            Box::pin(async move {
                let row: Setting = diesel::sql_query(format!("SELECT current_setting('{name}') AS value"))
                    .get_result(conn)
                    .await
                    .map_err(socle_db::DbError::from)?;
                Ok::<_, socle_db::DbError>(row.value)
            })
        })
        .await?)
}

/// The benchmark.
pub async fn audit() -> anyhow::Result<()> {
    let database = TestDatabase::create("bench_audit").await?;
    socle_db::migrate(
        &SecretString::from(database.owner_url.clone()),
        socle_audit::MIGRATIONS,
        Some(&database.app_role),
    )
    .await?;
    socle_audit::restrict_role(&database.owner_url, &database.app_role).await?;
    let mut owner = socle_db::admin::connect(&database.owner_url).await?;
    // Same columns, constraints and indexes; no trigger, no row-level security.
    owner
        .batch_execute(&format!(
            "CREATE TABLE bench_plain (LIKE audit_events INCLUDING ALL);
             GRANT SELECT, INSERT ON bench_plain TO {role};",
            role = database.app_role
        ))
        .await?;
    let db = Database::connect(
        &SecretString::from(database.app_url_with_password()),
        WORKERS as u32 + 1,
        Duration::from_secs(10),
    )
    .await?;
    println!(
        "audit benchmark: {BATCHES} batches of {BATCH} events over {ENTITIES} entities ({ENTITIES_PER_BATCH} per batch), \
         {WORKERS} writers, synchronous_commit = {}, fsync = {}",
        setting(&db, "synchronous_commit").await?,
        setting(&db, "fsync").await?
    );
    let store = Store::open(db.clone(), Keys::ephemeral(), StoreOptions::default())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let entities: Vec<Uuid> = (0..ENTITIES).map(|_| Uuid::new_v4()).collect();

    // Warm-up (not measured): one batch on each path.
    let warm = events(&entities).remove(0);
    store
        .append(socle_audit::validate::events(warm).map_err(|e| anyhow::anyhow!("{e}"))?)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;

    // The store's CPU share, on one thread: validation and the canonical
    // encoding (for the digest and the hash) of every event.
    let cpu_batches = events(&entities);
    let started = Instant::now();
    for batch in cpu_batches {
        for mut event in socle_audit::validate::events(batch).map_err(|e| anyhow::anyhow!("{e}"))? {
            event.changes.retain(|c| !c.personal_data);
            let bytes = socle_audit::canonical::canonical(&event).map_err(anyhow::Error::msg)?;
            socle_audit::canonical::sha256(&bytes);
            socle_audit::canonical::chain_hash(socle_audit::canonical::GENESIS_HASH, &bytes)
                .map_err(anyhow::Error::msg)?;
        }
    }
    let cpu = (BATCHES * BATCH) as f64 / started.elapsed().as_secs_f64();

    let batches = events(&entities);
    let ids: Vec<Vec<String>> = batches.iter().map(|b| b.iter().map(|e| e.id.clone()).collect()).collect();
    let appender = store.clone();
    let appended = run(batches, move |batch| {
        let store = appender.clone();
        async move {
            let batch = socle_audit::validate::events(batch).map_err(|e| anyhow::anyhow!("{e}"))?;
            store.append(batch).await.map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok(())
        }
    })
    .await?;

    // The same rows, as stored, in the same batches.
    let rows: Vec<EventRow> =
        diesel::sql_query(format!("SELECT {EVENT_COLUMNS} FROM audit_events")).load(&mut owner).await?;
    let mut by_id: HashMap<String, AuditEvent> =
        rows.iter().map(EventRow::to_proto).map(|e| (e.id.clone(), e)).collect();
    let same: Vec<Vec<AuditEvent>> =
        ids.iter().map(|batch| batch.iter().map(|id| by_id.remove(id).expect("stored")).collect()).collect();
    let plain_db = db.clone();
    let plain = run(same, move |batch| {
        let db = plain_db.clone();
        async move {
            db.transaction(&EntityScope::System, move |conn| {
                Box::pin(async move { socle_audit::store::insert_plain(conn, "bench_plain", &batch).await })
            })
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
        }
    })
    .await?;

    let verified = store.verify(entities[0], Default::default()).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    anyhow::ensure!(verified.first_break.is_none(), "the benchmark's chain must verify");
    println!("  plain multi-row INSERTs      {plain:9.0} events/s");
    println!("  AppendEvents store path      {appended:9.0} events/s");
    println!("  ratio append / plain         {:9.2}   (aim ≥ 0.50)", appended / plain);
    println!("  validation + encoding alone  {cpu:9.0} events/s (one thread, no database)");
    Ok(())
}
