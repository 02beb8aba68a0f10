//! Shared helpers of Souk's end-to-end tests and benchmark: a throwaway
//! database per test ([`TestDb`]), a command API on port 0 ([`spawn_app`])
//! whose relay publishes to a JetStream stream of its own (deleted with the
//! app), dev tokens, a small HTTP client, and NATS helpers ([`nats`]).
//!
//! Everything runs against the real Postgres named by `SOUK_TEST_ADMIN_URL`
//! (default `postgres://postgres@127.0.0.1:5432/postgres`). Each test's
//! database is dropped when its guard is dropped, even when the test fails.

use std::path::PathBuf;
use std::sync::OnceLock;

use serde_json::Value;
use sqlx::postgres::PgPool;
use uuid::Uuid;

pub mod bench_kit;
pub mod meili;
pub mod nats;
pub mod pg_cluster;
pub mod projector;

/// The maintenance database tests create their databases from.
pub fn admin_url() -> String {
    std::env::var("SOUK_TEST_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// Replaces the database name of a Postgres URL.
pub fn with_database(url: &str, database: &str) -> String {
    let (without_query, query) = match url.find('?') {
        Some(at) => (&url[..at], &url[at..]),
        None => (url, ""),
    };
    let authority_start = without_query.find("://").map_or(0, |at| at + 3);
    match without_query[authority_start..].find('/') {
        Some(slash) => format!(
            "{}/{database}{query}",
            &without_query[..authority_start + slash]
        ),
        None => format!("{without_query}/{database}{query}"),
    }
}

/// A database of its own for one test, dropped with the guard.
#[derive(Debug)]
pub struct TestDb {
    pub name: String,
    pub url: String,
    admin_url: String,
}

impl TestDb {
    /// Creates an empty database (no migrations).
    pub async fn empty() -> Self {
        Self::empty_on(&admin_url()).await
    }

    /// Creates an empty database on the server of `admin_url`.
    pub async fn empty_on(admin_url: &str) -> Self {
        let name = format!("souk_test_{}", Uuid::new_v4().simple());
        let admin = PgPool::connect(admin_url)
            .await
            .expect("connecting to the admin database");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .expect("creating the test database");
        admin.close().await;
        Self {
            url: with_database(admin_url, &name),
            name,
            admin_url: admin_url.to_owned(),
        }
    }

    /// Creates a database with Souk's migrations applied.
    pub async fn migrated() -> Self {
        let db = Self::empty().await;
        let pool = db.pool().await;
        event_store::migrate(&pool)
            .await
            .expect("migrating the test database");
        pool.close().await;
        db
    }

    pub async fn pool(&self) -> PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(16)
            .connect(&self.url)
            .await
            .expect("connecting to the test database")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if drop_databases_blocking(&self.admin_url, std::slice::from_ref(&self.name)).is_err() {
            eprintln!("could not drop test database {}", self.name);
        }
    }
}

/// Drops the databases `names` through `admin_url`, from synchronous code
/// that may run inside a runtime (a `Drop`): the async work runs on a thread
/// with a runtime of its own, and this waits for it.
pub fn drop_databases_blocking(admin_url: &str, names: &[String]) -> anyhow::Result<()> {
    let admin_url = admin_url.to_owned();
    let names = names.to_vec();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let admin = PgPool::connect(&admin_url).await?;
            for name in &names {
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&admin)
                    .await?;
            }
            admin.close().await;
            Ok(())
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the thread dropping databases panicked"))?
}

/// The dev key pair shared by every test of this process.
#[derive(Debug)]
pub struct Keys {
    pub private_pem: Vec<u8>,
    pub public_path: PathBuf,
    pub private_path: PathBuf,
}

pub fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("souk-test-keys-{}", std::process::id()));
        let private_path = dir.join("jwt-private.pem");
        let public_path = dir.join("jwt-public.pem");
        identity::ensure_dev_key_pair(&private_path, &public_path).expect("generating test keys");
        Keys {
            private_pem: std::fs::read(&private_path).expect("reading the test private key"),
            public_path,
            private_path,
        }
    })
}

