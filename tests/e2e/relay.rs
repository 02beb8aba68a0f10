//! The relay, against real Postgres and real NATS: committed events reach
//! JetStream in global order on their type and partition subjects; a
//! transaction held open holds the relay back (visibly) without making it
//! skip; a NATS outage loses and duplicates nothing, also in a backlog of
//! many batches in flight together; two relays on one stream
//! publish through one leader and hand over; a commit wakes the relay, in
//! its process or another; the relay publishes while its pool is taken.
//! The stream stays a gapless prefix of the global order: a publish refused
//! in the middle of a window is stored in its place once it goes through; a
//! relay whose checkpoint is behind the stream goes on after the stream's
//! end, and one whose stream lost events publishes them again, in order; a
//! stream ending with an event the database does not hold is refused.

use std::collections::HashSet;
use std::future::Future;
use std::time::{Duration, Instant};

use event_store::Position;
use event_store::binding::BindingError;
use event_store::fanout::{DEFAULT_PARTITIONS, event_subject, partition_of};
use event_store::global::{RecordedEvent, read_after};
use event_store::relay::{Relay, RelayConfig, RelayStatus, Role};
use serde_json::json;
use sqlx::postgres::PgPool;
use tests::nats::{
    NatsServer, StoredMessage, TestStream, nats_url, stored_count, wait_for_messages,
};
use tests::{TestApp, TestDb, User, spawn_app, spawn_app_on};
use tokio::sync::{oneshot, watch};

/// The bound on every wait of these tests (the suite shares one machine).
const WAIT: Duration = Duration::from_secs(60);

/// Waits until `check` holds; panics with `what` after [`WAIT`].
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every committed event in global order, once none waits behind the
/// horizon (another test's open transaction may hold it for a moment).
async fn all_events(pool: &PgPool) -> Vec<RecordedEvent> {
    let deadline = Instant::now() + WAIT;
    loop {
        let committed: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(pool)
            .await
            .unwrap();
        let events = read_after(pool, Position::START, 10_000).await.unwrap();
        if events.len() as i64 == committed {
            return events;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting until every committed event is readable"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Inserts a `Probe` event in `executor`'s transaction (or on its own);
/// returns its place in the global order once committed.
async fn insert_probe(executor: impl sqlx::PgExecutor<'_>) -> Position {
    insert_probe_with(executor, "{}").await
}

/// [`insert_probe`] with `payload` (JSON text).
async fn insert_probe_with(executor: impl sqlx::PgExecutor<'_>, payload: &str) -> Position {
    let (transaction_id, position): (i64, i64) = sqlx::query_as(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                             payload, metadata, prev_hash, hash)
         VALUES ('Probe', gen_random_uuid()::text, 1, 'Probed', '1', $1::json, '{}', '\\x00', '\\x00')
         RETURNING transaction_id::text::bigint, position",
    )
    .bind(payload)
    .fetch_one(executor)
    .await
    .unwrap();
    Position {
        transaction_id: transaction_id as u64,
        position,
    }
}

/// A gauge of `app`'s relay, from its `/metrics`.
async fn relay_metric(app: &TestApp, name: &str) -> Option<f64> {
    let text = app
        .client
        .get(format!("{}/metrics", app.address))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let prefix = format!("{name}{{stream=\"{}\"}} ", app.stream);
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.trim().parse().ok())
}

/// The stream holds exactly `events`, once each, in their global order.
fn assert_exactly(messages: &[StoredMessage], events: &[RecordedEvent]) {
    let ids: Vec<Option<String>> = messages.iter().map(|m| m.message_id.clone()).collect();
    let unique: HashSet<&Option<String>> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "a message is on the stream twice");
    let expected: Vec<Option<String>> = events
        .iter()
        .map(|event| Some(event.event_id.to_string()))
        .collect();
    assert_eq!(ids, expected, "the stream holds the events in global order");
    let positions: Vec<Position> = messages.iter().map(|m| m.event().position).collect();
    assert!(positions.windows(2).all(|pair| pair[0] < pair[1]));
}

