//! Bad input to the command API, class by class and route by route: each
//! kind is refused with its status and stable code, and a refused command
//! writes nothing (no event, no idempotency record, no timer).
//!
//! [`Probe`] and [`Call`] send the requests and check the database around
//! each refusal; the auth tests use them too. Every call carries a fresh
//! `Idempotency-Key`, so a refusal whose response were stored would show up
//! as a new idempotency row.

use std::fmt;

use reqwest::Method;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use serde_json::{Value, json};
use sqlx::postgres::PgPool;
use tests::{Answer, TestApp, User, spawn_app};
use uuid::Uuid;

/// One request to the command API.
#[derive(Debug, Clone)]
pub(crate) struct Call {
    method: Method,
    path: String,
    authorization: Vec<String>,
    content_type: Option<String>,
    idempotency_key: Option<String>,
    body: Option<Vec<u8>>,
    name: Option<String>,
}

impl Call {
    /// A request without token, body or content type.
    pub(crate) fn new(method: Method, path: impl Into<String>) -> Self {
        Self {
            method,
            path: path.into(),
            authorization: Vec::new(),
            content_type: None,
            idempotency_key: None,
            body: None,
            name: None,
        }
    }

    /// A POST of `body` as JSON, signed in as `user`.
    pub(crate) fn post(path: impl Into<String>, user: &User, body: &Value) -> Self {
        Self::post_bytes(path, user, body.to_string())
    }

    /// A POST of raw bytes declared as JSON, signed in as `user`.
    pub(crate) fn post_bytes(
        path: impl Into<String>,
        user: &User,
        body: impl Into<Vec<u8>>,
    ) -> Self {
        let mut call =
            Self::new(Method::POST, path).authorization(format!("Bearer {}", user.token));
        call.content_type = Some("application/json".to_owned());
        call.body = Some(body.into());
        call
    }

    /// A POST without a body (the routes that take none), as `user`.
    pub(crate) fn post_empty(path: impl Into<String>, user: &User) -> Self {
        Self::new(Method::POST, path).authorization(format!("Bearer {}", user.token))
    }

    /// Replaces the Authorization header with `value`.
    pub(crate) fn authorization(mut self, value: impl Into<String>) -> Self {
        self.authorization = vec![value.into()];
        self
    }

    /// Sends one more Authorization header.
    pub(crate) fn another_authorization(mut self, value: impl Into<String>) -> Self {
        self.authorization.push(value.into());
        self
    }

    /// Sends no Authorization header.
    pub(crate) fn without_token(mut self) -> Self {
        self.authorization.clear();
        self
    }

    /// Replaces (or, with `None`, removes) the Content-Type header.
    pub(crate) fn content_type(mut self, value: Option<&str>) -> Self {
        self.content_type = value.map(str::to_owned);
        self
    }

    /// Sends this Idempotency-Key instead of a fresh one.
    pub(crate) fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Names the call in failure messages (instead of its body).
    pub(crate) fn named(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method, self.path)?;
        if let Some(name) = &self.name {
            return write!(f, " ({name})");
        }
        if let Some(body) = &self.body {
            let text = String::from_utf8_lossy(body);
            let shown: String = text.chars().take(160).collect();
            let more = if text.chars().count() > 160 {
                "…"
            } else {
                ""
            };
            write!(f, " {shown}{more}")?;
        }
        Ok(())
    }
}

/// Rows in the tables a command writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Written {
    events: i64,
    idempotency: i64,
    timers: i64,
}

/// A command API of its own, and a view on its database.
pub(crate) struct Probe {
    pub(crate) app: TestApp,
    pool: PgPool,
}

impl Probe {
    pub(crate) async fn start() -> Self {
        let app = spawn_app().await;
        let pool = app.db.pool().await;
        Self { app, pool }
    }

    pub(crate) async fn written(&self) -> Written {
        let (events, idempotency, timers) = sqlx::query_as::<_, (i64, i64, i64)>(
            "SELECT (SELECT count(*) FROM events),
                    (SELECT count(*) FROM idempotency),
                    (SELECT count(*) FROM timers)",
        )
        .fetch_one(&self.pool)
        .await
        .expect("counting written rows");
        Written {
            events,
            idempotency,
            timers,
        }
    }

    /// Sends `call`, with a fresh Idempotency-Key unless it names one.
    pub(crate) async fn send(&self, call: &Call) -> Answer {
        let mut request = self.app.client.request(
            call.method.clone(),
            format!("{}{}", self.app.address, call.path),
        );
        for value in &call.authorization {
            request = request.header(AUTHORIZATION, value);
        }
        if let Some(content_type) = &call.content_type {
            request = request.header(CONTENT_TYPE, content_type);
        }
        let key = call
            .idempotency_key
            .clone()
            .unwrap_or_else(|| Uuid::now_v7().to_string());
        request = request.header("idempotency-key", key);
        if let Some(body) = &call.body {
            request = request.body(body.clone());
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|error| panic!("{call}: the request failed: {error}"));
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.unwrap_or_default();
        Answer {
            status,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            headers,
        }
    }

    /// Sends `call` and asserts it was refused with `status` and `code`, in
    /// the error body every refusal carries, and that it wrote nothing.
    pub(crate) async fn refused(&self, call: Call, status: u16, code: &str) -> Answer {
        let (answer, wrong) = self.try_refused(&call, status, code).await;
        if let Some(wrong) = wrong {
            panic!("{wrong}");
        }
        answer
    }

    /// Like [`Self::refused`], but says what went wrong instead of panicking,
    /// so that a test can report every case at once.
    pub(crate) async fn try_refused(
        &self,
        call: &Call,
        status: u16,
        code: &str,
    ) -> (Answer, Option<String>) {
        let before = self.written().await;
        let answer = self.send(call).await;
        let after = self.written().await;
        let wrong = if (answer.status, answer.code()) != (status, code) {
            Some(format!(
                "{call}: expected {status} `{code}`, got {} {}",
                answer.status, answer.body
            ))
        } else if answer.body["error"]["message"]
            .as_str()
            .is_none_or(str::is_empty)
        {
            Some(format!(
                "{call}: the refusal has no message: {}",
                answer.body
            ))
        } else if after != before {
            Some(format!(
                "{call} was refused but wrote to the database: {before:?} -> {after:?}"
            ))
        } else {
            None
        };
        (answer, wrong)
    }

    /// Sends every call and asserts that each was refused with `status` and
    /// `code` and wrote nothing, listing every case that was not.
    pub(crate) async fn all_refused(&self, calls: Vec<Call>, status: u16, code: &str) {
        let mut wrong = Vec::new();
        for call in &calls {
            if let (_, Some(what)) = self.try_refused(call, status, code).await {
                wrong.push(what);
            }
        }
        assert!(
            wrong.is_empty(),
            "{} of {} calls were not refused as {status} `{code}`:\n{}",
            wrong.len(),
            calls.len(),
            wrong.join("\n")
        );
    }

    /// Sends `call` and asserts it was accepted and wrote its events and
    /// idempotency record (which shows that [`Self::refused`] would see a
    /// write).
    pub(crate) async fn accepted(&self, call: Call) -> Answer {
        let before = self.written().await;
        let answer = self.send(&call).await;
        assert!(
            (200..300).contains(&answer.status),
            "{call}: expected a 2xx, got {} {}",
            answer.status,
            answer.body
        );
        let after = self.written().await;
        assert!(
            after.events > before.events && after.idempotency == before.idempotency + 1,
            "{call} was accepted but wrote {before:?} -> {after:?}"
        );
        answer
    }
}

