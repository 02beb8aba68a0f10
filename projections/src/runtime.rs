//! The live projector: one task per projection and partition, each consuming
//! its partition's subjects from JetStream and applying them in order.
//!
//! # A partition's session
//!
//! 1. It opens a Postgres connection of its own and takes the partition's
//!    advisory lock on it (`pg_try_advisory_lock`). One process at a time
//!    consumes a partition; other projector processes stand by and take over
//!    when the holder's session ends. Processes running a projection share
//!    its partitions: each holds at most `ceil(partitions / processes)` of
//!    them and gives back any above that (see `balance`). Every batch is
//!    written through that connection, so a session that lost its lock (its
//!    connection died) cannot commit anything.
//! 2. It points the durable consumer `<projection>_p<partition>` (filter
//!    `<stream>.events.<Type>.<partition>` for a projection of one aggregate
//!    type, `<stream>.events.*.<partition>` for listings; "ack all", so one
//!    ack per batch) at its checkpoint: the
//!    consumer is deleted and created again to start after the stream
//!    sequence of the last message the partition committed. Postgres holds
//!    the truth about what was applied; the consumer only says where to
//!    resume, so a consumer left with unacknowledged messages by a killed
//!    process can never deliver newer messages before older ones.
//! 3. It fetches up to `batch_max` messages and applies them in one
//!    transaction (when more messages wait, it fetches the next batch
//!    meanwhile; the consumer allows two batches unacknowledged): the
//!    projection's shared advisory lock (see `rebuild`) and the checkpoint
//!    row `FOR UPDATE` (one statement), every message after the checkpoint's
//!    position applied in order (those at or before it are redeliveries and
//!    are skipped; events of aggregate types the projection does not read
//!    only move the checkpoint), refused events parked in `dead_letters`,
//!    the checkpoint moved, COMMIT, and only then the ack of the last
//!    message. The events are written without a savepoint; a batch Postgres
//!    refuses rolls back and is applied again with each event under its own
//!    savepoint, so the poison is parked and the rest applied. A crash before
//!    the commit loses nothing (the messages are delivered again); a crash
//!    after it only redelivers messages that are then skipped.
//! 4. Every message carries its consumer sequence. A gap (a message the
//!    server delivered but this session never saw, e.g. lost with a
//!    connection) would let a later message be applied before it, so the
//!    session ends and a new one resumes from the checkpoint.
//!
//! # The idle watermark
//!
//! A partition that receives no events still has to say how far it has
//! caught up, or read-your-writes would wait on it forever.
//! `caught_up_transaction/position` is the position up to which the
//! partition has applied every event of its own. After a batch it is the
//! batch's last position. When a fetch finds nothing, the partition raises
//! it to the relay's checkpoint read before the fetch, provided the
//! consumer, asked after that, reports nothing pending and nothing
//! unacknowledged; and when the server says it had nothing more pending as
//! it delivered a batch's last message, the batch's commit raises it to
//! that checkpoint too. That is correct because the relay stores its
//! checkpoint only after JetStream acknowledged every publish up to it:
//! every event up to that checkpoint was in the stream before the fetch,
//! the consumer has delivered all of this partition's, and each delivered
//! message was committed before it was acknowledged.
//!
//! On a replicated stream (`SOUK_STREAM_REPLICAS` > 1) one more proof is
//! needed. JetStream acknowledges a publish once a quorum of replicas holds
//! it, while the consumer delivers (and counts "pending") from the replica
//! on its own node, which may still lack it: "nothing pending" there does
//! not cover the relay's checkpoint. So the partition also asks the stream's
//! leader, after reading the checkpoint, for the sequence of the last
//! message on its subjects (`event_store::nats::last_sequence_on`), and
//! raises only when that message was delivered already. A read-bench run on
//! a 3-node cluster without this check answered 43 of 60,000 `?after=`
//! reads with the row as it was before the write.
//!
//! One task per projector process ([`watch_relay`]) reads the relay's
//! checkpoint every [`RELAY_MARK_POLL`] for all partitions. A partition
//! never leaves a pull request waiting on the server (nats-server 2.9 can
//! answer an expired one seconds late, and a request given up by the client
//! could still be served, into a gap): it fetches only what already waits,
//! and when nothing does it sleeps until that checkpoint moves, or
//! `fetch_wait` at the latest.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::{self, Message};
use chrono::{DateTime, Utc};
use event_store::Position;
use event_store::backoff::{self, Backoff};
use event_store::global::RecordedEvent;
use event_store::leader;
use event_store::signal::CommitSignal;
use futures::StreamExt;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection, PgConnection};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::balance::Balance;
use crate::config::ProjectorConfig;
use crate::engine::{Kind, apply_isolated, apply_unguarded, is_data_error};
use crate::park::{DeadLetter, park};
use crate::search::SearchBackend;

/// Bound on connecting to Postgres or NATS.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on one fetch of messages that are already waiting. Such a fetch
/// answers in milliseconds, but nats-server 2.9 now and then never ends one
/// (read-bench saw two partitions hang at once at the end of a burst); the
/// partition then starts a new session from its checkpoint. Kept well under
/// the query API's read-your-writes timeout, so a hung fetch costs a delay,
/// not a 503.
const FETCH_TIMEOUT: Duration = Duration::from_secs(2);
/// How long JetStream waits for an ack before delivering a message again.
const ACK_WAIT: Duration = Duration::from_secs(60);
/// How long a stopping projector lets its partitions finish their batch.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// How often the relay's checkpoint is read for the idle watermark.
const RELAY_MARK_POLL: Duration = Duration::from_millis(10);
/// How often a partition waiting for NATS to come back looks at the client.
const NATS_STATE_POLL: Duration = Duration::from_millis(50);
/// A dependency still away is logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The advisory lock a projection's live batches take shared and a rebuild's
/// swap takes exclusive.
pub(crate) fn projection_lock_key(kind: Kind) -> i64 {
    leader::lock_key(&format!("souk-projection:{}", kind.name()))
}

