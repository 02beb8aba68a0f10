//! `export`: the log in global order as JSON lines, for external tools:
//! `event_id`, `position` (token), `aggregate_type`, `aggregate_id`,
//! `sequence`, `event_type`, `event_version`, `recorded_at`, `payload` and
//! `metadata` (the stored JSON text itself, so the hash can be checked
//! outside), `prev_hash` and `hash` (hex).
//!
//! One streamed statement reads every event below the global order's
//! horizon (taken first, so no event can later appear before the last one
//! exported: `event_store::global`), in `(transaction_id, position)` order
//! through its index, and each row is written as it arrives: memory stays
//! flat whatever the log's size.

use std::io::Write;

use anyhow::Context as _;
use clap::Args;
use event_store::Position;
use futures::TryStreamExt;

use crate::{Database, Outcome, output};

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    database: Database,
    /// Only events after this position token.
    #[arg(long, value_parser = crate::parse_position)]
    from_position: Option<Position>,
    /// Only events at or before this position token.
    #[arg(long, value_parser = crate::parse_position)]
    to_position: Option<Position>,
    /// Only events of this aggregate type.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(domain::audit::AGGREGATE_TYPES.iter().copied()))]
    aggregate_type: Option<String>,
}

type Row = (
    uuid::Uuid,
    i64,
    i64,
    String,
    String,
    i64,
    String,
    String,
    chrono::DateTime<chrono::Utc>,
    String,
    String,
    Vec<u8>,
    Vec<u8>,
);

pub async fn run(args: &ExportArgs) -> anyhow::Result<Outcome> {
    let pool = args.database.connect().await?;
    let from = args.from_position.unwrap_or(Position::START);
    if let Some(to) = args.to_position {
        anyhow::ensure!(from <= to, "--from-position is after --to-position");
    }
    let horizon = event_store::global::horizon(&pool)
        .await
        .context("reading the global order's horizon")?;
    let mut rows = sqlx::query_as::<_, Row>(
        "SELECT event_id, transaction_id::text::bigint, position, aggregate_type, aggregate_id,
                sequence, event_type, event_version, recorded_at, payload::text, metadata::text,
                prev_hash, hash
           FROM events
          WHERE (transaction_id, position) > ($1::text::xid8, $2)
            AND transaction_id < $3::text::xid8
            AND ($4::text IS NULL OR (transaction_id, position) <= ($4::text::xid8, $5))
            AND ($6::text IS NULL OR aggregate_type = $6)
          ORDER BY events.transaction_id, events.position",
    )
    .bind(from.transaction_id.to_string())
    .bind(from.position)
    .bind(horizon.below.to_string())
    .bind(args.to_position.map(|to| to.transaction_id.to_string()))
    .bind(args.to_position.map_or(0, |to| to.position))
    .bind(args.aggregate_type.as_deref())
    .fetch(&pool);
    let mut out = output::stdout();
    let mut line = Vec::with_capacity(4096);
    let mut count = 0u64;
    let mut last = None;
    while let Some(row) = rows.try_next().await.context("reading the log")? {
        line.clear();
        write_line(&mut line, &row)?;
        last = Some(Position {
            transaction_id: row.1 as u64,
            position: row.2,
        });
        count += 1;
        if !output::written(out.write_all(&line))? {
            return Ok(Outcome::Fine);
        }
    }
    output::done(&mut out)?;
    match last {
        Some(last) => eprintln!(
            "exported {count} events, the last at position {}",
            last.token()
        ),
        None => eprintln!("exported 0 events"),
    }
    Ok(Outcome::Fine)
}

/// One event as a JSON line. The stored JSON goes out as it is; only line
/// breaks between its tokens (never inside a JSON string, where they cannot
/// be) become spaces, so that each event stays on one line.
fn write_line(line: &mut Vec<u8>, row: &Row) -> anyhow::Result<()> {
    let (
        event_id,
        transaction_id,
        position,
        aggregate_type,
        aggregate_id,
        sequence,
        event_type,
        event_version,
        recorded_at,
        payload,
        metadata,
        prev_hash,
        hash,
    ) = row;
    let position = Position {
        transaction_id: *transaction_id as u64,
        position: *position,
    };
    let raw = |line: &mut Vec<u8>, json: &str| {
        line.extend(
            json.bytes()
                .map(|b| if b == b'\n' || b == b'\r' { b' ' } else { b }),
        );
    };
    write!(
        line,
        "{{\"event_id\":\"{event_id}\",\"position\":\"{}\",\"aggregate_type\":",
        position.token()
    )?;
    serde_json::to_writer(&mut *line, aggregate_type)?;
    line.extend_from_slice(b",\"aggregate_id\":");
    serde_json::to_writer(&mut *line, aggregate_id)?;
    write!(line, ",\"sequence\":{sequence},\"event_type\":")?;
    serde_json::to_writer(&mut *line, event_type)?;
    line.extend_from_slice(b",\"event_version\":");
    serde_json::to_writer(&mut *line, event_version)?;
    write!(
        line,
        ",\"recorded_at\":\"{}\",\"payload\":",
        recorded_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
    )?;
    raw(line, payload);
    line.extend_from_slice(b",\"metadata\":");
    raw(line, metadata);
    writeln!(
        line,
        ",\"prev_hash\":\"{}\",\"hash\":\"{}\"}}",
        hex_of(prev_hash),
        hex_of(hash)
    )?;
    Ok(())
}

fn hex_of(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut text, byte| {
            let _ = write!(text, "{byte:02x}");
            text
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exported_line_is_one_json_document_with_the_stored_json_inside() {
        let row: Row = (
            uuid::Uuid::nil(),
            5,
            9,
            "Wallet".into(),
            "w\"1".into(),
            2,
            "FundsDeposited".into(),
            "1".into(),
            chrono::DateTime::from_timestamp(0, 0).unwrap(),
            "{\"a\":\n 1}".into(),
            "{}".into(),
            vec![0; 2],
            vec![255; 2],
        );
        let mut line = Vec::new();
        write_line(&mut line, &row).unwrap();
        let text = String::from_utf8(line).unwrap();
        assert_eq!(text.matches('\n').count(), 1);
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["aggregate_id"], "w\"1");
        assert_eq!(value["payload"]["a"], 1);
        assert_eq!(value["hash"], "ffff");
        assert_eq!(value["position"], "00000000000000050000000000000009");
    }
}
