//! Who a bearer token speaks for, without a web framework.
//!
//! Souk's tokens are RS256 JWTs with the claims `sub` (the user's UUID),
//! `role` and `exp` (`iss` and `aud` are checked when configured). This crate
//! holds everything about them that needs no HTTP: [`JwtVerifier`] (claim
//! validation and signature verification, with a cache of tokens already
//! verified), the [`Principal`] a token proves, and in `keys` the dev key pair
//! ([`ensure_dev_key_pair`]), token minting ([`mint_token`], for
//! `replay-tool token` and tests) and [`load_verifier`], which both APIs use
//! at start. With an identity provider, the keys come from its JWKS
//! document instead (`jwks`: by `kid`, refetched when a token names an
//! unknown key, the last good keys kept through an outage). `http-kit` wraps it in an axum extractor; `replay-tool` links it
//! without axum.

mod jwks;
mod keys;
mod verify;

pub use keys::{
    ensure_dev_key_pair, generate_dev_key_pair, load_verifier, mint_token, mint_token_with_key_id,
    public_jwk,
};
pub use verify::{JwtVerifier, Principal, TokenRefused};

#[cfg(test)]
mod tests;
