//! The Kafka record for one routed change: key, JSON value and headers.
//!
//! The value is close to Debezium's envelope, so existing CDC consumers can
//! read the topics:
//!
//! ```json
//! { "before": {..} | null, "after": {..} | null, "op": "c|u|d|t", "ts_ms": 1700000000000,
//!   "source": { "connector": "pgrelay", "version": "..", "name": "<prefix>", "region": "us",
//!               "db": "app", "schema": "public", "table": "orders", "txId": 1234,
//!               "lsn": 23456789, "ts_ms": 1700000000000 },
//!   "pgrelay": { "format": 1, "hlc": 111, "origin": "us", "commit_lsn": "0/16B3748",
//!                "xid": 1234, "seq": 0, "unchanged": ["big_text_column"] } }
//! ```
//!
//! Values are PostgreSQL's text output as JSON strings (lossless for every
//! type); columns whose value the stream did not carry (unchanged TOAST) are
//! left out of `after` and listed in `pgrelay.unchanged`. The key is
//! `{"table":"schema.table","key":{<primary key columns>}}`, so one row's
//! history stays in one partition.
//!
//! # Format versions
//!
//! `pgrelay.format` is the version of this layout ([`FORMAT`]); a record
//! without it was written before the field existed and is format 1. Its
//! place never moves, so any release can read it. `source.version` is the
//! writing release, for people; readers do not act on it.
//!
//! - Readers ignore fields they do not know. A release may add fields within
//!   a format version: a reader that predates them reads the rest as before
//!   (the rolling upgrade of docs/operations.md runs old and new sidecars
//!   side by side).
//! - A change an older reader would misread (a field's meaning changed, one
//!   it relies on gone) takes the next format version, and a reader refuses
//!   a record of a format newer than it knows ([`NewerFormat`]): the apply
//!   side parks it in the dead-letter topic (class `newer_format`, the
//!   reason naming both versions) — never applied by guesswork, never
//!   dropped — and `pgrelay dlq replay` applies it once the region runs a
//!   release that reads it.

use serde::Serialize;

use crate::event::{Change, Datum, Op, RowHasher};
use crate::residency::Routed;

/// The record format this release writes, and the newest it reads.
pub const FORMAT: u64 = 1;

/// The format of a record without `pgrelay.format`.
pub const UNVERSIONED: u64 = 1;

/// A record of a format this release cannot read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "record format {found} is newer than this pgrelay reads (format {FORMAT}): written by a newer \
     release, so it is not applied; upgrade this region's pgrelay, then run pgrelay dlq replay"
)]
pub struct NewerFormat {
    pub found: u64,
}

/// `Err` when a record of format `found` cannot be read here.
pub fn readable(found: u64) -> Result<(), NewerFormat> {
    if found > FORMAT {
        return Err(NewerFormat { found });
    }
    Ok(())
}

/// The format a record value claims (`pgrelay.format`, 1 when absent),
/// read on its own: also from a value laid out in a way this release does
/// not know. `None`: not a JSON object with a `pgrelay` object.
pub fn format_of(value: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Versioned {
        pgrelay: Meta,
    }
    #[derive(serde::Deserialize)]
    struct Meta {
        format: Option<u64>,
    }
    let v: Versioned = serde_json::from_slice(value).ok()?;
    Some(v.pgrelay.format.unwrap_or(UNVERSIONED))
}

/// Header names carried by every record.
pub const HEADER_ORIGIN: &str = "pgrelay.origin";
pub const HEADER_HLC: &str = "pgrelay.hlc";
pub const HEADER_TABLE: &str = "pgrelay.table";
pub const HEADER_OP: &str = "pgrelay.op";

/// The `op` of a progress record (see [`progress`]).
pub const PROGRESS_OP: &str = "p";

