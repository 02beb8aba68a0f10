//! Orders end to end: checkout (escrow, bank transfer, cash on delivery,
//! several sellers), shipping, delivery paying the seller, cancellation,
//! returns and refunds, reviews, and the durable timers.

use std::time::{Duration, Instant};

use domain::Decide;
use domain::reservation::Reservation;
use domain::wallet::Wallet;
use serde_json::{Value, json};
use tests::{TestApp, User, spawn_app};
use uuid::Uuid;

fn address() -> Value {
    json!({"name": "Ana Ruiz", "line1": "3 rue Mercière", "city": "Lyon", "postal_code": "69002", "country": "FR"})
}

async fn wallet(app: &TestApp, id: Uuid) -> Wallet {
    event_store::EventStore::new(app.db.pool().await, Default::default())
        .load::<Wallet>(&id.to_string())
        .await
        .unwrap()
        .0
}

async fn stock_pool(app: &TestApp, listing: Uuid) -> Reservation {
    event_store::EventStore::new(app.db.pool().await, Default::default())
        .load::<Reservation>(&listing.to_string())
        .await
        .unwrap()
        .0
}

async fn event_types(app: &TestApp, aggregate_type: &str, id: Uuid) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT event_type FROM events WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY sequence",
    )
    .bind(aggregate_type)
    .bind(id.to_string())
    .fetch_all(&app.db.pool().await)
    .await
    .unwrap()
}

/// A seller with a payout wallet and a listing, and a funded buyer.
struct Market {
    seller: User,
    seller_wallet: Uuid,
    listing: Uuid,
    buyer: User,
    buyer_wallet: Uuid,
}

async fn market(app: &TestApp, price: i64, stock: u32, funds: i64) -> Market {
    let seller = User::new("seller");
    let seller_wallet = app.funded_wallet(&seller, "EUR", 0).await;
    let listing = app
        .listing(&seller, price, stock, Some(seller_wallet))
        .await;
    let buyer = User::new("buyer");
    let buyer_wallet = app.funded_wallet(&buyer, "EUR", funds).await;
    Market {
        seller,
        seller_wallet,
        listing,
        buyer,
        buyer_wallet,
    }
}

async fn checkout(app: &TestApp, m: &Market, quantity: u32, method: &str) -> tests::Answer {
    app.post(
        "/orders",
        Some(&m.buyer),
        &json!({
            "lines": [{"listing_id": m.listing, "quantity": quantity}],
            "shipping_address": address(),
            "payment_method": method,
            "wallet_id": m.buyer_wallet,
        }),
    )
    .await
}

