//! The one error type of Souk's HTTP services. Every refusal becomes
//! `{"error": {"code": "...", "message": "..."}}` with a 4xx status; database
//! and internal failures are logged in full here and reach the client as a
//! generic message.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use domain::values::ValidationError;
use domain::{DomainError, Refusal};

use crate::openapi::{ErrorBody, ErrorDetail};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the body is not JSON at all.
    #[error("{0}")]
    MalformedJson(String),
    /// 422: JSON of the wrong shape: wrong types, unknown or missing fields.
    #[error("{0}")]
    InvalidBody(String),
    /// 422: a field's value is out of its rules (length, range, format).
    #[error("{field}: {source}")]
    Validation {
        field: String,
        #[source]
        source: ValidationError,
    },
    /// 400: a path segment, query string or header is not what the route
    /// takes.
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    /// 401: no bearer token, or one that does not verify.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: a verified user without the right to do this.
    #[error("{0}")]
    Forbidden(String),
    /// 404: the aggregate or route does not exist.
    #[error("{0}")]
    NotFound(String),
    /// 413: the body is larger than the limit.
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// 415: the body is not declared as JSON.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The aggregate refused the command; status from its [`Refusal`]
    /// (422, 403, 404 or 409).
    #[error("{message}")]
    Domain {
        code: &'static str,
        refusal: Refusal,
        message: String,
    },
    /// 409: optimistic concurrency conflicts persisted after the retries.
    #[error("the aggregate was changed concurrently; retry the command")]
    Conflict,
    /// 422: an Idempotency-Key reused with a different request.
    #[error("this Idempotency-Key was used for a different request")]
    IdempotencyKeyReused,
    /// 429: this user (or, unauthenticated, this client address) sent more
    /// requests than its rate limit allows; retry after `retry_after_s`.
    #[error("too many requests; retry in {retry_after_s} s")]
    RateLimited { retry_after_s: u64 },
    /// 503: the database cannot be reached right now, or too many requests
    /// are in flight.
    #[error("the service is temporarily unavailable; retry later")]
    Unavailable,
    /// 503: the read models did not catch up with the position a query waits
    /// for (the query API's `?after=`) within its bounded wait.
    #[error("the read models have not caught up with position {0} yet; retry later")]
    NotCaughtUp(String),
    /// 500: a bug or an unexpected failure; details are in the server log.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    pub fn validation(field: impl Into<String>, source: ValidationError) -> Self {
        Self::Validation {
            field: field.into(),
            source,
        }
    }

    pub fn domain<E: DomainError>(error: &E) -> Self {
        Self::Domain {
            code: error.code(),
            refusal: error.refusal(),
            message: error.to_string(),
        }
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::Forbidden(message.into())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::MalformedJson(_) | Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::InvalidBody(_) | Self::Validation { .. } | Self::IdempotencyKeyReused => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Domain { refusal, .. } => match refusal {
                Refusal::Invalid => StatusCode::UNPROCESSABLE_ENTITY,
                Refusal::Forbidden => StatusCode::FORBIDDEN,
                Refusal::NotFound => StatusCode::NOT_FOUND,
                Refusal::Conflict => StatusCode::CONFLICT,
            },
            Self::Conflict => StatusCode::CONFLICT,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable | Self::NotCaughtUp(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::MalformedJson(_) => "malformed_json",
            Self::InvalidBody(_) => "invalid_body",
            Self::Validation { source, .. } => source.code,
            Self::BadRequest { code, .. } => code,
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::NotFound(_) => "not_found",
            Self::PayloadTooLarge(_) => "payload_too_large",
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::Domain { code, .. } => code,
            Self::Conflict => "concurrency_conflict",
            Self::IdempotencyKeyReused => "idempotency_key_reused",
            Self::RateLimited { .. } => "rate_limited",
            Self::Unavailable => "unavailable",
            Self::NotCaughtUp(_) => "not_caught_up",
            Self::Internal(_) => "internal",
        }
    }

    /// The JSON body every error response carries.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code().to_owned(),
                message: self.to_string(),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            Self::Internal(error) => tracing::error!(error = ?error, "internal error"),
            Self::Unavailable => tracing::warn!("database unavailable"),
            _ => tracing::debug!(code = self.code(), message = %self, "request refused"),
        }
        let mut response = (self.status(), Json(self.body())).into_response();
        if matches!(self, Self::Unauthorized(_)) {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        if let Self::RateLimited { retry_after_s } = self {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, retry_after_s.into());
        }
        if matches!(self, Self::Unavailable | Self::NotCaughtUp(_)) {
            response
                .headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(error: anyhow::Error) -> Self {
        Self::Internal(error)
    }
}

impl From<identity::TokenRefused> for ApiError {
    fn from(refused: identity::TokenRefused) -> Self {
        Self::Unauthorized(refused.0.to_owned())
    }
}
