//! What one stored event is made of: its metadata, its place in the global
//! order ([`Position`]) and its link in the per-aggregate hash chain.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// A place in the global order: events are totally ordered by
/// `(transaction_id, position)`, see `global.rs` for why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    /// The writing transaction's id (`xid8`).
    pub transaction_id: u64,
    /// The event's global position (a sequence value).
    pub position: i64,
}

/// A position token that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a position token")]
pub struct InvalidPositionToken(pub String);

impl Position {
    /// Before the first event.
    pub const START: Position = Position {
        transaction_id: 0,
        position: 0,
    };

    /// The opaque, URL-safe token handed to clients: 32 hex digits.
    pub fn token(&self) -> String {
        format!("{:016x}{:016x}", self.transaction_id, self.position)
    }

    pub fn parse_token(token: &str) -> Result<Self, InvalidPositionToken> {
        let invalid = || InvalidPositionToken(token.chars().take(64).collect());
        if token.len() != 32 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid());
        }
        let transaction_id = u64::from_str_radix(&token[..16], 16).map_err(|_| invalid())?;
        let position = i64::from_str_radix(&token[16..], 16).map_err(|_| invalid())?;
        if position < 0 {
            return Err(invalid());
        }
        Ok(Self {
            transaction_id,
            position,
        })
    }
}

/// Positions travel as their token (in JSON envelopes and HTTP answers).
impl Serialize for Position {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.token())
    }
}

impl<'de> Deserialize<'de> for Position {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let token = String::deserialize(deserializer)?;
        Position::parse_token(&token).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.transaction_id, self.position)
    }
}

/// Who and what caused a command: recorded on every event it produces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandContext {
    pub actor_id: Uuid,
    pub actor_role: String,
    pub command_id: Uuid,
    pub correlation_id: Uuid,
    pub causation_id: Uuid,
    pub request_id: Option<String>,
}

impl CommandContext {
    /// A context for a command with no outside cause: it correlates with
    /// and is caused by itself.
    pub fn new(actor_id: Uuid, actor_role: &str, command_id: Uuid) -> Self {
        Self {
            actor_id,
            actor_role: actor_role.to_owned(),
            command_id,
            correlation_id: command_id,
            causation_id: command_id,
            request_id: None,
        }
    }
}

/// The metadata object stored with each event (string values, as cqrs-es's
/// `EventEnvelope::metadata` expects).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMetadata {
    pub event_id: Uuid,
    pub actor_id: String,
    pub actor_role: String,
    pub command_id: String,
    pub correlation_id: String,
    pub causation_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    pub recorded_at: String,
}

impl EventMetadata {
    pub fn new(context: &CommandContext, event_id: Uuid, recorded_at: DateTime<Utc>) -> Self {
        Self {
            event_id,
            actor_id: context.actor_id.to_string(),
            actor_role: context.actor_role.clone(),
            command_id: context.command_id.to_string(),
            correlation_id: context.correlation_id.to_string(),
            causation_id: context.causation_id.to_string(),
            request_id: context.request_id.clone(),
            recorded_at: recorded_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        }
    }
}

/// The hash of "no previous event": the start of every aggregate's chain.
pub const GENESIS_HASH: [u8; 32] = [0; 32];

/// The fields of an event that its hash covers, in their stored form.
#[derive(Debug, Clone, Copy)]
pub struct ChainedFields<'a> {
    pub aggregate_type: &'a str,
    pub aggregate_id: &'a str,
    pub sequence: i64,
    pub event_type: &'a str,
    pub event_version: &'a str,
    pub event_id: Uuid,
    pub recorded_at_micros: i64,
    pub payload: &'a str,
    pub metadata: &'a str,
}

impl ChainedFields<'_> {
    /// `sha256(prev_hash || canonical(fields))`. Every variable-length field
    /// is length-prefixed, so no two different events encode alike.
    pub fn hash(&self, prev_hash: &[u8; 32]) -> [u8; 32] {
        fn put(hasher: &mut Sha256, bytes: &[u8]) {
            // Fields are bounded far below 4 GiB by the API's body limit.
            hasher.update((bytes.len() as u64).to_be_bytes());
            hasher.update(bytes);
        }
        let mut hasher = Sha256::new();
        hasher.update(b"souk-event-v1");
        hasher.update(prev_hash);
        put(&mut hasher, self.aggregate_type.as_bytes());
        put(&mut hasher, self.aggregate_id.as_bytes());
        hasher.update(self.sequence.to_be_bytes());
        put(&mut hasher, self.event_type.as_bytes());
        put(&mut hasher, self.event_version.as_bytes());
        hasher.update(self.event_id.as_bytes());
        hasher.update(self.recorded_at_micros.to_be_bytes());
        put(&mut hasher, self.payload.as_bytes());
        put(&mut hasher, self.metadata.as_bytes());
        hasher.finalize().into()
    }
}

/// `Utc::now()` at the microsecond precision Postgres stores, so the time
/// that was hashed is the time that is read back.
pub fn now_micros() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_tokens_round_trip_and_order_like_positions() {
        let a = Position {
            transaction_id: 900,
            position: 12,
        };
        let b = Position {
            transaction_id: 901,
            position: 3,
        };
        assert_eq!(Position::parse_token(&a.token()), Ok(a));
        assert!(a < b);
        assert!(a.token() < b.token());
        assert!(Position::parse_token("zz").is_err());
        assert!(Position::parse_token(&"g".repeat(32)).is_err());
        assert!(Position::parse_token(&format!("{:016x}{:016x}", 1, u64::MAX)).is_err());
    }

    #[test]
    fn the_hash_covers_every_field_and_the_previous_hash() {
        let fields = ChainedFields {
            aggregate_type: "Wallet",
            aggregate_id: "a",
            sequence: 1,
            event_type: "FundsDeposited",
            event_version: "1",
            event_id: Uuid::nil(),
            recorded_at_micros: 1,
            payload: "{}",
            metadata: "{}",
        };
        let base = fields.hash(&GENESIS_HASH);
        assert_ne!(base, fields.hash(&[1; 32]));
        assert_ne!(
            base,
            ChainedFields {
                sequence: 2,
                ..fields
            }
            .hash(&GENESIS_HASH)
        );
        assert_ne!(
            base,
            ChainedFields {
                payload: "{ }",
                ..fields
            }
            .hash(&GENESIS_HASH)
        );
        // Moving a byte from one field to the next changes the hash.
        assert_ne!(
            ChainedFields {
                aggregate_type: "Walle",
                aggregate_id: "ta",
                ..fields
            }
            .hash(&GENESIS_HASH),
            ChainedFields {
                aggregate_type: "Wallet",
                aggregate_id: "a",
                ..fields
            }
            .hash(&GENESIS_HASH)
        );
    }
}
