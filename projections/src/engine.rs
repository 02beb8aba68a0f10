//! Applying events to a projection's read models, the same way for the live
//! projector and for a rebuild.
//!
//! Each projection module (`listings`, `orders`, `wallets`, `timelines`) has
//! one `apply(conn, schema, events)`: it parses the events into the domain's
//! event enums, loads the rows they touch, applies them one by one in memory
//! and writes the rows back in bulk. An event that cannot be applied in
//! memory (a payload that does not parse, an unknown event, a row that should
//! exist and does not) is refused on its own, leaves the rows as they were,
//! and is reported back to be parked. The schema is a parameter, so a rebuild
//! writes the same rows into a schema of its own.
//!
//! [`apply_isolated`] adds isolation from what only the database can refuse
//! (a value out of a column's range, a text Postgres cannot store): the batch
//! runs under a savepoint, and if Postgres refuses its writes as bad data the
//! batch is applied again one event per savepoint, so that exactly the events
//! the database refuses are parked and every other event is applied. Any
//! other database error (connection lost, deadlock) is not the event's fault:
//! it is returned and the whole batch is retried later, never parked.

use std::fmt;

use domain::DomainEvent;
use event_store::fanout;
use event_store::global::RecordedEvent;
use serde::de::DeserializeOwned;
use sqlx::PgConnection;

use crate::{listings, orders, timelines, wallets};

/// The projections Souk runs, by name.
pub const PROJECTIONS: &[&str] = &["listings", "orders", "wallets", "timelines"];