/// A progress record: sent to every partition of a destination's topic
/// after the source's changes up to `lsn` are all in Kafka, it promises that
/// every change committed before `lsn` precedes it in its partition. The
/// apply side stores it per partition (`pgrelay.offsets.source_lsn`), which
/// is what `pgrelay.wait_for` waits for. Key and value:
///
/// ```json
/// {"progress":"us"}
/// {"op":"p","ts_ms":1700000000000,"pgrelay":{"format":1,"origin":"us","lsn":"0/16B3748"}}
/// ```
pub fn progress(region: &str, lsn: crate::event::Lsn, ts_ms: u64) -> (Vec<u8>, Vec<u8>) {
    let key = serde_json::json!({ "progress": region }).to_string();
    let value = format!(
        "{{\"op\":\"{PROGRESS_OP}\",\"ts_ms\":{ts_ms},\"pgrelay\":{{\"format\":{FORMAT},\"origin\":{},\"lsn\":\"{lsn}\"}}}}",
        serde_json::Value::from(region)
    );
    (key.into_bytes(), value.into_bytes())
}

/// The LSN of a progress record; `None` for any other record, and for one
/// of a newer format (the apply side then parks it as such).
pub fn progress_lsn(value: &[u8]) -> Option<crate::event::Lsn> {
    if !value.starts_with(b"{\"op\":\"p\"") {
        return None;
    }
    #[derive(serde::Deserialize)]
    struct Progress {
        pgrelay: Inner,
    }
    #[derive(serde::Deserialize)]
    struct Inner {
        format: Option<u64>,
        lsn: String,
    }
    let p: Progress = serde_json::from_slice(value).ok()?;
    readable(p.pgrelay.format.unwrap_or(UNVERSIONED)).ok()?;
    p.pgrelay.lsn.parse().ok()
}

/// What every record of one capture process shares.
#[derive(Debug, Clone)]
pub struct Source {
    pub prefix: String,
    pub region: String,
    pub db: String,
}

/// An encoded record, ready for the producer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub table: String,
    /// [`row_hash`](crate::event::row_hash) of the key: picks the Kafka partition, so one row's
    /// history stays in one partition and the apply side's sessions of a
    /// source never touch the same rows.
    pub key_hash: u32,
}

/// Bytes a record puts on the wire to its destination's cluster, before
/// Kafka's own framing and compression: key, value, header names and values.
/// What egress accounting counts.
pub fn wire_size(record: &Record, headers: &[(&str, &str)]) -> u64 {
    let headers: usize = headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    (record.key.len() + record.value.len() + headers) as u64
}

/// Encodes one routed change. `buf` is reused between calls to avoid
/// allocating per record.
pub fn encode(source: &Source, change: &Change, routed: &Routed) -> Record {
    encode_merging(source, change, routed, &[])
}

