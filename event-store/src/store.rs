//! Command execution against the Postgres event store.
//!
//! Each aggregate instance has a *lane* in this process: a queue of pending
//! commands, one worker task at a time that drains it, and the aggregate's
//! cached state (with its version and last hash). The worker takes up to
//! `batch_max` queued commands, decides them one after the other on the
//! cached state and commits all their events, idempotency records and a
//! snapshot in one transaction. A hot aggregate (thousands of buyers on one
//! listing) therefore costs one transaction per batch, not one conflict
//! storm per request.
//!
//! Nothing here assumes a single process: the cache is only a guess. Every
//! INSERT is checked by the primary key `(aggregate_type, aggregate_id,
//! sequence)`; a unique violation means another process wrote first, so the
//! cache is dropped, the state reloaded and the batch decided again, at most
//! `max_attempts` times, then answered [`ExecError::Conflict`].
//!
//! Commands that must change several aggregates atomically (a checkout
//! reserves stock, holds funds and confirms the order) go through
//! [`EventStore::execute_multi`]: it locks the lanes of every declared stream
//! in a fixed order (so two units of work cannot deadlock), runs a pure
//! planning closure over their states and commits everything in one
//! transaction.
//!
//! Work runs in spawned tasks, so a client that hangs up cannot cancel a
//! transaction half-way through its commit.

use std::any::Any;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use domain::{Decide, DomainError, DomainEvent, Refusal};
use serde_json::{Value, json};
use sqlx::postgres::PgPool;
use sqlx::{Postgres, Transaction};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::backoff::Backoff;
use crate::group_commit::GroupCommit;
use crate::record::{
    ChainedFields, CommandContext, EventMetadata, GENESIS_HASH, Position, now_micros,
};
use crate::signal::CommitSignal;

/// Limits of the command executor. Every queue, batch and retry is bounded.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// How many times a batch is decided again after a concurrency conflict.
    pub max_attempts: u32,
    /// Most commands committed in one transaction for one aggregate.
    pub batch_max: usize,
    /// Most commands waiting for one aggregate before new ones are refused.
    pub queue_max: usize,
    /// A snapshot is written when a command crosses a multiple of this.
    pub snapshot_every: i64,
    /// Cached aggregate states kept in this process.
    pub cache_max: usize,
    /// Most group-commit statements in flight at once (see `group_commit`;
    /// [`DEFAULT_WRITERS`]).
    pub writers: usize,
    /// Most events in one group-commit statement.
    pub group_rows: usize,
}

/// Group-commit statements in flight by default. On two cores, 2 wrote
/// more checkouts per second at a lower p99 than 4 (three runs of each of
/// the write benchmark's checkout rows, README), and 4 far more than 64;
/// presumably because fewer statements in flight make bigger groups and
/// fewer WAL flushes (group sizes were not measured).
pub const DEFAULT_WRITERS: u16 = 2;

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            max_attempts: 8,
            batch_max: 128,
            queue_max: 8192,
            snapshot_every: 100,
            cache_max: 20_000,
            writers: usize::from(DEFAULT_WRITERS),
            group_rows: 1024,
        }
    }
}

/// The INSERT of events from the arrays `$1`..`$11` of [`EventColumns`],
/// returning what [`positions_of`] reads.
macro_rules! insert_events_sql {
    () => {
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                             payload, metadata, recorded_at, event_id, prev_hash, hash)
         SELECT aggregate_type, aggregate_id, sequence, event_type, event_version,
                payload::json, metadata::json, recorded_at, event_id, prev_hash, hash
           FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::text[], $5::text[], $6::text[],
                       $7::text[], $8::timestamptz[], $9::uuid[], $10::bytea[], $11::bytea[])
             AS t(aggregate_type, aggregate_id, sequence, event_type, event_version, payload,
                  metadata, recorded_at, event_id, prev_hash, hash)
         RETURNING aggregate_type, aggregate_id, sequence, position,
                   transaction_id::text::bigint"
    };
}

/// An Idempotency-Key, scoped to the user who sent it, with a hash of the
/// request it came with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    pub scope: String,
    pub key: String,
    pub request_hash: [u8; 32],
}

/// An accepted command's response, or the stored response of an earlier
/// request with the same Idempotency-Key.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    pub status: u16,
    pub body: Value,
    /// True when this is the stored response of an earlier request.
    pub replayed: bool,
}

impl Accepted {
    /// The position token of the response body, if it has one.
    pub fn position(&self) -> Option<Position> {
        self.body
            .get("position")
            .and_then(Value::as_str)
            .and_then(|token| Position::parse_token(token).ok())
    }

    /// The `version` of the response body, if it has one.
    pub fn version(&self) -> Option<i64> {
        self.body.get("version").and_then(Value::as_i64)
    }
}

/// Why a command was not accepted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExecError {
    /// The aggregate refused the command (nothing was written).
    #[error("{message}")]
    Rejected {
        code: &'static str,
        refusal: Refusal,
        message: String,
    },
    /// Concurrency conflicts persisted after every retry.
    #[error("concurrent changes persisted after {0} attempts")]
    Conflict(u32),
    /// The Idempotency-Key was used before with a different request.
    #[error("idempotency key reused with a different request")]
    IdempotencyKeyReused,
    /// Too many commands are queued for this aggregate.
    #[error("too many commands queued for this aggregate")]
    Overloaded,
    /// The database could not be reached or is shutting down.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A bug or corrupt data; the details are logged.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ExecError {
    pub fn rejected<E: DomainError>(error: &E) -> Self {
        Self::Rejected {
            code: error.code(),
            refusal: error.refusal(),
            message: error.to_string(),
        }
    }
}

/// How a database error should be treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DbFailure {
    Conflict,
    Unavailable,
    Internal,
}

pub(crate) fn classify(error: &sqlx::Error) -> DbFailure {
    match error {
        sqlx::Error::Database(db) => match db.code().as_deref() {
            // unique_violation: another writer took this sequence number or
            // idempotency key first; serialization_failure, deadlock_detected.
            Some("23505" | "40001" | "40P01") => DbFailure::Conflict,
            // connection_exception class, admin/crash shutdown, cannot
            // connect now, too many connections.
            Some(code)
                if code.starts_with("08") || code.starts_with("57P") || code.starts_with("53") =>
            {
                DbFailure::Unavailable
            }
            _ => DbFailure::Internal,
        },
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => DbFailure::Unavailable,
        _ => DbFailure::Internal,
    }
}

pub(crate) fn db_error(error: sqlx::Error) -> ExecError {
    match classify(&error) {
        DbFailure::Conflict => ExecError::Conflict(1),
        DbFailure::Unavailable => {
            tracing::warn!(error = %error, "database unavailable");
            ExecError::Unavailable(error.to_string())
        }
        DbFailure::Internal => {
            tracing::error!(error = ?error, "database error");
            ExecError::Internal(error.to_string())
        }
    }
}

/// An aggregate's state as of its last stored event.
#[derive(Debug, Clone)]
pub(crate) struct Cached<A> {
    pub state: A,
    pub version: i64,
    pub last_hash: [u8; 32],
}

