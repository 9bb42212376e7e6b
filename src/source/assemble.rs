//! Protocol messages -> row changes of declared tables.
//!
//! Keeps the relation cache, tracks the open transaction, skips whole
//! transactions that pgrelay's apply side wrote (they carry a replication
//! origin named `pgrelay_*`), attaches each row's HLC stamp and strips the
//! relay-managed stamp column. Pure: no IO, one message in, at most one
//! output out, nothing buffered beyond the current message.
//!
//! Stamps: inserts and updates carry theirs in the `_pgrelay_hlc` column
//! (set by the row trigger `pgrelay setup` installs). A delete's stamp is in
//! the `pgrelay.tombstones` row that the BEFORE DELETE trigger writes just
//! before the delete itself, so the tombstone insert is remembered per table
//! until the table's next delete (a TRUNCATE's stamp arrives the same way,
//! from a statement trigger). Rows written before `setup` (no stamp)
//! get one from the capture's own clock, above the row's previous stamp.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::event::{Change, ColumnDesc, Datum, Lsn, Op, TableName, TableSchema, TxMeta};
use crate::hlc;
use crate::hlc::Hlc;
use crate::pgoutput::{Message, OldKind, RelColumn, Tuple, TupleValue};

use crate::names::{HLC_COLUMN, META_SCHEMA, ORIGIN_PREFIX, TOMBSTONES_TABLE};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AssembleError {
    #[error("{what} for relation oid {oid} that the stream never described")]
    UnknownRelation { oid: u32, what: &'static str },
    #[error("table {table} has no primary key known to pgrelay (add one and restart)")]
    NoPrimaryKey { table: TableName },
    #[error("{what} outside a transaction")]
    NoTransaction { what: &'static str },
    #[error("table {table}: binary tuple data is not supported")]
    Binary { table: TableName },
    #[error("table {table}: tuple has {got} columns, relation has {want}")]
    Arity {
        table: TableName,
        got: usize,
        want: usize,
    },
}

/// What one message turned into.
#[derive(Debug)]
pub enum Output {
    /// A row change (or truncate) of a declared table, to be routed.
    Change(Change),
    /// Several changes from one message: a TRUNCATE of declared tables (one
    /// change per table), or an update that changed the primary key (a
    /// delete of the old key, then an insert of the new).
    Changes(Vec<Change>),
    /// The end of a transaction: everything before `end_lsn` has been seen.
    Commit { end_lsn: Lsn },
}

#[derive(Debug)]
enum RelKind {
    Declared {
        schema: Arc<TableSchema>,
        /// Index of `_pgrelay_hlc` in the stream's tuples.
        hlc_index: Option<usize>,
    },
    Tombstones {
        table_index: usize,
        hlc_index: usize,
    },
    Ignored,
}

#[derive(Debug)]
struct OpenTx {
    meta: Arc<TxMeta>,
    skip: bool,
    seq: u64,
}

pub struct Assembler {
    declared: HashSet<TableName>,
    keys: HashMap<TableName, Vec<String>>,
    relations: HashMap<u32, (TableName, RelKind)>,
    tx: Option<OpenTx>,
    pending_stamps: HashMap<String, Hlc>,
    clock: hlc::Clock,
}

impl Assembler {
    /// `declared`: tables to publish (not `local`); `keys`: their primary
    /// key columns, read from the catalog by the caller.
    pub fn new(
        declared: HashSet<TableName>,
        keys: HashMap<TableName, Vec<String>>,
        region_id: u8,
    ) -> Self {
        Assembler {
            declared,
            keys,
            relations: HashMap::new(),
            tx: None,
            pending_stamps: HashMap::new(),
            clock: hlc::Clock::new(region_id),
        }
    }

    pub fn in_transaction(&self) -> bool {
        self.tx.is_some()
    }

    /// Whether the open transaction is one pgrelay applied (its row
    /// messages can be dropped without decoding them).
    pub fn skipping(&self) -> bool {
        self.tx.as_ref().is_some_and(|t| t.skip)
    }

    pub fn push(&mut self, msg: Message) -> Result<Option<Output>, AssembleError> {
        match msg {
            Message::Begin {
                final_lsn,
                commit_ts_us,
                xid,
            } => {
                self.pending_stamps.clear();
                self.tx = Some(OpenTx {
                    meta: Arc::new(TxMeta {
                        xid,
                        commit_lsn: final_lsn,
                        commit_ts_us,
                    }),
                    skip: false,
                    seq: 0,
                });
                Ok(None)
            }
            Message::Origin { name, .. } => {
                let tx = self.open_tx("Origin")?;
                if name.starts_with(ORIGIN_PREFIX) {
                    tx.skip = true;
                }
                Ok(None)
            }
            Message::Commit { end_lsn, .. } => {
                self.tx
                    .take()
                    .ok_or(AssembleError::NoTransaction { what: "Commit" })?;
                self.pending_stamps.clear();
                Ok(Some(Output::Commit { end_lsn }))
            }
            Message::Relation {
                oid,
                schema,
                name,
                columns,
                ..
            } => {
                let table = TableName::new(schema, name);
                let kind = self.describe(oid, &table, &columns)?;
                self.relations.insert(oid, (table, kind));
                Ok(None)
            }
            Message::Type { .. } | Message::LogicalMessage { .. } => Ok(None),
            Message::Insert { rel, new } => self.row(rel, Op::Insert, None, Some(new)),
            Message::Update { rel, old, new } => self.row(rel, Op::Update, old, Some(new)),
            Message::Delete { rel, old } => self.row(rel, Op::Delete, Some(old), None),
            Message::Truncate { rels, .. } => self.truncate(rels),
        }
    }

    fn open_tx(&mut self, what: &'static str) -> Result<&mut OpenTx, AssembleError> {
        self.tx
            .as_mut()
            .ok_or(AssembleError::NoTransaction { what })
    }

    fn describe(
        &self,
        oid: u32,
        table: &TableName,
        columns: &[RelColumn],
    ) -> Result<RelKind, AssembleError> {
        let position = |name: &str| columns.iter().position(|c| c.name == name);
        if table.schema == META_SCHEMA && table.name == TOMBSTONES_TABLE {
            if let (Some(table_index), Some(hlc_index)) = (position("table_name"), position("hlc"))
            {
                return Ok(RelKind::Tombstones {
                    table_index,
                    hlc_index,
                });
            }
            return Ok(RelKind::Ignored);
        }
        if !self.declared.contains(table) {
            return Ok(RelKind::Ignored);
        }
        let keys = self
            .keys
            .get(table)
            .filter(|k| !k.is_empty())
            .ok_or_else(|| AssembleError::NoPrimaryKey {
                table: table.clone(),
            })?;
        let schema = TableSchema {
            oid,
            table: table.clone(),
            columns: columns
                .iter()
                .filter(|c| c.name != HLC_COLUMN)
                .map(|c| ColumnDesc {
                    name: c.name.clone(),
                    type_oid: c.type_oid,
                    is_key: keys.contains(&c.name),
                })
                .collect(),
        };
        Ok(RelKind::Declared {
            schema: Arc::new(schema),
            hlc_index: position(HLC_COLUMN),
        })
    }

    fn row(
        &mut self,
        rel: u32,
        op: Op,
        old: Option<(OldKind, Tuple)>,
        new: Option<Tuple>,
    ) -> Result<Option<Output>, AssembleError> {
        let what = match op {
            Op::Insert => "Insert",
            Op::Update => "Update",
            _ => "Delete",
        };
        let (_, kind) = self
            .relations
            .get(&rel)
            .ok_or(AssembleError::UnknownRelation { oid: rel, what })?;
        let tx = self
            .tx
            .as_mut()
            .ok_or(AssembleError::NoTransaction { what })?;
        if tx.skip {
            return Ok(None);
        }
        match kind {
            RelKind::Ignored => Ok(None),
            RelKind::Tombstones {
                table_index,
                hlc_index,
            } => {
                if let Some(new) = new {
                    let name = text_at(&new, *table_index);
                    let stamp = text_at(&new, *hlc_index).and_then(|s| s.parse::<Hlc>().ok());
                    if let (Some(name), Some(stamp)) = (name, stamp) {
                        self.pending_stamps.insert(name, stamp);
                    }
                }
                Ok(None)
            }
            RelKind::Declared { schema, hlc_index } => {
                let (schema, hlc_index) = (schema.clone(), *hlc_index);
                self.declared_row(what, schema, hlc_index, op, old, new)
                    .map(Some)
            }
        }
    }

    /// A row change of a declared table, in the open transaction: its
    /// images, its stamp, its place in the transaction. An update that
    /// changes the primary key moves the row: the old key is deleted and
    /// the new one inserted, at one stamp.
    fn declared_row(
        &mut self,
        what: &'static str,
        schema: Arc<TableSchema>,
        hlc_index: Option<usize>,
        op: Op,
        old: Option<(OldKind, Tuple)>,
        new: Option<Tuple>,
    ) -> Result<Output, AssembleError> {
        let (before, old_stamp) = match old {
            Some((kind, t)) => {
                let (mut row, stamp) = row_image(&schema, hlc_index, t)?;
                if kind == OldKind::Key {
                    only_key_known(&mut row, &schema);
                }
                (Some(row), stamp)
            }
            None => (None, None),
        };
        let (mut after, new_stamp) = match new {
            Some(t) => {
                let (row, stamp) = row_image(&schema, hlc_index, t)?;
                (Some(row), stamp)
            }
            None => (None, None),
        };
        // unchanged TOAST: take the value from the old tuple when it has one
        if let (Some(after), Some(before)) = (after.as_mut(), before.as_ref()) {
            fill_unchanged(after, before);
        }
        let stamp = self.stamp(
            what,
            &schema.table,
            op,
            new_stamp,
            old_stamp.unwrap_or(Hlc::ZERO),
        )?;
        let tx = self.open_tx(what)?;
        let seq = tx.seq;
        tx.seq += 1;
        let meta = tx.meta.clone();
        let change = |op, before, after, seq| Change {
            schema: schema.clone(),
            op,
            before,
            after,
            hlc: stamp,
            tx: meta.clone(),
            seq,
        };
        if let (Op::Update, Some(b), Some(a)) = (op, before.as_ref(), after.as_ref()) {
            if moves_key(&schema, b, a) {
                tx.seq += 1;
                return Ok(Output::Changes(vec![
                    change(Op::Delete, before, None, seq),
                    change(Op::Insert, None, after, seq + 1),
                ]));
            }
        }
        Ok(Output::Change(change(op, before, after, seq)))
    }

    /// The stamp of a row change of `table` in the open transaction: a
    /// delete's from the tombstone written just before it, an insert's or
    /// update's from its new row (`new_stamp`); without one, a stamp from
    /// the capture's clock, above `previous` (the old row's).
    fn stamp(
        &mut self,
        what: &'static str,
        table: &TableName,
        op: Op,
        new_stamp: Option<Hlc>,
        previous: Hlc,
    ) -> Result<Hlc, AssembleError> {
        let commit_ms = (self.open_tx(what)?.meta.commit_ts_us.max(0) / 1000) as u64;
        let known = match op {
            Op::Delete => self.pending_stamps.remove(&table.to_string()),
            _ => new_stamp,
        };
        let stamp = match known {
            Some(s) => s,
            None => self.clock.tick(commit_ms, previous),
        };
        self.clock.observe(stamp);
        Ok(stamp)
    }

    fn truncate(&mut self, rels: Vec<u32>) -> Result<Option<Output>, AssembleError> {
        let tx = self
            .tx
            .as_mut()
            .ok_or(AssembleError::NoTransaction { what: "Truncate" })?;
        if tx.skip {
            return Ok(None);
        }
        let declared: Vec<Arc<TableSchema>> = rels
            .iter()
            .filter_map(|oid| match self.relations.get(oid) {
                Some((_, RelKind::Declared { schema, .. })) => Some(schema.clone()),
                _ => None,
            })
            .collect();
        if declared.is_empty() {
            return Ok(None);
        }
        let commit_ms = (tx.meta.commit_ts_us.max(0) / 1000) as u64;
        let mut changes = Vec::with_capacity(declared.len());
        for schema in declared {
            let stamp = match self.pending_stamps.remove(&schema.table.to_string()) {
                Some(s) => s,
                None => self.clock.tick(commit_ms, Hlc::ZERO),
            };
            self.clock.observe(stamp);
            changes.push(Change {
                schema,
                op: Op::Truncate,
                before: None,
                after: None,
                hlc: stamp,
                tx: tx.meta.clone(),
                seq: tx.seq,
            });
            tx.seq += 1;
        }
        Ok(Some(Output::Changes(changes)))
    }
}

/// A row image from a stream tuple of `schema`'s table: one value per
/// column, the stamp column (at `hlc_index`) taken out and returned.
fn row_image(
    schema: &TableSchema,
    hlc_index: Option<usize>,
    t: Tuple,
) -> Result<(Vec<Datum>, Option<Hlc>), AssembleError> {
    let width = schema.columns.len() + usize::from(hlc_index.is_some());
    if t.0.len() != width {
        return Err(AssembleError::Arity {
            table: schema.table.clone(),
            got: t.0.len(),
            want: width,
        });
    }
    strip(t, hlc_index, &schema.table)
}

/// An old image that carries only the key (replica identity DEFAULT): the
/// other columns are not known, not NULL.
fn only_key_known(row: &mut [Datum], schema: &TableSchema) {
    for (d, c) in row.iter_mut().zip(&schema.columns) {
        if !c.is_key {
            *d = Datum::Unchanged;
        }
    }
}

/// Fills the unchanged (TOASTed, not sent) values of `after` from
/// `before`, where it has them.
fn fill_unchanged(after: &mut [Datum], before: &[Datum]) {
    for (a, b) in after.iter_mut().zip(before) {
        if *a == Datum::Unchanged && *b != Datum::Unchanged {
            *a = b.clone();
        }
    }
}

/// Whether an update from `before` to `after` changes a key column (both
/// values known).
fn moves_key(schema: &TableSchema, before: &[Datum], after: &[Datum]) -> bool {
    schema
        .columns
        .iter()
        .zip(before.iter().zip(after))
        .any(|(c, (old, new))| {
            c.is_key && *old != Datum::Unchanged && *new != Datum::Unchanged && old != new
        })
}

fn text_at(t: &Tuple, i: usize) -> Option<String> {
    match t.0.get(i) {
        Some(TupleValue::Text(b)) => Some(String::from_utf8_lossy(b).into_owned()),
        _ => None,
    }
}

/// Converts a stream tuple, removing the stamp column and returning its value.
fn strip(
    t: Tuple,
    hlc_index: Option<usize>,
    table: &TableName,
) -> Result<(Vec<Datum>, Option<Hlc>), AssembleError> {
    let mut row = Vec::with_capacity(t.0.len());
    let mut stamp = None;
    for (i, v) in t.0.into_iter().enumerate() {
        let datum = match v {
            TupleValue::Null => Datum::Null,
            TupleValue::Unchanged => Datum::Unchanged,
            TupleValue::Text(b) => Datum::Text(match String::from_utf8(b.to_vec()) {
                Ok(s) => s,
                Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
            }),
            TupleValue::Binary(_) => {
                return Err(AssembleError::Binary {
                    table: table.clone(),
                })
            }
        };
        if Some(i) == hlc_index {
            stamp = datum.as_text().and_then(|s| s.parse::<Hlc>().ok());
            continue;
        }
        row.push(datum);
    }
    Ok((row, stamp))
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    const ORDERS: u32 = 16400;
    const TOMBSTONES: u32 = 16300;

    fn column(name: &str) -> RelColumn {
        RelColumn {
            flags: 0,
            name: name.into(),
            type_oid: 25,
            type_mod: -1,
        }
    }

    fn text(v: &str) -> TupleValue {
        TupleValue::Text(Bytes::copy_from_slice(v.as_bytes()))
    }

    fn tuple(values: &[Option<&str>]) -> Tuple {
        Tuple(
            values
                .iter()
                .map(|v| v.map_or(TupleValue::Unchanged, text))
                .collect(),
        )
    }

    fn datums(values: &[&str]) -> Vec<Datum> {
        values.iter().map(|v| Datum::Text(v.to_string())).collect()
    }

    /// An assembler that knows `public.orders (id, note, _pgrelay_hlc)`,
    /// keyed on id, and the tombstones table, in an open transaction.
    fn assembler() -> Assembler {
        let orders = TableName::new("public", "orders");
        let mut a = Assembler::new(
            HashSet::from([orders.clone()]),
            HashMap::from([(orders, vec!["id".to_string()])]),
            3,
        );
        let relation = |oid, schema: &str, name: &str, columns: &[&str]| Message::Relation {
            oid,
            schema: schema.into(),
            name: name.into(),
            replica_identity: b'd',
            columns: columns.iter().map(|c| column(c)).collect(),
        };
        let push = |a: &mut Assembler, m| assert!(a.push(m).unwrap().is_none());
        push(
            &mut a,
            relation(ORDERS, "public", "orders", &["id", "note", HLC_COLUMN]),
        );
        push(
            &mut a,
            relation(
                TOMBSTONES,
                META_SCHEMA,
                TOMBSTONES_TABLE,
                &["table_name", "pk", "hlc"],
            ),
        );
        push(
            &mut a,
            Message::Begin {
                final_lsn: Lsn(100),
                commit_ts_us: 5_000_000,
                xid: 7,
            },
        );
        a
    }

    fn one(out: Option<Output>) -> Change {
        match out {
            Some(Output::Change(c)) => c,
            other => panic!("expected one change, got {other:?}"),
        }
    }

    #[test]
    fn an_insert_carries_its_row_stamp_without_the_stamp_column() {
        let mut a = assembler();
        let c = one(a
            .push(Message::Insert {
                rel: ORDERS,
                new: tuple(&[Some("1"), Some("a"), Some("4242")]),
            })
            .unwrap());
        assert_eq!((c.op, c.hlc, c.seq), (Op::Insert, Hlc::new(4242), 0));
        assert_eq!(c.after.unwrap(), datums(&["1", "a"]));
        assert!(c.before.is_none());
        // a row without a stamp gets one from the clock, in this region
        let c = one(a
            .push(Message::Insert {
                rel: ORDERS,
                new: Tuple(vec![text("2"), text("b"), TupleValue::Null]),
            })
            .unwrap());
        assert_eq!(c.hlc.region_id(), 3);
        assert!(c.hlc > Hlc::new(4242));
        assert_eq!(c.seq, 1);
    }

    #[test]
    fn a_delete_takes_the_stamp_of_the_tombstone_before_it() {
        let mut a = assembler();
        assert!(a
            .push(Message::Insert {
                rel: TOMBSTONES,
                new: tuple(&[Some("public.orders"), Some("{\"id\": \"1\"}"), Some("9001")]),
            })
            .unwrap()
            .is_none());
        let c = one(a
            .push(Message::Delete {
                rel: ORDERS,
                old: (OldKind::Key, tuple(&[Some("1"), Some(""), Some("")])),
            })
            .unwrap());
        assert_eq!((c.op, c.hlc), (Op::Delete, Hlc::new(9001)));
        // only the key was sent: the rest is unknown, not NULL
        assert_eq!(
            c.before.unwrap(),
            vec![Datum::Text("1".into()), Datum::Unchanged]
        );
    }

    #[test]
    fn an_update_keeps_unsent_values_and_a_key_change_moves_the_row() {
        let mut a = assembler();
        let c = one(a
            .push(Message::Update {
                rel: ORDERS,
                old: Some((OldKind::Full, tuple(&[Some("1"), Some("long"), Some("10")]))),
                new: tuple(&[Some("1"), None, Some("11")]),
            })
            .unwrap());
        assert_eq!((c.op, c.hlc), (Op::Update, Hlc::new(11)));
        assert_eq!(c.after.unwrap(), datums(&["1", "long"]));
        let moved = a
            .push(Message::Update {
                rel: ORDERS,
                old: Some((OldKind::Key, tuple(&[Some("1"), Some(""), Some("")]))),
                new: tuple(&[Some("2"), Some("x"), Some("12")]),
            })
            .unwrap();
        let Some(Output::Changes(changes)) = moved else {
            panic!("expected a delete and an insert, got {moved:?}");
        };
        let ops: Vec<(Op, u64, u64)> = changes.iter().map(|c| (c.op, c.hlc.get(), c.seq)).collect();
        assert_eq!(ops, vec![(Op::Delete, 12, 1), (Op::Insert, 12, 2)]);
    }

    #[test]
    fn pgrelays_own_transactions_and_bad_tuples() {
        let mut a = assembler();
        a.push(Message::Origin {
            origin_lsn: Lsn(1),
            name: "pgrelay_eu".into(),
        })
        .unwrap();
        assert!(a.skipping());
        assert!(a
            .push(Message::Insert {
                rel: ORDERS,
                new: tuple(&[Some("1"), Some("a"), Some("1")]),
            })
            .unwrap()
            .is_none());
        let mut a = assembler();
        let e = a
            .push(Message::Insert {
                rel: ORDERS,
                new: tuple(&[Some("1")]),
            })
            .unwrap_err();
        assert_eq!(
            e,
            AssembleError::Arity {
                table: TableName::new("public", "orders"),
                got: 1,
                want: 3
            }
        );
        let e = a
            .push(Message::Insert {
                rel: 1,
                new: tuple(&[]),
            })
            .unwrap_err();
        assert_eq!(
            e,
            AssembleError::UnknownRelation {
                oid: 1,
                what: "Insert"
            }
        );
    }

    #[test]
    fn row_helpers() {
        let schema = TableSchema {
            oid: 1,
            table: TableName::new("public", "t"),
            columns: vec![
                ColumnDesc {
                    name: "id".into(),
                    type_oid: 0,
                    is_key: true,
                },
                ColumnDesc {
                    name: "v".into(),
                    type_oid: 0,
                    is_key: false,
                },
            ],
        };
        let mut after = vec![Datum::Text("1".into()), Datum::Unchanged];
        fill_unchanged(&mut after, &[Datum::Text("1".into()), Datum::Null]);
        assert_eq!(after, vec![Datum::Text("1".into()), Datum::Null]);
        let mut row = datums(&["1", "x"]);
        only_key_known(&mut row, &schema);
        assert_eq!(row, vec![Datum::Text("1".into()), Datum::Unchanged]);
        assert!(moves_key(
            &schema,
            &datums(&["1", "x"]),
            &datums(&["2", "x"])
        ));
        assert!(!moves_key(
            &schema,
            &datums(&["1", "x"]),
            &datums(&["1", "y"])
        ));
        assert!(!moves_key(
            &schema,
            &[Datum::Unchanged, Datum::Null],
            &datums(&["2", "x"])
        ));
    }
}
