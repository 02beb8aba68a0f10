//! Live notifications for `/notifications/stream`: order status changes for
//! the order's buyer and seller, funds held and released for the wallet's
//! owner.
//!
//! One consumer per process ([`Notifications::run`]) reads the JetStream
//! stream with an ephemeral ordered consumer that starts at new messages
//! (these are live notifications, not a history: a client that reconnects
//! reads the current state from the other routes). It decides each event's
//! recipients from the event itself (`OrderPlaced` names buyer and seller,
//! `WalletOpened` the owner) or, for later events, from a bounded cache of
//! those and then the aggregate's first event in the event store (never
//! from the read models, which may not have applied it yet), and hands the
//! notification to each of the recipients' open streams.
//!
//! A stream resumed with `Last-Event-ID` replays the user's notifications
//! after that position from the event store: of the user's orders and
//! wallets the read models list (changed since about then), and of those
//! whose events the read models have not applied yet, found in the event
//! store by the parties their first event names.
//!
//! Everything is bounded: the number of open streams (in all and per user),
//! each stream's buffer (a client that falls behind gets `event: lagged` and
//! is disconnected, instead of the consumer waiting for it), and the caches.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use axum::response::sse::Event;
use event_store::Position;
use event_store::global::RecordedEvent;
use futures::{Stream, StreamExt};
use http_kit::ApiError;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use uuid::Uuid;

use crate::catch_up::Projection;
use crate::config::Config;

/// Orders and wallets whose parties are remembered without a query.
const CACHE_ENTRIES: usize = 10_000;
/// Longest pause between two attempts to (re)connect the consumer.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Limits and addresses of the notification streams.
#[derive(Debug, Clone)]
pub struct NotificationConfig {
    pub nats_url: String,
    pub stream: String,
    pub max_streams: usize,
    pub max_streams_per_user: usize,
    pub buffer: usize,
    pub keep_alive: Duration,
    /// The projections' partition count (`SOUK_PARTITIONS`): a resumption
    /// reads how far the orders and wallets read models have caught up.
    pub partitions: u32,
}

impl From<&Config> for NotificationConfig {
    fn from(config: &Config) -> Self {
        Self {
            nats_url: config.nats_url.clone(),
            stream: config.stream.clone(),
            max_streams: config.max_notification_streams.max(1),
            max_streams_per_user: config.max_streams_per_user.max(1),
            buffer: config.notification_buffer.max(1),
            keep_alive: Duration::from_secs(config.notification_keep_alive_s.max(1)),
            partitions: config.partitions.max(1),
        }
    }
}

/// How far back a stream resumed with `Last-Event-ID` replays.
pub const REPLAY_WINDOW: chrono::TimeDelta = chrono::TimeDelta::hours(24);
/// Most events one resumption replays; a client further behind gets `reset`.
pub const REPLAY_MAX_EVENTS: i64 = 1_000;
/// Most orders and wallets one resumption looks at.
const REPLAY_MAX_AGGREGATES: i64 = 10_000;
/// Most order and wallet events a resumption scans beyond what the read
/// models have applied; read models further behind give `reset`.
const REPLAY_MAX_UNPROJECTED: i64 = 50_000;

/// One notification, as sent on a stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    /// The SSE event name: `order_status`, `funds_held` or `funds_released`.
    pub event: &'static str,
    /// The event's position (its token is the SSE id).
    pub position: Position,
    pub data: Value,
}

impl Notification {
    fn to_event(&self) -> Event {
        Event::default()
            .event(self.event)
            .id(self.position.token())
            .data(self.data.to_string())
    }
}

/// Where a stream resumes: after the position of the client's
/// `Last-Event-ID`.
#[derive(Debug, Clone, Copy)]
pub struct Resume {
    pub user: Uuid,
    pub after: Position,
}

