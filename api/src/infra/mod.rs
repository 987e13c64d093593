//! What the service runs on rather than what it does: its configuration,
//! its metrics, and the PostgreSQL it manages when given no database.

pub mod config;
pub mod managed_postgres;
pub(crate) mod metrics;
