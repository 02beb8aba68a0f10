//! `replay-tool`: Souk's command line for auditors and operators.
//!
//! Each subcommand is one variant of [`Command`] with its own argument struct
//! and one function that runs it. Results go to stdout, alone, so that they
//! can be captured by scripts (`TOKEN=$(replay-tool token ...)`); progress and
//! notes go to stderr.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use domain::values::Role;
use identity::{ensure_dev_key_pair, mint_token};
use uuid::Uuid;

#[derive(Debug, Parser)]
#[command(
    name = "replay-tool",
    version,
    about = "Souk's CLI for auditors and operators"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a dev bearer token signed with the private key (generating the
    /// dev key pair first if it is missing).
    Token(TokenArgs),
    /// Generate the dev key pair unless both files already exist.
    Keys(KeyPaths),
    /// Recompute every aggregate's hash chain (or one's) and report any
    /// altered, removed or reordered event. Exits 2 when the log is not intact.
    Verify(VerifyArgs),
    /// Print the history of one aggregate, oldest first, one JSON object per
    /// event with its metadata (who, which command, when).
    History(HistoryArgs),
    /// Rebuild one projection's read models from the event store and swap
    /// them in atomically while the projectors keep running; prints a JSON
    /// report (position reached, events applied and parked).
    Rebuild(RebuildArgs),
}

/// The event store to read.
#[derive(Debug, Args)]
struct Database {
    /// Postgres connection string (never printed).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/souk",
        hide_env_values = true
    )]
    database_url: String,
}

#[derive(Debug, Args)]
struct VerifyArgs {
    #[command(flatten)]
    database: Database,
    /// Check only this aggregate type (with --aggregate-id).
    #[arg(long, requires = "aggregate_id")]
    aggregate_type: Option<String>,
    /// Check only this aggregate (with --aggregate-type).
    #[arg(long, requires = "aggregate_type")]
    aggregate_id: Option<String>,
}

#[derive(Debug, Args)]
struct RebuildArgs {
    #[command(flatten)]
    database: Database,
    /// listings, orders, wallets or timelines.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(projections::PROJECTIONS.iter().copied()))]
    projection: String,
    /// The projectors' partition count (every partition gets a checkpoint).
    #[arg(
        long,
        env = "SOUK_PARTITIONS",
        default_value_t = event_store::fanout::DEFAULT_PARTITIONS,
        value_parser = clap::value_parser!(u32).range(1..=i64::from(event_store::fanout::MAX_PARTITIONS))
    )]
    partitions: u32,
}

#[derive(Debug, Args)]
struct HistoryArgs {
    #[command(flatten)]
    database: Database,
    /// Listing, Reservation, Order, Wallet or ProductTimeline.
    #[arg(long)]
    aggregate_type: String,
    #[arg(long)]
    aggregate_id: String,
}

/// Where the JWT key pair lives.
#[derive(Debug, Args)]
struct KeyPaths {
    /// PEM file of the RSA private key (PKCS#8) that signs tokens.
    #[arg(
        long = "private-key",
        env = "SOUK_JWT_PRIVATE_KEY",
        default_value = "./data/keys/jwt-private.pem"
    )]
    private_key: PathBuf,
    /// PEM file of the RSA public key (SPKI) that the APIs verify tokens with.
    #[arg(
        long = "public-key",
        env = "SOUK_JWT_PUBLIC_KEY",
        default_value = "./data/keys/jwt-public.pem"
    )]
    public_key: PathBuf,
}

#[derive(Debug, Args)]
struct TokenArgs {
    /// The user the token speaks for (its `sub` claim).
    #[arg(long)]
    sub: Uuid,
    /// buyer, seller, admin, auditor or operator.
    #[arg(long, value_parser = parse_role)]
    role: Role,
    /// Lifetime of the token.
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u32).range(1..))]
    ttl_seconds: u32,
    /// `iss` claim; the APIs check it when they have SOUK_JWT_ISSUER set.
    #[arg(long, env = "SOUK_JWT_ISSUER")]
    issuer: Option<String>,
    /// `aud` claim; the APIs check it when they have SOUK_JWT_AUDIENCE set.
    #[arg(long, env = "SOUK_JWT_AUDIENCE")]
    audience: Option<String>,
    #[command(flatten)]
    keys: KeyPaths,
}

