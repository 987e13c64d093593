//! A read replica: a hot standby that queries may read from while it is
//! reachable and its replay is close enough behind the primary.
//!
//! How far behind is measured in the background, never per request: every
//! check the primary's WAL position is noted with the time, and the
//! standby's replay position is read; the lag is how long ago the primary
//! was at the oldest position the standby has not replayed yet (zero when
//! it has replayed everything noted). A standby that cannot be asked, or
//! lags more than the bound, is not used until a check finds it good.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use sea_orm::sqlx::{self, Row};
use tokio::time::Instant;

use super::Pool;
use crate::metrics::{Metrics, ReadTarget};

/// How often the standby's lag is checked.
pub const CHECK_EVERY: Duration = Duration::from_millis(100);
/// Longest one check may wait for either database.
const CHECK_WITHIN: Duration = Duration::from_secs(1);

/// Settings of the read replica (`--read-database-url`,
/// `--read-max-lag-ms`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaSettings {
    /// The hot standby's URL.
    pub url: String,
    /// Queries go to the primary while the standby lags more than this.
    pub max_lag: Duration,
}

impl ReplicaSettings {
    /// The default lag bound.
    pub const DEFAULT_MAX_LAG: Duration = Duration::from_millis(1000);
}

/// The standby, and what the last check found.
#[derive(Debug)]
pub struct ReadReplica {
    pool: Pool,
    usable: AtomicBool,
    lag_ms: AtomicU64,
    metrics: Arc<Metrics>,
}

impl ReadReplica {
    /// Whether queries may read from it now.
    pub fn usable(&self) -> bool {
        self.usable.load(Ordering::Acquire)
    }

    /// The standby's pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Takes it out until the next good check (a query could not begin
    /// on it).
    pub fn set_unusable(&self) {
        self.usable.store(false, Ordering::Release);
    }

    /// Starts checking `standby` against `primary`; the checks end when the
    /// replica is dropped.
    pub fn start(
        primary: Pool,
        standby: Pool,
        max_lag: Duration,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let replica = Arc::new(Self {
            pool: standby,
            usable: AtomicBool::new(false),
            lag_ms: AtomicU64::new(0),
            metrics: metrics.clone(),
        });
        tokio::spawn(check(Arc::downgrade(&replica), primary, max_lag, metrics));
        replica
    }

    /// Counts a query transaction begun on `target`.
    pub fn counted(&self, target: ReadTarget) {
        self.metrics.query_read(target);
    }

    /// The lag the last check measured.
    pub fn lag(&self) -> Duration {
        Duration::from_millis(self.lag_ms.load(Ordering::Relaxed))
    }
}

/// A WAL position (`16/B374D848`) as a number.
fn lsn(text: &str) -> Option<u64> {
    let (high, low) = text.split_once('/')?;
    Some((u64::from_str_radix(high, 16).ok()? << 32) | u64::from_str_radix(low, 16).ok()?)
}

async fn position(pool: &Pool, sql: &'static str) -> Option<u64> {
    let row = tokio::time::timeout(CHECK_WITHIN, sqlx::raw_sql(sql).fetch_one(pool.sqlx()))
        .await
        .ok()?
        .ok()?;
    lsn(&row.try_get::<String, _>(0).ok()?)
}

/// The check loop: every [`CHECK_EVERY`], the primary's position noted and
/// the standby's replay position compared with the positions noted.
async fn check(
    replica: std::sync::Weak<ReadReplica>,
    primary: Pool,
    max_lag: Duration,
    metrics: Arc<Metrics>,
) {
    let mut noted: VecDeque<(Instant, u64)> = VecDeque::new();
    let mut every = tokio::time::interval(CHECK_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_usable = false;
    loop {
        every.tick().await;
        // Gone, or the server closed its pools on the way out.
        let Some(replica) = replica.upgrade() else {
            return;
        };
        if primary.sqlx().is_closed() {
            return;
        }
        let now = Instant::now();
        if let Some(at) = position(&primary, "SELECT pg_current_wal_lsn()::text").await
            && noted.back().is_none_or(|(_, last)| *last < at)
        {
            noted.push_back((now, at));
        }
        let replayed = position(
            replica.pool(),
            "SELECT coalesce(pg_last_wal_replay_lsn(), pg_last_wal_receive_lsn())::text",
        )
        .await;
        let usable = match replayed {
            Some(replayed) => {
                while noted.front().is_some_and(|(_, at)| *at <= replayed) {
                    noted.pop_front();
                }
                let lag = noted
                    .front()
                    .map_or(Duration::ZERO, |(since, _)| now.duration_since(*since));
                replica.lag_ms.store(
                    u64::try_from(lag.as_millis()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
                metrics.replica_lag(lag.as_secs_f64());
                lag <= max_lag
            }
            None => false,
        };
        replica.usable.store(usable, Ordering::Release);
        metrics.replica_usable(usable);
        if usable != was_usable {
            if usable {
                tracing::info!("read replica in use: queries read from it");
            } else {
                tracing::warn!(
                    lag_ms = replica.lag().as_millis() as u64,
                    reachable = replayed.is_some(),
                    "read replica not in use (unreachable, or lagging more than READ_MAX_LAG_MS): queries read from the primary"
                );
            }
            was_usable = usable;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::lsn;

    #[test]
    fn wal_positions_compare_as_numbers() {
        assert_eq!(lsn("0/0"), Some(0));
        assert_eq!(lsn("16/B374D848"), Some((0x16 << 32) | 0xB374_D848));
        assert!(lsn("1/FFFFFFFF") < lsn("2/0"));
        assert_eq!(lsn("nonsense"), None);
    }
}
