//! What a browser front end meets: CORS on both APIs, gzip, `ETag` and
//! `Cache-Control` on reads, and the per-user rate limit.

use std::num::NonZeroU32;

use serde_json::json;
use tests::{TestDb, User, spawn_app_on};

use crate::query_api::{insert_listing, migrated, spawn_query_api_with};

const SHOP: &str = "http://shop.test:8090";

fn header<'a>(headers: &'a reqwest::header::HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

#[tokio::test]
async fn a_preflight_from_an_allowed_origin_is_answered_and_other_origins_get_no_cors_headers() {
    let app = spawn_app_on(TestDb::empty().await, |config| {
        config.server.cors_origins = vec![SHOP.to_owned(), "https://other.test".to_owned()];
    })
    .await;
    let preflight = |origin: &'static str| {
        app.client
            .request(reqwest::Method::OPTIONS, format!("{}/wallets", app.address))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type,idempotency-key,x-request-id",
            )
            .send()
    };

    let allowed = preflight(SHOP).await.unwrap();
    assert!(allowed.status().is_success(), "{}", allowed.status());
    let headers = allowed.headers();
    assert_eq!(header(headers, "access-control-allow-origin"), Some(SHOP));
    let methods = header(headers, "access-control-allow-methods").unwrap();
    assert!(
        methods.contains("POST") && methods.contains("GET"),
        "{methods}"
    );
    let allowed_headers = header(headers, "access-control-allow-headers").unwrap();
    for name in [
        "authorization",
        "content-type",
        "idempotency-key",
        "x-request-id",
    ] {
        assert!(allowed_headers.contains(name), "{allowed_headers}");
    }

    let refused = preflight("http://evil.test").await.unwrap();
    assert_eq!(
        header(refused.headers(), "access-control-allow-origin"),
        None
    );

    // An actual request from the page: its answer names the origin and
    // exposes the headers a script needs.
    let buyer = User::new("buyer");
    let opened = app
        .client
        .post(format!("{}/wallets", app.address))
        .header("origin", SHOP)
        .bearer_auth(&buyer.token)
        .json(&json!({"currency": "EUR"}))
        .send()
        .await
        .unwrap();
    assert_eq!(opened.status().as_u16(), 201);
    assert_eq!(
        header(opened.headers(), "access-control-allow-origin"),
        Some(SHOP)
    );
    let exposed = header(opened.headers(), "access-control-expose-headers").unwrap();
    for name in ["x-request-id", "etag", "ratelimit-remaining", "retry-after"] {
        assert!(exposed.contains(name), "{exposed}");
    }
    assert_eq!(header(opened.headers(), "cache-control"), Some("no-store"));
    let other = app
        .client
        .post(format!("{}/wallets", app.address))
        .header("origin", "http://evil.test")
        .bearer_auth(&buyer.token)
        .json(&json!({"currency": "EUR"}))
        .send()
        .await
        .unwrap();
    assert_eq!(header(other.headers(), "access-control-allow-origin"), None);
    app.stop().await;
}

#[tokio::test]
async fn without_configured_origins_no_cors_header_is_ever_sent() {
    let app = spawn_app_on(TestDb::empty().await, |_| {}).await;
    let preflight = app
        .client
        .request(reqwest::Method::OPTIONS, format!("{}/wallets", app.address))
        .header("origin", SHOP)
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(
        header(preflight.headers(), "access-control-allow-origin"),
        None
    );
    app.stop().await;
}

#[tokio::test]
async fn json_answers_are_gzipped_for_clients_that_accept_it() {
    let (db, _pool) = migrated().await;
    let api = spawn_query_api_with(&db, |_| {}).await;
    let url = format!("{}/openapi.json", api.address);
    let plain = api.client.get(&url).send().await.unwrap();
    assert_eq!(header(plain.headers(), "content-encoding"), None);
    let plain = plain.bytes().await.unwrap();
    serde_json::from_slice::<serde_json::Value>(&plain).expect("plain JSON");

    let gzipped = api
        .client
        .get(&url)
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(gzipped.status().as_u16(), 200);
    assert_eq!(header(gzipped.headers(), "content-encoding"), Some("gzip"));
    let gzipped = gzipped.bytes().await.unwrap();
    // A gzip member starts with its magic number, and JSON compresses well.
    assert_eq!(&gzipped[..2], &[0x1f, 0x8b]);
    assert!(
        gzipped.len() * 3 < plain.len(),
        "{} of {}",
        gzipped.len(),
        plain.len()
    );
    api.stop().await;
}

