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
