//! The HTTP surface: limits, malformed requests, methods, probes, metrics,
//! GraphiQL, timeouts, readiness and graceful shutdown.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::{Connection, Executor};
use vantage_sync_testkit::{Cluster, TestApp, TestDb};

#[tokio::test]
async fn oversized_bodies_are_refused_with_413_and_the_server_stays_up() {
    let app = TestApp::spawn().await;
    let padding = " ".repeat(1024 * 1024);
    let body = format!("{{\"query\": \"{{ __typename }}\"{padding}}}");
    let response = app
        .client
        .post(app.url("/graphql"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["errors"][0]["extensions"]["code"], "BAD_USER_INPUT");
    let (status, body) = app.graphql(None, "{ __typename }", json!({})).await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, json!({"data": {"__typename": "Query"}}))
    );
}

/// A body over the limit gets its 413 and coded error every time, never a
/// reset, even from a client that writes its whole body before it reads
/// (as browsers' fetch and curl do): the server reads and drops the rest
/// of the body before it answers. A client that asks first (`Expect:
/// 100-continue`) is answered before it sends the body.
#[tokio::test]
async fn every_oversized_body_gets_its_413_never_a_reset() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::spawn().await;
    let length = 5 * 1024 * 1024;
    let head = |expect: &str| {
        format!(
            "POST /graphql HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n\
             content-length: {length}\r\n{expect}connection: close\r\n\r\n"
        )
    };
    let mut body = b"{\"query\": \"{ __typename }\"".to_vec();
    body.resize(length - 1, b' ');
    body.push(b'}');
    for attempt in 0..10 {
        let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        stream.write_all(head("").as_bytes()).await.unwrap();
        stream
            .write_all(&body)
            .await
            .unwrap_or_else(|error| panic!("attempt {attempt}: writing the body: {error}"));
        let mut answer = Vec::new();
        stream
            .read_to_end(&mut answer)
            .await
            .unwrap_or_else(|error| panic!("attempt {attempt}: reading the answer: {error}"));
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 413"),
            "attempt {attempt}: {answer}"
        );
        let json: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(json["errors"][0]["extensions"]["code"], "BAD_USER_INPUT");
        assert!(
            json["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains("1048576"),
            "{json}"
        );
    }
    // Asked first: refused before a byte of the body is sent.
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    stream
        .write_all(head("expect: 100-continue\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = vec![0_u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(
        answer[..read].starts_with(b"HTTP/1.1 413"),
        "{}",
        String::from_utf8_lossy(&answer[..read])
    );
    // And the server serves on.
    let (status, _) = app.graphql(None, "{ __typename }", json!({})).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn malformed_requests_get_json_errors() {
    let app = TestApp::spawn().await;
    for body in ["{not json", "[]", "{\"variables\": {}}", "\"query\""] {
        let response = app
            .client
            .post(app.url("/graphql"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{body}");
        let json: Value = response.json().await.unwrap();
        assert_eq!(
            json["errors"][0]["extensions"]["code"], "BAD_USER_INPUT",
            "{body}"
        );
    }
    // Syntax and validation errors are the client's to fix, and say so.
    for query in [
        "{ syncStates { ",
        "{ noSuchField }",
        "{ syncStates { resource nope } }",
    ] {
        let (status, body) = app.graphql(Some("authenticated"), query, json!({})).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body["errors"][0]["extensions"]["code"], "BAD_USER_INPUT",
            "{query}: {body}"
        );
    }
}

#[tokio::test]
async fn mutations_over_get_are_refused() {
    let app = TestApp::spawn().await;
    let response = app
        .client
        .get(app.url("/graphql"))
        .query(&[(
            "query",
            "mutation { registerResource(resource: \"via_get\") { resource } }",
        )])
        .bearer_auth(app.token("service_role"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["errors"][0]["extensions"]["code"], "BAD_USER_INPUT");
    let mut conn = app.db.connect().await;
    let count: i64 =
        sqlx::query_scalar("SELECT count(*) FROM vantage_sync_state WHERE resource = 'via_get'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(count, 0);
}

#[tokio::test]
async fn depth_and_complexity_limits() {
    let app = TestApp::spawn().await;
    let mut deep = String::from("name");
    for _ in 0..20 {
        deep = format!("ofType {{ {deep} }}");
    }
    let (status, body) = app
        .graphql(
            None,
            &format!("{{ __type(name: \"SyncState\") {{ {deep} }} }}"),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["errors"][0]["extensions"]["code"], "BAD_USER_INPUT");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("nested too deep"),
        "{body}"
    );

    // Each alias costs two (the field and its selection); __typename is
    // free. Introspection reads no database, so this meets the complexity
    // limit, not the read limit (tests/it/read_cost.rs).
    let wide: String = (0..1200)
        .map(|i| format!("a{i}: __type(name: \"SyncState\") {{ name }} "))
        .collect();
    let (status, body) = app
        .graphql(Some("authenticated"), &format!("{{ {wide} }}"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["errors"][0]["extensions"]["code"], "BAD_USER_INPUT");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("too complex"),
        "{body}"
    );
}

#[tokio::test]
async fn probes_metrics_and_graphiql() {
    let app = TestApp::spawn().await;
    let get = |path: &'static str| {
        let client = app.client.clone();
        let url = app.url(path);
        async move { client.get(url).send().await.unwrap() }
    };
    assert_eq!(get("/healthz").await.status(), StatusCode::OK);
    assert_eq!(get("/readyz").await.status(), StatusCode::OK);
    let page = get("/").await;
    assert_eq!(page.status(), StatusCode::OK);
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(page.text().await.unwrap().contains("graphiql"));

    app.query("authenticated", "{ syncStates { resource } }", json!({}))
        .await;
    app.graphql(
        None,
        "mutation { startSync(resource: \"accounts\") { resource } }",
        json!({}),
    )
    .await;
    app.post(Some("Bearer garbage"), &json!({"query": "{ __typename }"}))
        .await;
    let refused = app
        .client
        .get(app.url("/graphql?query=mutation%20%7B%20registerResource(resource%3A%20%22x%22)%20%7B%20resource%20%7D%20%7D"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::METHOD_NOT_ALLOWED);
    let metrics = get("/metrics").await.text().await.unwrap();
    for line in [
        "vantage_sync_graphql_requests_total{operation=\"Query\",outcome=\"Ok\"} 1",
        "vantage_sync_graphql_requests_total{operation=\"Mutation\",outcome=\"Error\"} 1",
        "vantage_sync_graphql_requests_total{operation=\"Unknown\",outcome=\"Rejected\"} 1",
        "vantage_sync_graphql_requests_total{operation=\"Mutation\",outcome=\"Rejected\"} 1",
        "vantage_sync_graphql_request_duration_seconds_count{operation=\"Query\"} 1",
        "vantage_sync_db_pool_connections{state=\"idle\"}",
    ] {
        assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    }
}

/// A request that outlives the timeout is answered with a coded error, and
/// its transaction is rolled back (the statement timeout stops it too).
#[tokio::test]
async fn slow_requests_time_out_and_change_nothing() {
    let db = TestDb::migrated().await;
    let app =
        TestApp::spawn_with(db, |config| config.request_timeout = Duration::from_secs(1)).await;
    let mut locker = app.db.connect().await;
    let mut lock = locker.begin().await.unwrap();
    lock.execute("SELECT * FROM vantage_sync_state WHERE resource = 'accounts' FOR UPDATE")
        .await
        .unwrap();
    let (status, body) = app
        .graphql(
            Some("service_role"),
            "mutation { startSync(resource: \"accounts\") { resource } }",
            json!({}),
        )
        .await;
    // Whichever fires first, the statement timeout (a field error) or the
    // request timeout (504), the client is told the request timed out.
    assert!(
        matches!(status, StatusCode::OK | StatusCode::GATEWAY_TIMEOUT),
        "{status}: {body}"
    );
    assert_eq!(
        body["errors"][0]["extensions"]["code"],
        "INTERNAL_SERVER_ERROR"
    );
    assert_eq!(body["errors"][0]["message"], "the request timed out");
    lock.rollback().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut conn = app.db.connect().await;
    let status: String = sqlx::query_scalar(
        "SELECT last_sync_status FROM vantage_sync_state WHERE resource = 'accounts'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(status, "never_run");
}

/// Shutdown lets the request in flight finish and commit.
#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let mut app = TestApp::spawn().await;
    let mut locker = app.db.connect().await;
    let mut lock = locker.begin().await.unwrap();
    lock.execute("SELECT * FROM vantage_sync_state WHERE resource = 'funds' FOR UPDATE")
        .await
        .unwrap();
    let client = app.client.clone();
    let url = app.url("/graphql");
    let token = app.token("service_role");
    let in_flight = tokio::spawn(async move {
        client
            .post(url)
            .bearer_auth(token)
            .json(
                &json!({"query": "mutation { startSync(resource: \"funds\") { lastSyncStatus } }"}),
            )
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopped = app.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !stopped.is_finished(),
        "the server stopped with a request in flight"
    );
    lock.rollback().await.unwrap();
    assert_eq!(
        in_flight.await.unwrap(),
        json!({"data": {"startSync": {"lastSyncStatus": "RUNNING"}}})
    );
    stopped.await.unwrap();
    // New connections are refused once it has stopped.
    assert!(app.client.get(app.url("/healthz")).send().await.is_err());
}

/// `/readyz` follows the database: 503 while it is down, 200 once back.
/// Meanwhile requests fail fast, within the pool's acquire timeout, with
/// 503 SERVICE_UNAVAILABLE and Retry-After, and work again once it is back.
#[tokio::test]
async fn readiness_follows_the_database() {
    let cluster = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    let url = cluster.url("postgres");
    migration_up(&url).await;
    let db = TestDb {
        name: "postgres".into(),
        url,
    };
    let app = TestApp::spawn_with(db, |config| {
        config.acquire_timeout = Duration::from_secs(2);
    })
    .await;
    let ready = |app: &TestApp| {
        let request = app.client.get(app.url("/readyz"));
        async move { request.send().await.unwrap().status() }
    };
    assert_eq!(ready(&app).await, StatusCode::OK);
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.stop();
        cluster
    })
    .await
    .unwrap();
    assert_eq!(ready(&app).await, StatusCode::SERVICE_UNAVAILABLE);
    // The same over SSE: a query is refused before any stream.
    for (role, query, accept) in [
        (
            "authenticated",
            "{ syncStates { resource } }",
            "application/json",
        ),
        (
            "service_role",
            "mutation { startSync(resource: \"accounts\") { resource } }",
            "application/json",
        ),
        (
            "authenticated",
            "{ syncStates { resource } }",
            "text/event-stream",
        ),
    ] {
        let started = std::time::Instant::now();
        let response = app
            .client
            .post(app.url("/graphql"))
            .bearer_auth(app.token(role))
            .header("accept", accept)
            .json(&json!({"query": query}))
            .send()
            .await
            .unwrap();
        let waited = started.elapsed();
        assert_eq!(
            response.status(),
            StatusCode::SERVICE_UNAVAILABLE,
            "{query}"
        );
        assert_eq!(
            response
                .headers()
                .get("retry-after")
                .unwrap()
                .to_str()
                .unwrap(),
            "1"
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["data"], Value::Null, "{body}");
        assert_eq!(
            body["errors"][0]["extensions"],
            json!({"code": "SERVICE_UNAVAILABLE"}),
            "{body}"
        );
        assert_eq!(
            body["errors"][0]["message"],
            "the database is unavailable; try again later"
        );
        assert!(waited < Duration::from_millis(3_500), "{waited:?}");
    }
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.restart();
        cluster
    })
    .await
    .unwrap();
    let mut status = StatusCode::SERVICE_UNAVAILABLE;
    for _ in 0..50 {
        status = ready(&app).await;
        if status == StatusCode::OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, StatusCode::OK);
    let body = app
        .query(
            "authenticated",
            "{ syncState(resource: \"funds\") { resource } }",
            json!({}),
        )
        .await;
    assert_eq!(body, json!({"data": {"syncState": {"resource": "funds"}}}));
    drop(cluster);
}