#[tokio::test]
async fn committed_events_reach_the_stream_in_global_order_on_their_type_and_partition_subjects() {
    let app = spawn_app().await;
    let seller = User::new("seller");
    let buyer = User::new("buyer");
    for price in [1_500, 2_500, 3_500] {
        app.listing(&seller, price, 2, None).await;
    }
    for amount in [1_000, 2_000, 3_000, 4_000] {
        app.funded_wallet(&buyer, "EUR", amount).await;
    }

    let pool = app.db.pool().await;
    let events = all_events(&pool).await;
    let types: HashSet<&str> = events.iter().map(|e| e.aggregate_type.as_str()).collect();
    assert!(types.len() >= 3, "several aggregate types: {types:?}");
    let messages = wait_for_messages(&app.nats_url, &app.stream, events.len(), WAIT)
        .await
        .unwrap();
    assert_eq!(messages.len(), events.len());
    assert_exactly(&messages, &events);

    for (index, (message, event)) in messages.iter().zip(&events).enumerate() {
        assert_eq!(message.sequence, index as u64 + 1);
        let partition = partition_of(&event.aggregate_id, DEFAULT_PARTITIONS);
        assert_eq!(
            message.subject,
            event_subject(&app.stream, &event.aggregate_type, partition)
        );
        assert_eq!(&message.event(), event, "the body is the event as recorded");
    }

    // The checkpoint names the last event, stored once the acks were in.
    let last = events.last().unwrap().position;
    eventually("the checkpoint names the last event", || async {
        let row: Option<(i64, i64, i64)> = sqlx::query_as(
            "SELECT transaction_id, position, published FROM relay_checkpoints WHERE stream = $1",
        )
        .bind(&app.stream)
        .fetch_optional(&pool)
        .await
        .unwrap();
        row == Some((
            last.transaction_id as i64,
            last.position,
            events.len() as i64,
        ))
    })
    .await;
}

#[tokio::test]
async fn a_transaction_held_open_holds_the_relay_back_and_it_skips_nothing() {
    let app = spawn_app().await;
    let pool = app.db.pool().await;
    let buyer = User::new("buyer");
    app.funded_wallet(&buyer, "EUR", 500).await;
    wait_for_messages(&app.nats_url, &app.stream, 2, WAIT)
        .await
        .unwrap();

    // A writer takes its place in the order first and commits last.
    let mut held = pool.begin().await.unwrap();
    let probe = insert_probe(&mut *held).await;
    for amount in [100, 200, 300] {
        app.funded_wallet(&buyer, "EUR", amount).await;
    }

    // The relay sees the six later events committed and publishes none of
    // them while the writer is open.
    eventually("the relay counts the later events as lag", || async {
        relay_metric(&app, "souk_relay_lag_events").await >= Some(6.0)
    })
    .await;
    let published = tests::nats::stream_messages(&app.nats_url, &app.stream)
        .await
        .unwrap();
    assert_eq!(published.len(), 2, "nothing past the open transaction");
    assert!(
        published
            .iter()
            .all(|message| message.event().position < probe)
    );

    held.commit().await.unwrap();
    let events = all_events(&pool).await;
    assert_eq!(events.len(), 9);
    let messages = wait_for_messages(&app.nats_url, &app.stream, 9, WAIT)
        .await
        .unwrap();
    assert_exactly(&messages, &events);
    assert_eq!(
        messages[2].event().position,
        probe,
        "the late commit comes first"
    );
    assert_eq!(messages[2].event().aggregate_type, "Probe");
}

#[tokio::test]
async fn a_transaction_held_open_shows_as_a_stall_in_the_relay_metrics() {
    let app = spawn_app().await;
    let pool = app.db.pool().await;
    let buyer = User::new("buyer");

    let mut held = pool.begin().await.unwrap();
    insert_probe(&mut *held).await;
    app.funded_wallet(&buyer, "EUR", 700).await;

    eventually("the horizon's age and the lag show the stall", || async {
        relay_metric(&app, "souk_relay_horizon_age_seconds").await >= Some(2.0)
            && relay_metric(&app, "souk_relay_lag_events").await >= Some(2.0)
    })
    .await;
    assert_eq!(
        stored_count(&app.nats_url, &app.stream).await.unwrap(),
        0,
        "the stalled relay published nothing"
    );

    held.commit().await.unwrap();
    eventually("the relay catches up once the transaction ends", || async {
        relay_metric(&app, "souk_relay_lag_events").await == Some(0.0)
            && stored_count(&app.nats_url, &app.stream).await.unwrap_or(0) == 3
    })
    .await;
}

