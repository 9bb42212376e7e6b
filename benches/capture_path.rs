//! The capture side's whole CPU path for one row event, without the network:
//! XLogData frame -> `pgoutput::decode` -> `Assembler::push` (relation cache,
//! stamp column, text values) -> for each destination `Policy::route` ->
//! `envelope::encode` -> the per-record header work of the capture loop
//! (`capture::Loop::publish`). Kafka's `send` is not included. Source us, destinations cn and eu
//! (two records per row event for global tables). Throughput is in row
//! events (messages from the slot).
//!
//! `cargo bench --bench capture_path`

mod common;

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pgrelay::event::Change;
use pgrelay::pgoutput::{decode, parse_frame, Frame};
use pgrelay::publish::envelope::{encode, Source};
use pgrelay::residency::{Policy, Verdict};
use pgrelay::source::assemble::{Assembler, Output};

fn frame(payload: &[u8]) -> Bytes {
    let mut v = vec![b'w'];
    v.extend(1u64.to_be_bytes());
    v.extend(2u64.to_be_bytes());
    v.extend(3i64.to_be_bytes());
    v.extend_from_slice(payload);
    Bytes::from(v)
}

fn assembler(n: usize, replica_identity: u8) -> Assembler {
    let (declared, keys) = common::assembler_inputs(n);
    let mut a = Assembler::new(declared, keys, 1);
    a.push(decode(common::begin(1000)).unwrap()).unwrap();
    a.push(decode(common::relation(n, true, replica_identity)).unwrap())
        .unwrap();
    a
}

/// What `capture::Loop::publish` does per destination, minus `send`.
fn publish(policy: &Policy, source: &Source, change: &Change) -> usize {
    let mut bytes = 0;
    for i in 0..policy.destinations().len() {
        let Verdict::Publish(routed) = policy.route(change, i) else {
            continue;
        };
        let record = encode(source, change, &routed);
        let hlc = change.hlc.to_string();
        bytes += record.key.len() + record.value.len() + hlc.len() + record.table.len();
    }
    bytes
}

fn capture(c: &mut Criterion) {
    let policy = common::policy("us");
    let source = common::source();
    let mut g = c.benchmark_group("capture_path");
    g.throughput(Throughput::Elements(1));
    for n in [8usize, 20] {
        let cases = [
            ("insert", common::insert(n, true, 1_234_567), b'd'),
            (
                "update_full",
                common::update(n, true, 1_234_567, true),
                b'f',
            ),
        ];
        for (what, msg, ri) in cases {
            let bytes = frame(&msg);
            // decode + assemble only
            let mut a = assembler(n, ri);
            g.bench_with_input(
                BenchmarkId::new(format!("decode+assemble/{what}"), format!("{n}col")),
                &bytes,
                |b, f| {
                    b.iter(|| {
                        let Frame::XLogData { payload, .. } = parse_frame(f.clone()).unwrap()
                        else {
                            unreachable!()
                        };
                        black_box(a.push(decode(payload).unwrap()).unwrap())
                    })
                },
            );
            // the whole path
            let mut a = assembler(n, ri);
            g.bench_with_input(
                BenchmarkId::new(format!("full/{what}"), format!("{n}col")),
                &bytes,
                |b, f| {
                    b.iter(|| {
                        let Frame::XLogData { payload, .. } = parse_frame(f.clone()).unwrap()
                        else {
                            unreachable!()
                        };
                        match a.push(decode(payload).unwrap()).unwrap() {
                            Some(Output::Change(ch)) => black_box(publish(&policy, &source, &ch)),
                            other => panic!("unexpected {other:?}"),
                        }
                    })
                },
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
    targets = capture
}
criterion_main!(benches);
