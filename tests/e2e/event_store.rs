//! The event store's guarantees, against real Postgres: the global order
//! never skips a late commit and waits only for event writers, events are
//! append-only, the hash chain catches
//! tampering, snapshots hold the same state as a full replay, and two
//! processes writing one aggregate never lose an update.

use std::time::{Duration, Instant};

use domain::Decide;
use domain::values::{Actor, Currency, Money, Reference, Role, UserId, WalletId};
use domain::wallet::{Wallet, WalletCommand};
use event_store::global::read_after;
use event_store::store::StreamRef;
use event_store::verify::{ProblemKind, verify_chains};
use event_store::{CommandContext, EventStore, Position, Reply, StoreConfig};
use sqlx::postgres::PgPool;
use tests::TestDb;
use uuid::Uuid;

fn context() -> CommandContext {
    CommandContext::new(Uuid::now_v7(), "admin", Uuid::now_v7())
}

fn admin() -> Actor {
    Actor::new(UserId::new(), Role::Admin)
}

async fn store_on(db: &TestDb) -> (EventStore, PgPool) {
    let pool = db.pool().await;
    (EventStore::new(pool.clone(), StoreConfig::default()), pool)
}

/// Opens a EUR wallet owned by a new buyer.
async fn open_wallet(store: &EventStore) -> WalletId {
    let wallet_id = WalletId::new();
    let owner = Actor::new(UserId::new(), Role::Buyer);
    store
        .execute::<Wallet>(
            &wallet_id.to_string(),
            WalletCommand::Open {
                actor: owner,
                wallet_id,
                currency: Currency::parse("EUR").unwrap(),
            },
            context(),
            None,
            Reply::new(201, wallet_id.to_string()),
        )
        .await
        .expect("opening a wallet");
    wallet_id
}

async fn deposit(store: &EventStore, wallet_id: WalletId, amount: i64) -> Position {
    let accepted = store
        .execute::<Wallet>(
            &wallet_id.to_string(),
            WalletCommand::Deposit {
                actor: admin(),
                amount: Money::parse_positive(amount, "EUR").unwrap(),
                reference: Reference::parse("reference", "test").unwrap(),
            },
            context(),
            None,
            Reply::new(200, wallet_id.to_string()),
        )
        .await
        .expect("depositing");
    accepted.position().expect("a position token")
}

