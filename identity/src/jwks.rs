//! Verification keys from an identity provider's JWKS document (RFC 7517):
//! an `http(s)` URL or a file. Tokens pick their key by `kid`. The document
//! is fetched at the first token, again when a token names a key not in it
//! (at most once per `min_refetch`, however many such tokens arrive), and
//! when it is older than [`MAX_AGE`]. A failed fetch keeps the last good
//! keys; a successful one replaces them, so a key the provider removed stops
//! verifying at the next fetch.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use jsonwebtoken::DecodingKey;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet, KeyAlgorithm, PublicKeyUse};

/// Longest a fetched document is used before it is fetched again.
pub const MAX_AGE: Duration = Duration::from_secs(600);
/// Longest wait for the provider's answer.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest document read.
const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;
/// Most keys taken from one document.
const MAX_KEYS: usize = 100;

/// Where the document comes from.
#[derive(Debug, Clone)]
enum Source {
    Url(String),
    File(PathBuf),
}

/// The keys of the last good document, by `kid`.
#[derive(Default)]
pub(crate) struct KeySet {
    pub(crate) by_kid: HashMap<String, DecodingKey>,
    /// The one key of a document whose only key has no `kid`.
    pub(crate) lone: Option<DecodingKey>,
}

/// A refreshable key set.
pub(crate) struct Jwks {
    source: Source,
    client: reqwest::Client,
    min_refetch: Duration,
    keys: RwLock<Arc<KeySet>>,
    /// When the last fetch was attempted and when one last succeeded;
    /// holding the lock is fetching.
    fetches: tokio::sync::Mutex<Fetches>,
}

#[derive(Debug, Default)]
struct Fetches {
    attempted: Option<Instant>,
    succeeded: Option<Instant>,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Jwks {
    /// A key set read from `location` (an `http(s)://` URL, else a file
    /// path), empty until the first fetch.
    pub(crate) fn new(location: &str, min_refetch: Duration) -> anyhow::Result<Self> {
        let source = if location.starts_with("http://") || location.starts_with("https://") {
            Source::Url(location.to_owned())
        } else {
            Source::File(PathBuf::from(location))
        };
        let client = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .build()
            .context("building the JWKS HTTP client")?;
        Ok(Self {
            source,
            client,
            min_refetch,
            keys: RwLock::new(Arc::new(KeySet::default())),
            fetches: tokio::sync::Mutex::new(Fetches::default()),
        })
    }

    /// The keys of the last good document.
    pub(crate) fn current(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether the keys are older than [`MAX_AGE`] (or were never fetched).
    pub(crate) async fn is_stale(&self) -> bool {
        let fetches = self.fetches.lock().await;
        fetches
            .succeeded
            .is_none_or(|succeeded| succeeded.elapsed() >= MAX_AGE)
    }

    /// Fetches the document again unless a fetch was attempted less than
    /// `min_refetch` ago. Returns whether the keys were replaced.
    pub(crate) async fn refresh(&self) -> bool {
        let mut fetches = self.fetches.lock().await;
        if fetches
            .attempted
            .is_some_and(|attempted| attempted.elapsed() < self.min_refetch)
        {
            return false;
        }
        fetches.attempted = Some(Instant::now());
        match self.fetch().await {
            Ok(keys) => {
                tracing::info!(keys = keys.by_kid.len(), "token keys fetched");
                *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
                fetches.succeeded = Some(Instant::now());
                true
            }
            Err(error) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "cannot fetch the token keys (JWKS); keeping the last good ones"
                );
                false
            }
        }
    }

    async fn fetch(&self) -> anyhow::Result<KeySet> {
        let bytes = match &self.source {
            Source::Url(url) => {
                let response = self
                    .client
                    .get(url)
                    .send()
                    .await
                    .context("requesting the JWKS")?
                    .error_for_status()
                    .context("the JWKS answer")?;
                let bytes = response.bytes().await.context("reading the JWKS")?;
                bytes.to_vec()
            }
            // A small local file: read in place.
            Source::File(path) => std::fs::read(path)
                .with_context(|| format!("reading the JWKS file {}", path.display()))?,
        };
        anyhow::ensure!(
            bytes.len() <= MAX_DOCUMENT_BYTES,
            "the JWKS is larger than {MAX_DOCUMENT_BYTES} bytes"
        );
        parse(&bytes)
    }
}

/// The RS256 signing keys of a JWKS document; other keys (encryption keys,
/// other algorithms) are skipped. A document without any usable key is an
/// error, so that a broken answer never empties the key set.
pub(crate) fn parse(bytes: &[u8]) -> anyhow::Result<KeySet> {
    let set: JwkSet = serde_json::from_slice(bytes).context("the JWKS is not a JWK set")?;
    let mut keys = KeySet::default();
    let mut without_kid = Vec::new();
    for jwk in set.keys.iter().take(MAX_KEYS) {
        let signs = !matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption));
        let rs256 = jwk
            .common
            .key_algorithm
            .is_none_or(|algorithm| algorithm == KeyAlgorithm::RS256);
        if !signs || !rs256 || !matches!(jwk.algorithm, AlgorithmParameters::RSA(_)) {
            continue;
        }
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            continue;
        };
        match &jwk.common.key_id {
            Some(kid) => {
                keys.by_kid.insert(kid.clone(), key);
            }
            None => without_kid.push(key),
        }
    }
    if keys.by_kid.is_empty() && without_kid.len() == 1 {
        keys.lone = without_kid.pop();
    }
    anyhow::ensure!(
        !keys.by_kid.is_empty() || keys.lone.is_some(),
        "the JWKS has no RS256 signing key"
    );
    Ok(keys)
}
