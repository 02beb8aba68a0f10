//! Souk's read-side benchmark: the whole system as separate processes, one
//! run, one table.
//!
//! ```sh
//! cargo run --release -p tests --bin read-bench            # all four phases
//! cargo run --release -p tests --bin read-bench -- --help  # flags
//! ```
//!
//! It builds `command-api` (with its relay), `projector` and `query-api`
//! with its own profile, starts each as a process of its own on a database
//! created for the run and on a private `nats-server` (so that NATS can be
//! stopped without disturbing anything else on the machine), or with
//! `--nats-cluster N` on N private `nats-server`s routed as one cluster
//! (the services get every node in `NATS_URL` and `SOUK_STREAM_REPLICAS=N`),
//! seeds listings and wallets over HTTP, then measures:
//!
//! 1. **lag**: `--rate` commands per second (open loop: each command is sent
//!    at its scheduled time whether or not earlier ones finished) for
//!    `--seconds`, alternating a listing price change and a wallet deposit.
//!    After each command's answer it asks the query API for the changed
//!    resource with `?after=<position>` and checks that the answer holds the
//!    write (its version is at least the command's). The lag of one command
//!    is the time from its answer (the commit happened before) to the query
//!    API's answer showing it.
//! 2. **get**: `GET /listings/{id}` at `--get-rate` requests per second
//!    (open loop) for `--get-seconds`, as a browser asks (`Accept-Encoding:
//!    gzip`; an answer that is not gzipped counts as an error); latencies
//!    count from each request's scheduled time, so a stalled server cannot
//!    hide its queue.
//! 3. **catch-up**: NATS is killed (with a cluster: every node, so the
//!    stream is unavailable), `--outage-events` deposits are committed over
//!    HTTP (commands keep succeeding), NATS is started again (every node,
//!    with its store), and the time is measured until the relay has
//!    published every event and every partition of every projection has
//!    applied them.
//! 4. **search**: `--search-listings` listings of varied titles, categories,
//!    conditions and prices are created through the command API
//!    (`SEARCH_WRITERS` at a time), and the bench waits until the projector
//!    has projected and indexed them all (embedded index). `/search` is then
//!    asked at `--search-rate` (open loop) for `--search-seconds`, rotating a
//!    word, a word with a typo, a filtered query, a sorted query and a second
//!    page. Then a Meilisearch server started by the bench (`MEILI_BIN`, else
//!    `meilisearch` on `PATH`, else `../shared/bin/meilisearch`) takes over:
//!    the projector and the query API are restarted with
//!    `SEARCH_BACKEND=meilisearch`, the projector refills the empty index
//!    (timed), and the same load runs again. A word or typo query that finds
//!    nothing, or a second page that is empty, counts as an error. Last, the
//!    steady-state indexing lag: price changes of the search listings at
//!    `--index-rate` (open loop) for `--index-seconds`, each timed from the
//!    command's answer until a read of Meilisearch's documents (every 20 ms)
//!    shows the new price.
//!
//! Both APIs run with a rate limit per user (`--rate-limit`, also the burst)
//! too high to trigger, so that the limiter's cost is in every figure.
//!
//! The database, the NATS store and the processes are removed at the end,
//! also on error or Ctrl-C. Progress goes to stderr, the table to stdout.
//! Each open-loop phase also lists on stderr its 100 ms windows with an
//! answer at or over the phase's target (`bench_kit::print_slow_windows`).
//! Targets are printed as MET or MISSED; they never fail the run.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::{Parser, ValueEnum};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tests::bench_kit::{
    ChildGuard, Databases, Sample, TempDir, free_port, in_parallel, log_tail, percentile_ms,
    print_slow_windows, verdict, wait_healthy,
};
use tests::meili::{MeiliServer, meili_bin};
use tests::nats::{NatsCluster, NatsServer};
use tokio::sync::Semaphore;
use uuid::Uuid;

/// Longest wait for one request before it counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Most requests of an open-loop phase in flight; a request that would
/// exceed it counts as an error (the system fell behind).
const MAX_IN_FLIGHT: usize = 4_096;
/// Concurrent connections that write the outage's events.
const OUTAGE_WRITERS: usize = 64;
/// Longest wait for the system to catch up after the outage.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(600);
/// How often catch-up progress is read from the database.
const CATCH_UP_POLL: Duration = Duration::from_millis(10);
/// Concurrent connections that create the search phase's listings.
const SEARCH_WRITERS: usize = 128;
/// Longest wait for the search index to hold every listing.
const INDEX_TIMEOUT: Duration = Duration::from_secs(1_800);
const STREAM: &str = "souk_read_bench";
/// The run's Meilisearch index (`_v<document version>` added by Souk).
const MEILI_INDEX: &str = "souk_read_bench";

// The targets of the issues, printed beside the figures.
const TARGET_LAG_P99_MS: f64 = 200.0;
const TARGET_LAG_P99_MS_CLUSTER: f64 = 100.0;
const TARGET_CATCH_UP_PER_S: f64 = 30_000.0;
const TARGET_CATCH_UP_PER_S_CLUSTER: f64 = 20_000.0;
const TARGET_GET_P99_MS: f64 = 10.0;
const TARGET_SEARCH_P99_MS_EMBEDDED: f64 = 10.0;
const TARGET_SEARCH_P99_MS_MEILI: f64 = 25.0;
const TARGET_MEILI_REFILL_PER_S: f64 = 5_000.0;
const TARGET_MEILI_INDEXING_P99_MS: f64 = 1_000.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Phase {
    Lag,
    Get,
    CatchUp,
    Search,
}

/// Souk's read-side benchmark (see the docs of `tests/src/bin/read_bench.rs`).
#[derive(Debug, Parser)]
#[command(
    name = "read-bench",
    about = "Souk's read-side benchmark: prints one table"
)]
struct Args {
    /// Commands per second of the lag phase.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=20_000))]
    rate: u64,

    /// Measured seconds of the lag phase.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3_600))]
    seconds: u64,

    /// Requests per second of the GET phase.
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(1..=50_000))]
    get_rate: u64,

    /// Measured seconds of the GET phase.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3_600))]
    get_seconds: u64,

    /// Unmeasured seconds before each open-loop phase.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(0..=60))]
    warmup_seconds: u64,

    /// Events committed while NATS is down.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=2_000_000))]
    outage_events: u64,

    /// Requests per second per user (and burst) of both APIs' rate
    /// limiters: high enough never to trigger; 0 turns them off.
    #[arg(long, default_value_t = 1_000_000)]
    rate_limit: u32,

    /// NATS nodes: 0 runs one private nats-server; N runs N nodes routed as
    /// one cluster, with the stream replicated N times.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=7))]
    nats_cluster: u8,

    /// Listings the search phase creates and searches.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    search_listings: u64,

    /// Requests per second of the search phase (per backend).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=20_000))]
    search_rate: u64,

    /// Measured seconds of the search phase (per backend).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3_600))]
    search_seconds: u64,

    /// Listing changes per second while the Meilisearch indexing lag is
    /// measured (price changes of the search listings, each listing at most
    /// once).
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=20_000))]
    index_rate: u64,

    /// Measured seconds of the Meilisearch indexing lag.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3_600))]
    index_seconds: u64,

    /// Listings (and wallets) the load spreads over.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    aggregates: u64,

    /// Phases to run, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "lag,get,catch-up,search"
    )]
    phases: Vec<Phase>,

    /// Maintenance database the benchmark creates its database from.
    #[arg(
        long,
        env = "SOUK_BENCH_ADMIN_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres",
        hide_env_values = true
    )]
    admin_url: String,

    /// Keep the services' logs in this directory (by default they go with
    /// the run's temporary directory).
    #[arg(long)]
    log_dir: Option<PathBuf>,

    /// A directory holding `command-api`, `projector` and `query-api`
    /// binaries to use instead of building them.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

