//! Transports: bytes in, a GraphQL request and its context out, a response
//! (or a stream of them) back to bytes. The schema and the database are
//! the same for every transport (`graphql::OperationContext`).

pub mod board;
pub mod cors;
pub mod graphiql;
pub mod http;
pub mod sse;
pub mod ws;
