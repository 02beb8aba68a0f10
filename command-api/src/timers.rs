//! The durable timers of the process managers. Timers are rows of the
//! `timers` table, written in the transaction that arms them. This worker
//! leases due timers (`FOR UPDATE SKIP LOCKED`, so several processes share
//! the work), reads each row as a `domain::journeys::Timer`, fires it
//! through its journey (`domain::journeys::fire`, the code a user's
//! command runs) with an idempotency key derived from the timer, and
//! deletes it. A timer fired twice (a crash
//! between the command and the delete) replays the stored response: a no-op.

use std::time::Duration;

use chrono::Utc;
use domain::Decide;
use domain::journeys::{self, Fired, JourneyError, Timer};
use domain::order::Order;
use event_store::journey::stream_refs;
use event_store::{CommandContext, EventStore, ExecError, IdempotencyKey};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Refusals that mean "not yet", not "nothing to do".
const TOO_EARLY: &[&str] = &["not_yet_due", "not_yet_expired", "return_window_open"];
/// How much later a timer that fired early is tried again.
const RETRY_EARLY_SECONDS: f64 = 5.0;

/// Timers leased per round.
const BATCH: i64 = 32;
/// A leased timer that was neither fired nor deleted becomes due again after this.
const LEASE_SECONDS: i64 = 60;
/// A timer that failed this often is left for an operator (its last error is kept).
const MAX_ATTEMPTS: i32 = 20;

/// Fires due timers until the task is aborted, polling every `poll`.
pub async fn run(store: EventStore, poll: Duration) {
    loop {
        match fire_due(&store).await {
            Ok(fired) if fired as i64 == BATCH => continue,
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "timer worker cannot reach the database"),
        }
        tokio::time::sleep(poll).await;
    }
}

/// Leases and fires the timers that are due now; returns how many.
pub async fn fire_due(store: &EventStore) -> Result<usize, sqlx::Error> {
    let due: Vec<(Uuid, String, Value)> = sqlx::query_as(
        "UPDATE timers SET due_at = now() + make_interval(secs => $2), attempts = attempts + 1
          WHERE timer_id IN (SELECT timer_id FROM timers
                              WHERE due_at <= now() AND attempts < $3
                              ORDER BY due_at LIMIT $1 FOR UPDATE SKIP LOCKED)
         RETURNING timer_id, kind, payload",
    )
    .bind(BATCH)
    .bind(LEASE_SECONDS as f64)
    .bind(MAX_ATTEMPTS)
    .fetch_all(store.pool())
    .await?;
    let count = due.len();
    for (timer_id, kind, payload) in due {
        let result = fire(store, timer_id, &kind, &payload).await;
        match result {
            // Fired a moment early (the database's clock and ours differ):
            // keep it, a little later.
            Err(ExecError::Rejected { code, .. }) if TOO_EARLY.contains(&code) => {
                tracing::debug!(%timer_id, kind, "timer fired early; rescheduled");
                sqlx::query(
                    "UPDATE timers SET due_at = now() + make_interval(secs => $2), attempts = attempts - 1
                      WHERE timer_id = $1",
                )
                .bind(timer_id)
                .bind(RETRY_EARLY_SECONDS)
                .execute(store.pool())
                .await?;
            }
            // Fired, or refused because there is nothing left to do (the
            // hold was confirmed, the order moved on): either way, done.
            Ok(()) | Err(ExecError::Rejected { .. }) => {
                if let Err(ExecError::Rejected { code, .. }) = &result {
                    tracing::debug!(%timer_id, kind, code, "timer had nothing left to do");
                }
                sqlx::query("DELETE FROM timers WHERE timer_id = $1")
                    .bind(timer_id)
                    .execute(store.pool())
                    .await?;
                metrics::counter!("souk_timers_fired_total", "kind" => kind).increment(1);
            }
            Err(error) => {
                tracing::warn!(%timer_id, kind, %error, "timer failed; it will be retried");
                sqlx::query("UPDATE timers SET last_error = $2 WHERE timer_id = $1")
                    .bind(timer_id)
                    .bind(error.to_string())
                    .execute(store.pool())
                    .await?;
            }
        }
    }
    Ok(count)
}

/// Fires one timer row through its journey (`domain::journeys::fire`), in
/// one unit of work over the streams it touches.
async fn fire(
    store: &EventStore,
    timer_id: Uuid,
    kind: &str,
    payload: &Value,
) -> Result<(), ExecError> {
    let timer = Timer::from_row(kind, payload).map_err(ExecError::Internal)?;
    let command_id = domain::process::deterministic_command_id("timer", &[&timer_id.to_string()]);
    let context = CommandContext::new(Uuid::nil(), "system", command_id);
    let idempotency = Some(IdempotencyKey {
        scope: "system".into(),
        key: format!("timer:{timer_id}"),
        request_hash: Sha256::digest(format!("{kind}:{payload}")).into(),
    });
    let order = match timer.order_id() {
        Some(order_id) => {
            let (order, _) = store.state::<Order>(&order_id.to_string()).await?;
            if !order.exists() {
                return Err(JourneyError::OrderNotFound(order_id).into());
            }
            Some((order_id, order))
        }
        None => None,
    };
    let streams = timer.streams(|step| {
        order
            .as_ref()
            .map(|(order_id, order)| journeys::order_streams(*order_id, order, step))
            .unwrap_or_default()
    });
    let now = Utc::now();
    store
        .execute_multi(
            stream_refs(streams),
            context,
            idempotency,
            move |plan| Ok(journeys::fire(plan, timer, now)?),
            |fired, committed| {
                let outcome = match fired {
                    Fired::Done => json!({"fired": true}),
                    Fired::NothingToDo(code) => json!({"fired": false, "code": code}),
                };
                (
                    200,
                    json!({"outcome": outcome, "position": committed.last().token()}),
                )
            },
        )
        .await?;
    Ok(())
}
