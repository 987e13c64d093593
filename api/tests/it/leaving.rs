//! How a replica leaves: on the stop signal `/readyz` answers 503 while
//! requests are still served for the shutdown delay, then it stops
//! accepting, WebSockets close with 1001, and it is gone within the delay
//! plus the shutdown timeout; behind HAProxy, without failing a request.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use vantage_sync::server::Leaving;
use vantage_sync_testkit::{HaProxy, ServerProcess, TestApp, TestDb, WsClient};

/// The ignored test whose process serves (see `ServerProcess`).
const SERVER_PROCESS: &str = "server_kill::server_process";

#[tokio::test]
async fn a_leaving_replica_says_so_on_readyz_while_it_still_serves() {
    let delay = Duration::from_secs(2);
    let timeout = Duration::from_secs(3);
    let mut app = TestApp::spawn_with(TestDb::migrated().await, |config| {
        config.leaving = Leaving { delay, timeout };
    })
    .await;
    let mut subscriber = WsClient::connect(&app, "graphql-transport-ws").await;
    subscriber
        .send(json!({
            "type": "connection_init",
            "payload": {"Authorization": format!("Bearer {}", app.token("authenticated"))},
        }))
        .await;
    assert_eq!(subscriber.recv().await["type"], "connection_ack");

    let told = Instant::now();
    let stopped = app.begin_shutdown();
    // Within the delay: not ready, still serving, the WebSocket still open.
    let mut checked = 0;
    while told.elapsed() < delay - Duration::from_millis(500) {
        let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
        assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(ready.text().await.unwrap(), "leaving");
        let (status, body) = app
            .graphql(
                Some("authenticated"),
                "{ syncStats { totalResources } }",
                json!({}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["data"]["syncStats"]["totalResources"], 7);
        checked += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(checked >= 5, "only {checked} checks in the delay");
    // Then the WebSocket is told to go, with 1001, once the delay is over.
    let closed = subscriber.next().await;
    let closed_after = told.elapsed();
    assert_eq!(closed.map_err(|(code, _)| code), Err(1001));
    assert!(closed_after >= delay, "closed after {closed_after:?}");
    // And the server is gone within the delay plus the timeout.
    tokio::time::timeout(delay + timeout, stopped)
        .await
        .expect("the server outlived its shutdown delay and timeout")
        .unwrap();
    assert!(app.client.get(app.url("/healthz")).send().await.is_err());
}

/// Through HAProxy with the shipped configuration: a replica told to stop
/// under steady query load is taken out while it still serves, then
/// stops, and no request fails; the others carry the load on.
#[tokio::test]
async fn a_replica_leaving_behind_haproxy_costs_no_request() {
    let db = TestDb::migrated().await;
    // At least the balancer's check interval times its fall count (2 s x 2).
    let leaving = Leaving {
        delay: Duration::from_secs(6),
        timeout: Duration::from_secs(5),
    };
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(ServerProcess::start_leaving(SERVER_PROCESS, &db, leaving).await);
    }
    let addrs: Vec<_> = replicas.iter().map(ServerProcess::addr).collect();
    let balancer = HaProxy::start(&addrs);
    let token = replicas[0].token("authenticated");
    let client = reqwest::Client::new();
    let query = json!({"query": "{ syncStats { totalResources } }"});

    let started = Instant::now();
    let run_for = Duration::from_secs(12);
    let mut load = Vec::new();
    for _ in 0..8 {
        let (client, url, token, query) = (
            client.clone(),
            balancer.url("/graphql"),
            token.clone(),
            query.clone(),
        );
        load.push(tokio::spawn(async move {
            let mut served = std::collections::BTreeMap::<(String, u64), u32>::new();
            let mut failed = Vec::new();
            while started.elapsed() < run_for {
                let second = started.elapsed().as_secs();
                match client
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&query)
                    .send()
                    .await
                {
                    Ok(response) if response.status() == StatusCode::OK => {
                        let by = response
                            .headers()
                            .get("x-served-by")
                            .map(|value| value.to_str().unwrap().to_owned())
                            .unwrap_or_default();
                        let body: serde_json::Value = response.json().await.unwrap();
                        if body["data"]["syncStats"]["totalResources"] == 7 {
                            *served.entry((by, second)).or_default() += 1;
                        } else {
                            failed.push(body.to_string());
                        }
                    }
                    Ok(response) => failed.push(format!("status {}", response.status())),
                    Err(error) => failed.push(error.to_string()),
                }
            }
            (served, failed)
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let told = Instant::now();
    replicas[0].terminate();
    let leaving_total = leaving.delay + leaving.timeout;
    assert!(
        replicas[0]
            .exited_within(leaving_total + Duration::from_secs(2))
            .await,
        "the leaving replica did not exit cleanly within {leaving_total:?}: {}",
        replicas[0].log_tail()
    );
    let exited_after = told.elapsed();
    let mut served = std::collections::BTreeMap::<(String, u64), u32>::new();
    let mut failed = Vec::new();
    for task in load {
        let (task_served, task_failed) = task.await.unwrap();
        for (key, count) in task_served {
            *served.entry(key).or_default() += count;
        }
        failed.extend(task_failed);
    }
    assert_eq!(failed, Vec::<String>::new(), "failed requests");
    let total: u32 = served.values().sum();
    let by_replica = |name: &str| -> u32 {
        served
            .iter()
            .filter(|((by, _), _)| by == name)
            .map(|(_, count)| count)
            .sum()
    };
    eprintln!(
        "{total} requests; replica1 {}, replica2 {}, replica3 {}; replica1 exited after {exited_after:?}",
        by_replica("replica1"),
        by_replica("replica2"),
        by_replica("replica3")
    );
    assert!(total > 100, "only {total} requests");
    for name in ["replica1", "replica2", "replica3"] {
        assert!(by_replica(name) > 0, "{name} served nothing: {served:?}");
    }
    // The balancer took the leaving replica out while it still served: its
    // last request was answered well before it stopped accepting (without
    // the delay it serves until the moment it goes).
    let last_served = served
        .keys()
        .filter(|(by, _)| by == "replica1")
        .map(|(_, second)| *second)
        .max()
        .unwrap();
    let stopped_at = (told - started + exited_after).as_secs_f64();
    assert!(
        (last_served as f64) + 1.0 < stopped_at,
        "replica1 served until second {last_served}, and stopped at {stopped_at:.1} s"
    );
}
