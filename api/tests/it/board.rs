//! The status board in a real browser (headless Chromium over WebDriver):
//! what it shows, how fast changes reach it, the alerts, reconnection
//! after a database restart, sign-in, no foreign requests, no console
//! errors, a narrow screen. Each test saves a screenshot in
//! `target/tmp/board/`.

use std::time::Duration;

use fantoccini::Locator;
use serde_json::{Value, json};
use vantage_sync_testkit::{Browser, Cluster, TestApp, TestDb};

const ROWS: &str = "return [...document.querySelectorAll('[data-resource]')]
    .map((row) => [row.dataset.resource, row.dataset.health]);";
const ALERTS: &str =
    "return [...document.querySelectorAll('[data-alert]')].map((alert) => alert.dataset.alert);";
const LIVE: &str = "document.documentElement.dataset.connection === 'live'";

/// Opens the board signed in by URL fragment, once it shows `count`
/// resources and is live; the token it signed in with.
async fn open(app: &TestApp, test: &str, width: u32, count: usize) -> (Browser, String) {
    let browser = Browser::start(test, width, 1000).await;
    let token = app.token("authenticated");
    browser
        .client
        .goto(&app.url(&format!("/#token={token}")))
        .await
        .unwrap();
    let shown = format!("document.querySelectorAll('[data-resource]').length === {count}");
    eventually(&browser, &shown, Duration::from_secs(10), "every resource").await;
    eventually(&browser, LIVE, Duration::from_secs(5), "live").await;
    (browser, token)
}

/// `condition` (a JavaScript expression) holds within `within`, or the
/// test fails with a screenshot.
async fn eventually(browser: &Browser, condition: &str, within: Duration, what: &str) {
    let script = format!("return {condition};");
    if browser.wait_for(&script, within).await.is_none() {
        let path = browser.screenshot().await;
        panic!(
            "{what}: not within {within:?} (screenshot: {})",
            path.display()
        );
    }
}

fn row_is(resource: &str, attribute: &str, value: &str) -> String {
    format!(
        "document.querySelector('[data-resource=\"{resource}\"]')?.dataset.{attribute} === '{value}'"
    )
}

fn alert_shown(kind: &str) -> String {
    format!("document.querySelector('[data-alert=\"{kind}\"]') !== null")
}

/// Whether `condition` holds now.
async fn holds(browser: &Browser, condition: &str) -> bool {
    browser.js(&format!("return {condition};"), vec![]).await == json!(true)
}

