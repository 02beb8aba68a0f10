//! The journeys end to end: the README demo (reserve the last unit, then
//! buy it with that hold), releasing holds, holds that cannot be used, and
//! orders that finish by themselves (ship-by, escrow release racing the
//! buyer's confirmation, the return window), with short clocks.

use std::time::{Duration, Instant};

use chrono::TimeDelta;
use domain::order::{Order, OrderStatus};
use domain::reservation::Reservation;
use domain::wallet::Wallet;
use domain::{Aggregate, Decide};
use serde_json::{Value, json};
use tests::{TestApp, TestDb, User, spawn_app, spawn_app_on};
use uuid::Uuid;

async fn state<A: Decide>(app: &TestApp, id: Uuid) -> A {
    event_store::EventStore::new(app.db.pool().await, Default::default())
        .load::<A>(&id.to_string())
        .await
        .unwrap()
        .0
}

async fn count_events(app: &TestApp, aggregate: &str, id: Uuid, event_type: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_type = $1 AND aggregate_id = $2 AND event_type = $3",
    )
    .bind(aggregate)
    .bind(id.to_string())
    .bind(event_type)
    .fetch_one(&app.db.pool().await)
    .await
    .unwrap()
}

/// Waits (bounded) until `check` holds.
async fn eventually<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn address() -> Value {
    json!({"name": "Ada Buyer", "line1": "1 rue de la Paix", "city": "Paris", "postal_code": "75002", "country": "FR"})
}

fn order_body(listing: Uuid, reservation: Option<Uuid>, wallet: Uuid) -> Value {
    let mut line = json!({"listing_id": listing, "quantity": 1});
    if let Some(reservation) = reservation {
        line["reservation_id"] = json!(reservation);
    }
    json!({
        "lines": [line],
        "payment_method": "wallet_escrow",
        "wallet_id": wallet,
        "shipping_address": address(),
    })
}

async fn reserve(app: &TestApp, listing: Uuid, buyer: &User, ttl_seconds: u32) -> Uuid {
    let held = app
        .post(
            &format!("/listings/{listing}/reservations"),
            Some(buyer),
            &json!({"quantity": 1, "ttl_seconds": ttl_seconds}),
        )
        .await;
    assert_eq!(held.status, 201, "{:?}", held.body);
    held.id()
}

/// The demo `scripts/up.sh` prints, step by step.
#[tokio::test]
async fn the_readme_demo_reserves_the_last_unit_then_buys_it() {
    let app = spawn_app().await;
    let seller = User::new("seller");
    let buyer = User::new("buyer");
    let seller_wallet = app.funded_wallet(&seller, "EUR", 0).await;
    let created = app
        .post(
            "/listings",
            Some(&seller),
            &json!({"title": "Vintage leather jacket", "description": "A brown leather jacket from the 80s, size M.",
                    "category": "fashion", "condition": "good", "price": {"amount": 4500, "currency": "EUR"},
                    "quantity": 1, "location": {"city": "Lyon", "country": "FR"},
                    "payout_wallet_id": seller_wallet}),
        )
        .await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    let listing = created.id();
    let wallet = app.funded_wallet(&buyer, "EUR", 50_000).await;

    // reserve one item for 10 minutes; keep the hold's id
    let reservation = reserve(&app, listing, &buyer, 600).await;
    // buy it with that hold, paying from the wallet through escrow
    let bought = app
        .post(
            "/orders",
            Some(&buyer),
            &order_body(listing, Some(reservation), wallet),
        )
        .await;
    assert_eq!(bought.status, 201, "{:?}", bought.body);
    assert_eq!(bought.body["orders"][0]["status"], "confirmed");
    let order = bought.id();

    let pool = state::<Reservation>(&app, listing).await;
    assert_eq!((pool.stock(), pool.available()), (1, 0));
    let hold = pool
        .hold(domain::values::HoldId::from_uuid(reservation))
        .expect("the buyer's hold is the order's now");
    assert_eq!(
        hold.order_id.map(|id| id.as_uuid()),
        Some(order),
        "the order took the hold"
    );
    let paid = state::<Wallet>(&app, wallet).await;
    assert_eq!((paid.available(), paid.held()), (45_500, 4_500));

    // The hold is the order's: only cancelling the order gives it back.
    let release = app
        .post(
            &format!("/listings/{listing}/reservations/{reservation}/release"),
            Some(&buyer),
            &json!({}),
        )
        .await;
    assert_eq!(
        (release.status, release.code()),
        (409, "reservation_in_order")
    );
    let cancelled = app
        .post(
            &format!("/orders/{order}/cancel"),
            Some(&buyer),
            &json!({"reason": "changed my mind"}),
        )
        .await;
    assert_eq!(cancelled.status, 200, "{:?}", cancelled.body);
    assert_eq!(state::<Reservation>(&app, listing).await.available(), 1);
}

