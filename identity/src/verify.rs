//! Verifying RS256 bearer tokens.
//!
//! Only RS256 is accepted, so a token whose header says `none` or HS256 (for
//! instance one "signed" with the public key as an HMAC secret) is refused
//! before any signature check. `exp` is required; `iss` and `aud` are required
//! and checked only when configured. Every refusal is a [`TokenRefused`] whose
//! message names what was wrong, never what the token contained.

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::sync::Mutex;

use anyhow::Context;
use domain::values::{Actor, Role, UserId};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::jwks::Jwks;

/// Clock skew tolerated on `exp`, in seconds.
const LEEWAY_SECONDS: u64 = 30;

/// Most verified tokens remembered; past this the memory is cleared.
const VERIFIED_CACHE_MAX: usize = 10_000;

pub(crate) const ALGORITHM_REFUSED: &str = "the token's algorithm is not accepted: only RS256 is";

/// Why a token proves nothing. The message is safe to show the client: it
/// never echoes the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TokenRefused(pub &'static str);

/// A user proven by a verified token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Principal {
    pub user_id: UserId,
    pub role: Role,
}

impl Principal {
    /// The actor recorded in the metadata of the events this user causes.
    pub fn actor(&self) -> Actor {
        Actor::new(self.user_id, self.role)
    }
}

pub(crate) const UNKNOWN_KEY: &str = "the token's key (`kid`) is not one of the provider's keys";

/// Verifies RS256 bearer tokens against one public key, or against the keys
/// of a JWKS document picked by the token's `kid` (see `crate::jwks`).
pub struct JwtVerifier {
    keys: Keys,
    validation: Validation,
    /// Tokens already verified, by the sha256 of their exact text, with the
    /// user they speak for and their expiry. An RS256 check costs more CPU
    /// than the rest of a command; clients reuse a token for many requests.
    verified: Mutex<HashMap<[u8; 32], (Principal, i64)>>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("issuer", &self.validation.iss)
            .field("audience", &self.validation.aud)
            .finish_non_exhaustive()
    }
}

enum Keys {
    Pem(DecodingKey),
    Jwks(Jwks),
}

/// The claims Souk reads. Each is optional here so that a missing one gets
/// its own message instead of a generic deserialisation error.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: Option<String>,
    role: Option<String>,
    exp: Option<i64>,
}

impl JwtVerifier {
    /// A verifier for tokens signed by the private half of `pem`, an RSA
    /// public key in SPKI (`PUBLIC KEY`) or PKCS#1 (`RSA PUBLIC KEY`) PEM form.
    /// `issuer` and `audience`, when given, must match the token's `iss` and
    /// `aud` claims, which then become required.
    pub fn from_public_pem(
        pem: &[u8],
        issuer: Option<String>,
        audience: Option<String>,
    ) -> anyhow::Result<Self> {
        let key =
            DecodingKey::from_rsa_pem(pem).context("the JWT public key is not an RSA PEM key")?;
        Ok(Self::with_keys(Keys::Pem(key), issuer, audience))
    }

    /// A verifier for tokens signed by the keys of the JWKS document at
    /// `location` (an `http(s)://` URL or a file path), picked by `kid`. The
    /// document is fetched at the first token that needs it, and fetched
    /// again (at most once per `min_refetch`) when a token names an unknown
    /// key; see [`Self::verify_fresh`].
    pub fn from_jwks(
        location: &str,
        min_refetch: std::time::Duration,
        issuer: Option<String>,
        audience: Option<String>,
    ) -> anyhow::Result<Self> {
        let jwks = Jwks::new(location, min_refetch)?;
        Ok(Self::with_keys(Keys::Jwks(jwks), issuer, audience))
    }

    fn with_keys(keys: Keys, issuer: Option<String>, audience: Option<String>) -> Self {
        let mut validation = Validation::new(Algorithm::RS256);
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_exp = true;
        let mut required = vec!["exp"];
        if let Some(issuer) = &issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        // jsonwebtoken refuses any token carrying `aud` unless an audience is
        // configured, but tokens from standard issuers carry one routinely.
        validation.validate_aud = audience.is_some();
        if let Some(audience) = &audience {
            validation.set_audience(&[audience]);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);

        Self {
            keys,
            validation,
            verified: Mutex::new(HashMap::new()),
        }
    }

    /// Reads the public key PEM file at `path`, then [`Self::from_public_pem`].
    pub fn from_public_pem_file(
        path: &Path,
        issuer: Option<String>,
        audience: Option<String>,
    ) -> anyhow::Result<Self> {
        let pem = fs::read(path)
            .with_context(|| format!("cannot read the JWT public key {}", path.display()))?;
        Self::from_public_pem(&pem, issuer, audience)
            .with_context(|| format!("invalid JWT public key {}", path.display()))
    }

