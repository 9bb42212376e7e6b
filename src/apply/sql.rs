//! A batch of incoming changes -> a few set-based statements.
//!
//! Within a batch only the highest-stamped change of each row matters
//! (last writer wins), so the batch is first reduced to one change per key
//! (between truncates, which cut the batch into segments). The survivors are
//! grouped by table, kind and column set; each group becomes one statement.
//! Upserts stream their rows with `COPY` (text format, each value through
//! its column type's input function) into a session-local staging table,
//! then one `INSERT … SELECT … ON CONFLICT` moves them; changes that were
//! inserts at their source are grouped apart and first go in by a plain
//! `INSERT` of the keys the target lacks (the fast path: no speculative
//! insertion per row), the conditional upsert taking what remains. Deletes
//! and truncates carry their keys as one JSON parameter.
//!
//! Every statement is conditional on stamps: an upsert wins only over a row
//! with a lower stamp (or none) and only if no tombstone of that key (or of
//! the whole table, left by a truncate) has an equal or higher stamp; a
//! delete removes only a lower-stamped row and leaves (or raises) a
//! tombstone; a truncate removes the rows older than itself. Re-applying a batch therefore changes
//! nothing. A change stamped above its table's newest tombstone (read once
//! per statement) has no tombstone to look for: rows are looked up in
//! `pgrelay.tombstones` only below it. Identifiers come from the target
//! catalog and are quoted.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use crate::apply::record::{Incoming, TargetTable, Text};
use crate::event::{quote_ident, quote_literal, row_hash, Op, TableName};
use crate::hlc::Hlc;
use crate::names::{COUNTS_COLUMN, HLC_COLUMN};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Upsert,
    Delete,
    Truncate,
    /// Adds counters' deltas or unions arrays into existing rows (see
    /// [`merge_statements`]); changes no stamp.
    Merge,
}

/// One statement and the batch positions it covers. With a `stage`, `rows`
/// is `COPY` text for the staging table and `sql` has no parameter;
/// otherwise `$1` is `rows` (JSON).
#[derive(Debug, Clone)]
pub struct Statement {
    pub kind: Kind,
    pub table: String,
    pub stage: Option<Stage>,
    pub sql: String,
    pub rows: String,
    /// Indices into the batch of the changes this statement applies.
    pub members: Vec<usize>,
    /// Indices of changes made redundant by a newer change of the same row.
    pub superseded: Vec<usize>,
    /// Records this statement's losers in `pgrelay.conflicts` (see
    /// [`crate::conflicts::losers_sql`]); `None` for truncates.
    pub conflicts: Option<String>,
    /// The lowest stamp among `members`: a tombstone of the table below it
    /// cannot hold any of them back (see [`needs_recheck`]).
    pub oldest: Hlc,
}

/// A fast, non-keyed hasher for the batch's own keys (no untrusted party
/// can choose them to collide on purpose: they come from a few thousand
/// records of one batch, and a collision costs time, not correctness).
type FastHash = std::hash::BuildHasherDefault<FxHasher>;

/// The multiply-rotate hash of rustc's `FxHasher`, 8 bytes at a time.
#[derive(Default)]
struct FxHasher(u64);

impl std::hash::Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(K);
        }
        for &b in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ b as u64).wrapping_mul(K);
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.write_u64(i as u64);
    }

    fn write_u64(&mut self, i: u64) {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(K);
    }

    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// The session-local table an upsert's rows are copied into first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// Its name (unquoted; one per target table and column set).
    pub name: String,
    /// Creates it unless it exists (emptied at every commit).
    pub create: String,
    /// `COPY … FROM STDIN` into it.
    pub copy: String,
    /// Empties it (when one transaction stages it twice).
    pub clear: String,
    /// Run after the upsert when [`needs_recheck`] says so: removes the
    /// rows it wrote that a tombstone committed meanwhile covers (see
    /// `apply::batch::write`).
    pub recheck: String,
    /// The table's newest tombstone stamp, -1 without one (one index
    /// probe): run after the upsert, it decides whether `recheck` can find
    /// anything ([`needs_recheck`]).
    pub newest_tombstone: String,
    /// The fast path of changes that were inserts at their source: a plain
    /// `INSERT` of the staged rows whose key the target lacks and that no
    /// tombstone holds back, run before the upsert (see
    /// `apply::batch::write`). `None` for updates, whose rows are mostly
    /// there.
    pub insert: Option<String>,
}

