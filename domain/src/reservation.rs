//! The Reservation aggregate: the stock pool of one listing (its id is the
//! listing's id) and the holds buyers have on it.
//!
//! Invariant: the sum of active holds never exceeds the stock on hand, so
//! `available()` never goes below zero and a hot listing never oversells.
//! Every hold ends exactly once: confirmed (sold, the units leave stock),
//! released or expired. Closed holds are forgotten rather than kept, so the
//! state of a listing that sold a million units stays as small as its
//! currently open holds; a command about a closed hold is refused with
//! `hold_not_active`.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::values::{Actor, HoldId, ListingId, OrderId, Reason, Role, UserId};
use crate::{Aggregate, Decide, DecodeError, DomainError, DomainEvent, Refusal};

/// Most units one hold may take, so that one buyer cannot lock a pool with
/// a single command.
pub const MAX_HOLD_QUANTITY: u32 = 1000;

/// Units of a pool set aside for one holder until they expire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub holder: UserId,
    pub quantity: u32,
    pub expires_at: DateTime<Utc>,
    pub order_id: Option<OrderId>,
}

/// State of one listing's stock pool. Meaningful only once [`Decide::exists`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Reservation {
    opened: bool,
    listing_id: ListingId,
    seller: UserId,
    stock: u32,
    holds: BTreeMap<HoldId, Hold>,
}

impl Reservation {
    pub fn listing_id(&self) -> ListingId {
        self.listing_id
    }

    pub fn seller(&self) -> UserId {
        self.seller
    }

    /// Units on hand, held or not.
    pub fn stock(&self) -> u32 {
        self.stock
    }

    /// Units in active holds.
    pub fn held(&self) -> u32 {
        let held: u64 = self.holds.values().map(|h| u64::from(h.quantity)).sum();
        // Never above `stock` (a u32) while the invariant holds.
        u32::try_from(held).unwrap_or(u32::MAX)
    }

    /// Units anyone may still reserve: stock minus active holds.
    pub fn available(&self) -> u32 {
        self.stock.saturating_sub(self.held())
    }

    /// Active holds by id.
    pub fn holds(&self) -> &BTreeMap<HoldId, Hold> {
        &self.holds
    }

    pub fn hold(&self, hold_id: HoldId) -> Option<&Hold> {
        self.holds.get(&hold_id)
    }
}

#[derive(Debug, Clone)]
pub enum ReservationCommand {
    /// The listing's seller, or Souk when it creates the listing.
    OpenPool {
        actor: Actor,
        listing_id: ListingId,
        seller: UserId,
        quantity: u32,
    },
    /// The pool's seller or an admin: the stock on hand, held units included.
    SetStock { actor: Actor, quantity: u32 },
    /// The holder in person, or Souk on their behalf (checkout). Expires
    /// overdue holds first, so that their units count as available.
    Reserve {
        actor: Actor,
        hold_id: HoldId,
        holder: UserId,
        quantity: u32,
        expires_at: DateTime<Utc>,
        order_id: Option<OrderId>,
        now: DateTime<Utc>,
    },
    /// The holder, Souk or an admin: the units are sold and leave stock.
    Confirm { actor: Actor, hold_id: HoldId },
    /// The holder, the pool's seller, Souk or an admin: the units return.
    Release {
        actor: Actor,
        hold_id: HoldId,
        reason: Reason,
    },
    /// Souk's expiry timer.
    Expire {
        actor: Actor,
        hold_id: HoldId,
        now: DateTime<Utc>,
    },
}

/// `stock` and `available` are the pool's values after the event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ReservationEvent {
    PoolOpened {
        listing_id: ListingId,
        seller: UserId,
        quantity: u32,
    },
    StockSet {
        quantity: u32,
        available: u32,
    },
    HoldPlaced {
        hold_id: HoldId,
        holder: UserId,
        quantity: u32,
        expires_at: DateTime<Utc>,
        order_id: Option<OrderId>,
        available: u32,
    },
    HoldConfirmed {
        hold_id: HoldId,
        quantity: u32,
        order_id: Option<OrderId>,
        stock: u32,
        available: u32,
    },
    HoldReleased {
        hold_id: HoldId,
        quantity: u32,
        reason: Reason,
        available: u32,
    },
    HoldExpired {
        hold_id: HoldId,
        quantity: u32,
        available: u32,
    },
}

