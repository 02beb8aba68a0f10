//! The relay: publishes committed events to NATS JetStream in global order.
//!
//! One relay per JetStream stream leads at a time: it holds a Postgres
//! advisory lock (derived from the stream's name) on a connection of its own;
//! every other instance is a standby that tries the lock again every few
//! seconds. The leader reads the global order after its checkpoint
//! ([`global::horizon`], then [`global::read_below`]: it never skips a late
//! commit), publishes a batch on
//! `<stream>.events.<AggregateType>.<partition>` with the event id as
//! `Nats-Msg-Id`, awaits the acks in order, and only then stores the
//! checkpoint (`relay_checkpoints`). While a full batch's acks come back it
//! reads the next batch; while that one is sent and stored by JetStream, it
//! awaits the acks of the batch before and checkpoints it (at most two
//! batches in flight): catching up after an outage costs the slowest of
//! read, publish and checkpoint per batch, not their sum. A partial batch
//! (the relay has caught up) is checkpointed as soon as its acks are in.
//! Every query of the leader runs on the lock's connection:
//! a relay whose session died cannot move the checkpoint, and the relay
//! never waits for a connection of the pool it was given, which the
//! commands of its process keep busy under load.
//!
//! The stream is a gapless prefix of the global order, each event once,
//! because the relay is its only publisher and checks where it ends. Each
//! run of publishing (taking the lead, after any failure) starts with a sync
//! (`Tail`, `resume_point`): the stream's last sequence and the
//! `Souk-Position` of its last message say where to go on; events an earlier
//! leader published past the checkpoint are checkpointed, not sent again.
//! Every message then carries `Nats-Expected-Last-Sequence`, the sequence
//! the message before it will have: when one publish is lost or refused,
//! JetStream refuses every later one, and the relay drops what is in flight,
//! syncs and publishes again from the stream's end, so no event is ever
//! stored after a later one. An ack at another sequence than expected, or a
//! duplicate, is also a failure and a sync. The event id travels as
//! `Nats-Msg-Id` (duplicate window [`DUPLICATE_WINDOW`]), so that two
//! leaders for a moment (a lock lost with its connection) store one copy of
//! an event both send.
//!
//! The relay must be the stream's only publisher. A message of another
//! publisher takes the sequence the relay's next message expects to follow:
//! that one is refused, but the later ones in flight, each expecting the one
//! before, are stored past it. The sync after the failure finds the other's
//! message (`Relay::sync`), and the relay publishes the refused event after
//! them, the ones already there skipped: nothing is lost or doubled, but
//! that event is out of order, and an error says so.
//!
//! The relay is woken after each commit of events: in process by the
//! writer's [`CommitSignal`] ([`Relay::woken_by`]), across processes by
//! `NOTIFY souk_events`, which that signal sends outside the writing
//! transaction while no relay leads in the writer's process. It polls as a
//! fallback. Postgres or NATS going away ends
//! nothing: the relay retries with a bounded backoff, and commands never wait
//! on it. A long-running event-writing transaction holds the horizon back (see
//! [`global`]), and with it the relay; `souk_relay_horizon_age_seconds`
//! and a warning naming that transaction make such a stall visible.
//!
//! Metrics (label `stream`): `souk_relay_published_total`,
//! `souk_relay_duplicates_total`, `souk_relay_failures_total`,
//! `souk_relay_foreign_messages_total`,
//! `souk_relay_checkpoint_position`,
//! `souk_relay_step_seconds` (label `step`), `souk_relay_batch_events`,
//! `souk_relay_lag_events`, `souk_relay_horizon_age_seconds`,
//! `souk_relay_connected`, `souk_relay_leader`.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::header::{NATS_EXPECTED_LAST_SEQUENCE, NATS_MESSAGE_ID};
use async_nats::jetstream::context::{ContextBuilder, PublishErrorKind};
use async_nats::jetstream::stream::RawMessageErrorKind;
use async_nats::jetstream::{self, stream};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgExecutor};
use tokio::sync::{Notify, watch};
use uuid::Uuid;

use crate::backoff::Backoff;
use crate::fanout;
use crate::global::{self, RecordedEvent};
use crate::leader;
use crate::nats::redacted;
use crate::record::Position;
use crate::signal::CommitSignal;

/// The channel writers notify after committing events (see [`CommitSignal`]).
pub const NOTIFY_CHANNEL: &str = "souk_events";

/// The header naming the event a message carries by its position token (see
/// [`Position::token`]): what a relay reads to find where the stream ends.
pub const POSITION_HEADER: &str = "Souk-Position";

/// How long JetStream remembers a `Nats-Msg-Id`: a re-publish within this
/// window after the first copy is dropped. It bounds how long an outage can
/// last between a publish whose ack was lost and its retry.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(5 * 60);

/// How long the stream keeps a message.
pub const STREAM_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// How many bytes the stream keeps at most (oldest messages go first).
pub const STREAM_MAX_BYTES: i64 = 1 << 30;

/// The largest batch the relay reads and publishes at once.
pub const MAX_BATCH: usize = 5_000;

/// Bound on every single database call of the relay.
const DB_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on connecting to NATS.
const NATS_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How often a leader whose NATS connection is down looks whether the
/// client has reconnected.
const NATS_STATE_POLL: Duration = Duration::from_millis(50);
/// Repeated warnings (NATS down, stall) are logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// How often an idle leader checks that its lock connection is alive.
const LOCK_CHECK_EVERY: Duration = Duration::from_secs(2);
/// How often a relay held back by the horizon looks again.
const HORIZON_RECHECK: Duration = Duration::from_millis(10);
/// How often a relay that refused its stream looks again.
const REFUSED_RECHECK: Duration = Duration::from_secs(5);
/// The lag metric counts at most this many events.
const LAG_COUNT_MAX: i64 = 1_000_000;
/// How many messages a sync looks back from the stream's end for the last
/// one a relay published (past messages expired or another publisher's).
const TAIL_LOOKBACK: u64 = 64;
/// The most messages a sync reads after a failure to find those of the
/// relay stored past a message of another publisher: more than can be in
/// flight.
const WINDOW_MAX: u64 = 2 * MAX_BATCH as u64 + TAIL_LOOKBACK;

/// What a relay publishes, where, and how it paces itself.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The NATS server (`nats://host:port`), or a comma-separated list of
    /// the servers of a cluster (see [`crate::nats::server_addrs`]).
    pub nats_url: String,
    /// The JetStream stream, also the first token of its subjects.
    pub stream: String,
    /// How many servers keep a copy of the stream when the relay creates it.
    pub replicas: usize,
    /// Number of subject partitions (`hash(aggregate id) mod partitions`).
    pub partitions: u32,
    /// Most events read and published per batch.
    pub batch_max: usize,
    /// The fallback poll when no notification arrives.
    pub poll_interval: Duration,
    /// How often a standby tries to take the lock.
    pub standby_retry: Duration,
    /// How long a publish waits for JetStream's ack.
    pub ack_timeout: Duration,
    /// The longest delay between two retries after a failure.
    pub backoff_max: Duration,
    /// How often the lag and horizon metrics are refreshed.
    pub metrics_interval: Duration,
    /// A horizon held back longer than this is logged as a stall.
    pub stall_warn_after: Duration,
    /// This instance's name in logs, Postgres (`application_name`) and NATS.
    pub instance: String,
}

impl RelayConfig {
    /// The defaults for `stream` on the NATS server at `nats_url`.
    pub fn new(nats_url: impl Into<String>, stream: impl Into<String>) -> Self {
        // The random tail of a v7 id tells two instances of one process apart.
        let id = uuid::Uuid::now_v7().simple().to_string();
        Self {
            nats_url: nats_url.into(),
            stream: stream.into(),
            replicas: 1,
            partitions: fanout::DEFAULT_PARTITIONS,
            batch_max: 1_000,
            poll_interval: Duration::from_millis(500),
            standby_retry: Duration::from_secs(3),
            ack_timeout: Duration::from_secs(5),
            backoff_max: Duration::from_secs(5),
            metrics_interval: Duration::from_secs(1),
            stall_warn_after: Duration::from_secs(5),
            instance: format!("{}-{}", std::process::id(), &id[24..]),
        }
    }