impl<A: Default> Default for Cached<A> {
    fn default() -> Self {
        Self {
            state: A::default(),
            version: 0,
            last_hash: GENESIS_HASH,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct LaneKey {
    pub aggregate_type: &'static str,
    pub aggregate_id: String,
}

type ErasedState = Option<Box<dyn Any + Send + Sync>>;

#[derive(Default)]
struct LaneQueue {
    pending: VecDeque<Box<dyn Any + Send + Sync>>,
    worker_running: bool,
}

#[derive(Default)]
struct Lane {
    queue: Mutex<LaneQueue>,
    cache: Arc<tokio::sync::Mutex<ErasedState>>,
    /// The store's use clock when this lane was last looked up.
    last_used: AtomicU64,
}

struct Pending<A: Decide> {
    command: A::Command,
    context: CommandContext,
    idempotency: Option<IdempotencyKey>,
    reply_with: Reply,
    reply: oneshot::Sender<Result<Accepted, ExecError>>,
}

/// What happens when a single-aggregate command is accepted: it is answered
/// `status` with `{"id": id, "version", "position"}` (the id is usually the
/// aggregate's; a reservation answers with its hold's id), and `timers` are
/// armed in the same transaction as its events.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub id: String,
    pub timers: Vec<Timer>,
}

impl Reply {
    pub fn new(status: u16, id: impl Into<String>) -> Self {
        Self {
            status,
            id: id.into(),
            timers: Vec::new(),
        }
    }
}

/// A durable timer of a process manager, stored in the `timers` table in the
/// transaction that arms it. `timer_id` is deterministic (derived from what
/// it is about), so arming it twice stores it once.
#[derive(Debug, Clone, PartialEq)]
pub struct Timer {
    pub timer_id: Uuid,
    pub kind: String,
    pub due_at: chrono::DateTime<chrono::Utc>,
    pub payload: Value,
}

/// One event ready to be inserted.
#[derive(Debug, Clone)]
pub(crate) struct NewRow {
    pub aggregate_type: &'static str,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub payload: String,
    pub metadata: String,
    pub recorded_at: chrono::DateTime<chrono::Utc>,
    pub event_id: Uuid,
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
}

/// Decides `command` on `cached` and, when accepted, applies the events to it
/// and returns them as chained rows. Every fallible step (deciding,
/// serializing) comes before the first event is applied, so a refusal or an
/// error leaves `cached` as it was: callers need no copy to fall back on.
fn decide_rows<A: Decide>(
    cached: &mut Cached<A>,
    aggregate_id: &str,
    command: A::Command,
    context: &CommandContext,
) -> Result<Vec<NewRow>, ExecError> {
    let events = cached
        .state
        .decide(command)
        .map_err(|error| ExecError::rejected(&error))?;
    chain_rows(cached, aggregate_id, events, context)
}

/// Serializes and chains `events` after `cached`, then applies them to it.
/// Applies nothing when serializing fails.
fn chain_rows<A: Decide>(
    cached: &mut Cached<A>,
    aggregate_id: &str,
    events: Vec<A::Event>,
    context: &CommandContext,
) -> Result<Vec<NewRow>, ExecError> {
    let mut rows = Vec::with_capacity(events.len());
    let mut version = cached.version;
    let mut last_hash = cached.last_hash;
    for event in &events {
        let event_type = event.event_type();
        let event_version = event.event_version();
        let payload = serde_json::to_string(event)
            .map_err(|error| ExecError::Internal(format!("serializing an event: {error}")))?;
        let recorded_at = now_micros();
        let event_id = Uuid::now_v7();
        let metadata =
            serde_json::to_string(&EventMetadata::new(context, event_id, recorded_at))
                .map_err(|error| ExecError::Internal(format!("serializing metadata: {error}")))?;
        let sequence = version + 1;
        let hash = ChainedFields {
            aggregate_type: A::TYPE,
            aggregate_id,
            sequence,
            event_type: &event_type,
            event_version: &event_version,
            event_id,
            recorded_at_micros: recorded_at.timestamp_micros(),
            payload: &payload,
            metadata: &metadata,
        }
        .hash(&last_hash);
        rows.push(NewRow {
            aggregate_type: A::TYPE,
            aggregate_id: aggregate_id.to_owned(),
            sequence,
            event_type,
            event_version,
            payload,
            metadata,
            recorded_at,
            event_id,
            prev_hash: last_hash,
            hash,
        });
        version = sequence;
        last_hash = hash;
    }
    for event in events {
        cached.state.apply(event);
    }
    cached.version = version;
    cached.last_hash = last_hash;
    Ok(rows)
}

/// What a committed transaction wrote, per stream: last version and position.
#[derive(Debug, Clone, Default)]
pub struct Committed {
    streams: HashMap<(&'static str, String), (i64, Position)>,
    last: Position,
}

impl Committed {
    /// The version and position of `A`'s stream `id` after the commit, if the
    /// commit wrote to it.
    pub fn stream<A: Decide>(&self, id: &str) -> Option<(i64, Position)> {
        self.streams.get(&(A::TYPE, id.to_owned())).copied()
    }

    /// The position of the last event written.
    pub fn last(&self) -> Position {
        self.last
    }
}

/// The standard body of an accepted single-aggregate command.
pub fn accepted_body(id: &str, version: i64, position: Position) -> Value {
    json!({"id": id, "version": version, "position": position.token()})
}

/// The event store and command executor. Cheap to clone.
#[derive(Clone)]
pub struct EventStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStore")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

struct Inner {
    pool: PgPool,
    config: StoreConfig,
    lanes: Mutex<HashMap<LaneKey, Arc<Lane>>>,
    /// Counts lane lookups: the lanes' `last_used` tells the recently used
    /// from the idle.
    use_clock: AtomicU64,
    /// Wakes the relay after each commit that appended events.
    commits: CommitSignal,
    /// Writes the units of work that need no transaction of their own.
    group: Arc<GroupCommit>,
}

type StoredResponse = ([u8; 32], u16, Value);

impl EventStore {
    pub fn new(pool: PgPool, config: StoreConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                commits: CommitSignal::new(pool.clone(), crate::relay::NOTIFY_CHANNEL),
                group: GroupCommit::new(pool.clone(), config.writers, config.group_rows),
                pool,
                config,
                lanes: Mutex::new(HashMap::new()),
                use_clock: AtomicU64::new(0),
            }),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    /// Signalled after every commit that appended events: a relay in this
    /// process should be woken by it (see [`crate::relay::Relay::woken_by`]).
    pub fn commit_signal(&self) -> &CommitSignal {
        &self.inner.commits
    }

    fn lane(&self, key: &LaneKey) -> Arc<Lane> {
        let now = self.inner.use_clock.fetch_add(1, Ordering::Relaxed);
        let mut lanes = self.inner.lanes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(lane) = lanes.get(key) {
            lane.last_used.store(now, Ordering::Relaxed);
            return lane.clone();
        }
        let cache_max = self.inner.config.cache_max;
        let evicted = if lanes.len() >= cache_max {
            evict_least_recently_used(&mut lanes, cache_max - cache_max / EVICT_SHARE)
        } else {
            Vec::new()
        };
        let lane = Arc::new(Lane {
            last_used: AtomicU64::new(now),
            ..Lane::default()
        });
        lanes.insert(key.clone(), lane.clone());
        drop(lanes);
        // Their states are freed here, not while every lookup waits.
        drop(evicted);
        lane
    }

    /// Loads the current state of aggregate `A` with id `id` from the
    /// database (snapshot plus later events), bypassing the cache.
    pub async fn load<A: Decide>(&self, id: &str) -> Result<(A, i64), ExecError> {
        let cached = crate::load::load::<A>(&self.inner.pool, id).await?;
        Ok((cached.state, cached.version))
    }

    /// The current state of `A` `id`: the cached one when this process has
    /// it, else loaded. For reads that feed a command (a listing's price at
    /// checkout); the command itself is checked against the stored version.
    pub async fn state<A: Decide>(&self, id: &str) -> Result<(A, i64), ExecError> {
        let key = LaneKey {
            aggregate_type: A::TYPE,
            aggregate_id: id.to_owned(),
        };
        let lane = self.lane(&key);
        let mut slot = lane.cache.lock().await;
        let cached = take_cached::<A>(&mut slot, &self.inner.pool, id).await?;
        let result = (cached.state.clone(), cached.version);
        *slot = Some(Box::new(cached));
        Ok(result)
    }

    /// Executes `command` on aggregate `A` `id`, answered as `reply` says.
    pub async fn execute<A: Decide>(
        &self,
        id: &str,
        command: A::Command,
        context: CommandContext,
        idempotency: Option<IdempotencyKey>,
        reply_with: Reply,
    ) -> Result<Accepted, ExecError> {
        let key = LaneKey {
            aggregate_type: A::TYPE,
            aggregate_id: id.to_owned(),
        };
        let lane = self.lane(&key);
        let (reply, receive) = oneshot::channel();
        let pending = Pending::<A> {
            command,
            context,
            idempotency,
            reply_with,
            reply,
        };
        let start_worker = {
            let mut queue = lane.queue.lock().unwrap_or_else(|e| e.into_inner());
            if queue.pending.len() >= self.inner.config.queue_max {
                metrics::counter!("souk_commands_overloaded_total").increment(1);
                return Err(ExecError::Overloaded);
            }
            queue.pending.push_back(Box::new(pending));
            !std::mem::replace(&mut queue.worker_running, true)
        };
        if start_worker {
            let store = self.clone();
            tokio::spawn(async move { store.drain_lane::<A>(key, lane).await });
        }
        receive
            .await
            .unwrap_or_else(|_| Err(ExecError::Internal("command worker stopped".into())))
    }

    async fn drain_lane<A: Decide>(&self, key: LaneKey, lane: Arc<Lane>) {
        loop {
            let mut slot = lane.cache.clone().lock_owned().await;
            let batch: Vec<Pending<A>> = {
                let mut queue = lane.queue.lock().unwrap_or_else(|e| e.into_inner());
                let take = queue.pending.len().min(self.inner.config.batch_max);
                if take == 0 {
                    queue.worker_running = false;
                    return;
                }
                queue
                    .pending
                    .drain(..take)
                    .filter_map(|pending| pending.downcast::<Pending<A>>().ok())
                    .map(|pending| *pending)
                    .collect()
            };
            metrics::histogram!("souk_command_batch_size").record(batch.len() as f64);
            let results = self
                .run_batch::<A>(&key.aggregate_id, &mut slot, &batch)
                .await;
            drop(slot);
            for (pending, result) in batch.into_iter().zip(results) {
                // The caller may have gone away; its command is done anyway.
                let _ = pending.reply.send(result);
            }
        }
    }

    async fn run_batch<A: Decide>(
        &self,
        id: &str,
        slot: &mut ErasedState,
        batch: &[Pending<A>],
    ) -> Vec<Result<Accepted, ExecError>> {
        let max_attempts = self.inner.config.max_attempts;
        let mut backoff = Backoff::conflict();
        for attempt in 1..=max_attempts {
            match self.try_batch::<A>(id, slot, batch).await {
                Ok(results) => return results,
                Err(ExecError::Conflict(_)) => {
                    *slot = None;
                    metrics::counter!("souk_command_conflicts_total", "aggregate" => A::TYPE)
                        .increment(1);
                    tracing::debug!(aggregate = A::TYPE, id, attempt, "concurrency conflict");
                    backoff.wait().await;
                }
                Err(error) => {
                    *slot = None;
                    return batch.iter().map(|_| Err(error.clone())).collect();
                }
            }
        }
        batch
            .iter()
            .map(|_| Err(ExecError::Conflict(max_attempts)))
            .collect()
    }

    /// Decides and commits one batch. `Err` means nothing was committed and
    /// every command of the batch gets the same answer (or a retry).
    async fn try_batch<A: Decide>(
        &self,
        id: &str,
        slot: &mut ErasedState,
        batch: &[Pending<A>],
    ) -> Result<Vec<Result<Accepted, ExecError>>, ExecError> {
        let pool = &self.inner.pool;
        let mut working = take_cached::<A>(slot, pool, id).await?;
        let start_version = working.version;
        let keys: Vec<&IdempotencyKey> = batch
            .iter()
            .filter_map(|p| p.idempotency.as_ref())
            .collect();
        // A transaction only when there is more than the events to write
        // (see below); idempotency keys are read in it.
        let mut tx = None;
        let mut stored = HashMap::new();
        if !keys.is_empty() {
            let tx = tx.insert(pool.begin().await.map_err(db_error)?);
            stored = stored_responses(tx, &keys).await?;
        }

        enum Plan {
            Done(Result<Accepted, ExecError>),
            SameAs(usize),
            Write { last_row: usize },
        }
        // Decided on the cached state itself: a refused command changes
        // nothing, so no copy is needed to fall back on.
        let mut rows: Vec<NewRow> = Vec::new();
        let mut plans = Vec::with_capacity(batch.len());
        let mut first_with_key: HashMap<(&str, &str), usize> = HashMap::new();
        for (index, pending) in batch.iter().enumerate() {
            if let Some(key) = &pending.idempotency {
                if let Some((hash, status, body)) =
                    stored.get(&(key.scope.clone(), key.key.clone()))
                {
                    plans.push(Plan::Done(replay(key, hash, *status, body)));
                    continue;
                }
                match first_with_key.get(&(key.scope.as_str(), key.key.as_str())) {
                    Some(&first) => {
                        let same = batch[first]
                            .idempotency
                            .as_ref()
                            .is_some_and(|k| k.request_hash == key.request_hash);
                        plans.push(if same {
                            Plan::SameAs(first)
                        } else {
                            Plan::Done(Err(ExecError::IdempotencyKeyReused))
                        });
                        continue;
                    }
                    None => {
                        first_with_key.insert((key.scope.as_str(), key.key.as_str()), index);
                    }
                }
            }
            match decide_rows(&mut working, id, pending.command.clone(), &pending.context) {
                Ok(new_rows) if new_rows.is_empty() => plans.push(Plan::Done(Ok(Accepted {
                    status: pending.reply_with.status,
                    body: accepted_body(&pending.reply_with.id, working.version, Position::START),
                    replayed: false,
                }))),
                Ok(new_rows) => {
                    rows.extend(new_rows);
                    plans.push(Plan::Write {
                        last_row: rows.len() - 1,
                    });
                }
                Err(error) => plans.push(Plan::Done(Err(error))),
            }
        }

        if rows.is_empty() {
            // Nothing to write: every command was refused or replayed.
            drop(tx);
            *slot = Some(Box::new(working));
        } else {
            let timers: Vec<Timer> = plans
                .iter()
                .enumerate()
                .filter(|(_, plan)| matches!(plan, Plan::Write { .. }))
                .flat_map(|(index, _)| batch[index].reply_with.timers.iter().cloned())
                .collect();
            let snapshots: Vec<SnapshotRow> = snapshot_row(
                id,
                self.inner.config.snapshot_every,
                start_version,
                &working,
            )?
            .into_iter()
            .collect();
            // One statement appends the events, arms the timers and writes a
            // due snapshot, atomic on its own: no explicit transaction
            // unless idempotency records follow (they hold the positions
            // that statement returns). Without one, other lanes' units may
            // share the statement (group commit).
            let unit = Unit {
                rows,
                timers,
                snapshots,
            };
            let (Unit { rows, .. }, positions) = match tx.as_mut() {
                Some(tx) => write_unit(&mut **tx, unit).await?,
                None => self.inner.group.write(unit).await?,
            };
            let mut records = Vec::new();
            for (index, plan) in plans.iter_mut().enumerate() {
                if let Plan::Write { last_row } = *plan {
                    let row = &rows[last_row];
                    let reply_with = &batch[index].reply_with;
                    let accepted = Accepted {
                        status: reply_with.status,
                        body: accepted_body(&reply_with.id, row.sequence, positions[last_row]),
                        replayed: false,
                    };
                    if let Some(key) = &batch[index].idempotency {
                        records.push((key.clone(), accepted.status, accepted.body.clone()));
                    }
                    *plan = Plan::Done(Ok(accepted));
                }
            }
            if let Some(mut tx) = tx {
                insert_idempotency(&mut *tx, &records).await?;
                tx.commit().await.map_err(db_error)?;
            }
            self.inner.commits.committed();
            metrics::counter!("souk_events_appended_total", "aggregate" => A::TYPE)
                .increment(rows.len() as u64);
            *slot = Some(Box::new(working));
        }

        let mut results: Vec<Result<Accepted, ExecError>> = Vec::with_capacity(plans.len());
        for plan in plans {
            let result = match plan {
                Plan::Done(result) => result,
                Plan::SameAs(first) => match &results[first] {
                    Ok(accepted) => Ok(Accepted {
                        replayed: true,
                        ..accepted.clone()
                    }),
                    Err(error) => Err(error.clone()),
                },
                Plan::Write { .. } => Err(ExecError::Internal("unwritten plan".into())),
            };
            results.push(result);
        }
        Ok(results)
    }

    /// Executes a command that changes several aggregates atomically. The
    /// lanes of `streams` are locked (in a fixed order), `plan` decides over
    /// their states through [`Plan`], and every staged event, the
    /// idempotency record and the response built by `respond` are committed
    /// in one transaction. `plan` may run more than once (after a
    /// concurrency conflict), so it must be a pure function of the states.
    pub async fn execute_multi<R, P, F>(
        &self,
        streams: Vec<StreamRef>,
        context: CommandContext,
        idempotency: Option<IdempotencyKey>,
        plan: P,
        respond: F,
    ) -> Result<Accepted, ExecError>
    where
        R: Send + Sync + 'static,
        P: Fn(&mut Plan) -> Result<R, ExecError> + Send + Sync + 'static,
        F: Fn(&R, &Committed) -> (u16, Value) + Send + Sync + 'static,
    {
        let store = self.clone();
        tokio::spawn(async move {
            store
                .run_multi(streams, context, idempotency, plan, respond)
                .await
        })
        .await
        .unwrap_or_else(|error| Err(ExecError::Internal(format!("unit of work failed: {error}"))))
    }

    async fn run_multi<R, P, F>(
        &self,
        mut streams: Vec<StreamRef>,
        context: CommandContext,
        idempotency: Option<IdempotencyKey>,
        plan: P,
        respond: F,
    ) -> Result<Accepted, ExecError>
    where
        R: Send + Sync,
        P: Fn(&mut Plan) -> Result<R, ExecError> + Send + Sync,
        F: Fn(&R, &Committed) -> (u16, Value) + Send + Sync,
    {
        streams.sort_by(|a, b| a.key.cmp(&b.key));
        // A stream declared twice is new only if declared new both times.
        streams.dedup_by(|later, kept| {
            let same = later.key == kept.key;
            if same {
                kept.new &= later.new;
            }
            same
        });
        let mut guards = Vec::with_capacity(streams.len());
        for stream in &streams {
            let lane = self.lane(&stream.key);
            guards.push(lane.cache.clone().lock_owned().await);
        }
        let pool = &self.inner.pool;
        let max_attempts = self.inner.config.max_attempts;
        let snapshot_every = self.inner.config.snapshot_every;
        let mut backoff = Backoff::conflict();
        for attempt in 1..=max_attempts {
            // Load what the cache does not hold; a stream declared new
            // starts empty, unless a conflict proved it is not. An assumed
            // empty state is cached only once its events are committed
            // (their sequence numbers prove it).
            let mut assumed = vec![false; streams.len()];
            for ((stream, guard), assumed) in streams
                .iter()
                .zip(guards.iter_mut())
                .zip(assumed.iter_mut())
            {
                if guard.is_none() {
                    *assumed = stream.new && attempt == 1;
                    **guard = Some(if *assumed {
                        (stream.fresh)()
                    } else {
                        (stream.loader)(pool.clone(), stream.key.aggregate_id.clone()).await?
                    });
                }
            }
            // Idempotency records carry the positions of the events, so
            // they follow the events' statement in one transaction.
            let mut tx = None;
            if let Some(key) = &idempotency {
                let tx = tx.insert(pool.begin().await.map_err(db_error)?);
                let stored = stored_responses(tx, &[key]).await?;
                if let Some((hash, status, body)) =
                    stored.get(&(key.scope.clone(), key.key.clone()))
                {
                    return replay(key, hash, *status, body);
                }
            }
            // The plan works on the cached states themselves (no copy); they
            // go back to the cache when committed, or when unchanged.
            let mut staged = Plan::new(&context);
            for (stream, guard) in streams.iter().zip(guards.iter_mut()) {
                let state = guard
                    .take()
                    .ok_or_else(|| ExecError::Internal("stream not loaded".into()))?;
                staged.entries.insert(
                    stream.key.clone(),
                    PlanEntry {
                        start_version: (stream.version)(state.as_ref()),
                        working: state,
                        rows: Vec::new(),
                        saved_in: 0,
                    },
                );
            }
            let result = match plan(&mut staged) {
                Ok(result) => result,
                Err(error) => {
                    // A stream that staged nothing is as it was (a refused
                    // decision changes nothing, a rollback restores it);
                    // the others are loaded again when next used.
                    for ((guard, entry), assumed) in guards
                        .iter_mut()
                        .zip(staged.entries.into_values())
                        .zip(&assumed)
                    {
                        if entry.rows.is_empty() && !assumed {
                            **guard = Some(entry.working);
                        }
                    }
                    return Err(error);
                }
            };
            let rows: Vec<NewRow> = staged
                .entries
                .values()
                .flat_map(|entry| entry.rows.iter().cloned())
                .collect();
            let appended = rows.len();
            let outcome = async {
                let mut snapshots = Vec::new();
                for (stream, entry) in streams.iter().zip(staged.entries.values()) {
                    snapshots.extend((stream.snapshot)(
                        &stream.key.aggregate_id,
                        snapshot_every,
                        entry.start_version,
                        entry.working.as_ref(),
                    )?);
                }
                let unit = Unit {
                    rows,
                    timers: staged.timers.clone(),
                    snapshots,
                };
                let (Unit { rows, .. }, positions) = match tx.as_mut() {
                    Some(tx) => write_unit(&mut **tx, unit).await?,
                    None => self.inner.group.write(unit).await?,
                };
                let mut committed = Committed::default();
                for (row, position) in rows.iter().zip(&positions) {
                    committed.streams.insert(
                        (row.aggregate_type, row.aggregate_id.clone()),
                        (row.sequence, *position),
                    );
                    committed.last = committed.last.max(*position);
                }
                let (status, body) = respond(&result, &committed);
                if let (Some(key), Some(mut tx)) = (&idempotency, tx) {
                    insert_idempotency(&mut *tx, &[(key.clone(), status, body.clone())]).await?;
                    tx.commit().await.map_err(db_error)?;
                }
                Ok::<_, ExecError>(Accepted {
                    status,
                    body,
                    replayed: false,
                })
            }
            .await;
            match outcome {
                Ok(accepted) => {
                    for ((guard, entry), assumed) in guards
                        .iter_mut()
                        .zip(staged.entries.into_values())
                        .zip(&assumed)
                    {
                        if entry.rows.is_empty() && *assumed {
                            continue;
                        }
                        **guard = Some(entry.working);
                    }
                    if appended > 0 {
                        self.inner.commits.committed();
                        metrics::counter!("souk_events_appended_total", "aggregate" => "multi")
                            .increment(appended as u64);
                    }
                    return Ok(accepted);
                }
                Err(ExecError::Conflict(_)) => {
                    // The guards were emptied above: everything is reloaded.
                    metrics::counter!("souk_command_conflicts_total", "aggregate" => "multi")
                        .increment(1);
                    backoff.wait().await;
                }
                Err(error) => return Err(error),
            }
        }
        Err(ExecError::Conflict(max_attempts))
    }
}

/// The share of `StoreConfig::cache_max` that one eviction frees (a
/// quarter), so that evictions are rare and each costs one pass.
const EVICT_SHARE: usize = 4;

/// Forgets the idle lanes (and their cached states) that were used least
/// recently, until at most `keep` lanes remain or only lanes in use do, and
/// returns them. A lane in use is also held by its worker or by a unit of
/// work. Forgetting every idle lane at once, as this store first did, threw
/// the hot aggregates' states away with the cold ones (a checkout leaves a
/// new order's lane behind, so a busy process reached the bound every
/// `cache_max` checkouts): every hot listing, stock pool and wallet was
/// then loaded again at once, each command waiting for its own.
fn evict_least_recently_used(
    lanes: &mut HashMap<LaneKey, Arc<Lane>>,
    keep: usize,
) -> Vec<Arc<Lane>> {
    let mut idle: Vec<u64> = lanes
        .values()
        .filter(|lane| Arc::strong_count(lane) == 1)
        .map(|lane| lane.last_used.load(Ordering::Relaxed))
        .collect();
    let excess = lanes.len().saturating_sub(keep).min(idle.len());
    if excess == 0 {
        return Vec::new();
    }
    // The last use of the `excess`-th least recently used idle lane: that
    // lane and every idle one used before it go.
    let (_, &mut threshold, _) = idle.select_nth_unstable(excess - 1);
    let mut evicted = Vec::with_capacity(excess);
    lanes.retain(|_, lane| {
        let evict =
            Arc::strong_count(lane) == 1 && lane.last_used.load(Ordering::Relaxed) <= threshold;
        if evict {
            evicted.push(lane.clone());
        }
        !evict
    });
    metrics::counter!("souk_store_cache_evictions_total").increment(1);
    metrics::counter!("souk_store_cache_evicted_total").increment(evicted.len() as u64);
    evicted
}

fn replay(
    key: &IdempotencyKey,
    hash: &[u8; 32],
    status: u16,
    body: &Value,
) -> Result<Accepted, ExecError> {
    if *hash == key.request_hash {
        metrics::counter!("souk_idempotent_replays_total").increment(1);
        Ok(Accepted {
            status,
            body: body.clone(),
            replayed: true,
        })
    } else {
        Err(ExecError::IdempotencyKeyReused)
    }
}

/// Takes the cached state out of `slot`, or loads it.
async fn take_cached<A: Decide>(
    slot: &mut ErasedState,
    pool: &PgPool,
    id: &str,
) -> Result<Cached<A>, ExecError> {
    if let Some(state) = slot.take()
        && let Ok(cached) = state.downcast::<Cached<A>>()
    {
        return Ok(*cached);
    }
    crate::load::load::<A>(pool, id).await
}

async fn stored_responses(
    tx: &mut Transaction<'static, Postgres>,
    keys: &[&IdempotencyKey],
) -> Result<HashMap<(String, String), StoredResponse>, ExecError> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let scopes: Vec<&str> = keys.iter().map(|k| k.scope.as_str()).collect();
    let names: Vec<&str> = keys.iter().map(|k| k.key.as_str()).collect();
    let rows: Vec<(String, String, Vec<u8>, i16, Value)> = sqlx::query_as(
        "SELECT i.scope, i.key, i.request_hash, i.status, i.response
           FROM idempotency i
           JOIN UNNEST($1::text[], $2::text[]) AS k(scope, key)
             ON i.scope = k.scope AND i.key = k.key",
    )
    .bind(&scopes)
    .bind(&names)
    .fetch_all(&mut **tx)
    .await
    .map_err(db_error)?;
    Ok(rows
        .into_iter()
        .map(|(scope, key, hash, status, body)| {
            let mut request_hash = [0u8; 32];
            if hash.len() == 32 {
                request_hash.copy_from_slice(&hash);
            }
            ((scope, key), (request_hash, status as u16, body))
        })
        .collect())
}

async fn insert_timers(
    executor: impl sqlx::PgExecutor<'_>,
    timers: &[&Timer],
) -> Result<(), ExecError> {
    if timers.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = timers.iter().map(|t| t.timer_id).collect();
    let kinds: Vec<&str> = timers.iter().map(|t| t.kind.as_str()).collect();
    let due: Vec<chrono::DateTime<chrono::Utc>> = timers.iter().map(|t| t.due_at).collect();
    let payloads: Vec<String> = timers.iter().map(|t| t.payload.to_string()).collect();
    sqlx::query(
        "INSERT INTO timers (timer_id, kind, due_at, payload)
         SELECT timer_id, kind, due_at, payload::jsonb
           FROM UNNEST($1::uuid[], $2::text[], $3::timestamptz[], $4::text[])
             AS t(timer_id, kind, due_at, payload)
         ON CONFLICT (timer_id) DO NOTHING",
    )
    .bind(&ids)
    .bind(&kinds)
    .bind(&due)
    .bind(&payloads)
    .execute(executor)
    .await
    .map_err(db_error)?;
    Ok(())
}

async fn insert_idempotency(
    executor: impl sqlx::PgExecutor<'_>,
    records: &[(IdempotencyKey, u16, Value)],
) -> Result<(), ExecError> {
    if records.is_empty() {
        return Ok(());
    }
    let scopes: Vec<&str> = records.iter().map(|(k, _, _)| k.scope.as_str()).collect();
    let keys: Vec<&str> = records.iter().map(|(k, _, _)| k.key.as_str()).collect();
    let hashes: Vec<Vec<u8>> = records
        .iter()
        .map(|(k, _, _)| k.request_hash.to_vec())
        .collect();
    let statuses: Vec<i16> = records.iter().map(|(_, s, _)| *s as i16).collect();
    let bodies: Vec<String> = records.iter().map(|(_, _, b)| b.to_string()).collect();
    // A concurrent request with the same key (in another process) makes this
    // a unique violation: the batch is retried and then finds the record.
    sqlx::query(
        "INSERT INTO idempotency (scope, key, request_hash, status, response)
         SELECT scope, key, request_hash, status, response::jsonb
           FROM UNNEST($1::text[], $2::text[], $3::bytea[], $4::int2[], $5::text[])
             AS t(scope, key, request_hash, status, response)",
    )
    .bind(&scopes)
    .bind(&keys)
    .bind(&hashes)
    .bind(&statuses)
    .bind(&bodies)
    .execute(executor)
    .await
    .map_err(db_error)?;
    Ok(())
}

/// What one unit of work writes in one statement: its events, the timers
/// it arms and the snapshots that fell due.
#[derive(Debug, Default)]
pub(crate) struct Unit {
    pub rows: Vec<NewRow>,
    pub timers: Vec<Timer>,
    pub snapshots: Vec<SnapshotRow>,
}

/// Appends the rows, arms the timers and writes the snapshots of all
/// `units` in ONE statement (data-modifying CTEs), atomic on its own, and
/// returns the position of each unit's rows, in order. The events'
/// statement triggers (writers' lock, stream heads) fire as for a plain
/// INSERT, once. With nothing but events it is the plain INSERT of
/// [`insert_events_sql`]. The rows are inserted in key order, whatever the
/// units' order (see `group_commit`). No two units may write one stream.
pub(crate) async fn write_units(
    executor: impl sqlx::PgExecutor<'_>,
    units: &[Unit],
) -> Result<Vec<Vec<Position>>, ExecError> {
    let mut rows: Vec<&NewRow> = units.iter().flat_map(|unit| &unit.rows).collect();
    let timers: Vec<&Timer> = units.iter().flat_map(|unit| &unit.timers).collect();
    let snapshots: Vec<&SnapshotRow> = units.iter().flat_map(|unit| &unit.snapshots).collect();
    if rows.is_empty() {
        // Nothing appended, so no snapshot is due either.
        insert_timers(executor, &timers).await?;
        return Ok(units.iter().map(|_| Vec::new()).collect());
    }
    if units.len() > 1 {
        rows.sort_unstable_by(|a, b| {
            (a.aggregate_type, &a.aggregate_id, a.sequence).cmp(&(
                b.aggregate_type,
                &b.aggregate_id,
                b.sequence,
            ))
        });
    }
    let events = EventColumns::of(&rows);
    let inserted: Vec<Inserted> = if timers.is_empty() && snapshots.is_empty() {
        events
            .bind(sqlx::query_as(insert_events_sql!()))
            .fetch_all(executor)
            .await
            .map_err(db_error)?
    } else {
        let timer_ids: Vec<Uuid> = timers.iter().map(|t| t.timer_id).collect();
        let timer_kinds: Vec<&str> = timers.iter().map(|t| t.kind.as_str()).collect();
        let timer_due: Vec<chrono::DateTime<chrono::Utc>> =
            timers.iter().map(|t| t.due_at).collect();
        let timer_payloads: Vec<String> = timers.iter().map(|t| t.payload.to_string()).collect();
        let snap_types: Vec<&str> = snapshots.iter().map(|s| s.aggregate_type).collect();
        let snap_ids: Vec<&str> = snapshots.iter().map(|s| s.aggregate_id.as_str()).collect();
        let snap_versions: Vec<i64> = snapshots.iter().map(|s| s.version).collect();
        let snap_hashes: Vec<Vec<u8>> = snapshots.iter().map(|s| s.last_hash.to_vec()).collect();
        let snap_payloads: Vec<&str> = snapshots.iter().map(|s| s.payload.as_str()).collect();
        let snap_state_versions: Vec<i32> = snapshots.iter().map(|s| s.state_version).collect();
        let query = sqlx::query_as(concat!(
            "WITH appended AS (",
            insert_events_sql!(),
            "), armed AS (
                INSERT INTO timers (timer_id, kind, due_at, payload)
                SELECT timer_id, kind, due_at, payload::jsonb
                  FROM UNNEST($12::uuid[], $13::text[], $14::timestamptz[], $15::text[])
                    AS t(timer_id, kind, due_at, payload)
                ON CONFLICT (timer_id) DO NOTHING
             ), snapped AS (
                INSERT INTO snapshots AS s (aggregate_type, aggregate_id, last_sequence, last_hash,
                                            payload, state_version)
                SELECT aggregate_type, aggregate_id, last_sequence, last_hash, payload::jsonb,
                       state_version
                  FROM UNNEST($16::text[], $17::text[], $18::int8[], $19::bytea[], $20::text[],
                              $21::int4[])
                    AS t(aggregate_type, aggregate_id, last_sequence, last_hash, payload,
                         state_version)
                ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE
                   SET last_sequence = excluded.last_sequence, last_hash = excluded.last_hash,
                       payload = excluded.payload, state_version = excluded.state_version,
                       taken_at = now()
                 WHERE s.last_sequence < excluded.last_sequence
             )
             SELECT * FROM appended"
        ));
        events
            .bind(query)
            .bind(&timer_ids)
            .bind(&timer_kinds)
            .bind(&timer_due)
            .bind(&timer_payloads)
            .bind(&snap_types)
            .bind(&snap_ids)
            .bind(&snap_versions)
            .bind(&snap_hashes)
            .bind(&snap_payloads)
            .bind(&snap_state_versions)
            .fetch_all(executor)
            .await
            .map_err(db_error)?
    };
    positions_of(units, inserted)
}

