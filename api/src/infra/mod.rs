//! What the service runs on rather than what it does: its configuration,
//! its metrics, its rate limit, and the PostgreSQL it manages when given
//! no database.

pub mod config;
pub mod managed_postgres;
pub(crate) mod metrics;
pub mod rate_limit;