#[tokio::test]
async fn an_escrow_checkout_holds_funds_and_delivery_pays_the_seller() {
    let app = spawn_app().await;
    let m = market(&app, 2_500, 3, 10_000).await;

    let seller_events = event_types(&app, "Wallet", m.seller_wallet).await;
    let placed = checkout(&app, &m, 2, "wallet_escrow").await;
    assert_eq!(placed.status, 201, "{:?}", placed.body);
    assert_eq!(placed.body["orders"][0]["status"], "confirmed");
    let order = placed.id();
    let buyer = wallet(&app, m.buyer_wallet).await;
    assert_eq!((buyer.available(), buyer.held()), (5_000, 5_000));
    assert_eq!(
        buyer
            .holds()
            .values()
            .next()
            .map(|hold| hold.payee_wallet.as_uuid()),
        Some(m.seller_wallet),
        "the hold names the seller's wallet"
    );
    assert_eq!(
        event_types(&app, "Wallet", m.seller_wallet).await,
        seller_events,
        "a checkout does not write the seller's wallet"
    );
    let pool = stock_pool(&app, m.listing).await;
    assert_eq!((pool.stock(), pool.available()), (3, 1));

    // Only its seller ships it.
    let by_buyer = app
        .post(
            &format!("/orders/{order}/ship"),
            Some(&m.buyer),
            &json!({"carrier": "La Poste", "tracking_number": "LP123"}),
        )
        .await;
    assert_eq!((by_buyer.status, by_buyer.code()), (403, "forbidden"));
    let shipped = app
        .post(
            &format!("/orders/{order}/ship"),
            Some(&m.seller),
            &json!({"carrier": "La Poste", "tracking_number": "LP123"}),
        )
        .await;
    assert_eq!(shipped.status, 200, "{:?}", shipped.body);
    let pool = stock_pool(&app, m.listing).await;
    assert_eq!(
        (pool.stock(), pool.held(), pool.available()),
        (1, 0, 1),
        "the items are sold"
    );
    let timers: i64 =
        sqlx::query_scalar("SELECT count(*) FROM timers WHERE kind = 'escrow_auto_release'")
            .fetch_one(&app.db.pool().await)
            .await
            .unwrap();
    assert_eq!(timers, 1, "the auto-release is armed with the shipment");

    let delivered = app
        .post_raw(
            &format!("/orders/{order}/deliver"),
            Some(&m.buyer),
            None,
            &[],
        )
        .await;
    assert_eq!(delivered.status, 200, "{:?}", delivered.body);
    let buyer = wallet(&app, m.buyer_wallet).await;
    let seller = wallet(&app, m.seller_wallet).await;
    assert_eq!((buyer.available(), buyer.held()), (5_000, 0));
    assert_eq!((seller.available(), seller.pending_incoming()), (5_000, 0));

    let review = json!({"rating": 5, "comment": "As described."});
    let reviewed = app
        .post(&format!("/orders/{order}/review"), Some(&m.buyer), &review)
        .await;
    assert_eq!(reviewed.status, 200, "{:?}", reviewed.body);
    let again = app
        .post(&format!("/orders/{order}/review"), Some(&m.buyer), &review)
        .await;
    assert_eq!((again.status, again.code()), (409, "already_reviewed"));

    assert_eq!(
        event_types(&app, "Order", order).await,
        [
            "OrderPlaced",
            "OrderConfirmed",
            "OrderShipped",
            "OrderDelivered",
            "SellerReviewed"
        ]
    );
    // The product's story: listed, reserved, sold, shipped, delivered.
    let product: String = sqlx::query_scalar(
        "SELECT payload->'ListingCreated'->>'product_id' FROM events WHERE event_type = 'ListingCreated'",
    )
    .fetch_one(&app.db.pool().await)
    .await
    .unwrap();
    let entries: Vec<String> = sqlx::query_scalar(
        "SELECT payload->'EntryRecorded'->'entry'->>'kind' FROM events
          WHERE aggregate_type = 'ProductTimeline' AND aggregate_id = $1 AND event_type = 'EntryRecorded'
          ORDER BY sequence",
    )
    .bind(&product)
    .fetch_all(&app.db.pool().await)
    .await
    .unwrap();
    assert_eq!(
        entries,
        ["listed", "reserved", "sold", "shipped", "delivered"]
    );
}

#[tokio::test]
async fn a_checkout_short_of_funds_is_recorded_as_rejected_and_holds_nothing() {
    let app = spawn_app().await;
    let m = market(&app, 2_500, 3, 1_000).await;
    let placed = checkout(&app, &m, 1, "wallet_escrow").await;
    assert_eq!(placed.status, 201, "{:?}", placed.body);
    assert_eq!(placed.body["orders"][0]["status"], "rejected");
    assert_eq!(placed.body["orders"][0]["reason"], "insufficient_funds");
    assert_eq!(
        event_types(&app, "Order", placed.id()).await,
        ["OrderPlaced", "OrderRejected"]
    );
    let buyer = wallet(&app, m.buyer_wallet).await;
    assert_eq!((buyer.available(), buyer.held()), (1_000, 0));
    assert_eq!(
        stock_pool(&app, m.listing).await.available(),
        3,
        "no stock stays reserved"
    );

    let too_many = checkout(&app, &m, 4, "cod").await;
    assert_eq!(too_many.body["orders"][0]["reason"], "insufficient_stock");
}

