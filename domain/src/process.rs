//! The pure decisions of Souk's process managers (sagas and timers). The
//! command API and the timer runner execute them durably; here they are
//! plain functions from data to data, so that they can be tested without
//! a database and replayed without surprises.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeDelta, Utc};
use uuid::Uuid;

use crate::order::OrderLine;
use crate::values::{UserId, ValidationError};

/// Longest time a stock hold may last.
pub const MAX_HOLD_TTL_SECONDS: u32 = 86_400;

/// Splits a checkout's lines into one order per seller (mall mode), each
/// keeping the lines in the order the buyer gave them. Sellers come out in
/// id order, so a replayed checkout creates the same orders in the same
/// order.
pub fn order_total_by_seller(lines: &[(UserId, OrderLine)]) -> BTreeMap<UserId, Vec<OrderLine>> {
    let mut orders: BTreeMap<UserId, Vec<OrderLine>> = BTreeMap::new();
    for (seller, line) in lines {
        orders.entry(*seller).or_default().push(line.clone());
    }
    orders
}

/// When a hold placed `now` for `ttl_seconds` expires.
pub fn hold_expiry(now: DateTime<Utc>, ttl_seconds: u32) -> Result<DateTime<Utc>, ValidationError> {
    if !(1..=MAX_HOLD_TTL_SECONDS).contains(&ttl_seconds) {
        return Err(ValidationError::new(
            "invalid_ttl",
            format!("ttl_seconds must be between 1 and {MAX_HOLD_TTL_SECONDS}"),
        ));
    }
    now.checked_add_signed(TimeDelta::seconds(i64::from(ttl_seconds)))
        .ok_or_else(|| ValidationError::new("invalid_ttl", "the expiry is out of range"))
}

/// The id of a command a process manager issues, derived from what the step
/// is about (`deterministic_command_id("checkout.hold_funds", &[order_id])`),
/// so that a replayed step carries the same id and the store recognises it
/// as already done.
///
/// A version 8 UUID made of a 128-bit FNV-1a hash. Each part is hashed with
/// its length first, so `["ab", "c"]` and `["a", "bc"]` differ. Not a
/// cryptographic hash: the inputs are Souk's own ids, not an adversary's.
pub fn deterministic_command_id(namespace: &str, parts: &[&str]) -> Uuid {
    const OFFSET_BASIS: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;

    let mut hash = OFFSET_BASIS;
    let mut feed = |bytes: &[u8]| {
        for byte in bytes {
            hash ^= u128::from(*byte);
            hash = hash.wrapping_mul(PRIME);
        }
    };
    for part in std::iter::once(&namespace).chain(parts) {
        let len = u64::try_from(part.len()).unwrap_or(u64::MAX);
        feed(&len.to_le_bytes());
        feed(part.as_bytes());
    }
    uuid::Builder::from_custom_bytes(hash.to_be_bytes()).into_uuid()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::values::{HoldId, ListingId, Money, ProductId};
    use chrono::TimeZone;

    fn line(n: u128) -> OrderLine {
        OrderLine {
            listing_id: ListingId::from_uuid(Uuid::from_u128(n)),
            product_id: ProductId::from_uuid(Uuid::from_u128(n)),
            quantity: 1,
            unit_price: Money::parse_positive(100, "EUR").unwrap(),
            hold_id: HoldId::from_uuid(Uuid::from_u128(n)),
        }
    }

    #[test]
    fn a_mall_checkout_becomes_one_order_per_seller_keeping_line_order() {
        let (a, b) = (
            UserId::from_uuid(Uuid::from_u128(2)),
            UserId::from_uuid(Uuid::from_u128(1)),
        );
        let orders = order_total_by_seller(&[
            (a, line(1)),
            (b, line(2)),
            (a, line(3)),
            (b, line(4)),
            (a, line(5)),
        ]);
        assert_eq!(orders.len(), 2);
        assert_eq!(orders[&a], vec![line(1), line(3), line(5)]);
        assert_eq!(orders[&b], vec![line(2), line(4)]);
        assert!(order_total_by_seller(&[]).is_empty());
    }

    #[test]
    fn a_hold_lasts_one_second_to_one_day() {
        let now = Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap();
        assert_eq!(hold_expiry(now, 1).unwrap(), now + TimeDelta::seconds(1));
        assert_eq!(hold_expiry(now, 86_400).unwrap(), now + TimeDelta::days(1));
        assert_eq!(hold_expiry(now, 0).unwrap_err().code, "invalid_ttl");
        assert_eq!(hold_expiry(now, 86_401).unwrap_err().code, "invalid_ttl");
        assert_eq!(
            hold_expiry(DateTime::<Utc>::MAX_UTC, 10).unwrap_err().code,
            "invalid_ttl"
        );
    }

    #[test]
    fn a_replayed_step_gets_the_same_command_id() {
        let order = "0195f0c3-0000-7000-8000-000000000001";
        let first = deterministic_command_id("checkout.hold_funds", &[order]);
        assert_eq!(
            first,
            deterministic_command_id("checkout.hold_funds", &[order])
        );
        assert_eq!(first.get_version_num(), 8);
        assert_eq!(first.get_variant(), uuid::Variant::RFC4122);
        // Pinned (computed independently): the id must not change between
        // releases, or a step replayed after an upgrade would run twice.
        assert_eq!(
            deterministic_command_id("ns", &["a"]).to_string(),
            "7b48a690-533a-8e94-baf6-ac94a3a6a1c8"
        );
    }

    #[test]
    fn different_steps_get_different_command_ids() {
        let ids = [
            deterministic_command_id("checkout.hold_funds", &["o1"]),
            deterministic_command_id("checkout.hold_funds", &["o2"]),
            deterministic_command_id("checkout.reserve", &["o1"]),
            deterministic_command_id("checkout.hold_funds", &["o1", ""]),
            deterministic_command_id("checkout.hold_funds", &[]),
            deterministic_command_id("ab", &["c"]),
            deterministic_command_id("a", &["bc"]),
            deterministic_command_id("x", &["ab", "c"]),
            deterministic_command_id("x", &["a", "bc"]),
        ];
        let distinct: std::collections::BTreeSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
    }
}
