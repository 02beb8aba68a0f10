//! A JetStream stream feeds from one database, partitioned one way. Two
//! databases publishing to one stream would interleave two unrelated global
//! orders; a relay and projectors that disagree on `SOUK_PARTITIONS` would
//! put an aggregate's events on a partition nobody reads. Both mistakes are
//! easy to make across hosts, so both are refused, by the relay (it stops
//! publishing and says why on `/health`) and by every projector (it does
//! not start):
//!
//! - the database has an identity (`database_identity`), and a stream names
//!   the database that created it in its description ([`describe`]); a stream
//!   naming another database is refused ([`check_owner`]);
//! - the database records each stream's partition count the first time a
//!   relay or projector binds it (`stream_bindings`); another count later is
//!   refused ([`bind_partitions`]). Changing it means a new stream: see
//!   deploy/README.md ("Changing SOUK_PARTITIONS").
//!
//! The relay also refuses a stream whose last message is an event this
//! database does not hold ([`BindingError::UnknownLastEvent`]): a stream fed
//! by another copy of the database.

use sqlx::PgExecutor;
use uuid::Uuid;

use crate::record::Position;

/// Why a stream cannot be used as configured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindingError {
    #[error(
        "SOUK_PARTITIONS is {configured} but the stream `{stream}` of this database is partitioned into {bound}; \
         every relay and projector must use {bound} (changing it needs a new stream: see deploy/README.md, \"Changing SOUK_PARTITIONS\")"
    )]
    PartitionsChanged {
        stream: String,
        bound: u32,
        configured: u32,
    },
    #[error(
        "the stream `{stream}` belongs to database {owner}, not to this one ({this}); \
         two databases must never publish to one stream: give this one a SOUK_STREAM of its own"
    )]
    OtherDatabase {
        stream: String,
        owner: Uuid,
        this: Uuid,
    },
    /// The stream's last message is an event this database does not hold
    /// at that position: the relay would skip or reorder events.
    #[error(
        "the last message of the stream `{stream}` is event {event_id} at position {position}, which this database does not hold there: \
         the stream was fed from another copy of this database (one restored from a backup?); publishing on would skip or reorder events, \
         so give this database a new SOUK_STREAM and rebuild its projections"
    )]
    UnknownLastEvent {
        stream: String,
        event_id: Uuid,
        position: Position,
    },
}

/// This database's identity.
pub async fn database_id(executor: impl PgExecutor<'_>) -> Result<Uuid, sqlx::Error> {
    sqlx::query_scalar("SELECT database_id FROM database_identity")
        .fetch_one(executor)
        .await
}

/// Records `partitions` for `stream` unless a count is recorded already, and
/// refuses another count than the recorded one.
pub async fn bind_partitions(
    executor: impl PgExecutor<'_>,
    stream: &str,
    partitions: u32,
) -> Result<Result<(), BindingError>, sqlx::Error> {
    // `DO UPDATE` to the same value, not `DO NOTHING` plus a second SELECT:
    // when two processes bind at once, the loser's SELECT would read the
    // snapshot taken before the winner committed and find no row. The
    // no-op update waits for the winner's row and returns it.
    let bound: i32 = sqlx::query_scalar(
        "INSERT INTO stream_bindings (stream, partitions) VALUES ($1, $2)
         ON CONFLICT (stream) DO UPDATE SET partitions = stream_bindings.partitions
         RETURNING partitions",
    )
    .bind(stream)
    .bind(partitions as i32)
    .fetch_one(executor)
    .await?;
    let bound = bound as u32;
    Ok(if bound == partitions {
        Ok(())
    } else {
        Err(BindingError::PartitionsChanged {
            stream: stream.to_owned(),
            bound,
            configured: partitions,
        })
    })
}

/// The description of a stream `database` feeds: it names the database.
pub fn describe(database: Uuid) -> String {
    format!("Souk's committed events, in global order, of database {database}")
}

/// The database a stream's description names, if any (a stream created
/// before streams named their database names none).
pub fn owner(description: Option<&str>) -> Option<Uuid> {
    let description = description?;
    let (_, id) = description.rsplit_once("of database ")?;
    Uuid::parse_str(id.trim()).ok()
}

/// Refuses a stream whose description names another database than `this`.
pub fn check_owner(
    stream: &str,
    description: Option<&str>,
    this: Uuid,
) -> Result<(), BindingError> {
    match owner(description) {
        Some(owner) if owner != this => Err(BindingError::OtherDatabase {
            stream: stream.to_owned(),
            owner,
            this,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_names_its_database_and_refuses_another() {
        let this = Uuid::now_v7();
        let other = Uuid::now_v7();
        let description = describe(this);
        assert_eq!(owner(Some(&description)), Some(this));
        assert!(check_owner("souk", Some(&description), this).is_ok());
        let refused = check_owner("souk", Some(&description), other).unwrap_err();
        assert_eq!(
            refused,
            BindingError::OtherDatabase {
                stream: "souk".to_owned(),
                owner: this,
                this: other
            }
        );
        assert!(refused.to_string().contains("SOUK_STREAM of its own"));
        // Streams from before: no owner, accepted.
        assert_eq!(
            owner(Some("Souk's committed events, in global order")),
            None
        );
        assert!(check_owner("souk", None, this).is_ok());
    }
}
