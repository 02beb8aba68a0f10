//! Souk's domain: the five aggregates (Listing, Reservation, Order, Wallet,
//! ProductTimeline), their commands and events, the value objects they are
//! made of, and the pure decision logic of the process managers.
//!
//! This crate does no IO. Every aggregate implements [`Decide`]: a pure
//! `decide(&self, command) -> events` plus cqrs-es's `apply`. The cqrs-es
//! `Aggregate::handle` of each aggregate is a thin adapter over `decide`, so
//! the aggregates work with any cqrs-es store, while Souk's own event store
//! calls `decide` directly. Time enters only through commands (`now` fields),
//! never through a clock read here.
//!
//! Layout: `values` holds ids, money, bounded text and actors; one module per
//! aggregate holds its state, command enum, event enum, error enum and its
//! given/when/then tests; `process` holds the pure decisions of the process
//! managers (splitting a checkout per seller, hold expiry, deterministic
//! command ids).

pub mod listing;
pub mod order;
pub mod process;
pub mod reservation;
pub mod timeline;
pub mod values;
pub mod wallet;

#[cfg(test)]
mod test_support;

pub use cqrs_es::{Aggregate, DomainEvent};

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