/// The advisory lock of one partition of one projection: one holder at a time.
pub(crate) fn partition_lock_key(kind: Kind, partition: u32) -> i64 {
    leader::lock_key(&format!(
        "souk-projection-partition:{}:{partition}",
        kind.name()
    ))
}

/// The durable consumer of one projection's partition.
pub fn consumer_name(projection: &str, partition: u32) -> String {
    format!("{projection}_p{partition}")
}

/// What the projector shares between its partitions.
#[derive(Debug)]
struct Shared {
    config: ProjectorConfig,
    connect_options: PgConnectOptions,
    jetstream: jetstream::Context,
    /// The relay's checkpoint, as [`watch_relay`] last read it.
    relay_mark: watch::Sender<Option<Position>>,
    /// Signalled after each listings batch that applied events: the search
    /// indexer has listings to index.
    search_pending: CommitSignal,
    /// What `/health` shows.
    readiness: watch::Sender<Readiness>,
    /// This process's share of each projection's partitions.
    balance: Balance,
}

/// A projector ready to run: connected, migrated, its stream ensured.
pub struct Projector {
    shared: Arc<Shared>,
    pool: PgPool,
    kinds: Vec<Kind>,
}

impl std::fmt::Debug for Projector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Projector")
            .field("stream", &self.shared.config.stream)
            .field("partitions", &self.shared.config.partitions())
            .field("projections", &self.kinds)
            .finish()
    }
}

/// What the projector's `/health` says: whether Postgres and NATS answer
/// and the partitions run, and the last problem met on the way.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Readiness {
    pub database: bool,
    pub nats: bool,
    /// The partitions run (connected, migrated, stream ensured).
    pub running: bool,
    /// Partitions (of every projection it runs) this process holds, and
    /// how many there are: see `balance`.
    pub partitions_held: u32,
    pub partitions_total: u32,
    /// Why it is not ready, while it is not.
    pub problem: Option<String>,
}

impl Readiness {
    /// A sender to give [`build_watched`]; subscribe to follow it.
    pub fn channel() -> watch::Sender<Readiness> {
        watch::Sender::new(Readiness::default())
    }

    pub fn ready(&self) -> bool {
        self.database && self.nats && self.running
    }

    /// `/health`'s body.
    pub fn json(&self) -> serde_json::Value {
        let mut body = serde_json::json!({
            "status": if self.ready() { "ok" } else { "degraded" },
            "database": if self.database { "up" } else { "down" },
            "nats": if self.nats { "connected" } else { "unreachable" },
            "partitions": if self.running { "running" } else { "starting" },
            "partitions_held": self.partitions_held,
            "partitions_total": self.partitions_total,
        });
        if let Some(problem) = &self.problem
            && !self.ready()
        {
            body["problem"] = problem.as_str().into();
        }
        body
    }
}

/// Logs a dependency that is still away at most every [`WARN_EVERY`] and
/// shows it on `/health`.
struct Waiting<'a> {
    readiness: &'a watch::Sender<Readiness>,
    warned_at: Option<Instant>,
    warned_about: Option<&'static str>,
}

impl Waiting<'_> {
    fn away(&mut self, what: &'static str, error: &dyn std::fmt::Display) {
        let problem = format!("{what}: {error}");
        self.readiness.send_modify(|readiness| {
            match what {
                "Postgres" => readiness.database = false,
                _ => readiness.nats = false,
            }
            readiness.problem = Some(problem);
        });
        // Each dependency is named as soon as it is the one waited for.
        let other = self.warned_about != Some(what);
        if other || self.warned_at.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
            self.warned_at = Some(Instant::now());
            self.warned_about = Some(what);
            tracing::warn!(%error, "{what} is unreachable; the projector waits for it");
        }
    }
}

/// [`build_watched`] without anyone watching.
pub async fn build(config: ProjectorConfig) -> anyhow::Result<Projector> {
    build_watched(config, Readiness::channel()).await
}

/// Connects to Postgres (applying pending migrations) and NATS, ensures the
/// stream and a checkpoint row for every projection and partition. While
/// Postgres or NATS is unreachable it waits (bounded backoff), saying so on
/// `readiness` and in the log; a configuration or a database that refuses
/// (a bad stream name, a migration refused) is an error at once.
pub async fn build_watched(
    config: ProjectorConfig,
    readiness: watch::Sender<Readiness>,
) -> anyhow::Result<Projector> {
    event_store::relay::validate_stream_name(&config.stream)?;
    let servers = event_store::nats::server_addrs(&config.nats_url)?;
    config.search.validate()?;
    let kinds = selected(&config.projections)?;
    // Read models are derived data: a batch whose commit a Postgres crash
    // loses is lost together with its checkpoint, and the partition's next
    // session consumes it again from the stream. So commits need not wait
    // for the WAL flush, which would otherwise bound every partition to one
    // fsync per batch.
    let connect_options = event_store::connect_options(&config.database_url)
        .context("parsing DATABASE_URL")?
        .application_name("souk-projector")
        .options([("synchronous_commit", "off")]);
    // Migrations and the projector's own few queries; each partition has a
    // connection of its own besides.
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect_lazy_with(connect_options.clone());
    let mut waiting = Waiting {
        readiness: &readiness,
        warned_at: None,
        warned_about: None,
    };
    event_store::migrate_when_reachable(&pool, config.backoff_max(), |error| {
        waiting.away("Postgres", error);
    })
    .await
    .context("applying migrations")?;
    readiness.send_modify(|readiness| readiness.database = true);
    // A stream is bound to one database and one partition count: another
    // count would leave partitions nobody consumes (see event_store::binding).
    let database = event_store::binding::database_id(&pool)
        .await
        .context("reading the database's identity")?;
    event_store::binding::bind_partitions(&pool, &config.stream, config.partitions())
        .await
        .context("binding the stream's partitions")??;

    let mut backoff = Backoff::new(config.backoff_max());
    let client = loop {
        let connecting = async_nats::ConnectOptions::new()
            .name("souk-projector")
            .connection_timeout(CONNECT_TIMEOUT)
            .reconnect_delay_callback(event_store::fanout::reconnect_delay)
            .connect(servers.clone());
        match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(client)) => break client,
            Ok(Err(error)) => waiting.away("NATS", &error),
            Err(_) => waiting.away("NATS", &"connecting timed out"),
        }
        backoff.wait().await;
    };
    // JetStream API requests (the stream, its consumers) wait
    // API_TIMEOUT, not async-nats' 5 s: see there.
    let jetstream = jetstream::ContextBuilder::new()
        .timeout(event_store::nats::API_TIMEOUT)
        .build(client);
    let replicas = usize::from(config.stream_replicas);
    let stream = loop {
        match event_store::relay::ensure_stream(&jetstream, &config.stream, replicas, database)
            .await
        {
            Ok(stream) => break stream,
            Err(event_store::relay::RelayError::Refused(refused)) => return Err(refused.into()),
            Err(error) => waiting.away("NATS", &error),
        }
        backoff.wait().await;
    };
    readiness.send_modify(|readiness| readiness.nats = true);
    if let Some(mismatch) = event_store::relay::replicas_mismatch(&stream, replicas) {
        tracing::warn!(stream = %config.stream, actual = mismatch.actual, configured = mismatch.configured, "{mismatch}");
    }
    let names: Vec<&str> = kinds.iter().map(|kind| kind.name()).collect();
    sqlx::query(
        "INSERT INTO projection_checkpoints (projection, partition)
         SELECT projection, partition
           FROM UNNEST($1::text[]) AS p(projection)
          CROSS JOIN generate_series(0, $2 - 1) AS n(partition)
         ON CONFLICT DO NOTHING",
    )
    .bind(&names)
    .bind(config.partitions() as i32)
    .execute(&pool)
    .await
    .context("creating the checkpoints")?;
    describe_metrics();
    let balance = Balance::new(&kinds, config.partitions(), readiness.clone());
    Ok(Projector {
        shared: Arc::new(Shared {
            config,
            connect_options,
            jetstream,
            relay_mark: watch::Sender::new(None),
            search_pending: CommitSignal::new(pool.clone(), crate::search::CHANNEL),
            balance,
            readiness,
        }),
        pool,
        kinds,
    })
}

