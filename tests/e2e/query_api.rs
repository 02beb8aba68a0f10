//! The query API: routes over read-model rows inserted as fixtures into a
//! migrated database (authorization, pagination, filters, strict query
//! strings, `?after=` waiting on checkpoints the test advances, the
//! `/projections` report), then the full path: commands through the command
//! API, its relay to a JetStream stream of the test's own, the projector,
//! and reads through the query API (read your writes, notifications).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use event_store::Position;
use projections::search::SearchConfig;
use serde_json::{Value, json};
use sqlx::PgPool;
use tests::{Answer, TestApp, TestDb, User, keys, spawn_app_on};
use uuid::Uuid;

const PARTITIONS: u32 = event_store::fanout::DEFAULT_PARTITIONS;

pub(crate) fn nats_url() -> String {
    std::env::var("SOUK_TEST_NATS_URL")
        .or_else(|_| std::env::var("NATS_URL"))
        .unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// A query API serving a test's database, on a free port.
pub(crate) struct QueryApi {
    pub(crate) address: String,
    pub(crate) client: reqwest::Client,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

async fn spawn_query_api(db: &TestDb) -> QueryApi {
    spawn_query_api_with(db, |_| {}).await
}

pub(crate) async fn spawn_query_api_with(
    db: &TestDb,
    adjust: impl FnOnce(&mut query_api::Config),
) -> QueryApi {
    let mut config = query_api::Config::for_tests(&db.url, keys().public_path.clone());
    config.nats_url = nats_url();
    adjust(&mut config);
    let app = query_api::build(config)
        .await
        .expect("building the query API");
    let port = app.port();
    let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async move {
        let _ = stopped.await;
    }));
    QueryApi {
        address: format!("http://127.0.0.1:{port}"),
        client: reqwest::Client::new(),
        shutdown: Some(shutdown),
        server: Some(server),
    }
}

impl QueryApi {
    pub(crate) async fn get(&self, path: &str, user: Option<&User>) -> Answer {
        let mut request = self.client.get(format!("{}{path}", self.address));
        if let Some(user) = user {
            request = request.bearer_auth(&user.token);
        }
        let response = request.send().await.expect("sending a request");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.unwrap_or_default();
        Answer {
            status,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            headers,
        }
    }

    /// GETs `path` and expects a 200.
    pub(crate) async fn ok(&self, path: &str, user: &User) -> Value {
        let answer = self.get(path, Some(user)).await;
        assert_eq!(answer.status, 200, "GET {path}: {:?}", answer.body);
        answer.body
    }

    /// Opens `/notifications/stream` as `user`.
    async fn events(&self, user: &User) -> EventStream {
        let response = self
            .client
            .get(format!("{}/notifications/stream", self.address))
            .bearer_auth(&user.token)
            .send()
            .await
            .expect("opening the notification stream");
        assert_eq!(response.status().as_u16(), 200);
        EventStream {
            response,
            buffer: String::new(),
        }
    }

    pub(crate) async fn stop(mut self) {
        self.stop_in_place().await;
    }

    /// Stops the server and waits for it, leaving a stopped value behind.
    pub(crate) async fn stop_in_place(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(server) = self.server.take() {
            server
                .await
                .expect("the query API task")
                .expect("the query API stops cleanly");
        }
    }
}

impl Drop for QueryApi {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

/// A server-sent event stream, read event by event.
struct EventStream {
    response: reqwest::Response,
    buffer: String,
}

impl EventStream {
    /// The next event (name and JSON data) within `within`, skipping
    /// keep-alive comments; `None` when none comes or the stream ends.
    async fn next(&mut self, within: Duration) -> Option<(String, Value)> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut name = None;
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(value) = line.strip_prefix("event:") {
                        name = Some(value.trim().to_owned());
                    } else if let Some(value) = line.strip_prefix("data:") {
                        data.push_str(value.trim());
                    }
                }
                if let Some(name) = name {
                    return Some((name, serde_json::from_str(&data).unwrap_or(Value::Null)));
                }
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk()).await;
            match chunk {
                Ok(Ok(Some(bytes))) => self.buffer.push_str(&String::from_utf8_lossy(&bytes)),
                _ => return None,
            }
        }
    }

    /// Reads events until one is named `name`.
    async fn expect(&mut self, name: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Some((event, data)) if event == name => return data,
                Some(_) => continue,
                None => panic!("no `{name}` event within {within:?}"),
            }
        }
    }
}

// ---------------------------------------------------------------- fixtures

pub(crate) async fn migrated() -> (TestDb, PgPool) {
    let db = TestDb::migrated().await;
    let pool = db.pool().await;
    (db, pool)
}

async fn insert_wallet(pool: &PgPool, owner: Uuid, available: i64) -> Uuid {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO rm_wallets (wallet_id, owner_id, currency, available, held, pending_incoming,
                                 created_at, updated_at, version)
         VALUES ($1, $2, 'EUR', $3, 250, 0, now(), now(), 3)",
    )
    .bind(id)
    .bind(owner)
    .bind(available)
    .execute(pool)
    .await
    .unwrap();
    id
}

async fn insert_wallet_entry(pool: &PgPool, wallet: Uuid, sequence: i64) {
    sqlx::query(
        "INSERT INTO rm_wallet_entries (wallet_id, sequence, kind, amount, available, held,
                                        pending_incoming, reference, recorded_at)
         VALUES ($1, $2, 'FundsDeposited', 100, $2 * 100, 0, 0, 'top-up', now())",
    )
    .bind(wallet)
    .bind(sequence)
    .execute(pool)
    .await
    .unwrap();
}

/// An escrow of `amount` held by another wallet for an order of this payee.
async fn insert_escrow(pool: &PgPool, payee: Uuid, amount: i64, status: &str) {
    sqlx::query(
        "INSERT INTO rm_escrows (order_id, payer_wallet_id, payee_wallet_id, amount, status,
                                 held_at)
         VALUES ($1, $2, $3, $4, $5, now())",
    )
    .bind(Uuid::now_v7())
    .bind(Uuid::now_v7())
    .bind(payee)
    .bind(amount)
    .bind(status)
    .execute(pool)
    .await
    .unwrap();
}

