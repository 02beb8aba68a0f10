//! Rebuilding projections from the event store, while the live projector
//! keeps running, resumably.
//!
//! 1. **Build aside.** Each projection gets a fresh schema (by default
//!    `rebuild_<projection>`) with an empty copy of each of its tables
//!    (`CREATE TABLE ... (LIKE public.x INCLUDING ALL)`, indexes renamed to
//!    the live ones' names) and of `dead_letters`, and the whole global order
//!    is replayed into it with `event_store::global::read_after` and the live
//!    projector's own apply code. Several projections (`rebuild --all`) share
//!    one pass over the log: one task reads it ahead, batch after batch, and
//!    each projection applies every batch on a connection of its own (a
//!    lane; fewer lanes when the pool is small, see `build`), without waiting
//!    for the others, so that several Postgres backends write while this
//!    process decodes and the next batches are read. The copies keep
//!    only their unique indexes while they fill (every row is found and
//!    upserted by its key); the others are created once the rows are in,
//!    before the swap, which costs less than maintaining them on every
//!    write. Nothing live is touched; this can take as long as it takes.
//! 2. **Progress is durable.** Each batch commits its rows together with the
//!    projection's row in `projection_rebuilds` (its position and counts), so
//!    a rebuild that was killed resumes exactly after its last batch when it
//!    is run again; `restart` starts over, [`abandon`] drops the work. A
//!    lost batch (the batches commit with `synchronous_commit = off`) is
//!    lost with its position, and read again.
//! 3. **Swap.** One transaction takes every rebuilt projection's advisory
//!    lock *exclusively*. Every live batch takes the same lock *shared*
//!    before it reads its checkpoint, so once the rebuild holds it no batch
//!    of these projections is in flight and none starts. It reads the highest
//!    live checkpoint C, replays into the aside tables the events committed
//!    since, up to a position P ≥ C, locks the live tables (with a short
//!    `lock_timeout`: readers queue behind a waiting exclusive lock, so it
//!    waits at most that long, gives up and tries again rather than make
//!    queries wait), drops them, moves the rebuilt ones into `public`,
//!    replaces the projection's dead letters with the rebuild's, sets every
//!    partition's checkpoint to P and commits. The live partitions resume
//!    after P.
//!
//! Why P ≥ C can always be reached under the lock: every event up to C was
//! committed before the live partition applied it, hence before this
//! transaction began; `read_after` only waits for event writers older than
//! that. Every wait here is bounded (`lock_timeout`,
//! [`LOCKED_CATCH_UP_TIMEOUT`]); a swap that times out rolls back and leaves
//! the live projection as it was (and the rebuild resumable).
//!
//! Readers see either the old tables or the new ones, never a mix and never
//! an empty table: the swap is one transaction. A swap of "listings" also
//! queues every listing for the search index (`search::enqueue_all`) in that
//! transaction, so the index follows the rows it was fed from.
//!
//! Dead letters: a rebuild parks what it cannot apply in its own
//! `dead_letters` copy. At the swap, the projection's parked events are
//! replaced by the rebuild's: a letter the rebuild could apply (a fixed
//! projector) is gone, one still refused keeps its id and gets the new error,
//! and an event an operator skipped (`dead_letter_actions`) stays skipped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use event_store::Position;
use event_store::fanout::partition_of;
use event_store::global::{RecordedEvent, read_after};
use event_store::leader;
use sqlx::pool::PoolConnection;
use sqlx::{Connection, PgConnection, PgPool, Postgres};

use crate::engine::{Kind, apply_isolated};
use crate::park::{DeadLetter, park_in};
use crate::rows::valid_schema;
use crate::runtime::projection_lock_key;

/// The longest a rebuild holds the projections' locks to catch up.
pub const LOCKED_CATCH_UP_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest the swap waits for the live tables before trying again.
const SWAP_LOCK_TIMEOUT: &str = "500ms";
/// How many times the swap tries to lock the live tables.
const SWAP_ATTEMPTS: u32 = 20;

/// The session lock held by the one rebuild of `kind` that may run.
fn rebuild_lock_key(kind: Kind) -> i64 {
    leader::lock_key(&format!("souk-projection-rebuild:{}", kind.name()))
}

/// What a rebuild did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RebuildReport {
    pub projection: String,
    /// The schema the tables were built in.
    pub schema: String,
    /// The last event the rebuilt tables include (a position token).
    pub position: Position,
    /// Events read from the global order (all aggregate types), this run
    /// and the runs it resumed.
    pub events_read: u64,
    /// Of those, events applied to this projection's tables.
    pub events_applied: u64,
    /// Events this projection could not apply, parked.
    pub events_parked: u64,
    /// Whether this run resumed an interrupted rebuild.
    pub resumed: bool,
    /// Whether the rebuilt tables replaced the live ones.
    pub swapped: bool,
}

