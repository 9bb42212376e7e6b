//! `pgrelay repair`: bring rows back from a restored backup after a bug
//! corrupted them, keeping the good changes made since.
//!
//! ```text
//!  region: rows and tombstones stamped at or after --since ──▶ candidates (key, stamp, writer)
//!      writer is --origin (or none given) ──▶ compare with the backup's version of the key
//!          differs ──▶ write the backup's version (or delete: its absence) as a local write,
//!                      so the region's clock stamps it afresh and it wins in every region
//!      another writer ──▶ listed and left alone (unless --include-others)
//! ```
//!
//! The stamp column says who wrote a row's current version and when (see
//! [`crate::hlc`]): a row whose current version predates `--since` was not
//! touched by the corruption and is not looked at. Writes are conditional
//! on the stamp seen when the row was read, so a row that changes while the
//! repair runs is left as it is (and reported). Rows from before `setup`
//! (no stamp) are never candidates.

use std::collections::{BTreeMap, BTreeSet};

use tokio_postgres::Client;

use crate::apply::db_message;
use crate::config::Config;
use crate::event::{quote_ident, TableName};
use crate::hlc::Hlc;
use crate::names::HLC_COLUMN;
use crate::source::catalog::{self, Catalog};

/// Keys per round trip.
const CHUNK: usize = 500;

pub struct Options {
    /// Only these tables (default: every replicated table).
    pub tables: Vec<TableName>,
    /// Rows whose current version was written at or after this time (text
    /// PostgreSQL reads as a timestamptz); `None`: every stamped row.
    pub since: Option<String>,
    /// Only versions written by this region; others are listed and left.
    pub origin: Option<String>,
    /// Repair rows whose current version another region wrote, too.
    pub include_others: bool,
    pub dry_run: bool,
}

/// What to do with one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The backup holds the same version.
    Unchanged,
    /// The row is gone here; the backup has it.
    Restore,
    /// Both have the row, with different values.
    Rewrite,
    /// The backup does not have the row.
    Remove,
}

/// Decides from the current row (without its stamp) and the backup's.
pub fn decide(current: Option<&str>, backup: Option<&str>) -> Action {
    match (current, backup) {
        (None, None) => Action::Unchanged,
        (None, Some(_)) => Action::Restore,
        (Some(_), None) => Action::Remove,
        (Some(c), Some(b)) if c == b => Action::Unchanged,
        (Some(_), Some(_)) => Action::Rewrite,
    }
}

/// The region that made `stamp`, by its `id`.
pub fn writer(config: &Config, stamp: i64) -> String {
    let id = Hlc::from_sql(stamp).region_id();
    config
        .regions
        .iter()
        .find(|(_, r)| r.id == id)
        .map_or_else(|| format!("region id {id}"), |(name, _)| name.clone())
}

/// One table's repair.
#[derive(Debug, Default, Clone)]
pub struct TableReport {
    pub table: String,
    pub restored: u64,
    pub rewritten: u64,
    pub removed: u64,
    pub unchanged: u64,
    /// (key, writer, stamp) of versions written since by another region.
    pub left: Vec<(String, String, i64)>,
    /// Keys that changed while the repair ran (left as they are).
    pub raced: Vec<String>,
}

/// The SQL for one table.
struct TableSql {
    /// `jsonb_build_object('k', "k"::text, ...)`: a key as tombstones hold it.
    key: String,
    /// rows of the keys in `$1` (a JSON array of keys): key, row without stamp, stamp
    rows: String,
    upsert: String,
    delete: String,
}