/// What a resumption sends before the live notifications.
#[derive(Debug)]
enum Replay {
    /// The user's notifications after the position, in order.
    Events(Vec<Notification>),
    /// They cannot be replayed (too old, too many, or unknown): the client
    /// must read the current state again.
    Reset(&'static str),
}

/// The notification hub of one app; cheap to clone.
#[derive(Debug, Clone)]
pub struct Notifications {
    hub: Arc<Hub>,
}

#[derive(Debug)]
struct Hub {
    pool: PgPool,
    config: NotificationConfig,
    streams: Arc<Semaphore>,
    subscribers: Mutex<HashMap<Uuid, Vec<Subscriber>>>,
    next_id: AtomicU64,
    /// Whether the consumer is reading the stream right now.
    live: watch::Sender<bool>,
    /// Set once, at shutdown: every stream ends.
    stopping: watch::Sender<bool>,
}

#[derive(Debug)]
struct Subscriber {
    id: u64,
    sender: mpsc::Sender<Notification>,
    lagged: Arc<AtomicBool>,
}

/// An open stream's registration; unregisters itself when dropped.
#[derive(Debug)]
pub struct Subscription {
    hub: Arc<Hub>,
    user: Uuid,
    id: u64,
    receiver: mpsc::Receiver<Notification>,
    lagged: Arc<AtomicBool>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.remove(self.user, self.id);
        metrics::gauge!("souk_notification_streams").decrement(1.0);
    }
}

impl Hub {
    fn remove(&self, user: Uuid, id: u64) {
        let mut subscribers = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = subscribers.get_mut(&user) {
            list.retain(|subscriber| subscriber.id != id);
            if list.is_empty() {
                subscribers.remove(&user);
            }
        }
    }

