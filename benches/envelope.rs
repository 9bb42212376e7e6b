//! Envelope encoding: `pgrelay::publish::envelope::encode` of one routed
//! change into a Kafka key + Debezium-like JSON value. Throughput is in
//! records; the value size is printed once per case.
//!
//! `envelope_proto/*` is a prototype of the recommended rewrite (see
//! BENCHMARKS.md): per (table, column set) the constant parts of the record
//! are escaped once and cached; numbers are formatted without allocating;
//! the buffer is sized once. It produces byte-identical records (checked).
//!
//! `cargo bench --bench envelope`

mod common;

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pgrelay::event::{Op, TableName};
use pgrelay::publish::envelope::encode;
use pgrelay::publish::envelope::Record;
use pgrelay::residency::Verdict;

fn envelope(c: &mut Criterion) {
    let policy = common::policy("us");
    let source = common::source();
    let mut g = c.benchmark_group("envelope");
    g.throughput(Throughput::Elements(1));
    for (table, n) in [("bench_8", 8usize), ("bench_20", 20)] {
        for op in [Op::Insert, Op::Update, Op::Delete] {
            let schema = common::schema(TableName::new("public", table), n);
            let change = common::change(&schema, op, 42);
            let Verdict::Publish(routed) = policy.route(&change, 0) else {
                panic!("not routed")
            };
            let rec = encode(&source, &change, &routed);
            eprintln!(
                "envelope {}/{n}col: key {} B, value {} B",
                op.code(),
                rec.key.len(),
                rec.value.len()
            );
            g.bench_with_input(
                BenchmarkId::new(op.code(), format!("{n}col")),
                &routed,
                |b, r| b.iter(|| encode(black_box(&source), black_box(&change), black_box(r))),
            );
        }
    }
    g.finish();
}

/// The prototype encoder.
mod proto {
    use pgrelay::event::{Change, Datum, Op};
    use pgrelay::publish::envelope::{Record, Source};
    use pgrelay::residency::Routed;

    /// What is constant for one (source, table, column list): built once,
    /// cached next to the residency plan in a real implementation.
    pub struct Prefix {
        /// `"col":` per routed column, escaped.
        names: Vec<Vec<u8>>,
        /// `,"source":{..."table":"t","txId":`
        source: Vec<u8>,
        /// `{"table":"schema.table","key":{`
        key: Vec<u8>,
        /// `,"origin":"us","commit_lsn":"`
        origin: Vec<u8>,
        /// (routed column index, `"col":`) of the key columns
        key_cols: Vec<usize>,
        table: String,
    }

    fn esc(out: &mut Vec<u8>, s: &str) {
        let _ = serde_json::to_writer(&mut *out, s);
    }

