//! Given / when / then for every journey and every refusal, in memory.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use serde_json::json;
use uuid::Uuid;

use super::testing::Memory;
use super::*;
use crate::DomainError;
use crate::listing::{Condition, Listing, ListingCommand, ListingDetails, parse_attributes};
use crate::order::{Order, OrderStatus, PaymentMethod, ShippingAddress};
use crate::reservation::{Reservation, ReservationCommand};
use crate::timeline::{ProductTimeline, TimelineCommand, TimelineEntry};
use crate::values::{
    Currency, Description, Label, Location, Money, ProductId, Reason, Reference, Role, Title, Url,
};
use crate::wallet::{Wallet, WalletCommand};

fn t(hours: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 3, 1, 9, 0, 0).unwrap() + TimeDelta::hours(hours)
}
fn user(n: u128) -> UserId {
    UserId::from_uuid(Uuid::from_u128(n))
}
fn buyer() -> Actor {
    Actor::new(user(1), Role::Buyer)
}
fn other_buyer() -> Actor {
    Actor::new(user(2), Role::Buyer)
}
fn seller(n: u128) -> Actor {
    Actor::new(user(10 + n), Role::Seller)
}
fn admin() -> Actor {
    Actor::new(user(99), Role::Admin)
}
fn eur(amount: i64) -> Money {
    Money::parse_positive(amount, "EUR").unwrap()
}
fn listing(n: u128) -> ListingId {
    ListingId::from_uuid(Uuid::from_u128(100 + n))
}
fn product(n: u128) -> ProductId {
    ProductId::from_uuid(Uuid::from_u128(200 + n))
}
fn wallet(n: u128) -> WalletId {
    WalletId::from_uuid(Uuid::from_u128(300 + n))
}
fn buyer_wallet() -> WalletId {
    wallet(0)
}
fn reason(text: &str) -> Reason {
    Reason::parse("reason", text).unwrap()
}
fn deadlines() -> Deadlines {
    Deadlines {
        escrow_release_after: TimeDelta::days(7),
        return_window: TimeDelta::days(14),
        unpaid_order_after: TimeDelta::days(3),
        ship_by: TimeDelta::days(5),
    }
}
fn address() -> ShippingAddress {
    ShippingAddress::parse(
        "Amira B.",
        "12 rue de Marseille",
        None,
        "Tunis",
        "1000",
        "TN",
    )
    .unwrap()
}
fn details() -> ListingDetails {
    ListingDetails {
        title: Title::parse("title", "iPhone 12").unwrap(),
        description: Description::parse("description", "A few scratches.").unwrap(),
        category: Label::parse("category", "phones").unwrap(),
        subcategory: None,
        condition: Condition::Good,
        location: Location::parse("Tunis", "TN", None, None).unwrap(),
        attributes: parse_attributes(json!({}).as_object().unwrap()).unwrap(),
        images: vec![Url::parse("image", "https://img.example/1.jpg").unwrap()],
    }
}

/// A market: listing `n` (n in 1..=listings) sold by seller `n % sellers`
/// with `stock` units at 1,000 each, seller wallets paying out, and the
/// buyer's wallet holding `funds`.
fn market(listings: u128, sellers: u128, stock: u32, funds: i64) -> Memory {
    let mut memory = Memory::default();
    let open = |memory: &mut Memory, id: WalletId, owner: Actor| {
        memory.given::<Wallet>(
            id,
            WalletCommand::Open {
                actor: owner,
                wallet_id: id,
                currency: Currency::parse("EUR").unwrap(),
            },
        );
    };
    open(&mut memory, buyer_wallet(), buyer());
    if funds > 0 {
        memory.given::<Wallet>(
            buyer_wallet(),
            WalletCommand::Deposit {
                actor: admin(),
                amount: eur(funds),
                reference: Reference::parse("reference", "psp-1").unwrap(),
            },
        );
    }
    for s in 0..sellers {
        open(&mut memory, wallet(1 + s), seller(s));
    }
    for n in 1..=listings {
        let s = n % sellers;
        memory.given::<Listing>(
            listing(n),
            ListingCommand::Create {
                actor: seller(s),
                listing_id: listing(n),
                product_id: product(n),
                details: details(),
                price: eur(1_000),
                payout_wallet: Some(wallet(1 + s)),
            },
        );
        memory.given::<Reservation>(
            listing(n),
            ReservationCommand::OpenPool {
                actor: Actor::system(),
                listing_id: listing(n),
                seller: seller(s).user_id,
                quantity: stock,
            },
        );
        memory.given::<ProductTimeline>(
            product(n),
            TimelineCommand::Record {
                actor: Actor::system(),
                product_id: product(n),
                entry: TimelineEntry::Listed {
                    listing_id: listing(n),
                    seller: seller(s).user_id,
                    price: eur(1_000),
                },
            },
        );
    }
    memory
}

