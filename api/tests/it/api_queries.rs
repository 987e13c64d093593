//! GraphQL queries over real HTTP: payloads, ordering, derived fields,
//! the health rule, access per role.

use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::Executor;
use vantage_sync_testkit::TestApp;

/// funds failed, cashflows running, accounts succeeded; the rest never ran.
async fn mixed_states(app: &TestApp) {
    let mut conn = app.db.connect().await;
    conn.execute(
        r#"SELECT start_vantage_sync('accounts');
           SELECT complete_vantage_sync('accounts', 100, 10, 90);
           SELECT start_vantage_sync('funds');
           SELECT fail_vantage_sync('funds', '[{"code": "HTTP_503", "message": "down", "recordId": "f-1", "timestamp": "2025-11-05T13:28:40Z", "details": {"attempt": 3}}]');
           SELECT start_vantage_sync('cashflows');"#,
    )
    .await
    .unwrap();
}

fn resources(body: &Value, field: &str) -> Vec<String> {
    body["data"][field]
        .as_array()
        .unwrap_or_else(|| panic!("no {field} in {body}"))
        .iter()
        .map(|state| state["resource"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn sync_states_are_ordered_failed_running_never_run_success() {
    let app = TestApp::spawn().await;
    mixed_states(&app).await;
    let body = app
        .query(
            "authenticated",
            "{ syncStates { resource lastSyncStatus } }",
            json!({}),
        )
        .await;
    assert_eq!(
        body,
        json!({"data": {"syncStates": [
            {"resource": "funds", "lastSyncStatus": "FAILED"},
            {"resource": "cashflows", "lastSyncStatus": "RUNNING"},
            {"resource": "commitments", "lastSyncStatus": "NEVER_RUN"},
            {"resource": "investments", "lastSyncStatus": "NEVER_RUN"},
            {"resource": "investors", "lastSyncStatus": "NEVER_RUN"},
            {"resource": "valuations", "lastSyncStatus": "NEVER_RUN"},
            {"resource": "accounts", "lastSyncStatus": "SUCCESS"},
        ]}})
    );
}

#[tokio::test]
async fn sync_states_filter_by_status_and_health() {
    let app = TestApp::spawn().await;
    mixed_states(&app).await;
    let query = "query($status: [SyncStatus!], $health: [SyncHealth!]) { syncStates(status: $status, health: $health) { resource } }";
    let cases = [
        (
            json!({"status": ["FAILED", "SUCCESS"]}),
            vec!["funds", "accounts"],
        ),
        (json!({"health": ["RED"]}), vec!["funds"]),
        (json!({"health": ["GREEN"]}), vec!["accounts"]),
        (
            json!({"status": ["RUNNING"], "health": ["YELLOW"]}),
            vec!["cashflows"],
        ),
        (json!({"status": []}), vec![]),
    ];
    for (variables, expected) in cases {
        let body = app.query("authenticated", query, variables.clone()).await;
        assert_eq!(resources(&body, "syncStates"), expected, "{variables}");
    }
}

#[tokio::test]
async fn sync_state_returns_every_column_and_error_fields() {
    let app = TestApp::spawn().await;
    mixed_states(&app).await;
    let body = app
        .query(
            "service_role",
            "{ syncState(resource: \"funds\") { resource lastSyncTime lastSyncStatus recordsSynced recordsCreated recordsUpdated
               errors { code message recordId timestamp details } errorCount startedAt completedAt durationMs createdAt updatedAt health } }",
            json!({}),
        )
        .await;
    let state = &body["data"]["syncState"];
    assert_eq!(state["resource"], "funds");
    assert_eq!(state["lastSyncTime"], Value::Null);
    assert_eq!(state["lastSyncStatus"], "FAILED");
    assert_eq!(
        state["errors"],
        json!([{"code": "HTTP_503", "message": "down", "recordId": "f-1", "timestamp": "2025-11-05T13:28:40+00:00", "details": {"attempt": 3}}])
    );
    assert_eq!(state["errorCount"], 1);
    assert_eq!(state["health"], "RED");
    for field in ["startedAt", "completedAt", "createdAt", "updatedAt"] {
        let text = state[field]
            .as_str()
            .unwrap_or_else(|| panic!("{field} missing"));
        chrono::DateTime::parse_from_rfc3339(text)
            .unwrap_or_else(|_| panic!("{field} is not RFC 3339: {text}"));
    }
    assert!(state["durationMs"].is_i64());
}

#[tokio::test]
async fn unknown_resource_is_null_and_a_bad_name_is_bad_input() {
    let app = TestApp::spawn().await;
    let body = app
        .query(
            "authenticated",
            "{ syncState(resource: \"nothing_here\") { resource } }",
            json!({}),
        )
        .await;
    assert_eq!(body, json!({"data": {"syncState": null}}));
    let body = app
        .query(
            "authenticated",
            "{ syncState(resource: \"Bad Name\") { resource } }",
            json!({}),
        )
        .await;
    // async-graphql leaves an errored field out of `data` (null either way).
    assert_eq!(body["data"]["syncState"], Value::Null);
    assert_eq!(
        body["errors"][0]["extensions"],
        json!({"code": "BAD_USER_INPUT", "field": "resource"})
    );
}

/// A sync that started 2 s before it completed: durationMs 2000, and the
/// throughput is records / seconds.
#[tokio::test]
async fn derived_fields_of_known_rows() {
    let app = TestApp::spawn().await;
    let mut conn = app.db.connect().await;
    conn.execute(
        "UPDATE vantage_sync_state SET last_sync_status = 'success', records_synced = 100, records_created = 30, records_updated = 70,
             started_at = now() - interval '2 seconds', completed_at = now(), last_sync_time = now() - interval '90 minutes'
         WHERE resource = 'accounts';
         UPDATE vantage_sync_state SET last_sync_status = 'running', started_at = now() - interval '90 seconds'
         WHERE resource = 'funds';",
    )
    .await
    .unwrap();
    let query = "{ a: syncState(resource: \"accounts\") { durationMs durationSeconds recordsPerSecond runningSeconds hoursSinceSync errorCount }
                   f: syncState(resource: \"funds\") { durationMs durationSeconds recordsPerSecond runningSeconds hoursSinceSync } }";
    let body = app.query("authenticated", query, json!({})).await;
    let accounts = &body["data"]["a"];
    assert_eq!(accounts["durationMs"], 2000);
    assert_eq!(accounts["durationSeconds"], 2.0);
    assert_eq!(accounts["recordsPerSecond"], 50.0);
    assert_eq!(accounts["runningSeconds"], Value::Null);
    assert_eq!(accounts["errorCount"], 0);
    let hours = accounts["hoursSinceSync"].as_f64().unwrap();
    assert!((1.5..1.6).contains(&hours), "hoursSinceSync {hours}");
    let funds = &body["data"]["f"];
    let running = funds["runningSeconds"].as_i64().unwrap();
    assert!((90..=95).contains(&running), "runningSeconds {running}");
    assert_eq!(
        (
            &funds["durationMs"],
            &funds["durationSeconds"],
            &funds["recordsPerSecond"],
            &funds["hoursSinceSync"]
        ),
        (&Value::Null, &Value::Null, &Value::Null, &Value::Null)
    );
}

/// RED for failed or running over 30 min; YELLOW for never run or no
/// success in 24 h; GREEN otherwise.
#[tokio::test]
async fn health_follows_the_dashboard_rule() {
    let app = TestApp::spawn().await;
    let mut conn = app.db.connect().await;
    conn.execute(
        "INSERT INTO vantage_sync_state (resource, last_sync_status, started_at, completed_at, last_sync_time) VALUES
            ('failed_recently', 'failed', now() - interval '2 minutes', now() - interval '1 minute', now() - interval '1 hour'),
            ('stuck_running', 'running', now() - interval '31 minutes', NULL, now() - interval '1 hour'),
            ('running_fresh', 'running', now() - interval '5 minutes', NULL, now() - interval '1 hour'),
            ('running_first_time', 'running', now() - interval '5 minutes', NULL, NULL),
            ('never', 'never_run', NULL, NULL, NULL),
            ('stale_success', 'success', now() - interval '26 hours', now() - interval '25 hours', now() - interval '25 hours'),
            ('fresh_success', 'success', now() - interval '2 hours', now() - interval '1 hour', now() - interval '1 hour')",
    )
    .await
    .unwrap();
    let body = app
        .query(
            "authenticated",
            "{ syncStates { resource health } }",
            json!({}),
        )
        .await;
    let health: std::collections::BTreeMap<String, String> = body["data"]["syncStates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|state| {
            (
                state["resource"].as_str().unwrap().to_owned(),
                state["health"].as_str().unwrap().to_owned(),
            )
        })
        .filter(|(resource, _)| {
            ![
                "accounts",
                "funds",
                "cashflows",
                "commitments",
                "investors",
                "investments",
                "valuations",
            ]
            .contains(&resource.as_str())
        })
        .collect();
    let expected: std::collections::BTreeMap<String, String> = [
        ("failed_recently", "RED"),
        ("stuck_running", "RED"),
        ("running_fresh", "GREEN"),
        ("running_first_time", "YELLOW"),
        ("never", "YELLOW"),
        ("stale_success", "YELLOW"),
        ("fresh_success", "GREEN"),
    ]
    .into_iter()
    .map(|(resource, health)| (resource.to_owned(), health.to_owned()))
    .collect();
    assert_eq!(health, expected);
}

#[tokio::test]
async fn alert_queries_return_their_rows_in_order() {
    let app = TestApp::spawn().await;
    let mut conn = app.db.connect().await;
    conn.execute(
        "UPDATE vantage_sync_state SET last_sync_status = 'failed', started_at = now() - interval '3 hours', completed_at = now() - interval '2 hours' WHERE resource = 'funds';
         UPDATE vantage_sync_state SET last_sync_status = 'failed', started_at = now() - interval '3 hours', completed_at = now() - interval '1 hour' WHERE resource = 'investors';
         UPDATE vantage_sync_state SET last_sync_status = 'success', started_at = now() - interval '50 hours', completed_at = now() - interval '48 hours', last_sync_time = now() - interval '48 hours' WHERE resource = 'accounts';
         UPDATE vantage_sync_state SET last_sync_status = 'success', started_at = now() - interval '30 hours', completed_at = now() - interval '30 hours' + interval '10 seconds', last_sync_time = now() - interval '30 hours' + interval '10 seconds' WHERE resource = 'valuations';
         UPDATE vantage_sync_state SET last_sync_status = 'success', started_at = now() - interval '2 hours', completed_at = now() - interval '1 hour', last_sync_time = now() - interval '1 hour' WHERE resource = 'commitments';
         UPDATE vantage_sync_state SET last_sync_status = 'running', started_at = now() - interval '45 minutes' WHERE resource = 'cashflows';
         UPDATE vantage_sync_state SET last_sync_status = 'running', started_at = now() - interval '10 minutes' WHERE resource = 'investments';",
    )
    .await
    .unwrap();
    let body = app
        .query(
            "authenticated",
            "{ failedSyncs { resource } staleSyncs { resource } stale40: staleSyncs(olderThanHours: 40) { resource }
               slowestSyncs { resource durationMs } top2: slowestSyncs(limit: 2) { resource }
               stuckSyncs { resource } stuck5: stuckSyncs(runningLongerThanMinutes: 5) { resource } }",
            json!({}),
        )
        .await;
    assert_eq!(resources(&body, "failedSyncs"), ["investors", "funds"]);
    // Never succeeded first (by resource), then oldest watermark first.
    assert_eq!(
        resources(&body, "staleSyncs"),
        [
            "cashflows",
            "funds",
            "investments",
            "investors",
            "accounts",
            "valuations"
        ]
    );
    assert_eq!(
        resources(&body, "stale40"),
        ["cashflows", "funds", "investments", "investors", "accounts"]
    );
    assert_eq!(
        body["data"]["slowestSyncs"],
        json!([
            {"resource": "accounts", "durationMs": 7_200_000},
            {"resource": "investors", "durationMs": 7_200_000},
            {"resource": "commitments", "durationMs": 3_600_000},
            {"resource": "funds", "durationMs": 3_600_000},
            {"resource": "valuations", "durationMs": 10_000},
        ])
    );
    assert_eq!(resources(&body, "top2"), ["accounts", "investors"]);
    let all = app
        .query(
            "authenticated",
            "{ slowestSyncs(limit: 3) { resource } }",
            json!({}),
        )
        .await;
    assert_eq!(
        resources(&all, "slowestSyncs"),
        ["accounts", "investors", "commitments"]
    );
    assert_eq!(resources(&body, "stuckSyncs"), ["cashflows"]);
    assert_eq!(resources(&body, "stuck5"), ["cashflows", "investments"]);
}

