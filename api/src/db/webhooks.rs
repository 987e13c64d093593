//! Webhooks, their outbox and delivery log. Every write calls a database
//! function of the alerts migration (the leases, back-off and disabling
//! rules live there); reads go through the entities.

use std::time::Duration;

use entity::vantage_sync_alert::AlertKind;
use entity::vantage_sync_webhook::{
    self as webhook, Entity as Webhooks, Model as Webhook, WebhookFormat,
};
use entity::vantage_sync_webhook_delivery::{
    self as delivery, Entity as Deliveries, Model as Delivery,
};
use sea_orm::prelude::{DateTimeWithTimeZone, Uuid};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, DbErr, EntityTrait, FromQueryResult, QueryFilter,
    QueryOrder, QuerySelect, Statement,
};

/// What a new webhook is given.
#[derive(Debug, Clone)]
pub struct NewWebhook {
    /// Where to POST.
    pub url: String,
    /// Notification types, as stored (`alert.firing`, ...).
    pub events: Vec<String>,
    /// Only these resources; `None`: all.
    pub resources: Option<Vec<String>>,
    /// How deliveries are written.
    pub format: WebhookFormat,
    /// The signing secret (`whsec_...`).
    pub secret: String,
}

/// Creates a webhook with its secret.
pub async fn create(db: &impl ConnectionTrait, new: NewWebhook) -> Result<Webhook, DbErr> {
    Webhooks::find()
        .from_raw_sql(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT * FROM public.create_vantage_webhook($1, $2, $3, $4, $5)",
            [
                new.url.into(),
                new.events.into(),
                new.resources.into(),
                new.format.into(),
                new.secret.into(),
            ],
        ))
        .one(db)
        .await?
        .ok_or_else(|| DbErr::RecordNotFound("create_vantage_webhook returned no row".into()))
}

/// Deletes a webhook with its outbox and log; `None` if there is none.
pub async fn delete(db: &impl ConnectionTrait, id: Uuid) -> Result<Option<Webhook>, DbErr> {
    let row = Webhooks::find()
        .from_raw_sql(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT * FROM public.delete_vantage_webhook($1) WHERE id IS NOT NULL",
            [id.into()],
        ))
        .one(db)
        .await?;
    Ok(row)
}

/// Every webhook, oldest first.
pub async fn list(db: &impl ConnectionTrait) -> Result<Vec<Webhook>, DbErr> {
    Webhooks::find()
        .order_by_asc(webhook::Column::CreatedAt)
        .order_by_asc(webhook::Column::Id)
        .all(db)
        .await
}

/// One webhook.
pub async fn find(db: &impl ConnectionTrait, id: Uuid) -> Result<Option<Webhook>, DbErr> {
    Webhooks::find_by_id(id).one(db).await
}

/// Queues a `ping` for webhook `id`; its notification id, `None` if there
/// is no such webhook.
pub async fn ping(db: &impl ConnectionTrait, id: Uuid) -> Result<Option<i64>, DbErr> {
    #[derive(FromQueryResult)]
    struct Queued {
        id: Option<i64>,
    }
    let queued = Queued::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT public.ping_vantage_webhook($1) AS id",
        [id.into()],
    ))
    .one(db)
    .await?;
    Ok(queued.and_then(|queued| queued.id))
}

/// Delivery attempts of webhook `id` after attempt `after`, oldest first.
pub async fn deliveries(
    db: &impl ConnectionTrait,
    id: Uuid,
    after: i64,
    limit: u64,
) -> Result<Vec<Delivery>, DbErr> {
    Deliveries::find()
        .filter(delivery::Column::WebhookId.eq(id))
        .filter(delivery::Column::Id.gt(after))
        .order_by_asc(delivery::Column::Id)
        .limit(limit)
        .all(db)
        .await
}

/// One notification to send, leased to this replica.
#[derive(Debug, Clone, FromQueryResult)]
pub struct Claim {
    /// The webhook.
    pub webhook_id: Uuid,
    /// The lease that proves this replica holds it.
    pub lease: Uuid,
    /// Where to POST.
    pub url: String,
    /// How deliveries are written.
    pub format: WebhookFormat,
    /// Its signing secret.
    pub secret: String,
    /// Which attempt this is for the notification (1 for the first).
    pub attempt: i32,
    /// The notification: its id (the event id sent).
    pub notification_id: i64,
    /// `alert.firing`, `sync.failed`, `ping`, ...
    pub kind: String,
    /// The alert, for alert notifications.
    pub alert: Option<AlertKind>,
    /// The resource, except for pings.
    pub resource: Option<String>,
    /// When it happened.
    pub at: DateTimeWithTimeZone,
    /// The row as it was then (snake_case JSON); `None` once removed.
    pub state: Option<serde_json::Value>,
}

/// Leases up to `limit` webhooks with a due notification for `lease`, and
/// returns each one's oldest `per_webhook`, by webhook, in order.
pub async fn claim(
    db: &impl ConnectionTrait,
    limit: i32,
    lease: Duration,
    per_webhook: i32,
) -> Result<Vec<Claim>, DbErr> {
    Claim::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT webhook_id, lease, url, format, secret, attempt, notification_id, \
         type AS kind, alert, resource, at, state \
         FROM public.claim_vantage_webhook_deliveries($1, make_interval(secs => $2), $3)",
        [limit.into(), lease.as_secs_f64().into(), per_webhook.into()],
    ))
    .all(db)
    .await
}

