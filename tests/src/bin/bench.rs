//! Souk's write-path benchmark: one run, one table, so the ratios hold.
//!
//! ```sh
//! cargo run --release -p tests --bin bench            # all rows, 10 s measured each
//! cargo run --release -p tests --bin bench -- --help  # flags
//! ```
//!
//! Every row executes the same command (a 100 EUR-cent deposit on a wallet)
//! from `--concurrency` tasks (64), each on its own wallets, against a
//! database of its own on the Postgres of `--admin-url`:
//!
//! 1. `raw sqlx append`: the physical limit, one plain INSERT of the event row
//!    Souk would write (same table, same columns, values of the same size)
//!    per transaction;
//! 2. `plain cqrs-es + postgres-es`: what a user would pick instead, on
//!    postgres-es's own schema;
//! 3. `Souk in process`: `event_store::EventStore::execute`;
//! 4. `Souk over HTTP`: the `command-api` binary, built by this benchmark
//!    (`cargo build` of the same profile) and started as a separate process,
//!    driven over keep-alive HTTP connections; its memory is sampled;
//! 5. `Souk over HTTP, limiter on`: row 4 on a command API configured with
//!    a rate limit per user too high to trigger (`--rate-limit`, also its
//!    burst), measured against row 4 on a new command API without one, in
//!    slices of their own (see below): the limiter's cost;
//! 6. checkouts over HTTP (`POST /orders`, one line, wallet escrow, each
//!    task a buyer with a funded wallet of its own) on a third command API:
//!    `checkout: own listings` (each task its own seller and listings, so no
//!    two checkouts share an aggregate), `checkout: one seller` (one seller's
//!    `--checkout-listings` listings, picked at random by every task) and
//!    `checkout: N sellers` (the same listings spread over
//!    `--checkout-sellers` sellers). Every answer must say the order is
//!    confirmed, and the orders placed and confirmed are counted in the
//!    database at the end;
//! 7. the snapshot check: one deposit through a fresh `EventStore` (empty
//!    cache) on a wallet of `--snapshot-events` events versus on a new one.
//!
//! Rows are measured in `--rounds` interleaved slices (each slice a
//! warm-up, then `--seconds / --rounds` measured), so that load from other
//! processes that comes and goes hits every row alike and the ratios hold,
//! in three groups one after the other: rows 1 to 4; row 5 and row 4 again
//! (two new command APIs alike but for the limiter); the checkout rows. The groups keep the idle command APIs' connections within
//! Postgres's default 100 (each API keeps up to `--pool-size`). Each slice
//! of rows 1 to 3 gets fresh connection pools. CPU time of this process, of
//! the command API and of Postgres is accounted per command, and other load
//! on the machine is reported.
//!
//! Every database is created for the run and dropped at the end, also on
//! error or Ctrl-C; the child processes are killed. Progress goes to stderr,
//! the table to stdout. Targets are printed as MET or MISSED; they never fail
//! the run.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use clap::{Parser, ValueEnum};
use domain::DomainEvent;
use domain::values::{Actor, Currency, Money, Reference, Role, UserId, WalletId};
use domain::wallet::{Wallet, WalletCommand, WalletEvent};
use event_store::record::{ChainedFields, EventMetadata, GENESIS_HASH};
use event_store::{CommandContext, EventStore, PoolConfig, Reply, StoreConfig};
use futures::future::BoxFuture;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::postgres::{PgPool, PgPoolOptions};
use tests::bench_kit::{
    ChildGuard, Databases, Sample, TempDir, free_port, in_parallel, log_tail, percentile_ms,
    print_slow_windows, proc_status_kb, service_binaries, verdict, wait_healthy,
};
use uuid::Uuid;

/// The body every HTTP deposit sends.
const DEPOSIT_BODY: &str = r#"{"amount":{"amount":100,"currency":"EUR"},"reference":"bench"}"#;
const DEPOSIT_MINOR_UNITS: i64 = 100;
const CURRENCY: &str = "EUR";
const REFERENCE: &str = "bench";
/// Longest wait for one command before it is counted as an error.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Cores busy with other work during a row above which its figures are
/// flagged as disturbed.
const OTHER_LOAD_WARN_CORES: f64 = 0.25;
/// How often the command API's memory is sampled during its load.
const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(200);
/// Most deposits in flight while seeding the large aggregate (its lane
/// batches them; the store queues at most `StoreConfig::queue_max`).
const SEED_IN_FLIGHT: usize = 2048;

// The targets of the issue, printed beside the figures.
const TARGET_IN_PROCESS_VS_CQRS: f64 = 1.0;
const TARGET_HTTP_COMMANDS_PER_S: f64 = 1500.0;
const TARGET_HTTP_P99_MS: f64 = 50.0;
const TARGET_RSS_MB: f64 = 150.0;
const TARGET_SNAPSHOT_RATIO: f64 = 2.0;
/// Issue 12: HTTP throughput with the limiter on over off.
const TARGET_LIMITER_RATIO: f64 = 0.95;
/// Issue 11: checkouts on their own listings and wallets.
const TARGET_CHECKOUT_OWN_PER_S: f64 = 800.0;
/// Issue 13: checkouts of one seller.
const TARGET_CHECKOUT_ONE_SELLER_PER_S: f64 = 1000.0;
const TARGET_CHECKOUT_P99_MS: f64 = 50.0;
/// Issue 13: checkouts spread over many sellers are no slower than one
/// seller's.
const TARGET_SELLERS_VS_ONE_SELLER: f64 = 1.0;

/// Price of every checkout listing, in EUR cents.
const CHECKOUT_PRICE_MINOR_UNITS: i64 = 100;
/// Stock of every checkout listing (the command API's most).
const CHECKOUT_STOCK: u32 = 1_000_000;
/// Funds of every checkout buyer, in EUR cents: ten million checkouts.
const CHECKOUT_FUNDS_MINOR_UNITS: i64 = 1_000_000_000;
/// Most requests in flight while seeding the checkout rows.
const SEED_HTTP_IN_FLIGHT: usize = 32;
const SHIPPING_ADDRESS: &str = r#"{"name":"Ana Ruiz","line1":"3 rue Merciere","city":"Lyon","postal_code":"69002","country":"FR"}"#;

/// Postgres DDL of postgres-es 0.5.0 (`db/init.sql`), events and snapshots.
const POSTGRES_ES_DDL: &str = "
CREATE TABLE events
(
    aggregate_type text                         NOT NULL,
    aggregate_id   text                         NOT NULL,
    sequence       bigint CHECK (sequence >= 0) NOT NULL,
    event_type     text                         NOT NULL,
    event_version  text                         NOT NULL,
    payload        json                         NOT NULL,
    metadata       json                         NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);
CREATE TABLE snapshots
(
    aggregate_type   text                                 NOT NULL,
    aggregate_id     text                                 NOT NULL,
    last_sequence    bigint CHECK (last_sequence >= 0)    NOT NULL,
    current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL,
    payload          json                                 NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
);
";

/// The INSERT of the raw row: Souk's columns, one event, its position back.
const RAW_INSERT: &str = "
INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                    payload, metadata, recorded_at, event_id, prev_hash, hash)
VALUES ($1, $2, $3, $4, $5, $6::text::json, $7::text::json, $8, $9, $10, $11)
RETURNING position, transaction_id::text::bigint";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RowKind {
    Raw,
    CqrsEs,
    Souk,
    Http,
    HttpLimited,
    CheckoutOwn,
    CheckoutOneSeller,
    CheckoutSellers,
    Snapshot,
}

/// Souk's write-path benchmark (see the crate docs of `tests/src/bin/bench.rs`).
#[derive(Debug, Parser)]
#[command(
    name = "bench",
    about = "Souk's write-path benchmark: prints one table"
)]
struct Args {
    /// Measured seconds per row, over all its slices.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    seconds: u64,

    /// Slices each row's measured time is cut into, interleaved with the
    /// other rows' slices.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=100))]
    rounds: u64,

    /// Warm-up seconds before each slice, not measured.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(0..=60))]
    warmup_seconds: u64,

    /// Concurrent tasks (HTTP connections for the HTTP row).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1024))]
    concurrency: u64,

    /// Wallets per task, used round-robin.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=1024))]
    wallets_per_task: u64,

    /// Postgres connections of each row's pool (and of the command API).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=90))]
    pool_size: u32,

    /// Most measured commands per row, whatever the duration.
    #[arg(long, default_value_t = 5_000_000, value_parser = clap::value_parser!(u64).range(1..=50_000_000))]
    max_commands: u64,

    /// Events of the large aggregate of the snapshot row.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=2_000_000))]
    snapshot_events: u64,

    /// Deposits timed on each of the large and the new aggregates.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    snapshot_samples: u64,

    /// Rows to run, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "raw,cqrs-es,souk,http,http-limited,checkout-own,checkout-one-seller,checkout-sellers,snapshot"
    )]
    rows: Vec<RowKind>,

    /// Requests per second per user (and burst) of the limited HTTP row:
    /// high enough never to trigger.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u32).range(1..))]
    rate_limit: u32,

    /// Listings of the one-seller and many-seller checkout rows (and of the
    /// own-listings row, split among its tasks).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    checkout_listings: u64,

    /// Sellers of the many-seller checkout row.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    checkout_sellers: u64,

    /// Open-loop checkout rates, checkouts per second (comma-separated,
    /// e.g. `800,1000`): after their closed-loop rounds, the checkout rows
    /// run again at each rate, the checkouts scheduled evenly over the
    /// `--concurrency` connections and each one's latency counted from its
    /// scheduled time (a connection that falls behind sends late, and that
    /// wait counts).
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    checkout_rate: Vec<u32>,

    /// Maintenance database the benchmark creates its databases from.
    #[arg(
        long,
        env = "SOUK_BENCH_ADMIN_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres",
        hide_env_values = true
    )]
    admin_url: String,

    /// A `command-api` binary to use instead of building one.
    #[arg(long)]
    command_api: Option<PathBuf>,

    /// Appends every measured command to this CSV file (`slice label, row,
    /// scheduled or sent time in Unix milliseconds, latency in
    /// milliseconds, ok`), to find when slow answers happen and set them
    /// beside the database's and the services' own traces.
    #[arg(long)]
    timeline: Option<PathBuf>,
}

