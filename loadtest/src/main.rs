//! `vantage-sync-loadtest`: drives a Vantage sync state server and prints what
//! it measured. Without `--url` it starts one itself (the `vantage-sync`
//! binary next to this one, zero-config: its own throwaway PostgreSQL), in a
//! separate process so the server's memory can be read on its own.
//!
//! Figures are meant to be compared side by side within one run (query
//! against floor, memory before and after): absolute times on a shared
//! machine move from run to run, ratios much less.

// The server's allocator (docs/adr/0005-mimalloc.md): this tool shares
// the cores with the server it measures, and glibc's malloc and free of
// every message cost it more.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod cpu;
mod delivery_floor;
mod fanout;
mod http;
mod load;
mod mutate;
mod readers;
mod soak;
mod sse;
mod stats;
mod target;
mod webhooks;
mod ws;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use serde_json::{Value, json};

use crate::target::Target;

/// Load tool of the Vantage sync state service.
#[derive(Debug, Parser)]
#[command(name = "vantage-sync-loadtest", version, about)]
struct Args {
    /// Scenarios to run (all when none is given).
    #[arg(value_enum)]
    scenarios: Vec<Scenario>,
    /// Small sizes that check correctness (no errors, nothing missed or
    /// lost), never timings: what CI runs.
    #[arg(long)]
    smoke: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// A running server (e.g. http://127.0.0.1:8080); needs --database-url
    /// and --jwt-secret. Without it one is started.
    #[arg(long, requires_all = ["database_url", "jwt_secret"])]
    url: Option<String>,
    /// Superuser URL of the server's database (for floor, writes, checks).
    #[arg(long, env = "BENCH_DATABASE_URL")]
    database_url: Option<String>,
    /// The server's JWT secret.
    #[arg(long, env = "BENCH_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// The `vantage-sync` binary to start (default: next to this one).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Measure a server whose DATABASE_URL is a PgBouncer in transaction
    /// mode (Debian's pgbouncer) in front of its PostgreSQL, with
    /// LISTEN_DATABASE_URL on the direct socket.
    #[arg(long, conflicts_with = "url")]
    through_pgbouncer: bool,
    /// Concurrent clients for query, floor and mutate.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Seconds each of query, floor and mutate runs.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Subscribers for fanout (WebSocket) and sse (GraphQL over SSE).
    #[arg(long, default_value_t = 10_000)]
    subscribers: usize,
    /// Distinct subscriptions the fanout and sse subscribers are spread
    /// over evenly (each receives every change; they differ by an alias).
    #[arg(long, default_value_t = 1)]
    shapes: usize,
    /// Changes made during fanout and sse.
    #[arg(long, default_value_t = 20)]
    changes: usize,
    /// Milliseconds between fanout and sse changes.
    #[arg(long, default_value_t = 200)]
    interval_ms: u64,
    /// Seconds the soak runs.
    #[arg(long, default_value_t = 600)]
    soak_seconds: u64,
    /// Seconds of one soak report window.
    #[arg(long, default_value_t = 60)]
    soak_window_seconds: u64,
    /// Queries per second during the soak.
    #[arg(long, default_value_t = 200)]
    soak_query_rate: u32,
    /// Transitions per second during the soak.
    #[arg(long, default_value_t = 20)]
    soak_mutation_rate: u32,
    /// WebSocket subscribers during the soak, each leaving and resuming.
    #[arg(long, default_value_t = 500)]
    soak_subscribers: usize,
    /// Slowloris connections during the soak.
    #[arg(long, default_value_t = 20)]
    soak_attackers: usize,
    /// Webhooks in the webhooks scenario, each told every change.
    #[arg(long, default_value_t = 100)]
    webhooks: usize,
    /// Changes made in the webhooks scenario.
    #[arg(long, default_value_t = 1_000)]
    webhook_changes: usize,
    /// Changes per second in the webhooks scenario.
    #[arg(long, default_value_t = 20)]
    webhook_change_rate: u32,
    /// The resource fanout and sse change and follow: several load tools,
    /// each on its own resource, can drive one set of servers at once.
    #[arg(long, default_value = fanout::PROBE_RESOURCE)]
    probe_resource: String,
    /// Make the first fanout or sse change at this time (milliseconds
    /// since the Unix epoch), not as soon as the subscribers are
    /// connected: several load tools then change while all of their
    /// subscribers are connected. An error if connecting took longer.
    #[arg(long)]
    changes_at: Option<u64>,
    /// Write every commit-to-receipt delay of fanout or sse (the last one
    /// run) to this file, in milliseconds, one per line: for percentiles
    /// over several load tools.
    #[arg(long)]
    delays_out: Option<PathBuf>,
    /// Run as the delivery floor (ws or sse) of fanout-floor and
    /// sse-floor: started by this tool, not by hand.
    #[arg(long, hide = true)]
    serve_delivery_floor: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// The dashboard query over HTTP as an authenticated user.
    Query,
    /// The same rows straight from PostgreSQL, same role-switching transaction.
    Floor,
    /// start + complete cycles as service_role.
    Mutate,
    /// Many WebSocket subscribers, changes made in the database.
    Fanout,
    /// The same over GraphQL over SSE (one stream per subscriber).
    Sse,
    /// The fanout subscribers and changes, delivered by a process that
    /// only writes pre-framed messages: the floor under fanout.
    FanoutFloor,
    /// The same for the sse subscribers: the floor under sse.
    SseFloor,
    /// W webhooks on a loopback receiver, K changes: delivery delay, losses.
    Webhooks,
    /// A long mixed run (queries, mutations, subscribers leaving and
    /// resuming, slowloris attackers), reported per time window; only
    /// when named.
    Soak,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if let Some(transport) = &args.serve_delivery_floor {
        return delivery_floor::serve(transport);
    }
    if args.scenarios.is_empty() {
        args.scenarios = vec![
            Scenario::Query,
            Scenario::Floor,
            Scenario::Mutate,
            Scenario::Fanout,
            Scenario::Sse,
            Scenario::FanoutFloor,
            Scenario::SseFloor,
            Scenario::Webhooks,
        ];
    }
    if args.smoke {
        args.concurrency = args.concurrency.min(4);
        args.seconds = 1;
        args.subscribers = args.subscribers.min(25);
        args.shapes = args.shapes.min(args.subscribers.max(1));
        args.changes = args.changes.min(3);
        args.soak_seconds = args.soak_seconds.min(20);
        args.soak_window_seconds = args.soak_window_seconds.min(5);
        args.soak_query_rate = args.soak_query_rate.min(50);
        args.soak_mutation_rate = args.soak_mutation_rate.min(10);
        args.soak_subscribers = args.soak_subscribers.min(20);
        args.soak_attackers = args.soak_attackers.min(5);
        args.webhooks = args.webhooks.min(3);
        args.webhook_changes = args.webhook_changes.min(20);
    }
    if args.soak_seconds == 0 || args.soak_window_seconds == 0 {
        bail!("--soak-seconds and --soak-window-seconds must be at least 1");
    }
    if args.shapes == 0 || args.shapes > args.subscribers.max(1) {
        bail!("--shapes must be between 1 and --subscribers");
    }
    target::raise_file_limit();
    let target = match &args.url {
        Some(url) => Target::external(
            url,
            args.database_url.clone().context("--database-url")?,
            args.jwt_secret.as_deref().context("--jwt-secret")?,
        )?,
        None => Target::spawn(args.server_bin.clone(), args.through_pgbouncer).await?,
    };
    let result = run(&args, &target).await;
    target.stop();
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&args, &report);
    }
    let failures = failures(&report);
    if !failures.is_empty() {
        bail!("correctness failed: {}", failures.join("; "));
    }
    Ok(())
}