#[tokio::test]
async fn the_global_order_never_skips_a_transaction_that_commits_late() {
    let db = TestDb::migrated().await;
    let (store, pool) = store_on(&db).await;

    // A writer takes its position first and commits last.
    let mut late = pool.begin().await.unwrap();
    let late_position: i64 = sqlx::query_scalar(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                             payload, metadata, prev_hash, hash)
         VALUES ('Probe', 'late', 1, 'Probed', '1', '{}', '{}', '\\x00', '\\x00')
         RETURNING position",
    )
    .fetch_one(&mut *late)
    .await
    .unwrap();

    // Later writers commit while it is still open.
    let wallet = open_wallet(&store).await;
    let early_commit = deposit(&store, wallet, 500).await;
    assert!(
        early_commit.position > late_position,
        "the later writer took a larger position"
    );

    // A reader must not pass the open transaction: it sees none of the
    // events committed after the late writer began.
    let seen = read_after(&pool, Position::START, 100).await.unwrap();
    assert!(
        seen.iter()
            .all(|event| event.position.position < late_position),
        "read {} events past a transaction that is still open",
        seen.len()
    );

    late.commit().await.unwrap();

    // Once it commits, all three are read, the late one first.
    let deadline = Instant::now() + Duration::from_secs(20);
    let events = loop {
        let events = read_after(&pool, Position::START, 100).await.unwrap();
        if events.len() == 3 || Instant::now() > deadline {
            break events;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let order: Vec<(String, i64)> = events
        .iter()
        .map(|event| (event.aggregate_type.clone(), event.sequence))
        .collect();
    assert_eq!(
        order,
        vec![
            ("Probe".to_owned(), 1),
            ("Wallet".to_owned(), 1),
            ("Wallet".to_owned(), 2)
        ]
    );
    assert!(
        events
            .windows(2)
            .all(|pair| pair[0].position < pair[1].position),
        "positions in the global order only grow"
    );
    // Reading on from the last position finds nothing more.
    let last = events.last().unwrap().position;
    assert!(read_after(&pool, last, 100).await.unwrap().is_empty());
}

#[tokio::test]
async fn the_global_order_waits_only_for_transactions_that_write_events() {
    let db = TestDb::migrated().await;
    let (store, pool) = store_on(&db).await;

    // A long transaction that writes, but no events: it has a transaction
    // id older than every event below, and stays open throughout.
    let mut other = pool.begin().await.unwrap();
    write_scratch(&mut other).await;
    let other_id: i64 = sqlx::query_scalar("SELECT pg_current_xact_id()::text::bigint")
        .fetch_one(&mut *other)
        .await
        .unwrap();

    let wallet = open_wallet(&store).await;
    let deposited = deposit(&store, wallet, 500).await;
    assert!(deposited.transaction_id as i64 > other_id);

    let seen = read_after(&pool, Position::START, 100).await.unwrap();
    assert_eq!(
        seen.iter().map(|event| event.sequence).collect::<Vec<_>>(),
        vec![1, 2],
        "both events are read while the other transaction is still open"
    );
    other.rollback().await.unwrap();
}

/// Inserts event `sequence` of the `Probe` aggregate `id` in `tx`.
async fn insert_probe(
    tx: &mut sqlx::PgConnection,
    id: &str,
    sequence: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                             payload, metadata, prev_hash, hash)
         VALUES ('Probe', $1, $2, 'Probed', '1', '{}', '{}', '\\x00', '\\x00')",
    )
    .bind(id)
    .bind(sequence)
    .execute(tx)
    .await
    .map(drop)
}

/// Writes something else than events in `tx` (which gives it an id).
async fn write_scratch(tx: &mut sqlx::PgConnection) {
    sqlx::query("CREATE TEMPORARY TABLE scratch (n int)")
        .execute(tx)
        .await
        .unwrap();
}

#[tokio::test]
async fn an_event_inserted_after_another_write_of_its_transaction_is_refused() {
    let db = TestDb::migrated().await;
    let pool = db.pool().await;

    // The transaction got its id from another write, before it could
    // announce itself as an event writer: readers could not wait for it.
    let mut tx = pool.begin().await.unwrap();
    write_scratch(&mut tx).await;
    let error = insert_probe(&mut tx, "second", 1)
        .await
        .expect_err("an event after another write is refused");
    let error = error.as_database_error().expect("a database error");
    assert_eq!(error.code().as_deref(), Some("55000"));
    assert!(
        error.message().contains("first write"),
        "{}",
        error.message()
    );
    tx.rollback().await.unwrap();

    // Events first, anything after: accepted.
    let mut tx = pool.begin().await.unwrap();
    insert_probe(&mut tx, "first", 1).await.unwrap();
    write_scratch(&mut tx).await;
    insert_probe(&mut tx, "first", 2).await.unwrap();
    tx.commit().await.unwrap();
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(count, 2);
}

#[tokio::test]
async fn events_cannot_be_changed_or_removed() {
    let db = TestDb::migrated().await;
    let (store, pool) = store_on(&db).await;
    let wallet = open_wallet(&store).await;
    deposit(&store, wallet, 100).await;

    for statement in [
        "UPDATE events SET payload = '{}'",
        "DELETE FROM events",
        "TRUNCATE events",
    ] {
        let error = sqlx::query(statement).execute(&pool).await.unwrap_err();
        let code = error
            .as_database_error()
            .and_then(|db| db.code())
            .map(|code| code.into_owned());
        assert_eq!(
            code.as_deref(),
            Some("42501"),
            "{statement} must be refused, got {error}"
        );
    }
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(count, 2);
}

