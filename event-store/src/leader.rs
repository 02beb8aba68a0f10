//! Souk's single-writer points (the relay of a stream, each projector
//! partition, the search indexer of a database, a projection's rebuild) are
//! elected through Postgres session advisory locks: whoever holds the lock on
//! a connection of its own leads, and loses the lead exactly when that
//! connection ends, so a crashed leader is replaced as soon as Postgres
//! notices. The others stand by and try again. This module is that pattern,
//! once: [`lock_key`] names a lock, [`try_lead`] tries it, [`lead`] stands by
//! until it is taken.

use std::future::Future;
use std::time::Duration;

use sqlx::postgres::PgConnection;

/// Bound on one attempt to take a lock: the attempt itself never waits on
/// another session, so only a dead connection takes this long.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

/// The advisory lock key of `name` (`souk-relay:<stream>`, ...): its
/// [`crate::fanout::stable_hash`], so every process and version agrees.
pub fn lock_key(name: &str) -> i64 {
    crate::fanout::stable_hash(name.as_bytes()) as i64
}

/// Tries once to take the session lock `key` on `conn`: `true` when this
/// session now holds it (or held it already), `false` when another does.
pub async fn try_lead(conn: &mut PgConnection, key: i64) -> Result<bool, sqlx::Error> {
    let attempt = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(key)
        .fetch_one(conn);
    match tokio::time::timeout(ATTEMPT_TIMEOUT, attempt).await {
        Ok(taken) => taken,
        Err(_) => Err(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "taking an advisory lock timed out",
        ))),
    }
}

/// Takes the session lock `key` on `conn`, standing by while another
/// session holds it: tries again every `retry`, and calls `standing_by` the
/// first time it finds the lock taken. `Ok(true)`: this session leads;
/// `Ok(false)`: `stop` completed first.
pub async fn lead(
    conn: &mut PgConnection,
    key: i64,
    retry: Duration,
    stop: impl Future<Output = ()>,
    standing_by: impl FnOnce(),
) -> Result<bool, sqlx::Error> {
    let mut standing_by = Some(standing_by);
    let mut stop = std::pin::pin!(stop);
    loop {
        if try_lead(conn, key).await? {
            return Ok(true);
        }
        if let Some(standing_by) = standing_by.take() {
            standing_by();
        }
        tokio::select! {
            () = &mut stop => return Ok(false),
            () = tokio::time::sleep(retry) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keys_are_stable_and_differ_by_name() {
        // Pinned: a changed key would let an old and a new process lead at once.
        assert_eq!(lock_key(""), 0xcbf2_9ce4_8422_2325_u64 as i64);
        assert_eq!(lock_key("souk-relay:souk"), lock_key("souk-relay:souk"));
        assert_ne!(lock_key("souk-relay:souk"), lock_key("souk-relay:souk2"));
    }
}