impl Args {
    fn wallet_count(&self) -> usize {
        (self.concurrency * self.wallets_per_task) as usize
    }

    fn slice(&self) -> Duration {
        Duration::from_secs_f64(self.seconds as f64 / self.rounds as f64)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tests::bench_kit::run_with_databases(&args.admin_url, async |databases| {
        run(&args, databases).await
    })
    .await
}

async fn run(args: &Args, databases: &Databases) -> anyhow::Result<()> {
    let server_version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&databases.admin)
        .await
        .context("reading the Postgres version")?;
    let wanted = |kind| args.rows.contains(&kind);
    let any_http = [
        RowKind::Http,
        RowKind::HttpLimited,
        RowKind::CheckoutOwn,
        RowKind::CheckoutOneSeller,
        RowKind::CheckoutSellers,
    ]
    .into_iter()
    .any(wanted);
    let binary = if any_http {
        Some(command_api_binary(args).await?)
    } else {
        None
    };
    let binary = || binary.clone().context("no command-api binary");
    let mut report = Report::default();

    // Group 1: the deposit rows, from the physical limit to HTTP.
    let mut targets = Vec::new();
    if wanted(RowKind::Raw) {
        targets.push(Target::Raw(RawTarget::set_up(args, databases).await?));
    }
    if wanted(RowKind::CqrsEs) {
        targets.push(Target::Cqrs(CqrsTarget::set_up(args, databases).await?));
    }
    if wanted(RowKind::Souk) {
        targets.push(Target::Souk(SoukTarget::set_up(args, databases).await?));
    }
    if wanted(RowKind::Http) {
        let http = HttpTarget::set_up(args, databases, &binary()?, None).await?;
        targets.push(Target::Http(http));
    }
    let measured = measure_rounds(args, &mut targets, "", None).await?;
    for (target, measured) in targets.into_iter().zip(measured) {
        match target {
            Target::Raw(_) => report.raw = Some(measured),
            Target::Cqrs(_) => report.cqrs = Some(measured),
            Target::Souk(_) => report.souk = Some(measured),
            // Its command API stops here, so the next groups' fit within
            // Postgres's connections.
            Target::Http(http) => {
                let memory = http.finish(&measured);
                report.http = Some(HttpRun { measured, memory });
            }
            Target::Checkout(_) => bail!("a checkout row among the deposit rows"),
        }
    }

    // Group 2: two new command APIs alike but for the rate limiter.
    if wanted(RowKind::HttpLimited) {
        let mut pair = vec![
            Target::Http(HttpTarget::set_up(args, databases, &binary()?, None).await?),
            Target::Http(
                HttpTarget::set_up(args, databases, &binary()?, Some(args.rate_limit)).await?,
            ),
        ];
        let measured = measure_rounds(args, &mut pair, "limiter: ", None).await?;
        for (target, measured) in pair.into_iter().zip(measured) {
            let Target::Http(http) = target else {
                bail!("a row other than HTTP in the limiter group");
            };
            let limited = http.rate_limit.is_some();
            http.finish(&measured);
            if limited {
                report.limiter_on = Some(measured);
            } else {
                report.limiter_off = Some(measured);
            }
        }
    }

    // Group 3: checkouts, on a command API of their own.
    let shapes: Vec<Shape> = [
        (RowKind::CheckoutOwn, Shape::Own),
        (RowKind::CheckoutOneSeller, Shape::Sellers(1)),
        (
            RowKind::CheckoutSellers,
            Shape::Sellers(args.checkout_sellers),
        ),
    ]
    .into_iter()
    .filter(|(kind, _)| wanted(*kind))
    .map(|(_, shape)| shape)
    .collect();
    if !shapes.is_empty() {
        let mut api = CommandApi::start(args, databases, &binary()?, "checkouts", None).await?;
        let mut targets = Vec::new();
        for shape in shapes {
            targets.push(Target::Checkout(
                CheckoutTarget::set_up(args, &api, shape).await?,
            ));
        }
        let measured = measure_rounds(args, &mut targets, "", None).await?;
        for &rate in &args.checkout_rate {
            let label = format!("open loop {rate}/s: ");
            let at_rate = measure_rounds(args, &mut targets, &label, Some(rate)).await?;
            for (target, measured) in targets.iter().zip(at_rate) {
                report.checkouts_open.push(OpenRun {
                    name: target.name().to_owned(),
                    rate,
                    measured,
                });
            }
        }
        api.check_alive()?;
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect(&api.database_url)
            .await
            .context("connecting to the checkout database")?;
        for (target, measured) in targets.into_iter().zip(measured) {
            let Target::Checkout(checkout) = target else {
                bail!("a row other than a checkout in the checkout group");
            };
            let counted = checkout.count_orders(&pool).await?;
            report.checkouts.push(CheckoutRun {
                name: checkout.name,
                shape: checkout.shape,
                confirmed_answers: checkout.confirmed.load(Ordering::Relaxed),
                counted,
                measured,
            });
        }
        pool.close().await;
        if report.checkouts.iter().any(|run| run.measured.errors > 0) {
            eprintln!(
                "checkouts: command-api log ends with:\n{}",
                log_tail(&api.log_path)
            );
        }
    }

    if wanted(RowKind::Snapshot) {
        report.snapshot = Some(snapshot_check(args, databases).await?);
    }
    print!("{}", report.render(args, &server_version));
    Ok(())
}

/// Measures `targets` in `--rounds` interleaved slices; returns each one's
/// figures, in order.
async fn measure_rounds(
    args: &Args,
    targets: &mut [Target],
    label: &str,
    rate: Option<u32>,
) -> anyhow::Result<Vec<Measured>> {
    let mut measured: Vec<Measured> = targets.iter().map(|_| Measured::default()).collect();
    for round in 0..args.rounds as usize {
        // Each round starts with another row, so none is always first.
        for offset in 0..targets.len() {
            let index = (round + offset) % targets.len();
            let target = &mut targets[index];
            let remaining = args.max_commands.saturating_sub(measured[index].commands);
            let ops = target.start_slice(args).await?;
            let slice = drive(args, ops, target.server_pid(), remaining, rate).await;
            target.end_slice().await?;
            let slice = slice?;
            eprintln!(
                "{label}round {}/{} {:<32} {:>6.0}/s  p50 {:>6.2} ms  p99 {:>6.2} ms  {} errors{}",
                round + 1,
                args.rounds,
                target.name(),
                slice.per_second(),
                slice.percentile_ms(50.0),
                slice.percentile_ms(99.0),
                slice.errors,
                match slice.cpu.other_cores(slice.seconds) {
                    other if other > OTHER_LOAD_WARN_CORES =>
                        format!("  (other load: {other:.2} cores)"),
                    _ => String::new(),
                }
            );
            if let Some(error) = &slice.first_error {
                eprintln!("  first error: {error}");
            }
            print_slow_windows(&slice.timeline, SLOW_WINDOW_MS);
            if let Some(path) = &args.timeline {
                append_timeline(path, label, target.name(), &slice.timeline)?;
            }
            measured[index].absorb(slice);
        }
    }
    for measured in &mut measured {
        measured.finish();
    }
    Ok(measured)
}

/// A load row, set up once and then driven in slices.
enum Target {
    Raw(RawTarget),
    Cqrs(CqrsTarget),
    Souk(SoukTarget),
    Http(HttpTarget),
    Checkout(CheckoutTarget),
}

const LIMITED_ROW: &str = "Souk over HTTP, limiter on";

impl Target {
    fn name(&self) -> &str {
        match self {
            Self::Raw(_) => "raw sqlx append",
            Self::Cqrs(_) => "plain cqrs-es + postgres-es",
            Self::Souk(_) => "Souk in process",
            Self::Http(http) if http.rate_limit.is_some() => LIMITED_ROW,
            Self::Http(_) => "Souk over HTTP",
            Self::Checkout(checkout) => &checkout.name,
        }
    }

    fn server_pid(&self) -> Option<u32> {
        match self {
            Self::Http(http) => Some(http.api.pid),
            Self::Checkout(checkout) => Some(checkout.pid),
            _ => None,
        }
    }

    /// Opens what a slice needs and returns one op per task.
    async fn start_slice(&mut self, args: &Args) -> anyhow::Result<Vec<Op>> {
        match self {
            Self::Raw(raw) => raw.start_slice(args).await,
            Self::Cqrs(cqrs) => cqrs.start_slice(args).await,
            Self::Souk(souk) => souk.start_slice(args).await,
            Self::Http(http) => http.start_slice(),
            Self::Checkout(checkout) => Ok(checkout.start_slice()),
        }
    }

    /// Closes what the slice opened.
    async fn end_slice(&mut self) -> anyhow::Result<()> {
        match self {
            Self::Raw(RawTarget { pool, .. })
            | Self::Cqrs(CqrsTarget { pool, .. })
            | Self::Souk(SoukTarget { pool, .. }) => {
                if let Some(pool) = pool.take() {
                    pool.close().await;
                }
                Ok(())
            }
            Self::Http(http) => http.end_slice().await,
            Self::Checkout(_) => Ok(()),
        }
    }
}

// ---------------------------------------------------------------------------
// The load driver.

type Op = Box<dyn FnMut() -> BoxFuture<'static, anyhow::Result<()>> + Send>;

