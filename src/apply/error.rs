//! What can go wrong on the apply side: [`ApplyError`] for a pipeline,
//! [`BatchError`] for one batch, and database errors classified by SQLSTATE.
//!
//! Each error names what it concerns as fields (the topic, partition and
//! offset of the records, the table) and keeps its cause typed as its
//! `source`; the transient/definite split comes from the variant, which the
//! SQLSTATE or the Kafka error kind decided, never from message text.

use std::time::Duration;

use rdkafka::error::KafkaError;

use crate::config::ConfigError;
use crate::event::TableName;
use crate::kafka::AdminError;
use crate::source::catalog::CatalogError;

use super::dlq::DlqSendError;

/// An apply-side failure: what happened is its [`ApplyErrorKind`] (boxed, so
/// that results stay small on the hot path).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct ApplyError(Box<ApplyErrorKind>);

#[derive(Debug, thiserror::Error)]
pub enum ApplyErrorKind {
    /// Cannot run until someone fixes something: `message` says what (and
    /// shows `source`, when there is one).
    #[error("{message}")]
    Setup {
        message: String,
        table: Option<TableName>,
        #[source]
        source: Option<Cause>,
    },
    /// A database or Kafka cluster cannot be reached at start (while
    /// `doing` something, may be empty).
    #[error("{}{source}", prefix(.doing))]
    Unreachable {
        doing: String,
        #[source]
        source: Cause,
    },
    /// Broke while doing something (`doing`, may be empty); restart with
    /// backoff.
    #[error("{}{source}", prefix(.doing))]
    Transient {
        doing: String,
        #[source]
        source: Cause,
    },
    /// Kafka failed on `topic` (at `partition`, when it concerns one);
    /// restart with backoff.
    #[error("{doing} {topic}: {source}")]
    Kafka {
        doing: &'static str,
        topic: String,
        partition: Option<i32>,
        #[source]
        source: KafkaError,
    },
    /// A topic's partitions were not found (a restarting broker may answer
    /// without them for a moment); restart with backoff.
    #[error("topic {topic} not found; if it persists, run pgrelay setup in the source region")]
    TopicMissing { topic: String },
    /// A batch of `topic` kept failing; the pipeline restarts from the
    /// offsets stored in the target. `partition`, `offset`: its first record
    /// (none when the batch only stored offsets).
    #[error("{source} (resuming from the offsets stored in the target)")]
    Batch {
        topic: String,
        partition: Option<i32>,
        offset: Option<i64>,
        #[source]
        source: BatchError,
    },
    /// The target's connection was lost while the pipeline waited for
    /// records; restart with backoff.
    #[error(
        "region {region}: the connection to the target database was lost \
         (resuming from the offsets stored there)"
    )]
    ConnectionLost { region: String },
    /// The replication origin is held by another session (SQLSTATE 55006:
    /// a previous process's session not gone yet, or a second process).
    #[error("region {region}: replication origin {origin}: {}", db_message(.source))]
    OriginBusy {
        region: String,
        origin: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// Records to apply were deleted by Kafka's retention first (the
    /// consumer's `source`): they are lost in `region` until someone
    /// resyncs the pair.
    #[error(
        "region {region}: the cluster no longer holds the records of {topic} this region is to \
         apply next (deleted by retention before they were applied, or lost by the cluster: {}): \
         those changes are lost in {region}. Run `pgrelay resync --region {from} --to {region}`, \
         then `DELETE FROM pgrelay.offsets WHERE topic = '{topic}'` in {region} to resume from \
         the oldest record Kafka holds",
        kafka_code(.source)
    )]
    RecordsLost {
        region: String,
        /// The source region of the pair.
        from: String,
        topic: String,
        #[source]
        source: KafkaError,
    },
}

