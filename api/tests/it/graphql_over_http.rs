//! GraphQL over HTTP to the letter: the specification's own audit
//! (graphql-http's `auditServer`, run by Node from
//! `api/tests/graphql-http-audit`) against a real server, failing on any
//! error or warning; and the media types and statuses it asks for, each
//! checked here too so a failure names its case.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tokio::process::Command;
use vantage_sync_testkit::TestApp;

use crate::examples::{npm_install, require_node};

fn audit_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/graphql-http-audit")
}

#[tokio::test]
async fn the_graphql_over_http_audit_passes_without_a_warning() {
    require_node().await;
    npm_install(&audit_dir()).await;
    let app = TestApp::spawn().await;
    let run = Command::new("node")
        .arg("audit.mjs")
        .current_dir(audit_dir())
        .env("VANTAGE_SYNC_URL", app.url("/graphql"))
        .env("VANTAGE_SYNC_TOKEN", app.token("authenticated"))
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the audit did not end within 2 minutes")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the audit failed to run:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let audits: Vec<Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    // The audit has dozens of cases; a run that made none proves nothing.
    assert!(audits.len() > 40, "{stdout}");
    let failed: Vec<&Value> = audits
        .iter()
        .filter(|audit| audit["status"] != "ok")
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} audits did not pass:\n{}",
        failed.len(),
        audits.len(),
        failed
            .iter()
            .map(|audit| serde_json::to_string_pretty(audit).unwrap())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

const GRAPHQL_RESPONSE_JSON: &str = "application/graphql-response+json";

/// POSTs `body` as `token` with `headers`; status, content type, body.
async fn post(
    app: &TestApp,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: String,
) -> (u16, String, Value) {
    let mut request = reqwest::Client::new().post(app.url("/graphql")).body(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    answer(request.send().await.unwrap()).await
}

async fn answer(response: reqwest::Response) -> (u16, String, Value) {
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|value| value.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, content_type, body)
}

fn code(body: &Value) -> &str {
    body["errors"][0]["extensions"]["code"]
        .as_str()
        .unwrap_or("")
}

#[tokio::test]
async fn media_types_and_statuses_follow_the_specification() {
    let app = TestApp::spawn().await;
    let token = app.token("authenticated");
    let json = [("content-type", "application/json")];
    let asks = |accept: &'static str| [("content-type", "application/json"), ("accept", accept)];
    let ok = r#"{"query": "{ syncStates { resource } }"}"#.to_owned();
    let unparsable = r#"{"query": "{"}"#.to_owned();
    let invalid = r#"{"query": "{ noSuchField }"}"#.to_owned();
    let uncoercible = r#"{"query": "query($r: String!) { syncState(resource: $r) { resource } }", "variables": {"r": 7}}"#.to_owned();

    // application/json: the default, and what */* gets; request errors
    // are 200 with "data": null, as before.
    for headers in [&json[..], &asks("*/*")[..], &asks("application/json")[..]] {
        let (status, content_type, body) = post(&app, Some(&token), headers, ok.clone()).await;
        assert_eq!(status, 200);
        assert!(
            content_type.starts_with("application/json"),
            "{content_type}"
        );
        assert!(body["data"]["syncStates"].is_array(), "{body}");
        let (status, _, body) = post(&app, Some(&token), headers, unparsable.clone()).await;
        assert_eq!(status, 200);
        assert_eq!(body["data"], Value::Null);
        assert!(body.as_object().unwrap().contains_key("data"));
    }

    // application/graphql-response+json, alone or preferred: that type;
    // 200 with data when the operation ran; 400 without data when it
    // could not (parse, validation, variable coercion).
    for accept in [
        GRAPHQL_RESPONSE_JSON,
        "application/graphql-response+json, application/json;q=0.9",
        "application/json;q=0.5, application/graphql-response+json",
    ] {
        let headers = asks(accept);
        let (status, content_type, body) = post(&app, Some(&token), &headers, ok.clone()).await;
        assert_eq!(status, 200, "{accept}");
        assert!(
            content_type.starts_with(GRAPHQL_RESPONSE_JSON),
            "{content_type}"
        );
        assert!(body["data"]["syncStates"].is_array(), "{body}");
        for failing in [&unparsable, &invalid, &uncoercible] {
            let (status, content_type, body) =
                post(&app, Some(&token), &headers, failing.clone()).await;
            assert_eq!(status, 400, "{failing}: {body}");
            assert!(
                content_type.starts_with(GRAPHQL_RESPONSE_JSON),
                "{content_type}"
            );
            assert!(body.get("data").is_none(), "{failing}: {body}");
            assert_eq!(code(&body), "BAD_USER_INPUT", "{body}");
        }
    }
    // A field error is not a request error: the operation ran.
    let anon = post(
        &app,
        None,
        &asks(GRAPHQL_RESPONSE_JSON),
        r#"{"query": "mutation { startSync(resource: \"funds\") { resource } }"}"#.into(),
    )
    .await;
    assert_eq!(anon.0, 200, "{anon:?}");
    assert!(anon.2.as_object().unwrap().contains_key("data"), "{anon:?}");
    assert_eq!(code(&anon.2), "UNAUTHENTICATED");
    // Preferred less than JSON: JSON.
    let (_, content_type, _) = post(
        &app,
        Some(&token),
        &asks("application/graphql-response+json;q=0.2, application/json"),
        ok.clone(),
    )
    .await;
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );

    // A POST body must be declared JSON.
    for headers in [&[][..], &[("content-type", "text/plain")][..]] {
        let (status, _, body) = post(&app, Some(&token), headers, ok.clone()).await;
        assert_eq!(status, 415, "{headers:?}: {body}");
        assert_eq!(code(&body), "BAD_USER_INPUT");
        assert!(
            body["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains("application/json")
        );
    }
    let (status, _, _) = post(
        &app,
        Some(&token),
        &[("content-type", "application/json; charset=utf-8")],
        ok.clone(),
    )
    .await;
    assert_eq!(status, 200);

    // GET: operationName and variables from the query string.
    let response = reqwest::Client::new()
        .get(app.url("/graphql"))
        .bearer_auth(&token)
        .query(&[
            ("query", "query A { syncStates { resource } } query B($r: String!) { syncState(resource: $r) { resource } }"),
            ("operationName", "B"),
            ("variables", r#"{"r": "funds"}"#),
        ])
        .send()
        .await
        .unwrap();
    let (status, _, body) = answer(response).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["data"]["syncState"],
        serde_json::json!({"resource": "funds"}),
        "{body}"
    );
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(text.as_bytes()))
}

