//! The auditors' and operators' benchmark: `replay-tool` over a large log.
//!
//! ```sh
//! cargo run --release -p tests --bin audit-bench                    # 250,000 and 1,000,000 events
//! cargo run --release -p tests --bin audit-bench -- --sizes 100000  # one smaller log
//! cargo run --release -p tests --bin audit-bench -- --sizes 200000 --load-into URL  # keep a log
//! ```
//!
//! For each log size it creates a database of its own and fills it fast
//! (not through HTTP): a marketplace simulated with the domain's own
//! `decide` (wallets opened and funded, listings with their stock pools and
//! product timelines, checkouts that hold stock and escrow, shipments,
//! deliveries that capture escrow, price changes, withdrawals), each event
//! chained like the event store chains it, loaded with `COPY` in
//! transactions of 50,000 events. Then it measures, one after the other:
//!
//! - `COPY (SELECT ... FROM events ORDER BY transaction_id, position) TO
//!   STDOUT`: the physical limit of reading the log in global order;
//! - `replay-tool export` (to /dev/null): target ≥ 0.5× the COPY rate;
//! - `replay-tool verify` (chains, heads and invariants): ≥ 200,000 events/s;
//! - `replay-tool rebuild --all`: ≥ 50,000 events/s;
//!
//! each tool a separate process (built with this benchmark's profile), its
//! peak resident memory read from `/proc` (target ≤ 256 MB), and prints a
//! table. The verify must find the generated log intact. Databases are
//! dropped at the end, also on error or Ctrl-C. Other processes loading
//! the machine lower the figures: rerun when they look off.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use chrono::{DateTime, Utc};
use clap::Parser;
use domain::listing::{Listing, ListingCommand, ListingDetails};
use domain::order::{Order, OrderCommand, OrderLine, PaymentMethod, ShippingAddress};
use domain::reservation::{Reservation, ReservationCommand};
use domain::timeline::{ProductTimeline, TimelineCommand, TimelineEntry};
use domain::values::{
    Actor, CheckoutId, Currency, HoldId, Label, ListingId, Money, OrderId, ProductId, Reference,
    Role, UserId, WalletId,
};
use domain::wallet::{Wallet, WalletCommand};
use domain::{Decide, DomainEvent};
use event_store::record::{ChainedFields, GENESIS_HASH};
use futures::TryStreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::postgres::{PgPool, PgPoolOptions};
use tests::bench_kit::{ChildGuard, proc_status_kb, run_with_databases, service_binaries, verdict};

const TARGET_REBUILD_PER_S: f64 = 50_000.0;
const TARGET_VERIFY_PER_S: f64 = 200_000.0;
const TARGET_EXPORT_VS_COPY: f64 = 0.5;
const TARGET_RSS_MB: f64 = 256.0;
/// Events per COPY transaction while loading.
const LOAD_CHUNK: usize = 50_000;
/// How often a tool's memory is sampled.
const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(20);

