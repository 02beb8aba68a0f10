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

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use domain::values::Role;
use event_store::Position;
use event_store::fanout::partition_of;
use http_kit::openapi::{ErrorBody, Routes, string_enum};
use http_kit::{ApiError, AuthUser};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa::openapi::schema::Object;

use super::{db_error, optional_time, time};
use crate::app::AppState;
use crate::catch_up::{CheckpointRow, Projection, checkpoints};
use crate::openapi::After;
use crate::params::QueryParams;

/// Most unapplied events read to measure one projection's lag.
pub const LAG_EVENTS_CAP: i64 = 10_000;

pub fn routes() -> Routes<AppState> {
    Routes::new().get("/projections", projections)
}

fn lag_events_cap_schema() -> Object {
    Object::builder()
        .schema_type(utoipa::openapi::schema::Type::Integer)
        .enum_values(Some([LAG_EVENTS_CAP]))
        .description(Some(
            "Most unapplied events counted per projection (and for the relay).",
        ))
        .build()
}

fn projection_name_schema() -> Object {
    string_enum(Projection::ALL.iter().map(|projection| projection.name())).build()
}

/// Checkpoint and lag of each projection, and the relay's checkpoint.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Projections)]
pub(crate) struct ProjectionsView {
    /// Partitions of every projection.
    #[schema(minimum = 0)]
    partitions: u32,
    #[schema(schema_with = lag_events_cap_schema)]
    lag_events_cap: i64,
    projections: Vec<ProjectionView>,
    /// The relay of this API's stream; null before it ever published.
    relay: Option<RelayView>,
}

/// One projection over all its partitions.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Projection)]
pub(crate) struct ProjectionView {
    #[schema(schema_with = projection_name_schema)]
    name: &'static str,
    #[schema(value_type = Vec<String>)]
    aggregate_types: &'static [&'static str],
    /// Its slowest partition's mark (a position token); null while a
    /// partition has no checkpoint.
    #[schema(schema_with = http_kit::openapi::position_token_or_null)]
    caught_up_to: Option<String>,
    /// Unapplied events over all partitions.
    #[schema(minimum = 0)]
    lag_events: i64,
    /// The count reached the cap: a lower bound.
    lag_events_capped: bool,
    /// Age of the oldest unapplied event; 0 when none.
    #[schema(minimum = 0)]
    lag_seconds: f64,
    /// Events parked because they could not be applied.
    #[schema(minimum = 0)]
    dead_letters: i64,
    partitions: Vec<PartitionView>,
}

/// One partition of a projection.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = ProjectionPartition)]
pub(crate) struct PartitionView {
    /// The partition.
    #[schema(minimum = 0)]
    partition: usize,
    #[schema(schema_with = http_kit::openapi::position_token)]
    checkpoint: String,
    #[schema(schema_with = http_kit::openapi::position_token)]
    caught_up_to: String,
    /// Events applied since the projection started.
    #[schema(minimum = 0)]
    events_applied: i64,
    /// When the last applied event was recorded.
    #[serde(serialize_with = "optional_time")]
    last_event_recorded_at: Option<DateTime<Utc>>,
    /// When the checkpoint last moved; null before it ever did.
    #[serde(serialize_with = "optional_time")]
    updated_at: Option<DateTime<Utc>>,
    /// Events of this partition in the store that it has not applied.
    #[schema(minimum = 0)]
    lag_events: i64,
    /// Age of the oldest unapplied event; 0 when none.
    #[schema(minimum = 0)]
    lag_seconds: f64,
}

