//! The apply side's CPU work per batch, without the database:
//! `record::parse` (JSON envelope -> `Incoming`) and `sql::plan` (newest
//! change per key, grouping, SQL text and the JSON rows parameter). A batch
//! is 5,000 records (`relay.apply.batch_max_records`' default) of the
//! 8-column global table. Throughput is in records.
//!
//! `apply_proto/*` is a prototype of the recommended rewrite (see
//! BENCHMARKS.md): the envelope deserialized with borrowed strings (only the
//! row the op needs), and the JSON rows parameter written straight into one
//! buffer instead of building a `serde_json::Value` tree. It produces the same
//! rows (checked below) and shows what the rewrite buys.
//!
//! `cargo bench --bench apply_plan`

mod common;

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pgrelay::apply::record::parse;
use pgrelay::apply::sql::plan;
use pgrelay::event::Op;

const BATCH: usize = 5_000;

fn apply(c: &mut Criterion) {
    let targets = common::targets();
    let mut g = c.benchmark_group("apply");
    g.throughput(Throughput::Elements(BATCH as u64));
    // (name, op, records per key)
    let cases = [
        ("insert_distinct", Op::Insert, 1usize),
        ("update_distinct", Op::Update, 1),
        ("update_5_per_key", Op::Update, 5),
        ("delete_distinct", Op::Delete, 1),
    ];
    for (what, op, dup) in cases {
        let records = common::records(BATCH, op, dup);
        let incoming = common::incoming(BATCH, op, dup);
        let statements = plan(&incoming, &targets);
        let json: usize = statements.iter().map(|s| s.rows.len()).sum();
        eprintln!(
            "apply {what}: {} statements, {json} B of JSON rows for {BATCH} records",
            statements.len()
        );
        g.bench_with_input(BenchmarkId::new("plan", what), &incoming, |b, inc| {
            b.iter(|| plan(black_box(inc), &targets))
        });
        g.bench_with_input(BenchmarkId::new("parse", what), &records, |b, recs| {
            b.iter(|| {
                for r in recs {
                    black_box(parse(Some(black_box(r)), &targets).unwrap());
                }
            })
        });
        g.bench_with_input(BenchmarkId::new("parse+plan", what), &records, |b, recs| {
            b.iter(|| {
                let inc: Vec<_> = recs
                    .iter()
                    .map(|r| parse(Some(r), &targets).unwrap())
                    .collect();
                plan(&inc, &targets)
            })
        });
    }
    g.finish();
}

/// The prototype: borrowed parse + direct rows writer.
mod proto {
    use std::borrow::Cow;
    use std::collections::HashMap;
    use std::fmt;

    use serde::de::{Deserializer, MapAccess, Visitor};
    use serde::Deserialize;

