//! Souk's domain: the five aggregates (Listing, Reservation, Order, Wallet,
//! ProductTimeline), their commands and events, the value objects they are
//! made of, and the pure decision logic of the process managers.
//!
//! This crate does no IO and depends on no runtime: not even cqrs-es, whose
//! 0.5 release pulls in tokio. Every aggregate implements [`Aggregate`]
//! (state, event type, `apply`) and [`Decide`] (a pure
//! `decide(&self, command) -> events`). The traits mirror cqrs-es's; the
//! adapter that runs these aggregates on plain cqrs-es lives in
//! `event_store::cqrs`. Time enters only through commands (`now` fields),
//! never through a clock read here.
//!
//! Layout: `values` holds ids, money, bounded text and actors; one module per
//! aggregate holds its state, command enum, event enum, error enum and its
//! given/when/then tests; `process` holds the pure decisions of the process
//! managers (splitting a checkout per seller, hold expiry, deterministic
//! command ids); `journeys` is the application layer: each business step
//! over several aggregates (checkout, shipping, delivery, cancellation,
//! timers, ...) as a pure plan that the event store runs as one unit of
//! work.

pub mod audit;
pub mod journeys;
pub mod listing;
pub mod order;
pub mod process;
pub mod reservation;
pub mod timeline;
pub mod values;
pub mod wallet;

#[cfg(test)]
mod test_support;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// An event of an aggregate, stored as JSON under a stable name and version.
pub trait DomainEvent:
    Serialize + DeserializeOwned + Clone + PartialEq + std::fmt::Debug + Send + Sync
{
    /// The stable name of the event (its variant name); never changes.
    fn event_type(&self) -> String;
    /// The version of the event's payload shape.
    fn event_version(&self) -> String;

    /// Reads a stored event from its envelope (`event_type`,
    /// `event_version`) and its JSON payload: the one entry point of each
    /// aggregate's events. It dispatches on `event_version`, so an upcaster
    /// (an older shape read as the current one) has one obvious place;
    /// every other version goes through [`decode_current`].
    fn decode(event_type: &str, event_version: &str, payload: &str) -> Result<Self, DecodeError>;
}

/// Why a stored event could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

/// Reads `payload` in the event's current shape and checks that it is the
/// event and the version the envelope names.
pub fn decode_current<E: DomainEvent>(
    event_type: &str,
    event_version: &str,
    payload: &str,
) -> Result<E, DecodeError> {
    let event: E = serde_json::from_str(payload).map_err(|error| {
        DecodeError(format!("the payload is not a {event_type} event: {error}"))
    })?;
    if event.event_type() != event_type {
        return Err(DecodeError(format!(
            "the envelope says {event_type} but the payload is {}",
            event.event_type()
        )));
    }
    if event.event_version() != event_version {
        return Err(DecodeError(format!(
            "{event_type} version {event_version} is not supported (this code reads version {})",
            event.event_version()
        )));
    }
    Ok(event)
}

/// The state of one aggregate, rebuilt by applying its events in order.
pub trait Aggregate: Default + Serialize + DeserializeOwned + Send + Sync {
    /// The aggregate type name stored with every event; never changes.
    const TYPE: &'static str;
    type Command;
    type Event: DomainEvent;
    type Error: std::error::Error;

    /// Applies one recorded event. Total: never fails, never panics.
    fn apply(&mut self, event: Self::Event);
}

/// How a refused command should be understood by a caller, whatever the
/// aggregate. The command API maps these to HTTP statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The command's content is invalid on its own (422).
    Invalid,
    /// The actor may not do this to this aggregate (403).
    Forbidden,
    /// The aggregate does not exist (404).
    NotFound,
    /// The aggregate's current state does not allow it: illegal transition,
    /// insufficient funds or stock, already done (409).
    Conflict,
}

/// An aggregate error with a stable, machine-readable code.
pub trait DomainError: std::error::Error + Send + Sync + 'static {
    /// Stable snake_case code, e.g. `insufficient_funds`.
    fn code(&self) -> &'static str;
    fn refusal(&self) -> Refusal;
}

/// A cqrs-es aggregate whose decisions are a pure function of its state.
///
/// The bounds on the associated types are written in the supertrait so that
/// they are implied wherever `A: Decide` is.
pub trait Decide:
    Aggregate<Error: DomainError, Command: Clone + Send + Sync + 'static> + Clone + 'static
{
    /// The events `command` produces from the current state, or why it is
    /// refused. Never mutates `self`: the caller applies the events.
    fn decide(&self, command: Self::Command) -> Result<Vec<Self::Event>, Self::Error>;

    /// Whether any event was ever applied (a fresh `Default` has none).
    fn exists(&self) -> bool;

    /// The shape of the serialized state. Bump it whenever the aggregate's
    /// fields change meaning, so that stored snapshots of the old shape are
    /// ignored and the state is rebuilt from the events.
    const STATE_VERSION: i32 = 1;
}