    fn has_subscribers(&self) -> bool {
        !self
            .subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// Hands `notification` to each open stream of `user`. A stream whose
    /// buffer is full is marked lagged and dropped from the hub: it sends
    /// what it holds, then `event: lagged`, then ends.
    fn deliver(&self, user: Uuid, notification: &Notification) {
        let mut subscribers = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        let Some(list) = subscribers.get_mut(&user) else {
            return;
        };
        list.retain(
            |subscriber| match subscriber.sender.try_send(notification.clone()) {
                Ok(()) => {
                    metrics::counter!("souk_notifications_sent_total").increment(1);
                    true
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    subscriber.lagged.store(true, Ordering::SeqCst);
                    metrics::counter!("souk_notifications_lagged_total").increment(1);
                    tracing::info!(%user, "a notification stream fell behind; closing it");
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            },
        );
        if list.is_empty() {
            subscribers.remove(&user);
        }
    }
}

impl Notifications {
    pub fn new(pool: PgPool, config: NotificationConfig) -> Self {
        Self {
            hub: Arc::new(Hub {
                pool,
                streams: Arc::new(Semaphore::new(config.max_streams)),
                config,
                subscribers: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
                live: watch::Sender::new(false),
                stopping: watch::Sender::new(false),
            }),
        }
    }

    /// Whether the consumer is reading the stream.
    pub fn is_live(&self) -> bool {
        *self.hub.live.borrow()
    }

    /// Ends every open stream (at shutdown) and refuses new ones.
    pub fn stop(&self) {
        self.hub.stopping.send_replace(true);
    }

    pub fn keep_alive(&self) -> Duration {
        self.hub.config.keep_alive
    }

    /// Opens a stream for `user`, within the limits (else 503).
    pub fn subscribe(&self, user: Uuid) -> Result<Subscription, ApiError> {
        if *self.hub.stopping.borrow() {
            return Err(ApiError::Unavailable);
        }
        let permit = self.hub.streams.clone().try_acquire_owned().map_err(|_| {
            tracing::warn!("too many notification streams open");
            ApiError::Unavailable
        })?;
        let (sender, receiver) = mpsc::channel(self.hub.config.buffer);
        let lagged = Arc::new(AtomicBool::new(false));
        let id = self.hub.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut subscribers = self
                .hub
                .subscribers
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let list = subscribers.entry(user).or_default();
            if list.len() >= self.hub.config.max_streams_per_user {
                tracing::warn!(%user, "too many notification streams open for one user");
                return Err(ApiError::Unavailable);
            }
            list.push(Subscriber {
                id,
                sender,
                lagged: lagged.clone(),
            });
        }
        metrics::gauge!("souk_notification_streams").increment(1.0);
        Ok(Subscription {
            hub: self.hub.clone(),
            user,
            id,
            receiver,
            lagged,
            _permit: permit,
        })
    }

    /// The notifications of `user` after `after`, for a stream resumed with
    /// `Last-Event-ID`: read from the event store in global order, below the
    /// horizon (so that nothing earlier can still appear), for the orders
    /// and wallets the read models say are the user's.
    async fn replay(&self, resume: Resume) -> Replay {
        match self.read_replay(resume).await {
            Ok(replay) => replay,
            Err(error) => {
                tracing::warn!(%error, "cannot replay notifications");
                Replay::Reset("the notifications cannot be replayed right now")
            }
        }
    }

    async fn read_replay(&self, resume: Resume) -> Result<Replay, sqlx::Error> {
        let pool = &self.hub.pool;
        let after = resume.after;
        let recorded_at: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
            "SELECT recorded_at FROM events WHERE transaction_id = $1::text::xid8 AND position = $2",
        )
        .bind(after.transaction_id.to_string())
        .bind(after.position)
        .fetch_optional(pool)
        .await?;
        let Some(recorded_at) = recorded_at else {
            return Ok(Replay::Reset("the Last-Event-ID names no event"));
        };
        if recorded_at < chrono::Utc::now() - REPLAY_WINDOW {
            return Ok(Replay::Reset(
                "the Last-Event-ID is older than the replay window (24 hours)",
            ));
        }
        // The user's orders changed since a little before that event (clocks
        // of writers differ), and wallets: the aggregates to replay. The read
        // models hold those whose events they have applied ...
        let mut aggregates: Vec<(String, String)> = sqlx::query_as(
            "(SELECT 'Order', order_id::text FROM rm_orders
               WHERE buyer_id = $1 AND updated_at >= $2
              UNION ALL
              SELECT 'Order', order_id::text FROM rm_orders
               WHERE seller_id = $1 AND buyer_id <> $1 AND updated_at >= $2
              UNION ALL
              SELECT 'Wallet', wallet_id::text FROM rm_wallets WHERE owner_id = $1)
             LIMIT $3",
        )
        .bind(resume.user)
        .bind(recorded_at - chrono::TimeDelta::minutes(5))
        .bind(REPLAY_MAX_AGGREGATES + 1)
        .fetch_all(pool)
        .await?;
        // ... and the event store the others: orders and wallets with events
        // after both the resumption point and what the read models applied,
        // whose first event (`OrderPlaced`, `WalletOpened`) names the user.
        let Some(unprojected) = self.unprojected_aggregates(resume).await? else {
            return Ok(Replay::Reset(
                "the read models are too far behind to replay; reload",
            ));
        };
        aggregates.extend(unprojected);
        aggregates.sort();
        aggregates.dedup();
        if aggregates.len() as i64 > REPLAY_MAX_AGGREGATES {
            return Ok(Replay::Reset("too many orders and wallets to replay"));
        }
        // Read after the aggregates: an event below the horizon read now is
        // committed, and so is every event before it.
        let horizon = event_store::global::horizon(pool).await?;
        let events = event_store::global::read_below_of(
            pool,
            after,
            horizon,
            &aggregates,
            &NOTIFYING_EVENT_TYPES,
            REPLAY_MAX_EVENTS,
        )
        .await?;
        if events.len() as i64 >= REPLAY_MAX_EVENTS {
            return Ok(Replay::Reset("too many notifications to replay"));
        }
        let mut recipients = Recipients::new(pool.clone());
        let mut replayed = Vec::new();
        for event in &events {
            for (user, notification) in recipients.notifications_of(event, || true).await {
                if user == resume.user {
                    replayed.push(notification);
                }
            }
        }
        Ok(Replay::Events(replayed))
    }

    /// The user's orders and wallets with events after `resume.after` that
    /// the orders or wallets read model has not applied yet, from the event
    /// store; `None` when more than [`REPLAY_MAX_UNPROJECTED`] such events
    /// would have to be scanned.
    async fn unprojected_aggregates(
        &self,
        resume: Resume,
    ) -> Result<Option<Vec<(String, String)>>, sqlx::Error> {
        let pool = &self.hub.pool;
        let partitions = self.hub.config.partitions;
        let rows = crate::catch_up::checkpoints(pool, partitions).await?;
        let caught_up = crate::catch_up::caught_up(&rows, partitions);
        let applied = [Projection::Orders, Projection::Wallets]
            .into_iter()
            .map(|projection| caught_up.of(projection).unwrap_or_default())
            .min()
            .unwrap_or_default();
        let from = applied.max(resume.after);
        let (scanned, types, ids): (i64, Vec<String>, Vec<String>) = sqlx::query_as(
            "WITH scanned AS MATERIALIZED (
                 SELECT aggregate_type, aggregate_id FROM events
                  WHERE (transaction_id, position) > ($1::text::xid8, $2)
                    AND aggregate_type IN ('Order', 'Wallet')
                  ORDER BY events.transaction_id, events.position
                  LIMIT $4),
             theirs AS (
                 SELECT s.aggregate_type, s.aggregate_id
                   FROM (SELECT DISTINCT aggregate_type, aggregate_id FROM scanned) s
                   JOIN events first
                     ON first.aggregate_type = s.aggregate_type
                    AND first.aggregate_id = s.aggregate_id AND first.sequence = 1
                  WHERE first.payload -> 'OrderPlaced' ->> 'buyer' = $3
                     OR first.payload -> 'OrderPlaced' ->> 'seller' = $3
                     OR first.payload -> 'WalletOpened' ->> 'owner' = $3)
             SELECT (SELECT count(*) FROM scanned),
                    coalesce(array_agg(aggregate_type), '{}'),
                    coalesce(array_agg(aggregate_id), '{}')
               FROM theirs",
        )
        .bind(from.transaction_id.to_string())
        .bind(from.position)
        .bind(resume.user.to_string())
        .bind(REPLAY_MAX_UNPROJECTED + 1)
        .fetch_one(pool)
        .await?;
        let aggregates = types.into_iter().zip(ids).collect();
        Ok((scanned <= REPLAY_MAX_UNPROJECTED).then_some(aggregates))
    }

    /// The consumer: reads the stream and delivers notifications until
    /// aborted, reconnecting (with a bounded backoff) whenever NATS, the
    /// stream or the consumer fails.
    pub async fn run(self) {
        let mut backoff = Duration::from_millis(50);
        let mut recipients = Recipients::new(self.hub.pool.clone());
        loop {
            if let Err(error) = self.consume(&mut recipients, &mut backoff).await {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "notification consumer stopped; reconnecting"
                );
            }
            self.hub.live.send_replace(false);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn consume(
        &self,
        recipients: &mut Recipients,
        backoff: &mut Duration,
    ) -> anyhow::Result<()> {
        let config = &self.hub.config;
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(2))
            .reconnect_delay_callback(event_store::fanout::reconnect_delay)
            .connect(event_store::nats::server_addrs(&config.nats_url)?)
            .await
            .context("connecting to NATS")?;
        let jetstream = async_nats::jetstream::new(client);
        let stream = jetstream
            .get_stream(&config.stream)
            .await
            .with_context(|| format!("opening the JetStream stream {}", config.stream))?;
        let consumer = stream
            .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
                filter_subject: event_store::fanout::stream_subjects(&config.stream),
                deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::New,
                ..Default::default()
            })
            .await
            .context("creating the ordered consumer")?;
        let mut messages = consumer
            .messages()
            .await
            .context("reading the ordered consumer")?;
        self.hub.live.send_replace(true);
        *backoff = Duration::from_millis(50);
        tracing::info!(stream = %config.stream, "notification consumer live");
        while let Some(message) = messages.next().await {
            let message = message.context("receiving an event")?;
            for (user, notification) in recipients
                .notifications(&message.subject, &message.payload, || {
                    self.hub.has_subscribers()
                })
                .await
            {
                self.hub.deliver(user, &notification);
            }
        }
        anyhow::bail!("the ordered consumer ended")
    }
}