fn line(n: u128, quantity: u32) -> CheckoutLine {
    CheckoutLine {
        listing_id: listing(n),
        quantity,
        reservation: None,
    }
}

fn cart(lines: Vec<CheckoutLine>, payment_method: PaymentMethod) -> CheckoutRequest {
    CheckoutRequest {
        buyer: buyer(),
        lines,
        shipping_address: address(),
        payment_method,
        buyer_wallet: (payment_method == PaymentMethod::WalletEscrow).then(buyer_wallet),
    }
}

fn plan(memory: &Memory, request: CheckoutRequest) -> Result<Checkout, JourneyError> {
    let listings: BTreeMap<ListingId, Listing> = request
        .lines
        .iter()
        .map(|line| (line.listing_id, memory.get::<Listing>(line.listing_id)))
        .collect();
    Checkout::plan(request, &listings)
}

/// Checks out `request` at `t(0)`.
fn checkout(
    memory: &mut Memory,
    request: CheckoutRequest,
) -> Result<Vec<OrderOutcome>, JourneyError> {
    let checkout = plan(memory, request)?;
    memory.when(checkout.streams(), |stage| {
        checkout.run(stage, t(0), &deadlines())
    })
}

/// A buyer's own hold on listing `n`, placed at `t(0)` for an hour.
fn hold(memory: &mut Memory, n: u128, holder: Actor, quantity: u32) -> HoldId {
    let hold_id = HoldId::new();
    memory.given::<Reservation>(
        listing(n),
        ReservationCommand::Reserve {
            actor: holder,
            hold_id,
            holder: holder.user_id,
            quantity,
            expires_at: t(1),
            order_id: None,
            now: t(0),
        },
    );
    hold_id
}

fn code(error: JourneyError) -> &'static str {
    error.code()
}

// ---- checkout --------------------------------------------------------------

#[test]
fn a_wallet_checkout_reserves_holds_funds_and_confirms() {
    let mut memory = market(1, 1, 3, 5_000);
    let outcomes = checkout(
        &mut memory,
        cart(vec![line(1, 2)], PaymentMethod::WalletEscrow),
    )
    .unwrap();
    assert_eq!(outcomes.len(), 1);
    let order_id = outcomes[0].order_id;
    assert_eq!(outcomes[0].status, OrderStatus::Confirmed);
    assert_eq!(outcomes[0].reason, None);
    assert_eq!(
        memory.events::<Order>(order_id),
        ["OrderPlaced", "OrderConfirmed"]
    );
    assert_eq!(memory.events::<Reservation>(listing(1)), ["HoldPlaced"]);
    assert_eq!(memory.get::<Reservation>(listing(1)).available(), 1);
    assert_eq!(memory.events::<Wallet>(buyer_wallet()), ["FundsHeld"]);
    let buyer_side = memory.get::<Wallet>(buyer_wallet());
    assert_eq!(buyer_side.held(), 2_000);
    // The hold names the seller's wallet; the seller's wallet is not
    // written (its pending funds are derived from this hold).
    assert_eq!(buyer_side.holds()[&order_id].payee_wallet, wallet(1));
    assert!(memory.events::<Wallet>(wallet(1)).is_empty());
    assert_eq!(memory.get::<Wallet>(wallet(1)).pending_incoming(), 0);
    assert_eq!(
        memory.timers(),
        [(Timer::ShipBy { order_id }, t(0) + TimeDelta::days(5))]
    );
}

#[test]
fn a_checkout_declares_no_stream_of_the_seller_beyond_its_listings() {
    let memory = market(2, 1, 3, 5_000);
    let mut first = cart(vec![line(1, 1)], PaymentMethod::WalletEscrow);
    let mut second = cart(vec![line(2, 1)], PaymentMethod::WalletEscrow);
    second.buyer = other_buyer();
    second.buyer_wallet = Some(wallet(50));
    first.buyer_wallet = Some(buyer_wallet());
    let first = plan(&memory, first).unwrap();
    let second = plan(&memory, second).unwrap();
    assert_eq!(first.orders()[0].seller_wallet, Some(wallet(1)));
    for checkout in [&first, &second] {
        assert!(!checkout.streams().contains(&Stream::Wallet(wallet(1))));
    }
    // Two buyers on two listings of one seller: nothing in common, so
    // neither waits for the other.
    let shared: Vec<_> = first
        .streams()
        .into_iter()
        .filter(|stream| second.streams().contains(stream))
        .collect();
    assert!(shared.is_empty(), "{shared:?}");
}

#[test]
fn a_mall_checkout_becomes_one_order_per_seller() {
    let mut memory = market(3, 2, 1, 5_000);
    let outcomes = checkout(
        &mut memory,
        cart(vec![line(1, 1), line(2, 1), line(3, 1)], PaymentMethod::Cod),
    )
    .unwrap();
    assert_eq!(outcomes.len(), 2);
    let lines: Vec<usize> = outcomes
        .iter()
        .map(|o| memory.get::<Order>(o.order_id).lines().len())
        .collect();
    assert_eq!(lines.iter().sum::<usize>(), 3);
    assert!(outcomes.iter().all(|o| o.status == OrderStatus::Confirmed));
}

