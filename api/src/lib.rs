//! The Vantage sync state service: its GraphQL API, HTTP server and CLI.

pub mod auth;
pub mod cli;
pub mod config;
pub mod cors;
pub mod db;
pub mod error;
pub mod feed;
pub mod graphql;
pub mod http;
pub mod managed_postgres;
pub mod metrics;
pub mod migrate;
pub mod server;
pub mod ws;
