//! The GraphQL schema of SPEC section 3, by domain.

pub mod mutation;
pub mod query;
pub mod sync_state;
pub mod types;
pub mod validate;

use std::sync::Arc;

use async_graphql::{Context, EmptySubscription, Schema};
use chrono::{DateTime, Utc};

use crate::auth::{Caller, Role};
use crate::db::RequestDb;
use crate::error::ApiError;

pub use mutation::Mutation;
pub use query::Query;

/// The service's schema.
pub type AppSchema = Schema<Query, Mutation, EmptySubscription>;

/// Limits on what one operation may ask for.
#[derive(Debug, Clone, Copy)]
pub struct QueryLimits {
    /// Deepest selection nesting (introspection needs about 13).
    pub depth: usize,
    /// Most fields (weighted) one operation may select.
    pub complexity: usize,
}

impl Default for QueryLimits {
    fn default() -> Self {
        Self {
            depth: 16,
            complexity: 2_000,
        }
    }
}

/// Builds the schema with `limits`.
pub fn schema(limits: QueryLimits) -> AppSchema {
    Schema::build(Query, Mutation, EmptySubscription)
        .limit_depth(limits.depth)
        .limit_complexity(limits.complexity)
        .limit_recursive_depth(32)
        .limit_directives(8)
        .finish()
}

/// The schema in SDL, as committed in `schema.graphql`.
pub fn sdl() -> String {
    schema(QueryLimits::default()).sdl()
}

/// What a resolver knows about its request.
pub struct RequestContext {
    /// Who is calling.
    pub caller: Caller,
    /// The request's clock, so derived fields agree with each other.
    pub now: DateTime<Utc>,
    /// The request's database work.
    pub db: Arc<RequestDb>,
}

impl RequestContext {
    /// The request's context, after checking that its caller may read.
    pub fn reader<'a>(ctx: &Context<'a>) -> Result<&'a RequestContext, ApiError> {
        let request = Self::of(ctx)?;
        match request.caller.role {
            Role::Anon => Err(ApiError::Unauthenticated),
            Role::Authenticated | Role::ServiceRole => Ok(request),
        }
    }

    /// The request's context, after checking that its caller may write.
    pub fn writer<'a>(ctx: &Context<'a>) -> Result<&'a RequestContext, ApiError> {
        let request = Self::of(ctx)?;
        match request.caller.role {
            Role::Anon => Err(ApiError::Unauthenticated),
            Role::Authenticated => Err(ApiError::Forbidden {
                role: "authenticated",
                action: "run mutations; they need a service_role token",
            }),
            Role::ServiceRole => Ok(request),
        }
    }

    fn of<'a>(ctx: &Context<'a>) -> Result<&'a RequestContext, ApiError> {
        ctx.data::<RequestContext>()
            .map_err(|_| ApiError::internal("request context missing"))
    }
}