/// Whether an upsert's rows may be covered by a tombstone, given the
/// table's newest tombstone stamp (`-1`: none; read after the upsert, so
/// it includes every delete that committed while the upsert ran) and the
/// statement's lowest stamp ([`Statement::oldest`]). A row is covered only
/// by a tombstone of its key (or of the whole table) stamped at or above
/// the row, so below `oldest` there is nothing to check: the fast path,
/// the common case of changes newer than every delete of their table.
pub fn needs_recheck(newest_tombstone: i64, oldest: Hlc) -> bool {
    i128::from(newest_tombstone) >= i128::from(oldest.get())
}

/// Gives each insert or update the columns it lacks from the same row's
/// previous insert or update in the batch.
///
/// A record may lack a column the source's stream left out (a TOASTed value
/// the update did not touch). Applied alone, such an update keeps the
/// target's value; but [`plan`] keeps only the newest change of each row, so
/// the value an earlier change of the batch carried would be lost with it.
/// The changes of one row arrive in the order the source made them (one
/// partition per row), so the previous change holds the value the source
/// kept. A delete or truncate in between starts the row afresh.
pub fn fill_from_earlier(batch: &mut [Incoming<'_>]) {
    let mut last: HashMap<(TableName, Vec<Option<String>>), usize, FastHash> =
        HashMap::with_hasher(FastHash::default());
    for i in 0..batch.len() {
        let c = &batch[i];
        match c.op {
            Op::Truncate => {
                last.retain(|(t, _), _| *t != c.table.name);
                continue;
            }
            Op::Delete => {
                last.remove(&row_id(c));
                continue;
            }
            _ => {}
        }
        let id = row_id(c);
        if let Some(&p) = last.get(&id) {
            if batch[p].hlc < batch[i].hlc && batch[p].columns.len() > batch[i].columns.len() {
                let (earlier, later) = batch.split_at_mut(i);
                merge_missing(&earlier[p], &mut later[0]);
            }
        }
        last.insert(id, i);
    }
}

fn row_id(c: &Incoming<'_>) -> (TableName, Vec<Option<String>>) {
    (
        c.table.name.clone(),
        c.key
            .iter()
            .map(|k| k.as_deref().map(str::to_string))
            .collect(),
    )
}

/// Adds to `later` the columns (and values) of `earlier` it lacks, keeping
/// its columns sorted.
fn merge_missing<'a>(earlier: &Incoming<'a>, later: &mut Incoming<'a>) {
    for (name, value) in earlier.columns.iter().zip(&earlier.values) {
        if let Err(at) = later.columns.binary_search(name) {
            later.columns.insert(at, name.clone());
            later.values.insert(at, value.clone());
        }
    }
}

/// Plans a batch of parsed changes (see `record::parse`).
pub fn plan(batch: &[Incoming<'_>]) -> Vec<Statement> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, change) in batch.iter().enumerate() {
        if change.op == Op::Truncate {
            plan_segment(batch, start, i, &mut out);
            let t = change.table;
            out.push(Statement {
                kind: Kind::Truncate,
                table: t.name.to_string(),
                stage: None,
                sql: truncate_sql(t),
                rows: format!("[{{\"{HLC_COLUMN}\":{}}}]", change.hlc),
                members: vec![i],
                superseded: vec![],
                conflicts: None,
                oldest: change.hlc,
            });
            start = i + 1;
        }
    }
    plan_segment(batch, start, batch.len(), &mut out);
    out
}

