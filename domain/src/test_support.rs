//! Given / when / then for aggregate tests: given past events, when a
//! command is decided, then exactly these events (or this refusal). Every
//! accepted outcome is also checked for the properties the event store and
//! the projectors rely on: events and state survive a JSON round trip, and
//! `event_type` is the serde tag of the variant.

use crate::{Aggregate, Decide, DomainError, DomainEvent};

pub(crate) struct Given<A: Aggregate> {
    state: A,
}

pub(crate) fn given<A>(events: impl IntoIterator<Item = A::Event>) -> Given<A>
where
    A: Decide,
    A::Error: DomainError,
{
    let mut state = A::default();
    for event in events {
        state.apply(event);
    }
    Given { state }
}

pub(crate) struct When<A: Aggregate> {
    state: A,
    result: Result<Vec<A::Event>, A::Error>,
}

impl<A> Given<A>
where
    A: Decide + std::fmt::Debug + PartialEq,
    A::Command: Clone,
    A::Error: DomainError,
{
    pub(crate) fn when(self, command: A::Command) -> When<A> {
        let result = self.state.decide(command);
        When {
            state: self.state,
            result,
        }
    }
}

impl<A> When<A>
where
    A: Decide + std::fmt::Debug + PartialEq,
    A::Error: DomainError,
{
    /// Asserts the decided events and returns the state after applying them.
    #[track_caller]
    pub(crate) fn then(self, expected: Vec<A::Event>) -> A {
        let events = match self.result {
            Ok(events) => events,
            Err(error) => panic!("expected events, got refusal `{}`: {error}", error.code()),
        };
        assert_eq!(events, expected);
        let mut state = self.state;
        for event in events {
            check_event(&event);
            state.apply(event);
        }
        let json = serde_json::to_string(&state).expect("state serialises");
        let back: A = serde_json::from_str(&json).expect("state deserialises");
        assert_eq!(back, state, "state survives a JSON round trip");
        state
    }

    /// Asserts a refusal with this code and returns it for further checks.
    #[track_caller]
    pub(crate) fn then_refused(self, code: &str) -> A::Error {
        match self.result {
            Ok(events) => panic!("expected refusal `{code}`, got events {events:?}"),
            Err(error) => {
                assert_eq!(error.code(), code, "refusal: {error}");
                assert!(!error.to_string().is_empty());
                error
            }
        }
    }
}

fn check_event<E: DomainEvent>(event: &E) {
    let json = serde_json::to_value(event).expect("event serialises");
    let tag = match &json {
        serde_json::Value::String(tag) => tag.clone(),
        serde_json::Value::Object(map) if map.len() == 1 => map.keys().next().cloned().unwrap(),
        other => panic!("events are externally tagged, got {other}"),
    };
    assert_eq!(event.event_type(), tag, "event_type is the variant name");
    let back = E::decode(
        &event.event_type(),
        &event.event_version(),
        &json.to_string(),
    )
    .expect("the event decodes from its envelope");
    assert_eq!(&back, event, "event survives a JSON round trip");
}
