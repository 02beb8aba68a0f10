//! Runs the journeys of `domain::journeys` as units of work: a [`Plan`] is
//! their [`Stage`], a declared [`Stream`] is a [`StreamRef`], a journey
//! [`domain::journeys::Timer`] is a row of the `timers` table, and a
//! [`JourneyError`] is the [`ExecError`] the APIs answer.

use chrono::{DateTime, Utc};
use domain::journeys::{JourneyError, Stage, Stream};
use domain::listing::Listing;
use domain::order::Order;
use domain::reservation::Reservation;
use domain::timeline::ProductTimeline;
use domain::wallet::Wallet;
use domain::{Decide, DomainError};

use crate::store::{ExecError, Plan, Savepoint, StreamRef, Timer};

impl From<JourneyError> for ExecError {
    fn from(error: JourneyError) -> Self {
        match error {
            JourneyError::Internal(message) => ExecError::Internal(message),
            error => ExecError::Rejected {
                code: error.code(),
                refusal: error.refusal(),
                message: error.to_string(),
            },
        }
    }
}

/// A store error met while a journey runs (a refusal keeps its code).
fn journey_error(error: ExecError) -> JourneyError {
    match error {
        ExecError::Rejected {
            code,
            refusal,
            message,
        } => JourneyError::Refused {
            code,
            refusal,
            message,
        },
        other => JourneyError::Internal(other.to_string()),
    }
}

impl From<Stream> for StreamRef {
    fn from(stream: Stream) -> Self {
        match stream {
            Stream::Order(id) => StreamRef::of::<Order>(id.to_string()),
            Stream::Wallet(id) => StreamRef::of::<Wallet>(id.to_string()),
            Stream::Listing(id) => StreamRef::of::<Listing>(id.to_string()),
            Stream::Reservation(id) => StreamRef::of::<Reservation>(id.to_string()),
            Stream::Timeline(id) => StreamRef::of::<ProductTimeline>(id.to_string()),
        }
    }
}

/// The stream references of a journey's declared streams.
pub fn stream_refs(streams: impl IntoIterator<Item = Stream>) -> Vec<StreamRef> {
    streams.into_iter().map(StreamRef::from).collect()
}

/// The stream references of a journey's declared streams, those in
/// `created` declared new (see [`StreamRef::new_stream`]).
pub fn stream_refs_creating(
    streams: impl IntoIterator<Item = Stream>,
    created: impl IntoIterator<Item = Stream>,
) -> Vec<StreamRef> {
    let created: std::collections::BTreeSet<Stream> = created.into_iter().collect();
    streams
        .into_iter()
        .map(|stream| {
            let reference = StreamRef::from(stream);
            if created.contains(&stream) {
                reference.new_stream()
            } else {
                reference
            }
        })
        .collect()
}

impl Timer {
    /// The row of journey timer `timer`, due at `due_at`.
    pub fn of(timer: domain::journeys::Timer, due_at: DateTime<Utc>) -> Self {
        Self {
            timer_id: timer.id(),
            kind: timer.kind().to_owned(),
            due_at,
            payload: timer.payload(),
        }
    }
}

impl Stage for Plan<'_> {
    type Savepoint = Savepoint;

    fn state<A: Decide>(&self, id: &str) -> Result<&A, JourneyError> {
        Plan::state::<A>(self, id).map_err(journey_error)
    }

    fn decide<A: Decide>(&mut self, id: &str, command: A::Command) -> Result<(), JourneyError> {
        Plan::decide::<A>(self, id, command)
            .map(|_| ())
            .map_err(journey_error)
    }

    fn savepoint(&mut self) -> Savepoint {
        Plan::savepoint(self)
    }

    fn rollback_to(&mut self, savepoint: Savepoint) {
        Plan::rollback_to(self, savepoint)
    }

    fn schedule(&mut self, timer: domain::journeys::Timer, due_at: DateTime<Utc>) {
        Plan::schedule(self, Timer::of(timer, due_at))
    }
}