/// The projections named in the configuration (all when none is).
fn selected(names: &[String]) -> anyhow::Result<Vec<Kind>> {
    if names.is_empty() {
        return Ok(Kind::ALL.to_vec());
    }
    let mut kinds = Vec::new();
    for name in names {
        let kind = Kind::parse(name.trim()).with_context(|| {
            format!(
                "`{name}` is not a projection (one of {})",
                crate::PROJECTIONS.join(", ")
            )
        })?;
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    Ok(kinds)
}

impl Projector {
    /// The projector's (small) pool on the read-model database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Runs every partition until `signal` completes, then lets each finish
    /// its batch (at most [`SHUTDOWN_GRACE`]). A partition task that dies
    /// (a bug) is logged and started again.
    pub async fn run_until(self, signal: impl Future<Output = ()>) -> anyhow::Result<()> {
        let (stop, stopped) = watch::channel(false);
        let watcher = tokio::spawn(watch_relay(
            self.shared.clone(),
            self.pool.clone(),
            stopped.clone(),
        ));
        let counting = {
            let shared = self.shared.clone();
            let stopped = stopped.clone();
            tokio::spawn(async move {
                let config = &shared.config;
                shared
                    .balance
                    .keep_counting(
                        shared.connect_options.clone(),
                        config.stream.clone(),
                        config.standby_retry(),
                        config.backoff_max(),
                        stopped,
                    )
                    .await;
            })
        };
        let mut tasks = JoinSet::new();
        let mut specs = HashMap::new();
        let partitions = self.shared.config.partitions();
        for kind in &self.kinds {
            for partition in 0..partitions {
                let spec = (*kind, partition);
                let id = tasks.spawn(self.partition(spec, stopped.clone())).id();
                specs.insert(id, spec);
            }
        }
        let indexer = crate::search::spawn_indexer(
            &self.shared.config.search,
            &self.shared.connect_options,
            &self.kinds,
            &self.shared.search_pending,
            stopped.clone(),
        );
        self.shared
            .readiness
            .send_modify(|readiness| readiness.running = true);
        tracing::info!(
            stream = %self.shared.config.stream,
            partitions,
            projections = ?self.kinds.iter().map(|kind| kind.name()).collect::<Vec<_>>(),
            "projector running"
        );
        tokio::pin!(signal);
        loop {
            tokio::select! {
                () = &mut signal => break,
                Some(ended) = tasks.join_next_with_id() => {
                    let id = match &ended {
                        Ok((id, ())) => *id,
                        Err(error) => error.id(),
                    };
                    let Some(spec) = specs.remove(&id) else { continue };
                    tracing::error!(
                        projection = spec.0.name(),
                        partition = spec.1,
                        outcome = ?ended.err(),
                        "a partition task ended before shutdown; starting it again"
                    );
                    tokio::time::sleep(backoff::FIRST_DELAY).await;
                    let id = tasks.spawn(self.partition(spec, stopped.clone())).id();
                    specs.insert(id, spec);
                }
            }
        }
        let _ = stop.send(true);
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while tasks.join_next().await.is_some() {}
            if let Some(indexer) = indexer {
                let _ = indexer.await;
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!("partitions did not stop in time; aborting them");
            tasks.abort_all();
        }
        watcher.abort();
        counting.abort();
        tracing::info!("projector stopped");
        Ok(())
    }

    fn partition(
        &self,
        (kind, partition): (Kind, u32),
        stop: watch::Receiver<bool>,
    ) -> impl Future<Output = ()> + Send + 'static {
        Partition {
            kind,
            partition,
            shared: self.shared.clone(),
            stop,
            standing_by: false,
        }
        .run()
    }
}

/// A partition this process holds, or is trying to take: dropped, it is
/// no longer counted in the process's share.
struct Held {
    shared: Arc<Shared>,
    kind: Kind,
    partition: u32,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.shared.balance.release(self.kind, self.partition);
    }
}

