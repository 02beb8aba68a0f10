//! `state`: an aggregate as it was at a version or a time, rebuilt from its
//! events by the domain's own decoding and `apply` (never from a snapshot,
//! which may be of a later version).

use anyhow::Context as _;
use clap::Args;
use domain::Aggregate;
use event_store::Position;
use uuid::Uuid;

use crate::{Database, Outcome, output};

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("at").args(["at_version", "at_time"]))]
pub struct StateArgs {
    #[command(flatten)]
    database: Database,
    /// Listing, Reservation, Order, Wallet or ProductTimeline.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(domain::audit::AGGREGATE_TYPES.iter().copied()))]
    aggregate_type: String,
    #[arg(long)]
    aggregate_id: Uuid,
    /// The state after this many events (default: all).
    #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
    at_version: Option<i64>,
    /// The state after the events recorded at or before this time (RFC 3339).
    #[arg(long, value_parser = crate::parse_time)]
    at_time: Option<chrono::DateTime<chrono::Utc>>,
}

/// The state, as printed.
#[derive(Debug, serde::Serialize)]
struct Printed {
    aggregate_type: String,
    aggregate_id: String,
    version: i64,
    /// When its last applied event was recorded.
    as_of: chrono::DateTime<chrono::Utc>,
    /// The global position of its last applied event.
    position: Position,
    state: serde_json::Value,
}

type Row = (
    i64,
    String,
    String,
    String,
    chrono::DateTime<chrono::Utc>,
    i64,
    i64,
);

pub async fn run(args: &StateArgs) -> anyhow::Result<Outcome> {
    let pool = args.database.connect().await?;
    let id = args.aggregate_id.to_string();
    let (total, first_at): (i64, Option<chrono::DateTime<chrono::Utc>>) = sqlx::query_as(
        "SELECT count(*), min(recorded_at) FROM events WHERE aggregate_type = $1 AND aggregate_id = $2",
    )
    .bind(&args.aggregate_type)
    .bind(&id)
    .fetch_one(&pool)
    .await
    .context("reading the aggregate")?;
    anyhow::ensure!(total > 0, "there is no {} {id}", args.aggregate_type);
    if let Some(version) = args.at_version {
        anyhow::ensure!(
            version <= total,
            "{} {id} has {total} events: there is no version {version}",
            args.aggregate_type
        );
    }
    if let (Some(at), Some(first)) = (args.at_time, first_at) {
        anyhow::ensure!(
            at >= first,
            "{} {id} did not exist yet at {at} (its first event was recorded at {first})",
            args.aggregate_type
        );
    }
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT sequence, event_type, event_version, payload::text, recorded_at,
                transaction_id::text::bigint, position
           FROM events
          WHERE aggregate_type = $1 AND aggregate_id = $2
            AND ($3::bigint IS NULL OR sequence <= $3)
            AND ($4::timestamptz IS NULL OR recorded_at <= $4)
          ORDER BY sequence",
    )
    .bind(&args.aggregate_type)
    .bind(&id)
    .bind(args.at_version)
    .bind(args.at_time)
    .fetch_all(&pool)
    .await
    .context("reading the events")?;
    use domain::{listing::Listing, order::Order, reservation::Reservation};
    use domain::{timeline::ProductTimeline, wallet::Wallet};
    let state = match args.aggregate_type.as_str() {
        Wallet::TYPE => replay::<Wallet>(&rows),
        Order::TYPE => replay::<Order>(&rows),
        Reservation::TYPE => replay::<Reservation>(&rows),
        Listing::TYPE => replay::<Listing>(&rows),
        ProductTimeline::TYPE => replay::<ProductTimeline>(&rows),
        other => anyhow::bail!("`{other}` is not an aggregate type"),
    }
    .with_context(|| format!("replaying {} {id}", args.aggregate_type))?;
    let Some(last) = rows.last() else {
        anyhow::bail!("{} {id} has no event at that point", args.aggregate_type);
    };
    let printed = Printed {
        aggregate_type: args.aggregate_type.clone(),
        aggregate_id: id,
        version: last.0,
        as_of: last.4,
        position: Position {
            transaction_id: last.5 as u64,
            position: last.6,
        },
        state,
    };
    let mut out = output::stdout();
    output::written(output::json_pretty(&mut out, &printed))?;
    output::done(&mut out)?;
    Ok(Outcome::Fine)
}

/// Applies `rows` in order to a fresh `A` with the domain's decoding.
fn replay<A: Aggregate>(rows: &[Row]) -> anyhow::Result<serde_json::Value> {
    let mut state = A::default();
    for (expected, (sequence, event_type, event_version, payload, ..)) in (1..).zip(rows) {
        anyhow::ensure!(
            *sequence == expected,
            "event {expected} is missing (the next one is {sequence}): run verify"
        );
        let event = domain::audit::decode::<A>(event_type, event_version, payload)
            .map_err(|finding| anyhow::anyhow!("event {sequence}: {}", finding.message))?;
        state.apply(event);
    }
    serde_json::to_value(&state).context("printing the state")
}
