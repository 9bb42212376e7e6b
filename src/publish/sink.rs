//! A routed change on its way to Kafka: encoded once, with the headers every
//! record carries, and queued to its destination's producer. The capture
//! loop and `resync` both send through here; they differ only in how they
//! wait when the producer's queue is full (capture polls its acknowledgement
//! tracker, resync its own counters).

use crate::event::Change;
use crate::residency::Routed;

use super::envelope::{self, Record, Source, HEADER_HLC, HEADER_OP, HEADER_ORIGIN, HEADER_TABLE};
use super::producer::{Outlets, SendError};

/// One encoded record and its headers, ready to queue (again, after a full
/// queue) without encoding it twice.
pub struct Outgoing<'a> {
    record: Record,
    origin: &'a str,
    hlc: &'a str,
    op: &'static str,
}

impl<'a> Outgoing<'a> {
    /// Encodes `change` as `routed` for one destination. `origin` is the
    /// capturing region, `hlc` the change's stamp as text (the same for
    /// every destination, so the caller formats it once).
    pub fn new(
        origin: &'a str,
        source: &Source,
        change: &Change,
        routed: &Routed,
        hlc: &'a str,
    ) -> Outgoing<'a> {
        Outgoing::merging(origin, source, change, routed, hlc, &[])
    }

    /// [`Outgoing::new`] for a table with `counter` merge columns (see
    /// `envelope::encode_merging`).
    pub fn merging(
        origin: &'a str,
        source: &Source,
        change: &Change,
        routed: &Routed,
        hlc: &'a str,
        counters: &[String],
    ) -> Outgoing<'a> {
        Outgoing {
            record: envelope::encode_merging(source, change, routed, counters),
            origin,
            hlc,
            op: routed.op.code(),
        }
    }

    /// Queues the record to destination `dest` under sequence number `seq`.
    /// [`SendError::QueueFull`]: make room and call again; any other error
    /// names the topic.
    pub fn queue(&self, outlets: &Outlets, dest: usize, seq: u64) -> Result<(), SendError> {
        match outlets.send(dest, &self.record, self.headers(), seq) {
            Err(SendError::Other(e)) => Err(SendError::Other(format!(
                "cannot queue a record for {}: {e}",
                outlets.topics[dest]
            ))),
            other => other,
        }
    }

    /// Bytes this record puts on the wire (egress accounting).
    pub fn wire_size(&self) -> u64 {
        envelope::wire_size(&self.record, &self.headers())
    }

    fn headers(&self) -> [(&'static str, &str); 4] {
        [
            (HEADER_ORIGIN, self.origin),
            (HEADER_HLC, self.hlc),
            (HEADER_TABLE, self.record.table.as_str()),
            (HEADER_OP, self.op),
        ]
    }
}