/// What one row measured.
#[derive(Debug, Default, Clone)]
struct Measured {
    commands: u64,
    errors: u64,
    seconds: f64,
    /// Sorted latencies of the successful measured commands, in microseconds.
    latencies_us: Vec<u32>,
    first_error: Option<String>,
    /// CPU seconds spent during the measured time.
    cpu: Cpu,
    /// Commands per second of each slice.
    slices_per_second: Vec<f64>,
    /// Every measured command of the last slice, in the order the tasks
    /// reported them (not kept across slices).
    timeline: Vec<Sample>,
}

/// A window whose slowest command took at least this long is listed.
const SLOW_WINDOW_MS: u32 = 100;

/// Appends a slice's commands to the `--timeline` file.
fn append_timeline(path: &Path, label: &str, row: &str, timeline: &[Sample]) -> anyhow::Result<()> {
    use std::io::Write as _;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    let label = label.trim_end_matches([':', ' ']);
    for sample in timeline {
        writeln!(
            out,
            "{label},{row},{:.3},{:.3},{}",
            sample.at_unix_us as f64 / 1000.0,
            f64::from(sample.latency_us) / 1000.0,
            u8::from(sample.ok)
        )?;
    }
    out.flush()
        .with_context(|| format!("writing {}", path.display()))
}

/// CPU seconds spent by this process, the command API (HTTP row only) and
/// every `postgres` process of the machine.
#[derive(Debug, Default, Clone, Copy)]
struct Cpu {
    bench_s: f64,
    server_s: Option<f64>,
    /// Unknown when Postgres restarted during the measurement.
    postgres_s: Option<f64>,
    /// Busy CPU seconds of the whole machine, whoever spent them.
    machine_s: f64,
}

impl Cpu {
    fn now(server_pid: Option<u32>) -> Self {
        Self {
            bench_s: process_cpu_s(std::process::id()).unwrap_or(0.0),
            server_s: server_pid.and_then(process_cpu_s),
            postgres_s: Some(postgres_cpu_s()),
            machine_s: machine_busy_s(),
        }
    }

    fn since(self, earlier: Self) -> Self {
        Self {
            bench_s: self.bench_s - earlier.bench_s,
            server_s: self.server_s.zip(earlier.server_s).map(|(a, b)| a - b),
            // A restarted Postgres forgets its exited processes' time.
            postgres_s: self
                .postgres_s
                .zip(earlier.postgres_s)
                .map(|(a, b)| a - b)
                .filter(|spent| *spent >= 0.0),
            machine_s: self.machine_s - earlier.machine_s,
        }
    }

    fn plus(self, other: Self) -> Self {
        let add = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a + b);
        Self {
            bench_s: self.bench_s + other.bench_s,
            server_s: add(self.server_s, other.server_s),
            postgres_s: add(self.postgres_s, other.postgres_s),
            machine_s: self.machine_s + other.machine_s,
        }
    }

    /// Cores kept busy by other processes, on average over `seconds`.
    fn other_cores(&self, seconds: f64) -> f64 {
        if seconds > 0.0 {
            (self.machine_s - self.total_s()).max(0.0) / seconds
        } else {
            0.0
        }
    }

    fn total_s(&self) -> f64 {
        self.bench_s + self.server_s.unwrap_or(0.0) + self.postgres_s.unwrap_or(0.0)
    }
}

/// Clock ticks per second of `/proc/<pid>/stat` (USER_HZ, 100 on Linux).
const CLOCK_TICKS_PER_S: f64 = 100.0;

/// utime, stime, cutime and cstime of `/proc/<pid>/stat`, with its command
/// name, in clock ticks.
fn proc_stat_ticks(pid: &str) -> Option<(String, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat[open + 1..close].to_owned();
    // Fields after the name start at field 3 (state); utime is field 14.
    let fields: Vec<u64> = stat[close + 1..]
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(|field| field.parse().unwrap_or(0))
        .collect();
    let own = fields.first()? + fields.get(1)?;
    let children = fields.get(2)? + fields.get(3)?;
    Some((name, own, children))
}

/// Busy (not idle, not waiting for IO) CPU seconds of the machine, from
/// the first line of `/proc/stat`.
fn machine_busy_s() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(line) = stat.lines().next() else {
        return 0.0;
    };
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|field| field.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already
    // counted in user).
    let busy: u64 = ticks
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, t)| t)
        .sum();
    busy as f64 / CLOCK_TICKS_PER_S
}

/// CPU seconds of process `pid`, all its threads.
fn process_cpu_s(pid: u32) -> Option<f64> {
    proc_stat_ticks(&pid.to_string()).map(|(_, own, _)| own as f64 / CLOCK_TICKS_PER_S)
}

/// CPU seconds of every live `postgres` process, plus what the exited ones
/// (connections closed) left in their parent's children times.
fn postgres_cpu_s() -> f64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    let ticks: u64 = entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|name| name.bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|pid| proc_stat_ticks(&pid))
        .filter(|(name, _, _)| name == "postgres")
        .map(|(_, own, children)| own + children)
        .sum();
    ticks as f64 / CLOCK_TICKS_PER_S
}

impl Measured {
    /// Adds a slice's figures to this row's.
    fn absorb(&mut self, slice: Measured) {
        self.slices_per_second.push(slice.per_second());
        self.commands += slice.commands;
        self.errors += slice.errors;
        self.seconds += slice.seconds;
        self.latencies_us.extend(slice.latencies_us);
        if self.first_error.is_none() {
            self.first_error = slice.first_error;
        }
        self.cpu = if self.slices_per_second.len() == 1 {
            slice.cpu
        } else {
            self.cpu.plus(slice.cpu)
        };
    }

    /// Sorts the latencies once every slice is in.
    fn finish(&mut self) {
        self.latencies_us.sort_unstable();
    }

    fn per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.commands as f64 / self.seconds
        } else {
            0.0
        }
    }

    fn percentile_ms(&self, percent: f64) -> f64 {
        percentile_ms(&self.latencies_us, percent)
    }
}

/// Runs one op per task, in a loop, for the warm-up then one slice of
/// measured time (or until `max_commands` measured commands were started).
/// Closed loop (`rate` None): each task sends its next op as soon as the
/// last one is answered. Open loop: `rate` ops per second in all, task `t`
/// of `n` sending its `k`-th at `(k * n + t) / rate` seconds from the start
/// (or as soon as its previous op is answered, if later), its latency
/// counted from that scheduled time.
async fn drive(
    args: &Args,
    ops: Vec<Op>,
    server_pid: Option<u32>,
    max_commands: u64,
    rate: Option<u32>,
) -> anyhow::Result<Measured> {
    let start = Instant::now();
    // The wall clock at `start`, to date the samples.
    let start_unix_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_micros() as u64);
    let measure_from = start + Duration::from_secs(args.warmup_seconds);
    let stop_at = measure_from + args.slice();
    let started = Arc::new(AtomicU64::new(0));
    let task_count = ops.len();
    let mut tasks = Vec::with_capacity(task_count);
    for (t, mut op) in ops.into_iter().enumerate() {
        let started = started.clone();
        // (interval between this task's ops, its first op's offset)
        let pace = rate.map(|rate| {
            let rate = f64::from(rate);
            (
                Duration::from_secs_f64(task_count as f64 / rate),
                Duration::from_secs_f64(t as f64 / rate),
            )
        });
        tasks.push(tokio::spawn(async move {
            let mut latencies_us = Vec::new();
            let mut timeline = Vec::new();
            let mut errors = 0u64;
            let mut first_error = None;
            let mut sent = 0u32;
            loop {
                let begun = match pace {
                    Some((every, offset)) => {
                        let due = start + offset + every * sent;
                        sent += 1;
                        tokio::time::sleep_until(due.into()).await;
                        due
                    }
                    None => Instant::now(),
                };
                if begun >= stop_at {
                    break;
                }
                let measuring = begun >= measure_from;
                if measuring && started.fetch_add(1, Ordering::Relaxed) >= max_commands {
                    break;
                }
                let outcome = match tokio::time::timeout(COMMAND_TIMEOUT, op()).await {
                    Ok(outcome) => outcome,
                    Err(_) => Err(anyhow!("no answer within {COMMAND_TIMEOUT:?}")),
                };
                let took = begun.elapsed();
                if !measuring {
                    continue;
                }
                timeline.push(Sample {
                    at_unix_us: start_unix_us + (begun - start).as_micros() as u64,
                    latency_us: took.as_micros().min(u128::from(u32::MAX)) as u32,
                    ok: outcome.is_ok(),
                });
                match outcome {
                    Ok(()) => latencies_us.push(took.as_micros().min(u128::from(u32::MAX)) as u32),
                    Err(error) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| format!("{error:#}"));
                    }
                }
            }
            (latencies_us, timeline, errors, first_error, Instant::now())
        }));
    }
    let cpu_at_start = tokio::spawn(async move {
        tokio::time::sleep_until(measure_from.into()).await;
        Cpu::now(server_pid)
    });
    let mut result = Measured::default();
    let mut last_done = measure_from;
    for task in tasks {
        let (latencies_us, timeline, errors, first_error, done) =
            task.await.context("a load task panicked")?;
        result.latencies_us.extend(latencies_us);
        result.timeline.extend(timeline);
        result.errors += errors;
        if result.first_error.is_none() {
            result.first_error = first_error;
        }
        last_done = last_done.max(done);
    }
    // Commands started before the deadline finish after it: count their time.
    result.seconds = last_done
        .saturating_duration_since(measure_from)
        .as_secs_f64();
    result.commands = result.latencies_us.len() as u64 + result.errors;
    result.cpu =
        Cpu::now(server_pid).since(cpu_at_start.await.context("the CPU sampler panicked")?);
    result.finish();
    Ok(result)
}

// ---------------------------------------------------------------------------
// The commands.

fn deposit_amount() -> anyhow::Result<Money> {
    Money::parse_positive(DEPOSIT_MINOR_UNITS, CURRENCY).map_err(|e| anyhow!("amount: {e}"))
}