impl Subscription {
    /// The stream's server-sent events: `ready` once the consumer is live
    /// (notifications flow from then on); with `resume`, the user's
    /// notifications after it (or `reset` when they cannot be replayed);
    /// then the live notifications, none twice; then `lagged` if the client
    /// fell behind. Ends at shutdown.
    pub fn into_events(
        self,
        notifications: Notifications,
        resume: Option<Resume>,
    ) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
        enum Phase {
            Connecting,
            /// Events to send before the live ones (`ready`, then the
            /// replayed notifications or `reset`), with their positions.
            Sending(VecDeque<(Event, Option<Position>)>),
            Live,
            Ended,
        }
        struct State {
            subscription: Subscription,
            notifications: Notifications,
            resume: Option<Resume>,
            /// The last position sent: live notifications at or before it
            /// were replayed already.
            sent: Option<Position>,
            live: watch::Receiver<bool>,
            stopping: watch::Receiver<bool>,
            phase: Phase,
        }
        let state = State {
            live: self.hub.live.subscribe(),
            stopping: self.hub.stopping.subscribe(),
            subscription: self,
            notifications,
            sent: resume.map(|resume| resume.after),
            resume,
            phase: Phase::Connecting,
        };
        futures::stream::unfold(state, |mut state| async move {
            match state.phase {
                Phase::Connecting => {
                    let live = state.live.clone();
                    let went_live = tokio::select! {
                        () = stopped(state.stopping.clone()) => false,
                        ready = became_live(live) => ready,
                    };
                    if !went_live {
                        return None;
                    }
                    // Replayed only now that the consumer is live, so that
                    // every later event arrives live.
                    let ready = Event::default()
                        .event("ready")
                        .data(json!({"live": true}).to_string());
                    let mut queue = VecDeque::from([(ready, None)]);
                    if let Some(resume) = state.resume {
                        match state.notifications.replay(resume).await {
                            Replay::Events(events) => {
                                queue.extend(events.into_iter().map(|notification| {
                                    (notification.to_event(), Some(notification.position))
                                }))
                            }
                            Replay::Reset(reason) => {
                                // Nothing before now is replayed; every live
                                // notification is new.
                                state.sent = None;
                                let message = format!("{reason}: read the current state again");
                                let reset = Event::default()
                                    .event("reset")
                                    .data(json!({ "message": message }).to_string());
                                queue.push_back((reset, None));
                            }
                        }
                    }
                    state.phase = Phase::Sending(queue);
                    Some((Ok(Event::default().comment("connected")), state))
                }
                Phase::Sending(ref mut queue) => match queue.pop_front() {
                    Some((event, position)) => {
                        if position.is_some() {
                            state.sent = position;
                        }
                        Some((Ok(event), state))
                    }
                    None => {
                        state.phase = Phase::Live;
                        Some((Ok(Event::default().comment("live")), state))
                    }
                },
                Phase::Live => {
                    let next = loop {
                        let next = tokio::select! {
                            () = stopped(state.stopping.clone()) => return None,
                            next = state.subscription.receiver.recv() => next,
                        };
                        match next {
                            Some(notification)
                                if state.sent.is_some_and(|sent| notification.position <= sent) =>
                            {
                                continue;
                            }
                            next => break next,
                        }
                    };
                    match next {
                        Some(notification) => {
                            state.sent = Some(notification.position);
                            Some((Ok(notification.to_event()), state))
                        }
                        None => {
                            state.phase = Phase::Ended;
                            if state.subscription.lagged.load(Ordering::SeqCst) {
                                let lagged = Event::default().event("lagged").data(
                                    json!({"message": "this stream fell behind and is closed; \
                                        read the current state and reconnect"})
                                    .to_string(),
                                );
                                Some((Ok(lagged), state))
                            } else {
                                None
                            }
                        }
                    }
                }
                Phase::Ended => None,
            }
        })
    }
}

