//! The types that flow through pgrelay, from the replication stream to Kafka.
//!
//! ```text
//! pgoutput bytes -> Message -> (assembly) -> Change -> (residency) -> Routed -> (publish) -> record
//! ```
//!
//! Values stay in PostgreSQL's text output format from end to end: the
//! capture side never needs to understand a type to route or publish it, and
//! the apply side casts the text back with the target column's own type.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// A WAL position (`pg_lsn`). Ordered, printed as `X/Y` like PostgreSQL does.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    pub const ZERO: Lsn = Lsn(0);
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl fmt::Debug for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Lsn {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (hi, lo) = s
            .split_once('/')
            .ok_or_else(|| format!("invalid LSN {s:?}: expected X/Y"))?;
        let hi = u64::from_str_radix(hi, 16).map_err(|_| format!("invalid LSN {s:?}"))?;
        let lo = u64::from_str_radix(lo, 16).map_err(|_| format!("invalid LSN {s:?}"))?;
        if hi > u32::MAX as u64 || lo > u32::MAX as u64 {
            return Err(format!("invalid LSN {s:?}: component out of range"));
        }
        Ok(Lsn((hi << 32) | lo))
    }
}

/// One column value as it travels: PostgreSQL's text format, NULL, or the
/// "unchanged TOAST" marker meaning "this column was not modified and the
/// stream did not carry its value" (the apply side must leave it alone).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Datum {
    Null,
    Unchanged,
    Text(String),
}

impl Datum {
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Datum::Text(s) => Some(s),
            _ => None,
        }
    }
}

/// A fully qualified table name (`schema.table`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        TableName {
            schema: schema.into(),
            name: name.into(),
        }
    }

    /// Parses `schema.table` or `table` (schema `public`).
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (schema, name) = match s.split_once('.') {
            Some((schema, name)) => (schema, name),
            None => ("public", s),
        };
        if schema.is_empty() || name.is_empty() || name.contains('.') {
            return Err(format!(
                "invalid table name {s:?}: expected \"schema.table\" or \"table\""
            ));
        }
        Ok(TableName::new(schema, name))
    }

    /// The name quoted for SQL: `"schema"."table"`.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// The settings under which values are turned into text wherever pgrelay
/// reads or compares them (the capture side's walsender, the apply
/// sessions, the delete trigger's key): the same value is then spelled the
/// same way in every region and session — a `timestamptz` in UTC, dates
/// and intervals in ISO form, floats shortest-exact, `bytea` in hex — so
/// keys match across regions and tombstones match the rows they bury.
pub const CANONICAL_TEXT_SETTINGS: [(&str, &str); 5] = [
    ("TimeZone", "UTC"),
    ("DateStyle", "ISO, MDY"),
    ("IntervalStyle", "postgres"),
    ("extra_float_digits", "1"),
    ("bytea_output", "hex"),
];

/// The settings of [`CANONICAL_TEXT_SETTINGS`] as `SET k = 'v'` clauses,
/// joined by `sep` (`"; "` for statements, `" "` for a function's
/// definition).
pub fn canonical_text_sets(sep: &str) -> String {
    CANONICAL_TEXT_SETTINGS
        .iter()
        .map(|(k, v)| format!("SET {k} = {}", quote_literal(v)))
        .collect::<Vec<_>>()
        .join(sep)
}

/// A row's identity as one number: FNV-1a over the table name and each
/// primary-key column's name and text value, combined so that the order of
/// the key columns does not matter. The capture side picks a record's Kafka
/// partition from it and the apply side its lock bucket, so both agree on
/// which rows may share a partition without agreeing on column order.
pub fn row_hash<'a>(
    table: &TableName,
    key: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
) -> u32 {
    let mut h = RowHasher::new(table);
    for (name, value) in key {
        h.add(name, value);
    }
    h.finish()
}

/// [`row_hash`] built one key column at a time.
pub struct RowHasher {
    table: u32,
    columns: u32,
}

const FNV_BASIS: u32 = 0x811c_9dc5;

