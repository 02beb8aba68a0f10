//! `timers`: the process managers' durable timers (reservation expiry,
//! unpaid orders, escrow auto-release), as the `timers` table has them.
//!
//! A timer is *stuck* when firing it failed repeatedly (at least
//! `--min-attempts` times, with an error kept) or when it is overdue by more
//! than five minutes (no worker fires it: command-api's timer worker leases
//! a due timer for a minute at a time). `timers retry ID` makes it due now
//! with its attempts reset; its last error stays until the next attempt.

use anyhow::Context as _;
use clap::{Args, Subcommand};
use uuid::Uuid;

use crate::{Database, Outcome, output};

/// The SQL condition of a stuck timer; `$1` is the least failed attempts.
pub const STUCK: &str =
    "(last_error IS NOT NULL AND attempts >= $1) OR due_at < now() - interval '5 minutes'";
/// The default of `--min-attempts`.
pub const STUCK_MIN_ATTEMPTS: i32 = 3;

#[derive(Debug, Subcommand)]
pub enum TimersCommand {
    /// Armed timers, soonest first (at most 1,000).
    List(ListArgs),
    /// Make a timer due now, its attempts reset.
    Retry(RetryArgs),
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    database: Database,
    /// Only timers that failed repeatedly or that nothing fires.
    #[arg(long)]
    stuck: bool,
    /// Failed attempts from which a timer counts as stuck.
    #[arg(long, default_value_t = STUCK_MIN_ATTEMPTS, value_parser = clap::value_parser!(i32).range(1..))]
    min_attempts: i32,
    /// JSON lines instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct RetryArgs {
    #[command(flatten)]
    database: Database,
    /// The timer's id (from `timers list`).
    id: Uuid,
}

#[derive(Debug, serde::Serialize, sqlx::FromRow)]
struct Timer {
    timer_id: Uuid,
    kind: String,
    due_at: chrono::DateTime<chrono::Utc>,
    attempts: i32,
    last_error: Option<String>,
    payload: serde_json::Value,
}

pub async fn run(command: TimersCommand) -> anyhow::Result<Outcome> {
    match command {
        TimersCommand::List(args) => list(&args).await,
        TimersCommand::Retry(args) => retry(&args).await,
    }
}

async fn list(args: &ListArgs) -> anyhow::Result<Outcome> {
    let pool = args.database.connect().await?;
    let timers: Vec<Timer> = sqlx::query_as(&format!(
        "SELECT timer_id, kind, due_at, attempts, last_error, payload FROM timers
          WHERE NOT $2 OR {STUCK}
          ORDER BY due_at, timer_id LIMIT 1000"
    ))
    .bind(args.min_attempts)
    .bind(args.stuck)
    .fetch_all(&pool)
    .await
    .context("reading the timers")?;
    let mut out = output::stdout();
    if args.json || !output::stdout_is_terminal() {
        for timer in &timers {
            if !output::written(output::json_line(&mut out, timer))? {
                return Ok(Outcome::Fine);
            }
        }
    } else {
        let rows: Vec<Vec<String>> = timers
            .iter()
            .map(|t| {
                vec![
                    t.timer_id.to_string(),
                    t.kind.clone(),
                    t.due_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                    t.attempts.to_string(),
                    output::cell(t.last_error.as_deref().unwrap_or(""), 60),
                ]
            })
            .collect();
        output::written(output::table(
            &mut out,
            &["timer", "kind", "due", "attempts", "last error"],
            &rows,
        ))?;
    }
    output::done(&mut out)?;
    Ok(Outcome::Fine)
}

async fn retry(args: &RetryArgs) -> anyhow::Result<Outcome> {
    let pool = args.database.connect().await?;
    let done = sqlx::query("UPDATE timers SET due_at = now(), attempts = 0 WHERE timer_id = $1")
        .bind(args.id)
        .execute(&pool)
        .await
        .context("rescheduling the timer")?;
    anyhow::ensure!(done.rows_affected() == 1, "no timer {}", args.id);
    eprintln!(
        "timer {} is due now; the timer worker fires it within its poll interval",
        args.id
    );
    Ok(Outcome::Fine)
}