#[tokio::test]
async fn a_hold_is_released_once_by_its_holder_the_seller_or_an_admin() {
    let app = spawn_app().await;
    let seller = User::new("seller");
    let listing = app.listing(&seller, 900, 1, None).await;
    let buyer = User::new("buyer");
    let release = |hold: Uuid, who: User| {
        let app = &app;
        async move {
            app.post(
                &format!("/listings/{listing}/reservations/{hold}/release"),
                Some(&who),
                &json!({}),
            )
            .await
        }
    };

    let hold = reserve(&app, listing, &buyer, 600).await;
    let someone = release(hold, User::new("buyer")).await;
    assert_eq!((someone.status, someone.code()), (403, "forbidden"));
    let taken = app
        .post(
            &format!("/listings/{listing}/reservations"),
            Some(&User::new("buyer")),
            &json!({"quantity": 1, "ttl_seconds": 600}),
        )
        .await;
    assert_eq!(
        (taken.status, taken.code()),
        (409, "insufficient_stock"),
        "the last unit is held"
    );
    let released = release(hold, buyer).await;
    assert_eq!(released.status, 200, "{:?}", released.body);
    assert_eq!(released.id(), hold);
    assert_eq!(state::<Reservation>(&app, listing).await.available(), 1);
    let again = release(hold, User::new("admin")).await;
    assert_eq!((again.status, again.code()), (409, "hold_not_active"));

    for who in [seller, User::new("admin")] {
        let hold = reserve(&app, listing, &User::new("buyer"), 600).await;
        let released = release(hold, who).await;
        assert_eq!(released.status, 200, "{:?}", released.body);
        assert_eq!(state::<Reservation>(&app, listing).await.available(), 1);
    }
    let unknown = release(Uuid::now_v7(), User::new("admin")).await;
    assert_eq!((unknown.status, unknown.code()), (409, "hold_not_active"));
    let no_listing = app
        .post(
            &format!(
                "/listings/{}/reservations/{}/release",
                Uuid::now_v7(),
                Uuid::now_v7()
            ),
            Some(&User::new("admin")),
            &json!({}),
        )
        .await;
    assert_eq!(
        (no_listing.status, no_listing.code()),
        (404, "listing_not_found")
    );
}

#[tokio::test]
async fn someone_elses_or_an_expired_hold_rejects_the_order() {
    let app = spawn_app().await;
    let seller = User::new("seller");
    let seller_wallet = app.funded_wallet(&seller, "EUR", 0).await;
    let listing = app.listing(&seller, 900, 3, Some(seller_wallet)).await;
    let (alice, bob) = (User::new("buyer"), User::new("buyer"));
    let bobs_wallet = app.funded_wallet(&bob, "EUR", 5_000).await;

    let alices = reserve(&app, listing, &alice, 600).await;
    let refused = app
        .post(
            "/orders",
            Some(&bob),
            &order_body(listing, Some(alices), bobs_wallet),
        )
        .await;
    assert_eq!(refused.status, 201, "{:?}", refused.body);
    assert_eq!(refused.body["orders"][0]["status"], "rejected");
    assert_eq!(refused.body["orders"][0]["reason"], "reservation_not_yours");

    // Bob's own hold runs out; its expiry timer is held back (as if the
    // worker had not reached it yet), so the hold is still there, expired.
    let bobs = reserve(&app, listing, &bob, 1).await;
    sqlx::query("UPDATE timers SET attempts = 20 WHERE timer_id = $1")
        .bind(bobs)
        .execute(&app.db.pool().await)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let expired = app
        .post(
            "/orders",
            Some(&bob),
            &order_body(listing, Some(bobs), bobs_wallet),
        )
        .await;
    assert_eq!(expired.status, 201, "{:?}", expired.body);
    assert_eq!(expired.body["orders"][0]["status"], "rejected");
    assert_eq!(expired.body["orders"][0]["reason"], "reservation_expired");

    let pool = state::<Reservation>(&app, listing).await;
    assert_eq!(pool.held(), 2, "the rejected orders took nothing");
    assert_eq!(state::<Wallet>(&app, bobs_wallet).await.held(), 0);
}

/// A command API whose clock `set` is two seconds long.
async fn spawn_with_short_clock(set: fn(&mut command_api::Config, TimeDelta)) -> TestApp {
    spawn_app_on(TestDb::empty().await, |config| {
        set(config, TimeDelta::seconds(2))
    })
    .await
}

#[tokio::test]
async fn an_order_not_shipped_in_time_is_cancelled_and_refunded() {
    let app = spawn_with_short_clock(|config, delta| config.ship_by = delta).await;
    let seller = User::new("seller");
    let seller_wallet = app.funded_wallet(&seller, "EUR", 0).await;
    let listing = app.listing(&seller, 2_000, 1, Some(seller_wallet)).await;
    let buyer = User::new("buyer");
    let wallet = app.funded_wallet(&buyer, "EUR", 2_000).await;
    let placed = app
        .post("/orders", Some(&buyer), &order_body(listing, None, wallet))
        .await;
    assert_eq!(placed.body["orders"][0]["status"], "confirmed");
    let order = placed.id();
    eventually("the order is cancelled", || async {
        state::<Order>(&app, order).await.status() == OrderStatus::Cancelled
    })
    .await;
    let refunded = state::<Wallet>(&app, wallet).await;
    assert_eq!((refunded.available(), refunded.held()), (2_000, 0));
    assert_eq!(
        state::<Wallet>(&app, seller_wallet)
            .await
            .pending_incoming(),
        0
    );
    assert_eq!(state::<Reservation>(&app, listing).await.available(), 1);
    let ship = app
        .post(
            &format!("/orders/{order}/ship"),
            Some(&seller),
            &json!({"carrier": "UPS", "tracking_number": "1Z"}),
        )
        .await;
    assert_eq!((ship.status, ship.code()), (409, "illegal_transition"));
}

