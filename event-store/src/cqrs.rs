//! Runs Souk's aggregates on plain cqrs-es 0.5 (the benchmark compares Souk
//! with it). `domain` stays free of cqrs-es, which pulls in tokio, so the
//! adapter lives here; Rust's orphan rule wants it as wrapper types.
//! Both wrappers serialize exactly as what they wrap, so cqrs-es stores the
//! same payloads and state as Souk.

use cqrs_es::event_sink::EventSink;
use domain::Decide;
use serde::{Deserialize, Serialize};

/// An aggregate of `domain`, as a cqrs-es aggregate.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CqrsAggregate<A>(pub A);

/// An event of `domain`, as a cqrs-es event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CqrsEvent<E>(pub E);

impl<E: domain::DomainEvent> cqrs_es::DomainEvent for CqrsEvent<E> {
    fn event_type(&self) -> String {
        self.0.event_type()
    }

    fn event_version(&self) -> String {
        self.0.event_version()
    }
}

impl<A: Decide> cqrs_es::Aggregate for CqrsAggregate<A> {
    const TYPE: &'static str = A::TYPE;
    type Command = A::Command;
    type Event = CqrsEvent<A::Event>;
    type Error = A::Error;
    type Services = ();

    /// cqrs-es's `handle` is `decide`, then applying what it decided.
    async fn handle(
        &mut self,
        command: A::Command,
        _services: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), A::Error> {
        for event in self.0.decide(command)? {
            sink.write(CqrsEvent(event), self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: CqrsEvent<A::Event>) {
        self.0.apply(event.0);
    }
}
