//! Asymmetric tokens as Supabase issues them today: keys from a JSON Web
//! Key Set served over HTTP, chosen by `kid`, rotated without a restart;
//! the key decides the algorithm, and the claims rules hold.

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};
use vantage_sync::auth::{ClaimRules, JwksSource, KeySettings, TokenKeys};
use vantage_sync_testkit::{
    JwksServer, KeyKind, SECRET, TestApp, TestDb, TestKey, WsClient, base64url, unix_now as now,
};

const QUERY: &str = "{ syncState(resource: \"funds\") { resource } }";

/// A server that verifies with the HS256 test secret and the key set at
/// `jwks`, refreshed every `refresh`, under `rules`.
async fn app_with_keys(jwks: &JwksServer, refresh: Duration, rules: ClaimRules) -> TestApp {
    let keys = TokenKeys::from_settings(KeySettings {
        secret: Some(SECRET.as_bytes().to_vec()),
        jwks: Some((JwksSource::Url(jwks.url()), refresh)),
        rules,
    })
    .unwrap();
    TestApp::spawn_with(TestDb::migrated().await, |config| config.keys = keys).await
}

async fn read(app: &TestApp, token: &str) -> (StatusCode, Value) {
    app.post(Some(&format!("Bearer {token}")), &json!({"query": QUERY}))
        .await
}

fn accepted() -> (StatusCode, Value) {
    (
        StatusCode::OK,
        json!({"data": {"syncState": {"resource": "funds"}}}),
    )
}

fn refused(message: &str) -> (StatusCode, Value) {
    (
        StatusCode::UNAUTHORIZED,
        json!({"errors": [{"message": format!("invalid token: {message}"), "extensions": {"code": "INVALID_TOKEN"}}]}),
    )
}

#[tokio::test]
async fn tokens_signed_with_each_algorithm_are_accepted() {
    let es = TestKey::new(KeyKind::Es256, "es-1");
    let rs = TestKey::new(KeyKind::Rs256, "rs-1");
    let ed = TestKey::new(KeyKind::EdDsa, "ed-1");
    let jwks = JwksServer::start(vec![es.public_jwk(), rs.public_jwk(), ed.public_jwk()]).await;
    let app = app_with_keys(&jwks, Duration::from_secs(600), ClaimRules::default()).await;
    for key in [&es, &rs, &ed] {
        assert_eq!(
            read(&app, &key.token("authenticated")).await,
            accepted(),
            "{:?}",
            key.signer
        );
    }
    assert_eq!(read(&app, &app.token("authenticated")).await, accepted());
    // A write with an ES256 service token goes through the same path.
    let (status, body) = app
        .post(
            Some(&format!("Bearer {}", es.token("service_role"))),
            &json!({"query": "mutation { registerResource(resource: \"es_made\") { resource } }"}),
        )
        .await;
    assert_eq!(
        (status, body),
        (
            StatusCode::OK,
            json!({"data": {"registerResource": {"resource": "es_made"}}})
        )
    );
}