    /// The same configuration with every value within its bounds.
    fn bounded(mut self) -> Self {
        let clamp = |value: Duration, low: u64, high: u64| {
            value.clamp(Duration::from_millis(low), Duration::from_millis(high))
        };
        self.partitions = self.partitions.clamp(1, fanout::MAX_PARTITIONS);
        self.replicas = self.replicas.clamp(1, crate::nats::MAX_REPLICAS);
        self.batch_max = self.batch_max.clamp(1, MAX_BATCH);
        self.poll_interval = clamp(self.poll_interval, 10, 60_000);
        self.standby_retry = clamp(self.standby_retry, 10, 60_000);
        self.ack_timeout = clamp(self.ack_timeout, 100, 60_000);
        self.backoff_max = clamp(self.backoff_max, 100, 60_000);
        self.metrics_interval = clamp(self.metrics_interval, 100, 60_000);
        self.stall_warn_after = clamp(self.stall_warn_after, 100, 3_600_000);
        self
    }
}

/// Why a relay step failed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// A stream name must work as a JetStream name and as a subject token.
    #[error("`{0}` is not a valid stream name (1 to 64 of A-Z, a-z, 0-9, `_` and `-`)")]
    InvalidStreamName(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("NATS ({what}): {source}")]
    Nats {
        what: &'static str,
        #[source]
        source: async_nats::Error,
    },
    #[error("timed out: {0}")]
    TimedOut(&'static str),
    #[error(transparent)]
    Config(#[from] crate::nats::NatsConfigError),
    /// The stream belongs to another database, or is partitioned another
    /// way: publishing would corrupt it, so the relay does not.
    #[error(transparent)]
    Refused(#[from] crate::binding::BindingError),
}

impl RelayError {
    fn nats(what: &'static str, source: impl Into<async_nats::Error>) -> Self {
        Self::Nats {
            what,
            source: source.into(),
        }
    }
}

/// Checks that `stream` can name a JetStream stream and lead its subjects.
pub fn validate_stream_name(stream: &str) -> Result<(), RelayError> {
    let valid = (1..=64).contains(&stream.len())
        && stream
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-');
    if valid {
        Ok(())
    } else {
        Err(RelayError::InvalidStreamName(
            stream.chars().take(80).collect(),
        ))
    }
}

/// The configuration of the stream `stream` fed by the database `database`
/// (named in its description): its subjects, file storage, limits, the
/// duplicate window that makes re-publishing harmless, and how many servers
/// of a cluster keep a copy (`replicas`).
pub fn stream_config(stream: &str, replicas: usize, database: Uuid) -> stream::Config {
    stream::Config {
        name: stream.to_owned(),
        description: Some(crate::binding::describe(database)),
        subjects: vec![fanout::stream_subjects(stream)],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::Old,
        max_age: STREAM_MAX_AGE,
        max_bytes: STREAM_MAX_BYTES,
        max_messages: -1,
        max_messages_per_subject: -1,
        max_consumers: -1,
        duplicate_window: DUPLICATE_WINDOW,
        num_replicas: replicas,
        ..Default::default()
    }
}

/// Creates the stream `stream` of the database `database` with `replicas`
/// copies unless it exists (an existing stream is left as it is: see
/// [`replicas_mismatch`]), and refuses a stream another database created.
/// The relay and the projectors both call it, so whichever starts first
/// creates it.
pub async fn ensure_stream(
    js: &jetstream::Context,
    stream: &str,
    replicas: usize,
    database: Uuid,
) -> Result<stream::Stream, RelayError> {
    validate_stream_name(stream)?;
    crate::nats::validate_replicas(replicas)?;
    let handle = js
        .get_or_create_stream(stream_config(stream, replicas, database))
        .await
        .map_err(|error| RelayError::nats("creating the stream", error))?;
    let description = handle.cached_info().config.description.clone();
    crate::binding::check_owner(stream, description.as_deref(), database)?;
    Ok(handle)
}

/// A stream that exists with another replica count than configured. Souk
/// never changes an existing stream (scaling a stream is an operator's
/// decision, `nats stream edit --replicas`): the relay and the projectors
/// work on, warn, and the command API's `/health` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicasMismatch {
    /// What the stream has.
    pub actual: usize,
    /// What `SOUK_STREAM_REPLICAS` asks for.
    pub configured: usize,
}

impl std::fmt::Display for ReplicasMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the stream has {} replica(s) but SOUK_STREAM_REPLICAS is {}; change one of them (nats stream edit --replicas)",
            self.actual, self.configured
        )
    }
}

/// Compares an ensured stream's replica count with the configured one.
pub fn replicas_mismatch(stream: &stream::Stream, configured: usize) -> Option<ReplicasMismatch> {
    let actual = stream.cached_info().config.num_replicas.max(1);
    (actual != configured).then_some(ReplicasMismatch { actual, configured })
}

/// The advisory lock key of the relay of `stream`: that of the name
/// `souk-relay:<stream>`.
pub fn lock_key(stream: &str) -> i64 {
    leader::lock_key(&format!("souk-relay:{stream}"))
}

/// The subject token of an aggregate type. Souk's types are plain words; a
/// character a subject cannot carry becomes `_` rather than stalling the
/// relay on an event it could never publish.
fn subject_token(aggregate_type: &str) -> String {
    if aggregate_type.is_empty() {
        return "_".to_owned();
    }
    aggregate_type
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// What a relay is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// Not yet holding or refused the lock.
    #[default]
    Starting,
    /// Another instance holds the lock; this one waits to take over.
    Standby,
    /// Holds the lock and publishes.
    Leader,
    /// Shut down.
    Stopped,
}

/// A relay's state, for tests and health checks.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RelayStatus {
    pub role: Role,
    /// Whether the leader's NATS connection is up.
    pub nats_connected: bool,
    /// The last event whose publish was acknowledged and recorded.
    pub checkpoint: Position,
    /// Events this instance published and JetStream stored.
    pub published: u64,
    /// Publishes JetStream answered as duplicates of an event it held (each
    /// a failure: the relay syncs with the stream again).
    pub duplicates: u64,
    /// Runs of publishing that failed (a publish lost, refused or out of
    /// sequence, NATS gone): each ends with a sync with the stream.
    pub failures: u64,
    /// Messages of another publisher a sync found in the stream (the relay
    /// must be its only publisher).
    pub foreign_messages: u64,
    /// Committed events after the checkpoint, at the last measure.
    pub lag_events: i64,
    /// Age of the event-writing transaction holding the horizon back.
    pub horizon_age_seconds: f64,
    /// The stream exists with another replica count than configured.
    pub replicas_mismatch: Option<ReplicasMismatch>,
    /// Why the relay refuses to publish (see [`crate::binding`]), while it
    /// does.
    pub refused: Option<crate::binding::BindingError>,
}

/// One relay instance. [`Relay::run_until`] leads or stands by until its
/// signal completes.
#[derive(Debug)]
pub struct Relay {
    pool: PgPool,
    config: RelayConfig,
    status: watch::Sender<RelayStatus>,
    /// Woken by commits (notifications, and this process's writers).
    wake: Arc<Notify>,
    /// This process's writers, told while this relay leads.
    writers: Option<CommitSignal>,
}

impl Relay {
    pub fn new(pool: PgPool, config: RelayConfig) -> Self {
        describe_metrics();
        Self {
            pool,
            config: config.bounded(),
            status: watch::Sender::new(RelayStatus::default()),
            wake: Arc::new(Notify::new()),
            writers: None,
        }
    }

    /// The same relay, woken at once by the commits of `writers` (the event
    /// store of this process), which stop sending `NOTIFY` while it leads.
    pub fn woken_by(mut self, writers: &CommitSignal) -> Self {
        self.wake = writers.local();
        self.writers = Some(writers.clone());
        self
    }

