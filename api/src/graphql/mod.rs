//! The GraphQL schema of SPEC section 3, by domain.

pub mod documents;
pub mod history;
pub mod mutation;
pub mod plain;
pub mod query;
pub mod subscription;
pub mod sync_state;
pub mod types;
pub mod validate;

use std::sync::Arc;

use async_graphql::{Context, Schema, SchemaBuilder};
use chrono::{DateTime, Utc};

use crate::auth::Caller;
use crate::db::RequestDb;
use crate::error::ApiError;

pub use mutation::Mutation;
pub use query::Query;
pub use subscription::Subscription;

/// The service's schema.
pub type AppSchema = Schema<Query, Mutation, Subscription>;

/// Limits on what one operation may ask for.
#[derive(Debug, Clone, Copy)]
pub struct QueryLimits {
    /// Deepest selection nesting (introspection needs about 13).
    pub depth: usize,
    /// Most fields (weighted) one operation may select.
    pub complexity: usize,
}

impl QueryLimits {
    /// The defaults of `--max-query-depth` and `--max-query-complexity`.
    pub const DEFAULT: Self = Self {
        depth: 16,
        complexity: 2_000,
    };
}

/// The schema, with `limits`, ready for data (e.g. the live feed). It has
/// no extensions: `SyncState` resolves its plain fields in one pass
/// ([`plain`]), which an extension watching every resolver would not see.
pub fn builder(limits: QueryLimits) -> SchemaBuilder<Query, Mutation, Subscription> {
    Schema::build(Query, Mutation, Subscription)
        .limit_depth(limits.depth)
        .limit_complexity(limits.complexity)
        .limit_recursive_depth(32)
        .limit_directives(8)
}

/// The schema in SDL, as committed in `schema.graphql`.
pub fn sdl() -> String {
    builder(QueryLimits::DEFAULT).finish().sdl()
}

/// What a resolver knows about its request.
pub struct RequestContext {
    /// Who is calling.
    pub caller: Caller,
    /// The request's clock, so derived fields agree with each other.
    pub now: DateTime<Utc>,
    /// The request's database work.
    pub db: Arc<RequestDb>,
    /// Failure streaks from the event log, read once per request if asked.
    pub failures: tokio::sync::OnceCell<history::FailureCounts>,
}

impl RequestContext {
    /// The request's context, after checking that its caller may read.
    pub fn reader<'a>(ctx: &Context<'a>) -> Result<&'a RequestContext, ApiError> {
        let request = Self::of(ctx)?;
        request.caller.may_read()?;
        Ok(request)
    }

    /// The request's context, after checking that its caller may write.
    pub fn writer<'a>(ctx: &Context<'a>) -> Result<&'a RequestContext, ApiError> {
        let request = Self::of(ctx)?;
        request.caller.may_write()?;
        Ok(request)
    }

    /// Failed completions since the last success, per resource.
    pub async fn failures(&self) -> Result<&history::FailureCounts, ApiError> {
        self.failures
            .get_or_try_init(|| async {
                let txn = self.db.txn().await?;
                crate::db::events::consecutive_failures(&*txn)
                    .await
                    .map_err(|error| ApiError::from_db(error, ""))
            })
            .await
    }

    fn of<'a>(ctx: &Context<'a>) -> Result<&'a RequestContext, ApiError> {
        ctx.data::<RequestContext>()
            .map_err(|_| ApiError::internal("request context missing"))
    }
}