fn fnv(mut h: u32, bytes: &[u8]) -> u32 {
    for b in bytes {
        h ^= *b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

impl RowHasher {
    pub fn new(table: &TableName) -> Self {
        let h = fnv(
            fnv(fnv(FNV_BASIS, table.schema.as_bytes()), b"."),
            table.name.as_bytes(),
        );
        RowHasher {
            table: h,
            columns: 0,
        }
    }

    pub fn add(&mut self, name: &str, value: Option<&str>) {
        let c = fnv(FNV_BASIS, name.as_bytes());
        let c = match value {
            Some(v) => fnv(fnv(c, b"="), v.as_bytes()),
            None => fnv(c, b"\0"),
        };
        // a sum: the order of the key columns does not matter
        self.columns = self.columns.wrapping_add(c);
    }

    pub fn finish(&self) -> u32 {
        // murmur3's finalizer: every input bit reaches the low bits that a
        // modulo keeps
        let mut x = self.table ^ self.columns.rotate_left(16);
        x ^= x >> 16;
        x = x.wrapping_mul(0x85eb_ca6b);
        x ^= x >> 13;
        x = x.wrapping_mul(0xc2b2_ae35);
        x ^ (x >> 16)
    }
}

/// Quotes an SQL identifier, doubling embedded quotes.
pub fn quote_ident(ident: &str) -> String {
    postgres_protocol::escape::escape_identifier(ident)
}

/// Quotes an SQL string literal (postgres-protocol's escaping: quotes
/// doubled, and a value with backslashes written as `E'...'` with them
/// doubled, so it reads the same whatever `standard_conforming_strings` is).
pub fn quote_literal(value: &str) -> String {
    postgres_protocol::escape::escape_literal(value)
}

/// One column of a relation as described by the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnDesc {
    pub name: String,
    pub type_oid: u32,
    /// Part of the replica identity (the key) of the relation.
    pub is_key: bool,
}

/// The shape of a table as last announced by a Relation message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableSchema {
    pub oid: u32,
    pub table: TableName,
    pub columns: Vec<ColumnDesc>,
}

impl TableSchema {
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Insert,
    Update,
    Delete,
    Truncate,
}

impl Op {
    /// Debezium's one-letter operation code.
    pub fn code(self) -> &'static str {
        match self {
            Op::Insert => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Truncate => "t",
        }
    }

    pub fn from_code(code: &str) -> Option<Op> {
        match code {
            "c" | "r" => Some(Op::Insert),
            "u" => Some(Op::Update),
            "d" => Some(Op::Delete),
            "t" => Some(Op::Truncate),
            _ => None,
        }
    }
}

/// What the whole transaction shares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxMeta {
    pub xid: u32,
    /// LSN of the commit record (Begin's final LSN).
    pub commit_lsn: Lsn,
    /// Commit time, microseconds since the Unix epoch.
    pub commit_ts_us: i64,
}

/// One row change of a declared table, before routing.
///
/// `before` is the old tuple when the stream has one (replica identity FULL
/// or a key change), otherwise `None`; for deletes it holds at least the key.
/// Values are indexed like `schema.columns`.
#[derive(Clone, Debug)]
pub struct Change {
    pub schema: Arc<TableSchema>,
    pub op: Op,
    pub before: Option<Vec<Datum>>,
    pub after: Option<Vec<Datum>>,
    /// The HLC stamp of this write.
    pub hlc: crate::hlc::Hlc,
    pub tx: Arc<TxMeta>,
    /// Position of this change inside its transaction (0-based).
    pub seq: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_hash_ignores_key_column_order_but_not_values() {
        let t = TableName::new("public", "orders");
        let a = row_hash(&t, [("region", Some("eu")), ("id", Some("7"))]);
        let b = row_hash(&t, [("id", Some("7")), ("region", Some("eu"))]);
        assert_eq!(a, b);
        assert_ne!(a, row_hash(&t, [("id", Some("8")), ("region", Some("eu"))]));
        assert_ne!(a, row_hash(&t, [("id", Some("7")), ("region", None)]));
        let other = TableName::new("public", "orders2");
        assert_ne!(
            a,
            row_hash(&other, [("region", Some("eu")), ("id", Some("7"))])
        );
        // spreads over small moduli
        let mut seen = [0u32; 6];
        for i in 0..6000 {
            let v = i.to_string();
            seen[(row_hash(&t, [("id", Some(v.as_str()))]) % 6) as usize] += 1;
        }
        assert!(seen.iter().all(|n| (800..1200).contains(n)), "{seen:?}");
    }
}