/// Where a rebuild is, for progress bars and logs.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RebuildProgress {
    pub projections: Vec<String>,
    pub phase: RebuildPhase,
    /// Events read by this run so far.
    pub events_read: u64,
    /// Events this run has to read (counted when it started).
    pub events_total: u64,
    pub position: Position,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RebuildPhase {
    Building,
    Swapping,
    Swapped,
}

/// How to rebuild.
#[derive(Debug, Clone, Copy)]
pub struct RebuildOptions {
    /// The projectors' partition count (every partition gets a checkpoint).
    pub partitions: u32,
    /// Start over even if an interrupted rebuild could be resumed.
    pub restart: bool,
    /// Events read from the global order per batch (each batch one
    /// transaction and one progress record), 1 to 10,000.
    pub batch_events: i64,
}

/// The default of [`RebuildOptions::batch_events`].
pub const REBUILD_BATCH_EVENTS: i64 = 5_000;

/// The schema a rebuild of `projection` builds in before the swap.
pub fn rebuild_schema(projection: &str) -> String {
    format!("rebuild_{projection}")
}

fn kind_of(projection: &str) -> anyhow::Result<Kind> {
    Kind::parse(projection).with_context(|| {
        format!(
            "`{projection}` is not a projection (one of {})",
            crate::PROJECTIONS.join(", ")
        )
    })
}

/// One projection being rebuilt.
#[derive(Debug, Clone)]
struct Job {
    kind: Kind,
    report: RebuildReport,
    /// Whether its progress is kept in `projection_rebuilds`.
    tracked: bool,
}

/// Builds `projection` from scratch into `schema` (dropped first if it
/// exists) from every event committed so far, without touching the live
/// tables and without keeping progress. `partitions` only labels the dead
/// letters it parks (in `schema.dead_letters`).
pub async fn rebuild_into(
    pool: &PgPool,
    projection: &str,
    schema: &str,
    partitions: u32,
) -> anyhow::Result<RebuildReport> {
    let kind = kind_of(projection)?;
    anyhow::ensure!(
        valid_schema(schema) && schema != "public" && !schema.starts_with("pg_"),
        "`{schema}` cannot hold a rebuild: use a lowercase name other than public"
    );
    let mut jobs = vec![prepare(pool, kind, schema, false, true).await?];
    build(
        pool,
        &mut jobs,
        partitions,
        REBUILD_BATCH_EVENTS,
        &mut |_| {},
    )
    .await?;
    create_deferred_indexes(pool, kind, schema).await?;
    Ok(jobs.remove(0).report)
}

/// Rebuilds `projection` (resuming an interrupted rebuild of it) and swaps
/// the result in atomically while the projectors keep running.
pub async fn rebuild(
    pool: &PgPool,
    projection: &str,
    partitions: u32,
) -> anyhow::Result<RebuildReport> {
    let mut reports = rebuild_projections(
        pool,
        &[projection],
        RebuildOptions {
            partitions,
            restart: false,
            batch_events: REBUILD_BATCH_EVENTS,
        },
        &mut |_| {},
    )
    .await?;
    Ok(reports.remove(0))
}

/// Rebuilds `projections` in one pass over the log and swaps them in
/// together (see the module doc). An interrupted rebuild of any of them is
/// resumed unless `options.restart`. `progress` is told after every batch.
pub async fn rebuild_projections(
    pool: &PgPool,
    projections: &[&str],
    options: RebuildOptions,
    progress: &mut (dyn FnMut(&RebuildProgress) + Send),
) -> anyhow::Result<Vec<RebuildReport>> {
    let kinds = kinds_of(projections)?;
    let guard = lock_rebuilds(pool, &kinds).await?;
    let mut jobs = Vec::with_capacity(kinds.len());
    for kind in &kinds {
        jobs.push(
            prepare(
                pool,
                *kind,
                &rebuild_schema(kind.name()),
                options.restart,
                false,
            )
            .await?,
        );
    }
    build(
        pool,
        &mut jobs,
        options.partitions,
        options.batch_events.clamp(1, 10_000),
        progress,
    )
    .await?;
    for job in &jobs {
        create_deferred_indexes(pool, job.kind, &job.report.schema).await?;
    }
    swap(pool, &mut jobs, options.partitions, progress).await?;
    let _ = guard.close().await;
    Ok(jobs.into_iter().map(|job| job.report).collect())
}

/// Drops the interrupted rebuilds of `projections` (their schema and
/// progress). Returns the ones there was something to drop for.
pub async fn abandon(pool: &PgPool, projections: &[&str]) -> anyhow::Result<Vec<String>> {
    let kinds = kinds_of(projections)?;
    let guard = lock_rebuilds(pool, &kinds).await?;
    let mut dropped = Vec::new();
    for kind in kinds {
        let schema = rebuild_schema(kind.name());
        let mut conn = pool.acquire().await.context("connecting to Postgres")?;
        let mut tx = conn.begin().await?;
        let had_row = sqlx::query("DELETE FROM projection_rebuilds WHERE projection = $1")
            .bind(kind.name())
            .execute(&mut *tx)
            .await
            .context("forgetting the rebuild's progress")?
            .rows_affected()
            > 0;
        let had_schema: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
                .bind(&schema)
                .fetch_one(&mut *tx)
                .await?;
        sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .execute(&mut *tx)
            .await
            .context("dropping the rebuild's schema")?;
        tx.commit().await?;
        if had_row || had_schema {
            dropped.push(kind.name().to_owned());
        }
    }
    let _ = guard.close().await;
    Ok(dropped)
}

