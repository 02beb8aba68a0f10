//! Key material: the dev RSA key pair a local start generates, loading the
//! verifier the APIs start with, and minting tokens.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::Context;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsa::RsaPrivateKey;
use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
use serde::Serialize;
use uuid::Uuid;

use crate::JwtVerifier;

/// Size of the dev RSA keys; jsonwebtoken's RSA backends want at least 2048.
pub(crate) const DEV_KEY_BITS: usize = 2048;

/// Generates a dev RSA key pair unless both files already exist; see
/// [`ensure_dev_key_pair`].
pub fn generate_dev_key_pair(private_path: &Path, public_path: &Path) -> anyhow::Result<()> {
    ensure_dev_key_pair(private_path, public_path).map(|_| ())
}

/// Writes a fresh 2048-bit RSA key pair, the private key as PKCS#8 PEM (mode
/// 0600) and the public key as SPKI PEM, unless both files already exist.
/// Returns whether it generated one. Parent directories are created. An
/// existing pair is never overwritten, so tokens minted earlier stay valid;
/// a lone half is replaced, since it is useless without its other half.
pub fn ensure_dev_key_pair(private_path: &Path, public_path: &Path) -> anyhow::Result<bool> {
    if private_path.is_file() && public_path.is_file() {
        return Ok(false);
    }
    let private_key = RsaPrivateKey::new(&mut rand::rngs::OsRng, DEV_KEY_BITS)
        .context("cannot generate an RSA key")?;
    let private_pem = private_key
        .to_pkcs8_pem(LineEnding::LF)
        .context("cannot encode the private key as PKCS#8 PEM")?;
    let public_pem = private_key
        .to_public_key()
        .to_public_key_pem(LineEnding::LF)
        .context("cannot encode the public key as SPKI PEM")?;
    write_new_file(private_path, private_pem.as_bytes(), 0o600)?;
    write_new_file(public_path, public_pem.as_bytes(), 0o644)?;
    Ok(true)
}

/// The verifier an API starts with: the public key at `public_path`, after a
/// dev key pair is generated there and at `private_path` when neither file
/// exists (a first local start).
pub fn load_verifier(
    public_path: &Path,
    private_path: &Path,
    issuer: Option<String>,
    audience: Option<String>,
) -> anyhow::Result<JwtVerifier> {
    if !public_path.exists() && !private_path.exists() {
        ensure_dev_key_pair(private_path, public_path).context("generating a dev key pair")?;
        tracing::warn!(
            public_key = %public_path.display(),
            "no token key configured: generated a dev key pair"
        );
    }
    JwtVerifier::from_public_pem_file(public_path, issuer, audience)
        .context("loading the token public key")
}

/// Writes `contents` to a temporary sibling created with `mode`, then renames
/// it over `path`, so a reader never sees half a key and the mode holds
/// whatever the file there had before.
fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    if let Some(parent) = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    {
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create the directory {}", parent.display()))?;
    }
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(format!(".tmp-{}", std::process::id()));
    let temporary = Path::new(&temporary);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(temporary)
        .with_context(|| format!("cannot create {}", temporary.display()))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", temporary.display()))?;
    fs::rename(temporary, path)
        .with_context(|| format!("cannot move {} to {}", temporary.display(), path.display()))?;
    Ok(())
}

#[derive(Debug, Serialize)]
pub(crate) struct MintedClaims<'a> {
    pub sub: String,
    pub role: &'a str,
    pub iat: i64,
    pub exp: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<&'a str>,
}

/// Signs an RS256 token with `private_pem` (PKCS#8 or PKCS#1 PEM) carrying
/// `sub`, `role`, `iat`, `exp = now + ttl` and, when given, `iss` and `aud`.
/// `role` is not checked here, and a negative `ttl` gives an expired token:
/// both are useful to test the verifier.
pub fn mint_token(
    private_pem: &[u8],
    sub: Uuid,
    role: &str,
    ttl: chrono::Duration,
    issuer: Option<&str>,
    audience: Option<&str>,
) -> anyhow::Result<String> {
    mint_token_with_key_id(private_pem, None, sub, role, ttl, issuer, audience)
}

/// [`mint_token`] with a `kid` in the header, as an identity provider whose
/// keys are published in a JWKS signs.
pub fn mint_token_with_key_id(
    private_pem: &[u8],
    kid: Option<&str>,
    sub: Uuid,
    role: &str,
    ttl: chrono::Duration,
    issuer: Option<&str>,
    audience: Option<&str>,
) -> anyhow::Result<String> {
    let key = EncodingKey::from_rsa_pem(private_pem)
        .context("the JWT private key is not an RSA PEM key")?;
    let now = chrono::Utc::now().timestamp();
    let claims = MintedClaims {
        sub: sub.to_string(),
        role,
        iat: now,
        exp: now.saturating_add(ttl.num_seconds()),
        iss: issuer,
        aud: audience,
    };
    let mut header = Header::new(Algorithm::RS256);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, &claims, &key).context("cannot sign the token")
}

/// The public half of the RSA key `private_pem` as a JWK (RS256, for
/// signatures) named `kid`: an entry of a JWKS document.
pub fn public_jwk(private_pem: &[u8], kid: &str) -> anyhow::Result<serde_json::Value> {
    let key = EncodingKey::from_rsa_pem(private_pem)
        .context("the JWT private key is not an RSA PEM key")?;
    let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&key, Algorithm::RS256)
        .context("cannot describe the key as a JWK")?;
    jwk.common.key_id = Some(kid.to_owned());
    jwk.common.public_key_use = Some(jsonwebtoken::jwk::PublicKeyUse::Signature);
    serde_json::to_value(jwk).context("cannot encode the JWK")
}
