//! The Listing aggregate: one item offered for sale by one seller, with its
//! details, its price and its status (active, paused, sold out, deleted).
//!
//! Stock is not here: it lives in the listing's Reservation aggregate, so a
//! hot listing's holds never contend with edits of its description. Souk's
//! process managers mark a listing sold out or back in stock when its pool
//! empties or refills. Deletion is soft: a deleted listing stays readable but
//! refuses every command.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::values::{
    Actor, Currency, Description, Label, ListingId, Location, Money, ProductId, Role, Title, Url,
    UserId, ValidationError, WalletId,
};
use crate::{Aggregate, Decide, DecodeError, DomainError, DomainEvent, Refusal};

/// Most images one listing may show.
pub const MAX_IMAGES: usize = 20;
/// Most free-form attributes one listing may carry.
pub const MAX_ATTRIBUTES: usize = 50;
/// Longest attribute name, in characters.
pub const MAX_ATTRIBUTE_KEY_LEN: usize = 64;
/// Longest text attribute value, in characters.
pub const MAX_ATTRIBUTE_TEXT_LEN: usize = 500;

/// The state an item is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    #[default]
    New,
    LikeNew,
    Good,
    Fair,
    Poor,
}

impl Condition {
    /// Every condition, best first.
    pub const ALL: [Self; 5] = [Self::New, Self::LikeNew, Self::Good, Self::Fair, Self::Poor];

    pub fn parse(text: &str) -> Result<Self, ValidationError> {
        match text {
            "new" => Ok(Self::New),
            "like_new" => Ok(Self::LikeNew),
            "good" => Ok(Self::Good),
            "fair" => Ok(Self::Fair),
            "poor" => Ok(Self::Poor),
            _ => Err(ValidationError::new(
                "invalid_condition",
                format!("`{text}` is not one of new, like_new, good, fair, poor"),
            )),
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::New => "new",
            Self::LikeNew => "like_new",
            Self::Good => "good",
            Self::Fair => "fair",
            Self::Poor => "poor",
        }
    }
}

/// Where a listing is in its life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListingStatus {
    #[default]
    Active,
    Paused,
    SoldOut,
    Deleted,
}

impl ListingStatus {
    /// Every status.
    pub const ALL: [Self; 4] = [Self::Active, Self::Paused, Self::SoldOut, Self::Deleted];

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Paused => "paused",
            Self::SoldOut => "sold_out",
            Self::Deleted => "deleted",
        }
    }
}

impl fmt::Display for ListingStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One free-form attribute value: a JSON scalar other than null.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AttributeValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

/// Free-form attributes by name (`"storage_gb": 128`), ordered so that
/// events and read models are deterministic.
pub type Attributes = BTreeMap<String, AttributeValue>;

/// Parses outside JSON into attributes, refusing what [`validate_attributes`]
/// refuses and anything that is not a scalar.
pub fn parse_attributes(
    map: &serde_json::Map<String, serde_json::Value>,
) -> Result<Attributes, ValidationError> {
    use serde_json::Value;

    if map.len() > MAX_ATTRIBUTES {
        return Err(too_many_attributes());
    }
    let mut attributes = Attributes::new();
    for (key, value) in map {
        let value = match value {
            Value::Bool(b) => AttributeValue::Bool(*b),
            Value::Number(n) => match (n.as_i64(), n.as_f64()) {
                (Some(i), _) => AttributeValue::Int(i),
                // An integer beyond i64 would silently lose precision as a
                // float, so it is refused rather than rounded.
                (None, Some(_)) if n.is_u64() => {
                    return Err(invalid_attribute(key, "integers must fit in 64 bits"));
                }
                (None, Some(f)) => AttributeValue::Float(f),
                (None, None) => return Err(invalid_attribute(key, "not a number")),
            },
            Value::String(s) => AttributeValue::Text(s.clone()),
            Value::Null | Value::Array(_) | Value::Object(_) => {
                return Err(invalid_attribute(
                    key,
                    "values must be a string, number or boolean",
                ));
            }
        };
        attributes.insert(key.clone(), value);
    }
    validate_attributes(&attributes)?;
    Ok(attributes)
}

