//! The Vantage sync state service: its GraphQL API, HTTP server and CLI.
//!
//! Modules are layered; each imports only modules of the layers below it
//! (`docs/ARCHITECTURE.md` draws the graph, and a test checks it):
//!
//! 1. `error`, `metrics`, `derived`: what every layer above speaks in;
//!    `prefetch`: asking the processor for memory ahead of reading it.
//! 2. `db`: the pool and the per-request transaction, run as a role given
//!    as data; `managed_postgres`: the PostgreSQL of a zero-config start;
//!    `telemetry`: the log subscriber and the OTLP trace exporter.
//! 3. `auth` (tokens to callers), `feed` (the event log, live), then
//!    `webhooks` (alerts delivered), then `graphql` (the schema).
//! 4. `transport`: HTTP, SSE and WebSocket around one request path.
//! 5. `server` (assembles and serves), `check` (the start-up checks,
//!    without serving), `run` (an ETL job recorded as a sync), `config`
//!    (flags into settings), `cli` (the binary's commands).

pub mod derived;
pub mod error;
pub mod metrics;
pub mod prefetch;

pub mod db;
pub mod managed_postgres;
pub mod telemetry;

pub mod auth;
pub mod feed;
pub mod graphql;
pub mod webhooks;

pub mod transport;

pub mod check;
pub mod cli;
pub mod config;
pub mod run;
pub mod server;

pub use feed::cursor::Cursor;
pub use transport::cors;
