//! Reading all events in one total order, without ever skipping one.
//!
//! A global position is taken from a sequence at INSERT but becomes visible
//! only at COMMIT, so position 11 can become visible after position 12 has
//! been read: a reader that just followed positions would skip 11 forever.
//! Souk orders events by `(transaction_id, position)` instead, and a reader
//! only takes events of transactions older than a *horizon* below which no
//! event can still appear.
//!
//! The classic horizon is `pg_snapshot_xmin`, the oldest transaction still
//! running anywhere in the cluster; but then every writing transaction (a
//! projector's batch, a report in another database) holds readers back for
//! as long as it runs. Souk's horizon only waits for *event writers*.
//! Migration 0006 makes every transaction that inserts events take the shared
//! advisory lock [`WRITER_LOCK`] before it has a transaction id, and hold it
//! until it ends. [`horizon`] then computes, in one statement whose snapshot
//! S is taken before it looks at the locks:
//!
//! `H = min(xmax(S), the ids in xip(S) of the lock's holders)`
//!
//! and [`read_after`] reads, in a *later* statement, the events of
//! transactions below H. Why nothing below H can appear afterwards: take a
//! writer X with id x < H ≤ xmax(S). X got its id before S (ids handed out
//! later are at least xmax(S)), and took the lock before that. If X had
//! ended by S, the read sees all it committed. If it was running at S, x is
//! in xip(S), and when the statement read the lock table X either still held
//! the lock (then H ≤ x, through its id lock or, without one, through
//! xmin(S) ≤ x: a contradiction) or had ended: again before the read, which
//! sees all it committed.
//!
//! A holder's id is found through its `transactionid` lock. Postgres makes a
//! new id running (in snapshots) a moment before it takes that lock, so a
//! holder without one may already have an id in xip(S): while any holder has
//! none, H falls back to xmin(S), the smallest id in xip(S).
//!
//! On a hot standby (a query API's read-only replica) the primary's locks
//! are not in `pg_locks`, so no writer can be seen: there H is xmin(S), the
//! classic horizon. The standby's snapshots know the primary's running
//! transactions (it replays their ids), so every transaction below xmin(S)
//! has ended there, and a reader of the standby never skips an event either.
//!
//! The price: a long-running *event-writing* transaction holds the horizon
//! back and the reader waits (it never skips). Callers watch
//! [`horizon_lag`] to make such a stall visible.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use sqlx::postgres::PgPool;
use uuid::Uuid;

use crate::record::Position;

/// A JSON document kept as the text it was stored as (the `json` columns
/// `payload` and `metadata` keep their text verbatim). The relay passes it
/// to JetStream without parsing it, and each reader parses it into what it
/// needs ([`StoredJson::parse`]). Two documents are equal when their texts
/// are.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct StoredJson(Box<serde_json::value::RawValue>);

impl StoredJson {
    /// Checks that `text` is one JSON document and keeps it as it is.
    pub fn from_text(text: String) -> Result<Self, serde_json::Error> {
        serde_json::value::RawValue::from_string(text).map(Self)
    }

    /// The document's text.
    pub fn text(&self) -> &str {
        self.0.get()
    }

    /// The document parsed as `T`.
    pub fn parse<'a, T: serde::Deserialize<'a>>(&'a self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.0.get())
    }
}

impl PartialEq for StoredJson {
    fn eq(&self, other: &Self) -> bool {
        self.text() == other.text()
    }
}

/// An event as read from the global order. Serialized as JSON, it is also
/// the body of the message the relay publishes to JetStream.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RecordedEvent {
    pub position: Position,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub payload: StoredJson,
    pub metadata: StoredJson,
    pub recorded_at: DateTime<Utc>,
    pub event_id: Uuid,
}

type Row = (
    i64,
    i64,
    String,
    String,
    i64,
    String,
    String,
    String,
    String,
    DateTime<Utc>,
    Uuid,
);

/// The shared advisory lock every event-writing transaction holds (two-key
/// form), taken by the `events_join_writers` trigger of migration 0006.
pub const WRITER_LOCK: (i32, i32) = (1_399_813_483, 1);

/// The backends of this database that hold [`WRITER_LOCK`], as a subquery
/// of `pid`s. The keys are literals: they must match migration 0006.
pub(crate) const WRITER_PIDS: &str = "SELECT pid FROM pg_locks
     WHERE locktype = 'advisory' AND granted
       AND classid = 1399813483 AND objid = 1 AND objsubid = 2
       AND database = (SELECT oid FROM pg_database WHERE datname = current_database())";

