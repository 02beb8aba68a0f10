//! `status`: what an on-call operator looks at first. Every projection's
//! partitions (checkpoint, lag in events and seconds, dead letters),
//! rebuilds in progress, the relay's checkpoint and horizon age, timers.
//!
//! A partition's lag counts the events of its projection's aggregate types
//! in its partition after its checkpoint, read from the event store below
//! the global order's horizon (at most [`LAG_SCAN_MAX`] per projection; a
//! larger backlog shows as that many, marked `+`); its age is that of the
//! oldest of them.

use std::collections::BTreeMap;

use anyhow::Context as _;
use clap::Args;
use event_store::Position;
use futures::TryStreamExt;

use crate::{Database, Outcome, output};

/// Most events read per projection to measure lag.
const LAG_SCAN_MAX: i64 = 1_000_000;

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    database: Database,
    /// One JSON document instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, serde::Serialize)]
struct Partition {
    projection: String,
    partition: i32,
    checkpoint: Position,
    caught_up_to: Position,
    events_applied: i64,
    lag_events: u64,
    /// Whether the backlog is larger than what was counted.
    lag_more: bool,
    lag_seconds: f64,
    updated_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, serde::Serialize)]
struct DeadLetterCount {
    projection: String,
    parked: i64,
    skipped: i64,
}

#[derive(Debug, serde::Serialize)]
struct Relay {
    stream: String,
    checkpoint: Position,
    published: i64,
    updated_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, serde::Serialize)]
struct Timers {
    armed: i64,
    due: i64,
    stuck: i64,
}

#[derive(Debug, serde::Serialize)]
struct Status {
    partitions: Vec<Partition>,
    dead_letters: Vec<DeadLetterCount>,
    rebuilds: Vec<projections::RebuildInProgress>,
    relays: Vec<Relay>,
    /// Age of the oldest event-writing transaction still running (0: none):
    /// readers of the global order wait for it.
    horizon_age_seconds: f64,
    timers: Timers,
}

type CheckpointRow = (
    String,
    i32,
    i64,
    i64,
    i64,
    i64,
    i64,
    chrono::DateTime<chrono::Utc>,
);

pub async fn run(args: &StatusArgs) -> anyhow::Result<Outcome> {
    let pool = args.database.connect().await?;
    let checkpoints: Vec<CheckpointRow> = sqlx::query_as(
        "SELECT projection, partition, transaction_id, position, caught_up_transaction,
                caught_up_position, events_applied, updated_at
           FROM projection_checkpoints ORDER BY projection, partition",
    )
    .fetch_all(&pool)
    .await
    .context("reading the checkpoints")?;
    let horizon = event_store::global::horizon(&pool)
        .await
        .context("reading the horizon")?;
    let mut partitions = Vec::new();
    let mut by_projection: BTreeMap<String, Vec<CheckpointRow>> = BTreeMap::new();
    for row in checkpoints {
        by_projection.entry(row.0.clone()).or_default().push(row);
    }
    let now = chrono::Utc::now();
    for (projection, rows) in by_projection {
        let count = rows.len() as u32;
        let position = |t: i64, p: i64| Position {
            transaction_id: t as u64,
            position: p,
        };
        let from = rows
            .iter()
            .map(|r| position(r.2, r.3))
            .min()
            .unwrap_or(Position::START);
        let types: Vec<String> = projections::aggregate_types(&projection)
            .map(|types| types.iter().map(|t| (*t).to_owned()).collect())
            .unwrap_or_default();
        // Per partition: events after its checkpoint, and the oldest one's time.
        let mut lag: Vec<(u64, Option<chrono::DateTime<chrono::Utc>>)> =
            vec![(0, None); rows.len()];
        let mut scanned = 0i64;
        let mut events = sqlx::query_as::<_, (String, i64, i64, chrono::DateTime<chrono::Utc>)>(
            "SELECT aggregate_id, transaction_id::text::bigint, position, recorded_at FROM events
              WHERE (transaction_id, position) > ($1::text::xid8, $2)
                AND transaction_id < $3::text::xid8
                AND aggregate_type = ANY($4)
              ORDER BY events.transaction_id, events.position
              LIMIT $5",
        )
        .bind(from.transaction_id.to_string())
        .bind(from.position)
        .bind(horizon.below.to_string())
        .bind(&types)
        .bind(LAG_SCAN_MAX)
        .fetch(&pool);
        while let Some((aggregate_id, transaction_id, at, recorded_at)) =
            events.try_next().await.context("measuring lag")?
        {
            scanned += 1;
            let partition = event_store::fanout::partition_of(&aggregate_id, count) as usize;
            let Some(row) = rows.get(partition) else {
                continue;
            };
            if position(transaction_id, at) > position(row.2, row.3) {
                let entry = &mut lag[partition];
                entry.0 += 1;
                entry.1.get_or_insert(recorded_at);
            }
        }
        drop(events);
        for (row, (events, oldest)) in rows.into_iter().zip(lag) {
            partitions.push(Partition {
                projection: projection.clone(),
                partition: row.1,
                checkpoint: position(row.2, row.3),
                caught_up_to: position(row.4, row.5),
                events_applied: row.6,
                lag_events: events,
                lag_more: scanned >= LAG_SCAN_MAX && events > 0,
                lag_seconds: oldest.map_or(0.0, |oldest| {
                    (now - oldest).num_milliseconds().max(0) as f64 / 1000.0
                }),
                updated_at: row.7,
            });
        }
    }
    let dead_letters: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT projection, sum(parked)::bigint, sum(skipped)::bigint FROM (
            SELECT projection, count(*) AS parked, 0 AS skipped FROM dead_letters GROUP BY projection
            UNION ALL
            SELECT projection, 0, count(*) FROM dead_letter_actions WHERE action = 'skipped'
             GROUP BY projection) counts
          GROUP BY projection ORDER BY projection",
    )
    .fetch_all(&pool)
    .await
    .context("counting dead letters")?;
    let relays: Vec<(String, i64, i64, i64, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT stream, transaction_id, position, published, updated_at
           FROM relay_checkpoints ORDER BY stream",
    )
    .fetch_all(&pool)
    .await
    .context("reading the relay's checkpoints")?;
    let (armed, due, stuck): (i64, i64, i64) = sqlx::query_as(&format!(
        "SELECT count(*), count(*) FILTER (WHERE due_at <= now()),
                count(*) FILTER (WHERE {})
           FROM timers",
        crate::timers::STUCK
    ))
    .bind(crate::timers::STUCK_MIN_ATTEMPTS)
    .fetch_one(&pool)
    .await
    .context("counting timers")?;
    let status = Status {
        partitions,
        dead_letters: dead_letters
            .into_iter()
            .map(|(projection, parked, skipped)| DeadLetterCount {
                projection,
                parked,
                skipped,
            })
            .collect(),
        rebuilds: projections::rebuilds_in_progress(&pool).await?,
        relays: relays
            .into_iter()
            .map(
                |(stream, transaction_id, position, published, updated_at)| Relay {
                    stream,
                    checkpoint: Position {
                        transaction_id: transaction_id as u64,
                        position,
                    },
                    published,
                    updated_at,
                },
            )
            .collect(),
        horizon_age_seconds: event_store::global::horizon_lag(&pool)
            .await
            .context("reading the horizon's age")?,
        timers: Timers { armed, due, stuck },
    };
    let mut out = output::stdout();
    if args.json {
        output::written(output::json_pretty(&mut out, &status))?;
    } else {
        output::written(describe(&mut out, &status))?;
    }
    output::done(&mut out)?;
    Ok(Outcome::Fine)
}