    /// A text value, borrowed from the record unless it had escapes.
    pub struct Text<'a>(pub Cow<'a, str>);

    impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Text<'de>;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a string")
                }
                fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                    Ok(Text(Cow::Borrowed(v)))
                }
                fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                    Ok(Text(Cow::Owned(v.to_owned())))
                }
            }
            d.deserialize_str(V)
        }
    }

    /// A row as (column, value) pairs in record order, borrowed.
    pub struct Row<'a>(pub Vec<(Text<'a>, Option<Text<'a>>)>);

    impl<'de: 'a, 'a> Deserialize<'de> for Row<'a> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Row<'de>;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a row object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                    let mut v = Vec::with_capacity(m.size_hint().unwrap_or(16));
                    while let Some(e) = m.next_entry()? {
                        v.push(e);
                    }
                    Ok(Row(v))
                }
            }
            d.deserialize_map(V)
        }
    }

    #[derive(Deserialize)]
    pub struct Source<'a> {
        #[serde(borrow)]
        pub schema: Text<'a>,
        #[serde(borrow)]
        pub table: Text<'a>,
    }

    #[derive(Deserialize)]
    pub struct Meta<'a> {
        pub hlc: u64,
        #[serde(borrow)]
        pub commit_lsn: Text<'a>,
        #[serde(borrow)]
        pub unchanged: Vec<Text<'a>>,
    }

    /// The envelope with `before` and `after` kept as borrowed rows; the
    /// apply side only needs `before` for deletes, but JSON objects are not
    /// ordered, so both are read (a RawValue would skip the unused one).
    #[derive(Deserialize)]
    pub struct Envelope<'a> {
        #[serde(borrow)]
        pub before: Option<Row<'a>>,
        #[serde(borrow)]
        pub after: Option<Row<'a>>,
        #[serde(borrow)]
        pub op: Text<'a>,
        pub ts_ms: i64,
        #[serde(borrow)]
        pub source: Source<'a>,
        #[serde(borrow)]
        pub pgrelay: Meta<'a>,
    }

    fn write_str(out: &mut Vec<u8>, s: &str) {
        let _ = serde_json::to_writer(&mut *out, s);
    }

    /// Parse + validate + newest per key + the rows JSON of one table's
    /// upserts (or deletes), like `record::parse` + `sql::plan`.
    /// Returns the rows and what the watermark needs (newest commit LSN,
    /// latest commit time).
    pub fn apply(
        records: &[Vec<u8>],
        columns: &[String],
        key: &[String],
    ) -> (Vec<u8>, String, i64) {
        let envs: Vec<Envelope> = records
            .iter()
            .map(|r| serde_json::from_slice(r).expect("envelope"))
            .collect();
        let mut newest: HashMap<(&str, &str, Vec<Option<&str>>), usize> =
            HashMap::with_capacity(envs.len());
        for (i, e) in envs.iter().enumerate() {
            let delete = e.op.0 == "d";
            let row = if delete { &e.before } else { &e.after };
            let row = row.as_ref().expect("row");
            for (name, _) in &row.0 {
                assert!(columns.iter().any(|c| *c == name.0), "unknown column");
            }
            for name in &e.pgrelay.unchanged {
                assert!(columns.iter().any(|c| *c == name.0), "unknown column");
            }
            let k: Vec<Option<&str>> = key
                .iter()
                .map(|k| {
                    row.0
                        .iter()
                        .find(|(n, _)| n.0 == *k)
                        .and_then(|(_, v)| v.as_ref().map(|t| t.0.as_ref()))
                })
                .collect();
            let slot = newest
                .entry((e.source.schema.0.as_ref(), e.source.table.0.as_ref(), k))
                .or_insert(i);
            if envs[*slot].pgrelay.hlc < e.pgrelay.hlc {
                *slot = i;
            }
        }
        let mut winners: Vec<usize> = newest.into_values().collect();
        winners.sort_unstable();
        let mut out = Vec::with_capacity(records.iter().map(Vec::len).sum::<usize>() / 2);
        out.push(b'[');
        for (n, &i) in winners.iter().enumerate() {
            let e = &envs[i];
            let delete = e.op.0 == "d";
            let row = if delete { &e.before } else { &e.after };
            if n > 0 {
                out.push(b',');
            }
            out.push(b'{');
            for (name, value) in &row.as_ref().expect("row").0 {
                if delete && !key.iter().any(|k| *k == name.0) {
                    continue;
                }
                write_str(&mut out, &name.0);
                out.push(b':');
                match value {
                    Some(v) => write_str(&mut out, &v.0),
                    None => out.extend_from_slice(b"null"),
                }
                out.push(b',');
            }
            out.extend_from_slice(b"\"_pgrelay_hlc\":");
            out.extend_from_slice(e.pgrelay.hlc.to_string().as_bytes());
            out.push(b'}');
        }
        out.push(b']');
        let newest = envs.iter().max_by_key(|e| e.pgrelay.hlc).expect("records");
        let ts = envs.iter().map(|e| e.ts_ms).max().unwrap_or(0);
        (out, newest.pgrelay.commit_lsn.0.to_string(), ts)
    }
}

fn prototype(c: &mut Criterion) {
    let targets = common::targets();
    let target = targets.values().next().expect("one table");
    let mut g = c.benchmark_group("apply_proto");
    g.throughput(Throughput::Elements(BATCH as u64));
    for (what, op, dup) in [
        ("insert_distinct", Op::Insert, 1usize),
        ("update_distinct", Op::Update, 1),
    ] {
        let records = common::records(BATCH, op, dup);
        // same rows as today's plan
        let fast: serde_json::Value =
            serde_json::from_slice(&proto::apply(&records, &target.columns, &target.key).0)
                .expect("json");
        let incoming = common::incoming(BATCH, op, dup);
        let today: serde_json::Value =
            serde_json::from_str(&plan(&incoming, &targets)[0].rows).expect("json");
        assert_eq!(fast, today, "prototype rows differ");
        g.bench_with_input(BenchmarkId::new("parse+plan", what), &records, |b, recs| {
            b.iter(|| proto::apply(black_box(recs), &target.columns, &target.key))
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20);
    targets = apply, prototype
}
criterion_main!(benches);
