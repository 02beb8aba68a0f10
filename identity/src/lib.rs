//! Who a bearer token speaks for, without a web framework.
//!
//! Souk's tokens are RS256 JWTs with the claims `sub` (the user's UUID),
//! `role` and `exp` (`iss` and `aud` are checked when configured). This crate
//! holds everything about them that needs no HTTP: [`JwtVerifier`] (claim
//! validation and signature verification, with a cache of tokens already
//! verified), the [`Principal`] a token proves, and in `keys` the dev key pair
//! ([`ensure_dev_key_pair`]), token minting ([`mint_token`], for
//! `replay-tool token` and tests) and [`load_verifier`], which both APIs use
//! at start. `http-kit` wraps it in an axum extractor; `replay-tool` links it
//! without axum.

mod keys;
mod verify;

pub use keys::{ensure_dev_key_pair, generate_dev_key_pair, load_verifier, mint_token};
pub use verify::{JwtVerifier, Principal, TokenRefused};

#[cfg(test)]
mod tests;