#[tokio::test]
async fn sync_stats_totals() {
    let app = TestApp::spawn().await;
    let mut conn = app.db.connect().await;
    conn.execute(
        "UPDATE vantage_sync_state SET last_sync_status = 'success', records_synced = 2000000000, started_at = now() - interval '4 seconds', completed_at = now() WHERE resource = 'accounts';
         UPDATE vantage_sync_state SET last_sync_status = 'success', records_synced = 2000000000, started_at = now() - interval '2 seconds', completed_at = now() WHERE resource = 'funds';
         UPDATE vantage_sync_state SET last_sync_status = 'failed', started_at = now() - interval '6 seconds', completed_at = now() WHERE resource = 'investors';
         UPDATE vantage_sync_state SET last_sync_status = 'running', started_at = now() WHERE resource = 'cashflows';",
    )
    .await
    .unwrap();
    let body = app
        .query(
            "authenticated",
            "{ syncStats { totalResources successful failed running neverRun totalRecordsSynced avgDurationMs maxDurationMs } }",
            json!({}),
        )
        .await;
    assert_eq!(
        body,
        json!({"data": {"syncStats": {
            "totalResources": 7, "successful": 2, "failed": 1, "running": 1, "neverRun": 3,
            "totalRecordsSynced": 4_000_000_000_i64, "avgDurationMs": 4000.0, "maxDurationMs": 6000
        }}})
    );
}