/// The query behind [`horizon`]. One statement, so its snapshot is taken
/// before pg_locks is read; the lock table is read once (MATERIALIZED), so a
/// writer's advisory lock and its transaction id lock come from one instant.
const HORIZON: &str = "WITH locks AS MATERIALIZED (
                SELECT locktype, database, classid, objid, objsubid, granted,
                       virtualtransaction, transactionid, mode
                  FROM pg_locks),
              snapshot AS MATERIALIZED (SELECT pg_current_snapshot() AS s),
              writers AS MATERIALIZED (
                SELECT virtualtransaction FROM locks
                 WHERE locktype = 'advisory' AND granted
                   AND classid = 1399813483 AND objid = 1 AND objsubid = 2
                   AND database = (SELECT oid FROM pg_database
                                    WHERE datname = current_database())),
              ids AS MATERIALIZED (
                SELECT virtualtransaction, transactionid FROM locks
                 WHERE locktype = 'transactionid' AND mode = 'ExclusiveLock' AND granted)
         SELECT pg_snapshot_xmax(s)::text,
                (SELECT min(x) FROM pg_snapshot_xip(s) AS x
                        WHERE xid(x) IN (SELECT ids.transactionid
                                           FROM writers JOIN ids USING (virtualtransaction)))::text,
                -- A writer whose id lock is not in the table yet (Postgres
                -- makes an id running before it locks it): its id may be
                -- any running one.
                CASE WHEN EXISTS (SELECT 1 FROM writers
                                   WHERE virtualtransaction NOT IN (
                                         SELECT virtualtransaction FROM ids))
                     THEN pg_snapshot_xmin(s)::text END,
                -- A hot standby sees none of the primary's locks.
                CASE WHEN pg_is_in_recovery() THEN pg_snapshot_xmin(s)::text END
           FROM snapshot";

/// Where readers of the global order stop (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Horizon {
    /// H: every event of a transaction below it that will ever commit has
    /// committed.
    pub below: u64,
    /// Whether an event writer was running (H is its transaction id): its
    /// events, and those of every writer that commits after it, wait.
    pub writer_running: bool,
}

/// The horizon H of the module doc, read now through `db` (a pool, or a
/// connection of the caller's own, as the relay's).
pub async fn horizon<'c>(db: impl PgExecutor<'c>) -> Result<Horizon, sqlx::Error> {
    let (xmax, writer, unlocked_writer, standby): (
        String,
        Option<String>,
        Option<String>,
        Option<String>,
    ) = sqlx::query_as(HORIZON).fetch_one(db).await?;
    let parse = |text: &str| {
        text.parse::<u64>().map_err(|error| {
            sqlx::Error::Decode(format!("`{text}` is not a transaction id: {error}").into())
        })
    };
    let mut horizon = Horizon {
        below: parse(&xmax)?,
        writer_running: false,
    };
    for bound in [writer, unlocked_writer].into_iter().flatten() {
        horizon.below = horizon.below.min(parse(&bound)?);
        horizon.writer_running = true;
    }
    if let Some(xmin) = standby {
        let xmin = parse(&xmin)?;
        if xmin < horizon.below {
            // Some transaction of the primary still runs: it may be a writer.
            horizon.below = xmin;
            horizon.writer_running = true;
        }
    }
    Ok(horizon)
}

/// Up to `limit` committed events after `after`, in global order. Never
/// returns an event while an earlier one (in that order) may still commit.
pub async fn read_after(
    pool: &PgPool,
    after: Position,
    limit: i64,
) -> Result<Vec<RecordedEvent>, sqlx::Error> {
    let horizon = horizon(pool).await?;
    read_below(pool, after, horizon, limit).await
}