    /// The user a token proves, or why it proves nothing.
    pub fn verify(&self, token: &str) -> Result<Principal, TokenRefused> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = chrono::Utc::now().timestamp();
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        // The same bytes verified before, and not expired since (no leeway).
        match verified.get(&digest) {
            Some((user, exp)) if *exp > now => return Ok(*user),
            Some(_) => {
                verified.remove(&digest);
            }
            None => {}
        }
        drop(verified);
        let (user, exp) = self.verify_signature(token)?;
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if verified.len() >= VERIFIED_CACHE_MAX {
            verified.clear();
        }
        verified.insert(digest, (user, exp));
        Ok(user)
    }

    /// [`Self::verify`], for callers that may wait: with a key set that can
    /// be refreshed, an unknown key is looked up first.
    /// With a JWKS, keys older than `jwks::MAX_AGE` are fetched again first,
    /// and a token naming an unknown key triggers a fetch (throttled) and a
    /// second try. Keys that a fetch removed stop verifying at once, tokens
    /// already verified included.
    pub async fn verify_fresh(&self, token: &str) -> Result<Principal, TokenRefused> {
        let Keys::Jwks(jwks) = &self.keys else {
            return self.verify(token);
        };
        if jwks.is_stale().await && jwks.refresh().await {
            self.forget_verified();
        }
        match self.verify(token) {
            Err(TokenRefused(UNKNOWN_KEY)) => {
                if jwks.refresh().await {
                    self.forget_verified();
                }
                self.verify(token)
            }
            verified => verified,
        }
    }

    fn forget_verified(&self) {
        self.verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// The full check: header, RS256 signature, expiry, issuer, audience,
    /// `sub` and `role`.
    fn verify_signature(&self, token: &str) -> Result<(Principal, i64), TokenRefused> {
        let refuse = |message: &'static str| {
            tracing::debug!(reason = message, "bearer token refused");
            TokenRefused(message)
        };
        // The header is read on its own first so that an unknown algorithm
        // such as `none` is reported as such, not as bad claims.
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| refuse("the token is not a JWT with an RS256 header"))?;
        if header.alg != Algorithm::RS256 {
            return Err(refuse(ALGORITHM_REFUSED));
        }
        let key_set;
        let key = match &self.keys {
            Keys::Pem(key) => key,
            Keys::Jwks(jwks) => {
                key_set = jwks.current();
                let key = match &header.kid {
                    Some(kid) => key_set.by_kid.get(kid),
                    None => key_set.lone.as_ref(),
                };
                key.ok_or_else(|| refuse(UNKNOWN_KEY))?
            }
        };
        let data = jsonwebtoken::decode::<Claims>(token, key, &self.validation)
            .map_err(|error| refuse(refusal_message(error.kind())))?;

        let sub = data
            .claims
            .sub
            .ok_or_else(|| refuse("the token has no `sub` claim"))?;
        let user_id =
            UserId::parse(&sub).map_err(|_| refuse("the token's `sub` claim is not a UUID"))?;
        // The nil id is Souk's own system actor; no token speaks for it.
        if user_id.as_uuid().is_nil() {
            return Err(refuse("the token's `sub` claim is the nil UUID"));
        }

        let role = data
            .claims
            .role
            .ok_or_else(|| refuse("the token has no `role` claim"))?;
        let role = Role::parse(&role).map_err(|_| {
            refuse("the token's `role` claim is not one of buyer, seller, admin, auditor, operator")
        })?;

        let exp = data
            .claims
            .exp
            .ok_or_else(|| refuse("the token has no `exp` claim"))?;
        Ok((Principal { user_id, role }, exp))
    }
}

/// What a refused token is told, by failure kind. Never echoes the token.
fn refusal_message(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::ExpiredSignature => "the token has expired",
        ErrorKind::InvalidSignature => "the token's signature does not verify",
        ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::UnsupportedAlgorithm => ALGORITHM_REFUSED,
        ErrorKind::InvalidIssuer => "the token's issuer is not accepted",
        ErrorKind::InvalidAudience => "the token's audience is not accepted",
        ErrorKind::ImmatureSignature => "the token is not valid yet",
        ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
            "exp" => "the token has no `exp` claim",
            "iss" => "the token has no valid `iss` claim",
            "aud" => "the token has no valid `aud` claim",
            _ => "the token lacks a required claim",
        },
        ErrorKind::InvalidClaimFormat(_) | ErrorKind::Json(_) => {
            "the token's claims are not what Souk reads (`sub`, `role`, `exp` as strings and a number)"
        }
        _ => "the token is not a well-formed JWT",
    }
}