async fn stopped(mut stopping: watch::Receiver<bool>) {
    if stopping.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn became_live(mut live: watch::Receiver<bool>) -> bool {
    live.wait_for(|live| *live).await.is_ok()
}

/// A map that forgets its oldest entries beyond a bound.
#[derive(Debug)]
struct BoundedMap<K, V> {
    entries: HashMap<K, V>,
    order: VecDeque<K>,
    capacity: usize,
}

impl<K: Clone + Eq + Hash, V> BoundedMap<K, V> {
    fn new(capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    fn get(&self, key: &K) -> Option<&V> {
        self.entries.get(key)
    }

    fn insert(&mut self, key: K, value: V) {
        if self.entries.insert(key.clone(), value).is_none() {
            self.order.push_back(key);
            while self.order.len() > self.capacity {
                if let Some(oldest) = self.order.pop_front() {
                    self.entries.remove(&oldest);
                }
            }
        }
    }
}

/// Who an order concerns.
#[derive(Debug, Clone, Copy)]
struct Parties {
    buyer: Uuid,
    seller: Uuid,
}

/// Whose a wallet is.
#[derive(Debug, Clone)]
struct Owner {
    owner: Uuid,
    currency: String,
}

/// Decides who is told about which event.
#[derive(Debug)]
struct Recipients {
    pool: PgPool,
    orders: BoundedMap<Uuid, Parties>,
    wallets: BoundedMap<Uuid, Owner>,
}

/// The event types that give a notification ([`order_status`],
/// [`funds_notification`]).
const NOTIFYING_EVENT_TYPES: [&str; 18] = [
    "OrderPlaced",
    "OrderRejected",
    "OrderAwaitingPayment",
    "PaymentConfirmed",
    "OrderConfirmed",
    "OrderShipped",
    "OrderDelivered",
    "OrderCompleted",
    "OrderCancelled",
    "ReturnRequested",
    "OrderReturned",
    "OrderRefunded",
    "FundsHeld",
    "IncomingExpected",
    "HoldCaptured",
    "EscrowReceived",
    "HoldRefunded",
    "IncomingCancelled",
];

/// The order status an order event moves to, for the events that change it.
fn order_status(event_type: &str) -> Option<&'static str> {
    Some(match event_type {
        "OrderPlaced" => "placed",
        "OrderRejected" => "rejected",
        "OrderAwaitingPayment" => "awaiting_payment",
        "PaymentConfirmed" | "OrderConfirmed" => "confirmed",
        "OrderShipped" => "shipped",
        "OrderDelivered" => "delivered",
        "OrderCompleted" => "completed",
        "OrderCancelled" => "cancelled",
        "ReturnRequested" => "return_requested",
        "OrderReturned" => "returned",
        "OrderRefunded" => "refunded",
        _ => return None,
    })
}

/// The notification a wallet event is, for the events that hold or release
/// funds: the payer's hold (told to the payee too) and the payee's receipt
/// alike; `IncomingExpected` and `IncomingCancelled` only occur in logs of
/// checkouts recorded before a seller's pending funds were derived.
fn funds_notification(event_type: &str) -> Option<&'static str> {
    match event_type {
        "FundsHeld" | "IncomingExpected" => Some("funds_held"),
        "HoldCaptured" | "EscrowReceived" | "HoldRefunded" | "IncomingCancelled" => {
            Some("funds_released")
        }
        _ => None,
    }
}

