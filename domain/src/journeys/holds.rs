//! Stock holds outside an order: a buyer's hold is released by its holder,
//! the listing's seller or an admin, and gives its units back at once. A
//! hold an order has taken is the order's: cancelling the order frees it.

use super::{JourneyError, Stage, key};
use crate::reservation::{Reservation, ReservationCommand};
use crate::values::{Actor, HoldId, ListingId, Reason};

/// Releases hold `hold_id` of `listing_id`. A second release is refused
/// `hold_not_active` (the hold is gone), as is a release of an expired hold.
pub fn release_hold<S: Stage>(
    stage: &mut S,
    listing_id: ListingId,
    hold_id: HoldId,
    actor: Actor,
    reason: Reason,
) -> Result<(), JourneyError> {
    let pool = key(listing_id);
    if let Some(hold) = stage.state::<Reservation>(&pool)?.hold(hold_id)
        && hold.order_id.is_some()
    {
        return Err(JourneyError::ReservationInOrder(hold_id));
    }
    stage.decide::<Reservation>(
        &pool,
        ReservationCommand::Release {
            actor,
            hold_id,
            reason,
        },
    )
}
