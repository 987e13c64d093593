//! The Vantage sync state service: its GraphQL API, HTTP server and CLI.

pub mod auth;
pub mod cli;
pub mod db;
pub mod error;
mod feed;
pub mod graphql;
pub mod infra;
pub mod notify;
pub mod server;
mod transport;

pub use feed::cursor::Cursor;
pub use transport::cors;
