//! Reliability under concurrency and failure, over HTTP: a hot listing
//! never oversells, concurrent money movements conserve money, one
//! Idempotency-Key has one effect, and a Postgres restart is a window of
//! 503s, not of 500s or lost writes.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::postgres::PgPool;
use tests::pg_cluster::PgCluster;
use tests::{TestDb, User, spawn_app, spawn_app_on};

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[tokio::test]
async fn a_hot_listing_never_oversells() {
    let app = spawn_app().await;
    let seller = User::new("seller");
    let listing = app.listing(&seller, 2_500, 100, None).await;

    let buyers: Vec<User> = (0..2_000).map(|_| User::new("buyer")).collect();
    let path = format!("/listings/{listing}/reservations");
    let body = json!({"quantity": 1, "ttl_seconds": 600});
    let answers = futures::future::join_all(
        buyers
            .iter()
            .map(|buyer| app.post(&path, Some(buyer), &body)),
    )
    .await;

    let mut by_status: HashMap<u16, usize> = HashMap::new();
    for answer in &answers {
        *by_status.entry(answer.status).or_default() += 1;
        if answer.status == 409 {
            assert_eq!(answer.code(), "insufficient_stock", "{:?}", answer.body);
        }
    }
    assert_eq!(by_status.get(&201), Some(&100), "{by_status:?}");
    assert_eq!(by_status.get(&409), Some(&1_900), "{by_status:?}");
    assert_eq!(by_status.len(), 2, "nothing but 201 and 409: {by_status:?}");

    // The pool as stored: 100 holds, nothing available, never below zero.
    let pool = app.db.pool().await;
    let (pool_state, _) = event_store::EventStore::new(pool.clone(), Default::default())
        .load::<domain::reservation::Reservation>(&listing.to_string())
        .await
        .unwrap();
    assert_eq!(pool_state.stock(), 100);
    assert_eq!(pool_state.held(), 100);
    assert_eq!(pool_state.available(), 0);
    let lowest: Option<i64> = sqlx::query_scalar(
        "SELECT min((payload->'HoldPlaced'->>'available')::bigint) FROM events
          WHERE aggregate_type = 'Reservation' AND event_type = 'HoldPlaced'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(lowest, Some(0));
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM events WHERE event_type = 'HoldPlaced'"
        )
        .await,
        100
    );
}

/// A tiny deterministic generator, so that a failure can be replayed.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

#[tokio::test]
async fn concurrent_deposits_withdrawals_and_holds_conserve_money() {
    let app = spawn_app().await;
    let admin = User::new("admin");
    let seller = User::new("seller");
    let seller_wallet = app.funded_wallet(&seller, "EUR", 0).await;
    let listing = app
        .listing(&seller, 700, 100_000, Some(seller_wallet))
        .await;
    let owners: Vec<User> = (0..20).map(|_| User::new("buyer")).collect();
    let mut wallets = Vec::new();
    for owner in &owners {
        wallets.push(app.funded_wallet(owner, "EUR", 10_000).await);
    }

    let mut random = Lcg(20_261_121);
    let mut operations = Vec::new();
    for _ in 0..1_000 {
        let index = random.next(20) as usize;
        let amount = 1 + random.next(3_000) as i64;
        let kind = random.next(3);
        operations.push((kind, index, amount));
    }
    let answers = futures::future::join_all(operations.iter().map(|&(kind, index, amount)| {
        let wallet = wallets[index];
        let owner = &owners[index];
        let admin = &admin;
        let app = &app;
        async move {
            let answer = match kind {
                0 => {
                    app.post(
                        &format!("/wallets/{wallet}/deposits"),
                        Some(admin),
                        &json!({"amount": {"amount": amount, "currency": "EUR"}, "reference": "top-up"}),
                    )
                    .await
                }
                1 => {
                    app.post(
                        &format!("/wallets/{wallet}/withdrawals"),
                        Some(owner),
                        &json!({"amount": {"amount": amount, "currency": "EUR"}, "reference": "payout"}),
                    )
                    .await
                }
                _ => {
                    // A checkout holds 700 cents in escrow (or is rejected).
                    app.post(
                        "/orders",
                        Some(owner),
                        &json!({
                            "lines": [{"listing_id": listing, "quantity": 1}],
                            "shipping_address": {"name": "A", "line1": "1 rue", "city": "Lyon", "postal_code": "69001", "country": "FR"},
                            "payment_method": "wallet_escrow",
                            "wallet_id": wallet,
                        }),
                    )
                    .await
                }
            };
            (kind, amount, answer)
        }
    }))
    .await;

    let mut deposited = 20 * 10_000;
    let mut withdrawn = 0;
    let mut held = 0;
    for (kind, amount, answer) in &answers {
        assert!(answer.status < 500, "{} {:?}", answer.status, answer.body);
        match (kind, answer.status) {
            (0, 200) => deposited += amount,
            (1, 200) => withdrawn += amount,
            (1, 409) => assert_eq!(answer.code(), "insufficient_funds"),
            (2, 201) => {
                if answer.body["orders"][0]["status"] == "confirmed" {
                    held += 700;
                } else {
                    assert_eq!(answer.body["orders"][0]["reason"], "insufficient_funds");
                }
            }
            other => panic!("unexpected {other:?}: {:?}", answer.body),
        }
    }

    // The stored wallets, loaded afresh, account for every cent.
    let pool = app.db.pool().await;
    let store = event_store::EventStore::new(pool.clone(), Default::default());
    let mut available_total = 0;
    let mut held_total = 0;
    for wallet in &wallets {
        let (state, _) = store
            .load::<domain::wallet::Wallet>(&wallet.to_string())
            .await
            .unwrap();
        assert!(state.available() >= 0 && state.held() >= 0);
        available_total += state.available();
        held_total += state.held();
    }
    let (seller_state, _) = store
        .load::<domain::wallet::Wallet>(&seller_wallet.to_string())
        .await
        .unwrap();
    assert_eq!(held_total, held);
    // Checkouts never write the seller's wallet: what it will receive is
    // the buyers' open holds naming it (derived by the read model).
    assert_eq!(seller_state.pending_incoming(), 0);
    assert_eq!(seller_state.available(), 0);
    assert_eq!(available_total + held_total, deposited - withdrawn);
}