/// [`write_units`] of one unit, given back with its rows' positions.
async fn write_unit(
    executor: impl sqlx::PgExecutor<'_>,
    unit: Unit,
) -> Result<(Unit, Vec<Position>), ExecError> {
    let mut positions = write_units(executor, std::slice::from_ref(&unit)).await?;
    Ok((unit, positions.pop().unwrap_or_default()))
}

/// The columns of rows to insert, as the arrays bound to `$1`..`$11`.
struct EventColumns<'r> {
    types: Vec<&'r str>,
    ids: Vec<&'r str>,
    sequences: Vec<i64>,
    event_types: Vec<&'r str>,
    versions: Vec<&'r str>,
    payloads: Vec<&'r str>,
    metadata: Vec<&'r str>,
    recorded: Vec<chrono::DateTime<chrono::Utc>>,
    event_ids: Vec<Uuid>,
    prev_hashes: Vec<Vec<u8>>,
    hashes: Vec<Vec<u8>>,
}

type Inserted = (String, String, i64, i64, i64);

impl<'r> EventColumns<'r> {
    fn of(rows: &[&'r NewRow]) -> Self {
        Self {
            types: rows.iter().map(|r| r.aggregate_type).collect(),
            ids: rows.iter().map(|r| r.aggregate_id.as_str()).collect(),
            sequences: rows.iter().map(|r| r.sequence).collect(),
            event_types: rows.iter().map(|r| r.event_type.as_str()).collect(),
            versions: rows.iter().map(|r| r.event_version.as_str()).collect(),
            payloads: rows.iter().map(|r| r.payload.as_str()).collect(),
            metadata: rows.iter().map(|r| r.metadata.as_str()).collect(),
            recorded: rows.iter().map(|r| r.recorded_at).collect(),
            event_ids: rows.iter().map(|r| r.event_id).collect(),
            prev_hashes: rows.iter().map(|r| r.prev_hash.to_vec()).collect(),
            hashes: rows.iter().map(|r| r.hash.to_vec()).collect(),
        }
    }

    fn bind<'q>(
        &'q self,
        query: sqlx::query::QueryAs<'q, Postgres, Inserted, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::QueryAs<'q, Postgres, Inserted, sqlx::postgres::PgArguments> {
        query
            .bind(&self.types)
            .bind(&self.ids)
            .bind(&self.sequences)
            .bind(&self.event_types)
            .bind(&self.versions)
            .bind(&self.payloads)
            .bind(&self.metadata)
            .bind(&self.recorded)
            .bind(&self.event_ids)
            .bind(&self.prev_hashes)
            .bind(&self.hashes)
    }
}

/// The position of each unit's rows, in order, from what the INSERT
/// returned.
fn positions_of(units: &[Unit], inserted: Vec<Inserted>) -> Result<Vec<Vec<Position>>, ExecError> {
    let by_row: HashMap<(String, String, i64), Position> = inserted
        .into_iter()
        .map(|(aggregate_type, aggregate_id, sequence, position, xid)| {
            (
                (aggregate_type, aggregate_id, sequence),
                Position {
                    transaction_id: xid as u64,
                    position,
                },
            )
        })
        .collect();
    units
        .iter()
        .map(|unit| {
            unit.rows
                .iter()
                .map(|r| {
                    by_row
                        .get(&(
                            r.aggregate_type.to_owned(),
                            r.aggregate_id.clone(),
                            r.sequence,
                        ))
                        .copied()
                        .ok_or_else(|| ExecError::Internal("inserted event not returned".into()))
                })
                .collect()
        })
        .collect()
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type Loader = fn(PgPool, String) -> BoxFuture<Result<Box<dyn Any + Send + Sync>, ExecError>>;
type Fresh = fn() -> Box<dyn Any + Send + Sync>;
type VersionOf = fn(&(dyn Any + Send + Sync)) -> i64;
type Snapshotter =
    fn(&str, i64, i64, &(dyn Any + Send + Sync)) -> Result<Option<SnapshotRow>, ExecError>;

/// A stream (one aggregate instance) that a unit of work reads or writes.
pub struct StreamRef {
    key: LaneKey,
    /// Declared new: no load query, the unit of work starts from the empty
    /// state (a stream that exists after all is a conflict, then loaded).
    new: bool,
    loader: Loader,
    fresh: Fresh,
    version: VersionOf,
    snapshot: Snapshotter,
}

impl std::fmt::Debug for StreamRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("StreamRef")
            .field(&self.key)
            .field(&self.new)
            .finish()
    }
}