/// A listing; `fields` overrides the defaults (category "home", condition
/// "good", price 1000 EUR, status "active").
pub(crate) async fn insert_listing(pool: &PgPool, seller: Uuid, fields: Value) -> Uuid {
    let id = Uuid::now_v7();
    let text = |name: &str, default: &str| {
        fields[name]
            .as_str()
            .map_or_else(|| default.to_owned(), str::to_owned)
    };
    sqlx::query(
        "INSERT INTO rm_listings (listing_id, seller_id, product_id, title, description, category,
                                  condition, price_amount, currency, city, country, attributes,
                                  images, status, stock, held, available, created_at, updated_at,
                                  version)
         VALUES ($1, $2, $3, 'Vintage lamp', 'Brass, works.', $4, $5, $6, $7, 'Lyon', 'FR',
                 '{\"colour\": \"gold\"}', '[\"https://img.test/1.jpg\"]', $8, 5, 2, 3, now(),
                 now(), 4)",
    )
    .bind(id)
    .bind(seller)
    .bind(Uuid::now_v7())
    .bind(text("category", "home"))
    .bind(text("condition", "good"))
    .bind(fields["price"].as_i64().unwrap_or(1_000))
    .bind(text("currency", "EUR"))
    .bind(text("status", "active"))
    .execute(pool)
    .await
    .unwrap();
    id
}

async fn insert_order(pool: &PgPool, buyer: Uuid, seller: Uuid) -> Uuid {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO rm_orders (order_id, checkout_id, buyer_id, seller_id, status, payment_method,
                                total_amount, currency, lines, shipping_address, placed_at,
                                confirmed_at, updated_at, version)
         VALUES ($1, $2, $3, $4, 'confirmed', 'wallet_escrow', 2500, 'EUR',
                 '[{\"listing_id\": \"0190a6c4-0000-7000-8000-000000000001\", \"quantity\": 1}]',
                 '{\"city\": \"Lyon\"}', now(), now(), now(), 2)",
    )
    .bind(id)
    .bind(Uuid::now_v7())
    .bind(buyer)
    .bind(seller)
    .execute(pool)
    .await
    .unwrap();
    id
}

/// Sets the caught-up mark of `projection` on partitions `0..partitions`.
async fn set_caught_up(pool: &PgPool, projection: &str, partitions: u32, to: Position) {
    for partition in 0..partitions as i32 {
        sqlx::query(
            "INSERT INTO projection_checkpoints (projection, partition, caught_up_transaction,
                                                 caught_up_position)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (projection, partition) DO UPDATE
                SET caught_up_transaction = $3, caught_up_position = $4, updated_at = now()",
        )
        .bind(projection)
        .bind(partition)
        .bind(to.transaction_id as i64)
        .bind(to.position)
        .execute(pool)
        .await
        .unwrap();
    }
}

fn at(transaction_id: u64, position: i64) -> Position {
    Position {
        transaction_id,
        position,
    }
}

/// Walks a list page by page with `limit`, returning every item's `key`.
async fn walk(api: &QueryApi, path: &str, user: &User, limit: u32, key: &str) -> Vec<Value> {
    let separator = if path.contains('?') { '&' } else { '?' };
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..1_000 {
        let mut url = format!("{path}{separator}limit={limit}");
        if let Some(cursor) = &cursor {
            url.push_str(&format!("&cursor={cursor}"));
        }
        let page = api.ok(&url, user).await;
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= limit as usize);
        seen.extend(items.iter().map(|item| item[key].clone()));
        match page["next_cursor"].as_str() {
            Some(next) => {
                assert_eq!(
                    items.len(),
                    limit as usize,
                    "only a full page has a next one"
                );
                cursor = Some(next.to_owned());
            }
            None => return seen,
        }
    }
    panic!("the list never ended");
}

// ------------------------------------------------------------------ wallets

#[tokio::test]
async fn a_wallet_is_seen_by_its_owner_admins_and_auditors_only() {
    let (db, pool) = migrated().await;
    let owner = User::new("buyer");
    let wallet = insert_wallet(&pool, owner.id, 1_250).await;
    insert_wallet_entry(&pool, wallet, 1).await;
    // Pending incoming is the open escrows naming the wallet as payee; a
    // settled one no longer counts.
    insert_escrow(&pool, wallet, 50, "open").await;
    insert_escrow(&pool, wallet, 25, "open").await;
    insert_escrow(&pool, wallet, 900, "captured").await;
    let api = spawn_query_api(&db).await;

    let seen = api.ok(&format!("/wallets/{wallet}"), &owner).await;
    assert_eq!(seen["id"], wallet.to_string());
    assert_eq!(seen["owner_id"], owner.id.to_string());
    assert_eq!(
        (&seen["available"], &seen["held"], &seen["pending_incoming"]),
        (&json!(1_250), &json!(250), &json!(75))
    );
    assert_eq!(seen["currency"], "EUR");
    for role in ["admin", "auditor"] {
        api.ok(&format!("/wallets/{wallet}"), &User::new(role))
            .await;
        api.ok(&format!("/wallets/{wallet}/entries"), &User::new(role))
            .await;
    }
    for role in ["buyer", "seller", "operator"] {
        let other = User::new(role);
        for path in [
            format!("/wallets/{wallet}"),
            format!("/wallets/{wallet}/entries"),
        ] {
            let refused = api.get(&path, Some(&other)).await;
            assert_eq!(
                (refused.status, refused.code()),
                (403, "forbidden"),
                "{role} {path}"
            );
        }
    }
    let unknown = api
        .get(&format!("/wallets/{}", Uuid::now_v7()), Some(&owner))
        .await;
    assert_eq!((unknown.status, unknown.code()), (404, "wallet_not_found"));
    let anonymous = api.get(&format!("/wallets/{wallet}"), None).await;
    assert_eq!((anonymous.status, anonymous.code()), (401, "unauthorized"));
    api.stop().await;
}

