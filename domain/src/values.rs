//! Value objects shared by the aggregates: typed ids, money, bounded text,
//! actors. Constructors that take outside input are `parse` and return a
//! [`ValidationError`]; deserialisation from stored events is permissive
//! (`serde(transparent)`), because an event that was valid when it was
//! recorded must stay readable when the rules get stricter.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Why a piece of outside input was refused. `code` is stable and reaches
/// clients; `message` is for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ValidationError {
    pub code: &'static str,
    pub message: String,
}

impl ValidationError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// A new, time-ordered (v7) id.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            pub const fn from_uuid(id: Uuid) -> Self {
                Self(id)
            }

            pub const fn as_uuid(&self) -> Uuid {
                self.0
            }

            /// Parses outside input: any UUID in its standard text form.
            pub fn parse(text: &str) -> Result<Self, ValidationError> {
                Uuid::parse_str(text).map(Self).map_err(|_| {
                    ValidationError::new("invalid_id", format!("`{text}` is not a UUID"))
                })
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self(Uuid::nil())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

typed_id!(
    /// A person or organisation, as named by the `sub` claim of their token.
    UserId
);
typed_id!(
    /// A listing, and also the stock pool (Reservation aggregate) of that listing.
    ListingId
);
typed_id!(
    /// One hold on a listing's stock.
    HoldId
);
typed_id!(OrderId);
typed_id!(
    /// The checkout that produced one or more orders (one per seller).
    CheckoutId
);
typed_id!(WalletId);
typed_id!(
    /// A physical product whose life story a ProductTimeline tells.
    ProductId
);
typed_id!(StoryId);
typed_id!(CustomizationId);

/// Largest amount of money Souk accepts in one value: 10^15 minor units. Sums of
/// a few thousand such values stay far from `i64::MAX`.
pub const MAX_AMOUNT: i64 = 1_000_000_000_000_000;

/// ISO 4217 codes Souk accepts.
pub const CURRENCIES: &[&str] = &[
    "AED", "AUD", "BGN", "BRL", "CAD", "CHF", "CNY", "CZK", "DKK", "EGP", "EUR", "GBP", "HKD",
    "HUF", "IDR", "ILS", "INR", "JPY", "KRW", "MAD", "MXN", "NOK", "NZD", "PLN", "RON", "SAR",
    "SEK", "SGD", "THB", "TND", "TRY", "UAH", "USD", "ZAR",
];

/// An ISO 4217 currency code.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Currency(String);

impl Currency {
    pub fn parse(code: &str) -> Result<Self, ValidationError> {
        if CURRENCIES.contains(&code) {
            Ok(Self(code.to_owned()))
        } else {
            Err(ValidationError::new(
                "invalid_currency",
                format!("`{code}` is not a supported ISO 4217 currency code"),
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Currency {
    fn default() -> Self {
        Self("EUR".to_owned())
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An amount of money in minor units (cents) with its currency. Never
/// negative; never floating point.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct Money {
    amount: i64,
    currency: Currency,
}

impl Money {
    /// Parses outside input: a strictly positive amount up to [`MAX_AMOUNT`].
    pub fn parse_positive(amount: i64, currency: &str) -> Result<Self, ValidationError> {
        let currency = Currency::parse(currency)?;
        Self::positive(amount, currency)
    }

    /// A strictly positive amount up to [`MAX_AMOUNT`] in a known currency.
    pub fn positive(amount: i64, currency: Currency) -> Result<Self, ValidationError> {
        if amount <= 0 {
            return Err(ValidationError::new(
                "invalid_amount",
                "amount must be a positive number of minor units",
            ));
        }
        if amount > MAX_AMOUNT {
            return Err(ValidationError::new(
                "invalid_amount",
                format!("amount must be at most {MAX_AMOUNT} minor units"),
            ));
        }
        Ok(Self { amount, currency })
    }

    /// Zero in `currency`.
    pub fn zero(currency: Currency) -> Self {
        Self {
            amount: 0,
            currency,
        }
    }

    pub fn amount(&self) -> i64 {
        self.amount
    }

    pub fn currency(&self) -> &Currency {
        &self.currency
    }

    /// `self * quantity`, or `None` past [`MAX_AMOUNT`].
    pub fn times(&self, quantity: u32) -> Option<Money> {
        let amount = self.amount.checked_mul(i64::from(quantity))?;
        (amount <= MAX_AMOUNT).then(|| Money {
            amount,
            currency: self.currency.clone(),
        })
    }

    /// `self + other` in the same currency, or `None` on a currency mismatch
    /// or past [`MAX_AMOUNT`].
    pub fn plus(&self, other: &Money) -> Option<Money> {
        if self.currency != other.currency {
            return None;
        }
        let amount = self.amount.checked_add(other.amount)?;
        (amount <= MAX_AMOUNT).then(|| Money {
            amount,
            currency: self.currency.clone(),
        })
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.amount, self.currency)
    }
}

/// Text of `MIN..=MAX` characters (Unicode scalar values), trimmed, without
/// control characters other than newlines and tabs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct Text<const MIN: usize, const MAX: usize>(String);

impl<const MIN: usize, const MAX: usize> Text<MIN, MAX> {
    /// The fewest characters accepted (after trimming).
    pub const MIN_CHARS: usize = MIN;
    /// The most characters accepted.
    pub const MAX_CHARS: usize = MAX;

    pub fn parse(field: &str, text: &str) -> Result<Self, ValidationError> {
        let text = text.trim();
        let chars = text.chars().count();
        if chars > MAX {
            return Err(ValidationError::new(
                "too_long",
                format!("{field} must be at most {MAX} characters"),
            ));
        }
        if chars < MIN {
            return Err(ValidationError::new(
                "too_short",
                format!("{field} must be at least {MIN} characters"),
            ));
        }
        if text
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t')
        {
            return Err(ValidationError::new(
                "invalid_text",
                format!("{field} must not contain control characters"),
            ));
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<const MIN: usize, const MAX: usize> fmt::Display for Text<MIN, MAX> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub type Title = Text<1, 200>;
pub type Description = Text<0, 5000>;
pub type Label = Text<1, 64>;
pub type Reference = Text<1, 128>;
pub type Reason = Text<0, 1000>;
pub type Comment = Text<0, 2000>;
pub type StoryBody = Text<1, 10_000>;

/// An `http` or `https` URL of at most 2,048 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct Url(String);

impl Url {
    pub const MAX_LEN: usize = 2048;

    pub fn parse(field: &str, text: &str) -> Result<Self, ValidationError> {
        if text.len() > Self::MAX_LEN {
            return Err(ValidationError::new(
                "too_long",
                format!("{field} must be at most {} characters", Self::MAX_LEN),
            ));
        }
        let rest = text
            .strip_prefix("https://")
            .or_else(|| text.strip_prefix("http://"));
        match rest {
            Some(rest)
                if !rest.is_empty()
                    && !rest.starts_with('/')
                    && !rest.chars().any(|c| c.is_whitespace() || c.is_control()) =>
            {
                Ok(Self(text.to_owned()))
            }
            _ => Err(ValidationError::new(
                "invalid_url",
                format!("{field} must be an http or https URL"),
            )),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An ISO 3166-1 alpha-2 country code, upper case.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct CountryCode(String);

impl CountryCode {
    pub fn parse(text: &str) -> Result<Self, ValidationError> {
        if text.len() == 2 && text.bytes().all(|b| b.is_ascii_uppercase()) {
            Ok(Self(text.to_owned()))
        } else {
            Err(ValidationError::new(
                "invalid_country",
                "country must be an ISO 3166-1 alpha-2 code such as `FR`",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Where an item is: a city and country, optionally coordinates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Location {
    pub city: Label,
    pub country: CountryCode,
    pub lat: Option<f64>,
    pub lon: Option<f64>,
}

impl Location {
    pub fn parse(
        city: &str,
        country: &str,
        lat: Option<f64>,
        lon: Option<f64>,
    ) -> Result<Self, ValidationError> {
        let city = Label::parse("location.city", city)?;
        let country = CountryCode::parse(country)?;
        match (lat, lon) {
            (None, None) => {}
            (Some(lat), Some(lon))
                if (-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon) => {}
            _ => {
                return Err(ValidationError::new(
                    "invalid_coordinates",
                    "lat and lon go together, within [-90, 90] and [-180, 180]",
                ));
            }
        }
        Ok(Self {
            city,
            country,
            lat,
            lon,
        })
    }
}

/// Who issues a command, as proven by their token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    #[default]
    Buyer,
    Seller,
    Admin,
    Auditor,
    Operator,
    /// Souk's own process managers (sagas and timers). Never granted by a token.
    System,
}

impl Role {
    /// Parses a token's `role` claim. `system` is not a claim anyone can hold.
    pub fn parse(text: &str) -> Result<Self, ValidationError> {
        match text {
            "buyer" => Ok(Self::Buyer),
            "seller" => Ok(Self::Seller),
            "admin" => Ok(Self::Admin),
            "auditor" => Ok(Self::Auditor),
            "operator" => Ok(Self::Operator),
            _ => Err(ValidationError::new(
                "invalid_role",
                format!("`{text}` is not a role"),
            )),
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Buyer => "buyer",
            Self::Seller => "seller",
            Self::Admin => "admin",
            Self::Auditor => "auditor",
            Self::Operator => "operator",
            Self::System => "system",
        }
    }
}

/// The user and role a command is issued by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Actor {
    pub user_id: UserId,
    pub role: Role,
}

impl Actor {
    pub fn new(user_id: UserId, role: Role) -> Self {
        Self { user_id, role }
    }

    /// Souk's own process managers.
    pub fn system() -> Self {
        Self {
            user_id: UserId::from_uuid(Uuid::nil()),
            role: Role::System,
        }
    }

    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    pub fn is_system(&self) -> bool {
        self.role == Role::System
    }

    /// Whether this actor is `user` acting in person. Auditors' and
    /// operators' tokens only read, and Souk's own processes never act as a
    /// particular user, so neither counts even with a matching id.
    pub fn is_user(&self, user: UserId) -> bool {
        self.user_id == user && matches!(self.role, Role::Buyer | Role::Seller | Role::Admin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_refuses_zero_negative_and_overflowing_amounts() {
        assert_eq!(
            Money::parse_positive(0, "EUR").unwrap_err().code,
            "invalid_amount"
        );
        assert_eq!(
            Money::parse_positive(-5, "EUR").unwrap_err().code,
            "invalid_amount"
        );
        assert_eq!(
            Money::parse_positive(MAX_AMOUNT + 1, "EUR")
                .unwrap_err()
                .code,
            "invalid_amount"
        );
        assert_eq!(
            Money::parse_positive(5, "XXX").unwrap_err().code,
            "invalid_currency"
        );
        assert_eq!(Money::parse_positive(1999, "EUR").unwrap().amount(), 1999);
    }

    #[test]
    fn money_arithmetic_is_checked() {
        let price = Money::parse_positive(MAX_AMOUNT / 2 + 1, "EUR").unwrap();
        assert!(price.times(2).is_none());
        assert!(price.plus(&price).is_none());
        let usd = Money::parse_positive(1, "USD").unwrap();
        assert!(
            usd.plus(&Money::parse_positive(1, "EUR").unwrap())
                .is_none()
        );
    }

    #[test]
    fn text_is_bounded_in_characters_not_bytes() {
        let ok = "é".repeat(200);
        assert!(Title::parse("title", &ok).is_ok());
        let long = "é".repeat(201);
        assert_eq!(Title::parse("title", &long).unwrap_err().code, "too_long");
        assert_eq!(Title::parse("title", "   ").unwrap_err().code, "too_short");
        assert_eq!(
            Title::parse("title", "a\u{0}b").unwrap_err().code,
            "invalid_text"
        );
    }

    #[test]
    fn urls_must_be_http_or_https() {
        assert!(Url::parse("image", "https://img.example/a.jpg").is_ok());
        assert!(Url::parse("image", "javascript:alert(1)").is_err());
        assert!(Url::parse("image", "https://").is_err());
        assert!(Url::parse("image", "https://a b").is_err());
    }

    #[test]
    fn the_system_role_cannot_come_from_a_token() {
        assert!(Role::parse("system").is_err());
        assert_eq!(Role::parse("seller").unwrap(), Role::Seller);
    }
}
