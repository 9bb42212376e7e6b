//! Kafka record -> a change the apply side may execute, or the reason it may
//! not. Trusts nothing in the record: the table must be declared (and not
//! `local`), every column must exist in the target table, and values are
//! only ever passed as JSON parameters, never spliced into SQL.
//!
//! Parsing borrows from the record: a value is copied only when its JSON
//! spelling had escapes, and only the row the operation needs is parsed.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::event::{quote_ident, quote_literal, Op, TableName};
use crate::hlc::Hlc;
use crate::names::HLC_COLUMN;
use crate::publish::envelope::{self, NewerFormat};
use crate::residency::{DropReason, TableRule};

/// Text borrowed from the record unless its JSON spelling had escapes.
pub type Text<'a> = Cow<'a, str>;

/// A change ready to apply. Values are PostgreSQL text (or NULL).
#[derive(Debug, Clone)]
pub struct Incoming<'a> {
    pub table: &'a TargetTable,
    pub op: Op,
    pub hlc: Hlc,
    pub commit_lsn: Text<'a>,
    pub commit_ts_ms: i64,
    /// Sent by `pgrelay resync` (transaction id 0): it carries the row's
    /// own stamp, which another region may have made; a live change
    /// carries a stamp of its source region.
    pub resent: bool,
    /// Primary key values (text), in key-column order.
    pub key: Vec<Option<Text<'a>>>,
    /// Inserts and updates: the names of the columns to write, sorted.
    /// Columns the stream marked unchanged are absent.
    pub columns: Vec<Text<'a>>,
    /// Inserts and updates: the values of `columns` (`None`: NULL).
    pub values: Vec<Option<Text<'a>>>,
    /// Deletes of a `partitioned` table: the deleted row's home column
    /// value, when the record carries it (kept with the tombstone).
    pub home: Option<Text<'a>>,
}

impl Incoming<'_> {
    /// The value of column `name` in the row (`None`: absent or NULL).
    pub fn value(&self, name: &str) -> Option<&str> {
        let i = self.columns.iter().position(|c| c == name)?;
        self.values[i].as_deref()
    }
}

/// Why a record cannot be applied at all (it goes to the dead-letter topic).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("record is not a pgrelay envelope: {0}")]
    Poison(String),
    #[error(transparent)]
    NewerFormat(#[from] NewerFormat),
    #[error("table {0:?} is not declared for replication in this region's config")]
    UndeclaredTable(String),
    #[error("table {table}: column {column:?} does not exist in the target table")]
    UnknownColumn { table: String, column: String },
    #[error("table {table}: record lacks primary key column {column:?}")]
    MissingKey { table: String, column: String },
    #[error("unknown operation {0:?}")]
    UnknownOp(String),
    #[error("not accepted by this region's residency policy: {0}")]
    NotAdmitted(String),
    #[error("field {field} is out of range: {reason}")]
    OutOfRange { field: &'static str, reason: String },
    #[error(
        "stamp {stamp} is {ahead_ms} ms ahead of this region's clock (relay.max_stamp_ahead \
         is {limit_ms} ms): not applied, so the region's clock does not follow it"
    )]
    StampAhead {
        stamp: Hlc,
        ahead_ms: i64,
        limit_ms: u64,
    },
    #[error(
        "stamp {stamp} carries region id {claimed}, but the changes of this topic are written \
         in region {region} (id {source_id}): a change is stamped where it is written, so this \
         one is forged or misrouted; not applied"
    )]
    ForeignStamp {
        stamp: Hlc,
        claimed: u8,
        region: String,
        source_id: u8,
    },
    #[error(
        "stamp {stamp} is below the tombstone horizon {horizon} and the row does not exist here: \
         it may have been deleted by a tombstone already purged (relay.apply.tombstone_horizon), \
         so it is not brought back"
    )]
    BeyondHorizon { stamp: Hlc, horizon: Hlc },
}

