//! `history`: the events of one aggregate, of one correlation (a checkout
//! and everything it caused), of one actor, or of a time range, in global
//! order, with who did what and why.
//!
//! The metadata filters scan the log: the write path carries no index for
//! them (every index costs every append), and an audit can wait seconds.

use anyhow::Context as _;
use clap::Args;
use event_store::Position;
use event_store::global::StoredJson;
use futures::TryStreamExt;
use uuid::Uuid;

use crate::output::{self, cell};
use crate::{Database, Outcome};

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("selector").multiple(true).required(true)
    .args(["aggregate_id", "correlation_id", "actor_id", "from_time", "to_time"]))]
pub struct HistoryArgs {
    #[command(flatten)]
    database: Database,
    /// Listing, Reservation, Order, Wallet or ProductTimeline (with --aggregate-id).
    #[arg(long, requires = "aggregate_id", value_parser = clap::builder::PossibleValuesParser::new(domain::audit::AGGREGATE_TYPES.iter().copied()))]
    aggregate_type: Option<String>,
    /// One aggregate (with --aggregate-type).
    #[arg(long, requires = "aggregate_type")]
    aggregate_id: Option<Uuid>,
    /// Events of commands that share this correlation id.
    #[arg(long)]
    correlation_id: Option<Uuid>,
    /// Events of commands this user (or Souk: the nil UUID) sent.
    #[arg(long)]
    actor_id: Option<Uuid>,
    /// Events recorded at or after this time (RFC 3339).
    #[arg(long, value_parser = crate::parse_time)]
    from_time: Option<chrono::DateTime<chrono::Utc>>,
    /// Events recorded at or before this time (RFC 3339).
    #[arg(long, value_parser = crate::parse_time)]
    to_time: Option<chrono::DateTime<chrono::Utc>>,
    /// JSON lines even on a terminal.
    #[arg(long)]
    json: bool,
}

/// One event as `history` prints it.
#[derive(Debug, serde::Serialize)]
struct Line {
    position: Position,
    recorded_at: chrono::DateTime<chrono::Utc>,
    aggregate_type: String,
    aggregate_id: String,
    sequence: i64,
    event_type: String,
    event_version: String,
    event_id: Uuid,
    metadata: StoredJson,
    payload: StoredJson,
}

type Row = (
    i64,
    i64,
    chrono::DateTime<chrono::Utc>,
    String,
    String,
    i64,
    String,
    String,
    Uuid,
    String,
    String,
);

pub async fn run(args: &HistoryArgs) -> anyhow::Result<Outcome> {
    if let (Some(from), Some(to)) = (args.from_time, args.to_time) {
        anyhow::ensure!(from <= to, "--from-time {from} is after --to-time {to}");
    }
    let pool = args.database.connect().await?;
    let table = output::stdout_is_terminal() && !args.json;
    let mut rows = sqlx::query_as::<_, Row>(
        "SELECT transaction_id::text::bigint, position, recorded_at, aggregate_type, aggregate_id,
                sequence, event_type, event_version, event_id, metadata::text, payload::text
           FROM events
          WHERE ($1::text IS NULL OR (aggregate_type = $1 AND aggregate_id = $2))
            AND ($3::text IS NULL OR metadata->>'correlation_id' = $3)
            AND ($4::text IS NULL OR metadata->>'actor_id' = $4)
            AND ($5::timestamptz IS NULL OR recorded_at >= $5)
            AND ($6::timestamptz IS NULL OR recorded_at <= $6)
          ORDER BY events.transaction_id, events.position",
    )
    .bind(args.aggregate_type.as_deref())
    .bind(args.aggregate_id.map(|id| id.to_string()))
    .bind(args.correlation_id.map(|id| id.to_string()))
    .bind(args.actor_id.map(|id| id.to_string()))
    .bind(args.from_time)
    .bind(args.to_time)
    .fetch(&pool);
    let mut out = output::stdout();
    let mut lines = Vec::new();
    let mut count = 0u64;
    while let Some(row) = rows.try_next().await.context("reading the history")? {
        let line = line_of(row).context("reading the history")?;
        count += 1;
        if table {
            lines.push(line);
        } else if !output::written(output::json_line(&mut out, &line))? {
            return Ok(Outcome::Fine);
        }
    }
    if table && !lines.is_empty() {
        let rows: Vec<Vec<String>> = lines.iter().map(table_row).collect();
        output::written(output::table(
            &mut out,
            &[
                "recorded at",
                "aggregate",
                "seq",
                "event",
                "actor",
                "correlation",
            ],
            &rows,
        ))?;
    }
    output::done(&mut out)?;
    anyhow::ensure!(count > 0, "no events match");
    Ok(Outcome::Fine)
}

fn line_of(row: Row) -> Result<Line, serde_json::Error> {
    let (
        transaction_id,
        position,
        recorded_at,
        aggregate_type,
        aggregate_id,
        sequence,
        event_type,
        event_version,
        event_id,
        metadata,
        payload,
    ) = row;
    Ok(Line {
        position: Position {
            transaction_id: transaction_id as u64,
            position,
        },
        recorded_at,
        aggregate_type,
        aggregate_id,
        sequence,
        event_type,
        event_version,
        event_id,
        metadata: StoredJson::from_text(metadata)?,
        payload: StoredJson::from_text(payload)?,
    })
}

fn table_row(line: &Line) -> Vec<String> {
    let metadata: serde_json::Value = line.metadata.parse().unwrap_or_default();
    let field = |name: &str| metadata[name].as_str().unwrap_or("").to_owned();
    vec![
        line.recorded_at.format("%Y-%m-%d %H:%M:%S%.3f").to_string(),
        format!("{} {}", line.aggregate_type, line.aggregate_id),
        line.sequence.to_string(),
        line.event_type.clone(),
        cell(
            &format!("{} {}", field("actor_role"), field("actor_id")),
            46,
        ),
        field("correlation_id"),
    ]
}
