//! `alerts`: the four alerts (failed, stuck, stale, repeated) as state,
//! firing and resolved, as the
//! database records them (the alerts migration). The status board's
//! banner reads the same query.

use async_graphql::{Context, Object, SimpleObject};
use chrono::{DateTime, Utc};
pub use entity::vantage_sync_alert::AlertKind;
use entity::vantage_sync_alert::Model;

use super::OperationContext;
use crate::db::alerts;

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

impl From<Model> for Alert {
    fn from(row: Model) -> Self {
        Self {
            alert: row.alert,
            resource: row.resource,
            firing_since: row.firing_since.with_timezone(&Utc),
            resolved_at: row.resolved_at.map(|at| at.with_timezone(&Utc)),
        }
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
        Ok(rows.into_iter().map(Alert::from).collect())
    }
}
