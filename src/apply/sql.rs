//! A batch of incoming changes -> a few set-based statements.
//!
//! Within a batch only the highest-stamped change of each row matters
//! (last writer wins), so the batch is first reduced to one change per key
//! (between truncates, which cut the batch into segments). The survivors are
//! grouped by table, kind and column set; each group becomes one statement
//! whose rows travel as one JSON parameter, turned into typed rows by
//! `json_populate_recordset(NULL::table, ...)` — PostgreSQL casts each text
//! value with the target column's own input function.
//!
//! Every statement is conditional on stamps: an upsert wins only over a row
//! with a lower stamp (or none) and only if no tombstone of that key (or of
//! the whole table, left by a truncate) has an equal or higher stamp; a
//! delete removes only a lower-stamped row and leaves (or raises) a
//! tombstone; a truncate removes the rows older than itself. Re-applying a batch therefore changes
//! nothing. Identifiers come from the target catalog and are quoted.

use std::collections::{BTreeMap, HashMap};

use crate::apply::record::{Incoming, TargetTable, Targets};
use crate::event::{quote_ident, quote_literal, Op};
use crate::source::assemble::HLC_COLUMN;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Upsert,
    Delete,
    Truncate,
}

/// One statement and the batch positions it covers. `$1` is `rows`.
#[derive(Debug, Clone)]
pub struct Statement {
    pub kind: Kind,
    pub table: String,
    pub sql: String,
    pub rows: String,
    /// Indices into the batch of the changes this statement applies.
    pub members: Vec<usize>,
    /// Indices of changes made redundant by a newer change of the same row.
    pub superseded: Vec<usize>,
}

/// Plans a batch. Changes for tables missing from `targets` must have been
/// rejected before (see `record::parse`); they are skipped here.
pub fn plan(batch: &[Incoming], targets: &Targets) -> Vec<Statement> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, change) in batch.iter().enumerate() {
        if change.op == Op::Truncate {
            plan_segment(batch, start, i, targets, &mut out);
            if let Some(t) = targets.get(&change.table.to_string()) {
                out.push(Statement {
                    kind: Kind::Truncate,
                    table: t.name.to_string(),
                    sql: truncate_sql(t),
                    rows: serde_json::json!([{ HLC_COLUMN: change.hlc }]).to_string(),
                    members: vec![i],
                    superseded: vec![],
                });
            }
            start = i + 1;
        }
    }
    plan_segment(batch, start, batch.len(), targets, &mut out);
    out
}