impl TableSql {
    fn new(table: &TableName, key: &[String], columns: &[String]) -> TableSql {
        let t = table.quoted();
        let stamp = quote_ident(HLC_COLUMN);
        let keyexpr = format!(
            "jsonb_build_object({})",
            key.iter()
                .map(|k| format!(
                    "{}, {}::text",
                    crate::event::quote_literal(k),
                    quote_ident(k)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let pk = key
            .iter()
            .map(|k| quote_ident(k))
            .collect::<Vec<_>>()
            .join(", ");
        let cols: Vec<String> = columns
            .iter()
            .filter(|c| *c != HLC_COLUMN)
            .map(|c| quote_ident(c))
            .collect();
        let mut set: Vec<String> = columns
            .iter()
            .filter(|c| *c != HLC_COLUMN && !key.contains(c))
            .map(|c| format!("{q} = EXCLUDED.{q}", q = quote_ident(c)))
            .collect();
        if set.is_empty() {
            set.push(format!("{q} = EXCLUDED.{q}", q = quote_ident(&key[0])));
        }
        let keys_of = format!(
            "({pk}) IN (SELECT {pk} FROM jsonb_populate_recordset(NULL::{t}, $1::text::jsonb))"
        );
        TableSql {
            rows: format!(
                "SELECT {keyexpr}::text, (to_jsonb(cur) - '{HLC_COLUMN}')::text, \
                 (to_jsonb(cur) ->> '{HLC_COLUMN}')::bigint FROM {t} cur WHERE {keys_of}"
            ),
            upsert: format!(
                "INSERT INTO {t} AS cur ({cols}) SELECT {cols} FROM jsonb_populate_record(NULL::{t}, $1::text::jsonb) \
                 ON CONFLICT ({pk}) DO UPDATE SET {set} WHERE cur.{stamp} = $2",
                cols = cols.join(", "),
                set = set.join(", ")
            ),
            delete: format!(
                "DELETE FROM {t} AS cur USING jsonb_populate_record(NULL::{t}, $1::text::jsonb) k \
                 WHERE {on} AND cur.{stamp} = $2",
                on = key
                    .iter()
                    .map(|k| format!("cur.{q} = k.{q}", q = quote_ident(k)))
                    .collect::<Vec<_>>()
                    .join(" AND ")
            ),
            key: keyexpr,
        }
    }
}

fn err(what: &str, e: &tokio_postgres::Error) -> String {
    format!("{what}: {}", db_message(e))
}

/// Rows of `keys` in `client`: key text -> (row without stamp, stamp).
async fn rows_of(
    client: &Client,
    sql: &TableSql,
    keys: &[String],
    what: &str,
) -> Result<BTreeMap<String, (String, Option<i64>)>, String> {
    let param = format!("[{}]", keys.join(","));
    Ok(client
        .query(sql.rows.as_str(), &[&param])
        .await
        .map_err(|e| err(what, &e))?
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect())
}

/// Repairs `region` from the backup at `backup_dsn`.
pub async fn run(
    config: &Config,
    region: &str,
    backup_dsn: &str,
    opts: &Options,
    progress: &mut crate::progress::Progress,
) -> Result<Vec<TableReport>, String> {
    let r = config.region(region).map_err(|e| e.to_string())?;
    if let Some(o) = &opts.origin {
        if !config.regions.contains_key(o) {
            return Err(format!(
                "--origin {o}: not a declared region (declared: {})",
                config.declared_regions()
            ));
        }
    }
    let live = catalog::connect(&r.dsn, region)
        .await
        .map_err(|e| e.to_string())?;
    let backup = catalog::connect(backup_dsn, "backup")
        .await
        .map_err(|e| format!("--from: {e}"))?;
    let sets = crate::event::canonical_text_sets("; ");
    for c in [&live, &backup] {
        c.batch_execute(&sets)
            .await
            .map_err(|e| err("setting up the session", &e))?;
    }
    let since_ms: i64 = match &opts.since {
        None => 0,
        Some(s) => live
            .query_one(
                "SELECT (extract(epoch FROM $1::text::timestamptz) * 1000)::bigint",
                &[s],
            )
            .await
            .map_err(|e| err(&format!("--since {s:?} is not a time PostgreSQL reads"), &e))?
            .get(0),
    };
    let since_stamp = Hlc::compose(since_ms.max(0) as u64, 0, 0).to_sql();
    let replicated: Vec<&TableName> = config.replicated_tables().map(|t| &t.name).collect();
    for t in &opts.tables {
        if !replicated.contains(&t) {
            return Err(format!(
                "--table {t} is not a declared, replicated table (local tables are never replicated, so a \
                 corruption cannot spread through pgrelay; restore them by other means)"
            ));
        }
    }
    let mut out = Vec::new();
    for table in replicated
        .into_iter()
        .filter(|t| opts.tables.is_empty() || opts.tables.contains(t))
    {
        let cat = Catalog {
            client: &live,
            region,
        };
        let state = cat.table(table).await.map_err(|e| e.to_string())?;
        if !state.exists || !state.has_stamp_column {
            return Err(format!(
                "region {region}: table {table} does not exist or lacks pgrelay's stamp column; run pgrelay setup"
            ));
        }
        let in_backup = Catalog {
            client: &backup,
            region: "backup",
        }
        .table(table)
        .await
        .map_err(|e| e.to_string())?;
        if !in_backup.exists {
            return Err(format!(
                "--from: the backup has no table {table}; restore it there, or name the tables to repair with --table"
            ));
        }
        let sql = TableSql::new(table, &state.primary_key, &state.columns);
        progress.set_label(&table.to_string());
        out.push(
            repair_table(
                config,
                Databases {
                    live: &live,
                    backup: &backup,
                },
                table,
                &sql,
                since_stamp,
                opts,
                progress,
            )
            .await?,
        );
    }
    progress.finish();
    Ok(out)
}

/// The region's database and the restored backup.
struct Databases<'a> {
    live: &'a Client,
    backup: &'a Client,
}

async fn repair_table(
    config: &Config,
    dbs: Databases<'_>,
    table: &TableName,
    sql: &TableSql,
    since_stamp: i64,
    opts: &Options,
    progress: &mut crate::progress::Progress,
) -> Result<TableReport, String> {
    let name = table.to_string();
    let mut report = TableReport {
        table: name.clone(),
        ..Default::default()
    };
    let candidates = candidates(&dbs, table, sql, since_stamp).await?;
    let mine = by_origin(config, candidates, opts, &mut report);
    // the keys to compare are known now: the bar's total grows by them
    progress.set_total(progress.done() + mine.len() as u64);
    for keys in mine.chunks(CHUNK) {
        progress.inc(keys.len() as u64);
        let current = rows_of(dbs.live, sql, keys, &format!("reading {name}")).await?;
        let before = rows_of(
            dbs.backup,
            sql,
            keys,
            &format!("reading {name} in the backup"),
        )
        .await?;
        let writes = compare(keys, &current, &before, &mut report);
        if opts.dry_run {
            for (_, action, _) in &writes {
                count(&mut report, *action);
            }
            continue;
        }
        write_chunk(dbs.live, sql, &name, &writes, &before, &mut report).await?;
    }
    Ok(report)
}

/// The keys of `table` whose current version may be the corruption's,
/// each with its newest stamp at or after `since_stamp`: rows and
/// tombstones stamped since, and after a truncate since, every row the
/// backup holds (at the truncate's stamp).
async fn candidates(
    dbs: &Databases<'_>,
    table: &TableName,
    sql: &TableSql,
    since_stamp: i64,
) -> Result<BTreeMap<String, i64>, String> {
    let name = table.to_string();
    let mut candidates: BTreeMap<String, i64> = BTreeMap::new();
    let stamp = quote_ident(HLC_COLUMN);
    for r in dbs
        .live
        .query(
            &format!(
                "SELECT {}::text, {stamp} FROM {} WHERE {stamp} >= $1",
                sql.key,
                table.quoted()
            ),
            &[&since_stamp],
        )
        .await
        .map_err(|e| err(&format!("reading {name}"), &e))?
    {
        keep_newest(&mut candidates, r.get(0), r.get(1));
    }
    let tombstones = dbs
        .live
        .query(
            "SELECT pk::text, hlc FROM pgrelay.tombstones WHERE table_name = $1 AND hlc >= $2",
            &[&name, &since_stamp],
        )
        .await
        .map_err(|e| err("reading pgrelay.tombstones", &e))?;
    let mut truncated: Option<i64> = None;
    for r in tombstones {
        let key: String = r.get(0);
        if key == "{}" {
            // a truncate since: every row the backup holds is a candidate
            truncated = truncated.max(Some(r.get(1)));
        } else {
            keep_newest(&mut candidates, key, r.get(1));
        }
    }
    if let Some(at) = truncated {
        for r in dbs
            .backup
            .query(
                &format!("SELECT {}::text FROM {}", sql.key, table.quoted()),
                &[],
            )
            .await
            .map_err(|e| err(&format!("reading {name} in the backup"), &e))?
        {
            candidates.entry(r.get(0)).or_insert(at);
        }
    }
    Ok(candidates)
}

/// Notes `key` as a candidate at `stamp`, keeping the newest stamp seen.
fn keep_newest(candidates: &mut BTreeMap<String, i64>, key: String, stamp: i64) {
    let entry = candidates.entry(key).or_insert(stamp);
    *entry = (*entry).max(stamp);
}

/// The candidates to repair: those `--origin` wrote (or all, without it or
/// with `--include-others`); the others are listed in `report` as left.
fn by_origin(
    config: &Config,
    candidates: BTreeMap<String, i64>,
    opts: &Options,
    report: &mut TableReport,
) -> Vec<String> {
    let origin_id = opts.origin.as_ref().map(|o| config.regions[o.as_str()].id);
    let mut mine = Vec::new();
    for (key, stamp) in candidates {
        let by_origin = origin_id.is_none_or(|id| Hlc::from_sql(stamp).region_id() == id);
        if by_origin || opts.include_others {
            mine.push(key);
        } else {
            let by = writer(config, stamp);
            report.left.push((key, by, stamp));
        }
    }
    mine
}

/// One write of a repair: the key, what to do, and the stamp of the
/// current version read (the write's condition).
type Write<'k> = (&'k String, Action, Option<i64>);

/// What to do with each of `keys`, from its current row and the backup's;
/// keys already as in the backup are counted in `report`.
fn compare<'k>(
    keys: &'k [String],
    current: &BTreeMap<String, (String, Option<i64>)>,
    before: &BTreeMap<String, (String, Option<i64>)>,
    report: &mut TableReport,
) -> Vec<Write<'k>> {
    let mut writes = Vec::new();
    for k in keys {
        let cur = current.get(k);
        let action = decide(
            cur.map(|c| c.0.as_str()),
            before.get(k).map(|b| b.0.as_str()),
        );
        match action {
            Action::Unchanged => report.unchanged += 1,
            _ => writes.push((k, action, cur.and_then(|c| c.1))),
        }
    }
    writes
}