impl DomainEvent for ReservationEvent {
    fn event_type(&self) -> String {
        match self {
            Self::PoolOpened { .. } => "PoolOpened",
            Self::StockSet { .. } => "StockSet",
            Self::HoldPlaced { .. } => "HoldPlaced",
            Self::HoldConfirmed { .. } => "HoldConfirmed",
            Self::HoldReleased { .. } => "HoldReleased",
            Self::HoldExpired { .. } => "HoldExpired",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1".to_owned()
    }

    fn decode(event_type: &str, event_version: &str, payload: &str) -> Result<Self, DecodeError> {
        crate::decode_current(event_type, event_version, payload)
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReservationError {
    #[error("no stock pool for this listing")]
    PoolNotFound,
    #[error("the stock pool is already open")]
    AlreadyExists,
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("a seller may not reserve their own listing")]
    OwnListing,
    #[error("cannot set stock to {quantity}: {held} units are held")]
    StockBelowHeld { quantity: u32, held: u32 },
    #[error("quantity must be between 1 and {MAX_HOLD_QUANTITY}, got {0}")]
    InvalidQuantity(u32),
    #[error("a hold must expire after now")]
    InvalidExpiry,
    #[error("only {available} units available, {requested} requested")]
    InsufficientStock { requested: u32, available: u32 },
    #[error("hold {0} already exists")]
    DuplicateHold(HoldId),
    #[error("hold {0} is not active")]
    HoldNotActive(HoldId),
    #[error("hold {hold_id} expires at {expires_at}")]
    NotYetExpired {
        hold_id: HoldId,
        expires_at: DateTime<Utc>,
    },
}

impl DomainError for ReservationError {
    fn code(&self) -> &'static str {
        match self {
            Self::PoolNotFound => "pool_not_found",
            Self::AlreadyExists => "already_exists",
            Self::Forbidden(_) => "forbidden",
            Self::OwnListing => "own_listing",
            Self::StockBelowHeld { .. } => "stock_below_held",
            Self::InvalidQuantity(_) => "invalid_quantity",
            Self::InvalidExpiry => "invalid_expiry",
            Self::InsufficientStock { .. } => "insufficient_stock",
            Self::DuplicateHold(_) => "duplicate_hold",
            Self::HoldNotActive(_) => "hold_not_active",
            Self::NotYetExpired { .. } => "not_yet_expired",
        }
    }

    fn refusal(&self) -> Refusal {
        match self {
            Self::PoolNotFound => Refusal::NotFound,
            Self::Forbidden(_) | Self::OwnListing => Refusal::Forbidden,
            Self::InvalidQuantity(_) | Self::InvalidExpiry => Refusal::Invalid,
            Self::AlreadyExists
            | Self::StockBelowHeld { .. }
            | Self::InsufficientStock { .. }
            | Self::DuplicateHold(_)
            | Self::HoldNotActive(_)
            | Self::NotYetExpired { .. } => Refusal::Conflict,
        }
    }
}

impl Reservation {
    fn open(&self) -> Result<(), ReservationError> {
        if self.opened {
            Ok(())
        } else {
            Err(ReservationError::PoolNotFound)
        }
    }

    fn active_hold(&self, hold_id: HoldId) -> Result<&Hold, ReservationError> {
        self.holds
            .get(&hold_id)
            .ok_or(ReservationError::HoldNotActive(hold_id))
    }

