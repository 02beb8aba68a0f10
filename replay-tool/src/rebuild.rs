//! `rebuild`: projections rebuilt aside and swapped in, with a progress bar
//! (rate and ETA) on a terminal and a plain line every few seconds
//! otherwise. Killed or interrupted, it resumes from its last batch when run
//! again; `--restart` starts over, `--abandon` drops the work.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use projections::{RebuildOptions, RebuildPhase, RebuildProgress};

use crate::{Database, Outcome, output};

/// How often a plain progress line is printed.
const PLAIN_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("which").required(true).args(["projection", "all"]))]
pub struct RebuildArgs {
    #[command(flatten)]
    database: Database,
    /// listings, orders, wallets or timelines.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(projections::PROJECTIONS.iter().copied()))]
    projection: Option<String>,
    /// Every projection, in one pass over the log.
    #[arg(long)]
    all: bool,
    /// Start over instead of resuming an interrupted rebuild.
    #[arg(long, conflicts_with = "abandon")]
    restart: bool,
    /// Drop an interrupted rebuild's work and stop.
    #[arg(long)]
    abandon: bool,
    /// The projectors' partition count (every partition gets a checkpoint).
    #[arg(
        long,
        env = "SOUK_PARTITIONS",
        default_value_t = event_store::fanout::DEFAULT_PARTITIONS,
        value_parser = clap::value_parser!(u32).range(1..=i64::from(event_store::fanout::MAX_PARTITIONS))
    )]
    partitions: u32,
    /// Events per batch (one transaction and one progress record each).
    #[arg(long, default_value_t = projections::REBUILD_BATCH_EVENTS, value_parser = clap::value_parser!(i64).range(1..=10_000))]
    batch_events: i64,
}

pub async fn run(args: &RebuildArgs) -> anyhow::Result<Outcome> {
    let names: Vec<&str> = match &args.projection {
        Some(name) => vec![name.as_str()],
        None => projections::PROJECTIONS.to_vec(),
    };
    let pool = args.database.connect().await?;
    if args.abandon {
        let dropped = projections::abandon(&pool, &names).await?;
        if dropped.is_empty() {
            eprintln!("no interrupted rebuild of {} to abandon", names.join(", "));
        } else {
            eprintln!("abandoned the rebuild of {}", dropped.join(", "));
        }
        return Ok(Outcome::Fine);
    }
    let mut reporter = Reporter::new(output::stderr_is_terminal());
    let reports = projections::rebuild_projections(
        &pool,
        &names,
        RebuildOptions {
            partitions: args.partitions,
            restart: args.restart,
            batch_events: args.batch_events,
        },
        &mut |progress| reporter.show(progress),
    )
    .await
    .with_context(|| format!("rebuilding {}", names.join(", ")))?;
    reporter.finish();
    let mut out = output::stdout();
    output::written(output::json_pretty(&mut out, &reports))?;
    output::done(&mut out)?;
    for report in &reports {
        eprintln!(
            "{} swapped in{}: {} events applied, {} parked in dead_letters, up to {}",
            report.projection,
            if report.resumed { " (resumed)" } else { "" },
            report.events_applied,
            report.events_parked,
            report.position
        );
    }
    Ok(Outcome::Fine)
}

/// Shows progress as a bar or as plain lines.
struct Reporter {
    bar: Option<ProgressBar>,
    started: Instant,
    last_line: Option<Instant>,
}

impl Reporter {
    fn new(terminal: bool) -> Self {
        let bar = terminal.then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {human_pos}/{human_len} events, {per_sec}, ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar
        });
        Self {
            bar,
            started: Instant::now(),
            last_line: None,
        }
    }

    fn show(&mut self, progress: &RebuildProgress) {
        let what = progress.projections.join(", ");
        match &self.bar {
            Some(bar) => {
                bar.set_length(progress.events_total);
                match progress.phase {
                    RebuildPhase::Building => {
                        bar.set_message(format!("rebuilding {what}"));
                        bar.set_position(progress.events_read);
                    }
                    RebuildPhase::Swapping => bar.set_message(format!("swapping {what} in")),
                    RebuildPhase::Swapped => bar.set_message(format!("swapped {what} in")),
                }
            }
            None => {
                let due = self
                    .last_line
                    .is_none_or(|last| last.elapsed() >= PLAIN_EVERY);
                if progress.phase != RebuildPhase::Building || due {
                    self.last_line = Some(Instant::now());
                    let seconds = self.started.elapsed().as_secs_f64().max(1e-3);
                    let rate = progress.events_read as f64 / seconds;
                    let left = progress.events_total.saturating_sub(progress.events_read);
                    let eta = if rate > 0.0 { left as f64 / rate } else { 0.0 };
                    let phase = match progress.phase {
                        RebuildPhase::Building => "rebuilding",
                        RebuildPhase::Swapping => "swapping in",
                        RebuildPhase::Swapped => "swapped in",
                    };
                    eprintln!(
                        "{phase} {what}: {}/{} events, {rate:.0} events/s, ETA {eta:.0} s, at {}",
                        progress.events_read, progress.events_total, progress.position
                    );
                }
            }
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