impl Rejection {
    /// Error class for the dead-letter headers and metrics.
    pub fn class(&self) -> &'static str {
        match self {
            Rejection::Poison(_) => "poison",
            Rejection::NewerFormat(_) => "newer_format",
            Rejection::UndeclaredTable(_) => "undeclared_table",
            Rejection::UnknownColumn { .. } => "unknown_column",
            Rejection::MissingKey { .. } => "missing_key",
            Rejection::UnknownOp(_) => "unknown_op",
            Rejection::NotAdmitted(_) => "not_admitted",
            Rejection::OutOfRange { .. } => "out_of_range",
            Rejection::StampAhead { .. } => "stamp_ahead",
            Rejection::ForeignStamp { .. } => "foreign_stamp",
            Rejection::BeyondHorizon { .. } => "beyond_horizon",
        }
    }
}

/// Whether a dead letter of class `class` may be a change its source
/// committed: not one no source sends (a stamp out of range or claiming
/// another region), which `pgrelay.wait_for` therefore never waits for.
pub fn may_be_genuine(class: &str) -> bool {
    class != "foreign_stamp" && class != "out_of_range"
}

/// What the apply side knows of one target table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetTable {
    pub name: TableName,
    pub key: Vec<String>,
    pub columns: Vec<String>,
    /// Columns the table had here and lost (`target::COLUMNS_TABLE`): a
    /// record that still carries one applies without it.
    pub dropped: Vec<String>,
    /// The type of each of `columns` as the catalog prints it, modifier
    /// included (empty: not known).
    pub column_types: Vec<String>,
    /// Columns of type json or jsonb (or a domain over one), with their
    /// type as SQL (from the catalog): their text arrives as a JSON string
    /// and must be read back as a document, not kept as a string scalar.
    pub json_columns: Vec<(String, String)>,
    /// Which changes this region accepts for the table, whatever a record
    /// claims (the residency policy, checked again on arrival).
    pub admit: Admit,
    /// Columns merged instead of overwritten (`merge` in the config).
    pub merge: Vec<(String, crate::config::MergeKind)>,
}

impl TargetTable {
    /// How column `name` is merged, if it is a merge column.
    pub fn merge_kind(&self, name: &str) -> Option<crate::config::MergeKind> {
        self.merge.iter().find(|(c, _)| c == name).map(|(_, k)| *k)
    }

    /// The key columns of a row `alias` read from JSON, typed: a json key
    /// column's text arrives as a JSON string scalar and is read back as a
    /// document (`#>> '{}'`).
    pub fn typed_keys(&self, alias: &str) -> Vec<String> {
        self.key
            .iter()
            .map(|k| match self.json_columns.iter().find(|(j, _)| j == k) {
                Some((_, ty)) => format!("({alias}.{0} #>> '{{}}')::{ty} AS {0}", quote_ident(k)),
                None => format!("{alias}.{}", quote_ident(k)),
            })
            .collect()
    }

    /// The key of row `alias` as `pgrelay.tombstones` spells it (a JSON
    /// object of each key column's text).
    /// The key columns read from `alias`, a row `json_populate_recordset`
    /// made: a json/jsonb key column comes as a JSON string scalar there,
    /// so its document's text is read back (`#>> '{}'`) and cast.
    pub fn key_columns_from(&self, alias: &str) -> Vec<String> {
        self.key
            .iter()
            .map(|k| match self.json_columns.iter().find(|(j, _)| j == k) {
                Some((_, ty)) => format!("({alias}.{0} #>> '{{}}')::{ty} AS {0}", quote_ident(k)),
                None => format!("{alias}.{}", quote_ident(k)),
            })
            .collect()
    }

    pub fn key_json(&self, alias: &str) -> String {
        let parts: Vec<String> = self
            .key
            .iter()
            .map(|k| format!("{}, {alias}.{}::text", quote_literal(k), quote_ident(k)))
            .collect();
        format!("jsonb_build_object({})", parts.join(", "))
    }
}

/// The apply side's own residency check of a table's incoming changes: the
/// table's [`TableRule`] (the one capture routes by) asked for this region,
/// whatever a record claims. The default admits everything (`global`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Admit {
    /// The region applying the changes.
    region: String,
    rule: TableRule,
}

