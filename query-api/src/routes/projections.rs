//! `/projections`: where each projection is, partition by partition, how far
//! behind the event store it lags (in events and in seconds), how many
//! events it parked as dead letters, and where the relay is. For operators,
//! admins and auditors.
//!
//! Lag in events counts the events of the projection's aggregate types that
//! are in the store after a partition's caught-up mark and belong to that
//! partition (`event_store::fanout::partition_of`). The count reads at most
//! [`LAG_EVENTS_CAP`] events per projection; beyond that it is a lower bound
//! and `lag_events_capped` says so. Lag in seconds is the age of the oldest
//! unapplied event (0 when there is none).

use std::collections::HashMap;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use domain::values::Role;
use event_store::Position;
use event_store::fanout::partition_of;
use http_kit::ApiError;
use http_kit::AuthUser;
use serde_json::{Value, json};

use super::{db_error, optional_time, time};
use crate::app::AppState;
use crate::catch_up::{CheckpointRow, Projection, checkpoints};
use crate::params::QueryParams;

/// Most unapplied events read to measure one projection's lag.
pub const LAG_EVENTS_CAP: i64 = 10_000;

pub fn routes() -> axum::Router<AppState> {
    Router::new().route("/projections", get(projections))
}

/// An event after a checkpoint: enough to place it and date it.
#[derive(Debug, sqlx::FromRow)]
struct PendingEvent {
    aggregate_id: String,
    transaction_id: i64,
    position: i64,
    recorded_at: DateTime<Utc>,
}

impl PendingEvent {
    fn position(&self) -> Position {
        Position {
            transaction_id: u64::try_from(self.transaction_id).unwrap_or(0),
            position: self.position,
        }
    }
}

/// Up to `cap + 1` events of `aggregate_types` after `after`, in global order.
async fn pending_events(
    state: &AppState,
    aggregate_types: Option<&[&str]>,
    after: Position,
    cap: i64,
) -> Result<Vec<PendingEvent>, ApiError> {
    sqlx::query_as(
        "SELECT aggregate_id, transaction_id::text::bigint AS transaction_id, position, recorded_at
           FROM events
          WHERE ($1::text[] IS NULL OR aggregate_type = ANY($1))
            AND (transaction_id, position) > ($2::text::xid8, $3)
          -- Qualified: unqualified, it names the bigint output column, and a
          -- lagging projection would sort every pending event.
          ORDER BY events.transaction_id, events.position
          LIMIT $4",
    )
    .bind(aggregate_types.map(|types| types.iter().map(|t| (*t).to_owned()).collect::<Vec<_>>()))
    .bind(after.transaction_id.to_string())
    .bind(after.position)
    .bind(cap + 1)
    .fetch_all(&state.pool)
    .await
    .map_err(db_error)
}

fn seconds_since(at: Option<DateTime<Utc>>, now: DateTime<Utc>) -> f64 {
    at.map_or(0.0, |at| {
        ((now - at).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6).max(0.0)
    })
}

