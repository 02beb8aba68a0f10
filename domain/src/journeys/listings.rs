//! A seller lists an item: the listing, its stock pool and its product's
//! timeline entry are written together, after the payout wallet (when one
//! is named) is checked to be the seller's own and in the price's currency.
//! A seller changes a listing's price (recorded on its product's timeline
//! when the product has one) or its details (a partial change merged over
//! the current ones). A buyer's hold outside an order is planned here too:
//! only an active listing takes one.

use chrono::{DateTime, Utc};

use super::{JourneyError, Stage, Stream, Timer, key};
use crate::Decide;
use crate::listing::{DetailChanges, Listing, ListingCommand, ListingDetails, ListingStatus};
use crate::reservation::{Reservation, ReservationCommand};
use crate::timeline::{ProductTimeline, TimelineCommand, TimelineEntry};
use crate::values::{Actor, HoldId, ListingId, Money, ProductId, WalletId};
use crate::wallet::Wallet;

/// A new listing, parsed. Its ids are fixed by the caller, so that running
/// the journey again after a concurrency conflict creates the same one.
#[derive(Debug, Clone)]
pub struct NewListing {
    /// The seller, who lists the item.
    pub seller: Actor,
    pub listing_id: ListingId,
    /// A new product, or one the seller owns and relists.
    pub product_id: ProductId,
    pub details: ListingDetails,
    pub price: Money,
    /// Units in stock.
    pub quantity: u32,
    /// The seller's wallet that receives wallet-escrow payments.
    pub payout_wallet: Option<WalletId>,
}

impl NewListing {
    /// Every stream the creation reads or writes.
    pub fn streams(&self) -> Vec<Stream> {
        let mut streams = vec![
            Stream::Listing(self.listing_id),
            Stream::Reservation(self.listing_id),
            Stream::Timeline(self.product_id),
        ];
        streams.extend(self.payout_wallet.map(Stream::Wallet));
        streams
    }

    /// Creates the listing, opens its stock pool and records it on its
    /// product's timeline (`Listed` for a new product, `Relisted` for one
    /// that already has a story).
    pub fn run<S: Stage>(&self, stage: &mut S) -> Result<(), JourneyError> {
        let seller = self.seller;
        if let Some(wallet_id) = self.payout_wallet {
            let wallet = stage.state::<Wallet>(&key(wallet_id))?;
            if !wallet.exists() {
                return Err(JourneyError::WalletNotFound);
            }
            if wallet.owner() != seller.user_id {
                return Err(JourneyError::WalletNotYours);
            }
            if wallet.currency() != self.price.currency() {
                return Err(JourneyError::PayoutCurrencyMismatch);
            }
        }
        stage.decide::<Listing>(
            &key(self.listing_id),
            ListingCommand::Create {
                actor: seller,
                listing_id: self.listing_id,
                product_id: self.product_id,
                details: self.details.clone(),
                price: self.price.clone(),
                payout_wallet: self.payout_wallet,
            },
        )?;
        stage.decide::<Reservation>(
            &key(self.listing_id),
            ReservationCommand::OpenPool {
                actor: seller,
                listing_id: self.listing_id,
                seller: seller.user_id,
                quantity: self.quantity,
            },
        )?;
        let relisting = stage
            .state::<ProductTimeline>(&key(self.product_id))?
            .exists();
        let (listing_id, price) = (self.listing_id, self.price.clone());
        let (entry, actor) = if relisting {
            // A relisting is checked against the product's current owner,
            // so it is recorded as the seller.
            let entry = TimelineEntry::Relisted {
                listing_id,
                seller: seller.user_id,
                price,
            };
            (entry, seller)
        } else {
            // The first entry of a product is Souk's, on the seller's behalf.
            let entry = TimelineEntry::Listed {
                listing_id,
                seller: seller.user_id,
                price,
            };
            (entry, Actor::system())
        };
        stage.decide::<ProductTimeline>(
            &key(self.product_id),
            TimelineCommand::Record {
                actor,
                product_id: self.product_id,
                entry,
            },
        )
    }
}