#[tokio::test]
async fn wallet_entries_come_newest_first_and_page_without_gaps_or_repeats() {
    let (db, pool) = migrated().await;
    let owner = User::new("seller");
    let wallet = insert_wallet(&pool, owner.id, 0).await;
    for sequence in 1..=23 {
        insert_wallet_entry(&pool, wallet, sequence).await;
    }
    let api = spawn_query_api(&db).await;
    let sequences = walk(
        &api,
        &format!("/wallets/{wallet}/entries"),
        &owner,
        5,
        "sequence",
    )
    .await;
    let expected: Vec<Value> = (1..=23).rev().map(|sequence| json!(sequence)).collect();
    assert_eq!(sequences, expected);
    let first = api
        .ok(&format!("/wallets/{wallet}/entries?limit=1"), &owner)
        .await;
    assert_eq!(first["items"][0]["available"], 2_300);
    assert_eq!(first["items"][0]["kind"], "FundsDeposited");
    assert_eq!(first["items"][0]["reference"], "top-up");
    api.stop().await;
}

// ----------------------------------------------------------------- listings

#[tokio::test]
async fn listing_pages_walk_every_row_exactly_once_newest_first() {
    let (db, pool) = migrated().await;
    let seller = User::new("seller");
    let mut created = Vec::new();
    for _ in 0..47 {
        created.push(insert_listing(&pool, seller.id, json!({})).await);
    }
    let api = spawn_query_api(&db).await;
    for limit in [1, 10, 47, 100] {
        let ids = walk(&api, "/listings", &User::new("buyer"), limit, "id").await;
        let expected: Vec<Value> = created
            .iter()
            .rev()
            .map(|id| json!(id.to_string()))
            .collect();
        assert_eq!(ids, expected, "limit {limit}");
    }
    let default_page = api.ok("/listings", &User::new("buyer")).await;
    assert_eq!(default_page["items"].as_array().unwrap().len(), 20);
    api.stop().await;
}

