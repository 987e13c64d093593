//! What is refused: unsafe targets and bad inputs at creation, callers
//! without the right, and targets that became private, at every delivery.

use serde_json::{Value, json};
use vantage_sync_testkit::{Receiver, TestApp};

use super::{CREATE, DELIVERIES, deliveries_when, start};

#[tokio::test]
async fn unsafe_or_unauthorised_webhooks_are_refused_and_nothing_is_stored() {
    // The defaults: public addresses only.
    let app = TestApp::spawn().await;
    let refused = |body: &Value| {
        (
            body["errors"][0]["extensions"]["code"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            body["errors"][0]["message"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        )
    };
    for (url, says) in [
        ("http://127.0.0.1:9/hook", "WEBHOOK_ALLOW_PRIVATE"),
        ("http://localhost:9/hook", "WEBHOOK_ALLOW_PRIVATE"),
        (
            "http://169.254.169.254/latest/meta-data/",
            "WEBHOOK_ALLOW_PRIVATE",
        ),
        ("ftp://example.com/hook", "ftp://"),
        ("http://user:pw@example.com/hook", "no user or password"),
        ("not a url", "is not a URL"),
    ] {
        let body = app
            .query(
                "service_role",
                CREATE,
                json!({"url": url, "events": ["SYNC_FAILED"]}),
            )
            .await;
        let (code, message) = refused(&body);
        assert_eq!(code, "BAD_USER_INPUT", "{url}: {body}");
        assert!(message.contains(says), "{url}: {message}");
    }
    // A public address literal (no DNS here), with bad events or resources.
    for (variables, says) in [
        (json!({"events": []}), "at least one event type"),
        (
            json!({"events": ["SYNC_FAILED"], "resources": []}),
            "name 1 to 1000 resources",
        ),
        (
            json!({"events": ["SYNC_FAILED"], "resources": ["Not Snake"]}),
            "resource",
        ),
    ] {
        let mut variables = variables;
        variables["url"] = json!("https://93.184.215.14/hook");
        let body = app.query("service_role", CREATE, variables).await;
        let (code, message) = refused(&body);
        assert_eq!(code, "BAD_USER_INPUT", "{body}");
        assert!(message.contains(says), "{message}");
    }
    let body = app
        .query("service_role", DELIVERIES, json!({"id": "not-a-webhook"}))
        .await;
    assert_eq!(refused(&body).0, "NOT_FOUND", "{body}");
    let (_, user) = app
        .graphql(
            Some("authenticated"),
            CREATE,
            json!({"url": "https://example.com/hook", "events": ["SYNC_FAILED"]}),
        )
        .await;
    assert_eq!(refused(&user).0, "FORBIDDEN", "{user}");
    let (_, list) = app
        .graphql(Some("authenticated"), "{ webhooks { id } }", json!({}))
        .await;
    assert_eq!(refused(&list).0, "FORBIDDEN", "{list}");

    let mut conn = app.db.connect().await;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM vantage_sync_webhooks")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(stored, 0);
    // The secret table is out of reach of every API role.
    for role in ["anon", "authenticated", "service_role"] {
        let (schema, table): (bool, bool) = sqlx::query_as(
            "SELECT has_schema_privilege($1, 'vantage_sync_private', 'USAGE'),
                    has_table_privilege($1, 'vantage_sync_private.webhook_secrets', 'SELECT')",
        )
        .bind(role)
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert_eq!((schema, table), (false, false), "{role}");
        let mut txn = sqlx::Connection::begin(&mut conn).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("SET LOCAL ROLE {role}")))
            .execute(&mut *txn)
            .await
            .unwrap();
        let denied = sqlx::query("SELECT secret FROM vantage_sync_private.webhook_secrets")
            .fetch_all(&mut *txn)
            .await;
        assert!(denied.is_err(), "{role} reads the secrets");
        txn.rollback().await.unwrap();
    }
}

/// A target that became private after creation (here: written straight
/// into the table, as a DNS change would make it) is refused at delivery,
/// by name and by address, and the receiver hears nothing.
#[tokio::test]
async fn private_targets_are_refused_again_at_every_delivery() {
    let app = TestApp::spawn().await;
    let receiver = Receiver::start().await;
    let port = receiver.url("").rsplit(':').next().unwrap().to_owned();
    let mut ids = Vec::new();
    for url in [
        format!("http://localhost:{port}/by-name"),
        format!("http://127.0.0.1:{port}/by-address"),
    ] {
        let mut conn = app.db.connect().await;
        let id: sqlx::types::Uuid = sqlx::query_scalar(
            "SELECT id FROM create_vantage_webhook($1, ARRAY['sync.started'], NULL, 'json', 'whsec_QmVuY2hCZW5jaEJlbmNoQmVuY2hCZW5jaEJlbmNoISE=')",
        )
        .bind(&url)
        .fetch_one(&mut conn)
        .await
        .unwrap();
        ids.push(id.to_string());
    }
    start(&app, "accounts").await;
    for id in &ids {
        let log = deliveries_when(&app, id, |log| !log.is_empty()).await;
        assert_eq!(log[0]["status"], "FAILED", "{log:?}");
        assert!(log[0]["httpStatus"].is_null());
        let error = log[0]["error"].as_str().unwrap();
        assert!(error.contains("WEBHOOK_ALLOW_PRIVATE"), "{error}");
    }
    assert!(receiver.received("/by-name").is_empty());
    assert!(receiver.received("/by-address").is_empty());
}