#[tokio::test]
async fn a_rotated_in_key_works_at_once_and_a_removed_key_stops_after_the_refresh() {
    let old = TestKey::new(KeyKind::Es256, "2026-old");
    let new = TestKey::new(KeyKind::Es256, "2026-new");
    let jwks = JwksServer::start(vec![old.public_jwk()]).await;
    let app = app_with_keys(&jwks, Duration::from_secs(1), ClaimRules::default()).await;
    assert_eq!(read(&app, &old.token("authenticated")).await, accepted());
    assert_eq!(
        read(&app, &new.token("authenticated")).await,
        refused("unknown key id \"2026-new\"")
    );

    // Rotation: the new key is published, the old one still listed.
    jwks.set_keys(vec![old.public_jwk(), new.public_jwk()]);
    // The refused token above spent this interval's fetch for unknown ids,
    // so the new key is taken up by the scheduled refresh (1 s here).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while read(&app, &new.token("authenticated")).await != accepted() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new key never verified"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The old key is removed: it stops verifying after the next refresh.
    jwks.set_keys(vec![new.public_jwk()]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let answer = read(&app, &old.token("authenticated")).await;
        if answer == refused("unknown key id \"2026-old\"") {
            break;
        }
        assert_eq!(answer, accepted());
        assert!(
            tokio::time::Instant::now() < deadline,
            "the removed key still verifies"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(read(&app, &new.token("authenticated")).await, accepted());
}

#[tokio::test]
async fn a_new_kid_is_fetched_at_once_and_unknown_kid_fetches_are_rate_limited() {
    let first = TestKey::new(KeyKind::Es256, "first");
    let rotated = TestKey::new(KeyKind::EdDsa, "rotated");
    let jwks = JwksServer::start(vec![first.public_jwk()]).await;
    let app = app_with_keys(&jwks, Duration::from_secs(600), ClaimRules::default()).await;
    assert_eq!(jwks.fetches(), 1, "loaded once at start");

    // Published after the start: the first token naming it makes the
    // server fetch the set at once, with no restart and no refresh due.
    jwks.set_keys(vec![first.public_jwk(), rotated.public_jwk()]);
    assert_eq!(
        read(&app, &rotated.token("authenticated")).await,
        accepted()
    );
    assert_eq!(jwks.fetches(), 2);

    // A flood of made-up key ids costs nothing more within the interval.
    let strangers: Vec<TestKey> = (0..3)
        .map(|n| TestKey::new(KeyKind::Es256, &format!("stranger-{n}")))
        .collect();
    let mut requests = Vec::new();
    let app = &app;
    for n in 0..30 {
        let token = strangers[n % 3].token("authenticated");
        requests.push(async move { (n % 3, read(app, &token).await) });
    }
    for (n, answer) in futures_util::future::join_all(requests).await {
        assert_eq!(answer, refused(&format!("unknown key id \"stranger-{n}\"")));
    }
    assert_eq!(
        jwks.fetches(),
        2,
        "unknown key ids fetch at most once per 10 s"
    );
}

#[tokio::test]
async fn the_last_good_key_set_verifies_while_the_key_server_is_down() {
    let key = TestKey::new(KeyKind::Rs256, "rs-kept");
    let mut jwks = JwksServer::start(vec![key.public_jwk()]).await;
    let app = app_with_keys(&jwks, Duration::from_secs(1), ClaimRules::default()).await;
    assert_eq!(read(&app, &key.token("authenticated")).await, accepted());
    jwks.stop();
    // Wait until a refresh has failed, as counted in /metrics.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !app
        .metrics()
        .await
        .contains("vantage_sync_jwks_refreshes_total{outcome=\"Failed\"}")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no failed refresh counted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(read(&app, &key.token("authenticated")).await, accepted());
    assert_eq!(app.readiness().await, StatusCode::OK);
    let metrics = app.metrics().await;
    assert!(metrics.contains("vantage_sync_jwks_keys 1\n"), "{metrics}");
}

#[tokio::test]
async fn readiness_waits_for_the_key_set() {
    let key = TestKey::new(KeyKind::Es256, "late");
    // Nothing listens there yet: the set cannot be loaded.
    let placeholder = JwksServer::start(vec![]).await;
    let addr = placeholder.addr;
    drop(placeholder);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let keys = TokenKeys::from_settings(KeySettings {
        secret: None,
        jwks: Some((
            JwksSource::Url(format!("http://{addr}/jwks.json")),
            Duration::from_secs(600),
        )),
        rules: ClaimRules::default(),
    })
    .unwrap();
    let db = TestDb::migrated().await;
    let mut config = vantage_sync::server::ServerConfig::with_keys(db.url.clone(), keys);
    config.listen_addr = "127.0.0.1:0".parse().unwrap();
    config.migrate = false;
    let server = vantage_sync::server::Server::bind(config).await.unwrap();
    let url = format!("http://{}/readyz", server.local_addr());
    tokio::spawn(server.run(std::future::pending()));
    let client = reqwest::Client::new();
    let status = client.get(&url).send().await.unwrap();
    assert_eq!(status.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        status.text().await.unwrap(),
        "JSON Web Key Set not loaded yet"
    );
    // The set appears at that address: the start-up retries find it.
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let set = json!({"keys": [key.public_jwk()]});
    let routes = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            let set = set.clone();
            async move { axum::Json(set) }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, routes).await.unwrap() });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while client.get(&url).send().await.unwrap().status() != StatusCode::OK {
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every refusal is 401 INVALID_TOKEN and says why.
#[tokio::test]
async fn forged_and_misdirected_tokens_are_refused_with_the_reason() {
    let rsa = TestKey::new(KeyKind::Rs256, "rsa-1");
    let jwks = JwksServer::start(vec![rsa.public_jwk()]).await;
    let rules = ClaimRules::parse(
        Some("https://project.supabase.co/auth/v1"),
        Some("authenticated"),
        "app_metadata.role",
    )
    .unwrap();
    let app = app_with_keys(&jwks, Duration::from_secs(600), rules.clone()).await;
    let exp = now() + 600;
    let claims = |iss: &str, aud: &str, role: &str| json!({"iss": iss, "aud": aud, "role": "authenticated", "app_metadata": {"role": role}, "exp": exp});
    let good = claims(
        "https://project.supabase.co/auth/v1",
        "authenticated",
        "service_role",
    );
    let sign_rsa = |claims: &Value| {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some("rsa-1".into());
        jsonwebtoken::encode(
            &header,
            claims,
            &EncodingKey::from_rsa_pem(&rsa.pem).unwrap(),
        )
        .unwrap()
    };
    assert_eq!(read(&app, &sign_rsa(&good)).await, accepted());

    // Algorithm confusion: HS256 "signed" with the RSA public key as the
    // HMAC secret, naming the RSA key or naming none.
    let public_pem = rsa.public_pem();
    let confused = |kid: Option<&str>| {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, &good, &EncodingKey::from_secret(&public_pem)).unwrap()
    };
    assert_eq!(
        read(&app, &confused(Some("rsa-1"))).await,
        refused("the token says it is signed with HS256, but its key verifies RS256 only")
    );
    assert_eq!(
        read(&app, &confused(None)).await,
        refused("the token's signature is not valid")
    );
    // RS256 naming the key but signed by another RSA key.
    let other = TestKey::new(KeyKind::Rs256, "rsa-1");
    assert_eq!(
        read(&app, &other.token_with(&rules, "authenticated")).await,
        refused("the token's signature is not valid")
    );
    let unsigned = format!(
        "{}.{}.",
        base64url(br#"{"alg":"none","typ":"JWT","kid":"rsa-1"}"#),
        base64url(good.to_string().as_bytes())
    );
    assert_eq!(
        read(&app, &unsigned).await,
        refused("unsigned tokens (alg: none) are refused")
    );
    assert_eq!(
        read(
            &app,
            &sign_rsa(&claims(
                "https://evil.example/auth/v1",
                "authenticated",
                "service_role"
            ))
        )
        .await,
        refused("wrong issuer: `iss` must be https://project.supabase.co/auth/v1")
    );
    let mut no_iss = good.clone();
    no_iss.as_object_mut().unwrap().remove("iss");
    assert_eq!(
        read(&app, &sign_rsa(&no_iss)).await,
        refused("the token must carry a `iss` claim")
    );
    assert_eq!(
        read(
            &app,
            &sign_rsa(&claims(
                "https://project.supabase.co/auth/v1",
                "anon-api",
                "service_role"
            ))
        )
        .await,
        refused("wrong audience: `aud` must include one of authenticated")
    );
    assert_eq!(
        read(
            &app,
            &sign_rsa(&claims(
                "https://project.supabase.co/auth/v1",
                "authenticated",
                "postgres"
            ))
        )
        .await,
        refused(
            "role \"postgres\" (at `app_metadata.role`) is not accepted; use anon, authenticated or service_role"
        )
    );
    let mut no_role = good.clone();
    no_role.as_object_mut().unwrap().remove("app_metadata");
    assert_eq!(
        read(&app, &sign_rsa(&no_role)).await,
        refused("the token must carry a role at `app_metadata.role`")
    );
    let mut early = good.clone();
    early["nbf"] = json!(now() + 300);
    assert_eq!(
        read(&app, &sign_rsa(&early)).await,
        refused("the token is not valid yet (`nbf`)")
    );
    let mut late = good.clone();
    late["exp"] = json!(now() - 1);
    assert_eq!(
        read(&app, &sign_rsa(&late)).await,
        refused("the token has expired")
    );
    let es512 = format!(
        "{}.{}.c2ln",
        base64url(br#"{"alg":"ES512","typ":"JWT"}"#),
        base64url(good.to_string().as_bytes())
    );
    assert_eq!(
        read(&app, &es512).await,
        refused(
            "the algorithm \"ES512\" is not accepted; tokens are signed with HS256, ES256, RS256 or EdDSA"
        )
    );
}

#[tokio::test]
async fn a_websocket_subscription_works_with_an_es256_token() {
    let key = TestKey::new(KeyKind::Es256, "ws-es");
    let jwks = JwksServer::start(vec![key.public_jwk()]).await;
    let app = app_with_keys(&jwks, Duration::from_secs(600), ClaimRules::default()).await;
    let mut client = WsClient::connect(&app, "graphql-transport-ws").await;
    let ack = client
        .init(json!({"Authorization": format!("Bearer {}", key.token("authenticated"))}))
        .await
        .unwrap();
    assert_eq!(ack, json!({"type": "connection_ack"}));
    client
        .subscribe(
            "1",
            "subscription { syncStateChanged(resources: [\"funds\"], initial: true) { operation resource } }",
            json!({}),
        )
        .await;
    let (_, snapshot) = client.next_data().await;
    assert_eq!(
        snapshot,
        json!({"syncStateChanged": {"operation": "SNAPSHOT", "resource": "funds"}})
    );
    let (status, _) = app
        .post(
            Some(&format!("Bearer {}", key.token("service_role"))),
            &json!({"query": "mutation { startSync(resource: \"funds\") { resource } }"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, change) = client.next_data().await;
    assert_eq!(
        change,
        json!({"syncStateChanged": {"operation": "UPDATE", "resource": "funds"}})
    );
    // A token from a key outside the set is refused at init with 4403.
    let stranger = TestKey::new(KeyKind::Es256, "not-published");
    let mut refused_client = WsClient::connect(&app, "graphql-transport-ws").await;
    let closed = refused_client
        .init(json!({"Authorization": format!("Bearer {}", stranger.token("authenticated"))}))
        .await
        .unwrap_err();
    assert_eq!(closed.0, 4403, "{closed:?}");
}