fn uuid_at(value: &Value, field: &str) -> Option<Uuid> {
    value
        .get(field)?
        .as_str()
        .and_then(|text| Uuid::parse_str(text).ok())
}

impl Recipients {
    fn new(pool: PgPool) -> Self {
        Self {
            pool,
            orders: BoundedMap::new(CACHE_ENTRIES),
            wallets: BoundedMap::new(CACHE_ENTRIES),
        }
    }

    /// The notifications one published message gives, by recipient. Events
    /// of other aggregates are not even decoded; nobody is looked up while
    /// `anyone_listening` says no stream is open.
    async fn notifications(
        &mut self,
        subject: &str,
        payload: &[u8],
        anyone_listening: impl Fn() -> bool,
    ) -> Vec<(Uuid, Notification)> {
        // Subjects are `<stream>.events.<AggregateType>.<partition>`.
        let aggregate_type = subject.rsplit('.').nth(1).unwrap_or("");
        if aggregate_type != "Order" && aggregate_type != "Wallet" {
            return Vec::new();
        }
        let event: RecordedEvent = match serde_json::from_slice(payload) {
            Ok(event) => event,
            Err(error) => {
                metrics::counter!("souk_notifications_undecodable_total").increment(1);
                tracing::warn!(%error, subject, "cannot decode a published event");
                return Vec::new();
            }
        };
        self.notifications_of(&event, anyone_listening).await
    }