/// A seller's (or an admin's) new price for a listing. The product is the
/// listing's own, read before the unit of work so that its timeline can be
/// declared; a listing's product never changes.
#[derive(Debug, Clone)]
pub struct PriceChange {
    pub listing_id: ListingId,
    pub product_id: ProductId,
    pub actor: Actor,
    /// The new price of one unit, in the listing's currency.
    pub price: Money,
}

impl PriceChange {
    /// Every stream the change reads or writes.
    pub fn streams(&self) -> Vec<Stream> {
        vec![
            Stream::Listing(self.listing_id),
            Stream::Timeline(self.product_id),
        ]
    }

    /// Changes the price (the listing refuses someone who may not manage
    /// it, a missing or deleted listing, another currency, the same price)
    /// and records `PriceChanged` on the product's timeline if it exists;
    /// a listing whose product has no timeline still changes its price.
    pub fn run<S: Stage>(&self, stage: &mut S) -> Result<(), JourneyError> {
        stage.decide::<Listing>(
            &key(self.listing_id),
            ListingCommand::ChangePrice {
                actor: self.actor,
                price: self.price.clone(),
            },
        )?;
        if !stage
            .state::<ProductTimeline>(&key(self.product_id))?
            .exists()
        {
            return Ok(());
        }
        stage.decide::<ProductTimeline>(
            &key(self.product_id),
            TimelineCommand::Record {
                actor: Actor::system(),
                product_id: self.product_id,
                entry: TimelineEntry::PriceChanged {
                    listing_id: self.listing_id,
                    price: self.price.clone(),
                },
            },
        )
    }
}

/// A seller's (or an admin's) change of some of a listing's details.
#[derive(Debug, Clone)]
pub struct DetailsUpdate {
    pub listing_id: ListingId,
    pub actor: Actor,
    pub changes: DetailChanges,
}

impl DetailsUpdate {
    /// Every stream the update reads or writes.
    pub fn streams(&self) -> Vec<Stream> {
        vec![Stream::Listing(self.listing_id)]
    }

    /// Merges the changes over the listing's current details and replaces
    /// them (the listing refuses someone who may not manage it, a missing
    /// or deleted listing, details out of bounds).
    pub fn run<S: Stage>(&self, stage: &mut S) -> Result<(), JourneyError> {
        let current = stage.state::<Listing>(&key(self.listing_id))?.details();
        let details = self.changes.clone().apply(current.clone());
        stage.decide::<Listing>(
            &key(self.listing_id),
            ListingCommand::UpdateDetails {
                actor: self.actor,
                details,
            },
        )
    }
}

/// A buyer's request to hold stock of a listing outside an order.
#[derive(Debug, Clone)]
pub struct HoldRequest {
    pub listing_id: ListingId,
    pub holder: Actor,
    pub quantity: u32,
    pub expires_at: DateTime<Utc>,
}

/// A hold the listing takes: one command on its stock pool (the stock is
/// checked there), and the timer that expires the hold.
#[derive(Debug, Clone)]
pub struct PlannedHold {
    pub hold_id: HoldId,
    pub command: ReservationCommand,
    pub timer: Timer,
    pub due_at: DateTime<Utc>,
}

impl HoldRequest {
    /// Plans the hold over `listing`'s state: a missing listing is refused
    /// `listing_not_found`, one that is not active `listing_unavailable`.
    ///
    /// The decision needs nothing but the listing's status, so it is taken
    /// before the stock pool is locked: a hot listing's holds then run as
    /// one batch on the pool rather than one unit of work each.
    pub fn plan(
        self,
        listing: &Listing,
        hold_id: HoldId,
        now: DateTime<Utc>,
    ) -> Result<PlannedHold, JourneyError> {
        if !listing.exists() {
            return Err(JourneyError::ListingNotFound(self.listing_id));
        }
        if listing.status() != ListingStatus::Active {
            return Err(JourneyError::ListingUnavailable {
                listing_id: self.listing_id,
                status: listing.status().as_str(),
            });
        }
        Ok(PlannedHold {
            hold_id,
            command: ReservationCommand::Reserve {
                actor: self.holder,
                hold_id,
                holder: self.holder.user_id,
                quantity: self.quantity,
                expires_at: self.expires_at,
                order_id: None,
                now,
            },
            timer: Timer::HoldExpiry {
                listing_id: self.listing_id,
                hold_id,
            },
            due_at: self.expires_at,
        })
    }
}