impl StreamRef {
    pub fn of<A: Decide>(id: impl Into<String>) -> Self {
        fn load<A: Decide>(
            pool: PgPool,
            id: String,
        ) -> BoxFuture<Result<Box<dyn Any + Send + Sync>, ExecError>> {
            Box::pin(async move {
                let cached = crate::load::load::<A>(&pool, &id).await?;
                Ok(Box::new(cached) as Box<dyn Any + Send + Sync>)
            })
        }
        fn fresh<A: Decide>() -> Box<dyn Any + Send + Sync> {
            Box::new(Cached::<A>::default())
        }
        fn version<A: Decide>(state: &(dyn Any + Send + Sync)) -> i64 {
            state
                .downcast_ref::<Cached<A>>()
                .map_or(0, |cached| cached.version)
        }
        fn snapshot<A: Decide>(
            id: &str,
            every: i64,
            from_version: i64,
            state: &(dyn Any + Send + Sync),
        ) -> Result<Option<SnapshotRow>, ExecError> {
            match state.downcast_ref::<Cached<A>>() {
                Some(cached) => snapshot_row(id, every, from_version, cached),
                None => Ok(None),
            }
        }
        Self {
            key: LaneKey {
                aggregate_type: A::TYPE,
                aggregate_id: id.into(),
            },
            new: false,
            loader: load::<A>,
            fresh: fresh::<A>,
            version: version::<A>,
            snapshot: snapshot::<A>,
        }
    }

