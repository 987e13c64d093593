//! The Vantage sync state service: its GraphQL API, HTTP server and CLI.

pub mod cli;
pub mod db;
pub mod migrate;
