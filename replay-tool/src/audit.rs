//! `anchor` and `verify`: what an auditor runs to prove the log intact.

use anyhow::Context as _;
use clap::Args;
use event_store::anchor::Anchor;
use event_store::verify::{VerifyOptions, VerifyReport};
use uuid::Uuid;

use crate::{Database, Outcome, output};

#[derive(Debug, Args)]
pub struct AnchorArgs {
    #[command(flatten)]
    database: Database,
    /// A JSON object (anchor, position, events) instead of the bare token.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    database: Database,
    /// Check only this aggregate type (with --aggregate-id).
    #[arg(long, requires = "aggregate_id", value_parser = clap::builder::PossibleValuesParser::new(domain::audit::AGGREGATE_TYPES.iter().copied()))]
    aggregate_type: Option<String>,
    /// Check only this aggregate (with --aggregate-type).
    #[arg(long, requires = "aggregate_type")]
    aggregate_id: Option<Uuid>,
    /// An anchor token from `replay-tool anchor`: the log up to its position
    /// must be exactly what it was when it was taken.
    #[arg(long, value_parser = parse_anchor)]
    anchor: Option<Anchor>,
    /// Replay the business invariants (always done when the whole log is verified).
    #[arg(long)]
    invariants: bool,
    /// The full report as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_anchor(text: &str) -> Result<Anchor, String> {
    Anchor::parse_token(text).map_err(|error| error.to_string())
}

pub async fn anchor(args: &AnchorArgs) -> anyhow::Result<Outcome> {
    let pool = args.database.connect().await?;
    let anchor = event_store::anchor::take(&pool)
        .await
        .context("digesting the log")?;
    let mut out = output::stdout();
    let printed = if args.json {
        output::json_line(
            &mut out,
            &serde_json::json!({
                "anchor": anchor.token(),
                "position": anchor.position,
                "events": anchor.events,
            }),
        )
    } else {
        use std::io::Write;
        writeln!(out, "{}", anchor.token())
    };
    output::written(printed)?;
    output::done(&mut out)?;
    eprintln!(
        "anchor of {} events up to position {}: keep it outside the database and check it \
         with `replay-tool verify --anchor`",
        anchor.events,
        anchor.position.token()
    );
    Ok(Outcome::Fine)
}

pub async fn verify(args: &VerifyArgs) -> anyhow::Result<Outcome> {
    let pool = args.database.connect().await?;
    let id = args.aggregate_id.map(|id| id.to_string());
    let only = args.aggregate_type.as_deref().zip(id.as_deref());
    let options = VerifyOptions {
        only,
        invariants: args.invariants || only.is_none(),
        anchor: args.anchor,
    };
    let report = event_store::verify::verify(&pool, &options)
        .await
        .context("reading the log")?;
    let mut out = output::stdout();
    if args.json {
        output::written(output::json_pretty(&mut out, &report))?;
    } else {
        output::written(describe(&mut out, &report))?;
    }
    output::done(&mut out)?;
    if report.is_intact() {
        eprintln!(
            "intact: {} events of {} aggregates verified{}{}",
            report.events_checked,
            report.aggregates_checked,
            if report.invariants_checked {
                ", invariants hold"
            } else {
                ""
            },
            if report.anchor.is_some() {
                ", anchor matches"
            } else {
                ""
            },
        );
        Ok(Outcome::Fine)
    } else {
        eprintln!(
            "NOT INTACT: {} integrity problems, {} invariant violations{} in {} events",
            report.problems_found,
            report.violations_found,
            match &report.anchor {
                Some(anchor) if !anchor.matches => ", anchor does not match",
                _ => "",
            },
            report.events_checked
        );
        Ok(Outcome::IntegrityFailure)
    }
}

/// The report for people.
fn describe(out: &mut impl std::io::Write, report: &VerifyReport) -> std::io::Result<()> {
    writeln!(
        out,
        "{} events of {} aggregates: {} integrity problems, {} invariant violations{}",
        report.events_checked,
        report.aggregates_checked,
        report.problems_found,
        report.violations_found,
        if report.invariants_checked {
            ""
        } else {
            " (invariants not replayed)"
        }
    )?;
    if !report.problems.is_empty() {
        let rows: Vec<Vec<String>> = report
            .problems
            .iter()
            .map(|problem| {
                vec![
                    format!("{:?}", problem.kind),
                    format!("{} {}", problem.aggregate_type, problem.aggregate_id),
                    problem.sequence.to_string(),
                    problem.position.map(|p| p.token()).unwrap_or_default(),
                ]
            })
            .collect();
        writeln!(out)?;
        output::table(
            out,
            &["problem", "aggregate", "sequence", "position"],
            &rows,
        )?;
    }
    if !report.violations.is_empty() {
        let rows: Vec<Vec<String>> = report
            .violations
            .iter()
            .map(|violation| {
                vec![
                    violation.code.to_owned(),
                    match (&violation.aggregate_type, &violation.aggregate_id) {
                        (Some(t), Some(i)) => format!("{t} {i}"),
                        _ => "(whole log)".to_owned(),
                    },
                    violation
                        .sequence
                        .map(|s| s.to_string())
                        .unwrap_or_default(),
                    violation.position.map(|p| p.token()).unwrap_or_default(),
                    violation.message.clone(),
                ]
            })
            .collect();
        writeln!(out)?;
        output::table(
            out,
            &["violation", "aggregate", "sequence", "position", "what"],
            &rows,
        )?;
    }
    if let Some(anchor) = &report.anchor {
        writeln!(out)?;
        writeln!(
            out,
            "anchor {}: {}",
            anchor.anchor,
            if anchor.matches {
                "matches".to_owned()
            } else {
                format!(
                    "DOES NOT MATCH (the log up to its position now digests to {})",
                    anchor.recomputed
                )
            }
        )?;
    }
    if !report.skipped_events.is_empty() {
        writeln!(out)?;
        writeln!(
            out,
            "events skipped by operators (not projected, on purpose):"
        )?;
        let rows: Vec<Vec<String>> = report
            .skipped_events
            .iter()
            .map(|skip| {
                vec![
                    skip.projection.clone(),
                    format!("{} {}", skip.aggregate_type, skip.aggregate_id),
                    skip.sequence.to_string(),
                    skip.position.token(),
                    format!("{} ({})", skip.operator, skip.db_user),
                    skip.skipped_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                    skip.reason.clone().unwrap_or_default(),
                ]
            })
            .collect();
        output::table(
            out,
            &[
                "projection",
                "aggregate",
                "sequence",
                "position",
                "by",
                "at",
                "why",
            ],
            &rows,
        )?;
    }
    Ok(())
}
