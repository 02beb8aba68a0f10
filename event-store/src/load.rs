//! Loading an aggregate: its snapshot, if a usable one exists, then the
//! events recorded after it.

use domain::{Decide, DomainEvent};
use sqlx::postgres::PgPool;

use crate::record::GENESIS_HASH;
use crate::store::{Cached, ExecError};

fn hash_of(bytes: &[u8]) -> Result<[u8; 32], ExecError> {
    bytes
        .try_into()
        .map_err(|_| ExecError::Internal("a stored hash is not 32 bytes".into()))
}

pub(crate) async fn load<A: Decide>(pool: &PgPool, id: &str) -> Result<Cached<A>, ExecError> {
    let snapshot: Option<(i64, Vec<u8>, serde_json::Value)> = sqlx::query_as(
        "SELECT last_sequence, last_hash, payload FROM snapshots
          WHERE aggregate_type = $1 AND aggregate_id = $2 AND state_version = $3",
    )
    .bind(A::TYPE)
    .bind(id)
    .bind(A::STATE_VERSION)
    .fetch_optional(pool)
    .await
    .map_err(crate::store::db_error)?;
    let mut cached = Cached::<A>::default();
    if let Some((last_sequence, last_hash, payload)) = snapshot {
        match serde_json::from_value::<A>(payload) {
            Ok(state) => {
                cached = Cached {
                    state,
                    version: last_sequence,
                    last_hash: hash_of(&last_hash)?,
                }
            }
            // A snapshot is only a cache: rebuild from the events instead.
            Err(error) => {
                tracing::warn!(aggregate = A::TYPE, id, %error, "ignoring unreadable snapshot")
            }
        }
    }
    let rows: Vec<(i64, String, String, String, Vec<u8>)> = sqlx::query_as(
        "SELECT sequence, event_type, event_version, payload::text, hash FROM events
          WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence > $3
          ORDER BY sequence",
    )
    .bind(A::TYPE)
    .bind(id)
    .bind(cached.version)
    .fetch_all(pool)
    .await
    .map_err(crate::store::db_error)?;
    for (sequence, event_type, event_version, payload, hash) in rows {
        if sequence != cached.version + 1 {
            return Err(ExecError::Internal(format!(
                "{} {id}: event {sequence} follows {}",
                A::TYPE,
                cached.version
            )));
        }
        let event = A::Event::decode(&event_type, &event_version, &payload).map_err(|error| {
            ExecError::Internal(format!("{} {id} event {sequence}: {error}", A::TYPE))
        })?;
        cached.state.apply(event);
        cached.version = sequence;
        cached.last_hash = hash_of(&hash)?;
    }
    if cached.version == 0 {
        cached.last_hash = GENESIS_HASH;
    }
    Ok(cached)
}
