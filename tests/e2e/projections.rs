//! Projections end to end: commands through the command API, its relay
//! publishing them to a JetStream stream of the test's own, the projector
//! building the read models, and rebuilds from the event store compared with
//! the live read models row for row (`EXCEPT ALL`, both ways).
//!
//! The projector process being killed mid-batch is tested in
//! `projections/tests/`, where the `projector` binary is at hand.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use event_store::Position;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use sqlx::PgPool;
use tests::{TestApp, User, spawn_app};
use tokio::sync::{Mutex, oneshot};
use tokio::task::JoinHandle;
use uuid::Uuid;

const PARTITIONS: u32 = event_store::fanout::DEFAULT_PARTITIONS;
const WAIT: Duration = Duration::from_secs(90);

/// The read side of one test: a projector on the JetStream stream the test
/// app's relay publishes to (a stream of the test's own, deleted with the
/// app).
struct ReadSide {
    stream: String,
    nats_url: String,
    database_url: String,
    pool: PgPool,
    jetstream: jetstream::Context,
    projector: Option<(oneshot::Sender<()>, JoinHandle<anyhow::Result<()>>)>,
    /// Most messages a partition applies per transaction (the projector's
    /// default unless a test sets it).
    batch_max: Option<usize>,
}

impl ReadSide {
    async fn start(app: &TestApp) -> Self {
        Self::start_with(app, None).await
    }

    /// [`ReadSide::start`] with batches of at most `batch_max` messages.
    async fn start_with(app: &TestApp, batch_max: Option<usize>) -> Self {
        let client = tests::nats::connect(&app.nats_url)
            .await
            .expect("connecting to NATS");
        let mut side = Self {
            stream: app.stream.clone(),
            nats_url: app.nats_url.clone(),
            database_url: app.db.url.clone(),
            pool: app.db.pool().await,
            jetstream: jetstream::new(client),
            projector: None,
            batch_max,
        };
        side.start_projector().await;
        side
    }

    async fn start_projector(&mut self) {
        assert!(self.projector.is_none());
        let mut config = projections::ProjectorConfig::new(&self.database_url, &self.stream);
        config.nats_url = self.nats_url.clone();
        config.search = projections::search::SearchConfig::off();
        config.partitions = PARTITIONS;
        if let Some(batch_max) = self.batch_max {
            config.batch_max = batch_max;
        }
        let projector = projections::build(config)
            .await
            .expect("building the projector");
        let (stop, stopped) = oneshot::channel::<()>();
        let running = tokio::spawn(projector.run_until(async move {
            let _ = stopped.await;
        }));
        self.projector = Some((stop, running));
    }

    async fn stop_projector(&mut self) {
        if let Some((stop, running)) = self.projector.take() {
            let _ = stop.send(());
            running
                .await
                .expect("the projector task")
                .expect("the projector stops cleanly");
        }
    }