/// [`encode`] for a table with `counter` merge columns: an insert or update
/// also carries, in `pgrelay.merge_from`, each counter's value before the
/// change (null for an insert: from zero), so the destination adds the
/// change's delta instead of overwriting. A record without it (a resync)
/// carries no delta.
pub fn encode_merging(
    source: &Source,
    change: &Change,
    routed: &Routed,
    counters: &[String],
) -> Record {
    let table = change.schema.table.to_string();
    let (key, key_hash) = encode_key(&table, change, routed);
    let mut out = Vec::with_capacity(256);
    let commit_ms = change.tx.commit_ts_us.div_euclid(1000);
    out.extend_from_slice(b"{\"before\":");
    write_row(&mut out, &routed.columns, routed.before.as_deref(), false);
    out.extend_from_slice(b",\"after\":");
    write_row(&mut out, &routed.columns, routed.after.as_deref(), false);
    out.extend_from_slice(b",\"op\":\"");
    out.extend_from_slice(routed.op.code().as_bytes());
    out.extend_from_slice(b"\",\"ts_ms\":");
    out.extend_from_slice(commit_ms.to_string().as_bytes());
    out.extend_from_slice(b",\"source\":{\"connector\":\"pgrelay\",\"version\":\"");
    out.extend_from_slice(env!("CARGO_PKG_VERSION").as_bytes());
    out.extend_from_slice(b"\",\"name\":");
    write_str(&mut out, &source.prefix);
    out.extend_from_slice(b",\"region\":");
    write_str(&mut out, &source.region);
    out.extend_from_slice(b",\"db\":");
    write_str(&mut out, &source.db);
    out.extend_from_slice(b",\"schema\":");
    write_str(&mut out, &change.schema.table.schema);
    out.extend_from_slice(b",\"table\":");
    write_str(&mut out, &change.schema.table.name);
    out.extend_from_slice(b",\"txId\":");
    out.extend_from_slice(change.tx.xid.to_string().as_bytes());
    out.extend_from_slice(b",\"lsn\":");
    out.extend_from_slice(change.tx.commit_lsn.0.to_string().as_bytes());
    out.extend_from_slice(b",\"ts_ms\":");
    out.extend_from_slice(commit_ms.to_string().as_bytes());
    out.extend_from_slice(b"},\"pgrelay\":{\"format\":");
    out.extend_from_slice(FORMAT.to_string().as_bytes());
    out.extend_from_slice(b",\"hlc\":");
    out.extend_from_slice(change.hlc.to_string().as_bytes());
    out.extend_from_slice(b",\"origin\":");
    write_str(&mut out, &source.region);
    out.extend_from_slice(b",\"commit_lsn\":\"");
    out.extend_from_slice(change.tx.commit_lsn.to_string().as_bytes());
    out.extend_from_slice(b"\",\"xid\":");
    out.extend_from_slice(change.tx.xid.to_string().as_bytes());
    out.extend_from_slice(b",\"seq\":");
    out.extend_from_slice(change.seq.to_string().as_bytes());
    out.extend_from_slice(b",\"unchanged\":[");
    if let Some(after) = routed.after.as_deref() {
        let mut first = true;
        for (name, value) in routed.columns.iter().zip(after) {
            if *value == Datum::Unchanged {
                if !first {
                    out.push(b',');
                }
                first = false;
                write_str(&mut out, name);
            }
        }
    }
    out.push(b']');
    if !counters.is_empty() && matches!(routed.op, Op::Insert | Op::Update) {
        write_merge_from(&mut out, routed, counters);
    }
    out.extend_from_slice(b"}}");
    Record {
        key,
        value: out,
        table,
        key_hash,
    }
}

fn encode_key(table: &str, change: &Change, routed: &Routed) -> (Vec<u8>, u32) {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(b"{\"table\":");
    write_str(&mut out, table);
    out.extend_from_slice(b",\"key\":{");
    let row = match routed.op {
        Op::Delete => routed.before.as_deref(),
        _ => routed.after.as_deref().or(routed.before.as_deref()),
    };
    let mut hash = RowHasher::new(&change.schema.table);
    if let Some(row) = row {
        let mut first = true;
        for col in change.schema.columns.iter().filter(|c| c.is_key) {
            let Some(i) = routed.columns.iter().position(|n| *n == col.name) else {
                continue;
            };
            if !first {
                out.push(b',');
            }
            first = false;
            write_str(&mut out, &col.name);
            out.push(b':');
            write_value(&mut out, &row[i]);
            hash.add(&col.name, row[i].as_text());
        }
    }
    out.extend_from_slice(b"}}");
    (out, hash.finish())
}