/// A rebuild in progress, as `projection_rebuilds` has it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RebuildInProgress {
    pub projection: String,
    pub position: Position,
    pub events_read: i64,
    pub events_applied: i64,
    pub events_parked: i64,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
    /// Whether a rebuild process holds it now (otherwise it was interrupted
    /// and resumes when `rebuild` runs again).
    pub running: bool,
}

type ProgressRow = (
    String,
    i64,
    i64,
    i64,
    i64,
    i64,
    chrono::DateTime<chrono::Utc>,
    chrono::DateTime<chrono::Utc>,
);

/// The rebuilds in progress (running or interrupted).
pub async fn rebuilds_in_progress(pool: &PgPool) -> anyhow::Result<Vec<RebuildInProgress>> {
    let rows: Vec<ProgressRow> = sqlx::query_as(
        "SELECT projection, transaction_id, position, events_read, events_applied,
                    events_parked, started_at, updated_at
               FROM projection_rebuilds ORDER BY projection",
    )
    .fetch_all(pool)
    .await
    .context("reading the rebuilds in progress")?;
    let mut out = Vec::with_capacity(rows.len());
    for (projection, transaction_id, position, read, applied, parked, started_at, updated_at) in
        rows
    {
        let running = match Kind::parse(&projection) {
            Some(kind) => {
                // A rebuild holds its session lock for as long as it runs.
                let free: bool = sqlx::query_scalar(
                    "SELECT NOT EXISTS (SELECT 1 FROM pg_locks
                      WHERE locktype = 'advisory' AND granted
                        AND objsubid = 1 AND ((classid::bigint << 32) | objid::bigint) = $1
                        AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))",
                )
                .bind(rebuild_lock_key(kind))
                .fetch_one(pool)
                .await?;
                !free
            }
            None => false,
        };
        out.push(RebuildInProgress {
            projection,
            position: Position {
                transaction_id: transaction_id as u64,
                position,
            },
            events_read: read,
            events_applied: applied,
            events_parked: parked,
            started_at,
            updated_at,
            running,
        });
    }
    Ok(out)
}

fn kinds_of(projections: &[&str]) -> anyhow::Result<Vec<Kind>> {
    let mut kinds = Vec::new();
    for name in projections {
        let kind = kind_of(name)?;
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    anyhow::ensure!(!kinds.is_empty(), "no projection to rebuild");
    kinds.sort_by_key(|kind| kind.name());
    Ok(kinds)
}

/// Takes the rebuild lock of every kind on a connection of its own: it
/// lives until that connection is closed (so it is released however the
/// rebuild ends).
async fn lock_rebuilds(pool: &PgPool, kinds: &[Kind]) -> anyhow::Result<PgConnection> {
    let mut guard = pool
        .acquire()
        .await
        .context("connecting to Postgres")?
        .detach();
    for kind in kinds {
        let alone = leader::try_lead(&mut guard, rebuild_lock_key(*kind))
            .await
            .context("taking the rebuild lock")?;
        anyhow::ensure!(alone, "another rebuild of {} is running", kind.name());
    }
    Ok(guard)
}

/// Readies `kind`'s rebuild in `schema`: resumes the one recorded in
/// `projection_rebuilds` unless told to `restart`, otherwise creates the
/// schema afresh. `untracked` rebuilds (`rebuild_into`) keep no progress.
async fn prepare(
    pool: &PgPool,
    kind: Kind,
    schema: &str,
    restart: bool,
    untracked: bool,
) -> anyhow::Result<Job> {
    let mut report = RebuildReport {
        projection: kind.name().to_owned(),
        schema: schema.to_owned(),
        position: Position::START,
        events_read: 0,
        events_applied: 0,
        events_parked: 0,
        resumed: false,
        swapped: false,
    };
    let mut conn = pool.acquire().await.context("connecting to Postgres")?;
    let mut tx = conn.begin().await?;
    if !untracked && !restart {
        let row: Option<(String, i64, i64, i64, i64, i64)> = sqlx::query_as(
            "SELECT schema_name, transaction_id, position, events_read, events_applied, events_parked
               FROM projection_rebuilds WHERE projection = $1",
        )
        .bind(kind.name())
        .fetch_optional(&mut *tx)
        .await
        .context("reading the rebuild's progress")?;
        if let Some((recorded, transaction_id, position, read, applied, parked)) = row
            && recorded == schema
            && tables_exist(&mut tx, kind, schema).await?
        {
            report.position = Position {
                transaction_id: transaction_id as u64,
                position,
            };
            report.events_read = read as u64;
            report.events_applied = applied as u64;
            report.events_parked = parked as u64;
            report.resumed = true;
            tx.commit().await?;
            tracing::info!(projection = kind.name(), position = %report.position, "resuming a rebuild");
            return Ok(Job {
                kind,
                report,
                tracked: true,
            });
        }
    }
    create_schema(&mut tx, kind, schema).await?;
    if !untracked {
        sqlx::query(
            "INSERT INTO projection_rebuilds (projection, schema_name) VALUES ($1, $2)
             ON CONFLICT (projection) DO UPDATE
                SET schema_name = EXCLUDED.schema_name, transaction_id = 0, position = 0,
                    events_read = 0, events_applied = 0, events_parked = 0,
                    started_at = now(), updated_at = now()",
        )
        .bind(kind.name())
        .bind(schema)
        .execute(&mut *tx)
        .await
        .context("recording the rebuild")?;
    }
    tx.commit().await?;
    Ok(Job {
        kind,
        report,
        tracked: !untracked,
    })
}

async fn tables_exist(conn: &mut PgConnection, kind: Kind, schema: &str) -> anyhow::Result<bool> {
    let mut names: Vec<String> = kind.tables().iter().map(|t| (*t).to_owned()).collect();
    names.push("dead_letters".to_owned());
    let found: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND tablename = ANY($2)",
    )
    .bind(schema)
    .bind(&names)
    .fetch_one(conn)
    .await?;
    Ok(found == names.len() as i64)
}

