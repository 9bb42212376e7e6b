//! `pgoutput` decoding: one message (the payload of an `XLogData` frame) ->
//! `pgrelay::pgoutput::Message`. Throughput is in messages (row events).
//!
//! Rows have 5, 10 or 20 columns of mixed types (bigint, text, numeric,
//! bool, timestamptz, jsonb, uuid, float, date, arrays, a NULL), values in
//! text format as PostgreSQL 15 sends them. `update_full` carries the old
//! row too (`REPLICA IDENTITY FULL`, which `pgrelay setup` sets on every
//! replicated table); `update_key` only the new row.
//!
//! `cargo bench --bench decode`

mod common;

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pgrelay::pgoutput::{decode, parse_frame};

fn messages(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(1));
    for n in [5usize, 10, 20] {
        let cases = [
            ("insert", common::insert(n, false, 1_234_567)),
            ("update_full", common::update(n, false, 1_234_567, true)),
            ("update_key", common::update(n, false, 1_234_567, false)),
        ];
        for (what, bytes) in cases {
            assert!(decode(bytes.clone()).is_ok());
            g.bench_with_input(BenchmarkId::new(what, format!("{n}col")), &bytes, |b, m| {
                b.iter(|| decode(black_box(m.clone())).unwrap())
            });
        }
    }
    // The XLogData frame around it (what the capture loop parses first).
    let mut frame = vec![b'w'];
    frame.extend(1u64.to_be_bytes());
    frame.extend(2u64.to_be_bytes());
    frame.extend(3i64.to_be_bytes());
    frame.extend_from_slice(&common::insert(10, true, 1_234_567));
    let frame = Bytes::from(frame);
    g.bench_function("frame+insert/10col", |b| {
        b.iter(|| match parse_frame(black_box(frame.clone())).unwrap() {
            pgrelay::pgoutput::Frame::XLogData { payload, .. } => decode(payload).unwrap(),
            _ => unreachable!(),
        })
    });
    g.finish();
}

fn parse_hex(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}

/// The stream captured from a real PostgreSQL 15 (src/pgoutput/testdata):
/// Begin/Relation/Insert/Update/Delete/Truncate/Origin/Commit, including a
/// 4 kB TOASTed value.
fn captured_stream(c: &mut Criterion) {
    let stream: Vec<Bytes> = include_str!("../src/pgoutput/testdata/pg15_text.hex")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| Bytes::from(parse_hex(l.split_once(' ').expect("lsn hex").1.trim())))
        .collect();
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(stream.len() as u64));
    g.bench_function("pg15_captured_stream", |b| {
        b.iter(|| {
            for m in &stream {
                black_box(decode(m.clone()).unwrap());
            }
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = messages, captured_stream
}
criterion_main!(benches);
