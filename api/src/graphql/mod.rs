//! The GraphQL schema, by domain: sync state queries and mutations,
//! history and trends, the live subscription, alerts and webhooks.

pub mod alerts;
pub mod cost;
pub mod documents;
pub mod history;
pub mod in_memory;
pub mod live;
pub mod mutation;
pub mod parsed_queries;
pub mod query;
pub mod subscription;
pub mod sync_state;
pub mod trend;
pub mod types;
pub mod validate;
pub mod webhooks;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use async_graphql::{Context, MergedObject, Schema, SchemaBuilder};
use chrono::{DateTime, Utc};

use crate::auth::Caller;
use crate::db::{Access, RequestDb, RequestTxn};
use crate::error::ApiError;
use live::LiveGroups;

pub use subscription::Subscription;

/// Read operations; they need an `authenticated` or `service_role` token
/// (webhooks: `service_role`).
#[derive(MergedObject, Default)]
#[graphql(name = "Query")]
pub struct Query(query::SyncQuery, alerts::AlertQuery, webhooks::WebhookQuery);

/// Write operations; they need a `service_role` token. Sent over HTTP
/// with an `Idempotency-Key` header, a mutation retried with the same key
/// within 24 hours gets its first answer again and is not applied twice;
/// the key sent with a different request is refused with
/// IDEMPOTENCY_KEY_REUSED.
#[derive(MergedObject, Default)]
#[graphql(name = "Mutation")]
pub struct Mutation(mutation::SyncMutation, webhooks::WebhookMutation);

/// The service's schema.
pub type AppSchema = Schema<Query, Mutation, Subscription>;

/// Limits on what one operation may ask for.
#[derive(Debug, Clone, Copy)]
pub struct QueryLimits {
    /// Deepest selection nesting (introspection needs about 13).
    pub depth: usize,
    /// Most fields (weighted) one operation may select.
    pub complexity: usize,
    /// Most database reads one request may make ([`cost`]).
    pub db_reads: usize,
}

impl QueryLimits {
    /// The defaults of `--max-query-depth` and `--max-query-complexity`.
    pub const DEFAULT: Self = Self {
        depth: 16,
        complexity: 2_000,
        db_reads: 16,
    };
}

/// The schema, with `limits`, ready for data (e.g. the live feed). It has
/// no extensions: `SyncState` resolves its plain fields in one pass
/// ([`plain`]), which an extension watching every resolver would not see.
pub fn builder(limits: QueryLimits) -> SchemaBuilder<Query, Mutation, Subscription> {
    Schema::build(Query::default(), Mutation::default(), Subscription)
        .limit_depth(limits.depth)
        .limit_complexity(limits.complexity)
        .limit_recursive_depth(32)
        .limit_directives(8)
}

/// The schema in SDL, as committed in `schema.graphql`.
pub fn sdl() -> String {
    builder(QueryLimits::DEFAULT).finish().sdl()
}

/// What every GraphQL operation knows, whichever transport brought it
/// (HTTP builds one per request, a WebSocket one per connection): who is
/// calling, the request's clock, and how it reaches the database.
pub struct OperationContext {
    /// Who is calling.
    pub caller: Caller,
    /// The request's clock, so derived fields agree with each other (a
    /// subscription's changes each carry their own).
    pub now: DateTime<Utc>,
    db: OperationDb,
}

/// How an operation reaches the database.
enum OperationDb {
    /// A query or mutation: one transaction for the whole request, and the
    /// failure streaks from the event log, read once if asked.
    Request {
        db: Arc<RequestDb>,
        failures: tokio::sync::OnceCell<history::FailureCounts>,
        /// Query root fields read so far, by name and arguments.
        reads: std::sync::Mutex<HashMap<String, Arc<ReadOnce>>>,
    },
    /// A live connection's subscriptions: a short transaction per read,
    /// since the connection lives for hours. An SSE stream also shares
    /// its event ids with the transport.
    PerRead {
        live: Arc<LiveGroups>,
        sse_resume: Option<Arc<SseResume>>,
    },
}

/// One query root field's read, shared by its repeats in a request.
type ReadOnce = tokio::sync::OnceCell<Arc<dyn std::any::Any + Send + Sync>>;

/// The resume state an SSE stream and its subscription share: the cursor it
/// resumes after (the request's `Last-Event-ID`) and the cursor of the
/// change last sent (which the transport writes as that event's `id`).
#[derive(Debug, Default)]
pub struct SseResume {
    resume_after: Option<String>,
    last: std::sync::Mutex<Option<String>>,
}

impl SseResume {
    /// The state of a stream that resumes after `resume_after`, if given.
    pub fn resuming(resume_after: Option<String>) -> Self {
        Self {
            resume_after,
            ..Default::default()
        }
    }

    /// The cursor the stream resumes after, if any.
    pub fn resume_after(&self) -> Option<&str> {
        self.resume_after.as_deref()
    }

    /// Records `cursor` as the id of the change about to be sent.
    pub fn sent(&self, cursor: &str) {
        *self.lock() = Some(cursor.to_owned());
    }