/// The relay's checkpoint and lag.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Relay)]
pub(crate) struct RelayView {
    stream: String,
    #[schema(schema_with = http_kit::openapi::position_token)]
    checkpoint: String,
    /// Events published.
    #[schema(minimum = 0)]
    published: i64,
    /// When it last moved.
    #[serde(serialize_with = "time")]
    updated_at: DateTime<Utc>,
    /// Committed events not yet published.
    #[schema(minimum = 0)]
    lag_events: usize,
    lag_events_capped: bool,
    #[schema(minimum = 0)]
    lag_seconds: f64,
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

async fn projection_view(
    state: &AppState,
    projection: Projection,
    rows: &[CheckpointRow],
    dead_letters: i64,
    now: DateTime<Utc>,
) -> Result<ProjectionView, ApiError> {
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
    let partition_views: Vec<PartitionView> = (0..partitions as usize)
        .map(|partition| {
            let row = i32::try_from(partition)
                .ok()
                .and_then(|partition| by_partition.get(&partition));
            PartitionView {
                partition,
                checkpoint: row.map_or(Position::START, |row| row.applied()).token(),
                caught_up_to: marks[partition].token(),
                events_applied: row.map_or(0, |row| row.events_applied),
                last_event_recorded_at: row.and_then(|row| row.last_event_recorded_at),
                updated_at: row.map(|row| row.updated_at),
                lag_events: lag_events[partition],
                lag_seconds: seconds_since(oldest[partition], now),
            }
        })
        .collect();
    let caught_up_to = (by_partition.len() >= partitions as usize).then(|| least.token());
    Ok(ProjectionView {
        name: projection.name(),
        aggregate_types: projection.aggregate_types(),
        caught_up_to,
        lag_events: lag_events.iter().sum::<i64>(),
        lag_events_capped: capped,
        lag_seconds: seconds_since(oldest.iter().flatten().min().copied(), now),
        dead_letters,
        partitions: partition_views,
    })
}

#[derive(Debug, sqlx::FromRow)]
struct RelayRow {
    stream: String,
    transaction_id: i64,
    position: i64,
    published: i64,
    updated_at: DateTime<Utc>,
}

async fn relay_view(state: &AppState, now: DateTime<Utc>) -> Result<Option<RelayView>, ApiError> {
    let row: Option<RelayRow> = sqlx::query_as(
        "SELECT stream, transaction_id, position, published, updated_at
           FROM relay_checkpoints WHERE stream = $1",
    )
    .bind(&state.stream)
    .fetch_optional(&state.pool)
    .await
    .map_err(db_error)?;
    let Some(row) = row else {
        return Ok(None);
    };
    let checkpoint = Position {
        transaction_id: u64::try_from(row.transaction_id).unwrap_or(0),
        position: row.position.max(0),
    };
    let mut events = pending_events(state, None, checkpoint, LAG_EVENTS_CAP).await?;
    let capped = events.len() as i64 > LAG_EVENTS_CAP;
    events.truncate(LAG_EVENTS_CAP as usize);
    Ok(Some(RelayView {
        stream: row.stream,
        checkpoint: checkpoint.token(),
        published: row.published,
        updated_at: row.updated_at,
        lag_events: events.len(),
        lag_events_capped: capped,
        lag_seconds: seconds_since(events.first().map(|event| event.recorded_at), now),
    }))
}

/// Checkpoint and lag of each projection, and the relay's checkpoint
///
/// Operators, admins and auditors (403 for others). `after` waits for every
/// projection.
#[utoipa::path(
    get,
    path = "/projections",
    operation_id = "getProjections",
    tag = "operations",
    params(After),
    responses(
        (status = 200, description = "The read model's answer.", body = ProjectionsView),
        (status = 403, description = "Not an operator, admin or auditor (`forbidden`).", body = ErrorBody),
    ),
)]
pub(crate) async fn projections(
    State(state): State<AppState>,
    user: AuthUser,
    query: QueryParams,
) -> Result<Json<ProjectionsView>, ApiError> {
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
        projections.push(projection_view(&state, projection, &rows, dead, now).await?);
    }
    Ok(Json(ProjectionsView {
        partitions: state.catch_up.partitions(),
        lag_events_cap: LAG_EVENTS_CAP,
        projections,
        relay: relay_view(&state, now).await?,
    }))
}
