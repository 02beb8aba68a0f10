//! `replay-tool`: Souk's command line for auditors and operators.
//!
//! Each subcommand is one variant of [`Command`] with its own argument struct
//! and a module that runs it: `history`, `state`, `export` (reading the
//! log), `audit` (`anchor` and `verify`), `status`, `rebuild`,
//! `dead_letters` and `timers` (operating the read side); `token` and `keys`
//! are here. Results go to stdout, alone, so that scripts can capture them
//! (`TOKEN=$(replay-tool token ...)`): a table on a terminal, JSON otherwise
//! or with `--json` (`output`). Progress and notes go to stderr.
//!
//! Exit codes: 0 fine; 1 a usage or runtime error, said in one line on
//! stderr; 2 an integrity or invariant failure (`verify`).

mod audit;
mod dead_letters;
mod export;
mod history;
mod output;
mod rebuild;
mod state;
mod status;
mod timers;

use std::path::PathBuf;
use std::process::ExitCode;

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
    /// Events of one aggregate, one correlation, one actor or a time range,
    /// in global order: a table on a terminal, JSON lines otherwise.
    History(history::HistoryArgs),
    /// An aggregate's state as of a version or a time, rebuilt from its
    /// events by the domain's own code (never from a snapshot).
    State(state::StateArgs),
    /// The log in global order as JSON lines, streamed (constant memory).
    Export(export::ExportArgs),
    /// Print a short token committing to the whole log up to now; keep it
    /// outside the database and check it later with `verify --anchor`.
    Anchor(audit::AnchorArgs),
    /// Check the hash chains, the stream heads, the business invariants
    /// (always in a full verify) and an anchor. Exits 2 when something is wrong.
    Verify(audit::VerifyArgs),
    /// Projections and partitions (checkpoint, lag, dead letters), rebuilds
    /// in progress, the relay and stuck timers.
    Status(status::StatusArgs),
    /// Rebuild projections aside and swap them in atomically while the
    /// projectors keep running; resumes an interrupted rebuild.
    Rebuild(rebuild::RebuildArgs),
    /// Events the projections parked: list, retry, skip.
    #[command(subcommand)]
    DeadLetters(dead_letters::DeadLettersCommand),
    /// The process managers' durable timers: list, retry.
    #[command(subcommand)]
    Timers(timers::TimersCommand),
}

/// The event store to read.
#[derive(Debug, Args)]
pub struct Database {
    /// Postgres connection string (never printed).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/souk",
        hide_env_values = true
    )]
    database_url: String,
}

impl Database {
    /// A small pool on the event store, its migrations applied (replay-tool
    /// is one of the writers that do). Six connections: `rebuild --all`
    /// reads on one and applies each of the four projections on its own.
    pub async fn connect(&self) -> anyhow::Result<sqlx::PgPool> {
        let config = event_store::PoolConfig {
            max_connections: 6,
            ..event_store::PoolConfig::default()
        };
        let pool =
            event_store::pool(&self.database_url, &config).context("parsing DATABASE_URL")?;
        match event_store::migrate(&pool).await {
            Ok(()) => Ok(pool),
            // The pool only says it timed out: one direct attempt says why.
            Err(error) if event_store::migration_unreachable(&error) => {
                let options = event_store::connect_options(&self.database_url)
                    .context("parsing DATABASE_URL")?;
                let why = match sqlx::ConnectOptions::connect(&options).await {
                    Err(error) => error.to_string(),
                    Ok(_) => "it stopped answering".to_owned(),
                };
                anyhow::bail!(
                    "cannot reach Postgres at {}:{} ({why}); is it running, and is DATABASE_URL right?",
                    options.get_host(),
                    options.get_port()
                )
            }
            Err(error) => {
                Err(anyhow::Error::new(error).context("applying the event store's migrations"))
            }
        }
    }
}

/// How a command ended, when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Fine,
    /// The log is not intact or breaks an invariant (exit 2).
    IntegrityFailure,
}

/// A time given on the command line.
pub fn parse_time(text: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|time| time.with_timezone(&chrono::Utc))
        .map_err(|error| format!("`{text}` is not an RFC 3339 time ({error})"))
}

/// A position token given on the command line.
pub fn parse_position(text: &str) -> Result<event_store::Position, String> {
    event_store::Position::parse_token(text).map_err(|error| error.to_string())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            use clap::error::ErrorKind;
            if matches!(
                error.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
            ) {
                let _ = error.print();
                return ExitCode::SUCCESS;
            }
            if error.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                eprintln!("replay-tool: a subcommand is required (see --help)");
                return ExitCode::from(1);
            }
            let text = error.to_string();
            let first = text
                .lines()
                .find(|line| !line.trim().is_empty())
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ");
            eprintln!("replay-tool: {first} (see --help)");
            return ExitCode::from(1);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("replay-tool: cannot start: {error}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(Outcome::Fine) => ExitCode::SUCCESS,
        Ok(Outcome::IntegrityFailure) => ExitCode::from(2),
        Err(error) => {
            let text = format!("{error:#}").replace('\n', " ");
            eprintln!("replay-tool: {text}");
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<Outcome> {
    match cli.command {
        Command::Token(args) => token(&args).map(|()| Outcome::Fine),
        Command::Keys(paths) => keys(&paths).map(|()| Outcome::Fine),
        Command::History(args) => history::run(&args).await,
        Command::State(args) => state::run(&args).await,
        Command::Export(args) => export::run(&args).await,
        Command::Anchor(args) => audit::anchor(&args).await,
        Command::Verify(args) => audit::verify(&args).await,
        Command::Status(args) => status::run(&args).await,
        Command::Rebuild(args) => rebuild::run(&args).await,
        Command::DeadLetters(command) => dead_letters::run(command).await,
        Command::Timers(command) => timers::run(command).await,
    }
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