/// A small market: a seller with a payout wallet and a listing of 3 units
/// at 25 EUR, a buyer with 100 EUR in a wallet and a confirmed
/// cash-on-delivery order for one unit.
pub(crate) struct Market {
    pub(crate) seller: User,
    pub(crate) buyer: User,
    pub(crate) admin: User,
    pub(crate) seller_wallet: Uuid,
    pub(crate) buyer_wallet: Uuid,
    pub(crate) listing: Uuid,
    pub(crate) product: Uuid,
    pub(crate) order: Uuid,
}

impl Market {
    pub(crate) async fn open(probe: &Probe) -> Self {
        let seller = User::new("seller");
        let buyer = User::new("buyer");
        let admin = User::new("admin");
        let seller_wallet = probe.app.funded_wallet(&seller, "EUR", 0).await;
        let buyer_wallet = probe.app.funded_wallet(&buyer, "EUR", 10_000).await;
        let created = probe
            .accepted(Call::post(
                "/listings",
                &seller,
                &listing_body(2_500, 3, Some(seller_wallet)),
            ))
            .await;
        let listing = created.id();
        let product = created.body["product_id"]
            .as_str()
            .and_then(|id| Uuid::parse_str(id).ok())
            .expect("a product id");
        let checkout = probe
            .accepted(Call::post(
                "/orders",
                &buyer,
                &checkout_body(&[listing], "cod", None),
            ))
            .await;
        assert_eq!(checkout.body["orders"][0]["status"], "confirmed");
        Self {
            seller,
            buyer,
            admin,
            seller_wallet,
            buyer_wallet,
            listing,
            product,
            order: checkout.id(),
        }
    }
}

pub(crate) fn money(amount: i64, currency: &str) -> Value {
    json!({"amount": amount, "currency": currency})
}

pub(crate) fn movement(amount: i64, currency: &str) -> Value {
    json!({"amount": money(amount, currency), "reference": "bank 42"})
}

pub(crate) fn listing_body(price: i64, quantity: u32, payout_wallet: Option<Uuid>) -> Value {
    let mut body = json!({
        "title": "Vintage lamp",
        "description": "Brass, works.",
        "category": "home",
        "condition": "good",
        "price": money(price, "EUR"),
        "quantity": quantity,
        "location": {"city": "Lyon", "country": "FR"},
        "attributes": {"colour": "brass"},
        "images": ["https://img.example/lamp.jpg"],
    });
    if let Some(wallet) = payout_wallet {
        body["payout_wallet_id"] = json!(wallet);
    }
    body
}

pub(crate) fn address() -> Value {
    json!({
        "name": "Ada Lovelace",
        "line1": "1 rue de la République",
        "city": "Lyon",
        "postal_code": "69001",
        "country": "FR",
    })
}

pub(crate) fn checkout_body(
    listings: &[Uuid],
    payment_method: &str,
    wallet: Option<Uuid>,
) -> Value {
    let lines: Vec<Value> = listings
        .iter()
        .map(|listing| json!({"listing_id": listing, "quantity": 1}))
        .collect();
    let mut body = json!({
        "lines": lines,
        "shipping_address": address(),
        "payment_method": payment_method,
    });
    if let Some(wallet) = wallet {
        body["wallet_id"] = json!(wallet);
    }
    body
}

fn ship_body() -> Value {
    json!({"carrier": "La Poste", "tracking_number": "LP123456789FR"})
}

fn story_body() -> Value {
    json!({"title": "Restored", "body": "Polished the brass.", "media": ["https://img.example/a.jpg"]})
}

/// `body` with the field at the dotted `path` set to `value`.
fn with(mut body: Value, path: &str, value: Value) -> Value {
    let mut target = &mut body;
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            target[part] = value;
            break;
        }
        target = &mut target[part];
    }
    body
}

/// `body` without the field at the dotted `path`.
fn without(mut body: Value, path: &str) -> Value {
    let (parent, last) = path.rsplit_once('.').unwrap_or(("", path));
    let mut target = &mut body;
    for part in parent.split('.').filter(|part| !part.is_empty()) {
        target = &mut target[part];
    }
    target
        .as_object_mut()
        .expect("an object")
        .remove(last)
        .expect("the field to remove");
    body
}

fn urls(count: usize) -> Vec<String> {
    (0..count)
        .map(|n| format!("https://img.example/{n}.jpg"))
        .collect()
}

/// Each command route with a body, a user who may call it and a valid body.
fn routes_with_bodies(m: &Market) -> Vec<(String, &User, Value)> {
    vec![
        ("/wallets".to_owned(), &m.buyer, json!({"currency": "EUR"})),
        (
            format!("/wallets/{}/deposits", m.buyer_wallet),
            &m.admin,
            movement(100, "EUR"),
        ),
        (
            format!("/wallets/{}/withdrawals", m.buyer_wallet),
            &m.buyer,
            movement(100, "EUR"),
        ),
        (
            "/listings".to_owned(),
            &m.seller,
            listing_body(1_000, 1, Some(m.seller_wallet)),
        ),
        (
            format!("/listings/{}/price", m.listing),
            &m.seller,
            json!({"price": money(2_000, "EUR")}),
        ),
        (
            format!("/listings/{}/details", m.listing),
            &m.seller,
            json!({"title": "Brass lamp"}),
        ),
        (
            format!("/listings/{}/stock", m.listing),
            &m.seller,
            json!({"quantity": 5}),
        ),
        (
            format!("/listings/{}/reservations", m.listing),
            &m.buyer,
            json!({"quantity": 1, "ttl_seconds": 600}),
        ),
        (
            "/orders".to_owned(),
            &m.buyer,
            checkout_body(&[m.listing], "cod", None),
        ),
        (format!("/orders/{}/ship", m.order), &m.seller, ship_body()),
        (
            format!("/orders/{}/review", m.order),
            &m.buyer,
            json!({"rating": 5, "comment": "Lovely"}),
        ),
        (
            format!("/products/{}/stories", m.product),
            &m.seller,
            story_body(),
        ),
    ]
}

#[tokio::test]
async fn bodies_that_are_not_json_are_refused_with_400_malformed_json() {
    let probe = Probe::start().await;
    let m = Market::open(&probe).await;
    for (path, user, valid) in routes_with_bodies(&m) {
        let valid = valid.to_string();
        let bodies: Vec<Vec<u8>> = vec![
            b"not json".to_vec(),
            Vec::new(),
            b"{".to_vec(),
            b"{'currency': 'EUR'}".to_vec(),
            b"\xff\xfe{}".to_vec(),
            // A valid body cut short, or followed by more.
            valid.as_bytes()[..valid.len() / 2].to_vec(),
            format!("{valid} trailing").into_bytes(),
            format!("{valid}}}").into_bytes(),
            format!("{valid}{valid}").into_bytes(),
        ];
        for body in bodies {
            probe
                .refused(Call::post_bytes(&path, user, body), 400, "malformed_json")
                .await;
        }
    }
    for body in [
        r#"{"currency":"#,
        r#"{"currency": "EUR",}"#,
        r#"{"currency" "EUR"}"#,
    ] {
        probe
            .refused(
                Call::post_bytes("/wallets", &m.buyer, body),
                400,
                "malformed_json",
            )
            .await;
    }
}

