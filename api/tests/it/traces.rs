//! Traces: servers in processes of their own (the trace
//! exporter is process-wide), configured by `OTEL_*` variables, exporting
//! to a real OTLP/HTTP receiver that decodes the protobuf itself. A request
//! with a `traceparent` joins the caller's trace; no token, variable value
//! or SQL parameter reaches a span; a collector that is down costs no
//! request, and its lost spans are counted; `Server-Timing` is there only
//! when enabled. A webhook delivery is a client span whose request carries
//! its `traceparent`; a subscription is one span for its life.

use std::time::Duration;

use serde_json::{Value, json};
use vantage_sync_testkit::otlp::{SPAN_KIND_CLIENT, SPAN_KIND_INTERNAL, SPAN_KIND_SERVER};
use vantage_sync_testkit::{
    OtlpReceiver, ReceivedSpan, Receiver, ServerOptions, ServerProcess, TestDb, WsClient,
};

/// libtest's name of [`server_process`].
const SERVER_PROCESS: &str = "traces::server_process";

/// How long exported spans may take to arrive, the batch delay set low.
const EXPORTED_WITHIN: Duration = Duration::from_secs(5);

/// Not a test: the body of the processes [`ServerProcess`] starts.
#[test]
#[ignore = "the server process of the trace tests, which run it themselves"]
fn server_process() {
    vantage_sync_testkit::serve_if_asked();
}

/// `OTEL_*` variables that export to `endpoint`, in batches sent every
/// 100 ms.
fn otel_env(endpoint: &str) -> Vec<(String, String)> {
    [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("OTEL_TRACES_SAMPLER", "parentbased_always_on"),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_owned(), value.to_owned()))
    .collect()
}

async fn traced_server(db: &TestDb, env: Vec<(String, String)>) -> ServerProcess {
    ServerProcess::start_with(
        SERVER_PROCESS,
        db,
        ServerOptions {
            env,
            ..ServerOptions::default()
        },
    )
    .await
}

/// POSTs a GraphQL request with `token` and extra `headers`.
async fn post(
    server: &ServerProcess,
    token: &str,
    headers: &[(&str, &str)],
    body: Value,
) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .post(server.url("/graphql"))
        .bearer_auth(token)
        .json(&body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

fn in_trace<'a>(spans: &'a [ReceivedSpan], trace_id: &str) -> Vec<&'a ReceivedSpan> {
    spans
        .iter()
        .filter(|span| span.trace_id == trace_id)
        .collect()
}