impl Args {
    /// Issue 14's commit → visible p99 (ms) and catch-up (events/s) targets
    /// for this run's NATS: one server or a cluster.
    fn lag_and_catch_up_targets(&self) -> (f64, f64) {
        if self.nats_cluster > 0 {
            (TARGET_LAG_P99_MS_CLUSTER, TARGET_CATCH_UP_PER_S_CLUSTER)
        } else {
            (TARGET_LAG_P99_MS, TARGET_CATCH_UP_PER_S)
        }
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
    let meili = if args.phases.contains(&Phase::Search) {
        Some(meili_bin().context(
            "the search phase needs a meilisearch binary (MEILI_BIN, PATH or ../shared/bin/meilisearch)",
        )?)
    } else {
        None
    };
    let bins = tests::bench_kit::service_binaries(
        &["command-api", "projector", "query-api"],
        args.bin_dir.as_deref(),
    )
    .await?;
    let mut system = System::start(&bins, databases, args).await?;
    let _vacuum = vacuum_if_autovacuum_is_off(&system.pool).await?;
    let seeded = system.seed(args).await?;
    let mut report = Report::default();
    for phase in &args.phases {
        match phase {
            Phase::Lag => report.lag = Some(system.lag(args, &seeded).await?),
            Phase::Get => report.get = Some(system.get(args, &seeded).await?),
            Phase::CatchUp => report.catch_up = Some(system.catch_up(args, &seeded).await?),
            Phase::Search => {
                let bin = meili.as_deref().context("no meilisearch binary")?;
                report.search = Some(system.search(args, &seeded, bin).await?);
            }
        }
        system.check_alive()?;
    }
    system.save_metrics().await;
    print!("{}", report.render(args));
    Ok(())
}

/// How often the run looks for tables to vacuum on a server without
/// autovacuum (autovacuum's default `autovacuum_naptime` is a minute; a busy
/// deployment visits its hot tables more often).
const VACUUM_EVERY: Duration = Duration::from_secs(10);
/// A vacuum at least this long is reported on stderr.
const SLOW_VACUUM: Duration = Duration::from_millis(250);

/// The tables autovacuum would vacuum or analyze now, by the server's own
/// thresholds (`autovacuum_vacuum_*`, `autovacuum_analyze_*`): each as a
/// quoted name, whether to vacuum it and whether to analyze it.
const TABLES_DUE: &str = "
    WITH t AS (
        SELECT format('%I.%I', s.schemaname, s.relname) AS name, s.n_dead_tup,
               s.n_ins_since_vacuum, s.n_mod_since_analyze,
               greatest(c.reltuples, 0) AS tuples
          FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid
    ), due AS (
        SELECT name,
               n_dead_tup > current_setting('autovacuum_vacuum_threshold')::float8
                   + current_setting('autovacuum_vacuum_scale_factor')::float8 * tuples
               OR n_ins_since_vacuum > current_setting('autovacuum_vacuum_insert_threshold')::float8
                   + current_setting('autovacuum_vacuum_insert_scale_factor')::float8 * tuples
                   AS vacuum_due,
               n_mod_since_analyze > current_setting('autovacuum_analyze_threshold')::float8
                   + current_setting('autovacuum_analyze_scale_factor')::float8 * tuples
                   AS analyze_due
          FROM t
    )
    SELECT name, vacuum_due, analyze_due FROM due WHERE vacuum_due OR analyze_due";

/// Autovacuum's cost-based throttle (`autovacuum_vacuum_cost_delay` and
/// `_limit`, -1 meaning `vacuum_cost_limit`) for a session's `VACUUM`.
const THROTTLE_AS_AUTOVACUUM: &str = "
    SELECT set_config('vacuum_cost_delay', current_setting('autovacuum_vacuum_cost_delay'), false),
           set_config('vacuum_cost_limit',
                      CASE current_setting('autovacuum_vacuum_cost_limit')
                          WHEN '-1' THEN current_setting('vacuum_cost_limit')
                          ELSE current_setting('autovacuum_vacuum_cost_limit') END,
                      false)";

/// A server with autovacuum off (as this repository's CI machine is
/// configured) lets the read models' dead rows pile up for the whole run,
/// which no deployment does, and the lag grows with them. On such a server
/// the run does autovacuum's work itself, and says so: every
/// [`VACUUM_EVERY`] it vacuums and analyzes the tables autovacuum would
/// ([`TABLES_DUE`]), throttled as autovacuum is (`autovacuum_vacuum_cost_*`).
/// An unthrottled `VACUUM (ANALYZE)` of the whole database took 1.3-3.5 s
/// every 10 s, and every search answered in that time waited on it
/// (README, "Read side"). The task stops when the returned guard drops.
async fn vacuum_if_autovacuum_is_off(
    pool: &PgPool,
) -> anyhow::Result<Option<tests::bench_kit::AbortOnDrop>> {
    let setting: String = sqlx::query_scalar("SHOW autovacuum")
        .fetch_one(pool)
        .await
        .context("reading the autovacuum setting")?;
    if setting != "off" {
        return Ok(None);
    }
    println!(
        "autovacuum is off on this PostgreSQL server: every {} s the run vacuums and analyzes the tables autovacuum would, throttled as autovacuum is",
        VACUUM_EVERY.as_secs()
    );
    // A pool of one connection, throttled as autovacuum is: the throttle is
    // a session setting.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::query(THROTTLE_AS_AUTOVACUUM).execute(conn).await?;
                Ok(())
            })
        })
        .connect_with(pool.connect_options().as_ref().clone())
        .await
        .context("a connection for vacuuming")?;
    let task = tokio::spawn(async move {
        loop {
            tokio::time::sleep(VACUUM_EVERY).await;
            vacuum_tables_due(&pool).await;
        }
    });
    Ok(Some(tests::bench_kit::AbortOnDrop(task)))
}

/// One visit of [`vacuum_if_autovacuum_is_off`]: vacuums and analyzes the
/// tables due, one at a time; failures are reported and skipped.
async fn vacuum_tables_due(pool: &PgPool) {
    let due: Vec<(String, bool, bool)> = match sqlx::query_as(TABLES_DUE).fetch_all(pool).await {
        Ok(due) => due,
        Err(error) => {
            eprintln!("vacuum: finding the tables due: {error}");
            return;
        }
    };
    for (table, vacuum, analyze) in due {
        let command = match (vacuum, analyze) {
            (true, true) => "VACUUM (ANALYZE)",
            (true, false) => "VACUUM",
            _ => "ANALYZE",
        };
        let (began, started) = (chrono::Utc::now(), Instant::now());
        match sqlx::raw_sql(&format!("{command} {table}"))
            .execute(pool)
            .await
        {
            Err(error) => eprintln!("vacuum: {command} {table}: {error}"),
            // A long one is named, so that slow windows can be matched.
            Ok(_) if started.elapsed() >= SLOW_VACUUM => eprintln!(
                "vacuum: {command} {table} began {} UTC, took {:.2} s",
                began.format("%H:%M:%S%.3f"),
                started.elapsed().as_secs_f64()
            ),
            Ok(_) => {}
        }
    }
}

// ---------------------------------------------------------------------------
// The system under test.

/// One service process, its log and its Prometheus metrics.
struct Service {
    name: &'static str,
    child: ChildGuard,
    log: PathBuf,
    metrics_url: String,
}

/// The run's private NATS: one server, or the nodes of one cluster.
enum Nats {
    Single(NatsServer),
    Cluster(NatsCluster),
}

impl Nats {
    /// `nodes` 0: one server; else a cluster of that many nodes.
    fn start(nodes: u8) -> anyhow::Result<Self> {
        Ok(if nodes == 0 {
            Self::Single(NatsServer::start().context("starting a private nats-server")?)
        } else {
            Self::Cluster(
                NatsCluster::start(nodes.into())
                    .with_context(|| format!("starting a {nodes}-node NATS cluster"))?,
            )
        })
    }

    /// What `NATS_URL` takes: every node, comma separated.
    fn url(&self) -> String {
        match self {
            Self::Single(server) => server.url(),
            Self::Cluster(cluster) => cluster.urls(),
        }
    }

    /// The stream's replica count the services are given.
    fn replicas(&self) -> usize {
        match self {
            Self::Single(_) => 1,
            Self::Cluster(cluster) => cluster.size(),
        }
    }

    /// The outage: every server is killed.
    fn stop(&mut self) -> anyhow::Result<()> {
        match self {
            Self::Single(server) => server.stop(),
            Self::Cluster(cluster) => cluster.stop_all(),
        }
    }

    /// Every server started again with its store.
    fn start_again(&mut self) -> anyhow::Result<()> {
        match self {
            Self::Single(server) => server.start_again(),
            Self::Cluster(cluster) => cluster.start_all_again(),
        }
    }
}