/// Turns the append-only triggers off, as an attacker with superuser rights
/// could, and runs `statement`.
async fn tamper(pool: &PgPool, statement: &str) {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("ALTER TABLE events DISABLE TRIGGER USER")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(statement).execute(&mut *tx).await.unwrap();
    sqlx::query("ALTER TABLE events ENABLE TRIGGER USER")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn the_hash_chain_reveals_altered_removed_and_reordered_events() {
    let db = TestDb::migrated().await;
    let (store, pool) = store_on(&db).await;
    let wallets = [
        open_wallet(&store).await,
        open_wallet(&store).await,
        open_wallet(&store).await,
    ];
    for wallet in wallets {
        for amount in [100, 200, 300] {
            deposit(&store, wallet, amount).await;
        }
    }
    let intact = verify_chains(&pool, None).await.unwrap();
    assert!(intact.is_intact(), "{:?}", intact.problems);
    assert_eq!((intact.events_checked, intact.aggregates_checked), (12, 3));

    let [altered, removed, reordered] = wallets.map(|wallet| wallet.to_string());
    // Altered: one amount changed, with its balance to look consistent.
    tamper(
        &pool,
        &format!(
            "UPDATE events SET payload = replace(payload::text, '\"amount\":200', '\"amount\":2000')::json
              WHERE aggregate_id = '{altered}' AND sequence = 3"
        ),
    )
    .await;
    // Removed: the second deposit disappears.
    tamper(
        &pool,
        &format!("DELETE FROM events WHERE aggregate_id = '{removed}' AND sequence = 3"),
    )
    .await;
    // Reordered: the last two deposits swap places.
    for (from, to) in [(3, 1000), (4, 3), (1000, 4)] {
        tamper(
            &pool,
            &format!(
                "UPDATE events SET sequence = {to} WHERE aggregate_id = '{reordered}' AND sequence = {from}"
            ),
        )
        .await;
    }

    let report = verify_chains(&pool, None).await.unwrap();
    assert!(!report.is_intact());
    let problems_of = |id: &str| -> Vec<(i64, ProblemKind)> {
        report
            .problems
            .iter()
            .filter(|problem| problem.aggregate_id == id)
            .map(|problem| (problem.sequence, problem.kind))
            .collect()
    };
    assert_eq!(problems_of(&altered), vec![(3, ProblemKind::Altered)]);
    assert!(
        problems_of(&removed).contains(&(4, ProblemKind::SequenceGap)),
        "{:?}",
        problems_of(&removed)
    );
    assert!(
        problems_of(&removed).contains(&(4, ProblemKind::BrokenLink)),
        "{:?}",
        problems_of(&removed)
    );
    let reordered_problems = problems_of(&reordered);
    assert!(
        reordered_problems
            .iter()
            .any(|(_, kind)| *kind == ProblemKind::BrokenLink),
        "{reordered_problems:?}"
    );
    // One aggregate can be checked alone.
    let alone = verify_chains(&pool, Some(("Wallet", &altered)))
        .await
        .unwrap();
    assert_eq!(alone.events_checked, 4);
    assert_eq!(alone.problems_found, 1);
}

#[tokio::test]
async fn a_snapshot_holds_exactly_the_state_of_a_full_replay() {
    let db = TestDb::migrated().await;
    let (store, pool) = store_on(&db).await;
    let wallet = open_wallet(&store).await;
    // 250 deposits of 1..=250 cents, many at once so that they batch.
    let deposits =
        futures::future::join_all((1..=250).map(|amount| deposit(&store, wallet, amount)));
    deposits.await;
    let expected: i64 = (1..=250).sum();

    let (last_sequence, payload): (i64, serde_json::Value) = sqlx::query_as(
        "SELECT last_sequence, payload FROM snapshots WHERE aggregate_type = 'Wallet' AND aggregate_id = $1",
    )
    .bind(wallet.to_string())
    .fetch_one(&pool)
    .await
    .expect("a snapshot was taken past 100 events");
    assert!(last_sequence >= 200);
    let snapshot: Wallet = serde_json::from_value(payload).unwrap();
    // The state after `last_sequence` events: the deposits it includes, once.
    let included: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum((payload->'FundsDeposited'->>'amount')::bigint), 0)::bigint FROM events
          WHERE aggregate_id = $1 AND sequence <= $2",
    )
    .bind(wallet.to_string())
    .bind(last_sequence)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(snapshot.available(), included, "no event applied twice");

    // A fresh process loads from the snapshot; without it, from every event.
    let (from_snapshot, version) = EventStore::new(pool.clone(), StoreConfig::default())
        .load::<Wallet>(&wallet.to_string())
        .await
        .unwrap();
    assert_eq!(version, 251);
    assert_eq!(from_snapshot.available(), expected);
    sqlx::query("DELETE FROM snapshots")
        .execute(&pool)
        .await
        .unwrap();
    let (from_events, _) = EventStore::new(pool.clone(), StoreConfig::default())
        .load::<Wallet>(&wallet.to_string())
        .await
        .unwrap();
    assert_eq!(from_snapshot, from_events);
}

