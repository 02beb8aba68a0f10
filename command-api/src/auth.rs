//! Bearer JWT authentication: the verifier, the [`AuthUser`] extractor, and the
//! dev key material that `replay-tool` and local starts use.
//!
//! Only RS256 is accepted, so a token whose header says `none` or HS256 (for
//! instance one "signed" with the public key as an HMAC secret) is refused
//! before any signature check. `exp` is required; `iss` and `aud` are required
//! and checked only when configured. Every refusal is an
//! [`ApiError::Unauthorized`] whose message names what was wrong, never what
//! the token contained.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::{FromRef, FromRequestParts};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use domain::values::{Actor, Role, UserId};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rsa::RsaPrivateKey;
use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::ApiError;

/// Clock skew tolerated on `exp`, in seconds.
const LEEWAY_SECONDS: u64 = 30;

/// Size of the dev RSA keys; jsonwebtoken's RSA backends want at least 2048.
const DEV_KEY_BITS: usize = 2048;

const ALGORITHM_REFUSED: &str = "the token's algorithm is not accepted: only RS256 is";

/// Verifies RS256 bearer tokens against one public key.
pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
    /// Tokens already verified, by the sha256 of their exact text, with the
    /// user they speak for and their expiry. An RS256 check costs more CPU
    /// than the rest of a command; clients reuse a token for many requests.
    verified: std::sync::Mutex<std::collections::HashMap<[u8; 32], (AuthUser, i64)>>,
}

/// Most verified tokens remembered; past this the memory is cleared.
const VERIFIED_CACHE_MAX: usize = 10_000;

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("issuer", &self.validation.iss)
            .field("audience", &self.validation.aud)
            .finish_non_exhaustive()
    }
}