#[tokio::test]
async fn query_arguments_out_of_range_are_bad_input() {
    let app = TestApp::spawn().await;
    for (query, field) in [
        ("{ slowestSyncs(limit: 0) { resource } }", "limit"),
        ("{ slowestSyncs(limit: 100000) { resource } }", "limit"),
        (
            "{ staleSyncs(olderThanHours: -1) { resource } }",
            "olderThanHours",
        ),
        (
            "{ stuckSyncs(runningLongerThanMinutes: -5) { resource } }",
            "runningLongerThanMinutes",
        ),
    ] {
        let body = app.query("authenticated", query, json!({})).await;
        assert_eq!(
            body["errors"][0]["extensions"],
            json!({"code": "BAD_USER_INPUT", "field": field}),
            "{query}"
        );
    }
}

#[tokio::test]
async fn anon_may_introspect_but_not_query() {
    let app = TestApp::spawn().await;
    for query in [
        "{ syncState(resource: \"accounts\") { resource } }",
        "{ syncStates { resource } }",
        "{ failedSyncs { resource } }",
        "{ staleSyncs { resource } }",
        "{ slowestSyncs { resource } }",
        "{ stuckSyncs { resource } }",
        "{ syncStats { totalResources } }",
        // Guards come before argument checks: no hint about validity.
        "{ syncState(resource: \"Bad Name\") { resource } }",
    ] {
        let (status, body) = app.graphql(None, query, json!({})).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body["errors"][0]["extensions"]["code"], "UNAUTHENTICATED",
            "{query}: {body}"
        );
        assert_eq!(body["errors"].as_array().unwrap().len(), 1);
    }
    let (status, body) = app
        .graphql(
            None,
            "{ __schema { queryType { name } mutationType { name } } }",
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"data": {"__schema": {"queryType": {"name": "Query"}, "mutationType": {"name": "Mutation"}}}})
    );
}