#[tokio::test]
async fn a_nats_outage_under_load_loses_and_duplicates_nothing() {
    let mut server = NatsServer::start().expect("starting a private nats-server");
    let url = server.url();
    let app = spawn_app_on(TestDb::empty().await, |config| {
        config.nats_url = url.clone();
    })
    .await;
    let owner = User::new("buyer");
    let admin = User::new("admin");
    let wallet = app.funded_wallet(&owner, "EUR", 1_000).await;
    wait_for_messages(&url, &app.stream, 2, WAIT).await.unwrap();

    server.stop().unwrap();
    eventually("the relay reports NATS down", || async {
        relay_metric(&app, "souk_relay_connected").await == Some(0.0)
    })
    .await;

    // Commands keep succeeding: they never wait on NATS.
    let path = format!("/wallets/{wallet}/deposits");
    let seller = User::new("seller");
    for round in 0..10_i64 {
        let deposits = (0..20).map(|n| {
            let body = json!({
                "amount": {"amount": 100 + n, "currency": "EUR"},
                "reference": format!("outage {round}/{n}"),
            });
            let path = path.clone();
            let admin = admin.clone();
            let app = &app;
            async move { app.post(&path, Some(&admin), &body).await }
        });
        for answer in futures::future::join_all(deposits).await {
            assert_eq!(answer.status, 200, "{:?}", answer.body);
        }
        app.listing(&seller, 900 + round, 1, None).await;
    }

    server.start_again().unwrap();
    for n in 0..20 {
        let body =
            json!({"amount": {"amount": 50, "currency": "EUR"}, "reference": format!("after {n}")});
        assert_eq!(app.post(&path, Some(&admin), &body).await.status, 200);
    }

    let pool = app.db.pool().await;
    let events = all_events(&pool).await;
    assert!(events.len() > 230, "{} events", events.len());
    let messages = wait_for_messages(&url, &app.stream, events.len(), WAIT)
        .await
        .unwrap();
    assert_exactly(&messages, &events);
    eventually("the relay reports NATS up", || async {
        relay_metric(&app, "souk_relay_connected").await == Some(1.0)
    })
    .await;
}

/// Starts a relay named `instance` on `stream`; stops it when the sender is
/// used or dropped.
fn start_relay(
    pool: &PgPool,
    stream: &str,
    instance: &str,
) -> (
    watch::Receiver<RelayStatus>,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let mut config = RelayConfig::new(nats_url(), stream);
    config.instance = instance.to_owned();
    config.poll_interval = Duration::from_millis(50);
    config.standby_retry = Duration::from_millis(200);
    run_relay(pool, config)
}

/// Starts a relay configured as `config`; stops it when the sender is used
/// or dropped.
fn run_relay(
    pool: &PgPool,
    config: RelayConfig,
) -> (
    watch::Receiver<RelayStatus>,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let relay = Relay::new(pool.clone(), config);
    let status = relay.status();
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(relay.run_until(async move {
        let _ = stopped.await;
    }));
    (status, stop, running)
}

async fn wait_for_role(status: &mut watch::Receiver<RelayStatus>, role: Role) {
    tokio::time::timeout(WAIT, status.wait_for(|status| status.role == role))
        .await
        .unwrap_or_else(|_| panic!("the relay never became {role:?}"))
        .expect("the relay is running");
}

/// Waits until the relay has recorded `count` acknowledged publishes (the
/// messages are on the stream a moment before the checkpoint is stored).
async fn wait_for_published(status: &mut watch::Receiver<RelayStatus>, count: u64) {
    tokio::time::timeout(WAIT, status.wait_for(|status| status.published >= count))
        .await
        .unwrap_or_else(|_| panic!("the relay never published {count}"))
        .expect("the relay is running");
}