/// Up to `limit` events after `after` and below `horizon`, in global order.
/// `horizon` must have been read (with [`horizon`]) before this is called.
pub async fn read_below<'c>(
    db: impl PgExecutor<'c>,
    after: Position,
    horizon: Horizon,
    limit: i64,
) -> Result<Vec<RecordedEvent>, sqlx::Error> {
    if horizon.below <= after.transaction_id {
        return Ok(Vec::new());
    }
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT transaction_id::text::bigint, position, aggregate_type, aggregate_id, sequence,
                event_type, event_version, payload::text, metadata::text, recorded_at, event_id
           FROM events
          WHERE (transaction_id, position) > ($1::text::xid8, $2)
            AND transaction_id < $4::text::xid8
          -- Qualified: the output column of the same name is a cast, and
          -- ordering by it would sort the whole table instead of using the
          -- (transaction_id, position) index.
          ORDER BY events.transaction_id, events.position
          LIMIT $3",
    )
    .bind(after.transaction_id.to_string())
    .bind(after.position)
    .bind(limit.clamp(1, 10_000))
    .bind(horizon.below.to_string())
    .fetch_all(db)
    .await?;
    rows.into_iter().map(from_row).collect()
}

/// Up to `limit` events of the aggregates `aggregates` (type and id) whose
/// type is one of `event_types`, after `after` and below `horizon`, in
/// global order: one reader's own events (a resumed notification stream).
pub async fn read_below_of(
    pool: &PgPool,
    after: Position,
    horizon: Horizon,
    aggregates: &[(String, String)],
    event_types: &[&str],
    limit: i64,
) -> Result<Vec<RecordedEvent>, sqlx::Error> {
    if horizon.below <= after.transaction_id || aggregates.is_empty() {
        return Ok(Vec::new());
    }
    let (types, ids): (Vec<&str>, Vec<&str>) = aggregates
        .iter()
        .map(|(aggregate_type, id)| (aggregate_type.as_str(), id.as_str()))
        .unzip();
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT transaction_id::text::bigint, position, aggregate_type, aggregate_id, sequence,
                event_type, event_version, payload::text, metadata::text, recorded_at, event_id
           FROM events
          WHERE (aggregate_type, aggregate_id) IN (SELECT * FROM unnest($5::text[], $6::text[]))
            AND (transaction_id, position) > ($1::text::xid8, $2)
            AND transaction_id < $4::text::xid8
            AND event_type = ANY($7::text[])
          ORDER BY events.transaction_id, events.position
          LIMIT $3",
    )
    .bind(after.transaction_id.to_string())
    .bind(after.position)
    .bind(limit.clamp(1, 10_000))
    .bind(horizon.below.to_string())
    .bind(types)
    .bind(ids)
    .bind(event_types)
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(from_row).collect()
}

fn from_row(
    (
        xid,
        position,
        aggregate_type,
        aggregate_id,
        sequence,
        event_type,
        event_version,
        payload,
        metadata,
        recorded_at,
        event_id,
    ): Row,
) -> Result<RecordedEvent, sqlx::Error> {
    let json =
        |text| StoredJson::from_text(text).map_err(|error| sqlx::Error::Decode(Box::new(error)));
    Ok(RecordedEvent {
        position: Position {
            transaction_id: xid as u64,
            position,
        },
        aggregate_type,
        aggregate_id,
        sequence,
        event_type,
        event_version,
        payload: json(payload)?,
        metadata: json(metadata)?,
        recorded_at,
        event_id,
    })
}

/// How far the horizon lags: the age in seconds of the oldest event-writing
/// transaction still running, or 0 when none runs. A large value means
/// readers of the global order are waiting on that transaction.
pub async fn horizon_lag<'c>(db: impl PgExecutor<'c>) -> Result<f64, sqlx::Error> {
    let age: Option<f64> = sqlx::query_scalar(&format!(
        "SELECT EXTRACT(EPOCH FROM now() - min(xact_start))::float8
           FROM pg_stat_activity
          WHERE pid IN ({WRITER_PIDS})"
    ))
    .fetch_one(db)
    .await?;
    Ok(age.unwrap_or(0.0).max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_writer_lock_is_the_one_migration_0006_takes() {
        let migration = include_str!("../../migrations/sql/0006_event_writers.sql");
        let (high, low) = WRITER_LOCK;
        let taken = format!("pg_advisory_xact_lock_shared({high}, {low})");
        assert!(migration.contains(&taken), "migration 0006 takes {taken}");
        let looked_up = format!("classid = {high} AND objid = {low} AND objsubid = 2");
        assert!(
            WRITER_PIDS.contains(&looked_up),
            "WRITER_PIDS looks for {looked_up}"
        );
        assert!(
            HORIZON.contains(&looked_up),
            "HORIZON looks for {looked_up}"
        );
    }
}