#[tokio::test]
async fn a_syntax_error_is_malformed_json_even_after_a_field_the_route_does_not_take() {
    let probe = Probe::start().await;
    let m = Market::open(&probe).await;
    // Not JSON at all, so 400 `malformed_json`, whatever the fields before
    // the syntax error: one the route does not take, or one of a wrong type.
    let mut calls: Vec<Call> = routes_with_bodies(&m)
        .into_iter()
        .map(|(path, user, _)| Call::post_bytes(path, user, r#"{"note": 1, "#))
        .collect();
    calls.push(Call::post_bytes("/wallets", &m.buyer, r#"{"currency": 1"#));
    calls.push(Call::post_bytes(
        format!("/wallets/{}/deposits", m.buyer_wallet),
        &m.admin,
        r#"{"currency":"#,
    ));
    probe.all_refused(calls, 400, "malformed_json").await;
}

#[tokio::test]
async fn bodies_not_declared_as_json_are_refused_with_415() {
    let probe = Probe::start().await;
    let m = Market::open(&probe).await;
    let cases = [
        Call::post("/wallets", &m.buyer, &json!({"currency": "EUR"})),
        Call::post(
            format!("/wallets/{}/deposits", m.buyer_wallet),
            &m.admin,
            &movement(100, "EUR"),
        ),
        Call::post(
            "/listings",
            &m.seller,
            &listing_body(1_000, 1, Some(m.seller_wallet)),
        ),
        Call::post(
            format!("/listings/{}/price", m.listing),
            &m.seller,
            &json!({"price": money(2_000, "EUR")}),
        ),
        Call::post(
            "/orders",
            &m.buyer,
            &checkout_body(&[m.listing], "cod", None),
        ),
        Call::post(format!("/orders/{}/ship", m.order), &m.seller, &ship_body()),
        Call::post(
            format!("/products/{}/stories", m.product),
            &m.seller,
            &story_body(),
        ),
    ];
    let content_types = [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        Some("application/jsonx"),
        Some("json"),
    ];
    for call in &cases {
        for content_type in content_types {
            probe
                .refused(
                    call.clone().content_type(content_type),
                    415,
                    "unsupported_media_type",
                )
                .await;
        }
    }
    // A route that takes a body, called without one.
    probe
        .refused(
            Call::post_empty(format!("/orders/{}/ship", m.order), &m.seller),
            415,
            "unsupported_media_type",
        )
        .await;
    // Parameters and case do not matter: these are JSON.
    probe
        .accepted(
            Call::post("/wallets", &m.buyer, &json!({"currency": "EUR"}))
                .content_type(Some("Application/JSON; charset=utf-8")),
        )
        .await;
}

#[tokio::test]
async fn json_of_the_wrong_types_is_refused_with_422_invalid_body() {
    let probe = Probe::start().await;
    let m = Market::open(&probe).await;
    let deposits = format!("/wallets/{}/deposits", m.buyer_wallet);
    let withdrawals = format!("/wallets/{}/withdrawals", m.buyer_wallet);
    let price = format!("/listings/{}/price", m.listing);
    let details = format!("/listings/{}/details", m.listing);
    let stock = format!("/listings/{}/stock", m.listing);
    let reservations = format!("/listings/{}/reservations", m.listing);
    let ship = format!("/orders/{}/ship", m.order);
    let review = format!("/orders/{}/review", m.order);
    let stories = format!("/products/{}/stories", m.product);
    let listing = listing_body(1_000, 1, None);
    let checkout = checkout_body(&[m.listing], "cod", None);
    let cases = [
        Call::post("/wallets", &m.buyer, &json!({"currency": 978})),
        Call::post("/wallets", &m.buyer, &json!({"currency": null})),
        Call::post("/wallets", &m.buyer, &json!({"currency": ["EUR"]})),
        Call::post("/wallets", &m.buyer, &json!([])),
        Call::post("/wallets", &m.buyer, &json!("EUR")),
        Call::post("/wallets", &m.buyer, &json!(null)),
        Call::post(
            &deposits,
            &m.admin,
            &with(movement(100, "EUR"), "amount.amount", json!("100")),
        ),
        Call::post(
            &deposits,
            &m.admin,
            &with(movement(100, "EUR"), "amount.amount", json!(19.99)),
        ),
        Call::post(
            &deposits,
            &m.admin,
            &with(movement(100, "EUR"), "amount.amount", json!(100.0)),
        ),
        Call::post(
            &deposits,
            &m.admin,
            &with(movement(100, "EUR"), "amount", json!("100 EUR")),
        ),
        Call::post(
            &deposits,
            &m.admin,
            &with(movement(100, "EUR"), "amount", json!(null)),
        ),
        Call::post(
            &deposits,
            &m.admin,
            &with(movement(100, "EUR"), "amount", json!([])),
        ),
        Call::post(
            &deposits,
            &m.admin,
            &with(movement(100, "EUR"), "amount.currency", json!(null)),
        ),
        Call::post(
            &withdrawals,
            &m.buyer,
            &with(movement(100, "EUR"), "reference", json!(42)),
        ),
        Call::post(
            &withdrawals,
            &m.buyer,
            &with(movement(100, "EUR"), "reference", json!(null)),
        ),
        Call::post(
            "/listings",
            &m.seller,
            &with(listing.clone(), "title", json!(null)),
        ),
        Call::post(
            "/listings",
            &m.seller,
            &with(listing.clone(), "quantity", json!(-1)),
        ),
        Call::post(
            "/listings",
            &m.seller,
            &with(listing.clone(), "quantity", json!("3")),
        ),
        Call::post(
            "/listings",
            &m.seller,
            &with(listing.clone(), "quantity", json!(4_294_967_296_u64)),
        ),
        Call::post(
            "/listings",
            &m.seller,
            &with(listing.clone(), "price.amount", json!(12.5)),
        ),
        Call::post(
            "/listings",
            &m.seller,
            &with(listing.clone(), "price", json!(1_000)),
        ),
        Call::post(
            "/listings",
            &m.seller,
            &with(listing.clone(), "attributes", json!(["colour", "brass"])),
        ),
        Call::post(
            "/listings",
            &m.seller,
            &with(
                listing.clone(),
                "images",
                json!("https://img.example/a.jpg"),
            ),
        ),
        Call::post(
            "/listings",
            &m.seller,
            &with(listing.clone(), "location", json!(null)),
        ),
        Call::post(
            "/listings",
            &m.seller,
            &with(listing.clone(), "location.lat", json!("45.7")),
        ),
        Call::post(
            "/listings",
            &m.seller,
            &with(listing.clone(), "product_id", json!("not-a-uuid")),
        ),
        Call::post(&price, &m.seller, &json!({"price": 2_000})),
        Call::post(&price, &m.seller, &json!({"price": [2_000]})),
        Call::post(&details, &m.seller, &json!({"title": 7})),
        Call::post(&details, &m.seller, &json!({"images": [1, 2]})),
        Call::post(&stock, &m.seller, &json!({"quantity": "5"})),
        Call::post(&stock, &m.seller, &json!({"quantity": 2.5})),
        Call::post(&stock, &m.seller, &json!({"quantity": -2})),
        Call::post(
            &reservations,
            &m.buyer,
            &json!({"quantity": 1, "ttl_seconds": "600"}),
        ),
        Call::post(
            "/orders",
            &m.buyer,
            &with(
                checkout.clone(),
                "lines",
                json!({"listing_id": m.listing, "quantity": 1}),
            ),
        ),
        Call::post(
            "/orders",
            &m.buyer,
            &with(
                checkout.clone(),
                "lines",
                json!([{"listing_id": "lamp", "quantity": 1}]),
            ),
        ),
        Call::post(
            "/orders",
            &m.buyer,
            &with(checkout.clone(), "shipping_address", json!("1 rue X, Lyon")),
        ),
        Call::post(
            "/orders",
            &m.buyer,
            &with(checkout.clone(), "payment_method", json!(null)),
        ),
        Call::post(
            "/orders",
            &m.buyer,
            &with(checkout.clone(), "wallet_id", json!(5)),
        ),
        Call::post(
            &ship,
            &m.seller,
            &with(ship_body(), "carrier", json!(["La Poste"])),
        ),
        Call::post(&review, &m.buyer, &json!({"rating": "5"})),
        Call::post(&review, &m.buyer, &json!({"rating": 4.5})),
        Call::post(&review, &m.buyer, &json!({"rating": true})),
        Call::post(
            &stories,
            &m.seller,
            &with(story_body(), "media", json!("https://img.example/a.jpg")),
        ),
    ];
    for call in cases {
        probe.refused(call, 422, "invalid_body").await;
    }
    // Numbers in exponent form are floats, even when whole.
    probe
        .refused(
            Call::post_bytes(
                format!("/wallets/{}/deposits", m.buyer_wallet),
                &m.admin,
                r#"{"amount": {"amount": 1e3, "currency": "EUR"}, "reference": "r"}"#,
            ),
            422,
            "invalid_body",
        )
        .await;
}

#[tokio::test]
async fn an_array_is_not_accepted_in_place_of_an_object() {
    let probe = Probe::start().await;
    let m = Market::open(&probe).await;
    // JSON arrays read positionally into a struct's fields would make the
    // field names optional and the contract ambiguous.
    let cases = [
        Call::post("/wallets", &m.buyer, &json!(["EUR"])),
        Call::post(
            format!("/wallets/{}/deposits", m.buyer_wallet),
            &m.admin,
            &json!({"amount": [100, "EUR"], "reference": "bank 42"}),
        ),
        Call::post(
            format!("/wallets/{}/deposits", m.buyer_wallet),
            &m.admin,
            &json!([{"amount": 100, "currency": "EUR"}, "bank 42"]),
        ),
        Call::post(
            format!("/listings/{}/price", m.listing),
            &m.seller,
            &json!({"price": [2_000, "EUR"]}),
        ),
        Call::post(
            format!("/listings/{}/stock", m.listing),
            &m.seller,
            &json!([5]),
        ),
        Call::post(
            "/orders",
            &m.buyer,
            &with(
                checkout_body(&[m.listing], "cod", None),
                "lines",
                json!([[m.listing, 1]]),
            ),
        ),
        Call::post(
            format!("/orders/{}/ship", m.order),
            &m.seller,
            &json!(["La Poste", "LP1"]),
        ),
    ];
    probe.all_refused(cases.to_vec(), 422, "invalid_body").await;
}

#[tokio::test]
async fn unknown_fields_are_refused_with_422_invalid_body() {
    let probe = Probe::start().await;
    let m = Market::open(&probe).await;
    let other = User::new("seller");
    let cases = [
        // Fields that would set what the server decides.
        Call::post(
            "/wallets",
            &m.buyer,
            &json!({"currency": "EUR", "owner": other.id}),
        ),
        Call::post(
            format!("/wallets/{}/deposits", m.buyer_wallet),
            &m.admin,
            &with(movement(100, "EUR"), "available", json!(1_000_000)),
        ),
        Call::post(
            format!("/wallets/{}/withdrawals", m.buyer_wallet),
            &m.buyer,
            &with(movement(100, "EUR"), "amount.scale", json!(2)),
        ),
        Call::post(
            "/listings",
            &m.seller,
            &with(listing_body(1_000, 1, None), "seller_id", json!(other.id)),
        ),
        Call::post(
            "/listings",
            &m.seller,
            &with(listing_body(1_000, 1, None), "status", json!("sold_out")),
        ),
        Call::post(
            "/listings",
            &m.seller,
            &with(
                listing_body(1_000, 1, None),
                "location.region",
                json!("ARA"),
            ),
        ),
        Call::post(
            format!("/listings/{}/price", m.listing),
            &m.seller,
            &json!({"price": money(2_000, "EUR"), "old_price": money(1, "EUR")}),
        ),
        Call::post(
            format!("/listings/{}/details", m.listing),
            &m.seller,
            &json!({"title": "Lamp", "seller": other.id}),
        ),
        Call::post(
            format!("/listings/{}/stock", m.listing),
            &m.seller,
            &json!({"quantity": 5, "held": 0}),
        ),
        Call::post(
            format!("/listings/{}/reservations", m.listing),
            &m.buyer,
            &json!({"quantity": 1, "ttl_seconds": 600, "holder": other.id}),
        ),
        Call::post(
            "/orders",
            &m.buyer,
            &with(
                checkout_body(&[m.listing], "cod", None),
                "lines",
                json!([{"listing_id": m.listing, "quantity": 1, "unit_price": money(1, "EUR")}]),
            ),
        ),
        Call::post(
            "/orders",
            &m.buyer,
            &with(
                checkout_body(&[m.listing], "cod", None),
                "buyer_id",
                json!(other.id),
            ),
        ),
        Call::post(
            "/orders",
            &m.buyer,
            &with(
                checkout_body(&[m.listing], "cod", None),
                "shipping_address.phone",
                json!("+33 1 23 45 67 89"),
            ),
        ),
        Call::post(
            format!("/orders/{}/ship", m.order),
            &m.seller,
            &with(ship_body(), "shipped_at", json!("2020-01-01T00:00:00Z")),
        ),
        Call::post(
            format!("/orders/{}/review", m.order),
            &m.buyer,
            &json!({"rating": 5, "seller_id": other.id}),
        ),
        Call::post(
            format!("/products/{}/stories", m.product),
            &m.seller,
            &with(story_body(), "author", json!(other.id)),
        ),
    ];
    for call in cases {
        probe.refused(call, 422, "invalid_body").await;
    }
    // A field given twice is ambiguous, whichever value would win.
    let deposits = format!("/wallets/{}/deposits", m.buyer_wallet);
    for (path, user, body) in [
        (
            "/wallets",
            &m.buyer,
            r#"{"currency": "EUR", "currency": "USD"}"#,
        ),
        (
            deposits.as_str(),
            &m.admin,
            r#"{"amount": {"amount": 1, "currency": "EUR"}, "amount": {"amount": 900000, "currency": "EUR"}, "reference": "r"}"#,
        ),
        (
            deposits.as_str(),
            &m.admin,
            r#"{"amount": {"amount": 1, "amount": 900000, "currency": "EUR"}, "reference": "r"}"#,
        ),
    ] {
        probe
            .refused(Call::post_bytes(path, user, body), 422, "invalid_body")
            .await;
    }
}

#[tokio::test]
async fn missing_fields_are_refused_with_422_invalid_body() {
    let probe = Probe::start().await;
    let m = Market::open(&probe).await;
    let checkout = checkout_body(&[m.listing], "cod", None);
    let cases = [
        Call::post("/wallets", &m.buyer, &json!({})),
        Call::post(
            format!("/wallets/{}/deposits", m.buyer_wallet),
            &m.admin,
            &without(movement(100, "EUR"), "reference"),
        ),
        Call::post(
            format!("/wallets/{}/deposits", m.buyer_wallet),
            &m.admin,
            &without(movement(100, "EUR"), "amount.currency"),
        ),
        Call::post(
            format!("/wallets/{}/withdrawals", m.buyer_wallet),
            &m.buyer,
            &without(movement(100, "EUR"), "amount"),
        ),
        Call::post(
            "/listings",
            &m.seller,
            &without(listing_body(1_000, 1, None), "title"),
        ),
        Call::post(
            "/listings",
            &m.seller,
            &without(listing_body(1_000, 1, None), "price"),
        ),
        Call::post(
            "/listings",
            &m.seller,
            &without(listing_body(1_000, 1, None), "quantity"),
        ),
        Call::post(
            "/listings",
            &m.seller,
            &without(listing_body(1_000, 1, None), "location.country"),
        ),
        Call::post(
            format!("/listings/{}/price", m.listing),
            &m.seller,
            &json!({}),
        ),
        Call::post(
            format!("/listings/{}/stock", m.listing),
            &m.seller,
            &json!({}),
        ),
        Call::post(
            format!("/listings/{}/reservations", m.listing),
            &m.buyer,
            &json!({"quantity": 1}),
        ),
        Call::post("/orders", &m.buyer, &without(checkout.clone(), "lines")),
        Call::post(
            "/orders",
            &m.buyer,
            &without(checkout.clone(), "shipping_address"),
        ),
        Call::post(
            "/orders",
            &m.buyer,
            &without(checkout.clone(), "shipping_address.postal_code"),
        ),
        Call::post(
            "/orders",
            &m.buyer,
            &with(
                checkout.clone(),
                "lines",
                json!([{"listing_id": m.listing}]),
            ),
        ),
        Call::post(
            format!("/orders/{}/ship", m.order),
            &m.seller,
            &without(ship_body(), "tracking_number"),
        ),
        Call::post(
            format!("/orders/{}/review", m.order),
            &m.buyer,
            &json!({"comment": "fine"}),
        ),
        Call::post(
            format!("/products/{}/stories", m.product),
            &m.seller,
            &without(story_body(), "body"),
        ),
    ];
    for call in cases {
        probe.refused(call, 422, "invalid_body").await;
    }
}

#[tokio::test]
async fn amounts_that_are_not_positive_or_too_large_are_refused() {
    let probe = Probe::start().await;
    let m = Market::open(&probe).await;
    let deposits = format!("/wallets/{}/deposits", m.buyer_wallet);
    let withdrawals = format!("/wallets/{}/withdrawals", m.buyer_wallet);
    let price = format!("/listings/{}/price", m.listing);
    // In range for i64 but not a positive amount up to 10^15: the value's
    // rule (`invalid_amount`). Beyond i64: the body's shape (`invalid_body`).
    let amounts = [
        (json!(0), "invalid_amount"),
        (json!(-5), "invalid_amount"),
        (json!(i64::MIN), "invalid_amount"),
        (json!(1_000_000_000_000_001_i64), "invalid_amount"),
        (json!(i64::MAX), "invalid_amount"),
        (json!(9_223_372_036_854_775_808_u64), "invalid_body"),
        (json!(u64::MAX), "invalid_body"),
    ];
    for (amount, code) in amounts {
        let movement = with(movement(100, "EUR"), "amount.amount", amount.clone());
        let cases = [
            Call::post(&deposits, &m.admin, &movement),
            Call::post(&withdrawals, &m.buyer, &movement),
            Call::post(
                "/listings",
                &m.seller,
                &with(listing_body(1_000, 1, None), "price.amount", amount.clone()),
            ),
            Call::post(
                &price,
                &m.seller,
                &json!({"price": {"amount": amount, "currency": "EUR"}}),
            ),
        ];
        for call in cases {
            let answer = probe.refused(call, 422, code).await;
            assert!(["invalid_amount", "invalid_body"].contains(&answer.code()));
        }
    }
    // Below i64::MIN, the number is read as a float: the wrong type.
    probe
        .refused(
            Call::post_bytes(
                &deposits,
                &m.admin,
                r#"{"amount": {"amount": -9223372036854775809, "currency": "EUR"}, "reference": "r"}"#,
            ),
            422,
            "invalid_body",
        )
        .await;
    // The largest amount is accepted once; a balance past it is refused.
    let wallet = probe.app.funded_wallet(&m.buyer, "EUR", 0).await;
    let deposits = format!("/wallets/{wallet}/deposits");
    probe
        .accepted(Call::post(
            &deposits,
            &m.admin,
            &movement(1_000_000_000_000_000, "EUR"),
        ))
        .await;
    probe
        .refused(
            Call::post(&deposits, &m.admin, &movement(1, "EUR")),
            422,
            "amount_too_large",
        )
        .await;
}

#[tokio::test]
async fn unknown_currencies_and_currency_mismatches_are_refused_with_422() {
    let probe = Probe::start().await;
    let m = Market::open(&probe).await;
    for currency in ["XYZ", "eur", "", "EURO", "€"] {
        let cases = [
            Call::post("/wallets", &m.buyer, &json!({"currency": currency})),
            Call::post(
                format!("/wallets/{}/deposits", m.buyer_wallet),
                &m.admin,
                &movement(100, currency),
            ),
            Call::post(
                format!("/wallets/{}/withdrawals", m.buyer_wallet),
                &m.buyer,
                &movement(100, currency),
            ),
            Call::post(
                "/listings",
                &m.seller,
                &with(
                    listing_body(1_000, 1, None),
                    "price.currency",
                    json!(currency),
                ),
            ),
            Call::post(
                format!("/listings/{}/price", m.listing),
                &m.seller,
                &json!({"price": money(2_000, currency)}),
            ),
        ];
        for call in cases {
            probe.refused(call, 422, "invalid_currency").await;
        }
    }
    let cases = [
        // USD into a EUR wallet, and out of it.
        Call::post(
            format!("/wallets/{}/deposits", m.buyer_wallet),
            &m.admin,
            &movement(100, "USD"),
        ),
        Call::post(
            format!("/wallets/{}/withdrawals", m.buyer_wallet),
            &m.buyer,
            &movement(100, "USD"),
        ),
        // A EUR listing repriced in USD.
        Call::post(
            format!("/listings/{}/price", m.listing),
            &m.seller,
            &json!({"price": money(2_000, "USD")}),
        ),
        // A USD price paid out into a EUR wallet.
        Call::post(
            "/listings",
            &m.seller,
            &with(
                listing_body(1_000, 1, Some(m.seller_wallet)),
                "price.currency",
                json!("USD"),
            ),
        ),
    ];
    for call in cases {
        probe.refused(call, 422, "currency_mismatch").await;
    }
}

#[tokio::test]
async fn text_too_long_too_short_or_with_control_characters_is_refused() {
    let probe = Probe::start().await;
    let m = Market::open(&probe).await;
    let listing = listing_body(1_000, 1, None);
    let deposits = format!("/wallets/{}/deposits", m.buyer_wallet);
    let details = format!("/listings/{}/details", m.listing);
    let ship = format!("/orders/{}/ship", m.order);
    let stories = format!("/products/{}/stories", m.product);
    let long = |n: usize| json!("x".repeat(n));
    let cases = [
        (
            Call::post(
                "/listings",
                &m.seller,
                &with(listing.clone(), "title", long(201)),
            ),
            "too_long",
        ),
        (
            Call::post(
                "/listings",
                &m.seller,
                &with(listing.clone(), "title", json!("é".repeat(201))),
            ),
            "too_long",
        ),
        (
            Call::post(
                "/listings",
                &m.seller,
                &with(listing.clone(), "description", long(5_001)),
            ),
            "too_long",
        ),
        (
            Call::post(
                "/listings",
                &m.seller,
                &with(listing.clone(), "category", long(65)),
            ),
            "too_long",
        ),
        (
            Call::post(
                "/listings",
                &m.seller,
                &with(listing.clone(), "location.city", long(65)),
            ),
            "too_long",
        ),
        (
            Call::post(
                "/listings",
                &m.seller,
                &with(listing.clone(), "attributes.colour", long(501)),
            ),
            "too_long",
        ),
        (
            Call::post(
                "/listings",
                &m.seller,
                &with(listing.clone(), "title", json!("")),
            ),
            "too_short",
        ),
        (
            Call::post(
                "/listings",
                &m.seller,
                &with(listing.clone(), "title", json!("  \n ")),
            ),
            "too_short",
        ),
        (
            Call::post(
                "/listings",
                &m.seller,
                &with(listing.clone(), "category", json!("")),
            ),
            "too_short",
        ),
        (
            Call::post(
                "/listings",
                &m.seller,
                &with(listing.clone(), "title", json!("lamp\u{0}")),
            ),
            "invalid_text",
        ),
        (
            Call::post(
                "/listings",
                &m.seller,
                &with(listing.clone(), "title", json!("lamp \u{7} bell")),
            ),
            "invalid_text",
        ),
        (
            Call::post(
                "/listings",
                &m.seller,
                &with(listing.clone(), "description", json!("red \u{1b}[31m text")),
            ),
            "invalid_text",
        ),
        (
            Call::post(
                &deposits,
                &m.admin,
                &with(movement(1, "EUR"), "reference", long(129)),
            ),
            "too_long",
        ),
        (
            Call::post(
                &deposits,
                &m.admin,
                &with(movement(1, "EUR"), "reference", json!("")),
            ),
            "too_short",
        ),
        (
            Call::post(
                &deposits,
                &m.admin,
                &with(movement(1, "EUR"), "reference", json!("a\u{8}b")),
            ),
            "invalid_text",
        ),
        (
            Call::post(&details, &m.seller, &json!({"title": "x".repeat(201)})),
            "too_long",
        ),
        (
            Call::post(
                &details,
                &m.seller,
                &json!({"description": "x".repeat(5_001)}),
            ),
            "too_long",
        ),
        (
            Call::post(&details, &m.seller, &json!({"title": ""})),
            "too_short",
        ),
        (
            Call::post(
                &ship,
                &m.seller,
                &with(ship_body(), "tracking_number", long(65)),
            ),
            "too_long",
        ),
        (
            Call::post(&ship, &m.seller, &with(ship_body(), "carrier", json!(""))),
            "too_short",
        ),
        (
            Call::post(
                &ship,
                &m.seller,
                &with(ship_body(), "tracking_number", json!("LP\u{7f}1")),
            ),
            "invalid_text",
        ),
        (
            Call::post(
                format!("/orders/{}/review", m.order),
                &m.buyer,
                &json!({"rating": 5, "comment": "x".repeat(2_001)}),
            ),
            "too_long",
        ),
        (
            Call::post(
                "/orders",
                &m.buyer,
                &with(
                    checkout_body(&[m.listing], "cod", None),
                    "shipping_address.name",
                    long(65),
                ),
            ),
            "too_long",
        ),
        (
            Call::post(&stories, &m.seller, &with(story_body(), "title", long(201))),
            "too_long",
        ),
        (
            Call::post(
                &stories,
                &m.seller,
                &with(story_body(), "body", long(10_001)),
            ),
            "too_long",
        ),
        (
            Call::post(&stories, &m.seller, &with(story_body(), "body", json!(""))),
            "too_short",
        ),
    ];
    for (call, code) in cases {
        probe.refused(call, 422, code).await;
    }
    // Limits count characters, not bytes, and are inclusive.
    probe
        .accepted(Call::post(
            &details,
            &m.seller,
            &json!({"title": "é".repeat(200)}),
        ))
        .await;
    probe
        .accepted(Call::post(
            &details,
            &m.seller,
            &json!({"description": "x".repeat(5_000)}),
        ))
        .await;
}

#[tokio::test]
async fn lists_longer_than_their_limit_are_refused_with_too_many() {
    let probe = Probe::start().await;
    let m = Market::open(&probe).await;
    let attributes: serde_json::Map<String, Value> = (0..51)
        .map(|n| (format!("attribute_{n}"), json!(n)))
        .collect();
    let lines: Vec<Value> = (0..51)
        .map(|_| json!({"listing_id": Uuid::now_v7(), "quantity": 1}))
        .collect();
    let cases = [
        Call::post(
            "/listings",
            &m.seller,
            &with(listing_body(1_000, 1, None), "images", json!(urls(21))),
        ),
        Call::post(
            "/listings",
            &m.seller,
            &with(
                listing_body(1_000, 1, None),
                "attributes",
                json!(attributes),
            ),
        ),
        Call::post(
            format!("/listings/{}/details", m.listing),
            &m.seller,
            &json!({"images": urls(21)}),
        ),
        Call::post(
            format!("/listings/{}/details", m.listing),
            &m.seller,
            &json!({"attributes": attributes}),
        ),
        Call::post(
            "/orders",
            &m.buyer,
            &with(
                checkout_body(&[m.listing], "cod", None),
                "lines",
                json!(lines),
            ),
        ),
        Call::post(
            format!("/products/{}/stories", m.product),
            &m.seller,
            &with(story_body(), "media", json!(urls(11))),
        ),
    ];
    for call in cases {
        probe.refused(call, 422, "too_many").await;
    }
    probe
        .refused(
            Call::post(
                "/orders",
                &m.buyer,
                &with(checkout_body(&[], "cod", None), "lines", json!([])),
            ),
            422,
            "too_short",
        )
        .await;
    // The limits themselves are accepted.
    probe
        .accepted(Call::post(
            format!("/listings/{}/details", m.listing),
            &m.seller,
            &json!({"images": urls(20)}),
        ))
        .await;
    probe
        .accepted(Call::post(
            format!("/products/{}/stories", m.product),
            &m.seller,
            &with(story_body(), "media", json!(urls(10))),
        ))
        .await;
}

#[tokio::test]
async fn values_outside_their_enumeration_are_refused_with_their_code() {
    let probe = Probe::start().await;
    let m = Market::open(&probe).await;
    let review = format!("/orders/{}/review", m.order);
    let mut cases = vec![
        (
            Call::post(
                "/listings",
                &m.seller,
                &with(listing_body(1_000, 1, None), "condition", json!("mint")),
            ),
            "invalid_condition",
        ),
        (
            Call::post(
                "/listings",
                &m.seller,
                &with(listing_body(1_000, 1, None), "condition", json!("Good")),
            ),
            "invalid_condition",
        ),
        (
            Call::post(
                format!("/listings/{}/details", m.listing),
                &m.seller,
                &json!({"condition": "mint"}),
            ),
            "invalid_condition",
        ),
        (
            Call::post(
                "/orders",
                &m.buyer,
                &checkout_body(&[m.listing], "bitcoin", None),
            ),
            "invalid_payment_method",
        ),
        (
            Call::post(
                "/orders",
                &m.buyer,
                &checkout_body(&[m.listing], "COD", None),
            ),
            "invalid_payment_method",
        ),
    ];
    for rating in [6, 0, -1, 300] {
        cases.push((
            Call::post(
                &review,
                &m.buyer,
                &json!({"rating": rating, "comment": "ok"}),
            ),
            "invalid_rating",
        ));
    }
    for (call, code) in cases {
        probe.refused(call, 422, code).await;
    }
}

#[tokio::test]
async fn bad_urls_countries_and_coordinates_are_refused() {
    let probe = Probe::start().await;
    let m = Market::open(&probe).await;
    let mut cases = Vec::new();
    for url in [
        "javascript:alert(1)",
        "data:text/html,<script>alert(1)</script>",
        "ftp://img.example/a.jpg",
        "https://",
        "https:///a.jpg",
        "https://img.example/a b.jpg",
        "//img.example/a.jpg",
        "lamp.jpg",
    ] {
        cases.push((
            Call::post(
                "/listings",
                &m.seller,
                &with(listing_body(1_000, 1, None), "images", json!([url])),
            ),
            "invalid_url",
        ));
        cases.push((
            Call::post(
                format!("/products/{}/stories", m.product),
                &m.seller,
                &with(story_body(), "media", json!([url])),
            ),
            "invalid_url",
        ));
    }
    for country in ["France", "fr", "F", "FRA", ""] {
        cases.push((
            Call::post(
                "/listings",
                &m.seller,
                &with(
                    listing_body(1_000, 1, None),
                    "location.country",
                    json!(country),
                ),
            ),
            "invalid_country",
        ));
        cases.push((
            Call::post(
                "/orders",
                &m.buyer,
                &with(
                    checkout_body(&[m.listing], "cod", None),
                    "shipping_address.country",
                    json!(country),
                ),
            ),
            "invalid_country",
        ));
    }
    cases.push((
        Call::post(
            format!("/listings/{}/details", m.listing),
            &m.seller,
            &json!({"location": {"city": "Lyon", "country": "France"}}),
        ),
        "invalid_country",
    ));
    for location in [
        json!({"city": "Lyon", "country": "FR", "lat": 45.76}),
        json!({"city": "Lyon", "country": "FR", "lat": 91.0, "lon": 4.83}),
        json!({"city": "Lyon", "country": "FR", "lat": 45.76, "lon": -180.5}),
    ] {
        cases.push((
            Call::post(
                "/listings",
                &m.seller,
                &with(listing_body(1_000, 1, None), "location", location),
            ),
            "invalid_coordinates",
        ));
    }
    for (call, code) in cases {
        probe.refused(call, 422, code).await;
    }
}

#[tokio::test]
async fn a_body_over_64_kib_is_refused_with_413() {
    let probe = Probe::start().await;
    let m = Market::open(&probe).await;
    let huge = "x".repeat(70 * 1024);
    let cases = [
        Call::post(
            "/listings",
            &m.seller,
            &with(listing_body(1_000, 1, None), "description", json!(huge)),
        ),
        Call::post(
            format!("/wallets/{}/deposits", m.buyer_wallet),
            &m.admin,
            &with(movement(1, "EUR"), "reference", json!(huge)),
        ),
        Call::post(
            format!("/products/{}/stories", m.product),
            &m.seller,
            &with(story_body(), "body", json!(huge)),
        ),
        // Not even JSON: the size is checked first.
        Call::post_bytes("/wallets", &m.buyer, huge.clone()),
    ];
    for call in cases {
        probe.refused(call, 413, "payload_too_large").await;
    }
    // Just under the limit, the body is read and its rules apply.
    probe
        .refused(
            Call::post(
                "/listings",
                &m.seller,
                &with(
                    listing_body(1_000, 1, None),
                    "description",
                    json!("x".repeat(60 * 1024)),
                ),
            ),
            422,
            "too_long",
        )
        .await;
}

#[tokio::test]
async fn invalid_ids_in_paths_and_invalid_idempotency_keys_are_refused_with_400() {
    let probe = Probe::start().await;
    let m = Market::open(&probe).await;
    let bodies = [
        ("/wallets/{}/deposits", &m.admin, movement(100, "EUR")),
        ("/wallets/{}/withdrawals", &m.buyer, movement(100, "EUR")),
        (
            "/listings/{}/price",
            &m.seller,
            json!({"price": money(2_000, "EUR")}),
        ),
        ("/listings/{}/details", &m.seller, json!({"title": "Lamp"})),
        ("/listings/{}/stock", &m.seller, json!({"quantity": 5})),
        (
            "/listings/{}/reservations",
            &m.buyer,
            json!({"quantity": 1, "ttl_seconds": 600}),
        ),
        ("/orders/{}/ship", &m.seller, ship_body()),
        ("/orders/{}/review", &m.buyer, json!({"rating": 5})),
        ("/products/{}/stories", &m.seller, story_body()),
    ];
    for (route, user, body) in &bodies {
        for id in [
            "not-a-uuid",
            "123",
            "00000000-0000-0000-0000-00000000000g",
            "%27%20OR%201=1",
        ] {
            let path = route.replace("{}", id);
            probe
                .refused(Call::post(&path, user, body), 400, "invalid_id")
                .await;
        }
    }
    for path in [
        format!("/products/{}/customizations/not-a-uuid/accept", m.product),
        format!(
            "/products/not-a-uuid/customizations/{}/accept",
            Uuid::now_v7()
        ),
    ] {
        probe
            .refused(Call::post_empty(&path, &m.buyer), 400, "invalid_id")
            .await;
    }

    let deposit = Call::post(
        format!("/wallets/{}/deposits", m.buyer_wallet),
        &m.admin,
        &movement(100, "EUR"),
    );
    for key in [
        "k".repeat(300),
        "k".repeat(256),
        "has a space".to_owned(),
        "tab\there".to_owned(),
        String::new(),
    ] {
        probe
            .refused(
                deposit.clone().idempotency_key(key),
                400,
                "invalid_idempotency_key",
            )
            .await;
    }
    // A bad key is refused before anything else is looked at.
    probe
        .refused(
            Call::post_bytes("/wallets/not-a-uuid/deposits", &m.admin, "{")
                .idempotency_key("has a space"),
            400,
            "invalid_idempotency_key",
        )
        .await;
    // The longest key is accepted.
    probe
        .accepted(deposit.clone().idempotency_key("k".repeat(255)))
        .await;
}

#[tokio::test]
async fn unknown_routes_answer_404_and_wrong_methods_405() {
    let probe = Probe::start().await;
    let m = Market::open(&probe).await;
    let token = format!("Bearer {}", m.buyer.token);
    for (method, path) in [
        (Method::POST, "/nope".to_owned()),
        (Method::POST, "/wallet".to_owned()),
        (Method::POST, format!("/wallets/{}", m.buyer_wallet)),
        (
            Method::POST,
            format!("/wallets/{}/transfers", m.buyer_wallet),
        ),
        (Method::DELETE, format!("/listings/{}", m.listing)),
        (Method::GET, "/".to_owned()),
    ] {
        for call in [
            Call::new(method.clone(), &path),
            Call::new(method.clone(), &path).authorization(&token),
        ] {
            probe.refused(call, 404, "not_found").await;
        }
    }
    for (method, path) in [
        (Method::GET, "/wallets".to_owned()),
        (Method::PUT, "/wallets".to_owned()),
        (Method::GET, format!("/wallets/{}/deposits", m.buyer_wallet)),
        (Method::DELETE, format!("/listings/{}/price", m.listing)),
        (Method::PATCH, format!("/orders/{}/ship", m.order)),
        (Method::GET, "/orders".to_owned()),
        (Method::POST, "/health".to_owned()),
    ] {
        for call in [
            Call::new(method.clone(), &path),
            Call::new(method.clone(), &path).authorization(&token),
        ] {
            probe.refused(call, 405, "method_not_allowed").await;
        }
    }
}

#[tokio::test]
async fn commands_on_aggregates_that_do_not_exist_answer_404() {
    let probe = Probe::start().await;
    let m = Market::open(&probe).await;
    let nowhere = Uuid::now_v7();
    let cases = [
        (
            Call::post(
                format!("/wallets/{nowhere}/deposits"),
                &m.admin,
                &movement(100, "EUR"),
            ),
            "wallet_not_found",
        ),
        (
            Call::post(
                format!("/wallets/{nowhere}/withdrawals"),
                &m.buyer,
                &movement(100, "EUR"),
            ),
            "wallet_not_found",
        ),
        (
            Call::post(
                "/listings",
                &m.seller,
                &listing_body(1_000, 1, Some(nowhere)),
            ),
            "wallet_not_found",
        ),
        (
            Call::post(
                format!("/listings/{nowhere}/reservations"),
                &m.buyer,
                &json!({"quantity": 1, "ttl_seconds": 600}),
            ),
            "listing_not_found",
        ),
        (
            Call::post(
                format!("/listings/{nowhere}/price"),
                &m.seller,
                &json!({"price": money(2_000, "EUR")}),
            ),
            "listing_not_found",
        ),
        (
            Call::post(
                format!("/listings/{nowhere}/details"),
                &m.seller,
                &json!({"title": "Lamp"}),
            ),
            "listing_not_found",
        ),
        (
            Call::post_empty(format!("/listings/{nowhere}/delete"), &m.seller),
            "listing_not_found",
        ),
        (
            Call::post_empty(format!("/listings/{nowhere}/pause"), &m.seller),
            "listing_not_found",
        ),
        (
            Call::post("/orders", &m.buyer, &checkout_body(&[nowhere], "cod", None)),
            "listing_not_found",
        ),
        (
            Call::post(
                "/orders",
                &m.buyer,
                &checkout_body(&[m.listing], "wallet_escrow", Some(nowhere)),
            ),
            "wallet_not_found",
        ),
        (
            Call::post(format!("/orders/{nowhere}/ship"), &m.seller, &ship_body()),
            "order_not_found",
        ),
        (
            Call::post_empty(format!("/orders/{nowhere}/deliver"), &m.buyer),
            "order_not_found",
        ),
        (
            Call::post(
                format!("/orders/{nowhere}/review"),
                &m.buyer,
                &json!({"rating": 5}),
            ),
            "order_not_found",
        ),
        (
            Call::post(
                format!("/orders/{nowhere}/cancel"),
                &m.buyer,
                &json!({"reason": "changed my mind"}),
            ),
            "order_not_found",
        ),
        (
            Call::post(
                format!("/products/{nowhere}/stories"),
                &m.seller,
                &story_body(),
            ),
            "timeline_not_found",
        ),
    ];
    for (call, code) in cases {
        probe.refused(call, 404, code).await;
    }
}

#[tokio::test]
async fn setting_the_stock_of_a_listing_that_does_not_exist_answers_listing_not_found() {
    let probe = Probe::start().await;
    let m = Market::open(&probe).await;
    // Every other `/listings/{id}/...` route answers `listing_not_found`;
    // the stock pool is how Souk keeps a listing's stock, not a resource
    // clients address.
    probe
        .refused(
            Call::post(
                format!("/listings/{}/stock", Uuid::now_v7()),
                &m.seller,
                &json!({"quantity": 5}),
            ),
            404,
            "listing_not_found",
        )
        .await;
}

#[tokio::test]
async fn illegal_transitions_answer_409() {
    let probe = Probe::start().await;
    let m = Market::open(&probe).await;
    let order = |step: &str| format!("/orders/{}/{step}", m.order);
    // The order is confirmed (cash on delivery), not shipped.
    probe
        .refused(
            Call::post_empty(order("deliver"), &m.buyer),
            409,
            "illegal_transition",
        )
        .await;
    probe
        .refused(
            Call::post(order("review"), &m.buyer, &json!({"rating": 5})),
            409,
            "illegal_transition",
        )
        .await;
    probe
        .refused(
            Call::post(order("return"), &m.buyer, &json!({"reason": "broken"})),
            409,
            "illegal_transition",
        )
        .await;
    probe
        .accepted(Call::post(order("ship"), &m.seller, &ship_body()))
        .await;
    probe
        .refused(
            Call::post(order("ship"), &m.seller, &ship_body()),
            409,
            "illegal_transition",
        )
        .await;
    probe
        .refused(
            Call::post(order("cancel"), &m.buyer, &json!({"reason": "too late"})),
            409,
            "illegal_transition",
        )
        .await;
    probe
        .accepted(Call::post_empty(order("deliver"), &m.buyer))
        .await;
    probe
        .accepted(Call::post(order("review"), &m.buyer, &json!({"rating": 4})))
        .await;
    probe
        .refused(
            Call::post(order("review"), &m.buyer, &json!({"rating": 5})),
            409,
            "already_reviewed",
        )
        .await;

    // A deleted listing takes no more changes and no more buyers.
    let listing = |step: &str| format!("/listings/{}/{step}", m.listing);
    probe
        .refused(
            Call::post_empty(listing("resume"), &m.seller),
            409,
            "illegal_transition",
        )
        .await;
    probe
        .accepted(Call::post_empty(listing("delete"), &m.seller))
        .await;
    let cases = [
        (
            Call::post(
                listing("price"),
                &m.seller,
                &json!({"price": money(1_999, "EUR")}),
            ),
            "listing_deleted",
        ),
        (
            Call::post(listing("details"), &m.seller, &json!({"title": "Lamp"})),
            "listing_deleted",
        ),
        (
            Call::post_empty(listing("delete"), &m.seller),
            "listing_deleted",
        ),
        (
            Call::post_empty(listing("pause"), &m.seller),
            "listing_deleted",
        ),
        (
            Call::post(
                listing("reservations"),
                &m.buyer,
                &json!({"quantity": 1, "ttl_seconds": 600}),
            ),
            "listing_unavailable",
        ),
        (
            Call::post(
                "/orders",
                &m.buyer,
                &checkout_body(&[m.listing], "cod", None),
            ),
            "listing_unavailable",
        ),
    ];
    for (call, code) in cases {
        probe.refused(call, 409, code).await;
    }
}

#[tokio::test]
async fn short_funds_and_short_stock_answer_409() {
    let probe = Probe::start().await;
    let m = Market::open(&probe).await;
    let withdrawals = format!("/wallets/{}/withdrawals", m.buyer_wallet);
    probe
        .refused(
            Call::post(&withdrawals, &m.buyer, &movement(10_001, "EUR")),
            409,
            "insufficient_funds",
        )
        .await;
    probe
        .accepted(Call::post(&withdrawals, &m.buyer, &movement(10_000, "EUR")))
        .await;
    probe
        .refused(
            Call::post(&withdrawals, &m.buyer, &movement(1, "EUR")),
            409,
            "insufficient_funds",
        )
        .await;

    // Three in stock, one held by the order: two left.
    let reservations = format!("/listings/{}/reservations", m.listing);
    let buyer = User::new("buyer");
    probe
        .refused(
            Call::post(
                &reservations,
                &buyer,
                &json!({"quantity": 3, "ttl_seconds": 600}),
            ),
            409,
            "insufficient_stock",
        )
        .await;
    probe
        .accepted(Call::post(
            &reservations,
            &buyer,
            &json!({"quantity": 2, "ttl_seconds": 600}),
        ))
        .await;
    probe
        .refused(
            Call::post(
                &reservations,
                &buyer,
                &json!({"quantity": 1, "ttl_seconds": 600}),
            ),
            409,
            "insufficient_stock",
        )
        .await;
    probe
        .refused(
            Call::post(
                format!("/listings/{}/stock", m.listing),
                &m.seller,
                &json!({"quantity": 2}),
            ),
            409,
            "stock_below_held",
        )
        .await;
}