async fn insert_probes(pool: &PgPool, count: usize) {
    for _ in 0..count {
        insert_probe(pool).await;
    }
}

#[tokio::test]
async fn two_relays_on_one_stream_publish_through_one_leader_that_hands_over() {
    let db = TestDb::migrated().await;
    let pool = db.pool().await;
    let stream = TestStream::new(&nats_url());

    let (mut first, stop_first, first_running) = start_relay(&pool, &stream.name, "first");
    wait_for_role(&mut first, Role::Leader).await;
    let (mut second, stop_second, second_running) = start_relay(&pool, &stream.name, "second");
    wait_for_role(&mut second, Role::Standby).await;

    insert_probes(&pool, 40).await;
    wait_for_messages(&stream.url, &stream.name, 40, WAIT)
        .await
        .unwrap();
    wait_for_published(&mut first, 40).await;
    assert_eq!(
        second.borrow().published,
        0,
        "the standby published nothing"
    );
    assert_eq!(second.borrow().role, Role::Standby);

    // The leader stops; the standby takes the lock and resumes at the
    // leader's checkpoint.
    stop_first.send(()).unwrap();
    first_running.await.unwrap();
    assert_eq!(first.borrow().role, Role::Stopped);
    wait_for_role(&mut second, Role::Leader).await;
    insert_probes(&pool, 40).await;

    let events = all_events(&pool).await;
    let messages = wait_for_messages(&stream.url, &stream.name, 80, WAIT)
        .await
        .unwrap();
    assert_exactly(&messages, &events);
    wait_for_published(&mut second, 40).await;
    assert_eq!(
        second.borrow().published,
        40,
        "the new leader republished nothing"
    );

    stop_second.send(()).unwrap();
    second_running.await.unwrap();
}

/// A backlog of many full batches is published with a batch in flight while
/// the one before is confirmed and checkpointed; NATS then goes away, a
/// second backlog waits in Postgres, and the relay publishes it from its
/// checkpoint when NATS is back. The stream holds every event once, in
/// global order, and the checkpoint names the last.
#[tokio::test]
async fn a_backlog_of_many_batches_reaches_the_stream_once_and_in_order_across_an_outage() {
    let mut server = NatsServer::start().expect("starting a private nats-server");
    let db = TestDb::migrated().await;
    let pool = db.pool().await;
    let stream = TestStream::new(&server.url());
    insert_probes(&pool, 600).await;
    let mut config = RelayConfig::new(server.url(), &stream.name);
    config.instance = "small-batches".to_owned();
    config.batch_max = 16;
    config.poll_interval = Duration::from_millis(50);
    let (mut status, stop, running) = run_relay(&pool, config);
    wait_for_published(&mut status, 600).await;

    server.stop().unwrap();
    tokio::time::timeout(WAIT, status.wait_for(|status| !status.nats_connected))
        .await
        .expect("the relay saw NATS go")
        .expect("the relay is running");
    insert_probes(&pool, 200).await;
    server.start_again().unwrap();

    let events = all_events(&pool).await;
    assert_eq!(events.len(), 800);
    let messages = wait_for_messages(&stream.url, &stream.name, events.len(), WAIT)
        .await
        .unwrap();
    assert_exactly(&messages, &events);
    let last = events.last().map(|event| event.position);
    tokio::time::timeout(
        WAIT,
        status.wait_for(|status| Some(status.checkpoint) == last),
    )
    .await
    .expect("the checkpoint names the last event")
    .expect("the relay is running");

    stop.send(()).unwrap();
    running.await.unwrap();
}

