//! Bearer tokens: every way a token can be bad is a 401 INVALID_TOKEN,
//! never a silent anon.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};
use vantage_sync_testkit::{SECRET, TestApp, base64url, unix_now as now};

fn sign(claims: &Value, algorithm: Algorithm, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(algorithm),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

const QUERY: &str = "{ syncStates { resource } }";

#[tokio::test]
async fn every_bad_token_is_refused_with_401() {
    let app = TestApp::spawn().await;
    let exp = now() + 600;
    let unsigned = format!(
        "{}.{}.",
        base64url(br#"{"alg":"none","typ":"JWT"}"#),
        base64url(
            json!({"role": "service_role", "exp": exp})
                .to_string()
                .as_bytes()
        )
    );
    let good = sign(
        &json!({"role": "service_role", "exp": exp}),
        Algorithm::HS256,
        SECRET,
    );
    let mut tampered = good.clone();
    tampered.replace_range(good.len() - 4.., "AAAA");
    let cases = [
        ("garbage".to_owned(), "malformed"),
        ("a.b.c".to_owned(), "malformed"),
        (unsigned, "none"),
        (
            sign(
                &json!({"role": "service_role", "exp": now() - 1}),
                Algorithm::HS256,
                SECRET,
            ),
            "expired",
        ),
        (
            sign(
                &json!({"role": "service_role", "exp": exp}),
                Algorithm::HS256,
                "another-secret-0123456789abcdef0123456789",
            ),
            "wrong secret",
        ),
        (tampered, "tampered"),
        (
            sign(
                &json!({"role": "service_role", "exp": exp}),
                Algorithm::HS512,
                SECRET,
            ),
            "HS512",
        ),
        (
            sign(&json!({"exp": exp}), Algorithm::HS256, SECRET),
            "no role",
        ),
        (
            sign(&json!({"role": "service_role"}), Algorithm::HS256, SECRET),
            "no exp",
        ),
        (
            sign(
                &json!({"role": "postgres", "exp": exp}),
                Algorithm::HS256,
                SECRET,
            ),
            "role postgres",
        ),
        (
            sign(
                &json!({"role": "supabase_admin", "exp": exp}),
                Algorithm::HS256,
                SECRET,
            ),
            "unknown role",
        ),
        (
            sign(&json!({"role": 7, "exp": exp}), Algorithm::HS256, SECRET),
            "role not a string",
        ),
    ];
    for (token, why) in cases {
        for header in [format!("Bearer {token}")] {
            let (status, body) = app.post(Some(&header), &json!({"query": QUERY})).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{why}: {body}");
            assert_eq!(
                body["errors"][0]["extensions"],
                json!({"code": "INVALID_TOKEN"}),
                "{why}"
            );
            assert!(body.get("data").is_none(), "{why}");
        }
    }
    for header in ["Basic dXNlcjpwYXNz", "Bearer", "Bearer ", "Token abc"] {
        let (status, body) = app.post(Some(header), &json!({"query": QUERY})).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{header}");
        assert_eq!(body["errors"][0]["extensions"]["code"], "INVALID_TOKEN");
    }
    // Even introspection is refused with a bad token: it is never anon.
    let (status, _) = app
        .post(Some("Bearer garbage"), &json!({"query": "{ __typename }"}))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

/// Supabase user tokens carry `aud: authenticated` and more claims; they
/// are accepted, and the claims reach the database.
#[tokio::test]
async fn supabase_style_tokens_are_accepted() {
    let app = TestApp::spawn().await;
    let token = sign(
        &json!({"aud": "authenticated", "role": "authenticated", "sub": "8d5b-user", "email": "a@b.c", "exp": now() + 600, "iat": now()}),
        Algorithm::HS256,
        SECRET,
    );
    let (status, body) = app
        .post(
            Some(&format!("Bearer {token}")),
            &json!({"query": "{ syncState(resource: \"funds\") { resource } }"}),
        )
        .await;
    assert_eq!(
        (status, body),
        (
            StatusCode::OK,
            json!({"data": {"syncState": {"resource": "funds"}}})
        )
    );
    let service = sign(
        &json!({"role": "service_role", "exp": now() + 600}),
        Algorithm::HS256,
        SECRET,
    );
    let (status, body) = app
        .post(
            Some(&format!("bearer {service}")),
            &json!({"query": "mutation { registerResource(resource: \"x1\") { resource } }"}),
        )
        .await;
    assert_eq!(
        (status, body),
        (
            StatusCode::OK,
            json!({"data": {"registerResource": {"resource": "x1"}}})
        )
    );
}

#[tokio::test]
async fn an_anon_token_is_anon() {
    let app = TestApp::spawn().await;
    let (status, body) = app.graphql(Some("anon"), QUERY, json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["errors"][0]["extensions"]["code"], "UNAUTHENTICATED");
}
