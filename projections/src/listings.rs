//! Projection "listings": Listing and Reservation events into `rm_listings`
//! (details, price, status, and the stock pool: stock, held, available) and
//! `rm_reservations` (one row per hold, with its outcome).
//!
//! A listing and its stock pool share one id, so both aggregates' events are
//! in one partition, in order: the listing is created in the transaction that
//! opens its pool, before it. Reservation events carry the pool's stock and
//! available units after them; held units are their difference. A listing's
//! `version` is its Listing aggregate's; `updated_at` moves with either.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use domain::listing::{ListingDetails, ListingEvent, ListingStatus};
use domain::reservation::ReservationEvent;
use event_store::global::RecordedEvent;
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::engine::{ApplyError, Refused, aggregate_uuid, parse_event};
use crate::rows::{self, Table};

pub(crate) const LISTINGS: Table = Table {
    name: "rm_listings",
    key: &["listing_id"],
    columns: &[
        "listing_id",
        "seller_id",
        "product_id",
        "title",
        "description",
        "category",
        "subcategory",
        "condition",
        "price_amount",
        "currency",
        "city",
        "country",
        "lat",
        "lon",
        "attributes",
        "images",
        "status",
        "payout_wallet_id",
        "stock",
        "held",
        "available",
        "created_at",
        "updated_at",
        "version",
    ],
};

