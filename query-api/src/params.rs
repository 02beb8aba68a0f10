//! Query strings, read strictly. A route names the parameters it takes; any
//! other parameter, a repeated one, or one that cannot be decoded is 400
//! `invalid_query`, so a typo (`?limt=5`) is an error instead of being
//! silently ignored. Each value has its own rule and code: `invalid_limit`,
//! `invalid_cursor`, `invalid_position`, `invalid_parameter`.
//!
//! Cursors are opaque to clients: the hex of a tag byte naming the list they
//! page through followed by the sort key of the last row served, so a cursor
//! of one list is refused by another.

use std::collections::BTreeMap;

use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;
use event_store::Position;
use http_kit::ApiError;
use uuid::Uuid;

/// Page size when `limit` is absent.
pub const DEFAULT_LIMIT: i64 = 20;
/// Largest page size.
pub const MAX_LIMIT: i64 = 100;
/// Longest accepted cursor, in characters (the longest Souk makes is 34).
pub const MAX_CURSOR_LEN: usize = 64;

/// The raw parameters of a request's query string, in order.
#[derive(Debug, Clone, Default)]
pub struct QueryParams(Vec<(String, String)>);

impl<S: Send + Sync> FromRequestParts<S> for QueryParams {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let Query(pairs) = Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)
            .map_err(|_| invalid_query("the query string cannot be decoded"))?;
        Ok(Self(pairs))
    }
}

impl QueryParams {
    /// The parameters, provided each is one of `allowed` and named once.
    pub fn accept(self, allowed: &[&str]) -> Result<Params, ApiError> {
        let mut values = BTreeMap::new();
        for (name, value) in self.0 {
            if !allowed.contains(&name.as_str()) {
                let shown: String = name.chars().take(64).collect();
                let message = if allowed.is_empty() {
                    format!("unknown query parameter `{shown}`: this route takes none")
                } else {
                    format!(
                        "unknown query parameter `{shown}`: this route takes {}",
                        allowed.join(", ")
                    )
                };
                return Err(invalid_query(message));
            }
            if values.insert(name.clone(), value).is_some() {
                return Err(invalid_query(format!(
                    "the query parameter `{name}` is given more than once"
                )));
            }
        }
        Ok(Params(values))
    }
}

/// The accepted parameters of one request, by name.
#[derive(Debug, Clone, Default)]
pub struct Params(BTreeMap<String, String>);

impl Params {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// `?after=<position token>`: the write the answer must include.
    pub fn after(&self) -> Result<Option<Position>, ApiError> {
        self.get("after").map(parse_position).transpose()
    }

    /// `?limit=`: 1 to [`MAX_LIMIT`], [`DEFAULT_LIMIT`] when absent.
    pub fn limit(&self) -> Result<i64, ApiError> {
        let Some(text) = self.get("limit") else {
            return Ok(DEFAULT_LIMIT);
        };
        text.parse::<i64>()
            .ok()
            .filter(|limit| (1..=MAX_LIMIT).contains(limit))
            .ok_or_else(|| ApiError::BadRequest {
                code: "invalid_limit",
                message: format!("limit must be an integer from 1 to {MAX_LIMIT}"),
            })
    }

    /// `?cursor=` of the list `kind`, decoded.
    pub fn cursor<K: CursorKey>(&self, kind: CursorKind) -> Result<Option<K>, ApiError> {
        self.get("cursor")
            .map(|text| Cursor::decode(kind, text))
            .transpose()
    }

    /// A UUID parameter.
    pub fn uuid(&self, name: &str) -> Result<Option<Uuid>, ApiError> {
        self.get(name)
            .map(|text| {
                Uuid::parse_str(text)
                    .map_err(|_| invalid_parameter(format!("{name} must be a UUID")))
            })
            .transpose()
    }

    /// An integer parameter within `min..=max`.
    pub fn integer(&self, name: &str, min: i64, max: i64) -> Result<Option<i64>, ApiError> {
        self.get(name)
            .map(|text| {
                text.parse::<i64>()
                    .ok()
                    .filter(|value| (min..=max).contains(value))
                    .ok_or_else(|| {
                        invalid_parameter(format!("{name} must be an integer from {min} to {max}"))
                    })
            })
            .transpose()
    }