async fn run(args: &Args, target: &Target) -> anyhow::Result<Value> {
    let duration = Duration::from_secs(args.seconds);
    let mut report = json!({
        "machine": {"cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)},
        "smoke": args.smoke,
        "through_pgbouncer": args.through_pgbouncer,
    });
    load::prepare(target).await?;
    for scenario in &args.scenarios {
        let value = match scenario {
            Scenario::Query => load::query(target, args.concurrency, duration).await?,
            Scenario::Floor => load::floor(target, args.concurrency, duration).await?,
            Scenario::Mutate => mutate::run(target, args.concurrency, duration).await?,
            Scenario::Fanout | Scenario::Sse => {
                let transport = if *scenario == Scenario::Sse {
                    fanout::Transport::Sse
                } else {
                    fanout::Transport::WebSocket
                };
                fanout::run(
                    fanout::Deliverer::Server(target),
                    transport,
                    fanout_plan(args, args.shapes),
                )
                .await?
            }
            Scenario::FanoutFloor | Scenario::SseFloor => {
                let transport = if *scenario == Scenario::SseFloor {
                    fanout::Transport::Sse
                } else {
                    fanout::Transport::WebSocket
                };
                let mut floor = delivery_floor::DeliveryFloor::start(transport)?;
                // One shape: the floor frames one message per change.
                fanout::run(
                    fanout::Deliverer::Floor(&mut floor),
                    transport,
                    fanout_plan(args, 1),
                )
                .await?
            }
            Scenario::Webhooks => {
                webhooks::run(
                    target,
                    webhooks::Plan {
                        webhooks: args.webhooks,
                        changes: args.webhook_changes,
                        rate: args.webhook_change_rate,
                    },
                )
                .await?
            }
            Scenario::Soak => {
                soak::run(
                    target,
                    soak::Plan {
                        duration: Duration::from_secs(args.soak_seconds),
                        window: Duration::from_secs(args.soak_window_seconds),
                        query_rate: args.soak_query_rate,
                        mutation_rate: args.soak_mutation_rate,
                        subscribers: args.soak_subscribers,
                        attackers: args.soak_attackers,
                    },
                )
                .await?
            }
        };
        report[scenario_name(*scenario)] = value;
    }
    if let (Some(query), Some(floor)) = (
        report["query"]["requests_per_second"].as_f64(),
        report["floor"]["requests_per_second"].as_f64(),
    ) {
        report["query_to_floor_throughput"] = json!(query / floor);
    }
    Ok(report)
}

/// What `fanout`, `sse` and their floors do, with `shapes` shapes.
fn fanout_plan(args: &Args, shapes: usize) -> fanout::Plan {
    fanout::Plan {
        subscribers: args.subscribers,
        shapes,
        changes: args.changes,
        interval: Duration::from_millis(args.interval_ms),
        resource: args.probe_resource.clone(),
        changes_at: args
            .changes_at
            .map(|ms| std::time::UNIX_EPOCH + Duration::from_millis(ms)),
        delays_out: args.delays_out.clone(),
    }
}

fn scenario_name(scenario: Scenario) -> &'static str {
    match scenario {
        Scenario::Query => "query",
        Scenario::Floor => "floor",
        Scenario::Mutate => "mutate",
        Scenario::Fanout => "fanout",
        Scenario::Sse => "sse",
        Scenario::FanoutFloor => "fanout_floor",
        Scenario::SseFloor => "sse_floor",
        Scenario::Webhooks => "webhooks",
        Scenario::Soak => "soak",
    }
}