#[tokio::test]
async fn a_read_carries_an_etag_and_a_matching_if_none_match_is_answered_304_until_it_changes() {
    let (db, pool) = migrated().await;
    let api = spawn_query_api_with(&db, |_| {}).await;
    let seller = User::new("seller");
    let listing = insert_listing(&pool, seller.id, json!({})).await;
    let path = format!("/listings/{listing}");

    let first = api.get(&path, Some(&seller)).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    let etag = header(&first.headers, "etag").expect("an ETag").to_owned();
    assert!(etag.starts_with("W/\""), "{etag}");
    assert_eq!(
        header(&first.headers, "cache-control"),
        Some("private, no-cache")
    );

    let revalidate = |etag: String| {
        api.client
            .get(format!("{}{path}", api.address))
            .bearer_auth(&seller.token)
            .header("if-none-match", etag)
            .send()
    };
    let unchanged = revalidate(etag.clone()).await.unwrap();
    assert_eq!(unchanged.status().as_u16(), 304);
    assert_eq!(header(unchanged.headers(), "etag"), Some(etag.as_str()));
    assert!(unchanged.bytes().await.unwrap().is_empty());

    sqlx::query("UPDATE rm_listings SET price_amount = 1234 WHERE listing_id = $1")
        .bind(listing)
        .execute(&pool)
        .await
        .unwrap();
    let changed = revalidate(etag.clone()).await.unwrap();
    assert_eq!(changed.status().as_u16(), 200);
    assert_ne!(header(changed.headers(), "etag"), Some(etag.as_str()));
    let body: serde_json::Value = changed.json().await.unwrap();
    assert_eq!(body["price"]["amount"], 1234);

    // Errors are never stored.
    let missing = api
        .get(
            &format!("/listings/{}", uuid::Uuid::now_v7()),
            Some(&seller),
        )
        .await;
    assert_eq!(missing.status, 404);
    assert_eq!(header(&missing.headers, "etag"), None);
    assert_eq!(header(&missing.headers, "cache-control"), Some("no-store"));
    api.stop().await;
}

#[tokio::test]
async fn a_burst_over_the_rate_limit_is_refused_429_while_another_user_is_unaffected() {
    const BURST: u32 = 5;
    let (db, pool) = migrated().await;
    let api = spawn_query_api_with(&db, |config| {
        config.server.rate_limit = NonZeroU32::new(1);
        config.server.rate_burst = NonZeroU32::new(BURST);
    })
    .await;
    let seller = User::new("seller");
    let listing = insert_listing(&pool, seller.id, json!({})).await;
    let path = format!("/listings/{listing}");

    // The first user spends the whole burst, then is refused.
    let hasty = User::new("buyer");
    let mut refused = None;
    for sent in 0..BURST + 20 {
        let answer = api.get(&path, Some(&hasty)).await;
        assert_eq!(header(&answer.headers, "ratelimit-limit"), Some("5"));
        if answer.status == 429 {
            assert!(sent >= BURST, "refused after {sent} requests");
            refused = Some(answer);
            break;
        }
        assert_eq!(answer.status, 200, "{:?}", answer.body);
    }
    let refused = refused.expect("the burst was never limited");
    assert_eq!(refused.code(), "rate_limited");
    let retry_after: u64 = header(&refused.headers, "retry-after")
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    assert_eq!(header(&refused.headers, "ratelimit-remaining"), Some("0"));
    assert!(header(&refused.headers, "ratelimit-reset").is_some());

    // Another user has a bucket of their own: the whole burst goes through.
    let patient = User::new("buyer");
    for sent in 0..BURST {
        let answer = api.get(&path, Some(&patient)).await;
        assert_eq!(answer.status, 200, "request {sent}: {:?}", answer.body);
        let remaining: u32 = header(&answer.headers, "ratelimit-remaining")
            .unwrap()
            .parse()
            .unwrap();
        assert!(remaining < BURST);
    }

    // Without a token the client's address is the key; health is never
    // limited.
    let mut anonymous_refused = false;
    for _ in 0..BURST + 20 {
        let answer = api.get("/openapi.json", None).await;
        if answer.status == 429 {
            anonymous_refused = true;
            break;
        }
    }
    assert!(anonymous_refused);
    for _ in 0..BURST + 5 {
        assert_eq!(api.get("/health", None).await.status, 200);
    }
    api.stop().await;
}