/// The three services, their private NATS and their database.
struct System {
    // Dropped in this order: the services first, then Meilisearch, NATS and
    // the files.
    services: Vec<Service>,
    meili: Option<MeiliServer>,
    nats: Nats,
    pool: PgPool,
    client: reqwest::Client,
    command_base: String,
    query_base: String,
    private_pem: Vec<u8>,
    log_dir: PathBuf,
    bins: PathBuf,
    /// The environment every service gets.
    env: Vec<(&'static str, String)>,
    rate_limit: u32,
    query_port: u16,
    metrics_port: u16,
    _dir: TempDir,
}

impl System {
    async fn start(bins: &Path, databases: &Databases, args: &Args) -> anyhow::Result<Self> {
        let log_dir = args.log_dir.as_deref();
        let nats = Nats::start(args.nats_cluster)?;
        let (database_url, _) = databases.create().await?;
        let dir = TempDir::new()?;
        let private_key = dir.0.join("jwt-private.pem");
        let public_key = dir.0.join("jwt-public.pem");
        identity::ensure_dev_key_pair(&private_key, &public_key)
            .context("generating a key pair")?;
        let private_pem = std::fs::read(&private_key).context("reading the private key")?;
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(MAX_IN_FLIGHT)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .context("building the HTTP client")?;
        let (command_port, query_port, metrics_port) = (free_port()?, free_port()?, free_port()?);
        // The run's own search index: the default (./data/search) is the
        // local system's, which the run's projector would clear.
        let search_dir = dir.0.join("search");
        let env = vec![
            ("SEARCH_INDEX_DIR", search_dir.display().to_string()),
            ("DATABASE_URL", database_url.clone()),
            ("NATS_URL", nats.url()),
            ("SOUK_STREAM_REPLICAS", nats.replicas().to_string()),
            ("SOUK_STREAM", STREAM.to_owned()),
            ("SOUK_JWT_PUBLIC_KEY", public_key.display().to_string()),
            ("SOUK_JWT_PRIVATE_KEY", private_key.display().to_string()),
            (
                "RUST_LOG",
                std::env::var("SOUK_BENCH_LOG").unwrap_or_else(|_| "info".into()),
            ),
        ];
        let mut system = Self {
            services: Vec::new(),
            meili: None,
            nats,
            pool: PgPoolOptions::new()
                .max_connections(4)
                .acquire_timeout(Duration::from_secs(10))
                .connect(&database_url)
                .await
                .context("connecting to the benchmark's database")?,
            client,
            command_base: format!("http://127.0.0.1:{command_port}"),
            query_base: format!("http://127.0.0.1:{query_port}"),
            private_pem,
            log_dir: match log_dir {
                Some(log_dir) => {
                    std::fs::create_dir_all(log_dir)
                        .with_context(|| format!("creating {}", log_dir.display()))?;
                    log_dir.to_path_buf()
                }
                None => dir.0.clone(),
            },
            bins: bins.to_path_buf(),
            env,
            rate_limit: args.rate_limit,
            query_port,
            metrics_port,
            _dir: dir,
        };
        // The command API first: it applies the migrations and its relay
        // creates the stream.
        let mut command_api = system.command("command-api");
        command_api.env("COMMAND_API_ADDR", format!("127.0.0.1:{command_port}"));
        let health = format!("{}/health", system.command_base);
        system.spawn("command-api", command_api, &health).await?;
        system.spawn_projector("projector", &[]).await?;
        system.spawn_query_api("query-api", &[]).await?;
        Ok(system)
    }

    /// A service's command with the environment every service gets.
    fn command(&self, bin: &str) -> Command {
        let mut command = Command::new(self.bins.join(bin));
        command.envs(self.env.iter().map(|(name, value)| (name, value)));
        if self.rate_limit > 0 {
            command
                .env("SOUK_RATE_LIMIT", self.rate_limit.to_string())
                .env("SOUK_RATE_BURST", self.rate_limit.to_string());
        } else {
            command
                .env_remove("SOUK_RATE_LIMIT")
                .env_remove("SOUK_RATE_BURST");
        }
        command
    }

    /// Starts the projector as `name` (its log's name) with `extra`
    /// environment.
    async fn spawn_projector(
        &mut self,
        name: &'static str,
        extra: &[(&str, String)],
    ) -> anyhow::Result<()> {
        let mut projector = self.command("projector");
        projector
            .env(
                "SOUK_PROJECTOR_METRICS_ADDR",
                format!("127.0.0.1:{}", self.metrics_port),
            )
            .envs(extra.iter().map(|(name, value)| (name, value)));
        let health = format!("http://127.0.0.1:{}/health", self.metrics_port);
        self.spawn(name, projector, &health).await
    }

    /// Starts the query API as `name` (its log's name) with `extra`
    /// environment, on the run's query port.
    async fn spawn_query_api(
        &mut self,
        name: &'static str,
        extra: &[(&str, String)],
    ) -> anyhow::Result<()> {
        let mut query_api = self.command("query-api");
        query_api
            .env("QUERY_API_ADDR", format!("127.0.0.1:{}", self.query_port))
            .envs(extra.iter().map(|(name, value)| (name, value)));
        let health = format!("{}/health", self.query_base);
        self.spawn(name, query_api, &health).await
    }

    /// Kills the services whose name starts with `prefix`, and saves their
    /// metrics first.
    async fn stop_services(&mut self, prefix: &str) {
        self.save_metrics().await;
        self.services
            .retain(|service| !service.name.starts_with(prefix));
    }

    async fn spawn(
        &mut self,
        name: &'static str,
        mut command: Command,
        health_url: &str,
    ) -> anyhow::Result<()> {
        let log = self.log_dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).with_context(|| format!("creating {name}.log"))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().context("sharing the log file")?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let mut child = ChildGuard(child, None);
        eprintln!("waiting for {name} (pid {})", child.0.id());
        wait_healthy(&mut child, &self.client, health_url, &log).await?;
        let metrics_url = health_url.replace("/health", "/metrics");
        self.services.push(Service {
            name,
            child,
            log,
            metrics_url,
        });
        Ok(())
    }

    /// Saves each service's metrics beside its log, for a look at where the
    /// time went.
    async fn save_metrics(&self) {
        for service in &self.services {
            let path = self.log_dir.join(format!("{}.metrics", service.name));
            if let Ok(answer) = self.client.get(&service.metrics_url).send().await
                && let Ok(text) = answer.text().await
            {
                let _ = std::fs::write(path, text);
            }
        }
    }

