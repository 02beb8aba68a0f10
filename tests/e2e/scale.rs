//! Souk past one machine, against real Postgres and real NATS: `NATS_URL`
//! takes a cluster's server list and fails over between them; the stream's
//! replica count (`SOUK_STREAM_REPLICAS`) is set at creation and a mismatch
//! with an existing stream is reported on `/health`; services started while
//! Postgres and NATS are down wait for them, say so, then work.

use std::future::Future;
use std::time::{Duration, Instant};

use event_store::relay::{Relay, RelayConfig};
use futures::StreamExt;
use serde_json::{Value, json};
use sqlx::Connection;
use tests::nats::{NatsCluster, NatsServer, TestStream, connect, nats_url, wait_for_messages};
use tests::pg_cluster::PgCluster;
use tests::projector::ProjectorProcess;
use tests::{
    TestApp, TestDb, User, assert_read_models_exact, keys, projections_caught_up, spawn_app,
    spawn_app_on,
};

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

/// A command or query API on a database URL of the test's choosing (a
/// private server, a standby), served in this process until stopped.
struct Service {
    address: String,
    /// The JetStream stream of the service.
    stream: String,
    stop: tokio::sync::oneshot::Sender<()>,
    running: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Service {
    /// A command API (with its relay) on `database_url`.
    async fn commands(database_url: &str, adjust: impl FnOnce(&mut command_api::Config)) -> Self {
        let mut config = command_api::Config::for_tests(database_url, keys().public_path.clone());
        adjust(&mut config);
        let stream = config.stream.clone();
        let app = command_api::build(config)
            .await
            .expect("building the command API");
        let port = app.port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(app.run_until(async move {
            let _ = stopped.await;
        }));
        Self {
            address: format!("http://127.0.0.1:{port}"),
            stream,
            stop,
            running,
        }
    }

    /// A query API (search off) on `database_url` and `stream`.
    async fn reads(
        database_url: &str,
        stream: &str,
        adjust: impl FnOnce(&mut query_api::Config),
    ) -> Self {
        let mut config = query_api::Config::for_tests(database_url, keys().public_path.clone());
        config.stream = stream.to_owned();
        config.search = projections::search::SearchConfig::off();
        adjust(&mut config);
        let app = query_api::build(config)
            .await
            .expect("building the query API");
        let port = app.port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(app.run_until(async move {
            let _ = stopped.await;
        }));
        Self {
            address: format!("http://127.0.0.1:{port}"),
            stream: stream.to_owned(),
            stop,
            running,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.running.await;
    }
}

/// A loopback port nothing listens on (bound, then released).
fn unused_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("finding a free port")
        .port()
}

#[tokio::test]
async fn a_comma_separated_nats_url_fails_over_to_the_server_that_answers() {
    let dead = format!("nats://127.0.0.1:{}", unused_port());
    let servers = format!("{dead}, {}", nats_url());
    let app = spawn_app_on(TestDb::empty().await, |config| {
        config.nats_url = servers.clone();
    })
    .await;
    let opened = app
        .post(
            "/wallets",
            Some(&User::new("buyer")),
            &json!({"currency": "EUR"}),
        )
        .await;
    assert_eq!(opened.status, 201, "{:?}", opened.body);
    let messages = wait_for_messages(&nats_url(), &app.stream, 1, WAIT)
        .await
        .expect("the relay published through the server that answers");
    assert_eq!(messages[0].event().aggregate_id, opened.id().to_string());
}

#[tokio::test]
async fn a_stream_with_another_replica_count_is_reported_on_health() {
    let stream = TestStream::new(&nats_url());
    let js = async_nats::jetstream::new(connect(&nats_url()).await.unwrap());
    let db = TestDb::migrated().await;
    let database = event_store::binding::database_id(&db.pool().await)
        .await
        .unwrap();
    let created = event_store::relay::ensure_stream(&js, &stream.name, 1, database)
        .await
        .expect("creating a one-replica stream");
    assert_eq!(created.cached_info().config.num_replicas, 1);
    assert!(event_store::relay::replicas_mismatch(&created, 1).is_none());
    let name = stream.name.clone();
    let app = spawn_app_on(db, |config| {
        config.stream = name;
        config.stream_replicas = 3;
    })
    .await;
    eventually("/health reports the replica mismatch", || async {
        let health = app.get("/health").await;
        health.status == 200 && health.body["relay"]["stream_replicas"]["actual"] == 1
    })
    .await;
    let health = app.get("/health").await;
    let mismatch = &health.body["relay"]["stream_replicas"];
    assert_eq!(mismatch["configured"], 3, "{}", health.body);
    assert!(
        mismatch["message"]
            .as_str()
            .is_some_and(|message| message.contains("SOUK_STREAM_REPLICAS is 3")),
        "{}",
        health.body
    );
    // The stream is not changed behind the operator's back, and events flow.
    let opened = app
        .post(
            "/wallets",
            Some(&User::new("buyer")),
            &json!({"currency": "EUR"}),
        )
        .await;
    assert_eq!(opened.status, 201, "{:?}", opened.body);
    wait_for_messages(&nats_url(), &stream.name, 1, WAIT)
        .await
        .expect("events still reach the stream");
    let info = js
        .get_stream(&stream.name)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .num_replicas;
    assert_eq!(info, 1);
}

#[tokio::test]
async fn a_bad_nats_url_is_refused_at_start_with_a_clear_message() {
    let db = TestDb::empty().await;
    let mut config = command_api::Config::for_tests(&db.url, tests::keys().public_path.clone());
    config.nats_url = "nats://127.0.0.1:4222,nats://user:secret@host:port".to_owned();
    let error = command_api::build(config).await.expect_err("refused");
    let message = format!("{error:#}");
    assert!(message.contains("server number 2"), "{message}");
    assert!(!message.contains("secret"), "{message}");
}

#[tokio::test]
async fn services_started_while_postgres_and_nats_are_down_wait_for_them_then_work() {
    let pg = PgCluster::start().expect("starting a private PostgreSQL");
    pg.stop().expect("stopping it");
    let mut nats = NatsServer::reserve().expect("reserving a NATS port");
    let database_url = pg.admin_url();

    let commands = Service::commands(&database_url, |config| config.nats_url = nats.url()).await;
    let stream = commands.stream.clone();
    let reads = Service::reads(&database_url, &stream, |config| {
        config.nats_url = nats.url()
    })
    .await;
    let (commands_at, reads_at) = (commands.address.clone(), reads.address.clone());

    let mut projector = ProjectorProcess::start(&database_url, &nats.url(), &stream, &[])
        .expect("starting a projector");

    let client = reqwest::Client::new();
    let health = |address: String| {
        let client = client.clone();
        async move {
            let response = client.get(format!("{address}/health")).send().await.ok()?;
            let status = response.status().as_u16();
            Some((
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            ))
        }
    };
    eventually("every service says it is not ready", || async {
        let projector_health = projector.health().await;
        matches!(health(commands_at.clone()).await, Some((503, body)) if body["database"] == "down" && body["migrations"] == "pending")
            && matches!(health(reads_at.clone()).await, Some((503, body)) if body["database"] == "down")
            && matches!(projector_health, Some((503, body)) if body["database"] == "down")
    })
    .await;
    assert!(projector.alive(), "{}", projector.log());

    pg.start_again().expect("starting PostgreSQL");
    eventually("the command API is ready once Postgres answers", || async {
        matches!(health(commands_at.clone()).await, Some((200, body)) if body["migrations"] == "applied")
    })
    .await;
    eventually("the projector waits for NATS", || async {
        matches!(projector.health().await, Some((503, body)) if body["database"] == "up" && body["nats"] == "unreachable")
    })
    .await;
    assert!(projector.alive(), "{}", projector.log());
    // `/health` shows NATS unreachable until the first connection, so the
    // line is logged after that, once an attempt has failed.
    eventually("the projector logs that it waits for NATS", || async {
        projector
            .log()
            .contains("NATS is unreachable; the projector waits for it")
    })
    .await;
    assert!(projector.alive(), "{}", projector.log());

    nats.start_again().expect("starting nats-server");
    eventually("the projector is ready once NATS answers", || async {
        matches!(projector.health().await, Some((200, body)) if body["partitions"] == "running")
    })
    .await;

    // The work happens: a command is accepted, published, projected, read.
    let owner = User::new("buyer");
    let opened = client
        .post(format!("{commands_at}/wallets"))
        .bearer_auth(&owner.token)
        .json(&json!({"currency": "EUR"}))
        .send()
        .await
        .expect("opening a wallet");
    assert_eq!(opened.status().as_u16(), 201);
    let opened: Value = opened.json().await.unwrap();
    let (wallet, position) = (
        opened["id"].as_str().unwrap().to_owned(),
        opened["position"].as_str().unwrap().to_owned(),
    );
    let read = client
        .get(format!("{reads_at}/wallets/{wallet}?after={position}"))
        .bearer_auth(&owner.token)
        .send()
        .await
        .expect("reading the wallet");
    assert_eq!(read.status().as_u16(), 200);
    let read: Value = read.json().await.unwrap();
    assert_eq!(read["id"], wallet.as_str());
    assert_eq!(read["available"], 0);
    assert!(projector.alive(), "{}", projector.log());
    commands.stop().await;
    reads.stop().await;
}

/// Opens a wallet for each of `owners` and deposits 1,000 in it, a few at
/// a time.
async fn fund_wallets(app: &TestApp, owners: &[User]) {
    futures::stream::iter(owners)
        .for_each_concurrent(8, |owner| async move {
            app.funded_wallet(owner, "EUR", 1_000).await;
        })
        .await;
}

/// A projector configuration on `app`'s database and stream, search off.
fn projector_config(app: &TestApp, partitions: u32) -> projections::ProjectorConfig {
    let mut config = projections::ProjectorConfig::new(&app.db.url, &app.stream);
    config.nats_url = app.nats_url.clone();
    config.partitions = partitions;
    config.search = projections::search::SearchConfig::off();
    config
}

#[tokio::test]
async fn a_changed_partition_count_is_refused_by_projectors_and_relays() {
    let app = spawn_app_on(TestDb::migrated().await, |config| config.relay = false).await;
    // The first projector binds the stream to its partition count.
    projections::build(projector_config(&app, 2))
        .await
        .expect("the first projector binds two partitions");
    let error = projections::build(projector_config(&app, 4))
        .await
        .expect_err("another count is refused");
    let message = format!("{error:#}");
    assert!(
        message.contains("SOUK_PARTITIONS is 4")
            && message.contains("partitioned into 2")
            && message.contains("Changing SOUK_PARTITIONS"),
        "{message}"
    );
    projections::build(projector_config(&app, 2))
        .await
        .expect("the bound count is still accepted");

    // A relay with another count publishes nothing and says why.
    let mut config = RelayConfig::new(app.nats_url.clone(), &app.stream);
    config.partitions = 4;
    let (refused, published) = run_relay_until_refused(app.db.pool().await, config).await;
    assert!(
        refused.contains("SOUK_PARTITIONS is 4") && refused.contains("partitioned into 2"),
        "{refused}"
    );
    assert_eq!(published, 0);
}

/// Runs a relay until it refuses its stream; returns the refusal and what
/// it had published by then.
async fn run_relay_until_refused(pool: sqlx::PgPool, config: RelayConfig) -> (String, u64) {
    let relay = Relay::new(pool, config);
    let mut status = relay.status();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(relay.run_until(async move {
        let _ = stopped.await;
    }));
    let refused = tokio::time::timeout(WAIT, status.wait_for(|status| status.refused.is_some()))
        .await
        .expect("the relay refuses within the wait")
        .expect("the relay's status")
        .clone();
    let _ = stop.send(());
    let _ = running.await;
    (
        refused
            .refused
            .map(|error| error.to_string())
            .unwrap_or_default(),
        refused.published,
    )
}

#[tokio::test]
async fn a_stream_fed_by_another_database_is_refused() {
    let first = spawn_app().await;
    let opened = first
        .post(
            "/wallets",
            Some(&User::new("buyer")),
            &json!({"currency": "EUR"}),
        )
        .await;
    assert_eq!(opened.status, 201, "{:?}", opened.body);
    wait_for_messages(&first.nats_url, &first.stream, 1, WAIT)
        .await
        .expect("the first database's relay publishes");

    // Another database pointed at the same stream: its projector does not
    // start, its relay publishes nothing, both say why.
    let second = spawn_app_on(TestDb::migrated().await, |config| config.relay = false).await;
    let mut config = projector_config(&second, 2);
    config.stream = first.stream.clone();
    let error = projections::build(config)
        .await
        .expect_err("a projector of another database is refused");
    assert!(
        format!("{error:#}").contains("belongs to database"),
        "{error:#}"
    );
    let second_events = second
        .post(
            "/wallets",
            Some(&User::new("buyer")),
            &json!({"currency": "EUR"}),
        )
        .await;
    assert_eq!(second_events.status, 201);
    let (refused, published) = run_relay_until_refused(
        second.db.pool().await,
        RelayConfig::new(first.nats_url.clone(), &first.stream),
    )
    .await;
    assert!(refused.contains("belongs to database"), "{refused}");
    assert_eq!(published, 0);
    let stored = tests::nats::stream_messages(&first.nats_url, &first.stream)
        .await
        .unwrap();
    assert_eq!(
        stored.len(),
        1,
        "only the first database's event is on the stream"
    );
}

#[tokio::test]
async fn two_projector_processes_share_the_work_and_one_takes_over_when_the_other_is_killed() {
    const PARTITIONS: u32 = 4;
    let app = spawn_app_on(TestDb::empty().await, |config| {
        config.partitions = PARTITIONS
    })
    .await;
    let env = [
        ("SOUK_PARTITIONS", "4"),
        ("SOUK_PROJECTOR_STANDBY_RETRY_MS", "300"),
    ];
    let mut first = ProjectorProcess::start(&app.db.url, &app.nats_url, &app.stream, &env)
        .expect("starting the first projector");
    eventually("the first projector holds every partition", || async {
        matches!(held(&first).await, Some((held, total)) if held == total && total > 0)
    })
    .await;
    let second = ProjectorProcess::start(&app.db.url, &app.nats_url, &app.stream, &env)
        .expect("starting the second projector");
    // Each holds half of each projection's partitions: the first gives back
    // what the second takes.
    let total = held(&first).await.expect("the first projector's health").1;
    eventually(
        "the two projectors hold half the partitions each",
        || async {
            let (first, second) = (held(&first).await, held(&second).await);
            first == Some((total / 2, total)) && second == Some((total / 2, total))
        },
    )
    .await;
    let shares = sqlx::query_scalar::<_, i64>(
        "SELECT count(DISTINCT pid) FROM pg_locks
          WHERE locktype = 'advisory' AND objsubid = 2
            AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_one(&app.db.pool().await)
    .await
    .unwrap();
    assert_eq!(
        shares, 2,
        "each process holds its member locks on one connection"
    );

    let owners: Vec<User> = (0..24).map(|_| User::new("buyer")).collect();
    fund_wallets(&app, &owners[..12]).await;
    first.kill();
    eventually("the survivor takes over every partition", || async {
        held(&second).await == Some((total, total))
    })
    .await;
    fund_wallets(&app, &owners[12..]).await;

    let pool = app.db.pool().await;
    eventually("the survivor catches up with every event", || {
        projections_caught_up(&pool, PARTITIONS)
    })
    .await;
    assert!(
        second.log().contains("partition consuming"),
        "the second projector took partitions over: {}",
        second.log()
    );
    assert_read_models_exact(&pool, PARTITIONS).await;
    let wallets: i64 = sqlx::query_scalar("SELECT count(*) FROM rm_wallets WHERE available = 1000")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(wallets, 24);
}

/// The partitions a projector process holds and how many there are, from
/// its `/health` (while it answers ready).
async fn held(projector: &ProjectorProcess) -> Option<(u64, u64)> {
    match projector.health().await {
        Some((200, body)) => Some((
            body["partitions_held"].as_u64()?,
            body["partitions_total"].as_u64()?,
        )),
        _ => None,
    }
}

#[tokio::test]
async fn a_three_node_nats_cluster_loses_a_node_under_load_and_nothing_is_lost() {
    const PARTITIONS: u32 = 2;
    let mut cluster = NatsCluster::start(3).expect("starting a three-node NATS cluster");
    let urls = cluster.urls();
    let app = spawn_app_on(TestDb::empty().await, |config| {
        config.nats_url = urls.clone();
        config.stream_replicas = 3;
        config.partitions = PARTITIONS;
    })
    .await;
    let projector = ProjectorProcess::start(
        &app.db.url,
        &urls,
        &app.stream,
        &[("SOUK_STREAM_REPLICAS", "3"), ("SOUK_PARTITIONS", "2")],
    )
    .expect("starting a projector");
    eventually("the projector is ready on the cluster", || async {
        matches!(projector.health().await, Some((200, _)))
    })
    .await;

    let owners: Vec<User> = (0..30).map(|_| User::new("buyer")).collect();
    fund_wallets(&app, &owners[..10]).await;
    // A node dies while commands keep coming, then comes back.
    let (_, killed) = tokio::join!(fund_wallets(&app, &owners[10..20]), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        cluster.stop(0)
    });
    killed.expect("killing a node");
    cluster.start_again(0).expect("restarting the node");
    fund_wallets(&app, &owners[20..]).await;

    let pool = app.db.pool().await;
    eventually("the projector catches up with every event", || {
        projections_caught_up(&pool, PARTITIONS)
    })
    .await;
    assert_read_models_exact(&pool, PARTITIONS).await;
    let funded: i64 = sqlx::query_scalar("SELECT count(*) FROM rm_wallets WHERE available = 1000")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(funded, 30);
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    let js = async_nats::jetstream::new(connect(&urls).await.unwrap());
    let info = js
        .get_stream(&app.stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(info.config.num_replicas, 3);
    assert_eq!(
        info.state.messages, events as u64,
        "each event once on the stream"
    );
}

#[tokio::test]
async fn the_query_api_serves_from_a_hot_standby_and_after_waits_for_its_replay() {
    let primary = PgCluster::start().expect("starting a primary");
    // The relay creates its stream on the shared NATS server: deleted when
    // the test ends (declared first, so dropped after the services).
    let stream = TestStream::new(&nats_url());
    let commands = Service::commands(&primary.admin_url(), |config| {
        config.stream = stream.name.clone()
    })
    .await;
    let client = reqwest::Client::new();
    eventually("the primary is migrated", || async {
        let health = client
            .get(format!("{}/health", commands.address))
            .send()
            .await;
        health.is_ok_and(|health| health.status() == 200)
    })
    .await;
    let standby = PgCluster::standby_of(&primary).expect("starting a streaming standby");
    let mut config = projections::ProjectorConfig::new(primary.admin_url(), &commands.stream);
    config.nats_url = nats_url();
    config.search = projections::search::SearchConfig::off();
    let projector = projections::build(config)
        .await
        .expect("building a projector");
    let (stop_projector, projector_stopped) = tokio::sync::oneshot::channel::<()>();
    let projector = tokio::spawn(projector.run_until(async move {
        let _ = projector_stopped.await;
    }));
    // The query API on the standby: it must neither migrate nor write.
    let reads = Service::reads(&standby.admin_url(), &commands.stream, |config| {
        config.nats_url = nats_url();
        config.catch_up_timeout_ms = 1_000;
    })
    .await;
    let health = client
        .get(format!("{}/health", reads.address))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);

    let owner = User::new("buyer");
    let opened: Value = client
        .post(format!("{}/wallets", commands.address))
        .bearer_auth(&owner.token)
        .json(&json!({"currency": "EUR"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let wallet = opened["id"].as_str().expect("a wallet id").to_owned();
    let read = |position: String| {
        let (client, reads, wallet, token) = (
            client.clone(),
            reads.address.clone(),
            wallet.clone(),
            owner.token.clone(),
        );
        async move {
            let response = client
                .get(format!("{reads}/wallets/{wallet}?after={position}"))
                .bearer_auth(token)
                .send()
                .await
                .expect("reading the wallet");
            let status = response.status().as_u16();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let (status, body) = read(opened["position"].as_str().unwrap().to_owned()).await;
    assert_eq!((status, &body["available"]), (200, &json!(0)), "{body}");

    // The standby stops replaying: a write on the primary is projected
    // there, but a read after it waits on the standby and answers 503.
    let mut standby_admin = sqlx::PgConnection::connect(&standby.admin_url())
        .await
        .unwrap();
    sqlx::query("SELECT pg_wal_replay_pause()")
        .execute(&mut standby_admin)
        .await
        .unwrap();
    let admin = User::new("admin");
    let deposited: Value = client
        .post(format!("{}/wallets/{wallet}/deposits", commands.address))
        .bearer_auth(&admin.token)
        .json(&json!({"amount": {"amount": 500, "currency": "EUR"}, "reference": "standby"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let position = deposited["position"]
        .as_str()
        .expect("a position")
        .to_owned();
    let primary_pool = sqlx::PgPool::connect(&primary.admin_url()).await.unwrap();
    eventually("the primary's read model has the deposit", || async {
        sqlx::query_scalar::<_, i64>("SELECT available FROM rm_wallets WHERE wallet_id = $1::uuid")
            .bind(&wallet)
            .fetch_optional(&primary_pool)
            .await
            .ok()
            .flatten()
            == Some(500)
    })
    .await;
    let (status, body) = read(position.clone()).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("not_caught_up")),
        "{body}"
    );

    // Replay resumes: the same read answers with the deposit.
    sqlx::query("SELECT pg_wal_replay_resume()")
        .execute(&mut standby_admin)
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    let answered = loop {
        let (status, body) = read(position.clone()).await;
        if status == 200 || Instant::now() > deadline {
            break (status, body);
        }
    };
    assert_eq!(answered.0, 200, "{}", answered.1);
    assert_eq!(answered.1["available"], 500, "{}", answered.1);

    // An event writer still runs on the primary. The standby sees none of
    // its locks, yet its horizon stays at or below the writer's id, so a
    // reader of the global order on the standby (a resumed notification
    // stream) cannot pass an event that may still commit before the others.
    let mut writer = primary_pool.begin().await.unwrap();
    let writer_id: i64 = sqlx::query_scalar(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                             payload, metadata, prev_hash, hash)
         VALUES ('Wallet', gen_random_uuid()::text, 1, 'Probe', '1', '{}', '{}',
                 '\\x00'::bytea, '\\x00'::bytea)
         RETURNING transaction_id::text::bigint",
    )
    .fetch_one(&mut *writer)
    .await
    .unwrap();
    // A committed statement flushes the WAL up to it, the writer's insert
    // included, and the standby is waited for until it has replayed it.
    for statement in [
        "CREATE TABLE souk_wal_probe (x int)",
        "DROP TABLE souk_wal_probe",
    ] {
        sqlx::query(statement).execute(&primary_pool).await.unwrap();
    }
    let flushed: String = sqlx::query_scalar("SELECT pg_current_wal_flush_lsn()::text")
        .fetch_one(&primary_pool)
        .await
        .unwrap();
    let standby_pool = sqlx::PgPool::connect(&standby.admin_url()).await.unwrap();
    eventually("the standby replays the writer's insert", || async {
        sqlx::query_scalar::<_, bool>("SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn")
            .bind(&flushed)
            .fetch_one(&standby_pool)
            .await
            .unwrap_or(false)
    })
    .await;
    let horizon = event_store::global::horizon(&standby_pool).await.unwrap();
    assert!(
        horizon.below <= writer_id as u64 && horizon.writer_running,
        "the standby's horizon {horizon:?} passes the running writer {writer_id}"
    );
    writer.rollback().await.unwrap();

    reads.stop().await;
    commands.stop().await;
    let _ = stop_projector.send(());
    let _ = projector.await;
}