/// A tiny HTTP server on 127.0.0.1 for what the tests play the part of (an
/// identity provider's JWKS, the demo page's static origin): serves the
/// files it holds by path, or 503 while `down`, and counts the requests.
struct TinyServer {
    origin: String,
    state: std::sync::Arc<std::sync::Mutex<Served>>,
    server: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct Served {
    files: std::collections::HashMap<String, (&'static str, Vec<u8>)>,
    down: bool,
    requests: usize,
}

impl TinyServer {
    async fn start() -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin = format!("http://{}", listener.local_addr().unwrap());
        let state = std::sync::Arc::new(std::sync::Mutex::new(Served::default()));
        let served = state.clone();
        let server = tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let served = served.clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buffer = [0_u8; 4096];
                    while !request.windows(4).any(|window| window == b"\r\n\r\n") {
                        match socket.read(&mut buffer).await {
                            Ok(0) | Err(_) => break,
                            Ok(read) => request.extend_from_slice(&buffer[..read]),
                        }
                    }
                    let request = String::from_utf8_lossy(&request);
                    let path = request
                        .split_whitespace()
                        .nth(1)
                        .unwrap_or("/")
                        .split(['?', '#'])
                        .next()
                        .unwrap_or("/")
                        .to_owned();
                    let (status, content_type, body) = {
                        let mut served = served.lock().unwrap();
                        served.requests += 1;
                        match served.files.get(&path) {
                            _ if served.down => {
                                ("503 Service Unavailable", "text/plain", Vec::new())
                            }
                            Some((content_type, body)) => ("200 OK", *content_type, body.clone()),
                            None => ("404 Not Found", "text/plain", Vec::new()),
                        }
                    };
                    let head = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = socket.write_all(head.as_bytes()).await;
                    let _ = socket.write_all(&body).await;
                });
            }
        });
        Self {
            origin,
            state,
            server,
        }
    }

    fn serve(&self, path: &str, content_type: &'static str, body: impl Into<Vec<u8>>) {
        let mut state = self.state.lock().unwrap();
        state
            .files
            .insert(path.to_owned(), (content_type, body.into()));
    }

    fn set_down(&self, down: bool) {
        self.state.lock().unwrap().down = down;
    }

    fn requests(&self) -> usize {
        self.state.lock().unwrap().requests
    }
}

impl Drop for TinyServer {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// An identity provider publishing its keys at a JWKS URL.
struct Provider {
    url: String,
    server: TinyServer,
}

const JWKS_PATH: &str = "/.well-known/jwks.json";

impl Provider {
    async fn start(document: serde_json::Value) -> Self {
        let server = TinyServer::start().await;
        server.serve(JWKS_PATH, "application/json", document.to_string());
        Self {
            url: format!("{}{JWKS_PATH}", server.origin),
            server,
        }
    }

    fn set(&self, document: serde_json::Value, down: bool) {
        self.server
            .serve(JWKS_PATH, "application/json", document.to_string());
        self.server.set_down(down);
    }