fn parse_role(text: &str) -> Result<Role, String> {
    Role::parse(text).map_err(|error| error.to_string())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Token(args) => token(&args),
        Command::Keys(paths) => keys(&paths),
        Command::Verify(args) => verify(&args).await,
        Command::History(args) => history(&args).await,
        Command::Rebuild(args) => rebuild(&args).await,
    }
}

async fn connect(database: &Database) -> anyhow::Result<sqlx::PgPool> {
    let pool = event_store::pool(&database.database_url, &event_store::PoolConfig::default())
        .context("parsing DATABASE_URL")?;
    event_store::migrate(&pool)
        .await
        .context("connecting to the event store and applying migrations")?;
    Ok(pool)
}

async fn verify(args: &VerifyArgs) -> anyhow::Result<()> {
    let pool = connect(&args.database).await?;
    let only = args
        .aggregate_type
        .as_deref()
        .zip(args.aggregate_id.as_deref());
    let report = event_store::verify::verify_chains(&pool, only)
        .await
        .context("reading the events")?;
    println!(
        "{}",
        serde_json::to_string_pretty(&report).context("printing the report")?
    );
    if report.is_intact() {
        eprintln!(
            "intact: {} events of {} aggregates verified",
            report.events_checked, report.aggregates_checked
        );
        Ok(())
    } else {
        eprintln!(
            "NOT INTACT: {} problems in {} events",
            report.problems_found, report.events_checked
        );
        std::process::exit(2);
    }
}

async fn history(args: &HistoryArgs) -> anyhow::Result<()> {
    let pool = connect(&args.database).await?;
    let rows: Vec<(
        i64,
        String,
        String,
        serde_json::Value,
        serde_json::Value,
        chrono::DateTime<chrono::Utc>,
    )> = sqlx::query_as(
        "SELECT sequence, event_type, event_version, payload::jsonb, metadata::jsonb, recorded_at
               FROM events WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY sequence",
    )
    .bind(&args.aggregate_type)
    .bind(&args.aggregate_id)
    .fetch_all(&pool)
    .await
    .context("reading the history")?;
    if rows.is_empty() {
        anyhow::bail!(
            "no events for {} {}",
            args.aggregate_type,
            args.aggregate_id
        );
    }
    for (sequence, event_type, event_version, payload, metadata, recorded_at) in rows {
        let line = serde_json::json!({
            "sequence": sequence,
            "event_type": event_type,
            "event_version": event_version,
            "recorded_at": recorded_at,
            "metadata": metadata,
            "payload": payload,
        });
        println!("{line}");
    }
    Ok(())
}

async fn rebuild(args: &RebuildArgs) -> anyhow::Result<()> {
    let pool = connect(&args.database).await?;
    eprintln!("rebuilding {} from the event store...", args.projection);
    let report = projections::rebuild(&pool, &args.projection, args.partitions)
        .await
        .with_context(|| format!("rebuilding {}", args.projection))?;
    println!(
        "{}",
        serde_json::to_string_pretty(&report).context("printing the report")?
    );
    eprintln!(
        "swapped in: {} events applied, {} parked in dead_letters, up to {}",
        report.events_applied, report.events_parked, report.position
    );
    Ok(())
}

fn token(args: &TokenArgs) -> anyhow::Result<()> {
    ensure_keys(&args.keys)?;
    let private_pem = std::fs::read(&args.keys.private_key).with_context(|| {
        format!(
            "cannot read the private key {}",
            args.keys.private_key.display()
        )
    })?;
    let token = mint_token(
        &private_pem,
        args.sub,
        args.role.as_str(),
        chrono::Duration::seconds(i64::from(args.ttl_seconds)),
        args.issuer.as_deref(),
        args.audience.as_deref(),
    )
    .context("cannot mint the token")?;
    println!("{token}");
    Ok(())
}

fn keys(paths: &KeyPaths) -> anyhow::Result<()> {
    if !ensure_keys(paths)? {
        eprintln!(
            "kept the existing dev JWT key pair: private {}, public {}",
            paths.private_key.display(),
            paths.public_key.display()
        );
    }
    Ok(())
}

/// Generates the dev key pair if a half is missing, saying so on stderr.
fn ensure_keys(paths: &KeyPaths) -> anyhow::Result<bool> {
    let generated = ensure_dev_key_pair(&paths.private_key, &paths.public_key)
        .context("cannot prepare the dev JWT key pair")?;
    if generated {
        eprintln!(
            "generated a dev JWT key pair: private {}, public {}",
            paths.private_key.display(),
            paths.public_key.display()
        );
    }
    Ok(generated)
}