    /// Declares the stream new (an id the caller has just generated, such
    /// as a checkout's order): the unit of work skips loading it and starts
    /// from the empty state. Safe if wrong: its first event then collides
    /// with the stored one (a concurrency conflict), and the retry loads it.
    pub fn new_stream(mut self) -> Self {
        self.new = true;
        self
    }

    /// Whether the stream was declared new.
    pub fn is_new(&self) -> bool {
        self.new
    }
}

/// A snapshot to write with a unit of work's events.
#[derive(Debug, Clone)]
pub(crate) struct SnapshotRow {
    aggregate_type: &'static str,
    aggregate_id: String,
    version: i64,
    last_hash: [u8; 32],
    payload: String,
    state_version: i32,
}

/// Whether going from `from_version` to `to_version` passes a multiple of
/// `every`, so a snapshot is written.
fn snapshot_due(every: i64, from_version: i64, to_version: i64) -> bool {
    let every = every.max(1);
    to_version / every != from_version / every
}

/// The snapshot of `cached` when one is due since `from_version`.
fn snapshot_row<A: Decide>(
    id: &str,
    every: i64,
    from_version: i64,
    cached: &Cached<A>,
) -> Result<Option<SnapshotRow>, ExecError> {
    if !snapshot_due(every, from_version, cached.version) {
        return Ok(None);
    }
    let payload = serde_json::to_string(&cached.state)
        .map_err(|error| ExecError::Internal(format!("serializing a snapshot: {error}")))?;
    Ok(Some(SnapshotRow {
        aggregate_type: A::TYPE,
        aggregate_id: id.to_owned(),
        version: cached.version,
        last_hash: cached.last_hash,
        payload,
        state_version: A::STATE_VERSION,
    }))
}