    /// Waits until every partition of every projection has caught up to
    /// `position`.
    async fn wait_caught_up(&self, position: Position) {
        let started = Instant::now();
        let expected = (projections::PROJECTIONS.len() as u32 * PARTITIONS) as i64;
        loop {
            let (rows, behind): (i64, i64) = sqlx::query_as(
                "SELECT count(*), count(*) FILTER (WHERE (caught_up_transaction, caught_up_position) < ($1, $2))
                   FROM projection_checkpoints",
            )
            .bind(position.transaction_id as i64)
            .bind(position.position)
            .fetch_one(&self.pool)
            .await
            .unwrap();
            if rows == expected && behind == 0 {
                return;
            }
            if started.elapsed() > WAIT {
                let checkpoints: Vec<Value> = sqlx::query_scalar(
                    "SELECT to_jsonb(c) FROM projection_checkpoints c ORDER BY projection, partition",
                )
                .fetch_all(&self.pool)
                .await
                .unwrap();
                panic!("the projections did not catch up to {position}: {checkpoints:#?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until no consumer of the stream has anything pending or
    /// unacknowledged.
    async fn wait_drained(&self) {
        let started = Instant::now();
        let stream = self.jetstream.get_stream(&self.stream).await.unwrap();
        loop {
            let mut busy = Vec::new();
            for projection in projections::PROJECTIONS {
                for partition in 0..PARTITIONS {
                    let name = projections::consumer_name(projection, partition);
                    // A consumer its partition has not created yet is busy.
                    let consumer: Result<jetstream::consumer::PullConsumer, _> =
                        stream.get_consumer(&name).await;
                    match consumer {
                        Ok(consumer) => {
                            let info = consumer.get_info().await.unwrap();
                            if info.num_pending > 0 || info.num_ack_pending > 0 {
                                busy.push((name, info.num_pending, info.num_ack_pending));
                            }
                        }
                        Err(_) => busy.push((name, u64::MAX, usize::MAX)),
                    }
                }
            }
            if busy.is_empty() {
                return;
            }
            assert!(started.elapsed() < WAIT, "consumers still busy: {busy:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(mut self) {
        self.stop_projector().await;
    }
}

impl Drop for ReadSide {
    fn drop(&mut self) {
        if let Some((_, running)) = self.projector.take() {
            running.abort();
        }
    }
}

/// The last committed event.
async fn last_position(pool: &PgPool) -> Position {
    let (transaction_id, position): (i64, i64) = sqlx::query_as(
        "SELECT transaction_id::text::bigint, position FROM events
          ORDER BY transaction_id DESC, position DESC LIMIT 1",
    )
    .fetch_one(pool)
    .await
    .expect("reading the last event");
    Position {
        transaction_id: transaction_id as u64,
        position,
    }
}

/// Rows of `left.table` missing from `right.table`, as JSON (a few).
async fn rows_missing(pool: &PgPool, left: &str, right: &str, table: &str) -> (i64, Vec<Value>) {
    let difference =
        format!("SELECT * FROM {left}.{table} EXCEPT ALL SELECT * FROM {right}.{table}");
    let count: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM ({difference}) d"))
        .fetch_one(pool)
        .await
        .unwrap();
    let sample: Vec<Value> =
        sqlx::query_scalar(&format!("SELECT to_jsonb(d) FROM ({difference}) d LIMIT 3"))
            .fetch_all(pool)
            .await
            .unwrap();
    (count, sample)
}

/// Rebuilds every projection from the event store into a schema of its own
/// and asserts it equals the live one, row for row. Waits first until the
/// live projections have caught up with the last event (and rebuilds again
/// if a timer committed an event meanwhile).
async fn assert_rebuilds_equal_live(side: &ReadSide, require_rows: bool) {
    let pool = &side.pool;
    let mut attempts = 0;
    'again: loop {
        attempts += 1;
        assert!(attempts <= 3, "events kept arriving while comparing");
        let last = last_position(pool).await;
        side.wait_caught_up(last).await;
        for projection in projections::PROJECTIONS {
            let schema = format!("check_{projection}");
            let report = projections::rebuild_into(pool, projection, &schema, PARTITIONS)
                .await
                .expect("rebuilding aside");
            if report.position != last {
                continue 'again;
            }
            for table in projections::tables(projection).expect("a projection's tables") {
                let (missing, missing_sample) = rows_missing(pool, "public", &schema, table).await;
                let (extra, extra_sample) = rows_missing(pool, &schema, "public", table).await;
                assert_eq!(
                    (missing, extra),
                    (0, 0),
                    "{table}: live rows not rebuilt {missing_sample:#?}; rebuilt rows not live {extra_sample:#?}"
                );
                if require_rows {
                    let rows: i64 =
                        sqlx::query_scalar(&format!("SELECT count(*) FROM public.{table}"))
                            .fetch_one(pool)
                            .await
                            .unwrap();
                    assert!(rows > 0, "the workload left {table} empty");
                }
            }
            sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
                .execute(pool)
                .await
                .unwrap();
        }
        return;
    }
}

async fn assert_nothing_parked(pool: &PgPool) {
    let parked: Vec<Value> = sqlx::query_scalar(
        "SELECT to_jsonb(d) - 'envelope' FROM dead_letters d ORDER BY id LIMIT 10",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(parked.is_empty(), "a valid workload parked {parked:#?}");
}

fn address() -> Value {
    json!({"name": "Ana Ruiz", "line1": "3 rue Mercière", "city": "Lyon", "postal_code": "69002", "country": "FR"})
}

#[derive(Debug, Clone)]
struct Seller {
    user: User,
    wallet: Uuid,
}

#[derive(Debug, Clone)]
struct Buyer {
    user: User,
    wallet: Uuid,
}

#[derive(Debug, Clone)]
struct Listing {
    id: Uuid,
    product: Uuid,
    seller: usize,
}

#[derive(Debug, Clone)]
struct Order {
    id: Uuid,
    buyer: usize,
    seller: User,
}

/// What the random workload has made so far.
#[derive(Debug)]
struct World {
    /// For the few lookups the workload makes in the event store.
    pool: PgPool,
    admin: User,
    sellers: Vec<Seller>,
    buyers: Vec<Buyer>,
    listings: Vec<Listing>,
    orders: Vec<Order>,
    customizations: Vec<(Uuid, Uuid, usize)>,
}

async fn open_world(app: &TestApp) -> World {
    let mut sellers = Vec::new();
    for _ in 0..3 {
        let user = User::new("seller");
        let wallet = app.funded_wallet(&user, "EUR", 0).await;
        sellers.push(Seller { user, wallet });
    }
    let mut buyers = Vec::new();
    for _ in 0..4 {
        let user = User::new("buyer");
        let wallet = app.funded_wallet(&user, "EUR", 200_000).await;
        buyers.push(Buyer { user, wallet });
    }
    World {
        pool: app.db.pool().await,
        admin: User::new("admin"),
        sellers,
        buyers,
        listings: Vec::new(),
        orders: Vec::new(),
        customizations: Vec::new(),
    }
}

/// One random command, answered by anything but a server error. Many are
/// refused (an order shipped twice, a return too early): refusals write
/// nothing, and the read models must not care.
async fn random_step(app: &TestApp, world: &Mutex<World>, rng: &mut StdRng) {
    let empty =
        |path: String, user: User| async move { app.post_raw(&path, Some(&user), None, &[]).await };
    let (answer, what) = {
        let w = world.lock().await;
        let buyer = rng.gen_range(0..w.buyers.len());
        let seller = rng.gen_range(0..w.sellers.len());
        let listing = w.listings.choose(rng).cloned();
        let order = w.orders.choose(rng).cloned();
        let admin = w.admin.clone();
        let buyers = w.buyers.clone();
        let sellers = w.sellers.clone();
        let customization = w.customizations.choose(rng).cloned();
        drop(w);
        let choice = if listing.is_none() {
            0
        } else {
            rng.gen_range(0..20)
        };
        match (choice, listing, order) {
            (0 | 1, _, _) => {
                let category = ["home", "lighting", "decor"][rng.gen_range(0..3)];
                let condition = ["new", "good", "fair"][rng.gen_range(0..3)];
                let body = json!({
                    "title": format!("Lamp {}", rng.gen_range(0..1000)),
                    "description": "Brass, works.",
                    "category": category,
                    "subcategory": "lamps",
                    "condition": condition,
                    "price": {"amount": rng.gen_range(100..5_000), "currency": "EUR"},
                    "quantity": rng.gen_range(1..6),
                    "location": {"city": "Lyon", "country": "FR", "lat": 45.76, "lon": 4.83},
                    "attributes": {"height_cm": rng.gen_range(10..80), "vintage": rng.gen_bool(0.5)},
                    "images": ["https://img.example/lamp.jpg"],
                    "payout_wallet_id": sellers[seller].wallet,
                });
                let answer = app
                    .post("/listings", Some(&sellers[seller].user), &body)
                    .await;
                if answer.status == 201 {
                    let product = answer.body["product_id"]
                        .as_str()
                        .and_then(|id| Uuid::parse_str(id).ok())
                        .expect("a product id");
                    world.lock().await.listings.push(Listing {
                        id: answer.id(),
                        product,
                        seller,
                    });
                }
                (answer, "create listing")
            }
            (2, Some(l), _) => {
                let body =
                    json!({"price": {"amount": rng.gen_range(100..5_000), "currency": "EUR"}});
                let path = format!("/listings/{}/price", l.id);
                (
                    app.post(&path, Some(&sellers[l.seller].user), &body).await,
                    "price",
                )
            }
            (3, Some(l), _) => {
                let body = json!({"title": format!("Lamp, restored {}", rng.gen_range(0..100)), "condition": "like_new"});
                let path = format!("/listings/{}/details", l.id);
                (
                    app.post(&path, Some(&sellers[l.seller].user), &body).await,
                    "details",
                )
            }
            (4, Some(l), _) => {
                let action = ["pause", "resume", "delete"][rng.gen_range(0..3)];
                let path = format!("/listings/{}/{action}", l.id);
                (empty(path, sellers[l.seller].user.clone()).await, "status")
            }
            (5, Some(l), _) => {
                let body = json!({"quantity": rng.gen_range(0..8)});
                let path = format!("/listings/{}/stock", l.id);
                (
                    app.post(&path, Some(&sellers[l.seller].user), &body).await,
                    "stock",
                )
            }
            (6, Some(l), _) => {
                let body = json!({"quantity": 1, "ttl_seconds": 600});
                let path = format!("/listings/{}/reservations", l.id);
                (
                    app.post(&path, Some(&buyers[buyer].user), &body).await,
                    "reserve",
                )
            }
            (7..=10, Some(l), _) => {
                let w = world.lock().await;
                let second = w.listings.choose(rng).cloned();
                drop(w);
                let mut lines = vec![json!({"listing_id": l.id, "quantity": rng.gen_range(1..3)})];
                if let Some(second) = second.filter(|s| s.id != l.id && rng.gen_bool(0.3)) {
                    lines.push(json!({"listing_id": second.id, "quantity": 1}));
                }
                let method =
                    ["wallet_escrow", "wallet_escrow", "cod", "bank_transfer"][rng.gen_range(0..4)];
                let body = json!({
                    "lines": lines,
                    "shipping_address": address(),
                    "payment_method": method,
                    "wallet_id": buyers[buyer].wallet,
                });
                let answer = app.post("/orders", Some(&buyers[buyer].user), &body).await;
                if answer.status == 201 {
                    let placed: Vec<Uuid> = answer.body["orders"]
                        .as_array()
                        .expect("orders")
                        .iter()
                        .filter_map(|o| o["id"].as_str().and_then(|id| Uuid::parse_str(id).ok()))
                        .collect();
                    let mut w = world.lock().await;
                    for id in placed {
                        let seller: Option<String> = sqlx::query_scalar(
                            "SELECT payload->'OrderPlaced'->>'seller' FROM events
                              WHERE aggregate_type = 'Order' AND aggregate_id = $1 AND sequence = 1",
                        )
                        .bind(id.to_string())
                        .fetch_optional(&w.pool)
                        .await
                        .unwrap();
                        let seller = seller
                            .and_then(|s| Uuid::parse_str(&s).ok())
                            .and_then(|s| w.sellers.iter().find(|x| x.user.id == s))
                            .map(|s| s.user.clone())
                            .expect("the order's seller");
                        w.orders.push(Order { id, buyer, seller });
                    }
                }
                (answer, "checkout")
            }
            (11, _, Some(o)) => {
                let body = json!({"reference": format!("BT-{}", rng.gen_range(0..10_000))});
                let path = format!("/orders/{}/confirm-payment", o.id);
                (
                    app.post(&path, Some(&admin), &body).await,
                    "confirm payment",
                )
            }
            (12 | 13, _, Some(o)) => {
                let body = json!({"carrier": "La Poste", "tracking_number": format!("LP{}", rng.gen_range(0..10_000))});
                let path = format!("/orders/{}/ship", o.id);
                (app.post(&path, Some(&o.seller), &body).await, "ship")
            }
            (14, _, Some(o)) => {
                let path = format!("/orders/{}/deliver", o.id);
                (empty(path, buyers[o.buyer].user.clone()).await, "deliver")
            }
            (15, _, Some(o)) => {
                let (path, user, body) = match rng.gen_range(0..4) {
                    0 => (
                        "cancel",
                        buyers[o.buyer].user.clone(),
                        Some(json!({"reason": "changed my mind"})),
                    ),
                    1 => (
                        "return",
                        buyers[o.buyer].user.clone(),
                        Some(json!({"reason": "too small"})),
                    ),
                    2 => ("returned", o.seller.clone(), None),
                    _ => ("refund", o.seller.clone(), None),
                };
                let path = format!("/orders/{}/{path}", o.id);
                let answer = match body {
                    Some(body) => app.post(&path, Some(&user), &body).await,
                    None => empty(path, user).await,
                };
                (answer, "cancel or return")
            }
            (16, _, Some(o)) => {
                let body = json!({"rating": rng.gen_range(1..6), "comment": "Fine."});
                let path = format!("/orders/{}/review", o.id);
                (
                    app.post(&path, Some(&buyers[o.buyer].user), &body).await,
                    "review",
                )
            }
            (17, Some(l), _) => {
                let body = json!({"title": "Restored", "body": "Polished the brass.", "media": ["https://img.example/a.jpg"]});
                let path = format!("/products/{}/stories", l.product);
                (
                    app.post(&path, Some(&sellers[l.seller].user), &body).await,
                    "story",
                )
            }
            (18, Some(l), _) => {
                let designer = rng.gen_range(0..buyers.len());
                let body = json!({"designer_id": buyers[designer].user.id, "description": "Paint it blue."});
                let path = format!("/products/{}/customizations", l.product);
                let answer = app.post(&path, Some(&sellers[l.seller].user), &body).await;
                if answer.status == 201 {
                    world
                        .lock()
                        .await
                        .customizations
                        .push((l.product, answer.id(), designer));
                }
                (answer, "customization")
            }
            (19, _, _) => match customization {
                Some((product, id, designer)) => {
                    let (step, body) = if rng.gen_bool(0.5) {
                        ("accept", None)
                    } else {
                        (
                            "complete",
                            Some(json!({"media": ["https://img.example/b.jpg"], "note": "Done."})),
                        )
                    };
                    let path = format!("/products/{product}/customizations/{id}/{step}");
                    let user = buyers[designer].user.clone();
                    let answer = match body {
                        Some(body) => app.post(&path, Some(&user), &body).await,
                        None => empty(path, user).await,
                    };
                    (answer, "customization step")
                }
                None => {
                    let body = json!({"amount": {"amount": 500, "currency": "EUR"}, "reference": "top-up"});
                    let path = format!("/wallets/{}/deposits", buyers[buyer].wallet);
                    (app.post(&path, Some(&admin), &body).await, "deposit")
                }
            },
            (_, _, _) => {
                if rng.gen_bool(0.5) {
                    let body = json!({"amount": {"amount": rng.gen_range(100..5_000), "currency": "EUR"}, "reference": "top-up"});
                    let path = format!("/wallets/{}/deposits", buyers[buyer].wallet);
                    (app.post(&path, Some(&admin), &body).await, "deposit")
                } else {
                    let body = json!({"amount": {"amount": rng.gen_range(100..2_000), "currency": "EUR"}, "reference": "payout"});
                    let path = format!("/wallets/{}/withdrawals", buyers[buyer].wallet);
                    (
                        app.post(&path, Some(&buyers[buyer].user), &body).await,
                        "withdraw",
                    )
                }
            }
        }
    };
    assert!(
        answer.status < 500,
        "{what}: {} {}",
        answer.status,
        answer.body
    );
}

/// `steps` random commands from `workers` concurrent clients.
async fn random_workload(
    app: &Arc<TestApp>,
    world: &Arc<Mutex<World>>,
    seed: u64,
    workers: u64,
    steps: usize,
) {
    let mut running = Vec::new();
    for worker in 0..workers {
        let (app, world) = (app.clone(), world.clone());
        running.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed.wrapping_add(worker));
            for _ in 0..steps {
                random_step(&app, &world, &mut rng).await;
            }
        }));
    }
    for worker in running {
        worker.await.expect("a workload client");
    }
}

fn seed() -> u64 {
    let seed = std::env::var("SOUK_TEST_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("workload seed {seed} (SOUK_TEST_SEED={seed} repeats it)");
    seed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_projection_rebuilt_from_scratch_equals_the_live_one_row_for_row_after_a_random_workload()
{
    let app = Arc::new(spawn_app().await);
    let side = ReadSide::start(&app).await;
    let world = Arc::new(Mutex::new(open_world(&app).await));
    random_workload(&app, &world, seed(), 4, 120).await;

    assert_rebuilds_equal_live(&side, true).await;
    assert_nothing_parked(&side.pool).await;
    side.stop().await;
}

/// A projector started behind a backlog many times its batch size applies
/// one batch while it fetches the next: the read models still equal a
/// rebuild, row for row.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backlog_applied_in_small_batches_fetched_ahead_equals_a_rebuild() {
    let app = Arc::new(spawn_app().await);
    let world = Arc::new(Mutex::new(open_world(&app).await));
    random_workload(&app, &world, seed(), 4, 60).await;

    let side = ReadSide::start_with(&app, Some(7)).await;
    assert_rebuilds_equal_live(&side, true).await;
    assert_nothing_parked(&side.pool).await;
    side.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_swapped_in_while_commands_flow_keeps_every_projection_exact() {
    let app = Arc::new(spawn_app().await);
    let side = ReadSide::start(&app).await;
    let world = Arc::new(Mutex::new(open_world(&app).await));
    let seed = seed();
    random_workload(&app, &world, seed, 2, 40).await;

    // Swap a rebuild of every projection in while commands keep coming.
    let during = {
        let (app, world) = (app.clone(), world.clone());
        tokio::spawn(async move { random_workload(&app, &world, seed ^ 0x5eed, 2, 60).await })
    };
    for projection in projections::PROJECTIONS {
        let report = projections::rebuild(&side.pool, projection, PARTITIONS)
            .await
            .expect("rebuilding and swapping");
        assert!(report.swapped);
        assert_eq!(report.events_parked, 0);
    }
    during.await.expect("the workload during the swaps");
    let leftovers: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'rebuild\\_%'")
            .fetch_one(&side.pool)
            .await
            .unwrap();
    assert_eq!(leftovers, 0, "a swap leaves no rebuild schema behind");

    assert_rebuilds_equal_live(&side, true).await;
    // The swapped-in tables kept the live index names.
    let index: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_indexes WHERE schemaname = 'public' AND indexname = 'rm_orders_buyer'",
    )
    .fetch_one(&side.pool)
    .await
    .unwrap();
    assert_eq!(index, 1);
    side.stop().await;
}

/// Inserts an event straight into the event store, as a bug or a bad
/// migration might: the relay publishes it like any other.
async fn insert_raw_event(
    pool: &PgPool,
    aggregate_type: &str,
    aggregate_id: Uuid,
    event_type: &str,
    payload: Value,
) -> Uuid {
    let event_id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                             payload, metadata, event_id, prev_hash, hash)
         SELECT $1, $2, coalesce(max(sequence), 0) + 1, $3, '1', $4::json, '{}'::json, $5,
                '\\x00'::bytea, '\\x00'::bytea
           FROM events WHERE aggregate_type = $1 AND aggregate_id = $2",
    )
    .bind(aggregate_type)
    .bind(aggregate_id.to_string())
    .bind(event_type)
    .bind(payload.to_string())
    .bind(event_id)
    .execute(pool)
    .await
    .expect("inserting a raw event");
    event_id
}

#[tokio::test]
async fn a_poison_event_is_parked_and_visible_and_the_projection_goes_on() {
    let app = spawn_app().await;
    let side = ReadSide::start(&app).await;
    let seller = User::new("seller");
    let wallet = app.funded_wallet(&seller, "EUR", 1_000).await;
    let listing = app.listing(&seller, 2_500, 3, Some(wallet)).await;

    // Events no projection can apply: a deposit into a wallet that was
    // never opened, an event type nobody knows, and a stock Postgres cannot
    // store (beyond `integer`), which only the database refuses.
    let unknown_wallet = insert_raw_event(
        &side.pool,
        "Wallet",
        Uuid::now_v7(),
        "FundsDeposited",
        json!({"FundsDeposited": {"amount": 5, "reference": "ghost", "available": 5}}),
    )
    .await;
    let unknown_type = insert_raw_event(
        &side.pool,
        "Wallet",
        Uuid::now_v7(),
        "WalletExploded",
        json!({"WalletExploded": {}}),
    )
    .await;
    let too_much_stock = insert_raw_event(
        &side.pool,
        "Reservation",
        listing,
        "StockSet",
        json!({"StockSet": {"quantity": 3_000_000_000u32, "available": 3_000_000_000u32}}),
    )
    .await;
    // A payload Postgres stores as `json` but cannot turn into `jsonb` (it
    // holds a NUL character): the relay passes it through as it is, and the
    // projection parks it with the NUL made storable.
    let nul = insert_raw_event(
        &side.pool,
        "Wallet",
        Uuid::now_v7(),
        "FundsDeposited",
        json!({"FundsDeposited": {"amount": 5, "reference": "nul \u{0} byte", "available": 5}}),
    )
    .await;
    // And a message on the stream that is not an event at all, from
    // another publisher. The relay must be the stream's only publisher: a
    // message of another written while the relay has two events or more to
    // publish lets the later ones in before the first (`event_store::relay`),
    // so this one comes once the relay is idle, before a single event.
    let committed: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&side.pool)
        .await
        .unwrap();
    tests::nats::wait_for_messages(
        &side.nats_url,
        &side.stream,
        committed as usize,
        Duration::from_secs(60),
    )
    .await
    .expect("the relay published every event");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "not-an-event-1");
    side.jetstream
        .publish_with_headers(
            format!("{}.events.Wallet.0", side.stream),
            headers,
            "this is not an event".into(),
        )
        .await
        .expect("publishing")
        .await
        .expect("acknowledged");

    // The projections go on: a later deposit and a later stock change apply.
    let admin = User::new("admin");
    let deposited = app
        .post(
            &format!("/wallets/{wallet}/deposits"),
            Some(&admin),
            &json!({"amount": {"amount": 500, "currency": "EUR"}, "reference": "after the poison"}),
        )
        .await;
    assert_eq!(deposited.status, 200, "{:?}", deposited.body);
    side.wait_caught_up(last_position(&side.pool).await).await;

    let letters: Vec<(String, Uuid, String, String)> = sqlx::query_as(
        "SELECT projection, event_id, event_type, error FROM dead_letters ORDER BY id",
    )
    .fetch_all(&side.pool)
    .await
    .unwrap();
    let letter = |projection: &str, event_id: Uuid| {
        letters
            .iter()
            .find(|l| l.0 == projection && l.1 == event_id)
            .unwrap_or_else(|| {
                panic!("no dead letter of {projection} for {event_id}: {letters:#?}")
            })
            .clone()
    };
    assert!(letter("wallets", unknown_wallet).3.contains("never opened"));
    assert!(letter("wallets", nul).3.contains("never opened"));
    let parked: Value = sqlx::query_scalar("SELECT envelope FROM dead_letters WHERE event_id = $1")
        .bind(nul)
        .fetch_one(&side.pool)
        .await
        .unwrap();
    assert_eq!(
        parked["payload"]["FundsDeposited"]["reference"],
        "nul \u{FFFD} byte"
    );
    let (_, _, event_type, error) = letter("wallets", unknown_type);
    assert_eq!(event_type, "WalletExploded");
    assert!(error.contains("is not a Wallet event"), "{error}");
    assert!(
        letter("listings", too_much_stock)
            .3
            .contains("Postgres refused")
    );
    let malformed: Vec<(String, Value)> = sqlx::query_as(
        "SELECT projection, envelope FROM dead_letters WHERE aggregate_type = '?' ORDER BY projection",
    )
    .fetch_all(&side.pool)
    .await
    .unwrap();
    assert_eq!(
        malformed.iter().map(|m| m.0.as_str()).collect::<Vec<_>>(),
        ["listings", "wallets"],
        "every projection whose consumer reads `Wallet.0` parks the malformed message \
         (listings reads the whole partition; orders and timelines only their own type)"
    );
    assert_eq!(malformed[0].1["body"], "this is not an event");
    assert_eq!(letters.len(), 4 + 2);
    // Counted in metrics (the process-wide recorder the command API installs;
    // other tests may count more).
    let rendered = http_kit::telemetry::metrics_handle().render();
    let counted = |projection: &str| -> f64 {
        rendered
            .lines()
            .find(|line| {
                line.starts_with("souk_projection_dead_letters_total")
                    && line.contains(&format!("projection=\"{projection}\""))
            })
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|value| value.parse().ok())
            .unwrap_or(0.0)
    };
    assert!(counted("wallets") >= 4.0, "{rendered}");
    assert!(counted("listings") >= 2.0, "{rendered}");

    let (available, stock): (i64, i32) = sqlx::query_as(
        "SELECT w.available, l.stock FROM rm_wallets w, rm_listings l
          WHERE w.wallet_id = $1 AND l.listing_id = $2",
    )
    .bind(wallet)
    .bind(listing)
    .fetch_one(&side.pool)
    .await
    .unwrap();
    assert_eq!(available, 1_500, "the deposit after the poison is applied");
    assert_eq!(stock, 3, "the refused stock change changed nothing");

    // A rebuild meets the same poison, parks nothing new, and agrees.
    assert_rebuilds_equal_live(&side, false).await;
    let parked_again: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(&side.pool)
        .await
        .unwrap();
    assert_eq!(parked_again, 6);
    side.stop().await;
}