/// The claims Souk reads. Both are optional here so that a missing one gets
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

        Ok(Self {
            key,
            validation,
            verified: std::sync::Mutex::new(std::collections::HashMap::new()),
        })
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
    pub fn verify(&self, token: &str) -> Result<AuthUser, ApiError> {
        use sha2::{Digest, Sha256};
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

    /// The full check: header, RS256 signature, expiry, issuer, audience,
    /// `sub` and `role`.
    fn verify_signature(&self, token: &str) -> Result<(AuthUser, i64), ApiError> {
        let refuse = |message: &str| {
            tracing::debug!(reason = message, "bearer token refused");
            ApiError::Unauthorized(message.to_owned())
        };
        // The header is read on its own first so that an unknown algorithm
        // such as `none` is reported as such, not as bad claims.
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| refuse("the token is not a JWT with an RS256 header"))?;
        if header.alg != Algorithm::RS256 {
            return Err(refuse(ALGORITHM_REFUSED));
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
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
        Ok((AuthUser { user_id, role }, exp))
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

/// A user proven by a verified bearer token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthUser {
    pub user_id: UserId,
    pub role: Role,
}

impl AuthUser {
    /// The actor recorded in the metadata of the events this user causes.
    pub fn actor(&self) -> Actor {
        Actor::new(self.user_id, self.role)
    }
}

impl<S> FromRequestParts<S> for AuthUser
where
    Arc<JwtVerifier>: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        // A handler (or a middleware) that extracts twice verifies once.
        if let Some(user) = parts.extensions.get::<AuthUser>() {
            return Ok(*user);
        }
        let token = bearer_token(parts)?;
        let verifier = Arc::<JwtVerifier>::from_ref(state);
        let user = verifier.verify(token)?;
        parts.extensions.insert(user);
        Ok(user)
    }
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer_token(parts: &Parts) -> Result<&str, ApiError> {
    let mut values = parts.headers.get_all(AUTHORIZATION).iter();
    let value = values.next().ok_or_else(|| {
        ApiError::Unauthorized(
            "missing bearer token: send `Authorization: Bearer <token>`".to_owned(),
        )
    })?;
    if values.next().is_some() {
        return Err(ApiError::Unauthorized(
            "more than one Authorization header".to_owned(),
        ));
    }
    let value = value.to_str().map_err(|_| {
        ApiError::Unauthorized("the Authorization header is not ASCII text".to_owned())
    })?;
    let (scheme, token) = value.trim().split_once(' ').ok_or_else(|| {
        ApiError::Unauthorized("the Authorization header is not `Bearer <token>`".to_owned())
    })?;
    // Auth schemes are case-insensitive (RFC 9110, section 11.1).
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(ApiError::Unauthorized(
            "the Authorization scheme must be Bearer".to_owned(),
        ));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(ApiError::Unauthorized(
            "the bearer token is empty".to_owned(),
        ));
    }
    Ok(token)
}

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
struct MintedClaims<'a> {
    sub: String,
    role: &'a str,
    iat: i64,
    exp: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
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
    jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &key)
        .context("cannot sign the token")
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use axum::http::Request;

    use super::*;

    struct Keys {
        private_pem: String,
        public_pem: String,
    }

    impl Keys {
        fn generate() -> Self {
            let private_key = RsaPrivateKey::new(&mut rand::rngs::OsRng, DEV_KEY_BITS).unwrap();
            Self {
                private_pem: private_key
                    .to_pkcs8_pem(LineEnding::LF)
                    .unwrap()
                    .to_string(),
                public_pem: private_key
                    .to_public_key()
                    .to_public_key_pem(LineEnding::LF)
                    .unwrap(),
            }
        }
    }

    /// RSA key generation is slow, so each test binary makes its keys once.
    fn keys() -> &'static Keys {
        static KEYS: OnceLock<Keys> = OnceLock::new();
        KEYS.get_or_init(Keys::generate)
    }

    fn other_keys() -> &'static Keys {
        static KEYS: OnceLock<Keys> = OnceLock::new();
        KEYS.get_or_init(Keys::generate)
    }

    fn verifier(issuer: Option<&str>, audience: Option<&str>) -> JwtVerifier {
        JwtVerifier::from_public_pem(
            keys().public_pem.as_bytes(),
            issuer.map(str::to_owned),
            audience.map(str::to_owned),
        )
        .unwrap()
    }

    fn token(role: &str, issuer: Option<&str>, audience: Option<&str>) -> String {
        mint_token(
            keys().private_pem.as_bytes(),
            Uuid::now_v7(),
            role,
            chrono::Duration::minutes(5),
            issuer,
            audience,
        )
        .unwrap()
    }

    fn refusal(result: Result<AuthUser, ApiError>) -> String {
        match result {
            Err(ApiError::Unauthorized(message)) => message,
            other => panic!("expected a 401 refusal, got {other:?}"),
        }
    }

    /// An RS256 token with exactly these claims, signed with the right key.
    fn sign_claims(claims: &serde_json::Value) -> String {
        let key = EncodingKey::from_rsa_pem(keys().private_pem.as_bytes()).unwrap();
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), claims, &key).unwrap()
    }

    /// Base64url without padding, for hand-made tokens.
    fn base64url(bytes: &[u8]) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, &b)| n | (u32::from(b) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }

    #[test]
    fn a_valid_token_is_accepted_with_its_subject_and_role() {
        let sub = Uuid::now_v7();
        let token = mint_token(
            keys().private_pem.as_bytes(),
            sub,
            "seller",
            chrono::Duration::minutes(5),
            None,
            None,
        )
        .unwrap();
        let user = verifier(None, None).verify(&token).unwrap();
        assert_eq!(user.user_id, UserId::from_uuid(sub));
        assert_eq!(user.role, Role::Seller);
        assert_eq!(
            user.actor(),
            Actor::new(UserId::from_uuid(sub), Role::Seller)
        );
    }

    #[test]
    fn an_expired_token_is_refused() {
        let token = mint_token(
            keys().private_pem.as_bytes(),
            Uuid::now_v7(),
            "buyer",
            chrono::Duration::minutes(-5),
            None,
            None,
        )
        .unwrap();
        assert_eq!(
            refusal(verifier(None, None).verify(&token)),
            "the token has expired"
        );
    }

    #[test]
    fn a_token_without_exp_is_refused() {
        let token = sign_claims(&serde_json::json!({"sub": Uuid::now_v7(), "role": "buyer"}));
        assert_eq!(
            refusal(verifier(None, None).verify(&token)),
            "the token has no `exp` claim"
        );
    }

    #[test]
    fn an_unsigned_alg_none_token_is_refused() {
        let header = base64url(br#"{"alg":"none","typ":"JWT"}"#);
        let claims = base64url(
            format!(
                r#"{{"sub":"{}","role":"admin","exp":{}}}"#,
                Uuid::now_v7(),
                chrono::Utc::now().timestamp() + 300
            )
            .as_bytes(),
        );
        for token in [format!("{header}.{claims}."), format!("{header}.{claims}")] {
            assert_eq!(
                refusal(verifier(None, None).verify(&token)),
                "the token is not a JWT with an RS256 header"
            );
        }
    }

    #[test]
    fn an_hs256_token_signed_with_the_public_key_is_refused() {
        let claims = MintedClaims {
            sub: Uuid::now_v7().to_string(),
            role: "admin",
            iat: chrono::Utc::now().timestamp(),
            exp: chrono::Utc::now().timestamp() + 300,
            iss: None,
            aud: None,
        };
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(keys().public_pem.as_bytes()),
        )
        .unwrap();
        assert_eq!(
            refusal(verifier(None, None).verify(&token)),
            ALGORITHM_REFUSED
        );
    }

    #[test]
    fn a_token_signed_with_another_key_is_refused() {
        let token = mint_token(
            other_keys().private_pem.as_bytes(),
            Uuid::now_v7(),
            "buyer",
            chrono::Duration::minutes(5),
            None,
            None,
        )
        .unwrap();
        assert_eq!(
            refusal(verifier(None, None).verify(&token)),
            "the token's signature does not verify"
        );
    }

    #[test]
    fn a_tampered_token_is_refused() {
        let token = token("buyer", None, None);
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        parts[1] = base64url(
            format!(
                r#"{{"sub":"{}","role":"admin","exp":{}}}"#,
                Uuid::now_v7(),
                chrono::Utc::now().timestamp() + 300
            )
            .as_bytes(),
        );
        assert_eq!(
            refusal(verifier(None, None).verify(&parts.join("."))),
            "the token's signature does not verify"
        );
    }

    #[test]
    fn issuer_and_audience_are_checked_when_configured() {
        let verifier = verifier(Some("https://id.souk.test"), Some("souk"));
        verifier
            .verify(&token("buyer", Some("https://id.souk.test"), Some("souk")))
            .unwrap();
        assert_eq!(
            refusal(verifier.verify(&token("buyer", Some("https://evil.test"), Some("souk")))),
            "the token's issuer is not accepted"
        );
        assert_eq!(
            refusal(verifier.verify(&token("buyer", Some("https://id.souk.test"), Some("other")))),
            "the token's audience is not accepted"
        );
        assert_eq!(
            refusal(verifier.verify(&token("buyer", None, Some("souk")))),
            "the token has no valid `iss` claim"
        );
        assert_eq!(
            refusal(verifier.verify(&token("buyer", Some("https://id.souk.test"), None))),
            "the token has no valid `aud` claim"
        );
    }

    #[test]
    fn issuer_and_audience_are_ignored_when_not_configured() {
        let verifier = verifier(None, None);
        verifier
            .verify(&token(
                "buyer",
                Some("https://any.test"),
                Some("any-audience"),
            ))
            .unwrap();
        verifier.verify(&token("buyer", None, None)).unwrap();
    }

    #[test]
    fn the_system_role_and_unknown_roles_are_refused() {
        let verifier = verifier(None, None);
        for role in ["system", "root", ""] {
            assert_eq!(
                refusal(verifier.verify(&token(role, None, None))),
                "the token's `role` claim is not one of buyer, seller, admin, auditor, operator"
            );
        }
        for role in ["buyer", "seller", "admin", "auditor", "operator"] {
            assert_eq!(
                verifier
                    .verify(&token(role, None, None))
                    .unwrap()
                    .role
                    .as_str(),
                role
            );
        }
    }

    #[test]
    fn a_subject_that_is_not_a_uuid_is_refused() {
        let token = sign_claims(&serde_json::json!({
            "sub": "alice",
            "role": "buyer",
            "exp": chrono::Utc::now().timestamp() + 300,
        }));
        let message = refusal(verifier(None, None).verify(&token));
        assert_eq!(message, "the token's `sub` claim is not a UUID");
        assert!(
            !message.contains("alice"),
            "the message must not echo the token"
        );
    }

    #[test]
    fn garbage_is_refused_without_echoing_it() {
        let message = refusal(verifier(None, None).verify("not-a-jwt-secret-stuff"));
        assert!(!message.contains("secret-stuff"));
    }

    async fn extract(authorization: Option<&[u8]>) -> Result<AuthUser, ApiError> {
        let mut request = Request::builder().uri("/wallets");
        if let Some(value) = authorization {
            request = request.header(AUTHORIZATION, value);
        }
        let (mut parts, ()) = request.body(()).unwrap().into_parts();
        let state = Arc::new(verifier(None, None));
        AuthUser::from_request_parts(&mut parts, &state).await
    }

    #[tokio::test]
    async fn the_extractor_reads_a_bearer_token() {
        let token = token("auditor", None, None);
        let user = extract(Some(format!("Bearer {token}").as_bytes()))
            .await
            .unwrap();
        assert_eq!(user.role, Role::Auditor);
        let user = extract(Some(format!("bearer {token}").as_bytes()))
            .await
            .unwrap();
        assert_eq!(user.role, Role::Auditor);
    }

    #[tokio::test]
    async fn the_extractor_refuses_missing_or_malformed_headers_with_401() {
        let basic = format!("Basic {}", token("buyer", None, None));
        let cases: [(Option<&[u8]>, &str); 5] = [
            (None, "missing bearer token"),
            (Some(basic.as_bytes()), "scheme must be Bearer"),
            (Some(b"Bearer"), "is not `Bearer <token>`"),
            (Some(b"Bearer \xc3\xa9t\xc3\xa9"), "not ASCII"),
            (Some(b"Bearer   "), "is not `Bearer <token>`"),
        ];
        for (header, expected) in cases {
            let error = extract(header).await.unwrap_err();
            assert_eq!(error.status(), axum::http::StatusCode::UNAUTHORIZED);
            assert_eq!(error.code(), "unauthorized");
            let ApiError::Unauthorized(message) = error else {
                unreachable!()
            };
            assert!(
                message.contains(expected),
                "{message:?} should contain {expected:?}"
            );
        }
    }

    #[test]
    fn the_dev_key_pair_is_written_once_and_works() {
        let dir = std::env::temp_dir().join(format!("souk-auth-test-{}", Uuid::now_v7()));
        let private_path = dir.join("keys/jwt-private.pem");
        let public_path = dir.join("keys/jwt-public.pem");

        assert!(ensure_dev_key_pair(&private_path, &public_path).unwrap());
        let private_pem = fs::read(&private_path).unwrap();
        let public_pem = fs::read(&public_path).unwrap();
        assert!(private_pem.starts_with(b"-----BEGIN PRIVATE KEY-----"));
        assert!(public_pem.starts_with(b"-----BEGIN PUBLIC KEY-----"));
        let mode = fs::metadata(&private_path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );

        assert!(!ensure_dev_key_pair(&private_path, &public_path).unwrap());
        generate_dev_key_pair(&private_path, &public_path).unwrap();
        assert_eq!(
            fs::read(&private_path).unwrap(),
            private_pem,
            "an existing pair is kept"
        );

        let sub = Uuid::now_v7();
        let token = mint_token(
            &private_pem,
            sub,
            "operator",
            chrono::Duration::hours(1),
            None,
            None,
        )
        .unwrap();
        let verifier = JwtVerifier::from_public_pem_file(&public_path, None, None).unwrap();
        assert_eq!(verifier.verify(&token).unwrap().user_id.as_uuid(), sub);

        fs::remove_dir_all(&dir).unwrap();
    }
}
