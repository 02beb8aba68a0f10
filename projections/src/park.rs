//! Parking poison events in `dead_letters`: the event (or the raw message
//! that did not even parse), which projection and partition refused it, and
//! why. Parking is part of the batch's transaction, so an event is either
//! applied or parked, never neither. Each newly parked event is logged as an
//! error and counted in `souk_projection_dead_letters_total{projection}`; a
//! redelivered event that is already parked is not counted twice.
//!
//! Operators handle letters here too ([`dead_letters`], [`retry`],
//! [`skip`]); each retry and skip is recorded in the append-only
//! `dead_letter_actions` (who, when, why) for auditors.

use anyhow::Context as _;
use event_store::Position;
use event_store::global::RecordedEvent;
use serde_json::{Value, json};
use sqlx::{Connection as _, PgConnection, PgPool};
use uuid::Uuid;

use crate::engine::{Kind, apply_isolated};
use crate::runtime::projection_lock_key;

/// What is parked: an event, or a message that is not one.
#[derive(Debug, Clone)]
pub(crate) struct DeadLetter {
    pub event_id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub transaction_id: i64,
    pub position: i64,
    pub error: String,
    pub envelope: Value,
}

impl DeadLetter {
    /// An event a projection could not apply.
    pub fn event(event: &RecordedEvent, error: String) -> Self {
        Self {
            event_id: event.event_id,
            aggregate_type: event.aggregate_type.clone(),
            aggregate_id: event.aggregate_id.clone(),
            sequence: event.sequence,
            event_type: event.event_type.clone(),
            transaction_id: event.position.transaction_id as i64,
            position: event.position.position,
            error,
            envelope: serde_json::to_value(event).unwrap_or(Value::Null),
        }
    }

    /// A JetStream message whose body is not a recorded event. It is named
    /// by its `Nats-Msg-Id` when that is a UUID, and otherwise by a UUID made
    /// of its stream sequence (`00000000-0000-0000-0000-<sequence in hex>`),
    /// so that its redelivery is recognised as the same letter.
    pub fn malformed(
        message_id: Option<&str>,
        stream_sequence: u64,
        subject: &str,
        body: &[u8],
        error: String,
    ) -> Self {
        let event_id = message_id
            .and_then(|id| Uuid::parse_str(id).ok())
            .unwrap_or_else(|| Uuid::from_u128(u128::from(stream_sequence)));
        Self {
            event_id,
            aggregate_type: "?".to_owned(),
            aggregate_id: "?".to_owned(),
            sequence: 0,
            event_type: "?".to_owned(),
            transaction_id: 0,
            position: 0,
            error,
            envelope: json!({
                "subject": subject,
                "stream_sequence": stream_sequence,
                "message_id": message_id,
                "body": String::from_utf8_lossy(body),
            }),
        }
    }
}

/// Stores `letter` unless this projection parked the same event already.
/// Returns whether it is new.
pub(crate) async fn park(
    conn: &mut PgConnection,
    projection: &str,
    partition: i32,
    letter: &DeadLetter,
) -> Result<bool, sqlx::Error> {
    park_in(conn, "public", projection, partition, letter).await
}

/// [`park`] into `schema.dead_letters` (a rebuild's own, until its swap).
/// `schema` is a checked identifier.
pub(crate) async fn park_in(
    conn: &mut PgConnection,
    schema: &str,
    projection: &str,
    partition: i32,
    letter: &DeadLetter,
) -> Result<bool, sqlx::Error> {
    let inserted: Option<i64> = sqlx::query_scalar(&format!(
        "INSERT INTO {schema}.dead_letters
                (projection, partition, event_id, aggregate_type, aggregate_id, sequence,
                 event_type, transaction_id, position, error, envelope)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
         ON CONFLICT (projection, event_id) DO NOTHING
         RETURNING id"
    ))
    .bind(projection)
    .bind(partition)
    .bind(letter.event_id)
    .bind(storable(&letter.aggregate_type))
    .bind(storable(&letter.aggregate_id))
    .bind(letter.sequence)
    .bind(storable(&letter.event_type))
    .bind(letter.transaction_id)
    .bind(letter.position)
    .bind(storable(&letter.error))
    .bind(storable_json(&letter.envelope))
    .fetch_optional(conn)
    .await?;
    if inserted.is_some() {
        metrics::counter!("souk_projection_dead_letters_total", "projection" => projection.to_owned())
            .increment(1);
        tracing::error!(
            projection,
            partition,
            event_id = %letter.event_id,
            aggregate_type = %letter.aggregate_type,
            aggregate_id = %letter.aggregate_id,
            sequence = letter.sequence,
            event_type = %letter.event_type,
            error = %letter.error,
            "parked a poison event in dead_letters"
        );
    }
    Ok(inserted.is_some())
}