#[tokio::test]
async fn a_traceparent_makes_the_request_a_part_of_the_callers_trace() {
    let db = TestDb::migrated().await;
    let receiver = OtlpReceiver::start().await;
    let server = traced_server(&db, otel_env(&receiver.endpoint())).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_id = "00f067aa0ba902b7";
    let response = post(
        &server,
        &server.token("authenticated"),
        &[
            ("traceparent", &format!("00-{trace_id}-{parent_id}-01")),
            ("tracestate", "vendor=opaque"),
        ],
        json!({"query": "query Dashboard { syncStates { resource lastSyncStatus } }"}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert!(body.get("errors").is_none(), "{body}");

    let spans = receiver
        .wait_for(EXPORTED_WITHIN, |spans| {
            let spans = in_trace(spans, trace_id);
            spans.iter().any(|span| span.kind == SPAN_KIND_SERVER)
                && spans.iter().any(|span| span.name == "query Dashboard")
                && spans
                    .iter()
                    .any(|span| span.attribute("db.system.name") == Some("postgresql"))
        })
        .await;
    let spans = in_trace(&spans, trace_id);
    let server_span = spans
        .iter()
        .find(|span| span.kind == SPAN_KIND_SERVER)
        .unwrap();
    assert_eq!(server_span.name, "POST /graphql");
    assert_eq!(server_span.parent_span_id, parent_id, "{server_span:#?}");
    assert_eq!(server_span.attribute("http.request.method"), Some("POST"));
    assert_eq!(server_span.attribute("url.path"), Some("/graphql"));
    assert_eq!(
        server_span.attribute("http.response.status_code"),
        Some("200")
    );
    assert_eq!(server_span.service.as_deref(), Some("vantage-sync"));

    let operation = spans
        .iter()
        .find(|span| span.name == "query Dashboard")
        .unwrap();
    assert_eq!(operation.parent_span_id, server_span.span_id);
    assert_eq!(
        operation.attribute("graphql.operation.name"),
        Some("Dashboard")
    );
    assert_eq!(operation.attribute("graphql.operation.type"), Some("query"));

    // The transaction, its BEGIN and its SELECT, under the operation.
    let transaction = spans
        .iter()
        .find(|span| span.name == "transaction")
        .unwrap();
    assert_eq!(transaction.parent_span_id, operation.span_id);
    assert_eq!(transaction.kind, SPAN_KIND_CLIENT);
    let statements: Vec<&str> = spans
        .iter()
        .filter(|span| span.parent_span_id == transaction.span_id)
        .map(|span| span.name.as_str())
        .collect();
    assert!(statements.contains(&"BEGIN"), "{statements:?}");
    assert!(
        statements
            .iter()
            .any(|name| name.starts_with("SELECT vantage_sync_state")),
        "{statements:?}"
    );
    let select = spans
        .iter()
        .find(|span| span.name.starts_with("SELECT"))
        .unwrap();
    assert_eq!(select.attribute("db.system.name"), Some("postgresql"));
    assert_eq!(select.attribute("db.operation.name"), Some("SELECT"));
    assert_eq!(
        select.attribute("db.collection.name"),
        Some("vantage_sync_state")
    );
    let begin = spans.iter().find(|span| span.name == "BEGIN").unwrap();
    assert_eq!(begin.attribute("db.collection.name"), None);
}

#[tokio::test]
async fn no_token_variable_value_or_sql_parameter_reaches_a_span() {
    let db = TestDb::migrated().await;
    let receiver = OtlpReceiver::start().await;
    let server = traced_server(&db, otel_env(&receiver.endpoint())).await;
    let reader = server.token("authenticated");
    let writer = server.token("service_role");
    let variable_marker = "variable_marker_5f1c9a";
    let literal_marker = "literal_marker_8e2d47";

    let read = post(
        &server,
        &reader,
        &[],
        json!({
            "query": "query Find($resource: String!) { syncState(resource: $resource) { resource } }",
            "variables": {"resource": variable_marker},
        }),
    )
    .await;
    assert_eq!(read.status(), 200);
    let written = post(
        &server,
        &writer,
        &[],
        json!({"query": format!("mutation Start {{ startSync(resource: \"{literal_marker}\") {{ resource }} }}")}),
    )
    .await;
    assert_eq!(written.status(), 200);
    let body: Value = written.json().await.unwrap();
    assert_eq!(
        body["data"]["startSync"]["resource"], literal_marker,
        "{body}"
    );

    let spans = receiver
        .wait_for(EXPORTED_WITHIN, |spans| {
            let names: Vec<&str> = spans.iter().map(|span| span.name.as_str()).collect();
            names.contains(&"query Find")
                && names.contains(&"mutation Start")
                && names.iter().filter(|name| **name == "COMMIT").count() >= 1
        })
        .await;
    let secrets = [
        variable_marker,
        literal_marker,
        reader.as_str(),
        writer.as_str(),
        "Bearer",
        "jwt",
        "claims",
        "SET LOCAL",
    ];
    for span in &spans {
        for text in span.texts() {
            for secret in secrets {
                assert!(
                    !text.to_lowercase().contains(&secret.to_lowercase()),
                    "{secret:?} is in span {:?}: {span:#?}",
                    span.name
                );
            }
        }
    }
    // What the mutation's database work is called instead.
    assert!(
        spans
            .iter()
            .any(|span| span.attribute("db.operation.name").is_some()
                && span.name != "BEGIN"
                && span.name != "COMMIT"),
        "no statement span"
    );
}

#[tokio::test]
async fn a_collector_that_is_down_costs_no_request_and_its_spans_are_counted() {
    let db = TestDb::migrated().await;
    // A port nothing listens on: bound, then let go.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let mut env = otel_env(&format!("http://{closed}"));
    env.extend([
        ("OTEL_BSP_MAX_QUEUE_SIZE".to_owned(), "64".to_owned()),
        ("OTEL_EXPORTER_OTLP_TIMEOUT".to_owned(), "500".to_owned()),
    ]);
    let server = traced_server(&db, env).await;
    let token = server.token("authenticated");
    for request in 0..200 {
        let response = post(
            &server,
            &token,
            &[],
            json!({"query": "query Dashboard { syncStates { resource } }"}),
        )
        .await;
        assert_eq!(response.status(), 200, "request {request}");
    }
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + EXPORTED_WITHIN;
    let dropped = loop {
        let metrics = client
            .get(server.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let dropped: f64 = metrics
            .lines()
            .filter(|line| line.starts_with("vantage_sync_trace_spans_dropped_total{"))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if dropped > 0.0 || tokio::time::Instant::now() > deadline {
            break dropped;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(dropped > 0.0, "no dropped spans counted");
    // One line for the export errors, not one per failed batch.
    let logs = server.log_tail();
    let warnings = logs.matches("cannot export traces").count();
    assert_eq!(warnings, 1, "{logs}");
}

#[tokio::test]
async fn server_timing_is_there_only_when_enabled() {
    let db = TestDb::migrated().await;
    let query = json!({"query": "{ syncStates { resource } }"});
    for enabled in [true, false] {
        let server = ServerProcess::start_with(
            SERVER_PROCESS,
            &db,
            ServerOptions {
                server_timing: enabled,
                ..ServerOptions::default()
            },
        )
        .await;
        let response = post(&server, &server.token("authenticated"), &[], query.clone()).await;
        assert_eq!(response.status(), 200);
        let timing = response
            .headers()
            .get("server-timing")
            .map(|value| value.to_str().unwrap().to_owned());
        if !enabled {
            assert_eq!(timing, None);
            continue;
        }
        let timing = timing.expect("no Server-Timing");
        let durations: Vec<(&str, f64)> = timing
            .split(',')
            .map(|metric| {
                let (name, duration) = metric.trim().split_once(";dur=").unwrap();
                (name, duration.parse().unwrap())
            })
            .collect();
        let [("db", db_ms), ("total", total_ms)] = durations[..] else {
            panic!("Server-Timing: {timing}");
        };
        assert!(db_ms > 0.0 && db_ms <= total_ms, "Server-Timing: {timing}");
    }
}

/// The trace and span ids of a `traceparent` (`00-<trace>-<span>-<flags>`).
fn trace_ids(traceparent: &str) -> (String, String) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    assert_eq!(parts[0], "00", "{traceparent}");
    assert_eq!(parts[3], "01", "sampled: {traceparent}");
    (parts[1].to_owned(), parts[2].to_owned())
}

#[tokio::test]
async fn a_webhook_delivery_is_a_client_span_whose_request_carries_its_traceparent() {
    let db = TestDb::migrated().await;
    let otlp = OtlpReceiver::start().await;
    let server = ServerProcess::start_with(
        SERVER_PROCESS,
        &db,
        ServerOptions {
            env: otel_env(&otlp.endpoint()),
            webhook_allow_private: true,
            ..ServerOptions::default()
        },
    )
    .await;
    let writer = server.token("service_role");
    // One endpoint answers, the other fails; both URLs hold what a span
    // must never show (a path and a query with a token in them).
    let answering = Receiver::start().await;
    let failing = Receiver::start().await;
    failing.answer(&[503]);
    let path = "/hooks/path_marker_3c81";
    let query = "?token=query_marker_9a4e";
    let mut webhooks = Vec::new();
    for receiver in [&answering, &failing] {
        let created = post(
            &server,
            &writer,
            &[],
            json!({
                "query": "mutation($url: String!) { createWebhook(url: $url, events: [SYNC_STARTED]) { webhook { id } secret } }",
                "variables": {"url": receiver.url(&format!("{path}{query}"))},
            }),
        )
        .await;
        let body: Value = created.json().await.unwrap();
        assert!(body.get("errors").is_none(), "{body}");
        let created = &body["data"]["createWebhook"];
        webhooks.push((
            created["webhook"]["id"].as_str().unwrap().to_owned(),
            created["secret"].as_str().unwrap().to_owned(),
        ));
    }
    // The writer's trace, which each delivery links to.
    let writer_trace = "0af7651916cd43dd8448eb211c80319c";
    let started = post(
        &server,
        &writer,
        &[(
            "traceparent",
            &format!("00-{writer_trace}-b7ad6b7169203331-01"),
        )],
        json!({"query": "mutation { startSync(resource: \"orders\") { resource } }"}),
    )
    .await;
    assert_eq!(started.status(), 200);
    let spans = otlp
        .wait_for(EXPORTED_WITHIN, |spans| {
            spans
                .iter()
                .any(|span| span.trace_id == writer_trace && span.name == "transaction")
        })
        .await;
    let written_by = spans
        .iter()
        .find(|span| span.trace_id == writer_trace && span.name == "transaction")
        .unwrap()
        .span_id
        .clone();
    let event: i64 = sqlx::query_scalar("SELECT max(id) FROM public.vantage_sync_events")
        .fetch_one(&mut db.connect().await)
        .await
        .unwrap();
    let cursor = format!("1:{event}");

    for ((webhook, secret), (receiver, status)) in webhooks
        .iter()
        .zip([(&answering, "200"), (&failing, "503")])
    {
        let received = receiver
            .wait_for(path, Duration::from_secs(10), |received| {
                !received.is_empty()
            })
            .await;
        let request = received.first().expect("no delivery");
        let traceparent = request.traceparent.as_deref().expect("no traceparent");
        let (trace_id, span_id) = trace_ids(traceparent);
        let spans = otlp
            .wait_for(EXPORTED_WITHIN, |spans| {
                spans.iter().any(|span| span.span_id == span_id)
            })
            .await;
        let span = spans.iter().find(|span| span.span_id == span_id).unwrap();
        assert_eq!(span.trace_id, trace_id);
        assert_eq!(span.kind, SPAN_KIND_CLIENT, "{span:#?}");
        assert_eq!(span.name, "POST");
        let port = receiver.url("").rsplit(':').next().unwrap().to_owned();
        for (key, value) in [
            ("http.request.method", "POST"),
            ("url.scheme", "http"),
            ("server.address", "127.0.0.1"),
            ("server.port", port.as_str()),
            ("http.response.status_code", status),
            ("vantage_sync.webhook.id", webhook.as_str()),
            ("vantage_sync.webhook.attempt", "1"),
            ("vantage_sync.event.id", request.id.as_str()),
            ("vantage_sync.notification.type", "sync.started"),
            ("vantage_sync.resource.name", "orders"),
            ("vantage_sync.change.cursor", cursor.as_str()),
        ] {
            assert_eq!(span.attribute(key), Some(value), "{key}: {span:#?}");
        }
        // Its own trace, linked to the transaction that wrote the change.
        assert_ne!(span.trace_id, writer_trace);
        assert_eq!(
            span.links,
            [(writer_trace.to_owned(), written_by.clone())],
            "{span:#?}"
        );
        let error_type = (status != "200").then_some(status);
        assert_eq!(span.attribute("error.type"), error_type, "{span:#?}");
        for text in span.texts() {
            for secret in [
                "path_marker",
                "query_marker",
                "/hooks",
                secret.as_str(),
                request.signature.as_str(),
            ] {
                assert!(!text.contains(secret), "{secret:?} is in {span:#?}");
            }
        }
    }
}

#[tokio::test]
async fn a_subscription_is_one_span_for_its_life_counting_its_deliveries() {
    let db = TestDb::migrated().await;
    let otlp = OtlpReceiver::start().await;
    let server = traced_server(&db, otel_env(&otlp.endpoint())).await;
    let writer = server.token("service_role");
    let mut socket = WsClient::ready_at(server.addr(), &server.token("authenticated"))
        .await
        .unwrap();
    socket
        .follow(
            "subscription Changes($resources: [String!]) { syncStateChanged(resources: $resources, initial: true) { resource operation } }",
            // Not there yet: an empty snapshot.
            json!({"resources": ["resource_0", "resource_1", "resource_2"]}),
        )
        .await;
    let changes = 3;
    for change in 0..changes {
        let mutation =
            format!("mutation {{ startSync(resource: \"resource_{change}\") {{ resource }} }}");
        let response = post(&server, &writer, &[], json!({"query": mutation})).await;
        assert_eq!(response.status(), 200);
        let (id, data) = socket.next_data().await;
        assert_eq!(id, "1");
        assert_eq!(
            data["syncStateChanged"]["resource"],
            format!("resource_{change}")
        );
    }
    socket.send(json!({"id": "1", "type": "complete"})).await;
    assert_eq!(socket.recv().await["type"], "complete");

    let spans = otlp
        .wait_for(EXPORTED_WITHIN, |spans| {
            spans.iter().any(|span| span.name == "subscription Changes")
        })
        .await;
    let subscriptions: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|span| span.attribute("graphql.operation.type") == Some("subscription"))
        .collect();
    assert_eq!(subscriptions.len(), 1, "{subscriptions:#?}");
    let subscription = subscriptions[0];
    assert_eq!(subscription.name, "subscription Changes");
    assert_eq!(subscription.kind, SPAN_KIND_INTERNAL);
    assert_eq!(
        subscription.attribute("graphql.operation.name"),
        Some("Changes")
    );
    assert_eq!(
        subscription.attribute("vantage_sync.subscription.transport"),
        Some("websocket")
    );
    assert_eq!(
        subscription.attribute("vantage_sync.subscription.deliveries"),
        Some(changes.to_string().as_str()),
        "{subscription:#?}"
    );
    // The child of the connection's upgrade request.
    let upgrade = spans
        .iter()
        .find(|span| span.span_id == subscription.parent_span_id)
        .expect("no parent span");
    assert_eq!(upgrade.kind, SPAN_KIND_SERVER);
    assert_eq!(upgrade.name, "GET /graphql");
    assert_eq!(upgrade.trace_id, subscription.trace_id);
    // Its start's reads (the empty snapshot) are its children; no span
    // per delivery.
    assert!(
        spans
            .iter()
            .any(|span| span.name == "transaction" && span.parent_span_id == subscription.span_id),
        "{spans:#?}"
    );
    assert!(
        spans
            .iter()
            .all(|span| span.parent_span_id != subscription.span_id
                || span.attribute("db.system.name").is_some()),
        "{spans:#?}"
    );
    socket.close().await;
}

/// In SQL, as the server's writes do: a transaction that sets
/// `vantage_sync.traceparent` has it kept with the events it logs (every
/// one of them, and only its own); a malformed one is ignored, never
/// failing the write; no caller role reads the kept traces.
#[tokio::test]
async fn a_writers_traceparent_is_kept_with_its_events_and_junk_is_ignored() {
    use sqlx::{Connection, Executor};
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let mut traced = conn.begin().await.unwrap();
    traced
        .execute(sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "SET LOCAL ROLE service_role; SET LOCAL vantage_sync.traceparent TO '{traceparent}'"
        ))))
        .await
        .unwrap();
    for resource in ["orders", "funds"] {
        sqlx::query("SELECT start_vantage_sync($1)")
            .bind(resource)
            .execute(&mut *traced)
            .await
            .unwrap();
    }
    traced.commit().await.unwrap();
    let junk = [
        "00-xyz",
        "'; DROP TABLE x; --",
        "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    ];
    for (index, junk) in junk.into_iter().enumerate() {
        let mut untraced = conn.begin().await.unwrap();
        sqlx::query("SELECT set_config('vantage_sync.traceparent', $1, true)")
            .bind(junk)
            .execute(&mut *untraced)
            .await
            .unwrap();
        sqlx::query("INSERT INTO vantage_sync_state (resource) VALUES ($1)")
            .bind(format!("junk_{index}"))
            .execute(&mut *untraced)
            .await
            .unwrap();
        untraced.commit().await.unwrap();
    }
    // The same connection, later: the setting ended with the transaction
    // that made it.
    sqlx::query("SELECT complete_vantage_sync('orders', 1, 1, 0)")
        .execute(&mut conn)
        .await
        .unwrap();

    let kept: Vec<(String, String)> = sqlx::query_as(
        "SELECT e.resource, t.traceparent FROM public.vantage_sync_events e \
         LEFT JOIN public.vantage_sync_event_traces t ON t.event_id = e.id \
         WHERE e.resource IN ('orders', 'funds') OR e.resource LIKE 'junk%' ORDER BY e.id",
    )
    .fetch_all(&mut conn)
    .await
    .map(|rows: Vec<(String, Option<String>)>| {
        rows.into_iter()
            .map(|(resource, kept)| (resource, kept.unwrap_or_default()))
            .collect()
    })
    .unwrap();
    let expected: Vec<(String, String)> = [
        ("orders", traceparent),
        ("funds", traceparent),
        ("junk_0", ""),
        ("junk_1", ""),
        ("junk_2", ""),
        ("orders", ""),
    ]
    .into_iter()
    .map(|(resource, kept)| (resource.to_owned(), kept.to_owned()))
    .collect();
    assert_eq!(kept, expected);

    for role in ["anon", "authenticated", "service_role"] {
        let mut reader = conn.begin().await.unwrap();
        reader
            .execute(sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "SET LOCAL ROLE {role}"
            ))))
            .await
            .unwrap();
        let refused = reader
            .execute("SELECT * FROM public.vantage_sync_event_traces")
            .await
            .unwrap_err();
        assert!(
            refused.to_string().contains("permission denied"),
            "{role}: {refused}"
        );
    }
}