#[tokio::test]
async fn one_idempotency_key_sent_fifty_times_has_one_effect() {
    let app = spawn_app().await;
    let owner = User::new("buyer");
    let wallet = app.funded_wallet(&owner, "EUR", 0).await;
    let admin = User::new("admin");
    let path = format!("/wallets/{wallet}/deposits");
    let body = json!({"amount": {"amount": 1_234, "currency": "EUR"}, "reference": "psp-42"})
        .to_string()
        .into_bytes();
    let answers = futures::future::join_all((0..50).map(|_| {
        app.post_raw(
            &path,
            Some(&admin),
            Some(body.clone()),
            &[("idempotency-key", "deposit-42")],
        )
    }))
    .await;
    for answer in &answers {
        assert_eq!(answer.status, 200, "{:?}", answer.body);
        assert_eq!(
            answer.body, answers[0].body,
            "every answer is the first one"
        );
    }
    let replays = answers
        .iter()
        .filter(|answer| answer.headers.get("idempotent-replayed").is_some())
        .count();
    assert_eq!(replays, 49);

    let pool = app.db.pool().await;
    let deposits = count(
        &pool,
        "SELECT count(*) FROM events WHERE event_type = 'FundsDeposited'",
    )
    .await;
    assert_eq!(deposits, 1);

    // Creating with a key: fifty requests, one wallet.
    let creations = futures::future::join_all((0..50).map(|_| {
        app.post_raw(
            "/wallets",
            Some(&owner),
            Some(br#"{"currency":"EUR"}"#.to_vec()),
            &[("idempotency-key", "open-eur")],
        )
    }))
    .await;
    let ids: std::collections::HashSet<Value> =
        creations.iter().map(|a| a.body["id"].clone()).collect();
    assert!(
        creations.iter().all(|a| a.status == 201),
        "{:?}",
        creations[0].body
    );
    assert_eq!(ids.len(), 1);
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM events WHERE event_type = 'WalletOpened'"
        )
        .await,
        2
    );

    // The same key with another body is refused, and writes nothing.
    let other = app
        .post_raw(
            &path,
            Some(&admin),
            Some(
                json!({"amount": {"amount": 9, "currency": "EUR"}, "reference": "psp-42"})
                    .to_string()
                    .into_bytes(),
            ),
            &[("idempotency-key", "deposit-42")],
        )
        .await;
    assert_eq!(
        (other.status, other.code()),
        (422, "idempotency_key_reused")
    );
    // Keys belong to their user: another admin's same key is a new request.
    let another_admin = User::new("admin");
    let theirs = app
        .post_raw(
            &path,
            Some(&another_admin),
            Some(body.clone()),
            &[("idempotency-key", "deposit-42")],
        )
        .await;
    assert_eq!(theirs.status, 200);
    assert!(theirs.headers.get("idempotent-replayed").is_none());
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM events WHERE event_type = 'FundsDeposited'"
        )
        .await,
        2
    );
}

