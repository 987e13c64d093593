//! Write operations (service_role only). Each runs in a savepoint of the
//! request's transaction, so one refused mutation neither poisons nor undoes
//! the others of the same request.

use async_graphql::{Context, Object};
use entity::SyncErrors;
use sea_orm::DbErr;

use super::OperationContext;
use super::sync_state::SyncState;
use super::validate;
use crate::db::RequestTxn;
use crate::db::sync_states::{self, RecordCounts};
use crate::error::{ApiError, ApiResult};

/// Write operations; they need a `service_role` token.
pub struct Mutation;

impl OperationContext {
    /// Runs `work` in a savepoint: kept if it succeeds, rolled back if not.
    async fn in_savepoint<T>(
        &self,
        resource: &str,
        work: impl AsyncFnOnce(&RequestTxn) -> Result<T, DbErr>,
    ) -> ApiResult<T> {
        let txn = self.db()?.txn().await?;
        txn.in_savepoint(work)
            .await
            .map_err(|error| ApiError::from_db(error, resource))
    }
}

#[Object]
impl Mutation {
    /// Marks a sync of `resource` started (registering the resource if
    /// new). Refused with ALREADY_RUNNING while one runs, unless `force`.
    async fn start_sync(
        &self,
        ctx: &Context<'_>,
        resource: String,
        #[graphql(default_with = "Some(false)")] force: Option<bool>,
    ) -> async_graphql::Result<SyncState> {
        let request = OperationContext::writer(ctx)?;
        validate::resource(&resource)?;
        let row = request
            .in_savepoint(&resource, async |txn| {
                sync_states::start(txn, &resource, force.unwrap_or(false)).await
            })
            .await?;
        Ok(SyncState::new(row, request.now))
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
        let request = OperationContext::writer(ctx)?;
        validate::resource(&resource)?;
        validate::record_counts(records_synced, records_created, records_updated)?;
        let counts = RecordCounts {
            synced: records_synced,
            created: records_created,
            updated: records_updated,
        };
        let row = request
            .in_savepoint(&resource, async |txn| {
                sync_states::complete(txn, &resource, counts).await
            })
            .await?;
        Ok(SyncState::new(row, request.now))
    }

    /// Marks the running sync of `resource` failed with `errors` (at most
    /// 1,000, and 256 KiB as JSON). The watermark stays where it was.
    async fn fail_sync(
        &self,
        ctx: &Context<'_>,
        resource: String,
        errors: Vec<entity::SyncError>,
    ) -> async_graphql::Result<SyncState> {
        let request = OperationContext::writer(ctx)?;
        validate::resource(&resource)?;
        let errors = validate_errors(errors)?;
        let row = request
            .in_savepoint(&resource, async |txn| {
                sync_states::fail(txn, &resource, &errors).await
            })
            .await?;
        Ok(SyncState::new(row, request.now))
    }

    /// Registers a new resource, never run. ALREADY_EXISTS if it is.
    async fn register_resource(
        &self,
        ctx: &Context<'_>,
        resource: String,
    ) -> async_graphql::Result<SyncState> {
        let request = OperationContext::writer(ctx)?;
        validate::resource(&resource)?;
        let row = request
            .in_savepoint(&resource, async |txn| {
                sync_states::register(txn, &resource).await
            })
            .await?;
        Ok(SyncState::new(row, request.now))
    }

    /// Removes a resource and returns its last state. NOT_FOUND if unknown.
    async fn remove_resource(
        &self,
        ctx: &Context<'_>,
        resource: String,
    ) -> async_graphql::Result<SyncState> {
        let request = OperationContext::writer(ctx)?;
        validate::resource(&resource)?;
        let row = request
            .in_savepoint(&resource, async |txn| {
                sync_states::remove(txn, &resource).await
            })
            .await?
            .ok_or_else(|| ApiError::NotFound(resource.clone()))?;
        Ok(SyncState::new(row, request.now))
    }
}

fn validate_errors(errors: Vec<entity::SyncError>) -> ApiResult<SyncErrors> {
    if errors.len() > validate::MAX_ERRORS {
        return Err(ApiError::bad_input(
            "errors",
            format!(
                "at most {} errors may be recorded per sync",
                validate::MAX_ERRORS
            ),
        ));
    }
    if let Some(index) = errors.iter().position(|error| error.code.trim().is_empty()) {
        return Err(ApiError::bad_input(
            "errors",
            format!("errors[{index}].code must not be empty"),
        ));
    }
    let errors = SyncErrors(errors);
    let size = serde_json::to_vec(&errors)
        .map(|json| json.len())
        .unwrap_or(usize::MAX);
    if size > validate::MAX_ERRORS_BYTES {
        return Err(ApiError::bad_input(
            "errors",
            format!(
                "errors take {size} bytes as JSON; at most {} are accepted",
                validate::MAX_ERRORS_BYTES
            ),
        ));
    }
    Ok(errors)
}