#[tokio::test]
async fn listing_filters_combine_and_deleted_listings_stay_hidden() {
    let (db, pool) = migrated().await;
    let seller = User::new("seller");
    let other_seller = User::new("seller");
    let cheap_phone = insert_listing(
        &pool,
        seller.id,
        json!({"category": "phones", "condition": "like_new", "price": 500}),
    )
    .await;
    let dear_phone = insert_listing(
        &pool,
        seller.id,
        json!({"category": "phones", "condition": "good", "price": 90_000}),
    )
    .await;
    let usd_lamp = insert_listing(&pool, other_seller.id, json!({"currency": "USD"})).await;
    let paused = insert_listing(&pool, other_seller.id, json!({"status": "paused"})).await;
    let deleted = insert_listing(&pool, seller.id, json!({"status": "deleted"})).await;
    let api = spawn_query_api(&db).await;
    let buyer = User::new("buyer");

    let ids = |page: Value| -> HashSet<String> {
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|item| item["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let set = |ids: &[Uuid]| -> HashSet<String> { ids.iter().map(Uuid::to_string).collect() };

    assert_eq!(
        ids(api.ok("/listings", &buyer).await),
        set(&[cheap_phone, dear_phone, usd_lamp, paused]),
        "deleted listings are left out"
    );
    assert_eq!(
        ids(api.ok("/listings?category=phones", &buyer).await),
        set(&[cheap_phone, dear_phone])
    );
    assert_eq!(
        ids(api
            .ok("/listings?category=phones&condition=good", &buyer)
            .await),
        set(&[dear_phone])
    );
    assert_eq!(
        ids(api
            .ok("/listings?min_price=600&max_price=90000", &buyer)
            .await),
        set(&[dear_phone, usd_lamp, paused])
    );
    assert_eq!(
        ids(api
            .ok("/listings?max_price=1000&currency=EUR", &buyer)
            .await),
        set(&[cheap_phone, paused])
    );
    assert_eq!(
        ids(api
            .ok(&format!("/listings?seller_id={}", other_seller.id), &buyer)
            .await),
        set(&[usd_lamp, paused])
    );
    assert_eq!(
        ids(api.ok("/listings?status=paused", &buyer).await),
        set(&[paused])
    );

    let refused = api.get("/listings?status=deleted", Some(&buyer)).await;
    assert_eq!((refused.status, refused.code()), (403, "forbidden"));
    assert_eq!(
        ids(api
            .ok(
                &format!("/listings?status=deleted&seller_id={}", seller.id),
                &seller
            )
            .await),
        set(&[deleted])
    );
    assert_eq!(
        ids(api
            .ok("/listings?status=deleted", &User::new("admin"))
            .await),
        set(&[deleted])
    );
    api.stop().await;
}

#[tokio::test]
async fn a_listing_shows_its_available_stock_and_a_deleted_one_only_to_its_seller() {
    let (db, pool) = migrated().await;
    let seller = User::new("seller");
    let listing = insert_listing(&pool, seller.id, json!({})).await;
    let deleted = insert_listing(&pool, seller.id, json!({"status": "deleted"})).await;
    let api = spawn_query_api(&db).await;
    let buyer = User::new("buyer");

    let seen = api.ok(&format!("/listings/{listing}"), &buyer).await;
    assert_eq!(
        (&seen["stock"], &seen["held"], &seen["available"]),
        (&json!(5), &json!(2), &json!(3))
    );
    assert_eq!(seen["price"], json!({"amount": 1_000, "currency": "EUR"}));
    assert_eq!(seen["location"]["city"], "Lyon");
    assert_eq!(seen["location"]["lat"], Value::Null);
    assert_eq!(seen["attributes"], json!({"colour": "gold"}));
    assert_eq!(seen["seller_id"], seller.id.to_string());

    let hidden = api.get(&format!("/listings/{deleted}"), Some(&buyer)).await;
    assert_eq!((hidden.status, hidden.code()), (404, "listing_not_found"));
    assert_eq!(
        api.ok(&format!("/listings/{deleted}"), &seller).await["status"],
        "deleted"
    );
    api.ok(&format!("/listings/{deleted}"), &User::new("auditor"))
        .await;
    api.stop().await;
}

// ------------------------------------------------------------------- orders

#[tokio::test]
async fn an_order_is_seen_by_its_buyer_its_seller_admins_and_auditors_only() {
    let (db, pool) = migrated().await;
    let buyer = User::new("buyer");
    let seller = User::new("seller");
    let order = insert_order(&pool, buyer.id, seller.id).await;
    let api = spawn_query_api(&db).await;
    let path = format!("/orders/{order}");

    for user in [&buyer, &seller, &User::new("admin"), &User::new("auditor")] {
        let seen = api.ok(&path, user).await;
        assert_eq!(seen["id"], order.to_string());
        assert_eq!(seen["status"], "confirmed");
        assert_eq!(seen["total"], json!({"amount": 2_500, "currency": "EUR"}));
        assert_eq!(seen["lines"][0]["quantity"], 1);
        assert_eq!(seen["review"], Value::Null);
    }
    for role in ["buyer", "seller", "operator"] {
        let refused = api.get(&path, Some(&User::new(role))).await;
        assert_eq!(
            (refused.status, refused.code()),
            (403, "forbidden"),
            "{role}"
        );
    }
    let unknown = api
        .get(&format!("/orders/{}", Uuid::now_v7()), Some(&buyer))
        .await;
    assert_eq!((unknown.status, unknown.code()), (404, "order_not_found"));
    api.stop().await;
}

#[tokio::test]
async fn orders_by_role_list_the_callers_own_and_only_admins_and_auditors_name_another_user() {
    let (db, pool) = migrated().await;
    let buyer = User::new("buyer");
    let seller = User::new("seller");
    let stranger = User::new("buyer");
    let mut bought = Vec::new();
    for _ in 0..12 {
        bought.push(insert_order(&pool, buyer.id, seller.id).await);
    }
    let elsewhere = insert_order(&pool, stranger.id, seller.id).await;
    let api = spawn_query_api(&db).await;

    let as_buyer = walk(&api, "/orders?role=buyer", &buyer, 5, "id").await;
    let expected: Vec<Value> = bought
        .iter()
        .rev()
        .map(|id| json!(id.to_string()))
        .collect();
    assert_eq!(as_buyer, expected);
    assert!(
        api.ok("/orders?role=seller", &buyer).await["items"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let as_seller = walk(&api, "/orders?role=seller", &seller, 100, "id").await;
    assert_eq!(as_seller.len(), 13);
    assert!(as_seller.contains(&json!(elsewhere.to_string())));

    let snooping = api
        .get(
            &format!("/orders?role=buyer&user_id={}", buyer.id),
            Some(&stranger),
        )
        .await;
    assert_eq!((snooping.status, snooping.code()), (403, "forbidden"));
    let own = api
        .ok(
            &format!("/orders?role=buyer&user_id={}", stranger.id),
            &stranger,
        )
        .await;
    assert_eq!(own["items"].as_array().unwrap().len(), 1);
    for role in ["admin", "auditor"] {
        let listed = walk(
            &api,
            &format!("/orders?role=buyer&user_id={}", buyer.id),
            &User::new(role),
            100,
            "id",
        )
        .await;
        assert_eq!(listed, expected);
    }
    let no_role = api.get("/orders", Some(&buyer)).await;
    assert_eq!((no_role.status, no_role.code()), (400, "invalid_query"));
    api.stop().await;
}

// ----------------------------------------------------- products and sellers

#[tokio::test]
async fn a_product_timeline_reads_oldest_first_in_pages() {
    let (db, pool) = migrated().await;
    let owner = User::new("seller");
    let product = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO rm_products (product_id, owner_id, entries, updated_at) VALUES ($1, $2, 7, now())",
    )
    .bind(product)
    .bind(owner.id)
    .execute(&pool)
    .await
    .unwrap();
    for sequence in 1..=7_i64 {
        sqlx::query(
            "INSERT INTO rm_timeline (product_id, sequence, kind, data, actor_id, recorded_at)
             VALUES ($1, $2, 'story', jsonb_build_object('title', 'chapter ' || $2), $3, now())",
        )
        .bind(product)
        .bind(sequence)
        .bind(owner.id)
        .execute(&pool)
        .await
        .unwrap();
    }
    let api = spawn_query_api(&db).await;
    let reader = User::new("buyer");
    let first = api
        .ok(&format!("/products/{product}/timeline?limit=3"), &reader)
        .await;
    assert_eq!(first["owner_id"], owner.id.to_string());
    assert_eq!(first["entries"], 7);
    assert_eq!(first["items"][0]["data"]["title"], "chapter 1");
    let sequences = walk(
        &api,
        &format!("/products/{product}/timeline"),
        &reader,
        3,
        "sequence",
    )
    .await;
    assert_eq!(sequences, (1..=7).map(|n| json!(n)).collect::<Vec<_>>());
    let unknown = api
        .get(
            &format!("/products/{}/timeline", Uuid::now_v7()),
            Some(&reader),
        )
        .await;
    assert_eq!((unknown.status, unknown.code()), (404, "product_not_found"));
    api.stop().await;
}

#[tokio::test]
async fn seller_stats_give_rates_averages_and_zeros_for_a_seller_without_orders() {
    let (db, pool) = migrated().await;
    let seller = User::new("seller");
    sqlx::query(
        "INSERT INTO rm_seller_stats (seller_id, orders_placed, orders_confirmed, orders_shipped,
                                      orders_delivered, orders_cancelled, orders_returned,
                                      fulfillment_seconds_sum, rating_sum, rating_count)
         VALUES ($1, 12, 10, 9, 8, 2, 2, 8 * 3600, 18, 4)",
    )
    .bind(seller.id)
    .execute(&pool)
    .await
    .unwrap();
    let api = spawn_query_api(&db).await;
    let reader = User::new("buyer");
    let stats = api
        .ok(&format!("/sellers/{}/stats", seller.id), &reader)
        .await;
    assert_eq!(stats["orders"]["placed"], 12);
    assert_eq!(stats["fulfillment_rate"], 0.8);
    assert_eq!(stats["return_rate"], 0.25);
    assert_eq!(stats["average_fulfillment_seconds"], 3600.0);
    assert_eq!(stats["rating"], json!({"average": 4.5, "count": 4}));

    let newcomer = api
        .ok(&format!("/sellers/{}/stats", Uuid::now_v7()), &reader)
        .await;
    assert_eq!(newcomer["orders"]["placed"], 0);
    assert_eq!(newcomer["fulfillment_rate"], Value::Null);
    assert_eq!(newcomer["rating"], json!({"average": null, "count": 0}));
    api.stop().await;
}

// ------------------------------------------------------------- bad queries

#[tokio::test]
async fn bad_query_strings_are_refused_with_a_code_that_names_the_problem() {
    let (db, pool) = migrated().await;
    let owner = User::new("buyer");
    let wallet = insert_wallet(&pool, owner.id, 0).await;
    let api = spawn_query_api(&db).await;
    let order_cursor = format!("4f{}", "00".repeat(16));
    let cases: Vec<(String, &str)> = vec![
        ("/listings?limt=5".into(), "invalid_query"),
        ("/listings?limit=5&limit=6".into(), "invalid_query"),
        (format!("/wallets/{wallet}?limit=5"), "invalid_query"),
        ("/listings?limit=0".into(), "invalid_limit"),
        ("/listings?limit=101".into(), "invalid_limit"),
        ("/listings?limit=ten".into(), "invalid_limit"),
        ("/listings?cursor=not-hex".into(), "invalid_cursor"),
        (format!("/listings?cursor={order_cursor}"), "invalid_cursor"),
        (
            format!("/wallets/{wallet}/entries?cursor=zz"),
            "invalid_cursor",
        ),
        ("/listings?after=123".into(), "invalid_position"),
        (
            format!("/listings?after={}", "f".repeat(32)),
            "invalid_position",
        ),
        ("/listings?seller_id=bob".into(), "invalid_parameter"),
        ("/listings?condition=mint".into(), "invalid_parameter"),
        ("/listings?status=gone".into(), "invalid_parameter"),
        ("/listings?currency=EURO".into(), "invalid_parameter"),
        ("/listings?category=%20%20".into(), "invalid_parameter"),
        (
            format!("/listings?category={}", "x".repeat(65)),
            "invalid_parameter",
        ),
        ("/listings?min_price=-1".into(), "invalid_parameter"),
        (
            "/listings?min_price=10&max_price=5".into(),
            "invalid_parameter",
        ),
        ("/orders?role=owner".into(), "invalid_parameter"),
        ("/wallets/not-a-uuid".into(), "invalid_id"),
        ("/projections?limit=1".into(), "invalid_query"),
    ];
    for (path, code) in cases {
        let refused = api.get(&path, Some(&owner)).await;
        assert_eq!(
            (refused.status, refused.code()),
            (400, code),
            "{path}: {:?}",
            refused.body
        );
    }
    let route = api.get("/nowhere", Some(&owner)).await;
    assert_eq!((route.status, route.code()), (404, "not_found"));
    api.stop().await;
}

// ------------------------------------------------------------ read your writes

/// Sets the caught-up mark of one partition of `projection`.
async fn set_partition_caught_up(pool: &PgPool, projection: &str, partition: u32, to: Position) {
    let updated = sqlx::query(
        "UPDATE projection_checkpoints
            SET caught_up_transaction = $3, caught_up_position = $4, updated_at = now()
          WHERE projection = $1 AND partition = $2",
    )
    .bind(projection)
    .bind(partition as i32)
    .bind(to.transaction_id as i64)
    .bind(to.position)
    .execute(pool)
    .await
    .unwrap();
    assert_eq!(updated.rows_affected(), 1);
}

fn partition_of(id: Uuid) -> u32 {
    event_store::fanout::partition_of(&id.to_string(), PARTITIONS)
}

/// Starts `GET path` as `user` and returns the pending answer.
fn get_later(
    api: &QueryApi,
    path: &str,
    user: &User,
) -> tokio::task::JoinHandle<reqwest::Response> {
    let client = api.client.clone();
    let url = format!("{}{path}", api.address);
    let token = user.token.clone();
    tokio::spawn(async move { client.get(url).bearer_auth(token).send().await.unwrap() })
}

#[tokio::test]
async fn after_on_one_aggregate_waits_for_its_partition_only_then_answers() {
    let (db, pool) = migrated().await;
    let owner = User::new("buyer");
    let wallet = insert_wallet(&pool, owner.id, 700).await;
    let own = partition_of(wallet);
    set_caught_up(&pool, "wallets", PARTITIONS, at(100, 10)).await;
    let api = spawn_query_api_with(&db, |config| config.catch_up_timeout_ms = 30_000).await;

    // Already there: no wait.
    api.ok(
        &format!("/wallets/{wallet}?after={}", at(100, 10).token()),
        &owner,
    )
    .await;

    let target = at(200, 3);
    let waiting = get_later(
        &api,
        &format!("/wallets/{wallet}?after={}", target.token()),
        &owner,
    );
    // Every other partition catches up: the wallet's rows are not theirs.
    for partition in (0..PARTITIONS).filter(|partition| *partition != own) {
        set_partition_caught_up(&pool, "wallets", partition, target).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "it answered before the wallet's partition caught up"
    );

    // The wallet's partition applies an event beyond the position.
    sqlx::query(
        "UPDATE projection_checkpoints SET transaction_id = 201, position = 1
          WHERE projection = 'wallets' AND partition = $1",
    )
    .bind(own as i32)
    .execute(&pool)
    .await
    .unwrap();
    let response = waiting.await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["available"], 700);

    // Another projection's progress does not count.
    let listings = api
        .get(
            &format!("/listings?after={}", at(1, 1).token()),
            Some(&owner),
        )
        .await;
    assert_eq!(
        listings.status, 503,
        "listings has no checkpoint: {:?}",
        listings.body
    );
    api.stop().await;
}

#[tokio::test]
async fn after_on_a_list_waits_until_every_partition_has_caught_up() {
    let (db, pool) = migrated().await;
    let seller = User::new("seller");
    let listing = insert_listing(&pool, seller.id, json!({})).await;
    let own = partition_of(listing);
    set_caught_up(&pool, "listings", PARTITIONS, at(100, 10)).await;
    let api = spawn_query_api_with(&db, |config| config.catch_up_timeout_ms = 30_000).await;

    let target = at(200, 3);
    let list = get_later(
        &api,
        &format!("/listings?after={}", target.token()),
        &seller,
    );
    let one = get_later(
        &api,
        &format!("/listings/{listing}?after={}", target.token()),
        &seller,
    );
    // The listing's own partition catches up: the read of the listing
    // answers, the list still waits for the others.
    set_partition_caught_up(&pool, "listings", own, target).await;
    let response = one.await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["id"], listing.to_string());
    let others: Vec<u32> = (0..PARTITIONS).filter(|p| *p != own).collect();
    for partition in &others[..others.len() - 1] {
        set_partition_caught_up(&pool, "listings", *partition, target).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !list.is_finished(),
        "the list answered before every partition caught up"
    );
    set_partition_caught_up(&pool, "listings", others[others.len() - 1], target).await;
    let response = list.await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["items"].as_array().map(Vec::len), Some(1), "{body}");
    api.stop().await;
}

