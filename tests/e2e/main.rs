//! Souk's end-to-end tests: one binary, one module per area, each test with
//! its own database (and its own JetStream stream where NATS is involved),
//! against the real Postgres on this machine.

mod event_store;
mod reliability;
mod smoke;