#[tokio::test]
async fn two_processes_writing_one_wallet_never_lose_a_deposit() {
    let db = TestDb::migrated().await;
    let pool = db.pool().await;
    // Two stores stand for two command-api processes: separate caches and
    // queues, one database.
    let first = EventStore::new(pool.clone(), StoreConfig::default());
    let second = EventStore::new(pool.clone(), StoreConfig::default());
    let wallet = open_wallet(&first).await;
    // Warm both caches so that each believes it knows the latest version.
    deposit(&second, wallet, 1).await;
    deposit(&first, wallet, 1).await;

    let work = (0..200).map(|n| {
        let store = if n % 2 == 0 {
            first.clone()
        } else {
            second.clone()
        };
        async move { deposit(&store, wallet, 10).await }
    });
    futures::future::join_all(work).await;

    let (state, version) = EventStore::new(pool.clone(), StoreConfig::default())
        .load::<Wallet>(&wallet.to_string())
        .await
        .unwrap();
    assert_eq!(state.available(), 2 + 200 * 10);
    assert_eq!(version, 1 + 2 + 200);
    assert!(verify_chains(&pool, None).await.unwrap().is_intact());
}

/// Holds back every statement that appends events (their trigger takes the
/// writers' lock shared, see migration 0006) until the returned connection
/// unlocks it or closes.
async fn hold_event_writers(pool: &PgPool) -> sqlx::pool::PoolConnection<sqlx::Postgres> {
    let mut gate = pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock(1399813483, 1)")
        .execute(&mut *gate)
        .await
        .unwrap();
    gate
}

