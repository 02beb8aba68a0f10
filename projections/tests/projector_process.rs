//! The real `projector` binary, killed with SIGKILL in the middle of a batch
//! (a transaction that has written read-model rows and not committed) and
//! started again, several times: the read models end up exactly what a
//! rebuild from the event store gives, nothing is parked, and every event is
//! counted as applied exactly once.
//!
//! Real Postgres (`SOUK_TEST_ADMIN_URL`, a database of the test's own) and
//! real NATS (`SOUK_TEST_NATS_URL` or `NATS_URL`, a stream of the test's own,
//! deleted at the end). Events are written with the event store and
//! published by the real relay, in this process.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use domain::listing::{Condition, ListingCommand, ListingDetails};
use domain::reservation::ReservationCommand;
use domain::values::{
    Actor, Currency, Description, Label, ListingId, Location, Money, ProductId, Reference, Role,
    Title, UserId, WalletId,
};
use domain::wallet::WalletCommand;
use event_store::relay::{Relay, RelayConfig};
use event_store::{CommandContext, EventStore, Position, Reply, StoreConfig};
use futures::StreamExt;
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

const PARTITIONS: u32 = 4;
const WALLETS: usize = 200;
const DEPOSITS: usize = 24;
const LISTINGS: usize = 40;
const STOCK_CHANGES: u32 = 10;
const KILLS: usize = 3;
const WAIT: Duration = Duration::from_secs(120);