fn describe(out: &mut impl std::io::Write, status: &Status) -> std::io::Result<()> {
    let time = |at: &chrono::DateTime<chrono::Utc>| at.format("%Y-%m-%d %H:%M:%S").to_string();
    let rows: Vec<Vec<String>> = status
        .partitions
        .iter()
        .map(|p| {
            vec![
                p.projection.clone(),
                p.partition.to_string(),
                p.checkpoint.to_string(),
                format!("{}{}", p.lag_events, if p.lag_more { "+" } else { "" }),
                format!("{:.1}", p.lag_seconds),
                p.events_applied.to_string(),
                time(&p.updated_at),
            ]
        })
        .collect();
    output::table(
        out,
        &[
            "projection",
            "partition",
            "checkpoint",
            "lag events",
            "lag s",
            "applied",
            "updated",
        ],
        &rows,
    )?;
    writeln!(out)?;
    let rows: Vec<Vec<String>> = status
        .dead_letters
        .iter()
        .map(|d| {
            vec![
                d.projection.clone(),
                d.parked.to_string(),
                d.skipped.to_string(),
            ]
        })
        .collect();
    output::table(out, &["projection", "dead letters", "skipped"], &rows)?;
    writeln!(out)?;
    if status.rebuilds.is_empty() {
        writeln!(out, "no rebuild in progress")?;
    } else {
        let rows: Vec<Vec<String>> = status
            .rebuilds
            .iter()
            .map(|r| {
                vec![
                    r.projection.clone(),
                    if r.running { "running" } else { "interrupted" }.to_owned(),
                    r.position.to_string(),
                    r.events_read.to_string(),
                    time(&r.started_at),
                    time(&r.updated_at),
                ]
            })
            .collect();
        output::table(
            out,
            &[
                "rebuild",
                "state",
                "position",
                "events read",
                "started",
                "updated",
            ],
            &rows,
        )?;
    }
    writeln!(out)?;
    let rows: Vec<Vec<String>> = status
        .relays
        .iter()
        .map(|r| {
            vec![
                r.stream.clone(),
                r.checkpoint.to_string(),
                r.published.to_string(),
                time(&r.updated_at),
            ]
        })
        .collect();
    output::table(
        out,
        &["relay stream", "checkpoint", "published", "updated"],
        &rows,
    )?;
    writeln!(out, "horizon age: {:.1} s", status.horizon_age_seconds)?;
    writeln!(
        out,
        "timers: {} armed, {} due, {} stuck",
        status.timers.armed, status.timers.due, status.timers.stuck
    )
}