/// What a partition asks a replicated stream's leader before it raises its
/// watermark: the last message on its subjects.
struct LeaderCheck {
    stream: jetstream::stream::Stream,
    filter: String,
}

/// A partition's checkpoint row.
#[derive(Debug, Clone, Copy)]
struct Checkpoint {
    position: Position,
    caught_up: Position,
    stream_sequence: u64,
}

fn position(transaction_id: i64, position: i64) -> Position {
    Position {
        transaction_id: transaction_id as u64,
        position,
    }
}

/// A delivered message, decoded.
struct Delivered {
    stream_sequence: u64,
    body: Result<RecordedEvent, DeadLetter>,
}

fn decode(message: &Message, stream_sequence: u64) -> Delivered {
    let body = serde_json::from_slice::<RecordedEvent>(&message.payload).map_err(|error| {
        let message_id = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get("Nats-Msg-Id"))
            .map(|value| value.as_str());
        DeadLetter::malformed(
            message_id,
            stream_sequence,
            message.subject.as_str(),
            &message.payload,
            format!("the message is not a recorded event: {error}"),
        )
    });
    Delivered {
        stream_sequence,
        body,
    }
}

/// Where an event's time went before this partition got it: from its
/// commit (`recorded_at`, taken in its transaction) to the relay's publish,
/// and from the publish to this delivery. The histograms are looked up once
/// per session rather than once per message.
struct DelayHistograms {
    publish: metrics::Histogram,
    delivery: metrics::Histogram,
}

impl DelayHistograms {
    fn new(kind: Kind) -> Self {
        Self {
            publish: metrics::histogram!("souk_projection_publish_delay_seconds", "projection" => kind.name()),
            delivery: metrics::histogram!("souk_projection_delivery_delay_seconds", "projection" => kind.name()),
        }
    }

    fn observe(&self, event: &RecordedEvent, published_unix_ns: i128) {
        let now_ns = i128::from(Utc::now().timestamp_nanos_opt().unwrap_or(0));
        let recorded_ns = i128::from(event.recorded_at.timestamp_nanos_opt().unwrap_or(0));
        let seconds = |ns: i128| (ns.max(0) as f64) / 1e9;
        self.publish
            .record(seconds(published_unix_ns - recorded_ns));
        self.delivery.record(seconds(now_ns - published_unix_ns));
    }
}

struct Partition {
    kind: Kind,
    partition: u32,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    standing_by: bool,
}

impl Partition {
    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Completes when the projector stops.
    fn stopped(&self) -> impl Future<Output = ()> + use<> {
        let mut stop = self.stop.clone();
        async move {
            let _ = stop.wait_for(|stop| *stop).await;
        }
    }

