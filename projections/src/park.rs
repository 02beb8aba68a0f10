//! Parking poison events in `dead_letters`: the event (or the raw message
//! that did not even parse), which projection and partition refused it, and
//! why. Parking is part of the batch's transaction, so an event is either
//! applied or parked, never neither. Each newly parked event is logged as an
//! error and counted in `souk_projection_dead_letters_total{projection}`; a
//! redelivered event that is already parked is not counted twice.

use event_store::global::RecordedEvent;
use serde_json::{Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

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
    let inserted: Option<i64> = sqlx::query_scalar(
        "INSERT INTO public.dead_letters
                (projection, partition, event_id, aggregate_type, aggregate_id, sequence,
                 event_type, transaction_id, position, error, envelope)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
         ON CONFLICT (projection, event_id) DO NOTHING
         RETURNING id",
    )
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