/// One projection: which events it reads and which tables it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    Listings,
    Orders,
    Wallets,
    Timelines,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Listings, Kind::Orders, Kind::Wallets, Kind::Timelines];

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Listings => "listings",
            Kind::Orders => "orders",
            Kind::Wallets => "wallets",
            Kind::Timelines => "timelines",
        }
    }

    /// The aggregate types whose events change this projection.
    pub fn aggregate_types(self) -> &'static [&'static str] {
        match self {
            Kind::Listings => &["Listing", "Reservation"],
            Kind::Orders => &["Order"],
            Kind::Wallets => &["Wallet"],
            Kind::Timelines => &["ProductTimeline"],
        }
    }

    /// Whether events of `aggregate_type` change this projection. The others
    /// only move its checkpoint.
    pub fn handles(self, aggregate_type: &str) -> bool {
        self.aggregate_types().contains(&aggregate_type)
    }

    /// The subjects the consumer of `partition` reads: only its aggregate
    /// type's when the projection reads one type, so that it is not handed
    /// every other event of the partition; the whole partition otherwise (a
    /// consumer has a single filter on nats-server 2.9).
    pub fn subject_filter(self, stream: &str, partition: u32) -> String {
        match self.aggregate_types() {
            [only] => fanout::event_subject(stream, only, partition),
            _ => fanout::partition_filter(stream, partition),
        }
    }

    /// Which of a rebuild's two write connections applies this projection:
    /// the lanes are balanced by the rows a marketplace's log writes
    /// (orders and timelines on one, wallets and listings on the other).
    pub fn rebuild_lane(self) -> usize {
        match self {
            Kind::Orders | Kind::Timelines => 0,
            Kind::Wallets | Kind::Listings => 1,
        }
    }

    /// The read-model tables this projection owns (and a rebuild replaces).
    pub fn tables(self) -> &'static [&'static str] {
        match self {
            Kind::Listings => &["rm_listings", "rm_reservations"],
            Kind::Orders => &["rm_orders", "rm_seller_stats"],
            Kind::Wallets => &["rm_wallets", "rm_wallet_entries", "rm_escrows"],
            Kind::Timelines => &["rm_products", "rm_timeline"],
        }
    }

    /// Applies `events` (all of aggregate types this projection handles, in
    /// global order) to the tables of `schema`. Returns the events refused,
    /// by index, with why.
    async fn apply(
        self,
        conn: &mut PgConnection,
        schema: &str,
        events: &[&RecordedEvent],
    ) -> Result<Vec<Refused>, sqlx::Error> {
        match self {
            Kind::Listings => listings::apply(conn, schema, events).await,
            Kind::Orders => orders::apply(conn, schema, events).await,
            Kind::Wallets => wallets::apply(conn, schema, events).await,
            Kind::Timelines => timelines::apply(conn, schema, events).await,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why one event could not be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApplyError(pub String);

impl ApplyError {
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

impl fmt::Display for ApplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An event of a batch that was refused: its index in the batch and why.
pub(crate) type Refused = (usize, ApplyError);

/// Parses a stored event into its aggregate's event enum, checking that the
/// envelope's type and version are the payload's.
pub(crate) fn parse_event<E: DeserializeOwned + DomainEvent>(
    event: &RecordedEvent,
) -> Result<E, ApplyError> {
    E::decode(
        &event.event_type,
        &event.event_version,
        event.payload.text(),
    )
    .map_err(|error| {
        ApplyError::new(format!(
            "the payload of {} {} version {} is not a {} event: {error}",
            event.aggregate_type, event.event_type, event.event_version, event.aggregate_type
        ))
    })
}

/// The aggregate id of `event` as a UUID (every Souk aggregate id is one).
pub(crate) fn aggregate_uuid(event: &RecordedEvent) -> Result<uuid::Uuid, ApplyError> {
    uuid::Uuid::parse_str(&event.aggregate_id).map_err(|_| {
        ApplyError::new(format!(
            "aggregate id `{}` is not a UUID",
            event.aggregate_id.chars().take(64).collect::<String>()
        ))
    })
}

/// Whether Postgres refused a write because of the data itself (SQLSTATE
/// classes 22, data exception, and 23, integrity constraint violation):
/// applying the same event again would fail again, so it is poison.
pub(crate) fn is_data_error(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("22") || code.starts_with("23")),
        _ => false,
    }
}

async fn execute(conn: &mut PgConnection, sql: &str) -> Result<(), sqlx::Error> {
    sqlx::query(sql).execute(conn).await.map(|_| ())
}

/// Applies `events` to `kind`'s tables in `schema`, inside the caller's
/// transaction, without a savepoint: the cheap path for a batch expected to
/// pass. Returns every event refused before writing, by index, sorted. When
/// Postgres refuses the batch ([`is_data_error`]), the caller's transaction
/// is aborted: roll it back and apply the batch again with
/// [`apply_isolated`]. `events` should not be empty (that costs a query).
pub(crate) async fn apply_unguarded(
    conn: &mut PgConnection,
    kind: Kind,
    schema: &str,
    events: &[&RecordedEvent],
) -> Result<Vec<Refused>, sqlx::Error> {
    let mut refused = kind.apply(conn, schema, events).await?;
    refused.sort_by_key(|(index, _)| *index);
    Ok(refused)
}

/// Applies `events` to `kind`'s tables in `schema`, inside the caller's
/// transaction, isolating the events Postgres refuses (see the module doc).
/// Returns every refused event by index, sorted.
pub(crate) async fn apply_isolated(
    conn: &mut PgConnection,
    kind: Kind,
    schema: &str,
    events: &[&RecordedEvent],
) -> Result<Vec<Refused>, sqlx::Error> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    execute(conn, "SAVEPOINT souk_batch").await?;
    match apply_unguarded(conn, kind, schema, events).await {
        Ok(refused) => {
            execute(conn, "RELEASE SAVEPOINT souk_batch").await?;
            Ok(refused)
        }
        Err(error) if is_data_error(&error) => {
            execute(conn, "ROLLBACK TO SAVEPOINT souk_batch").await?;
            tracing::warn!(
                projection = kind.name(),
                events = events.len(),
                %error,
                "Postgres refused a batch; applying its events one by one"
            );
            let mut refused = Vec::new();
            for (index, event) in events.iter().enumerate() {
                execute(conn, "SAVEPOINT souk_event").await?;
                match kind.apply(conn, schema, &[event]).await {
                    Ok(one) => {
                        execute(conn, "RELEASE SAVEPOINT souk_event").await?;
                        refused.extend(one.into_iter().map(|(_, why)| (index, why)));
                    }
                    Err(error) if is_data_error(&error) => {
                        execute(conn, "ROLLBACK TO SAVEPOINT souk_event").await?;
                        execute(conn, "RELEASE SAVEPOINT souk_event").await?;
                        refused.push((
                            index,
                            ApplyError::new(format!(
                                "Postgres refused the event's writes: {error}"
                            )),
                        ));
                    }
                    Err(error) => return Err(error),
                }
            }
            execute(conn, "RELEASE SAVEPOINT souk_batch").await?;
            Ok(refused)
        }
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projection_names_round_trip() {
        for name in PROJECTIONS {
            assert_eq!(Kind::parse(name).map(Kind::name), Some(*name));
        }
        assert_eq!(Kind::parse("search"), None);
        assert_eq!(Kind::ALL.len(), PROJECTIONS.len());
    }

    #[test]
    fn a_projection_of_one_aggregate_type_reads_only_that_types_subject() {
        // The relay's subjects are `<stream>.events.<Type>.<partition>`.
        assert_eq!(
            Kind::Wallets.subject_filter("souk", 3),
            fanout::event_subject("souk", "Wallet", 3)
        );
        assert_eq!(Kind::Orders.subject_filter("s", 0), "s.events.Order.0");
        assert_eq!(
            Kind::Timelines.subject_filter("s", 1),
            "s.events.ProductTimeline.1"
        );
        assert_eq!(Kind::Listings.subject_filter("s", 2), "s.events.*.2");
        assert!(Kind::Listings.handles("Reservation") && !Kind::Listings.handles("Order"));
    }
}
