//! The layers a browser-facing API needs beyond routing: CORS for the
//! configured origins ([`cors`]), validators and cache directives on reads
//! ([`cache`]: `ETag`, `If-None-Match` answered 304, `Cache-Control`), and a
//! token-bucket rate limit per user or per client address ([`RateLimit`],
//! over `governor`). Compression is tower-http's, set in
//! [`crate::finish_router`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::{self, HeaderName, HeaderValue};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use identity::JwtVerifier;
use sha2::{Digest, Sha256};
use tower_http::cors::{AllowOrigin, CorsLayer};
use uuid::Uuid;

use crate::auth::{AuthUser, bearer_token_of};
use crate::error::ApiError;

/// The request headers a browser may send across origins.
pub const CORS_ALLOWED_HEADERS: [&str; 5] = [
    "authorization",
    "content-type",
    "idempotency-key",
    "x-request-id",
    "last-event-id",
];

/// The response headers a browser's script may read across origins.
pub const CORS_EXPOSED_HEADERS: [&str; 6] = [
    "x-request-id",
    "etag",
    "retry-after",
    "ratelimit-limit",
    "ratelimit-remaining",
    "ratelimit-reset",
];

/// How long a browser may cache a preflight's answer.
const CORS_MAX_AGE: Duration = Duration::from_secs(600);

/// Largest answer given an `ETag` (bigger ones are passed through as they
/// are: hashing them would mean holding them whole).
const ETAG_MAX_BYTES: usize = 4 * 1024 * 1024;

/// Rate-limit keys checked between two sweeps of idle buckets.
const SWEEP_EVERY_CHECKS: u64 = 10_000;

/// An exact origin (`scheme://host[:port]`), as `SOUK_CORS_ORIGINS` lists
/// them: a clap value parser.
pub fn parse_origin(text: &str) -> Result<String, String> {
    let text = text.trim();
    let rest = text
        .strip_prefix("https://")
        .or_else(|| text.strip_prefix("http://"))
        .ok_or_else(|| format!("{text:?} is not an http(s) origin"))?;
    let valid = !rest.is_empty()
        && rest
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
    if !valid {
        return Err(format!(
            "{text:?} is not an origin (scheme://host[:port], no path, no wildcard)"
        ));
    }
    Ok(text.to_owned())
}

/// CORS for exactly `origins` (none: no layer, so no CORS header is ever
/// sent). A preflight from a listed origin is answered with the methods and
/// headers Souk takes; any other origin gets no `Access-Control-Allow-*`.
pub fn cors(origins: &[String]) -> Option<CorsLayer> {
    let origins: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|origin| HeaderValue::from_str(origin).ok())
        .collect();
    if origins.is_empty() {
        return None;
    }
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([Method::GET, Method::POST, Method::HEAD])
            .allow_headers(CORS_ALLOWED_HEADERS.map(HeaderName::from_static))
            .expose_headers(CORS_EXPOSED_HEADERS.map(HeaderName::from_static))
            .max_age(CORS_MAX_AGE),
    )
}

/// `Cache-Control` on every answer that has none, and an `ETag` on every
/// successful JSON read (a weak one: the same JSON is sent gzipped or not).
/// A read whose `If-None-Match` names the current tag is answered 304 with
/// no body. Reads are per user and may change with the next event, so they
/// are `private, no-cache` (stored, revalidated each time); anything else is
/// `no-store`.
pub async fn cache(request: Request, next: Next) -> Response {
    let is_read = matches!(*request.method(), Method::GET | Method::HEAD);
    let if_none_match = request.headers().get(header::IF_NONE_MATCH).cloned();
    let response = next.run(request).await;
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"));
    let cacheable = is_read && response.status() == StatusCode::OK;
    let mut response = if cacheable && is_json {
        tag(response, if_none_match.as_ref()).await
    } else {
        response
    };
    if !response.headers().contains_key(header::CACHE_CONTROL) {
        let directive = if cacheable {
            "private, no-cache"
        } else {
            "no-store"
        };
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static(directive));
    }
    response
}

/// Gives a JSON answer its `ETag`, or turns it into a 304 when the client
/// holds it already.
async fn tag(response: Response, if_none_match: Option<&HeaderValue>) -> Response {
    let (mut parts, body) = response.into_parts();
    let bytes = match axum::body::to_bytes(body, ETAG_MAX_BYTES).await {
        Ok(bytes) => bytes,
        Err(error) => {
            return ApiError::Internal(anyhow::anyhow!("reading an answer to tag it: {error}"))
                .into_response();
        }
    };
    let digest = Sha256::digest(&bytes);
    let etag = format!("W/\"{}\"", hex_prefix(&digest[..16]));
    let matches = if_none_match
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| {
            value.split(',').map(str::trim).any(|candidate| {
                candidate == "*" || candidate.trim_start_matches("W/") == &etag[2..]
            })
        });
    let etag = HeaderValue::from_str(&etag).expect("hex is a valid header value");
    parts.headers.insert(header::ETAG, etag);
    if matches {
        parts.status = StatusCode::NOT_MODIFIED;
        parts.headers.remove(header::CONTENT_LENGTH);
        parts.headers.remove(header::CONTENT_TYPE);
        return Response::from_parts(parts, Body::empty());
    }
    Response::from_parts(parts, Body::from(bytes))
}