async fn projection_json(
    state: &AppState,
    projection: Projection,
    rows: &[CheckpointRow],
    dead_letters: i64,
    now: DateTime<Utc>,
) -> Result<Value, ApiError> {
    let partitions = state.catch_up.partitions();
    let by_partition: HashMap<i32, &CheckpointRow> = rows
        .iter()
        .filter(|row| row.projection == projection.name())
        .map(|row| (row.partition, row))
        .collect();
    let marks: Vec<Position> = (0..partitions)
        .map(|partition| {
            i32::try_from(partition)
                .ok()
                .and_then(|partition| by_partition.get(&partition))
                .map_or(Position::START, |row| row.caught_up())
        })
        .collect();
    let least = marks.iter().copied().min().unwrap_or(Position::START);
    let mut events = pending_events(
        state,
        Some(projection.aggregate_types()),
        least,
        LAG_EVENTS_CAP,
    )
    .await?;
    let capped = events.len() as i64 > LAG_EVENTS_CAP;
    events.truncate(LAG_EVENTS_CAP as usize);

    let mut lag_events = vec![0_i64; marks.len()];
    let mut oldest: Vec<Option<DateTime<Utc>>> = vec![None; marks.len()];
    for event in &events {
        let partition = partition_of(&event.aggregate_id, partitions) as usize;
        if event.position() > marks[partition] {
            lag_events[partition] += 1;
            // Events come in global order: the first one is the oldest.
            oldest[partition].get_or_insert(event.recorded_at);
        }
    }
    let partitions_json: Vec<Value> = (0..partitions as usize)
        .map(|partition| {
            let row = i32::try_from(partition)
                .ok()
                .and_then(|partition| by_partition.get(&partition));
            json!({
                "partition": partition,
                "checkpoint": row.map_or(Position::START, |row| row.applied()).token(),
                "caught_up_to": marks[partition].token(),
                "events_applied": row.map_or(0, |row| row.events_applied),
                "last_event_recorded_at": optional_time(row.and_then(|row| row.last_event_recorded_at)),
                "updated_at": optional_time(row.map(|row| row.updated_at)),
                "lag_events": lag_events[partition],
                "lag_seconds": seconds_since(oldest[partition], now),
            })
        })
        .collect();
    let caught_up_to = (by_partition.len() >= partitions as usize).then(|| least.token());
    Ok(json!({
        "name": projection.name(),
        "aggregate_types": projection.aggregate_types(),
        "caught_up_to": caught_up_to,
        "lag_events": lag_events.iter().sum::<i64>(),
        "lag_events_capped": capped,
        "lag_seconds": seconds_since(oldest.iter().flatten().min().copied(), now),
        "dead_letters": dead_letters,
        "partitions": partitions_json,
    }))
}

#[derive(Debug, sqlx::FromRow)]
struct RelayRow {
    stream: String,
    transaction_id: i64,
    position: i64,
    published: i64,
    updated_at: DateTime<Utc>,
}

async fn relay_json(state: &AppState, now: DateTime<Utc>) -> Result<Value, ApiError> {
    let row: Option<RelayRow> = sqlx::query_as(
        "SELECT stream, transaction_id, position, published, updated_at
           FROM relay_checkpoints WHERE stream = $1",
    )
    .bind(&state.stream)
    .fetch_optional(&state.pool)
    .await
    .map_err(db_error)?;
    let Some(row) = row else {
        return Ok(Value::Null);
    };
    let checkpoint = Position {
        transaction_id: u64::try_from(row.transaction_id).unwrap_or(0),
        position: row.position.max(0),
    };
    let mut events = pending_events(state, None, checkpoint, LAG_EVENTS_CAP).await?;
    let capped = events.len() as i64 > LAG_EVENTS_CAP;
    events.truncate(LAG_EVENTS_CAP as usize);
    Ok(json!({
        "stream": row.stream,
        "checkpoint": checkpoint.token(),
        "published": row.published,
        "updated_at": time(row.updated_at),
        "lag_events": events.len(),
        "lag_events_capped": capped,
        "lag_seconds": seconds_since(events.first().map(|event| event.recorded_at), now),
    }))
}

async fn projections(
    State(state): State<AppState>,
    user: AuthUser,
    query: QueryParams,
) -> Result<Json<Value>, ApiError> {
    let params = query.accept(&["after"])?;
    let after = params.after()?;
    if !matches!(user.role, Role::Operator | Role::Admin | Role::Auditor) {
        return Err(ApiError::forbidden(
            "only operators, admins and auditors see the projections",
        ));
    }
    state.read_after(after, &Projection::ALL).await?;
    let rows = checkpoints(&state.pool, state.catch_up.partitions())
        .await
        .map_err(db_error)?;
    let dead_letters: HashMap<String, i64> = sqlx::query_as::<_, (String, i64)>(
        "SELECT projection, count(*) FROM dead_letters GROUP BY projection",
    )
    .fetch_all(&state.pool)
    .await
    .map_err(db_error)?
    .into_iter()
    .collect();
    let now = Utc::now();
    let mut projections = Vec::with_capacity(Projection::ALL.len());
    for projection in Projection::ALL {
        let dead = dead_letters.get(projection.name()).copied().unwrap_or(0);
        projections.push(projection_json(&state, projection, &rows, dead, now).await?);
    }
    Ok(Json(json!({
        "partitions": state.catch_up.partitions(),
        "lag_events_cap": LAG_EVENTS_CAP,
        "projections": projections,
        "relay": relay_json(&state, now).await?,
    })))
}
