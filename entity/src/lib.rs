//! Data shapes of the Vantage sync state service: the sea-orm entities and
//! the typed values stored in their columns. No behaviour lives here; the
//! state machine is in the database functions of the `migration` crate.

pub mod sync_error;
pub mod vantage_sync_alert;
pub mod vantage_sync_event;
pub mod vantage_sync_state;
pub mod vantage_sync_webhook;
pub mod vantage_sync_webhook_delivery;

pub use sync_error::{SyncError, SyncErrors};
pub use vantage_sync_state::SyncStatus;
