//! The [`AuthUser`] extractor: the `Authorization: Bearer <token>` header
//! verified by the app's [`identity::JwtVerifier`]. Every refusal is an
//! [`ApiError::Unauthorized`] (401 with `WWW-Authenticate: Bearer`) whose
//! message names what was wrong, never what the token contained.

use std::sync::Arc;

use axum::extract::{FromRef, FromRequestParts};
use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use domain::values::{Actor, Role, UserId};
use identity::{JwtVerifier, Principal};

use crate::error::ApiError;

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

impl From<Principal> for AuthUser {
    fn from(principal: Principal) -> Self {
        Self {
            user_id: principal.user_id,
            role: principal.role,
        }
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
        let token = bearer_token_of(&parts.headers)?.ok_or_else(|| {
            ApiError::Unauthorized(
                "missing bearer token: send `Authorization: Bearer <token>`".to_owned(),
            )
        })?;
        let verifier = Arc::<JwtVerifier>::from_ref(state);
        let user = AuthUser::from(verifier.verify_fresh(token).await?);
        parts.extensions.insert(user);
        Ok(user)
    }
}

/// The token of an `Authorization: Bearer <token>` header (`None`: no
/// such header).
pub(crate) fn bearer_token_of(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
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
    Ok(Some(token))
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use axum::http::Request;
    use uuid::Uuid;

    use super::*;

    /// A dev key pair, made once per test binary (RSA generation is slow).
    fn keys() -> &'static (Vec<u8>, Vec<u8>) {
        static KEYS: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
        KEYS.get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("souk-http-kit-test-{}", Uuid::now_v7()));
            let (private_path, public_path) = (dir.join("private.pem"), dir.join("public.pem"));
            identity::ensure_dev_key_pair(&private_path, &public_path).unwrap();
            let pems = (
                std::fs::read(&private_path).unwrap(),
                std::fs::read(&public_path).unwrap(),
            );
            std::fs::remove_dir_all(&dir).unwrap();
            pems
        })
    }

    fn token(role: &str) -> String {
        identity::mint_token(
            &keys().0,
            Uuid::now_v7(),
            role,
            chrono::Duration::minutes(5),
            None,
            None,
        )
        .unwrap()
    }

    async fn extract(authorization: Option<&[u8]>) -> Result<AuthUser, ApiError> {
        let mut request = Request::builder().uri("/wallets");
        if let Some(value) = authorization {
            request = request.header(AUTHORIZATION, value);
        }
        let (mut parts, ()) = request.body(()).unwrap().into_parts();
        let state = Arc::new(JwtVerifier::from_public_pem(&keys().1, None, None).unwrap());
        AuthUser::from_request_parts(&mut parts, &state).await
    }

    #[tokio::test]
    async fn the_extractor_reads_a_bearer_token() {
        let token = token("auditor");
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
        let basic = format!("Basic {}", token("buyer"));
        let cases: [(Option<&[u8]>, &str); 6] = [
            (None, "missing bearer token"),
            (Some(basic.as_bytes()), "scheme must be Bearer"),
            (Some(b"Bearer"), "is not `Bearer <token>`"),
            (Some(b"Bearer \xc3\xa9t\xc3\xa9"), "not ASCII"),
            (Some(b"Bearer   "), "is not `Bearer <token>`"),
            (Some(b"Bearer not-a-jwt"), "not a JWT with an RS256 header"),
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
}