#[test]
fn a_bank_transfer_awaits_payment_with_its_unpaid_timer() {
    let mut memory = market(1, 1, 1, 0);
    let outcomes = checkout(
        &mut memory,
        cart(vec![line(1, 1)], PaymentMethod::BankTransfer),
    )
    .unwrap();
    let order_id = outcomes[0].order_id;
    assert_eq!(outcomes[0].status, OrderStatus::AwaitingPayment);
    assert_eq!(
        memory.timers(),
        [(Timer::UnpaidOrder { order_id }, t(0) + TimeDelta::days(3))]
    );
    let hold = memory.get::<Order>(order_id).lines()[0].hold_id;
    assert_eq!(
        memory
            .get::<Reservation>(listing(1))
            .hold(hold)
            .unwrap()
            .expires_at,
        t(0) + TimeDelta::days(3)
    );
}

#[test]
fn short_stock_or_funds_reject_the_order_and_keep_nothing_else() {
    let mut memory = market(1, 1, 1, 5_000);
    let outcomes = checkout(
        &mut memory,
        cart(vec![line(1, 2)], PaymentMethod::WalletEscrow),
    )
    .unwrap();
    assert_eq!(outcomes[0].status, OrderStatus::Rejected);
    assert_eq!(outcomes[0].reason, Some("insufficient_stock"));
    assert_eq!(
        memory.all_events(),
        ["Order:OrderPlaced", "Order:OrderRejected"]
    );
    assert!(memory.timers().is_empty());

    let mut memory = market(1, 1, 5, 500);
    let outcomes = checkout(
        &mut memory,
        cart(vec![line(1, 1)], PaymentMethod::WalletEscrow),
    )
    .unwrap();
    assert_eq!(outcomes[0].reason, Some("insufficient_funds"));
    assert_eq!(memory.get::<Reservation>(listing(1)).available(), 5);
}

#[test]
fn a_checkout_is_refused_before_anything_is_planned() {
    let memory = market(1, 1, 1, 0);
    assert_eq!(
        code(plan(&memory, cart(vec![], PaymentMethod::Cod)).unwrap_err()),
        "too_short"
    );
    assert_eq!(
        code(
            plan(
                &memory,
                cart(vec![line(1, 1), line(1, 1)], PaymentMethod::Cod)
            )
            .unwrap_err()
        ),
        "duplicate_line"
    );
    assert_eq!(
        code(plan(&memory, cart(vec![line(7, 1)], PaymentMethod::Cod)).unwrap_err()),
        "listing_not_found"
    );
    let mut memory = market(0, 1, 1, 0);
    memory.given::<Listing>(
        listing(1),
        ListingCommand::Create {
            actor: seller(0),
            listing_id: listing(1),
            product_id: product(1),
            details: details(),
            price: eur(1_000),
            payout_wallet: None,
        },
    );
    assert_eq!(
        code(plan(&memory, cart(vec![line(1, 1)], PaymentMethod::WalletEscrow)).unwrap_err()),
        "seller_wallet_missing"
    );
}

#[test]
fn a_checkout_with_a_wallet_not_yours_missing_or_a_paused_listing_is_refused() {
    let mut memory = market(1, 1, 1, 5_000);
    let mut request = cart(vec![line(1, 1)], PaymentMethod::WalletEscrow);
    request.buyer_wallet = Some(wallet(1));
    let error = checkout(&mut memory, request).unwrap_err();
    assert_eq!(
        (error.code(), error.refusal()),
        ("forbidden", crate::Refusal::Forbidden)
    );

    let mut request = cart(vec![line(1, 1)], PaymentMethod::WalletEscrow);
    request.buyer_wallet = Some(wallet(9));
    assert_eq!(
        code(checkout(&mut memory, request).unwrap_err()),
        "wallet_not_found"
    );

    memory.given::<Listing>(listing(1), ListingCommand::Pause { actor: seller(0) });
    let error = checkout(&mut memory, cart(vec![line(1, 1)], PaymentMethod::Cod)).unwrap_err();
    assert_eq!(code(error), "listing_unavailable");
    assert!(memory.all_events().is_empty(), "nothing staged is kept");
}

// ---- holds that work -------------------------------------------------------

fn with_reservation(n: u128, quantity: u32, hold_id: HoldId) -> CheckoutLine {
    CheckoutLine {
        reservation: Some(hold_id),
        ..line(n, quantity)
    }
}