fn reference() -> anyhow::Result<Reference> {
    Reference::parse("reference", REFERENCE).map_err(|e| anyhow!("reference: {e}"))
}

fn currency() -> anyhow::Result<Currency> {
    Currency::parse(CURRENCY).map_err(|e| anyhow!("currency: {e}"))
}

fn open_command(owner: Uuid, wallet_id: Uuid) -> anyhow::Result<WalletCommand> {
    Ok(WalletCommand::Open {
        actor: Actor::new(UserId::from_uuid(owner), Role::Buyer),
        wallet_id: WalletId::from_uuid(wallet_id),
        currency: currency()?,
    })
}

fn deposit_command(admin: Uuid) -> anyhow::Result<WalletCommand> {
    Ok(WalletCommand::Deposit {
        actor: Actor::new(UserId::from_uuid(admin), Role::Admin),
        amount: deposit_amount()?,
        reference: reference()?,
    })
}

/// The wallets of each task: `wallets_per_task` new ids per task.
fn wallet_layout(args: &Args) -> Vec<Vec<Uuid>> {
    (0..args.concurrency)
        .map(|_| (0..args.wallets_per_task).map(|_| Uuid::now_v7()).collect())
        .collect()
}

/// Round-robin over a task's wallets.
struct RoundRobin {
    next: usize,
    len: usize,
}

impl RoundRobin {
    fn new(len: usize) -> Self {
        Self { next: 0, len }
    }

    fn next(&mut self) -> usize {
        let index = self.next % self.len;
        self.next = self.next.wrapping_add(1);
        index
    }
}

// ---------------------------------------------------------------------------
// Row 1: raw sqlx append.

/// The values of a Souk deposit event, precomputed once.
struct RawEvent {
    event_type: String,
    event_version: String,
    payload: String,
    metadata: String,
    prev_hash: Vec<u8>,
    hash: Vec<u8>,
}

fn raw_event(aggregate_id: &str) -> anyhow::Result<RawEvent> {
    let event = WalletEvent::FundsDeposited {
        amount: DEPOSIT_MINOR_UNITS,
        reference: reference()?,
        available: 123_400,
    };
    let payload = serde_json::to_string(&event).context("serializing the event")?;
    let admin = Uuid::now_v7();
    let event_id = Uuid::now_v7();
    let recorded_at = chrono::Utc::now();
    let context = CommandContext::new(admin, "admin", Uuid::now_v7());
    let metadata = serde_json::to_string(&EventMetadata::new(&context, event_id, recorded_at))
        .context("serializing the metadata")?;
    let event_type = event.event_type();
    let event_version = event.event_version();
    let fields = ChainedFields {
        aggregate_type: "Wallet",
        aggregate_id,
        sequence: 2,
        event_type: &event_type,
        event_version: &event_version,
        event_id,
        recorded_at_micros: recorded_at.timestamp_micros(),
        payload: &payload,
        metadata: &metadata,
    };
    // Real hashes of the real size; the chain itself is not what is measured.
    let prev_hash = fields.hash(&GENESIS_HASH);
    let hash = fields.hash(&prev_hash);
    Ok(RawEvent {
        event_type,
        event_version,
        payload,
        metadata,
        prev_hash: prev_hash.to_vec(),
        hash: hash.to_vec(),
    })
}

/// A raw task's wallets and the last sequence written to each (a wallet is
/// written by one task only).
type RawTask = (Vec<Arc<str>>, Arc<Vec<AtomicI64>>);

/// The raw row: Souk's schema and each task's wallets.
struct RawTarget {
    url: String,
    event: Arc<RawEvent>,
    tasks: Vec<RawTask>,
    pool: Option<PgPool>,
}

impl RawTarget {
    async fn set_up(args: &Args, databases: &Databases) -> anyhow::Result<Self> {
        let (url, _) = databases.create().await?;
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .context("connecting to the raw-append database")?;
        event_store::migrate(&pool)
            .await
            .context("migrating the raw-append database")?;
        pool.close().await;
        let tasks = wallet_layout(args)
            .into_iter()
            .map(|wallets| {
                let ids = wallets.iter().map(|id| Arc::from(id.to_string())).collect();
                let sequences = wallets.iter().map(|_| AtomicI64::new(0)).collect();
                (ids, Arc::new(sequences))
            })
            .collect();
        Ok(Self {
            url,
            event: Arc::new(raw_event(&Uuid::now_v7().to_string())?),
            tasks,
            pool: None,
        })
    }

    async fn start_slice(&mut self, args: &Args) -> anyhow::Result<Vec<Op>> {
        let pool = PgPoolOptions::new()
            .max_connections(args.pool_size)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(event_store::connect_options(&self.url)?)
            .await
            .context("connecting to the raw-append database")?;
        self.pool = Some(pool.clone());
        Ok(self
            .tasks
            .iter()
            .map(|(ids, sequences)| {
                let (pool, event, ids, sequences) = (
                    pool.clone(),
                    self.event.clone(),
                    ids.clone(),
                    sequences.clone(),
                );
                let mut round = RoundRobin::new(ids.len());
                Box::new(move || {
                    let index = round.next();
                    let sequence = sequences[index].fetch_add(1, Ordering::Relaxed) + 1;
                    let (pool, event, id) = (pool.clone(), event.clone(), ids[index].clone());
                    Box::pin(async move {
                        let mut tx = pool.begin().await.context("BEGIN")?;
                        let _: (i64, i64) = sqlx::query_as(RAW_INSERT)
                            .bind("Wallet")
                            .bind(&*id)
                            .bind(sequence)
                            .bind(&event.event_type)
                            .bind(&event.event_version)
                            .bind(&event.payload)
                            .bind(&event.metadata)
                            .bind(chrono::Utc::now())
                            .bind(Uuid::now_v7())
                            .bind(&event.prev_hash)
                            .bind(&event.hash)
                            .fetch_one(&mut *tx)
                            .await
                            .context("INSERT")?;
                        tx.commit().await.context("COMMIT")?;
                        Ok(())
                    }) as BoxFuture<'static, anyhow::Result<()>>
                }) as Op
            })
            .collect())
    }
}

// ---------------------------------------------------------------------------
// Row 2: plain cqrs-es + postgres-es.

type PlainCqrs = postgres_es::PostgresCqrs<event_store::cqrs::CqrsAggregate<Wallet>>;

/// The metadata a cqrs-es user would attach: what Souk records.
fn plain_metadata(admin: Uuid) -> HashMap<String, String> {
    let command_id = Uuid::now_v7().to_string();
    HashMap::from([
        ("event_id".to_owned(), Uuid::now_v7().to_string()),
        ("actor_id".to_owned(), admin.to_string()),
        ("actor_role".to_owned(), "admin".to_owned()),
        ("command_id".to_owned(), command_id.clone()),
        ("correlation_id".to_owned(), command_id.clone()),
        ("causation_id".to_owned(), command_id),
        (
            "recorded_at".to_owned(),
            chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        ),
    ])
}

/// The cqrs-es row: postgres-es's schema and the opened wallets.
struct CqrsTarget {
    url: String,
    admin: Uuid,
    tasks: Vec<Vec<Arc<str>>>,
    pool: Option<PgPool>,
}

impl CqrsTarget {
    async fn set_up(args: &Args, databases: &Databases) -> anyhow::Result<Self> {
        let (url, _) = databases.create().await?;
        let pool = PgPoolOptions::new()
            .max_connections(args.pool_size)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(event_store::connect_options(&url)?)
            .await
            .context("connecting to the cqrs-es database")?;
        sqlx::raw_sql(POSTGRES_ES_DDL)
            .execute(&pool)
            .await
            .context("creating postgres-es's tables")?;
        let cqrs: Arc<PlainCqrs> =
            Arc::new(postgres_es::postgres_cqrs(pool.clone(), Vec::new(), ()));
        let layout = wallet_layout(args);
        let all: Vec<Uuid> = layout.iter().flatten().copied().collect();
        eprintln!("plain cqrs-es + postgres-es: opening {} wallets", all.len());
        in_parallel(all.len(), args.concurrency as usize, |i| {
            let (cqrs, wallet) = (cqrs.clone(), all[i]);
            async move {
                let owner = Uuid::now_v7();
                cqrs.execute_with_metadata(
                    &wallet.to_string(),
                    open_command(owner, wallet)?,
                    plain_metadata(owner),
                )
                .await
                .map_err(|e| anyhow!("opening a wallet: {e}"))
            }
        })
        .await?;
        pool.close().await;
        Ok(Self {
            url,
            admin: Uuid::now_v7(),
            tasks: layout
                .iter()
                .map(|wallets| wallets.iter().map(|id| Arc::from(id.to_string())).collect())
                .collect(),
            pool: None,
        })
    }

    async fn start_slice(&mut self, args: &Args) -> anyhow::Result<Vec<Op>> {
        let pool = PgPoolOptions::new()
            .max_connections(args.pool_size)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(event_store::connect_options(&self.url)?)
            .await
            .context("connecting to the cqrs-es database")?;
        self.pool = Some(pool.clone());
        let cqrs: Arc<PlainCqrs> = Arc::new(postgres_es::postgres_cqrs(pool, Vec::new(), ()));
        let admin = self.admin;
        Ok(self
            .tasks
            .iter()
            .map(|ids| {
                let (cqrs, ids) = (cqrs.clone(), ids.clone());
                let mut round = RoundRobin::new(ids.len());
                Box::new(move || {
                    let (cqrs, id) = (cqrs.clone(), ids[round.next()].clone());
                    Box::pin(async move {
                        cqrs.execute_with_metadata(
                            &id,
                            deposit_command(admin)?,
                            plain_metadata(admin),
                        )
                        .await
                        .map_err(|e| anyhow!("{e}"))
                    }) as BoxFuture<'static, anyhow::Result<()>>
                }) as Op
            })
            .collect())
    }
}