fn persisted(hash: &str) -> Value {
    serde_json::json!({"persistedQuery": {"version": 1, "sha256Hash": hash}})
}

/// The `vantage_sync_persisted_queries_total` count for `result`.
async fn persisted_count(app: &TestApp, result: &str) -> u64 {
    let metrics = app.metrics().await;
    let line = format!("vantage_sync_persisted_queries_total{{result=\"{result}\"}} ");
    metrics
        .lines()
        .find_map(|text| text.strip_prefix(&line))
        .map_or(0, |count| count.trim().parse().unwrap())
}

#[tokio::test]
async fn automatic_persisted_queries_over_post_and_get() {
    let app = TestApp::spawn().await;
    let token = app.token("authenticated");
    let json = [("content-type", "application/json")];
    let query = "query Apq { syncStates { resource lastSyncStatus } }";
    let hash = sha256_hex(query);

    // Unknown: PERSISTED_QUERY_NOT_FOUND, with 200 (Apollo's link retries
    // with the document; a 4xx would make it give up on hashes).
    let hash_only = serde_json::json!({"extensions": persisted(&hash)}).to_string();
    let (status, _, body) = post(&app, Some(&token), &json, hash_only.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(code(&body), "PERSISTED_QUERY_NOT_FOUND");
    assert_eq!(body["errors"][0]["message"], "PersistedQueryNotFound");
    assert!(body.get("data").is_none(), "{body}");
    assert_eq!(persisted_count(&app, "miss").await, 1);

    // A hash that is not the document's: refused, nothing remembered.
    let wrong =
        serde_json::json!({"query": query, "extensions": persisted(&sha256_hex("{ other }"))});
    let (status, _, body) = post(&app, Some(&token), &json, wrong.to_string()).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(code(&body), "BAD_USER_INPUT");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("sha256Hash")
    );
    let (_, _, body) = post(&app, Some(&token), &json, hash_only.clone()).await;
    assert_eq!(code(&body), "PERSISTED_QUERY_NOT_FOUND");
    for malformed in [
        serde_json::json!({"persistedQuery": {"version": 2, "sha256Hash": hash}}),
        serde_json::json!({"persistedQuery": {"version": 1, "sha256Hash": "abc"}}),
        serde_json::json!({"persistedQuery": "yes"}),
    ] {
        let body = serde_json::json!({"query": query, "extensions": malformed}).to_string();
        let (status, _, answer) = post(&app, Some(&token), &json, body).await;
        assert_eq!(status, 400, "{malformed}: {answer}");
        assert_eq!(code(&answer), "BAD_USER_INPUT", "{answer}");
    }

    // The document with its hash: run and remembered; then the hash alone
    // gets the same answer, over POST and GET (any letter case).
    let full = serde_json::json!({"query": query, "extensions": persisted(&hash)});
    let (status, _, first) = post(&app, Some(&token), &json, full.to_string()).await;
    assert_eq!(status, 200, "{first}");
    assert!(first["data"]["syncStates"].is_array(), "{first}");
    assert_eq!(persisted_count(&app, "registered").await, 1);
    let (status, _, again) = post(&app, Some(&token), &json, hash_only.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(again, first);
    let response = reqwest::Client::new()
        .get(app.url("/graphql"))
        .bearer_auth(&token)
        .query(&[
            ("extensions", persisted(&hash.to_uppercase()).to_string()),
            ("operationName", "Apq".to_owned()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["cache-control"], "no-store");
    let (status, _, by_get) = answer(response).await;
    assert_eq!(status, 200, "{by_get}");
    assert_eq!(by_get, first);
    // And by documentId.
    let by_id = serde_json::json!({"documentId": format!("sha256:{hash}")}).to_string();
    let (_, _, by_id) = post(&app, Some(&token), &json, by_id).await;
    assert_eq!(by_id, first);
    assert_eq!(persisted_count(&app, "hit").await, 3);
}

#[tokio::test]
async fn without_persisted_queries_a_hash_alone_is_not_supported() {
    let app = TestApp::spawn_with(vantage_sync_testkit::TestDb::migrated().await, |config| {
        config.documents.persisted_queries = false;
    })
    .await;
    let token = app.token("authenticated");
    let json = [("content-type", "application/json")];
    let query = "{ syncStates { resource } }";
    let hash = sha256_hex(query);
    let full = serde_json::json!({"query": query, "extensions": persisted(&hash)});
    let (status, _, body) = post(&app, Some(&token), &json, full.to_string()).await;
    assert_eq!(status, 200);
    assert!(body["data"]["syncStates"].is_array(), "{body}");
    let hash_only = serde_json::json!({"extensions": persisted(&hash)}).to_string();
    let (status, _, body) = post(&app, Some(&token), &json, hash_only).await;
    assert_eq!(status, 200);
    assert_eq!(code(&body), "PERSISTED_QUERY_NOT_SUPPORTED", "{body}");
    assert_eq!(body["errors"][0]["message"], "PersistedQueryNotSupported");
}

/// A server holding callers to a manifest of one query and one
/// subscription (service_role too when `for_all`).
async fn trusted_app(for_all: bool) -> (TestApp, String, String) {
    use std::sync::Arc;
    use vantage_sync::graphql::documents::TrustedDocuments;
    let query = "query Trusted { syncStates { resource } }";
    let subscription = "subscription Watch { syncStateChanged { resource operation } }";
    let manifest = serde_json::json!({
        sha256_hex(query): query,
        "watch-v1": subscription,
    })
    .to_string();
    let trusted =
        TrustedDocuments::from_manifest(Path::new("persisted-documents.json"), &manifest).unwrap();
    let app = TestApp::spawn_with(vantage_sync_testkit::TestDb::migrated().await, |config| {
        config.documents.trusted = Some(Arc::new(trusted));
        config.documents.trusted_for_all = for_all;
    })
    .await;
    (app, query.to_owned(), subscription.to_owned())
}

#[tokio::test]
async fn trusted_documents_are_all_a_restricted_caller_may_run() {
    let (app, query, subscription) = trusted_app(false).await;
    let token = app.token("authenticated");
    let json = [("content-type", "application/json")];
    let hash = sha256_hex(&query);
    let run = |body: Value| {
        let app = &app;
        let token = &token;
        async move { post(app, Some(token), &json, body.to_string()).await }
    };

    // By documentId (sha256:<hex>), by APQ hash, and as its exact text.
    for body in [
        serde_json::json!({"documentId": format!("sha256:{hash}")}),
        serde_json::json!({"extensions": persisted(&hash)}),
        serde_json::json!({"query": query}),
        serde_json::json!({"query": query, "extensions": persisted(&hash)}),
    ] {
        let (status, _, answer) = run(body.clone()).await;
        assert_eq!(status, 200, "{body}: {answer}");
        assert!(answer["data"]["syncStates"].is_array(), "{body}: {answer}");
    }
    // Anything else: PERSISTED_QUERY_REQUIRED, also with a fresh APQ
    // hash, which is then not remembered.
    let other = "{ syncStates { resource lastSyncStatus } }";
    for body in [
        serde_json::json!({"query": other}),
        serde_json::json!({"query": other, "extensions": persisted(&sha256_hex(other))}),
    ] {
        let (status, _, answer) = run(body.clone()).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(code(&answer), "PERSISTED_QUERY_REQUIRED", "{answer}");
    }
    let (_, _, answer) =
        run(serde_json::json!({"extensions": persisted(&sha256_hex(other))})).await;
    assert_eq!(code(&answer), "PERSISTED_QUERY_NOT_FOUND", "{answer}");
    let (_, _, answer) = run(serde_json::json!({"documentId": "no-such-document"})).await;
    assert_eq!(code(&answer), "PERSISTED_QUERY_NOT_FOUND", "{answer}");
    assert_eq!(persisted_count(&app, "refused").await, 2);
    assert_eq!(persisted_count(&app, "registered").await, 0);
    // Anonymous callers are held to it too.
    let (status, _, answer) = post(
        &app,
        None,
        &json,
        serde_json::json!({"query": other}).to_string(),
    )
    .await;
    assert_eq!(
        (status, code(&answer)),
        (400, "PERSISTED_QUERY_REQUIRED"),
        "{answer}"
    );

    // service_role may send any document, and its APQ hashes are
    // remembered, yet never run for a restricted caller.
    let writer = app.token("service_role");
    let full = serde_json::json!({"query": other, "extensions": persisted(&sha256_hex(other))});
    let (status, _, answer) = post(&app, Some(&writer), &json, full.to_string()).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer["data"]["syncStates"].is_array());
    let (_, _, answer) =
        run(serde_json::json!({"extensions": persisted(&sha256_hex(other))})).await;
    assert_eq!(code(&answer), "PERSISTED_QUERY_NOT_FOUND", "{answer}");

    // Over WebSocket: a trusted subscription by its manifest key; any
    // other document refused with the same code.
    let mut socket = vantage_sync_testkit::WsClient::ready(&app, "authenticated").await;
    socket
        .send(serde_json::json!({"id": "1", "type": "subscribe", "payload": {"query": "subscription { syncStateChanged { resource } }"}}))
        .await;
    let refused = socket.recv().await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(
        refused["payload"][0]["extensions"]["code"], "PERSISTED_QUERY_REQUIRED",
        "{refused}"
    );
    let started = vantage_sync_testkit::subscription_started(&app.url("/metrics"));
    started
        .wait(socket.send(serde_json::json!({"id": "2", "type": "subscribe", "payload": {"documentId": "watch-v1"}})))
        .await;
    app.sql("SELECT start_vantage_sync('funds')").await;
    let (id, data) = socket.next_data().await;
    assert_eq!(id, "2");
    assert_eq!(data["syncStateChanged"]["resource"], "funds");
    socket.close().await;

    // Over SSE: the same rule.
    let refused = vantage_sync_testkit::SseStream::open(
        &app.url("/graphql"),
        Some(&token),
        &serde_json::json!({"query": "subscription { syncStateChanged { resource } }"}),
        None,
    )
    .await
    .err()
    .expect("an untrusted subscription over SSE was let in");
    assert_eq!(refused.0, 400);
    assert_eq!(
        code(&refused.1),
        "PERSISTED_QUERY_REQUIRED",
        "{:?}",
        refused.1
    );
    let mut stream = vantage_sync_testkit::SseStream::open(
        &app.url("/graphql"),
        Some(&token),
        &serde_json::json!({"query": subscription}),
        None,
    )
    .await
    .unwrap();
    app.sql("SELECT complete_vantage_sync('funds', 1, 1, 0)")
        .await;
    let (_, payload) = stream.next_payload().await;
    assert_eq!(
        payload["data"]["syncStateChanged"]["resource"], "funds",
        "{payload}"
    );
}

#[tokio::test]
async fn trusted_documents_for_all_hold_service_role_too() {
    let (app, query, _) = trusted_app(true).await;
    let writer = app.token("service_role");
    let json = [("content-type", "application/json")];
    let (status, _, answer) = post(
        &app,
        Some(&writer),
        &json,
        serde_json::json!({"query": query}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let mutation = r#"mutation { startSync(resource: "funds") { resource } }"#;
    let (status, _, answer) = post(
        &app,
        Some(&writer),
        &json,
        serde_json::json!({"query": mutation}).to_string(),
    )
    .await;
    assert_eq!(
        (status, code(&answer)),
        (400, "PERSISTED_QUERY_REQUIRED"),
        "{answer}"
    );
}
