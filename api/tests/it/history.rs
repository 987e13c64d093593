//! Queries over the event log: consecutive failures, repeated failures,
//! paged history.

use serde_json::{Value, json};
use vantage_sync_testkit::TestApp;

#[tokio::test]
async fn consecutive_and_repeated_failures() {
    let app = TestApp::spawn().await;
    app.sql("SELECT start_vantage_sync('accounts'); SELECT complete_vantage_sync('accounts', 1, 1, 0);
         SELECT start_vantage_sync('accounts'); SELECT fail_vantage_sync('accounts', '[]');
         SELECT start_vantage_sync('accounts'); SELECT fail_vantage_sync('accounts', '[]');
         SELECT start_vantage_sync('accounts'); SELECT fail_vantage_sync('accounts', '[]');
         SELECT start_vantage_sync('funds'); SELECT fail_vantage_sync('funds', '[]');
         SELECT start_vantage_sync('funds'); SELECT fail_vantage_sync('funds', '[]');
         -- Editing a failed row is not another failure.
         UPDATE vantage_sync_state SET errors = '[{\"code\": \"X\", \"message\": \"y\"}]' WHERE resource = 'funds';",
    )
    .await;
    let query = "{ syncStates(status: [FAILED]) { resource consecutiveFailures }
                   repeatedFailures { resource consecutiveFailures }
                   two: repeatedFailures(minConsecutive: 2) { resource }
                   ok: syncState(resource: \"cashflows\") { consecutiveFailures } }";
    let body = app.query("authenticated", query, json!({})).await;
    assert_eq!(
        body,
        json!({"data": {
            "syncStates": [{"resource": "accounts", "consecutiveFailures": 3}, {"resource": "funds", "consecutiveFailures": 2}],
            "repeatedFailures": [{"resource": "accounts", "consecutiveFailures": 3}],
            "two": [{"resource": "accounts"}, {"resource": "funds"}],
            "ok": {"consecutiveFailures": 0},
        }})
    );
    // A success ends the streak.
    app.sql(
        "SELECT start_vantage_sync('accounts'); SELECT complete_vantage_sync('accounts', 1, 0, 1);",
    )
    .await;
    let body = app
        .query("authenticated", "{ repeatedFailures { resource } syncState(resource: \"accounts\") { consecutiveFailures } }", json!({}))
        .await;
    assert_eq!(
        body,
        json!({"data": {"repeatedFailures": [], "syncState": {"consecutiveFailures": 0}}})
    );
}

/// (operation, resource, status) of one history node.
type Node = (String, String, Option<String>);

fn page(body: &Value) -> (Vec<Node>, bool, Option<String>) {
    let connection = &body["data"]["syncHistory"];
    let edges = connection["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|edge| {
            let node = &edge["node"];
            (
                node["operation"].as_str().unwrap().to_owned(),
                node["resource"].as_str().unwrap().to_owned(),
                node["status"].as_str().map(str::to_owned),
            )
        })
        .collect();
    (
        edges,
        connection["pageInfo"]["hasNextPage"].as_bool().unwrap(),
        connection["pageInfo"]["endCursor"]
            .as_str()
            .map(str::to_owned),
    )
}

#[tokio::test]
async fn history_pages_forward_by_cursor() {
    let app = TestApp::spawn().await;
    app.sql(
        "SELECT start_vantage_sync('funds'); SELECT complete_vantage_sync('funds', 1, 1, 0);
         SELECT start_vantage_sync('accounts');
         SELECT start_vantage_sync('funds'); SELECT fail_vantage_sync('funds', '[]');
         DELETE FROM vantage_sync_state WHERE resource = 'valuations';",
    )
    .await;
    let query = "query($resource: String, $first: Int, $after: String) {
        syncHistory(resource: $resource, first: $first, after: $after) {
            edges { cursor node { id resource operation status previousStatus at state { resource lastSyncStatus } } }
            pageInfo { hasNextPage endCursor } } }";
    let body = app
        .query(
            "authenticated",
            query,
            json!({"resource": "funds", "first": 3}),
        )
        .await;
    let (edges, more, end) = page(&body);
    let expected = |items: &[(&str, &str, Option<&str>)]| -> Vec<Node> {
        items
            .iter()
            .map(|(op, resource, status)| {
                (
                    op.to_string(),
                    resource.to_string(),
                    status.map(str::to_owned),
                )
            })
            .collect()
    };
    assert_eq!(
        edges,
        expected(&[
            ("UPDATE", "funds", Some("RUNNING")),
            ("UPDATE", "funds", Some("SUCCESS")),
            ("UPDATE", "funds", Some("RUNNING"))
        ])
    );
    assert!(more);
    let first_node = &body["data"]["syncHistory"]["edges"][0]["node"];
    assert_eq!(first_node["previousStatus"], "NEVER_RUN");
    assert_eq!(
        first_node["state"],
        json!({"resource": "funds", "lastSyncStatus": "RUNNING"})
    );
    let body = app
        .query(
            "authenticated",
            query,
            json!({"resource": "funds", "first": 3, "after": end}),
        )
        .await;
    let (edges, more, _) = page(&body);
    assert_eq!(edges, expected(&[("UPDATE", "funds", Some("FAILED"))]));
    assert!(!more);
    // All resources, DELETE keeps the removed row.
    let body = app.query("authenticated", query, json!({})).await;
    let (edges, more, _) = page(&body);
    assert_eq!(edges.len(), 6);
    assert!(!more);
    assert_eq!(
        edges[5],
        ("DELETE".to_owned(), "valuations".to_owned(), None)
    );
    assert_eq!(
        body["data"]["syncHistory"]["edges"][5]["node"]["state"]["lastSyncStatus"],
        "NEVER_RUN"
    );
    // Pruned history cannot be resumed.
    app.sql("SELECT advance_vantage_sync_notifications(100000); SELECT prune_vantage_sync_events(interval '0 seconds')")
        .await;
    let body = app
        .query("authenticated", query, json!({"after": "1:1"}))
        .await;
    assert_eq!(
        body["errors"][0]["extensions"]["code"], "CURSOR_EXPIRED",
        "{body}"
    );
    let body = app.query("authenticated", query, json!({"first": 0})).await;
    assert_eq!(body["errors"][0]["extensions"]["code"], "BAD_USER_INPUT");
    let (status, body) = app.graphql(None, query, json!({})).await;
    assert_eq!(status, reqwest::StatusCode::OK);
    assert_eq!(body["errors"][0]["extensions"]["code"], "UNAUTHENTICATED");
}
