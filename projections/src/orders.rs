//! Projection "orders": Order events into `rm_orders` (one row per order,
//! found by buyer or by seller) and `rm_seller_stats` (counters per seller).
//!
//! Seller stats are sums, and a seller's orders are spread over every
//! partition, so the partitions add to the same rows concurrently. Each batch
//! therefore accumulates its deltas in memory and adds them at the end with
//! one statement, in seller order: two batches lock the rows they share in
//! the same order and never deadlock. The sums are integers (fulfillment time
//! in whole seconds), so they do not depend on the order the partitions add
//! them in, and a rebuild, which adds them in global order, gets the same.
//!
//! Derived rates are left to readers: fulfillment rate is delivered over
//! confirmed, return rate returned over delivered, average fulfillment time
//! `fulfillment_seconds_sum / orders_delivered` (confirmation to delivery),
//! rating `rating_sum / rating_count`.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use domain::order::{OrderEvent, OrderStatus};
use event_store::global::RecordedEvent;
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::engine::{ApplyError, Refused, aggregate_uuid, parse_event};
use crate::rows::{self, Table};

pub(crate) const ORDERS: Table = Table {
    name: "rm_orders",
    key: &["order_id"],
    columns: &[
        "order_id",
        "checkout_id",
        "buyer_id",
        "seller_id",
        "status",
        "payment_method",
        "total_amount",
        "currency",
        "lines",
        "shipping_address",
        "buyer_wallet_id",
        "seller_wallet_id",
        "carrier",
        "tracking_number",
        "reject_reason",
        "cancel_reason",
        "return_reason",
        "escrow_released",
        "rating",
        "review_comment",
        "placed_at",
        "confirmed_at",
        "shipped_at",
        "delivered_at",
        "completed_at",
        "cancelled_at",
        "returned_at",
        "refunded_at",
        "updated_at",
        "version",
    ],
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderRow {
    order_id: Uuid,
    checkout_id: Uuid,
    buyer_id: Uuid,
    seller_id: Uuid,
    status: String,
    payment_method: String,
    total_amount: i64,
    currency: String,
    lines: serde_json::Value,
    shipping_address: serde_json::Value,
    buyer_wallet_id: Option<Uuid>,
    seller_wallet_id: Option<Uuid>,
    carrier: Option<String>,
    tracking_number: Option<String>,
    reject_reason: Option<String>,
    cancel_reason: Option<String>,
    return_reason: Option<String>,
    escrow_released: bool,
    rating: Option<i16>,
    review_comment: Option<String>,
    placed_at: DateTime<Utc>,
    confirmed_at: Option<DateTime<Utc>>,
    shipped_at: Option<DateTime<Utc>>,
    delivered_at: Option<DateTime<Utc>>,
    completed_at: Option<DateTime<Utc>>,
    cancelled_at: Option<DateTime<Utc>>,
    returned_at: Option<DateTime<Utc>>,
    refunded_at: Option<DateTime<Utc>>,
    updated_at: DateTime<Utc>,
    version: i64,
}

/// What a batch adds to one seller's stats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct StatsDelta {
    placed: i64,
    confirmed: i64,
    shipped: i64,
    delivered: i64,
    cancelled: i64,
    returned: i64,
    fulfillment_seconds: i64,
    rating_sum: i64,
    rating_count: i64,
}

impl StatsDelta {
    fn add(&mut self, other: &StatsDelta) {
        self.placed += other.placed;
        self.confirmed += other.confirmed;
        self.shipped += other.shipped;
        self.delivered += other.delivered;
        self.cancelled += other.cancelled;
        self.returned += other.returned;
        self.fulfillment_seconds += other.fulfillment_seconds;
        self.rating_sum += other.rating_sum;
        self.rating_count += other.rating_count;
    }
}

pub(crate) async fn apply(
    conn: &mut PgConnection,
    schema: &str,
    events: &[&RecordedEvent],
) -> Result<Vec<Refused>, sqlx::Error> {
    let mut refused = Vec::new();
    let mut parsed = Vec::with_capacity(events.len());
    for (index, event) in events.iter().enumerate() {
        match aggregate_uuid(event).and_then(|id| Ok((id, parse_event::<OrderEvent>(event)?))) {
            Ok((order_id, payload)) => parsed.push((index, *event, order_id, payload)),
            Err(why) => refused.push((index, why)),
        }
    }
    let mut ids: Vec<Uuid> = parsed.iter().map(|(_, _, id, _)| *id).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut orders: HashMap<Uuid, OrderRow> =
        rows::load::<OrderRow>(conn, schema, &ORDERS, "order_id", &ids)
            .await?
            .into_iter()
            .map(|row| (row.order_id, row))
            .collect();
    let mut changed = Vec::new();
    // Ordered by seller: the order the stats rows are locked in.
    let mut stats: BTreeMap<Uuid, StatsDelta> = BTreeMap::new();
    for (index, event, order_id, payload) in parsed {
        match apply_one(orders.get(&order_id), order_id, event, payload) {
            Ok((row, delta)) => {
                if delta != StatsDelta::default() {
                    stats.entry(row.seller_id).or_default().add(&delta);
                }
                orders.insert(order_id, row);
                changed.push(order_id);
            }
            Err(why) => refused.push((index, why)),
        }
    }
    changed.sort_unstable();
    changed.dedup();
    let rows: Vec<&OrderRow> = changed.iter().filter_map(|id| orders.get(id)).collect();
    rows::upsert(conn, schema, &ORDERS, &rows).await?;
    add_stats(conn, schema, &stats).await?;
    Ok(refused)
}