    async fn run(mut self) {
        let mut backoff = Backoff::new(self.shared.config.backoff_max());
        while !self.stopping() {
            let started = Instant::now();
            match self.session().await {
                Ok(()) => {}
                Err(error) => {
                    metrics::counter!("souk_projection_errors_total", "projection" => self.kind.name())
                        .increment(1);
                    tracing::warn!(
                        projection = self.kind.name(),
                        partition = self.partition,
                        error = format!("{error:#}"),
                        "partition session failed; resuming from the checkpoint"
                    );
                    // A session that ran a while before failing starts again
                    // at once, and the backoff over: its consumer lived in
                    // a NATS server's memory, so a server restarted under a
                    // running session fails the next fetch, and catching up
                    // should not wait for it.
                    if started.elapsed() > self.shared.config.backoff_max() * 2 {
                        backoff.reset();
                        continue;
                    }
                    // NATS is away: start again as soon as the client has
                    // reconnected, not after a backoff grown during the outage
                    // (nor any backoff: the catch-up starts at once).
                    if !self.nats_connected() {
                        if !self.until_nats_connected().await {
                            return;
                        }
                        backoff.reset();
                        continue;
                    }
                    let stopped = self.stopped();
                    tokio::select! {
                        () = stopped => {}
                        () = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        }
    }

    fn nats_connected(&self) -> bool {
        self.shared.jetstream.client().connection_state()
            == async_nats::connection::State::Connected
    }

    /// Waits until the NATS client has reconnected (`true`) or the projector
    /// stops (`false`). The client reconnects by itself; its state is only
    /// looked at, every [`NATS_STATE_POLL`].
    async fn until_nats_connected(&self) -> bool {
        loop {
            if self.stopping() {
                return false;
            }
            if self.nats_connected() {
                return true;
            }
            let stopped = self.stopped();
            tokio::select! {
                () = stopped => return false,
                () = tokio::time::sleep(NATS_STATE_POLL) => {}
            }
        }
    }

    fn labels(&self) -> [(&'static str, String); 1] {
        [("projection", self.kind.name().to_owned())]
    }

    /// One session: holds the partition's lock and consumes until the
    /// projector stops (`Ok`) or anything fails (`Err`: the caller starts a
    /// new session from the checkpoint).
    async fn session(&mut self) -> anyhow::Result<()> {
        let mut conn = tokio::time::timeout(
            CONNECT_TIMEOUT,
            PgConnection::connect_with(&self.shared.connect_options),
        )
        .await
        .context("connecting to Postgres timed out")?
        .context("connecting to Postgres")?;
        let Some(_held) = self.take_lock(&mut conn).await? else {
            return Ok(());
        };
        let config = &self.shared.config;
        sqlx::query(
            "INSERT INTO projection_checkpoints (projection, partition) VALUES ($1, $2)
             ON CONFLICT DO NOTHING",
        )
        .bind(self.kind.name())
        .bind(self.partition as i32)
        .execute(&mut conn)
        .await
        .context("creating the checkpoint")?;
        let checkpoint = self.load_checkpoint(&mut conn).await?;
        let (stream, consumer) = self.reset_consumer(&checkpoint).await?;
        // See "The idle watermark": on a replicated stream the consumer's
        // "nothing pending" is its own node's, so the stream's leader is
        // asked too.
        let leader_check = (stream.cached_info().config.num_replicas > 1).then(|| LeaderCheck {
            stream,
            filter: self.kind.subject_filter(&config.stream, self.partition),
        });
        // The stream sequence up to which every message of this partition
        // has been delivered (and, between batches, applied).
        let mut delivered_through = checkpoint.stream_sequence;
        tracing::info!(
            projection = self.kind.name(),
            partition = self.partition,
            checkpoint = %checkpoint.position,
            "partition consuming"
        );

        let batch_max = config.batch_max();
        let mut next_consumer_sequence = 1;
        let mut caught_up = checkpoint.caught_up;
        let mut relay_moved = self.shared.relay_mark.subscribe();
        // A batch fetched while the one before was applied, with the relay's
        // mark read before its fetch.
        let mut prefetched: Option<(Option<Position>, Vec<Message>)> = None;
        let delays = DelayHistograms::new(self.kind);
        while !self.stopping() {
            if self.shared.balance.give_back(self.kind, self.partition) {
                tracing::info!(
                    projection = self.kind.name(),
                    partition = self.partition,
                    "giving this partition back: another projector process runs this projection"
                );
                return Ok(());
            }
            let (relay_mark, messages) = match prefetched.take() {
                Some(fetched) => fetched,
                None => {
                    // Read before the fetch: see "The idle watermark".
                    let relay_mark = *relay_moved.borrow_and_update();
                    (relay_mark, fetch(&consumer, batch_max).await?)
                }
            };
            if messages.is_empty() {
                if let Some(mark) = relay_mark
                    && mark > caught_up
                {
                    let info = consumer
                        .get_info()
                        .await
                        .context("reading the consumer's state")?;
                    if info.num_pending == 0
                        && info.num_ack_pending == 0
                        && self
                            .leader_holds_nothing_after(&leader_check, delivered_through)
                            .await?
                    {
                        caught_up = self.raise_watermark(&mut conn, mark).await?;
                    }
                }
                // Nothing waits: fetch again once the relay has published
                // more, or after `fetch_wait` at the latest (the mark is only
                // polled).
                let stopped = self.stopped();
                tokio::select! {
                    () = stopped => return Ok(()),
                    _ = relay_moved.changed() => {}
                    () = tokio::time::sleep(config.fetch_wait()) => {}
                }
                continue;
            }
            let mut delivered = Vec::with_capacity(messages.len());
            // Whether the server had nothing more for this consumer when it
            // delivered the batch's last message.
            let mut drained = false;
            for message in &messages {
                let info = message
                    .info()
                    .map_err(|error| anyhow::anyhow!("a message without delivery info: {error}"))?;
                if info.consumer_sequence != next_consumer_sequence {
                    anyhow::bail!(
                        "delivery gap: consumer sequence {} after {}",
                        info.consumer_sequence,
                        next_consumer_sequence - 1
                    );
                }
                next_consumer_sequence += 1;
                drained = info.pending == 0;
                let one = decode(message, info.stream_sequence);
                if let Ok(event) = &one.body {
                    delays.observe(event, info.published.unix_timestamp_nanos());
                }
                delivered.push(one);
            }
            if let Some(last) = delivered.last() {
                delivered_through = delivered_through.max(last.stream_sequence);
            }
            // Drained: every event up to the mark read before the fetch was in
            // the stream then, so it is in this batch or was applied before
            // (on a replicated stream, once its leader agrees).
            let raise_to = match relay_mark.filter(|_| drained) {
                Some(mark)
                    if mark > caught_up
                        && !self
                            .leader_holds_nothing_after(&leader_check, delivered_through)
                            .await? =>
                {
                    None
                }
                raise_to => raise_to,
            };
            // More waits (catching up): fetch the next batch while this one
            // is applied. The consumer allows two batches unacknowledged.
            let fetch_ahead = async {
                if drained {
                    return None;
                }
                let relay_mark = *relay_moved.borrow_and_update();
                Some(
                    fetch(&consumer, batch_max)
                        .await
                        .map(|messages| (relay_mark, messages)),
                )
            };
            let (applied, fetched_ahead) =
                tokio::join!(self.apply(&mut conn, &delivered, raise_to), fetch_ahead);
            caught_up = caught_up.max(applied?);
            // The consumer acknowledges all: the last message acknowledges
            // the batch.
            if let Some(last) = messages.last() {
                last.ack()
                    .await
                    .map_err(|error| anyhow::anyhow!("acknowledging a batch: {error}"))?;
            }
            prefetched = fetched_ahead.transpose()?;
        }
        Ok(())
    }

    /// Takes the partition's lock on `conn`, trying only while this process
    /// holds less than its share of the projection (see `balance`) and
    /// standing by otherwise: `None` when the projector stops first. The
    /// guard gives the place back when the session ends.
    async fn take_lock(&mut self, conn: &mut PgConnection) -> anyhow::Result<Option<Held>> {
        let (kind, partition) = (self.kind, self.partition);
        let balance = &self.shared.balance;
        loop {
            if balance.reserve(kind, partition) {
                let held = Held {
                    shared: self.shared.clone(),
                    kind,
                    partition,
                };
                let key = partition_lock_key(kind, partition);
                if leader::try_lead(conn, key)
                    .await
                    .context("taking the partition's lock")?
                {
                    self.standing_by = false;
                    return Ok(Some(held));
                }
            }
            // Said once per stand-by, not once per try.
            if !self.standing_by {
                self.standing_by = true;
                tracing::info!(
                    projection = kind.name(),
                    partition,
                    "another projector holds this partition; standing by"
                );
            }
            let stopped = self.stopped();
            tokio::select! {
                () = stopped => return Ok(None),
                () = tokio::time::sleep(self.shared.config.standby_retry()) => {}
            }
        }
    }

    async fn load_checkpoint(&self, conn: &mut PgConnection) -> anyhow::Result<Checkpoint> {
        let (transaction_id, at, caught_up_transaction, caught_up_position, stream_sequence): (
            i64,
            i64,
            i64,
            i64,
            i64,
        ) = sqlx::query_as(
            "SELECT transaction_id, position, caught_up_transaction, caught_up_position,
                    stream_sequence
               FROM projection_checkpoints WHERE projection = $1 AND partition = $2",
        )
        .bind(self.kind.name())
        .bind(self.partition as i32)
        .fetch_one(conn)
        .await
        .context("reading the checkpoint")?;
        Ok(Checkpoint {
            position: position(transaction_id, at),
            caught_up: position(caught_up_transaction, caught_up_position),
            stream_sequence: stream_sequence.max(0) as u64,
        })
    }

    /// Whether the stream's leader holds no message of this partition after
    /// stream sequence `through` (see "The idle watermark"); always, without
    /// asking, on a stream of one replica, whose consumers deliver from the
    /// leader's own store. A refusal is counted: it delays a raise of the
    /// watermark until the messages arrive.
    async fn leader_holds_nothing_after(
        &self,
        check: &Option<LeaderCheck>,
        through: u64,
    ) -> anyhow::Result<bool> {
        let Some(check) = check else {
            return Ok(true);
        };
        let last = event_store::nats::last_sequence_on(&check.stream, &check.filter)
            .await
            .context("asking the stream's leader for the partition's last message")?;
        if last > through {
            metrics::counter!("souk_projection_watermark_deferred_total", &self.labels())
                .increment(1);
        }
        Ok(last <= through)
    }

    /// Deletes the partition's consumer and creates it again, starting right
    /// after the last message the checkpoint covers; returns the stream too.
    async fn reset_consumer(
        &self,
        checkpoint: &Checkpoint,
    ) -> anyhow::Result<(jetstream::stream::Stream, PullConsumer)> {
        let config = &self.shared.config;
        let stream = self
            .shared
            .jetstream
            .get_stream(&config.stream)
            .await
            .context("opening the stream")?;
        let start = resume_sequence(&stream, checkpoint).await?;
        let name = consumer_name(self.kind.name(), self.partition);
        // Absent is fine; anything else shows up when creating it.
        let _ = stream.delete_consumer(&name).await;
        let deliver_policy = match start {
            0 | 1 => DeliverPolicy::All,
            start_sequence => DeliverPolicy::ByStartSequence { start_sequence },
        };
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some(name.clone()),
                description: Some(format!(
                    "Souk projection {} partition {}",
                    self.kind.name(),
                    self.partition
                )),
                deliver_policy,
                ack_policy: AckPolicy::All,
                ack_wait: ACK_WAIT,
                filter_subject: self.kind.subject_filter(&config.stream, self.partition),
                max_ack_pending: (2 * config.batch_max()) as i64,
                // The consumer's state is disposable: the checkpoint in
                // Postgres says where to resume, and every session creates
                // the consumer again from it. So it is kept in memory on one
                // node, as async-nats's ordered consumers are: on a
                // replicated stream, a replicated consumer made every
                // delivery and ack a Raft proposal among the nodes. A node
                // lost with its consumer fails the session's fetch, and the
                // next session creates the consumer on a live node.
                num_replicas: 1,
                memory_storage: true,
                ..Default::default()
            })
            .await
            .with_context(|| format!("creating the consumer {name}"))?;
        Ok((stream, consumer))
    }

    /// Raises the partition's caught-up position to `mark` (never lowers it).
    async fn raise_watermark(
        &self,
        conn: &mut PgConnection,
        mark: Position,
    ) -> anyhow::Result<Position> {
        let (transaction_id, at): (i64, i64) = sqlx::query_as(
            "UPDATE projection_checkpoints
                SET caught_up_transaction = CASE WHEN (caught_up_transaction, caught_up_position) < ($3, $4)
                                                 THEN $3 ELSE caught_up_transaction END,
                    caught_up_position = CASE WHEN (caught_up_transaction, caught_up_position) < ($3, $4)
                                              THEN $4 ELSE caught_up_position END,
                    updated_at = now()
              WHERE projection = $1 AND partition = $2
              RETURNING caught_up_transaction, caught_up_position",
        )
        .bind(self.kind.name())
        .bind(self.partition as i32)
        .bind(mark.transaction_id as i64)
        .bind(mark.position)
        .fetch_one(conn)
        .await
        .context("raising the idle watermark")?;
        Ok(position(transaction_id, at))
    }

    /// Applies one batch in one transaction (see the module doc) and returns
    /// the partition's caught-up position after it.
    /// `raise_to`, when given, is a position up to which every event of the
    /// partition is known to be in this batch or applied before it: the
    /// caught-up position rises to it too.
    async fn apply(
        &self,
        conn: &mut PgConnection,
        delivered: &[Delivered],
        raise_to: Option<Position>,
    ) -> anyhow::Result<Position> {
        match self.apply_batch(conn, delivered, raise_to, false).await {
            Err(BatchError::Refused(error)) => {
                tracing::warn!(
                    projection = self.kind.name(),
                    partition = self.partition,
                    events = delivered.len(),
                    %error,
                    "Postgres refused a batch; applying it again with each event isolated"
                );
                self.apply_batch(conn, delivered, raise_to, true)
                    .await
                    .map_err(BatchError::into_anyhow)
            }
            outcome => outcome.map_err(BatchError::into_anyhow),
        }
    }

    /// One attempt at [`Partition::apply`]. Without `isolated`, the events
    /// are written without savepoints (the common case, two round trips
    /// fewer); a batch Postgres refuses then rolls back whole, as
    /// [`BatchError::Refused`], for an isolated attempt.
    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        delivered: &[Delivered],
        raise_to: Option<Position>,
        isolated: bool,
    ) -> Result<Position, BatchError> {
        let started = Instant::now();
        let kind = self.kind;
        let mut tx = conn.begin().await.context("beginning a batch")?;
        // The projection's shared lock first, then the row (see `rebuild`):
        // the MATERIALIZED CTE runs before the row is read and locked.
        let (transaction_id, at, stream_sequence): (i64, i64, i64) = sqlx::query_as(
            "WITH shared_lock AS MATERIALIZED (SELECT pg_advisory_xact_lock_shared($3))
             SELECT c.transaction_id, c.position, c.stream_sequence
               FROM projection_checkpoints c, shared_lock
              WHERE c.projection = $1 AND c.partition = $2
                FOR UPDATE OF c",
        )
        .bind(kind.name())
        .bind(self.partition as i32)
        .bind(projection_lock_key(kind))
        .fetch_one(&mut *tx)
        .await
        .context("locking the projection and the checkpoint")?;
        let mut last = position(transaction_id, at);
        let mut last_sequence = stream_sequence.max(0) as u64;
        let mut last_recorded_at: Option<DateTime<Utc>> = None;
        let mut handled: Vec<&RecordedEvent> = Vec::new();
        let mut letters: Vec<DeadLetter> = Vec::new();
        let mut redelivered = 0u64;
        for message in delivered {
            last_sequence = last_sequence.max(message.stream_sequence);
            match &message.body {
                Ok(event) if event.position <= last => redelivered += 1,
                Ok(event) => {
                    last = event.position;
                    last_recorded_at = Some(event.recorded_at);
                    if kind.handles(&event.aggregate_type) {
                        handled.push(event);
                    }
                }
                Err(letter) => letters.push(letter.clone()),
            }
        }
        let refused = if handled.is_empty() {
            Ok(Vec::new())
        } else if isolated {
            apply_isolated(&mut tx, kind, "public", &handled).await
        } else {
            apply_unguarded(&mut tx, kind, "public", &handled).await
        };
        let refused = match refused {
            Ok(refused) => refused,
            Err(error) if !isolated && is_data_error(&error) => {
                return Err(BatchError::Refused(error));
            }
            Err(error) => {
                return Err(anyhow::Error::new(error)
                    .context("applying the batch")
                    .into());
            }
        };
        for (index, why) in &refused {
            letters.push(DeadLetter::event(handled[*index], why.0.clone()));
        }
        for letter in &letters {
            park(&mut tx, kind.name(), self.partition as i32, letter)
                .await
                .context("parking a poison event")?;
        }
        let applied = (handled.len() - refused.len()) as i64;
        let caught_up = raise_to.map_or(last, |mark| mark.max(last));
        let (caught_up_transaction, caught_up_position): (i64, i64) = sqlx::query_as(
            "UPDATE projection_checkpoints
                SET transaction_id = $3,
                    position = $4,
                    caught_up_transaction = CASE WHEN (caught_up_transaction, caught_up_position) < ($8, $9)
                                                 THEN $8 ELSE caught_up_transaction END,
                    caught_up_position = CASE WHEN (caught_up_transaction, caught_up_position) < ($8, $9)
                                              THEN $9 ELSE caught_up_position END,
                    events_applied = events_applied + $5,
                    last_event_recorded_at = COALESCE($6, last_event_recorded_at),
                    stream_sequence = GREATEST(stream_sequence, $7),
                    updated_at = now()
              WHERE projection = $1 AND partition = $2
              RETURNING caught_up_transaction, caught_up_position",
        )
        .bind(kind.name())
        .bind(self.partition as i32)
        .bind(last.transaction_id as i64)
        .bind(last.position)
        .bind(applied)
        .bind(last_recorded_at)
        .bind(last_sequence as i64)
        .bind(caught_up.transaction_id as i64)
        .bind(caught_up.position)
        .fetch_one(&mut *tx)
        .await
        .context("moving the checkpoint")?;
        tx.commit().await.context("committing the batch")?;
        if kind == Kind::Listings
            && applied > 0
            && self.shared.config.search.backend != SearchBackend::Off
        {
            self.shared.search_pending.committed();
        }

        let labels = self.labels();
        let now = Utc::now();
        let commit_to_visible =
            metrics::histogram!("souk_projection_commit_to_visible_seconds", &labels);
        for event in &handled {
            let seconds = (now - event.recorded_at).num_microseconds().unwrap_or(0) as f64 / 1e6;
            commit_to_visible.record(seconds.max(0.0));
        }
        metrics::counter!("souk_projection_events_applied_total", &labels)
            .increment(applied as u64);
        metrics::counter!("souk_projection_redelivered_total", &labels).increment(redelivered);
        metrics::counter!("souk_projection_batches_total", &labels).increment(1);
        metrics::histogram!("souk_projection_batch_seconds", &labels)
            .record(started.elapsed().as_secs_f64());
        metrics::gauge!("souk_projection_checkpoint_position", "projection" => kind.name(), "partition" => self.partition.to_string())
            .set(last.position as f64);
        Ok(position(caught_up_transaction, caught_up_position))
    }
}

/// Why one attempt at applying a batch failed.
#[derive(Debug)]
enum BatchError {
    /// Postgres refused the batch's writes because of their data; the
    /// transaction rolled back, and an isolated attempt finds the culprits.
    Refused(sqlx::Error),
    /// Anything else: the session ends and resumes from the checkpoint.
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for BatchError {
    fn from(error: anyhow::Error) -> Self {
        Self::Failed(error)
    }
}

impl BatchError {
    fn into_anyhow(self) -> anyhow::Error {
        match self {
            Self::Refused(error) => anyhow::Error::new(error).context("applying the batch"),
            Self::Failed(error) => error,
        }
    }
}

/// Keeps `shared.relay_mark` at the relay's checkpoint, read every
/// [`RELAY_MARK_POLL`] for all partitions at once, until the projector
/// stops. A failed read keeps the last mark (an old mark is always safe to
/// use, only less useful).
async fn watch_relay(shared: Arc<Shared>, pool: PgPool, mut stop: watch::Receiver<bool>) {
    let mut failing_since: Option<Instant> = None;
    while !*stop.borrow() {
        let read = sqlx::query_as::<_, (i64, i64)>(
            "SELECT transaction_id, position FROM relay_checkpoints WHERE stream = $1",
        )
        .bind(&shared.config.stream)
        .fetch_optional(&pool);
        let read = tokio::time::timeout(CONNECT_TIMEOUT, read).await;
        let nats = shared.jetstream.client().connection_state()
            == async_nats::connection::State::Connected;
        let database = matches!(read, Ok(Ok(_)));
        shared.readiness.send_if_modified(|readiness| {
            let changed = readiness.database != database || readiness.nats != nats;
            readiness.database = database;
            readiness.nats = nats;
            if changed && !readiness.ready() {
                readiness.problem = Some(
                    (if database {
                        "NATS: connection lost"
                    } else {
                        "Postgres: unreachable"
                    })
                    .to_owned(),
                );
            }
            changed
        });
        match read {
            Ok(Ok(row)) => {
                failing_since = None;
                let mark = row.map(|(transaction_id, at)| position(transaction_id, at));
                shared.relay_mark.send_if_modified(|current| {
                    let newer = mark > *current;
                    if newer {
                        *current = mark;
                    }
                    newer
                });
            }
            outcome => {
                let error = match outcome {
                    Ok(Err(error)) => error.to_string(),
                    _ => "timed out".to_owned(),
                };
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(10) {
                    tracing::warn!(
                        %error,
                        "cannot read the relay's checkpoint; idle partitions keep their watermark"
                    );
                    failing_since = Some(Instant::now());
                }
            }
        }
        tokio::select! {
            _ = stop.changed() => {}
            () = tokio::time::sleep(RELAY_MARK_POLL) => {}
        }
    }
}

/// Where a partition's consumer starts: right after the stream sequence of
/// the last message its checkpoint covers, when the stream still holds that
/// message and it is an event at or before the checkpoint (then everything
/// before it in the stream, which is in global order, is too). Otherwise from
/// the stream's first message; and if the stream has dropped messages (limits
/// or age) that may come after the checkpoint, the partition refuses to go on
/// rather than skip them silently: a rebuild is needed.
async fn resume_sequence(
    stream: &jetstream::stream::Stream,
    checkpoint: &Checkpoint,
) -> anyhow::Result<u64> {
    let event_at = |sequence: u64| async move {
        let message = stream.get_raw_message(sequence).await.ok()?;
        serde_json::from_slice::<RecordedEvent>(&message.payload)
            .ok()
            .map(|event| event.position)
    };
    if checkpoint.stream_sequence > 0
        && let Some(at) = event_at(checkpoint.stream_sequence).await
        && at <= checkpoint.position
    {
        return Ok(checkpoint.stream_sequence + 1);
    }
    let info = stream
        .get_info()
        .await
        .context("reading the stream's state")?;
    let first = info.state.first_sequence;
    if first > 1 && info.state.messages > 0 {
        match event_at(first).await {
            Some(at) if at <= checkpoint.position => {}
            _ => anyhow::bail!(
                "the stream no longer holds messages 1 to {}, and they may come after this \
                 partition's checkpoint {}: rebuild the projection from the event store \
                 (replay-tool rebuild)",
                first - 1,
                checkpoint.position
            ),
        }
    }
    Ok(first.max(1))
}

/// Up to `max` messages that are already waiting (none when `max` is 0).
async fn fetch(consumer: &PullConsumer, max: usize) -> anyhow::Result<Vec<Message>> {
    if max == 0 {
        return Ok(Vec::new());
    }
    let mut batch = consumer
        .fetch()
        .max_messages(max)
        .messages()
        .await
        .map_err(|error| anyhow::anyhow!("fetching messages: {error}"))?;
    let mut messages = Vec::new();
    loop {
        match tokio::time::timeout(FETCH_TIMEOUT, batch.next()).await {
            Ok(Some(Ok(message))) => messages.push(message),
            Ok(Some(Err(error))) => anyhow::bail!("fetching messages: {error}"),
            Ok(None) => return Ok(messages),
            Err(_) => anyhow::bail!("fetching messages timed out"),
        }
    }
}

fn describe_metrics() {
    static DESCRIBED: std::sync::Once = std::sync::Once::new();
    DESCRIBED.call_once(|| {
        metrics::describe_histogram!(
            "souk_projection_publish_delay_seconds",
            "From an event's recorded time to the relay's publish of it, by projection."
        );
        metrics::describe_histogram!(
            "souk_projection_delivery_delay_seconds",
            "From the relay's publish of an event to its delivery to a partition, by projection."
        );
        metrics::describe_counter!(
            "souk_projection_dead_letters_total",
            "Poison events parked in dead_letters, by projection."
        );
        metrics::describe_counter!(
            "souk_projection_events_applied_total",
            "Events applied to the read models, by projection."
        );
        metrics::describe_counter!(
            "souk_projection_redelivered_total",
            "Messages skipped because their event was already applied (redeliveries)."
        );
        metrics::describe_counter!(
            "souk_projection_batches_total",
            "Batches committed, by projection."
        );
        metrics::describe_counter!(
            "souk_projection_errors_total",
            "Partition sessions that failed and resumed from their checkpoint."
        );
        metrics::describe_histogram!(
            "souk_projection_batch_seconds",
            "Time to apply and commit one batch."
        );
        metrics::describe_histogram!(
            "souk_projection_commit_to_visible_seconds",
            "From an event's recording to its batch's commit in the read models."
        );
        metrics::describe_gauge!(
            "souk_projection_checkpoint_position",
            "Global position of the last event a partition committed."
        );
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keys_differ_by_projection_and_partition() {
        let mut keys = std::collections::HashSet::new();
        for kind in Kind::ALL {
            assert!(keys.insert(projection_lock_key(kind)));
            for partition in 0..16 {
                assert!(keys.insert(partition_lock_key(kind, partition)));
            }
        }
        assert_ne!(
            projection_lock_key(Kind::Orders),
            event_store::relay::lock_key("souk")
        );
    }

    #[test]
    fn consumers_are_named_after_their_projection_and_partition() {
        assert_eq!(consumer_name("orders", 3), "orders_p3");
    }

    #[test]
    fn unknown_projections_are_refused() {
        assert!(selected(&["orders".into(), "nope".into()]).is_err());
        assert_eq!(selected(&[]).unwrap().len(), 4);
        assert_eq!(
            selected(&["wallets".into(), "wallets".into()]).unwrap(),
            vec![Kind::Wallets]
        );
    }
}
