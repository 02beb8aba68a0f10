use std::fs;
use std::sync::OnceLock;

use domain::values::{Actor, Role, UserId};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsa::RsaPrivateKey;
use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
use uuid::Uuid;

use crate::keys::{DEV_KEY_BITS, MintedClaims};
use crate::verify::ALGORITHM_REFUSED;
use crate::*;

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

fn refusal(result: Result<Principal, TokenRefused>) -> &'static str {
    match result {
        Err(TokenRefused(message)) => message,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// An RS256 token with exactly these claims, signed with the right key.
fn sign_claims(claims: &serde_json::Value) -> String {
    let key = EncodingKey::from_rsa_pem(keys().private_pem.as_bytes()).unwrap();
    jsonwebtoken::encode(&Header::new(Algorithm::RS256), claims, &key).unwrap()
}

/// Base64url without padding, for hand-made tokens.
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
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

#[test]
fn an_api_start_without_keys_generates_a_dev_pair_and_one_with_a_key_keeps_it() {
    let dir = std::env::temp_dir().join(format!("souk-identity-test-{}", Uuid::now_v7()));
    let private_path = dir.join("jwt-private.pem");
    let public_path = dir.join("jwt-public.pem");

    let verifier = load_verifier(&public_path, &private_path, None, None).unwrap();
    let private_pem = fs::read(&private_path).unwrap();
    let token = mint_token(
        &private_pem,
        Uuid::now_v7(),
        "buyer",
        chrono::Duration::minutes(5),
        None,
        None,
    )
    .unwrap();
    assert_eq!(verifier.verify(&token).unwrap().role, Role::Buyer);

    // A configured public key alone is used as it is: nothing is generated.
    fs::remove_file(&private_path).unwrap();
    let public_pem = fs::read(&public_path).unwrap();
    load_verifier(&public_path, &private_path, None, None).unwrap();
    assert!(!private_path.exists());
    assert_eq!(fs::read(&public_path).unwrap(), public_pem);

    // A configured private key without its public half is an error, not a
    // silently generated new pair.
    fs::remove_file(&public_path).unwrap();
    fs::write(&private_path, &private_pem).unwrap();
    assert!(load_verifier(&public_path, &private_path, None, None).is_err());
    assert_eq!(fs::read(&private_path).unwrap(), private_pem);

    fs::remove_dir_all(&dir).unwrap();
}

fn token_with_kid(private_pem: &str, kid: &str) -> String {
    mint_token_with_key_id(
        private_pem.as_bytes(),
        Some(kid),
        Uuid::now_v7(),
        "buyer",
        chrono::Duration::minutes(5),
        None,
        None,
    )
    .unwrap()
}

#[tokio::test]
async fn a_jwks_file_verifies_tokens_by_kid_and_refuses_other_keys() {
    let dir = std::env::temp_dir().join(format!("souk-jwks-test-{}", Uuid::now_v7()));
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join("jwks.json");
    let jwk = public_jwk(keys().private_pem.as_bytes(), "current").unwrap();
    fs::write(&path, serde_json::json!({ "keys": [jwk] }).to_string()).unwrap();
    let verifier = JwtVerifier::from_jwks(
        path.to_str().unwrap(),
        std::time::Duration::ZERO,
        None,
        None,
    )
    .unwrap();

    let token = token_with_kid(&keys().private_pem, "current");
    assert_eq!(
        verifier.verify_fresh(&token).await.unwrap().role,
        Role::Buyer
    );
    let unknown = token_with_kid(&other_keys().private_pem, "next");
    assert_eq!(
        verifier.verify_fresh(&unknown).await.unwrap_err().0,
        crate::verify::UNKNOWN_KEY
    );
    // Another key under a published kid: the signature does not verify.
    let impostor = token_with_kid(&other_keys().private_pem, "current");
    assert_eq!(
        verifier.verify_fresh(&impostor).await.unwrap_err().0,
        "the token's signature does not verify"
    );

    // The file changes: the new key verifies, the old one no longer does.
    let next = public_jwk(other_keys().private_pem.as_bytes(), "next").unwrap();
    fs::write(&path, serde_json::json!({ "keys": [next] }).to_string()).unwrap();
    assert!(verifier.verify_fresh(&unknown).await.is_ok());
    assert_eq!(
        verifier.verify_fresh(&token).await.unwrap_err().0,
        crate::verify::UNKNOWN_KEY
    );
    // A broken document keeps the last good keys.
    fs::write(&path, "{\"keys\": []}").unwrap();
    let stranger = token_with_kid(&keys().private_pem, "stranger");
    assert!(verifier.verify_fresh(&stranger).await.is_err());
    assert!(verifier.verify_fresh(&unknown).await.is_ok());
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_jwks_keeps_only_rs256_signing_keys() {
    let mut signing = public_jwk(keys().private_pem.as_bytes(), "sig").unwrap();
    let mut encryption = signing.clone();
    encryption["kid"] = "enc".into();
    encryption["use"] = "enc".into();
    let mut other_algorithm = signing.clone();
    other_algorithm["kid"] = "ps".into();
    other_algorithm["alg"] = "PS256".into();
    let document = serde_json::json!({ "keys": [signing.clone(), encryption, other_algorithm] });
    let keys = crate::jwks::parse(document.to_string().as_bytes()).unwrap();
    let mut kids: Vec<_> = keys.by_kid.keys().cloned().collect();
    kids.sort();
    assert_eq!(kids, ["sig"]);

    signing["use"] = "enc".into();
    let unusable = serde_json::json!({ "keys": [signing] });
    assert!(crate::jwks::parse(unusable.to_string().as_bytes()).is_err());
    assert!(crate::jwks::parse(b"not json").is_err());
    assert!(crate::jwks::parse(b"{\"keys\": []}").is_err());
}
