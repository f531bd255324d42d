//! Counting the SQL statements a piece of work sends, for N+1 guards and
//! per-call instrumentation.
//!
//! Every pooled connection carries [`Counter`], a diesel instrumentation
//! that adds one to the counter of the current task, if any, before each
//! statement (transaction control included). [`count`] runs a future with
//! a fresh counter and returns how many statements it sent, so a test can
//! assert that a list call sends the same number of statements whatever
//! its page size.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use diesel::connection::{Instrumentation, InstrumentationEvent};

tokio::task_local! {
    static STATEMENTS: Arc<AtomicU64>;
}

/// The instrumentation installed on every pooled connection.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counter;

impl Instrumentation for Counter {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        if let InstrumentationEvent::StartQuery { .. } = event {
            let _ = STATEMENTS.try_with(|count| count.fetch_add(1, Ordering::Relaxed));
        }
    }
}

/// Runs `work` and returns its output with the number of statements it sent
/// through pooled connections (in this task).
pub async fn count<F: Future>(work: F) -> (F::Output, u64) {
    let counter = Arc::new(AtomicU64::new(0));
    let output = STATEMENTS.scope(counter.clone(), work).await;
    (output, counter.load(Ordering::Relaxed))
}