/// The query GraphiQL and codegen tools send fits the depth and
/// complexity limits, for every role.
#[tokio::test]
async fn full_introspection_query_passes_the_limits() {
    let app = TestApp::spawn().await;
    let (status, body) = app.graphql(None, INTROSPECTION, json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.get("errors").is_none(), "{body}");
    let types = body["data"]["__schema"]["types"].as_array().unwrap();
    assert!(types.iter().any(|t| t["name"] == "SyncState"));
}

#[tokio::test]
async fn queries_work_over_get() {
    let app = TestApp::spawn().await;
    let response = app
        .client
        .get(app.url("/graphql"))
        .query(&[
            (
                "query",
                "query Q($r: String!) { syncState(resource: $r) { resource } }",
            ),
            ("variables", "{\"r\": \"funds\"}"),
        ])
        .bearer_auth(app.token("authenticated"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body, json!({"data": {"syncState": {"resource": "funds"}}}));
}

const INTROSPECTION: &str = r#"
query IntrospectionQuery {
  __schema {
    queryType { name } mutationType { name } subscriptionType { name }
    types { ...FullType }
    directives { name description locations args { ...InputValue } }
  }
}
fragment FullType on __Type {
  kind name description
  fields(includeDeprecated: true) { name description args { ...InputValue } type { ...TypeRef } isDeprecated deprecationReason }
  inputFields { ...InputValue }
  interfaces { ...TypeRef }
  enumValues(includeDeprecated: true) { name description isDeprecated deprecationReason }
  possibleTypes { ...TypeRef }
}
fragment InputValue on __InputValue { name description type { ...TypeRef } defaultValue }
fragment TypeRef on __Type {
  kind name
  ofType { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name } } } } } } }
}
"#;