async fn add_stats(
    conn: &mut PgConnection,
    schema: &str,
    stats: &BTreeMap<Uuid, StatsDelta>,
) -> Result<(), sqlx::Error> {
    if stats.is_empty() {
        return Ok(());
    }
    let column = |f: fn(&StatsDelta) -> i64| stats.values().map(f).collect::<Vec<i64>>();
    let sellers: Vec<Uuid> = stats.keys().copied().collect();
    sqlx::query(&format!(
        "INSERT INTO {schema}.rm_seller_stats AS s
                (seller_id, orders_placed, orders_confirmed, orders_shipped, orders_delivered,
                 orders_cancelled, orders_returned, fulfillment_seconds_sum, rating_sum,
                 rating_count)
         SELECT seller_id, placed, confirmed, shipped, delivered, cancelled, returned,
                fulfillment_seconds, rating_sum, rating_count
           FROM UNNEST($1::uuid[], $2::int8[], $3::int8[], $4::int8[], $5::int8[], $6::int8[],
                       $7::int8[], $8::int8[], $9::int8[], $10::int8[])
             AS d(seller_id, placed, confirmed, shipped, delivered, cancelled, returned,
                  fulfillment_seconds, rating_sum, rating_count)
          ORDER BY seller_id
         ON CONFLICT (seller_id) DO UPDATE SET
                orders_placed = s.orders_placed + EXCLUDED.orders_placed,
                orders_confirmed = s.orders_confirmed + EXCLUDED.orders_confirmed,
                orders_shipped = s.orders_shipped + EXCLUDED.orders_shipped,
                orders_delivered = s.orders_delivered + EXCLUDED.orders_delivered,
                orders_cancelled = s.orders_cancelled + EXCLUDED.orders_cancelled,
                orders_returned = s.orders_returned + EXCLUDED.orders_returned,
                fulfillment_seconds_sum = s.fulfillment_seconds_sum + EXCLUDED.fulfillment_seconds_sum,
                rating_sum = s.rating_sum + EXCLUDED.rating_sum,
                rating_count = s.rating_count + EXCLUDED.rating_count"
    ))
    .bind(&sellers)
    .bind(column(|d| d.placed))
    .bind(column(|d| d.confirmed))
    .bind(column(|d| d.shipped))
    .bind(column(|d| d.delivered))
    .bind(column(|d| d.cancelled))
    .bind(column(|d| d.returned))
    .bind(column(|d| d.fulfillment_seconds))
    .bind(column(|d| d.rating_sum))
    .bind(column(|d| d.rating_count))
    .execute(conn)
    .await?;
    Ok(())
}

fn status(status: OrderStatus) -> String {
    status.as_str().to_owned()
}

