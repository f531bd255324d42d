//! Brute-force protection for sign-in.
//!
//! Failures are counted under three keys, each in a 15-minute window:
//!
//! - **account + address**: after 5 failures the pair is locked, first for
//!   30 s, then twice as long at each further failure, up to 15 minutes.
//!   This is what stops a guesser, and it never affects the same account
//!   used from another address;
//! - **account** (all addresses): after 20 failures the account is locked
//!   for 15 minutes — a bounded lock, so that an attacker spreading guesses
//!   over many addresses cannot keep a person out for longer;
//! - **address** (all accounts): after 50 failures the address is locked for
//!   15 minutes (credential stuffing).
//!
//! A successful sign-in clears its account and pair counters, not the
//! address counter (one valid account must not launder an address).

use chrono::{DateTime, Duration, Utc};
use diesel::{
    QueryableByName,
    sql_types::{Array, Integer, Nullable, Text, Timestamptz},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use socle_db::DbError;

/// The window in which failures add up.
pub const WINDOW_MINUTES: i64 = 15;
/// Failures of one account from one address before its first lock.
pub const PAIR_THRESHOLD: i32 = 5;
/// Failures of one account, all addresses, before a lock.
pub const ACCOUNT_THRESHOLD: i32 = 20;
/// Failures from one address, all accounts, before a lock.
pub const ADDRESS_THRESHOLD: i32 = 50;
/// The longest lock.
pub const MAX_LOCK_SECONDS: i64 = 15 * 60;

/// The keys of one attempt: (kind, key) with kind `pair`, `account` or
/// `address`.
pub struct Keys {
    entries: Vec<(&'static str, String)>,
}

impl Keys {
    /// Keys for a (normalised) e-mail and a client address.
    pub fn new(email: &str, address: &str) -> Self {
        Keys {
            entries: vec![
                ("pair", format!("pair:{email}|{address}")),
                ("account", format!("account:{email}")),
                ("address", format!("address:{address}")),
            ],
        }
    }

    /// Password-reset requests, counted apart from sign-ins (so that
    /// requesting resets cannot lock a person out of signing in): the same
    /// thresholds under `reset-` keys.
    pub fn reset(email: &str, address: &str) -> Self {
        Keys {
            entries: vec![
                ("pair", format!("reset-pair:{email}|{address}")),
                ("account", format!("reset-account:{email}")),
                ("address", format!("reset-address:{address}")),
            ],
        }
    }

    /// Wrong password-reset tokens, counted per client address only.
    pub fn reset_address(address: &str) -> Self {
        Keys { entries: vec![("address", format!("reset-address:{address}"))] }
    }

    fn all(&self) -> Vec<String> {
        self.entries.iter().map(|(_, k)| k.clone()).collect()
    }
}

/// The lock duration after `failures` failures under a key with `threshold`.
fn lock_seconds(kind: &str, failures: i32) -> Option<i64> {
    match kind {
        "pair" if failures >= PAIR_THRESHOLD => {
            let doublings = (failures - PAIR_THRESHOLD).min(10) as u32;
            Some((30i64 << doublings).min(MAX_LOCK_SECONDS))
        }
        "account" if failures >= ACCOUNT_THRESHOLD => Some(MAX_LOCK_SECONDS),
        "address" if failures >= ADDRESS_THRESHOLD => Some(MAX_LOCK_SECONDS),
        _ => None,
    }
}

/// How long until every lock on these keys is over, if one is active.
pub async fn locked_for(conn: &mut AsyncPgConnection, keys: &Keys) -> Result<Option<std::time::Duration>, DbError> {
    #[derive(QueryableByName)]
    struct Until {
        #[diesel(sql_type = Nullable<Timestamptz>)]
        until: Option<DateTime<Utc>>,
    }
    let row: Until = diesel::sql_query(
        "SELECT max(locked_until) AS until FROM login_throttle WHERE key = ANY($1) AND locked_until > now()",
    )
    .bind::<Array<Text>, _>(keys.all())
    .get_result(conn)
    .await?;
    Ok(row.until.map(|until| (until - Utc::now()).to_std().unwrap_or_default()))
}

/// Counts a failure under every key; returns the lock it triggered, if any.
pub async fn record_failure(conn: &mut AsyncPgConnection, keys: &Keys) -> Result<Option<(String, i64)>, DbError> {
    let mut triggered = None;
    for (kind, key) in &keys.entries {
        #[derive(QueryableByName)]
        struct Failures {
            #[diesel(sql_type = Integer)]
            failures: i32,
        }
        let row: Failures = diesel::sql_query(format!(
            "INSERT INTO login_throttle AS t (key, failures, last_failure_time) VALUES ($1, 1, now())
             ON CONFLICT (key) DO UPDATE SET
                failures = CASE WHEN t.last_failure_time < now() - interval '{WINDOW_MINUTES} minutes'
                                THEN 1 ELSE t.failures + 1 END,
                last_failure_time = now()
             RETURNING failures"
        ))
        .bind::<Text, _>(key)
        .get_result(conn)
        .await?;
        if let Some(seconds) = lock_seconds(kind, row.failures) {
            diesel::sql_query("UPDATE login_throttle SET locked_until = $2 WHERE key = $1")
                .bind::<Text, _>(key)
                .bind::<Timestamptz, _>(Utc::now() + Duration::seconds(seconds))
                .execute(conn)
                .await?;
            triggered.get_or_insert(((*kind).to_owned(), seconds));
        }
    }
    Ok(triggered)
}

/// Clears the account and pair counters after a successful sign-in.
pub async fn record_success(conn: &mut AsyncPgConnection, keys: &Keys) -> Result<(), DbError> {
    diesel::sql_query("DELETE FROM login_throttle WHERE key = ANY($1)")
        .bind::<Array<Text>, _>(
            keys.entries.iter().filter(|(kind, _)| *kind != "address").map(|(_, k)| k.clone()).collect::<Vec<_>>(),
        )
        .execute(conn)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_locks_grow_and_stay_bounded() {
        assert_eq!(lock_seconds("pair", 4), None);
        assert_eq!(lock_seconds("pair", 5), Some(30));
        assert_eq!(lock_seconds("pair", 6), Some(60));
        assert_eq!(lock_seconds("pair", 8), Some(240));
        assert_eq!(lock_seconds("pair", 40), Some(MAX_LOCK_SECONDS));
        assert_eq!(lock_seconds("account", 19), None);
        assert_eq!(lock_seconds("account", 500), Some(MAX_LOCK_SECONDS), "never longer than 15 minutes");
    }
}