    #[allow(clippy::too_many_arguments)] // The fields of `Reserve`, unpacked.
    fn reserve(
        &self,
        actor: Actor,
        hold_id: HoldId,
        holder: UserId,
        quantity: u32,
        expires_at: DateTime<Utc>,
        order_id: Option<OrderId>,
        now: DateTime<Utc>,
    ) -> Result<Vec<ReservationEvent>, ReservationError> {
        if !(actor.is_user(holder) || actor.is_system()) {
            return Err(ReservationError::Forbidden(
                "only the holder or Souk may reserve",
            ));
        }
        if holder == self.seller {
            return Err(ReservationError::OwnListing);
        }
        if !(1..=MAX_HOLD_QUANTITY).contains(&quantity) {
            return Err(ReservationError::InvalidQuantity(quantity));
        }
        if expires_at <= now {
            return Err(ReservationError::InvalidExpiry);
        }
        // Hold ids are unique for good: reusing the id of a hold about to
        // expire would make its expiry and its placement look like one hold.
        if self.holds.contains_key(&hold_id) {
            return Err(ReservationError::DuplicateHold(hold_id));
        }

        // Overdue holds are expired here rather than waiting for the timer,
        // so a hot listing never refuses a buyer for stock nobody holds.
        let mut events = Vec::new();
        let mut available = self.available();
        for (id, hold) in self.holds.iter().filter(|(_, h)| h.expires_at <= now) {
            available = available.saturating_add(hold.quantity);
            events.push(ReservationEvent::HoldExpired {
                hold_id: *id,
                quantity: hold.quantity,
                available,
            });
        }
        if quantity > available {
            return Err(ReservationError::InsufficientStock {
                requested: quantity,
                available,
            });
        }
        events.push(ReservationEvent::HoldPlaced {
            hold_id,
            holder,
            quantity,
            expires_at,
            order_id,
            available: available - quantity,
        });
        Ok(events)
    }
}

impl Decide for Reservation {
    fn decide(
        &self,
        command: ReservationCommand,
    ) -> Result<Vec<ReservationEvent>, ReservationError> {
        match command {
            ReservationCommand::OpenPool {
                actor,
                listing_id,
                seller,
                quantity,
            } => {
                if self.opened {
                    return Err(ReservationError::AlreadyExists);
                }
                let sellers_own = actor.role == Role::Seller && actor.user_id == seller;
                if !(sellers_own || actor.is_system()) {
                    return Err(ReservationError::Forbidden(
                        "only the listing's seller or Souk may open its stock pool",
                    ));
                }
                Ok(vec![ReservationEvent::PoolOpened {
                    listing_id,
                    seller,
                    quantity,
                }])
            }
            ReservationCommand::SetStock { actor, quantity } => {
                self.open()?;
                if !(actor.is_user(self.seller) || actor.is_admin()) {
                    return Err(ReservationError::Forbidden(
                        "only the listing's seller or an admin may set its stock",
                    ));
                }
                let held = self.held();
                if quantity < held {
                    return Err(ReservationError::StockBelowHeld { quantity, held });
                }
                Ok(vec![ReservationEvent::StockSet {
                    quantity,
                    available: quantity - held,
                }])
            }
            ReservationCommand::Reserve {
                actor,
                hold_id,
                holder,
                quantity,
                expires_at,
                order_id,
                now,
            } => {
                self.open()?;
                self.reserve(actor, hold_id, holder, quantity, expires_at, order_id, now)
            }
            ReservationCommand::Confirm { actor, hold_id } => {
                self.open()?;
                let hold = self.active_hold(hold_id)?;
                if !(actor.is_user(hold.holder) || actor.is_system() || actor.is_admin()) {
                    return Err(ReservationError::Forbidden(
                        "only the holder, Souk or an admin may confirm a hold",
                    ));
                }
                Ok(vec![ReservationEvent::HoldConfirmed {
                    hold_id,
                    quantity: hold.quantity,
                    order_id: hold.order_id,
                    // Held units are part of stock, so this cannot saturate
                    // while the invariant holds; the available count is
                    // unchanged because the units were not available anyway.
                    stock: self.stock.saturating_sub(hold.quantity),
                    available: self.available(),
                }])
            }
            ReservationCommand::Release {
                actor,
                hold_id,
                reason,
            } => {
                self.open()?;
                let hold = self.active_hold(hold_id)?;
                let allowed = actor.is_user(hold.holder)
                    || actor.is_user(self.seller)
                    || actor.is_system()
                    || actor.is_admin();
                if !allowed {
                    return Err(ReservationError::Forbidden(
                        "only the holder, the seller, Souk or an admin may release a hold",
                    ));
                }
                Ok(vec![ReservationEvent::HoldReleased {
                    hold_id,
                    quantity: hold.quantity,
                    reason,
                    available: self.available().saturating_add(hold.quantity),
                }])
            }
            ReservationCommand::Expire {
                actor,
                hold_id,
                now,
            } => {
                self.open()?;
                if !actor.is_system() {
                    return Err(ReservationError::Forbidden("only Souk expires holds"));
                }
                let hold = self.active_hold(hold_id)?;
                if hold.expires_at > now {
                    return Err(ReservationError::NotYetExpired {
                        hold_id,
                        expires_at: hold.expires_at,
                    });
                }
                Ok(vec![ReservationEvent::HoldExpired {
                    hold_id,
                    quantity: hold.quantity,
                    available: self.available().saturating_add(hold.quantity),
                }])
            }
        }
    }

