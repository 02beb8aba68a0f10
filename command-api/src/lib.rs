//! Souk's command API: the write side over HTTP.
//!
//! A request is authenticated (`http_kit::AuthUser`: RS256 bearer tokens),
//! its body parsed strictly into domain values (`http_kit::JsonBody`,
//! `routes`), and the resulting domain command executed by the event store,
//! which answers with the aggregate's id, version and a position token. Every
//! refusal is an `http_kit::ApiError` with a stable code. `app` assembles the
//! router (`http_kit::finish_router`: limits, request ids, metrics, load
//! shedding) and runs it with the relay until SIGTERM or Ctrl-C; `timers`
//! fires the process managers' durable timers; `openapi` describes the
//! routes.
//!
//! The binary (`main.rs`) only parses the configuration and calls
//! [`app::build`].

pub mod app;
pub mod config;
pub mod openapi;
mod routes;
pub mod timers;

pub use app::{App, build};
pub use config::Config;