/// Waits until a statement of this database waits for the writers' lock.
async fn until_a_writer_waits(pool: &PgPool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND wait_event_type = 'Lock'
                AND wait_event = 'advisory'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if waiting > 0 {
            return;
        }
        assert!(Instant::now() < deadline, "no writer reached the lock");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Deposits 1 on `first` while the writers are held back, then 5 on each of
/// `wallets` (queued behind it), lets them go and returns their positions.
async fn deposit_behind_held_writers(
    store: &EventStore,
    pool: &PgPool,
    first: WalletId,
    wallets: &[WalletId],
) -> (Position, Vec<Position>) {
    let gate = hold_event_writers(pool).await;
    let alone = tokio::spawn({
        let store = store.clone();
        async move { deposit(&store, first, 1).await }
    });
    until_a_writer_waits(pool).await;
    let queued: Vec<_> = wallets
        .iter()
        .map(|&wallet| {
            let store = store.clone();
            tokio::spawn(async move { deposit(&store, wallet, 5).await })
        })
        .collect();
    // They queue in memory, which nothing outside shows: give them time.
    tokio::time::sleep(Duration::from_millis(300)).await;
    gate.close().await.unwrap();
    let alone = alone.await.unwrap();
    let mut positions = Vec::new();
    for deposit in queued {
        positions.push(deposit.await.unwrap());
    }
    (alone, positions)
}

/// Group commit: units of work queued while a statement is in flight share
/// the next statement, and a unit of a group that conflicts fails nobody
/// else's: the group is written again unit by unit.
#[tokio::test]
async fn waiting_units_of_work_share_a_statement_and_a_conflict_in_it_fails_none_but_its_own() {
    let db = TestDb::migrated().await;
    let pool = db.pool().await;
    // One statement in flight at a time, so that the others must queue.
    let store = EventStore::new(
        pool.clone(),
        StoreConfig {
            writers: 1,
            ..StoreConfig::default()
        },
    );
    let first = open_wallet(&store).await;
    let mut wallets = Vec::new();
    for _ in 0..8 {
        wallets.push(open_wallet(&store).await);
    }

    // 1. While the first deposit waits for the lock, eight more queue.
    let (alone, queued) = deposit_behind_held_writers(&store, &pool, first, &wallets).await;
    let transactions: std::collections::BTreeSet<u64> =
        queued.iter().map(|p| p.transaction_id).collect();
    assert!(!transactions.contains(&alone.transaction_id));
    assert_eq!(
        transactions.len(),
        1,
        "the queued deposits shared one statement"
    );

    // 2. Another process moves one wallet on behind this store's cache; the
    // next group holds that stale unit and fails as a whole. `deposit`
    // fails the test on any error: the stale unit is retried on the stored
    // state, and the others are written on their own.
    let other = EventStore::new(pool.clone(), StoreConfig::default());
    deposit(&other, wallets[0], 100).await;
    let (_, queued) = deposit_behind_held_writers(&store, &pool, first, &wallets).await;
    let transactions: std::collections::BTreeSet<u64> =
        queued[1..].iter().map(|p| p.transaction_id).collect();
    assert_eq!(
        transactions.len(),
        7,
        "the failed group was written unit by unit"
    );

    let reader = EventStore::new(pool.clone(), StoreConfig::default());
    let balance = |wallet: WalletId| {
        let reader = reader.clone();
        async move {
            let (state, _) = reader.load::<Wallet>(&wallet.to_string()).await.unwrap();
            state.available()
        }
    };
    assert_eq!(balance(first).await, 2);
    assert_eq!(balance(wallets[0]).await, 5 + 100 + 5);
    for &wallet in &wallets[1..] {
        assert_eq!(balance(wallet).await, 10);
    }
    assert!(verify_chains(&pool, None).await.unwrap().is_intact());
}

#[tokio::test]
async fn a_refused_command_writes_nothing_and_keeps_the_cache_right() {
    let db = TestDb::migrated().await;
    let (store, pool) = store_on(&db).await;
    let wallet = open_wallet(&store).await;
    deposit(&store, wallet, 100).await;
    let owner_of = |wallet: &Wallet| Actor::new(wallet.owner(), Role::Buyer);
    let (state, _) = store.state::<Wallet>(&wallet.to_string()).await.unwrap();
    let refused = store
        .execute::<Wallet>(
            &wallet.to_string(),
            WalletCommand::Withdraw {
                actor: owner_of(&state),
                amount: Money::parse_positive(101, "EUR").unwrap(),
                reference: Reference::parse("reference", "too much").unwrap(),
            },
            context(),
            None,
            Reply::new(200, wallet.to_string()),
        )
        .await
        .unwrap_err();
    assert!(matches!(
        refused,
        event_store::ExecError::Rejected {
            code: "insufficient_funds",
            ..
        }
    ));
    let withdrawn = store
        .execute::<Wallet>(
            &wallet.to_string(),
            WalletCommand::Withdraw {
                actor: owner_of(&state),
                amount: Money::parse_positive(100, "EUR").unwrap(),
                reference: Reference::parse("reference", "all of it").unwrap(),
            },
            context(),
            None,
            Reply::new(200, wallet.to_string()),
        )
        .await
        .unwrap();
    assert_eq!(withdrawn.version(), Some(3));
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(count, 3);
    assert!(state.exists());
}

/// The plan of the test below: open the wallet if it looks new, else
/// deposit 7 cents into it.
fn open_or_deposit(
    wallet_id: WalletId,
) -> impl Fn(&mut event_store::store::Plan) -> Result<&'static str, event_store::ExecError>
+ Send
+ Sync
+ 'static {
    move |plan| {
        let id = wallet_id.to_string();
        if plan.state::<Wallet>(&id)?.exists() {
            plan.decide::<Wallet>(
                &id,
                WalletCommand::Deposit {
                    actor: admin(),
                    amount: Money::parse_positive(7, "EUR").unwrap(),
                    reference: Reference::parse("reference", "after all").unwrap(),
                },
            )?;
            Ok("deposited")
        } else {
            plan.decide::<Wallet>(
                &id,
                WalletCommand::Open {
                    actor: Actor::new(UserId::new(), Role::Buyer),
                    wallet_id,
                    currency: Currency::parse("EUR").unwrap(),
                },
            )?;
            Ok("opened")
        }
    }
}