#[tokio::test]
async fn every_resource_shows_in_order_with_its_health_and_nothing_leaves_the_origin() {
    let app = TestApp::spawn().await;
    // One transaction each: now() is fixed, so a start moved back by N
    // seconds completes in exactly N seconds.
    let run = |resource: &str, seconds: u32, end: &str| {
        format!(
            "SELECT start_vantage_sync('{resource}');
             UPDATE vantage_sync_state SET started_at = now() - interval '{seconds} seconds' WHERE resource = '{resource}';
             SELECT {end};"
        )
    };
    for seconds in [40, 55, 38, 70] {
        app.sql(&run(
            "accounts",
            seconds,
            "complete_vantage_sync('accounts', 1200, 20, 1000)",
        ))
        .await;
    }
    app.sql(&run(
        "funds",
        20,
        "complete_vantage_sync('funds', 80, 0, 80)",
    ))
    .await;
    app.sql(&run(
        "funds",
        5,
        "fail_vantage_sync('funds', '[{\"code\":\"HTTP_500\",\"message\":\"upstream failed\",\"recordId\":\"f-17\"}]')",
    ))
    .await;
    app.sql(&run(
        "investments",
        12,
        "complete_vantage_sync('investments', 9, 1, 8)",
    ))
    .await;
    app.sql("SELECT start_vantage_sync('investments')").await;
    app.sql(
        &run(
            "investments",
            15,
            "complete_vantage_sync('investments', 10, 2, 8)",
        )
        .replace(
            "start_vantage_sync('investments')",
            "start_vantage_sync('investments', true)",
        ),
    )
    .await;
    app.sql("SELECT start_vantage_sync('cashflows')").await;
    let (browser, token) = open(&app, "every-resource", 1280, 7).await;
    let body = app
        .query(
            "authenticated",
            "{ syncStates { resource health } }",
            json!({}),
        )
        .await;
    let expected: Vec<Value> = body["data"]["syncStates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|state| json!([state["resource"], state["health"]]))
        .collect();
    assert_eq!(browser.js(ROWS, vec![]).await, Value::Array(expected));
    // The banner is the server's `alerts`, asked for once the rows came.
    eventually(
        &browser,
        &format!("{} && {}", alert_shown("failed"), alert_shown("stale")),
        Duration::from_secs(2),
        "the alerts",
    )
    .await;
    assert_eq!(browser.js(ALERTS, vec![]).await, json!(["failed", "stale"]));
    // Signed in: the token left the address bar for session storage.
    let url = browser.client.current_url().await.unwrap();
    assert_eq!(url.fragment(), None, "{url}");
    let kept = browser
        .js(
            "return sessionStorage.getItem('vantage-sync-token');",
            vec![],
        )
        .await;
    assert_eq!(kept, json!(token));
    assert!(!url.as_str().contains(&token));
    // The errors are there on demand.
    browser
        .client
        .find(Locator::Css("[data-resource=\"funds\"] summary"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let errors = browser
        .js(
            "return document.querySelector('[data-resource=\"funds\"] details li').textContent;",
            vec![],
        )
        .await;
    assert_eq!(errors, json!("HTTP_500 upstream failed (record f-17)"));
    // By keyboard too: Enter on the focused summary folds the list again.
    let summary = browser
        .client
        .find(Locator::Css("[data-resource=\"funds\"] summary"))
        .await
        .unwrap();
    summary.send_keys("\u{E007}").await.unwrap();
    eventually(
        &browser,
        "!document.querySelector('[data-resource=\"funds\"] details').open
            && document.activeElement.tagName === 'SUMMARY'",
        Duration::from_secs(2),
        "the errors folded by keyboard",
    )
    .await;
    summary.send_keys("\u{E007}").await.unwrap();
    // Trends drawn from syncTrends: one successful and one failed run.
    let marks = browser
        .js(
            "return ['accounts', 'funds', 'investments'].map((resource) =>
                 [...document.querySelectorAll(`[data-resource=\"${resource}\"] svg rect[class^=bar-]`)]
                     .map((bar) => bar.getAttribute('class')));",
            vec![],
        )
        .await;
    assert_eq!(
        marks,
        json!([
            ["bar-SUCCESS", "bar-SUCCESS", "bar-SUCCESS", "bar-SUCCESS"],
            ["bar-SUCCESS", "bar-FAILED"],
            ["bar-SUCCESS", "bar-ABANDONED", "bar-SUCCESS"],
        ])
    );
    let summary = browser
        .js(
            "return document.querySelector('[data-resource=\"accounts\"] .trend span').textContent;",
            vec![],
        )
        .await;
    assert_eq!(
        summary,
        json!("4 of 4 runs succeeded; median 40.0 s, p95 70.0 s")
    );
    let path = browser.screenshot().await;
    if std::env::var_os("UPDATE_BOARD_SCREENSHOT").is_some() {
        let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/board.png");
        std::fs::copy(&path, docs).unwrap();
    }
    // Everything came from the server's own origin: Chromium's network log
    // of the page (its own background traffic is not the page's).
    let origin = app.url("/");
    let requests = browser.page_requests(&origin).await;
    assert!(requests.len() >= 4, "{requests:?}");
    let foreign: Vec<&String> = requests
        .iter()
        .filter(|url| !url.starts_with(&origin) && !url.starts_with("data:"))
        .collect();
    assert_eq!(foreign, Vec::<&String>::new());
    assert!(
        requests.iter().any(|url| url == &app.url("/graphql")),
        "{requests:?}"
    );
    assert_eq!(browser.console_errors().await, Vec::<String>::new());
    browser.close().await;
}

#[tokio::test]
async fn a_failure_made_through_the_api_turns_the_row_red_within_a_second() {
    let app = TestApp::spawn().await;
    let (browser, _) = open(&app, "failure", 1280, 7).await;
    browser.js("window.notReloaded = true;", vec![]).await;
    // An open board costs one stream and no polling: idle, it asks nothing.
    let origin = app.url("/");
    eventually(
        &browser,
        &alert_shown("stale"),
        Duration::from_secs(2),
        "the alerts",
    )
    .await;
    browser.page_requests(&origin).await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(browser.page_requests(&origin).await, Vec::<String>::new());
    assert_eq!(browser.js(ALERTS, vec![]).await, json!(["stale"]));
    let writer = "service_role";
    app.query(
        writer,
        "mutation { startSync(resource: \"accounts\") { resource } }",
        json!({}),
    )
    .await;
    eventually(
        &browser,
        &row_is("accounts", "status", "RUNNING"),
        Duration::from_secs(1),
        "the running sync",
    )
    .await;
    let body = app
        .query(
            writer,
            "mutation { failSync(resource: \"accounts\", errors: [{code: \"E\", message: \"boom\"}]) { health } }",
            json!({}),
        )
        .await;
    assert_eq!(body["data"]["failSync"]["health"], "RED");
    eventually(
        &browser,
        &format!(
            "{} && {}",
            row_is("accounts", "health", "RED"),
            alert_shown("failed")
        ),
        Duration::from_secs(1),
        "RED and the failed alert",
    )
    .await;
    assert_eq!(
        browser
            .js("return window.notReloaded === true;", vec![])
            .await,
        json!(true),
        "the page reloaded"
    );
    browser.screenshot().await;
    browser.close().await;
}

#[tokio::test]
async fn three_failures_in_a_row_raise_repeated_once_the_third_fails() {
    let app = TestApp::spawn().await;
    let (browser, _) = open(&app, "repeated", 1280, 7).await;
    let fail = "SELECT start_vantage_sync('funds'); SELECT fail_vantage_sync('funds', '[]');";
    app.sql(fail).await;
    app.sql(fail).await;
    eventually(
        &browser,
        &row_is("funds", "consecutiveFailures", "2"),
        Duration::from_secs(2),
        "two failures",
    )
    .await;
    assert!(!holds(&browser, &alert_shown("repeated")).await);
    app.sql(fail).await;
    eventually(
        &browser,
        &alert_shown("repeated"),
        Duration::from_secs(2),
        "the repeated alert",
    )
    .await;
    assert_eq!(
        browser
            .js(
                "return document.querySelector('[data-alert=\"repeated\"]').textContent;",
                vec![]
            )
            .await,
        json!("Failing repeatedly funds")
    );
    assert_eq!(browser.console_errors().await, Vec::<String>::new());
    browser.screenshot().await;
    browser.close().await;
}

#[tokio::test]
async fn a_sync_running_for_over_30_minutes_is_red_and_stuck_even_without_an_event() {
    let app = TestApp::spawn().await;
    let (browser, _) = open(&app, "stuck", 1280, 7).await;
    app.sql(
        "SELECT start_vantage_sync('valuations');
         UPDATE vantage_sync_state SET started_at = now() - interval '31 minutes' WHERE resource = 'valuations';",
    )
    .await;
    eventually(
        &browser,
        &row_is("valuations", "health", "RED"),
        Duration::from_secs(2),
        "the stuck sync",
    )
    .await;
    eventually(
        &browser,
        &alert_shown("stuck"),
        Duration::from_secs(2),
        "the stuck alert",
    )
    .await;
    // Two seconds short of stuck: YELLOW now, RED once time has passed,
    // with no change made.
    app.sql(
        "SELECT start_vantage_sync('investors');
         UPDATE vantage_sync_state SET started_at = now() - interval '30 minutes' + interval '2 seconds'
         WHERE resource = 'investors';",
    )
    .await;
    eventually(
        &browser,
        &row_is("investors", "health", "YELLOW"),
        Duration::from_secs(1),
        "a running sync",
    )
    .await;
    eventually(
        &browser,
        &row_is("investors", "health", "RED"),
        Duration::from_secs(5),
        "the sync turning stuck as time passes",
    )
    .await;
    // The banner follows the server, whose timer finds it with no change.
    eventually(
        &browser,
        "document.querySelector('[data-alert=\"stuck\"]')?.textContent.includes('investors')",
        Duration::from_secs(15),
        "the server's stuck alert in the banner",
    )
    .await;
    assert_eq!(browser.console_errors().await, Vec::<String>::new());
    browser.screenshot().await;
    browser.close().await;
}

#[tokio::test]
async fn a_database_restart_shows_reconnecting_then_live_and_every_change() {
    let cluster = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    let app = TestApp::spawn_with(TestDb::migrated_on(&cluster).await, |_| {}).await;
    let (browser, _) = open(&app, "database-restart", 1280, 7).await;
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.stop();
        cluster
    })
    .await
    .unwrap();
    eventually(
        &browser,
        "document.documentElement.dataset.connection === 'reconnecting'",
        // The feed notices at once, or, if a read of the log was under
        // way, once that read gives up: the pool's acquire timeout (5 s).
        Duration::from_secs(12),
        "reconnecting shown",
    )
    .await;
    browser.screenshot().await;
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.restart();
        cluster
    })
    .await
    .unwrap();
    // Made at once, before the board is back.
    app.sql(
        "SELECT start_vantage_sync('funds'); SELECT start_vantage_sync('investors');
         SELECT fail_vantage_sync('investors', '[]');",
    )
    .await;
    eventually(&browser, LIVE, Duration::from_secs(15), "live again").await;
    eventually(
        &browser,
        &row_is("funds", "status", "RUNNING"),
        Duration::from_secs(5),
        "the first change",
    )
    .await;
    eventually(
        &browser,
        &row_is("investors", "status", "FAILED"),
        Duration::from_secs(5),
        "the last change",
    )
    .await;
    browser.screenshot().await;
    browser.close().await;
    drop(cluster);
}