#[derive(Debug, Parser)]
#[command(name = "audit-bench", about = "replay-tool over a large generated log")]
struct Args {
    /// Log sizes, in events (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "250000,1000000")]
    sizes: Vec<usize>,
    /// The maintenance database the benchmark creates its databases from.
    #[arg(
        long,
        env = "SOUK_BENCH_ADMIN_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    admin_url: String,
    /// A directory that already holds the replay-tool binary (else it is built).
    #[arg(long)]
    binaries: Option<PathBuf>,
    /// Seed of the simulated marketplace.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Only load a log of the first size into this (existing, empty)
    /// database and keep it, measuring nothing: a log to profile the tools on.
    #[arg(long)]
    load_into: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(url) = &args.load_into {
        let pool = PgPoolOptions::new().max_connections(2).connect(url).await?;
        event_store::migrate(&pool).await?;
        let size = args.sizes.first().copied().unwrap_or(250_000);
        let written = load(&pool, size, args.seed).await?;
        sqlx::query("VACUUM ANALYZE events").execute(&pool).await?;
        eprintln!("loaded {written} events into {url}");
        return Ok(());
    }
    run_with_databases(&args.admin_url.clone(), async |databases| {
        let dir = service_binaries(&["replay-tool"], args.binaries.as_deref()).await?;
        let tool = dir.join("replay-tool");
        let mut rows = Vec::new();
        for &size in &args.sizes {
            let (url, name) = databases.create().await?;
            let pool = PgPoolOptions::new()
                .max_connections(2)
                .connect(&url)
                .await?;
            event_store::migrate(&pool).await?;
            let started = Instant::now();
            let written = load(&pool, size, args.seed).await?;
            eprintln!(
                "loaded {written} events in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            sqlx::query("VACUUM ANALYZE events").execute(&pool).await?;
            let copy = copy_rate(&pool, written).await?;
            let export = run_tool(&tool, &url, &["export"], written)?;
            let verify = run_tool(&tool, &url, &["verify"], written)?;
            let rebuild = run_tool(&tool, &url, &["rebuild", "--all"], written)?;
            rows.push((written, copy, export, verify, rebuild));
            pool.close().await;
            databases.drop_one(&name).await?;
        }
        println!("{}", table(&rows));
        Ok(())
    })
    .await
}

/// One tool run: events per second and peak resident memory.
#[derive(Debug, Clone, Copy)]
struct Measured {
    per_second: f64,
    peak_rss_mb: f64,
}

fn run_tool(tool: &Path, url: &str, args: &[&str], events: usize) -> anyhow::Result<Measured> {
    eprintln!("replay-tool {}", args.join(" "));
    let started = Instant::now();
    let child = Command::new(tool)
        .args(args)
        .env("DATABASE_URL", url)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting replay-tool")?;
    let pid = child.id();
    let mut guard = ChildGuard(child, None);
    let mut peak_kb = 0;
    let status = loop {
        if let Some(kb) = proc_status_kb(pid, "VmHWM") {
            peak_kb = peak_kb.max(kb);
        }
        if let Some(status) = guard.0.try_wait()? {
            break status;
        }
        std::thread::sleep(RSS_SAMPLE_EVERY);
    };
    let seconds = started.elapsed().as_secs_f64();
    let mut stderr = String::new();
    if let Some(mut pipe) = guard.0.stderr.take() {
        use std::io::Read;
        let _ = pipe.read_to_string(&mut stderr);
    }
    ensure!(
        status.success(),
        "replay-tool {} failed ({status}): {stderr}",
        args.join(" ")
    );
    Ok(Measured {
        per_second: events as f64 / seconds,
        peak_rss_mb: peak_kb as f64 / 1024.0,
    })
}

/// Reads the log in global order with a plain COPY, the bytes discarded.
async fn copy_rate(pool: &PgPool, events: usize) -> anyhow::Result<f64> {
    let mut conn = pool.acquire().await?;
    let started = Instant::now();
    let mut stream = conn
        .copy_out_raw(
            "COPY (SELECT event_id, transaction_id, position, aggregate_type, aggregate_id, sequence,
                          event_type, event_version, recorded_at, payload, metadata, prev_hash, hash
                     FROM events ORDER BY transaction_id, position) TO STDOUT",
        )
        .await?;
    let mut bytes = 0usize;
    while let Some(chunk) = stream.try_next().await? {
        bytes += chunk.len();
    }
    let seconds = started.elapsed().as_secs_f64();
    eprintln!("COPY read {bytes} bytes in {seconds:.2} s");
    Ok(events as f64 / seconds)
}

