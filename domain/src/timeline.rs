//! The ProductTimeline aggregate: the append-only life story of one
//! physical product across owners and relistings (its id is the product's).
//!
//! Most entries are recorded by Souk's process managers from the events of
//! the other aggregates (listed, price changed, reserved, sold, shipped,
//! delivered, returned). Delivery of a sale hands the product over to its
//! buyer, and a return of that sale hands it back, so the current owner is
//! always the one who may relist it, tell its stories and commission
//! customizations from designers. Only counts and ids are kept in the
//! state; the entries themselves live in the events and the read model.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::values::{
    Actor, Comment, CustomizationId, Description, Label, ListingId, Money, OrderId, ProductId,
    Role, StoryBody, StoryId, Title, Url, UserId,
};
use crate::{Aggregate, Decide, DecodeError, DomainError, DomainEvent, Refusal};

/// Most media URLs on one story or one completed customization.
pub const MAX_MEDIA: usize = 10;
/// Most stories one product may have.
pub const MAX_STORIES: usize = 1000;
/// Most customizations one product may have.
pub const MAX_CUSTOMIZATIONS: usize = 1000;

/// One step in a product's life, as told by the other aggregates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TimelineEntry {
    Listed {
        listing_id: ListingId,
        seller: UserId,
        price: Money,
    },
    Relisted {
        listing_id: ListingId,
        seller: UserId,
        price: Money,
    },
    PriceChanged {
        listing_id: ListingId,
        price: Money,
    },
    Reserved {
        listing_id: ListingId,
        order_id: OrderId,
    },
    Sold {
        order_id: OrderId,
        buyer: UserId,
        price: Money,
    },
    Shipped {
        order_id: OrderId,
        carrier: Label,
    },
    Delivered {
        order_id: OrderId,
    },
    Returned {
        order_id: OrderId,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CustomizationStatus {
    Requested,
    Accepted,
    Completed,
}

impl CustomizationStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::Accepted => "accepted",
            Self::Completed => "completed",
        }
    }
}

impl fmt::Display for CustomizationStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A designer's work on the product, commissioned by its owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Customization {
    pub designer: UserId,
    pub status: CustomizationStatus,
}

/// The most recent sale, until it is returned: who handed the product over
/// to whom, and whether it was delivered (ownership moves on delivery).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sale {
    pub order_id: OrderId,
    pub seller: UserId,
    pub buyer: UserId,
    pub delivered: bool,
}

/// State of one product's timeline. Meaningful only once [`Decide::exists`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProductTimeline {
    started: bool,
    product_id: ProductId,
    owner: UserId,
    entries: u64,
    stories: BTreeSet<StoryId>,
    customizations: BTreeMap<CustomizationId, Customization>,
    last_sale: Option<Sale>,
}

impl ProductTimeline {
    pub fn product_id(&self) -> ProductId {
        self.product_id
    }

    /// Who owns the product now.
    pub fn owner(&self) -> UserId {
        self.owner
    }

    /// How many entries were recorded.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    pub fn stories(&self) -> &BTreeSet<StoryId> {
        &self.stories
    }

    pub fn customizations(&self) -> &BTreeMap<CustomizationId, Customization> {
        &self.customizations
    }

    pub fn last_sale(&self) -> Option<&Sale> {
        self.last_sale.as_ref()
    }
}