impl Admit {
    pub fn new(region: &str, rule: TableRule) -> Admit {
        Admit {
            region: region.to_string(),
            rule,
        }
    }

    /// The column a row's home is read from, for a `partitioned` table.
    pub fn home_column(&self) -> Option<&str> {
        self.rule.home_column()
    }

    /// `Err` names why a change from `source` may not be applied here:
    /// one its source never sends (an `owned` table's change from another
    /// region, a truncate of a `partitioned` table), or an insert or update
    /// of a row this region may not hold. Deletes are admitted whatever
    /// their home: removing a row leaks nothing.
    pub fn check(&self, source: &str, change: &Incoming<'_>) -> Result<(), String> {
        let table = &change.table.name;
        match self.rule.sends(source, change.op) {
            Ok(()) => {}
            Err(DropReason::NotOwner) => {
                let owner = self.rule.owner().unwrap_or_default();
                return Err(format!(
                    "table {table} is owned by region {owner}: a change from {source} is not accepted"
                ));
            }
            // a truncate has no home: it would empty rows of every home
            Err(DropReason::TruncatePartitioned) => {
                return Err(format!(
                    "table {table}: a truncate of a partitioned table is not replicated"
                ))
            }
            Err(reason) => {
                return Err(format!(
                    "table {table}: not replicated ({})",
                    reason.as_str()
                ))
            }
        }
        let Some(column) = self.rule.home_column() else {
            return Ok(());
        };
        if change.op == Op::Delete {
            return Ok(());
        }
        let Some(value) = change.value(column) else {
            return Err(format!(
                "table {table}: the row has no home ({column} is absent or NULL)"
            ));
        };
        match self.rule.may_hold(&self.region, value) {
            Ok(()) => Ok(()),
            Err(DropReason::HomeNotAllowed) => Err(format!(
                "table {table}: a row homed in {} may not be held in this region",
                self.rule.home_of(value).unwrap_or_default()
            )),
            Err(_) => Err(format!("table {table}: {column} names no declared home")),
        }
    }
}

/// The declared, non-local tables of the target, by `schema.table`.
pub type Targets = HashMap<String, TargetTable>;

/// A column name or value as text: JSON strings as they are, numbers and
/// booleans (written by other producers) in their JSON spelling.
struct Value<'a>(Text<'a>);

impl<'de: 'a, 'a> Deserialize<'de> for Value<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Value<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Value<'de>, E> {
                Ok(Value(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Value<'de>, E> {
                Ok(Value(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Value<'de>, E> {
                Ok(Value(Cow::Owned(v)))
            }
            fn visit_bool<E>(self, v: bool) -> Result<Value<'de>, E> {
                Ok(Value(Cow::Owned(v.to_string())))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Value<'de>, E> {
                Ok(Value(Cow::Owned(v.to_string())))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Value<'de>, E> {
                Ok(Value(Cow::Owned(v.to_string())))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Value<'de>, E> {
                Ok(Value(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_any(V)
    }
}

/// A row: (column, value) pairs in record order.
struct Row<'a>(Vec<(Value<'a>, Option<Value<'a>>)>);

impl<'de: 'a, 'a> Deserialize<'de> for Row<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Row<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a row object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Row<'de>, A::Error> {
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

/// The parts of the envelope the apply side reads. `before` and `after`
/// stay unparsed until the operation says which one is needed.
#[derive(Deserialize)]
struct ApplyEnvelope<'a> {
    #[serde(borrow)]
    before: Option<&'a RawValue>,
    #[serde(borrow)]
    after: Option<&'a RawValue>,
    #[serde(borrow)]
    op: Cow<'a, str>,
    ts_ms: i64,
    #[serde(borrow)]
    source: ApplySource<'a>,
    #[serde(borrow)]
    pgrelay: ApplyMeta<'a>,
}

#[derive(Deserialize)]
struct ApplySource<'a> {
    #[serde(borrow)]
    schema: Cow<'a, str>,
    #[serde(borrow)]
    table: Cow<'a, str>,
}

/// Fields not named here are ignored (see `envelope`, Format versions).
/// `pgrelay.merge_from` (counters' old values, which older capture sides
/// sent) is not read: a counter's parts travel in the row (`merge.rs`).
/// `pgrelay.unchanged` is not read: a column left out of `after` keeps the
/// target's value, and one the target lacks (dropped here first) has no
/// value to keep, so it is no reason to refuse the record.
#[derive(Deserialize)]
struct ApplyMeta<'a> {
    /// Absent from records written before formats were numbered (format 1).
    #[serde(default)]
    format: Option<u64>,
    hlc: u64,
    #[serde(borrow)]
    commit_lsn: Cow<'a, str>,
    /// 0 for a record `resync` sent; absent from records of other
    /// producers.
    #[serde(default)]
    xid: Option<u64>,
}