#[test]
fn the_buyers_own_hold_is_taken_into_the_order() {
    let mut memory = market(1, 1, 1, 5_000);
    let held = hold(&mut memory, 1, buyer(), 1);
    assert_eq!(memory.get::<Reservation>(listing(1)).available(), 0);
    let outcomes = checkout(
        &mut memory,
        cart(
            vec![with_reservation(1, 1, held)],
            PaymentMethod::WalletEscrow,
        ),
    )
    .unwrap();
    assert_eq!(outcomes[0].status, OrderStatus::Confirmed);
    let pool = memory.get::<Reservation>(listing(1));
    let hold = pool.hold(held).expect("the hold lives on as the order's");
    assert_eq!(hold.order_id, Some(outcomes[0].order_id));
    assert_eq!(hold.expires_at, t(0) + CONFIRMED_ORDER_HOLD);
    assert_eq!(pool.available(), 0);
    assert_eq!(
        memory.events::<Reservation>(listing(1)),
        ["HoldReleased", "HoldPlaced"]
    );
    assert_eq!(
        memory.get::<Order>(outcomes[0].order_id).lines()[0].hold_id,
        held
    );
}

/// Makes the line of a case, with the hold it names.
type MakeLine = fn(&mut Memory) -> CheckoutLine;

#[test]
fn someone_elses_an_expired_a_closed_or_a_different_hold_rejects_the_order() {
    let cases: [(&str, MakeLine); 4] = [
        ("reservation_not_yours", |memory| {
            with_reservation(1, 1, hold(memory, 1, other_buyer(), 1))
        }),
        ("reservation_not_active", |_| {
            with_reservation(1, 1, HoldId::new())
        }),
        ("reservation_quantity_mismatch", |memory| {
            with_reservation(1, 1, hold(memory, 1, buyer(), 2))
        }),
        ("reservation_expired", |memory| {
            let hold_id = HoldId::new();
            memory.given::<Reservation>(
                listing(1),
                ReservationCommand::Reserve {
                    actor: buyer(),
                    hold_id,
                    holder: buyer().user_id,
                    quantity: 1,
                    expires_at: t(0),
                    order_id: None,
                    now: t(-1),
                },
            );
            with_reservation(1, 1, hold_id)
        }),
    ];
    for (expected, make) in cases {
        let mut memory = market(1, 1, 3, 5_000);
        let line = make(&mut memory);
        let outcomes =
            checkout(&mut memory, cart(vec![line], PaymentMethod::WalletEscrow)).unwrap();
        assert_eq!(outcomes[0].status, OrderStatus::Rejected, "{expected}");
        assert_eq!(outcomes[0].reason, Some(expected));
        assert_eq!(
            memory.all_events(),
            ["Order:OrderPlaced", "Order:OrderRejected"],
            "{expected}"
        );
    }
}

#[test]
fn a_hold_is_released_by_its_holder_the_seller_or_an_admin_once() {
    for actor in [buyer(), seller(0), admin()] {
        let mut memory = market(1, 1, 1, 0);
        let held = hold(&mut memory, 1, buyer(), 1);
        let streams = vec![Stream::Reservation(listing(1))];
        memory
            .when(streams.clone(), |stage| {
                release_hold(stage, listing(1), held, actor, reason("changed my mind"))
            })
            .unwrap();
        assert_eq!(memory.events::<Reservation>(listing(1)), ["HoldReleased"]);
        assert_eq!(memory.get::<Reservation>(listing(1)).available(), 1);
        let again = memory.when(streams, |stage| {
            release_hold(stage, listing(1), held, actor, reason("again"))
        });
        assert_eq!(code(again.unwrap_err()), "hold_not_active");
    }
    let mut memory = market(1, 1, 1, 0);
    let held = hold(&mut memory, 1, buyer(), 1);
    let error = memory
        .when(vec![Stream::Reservation(listing(1))], |stage| {
            release_hold(stage, listing(1), held, other_buyer(), reason("mine now"))
        })
        .unwrap_err();
    assert_eq!(code(error), "forbidden");
}

#[test]
fn a_hold_taken_into_an_order_is_released_only_by_cancelling_the_order() {
    let mut memory = market(1, 1, 1, 5_000);
    let held = hold(&mut memory, 1, buyer(), 1);
    checkout(
        &mut memory,
        cart(vec![with_reservation(1, 1, held)], PaymentMethod::Cod),
    )
    .unwrap();
    let error = memory
        .when(vec![Stream::Reservation(listing(1))], |stage| {
            release_hold(stage, listing(1), held, buyer(), reason("oops"))
        })
        .unwrap_err();
    assert_eq!(code(error), "reservation_in_order");
}

// ---- an order's steps ------------------------------------------------------

/// A confirmed wallet-escrow order of one unit of listing 1.
fn confirmed_order(method: PaymentMethod) -> (Memory, OrderId) {
    let mut memory = market(1, 1, 2, 5_000);
    let outcomes = checkout(&mut memory, cart(vec![line(1, 1)], method)).unwrap();
    (memory, outcomes[0].order_id)
}