/// Under load the commands of a process hold the connections of its pool
/// (an insert waiting for its WAL flush keeps one). The relay reads, and
/// observes, on its lock's session: it must keep publishing while every
/// connection of the pool it was given is taken, not queue behind them.
#[tokio::test]
async fn the_relay_publishes_while_every_connection_of_its_pool_is_taken() {
    let db = TestDb::migrated().await;
    let pool = db.pool().await;
    let stream = TestStream::new(&nats_url());
    let relay_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&db.url)
        .await
        .unwrap();
    let (mut status, stop, running) = start_relay(&relay_pool, &stream.name, "busy-pool");
    wait_for_role(&mut status, Role::Leader).await;

    let held = [
        relay_pool.acquire().await.unwrap(),
        relay_pool.acquire().await.unwrap(),
    ];
    insert_probes(&pool, 20).await;
    // Far less than the pool's acquire timeout (30 s): a relay queuing for
    // one of those connections publishes nothing in time.
    tokio::time::timeout(
        Duration::from_secs(15),
        status.wait_for(|status| status.published >= 20),
    )
    .await
    .expect("the relay published while its pool was taken")
    .expect("the relay is running");
    let messages = wait_for_messages(&stream.url, &stream.name, 20, WAIT)
        .await
        .unwrap();
    drop(held);
    assert_exactly(&messages, &all_events(&pool).await);

    stop.send(()).unwrap();
    running.await.unwrap();
}

/// The fallback poll of the relays of the two tests below: far longer than
/// their waits, so only a wake-up can publish in time.
const POLL_NEVER_MS: u64 = 60_000;
/// How long those tests give a woken relay.
const WOKEN_WITHIN: Duration = Duration::from_secs(20);

/// Opens a wallet through `app`, then waits (at most [`WOKEN_WITHIN`]) until
/// `stream` holds every event committed so far.
async fn open_wallet_and_wait_for_the_stream(app: &TestApp, stream: &str) {
    let opened = app
        .post(
            "/wallets",
            Some(&User::new("buyer")),
            &json!({"currency": "EUR"}),
        )
        .await;
    assert_eq!(opened.status, 201, "{:?}", opened.body);
    let committed: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&app.db.pool().await)
        .await
        .unwrap();
    wait_for_messages(&app.nats_url, stream, committed as usize, WOKEN_WITHIN)
        .await
        .expect("the relay was woken by the commit");
}

#[tokio::test]
async fn a_commit_wakes_the_relay_of_its_own_process_without_waiting_for_the_poll() {
    let app = spawn_app_on(TestDb::empty().await, |config| {
        config.relay_poll_ms = POLL_NEVER_MS;
    })
    .await;
    // The first wallet may be published by the relay's first read; the
    // second commits while the relay idles.
    open_wallet_and_wait_for_the_stream(&app, &app.stream).await;
    open_wallet_and_wait_for_the_stream(&app, &app.stream).await;
}

#[tokio::test]
async fn a_commit_wakes_a_relay_of_another_process_through_a_notification() {
    let stream = TestStream::new(&nats_url());
    let app = spawn_app_on(TestDb::empty().await, |config| {
        config.relay = false;
    })
    .await;
    // Not given the command API's commit signal, as in another process: it
    // hears of commits only through `NOTIFY souk_events`.
    let mut config = RelayConfig::new(nats_url(), &stream.name);
    config.poll_interval = Duration::from_millis(POLL_NEVER_MS);
    let relay = Relay::new(app.db.pool().await, config);
    let mut status = relay.status();
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(relay.run_until(async move {
        let _ = stopped.await;
    }));
    wait_for_role(&mut status, Role::Leader).await;
    open_wallet_and_wait_for_the_stream(&app, &stream.name).await;
    open_wallet_and_wait_for_the_stream(&app, &stream.name).await;
    let _ = stop.send(());
    running.await.unwrap();
}

/// Sets the largest message `stream` stores (-1: no limit), keeping the rest
/// of its configuration.
async fn set_max_message_size(stream: &TestStream, bytes: i32) {
    let js = async_nats::jetstream::new(tests::nats::connect(&stream.url).await.unwrap());
    let mut handle = js.get_stream(&stream.name).await.unwrap();
    let mut config = handle.info().await.unwrap().config.clone();
    config.max_message_size = bytes;
    js.update_stream(config).await.unwrap();
}

/// Moves the checkpoint of the relay of `stream` to `at`, backwards or
/// forwards (the relay itself only ever moves it forwards).
async fn set_checkpoint(pool: &PgPool, stream: &str, at: Position) {
    let moved = sqlx::query(
        "UPDATE relay_checkpoints SET transaction_id = $2, position = $3 WHERE stream = $1",
    )
    .bind(stream)
    .bind(at.transaction_id as i64)
    .bind(at.position)
    .execute(pool)
    .await
    .unwrap();
    assert_eq!(moved.rows_affected(), 1);
}