/// Batches the reader of a build may be ahead of its slowest lane: what
/// bounds the events a build holds in memory.
const BATCHES_AHEAD: usize = 2;

/// Replays the global order from the jobs' positions until nothing more is
/// committed.
///
/// A pipeline of tasks: one reads the global order batch after batch, and
/// each lane (a connection of its own, one projection or a few) applies
/// every batch to its jobs as soon as it has it, in its own transaction per
/// batch. The lanes do not wait for each other: while one decodes and
/// builds rows, the others' Postgres backends write and the reader reads
/// ahead (at most [`BATCHES_AHEAD`] batches), so both cores stay busy.
/// Every job records its own progress, so lanes that commit apart resume
/// apart (`replay_job` skips what a job already has).
async fn build(
    pool: &PgPool,
    jobs: &mut [Job],
    partitions: u32,
    batch_events: i64,
    progress: &mut (dyn FnMut(&RebuildProgress) + Send),
) -> anyhow::Result<()> {
    let started = Instant::now();
    let from = jobs
        .iter()
        .map(|job| job.report.position)
        .min()
        .unwrap_or(Position::START);
    let events_total: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE (transaction_id, position) > ($1::text::xid8, $2)",
    )
    .bind(from.transaction_id.to_string())
    .bind(from.position)
    .fetch_one(pool)
    .await
    .context("counting the events to replay")?;
    let mut state = RebuildProgress {
        projections: jobs.iter().map(|job| job.kind.name().to_owned()).collect(),
        phase: RebuildPhase::Building,
        events_read: 0,
        events_total: events_total.max(0) as u64,
        position: from,
    };
    progress(&state);

    let lanes = lanes_of(pool, jobs);
    let (applied, mut applied_batches) = tokio::sync::mpsc::channel(BATCHES_AHEAD * lanes.len());
    let mut senders = Vec::with_capacity(lanes.len());
    let mut tasks = tokio::task::JoinSet::new();
    for (lane, lane_jobs) in lanes.into_iter().enumerate() {
        let (sender, batches) = tokio::sync::mpsc::channel(BATCHES_AHEAD);
        senders.push(sender);
        tasks.spawn(run_lane(
            pool.clone(),
            lane,
            lane_jobs,
            partitions,
            batches,
            applied.clone(),
        ));
    }
    drop(applied);
    let lane_count = senders.len();
    tasks.spawn(read_batches(pool.clone(), from, batch_events, senders));

    // Progress is the slowest lane's.
    let mut read_by_lane = vec![(0u64, from); lane_count];
    while let Some((lane, events, position)) = applied_batches.recv().await {
        let (read, at) = &mut read_by_lane[lane];
        *read += events;
        *at = position;
        if let Some((read, at)) = read_by_lane.iter().min() {
            state.events_read = *read;
            state.events_total = state.events_total.max(*read);
            state.position = *at;
        }
        progress(&state);
    }
    let mut failed = None;
    while let Some(finished) = tasks.join_next().await {
        match finished.context("a rebuild task failed") {
            Ok(Ok(finished_jobs)) => {
                for (index, job) in finished_jobs {
                    jobs[index] = job;
                }
            }
            Ok(Err(error)) | Err(error) => {
                failed.get_or_insert(error);
            }
        }
    }
    if let Some(error) = failed {
        return Err(error);
    }
    tracing::info!(
        projections = ?state.projections,
        position = %state.position,
        events_read = state.events_read,
        seconds = started.elapsed().as_secs_f64(),
        "projections rebuilt aside"
    );
    Ok(())
}