/// The log line of an internal error names the trace and span of the
/// request it happened in, so an operator goes from the log to the trace.
#[tokio::test]
async fn an_error_logged_in_a_traced_request_names_its_trace() {
    use sqlx::Executor;
    let db = TestDb::migrated().await;
    // A change the database refuses with an error no code maps: an
    // internal error, logged with its detail.
    db.connect()
        .await
        .execute(
            "CREATE FUNCTION public.refuse_broken() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN RAISE EXCEPTION 'broken on purpose' USING ERRCODE = '22012'; END $$; \
             CREATE TRIGGER refuse_broken BEFORE INSERT OR UPDATE ON public.vantage_sync_state \
             FOR EACH ROW WHEN (NEW.resource = 'broken') EXECUTE FUNCTION public.refuse_broken();",
        )
        .await
        .unwrap();
    let otlp = OtlpReceiver::start().await;
    let server = traced_server(&db, otel_env(&otlp.endpoint())).await;
    let trace_id = "5e2b3c4d5f60718293a4b5c6d7e8f901";
    let response = post(
        &server,
        &server.token("service_role"),
        &[("traceparent", &format!("00-{trace_id}-1a2b3c4d5e6f7081-01"))],
        json!({"query": "mutation { startSync(resource: \"broken\") { resource } }"}),
    )
    .await;
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["errors"][0]["extensions"]["code"], "INTERNAL_SERVER_ERROR",
        "{body}"
    );
    let spans = otlp
        .wait_for(EXPORTED_WITHIN, |spans| {
            spans
                .iter()
                .any(|span| span.trace_id == trace_id && span.name == "mutation")
        })
        .await;
    let operation = spans
        .iter()
        .find(|span| span.trace_id == trace_id && span.name == "mutation")
        .unwrap();
    let log = server.log_tail();
    let line = log
        .lines()
        .find(|line| line.contains("internal error") && line.contains("broken on purpose"))
        .unwrap_or_else(|| panic!("no internal error logged:\n{log}"));
    assert!(line.contains(&format!("trace_id={trace_id}")), "{line}");
    // The span it was logged in: the operation's, or one of its children.
    let span_id = line
        .split("span_id=")
        .nth(1)
        .unwrap_or_else(|| panic!("no span_id: {line}"))
        .trim();
    let logged_in = spans
        .iter()
        .find(|span| span.span_id == span_id)
        .unwrap_or_else(|| panic!("span {span_id} was not exported: {line}"));
    assert_eq!(logged_in.trace_id, trace_id);
    let mut ancestor = Some(logged_in);
    while let Some(span) = ancestor
        && span.span_id != operation.span_id
    {
        ancestor = spans
            .iter()
            .find(|parent| parent.span_id == span.parent_span_id);
    }
    assert!(
        ancestor.is_some(),
        "not under the operation: {logged_in:#?}"
    );
}
