//! Projection "timelines": ProductTimeline events into `rm_products` (the
//! product's current owner and how many entries its timeline has) and
//! `rm_timeline` (one row per event after the start, in the product's order).
//!
//! An entry's `kind` is the kind of a recorded entry (`listed`, `sold`, ...,
//! as `TimelineEntry` names them) or `story`, `ownership_transferred`,
//! `customization_requested`, `customization_accepted`,
//! `customization_completed`; `data` is the event's fields (for a recorded
//! entry, the entry's fields without its kind). `TimelineStarted` creates the
//! product's row and is not an entry of its own: the `listed` entry recorded
//! with it tells the same story.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use domain::timeline::TimelineEvent;
use event_store::global::RecordedEvent;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::engine::{ApplyError, Refused, aggregate_uuid, parse_event};
use crate::rows::{self, Table};

pub(crate) const PRODUCTS: Table = Table {
    name: "rm_products",
    key: &["product_id"],
    columns: &["product_id", "owner_id", "entries", "updated_at"],
};

pub(crate) const TIMELINE: Table = Table {
    name: "rm_timeline",
    key: &["product_id", "sequence"],
    columns: &[
        "product_id",
        "sequence",
        "kind",
        "data",
        "actor_id",
        "recorded_at",
    ],
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ProductRow {
    product_id: Uuid,
    owner_id: Uuid,
    entries: i64,
    updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct EntryRow {
    product_id: Uuid,
    sequence: i64,
    kind: String,
    data: Value,
    actor_id: Option<Uuid>,
    recorded_at: DateTime<Utc>,
}

pub(crate) async fn apply(
    conn: &mut PgConnection,
    schema: &str,
    events: &[&RecordedEvent],
) -> Result<Vec<Refused>, sqlx::Error> {
    let mut refused = Vec::new();
    let mut parsed = Vec::with_capacity(events.len());
    for (index, event) in events.iter().enumerate() {
        match aggregate_uuid(event).and_then(|id| Ok((id, parse_event::<TimelineEvent>(event)?))) {
            Ok((product_id, payload)) => parsed.push((index, *event, product_id, payload)),
            Err(why) => refused.push((index, why)),
        }
    }
    let mut ids: Vec<Uuid> = parsed.iter().map(|(_, _, id, _)| *id).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut products: HashMap<Uuid, ProductRow> =
        rows::load::<ProductRow>(conn, schema, &PRODUCTS, "product_id", &ids)
            .await?
            .into_iter()
            .map(|row| (row.product_id, row))
            .collect();
    let mut changed = Vec::new();
    let mut entries = Vec::new();
    for (index, event, product_id, payload) in parsed {
        match apply_one(products.get(&product_id), product_id, event, payload) {
            Ok((row, entry)) => {
                products.insert(product_id, row);
                changed.push(product_id);
                entries.extend(entry);
            }
            Err(why) => refused.push((index, why)),
        }
    }
    changed.sort_unstable();
    changed.dedup();
    let rows: Vec<&ProductRow> = changed.iter().filter_map(|id| products.get(id)).collect();
    rows::upsert(conn, schema, &PRODUCTS, &rows).await?;
    rows::insert(conn, schema, &TIMELINE, &entries).await?;
    Ok(refused)
}

/// The kind and data of the timeline entry an event adds.
fn entry_of(payload: TimelineEvent) -> Result<(String, Value), ApplyError> {
    let encode = |value: Result<Value, serde_json::Error>| {
        value.map_err(|error| ApplyError::new(format!("encoding the entry: {error}")))
    };
    Ok(match payload {
        TimelineEvent::TimelineStarted { .. } => {
            return Err(ApplyError::new("TimelineStarted is not an entry"));
        }
        TimelineEvent::EntryRecorded { entry } => {
            let mut data = encode(serde_json::to_value(&entry))?;
            let kind = data
                .as_object_mut()
                .and_then(|fields| fields.remove("kind"))
                .and_then(|kind| kind.as_str().map(str::to_owned))
                .ok_or_else(|| ApplyError::new("a recorded entry has no kind"))?;
            (kind, data)
        }
        TimelineEvent::OwnershipTransferred { from, to } => (
            "ownership_transferred".to_owned(),
            json!({"from": from, "to": to}),
        ),
        TimelineEvent::StoryAdded {
            story_id,
            author,
            title,
            body,
            media,
        } => (
            "story".to_owned(),
            json!({"story_id": story_id, "author": author, "title": title, "body": body, "media": media}),
        ),
        TimelineEvent::CustomizationRequested {
            customization_id,
            requested_by,
            designer,
            description,
        } => (
            "customization_requested".to_owned(),
            json!({
                "customization_id": customization_id,
                "requested_by": requested_by,
                "designer": designer,
                "description": description,
            }),
        ),
        TimelineEvent::CustomizationAccepted {
            customization_id,
            designer,
        } => (
            "customization_accepted".to_owned(),
            json!({"customization_id": customization_id, "designer": designer}),
        ),
        TimelineEvent::CustomizationCompleted {
            customization_id,
            designer,
            media,
            note,
        } => (
            "customization_completed".to_owned(),
            json!({
                "customization_id": customization_id,
                "designer": designer,
                "media": media,
                "note": note,
            }),
        ),
    })
}

/// The actor recorded in an event's metadata, when it is a user.
fn actor_of(event: &RecordedEvent) -> Option<Uuid> {
    let metadata: Value = event.metadata.parse().ok()?;
    metadata
        .get("actor_id")
        .and_then(Value::as_str)
        .and_then(|id| Uuid::parse_str(id).ok())
}

/// The product's row and the entry `payload` adds (none for the start), or
/// why it cannot be applied.
fn apply_one(
    current: Option<&ProductRow>,
    product_id: Uuid,
    event: &RecordedEvent,
    payload: TimelineEvent,
) -> Result<(ProductRow, Option<EntryRow>), ApplyError> {
    match (payload, current) {
        (TimelineEvent::TimelineStarted { .. }, Some(_)) => Err(ApplyError::new(format!(
            "the timeline of product {product_id} was already started"
        ))),
        (
            TimelineEvent::TimelineStarted {
                product_id: started,
                owner,
            },
            None,
        ) => {
            if started.as_uuid() != product_id {
                return Err(ApplyError::new(format!(
                    "TimelineStarted names product {started} in the stream of {product_id}"
                )));
            }
            let row = ProductRow {
                product_id,
                owner_id: owner.as_uuid(),
                entries: 0,
                updated_at: event.recorded_at,
            };
            Ok((row, None))
        }
        (_, None) => Err(ApplyError::new(format!(
            "{} for product {product_id}, whose timeline the projection has not seen started",
            event.event_type
        ))),
        (payload, Some(current)) => {
            let mut row = current.clone();
            if let TimelineEvent::OwnershipTransferred { to, .. } = &payload {
                row.owner_id = to.as_uuid();
            }
            let (kind, data) = entry_of(payload)?;
            row.entries += 1;
            row.updated_at = event.recorded_at;
            let entry = EntryRow {
                product_id,
                sequence: event.sequence,
                kind,
                data,
                actor_id: actor_of(event),
                recorded_at: event.recorded_at,
            };
            Ok((row, Some(entry)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rows::assert_columns_match;

    #[test]
    fn rows_carry_exactly_the_columns_of_their_tables() {
        let now = Utc::now();
        assert_columns_match(
            &PRODUCTS,
            &ProductRow {
                product_id: Uuid::nil(),
                owner_id: Uuid::nil(),
                entries: 0,
                updated_at: now,
            },
        );
        assert_columns_match(
            &TIMELINE,
            &EntryRow {
                product_id: Uuid::nil(),
                sequence: 1,
                kind: "listed".into(),
                data: json!({}),
                actor_id: None,
                recorded_at: now,
            },
        );
    }
}