#[tokio::test]
async fn a_postgres_restart_under_load_answers_503_then_recovers() {
    let cluster = PgCluster::start().expect("starting a private Postgres");
    let db = TestDb::empty_on(&cluster.admin_url()).await;
    let app = spawn_app_on(db, |config| {
        config.server.db_acquire_timeout_ms = 500;
    })
    .await;
    let owner = User::new("buyer");
    let admin = User::new("admin");
    let wallet = app.funded_wallet(&owner, "EUR", 0).await;
    let path = format!("/wallets/{wallet}/deposits");
    let deposit = |n: usize| {
        let key = format!("restart-{n}");
        let path = path.clone();
        let app = &app;
        let admin = &admin;
        async move {
            app.post_raw(
                &path,
                Some(admin),
                Some(
                    json!({"amount": {"amount": 1, "currency": "EUR"}, "reference": "restart"})
                        .to_string()
                        .into_bytes(),
                ),
                &[("idempotency-key", &key)],
            )
            .await
        }
    };

    // Before the outage: all succeed.
    let mut statuses: HashMap<u16, usize> = HashMap::new();
    let mut tally = |answers: &[tests::Answer]| {
        for answer in answers {
            *statuses.entry(answer.status).or_default() += 1;
            assert!(
                answer.status == 200 || (answer.status == 503 && answer.code() == "unavailable"),
                "only successes and 503s: {} {:?}",
                answer.status,
                answer.body
            );
        }
    };
    for batch in 0..10 {
        let answers = futures::future::join_all((batch * 4..batch * 4 + 4).map(&deposit)).await;
        assert!(
            answers.iter().all(|a| a.status == 200),
            "{:?}",
            answers[0].body
        );
        tally(&answers);
    }

    // During: every request is answered 503, quickly.
    cluster.stop().expect("stopping Postgres");
    let mut pending: Vec<usize> = Vec::new();
    for batch in 10..20 {
        let started = Instant::now();
        let keys: Vec<usize> = (batch * 4..batch * 4 + 4).collect();
        let answers = futures::future::join_all(keys.iter().copied().map(&deposit)).await;
        assert!(
            answers.iter().all(|a| a.status == 503),
            "{:?}",
            answers[0].body
        );
        assert!(started.elapsed() < Duration::from_secs(5), "503s come fast");
        tally(&answers);
        pending.extend(keys);
    }

    // After: the same app recovers on its own; clients retry with their keys.
    cluster.start_again().expect("starting Postgres again");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pending.is_empty() && Instant::now() < deadline {
        let answers = futures::future::join_all(pending.iter().copied().map(&deposit)).await;
        tally(&answers);
        pending = pending
            .into_iter()
            .zip(&answers)
            .filter(|(_, answer)| answer.status != 200)
            .map(|(key, _)| key)
            .collect();
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert!(
        pending.is_empty(),
        "still failing after the restart: {pending:?}"
    );
    let answers = futures::future::join_all((80..120).map(&deposit)).await;
    assert!(answers.iter().all(|a| a.status == 200));
    tally(&answers);
    assert!(
        statuses.get(&503).copied().unwrap_or(0) >= 40,
        "{statuses:?}"
    );

    // Nothing lost, nothing doubled: every successful key deposited once.
    let pool = app.db.pool().await;
    let deposits = count(
        &pool,
        "SELECT count(*) FROM events WHERE event_type = 'FundsDeposited'",
    )
    .await;
    let keys = count(
        &pool,
        "SELECT count(*) FROM idempotency WHERE key LIKE 'restart-%'",
    )
    .await;
    assert_eq!(deposits, keys);
    let (state, _) = event_store::EventStore::new(pool.clone(), Default::default())
        .load::<domain::wallet::Wallet>(&wallet.to_string())
        .await
        .unwrap();
    assert_eq!((deposits, state.available()), (120, 120));
    pool.close().await;
    app.stop().await;
    drop(cluster);
}