#[tokio::test]
async fn a_checkout_across_sellers_makes_one_order_per_seller() {
    let app = spawn_app().await;
    let first = market(&app, 1_000, 5, 50_000).await;
    let second_seller = User::new("seller");
    let second_wallet = app.funded_wallet(&second_seller, "EUR", 0).await;
    let second_listing = app
        .listing(&second_seller, 3_000, 5, Some(second_wallet))
        .await;

    let placed = app
        .post(
            "/orders",
            Some(&first.buyer),
            &json!({
                "lines": [
                    {"listing_id": first.listing, "quantity": 2},
                    {"listing_id": second_listing, "quantity": 1},
                ],
                "shipping_address": address(),
                "payment_method": "wallet_escrow",
                "wallet_id": first.buyer_wallet,
            }),
        )
        .await;
    assert_eq!(placed.status, 201, "{:?}", placed.body);
    let orders = placed.body["orders"].as_array().unwrap();
    assert_eq!(orders.len(), 2);
    assert!(orders.iter().all(|order| order["status"] == "confirmed"));
    let checkout_ids: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT payload->'OrderPlaced'->>'checkout_id' FROM events WHERE event_type = 'OrderPlaced'",
    )
    .fetch_all(&app.db.pool().await)
    .await
    .unwrap();
    assert_eq!(checkout_ids, [placed.body["checkout_id"].as_str().unwrap()]);
    let buyer = wallet(&app, first.buyer_wallet).await;
    assert_eq!(buyer.held(), 2_000 + 3_000);
    let mut payees: Vec<(Uuid, i64)> = buyer
        .holds()
        .values()
        .map(|hold| (hold.payee_wallet.as_uuid(), hold.amount))
        .collect();
    payees.sort_unstable();
    let mut expected = vec![(first.seller_wallet, 2_000), (second_wallet, 3_000)];
    expected.sort_unstable();
    assert_eq!(payees, expected, "one hold per seller, naming its wallet");
}

#[tokio::test]
async fn cancelling_before_shipment_gives_back_stock_and_escrow() {
    let app = spawn_app().await;
    let m = market(&app, 2_000, 2, 5_000).await;
    let order = checkout(&app, &m, 2, "wallet_escrow").await.id();
    let cancelled = app
        .post(
            &format!("/orders/{order}/cancel"),
            Some(&m.buyer),
            &json!({"reason": "changed my mind"}),
        )
        .await;
    assert_eq!(cancelled.status, 200, "{:?}", cancelled.body);
    let buyer = wallet(&app, m.buyer_wallet).await;
    assert_eq!((buyer.available(), buyer.held()), (5_000, 0));
    assert_eq!(wallet(&app, m.seller_wallet).await.pending_incoming(), 0);
    assert_eq!(stock_pool(&app, m.listing).await.available(), 2);
    let ship = app
        .post(
            &format!("/orders/{order}/ship"),
            Some(&m.seller),
            &json!({"carrier": "DHL", "tracking_number": "1"}),
        )
        .await;
    assert_eq!((ship.status, ship.code()), (409, "illegal_transition"));
}

#[tokio::test]
async fn a_returned_order_is_refunded_from_the_sellers_wallet() {
    let app = spawn_app().await;
    let m = market(&app, 4_000, 1, 4_000).await;
    let order = checkout(&app, &m, 1, "wallet_escrow").await.id();
    let ship = json!({"carrier": "UPS", "tracking_number": "1Z"});
    assert_eq!(
        app.post(&format!("/orders/{order}/ship"), Some(&m.seller), &ship)
            .await
            .status,
        200
    );
    assert_eq!(
        app.post_raw(
            &format!("/orders/{order}/deliver"),
            Some(&m.buyer),
            None,
            &[]
        )
        .await
        .status,
        200
    );
    assert_eq!(wallet(&app, m.seller_wallet).await.available(), 4_000);

    let returned = app
        .post(
            &format!("/orders/{order}/return"),
            Some(&m.buyer),
            &json!({"reason": "too small"}),
        )
        .await;
    assert_eq!(returned.status, 200, "{:?}", returned.body);
    let early_refund = app
        .post_raw(
            &format!("/orders/{order}/refund"),
            Some(&m.seller),
            None,
            &[],
        )
        .await;
    assert_eq!(
        (early_refund.status, early_refund.code()),
        (409, "illegal_transition")
    );
    assert_eq!(
        app.post_raw(
            &format!("/orders/{order}/returned"),
            Some(&m.seller),
            None,
            &[]
        )
        .await
        .status,
        200
    );
    let refunded = app
        .post_raw(
            &format!("/orders/{order}/refund"),
            Some(&m.seller),
            None,
            &[],
        )
        .await;
    assert_eq!(refunded.status, 200, "{:?}", refunded.body);
    assert_eq!(wallet(&app, m.buyer_wallet).await.available(), 4_000);
    assert_eq!(wallet(&app, m.seller_wallet).await.available(), 0);
    let twice = app
        .post_raw(
            &format!("/orders/{order}/refund"),
            Some(&m.seller),
            None,
            &[],
        )
        .await;
    assert_eq!((twice.status, twice.code()), (409, "illegal_transition"));
}