// ---------------------------------------------------------------------------
// Row 3: Souk in process.

async fn souk_pool(url: &str, args: &Args) -> anyhow::Result<PgPool> {
    let pool = event_store::pool(
        url,
        &PoolConfig {
            max_connections: args.pool_size,
            acquire_timeout: Duration::from_secs(10),
        },
    )
    .context("parsing the database URL")?;
    event_store::migrate(&pool)
        .await
        .context("migrating Souk's database")?;
    Ok(pool)
}

async fn souk_execute(
    store: &EventStore,
    id: &str,
    command: WalletCommand,
    actor: Uuid,
    role: &str,
) -> anyhow::Result<()> {
    store
        .execute::<Wallet>(
            id,
            command,
            CommandContext::new(actor, role, Uuid::now_v7()),
            None,
            Reply::new(200, id),
        )
        .await
        .map(|_| ())
        .map_err(|e| anyhow!("{e}"))
}

async fn open_souk_wallets(
    store: &EventStore,
    wallets: &[Uuid],
    in_flight: usize,
) -> anyhow::Result<()> {
    in_parallel(wallets.len(), in_flight, |i| {
        let (store, wallet) = (store.clone(), wallets[i]);
        async move {
            let owner = Uuid::now_v7();
            souk_execute(
                &store,
                &wallet.to_string(),
                open_command(owner, wallet)?,
                owner,
                "buyer",
            )
            .await
            .context("opening a wallet")
        }
    })
    .await?;
    Ok(())
}

/// The in-process row: Souk's schema and the opened wallets. Each slice
/// gets a new pool and so a new `EventStore`, whose cache fills during the
/// slice's warm-up.
struct SoukTarget {
    url: String,
    admin: Uuid,
    tasks: Vec<Vec<Arc<str>>>,
    pool: Option<PgPool>,
}

impl SoukTarget {
    async fn set_up(args: &Args, databases: &Databases) -> anyhow::Result<Self> {
        let (url, _) = databases.create().await?;
        let pool = souk_pool(&url, args).await?;
        let store = EventStore::new(pool.clone(), StoreConfig::default());
        let layout = wallet_layout(args);
        let all: Vec<Uuid> = layout.iter().flatten().copied().collect();
        eprintln!("Souk in process: opening {} wallets", all.len());
        open_souk_wallets(&store, &all, args.concurrency as usize).await?;
        drop(store);
        pool.close().await;
        Ok(Self {
            url,
            admin: Uuid::now_v7(),
            tasks: layout
                .iter()
                .map(|wallets| wallets.iter().map(|id| Arc::from(id.to_string())).collect())
                .collect(),
            pool: None,
        })
    }

    async fn start_slice(&mut self, args: &Args) -> anyhow::Result<Vec<Op>> {
        let pool = event_store::pool(
            &self.url,
            &PoolConfig {
                max_connections: args.pool_size,
                acquire_timeout: Duration::from_secs(10),
            },
        )
        .context("parsing the database URL")?;
        self.pool = Some(pool.clone());
        let store = EventStore::new(pool, StoreConfig::default());
        let admin = self.admin;
        Ok(self
            .tasks
            .iter()
            .map(|ids| {
                let (store, ids) = (store.clone(), ids.clone());
                let mut round = RoundRobin::new(ids.len());
                Box::new(move || {
                    let (store, id) = (store.clone(), ids[round.next()].clone());
                    Box::pin(async move {
                        souk_execute(&store, &id, deposit_command(admin)?, admin, "admin").await
                    }) as BoxFuture<'static, anyhow::Result<()>>
                }) as Op
            })
            .collect())
    }
}

// ---------------------------------------------------------------------------
// Rows 4 and 5: Souk over HTTP, without and with the rate limiter.

/// The command API's memory, in kB.
#[derive(Debug, Default, Clone, Copy)]
struct Memory {
    /// Largest VmRSS sampled while the load ran.
    rss_max_sampled_kb: u64,
    /// VmRSS at the end of the load.
    rss_end_kb: u64,
    /// VmHWM (peak resident set) at the end of the load.
    hwm_kb: u64,
}

#[derive(Debug, Clone)]
struct HttpRun {
    measured: Measured,
    memory: Memory,
}

/// The `command-api` binary: `--command-api`, or one built now.
async fn command_api_binary(args: &Args) -> anyhow::Result<PathBuf> {
    match &args.command_api {
        Some(path) => {
            ensure!(
                path.is_file(),
                "--command-api {} is not a file",
                path.display()
            );
            Ok(path.clone())
        }
        None => Ok(service_binaries(&["command-api"], None)
            .await?
            .join("command-api")),
    }
}

/// A command API process on a database of its own, with its key pair and a
/// keep-alive HTTP client sized for the load.
struct CommandApi {
    child: ChildGuard,
    pid: u32,
    log_path: PathBuf,
    database_url: String,
    base: String,
    client: reqwest::Client,
    private_pem: Vec<u8>,
    /// Holds the keys and the log; removed last.
    _dir: TempDir,
}

