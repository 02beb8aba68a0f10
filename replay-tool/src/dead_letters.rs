//! `dead-letters`: the events the projections parked, and what an operator
//! does with them: `list`, `retry` (after a fix: apply it again; see
//! `projections::retry` for when that is refused) and `skip` (give up on it,
//! recorded with who, when and why, and reported by `verify`).

use clap::{Args, Subcommand};

use crate::{Database, Outcome, output};

#[derive(Debug, Subcommand)]
pub enum DeadLettersCommand {
    /// Parked events, oldest first (at most 1,000).
    List(ListArgs),
    /// Apply parked events again (one, or all in global order).
    Retry(RetryArgs),
    /// Give up on a parked event, with a reason.
    Skip(SkipArgs),
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    database: Database,
    /// Only this projection's.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(projections::PROJECTIONS.iter().copied()))]
    projection: Option<String>,
    /// JSON lines instead of a table.
    #[arg(long)]
    json: bool,
}

/// Who acts: recorded with every retry and skip.
#[derive(Debug, Args)]
pub struct Operator {
    /// Your name, recorded for auditors (default: $SOUK_OPERATOR, else $USER).
    #[arg(long, env = "SOUK_OPERATOR")]
    operator: Option<String>,
}

impl Operator {
    fn name(&self) -> anyhow::Result<String> {
        self.operator
            .clone()
            .or_else(|| std::env::var("USER").ok())
            .filter(|name| !name.trim().is_empty())
            .map(|name| name.chars().take(200).collect())
            .ok_or_else(|| anyhow::anyhow!("say who you are with --operator"))
    }
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("which").required(true).args(["id", "all"]))]
pub struct RetryArgs {
    #[command(flatten)]
    database: Database,
    /// The letter's id (from `dead-letters list`).
    id: Option<i64>,
    /// Every parked event, oldest first.
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    operator: Operator,
    /// JSON lines instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct SkipArgs {
    #[command(flatten)]
    database: Database,
    /// The letter's id (from `dead-letters list`).
    id: i64,
    /// Why it is skipped (kept for auditors).
    #[arg(long)]
    reason: String,
    #[command(flatten)]
    operator: Operator,
}

pub async fn run(command: DeadLettersCommand) -> anyhow::Result<Outcome> {
    match command {
        DeadLettersCommand::List(args) => list(&args).await,
        DeadLettersCommand::Retry(args) => retry(&args).await,
        DeadLettersCommand::Skip(args) => skip(&args).await,
    }
}

async fn list(args: &ListArgs) -> anyhow::Result<Outcome> {
    let pool = args.database.connect().await?;
    let letters = projections::dead_letters(&pool, args.projection.as_deref(), 1000).await?;
    let mut out = output::stdout();
    if args.json || !output::stdout_is_terminal() {
        for letter in &letters {
            if !output::written(output::json_line(&mut out, letter))? {
                return Ok(Outcome::Fine);
            }
        }
    } else {
        let rows: Vec<Vec<String>> = letters
            .iter()
            .map(|l| {
                vec![
                    l.id.to_string(),
                    l.projection.clone(),
                    format!("{} {}", l.aggregate_type, l.aggregate_id),
                    l.sequence.to_string(),
                    l.event_type.clone(),
                    l.position.token(),
                    output::cell(&l.error, 60),
                ]
            })
            .collect();
        output::written(output::table(
            &mut out,
            &[
                "id",
                "projection",
                "aggregate",
                "seq",
                "event",
                "position",
                "error",
            ],
            &rows,
        ))?;
    }
    output::done(&mut out)?;
    Ok(Outcome::Fine)
}

async fn retry(args: &RetryArgs) -> anyhow::Result<Outcome> {
    let operator = args.operator.name()?;
    let pool = args.database.connect().await?;
    let outcomes =
        projections::retry(&pool, if args.all { None } else { args.id }, &operator).await?;
    let mut out = output::stdout();
    if args.json || !output::stdout_is_terminal() {
        for outcome in &outcomes {
            if !output::written(output::json_line(&mut out, outcome))? {
                break;
            }
        }
    } else {
        let rows: Vec<Vec<String>> = outcomes
            .iter()
            .map(|o| {
                vec![
                    o.id.to_string(),
                    o.projection.clone(),
                    format!("{} {}", o.aggregate_type, o.aggregate_id),
                    o.outcome.to_owned(),
                    output::cell(&o.detail, 80),
                ]
            })
            .collect();
        output::written(output::table(
            &mut out,
            &["id", "projection", "aggregate", "outcome", "detail"],
            &rows,
        ))?;
    }
    output::done(&mut out)?;
    let failed = outcomes.iter().filter(|o| o.outcome != "applied").count();
    anyhow::ensure!(
        failed == 0,
        "{failed} of {} parked events were not applied (see above)",
        outcomes.len()
    );
    eprintln!("{} parked events applied", outcomes.len());
    Ok(Outcome::Fine)
}

async fn skip(args: &SkipArgs) -> anyhow::Result<Outcome> {
    let operator = args.operator.name()?;
    let pool = args.database.connect().await?;
    let letter = projections::skip(&pool, args.id, &args.reason, &operator).await?;
    eprintln!(
        "skipped {} of {} {} (sequence {}) for {}; recorded as skipped by {operator}",
        letter.event_type,
        letter.aggregate_type,
        letter.aggregate_id,
        letter.sequence,
        letter.projection
    );
    Ok(Outcome::Fine)
}
