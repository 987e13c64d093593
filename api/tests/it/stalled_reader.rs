//! A subscriber that stops reading, against the binary itself (so the
//! server's memory is its own process's): the server does not queue what
//! the subscriber cannot take, and the subscriber catches up from the log.

use std::time::Duration;

use serde_json::{Value, json};

use crate::cli::{data_dir, serve_with, token};

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A subscriber that stops reading while 40,000 large changes happen does
/// not make the server queue them (its memory levels off); once it reads
/// again it receives every one, in order, from the log.
#[tokio::test]
async fn a_subscriber_that_stops_reading_costs_bounded_memory() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let dir = data_dir("slow-reader");
    // The client stops reading for longer than the default pong timeout
    // would allow a silent peer; what is measured here is the memory a
    // stalled reader costs while it stays.
    let server = serve_with(&dir, &[("WS_PONG_TIMEOUT_SECS", "600")]);
    let pid = server.child.id();
    let token = token(&dir, "authenticated");
    let mut request = format!("ws://{}/graphql", server.addr)
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let send = |value: Value| Message::Text(value.to_string().into());
    socket
        .send(send(json!({"type": "connection_init", "payload": {"Authorization": format!("Bearer {token}")}})))
        .await
        .unwrap();
    let ack = socket.next().await.unwrap().unwrap();
    assert!(ack.to_text().unwrap().contains("connection_ack"));
    socket
        .send(send(json!({"id": "1", "type": "subscribe", "payload": {"query":
            "subscription { syncStateChanged(resources: [\"accounts\"]) { cursor state { lastSyncStatus errors { message } } } }"}})))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(pid);
    let started = std::time::Instant::now();

    // Two phases of 10,000 rounds of start + fail (about 2 KB of errors
    // each), committed every 100 rounds as writers would.
    let socket_dir = dir.canonicalize().unwrap().join("run");
    let url = format!(
        "postgres://postgres@localhost/vantage_sync?host={}",
        socket_dir.display()
    );
    let db = sea_orm::Database::connect(&url).await.unwrap();
    use sea_orm::ConnectionTrait;
    let mut rss = vec![before];
    for phase in 0..2 {
        db.execute_unprepared(&format!(
            "DO $$ BEGIN FOR i IN {}..{} LOOP
                 PERFORM start_vantage_sync('accounts');
                 PERFORM fail_vantage_sync('accounts', jsonb_build_array(jsonb_build_object('code', 'E', 'message', repeat('x', 2000) || i)));
                 IF i % 100 = 0 THEN COMMIT; END IF;
             END LOOP; END $$",
            phase * 10_000 + 1,
            phase * 10_000 + 10_000
        ))
        .await
        .unwrap();
        // Time for the server to try to send everything to the stalled client.
        tokio::time::sleep(Duration::from_secs(3)).await;
        rss.push(rss_kib(pid));
    }
    eprintln!(
        "wrote 40,000 changes in {:?}; RSS KiB {rss:?}",
        started.elapsed()
    );
    let mib = |from: u64, to: u64| to.saturating_sub(from) / 1024;
    // Queued, each phase's 20,000 changes of ~2 KB would add ~40 MiB; bounded,
    // the second phase adds next to nothing over the first.
    assert!(
        mib(rss[0], rss[2]) < 32,
        "server RSS grew {} MiB: {rss:?}",
        mib(rss[0], rss[2])
    );
    assert!(mib(rss[1], rss[2]) < 8, "server RSS kept growing: {rss:?}");

    // Reading again: every change, in order.
    let mut received = 0;
    let mut last_suffix = 0;
    while received < 40_000 {
        let message = tokio::time::timeout(Duration::from_secs(30), socket.next())
            .await
            .expect("stalled")
            .unwrap()
            .unwrap();
        let Message::Text(text) = message else {
            continue;
        };
        let value: Value = serde_json::from_str(&text).unwrap();
        if value["type"] != "next" {
            continue;
        }
        received += 1;
        let state = &value["payload"]["data"]["syncStateChanged"]["state"];
        if state["lastSyncStatus"] == "FAILED" {
            let message = state["errors"][0]["message"].as_str().unwrap();
            let suffix: u32 = message.trim_start_matches('x').parse().unwrap();
            assert_eq!(suffix, last_suffix + 1, "failure {suffix} out of order");
            last_suffix = suffix;
        }
    }
    assert_eq!(last_suffix, 20_000);
    eprintln!("read them all by {:?}", started.elapsed());
    db.close().await.unwrap();
    let (clean, _) = server.stop();
    assert!(clean);
    std::fs::remove_dir_all(&dir).unwrap();
}