/// A parked event, as an operator sees it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ParkedEvent {
    pub id: i64,
    pub projection: String,
    pub partition: i32,
    pub event_id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub position: Position,
    pub error: String,
    pub attempts: i32,
    pub parked_at: chrono::DateTime<chrono::Utc>,
    pub last_retry_at: Option<chrono::DateTime<chrono::Utc>>,
}

type ParkedRow = (
    i64,
    String,
    i32,
    Uuid,
    String,
    String,
    i64,
    String,
    i64,
    i64,
    String,
    i32,
    chrono::DateTime<chrono::Utc>,
    Option<chrono::DateTime<chrono::Utc>>,
);

type ParkedWithEnvelope = (
    i64,
    String,
    i32,
    Uuid,
    String,
    String,
    i64,
    String,
    i64,
    i64,
    String,
    i32,
    chrono::DateTime<chrono::Utc>,
    Option<chrono::DateTime<chrono::Utc>>,
    Value,
);

const PARKED_COLUMNS: &str = "id, projection, partition, event_id, aggregate_type, aggregate_id,
     sequence, event_type, transaction_id, position, error, attempts, parked_at, last_retry_at";

fn parked(row: ParkedRow) -> ParkedEvent {
    let (
        id,
        projection,
        partition,
        event_id,
        aggregate_type,
        aggregate_id,
        sequence,
        event_type,
        transaction_id,
        position,
        error,
        attempts,
        parked_at,
        last_retry_at,
    ) = row;
    ParkedEvent {
        id,
        projection,
        partition,
        event_id,
        aggregate_type,
        aggregate_id,
        sequence,
        event_type,
        position: Position {
            transaction_id: transaction_id as u64,
            position,
        },
        error,
        attempts,
        parked_at,
        last_retry_at,
    }
}

/// The parked events (of one projection, or all), oldest first, at most `limit`.
pub async fn dead_letters(
    pool: &PgPool,
    projection: Option<&str>,
    limit: i64,
) -> anyhow::Result<Vec<ParkedEvent>> {
    let rows: Vec<ParkedRow> = sqlx::query_as(&format!(
        "SELECT {PARKED_COLUMNS} FROM dead_letters
          WHERE $1::text IS NULL OR projection = $1
          ORDER BY projection, transaction_id, position, id
          LIMIT $2"
    ))
    .bind(projection)
    .bind(limit.max(0))
    .fetch_all(pool)
    .await
    .context("reading the dead letters")?;
    Ok(rows.into_iter().map(parked).collect())
}

/// What one retry did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RetryOutcome {
    pub id: i64,
    pub projection: String,
    pub event_id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    /// `applied` (the letter is gone), `refused` (it stays, with the new
    /// error) or `blocked` (not tried: see `detail`).
    pub outcome: &'static str,
    pub detail: String,
}

/// Applies the parked event `id` (or every parked event, oldest first) to
/// its live projection again, as `operator`, under the projection's lock
/// (live batches wait). An event is only retried while no later event of
/// its aggregate has been applied to the projection (those would be undone
/// by applying an older one): otherwise it is `blocked`, and a rebuild is
/// the way. Each attempt is recorded in `dead_letter_actions`.
pub async fn retry(
    pool: &PgPool,
    id: Option<i64>,
    operator: &str,
) -> anyhow::Result<Vec<RetryOutcome>> {
    let ids: Vec<i64> = match id {
        Some(id) => vec![id],
        None => sqlx::query_scalar(
            "SELECT id FROM dead_letters ORDER BY projection, transaction_id, position, id",
        )
        .fetch_all(pool)
        .await
        .context("reading the dead letters")?,
    };
    let mut outcomes = Vec::with_capacity(ids.len());
    for one in ids {
        match retry_one(pool, one, operator).await? {
            Some(outcome) => outcomes.push(outcome),
            // Under --all, a letter another operator handled meanwhile.
            None => anyhow::ensure!(id.is_none(), "no dead letter {one}"),
        }
    }
    Ok(outcomes)
}

