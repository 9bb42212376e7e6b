//! What can go wrong on the apply side: [`ApplyError`] for a pipeline,
//! [`BatchError`] for one batch, and database errors classified by SQLSTATE.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Cannot run until someone fixes something.
    #[error("{0}")]
    Setup(String),
    /// A database or Kafka cluster cannot be reached at start.
    #[error("{0}")]
    Unreachable(String),
    /// Broke; restart with backoff.
    #[error("{0}")]
    Transient(String),
    /// The replication origin is held by another session (SQLSTATE 55006:
    /// a previous process's session not gone yet, or a second process).
    #[error("{0}")]
    OriginBusy(String),
    /// Records to apply were deleted by Kafka's retention first: they are
    /// lost here until someone resyncs the pair.
    #[error("{0}")]
    RecordsLost(String),
}

impl ApplyError {
    pub fn is_transient(&self) -> bool {
        matches!(self, ApplyError::Transient(_) | ApplyError::OriginBusy(_))
    }
}

/// Whether a database error is worth retrying as is.
pub fn is_transient_db(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        None => true, // connection closed, io, timeouts
        Some(code) => {
            let c = code.code();
            c.starts_with("08")
                || c.starts_with("53")
                || c.starts_with("57P")
                || c.starts_with("58")
                || c == "40001"
                || c == "40P01"
                || c == "55P03"
                || c == "55006"
        }
    }
}

pub fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_string()).unwrap_or_default()
}

/// A database error as one line: message, detail, SQLSTATE.
pub fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(d) => format!("{} ({d})", db.message()),
            None => db.message().to_string(),
        },
        None => crate::source::pg_error::reason(e),
    }
}

/// Why a batch was not applied (nothing of it was committed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchError {
    /// A lost connection, a shutdown of the target: retry it.
    Transient(String),
    /// A serialization failure or deadlock with another session (SQLSTATE
    /// 40001, 40P01): retry it after a short wait, quietly.
    Conflict(String),
    /// Something would have been dead-lettered under table definitions not
    /// read since: read them again, then retry. `unknown_column` names the
    /// first `table.column` a record has and the definitions lack.
    Recheck { unknown_column: Option<String> },
    /// A change is stamped further ahead of the local clock than
    /// `max_clock_skew`: retry once the clock has come this much closer.
    Ahead { wait: Duration },
}

impl std::fmt::Display for BatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BatchError::Transient(e) | BatchError::Conflict(e) => f.write_str(e),
            BatchError::Recheck {
                unknown_column: Some(c),
            } => write!(f, "records have column {c}, which the target table lacks"),
            BatchError::Recheck { .. } => {
                f.write_str("a statement failed: the target's table definitions are re-read")
            }
            BatchError::Ahead { wait } => write!(
                f,
                "a change is stamped ahead of this region's clock by more than \
                 relay.max_clock_skew: waiting {wait:?} for the clock to catch up"
            ),
        }
    }
}

/// A retryable database error, classified by its SQLSTATE.
pub(super) fn retryable(e: &tokio_postgres::Error, table: &str) -> BatchError {
    let message = format!("{table}: {}", db_message(e));
    match sqlstate(e).as_str() {
        "40001" | "40P01" => BatchError::Conflict(message),
        _ => BatchError::Transient(message),
    }
}

impl From<String> for BatchError {
    fn from(e: String) -> Self {
        BatchError::Transient(e)
    }
}