/// Everything that must be zero, whatever the timings.
fn failures(report: &Value) -> Vec<String> {
    let mut failures = Vec::new();
    for (scenario, field) in [
        ("query", "errors"),
        ("floor", "errors"),
        ("mutate", "errors"),
        ("mutate", "lost"),
        ("fanout", "missed"),
        ("fanout", "errors"),
        ("sse", "missed"),
        ("sse", "errors"),
        ("fanout_floor", "missed"),
        ("fanout_floor", "errors"),
        ("sse_floor", "missed"),
        ("sse_floor", "errors"),
        ("webhooks", "lost"),
        ("webhooks", "duplicates"),
        ("webhooks", "out_of_order"),
        ("webhooks", "mismatched"),
        ("soak", "errors"),
        ("soak", "missed"),
        ("soak", "lost"),
        ("soak", "duplicates"),
    ] {
        if let Some(count) = report[scenario][field].as_u64()
            && count > 0
        {
            failures.push(format!("{scenario}: {count} {field}"));
        }
    }
    failures
}

fn ms(value: &Value) -> String {
    value.as_f64().map_or("-".into(), |ms| format!("{ms:.2}"))
}

fn us(value: &Value) -> String {
    value.as_f64().map_or("-".into(), |us| format!("{us:.1}"))
}