/// Runs `journey` over the streams `step` of the order declares (a stream
/// it touches undeclared fails the test).
fn run(
    memory: &mut Memory,
    order_id: OrderId,
    step: OrderStep,
    journey: impl FnOnce(&mut Memory) -> Result<(), JourneyError>,
) -> Result<(), JourneyError> {
    let order = memory.get::<Order>(order_id);
    memory.when(order_streams(order_id, &order, step), journey)
}

/// Fires `timer` of order `order_id` over the streams it declares.
fn fire_timer(
    memory: &mut Memory,
    order_id: OrderId,
    timer: Timer,
    at: DateTime<Utc>,
) -> Result<Fired, JourneyError> {
    let order = memory.get::<Order>(order_id);
    let streams = timer.streams(|step| order_streams(order_id, &order, step));
    memory.when(streams, |stage| fire(stage, timer, at))
}

fn ship_it(memory: &mut Memory, order_id: OrderId, at: DateTime<Utc>) -> Result<(), JourneyError> {
    run(memory, order_id, OrderStep::Ship, |stage| {
        ship(
            stage,
            order_id,
            seller(0),
            Label::parse("carrier", "UPS").unwrap(),
            Label::parse("tracking_number", "1Z").unwrap(),
            at,
            &deadlines(),
        )
    })
}

fn deliver_it(
    memory: &mut Memory,
    order_id: OrderId,
    at: DateTime<Utc>,
) -> Result<(), JourneyError> {
    run(memory, order_id, OrderStep::Deliver, |stage| {
        deliver(stage, order_id, buyer(), at, &deadlines())
    })
}

#[test]
fn shipping_sells_the_held_units_and_arms_the_escrow_release() {
    let (mut memory, order_id) = confirmed_order(PaymentMethod::WalletEscrow);
    ship_it(&mut memory, order_id, t(1)).unwrap();
    assert_eq!(memory.events::<Order>(order_id), ["OrderShipped"]);
    assert_eq!(memory.events::<Reservation>(listing(1)), ["HoldConfirmed"]);
    assert!(
        memory
            .events::<ProductTimeline>(product(1))
            .contains(&"EntryRecorded")
    );
    assert_eq!(memory.get::<Reservation>(listing(1)).stock(), 1);
    assert_eq!(
        memory.timers(),
        [(Timer::EscrowRelease { order_id }, t(1) + TimeDelta::days(7))]
    );
    assert_eq!(
        code(ship_it(&mut memory, order_id, t(2)).unwrap_err()),
        "illegal_transition"
    );
    let missing = OrderId::new();
    let error = memory
        .when(vec![Stream::Order(missing)], |stage| {
            ship(
                stage,
                missing,
                seller(0),
                Label::parse("carrier", "UPS").unwrap(),
                Label::parse("tracking_number", "1Z").unwrap(),
                t(1),
                &deadlines(),
            )
        })
        .unwrap_err();
    assert_eq!(code(error), "order_not_found");
}

/// A confirmed escrow order as a checkout recorded before pending funds
/// became a read model left it: the seller's wallet also expected the
/// escrow (`IncomingExpected`, which no command decides any more).
fn legacy_confirmed_order() -> (Memory, OrderId) {
    let (mut memory, order_id) = confirmed_order(PaymentMethod::WalletEscrow);
    let amount = memory.get::<Wallet>(buyer_wallet()).holds()[&order_id].amount;
    memory.given_event::<Wallet>(
        wallet(1),
        crate::wallet::WalletEvent::IncomingExpected {
            order_id,
            amount,
            payer_wallet: buyer_wallet(),
            pending_incoming: amount,
        },
    );
    (memory, order_id)
}

#[test]
fn an_order_whose_seller_expected_the_escrow_settles_that_entry() {
    // Delivered: the legacy entry becomes available, exactly once.
    let (mut memory, order_id) = legacy_confirmed_order();
    assert_eq!(memory.get::<Wallet>(wallet(1)).pending_incoming(), 1_000);
    ship_it(&mut memory, order_id, t(1)).unwrap();
    deliver_it(&mut memory, order_id, t(30)).unwrap();
    assert_eq!(memory.events::<Wallet>(wallet(1)), ["EscrowReceived"]);
    let seller_side = memory.get::<Wallet>(wallet(1));
    assert_eq!(
        (seller_side.available(), seller_side.pending_incoming()),
        (1_000, 0)
    );
    assert_eq!(memory.get::<Wallet>(buyer_wallet()).held(), 0);

    // Cancelled: the legacy entry is dropped with the refund.
    let (mut memory, order_id) = legacy_confirmed_order();
    run(&mut memory, order_id, OrderStep::Cancel, |stage| {
        cancel(stage, order_id, buyer(), reason("changed my mind"), None)
    })
    .unwrap();
    assert_eq!(memory.events::<Wallet>(wallet(1)), ["IncomingCancelled"]);
    let seller_side = memory.get::<Wallet>(wallet(1));
    assert_eq!(
        (seller_side.available(), seller_side.pending_incoming()),
        (0, 0)
    );
    assert_eq!(memory.get::<Wallet>(buyer_wallet()).available(), 5_000);
}