#[derive(Debug, Clone)]
pub enum TimelineCommand {
    /// Souk records any entry; a seller may record their own `Listed` or
    /// `Relisted`. The first entry of a product must be `Listed`, and starts
    /// its timeline with the seller as owner; `product_id` is used then.
    Record {
        actor: Actor,
        product_id: ProductId,
        entry: TimelineEntry,
    },
    /// The owner.
    AddStory {
        actor: Actor,
        story_id: StoryId,
        title: Title,
        body: StoryBody,
        media: Vec<Url>,
    },
    /// The owner asks a designer.
    RequestCustomization {
        actor: Actor,
        customization_id: CustomizationId,
        designer: UserId,
        description: Description,
    },
    /// The designer asked.
    AcceptCustomization {
        actor: Actor,
        customization_id: CustomizationId,
    },
    /// The designer, once accepted.
    CompleteCustomization {
        actor: Actor,
        customization_id: CustomizationId,
        media: Vec<Url>,
        note: Comment,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TimelineEvent {
    TimelineStarted {
        product_id: ProductId,
        owner: UserId,
    },
    EntryRecorded {
        entry: TimelineEntry,
    },
    OwnershipTransferred {
        from: UserId,
        to: UserId,
    },
    StoryAdded {
        story_id: StoryId,
        author: UserId,
        title: Title,
        body: StoryBody,
        media: Vec<Url>,
    },
    CustomizationRequested {
        customization_id: CustomizationId,
        requested_by: UserId,
        designer: UserId,
        description: Description,
    },
    CustomizationAccepted {
        customization_id: CustomizationId,
        designer: UserId,
    },
    CustomizationCompleted {
        customization_id: CustomizationId,
        designer: UserId,
        media: Vec<Url>,
        note: Comment,
    },
}

impl DomainEvent for TimelineEvent {
    fn event_type(&self) -> String {
        match self {
            Self::TimelineStarted { .. } => "TimelineStarted",
            Self::EntryRecorded { .. } => "EntryRecorded",
            Self::OwnershipTransferred { .. } => "OwnershipTransferred",
            Self::StoryAdded { .. } => "StoryAdded",
            Self::CustomizationRequested { .. } => "CustomizationRequested",
            Self::CustomizationAccepted { .. } => "CustomizationAccepted",
            Self::CustomizationCompleted { .. } => "CustomizationCompleted",
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
pub enum TimelineError {
    #[error("no timeline for this product: its first entry must be `listed`")]
    NotFound,
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("customization {0} not found")]
    UnknownCustomization(CustomizationId),
    #[error("cannot {action} a customization that is {status}")]
    IllegalTransition {
        action: &'static str,
        status: CustomizationStatus,
    },
    #[error("story {0} already exists")]
    DuplicateStory(StoryId),
    #[error("customization {0} already exists")]
    DuplicateCustomization(CustomizationId),
    #[error("at most {limit} {what}")]
    TooMany { what: &'static str, limit: usize },
}

impl DomainError for TimelineError {
    fn code(&self) -> &'static str {
        match self {
            Self::NotFound => "timeline_not_found",
            Self::Forbidden(_) => "forbidden",
            Self::UnknownCustomization(_) => "unknown_customization",
            Self::IllegalTransition { .. } => "illegal_transition",
            Self::DuplicateStory(_) => "duplicate_story",
            Self::DuplicateCustomization(_) => "duplicate_customization",
            Self::TooMany { .. } => "too_many",
        }
    }

    fn refusal(&self) -> Refusal {
        match self {
            Self::NotFound | Self::UnknownCustomization(_) => Refusal::NotFound,
            Self::Forbidden(_) => Refusal::Forbidden,
            Self::TooMany { .. } => Refusal::Invalid,
            Self::IllegalTransition { .. }
            | Self::DuplicateStory(_)
            | Self::DuplicateCustomization(_) => Refusal::Conflict,
        }
    }
}

fn at_most<T>(items: &[T], limit: usize, what: &'static str) -> Result<(), TimelineError> {
    if items.len() > limit {
        Err(TimelineError::TooMany { what, limit })
    } else {
        Ok(())
    }
}

impl ProductTimeline {
    fn found(&self) -> Result<(), TimelineError> {
        if self.started {
            Ok(())
        } else {
            Err(TimelineError::NotFound)
        }
    }

    fn owner_acts(&self, actor: &Actor) -> Result<(), TimelineError> {
        self.found()?;
        if actor.is_user(self.owner) {
            Ok(())
        } else {
            Err(TimelineError::Forbidden(
                "only the product's owner may do this",
            ))
        }
    }

    fn customization(&self, id: CustomizationId) -> Result<&Customization, TimelineError> {
        self.found()?;
        self.customizations
            .get(&id)
            .ok_or(TimelineError::UnknownCustomization(id))
    }

    fn record(
        &self,
        actor: Actor,
        product_id: ProductId,
        entry: TimelineEntry,
    ) -> Result<Vec<TimelineEvent>, TimelineError> {
        let listing_seller = match &entry {
            TimelineEntry::Listed { seller, .. } | TimelineEntry::Relisted { seller, .. } => {
                Some(*seller)
            }
            _ => None,
        };
        let allowed = actor.is_system()
            || listing_seller.is_some_and(|s| actor.role == Role::Seller && actor.user_id == s);
        if !allowed {
            return Err(TimelineError::Forbidden(
                "only Souk records entries; a seller may record their own listing",
            ));
        }

        if !self.started {
            return match (&entry, listing_seller) {
                (TimelineEntry::Listed { .. }, Some(owner)) => Ok(vec![
                    TimelineEvent::TimelineStarted { product_id, owner },
                    TimelineEvent::EntryRecorded { entry },
                ]),
                _ => Err(TimelineError::NotFound),
            };
        }
        // Listing again (`Listed` from a new listing, or `Relisted`) is for
        // the owner only: a product sold and delivered is no longer the
        // seller's to sell.
        if listing_seller.is_some_and(|seller| seller != self.owner) {
            return Err(TimelineError::Forbidden(
                "only the product's current owner may list it",
            ));
        }

        let handover = match (&entry, &self.last_sale) {
            (TimelineEntry::Delivered { order_id }, Some(sale))
                if sale.order_id == *order_id && !sale.delivered && sale.buyer != self.owner =>
            {
                Some((self.owner, sale.buyer))
            }
            (TimelineEntry::Returned { order_id }, Some(sale))
                if sale.order_id == *order_id && sale.delivered && sale.seller != self.owner =>
            {
                Some((self.owner, sale.seller))
            }
            _ => None,
        };
        let mut events = vec![TimelineEvent::EntryRecorded { entry }];
        if let Some((from, to)) = handover {
            events.push(TimelineEvent::OwnershipTransferred { from, to });
        }
        Ok(events)
    }
}

impl Decide for ProductTimeline {
    fn decide(&self, command: TimelineCommand) -> Result<Vec<TimelineEvent>, TimelineError> {
        match command {
            TimelineCommand::Record {
                actor,
                product_id,
                entry,
            } => self.record(actor, product_id, entry),
            TimelineCommand::AddStory {
                actor,
                story_id,
                title,
                body,
                media,
            } => {
                self.owner_acts(&actor)?;
                if self.stories.contains(&story_id) {
                    return Err(TimelineError::DuplicateStory(story_id));
                }
                if self.stories.len() >= MAX_STORIES {
                    return Err(TimelineError::TooMany {
                        what: "stories per product",
                        limit: MAX_STORIES,
                    });
                }
                at_most(&media, MAX_MEDIA, "media per story")?;
                Ok(vec![TimelineEvent::StoryAdded {
                    story_id,
                    author: actor.user_id,
                    title,
                    body,
                    media,
                }])
            }
            TimelineCommand::RequestCustomization {
                actor,
                customization_id,
                designer,
                description,
            } => {
                self.owner_acts(&actor)?;
                if self.customizations.contains_key(&customization_id) {
                    return Err(TimelineError::DuplicateCustomization(customization_id));
                }
                if self.customizations.len() >= MAX_CUSTOMIZATIONS {
                    return Err(TimelineError::TooMany {
                        what: "customizations per product",
                        limit: MAX_CUSTOMIZATIONS,
                    });
                }
                Ok(vec![TimelineEvent::CustomizationRequested {
                    customization_id,
                    requested_by: actor.user_id,
                    designer,
                    description,
                }])
            }
            TimelineCommand::AcceptCustomization {
                actor,
                customization_id,
            } => {
                let customization = self.customization(customization_id)?;
                if !actor.is_user(customization.designer) {
                    return Err(TimelineError::Forbidden(
                        "only the designer asked may accept",
                    ));
                }
                if customization.status != CustomizationStatus::Requested {
                    return Err(TimelineError::IllegalTransition {
                        action: "accept",
                        status: customization.status,
                    });
                }
                Ok(vec![TimelineEvent::CustomizationAccepted {
                    customization_id,
                    designer: customization.designer,
                }])
            }
            TimelineCommand::CompleteCustomization {
                actor,
                customization_id,
                media,
                note,
            } => {
                let customization = self.customization(customization_id)?;
                if !actor.is_user(customization.designer) {
                    return Err(TimelineError::Forbidden(
                        "only the designer may complete a customization",
                    ));
                }
                if customization.status != CustomizationStatus::Accepted {
                    return Err(TimelineError::IllegalTransition {
                        action: "complete",
                        status: customization.status,
                    });
                }
                at_most(&media, MAX_MEDIA, "media per customization")?;
                Ok(vec![TimelineEvent::CustomizationCompleted {
                    customization_id,
                    designer: customization.designer,
                    media,
                    note,
                }])
            }
        }
    }

    fn exists(&self) -> bool {
        self.started
    }
}

impl Aggregate for ProductTimeline {
    const TYPE: &'static str = "ProductTimeline";
    type Command = TimelineCommand;
    type Event = TimelineEvent;
    type Error = TimelineError;
    fn apply(&mut self, event: TimelineEvent) {
        match event {
            TimelineEvent::TimelineStarted { product_id, owner } => {
                self.started = true;
                self.product_id = product_id;
                self.owner = owner;
            }
            TimelineEvent::EntryRecorded { entry } => {
                self.entries = self.entries.saturating_add(1);
                match entry {
                    TimelineEntry::Sold {
                        order_id, buyer, ..
                    } => {
                        self.last_sale = Some(Sale {
                            order_id,
                            seller: self.owner,
                            buyer,
                            delivered: false,
                        });
                    }
                    TimelineEntry::Delivered { order_id } => {
                        if let Some(sale) = &mut self.last_sale
                            && sale.order_id == order_id
                        {
                            sale.delivered = true;
                        }
                    }
                    TimelineEntry::Returned { order_id }
                        if self
                            .last_sale
                            .as_ref()
                            .is_some_and(|s| s.order_id == order_id) =>
                    {
                        self.last_sale = None;
                    }
                    _ => {}
                }
            }
            TimelineEvent::OwnershipTransferred { to, .. } => self.owner = to,
            TimelineEvent::StoryAdded { story_id, .. } => {
                self.stories.insert(story_id);
            }
            TimelineEvent::CustomizationRequested {
                customization_id,
                designer,
                ..
            } => {
                self.customizations.insert(
                    customization_id,
                    Customization {
                        designer,
                        status: CustomizationStatus::Requested,
                    },
                );
            }
            TimelineEvent::CustomizationAccepted {
                customization_id, ..
            } => {
                if let Some(c) = self.customizations.get_mut(&customization_id) {
                    c.status = CustomizationStatus::Accepted;
                }
            }
            TimelineEvent::CustomizationCompleted {
                customization_id, ..
            } => {
                if let Some(c) = self.customizations.get_mut(&customization_id) {
                    c.status = CustomizationStatus::Completed;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::given;

    use TimelineCommand as C;
    use TimelineEvent as E;

    fn user(n: u128) -> UserId {
        UserId::from_uuid(uuid::Uuid::from_u128(n))
    }
    fn seller() -> Actor {
        Actor::new(user(1), Role::Seller)
    }
    fn buyer() -> Actor {
        Actor::new(user(2), Role::Buyer)
    }
    fn designer() -> Actor {
        Actor::new(user(3), Role::Seller)
    }
    fn admin() -> Actor {
        Actor::new(user(4), Role::Admin)
    }
    fn system() -> Actor {
        Actor::system()
    }
    fn product_id() -> ProductId {
        ProductId::from_uuid(uuid::Uuid::from_u128(10))
    }
    fn listing_id() -> ListingId {
        ListingId::from_uuid(uuid::Uuid::from_u128(11))
    }
    fn order_id(n: u128) -> OrderId {
        OrderId::from_uuid(uuid::Uuid::from_u128(100 + n))
    }
    fn customization_id() -> CustomizationId {
        CustomizationId::from_uuid(uuid::Uuid::from_u128(20))
    }
    fn story_id() -> StoryId {
        StoryId::from_uuid(uuid::Uuid::from_u128(30))
    }
    fn eur(amount: i64) -> Money {
        Money::parse_positive(amount, "EUR").unwrap()
    }
    fn media(count: usize) -> Vec<Url> {
        vec![Url::parse("media", "https://img.example/m.jpg").unwrap(); count]
    }

    fn listed(seller: UserId) -> TimelineEntry {
        TimelineEntry::Listed {
            listing_id: listing_id(),
            seller,
            price: eur(9_000),
        }
    }
    fn relisted(seller: UserId) -> TimelineEntry {
        TimelineEntry::Relisted {
            listing_id: listing_id(),
            seller,
            price: eur(8_000),
        }
    }
    fn record(actor: Actor, entry: TimelineEntry) -> C {
        C::Record {
            actor,
            product_id: product_id(),
            entry,
        }
    }
    fn recorded(entry: TimelineEntry) -> E {
        E::EntryRecorded { entry }
    }
    fn started() -> Vec<E> {
        vec![
            E::TimelineStarted {
                product_id: product_id(),
                owner: seller().user_id,
            },
            recorded(listed(seller().user_id)),
        ]
    }
    /// Sold to the buyer in order 1 and delivered.
    fn delivered_to_buyer() -> Vec<E> {
        let mut history = started();
        history.extend([
            recorded(TimelineEntry::Sold {
                order_id: order_id(1),
                buyer: buyer().user_id,
                price: eur(9_000),
            }),
            recorded(TimelineEntry::Delivered {
                order_id: order_id(1),
            }),
            E::OwnershipTransferred {
                from: seller().user_id,
                to: buyer().user_id,
            },
        ]);
        history
    }
    fn requested() -> Vec<E> {
        let mut history = started();
        history.push(E::CustomizationRequested {
            customization_id: customization_id(),
            requested_by: seller().user_id,
            designer: designer().user_id,
            description: Description::parse("description", "Engrave it").unwrap(),
        });
        history
    }
    fn accepted() -> Vec<E> {
        let mut history = requested();
        history.push(E::CustomizationAccepted {
            customization_id: customization_id(),
            designer: designer().user_id,
        });
        history
    }

    #[test]
    fn a_first_listing_starts_the_timeline_with_its_seller_as_owner() {
        for actor in [seller(), system()] {
            let timeline = given::<ProductTimeline>([])
                .when(record(actor, listed(seller().user_id)))
                .then(started());
            assert!(timeline.exists());
            assert_eq!(timeline.owner(), seller().user_id);
            assert_eq!(timeline.product_id(), product_id());
            assert_eq!(timeline.entries(), 1);
        }
    }

    #[test]
    fn a_timeline_starts_with_a_listing() {
        let error = given::<ProductTimeline>([])
            .when(record(
                system(),
                TimelineEntry::PriceChanged {
                    listing_id: listing_id(),
                    price: eur(1),
                },
            ))
            .then_refused("timeline_not_found");
        assert_eq!(error.refusal(), Refusal::NotFound);
        given::<ProductTimeline>([])
            .when(record(system(), relisted(seller().user_id)))
            .then_refused("timeline_not_found");
        given::<ProductTimeline>([])
            .when(C::AddStory {
                actor: seller(),
                story_id: story_id(),
                title: Title::parse("title", "t").unwrap(),
                body: StoryBody::parse("body", "b").unwrap(),
                media: vec![],
            })
            .then_refused("timeline_not_found");
    }

    #[test]
    fn a_seller_records_only_their_own_listing_and_souk_records_the_rest() {
        given::<ProductTimeline>([])
            .when(record(designer(), listed(seller().user_id)))
            .then_refused("forbidden");
        given::<ProductTimeline>([])
            .when(record(admin(), listed(admin().user_id)))
            .then_refused("forbidden");
        let sold = TimelineEntry::Sold {
            order_id: order_id(1),
            buyer: buyer().user_id,
            price: eur(9_000),
        };
        let error = given::<ProductTimeline>(started())
            .when(record(seller(), sold.clone()))
            .then_refused("forbidden");
        assert_eq!(error.refusal(), Refusal::Forbidden);
        let timeline = given::<ProductTimeline>(started())
            .when(record(system(), sold.clone()))
            .then(vec![recorded(sold)]);
        assert_eq!(timeline.entries(), 2);
        assert_eq!(timeline.last_sale().unwrap().buyer, buyer().user_id);
    }

    #[test]
    fn the_life_of_a_listing_is_recorded() {
        let entries = [
            TimelineEntry::PriceChanged {
                listing_id: listing_id(),
                price: eur(8_500),
            },
            TimelineEntry::Reserved {
                listing_id: listing_id(),
                order_id: order_id(1),
            },
            TimelineEntry::Shipped {
                order_id: order_id(1),
                carrier: Label::parse("carrier", "La Poste").unwrap(),
            },
        ];
        for entry in entries {
            given::<ProductTimeline>(started())
                .when(record(system(), entry.clone()))
                .then(vec![recorded(entry)]);
        }
    }

    #[test]
    fn delivery_hands_the_product_over_to_its_buyer() {
        let mut history = started();
        history.push(recorded(TimelineEntry::Sold {
            order_id: order_id(1),
            buyer: buyer().user_id,
            price: eur(9_000),
        }));
        let delivered = TimelineEntry::Delivered {
            order_id: order_id(1),
        };
        let timeline = given::<ProductTimeline>(history.clone())
            .when(record(system(), delivered.clone()))
            .then(vec![
                recorded(delivered),
                E::OwnershipTransferred {
                    from: seller().user_id,
                    to: buyer().user_id,
                },
            ]);
        assert_eq!(timeline.owner(), buyer().user_id);

        // The delivery of some other order hands nothing over.
        let other = TimelineEntry::Delivered {
            order_id: order_id(2),
        };
        given::<ProductTimeline>(history)
            .when(record(system(), other.clone()))
            .then(vec![recorded(other)]);
        // Nor does a second delivery record of the same order.
        let again = TimelineEntry::Delivered {
            order_id: order_id(1),
        };
        given::<ProductTimeline>(delivered_to_buyer())
            .when(record(system(), again.clone()))
            .then(vec![recorded(again)]);
    }

    #[test]
    fn a_return_hands_the_product_back_to_its_seller() {
        let returned = TimelineEntry::Returned {
            order_id: order_id(1),
        };
        let timeline = given::<ProductTimeline>(delivered_to_buyer())
            .when(record(system(), returned.clone()))
            .then(vec![
                recorded(returned),
                E::OwnershipTransferred {
                    from: buyer().user_id,
                    to: seller().user_id,
                },
            ]);
        assert_eq!(timeline.owner(), seller().user_id);
        assert!(timeline.last_sale().is_none());
    }

    #[test]
    fn only_the_current_owner_relists() {
        let by_new_owner = relisted(buyer().user_id);
        let timeline = given::<ProductTimeline>(delivered_to_buyer())
            .when(record(
                Actor::new(user(2), Role::Seller),
                by_new_owner.clone(),
            ))
            .then(vec![recorded(by_new_owner)]);
        assert_eq!(timeline.owner(), buyer().user_id);

        for entry in [relisted(seller().user_id), listed(seller().user_id)] {
            let error = given::<ProductTimeline>(delivered_to_buyer())
                .when(record(system(), entry))
                .then_refused("forbidden");
            assert_eq!(error.refusal(), Refusal::Forbidden);
        }
        // Before any sale, the seller lists it again under a new listing.
        given::<ProductTimeline>(started())
            .when(record(seller(), listed(seller().user_id)))
            .then(vec![recorded(listed(seller().user_id))]);
    }

    #[test]
    fn the_owner_tells_stories_with_at_most_ten_media() {
        let add = |actor, media| C::AddStory {
            actor,
            story_id: story_id(),
            title: Title::parse("title", "Restored in 2019").unwrap(),
            body: StoryBody::parse("body", "New strings, same soul.").unwrap(),
            media,
        };
        let timeline = given::<ProductTimeline>(started())
            .when(add(seller(), media(10)))
            .then(vec![E::StoryAdded {
                story_id: story_id(),
                author: seller().user_id,
                title: Title::parse("title", "Restored in 2019").unwrap(),
                body: StoryBody::parse("body", "New strings, same soul.").unwrap(),
                media: media(10),
            }]);
        assert!(timeline.stories().contains(&story_id()));

        let error = given::<ProductTimeline>(started())
            .when(add(seller(), media(11)))
            .then_refused("too_many");
        assert_eq!(error.refusal(), Refusal::Invalid);
        for actor in [buyer(), admin(), system()] {
            given::<ProductTimeline>(started())
                .when(add(actor, vec![]))
                .then_refused("forbidden");
        }
        // After delivery the buyer is the one who tells.
        given::<ProductTimeline>(delivered_to_buyer())
            .when(add(seller(), vec![]))
            .then_refused("forbidden");
        let mut history = started();
        history.push(E::StoryAdded {
            story_id: story_id(),
            author: seller().user_id,
            title: Title::parse("title", "t").unwrap(),
            body: StoryBody::parse("body", "b").unwrap(),
            media: vec![],
        });
        let error = given::<ProductTimeline>(history)
            .when(add(seller(), vec![]))
            .then_refused("duplicate_story");
        assert_eq!(error.refusal(), Refusal::Conflict);
    }

    #[test]
    fn a_product_has_a_bounded_number_of_stories() {
        let mut history = started();
        history.extend((0..MAX_STORIES as u128).map(|n| E::StoryAdded {
            story_id: StoryId::from_uuid(uuid::Uuid::from_u128(1_000 + n)),
            author: seller().user_id,
            title: Title::parse("title", "t").unwrap(),
            body: StoryBody::parse("body", "b").unwrap(),
            media: vec![],
        }));
        given::<ProductTimeline>(history)
            .when(C::AddStory {
                actor: seller(),
                story_id: story_id(),
                title: Title::parse("title", "t").unwrap(),
                body: StoryBody::parse("body", "b").unwrap(),
                media: vec![],
            })
            .then_refused("too_many");
    }

    #[test]
    fn the_owner_asks_a_designer_for_a_customization() {
        let request = |actor| C::RequestCustomization {
            actor,
            customization_id: customization_id(),
            designer: designer().user_id,
            description: Description::parse("description", "Engrave it").unwrap(),
        };
        let timeline = given::<ProductTimeline>(started())
            .when(request(seller()))
            .then(requested()[2..].to_vec());
        assert_eq!(
            timeline.customizations()[&customization_id()],
            Customization {
                designer: designer().user_id,
                status: CustomizationStatus::Requested
            }
        );
        given::<ProductTimeline>(started())
            .when(request(designer()))
            .then_refused("forbidden");
        let error = given::<ProductTimeline>(requested())
            .when(request(seller()))
            .then_refused("duplicate_customization");
        assert_eq!(error.refusal(), Refusal::Conflict);
    }

    #[test]
    fn the_designer_accepts_then_completes_a_customization() {
        let accept = |actor| C::AcceptCustomization {
            actor,
            customization_id: customization_id(),
        };
        let timeline = given::<ProductTimeline>(requested())
            .when(accept(designer()))
            .then(accepted()[3..].to_vec());
        assert_eq!(
            timeline.customizations()[&customization_id()].status,
            CustomizationStatus::Accepted
        );
        for actor in [seller(), admin()] {
            given::<ProductTimeline>(requested())
                .when(accept(actor))
                .then_refused("forbidden");
        }
        let error = given::<ProductTimeline>(accepted())
            .when(accept(designer()))
            .then_refused("illegal_transition");
        assert!(error.to_string().contains("accepted"));

        let note = Comment::parse("note", "Done, see photos").unwrap();
        let complete = |actor, media| C::CompleteCustomization {
            actor,
            customization_id: customization_id(),
            media,
            note: note.clone(),
        };
        let timeline = given::<ProductTimeline>(accepted())
            .when(complete(designer(), media(2)))
            .then(vec![E::CustomizationCompleted {
                customization_id: customization_id(),
                designer: designer().user_id,
                media: media(2),
                note: note.clone(),
            }]);
        assert_eq!(
            timeline.customizations()[&customization_id()].status,
            CustomizationStatus::Completed
        );
        given::<ProductTimeline>(requested())
            .when(complete(designer(), vec![]))
            .then_refused("illegal_transition");
        given::<ProductTimeline>(accepted())
            .when(complete(seller(), vec![]))
            .then_refused("forbidden");
        given::<ProductTimeline>(accepted())
            .when(complete(designer(), media(11)))
            .then_refused("too_many");
    }

    #[test]
    fn an_unknown_customization_is_not_found() {
        let error = given::<ProductTimeline>(started())
            .when(C::AcceptCustomization {
                actor: designer(),
                customization_id: customization_id(),
            })
            .then_refused("unknown_customization");
        assert_eq!(error.refusal(), Refusal::NotFound);
        given::<ProductTimeline>(started())
            .when(C::CompleteCustomization {
                actor: designer(),
                customization_id: customization_id(),
                media: vec![],
                note: Comment::default(),
            })
            .then_refused("unknown_customization");
    }

    #[test]
    fn entries_are_tagged_by_kind() {
        let json = serde_json::to_value(TimelineEntry::Delivered {
            order_id: order_id(1),
        })
        .unwrap();
        assert_eq!(json["kind"], "delivered");
        for status in [
            CustomizationStatus::Requested,
            CustomizationStatus::Accepted,
            CustomizationStatus::Completed,
        ] {
            assert_eq!(serde_json::to_value(status).unwrap(), status.as_str());
        }
    }
}