struct PlanEntry {
    working: Box<dyn Any + Send + Sync>,
    start_version: i64,
    rows: Vec<NewRow>,
    /// The savepoint epoch in which this entry's state was last saved to the
    /// undo log (see [`Plan::savepoint`]).
    saved_in: u64,
}

/// The states of a unit of work's streams, and the events staged so far.
pub struct Plan<'c> {
    entries: BTreeMap<LaneKey, PlanEntry>,
    context: &'c CommandContext,
    timers: Vec<Timer>,
    /// Incremented by every savepoint and rollback; 0 before the first
    /// savepoint (nothing to undo, nothing saved).
    epoch: u64,
    /// States as they were before their first change in an epoch: what a
    /// rollback puts back. An entry is copied only when it changes, at most
    /// once per epoch, so a savepoint costs nothing for the streams that
    /// do not change after it (a listing read at checkout).
    undo: Vec<Undo>,
}

struct Undo {
    epoch: u64,
    key: LaneKey,
    working: Box<dyn Any + Send + Sync>,
    rows: usize,
}

impl std::fmt::Debug for Plan<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("streams", &self.entries.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A point a [`Plan`] can go back to, undoing what was staged after it.
pub struct Savepoint {
    epoch: u64,
    timers: usize,
}

impl std::fmt::Debug for Savepoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Savepoint").finish_non_exhaustive()
    }
}

