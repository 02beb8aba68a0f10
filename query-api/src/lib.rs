//! Souk's query API: the read side over HTTP.
//!
//! Every route is a GET that reads the read models the projectors keep in
//! Postgres (`migrations/sql/0003_read_models.sql`), one module per resource
//! in `routes`. A request is authenticated with the command API's bearer
//! tokens (`http_kit::AuthUser`) and refused with the one error type of
//! Souk's HTTP services (`http_kit::ApiError`). Query strings are read strictly
//! (`params`: no unknown or repeated parameter, every value bounded, opaque
//! cursors). `?after=<position token>` makes a request wait, bounded, until
//! the projections it reads have caught up with that write (`catch_up`: one
//! checkpoint reader shared by every waiting request). `notifications` feeds
//! the server-sent events of `/notifications/stream` from JetStream (and
//! replays a resumed stream from the event store); `tickets` are the
//! single-use tickets a browser opens it with. `app`
//! assembles the router (limits, request ids, metrics, graceful shutdown);
//! `openapi` describes the routes.
//!
//! The binary (`main.rs`) only parses the configuration and calls
//! [`app::build`].

pub mod app;
pub mod catch_up;
pub mod config;
pub mod notifications;
pub mod openapi;
pub mod params;
mod routes;
pub mod tickets;

pub use app::{App, build};
pub use catch_up::Projection;
pub use config::Config;
