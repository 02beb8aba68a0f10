//! Firing a [`Timer`]: the same journeys a user's command runs, with Souk
//! as the actor and the clock's `now`.

use chrono::{DateTime, Utc};

use super::{JourneyError, OrderStep, Stage, Stream, Timer, key};
use crate::order::OrderStatus;
use crate::reservation::{Reservation, ReservationCommand};
use crate::values::{Actor, Reason};

/// What firing a timer did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fired {
    /// Its step ran.
    Done,
    /// There was nothing left to do (the hold was sold, the order moved on).
    NothingToDo(&'static str),
}

impl Timer {
    /// The streams firing the timer touches, given its order's streams for
    /// a step (`order_streams` over the order the caller read).
    pub fn streams(&self, order_streams: impl FnOnce(OrderStep) -> Vec<Stream>) -> Vec<Stream> {
        match self {
            Self::HoldExpiry { listing_id, .. } => vec![Stream::Reservation(*listing_id)],
            Self::UnpaidOrder { .. } | Self::ShipBy { .. } => order_streams(OrderStep::Cancel),
            Self::EscrowRelease { .. } => order_streams(OrderStep::ReleaseEscrow),
            Self::ReturnWindowEnd { .. } => order_streams(OrderStep::Complete),
        }
    }

    /// The order the timer is about, if any.
    pub fn order_id(&self) -> Option<crate::values::OrderId> {
        match self {
            Self::HoldExpiry { .. } => None,
            Self::UnpaidOrder { order_id }
            | Self::EscrowRelease { order_id }
            | Self::ReturnWindowEnd { order_id }
            | Self::ShipBy { order_id } => Some(*order_id),
        }
    }
}

fn reason(text: &str) -> Reason {
    Reason::parse("reason", text).unwrap_or_default()
}

/// Fires `timer` at `now`. A refusal that means "not yet"
/// ([`JourneyError::is_too_early`]) comes back as an error, so that the
/// caller keeps the timer for later; a refusal that means "nothing left to
/// do" is [`Fired::NothingToDo`] with nothing staged.
pub fn fire<S: Stage>(
    stage: &mut S,
    timer: Timer,
    now: DateTime<Utc>,
) -> Result<Fired, JourneyError> {
    let system = Actor::system();
    let savepoint = stage.savepoint();
    let result = match timer {
        Timer::HoldExpiry {
            listing_id,
            hold_id,
        } => {
            let in_order = stage
                .state::<Reservation>(&key(listing_id))?
                .hold(hold_id)
                .map(|hold| hold.order_id.is_some());
            match in_order {
                // Released, sold or expired already.
                None => return Ok(Fired::NothingToDo("hold_not_active")),
                // Taken into an order: the order's own clocks govern it.
                Some(true) => return Ok(Fired::NothingToDo("reservation_in_order")),
                Some(false) => stage.decide::<Reservation>(
                    &key(listing_id),
                    ReservationCommand::Expire {
                        actor: system,
                        hold_id,
                        now,
                    },
                ),
            }
        }
        Timer::UnpaidOrder { order_id } => super::cancel(
            stage,
            order_id,
            system,
            reason("the bank transfer did not arrive in time"),
            Some(OrderStatus::AwaitingPayment),
        ),
        Timer::ShipBy { order_id } => super::cancel(
            stage,
            order_id,
            system,
            reason("the seller did not ship in time"),
            Some(OrderStatus::Confirmed),
        ),
        Timer::EscrowRelease { order_id } => super::release_escrow(stage, order_id, system, now),
        Timer::ReturnWindowEnd { order_id } => super::complete(stage, order_id, system, now),
    };
    match result {
        Ok(()) => Ok(Fired::Done),
        Err(error) if error.is_too_early() => Err(error),
        Err(JourneyError::Internal(message)) => Err(JourneyError::Internal(message)),
        Err(error) => {
            stage.rollback_to(savepoint);
            Ok(Fired::NothingToDo(crate::DomainError::code(&error)))
        }
    }
}