/// Writes one chunk's `writes` (`before`: the backup's rows) in one
/// transaction, each only if the row is still the version read; a row
/// that changed meanwhile is listed in `report` as raced.
async fn write_chunk(
    live: &Client,
    sql: &TableSql,
    name: &str,
    writes: &[Write<'_>],
    before: &BTreeMap<String, (String, Option<i64>)>,
    report: &mut TableReport,
) -> Result<(), String> {
    live.batch_execute("BEGIN")
        .await
        .map_err(|e| err("begin", &e))?;
    for &(k, action, seen) in writes {
        let n = match action {
            Action::Remove => live
                .execute(sql.delete.as_str(), &[k, &seen])
                .await
                .map_err(|e| err(&format!("deleting from {name}"), &e))?,
            _ => {
                let row = &before[k].0;
                live.execute(sql.upsert.as_str(), &[row, &seen])
                    .await
                    .map_err(|e| err(&format!("writing {name}"), &e))?
            }
        };
        if n == 1 {
            count(report, action);
        } else {
            report.raced.push(k.clone());
        }
    }
    live.batch_execute("COMMIT")
        .await
        .map_err(|e| err("commit", &e))
}

fn count(report: &mut TableReport, action: Action) {
    match action {
        Action::Restore => report.restored += 1,
        Action::Rewrite => report.rewritten += 1,
        Action::Remove => report.removed += 1,
        Action::Unchanged => report.unchanged += 1,
    }
}

/// The printed report.
pub fn render(reports: &[TableReport], region: &str, dry_run: bool) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let verb = if dry_run { "would be " } else { "" };
    for r in reports {
        let _ = writeln!(
            out,
            "{}: {} {verb}restored, {} {verb}rewritten, {} {verb}removed (the backup's version, freshly stamped in {region}), \
             {} already as in the backup, {} left (written since by another region), {} changed while repairing",
            r.table,
            r.restored,
            r.rewritten,
            r.removed,
            r.unchanged,
            r.left.len(),
            r.raced.len()
        );
        for (key, writer, stamp) in &r.left {
            let _ = writeln!(
                out,
                "    left {key}: written by {writer} ({}); --include-others repairs it too",
                Hlc::from_sql(*stamp).readable()
            );
        }
        let unique: BTreeSet<&String> = r.raced.iter().collect();
        for key in unique {
            let _ = writeln!(out, "    changed while repairing, left as it is: {key}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(origin: Option<&str>, include_others: bool) -> Options {
        Options {
            tables: vec![],
            since: None,
            origin: origin.map(String::from),
            include_others,
            dry_run: true,
        }
    }

    #[test]
    fn candidates_by_origin_and_the_others_left() {
        let config = crate::config::test_config(&["us", "eu"], "");
        let mut candidates = BTreeMap::new();
        keep_newest(&mut candidates, "a".into(), Hlc::compose(10, 0, 1).to_sql());
        keep_newest(&mut candidates, "a".into(), Hlc::compose(5, 0, 2).to_sql());
        keep_newest(&mut candidates, "b".into(), Hlc::compose(7, 0, 2).to_sql());
        // the newest stamp of a key counts
        assert_eq!(candidates["a"], Hlc::compose(10, 0, 1).to_sql());
        let mut report = TableReport::default();
        let mine = by_origin(
            &config,
            candidates.clone(),
            &options(Some("us"), false),
            &mut report,
        );
        assert_eq!(mine, ["a"]);
        assert_eq!(
            report.left,
            vec![("b".to_string(), "eu".to_string(), candidates["b"])]
        );
        let mut report = TableReport::default();
        let all = by_origin(
            &config,
            candidates.clone(),
            &options(Some("us"), true),
            &mut report,
        );
        assert_eq!(all, ["a", "b"]);
        assert!(report.left.is_empty());
        let all = by_origin(&config, candidates, &options(None, false), &mut report);
        assert_eq!(all, ["a", "b"]);
    }

    #[test]
    fn compare_counts_the_unchanged_and_keeps_the_stamp_read() {
        let row = |v: &str, stamp| (v.to_string(), Some(stamp));
        let current = BTreeMap::from([
            ("same".to_string(), row("x", 1)),
            ("changed".to_string(), row("x", 2)),
            ("extra".to_string(), row("x", 3)),
        ]);
        let before = BTreeMap::from([
            ("same".to_string(), row("x", 0)),
            ("changed".to_string(), row("y", 0)),
            ("gone".to_string(), row("z", 0)),
        ]);
        let keys: Vec<String> = ["same", "changed", "extra", "gone"]
            .iter()
            .map(|k| k.to_string())
            .collect();
        let mut report = TableReport::default();
        let writes = compare(&keys, &current, &before, &mut report);
        assert_eq!(report.unchanged, 1);
        let writes: Vec<(&str, Action, Option<i64>)> = writes
            .into_iter()
            .map(|(k, a, s)| (k.as_str(), a, s))
            .collect();
        assert_eq!(
            writes,
            vec![
                ("changed", Action::Rewrite, Some(2)),
                ("extra", Action::Remove, Some(3)),
                ("gone", Action::Restore, None),
            ]
        );
    }

    #[test]
    fn actions() {
        let a = r#"{"id": 1, "price": 0}"#;
        let b = r#"{"id": 1, "price": 5}"#;
        assert_eq!(decide(Some(a), Some(b)), Action::Rewrite);
        assert_eq!(decide(Some(a), Some(a)), Action::Unchanged);
        assert_eq!(decide(None, Some(b)), Action::Restore);
        assert_eq!(decide(Some(a), None), Action::Remove);
        assert_eq!(decide(None, None), Action::Unchanged);
    }

    #[test]
    fn statements_are_conditional_on_the_stamp_read() {
        let t = TableName::new("public", "order lines");
        let sql = TableSql::new(
            &t,
            &["id".into(), "line".into()],
            &["id".into(), "line".into(), "qty".into(), HLC_COLUMN.into()],
        );
        assert_eq!(
            sql.key,
            "jsonb_build_object('id', \"id\"::text, 'line', \"line\"::text)"
        );
        assert!(sql
            .upsert
            .contains("INSERT INTO \"public\".\"order lines\" AS cur (\"id\", \"line\", \"qty\")"));
        assert!(sql.upsert.contains("ON CONFLICT (\"id\", \"line\") DO UPDATE SET \"qty\" = EXCLUDED.\"qty\" WHERE cur.\"_pgrelay_hlc\" = $2"));
        assert!(sql.delete.contains(
            "cur.\"id\" = k.\"id\" AND cur.\"line\" = k.\"line\" AND cur.\"_pgrelay_hlc\" = $2"
        ));
        assert!(sql.rows.contains(
            "(\"id\", \"line\") IN (SELECT \"id\", \"line\" FROM jsonb_populate_recordset"
        ));
        // a table of key columns only still updates (so the stamp moves)
        let only = TableSql::new(&t, &["id".into()], &["id".into(), HLC_COLUMN.into()]);
        assert!(only
            .upsert
            .contains("DO UPDATE SET \"id\" = EXCLUDED.\"id\""));
    }
}
