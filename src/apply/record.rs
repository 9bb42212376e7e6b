//! Kafka record -> a change the apply side may execute, or the reason it may
//! not. Trusts nothing in the record: the table must be declared (and not
//! `local`), every column must exist in the target table, and values are
//! only ever passed as JSON parameters, never spliced into SQL.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::de::{Deserializer, Visitor};
use serde::Deserialize;

use crate::event::{Op, TableName};

/// A change ready to apply. Values are PostgreSQL text (or NULL).
#[derive(Debug, Clone, PartialEq)]
pub struct Incoming {
    pub table: TableName,
    pub op: Op,
    pub hlc: u64,
    pub origin: String,
    pub commit_lsn: String,
    pub commit_ts_ms: i64,
    /// Primary key values (text), in key-column order.
    pub key: Vec<Option<String>>,
    /// Column values to write (inserts/updates): name -> text or NULL.
    /// Columns the stream marked unchanged are absent.
    pub values: BTreeMap<String, Option<String>>,
}

/// Why a record cannot be applied at all (it goes to the dead-letter topic).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("record is not a pgrelay envelope: {0}")]
    Poison(String),
    #[error("table {0:?} is not declared for replication in this region's config")]
    UndeclaredTable(String),
    #[error("table {table}: column {column:?} does not exist in the target table")]
    UnknownColumn { table: String, column: String },
    #[error("table {table}: record lacks primary key column {column:?}")]
    MissingKey { table: String, column: String },
    #[error("unknown operation {0:?}")]
    UnknownOp(String),
}

impl Rejection {
    /// Error class for the dead-letter headers and metrics.
    pub fn class(&self) -> &'static str {
        match self {
            Rejection::Poison(_) => "poison",
            Rejection::UndeclaredTable(_) => "undeclared_table",
            Rejection::UnknownColumn { .. } => "unknown_column",
            Rejection::MissingKey { .. } => "missing_key",
            Rejection::UnknownOp(_) => "unknown_op",
        }
    }
}

/// What the apply side knows of one target table.
#[derive(Debug, Clone)]
pub struct TargetTable {
    pub name: TableName,
    pub key: Vec<String>,
    pub columns: Vec<String>,
}

/// The declared, non-local tables of the target, by `schema.table`.
pub type Targets = HashMap<String, TargetTable>;

/// A column value as text: JSON strings as they are, numbers and booleans
/// (written by other producers) in their JSON spelling.
struct TextValue(String);