fn admin_url() -> String {
    std::env::var("SOUK_TEST_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

fn nats_url() -> String {
    std::env::var("SOUK_TEST_NATS_URL")
        .or_else(|_| std::env::var("NATS_URL"))
        .unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

fn with_database(url: &str, database: &str) -> String {
    let (base, query) = url.split_at(url.find('?').unwrap_or(url.len()));
    let authority = base.find("://").map_or(0, |at| at + 3);
    match base[authority..].rfind('/') {
        Some(slash) => format!("{}/{database}{query}", &base[..authority + slash]),
        None => format!("{base}/{database}{query}"),
    }
}

/// The test's database, its stream, and the projector process: all gone
/// with the guard, even when the test fails.
struct Fixture {
    database: String,
    url: String,
    stream: String,
    projector: Option<Child>,
}

impl Fixture {
    async fn new() -> Self {
        let database = format!("souk_test_{}", Uuid::now_v7().simple());
        let mut admin = PgConnection::connect(&admin_url()).await.expect("admin");
        sqlx::query(&format!("CREATE DATABASE {database}"))
            .execute(&mut admin)
            .await
            .expect("creating the test database");
        Self {
            url: with_database(&admin_url(), &database),
            database,
            stream: format!("souk_test_{}", Uuid::now_v7().simple()),
            projector: None,
        }
    }

    fn start_projector(&mut self, metrics_addr: Option<&str>) {
        let mut command = Command::new(env!("CARGO_BIN_EXE_projector"));
        if let Some(addr) = metrics_addr {
            command.env("SOUK_PROJECTOR_METRICS_ADDR", addr);
        }
        let child = command
            .env("DATABASE_URL", &self.url)
            .env("NATS_URL", nats_url())
            .env("SOUK_STREAM", &self.stream)
            .env("SOUK_PARTITIONS", PARTITIONS.to_string())
            .env("SOUK_PROJECTOR_BATCH_MAX", "100")
            .env("SEARCH_BACKEND", "off")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("starting the projector binary");
        self.projector = Some(child);
    }

    /// SIGKILL: no shutdown, no rollback, no goodbye.
    fn kill_projector(&mut self) {
        if let Some(mut child) = self.projector.take() {
            child.kill().expect("killing the projector");
            child.wait().expect("reaping the projector");
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.kill_projector();
        let (database, stream) = (self.database.clone(), self.stream.clone());
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async move {
                if let Ok(client) = async_nats::connect(nats_url()).await {
                    let _ = async_nats::jetstream::new(client)
                        .delete_stream(&stream)
                        .await;
                }
                let mut admin = PgConnection::connect(&admin_url()).await.ok()?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
                    .execute(&mut admin)
                    .await
                    .ok()
            })
        })
        .join();
    }
}

fn context(actor: &Actor) -> CommandContext {
    CommandContext::new(actor.user_id.as_uuid(), actor.role.as_str(), Uuid::now_v7())
}

/// Wallets with deposits, and listings whose stock changes: thousands of
/// events over every partition.
async fn write_events(store: &EventStore) {
    let eur = Currency::parse("EUR").unwrap();
    let wallets = futures::stream::iter(0..WALLETS)
        .map(|_| {
            let eur = eur.clone();
            async move {
                let owner = Actor::new(UserId::new(), Role::Buyer);
                let wallet_id = WalletId::new();
                let id = wallet_id.to_string();
                let open = WalletCommand::Open {
                    actor: owner,
                    wallet_id,
                    currency: eur,
                };
                store
                    .execute::<domain::wallet::Wallet>(
                        &id,
                        open,
                        context(&owner),
                        None,
                        Reply::new(201, &id),
                    )
                    .await
                    .expect("opening a wallet");
                for n in 0..DEPOSITS {
                    let system = Actor::system();
                    let deposit = WalletCommand::Deposit {
                        actor: system,
                        amount: Money::parse_positive(100 + n as i64, "EUR").unwrap(),
                        reference: Reference::parse("reference", &format!("deposit {n}")).unwrap(),
                    };
                    store
                        .execute::<domain::wallet::Wallet>(
                            &id,
                            deposit,
                            context(&system),
                            None,
                            Reply::new(200, &id),
                        )
                        .await
                        .expect("depositing");
                }
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>();
    let listings = futures::stream::iter(0..LISTINGS)
        .map(|n| async move {
            let seller = Actor::new(UserId::new(), Role::Seller);
            let listing_id = ListingId::new();
            let id = listing_id.to_string();
            let details = ListingDetails {
                title: Title::parse("title", &format!("Lamp {n}")).unwrap(),
                description: Description::parse("description", "Brass.").unwrap(),
                category: Label::parse("category", "home").unwrap(),
                subcategory: None,
                condition: Condition::Good,
                location: Location::parse("Lyon", "FR", None, None).unwrap(),
                attributes: Default::default(),
                images: Vec::new(),
            };
            let create = ListingCommand::Create {
                actor: seller,
                listing_id,
                product_id: ProductId::new(),
                details,
                price: Money::parse_positive(1_000 + n as i64, "EUR").unwrap(),
                payout_wallet: None,
            };
            store
                .execute::<domain::listing::Listing>(
                    &id,
                    create,
                    context(&seller),
                    None,
                    Reply::new(201, &id),
                )
                .await
                .expect("creating a listing");
            let open = ReservationCommand::OpenPool {
                actor: seller,
                listing_id,
                seller: seller.user_id,
                quantity: 1,
            };
            store
                .execute::<domain::reservation::Reservation>(
                    &id,
                    open,
                    context(&seller),
                    None,
                    Reply::new(201, &id),
                )
                .await
                .expect("opening a stock pool");
            for quantity in 2..2 + STOCK_CHANGES {
                let set = ReservationCommand::SetStock {
                    actor: seller,
                    quantity,
                };
                store
                    .execute::<domain::reservation::Reservation>(
                        &id,
                        set,
                        context(&seller),
                        None,
                        Reply::new(200, &id),
                    )
                    .await
                    .expect("setting stock");
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>();
    futures::join!(wallets, listings);
}

async fn last_position(pool: &PgPool) -> Position {
    let (transaction_id, position): (i64, i64) = sqlx::query_as(
        "SELECT transaction_id::text::bigint, position FROM events
          ORDER BY transaction_id DESC, position DESC LIMIT 1",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    Position {
        transaction_id: transaction_id as u64,
        position,
    }
}

/// Waits until `done` holds, or fails with `what`.
async fn wait_for<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !done().await {
        assert!(started.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A transaction of the projector that has written and not ended: its
/// backend and its full (64-bit) transaction id.
async fn open_projector_transaction(pool: &PgPool) -> Option<(i32, i64)> {
    let row: Option<(i32, String, String)> = sqlx::query_as(
        "SELECT pid, backend_xid::text, pg_snapshot_xmax(pg_current_snapshot())::text
           FROM pg_stat_activity
          WHERE datname = current_database() AND application_name = 'souk-projector'
            AND backend_xid IS NOT NULL
          LIMIT 1",
    )
    .fetch_optional(pool)
    .await
    .unwrap_or_else(|error| panic!("reading pg_stat_activity: {error}"));
    let (pid, xid, xmax) = row?;
    let xid: u64 = xid.parse().ok()?;
    let xmax: u64 = xmax.parse().ok()?;
    // backend_xid is the low 32 bits: the full id is the one with those bits
    // nearest to the current xmax (it may be a little above or below it).
    let half = 1_i128 << 31;
    let mut full = i128::from((xmax >> 32) << 32 | xid);
    if full > i128::from(xmax) + half {
        full -= 1 << 32;
    } else if full + half < i128::from(xmax) {
        full += 1 << 32;
    }
    Some((pid, full as i64))
}

/// The body of a plain HTTP GET.
async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connecting");
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_projector_mid_batch_and_restarting_it_leaves_the_read_models_exact() {
    let mut fixture = Fixture::new().await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&fixture.url)
        .await
        .unwrap();
    event_store::migrate(&pool).await.unwrap();
    let store = EventStore::new(pool.clone(), StoreConfig::default());
    write_events(&store).await;
    let last = last_position(&pool).await;

    // The real relay publishes everything before the projector starts, so
    // the projector has a long backlog to be killed in.
    let (stop_relay, relay_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut relay_config = RelayConfig::new(nats_url(), &fixture.stream);
    relay_config.partitions = PARTITIONS;
    relay_config.poll_interval = Duration::from_millis(50);
    let relay = tokio::spawn(
        Relay::new(pool.clone(), relay_config).run_until(async move {
            let _ = relay_stopped.await;
        }),
    );
    let stream = fixture.stream.clone();
    wait_for("the relay to publish every event", || {
        let pool = pool.clone();
        let stream = stream.clone();
        async move {
            let at: Option<(i64, i64)> = sqlx::query_as(
                "SELECT transaction_id, position FROM relay_checkpoints WHERE stream = $1",
            )
            .bind(&stream)
            .fetch_optional(&pool)
            .await
            .unwrap();
            at.is_some_and(|(t, p)| (t as u64, p) >= (last.transaction_id, last.position))
        }
    })
    .await;

    let mut killed_mid_batch = Vec::new();
    for _ in 0..KILLS {
        fixture.start_projector(None);
        let started = Instant::now();
        let open = loop {
            if let Some(open) = open_projector_transaction(&pool).await {
                break Some(open);
            }
            if started.elapsed() > WAIT {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        fixture.kill_projector();
        let Some((pid, xid)) = open else { break };
        // Postgres ends the orphaned backend and rolls its transaction back.
        wait_for("the killed backend to go", || {
            let pool = pool.clone();
            async move {
                let alive: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)",
                )
                .bind(pid)
                .fetch_one(&pool)
                .await
                .unwrap();
                !alive
            }
        })
        .await;
        let status: Option<String> = sqlx::query_scalar("SELECT pg_xact_status($1::text::xid8)")
            .bind(xid.to_string())
            .fetch_one(&pool)
            .await
            .unwrap();
        killed_mid_batch.push(status);
    }
    eprintln!("transactions in flight when the projector was killed ended {killed_mid_batch:?}");
    assert!(
        killed_mid_batch
            .iter()
            .any(|status| status.as_deref() == Some("aborted")),
        "no kill caught a batch in flight: {killed_mid_batch:?}"
    );

    let metrics_addr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().to_string()
    };
    fixture.start_projector(Some(&metrics_addr));
    wait_for("the projector to catch up", || {
        let pool = pool.clone();
        async move {
            let (rows, behind): (i64, i64) = sqlx::query_as(
                "SELECT count(*), count(*) FILTER (WHERE (caught_up_transaction, caught_up_position) < ($1, $2))
                   FROM projection_checkpoints",
            )
            .bind(last.transaction_id as i64)
            .bind(last.position)
            .fetch_one(&pool)
            .await
            .unwrap();
            rows == (projections::PROJECTIONS.len() as u32 * PARTITIONS) as i64 && behind == 0
        }
    })
    .await;

    for projection in projections::PROJECTIONS {
        let schema = format!("check_{projection}");
        let report = projections::rebuild_into(&pool, projection, &schema, PARTITIONS)
            .await
            .unwrap();
        assert_eq!(report.position, last);
        for table in projections::tables(projection).unwrap() {
            for (left, right) in [("public", schema.as_str()), (schema.as_str(), "public")] {
                let differing: i64 = sqlx::query_scalar(&format!(
                    "SELECT count(*) FROM (SELECT * FROM {left}.{table} EXCEPT ALL SELECT * FROM {right}.{table}) d"
                ))
                .fetch_one(&pool)
                .await
                .unwrap();
                assert_eq!(
                    differing, 0,
                    "{left}.{table} has rows {right}.{table} has not"
                );
            }
        }
        let applied: i64 = sqlx::query_scalar(
            "SELECT sum(events_applied)::bigint FROM projection_checkpoints WHERE projection = $1",
        )
        .bind(projection)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(
            applied as u64, report.events_applied,
            "{projection}: every event counted as applied exactly once"
        );
    }
    let expected_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM rm_wallet_entries")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(expected_rows as usize, WALLETS * (1 + DEPOSITS));
    let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(parked, 0);

    // The binary counts what it applied on /metrics.
    let metrics = http_get(&metrics_addr, "/metrics").await;
    assert!(
        metrics.contains("souk_projection_events_applied_total{projection=\"wallets\"}"),
        "{metrics}"
    );

    fixture.kill_projector();
    let _ = stop_relay.send(());
    let _ = relay.await;
    pool.close().await;
}