/// The checkpoint stored for the relay of `stream`.
async fn stored_checkpoint(pool: &PgPool, stream: &str) -> Position {
    let (transaction_id, position): (i64, i64) =
        sqlx::query_as("SELECT transaction_id, position FROM relay_checkpoints WHERE stream = $1")
            .bind(stream)
            .fetch_one(pool)
            .await
            .unwrap();
    Position {
        transaction_id: transaction_id as u64,
        position,
    }
}

/// Waits until the relay's checkpoint is `at`.
async fn wait_for_checkpoint(status: &mut watch::Receiver<RelayStatus>, at: Position) {
    tokio::time::timeout(WAIT, status.wait_for(|status| status.checkpoint == at))
        .await
        .unwrap_or_else(|_| panic!("the relay's checkpoint never reached {at}"))
        .expect("the relay is running");
}

/// One publish in the middle of a window is refused (its event is too
/// large for the stream) while the later ones would be stored. JetStream
/// refuses those too (each expects the one before it), the relay tries
/// again from the stream's end, and once the limit is raised the event is
/// stored in its place: never after later events, which a projector would
/// then skip as redeliveries.
#[tokio::test]
async fn a_publish_refused_in_the_middle_of_a_window_is_stored_in_its_place_once_it_goes_through() {
    let db = TestDb::migrated().await;
    let pool = db.pool().await;
    let stream = TestStream::new(&nats_url());
    let mut config = RelayConfig::new(nats_url(), &stream.name);
    config.instance = "refused-mid-window".to_owned();
    config.batch_max = 8;
    config.poll_interval = Duration::from_millis(50);
    config.backoff_max = Duration::from_millis(100);
    let (mut status, stop, running) = run_relay(&pool, config);
    insert_probes(&pool, 5).await;
    wait_for_published(&mut status, 5).await;

    set_max_message_size(&stream, 4_096).await;
    // Committed together, so that the relay sends them in one window of
    // batches in flight: the large event is the 11th of 21.
    let mut writer = pool.begin().await.unwrap();
    for _ in 0..10 {
        insert_probe(&mut *writer).await;
    }
    let large = json!({"blob": "x".repeat(16_384)}).to_string();
    let refused = insert_probe_with(&mut *writer, &large).await;
    for _ in 0..10 {
        insert_probe(&mut *writer).await;
    }
    writer.commit().await.unwrap();

    // The relay tries, fails, and tries again.
    let failed_before = status.borrow().failures;
    tokio::time::timeout(
        WAIT,
        status.wait_for(|status| status.failures >= failed_before + 2),
    )
    .await
    .expect("the relay tried the large event twice")
    .expect("the relay is running");
    assert_eq!(
        stored_count(&stream.url, &stream.name).await.unwrap(),
        15,
        "no event after the refused one is stored while it waits"
    );
    set_max_message_size(&stream, -1).await;

    let events = all_events(&pool).await;
    assert_eq!(events.len(), 26);
    let messages = wait_for_messages(&stream.url, &stream.name, events.len(), WAIT)
        .await
        .unwrap();
    assert_exactly(&messages, &events);
    assert_eq!(messages[15].event().position, refused);
    wait_for_checkpoint(&mut status, events[25].position).await;

    stop.send(()).unwrap();
    running.await.unwrap();
}