/// A job with its index among the build's jobs.
type LaneJob = (usize, Job);

/// Splits the jobs into lanes, each to be applied on a connection of its
/// own, keeping one connection of the pool for the reader: a lane per job
/// when the pool allows, else the two lanes of `Kind::rebuild_lane`
/// (balanced by the rows a marketplace's log writes), else one.
fn lanes_of(pool: &PgPool, jobs: &[Job]) -> Vec<Vec<LaneJob>> {
    let connections = pool.options().get_max_connections() as usize;
    let count = connections.saturating_sub(1).clamp(1, jobs.len().max(1));
    let mut lanes: Vec<Vec<LaneJob>> = (0..count).map(|_| Vec::new()).collect();
    for (index, job) in jobs.iter().enumerate() {
        let lane = if count >= jobs.len() {
            index
        } else if count >= 2 {
            job.kind.rebuild_lane()
        } else {
            0
        };
        lanes[lane].push((index, job.clone()));
    }
    lanes.retain(|lane| !lane.is_empty());
    lanes
}

/// Reads the global order after `from` until nothing more is committed,
/// handing every batch to every lane.
async fn read_batches(
    pool: PgPool,
    mut from: Position,
    batch_events: i64,
    lanes: Vec<tokio::sync::mpsc::Sender<Arc<Vec<RecordedEvent>>>>,
) -> anyhow::Result<Vec<LaneJob>> {
    loop {
        let events = read_after(&pool, from, batch_events)
            .await
            .context("reading the global order")?;
        let Some(last) = events.last().map(|event| event.position) else {
            return Ok(Vec::new());
        };
        from = last;
        let batch = Arc::new(events);
        for lane in &lanes {
            if lane.send(Arc::clone(&batch)).await.is_err() {
                // The lane stopped: its error is the one to report.
                return Ok(Vec::new());
            }
        }
    }
}

/// Applies every batch it is handed to its jobs, one transaction per batch
/// on a connection of its own, and says so on `applied` (lane, events,
/// last position). Returns its jobs, their reports up to date.
async fn run_lane(
    pool: PgPool,
    lane: usize,
    mut jobs: Vec<LaneJob>,
    partitions: u32,
    mut batches: tokio::sync::mpsc::Receiver<Arc<Vec<RecordedEvent>>>,
    applied: tokio::sync::mpsc::Sender<(usize, u64, Position)>,
) -> anyhow::Result<Vec<LaneJob>> {
    let mut conn = batch_connection(&pool).await?;
    while let Some(events) = batches.recv().await {
        let Some(last) = events.last().map(|event| event.position) else {
            continue;
        };
        let mut lane_jobs: Vec<&mut Job> = jobs.iter_mut().map(|(_, job)| job).collect();
        apply_lane(&mut conn, &mut lane_jobs, partitions, &events).await?;
        // The build only stops listening once every lane is done.
        let _ = applied.send((lane, events.len() as u64, last)).await;
    }
    Ok(jobs)
}

/// Applies `events` to each job of a lane in one transaction on `conn`.
async fn apply_lane(
    conn: &mut PgConnection,
    lane: &mut [&mut Job],
    partitions: u32,
    events: &[RecordedEvent],
) -> anyhow::Result<()> {
    let mut tx = conn.begin().await.context("beginning a rebuild batch")?;
    for job in lane.iter_mut() {
        replay_job(&mut tx, job, partitions, events).await?;
    }
    tx.commit().await.context("committing a rebuild batch")
}

/// A connection for rebuild batches: they need not wait for the WAL flush,
/// since a lost batch is lost together with the progress it recorded.
async fn batch_connection(pool: &PgPool) -> anyhow::Result<PoolConnection<Postgres>> {
    let mut conn = pool.acquire().await.context("connecting to Postgres")?;
    sqlx::query("SET synchronous_commit = off")
        .execute(&mut *conn)
        .await?;
    Ok(conn)
}

/// Applies the events of `events` after the job's position, and records its
/// progress, in the caller's transaction.
async fn replay_job(
    conn: &mut PgConnection,
    job: &mut Job,
    partitions: u32,
    events: &[RecordedEvent],
) -> anyhow::Result<()> {
    let start = events.partition_point(|event| event.position <= job.report.position);
    let events = &events[start..];
    if events.is_empty() {
        return Ok(());
    }
    let schema = job.report.schema.clone();
    replay(conn, job.kind, &schema, partitions, events, &mut job.report).await?;
    if job.tracked {
        sqlx::query(
            "UPDATE projection_rebuilds
                SET transaction_id = $2, position = $3, events_read = $4, events_applied = $5,
                    events_parked = $6, updated_at = now()
              WHERE projection = $1",
        )
        .bind(job.kind.name())
        .bind(job.report.position.transaction_id as i64)
        .bind(job.report.position.position)
        .bind(job.report.events_read as i64)
        .bind(job.report.events_applied as i64)
        .bind(job.report.events_parked as i64)
        .execute(&mut *conn)
        .await
        .context("recording the rebuild's progress")?;
    }
    Ok(())
}