impl<'c> Plan<'c> {
    fn new(context: &'c CommandContext) -> Self {
        Self {
            entries: BTreeMap::new(),
            context,
            timers: Vec::new(),
            epoch: 0,
            undo: Vec::new(),
        }
    }

    fn entry<A: Decide>(&self, id: &str) -> Result<&Cached<A>, ExecError> {
        let key = LaneKey {
            aggregate_type: A::TYPE,
            aggregate_id: id.to_owned(),
        };
        self.entries
            .get(&key)
            .and_then(|entry| entry.working.downcast_ref::<Cached<A>>())
            .ok_or_else(|| ExecError::Internal(format!("{} {id} was not declared", A::TYPE)))
    }

    /// The current (staged) state of `A` `id`, which must have been declared.
    pub fn state<A: Decide>(&self, id: &str) -> Result<&A, ExecError> {
        self.entry::<A>(id).map(|cached| &cached.state)
    }

    /// The version `A` `id` will have once what is staged is committed.
    pub fn version<A: Decide>(&self, id: &str) -> Result<i64, ExecError> {
        self.entry::<A>(id).map(|cached| cached.version)
    }

    /// Decides `command` on `A` `id` and stages its events; a refusal stages
    /// nothing and is returned as [`ExecError::Rejected`].
    pub fn decide<A: Decide>(&mut self, id: &str, command: A::Command) -> Result<usize, ExecError> {
        let key = LaneKey {
            aggregate_type: A::TYPE,
            aggregate_id: id.to_owned(),
        };
        let context = self.context;
        let entry = self
            .entries
            .get_mut(&key)
            .ok_or_else(|| ExecError::Internal(format!("{} {id} was not declared", A::TYPE)))?;
        let cached = entry
            .working
            .downcast_mut::<Cached<A>>()
            .ok_or_else(|| ExecError::Internal("stream type mismatch".into()))?;
        // Refused: nothing changed, nothing to save.
        let events = cached
            .state
            .decide(command)
            .map_err(|error| ExecError::rejected(&error))?;
        if events.is_empty() {
            return Ok(0);
        }
        if self.epoch > 0 && entry.saved_in != self.epoch {
            self.undo.push(Undo {
                epoch: self.epoch,
                key,
                working: Box::new(cached.clone()),
                rows: entry.rows.len(),
            });
            entry.saved_in = self.epoch;
        }
        // `chain_rows` changes nothing when it fails.
        let rows = chain_rows(cached, id, events, context)?;
        let count = rows.len();
        entry.rows.extend(rows);
        Ok(count)
    }