/// A signed-in test user.
#[derive(Debug, Clone)]
pub struct User {
    pub id: Uuid,
    pub role: &'static str,
    pub token: String,
}

impl User {
    pub fn new(role: &'static str) -> Self {
        let id = Uuid::now_v7();
        let token = identity::mint_token(
            &keys().private_pem,
            id,
            role,
            chrono::Duration::hours(1),
            None,
            None,
        )
        .expect("minting a test token");
        Self { id, role, token }
    }
}

/// A command API serving a database of its own, on a free port.
pub struct TestApp {
    pub address: String,
    pub port: u16,
    pub db: TestDb,
    pub client: reqwest::Client,
    pub store: event_store::EventStore,
    /// The JetStream stream the app's relay publishes to.
    pub stream: String,
    /// The NATS server of that stream.
    pub nats_url: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl std::fmt::Debug for TestApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestApp")
            .field("address", &self.address)
            .finish()
    }
}

/// An HTTP answer: status and JSON body (`Value::Null` when not JSON).
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
    pub headers: reqwest::header::HeaderMap,
}

impl Answer {
    /// The error code of an error body.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    pub fn id(&self) -> Uuid {
        self.body["id"]
            .as_str()
            .and_then(|id| Uuid::parse_str(id).ok())
            .unwrap_or_else(|| panic!("no id in {} {}", self.status, self.body))
    }
}

/// Sends the services' logs to the test output when `SOUK_TEST_LOG` holds a
/// filter (e.g. `SOUK_TEST_LOG=warn cargo test ... -- --nocapture`).
pub fn init_test_logs() {
    if let Ok(filter) = std::env::var("SOUK_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

/// Starts a command API on a fresh, migrated database.
pub async fn spawn_app() -> TestApp {
    let db = TestDb::empty().await;
    spawn_app_on(db, |_| {}).await
}

/// Starts a command API on `db`, after `adjust` has tuned its configuration.
pub async fn spawn_app_on(db: TestDb, adjust: impl FnOnce(&mut command_api::Config)) -> TestApp {
    init_test_logs();
    let mut config = command_api::Config::for_tests(&db.url, keys().public_path.clone());
    adjust(&mut config);
    let (stream, nats_url) = (config.stream.clone(), config.nats_url.clone());
    let app = command_api::build(config)
        .await
        .expect("building the command API");
    let port = app.port();
    let store = app.state().store.clone();
    let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async move {
        let _ = stopped.await;
    }));
    TestApp {
        address: format!("http://127.0.0.1:{port}"),
        port,
        db,
        client: reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .build()
            .expect("building the HTTP client"),
        store,
        stream,
        nats_url,
        shutdown: Some(shutdown),
        server: Some(server),
    }
}

impl TestApp {
    /// POSTs `body` (JSON) to `path` as `user`.
    pub async fn post(&self, path: &str, user: Option<&User>, body: &Value) -> Answer {
        self.post_raw(path, user, Some(body.to_string().into_bytes()), &[])
            .await
    }

    /// POSTs raw bytes with extra headers.
    pub async fn post_raw(
        &self,
        path: &str,
        user: Option<&User>,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut request = self.client.post(format!("{}{path}", self.address));
        if let Some(user) = user {
            request = request.bearer_auth(&user.token);
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("sending a request");
        answer(response).await
    }

    pub async fn get(&self, path: &str) -> Answer {
        let response = self
            .client
            .get(format!("{}{path}", self.address))
            .send()
            .await
            .expect("sending a request");
        answer(response).await
    }

    /// Stops the server and waits for it.
    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
    }

    /// Opens a wallet for `owner` and deposits `amount` (as an admin).
    pub async fn funded_wallet(&self, owner: &User, currency: &str, amount: i64) -> Uuid {
        let opened = self
            .post(
                "/wallets",
                Some(owner),
                &serde_json::json!({"currency": currency}),
            )
            .await;
        assert_eq!(opened.status, 201, "{:?}", opened.body);
        let wallet = opened.id();
        if amount > 0 {
            let admin = User::new("admin");
            let deposited = self
                .post(
                    &format!("/wallets/{wallet}/deposits"),
                    Some(&admin),
                    &serde_json::json!({"amount": {"amount": amount, "currency": currency}, "reference": "test top-up"}),
                )
                .await;
            assert_eq!(deposited.status, 200, "{:?}", deposited.body);
        }
        wallet
    }