#[cfg(test)]
mod tests {
    //! Given / when / then for listing creation and a buyer's hold.

    use chrono::TimeZone;
    use serde_json::json;
    use uuid::Uuid;

    use super::super::testing::Memory;
    use super::*;
    use crate::DomainError;
    use crate::listing::{Condition, DetailChanges, parse_attributes};
    use crate::timeline::ProductTimeline;
    use crate::values::{Currency, Description, Label, Location, Role, Title, Url, UserId};
    use crate::wallet::WalletCommand;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 3, 1, 9, 0, 0).unwrap()
    }
    fn seller() -> Actor {
        Actor::new(UserId::from_uuid(Uuid::from_u128(11)), Role::Seller)
    }
    fn other_seller() -> Actor {
        Actor::new(UserId::from_uuid(Uuid::from_u128(12)), Role::Seller)
    }
    fn buyer() -> Actor {
        Actor::new(UserId::from_uuid(Uuid::from_u128(1)), Role::Buyer)
    }
    fn listing_id(n: u128) -> ListingId {
        ListingId::from_uuid(Uuid::from_u128(100 + n))
    }
    fn product_id() -> ProductId {
        ProductId::from_uuid(Uuid::from_u128(200))
    }
    fn wallet_id(n: u128) -> WalletId {
        WalletId::from_uuid(Uuid::from_u128(300 + n))
    }
    fn money(amount: i64, currency: &str) -> Money {
        Money::parse_positive(amount, currency).unwrap()
    }
    fn details() -> ListingDetails {
        ListingDetails {
            title: Title::parse("title", "Walnut side table").unwrap(),
            description: Description::parse("description", "Oiled, one ring mark.").unwrap(),
            category: Label::parse("category", "furniture").unwrap(),
            subcategory: None,
            condition: Condition::Good,
            location: Location::parse("Sfax", "TN", None, None).unwrap(),
            attributes: parse_attributes(json!({"wood": "walnut"}).as_object().unwrap()).unwrap(),
            images: vec![Url::parse("image", "https://img.example/table.jpg").unwrap()],
        }
    }
    fn new_listing(n: u128, payout_wallet: Option<WalletId>) -> NewListing {
        NewListing {
            seller: seller(),
            listing_id: listing_id(n),
            product_id: product_id(),
            details: details(),
            price: money(4_500, "EUR"),
            quantity: 3,
            payout_wallet,
        }
    }
    /// Wallet `n` of `owner` in `currency`.
    fn open_wallet(memory: &mut Memory, n: u128, owner: Actor, currency: &str) {
        memory.given::<Wallet>(
            wallet_id(n),
            WalletCommand::Open {
                actor: owner,
                wallet_id: wallet_id(n),
                currency: Currency::parse(currency).unwrap(),
            },
        );
    }
    fn create(memory: &mut Memory, listing: &NewListing) -> Result<(), JourneyError> {
        memory.when(listing.streams(), |stage| listing.run(stage))
    }
    fn code(error: JourneyError) -> (&'static str, crate::Refusal) {
        (error.code(), error.refusal())
    }

    #[test]
    fn a_listing_is_created_with_its_stock_pool_and_its_products_first_entry() {
        let mut memory = Memory::default();
        open_wallet(&mut memory, 1, seller(), "EUR");
        let listing = new_listing(1, Some(wallet_id(1)));

        create(&mut memory, &listing).unwrap();

        assert_eq!(memory.events::<Listing>(listing_id(1)), ["ListingCreated"]);
        assert_eq!(memory.events::<Reservation>(listing_id(1)), ["PoolOpened"]);
        assert_eq!(
            memory.events::<ProductTimeline>(product_id()),
            ["TimelineStarted", "EntryRecorded"]
        );
        let created = memory.get::<Listing>(listing_id(1));
        assert_eq!(created.status(), ListingStatus::Active);
        assert_eq!(created.payout_wallet(), Some(wallet_id(1)));
        assert_eq!(created.seller(), seller().user_id);
        assert_eq!(memory.get::<Reservation>(listing_id(1)).available(), 3);
        assert_eq!(
            memory.get::<ProductTimeline>(product_id()).owner(),
            seller().user_id
        );
        assert!(memory.timers().is_empty());
    }

    #[test]
    fn a_listing_without_a_payout_wallet_touches_no_wallet() {
        let mut memory = Memory::default();
        let listing = new_listing(1, None);
        assert!(
            !listing
                .streams()
                .iter()
                .any(|s| matches!(s, Stream::Wallet(_)))
        );

        create(&mut memory, &listing).unwrap();

        assert_eq!(memory.all_events().len(), 4);
        assert_eq!(memory.get::<Listing>(listing_id(1)).payout_wallet(), None);
    }

    #[test]
    fn relisting_a_product_the_seller_owns_adds_to_its_story() {
        let mut memory = Memory::default();
        create(&mut memory, &new_listing(1, None)).unwrap();

        create(&mut memory, &new_listing(2, None)).unwrap();

        assert_eq!(
            memory.events::<ProductTimeline>(product_id()),
            ["EntryRecorded"]
        );
        assert_eq!(memory.get::<ProductTimeline>(product_id()).entries(), 2);
        assert_eq!(memory.get::<Reservation>(listing_id(2)).available(), 3);
    }

    #[test]
    fn relisting_someone_elses_product_is_refused_and_writes_nothing() {
        let mut memory = Memory::default();
        create(&mut memory, &new_listing(1, None)).unwrap();
        let mut theirs = new_listing(2, None);
        theirs.seller = other_seller();

        let error = create(&mut memory, &theirs).unwrap_err();

        assert_eq!(code(error), ("forbidden", crate::Refusal::Forbidden));
        assert!(memory.all_events().is_empty());
        assert!(!memory.get::<Listing>(listing_id(2)).exists());
        assert!(!memory.get::<Reservation>(listing_id(2)).exists());
    }

    #[test]
    fn a_payout_wallet_missing_not_the_sellers_or_in_another_currency_is_refused() {
        let mut memory = Memory::default();
        open_wallet(&mut memory, 1, other_seller(), "EUR");
        open_wallet(&mut memory, 2, seller(), "USD");
        let cases = [
            (9, ("wallet_not_found", crate::Refusal::NotFound)),
            (1, ("forbidden", crate::Refusal::Forbidden)),
            (2, ("currency_mismatch", crate::Refusal::Invalid)),
        ];
        for (wallet, expected) in cases {
            let listing = new_listing(1, Some(wallet_id(wallet)));

            let error = create(&mut memory, &listing).unwrap_err();

            assert_eq!(code(error), expected, "wallet {wallet}");
            assert!(memory.all_events().is_empty(), "wallet {wallet}");
            assert!(!memory.get::<Listing>(listing_id(1)).exists());
        }
    }

    #[test]
    fn only_a_seller_lists() {
        let mut memory = Memory::default();
        let mut listing = new_listing(1, None);
        listing.seller = buyer();

        let error = create(&mut memory, &listing).unwrap_err();

        assert_eq!(code(error).1, crate::Refusal::Forbidden);
        assert!(memory.all_events().is_empty());
    }

    fn hold_request(quantity: u32) -> HoldRequest {
        HoldRequest {
            listing_id: listing_id(1),
            holder: buyer(),
            quantity,
            expires_at: now() + chrono::TimeDelta::minutes(10),
        }
    }
    fn hold_id() -> HoldId {
        HoldId::from_uuid(Uuid::from_u128(400))
    }

    #[test]
    fn an_active_listing_takes_a_hold_that_expires_by_its_timer() {
        let mut memory = Memory::default();
        create(&mut memory, &new_listing(1, None)).unwrap();
        let listing = memory.get::<Listing>(listing_id(1));

        let planned = hold_request(2).plan(&listing, hold_id(), now()).unwrap();

        assert_eq!(planned.hold_id, hold_id());
        assert_eq!(
            planned.timer,
            Timer::HoldExpiry {
                listing_id: listing_id(1),
                hold_id: hold_id()
            }
        );
        assert_eq!(planned.due_at, now() + chrono::TimeDelta::minutes(10));
        memory
            .when(vec![Stream::Reservation(listing_id(1))], |stage| {
                stage.decide::<Reservation>(&key(listing_id(1)), planned.command.clone())
            })
            .unwrap();
        assert_eq!(memory.events::<Reservation>(listing_id(1)), ["HoldPlaced"]);
        let pool = memory.get::<Reservation>(listing_id(1));
        assert_eq!((pool.held(), pool.available()), (2, 1));
        let hold = pool.hold(hold_id()).unwrap();
        assert_eq!(hold.order_id, None);
    }

    #[test]
    fn a_hold_beyond_the_stock_is_refused_by_the_pool() {
        let mut memory = Memory::default();
        create(&mut memory, &new_listing(1, None)).unwrap();
        let listing = memory.get::<Listing>(listing_id(1));
        let planned = hold_request(4).plan(&listing, hold_id(), now()).unwrap();

        let error = memory
            .when(vec![Stream::Reservation(listing_id(1))], |stage| {
                stage.decide::<Reservation>(&key(listing_id(1)), planned.command.clone())
            })
            .unwrap_err();

        assert_eq!(
            code(error),
            ("insufficient_stock", crate::Refusal::Conflict)
        );
        assert_eq!(memory.get::<Reservation>(listing_id(1)).available(), 3);
    }

    #[test]
    fn a_paused_deleted_or_missing_listing_takes_no_hold() {
        let mut memory = Memory::default();
        create(&mut memory, &new_listing(1, None)).unwrap();
        memory.given::<Listing>(listing_id(1), ListingCommand::Pause { actor: seller() });
        let paused = memory.get::<Listing>(listing_id(1));
        let error = hold_request(1).plan(&paused, hold_id(), now()).unwrap_err();
        assert_eq!(
            code(error.clone()),
            ("listing_unavailable", crate::Refusal::Conflict)
        );
        assert_eq!(
            error.to_string(),
            format!("listing {} is paused", listing_id(1))
        );

        memory.given::<Listing>(listing_id(1), ListingCommand::Delete { actor: seller() });
        let deleted = memory.get::<Listing>(listing_id(1));
        let error = hold_request(1)
            .plan(&deleted, hold_id(), now())
            .unwrap_err();
        assert_eq!(
            code(error),
            ("listing_unavailable", crate::Refusal::Conflict)
        );

        let error = hold_request(1)
            .plan(&Listing::default(), hold_id(), now())
            .unwrap_err();
        assert_eq!(code(error), ("listing_not_found", crate::Refusal::NotFound));
    }

    #[test]
    fn the_hold_is_the_buyers_and_outside_any_order() {
        let mut memory = Memory::default();
        create(&mut memory, &new_listing(1, None)).unwrap();
        let listing = memory.get::<Listing>(listing_id(1));

        let planned = hold_request(1).plan(&listing, hold_id(), now()).unwrap();

        match planned.command {
            ReservationCommand::Reserve {
                actor,
                holder,
                order_id,
                ..
            } => {
                assert_eq!((actor, holder, order_id), (buyer(), buyer().user_id, None));
            }
            other => panic!("not a reserve: {other:?}"),
        }
    }

    // ---- price ---------------------------------------------------------------

    fn admin() -> Actor {
        Actor::new(UserId::from_uuid(Uuid::from_u128(99)), Role::Admin)
    }
    fn price_change(actor: Actor, price: Money) -> PriceChange {
        PriceChange {
            listing_id: listing_id(1),
            product_id: product_id(),
            actor,
            price,
        }
    }
    fn change_price(memory: &mut Memory, change: &PriceChange) -> Result<(), JourneyError> {
        memory.when(change.streams(), |stage| change.run(stage))
    }

    #[test]
    fn a_new_price_changes_the_listing_and_is_recorded_on_its_products_timeline() {
        let mut memory = Memory::default();
        create(&mut memory, &new_listing(1, None)).unwrap();

        change_price(&mut memory, &price_change(seller(), money(3_900, "EUR"))).unwrap();

        assert_eq!(
            memory.events::<Listing>(listing_id(1)),
            ["ListingPriceChanged"]
        );
        assert_eq!(
            memory.events::<ProductTimeline>(product_id()),
            ["EntryRecorded"]
        );
        assert_eq!(
            memory.get::<Listing>(listing_id(1)).price(),
            &money(3_900, "EUR")
        );
        assert_eq!(memory.get::<ProductTimeline>(product_id()).entries(), 2);
        assert!(memory.timers().is_empty());
    }

    #[test]
    fn an_admin_changes_the_price_too() {
        let mut memory = Memory::default();
        create(&mut memory, &new_listing(1, None)).unwrap();

        change_price(&mut memory, &price_change(admin(), money(3_900, "EUR"))).unwrap();

        assert_eq!(
            memory.get::<Listing>(listing_id(1)).price(),
            &money(3_900, "EUR")
        );
    }

    #[test]
    fn a_listing_whose_product_has_no_timeline_still_changes_its_price() {
        let mut memory = Memory::default();
        // A listing created before products had timelines.
        memory.given::<Listing>(
            listing_id(1),
            ListingCommand::Create {
                actor: seller(),
                listing_id: listing_id(1),
                product_id: product_id(),
                details: details(),
                price: money(4_500, "EUR"),
                payout_wallet: None,
            },
        );

        change_price(&mut memory, &price_change(seller(), money(3_900, "EUR"))).unwrap();

        assert_eq!(memory.all_events(), ["Listing:ListingPriceChanged"]);
        assert!(!memory.get::<ProductTimeline>(product_id()).exists());
    }

    #[test]
    fn a_price_change_is_refused_and_writes_nothing() {
        let mut memory = Memory::default();
        create(&mut memory, &new_listing(1, None)).unwrap();
        let cases = [
            (
                price_change(other_seller(), money(3_900, "EUR")),
                ("forbidden", crate::Refusal::Forbidden),
            ),
            (
                price_change(buyer(), money(3_900, "EUR")),
                ("forbidden", crate::Refusal::Forbidden),
            ),
            (
                price_change(seller(), money(3_900, "USD")),
                ("currency_mismatch", crate::Refusal::Invalid),
            ),
            (
                price_change(seller(), money(4_500, "EUR")),
                ("no_change", crate::Refusal::Conflict),
            ),
        ];
        for (change, expected) in cases {
            let error = change_price(&mut memory, &change).unwrap_err();

            assert_eq!(code(error), expected, "{change:?}");
            assert!(memory.all_events().is_empty(), "{change:?}");
            assert_eq!(
                memory.get::<Listing>(listing_id(1)).price(),
                &money(4_500, "EUR")
            );
            assert_eq!(memory.get::<ProductTimeline>(product_id()).entries(), 1);
        }
    }

    #[test]
    fn a_deleted_or_missing_listing_keeps_its_price() {
        let mut memory = Memory::default();
        let error =
            change_price(&mut memory, &price_change(seller(), money(3_900, "EUR"))).unwrap_err();
        assert_eq!(code(error), ("listing_not_found", crate::Refusal::NotFound));
        assert!(memory.all_events().is_empty());

        create(&mut memory, &new_listing(1, None)).unwrap();
        memory.given::<Listing>(listing_id(1), ListingCommand::Delete { actor: seller() });
        let error =
            change_price(&mut memory, &price_change(seller(), money(3_900, "EUR"))).unwrap_err();
        assert_eq!(code(error), ("listing_deleted", crate::Refusal::Conflict));
        assert!(memory.all_events().is_empty());
        assert_eq!(memory.get::<ProductTimeline>(product_id()).entries(), 1);
    }

    #[test]
    fn a_price_change_declares_the_listing_and_its_products_timeline() {
        assert_eq!(
            price_change(seller(), money(1, "EUR")).streams(),
            [
                Stream::Listing(listing_id(1)),
                Stream::Timeline(product_id())
            ]
        );
    }

    // ---- details -------------------------------------------------------------

    fn details_update(actor: Actor, changes: DetailChanges) -> DetailsUpdate {
        DetailsUpdate {
            listing_id: listing_id(1),
            actor,
            changes,
        }
    }
    fn update(memory: &mut Memory, update: &DetailsUpdate) -> Result<(), JourneyError> {
        memory.when(update.streams(), |stage| update.run(stage))
    }
    fn title(text: &str) -> Title {
        Title::parse("title", text).unwrap()
    }

    #[test]
    fn changed_details_are_merged_over_the_current_ones() {
        let mut memory = Memory::default();
        create(&mut memory, &new_listing(1, None)).unwrap();
        let changes = DetailChanges {
            title: Some(title("Oak side table")),
            subcategory: Some(Label::parse("subcategory", "tables").unwrap()),
            images: Some(vec![]),
            ..DetailChanges::default()
        };

        update(&mut memory, &details_update(seller(), changes)).unwrap();

        assert_eq!(memory.all_events(), ["Listing:ListingDetailsUpdated"]);
        let after = memory.get::<Listing>(listing_id(1)).details().clone();
        let expected = ListingDetails {
            title: title("Oak side table"),
            subcategory: Some(Label::parse("subcategory", "tables").unwrap()),
            images: vec![],
            ..details()
        };
        assert_eq!(after, expected);
    }

    #[test]
    fn no_changes_keep_every_field_and_an_admin_may_update() {
        let mut memory = Memory::default();
        create(&mut memory, &new_listing(1, None)).unwrap();

        update(
            &mut memory,
            &details_update(admin(), DetailChanges::default()),
        )
        .unwrap();

        assert_eq!(memory.all_events(), ["Listing:ListingDetailsUpdated"]);
        assert_eq!(memory.get::<Listing>(listing_id(1)).details(), &details());
        assert_eq!(DetailChanges::default().apply(details()), details());
    }

    #[test]
    fn a_details_update_is_refused_and_writes_nothing() {
        let mut memory = Memory::default();
        let changes = DetailChanges {
            title: Some(title("Oak side table")),
            ..DetailChanges::default()
        };
        let error = update(&mut memory, &details_update(seller(), changes.clone())).unwrap_err();
        assert_eq!(code(error), ("listing_not_found", crate::Refusal::NotFound));

        create(&mut memory, &new_listing(1, None)).unwrap();
        for actor in [other_seller(), buyer()] {
            let error = update(&mut memory, &details_update(actor, changes.clone())).unwrap_err();
            assert_eq!(code(error), ("forbidden", crate::Refusal::Forbidden));
            assert!(memory.all_events().is_empty());
        }
        let too_many = DetailChanges {
            images: Some(vec![
                Url::parse("image", "https://img.example/a.jpg")
                    .unwrap();
                crate::listing::MAX_IMAGES + 1
            ]),
            ..DetailChanges::default()
        };
        let error = update(&mut memory, &details_update(seller(), too_many)).unwrap_err();
        assert_eq!(code(error), ("too_many", crate::Refusal::Invalid));

        memory.given::<Listing>(listing_id(1), ListingCommand::Delete { actor: seller() });
        let error = update(&mut memory, &details_update(seller(), changes)).unwrap_err();
        assert_eq!(code(error), ("listing_deleted", crate::Refusal::Conflict));
        assert!(memory.all_events().is_empty());
        assert_eq!(memory.get::<Listing>(listing_id(1)).details(), &details());
    }
}
