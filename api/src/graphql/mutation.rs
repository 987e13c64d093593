//! Write operations (service_role only). Each runs in a savepoint of the
//! request's transaction, so one refused mutation neither poisons nor undoes
//! the others of the same request.

use async_graphql::{Context, Object};
use entity::vantage_sync_state::Model;
use sea_orm::DbErr;

use super::OperationContext;
use super::sync_state::SyncState;
use super::validate;
use crate::db::RequestTxn;
use crate::db::sync_states::{self, RecordCounts};
use crate::error::{ApiError, ApiResult};

/// Write operations; they need a `service_role` token.
#[derive(Default)]
pub struct SyncMutation;

/// How strict writes are (`--require-registered-resources`), given to the
/// schema as data.
#[derive(Debug, Clone, Copy, Default)]
pub struct WriteRules {
    /// `startSync` only for resources registered before (with
    /// `registerResource`), so a misspelt name in a job's configuration
    /// is refused instead of creating a resource.
    pub require_registered_resources: bool,
}

/// The shape every mutation shares: a writer's request, a valid resource
/// name, the work in a savepoint of the request transaction (kept if it
/// succeeds, rolled back if not), and the row it leaves as the answer.
/// `input` is the mutation's other arguments, checked; its refusal is
/// reported only after the caller's role and the resource name, so a
/// reader learns nothing about which inputs would pass.
async fn write<I>(
    ctx: &Context<'_>,
    resource: &str,
    input: ApiResult<I>,
    work: impl AsyncFnOnce(&RequestTxn, I) -> Result<Option<Model>, DbErr>,
) -> async_graphql::Result<SyncState> {
    let request = OperationContext::writer(ctx)?;
    validate::resource(resource)?;
    let input = input?;
    let row = request
        .read(resource, async |txn| {
            txn.in_savepoint(async |txn| work(txn, input).await).await
        })
        .await?
        .ok_or_else(|| ApiError::NotFound(resource.to_owned()))?;
    Ok(SyncState::new(row, request.now))
}

#[Object]
impl SyncMutation {
    /// Marks a sync of `resource` started (registering the resource if
    /// new). Refused with ALREADY_RUNNING while one runs, unless `force`.
    /// On a server that requires registered resources, an unknown name is
    /// refused with UNKNOWN_RESOURCE and nothing is created.
    async fn start_sync(
        &self,
        ctx: &Context<'_>,
        resource: String,
        #[graphql(default_with = "Some(false)")] force: Option<bool>,
    ) -> async_graphql::Result<SyncState> {
        let rules = ctx.data_opt::<WriteRules>().copied().unwrap_or_default();
        if rules.require_registered_resources {
            // The caller and the name are checked first, as `write` does,
            // so a reader learns nothing about which resources exist.
            let request = OperationContext::writer(ctx)?;
            validate::resource(&resource)?;
            let known = request
                .read(&resource, async |txn| {
                    sync_states::find(txn, &resource).await
                })
                .await?;
            if known.is_none() {
                return Err(ApiError::UnknownResource(resource).into());
            }
        }
        write(ctx, &resource, Ok(()), async |txn, ()| {
            sync_states::start(txn, &resource, force.unwrap_or(false))
                .await
                .map(Some)
        })
        .await
    }

    /// Marks the running sync of `resource` successful with its counts
    /// (`recordsCreated + recordsUpdated <= recordsSynced`). Moves the
    /// watermark and clears the errors.
    async fn complete_sync(
        &self,
        ctx: &Context<'_>,
        resource: String,
        records_synced: i32,
        records_created: i32,
        records_updated: i32,
    ) -> async_graphql::Result<SyncState> {
        let counts =
            validate::record_counts(records_synced, records_created, records_updated).map(|()| {
                RecordCounts {
                    synced: records_synced,
                    created: records_created,
                    updated: records_updated,
                }
            });
        write(ctx, &resource, counts, async |txn, counts| {
            sync_states::complete(txn, &resource, counts)
                .await
                .map(Some)
        })
        .await
    }

    /// Marks the running sync of `resource` failed with `errors` (at most
    /// 1,000, and 256 KiB as JSON). The watermark stays where it was.
    async fn fail_sync(
        &self,
        ctx: &Context<'_>,
        resource: String,
        errors: Vec<entity::SyncError>,
    ) -> async_graphql::Result<SyncState> {
        let errors = validate::errors(errors);
        write(ctx, &resource, errors, async |txn, errors| {
            sync_states::fail(txn, &resource, &errors).await.map(Some)
        })
        .await
    }

    /// Registers a new resource, never run. ALREADY_EXISTS if it is.
    async fn register_resource(
        &self,
        ctx: &Context<'_>,
        resource: String,
    ) -> async_graphql::Result<SyncState> {
        write(ctx, &resource, Ok(()), async |txn, ()| {
            sync_states::register(txn, &resource).await.map(Some)
        })
        .await
    }

    /// Removes a resource and returns its last state. NOT_FOUND if unknown.
    async fn remove_resource(
        &self,
        ctx: &Context<'_>,
        resource: String,
    ) -> async_graphql::Result<SyncState> {
        write(ctx, &resource, Ok(()), async |txn, ()| {
            sync_states::remove(txn, &resource).await
        })
        .await
    }
}