#[tokio::test]
async fn a_bank_transfer_waits_for_an_admin_to_confirm_payment() {
    let app = spawn_app().await;
    let m = market(&app, 1_500, 1, 0).await;
    let placed = checkout(&app, &m, 1, "bank_transfer").await;
    assert_eq!(
        placed.body["orders"][0]["status"], "awaiting_payment",
        "{:?}",
        placed.body
    );
    let order = placed.id();
    let ship = json!({"carrier": "UPS", "tracking_number": "1Z"});
    let too_soon = app
        .post(&format!("/orders/{order}/ship"), Some(&m.seller), &ship)
        .await;
    assert_eq!(
        (too_soon.status, too_soon.code()),
        (409, "illegal_transition")
    );
    let payment = json!({"reference": "SEPA-778"});
    let by_buyer = app
        .post(
            &format!("/orders/{order}/confirm-payment"),
            Some(&m.buyer),
            &payment,
        )
        .await;
    assert_eq!((by_buyer.status, by_buyer.code()), (403, "forbidden"));
    let admin = User::new("admin");
    let confirmed = app
        .post(
            &format!("/orders/{order}/confirm-payment"),
            Some(&admin),
            &payment,
        )
        .await;
    assert_eq!(confirmed.status, 200, "{:?}", confirmed.body);
    assert_eq!(
        app.post(&format!("/orders/{order}/ship"), Some(&m.seller), &ship)
            .await
            .status,
        200
    );
    assert_eq!(stock_pool(&app, m.listing).await.stock(), 0);
}

/// Makes every armed timer of `kind` due now, as if its time had come.
async fn make_due(app: &TestApp, kind: &str) {
    sqlx::query("UPDATE timers SET due_at = now() WHERE kind = $1")
        .bind(kind)
        .execute(&app.db.pool().await)
        .await
        .unwrap();
}

/// Waits (bounded) until `check` holds.
async fn eventually<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn an_unpaid_bank_transfer_is_cancelled_by_its_timer() {
    let app = spawn_app().await;
    let m = market(&app, 1_500, 1, 0).await;
    let order = checkout(&app, &m, 1, "bank_transfer").await.id();
    assert_eq!(stock_pool(&app, m.listing).await.available(), 0);
    make_due(&app, "unpaid_order").await;
    eventually("the order is cancelled", || async {
        event_types(&app, "Order", order)
            .await
            .last()
            .map(String::as_str)
            == Some("OrderCancelled")
    })
    .await;
    assert_eq!(stock_pool(&app, m.listing).await.available(), 1);
    eventually("the timer is gone", || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM timers")
            .fetch_one(&app.db.pool().await)
            .await
            .unwrap()
            == 0
    })
    .await;
}

#[tokio::test]
async fn an_expired_reservation_gives_its_stock_back_through_its_timer() {
    let app = spawn_app().await;
    let seller = User::new("seller");
    let listing = app.listing(&seller, 900, 1, None).await;
    let buyer = User::new("buyer");
    let held = app
        .post(
            &format!("/listings/{listing}/reservations"),
            Some(&buyer),
            &json!({"quantity": 1, "ttl_seconds": 1}),
        )
        .await;
    assert_eq!(held.status, 201, "{:?}", held.body);
    assert_eq!(stock_pool(&app, listing).await.available(), 0);
    eventually("the hold expires", || async {
        stock_pool(&app, listing).await.available() == 1
    })
    .await;
    assert_eq!(
        event_types(&app, "Reservation", listing).await,
        ["PoolOpened", "HoldPlaced", "HoldExpired"]
    );
}