    fn set_leading(&self, leading: bool) {
        if let Some(writers) = &self.writers {
            writers.set_consumer_here(leading);
        }
        metrics::gauge!("souk_relay_leader", &self.labels()).set(f64::from(u8::from(leading)));
    }

    /// Follows this relay's state.
    pub fn status(&self) -> watch::Receiver<RelayStatus> {
        self.status.subscribe()
    }

    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    /// Leads (or stands by) until `signal` completes. Whatever is in flight
    /// then is dropped: the checkpoint only ever names acknowledged events.
    pub async fn run_until(self, signal: impl Future<Output = ()>) {
        tracing::info!(
            stream = %self.config.stream,
            instance = %self.config.instance,
            "relay starting"
        );
        tokio::select! {
            biased;
            () = signal => {}
            () = self.run_forever() => {}
        }
        if self.status.borrow().role == Role::Leader {
            self.set_leading(false);
            metrics::gauge!("souk_relay_connected", &self.labels()).set(0.0);
        }
        self.status.send_modify(|status| {
            status.role = Role::Stopped;
            status.nats_connected = false;
        });
        tracing::info!(stream = %self.config.stream, instance = %self.config.instance, "relay stopped");
    }

    fn labels(&self) -> [(&'static str, String); 1] {
        [("stream", self.config.stream.clone())]
    }

    /// Records how long a step of a batch took since `started`.
    fn step_done(&self, step: &'static str, started: Instant) {
        metrics::histogram!("souk_relay_step_seconds", "stream" => self.config.stream.clone(), "step" => step)
            .record(started.elapsed().as_secs_f64());
    }

    async fn run_forever(&self) {
        let mut backoff = Backoff::new(self.config.backoff_max);
        let mut unreachable = Every::new(WARN_EVERY);
        let mut refusing = Every::new(WARN_EVERY);
        let mut standby: Option<PgConnection> = None;
        loop {
            let connection = match standby.take() {
                Some(connection) => connection,
                None => match self.connect_lock_session().await {
                    Ok(connection) => connection,
                    Err(error) => {
                        if unreachable.ready() {
                            tracing::warn!(stream = %self.config.stream, %error, "relay cannot reach Postgres; retrying");
                        }
                        tokio::time::sleep(backoff.next_delay()).await;
                        continue;
                    }
                },
            };
            match try_lock(connection, &self.config.stream).await {
                Ok(Ok(lock)) => {
                    backoff.reset();
                    tracing::info!(stream = %self.config.stream, instance = %self.config.instance, "relay took the lead");
                    let ended = self.lead(lock).await;
                    self.set_leading(false);
                    metrics::gauge!("souk_relay_connected", &self.labels()).set(0.0);
                    self.status.send_modify(|status| {
                        status.role = Role::Starting;
                        status.nats_connected = false;
                    });
                    if let RelayError::Refused(refused) = ended {
                        // A configuration to fix, not an outage: say so
                        // loudly, publish nothing, look again now and then.
                        if refusing.ready() {
                            tracing::error!(stream = %self.config.stream, error = %refused, "relay refuses to publish");
                        }
                        self.status
                            .send_modify(|status| status.refused = Some(refused));
                        tokio::time::sleep(REFUSED_RECHECK).await;
                        continue;
                    }
                    tracing::warn!(stream = %self.config.stream, error = %ended, "relay lost its lead; taking the lock again");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Ok(Err(connection)) => {
                    if self.status.borrow().role != Role::Standby {
                        tracing::info!(stream = %self.config.stream, instance = %self.config.instance, "another relay leads; standing by");
                        self.status
                            .send_modify(|status| status.role = Role::Standby);
                    }
                    standby = Some(connection);
                    tokio::time::sleep(self.config.standby_retry).await;
                }
                Err(error) => {
                    if unreachable.ready() {
                        tracing::warn!(stream = %self.config.stream, %error, "relay cannot take its lock; retrying");
                    }
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }

    /// The relay's own options: the pool's, named after this instance.
    fn connect_options(&self) -> PgConnectOptions {
        (*self.pool.connect_options())
            .clone()
            .application_name(&format!("souk-relay {}", self.config.instance))
    }

    async fn connect_lock_session(&self) -> Result<PgConnection, RelayError> {
        // The checkpoint is written on this session. It need not wait for the
        // WAL flush: a checkpoint a Postgres crash loses only makes the relay
        // publish those events again, which JetStream drops as duplicates of
        // their `Nats-Msg-Id` and projectors skip by position.
        bounded(
            "connecting the lock session",
            self.connect_options()
                .options([("synchronous_commit", "off")])
                .connect(),
        )
        .await
    }

    /// Publishes as the leader until the lock's session is lost; returns why.
    async fn lead(&self, mut lock: PgConnection) -> RelayError {
        let config = &self.config;
        let stream = config.stream.as_str();
        self.set_leading(true);
        metrics::gauge!("souk_relay_connected", &self.labels()).set(0.0);
        self.status.send_modify(|status| status.role = Role::Leader);

        let wake = self.wake.clone();
        let _listener = AbortOnDrop(tokio::spawn(listen(self.connect_options(), wake.clone())));

        let mut checkpoint = match load_checkpoint(&mut lock, stream).await {
            Ok(checkpoint) => checkpoint,
            Err(error) => return error,
        };
        self.show_checkpoint(checkpoint);
        let database = match bounded(
            "reading the database's identity",
            crate::binding::database_id(&mut lock),
        )
        .await
        {
            Ok(database) => database,
            Err(error) => return error,
        };
        match bounded(
            "binding the stream's partitions",
            crate::binding::bind_partitions(&mut lock, stream, config.partitions),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(refused)) => return refused.into(),
            Err(error) => return error,
        }

        let mut nats: Option<Connected> = None;
        let mut stream_handle: Option<stream::Stream> = None;
        let mut backoff = Backoff::new(config.backoff_max);
        let mut nats_down = Every::new(WARN_EVERY);
        let mut failing = Every::new(WARN_EVERY);
        let mut stall = Stall::new(config.stall_warn_after);
        let mut observed_at: Option<Instant> = None;
        let mut lock_used_at = Instant::now();
        let mut prefetched = None;
        // Batches sent whose acks are not all in yet, oldest first, and where
        // the last message sent ends the stream: `None` until the relay has
        // synced with the stream, and again after any failure.
        let mut in_flight: VecDeque<InFlight> = VecDeque::new();
        let mut cursor: Option<Cursor> = None;
        // How far the stream is known to hold every event in order (from
        // the last sync and the acks since), for the sync after a failure.
        let mut stored: Option<Cursor> = None;
        // Events the stream holds already past a message of another
        // publisher (see `Relay::sync`): not sent again.
        let mut skip: HashSet<Uuid> = HashSet::new();

        loop {
            if observed_at.is_none_or(|at| at.elapsed() >= config.metrics_interval) {
                observed_at = Some(Instant::now());
                self.observe(&mut lock, checkpoint, &mut stall).await;
            }
            if lock_used_at.elapsed() >= LOCK_CHECK_EVERY {
                if let Err(error) = bounded("checking the lock session", lock.ping()).await {
                    return error;
                }
                lock_used_at = Instant::now();
            }

            let (client, js, api) = match &nats {
                Some(connected) => connected,
                None => match self.connect_nats().await {
                    Ok(connected) => {
                        tracing::info!(stream, url = %redacted(&config.nats_url), "relay connected to NATS");
                        &*nats.insert(connected)
                    }
                    Err(error) => {
                        if nats_down.ready() {
                            tracing::warn!(stream, url = %redacted(&config.nats_url), %error, "NATS is unreachable; events wait in Postgres");
                        }
                        tokio::time::sleep(backoff.next_delay().min(fanout::RECONNECT_DELAY_MAX))
                            .await;
                        continue;
                    }
                },
            };
            let connected = client.connection_state() == async_nats::connection::State::Connected;
            metrics::gauge!("souk_relay_connected", &self.labels())
                .set(f64::from(u8::from(connected)));
            self.status
                .send_modify(|status| status.nats_connected = connected);
            if !connected {
                if nats_down.ready() {
                    tracing::warn!(stream, url = %redacted(&config.nats_url), "NATS connection lost; events wait in Postgres");
                }
                // What was in flight may or may not be stored: the relay
                // syncs with the stream once NATS is back.
                if cursor.is_some() {
                    self.failed();
                }
                in_flight.clear();
                prefetched = None;
                cursor = None;
                // The client reconnects by itself; looking at its state costs
                // nothing, so publishing resumes as soon as it is back.
                tokio::time::sleep(NATS_STATE_POLL).await;
                continue;
            }
            let handle = match &stream_handle {
                Some(handle) => handle,
                None => match self.ready_stream(api, database).await {
                    Ok(handle) => &*stream_handle.insert(handle),
                    Err(error @ RelayError::Refused(_)) => return error,
                    Err(error) => {
                        if failing.ready() {
                            tracing::warn!(stream, %error, "relay cannot create its stream; retrying");
                        }
                        // An unanswered request has waited API_TIMEOUT
                        // already: a restarted cluster is asked again soon
                        // after its leaders are elected.
                        tokio::time::sleep(backoff.next_delay().min(fanout::RECONNECT_DELAY_MAX))
                            .await;
                        continue;
                    }
                },
            };
            let at = match cursor {
                Some(at) => at,
                None => match self.sync(&mut lock, handle, &mut checkpoint, stored).await {
                    Ok((at, held)) => {
                        stored = Some(at);
                        skip = held;
                        prefetched = None;
                        *cursor.insert(at)
                    }
                    Err(error @ RelayError::Nats { .. }) => {
                        if failing.ready() {
                            tracing::warn!(stream, %error, "relay cannot read where its stream ends; retrying");
                        }
                        // The stream may be gone: look it up (or create it)
                        // again.
                        stream_handle = None;
                        tokio::time::sleep(backoff.next_delay().min(fanout::RECONNECT_DELAY_MAX))
                            .await;
                        continue;
                    }
                    // A refusal, or the lock's session failing.
                    Err(error) => return error,
                },
            };

            // A batch read ahead starts right after the last event sent, as a
            // read now would.
            let read = match prefetched.take() {
                Some(read) => Ok(read),
                None => self.read_after(&mut lock, at.after).await,
            };
            let (horizon, mut batch) = match read {
                Ok(read) => read,
                // The read runs on the lock's session: an error may mean
                // that session is gone, and with it the lead.
                Err(error) => return error,
            };
            lock_used_at = Instant::now();
            if batch.is_empty() && in_flight.is_empty() {
                self.idle(&wake, horizon).await;
                continue;
            }
            let read_up_to = batch.last().map_or(at.after, |event| event.position);
            let full = batch.len() >= config.batch_max;
            if !skip.is_empty() {
                batch.retain(|event| !skip.remove(&event.event_id));
            }

            // A full batch says more waits: it stays in flight while the
            // batch before it is confirmed and checkpointed and the next one
            // is read, so JetStream always has a batch to store (catching up
            // after an outage is bound by the slowest of read, publish and
            // checkpoint, not their sum). A partial batch means the relay
            // has caught up: it is confirmed and checkpointed at once, so
            // that the checkpoint follows the last publish.
            let mut confirmed = Confirmed::default();
            let sent = if batch.is_empty() {
                Ok(Cursor {
                    after: read_up_to,
                    sequence: at.sequence,
                })
            } else {
                self.send(js, &batch, at.sequence, read_up_to)
                    .await
                    .map(|sent| {
                        let next = sent.end();
                        in_flight.push_back(sent);
                        next
                    })
            };
            let (confirmation, read_ahead) = match sent {
                Ok(next) => {
                    cursor = Some(next);
                    let keep = usize::from(full);
                    let read_ahead = async {
                        if next.after == at.after {
                            None
                        } else {
                            self.read_after(&mut lock, next.after).await.ok()
                        }
                    };
                    tokio::join!(
                        self.confirm(&mut in_flight, keep, &mut stored, &mut confirmed),
                        read_ahead
                    )
                }
                Err(error) => (Err(error), None),
            };
            if let Err(error) = confirmation {
                // Whatever is in flight may be stored or not: the next run
                // syncs with the stream and goes on from its end.
                in_flight.clear();
                cursor = None;
                self.failed();
                if self.publish_failed(&error, checkpoint, &mut failing) {
                    stream_handle = None;
                }
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
            if let Some(last) = confirmed.last {
                let checkpoint_at = Instant::now();
                if let Err(error) =
                    store_checkpoint(&mut lock, stream, last, confirmed.events).await
                {
                    return error;
                }
                self.step_done("checkpoint", checkpoint_at);
                lock_used_at = Instant::now();
                // After a sync found the stream behind the checkpoint, the
                // events it lost are published again below the checkpoint.
                checkpoint = checkpoint.max(last);
                backoff.reset();
                metrics::counter!("souk_relay_published_total", &self.labels())
                    .increment(confirmed.events as u64);
                self.show_checkpoint(checkpoint);
                self.status
                    .send_modify(|status| status.published += confirmed.events as u64);
            }
            prefetched = read_ahead;
        }
    }

    /// Shows where the checkpoint is, in the status and the metrics.
    fn show_checkpoint(&self, checkpoint: Position) {
        metrics::gauge!("souk_relay_checkpoint_position", &self.labels())
            .set(checkpoint.position as f64);
        self.status
            .send_modify(|status| status.checkpoint = checkpoint);
    }

    /// Counts a run of publishing that failed.
    fn failed(&self) {
        metrics::counter!("souk_relay_failures_total", &self.labels()).increment(1);
        self.status.send_modify(|status| status.failures += 1);
    }

    /// Ensures the stream (see [`ensure_stream`]) and shows a replica count
    /// other than configured.
    async fn ready_stream(
        &self,
        js: &jetstream::Context,
        database: Uuid,
    ) -> Result<stream::Stream, RelayError> {
        let config = &self.config;
        let handle = ensure_stream(js, &config.stream, config.replicas, database).await?;
        let mismatch = replicas_mismatch(&handle, config.replicas);
        if let Some(mismatch) = mismatch {
            tracing::warn!(
                stream = %config.stream,
                actual = mismatch.actual,
                configured = mismatch.configured,
                "{mismatch}"
            );
        }
        self.status.send_modify(|status| {
            status.replicas_mismatch = mismatch;
            status.refused = None;
        });
        Ok(handle)
    }

    /// Starts a run of publishing: reads where the stream ends, checks that
    /// its last event is one of this database's, and decides where to go on
    /// ([`resume_point`]). Events an earlier leader published past the
    /// checkpoint are checkpointed here (`checkpoint` moves with them).
    ///
    /// After a failure (`known`: how far the stream held every event in
    /// order), the messages stored since are checked first: a message of
    /// another publisher in the slot of one of the relay's lets the later
    /// ones in, each expecting the sequence before it. Publishing then goes
    /// on after the last event known in order, and the events the stream
    /// holds already past that message are returned, not to be sent again.
    ///
    /// A NATS error is [`RelayError::Nats`]; any other error ends the lead.
    async fn sync(
        &self,
        lock: &mut PgConnection,
        handle: &stream::Stream,
        checkpoint: &mut Position,
        known: Option<Cursor>,
    ) -> Result<(Cursor, HashSet<Uuid>), RelayError> {
        let stream = self.config.stream.as_str();
        let tail = read_tail(handle).await?;
        let sequence = tail.sequence;
        if let Some(known) = known
            && let Some(held) = self
                .stored_past_foreign(&mut *lock, handle, known, sequence)
                .await?
        {
            let foreign_at = known.sequence + 1;
            metrics::counter!("souk_relay_foreign_messages_total", &self.labels()).increment(1);
            self.status
                .send_modify(|status| status.foreign_messages += 1);
            if held.is_empty() {
                tracing::warn!(
                    stream,
                    sequence = foreign_at,
                    "another publisher wrote to the stream (the relay must be its only publisher): going on after its message"
                );
            } else {
                tracing::error!(stream, sequence = foreign_at, passed = held.len(), after = %known.after, "another publisher wrote to the stream (the relay must be its only publisher) while the relay published, and later events were stored past a refused one: publishing what they passed after them, out of order; projections that applied a later event of its partition skipped it, rebuild them");
            }
            let resume = Cursor {
                after: known.after,
                sequence,
            };
            return Ok((resume, held));
        }
        check_tail(&mut *lock, stream, &tail).await?;
        let resume = resume_point(*checkpoint, &tail);
        let at = *checkpoint;
        match resume {
            Resume::AtCheckpoint => {
                tracing::debug!(stream, sequence, %at, "the stream ends at the relay's checkpoint");
            }
            Resume::Ahead(last) => {
                tracing::info!(stream, sequence, %at, stream_ends_at = %last, "the stream holds events past the checkpoint (an earlier leader published them): checkpointing them, not publishing them again");
                store_checkpoint(&mut *lock, stream, last, 0).await?;
                *checkpoint = last;
                self.show_checkpoint(last);
            }
            Resume::Behind(last) => {
                tracing::warn!(stream, sequence, %at, stream_ends_at = %last, "the stream lost events the relay's checkpoint says it published (a store lost or restored): publishing them again after its last event");
            }
            Resume::Unknown if sequence == 0 && *checkpoint == Position::START => {}
            Resume::Unknown => {
                tracing::warn!(stream, sequence, %at, "the stream's last messages are gone (purged, expired, or the stream was made again) or not the relay's: publishing after the checkpoint; what the stream lost before it is not published again");
            }
        }
        let resume = Cursor {
            after: resume.after(*checkpoint),
            sequence,
        };
        Ok((resume, HashSet::new()))
    }

    /// Whether a message of another publisher came into the stream after
    /// `known` (up to `last_sequence`): `None` when the message after it is
    /// the relay's next event (or there is none), else the relay's events
    /// stored from that message on.
    async fn stored_past_foreign(
        &self,
        lock: &mut PgConnection,
        handle: &stream::Stream,
        known: Cursor,
        last_sequence: u64,
    ) -> Result<Option<HashSet<Uuid>>, RelayError> {
        let next = known.sequence + 1;
        if last_sequence < next {
            return Ok(None);
        }
        if let Some((_, position)) = message_event(handle, next).await?
            && position > known.after
            && !events_between(&mut *lock, known.after, position).await?
        {
            return Ok(None);
        }
        let mut held = HashSet::new();
        for sequence in next..=last_sequence.min(next + WINDOW_MAX) {
            if let Some((event_id, _)) = message_event(handle, sequence).await? {
                held.insert(event_id);
            }
        }
        Ok(Some(held))
    }

    /// The next batch of the global order after `after`, below the horizon,
    /// read on the lock's session: the relay never queues for a connection
    /// behind the commands of the pool it was given (under load their
    /// queue, not the two queries, was most of each batch's read).
    async fn read_after(
        &self,
        lock: &mut PgConnection,
        after: Position,
    ) -> Result<(global::Horizon, Vec<RecordedEvent>), RelayError> {
        let read_at = Instant::now();
        let read = async {
            let horizon = global::horizon(&mut *lock).await?;
            let events =
                global::read_below(&mut *lock, after, horizon, self.config.batch_max as i64)
                    .await?;
            Ok::<_, sqlx::Error>((horizon, events))
        };
        let read = bounded("reading the global order", read).await?;
        if !read.1.is_empty() {
            self.step_done("read", read_at);
        }
        Ok(read)
    }

    /// A client, the context the relay publishes through (its acks wait up
    /// to `ack_timeout`) and one for JetStream API requests (the stream
    /// handle's: they wait [`crate::nats::API_TIMEOUT`]).
    async fn connect_nats(&self) -> Result<Connected, RelayError> {
        let config = &self.config;
        let backoff_max = config.backoff_max;
        let client = bounded("connecting to NATS", async {
            async_nats::ConnectOptions::new()
                .name(format!("souk-relay {}", config.instance))
                .connection_timeout(NATS_CONNECT_TIMEOUT)
                .request_timeout(Some(config.ack_timeout))
                .ping_interval(Duration::from_secs(10))
                .reconnect_delay_callback(move |attempts| {
                    fanout::reconnect_delay(attempts).min(backoff_max)
                })
                .connect(crate::nats::server_addrs(&config.nats_url)?)
                .await
                .map_err(|error| RelayError::nats("connecting", error))
        })
        .await?;
        let js = ContextBuilder::new()
            .timeout(config.ack_timeout)
            .ack_timeout(config.ack_timeout)
            .max_ack_inflight(config.batch_max * 2)
            .build(client.clone());
        let api = ContextBuilder::new()
            .timeout(crate::nats::API_TIMEOUT)
            .build(client.clone());
        Ok((client, js, api))
    }

    /// Sends every message of `batch` without waiting for its ack (the
    /// context bounds the acks in flight); the acks are awaited by
    /// [`Relay::confirm`]. The stream's last message is at `after_sequence`
    /// when the first one arrives, and each message expects the one before
    /// it (`Nats-Expected-Last-Sequence`): when one is not stored, JetStream
    /// refuses every later one. Sequence 0 (an empty stream) cannot be
    /// expected: the first message of a stream expects nothing, and its ack
    /// is checked instead. The batch covers the global order up to `last`.
    async fn send(
        &self,
        js: &jetstream::Context,
        batch: &[RecordedEvent],
        after_sequence: u64,
        last: Position,
    ) -> Result<InFlight, PublishFailure> {
        let config = &self.config;
        let sent_at = Instant::now();
        let sending = async {
            let mut acks = Vec::with_capacity(batch.len());
            for (expected_last, event) in (after_sequence..).zip(batch) {
                let subject = fanout::event_subject(
                    &config.stream,
                    &subject_token(&event.aggregate_type),
                    fanout::partition_of(&event.aggregate_id, config.partitions),
                );
                let body = serde_json::to_vec(event).map_err(PublishFailure::Body)?;
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(NATS_MESSAGE_ID, event.event_id.to_string().as_str());
                headers.insert(POSITION_HEADER, event.position.token().as_str());
                if expected_last > 0 {
                    headers.insert(
                        NATS_EXPECTED_LAST_SEQUENCE,
                        expected_last.to_string().as_str(),
                    );
                }
                let ack = js
                    .publish_with_headers(subject, headers, body.into())
                    .await
                    .map_err(|error| PublishFailure::Nats(error.kind(), error.to_string()))?;
                acks.push(ack);
            }
            Ok(acks)
        };
        let acks = tokio::time::timeout(self.batch_timeout(), sending)
            .await
            .unwrap_or(Err(PublishFailure::TimedOut))?;
        Ok(InFlight {
            positions: batch.iter().map(|event| event.position).collect(),
            last,
            first_sequence: after_sequence + 1,
            acks,
            sent_at,
        })
    }

    /// The longest a batch's messages may take to be sent, or its acks to
    /// come back.
    fn batch_timeout(&self) -> Duration {
        self.config.ack_timeout * 2 + Duration::from_secs(5)
    }

    /// Awaits, in order, the acks of the oldest batches in flight until
    /// `keep` remain; adds to `confirmed` the last event they cover and how
    /// many messages JetStream stored, and moves `stored` with each ack.
    /// Each message must be stored at the sequence the relay counted, and
    /// none may be a duplicate: anything else means another publisher
    /// writes the stream.
    async fn confirm(
        &self,
        in_flight: &mut VecDeque<InFlight>,
        keep: usize,
        stored: &mut Option<Cursor>,
        confirmed: &mut Confirmed,
    ) -> Result<(), PublishFailure> {
        while in_flight.len() > keep {
            let Some(batch) = in_flight.pop_front() else {
                break;
            };
            let events = batch.acks.len();
            let end = batch.end();
            let acks = async {
                let messages = (batch.first_sequence..).zip(&batch.positions);
                for ((expected, position), ack) in messages.zip(batch.acks) {
                    let ack = ack
                        .await
                        .map_err(|error| PublishFailure::Nats(error.kind(), error.to_string()))?;
                    if ack.duplicate {
                        return Err(PublishFailure::Duplicate(ack.sequence));
                    }
                    if ack.sequence != expected {
                        return Err(PublishFailure::OutOfSequence {
                            expected,
                            stored: ack.sequence,
                        });
                    }
                    *stored = Some(Cursor {
                        after: *position,
                        sequence: expected,
                    });
                }
                Ok(())
            };
            tokio::time::timeout(self.batch_timeout(), acks)
                .await
                .unwrap_or(Err(PublishFailure::TimedOut))?;
            *stored = Some(end);
            self.step_done("publish", batch.sent_at);
            metrics::histogram!("souk_relay_batch_events", &self.labels()).record(events as f64);
            confirmed.events += events;
            confirmed.last = Some(batch.last);
        }
        Ok(())
    }

    /// Says (at most every [`WARN_EVERY`]) that a publish failed; returns
    /// whether the stream is missing (to be created again).
    fn publish_failed(
        &self,
        error: &PublishFailure,
        checkpoint: Position,
        failing: &mut Every,
    ) -> bool {
        if let PublishFailure::Duplicate(_) = error {
            metrics::counter!("souk_relay_duplicates_total", &self.labels()).increment(1);
            self.status.send_modify(|status| status.duplicates += 1);
        }
        if failing.ready() {
            tracing::warn!(stream = %self.config.stream, %error, at = %checkpoint, "relay publish failed; syncing with the stream and publishing again from its end");
        }
        matches!(error, PublishFailure::Nats(kind, _) if *kind == PublishErrorKind::StreamNotFound)
    }

    /// Waits for a wake-up or the poll interval. While an event writer holds
    /// the horizon back, look again soon instead: a writer that commits
    /// wakes the relay, but one that rolls back does not.
    async fn idle(&self, wake: &Notify, horizon: global::Horizon) {
        let wait = if horizon.writer_running {
            self.config.poll_interval.min(HORIZON_RECHECK)
        } else {
            self.config.poll_interval
        };
        let _ = tokio::time::timeout(wait, wake.notified()).await;
    }

    /// Refreshes the lag and horizon metrics, and logs a stall.
    async fn observe(&self, lock: &mut PgConnection, checkpoint: Position, stall: &mut Stall) {
        let stream = self.config.stream.as_str();
        match bounded("measuring the horizon", global::horizon_lag(&mut *lock)).await {
            Ok(age) => {
                metrics::gauge!("souk_relay_horizon_age_seconds", &self.labels()).set(age);
                self.status
                    .send_modify(|status| status.horizon_age_seconds = age);
                match stall.update(age) {
                    StallNews::Warn => {
                        let holder = bounded(
                            "naming the horizon's holder",
                            oldest_transaction(&mut *lock),
                        )
                        .await
                        .ok()
                        .flatten()
                        .unwrap_or_default();
                        tracing::warn!(
                            stream,
                            horizon_age_seconds = age,
                            pid = holder.pid,
                            database = %holder.database,
                            application = %holder.application,
                            state = %holder.state,
                            "a long-running event-writing transaction holds the relay back: events committed after it began wait until it ends"
                        );
                    }
                    StallNews::Cleared(seconds) => {
                        tracing::info!(
                            stream,
                            stalled_seconds = seconds,
                            "the relay's horizon moves again"
                        );
                    }
                    StallNews::Nothing => {}
                }
            }
            Err(error) => tracing::debug!(stream, %error, "cannot measure the horizon"),
        }
        match bounded("measuring the lag", lag_events(&mut *lock, checkpoint)).await {
            Ok(lag) => {
                metrics::gauge!("souk_relay_lag_events", &self.labels()).set(lag as f64);
                self.status.send_modify(|status| status.lag_events = lag);
            }
            Err(error) => tracing::debug!(stream, %error, "cannot measure the relay's lag"),
        }
    }
}

/// The relay's NATS client and its two JetStream contexts (see
/// `Relay::connect_nats`).
type Connected = (async_nats::Client, jetstream::Context, jetstream::Context);

/// Where publishing goes on: after the event `after`, whose message is
/// (or will be) the stream's last, at `sequence` (0: the stream has none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cursor {
    after: Position,
    sequence: u64,
}

/// A batch whose messages were sent and whose acks are awaited.
struct InFlight {
    /// The events of its messages, in order.
    positions: Vec<Position>,
    /// The end of the global order it covers (past its last event when
    /// events the stream held already were left out): the checkpoint once
    /// every ack up to it is in.
    last: Position,
    /// The stream sequence its first message must be stored at.
    first_sequence: u64,
    acks: Vec<async_nats::jetstream::context::PublishAckFuture>,
    sent_at: Instant,
}

impl InFlight {
    /// Where publishing goes on once this batch is stored.
    fn end(&self) -> Cursor {
        Cursor {
            after: self.last,
            sequence: self.first_sequence + self.acks.len() as u64 - 1,
        }
    }
}

/// What [`Relay::confirm`] found acknowledged.
#[derive(Debug, Default)]
struct Confirmed {
    /// The end of the last batch acknowledged whole.
    last: Option<Position>,
    events: usize,
}

/// Why a batch was not (fully) acknowledged.
#[derive(Debug, thiserror::Error)]
enum PublishFailure {
    #[error("encoding an event: {0}")]
    Body(serde_json::Error),
    /// Also a message JetStream refused because the one before it was not
    /// stored (`PublishErrorKind::WrongLastSequence`).
    #[error("{1}")]
    Nats(PublishErrorKind, String),
    #[error("the batch was not acknowledged in time")]
    TimedOut,
    #[error(
        "JetStream already held the event (at sequence {0}): another publisher writes the stream"
    )]
    Duplicate(u64),
    #[error(
        "a message was stored at sequence {stored}, not {expected}: another publisher writes the stream"
    )]
    OutOfSequence { expected: u64, stored: u64 },
}

