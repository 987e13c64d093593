//! Run trends from the event log: `syncTrend` and `syncTrends`, each
//! resource's recent runs, their durations and success rate.

use async_graphql::{Enum, SimpleObject};
use chrono::{DateTime, Utc};

use crate::db::events::RunRow;

/// How a run ended.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncRunStatus {
    /// Completed.
    Success,
    /// Failed.
    Failed,
    /// Started again (forced) while it ran: it never finished.
    Abandoned,
}

/// One run of a sync: a start and the completion, failure or forced
/// restart that ended it.
#[derive(SimpleObject, Debug, Clone, PartialEq)]
pub struct SyncRun {
    /// When the run started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it completed or failed (for ABANDONED: when it was restarted).
    pub completed_at: Option<DateTime<Utc>>,
    /// How it ended.
    pub status: SyncRunStatus,
    /// How long it took; null for ABANDONED.
    pub duration_ms: Option<i32>,
    /// Records synced; null unless SUCCESS.
    pub records_synced: Option<i32>,
    /// Errors it recorded (FAILED only; otherwise 0).
    pub error_count: i32,
}

/// A resource's recent runs and what they add up to.
#[derive(SimpleObject, Debug, Clone, PartialEq)]
pub struct SyncTrend {
    /// The resource.
    pub resource: String,
    /// Its newest runs, newest first.
    pub runs: Vec<SyncRun>,
    /// Share of `runs` that succeeded (0 to 1); null without runs. Abandoned
    /// runs count as not successful.
    pub success_rate: Option<f64>,
    /// Median duration of the successful `runs`, in ms.
    pub p50_duration_ms: Option<i32>,
    /// 95th percentile duration of the successful `runs`, in ms.
    pub p95_duration_ms: Option<i32>,
}

impl SyncTrend {
    /// Trends from the runs read in one go (ordered by resource, newest
    /// first; a resource without runs has one row with no run fields).
    pub fn from_rows(rows: Vec<RunRow>) -> Vec<SyncTrend> {
        let mut trends: Vec<SyncTrend> = Vec::new();
        for row in rows {
            let run = run(&row);
            let same = trends
                .last()
                .is_some_and(|last| last.resource == row.resource);
            if !same {
                trends.push(SyncTrend {
                    resource: row.resource,
                    runs: Vec::new(),
                    success_rate: None,
                    p50_duration_ms: None,
                    p95_duration_ms: None,
                });
            }
            if let (Some(run), Some(trend)) = (run, trends.last_mut()) {
                trend.runs.push(run);
            }
        }
        for trend in &mut trends {
            trend.summarise();
        }
        trends
    }

    fn summarise(&mut self) {
        let runs = self.runs.len();
        let mut durations: Vec<i32> = self
            .runs
            .iter()
            .filter(|run| run.status == SyncRunStatus::Success)
            .filter_map(|run| run.duration_ms)
            .collect();
        let successes = self
            .runs
            .iter()
            .filter(|run| run.status == SyncRunStatus::Success)
            .count();
        self.success_rate = (runs > 0).then(|| successes as f64 / runs as f64);
        durations.sort_unstable();
        self.p50_duration_ms = nearest_rank(&durations, 50);
        self.p95_duration_ms = nearest_rank(&durations, 95);
    }
}

/// The nearest-rank percentile of sorted `values`: the smallest value with
/// at least `percent`% of the values at or below it.
fn nearest_rank(values: &[i32], percent: usize) -> Option<i32> {
    let rank = (values.len() * percent).div_ceil(100).max(1);
    values.get(rank - 1).copied()
}

fn run(row: &RunRow) -> Option<SyncRun> {
    let status = match row.status.as_deref()? {
        "SUCCESS" => SyncRunStatus::Success,
        "FAILED" => SyncRunStatus::Failed,
        _ => SyncRunStatus::Abandoned,
    };
    Some(SyncRun {
        started_at: row.started_at.map(|at| at.with_timezone(&Utc)),
        completed_at: row.completed_at.map(|at| at.with_timezone(&Utc)),
        status,
        duration_ms: row.duration_ms,
        records_synced: row.records_synced,
        error_count: row.error_count.unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        assert_eq!(nearest_rank(&[], 50), None);
        assert_eq!(nearest_rank(&[7], 95), Some(7));
        let values: Vec<i32> = (1..=20).collect();
        assert_eq!(nearest_rank(&values, 50), Some(10));
        assert_eq!(nearest_rank(&values, 95), Some(19));
        assert_eq!(nearest_rank(&[1, 2, 3], 50), Some(2));
        assert_eq!(nearest_rank(&[1, 2, 3], 95), Some(3));
    }
}