    /// The notifications one event gives, by recipient.
    async fn notifications_of(
        &mut self,
        event: &RecordedEvent,
        anyone_listening: impl Fn() -> bool,
    ) -> Vec<(Uuid, Notification)> {
        let aggregate_type = event.aggregate_type.as_str();
        if aggregate_type != "Order" && aggregate_type != "Wallet" {
            return Vec::new();
        }
        let Ok(aggregate_id) = Uuid::parse_str(&event.aggregate_id) else {
            return Vec::new();
        };
        // Unit variants are stored as a bare string, the others as
        // `{"<EventType>": {...}}`.
        let body = event
            .payload
            .parse::<Value>()
            .ok()
            .and_then(|mut payload| payload.get_mut(&event.event_type).map(Value::take))
            .unwrap_or(Value::Null);
        let result = match aggregate_type {
            "Order" => {
                self.order_notifications(event, aggregate_id, &body, &anyone_listening)
                    .await
            }
            _ => {
                self.wallet_notifications(event, aggregate_id, &body, &anyone_listening)
                    .await
            }
        };
        match result {
            Ok(notifications) => notifications,
            Err(error) => {
                metrics::counter!("souk_notifications_undeliverable_total").increment(1);
                tracing::warn!(%error, event_id = %event.event_id, "cannot find who to notify");
                Vec::new()
            }
        }
    }

    async fn order_notifications(
        &mut self,
        event: &RecordedEvent,
        order_id: Uuid,
        body: &Value,
        anyone_listening: &impl Fn() -> bool,
    ) -> Result<Vec<(Uuid, Notification)>, sqlx::Error> {
        if event.event_type == "OrderPlaced"
            && let (Some(buyer), Some(seller)) = (uuid_at(body, "buyer"), uuid_at(body, "seller"))
        {
            self.orders.insert(order_id, Parties { buyer, seller });
        }
        let Some(status) = order_status(&event.event_type) else {
            return Ok(Vec::new());
        };
        if !anyone_listening() {
            return Ok(Vec::new());
        }
        let parties = match self.orders.get(&order_id) {
            Some(parties) => *parties,
            None => {
                let placed = self.first_event("Order", order_id, "OrderPlaced").await?;
                let (Some(buyer), Some(seller)) =
                    (uuid_at(&placed, "buyer"), uuid_at(&placed, "seller"))
                else {
                    metrics::counter!("souk_notifications_undeliverable_total").increment(1);
                    tracing::warn!(%order_id, "an order event for an order that was never placed");
                    return Ok(Vec::new());
                };
                let parties = Parties { buyer, seller };
                self.orders.insert(order_id, parties);
                parties
            }
        };
        let mut recipients = vec![(parties.buyer, "buyer")];
        if parties.seller != parties.buyer {
            recipients.push((parties.seller, "seller"));
        }
        Ok(recipients
            .into_iter()
            .map(|(user, role)| {
                let data = json!({
                    "order_id": order_id,
                    "status": status,
                    "event_type": event.event_type,
                    "role": role,
                    "position": event.position.token(),
                    "recorded_at": crate::routes::time_text(event.recorded_at),
                });
                (
                    user,
                    Notification {
                        event: "order_status",
                        position: event.position,
                        data,
                    },
                )
            })
            .collect())
    }

