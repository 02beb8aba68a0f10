//! The HTTP plumbing Souk's services share, so that each piece exists once:
//!
//! - `error`: [`ApiError`], the one error type, with its status per variant
//!   and the `{"error": {"code", "message"}}` body.
//! - `auth`: the [`AuthUser`] extractor over `identity`'s token verifier.
//! - `extract`: strict JSON bodies ([`JsonBody`], over `strict_json`), UUID
//!   path segments ([`IdPath`], [`IdPair`]) and [`RequestMeta`]
//!   (idempotency key, correlation and request ids, and the command context
//!   they give the event store).
//! - `router`: [`finish_router`] (fallbacks, caching, metrics, load
//!   shedding, rate limits, compression, CORS, request ids, catch-panic)
//!   and the `/health` handler.
//! - `layers`: CORS, `ETag`/`Cache-Control` and the per-user rate limit
//!   that `finish_router` wires.
//! - `telemetry`: tracing, the Prometheus recorder, `/metrics`, and the
//!   metrics server of a process without an API (the projector).
//! - `shutdown`: [`shutdown_signal`] (SIGTERM or Ctrl-C).
//! - `openapi`: what both OpenAPI documents share (utoipa): the error body,
//!   money, the accepted-command answer, the bearer scheme, request ids and
//!   standard refusals on every operation, closed response objects, and
//!   [`openapi::Routes`] with [`openapi::undocumented`], the check that a
//!   router serves exactly what its document describes.
//! - `config`: [`ServerConfig`], the flags every service takes (database,
//!   token keys, limits, log format), and [`bind`].
//!
//! Business rules never live here: this crate knows requests, not orders.

pub mod auth;
pub mod config;
pub mod error;
pub mod extract;
pub mod layers;
pub mod openapi;
pub mod router;
pub mod shutdown;
mod strict_json;
pub mod telemetry;

pub use auth::AuthUser;
pub use config::{ServerConfig, bind};
pub use error::ApiError;
pub use extract::{IdPair, IdPath, JsonBody, RequestMeta};
pub use router::finish_router;
pub use shutdown::shutdown_signal;
