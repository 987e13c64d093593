//! The soak's report: what happened in each time window, and the slope
//! of the server's memory over the run.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::Plan;
use crate::stats;

/// What happened in each window, collected by one task and merged.
#[derive(Default, Clone)]
pub(super) struct Window {
    pub(super) queries: Vec<Duration>,
    pub(super) mutations: Vec<Duration>,
    /// Commit-to-receipt of events delivered live (not replayed on resume).
    pub(super) deliveries: Vec<f32>,
    pub(super) errors: u64,
    pub(super) resumes: u64,
    pub(super) attacks_closed: u64,
    pub(super) attack_hold_max: Duration,
    pub(super) missed: u64,
}

impl Window {
    pub(super) fn merge(&mut self, other: Window) {
        self.queries.extend(other.queries);
        self.mutations.extend(other.mutations);
        self.deliveries.extend(other.deliveries);
        self.errors += other.errors;
        self.resumes += other.resumes;
        self.attacks_closed += other.attacks_closed;
        self.attack_hold_max = self.attack_hold_max.max(other.attack_hold_max);
        self.missed += other.missed;
    }
}

/// The run's windows, by the time something happened.
#[derive(Clone)]
pub(super) struct Windows {
    pub(super) started: Instant,
    pub(super) started_wall: f64,
    pub(super) length: Duration,
    pub(super) windows: Vec<Window>,
}

impl Windows {
    pub(super) fn new(started: Instant, started_wall: f64, plan: &Plan) -> Self {
        let count = plan.duration.as_secs_f64() / plan.window.as_secs_f64();
        Self {
            started,
            started_wall,
            length: plan.window,
            windows: vec![Window::default(); count.ceil().max(1.0) as usize],
        }
    }

    /// The window of `at`; what happens after the run (draining) counts
    /// in the last one.
    pub(super) fn at(&mut self, at: Instant) -> &mut Window {
        let index =
            at.saturating_duration_since(self.started).as_secs_f64() / self.length.as_secs_f64();
        self.index(index)
    }

    /// The window of `wall` seconds since the epoch.
    pub(super) fn at_wall(&mut self, wall: f64) -> &mut Window {
        let index = (wall - self.started_wall).max(0.0) / self.length.as_secs_f64();
        self.index(index)
    }

    fn index(&mut self, index: f64) -> &mut Window {
        let last = self.windows.len() - 1;
        &mut self.windows[(index as usize).min(last)]
    }

    pub(super) fn merge(&mut self, other: Windows) {
        for (mine, theirs) in self.windows.iter_mut().zip(other.windows) {
            mine.merge(theirs);
        }
    }
}
/// Least-squares slope of RSS over time, in KiB per minute.
fn slope(samples: &[(f64, u64)]) -> Option<f64> {
    if samples.len() < 2 {
        return None;
    }
    let n = samples.len() as f64;
    let mean_t = samples.iter().map(|(t, _)| t).sum::<f64>() / n;
    let mean_r = samples.iter().map(|(_, r)| *r as f64).sum::<f64>() / n;
    let covariance: f64 = samples
        .iter()
        .map(|(t, r)| (t - mean_t) * (*r as f64 - mean_r))
        .sum();
    let variance: f64 = samples.iter().map(|(t, _)| (t - mean_t).powi(2)).sum();
    (variance > 0.0).then(|| covariance / variance * 60.0)
}

pub(super) fn report(
    plan: &Plan,
    windows: Windows,
    samples: &[(f64, Option<u64>, Option<u64>)],
    totals: Value,
) -> Value {
    let length = plan.window.as_secs_f64();
    let mut rows = Vec::new();
    let (mut requests, mut errors, mut missed) = (0, 0, 0);
    for (index, mut window) in windows.windows.into_iter().enumerate() {
        let (from, to) = (index as f64 * length, (index + 1) as f64 * length);
        let inside: Vec<_> = samples
            .iter()
            .filter(|(t, _, _)| *t >= from && *t < to)
            .collect();
        let rss = inside.iter().rev().find_map(|(_, rss, _)| *rss);
        let fds = inside.iter().filter_map(|(_, _, fds)| *fds).max();
        let mut deliveries: Vec<Duration> = window
            .deliveries
            .iter()
            .map(|ms| Duration::from_secs_f64(f64::from(ms.max(0.0)) / 1000.0))
            .collect();
        requests += window.queries.len() + window.mutations.len();
        errors += window.errors;
        missed += window.missed;
        rows.push(json!({
            "from_s": from,
            "to_s": to,
            "queries": window.queries.len(),
            "query_p99_ms": stats::summary(&mut window.queries)["p99"],
            "mutations": window.mutations.len(),
            "mutation_p99_ms": stats::summary(&mut window.mutations)["p99"],
            "deliveries_live": deliveries.len(),
            "delivery_p99_ms": stats::summary(&mut deliveries)["p99"],
            "errors": window.errors,
            "missed": window.missed,
            "resumes": window.resumes,
            "attacks_closed": window.attacks_closed,
            "attack_hold_max_s": window.attack_hold_max.as_secs_f64(),
            "rss_kib": rss,
            "open_fds_max": fds,
        }));
    }
    let rss: Vec<(f64, u64)> = samples
        .iter()
        .filter_map(|(t, rss, _)| Some((*t, (*rss)?)))
        .collect();
    let warm: Vec<(f64, u64)> = rss.iter().copied().filter(|(t, _)| *t >= length).collect();
    let mut totals = totals;
    totals["requests"] = json!(requests);
    totals["errors"] = json!(errors);
    totals["missed"] = json!(missed);
    let (lost, duplicates) = (totals["lost"].clone(), totals["duplicates"].clone());
    json!({
        "seconds": plan.duration.as_secs_f64(),
        "window_seconds": length,
        "query_rate": plan.query_rate,
        "mutation_rate": plan.mutation_rate,
        "subscribers": plan.subscribers,
        "attackers": plan.attackers,
        "windows": rows,
        "totals": totals,
        "rss_kib_first": rss.first().map(|(_, rss)| rss),
        "rss_kib_last": rss.last().map(|(_, rss)| rss),
        "rss_kib_per_minute": slope(&rss),
        // Without the first window, where pools, caches and buffers fill.
        "rss_kib_per_minute_after_first_window": slope(&warm),
        "missed": missed,
        "errors": errors,
        "lost": lost,
        "duplicates": duplicates,
    })
}

#[cfg(test)]
mod tests {
    use super::slope;

    #[test]
    fn slope_is_kib_per_minute() {
        assert_eq!(slope(&[(0.0, 1000)]), None);
        let rising: Vec<(f64, u64)> = (0..60)
            .map(|s| (f64::from(s), 1000 + 2 * s as u64))
            .collect();
        assert!((slope(&rising).unwrap() - 120.0).abs() < 1e-9);
        let flat: Vec<(f64, u64)> = (0..60).map(|s| (f64::from(s), 5000)).collect();
        assert_eq!(slope(&flat), Some(0.0));
    }
}