impl CommandApi {
    /// Starts the command API (with a rate limit per user of `rate_limit`
    /// requests per second and burst, if any) and waits until it is healthy.
    async fn start(
        args: &Args,
        databases: &Databases,
        binary: &Path,
        label: &str,
        rate_limit: Option<u32>,
    ) -> anyhow::Result<Self> {
        let (database_url, _) = databases.create().await?;
        let dir = TempDir::new()?;
        let private_key = dir.0.join("jwt-private.pem");
        let public_key = dir.0.join("jwt-public.pem");
        identity::ensure_dev_key_pair(&private_key, &public_key)
            .context("generating a key pair")?;
        let private_pem = std::fs::read(&private_key).context("reading the private key")?;
        let port = free_port()?;
        let stream = format!("souk_bench_{}", Uuid::new_v4().simple());
        let log_path = dir.0.join("command-api.log");
        let log = std::fs::File::create(&log_path).context("creating the command-api log")?;
        let mut command = Command::new(binary);
        command
            .env("DATABASE_URL", &database_url)
            .env("COMMAND_API_ADDR", format!("127.0.0.1:{port}"))
            .env("SOUK_JWT_PUBLIC_KEY", &public_key)
            .env("SOUK_JWT_PRIVATE_KEY", &private_key)
            .env("SOUK_DB_MAX_CONNECTIONS", args.pool_size.to_string())
            // Its relay runs, as in production, on a stream of this run's own.
            .env("SOUK_STREAM", &stream)
            .env_remove("SOUK_RATE_LIMIT")
            .env_remove("SOUK_RATE_BURST");
        if let Some(per_second) = rate_limit {
            command
                .env("SOUK_RATE_LIMIT", per_second.to_string())
                .env("SOUK_RATE_BURST", per_second.to_string());
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("sharing the log file")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut child = ChildGuard(child, Some(stream));
        let pid = child.0.id();
        let base = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(args.concurrency as usize)
            .timeout(COMMAND_TIMEOUT)
            .build()
            .context("building the HTTP client")?;
        eprintln!("{label}: waiting for command-api (pid {pid}) on port {port}");
        wait_healthy(&mut child, &client, &format!("{base}/health"), &log_path).await?;
        eprintln!(
            "{label}: command-api ready, VmRSS {} MB",
            proc_status_kb(pid, "VmRSS").unwrap_or(0) / 1024
        );
        Ok(Self {
            child,
            pid,
            log_path,
            database_url,
            base,
            client,
            private_pem,
            _dir: dir,
        })
    }

    fn token(&self, sub: Uuid, role: &str) -> anyhow::Result<Arc<str>> {
        let token = identity::mint_token(
            &self.private_pem,
            sub,
            role,
            chrono::Duration::hours(2),
            None,
            None,
        )
        .context("minting a token")?;
        Ok(Arc::from(token))
    }

    /// POSTs `body` to `path` as `token`, expects `status` and returns the
    /// answer's JSON.
    async fn post(
        &self,
        path: &str,
        token: &str,
        body: String,
        status: u16,
    ) -> anyhow::Result<serde_json::Value> {
        let answer = self
            .client
            .post(format!("{}{path}", self.base))
            .bearer_auth(token)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .with_context(|| format!("POST {path}"))?;
        let answered = answer.status();
        let bytes = answer
            .bytes()
            .await
            .with_context(|| format!("reading the POST {path} answer"))?;
        ensure!(
            answered.as_u16() == status,
            "POST {path} answered {answered}: {}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
        );
        serde_json::from_slice(&bytes).with_context(|| format!("POST {path}: not JSON"))
    }

    /// POSTs and returns the `id` of what was created (201).
    async fn create(&self, path: &str, token: &str, body: String) -> anyhow::Result<Uuid> {
        let body = self.post(path, token, body, 201).await?;
        body["id"]
            .as_str()
            .and_then(|id| Uuid::parse_str(id).ok())
            .with_context(|| format!("POST {path}: no id in {body}"))
    }

    /// Opens a EUR wallet of `owner` and deposits `amount` on it.
    async fn funded_wallet(&self, owner: &str, admin: &str, amount: i64) -> anyhow::Result<Uuid> {
        let wallet = self
            .create("/wallets", owner, format!(r#"{{"currency":"{CURRENCY}"}}"#))
            .await?;
        if amount > 0 {
            self.post(
                &format!("/wallets/{wallet}/deposits"),
                admin,
                format!(
                    r#"{{"amount":{{"amount":{amount},"currency":"{CURRENCY}"}},"reference":"{REFERENCE}"}}"#
                ),
                200,
            )
            .await?;
        }
        Ok(wallet)
    }

    /// Fails with the end of its log if the process exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.0.try_wait().context("polling command-api")? {
            bail!(
                "command-api exited during the load ({status}); its log ends with:\n{}",
                log_tail(&self.log_path)
            );
        }
        Ok(())
    }
}

/// An HTTP deposit row: the command API process (running for the whole
/// run, idle between its slices), its wallets and tokens, and its memory
/// samples.
struct HttpTarget {
    api: CommandApi,
    /// Requests per second and burst of its limiter, when on.
    rate_limit: Option<u32>,
    admin_token: Arc<str>,
    tasks: Vec<Vec<Arc<str>>>,
    sampler: Option<(Arc<AtomicBool>, tokio::task::JoinHandle<u64>)>,
    rss_max_sampled_kb: u64,
}

impl HttpTarget {
    async fn set_up(
        args: &Args,
        databases: &Databases,
        binary: &Path,
        rate_limit: Option<u32>,
    ) -> anyhow::Result<Self> {
        let label = if rate_limit.is_some() {
            LIMITED_ROW
        } else {
            "Souk over HTTP"
        };
        let api = CommandApi::start(args, databases, binary, label, rate_limit).await?;
        // Wallets: one buyer per task opens that task's wallets.
        let buyers: Vec<Arc<str>> = (0..args.concurrency)
            .map(|_| api.token(Uuid::now_v7(), "buyer"))
            .collect::<anyhow::Result<_>>()?;
        let admin_token = api.token(Uuid::now_v7(), "admin")?;
        let per_task = args.wallets_per_task as usize;
        eprintln!("{label}: opening {} wallets", args.wallet_count());
        let opened: Vec<Uuid> = in_parallel(args.wallet_count(), args.concurrency as usize, |i| {
            let buyer = buyers[i / per_task].clone();
            let api = &api;
            async move {
                api.create(
                    "/wallets",
                    &buyer,
                    format!(r#"{{"currency":"{CURRENCY}"}}"#),
                )
                .await
            }
        })
        .await?;
        let tasks = opened
            .chunks(per_task)
            .map(|wallets| {
                wallets
                    .iter()
                    .map(|id| Arc::from(format!("{}/wallets/{id}/deposits", api.base)))
                    .collect()
            })
            .collect();
        Ok(Self {
            api,
            rate_limit,
            admin_token,
            tasks,
            sampler: None,
            rss_max_sampled_kb: 0,
        })
    }

    fn start_slice(&mut self) -> anyhow::Result<Vec<Op>> {
        let pid = self.api.pid;
        let sampling = Arc::new(AtomicBool::new(true));
        let sampler = {
            let sampling = sampling.clone();
            tokio::spawn(async move {
                let mut max_kb = 0;
                while sampling.load(Ordering::Relaxed) {
                    max_kb = max_kb.max(proc_status_kb(pid, "VmRSS").unwrap_or(0));
                    tokio::time::sleep(RSS_SAMPLE_EVERY).await;
                }
                max_kb
            })
        };
        self.sampler = Some((sampling, sampler));
        Ok(self
            .tasks
            .iter()
            .map(|urls| {
                let (client, token, urls) = (
                    self.api.client.clone(),
                    self.admin_token.clone(),
                    urls.clone(),
                );
                let mut round = RoundRobin::new(urls.len());
                Box::new(move || {
                    let request = client
                        .post(&*urls[round.next()])
                        .bearer_auth(&*token)
                        .header(reqwest::header::CONTENT_TYPE, "application/json")
                        .body(DEPOSIT_BODY);
                    Box::pin(async move {
                        let answer = request.send().await.context("POST deposits")?;
                        let status = answer.status();
                        // Read the body so the connection is reused.
                        let body = answer.bytes().await.context("reading the deposit answer")?;
                        ensure!(
                            status.as_u16() == 200,
                            "deposit answered {status}: {}",
                            String::from_utf8_lossy(&body[..body.len().min(300)])
                        );
                        Ok(())
                    }) as BoxFuture<'static, anyhow::Result<()>>
                }) as Op
            })
            .collect())
    }

    async fn end_slice(&mut self) -> anyhow::Result<()> {
        if let Some((sampling, sampler)) = self.sampler.take() {
            sampling.store(false, Ordering::Relaxed);
            let max_kb = sampler.await.context("the memory sampler panicked")?;
            self.rss_max_sampled_kb = self.rss_max_sampled_kb.max(max_kb);
        }
        self.api.check_alive()
    }

    /// The memory figures, once every slice ran; stops the command API.
    fn finish(self, measured: &Measured) -> Memory {
        let pid = self.api.pid;
        let memory = Memory {
            rss_max_sampled_kb: self.rss_max_sampled_kb,
            rss_end_kb: proc_status_kb(pid, "VmRSS").unwrap_or(0),
            hwm_kb: proc_status_kb(pid, "VmHWM").unwrap_or(0),
        };
        if measured.errors > 0 {
            eprintln!(
                "{}: command-api log ends with:\n{}",
                if self.rate_limit.is_some() {
                    LIMITED_ROW
                } else {
                    "Souk over HTTP"
                },
                log_tail(&self.api.log_path)
            );
        }
        memory
    }
}

// ---------------------------------------------------------------------------
// Row 6: checkouts over HTTP.

/// Whose listings the checkouts buy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// Each task its own seller and listings: no aggregate is shared.
    Own,
    /// `--checkout-listings` listings spread over this many sellers, each
    /// task picking one at random for each checkout.
    Sellers(u64),
}

/// What one checkout task buys: its buyer, its wallet and the listings it
/// picks from.
struct CheckoutTask {
    buyer: Arc<str>,
    wallet: Uuid,
    listings: Arc<Vec<Uuid>>,
}

/// A checkout row: its buyers, funded wallets and sellers' listings on the
/// checkout command API, and how many checkouts were answered confirmed.
struct CheckoutTarget {
    name: String,
    shape: Shape,
    pid: u32,
    client: reqwest::Client,
    orders_url: Arc<str>,
    tasks: Vec<CheckoutTask>,
    /// Buyers' user ids, to count their orders in the database.
    buyer_ids: Vec<Uuid>,
    /// Checkouts answered with a confirmed order, warm-ups included.
    confirmed: Arc<AtomicU64>,
}

/// Orders of a checkout row, as the database holds them at the end.
#[derive(Debug, Clone, Copy)]
struct OrderCount {
    placed: i64,
    confirmed: i64,
}

impl CheckoutTarget {
    async fn set_up(args: &Args, api: &CommandApi, shape: Shape) -> anyhow::Result<Self> {
        let name = match shape {
            Shape::Own => "checkout: own listings".to_owned(),
            Shape::Sellers(1) => "checkout: one seller".to_owned(),
            Shape::Sellers(n) => format!("checkout: {n} sellers"),
        };
        let tasks = args.concurrency as usize;
        let listing_count = args.checkout_listings as usize;
        let admin = api.token(Uuid::now_v7(), "admin")?;
        // Sellers, each with the payout wallet escrow needs.
        let seller_count = match shape {
            Shape::Own => tasks,
            Shape::Sellers(n) => n as usize,
        };
        let seller_ids: Vec<Uuid> = (0..seller_count).map(|_| Uuid::now_v7()).collect();
        let sellers: Vec<Arc<str>> = seller_ids
            .iter()
            .map(|id| api.token(*id, "seller"))
            .collect::<anyhow::Result<_>>()?;
        eprintln!("{name}: {seller_count} sellers, {listing_count} listings, {tasks} buyers");
        let payout_wallets = in_parallel(seller_count, SEED_HTTP_IN_FLIGHT, |i| {
            api.funded_wallet(&sellers[i], &admin, 0)
        })
        .await?;
        // Listing i belongs to seller i mod sellers (so in `Own`, task t
        // buys listings t, t + tasks, ...).
        let listings = in_parallel(listing_count, SEED_HTTP_IN_FLIGHT, |i| {
            let seller = i % seller_count;
            let body = serde_json::json!({
                "title": format!("Benchmark item {i}"),
                "description": "A thing to sell.",
                "category": "home",
                "condition": "good",
                "price": {"amount": CHECKOUT_PRICE_MINOR_UNITS, "currency": CURRENCY},
                "quantity": CHECKOUT_STOCK,
                "location": {"city": "Lyon", "country": "FR"},
                "payout_wallet_id": payout_wallets[seller],
            });
            let token = sellers[seller].clone();
            async move { api.create("/listings", &token, body.to_string()).await }
        })
        .await?;
        let buyer_ids: Vec<Uuid> = (0..tasks).map(|_| Uuid::now_v7()).collect();
        let buyers: Vec<Arc<str>> = buyer_ids
            .iter()
            .map(|id| api.token(*id, "buyer"))
            .collect::<anyhow::Result<_>>()?;
        let wallets = in_parallel(tasks, SEED_HTTP_IN_FLIGHT, |i| {
            api.funded_wallet(&buyers[i], &admin, CHECKOUT_FUNDS_MINOR_UNITS)
        })
        .await?;
        let shared = Arc::new(listings.clone());
        let tasks = (0..tasks)
            .map(|t| {
                let listings = match shape {
                    Shape::Own => Arc::new(
                        listings
                            .iter()
                            .enumerate()
                            .filter(|(i, _)| i % seller_count == t)
                            .map(|(_, id)| *id)
                            .collect::<Vec<_>>(),
                    ),
                    Shape::Sellers(_) => shared.clone(),
                };
                ensure!(
                    !listings.is_empty(),
                    "--checkout-listings {listing_count} leaves task {t} of {name} without a listing"
                );
                Ok(CheckoutTask {
                    buyer: buyers[t].clone(),
                    wallet: wallets[t],
                    listings,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            name,
            shape,
            pid: api.pid,
            client: api.client.clone(),
            orders_url: Arc::from(format!("{}/orders", api.base)),
            tasks,
            buyer_ids,
            confirmed: Arc::new(AtomicU64::new(0)),
        })
    }

    fn start_slice(&mut self) -> Vec<Op> {
        self.tasks
            .iter()
            .enumerate()
            .map(|(t, task)| {
                let (client, url, confirmed) = (
                    self.client.clone(),
                    self.orders_url.clone(),
                    self.confirmed.clone(),
                );
                let (buyer, wallet, listings) =
                    (task.buyer.clone(), task.wallet, task.listings.clone());
                let mut rng = StdRng::seed_from_u64(t as u64 ^ Uuid::new_v4().as_u64_pair().0);
                Box::new(move || {
                    let listing = listings[rng.gen_range(0..listings.len())];
                    let request = client
                        .post(&*url)
                        .bearer_auth(&*buyer)
                        .header(reqwest::header::CONTENT_TYPE, "application/json")
                        .body(format!(
                            r#"{{"lines":[{{"listing_id":"{listing}","quantity":1}}],"shipping_address":{SHIPPING_ADDRESS},"payment_method":"wallet_escrow","wallet_id":"{wallet}"}}"#
                        ));
                    let confirmed = confirmed.clone();
                    Box::pin(async move {
                        let answer = request.send().await.context("POST /orders")?;
                        let status = answer.status();
                        let body = answer.bytes().await.context("reading the checkout answer")?;
                        let shown = || String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
                        ensure!(status.as_u16() == 201, "checkout answered {status}: {}", shown());
                        let json: serde_json::Value =
                            serde_json::from_slice(&body).context("the checkout answer is not JSON")?;
                        let orders = json["orders"].as_array().map_or(&[][..], Vec::as_slice);
                        ensure!(
                            orders.len() == 1 && orders[0]["status"] == "confirmed",
                            "the checkout's order is not confirmed: {}",
                            shown()
                        );
                        confirmed.fetch_add(1, Ordering::Relaxed);
                        Ok(())
                    }) as BoxFuture<'static, anyhow::Result<()>>
                }) as Op
            })
            .collect()
    }

    /// Counts this row's buyers' orders placed and confirmed in the
    /// database.
    async fn count_orders(&self, pool: &PgPool) -> anyhow::Result<OrderCount> {
        let buyers: Vec<String> = self.buyer_ids.iter().map(Uuid::to_string).collect();
        let (placed, confirmed): (i64, i64) = sqlx::query_as(
            "SELECT count(*),
                    count(*) FILTER (WHERE EXISTS (
                        SELECT 1 FROM events c
                         WHERE c.aggregate_type = 'Order' AND c.aggregate_id = p.aggregate_id
                           AND c.event_type = 'OrderConfirmed'))
               FROM events p
              WHERE p.aggregate_type = 'Order' AND p.event_type = 'OrderPlaced'
                AND p.payload->'OrderPlaced'->>'buyer' = ANY($1)",
        )
        .bind(&buyers)
        .fetch_one(pool)
        .await
        .with_context(|| format!("counting the orders of {}", self.name))?;
        Ok(OrderCount { placed, confirmed })
    }
}

/// A checkout row driven open loop at `rate` checkouts per second.
#[derive(Debug, Clone)]
struct OpenRun {
    name: String,
    rate: u32,
    measured: Measured,
}

/// What a checkout row measured and counted.
#[derive(Debug, Clone)]
struct CheckoutRun {
    name: String,
    shape: Shape,
    measured: Measured,
    /// Checkouts answered confirmed, warm-ups included.
    confirmed_answers: u64,
    counted: OrderCount,
}

impl CheckoutRun {
    /// Every answered order is in the database, confirmed, and no other.
    fn counts_agree(&self) -> bool {
        let answered = self.confirmed_answers as i64;
        self.counted.placed == answered && self.counted.confirmed == answered
    }
}

// ---------------------------------------------------------------------------
// Row 7: a deposit on a large aggregate versus on a new one.

#[derive(Debug, Clone)]
struct SnapshotRun {
    events: i64,
    snapshot_at: Option<i64>,
    seed_seconds: f64,
    large_us: Vec<u32>,
    new_us: Vec<u32>,
}

async fn snapshot_check(args: &Args, databases: &Databases) -> anyhow::Result<SnapshotRun> {
    const LABEL: &str = "snapshot";
    let (url, name) = databases.create().await?;
    let pool = souk_pool(&url, args).await?;
    let seeder = EventStore::new(pool.clone(), StoreConfig::default());
    let large = Uuid::now_v7();
    let large_id = large.to_string();
    let admin = Uuid::now_v7();
    open_souk_wallets(&seeder, &[large], 1).await?;
    eprintln!(
        "{LABEL}: seeding one wallet with {} deposits",
        args.snapshot_events
    );
    let seeding = Instant::now();
    in_parallel(args.snapshot_events as usize, SEED_IN_FLIGHT, |_| {
        let (seeder, id) = (seeder.clone(), large_id.clone());
        async move { souk_execute(&seeder, &id, deposit_command(admin)?, admin, "admin").await }
    })
    .await
    .context("seeding the large wallet")?;
    let seed_seconds = seeding.elapsed().as_secs_f64();
    eprintln!("{LABEL}: seeded in {seed_seconds:.1}s");
    let samples = args.snapshot_samples as usize;
    let fresh: Vec<Uuid> = (0..samples).map(|_| Uuid::now_v7()).collect();
    open_souk_wallets(&seeder, &fresh, args.concurrency as usize).await?;
    drop(seeder);

    eprintln!("{LABEL}: timing {samples} deposits on each, through a fresh EventStore each time");
    let mut large_us = Vec::with_capacity(samples);
    let mut new_us = Vec::with_capacity(samples);
    let timed = |id: String| {
        let pool = pool.clone();
        async move {
            // A fresh store: nothing cached, so the state is loaded.
            let store = EventStore::new(pool, StoreConfig::default());
            let begun = Instant::now();
            tokio::time::timeout(
                COMMAND_TIMEOUT,
                souk_execute(&store, &id, deposit_command(admin)?, admin, "admin"),
            )
            .await
            .context("a timed deposit did not finish")??;
            Ok::<_, anyhow::Error>(begun.elapsed().as_micros().min(u128::from(u32::MAX)) as u32)
        }
    };
    for wallet in &fresh {
        large_us.push(timed(large_id.clone()).await?);
        new_us.push(timed(wallet.to_string()).await?);
    }
    large_us.sort_unstable();
    new_us.sort_unstable();
    let events: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_type = 'Wallet' AND aggregate_id = $1",
    )
    .bind(&large_id)
    .fetch_one(&pool)
    .await
    .context("counting the large wallet's events")?;
    let snapshot_at: Option<i64> = sqlx::query_scalar(
        "SELECT last_sequence FROM snapshots WHERE aggregate_type = 'Wallet' AND aggregate_id = $1",
    )
    .bind(&large_id)
    .fetch_optional(&pool)
    .await
    .context("reading the large wallet's snapshot")?;
    pool.close().await;
    databases.drop_one(&name).await?;
    Ok(SnapshotRun {
        events,
        snapshot_at,
        seed_seconds,
        large_us,
        new_us,
    })
}

// ---------------------------------------------------------------------------
// The report.

#[derive(Debug, Default)]
struct Report {
    raw: Option<Measured>,
    cqrs: Option<Measured>,
    souk: Option<Measured>,
    http: Option<HttpRun>,
    /// The HTTP row measured again beside the limited one.
    limiter_off: Option<Measured>,
    limiter_on: Option<Measured>,
    checkouts: Vec<CheckoutRun>,
    /// The checkout rows again at each `--checkout-rate`.
    checkouts_open: Vec<OpenRun>,
    snapshot: Option<SnapshotRun>,
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

impl Report {
    fn render(&self, args: &Args, server_version: &str) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nSouk write-path benchmark: {} tasks, {} wallets each, pool {} connections, {}s measured per row \
             in {} interleaved slices (each after {}s warm-up),\n{} CPUs, Postgres {}, load average at the end {}\n",
            args.concurrency,
            args.wallets_per_task,
            args.pool_size,
            args.seconds,
            args.rounds,
            args.warmup_seconds,
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            server_version,
            std::fs::read_to_string("/proc/loadavg")
                .ok()
                .and_then(|l| l.split_whitespace().next().map(str::to_owned))
                .unwrap_or_else(|| "?".to_owned()),
        );
        let _ = writeln!(
            out,
            "{:<30} {:>9} {:>8} {:>11} {:>8} {:>8} {:>7}   slices: min-max /s",
            "row", "commands", "seconds", "commands/s", "p50 ms", "p99 ms", "errors",
        );
        let mut rows = vec![
            ("raw sqlx append", self.raw.as_ref()),
            ("plain cqrs-es + postgres-es", self.cqrs.as_ref()),
            ("Souk in process", self.souk.as_ref()),
            ("Souk over HTTP", self.http.as_ref().map(|h| &h.measured)),
            ("Souk over HTTP, limiter off", self.limiter_off.as_ref()),
            (LIMITED_ROW, self.limiter_on.as_ref()),
        ];
        rows.extend(
            self.checkouts
                .iter()
                .map(|run| (run.name.as_str(), Some(&run.measured))),
        );
        for &(name, row) in &rows {
            if let Some(m) = row {
                let _ = writeln!(
                    out,
                    "{:<30} {:>9} {:>8.2} {:>11.0} {:>8.2} {:>8.2} {:>7}   {:.0}-{:.0}",
                    name,
                    m.commands,
                    m.seconds,
                    m.per_second(),
                    m.percentile_ms(50.0),
                    m.percentile_ms(99.0),
                    m.errors,
                    m.slices_per_second
                        .iter()
                        .copied()
                        .fold(f64::INFINITY, f64::min),
                    m.slices_per_second.iter().copied().fold(0.0, f64::max),
                );
            }
        }