/// The change a notification was made from, and the W3C `traceparent` of
/// the transaction that wrote it, when that transaction set one.
#[derive(Debug, Clone, FromQueryResult)]
pub struct Cause {
    /// The notification.
    pub notification_id: i64,
    /// The event-log id of its change; `None` for alerts that time alone
    /// fired, and for pings.
    pub event_id: Option<i64>,
    /// The writer's traceparent.
    pub traceparent: Option<String>,
}

/// The causes of `notifications`, in no particular order.
pub async fn causes(db: &impl ConnectionTrait, notifications: &[i64]) -> Result<Vec<Cause>, DbErr> {
    Cause::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT notification_id, event_id, traceparent \
         FROM public.vantage_sync_notification_traces($1)",
        [notifications.to_vec().into()],
    ))
    .all(db)
    .await
}

/// What became of a webhook after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// Delivered; the next notification may go.
    Delivered,
    /// Failed; retried after a back-off.
    Retry,
    /// The webhook is now disabled (410, or the retry window passed).
    Disabled,
    /// The lease was lost meanwhile: logged, nothing else changed.
    Stale,
}

/// The answer to one attempt.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// The endpoint's status, if it answered.
    pub http_status: Option<u16>,
    /// What went wrong, if anything.
    pub error: Option<String>,
    /// How long it took.
    pub duration: Duration,
}

/// One attempt to record: what was sent, its answer, and whether it is
/// the last of its claim (`release`: a success then ends the lease).
pub struct Sent<'a> {
    /// What was sent.
    pub claim: &'a Claim,
    /// Its answer.
    pub attempt: &'a Attempt,
    /// The last of its claim.
    pub release: bool,
}

/// Records `sent`, in order, in one call; each one's outcome.
pub async fn record(
    db: &impl ConnectionTrait,
    sent: &[Sent<'_>],
    retry_window: Duration,
) -> Result<Vec<AttemptOutcome>, DbErr> {
    #[derive(FromQueryResult)]
    struct Outcome {
        outcome: String,
    }
    if sent.is_empty() {
        return Ok(Vec::new());
    }
    let attempts: Vec<serde_json::Value> = sent
        .iter()
        .map(|sent| {
            serde_json::json!({
                "webhook": sent.claim.webhook_id,
                "lease": sent.claim.lease,
                "notification": sent.claim.notification_id,
                "http_status": sent.attempt.http_status,
                "error": sent.attempt.error,
                "duration_ms": u64::try_from(sent.attempt.duration.as_millis()).unwrap_or(u64::MAX).min(i32::MAX as u64),
                "release": sent.release,
            })
        })
        .collect();
    let outcomes = Outcome::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT outcome FROM public.record_vantage_webhook_attempts($1, make_interval(secs => $2)) \
         ORDER BY ordinality",
        [
            serde_json::Value::Array(attempts).into(),
            retry_window.as_secs_f64().into(),
        ],
    ))
    .all(db)
    .await?;
    Ok(outcomes
        .iter()
        .map(|outcome| match outcome.outcome.as_str() {
            "delivered" => AttemptOutcome::Delivered,
            "retry" => AttemptOutcome::Retry,
            "disabled" => AttemptOutcome::Disabled,
            _ => AttemptOutcome::Stale,
        })
        .collect())
}

/// Whether the server can sign deliveries: `service_role` may run the
/// claim function, which is SECURITY DEFINER and whose owner may read the
/// secrets in the private schema. Read from the catalogs, which every role
/// may read; `None` when the function or the table does not exist.
pub async fn secrets_reachable(pool: &super::Pool) -> Result<Option<SecretsAccess>, DbErr> {
    use sea_orm::sqlx::{self, Row};
    let row = sqlx::raw_sql(
        "SELECT has_function_privilege('service_role', p.oid, 'EXECUTE'), p.prosecdef, \
                has_table_privilege(p.proowner, c.oid, 'SELECT') \
         FROM pg_catalog.pg_proc p \
         JOIN pg_catalog.pg_namespace pn ON pn.oid = p.pronamespace AND pn.nspname = 'public' \
         CROSS JOIN pg_catalog.pg_class c \
         JOIN pg_catalog.pg_namespace cn ON cn.oid = c.relnamespace \
         WHERE p.proname = 'claim_vantage_webhook_deliveries' \
           AND cn.nspname = 'vantage_sync_private' AND c.relname = 'webhook_secrets'",
    )
    .fetch_optional(pool.sqlx())
    .await
    .map_err(|error| DbErr::Query(sea_orm::RuntimeErr::SqlxError(std::sync::Arc::new(error))))?;
    let Some(row) = row else {
        return Ok(None);
    };
    // Simple-protocol results are text: PostgreSQL's `t` or `f`.
    let flag = |index: usize| -> Result<bool, DbErr> {
        row.try_get::<bool, _>(index).map_err(|error| {
            DbErr::Query(sea_orm::RuntimeErr::SqlxError(std::sync::Arc::new(error)))
        })
    };
    Ok(Some(SecretsAccess {
        service_role_may_claim: flag(0)?,
        claim_is_definer: flag(1)?,
        owner_reads_secrets: flag(2)?,
    }))
}

/// What [`secrets_reachable`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecretsAccess {
    /// `service_role` may execute the claim function.
    pub service_role_may_claim: bool,
    /// The claim function runs as its owner.
    pub claim_is_definer: bool,
    /// Its owner may read the secrets.
    pub owner_reads_secrets: bool,
}
