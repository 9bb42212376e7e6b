//! The apply side's CPU work per batch, without the database:
//! `record::parse` (JSON envelope -> `Incoming`) and `sql::plan` (newest
//! change per key, grouping, SQL text and the JSON rows parameter). A batch
//! is 5,000 records (`relay.apply.batch_max_records`' default) of the
//! 8-column global table. Throughput is in records.
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
        let incoming = common::incoming(&records, &targets);
        let statements = plan(&incoming);
        let json: usize = statements.iter().map(|s| s.rows.len()).sum();
        eprintln!(
            "apply {what}: {} statements, {json} B of JSON rows for {BATCH} records",
            statements.len()
        );
        g.bench_with_input(BenchmarkId::new("plan", what), &incoming, |b, inc| {
            b.iter(|| plan(black_box(inc)))
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
                plan(&inc)
            })
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
    targets = apply
}
criterion_main!(benches);