/// `; served by replica1 n, replica2 m` from a scenario's `served_by`
/// (the balancer's `x-served-by` counts); empty when there is none.
fn served_by(counts: &Value) -> String {
    let Some(counts) = counts.as_object().filter(|counts| !counts.is_empty()) else {
        return String::new();
    };
    let counts: Vec<String> = counts
        .iter()
        .map(|(replica, count)| format!("{replica} {count}"))
        .collect();
    format!("; served by {}", counts.join(", "))
}

fn print_table(args: &Args, report: &Value) {
    println!(
        "vantage-sync-loadtest on {} cores{}{}",
        report["machine"]["cores"],
        if args.smoke {
            " (smoke sizes: correctness only)"
        } else {
            ""
        },
        if args.through_pgbouncer {
            ", the server's DATABASE_URL through PgBouncer (transaction mode)"
        } else {
            ""
        }
    );
    let timed = [
        "query",
        "floor",
        "mutate",
        "fanout",
        "sse",
        "fanout_floor",
        "sse_floor",
        "webhooks",
    ];
    if timed.iter().all(|name| report[*name].is_null()) {
        print_soak(&report["soak"]);
        return;
    }
    println!(
        "{:<12} {:>14} {:>12} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8}  notes",
        "scenario",
        "size",
        "per second",
        "p50 ms",
        "p99 ms",
        "max ms",
        "errors",
        "srv us",
        "pg us",
        "tool us"
    );
    for (name, size) in [
        (
            "query",
            format!("C={} T={}s", args.concurrency, args.seconds),
        ),
        (
            "floor",
            format!("C={} T={}s", args.concurrency, args.seconds),
        ),
        (
            "mutate",
            format!("C={} T={}s", args.concurrency, args.seconds),
        ),
    ] {
        let row = &report[name];
        if row.is_null() {
            continue;
        }
        let mut notes = match name {
            "mutate" => format!("transitions/s, lost {}", row["lost"]),
            _ => "requests/s".into(),
        };
        notes.push_str(&served_by(&row["served_by"]));
        let cpu = &row["cpu_us_per_request"];
        println!(
            "{:<12} {:>14} {:>12.0} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8}  {notes}",
            name,
            size,
            row["requests_per_second"].as_f64().unwrap_or(0.0),
            ms(&row["latency_ms"]["p50"]),
            ms(&row["latency_ms"]["p99"]),
            ms(&row["latency_ms"]["max"]),
            row["errors"].to_string(),
            us(&cpu["server"]),
            us(&cpu["postgres"]),
            us(&cpu["load_tool"]),
        );
    }
    for name in ["fanout", "sse", "fanout_floor", "sse_floor"] {
        let fanout = &report[name];
        if fanout.is_null() {
            continue;
        }
        let cpu = &fanout["cpu_us_per_delivery"];
        // In a floor row the "server" is the delivery floor's process.
        let who = if name.ends_with("floor") {
            "floor"
        } else {
            "server"
        };
        println!(
            "{:<12} {:>14} {:>12} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8}  commit-to-receipt, CPU per delivery ({who}: {} us in the kernel); shapes {}, missed {}, {}",
            name,
            format!("S={} K={}", args.subscribers, args.changes),
            "-",
            ms(&fanout["delay_ms"]["p50"]),
            ms(&fanout["delay_ms"]["p99"]),
            ms(&fanout["delay_ms"]["max"]),
            fanout["errors"].to_string(),
            us(&cpu["server"]),
            us(&cpu["postgres"]),
            us(&cpu["load_tool"]),
            us(&cpu["server_kernel"]),
            fanout["shapes"],
            fanout["missed"],
            match fanout["rss_kib_per_subscriber"].as_f64() {
                Some(per_subscriber) => format!(
                    "{who} RSS {} -> {} KiB = {per_subscriber:.1} KiB per subscriber",
                    fanout["rss_kib_before"], fanout["rss_kib_after"]
                ),
                None => "server memory not measured (a server started elsewhere)".to_owned(),
            },
        );
    }
    let hooks = &report["webhooks"];
    if !hooks.is_null() {
        let cpu = &hooks["cpu_us_per_delivery"];
        println!(
            "{:<12} {:>14} {:>12} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8}  commit-to-receipt at {} changes/s; delivered {}, lost {}, twice {}, out of order {}",
            "webhooks",
            format!("W={} K={}", args.webhooks, args.webhook_changes),
            "-",
            ms(&hooks["delay_ms"]["p50"]),
            ms(&hooks["delay_ms"]["p99"]),
            ms(&hooks["delay_ms"]["max"]),
            "-",
            us(&cpu["server"]),
            us(&cpu["postgres"]),
            us(&cpu["load_tool"]),
            hooks["change_rate"],
            hooks["delivered"],
            hooks["lost"],
            hooks["duplicates"],
            hooks["out_of_order"],
        );
    }
    if let Some(ratio) = report["query_to_floor_throughput"].as_f64() {
        println!("query/floor throughput: {ratio:.2}");
    }
    print_soak(&report["soak"]);
}