/// Whether `error` is a lock that could not be had in time.
fn is_lock_timeout(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<sqlx::Error>()
            .and_then(|error| error.as_database_error())
            .and_then(|db| db.code())
            .is_some_and(|code| code == "55P03")
    })
}

/// Catches up under the projections' locks and swaps every job in, in one
/// transaction (see the module doc), trying again when the live tables are
/// busy.
async fn swap(
    pool: &PgPool,
    jobs: &mut [Job],
    partitions: u32,
    progress: &mut (dyn FnMut(&RebuildProgress) + Send),
) -> anyhow::Result<()> {
    let mut state = RebuildProgress {
        projections: jobs.iter().map(|job| job.kind.name().to_owned()).collect(),
        phase: RebuildPhase::Swapping,
        events_read: 0,
        events_total: 0,
        position: jobs
            .iter()
            .map(|job| job.report.position)
            .min()
            .unwrap_or(Position::START),
    };
    progress(&state);
    let saved: Vec<RebuildReport> = jobs.iter().map(|job| job.report.clone()).collect();
    for attempt in 1..=SWAP_ATTEMPTS {
        match try_swap(pool, jobs, partitions).await {
            Ok(()) => {
                state.phase = RebuildPhase::Swapped;
                state.position = jobs
                    .iter()
                    .map(|job| job.report.position)
                    .max()
                    .unwrap_or(state.position);
                progress(&state);
                return Ok(());
            }
            Err(error) if is_lock_timeout(&error) && attempt < SWAP_ATTEMPTS => {
                // What the attempt replayed was rolled back with it.
                for (job, report) in jobs.iter_mut().zip(&saved) {
                    job.report = report.clone();
                }
                tracing::info!(attempt, "the live tables are busy; swapping again shortly");
                tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
            }
            Err(error) => return Err(error),
        }
    }
    unreachable!("the last attempt returns")
}

async fn try_swap(pool: &PgPool, jobs: &mut [Job], partitions: u32) -> anyhow::Result<()> {
    let mut conn = pool.acquire().await.context("connecting to Postgres")?;
    let mut tx = conn.begin().await.context("beginning the swap")?;
    sqlx::query("SET LOCAL lock_timeout = '30s'")
        .execute(&mut *tx)
        .await?;
    let names: Vec<&str> = jobs.iter().map(|job| job.kind.name()).collect();
    for job in jobs.iter() {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(projection_lock_key(job.kind))
            .execute(&mut *tx)
            .await
            .context("taking the projection's lock (live batches stop here)")?;
    }
    let live: Option<(i64, i64)> = sqlx::query_as(
        "SELECT transaction_id, position FROM projection_checkpoints
          WHERE projection = ANY($1) ORDER BY transaction_id DESC, position DESC LIMIT 1",
    )
    .bind(&names)
    .fetch_optional(&mut *tx)
    .await
    .context("reading the live checkpoints")?;
    let live = live.map_or(Position::START, |(transaction_id, position)| Position {
        transaction_id: transaction_id as u64,
        position,
    });
    let deadline = Instant::now() + LOCKED_CATCH_UP_TIMEOUT;
    loop {
        let from = jobs
            .iter()
            .map(|job| job.report.position)
            .min()
            .unwrap_or(Position::START);
        let events = read_after(pool, from, REBUILD_BATCH_EVENTS)
            .await
            .context("reading the global order")?;
        if events.is_empty() {
            if from >= live {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the live projection is at {live} but the event store shows nothing after {from} \
                 within {LOCKED_CATCH_UP_TIMEOUT:?}; nothing was swapped"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        for job in jobs.iter_mut() {
            replay_job(&mut tx, job, partitions, &events).await?;
        }
    }
    // One position for all: every job has read the same events by now.
    let at = jobs
        .iter()
        .map(|job| job.report.position)
        .max()
        .unwrap_or(Position::START);
    let tables: Vec<String> = jobs
        .iter()
        .flat_map(|job| {
            job.kind
                .tables()
                .iter()
                .map(|table| format!("public.{table}"))
        })
        .collect();
    sqlx::query(&format!("SET LOCAL lock_timeout = '{SWAP_LOCK_TIMEOUT}'"))
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!(
        "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
        tables.join(", ")
    ))
    .execute(&mut *tx)
    .await
    .context("locking the live tables")?;
    for job in jobs.iter_mut() {
        let (kind, schema) = (job.kind, job.report.schema.clone());
        for table in kind.tables() {
            sqlx::query(&format!("DROP TABLE public.{table}"))
                .execute(&mut *tx)
                .await
                .with_context(|| format!("dropping the live {table}"))?;
            sqlx::query(&format!("ALTER TABLE {schema}.{table} SET SCHEMA public"))
                .execute(&mut *tx)
                .await
                .with_context(|| format!("moving the rebuilt {table} in"))?;
        }
        replace_dead_letters(&mut tx, kind, &schema).await?;
        sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
            .execute(&mut *tx)
            .await
            .context("dropping the rebuild schema")?;
        move_checkpoints(&mut tx, kind, partitions, at).await?;
        if kind == Kind::Listings {
            // The search index follows the rows it was fed from; they were
            // just replaced, so every listing is indexed again.
            crate::search::enqueue_all(&mut tx, at)
                .await
                .context("queueing the listings for the search index")?;
        }
        job.report.position = at;
        job.report.swapped = true;
    }
    sqlx::query("DELETE FROM projection_rebuilds WHERE projection = ANY($1)")
        .bind(&names)
        .execute(&mut *tx)
        .await
        .context("forgetting the finished rebuilds")?;
    tx.commit().await.context("committing the swap")?;
    if names.contains(&Kind::Listings.name())
        && let Err(error) = event_store::signal::notify(pool, crate::search::CHANNEL).await
    {
        // The indexer also polls: it only starts later.
        tracing::warn!(%error, "cannot wake the search indexer");
    }
    tracing::info!(projections = ?names, position = %at, "rebuilt projections swapped in");
    Ok(())
}