        let _ = writeln!(
            out,
            "\nCPU per command in microseconds (bench = this process: the client, and Souk itself in process;\n\
             postgres = every postgres process), and cores busy: ours, and the whole machine's (more = other load)"
        );
        let _ = writeln!(
            out,
            "{:<30} {:>9} {:>11} {:>9} {:>9} {:>11} {:>13}",
            "row", "bench", "command-api", "postgres", "total", "cores: ours", "cores: machine"
        );
        for &(name, row) in &rows {
            if let Some(m) = row.filter(|m| m.commands > 0 && m.seconds > 0.0) {
                let per_command = |seconds: f64| seconds * 1e6 / m.commands as f64;
                let _ = writeln!(
                    out,
                    "{:<30} {:>9.0} {:>11} {:>9} {:>9.0} {:>11.2} {:>14.2}",
                    name,
                    per_command(m.cpu.bench_s),
                    m.cpu
                        .server_s
                        .map_or("-".to_owned(), |s| format!("{:.0}", per_command(s))),
                    m.cpu
                        .postgres_s
                        .map_or("?".to_owned(), |s| format!("{:.0}", per_command(s))),
                    per_command(m.cpu.total_s()),
                    m.cpu.total_s() / m.seconds,
                    m.cpu.machine_s / m.seconds
                );
            }
        }
        let disturbed: Vec<String> = rows
            .iter()
            .filter_map(|(name, row)| {
                let m = (*row)?;
                let other = m.cpu.other_cores(m.seconds);
                (other > OTHER_LOAD_WARN_CORES).then(|| format!("{name} ({other:.2} cores)"))
            })
            .collect();
        if !disturbed.is_empty() {
            let _ = writeln!(
                out,
                "WARNING: other processes kept the machine busy during: {}.\n\
                 Absolute figures are lower than on an idle machine; the interleaved slices spread\n\
                 that load over every row, so the ratios suffer less. Rerun on an idle machine.",
                disturbed.join(", ")
            );
        }