#[tokio::test]
async fn after_answers_503_not_caught_up_when_the_read_models_stay_behind() {
    let (db, pool) = migrated().await;
    let buyer = User::new("buyer");
    let seller = User::new("seller");
    let order = insert_order(&pool, buyer.id, seller.id).await;
    set_caught_up(&pool, "orders", PARTITIONS, at(50, 5)).await;
    let api = spawn_query_api_with(&db, |config| config.catch_up_timeout_ms = 300).await;

    let behind = api
        .get(
            &format!("/orders/{order}?after={}", at(50, 6).token()),
            Some(&buyer),
        )
        .await;
    assert_eq!((behind.status, behind.code()), (503, "not_caught_up"));
    assert_eq!(
        behind
            .headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    // A partition without any checkpoint has applied nothing.
    sqlx::query("DELETE FROM projection_checkpoints WHERE partition = $1")
        .bind(partition_of(order) as i32)
        .execute(&pool)
        .await
        .unwrap();
    let missing = api
        .get(
            &format!("/orders/{order}?after={}", at(1, 1).token()),
            Some(&buyer),
        )
        .await;
    assert_eq!((missing.status, missing.code()), (503, "not_caught_up"));
    api.stop().await;
}

// -------------------------------------------------------------- projections

#[tokio::test]
async fn projections_report_checkpoints_lag_dead_letters_and_the_relay() {
    let stream = format!("souk_test_{}", Uuid::new_v4().simple());
    // Events to lag behind, written through the command API (no relay: the
    // lag is what this test is about).
    let app = spawn_app_on(TestDb::empty().await, |config| config.relay = false).await;
    let owner = User::new("buyer");
    let wallet = app.funded_wallet(&owner, "EUR", 900).await;
    let pool = app.db.pool().await;
    let stream_name = stream.clone();
    let api = spawn_query_api_with(&app.db, move |config| config.stream = stream_name).await;
    let operator = User::new("operator");

    // Nothing applied yet: the wallet's two events lag in its partition.
    let report = api.ok("/projections", &operator).await;
    assert_eq!(report["partitions"], PARTITIONS);
    assert_eq!(report["relay"], Value::Null);
    let names: Vec<&str> = report["projections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|projection| projection["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["listings", "orders", "wallets", "timelines"]);
    let wallets = &report["projections"][2];
    assert_eq!(wallets["lag_events"], 2);
    assert_eq!(wallets["lag_events_capped"], false);
    assert_eq!(wallets["caught_up_to"], Value::Null);
    assert!(wallets["lag_seconds"].as_f64().unwrap() >= 0.0);
    let partition = event_store::fanout::partition_of(&wallet.to_string(), PARTITIONS) as usize;
    assert_eq!(wallets["partitions"][partition]["lag_events"], 2);
    assert_eq!(
        wallets["partitions"].as_array().unwrap().len(),
        PARTITIONS as usize
    );
    assert_eq!(report["projections"][0]["lag_events"], 0);

    // Caught up, a dead letter parked, the relay part way.
    let (transaction_id, position): (i64, i64) = sqlx::query_as(
        "SELECT transaction_id::text::bigint, position FROM events ORDER BY transaction_id, position",
    )
    .fetch_all(&pool)
    .await
    .unwrap()
    .into_iter()
    .next_back()
    .unwrap();
    let last = at(transaction_id as u64, position);
    set_caught_up(&pool, "wallets", PARTITIONS, last).await;
    sqlx::query(
        "INSERT INTO dead_letters (projection, partition, event_id, aggregate_type, aggregate_id,
                                   sequence, event_type, transaction_id, position, error, envelope)
         VALUES ('wallets', 0, $1, 'Wallet', 'x', 1, 'FundsDeposited', 1, 1, 'boom', '{}')",
    )
    .bind(Uuid::now_v7())
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO relay_checkpoints (stream, transaction_id, position, published)
         VALUES ($1, 0, 0, 0)",
    )
    .bind(&stream)
    .execute(&pool)
    .await
    .unwrap();
    let report = api.ok("/projections", &User::new("auditor")).await;
    let wallets = &report["projections"][2];
    assert_eq!(wallets["lag_events"], 0);
    assert_eq!(wallets["lag_seconds"], 0.0);
    assert_eq!(wallets["dead_letters"], 1);
    assert_eq!(wallets["caught_up_to"], last.token());
    assert_eq!(wallets["partitions"][0]["caught_up_to"], last.token());
    assert_eq!(report["relay"]["stream"], stream);
    assert_eq!(report["relay"]["lag_events"], 2);

    api.ok("/projections", &User::new("admin")).await;
    let refused = api.get("/projections", Some(&owner)).await;
    assert_eq!((refused.status, refused.code()), (403, "forbidden"));
    api.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn health_metrics_and_the_openapi_document_need_no_token_and_name_every_route() {
    let (db, _pool) = migrated().await;
    let api = spawn_query_api(&db).await;
    let health = api.get("/health", None).await;
    assert_eq!(health.status, 200);
    assert_eq!(health.body["database"], "up");
    assert_eq!(api.get("/metrics", None).await.status, 200);
    let document = api.get("/openapi.json", None).await;
    assert_eq!(document.status, 200);
    assert_eq!(document.body["openapi"], "3.1.0");
    for path in [
        "/wallets/{id}",
        "/wallets/{id}/entries",
        "/listings",
        "/listings/{id}",
        "/orders",
        "/orders/{id}",
        "/products/{id}/timeline",
        "/sellers/{id}/stats",
        "/projections",
        "/notifications/stream",
        "/health",
        "/metrics",
        "/openapi.json",
    ] {
        assert!(document.body["paths"][path]["get"].is_object(), "{path}");
    }
    let post = api
        .client
        .post(format!("{}/listings", api.address))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status().as_u16(), 405);
    api.stop().await;
}