/// The projection's dead letters become the rebuild's (see the module doc).
async fn replace_dead_letters(
    conn: &mut PgConnection,
    kind: Kind,
    schema: &str,
) -> anyhow::Result<()> {
    sqlx::query(&format!(
        "DELETE FROM public.dead_letters d
          WHERE d.projection = $1
            AND NOT EXISTS (SELECT 1 FROM {schema}.dead_letters r WHERE r.event_id = d.event_id)"
    ))
    .bind(kind.name())
    .execute(&mut *conn)
    .await
    .context("dropping dead letters the rebuild applied")?;
    sqlx::query(&format!(
        "INSERT INTO public.dead_letters
                (projection, partition, event_id, aggregate_type, aggregate_id, sequence,
                 event_type, transaction_id, position, error, envelope, parked_at)
         SELECT projection, partition, event_id, aggregate_type, aggregate_id, sequence,
                event_type, transaction_id, position, error, envelope, parked_at
           FROM {schema}.dead_letters r
          WHERE NOT EXISTS (SELECT 1 FROM public.dead_letter_actions a
                             WHERE a.projection = r.projection AND a.event_id = r.event_id
                               AND a.action = 'skipped')
         ON CONFLICT (projection, event_id) DO UPDATE SET error = EXCLUDED.error"
    ))
    .execute(&mut *conn)
    .await
    .context("keeping the dead letters the rebuild parked")?;
    Ok(())
}

async fn move_checkpoints(
    conn: &mut PgConnection,
    kind: Kind,
    partitions: u32,
    at: Position,
) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO projection_checkpoints AS c
                (projection, partition, transaction_id, position,
                 caught_up_transaction, caught_up_position, updated_at)
         SELECT $1, partition, $3, $4, $3, $4, now()
           FROM generate_series(0, $2 - 1) AS n(partition)
         ON CONFLICT (projection, partition) DO NOTHING",
    )
    .bind(kind.name())
    .bind(partitions.max(1) as i32)
    .bind(at.transaction_id as i64)
    .bind(at.position)
    .execute(&mut *conn)
    .await
    .context("creating checkpoints")?;
    sqlx::query(
        "UPDATE projection_checkpoints
            SET transaction_id = $2,
                position = $3,
                caught_up_transaction = CASE WHEN (caught_up_transaction, caught_up_position) < ($2, $3)
                                             THEN $2 ELSE caught_up_transaction END,
                caught_up_position = CASE WHEN (caught_up_transaction, caught_up_position) < ($2, $3)
                                          THEN $3 ELSE caught_up_position END,
                updated_at = now()
          WHERE projection = $1",
    )
    .bind(kind.name())
    .bind(at.transaction_id as i64)
    .bind(at.position)
    .execute(&mut *conn)
    .await
    .context("moving the checkpoints")?;
    Ok(())
}

/// Applies `events` (a chunk of the global order) to `schema`, parking what
/// the projection refuses in `schema.dead_letters`.
async fn replay(
    conn: &mut PgConnection,
    kind: Kind,
    schema: &str,
    partitions: u32,
    events: &[RecordedEvent],
    report: &mut RebuildReport,
) -> anyhow::Result<()> {
    let handled: Vec<&RecordedEvent> = events
        .iter()
        .filter(|event| kind.handles(&event.aggregate_type))
        .collect();
    let refused = apply_isolated(conn, kind, schema, &handled)
        .await
        .context("applying events")?;
    for (index, why) in &refused {
        let event = handled[*index];
        let partition = partition_of(&event.aggregate_id, partitions.max(1)) as i32;
        park_in(
            conn,
            schema,
            kind.name(),
            partition,
            &DeadLetter::event(event, why.0.clone()),
        )
        .await
        .context("parking a poison event")?;
    }
    report.events_read += events.len() as u64;
    report.events_applied += (handled.len() - refused.len()) as u64;
    report.events_parked += refused.len() as u64;
    if let Some(last) = events.last() {
        report.position = last.position;
    }
    Ok(())
}

