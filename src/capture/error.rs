//! What can go wrong on the capture side ([`CaptureError`]), with the class
//! its supervisor needs: setup problems stop the sidecar, services not
//! reachable at start are waited for, anything else is transient and the
//! run restarts from the slot's confirmed LSN.
//!
//! Each error names what it concerns as fields (the LSN of the transaction
//! being read, the table) and keeps its cause typed as its `source`.

use rdkafka::error::KafkaError;

use crate::config::ConfigError;
use crate::dr::DrError;
use crate::event::{Lsn, TableName};
use crate::kafka::AdminError;
use crate::pgoutput::DecodeError;
use crate::publish::producer::{OpenError, SendError};
use crate::residency::RelationError;
use crate::source::assemble::AssembleError;
use crate::source::catalog::CatalogError;
use crate::source::conn::ConnError;
use crate::source::fill::FillError;

/// A capture-side failure: what happened is its [`CaptureErrorKind`] (boxed,
/// so that results stay small on the hot path).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct CaptureError(Box<CaptureErrorKind>);

#[derive(Debug, thiserror::Error)]
pub enum CaptureErrorKind {
    /// Cannot start (or go on) until someone fixes something; restarting
    /// will not help. `message` says what (and shows `source`, when there
    /// is one).
    #[error("{message}")]
    Setup {
        message: String,
        table: Option<TableName>,
        #[source]
        source: Option<Cause>,
    },
    /// A table's Relation message shows a shape its rules no longer fit:
    /// the stream stopped at `lsn`, before any row of that shape was routed.
    #[error("region {region}: capture stopped: {source}")]
    Relation {
        region: String,
        table: TableName,
        lsn: Lsn,
        #[source]
        source: RelationError,
    },
    /// A database or Kafka cluster cannot be reached at start.
    #[error("{0}")]
    Unreachable(#[source] Cause),
    /// The run broke while `doing` something (at `lsn`, on `table`, when
    /// known); restart from the last confirmed LSN.
    #[error("{doing}: {source}{}", at(.lsn))]
    Transient {
        doing: String,
        lsn: Option<Lsn>,
        table: Option<TableName>,
        #[source]
        source: Cause,
    },
    /// The server closed the replication stream; restart.
    #[error("the server ended the replication stream (at LSN {lsn})")]
    StreamEnded { lsn: Lsn },
}

/// What lies under a [`CaptureError`], typed.
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("{}", crate::source::pg_error::reason(.0))]
    Database(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Conn(#[from] ConnError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Assemble(#[from] AssembleError),
    #[error(transparent)]
    Fill(#[from] FillError),
    #[error(transparent)]
    Dr(#[from] DrError),
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error(transparent)]
    Send(#[from] SendError),
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    /// librdkafka reported the producer unusable.
    #[error("{source}: {reason}")]
    Fatal {
        #[source]
        source: KafkaError,
        reason: String,
    },
    /// A destination's topics could not be checked.
    #[error("destination {destination}: {source}")]
    Topics {
        destination: String,
        #[source]
        source: AdminError,
    },
}

impl CaptureError {
    /// A setup problem `message` explains.
    pub fn setup(message: impl Into<String>) -> Self {
        CaptureErrorKind::Setup {
            message: message.into(),
            table: None,
            source: None,
        }
        .into()
    }

    /// A setup problem `source` explains.
    pub fn setup_from(source: impl Into<Cause>) -> Self {
        let source = source.into();
        CaptureErrorKind::Setup {
            message: source.to_string(),
            table: None,
            source: Some(source),
        }
        .into()
    }

    /// A failure worth a restart, while `doing` something before streaming.
    pub fn transient(doing: impl Into<String>, source: impl Into<Cause>) -> Self {
        CaptureErrorKind::Transient {
            doing: doing.into(),
            lsn: None,
            table: None,
            source: source.into(),
        }
        .into()
    }

    pub fn unreachable(source: impl Into<Cause>) -> Self {
        CaptureErrorKind::Unreachable(source.into()).into()
    }

    /// What happened.
    pub fn kind(&self) -> &CaptureErrorKind {
        &self.0
    }

    pub fn is_transient(&self) -> bool {
        matches!(
            self.kind(),
            CaptureErrorKind::Transient { .. } | CaptureErrorKind::StreamEnded { .. }
        )
    }

    pub fn is_unreachable(&self) -> bool {
        matches!(self.kind(), CaptureErrorKind::Unreachable(_))
    }

    /// Cannot go on until someone fixes something.
    pub fn is_setup(&self) -> bool {
        matches!(
            self.kind(),
            CaptureErrorKind::Setup { .. } | CaptureErrorKind::Relation { .. }
        )
    }

    /// The LSN the error concerns, when it concerns one.
    pub fn lsn(&self) -> Option<Lsn> {
        match self.kind() {
            CaptureErrorKind::Transient { lsn, .. } => *lsn,
            CaptureErrorKind::Relation { lsn, .. } | CaptureErrorKind::StreamEnded { lsn } => {
                Some(*lsn)
            }
            CaptureErrorKind::Setup { .. } | CaptureErrorKind::Unreachable(_) => None,
        }
    }

    /// The table the error concerns, when it concerns one.
    pub fn table(&self) -> Option<&TableName> {
        match self.kind() {
            CaptureErrorKind::Setup { table, .. } | CaptureErrorKind::Transient { table, .. } => {
                table.as_ref()
            }
            CaptureErrorKind::Relation { table, .. } => Some(table),
            CaptureErrorKind::Unreachable(_) | CaptureErrorKind::StreamEnded { .. } => None,
        }
    }
}

impl From<CaptureErrorKind> for CaptureError {
    fn from(kind: CaptureErrorKind) -> Self {
        CaptureError(Box::new(kind))
    }
}

/// A configuration error is a setup problem.
impl From<ConfigError> for CaptureError {
    fn from(e: ConfigError) -> Self {
        CaptureError::setup_from(e)
    }
}

fn at(lsn: &Option<Lsn>) -> String {
    match lsn {
        Some(l) => format!(" (at LSN {l})"),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_errors_name_their_lsn_and_keep_their_cause() {
        let e = CaptureError::from(CaptureErrorKind::Transient {
            doing: "pgoutput".into(),
            lsn: Some(Lsn(0x1_0000_0010)),
            table: None,
            source: DecodeError::UnknownTag { tag: 0x7a }.into(),
        });
        assert!(e.is_transient() && !e.is_setup());
        assert_eq!(
            e.to_string(),
            "pgoutput: unknown pgoutput message tag 0x7a (at LSN 1/10)"
        );
        let cause = std::error::Error::source(&e).unwrap();
        assert!(cause.downcast_ref::<Cause>().is_some());
        assert_eq!(e.lsn(), Some(Lsn(0x1_0000_0010)));
    }

    #[test]
    fn errors_stay_small() {
        assert!(std::mem::size_of::<CaptureError>() <= 8);
        assert!(std::mem::size_of::<crate::apply::ApplyError>() <= 8);
        assert!(std::mem::size_of::<crate::apply::BatchError>() <= 128);
    }

    #[test]
    fn setup_errors_show_their_message() {
        let e = CaptureError::setup("replication slot s does not exist in region us");
        assert!(e.is_setup() && !e.is_transient() && !e.is_unreachable());
        assert!(e.table().is_none() && e.lsn().is_none());
        assert_eq!(
            e.to_string(),
            "replication slot s does not exist in region us"
        );
    }
}