/// Where the stream ends, as a sync reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tail {
    /// The stream's last sequence (0: nothing was ever stored).
    sequence: u64,
    /// The event of the last message (its `Nats-Msg-Id` and
    /// [`POSITION_HEADER`]), when that message is still there and a relay
    /// published it.
    event: Option<(Uuid, Position)>,
}

/// How a run of publishing goes on from where the stream ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resume {
    /// The stream ends with the checkpoint's event: publish after it.
    AtCheckpoint,
    /// The stream holds events past the checkpoint (an earlier leader
    /// published them and lost its lead before checkpointing them):
    /// checkpoint its last event and publish after it.
    Ahead(Position),
    /// The stream ends before the checkpoint: it lost events (a store lost,
    /// or restored from a backup). Publish them again after its last event,
    /// so that it stays a gapless prefix; projectors skip those they applied.
    Behind(Position),
    /// The stream names no last event: it is empty (new, or deleted and
    /// made again), its last message is gone (purged or expired), or that
    /// message is not the relay's. Publish after the checkpoint: a stream
    /// emptied on purpose is not filled again with the whole history.
    Unknown,
}

impl Resume {
    /// The event after which publishing goes on.
    fn after(self, checkpoint: Position) -> Position {
        match self {
            Self::AtCheckpoint | Self::Unknown => checkpoint,
            Self::Ahead(last) | Self::Behind(last) => last,
        }
    }
}

