//! `replay-tool`: Souk's command line for auditors and operators.
//!
//! Each subcommand is one variant of [`Command`] with its own argument struct
//! and one function that runs it. Results go to stdout, alone, so that they
//! can be captured by scripts (`TOKEN=$(replay-tool token ...)`); progress and
//! notes go to stderr.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use command_api::auth::{ensure_dev_key_pair, mint_token};
use domain::values::Role;
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
    }
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
