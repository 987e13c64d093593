//! The load tool keeps working: its smoke size runs every scenario against
//! a server it starts itself and checks correctness (no errors, nothing
//! missed or lost), never timings.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::process::{Command, Output};

use serde_json::Value;
use vantage_sync_testkit::{HaProxy, SECRET, TestApp};

/// The load tool's JSON report of a `--smoke --json` run with `args`.
fn smoke(args: &[&str]) -> Value {
    let output = Command::new(env!("CARGO_BIN_EXE_vantage-sync-loadtest"))
        .args(["--smoke", "--json"])
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    report(output)
}

/// The JSON report of a successful run.
fn report(output: Output) -> Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "bench failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(&stdout).unwrap()
}

#[test]
fn smoke_runs_every_scenario_correctly() {
    let report = smoke(&[]);
    for scenario in ["query", "floor", "mutate"] {
        assert!(
            report[scenario]["requests"].as_u64().unwrap() > 0,
            "{scenario} did nothing"
        );
        assert_eq!(report[scenario]["errors"], 0, "{scenario}");
        // No balancer in front, so no replica named.
        assert!(report[scenario]["served_by"].is_null(), "{scenario}");
        // The CPU the load tool measured for itself and, but for the
        // floor (which bypasses it), for the server it started.
        let cpu = &report[scenario]["cpu_us_per_request"];
        assert!(
            cpu["load_tool"].as_f64().unwrap() > 0.0,
            "{scenario}: {cpu}"
        );
        assert!(cpu["postgres"].as_f64().unwrap() > 0.0, "{scenario}: {cpu}");
        if scenario != "floor" {
            assert!(cpu["server"].as_f64().unwrap() > 0.0, "{scenario}: {cpu}");
        }
    }
    assert_eq!(report["mutate"]["lost"], 0);
    // The server's feed, and the delivery floor's (the same subscribers
    // fed by a process that only writes): each change reaches everyone.
    for transport in ["fanout", "sse", "fanout_floor", "sse_floor"] {
        let fanout = &report[transport];
        assert_eq!(fanout["missed"], 0, "{transport}");
        assert_eq!(fanout["errors"], 0, "{transport}");
        assert_eq!(fanout["connected"], fanout["subscribers"], "{transport}");
        assert_eq!(fanout["shapes"], 1, "{transport}");
        assert_eq!(
            fanout["delivered"].as_u64(),
            Some(fanout["subscribers"].as_u64().unwrap() * fanout["changes"].as_u64().unwrap()),
            "{transport}"
        );
    }
    // Every change reached every webhook, once, in order.
    let hooks = &report["webhooks"];
    assert_eq!(
        hooks["delivered"].as_u64(),
        Some(hooks["webhooks"].as_u64().unwrap() * hooks["changes"].as_u64().unwrap()),
        "{hooks}"
    );
    assert_eq!(hooks["lost"], 0);
    assert_eq!(hooks["duplicates"], 0);
    assert_eq!(hooks["out_of_order"], 0);
    assert!(report["query_to_floor_throughput"].as_f64().unwrap() > 0.0);
}

/// Subscribers spread over three distinct subscriptions, on either
/// transport: every one still receives every change, and the server's CPU
/// per delivery and memory per subscriber are reported.
#[test]
fn smoke_spreads_subscribers_over_shapes() {
    let report = smoke(&["fanout", "sse", "--shapes", "3"]);
    for transport in ["fanout", "sse"] {
        let fanout = &report[transport];
        assert_eq!(fanout["shapes"], 3, "{transport}: {fanout}");
        assert_eq!(fanout["missed"], 0, "{transport}: {fanout}");
        assert_eq!(fanout["errors"], 0, "{transport}: {fanout}");
        assert_eq!(fanout["connected"], fanout["subscribers"], "{transport}");
        assert_eq!(
            fanout["delivered"].as_u64(),
            Some(fanout["subscribers"].as_u64().unwrap() * fanout["changes"].as_u64().unwrap()),
            "{transport}: {fanout}"
        );
        // /proc counts in 10 ms ticks: a smoke-sized run may use less than
        // one, so only that a figure is reported can be asserted here.
        let cpu = &fanout["cpu_us_per_delivery"];
        assert!(
            cpu["server"].as_f64().is_some_and(|us| us >= 0.0),
            "{transport}: {cpu}"
        );
        assert!(
            fanout["rss_kib_per_subscriber"].as_f64().is_some(),
            "{transport}: {fanout}"
        );
    }
}