/// Where a run of publishing goes on, given the checkpoint and where the
/// stream ends.
fn resume_point(checkpoint: Position, tail: &Tail) -> Resume {
    match tail.event {
        None => Resume::Unknown,
        Some((_, last)) if last == checkpoint => Resume::AtCheckpoint,
        Some((_, last)) if last > checkpoint => Resume::Ahead(last),
        Some((_, last)) => Resume::Behind(last),
    }
}

/// Reads where `stream` ends: its last sequence, and the last event a
/// relay published, looking back past up to [`TAIL_LOOKBACK`] messages
/// that are gone or another publisher's.
async fn read_tail(stream: &stream::Stream) -> Result<Tail, RelayError> {
    let info = stream
        .get_info()
        .await
        .map_err(|error| RelayError::nats("reading the stream's state", error))?;
    let sequence = info.state.last_sequence;
    let first = sequence.saturating_sub(TAIL_LOOKBACK).max(1);
    for at in (first..=sequence).rev() {
        if let Some(event) = message_event(stream, at).await? {
            return Ok(Tail {
                sequence,
                event: Some(event),
            });
        }
    }
    Ok(Tail {
        sequence,
        event: None,
    })
}

/// The event of message `sequence` of `stream` (its `Nats-Msg-Id` and
/// [`POSITION_HEADER`]): `None` when the message is gone or not a relay's.
async fn message_event(
    stream: &stream::Stream,
    sequence: u64,
) -> Result<Option<(Uuid, Position)>, RelayError> {
    let message = match stream.get_raw_message(sequence).await {
        Ok(message) => message,
        Err(error) if error.kind() == RawMessageErrorKind::NoMessageFound => return Ok(None),
        Err(error) => return Err(RelayError::nats("reading a message of the stream", error)),
    };
    let event_id = message
        .headers
        .get(NATS_MESSAGE_ID)
        .and_then(|id| Uuid::parse_str(id.as_str()).ok());
    let position = message
        .headers
        .get(POSITION_HEADER)
        .and_then(|token| Position::parse_token(token.as_str()).ok());
    Ok(event_id.zip(position))
}