/// What lies under an [`ApplyError`], typed.
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    #[error("{}", db_message(.0))]
    Database(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error(transparent)]
    DeadLetter(#[from] Box<DlqSendError>),
    #[error(transparent)]
    Task(#[from] tokio::task::JoinError),
}

impl ApplyError {
    /// A setup problem `message` explains.
    pub fn setup(message: impl Into<String>) -> Self {
        ApplyErrorKind::Setup {
            message: message.into(),
            table: None,
            source: None,
        }
        .into()
    }

    /// A setup problem of `table`.
    pub fn setup_table(table: &TableName, message: impl Into<String>) -> Self {
        ApplyErrorKind::Setup {
            message: message.into(),
            table: Some(table.clone()),
            source: None,
        }
        .into()
    }

    /// A setup problem `message` explains, caused by `source` (which the
    /// message shows).
    pub fn setup_from(message: impl Into<String>, source: impl Into<Cause>) -> Self {
        ApplyErrorKind::Setup {
            message: message.into(),
            table: None,
            source: Some(source.into()),
        }
        .into()
    }

    /// A failure worth a restart, while `doing` something.
    pub fn transient(doing: impl Into<String>, source: impl Into<Cause>) -> Self {
        ApplyErrorKind::Transient {
            doing: doing.into(),
            source: source.into(),
        }
        .into()
    }

    pub fn unreachable(source: impl Into<Cause>) -> Self {
        ApplyErrorKind::Unreachable {
            doing: String::new(),
            source: source.into(),
        }
        .into()
    }

    /// Kafka failed on `topic` (at `partition`) while `doing` something.
    pub fn kafka(
        doing: &'static str,
        topic: &str,
        partition: Option<i32>,
        source: KafkaError,
    ) -> Self {
        ApplyErrorKind::Kafka {
            doing,
            topic: topic.to_string(),
            partition,
            source,
        }
        .into()
    }

    /// What happened.
    pub fn kind(&self) -> &ApplyErrorKind {
        &self.0
    }

    pub fn into_kind(self) -> ApplyErrorKind {
        *self.0
    }

    pub fn is_transient(&self) -> bool {
        match self.kind() {
            ApplyErrorKind::Transient { .. }
            | ApplyErrorKind::Kafka { .. }
            | ApplyErrorKind::TopicMissing { .. }
            | ApplyErrorKind::Batch { .. }
            | ApplyErrorKind::ConnectionLost { .. }
            | ApplyErrorKind::OriginBusy { .. } => true,
            ApplyErrorKind::Setup { .. }
            | ApplyErrorKind::Unreachable { .. }
            | ApplyErrorKind::RecordsLost { .. } => false,
        }
    }

    pub fn is_unreachable(&self) -> bool {
        matches!(self.kind(), ApplyErrorKind::Unreachable { .. })
    }

    /// Cannot run until someone fixes something.
    pub fn is_setup(&self) -> bool {
        matches!(self.kind(), ApplyErrorKind::Setup { .. })
    }

    /// A transient failure at start as "cannot be reached" (the pre-flight
    /// retries those until `relay.startup_timeout`).
    pub fn unreachable_at_start(self) -> Self {
        match self.into_kind() {
            ApplyErrorKind::Transient { doing, source } => {
                ApplyErrorKind::Unreachable { doing, source }.into()
            }
            other => other.into(),
        }
    }
}

impl From<ApplyErrorKind> for ApplyError {
    fn from(kind: ApplyErrorKind) -> Self {
        ApplyError(Box::new(kind))
    }
}

/// A configuration error is a setup problem.
impl From<ConfigError> for ApplyError {
    fn from(e: ConfigError) -> Self {
        ApplyError::setup_from(e.to_string(), e)
    }
}

fn prefix(doing: &str) -> String {
    match doing {
        "" => String::new(),
        d => format!("{d}: "),
    }
}

fn kafka_code(e: &KafkaError) -> String {
    e.rdkafka_error_code()
        .map_or_else(|| e.to_string(), |c| c.to_string())
}

/// Whether a database error is worth retrying as is.
pub fn is_transient_db(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        None => true, // connection closed, io, timeouts
        Some(code) => is_transient_sqlstate(code.code()),
    }
}

/// Whether an error of SQLSTATE `code` is worth retrying as is: the
/// connection or the server (classes 08, 53, 57, 58), a serialization
/// failure or deadlock, a lock or an origin held by another session. Class
/// 57 includes 57014, a statement cancelled or past `statement_timeout`: a
/// busy target, not the record's doing.
pub fn is_transient_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57")
        || code.starts_with("58")
        || code == "40001"
        || code == "40P01"
        || code == "55P03"
        || code == "55006"
}

pub fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_string()).unwrap_or_default()
}