#[tokio::test]
async fn sign_in_asks_for_a_token_and_says_why_one_is_refused() {
    let app = TestApp::spawn().await;
    let browser = Browser::start("sign-in", 1280, 800).await;
    browser.client.goto(&app.url("/")).await.unwrap();
    eventually(
        &browser,
        "!document.getElementById('sign-in').hidden",
        Duration::from_secs(5),
        "the sign-in form",
    )
    .await;
    let field = browser.client.find(Locator::Id("token")).await.unwrap();
    field.send_keys("not-a-token\n").await.unwrap();
    eventually(
        &browser,
        "document.getElementById('sign-in-error').textContent.length > 0
            && !document.getElementById('sign-in').hidden",
        Duration::from_secs(5),
        "the refusal",
    )
    .await;
    let said = browser
        .js(
            "return document.getElementById('sign-in-error').textContent;",
            vec![],
        )
        .await;
    assert!(said.as_str().unwrap().contains("token"), "{said}");
    let field = browser.client.find(Locator::Id("token")).await.unwrap();
    field
        .send_keys(&format!("{}\n", app.token("authenticated")))
        .await
        .unwrap();
    eventually(
        &browser,
        "document.querySelectorAll('[data-resource]').length === 7",
        Duration::from_secs(5),
        "the board after sign-in",
    )
    .await;
    browser.screenshot().await;
    browser.close().await;
}