impl<'de> Deserialize<'de> for TextValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = TextValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E>(self, v: &str) -> Result<TextValue, E> {
                Ok(TextValue(v.to_owned()))
            }
            fn visit_string<E>(self, v: String) -> Result<TextValue, E> {
                Ok(TextValue(v))
            }
            fn visit_bool<E>(self, v: bool) -> Result<TextValue, E> {
                Ok(TextValue(v.to_string()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<TextValue, E> {
                Ok(TextValue(v.to_string()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<TextValue, E> {
                Ok(TextValue(v.to_string()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<TextValue, E> {
                Ok(TextValue(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

type Row = BTreeMap<String, Option<TextValue>>;

/// The parts of the envelope the apply side reads, decoded straight into
/// text values (no intermediate JSON tree).
#[derive(Deserialize)]
struct ApplyEnvelope {
    before: Option<Row>,
    after: Option<Row>,
    op: String,
    ts_ms: i64,
    source: ApplySource,
    pgrelay: ApplyMeta,
}

#[derive(Deserialize)]
struct ApplySource {
    schema: String,
    table: String,
}

#[derive(Deserialize)]
struct ApplyMeta {
    hlc: u64,
    origin: String,
    commit_lsn: String,
    #[serde(default)]
    unchanged: Vec<String>,
}

/// Parses and validates one record value.
pub fn parse(value: Option<&[u8]>, targets: &Targets) -> Result<Incoming, Rejection> {
    let value = value.ok_or_else(|| Rejection::Poison("empty record".into()))?;
    let env: ApplyEnvelope =
        serde_json::from_slice(value).map_err(|e| Rejection::Poison(e.to_string()))?;
    let table_name = format!("{}.{}", env.source.schema, env.source.table);
    let target = targets
        .get(&table_name)
        .ok_or_else(|| Rejection::UndeclaredTable(table_name.clone()))?;
    let op = Op::from_code(&env.op).ok_or_else(|| Rejection::UnknownOp(env.op.clone()))?;
    let row = match op {
        Op::Delete => env.before,
        Op::Truncate => None,
        _ => env.after,
    };
    let mut values = BTreeMap::new();
    let mut key = Vec::with_capacity(target.key.len());
    if let Some(row) = row {
        if let Some(col) = row.keys().find(|col| !target.columns.contains(col)) {
            return Err(Rejection::UnknownColumn {
                table: table_name.clone(),
                column: col.clone(),
            });
        }
        for k in &target.key {
            let v = row.get(k).ok_or_else(|| Rejection::MissingKey {
                table: table_name.clone(),
                column: k.clone(),
            })?;
            key.push(v.as_ref().map(|t| t.0.clone()));
        }
        if op != Op::Delete {
            values = row
                .into_iter()
                .map(|(col, v)| (col, v.map(|t| t.0)))
                .collect();
        }
    } else if op != Op::Truncate {
        return Err(Rejection::Poison(format!(
            "{} record without a row",
            env.op
        )));
    }
    for col in &env.pgrelay.unchanged {
        if !target.columns.iter().any(|c| c == col) {
            return Err(Rejection::UnknownColumn {
                table: table_name.clone(),
                column: col.clone(),
            });
        }
    }
    Ok(Incoming {
        table: target.name.clone(),
        op,
        hlc: env.pgrelay.hlc,
        origin: env.pgrelay.origin,
        commit_lsn: env.pgrelay.commit_lsn,
        commit_ts_ms: env.ts_ms,
        key,
        values,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets() -> Targets {
        let mut t = Targets::new();
        t.insert(
            "public.products".into(),
            TargetTable {
                name: TableName::new("public", "products"),
                key: vec!["id".into()],
                columns: vec!["id".into(), "name".into(), "_pgrelay_hlc".into()],
            },
        );
        t
    }

    fn envelope(table: &str, after: &str) -> Vec<u8> {
        format!(
            r#"{{"before":null,"after":{after},"op":"c","ts_ms":1,"source":{{"connector":"pgrelay","version":"0","name":"p","region":"us","db":"d","schema":"public","table":{table},"txId":1,"lsn":1,"ts_ms":1}},"pgrelay":{{"hlc":77,"origin":"us","commit_lsn":"0/1","xid":1,"seq":0,"unchanged":[]}}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn accepts_a_declared_row() {
        let r = parse(
            Some(&envelope("\"products\"", r#"{"id":"1","name":"tea"}"#)),
            &targets(),
        )
        .unwrap();
        assert_eq!(r.key, vec![Some("1".to_string())]);
        assert_eq!(r.values["name"], Some("tea".to_string()));
        assert_eq!(r.hlc, 77);
    }

    #[test]
    fn rejects_injection_attempts_and_garbage() {
        let t = targets();
        let bad_table = parse(
            Some(&envelope(
                "\"products\\\"; DROP TABLE products; --\"",
                r#"{"id":"1"}"#,
            )),
            &t,
        );
        assert_eq!(bad_table.unwrap_err().class(), "undeclared_table");
        let bad_col = parse(
            Some(&envelope(
                "\"products\"",
                r#"{"id":"1","name\"; DROP TABLE x; --":"a"}"#,
            )),
            &t,
        );
        assert_eq!(bad_col.unwrap_err().class(), "unknown_column");
        assert_eq!(
            parse(Some(b"\xff\x00garbage"), &t).unwrap_err().class(),
            "poison"
        );
        assert_eq!(parse(None, &t).unwrap_err().class(), "poison");
        let no_key = parse(Some(&envelope("\"products\"", r#"{"name":"a"}"#)), &t);
        assert_eq!(no_key.unwrap_err().class(), "missing_key");
    }
}