    /// Fails with the end of its log if a service exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        for service in &mut self.services {
            if let Some(status) = service.child.0.try_wait().context("polling a service")? {
                bail!(
                    "{} exited ({status}); its log ends with:\n{}",
                    service.name,
                    log_tail(&service.log)
                );
            }
        }
        Ok(())
    }

    fn token(&self, sub: Uuid, role: &str) -> anyhow::Result<Arc<str>> {
        let token = identity::mint_token(
            &self.private_pem,
            sub,
            role,
            chrono::Duration::hours(4),
            None,
            None,
        )
        .context("minting a token")?;
        Ok(Arc::from(token))
    }

    /// Listings of one seller and wallets of one buyer, `--aggregates` each.
    async fn seed(&self, args: &Args) -> anyhow::Result<Seeded> {
        let count = args.aggregates as usize;
        let seeded = Seeded {
            seller: self.token(Uuid::now_v7(), "seller")?,
            buyer: self.token(Uuid::now_v7(), "buyer")?,
            admin: self.token(Uuid::now_v7(), "admin")?,
            listings: Vec::new(),
            wallets: Vec::new(),
        };
        eprintln!("seeding {count} listings and {count} wallets");
        let listings = in_parallel(count, 32, |i| {
            let body = json!({
                "title": format!("Benchmark item {i}"),
                "description": "A thing to sell.",
                "category": "home",
                "condition": "good",
                "price": {"amount": 1_000, "currency": "EUR"},
                "quantity": 10,
                "location": {"city": "Lyon", "country": "FR"},
            });
            self.post_id("/listings", &seeded.seller, body, 201)
        })
        .await?;
        let wallets = in_parallel(count, 32, |_| {
            self.post_id("/wallets", &seeded.buyer, json!({"currency": "EUR"}), 201)
        })
        .await?;
        Ok(Seeded {
            listings,
            wallets,
            ..seeded
        })
    }

    async fn post_id(
        &self,
        path: &str,
        token: &str,
        body: Value,
        status: u16,
    ) -> anyhow::Result<Uuid> {
        let answer = post(
            &self.client,
            &format!("{}{path}", self.command_base),
            token,
            &body,
        )
        .await?;
        ensure!(
            answer.status == status,
            "POST {path} answered {}: {}",
            answer.status,
            answer.body
        );
        answer.body["id"]
            .as_str()
            .and_then(|id| Uuid::parse_str(id).ok())
            .with_context(|| format!("no id in {}", answer.body))
    }

    /// Phase 1: commit-to-visible lag at a fixed command rate.
    async fn lag(&self, args: &Args, seeded: &Seeded) -> anyhow::Result<Measured> {
        eprintln!(
            "lag: {} commands/s for {} s (+{} s warm-up), each read back with ?after=",
            args.rate, args.seconds, args.warmup_seconds
        );
        let counter = Arc::new(AtomicU64::new(0));
        let op = {
            let (client, command_base, query_base) = (
                self.client.clone(),
                self.command_base.clone(),
                self.query_base.clone(),
            );
            let (seller, buyer, admin) = (
                seeded.seller.clone(),
                seeded.buyer.clone(),
                seeded.admin.clone(),
            );
            let (listings, wallets) = (
                Arc::new(seeded.listings.clone()),
                Arc::new(seeded.wallets.clone()),
            );
            move |_scheduled: Instant| {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let (client, command_base, query_base) =
                    (client.clone(), command_base.clone(), query_base.clone());
                let (seller, buyer, admin) = (seller.clone(), buyer.clone(), admin.clone());
                let (listings, wallets) = (listings.clone(), wallets.clone());
                async move {
                    let index = (n / 2) as usize;
                    let (command, command_token, read, read_token, body) = if n.is_multiple_of(2) {
                        let id = listings[index % listings.len()];
                        (
                            format!("{command_base}/listings/{id}/price"),
                            seller,
                            format!("{query_base}/listings/{id}"),
                            buyer.clone(),
                            json!({"price": {"amount": 1_000 + n as i64 % 100_000, "currency": "EUR"}}),
                        )
                    } else {
                        let id = wallets[index % wallets.len()];
                        (
                            format!("{command_base}/wallets/{id}/deposits"),
                            admin,
                            format!("{query_base}/wallets/{id}"),
                            buyer.clone(),
                            json!({"amount": {"amount": 1, "currency": "EUR"}, "reference": "bench"}),
                        )
                    };
                    let answer = post(&client, &command, &command_token, &body).await?;
                    ensure!(
                        answer.status == 200,
                        "POST {command} answered {}: {}",
                        answer.status,
                        answer.body
                    );
                    let committed = Instant::now();
                    let version = answer.body["version"].as_i64().context("no version")?;
                    let position = answer.body["position"].as_str().context("no position")?;
                    let seen =
                        get(&client, &format!("{read}?after={position}"), &read_token).await?;
                    let visible = committed.elapsed();
                    ensure!(
                        seen.status == 200,
                        "GET {read}?after= answered {}: {}",
                        seen.status,
                        seen.body
                    );
                    let seen_version = seen.body["version"].as_i64().unwrap_or(-1);
                    ensure!(
                        seen_version >= version,
                        "GET {read}?after={position} answered version {seen_version}, before the write's {version}"
                    );
                    Ok(visible)
                }
            }
        };
        let (target_ms, _) = args.lag_and_catch_up_targets();
        open_loop(args.rate, args.warmup_seconds, args.seconds, target_ms, op).await
    }

    /// Phase 2: `GET /listings/{id}` latency at a fixed request rate, each
    /// answer gzipped. It starts once the projections have applied what
    /// earlier phases wrote, so it measures reads, not a backlog being
    /// worked off beside them.
    async fn get(&self, args: &Args, seeded: &Seeded) -> anyhow::Result<Measured> {
        self.wait_current("get").await?;
        eprintln!(
            "get: GET /listings/{{id}} at {}/s for {} s (+{} s warm-up)",
            args.get_rate, args.get_seconds, args.warmup_seconds
        );
        let counter = Arc::new(AtomicU64::new(0));
        let client = self.client.clone();
        let buyer = seeded.buyer.clone();
        let urls: Arc<Vec<String>> = Arc::new(
            seeded
                .listings
                .iter()
                .map(|id| format!("{}/listings/{id}", self.query_base))
                .collect(),
        );
        let op = move |scheduled: Instant| {
            let n = counter.fetch_add(1, Ordering::Relaxed) as usize;
            let (client, buyer, urls) = (client.clone(), buyer.clone(), urls.clone());
            async move {
                // Spread over the listings, not in creation order.
                let url = &urls[n.wrapping_mul(7_919) % urls.len()];
                let response = client
                    .get(url)
                    .bearer_auth(&*buyer)
                    .header(reqwest::header::ACCEPT_ENCODING, "gzip")
                    .send()
                    .await
                    .with_context(|| format!("GET {url}"))?;
                let status = response.status().as_u16();
                let gzipped = response
                    .headers()
                    .get(reqwest::header::CONTENT_ENCODING)
                    .is_some_and(|encoding| encoding == "gzip");
                let body = response.bytes().await.context("reading an answer")?;
                ensure!(
                    status == 200,
                    "GET {url} answered {status}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(300)])
                );
                // The body itself must be gzip (its magic number).
                ensure!(
                    gzipped && body.starts_with(&[0x1f, 0x8b]),
                    "GET {url} with Accept-Encoding: gzip was answered uncompressed"
                );
                Ok(scheduled.elapsed())
            }
        };
        open_loop(
            args.get_rate,
            args.warmup_seconds,
            args.get_seconds,
            TARGET_GET_P99_MS,
            op,
        )
        .await
    }

    /// Phase 3: catch-up after a NATS outage.
    async fn catch_up(&mut self, args: &Args, seeded: &Seeded) -> anyhow::Result<CatchUp> {
        let current = self.wait_current("catch-up").await?;
        eprintln!(
            "catch-up: NATS stopped; committing {} deposits",
            args.outage_events
        );
        self.nats.stop().context("stopping NATS")?;
        let before = self.event_count().await?;
        let written = Instant::now();
        let deposits: Arc<Vec<String>> = Arc::new(
            seeded
                .wallets
                .iter()
                .map(|id| format!("{}/wallets/{id}/deposits", self.command_base))
                .collect(),
        );
        let body = json!({"amount": {"amount": 1, "currency": "EUR"}, "reference": "outage"});
        in_parallel(args.outage_events as usize, OUTAGE_WRITERS, |i| {
            let (client, url, admin, body) = (
                self.client.clone(),
                deposits[i % deposits.len()].clone(),
                seeded.admin.clone(),
                body.clone(),
            );
            async move {
                let answer = post(&client, &url, &admin, &body).await?;
                ensure!(
                    answer.status == 200,
                    "a deposit during the outage answered {}: {}",
                    answer.status,
                    answer.body
                );
                Ok(())
            }
        })
        .await?;
        let write_seconds = written.elapsed().as_secs_f64();
        let events = self.event_count().await? - before;
        let target = self.last_position().await?;
        eprintln!(
            "catch-up: {events} events committed in {write_seconds:.1} s with NATS down; starting NATS"
        );
        self.nats.start_again().context("starting NATS again")?;
        let restarted = Instant::now();
        let mut relay_seconds = None;
        let mut resumed_seconds = None;
        loop {
            if resumed_seconds.is_none() && self.relay_past(current).await? {
                resumed_seconds = Some(restarted.elapsed().as_secs_f64());
            }
            if relay_seconds.is_none() && self.relay_at(target).await? {
                relay_seconds = Some(restarted.elapsed().as_secs_f64());
            }
            if relay_seconds.is_some() && self.projections_at(target).await? {
                break;
            }
            ensure!(
                restarted.elapsed() < CATCH_UP_TIMEOUT,
                "the projections did not catch up within {CATCH_UP_TIMEOUT:?}"
            );
            tokio::time::sleep(CATCH_UP_POLL).await;
        }
        Ok(CatchUp {
            events,
            write_seconds,
            resumed_seconds: resumed_seconds.unwrap_or(f64::NAN),
            relay_seconds: relay_seconds.unwrap_or(f64::NAN),
            total_seconds: restarted.elapsed().as_secs_f64(),
        })
    }

    /// Phase 4: `/search` over `--search-listings` listings, on the embedded
    /// index and then on a Meilisearch server the bench starts.
    async fn search(
        &mut self,
        args: &Args,
        seeded: &Seeded,
        meili_server: &Path,
    ) -> anyhow::Result<SearchRun> {
        ensure!(self.meili.is_none(), "the search phase runs once per run");
        let count = args.search_listings as usize;
        eprintln!("search: creating {count} listings through the command API");
        let sellers = (0..SEARCH_SELLERS)
            .map(|_| self.token(Uuid::now_v7(), "seller"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let created = Instant::now();
        let ids = in_parallel(count, SEARCH_WRITERS, |i| {
            let seller = &sellers[i % sellers.len()];
            self.post_id("/listings", seller, search_listing(i), 201)
        })
        .await?;
        // Each listing with its seller's token, for the indexing-lag load.
        let owned: Vec<(Uuid, Arc<str>)> = ids
            .into_iter()
            .enumerate()
            .map(|(i, id)| (id, sellers[i % sellers.len()].clone()))
            .collect();
        let create_seconds = created.elapsed().as_secs_f64();
        eprintln!(
            "search: created in {create_seconds:.1} s; waiting for the projector and the embedded index"
        );
        let target = self.last_position().await?;
        self.wait_caught_up(target).await?;
        self.wait_indexed(|| async { Ok(true) }).await?;
        let embedded_indexed_seconds = created.elapsed().as_secs_f64() - create_seconds;
        let listings = self.listing_count().await?;
        let embedded = self.search_load(args, seeded, "embedded").await?;
        self.check_alive()?;

        eprintln!("search: starting Meilisearch; the projector refills its empty index");
        let meili = MeiliServer::start(meili_server)
            .await
            .context("starting meilisearch")?;
        let env = vec![
            ("SEARCH_BACKEND", "meilisearch".to_owned()),
            ("MEILI_URL", meili.url().to_owned()),
            ("MEILI_API_KEY", meili.key().to_owned()),
            ("MEILI_INDEX", MEILI_INDEX.to_owned()),
        ];
        let reader = MeiliReader {
            url: meili.url().to_owned(),
            index: format!("{MEILI_INDEX}_v{}", projections::search::DOCUMENT_VERSION),
            key: meili.key().to_owned(),
        };
        self.meili = Some(meili);
        self.stop_services("projector").await;
        self.stop_services("query-api").await;
        let refilled = Instant::now();
        self.spawn_projector("projector-meili", &env).await?;
        let client = self.client.clone();
        self.wait_indexed(|| reader.holds(&client, listings))
            .await?;
        let meili_refill_seconds = refilled.elapsed().as_secs_f64();
        self.spawn_query_api("query-api-meili", &env).await?;
        let meili = self.search_load(args, seeded, "meilisearch").await?;
        let meili_indexing = self.indexing_lag(args, &owned, reader).await?;
        Ok(SearchRun {
            listings,
            create_seconds,
            embedded_indexed_seconds,
            meili_refill_seconds,
            embedded,
            meili,
            meili_indexing,
        })
    }

    /// The steady-state indexing lag of the Meilisearch backend: listing
    /// changes at `--index-rate` (open loop) for `--index-seconds`, each a
    /// price change of a listing not changed before in the phase, to a price
    /// no listing has. One change's lag runs from the command's answer to the
    /// first moment a read of Meilisearch (all changes awaited in one
    /// request, see [`watch_index`]) returns the document with the new price.
    async fn indexing_lag(
        &self,
        args: &Args,
        listings: &[(Uuid, Arc<str>)],
        meili: MeiliReader,
    ) -> anyhow::Result<Measured> {
        let changes = args.index_rate * (args.warmup_seconds + args.index_seconds);
        ensure!(
            changes <= listings.len() as u64,
            "the indexing phase changes each listing at most once: {changes} changes need as \
             many listings (--search-listings)"
        );
        eprintln!(
            "search (meilisearch): indexing lag at {} listing changes/s for {} s (+{} s warm-up)",
            args.index_rate, args.index_seconds, args.warmup_seconds
        );
        let awaited: Awaited = Arc::default();
        let watcher = tokio::spawn(watch_index(self.client.clone(), meili, awaited.clone()));
        let counter = Arc::new(AtomicU64::new(0));
        let (client, command_base) = (self.client.clone(), self.command_base.clone());
        let listings: Arc<[(Uuid, Arc<str>)]> = Arc::from(listings);
        let op = move |_scheduled: Instant| {
            let n = counter.fetch_add(1, Ordering::Relaxed);
            let (id, seller) = listings[n as usize % listings.len()].clone();
            let (client, command_base, awaited) =
                (client.clone(), command_base.clone(), awaited.clone());
            async move {
                // Above every search listing's price (500 to 60,499), and
                // one per change.
                let price = 1_000_000 + n as i64;
                let url = format!("{command_base}/listings/{id}/price");
                let body = json!({"price": {"amount": price, "currency": "EUR"}});
                let answer = post(&client, &url, &seller, &body).await?;
                ensure!(
                    answer.status == 200,
                    "POST {url} answered {}: {}",
                    answer.status,
                    answer.body
                );
                let committed = Instant::now();
                let (seen, visible) = tokio::sync::oneshot::channel();
                awaited
                    .lock()
                    .expect("the awaited changes")
                    .insert(id, (price, seen));
                tokio::time::timeout(INDEX_VISIBLE_TIMEOUT, visible)
                    .await
                    .with_context(|| {
                        format!("listing {id}'s new price not in Meilisearch after {INDEX_VISIBLE_TIMEOUT:?}")
                    })?
                    .context("the index watcher stopped")?;
                Ok(committed.elapsed())
            }
        };
        let measured = open_loop(
            args.index_rate,
            args.warmup_seconds,
            args.index_seconds,
            TARGET_MEILI_INDEXING_P99_MS,
            op,
        )
        .await;
        watcher.abort();
        measured
    }

    async fn listing_count(&self) -> anyhow::Result<u64> {
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM rm_listings")
            .fetch_one(&self.pool)
            .await
            .context("counting listings")?;
        Ok(count as u64)
    }

    /// Waits until no listing waits for the index (`search_pending` is
    /// empty) and `backend_done` holds.
    async fn wait_indexed<F, Fut>(&mut self, backend_done: F) -> anyhow::Result<()>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = anyhow::Result<bool>>,
    {
        let started = Instant::now();
        loop {
            let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM search_pending")
                .fetch_one(&self.pool)
                .await
                .context("counting listings not yet indexed")?;
            if pending == 0 && backend_done().await? {
                return Ok(());
            }
            ensure!(
                started.elapsed() < INDEX_TIMEOUT,
                "the search index was not filled within {INDEX_TIMEOUT:?} ({pending} pending)"
            );
            self.check_alive()?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The open-loop search load on the query API as it runs now.
    async fn search_load(
        &self,
        args: &Args,
        seeded: &Seeded,
        backend: &str,
    ) -> anyhow::Result<Measured> {
        // The second page of each word, as a client following next_cursor
        // would ask it.
        let mut cursors = Vec::with_capacity(NOUNS.len());
        for (noun, _) in NOUNS {
            let first = self
                .client
                .get(format!("{}/search", self.query_base))
                .bearer_auth(&*seeded.buyer)
                .query(&[("q", *noun), ("limit", "20")])
                .send()
                .await
                .context("asking for a first page")?;
            let first = answer(first).await?;
            ensure!(
                first.status == 200,
                "GET /search?q={noun} answered {}: {}",
                first.status,
                first.body
            );
            cursors.push(first.body["next_cursor"].as_str().map(str::to_owned));
        }
        eprintln!(
            "search ({backend}): /search at {}/s for {} s (+{} s warm-up)",
            args.search_rate, args.search_seconds, args.warmup_seconds
        );
        let counter = Arc::new(AtomicU64::new(0));
        let client = self.client.clone();
        let buyer = seeded.buyer.clone();
        let url: Arc<str> = Arc::from(format!("{}/search", self.query_base));
        let cursors = Arc::new(cursors);
        let op = move |scheduled: Instant| {
            let n = counter.fetch_add(1, Ordering::Relaxed);
            let (client, buyer, url, cursors) =
                (client.clone(), buyer.clone(), url.clone(), cursors.clone());
            async move {
                let query = SearchQuery::nth(n, &cursors);
                let response = client
                    .get(&*url)
                    .bearer_auth(&*buyer)
                    .query(&query.params)
                    .send()
                    .await
                    .context("GET /search")?;
                let seen = answer(response).await?;
                ensure!(
                    seen.status == 200,
                    "GET /search?{:?} answered {}: {}",
                    query.params,
                    seen.status,
                    seen.body
                );
                let items = seen.body["items"].as_array().map_or(0, Vec::len);
                ensure!(
                    !query.must_match || items > 0,
                    "GET /search?{:?} found nothing",
                    query.params
                );
                Ok(scheduled.elapsed())
            }
        };
        let target_ms = if backend == "embedded" {
            TARGET_SEARCH_P99_MS_EMBEDDED
        } else {
            TARGET_SEARCH_P99_MS_MEILI
        };
        open_loop(
            args.search_rate,
            args.warmup_seconds,
            args.search_seconds,
            target_ms,
            op,
        )
        .await
    }

    async fn event_count(&self) -> anyhow::Result<u64> {
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&self.pool)
            .await
            .context("counting events")?;
        Ok(count as u64)
    }

    /// The global position of the last committed event.
    async fn last_position(&self) -> anyhow::Result<(i64, i64)> {
        sqlx::query_as(
            "SELECT transaction_id::text::bigint, position FROM events
              ORDER BY transaction_id DESC, position DESC LIMIT 1",
        )
        .fetch_one(&self.pool)
        .await
        .context("reading the last position")
    }

    async fn relay_at(&self, target: (i64, i64)) -> anyhow::Result<bool> {
        sqlx::query_scalar(
            "SELECT COALESCE(bool_and((transaction_id, position) >= ($1, $2)), false)
               FROM relay_checkpoints WHERE stream = $3",
        )
        .bind(target.0)
        .bind(target.1)
        .bind(STREAM)
        .fetch_one(&self.pool)
        .await
        .context("reading the relay's checkpoint")
    }

    /// Whether the relay has published anything after `position`.
    async fn relay_past(&self, position: (i64, i64)) -> anyhow::Result<bool> {
        sqlx::query_scalar(
            "SELECT COALESCE(bool_or((transaction_id, position) > ($1, $2)), false)
               FROM relay_checkpoints WHERE stream = $3",
        )
        .bind(position.0)
        .bind(position.1)
        .bind(STREAM)
        .fetch_one(&self.pool)
        .await
        .context("reading the relay's checkpoint")
    }

    /// Whether every partition of every projection has applied everything
    /// up to `target`.
    async fn projections_at(&self, target: (i64, i64)) -> anyhow::Result<bool> {
        sqlx::query_scalar(
            "SELECT COALESCE(bool_and((caught_up_transaction, caught_up_position) >= ($1, $2)), false)
               FROM projection_checkpoints",
        )
        .bind(target.0)
        .bind(target.1)
        .fetch_one(&self.pool)
        .await
        .context("reading the projections' checkpoints")
    }

    /// Waits until the relay and every projection have reached the last
    /// event written so far (before `phase` starts); returns its position.
    async fn wait_current(&self, phase: &str) -> anyhow::Result<(i64, i64)> {
        eprintln!("{phase}: waiting until the projections are current");
        let current = self.last_position().await?;
        self.wait_caught_up(current).await?;
        Ok(current)
    }

    async fn wait_caught_up(&self, target: (i64, i64)) -> anyhow::Result<()> {
        let started = Instant::now();
        while !(self.relay_at(target).await? && self.projections_at(target).await?) {
            ensure!(
                started.elapsed() < CATCH_UP_TIMEOUT,
                "the projections did not catch up within {CATCH_UP_TIMEOUT:?}"
            );
            tokio::time::sleep(CATCH_UP_POLL).await;
        }
        Ok(())
    }
}

/// What the load runs on.
struct Seeded {
    seller: Arc<str>,
    buyer: Arc<str>,
    admin: Arc<str>,
    listings: Vec<Uuid>,
    wallets: Vec<Uuid>,
}

struct Answer {
    status: u16,
    body: Value,
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    body: &Value,
) -> anyhow::Result<Answer> {
    let response = client
        .post(url)
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    answer(response).await
}

async fn get(client: &reqwest::Client, url: &str, token: &str) -> anyhow::Result<Answer> {
    let response = client
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    answer(response).await
}

async fn answer(response: reqwest::Response) -> anyhow::Result<Answer> {
    let status = response.status().as_u16();
    let bytes = response.bytes().await.context("reading an answer")?;
    Ok(Answer {
        status,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    })
}

/// How often the indexing-lag phase asks Meilisearch for the index's last
/// finished task.
const INDEX_WATCH: Duration = Duration::from_millis(20);
/// The longest the indexing-lag phase goes without reading the awaited
/// documents back, whatever the tasks say.
const INDEX_READ_EVERY: Duration = Duration::from_millis(250);
/// Longest wait for one listing change to be visible in Meilisearch.
const INDEX_VISIBLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Listing changes not yet seen in Meilisearch: the listing, its new price,
/// and who waits for it.
type Awaited = Arc<std::sync::Mutex<HashMap<Uuid, (i64, tokio::sync::oneshot::Sender<()>)>>>;

/// Reads the run's index on the Meilisearch server: its documents and its
/// tasks.
struct MeiliReader {
    url: String,
    index: String,
    key: String,
}

impl MeiliReader {
    /// Whether the index holds at least `listings` documents and is not
    /// indexing; false while it does not exist yet.
    async fn holds(&self, client: &reqwest::Client, listings: u64) -> anyhow::Result<bool> {
        let answer = client
            .get(format!("{}/indexes/{}/stats", self.url, self.index))
            .bearer_auth(&self.key)
            .send()
            .await
            .context("asking Meilisearch for the index's stats")?;
        if !answer.status().is_success() {
            return Ok(false);
        }
        let stats: Value = answer.json().await.context("reading the index's stats")?;
        let documents = stats["numberOfDocuments"].as_u64().unwrap_or(0);
        let indexing = stats["isIndexing"].as_bool().unwrap_or(false);
        Ok(documents >= listings && !indexing)
    }

    /// The uid of the index's last finished task, if any.
    async fn last_finished_task(&self, client: &reqwest::Client) -> anyhow::Result<Option<u64>> {
        let answer = client
            .get(format!("{}/tasks", self.url))
            .bearer_auth(&self.key)
            .query(&[
                ("indexUids", self.index.as_str()),
                ("statuses", "succeeded,failed"),
                ("limit", "1"),
            ])
            .send()
            .await?;
        let tasks: Value = answer.error_for_status()?.json().await?;
        Ok(tasks["results"][0]["uid"].as_u64())
    }

    /// The `(id, price)` of the documents of `ids` the index holds.
    async fn prices(
        &self,
        client: &reqwest::Client,
        ids: &[String],
    ) -> anyhow::Result<Vec<(Uuid, i64)>> {
        let body = json!({"ids": ids, "fields": ["id", "price"], "limit": ids.len()});
        let answer = client
            .post(format!(
                "{}/indexes/{}/documents/fetch",
                self.url, self.index
            ))
            .bearer_auth(&self.key)
            .json(&body)
            .send()
            .await?;
        let documents: Value = answer.error_for_status()?.json().await?;
        Ok(documents["results"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|document| {
                let id = Uuid::parse_str(document["id"].as_str()?).ok()?;
                Some((id, document["price"].as_i64()?))
            })
            .collect())
    }
}

/// Wakes each awaited change once a read of the index returns its price;
/// runs until aborted.
///
/// A document becomes visible when the Meilisearch task that writes it
/// finishes (the index is committed before the task is marked done), so
/// the watcher asks every [`INDEX_WATCH`] for the index's last finished
/// task, a small request, and reads the awaited documents back when a new
/// one has finished, and at least every [`INDEX_READ_EVERY`]. It used to
/// read every awaited document every 20 ms, a `documents/fetch` of about
/// 1,000 ids costing 7 ms of Meilisearch's CPU (measured on 100,000
/// documents): the server it measures spent 0.40 of a core in the phase
/// with that, 0.33 with this (2026-12-07).
async fn watch_index(client: reqwest::Client, meili: MeiliReader, awaited: Awaited) {
    let mut tick = tokio::time::interval(INDEX_WATCH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_task = None;
    let mut last_read = Instant::now();
    loop {
        tick.tick().await;
        if awaited.lock().expect("the awaited changes").is_empty() {
            continue;
        }
        let task = match meili.last_finished_task(&client).await {
            Ok(task) => task,
            Err(error) => {
                eprintln!("  the index watcher's read of the tasks failed: {error:#}");
                None
            }
        };
        if task == last_task && last_read.elapsed() < INDEX_READ_EVERY {
            continue;
        }
        last_task = task;
        last_read = Instant::now();
        // Listed after the task was asked for: a change awaited meanwhile
        // whose document that task wrote is read now.
        let ids: Vec<String> = awaited
            .lock()
            .expect("the awaited changes")
            .keys()
            .map(Uuid::to_string)
            .collect();
        let documents = match meili.prices(&client, &ids).await {
            Ok(documents) => documents,
            Err(error) => {
                eprintln!("  the index watcher's read failed: {error:#}");
                continue;
            }
        };
        let mut awaited = awaited.lock().expect("the awaited changes");
        for (id, price) in documents {
            if awaited.get(&id).is_some_and(|(wanted, _)| *wanted == price)
                && let Some((_, seen)) = awaited.remove(&id)
            {
                let _ = seen.send(());
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The search phase's listings and queries.

/// Sellers the search phase's listings spread over.
const SEARCH_SELLERS: usize = 64;

/// Nouns of titles and queries (each at least 6 letters, so that one
/// letter less is a typo both backends tolerate), with their category.
const NOUNS: &[(&str, &str)] = &[
    ("jacket", "fashion"),
    ("sweater", "fashion"),
    ("handbag", "fashion"),
    ("sneakers", "fashion"),
    ("trousers", "fashion"),
    ("scarves", "fashion"),
    ("camera", "electronics"),
    ("laptop", "electronics"),
    ("speaker", "electronics"),
    ("monitor", "electronics"),
    ("headphones", "electronics"),
    ("tablet", "electronics"),
    ("bicycle", "sports"),
    ("helmet", "sports"),
    ("racket", "sports"),
    ("skateboard", "sports"),
    ("backpack", "sports"),
    ("snowboard", "sports"),
    ("teapot", "home"),
    ("armchair", "home"),
    ("mirror", "home"),
    ("blanket", "home"),
    ("lantern", "home"),
    ("cushion", "home"),
    ("guitar", "music"),
    ("violin", "music"),
    ("keyboard", "music"),
    ("amplifier", "music"),
    ("turntable", "music"),
    ("trumpet", "music"),
    ("cookbook", "books"),
    ("encyclopedia", "books"),
    ("dictionary", "books"),
    ("comics", "books"),
    ("paperback", "books"),
    ("magazine", "books"),
];
const ADJECTIVES: &[&str] = &[
    "vintage", "leather", "wooden", "compact", "classic", "handmade", "wireless", "folding",
    "antique", "modern", "electric", "portable",
];
const COLOURS: &[&str] = &["black", "white", "red", "blue", "green", "brown", "grey"];
const CONDITIONS: &[&str] = &["new", "like_new", "good", "fair", "poor"];
const CITIES: &[(&str, &str)] = &[
    ("Lyon", "FR"),
    ("Paris", "FR"),
    ("Berlin", "DE"),
    ("Madrid", "ES"),
    ("Milan", "IT"),
    ("Lisbon", "PT"),
];
const SORTS: &[&str] = &["price_asc", "price_desc", "newest"];

/// A well-spread number from `n` (splitmix64), so that consecutive
/// listings and queries differ in every field.
fn spread(n: u64) -> usize {
    let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) as usize
}

fn pick<T: Copy>(items: &[T], h: usize, salt: usize) -> T {
    items[(h / salt.max(1)) % items.len()]
}

/// The search phase's `i`th listing.
fn search_listing(i: usize) -> Value {
    let h = spread(i as u64);
    let (noun, category) = pick(NOUNS, h, 1);
    let (other, _) = pick(NOUNS, h, 37);
    let adjective = pick(ADJECTIVES, h, 1_301);
    let second = pick(ADJECTIVES, h, 15_601);
    let colour = pick(COLOURS, h, 187_213);
    let condition = pick(CONDITIONS, h, 1_310_491);
    let (city, country) = pick(CITIES, h, 6_552_457);
    let mut title = format!("{adjective} {colour} {noun}");
    title[..1].make_ascii_uppercase();
    json!({
        "title": title,
        "description": format!(
            "A {second} {noun} in {} condition, from {city}. Goes well with a {other}.",
            condition.replace('_', " ")
        ),
        "category": category,
        "condition": condition,
        "price": {"amount": 500 + (h / 39_315_743) % 60_000, "currency": "EUR"},
        "quantity": 1 + (h / 7) % 5,
        "location": {"city": city, "country": country},
    })
}

/// One `/search` request of the load.
struct SearchQuery {
    params: Vec<(&'static str, String)>,
    /// A query the data certainly matches: finding nothing is an error.
    must_match: bool,
}

impl SearchQuery {
    /// The `n`th query: in turn a word, a word with a typo, a filtered
    /// word, a sorted adjective and a second page (`cursors`: each noun's
    /// next_cursor after its first page of 20).
    fn nth(n: u64, cursors: &[Option<String>]) -> Self {
        let h = spread(n);
        let noun_index = h % NOUNS.len();
        let (noun, category) = NOUNS[noun_index];
        let (params, must_match) = match n % 5 {
            0 => (vec![("q", noun.to_owned())], true),
            1 => {
                // One letter less in the middle of the word.
                let mut typo = noun.to_owned();
                typo.remove(noun.len() / 2);
                (vec![("q", typo)], true)
            }
            2 => (
                vec![
                    ("q", noun.to_owned()),
                    ("category", category.to_owned()),
                    ("condition", pick(CONDITIONS, h, 41).to_owned()),
                    ("max_price", (5_000 + (h / 43) % 50_000).to_string()),
                ],
                false,
            ),
            3 => (
                vec![
                    ("q", pick(ADJECTIVES, h, 47).to_owned()),
                    ("sort", pick(SORTS, h, 53).to_owned()),
                ],
                true,
            ),
            _ => {
                let mut params = vec![("q", noun.to_owned()), ("limit", "20".to_owned())];
                if let Some(cursor) = &cursors[noun_index] {
                    params.push(("cursor", cursor.clone()));
                }
                (params, true)
            }
        };
        Self { params, must_match }
    }
}

// ---------------------------------------------------------------------------
// The open-loop driver.

/// What an open-loop phase measured.
#[derive(Debug, Default)]
struct Measured {
    /// Operations scheduled in the measured time.
    scheduled: u64,
    errors: u64,
    first_error: Option<String>,
    seconds: f64,
    /// Sorted latencies of the successful measured operations (from
    /// `timeline`, once the phase is over).
    latencies_us: Vec<u32>,
    /// Every measured operation, in the order they finished.
    timeline: Vec<Sample>,
}

impl Measured {
    fn per_second(&self) -> f64 {
        self.latencies_us.len() as f64 / self.seconds
    }

    fn p(&self, percent: f64) -> f64 {
        percentile_ms(&self.latencies_us, percent)
    }
}

/// Starts `op(scheduled)` at `rate` per second for the warm-up, then for
/// `seconds` measured, each at its scheduled time whether or not earlier
/// ones finished; waits for them all. `op` returns the latency to record.
/// Lists the windows with an answer of at least `slow_ms`.
async fn open_loop<F, Fut>(
    rate: u64,
    warmup_seconds: u64,
    seconds: u64,
    slow_ms: f64,
    op: F,
) -> anyhow::Result<Measured>
where
    F: Fn(Instant) -> Fut,
    Fut: Future<Output = anyhow::Result<Duration>> + Send + 'static,
{
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let warmup = rate * warmup_seconds;
    let total = warmup + rate * seconds;
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut running = tokio::task::JoinSet::new();
    let mut measured = Measured::default();
    let mut overflow = 0_u64;
    let start = Instant::now() + Duration::from_millis(10);
    let start_unix_us = (std::time::SystemTime::now() + Duration::from_millis(10))
        .duration_since(std::time::UNIX_EPOCH)
        .context("the clock is before 1970")?
        .as_micros() as u64;
    let measured_start = start + interval * warmup as u32;
    for n in 0..total {
        let scheduled = start + interval * n as u32;
        tokio::time::sleep_until(scheduled.into()).await;
        let counted = n >= warmup;
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if counted {
                overflow += 1;
            }
            continue;
        };
        let future = op(scheduled);
        let at_unix_us = start_unix_us + (scheduled - start).as_micros() as u64;
        running.spawn(async move {
            let outcome = future.await;
            drop(slot);
            (counted, at_unix_us, outcome)
        });
        // Collect what finished, so the set stays small.
        while let Some(done) = running.try_join_next() {
            record(&mut measured, done.context("a request task panicked")?);
        }
    }
    while let Some(done) = running.join_next().await {
        record(&mut measured, done.context("a request task panicked")?);
    }
    measured.scheduled = total - warmup;
    measured.seconds = (start + interval * total as u32)
        .duration_since(measured_start)
        .as_secs_f64();
    if overflow > 0 {
        measured.errors += overflow;
        measured.first_error.get_or_insert_with(|| {
            format!("{overflow} requests not sent: {MAX_IN_FLIGHT} in flight")
        });
    }
    measured.latencies_us = measured
        .timeline
        .iter()
        .filter(|sample| sample.ok)
        .map(|sample| sample.latency_us)
        .collect();
    measured.latencies_us.sort_unstable();
    print_slow_windows(&measured.timeline, slow_ms as u32);
    eprintln!(
        "  {} ok, {} errors, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        measured.latencies_us.len(),
        measured.errors,
        measured.p(50.0),
        measured.p(99.0),
        measured.p(100.0)
    );
    if let Some(error) = &measured.first_error {
        eprintln!("  first error: {error}");
    }
    Ok(measured)
}

fn record(
    measured: &mut Measured,
    (counted, at_unix_us, outcome): (bool, u64, anyhow::Result<Duration>),
) {
    if !counted {
        return;
    }
    let latency_us = match &outcome {
        Ok(latency) => latency.as_micros().min(u128::from(u32::MAX)) as u32,
        Err(_) => 0,
    };
    measured.timeline.push(Sample {
        at_unix_us,
        latency_us,
        ok: outcome.is_ok(),
    });
    if let Err(error) = outcome {
        measured.errors += 1;
        measured
            .first_error
            .get_or_insert_with(|| format!("{error:#}"));
    }
}

// ---------------------------------------------------------------------------
// The report.

#[derive(Debug)]
struct CatchUp {
    events: u64,
    write_seconds: f64,
    /// From NATS back up to the relay's first publication (with a cluster:
    /// mostly its recovery, a meta leader and a stream leader elected).
    resumed_seconds: f64,
    relay_seconds: f64,
    total_seconds: f64,
}

/// What the search phase measured.
#[derive(Debug)]
struct SearchRun {
    /// Listings in the read model (the phase's and the seeded ones).
    listings: u64,
    /// Creating the phase's listings through the command API.
    create_seconds: f64,
    /// From the last creation to the embedded index holding every listing.
    embedded_indexed_seconds: f64,
    /// From the projector's start on Meilisearch to its index holding
    /// every listing.
    meili_refill_seconds: f64,
    embedded: Measured,
    meili: Measured,
    /// Listing change → visible in Meilisearch, at `--index-rate`.
    meili_indexing: Measured,
}

#[derive(Debug, Default)]
struct Report {
    lag: Option<Measured>,
    get: Option<Measured>,
    catch_up: Option<CatchUp>,
    search: Option<SearchRun>,
}

/// One row of the table for an open-loop phase measured against a p99
/// target (met only without errors).
fn latency_row(out: &mut String, phase: &str, load: &str, m: &Measured, target_p99_ms: f64) {
    let met = m.errors == 0 && m.p(99.0) <= target_p99_ms;
    let _ = writeln!(
        out,
        "| {phase} | {load} | {:.0} | {:.2} | {:.2} | {:.2} | {} | p99 ≤ {target_p99_ms} ms | {} |",
        m.per_second(),
        m.p(50.0),
        m.p(99.0),
        m.p(100.0),
        m.errors,
        verdict(met)
    );
}

impl Report {
    fn render(&self, args: &Args) -> String {
        let mut out = String::new();
        let cluster = args.nats_cluster > 0;
        let nats = if cluster {
            format!(
                "a {}-node NATS cluster, stream replicas {}",
                args.nats_cluster, args.nats_cluster
            )
        } else {
            "one nats-server".to_owned()
        };
        let (target_lag, target_catch_up) = args.lag_and_catch_up_targets();
        let _ = writeln!(
            out,
            "\nSouk read-side benchmark: command-api + relay, projector, query-api as processes; \
             {nats}; {} cores; {} listings and {} wallets",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            args.aggregates,
            args.aggregates
        );
        let _ = writeln!(
            out,
            "| phase | load | achieved/s | p50 ms | p99 ms | max ms | errors | target | verdict |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
        if let Some(m) = &self.lag {
            let load = format!("{} cmd/s × {} s", args.rate, args.seconds);
            latency_row(&mut out, "commit → visible (?after=)", &load, m, target_lag);
        }
        if let Some(m) = &self.get {
            let load = format!(
                "{} req/s × {} s, gzip, {}",
                args.get_rate,
                args.get_seconds,
                if args.rate_limit > 0 {
                    format!("rate limit {}/s", args.rate_limit)
                } else {
                    "no rate limit".to_owned()
                }
            );
            latency_row(&mut out, "GET /listings/{id}", &load, m, TARGET_GET_P99_MS);
        }
        if let Some(s) = &self.search {
            let load = format!(
                "{} req/s × {} s, {} listings, word/typo/filter/sort/page",
                args.search_rate, args.search_seconds, s.listings
            );
            latency_row(
                &mut out,
                "GET /search, embedded",
                &load,
                &s.embedded,
                TARGET_SEARCH_P99_MS_EMBEDDED,
            );
            latency_row(
                &mut out,
                "GET /search, Meilisearch",
                &load,
                &s.meili,
                TARGET_SEARCH_P99_MS_MEILI,
            );
            let load = format!(
                "{} price changes/s × {} s, each answer → document in Meilisearch",
                args.index_rate, args.index_seconds
            );
            latency_row(
                &mut out,
                "Meilisearch indexing lag",
                &load,
                &s.meili_indexing,
                TARGET_MEILI_INDEXING_P99_MS,
            );
        }
        if let Some(c) = &self.catch_up {
            let rate = c.events as f64 / c.total_seconds;
            let _ = writeln!(
                out,
                "\nCatch-up after a NATS outage ({}): {} events committed while NATS was down ({:.1} s, {:.0} commands/s).",
                if cluster {
                    "every node killed, then all restarted"
                } else {
                    "the server killed, then restarted"
                },
                c.events,
                c.write_seconds,
                c.events as f64 / c.write_seconds
            );
            let _ = writeln!(
                out,
                "From NATS back up: relay published its first event after {:.2} s and all in {:.2} s \
                 ({:.0} events/s); every projection applied all in {:.2} s: **{:.0} events/s** \
                 (target ≥ {target_catch_up}: {}).",
                c.resumed_seconds,
                c.relay_seconds,
                c.events as f64 / c.relay_seconds,
                c.total_seconds,
                rate,
                verdict(rate >= target_catch_up)
            );
        }
        if let Some(s) = &self.search {
            let created = args.search_listings as f64;
            let refill = s.listings as f64 / s.meili_refill_seconds;
            let _ = writeln!(
                out,
                "\nSearch data: {} listings created through the command API in {:.1} s ({:.0}/s); \
                 the embedded index held them all {:.2} s after the last.",
                args.search_listings,
                s.create_seconds,
                created / s.create_seconds,
                s.embedded_indexed_seconds
            );
            let _ = writeln!(
                out,
                "Meilisearch refill of an empty index, from the projector's start (process start \
                 included): {} listings in {:.1} s: **{refill:.0} listings/s** \
                 (target ≥ {TARGET_MEILI_REFILL_PER_S}: {}).",
                s.listings,
                s.meili_refill_seconds,
                verdict(refill >= TARGET_MEILI_REFILL_PER_S)
            );
        }
        out
    }
}
