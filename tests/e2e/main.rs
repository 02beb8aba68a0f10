//! Souk's end-to-end tests: one binary, one module per area, each test with
//! its own database (and its own JetStream stream where NATS is involved),
//! against the real Postgres on this machine.

mod auth;
mod bad_input;
mod event_store;
mod journeys;
mod orders;
mod projections;
mod query_api;
mod relay;
mod reliability;
mod replay_tool;
mod scale;
mod search;
mod smoke;
mod web;
