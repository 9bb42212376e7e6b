//! The apply side: other regions' records -> the local primary.
//!
//! ```text
//!  {prefix}.{source}.{self} ──assign at stored offsets──▶ batch (count / time)
//!      ──▶ record::parse (reject: dead-letter) ──▶ sql::plan ──▶ one target transaction:
//!            rows (conditional on HLC stamps) + offsets + watermark + clock
//!      ──▶ dead letters produced and acknowledged before the commit
//! ```
//!
//! One independent pipeline per source region: its own consumer (explicit
//! partition assignment, no consumer group) and its own database session,
//! which runs under the replication origin `pgrelay_{source}` and
//! `session_replication_role = replica`, so the local capture side skips
//! what it writes and user triggers do not fire twice.
//!
//! Exactly-once in effect: the offsets to resume from are stored in the
//! same transaction as the rows, and read back on every start; stamps make
//! re-applying harmless anyway.
//!
//! Error policy: transient failures (connection loss, serialization failure,
//! deadlock, shutdown of the target) are retried with backoff, never
//! skipped. A definite failure (constraint, type, missing column) re-runs
//! the batch change by change under savepoints; only the changes that fail
//! again go to the dead-letter topic, with their reason, and the rest of the
//! batch commits.
//!
//! Files: `consume` (consumers at stored offsets, pre-flight), `pipeline`
//! (per-source loop: collect, apply, retry, wait), `batch` (one batch, one
//! transaction), `session` (origin sessions, stored offsets), `target` (the
//! target's table definitions), `error` (classification by SQLSTATE), `sql`
//! (statements, pure), `record` (parsing and admission, pure), `horizon`
//! (tombstone horizons), `dlq` and `replay` (dead letters), `breaker` (the
//! blast-radius breaker's hold, release and discard).

mod batch;
pub mod breaker;
mod consume;
pub mod dlq;
mod error;
pub mod horizon;
mod pipeline;
pub mod record;
pub mod replay;
pub mod restore;
pub(crate) mod session;
pub mod sql;
mod target;
pub mod vault;

pub use batch::{apply_batch, now_ms, BatchOptions, Outcome, ParkedPositions};
pub use consume::{assign, consumer, preflight, Consumed};
pub use dlq::DlqSendError;
pub use error::{
    db_message, is_transient_db, sqlstate, ApplyError, ApplyErrorKind, BatchError, Cause,
};
pub use pipeline::run;
pub use session::{session, session_with_origin, stored_offsets};
pub use target::load_targets;
