//! The transactional outbox (ADR 0006).
//!
//! A service writes a change and the audit event describing it in the same
//! PostgreSQL transaction: [`enqueue`] inserts the encoded
//! `socle.audit.v1.AuditEvent` into the `socle_outbox` table (installed in
//! every service database by `socle_db::migrate`) and signals the relay with
//! `NOTIFY`, which PostgreSQL delivers only when the transaction commits.
//! Both commit or neither does.
//!
//! A [`Relay`] runs worker tasks inside the service process. Each worker, in
//! one transaction, locks a batch of due rows `FOR UPDATE SKIP LOCKED` (so
//! workers, and several replicas of a service, never share a row), hands the
//! batch to a [`Sink`] (the audit service's `AppendEvents`), and deletes the
//! rows once the sink has stored them; on failure it records the error and
//! pushes the rows' next attempt back with exponential backoff and jitter.
//! A crash anywhere before the commit leaves the rows in place: delivery is
//! at least once, and the audit append is idempotent on the event id, so
//! each event is stored exactly once.
//!
//! Metrics (meter `socle.outbox`): `socle.outbox.delivered` and
//! `socle.outbox.failures` (events), `socle.outbox.lag` (seconds from the
//! row's insertion to the moment the delivering batch picked it up, i.e.
//! time spent waiting in the outbox; histogram), `socle.outbox.backlog` (rows waiting)
//! and `socle.outbox.oldest_age` (seconds, age of the oldest waiting row).

use std::{sync::Arc, time::Duration};

use diesel::{
    QueryableByName,
    sql_types::{Array, BigInt, Bytea, Double, Integer, Text, Uuid as SqlUuid},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use futures::{StreamExt, future::BoxFuture};
use opentelemetry::{
    KeyValue,
    metrics::{Counter, Gauge, Histogram},
};
use prost::Message;
use socle_db::{Database, DbError, EntityScope};
use socle_errors::{Code, Error};
pub use socle_proto::socle::audit::v1::AuditEvent;
use tokio::{sync::watch, task::JoinHandle};
use uuid::Uuid;

/// The `LISTEN`/`NOTIFY` channel that wakes the relay.
pub const CHANNEL: &str = "socle_outbox";

/// Writes `event` to the outbox inside the caller's transaction. The event
/// id must be a UUID (v7 recommended): it is the idempotency key of the
/// append on the audit side.
pub async fn enqueue(conn: &mut AsyncPgConnection, event: &AuditEvent) -> Result<(), Error> {
    enqueue_all(conn, std::slice::from_ref(event)).await
}

/// Writes several events in one statement (see [`enqueue`]).
pub async fn enqueue_all(conn: &mut AsyncPgConnection, events: &[AuditEvent]) -> Result<(), Error> {
    if events.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::with_capacity(events.len());
    let mut payloads = Vec::with_capacity(events.len());
    for event in events {
        let id = Uuid::parse_str(&event.id)
            .map_err(|_| Error::internal(format!("audit event id `{}` is not a UUID", event.id)))?;
        ids.push(id);
        payloads.push(event.encode_to_vec());
    }
    diesel::sql_query("INSERT INTO socle_outbox (id, payload) SELECT * FROM unnest($1::uuid[], $2::bytea[])")
        .bind::<Array<SqlUuid>, _>(ids)
        .bind::<Array<Bytea>, _>(payloads)
        .execute(conn)
        .await
        .map_err(|e| Error::from(DbError::from(e)))?;
    diesel::sql_query(format!("NOTIFY {CHANNEL}")).execute(conn).await.map_err(|e| Error::from(DbError::from(e)))?;
    Ok(())
}

/// Where the relay delivers events: the audit service.
pub trait Sink: Send + Sync + 'static {
    /// Stores `events` durably, all or nothing; `Ok` only once every event is
    /// stored. Storing an event again must be harmless (idempotent on id).
    fn append(&self, events: Vec<AuditEvent>) -> BoxFuture<'_, Result<(), Error>>;
}

/// How the relay runs.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// Worker tasks (each delivers one batch at a time).
    pub workers: usize,
    /// Largest batch handed to the sink.
    pub batch_size: usize,
    /// How often an idle worker looks for due rows when no notification
    /// arrives (rows waiting for their backoff, a lost `LISTEN` connection).
    pub poll_interval: Duration,
    /// First retry delay; doubled at each failure of the same row.
    pub min_backoff: Duration,
    /// Largest retry delay.
    pub max_backoff: Duration,
}