    /// Remembers the current states, to undo later steps with
    /// [`Plan::rollback_to`] (a compensation that never reaches the log).
    /// Copies nothing now: a stream's state is copied when it first changes
    /// after the savepoint.
    pub fn savepoint(&mut self) -> Savepoint {
        self.epoch += 1;
        Savepoint {
            epoch: self.epoch,
            timers: self.timers.len(),
        }
    }

    pub fn rollback_to(&mut self, savepoint: Savepoint) {
        self.timers.truncate(savepoint.timers);
        // Newest first, so each stream ends as it was at its oldest copy
        // since the savepoint: as it was at the savepoint.
        while self
            .undo
            .last()
            .is_some_and(|undo| undo.epoch >= savepoint.epoch)
        {
            let Some(undo) = self.undo.pop() else { break };
            if let Some(entry) = self.entries.get_mut(&undo.key) {
                entry.working = undo.working;
                entry.rows.truncate(undo.rows);
            }
        }
        // A new epoch: the next change of any stream is saved again, for
        // the savepoints still open before this one.
        self.epoch += 1;
    }

    /// Arms `timer` in the transaction of the staged events.
    pub fn schedule(&mut self, timer: Timer) {
        self.timers.push(timer);
    }

    /// Whether anything is staged.
    pub fn is_empty(&self) -> bool {
        self.entries.values().all(|entry| entry.rows.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use domain::Aggregate;
    use domain::values::{Actor, Currency, Money, Reference, Role, UserId, WalletId};
    use domain::wallet::{Wallet, WalletCommand};

    use super::*;

    fn admin() -> Actor {
        Actor::new(UserId::new(), Role::Admin)
    }

    fn deposit(amount: i64) -> WalletCommand {
        WalletCommand::Deposit {
            actor: admin(),
            amount: Money::parse_positive(amount, "EUR").unwrap(),
            reference: Reference::parse("reference", "test").unwrap(),
        }
    }

    fn key(id: usize) -> LaneKey {
        LaneKey {
            aggregate_type: "Wallet",
            aggregate_id: id.to_string(),
        }
    }

    fn lanes_used_in_order(count: usize) -> HashMap<LaneKey, Arc<Lane>> {
        (0..count)
            .map(|id| {
                let lane = Lane {
                    last_used: AtomicU64::new(id as u64),
                    ..Lane::default()
                };
                (key(id), Arc::new(lane))
            })
            .collect()
    }

    #[test]
    fn an_eviction_forgets_the_least_recently_used_idle_lanes_only() {
        let mut lanes = lanes_used_in_order(10);
        // Lane 1 is in use (a worker holds it) and lane 2 was used again last.
        let in_use = lanes[&key(1)].clone();
        lanes[&key(2)].last_used.store(100, Ordering::Relaxed);

        let evicted = evict_least_recently_used(&mut lanes, 6);

        assert_eq!(evicted.len(), 4);
        let mut kept: Vec<usize> = lanes
            .keys()
            .map(|key| key.aggregate_id.parse().unwrap())
            .collect();
        kept.sort_unstable();
        // 0, 3, 4 and 5 were the idle lanes used least recently.
        assert_eq!(kept, [1, 2, 6, 7, 8, 9]);
        drop(in_use);
    }

    #[test]
    fn an_eviction_keeps_every_lane_in_use_even_past_the_bound() {
        let mut lanes = lanes_used_in_order(4);
        let held: Vec<Arc<Lane>> = lanes.values().cloned().collect();

        assert!(evict_least_recently_used(&mut lanes, 1).is_empty());
        assert_eq!(lanes.len(), 4);
        drop(held);
        assert_eq!(evict_least_recently_used(&mut lanes, 1).len(), 3);
        assert!(lanes.contains_key(&key(3)));
    }

    /// A plan over two new wallets, the first one opened.
    fn plan(context: &CommandContext) -> (Plan<'_>, String, String) {
        let mut plan = Plan::new(context);
        let ids = [WalletId::new(), WalletId::new()];
        for id in ids {
            plan.entries.insert(
                LaneKey {
                    aggregate_type: Wallet::TYPE,
                    aggregate_id: id.to_string(),
                },
                PlanEntry {
                    working: Box::new(Cached::<Wallet>::default()),
                    start_version: 0,
                    rows: Vec::new(),
                    saved_in: 0,
                },
            );
        }
        let owner = Actor::new(UserId::new(), Role::Buyer);
        plan.decide::<Wallet>(
            &ids[0].to_string(),
            WalletCommand::Open {
                actor: owner,
                wallet_id: ids[0],
                currency: Currency::parse("EUR").unwrap(),
            },
        )
        .unwrap();
        (plan, ids[0].to_string(), ids[1].to_string())
    }

    fn rows_of(plan: &Plan, id: &str) -> usize {
        plan.entries
            .iter()
            .find(|(key, _)| key.aggregate_id == id)
            .map_or(0, |(_, entry)| entry.rows.len())
    }

    #[test]
    fn a_rollback_restores_the_states_and_rows_of_its_savepoint_only() {
        let context = CommandContext::new(Uuid::now_v7(), "admin", Uuid::now_v7());
        let (mut plan, wallet, untouched) = plan(&context);
        let outer = plan.savepoint();
        plan.decide::<Wallet>(&wallet, deposit(10)).unwrap();
        let inner = plan.savepoint();
        plan.decide::<Wallet>(&wallet, deposit(20)).unwrap();
        plan.decide::<Wallet>(&wallet, deposit(40)).unwrap();
        assert_eq!(plan.state::<Wallet>(&wallet).unwrap().available(), 70);
        // Copied once per savepoint, and only the stream that changed.
        assert_eq!(plan.undo.len(), 2);

        plan.rollback_to(inner);
        assert_eq!(plan.state::<Wallet>(&wallet).unwrap().available(), 10);
        assert_eq!(plan.version::<Wallet>(&wallet).unwrap(), 2);
        assert_eq!(rows_of(&plan, &wallet), 2);

        // Changes after the rollback are undone by the outer savepoint too.
        plan.decide::<Wallet>(&wallet, deposit(5)).unwrap();
        assert_eq!(plan.state::<Wallet>(&wallet).unwrap().available(), 15);
        plan.rollback_to(outer);
        assert_eq!(plan.state::<Wallet>(&wallet).unwrap().available(), 0);
        assert_eq!(plan.version::<Wallet>(&wallet).unwrap(), 1);
        assert_eq!(rows_of(&plan, &wallet), 1);
        assert!(plan.undo.is_empty());
        assert!(!plan.state::<Wallet>(&untouched).unwrap().exists());

        // The chain goes on from the restored head: sequence 2 follows 1.
        plan.decide::<Wallet>(&wallet, deposit(1)).unwrap();
        let entry = plan
            .entries
            .values()
            .find(|entry| !entry.rows.is_empty())
            .unwrap();
        assert_eq!(entry.rows[1].sequence, 2);
        assert_eq!(entry.rows[1].prev_hash, entry.rows[0].hash);
    }

    #[test]
    fn a_refused_decision_changes_and_copies_nothing() {
        let context = CommandContext::new(Uuid::now_v7(), "admin", Uuid::now_v7());
        let (mut plan, wallet, untouched) = plan(&context);
        let _savepoint = plan.savepoint();
        // Depositing into a wallet that was never opened is refused.
        assert!(matches!(
            plan.decide::<Wallet>(&untouched, deposit(10)),
            Err(ExecError::Rejected { .. })
        ));
        assert!(plan.undo.is_empty());
        assert_eq!(rows_of(&plan, &untouched), 0);
        assert_eq!(rows_of(&plan, &wallet), 1);
        assert!(!plan.is_empty());
    }
}