#[tokio::test]
async fn a_stream_wrongly_declared_new_is_a_conflict_then_decided_on_its_stored_state() {
    let db = TestDb::migrated().await;
    let (store, pool) = store_on(&db).await;
    let wallet = open_wallet(&store).await;
    deposit(&store, wallet, 100).await;

    // Another process (an empty cache) declares the existing wallet new:
    // its first try starts from the empty state and opens it, the INSERT of
    // sequence 1 collides, and the retry loads the wallet and deposits.
    let other = EventStore::new(pool.clone(), StoreConfig::default());
    let accepted = other
        .execute_multi(
            vec![StreamRef::of::<Wallet>(wallet.to_string()).new_stream()],
            context(),
            None,
            open_or_deposit(wallet),
            |outcome, committed| {
                (
                    200,
                    serde_json::json!({"outcome": outcome, "position": committed.last().token()}),
                )
            },
        )
        .await
        .expect("retried after the conflict");
    assert_eq!(accepted.body["outcome"], "deposited");
    let (state, version) = other.state::<Wallet>(&wallet.to_string()).await.unwrap();
    assert_eq!(
        (state.available(), version),
        (107, 3),
        "the cache holds the stored state"
    );
    let (stored, _) = EventStore::new(pool.clone(), StoreConfig::default())
        .load::<Wallet>(&wallet.to_string())
        .await
        .unwrap();
    assert_eq!(stored.available(), 107);
    assert!(verify_chains(&pool, None).await.unwrap().is_intact());

    // Declared new and really new: written from the empty state, no load.
    let fresh = WalletId::new();
    let accepted = other
        .execute_multi(
            vec![StreamRef::of::<Wallet>(fresh.to_string()).new_stream()],
            context(),
            None,
            open_or_deposit(fresh),
            |outcome, _| (201, serde_json::json!({"outcome": outcome})),
        )
        .await
        .unwrap();
    assert_eq!(accepted.body["outcome"], "opened");
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        count, 4,
        "open + deposit, the retried deposit, the new wallet's opening"
    );
}