#[tokio::test]
async fn an_escrow_timer_that_fires_early_is_kept_for_later() {
    let app = spawn_app().await;
    let m = market(&app, 2_000, 1, 2_000).await;
    let order = checkout(&app, &m, 1, "wallet_escrow").await.id();
    let ship = json!({"carrier": "UPS", "tracking_number": "1Z"});
    assert_eq!(
        app.post(&format!("/orders/{order}/ship"), Some(&m.seller), &ship)
            .await
            .status,
        200
    );
    // Due by the database's clock, but seven days early by the order's.
    make_due(&app, "escrow_auto_release").await;
    eventually("the timer was tried and put back", || async {
        let due_later: Option<bool> = sqlx::query_scalar(
            "SELECT due_at > now() FROM timers WHERE kind = 'escrow_auto_release'",
        )
        .fetch_optional(&app.db.pool().await)
        .await
        .unwrap();
        due_later == Some(true)
    })
    .await;
    assert_eq!(
        wallet(&app, m.buyer_wallet).await.held(),
        2_000,
        "nothing released early"
    );
    assert!(wallet(&app, m.buyer_wallet).await.exists());
}

/// A small deterministic generator: the same mix on every run.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, bound: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 33) % bound as u64) as usize
    }
}

/// Where an order of the mix stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Confirmed,
    Shipped,
    Delivered,
    ReturnRequested,
    Returned,
    Refunded,
    Cancelled,
}