/// Checks the bounds on attributes, however they were built.
pub fn validate_attributes(attributes: &Attributes) -> Result<(), ValidationError> {
    if attributes.len() > MAX_ATTRIBUTES {
        return Err(too_many_attributes());
    }
    for (key, value) in attributes {
        let key_ok = !key.is_empty()
            && key.len() <= MAX_ATTRIBUTE_KEY_LEN
            && key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !key_ok {
            return Err(invalid_attribute(
                key,
                "names are 1 to 64 characters of a-z, 0-9 and _",
            ));
        }
        match value {
            AttributeValue::Text(text) if text.chars().count() > MAX_ATTRIBUTE_TEXT_LEN => {
                return Err(ValidationError::new(
                    "too_long",
                    format!(
                        "attribute `{key}` must be at most {MAX_ATTRIBUTE_TEXT_LEN} characters"
                    ),
                ));
            }
            AttributeValue::Float(f) if !f.is_finite() => {
                return Err(invalid_attribute(key, "numbers must be finite"));
            }
            _ => {}
        }
    }
    Ok(())
}

fn too_many_attributes() -> ValidationError {
    ValidationError::new(
        "too_many",
        format!("a listing has at most {MAX_ATTRIBUTES} attributes"),
    )
}

fn invalid_attribute(key: &str, why: &str) -> ValidationError {
    // Keys may be arbitrary outside input: quote only a bounded prefix.
    let key: String = key.chars().take(MAX_ATTRIBUTE_KEY_LEN).collect();
    ValidationError::new("invalid_attribute", format!("attribute `{key}`: {why}"))
}

/// Everything a seller describes about an item. Replaced as a whole by
/// `UpdateDetails`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ListingDetails {
    pub title: Title,
    pub description: Description,
    pub category: Label,
    pub subcategory: Option<Label>,
    pub condition: Condition,
    pub location: Location,
    pub attributes: Attributes,
    pub images: Vec<Url>,
}

impl ListingDetails {
    /// Checks the bounds the field types cannot express on their own.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.images.len() > MAX_IMAGES {
            return Err(ValidationError::new(
                "too_many",
                format!("a listing has at most {MAX_IMAGES} images"),
            ));
        }
        validate_attributes(&self.attributes)
    }
}

/// A partial change of a listing's details: a field left `None` keeps its
/// value. The merge is pure; the listing validates the result.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DetailChanges {
    pub title: Option<Title>,
    pub description: Option<Description>,
    pub category: Option<Label>,
    /// A new subcategory; `None` keeps the current one (there is no way to
    /// clear it).
    pub subcategory: Option<Label>,
    pub condition: Option<Condition>,
    pub location: Option<Location>,
    /// Replaces all attributes.
    pub attributes: Option<Attributes>,
    /// Replaces all images.
    pub images: Option<Vec<Url>>,
}

impl DetailChanges {
    /// `details` with these changes over them.
    pub fn apply(self, mut details: ListingDetails) -> ListingDetails {
        if let Some(v) = self.title {
            details.title = v
        }
        if let Some(v) = self.description {
            details.description = v
        }
        if let Some(v) = self.category {
            details.category = v
        }
        if let Some(v) = self.subcategory {
            details.subcategory = Some(v)
        }
        if let Some(v) = self.condition {
            details.condition = v
        }
        if let Some(v) = self.location {
            details.location = v
        }
        if let Some(v) = self.attributes {
            details.attributes = v
        }
        if let Some(v) = self.images {
            details.images = v
        }
        details
    }
}

/// State of one listing. Meaningful only once [`Decide::exists`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Listing {
    created: bool,
    listing_id: ListingId,
    seller: UserId,
    product_id: ProductId,
    details: ListingDetails,
    price: Money,
    status: ListingStatus,
    payout_wallet: Option<WalletId>,
}

impl Listing {
    pub fn listing_id(&self) -> ListingId {
        self.listing_id
    }

    pub fn seller(&self) -> UserId {
        self.seller
    }

    pub fn product_id(&self) -> ProductId {
        self.product_id
    }

    pub fn details(&self) -> &ListingDetails {
        &self.details
    }

    pub fn price(&self) -> &Money {
        &self.price
    }

    pub fn status(&self) -> ListingStatus {
        self.status
    }

    /// The seller's wallet that receives wallet-escrow payments, if any.
    pub fn payout_wallet(&self) -> Option<WalletId> {
        self.payout_wallet
    }

    /// Whether `actor` may edit this listing: its seller in person, or an admin.
    pub fn may_manage(&self, actor: &Actor) -> bool {
        actor.is_user(self.seller) || actor.is_admin()
    }
}