impl Default for RelaySettings {
    fn default() -> Self {
        RelaySettings {
            workers: 2,
            batch_size: 200,
            poll_interval: Duration::from_secs(1),
            min_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// What is waiting in an outbox.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backlog {
    /// Rows not delivered yet.
    pub pending: i64,
    /// Age of the oldest of them, in seconds (0 when none).
    pub oldest_age_secs: f64,
}

#[derive(QueryableByName)]
struct BacklogRow {
    #[diesel(sql_type = BigInt)]
    pending: i64,
    #[diesel(sql_type = Double)]
    oldest_age_secs: f64,
}

/// Reads the backlog of `db`'s outbox.
pub async fn backlog(db: &Database) -> Result<Backlog, Error> {
    db.transaction(&EntityScope::System, |conn| {
        Box::pin(async move {
            let row: BacklogRow = diesel::sql_query(
                "SELECT count(*) AS pending,
                        coalesce(extract(epoch FROM clock_timestamp() - min(create_time)), 0)::float8 AS oldest_age_secs
                 FROM socle_outbox",
            )
            .get_result(conn)
            .await
            .map_err(|e| Error::from(DbError::from(e)))?;
            Ok(Backlog { pending: row.pending, oldest_age_secs: row.oldest_age_secs })
        })
    })
    .await
}

#[derive(Clone)]
struct Instruments {
    delivered: Counter<u64>,
    failures: Counter<u64>,
    lag: Histogram<f64>,
    backlog: Gauge<u64>,
    oldest_age: Gauge<f64>,
    service: KeyValue,
}

impl Instruments {
    fn new(service: &'static str) -> Self {
        let meter = opentelemetry::global::meter("socle.outbox");
        Instruments {
            delivered: meter
                .u64_counter("socle.outbox.delivered")
                .with_description("Audit events delivered by the outbox relay")
                .build(),
            failures: meter
                .u64_counter("socle.outbox.failures")
                .with_description("Audit events whose delivery failed (retried)")
                .build(),
            lag: meter
                .f64_histogram("socle.outbox.lag")
                .with_unit("s")
                .with_description("Time an event waited in the outbox before the batch that delivered it")
                .build(),
            backlog: meter.u64_gauge("socle.outbox.backlog").with_description("Events waiting in the outbox").build(),
            oldest_age: meter
                .f64_gauge("socle.outbox.oldest_age")
                .with_unit("s")
                .with_description("Age of the oldest event waiting in the outbox")
                .build(),
            service: KeyValue::new("service", service),
        }
    }
}

/// Running relay workers; [`Relay::stop`] lets each finish its batch.
pub struct Relay {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Starts the workers, a `LISTEN` task that wakes them when events are
    /// committed, and a task publishing the backlog gauges.
    pub fn start(service: &'static str, db: Database, sink: Arc<dyn Sink>, settings: RelaySettings) -> Relay {
        let (stop, stopped) = watch::channel(false);
        let (wake, woken) = watch::channel(0u64);
        let instruments = Instruments::new(service);
        let mut tasks = vec![tokio::spawn(listen(db.clone(), wake, stopped.clone()))];
        for worker in 0..settings.workers.max(1) {
            let worker = Worker {
                db: db.clone(),
                sink: sink.clone(),
                settings: settings.clone(),
                instruments: instruments.clone(),
                service,
                worker,
            };
            tasks.push(tokio::spawn(worker.run(woken.clone(), stopped.clone())));
        }
        tasks.push(tokio::spawn(publish_backlog(db, instruments, settings.poll_interval, stopped)));
        Relay { stop, tasks }
    }

    /// Stops every task at once, mid-batch, as a crash would: a batch in
    /// flight is rolled back by PostgreSQL (its connection is discarded,
    /// never returned to the pool inside a transaction) and redelivered by
    /// the next relay.
    pub fn abort(self) {
        for task in &self.tasks {
            task.abort();
        }
    }

    /// Stops the workers after their current batch.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

async fn listen(db: Database, wake: watch::Sender<u64>, mut stopped: watch::Receiver<bool>) {
    loop {
        let session = async {
            let mut conn = db.dedicated_connection().await?;
            diesel::sql_query(format!("LISTEN {CHANNEL}")).execute(&mut conn).await.map_err(DbError::from)?;
            // Rows committed while we were not listening.
            wake.send_modify(|n| *n += 1);
            let mut notifications = std::pin::pin!(conn.notifications_stream());
            while let Some(notification) = notifications.next().await {
                notification.map_err(DbError::from)?;
                wake.send_modify(|n| *n += 1);
            }
            Ok::<(), DbError>(())
        };
        tokio::select! {
            result = session => {
                if let Err(error) = result {
                    tracing::debug!(error = %error, "outbox listener lost its connection; reconnecting");
                }
            }
            _ = stopped.wait_for(|s| *s) => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
    }
}

async fn publish_backlog(db: Database, instruments: Instruments, every: Duration, mut stopped: watch::Receiver<bool>) {
    loop {
        if let Ok(current) = backlog(&db).await {
            instruments.backlog.record(current.pending.max(0) as u64, std::slice::from_ref(&instruments.service));
            instruments.oldest_age.record(current.oldest_age_secs, std::slice::from_ref(&instruments.service));
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
    }
}

struct Worker {
    db: Database,
    sink: Arc<dyn Sink>,
    settings: RelaySettings,
    instruments: Instruments,
    service: &'static str,
    worker: usize,
}

#[derive(QueryableByName)]
struct DueRow {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = Bytea)]
    payload: Vec<u8>,
    #[diesel(sql_type = Double)]
    age_secs: f64,
}

/// What one round of a worker did.
enum Round {
    /// Nothing was due.
    Idle,
    /// `n` events were handled (delivered or rescheduled).
    Handled(usize),
}

/// Errors the sink will answer again for the same events: retrying the
/// batch as a whole cannot succeed, so each event is tried on its own.
fn is_permanent(error: &Error) -> bool {
    matches!(
        error.code(),
        Code::InvalidArgument | Code::AlreadyExists | Code::FailedPrecondition | Code::PermissionDenied
    )
}

impl Worker {
    async fn run(self, mut woken: watch::Receiver<u64>, mut stopped: watch::Receiver<bool>) {
        let mut failures = 0u32;
        loop {
            if *stopped.borrow() {
                return;
            }
            match self.round().await {
                Ok(Round::Handled(n)) if n >= self.settings.batch_size => {
                    failures = 0;
                    continue;
                }
                Ok(_) => failures = 0,
                Err(error) => {
                    // The outbox itself is unreachable (database down):
                    // back off before the next round.
                    failures = failures.saturating_add(1);
                    let delay = backoff(&self.settings, failures);
                    tracing::warn!(service = self.service, worker = self.worker, error = %error, ?delay,
                        "outbox relay cannot read its outbox");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stopped.wait_for(|s| *s) => return,
                    }
                    continue;
                }
            }
            tokio::select! {
                _ = woken.changed() => {}
                _ = tokio::time::sleep(self.settings.poll_interval) => {}
                _ = stopped.wait_for(|s| *s) => return,
            }
        }
    }

    async fn round(&self) -> Result<Round, Error> {
        let (sink, settings, instruments) = (self.sink.clone(), self.settings.clone(), self.instruments.clone());
        let limit = self.settings.batch_size.max(1) as i64;
        self.db
            .transaction(&EntityScope::System, move |conn| {
                Box::pin(async move {
                    let rows: Vec<DueRow> = diesel::sql_query(
                        "SELECT id, payload,
                                extract(epoch FROM clock_timestamp() - create_time)::float8 AS age_secs
                         FROM socle_outbox
                         WHERE next_attempt_time <= clock_timestamp()
                         ORDER BY create_time
                         LIMIT $1
                         FOR UPDATE SKIP LOCKED",
                    )
                    .bind::<BigInt, _>(limit)
                    .load(conn)
                    .await
                    .map_err(|e| Error::from(DbError::from(e)))?;
                    if rows.is_empty() {
                        return Ok(Round::Idle);
                    }
                    let handled = rows.len();
                    let mut events = Vec::with_capacity(rows.len());
                    let mut corrupt = Vec::new();
                    for row in &rows {
                        match AuditEvent::decode(row.payload.as_slice()) {
                            Ok(event) => events.push((row.id, row.age_secs, event)),
                            Err(_) => corrupt.push(row.id),
                        }
                    }
                    if !corrupt.is_empty() {
                        tracing::error!(count = corrupt.len(), "outbox rows that do not decode are set aside");
                        reschedule(conn, &corrupt, "the payload does not decode", &settings, true).await?;
                    }
                    if events.is_empty() {
                        return Ok(Round::Handled(handled));
                    }
                    let batch: Vec<AuditEvent> = events.iter().map(|(_, _, e)| e.clone()).collect();
                    match sink.append(batch).await {
                        Ok(()) => {
                            delivered(conn, &events, &instruments).await?;
                        }
                        Err(error) if is_permanent(&error) && events.len() > 1 => {
                            // One bad event must not hold back the others.
                            for one in &events {
                                match sink.append(vec![one.2.clone()]).await {
                                    Ok(()) => delivered(conn, std::slice::from_ref(one), &instruments).await?,
                                    Err(error) => {
                                        failed(conn, &[one.0], &error, &settings, &instruments).await?;
                                    }
                                }
                            }
                        }
                        Err(error) => {
                            let ids: Vec<Uuid> = events.iter().map(|(id, ..)| *id).collect();
                            failed(conn, &ids, &error, &settings, &instruments).await?;
                        }
                    }
                    Ok(Round::Handled(handled))
                })
            })
            .await
    }
}

async fn delivered(
    conn: &mut AsyncPgConnection,
    events: &[(Uuid, f64, AuditEvent)],
    instruments: &Instruments,
) -> Result<(), Error> {
    let ids: Vec<Uuid> = events.iter().map(|(id, ..)| *id).collect();
    diesel::sql_query("DELETE FROM socle_outbox WHERE id = ANY($1)")
        .bind::<Array<SqlUuid>, _>(ids)
        .execute(conn)
        .await
        .map_err(|e| Error::from(DbError::from(e)))?;
    let attributes = std::slice::from_ref(&instruments.service);
    instruments.delivered.add(events.len() as u64, attributes);
    for (_, age, _) in events {
        instruments.lag.record(*age, attributes);
    }
    Ok(())
}

async fn failed(
    conn: &mut AsyncPgConnection,
    ids: &[Uuid],
    error: &Error,
    settings: &RelaySettings,
    instruments: &Instruments,
) -> Result<(), Error> {
    tracing::warn!(count = ids.len(), code = ?error.code(), error = %error, "outbox delivery failed; will retry");
    instruments.failures.add(ids.len() as u64, std::slice::from_ref(&instruments.service));
    let message = format!("{:?}: {}", error.code(), error);
    reschedule(conn, ids, &message, settings, false).await
}

/// Pushes the rows' next attempt back: `min · 2^attempts`, capped, with
/// jitter in [½, 1]; set-aside rows wait the maximum.
async fn reschedule(
    conn: &mut AsyncPgConnection,
    ids: &[Uuid],
    message: &str,
    settings: &RelaySettings,
    set_aside: bool,
) -> Result<(), Error> {
    let min = settings.min_backoff.as_secs_f64();
    let max = settings.max_backoff.as_secs_f64();
    diesel::sql_query(
        "UPDATE socle_outbox
         SET attempts = attempts + 1,
             last_error = left($2, 500),
             next_attempt_time = clock_timestamp() + make_interval(secs =>
               CASE WHEN $5 = 1 THEN $4
                    ELSE least($4, $3 * power(2, least(attempts, 30))) * (0.5 + random() * 0.5) END)
         WHERE id = ANY($1)",
    )
    .bind::<Array<SqlUuid>, _>(ids.to_vec())
    .bind::<Text, _>(message)
    .bind::<Double, _>(min)
    .bind::<Double, _>(max)
    .bind::<Integer, _>(i32::from(set_aside))
    .execute(conn)
    .await
    .map_err(|e| Error::from(DbError::from(e)))?;
    Ok(())
}

fn backoff(settings: &RelaySettings, failures: u32) -> Duration {
    let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(16));
    settings.min_backoff.saturating_mul(factor).min(settings.max_backoff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let settings = RelaySettings {
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            ..RelaySettings::default()
        };
        assert_eq!(backoff(&settings, 1), Duration::from_millis(100));
        assert_eq!(backoff(&settings, 2), Duration::from_millis(200));
        assert_eq!(backoff(&settings, 4), Duration::from_millis(800));
        assert_eq!(backoff(&settings, 5), Duration::from_secs(1));
        assert_eq!(backoff(&settings, 40), Duration::from_secs(1));
    }

    #[test]
    fn permanent_errors_are_those_a_retry_cannot_fix() {
        assert!(is_permanent(&Error::invalid_argument("bad")));
        assert!(!is_permanent(&Error::unavailable("down")));
        assert!(!is_permanent(&Error::internal("boom")));
    }
}