    fn num(out: &mut Vec<u8>, mut v: u64) {
        let mut buf = [0u8; 20];
        let mut i = buf.len();
        loop {
            i -= 1;
            buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        out.extend_from_slice(&buf[i..]);
    }

    fn int(out: &mut Vec<u8>, v: i64) {
        if v < 0 {
            out.push(b'-');
        }
        num(out, v.unsigned_abs());
    }

    fn hex(out: &mut Vec<u8>, v: u64) {
        const H: &[u8; 16] = b"0123456789ABCDEF";
        let mut buf = [0u8; 16];
        let mut i = buf.len();
        let mut v = v;
        loop {
            i -= 1;
            buf[i] = H[(v & 0xf) as usize];
            v >>= 4;
            if v == 0 {
                break;
            }
        }
        out.extend_from_slice(&buf[i..]);
    }

    impl Prefix {
        pub fn new(source: &Source, change: &Change, routed: &Routed) -> Prefix {
            let t = &change.schema.table;
            let names = routed
                .columns
                .iter()
                .map(|c| {
                    let mut v = Vec::new();
                    esc(&mut v, c);
                    v.push(b':');
                    v
                })
                .collect();
            let mut src = b",\"source\":{\"connector\":\"pgrelay\",\"version\":\"".to_vec();
            src.extend_from_slice(env!("CARGO_PKG_VERSION").as_bytes());
            src.extend_from_slice(b"\",\"name\":");
            esc(&mut src, &source.prefix);
            src.extend_from_slice(b",\"region\":");
            esc(&mut src, &source.region);
            src.extend_from_slice(b",\"db\":");
            esc(&mut src, &source.db);
            src.extend_from_slice(b",\"schema\":");
            esc(&mut src, &t.schema);
            src.extend_from_slice(b",\"table\":");
            esc(&mut src, &t.name);
            src.extend_from_slice(b",\"txId\":");
            let table = t.to_string();
            let mut key = b"{\"table\":".to_vec();
            esc(&mut key, &table);
            key.extend_from_slice(b",\"key\":{");
            let mut origin = b",\"origin\":".to_vec();
            esc(&mut origin, &source.region);
            origin.extend_from_slice(b",\"commit_lsn\":\"");
            let key_cols = change
                .schema
                .columns
                .iter()
                .filter(|c| c.is_key)
                .filter_map(|c| routed.columns.iter().position(|n| *n == c.name))
                .collect();
            Prefix {
                names,
                source: src,
                key,
                origin,
                key_cols,
                table,
            }
        }

        fn row(&self, out: &mut Vec<u8>, row: Option<&[Datum]>) {
            let Some(row) = row else {
                out.extend_from_slice(b"null");
                return;
            };
            out.push(b'{');
            let mut first = true;
            for (name, value) in self.names.iter().zip(row) {
                let text = match value {
                    Datum::Unchanged => continue,
                    Datum::Null => None,
                    Datum::Text(s) => Some(s),
                };
                if !first {
                    out.push(b',');
                }
                first = false;
                out.extend_from_slice(name);
                match text {
                    Some(s) => esc(out, s),
                    None => out.extend_from_slice(b"null"),
                }
            }
            out.push(b'}');
        }

        pub fn encode(&self, change: &Change, routed: &Routed) -> Record {
            let size = |r: &Option<std::borrow::Cow<'_, [Datum]>>| -> usize {
                r.as_deref().map_or(4, |r| {
                    r.iter()
                        .map(|d| d.as_text().map_or(4, |s| s.len() + 3))
                        .sum::<usize>()
                        + self.names.iter().map(Vec::len).sum::<usize>()
                })
            };
            let mut out = Vec::with_capacity(
                size(&routed.before) + size(&routed.after) + self.source.len() + 200,
            );
            let commit_ms = change.tx.commit_ts_us.div_euclid(1000);
            out.extend_from_slice(b"{\"before\":");
            self.row(&mut out, routed.before.as_deref());
            out.extend_from_slice(b",\"after\":");
            self.row(&mut out, routed.after.as_deref());
            out.extend_from_slice(b",\"op\":\"");
            out.extend_from_slice(routed.op.code().as_bytes());
            out.extend_from_slice(b"\",\"ts_ms\":");
            int(&mut out, commit_ms);
            out.extend_from_slice(&self.source);
            num(&mut out, change.tx.xid.into());
            out.extend_from_slice(b",\"lsn\":");
            num(&mut out, change.tx.commit_lsn.0);
            out.extend_from_slice(b",\"ts_ms\":");
            int(&mut out, commit_ms);
            out.extend_from_slice(b"},\"pgrelay\":{\"hlc\":");
            num(&mut out, change.hlc.get());
            out.extend_from_slice(&self.origin);
            hex(&mut out, change.tx.commit_lsn.0 >> 32);
            out.push(b'/');
            hex(&mut out, change.tx.commit_lsn.0 & 0xFFFF_FFFF);
            out.extend_from_slice(b"\",\"xid\":");
            num(&mut out, change.tx.xid.into());
            out.extend_from_slice(b",\"seq\":");
            num(&mut out, change.seq);
            out.extend_from_slice(b",\"unchanged\":[");
            if let Some(after) = routed.after.as_deref() {
                let mut first = true;
                for (name, value) in routed.columns.iter().zip(after) {
                    if *value == Datum::Unchanged {
                        if !first {
                            out.push(b',');
                        }
                        first = false;
                        esc(&mut out, name);
                    }
                }
            }
            out.extend_from_slice(b"]}}");
            // key
            let mut key = Vec::with_capacity(self.key.len() + 32);
            key.extend_from_slice(&self.key);
            let row = match routed.op {
                Op::Delete => routed.before.as_deref(),
                _ => routed.after.as_deref().or(routed.before.as_deref()),
            };
            let key_hash = pgrelay::event::row_hash(
                &change.schema.table,
                self.key_cols
                    .iter()
                    .map(|&i| (routed.columns[i].as_str(), row.and_then(|r| r[i].as_text()))),
            );
            if let Some(row) = row {
                for (n, &i) in self.key_cols.iter().enumerate() {
                    if n > 0 {
                        key.push(b',');
                    }
                    key.extend_from_slice(&self.names[i]);
                    match row[i].as_text() {
                        Some(s) => esc(&mut key, s),
                        None => key.extend_from_slice(b"null"),
                    }
                }
            }
            key.extend_from_slice(b"}}");
            Record {
                key,
                value: out,
                table: self.table.clone(),
                key_hash,
            }
        }
    }
}

fn prototype(c: &mut Criterion) {
    let policy = common::policy("us");
    let source = common::source();
    let mut g = c.benchmark_group("envelope_proto");
    g.throughput(Throughput::Elements(1));
    for (table, n) in [("bench_8", 8usize), ("bench_20", 20)] {
        for op in [Op::Insert, Op::Update] {
            let schema = common::schema(TableName::new("public", table), n);
            let change = common::change(&schema, op, 42);
            let Verdict::Publish(routed) = policy.route(&change, 0) else {
                panic!("not routed")
            };
            let prefix = proto::Prefix::new(&source, &change, &routed);
            let want: Record = encode(&source, &change, &routed);
            assert_eq!(prefix.encode(&change, &routed), want, "prototype differs");
            g.bench_with_input(
                BenchmarkId::new(op.code(), format!("{n}col")),
                &routed,
                |b, r| b.iter(|| prefix.encode(black_box(&change), black_box(r))),
            );
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = envelope, prototype
}
criterion_main!(benches);
