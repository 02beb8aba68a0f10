//! Anchors: a short token that commits to the whole log up to a position.
//!
//! The per-aggregate hash chains and the stream heads (migration 0010) catch
//! whoever changes the log without recomputing them; someone with full
//! write access to the database can rewrite an event and recompute its hash,
//! every later hash of its chain and its stream head, and the log is again
//! self-consistent. An anchor is what such a rewrite cannot match: a running
//! digest over every event's hash in the global order,
//!
//! `d0 = sha256("souk-anchor-v1")`, `d(i) = sha256(d(i-1) || xid || position || hash(i))`,
//!
//! taken up to a position P and printed as a token that an auditor keeps
//! outside the database (in a ticket, a signed mail, another company's
//! system). `verify --anchor TOKEN` recomputes the digest from the events up
//! to P: any event of that prefix altered (its hash is recomputed from its
//! content by the chain check), removed, added, moved in the global order
//! or renumbered changes it. What it cannot do: speak for events after P
//! (take anchors regularly), or for a rewrite made before the anchor was
//! taken.
//!
//! The token is `souk1.<position token>.<event count, hex>.<digest, 128 bits hex>`.
//! 128 bits of SHA-256 keep it short and still leave no feasible second
//! preimage.

use std::fmt;

use futures::TryStreamExt;
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use sqlx::postgres::PgPool;

use crate::global;
use crate::record::Position;

const PREFIX: &str = "souk1";

/// The digest of the log up to `position`, `events` events long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anchor {
    pub position: Position,
    pub events: u64,
    pub digest: [u8; 16],
}

/// A token that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an anchor token (souk1.<position>.<count>.<digest>)")]
pub struct InvalidAnchorToken(pub String);

impl Anchor {
    pub fn token(&self) -> String {
        format!(
            "{PREFIX}.{}.{:x}.{}",
            self.position.token(),
            self.events,
            hex::encode(self.digest)
        )
    }

    pub fn parse_token(token: &str) -> Result<Self, InvalidAnchorToken> {
        let invalid = || InvalidAnchorToken(token.chars().take(100).collect());
        let mut parts = token.trim().split('.');
        let (Some(PREFIX), Some(position), Some(events), Some(digest), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(invalid());
        };
        let position = Position::parse_token(position).map_err(|_| invalid())?;
        let events = u64::from_str_radix(events, 16).map_err(|_| invalid())?;
        let mut bytes = [0u8; 16];
        hex::decode_to_slice(digest, &mut bytes).map_err(|_| invalid())?;
        Ok(Self {
            position,
            events,
            digest: bytes,
        })
    }
}

impl fmt::Display for Anchor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.token())
    }
}

/// The running digest.
#[derive(Debug, Clone)]
pub struct RunningDigest {
    state: [u8; 32],
    events: u64,
    last: Position,
}

impl Default for RunningDigest {
    fn default() -> Self {
        Self {
            state: Sha256::digest(b"souk-anchor-v1").into(),
            events: 0,
            last: Position::START,
        }
    }
}

impl RunningDigest {
    pub fn push(&mut self, at: Position, hash: &[u8]) {
        let mut hasher = Sha256::new();
        hasher.update(self.state);
        hasher.update(at.transaction_id.to_be_bytes());
        hasher.update(at.position.to_be_bytes());
        hasher.update(hash);
        self.state = hasher.finalize().into();
        self.events += 1;
        self.last = at;
    }

    pub fn anchor(&self) -> Anchor {
        let mut digest = [0u8; 16];
        digest.copy_from_slice(&self.state[..16]);
        Anchor {
            position: self.last,
            events: self.events,
            digest,
        }
    }
}

/// Digests every event at or before `up_to` (all when `None`) in global
/// order, on `conn` (whose snapshot decides what is seen), streaming.
pub async fn digest(
    conn: &mut PgConnection,
    up_to: Option<Position>,
) -> Result<RunningDigest, sqlx::Error> {
    let mut running = RunningDigest::default();
    let up_to = up_to.unwrap_or(Position {
        transaction_id: i64::MAX as u64,
        position: i64::MAX,
    });
    let mut rows = sqlx::query_as::<_, (i64, i64, Vec<u8>)>(
        "SELECT transaction_id::text::bigint, position, hash FROM events
          WHERE (transaction_id, position) <= ($1::text::xid8, $2)
          ORDER BY events.transaction_id, events.position",
    )
    .bind(up_to.transaction_id.to_string())
    .bind(up_to.position)
    .fetch(conn);
    while let Some((transaction_id, position, hash)) = rows.try_next().await? {
        running.push(
            Position {
                transaction_id: transaction_id as u64,
                position,
            },
            &hash,
        );
    }
    Ok(running)
}

/// An anchor of the log as committed now: every event below the global
/// order's horizon (so no event can later appear before its position).
pub async fn take(pool: &PgPool) -> Result<Anchor, sqlx::Error> {
    let horizon = global::horizon(pool).await?;
    let below = Position {
        transaction_id: horizon.below.saturating_sub(1),
        position: i64::MAX,
    };
    let mut conn = pool.acquire().await?;
    Ok(digest(&mut conn, Some(below)).await?.anchor())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchor_tokens_round_trip_and_refuse_garbage() {
        let mut running = RunningDigest::default();
        running.push(
            Position {
                transaction_id: 7,
                position: 3,
            },
            &[1; 32],
        );
        let anchor = running.anchor();
        assert_eq!(anchor.events, 1);
        assert_eq!(Anchor::parse_token(&anchor.token()), Ok(anchor));
        for bad in [
            "",
            "souk1",
            "souk2.x.1.00",
            &format!("{}.1", anchor.token()),
        ] {
            assert!(Anchor::parse_token(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_digest_depends_on_every_hash_and_its_place() {
        let at = |position| Position {
            transaction_id: 1,
            position,
        };
        let digest = |entries: &[(i64, u8)]| {
            let mut running = RunningDigest::default();
            for (position, byte) in entries {
                running.push(at(*position), &[*byte; 32]);
            }
            running.anchor().digest
        };
        let base = digest(&[(1, 1), (2, 2)]);
        assert_ne!(base, digest(&[(1, 1), (2, 3)]));
        assert_ne!(base, digest(&[(2, 2), (1, 1)]));
        assert_ne!(base, digest(&[(1, 1), (3, 2)]));
        assert_ne!(base, digest(&[(1, 1)]));
    }
}