/// A unit of work: deposit `amount` into `wallet` and arm timer `timer_id`.
fn deposit_with_timer(
    wallet: WalletId,
    amount: i64,
    timer_id: Uuid,
) -> impl Fn(&mut event_store::store::Plan) -> Result<(), event_store::ExecError> + Send + Sync + 'static
{
    move |plan| {
        plan.decide::<Wallet>(
            &wallet.to_string(),
            WalletCommand::Deposit {
                actor: admin(),
                amount: Money::parse_positive(amount, "EUR").unwrap(),
                reference: Reference::parse("reference", "unit").unwrap(),
            },
        )?;
        plan.schedule(event_store::store::Timer {
            timer_id,
            kind: "test".into(),
            due_at: chrono::Utc::now(),
            payload: serde_json::json!({"amount": amount}),
        });
        Ok(())
    }
}

/// A unit of work with a timer and a due snapshot commits them with its
/// events (one statement), and only with them.
#[tokio::test]
async fn a_unit_of_work_writes_its_timer_and_snapshot_with_its_events() {
    let db = TestDb::migrated().await;
    let pool = db.pool().await;
    let store = EventStore::new(
        pool.clone(),
        StoreConfig {
            snapshot_every: 2,
            ..StoreConfig::default()
        },
    );
    let wallet = open_wallet(&store).await;
    let timer_id = Uuid::now_v7();
    let unit = |amount| deposit_with_timer(wallet, amount, timer_id);
    store
        .execute_multi(
            vec![StreamRef::of::<Wallet>(wallet.to_string())],
            context(),
            None,
            unit(5),
            |_, committed| {
                (
                    200,
                    serde_json::json!({"position": committed.last().token()}),
                )
            },
        )
        .await
        .unwrap();
    let timers: i64 = sqlx::query_scalar("SELECT count(*) FROM timers WHERE timer_id = $1")
        .bind(timer_id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(timers, 1);
    let (last_sequence, payload): (i64, serde_json::Value) =
        sqlx::query_as("SELECT last_sequence, payload FROM snapshots WHERE aggregate_id = $1")
            .bind(wallet.to_string())
            .fetch_one(&pool)
            .await
            .expect("version 2 crosses snapshot_every");
    assert_eq!(last_sequence, 2);
    assert_eq!(
        serde_json::from_value::<Wallet>(payload)
            .unwrap()
            .available(),
        5
    );
    let heads: i64 =
        sqlx::query_scalar("SELECT sequence FROM stream_heads WHERE aggregate_id = $1")
            .bind(wallet.to_string())
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(heads, 2, "the stream head moved with the events");

    // A second process with a stale cache: its statement collides, and
    // the retry, decided on the stored state, writes the next snapshot.
    let other = EventStore::new(
        pool.clone(),
        StoreConfig {
            snapshot_every: 2,
            ..StoreConfig::default()
        },
    );
    other.state::<Wallet>(&wallet.to_string()).await.unwrap();
    deposit(&store, wallet, 1).await;
    other
        .execute_multi(
            vec![StreamRef::of::<Wallet>(wallet.to_string())],
            context(),
            None,
            unit(10),
            |_, _| (200, serde_json::json!({})),
        )
        .await
        .unwrap();
    let (last_sequence, payload): (i64, serde_json::Value) =
        sqlx::query_as("SELECT last_sequence, payload FROM snapshots WHERE aggregate_id = $1")
            .bind(wallet.to_string())
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(last_sequence, 4);
    assert_eq!(
        serde_json::from_value::<Wallet>(payload)
            .unwrap()
            .available(),
        16
    );
    assert!(verify_chains(&pool, None).await.unwrap().is_intact());
}

/// Writers the test below runs at once, and events each commits (one per
/// statement, outside an explicit transaction, like a plain command).
const RACING_WRITERS: usize = 6;
const EVENTS_PER_WRITER: i64 = 400;

#[tokio::test]
async fn a_reader_racing_many_committing_writers_reads_every_event_once_in_order() {
    let db = TestDb::migrated().await;
    let pool = db.pool().await;
    let writers: Vec<_> = (0..RACING_WRITERS)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let id = Uuid::now_v7().to_string();
                let mut conn = pool.acquire().await.unwrap();
                for sequence in 1..=EVENTS_PER_WRITER {
                    insert_probe(&mut conn, &id, sequence).await.unwrap();
                }
            })
        })
        .collect();
    // The reader reads as fast as it can while they commit: each read is a
    // chance to pass an event that commits a moment later. Once they are
    // done it reads what is left.
    let mut read = Vec::new();
    let mut after = Position::START;
    loop {
        let writing = !writers.iter().all(|writer| writer.is_finished());
        let events = read_after(&pool, after, 500).await.unwrap();
        if events.is_empty() && !writing {
            break;
        }
        if let Some(last) = events.last() {
            after = last.position;
        }
        read.extend(events.into_iter().map(|event| event.position));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let committed: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT transaction_id::text::bigint, position FROM events
          ORDER BY transaction_id, position",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let committed: Vec<Position> = committed
        .into_iter()
        .map(|(transaction_id, position)| Position {
            transaction_id: transaction_id as u64,
            position,
        })
        .collect();
    assert_eq!(read.len(), committed.len(), "every event read once");
    assert_eq!(read, committed, "in the global order, none skipped");
}