#[tokio::test]
async fn redelivered_events_are_a_no_op() {
    let app = Arc::new(spawn_app().await);
    let side = ReadSide::start(&app).await;
    let world = Arc::new(Mutex::new(open_world(&app).await));
    // A seed whose commands are mostly refused writes few events: the
    // workload goes on, seed after seed, until there is enough to redeliver.
    let (seed, mut round) = (seed(), 0u64);
    let committed = |pool: PgPool| async move {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    while committed(side.pool.clone()).await < 100 {
        random_workload(&app, &world, seed.wrapping_add(round << 32), 1, 40).await;
        round += 1;
        assert!(round < 20, "the workload wrote too few events");
    }
    side.wait_caught_up(last_position(&side.pool).await).await;
    let applied = |pool: PgPool| async move {
        sqlx::query_scalar::<_, i64>(
            "SELECT sum(events_applied)::bigint FROM projection_checkpoints",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let before = applied(side.pool.clone()).await;

    // Publish every event again under new message ids, as a relay would
    // after the duplicate window: JetStream delivers each a second time.
    let mut after = Position::START;
    let mut copies = 0;
    loop {
        let events = event_store::global::read_after(&side.pool, after, 1_000)
            .await
            .unwrap();
        let Some(last) = events.last() else { break };
        after = last.position;
        for event in &events {
            let partition = event_store::fanout::partition_of(&event.aggregate_id, PARTITIONS);
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("again-{}", event.event_id).as_str());
            side.jetstream
                .publish_with_headers(
                    event_store::fanout::event_subject(
                        &side.stream,
                        &event.aggregate_type,
                        partition,
                    ),
                    headers,
                    serde_json::to_vec(event).unwrap().into(),
                )
                .await
                .unwrap()
                .await
                .unwrap();
            copies += 1;
        }
    }
    assert_eq!(
        copies,
        committed(side.pool.clone()).await,
        "every event published again"
    );
    eprintln!("{copies} events published again, after {round} workload rounds");
    side.wait_drained().await;

    assert_eq!(
        applied(side.pool.clone()).await,
        before,
        "nothing applied twice"
    );
    assert_rebuilds_equal_live(&side, false).await;
    let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(&side.pool)
        .await
        .unwrap();
    assert_eq!(parked, 0);

    // A restarted projector (consumers pointed at the checkpoints again)
    // applies nothing twice either.
    // The consumers are deleted first, so that "drained" below can only be
    // said of the consumers the new projector created from its checkpoints.
    let mut side = side;
    side.stop_projector().await;
    let stream = side.jetstream.get_stream(&side.stream).await.unwrap();
    for projection in projections::PROJECTIONS {
        for partition in 0..PARTITIONS {
            stream
                .delete_consumer(&projections::consumer_name(projection, partition))
                .await
                .expect("deleting a consumer");
        }
    }
    side.start_projector().await;
    side.wait_drained().await;
    assert_eq!(applied(side.pool.clone()).await, before);
    side.stop().await;
}