async fn migration_up(url: &str) {
    use migration::MigratorTrait;
    let db = sea_orm::Database::connect(url).await.unwrap();
    migration::Migrator::up(&db, None).await.unwrap();
    db.close().await.unwrap();
}

/// A hosted PostgreSQL (Supabase) wants TLS: the server connects with
/// `sslmode=require`, and its connections really are encrypted.
#[tokio::test]
async fn connects_to_a_tls_database() {
    let cluster = tokio::task::spawn_blocking(Cluster::start_tls)
        .await
        .unwrap();
    let url = format!("{}?sslmode=require", cluster.url("postgres"));
    migration_up(&url).await;
    let db = TestDb {
        name: "postgres".into(),
        url: url.clone(),
    };
    let app = TestApp::spawn_with(db, |_| {}).await;
    let body = app
        .query(
            "authenticated",
            "{ syncStats { totalResources } }",
            json!({}),
        )
        .await;
    assert_eq!(body, json!({"data": {"syncStats": {"totalResources": 7}}}));
    let mut conn = sqlx::PgConnection::connect(&cluster.url("postgres"))
        .await
        .unwrap();
    let (total, encrypted): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
         WHERE a.backend_type = 'client backend' AND a.pid <> pg_backend_pid()",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert!(total > 0);
    assert_eq!(
        encrypted, total,
        "the server opened unencrypted connections"
    );
    drop(app);
    drop(cluster);
}