    /// The id of the change last sent, taken (each is written once).
    pub fn take(&self) -> Option<String> {
        self.lock().take()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        // A single assignment: a panic cannot leave it half-written.
        self.last
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

impl OperationContext {
    /// A query or mutation of `caller`, working in `db`.
    pub fn request(caller: Caller, db: Arc<RequestDb>) -> Self {
        Self {
            caller,
            now: Utc::now(),
            db: OperationDb::Request {
                db,
                failures: Default::default(),
                reads: Default::default(),
            },
        }
    }

    /// A live operation of `caller`, in the groups of `live`; an SSE
    /// stream passes its `sse_resume`.
    pub fn subscriptions(
        caller: Caller,
        live: Arc<LiveGroups>,
        sse_resume: Option<Arc<SseResume>>,
    ) -> Self {
        Self {
            caller,
            now: Utc::now(),
            db: OperationDb::PerRead { live, sse_resume },
        }
    }

    /// The operation's context, after checking that its caller may read.
    pub fn reader<'a>(ctx: &Context<'a>) -> Result<&'a OperationContext, ApiError> {
        let operation = Self::of(ctx)?;
        operation.caller.may_read()?;
        Ok(operation)
    }

    /// The operation's context, after checking that its caller may manage
    /// webhooks.
    pub fn webhook_admin<'a>(ctx: &Context<'a>) -> Result<&'a OperationContext, ApiError> {
        let operation = Self::of(ctx)?;
        operation.caller.may_manage_webhooks()?;
        Ok(operation)
    }

    /// The operation's context, after checking that its caller may write.
    pub fn writer<'a>(ctx: &Context<'a>) -> Result<&'a OperationContext, ApiError> {
        let operation = Self::of(ctx)?;
        operation.caller.may_write()?;
        Ok(operation)
    }

    /// The request's transaction: queries and mutations come over HTTP.
    pub fn db(&self) -> Result<&RequestDb, ApiError> {
        match &self.db {
            OperationDb::Request { db, .. } => Ok(db),
            OperationDb::PerRead { .. } => Err(ApiError::BadUserInput {
                message:
                    "send queries and mutations over HTTP; the WebSocket carries subscriptions"
                        .into(),
                field: None,
            }),
        }
    }

    /// Runs `work` in the request transaction; a database error is reported
    /// as concerning `resource` (empty when the read spans resources).
    pub async fn read<T>(
        &self,
        resource: &str,
        work: impl AsyncFnOnce(&RequestTxn) -> Result<T, sea_orm::DbErr>,
    ) -> Result<T, ApiError> {
        let txn = self.db()?.txn().await?;
        work(&txn)
            .await
            .map_err(|error| ApiError::from_db(error, resource))
    }

    /// [`Self::read`] for a query's root field, once per request however
    /// often the field appears with the same arguments (under aliases):
    /// the repeats share the first one's result, so a request's cost is
    /// its distinct reads.
    pub async fn read_once<T: Clone + Send + Sync + 'static>(
        &self,
        ctx: &Context<'_>,
        resource: &str,
        work: impl AsyncFnOnce(&RequestTxn) -> Result<T, sea_orm::DbErr>,
    ) -> Result<T, ApiError> {
        let OperationDb::Request { reads, .. } = &self.db else {
            return self.read(resource, work).await;
        };
        let field = ctx.field();
        let key = format!(
            "{}{:?}",
            field.name(),
            field.arguments().unwrap_or_default()
        );
        let cell = reads
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .entry(key)
            .or_default()
            .clone();
        let value = cell
            .get_or_try_init(|| async {
                let value = self.read(resource, work).await?;
                Ok::<_, ApiError>(Arc::new(value) as Arc<dyn std::any::Any + Send + Sync>)
            })
            .await?;
        value
            .downcast_ref::<T>()
            .cloned()
            .ok_or_else(|| ApiError::internal("a root field read as two types"))
    }

    /// The groups that live operations join.
    pub fn live(&self) -> Result<&Arc<LiveGroups>, ApiError> {
        match &self.db {
            OperationDb::PerRead { live, .. } => Ok(live),
            OperationDb::Request { .. } => Err(ApiError::BadUserInput {
                message: "subscriptions need a WebSocket connection to /graphql".into(),
                field: None,
            }),
        }
    }

    /// The SSE stream's event ids, when the operation runs on one.
    pub fn sse_resume(&self) -> Option<&Arc<SseResume>> {
        match &self.db {
            OperationDb::PerRead { sse_resume, .. } => sse_resume.as_ref(),
            OperationDb::Request { .. } => None,
        }
    }

    /// Failed completions since the last success, per resource: read once
    /// per request, or afresh for each change a subscription sends.
    pub async fn failures(&self) -> Result<Cow<'_, history::FailureCounts>, ApiError> {
        let read = async |txn: &RequestTxn| crate::db::events::consecutive_failures(txn).await;
        match &self.db {
            OperationDb::Request { failures, .. } => failures
                .get_or_try_init(|| self.read("", read))
                .await
                .map(Cow::Borrowed),
            OperationDb::PerRead { live, .. } => live
                .feed()
                .read(&self.caller.identity(), Access::Read, read)
                .await
                .map(Cow::Owned),
        }
    }

    /// Failed completions since the last success of `resource`.
    pub async fn consecutive_failures(&self, resource: &str) -> Result<i32, ApiError> {
        Ok(self.failures().await?.get(resource).copied().unwrap_or(0))
    }

    fn of<'a>(ctx: &Context<'a>) -> Result<&'a OperationContext, ApiError> {
        ctx.data::<OperationContext>()
            .map_err(|_| ApiError::internal("operation context missing"))
    }
}