/// Every SyncState field, with aliases, a repeated key whose selections
/// merge, fragments (named, inline, untyped), `__typename` and directives.
const EVERY_FIELD: &str = r#"
    __typename resource name: resource lastSyncTime lastSyncStatus
    recordsSynced @skip(if: $skip) recordsCreated recordsUpdated
    errors { __typename code message recordId timestamp details }
    errors { code recordId }
    startedAt completedAt durationMs @include(if: $skip) createdAt updatedAt
    errorCount runningSeconds hoursSinceSync durationSeconds recordsPerSecond health
    ...Extra
    ... on SyncState { traffic: health errors { again: message } }
    ... { updatedAt @include(if: $skip) }
    ... @skip(if: $skip) { skipped: resource }
"#;

#[tokio::test]
async fn plain_fields_resolve_as_the_resolvers_do() {
    // SyncState resolves its plain fields in one pass; selecting
    // consecutiveFailures (which reads the event log) sends the object
    // through async-graphql's resolvers instead. One request, one clock:
    // both must give the same values for every other field.
    let app = TestApp::spawn().await;
    mixed_states(&app).await;
    let query = format!(
        "query($skip: Boolean!) {{
           plain: syncStates {{ {EVERY_FIELD} }}
           resolved: syncStates {{ {EVERY_FIELD} consecutiveFailures }}
           empty: syncStates {{ errors {{ code @skip(if: true) }} }}
           emptyResolved: syncStates {{ errors {{ code @skip(if: true) }} consecutiveFailures }}
         }}
         fragment Extra on SyncState {{ count: errorCount errors {{ message }} }}"
    );
    let body = app
        .query("authenticated", &query, json!({"skip": true}))
        .await;
    assert!(body.get("errors").is_none(), "{body}");
    let without_failures = |key: &str| -> Vec<Value> {
        body["data"][key]
            .as_array()
            .unwrap_or_else(|| panic!("no {key} in {body}"))
            .iter()
            .map(|state| {
                let mut state = state.clone();
                state.as_object_mut().unwrap().remove("consecutiveFailures");
                state
            })
            .collect()
    };
    let plain = without_failures("plain");
    assert_eq!(plain, without_failures("resolved"));
    assert_eq!(without_failures("empty"), without_failures("emptyResolved"));
    // The comparison is not vacuous: the failed row carries its error,
    // merged from every selection of `errors`, and skipped fields are gone.
    let funds = &plain[0];
    assert_eq!(funds["resource"], "funds");
    assert_eq!(
        funds["errors"],
        json!([{
            "__typename": "SyncError", "code": "HTTP_503", "message": "down", "again": "down",
            "recordId": "f-1", "timestamp": "2025-11-05T13:28:40+00:00", "details": {"attempt": 3},
        }])
    );
    assert_eq!(funds["traffic"], "RED");
    assert_eq!(funds["count"], 1);
    assert_eq!(funds["__typename"], "SyncState");
    assert!(funds.get("durationMs").is_some(), "@include(if: true) kept");
    for skipped in ["recordsSynced", "skipped"] {
        assert!(funds.get(skipped).is_none(), "{skipped} in {funds}");
    }
    assert_eq!(without_failures("empty")[0], json!({"errors": [null]}));
}

#[tokio::test]
async fn plain_fields_come_in_selection_order() {
    let app = TestApp::spawn().await;
    mixed_states(&app).await;
    let response = app
        .client
        .post(app.url("/graphql"))
        .bearer_auth(app.token("authenticated"))
        .json(&json!({"query": r#"{ syncState(resource: "funds") { health resource __typename errorCount } }"#}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.text().await.unwrap(),
        r#"{"data":{"syncState":{"health":"RED","resource":"funds","__typename":"SyncState","errorCount":1}}}"#
    );
}

/// An enum value written as the database stores it (lower case) is refused
/// with the values GraphQL takes, in a variable or in the query text.
#[tokio::test]
async fn an_unknown_enum_value_is_told_the_valid_ones() {
    let app = TestApp::spawn().await;
    for (query, variables) in [
        ("{ syncStates(status: failed) { resource } }", json!({})),
        (
            "query ($s: [SyncStatus!]) { syncStates(status: $s) { resource } }",
            json!({"s": ["failed"]}),
        ),
        ("{ syncStates(health: red) { resource } }", json!({})),
    ] {
        let (status, body) = app.graphql(Some("authenticated"), query, variables).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let error = &body["errors"][0];
        assert_eq!(error["extensions"]["code"], "BAD_USER_INPUT", "{body}");
        let message = error["message"].as_str().unwrap();
        let expected = if query.contains("health") {
            "expected one of RED, YELLOW, GREEN"
        } else {
            "expected one of NEVER_RUN, RUNNING, SUCCESS, FAILED"
        };
        assert!(message.contains(expected), "{message}");
    }
}
