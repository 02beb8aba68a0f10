//! `replay-tool`, the real binary, as auditors and operators use it: its
//! command-line contract (exit codes 0, 1, 2, one line on stderr, `--json`),
//! history, state and export against the event store, every kind of
//! tampering caught by `verify` (chains, heads, invariants, anchors), a
//! rebuild killed and resumed while queries keep flowing, dead letters
//! retried and skipped, and stuck timers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use domain::values::{Actor, Currency, Money, Reference, Role, UserId, WalletId};
use domain::wallet::{Wallet, WalletCommand};
use event_store::record::{ChainedFields, GENESIS_HASH};
use event_store::{CommandContext, EventStore, Reply, StoreConfig};
use serde_json::{Value, json};
use sqlx::PgPool;
use tests::{TestApp, TestDb, User, run_replay_tool, spawn_app};
use uuid::Uuid;

const PARTITIONS: u32 = event_store::fanout::DEFAULT_PARTITIONS;

async fn store_on(db: &TestDb) -> (EventStore, PgPool) {
    let pool = db.pool().await;
    (EventStore::new(pool.clone(), StoreConfig::default()), pool)
}

fn context(actor: Uuid, correlation: Uuid) -> CommandContext {
    CommandContext {
        correlation_id: correlation,
        ..CommandContext::new(actor, "admin", Uuid::now_v7())
    }
}

async fn open_wallet(store: &EventStore) -> WalletId {
    let wallet_id = WalletId::new();
    let owner = UserId::new();
    store
        .execute::<Wallet>(
            &wallet_id.to_string(),
            WalletCommand::Open {
                actor: Actor::new(owner, Role::Buyer),
                wallet_id,
                currency: Currency::parse("EUR").unwrap(),
            },
            CommandContext::new(owner.as_uuid(), "buyer", Uuid::now_v7()),
            None,
            Reply::new(201, wallet_id.to_string()),
        )
        .await
        .expect("opening a wallet");
    wallet_id
}

async fn deposit(store: &EventStore, wallet: WalletId, amount: i64, context: CommandContext) {
    store
        .execute::<Wallet>(
            &wallet.to_string(),
            WalletCommand::Deposit {
                actor: Actor::new(UserId::from_uuid(context.actor_id), Role::Admin),
                amount: Money::parse_positive(amount, "EUR").unwrap(),
                reference: Reference::parse("reference", "test").unwrap(),
            },
            context,
            None,
            Reply::new(200, wallet.to_string()),
        )
        .await
        .expect("depositing");
}