#[tokio::test]
async fn notification_streams_are_limited_per_user_and_end_at_shutdown() {
    let (db, _pool) = migrated().await;
    let api = spawn_query_api_with(&db, |config| config.max_streams_per_user = 1).await;
    let user = User::new("buyer");
    let first = api.events(&user).await;
    let second = api.get("/notifications/stream", Some(&user)).await;
    assert_eq!((second.status, second.code()), (503, "unavailable"));
    // Another user has streams of their own.
    let other = api.events(&User::new("seller")).await;
    let anonymous = api.get("/notifications/stream", None).await;
    assert_eq!(anonymous.status, 401);
    // Open streams do not hold the shutdown back.
    tokio::time::timeout(Duration::from_secs(10), api.stop())
        .await
        .expect("the query API stops with streams open");
    drop((first, other));
}

// ------------------------------------------------------------ the full path

/// A command API running its relay on a stream of the test's own, a
/// projector on that stream, and a query API on the same database.
pub(crate) struct FullPath {
    pub(crate) app: TestApp,
    pub(crate) api: QueryApi,
    pub(crate) projector: ProjectorTask,
    /// The search configuration of the projector and the query API.
    pub(crate) search: SearchConfig,
    pub(crate) stream: String,
    _stream: StreamGuard,
}

