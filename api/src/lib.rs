//! The Vantage sync state service: its GraphQL API, HTTP server and CLI.

pub mod auth;
pub mod cli;
pub mod config;
pub mod db;
pub mod error;
mod feed;
pub mod graphql;
pub mod managed_postgres;
mod metrics;
pub mod migrate;
pub mod server;
mod transport;

pub use transport::cors;
