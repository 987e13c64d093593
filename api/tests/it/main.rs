//! Integration tests of the Vantage sync state service, against real
//! PostgreSQL: one binary, a fresh database per test.
// Test code throughout, helpers included: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod access;
mod api_auth;
mod api_http;
mod api_mutations;
mod api_queries;
mod auth_keys;
mod board;
mod check;
mod cli;
mod connections;
mod cors;
mod docs;
mod entity;
mod examples;
mod graphql_over_http;
mod graphql_schema;
mod history;
mod idempotency;
mod layers;
mod least_privilege;
mod leaving;
mod live;
mod live_faults;
mod live_groups;
mod log_growth;
mod migrate_command;
mod migration;
mod notify;
mod one_unsafe_call;
mod pooler;
mod rate_limit;
mod read_cost;
mod read_replica;
mod replicas;
mod run_command;
mod server_kill;
mod sse;
mod stalled_reader;
mod state_table;
mod traces;
mod transitions;
mod trends;

mod upgrade;
mod webhooks;
