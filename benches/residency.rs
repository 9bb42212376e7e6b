//! The residency router: `Policy::route(change, destination)` for one row
//! change and one destination, with the policy compiled from a config parsed
//! by `pgrelay::config::parse` (regions us, eu, cn; source us). Throughput is
//! in routed (change, destination) pairs.
//!
//! `cargo bench --bench residency`

mod common;

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pgrelay::event::{Op, TableName};
use pgrelay::residency::Verdict;

fn route(c: &mut Criterion) {
    let policy = common::policy("us");
    let mut g = c.benchmark_group("route");
    g.throughput(Throughput::Elements(1));
    let cases = [
        ("global", "bench_8", 8usize, Op::Insert, 0usize),
        ("global", "bench_8", 8, Op::Update, 0),
        ("global", "bench_20", 20, Op::Insert, 0),
        ("owned", "owned_8", 8, Op::Insert, 0),
        // partitioned, home US (allowed everywhere); to cn: hash + mask
        ("partitioned_hash_mask", "part_8", 8, Op::Insert, 0),
        ("partitioned_hash_mask", "part_8", 8, Op::Update, 0),
        // to eu: mask + drop
        ("partitioned_mask_drop", "part_8", 8, Op::Insert, 1),
        // a local table: dropped without copying
        ("local", "users", 8, Op::Insert, 0),
    ];
    let dests = policy.destinations().to_vec();
    for (what, table, n, op, dest) in cases {
        let schema = common::schema(TableName::new("public", table), n);
        let change = common::change(&schema, op, 42);
        let verdict = policy.route(&change, dest);
        if what != "local" {
            assert!(
                matches!(verdict, Verdict::Publish(_)),
                "{what}: {verdict:?}"
            );
        }
        let id = format!("{}_{n}col_to_{}", op.code(), dests[dest]);
        g.bench_with_input(BenchmarkId::new(what, id), &change, |b, ch| {
            b.iter(|| policy.route(black_box(ch), black_box(dest)))
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = route
}
criterion_main!(benches);