/// Whether any event lies strictly between `after` and `before` in the
/// global order.
async fn events_between(
    lock: &mut PgConnection,
    after: Position,
    before: Position,
) -> Result<bool, RelayError> {
    bounded(
        "looking for events between two",
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM events
                             WHERE (transaction_id, position) > ($1::text::xid8, $2)
                               AND (transaction_id, position) < ($3::text::xid8, $4))",
        )
        .bind(after.transaction_id.to_string())
        .bind(after.position)
        .bind(before.transaction_id.to_string())
        .bind(before.position)
        .fetch_one(&mut *lock),
    )
    .await
}

/// Refuses a stream whose last event this database does not hold at that
/// position: going on after it would skip events, going on before it would
/// store events after later ones.
async fn check_tail(lock: &mut PgConnection, stream: &str, tail: &Tail) -> Result<(), RelayError> {
    let Some((event_id, position)) = tail.event else {
        return Ok(());
    };
    let held: Option<(i64, i64)> = bounded(
        "looking up the stream's last event",
        sqlx::query_as(
            "SELECT transaction_id::text::bigint, position FROM events WHERE event_id = $1",
        )
        .bind(event_id)
        .fetch_optional(&mut *lock),
    )
    .await?;
    let held = held.map(|(transaction_id, position)| Position {
        transaction_id: transaction_id as u64,
        position,
    });
    if held == Some(position) {
        Ok(())
    } else {
        Err(crate::binding::BindingError::UnknownLastEvent {
            stream: stream.to_owned(),
            event_id,
            position,
        }
        .into())
    }
}