/// Parses and validates one record value.
pub fn parse<'a>(value: Option<&'a [u8]>, targets: &'a Targets) -> Result<Incoming<'a>, Rejection> {
    let value = value.ok_or_else(|| Rejection::Poison("empty record".into()))?;
    let env: ApplyEnvelope<'a> = match serde_json::from_slice(value) {
        Ok(env) => env,
        // a newer format may be laid out in a way this release does not
        // know: name the format, not the field it misses
        Err(e) => {
            if let Some(found) = envelope::format_of(value) {
                envelope::readable(found)?;
            }
            return Err(Rejection::Poison(e.to_string()));
        }
    };
    envelope::readable(env.pgrelay.format.unwrap_or(envelope::UNVERSIONED))?;
    let table_name = format!("{}.{}", env.source.schema, env.source.table);
    let Some(target) = targets.get(&table_name) else {
        return Err(Rejection::UndeclaredTable(table_name));
    };
    let op = Op::from_code(&env.op).ok_or_else(|| Rejection::UnknownOp(env.op.to_string()))?;
    check_meta(&env)?;
    let raw = match op {
        Op::Delete => env.before,
        Op::Truncate => None,
        _ => env.after,
    };
    let unknown = |column: &str| Rejection::UnknownColumn {
        table: table_name.clone(),
        column: column.to_string(),
    };
    let mut key = Vec::with_capacity(target.key.len());
    let mut columns = Vec::new();
    let mut values = Vec::new();
    let mut home = None;
    if let Some(raw) = raw {
        let mut row: Row<'a> = serde_json::from_str(raw.get())
            .map_err(|e| Rejection::Poison(format!("{} record row: {e}", env.op)))?;
        if !target.dropped.is_empty() {
            // written before the column was dropped here: its value has no
            // place any more (never a key column: those cannot be dropped
            // while they are the key)
            row.0.retain(|(n, _)| {
                has_column(&target.columns, &n.0) || !has_column(&target.dropped, &n.0)
            });
        }
        if let Some((name, _)) = row
            .0
            .iter()
            .find(|(n, _)| !has_column(&target.columns, &n.0))
        {
            return Err(unknown(&name.0));
        }
        for k in &target.key {
            let (_, v) =
                row.0
                    .iter()
                    .find(|(n, _)| n.0 == *k)
                    .ok_or_else(|| Rejection::MissingKey {
                        table: table_name.clone(),
                        column: k.clone(),
                    })?;
            key.push(v.as_ref().map(|v| v.0.clone()));
        }
        if op == Op::Delete {
            if let Some(column) = target.admit.home_column() {
                home = row
                    .0
                    .iter()
                    .find(|(n, _)| n.0 == *column)
                    .and_then(|(_, v)| v.as_ref().map(|v| v.0.clone()));
            }
        } else {
            let mut row = row.0;
            row.sort_unstable_by(|a, b| a.0 .0.cmp(&b.0 .0));
            (columns, values) = row.into_iter().map(|(n, v)| (n.0, v.map(|v| v.0))).unzip();
            if let Some(w) = columns.windows(2).find(|w| w[0] == w[1]) {
                return Err(Rejection::Poison(format!(
                    "column {:?} appears twice in the row",
                    w[0]
                )));
            }
            if columns.iter().any(|c| c == HLC_COLUMN) {
                return Err(Rejection::Poison(format!(
                    "the row carries pgrelay's stamp column {HLC_COLUMN:?}"
                )));
            }
        }
    } else if op != Op::Truncate {
        return Err(Rejection::Poison(format!(
            "{} record without a row",
            env.op
        )));
    }
    Ok(Incoming {
        table: target,
        op,
        hlc: Hlc::new(env.pgrelay.hlc),
        commit_lsn: env.pgrelay.commit_lsn,
        commit_ts_ms: env.ts_ms,
        resent: env.pgrelay.xid == Some(0),
        key,
        columns,
        values,
        home,
    })
}