/// A projector running in the test's runtime; aborted if the test fails.
pub(crate) struct ProjectorTask {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    running: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl ProjectorTask {
    pub(crate) async fn start(database_url: &str, stream: &str, search: &SearchConfig) -> Self {
        let mut config = projections::ProjectorConfig::new(database_url, stream);
        config.search = search.clone();
        config.nats_url = nats_url();
        config.partitions = PARTITIONS;
        config.fetch_wait_ms = 20;
        let projector = projections::build(config)
            .await
            .expect("building the projector");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(projector.run_until(async move {
            let _ = stopped.await;
        }));
        Self {
            stop: Some(stop),
            running: Some(running),
        }
    }

    pub(crate) async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(running) = self.running.take() {
            running
                .await
                .expect("the projector task")
                .expect("the projector stops cleanly");
        }
    }
}

impl Drop for ProjectorTask {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            running.abort();
        }
    }
}

/// A projector on a runtime of its own (see [`FullPath::crashable_projector`]).
pub(crate) struct CrashableProjector(tokio::runtime::Runtime);

impl CrashableProjector {
    /// Drops every task of the projector where it stands, as a killed
    /// process: nothing is flushed, its connections close.
    pub(crate) fn crash(self) {
        self.0.shutdown_background();
    }
}

/// Deletes the test's JetStream stream when dropped, even when the test
/// fails (on a runtime of its own: drop runs inside the test's runtime).
struct StreamGuard(String);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let stream = self.0.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async move {
                let client = async_nats::connect(nats_url()).await.ok()?;
                let _ = async_nats::jetstream::new(client)
                    .delete_stream(&stream)
                    .await;
                Some(())
            })
        })
        .join();
    }
}

impl FullPath {
    /// The full path without search.
    pub(crate) async fn start(catch_up_timeout_ms: u64) -> Self {
        Self::start_with(catch_up_timeout_ms, SearchConfig::off()).await
    }

    /// The full path; the projector feeds and the query API reads `search`.
    pub(crate) async fn start_with(catch_up_timeout_ms: u64, search: SearchConfig) -> Self {
        Self::start_for_origins(catch_up_timeout_ms, search, Vec::new()).await
    }

    /// The full path, both APIs allowing pages of `cors_origins`.
    pub(crate) async fn start_for_origins(
        catch_up_timeout_ms: u64,
        search: SearchConfig,
        cors_origins: Vec<String>,
    ) -> Self {
        let stream = format!("souk_test_{}", Uuid::new_v4().simple());
        let relay_stream = stream.clone();
        let origins = cors_origins.clone();
        let app = spawn_app_on(TestDb::empty().await, move |config| {
            config.stream = relay_stream;
            config.nats_url = nats_url();
            config.relay_poll_ms = 20;
            config.server.cors_origins = origins;
        })
        .await;
        let projector = ProjectorTask::start(&app.db.url, &stream, &search).await;
        let query_stream = stream.clone();
        let query_search = search.clone();
        let api = spawn_query_api_with(&app.db, move |config| {
            config.stream = query_stream;
            config.catch_up_timeout_ms = catch_up_timeout_ms;
            config.search = query_search;
            config.server.cors_origins = cors_origins;
        })
        .await;
        Self {
            app,
            api,
            projector,
            search,
            stream: stream.clone(),
            _stream: StreamGuard(stream),
        }
    }

    /// Stops the projector, runs `while_stopped`, and starts a new one on
    /// the same database, stream and search index.
    pub(crate) async fn restart_projector(&mut self, while_stopped: impl FnOnce()) {
        let stopped = ProjectorTask {
            stop: None,
            running: None,
        };
        std::mem::replace(&mut self.projector, stopped).stop().await;
        while_stopped();
        self.projector = ProjectorTask::start(&self.app.db.url, &self.stream, &self.search).await;
    }

    /// Stops the projector (cleanly).
    pub(crate) async fn stop_projector(&mut self) {
        let stopped = ProjectorTask {
            stop: None,
            running: None,
        };
        std::mem::replace(&mut self.projector, stopped).stop().await;
    }

    /// Stops the projector and starts one on a runtime of its own, which
    /// [`CrashableProjector::crash`] kills with all its tasks at once.
    pub(crate) async fn crashable_projector(&mut self) -> CrashableProjector {
        self.stop_projector().await;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime for the projector");
        let (url, stream, search) = (
            self.app.db.url.clone(),
            self.stream.clone(),
            self.search.clone(),
        );
        runtime.spawn(async move {
            let _projector = ProjectorTask::start(&url, &stream, &search).await;
            std::future::pending::<()>().await;
        });
        CrashableProjector(runtime)
    }

    /// Starts a projector on the test's database, stream and search index.
    pub(crate) async fn start_projector(&mut self) {
        self.projector = ProjectorTask::start(&self.app.db.url, &self.stream, &self.search).await;
    }