fn plan_segment(
    batch: &[Incoming],
    from: usize,
    to: usize,
    targets: &Targets,
    out: &mut Vec<Statement>,
) {
    // newest change per (table, key)
    let mut newest: HashMap<(String, &[Option<String>]), usize> = HashMap::new();
    let mut superseded: Vec<usize> = Vec::new();
    for i in from..to {
        let c = &batch[i];
        let k = (c.table.to_string(), c.key.as_slice());
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
    // group: (table, kind, column set) -> members, in batch order
    let mut groups: BTreeMap<(String, bool, Vec<String>), Vec<usize>> = BTreeMap::new();
    let mut winners: Vec<usize> = newest.into_values().collect();
    winners.sort_unstable();
    for i in winners {
        let c = &batch[i];
        let is_delete = c.op == Op::Delete;
        let cols: Vec<String> = if is_delete {
            vec![]
        } else {
            c.values.keys().cloned().collect()
        };
        groups
            .entry((c.table.to_string(), is_delete, cols))
            .or_default()
            .push(i);
    }
    let mut first = true;
    for ((table, is_delete, cols), members) in groups {
        let Some(target) = targets.get(&table) else {
            continue;
        };
        let rows = rows_json(batch, &members, target, is_delete);
        let sql = if is_delete {
            delete_sql(target)
        } else {
            upsert_sql(target, &cols)
        };
        out.push(Statement {
            kind: if is_delete {
                Kind::Delete
            } else {
                Kind::Upsert
            },
            table,
            sql,
            rows,
            members,
            superseded: if first {
                std::mem::take(&mut superseded)
            } else {
                vec![]
            },
        });
        first = false;
    }
}

fn rows_json(
    batch: &[Incoming],
    members: &[usize],
    target: &TargetTable,
    is_delete: bool,
) -> String {
    // written straight into one buffer: no JSON tree per row
    let mut out: Vec<u8> = Vec::with_capacity(members.len() * 128);
    let write_str = |out: &mut Vec<u8>, s: &str| {
        let _ = serde_json::to_writer(&mut *out, s);
    };
    let write_value = |out: &mut Vec<u8>, v: &Option<String>| match v {
        Some(v) => {
            let _ = serde_json::to_writer(&mut *out, v.as_str());
        }
        None => out.extend_from_slice(b"null"),
    };
    out.push(b'[');
    for (n, &i) in members.iter().enumerate() {
        let c = &batch[i];
        if n > 0 {
            out.push(b',');
        }
        out.push(b'{');
        if is_delete {
            for (k, v) in target.key.iter().zip(&c.key) {
                write_str(&mut out, k);
                out.push(b':');
                write_value(&mut out, v);
                out.push(b',');
            }
        } else {
            for (k, v) in &c.values {
                write_str(&mut out, k);
                out.push(b':');
                write_value(&mut out, v);
                out.push(b',');
            }
        }
        write_str(&mut out, HLC_COLUMN);
        out.push(b':');
        out.extend_from_slice(c.hlc.to_string().as_bytes());
        out.push(b'}');
    }
    out.push(b']');
    String::from_utf8(out).expect("JSON written from UTF-8 strings")
}

fn key_json(target: &TargetTable, alias: &str) -> String {
    let parts: Vec<String> = target
        .key
        .iter()
        .map(|k| format!("{}, {alias}.{}::text", quote_literal(k), quote_ident(k)))
        .collect();
    format!("jsonb_build_object({})", parts.join(", "))
}

/// Conditional multi-row upsert.
pub fn upsert_sql(target: &TargetTable, cols: &[String]) -> String {
    let t = target.name.quoted();
    let hlc = quote_ident(HLC_COLUMN);
    let col_list: Vec<String> = cols.iter().map(|c| quote_ident(c)).collect();
    let select_list: Vec<String> = cols
        .iter()
        .map(|c| format!("r.{}", quote_ident(c)))
        .collect();
    let updates: Vec<String> = cols
        .iter()
        .filter(|c| !target.key.contains(c))
        .map(|c| format!("{0} = EXCLUDED.{0}", quote_ident(c)))
        .chain(std::iter::once(format!("{hlc} = EXCLUDED.{hlc}")))
        .collect();
    let keys: Vec<String> = target.key.iter().map(|k| quote_ident(k)).collect();
    format!(
        "INSERT INTO {t} AS cur ({cols}, {hlc}) \
         SELECT {sel}, r.{hlc} FROM json_populate_recordset(NULL::{t}, $1::text::json) AS r \
         WHERE NOT EXISTS (SELECT 1 FROM pgrelay.tombstones ts \
         WHERE ts.table_name = {tname} AND ts.pk IN ({pk}, '{{}}'::jsonb) AND ts.hlc >= r.{hlc}) \
         ON CONFLICT ({keys}) DO UPDATE SET {updates} \
         WHERE cur.{hlc} IS NULL OR cur.{hlc} < EXCLUDED.{hlc}",
        cols = col_list.join(", "),
        sel = select_list.join(", "),
        tname = quote_literal(&target.name.to_string()),
        pk = key_json(target, "r"),
        keys = keys.join(", "),
        updates = updates.join(", "),
    )
}

/// Conditional multi-row delete that leaves tombstones.
pub fn delete_sql(target: &TargetTable) -> String {
    let t = target.name.quoted();
    let hlc = quote_ident(HLC_COLUMN);
    let key_cols: Vec<String> = target
        .key
        .iter()
        .map(|k| format!("r.{}", quote_ident(k)))
        .collect();
    let join: Vec<String> = target
        .key
        .iter()
        .map(|k| format!("cur.{0} = d.{0}", quote_ident(k)))
        .collect();
    format!(
        "WITH d AS (SELECT {key_cols}, r.{hlc} FROM json_populate_recordset(NULL::{t}, $1::text::json) AS r), \
         ts AS (INSERT INTO pgrelay.tombstones AS old (table_name, pk, hlc) \
         SELECT {tname}, {pk}, d.{hlc} FROM d \
         ON CONFLICT (table_name, pk) DO UPDATE SET hlc = greatest(old.hlc, EXCLUDED.hlc), deleted_at = now()) \
         DELETE FROM {t} AS cur USING d WHERE {join} AND (cur.{hlc} IS NULL OR cur.{hlc} < d.{hlc})",
        key_cols = key_cols.join(", "),
        tname = quote_literal(&target.name.to_string()),
        pk = key_json(target, "d"),
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
/// them all.
pub fn key_buckets(batch: &[Incoming]) -> Vec<u32> {
    if batch.iter().any(|c| c.op == Op::Truncate) {
        return (0..KEY_BUCKETS).collect();
    }
    let mut out: Vec<u32> = batch
        .iter()
        .map(|c| {
            // FNV-1a over table and key: stable across processes and versions
            let mut h: u32 = 0x811c_9dc5;
            let mut eat = |bytes: &[u8]| {
                for b in bytes {
                    h ^= *b as u32;
                    h = h.wrapping_mul(0x0100_0193);
                }
            };
            eat(c.table.schema.as_bytes());
            eat(b".");
            eat(c.table.name.as_bytes());
            for k in &c.key {
                eat(b"\0");
                if let Some(k) = k {
                    eat(k.as_bytes());
                }
            }
            h % KEY_BUCKETS
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
/// `{topic, kafka_partition, next_offset}`.
pub const OFFSETS_SQL: &str = "INSERT INTO pgrelay.offsets AS o (topic, kafka_partition, next_offset) \
    SELECT x.topic, x.kafka_partition, x.next_offset \
    FROM json_to_recordset($1::text::json) AS x(topic text, kafka_partition int, next_offset bigint) \
    ON CONFLICT (topic, kafka_partition) DO UPDATE \
    SET next_offset = greatest(o.next_offset, EXCLUDED.next_offset), updated_at = now()";

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
    applied_at = now()";

/// Advances the region's HLC past the highest applied stamp (`$1`, text:
/// the logical part).
pub const CLOCK_SQL: &str = "SELECT setval('pgrelay.hlc_logical', \
    greatest((SELECT last_value FROM pgrelay.hlc_logical), $1::text::bigint))";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::TableName;
    use std::collections::BTreeMap;

    fn targets() -> Targets {
        let mut t = Targets::new();
        t.insert(
            "public.p".into(),
            TargetTable {
                name: TableName::new("public", "p"),
                key: vec!["id".into()],
                columns: vec!["id".into(), "v".into(), "doc".into()],
            },
        );
        t
    }

    fn change(op: Op, id: &str, hlc: u64, cols: &[(&str, &str)]) -> Incoming {
        Incoming {
            table: TableName::new("public", "p"),
            op,
            hlc,
            origin: "us".into(),
            commit_lsn: "0/1".into(),
            commit_ts_ms: 0,
            key: vec![Some(id.to_string())],
            values: cols
                .iter()
                .map(|(k, v)| (k.to_string(), Some(v.to_string())))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    #[test]
    fn newest_change_per_key_wins_within_a_batch() {
        let batch = vec![
            change(Op::Insert, "1", 10, &[("id", "1"), ("v", "a")]),
            change(Op::Update, "1", 30, &[("id", "1"), ("v", "c")]),
            change(Op::Update, "1", 20, &[("id", "1"), ("v", "b")]),
            change(Op::Insert, "2", 5, &[("id", "2"), ("v", "x")]),
            change(Op::Delete, "2", 6, &[]),
        ];
        let plan = plan(&batch, &targets());
        assert_eq!(plan.len(), 2);
        let upsert = plan.iter().find(|s| s.kind == Kind::Upsert).unwrap();
        assert_eq!(upsert.members, vec![1]);
        assert!(upsert.rows.contains("\"c\""));
        let delete = plan.iter().find(|s| s.kind == Kind::Delete).unwrap();
        assert_eq!(delete.members, vec![4]);
        let mut sup: Vec<usize> = plan.iter().flat_map(|s| s.superseded.clone()).collect();
        sup.sort();
        assert_eq!(sup, vec![0, 2, 3]);
    }

    #[test]
    fn unchanged_columns_get_their_own_statement_and_are_not_written() {
        let batch = vec![
            change(Op::Update, "1", 10, &[("id", "1"), ("v", "a")]),
            change(
                Op::Update,
                "2",
                10,
                &[("id", "2"), ("v", "b"), ("doc", "d")],
            ),
        ];
        let plan = plan(&batch, &targets());
        assert_eq!(plan.len(), 2);
        let narrow = plan.iter().find(|s| s.members == vec![0]).unwrap();
        assert!(!narrow.sql.contains("\"doc\""));
    }

    #[test]
    fn truncate_cuts_the_batch() {
        let batch = vec![
            change(Op::Insert, "1", 10, &[("id", "1")]),
            Incoming {
                op: Op::Truncate,
                key: vec![],
                ..change(Op::Truncate, "", 11, &[])
            },
            change(Op::Insert, "1", 12, &[("id", "1")]),
        ];
        let kinds: Vec<Kind> = plan(&batch, &targets()).iter().map(|s| s.kind).collect();
        assert_eq!(kinds, vec![Kind::Upsert, Kind::Truncate, Kind::Upsert]);
    }

    #[test]
    fn key_buckets_are_stable_sorted_and_cover_truncates() {
        let a = change(Op::Update, "1", 10, &[("id", "1")]);
        let b = change(Op::Update, "1", 20, &[("id", "1")]);
        let c = change(Op::Insert, "2", 5, &[("id", "2")]);
        assert_eq!(
            key_buckets(std::slice::from_ref(&a)),
            key_buckets(std::slice::from_ref(&b))
        );
        let both = key_buckets(&[c.clone(), a.clone(), b]);
        assert!(both.windows(2).all(|w| w[0] < w[1]));
        assert!(both.len() <= 2);
        let t = Incoming {
            op: Op::Truncate,
            key: vec![],
            ..c
        };
        assert_eq!(key_buckets(&[a, t]).len(), KEY_BUCKETS as usize);
        assert_eq!(buckets_param(&[3, 7]), "{3,7}");
    }

    #[test]
    fn identifiers_are_quoted() {
        let mut t = targets();
        let tt = t.get_mut("public.p").unwrap();
        tt.name = TableName::new("public", "we\"ird");
        let sql = upsert_sql(tt, &["id".into(), "a\"b".into()]);
        assert!(sql.contains("\"public\".\"we\"\"ird\""));
        assert!(sql.contains("\"a\"\"b\""));
    }
}