/// One seller, many buyers: bursts of concurrent checkouts, then shipments,
/// deliveries, cancellations and returns picked at random. The seller's
/// wallet is written only when an escrow is captured or a payment given
/// back, and `GET /wallets/{id}` still shows what the seller has and will
/// receive; every buyer's wallet adds up; the read models equal a rebuild
/// and `replay-tool verify` (invariants included) passes.
#[tokio::test]
async fn a_sellers_wallet_and_pending_funds_are_right_after_a_random_mix_of_orders() {
    const BUYERS: usize = 12;
    const FUNDS: i64 = 40_000;
    let full = crate::query_api::FullPath::start(30_000).await;
    let app = &full.app;
    let seller = User::new("seller");
    let seller_wallet = app.funded_wallet(&seller, "EUR", 0).await;
    let mut listings = Vec::new();
    for price in [1_000, 1_500, 2_500, 4_000] {
        let listing = app.listing(&seller, price, 30, Some(seller_wallet)).await;
        listings.push((listing, price));
    }
    let mut buyers = Vec::new();
    for _ in 0..BUYERS {
        let buyer = User::new("buyer");
        let wallet = app.funded_wallet(&buyer, "EUR", FUNDS).await;
        buyers.push((buyer, wallet));
    }
    let seller_events = event_types(app, "Wallet", seller_wallet).await;

    // (order, buyer, amount, step)
    let mut orders: Vec<(Uuid, usize, i64, Step)> = Vec::new();
    let mut random = Lcg(20_261_206);
    let mut position = String::new();
    for _ in 0..8 {
        let carts: Vec<(usize, usize, u32)> = (0..8)
            .map(|_| {
                let quantity = 1 + random.next(2) as u32;
                (random.next(BUYERS), random.next(listings.len()), quantity)
            })
            .collect();
        let answers = futures::future::join_all(carts.iter().map(|&(buyer, listing, quantity)| {
            let (user, wallet) = &buyers[buyer];
            let body = json!({
                "lines": [{"listing_id": listings[listing].0, "quantity": quantity}],
                "shipping_address": address(),
                "payment_method": "wallet_escrow",
                "wallet_id": wallet,
            });
            async move { app.post("/orders", Some(user), &body).await }
        }))
        .await;
        for ((buyer, listing, quantity), answer) in carts.into_iter().zip(answers) {
            assert_eq!(answer.status, 201, "{:?}", answer.body);
            let order = &answer.body["orders"][0];
            if order["status"] == "confirmed" {
                let amount = listings[listing].1 * i64::from(quantity);
                orders.push((answer.id(), buyer, amount, Step::Confirmed));
            } else {
                assert_eq!(order["reason"], "insufficient_funds", "{order}");
            }
            position = answer.body["position"].as_str().unwrap().to_owned();
        }
        for _ in 0..12 {
            let index = random.next(orders.len());
            let (order, buyer, _, step) = orders[index];
            let buyer = &buyers[buyer].0;
            let cancel = random.next(3) == 0;
            let (path, who, next) = match step {
                Step::Confirmed if cancel => ("cancel", buyer, Step::Cancelled),
                Step::Confirmed => ("ship", &seller, Step::Shipped),
                Step::Shipped => ("deliver", buyer, Step::Delivered),
                Step::Delivered if cancel => ("return", buyer, Step::ReturnRequested),
                Step::ReturnRequested => ("returned", &seller, Step::Returned),
                Step::Returned => ("refund", &seller, Step::Refunded),
                Step::Delivered | Step::Refunded | Step::Cancelled => continue,
            };
            let body = match path {
                "cancel" | "return" => Some(json!({"reason": "changed my mind"})),
                "ship" => Some(json!({"carrier": "UPS", "tracking_number": "1Z"})),
                _ => None,
            };
            let path = format!("/orders/{order}/{path}");
            let answer = match body {
                Some(body) => app.post(&path, Some(who), &body).await,
                None => app.post_raw(&path, Some(who), None, &[]).await,
            };
            assert_eq!(answer.status, 200, "{path}: {:?}", answer.body);
            position = answer.body["position"].as_str().unwrap().to_owned();
            orders[index].3 = next;
        }
    }
    let count = |wanted: &[Step]| orders.iter().filter(|o| wanted.contains(&o.3)).count();
    assert!(count(&[Step::Confirmed, Step::Shipped]) > 0, "{orders:?}");
    assert!(count(&[Step::Delivered]) > 0 && count(&[Step::Cancelled]) > 0);
    assert!(count(&[Step::Refunded, Step::Returned, Step::ReturnRequested]) > 0);

    let sum = |buyer: Option<usize>, steps: &[Step]| -> i64 {
        orders
            .iter()
            .filter(|(_, b, _, step)| {
                buyer.is_none_or(|wanted| *b == wanted) && steps.contains(step)
            })
            .map(|(_, _, amount, _)| amount)
            .sum()
    };
    let in_escrow = [Step::Confirmed, Step::Shipped];
    let paid = [Step::Delivered, Step::ReturnRequested, Step::Returned];
    let api = &full.api;
    let seen = api
        .ok(
            &format!("/wallets/{seller_wallet}?after={position}"),
            &seller,
        )
        .await;
    assert_eq!(
        (&seen["available"], &seen["held"], &seen["pending_incoming"]),
        (
            &json!(sum(None, &paid)),
            &json!(0),
            &json!(sum(None, &in_escrow))
        ),
        "{seen}"
    );
    let mut in_wallets = seen["available"].as_i64().unwrap();
    for (index, (buyer, wallet)) in buyers.iter().enumerate() {
        let seen = api
            .ok(&format!("/wallets/{wallet}?after={position}"), buyer)
            .await;
        let held = sum(Some(index), &in_escrow);
        let spent = sum(Some(index), &paid);
        assert_eq!(
            (&seen["available"], &seen["held"], &seen["pending_incoming"]),
            (&json!(FUNDS - held - spent), &json!(held), &json!(0)),
            "buyer {index}: {seen}"
        );
        in_wallets += seen["available"].as_i64().unwrap() + held;
    }
    assert_eq!(in_wallets, FUNDS * BUYERS as i64, "money is conserved");

    // The seller's wallet was written by captures and refunds only.
    let written = event_types(app, "Wallet", seller_wallet).await;
    let mut by_kind = std::collections::BTreeMap::new();
    for kind in &written[seller_events.len()..] {
        *by_kind.entry(kind.as_str()).or_insert(0usize) += 1;
    }
    let expected: std::collections::BTreeMap<&str, usize> = [
        ("EscrowReceived", count(&paid) + count(&[Step::Refunded])),
        ("PaymentReturned", count(&[Step::Refunded])),
    ]
    .into_iter()
    .filter(|(_, n)| *n > 0)
    .collect();
    assert_eq!(by_kind, expected);
    let stored = wallet(app, seller_wallet).await;
    assert_eq!((stored.pending_incoming(), stored.incoming().len()), (0, 0));

    let pool = app.db.pool().await;
    let partitions = event_store::fanout::DEFAULT_PARTITIONS;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !tests::projections_caught_up(&pool, partitions).await {
        assert!(Instant::now() < deadline, "the projections catch up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tests::assert_read_models_exact(&pool, partitions).await;
    let verified = tests::run_replay_tool(&app.db.url, &["verify", "--json"]).await;
    assert_eq!(verified.code, Some(0), "{verified:?}");
    assert_eq!(verified.json()["invariants_checked"], true);
    full.stop().await;
}