/// Parsed documents are cached by query text, but each request is still
/// validated against its own variables, operation name and role.
#[tokio::test]
async fn a_repeated_query_text_is_checked_again_for_each_request() {
    let app = TestApp::spawn().await;
    let query = "query One($resource: String!) { syncState(resource: $resource) { resource } } \
                 query Many { failedSyncs { resource } }";
    let run = |variables: Value, operation: &str| json!({"query": query, "variables": variables, "operationName": operation});
    let bearer = format!("Bearer {}", app.token("authenticated"));
    for resource in ["funds", "accounts", "funds"] {
        let (status, body) = app
            .post(Some(&bearer), &run(json!({"resource": resource}), "One"))
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, json!({"data": {"syncState": {"resource": resource}}}));
    }
    let (_, body) = app.post(Some(&bearer), &run(json!({}), "Many")).await;
    assert_eq!(body, json!({"data": {"failedSyncs": []}}));
    let (_, body) = app.post(Some(&bearer), &run(json!({}), "One")).await;
    assert_eq!(
        body["errors"][0]["extensions"]["code"], "BAD_USER_INPUT",
        "{body}"
    );
    let (_, body) = app
        .post(None, &run(json!({"resource": "funds"}), "One"))
        .await;
    assert_eq!(
        body["errors"][0]["extensions"]["code"], "UNAUTHENTICATED",
        "{body}"
    );
    let broken = json!({"query": "{ syncStates { resource }"});
    for _ in 0..2 {
        let (_, body) = app.post(Some(&bearer), &broken).await;
        assert_eq!(
            body["errors"][0]["extensions"]["code"], "BAD_USER_INPUT",
            "{body}"
        );
    }
}

