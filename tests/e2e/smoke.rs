use serde_json::json;
use tests::{User, spawn_app};

#[tokio::test]
async fn a_wallet_opens_takes_a_deposit_and_answers_a_position() {
    let app = spawn_app().await;
    let buyer = User::new("buyer");
    let wallet = app.funded_wallet(&buyer, "EUR", 5_000).await;
    let withdrawn = app
        .post(
            &format!("/wallets/{wallet}/withdrawals"),
            Some(&buyer),
            &json!({"amount": {"amount": 1_000, "currency": "EUR"}, "reference": "to bank"}),
        )
        .await;
    assert_eq!(withdrawn.status, 200, "{:?}", withdrawn.body);
    assert_eq!(withdrawn.body["version"], 3);
    assert_eq!(withdrawn.body["position"].as_str().map(str::len), Some(32));
}

#[tokio::test]
async fn every_event_records_who_did_it_and_why() {
    let app = spawn_app().await;
    let buyer = User::new("buyer");
    let correlation = uuid::Uuid::now_v7();
    let opened = app
        .post_raw(
            "/wallets",
            Some(&buyer),
            Some(br#"{"currency":"EUR"}"#.to_vec()),
            &[
                ("x-request-id", "req-abc-123"),
                ("x-correlation-id", &correlation.to_string()),
                ("idempotency-key", "open-1"),
            ],
        )
        .await;
    assert_eq!(opened.status, 201, "{:?}", opened.body);
    assert_eq!(
        opened
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("req-abc-123"),
        "the request id is echoed"
    );
    let metadata: serde_json::Value = sqlx::query_scalar("SELECT metadata::jsonb FROM events")
        .fetch_one(&app.db.pool().await)
        .await
        .unwrap();
    assert_eq!(metadata["actor_id"], buyer.id.to_string());
    assert_eq!(metadata["actor_role"], "buyer");
    assert_eq!(metadata["request_id"], "req-abc-123");
    assert_eq!(metadata["correlation_id"], correlation.to_string());
    assert_eq!(metadata["causation_id"], metadata["command_id"]);
    assert!(metadata["event_id"].is_string() && metadata["recorded_at"].is_string());

    // Without a request id of its own, the request gets one.
    let second = app
        .post("/wallets", Some(&buyer), &json!({"currency": "USD"}))
        .await;
    let generated = second
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert_eq!(generated.len(), 36, "a generated UUID: {generated}");
    let recorded: String = sqlx::query_scalar(
        "SELECT metadata->>'request_id' FROM events WHERE payload::jsonb->'WalletOpened'->>'currency' = 'USD'",
    )
    .fetch_one(&app.db.pool().await)
    .await
    .unwrap();
    assert_eq!(recorded, generated);
}

#[tokio::test]
async fn health_metrics_and_the_openapi_document_need_no_token() {
    let app = spawn_app().await;
    let health = app.get("/health").await;
    assert_eq!(
        (health.status, &health.body["database"]),
        (200, &json!("up"))
    );
    let buyer = User::new("buyer");
    app.post("/wallets", Some(&buyer), &json!({"currency": "EUR"}))
        .await;
    let metrics = app
        .client
        .get(format!("{}/metrics", app.address))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("souk_http_requests_total"), "{metrics}");
    assert!(metrics.contains("souk_events_appended_total"), "{metrics}");
    let openapi = app.get("/openapi.json").await;
    assert_eq!(openapi.status, 200);
    assert_eq!(openapi.body["openapi"], "3.1.0");
}