#[test]
fn delivery_captures_the_escrow_and_arms_the_completion() {
    let (mut memory, order_id) = confirmed_order(PaymentMethod::WalletEscrow);
    ship_it(&mut memory, order_id, t(1)).unwrap();
    deliver_it(&mut memory, order_id, t(30)).unwrap();
    assert_eq!(memory.get::<Wallet>(buyer_wallet()).held(), 0);
    assert_eq!(memory.get::<Wallet>(buyer_wallet()).available(), 4_000);
    assert_eq!(memory.get::<Wallet>(wallet(1)).available(), 1_000);
    assert_eq!(
        memory.timers(),
        [(
            Timer::ReturnWindowEnd { order_id },
            t(30) + TimeDelta::days(14)
        )]
    );
}

#[test]
fn escrow_is_captured_once_whether_the_clock_or_the_buyer_comes_first() {
    // The clock first, then the buyer.
    let (mut memory, order_id) = confirmed_order(PaymentMethod::WalletEscrow);
    ship_it(&mut memory, order_id, t(0)).unwrap();
    let early = fire_timer(
        &mut memory,
        order_id,
        Timer::EscrowRelease { order_id },
        t(1),
    );
    assert!(early.unwrap_err().is_too_early());
    let fired = fire_timer(
        &mut memory,
        order_id,
        Timer::EscrowRelease { order_id },
        t(0) + TimeDelta::days(7),
    );
    assert_eq!(fired, Ok(Fired::Done));
    assert_eq!(memory.get::<Wallet>(wallet(1)).available(), 1_000);
    deliver_it(&mut memory, order_id, t(0) + TimeDelta::days(8)).unwrap();
    assert!(memory.events::<Wallet>(wallet(1)).is_empty(), "not twice");
    assert_eq!(memory.get::<Wallet>(wallet(1)).available(), 1_000);

    // The buyer first, then the clock.
    let (mut memory, order_id) = confirmed_order(PaymentMethod::WalletEscrow);
    ship_it(&mut memory, order_id, t(0)).unwrap();
    deliver_it(&mut memory, order_id, t(2)).unwrap();
    let fired = fire_timer(
        &mut memory,
        order_id,
        Timer::EscrowRelease { order_id },
        t(0) + TimeDelta::days(7),
    );
    assert_eq!(fired, Ok(Fired::NothingToDo("escrow_already_released")));
    assert!(memory.all_events().is_empty());
    assert_eq!(memory.get::<Wallet>(wallet(1)).available(), 1_000);
}

#[test]
fn an_admin_releases_escrow_when_due_and_a_buyer_may_not() {
    let (mut memory, order_id) = confirmed_order(PaymentMethod::WalletEscrow);
    ship_it(&mut memory, order_id, t(0)).unwrap();
    let refused = run(&mut memory, order_id, OrderStep::ReleaseEscrow, |stage| {
        release_escrow(stage, order_id, buyer(), t(1))
    });
    assert_eq!(code(refused.unwrap_err()), "forbidden");
    let early = run(&mut memory, order_id, OrderStep::ReleaseEscrow, |stage| {
        release_escrow(stage, order_id, admin(), t(1))
    });
    assert_eq!(code(early.unwrap_err()), "not_yet_due");
    run(&mut memory, order_id, OrderStep::ReleaseEscrow, |stage| {
        release_escrow(stage, order_id, admin(), t(0) + TimeDelta::days(7))
    })
    .unwrap();
    assert_eq!(memory.get::<Wallet>(wallet(1)).available(), 1_000);
}

#[test]
fn the_order_completes_by_itself_when_the_return_window_closes() {
    let (mut memory, order_id) = confirmed_order(PaymentMethod::Cod);
    ship_it(&mut memory, order_id, t(0)).unwrap();
    deliver_it(&mut memory, order_id, t(1)).unwrap();
    let fire_at = |memory: &mut Memory, at| {
        fire_timer(memory, order_id, Timer::ReturnWindowEnd { order_id }, at)
    };
    assert!(fire_at(&mut memory, t(2)).unwrap_err().is_too_early());
    let closed = t(1) + TimeDelta::days(14) + TimeDelta::seconds(1);
    assert_eq!(fire_at(&mut memory, closed), Ok(Fired::Done));
    assert_eq!(
        memory.get::<Order>(order_id).status(),
        OrderStatus::Completed
    );
    assert_eq!(
        fire_at(&mut memory, closed),
        Ok(Fired::NothingToDo("illegal_transition"))
    );
}