/// Read-only requests end their transaction without a COMMIT round trip:
/// on a single pooled connection, reads and writes still alternate
/// cleanly and nothing is left open.
#[tokio::test]
async fn reads_and_writes_share_one_connection_cleanly() {
    let app = TestApp::spawn_with(TestDb::migrated().await, |config| {
        config.max_connections = 1;
    })
    .await;
    let read = "{ syncState(resource: \"accounts\") { lastSyncStatus recordsSynced } }";
    for round in 0..5 {
        let before = app.query("service_role", read, json!({})).await;
        let expected = if round == 0 { "NEVER_RUN" } else { "SUCCESS" };
        assert_eq!(
            before["data"]["syncState"]["lastSyncStatus"], expected,
            "{before}"
        );
        let written = app
            .query(
                "service_role",
                "mutation($n: Int!) { startSync(resource: \"accounts\") { resource } \
                 completeSync(resource: \"accounts\", recordsSynced: $n, recordsCreated: 0, \
                 recordsUpdated: 0) { recordsSynced } }",
                json!({"n": round}),
            )
            .await;
        assert_eq!(
            written["data"]["completeSync"]["recordsSynced"], round,
            "{written}"
        );
        let after = app.query("authenticated", read, json!({})).await;
        assert_eq!(
            after["data"]["syncState"]["recordsSynced"], round,
            "{after}"
        );
    }
    // The last read's ROLLBACK goes out with the pool's release ping, just
    // after the response: give it a moment, not forever.
    let mut conn = app.db.connect().await;
    let mut open = -1;
    for _ in 0..40 {
        open = sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid() \
             AND state LIKE 'idle in transaction%'",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        if open == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(open, 0, "a request left its transaction open");
}

/// The board and GraphiQL come from the binary with their content types
/// and a policy that keeps them on this origin.
#[tokio::test]
async fn pages_are_served_with_their_types_and_a_self_only_policy() {
    let app = TestApp::spawn().await;
    for (path, content_type, policy_part) in [
        ("/", "text/html; charset=utf-8", "connect-src 'self'"),
        (
            "/board.js",
            "text/javascript; charset=utf-8",
            "script-src 'self'",
        ),
        ("/board.css", "text/css; charset=utf-8", "style-src 'self'"),
        (
            "/graphiql",
            "text/html; charset=utf-8",
            "connect-src 'self'",
        ),
        (
            "/graphiql/graphiql.min.js",
            "text/javascript; charset=utf-8",
            "script-src 'self'",
        ),
        (
            "/graphiql/react.production.min.js",
            "text/javascript; charset=utf-8",
            "default-src 'none'",
        ),
    ] {
        let response = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), reqwest::StatusCode::OK, "{path}");
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|value| value.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        assert_eq!(header("content-type"), content_type, "{path}");
        assert!(
            header("content-security-policy").contains(policy_part),
            "{path}"
        );
        assert_eq!(header("x-content-type-options"), "nosniff", "{path}");
        assert!(!response.bytes().await.unwrap().is_empty(), "{path}");
    }
}