    /// A parameter that takes one of `choices`.
    pub fn choice(
        &self,
        name: &str,
        choices: &'static [&'static str],
    ) -> Result<Option<&'static str>, ApiError> {
        self.get(name)
            .map(|text| {
                choices
                    .iter()
                    .copied()
                    .find(|choice| *choice == text)
                    .ok_or_else(|| {
                        invalid_parameter(format!("{name} must be one of {}", choices.join(", ")))
                    })
            })
            .transpose()
    }
}

/// Parses a position token; anything else is 400 `invalid_position`.
pub fn parse_position(text: &str) -> Result<Position, ApiError> {
    let refuse = || ApiError::BadRequest {
        code: "invalid_position",
        message: "after must be a position token as the command API answers it (32 hex digits)"
            .to_owned(),
    };
    let position = Position::parse_token(text).map_err(|_| refuse())?;
    // Checkpoints store transaction ids as bigint; no real xid8 reaches 2^63.
    if i64::try_from(position.transaction_id).is_err() {
        return Err(refuse());
    }
    Ok(position)
}

pub fn invalid_query(message: impl Into<String>) -> ApiError {
    ApiError::BadRequest {
        code: "invalid_query",
        message: message.into(),
    }
}

/// A parameter's value out of its rules; the message names the parameter.
pub fn invalid_parameter(message: impl Into<String>) -> ApiError {
    ApiError::BadRequest {
        code: "invalid_parameter",
        message: message.into(),
    }
}

/// The lists that page with a cursor; the tag keeps their cursors apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CursorKind {
    Listings,
    Orders,
    WalletEntries,
    Timeline,
    /// `/search`: the offset of the next page.
    Search,
}

impl CursorKind {
    fn tag(self) -> u8 {
        match self {
            Self::Listings => b'L',
            Self::Orders => b'O',
            Self::WalletEntries => b'W',
            Self::Timeline => b'T',
            Self::Search => b'S',
        }
    }

    /// A regular expression matching exactly the cursors of this list (for
    /// the OpenAPI document): the tag, then a UUID or a sequence number.
    pub fn pattern(self) -> String {
        let tag: String = format!("{:02x}", self.tag())
            .chars()
            .map(|digit| {
                if digit.is_ascii_alphabetic() {
                    format!("[{digit}{}]", digit.to_ascii_uppercase())
                } else {
                    digit.to_string()
                }
            })
            .collect();
        let key = match self {
            Self::Listings | Self::Orders => "[0-9a-fA-F]{32}",
            // A big-endian i64 that is not negative.
            Self::WalletEntries | Self::Timeline | Self::Search => "[0-7][0-9a-fA-F]{15}",
        };
        format!("^{tag}{key}$")
    }
}

/// A sort key a cursor can carry.
pub trait CursorKey: Sized {
    fn to_bytes(&self) -> Vec<u8>;
    fn from_bytes(bytes: &[u8]) -> Option<Self>;
}

impl CursorKey for Uuid {
    fn to_bytes(&self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }

    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        Uuid::from_slice(bytes).ok()
    }
}

/// Sequence numbers of a stream's events (never negative).
impl CursorKey for i64 {
    fn to_bytes(&self) -> Vec<u8> {
        self.to_be_bytes().to_vec()
    }

    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let value = i64::from_be_bytes(bytes.try_into().ok()?);
        (value >= 0).then_some(value)
    }
}

/// Encoding and decoding of cursors.
#[derive(Debug)]
pub struct Cursor;

impl Cursor {
    pub fn encode<K: CursorKey>(kind: CursorKind, key: &K) -> String {
        let mut bytes = vec![kind.tag()];
        bytes.extend(key.to_bytes());
        hex::encode(bytes)
    }