fn table(rows: &[(usize, f64, Measured, Measured, Measured)]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| events | COPY events/s | export events/s (× COPY) | export RSS MB | verify events/s | verify RSS MB | rebuild --all events/s | rebuild RSS MB |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for (events, copy, export, verify, rebuild) in rows {
        let ratio = export.per_second / copy;
        let rss = |m: &Measured| {
            format!(
                "{:.0} {}",
                m.peak_rss_mb,
                verdict(m.peak_rss_mb <= TARGET_RSS_MB)
            )
        };
        let _ = writeln!(
            out,
            "| {events} | {copy:.0} | {:.0} ({ratio:.2}×, {}) | {} | {:.0} ({}) | {} | {:.0} ({}) | {} |",
            export.per_second,
            verdict(ratio >= TARGET_EXPORT_VS_COPY),
            rss(export),
            verify.per_second,
            verdict(verify.per_second >= TARGET_VERIFY_PER_S),
            rss(verify),
            rebuild.per_second,
            verdict(rebuild.per_second >= TARGET_REBUILD_PER_S),
            rss(rebuild),
        );
    }
    let _ = writeln!(
        out,
        "\ntargets: export >= {TARGET_EXPORT_VS_COPY}x COPY, verify >= {TARGET_VERIFY_PER_S:.0}/s, \
         rebuild --all >= {TARGET_REBUILD_PER_S:.0}/s, peak RSS <= {TARGET_RSS_MB:.0} MB"
    );
    out
}

// ---------------------------------------------------------------------------
// The simulated marketplace.

/// An aggregate's state and chain as the generator keeps them.
struct Stream<A> {
    state: A,
    version: i64,
    last_hash: [u8; 32],
}

impl<A: Default> Default for Stream<A> {
    fn default() -> Self {
        Self {
            state: A::default(),
            version: 0,
            last_hash: GENESIS_HASH,
        }
    }
}

/// Rows ready for COPY (text format).
struct Rows {
    buffer: String,
    count: usize,
    clock: DateTime<Utc>,
}

impl Rows {
    /// Decides `command` on `stream` and appends its events.
    fn decide<A: Decide>(
        &mut self,
        streams: &mut HashMap<String, Stream<A>>,
        id: &str,
        command: A::Command,
        actor: &Actor,
    ) -> anyhow::Result<()> {
        let stream = streams.entry(id.to_owned()).or_default();
        let events = stream
            .state
            .decide(command)
            .map_err(|error| anyhow::anyhow!("{} {id}: {error}", A::TYPE))?;
        for event in events {
            self.clock += chrono::TimeDelta::microseconds(137);
            let event_id = uuid::Uuid::now_v7();
            let payload = serde_json::to_string(&event)?;
            let metadata = serde_json::to_string(&serde_json::json!({
                "event_id": event_id,
                "actor_id": actor.user_id.to_string(),
                "actor_role": actor.role.as_str(),
                "command_id": event_id,
                "correlation_id": event_id,
                "causation_id": event_id,
                "recorded_at": self.clock.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            }))?;
            let sequence = stream.version + 1;
            let (event_type, event_version) = (event.event_type(), event.event_version());
            let hash = ChainedFields {
                aggregate_type: A::TYPE,
                aggregate_id: id,
                sequence,
                event_type: &event_type,
                event_version: &event_version,
                event_id,
                recorded_at_micros: self.clock.timestamp_micros(),
                payload: &payload,
                metadata: &metadata,
            }
            .hash(&stream.last_hash);
            let _ = writeln!(
                self.buffer,
                "{}\t{id}\t{sequence}\t{event_type}\t{event_version}\t{}\t{}\t{}\t{event_id}\t\\\\x{}\t\\\\x{}",
                A::TYPE,
                escape(&payload),
                escape(&metadata),
                self.clock
                    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                hex::encode(stream.last_hash),
                hex::encode(hash),
            );
            stream.state.apply(event);
            stream.version = sequence;
            stream.last_hash = hash;
            self.count += 1;
        }
        Ok(())
    }
}

/// Text for COPY's text format.
fn escape(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('\t', "\\t")
        .replace('\n', "\\n")
        .replace('\r', "\\r")
}