/// A server that pings every second and drops a peer silent for a
/// second, over changes 1.5 s apart: the subscribers answer its pings, so
/// none is dropped and every change reaches every one.
#[test]
fn smoke_subscribers_answer_the_servers_pings() {
    let output = Command::new(env!("CARGO_BIN_EXE_vantage-sync-loadtest"))
        .args(["--smoke", "--json", "fanout", "--interval-ms", "1500"])
        .env("WS_PING_INTERVAL_SECS", "1")
        .env("WS_PONG_TIMEOUT_SECS", "1")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let fanout = &report(output)["fanout"];
    assert_eq!(fanout["missed"], 0, "{fanout}");
    assert_eq!(fanout["errors"], 0, "{fanout}");
    assert_eq!(fanout["connected"], fanout["subscribers"], "{fanout}");
}

/// The same through a real PgBouncer in transaction mode: no request
/// fails, no transition is lost, no change is missed.
#[test]
fn smoke_through_pgbouncer_loses_nothing() {
    let report = smoke(&["query", "mutate", "fanout", "--through-pgbouncer"]);
    assert_eq!(report["through_pgbouncer"], true);
    for scenario in ["query", "mutate"] {
        assert!(
            report[scenario]["requests"].as_u64().unwrap() > 0,
            "{scenario}"
        );
        assert_eq!(report[scenario]["errors"], 0, "{scenario}");
    }
    assert_eq!(report["mutate"]["lost"], 0);
    assert_eq!(report["fanout"]["missed"], 0);
}

/// Through HAProxy with the shipped configuration, the one server listed
/// twice (as replica1 and replica2): the query scenario counts the
/// responses each replica gave by the balancer's `x-served-by` header.
#[tokio::test]
async fn smoke_through_a_balancer_counts_responses_per_replica() {
    let app = TestApp::spawn().await;
    let balancer = HaProxy::start(&[app.addr, app.addr]);
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_vantage-sync-loadtest"))
        .args(["--smoke", "--json", "query", "--url"])
        .arg(balancer.url(""))
        .args(["--database-url", &app.db.url, "--jwt-secret", SECRET])
        .env("RUST_BACKTRACE", "0")
        .output()
        .await
        .unwrap();
    let report = report(output);
    let query = &report["query"];
    assert_eq!(query["errors"], 0, "{query}");
    let served_by = query["served_by"].as_object().unwrap();
    let count = |replica: &str| served_by.get(replica).and_then(Value::as_u64).unwrap_or(0);
    assert!(
        count("replica1") > 0 && count("replica2") > 0,
        "leastconn spreads the workers: {query}"
    );
    assert_eq!(served_by.len(), 2, "{query}");
    assert_eq!(
        Some(count("replica1") + count("replica2")),
        query["requests"].as_u64(),
        "every response counted once: {query}"
    );
}

/// The soak at smoke size (20 s in 5 s windows): subscribers leave and
/// resume by cursor and miss nothing, no transition is lost, slowloris
/// connections are closed by the header timeout (10 s by default), and
/// every window has the server's memory and open files.
#[test]
fn smoke_soak_resumes_and_closes_attackers() {
    let report = smoke(&["soak"]);
    let soak = &report["soak"];
    let totals = &soak["totals"];
    for field in ["errors", "missed", "lost", "duplicates"] {
        assert_eq!(totals[field], 0, "{field}: {totals}");
    }
    assert!(totals["requests"].as_u64().unwrap() > 0, "{totals}");
    assert!(totals["transitions_acknowledged"].as_u64().unwrap() > 0);
    assert_eq!(
        totals["transitions_acknowledged"],
        totals["transitions_logged"]
    );
    // Every subscriber saw every event, over more sessions than there
    // are subscribers: they left and came back.
    assert_eq!(
        totals["delivered"].as_u64(),
        Some(totals["events"].as_u64().unwrap() * soak["subscribers"].as_u64().unwrap())
    );
    assert!(
        totals["sessions"].as_u64().unwrap() > soak["subscribers"].as_u64().unwrap(),
        "{totals}"
    );
    let windows = soak["windows"].as_array().unwrap();
    assert_eq!(windows.len(), 4);
    let mut attacks_closed = 0;
    for window in windows {
        assert!(window["rss_kib"].as_u64().unwrap() > 0, "{window}");
        assert!(window["open_fds_max"].as_u64().unwrap() > 0, "{window}");
        assert!(
            window["attack_hold_max_s"].as_f64().unwrap() < 15.0,
            "an attacker was held past the header timeout: {window}"
        );
        attacks_closed += window["attacks_closed"].as_u64().unwrap();
    }
    assert!(attacks_closed >= soak["attackers"].as_u64().unwrap());
    assert!(soak["rss_kib_per_minute"].as_f64().is_some());
}