    pub fn decode<K: CursorKey>(kind: CursorKind, text: &str) -> Result<K, ApiError> {
        let refuse = || ApiError::BadRequest {
            code: "invalid_cursor",
            message: "cursor must be a next_cursor this list answered".to_owned(),
        };
        if text.len() > MAX_CURSOR_LEN {
            return Err(refuse());
        }
        let bytes = hex::decode(text).map_err(|_| refuse())?;
        match bytes.split_first() {
            Some((tag, key)) if *tag == kind.tag() => K::from_bytes(key).ok_or_else(refuse),
            _ => Err(refuse()),
        }
    }
}

/// One page of a list: the rows and the cursor of the next page (`None` on
/// the last). `rows` holds up to `limit + 1` rows, as fetched; the extra row
/// only says that there is a next page.
pub fn page<R, K: CursorKey>(
    mut rows: Vec<R>,
    limit: i64,
    kind: CursorKind,
    key: impl Fn(&R) -> K,
) -> (Vec<R>, Option<String>) {
    let limit = usize::try_from(limit).unwrap_or(0);
    if rows.len() > limit {
        rows.truncate(limit);
        let next = rows.last().map(|row| Cursor::encode(kind, &key(row)));
        (rows, next)
    } else {
        (rows, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)], allowed: &[&str]) -> Result<Params, ApiError> {
        QueryParams(
            pairs
                .iter()
                .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
                .collect(),
        )
        .accept(allowed)
    }

    #[test]
    fn unknown_and_repeated_parameters_are_refused() {
        let unknown = params(&[("limt", "5")], &["limit"]).unwrap_err();
        assert_eq!(unknown.code(), "invalid_query");
        let repeated = params(&[("limit", "5"), ("limit", "6")], &["limit"]).unwrap_err();
        assert_eq!(repeated.code(), "invalid_query");
        assert!(params(&[("limit", "5")], &["limit"]).is_ok());
    }

    #[test]
    fn limits_are_bounded() {
        for bad in ["0", "101", "-1", "", "ten", "1.5"] {
            let error = params(&[("limit", bad)], &["limit"])
                .unwrap()
                .limit()
                .unwrap_err();
            assert_eq!(error.code(), "invalid_limit", "{bad}");
        }
        assert_eq!(params(&[], &["limit"]).unwrap().limit().unwrap(), 20);
        assert_eq!(
            params(&[("limit", "100")], &["limit"])
                .unwrap()
                .limit()
                .unwrap(),
            100
        );
    }

    #[test]
    fn cursors_round_trip_and_belong_to_their_list() {
        let id = Uuid::now_v7();
        let cursor = Cursor::encode(CursorKind::Listings, &id);
        assert_eq!(
            Cursor::decode::<Uuid>(CursorKind::Listings, &cursor).unwrap(),
            id
        );
        assert_eq!(
            Cursor::decode::<Uuid>(CursorKind::Orders, &cursor)
                .unwrap_err()
                .code(),
            "invalid_cursor"
        );
        let sequence = Cursor::encode(CursorKind::Timeline, &42_i64);
        assert_eq!(
            Cursor::decode::<i64>(CursorKind::Timeline, &sequence).unwrap(),
            42
        );
        for bad in [
            "",
            "zz",
            "4c",
            &"4c".repeat(40),
            &format!("54{}", "ff".repeat(8)),
        ] {
            assert!(
                Cursor::decode::<i64>(CursorKind::Timeline, bad).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn positions_must_be_tokens_with_a_bigint_transaction() {
        let position = Position {
            transaction_id: 77,
            position: 5,
        };
        assert_eq!(parse_position(&position.token()).unwrap(), position);
        for bad in ["", "abc", &"f".repeat(32), &"0".repeat(31)] {
            assert_eq!(parse_position(bad).unwrap_err().code(), "invalid_position");
        }
    }

    #[test]
    fn pages_say_whether_more_rows_follow() {
        let (rows, next) = page(vec![1_i64, 2, 3], 2, CursorKind::Timeline, |row| *row);
        assert_eq!(rows, vec![1, 2]);
        assert_eq!(
            next.map(|cursor| Cursor::decode::<i64>(CursorKind::Timeline, &cursor).unwrap()),
            Some(2)
        );
        let (rows, next) = page(vec![1_i64, 2], 2, CursorKind::Timeline, |row| *row);
        assert_eq!((rows.len(), next), (2, None));
    }
}