fn write_row(out: &mut Vec<u8>, columns: &[String], row: Option<&[Datum]>, keep_unchanged: bool) {
    let Some(row) = row else {
        out.extend_from_slice(b"null");
        return;
    };
    out.push(b'{');
    let mut first = true;
    for (name, value) in columns.iter().zip(row) {
        if *value == Datum::Unchanged && !keep_unchanged {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        write_str(out, name);
        out.push(b':');
        write_value(out, value);
    }
    out.push(b'}');
}

/// `,"merge_from":{"counter":"old value"|null,...}`; left out of an update
/// without the old row (replica identity not `FULL`: no delta is known).
fn write_merge_from(out: &mut Vec<u8>, routed: &Routed, counters: &[String]) {
    let before = match (routed.op, routed.before.as_deref()) {
        (Op::Insert, _) => None,
        (_, Some(before)) => Some(before),
        (_, None) => return,
    };
    out.extend_from_slice(b",\"merge_from\":{");
    let mut first = true;
    for counter in counters {
        let Some(i) = routed.columns.iter().position(|c| c == counter) else {
            continue;
        };
        if !first {
            out.push(b',');
        }
        first = false;
        write_str(out, counter);
        out.push(b':');
        match before {
            None => out.extend_from_slice(b"null"),
            Some(row) => write_value(out, &row[i]),
        }
    }
    out.push(b'}');
}

fn write_value(out: &mut Vec<u8>, value: &Datum) {
    match value {
        Datum::Null | Datum::Unchanged => out.extend_from_slice(b"null"),
        Datum::Text(s) => write_str(out, s),
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    // serde_json's escaping; writing into a Vec cannot fail
    let _ = serde_json::to_writer(&mut *out, s);
}

/// A decoded record as the apply side and the tests see it.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, Serialize)]
pub struct Envelope {
    pub before: Option<serde_json::Map<String, serde_json::Value>>,
    pub after: Option<serde_json::Map<String, serde_json::Value>>,
    pub op: String,
    pub ts_ms: i64,
    pub source: EnvelopeSource,
    pub pgrelay: EnvelopeMeta,
}

#[derive(Debug, Clone, PartialEq, serde::Deserialize, Serialize)]
pub struct EnvelopeSource {
    pub connector: String,
    pub version: String,
    pub name: String,
    pub region: String,
    pub db: String,
    pub schema: String,
    pub table: String,
    #[serde(rename = "txId")]
    pub tx_id: u32,
    pub lsn: u64,
    pub ts_ms: i64,
}

#[derive(Debug, Clone, PartialEq, serde::Deserialize, Serialize)]
pub struct EnvelopeMeta {
    #[serde(default = "unversioned")]
    pub format: u64,
    pub hlc: crate::hlc::Hlc,
    pub origin: String,
    pub commit_lsn: String,
    pub xid: u32,
    pub seq: u64,
    pub unchanged: Vec<String>,
}

const fn unversioned() -> u64 {
    UNVERSIONED
}

/// Why [`Envelope::decode`] gave no envelope.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error(transparent)]
    NewerFormat(#[from] NewerFormat),
    #[error("not a pgrelay change record: {0}")]
    Malformed(#[from] serde_json::Error),
}

impl Envelope {
    /// Fields it does not know are ignored; a record of a newer format is
    /// refused, whatever it looks like.
    pub fn decode(value: &[u8]) -> Result<Envelope, DecodeError> {
        match serde_json::from_slice::<Envelope>(value) {
            Ok(env) => {
                readable(env.pgrelay.format)?;
                Ok(env)
            }
            Err(e) => {
                if let Some(found) = format_of(value) {
                    readable(found)?;
                }
                Err(e.into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_records_round_trip_and_are_told_apart() {
        let (key, value) = progress("us", crate::event::Lsn(0x1_0000_0010), 5);
        assert_eq!(key, br#"{"progress":"us"}"#);
        assert_eq!(
            String::from_utf8(value.clone()).unwrap(),
            r#"{"op":"p","ts_ms":5,"pgrelay":{"format":1,"origin":"us","lsn":"1/10"}}"#
        );
        assert_eq!(progress_lsn(&value), Some(crate::event::Lsn(0x1_0000_0010)));
        assert_eq!(progress_lsn(br#"{"before":null,"op":"p"}"#), None);
        assert_eq!(progress_lsn(br#"{"op":"p","pgrelay":{"lsn":"bad"}}"#), None);
    }
    use crate::event::{ColumnDesc, Lsn, TableName, TableSchema, TxMeta};
    use std::sync::Arc;

    fn change(op: Op) -> (Change, Routed<'static>) {
        let schema = Arc::new(TableSchema {
            oid: 1,
            table: TableName::new("public", "orders"),
            columns: vec![
                ColumnDesc {
                    name: "id".into(),
                    type_oid: 23,
                    is_key: true,
                },
                ColumnDesc {
                    name: "note".into(),
                    type_oid: 25,
                    is_key: false,
                },
                ColumnDesc {
                    name: "doc".into(),
                    type_oid: 25,
                    is_key: false,
                },
            ],
        });
        let after = vec![
            Datum::Text("7".into()),
            Datum::Text("say \"hi\"\n".into()),
            Datum::Unchanged,
        ];
        let change = Change {
            schema,
            op,
            before: None,
            after: Some(after.clone()),
            hlc: crate::hlc::Hlc::new(42),
            tx: Arc::new(TxMeta {
                xid: 9,
                commit_lsn: Lsn(0x1_0000_0010),
                commit_ts_us: 1_700_000_000_123_456,
            }),
            seq: 3,
        };
        let routed = Routed {
            op,
            columns: Arc::from(vec!["id".to_string(), "note".into(), "doc".into()]),
            before: None,
            after: Some(after.into()),
        };
        (change, routed)
    }

    #[test]
    fn envelope_round_trips_and_marks_unchanged_columns() {
        let (c, r) = change(Op::Update);
        let source = Source {
            prefix: "pgrelay".into(),
            region: "us".into(),
            db: "app".into(),
        };
        let rec = encode(&source, &c, &r);
        let env = Envelope::decode(&rec.value).unwrap();
        assert_eq!(env.op, "u");
        assert_eq!(env.ts_ms, 1_700_000_000_123);
        let after = env.after.unwrap();
        assert_eq!(after["note"], "say \"hi\"\n");
        assert!(!after.contains_key("doc"));
        assert_eq!(env.pgrelay.unchanged, vec!["doc".to_string()]);
        assert_eq!(env.pgrelay.hlc, crate::hlc::Hlc::new(42));
        assert_eq!(env.pgrelay.commit_lsn, "1/10");
        assert_eq!(env.source.table, "orders");
        let key: serde_json::Value = serde_json::from_slice(&rec.key).unwrap();
        assert_eq!(
            key,
            serde_json::json!({"table":"public.orders","key":{"id":"7"}})
        );
    }
}

/// Readers of other releases' records: fields they do not know, records
/// written before formats were numbered, and records of a newer format.
#[cfg(test)]
mod format_tests {
    use super::*;
    use crate::apply::record::{self, Admit, TargetTable, Targets};
    use crate::event::{ColumnDesc, Lsn, TableName, TableSchema, TxMeta};
    use std::sync::Arc;

    fn targets() -> Targets {
        let mut t = Targets::new();
        t.insert(
            "public.orders".into(),
            TargetTable {
                name: TableName::new("public", "orders"),
                key: vec!["id".into()],
                columns: vec!["id".into(), "note".into()],
                dropped: vec![],
                column_types: vec![],
                json_columns: vec![],
                admit: Admit::default(),
                merge: vec![],
            },
        );
        t
    }

    /// An insert of orders row 7 as this release writes it, as JSON.
    fn written() -> serde_json::Value {
        let schema = Arc::new(TableSchema {
            oid: 1,
            table: TableName::new("public", "orders"),
            columns: vec![
                ColumnDesc {
                    name: "id".into(),
                    type_oid: 23,
                    is_key: true,
                },
                ColumnDesc {
                    name: "note".into(),
                    type_oid: 25,
                    is_key: false,
                },
            ],
        });
        let after = vec![Datum::Text("7".into()), Datum::Text("hi".into())];
        let change = Change {
            schema,
            op: Op::Insert,
            before: None,
            after: Some(after.clone()),
            hlc: crate::hlc::Hlc::new(42),
            tx: Arc::new(TxMeta {
                xid: 9,
                commit_lsn: Lsn(0x10),
                commit_ts_us: 1_700_000_000_000_000,
            }),
            seq: 0,
        };
        let routed = Routed {
            op: Op::Insert,
            columns: Arc::from(vec!["id".to_string(), "note".into()]),
            before: None,
            after: Some(after.into()),
        };
        let source = Source {
            prefix: "pgrelay".into(),
            region: "us".into(),
            db: "app".into(),
        };
        serde_json::from_slice(&encode(&source, &change, &routed).value).unwrap()
    }

    fn bytes(v: &serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(v).unwrap()
    }

    #[test]
    fn records_carry_the_format_this_release_writes() {
        let v = written();
        assert_eq!(v["pgrelay"]["format"], FORMAT);
        assert_eq!(format_of(&bytes(&v)), Some(FORMAT));
        let env = Envelope::decode(&bytes(&v)).unwrap();
        assert_eq!(env.pgrelay.format, FORMAT);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let mut v = written();
        v["added_later"] = serde_json::json!({"nested": [1, 2]});
        v["source"]["added_later"] = "x".into();
        v["pgrelay"]["added_later"] = 5.into();
        let with_more = bytes(&v);
        let env = Envelope::decode(&with_more).unwrap();
        assert_eq!(env, Envelope::decode(&bytes(&written())).unwrap());
        let t = targets();
        let inc = record::parse(Some(&with_more), &t).unwrap();
        assert_eq!(
            (inc.hlc, inc.value("note")),
            (crate::hlc::Hlc::new(42), Some("hi"))
        );
        // a progress record with a field more is still one
        let (_, progress_value) = progress("us", Lsn(0x10), 5);
        let mut p: serde_json::Value = serde_json::from_slice(&progress_value).unwrap();
        p["pgrelay"]["added_later"] = true.into();
        assert_eq!(progress_lsn(&bytes(&p)), Some(Lsn(0x10)));
    }

    #[test]
    fn a_record_without_a_format_is_format_one() {
        // as releases before formats were numbered wrote them
        let mut v = written();
        v["pgrelay"].as_object_mut().unwrap().remove("format");
        let old = bytes(&v);
        assert_eq!(format_of(&old), Some(1));
        assert_eq!(Envelope::decode(&old).unwrap().pgrelay.format, 1);
        assert!(record::parse(Some(&old), &targets()).is_ok());
        let (_, progress_value) = progress("us", Lsn(0x10), 5);
        let old = String::from_utf8(progress_value)
            .unwrap()
            .replace("\"format\":1,", "");
        assert_eq!(progress_lsn(old.as_bytes()), Some(Lsn(0x10)));
    }

    #[test]
    fn a_newer_format_is_refused_with_its_version() {
        let t = targets();
        let mut v = written();
        v["pgrelay"]["format"] = (FORMAT + 1).into();
        let newer = bytes(&v);
        let refused = NewerFormat { found: FORMAT + 1 };
        assert!(matches!(
            Envelope::decode(&newer),
            Err(DecodeError::NewerFormat(e)) if e == refused
        ));
        // the apply side parks it with a reason naming both versions
        let why = record::parse(Some(&newer), &t).unwrap_err();
        assert_eq!(why.class(), "newer_format");
        let reason = why.to_string();
        assert!(
            reason.contains(&format!("record format {}", FORMAT + 1))
                && reason.contains(&format!("reads (format {FORMAT})"))
                && reason.contains("dlq replay"),
            "{reason}"
        );
        // laid out in a way this release does not know: still the format
        // that is named, not a missing field
        let unknown = serde_json::json!({
            "changes": [{"op": "c"}],
            "pgrelay": {"format": FORMAT + 1}
        });
        assert_eq!(
            record::parse(Some(&bytes(&unknown)), &t)
                .unwrap_err()
                .class(),
            "newer_format"
        );
        assert!(matches!(
            Envelope::decode(&bytes(&unknown)),
            Err(DecodeError::NewerFormat(_))
        ));
        // a newer progress record is not taken for one: the apply side
        // parks it like any other record of that format
        let (_, progress_value) = progress("us", Lsn(0x10), 5);
        let newer = String::from_utf8(progress_value)
            .unwrap()
            .replace("\"format\":1", &format!("\"format\":{}", FORMAT + 1));
        assert_eq!(progress_lsn(newer.as_bytes()), None);
        assert_eq!(
            record::parse(Some(newer.as_bytes()), &t)
                .unwrap_err()
                .class(),
            "newer_format"
        );
        // garbage is still garbage
        assert_eq!(
            record::parse(Some(b"{\"pgrelay\":1}"), &t)
                .unwrap_err()
                .class(),
            "poison"
        );
    }
}