    async fn wallet_notifications(
        &mut self,
        event: &RecordedEvent,
        wallet_id: Uuid,
        body: &Value,
        anyone_listening: &impl Fn() -> bool,
    ) -> Result<Vec<(Uuid, Notification)>, sqlx::Error> {
        if event.event_type == "WalletOpened"
            && let (Some(owner), Some(currency)) = (
                uuid_at(body, "owner"),
                body.get("currency").and_then(Value::as_str),
            )
        {
            let currency = currency.to_owned();
            self.wallets.insert(wallet_id, Owner { owner, currency });
        }
        let Some(kind) = funds_notification(&event.event_type) else {
            return Ok(Vec::new());
        };
        if !anyone_listening() {
            return Ok(Vec::new());
        }
        let mut wallets = vec![wallet_id];
        // A checkout no longer writes the seller's wallet: the buyer's hold
        // tells the seller too. A hold of an older checkout (no
        // `incoming_expected: false`) has the seller's own IncomingExpected.
        if event.event_type == "FundsHeld"
            && body.get("incoming_expected") == Some(&Value::Bool(false))
            && let Some(payee) = uuid_at(body, "payee_wallet")
            && payee != wallet_id
        {
            wallets.push(payee);
        }
        let mut notifications = Vec::with_capacity(wallets.len());
        for wallet in wallets {
            let Some(owner) = self.owner_of(wallet).await? else {
                continue;
            };
            let data = json!({
                "wallet_id": wallet,
                "order_id": uuid_at(body, "order_id"),
                "amount": body.get("amount").and_then(Value::as_i64).unwrap_or(0),
                "currency": owner.currency,
                "event_type": event.event_type,
                "position": event.position.token(),
                "recorded_at": crate::routes::time_text(event.recorded_at),
            });
            notifications.push((
                owner.owner,
                Notification {
                    event: kind,
                    position: event.position,
                    data,
                },
            ));
        }
        Ok(notifications)
    }

    /// The body of the first event of an aggregate (`event_type`, which
    /// names its parties), from the event store: it committed before any
    /// later event of the aggregate, so it is there whatever the read models
    /// have applied. `Null` when there is no such event.
    async fn first_event(
        &self,
        aggregate_type: &str,
        id: Uuid,
        event_type: &str,
    ) -> Result<Value, sqlx::Error> {
        let body: Option<Option<String>> = sqlx::query_scalar(
            "SELECT (payload -> $3)::text FROM events
              WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence = 1",
        )
        .bind(aggregate_type)
        .bind(id.to_string())
        .bind(event_type)
        .fetch_optional(&self.pool)
        .await?;
        Ok(body
            .flatten()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or(Value::Null))
    }

    /// Whose `wallet_id` is (cached); `None` for a wallet never opened.
    async fn owner_of(&mut self, wallet_id: Uuid) -> Result<Option<Owner>, sqlx::Error> {
        if let Some(owner) = self.wallets.get(&wallet_id) {
            return Ok(Some(owner.clone()));
        }
        let opened = self
            .first_event("Wallet", wallet_id, "WalletOpened")
            .await?;
        let (Some(owner), Some(currency)) = (
            uuid_at(&opened, "owner"),
            opened.get("currency").and_then(Value::as_str),
        ) else {
            metrics::counter!("souk_notifications_undeliverable_total").increment(1);
            tracing::warn!(%wallet_id, "a wallet event for a wallet that was never opened");
            return Ok(None);
        };
        let owner = Owner {
            owner,
            currency: currency.to_owned(),
        };
        self.wallets.insert(wallet_id, owner.clone());
        Ok(Some(owner))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bounded_map_forgets_its_oldest_entries() {
        let mut map = BoundedMap::new(2);
        map.insert(1, "a");
        map.insert(2, "b");
        map.insert(1, "a again");
        map.insert(3, "c");
        assert_eq!(map.get(&1), None);
        assert_eq!(map.get(&2), Some(&"b"));
        assert_eq!(map.get(&3), Some(&"c"));
    }

    #[test]
    fn status_changes_and_fund_movements_are_named() {
        assert_eq!(order_status("PaymentConfirmed"), Some("confirmed"));
        assert_eq!(order_status("SellerReviewed"), None);
        assert_eq!(funds_notification("FundsHeld"), Some("funds_held"));
        assert_eq!(funds_notification("HoldRefunded"), Some("funds_released"));
        assert_eq!(funds_notification("FundsDeposited"), None);
        for event_type in NOTIFYING_EVENT_TYPES {
            assert!(
                order_status(event_type).is_some() || funds_notification(event_type).is_some(),
                "{event_type}"
            );
        }
    }
}
