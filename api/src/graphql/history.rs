//! Sync history from the event log: `syncHistory`, `repeatedFailures`,
//! `SyncState.consecutiveFailures`.

use std::collections::HashMap;

use async_graphql::{ID, SimpleObject};
use chrono::{DateTime, Utc};
use entity::vantage_sync_event::Model as EventRow;

use super::subscription::ChangeOperation;
use super::sync_state::SyncState;
use super::types::SyncStatus;
use crate::feed::cursor::Cursor;

/// One committed change, from the event log.
#[derive(SimpleObject)]
pub struct SyncEvent {
    /// The event's id in the log.
    pub id: ID,
    /// The resource that changed.
    pub resource: String,
    /// INSERT, UPDATE or DELETE.
    pub operation: ChangeOperation,
    /// Status after the change; null on DELETE.
    pub status: Option<SyncStatus>,
    /// Status before the change; null on INSERT.
    pub previous_status: Option<SyncStatus>,
    /// The row as the change left it (the removed row on DELETE).
    pub state: Option<SyncState>,
    /// When the change was made.
    pub at: DateTime<Utc>,
}

impl SyncEvent {
    /// From a log row, with derived fields as of `now`.
    pub fn new(row: EventRow, now: DateTime<Utc>) -> Self {
        Self {
            id: ID(row.id.to_string()),
            operation: ChangeOperation::from_log(&row.operation),
            status: row.status,
            previous_status: row.previous_status,
            state: serde_json::from_value(row.state)
                .ok()
                .map(|state| SyncState::new(state, now)),
            at: row.occurred_at.with_timezone(&Utc),
            resource: row.resource,
        }
    }
}

/// An event and where it stands in the log.
#[derive(SimpleObject)]
pub struct SyncEventEdge {
    /// Pass as `after` to read the events after this one.
    pub cursor: String,
    /// The event.
    pub node: SyncEvent,
}

/// Whether there is more to read.
#[derive(SimpleObject)]
pub struct PageInfo {
    /// More events follow this page (at the time of reading).
    pub has_next_page: bool,
    /// Cursor of the last edge; pass it as `after` for the next page.
    pub end_cursor: Option<String>,
}

/// A page of sync history, oldest first.
#[derive(SimpleObject)]
pub struct SyncEventConnection {
    /// The events of this page.
    pub edges: Vec<SyncEventEdge>,
    /// Paging state.
    pub page_info: PageInfo,
}

impl SyncEventConnection {
    /// A page of `first` from `rows` (which may hold one more, telling
    /// whether a next page exists).
    pub fn page(mut rows: Vec<EventRow>, first: usize, now: DateTime<Utc>) -> Self {
        let has_next_page = rows.len() > first;
        rows.truncate(first);
        let edges: Vec<SyncEventEdge> = rows
            .into_iter()
            .map(|row| SyncEventEdge {
                cursor: Cursor::at(row.id).encode(),
                node: SyncEvent::new(row, now),
            })
            .collect();
        let end_cursor = edges.last().map(|edge| edge.cursor.clone());
        Self {
            edges,
            page_info: PageInfo {
                has_next_page,
                end_cursor,
            },
        }
    }
}

/// Failed completions since the last success, by resource.
pub type FailureCounts = HashMap<String, i32>;