    /// Waits (bounded) until the query API's notification consumer reads
    /// the stream, which the relay creates when it starts.
    pub(crate) async fn wait_notifications_live(&self) {
        let started = Instant::now();
        while self.api.get("/health", None).await.body["notifications"] != "live" {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the notification consumer never went live"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(crate) async fn stop(self) {
        self.api.stop().await;
        self.projector.stop().await;
        self.app.stop().await;
    }
}

pub(crate) fn position_of(answer: &Answer) -> String {
    answer.body["position"]
        .as_str()
        .unwrap_or_else(|| panic!("no position in {} {}", answer.status, answer.body))
        .to_owned()
}

#[tokio::test]
async fn read_your_writes_holds_for_1000_sequential_command_then_query_pairs() {
    let full = FullPath::start(30_000).await;
    let (app, api) = (&full.app, &full.api);
    let owner = User::new("seller");
    let admin = User::new("admin");
    let wallet = app.funded_wallet(&owner, "EUR", 0).await;
    let listing = app.listing(&owner, 1_000, 1, None).await;

    let mut balance = 0_i64;
    for pair in 0..1_000_i64 {
        if pair % 2 == 0 {
            // A wallet write, then a wallet read.
            let amount = pair + 1;
            let deposited = app
                .post(
                    &format!("/wallets/{wallet}/deposits"),
                    Some(&admin),
                    &json!({"amount": {"amount": amount, "currency": "EUR"}, "reference": format!("d{pair}")}),
                )
                .await;
            assert_eq!(deposited.status, 200, "{:?}", deposited.body);
            balance += amount;
            let seen = api
                .ok(
                    &format!("/wallets/{wallet}?after={}", position_of(&deposited)),
                    &owner,
                )
                .await;
            assert_eq!(seen["available"], balance, "pair {pair}");
            assert_eq!(seen["version"], deposited.body["version"], "pair {pair}");
        } else {
            // A listing write, then a listing read.
            let price = 2_000 + pair;
            let changed = app
                .post(
                    &format!("/listings/{listing}/price"),
                    Some(&owner),
                    &json!({"price": {"amount": price, "currency": "EUR"}}),
                )
                .await;
            assert_eq!(changed.status, 200, "{:?}", changed.body);
            let seen = api
                .ok(
                    &format!("/listings/{listing}?after={}", position_of(&changed)),
                    &User::new("buyer"),
                )
                .await;
            assert_eq!(seen["price"]["amount"], price, "pair {pair}");
        }
    }
    full.stop().await;
}

#[tokio::test]
async fn notifications_reach_the_buyer_and_the_seller_of_an_order_and_nobody_else() {
    let full = FullPath::start(30_000).await;
    full.wait_notifications_live().await;
    let (app, api) = (&full.app, &full.api);
    let seller = User::new("seller");
    let seller_wallet = app.funded_wallet(&seller, "EUR", 0).await;
    let listing = app.listing(&seller, 2_500, 3, Some(seller_wallet)).await;
    let buyer = User::new("buyer");
    let buyer_wallet = app.funded_wallet(&buyer, "EUR", 10_000).await;
    let bystander = User::new("buyer");

    let wait = Duration::from_secs(30);
    let mut buyer_events = api.events(&buyer).await;
    let mut seller_events = api.events(&seller).await;
    let mut bystander_events = api.events(&bystander).await;
    for events in [&mut buyer_events, &mut seller_events, &mut bystander_events] {
        events.expect("ready", wait).await;
    }

    let placed = app
        .post(
            "/orders",
            Some(&buyer),
            &json!({
                "lines": [{"listing_id": listing, "quantity": 2}],
                "shipping_address": {"name": "Ana Ruiz", "line1": "3 rue Mercière", "city": "Lyon", "postal_code": "69002", "country": "FR"},
                "payment_method": "wallet_escrow",
                "wallet_id": buyer_wallet,
            }),
        )
        .await;
    assert_eq!(placed.status, 201, "{:?}", placed.body);
    let order = placed.id().to_string();

    // The buyer: the order placed, then confirmed, and the funds held.
    let mut statuses = Vec::new();
    let mut held = None;
    while statuses.len() < 2 || held.is_none() {
        let (event, data) = buyer_events
            .next(wait)
            .await
            .expect("the buyer's notifications");
        match event.as_str() {
            "order_status" => {
                assert_eq!(
                    (&data["order_id"], &data["role"]),
                    (&json!(order), &json!("buyer"))
                );
                statuses.push(data["status"].as_str().unwrap().to_owned());
            }
            "funds_held" => held = Some(data),
            other => panic!("unexpected {other} {data}"),
        }
    }
    assert_eq!(statuses, ["placed", "confirmed"]);
    let held = held.unwrap();
    assert_eq!(held["wallet_id"], buyer_wallet.to_string());
    assert_eq!(
        (&held["amount"], &held["currency"]),
        (&json!(5_000), &json!("EUR"))
    );

    // The seller: the same order changes, and the escrow it will receive.
    let mut statuses = Vec::new();
    let mut incoming = None;
    while statuses.len() < 2 || incoming.is_none() {
        let (event, data) = seller_events
            .next(wait)
            .await
            .expect("the seller's notifications");
        match event.as_str() {
            "order_status" => {
                assert_eq!(data["role"], "seller");
                statuses.push(data["status"].as_str().unwrap().to_owned());
            }
            "funds_held" => incoming = Some(data),
            other => panic!("unexpected {other} {data}"),
        }
    }
    assert_eq!(statuses, ["placed", "confirmed"]);
    assert_eq!(incoming.unwrap()["wallet_id"], seller_wallet.to_string());

    // Shipped and delivered: both hear it, and the escrow is released.
    let shipped = app
        .post(
            &format!("/orders/{order}/ship"),
            Some(&seller),
            &json!({"carrier": "La Poste", "tracking_number": "LP123"}),
        )
        .await;
    assert_eq!(shipped.status, 200, "{:?}", shipped.body);
    let delivered = app
        .post_raw(&format!("/orders/{order}/deliver"), Some(&buyer), None, &[])
        .await;
    assert_eq!(delivered.status, 200, "{:?}", delivered.body);
    for (events, wallet) in [
        (&mut buyer_events, buyer_wallet),
        (&mut seller_events, seller_wallet),
    ] {
        let released = events.expect("funds_released", wait).await;
        assert_eq!(released["wallet_id"], wallet.to_string());
        assert_eq!(released["amount"], 5_000);
    }

    // The bystander heard none of it.
    assert_eq!(
        bystander_events.next(Duration::from_millis(500)).await,
        None
    );
    drop((buyer_events, seller_events, bystander_events));
    full.stop().await;
}