fn hex_prefix(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut text, byte| {
        let _ = write!(text, "{byte:02x}");
        text
    })
}

/// Whose bucket a request draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Client {
    User(Uuid),
    Address(IpAddr),
}

type Limiter =
    RateLimiter<Client, DefaultKeyedStateStore<Client>, DefaultClock, StateInformationMiddleware>;

/// A token bucket per signed-in user (per client address for requests
/// without a valid token): `per_second` requests per second on average,
/// `burst` at once. Over it: 429 `rate_limited` with `Retry-After`; every
/// answer carries `RateLimit-Limit`, `RateLimit-Remaining` and
/// `RateLimit-Reset`. Each client has a bucket of its own, so one client's
/// burst never slows another. `/health` and `/metrics` are not limited.
#[derive(Clone)]
pub struct RateLimit {
    limiter: Arc<Limiter>,
    verifier: Arc<JwtVerifier>,
    burst: u32,
    /// Time to earn back one request.
    replenish: Duration,
    checks: Arc<AtomicU64>,
}

impl std::fmt::Debug for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimit")
            .field("burst", &self.burst)
            .field("replenish", &self.replenish)
            .finish_non_exhaustive()
    }
}

impl RateLimit {
    /// A limiter of `per_second` requests per second with bursts of `burst`
    /// (at least 1), identifying users with `verifier`.
    pub fn new(per_second: NonZeroU32, burst: NonZeroU32, verifier: Arc<JwtVerifier>) -> Self {
        let quota = Quota::per_second(per_second).allow_burst(burst);
        Self {
            limiter: Arc::new(
                RateLimiter::keyed(quota).with_middleware::<StateInformationMiddleware>(),
            ),
            verifier,
            burst: burst.get(),
            replenish: quota.replenish_interval(),
            checks: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Whose request this is: the user of a valid bearer token (remembered
    /// on the request, so the handler does not verify it again), else the
    /// client's address.
    async fn client(&self, request: &mut Request) -> Client {
        if let Some(user) = request.extensions().get::<AuthUser>() {
            return Client::User(user.user_id.as_uuid());
        }
        if let Ok(Some(token)) = bearer_token_of(request.headers())
            && let Ok(principal) = self.verifier.verify_fresh(token).await
        {
            let user = AuthUser::from(principal);
            request.extensions_mut().insert(user);
            return Client::User(user.user_id.as_uuid());
        }
        let address = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |info| info.0.ip());
        Client::Address(address)
    }

    fn sweep_now_and_then(&self) {
        if self
            .checks
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(SWEEP_EVERY_CHECKS)
        {
            // Buckets back to full are indistinguishable from new ones.
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
        }
    }
}

/// The rate-limit middleware (see [`RateLimit`]).
pub async fn rate_limit(
    State(limit): State<RateLimit>,
    mut request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    if path == "/health" || path == "/metrics" {
        return next.run(request).await;
    }
    let client = limit.client(&mut request).await;
    limit.sweep_now_and_then();
    match limit.limiter.check_key(&client) {
        Ok(snapshot) => {
            let remaining = snapshot.remaining_burst_capacity();
            let mut response = next.run(request).await;
            // Seconds until the bucket is full again.
            let reset = limit.replenish * (limit.burst - remaining.min(limit.burst));
            set_headers(&mut response, limit.burst, remaining, reset);
            response
        }
        Err(not_until) => {
            let wait = not_until.wait_time_from(limit.limiter.clock().now());
            let retry_after_s = ceil_seconds(wait).max(1);
            metrics::counter!("souk_http_rate_limited_total").increment(1);
            let mut response = ApiError::RateLimited { retry_after_s }.into_response();
            set_headers(&mut response, limit.burst, 0, wait);
            response
        }
    }
}

fn ceil_seconds(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

fn set_headers(response: &mut Response, limit: u32, remaining: u32, reset: Duration) {
    let headers = response.headers_mut();
    headers.insert("ratelimit-limit", limit.into());
    headers.insert("ratelimit-remaining", remaining.into());
    headers.insert("ratelimit-reset", ceil_seconds(reset).into());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_exact_http_origins() {
        assert_eq!(
            parse_origin(" http://127.0.0.1:8090 ").unwrap(),
            "http://127.0.0.1:8090"
        );
        assert!(parse_origin("https://shop.example").is_ok());
        for bad in [
            "shop.example",
            "https://shop.example/",
            "https://*.example",
            "ftp://x",
            "https://",
        ] {
            assert!(parse_origin(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn seconds_round_up() {
        assert_eq!(ceil_seconds(Duration::from_millis(1)), 1);
        assert_eq!(ceil_seconds(Duration::from_secs(2)), 2);
        assert_eq!(ceil_seconds(Duration::ZERO), 0);
    }
}
