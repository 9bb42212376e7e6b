//! Envelope encoding: `pgrelay::publish::envelope::encode` of one routed
//! change into a Kafka key + Debezium-like JSON value. Throughput is in
//! records; the value size is printed once per case.
//!
//! `cargo bench --bench envelope`

mod common;

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pgrelay::event::{Op, TableName};
use pgrelay::publish::envelope::encode;
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
                &(change, routed),
                |b, (ch, r)| b.iter(|| encode(black_box(&source), black_box(ch), black_box(r))),
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
    targets = envelope
}
criterion_main!(benches);
