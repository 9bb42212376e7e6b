//! The capture loop's streaming half: frames from the slot in, records to
//! Kafka out, delivery reports back into the confirmed LSN (see the parent
//! module's doc for its priorities and error policy).

use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::event::{Change, Lsn, Op, TableName};
use crate::metrics::catalog as metric;
use crate::pgoutput::{self, encode_status_update, Frame};
use crate::publish::envelope::{self, HEADER_HLC, HEADER_OP, HEADER_ORIGIN, HEADER_TABLE};
use crate::publish::producer::{Delivery, SendError};
use crate::publish::sink::{self, Outgoing};
use crate::residency::{DropReason, RelationError, Verdict};
use crate::source::assemble::Output;
use crate::source::conn::{ReplReader, ReplWriter};
use crate::source::fill;

use super::{
    set_server_wal_end, CaptureError, CaptureErrorKind, Cause, Loop, ACK_POLL, BURST,
    IDLE_PROGRESS, PROGRESS_ROUNDS,
};

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

impl Loop<'_> {
    pub(super) async fn stream(
        &mut self,
        reader: &mut ReplReader,
        writer: &mut ReplWriter,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), CaptureError> {
        let mut status = tokio::time::interval(self.config.capture.status_interval);
        status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // how often delivery reports are collected while records are in flight
        let mut acks = tokio::time::interval(ACK_POLL);
        acks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            tokio::select! {
                biased;
                _ = shutdown.changed() => return Ok(()),
                _ = status.tick() => {
                    self.poll_deliveries()?;
                    self.send_status(writer, false).await?;
                    self.send_progress().await?
                }
                _ = acks.tick(), if self.tracker.in_flight() > 0 => self.poll_deliveries()?,
                frame = reader.next_copy_data(), if self.tracker.in_flight() < self.max_in_flight => {
                    match frame.map_err(|e| self.broke("replication stream", e))? {
                        Some(data) => self.frame(data, writer).await?,
                        None => return Err(CaptureError::from(CaptureErrorKind::StreamEnded { lsn: self.at })),
                    }
                    // what has already arrived is handled without going
                    // back through the select
                    for _ in 0..BURST {
                        if self.tracker.in_flight() >= self.max_in_flight {
                            break;
                        }
                        match reader.buffered_copy_data().map_err(|e| self.broke("replication stream", e))? {
                            Some(data) => self.frame(data, writer).await?,
                            None => break,
                        }
                    }
                    self.poll_deliveries()?;
                }
            }
        }
    }

    /// Collects the producers' delivery reports: every acknowledgement is
    /// counted; the first failure, if any, is returned.
    pub(super) fn poll_deliveries(&mut self) -> Result<(), CaptureError> {
        let mut reports = std::mem::take(&mut self.reports);
        self.outlets.poll(&mut reports);
        let mut result = Ok(());
        for d in reports.drain(..) {
            let r = self.delivered(d);
            if result.is_ok() {
                result = r;
            }
        }
        self.reports = reports;
        result
    }

    fn delivered(&mut self, d: Delivery) -> Result<(), CaptureError> {
        match d {
            Delivery::Acked(seq) => {
                self.tracker.ack(seq);
                Ok(())
            }
            Delivery::Failed { seq, error } => {
                Err(self.broke(format!("kafka did not accept record {seq}"), error))
            }
            Delivery::Fatal { error, reason } => Err(self.broke(
                "fatal kafka producer error",
                Cause::Fatal {
                    source: error,
                    reason,
                },
            )),
        }
    }

    fn flush_counters(&mut self) {
        for (i, n) in self.published.iter_mut().enumerate() {
            if *n > 0 {
                self.metrics.add(
                    &metric::CAPTURE_PUBLISHED,
                    &[
                        ("source", self.region),
                        ("destination", &self.destinations[i]),
                    ],
                    std::mem::take(n),
                );
            }
        }
        for (i, n) in self.published_bytes.iter_mut().enumerate() {
            if *n > 0 {
                self.metrics.add(
                    &metric::CAPTURE_BYTES,
                    &[
                        ("source", self.region),
                        ("destination", &self.destinations[i]),
                    ],
                    std::mem::take(n),
                );
            }
        }
        for ((table, dest, reason), n) in self.dropped.drain() {
            self.metrics.add(
                &metric::CAPTURE_DROPPED,
                &[
                    ("table", &table),
                    ("destination", &self.destinations[dest]),
                    ("reason", reason),
                ],
                n,
            );
        }
    }

    pub(super) async fn send_status(
        &mut self,
        writer: &mut ReplWriter,
        reply: bool,
    ) -> Result<(), CaptureError> {
        self.flush_counters();
        let lsn = self.tracker.confirmed();
        let msg = encode_status_update(lsn, lsn, lsn, now_us(), reply);
        writer
            .send_copy_data(&msg)
            .await
            .map_err(|e| self.broke("standby status update", e))?;
        if lsn != self.last_reported {
            self.last_reported = lsn;
            self.metrics.set(
                &metric::CAPTURE_CONFIRMED_LSN,
                &[("region", self.region)],
                lsn.0 as f64,
            );
        }
        Ok(())
    }

    /// Sends a progress record (`envelope::progress`) to every partition of
    /// every destination's topic, stamped with the confirmed LSN: everything
    /// committed before it is in Kafka, so in each partition it follows every
    /// change it covers. The apply side stores it and `pgrelay.wait_for`
    /// reads it, so a partition no change went to still shows that nothing
    /// is missing there. Sent for a few status ticks after the last
    /// published change (and after a start), then every [`IDLE_PROGRESS`]
    /// while the confirmed LSN still moves (the region applies other
    /// regions' changes, or other databases write): so `wait_for` answers
    /// for a position taken after the source's last own change too. Only
    /// when the confirmed LSN moved: a source whose WAL stands still sends
    /// none.
    async fn send_progress(&mut self) -> Result<(), CaptureError> {
        let lsn = self.tracker.confirmed();
        let due = self.progress_rounds > 0 || self.progress_at.elapsed() >= IDLE_PROGRESS;
        if !due || lsn <= self.progress_sent {
            return Ok(());
        }
        self.progress_rounds = self.progress_rounds.saturating_sub(1);
        self.progress_at = std::time::Instant::now();
        self.progress_sent = lsn;
        let ts_ms = (now_us() / 1000).max(0) as u64;
        let (key, value) = envelope::progress(self.region, lsn, ts_ms);
        let headers = [
            (HEADER_ORIGIN, self.region),
            (HEADER_HLC, "0"),
            (HEADER_TABLE, ""),
            (HEADER_OP, envelope::PROGRESS_OP),
        ];
        for dest in 0..self.destinations.len() {
            for partition in 0..self.outlets.partitions[dest] {
                let seq = self.tracker.issue();
                loop {
                    match self
                        .outlets
                        .send_to(dest, partition as i32, &key, &value, headers, seq)
                    {
                        Ok(()) => break,
                        Err(SendError::QueueFull) => {
                            tokio::time::sleep(ACK_POLL).await;
                            self.poll_deliveries()?;
                        }
                        Err(SendError::Kafka {
                            topic,
                            partition,
                            source,
                            ..
                        }) => {
                            let e = SendError::Kafka {
                                record: "progress record",
                                topic,
                                partition,
                                source,
                            };
                            return Err(self.broke("sending progress records", e));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    async fn frame(
        &mut self,
        data: bytes::Bytes,
        writer: &mut ReplWriter,
    ) -> Result<(), CaptureError> {
        match pgoutput::parse_frame(data).map_err(|e| self.broke("replication frame", e))? {
            Frame::Keepalive {
                wal_end,
                reply_requested,
                ..
            } => {
                if !self.assembler.in_transaction() {
                    self.tracker.advance_idle(wal_end);
                }
                set_server_wal_end(self.metrics, self.region, wal_end);
                if reply_requested {
                    self.send_status(writer, false).await?;
                }
            }
            Frame::XLogData {
                start_lsn, payload, ..
            } => {
                self.at = start_lsn;
                // rows of a transaction pgrelay applied are skipped unread
                if self.assembler.skipping() && matches!(payload.first(), Some(b'I' | b'U' | b'D'))
                {
                    return Ok(());
                }
                let msg = pgoutput::decode(payload).map_err(|e| self.broke("pgoutput", e))?;
                if let pgoutput::Message::Relation {
                    schema,
                    name,
                    replica_identity,
                    columns,
                    ..
                } = &msg
                {
                    // before any row of the new shape is read
                    let table = TableName::new(schema.as_str(), name.as_str());
                    if let Err(source) = self.policy.check_relation(
                        &table,
                        columns.iter().map(|c| c.name.as_str()),
                        Some(*replica_identity),
                    ) {
                        let source = self.explain_relation(&table, columns, source).await;
                        return Err(CaptureError::from(CaptureErrorKind::Relation {
                            region: self.region.to_string(),
                            table,
                            lsn: self.at,
                            source,
                        }));
                    }
                    self.note_columns_gone(&table, columns).await?;
                    // a counter's delta needs the old row: without it an
                    // update's increment would be lost everywhere else
                    if *replica_identity != b'f' && self.counters.contains_key(&table) {
                        return Err(CaptureError::from(CaptureErrorKind::Setup {
                            message: format!(
                                "region {}: capture stopped: table {table} has counter merge columns \
                                 but its replica identity is no longer FULL, so updates carry no old \
                                 value to take the delta from; run pgrelay setup (it restores FULL), \
                                 then restart the sidecar",
                                self.region
                            ),
                            table: Some(table),
                            source: None,
                        }));
                    }
                }
                match self
                    .assembler
                    .push(msg)
                    .map_err(|e| self.broke("replication stream", e))?
                {
                    None => {}
                    Some(Output::Change(mut change)) => {
                        self.complete(&mut change).await?;
                        self.publish(&change).await?;
                    }
                    Some(Output::Changes(mut changes)) => {
                        for change in &mut changes {
                            self.complete(change).await?;
                            self.publish(change).await?;
                        }
                    }
                    Some(Output::Commit { end_lsn }) => self.tracker.commit(end_lsn),
                }
            }
        }
        Ok(())
    }

    /// Reads back the columns the stream left out of an insert or update
    /// (`source::fill`): a change that wins elsewhere carries the whole row.
    async fn complete(&mut self, change: &mut Change) -> Result<(), CaptureError> {
        let gone_before = self.gone_in_shape(change);
        if !gone_before.is_empty() {
            fill::leave_out(change, &gone_before);
            let names: Vec<String> = gone_before
                .iter()
                .map(|&i| change.schema.columns[i].name.clone())
                .collect();
            self.count_columns_gone(&change.schema.table, &names, change.tx.commit_lsn);
        }
        if fill::missing_columns(change).len() == gone_before.len() {
            return Ok(());
        }
        let filled = self
            .filler
            .fill(change, &gone_before)
            .await
            .map_err(|e| self.broke_on(&change.schema.table, "source database", e))?;
        if filled.gone.is_empty() {
            return Ok(());
        }
        // gone for every later change of this shape too (an insert's value
        // of it must not reach destinations that dropped it)
        self.shape_gone
            .entry(change.schema.table.clone())
            .or_default()
            .extend(filled.gone.iter().cloned());
        self.count_columns_gone(&change.schema.table, &filled.gone, change.tx.commit_lsn);
        Ok(())
    }

    /// A rule column missing from a relation the table has now: the
    /// relation is older than the column's name (a backlog from before a
    /// rename), and the fix is an earlier name, not a new one.
    async fn explain_relation(
        &mut self,
        table: &TableName,
        columns: &[pgoutput::RelColumn],
        error: RelationError,
    ) -> RelationError {
        let RelationError::MissingRuleColumn { column, .. } = &error else {
            return error;
        };
        let Ok(now) = self.filler.columns_now(table).await else {
            return error;
        };
        if !now.contains(column) {
            return error;
        }
        let earlier: Vec<String> = columns
            .iter()
            .filter(|c| !now.contains(&c.name))
            .map(|c| format!("{:?}", c.name))
            .collect();
        RelationError::RuleColumnNamedLater {
            table: table.clone(),
            column: column.clone(),
            earlier: if earlier.is_empty() {
                "no column the table lacks now".to_string()
            } else {
                format!("{}, which the table lacks now", earlier.join(", "))
            },
        }
    }

    /// On a Relation message: the columns of the announced shape that the
    /// source's table no longer has — dropped or renamed after the changes
    /// of that shape were written, as when the capture side is behind.
    /// Every change of the shape is then published without them, so a
    /// destination that dropped the column too has nothing to wait for.
    /// Key columns are never left out (a table whose key is gone keeps its
    /// changes whole, and a destination parks what it cannot apply).
    async fn note_columns_gone(
        &mut self,
        table: &TableName,
        columns: &[pgoutput::RelColumn],
    ) -> Result<(), CaptureError> {
        self.shape_gone.remove(table);
        if !self.policy.is_declared(table) {
            return Ok(());
        }
        let now = self
            .filler
            .columns_now(table)
            .await
            .map_err(|e| self.broke_on(table, "source database", e))?;
        if now.is_empty() {
            return Ok(());
        }
        let gone: Vec<String> = columns
            .iter()
            .filter(|c| c.name != crate::names::HLC_COLUMN && !now.contains(&c.name))
            .map(|c| c.name.clone())
            .collect();
        if !gone.is_empty() {
            self.shape_gone.insert(table.clone(), gone);
        }
        Ok(())
    }

    /// Indices of the change's columns known gone from its table.
    fn gone_in_shape(&self, change: &Change) -> Vec<usize> {
        let Some(gone) = self.shape_gone.get(&change.schema.table) else {
            return Vec::new();
        };
        let columns = &change.schema.columns;
        if columns.iter().any(|c| c.is_key && gone.contains(&c.name)) {
            return Vec::new();
        }
        columns
            .iter()
            .enumerate()
            .filter(|(_, c)| gone.contains(&c.name))
            .map(|(i, _)| i)
            .collect()
    }

    /// A change published without columns its table no longer has: the
    /// metric, and a warning once per column and process.
    fn count_columns_gone(&mut self, table: &TableName, gone: &[String], lsn: Lsn) {
        let name = table.to_string();
        self.metrics.add(
            &metric::CAPTURE_COLUMNS_GONE,
            &[("region", self.region), ("table", &name)],
            1,
        );
        for column in gone {
            if self.columns_gone.insert((table.clone(), column.clone())) {
                tracing::warn!(
                    region = self.region,
                    table = %table,
                    column = %column,
                    lsn = %lsn,
                    "a column of the change no longer exists at the source (dropped or renamed \
                     since): published without it, so each destination keeps the value it holds"
                );
            }
        }
    }

    async fn publish(&mut self, change: &Change) -> Result<(), CaptureError> {
        let hlc = change.hlc.to_string();
        for i in 0..self.destinations.len() {
            let routed = match self.policy.route(change, i) {
                Verdict::Publish(r) => r,
                Verdict::Drop(reason) => {
                    if reason == DropReason::TruncatePartitioned
                        && self.truncates_kept.insert(change.schema.table.clone())
                    {
                        tracing::warn!(
                            region = self.region,
                            table = %change.schema.table,
                            "truncate of a partitioned table not replicated (other regions hold rows homed elsewhere); \
                             remove rows everywhere with DELETE ... WHERE on the home column"
                        );
                    }
                    *self
                        .dropped
                        .entry((change.schema.table.to_string(), i, reason.as_str()))
                        .or_insert(0) += 1;
                    continue;
                }
            };
            let counters = self
                .counters
                .get(&change.schema.table)
                .map_or(&[][..], Vec::as_slice);
            let out = Outgoing::merging(self.region, self.source, change, &routed, &hlc, counters);
            let seq = self.tracker.issue();
            loop {
                match out.queue(self.outlets, i, seq) {
                    Ok(()) => break,
                    Err(SendError::QueueFull) => {
                        // let deliveries free room, then retry
                        tokio::time::sleep(ACK_POLL).await;
                        self.poll_deliveries()?;
                    }
                    Err(e) => return Err(self.broke_on(&change.schema.table, "publish", e)),
                }
            }
            self.published[i] += 1;
            self.progress_rounds = PROGRESS_ROUNDS;
            self.published_bytes[i] += out.wire_size();
        }
        self.publish_dr(change, &hlc).await
    }

    /// Seals `change` for the DR regions of its table, if any.
    async fn publish_dr(&mut self, change: &Change, hlc: &str) -> Result<(), CaptureError> {
        let (Some(key), Some(outlets)) = (self.dr_key, self.dr_outlets.get(&change.schema.table))
        else {
            return Ok(());
        };
        if change.op != Op::Truncate {
            if let Some(seals) = self.seals.as_mut() {
                seals.count(self.metrics).await?;
            }
        }
        let Some(record) = sink::seal_for_dr(key, self.source, change)
            .map_err(|e| self.broke_on(&change.schema.table, "sealing a DR copy", e))?
        else {
            return Ok(());
        };
        for &dest in outlets {
            let seq = self.tracker.issue();
            loop {
                match sink::queue_dr(self.outlets, dest, &record, self.region, hlc, seq) {
                    Ok(()) => break,
                    Err(SendError::QueueFull) => {
                        tokio::time::sleep(ACK_POLL).await;
                        self.poll_deliveries()?;
                    }
                    Err(e) => {
                        return Err(self.broke_on(&change.schema.table, "publishing a DR copy", e))
                    }
                }
            }
        }
        Ok(())
    }

    /// A transient failure at the stream's current position.
    fn broke(&self, doing: impl Into<String>, source: impl Into<Cause>) -> CaptureError {
        CaptureError::from(CaptureErrorKind::Transient {
            doing: doing.into(),
            lsn: Some(self.at),
            table: None,
            source: source.into(),
        })
    }

    /// A transient failure at the stream's current position, on `table`.
    fn broke_on(&self, table: &TableName, doing: &str, source: impl Into<Cause>) -> CaptureError {
        CaptureError::from(CaptureErrorKind::Transient {
            doing: format!("{doing} ({table})"),
            lsn: Some(self.at),
            table: Some(table.clone()),
            source: source.into(),
        })
    }
}