    /// Creates a listing of `seller` with `quantity` in stock at `price` EUR cents.
    pub async fn listing(
        &self,
        seller: &User,
        price: i64,
        quantity: u32,
        payout_wallet: Option<Uuid>,
    ) -> Uuid {
        let mut body = serde_json::json!({
            "title": "Vintage lamp",
            "description": "Brass, works.",
            "category": "home",
            "condition": "good",
            "price": {"amount": price, "currency": "EUR"},
            "quantity": quantity,
            "location": {"city": "Lyon", "country": "FR"},
        });
        if let Some(wallet) = payout_wallet {
            body["payout_wallet_id"] = Value::String(wallet.to_string());
        }
        let created = self.post("/listings", Some(seller), &body).await;
        assert_eq!(created.status, 201, "{:?}", created.body);
        created.id()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(server) = self.server.take() {
            server.abort();
        }
        // The relay is gone with the server task (or never polled again: a
        // test's runtime runs nothing while this drop blocks it). Deleted
        // even without one: a test may run a relay or a projector of its own
        // on the app's stream (none there is fine).
        nats::delete_stream_blocking(&self.nats_url, &self.stream);
    }
}

async fn answer(response: reqwest::Response) -> Answer {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.unwrap_or_default();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Answer {
        status,
        body,
        headers,
    }
}

/// A directory of a test's own under the system's temporary directory,
/// removed when dropped.
#[derive(Debug)]
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    pub fn new(label: &str) -> Self {
        let path = std::env::temp_dir().join(format!("souk-{label}-{}", Uuid::now_v7().simple()));
        std::fs::create_dir_all(&path).expect("creating a temporary directory");
        Self(path)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The `replay-tool` binary of this build, built once per test process,
/// for tests of its command-line contract.
pub fn replay_tool() -> &'static std::path::Path {
    workspace_binary("replay-tool")
}

/// The `projector` binary of this build, built once per test process, for
/// tests that run, kill and restart real projector processes.
pub fn projector_binary() -> &'static std::path::Path {
    workspace_binary("projector")
}

/// The workspace's binary `bin`, built once per test process with
/// [`cargo_build_bins`].
fn workspace_binary(bin: &'static str) -> &'static std::path::Path {
    static BINARIES: std::sync::Mutex<Vec<(&'static str, &'static std::path::Path)>> =
        std::sync::Mutex::new(Vec::new());
    let mut built = BINARIES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, path)) = built.iter().find(|(name, _)| *name == bin) {
        return path;
    }
    let status = cargo_build_bins(&[bin])
        .status()
        .unwrap_or_else(|error| panic!("running cargo build --bin {bin}: {error}"));
    assert!(status.success(), "cargo build --bin {bin} failed: {status}");
    // This test executable is target/<profile>/deps/e2e-<hash>.
    let exe = std::env::current_exe().expect("locating the test executable");
    let dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("the test executable's profile directory");
    let binary = dir.join(bin);
    assert!(binary.is_file(), "{} is missing", binary.display());
    let binary: &'static std::path::Path = Box::leak(binary.into_boxed_path());
    built.push((bin, binary));
    binary
}

/// `cargo build --workspace --bin <each of bins>` in this build's profile,
/// for tests and benchmarks that run the workspace's binaries.
///
/// `--workspace`, not `-p <a package>`: Cargo unifies dependency features
/// over the packages a command selects, so a build of one package resolves
/// other features than `cargo test --workspace` did (sqlx, futures) and
/// compiles a second copy of most of the dependency tree, minutes of a CI
/// run. Selected like the test run, a binary is built from what that run
/// compiled: its `main` and a link.
pub fn cargo_build_bins(bins: &[&str]) -> std::process::Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = std::process::Command::new(cargo);
    build.args(["build", "--quiet", "--workspace"]);
    for bin in bins {
        build.args(["--bin", bin]);
    }
    if !cfg!(debug_assertions) {
        build.arg("--release");
    }
    build.current_dir(env!("CARGO_MANIFEST_DIR"));
    // Cargo gives a process it runs its package's variables; passed on,
    // they would look like a changed environment to build scripts that
    // watch them (ring's), and every build would start over.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy().into_owned();
        if (name.starts_with("CARGO_") && name != "CARGO_HOME" && name != "CARGO_TARGET_DIR")
            || name == "OUT_DIR"
        {
            build.env_remove(name);
        }
    }
    build
}