/// The order's row after `payload` and what it adds to its seller's stats,
/// or why it cannot be applied.
fn apply_one(
    current: Option<&OrderRow>,
    order_id: Uuid,
    event: &RecordedEvent,
    payload: OrderEvent,
) -> Result<(OrderRow, StatsDelta), ApplyError> {
    let at = event.recorded_at;
    let existing = || {
        current.cloned().ok_or_else(|| {
            ApplyError::new(format!(
                "{} for order {order_id}, which the projection has not seen placed",
                event.event_type
            ))
        })
    };
    let mut delta = StatsDelta::default();
    let mut row = match payload {
        OrderEvent::OrderPlaced {
            order_id: placed,
            checkout_id,
            buyer,
            seller,
            lines,
            shipping_address,
            payment_method,
            buyer_wallet,
            seller_wallet,
            total,
        } => {
            if current.is_some() {
                return Err(ApplyError::new(format!(
                    "order {order_id} was already placed"
                )));
            }
            if placed.as_uuid() != order_id {
                return Err(ApplyError::new(format!(
                    "OrderPlaced names order {placed} in the stream of {order_id}"
                )));
            }
            delta.placed = 1;
            OrderRow {
                order_id,
                checkout_id: checkout_id.as_uuid(),
                buyer_id: buyer.as_uuid(),
                seller_id: seller.as_uuid(),
                status: status(OrderStatus::Placed),
                payment_method: payment_method.as_str().to_owned(),
                total_amount: total.amount(),
                currency: total.currency().as_str().to_owned(),
                lines: serde_json::to_value(&lines)
                    .map_err(|error| ApplyError::new(format!("lines: {error}")))?,
                shipping_address: serde_json::to_value(&shipping_address)
                    .map_err(|error| ApplyError::new(format!("shipping address: {error}")))?,
                buyer_wallet_id: buyer_wallet.map(|w| w.as_uuid()),
                seller_wallet_id: seller_wallet.map(|w| w.as_uuid()),
                carrier: None,
                tracking_number: None,
                reject_reason: None,
                cancel_reason: None,
                return_reason: None,
                escrow_released: false,
                rating: None,
                review_comment: None,
                placed_at: at,
                confirmed_at: None,
                shipped_at: None,
                delivered_at: None,
                completed_at: None,
                cancelled_at: None,
                returned_at: None,
                refunded_at: None,
                updated_at: at,
                version: event.sequence,
            }
        }
        OrderEvent::OrderRejected { code, .. } => {
            let mut row = existing()?;
            row.status = status(OrderStatus::Rejected);
            row.reject_reason = Some(code);
            row
        }
        OrderEvent::OrderAwaitingPayment => {
            let mut row = existing()?;
            row.status = status(OrderStatus::AwaitingPayment);
            row
        }
        OrderEvent::PaymentConfirmed { .. } | OrderEvent::OrderConfirmed => {
            let mut row = existing()?;
            row.status = status(OrderStatus::Confirmed);
            row.confirmed_at = Some(at);
            delta.confirmed = 1;
            row
        }
        OrderEvent::OrderShipped {
            carrier,
            tracking_number,
            shipped_at,
            ..
        } => {
            let mut row = existing()?;
            row.status = status(OrderStatus::Shipped);
            row.carrier = Some(carrier.as_str().to_owned());
            row.tracking_number = Some(tracking_number.as_str().to_owned());
            row.shipped_at = Some(shipped_at);
            delta.shipped = 1;
            row
        }
        OrderEvent::OrderDelivered {
            delivered_at,
            escrow_to_release,
            ..
        } => {
            let mut row = existing()?;
            row.status = status(OrderStatus::Delivered);
            row.delivered_at = Some(delivered_at);
            row.escrow_released |= escrow_to_release.is_some();
            delta.delivered = 1;
            // Whole seconds from confirmation (or placement, for an order
            // that never needed one) to delivery, never negative.
            let from = row.confirmed_at.unwrap_or(row.placed_at);
            delta.fulfillment_seconds = (delivered_at - from).num_seconds().max(0);
            row
        }
        OrderEvent::EscrowReleased { .. } => {
            let mut row = existing()?;
            row.escrow_released = true;
            row
        }
        OrderEvent::OrderCompleted => {
            let mut row = existing()?;
            row.status = status(OrderStatus::Completed);
            row.completed_at = Some(at);
            row
        }
        OrderEvent::OrderCancelled { reason, .. } => {
            let mut row = existing()?;
            row.status = status(OrderStatus::Cancelled);
            row.cancel_reason = Some(reason.as_str().to_owned());
            row.cancelled_at = Some(at);
            delta.cancelled = 1;
            row
        }
        OrderEvent::ReturnRequested { reason } => {
            let mut row = existing()?;
            row.status = status(OrderStatus::ReturnRequested);
            row.return_reason = Some(reason.as_str().to_owned());
            row
        }
        OrderEvent::OrderReturned => {
            let mut row = existing()?;
            row.status = status(OrderStatus::Returned);
            row.returned_at = Some(at);
            delta.returned = 1;
            row
        }
        OrderEvent::OrderRefunded { .. } => {
            let mut row = existing()?;
            row.status = status(OrderStatus::Refunded);
            row.refunded_at = Some(at);
            row
        }
        OrderEvent::SellerReviewed {
            seller,
            rating,
            comment,
        } => {
            let mut row = existing()?;
            if seller.as_uuid() != row.seller_id {
                return Err(ApplyError::new(format!(
                    "SellerReviewed names seller {seller}, but order {order_id} is seller {}'s",
                    row.seller_id
                )));
            }
            if row.rating.is_some() {
                return Err(ApplyError::new(format!(
                    "order {order_id} was already reviewed"
                )));
            }
            row.rating = Some(i16::from(rating));
            row.review_comment = Some(comment.as_str().to_owned());
            delta.rating_sum = i64::from(rating);
            delta.rating_count = 1;
            row
        }
    };
    row.updated_at = at;
    row.version = event.sequence;
    Ok((row, delta))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rows::assert_columns_match;

    #[test]
    fn rows_carry_exactly_the_columns_of_their_table() {
        let now = Utc::now();
        assert_columns_match(
            &ORDERS,
            &OrderRow {
                order_id: Uuid::nil(),
                checkout_id: Uuid::nil(),
                buyer_id: Uuid::nil(),
                seller_id: Uuid::nil(),
                status: "placed".into(),
                payment_method: "cod".into(),
                total_amount: 1,
                currency: "EUR".into(),
                lines: serde_json::json!([]),
                shipping_address: serde_json::json!({}),
                buyer_wallet_id: None,
                seller_wallet_id: None,
                carrier: None,
                tracking_number: None,
                reject_reason: None,
                cancel_reason: None,
                return_reason: None,
                escrow_released: false,
                rating: None,
                review_comment: None,
                placed_at: now,
                confirmed_at: None,
                shipped_at: None,
                delivered_at: None,
                completed_at: None,
                cancelled_at: None,
                returned_at: None,
                refunded_at: None,
                updated_at: now,
                version: 1,
            },
        );
    }
}
