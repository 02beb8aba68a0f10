//! Souk's command API: the write side over HTTP.
//!
//! A request is authenticated (`auth`: RS256 bearer tokens), its body parsed
//! strictly into domain values (`extract`, `routes`), and the resulting
//! domain command executed by the event store, which answers with the
//! aggregate's id, version and a position token. Every refusal is an
//! [`error::ApiError`] with a stable code. `app` assembles the router
//! (limits, request ids, metrics, graceful shutdown); `timers` fires the
//! process managers' durable timers; `openapi` describes the routes.
//!
//! The binary (`main.rs`) only parses the configuration and calls
//! [`app::build`]. The query API reuses `auth`, `error` and `telemetry`.

pub mod app;
pub mod auth;
pub mod config;
pub mod error;
pub mod extract;
pub mod openapi;
mod routes;
mod strict_json;
pub mod telemetry;
pub mod timers;

pub use app::{App, build};
pub use config::Config;
