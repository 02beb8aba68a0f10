//! Extractors that turn every kind of bad input into an [`ApiError`] with a
//! stable code, instead of axum's plain-text rejections: a strict JSON body
//! ([`JsonBody`]), UUID path segments ([`IdPath`], [`IdPair`]) and the
//! request's own facts ([`RequestMeta`]: idempotency key, correlation and
//! request ids).

use std::sync::OnceLock;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{Method, header};
use event_store::{CommandContext, IdempotencyKey};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::auth::AuthUser;
use crate::error::ApiError;

/// Longest accepted Idempotency-Key.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// A JSON request body, parsed strictly, with the hash of its raw bytes.
#[derive(Debug)]
pub struct JsonBody<T> {
    pub value: T,
    pub sha256: [u8; 32],
}

impl<S, T> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| {
                let mime = value.split(';').next().unwrap_or("").trim();
                mime.eq_ignore_ascii_case("application/json")
            });
        if !is_json {
            return Err(ApiError::UnsupportedMediaType(
                "send the body as `Content-Type: application/json`".into(),
            ));
        }
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge(body_limit_hint())
                } else {
                    ApiError::MalformedJson(format!("the body could not be read: {rejection}"))
                }
            })?;
        parse_json(&bytes)
    }
}

static BODY_LIMIT: OnceLock<usize> = OnceLock::new();

/// The layer that limits the bodies [`JsonBody`] reads to `max_body_bytes`
/// (413 `payload_too_large` past it). The first limit a process sets is the
/// one its error messages name.
pub fn body_limit(max_body_bytes: usize) -> DefaultBodyLimit {
    let _ = BODY_LIMIT.set(max_body_bytes);
    DefaultBodyLimit::max(max_body_bytes)
}

/// The body limit, for messages (the real limit is the router's layer).
fn body_limit_hint() -> usize {
    BODY_LIMIT.get().copied().unwrap_or(64 * 1024)
}

/// Parses `bytes` strictly: anything that is not one JSON value is
/// `malformed_json` (400); JSON of the wrong shape (types, unknown or missing
/// fields, an array where an object belongs) is `invalid_body` (422).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<JsonBody<T>, ApiError> {
    let sha256 = Sha256::digest(bytes).into();
    // Syntax first, so that a truncated body is malformed even when a field
    // before the cut is already of the wrong shape.
    let value =
        crate::strict_json::parse_unique(bytes).map_err(|error| match error.classify() {
            serde_json::error::Category::Data => ApiError::InvalidBody(error.to_string()),
            _ => ApiError::MalformedJson(format!("the body is not valid JSON: {error}")),
        })?;
    let value = crate::strict_json::from_value(&value)
        .map_err(|error| ApiError::InvalidBody(error.to_string()))?;
    Ok(JsonBody { value, sha256 })
}

/// Facts about the request that every command records.
#[derive(Debug, Clone)]
pub struct RequestMeta {
    pub method: Method,
    pub path: String,
    pub request_id: Option<String>,
    pub correlation_id: Option<Uuid>,
    pub idempotency_key: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for RequestMeta {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let header_text = |name: &str| {
            parts
                .headers
                .get(name)
                .map(|value| value.to_str().map(str::to_owned))
        };
        let idempotency_key = match header_text("idempotency-key") {
            None => None,
            Some(Ok(key))
                if !key.is_empty()
                    && key.len() <= MAX_IDEMPOTENCY_KEY_LEN
                    && key.bytes().all(|b| b.is_ascii_graphic()) =>
            {
                Some(key)
            }
            Some(_) => {
                return Err(ApiError::BadRequest {
                    code: "invalid_idempotency_key",
                    message: format!(
                        "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} visible ASCII characters"
                    ),
                });
            }
        };
        let correlation_id = match header_text("x-correlation-id") {
            None => None,
            Some(Ok(text)) => Some(Uuid::parse_str(&text).map_err(|_| ApiError::BadRequest {
                code: "invalid_correlation_id",
                message: "X-Correlation-Id must be a UUID".into(),
            })?),
            Some(Err(_)) => {
                return Err(ApiError::BadRequest {
                    code: "invalid_correlation_id",
                    message: "X-Correlation-Id must be a UUID".into(),
                });
            }
        };
        let request_id = header_text("x-request-id").and_then(Result::ok);
        Ok(Self {
            method: parts.method.clone(),
            path: parts.uri.path().to_owned(),
            request_id,
            correlation_id,
            idempotency_key,
        })
    }
}

impl RequestMeta {
    /// The idempotency key of this request, scoped to `user`, bound to the
    /// method, path and body so that a reuse with other content is caught.
    pub fn idempotency(&self, user: &AuthUser, body_sha256: &[u8; 32]) -> Option<IdempotencyKey> {
        let key = self.idempotency_key.as_ref()?;
        let mut hasher = Sha256::new();
        hasher.update(self.method.as_str().as_bytes());
        hasher.update([0]);
        hasher.update(self.path.as_bytes());
        hasher.update([0]);
        hasher.update(body_sha256);
        Some(IdempotencyKey {
            scope: user.user_id.to_string(),
            key: key.clone(),
            request_hash: hasher.finalize().into(),
        })
    }

    /// The context recorded on the command's events. With an idempotency
    /// key, the command id is derived from it, so a retried request carries
    /// the same command id.
    pub fn context(&self, user: &AuthUser) -> CommandContext {
        let command_id = match &self.idempotency_key {
            Some(key) => domain::process::deterministic_command_id(
                "idempotency-key",
                &[&user.user_id.to_string(), key],
            ),
            None => Uuid::now_v7(),
        };
        let mut context =
            CommandContext::new(user.user_id.as_uuid(), user.role.as_str(), command_id);
        if let Some(correlation_id) = self.correlation_id {
            context.correlation_id = correlation_id;
        }
        context.request_id = self.request_id.clone();
        context
    }
}

/// A UUID path segment; anything else is `invalid_id` (400).
#[derive(Debug, Clone, Copy)]
pub struct IdPath(pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for IdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Path(raw) =
            axum::extract::Path::<String>::from_request_parts(parts, state)
                .await
                .map_err(|_| invalid_id("the path"))?;
        Uuid::parse_str(&raw)
            .map(IdPath)
            .map_err(|_| invalid_id(&raw))
    }
}

/// Two UUID path segments, e.g. `/products/{id}/customizations/{cid}`.
#[derive(Debug, Clone, Copy)]
pub struct IdPair(pub Uuid, pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for IdPair {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Path((first, second)) =
            axum::extract::Path::<(String, String)>::from_request_parts(parts, state)
                .await
                .map_err(|_| invalid_id("the path"))?;
        let first_id = Uuid::parse_str(&first).map_err(|_| invalid_id(&first))?;
        let second_id = Uuid::parse_str(&second).map_err(|_| invalid_id(&second))?;
        Ok(IdPair(first_id, second_id))
    }
}

fn invalid_id(raw: &str) -> ApiError {
    let shown: String = raw.chars().take(64).collect();
    ApiError::BadRequest {
        code: "invalid_id",
        message: format!("`{shown}` is not a UUID"),
    }
}