/// A database error of an applied change as one line that carries no row
/// value: the server's message, and the column it names. Never its DETAIL,
/// which for a constraint violation quotes the failing row ("Failing row
/// contains (…)", "Key (id)=(5) already exists"); in a data exception's
/// message (class 22, e.g. `invalid input syntax for type integer: "…"`)
/// every quoted value is replaced by `…`. Dead-letter headers, `pgrelay dlq
/// list` and logs print this: the row values stay in the parked record.
pub fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut out = if db.code().code().starts_with("22") {
                without_quoted_values(db.message())
            } else {
                db.message().to_string()
            };
            if let Some(column) = db.column() {
                out.push_str(&format!(" (column {column})"));
            }
            out
        }
        None => crate::source::pg_error::reason(e),
    }
}

/// `text` with each double-quoted segment's content replaced by `…`.
fn without_quoted_values(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut inside = false;
    for ch in text.chars() {
        if ch == '"' {
            if inside {
                out.push('…');
            }
            inside = !inside;
            out.push(ch);
        } else if !inside {
            out.push(ch);
        }
    }
    out
}

#[cfg(test)]
mod message_tests {
    #[test]
    fn quoted_values_of_data_exceptions_are_left_out() {
        assert_eq!(
            super::without_quoted_values(r#"invalid input syntax for type integer: "4111 1111""#),
            r#"invalid input syntax for type integer: "…""#
        );
        assert_eq!(
            super::without_quoted_values(r#"value "99999999999" is out of range for type integer"#),
            r#"value "…" is out of range for type integer"#
        );
        assert_eq!(super::without_quoted_values("no quotes"), "no quotes");
    }
}

/// Why a batch was not applied (nothing of it was committed).
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// A statement failed in a way worth retrying as is (a lost connection,
    /// a shutdown of the target), at `step` or on `table`.
    #[error("{}: {}", .table.as_deref().unwrap_or(.step), db_message(.source))]
    Database {
        step: &'static str,
        table: Option<String>,
        #[source]
        source: tokio_postgres::Error,
    },
    /// A serialization failure or deadlock with another session (SQLSTATE
    /// 40001, 40P01) on `table`: retry it after a short wait, quietly.
    #[error("{table}: {}", db_message(.source))]
    Conflict {
        table: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// The batch's dead letters could not be written (so its offsets were
    /// not stored): retry it.
    #[error(transparent)]
    DeadLetter(Box<DlqSendError>),
    /// Something would have been dead-lettered under table definitions not
    /// read since: read them again, then retry. `unknown_column` names the
    /// first `table.column` a record has and the definitions lack.
    #[error("{}", recheck_message(.unknown_column))]
    Recheck { unknown_column: Option<String> },
    /// A change is stamped further ahead of the local clock than
    /// `max_clock_skew`: retry once the clock has come this much closer.
    #[error(
        "a change is stamped ahead of this region's clock by more than \
         relay.max_clock_skew: waiting {wait:?} for the clock to catch up"
    )]
    Ahead { wait: Duration },
}

fn recheck_message(unknown_column: &Option<String>) -> String {
    match unknown_column {
        Some(c) => format!("records have column {c}, which the target table lacks"),
        None => "a statement failed: the target's table definitions are re-read".into(),
    }
}

/// A database error at `step` of a batch: worth retrying as is.
pub(super) fn at_step(step: &'static str) -> impl FnOnce(tokio_postgres::Error) -> BatchError {
    move |source| BatchError::Database {
        step,
        table: None,
        source,
    }
}

/// A retryable database error on `table`, classified by its SQLSTATE.
pub(super) fn retryable(e: tokio_postgres::Error, table: &str) -> BatchError {
    match sqlstate(&e).as_str() {
        "40001" | "40P01" => BatchError::Conflict {
            table: table.to_string(),
            source: e,
        },
        _ => BatchError::Database {
            step: "",
            table: Some(table.to_string()),
            source: e,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::is_transient_sqlstate;

    #[test]
    fn a_cancelled_or_timed_out_statement_is_transient() {
        // query_canceled: a statement_timeout or pg_cancel_backend
        assert!(is_transient_sqlstate("57014"));
        // admin_shutdown, cannot_connect_now, lock_not_available
        for code in [
            "57P01", "57P03", "55P03", "08006", "40001", "40P01", "53300",
        ] {
            assert!(is_transient_sqlstate(code), "{code}");
        }
    }

    #[test]
    fn a_record_s_own_errors_are_definite() {
        // unique_violation, not_null_violation, invalid_text_representation,
        // undefined_column, object_not_in_prerequisite_state
        for code in ["23505", "23502", "22P02", "42703", "55000"] {
            assert!(!is_transient_sqlstate(code), "{code}");
        }
    }
}
