//! Reading all events in one total order, without ever skipping one.
//!
//! A global position is taken from a sequence at INSERT but becomes visible
//! only at COMMIT, so position 11 can become visible after position 12 has
//! been read: a reader that just followed positions would skip 11 forever.
//! Souk orders events by `(transaction_id, position)` instead, and a reader
//! only takes events of transactions older than the oldest transaction still
//! running (`pg_snapshot_xmin(pg_current_snapshot())`). Every transaction
//! below that horizon has ended, so nothing can appear behind what was read.
//!
//! The price: a long-running writing transaction anywhere in the cluster
//! holds the horizon back and the reader waits (it never skips). Callers
//! watch [`horizon_lag`] to make such a stall visible.

use chrono::{DateTime, Utc};
use sqlx::postgres::PgPool;
use uuid::Uuid;

use crate::record::Position;

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
    pub payload: serde_json::Value,
    pub metadata: serde_json::Value,
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
    serde_json::Value,
    serde_json::Value,
    DateTime<Utc>,
    Uuid,
);

/// Up to `limit` committed events after `after`, in global order. Never
/// returns an event while an earlier one (in that order) may still commit.
pub async fn read_after(
    pool: &PgPool,
    after: Position,
    limit: i64,
) -> Result<Vec<RecordedEvent>, sqlx::Error> {
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT transaction_id::text::bigint, position, aggregate_type, aggregate_id, sequence,
                event_type, event_version, payload::jsonb, metadata::jsonb, recorded_at, event_id
           FROM events
          WHERE (transaction_id, position) > ($1::text::xid8, $2)
            AND transaction_id < pg_snapshot_xmin(pg_current_snapshot())
          -- Qualified: the output column of the same name is a cast, and
          -- ordering by it would sort the whole table instead of using the
          -- (transaction_id, position) index.
          ORDER BY events.transaction_id, events.position
          LIMIT $3",
    )
    .bind(after.transaction_id.to_string())
    .bind(after.position)
    .bind(limit.clamp(1, 10_000))
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(
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
            )| {
                RecordedEvent {
                    position: Position {
                        transaction_id: xid as u64,
                        position,
                    },
                    aggregate_type,
                    aggregate_id,
                    sequence,
                    event_type,
                    event_version,
                    payload,
                    metadata,
                    recorded_at,
                    event_id,
                }
            },
        )
        .collect())
}

/// How far the visibility horizon lags: the age in seconds of the oldest
/// transaction that holds it back, or 0 when none does. A large value means
/// readers of the global order are waiting on that transaction.
pub async fn horizon_lag(pool: &PgPool) -> Result<f64, sqlx::Error> {
    let age: Option<f64> = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM now() - min(xact_start))::float8
           FROM pg_stat_activity
          WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid()",
    )
    .fetch_one(pool)
    .await?;
    Ok(age.unwrap_or(0.0).max(0.0))
}
