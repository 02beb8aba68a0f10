//! An in-memory [`Stage`] for the journeys' given / when / then tests: given
//! the aggregates' histories (built by deciding commands), when a journey
//! runs over the streams it declares, then these events and timers (or this
//! refusal). A journey that touches a stream it did not declare fails, as it
//! would in the event store.

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};

use super::{JourneyError, Stage, Stream, Timer};
use crate::listing::Listing;
use crate::order::Order;
use crate::reservation::Reservation;
use crate::timeline::ProductTimeline;
use crate::wallet::Wallet;
use crate::{Aggregate, Decide, DomainEvent};

type Key = (&'static str, String);

struct Slot {
    state: Box<dyn Any>,
    clone: fn(&dyn Any) -> Box<dyn Any>,
}

impl Clone for Slot {
    fn clone(&self) -> Self {
        Self {
            state: (self.clone)(self.state.as_ref()),
            clone: self.clone,
        }
    }
}

fn clone_state<A: Decide>(state: &dyn Any) -> Box<dyn Any> {
    Box::new(
        state
            .downcast_ref::<A>()
            .cloned()
            .expect("a slot holds its own type"),
    )
}

/// Aggregates in memory, and what the journey under test staged.
#[derive(Default)]
pub(crate) struct Memory {
    states: BTreeMap<Key, Slot>,
    /// `None` while the history is being given: every stream is allowed.
    declared: Option<BTreeSet<Key>>,
    /// `(aggregate type, id, event type)` of what was staged, in order.
    events: Vec<(&'static str, String, String)>,
    timers: Vec<(Timer, DateTime<Utc>)>,
}

pub(crate) struct MemorySavepoint {
    states: BTreeMap<Key, Slot>,
    events: usize,
    timers: usize,
}

fn stream_key(stream: Stream) -> Key {
    match stream {
        Stream::Order(id) => (Order::TYPE, id.to_string()),
        Stream::Wallet(id) => (Wallet::TYPE, id.to_string()),
        Stream::Listing(id) => (Listing::TYPE, id.to_string()),
        Stream::Reservation(id) => (Reservation::TYPE, id.to_string()),
        Stream::Timeline(id) => (ProductTimeline::TYPE, id.to_string()),
    }
}

impl Memory {
    /// Decides `command` as part of the history (panics on a refusal).
    #[track_caller]
    pub(crate) fn given<A: Decide>(&mut self, id: impl ToString, command: A::Command) {
        self.decide::<A>(&id.to_string(), command)
            .unwrap_or_else(|error| panic!("the history is refused: {error}"));
    }

    /// Applies a recorded `event` as part of the history, as a log written
    /// by older code holds it (no command decides it any more).
    pub(crate) fn given_event<A: Decide>(&mut self, id: impl ToString, event: A::Event) {
        let slot = self
            .states
            .entry((A::TYPE, id.to_string()))
            .or_insert_with(|| Slot {
                state: Box::new(A::default()),
                clone: clone_state::<A>,
            });
        slot.state
            .downcast_mut::<A>()
            .expect("a slot holds its own type")
            .apply(event);
    }

    /// Runs `journey` over the declared `streams`, recording what it stages
    /// from scratch. On a refusal the staged events are dropped, as the
    /// store would.
    pub(crate) fn when<R>(
        &mut self,
        streams: Vec<Stream>,
        journey: impl FnOnce(&mut Self) -> Result<R, JourneyError>,
    ) -> Result<R, JourneyError> {
        self.declared = Some(streams.into_iter().map(stream_key).collect());
        self.events.clear();
        self.timers.clear();
        let before = self.savepoint();
        let result = journey(self);
        if result.is_err() {
            self.rollback_to(before);
        }
        self.declared = None;
        result
    }

    /// The event types staged on `A` `id`.
    pub(crate) fn events<A: Decide>(&self, id: impl ToString) -> Vec<&str> {
        let id = id.to_string();
        self.events
            .iter()
            .filter(|(kind, of, _)| *kind == A::TYPE && *of == id)
            .map(|(_, _, event)| event.as_str())
            .collect()
    }

    /// Every event staged, as `Type:EventType`.
    pub(crate) fn all_events(&self) -> Vec<String> {
        self.events
            .iter()
            .map(|(kind, _, event)| format!("{kind}:{event}"))
            .collect()
    }

    pub(crate) fn timers(&self) -> &[(Timer, DateTime<Utc>)] {
        &self.timers
    }

    pub(crate) fn get<A: Decide>(&self, id: impl ToString) -> A {
        self.states
            .get(&(A::TYPE, id.to_string()))
            .and_then(|slot| slot.state.downcast_ref::<A>())
            .cloned()
            .unwrap_or_default()
    }

    fn check<A: Decide>(&self, id: &str) -> Result<(), JourneyError> {
        match &self.declared {
            Some(declared) if !declared.contains(&(A::TYPE, id.to_owned())) => Err(
                JourneyError::Internal(format!("{} {id} was not declared", A::TYPE)),
            ),
            _ => Ok(()),
        }
    }
}

impl Stage for Memory {
    type Savepoint = MemorySavepoint;

    fn state<A: Decide>(&self, id: &str) -> Result<&A, JourneyError> {
        self.check::<A>(id)?;
        static_default::<A>(self.states.get(&(A::TYPE, id.to_owned())))
    }

    fn decide<A: Decide>(&mut self, id: &str, command: A::Command) -> Result<(), JourneyError> {
        self.check::<A>(id)?;
        let slot = self
            .states
            .entry((A::TYPE, id.to_owned()))
            .or_insert_with(|| Slot {
                state: Box::new(A::default()),
                clone: clone_state::<A>,
            });
        let state = slot
            .state
            .downcast_mut::<A>()
            .ok_or_else(|| JourneyError::Internal("type mismatch".into()))?;
        let events = state
            .decide(command)
            .map_err(|error| JourneyError::refused(&error))?;
        for event in events {
            self.events
                .push((A::TYPE, id.to_owned(), event.event_type()));
            state.apply(event);
        }
        Ok(())
    }

    fn savepoint(&mut self) -> MemorySavepoint {
        MemorySavepoint {
            states: self.states.clone(),
            events: self.events.len(),
            timers: self.timers.len(),
        }
    }

    fn rollback_to(&mut self, savepoint: MemorySavepoint) {
        self.states = savepoint.states;
        self.events.truncate(savepoint.events);
        self.timers.truncate(savepoint.timers);
    }

    fn schedule(&mut self, timer: Timer, due_at: DateTime<Utc>) {
        self.timers.push((timer, due_at));
    }
}

/// The state in `slot`, or a fresh aggregate for a stream never written.
fn static_default<A: Decide>(slot: Option<&Slot>) -> Result<&A, JourneyError> {
    match slot {
        Some(slot) => slot
            .state
            .downcast_ref::<A>()
            .ok_or_else(|| JourneyError::Internal("type mismatch".into())),
        None => Ok(fresh::<A>()),
    }
}

/// A leaked default state per aggregate type (tests only): a `&A` for a
/// stream that does not exist yet, without `&mut self`.
fn fresh<A: Decide>() -> &'static A {
    Box::leak(Box::new(A::default()))
}