        let _ = writeln!(out, "\nratios of commands/s");
        let rate = |m: Option<&Measured>| m.map(Measured::per_second).filter(|r| *r > 0.0);
        let (raw, cqrs, souk) = (
            rate(self.raw.as_ref()),
            rate(self.cqrs.as_ref()),
            rate(self.souk.as_ref()),
        );
        let http = rate(self.http.as_ref().map(|h| &h.measured));
        let ratios = [
            (
                "Souk in process / plain cqrs-es",
                souk,
                cqrs,
                Some(TARGET_IN_PROCESS_VS_CQRS),
            ),
            ("Souk in process / raw append", souk, raw, None),
            ("Souk over HTTP / raw append", http, raw, None),
            ("Souk over HTTP / Souk in process", http, souk, None),
            ("plain cqrs-es / raw append", cqrs, raw, None),
        ];
        for (name, a, b, target) in ratios {
            if let (Some(a), Some(b)) = (a, b) {
                let ratio = a / b;
                let _ = write!(out, "  {name:<34} {ratio:>6.2}x");
                if let Some(target) = target {
                    let _ = write!(
                        out,
                        "   target >= {target:.1}x: {}",
                        verdict(ratio >= target)
                    );
                }
                let _ = writeln!(out);
            }
        }

        if let Some(http) = &self.http {
            let m = &http.measured;
            let (per_second, p99) = (m.per_second(), m.percentile_ms(99.0));
            let _ = writeln!(
                out,
                "  Souk over HTTP: {per_second:.0} commands/s, p99 {p99:.2} ms   target >= {TARGET_HTTP_COMMANDS_PER_S:.0}/s with p99 <= {TARGET_HTTP_P99_MS:.0} ms: {}",
                verdict(
                    per_second >= TARGET_HTTP_COMMANDS_PER_S
                        && p99 <= TARGET_HTTP_P99_MS
                        && m.errors == 0
                )
            );
            let memory = http.memory;
            let _ = writeln!(out, "\ncommand-api resident memory");
            let _ = writeln!(
                out,
                "  VmRSS max sampled during load {:>7.1} MB\n  VmRSS at end of load          {:>7.1} MB\n  VmHWM (peak)                  {:>7.1} MB   target <= {TARGET_RSS_MB:.0} MB: {}",
                mb(memory.rss_max_sampled_kb),
                mb(memory.rss_end_kb),
                mb(memory.hwm_kb),
                verdict(memory.hwm_kb > 0 && mb(memory.hwm_kb) <= TARGET_RSS_MB)
            );
        }

        if let Some(on) = &self.limiter_on {
            let _ = writeln!(
                out,
                "\nrate limiter (SOUK_RATE_LIMIT = SOUK_RATE_BURST = {}/s per user, never reached), same deposits, own slices",
                args.rate_limit
            );
            let _ = writeln!(
                out,
                "  limiter on: {:.0} commands/s, p99 {:.2} ms, {} errors",
                on.per_second(),
                on.percentile_ms(99.0),
                on.errors
            );
            if let Some(off) = self.limiter_off.as_ref().filter(|m| m.per_second() > 0.0) {
                let ratio = on.per_second() / off.per_second();
                let _ = writeln!(
                    out,
                    "  limiter off: {:.0} commands/s, p99 {:.2} ms\n  on / off {ratio:>6.3}x   target >= {TARGET_LIMITER_RATIO:.2}x: {}",
                    off.per_second(),
                    off.percentile_ms(99.0),
                    verdict(ratio >= TARGET_LIMITER_RATIO && on.errors == 0)
                );
            }
        }

        if !self.checkouts.is_empty() {
            let _ = writeln!(
                out,
                "\ncheckouts over HTTP (POST /orders, one line, wallet escrow, {} buyers with their own wallets, \
                 {} listings, one command-api)",
                args.concurrency, args.checkout_listings
            );
            for run in &self.checkouts {
                let m = &run.measured;
                let (per_second, p99) = (m.per_second(), m.percentile_ms(99.0));
                let target = match run.shape {
                    Shape::Own => Some(TARGET_CHECKOUT_OWN_PER_S),
                    Shape::Sellers(1) => Some(TARGET_CHECKOUT_ONE_SELLER_PER_S),
                    Shape::Sellers(_) => None,
                };
                let _ = write!(
                    out,
                    "  {:<24} {per_second:>6.0}/s, p50 {:.2} ms, p99 {p99:.2} ms, {} errors",
                    run.name,
                    m.percentile_ms(50.0),
                    m.errors
                );
                if let Some(target) = target {
                    let _ = write!(
                        out,
                        "   target >= {target:.0}/s with p99 <= {TARGET_CHECKOUT_P99_MS:.0} ms: {}",
                        verdict(
                            per_second >= target && p99 <= TARGET_CHECKOUT_P99_MS && m.errors == 0
                        )
                    );
                }
                let _ = writeln!(out);
                let _ = writeln!(
                    out,
                    "  {:<24} orders answered confirmed (warm-ups included) {}, in the database {} placed and {} confirmed: {}",
                    "",
                    run.confirmed_answers,
                    run.counted.placed,
                    run.counted.confirmed,
                    if run.counts_agree() {
                        "every order confirmed"
                    } else {
                        "MISMATCH"
                    }
                );
            }
            let one = self
                .checkouts
                .iter()
                .find(|run| run.shape == Shape::Sellers(1));
            let many = self
                .checkouts
                .iter()
                .find(|run| matches!(run.shape, Shape::Sellers(n) if n > 1));
            if let (Some(one), Some(many)) = (one, many)
                && one.measured.per_second() > 0.0
            {
                let ratio = many.measured.per_second() / one.measured.per_second();
                let _ = writeln!(
                    out,
                    "  {} / {}: {ratio:.2}x   target >= {TARGET_SELLERS_VS_ONE_SELLER:.1}x: {}",
                    many.name,
                    one.name,
                    verdict(ratio >= TARGET_SELLERS_VS_ONE_SELLER && many.measured.errors == 0)
                );
            }
            if !self.checkouts_open.is_empty() {
                let _ = writeln!(
                    out,
                    "  open loop (checkouts scheduled at a fixed rate over the {} connections, latency from the scheduled time):",
                    args.concurrency
                );
            }
            for run in &self.checkouts_open {
                let m = &run.measured;
                let p99 = m.percentile_ms(99.0);
                let _ = writeln!(
                    out,
                    "  {:<24} at {:>5}/s: {:>6.0}/s answered, p50 {:.2} ms, p99 {p99:.2} ms, {} errors   p99 <= {TARGET_CHECKOUT_P99_MS:.0} ms: {}",
                    run.name,
                    run.rate,
                    m.per_second(),
                    m.percentile_ms(50.0),
                    m.errors,
                    verdict(p99 <= TARGET_CHECKOUT_P99_MS && m.errors == 0)
                );
            }
        }

        if let Some(snapshot) = &self.snapshot {
            let (large50, large99) = (
                percentile_ms(&snapshot.large_us, 50.0),
                percentile_ms(&snapshot.large_us, 99.0),
            );
            let (new50, new99) = (
                percentile_ms(&snapshot.new_us, 50.0),
                percentile_ms(&snapshot.new_us, 99.0),
            );
            let _ = writeln!(
                out,
                "\none deposit through a fresh EventStore (snapshot + tail), {} samples each",
                snapshot.large_us.len()
            );
            let _ = writeln!(
                out,
                "  aggregate of {} events (snapshot at {}, seeded in {:.1}s): p50 {large50:.2} ms, p99 {large99:.2} ms",
                snapshot.events,
                snapshot
                    .snapshot_at
                    .map_or("none".to_owned(), |at| at.to_string()),
                snapshot.seed_seconds
            );
            let _ = writeln!(
                out,
                "  new aggregate (1 event):                               p50 {new50:.2} ms, p99 {new99:.2} ms"
            );
            let (ratio50, ratio99) = (large50 / new50, large99 / new99);
            let _ = writeln!(
                out,
                "  large / new: p50 {ratio50:.2}x, p99 {ratio99:.2}x   target p50 within {TARGET_SNAPSHOT_RATIO:.0}x: {}",
                verdict(ratio50 <= TARGET_SNAPSHOT_RATIO)
            );
        }
        out
    }
}