#[tokio::test]
async fn one_session_leads_and_the_others_stand_by_until_its_connection_ends() {
    use event_store::leader;
    use sqlx::Connection as _;

    let db = TestDb::migrated().await;
    let key = leader::lock_key("souk-test-leader");
    let mut first = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let mut second = sqlx::PgConnection::connect(&db.url).await.unwrap();
    assert!(leader::try_lead(&mut first, key).await.unwrap());
    assert!(
        leader::try_lead(&mut first, key).await.unwrap(),
        "the leader's own session takes its lock again"
    );
    assert!(!leader::try_lead(&mut second, key).await.unwrap());
    assert!(
        leader::try_lead(&mut second, leader::lock_key("souk-test-other"))
            .await
            .unwrap(),
        "another name is another lock"
    );

    // Standing by ends when told to stop, and says so once.
    let mut told = 0;
    let led = leader::lead(
        &mut second,
        key,
        Duration::from_millis(20),
        tokio::time::sleep(Duration::from_millis(200)),
        || told += 1,
    )
    .await
    .unwrap();
    assert!(!led);
    assert_eq!(told, 1);

    // The leader's connection ends: a session standing by takes the lead.
    let standby = tokio::spawn(async move {
        let led = leader::lead(
            &mut second,
            key,
            Duration::from_millis(20),
            std::future::pending(),
            || {},
        )
        .await;
        (led, second)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!standby.is_finished(), "two sessions lead at once");
    first.close().await.unwrap();
    let (led, second) = tokio::time::timeout(Duration::from_secs(30), standby)
        .await
        .expect("the stand-by takes over")
        .unwrap();
    assert!(led.unwrap());
    second.close().await.unwrap();
}

/// Processes starting together (a relay and projectors after a deploy) bind
/// the stream at once: each learns the one recorded count, none errs, and a
/// later other count is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn processes_binding_a_stream_at_once_all_see_one_partition_count() {
    let db = TestDb::migrated().await;
    let pool = db.pool().await;
    for round in 0..20 {
        let stream = format!("race-{round}");
        let binders: Vec<_> = (0..8)
            .map(|_| {
                let pool = pool.clone();
                let stream = stream.clone();
                tokio::spawn(async move {
                    event_store::binding::bind_partitions(&pool, &stream, 4).await
                })
            })
            .collect();
        for binder in binders {
            let bound = binder.await.expect("binder task");
            assert_eq!(bound.expect("no database error"), Ok(()), "round {round}");
        }
    }
    let refused = event_store::binding::bind_partitions(&pool, "race-0", 8)
        .await
        .expect("no database error")
        .unwrap_err();
    assert!(matches!(
        refused,
        event_store::binding::BindingError::PartitionsChanged {
            bound: 4,
            configured: 8,
            ..
        }
    ));
}
