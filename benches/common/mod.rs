//! Shared fixtures of the micro-benchmarks: realistic rows (mixed column
//! types, values in PostgreSQL's text output format, as `pgoutput` sends
//! them), their `pgoutput` bytes, the relay configuration and the changes
//! the capture side produces from them.
//!
//! Not a bench target itself (cargo only discovers `benches/*.rs`).

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use pgrelay::apply::record::{Incoming, TargetTable, Targets};
use pgrelay::event::{Change, ColumnDesc, Datum, Lsn, Op, TableName, TableSchema, TxMeta};
use pgrelay::publish::envelope::{self, Source};
use pgrelay::residency::{Policy, Verdict};

/// Column name, type oid, text value (`None`: SQL NULL). The first column is
/// the primary key. Types and values are those of a typical OLTP row.
pub const COLUMNS: [(&str, u32, Option<&str>); 20] = [
    ("id", 20, Some("1234567")),
    ("name", 25, Some("Widget Deluxe 3000")),
    ("email", 25, Some("alice.smith@example.com")),
    ("price", 1700, Some("1234.56")),
    ("active", 16, Some("t")),
    ("created_at", 1184, Some("2024-05-06 07:08:09.123456+00")),
    (
        "doc",
        3802,
        Some(r#"{"qty": 3, "tags": ["a", "b"], "color": "red"}"#),
    ),
    ("country", 25, Some("US")),
    ("qty", 23, Some("42")),
    ("uid", 2950, Some("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")),
    ("ratio", 701, Some("0.3333333333333333")),
    ("day", 1082, Some("2024-05-06")),
    ("note", 25, None),
    ("tags", 1009, Some("{alpha,beta,gamma}")),
    ("updated_at", 1184, Some("2024-06-07 08:09:10.654321+00")),
    ("score", 700, Some("98.6")),
    ("city", 25, Some("San Francisco")),
    ("zip", 1043, Some("94107")),
    ("version", 21, Some("7")),
    (
        "description",
        25,
        Some("A sturdy widget for everyday use, with a two-year warranty."),
    ),
];

/// Where `pgrelay setup` puts the stamp column: last.
pub const HLC_COLUMN: &str = "_pgrelay_hlc";
pub const HLC_VALUE: &str = "7190123456789012481";

pub const REL_OID: u32 = 16_400;

// ---------------------------------------------------------------------------
// pgoutput bytes (protocol version 1), built as the server builds them

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

/// `'R'` for the first `n` columns (plus the stamp column when `hlc`).
pub fn relation(n: usize, hlc: bool, replica_identity: u8) -> Bytes {
    let mut out = vec![b'R'];
    out.extend(REL_OID.to_be_bytes());
    put_str(&mut out, "public");
    put_str(&mut out, &format!("bench_{n}"));
    out.push(replica_identity);
    let total = n + usize::from(hlc);
    out.extend((total as i16).to_be_bytes());
    let full = replica_identity == b'f';
    for (i, (name, oid, _)) in COLUMNS.iter().take(n).enumerate() {
        out.push(u8::from(i == 0 || full));
        put_str(&mut out, name);
        out.extend(oid.to_be_bytes());
        out.extend((-1i32).to_be_bytes());
    }
    if hlc {
        out.push(u8::from(full));
        put_str(&mut out, HLC_COLUMN);
        out.extend(20u32.to_be_bytes());
        out.extend((-1i32).to_be_bytes());
    }
    Bytes::from(out)
}

/// A `TupleData` of the first `n` columns with row number `row` in the key,
/// and the stamp column when `hlc`.
fn tuple(out: &mut Vec<u8>, n: usize, hlc: bool, row: u64, tweak: &str) {
    out.extend(((n + usize::from(hlc)) as i16).to_be_bytes());
    for (i, (_, _, value)) in COLUMNS.iter().take(n).enumerate() {
        let owned;
        let value = match (i, value) {
            (0, _) => {
                owned = row.to_string();
                Some(owned.as_str())
            }
            (1, Some(v)) if !tweak.is_empty() => {
                owned = format!("{v}{tweak}");
                Some(owned.as_str())
            }
            (_, v) => *v,
        };
        match value {
            None => out.push(b'n'),
            Some(v) => {
                out.push(b't');
                out.extend((v.len() as i32).to_be_bytes());
                out.extend_from_slice(v.as_bytes());
            }
        }
    }
    if hlc {
        out.push(b't');
        out.extend((HLC_VALUE.len() as i32).to_be_bytes());
        out.extend_from_slice(HLC_VALUE.as_bytes());
    }
}

/// `'I'` of row `row`.
pub fn insert(n: usize, hlc: bool, row: u64) -> Bytes {
    let mut out = vec![b'I'];
    out.extend(REL_OID.to_be_bytes());
    out.push(b'N');
    tuple(&mut out, n, hlc, row, "");
    Bytes::from(out)
}

/// `'U'` of row `row`; with `full` the old row too (`REPLICA IDENTITY
/// FULL`, which `pgrelay setup` sets on every replicated table).
pub fn update(n: usize, hlc: bool, row: u64, full: bool) -> Bytes {
    let mut out = vec![b'U'];
    out.extend(REL_OID.to_be_bytes());
    if full {
        out.push(b'O');
        tuple(&mut out, n, hlc, row, "");
    }
    out.push(b'N');
    tuple(&mut out, n, hlc, row, " v2");
    Bytes::from(out)
}

pub fn begin(xid: u32) -> Bytes {
    let mut out = vec![b'B'];
    out.extend(0x0000_0001_0000_0000u64.to_be_bytes());
    out.extend(769_000_000_000_000i64.to_be_bytes());
    out.extend(xid.to_be_bytes());
    Bytes::from(out)
}

pub fn commit() -> Bytes {
    let mut out = vec![b'C', 0];
    out.extend(0x0000_0001_0000_0000u64.to_be_bytes());
    out.extend(0x0000_0001_0000_0100u64.to_be_bytes());
    out.extend(769_000_000_000_000i64.to_be_bytes());
    Bytes::from(out)
}

// ---------------------------------------------------------------------------
// the capture side's view

pub fn table_name(n: usize) -> TableName {
    TableName::new("public", format!("bench_{n}"))
}

/// The relay configuration of the benchmarks: regions us, eu, cn; the
/// 8-column tables in three classes, a partitioned one with column rules.
pub fn config_text() -> String {
    r#"
[relay]
prefix = "pgrelay"

[kafka]
brokers = "127.0.0.1:9092"

[regions.us]
id = 1
dsn = "host=127.0.0.1 port=5432 user=postgres dbname=app"
hash_key = "bench-us-key-0123456789abcdef0123456789"

[regions.eu]
id = 2
dsn = "host=127.0.0.1 port=5433 user=postgres dbname=app"
hash_key = "bench-eu-key-0123456789abcdef0123456789"

[regions.cn]
id = 3
dsn = "host=127.0.0.1 port=5434 user=postgres dbname=app"
hash_key = "bench-cn-key-0123456789abcdef0123456789"

[[tables]]
name = "public.bench_8"
class = "global"

[[tables]]
name = "public.bench_20"
class = "global"

[[tables]]
name = "public.owned_8"
class = "owned"
owner = "us"

[[tables]]
name = "public.part_8"
class = "partitioned"
home_column = "country"
aliases = { US = "us", CA = "us", DE = "eu", FR = "eu", CN = "cn" }
[tables.allow]
us = ["eu", "cn"]
eu = []
cn = []
[[tables.columns]]
name = "email"
action = "hash"
to = ["cn"]
[[tables.columns]]
name = "price"
action = "mask"
mask = "****"
[[tables.columns]]
name = "doc"
action = "drop"
to = ["eu"]

[[tables]]
name = "public.users"
class = "local"
"#
    .to_string()
}

pub fn policy(source: &str) -> Policy {
    let config = pgrelay::config::parse(&config_text(), "bench.toml").expect("bench config");
    Policy::compile(&config, source).expect("policy")
}

pub fn schema(table: TableName, n: usize) -> Arc<TableSchema> {
    Arc::new(TableSchema {
        oid: REL_OID,
        table,
        columns: COLUMNS
            .iter()
            .take(n)
            .enumerate()
            .map(|(i, (name, oid, _))| ColumnDesc {
                name: name.to_string(),
                type_oid: *oid,
                is_key: i == 0,
            })
            .collect(),
    })
}

pub fn row(n: usize, id: u64, tweak: &str) -> Vec<Datum> {
    COLUMNS
        .iter()
        .take(n)
        .enumerate()
        .map(|(i, (_, _, v))| match (i, v) {
            (0, _) => Datum::Text(id.to_string()),
            (1, Some(v)) => Datum::Text(format!("{v}{tweak}")),
            (_, Some(v)) => Datum::Text(v.to_string()),
            (_, None) => Datum::Null,
        })
        .collect()
}

pub fn tx() -> Arc<TxMeta> {
    Arc::new(TxMeta {
        xid: 123_456,
        commit_lsn: Lsn(0x0000_0001_0000_0000),
        commit_ts_us: 1_715_000_000_123_456,
    })
}

/// An insert (`before` None) or an update with the full old row.
pub fn change(schema: &Arc<TableSchema>, op: Op, id: u64) -> Change {
    let n = schema.columns.len();
    let (before, after) = match op {
        Op::Insert => (None, Some(row(n, id, ""))),
        Op::Update => (Some(row(n, id, "")), Some(row(n, id, " v2"))),
        Op::Delete => (Some(row(n, id, "")), None),
        Op::Truncate => (None, None),
    };
    Change {
        schema: schema.clone(),
        op,
        before,
        after,
        hlc: pgrelay::hlc::Hlc::new(7_190_123_456_789_012_481),
        tx: tx(),
        seq: id,
    }
}

pub fn source() -> Source {
    Source {
        prefix: "pgrelay".into(),
        region: "us".into(),
        db: "app".into(),
    }
}

/// Declared tables and their keys, as the capture loop passes them to
/// the assembler.
pub fn assembler_inputs(n: usize) -> (HashSet<TableName>, HashMap<TableName, Vec<String>>) {
    let t = table_name(n);
    let mut keys = HashMap::new();
    keys.insert(t.clone(), vec!["id".to_string()]);
    (HashSet::from([t]), keys)
}

/// Encoded records as the apply side consumes them: `count` rows of the
/// 8-column global table, `op` for all of them, each key `dup` times (the
/// later ones with higher stamps).
pub fn records(count: usize, op: Op, dup: usize) -> Vec<Vec<u8>> {
    let schema = schema(table_name(8), 8);
    let policy = policy("us");
    let src = source();
    (0..count)
        .map(|i| {
            let mut c = change(&schema, op, (i / dup.max(1)) as u64);
            c.hlc = pgrelay::hlc::Hlc::new(c.hlc.get() + i as u64);
            match policy.route(&c, 0) {
                Verdict::Publish(r) => envelope::encode(&src, &c, &r).value,
                Verdict::Drop(d) => panic!("dropped: {d:?}"),
            }
        })
        .collect()
}

/// The target side's description of the 8-column table.
pub fn targets() -> Targets {
    let mut t = Targets::new();
    let name = table_name(8);
    let mut columns: Vec<String> = COLUMNS.iter().take(8).map(|c| c.0.to_string()).collect();
    columns.push(HLC_COLUMN.to_string());
    t.insert(
        name.to_string(),
        TargetTable {
            dropped: Vec::new(),
            name,
            key: vec!["id".into()],
            columns,
            column_types: vec![],
            json_columns: vec![("doc".into(), "jsonb".into())],
            admit: Default::default(),
            merge: vec![],
        },
    );
    t
}

/// Parsed changes for `sql::plan`, borrowing from `records`.
pub fn incoming<'a>(records: &'a [Vec<u8>], targets: &'a Targets) -> Vec<Incoming<'a>> {
    records
        .iter()
        .map(|v| pgrelay::apply::record::parse(Some(v), targets).expect("valid record"))
        .collect()
}