/// A leader that published events and lost its lead before checkpointing
/// them leaves the checkpoint behind the stream. The next leader goes on
/// after the stream's last event: it checkpoints the events already there
/// and publishes none of them again (no reliance on the duplicate window).
#[tokio::test]
async fn a_relay_whose_checkpoint_is_behind_the_stream_goes_on_after_the_streams_last_event() {
    let db = TestDb::migrated().await;
    let pool = db.pool().await;
    let stream = TestStream::new(&nats_url());
    let (mut first, stop_first, first_running) = start_relay(&pool, &stream.name, "first");
    insert_probes(&pool, 30).await;
    wait_for_published(&mut first, 30).await;
    stop_first.send(()).unwrap();
    first_running.await.unwrap();
    let published = all_events(&pool).await;
    set_checkpoint(&pool, &stream.name, published[9].position).await;

    let (mut second, stop_second, second_running) = start_relay(&pool, &stream.name, "second");
    let last = published[29].position;
    wait_for_checkpoint(&mut second, last).await;
    assert_eq!(stored_checkpoint(&pool, &stream.name).await, last);
    assert_eq!(second.borrow().published, 0, "nothing published again");

    insert_probes(&pool, 10).await;
    wait_for_published(&mut second, 10).await;
    let events = all_events(&pool).await;
    let messages = wait_for_messages(&stream.url, &stream.name, events.len(), WAIT)
        .await
        .unwrap();
    assert_exactly(&messages, &events);
    let status = second.borrow().clone();
    assert_eq!(
        (status.published, status.duplicates),
        (10, 0),
        "the new leader sent each new event once and no old one"
    );

    stop_second.send(()).unwrap();
    second_running.await.unwrap();
}

/// A stream that lost events its relay's checkpoint names (a store lost,
/// or restored from an older backup) gets them again, after its last event
/// and in order: it stays a gapless prefix of the global order.
#[tokio::test]
async fn a_stream_that_lost_events_the_checkpoint_names_gets_them_again_in_order() {
    let db = TestDb::migrated().await;
    let pool = db.pool().await;
    let stream = TestStream::new(&nats_url());
    let (mut first, stop_first, first_running) = start_relay(&pool, &stream.name, "first");
    insert_probes(&pool, 20).await;
    wait_for_published(&mut first, 20).await;
    stop_first.send(()).unwrap();
    first_running.await.unwrap();
    // Ten more events, which the checkpoint names as published.
    insert_probes(&pool, 10).await;
    let events = all_events(&pool).await;
    let last = events[29].position;
    set_checkpoint(&pool, &stream.name, last).await;

    let (mut second, stop_second, second_running) = start_relay(&pool, &stream.name, "second");
    wait_for_published(&mut second, 10).await;
    let messages = wait_for_messages(&stream.url, &stream.name, events.len(), WAIT)
        .await
        .unwrap();
    assert_exactly(&messages, &events);
    assert_eq!(second.borrow().checkpoint, last);
    assert_eq!(stored_checkpoint(&pool, &stream.name).await, last);

    stop_second.send(()).unwrap();
    second_running.await.unwrap();
}