async fn retry_one(pool: &PgPool, id: i64, operator: &str) -> anyhow::Result<Option<RetryOutcome>> {
    let mut conn = pool.acquire().await.context("connecting to Postgres")?;
    let mut tx = conn.begin().await?;
    sqlx::query("SET LOCAL lock_timeout = '30s'")
        .execute(&mut *tx)
        .await?;
    let projection: Option<String> =
        sqlx::query_scalar("SELECT projection FROM dead_letters WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some(projection) = projection else {
        return Ok(None);
    };
    let Some(kind) = Kind::parse(&projection) else {
        anyhow::bail!("dead letter {id} belongs to `{projection}`, which is not a projection");
    };
    // The projection's lock first (live batches take it shared), then the row.
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(projection_lock_key(kind))
        .execute(&mut *tx)
        .await
        .context("taking the projection's lock")?;
    let row: Option<(ParkedRow, Value)> = sqlx::query_as::<_, ParkedWithEnvelope>(&format!(
        "SELECT {PARKED_COLUMNS}, envelope FROM dead_letters WHERE id = $1 FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?
    .map(|(a, b, c, d, e, f, g, h, i, j, k, l, m, n, envelope)| {
        ((a, b, c, d, e, f, g, h, i, j, k, l, m, n), envelope)
    });
    let Some((row, envelope)) = row else {
        return Ok(None);
    };
    let letter = parked(row);
    let mut outcome = RetryOutcome {
        id,
        projection: letter.projection.clone(),
        event_id: letter.event_id,
        aggregate_type: letter.aggregate_type.clone(),
        aggregate_id: letter.aggregate_id.clone(),
        sequence: letter.sequence,
        outcome: "blocked",
        detail: String::new(),
    };
    let event: RecordedEvent = match serde_json::from_value(envelope) {
        Ok(event) => event,
        Err(_) => {
            outcome.detail = "the parked message is not an event; skip it".to_owned();
            return Ok(Some(outcome));
        }
    };
    let checkpoint: Option<(i64, i64)> = sqlx::query_as(
        "SELECT transaction_id, position FROM projection_checkpoints
          WHERE projection = $1 AND partition = $2",
    )
    .bind(&letter.projection)
    .bind(letter.partition)
    .fetch_optional(&mut *tx)
    .await?;
    let (checkpoint_transaction, checkpoint_position) = checkpoint.unwrap_or((i64::MAX, i64::MAX));
    let types: Vec<&str> = kind.aggregate_types().to_vec();
    let later: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events e
          WHERE e.aggregate_type = ANY($1) AND e.aggregate_id = $2
            AND (e.transaction_id, e.position) > ($3::text::xid8, $4)
            AND (e.transaction_id, e.position) <= ($5::text::xid8, $6)
            AND NOT EXISTS (SELECT 1 FROM dead_letters d
                             WHERE d.projection = $7 AND d.event_id = e.event_id)
            AND NOT EXISTS (SELECT 1 FROM dead_letter_actions a
                             WHERE a.projection = $7 AND a.event_id = e.event_id
                               AND a.action = 'skipped')",
    )
    .bind(&types)
    .bind(&letter.aggregate_id)
    .bind(letter.position.transaction_id.to_string())
    .bind(letter.position.position)
    .bind(checkpoint_transaction.to_string())
    .bind(checkpoint_position)
    .bind(&letter.projection)
    .fetch_one(&mut *tx)
    .await
    .context("looking for later events of the aggregate")?;
    if later > 0 {
        outcome.detail = format!(
            "{later} later event(s) of {} {} were applied since it was parked, and applying it \
             now would put the read model out of order: rebuild the projection instead \
             (replay-tool rebuild --projection {})",
            letter.aggregate_type, letter.aggregate_id, letter.projection
        );
        return Ok(Some(outcome));
    }
    let refused = apply_isolated(&mut tx, kind, "public", &[&event])
        .await
        .context("applying the event")?;
    let (result, error) = match refused.first() {
        Some((_, why)) => {
            sqlx::query(
                "UPDATE dead_letters SET error = $2, attempts = attempts + 1, last_retry_at = now()
                  WHERE id = $1",
            )
            .bind(id)
            .bind(storable(&why.0))
            .execute(&mut *tx)
            .await?;
            ("refused", why.0.clone())
        }
        None => {
            sqlx::query("DELETE FROM dead_letters WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "UPDATE projection_checkpoints SET events_applied = events_applied + 1
                  WHERE projection = $1 AND partition = $2",
            )
            .bind(&letter.projection)
            .bind(letter.partition)
            .execute(&mut *tx)
            .await?;
            ("applied", letter.error.clone())
        }
    };
    record_action(&mut tx, &letter, "retried", result, operator, None).await?;
    tx.commit().await.context("committing the retry")?;
    outcome.outcome = result;
    outcome.detail = error;
    Ok(Some(outcome))
}

async fn record_action(
    conn: &mut PgConnection,
    letter: &ParkedEvent,
    action: &str,
    outcome: &str,
    operator: &str,
    reason: Option<&str>,
) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO dead_letter_actions
                (projection, event_id, aggregate_type, aggregate_id, sequence, event_type,
                 transaction_id, position, action, outcome, error, operator, reason)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
    )
    .bind(&letter.projection)
    .bind(letter.event_id)
    .bind(&letter.aggregate_type)
    .bind(&letter.aggregate_id)
    .bind(letter.sequence)
    .bind(&letter.event_type)
    .bind(letter.position.transaction_id as i64)
    .bind(letter.position.position)
    .bind(action)
    .bind(outcome)
    .bind(&letter.error)
    .bind(storable(operator))
    .bind(reason.map(storable))
    .execute(conn)
    .await
    .context("recording the operator's action")?;
    Ok(())
}