    fn fetches(&self) -> usize {
        self.server.requests()
    }
}

/// A provider's signing key: its private PEM and its `kid`.
struct ProviderKey {
    private_pem: Vec<u8>,
    kid: &'static str,
}

impl ProviderKey {
    fn generate(kid: &'static str) -> Self {
        let dir = tests::TempDir::new("jwks-key");
        let (private, public) = (
            dir.path().join("private.pem"),
            dir.path().join("public.pem"),
        );
        identity::ensure_dev_key_pair(&private, &public).unwrap();
        Self {
            private_pem: std::fs::read(private).unwrap(),
            kid,
        }
    }

    fn jwk(&self) -> serde_json::Value {
        identity::public_jwk(&self.private_pem, self.kid).unwrap()
    }

    /// A fresh token of a new user (never verified before, so never
    /// answered from the verifier's memory).
    fn token(&self, kid: &str) -> User {
        let id = uuid::Uuid::now_v7();
        let token = identity::mint_token_with_key_id(
            &self.private_pem,
            Some(kid),
            id,
            "buyer",
            chrono::Duration::minutes(5),
            None,
            None,
        )
        .unwrap();
        User {
            id,
            role: "buyer",
            token,
        }
    }
}

fn jwks(keys: &[&ProviderKey]) -> serde_json::Value {
    json!({"keys": keys.iter().map(|key| key.jwk()).collect::<Vec<_>>()})
}

#[tokio::test]
async fn a_provider_key_rotation_mid_run_is_followed_without_a_restart() {
    let (old, new) = (ProviderKey::generate("old"), ProviderKey::generate("new"));
    let provider = Provider::start(jwks(&[&old])).await;
    let (db, pool) = migrated().await;
    let url = provider.url.clone();
    let api = spawn_query_api_with(&db, move |config| {
        config.server.jwt_jwks_url = Some(url);
        config.server.jwt_jwks_min_refetch_ms = 100;
    })
    .await;
    let listing = insert_listing(&pool, uuid::Uuid::now_v7(), json!({})).await;
    let path = format!("/listings/{listing}");
    let status = |user: User| {
        let api = &api;
        let path = path.clone();
        async move { api.get(&path, Some(&user)).await.status }
    };

    let before = old.token("old");
    assert_eq!(status(before.clone()).await, 200);
    // A key the provider does not publish, and a token without a kid.
    assert_eq!(status(new.token("new")).await, 401);
    assert_eq!(status(old.token("unknown")).await, 401);

    // The provider rotates: `new` is published, `old` withdrawn. A token of
    // the new key triggers a fetch (throttled: a few tries may be needed).
    provider.set(jwks(&[&new]), false);
    let mut accepted = false;
    for _ in 0..100 {
        if status(new.token("new")).await == 200 {
            accepted = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(accepted, "the new key was never fetched");
    // The withdrawn key verifies nothing any more, not even a token that
    // verified before the rotation.
    assert_eq!(status(before).await, 401);
    assert_eq!(status(old.token("old")).await, 401);

    // The provider goes down: an unknown kid makes the verifier try it (and
    // fail), and the last good keys keep working.
    provider.set(jwks(&[&new]), true);
    let fetches = provider.fetches();
    for _ in 0..100 {
        assert_eq!(status(old.token("gone")).await, 401);
        if provider.fetches() > fetches {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(provider.fetches() > fetches, "the outage was never met");
    assert_eq!(status(new.token("new")).await, 200);
    api.stop().await;
}

#[tokio::test]
async fn tokens_with_unknown_keys_fetch_the_jwks_at_most_once_per_interval() {
    let key = ProviderKey::generate("only");
    let provider = Provider::start(jwks(&[&key])).await;
    let (db, pool) = migrated().await;
    let url = provider.url.clone();
    let api = spawn_query_api_with(&db, move |config| {
        config.server.jwt_jwks_url = Some(url);
        config.server.jwt_jwks_min_refetch_ms = 600_000;
    })
    .await;
    let listing = insert_listing(&pool, uuid::Uuid::now_v7(), json!({})).await;
    let path = format!("/listings/{listing}");
    assert_eq!(api.get(&path, Some(&key.token("only"))).await.status, 200);
    assert_eq!(provider.fetches(), 1);
    for _ in 0..20 {
        let refused = api.get(&path, Some(&key.token("stranger"))).await;
        assert_eq!(refused.status, 401);
        assert_eq!(refused.code(), "unauthorized");
    }
    assert_eq!(provider.fetches(), 1);
    api.stop().await;
}

/// A server-sent event: its name, id and JSON data.
#[derive(Debug, Clone, PartialEq)]
struct Sse {
    event: String,
    id: Option<String>,
    data: serde_json::Value,
}

/// A notification stream opened the way a browser opens it: no
/// `Authorization`, a ticket in the query string.
struct Browser {
    response: reqwest::Response,
    buffer: String,
}

impl Browser {
    async fn open(
        api: &crate::query_api::QueryApi,
        ticket: &str,
        last_event_id: Option<&str>,
    ) -> reqwest::Response {
        let mut request = api.client.get(format!(
            "{}/notifications/stream?ticket={ticket}",
            api.address
        ));
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        request.send().await.expect("opening the stream")
    }

    fn new(response: reqwest::Response) -> Self {
        assert_eq!(response.status().as_u16(), 200);
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// The next event within `within`, skipping comments.
    async fn next(&mut self, within: std::time::Duration) -> Option<Sse> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut event, mut id, mut data) = (None, None, String::new());
                for line in block.lines() {
                    if let Some(value) = line.strip_prefix("event:") {
                        event = Some(value.trim().to_owned());
                    } else if let Some(value) = line.strip_prefix("id:") {
                        id = Some(value.trim().to_owned());
                    } else if let Some(value) = line.strip_prefix("data:") {
                        data.push_str(value.trim());
                    }
                }
                if let Some(event) = event {
                    let data = serde_json::from_str(&data).unwrap_or(serde_json::Value::Null);
                    return Some(Sse { event, id, data });
                }
            }
            match tokio::time::timeout_at(deadline, self.response.chunk()).await {
                Ok(Ok(Some(bytes))) => self.buffer.push_str(&String::from_utf8_lossy(&bytes)),
                _ => return None,
            }
        }
    }

    async fn expect_next(&mut self) -> Sse {
        self.next(std::time::Duration::from_secs(30))
            .await
            .expect("an event")
    }
}

/// `buyer` checks out `quantity` of `listing`, paid from `wallet` in
/// escrow; the order's id.
async fn buy(
    app: &tests::TestApp,
    buyer: &User,
    listing: uuid::Uuid,
    quantity: u32,
    wallet: uuid::Uuid,
) -> uuid::Uuid {
    let placed = app
        .post(
            "/orders",
            Some(buyer),
            &json!({
                "lines": [{"listing_id": listing, "quantity": quantity}],
                "shipping_address": {"name": "Ana Ruiz", "line1": "3 rue Mercière", "city": "Lyon", "postal_code": "69002", "country": "FR"},
                "payment_method": "wallet_escrow",
                "wallet_id": wallet,
            }),
        )
        .await;
    assert_eq!(placed.status, 201, "{:?}", placed.body);
    placed.id()
}

async fn ticket_for(api: &crate::query_api::QueryApi, user: &User) -> String {
    let answer = api
        .client
        .post(format!("{}/notifications/tickets", api.address))
        .bearer_auth(&user.token)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 201);
    let body: serde_json::Value = answer.json().await.unwrap();
    let expires_at: chrono::DateTime<chrono::Utc> =
        body["expires_at"].as_str().unwrap().parse().unwrap();
    assert!(expires_at <= chrono::Utc::now() + chrono::Duration::seconds(61));
    body["ticket"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_ticket_opens_a_stream_once_and_a_stream_resumes_after_a_query_api_restart() {
    let mut full =
        crate::query_api::FullPath::start_with(30_000, projections::search::SearchConfig::off())
            .await;
    full.wait_notifications_live().await;
    let seller = User::new("seller");
    let seller_wallet = full.app.funded_wallet(&seller, "EUR", 0).await;
    let listing = full
        .app
        .listing(&seller, 2_500, 3, Some(seller_wallet))
        .await;
    let buyer = User::new("buyer");
    let buyer_wallet = full.app.funded_wallet(&buyer, "EUR", 10_000).await;

    // Refusals: no token and no ticket, a forged ticket, a used one.
    let anonymous = full.api.get("/notifications/stream", None).await;
    assert_eq!(anonymous.status, 401);
    let forged = Browser::open(&full.api, &"ab".repeat(40), None).await;
    assert_eq!(forged.status().as_u16(), 401);
    let ticket = ticket_for(&full.api, &buyer).await;
    let mut stream = Browser::new(Browser::open(&full.api, &ticket, None).await);
    let reused = Browser::open(&full.api, &ticket, None).await;
    assert_eq!(reused.status().as_u16(), 401);
    let body: serde_json::Value = reused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");
    assert_eq!(stream.expect_next().await.event, "ready");

    let order = buy(&full.app, &buyer, listing, 2, buyer_wallet).await;

    // Placed, funds held, confirmed: each with its position as its id.
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let event = stream.expect_next().await;
        let id = event.id.clone().expect("every notification has an id");
        assert_eq!(event.data["position"], id);
        seen.push(event);
    }
    assert_eq!(seen[0].event, "order_status");
    assert_eq!(seen[0].data["status"], "placed");

    // The query API goes away; the order ships meanwhile.
    drop(stream);
    full.api.stop_in_place().await;
    let shipped = full
        .app
        .post(
            &format!("/orders/{order}/ship"),
            Some(&seller),
            &json!({"carrier": "La Poste", "tracking_number": "LP123"}),
        )
        .await;
    assert_eq!(shipped.status, 200, "{:?}", shipped.body);

    // A new query API process; the browser resumes after the first event.
    let stream_name = full.stream.clone();
    full.api = spawn_query_api_with(&full.app.db, move |config| {
        config.stream = stream_name;
    })
    .await;
    full.wait_notifications_live().await;
    let ticket = ticket_for(&full.api, &buyer).await;
    let first_id = seen[0].id.clone().unwrap();
    let mut resumed = Browser::new(Browser::open(&full.api, &ticket, Some(&first_id)).await);
    assert_eq!(resumed.expect_next().await.event, "ready");
    // The two after it, in order, then the shipment: nothing twice.
    for expected in &seen[1..] {
        assert_eq!(&resumed.expect_next().await, expected);
    }
    let shipment = resumed.expect_next().await;
    assert_eq!(
        (shipment.event.as_str(), &shipment.data["status"]),
        ("order_status", &json!("shipped"))
    );
    assert!(shipment.id.as_deref() > seen[2].id.as_deref());
    assert_eq!(
        resumed.next(std::time::Duration::from_millis(500)).await,
        None
    );
    drop(resumed);

    // A malformed Last-Event-ID is 400; one that names no event is a reset.
    let ticket = ticket_for(&full.api, &buyer).await;
    let malformed = Browser::open(&full.api, &ticket, Some("not-a-position")).await;
    assert_eq!(malformed.status().as_u16(), 400);
    let body: serde_json::Value = malformed.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_last_event_id");
    let ticket = ticket_for(&full.api, &buyer).await;
    let unknown = event_store::Position {
        transaction_id: 1,
        position: 1,
    }
    .token();
    let mut reset = Browser::new(Browser::open(&full.api, &ticket, Some(&unknown)).await);
    assert_eq!(reset.expect_next().await.event, "ready");
    let event = reset.expect_next().await;
    assert_eq!(event.event, "reset", "{event:?}");
    drop(reset);
    full.stop().await;
}

/// chromedriver on a free port of 127.0.0.1, killed with the value.
struct ChromeDriver {
    url: String,
    process: std::process::Child,
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

impl ChromeDriver {
    async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let process = std::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver; ./scripts/test.sh installs it)");
        let url = format!("http://127.0.0.1:{port}");
        let driver = Self { url, process };
        let client = reqwest::Client::new();
        for _ in 0..200 {
            if client
                .get(format!("{}/status", driver.url))
                .send()
                .await
                .is_ok_and(|answer| answer.status().is_success())
            {
                return driver;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("chromedriver did not come up");
    }
}

#[tokio::test]
async fn the_demo_page_searches_orders_and_shows_the_live_order_status() {
    use fantoccini::Locator;

    // The page's own origin, serving examples/web as it is.
    let page = TinyServer::start().await;
    let web = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/web");
    for (file, content_type) in [
        ("index.html", "text/html; charset=utf-8"),
        ("app.js", "text/javascript"),
        ("config.js", "text/javascript"),
        ("style.css", "text/css"),
    ] {
        let body = std::fs::read(web.join(file)).unwrap();
        page.serve(&format!("/{file}"), content_type, body);
    }
    let index = std::fs::read(web.join("index.html")).unwrap();
    page.serve("/", "text/html; charset=utf-8", index);

    let search_dir = tests::TempDir::new("web-search");
    let full = crate::query_api::FullPath::start_for_origins(
        30_000,
        projections::search::SearchConfig::embedded(search_dir.path()),
        vec![page.origin.clone()],
    )
    .await;
    full.wait_notifications_live().await;
    let seller = User::new("seller");
    let seller_wallet = full.app.funded_wallet(&seller, "EUR", 0).await;
    let listing = full
        .app
        .listing(&seller, 2_500, 3, Some(seller_wallet))
        .await;
    let buyer = User::new("buyer");
    let wallet = full.app.funded_wallet(&buyer, "EUR", 10_000).await;
    // The listing is searchable before the page looks for it.
    let mut indexed = false;
    for _ in 0..600 {
        let found = full.api.get("/search?q=lamp", Some(&buyer)).await;
        if found.body["items"][0]["id"] == listing.to_string() {
            indexed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(indexed, "the listing never reached the search index");

    let driver = ChromeDriver::start().await;
    let profile = tests::TempDir::new("chromium-profile");
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".to_owned(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,800", format!("--user-data-dir={}", profile.path().display()),
            ],
        }),
    );
    // chromedriver listens on loopback: plain HTTP, no TLS stack.
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let browser = fantoccini::ClientBuilder::new(connector)
        .capabilities(capabilities)
        .connect(&driver.url)
        .await
        .expect("a Chromium session");
    let fragment = format!(
        "token={}&user={}&wallet={wallet}&command_api={}&query_api={}",
        buyer.token, buyer.id, full.app.address, full.api.address
    );
    let wait = std::time::Duration::from_secs(30);
    let outcome = async {
        browser
            .goto(&format!("{}/index.html#{fragment}", page.origin))
            .await?;
        browser
            .wait()
            .at_most(wait)
            .for_element(Locator::Css("#stream-state.live"))
            .await?;
        let query = browser.find(Locator::Css("#query")).await?;
        query.clear().await?;
        query.send_keys("lamp").await?;
        browser.find(Locator::Css("#search")).await?.click().await?;
        // The page re-renders its lists as answers and events arrive, so an
        // element handle kept across calls can go stale: wait for the
        // element, then act on it and read it by selector, in one script.
        let buy = format!("li[data-listing='{listing}'] button.buy");
        browser
            .wait()
            .at_most(wait)
            .for_element(Locator::Css(&buy))
            .await?;
        browser
            .execute(
                "document.querySelector(arguments[0]).click();",
                vec![json!(buy)],
            )
            .await?;
        const PLACED: &str = "#events li[data-event='order_status']";
        browser
            .wait()
            .at_most(wait)
            .for_element(Locator::Css(PLACED))
            .await?;
        let found = browser
            .execute(
                "const li = document.querySelector(arguments[0]); \
                 const status = document.querySelector('#order-status'); \
                 return [li.textContent, li.getAttribute('data-order'), \
                         status && status.getAttribute('data-order')];",
                vec![json!(PLACED)],
            )
            .await?;
        let text = found[0].as_str().unwrap_or_default().to_owned();
        let placed = found[1].as_str().map(str::to_owned);
        let order = found[2].as_str().map(str::to_owned);
        // Let the confirmation arrive too, for the screenshot.
        let _ = browser
            .wait()
            .at_most(wait)
            .for_element(Locator::Css("#events li[data-status='confirmed']"))
            .await;
        let screenshot = browser.screenshot().await?;
        Ok::<_, fantoccini::error::CmdError>((text, order, placed, screenshot))
    }
    .await;
    let (text, order, placed, screenshot) = match outcome {
        Ok(outcome) => outcome,
        Err(error) => {
            let _ = browser.close().await;
            panic!("driving the demo page: {error}");
        }
    };
    let placed_order = placed;
    browser.close().await.unwrap();
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(target.join("demo-web.png"), &screenshot).unwrap();

    assert!(text.starts_with("order_status: "), "{text}");
    let order = order.expect("the page shows the order it placed");
    assert_eq!(placed_order.as_deref(), Some(order.as_str()));
    // The order is real: the query API has it, for this buyer.
    let seen = full
        .api
        .get(&format!("/orders/{order}"), Some(&buyer))
        .await;
    assert_eq!(seen.status, 200, "{:?}", seen.body);
    assert_eq!(seen.body["buyer_id"], buyer.id.to_string());
    assert_eq!(&screenshot[1..4], b"PNG");
    full.stop().await;
}

#[tokio::test]
async fn a_resumed_stream_replays_orders_the_read_models_have_not_applied_yet() {
    let mut full = crate::query_api::FullPath::start(30_000).await;
    full.wait_notifications_live().await;
    let seller = User::new("seller");
    let seller_wallet = full.app.funded_wallet(&seller, "EUR", 0).await;
    let listing = full
        .app
        .listing(&seller, 1_500, 2, Some(seller_wallet))
        .await;
    let buyer = User::new("buyer");
    let buyer_wallet = full.app.funded_wallet(&buyer, "EUR", 0).await;
    let deposited = full
        .app
        .post(
            &format!("/wallets/{buyer_wallet}/deposits"),
            Some(&User::new("admin")),
            &json!({"amount": {"amount": 5_000, "currency": "EUR"}, "reference": "top-up"}),
        )
        .await;
    assert_eq!(deposited.status, 200, "{:?}", deposited.body);
    let last_seen = deposited.body["position"].as_str().unwrap().to_owned();

    // The read models stop here: the order below is in the event store only.
    full.stop_projector().await;
    let order = buy(&full.app, &buyer, listing, 1, buyer_wallet).await;

    // The buyer's browser resumes after the deposit: the order's placement,
    // its confirmation and its funds held, found without the read models.
    let ticket = ticket_for(&full.api, &buyer).await;
    let mut resumed = Browser::new(Browser::open(&full.api, &ticket, Some(&last_seen)).await);
    assert_eq!(resumed.expect_next().await.event, "ready");
    let mut replayed = Vec::new();
    while let Some(event) = resumed.next(std::time::Duration::from_secs(3)).await {
        replayed.push(event);
    }
    let summary: Vec<(String, serde_json::Value)> = replayed
        .iter()
        .map(|event| {
            let what = event
                .data
                .get("status")
                .cloned()
                .unwrap_or_else(|| event.data["event_type"].clone());
            (event.event.clone(), what)
        })
        .collect();
    let mut kinds = summary.clone();
    kinds.sort_by_key(|(event, what)| format!("{event}{what}"));
    assert_eq!(
        kinds,
        [
            ("funds_held".to_owned(), json!("FundsHeld")),
            ("order_status".to_owned(), json!("confirmed")),
            ("order_status".to_owned(), json!("placed")),
        ],
        "{replayed:?}"
    );
    assert_eq!(summary[0].1, json!("placed"), "{replayed:?}");
    let mut after = last_seen.clone();
    for event in &replayed {
        assert_eq!(event.data["order_id"], json!(order.to_string()));
        let id = event.id.clone().expect("every notification has an id");
        assert!(id > after, "in order, none twice: {replayed:?}");
        after = id;
    }
    drop(resumed);
    full.stop().await;
}
