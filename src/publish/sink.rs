//! A routed change on its way to Kafka: encoded once, with the headers every
//! record carries, and queued to its destination's producer. The capture
//! loop and `resync` both send through here; they differ only in how they
//! wait when the producer's queue is full (capture polls its acknowledgement
//! tracker, resync its own counters).

use std::borrow::Cow;

use crate::dr::{self, DrError, DrKey};
use crate::event::{Change, Op};
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
        outlets.send(dest, &self.record, self.headers(), seq)
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

/// Header `pgrelay.op` of a sealed DR record.
pub const DR_OP: &str = "dr";

/// Seals `change` whole (every column, no column rule) for a DR region:
/// the record key is the keyed hash of table and primary key, the value a
/// [`dr::Sealed`], the table a keyed hash of its name. `None` for a
/// truncate (no row to keep).
pub fn seal_for_dr(
    key: &DrKey,
    source: &Source,
    change: &Change,
) -> Result<Option<Record>, DrError> {
    if change.op == Op::Truncate {
        return Ok(None);
    }
    let columns: std::sync::Arc<[String]> = change
        .schema
        .columns
        .iter()
        .map(|c| c.name.clone())
        .collect();
    let whole = Routed {
        op: change.op,
        columns,
        before: change.before.as_deref().map(Cow::Borrowed),
        after: change.after.as_deref().map(Cow::Borrowed),
    };
    let live = envelope::encode(source, change, &whole);
    let row = key.row_hash(&live.table, &live.key);
    let sealed = key.seal(
        &source.region,
        &live.table,
        &row,
        change.hlc,
        &dr::plaintext(&live.key, &live.value),
    )?;
    Ok(Some(Record {
        key: row.to_vec(),
        value: sealed.encode(),
        key_hash: u32::from_be_bytes([row[0], row[1], row[2], row[3]]),
        table: sealed.table_hash,
    }))
}

/// Queues a sealed DR record (see [`seal_for_dr`]) to destination `dest`.
pub fn queue_dr(
    outlets: &Outlets,
    dest: usize,
    record: &Record,
    origin: &str,
    hlc: &str,
    seq: u64,
) -> Result<(), SendError> {
    let headers = [
        (HEADER_ORIGIN, origin),
        (HEADER_HLC, hlc),
        (HEADER_TABLE, record.table.as_str()),
        (HEADER_OP, DR_OP),
    ];
    outlets
        .send(dest, record, headers, seq)
        .map_err(|e| match e {
            SendError::Kafka {
                topic,
                partition,
                source,
                ..
            } => SendError::Kafka {
                record: "DR record",
                topic,
                partition,
                source,
            },
            full => full,
        })
}