/// Takes the relay's lock on `connection`: `Ok(Ok)` holds it, `Ok(Err)`
/// hands the connection back because another session holds it.
async fn try_lock(
    mut connection: PgConnection,
    stream: &str,
) -> Result<Result<PgConnection, PgConnection>, RelayError> {
    let locked = bounded(
        "taking the relay lock",
        leader::try_lead(&mut connection, lock_key(stream)),
    )
    .await?;
    Ok(if locked {
        Ok(connection)
    } else {
        Err(connection)
    })
}

async fn load_checkpoint(lock: &mut PgConnection, stream: &str) -> Result<Position, RelayError> {
    let row: Option<(i64, i64)> = bounded(
        "loading the checkpoint",
        sqlx::query_as("SELECT transaction_id, position FROM relay_checkpoints WHERE stream = $1")
            .bind(stream)
            .fetch_optional(&mut *lock),
    )
    .await?;
    Ok(
        row.map_or(Position::START, |(transaction_id, position)| Position {
            transaction_id: transaction_id as u64,
            position,
        }),
    )
}

/// Stores the checkpoint through the lock's session (a relay whose session
/// died cannot write it), and never moves it back.
async fn store_checkpoint(
    lock: &mut PgConnection,
    stream: &str,
    at: Position,
    published: usize,
) -> Result<(), RelayError> {
    bounded(
        "storing the checkpoint",
        sqlx::query(
            "INSERT INTO relay_checkpoints (stream, transaction_id, position, published, updated_at)
             VALUES ($1, $2, $3, $4, now())
             ON CONFLICT (stream) DO UPDATE
                SET transaction_id = EXCLUDED.transaction_id,
                    position = EXCLUDED.position,
                    published = relay_checkpoints.published + EXCLUDED.published,
                    updated_at = now()
              WHERE (relay_checkpoints.transaction_id, relay_checkpoints.position)
                  < (EXCLUDED.transaction_id, EXCLUDED.position)",
        )
        .bind(stream)
        .bind(at.transaction_id as i64)
        .bind(at.position)
        .bind(published as i64)
        .execute(&mut *lock),
    )
    .await?;
    Ok(())
}

/// Committed events after `after`, counted up to [`LAG_COUNT_MAX`].
async fn lag_events<'c>(db: impl PgExecutor<'c>, after: Position) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM events
                                WHERE (transaction_id, position) > ($1::text::xid8, $2)
                                LIMIT $3) AS pending",
    )
    .bind(after.transaction_id.to_string())
    .bind(after.position)
    .bind(LAG_COUNT_MAX)
    .fetch_one(db)
    .await
}

/// The event-writing transaction holding the horizon back, for the stall log.
#[derive(Debug, Default)]
struct Holder {
    pid: i32,
    database: String,
    application: String,
    state: String,
}

/// `pg_stat_activity`'s pid, datname, application_name and state.
type HolderRow = (i32, Option<String>, Option<String>, Option<String>);

/// The oldest event-writing transaction still running.
async fn oldest_transaction<'c>(db: impl PgExecutor<'c>) -> Result<Option<Holder>, sqlx::Error> {
    let row: Option<HolderRow> = sqlx::query_as(&format!(
        "SELECT pid, datname::text, application_name, state
           FROM pg_stat_activity
          WHERE pid IN ({})
          ORDER BY xact_start
          LIMIT 1",
        global::WRITER_PIDS
    ))
    .fetch_optional(db)
    .await?;
    Ok(row.map(|(pid, database, application, state)| Holder {
        pid,
        database: database.unwrap_or_default(),
        application: application.unwrap_or_default(),
        state: state.unwrap_or_default(),
    }))
}