/// Longest skip reason kept, in characters.
pub const MAX_REASON_CHARS: usize = 1000;

/// Gives up on the parked event `id` for good, as `operator`, because of
/// `reason`: the letter leaves `dead_letters` and the skip is recorded in
/// `dead_letter_actions`, where `replay-tool verify` reports it.
pub async fn skip(
    pool: &PgPool,
    id: i64,
    reason: &str,
    operator: &str,
) -> anyhow::Result<ParkedEvent> {
    let reason = reason.trim();
    anyhow::ensure!(
        !reason.is_empty() && reason.chars().count() <= MAX_REASON_CHARS,
        "a skip needs a reason of 1 to {MAX_REASON_CHARS} characters"
    );
    anyhow::ensure!(
        !operator.trim().is_empty(),
        "a skip needs an operator's name"
    );
    let mut conn = pool.acquire().await.context("connecting to Postgres")?;
    let mut tx = conn.begin().await?;
    let row: Option<ParkedRow> = sqlx::query_as(&format!(
        "SELECT {PARKED_COLUMNS} FROM dead_letters WHERE id = $1 FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(&mut *tx)
    .await
    .context("reading the dead letter")?;
    let letter = parked(row.with_context(|| format!("no dead letter {id}"))?);
    record_action(
        &mut tx,
        &letter,
        "skipped",
        "skipped",
        operator.trim(),
        Some(reason),
    )
    .await?;
    sqlx::query("DELETE FROM dead_letters WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await.context("committing the skip")?;
    Ok(letter)
}

/// Text Postgres can store: without NUL characters, which it refuses.
fn storable(text: &str) -> String {
    text.replace('\0', "\u{FFFD}")
}

/// JSON Postgres can store as jsonb (no `\u0000` anywhere, keys included).
fn storable_json(value: &Value) -> Value {
    match value {
        Value::String(text) => Value::String(storable(text)),
        Value::Array(items) => Value::Array(items.iter().map(storable_json).collect()),
        Value::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(key, value)| (storable(key), storable_json(value)))
                .collect(),
        ),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_characters_never_reach_postgres() {
        let value = json!({"a\u{0}": ["x\u{0}y", 1, null], "b": {"c": "\u{0}"}});
        let clean = storable_json(&value).to_string();
        assert!(!clean.contains("\\u0000"), "{clean}");
        assert_eq!(storable("ok"), "ok");
    }

    #[test]
    fn a_malformed_message_is_named_by_its_id_or_its_sequence() {
        let id = Uuid::now_v7();
        let by_id = DeadLetter::malformed(Some(&id.to_string()), 7, "s", b"{", "bad".into());
        assert_eq!(by_id.event_id, id);
        let by_sequence = DeadLetter::malformed(Some("not-a-uuid"), 42, "s", b"\xff", "bad".into());
        assert_eq!(by_sequence.event_id, Uuid::from_u128(42));
        assert_eq!(by_sequence.envelope["body"], "\u{FFFD}");
    }
}