#[test]
fn cancelling_releases_the_stock_and_refunds_the_escrow() {
    let (mut memory, order_id) = confirmed_order(PaymentMethod::WalletEscrow);
    run(&mut memory, order_id, OrderStep::Cancel, |stage| {
        cancel(stage, order_id, buyer(), reason("changed my mind"), None)
    })
    .unwrap();
    assert_eq!(
        memory.get::<Order>(order_id).status(),
        OrderStatus::Cancelled
    );
    assert_eq!(memory.get::<Reservation>(listing(1)).available(), 2);
    assert_eq!(memory.get::<Wallet>(buyer_wallet()).available(), 5_000);
    // The seller's wallet never heard of the order.
    assert!(memory.events::<Wallet>(wallet(1)).is_empty());
    assert_eq!(memory.get::<Wallet>(wallet(1)).available(), 0);
    let again = run(&mut memory, order_id, OrderStep::Cancel, |stage| {
        cancel(stage, order_id, buyer(), reason("again"), None)
    });
    assert_eq!(code(again.unwrap_err()), "illegal_transition");
}

#[test]
fn an_order_not_shipped_in_time_is_cancelled_and_refunded_by_its_timer() {
    let (mut memory, order_id) = confirmed_order(PaymentMethod::WalletEscrow);
    let fired = fire_timer(
        &mut memory,
        order_id,
        Timer::ShipBy { order_id },
        t(0) + TimeDelta::days(5),
    );
    assert_eq!(fired, Ok(Fired::Done));
    assert_eq!(
        memory.get::<Order>(order_id).status(),
        OrderStatus::Cancelled
    );
    assert_eq!(memory.get::<Wallet>(buyer_wallet()).available(), 5_000);

    // Shipped in time: the timer has nothing left to do.
    let (mut memory, order_id) = confirmed_order(PaymentMethod::WalletEscrow);
    ship_it(&mut memory, order_id, t(1)).unwrap();
    let fired = fire_timer(
        &mut memory,
        order_id,
        Timer::ShipBy { order_id },
        t(0) + TimeDelta::days(5),
    );
    assert_eq!(fired, Ok(Fired::NothingToDo("illegal_transition")));
    assert!(memory.all_events().is_empty());
}

#[test]
fn a_bank_transfer_is_paid_or_cancelled_by_its_timer() {
    let (mut memory, order_id) = confirmed_order(PaymentMethod::BankTransfer);
    let fired = fire_timer(
        &mut memory,
        order_id,
        Timer::UnpaidOrder { order_id },
        t(72),
    );
    assert_eq!(fired, Ok(Fired::Done));
    assert_eq!(
        memory.get::<Order>(order_id).status(),
        OrderStatus::Cancelled
    );
    assert_eq!(memory.get::<Reservation>(listing(1)).available(), 2);

    let (mut memory, order_id) = confirmed_order(PaymentMethod::BankTransfer);
    let reference = Reference::parse("reference", "wire-1").unwrap();
    let refused = run(&mut memory, order_id, OrderStep::ConfirmPayment, |stage| {
        confirm_payment(
            stage,
            order_id,
            buyer(),
            reference.clone(),
            t(2),
            &deadlines(),
        )
    });
    assert_eq!(code(refused.unwrap_err()), "forbidden");
    run(&mut memory, order_id, OrderStep::ConfirmPayment, |stage| {
        confirm_payment(
            stage,
            order_id,
            admin(),
            reference.clone(),
            t(2),
            &deadlines(),
        )
    })
    .unwrap();
    let order = memory.get::<Order>(order_id);
    assert_eq!(order.status(), OrderStatus::Confirmed);
    let hold = memory
        .get::<Reservation>(listing(1))
        .hold(order.lines()[0].hold_id)
        .cloned()
        .unwrap();
    assert_eq!(hold.expires_at, t(2) + CONFIRMED_ORDER_HOLD);
    assert_eq!(
        memory.timers(),
        [(Timer::ShipBy { order_id }, t(2) + TimeDelta::days(5))]
    );
    // The unpaid timer now finds the order moved on.
    let fired = fire_timer(
        &mut memory,
        order_id,
        Timer::UnpaidOrder { order_id },
        t(72),
    );
    assert_eq!(fired, Ok(Fired::NothingToDo("illegal_transition")));
}