fn plan_segment(batch: &[Incoming<'_>], from: usize, to: usize, out: &mut Vec<Statement>) {
    // newest change per (table, key)
    let mut newest: HashMap<(&TableName, &[Option<Text<'_>>]), usize, FastHash> =
        HashMap::with_capacity_and_hasher(to - from, FastHash::default());
    let mut superseded: Vec<usize> = Vec::new();
    for i in from..to {
        let c = &batch[i];
        let k = (&c.table.name, c.key.as_slice());
        match newest.get(&k) {
            Some(&j) if batch[j].hlc >= c.hlc => superseded.push(i),
            Some(&j) => {
                superseded.push(j);
                newest.insert(k, i);
            }
            None => {
                newest.insert(k, i);
            }
        }
    }
    // group: (table, kind, inserted at the source, column set) -> members,
    // in batch order
    type Group<'b> = (&'b TableName, bool, bool, &'b [Text<'b>]);
    let mut groups: BTreeMap<Group<'_>, (&TargetTable, Vec<usize>)> = BTreeMap::new();
    let mut winners: Vec<usize> = newest.into_values().collect();
    winners.sort_unstable();
    for i in winners {
        let c = &batch[i];
        let is_delete = c.op == Op::Delete;
        let cols: &[Text<'_>] = if is_delete { &[] } else { &c.columns };
        groups
            .entry((&c.table.name, is_delete, c.op == Op::Insert, cols))
            .or_insert_with(|| (c.table, Vec::new()))
            .1
            .push(i);
    }
    let mut first = true;
    for ((_, is_delete, inserted, cols), (target, members)) in groups {
        let (kind, stage, sql, rows) = if is_delete {
            let rows = delete_rows(batch, &members);
            (Kind::Delete, None, delete_sql(target), rows)
        } else {
            let (mut stage, sql) = upsert_sql(target, cols);
            if !inserted {
                // rows updated at the source are mostly there already
                stage.insert = None;
            }
            (Kind::Upsert, Some(stage), sql, copy_rows(batch, &members))
        };
        let conflicts = Some(crate::conflicts::losers_sql(
            target,
            stage.as_ref().map(|s| s.name.as_str()),
        ));
        let oldest = members
            .iter()
            .map(|&i| batch[i].hlc)
            .min()
            .unwrap_or(Hlc::ZERO);
        out.push(Statement {
            kind,
            table: target.name.to_string(),
            stage,
            sql,
            rows,
            oldest,
            members,
            superseded: if first {
                std::mem::take(&mut superseded)
            } else {
                vec![]
            },
            conflicts,
        });
        first = false;
    }
    out.extend(merge_statements(batch, from, to));
}

/// One row's changes in a batch segment: its key, every change of it, and
/// those since its last delete (positions in the batch).
type KeyChanges<'b> = (&'b [Option<Text<'b>>], Vec<usize>, Vec<usize>);

/// The merge statements of changes `from..to` of the batch (see
/// [`crate::merge`]): for each table with `counter` columns, one statement
/// merging the parts every change carries (and dropping those older than
/// a delete of the row in the segment); for each `union` column, one
/// statement adding the items of every change since the row's last delete
/// in the segment. Run after the segment's upserts and deletes, so they
/// apply to the rows that exist now.
pub fn merge_statements(batch: &[Incoming<'_>], from: usize, to: usize) -> Vec<Statement> {
    use crate::config::MergeKind;
    // per table: per row, every change (counters), and the changes since
    // its last delete (unions)
    let mut tables: BTreeMap<&TableName, (&TargetTable, Vec<KeyChanges<'_>>)> = BTreeMap::new();
    for (i, c) in batch.iter().enumerate().take(to).skip(from) {
        if c.table.merge.is_empty() {
            continue;
        }
        let (_, rows) = tables
            .entry(&c.table.name)
            .or_insert_with(|| (c.table, Vec::new()));
        let key = c.key.as_slice();
        let p = match rows.iter().position(|(k, _, _)| *k == key) {
            Some(p) => p,
            None => {
                rows.push((key, Vec::new(), Vec::new()));
                rows.len() - 1
            }
        };
        rows[p].1.push(i);
        match c.op {
            Op::Delete => rows[p].2.clear(),
            _ => rows[p].2.push(i),
        }
    }
    let mut out = Vec::new();
    for (target, rows) in tables.into_values() {
        let counters: Vec<&str> = target
            .merge
            .iter()
            .filter(|(_, k)| *k == MergeKind::Counter)
            .map(|(c, _)| c.as_str())
            .collect();
        if !counters.is_empty() {
            let members: Vec<usize> = rows
                .iter()
                .flat_map(|(_, all, _)| all.iter().copied())
                .collect();
            if !members.is_empty() {
                out.push(merge_statement(
                    batch,
                    target,
                    crate::merge::counts_sql(target, &counters),
                    counts_rows(batch, &rows, target, &counters),
                    &members,
                ));
            }
        }
        let members: Vec<usize> = rows
            .iter()
            .flat_map(|(_, _, live)| live.iter().copied())
            .collect();
        if members.is_empty() {
            continue;
        }
        for (column, kind) in &target.merge {
            if *kind != MergeKind::Union {
                continue;
            }
            let rows = union_rows(batch, &members, target, column);
            if rows != "[]" {
                out.push(merge_statement(
                    batch,
                    target,
                    crate::merge::union_sql(target, column),
                    rows,
                    &members,
                ));
            }
        }
    }
    out
}

fn merge_statement(
    batch: &[Incoming<'_>],
    target: &TargetTable,
    sql: String,
    rows: String,
    members: &[usize],
) -> Statement {
    Statement {
        kind: Kind::Merge,
        table: target.name.to_string(),
        stage: None,
        sql,
        rows,
        oldest: members
            .iter()
            .map(|&i| batch[i].hlc)
            .min()
            .unwrap_or(Hlc::ZERO),
        members: members.to_vec(),
        superseded: vec![],
        conflicts: None,
    }
}

/// Key columns as JSON members (`"id":"1",`).
fn key_members(out: &mut Vec<u8>, target: &TargetTable, c: &Incoming<'_>) {
    for (k, v) in target.key.iter().zip(&c.key) {
        let _ = serde_json::to_writer(&mut *out, k);
        out.push(b':');
        match v {
            Some(v) => {
                let _ = serde_json::to_writer(&mut *out, v.as_ref());
            }
            None => out.extend_from_slice(b"null"),
        }
        out.push(b',');
    }
}

/// The `$1` of [`crate::merge::counts_sql`]: one object per insert or
/// update (its parts, or its counters' values where it carries no parts,
/// and its stamp) and per key with a delete (no parts), each with the
/// highest stamp of a delete of its key before it in the segment.
fn counts_rows(
    batch: &[Incoming<'_>],
    rows: &[KeyChanges<'_>],
    target: &TargetTable,
    counters: &[&str],
) -> String {
    let mut out: Vec<u8> = vec![b'['];
    for (_, all, _) in rows {
        let mut floor: i64 = -1;
        for &i in all {
            let c = &batch[i];
            if c.op == Op::Delete {
                floor = floor.max(c.hlc.to_sql());
            }
            if out.len() > 1 {
                out.push(b',');
            }
            out.push(b'{');
            key_members(&mut out, target, c);
            if c.op != Op::Delete {
                for counter in counters {
                    if let Some(v) = c.value(counter) {
                        let _ = serde_json::to_writer(&mut out, counter);
                        out.push(b':');
                        let _ = serde_json::to_writer(&mut out, v);
                        out.push(b',');
                    }
                }
            }
            let _ = serde_json::to_writer(&mut out, COUNTS_COLUMN);
            out.push(b':');
            match c.value(COUNTS_COLUMN) {
                _ if c.op == Op::Delete => out.extend_from_slice(b"\"{}\""),
                Some(v) => {
                    let _ = serde_json::to_writer(&mut out, v);
                }
                None => out.extend_from_slice(b"null"),
            }
            let _ = std::io::Write::write_fmt(
                &mut out,
                format_args!(",\"{HLC_COLUMN}\":{},\"_pgrelay_floor\":{floor}}}", c.hlc),
            );
        }
    }
    out.push(b']');
    String::from_utf8(out).expect("JSON assembled from UTF-8 strings")
}

/// One row per change carrying the union column: its key and array.
fn union_rows(
    batch: &[Incoming<'_>],
    members: &[usize],
    target: &TargetTable,
    column: &str,
) -> String {
    let mut out: Vec<u8> = vec![b'['];
    for &i in members {
        let c = &batch[i];
        let Some(value) = c.value(column) else {
            continue;
        };
        if out.len() > 1 {
            out.push(b',');
        }
        out.push(b'{');
        key_members(&mut out, target, c);
        let _ = serde_json::to_writer(&mut out, column);
        out.push(b':');
        let _ = serde_json::to_writer(&mut out, value);
        out.push(b'}');
    }
    out.push(b']');
    String::from_utf8(out).expect("JSON assembled from UTF-8 strings")
}

/// The upserts' rows in `COPY` text format: the group's columns (each
/// member has exactly these), then the stamp.
fn copy_rows(batch: &[Incoming<'_>], members: &[usize]) -> String {
    let size: usize = members
        .iter()
        .map(|&i| {
            let c = &batch[i];
            c.values
                .iter()
                .map(|v| v.as_ref().map_or(3, |v| v.len() + 1))
                .sum::<usize>()
                + 21
        })
        .sum();
    let mut out = String::with_capacity(size);
    for &i in members {
        let c = &batch[i];
        let merged = !c.table.merge.is_empty();
        for (name, v) in c.columns.iter().zip(&c.values) {
            // a new row starts with no counter parts and its counters at
            // zero: the merge statement after the upsert merges the change's
            // parts (so a destination that refuses the total parks that
            // statement alone, not the row's other columns)
            if merged && c.table.merge_kind(name) == Some(crate::config::MergeKind::Counter) {
                out.push_str("0\t");
                continue;
            }
            if merged && name == COUNTS_COLUMN {
                out.push_str("{}\t");
                continue;
            }
            match v {
                Some(v) => copy_escape(&mut out, v),
                None => out.push_str("\\N"),
            }
            out.push('\t');
        }
        let _ = write!(out, "{}", c.hlc);
        out.push('\n');
    }
    out
}

/// Appends `v` escaped for `COPY`'s text format.
fn copy_escape(out: &mut String, v: &str) {
    let special = |b: u8| matches!(b, b'\\' | b'\t' | b'\n' | b'\r');
    if !v.bytes().any(special) {
        out.push_str(v);
        return;
    }
    for ch in v.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}

/// The deletes' `$1`: key columns and stamp of each member.
fn delete_rows(batch: &[Incoming<'_>], members: &[usize]) -> String {
    let mut out: Vec<u8> = Vec::with_capacity(members.len() * 64);
    out.push(b'[');
    for (n, &i) in members.iter().enumerate() {
        let c = &batch[i];
        if n > 0 {
            out.push(b',');
        }
        out.push(b'{');
        for (k, v) in c.table.key.iter().zip(&c.key) {
            let _ = serde_json::to_writer(&mut out, k);
            out.push(b':');
            match v {
                Some(v) => {
                    let _ = serde_json::to_writer(&mut out, v.as_ref());
                }
                None => out.extend_from_slice(b"null"),
            }
            out.push(b',');
        }
        if let Some(home) = &c.home {
            out.extend_from_slice(b"\"_pgrelay_home\":");
            let _ = serde_json::to_writer(&mut out, home.as_ref());
            out.push(b',');
        }
        let _ = std::io::Write::write_fmt(&mut out, format_args!("\"{HLC_COLUMN}\":{}}}", c.hlc));
    }
    out.push(b']');
    String::from_utf8(out).expect("JSON assembled from UTF-8 strings")
}

/// Conditional multi-row upsert of the rows staged by `COPY`: the staging
/// table and the statement that moves its rows into the target.
pub fn upsert_sql(target: &TargetTable, cols: &[impl AsRef<str>]) -> (Stage, String) {
    let t = target.name.quoted();
    let hlc = quote_ident(HLC_COLUMN);
    let cols: Vec<&str> = cols.iter().map(AsRef::as_ref).collect();
    let col_list: Vec<String> = cols.iter().map(|c| quote_ident(c)).collect();
    let col_list = col_list.join(", ");
    let with_hlc = if cols.is_empty() {
        hlc.clone()
    } else {
        format!("{col_list}, {hlc}")
    };
    // one staging table per target table, column set and column types,
    // typed like the target's columns (CREATE … AS keeps no constraints):
    // after the target's columns change type, the next batch stages into a
    // new table (64-bit FNV-1a: two column sets sharing a staging table
    // would make the COPY fail)
    let type_of = |c: &str| {
        target
            .columns
            .iter()
            .position(|n| n == c)
            .and_then(|i| target.column_types.get(i))
            .map_or("", String::as_str)
    };
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in target
        .name
        .to_string()
        .bytes()
        .chain(cols.iter().flat_map(|c| {
            std::iter::once(0)
                .chain(c.bytes())
                .chain(std::iter::once(1))
                .chain(type_of(c).bytes())
        }))
    {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let name = format!("pgrelay_stage_{h:016x}");
    let mut stage = Stage {
        create: format!(
            "CREATE TEMP TABLE IF NOT EXISTS {q} ON COMMIT DELETE ROWS AS \
             SELECT {with_hlc} FROM {t} WITH NO DATA",
            q = quote_ident(&name)
        ),
        copy: format!("COPY {} ({with_hlc}) FROM STDIN", quote_ident(&name)),
        clear: format!("TRUNCATE {}", quote_ident(&name)),
        recheck: format!(
            "DELETE FROM {t} AS cur USING {stage} AS r WHERE {join} AND cur.{hlc} = r.{hlc} \
             AND EXISTS (SELECT 1 FROM pgrelay.tombstones ts WHERE ts.table_name = {tname} \
             AND ts.pk IN ({pk}, '{{}}'::jsonb) AND ts.hlc >= cur.{hlc})",
            stage = quote_ident(&name),
            join = target
                .key
                .iter()
                .map(|k| format!("cur.{0} = r.{0}", quote_ident(k)))
                .collect::<Vec<_>>()
                .join(" AND "),
            tname = quote_literal(&target.name.to_string()),
            pk = target.key_json("cur"),
        ),
        newest_tombstone: newest_tombstone_sql(target),
        insert: None,
        name,
    };
    let select_list: Vec<String> = cols
        .iter()
        .map(|c| format!("r.{}", quote_ident(c)))
        .chain(std::iter::once(format!("r.{hlc}")))
        .collect();
    // merge columns are the merge statements' business (after the upsert)
    let updates: Vec<String> = cols
        .iter()
        .filter(|c| {
            !target.key.iter().any(|k| k == *c)
                && target.merge_kind(c).is_none()
                && **c != COUNTS_COLUMN
        })
        .map(|c| format!("{0} = EXCLUDED.{0}", quote_ident(c)))
        .chain(std::iter::once(format!("{hlc} = EXCLUDED.{hlc}")))
        .collect();
    let keys: Vec<String> = target.key.iter().map(|k| quote_ident(k)).collect();
    // a row stamped above the table's newest tombstone (read once, an
    // index probe) has no tombstone to look for: the common case costs no
    // probe per row
    let not_held_back = format!(
        "(r.{hlc} > ({newest}) OR NOT EXISTS (SELECT 1 FROM pgrelay.tombstones ts \
         WHERE ts.table_name = {tname} AND ts.pk IN ({pk}, '{{}}'::jsonb) AND ts.hlc >= r.{hlc}))",
        newest = stage.newest_tombstone,
        tname = quote_literal(&target.name.to_string()),
        pk = target.key_json("r"),
    );
    // the rows whose key the target lacks, inserted as they are: no
    // speculative insertion (its extra lock and WAL record per row) where
    // there is no row to conflict with. The key lookup is a subplan per row
    // (OFFSET 0 keeps it one), never a join that reads the whole table. A
    // row of the key committed meanwhile fails it with a unique violation:
    // the upsert then does it all
    stage.insert = Some(format!(
        "INSERT INTO {t} ({with_hlc}) SELECT {sel} FROM {stage} AS r \
         WHERE NOT EXISTS (SELECT 1 FROM {t} AS cur WHERE {join} OFFSET 0) AND {not_held_back}",
        sel = select_list.join(", "),
        stage = quote_ident(&stage.name),
        join = target
            .key
            .iter()
            .map(|k| format!("cur.{0} = r.{0}", quote_ident(k)))
            .collect::<Vec<_>>()
            .join(" AND "),
    ));
    let sql = format!(
        "INSERT INTO {t} AS cur ({with_hlc}) \
         SELECT {sel} FROM {stage} AS r WHERE {not_held_back} \
         ON CONFLICT ({keys}) DO UPDATE SET {updates} \
         WHERE cur.{hlc} IS NULL OR cur.{hlc} < EXCLUDED.{hlc}",
        sel = select_list.join(", "),
        stage = quote_ident(&stage.name),
        keys = keys.join(", "),
        updates = updates.join(", "),
    );
    (stage, sql)
}

/// The stamp of `target`'s newest tombstone (of a key or of the whole
/// table), -1 without one: one backward probe of `tombstones_table_hlc`.
pub fn newest_tombstone_sql(target: &TargetTable) -> String {
    format!(
        "SELECT coalesce(max(ts.hlc), -1) FROM pgrelay.tombstones ts WHERE ts.table_name = {}",
        quote_literal(&target.name.to_string())
    )
}

/// Conditional multi-row delete that leaves tombstones.
pub fn delete_sql(target: &TargetTable) -> String {
    let t = target.name.quoted();
    let hlc = quote_ident(HLC_COLUMN);
    let key_cols = target.key_columns_from("r");
    let join: Vec<String> = target
        .key
        .iter()
        .map(|k| format!("cur.{0} = d.{0}", quote_ident(k)))
        .collect();
    // a partitioned row's home travels beside its key (`_pgrelay_home`)
    // and stays with the tombstone, for resync's routing
    format!(
        "WITH d AS (SELECT {key_cols}, r.{hlc}, e.e ->> '_pgrelay_home' AS home \
         FROM json_array_elements($1::text::json) AS e(e) \
         CROSS JOIN LATERAL json_populate_record(NULL::{t}, e.e) AS r), \
         ts AS (INSERT INTO pgrelay.tombstones AS old (table_name, pk, hlc, home) \
         SELECT {tname}, {pk}, d.{hlc}, d.home FROM d \
         ON CONFLICT (table_name, pk) DO UPDATE SET hlc = greatest(old.hlc, EXCLUDED.hlc), deleted_at = now(), \
         home = coalesce(EXCLUDED.home, old.home)) \
         DELETE FROM {t} AS cur USING d WHERE {join} AND (cur.{hlc} IS NULL OR cur.{hlc} < d.{hlc})",
        key_cols = key_cols.join(", "),
        tname = quote_literal(&target.name.to_string()),
        pk = target.key_json("d"),
        join = join.join(" AND "),
    )
}

/// A truncate, as last-writer-wins sees it: remove every row older than
/// the truncate's stamp and leave a table-wide tombstone (key `{}`), so a
/// late change written before the truncate cannot bring a row back while
/// changes written after it still apply. `$1` is `[{"_pgrelay_hlc": stamp}]`.
pub fn truncate_sql(target: &TargetTable) -> String {
    let t = target.name.quoted();
    let hlc = quote_ident(HLC_COLUMN);
    format!(
        "WITH d AS (SELECT (x->>{hlc_lit})::bigint AS stamp FROM json_array_elements($1::text::json) AS x), \
         ts AS (INSERT INTO pgrelay.tombstones AS old (table_name, pk, hlc) \
         SELECT {tname}, '{{}}'::jsonb, d.stamp FROM d \
         ON CONFLICT (table_name, pk) DO UPDATE SET hlc = greatest(old.hlc, EXCLUDED.hlc), deleted_at = now()) \
         DELETE FROM {t} AS cur USING d WHERE cur.{hlc} IS NULL OR cur.{hlc} < d.stamp",
        hlc_lit = quote_literal(HLC_COLUMN),
        tname = quote_literal(&target.name.to_string()),
    )
}

/// Key buckets: every change of a row maps to one of these, and an apply
/// transaction holds the advisory locks of its buckets, so two sessions
/// never apply changes of the same row at once.
pub const KEY_BUCKETS: u32 = 256;

/// The sorted, distinct key buckets a batch touches; a truncate touches
/// them all. A row's bucket is its [`row_hash`] modulo [`KEY_BUCKETS`]; the
/// capture side partitions by the same hash, so with a partition count and
/// a session count that divide 256 the sessions of one source lock disjoint
/// buckets and only sessions of different sources ever wait for each other.
pub fn key_buckets(batch: &[Incoming<'_>]) -> Vec<u32> {
    if batch.iter().any(|c| c.op == Op::Truncate) {
        return (0..KEY_BUCKETS).collect();
    }
    let mut out: Vec<u32> = batch
        .iter()
        .map(|c| {
            let key = c
                .table
                .key
                .iter()
                .zip(&c.key)
                .map(|(k, v)| (k.as_str(), v.as_deref()));
            row_hash(&c.table.name, key) % KEY_BUCKETS
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// The `$1` of [`LOCK_BUCKETS_SQL`]: a PostgreSQL array literal.
pub fn buckets_param(buckets: &[u32]) -> String {
    let items: Vec<String> = buckets.iter().map(u32::to_string).collect();
    format!("{{{}}}", items.join(","))
}

/// Takes the advisory locks of the buckets in `$1`, in array order
/// (ascending: no two sessions wait on each other in a cycle), in lock
/// class 1885828709 (`pgre` in ASCII).
pub const LOCK_BUCKETS_SQL: &str = "SELECT count(pg_advisory_xact_lock(1885828709, b)) \
    FROM unnest($1::text::int[]) WITH ORDINALITY AS t(b, n)";

/// Stores the next offsets to consume; `$1` is a JSON array of
/// `{topic, kafka_partition, next_offset, source_lsn}`. `source_lsn` (may be
/// null): every change the source committed before it, in that partition,
/// is applied — what `pgrelay.wait_for` waits for.
pub const OFFSETS_SQL: &str = "INSERT INTO pgrelay.offsets AS o (topic, kafka_partition, next_offset, source_lsn) \
    SELECT x.topic, x.kafka_partition, x.next_offset, x.source_lsn::pg_lsn \
    FROM json_to_recordset($1::text::json) AS x(topic text, kafka_partition int, next_offset bigint, source_lsn text) \
    ON CONFLICT (topic, kafka_partition) DO UPDATE \
    SET next_offset = greatest(o.next_offset, EXCLUDED.next_offset), \
    source_lsn = greatest(o.source_lsn, EXCLUDED.source_lsn), updated_at = now()";

/// Records changes parked instead of applied (`$1`: a JSON array of
/// `{topic, kafka_partition, kafka_offset, commit_lsn, class}`):
/// `pgrelay.wait_for` answers true past none of them until it is applied.
pub const PARKED_SQL: &str = "INSERT INTO pgrelay.parked \
    (topic, kafka_partition, kafka_offset, commit_lsn, class) \
    SELECT x.topic, x.kafka_partition, x.kafka_offset, x.commit_lsn::pg_lsn, x.class \
    FROM json_to_recordset($1::text::json) \
    AS x(topic text, kafka_partition int, kafka_offset bigint, commit_lsn text, class text) \
    ON CONFLICT (topic, kafka_partition, kafka_offset) DO NOTHING";

/// Forgets parked changes applied since (`$1`: a JSON array of
/// `{topic, kafka_partition, kafka_offset}`, their original positions).
pub const UNPARKED_SQL: &str = "DELETE FROM pgrelay.parked p \
    USING json_to_recordset($1::text::json) AS x(topic text, kafka_partition int, kafka_offset bigint) \
    WHERE p.topic = x.topic AND p.kafka_partition = x.kafka_partition \
    AND p.kafka_offset = x.kafka_offset";

/// Raises this session's part of the per-source watermark: `$1` region,
/// `$2` session (text), `$3` stamp (text), `$4` commit LSN (text), `$5`
/// commit time (ms since epoch, text). One row per session, so parallel
/// sessions never contend on it; `pgrelay.watermarks` combines them.
pub const WATERMARK_SQL: &str = "INSERT INTO pgrelay.watermark_parts AS w \
    (source_region, session, hlc, commit_lsn, commit_time, applied_at) \
    VALUES ($1, $2::text::int, $3::text::bigint, $4::text::pg_lsn, to_timestamp($5::text::bigint / 1000.0), now()) \
    ON CONFLICT (source_region, session) DO UPDATE SET \
    hlc = greatest(w.hlc, EXCLUDED.hlc), \
    commit_lsn = greatest(w.commit_lsn, EXCLUDED.commit_lsn), \
    commit_time = greatest(w.commit_time, EXCLUDED.commit_time), \
    applied_at = now(), held_reason = NULL";

/// Records why session `$2` (text) of source `$1` holds its records back
/// (`$3`; NULL: it does not), for `pgrelay status`.
pub const HELD_SQL: &str = "INSERT INTO pgrelay.watermark_parts AS w \
    (source_region, session, hlc, held_reason) VALUES ($1, $2::text::int, 0, $3) \
    ON CONFLICT (source_region, session) DO UPDATE SET held_reason = EXCLUDED.held_reason";

/// Advances the region's HLC past the highest applied stamp (`$1`, text:
/// the logical part).
pub const CLOCK_SQL: &str = crate::hlc::OBSERVE_SQL;

#[cfg(test)]
mod tests;
