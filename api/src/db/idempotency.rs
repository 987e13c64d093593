//! Idempotency keys of mutations, kept in the database so they hold
//! across replicas and restarts (the migration's functions).

use sea_orm::{ConnectionTrait, DbBackend, DbErr, FromQueryResult, Statement};

/// The first use of a key: the fingerprint of its request and the answer
/// it got.
#[derive(Debug, Clone, PartialEq, FromQueryResult)]
pub struct FirstUse {
    /// What identifies the request (operation, document, variables).
    pub first_fingerprint: String,
    /// The answer, as the response JSON; `None` if it was never recorded.
    pub first_answer: Option<serde_json::Value>,
}

/// Claims `key` of `caller` for a request whose fingerprint is
/// `fingerprint`, in the request's transaction `db`: `None` when it is
/// this request's to use (record the answer before committing), else the
/// first use. Waits while another request holding the key is running.
pub async fn claim(
    db: &impl ConnectionTrait,
    caller: &str,
    key: &str,
    fingerprint: &str,
) -> Result<Option<FirstUse>, DbErr> {
    FirstUse::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT first_fingerprint, first_answer \
         FROM public.claim_vantage_idempotency_key($1, $2, $3)",
        [caller.into(), key.into(), fingerprint.into()],
    ))
    .one(db)
    .await
}

/// Records `answer` for the key this request claimed.
pub async fn record(
    db: &impl ConnectionTrait,
    caller: &str,
    key: &str,
    answer: serde_json::Value,
) -> Result<(), DbErr> {
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT public.record_vantage_idempotent_answer($1, $2, $3)",
        [caller.into(), key.into(), answer.into()],
    ))
    .await
    .map(drop)
}

#[derive(Debug, FromQueryResult)]
struct Deleted {
    value: i64,
}

/// Forgets keys first used more than a day ago; how many.
pub async fn prune(db: &impl ConnectionTrait) -> Result<i64, DbErr> {
    let row = Deleted::find_by_statement(Statement::from_string(
        DbBackend::Postgres,
        "SELECT public.prune_vantage_idempotency_keys() AS value",
    ))
    .one(db)
    .await?;
    Ok(row.map_or(0, |row| row.value))
}