/// What one run of `replay-tool` printed and how it exited.
#[derive(Debug, Clone)]
pub struct ToolRun {
    /// The exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl ToolRun {
    /// The stdout's JSON lines.
    pub fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
            .collect()
    }

    /// The stdout as one JSON document.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|_| {
            panic!(
                "stdout is not JSON: {}\nstderr: {}",
                self.stdout, self.stderr
            )
        })
    }
}

/// Runs `replay-tool args...` on the database `database_url` (stdout a
/// pipe, so machine output) and waits for it, without blocking the runtime.
pub async fn run_replay_tool(database_url: &str, args: &[&str]) -> ToolRun {
    let binary = replay_tool().to_path_buf();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let database_url = database_url.to_owned();
    tokio::task::spawn_blocking(move || {
        let output = std::process::Command::new(binary)
            .args(&args)
            .env("DATABASE_URL", database_url)
            .env("SOUK_OPERATOR", "test-operator")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("running replay-tool");
        ToolRun {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    })
    .await
    .expect("the replay-tool runner")
}

/// Asserts that every projection's read model in `pool`'s database is row
/// for row what a rebuild from the event store gives (each rebuilt into a
/// schema of its own, compared both ways), that every event was counted as
/// applied exactly once, and that nothing is parked. The live projectors
/// must have caught up with every committed event first.
pub async fn assert_read_models_exact(pool: &PgPool, partitions: u32) {
    for projection in projections::PROJECTIONS {
        let schema = format!("check_{projection}");
        let report = projections::rebuild_into(pool, projection, &schema, partitions)
            .await
            .expect("rebuilding into a schema of its own");
        for table in projections::tables(projection).expect("a projection's tables") {
            for (left, right) in [("public", schema.as_str()), (schema.as_str(), "public")] {
                let differing: i64 = sqlx::query_scalar(&format!(
                    "SELECT count(*) FROM (SELECT * FROM {left}.{table} EXCEPT ALL SELECT * FROM {right}.{table}) d"
                ))
                .fetch_one(pool)
                .await
                .expect("comparing a read model with its rebuild");
                assert_eq!(
                    differing, 0,
                    "{left}.{table} has rows {right}.{table} has not"
                );
            }
        }
        let applied: i64 = sqlx::query_scalar(
            "SELECT coalesce(sum(events_applied), 0)::bigint FROM projection_checkpoints WHERE projection = $1",
        )
        .bind(projection)
        .fetch_one(pool)
        .await
        .expect("reading the checkpoints");
        assert_eq!(
            applied as u64, report.events_applied,
            "{projection}: every event counted as applied exactly once"
        );
    }
    let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(pool)
        .await
        .expect("counting parked events");
    assert_eq!(parked, 0, "nothing is parked");
}

/// Whether every partition of every projection (`partitions` each) has
/// caught up with every event committed so far.
pub async fn projections_caught_up(pool: &PgPool, partitions: u32) -> bool {
    let caught_up: Option<bool> = sqlx::query_scalar(
        "WITH last AS (SELECT transaction_id::text::bigint AS t, position AS p FROM events
                        ORDER BY transaction_id DESC, position DESC LIMIT 1)
         SELECT count(*) = $1 AND bool_and((caught_up_transaction, caught_up_position) >= (last.t, last.p))
           FROM projection_checkpoints, last
          GROUP BY ()",
    )
    .bind(i64::from(partitions) * projections::PROJECTIONS.len() as i64)
    .fetch_optional(pool)
    .await
    .unwrap_or(None);
    caught_up.unwrap_or(false)
}