#[test]
fn a_returned_order_is_refunded_from_the_sellers_wallet() {
    let (mut memory, order_id) = confirmed_order(PaymentMethod::WalletEscrow);
    ship_it(&mut memory, order_id, t(0)).unwrap();
    deliver_it(&mut memory, order_id, t(1)).unwrap();
    memory.given::<Order>(
        order_id,
        crate::order::OrderCommand::RequestReturn {
            actor: buyer(),
            reason: reason("too small"),
            now: t(2),
        },
    );
    let early = run(&mut memory, order_id, OrderStep::Refund, |stage| {
        refund(stage, order_id, seller(0))
    });
    assert_eq!(code(early.unwrap_err()), "illegal_transition");
    run(&mut memory, order_id, OrderStep::MarkReturned, |stage| {
        mark_returned(stage, order_id, seller(0))
    })
    .unwrap();
    assert!(
        memory
            .events::<ProductTimeline>(product(1))
            .contains(&"EntryRecorded")
    );
    run(&mut memory, order_id, OrderStep::Refund, |stage| {
        refund(stage, order_id, seller(0))
    })
    .unwrap();
    assert_eq!(memory.get::<Wallet>(buyer_wallet()).available(), 5_000);
    assert_eq!(memory.get::<Wallet>(wallet(1)).available(), 0);
}

// ---- timers ----------------------------------------------------------------

#[test]
fn a_buyers_hold_expires_unless_an_order_took_it() {
    let mut memory = market(1, 1, 1, 0);
    let held = hold(&mut memory, 1, buyer(), 1);
    let timer = Timer::HoldExpiry {
        listing_id: listing(1),
        hold_id: held,
    };
    let streams = timer.streams(|_| Vec::new());
    let early = memory.when(streams.clone(), |stage| fire(stage, timer, t(0)));
    assert!(early.unwrap_err().is_too_early());
    assert_eq!(
        memory.when(streams.clone(), |stage| fire(stage, timer, t(1))),
        Ok(Fired::Done)
    );
    assert_eq!(memory.get::<Reservation>(listing(1)).available(), 1);
    assert_eq!(
        memory.when(streams, |stage| fire(stage, timer, t(1))),
        Ok(Fired::NothingToDo("hold_not_active"))
    );

    let mut memory = market(1, 1, 1, 0);
    let held = hold(&mut memory, 1, buyer(), 1);
    checkout(
        &mut memory,
        cart(vec![with_reservation(1, 1, held)], PaymentMethod::Cod),
    )
    .unwrap();
    let timer = Timer::HoldExpiry {
        listing_id: listing(1),
        hold_id: held,
    };
    assert_eq!(
        memory.when(timer.streams(|_| Vec::new()), |stage| fire(
            stage,
            timer,
            t(2)
        )),
        Ok(Fired::NothingToDo("reservation_in_order"))
    );
}

#[test]
fn timers_are_stored_as_the_rows_written_before_the_enum_existed() {
    let order_id = OrderId::from_uuid(Uuid::from_u128(7));
    let hold_id = HoldId::from_uuid(Uuid::from_u128(8));
    // Rows as the kind-string timers wrote them.
    let old = [
        (
            "hold_expiry",
            json!({"listing_id": listing(1).to_string(), "hold_id": hold_id.to_string()}),
            Timer::HoldExpiry {
                listing_id: listing(1),
                hold_id,
            },
        ),
        (
            "unpaid_order",
            json!({"order_id": order_id.to_string()}),
            Timer::UnpaidOrder { order_id },
        ),
        (
            "escrow_auto_release",
            json!({"order_id": order_id.to_string()}),
            Timer::EscrowRelease { order_id },
        ),
    ];
    for (kind, payload, timer) in old {
        assert_eq!(Timer::from_row(kind, &payload), Ok(timer));
        assert_eq!((timer.kind(), timer.payload()), (kind, payload));
    }
    for timer in [
        Timer::ReturnWindowEnd { order_id },
        Timer::ShipBy { order_id },
    ] {
        assert_eq!(Timer::from_row(timer.kind(), &timer.payload()), Ok(timer));
    }
    assert_eq!(
        Timer::HoldExpiry {
            listing_id: listing(1),
            hold_id
        }
        .id(),
        hold_id.as_uuid()
    );
    assert_eq!(
        Timer::EscrowRelease { order_id }.id(),
        crate::process::deterministic_command_id("escrow-auto-release", &[&order_id.to_string()])
    );
    assert!(Timer::from_row("nonsense", &json!({})).is_err());
}

#[test]
fn only_the_steps_that_move_the_sellers_money_declare_the_sellers_wallet() {
    let (memory, order_id) = confirmed_order(PaymentMethod::WalletEscrow);
    let order = memory.get::<Order>(order_id);
    let declares_seller_wallet =
        |step| order_streams(order_id, &order, step).contains(&Stream::Wallet(wallet(1)));
    for step in [
        OrderStep::ConfirmPayment,
        OrderStep::Ship,
        OrderStep::Complete,
        OrderStep::MarkReturned,
    ] {
        assert!(!declares_seller_wallet(step), "{step:?}");
    }
    for step in [
        OrderStep::Deliver,
        OrderStep::ReleaseEscrow,
        OrderStep::Cancel,
        OrderStep::Refund,
    ] {
        assert!(declares_seller_wallet(step), "{step:?}");
    }
}