pub(crate) const RESERVATIONS: Table = Table {
    name: "rm_reservations",
    key: &["hold_id"],
    columns: &[
        "hold_id",
        "listing_id",
        "holder_id",
        "quantity",
        "status",
        "expires_at",
        "order_id",
        "created_at",
        "updated_at",
    ],
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ListingRow {
    listing_id: Uuid,
    seller_id: Uuid,
    product_id: Uuid,
    title: String,
    description: String,
    category: String,
    subcategory: Option<String>,
    condition: String,
    price_amount: i64,
    currency: String,
    city: String,
    country: String,
    lat: Option<f64>,
    lon: Option<f64>,
    attributes: serde_json::Value,
    images: serde_json::Value,
    status: String,
    payout_wallet_id: Option<Uuid>,
    stock: i64,
    held: i64,
    available: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    version: i64,
}

impl ListingRow {
    fn set_details(&mut self, details: &ListingDetails) -> Result<(), ApplyError> {
        self.title = details.title.as_str().to_owned();
        self.description = details.description.as_str().to_owned();
        self.category = details.category.as_str().to_owned();
        self.subcategory = details.subcategory.as_ref().map(|s| s.as_str().to_owned());
        self.condition = details.condition.as_str().to_owned();
        self.city = details.location.city.as_str().to_owned();
        self.country = details.location.country.as_str().to_owned();
        self.lat = details.location.lat;
        self.lon = details.location.lon;
        self.attributes = serde_json::to_value(&details.attributes)
            .map_err(|error| ApplyError::new(format!("attributes: {error}")))?;
        self.images = serde_json::to_value(&details.images)
            .map_err(|error| ApplyError::new(format!("images: {error}")))?;
        Ok(())
    }

    /// Sets the pool's numbers after a Reservation event.
    fn set_pool(&mut self, stock: i64, available: i64) -> Result<(), ApplyError> {
        let held = stock - available;
        if available < 0 || held < 0 {
            return Err(ApplyError::new(format!(
                "listing {}: {available} available out of a stock of {stock}",
                self.listing_id
            )));
        }
        self.stock = stock;
        self.available = available;
        self.held = held;
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ReservationRow {
    hold_id: Uuid,
    listing_id: Uuid,
    holder_id: Uuid,
    quantity: i64,
    status: String,
    expires_at: DateTime<Utc>,
    order_id: Option<Uuid>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

// Boxing the larger variant would save bytes on a value that lives for one
// event of one batch.
#[allow(clippy::large_enum_variant)]
enum Payload {
    Listing(ListingEvent),
    Reservation(ReservationEvent),
}

fn parse(event: &RecordedEvent) -> Result<(Uuid, Payload), ApplyError> {
    let id = aggregate_uuid(event)?;
    let payload = match event.aggregate_type.as_str() {
        "Listing" => Payload::Listing(parse_event(event)?),
        "Reservation" => Payload::Reservation(parse_event(event)?),
        other => {
            return Err(ApplyError::new(format!(
                "the listings projection does not read {other} events"
            )));
        }
    };
    Ok((id, payload))
}

/// The hold an event is about, if any.
fn hold_of(payload: &Payload) -> Option<Uuid> {
    match payload {
        Payload::Reservation(payload) => hold_of_reservation(payload),
        Payload::Listing(_) => None,
    }
}

/// The rows a batch works on, keyed by id.
#[derive(Default)]
struct Rows {
    listings: HashMap<Uuid, ListingRow>,
    holds: HashMap<Uuid, ReservationRow>,
    changed_listings: Vec<Uuid>,
    changed_holds: Vec<Uuid>,
}

pub(crate) async fn apply(
    conn: &mut PgConnection,
    schema: &str,
    events: &[&RecordedEvent],
) -> Result<Vec<Refused>, sqlx::Error> {
    let mut refused = Vec::new();
    let mut parsed = Vec::with_capacity(events.len());
    for (index, event) in events.iter().enumerate() {
        match parse(event) {
            Ok((id, payload)) => parsed.push((index, *event, id, payload)),
            Err(why) => refused.push((index, why)),
        }
    }
    let mut listing_ids: Vec<Uuid> = parsed.iter().map(|(_, _, id, _)| *id).collect();
    listing_ids.sort_unstable();
    listing_ids.dedup();
    let mut hold_ids: Vec<Uuid> = parsed.iter().filter_map(|(.., p)| hold_of(p)).collect();
    hold_ids.sort_unstable();
    hold_ids.dedup();
    let mut state = Rows {
        listings: rows::load::<ListingRow>(conn, schema, &LISTINGS, "listing_id", &listing_ids)
            .await?
            .into_iter()
            .map(|row| (row.listing_id, row))
            .collect(),
        holds: rows::load::<ReservationRow>(conn, schema, &RESERVATIONS, "hold_id", &hold_ids)
            .await?
            .into_iter()
            .map(|row| (row.hold_id, row))
            .collect(),
        ..Rows::default()
    };
    // The listings whose search document changes (Reservation events only
    // move stock, which the index does not hold).
    let mut searched = Vec::new();
    for (index, event, listing_id, payload) in parsed {
        let listing_event = matches!(payload, Payload::Listing(_));
        match state.apply(listing_id, event, payload) {
            Err(why) => refused.push((index, why)),
            Ok(()) if listing_event => searched.push((listing_id, event.position)),
            Ok(()) => {}
        }
    }
    let Rows {
        listings,
        holds,
        mut changed_listings,
        mut changed_holds,
    } = state;
    changed_listings.sort_unstable();
    changed_listings.dedup();
    changed_holds.sort_unstable();
    changed_holds.dedup();
    let listing_rows: Vec<&ListingRow> = changed_listings
        .iter()
        .filter_map(|id| listings.get(id))
        .collect();
    let hold_rows: Vec<&ReservationRow> = changed_holds
        .iter()
        .filter_map(|id| holds.get(id))
        .collect();
    rows::upsert(conn, schema, &LISTINGS, &listing_rows).await?;
    rows::upsert(conn, schema, &RESERVATIONS, &hold_rows).await?;
    // Live batches only: a rebuild builds aside, and its swap queues every
    // listing for the index.
    if schema == "public" {
        crate::search::enqueue(conn, &searched).await?;
    }
    Ok(refused)
}

impl Rows {
    /// Applies one event, changing nothing when it is refused.
    fn apply(
        &mut self,
        listing_id: Uuid,
        event: &RecordedEvent,
        payload: Payload,
    ) -> Result<(), ApplyError> {
        let current = self.listings.get(&listing_id);
        let (listing, hold) = match payload {
            Payload::Listing(payload) => {
                (apply_listing(current, listing_id, event, payload)?, None)
            }
            Payload::Reservation(payload) => {
                let Some(current) = current else {
                    return Err(ApplyError::new(format!(
                        "{} for listing {listing_id}, which the projection has not seen created",
                        event.event_type
                    )));
                };
                let hold = hold_of_reservation(&payload).map(|id| (id, self.holds.get(&id)));
                let (listing, hold) = apply_reservation(current, hold, event, payload)?;
                (listing, hold)
            }
        };
        self.listings.insert(listing_id, listing);
        self.changed_listings.push(listing_id);
        if let Some(hold) = hold {
            self.changed_holds.push(hold.hold_id);
            self.holds.insert(hold.hold_id, hold);
        }
        Ok(())
    }
}

fn hold_of_reservation(payload: &ReservationEvent) -> Option<Uuid> {
    match payload {
        ReservationEvent::HoldPlaced { hold_id, .. }
        | ReservationEvent::HoldConfirmed { hold_id, .. }
        | ReservationEvent::HoldReleased { hold_id, .. }
        | ReservationEvent::HoldExpired { hold_id, .. } => Some(hold_id.as_uuid()),
        ReservationEvent::PoolOpened { .. } | ReservationEvent::StockSet { .. } => None,
    }
}

fn apply_listing(
    current: Option<&ListingRow>,
    listing_id: Uuid,
    event: &RecordedEvent,
    payload: ListingEvent,
) -> Result<ListingRow, ApplyError> {
    let existing = || {
        current.cloned().ok_or_else(|| {
            ApplyError::new(format!(
                "{} for listing {listing_id}, which the projection has not seen created",
                event.event_type
            ))
        })
    };
    let with_status = |status: ListingStatus| -> Result<ListingRow, ApplyError> {
        let mut row = existing()?;
        row.status = status.as_str().to_owned();
        Ok(row)
    };
    let mut row = match payload {
        ListingEvent::ListingCreated {
            listing_id: created,
            seller,
            product_id,
            details,
            price,
            payout_wallet,
        } => {
            if current.is_some() {
                return Err(ApplyError::new(format!(
                    "listing {listing_id} was already created"
                )));
            }
            if created.as_uuid() != listing_id {
                return Err(ApplyError::new(format!(
                    "ListingCreated names listing {created} in the stream of {listing_id}"
                )));
            }
            let mut row = ListingRow {
                listing_id,
                seller_id: seller.as_uuid(),
                product_id: product_id.as_uuid(),
                title: String::new(),
                description: String::new(),
                category: String::new(),
                subcategory: None,
                condition: String::new(),
                price_amount: price.amount(),
                currency: price.currency().as_str().to_owned(),
                city: String::new(),
                country: String::new(),
                lat: None,
                lon: None,
                attributes: serde_json::Value::Null,
                images: serde_json::Value::Null,
                status: ListingStatus::Active.as_str().to_owned(),
                payout_wallet_id: payout_wallet.map(|w| w.as_uuid()),
                stock: 0,
                held: 0,
                available: 0,
                created_at: event.recorded_at,
                updated_at: event.recorded_at,
                version: event.sequence,
            };
            row.set_details(&details)?;
            row
        }
        ListingEvent::ListingPriceChanged { new_price, .. } => {
            let mut row = existing()?;
            row.price_amount = new_price.amount();
            row.currency = new_price.currency().as_str().to_owned();
            row
        }
        ListingEvent::ListingDetailsUpdated { details } => {
            let mut row = existing()?;
            row.set_details(&details)?;
            row
        }
        ListingEvent::ListingPaused => with_status(ListingStatus::Paused)?,
        ListingEvent::ListingResumed | ListingEvent::ListingBackInStock => {
            with_status(ListingStatus::Active)?
        }
        ListingEvent::ListingSoldOut => with_status(ListingStatus::SoldOut)?,
        ListingEvent::ListingDeleted => with_status(ListingStatus::Deleted)?,
    };
    row.updated_at = event.recorded_at;
    row.version = event.sequence;
    Ok(row)
}

fn apply_reservation(
    current: &ListingRow,
    hold: Option<(Uuid, Option<&ReservationRow>)>,
    event: &RecordedEvent,
    payload: ReservationEvent,
) -> Result<(ListingRow, Option<ReservationRow>), ApplyError> {
    let mut row = current.clone();
    row.updated_at = event.recorded_at;
    // An existing hold, for the events that close one.
    let open_hold = |status: &str| -> Result<ReservationRow, ApplyError> {
        match hold {
            Some((_, Some(hold))) if hold.status == "active" => {
                let mut hold = hold.clone();
                hold.status = status.to_owned();
                hold.updated_at = event.recorded_at;
                Ok(hold)
            }
            Some((id, Some(hold))) => Err(ApplyError::new(format!(
                "{} for hold {id}, which is already {}",
                event.event_type, hold.status
            ))),
            Some((id, None)) => Err(ApplyError::new(format!(
                "{} for hold {id}, which the projection has not seen placed",
                event.event_type
            ))),
            None => Err(ApplyError::new(format!(
                "{} names no hold",
                event.event_type
            ))),
        }
    };
    let hold = match payload {
        ReservationEvent::PoolOpened { quantity, .. } => {
            row.set_pool(i64::from(quantity), i64::from(quantity))?;
            None
        }
        ReservationEvent::StockSet {
            quantity,
            available,
        } => {
            row.set_pool(i64::from(quantity), i64::from(available))?;
            None
        }
        ReservationEvent::HoldPlaced {
            hold_id,
            holder,
            quantity,
            expires_at,
            order_id,
            available,
        } => {
            // A closed hold may be placed again under its id (a bank
            // transfer's hold is renewed when the payment arrives): the row
            // is the hold's latest placement, created when it was first.
            let created_at = match hold {
                Some((_, Some(existing))) if existing.status == "active" => {
                    return Err(ApplyError::new(format!("hold {hold_id} is already active")));
                }
                Some((_, Some(existing))) => existing.created_at,
                _ => event.recorded_at,
            };
            row.set_pool(row.stock, i64::from(available))?;
            Some(ReservationRow {
                hold_id: hold_id.as_uuid(),
                listing_id: row.listing_id,
                holder_id: holder.as_uuid(),
                quantity: i64::from(quantity),
                status: "active".to_owned(),
                expires_at,
                order_id: order_id.map(|o| o.as_uuid()),
                created_at,
                updated_at: event.recorded_at,
            })
        }
        ReservationEvent::HoldConfirmed {
            stock,
            available,
            order_id,
            ..
        } => {
            let mut hold = open_hold("confirmed")?;
            if let Some(order_id) = order_id {
                hold.order_id = Some(order_id.as_uuid());
            }
            row.set_pool(i64::from(stock), i64::from(available))?;
            Some(hold)
        }
        ReservationEvent::HoldReleased { available, .. } => {
            let hold = open_hold("released")?;
            row.set_pool(row.stock, i64::from(available))?;
            Some(hold)
        }
        ReservationEvent::HoldExpired { available, .. } => {
            let hold = open_hold("expired")?;
            row.set_pool(row.stock, i64::from(available))?;
            Some(hold)
        }
    };
    if let Some(hold) = &hold
        && hold.listing_id != row.listing_id
    {
        return Err(ApplyError::new(format!(
            "hold {} belongs to listing {}, not {}",
            hold.hold_id, hold.listing_id, row.listing_id
        )));
    }
    Ok((row, hold))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rows::assert_columns_match;

    #[test]
    fn rows_carry_exactly_the_columns_of_their_tables() {
        let now = Utc::now();
        assert_columns_match(
            &LISTINGS,
            &ListingRow {
                listing_id: Uuid::nil(),
                seller_id: Uuid::nil(),
                product_id: Uuid::nil(),
                title: String::new(),
                description: String::new(),
                category: String::new(),
                subcategory: None,
                condition: String::new(),
                price_amount: 1,
                currency: "EUR".into(),
                city: String::new(),
                country: String::new(),
                lat: None,
                lon: None,
                attributes: serde_json::json!({}),
                images: serde_json::json!([]),
                status: "active".into(),
                payout_wallet_id: None,
                stock: 0,
                held: 0,
                available: 0,
                created_at: now,
                updated_at: now,
                version: 1,
            },
        );
        assert_columns_match(
            &RESERVATIONS,
            &ReservationRow {
                hold_id: Uuid::nil(),
                listing_id: Uuid::nil(),
                holder_id: Uuid::nil(),
                quantity: 1,
                status: "active".into(),
                expires_at: now,
                order_id: None,
                created_at: now,
                updated_at: now,
            },
        );
    }
}