/// Turns `NOTIFY souk_events` into wake-ups. `Notify` keeps one permit, so
/// a burst of commits wakes the relay once. Runs until aborted.
async fn listen(options: PgConnectOptions, wake: Arc<Notify>) {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .acquire_timeout(DB_TIMEOUT)
        .connect_lazy_with(options);
    loop {
        match PgListener::connect_with(&pool).await {
            Ok(mut listener) => {
                if let Err(error) = listener.listen(NOTIFY_CHANNEL).await {
                    tracing::debug!(%error, "relay cannot listen for commits");
                } else {
                    // Anything committed before LISTEN took effect.
                    wake.notify_one();
                    loop {
                        match listener.recv().await {
                            Ok(_) => wake.notify_one(),
                            Err(error) => {
                                tracing::debug!(%error, "relay listener lost its connection");
                                break;
                            }
                        }
                    }
                }
            }
            Err(error) => tracing::debug!(%error, "relay listener cannot connect"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Runs `future` within [`DB_TIMEOUT`]: no call of the relay waits forever.
async fn bounded<T, E: Into<RelayError>>(
    what: &'static str,
    future: impl Future<Output = Result<T, E>>,
) -> Result<T, RelayError> {
    match tokio::time::timeout(DB_TIMEOUT, future).await {
        Ok(result) => result.map_err(Into::into),
        Err(_) => Err(RelayError::TimedOut(what)),
    }
}

/// A rate limit for repeated log lines: ready once per period.
#[derive(Debug)]
struct Every {
    period: Duration,
    last: Option<Instant>,
}

impl Every {
    fn new(period: Duration) -> Self {
        Self { period, last: None }
    }

    fn ready(&mut self) -> bool {
        let ready = self.last.is_none_or(|last| last.elapsed() >= self.period);
        if ready {
            self.last = Some(Instant::now());
        }
        ready
    }
}

/// Tracks whether the horizon is stalled, to warn while it is (at most every
/// [`WARN_EVERY`]) and say once when it clears.
#[derive(Debug)]
struct Stall {
    threshold_seconds: f64,
    worst_seconds: Option<f64>,
    warn: Every,
}

#[derive(Debug, PartialEq)]
enum StallNews {
    Nothing,
    Warn,
    Cleared(f64),
}

impl Stall {
    fn new(threshold: Duration) -> Self {
        Self {
            threshold_seconds: threshold.as_secs_f64(),
            worst_seconds: None,
            warn: Every::new(WARN_EVERY),
        }
    }

    fn update(&mut self, age_seconds: f64) -> StallNews {
        if age_seconds >= self.threshold_seconds {
            let worst = self.worst_seconds.get_or_insert(age_seconds);
            *worst = worst.max(age_seconds);
            if self.warn.ready() {
                return StallNews::Warn;
            }
            StallNews::Nothing
        } else if let Some(worst) = self.worst_seconds.take() {
            self.warn = Every::new(WARN_EVERY);
            StallNews::Cleared(worst)
        } else {
            StallNews::Nothing
        }
    }
}

/// Aborts a task when its owner goes away.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn describe_metrics() {
    static DESCRIBED: std::sync::Once = std::sync::Once::new();
    DESCRIBED.call_once(|| {
        metrics::describe_counter!(
            "souk_relay_published_total",
            "Events the relay published and JetStream stored."
        );
        metrics::describe_counter!(
            "souk_relay_duplicates_total",
            "Publishes JetStream answered as duplicates of an event it held (another publisher writes the stream; the relay syncs again)."
        );
        metrics::describe_counter!(
            "souk_relay_foreign_messages_total",
            "Messages of another publisher the relay found in its stream after a failure (the relay must be its only publisher)."
        );
        metrics::describe_counter!(
            "souk_relay_failures_total",
            "Runs of publishing that failed (a publish lost, refused or out of sequence, NATS gone); each ends with a sync with the stream."
        );
        metrics::describe_histogram!(
            "souk_relay_step_seconds",
            metrics::Unit::Seconds,
            "Time of each step of a published batch: `read` (horizon and events), `publish` (until every ack), `checkpoint`."
        );
        metrics::describe_histogram!(
            "souk_relay_batch_events",
            "Events per published batch."
        );
        metrics::describe_gauge!(
            "souk_relay_checkpoint_position",
            "Global position of the last event the relay published."
        );
        metrics::describe_gauge!(
            "souk_relay_lag_events",
            "Committed events after the relay's checkpoint (counted up to a million)."
        );
        metrics::describe_gauge!(
            "souk_relay_horizon_age_seconds",
            "Age of the oldest running writing transaction: the relay cannot pass events committed after it began."
        );
        metrics::describe_gauge!(
            "souk_relay_connected",
            "1 while the leading relay is connected to NATS."
        );
        metrics::describe_gauge!(
            "souk_relay_leader",
            "1 while this process's relay holds the lock of its stream."
        );
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names_must_be_subject_tokens() {
        assert!(validate_stream_name("souk").is_ok());
        assert!(validate_stream_name("souk_test_0123abcd-x").is_ok());
        for bad in ["", "a.b", "a b", "a*", "a>", &"x".repeat(65)] {
            assert!(validate_stream_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_stream_holds_its_subjects_with_a_duplicate_window() {
        let config = stream_config("souk", 3, Uuid::nil());
        assert_eq!(config.num_replicas, 3);
        assert_eq!(config.subjects, vec!["souk.events.>".to_owned()]);
        assert_eq!(config.storage, stream::StorageType::File);
        assert!(config.duplicate_window >= Duration::from_secs(120));
        assert!(config.max_age >= config.duplicate_window);
        assert!(config.max_bytes > 0);
    }

    #[test]
    fn lock_keys_are_stable_and_differ_by_stream() {
        // Pinned: a change would let an old and a new relay lead together.
        assert_eq!(lock_key("souk"), lock_key("souk"));
        assert_ne!(lock_key("souk"), lock_key("souk2"));
        // FNV-1a of `souk-relay:souk`, computed independently.
        assert_eq!(lock_key("souk"), 5440779838616120125);
    }

    #[test]
    fn aggregate_types_become_subject_tokens() {
        assert_eq!(subject_token("Order"), "Order");
        assert_eq!(subject_token("Product.Timeline *>"), "Product_Timeline___");
        assert_eq!(subject_token(""), "_");
    }

    #[test]
    fn configurations_are_bounded() {
        let mut config = RelayConfig::new("nats://127.0.0.1:4222", "souk");
        config.partitions = 0;
        config.batch_max = 1_000_000;
        config.poll_interval = Duration::ZERO;
        config.replicas = 9;
        let config = config.bounded();
        assert_eq!(config.partitions, 1);
        assert_eq!(config.replicas, crate::nats::MAX_REPLICAS);
        assert_eq!(config.batch_max, MAX_BATCH);
        assert!(config.poll_interval >= Duration::from_millis(10));
    }

    #[test]
    fn a_run_of_publishing_goes_on_after_the_streams_last_event_unless_it_names_none() {
        let at = |position| Position {
            transaction_id: 7,
            position,
        };
        let tail = |position: Option<i64>| Tail {
            sequence: 40,
            event: position.map(|position| (Uuid::nil(), at(position))),
        };
        let checkpoint = at(30);
        assert_eq!(
            resume_point(checkpoint, &tail(Some(30))),
            Resume::AtCheckpoint
        );
        // An earlier leader published past its checkpoint: nothing again.
        assert_eq!(
            resume_point(checkpoint, &tail(Some(35))),
            Resume::Ahead(at(35))
        );
        assert_eq!(Resume::Ahead(at(35)).after(checkpoint), at(35));
        // The stream lost events: they are published again, in order.
        assert_eq!(
            resume_point(checkpoint, &tail(Some(20))),
            Resume::Behind(at(20))
        );
        assert_eq!(Resume::Behind(at(20)).after(checkpoint), at(20));
        // Empty, purged, expired or foreign: after the checkpoint.
        assert_eq!(resume_point(checkpoint, &tail(None)), Resume::Unknown);
        assert_eq!(Resume::Unknown.after(checkpoint), checkpoint);
    }

    #[test]
    fn a_stall_warns_while_it_lasts_and_says_when_it_clears() {
        let mut stall = Stall::new(Duration::from_secs(5));
        assert_eq!(stall.update(1.0), StallNews::Nothing);
        assert_eq!(stall.update(6.0), StallNews::Warn);
        assert_eq!(stall.update(7.0), StallNews::Nothing, "rate limited");
        assert_eq!(stall.update(0.5), StallNews::Cleared(7.0));
        assert_eq!(stall.update(0.5), StallNews::Nothing);
        assert_eq!(
            stall.update(9.0),
            StallNews::Warn,
            "a new stall warns at once"
        );
    }
}