#[tokio::test]
async fn the_board_is_readable_at_375_pixels() {
    let app = TestApp::spawn().await;
    app.sql("SELECT start_vantage_sync('commitments'); SELECT fail_vantage_sync('commitments', '[{\"code\":\"A_RATHER_LONG_ERROR_CODE_WITHOUT_BREAKS\",\"message\":\"m\"}]');")
        .await;
    let (browser, _) = open(&app, "narrow", 375, 7).await;
    let fits = browser
        .js(
            "const width = document.documentElement.clientWidth;
             const over = [...document.querySelectorAll('body *')]
                 .filter((node) => node.getBoundingClientRect().right > width + 0.5)
                 .map((node) => node.tagName + '.' + node.className);
             return { width, scroll: document.documentElement.scrollWidth, over };",
            vec![],
        )
        .await;
    assert!(fits["width"].as_i64().unwrap() <= 375, "{fits}");
    assert_eq!(fits["scroll"], fits["width"], "{fits}");
    assert_eq!(fits["over"], json!([]), "{fits}");
    let font = browser
        .js(
            "return parseFloat(getComputedStyle(document.querySelector('.facts')).fontSize);",
            vec![],
        )
        .await;
    assert!(font.as_f64().unwrap() >= 14.0, "{font}");
    assert_eq!(browser.console_errors().await, Vec::<String>::new());
    browser.screenshot().await;
    browser.close().await;
}