fn print_soak(soak: &Value) {
    if soak.is_null() {
        return;
    }
    println!(
        "soak: {}s, {} queries/s, {} transitions/s, {} subscribers leaving and resuming, {} slowloris attackers",
        soak["seconds"],
        soak["query_rate"],
        soak["mutation_rate"],
        soak["subscribers"],
        soak["attackers"]
    );
    println!(
        "{:>11} {:>8} {:>9} {:>8} {:>9} {:>10} {:>9} {:>7} {:>7} {:>8} {:>8} {:>9} {:>10} {:>6}",
        "window s",
        "queries",
        "q p99 ms",
        "muts",
        "m p99 ms",
        "delivered",
        "d p99 ms",
        "errors",
        "missed",
        "resumes",
        "attacks",
        "held max",
        "RSS KiB",
        "fds"
    );
    for window in soak["windows"].as_array().into_iter().flatten() {
        // serde_json's numbers ignore widths: print them as text.
        let n = |field: &str| window[field].to_string();
        println!(
            "{:>11} {:>8} {:>9} {:>8} {:>9} {:>10} {:>9} {:>7} {:>7} {:>8} {:>8} {:>8.1}s {:>10} {:>6}",
            format!(
                "{:.0}-{:.0}",
                window["from_s"].as_f64().unwrap_or(0.0),
                window["to_s"].as_f64().unwrap_or(0.0)
            ),
            n("queries"),
            ms(&window["query_p99_ms"]),
            n("mutations"),
            ms(&window["mutation_p99_ms"]),
            n("deliveries_live"),
            ms(&window["delivery_p99_ms"]),
            n("errors"),
            n("missed"),
            n("resumes"),
            n("attacks_closed"),
            window["attack_hold_max_s"].as_f64().unwrap_or(0.0),
            n("rss_kib"),
            n("open_fds_max"),
        );
    }
    let totals = &soak["totals"];
    println!(
        "totals: {} requests, {} errors; {} transitions acknowledged, {} logged, {} lost; {} events, {} delivered over {} sessions, {} missed, {} duplicates",
        totals["requests"],
        totals["errors"],
        totals["transitions_acknowledged"],
        totals["transitions_logged"],
        totals["lost"],
        totals["events"],
        totals["delivered"],
        totals["sessions"],
        totals["missed"],
        totals["duplicates"],
    );
    let slope = |value: &Value| {
        value
            .as_f64()
            .map_or("-".into(), |kib| format!("{kib:+.1}"))
    };
    println!(
        "server RSS {} -> {} KiB; slope {} KiB/min over the run, {} KiB/min after the first window",
        soak["rss_kib_first"],
        soak["rss_kib_last"],
        slope(&soak["rss_kib_per_minute"]),
        slope(&soak["rss_kib_per_minute_after_first_window"]),
    );
}