/// Creates `schema` afresh with empty copies of the projection's tables
/// and of `dead_letters`, their indexes named like the live ones (so a swap
/// keeps the names).
async fn create_schema(conn: &mut PgConnection, kind: Kind, schema: &str) -> anyhow::Result<()> {
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .execute(&mut *conn)
        .await
        .context("dropping an earlier rebuild")?;
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&mut *conn)
        .await
        .context("creating the rebuild schema")?;
    sqlx::query(&format!(
        "CREATE TABLE {schema}.dead_letters (LIKE public.dead_letters INCLUDING ALL)"
    ))
    .execute(&mut *conn)
    .await
    .context("creating the rebuild's dead letters")?;
    for table in kind.tables() {
        sqlx::query(&format!(
            "CREATE TABLE {schema}.{table} (LIKE public.{table} INCLUDING ALL)"
        ))
        .execute(&mut *conn)
        .await
        .with_context(|| format!("creating {schema}.{table}"))?;
        let live = indexes(conn, "public", table).await?;
        for (name, shape) in indexes(conn, schema, table).await? {
            if !shape.unique {
                // Not needed to build (rows are looked up and upserted by
                // their primary key): made once the rows are in, before
                // the swap (`create_deferred_indexes`), instead of being
                // maintained on every write of the build.
                sqlx::query(&format!("DROP INDEX {schema}.{}", quote(&name)))
                    .execute(&mut *conn)
                    .await
                    .with_context(|| format!("deferring the index {name}"))?;
            } else if let Some((live_name, _)) =
                live.iter().find(|(_, live_shape)| *live_shape == shape)
                && *live_name != name
            {
                sqlx::query(&format!(
                    "ALTER INDEX {schema}.{} RENAME TO {}",
                    quote(&name),
                    quote(live_name)
                ))
                .execute(&mut *conn)
                .await
                .with_context(|| format!("naming the index {name}"))?;
            }
        }
    }
    Ok(())
}

/// Creates in `schema` every index of the live tables of `kind` that the
/// rebuilt tables lack (the ones `create_schema` deferred), named like the
/// live ones. Each `CREATE INDEX` is atomic: a rebuild killed here resumes
/// and creates the ones still missing.
async fn create_deferred_indexes(pool: &PgPool, kind: Kind, schema: &str) -> anyhow::Result<()> {
    let mut conn = pool.acquire().await.context("connecting to Postgres")?;
    for table in kind.tables() {
        let built = indexes(&mut conn, schema, table).await?;
        for (name, shape) in indexes(&mut conn, "public", table).await? {
            if built.iter().any(|(_, built_shape)| *built_shape == shape) {
                continue;
            }
            sqlx::query(&format!(
                "CREATE {}INDEX {} ON {schema}.{table} USING {}",
                if shape.unique { "UNIQUE " } else { "" },
                quote(&name),
                shape.using
            ))
            .execute(&mut *conn)
            .await
            .with_context(|| format!("creating the index {name} of {schema}.{table}"))?;
        }
    }
    Ok(())
}

/// What two copies of a table's index have in common: uniqueness and the
/// definition after `USING` (method, columns, `INCLUDE`, `WHERE`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct IndexShape {
    unique: bool,
    using: String,
}

/// The indexes of `schema.table`: each name with its shape.
async fn indexes(
    conn: &mut PgConnection,
    schema: &str,
    table: &str,
) -> anyhow::Result<Vec<(String, IndexShape)>> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT c.relname::text, pg_get_indexdef(c.oid)
           FROM pg_index i
           JOIN pg_class c ON c.oid = i.indexrelid
           JOIN pg_class t ON t.oid = i.indrelid
           JOIN pg_namespace n ON n.oid = t.relnamespace
          WHERE n.nspname = $1 AND t.relname = $2",
    )
    .bind(schema)
    .bind(table)
    .fetch_all(conn)
    .await
    .context("reading index definitions")?;
    Ok(rows
        .into_iter()
        .map(|(name, definition)| {
            let unique = definition.starts_with("CREATE UNIQUE");
            let using = definition
                .split_once(" USING ")
                .map_or(definition.as_str(), |(_, rest)| rest)
                .to_owned();
            (name, IndexShape { unique, using })
        })
        .collect())
}

/// A quoted SQL identifier.
fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rebuild_schemas_are_named_after_their_projection() {
        for name in crate::PROJECTIONS {
            assert!(valid_schema(&rebuild_schema(name)));
        }
        assert_eq!(quote("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn several_projections_are_rebuilt_in_a_fixed_order_once_each() {
        let kinds = kinds_of(&["wallets", "listings", "wallets"]).unwrap();
        assert_eq!(kinds, vec![Kind::Listings, Kind::Wallets]);
        assert!(kinds_of(&["nope"]).is_err());
        assert!(kinds_of(&[]).is_err());
    }
}