#[tokio::test]
async fn graphiql_loads_from_the_server_alone_and_reads_the_schema() {
    let app = TestApp::spawn().await;
    let browser = Browser::start("graphiql", 1280, 900).await;
    browser.client.goto(&app.url("/graphiql")).await.unwrap();
    eventually(
        &browser,
        "document.querySelector('.graphiql-container .graphiql-query-editor') !== null",
        Duration::from_secs(15),
        "GraphiQL's editor",
    )
    .await;
    // Its introspection query ran (the schema loads even without a token).
    let origin = app.url("/");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut requests = Vec::new();
    while !requests.iter().any(|url| url == &app.url("/graphql")) {
        assert!(tokio::time::Instant::now() < deadline, "{requests:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        requests.extend(browser.page_requests(&origin).await);
    }
    let foreign: Vec<&String> = requests
        .iter()
        .filter(|url| !url.starts_with(&origin) && !url.starts_with("data:"))
        .collect();
    assert_eq!(foreign, Vec::<&String>::new());
    // With no token, the first query says how to get one.
    eventually(
        &browser,
        "document.querySelector('.graphiql-query-editor').innerText.includes('vantage-sync token --role authenticated')",
        Duration::from_secs(5),
        "how to get a token, in the editor",
    )
    .await;
    browser.screenshot().await;
    assert_eq!(browser.console_errors().await, Vec::<String>::new());
    // A token in the address is taken, as the board takes it, and leaves
    // the address bar.
    let token = app.token("authenticated");
    // A new document (a hash change alone would not load the page again).
    browser.client.goto("about:blank").await.unwrap();
    browser
        .client
        .goto(&format!("{}#token={token}", app.url("/graphiql")))
        .await
        .unwrap();
    eventually(
        &browser,
        "document.querySelector('.graphiql-container .graphiql-query-editor') !== null",
        Duration::from_secs(15),
        "GraphiQL's editor",
    )
    .await;
    let seen = browser
        .js(
            "return [location.hash, sessionStorage.getItem('vantage-sync-token')];",
            vec![],
        )
        .await;
    assert_eq!(seen, json!(["", token]));
    browser.close().await;
}

/// A fresh install: resources that never ran are YELLOW and the stale
/// alert fires for them, as the contract defines it; the board says they
/// are waiting for a first run, apart from those late (a success over 24
/// hours ago) or still without a success (a first run under way).
#[tokio::test]
async fn a_fresh_install_says_its_resources_wait_for_a_first_run() {
    let app = TestApp::spawn().await;
    app.sql("SELECT start_vantage_sync('accounts'); SELECT complete_vantage_sync('accounts', 1, 1, 0);
             UPDATE vantage_sync_state SET last_sync_time = now() - interval '2 days' WHERE resource = 'accounts';
             SELECT start_vantage_sync('cashflows');")
        .await;
    let (browser, _) = open(&app, "fresh-install", 1280, 7).await;
    eventually(
        &browser,
        &alert_shown("stale"),
        Duration::from_secs(10),
        "the stale alert",
    )
    .await;
    let banner = browser
        .js(
            "return document.querySelector('[data-alert=\"stale\"]').textContent;",
            vec![],
        )
        .await;
    let banner = banner.as_str().unwrap();
    assert!(
        banner.contains("accounts: no successful sync in 24 hours"),
        "{banner}"
    );
    assert!(
        banner.contains("cashflows: no successful sync yet"),
        "{banner}"
    );
    assert!(
        banner.contains(
            "commitments, funds, investments, investors, valuations: waiting for a first run"
        ),
        "{banner}"
    );
    let funds = browser
        .js(
            "return document.querySelector('[data-resource=\"funds\"] .health').textContent;",
            vec![],
        )
        .await;
    assert_eq!(funds, json!("YELLOW · waiting for a first run"));
    assert_eq!(browser.console_errors().await, Vec::<String>::new());
    browser.screenshot().await;
    browser.close().await;
}