/// Runs `statement` with the append-only triggers of `events` and
/// `stream_heads` off, as someone with full rights over the database could.
async fn tamper(pool: &PgPool, statement: &str) {
    let mut tx = pool.begin().await.unwrap();
    for table in ["events", "stream_heads"] {
        sqlx::query(&format!("ALTER TABLE {table} DISABLE TRIGGER USER"))
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    sqlx::query(statement).execute(&mut *tx).await.unwrap();
    for table in ["events", "stream_heads"] {
        sqlx::query(&format!("ALTER TABLE {table} ENABLE TRIGGER USER"))
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
}

/// Recomputes the hash chain and the head of one aggregate from its stored
/// rows, as a forger who rewrote its events would.
async fn rechain(pool: &PgPool, aggregate_type: &str, aggregate_id: &str) {
    type Row = (
        i64,
        String,
        String,
        String,
        String,
        Uuid,
        chrono::DateTime<chrono::Utc>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT sequence, event_type, event_version, payload::text, metadata::text, event_id, recorded_at
           FROM events WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY sequence",
    )
    .bind(aggregate_type)
    .bind(aggregate_id)
    .fetch_all(pool)
    .await
    .unwrap();
    let mut prev = GENESIS_HASH;
    for (sequence, event_type, event_version, payload, metadata, event_id, recorded_at) in rows {
        let hash = ChainedFields {
            aggregate_type,
            aggregate_id,
            sequence,
            event_type: &event_type,
            event_version: &event_version,
            event_id,
            recorded_at_micros: recorded_at.timestamp_micros(),
            payload: &payload,
            metadata: &metadata,
        }
        .hash(&prev);
        tamper(
            pool,
            &format!(
                "UPDATE events SET prev_hash = '\\x{}', hash = '\\x{}'
                  WHERE aggregate_type = '{aggregate_type}' AND aggregate_id = '{aggregate_id}'
                    AND sequence = {sequence}",
                hex(&prev),
                hex(&hash)
            ),
        )
        .await;
        tamper(
            pool,
            &format!(
                "UPDATE stream_heads SET sequence = {sequence}, hash = '\\x{}'
                  WHERE aggregate_type = '{aggregate_type}' AND aggregate_id = '{aggregate_id}'",
                hex(&hash)
            ),
        )
        .await;
        prev = hash;
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn bad_flags_ids_times_and_tokens_exit_1_with_one_line_on_stderr() {
    let db = TestDb::migrated().await;
    let unknown = Uuid::now_v7().to_string();
    let cases: Vec<Vec<&str>> = vec![
        vec![],
        vec!["verify", "--no-such-flag"],
        vec![
            "state",
            "--aggregate-type",
            "Wallet",
            "--aggregate-id",
            "not-a-uuid",
        ],
        vec![
            "state",
            "--aggregate-type",
            "Spaceship",
            "--aggregate-id",
            &unknown,
        ],
        vec!["history", "--from-time", "yesterday"],
        vec!["export", "--from-position", "zz"],
        vec!["verify", "--anchor", "souk1.nope"],
        vec!["rebuild"],
        // Well-formed, but nothing there.
        vec![
            "state",
            "--aggregate-type",
            "Wallet",
            "--aggregate-id",
            &unknown,
        ],
        vec!["history", "--correlation-id", &unknown],
        vec!["dead-letters", "skip", "999", "--reason", "gone"],
        vec!["timers", "retry", &unknown],
    ];
    for args in cases {
        let run = run_replay_tool(&db.url, &args).await;
        assert_eq!(run.code, Some(1), "{args:?}: {run:?}");
        assert_eq!(
            run.stderr.trim_end().lines().count(),
            1,
            "{args:?}: {run:?}"
        );
        assert!(run.stderr.starts_with("replay-tool: "), "{args:?}: {run:?}");
        assert!(!run.stderr.contains("panicked"), "{args:?}: {run:?}");
    }
    let unreachable =
        run_replay_tool("postgres://nobody:s3cret@127.0.0.1:1/none", &["verify"]).await;
    assert_eq!(unreachable.code, Some(1), "{unreachable:?}");
    assert_eq!(
        unreachable.stderr.trim_end().lines().count(),
        1,
        "{unreachable:?}"
    );
    // It says which server it could not reach and why, and never the password.
    assert!(
        unreachable
            .stderr
            .starts_with("replay-tool: cannot reach Postgres at 127.0.0.1:1 ("),
        "{unreachable:?}"
    );
    assert!(unreachable.stderr.contains("refused"), "{unreachable:?}");
    assert!(!unreachable.stderr.contains("s3cret"), "{unreachable:?}");
    let help = run_replay_tool(&db.url, &["--help"]).await;
    assert_eq!(help.code, Some(0));
    assert!(help.stdout.contains("dead-letters"));
}

#[tokio::test]
async fn history_state_and_export_show_the_log_as_it_was() {
    let db = TestDb::migrated().await;
    let (store, pool) = store_on(&db).await;
    let wallet = open_wallet(&store).await;
    let other = open_wallet(&store).await;
    let actor = Uuid::now_v7();
    let checkout = Uuid::now_v7();
    // (version, state after, a time after it)
    let mut states = Vec::new();
    for (index, amount) in [100, 250, 400].into_iter().enumerate() {
        let correlation = if index == 1 { checkout } else { Uuid::now_v7() };
        deposit(&store, wallet, amount, context(actor, correlation)).await;
        deposit(&store, other, 1, context(Uuid::now_v7(), Uuid::now_v7())).await;
        let (state, version) = store.load::<Wallet>(&wallet.to_string()).await.unwrap();
        states.push((
            version,
            serde_json::to_value(state).unwrap(),
            chrono::Utc::now(),
        ));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let id = wallet.to_string();
    let wallet_args = ["--aggregate-type", "Wallet", "--aggregate-id", id.as_str()];

    for (version, expected, _) in &states {
        let version = version.to_string();
        let mut args = vec!["state"];
        args.extend(wallet_args);
        args.extend(["--at-version", &version]);
        let run = run_replay_tool(&db.url, &args).await;
        assert_eq!(run.code, Some(0), "{run:?}");
        assert_eq!(run.json()["state"], *expected);
        assert_eq!(run.json()["version"].to_string(), version);
    }
    let at = states[1].2.to_rfc3339();
    let mut args = vec!["state"];
    args.extend(wallet_args);
    args.extend(["--at-time", &at]);
    let run = run_replay_tool(&db.url, &args).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.json()["state"], states[1].1, "the state as of a time");
    assert_eq!(run.json()["version"], 3);
    let mut args = vec!["state"];
    args.extend(wallet_args);
    args.extend(["--at-version", "99"]);
    let beyond = run_replay_tool(&db.url, &args).await;
    assert_eq!(beyond.code, Some(1));
    assert!(beyond.stderr.contains("has 4 events"), "{beyond:?}");

    // History: by aggregate, correlation, actor and time.
    let mut args = vec!["history"];
    args.extend(wallet_args);
    let lines = run_replay_tool(&db.url, &args).await.json_lines();
    let sequences: Vec<i64> = lines
        .iter()
        .map(|l| l["sequence"].as_i64().unwrap())
        .collect();
    assert_eq!(sequences, vec![1, 2, 3, 4]);
    assert_eq!(lines[2]["payload"]["FundsDeposited"]["amount"], 250);
    let correlated = run_replay_tool(
        &db.url,
        &["history", "--correlation-id", &checkout.to_string()],
    )
    .await
    .json_lines();
    assert_eq!(correlated.len(), 1);
    assert_eq!(
        correlated[0]["metadata"]["correlation_id"],
        checkout.to_string()
    );
    let by_actor = run_replay_tool(&db.url, &["history", "--actor-id", &actor.to_string()])
        .await
        .json_lines();
    assert_eq!(by_actor.len(), 3);
    assert!(by_actor.iter().all(|l| l["aggregate_id"] == id.as_str()));
    let (from, to) = (states[0].2.to_rfc3339(), states[1].2.to_rfc3339());
    let window = run_replay_tool(
        &db.url,
        &["history", "--from-time", &from, "--to-time", &to],
    )
    .await
    .json_lines();
    assert_eq!(window.len(), 2, "one deposit on each wallet: {window:#?}");

    // Export: the table in global order, each line's stored JSON and hash.
    let expected: Vec<(Uuid, String, Vec<u8>)> = sqlx::query_as(
        "SELECT event_id, payload::text, hash FROM events ORDER BY transaction_id, position",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let exported = run_replay_tool(&db.url, &["export"]).await;
    assert_eq!(exported.code, Some(0), "{exported:?}");
    let lines = exported.json_lines();
    assert_eq!(lines.len(), expected.len());
    for (line, (event_id, payload, hash)) in lines.iter().zip(&expected) {
        assert_eq!(line["event_id"], event_id.to_string());
        assert_eq!(
            line["payload"],
            serde_json::from_str::<Value>(payload).unwrap()
        );
        assert_eq!(line["hash"], hex(hash));
    }
    let third = lines[2]["position"].as_str().unwrap();
    let rest = run_replay_tool(&db.url, &["export", "--from-position", third])
        .await
        .json_lines();
    assert_eq!(rest.len(), expected.len() - 3);
    assert_eq!(rest[0]["event_id"], lines[3]["event_id"]);
    let upto = run_replay_tool(&db.url, &["export", "--to-position", third])
        .await
        .json_lines();
    assert_eq!(upto.len(), 3);
}

#[tokio::test]
async fn verify_names_every_kind_of_tampering_and_passes_a_clean_log() {
    let db = TestDb::migrated().await;
    let (store, pool) = store_on(&db).await;
    let mut wallets = Vec::new();
    for _ in 0..6 {
        let wallet = open_wallet(&store).await;
        for amount in [100, 200, 300] {
            deposit(
                &store,
                wallet,
                amount,
                context(Uuid::now_v7(), Uuid::now_v7()),
            )
            .await;
        }
        wallets.push(wallet.to_string());
    }
    let clean = run_replay_tool(&db.url, &["verify", "--json"]).await;
    assert_eq!(clean.code, Some(0), "{clean:?}");
    assert_eq!(clean.json()["events_checked"], 24);
    assert_eq!(clean.json()["invariants_checked"], true);
    let anchor = run_replay_tool(&db.url, &["anchor"]).await;
    assert_eq!(anchor.code, Some(0), "{anchor:?}");
    let anchor = anchor.stdout.trim().to_owned();

    let [altered, middle, end, whole, reordered, overdrawn] =
        <[String; 6]>::try_from(wallets).unwrap();
    tamper(
        &pool,
        &format!(
            "UPDATE events SET payload = replace(payload::text, '\"amount\":200', '\"amount\":2000')::json
              WHERE aggregate_id = '{altered}' AND sequence = 3"
        ),
    )
    .await;
    tamper(
        &pool,
        &format!("DELETE FROM events WHERE aggregate_id = '{middle}' AND sequence = 2"),
    )
    .await;
    tamper(
        &pool,
        &format!("DELETE FROM events WHERE aggregate_id = '{end}' AND sequence = 4"),
    )
    .await;
    tamper(
        &pool,
        &format!("DELETE FROM events WHERE aggregate_id = '{whole}'"),
    )
    .await;
    for (from, to) in [(3, 1000), (4, 3), (1000, 4)] {
        tamper(
            &pool,
            &format!("UPDATE events SET sequence = {to} WHERE aggregate_id = '{reordered}' AND sequence = {from}"),
        )
        .await;
    }
    // A well-chained event, appended the normal way, that overdraws a wallet:
    // only the invariants can object to it.
    let (prev, recorded_at): (Vec<u8>, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as("SELECT hash, now() FROM events WHERE aggregate_id = $1 AND sequence = 4")
            .bind(&overdrawn)
            .fetch_one(&pool)
            .await
            .unwrap();
    let recorded_at =
        chrono::DateTime::from_timestamp_micros(recorded_at.timestamp_micros()).unwrap();
    let payload = json!({"FundsWithdrawn": {"amount": 1000, "reference": "x", "available": -400}})
        .to_string();
    let metadata = "{}";
    let event_id = Uuid::now_v7();
    let prev: [u8; 32] = prev.as_slice().try_into().unwrap();
    let hash = ChainedFields {
        aggregate_type: "Wallet",
        aggregate_id: &overdrawn,
        sequence: 5,
        event_type: "FundsWithdrawn",
        event_version: "1",
        event_id,
        recorded_at_micros: recorded_at.timestamp_micros(),
        payload: &payload,
        metadata,
    }
    .hash(&prev);
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                             payload, metadata, recorded_at, event_id, prev_hash, hash)
         VALUES ('Wallet', $1, 5, 'FundsWithdrawn', '1', $2::json, $3::json, $4, $5, $6, $7)",
    )
    .bind(&overdrawn)
    .bind(&payload)
    .bind(metadata)
    .bind(recorded_at)
    .bind(event_id)
    .bind(prev.to_vec())
    .bind(hash.to_vec())
    .execute(&pool)
    .await
    .unwrap();

    let run = run_replay_tool(&db.url, &["verify", "--json", "--anchor", &anchor]).await;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert_eq!(run.stderr.trim_end().lines().count(), 1, "{run:?}");
    let report = run.json();
    let problems = |id: &str| -> Vec<(i64, String)> {
        report["problems"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["aggregate_id"] == id)
            .map(|p| {
                (
                    p["sequence"].as_i64().unwrap(),
                    p["kind"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let has = |id: &str, sequence: i64, kind: &str| {
        assert!(
            problems(id).contains(&(sequence, kind.to_owned())),
            "{kind} at {sequence} not found: {:?}",
            problems(id)
        )
    };
    assert_eq!(problems(&altered), vec![(3, "altered".to_owned())]);
    has(&middle, 3, "sequence_gap");
    has(&middle, 3, "broken_link");
    assert_eq!(
        problems(&end),
        vec![(4, "end_removed".to_owned())],
        "removed at the end"
    );
    assert_eq!(
        problems(&whole),
        vec![(4, "stream_removed".to_owned())],
        "a whole aggregate"
    );
    has(&reordered, 3, "broken_link");
    assert!(problems(&overdrawn).is_empty());
    let violations: Vec<&Value> = report["violations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["aggregate_id"] == overdrawn.as_str())
        .collect();
    assert_eq!(violations.len(), 1, "{violations:#?}");
    assert_eq!(violations[0]["code"], "negative_balance");
    assert_eq!(violations[0]["sequence"], 5);
    assert!(
        violations[0]["position"].is_string(),
        "the violation names its position"
    );
    // The altered amount no longer follows from the balance it recorded.
    assert!(
        report["violations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["aggregate_id"] == altered.as_str() && v["code"] == "balance_mismatch"),
        "{report:#}"
    );
    assert_eq!(report["anchor"]["matches"], false);

    // One aggregate alone.
    let alone = run_replay_tool(
        &db.url,
        &[
            "verify",
            "--json",
            "--aggregate-type",
            "Wallet",
            "--aggregate-id",
            &end,
        ],
    )
    .await;
    assert_eq!(alone.code, Some(2));
    assert_eq!(alone.json()["problems_found"], 1);
}

#[tokio::test]
async fn a_rewrite_with_recomputed_hashes_passes_everything_but_the_anchor() {
    let db = TestDb::migrated().await;
    let (store, pool) = store_on(&db).await;
    let wallet = open_wallet(&store).await;
    for amount in [100, 200, 300] {
        deposit(
            &store,
            wallet,
            amount,
            context(Uuid::now_v7(), Uuid::now_v7()),
        )
        .await;
    }
    let anchor = run_replay_tool(&db.url, &["anchor"])
        .await
        .stdout
        .trim()
        .to_owned();
    assert_eq!(
        run_replay_tool(&db.url, &["verify", "--anchor", &anchor])
            .await
            .code,
        Some(0)
    );

    // The 200 deposit becomes 2,000, every later balance follows, and the
    // chain and head are recomputed: the log is consistent again.
    let id = wallet.to_string();
    for (sequence, payload) in [
        (
            3,
            json!({"FundsDeposited": {"amount": 2000, "reference": "test", "available": 2100}}),
        ),
        (
            4,
            json!({"FundsDeposited": {"amount": 300, "reference": "test", "available": 2400}}),
        ),
    ] {
        tamper(
            &pool,
            &format!(
                "UPDATE events SET payload = '{payload}'::json WHERE aggregate_id = '{id}' AND sequence = {sequence}"
            ),
        )
        .await;
    }
    rechain(&pool, "Wallet", &id).await;

    let without = run_replay_tool(&db.url, &["verify", "--json"]).await;
    assert_eq!(
        without.code,
        Some(0),
        "chains, heads and invariants agree: {without:?}"
    );
    let with = run_replay_tool(&db.url, &["verify", "--json", "--anchor", &anchor]).await;
    assert_eq!(with.code, Some(2), "{with:?}");
    assert_eq!(with.json()["anchor"]["matches"], false);
    assert!(with.stderr.contains("anchor does not match"), "{with:?}");
}

/// A projector on the stream of `app`, in this process, until dropped.
struct Projector(
    Option<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<anyhow::Result<()>>,
    )>,
);

impl Projector {
    async fn start(app: &TestApp) -> Self {
        let mut config = projections::ProjectorConfig::new(&app.db.url, &app.stream);
        config.nats_url = app.nats_url.clone();
        config.search = projections::search::SearchConfig::off();
        config.partitions = PARTITIONS;
        let projector = projections::build(config)
            .await
            .expect("building the projector");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(projector.run_until(async move {
            let _ = stopped.await;
        }));
        Self(Some((stop, running)))
    }

    async fn stop(mut self) {
        if let Some((stop, running)) = self.0.take() {
            let _ = stop.send(());
            let _ = running.await;
        }
    }
}

impl Drop for Projector {
    fn drop(&mut self) {
        if let Some((_, running)) = self.0.take() {
            running.abort();
        }
    }
}

/// Waits until every partition of every projection has caught up with the
/// last event.
async fn wait_caught_up(pool: &PgPool) {
    let started = Instant::now();
    loop {
        let last: Option<(i64, i64)> = sqlx::query_as(
            "SELECT transaction_id::text::bigint, position FROM events
              ORDER BY transaction_id DESC, position DESC LIMIT 1",
        )
        .fetch_optional(pool)
        .await
        .unwrap();
        let (transaction_id, position) = last.unwrap_or((0, 0));
        let (rows, behind): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE (caught_up_transaction, caught_up_position) < ($1, $2))
               FROM projection_checkpoints",
        )
        .bind(transaction_id)
        .bind(position)
        .fetch_one(pool)
        .await
        .unwrap();
        if rows == (projections::PROJECTIONS.len() as u32 * PARTITIONS) as i64 && behind == 0 {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the projections did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Rows of the table `left` not in `right`, plus the other way round.
async fn difference(pool: &PgPool, left: &str, right: &str) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT (SELECT count(*) FROM (SELECT * FROM {left} EXCEPT ALL SELECT * FROM {right}) a)
              + (SELECT count(*) FROM (SELECT * FROM {right} EXCEPT ALL SELECT * FROM {left}) b)"
    ))
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_rebuild_resumes_and_equals_a_clean_one_while_queries_never_fail() {
    let app = spawn_app().await;
    let projector = Projector::start(&app).await;
    let pool = app.db.pool().await;
    let seller = User::new("seller");
    let payout = app.funded_wallet(&seller, "EUR", 0).await;
    let mut listings = Vec::new();
    for _ in 0..12 {
        listings.push(app.listing(&seller, 1_500, 5, Some(payout)).await);
    }
    let buyer = User::new("buyer");
    let wallet = app.funded_wallet(&buyer, "EUR", 1_000_000).await;
    let admin = User::new("admin");
    for _ in 0..40 {
        let deposited = app
            .post(
                &format!("/wallets/{wallet}/deposits"),
                Some(&admin),
                &json!({"amount": {"amount": 100, "currency": "EUR"}, "reference": "top-up"}),
            )
            .await;
        assert_eq!(deposited.status, 200);
    }
    for listing in listings.iter().take(6) {
        let placed = app
            .post(
                "/orders",
                Some(&buyer),
                &json!({
                    "lines": [{"listing_id": listing, "quantity": 1}],
                    "shipping_address": {"name": "Ana", "line1": "3 rue", "city": "Lyon", "postal_code": "69002", "country": "FR"},
                    "payment_method": "wallet_escrow",
                    "wallet_id": wallet,
                }),
            )
            .await;
        assert_eq!(placed.status, 201, "{:?}", placed.body);
    }
    wait_caught_up(&pool).await;

    // Readers hammer the query API for the whole test.
    let query = crate::query_api::spawn_query_api_with(&app.db, |_| {}).await;
    let query = Arc::new(query);
    let stop = Arc::new(AtomicBool::new(false));
    let (served, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut readers = Vec::new();
    for reader in 0..3 {
        let (query, stop, served, failed) =
            (query.clone(), stop.clone(), served.clone(), failed.clone());
        let (buyer, seller) = (buyer.clone(), seller.clone());
        readers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let (path, user) = match reader {
                    0 => (
                        format!("/listings?seller_id={}&limit=50", seller.id),
                        &buyer,
                    ),
                    1 => (format!("/wallets/{wallet}"), &buyer),
                    _ => ("/orders?role=buyer&limit=50".to_owned(), &buyer),
                };
                let answer = query.get(&path, Some(user)).await;
                let empty = match reader {
                    1 => answer.body["available"].is_null(),
                    _ => answer.body["items"].as_array().is_none_or(Vec::is_empty),
                };
                if answer.status != 200 || empty {
                    failed.fetch_add(1, Ordering::Relaxed);
                    if failures.len() < 5 {
                        failures.push((path, answer.status, answer.body));
                    }
                } else {
                    served.fetch_add(1, Ordering::Relaxed);
                }
            }
            failures
        }));
    }

    // Snapshot the live tables, then start a slow rebuild and kill it mid-way.
    let mut live_tables = Vec::new();
    for projection in projections::PROJECTIONS {
        for table in projections::tables(projection).unwrap() {
            sqlx::query(&format!(
                "CREATE TABLE before_{table} AS SELECT * FROM public.{table}"
            ))
            .execute(&pool)
            .await
            .unwrap();
            live_tables.push(*table);
        }
    }
    let binary = tests::replay_tool().to_path_buf();
    let mut child = std::process::Command::new(&binary)
        .args(["rebuild", "--all", "--batch-events", "3"])
        .env("DATABASE_URL", &app.db.url)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starting replay-tool rebuild");
    let started = Instant::now();
    loop {
        let read: Option<i64> =
            sqlx::query_scalar("SELECT min(events_read) FROM projection_rebuilds")
                .fetch_one(&pool)
                .await
                .unwrap();
        if read.is_some_and(|read| read > 30) {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the rebuild ended before it could be killed"
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the rebuild made no progress"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    child.kill().expect("killing the rebuild");
    let _ = child.wait();

    for table in &live_tables {
        assert_eq!(
            difference(
                &pool,
                &format!("public.{table}"),
                &format!("public.before_{table}")
            )
            .await,
            0,
            "{table} changed before the swap"
        );
    }
    let status = run_replay_tool(&app.db.url, &["status", "--json"]).await;
    assert_eq!(status.code, Some(0), "{status:?}");
    let rebuilds = status.json()["rebuilds"].as_array().unwrap().clone();
    assert_eq!(rebuilds.len(), 4, "{rebuilds:#?}");
    assert!(
        rebuilds
            .iter()
            .all(|r| r["running"] == false && r["events_read"].as_i64().unwrap() > 0)
    );
    assert!(status.json()["partitions"].as_array().unwrap().len() >= 4);

    // Run again: it resumes and swaps in.
    let resumed = run_replay_tool(&app.db.url, &["rebuild", "--all", "--batch-events", "50"]).await;
    assert_eq!(resumed.code, Some(0), "{resumed:?}");
    let reports = resumed.json();
    assert_eq!(reports.as_array().unwrap().len(), 4);
    assert!(
        reports
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["resumed"] == true && r["swapped"] == true),
        "{reports:#}"
    );
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM projection_rebuilds")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 0);

    // The resumed rebuild equals a clean one, row for row.
    wait_caught_up(&pool).await;
    for projection in projections::PROJECTIONS {
        let schema = format!("clean_{projection}");
        projections::rebuild_into(&pool, projection, &schema, PARTITIONS)
            .await
            .unwrap();
        for table in projections::tables(projection).unwrap() {
            let (live, clean) = (format!("public.{table}"), format!("{schema}.{table}"));
            assert_eq!(difference(&pool, &live, &clean).await, 0, "{table}");
        }
    }
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        let failures = reader.await.unwrap();
        assert!(
            failures.is_empty(),
            "queries failed during the rebuild: {failures:#?}"
        );
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    assert!(served.load(Ordering::Relaxed) > 10, "the readers ran");
    projector.stop().await;
}

async fn wait_for_letters(pool: &PgPool, count: i64) {
    let started = Instant::now();
    loop {
        let parked: i64 =
            sqlx::query_scalar("SELECT count(*) FROM dead_letters WHERE projection = 'wallets'")
                .fetch_one(pool)
                .await
                .unwrap();
        if parked >= count {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{parked} of {count} letters parked"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_retried_after_a_fix_and_skipped_where_verify_sees_it() {
    let app = spawn_app().await;
    let projector = Projector::start(&app).await;
    let pool = app.db.pool().await;
    let admin = User::new("admin");
    let owners = [User::new("buyer"), User::new("buyer"), User::new("buyer")];
    let mut wallets = Vec::new();
    for owner in &owners {
        wallets.push(app.funded_wallet(owner, "EUR", 0).await);
    }
    wait_caught_up(&pool).await;
    // A read model that refuses some rows: what a projector bug or a bad
    // migration looks like from the outside.
    sqlx::query(
        "ALTER TABLE rm_wallet_entries ADD CONSTRAINT no_poison CHECK (reference NOT LIKE 'poison%')",
    )
    .execute(&pool)
    .await
    .unwrap();
    for (wallet, reference) in wallets.iter().zip(["poison-a", "poison-b", "poison-c"]) {
        let deposited = app
            .post(
                &format!("/wallets/{wallet}/deposits"),
                Some(&admin),
                &json!({"amount": {"amount": 700, "currency": "EUR"}, "reference": reference}),
            )
            .await;
        assert_eq!(deposited.status, 200);
    }
    wait_for_letters(&pool, 3).await;

    let listed = run_replay_tool(
        &app.db.url,
        &["dead-letters", "list", "--projection", "wallets", "--json"],
    )
    .await;
    assert_eq!(listed.code, Some(0), "{listed:?}");
    let letters = listed.json_lines();
    assert_eq!(letters.len(), 3);
    let id_of = |wallet: Uuid| -> String {
        letters
            .iter()
            .find(|l| l["aggregate_id"] == wallet.to_string())
            .map(|l| {
                assert!(l["position"].is_string());
                assert!(
                    l["error"].as_str().unwrap().contains("Postgres refused"),
                    "{l}"
                );
                l["id"].to_string()
            })
            .unwrap()
    };
    let (a, b) = (id_of(wallets[0]), id_of(wallets[1]));

    let too_early = run_replay_tool(&app.db.url, &["dead-letters", "retry", &a, "--json"]).await;
    assert_eq!(
        too_early.code,
        Some(1),
        "refused again before the fix: {too_early:?}"
    );
    assert_eq!(too_early.json_lines()[0]["outcome"], "refused");

    sqlx::query("ALTER TABLE rm_wallet_entries DROP CONSTRAINT no_poison")
        .execute(&pool)
        .await
        .unwrap();
    let retried = run_replay_tool(&app.db.url, &["dead-letters", "retry", &a, "--json"]).await;
    assert_eq!(retried.code, Some(0), "{retried:?}");
    let available: i64 =
        sqlx::query_scalar("SELECT available FROM rm_wallets WHERE wallet_id = $1")
            .bind(wallets[0])
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(available, 700, "the retried deposit is in the read model");

    let skipped = run_replay_tool(
        &app.db.url,
        &[
            "dead-letters",
            "skip",
            &b,
            "--reason",
            "a duplicate webhook",
        ],
    )
    .await;
    assert_eq!(skipped.code, Some(0), "{skipped:?}");
    let actions: Vec<(String, String, String, Option<String>)> = sqlx::query_as(
        "SELECT action, outcome, operator, reason FROM dead_letter_actions ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        actions
            .iter()
            .map(|a| (a.0.as_str(), a.1.as_str()))
            .collect::<Vec<_>>(),
        vec![
            ("retried", "refused"),
            ("retried", "applied"),
            ("skipped", "skipped")
        ]
    );
    assert!(actions.iter().all(|a| a.2 == "test-operator"));

    let verified = run_replay_tool(&app.db.url, &["verify", "--json"]).await;
    assert_eq!(verified.code, Some(0), "{verified:?}");
    let skips = verified.json()["skipped_events"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(skips.len(), 1);
    assert_eq!(skips[0]["aggregate_id"], wallets[1].to_string());
    assert_eq!(skips[0]["operator"], "test-operator");
    assert_eq!(skips[0]["reason"], "a duplicate webhook");

    // The third letter is not carried forward blindly: the rebuild, with
    // the fix, applies it.
    let rebuilt = run_replay_tool(&app.db.url, &["rebuild", "--projection", "wallets"]).await;
    assert_eq!(rebuilt.code, Some(0), "{rebuilt:?}");
    let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(parked, 0);
    let available: i64 =
        sqlx::query_scalar("SELECT available FROM rm_wallets WHERE wallet_id = $1")
            .bind(wallets[2])
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(available, 700);
    projector.stop().await;
}

#[tokio::test]
async fn a_stuck_timer_is_listed_and_fires_once_retried() {
    let app = spawn_app().await;
    let pool = app.db.pool().await;
    let seller = User::new("seller");
    let listing = app.listing(&seller, 900, 2, None).await;
    let buyer = User::new("buyer");
    let reserved = app
        .post(
            &format!("/listings/{listing}/reservations"),
            Some(&buyer),
            &json!({"quantity": 1, "ttl_seconds": 1}),
        )
        .await;
    assert_eq!(reserved.status, 201, "{:?}", reserved.body);
    // The worker gave up on it (as after twenty failures).
    let timer: Uuid = sqlx::query_scalar(
        "UPDATE timers SET attempts = 20, last_error = 'database unavailable'
          WHERE kind = 'hold_expiry' RETURNING timer_id",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let stuck = run_replay_tool(&app.db.url, &["timers", "list", "--stuck", "--json"]).await;
    assert_eq!(stuck.code, Some(0), "{stuck:?}");
    let lines = stuck.json_lines();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["timer_id"], timer.to_string());
    assert_eq!(lines[0]["kind"], "hold_expiry");

    let expired = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM events WHERE aggregate_id = $1 AND event_type = 'HoldExpired'",
        )
        .bind(listing.to_string())
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        expired().await,
        0,
        "a timer the worker gave up on does not fire"
    );

    let retried = run_replay_tool(&app.db.url, &["timers", "retry", &timer.to_string()]).await;
    assert_eq!(retried.code, Some(0), "{retried:?}");
    let started = Instant::now();
    while expired().await == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the retried timer never fired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let left = run_replay_tool(&app.db.url, &["timers", "list", "--json"]).await;
    assert!(left.json_lines().is_empty(), "{left:?}");
}

/// Runs `replay-tool args...` with its stdout on a terminal (a pseudo-terminal
/// that `script` from util-linux opens), as a person at a shell runs it.
/// `script` copies what the terminal shows (stdout and stderr, with `\r\n`
/// line ends) to its own stdout.
async fn run_replay_tool_on_a_terminal(database_url: &str, args: &[&str]) -> tests::ToolRun {
    let mut command_line = tests::replay_tool().display().to_string();
    for arg in args {
        command_line.push(' ');
        command_line.push_str(arg);
    }
    let database_url = database_url.to_owned();
    tokio::task::spawn_blocking(move || {
        let output = std::process::Command::new("script")
            .args([
                "--quiet",
                "--return",
                "--command",
                &command_line,
                "/dev/null",
            ])
            .env("DATABASE_URL", database_url)
            .env("SOUK_OPERATOR", "test-operator")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("running replay-tool under script(1)");
        tests::ToolRun {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).replace("\r\n", "\n"),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    })
    .await
    .expect("the replay-tool runner")
}

#[tokio::test]
async fn history_on_a_terminal_is_a_table_with_one_row_per_event() {
    let db = TestDb::migrated().await;
    let (store, _pool) = store_on(&db).await;
    let wallet = open_wallet(&store).await;
    let (actor, correlation) = (Uuid::now_v7(), Uuid::now_v7());
    deposit(&store, wallet, 100, context(actor, correlation)).await;
    deposit(&store, wallet, 250, context(actor, Uuid::now_v7())).await;
    let wallet = wallet.to_string();
    let args = [
        "history",
        "--aggregate-type",
        "Wallet",
        "--aggregate-id",
        &wallet,
    ];

    let shown = run_replay_tool_on_a_terminal(&db.url, &args).await;

    assert_eq!(shown.code, Some(0), "{shown:?}");
    let lines: Vec<&str> = shown.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "a header and three events: {shown:?}");
    for column in [
        "recorded at",
        "aggregate",
        "seq",
        "event",
        "actor",
        "correlation",
    ] {
        assert!(lines[0].contains(column), "{:?}", lines[0]);
    }
    let events: Vec<(&str, &str)> = lines[1..]
        .iter()
        .map(|line| {
            let cells: Vec<&str> = line.split_whitespace().collect();
            // recorded at (date, time), aggregate (type, id), seq, event, ...
            assert_eq!(&cells[2..4], ["Wallet", wallet.as_str()], "{line}");
            (cells[4], cells[5])
        })
        .collect();
    assert_eq!(
        events,
        [
            ("1", "WalletOpened"),
            ("2", "FundsDeposited"),
            ("3", "FundsDeposited")
        ]
    );
    assert!(lines[2].contains(&format!("admin {actor}")), "{}", lines[2]);
    assert!(lines[2].ends_with(&correlation.to_string()), "{}", lines[2]);
    assert!(
        !shown.stdout.contains('{'),
        "no JSON on a terminal: {shown:?}"
    );

    // `--json` is JSON lines even on a terminal, and a pipe gets them too.
    let json = run_replay_tool_on_a_terminal(&db.url, &[&args[..], &["--json"]].concat()).await;
    assert_eq!(json.code, Some(0), "{json:?}");
    assert_eq!(json.json_lines().len(), 3);
    let piped = run_replay_tool(&db.url, &args).await;
    assert_eq!(piped.json_lines().len(), 3);
}

/// The one outcome of a `dead-letters retry --json` that applied nothing:
/// exit 1, one line on stderr saying so, the outcome `expected`.
fn not_applied(run: &tests::ToolRun, expected: &str) -> Value {
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(
        run.stderr.trim_end(),
        "replay-tool: 1 of 1 parked events were not applied (see above)"
    );
    let outcomes = run.json_lines();
    assert_eq!(outcomes.len(), 1, "{run:?}");
    assert_eq!(outcomes[0]["outcome"], expected, "{run:?}");
    outcomes[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_event_that_cannot_be_retried_exits_1_says_why_and_stays_parked() {
    let app = spawn_app().await;
    let projector = Projector::start(&app).await;
    let pool = app.db.pool().await;
    let admin = User::new("admin");
    let owner = User::new("buyer");
    let wallet = app.funded_wallet(&owner, "EUR", 0).await;
    wait_caught_up(&pool).await;
    sqlx::query(
        "ALTER TABLE rm_wallet_entries ADD CONSTRAINT no_poison CHECK (reference NOT LIKE 'poison%')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let (on, by) = (&app, &admin);
    let deposit = move |amount: i64, reference: &'static str| async move {
        let body = json!({"amount": {"amount": amount, "currency": "EUR"}, "reference": reference});
        let answer = on
            .post(&format!("/wallets/{wallet}/deposits"), Some(by), &body)
            .await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
    };
    deposit(700, "poison-1").await;
    wait_for_letters(&pool, 1).await;
    let letter: i64 = sqlx::query_scalar("SELECT id FROM dead_letters")
        .fetch_one(&pool)
        .await
        .unwrap();
    let letter = letter.to_string();
    let parked = || async {
        sqlx::query_as::<_, (i64, Option<i32>)>("SELECT count(*), max(attempts) FROM dead_letters")
            .fetch_one(&pool)
            .await
            .unwrap()
    };

    // Refused: the read model still refuses the row.
    let refused = run_replay_tool(&app.db.url, &["dead-letters", "retry", &letter]).await;
    let outcome = not_applied(&refused, "refused");
    assert!(
        outcome["detail"].as_str().unwrap().contains("no_poison"),
        "the new error: {outcome}"
    );
    assert_eq!(
        parked().await,
        (1, Some(1)),
        "still parked, one attempt more"
    );

    // Blocked: a later event of the wallet reached the read model since,
    // and applying the parked one now would put it out of order.
    sqlx::query("ALTER TABLE rm_wallet_entries DROP CONSTRAINT no_poison")
        .execute(&pool)
        .await
        .unwrap();
    deposit(50, "fine").await;
    wait_caught_up(&pool).await;
    let blocked = run_replay_tool(&app.db.url, &["dead-letters", "retry", "--all"]).await;
    let outcome = not_applied(&blocked, "blocked");
    let detail = outcome["detail"].as_str().unwrap();
    assert!(
        detail.contains("1 later event(s)")
            && detail.contains("replay-tool rebuild --projection wallets"),
        "{detail}"
    );
    assert_eq!(parked().await, (1, Some(1)), "not tried, still parked");
    let entries: Vec<String> = sqlx::query_scalar(
        "SELECT reference FROM rm_wallet_entries WHERE reference IN ('poison-1', 'fine')",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(entries, ["fine"], "the parked entry is still missing");

    // On a terminal the outcome is a table row, and the message the same.
    let shown =
        run_replay_tool_on_a_terminal(&app.db.url, &["dead-letters", "retry", &letter]).await;
    assert_eq!(shown.code, Some(1), "{shown:?}");
    let row = shown
        .stdout
        .lines()
        .find(|line| line.starts_with(&letter))
        .unwrap_or_else(|| panic!("no row for the letter: {shown:?}"));
    assert!(row.contains("wallets") && row.contains("blocked"), "{row}");
    assert!(
        shown
            .stdout
            .contains("replay-tool: 1 of 1 parked events were not applied (see above)"),
        "{shown:?}"
    );

    // Unknown: one line, exit 1.
    let unknown = run_replay_tool(&app.db.url, &["dead-letters", "retry", "999999"]).await;
    assert_eq!(unknown.code, Some(1), "{unknown:?}");
    assert_eq!(
        unknown.stderr.trim_end(),
        "replay-tool: no dead letter 999999"
    );
    projector.stop().await;
}