/// The commit LSN a record claims (`pgrelay.commit_lsn`), read on its own:
/// also from a record that cannot be applied.
pub fn commit_lsn(value: &[u8]) -> Option<crate::event::Lsn> {
    #[derive(Deserialize)]
    struct Envelope<'a> {
        #[serde(borrow)]
        pgrelay: Meta<'a>,
    }
    #[derive(Deserialize)]
    struct Meta<'a> {
        #[serde(borrow)]
        commit_lsn: Cow<'a, str>,
    }
    let env: Envelope<'_> = serde_json::from_slice(value).ok()?;
    env.pgrelay.commit_lsn.parse().ok()
}

/// The highest wall-clock time a stamp can hold (47 bits of milliseconds).
const MAX_WALL_MS: i64 = (1 << 47) - 1;

/// The fields the apply side stores or compares, checked before anything
/// is applied: a stamp is a non-negative `bigint`, a commit LSN is `X/Y` in
/// hex, a commit time is a time a stamp can hold.
fn check_meta(env: &ApplyEnvelope<'_>) -> Result<(), Rejection> {
    let hlc = env.pgrelay.hlc;
    // 0 is the stamp of a row written before setup (resync sends it so)
    if hlc > i64::MAX as u64 {
        return Err(Rejection::OutOfRange {
            field: "pgrelay.hlc",
            reason: format!("{hlc} is not a stamp (0 to 2^63-1)"),
        });
    }
    let lsn = &env.pgrelay.commit_lsn;
    if !lsn.bytes().all(|b| b.is_ascii_hexdigit() || b == b'/')
        || lsn.parse::<crate::event::Lsn>().is_err()
    {
        return Err(Rejection::OutOfRange {
            field: "pgrelay.commit_lsn",
            reason: format!(
                "{:?} is not an LSN (X/Y in hex)",
                truncated(&env.pgrelay.commit_lsn)
            ),
        });
    }
    if !(0..=MAX_WALL_MS).contains(&env.ts_ms) {
        return Err(Rejection::OutOfRange {
            field: "ts_ms",
            reason: format!("{} is not a commit time in milliseconds", env.ts_ms),
        });
    }
    Ok(())
}