    fn exists(&self) -> bool {
        self.opened
    }
}

impl Aggregate for Reservation {
    const TYPE: &'static str = "Reservation";
    type Command = ReservationCommand;
    type Event = ReservationEvent;
    type Error = ReservationError;
    fn apply(&mut self, event: ReservationEvent) {
        match event {
            ReservationEvent::PoolOpened {
                listing_id,
                seller,
                quantity,
            } => {
                self.opened = true;
                self.listing_id = listing_id;
                self.seller = seller;
                self.stock = quantity;
            }
            ReservationEvent::StockSet { quantity, .. } => self.stock = quantity,
            ReservationEvent::HoldPlaced {
                hold_id,
                holder,
                quantity,
                expires_at,
                order_id,
                ..
            } => {
                self.holds.insert(
                    hold_id,
                    Hold {
                        holder,
                        quantity,
                        expires_at,
                        order_id,
                    },
                );
            }
            ReservationEvent::HoldConfirmed {
                hold_id, quantity, ..
            } => {
                if self.holds.remove(&hold_id).is_some() {
                    self.stock = self.stock.saturating_sub(quantity);
                }
            }
            ReservationEvent::HoldReleased { hold_id, .. }
            | ReservationEvent::HoldExpired { hold_id, .. } => {
                self.holds.remove(&hold_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::given;
    use chrono::{Duration, TimeZone};

    use ReservationCommand as C;
    use ReservationEvent as E;

    fn user(n: u128) -> UserId {
        UserId::from_uuid(uuid::Uuid::from_u128(n))
    }
    fn seller() -> Actor {
        Actor::new(user(1), Role::Seller)
    }
    fn buyer() -> Actor {
        Actor::new(user(2), Role::Buyer)
    }
    fn other_buyer() -> Actor {
        Actor::new(user(3), Role::Buyer)
    }
    fn admin() -> Actor {
        Actor::new(user(4), Role::Admin)
    }
    fn hold_id(n: u128) -> HoldId {
        HoldId::from_uuid(uuid::Uuid::from_u128(n))
    }
    fn order_id() -> OrderId {
        OrderId::from_uuid(uuid::Uuid::from_u128(77))
    }
    fn listing_id() -> ListingId {
        ListingId::from_uuid(uuid::Uuid::from_u128(10))
    }
    fn t(minutes: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 1, 1, 12, 0, 0).unwrap() + Duration::minutes(minutes)
    }
    fn reason() -> Reason {
        Reason::parse("reason", "changed my mind").unwrap()
    }

    fn opened(quantity: u32) -> E {
        E::PoolOpened {
            listing_id: listing_id(),
            seller: seller().user_id,
            quantity,
        }
    }

    /// A hold of `quantity` by the buyer, expiring at minute 10.
    fn placed(n: u128, quantity: u32, available: u32) -> E {
        E::HoldPlaced {
            hold_id: hold_id(n),
            holder: buyer().user_id,
            quantity,
            expires_at: t(10),
            order_id: None,
            available,
        }
    }

    fn reserve(actor: Actor, n: u128, quantity: u32, now: DateTime<Utc>) -> C {
        C::Reserve {
            actor,
            hold_id: hold_id(n),
            holder: buyer().user_id,
            quantity,
            expires_at: now + Duration::minutes(10),
            order_id: None,
            now,
        }
    }

    #[test]
    fn the_seller_or_souk_opens_the_pool_once() {
        for actor in [seller(), Actor::system()] {
            let pool = given::<Reservation>([])
                .when(C::OpenPool {
                    actor,
                    listing_id: listing_id(),
                    seller: seller().user_id,
                    quantity: 5,
                })
                .then(vec![opened(5)]);
            assert_eq!((pool.stock(), pool.available()), (5, 5));
            assert_eq!(pool.seller(), seller().user_id);
            assert_eq!(pool.listing_id(), listing_id());
        }
        given::<Reservation>([])
            .when(C::OpenPool {
                actor: Actor::new(user(9), Role::Seller),
                listing_id: listing_id(),
                seller: seller().user_id,
                quantity: 5,
            })
            .then_refused("forbidden");
        given::<Reservation>([opened(5)])
            .when(C::OpenPool {
                actor: seller(),
                listing_id: listing_id(),
                seller: seller().user_id,
                quantity: 5,
            })
            .then_refused("already_exists");
    }

    #[test]
    fn commands_on_a_missing_pool_are_not_found() {
        let error = given::<Reservation>([])
            .when(C::SetStock {
                actor: seller(),
                quantity: 1,
            })
            .then_refused("pool_not_found");
        assert_eq!(error.refusal(), Refusal::NotFound);
        given::<Reservation>([])
            .when(reserve(buyer(), 1, 1, t(0)))
            .then_refused("pool_not_found");
    }

    #[test]
    fn a_buyer_reserves_available_stock() {
        let pool = given::<Reservation>([opened(5)])
            .when(reserve(buyer(), 1, 2, t(0)))
            .then(vec![placed(1, 2, 3)]);
        assert_eq!((pool.stock(), pool.held(), pool.available()), (5, 2, 3));
        assert_eq!(pool.hold(hold_id(1)).unwrap().quantity, 2);
        assert_eq!(pool.holds().len(), 1);
    }

    #[test]
    fn souk_reserves_on_behalf_of_a_buyer_during_checkout() {
        let pool = given::<Reservation>([opened(5)])
            .when(C::Reserve {
                actor: Actor::system(),
                hold_id: hold_id(1),
                holder: buyer().user_id,
                quantity: 1,
                expires_at: t(10),
                order_id: Some(order_id()),
                now: t(0),
            })
            .then(vec![E::HoldPlaced {
                hold_id: hold_id(1),
                holder: buyer().user_id,
                quantity: 1,
                expires_at: t(10),
                order_id: Some(order_id()),
                available: 4,
            }]);
        assert_eq!(pool.hold(hold_id(1)).unwrap().order_id, Some(order_id()));
    }

    #[test]
    fn nobody_reserves_for_someone_else() {
        let error = given::<Reservation>([opened(5)])
            .when(reserve(other_buyer(), 1, 1, t(0)))
            .then_refused("forbidden");
        assert_eq!(error.refusal(), Refusal::Forbidden);
        let auditor = Actor::new(buyer().user_id, Role::Auditor);
        given::<Reservation>([opened(5)])
            .when(reserve(auditor, 1, 1, t(0)))
            .then_refused("forbidden");
    }

    #[test]
    fn a_seller_may_not_reserve_their_own_listing() {
        let error = given::<Reservation>([opened(5)])
            .when(C::Reserve {
                actor: seller(),
                hold_id: hold_id(1),
                holder: seller().user_id,
                quantity: 1,
                expires_at: t(10),
                order_id: None,
                now: t(0),
            })
            .then_refused("own_listing");
        assert_eq!(error.refusal(), Refusal::Forbidden);
    }

    #[test]
    fn a_reservation_takes_one_to_a_thousand_units_and_expires_later() {
        for quantity in [0, MAX_HOLD_QUANTITY + 1] {
            let error = given::<Reservation>([opened(5000)])
                .when(reserve(buyer(), 1, quantity, t(0)))
                .then_refused("invalid_quantity");
            assert_eq!(error.refusal(), Refusal::Invalid);
        }
        given::<Reservation>([opened(5000)])
            .when(reserve(buyer(), 1, MAX_HOLD_QUANTITY, t(0)))
            .then(vec![placed(1, MAX_HOLD_QUANTITY, 4000)]);
        for expires_at in [t(0), t(-1)] {
            given::<Reservation>([opened(5)])
                .when(C::Reserve {
                    actor: buyer(),
                    hold_id: hold_id(1),
                    holder: buyer().user_id,
                    quantity: 1,
                    expires_at,
                    order_id: None,
                    now: t(0),
                })
                .then_refused("invalid_expiry");
        }
    }

    #[test]
    fn a_reservation_beyond_available_stock_is_refused() {
        let error = given::<Reservation>([opened(5), placed(1, 4, 1)])
            .when(reserve(buyer(), 2, 2, t(1)))
            .then_refused("insufficient_stock");
        assert_eq!(error.refusal(), Refusal::Conflict);
        assert_eq!(
            error,
            ReservationError::InsufficientStock {
                requested: 2,
                available: 1
            }
        );
    }

    #[test]
    fn overdue_holds_expire_before_stock_is_checked() {
        let holds = [opened(5), placed(2, 3, 2), placed(1, 2, 0)];
        // At minute 10 both holds are due: they expire in hold id order,
        // then the new hold fits.
        let pool = given::<Reservation>(holds.clone())
            .when(reserve(buyer(), 3, 4, t(10)))
            .then(vec![
                E::HoldExpired {
                    hold_id: hold_id(1),
                    quantity: 2,
                    available: 2,
                },
                E::HoldExpired {
                    hold_id: hold_id(2),
                    quantity: 3,
                    available: 5,
                },
                E::HoldPlaced {
                    hold_id: hold_id(3),
                    holder: buyer().user_id,
                    quantity: 4,
                    expires_at: t(20),
                    order_id: None,
                    available: 1,
                },
            ]);
        assert_eq!(pool.holds().len(), 1);
        assert_eq!(pool.available(), 1);
        // A minute earlier nothing is due and nothing fits.
        given::<Reservation>(holds)
            .when(reserve(buyer(), 3, 1, t(9)))
            .then_refused("insufficient_stock");
    }

    #[test]
    fn a_hold_id_is_used_once() {
        let error = given::<Reservation>([opened(5), placed(1, 1, 4)])
            .when(reserve(buyer(), 1, 1, t(1)))
            .then_refused("duplicate_hold");
        assert_eq!(error.refusal(), Refusal::Conflict);
    }

    #[test]
    fn confirming_a_hold_sells_its_units() {
        for actor in [buyer(), Actor::system(), admin()] {
            let pool = given::<Reservation>([opened(5), placed(1, 2, 3)])
                .when(C::Confirm {
                    actor,
                    hold_id: hold_id(1),
                })
                .then(vec![E::HoldConfirmed {
                    hold_id: hold_id(1),
                    quantity: 2,
                    order_id: None,
                    stock: 3,
                    available: 3,
                }]);
            assert_eq!((pool.stock(), pool.held(), pool.available()), (3, 0, 3));
        }
        for actor in [seller(), other_buyer()] {
            given::<Reservation>([opened(5), placed(1, 2, 3)])
                .when(C::Confirm {
                    actor,
                    hold_id: hold_id(1),
                })
                .then_refused("forbidden");
        }
    }

    #[test]
    fn a_hold_ends_exactly_once() {
        let confirmed = E::HoldConfirmed {
            hold_id: hold_id(1),
            quantity: 2,
            order_id: None,
            stock: 3,
            available: 3,
        };
        let commands = [
            C::Confirm {
                actor: Actor::system(),
                hold_id: hold_id(1),
            },
            C::Release {
                actor: Actor::system(),
                hold_id: hold_id(1),
                reason: reason(),
            },
            C::Expire {
                actor: Actor::system(),
                hold_id: hold_id(1),
                now: t(60),
            },
        ];
        for command in commands {
            let error = given::<Reservation>([opened(5), placed(1, 2, 3), confirmed.clone()])
                .when(command)
                .then_refused("hold_not_active");
            assert_eq!(error.refusal(), Refusal::Conflict);
        }
    }

    #[test]
    fn releasing_a_hold_returns_its_units() {
        for actor in [buyer(), seller(), Actor::system(), admin()] {
            let pool = given::<Reservation>([opened(5), placed(1, 2, 3)])
                .when(C::Release {
                    actor,
                    hold_id: hold_id(1),
                    reason: reason(),
                })
                .then(vec![E::HoldReleased {
                    hold_id: hold_id(1),
                    quantity: 2,
                    reason: reason(),
                    available: 5,
                }]);
            assert_eq!((pool.stock(), pool.available()), (5, 5));
        }
        given::<Reservation>([opened(5), placed(1, 2, 3)])
            .when(C::Release {
                actor: other_buyer(),
                hold_id: hold_id(1),
                reason: reason(),
            })
            .then_refused("forbidden");
    }

    #[test]
    fn only_souk_expires_a_hold_and_only_once_it_is_due() {
        let pool = given::<Reservation>([opened(5), placed(1, 2, 3)])
            .when(C::Expire {
                actor: Actor::system(),
                hold_id: hold_id(1),
                now: t(10),
            })
            .then(vec![E::HoldExpired {
                hold_id: hold_id(1),
                quantity: 2,
                available: 5,
            }]);
        assert_eq!(pool.available(), 5);

        let error = given::<Reservation>([opened(5), placed(1, 2, 3)])
            .when(C::Expire {
                actor: Actor::system(),
                hold_id: hold_id(1),
                now: t(9),
            })
            .then_refused("not_yet_expired");
        assert_eq!(error.refusal(), Refusal::Conflict);
        given::<Reservation>([opened(5), placed(1, 2, 3)])
            .when(C::Expire {
                actor: admin(),
                hold_id: hold_id(1),
                now: t(10),
            })
            .then_refused("forbidden");
    }

    #[test]
    fn the_seller_or_an_admin_sets_stock_but_never_below_what_is_held() {
        for actor in [seller(), admin()] {
            let pool = given::<Reservation>([opened(5), placed(1, 2, 3)])
                .when(C::SetStock { actor, quantity: 2 })
                .then(vec![E::StockSet {
                    quantity: 2,
                    available: 0,
                }]);
            assert_eq!((pool.stock(), pool.available()), (2, 0));
        }
        let error = given::<Reservation>([opened(5), placed(1, 2, 3)])
            .when(C::SetStock {
                actor: seller(),
                quantity: 1,
            })
            .then_refused("stock_below_held");
        assert_eq!(error.refusal(), Refusal::Conflict);
        for actor in [buyer(), Actor::system()] {
            given::<Reservation>([opened(5)])
                .when(C::SetStock { actor, quantity: 1 })
                .then_refused("forbidden");
        }
    }

    /// A hot listing: many buyers, random reservations, confirmations,
    /// releases, expiries and restocks. Whatever the interleaving, holds
    /// never exceed stock and every event reports the pool as it really is.
    #[test]
    fn a_hot_listing_never_oversells() {
        let mut seed: u64 = 0x5eed;
        let mut next = |bound: u64| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) % bound
        };
        let mut pool = Reservation::default();
        pool.apply(opened(50));
        let mut sold: u64 = 0;
        let mut refused_for_stock = 0;
        for step in 0..5_000u32 {
            let now = t(i64::from(step));
            let holder = user(100 + u128::from(next(200)));
            let some_hold = || hold_id(u128::from(step.saturating_sub(7)));
            let command = match next(10) {
                0..=4 => C::Reserve {
                    actor: Actor::new(holder, Role::Buyer),
                    hold_id: hold_id(u128::from(step)),
                    holder,
                    quantity: 1 + u32::try_from(next(5)).unwrap(),
                    expires_at: now + Duration::minutes(1 + i64::try_from(next(20)).unwrap()),
                    order_id: None,
                    now,
                },
                5 | 6 => C::Confirm {
                    actor: Actor::system(),
                    hold_id: some_hold(),
                },
                7 => C::Release {
                    actor: Actor::system(),
                    hold_id: some_hold(),
                    reason: reason(),
                },
                8 => C::Expire {
                    actor: Actor::system(),
                    hold_id: some_hold(),
                    now,
                },
                _ => C::SetStock {
                    actor: seller(),
                    quantity: u32::try_from(next(60)).unwrap(),
                },
            };
            match pool.decide(command) {
                Ok(events) => {
                    for event in events {
                        if let E::HoldConfirmed { quantity, .. } = &event {
                            sold += u64::from(*quantity);
                        }
                        let reported = match &event {
                            E::StockSet { available, .. }
                            | E::HoldPlaced { available, .. }
                            | E::HoldConfirmed { available, .. }
                            | E::HoldReleased { available, .. }
                            | E::HoldExpired { available, .. } => *available,
                            E::PoolOpened { .. } => unreachable!(),
                        };
                        pool.apply(event);
                        assert_eq!(reported, pool.available());
                    }
                }
                Err(ReservationError::InsufficientStock { .. }) => refused_for_stock += 1,
                Err(_) => {}
            }
            assert!(pool.held() <= pool.stock(), "oversold at step {step}");
            assert_eq!(pool.available(), pool.stock() - pool.held());
        }
        assert!(sold > 0 && refused_for_stock > 0, "the run exercised both");
    }
}