#[tokio::test]
async fn escrow_is_captured_once_when_delivery_and_the_clock_race() {
    const ORDERS: usize = 6;
    let app = spawn_with_short_clock(|config, delta| config.escrow_release_after = delta).await;
    let seller = User::new("seller");
    let seller_wallet = app.funded_wallet(&seller, "EUR", 0).await;
    let listing = app
        .listing(&seller, 1_000, ORDERS as u32, Some(seller_wallet))
        .await;
    let buyer = User::new("buyer");
    let wallet = app.funded_wallet(&buyer, "EUR", 10_000).await;
    let mut orders = Vec::new();
    for _ in 0..ORDERS {
        let placed = app
            .post("/orders", Some(&buyer), &order_body(listing, None, wallet))
            .await;
        assert_eq!(placed.body["orders"][0]["status"], "confirmed");
        let order = placed.id();
        let shipped = app
            .post(
                &format!("/orders/{order}/ship"),
                Some(&seller),
                &json!({"carrier": "UPS", "tracking_number": "1Z"}),
            )
            .await;
        assert_eq!(shipped.status, 200, "{:?}", shipped.body);
        orders.push(order);
    }
    // The buyer confirms each delivery around the time its clock runs out:
    // some before the timer, some after, some while it fires.
    let started = Instant::now();
    for (index, order) in orders.iter().enumerate() {
        let at = Duration::from_millis(1_400 + 250 * index as u64);
        tokio::time::sleep(at.saturating_sub(started.elapsed())).await;
        let delivered = app
            .post(
                &format!("/orders/{order}/deliver"),
                Some(&buyer),
                &json!({}),
            )
            .await;
        assert_eq!(delivered.status, 200, "{:?}", delivered.body);
    }
    eventually("every escrow timer has run", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM timers WHERE kind = 'escrow_auto_release'",
        )
        .fetch_one(&app.db.pool().await)
        .await
        .unwrap()
            == 0
    })
    .await;
    for order in &orders {
        assert_eq!(
            count_events(&app, Order::TYPE, *order, "OrderDelivered").await,
            1
        );
        assert!(count_events(&app, Order::TYPE, *order, "EscrowReleased").await <= 1);
    }
    assert_eq!(
        count_events(&app, Wallet::TYPE, wallet, "HoldCaptured").await,
        ORDERS as i64,
        "one capture per order"
    );
    assert_eq!(
        count_events(&app, Wallet::TYPE, seller_wallet, "EscrowReceived").await,
        ORDERS as i64,
        "one payment to the seller per order"
    );
    let seller_side = state::<Wallet>(&app, seller_wallet).await;
    assert_eq!(
        (seller_side.available(), seller_side.pending_incoming()),
        (1_000 * ORDERS as i64, 0)
    );
    let buyer_side = state::<Wallet>(&app, wallet).await;
    assert_eq!(
        (buyer_side.available(), buyer_side.held()),
        (10_000 - 1_000 * ORDERS as i64, 0)
    );
}

#[tokio::test]
async fn a_delivered_order_completes_when_its_return_window_closes() {
    let app = spawn_with_short_clock(|config, delta| config.return_window = delta).await;
    let seller = User::new("seller");
    let listing = app.listing(&seller, 1_500, 1, None).await;
    let buyer = User::new("buyer");
    let placed = app
        .post(
            "/orders",
            Some(&buyer),
            &json!({"lines": [{"listing_id": listing, "quantity": 1}], "payment_method": "cod",
                    "shipping_address": address()}),
        )
        .await;
    assert_eq!(placed.body["orders"][0]["status"], "confirmed");
    let order = placed.id();
    let shipped = app
        .post(
            &format!("/orders/{order}/ship"),
            Some(&seller),
            &json!({"carrier": "UPS", "tracking_number": "1Z"}),
        )
        .await;
    assert_eq!(shipped.status, 200, "{:?}", shipped.body);
    let delivered = app
        .post(
            &format!("/orders/{order}/deliver"),
            Some(&buyer),
            &json!({}),
        )
        .await;
    assert_eq!(delivered.status, 200, "{:?}", delivered.body);
    eventually("the order completes by itself", || async {
        state::<Order>(&app, order).await.status() == OrderStatus::Completed
    })
    .await;
    let late = app
        .post(
            &format!("/orders/{order}/return"),
            Some(&buyer),
            &json!({"reason": "too late"}),
        )
        .await;
    assert_eq!((late.status, late.code()), (409, "illegal_transition"));
}