struct Market {
    wallets: HashMap<String, Stream<Wallet>>,
    listings: HashMap<String, Stream<Listing>>,
    pools: HashMap<String, Stream<Reservation>>,
    orders: HashMap<String, Stream<Order>>,
    timelines: HashMap<String, Stream<ProductTimeline>>,
    /// (seller, wallet)
    sellers: Vec<(UserId, WalletId)>,
    /// (buyer, wallet, balance left)
    buyers: Vec<(UserId, WalletId, i64)>,
    /// (listing, product, seller index, stock left)
    live_listings: Vec<(ListingId, ProductId, usize, u32)>,
    /// Orders by step: (order, listing index, buyer index, hold)
    confirmed: Vec<(OrderId, usize, usize, HoldId)>,
    shipped: Vec<(OrderId, usize, usize, HoldId)>,
}

fn eur(amount: i64) -> anyhow::Result<Money> {
    Ok(Money::parse_positive(amount, "EUR")?)
}

async fn load(pool: &PgPool, target: usize, seed: u64) -> anyhow::Result<usize> {
    let mut rng = StdRng::seed_from_u64(seed);
    let system = Actor::system();
    let admin = Actor::new(UserId::new(), Role::Admin);
    let mut market = Market {
        wallets: HashMap::new(),
        listings: HashMap::new(),
        pools: HashMap::new(),
        orders: HashMap::new(),
        timelines: HashMap::new(),
        sellers: Vec::new(),
        buyers: Vec::new(),
        live_listings: Vec::new(),
        confirmed: Vec::new(),
        shipped: Vec::new(),
    };
    let mut rows = Rows {
        buffer: String::new(),
        count: 0,
        clock: Utc::now() - chrono::TimeDelta::days(30),
    };
    let mut written = 0;
    let details: ListingDetails = serde_json::from_value(serde_json::json!({
        "title": "Brass lamp",
        "description": "Works, some patina.",
        "category": "home",
        "subcategory": "lamps",
        "condition": "good",
        "location": {"city": "Lyon", "country": "FR", "lat": 45.76, "lon": 4.83},
        "attributes": {"height_cm": 40},
        "images": ["https://img.example/lamp.jpg"],
    }))
    .context("listing details")?;
    let address = ShippingAddress::parse("Ana", "3 rue Mercière", None, "Lyon", "69002", "FR")?;
    let currency = Currency::parse("EUR")?;
    while written + rows.count < target {
        let choice = rng.gen_range(0..100);
        if market.sellers.len() < 50 || choice < 3 {
            let seller = UserId::new();
            let wallet = WalletId::new();
            let actor = Actor::new(seller, Role::Seller);
            rows.decide(
                &mut market.wallets,
                &wallet.to_string(),
                WalletCommand::Open {
                    actor,
                    wallet_id: wallet,
                    currency: currency.clone(),
                },
                &actor,
            )?;
            market.sellers.push((seller, wallet));
        } else if market.buyers.len() < 200 || choice < 8 {
            let buyer = UserId::new();
            let wallet = WalletId::new();
            let actor = Actor::new(buyer, Role::Buyer);
            rows.decide(
                &mut market.wallets,
                &wallet.to_string(),
                WalletCommand::Open {
                    actor,
                    wallet_id: wallet,
                    currency: currency.clone(),
                },
                &actor,
            )?;
            market.buyers.push((buyer, wallet, 0));
        } else if market.live_listings.len() < 100 || choice < 20 {
            let index = rng.gen_range(0..market.sellers.len());
            let (seller, payout) = market.sellers[index];
            let actor = Actor::new(seller, Role::Seller);
            let (listing, product) = (ListingId::new(), ProductId::new());
            let price = eur(rng.gen_range(500..5_000))?;
            let quantity = rng.gen_range(1..20);
            rows.decide(
                &mut market.listings,
                &listing.to_string(),
                ListingCommand::Create {
                    actor,
                    listing_id: listing,
                    product_id: product,
                    details: details.clone(),
                    price: price.clone(),
                    payout_wallet: Some(payout),
                },
                &actor,
            )?;
            rows.decide(
                &mut market.pools,
                &listing.to_string(),
                ReservationCommand::OpenPool {
                    actor: system,
                    listing_id: listing,
                    seller,
                    quantity,
                },
                &system,
            )?;
            rows.decide(
                &mut market.timelines,
                &product.to_string(),
                TimelineCommand::Record {
                    actor: system,
                    product_id: product,
                    entry: TimelineEntry::Listed {
                        listing_id: listing,
                        seller,
                        price,
                    },
                },
                &system,
            )?;
            market
                .live_listings
                .push((listing, product, index, quantity));
        } else if choice < 40 {
            let index = rng.gen_range(0..market.buyers.len());
            let amount = rng.gen_range(1_000..50_000);
            let wallet = market.buyers[index].1;
            rows.decide(
                &mut market.wallets,
                &wallet.to_string(),
                WalletCommand::Deposit {
                    actor: admin,
                    amount: eur(amount)?,
                    reference: Reference::parse("reference", "top-up")?,
                },
                &admin,
            )?;
            market.buyers[index].2 += amount;
        } else if choice < 47 {
            let index = rng.gen_range(0..market.live_listings.len());
            let (listing, product, seller, _) = market.live_listings[index];
            let actor = Actor::new(market.sellers[seller].0, Role::Seller);
            let price = eur(rng.gen_range(500..5_000))?;
            let id = listing.to_string();
            if market.listings[&id].state.price() == &price {
                continue;
            }
            rows.decide(
                &mut market.listings,
                &id,
                ListingCommand::ChangePrice {
                    actor,
                    price: price.clone(),
                },
                &actor,
            )?;
            rows.decide(
                &mut market.timelines,
                &product.to_string(),
                TimelineCommand::Record {
                    actor: system,
                    product_id: product,
                    entry: TimelineEntry::PriceChanged {
                        listing_id: listing,
                        price,
                    },
                },
                &system,
            )?;
        } else if choice < 75 {
            // A checkout of one unit: stock held, escrow held, confirmed.
            let buyer_index = rng.gen_range(0..market.buyers.len());
            let listing_index = rng.gen_range(0..market.live_listings.len());
            let (listing, product, seller_index, stock) = market.live_listings[listing_index];
            let price = market.listings[&listing.to_string()].state.price().clone();
            let (buyer, buyer_wallet, balance) = market.buyers[buyer_index];
            if stock == 0 || balance < price.amount() {
                continue;
            }
            let (seller, seller_wallet) = market.sellers[seller_index];
            let (order, hold) = (OrderId::new(), HoldId::new());
            let buyer_actor = Actor::new(buyer, Role::Buyer);
            rows.decide(
                &mut market.pools,
                &listing.to_string(),
                ReservationCommand::Reserve {
                    actor: system,
                    hold_id: hold,
                    holder: buyer,
                    quantity: 1,
                    expires_at: rows.clock + chrono::TimeDelta::days(60),
                    order_id: Some(order),
                    now: rows.clock,
                },
                &system,
            )?;
            rows.decide(
                &mut market.orders,
                &order.to_string(),
                OrderCommand::Place {
                    actor: buyer_actor,
                    order_id: order,
                    checkout_id: CheckoutId::new(),
                    seller,
                    lines: vec![OrderLine {
                        listing_id: listing,
                        product_id: product,
                        quantity: 1,
                        unit_price: price.clone(),
                        hold_id: hold,
                    }],
                    shipping_address: address.clone(),
                    payment_method: PaymentMethod::WalletEscrow,
                    buyer_wallet: Some(buyer_wallet),
                    seller_wallet: Some(seller_wallet),
                },
                &buyer_actor,
            )?;
            rows.decide(
                &mut market.wallets,
                &buyer_wallet.to_string(),
                WalletCommand::HoldFunds {
                    actor: system,
                    order_id: order,
                    amount: price.clone(),
                    payee_wallet: seller_wallet,
                },
                &system,
            )?;
            rows.decide(
                &mut market.orders,
                &order.to_string(),
                OrderCommand::Confirm { actor: system },
                &system,
            )?;
            rows.decide(
                &mut market.pools,
                &listing.to_string(),
                ReservationCommand::Confirm {
                    actor: system,
                    hold_id: hold,
                },
                &system,
            )?;
            rows.decide(
                &mut market.timelines,
                &product.to_string(),
                TimelineCommand::Record {
                    actor: system,
                    product_id: product,
                    entry: TimelineEntry::Sold {
                        order_id: order,
                        buyer,
                        price: price.clone(),
                    },
                },
                &system,
            )?;
            market.buyers[buyer_index].2 -= price.amount();
            market.live_listings[listing_index].3 -= 1;
            market
                .confirmed
                .push((order, listing_index, buyer_index, hold));
        } else if choice < 87 && !market.confirmed.is_empty() {
            let (order, listing_index, buyer_index, hold) = market
                .confirmed
                .swap_remove(rng.gen_range(0..market.confirmed.len()));
            let seller = market.sellers[market.live_listings[listing_index].2].0;
            let actor = Actor::new(seller, Role::Seller);
            rows.decide(
                &mut market.orders,
                &order.to_string(),
                OrderCommand::Ship {
                    actor,
                    carrier: Label::parse("carrier", "La Poste")?,
                    tracking_number: Label::parse("tracking", "LP123")?,
                    now: rows.clock,
                    release_after: domain::order::AUTO_RELEASE_AFTER,
                },
                &actor,
            )?;
            market
                .shipped
                .push((order, listing_index, buyer_index, hold));
        } else if !market.shipped.is_empty() {
            let (order, listing_index, buyer_index, _) = market
                .shipped
                .swap_remove(rng.gen_range(0..market.shipped.len()));
            let buyer = Actor::new(market.buyers[buyer_index].0, Role::Buyer);
            rows.decide(
                &mut market.orders,
                &order.to_string(),
                OrderCommand::Deliver {
                    actor: buyer,
                    now: rows.clock,
                    return_window: domain::order::RETURN_WINDOW,
                },
                &buyer,
            )?;
            let buyer_wallet = market.buyers[buyer_index].1;
            let seller_wallet = market.sellers[market.live_listings[listing_index].2].1;
            let amount = eur(market.wallets[&buyer_wallet.to_string()]
                .state
                .holds()
                .get(&order)
                .map_or(0, |hold| hold.amount))?;
            rows.decide(
                &mut market.wallets,
                &buyer_wallet.to_string(),
                WalletCommand::CaptureHold {
                    actor: system,
                    order_id: order,
                },
                &system,
            )?;
            rows.decide(
                &mut market.wallets,
                &seller_wallet.to_string(),
                WalletCommand::ReceiveEscrow {
                    actor: system,
                    order_id: order,
                    amount,
                    payer_wallet: buyer_wallet,
                },
                &system,
            )?;
        }
        if rows.count >= LOAD_CHUNK {
            written += flush(pool, &mut rows).await?;
        }
    }
    written += flush(pool, &mut rows).await?;
    Ok(written)
}

/// COPYs the buffered rows in one transaction.
async fn flush(pool: &PgPool, rows: &mut Rows) -> anyhow::Result<usize> {
    if rows.count == 0 {
        return Ok(0);
    }
    let mut conn = pool.acquire().await?;
    let mut copy = conn
        .copy_in_raw(
            "COPY events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                          payload, metadata, recorded_at, event_id, prev_hash, hash) FROM STDIN",
        )
        .await?;
    copy.send(std::mem::take(&mut rows.buffer).into_bytes())
        .await?;
    copy.finish().await.context("loading events")?;
    let count = std::mem::take(&mut rows.count);
    eprint!(".");
    Ok(count)
}