#[derive(Debug, Clone)]
pub enum ListingCommand {
    /// A seller lists an item. The seller is the actor.
    Create {
        actor: Actor,
        listing_id: ListingId,
        product_id: ProductId,
        details: ListingDetails,
        price: Money,
        /// Where wallet-escrow payments go; the caller checks that the
        /// wallet is the seller's and in the price's currency.
        payout_wallet: Option<WalletId>,
    },
    /// Its seller or an admin; the currency never changes.
    ChangePrice { actor: Actor, price: Money },
    /// Its seller or an admin; replaces all details.
    UpdateDetails {
        actor: Actor,
        details: ListingDetails,
    },
    /// Its seller or an admin; from active or sold out.
    Pause { actor: Actor },
    /// Its seller or an admin; from paused.
    Resume { actor: Actor },
    /// Its seller or an admin; soft delete from any other status.
    Delete { actor: Actor },
    /// Souk, when the stock pool has nothing left to reserve.
    MarkSoldOut { actor: Actor },
    /// Souk, when a sold-out pool gets stock again.
    MarkBackInStock { actor: Actor },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ListingEvent {
    ListingCreated {
        listing_id: ListingId,
        seller: UserId,
        product_id: ProductId,
        details: ListingDetails,
        price: Money,
        #[serde(default)]
        payout_wallet: Option<WalletId>,
    },
    ListingPriceChanged {
        old_price: Money,
        new_price: Money,
    },
    ListingDetailsUpdated {
        details: ListingDetails,
    },
    ListingPaused,
    ListingResumed,
    ListingSoldOut,
    ListingBackInStock,
    ListingDeleted,
}

impl DomainEvent for ListingEvent {
    fn event_type(&self) -> String {
        match self {
            Self::ListingCreated { .. } => "ListingCreated",
            Self::ListingPriceChanged { .. } => "ListingPriceChanged",
            Self::ListingDetailsUpdated { .. } => "ListingDetailsUpdated",
            Self::ListingPaused => "ListingPaused",
            Self::ListingResumed => "ListingResumed",
            Self::ListingSoldOut => "ListingSoldOut",
            Self::ListingBackInStock => "ListingBackInStock",
            Self::ListingDeleted => "ListingDeleted",
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
pub enum ListingError {
    #[error("listing not found")]
    NotFound,
    #[error("listing already exists")]
    AlreadyExists,
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("listing is deleted")]
    Deleted,
    #[error("the listing is priced in {current}, not {given}")]
    CurrencyMismatch { current: Currency, given: Currency },
    #[error("the price is already {0}")]
    NoChange(Money),
    #[error("cannot {action} a listing that is {status}")]
    IllegalTransition {
        action: &'static str,
        status: ListingStatus,
    },
    #[error(transparent)]
    Invalid(#[from] ValidationError),
}

impl DomainError for ListingError {
    fn code(&self) -> &'static str {
        match self {
            Self::NotFound => "listing_not_found",
            Self::AlreadyExists => "already_exists",
            Self::Forbidden(_) => "forbidden",
            Self::Deleted => "listing_deleted",
            Self::CurrencyMismatch { .. } => "currency_mismatch",
            Self::NoChange(_) => "no_change",
            Self::IllegalTransition { .. } => "illegal_transition",
            Self::Invalid(error) => error.code,
        }
    }

    fn refusal(&self) -> Refusal {
        match self {
            Self::NotFound => Refusal::NotFound,
            Self::Forbidden(_) => Refusal::Forbidden,
            Self::CurrencyMismatch { .. } | Self::Invalid(_) => Refusal::Invalid,
            Self::AlreadyExists
            | Self::Deleted
            | Self::NoChange(_)
            | Self::IllegalTransition { .. } => Refusal::Conflict,
        }
    }
}

fn positive_price(price: &Money) -> Result<(), ListingError> {
    // `Money::parse_positive` already refuses these; a price built another
    // way (`Money::zero`, a buggy caller) must not reach an event either.
    if price.amount() <= 0 {
        return Err(ValidationError::new("invalid_amount", "a price must be positive").into());
    }
    Ok(())
}

impl Listing {
    /// Refuses anything on a missing or deleted listing.
    fn live(&self) -> Result<(), ListingError> {
        if !self.created {
            Err(ListingError::NotFound)
        } else if self.status == ListingStatus::Deleted {
            Err(ListingError::Deleted)
        } else {
            Ok(())
        }
    }

    fn manage(&self, actor: &Actor) -> Result<(), ListingError> {
        self.live()?;
        if self.may_manage(actor) {
            Ok(())
        } else {
            Err(ListingError::Forbidden(
                "only the listing's seller or an admin may do this",
            ))
        }
    }

    fn system(&self, actor: &Actor) -> Result<(), ListingError> {
        self.live()?;
        if actor.is_system() {
            Ok(())
        } else {
            Err(ListingError::Forbidden("only Souk itself may do this"))
        }
    }

    fn transition(
        &self,
        action: &'static str,
        from: &[ListingStatus],
        event: ListingEvent,
    ) -> Result<Vec<ListingEvent>, ListingError> {
        if from.contains(&self.status) {
            Ok(vec![event])
        } else {
            Err(ListingError::IllegalTransition {
                action,
                status: self.status,
            })
        }
    }
}

impl Decide for Listing {
    fn decide(&self, command: ListingCommand) -> Result<Vec<ListingEvent>, ListingError> {
        use ListingStatus::{Active, Paused, SoldOut};

        match command {
            ListingCommand::Create {
                actor,
                listing_id,
                product_id,
                details,
                price,
                payout_wallet,
            } => {
                if self.created {
                    return Err(ListingError::AlreadyExists);
                }
                if actor.role != Role::Seller {
                    return Err(ListingError::Forbidden("only sellers may create listings"));
                }
                details.validate()?;
                positive_price(&price)?;
                Ok(vec![ListingEvent::ListingCreated {
                    listing_id,
                    seller: actor.user_id,
                    product_id,
                    details,
                    price,
                    payout_wallet,
                }])
            }
            ListingCommand::ChangePrice { actor, price } => {
                self.manage(&actor)?;
                positive_price(&price)?;
                if price.currency() != self.price.currency() {
                    return Err(ListingError::CurrencyMismatch {
                        current: self.price.currency().clone(),
                        given: price.currency().clone(),
                    });
                }
                if price == self.price {
                    return Err(ListingError::NoChange(price));
                }
                Ok(vec![ListingEvent::ListingPriceChanged {
                    old_price: self.price.clone(),
                    new_price: price,
                }])
            }
            ListingCommand::UpdateDetails { actor, details } => {
                self.manage(&actor)?;
                details.validate()?;
                Ok(vec![ListingEvent::ListingDetailsUpdated { details }])
            }
            ListingCommand::Pause { actor } => {
                self.manage(&actor)?;
                self.transition("pause", &[Active, SoldOut], ListingEvent::ListingPaused)
            }
            ListingCommand::Resume { actor } => {
                self.manage(&actor)?;
                self.transition("resume", &[Paused], ListingEvent::ListingResumed)
            }
            ListingCommand::Delete { actor } => {
                self.manage(&actor)?;
                Ok(vec![ListingEvent::ListingDeleted])
            }
            ListingCommand::MarkSoldOut { actor } => {
                self.system(&actor)?;
                self.transition("mark sold out", &[Active], ListingEvent::ListingSoldOut)
            }
            ListingCommand::MarkBackInStock { actor } => {
                self.system(&actor)?;
                self.transition(
                    "mark back in stock",
                    &[SoldOut],
                    ListingEvent::ListingBackInStock,
                )
            }
        }
    }

    fn exists(&self) -> bool {
        self.created
    }
}

impl Aggregate for Listing {
    const TYPE: &'static str = "Listing";
    type Command = ListingCommand;
    type Event = ListingEvent;
    type Error = ListingError;
    fn apply(&mut self, event: ListingEvent) {
        match event {
            ListingEvent::ListingCreated {
                listing_id,
                seller,
                product_id,
                details,
                price,
                payout_wallet,
            } => {
                self.created = true;
                self.listing_id = listing_id;
                self.seller = seller;
                self.product_id = product_id;
                self.details = details;
                self.price = price;
                self.payout_wallet = payout_wallet;
                self.status = ListingStatus::Active;
            }
            ListingEvent::ListingPriceChanged { new_price, .. } => self.price = new_price,
            ListingEvent::ListingDetailsUpdated { details } => self.details = details,
            ListingEvent::ListingPaused => self.status = ListingStatus::Paused,
            ListingEvent::ListingResumed | ListingEvent::ListingBackInStock => {
                self.status = ListingStatus::Active;
            }
            ListingEvent::ListingSoldOut => self.status = ListingStatus::SoldOut,
            ListingEvent::ListingDeleted => self.status = ListingStatus::Deleted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::given;
    use serde_json::json;

    use ListingCommand as C;
    use ListingEvent as E;

    fn seller() -> Actor {
        Actor::new(UserId::from_uuid(uuid::Uuid::from_u128(1)), Role::Seller)
    }
    fn other_seller() -> Actor {
        Actor::new(UserId::from_uuid(uuid::Uuid::from_u128(2)), Role::Seller)
    }
    fn admin() -> Actor {
        Actor::new(UserId::from_uuid(uuid::Uuid::from_u128(3)), Role::Admin)
    }
    fn eur(amount: i64) -> Money {
        Money::parse_positive(amount, "EUR").unwrap()
    }
    fn listing_id() -> ListingId {
        ListingId::from_uuid(uuid::Uuid::from_u128(10))
    }
    fn product_id() -> ProductId {
        ProductId::from_uuid(uuid::Uuid::from_u128(20))
    }

    fn details() -> ListingDetails {
        ListingDetails {
            title: Title::parse("title", "iPhone 12, 128 GB").unwrap(),
            description: Description::parse("description", "A few scratches.").unwrap(),
            category: Label::parse("category", "phones").unwrap(),
            subcategory: Some(Label::parse("subcategory", "smartphones").unwrap()),
            condition: Condition::Good,
            location: Location::parse("Tunis", "TN", Some(36.8), Some(10.18)).unwrap(),
            attributes: parse_attributes(
                json!({"storage_gb": 128, "unlocked": true, "battery": 0.87, "colour": "blue"})
                    .as_object()
                    .unwrap(),
            )
            .unwrap(),
            images: vec![Url::parse("image", "https://img.example/1.jpg").unwrap()],
        }
    }

    fn created() -> E {
        E::ListingCreated {
            listing_id: listing_id(),
            seller: seller().user_id,
            product_id: product_id(),
            details: details(),
            price: eur(30_000),
            payout_wallet: None,
        }
    }

    fn create(actor: Actor) -> C {
        C::Create {
            actor,
            listing_id: listing_id(),
            product_id: product_id(),
            details: details(),
            price: eur(30_000),
            payout_wallet: None,
        }
    }

    #[test]
    fn a_seller_creates_a_listing_that_starts_active() {
        let listing = given::<Listing>([])
            .when(create(seller()))
            .then(vec![created()]);
        assert!(listing.exists());
        assert_eq!(listing.status(), ListingStatus::Active);
        assert_eq!(listing.seller(), seller().user_id);
        assert_eq!(listing.price(), &eur(30_000));
        assert_eq!(listing.product_id(), product_id());
        assert_eq!(listing.listing_id(), listing_id());
        assert_eq!(listing.details(), &details());
    }

    #[test]
    fn only_sellers_create_listings() {
        let buyer = Actor::new(seller().user_id, Role::Buyer);
        given::<Listing>([])
            .when(create(buyer))
            .then_refused("forbidden");
        given::<Listing>([])
            .when(create(admin()))
            .then_refused("forbidden");
    }

    #[test]
    fn a_listing_is_created_once() {
        given::<Listing>([created()])
            .when(create(seller()))
            .then_refused("already_exists");
    }

    #[test]
    fn creating_refuses_too_many_images_and_a_zero_price() {
        let mut too_many = details();
        too_many.images = vec![Url::parse("image", "https://img.example/x.jpg").unwrap(); 21];
        let error = given::<Listing>([])
            .when(C::Create {
                actor: seller(),
                listing_id: listing_id(),
                product_id: product_id(),
                details: too_many,
                price: eur(1),
                payout_wallet: None,
            })
            .then_refused("too_many");
        assert_eq!(error.refusal(), Refusal::Invalid);

        given::<Listing>([])
            .when(C::Create {
                actor: seller(),
                listing_id: listing_id(),
                product_id: product_id(),
                details: details(),
                price: Money::zero(Currency::parse("EUR").unwrap()),
                payout_wallet: None,
            })
            .then_refused("invalid_amount");
    }

    #[test]
    fn the_seller_or_an_admin_changes_the_price() {
        for actor in [seller(), admin()] {
            let listing = given::<Listing>([created()])
                .when(C::ChangePrice {
                    actor,
                    price: eur(25_000),
                })
                .then(vec![E::ListingPriceChanged {
                    old_price: eur(30_000),
                    new_price: eur(25_000),
                }]);
            assert_eq!(listing.price(), &eur(25_000));
        }
    }

    #[test]
    fn another_seller_may_not_touch_the_listing() {
        let commands = [
            C::ChangePrice {
                actor: other_seller(),
                price: eur(1),
            },
            C::UpdateDetails {
                actor: other_seller(),
                details: details(),
            },
            C::Pause {
                actor: other_seller(),
            },
            C::Delete {
                actor: other_seller(),
            },
        ];
        for command in commands {
            let error = given::<Listing>([created()])
                .when(command)
                .then_refused("forbidden");
            assert_eq!(error.refusal(), Refusal::Forbidden);
        }
        // An auditor's token with the seller's own id only reads.
        let auditor = Actor::new(seller().user_id, Role::Auditor);
        given::<Listing>([created()])
            .when(C::Pause { actor: auditor })
            .then_refused("forbidden");
    }

    #[test]
    fn the_currency_of_a_price_never_changes() {
        let error = given::<Listing>([created()])
            .when(C::ChangePrice {
                actor: seller(),
                price: Money::parse_positive(30_000, "USD").unwrap(),
            })
            .then_refused("currency_mismatch");
        assert_eq!(error.refusal(), Refusal::Invalid);
    }

    #[test]
    fn the_same_price_again_is_no_change() {
        let error = given::<Listing>([created()])
            .when(C::ChangePrice {
                actor: seller(),
                price: eur(30_000),
            })
            .then_refused("no_change");
        assert_eq!(error.refusal(), Refusal::Conflict);
    }

    #[test]
    fn details_are_replaced_as_a_whole_and_still_validated() {
        let mut new_details = details();
        new_details.attributes.clear();
        new_details.subcategory = None;
        let listing = given::<Listing>([created()])
            .when(C::UpdateDetails {
                actor: seller(),
                details: new_details.clone(),
            })
            .then(vec![E::ListingDetailsUpdated {
                details: new_details.clone(),
            }]);
        assert_eq!(listing.details(), &new_details);

        let mut bad = details();
        bad.attributes
            .insert("Bad Key".to_owned(), AttributeValue::Bool(true));
        given::<Listing>([created()])
            .when(C::UpdateDetails {
                actor: admin(),
                details: bad,
            })
            .then_refused("invalid_attribute");
    }

    #[test]
    fn pause_and_resume_follow_the_life_cycle() {
        let paused = given::<Listing>([created()])
            .when(C::Pause { actor: seller() })
            .then(vec![E::ListingPaused]);
        assert_eq!(paused.status(), ListingStatus::Paused);

        given::<Listing>([created(), E::ListingSoldOut])
            .when(C::Pause { actor: admin() })
            .then(vec![E::ListingPaused]);

        let error = given::<Listing>([created(), E::ListingPaused])
            .when(C::Pause { actor: seller() })
            .then_refused("illegal_transition");
        assert!(error.to_string().contains("paused"));

        let resumed = given::<Listing>([created(), E::ListingPaused])
            .when(C::Resume { actor: seller() })
            .then(vec![E::ListingResumed]);
        assert_eq!(resumed.status(), ListingStatus::Active);

        given::<Listing>([created()])
            .when(C::Resume { actor: seller() })
            .then_refused("illegal_transition");
        given::<Listing>([created(), E::ListingSoldOut])
            .when(C::Resume { actor: seller() })
            .then_refused("illegal_transition");
    }

    #[test]
    fn only_souk_marks_a_listing_sold_out_and_back_in_stock() {
        let sold_out = given::<Listing>([created()])
            .when(C::MarkSoldOut {
                actor: Actor::system(),
            })
            .then(vec![E::ListingSoldOut]);
        assert_eq!(sold_out.status(), ListingStatus::SoldOut);

        let back = given::<Listing>([created(), E::ListingSoldOut])
            .when(C::MarkBackInStock {
                actor: Actor::system(),
            })
            .then(vec![E::ListingBackInStock]);
        assert_eq!(back.status(), ListingStatus::Active);

        given::<Listing>([created()])
            .when(C::MarkSoldOut { actor: seller() })
            .then_refused("forbidden");
        given::<Listing>([created(), E::ListingSoldOut])
            .when(C::MarkBackInStock { actor: admin() })
            .then_refused("forbidden");
        given::<Listing>([created(), E::ListingPaused])
            .when(C::MarkSoldOut {
                actor: Actor::system(),
            })
            .then_refused("illegal_transition");
        given::<Listing>([created()])
            .when(C::MarkBackInStock {
                actor: Actor::system(),
            })
            .then_refused("illegal_transition");
    }

    #[test]
    fn a_deleted_listing_refuses_everything() {
        let deleted = given::<Listing>([created(), E::ListingPaused])
            .when(C::Delete { actor: seller() })
            .then(vec![E::ListingDeleted]);
        assert_eq!(deleted.status(), ListingStatus::Deleted);

        let commands = [
            C::Delete { actor: seller() },
            C::ChangePrice {
                actor: seller(),
                price: eur(1),
            },
            C::UpdateDetails {
                actor: admin(),
                details: details(),
            },
            C::Pause { actor: seller() },
            C::Resume { actor: seller() },
            C::MarkSoldOut {
                actor: Actor::system(),
            },
            C::MarkBackInStock {
                actor: Actor::system(),
            },
        ];
        for command in commands {
            let error = given::<Listing>([created(), E::ListingDeleted])
                .when(command)
                .then_refused("listing_deleted");
            assert_eq!(error.refusal(), Refusal::Conflict);
        }
        // Still refused as a second creation, not as a deletion.
        given::<Listing>([created(), E::ListingDeleted])
            .when(create(seller()))
            .then_refused("already_exists");
    }

    #[test]
    fn commands_on_a_missing_listing_are_not_found() {
        let error = given::<Listing>([])
            .when(C::Pause { actor: seller() })
            .then_refused("listing_not_found");
        assert_eq!(error.refusal(), Refusal::NotFound);
    }

    #[test]
    fn conditions_parse_from_their_snake_case_names() {
        for text in ["new", "like_new", "good", "fair", "poor"] {
            assert_eq!(Condition::parse(text).unwrap().as_str(), text);
        }
        assert_eq!(
            Condition::parse("mint").unwrap_err().code,
            "invalid_condition"
        );
        assert_eq!(
            serde_json::to_value(Condition::LikeNew).unwrap(),
            json!("like_new")
        );
        for status in [
            ListingStatus::Active,
            ListingStatus::Paused,
            ListingStatus::SoldOut,
            ListingStatus::Deleted,
        ] {
            assert_eq!(serde_json::to_value(status).unwrap(), status.as_str());
            assert_eq!(status.to_string(), status.as_str());
        }
    }

    #[test]
    fn attributes_are_json_scalars_with_simple_names() {
        let attrs = parse_attributes(
            json!({"a": true, "b": -3, "c": 1.5, "d": "x"})
                .as_object()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(attrs["a"], AttributeValue::Bool(true));
        assert_eq!(attrs["b"], AttributeValue::Int(-3));
        assert_eq!(attrs["c"], AttributeValue::Float(1.5));
        assert_eq!(attrs["d"], AttributeValue::Text("x".to_owned()));
        // Values keep their kind through a JSON round trip.
        let back: Attributes =
            serde_json::from_value(serde_json::to_value(&attrs).unwrap()).unwrap();
        assert_eq!(back, attrs);

        let code = |value: serde_json::Value| {
            parse_attributes(value.as_object().unwrap())
                .unwrap_err()
                .code
        };
        assert_eq!(code(json!({"a": null})), "invalid_attribute");
        assert_eq!(code(json!({"a": [1]})), "invalid_attribute");
        assert_eq!(code(json!({"a": {"b": 1}})), "invalid_attribute");
        assert_eq!(code(json!({"a": u64::MAX})), "invalid_attribute");
        assert_eq!(code(json!({"": 1})), "invalid_attribute");
        assert_eq!(code(json!({"Colour": 1})), "invalid_attribute");
        assert_eq!(code(json!({"a-b": 1})), "invalid_attribute");
        assert_eq!(code(json!({"k".repeat(65): 1})), "invalid_attribute");
        assert_eq!(code(json!({"a": "x".repeat(501)})), "too_long");
        let many: serde_json::Map<_, _> = (0..51).map(|i| (format!("k{i}"), json!(i))).collect();
        assert_eq!(parse_attributes(&many).unwrap_err().code, "too_many");

        let mut infinite = Attributes::new();
        infinite.insert("x".to_owned(), AttributeValue::Float(f64::INFINITY));
        assert_eq!(
            validate_attributes(&infinite).unwrap_err().code,
            "invalid_attribute"
        );
    }
}
