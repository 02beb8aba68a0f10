//! Who may send which command: a request without a token that verifies is
//! 401 `unauthorized`, a verified user without the right is 403
//! `forbidden`, and neither writes anything. Health, metrics and the OpenAPI
//! document are open.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::Method;
use serde_json::{Value, json};
use tests::User;
use uuid::Uuid;

use crate::bad_input::{Call, Market, Probe, checkout_body, listing_body, money, movement};

/// Base64url without padding, for hand-made tokens.
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (u32::from(b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// Claims that would be valid for five more minutes.
fn claims(sub: &str, role: &str) -> Value {
    let now = chrono::Utc::now().timestamp();
    json!({"sub": sub, "role": role, "iat": now, "exp": now + 300})
}

/// An RS256 token with exactly `claims`, signed with the test key.
fn signed(claims: &Value) -> String {
    let key = EncodingKey::from_rsa_pem(&tests::keys().private_pem).expect("the test key");
    jsonwebtoken::encode(&Header::new(Algorithm::RS256), claims, &key).expect("signing")
}

/// A token of `role` signed by a key pair the API does not know.
fn signed_by_another_key(role: &str) -> String {
    let dir = std::env::temp_dir().join(format!("souk-other-key-{}", Uuid::now_v7()));
    let private_path = dir.join("jwt-private.pem");
    identity::generate_dev_key_pair(&private_path, &dir.join("jwt-public.pem"))
        .expect("generating another key pair");
    let private_pem = std::fs::read(&private_path).expect("reading the other key");
    let _ = std::fs::remove_dir_all(&dir);
    identity::mint_token(
        &private_pem,
        Uuid::now_v7(),
        role,
        chrono::Duration::hours(1),
        None,
        None,
    )
    .expect("minting with the other key")
}

/// Authorization headers that prove nothing, each with its name. The forged
/// ones claim `role`.
fn bad_authorizations(role: &str) -> Vec<(&'static str, String)> {
    let sub = Uuid::now_v7().to_string();
    let valid = User::new("buyer").token;
    let expired = identity::mint_token(
        &tests::keys().private_pem,
        Uuid::now_v7(),
        role,
        chrono::Duration::seconds(-120),
        None,
        None,
    )
    .expect("minting an expired token");
    let none_header = base64url(br#"{"alg":"none","typ":"JWT"}"#);
    let none_claims = base64url(claims(&sub, role).to_string().as_bytes());
    let valid_signature = valid.rsplit('.').next().unwrap_or_default().to_owned();
    let public_pem = std::fs::read(&tests::keys().public_path).expect("reading the public key");
    let hs256 = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(&sub, role),
        &EncodingKey::from_secret(&public_pem),
    )
    .expect("signing with HS256");
    // A valid token whose claims were swapped for others.
    let tampered = {
        let parts: Vec<&str> = valid.split('.').collect();
        format!(
            "{}.{}.{}",
            parts[0],
            base64url(claims(&sub, role).to_string().as_bytes()),
            parts[2]
        )
    };
    let now = chrono::Utc::now().timestamp();
    vec![
        ("basic scheme", "Basic dXNlcjpwYXNzd29yZA==".to_owned()),
        ("valid token, basic scheme", format!("Basic {valid}")),
        ("token without scheme", valid.clone()),
        ("bearer without token", "Bearer".to_owned()),
        ("bearer with blanks", "Bearer    ".to_owned()),
        ("garbage", "Bearer not-a-jwt".to_owned()),
        ("three garbage parts", "Bearer a.b.c".to_owned()),
        ("expired", format!("Bearer {expired}")),
        ("alg none", format!("Bearer {none_header}.{none_claims}.")),
        (
            "alg none without signature",
            format!("Bearer {none_header}.{none_claims}"),
        ),
        (
            "alg none with a real signature",
            format!("Bearer {none_header}.{none_claims}.{valid_signature}"),
        ),
        ("HS256 keyed with the public key", format!("Bearer {hs256}")),
        (
            "signed by another key",
            format!("Bearer {}", signed_by_another_key(role)),
        ),
        ("tampered claims", format!("Bearer {tampered}")),
        (
            "system role",
            format!("Bearer {}", signed(&claims(&sub, "system"))),
        ),
        (
            "unknown role",
            format!("Bearer {}", signed(&claims(&sub, "root"))),
        ),
        (
            "role in capitals",
            format!("Bearer {}", signed(&claims(&sub, &role.to_uppercase()))),
        ),
        (
            "sub not a UUID",
            format!("Bearer {}", signed(&claims("alice", role))),
        ),
        (
            "nil sub",
            format!("Bearer {}", signed(&claims(&Uuid::nil().to_string(), role))),
        ),
        (
            "no role",
            format!("Bearer {}", signed(&json!({"sub": sub, "exp": now + 300}))),
        ),
        (
            "no exp",
            format!("Bearer {}", signed(&json!({"sub": sub, "role": role}))),
        ),
        (
            "no sub",
            format!(
                "Bearer {}",
                signed(&json!({"role": role, "exp": now + 300}))
            ),
        ),
    ]
}

#[tokio::test]
async fn requests_without_a_token_that_verifies_are_refused_with_401_and_write_nothing() {
    let probe = Probe::start().await;
    let m = Market::open(&probe).await;
    let routes = [
        (
            "buyer",
            Call::post("/wallets", &m.buyer, &json!({"currency": "EUR"})),
        ),
        (
            "admin",
            Call::post(
                format!("/wallets/{}/deposits", m.buyer_wallet),
                &m.admin,
                &movement(100_000, "EUR"),
            ),
        ),
        (
            "seller",
            Call::post("/listings", &m.seller, &listing_body(1_000, 1, None)),
        ),
        (
            "buyer",
            Call::post(
                "/orders",
                &m.buyer,
                &checkout_body(&[m.listing], "cod", None),
            ),
        ),
        (
            "seller",
            Call::post_empty(format!("/listings/{}/delete", m.listing), &m.seller),
        ),
    ];
    for (role, call) in &routes {
        probe
            .refused(
                call.clone().without_token().named("no Authorization"),
                401,
                "unauthorized",
            )
            .await;
        probe
            .refused(
                call.clone()
                    .another_authorization(format!("Bearer {}", User::new(role).token))
                    .named("two Authorization headers"),
                401,
                "unauthorized",
            )
            .await;
        for (name, authorization) in bad_authorizations(role) {
            probe
                .refused(
                    call.clone().authorization(authorization).named(name),
                    401,
                    "unauthorized",
                )
                .await;
        }
    }
    // The token is checked before the input, so strangers learn nothing.
    for call in [
        Call::post_bytes("/wallets", &m.buyer, "{"),
        Call::post(
            "/wallets/not-a-uuid/deposits",
            &m.admin,
            &movement(1, "EUR"),
        ),
        Call::post(
            format!("/wallets/{}/deposits", Uuid::now_v7()),
            &m.admin,
            &movement(1, "EUR"),
        ),
        Call::post("/wallets", &m.buyer, &json!({"currency": "EUR"})).content_type(None),
    ] {
        probe
            .refused(call.without_token(), 401, "unauthorized")
            .await;
    }
    // The same requests with their own valid tokens are accepted.
    for (_, call) in routes {
        probe.accepted(call).await;
    }
}

#[tokio::test]
async fn roles_without_the_right_are_refused_with_403_and_write_nothing() {
    let probe = Probe::start().await;
    let m = Market::open(&probe).await;
    let deposits = format!("/wallets/{}/deposits", m.buyer_wallet);
    let cases = [
        // Only sellers list.
        Call::post("/listings", &m.buyer, &listing_body(1_000, 1, None)),
        Call::post(
            "/listings",
            &User::new("admin"),
            &listing_body(1_000, 1, None),
        ),
        // Deposits come from the payment provider (admin), not the owner.
        Call::post(&deposits, &m.seller, &movement(100, "EUR")),
        Call::post(&deposits, &m.buyer, &movement(100, "EUR")),
        Call::post(&deposits, &User::new("operator"), &movement(100, "EUR")),
        // Auditors and operators own no wallets and move no money.
        Call::post(
            "/wallets",
            &User::new("auditor"),
            &json!({"currency": "EUR"}),
        ),
        Call::post(
            "/wallets",
            &User::new("operator"),
            &json!({"currency": "EUR"}),
        ),
        Call::post(
            format!("/wallets/{}/withdrawals", m.buyer_wallet),
            &User::new("operator"),
            &movement(100, "EUR"),
        ),
        Call::post(
            format!("/wallets/{}/withdrawals", m.buyer_wallet),
            &User::new("auditor"),
            &movement(100, "EUR"),
        ),
        // Only buyers check out.
        Call::post(
            "/orders",
            &User::new("seller"),
            &checkout_body(&[m.listing], "cod", None),
        ),
        Call::post(
            "/orders",
            &User::new("auditor"),
            &checkout_body(&[m.listing], "cod", None),
        ),
        // Only an admin confirms a payment.
        Call::post(
            format!("/orders/{}/confirm-payment", m.order),
            &m.buyer,
            &json!({"reference": "paid, promise"}),
        ),
        // Only Souk or an admin releases escrow.
        Call::post_empty(format!("/orders/{}/release-escrow", m.order), &m.seller),
    ];
    for call in cases {
        probe.refused(call, 403, "forbidden").await;
    }
}

#[tokio::test]
async fn users_cannot_act_on_what_belongs_to_others() {
    let probe = Probe::start().await;
    let m = Market::open(&probe).await;
    let other_buyer = User::new("buyer");
    let other_seller = User::new("seller");
    let other_seller_wallet = probe.app.funded_wallet(&other_seller, "EUR", 0).await;
    let listing = |step: &str| format!("/listings/{}/{step}", m.listing);
    let order = |step: &str| format!("/orders/{}/{step}", m.order);
    let cases = [
        // Buyer B and seller B withdrawing from buyer A's wallet.
        Call::post(
            format!("/wallets/{}/withdrawals", m.buyer_wallet),
            &other_buyer,
            &movement(100, "EUR"),
        ),
        Call::post(
            format!("/wallets/{}/withdrawals", m.buyer_wallet),
            &m.seller,
            &movement(100, "EUR"),
        ),
        // Seller B managing seller A's listing.
        Call::post(
            listing("price"),
            &other_seller,
            &json!({"price": money(1, "EUR")}),
        ),
        Call::post(listing("stock"), &other_seller, &json!({"quantity": 1_000})),
        Call::post(
            listing("details"),
            &other_seller,
            &json!({"title": "Mine now"}),
        ),
        Call::post_empty(listing("pause"), &other_seller),
        Call::post_empty(listing("delete"), &other_seller),
        // A buyer managing a listing.
        Call::post(
            listing("price"),
            &m.buyer,
            &json!({"price": money(1, "EUR")}),
        ),
        // A seller paid into someone else's wallet.
        Call::post(
            "/listings",
            &other_seller,
            &listing_body(1_000, 1, Some(m.buyer_wallet)),
        ),
        // Only the order's seller ships it.
        Call::post(
            order("ship"),
            &m.buyer,
            &json!({"carrier": "La Poste", "tracking_number": "LP1"}),
        ),
        Call::post(
            order("ship"),
            &other_seller,
            &json!({"carrier": "La Poste", "tracking_number": "LP1"}),
        ),
        // Strangers to the order.
        Call::post(order("cancel"), &other_buyer, &json!({"reason": "mine"})),
        Call::post(order("cancel"), &other_seller, &json!({"reason": "mine"})),
        // Only the product's owner tells its story.
        Call::post(
            format!("/products/{}/stories", m.product),
            &other_seller,
            &json!({"title": "Mine", "body": "Not really."}),
        ),
        Call::post(
            format!("/products/{}/stories", m.product),
            &m.buyer,
            &json!({"title": "Mine", "body": "Not yet."}),
        ),
    ];
    for call in cases {
        probe.refused(call, 403, "forbidden").await;
    }
    // A seller may not hold (or buy) their own stock.
    probe
        .refused(
            Call::post(
                listing("reservations"),
                &m.seller,
                &json!({"quantity": 1, "ttl_seconds": 600}),
            ),
            403,
            "own_listing",
        )
        .await;

    // Wallet escrow from someone else's wallet, for another seller's listing.
    let escrow_listing = probe
        .accepted(Call::post(
            "/listings",
            &other_seller,
            &listing_body(1_000, 2, Some(other_seller_wallet)),
        ))
        .await
        .id();
    probe
        .refused(
            Call::post(
                "/orders",
                &other_buyer,
                &checkout_body(&[escrow_listing], "wallet_escrow", Some(m.buyer_wallet)),
            ),
            403,
            "forbidden",
        )
        .await;

    // Once shipped and delivered, only its buyer reviews it.
    probe
        .accepted(Call::post(
            order("ship"),
            &m.seller,
            &json!({"carrier": "La Poste", "tracking_number": "LP1"}),
        ))
        .await;
    probe
        .refused(
            Call::post_empty(order("deliver"), &other_buyer),
            403,
            "forbidden",
        )
        .await;
    probe
        .refused(
            Call::post_empty(order("deliver"), &m.seller),
            403,
            "forbidden",
        )
        .await;
    probe
        .accepted(Call::post_empty(order("deliver"), &m.buyer))
        .await;
    for reviewer in [&other_buyer, &m.seller] {
        probe
            .refused(
                Call::post(order("review"), reviewer, &json!({"rating": 1})),
                403,
                "forbidden",
            )
            .await;
    }
    probe
        .refused(
            Call::post(order("return"), &other_buyer, &json!({"reason": "mine"})),
            403,
            "forbidden",
        )
        .await;
}

#[tokio::test]
async fn health_metrics_and_the_openapi_document_need_no_token() {
    let probe = Probe::start().await;
    for path in ["/health", "/metrics", "/openapi.json"] {
        let answer = probe.send(&Call::new(Method::GET, path)).await;
        assert_eq!(answer.status, 200, "GET {path}: {:?}", answer.body);
    }
    let health = probe.send(&Call::new(Method::GET, "/health")).await;
    assert_eq!(health.body["status"], "ok");
    let openapi = probe.send(&Call::new(Method::GET, "/openapi.json")).await;
    assert!(openapi.body["paths"].is_object(), "{}", openapi.body);
}