/// At most 64 characters of a field, for messages.
fn truncated(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn has_column(columns: &[String], name: &str) -> bool {
    columns.iter().any(|c| c == name)
}

/// Targets with one table, `public.products` (`id` key, `name`), for unit
/// tests of the apply side.
#[cfg(test)]
pub(crate) fn test_targets() -> Targets {
    let mut t = Targets::new();
    t.insert(
        "public.products".into(),
        TargetTable {
            dropped: Vec::new(),
            name: TableName::new("public", "products"),
            key: vec!["id".into()],
            columns: vec!["id".into(), "name".into(), "_pgrelay_hlc".into()],
            column_types: vec![],
            json_columns: vec![],
            admit: Admit::default(),
            merge: vec![],
        },
    );
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::test_targets as targets;

    fn envelope(table: &str, after: &str) -> Vec<u8> {
        format!(
            r#"{{"before":null,"after":{after},"op":"c","ts_ms":1,"source":{{"connector":"pgrelay","version":"0","name":"p","region":"us","db":"d","schema":"public","table":{table},"txId":1,"lsn":1,"ts_ms":1}},"pgrelay":{{"hlc":77,"origin":"us","commit_lsn":"0/1","xid":1,"seq":0,"unchanged":[]}}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn accepts_a_declared_row() {
        let t = targets();
        let rec = envelope("\"products\"", r#"{"name":"t\"ea","id":"1"}"#);
        let r = parse(Some(&rec), &t).unwrap();
        assert_eq!(r.key, vec![Some(Cow::Borrowed("1"))]);
        assert!(matches!(r.key[0], Some(Cow::Borrowed(_))), "not copied");
        assert_eq!(r.value("name"), Some("t\"ea"));
        assert_eq!(r.columns, vec!["id", "name"]);
        assert_eq!(r.values, vec![Some("1".into()), Some("t\"ea".into())]);
        assert_eq!(r.hlc, Hlc::new(77));
        assert_eq!(r.commit_lsn, "0/1");
        assert!(!r.resent, "transaction 1 is a live change");
        let resent = String::from_utf8(rec)
            .unwrap()
            .replace(r#""xid":1"#, r#""xid":0"#);
        assert!(parse(Some(resent.as_bytes()), &t).unwrap().resent);
    }

    #[test]
    fn a_left_out_column_the_target_lacks_is_no_reason_to_refuse() {
        let t = targets();
        let rec = String::from_utf8(envelope("\"products\"", r#"{"id":"1"}"#))
            .unwrap()
            .replace(r#""unchanged":[]"#, r#""unchanged":["dropped_here"]"#);
        let r = parse(Some(rec.as_bytes()), &t).unwrap();
        assert_eq!(r.columns, vec!["id"]);
        // a column the row carries must exist
        let rec = envelope("\"products\"", r#"{"id":"1","dropped_here":"x"}"#);
        assert_eq!(parse(Some(&rec), &t).unwrap_err().class(), "unknown_column");
    }

    #[test]
    fn numbers_and_booleans_of_other_producers_are_text() {
        let t = targets();
        let rec = envelope("\"products\"", r#"{"id":12,"name":true}"#);
        let r = parse(Some(&rec), &t).unwrap();
        assert_eq!(r.key, vec![Some(Cow::Owned("12".to_string()))]);
    }

    #[test]
    fn rejects_injection_attempts_and_garbage() {
        let t = targets();
        let rec = envelope("\"products\\\"; DROP TABLE products; --\"", r#"{"id":"1"}"#);
        assert_eq!(
            parse(Some(&rec), &t).unwrap_err().class(),
            "undeclared_table"
        );
        let rec = envelope(
            "\"products\"",
            r#"{"id":"1","name\"; DROP TABLE x; --":"a"}"#,
        );
        assert_eq!(parse(Some(&rec), &t).unwrap_err().class(), "unknown_column");
        assert_eq!(
            parse(Some(b"\xff\x00garbage"), &t).unwrap_err().class(),
            "poison"
        );
        assert_eq!(parse(None, &t).unwrap_err().class(), "poison");
        let rec = envelope("\"products\"", r#"{"name":"a"}"#);
        assert_eq!(parse(Some(&rec), &t).unwrap_err().class(), "missing_key");
        let rec = envelope("\"products\"", r#"{"id":"1","id":"2"}"#);
        assert_eq!(parse(Some(&rec), &t).unwrap_err().class(), "poison");
        let rec = envelope("\"products\"", r#"{"id":"1","_pgrelay_hlc":"9"}"#);
        assert_eq!(parse(Some(&rec), &t).unwrap_err().class(), "poison");
        let rec = envelope("\"products\"", r#"{"id":"1","name":{"nested":1}}"#);
        assert_eq!(parse(Some(&rec), &t).unwrap_err().class(), "poison");
        let rec = envelope("\"products\"", r#"["id","1"]"#);
        assert_eq!(parse(Some(&rec), &t).unwrap_err().class(), "poison");
        let rec = envelope("\"products\"", "null");
        assert_eq!(parse(Some(&rec), &t).unwrap_err().class(), "poison");
    }

    const TABLES: &str = r#"
[[tables]]
name = "orders"
class = "partitioned"
home_column = "country"
aliases = { DE = "eu" }
[tables.allow]
us = ["eu"]

[[tables]]
name = "currencies"
class = "owned"
owner = "us"
"#;

    /// A change of `table` with `country` = `value`.
    fn incoming<'a>(table: &'a TargetTable, op: Op, value: Option<&'a str>) -> Incoming<'a> {
        Incoming {
            table,
            op,
            hlc: crate::hlc::Hlc::new(1),
            commit_lsn: "0/1".into(),
            commit_ts_ms: 1,
            resent: false,
            key: vec![Some("1".into())],
            columns: vec!["country".into(), "id".into()],
            values: vec![value.map(Into::into), Some("1".into())],
            home: None,
        }
    }

    /// The apply side admits what the table's rule lets the region hold,
    /// from the regions the rule lets send it: the very rule capture
    /// routes by.
    #[test]
    fn admission_is_the_table_rule() {
        let config = crate::config::test_config(&["us", "eu", "cn"], TABLES);
        let table = |name: &str| {
            let t = config.table(&TableName::new("public", name)).unwrap();
            let rule = TableRule::compile(&config, t);
            move |region: &str| TargetTable {
                name: t.name.clone(),
                key: vec!["id".into()],
                columns: vec!["id".into(), "country".into()],
                dropped: vec![],
                column_types: vec![],
                json_columns: vec![],
                admit: Admit::new(region, rule.clone()),
                merge: vec![],
            }
        };
        let orders = table("orders");
        let currencies = table("currencies");
        let rule = TableRule::compile(&config, &config.tables[0]);
        for region in ["us", "eu", "cn"] {
            let target = orders(region);
            let source = if region == "us" { "eu" } else { "us" };
            for value in ["us", "eu", "cn", "DE", "XX"] {
                let insert = incoming(&target, Op::Insert, Some(value));
                let admitted = target.admit.check(source, &insert);
                assert_eq!(
                    admitted.is_ok(),
                    rule.may_hold(region, value).is_ok(),
                    "{value} in {region}: {admitted:?}"
                );
                let update = incoming(&target, Op::Update, Some(value));
                assert_eq!(target.admit.check(source, &update), admitted);
                // removing a row leaks nothing
                let delete = incoming(&target, Op::Delete, Some(value));
                assert_eq!(target.admit.check(source, &delete), Ok(()));
            }
            let unknown = target
                .admit
                .check(source, &incoming(&target, Op::Insert, Some("XX")));
            assert_eq!(
                unknown.unwrap_err(),
                "table public.orders: country names no declared home"
            );
            let homeless = target
                .admit
                .check(source, &incoming(&target, Op::Insert, None));
            assert_eq!(
                homeless.unwrap_err(),
                "table public.orders: the row has no home (country is absent or NULL)"
            );
            let truncate = target
                .admit
                .check(source, &incoming(&target, Op::Truncate, None));
            assert_eq!(
                truncate.unwrap_err(),
                "table public.orders: a truncate of a partitioned table is not replicated"
            );
        }
        let eu = orders("eu");
        assert_eq!(
            eu.admit.check("us", &incoming(&eu, Op::Insert, Some("cn"))),
            Err("table public.orders: a row homed in cn may not be held in this region".into())
        );
        let cn = currencies("cn");
        for op in [Op::Insert, Op::Update, Op::Delete, Op::Truncate] {
            assert_eq!(cn.admit.check("us", &incoming(&cn, op, Some("x"))), Ok(()));
            assert_eq!(
                cn.admit.check("eu", &incoming(&cn, op, Some("x"))),
                Err(
                    "table public.currencies is owned by region us: a change from eu is not accepted"
                        .into()
                )
            );
        }
    }
}