/// A stream whose last message names an event this database does not hold
/// was fed by another copy of it: going on after that event would skip
/// events, before it would store events after later ones. The relay refuses
/// to publish, and says why.
#[tokio::test]
async fn a_stream_ending_with_an_event_the_database_does_not_hold_is_refused() {
    let db = TestDb::migrated().await;
    let pool = db.pool().await;
    let stream = TestStream::new(&nats_url());
    let (mut first, stop_first, first_running) = start_relay(&pool, &stream.name, "first");
    insert_probes(&pool, 3).await;
    wait_for_published(&mut first, 3).await;
    stop_first.send(()).unwrap();
    first_running.await.unwrap();

    let foreign = Position {
        transaction_id: u64::from(u32::MAX),
        position: 1_000_000,
    };
    let event_id = uuid::Uuid::now_v7();
    let js = async_nats::jetstream::new(tests::nats::connect(&stream.url).await.unwrap());
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", event_id.to_string().as_str());
    headers.insert(
        event_store::relay::POSITION_HEADER,
        foreign.token().as_str(),
    );
    js.publish_with_headers(
        event_subject(&stream.name, "Probe", 0),
        headers,
        "{}".into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    insert_probes(&pool, 2).await;

    let (mut second, stop_second, second_running) = start_relay(&pool, &stream.name, "second");
    let refused = tokio::time::timeout(WAIT, second.wait_for(|status| status.refused.is_some()))
        .await
        .expect("the relay refused the stream")
        .expect("the relay is running")
        .refused
        .clone();
    assert_eq!(
        refused,
        Some(BindingError::UnknownLastEvent {
            stream: stream.name.clone(),
            event_id,
            position: foreign,
        })
    );
    // It refuses before it reads events: the two waiting are not sent.
    assert_eq!(second.borrow().published, 0, "the relay published nothing");
    assert_eq!(stored_count(&stream.url, &stream.name).await.unwrap(), 4);

    stop_second.send(()).unwrap();
    second_running.await.unwrap();
}

/// A message of another publisher (the relay must be the stream's only
/// one) takes the sequence the relay's next message expects to follow: that
/// message is refused, but the later ones of its window, each expecting the
/// sequence before it, are stored. The relay finds the other's message when
/// it syncs, says so, and publishes the refused event after them: every
/// event is on the stream once, the passed one out of order.
#[tokio::test]
async fn a_message_of_another_publisher_is_found_and_no_event_is_lost_or_doubled() {
    let db = TestDb::migrated().await;
    let pool = db.pool().await;
    let stream = TestStream::new(&nats_url());
    let (mut status, stop, running) = start_relay(&pool, &stream.name, "shared-stream");
    insert_probes(&pool, 3).await;
    wait_for_published(&mut status, 3).await;

    let js = async_nats::jetstream::new(tests::nats::connect(&stream.url).await.unwrap());
    js.publish(
        event_subject(&stream.name, "Probe", 0),
        "not an event".into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    // One window of ten events.
    let mut writer = pool.begin().await.unwrap();
    for _ in 0..10 {
        insert_probe(&mut *writer).await;
    }
    writer.commit().await.unwrap();

    let events = all_events(&pool).await;
    let messages = wait_for_messages(&stream.url, &stream.name, events.len() + 1, WAIT)
        .await
        .unwrap();
    wait_for_checkpoint(&mut status, events[12].position).await;
    assert_eq!(status.borrow().foreign_messages, 1);
    assert_eq!(messages.len(), 14, "nothing stored twice");
    assert_eq!(messages[3].message_id, None, "the other's message");
    let relayed: Vec<String> = messages
        .iter()
        .filter_map(|message| message.message_id.clone())
        .collect();
    let mut expected: Vec<String> = events.iter().map(|e| e.event_id.to_string()).collect();
    // The window's first event, refused, comes after the rest.
    let passed = expected.remove(3);
    expected.push(passed);
    assert_eq!(relayed, expected);

    stop.send(()).unwrap();
    running.await.unwrap();
}

/// The leader check of a projector partition (see projections' "The idle
/// watermark") asks for the last message on its filter, and the listings
/// projection's filter holds a wildcard (`<stream>.events.*.<partition>`):
/// the server must answer it for a wildcard as for a literal subject.
#[tokio::test]
async fn the_last_message_of_a_partition_is_found_by_its_wildcard_filter() {
    use async_nats::jetstream::{self, stream};
    use event_store::fanout::partition_filter;
    use event_store::nats::last_sequence_on;

    let test_stream = TestStream::new(&nats_url());
    let name = test_stream.name.clone();
    let client = tests::nats::connect(&test_stream.url).await.expect("nats");
    let context = jetstream::new(client);
    let stream = context
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![event_store::fanout::stream_subjects(&name)],
            ..Default::default()
        })
        .await
        .expect("stream");
    for (aggregate_type, partition) in [("Listing", 0), ("Reservation", 0), ("Listing", 1)] {
        context
            .publish(event_subject(&name, aggregate_type, partition), "{}".into())
            .await
            .expect("publish")
            .await
            .expect("ack");
    }
    // (filter, what it names, the last sequence on it); an empty partition
    // has nothing to wait for.
    let cases = [
        (partition_filter(&name, 0), "partition 0", 2),
        (partition_filter(&name, 1), "partition 1", 3),
        (event_subject(&name, "Listing", 0), "a literal subject", 1),
        (partition_filter(&name, 5), "an empty partition", 0),
    ];
    for (filter, what, expected) in cases {
        let last = last_sequence_on(&stream, &filter).await.expect(what);
        assert_eq!(last, expected, "the last sequence on {what} ({filter})");
    }
}
