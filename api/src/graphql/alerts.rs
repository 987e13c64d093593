//! `alerts`: the seed's four alerts as state, firing and resolved, as the
//! database records them (the alerts migration). The status board's
//! banner reads the same query.

use async_graphql::{Context, Enum, Object, SimpleObject};
use chrono::{DateTime, Utc};
use entity::vantage_sync_alert::Model;

use super::OperationContext;
use crate::db::alerts;

/// One of the seed's four alerts.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertKind {
    /// The last completed sync failed (until one succeeds).
    Failed,
    /// Running for more than 30 minutes.
    Stuck,
    /// No successful sync in the last 24 hours, or never.
    Stale,
    /// Failed 3 or more times in a row.
    Repeated,
}

impl AlertKind {
    fn from_stored(alert: &str) -> Option<Self> {
        match alert {
            "failed" => Some(Self::Failed),
            "stuck" => Some(Self::Stuck),
            "stale" => Some(Self::Stale),
            "repeated" => Some(Self::Repeated),
            _ => None,
        }
    }
}

/// An alert of one resource: firing while its condition holds, resolved
/// once it stops holding.
#[derive(SimpleObject, Debug, Clone)]
pub struct Alert {
    /// Which alert.
    pub alert: AlertKind,
    /// The resource it concerns.
    pub resource: String,
    /// When its condition started to hold (as the event log or the timer
    /// saw it).
    pub firing_since: DateTime<Utc>,
    /// When it stopped holding; null while firing.
    pub resolved_at: Option<DateTime<Utc>>,
}

impl Alert {
    fn from_row(row: Model) -> Option<Self> {
        Some(Self {
            alert: AlertKind::from_stored(&row.alert)?,
            resource: row.resource,
            firing_since: row.firing_since.with_timezone(&Utc),
            resolved_at: row.resolved_at.map(|at| at.with_timezone(&Utc)),
        })
    }
}

/// The alerts query.
#[derive(Default)]
pub struct AlertQuery;

#[Object]
impl AlertQuery {
    /// Alerts firing now (the default), the newest 1,000 resolved ones
    /// (`firing: false`), or both (`firing: null`). Firing alerts come
    /// oldest first; resolved ones newest first.
    async fn alerts(
        &self,
        ctx: &Context<'_>,
        #[graphql(default_with = "Some(true)")] firing: Option<bool>,
    ) -> async_graphql::Result<Vec<Alert>> {
        let request = OperationContext::reader(ctx)?;
        let rows = request
            .read_once(ctx, "", async |txn| alerts::list(txn, firing).await)
            .await?;
        Ok(rows.into_iter().filter_map(Alert::from_row).collect())
    }
}
