//! `pgrelay resync`: a region's rows, as they are now, sent again.
//!
//! ```text
//!  declared tables (one REPEATABLE READ snapshot) ──rows──▶ Change (insert, the row's own stamp)
//!  pgrelay.tombstones ─────────────────────────────keys──▶ Change (delete / truncate, its stamp)
//!        ──▶ Policy::route (per destination) ──▶ envelope ──▶ the capture side's topics
//! ```
//!
//! Every record is what the capture side would publish for that row, with
//! the stamp the row carries, so the apply side treats it like any other:
//! the newest stamp wins, an equal one changes nothing. Resending is
//! therefore safe at any time, sidecars running — a row changed meanwhile
//! is captured with a higher stamp, which wins wherever it lands first —
//! and running it twice is harmless. It fills what the replication stream
//! cannot: rows that existed before pgrelay was set up, a region that
//! joins later, and what was written while a slot was lost.
//!
//! Residency holds as for captured changes: the same routing and column
//! rules decide what may go where. Rows without a stamp (written before
//! `setup` added the column) go with stamp 0, older than any write. A
//! tombstone of a partitioned table keeps the deleted row's home, so its
//! delete goes where the row may have gone (one without a home, left before
//! homes were kept, is not sent); its table-wide one (a truncate) is not
//! sent, as the capture side keeps a partitioned table's truncate home. A
//! table whose column rules
//! name a column it lacks is refused before anything is sent.
//!
//! Rows of a table with DR regions are also sealed to those regions' DR
//! topics, as the capture side seals them, so a row written while a slot
//! was lost gets its copy in the vault too (the vault keeps the newest
//! stamp: a copy it holds already changes nothing).
//!
//! Error policy: anything that fails ends the run with an error naming it;
//! records already delivered stay (resending is idempotent), so the fix is
//! to run it again.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{pin_mut, TryStreamExt};
use tokio_postgres::error::SqlState;
use tokio_postgres::SimpleQueryMessage;

use crate::capture::seals::SealLedger;
use crate::config::Config;
use crate::dr::DrKey;
use crate::event::{
    canonical_text_sets, quote_ident, Change, ColumnDesc, Datum, Lsn, Op, TableName, TableSchema,
    TxMeta,
};
use crate::hlc::Hlc;
use crate::names::HLC_COLUMN;
use crate::publish::envelope::Source;
use crate::publish::producer::{Delivery, Outlets, Reports, SendError};
use crate::publish::sink::{queue_dr, seal_for_dr, Outgoing};
use crate::residency::{Policy, TableRule, Verdict};
use crate::source::catalog::{self, Catalog};

/// What to send again.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Only these destinations (default: every destination).
    pub to: Vec<String>,
    /// Only these tables (default: every declared, non-local table).
    pub tables: Vec<TableName>,
    /// Read and route everything, send nothing.
    pub dry_run: bool,
    /// Sessions reading a table's rows at once, each a range of its heap
    /// blocks under the one snapshot, each with its own producer (0 or 1:
    /// one).
    pub jobs: usize,
}

/// Records sent and withheld, by table and destination.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub counts: BTreeMap<(String, String), Counts>,
}

impl Summary {
    /// Adds the counts of `other` (another reader of the same run).
    fn absorb(&mut self, other: Summary) {
        for (key, c) in other.counts {
            let mine = self.counts.entry(key).or_default();
            mine.rows += c.rows;
            mine.tombstones += c.tombstones;
            mine.withheld += c.withheld;
            mine.partial += c.partial;
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Rows (inserts) sent.
    pub rows: u64,
    /// Tombstones (deletes, truncates) sent.
    pub tombstones: u64,
    /// Withheld by the residency policy.
    pub withheld: u64,
    /// Not sent by [`send_keys`]: a copy whose columns a rule altered on
    /// its way here (see [`Resend::own_only`]).
    pub partial: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ResyncError {
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Catalog(#[from] catalog::CatalogError),
    #[error("region {region}: reading {what}: {}", crate::source::pg_error::reason(.source))]
    Read {
        region: String,
        what: String,
        source: tokio_postgres::Error,
    },
    #[error("{0}")]
    Kafka(String),
    /// Another reader of the run failed (its error is the one reported).
    #[error("stopped: another reader of this resync failed")]
    Stopped,
}

/// A range of a table's heap blocks, `from..to` (`to`: `None`, to the
/// end): what one session of a parallel read scans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocks {
    pub from: u64,
    pub to: Option<u64>,
}

impl Blocks {
    /// Every block of the table.
    pub const ALL: Blocks = Blocks { from: 0, to: None };
}

/// Splits a table of `blocks` heap blocks into at most `jobs` ranges of
/// whole blocks that cover it once, the last open-ended (rows in blocks
/// added after the count are not in the snapshot anyway): one range, the
/// whole table, when `jobs` is 1 or the table has fewer than two blocks.
pub fn block_ranges(blocks: u64, jobs: usize) -> Vec<Blocks> {
    let parts = (jobs.max(1) as u64).min(blocks).max(1);
    (0..parts)
        .map(|i| Blocks {
            from: blocks * i / parts,
            to: (i + 1 < parts).then(|| blocks * (i + 1) / parts),
        })
        .collect()
}

/// [`select_sql`] of the rows in `part` of the table's heap (a TID range
/// scan), or of every row for [`Blocks::ALL`].
pub fn select_part_sql(table: &TableName, columns: &[String], part: Blocks) -> String {
    let all = select_sql(table, columns);
    match part {
        Blocks::ALL => all,
        Blocks { from, to: None } => format!("{all} WHERE ctid >= '({from},0)'::tid"),
        Blocks { from, to: Some(to) } => {
            format!("{all} WHERE ctid >= '({from},0)'::tid AND ctid < '({to},0)'::tid")
        }
    }
}

/// The statement reading a table's rows: every column in the table's
/// order, the stamp last. Simple-query protocol: values come as the types'
/// text output, as the replication stream carries them.
pub fn select_sql(table: &TableName, columns: &[String]) -> String {
    let list: Vec<String> = columns
        .iter()
        .map(|c| quote_ident(c))
        .chain(std::iter::once(quote_ident(HLC_COLUMN)))
        .collect();
    format!("SELECT {} FROM {}", list.join(", "), table.quoted())
}

/// The change for one tombstone: a delete of the key it holds (other
/// columns unknown, but the home column of a `partitioned` table when the
/// tombstone kept the deleted row's home: `home` is that column and value),
/// or a truncate for the table-wide one (`{}`).
pub fn tombstone_change(
    schema: &Arc<TableSchema>,
    pk: &serde_json::Map<String, serde_json::Value>,
    home: Option<(&str, &str)>,
    hlc: Hlc,
    tx: &Arc<TxMeta>,
) -> Option<Change> {
    if pk.is_empty() {
        return Some(Change {
            schema: schema.clone(),
            op: Op::Truncate,
            before: None,
            after: None,
            hlc,
            tx: tx.clone(),
            seq: 0,
        });
    }
    let mut before = Vec::with_capacity(schema.columns.len());
    for c in &schema.columns {
        if !c.is_key {
            before.push(match home {
                Some((column, value)) if column == c.name => Datum::Text(value.to_string()),
                _ => Datum::Unchanged,
            });
            continue;
        }
        before.push(match pk.get(&c.name)? {
            serde_json::Value::String(s) => Datum::Text(s.clone()),
            serde_json::Value::Null => Datum::Null,
            _ => return None,
        });
    }
    Some(Change {
        schema: schema.clone(),
        op: Op::Delete,
        before: Some(before),
        after: None,
        hlc,
        tx: tx.clone(),
        seq: 0,
    })
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// The schemas of `tables` in `region`, each checked against the policy's
/// column rules (a rule naming a column the table lacks refuses it).
async fn schemas(
    cat: &Catalog<'_>,
    region: &str,
    policy: &Policy,
    tables: &[TableName],
) -> Result<Vec<Arc<TableSchema>>, ResyncError> {
    let mut schemas = Vec::new();
    for (i, t) in tables.iter().enumerate() {
        let state = cat.table(t).await?;
        if !state.exists || !state.has_stamp_column {
            return Err(ResyncError::Setup(format!(
                "region {region}: table {t} is missing or lacks pgrelay's stamp column; run pgrelay setup"
            )));
        }
        policy
            .check_relation(t, state.columns.iter().map(String::as_str), None)
            .map_err(|e| ResyncError::Setup(format!("region {region}: {e}")))?;
        let columns = state
            .columns
            .iter()
            .filter(|c| *c != HLC_COLUMN)
            .map(|c| ColumnDesc {
                name: c.clone(),
                type_oid: 0,
                is_key: state.primary_key.contains(c),
            })
            .collect();
        schemas.push(Arc::new(TableSchema {
            oid: i as u32 + 1,
            table: t.clone(),
            columns,
        }));
    }

    Ok(schemas)
}

/// Sends `region`'s rows and tombstones again; see the module docs.
pub async fn run(
    config: &Config,
    region: &str,
    opts: &Options,
    progress: &mut crate::progress::Progress,
) -> Result<Summary, ResyncError> {
    let region_cfg = config
        .region(region)
        .map_err(|e| ResyncError::Setup(e.to_string()))?;
    let policy = Policy::compile(config, region).map_err(|e| ResyncError::Setup(e.to_string()))?;
    let selection = Selection::of(config, region, &policy, opts)?;

    let client = read_session(&region_cfg.dsn, region).await?;
    let cat = Catalog {
        client: &client,
        region,
    };
    let db = cat.database_name().await?;
    let schemas = schemas(&cat, region, &policy, &selection.tables).await?;

    let layout = OutletLayout::of(config, region, &policy, &selection);
    let outlets = open_outlets(config, &layout.regions, &layout.topics, opts.dry_run)?;
    let dr_key = match selection.dr_topics.is_empty() || opts.dry_run {
        true => None,
        false => Some(
            config
                .dr_key(region)
                .map_err(|e| ResyncError::Setup(e.to_string()))?,
        ),
    };
    let mut out = Sender::new(
        config,
        region,
        db,
        &policy,
        outlets.as_ref(),
        &layout.regions,
        &layout.dr_outlets,
    )
    .sealing(dr_key.as_ref(), &region_cfg.dsn);

    // one snapshot for every table and the tombstones, shared with the
    // helper sessions of a parallel read
    let lsn = begin_snapshot(&client, region).await?;
    if opts.jobs > 1 {
        // see PARALLEL_LOCK_TIMEOUT
        client
            .batch_execute(&format!(
                "SET LOCAL lock_timeout = '{PARALLEL_LOCK_TIMEOUT}'"
            ))
            .await
            .map_err(read_err(region, "the resync's snapshot"))?;
    }
    progress.set_total(row_estimate(&client, region, &schemas).await?);
    let mut parts = Vec::with_capacity(schemas.len());
    for schema in &schemas {
        let blocks = match opts.jobs > 1 {
            true => heap_blocks(&client, region, &schema.table).await?,
            false => 0,
        };
        parts.push(block_ranges(blocks, opts.jobs));
    }
    let helpers = parts.iter().map(Vec::len).max().unwrap_or(1) - 1;
    let snapshot_id = match helpers {
        0 => None,
        _ => Some(export_snapshot(&client, region).await?),
    };
    let shared = Shared {
        config,
        region,
        dsn: &region_cfg.dsn,
        policy: &policy,
        layout: &layout,
        wanted: &selection.wanted,
        dr_key: dr_key.as_ref(),
        tx: snapshot_tx(&lsn),
        snapshot_id,
        dry_run: opts.dry_run,
        rows_elsewhere: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    };
    let snapshot = Snapshot {
        client: &client,
        region,
        policy: &policy,
        tx: shared.tx.clone(),
        helper: false,
        rows_elsewhere: &shared.rows_elsewhere,
        stop: &shared.stop,
    };
    let handle = tokio::runtime::Handle::current();
    let (queue, queued) = std::sync::mpsc::channel::<(Arc<TableSchema>, Blocks)>();
    let queued = Mutex::new(queued);
    let (read, helped) = tokio::task::block_in_place(|| {
        std::thread::scope(|s| {
            let (shared, queued) = (&shared, &queued);
            let readers: Vec<_> = (0..helpers)
                .map(|_| {
                    let db = out.source.db.clone();
                    s.spawn(move || shared.help(queued, db))
                })
                .collect();
            let read = handle.block_on(async {
                for (schema, ranges) in schemas.iter().zip(&parts) {
                    progress.set_label(&schema.table.to_string());
                    if ranges.len() > 1 {
                        tracing::info!(table = %schema.table, parts = ranges.len(), "reading the table in parts, one session each");
                    }
                    for range in &ranges[1..] {
                        // a reader that ended (failed) took no more: its
                        // error is reported below
                        let _ = queue.send((schema.clone(), *range));
                    }
                    snapshot
                        .send_rows(schema, ranges[0], &selection.wanted, &mut out, progress)
                        .await?;
                    snapshot
                        .send_tombstones(schema, &selection.wanted, &mut out)
                        .await?;
                }
                Ok::<(), ResyncError>(())
            });
            drop(queue);
            if read.is_err() {
                shared.stop.store(true, Ordering::Relaxed);
            }
            while !readers.iter().all(|r| r.is_finished()) {
                progress.inc(shared.rows_elsewhere.swap(0, Ordering::Relaxed));
                std::thread::sleep(Duration::from_millis(100));
            }
            let helped: Vec<Result<Summary, ResyncError>> = readers
                .into_iter()
                .map(|r| {
                    r.join().unwrap_or_else(|_| {
                        Err(ResyncError::Setup("a resync reader panicked".into()))
                    })
                })
                .collect();
            (read, helped)
        })
    });
    progress.inc(shared.rows_elsewhere.swap(0, Ordering::Relaxed));
    let mut errors: Vec<ResyncError> = read.err().into_iter().collect();
    for result in helped {
        match result {
            Ok(summary) => out.summary.absorb(summary),
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        // the failure, not the stops it caused in the other readers
        let first = errors
            .iter()
            .position(|e| !matches!(e, ResyncError::Stopped))
            .unwrap_or(0);
        return Err(errors.swap_remove(first));
    }
    // everything is read: a snapshot that ended on its own (an idle
    // session's timeout while the helpers finished) loses nothing
    if let Err(e) = end_snapshot(&client, region).await {
        tracing::warn!(region, error = %e, "ending the resync's snapshot");
    }
    out.finish().await?;
    progress.finish();
    Ok(out.summary)
}

/// [`read_err`], or for a lock a session of a parallel read waited for in
/// vain (see [`PARALLEL_LOCK_TIMEOUT`]), what to do.
fn parallel_read_err(region: &str, what: &str, e: tokio_postgres::Error) -> ResyncError {
    match e.code() {
        Some(&SqlState::LOCK_NOT_AVAILABLE) => ResyncError::Setup(format!(
            "region {region}: reading {what} in parts, a session waited {PARALLEL_LOCK_TIMEOUT} \
             for its lock: another session holds or waits for it exclusively (ALTER TABLE, \
             VACUUM FULL, ...); run resync again once that is done, or with --jobs 1, which \
             waits for it"
        )),
        _ => read_err(region, what)(e),
    }
}

/// How long a session of a parallel read waits for a table's lock. A
/// statement that wants a table exclusively (`ALTER TABLE`, `VACUUM FULL`)
/// waits for the session that reads it and queues every later reader of
/// the table behind it — a helper starting its part, or the main session
/// starting the next table while a helper still holds the last one — and
/// the run waits for all its readers: a wait nothing would end. With the
/// timeout the run stops, naming the table, and the statement goes on.
const PARALLEL_LOCK_TIMEOUT: &str = "10s";

/// What every reader of a run shares: the run's selection, its snapshot
/// and how the others are doing.
struct Shared<'a> {
    config: &'a Config,
    region: &'a str,
    dsn: &'a str,
    policy: &'a Policy,
    layout: &'a OutletLayout,
    wanted: &'a [usize],
    dr_key: Option<&'a DrKey>,
    tx: Arc<TxMeta>,
    /// `pg_export_snapshot()` of the run's snapshot: helper sessions
    /// read under it.
    snapshot_id: Option<String>,
    dry_run: bool,
    /// Rows the helper sessions read, not yet shown by the progress.
    rows_elsewhere: AtomicU64,
    /// Set when a reader failed: the others stop.
    stop: AtomicBool,
}

impl Shared<'_> {
    /// A helper session's thread: its own runtime, session (under the
    /// run's snapshot) and producer; reads the parts `queued` gives it
    /// until the queue ends, then waits for Kafka's acknowledgements.
    fn help(
        &self,
        queued: &Mutex<std::sync::mpsc::Receiver<(Arc<TableSchema>, Blocks)>>,
        db: String,
    ) -> Result<Summary, ResyncError> {
        let result = self.read_parts(queued, db);
        if result.is_err() {
            self.stop.store(true, Ordering::Relaxed);
        }
        result
    }

    fn read_parts(
        &self,
        queued: &Mutex<std::sync::mpsc::Receiver<(Arc<TableSchema>, Blocks)>>,
        db: String,
    ) -> Result<Summary, ResyncError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ResyncError::Setup(format!("a resync reader's runtime: {e}")))?;
        let outlets = match self.dry_run {
            true => None,
            false => Some(
                Outlets::open_reporting(
                    self.config,
                    &self.layout.regions,
                    &self.layout.topics,
                    Reports::Failures,
                )
                .map_err(|e| ResyncError::Kafka(e.to_string()))?,
            ),
        };
        let snapshot_id = self.snapshot_id.as_deref().unwrap_or_default();
        runtime.block_on(async {
            let mut out = Sender::new(
                self.config,
                self.region,
                db,
                self.policy,
                outlets.as_ref(),
                &self.layout.regions,
                &self.layout.dr_outlets,
            )
            .sealing(self.dr_key, self.dsn);
            let client = read_session(self.dsn, self.region).await?;
            client
                .batch_execute(&format!(
                    "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}; \
                     SET LOCAL lock_timeout = '{PARALLEL_LOCK_TIMEOUT}'",
                    crate::event::quote_literal(snapshot_id)
                ))
                .await
                .map_err(read_err(self.region, "the resync's snapshot"))?;
            let snapshot = Snapshot {
                client: &client,
                region: self.region,
                policy: self.policy,
                tx: self.tx.clone(),
                helper: true,
                rows_elsewhere: &self.rows_elsewhere,
                stop: &self.stop,
            };
            let mut hidden = crate::progress::Progress::hidden();
            loop {
                // the lock is held while waiting: one reader waits, the
                // others wait for the lock
                let next = queued.lock().unwrap_or_else(|e| e.into_inner()).recv();
                let Ok((schema, range)) = next else { break };
                snapshot
                    .send_rows(&schema, range, self.wanted, &mut out, &mut hidden)
                    .await?;
            }
            end_snapshot(&client, self.region).await?;
            out.finish().await?;
            Ok(out.summary)
        })
    }
}

/// How many heap blocks `table` has now (0 for a partitioned table's
/// parent, which has none of its own).
async fn heap_blocks(
    client: &tokio_postgres::Client,
    region: &str,
    table: &TableName,
) -> Result<u64, ResyncError> {
    let blocks: i64 = client
        .query_one(
            "SELECT (pg_relation_size($1::text::regclass) / current_setting('block_size')::bigint)::bigint",
            &[&table.quoted()],
        )
        .await
        .map_err(|e| parallel_read_err(region, &format!("table {table}"), e))?
        .get(0);
    Ok(blocks.max(0) as u64)
}

/// Exports the run's snapshot for the helper sessions.
async fn export_snapshot(
    client: &tokio_postgres::Client,
    region: &str,
) -> Result<String, ResyncError> {
    Ok(client
        .query_one("SELECT pg_export_snapshot()", &[])
        .await
        .map_err(read_err(region, "an exported snapshot"))?
        .get(0))
}

/// What a run sends, from its options: the DR topics, tables and live
/// destinations `--to` and `--table` keep, each named one checked.
#[derive(Debug, PartialEq, Eq)]
struct Selection {
    /// DR region and topic, for the DR regions `--to` keeps.
    dr_topics: Vec<(String, String)>,
    /// The declared, replicated tables `--table` keeps, in declared order.
    tables: Vec<TableName>,
    /// The live destinations `--to` keeps (indices into the policy's).
    wanted: Vec<usize>,
}

impl Selection {
    fn of(
        config: &Config,
        region: &str,
        policy: &Policy,
        opts: &Options,
    ) -> Result<Selection, ResyncError> {
        // DR copies: sealed to the DR regions `--to` keeps, after the live
        // destinations (as the capture side orders its outlets)
        let dr_topics: Vec<(String, String)> = config
            .dr_topics(region)
            .into_iter()
            .filter(|(d, _)| opts.to.is_empty() || opts.to.contains(d))
            .collect();
        for d in &opts.to {
            if !policy.destinations().contains(d) && !dr_topics.iter().any(|(r, _)| r == d) {
                return Err(ResyncError::Setup(format!(
                    "--to {d}: not a destination of region {region} (destinations: {})",
                    policy.destinations().join(", ")
                )));
            }
        }
        let mut tables = Vec::new();
        for t in config.replicated_tables() {
            if opts.tables.is_empty() || opts.tables.contains(&t.name) {
                tables.push(t.name.clone());
            }
        }
        for t in &opts.tables {
            if !tables.contains(t) {
                return Err(ResyncError::Setup(format!(
                    "--table {t}: not a declared, replicated table"
                )));
            }
        }
        let wanted: Vec<usize> = (0..policy.destinations().len())
            .filter(|&i| opts.to.is_empty() || opts.to.contains(&policy.destinations()[i]))
            .collect();
        Ok(Selection {
            dr_topics,
            tables,
            wanted,
        })
    }
}

/// The outlets of a run: every live destination's topic, then the DR
/// topics selected; and per selected table with DR copies, its DR outlets.
#[derive(Debug, PartialEq, Eq)]
struct OutletLayout {
    /// The region of each outlet.
    regions: Vec<String>,
    /// The topic of each outlet.
    topics: Vec<String>,
    dr_outlets: HashMap<TableName, Vec<usize>>,
}

impl OutletLayout {
    fn of(config: &Config, region: &str, policy: &Policy, selection: &Selection) -> OutletLayout {
        let live = policy.destinations().len();
        let dr_topics = &selection.dr_topics;
        let regions: Vec<String> = policy
            .destinations()
            .iter()
            .cloned()
            .chain(dr_topics.iter().map(|(d, _)| d.clone()))
            .collect();
        let topics: Vec<String> = policy
            .destinations()
            .iter()
            .map(|d| config.topic(region, d))
            .chain(dr_topics.iter().map(|(_, t)| t.clone()))
            .collect();
        let dr_outlets: HashMap<TableName, Vec<usize>> = config
            .tables
            .iter()
            .filter(|t| selection.tables.contains(&t.name))
            .map(|t| {
                let outlets = t
                    .dr_regions(region)
                    .filter_map(|d| dr_topics.iter().position(|(r, _)| r == d))
                    .map(|i| live + i)
                    .collect::<Vec<_>>();
                (t.name.clone(), outlets)
            })
            .filter(|(_, outlets)| !outlets.is_empty())
            .collect();
        OutletLayout {
            regions,
            topics,
            dr_outlets,
        }
    }
}

/// The producers of `topics` (one per outlet); none for a dry run.
fn open_outlets(
    config: &Config,
    regions: &[String],
    topics: &[String],
    dry_run: bool,
) -> Result<Option<Outlets>, ResyncError> {
    if dry_run {
        return Ok(None);
    }
    tokio::task::block_in_place(|| {
        Outlets::open_reporting(config, regions, topics, Reports::Failures)
    })
    .map(Some)
    .map_err(|e| ResyncError::Kafka(e.to_string()))
}

/// Maps a read's error to [`ResyncError::Read`] about `what` in `region`.
fn read_err(region: &str, what: &str) -> impl FnOnce(tokio_postgres::Error) -> ResyncError {
    let region = region.to_string();
    let what = what.to_string();
    move |source| ResyncError::Read {
        region,
        what,
        source,
    }
}

/// Opens the snapshot every table and tombstone is read in (a read-only
/// REPEATABLE READ transaction); returns the WAL position it starts at.
async fn begin_snapshot(
    client: &tokio_postgres::Client,
    region: &str,
) -> Result<String, ResyncError> {
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(read_err(region, "a snapshot"))?;
    Ok(client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map_err(read_err(region, "the current LSN"))?
        .get(0))
}

async fn end_snapshot(client: &tokio_postgres::Client, region: &str) -> Result<(), ResyncError> {
    client
        .batch_execute("COMMIT")
        .await
        .map_err(read_err(region, "the end of the snapshot"))
}

/// The transaction every resent change belongs to: the snapshot's LSN
/// (`lsn` as `pg_current_wal_lsn()` spells it), committed now.
fn snapshot_tx(lsn: &str) -> Arc<TxMeta> {
    Arc::new(TxMeta {
        xid: 0,
        commit_lsn: lsn.parse::<Lsn>().unwrap_or_default(),
        commit_ts_us: now_us(),
    })
}

/// The planner's row estimates of `schemas`' tables: enough for a rate
/// and an ETA.
async fn row_estimate(
    client: &tokio_postgres::Client,
    region: &str,
    schemas: &[Arc<TableSchema>],
) -> Result<u64, ResyncError> {
    let mut estimate = 0u64;
    for schema in schemas {
        let rows: i64 = client
            .query_one(
                "SELECT coalesce(max(greatest(c.reltuples, 0)), 0)::bigint FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2",
                &[&schema.table.schema, &schema.table.name],
            )
            .await
            .map_err(read_err(region, "row estimates"))?
            .get(0);
        estimate += rows.max(0) as u64;
    }
    Ok(estimate)
}

/// The insert that sends a row again: `value(i)` is the text of its
/// `i`-th column in the table's order (`None`: SQL NULL), the stamp after
/// the columns (none, or not a number: 0).
fn row_change<'r>(
    schema: &Arc<TableSchema>,
    value: impl Fn(usize) -> Option<&'r str>,
    tx: &Arc<TxMeta>,
) -> Change {
    let n = schema.columns.len();
    let after: Vec<Datum> = (0..n)
        .map(|i| match value(i) {
            Some(v) => Datum::Text(v.to_string()),
            None => Datum::Null,
        })
        .collect();
    let hlc = value(n).and_then(|s| s.parse().ok()).unwrap_or(Hlc::ZERO);
    Change {
        schema: schema.clone(),
        op: Op::Insert,
        before: None,
        after: Some(after),
        hlc,
        tx: tx.clone(),
        seq: 0,
    }
}

/// The read side of a resend: one snapshot of the region, the changes it
/// holds made into records by a [`Sender`].
struct Snapshot<'a> {
    client: &'a tokio_postgres::Client,
    region: &'a str,
    policy: &'a Policy,
    tx: Arc<TxMeta>,
    /// A helper session's: counts its rows in `rows_elsewhere`; the main
    /// one shows them with its own.
    helper: bool,
    rows_elsewhere: &'a AtomicU64,
    /// Set when a reader failed.
    stop: &'a AtomicBool,
}

impl Snapshot<'_> {
    /// Every row of `schema`'s table in `part` of its heap, as inserts.
    async fn send_rows(
        &self,
        schema: &Arc<TableSchema>,
        part: Blocks,
        wanted: &[usize],
        out: &mut Sender<'_>,
        progress: &mut crate::progress::Progress,
    ) -> Result<(), ResyncError> {
        let names: Vec<String> = schema.columns.iter().map(|c| c.name.clone()).collect();
        let what = format!("table {}", schema.table);
        let failed = |e: tokio_postgres::Error| parallel_read_err(self.region, &what, e);
        let stream = self
            .client
            .simple_query_raw(&select_part_sql(&schema.table, &names, part))
            .await
            .map_err(failed)?;
        pin_mut!(stream);
        let mut read = 0u64;
        while let Some(msg) = stream.try_next().await.map_err(failed)? {
            let SimpleQueryMessage::Row(row) = msg else {
                continue;
            };
            if self.stop.load(Ordering::Relaxed) {
                return Err(ResyncError::Stopped);
            }
            let change = row_change(schema, |i| row.get(i), &self.tx);
            out.send(&change, wanted).await?;
            read += 1;
            if self.helper {
                self.rows_elsewhere.fetch_add(1, Ordering::Relaxed);
            } else {
                progress.inc(1);
                if read % 1024 == 0 {
                    progress.inc(self.rows_elsewhere.swap(0, Ordering::Relaxed));
                }
            }
        }
        Ok(())
    }

    /// Every tombstone of `schema`'s table, as deletes and truncates; one
    /// without the table's key columns is logged and not sent.
    async fn send_tombstones(
        &self,
        schema: &Arc<TableSchema>,
        wanted: &[usize],
        out: &mut Sender<'_>,
    ) -> Result<(), ResyncError> {
        let rows = self
            .client
            .query(
                "SELECT pk::text, hlc, home FROM pgrelay.tombstones WHERE table_name = $1",
                &[&schema.table.to_string()],
            )
            .await
            .map_err(read_err(
                self.region,
                &format!("the tombstones of {}", schema.table),
            ))?;
        for r in rows {
            match self.tombstone(schema, &r) {
                Some(change) => out.send(&change, wanted).await?,
                None => {
                    tracing::warn!(table = %schema.table, "tombstone without the table's key columns: not sent")
                }
            }
        }
        Ok(())
    }

    /// The change for a row of `pgrelay.tombstones` (`pk::text, hlc,
    /// home`), as [`tombstone_change`] makes it.
    fn tombstone(&self, schema: &Arc<TableSchema>, r: &tokio_postgres::Row) -> Option<Change> {
        let pk: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(r.get::<_, &str>(0)).unwrap_or_default();
        let hlc: i64 = r.get(1);
        let home = self
            .policy
            .rule(&schema.table)
            .and_then(TableRule::home_column)
            .zip(r.get::<_, Option<&str>>(2));
        tombstone_change(schema, &pk, home, Hlc::from_sql(hlc), &self.tx)
    }

    /// The current version of each key of `request` (its row, or its
    /// tombstone), to the request's destination; with `own_only`, rows
    /// another region wrote are counted as partial instead. `region_id`
    /// is this region's.
    async fn send_request(
        &self,
        cat: &Catalog<'_>,
        region_id: u8,
        schema: &Arc<TableSchema>,
        request: &Resend,
        out: &mut Sender<'_>,
    ) -> Result<(), ResyncError> {
        let destinations = self.policy.destinations();
        let wanted: Vec<usize> = (0..destinations.len())
            .filter(|&i| destinations[i] == request.to)
            .collect();
        let state = cat.table(&request.table).await?;
        let key_types = key_types(&state);
        let names: Vec<String> = schema.columns.iter().map(|c| c.name.clone()).collect();
        let what = format!("table {}", schema.table);
        for keys in request.keys.chunks(1000) {
            let statement = keyed_select_sql(&schema.table, &names, &key_types, keys);
            let rows = self
                .client
                .simple_query(&statement)
                .await
                .map_err(read_err(self.region, &what))?;
            for msg in rows {
                let SimpleQueryMessage::Row(row) = msg else {
                    continue;
                };
                let change = row_change(schema, |i| row.get(i), &self.tx);
                if request.own_only && change.hlc.region_id() != region_id {
                    out.count_partial(&schema.table, &wanted);
                    continue;
                }
                out.send(&change, &wanted).await?;
            }
            let tombs = self
                .client
                .query(
                    "SELECT pk::text, hlc, home FROM pgrelay.tombstones \
                     WHERE table_name = $1 AND pk = ANY ($2::text[]::jsonb[])",
                    &[&schema.table.to_string(), &keys],
                )
                .await
                .map_err(read_err(
                    self.region,
                    &format!("the tombstones of {}", schema.table),
                ))?;
            for r in tombs {
                if let Some(change) = self.tombstone(schema, &r) {
                    out.send(&change, &wanted).await?;
                }
            }
        }
        Ok(())
    }
}

/// Each primary key column of a table with its type (as
/// [`keyed_select_sql`] casts the keys to).
fn key_types(state: &catalog::TableState) -> Vec<(String, String)> {
    state
        .primary_key
        .iter()
        .map(|k| {
            let i = state.columns.iter().position(|c| c == k).unwrap_or(0);
            (k.clone(), state.column_types[i].clone())
        })
        .collect()
}

/// Keys of one table that a region sends again to one destination
/// (`pgrelay verify --repair`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resend {
    pub table: TableName,
    pub to: String,
    /// Primary keys as the tombstones spell them (`{"column": "text"}`).
    pub keys: Vec<String>,
    /// Send only rows this region wrote itself: its copies of others' rows
    /// had columns altered by a rule on their way here that the destination
    /// must hold unaltered.
    pub own_only: bool,
}

/// Sends `region`'s current version of each key of `requests` (its row,
/// or its tombstone) again, as [`run`] would send it but to the named
/// destination only. A key the region holds nothing for sends nothing.
pub async fn send_keys(
    config: &Config,
    region: &str,
    requests: &[Resend],
    dry_run: bool,
) -> Result<Summary, ResyncError> {
    let region_cfg = config
        .region(region)
        .map_err(|e| ResyncError::Setup(e.to_string()))?;
    let policy = Policy::compile(config, region).map_err(|e| ResyncError::Setup(e.to_string()))?;
    let tables = requested_tables(region, &policy, requests)?;
    let client = read_session(&region_cfg.dsn, region).await?;
    let cat = Catalog {
        client: &client,
        region,
    };
    let db = cat.database_name().await?;
    let schemas = schemas(&cat, region, &policy, &tables).await?;
    let topics: Vec<String> = policy
        .destinations()
        .iter()
        .map(|d| config.topic(region, d))
        .collect();
    let outlets = open_outlets(config, policy.destinations(), &topics, dry_run)?;
    // a repair re-sends rows to regions that differ; DR copies follow
    // the rows' next change (or a resync)
    let no_dr_outlets = HashMap::new();
    let mut out = Sender::new(
        config,
        region,
        db,
        &policy,
        outlets.as_ref(),
        policy.destinations(),
        &no_dr_outlets,
    );
    let lsn = begin_snapshot(&client, region).await?;
    let (counted, never) = (AtomicU64::new(0), AtomicBool::new(false));
    let snapshot = Snapshot {
        client: &client,
        region,
        policy: &policy,
        tx: snapshot_tx(&lsn),
        helper: false,
        rows_elsewhere: &counted,
        stop: &never,
    };
    for request in requests {
        let Some(schema) = schemas.iter().find(|s| s.table == request.table) else {
            continue;
        };
        snapshot
            .send_request(&cat, region_cfg.id, schema, request, &mut out)
            .await?;
    }
    end_snapshot(&client, region).await?;
    out.finish().await?;
    Ok(out.summary)
}

/// The tables of `requests`, each once in the order first named; every
/// request's destination must be one of the region's.
fn requested_tables(
    region: &str,
    policy: &Policy,
    requests: &[Resend],
) -> Result<Vec<TableName>, ResyncError> {
    let mut tables: Vec<TableName> = Vec::new();
    for r in requests {
        if !policy.destinations().contains(&r.to) {
            return Err(ResyncError::Setup(format!(
                "{}: not a destination of region {region}",
                r.to
            )));
        }
        if !tables.contains(&r.table) {
            tables.push(r.table.clone());
        }
    }
    Ok(tables)
}

/// The statement reading the rows of `keys` (`{"column": "text"}`) of a
/// table: as [`select_sql`], matched on the typed key (so an index on it
/// serves).
pub fn keyed_select_sql(
    table: &TableName,
    columns: &[String],
    key: &[(String, String)],
    keys: &[String],
) -> String {
    let list = keys
        .iter()
        .map(|k| crate::event::quote_literal(k))
        .collect::<Vec<_>>()
        .join(", ");
    let cols = key
        .iter()
        .map(|(k, _)| quote_ident(k))
        .collect::<Vec<_>>()
        .join(", ");
    let typed = key
        .iter()
        .map(|(k, ty)| format!("(k.pk::jsonb ->> {})::{ty}", crate::event::quote_literal(k)))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "{} WHERE ({cols}) IN (SELECT {typed} FROM unnest(ARRAY[{list}]::text[]) AS k(pk))",
        select_sql(table, columns)
    )
}

/// A session on the region's database that reads values in the stream's
/// spelling (see `canonical_text_sets`).
async fn read_session(dsn: &str, region: &str) -> Result<tokio_postgres::Client, ResyncError> {
    let client = catalog::connect(dsn, region).await?;
    client
        .batch_execute(&canonical_text_sets("; "))
        .await
        .map_err(|source| ResyncError::Read {
            region: region.to_string(),
            what: "session settings".to_string(),
            source,
        })?;
    Ok(client)
}

/// The most records one resync session keeps unacknowledged (fewer when
/// `relay.capture.max_in_flight` says so): a full producer batch, and few
/// enough that a session's buffers stay small (measured: no slower than
/// 100,000 on `scripts/bench.sh`'s `resync`, at less than half the memory).
const SESSION_IN_FLIGHT: usize = 10_000;

/// Routes, encodes and sends changes, keeping at most `max_in_flight`
/// unacknowledged.
struct Sender<'a> {
    region: &'a str,
    source: Source,
    policy: &'a Policy,
    outlets: Option<&'a Outlets>,
    max_in_flight: usize,
    sent: u64,
    reports: Vec<Delivery>,
    summary: Summary,
    /// The region's DR key, when some resent table keeps DR copies.
    dr_key: Option<&'a DrKey>,
    /// Per table with DR copies: the outlets of its DR topics.
    dr_outlets: &'a HashMap<TableName, Vec<usize>>,
    /// The region of each outlet.
    outlet_regions: &'a [String],
    /// The count of records sealed under `dr_key`.
    seals: Option<SealLedger>,
    /// Where the seal count's gauge goes (this command serves no metrics:
    /// its warning goes to the log).
    metrics: crate::metrics::Metrics,
}

impl<'a> Sender<'a> {
    /// A sender of `region`'s changes to `outlets` (`None`: a dry run, which
    /// only counts), sealing nothing for DR until [`Sender::sealing`].
    fn new(
        config: &Config,
        region: &'a str,
        db: String,
        policy: &'a Policy,
        outlets: Option<&'a Outlets>,
        outlet_regions: &'a [String],
        dr_outlets: &'a HashMap<TableName, Vec<usize>>,
    ) -> Self {
        Sender {
            region,
            source: Source {
                prefix: config.prefix.clone(),
                region: region.to_string(),
                db,
            },
            policy,
            outlets,
            max_in_flight: config.capture.max_in_flight.clamp(1, SESSION_IN_FLIGHT),
            sent: 0,
            reports: Vec::new(),
            summary: Summary::default(),
            dr_key: None,
            dr_outlets,
            outlet_regions,
            seals: None,
            metrics: crate::metrics::Metrics::new(),
        }
    }

    /// Seals DR copies under `dr_key` (if any), counting the seals in the
    /// region's ledger (`dsn`: its database).
    fn sealing(mut self, dr_key: Option<&'a DrKey>, dsn: &str) -> Self {
        self.dr_key = dr_key;
        self.seals = dr_key.map(|k| SealLedger::new(dsn, self.region, k));
        self
    }

    /// Counts a row of `table` not sent to the destinations of `wanted`
    /// because a rule altered its copy here ([`Resend::own_only`]).
    fn count_partial(&mut self, table: &TableName, wanted: &[usize]) {
        for &i in wanted {
            let dest = self.policy.destinations()[i].clone();
            let counts = self
                .summary
                .counts
                .entry((table.to_string(), dest))
                .or_default();
            counts.partial += 1;
        }
    }

    /// Sends `change` to the destinations of `wanted` (indices into the
    /// policy's destinations) that the policy lets it reach.
    async fn send(&mut self, change: &Change, wanted: &[usize]) -> Result<(), ResyncError> {
        let hlc = change.hlc.to_string();
        for &i in wanted {
            let dest = &self.policy.destinations()[i];
            let counts = self
                .summary
                .counts
                .entry((change.schema.table.to_string(), dest.clone()))
                .or_default();
            let routed = match self.policy.route(change, i) {
                Verdict::Publish(r) => r,
                Verdict::Drop(_) => {
                    counts.withheld += 1;
                    continue;
                }
            };
            match change.op {
                Op::Insert => counts.rows += 1,
                _ => counts.tombstones += 1,
            }
            let Some(outlets) = self.outlets else {
                continue;
            };
            let out = Outgoing::new(self.region, &self.source, change, &routed, &hlc);
            while self.unacked() >= self.max_in_flight as u64 {
                self.wait().await?;
            }
            loop {
                match out.queue(outlets, i, self.sent) {
                    Ok(()) => break,
                    Err(SendError::QueueFull) => self.wait().await?,
                    Err(e) => return Err(ResyncError::Kafka(e.to_string())),
                }
            }
            self.sent += 1;
        }
        self.send_dr(change, &hlc).await
    }

    /// Seals `change` for the DR regions of its table, if any, as the
    /// capture side does (a dry run only counts).
    async fn send_dr(&mut self, change: &Change, hlc: &str) -> Result<(), ResyncError> {
        let Some(dr_outlets) = self.dr_outlets.get(&change.schema.table) else {
            return Ok(());
        };
        if change.op == Op::Truncate {
            return Ok(());
        }
        for &dest in dr_outlets {
            let counts = self
                .summary
                .counts
                .entry((
                    change.schema.table.to_string(),
                    format!("{} (DR)", self.outlet_regions[dest]),
                ))
                .or_default();
            match change.op {
                Op::Insert => counts.rows += 1,
                _ => counts.tombstones += 1,
            }
        }
        let (Some(key), Some(outlets)) = (self.dr_key, self.outlets) else {
            return Ok(());
        };
        if let Some(seals) = self.seals.as_mut() {
            seals
                .count(&self.metrics)
                .await
                .map_err(|e| ResyncError::Setup(e.to_string()))?;
        }
        let sealed = seal_for_dr(key, &self.source, change).map_err(|e| {
            ResyncError::Setup(format!("sealing a DR copy of {}: {e}", change.schema.table))
        })?;
        let Some(record) = sealed else {
            return Ok(());
        };
        for &dest in dr_outlets {
            while self.unacked() >= self.max_in_flight as u64 {
                self.wait().await?;
            }
            loop {
                match queue_dr(outlets, dest, &record, self.region, hlc, self.sent) {
                    Ok(()) => break,
                    Err(SendError::QueueFull) => self.wait().await?,
                    Err(e) => return Err(ResyncError::Kafka(e.to_string())),
                }
            }
            self.sent += 1;
        }
        Ok(())
    }

    /// Collects delivery reports; the first failure ends the run.
    fn collect(&mut self) -> Result<(), ResyncError> {
        let Some(outlets) = self.outlets else {
            return Ok(());
        };
        outlets.poll(&mut self.reports);
        for d in self.reports.drain(..) {
            match d {
                // reported only where every delivery is (never here)
                Delivery::Acked(_) => {}
                Delivery::Failed { error, .. } => {
                    return Err(ResyncError::Kafka(format!(
                        "kafka did not accept a record: {error}; run resync again"
                    )))
                }
                Delivery::Fatal { error, reason } => {
                    return Err(ResyncError::Kafka(format!(
                        "kafka did not accept a record: {error}: {reason}; run resync again"
                    )))
                }
            }
        }
        Ok(())
    }

    async fn wait(&mut self) -> Result<(), ResyncError> {
        tokio::time::sleep(Duration::from_millis(5)).await;
        self.collect()
    }

    /// Records handed to Kafka and not yet acknowledged (the producers
    /// report failures only: what left their queues was delivered).
    fn unacked(&self) -> u64 {
        self.outlets.map_or(0, Outlets::in_flight)
    }

    async fn finish(&mut self) -> Result<(), ResyncError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            // a failure's report is served before the queue counts empty
            self.collect()?;
            let unacked = self.unacked();
            if unacked == 0 {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(ResyncError::Kafka(format!(
                    "{unacked} of {} records not acknowledged by Kafka within 60s; run resync again",
                    self.sent
                )));
            }
            self.wait().await?;
        }
    }
}

/// Prints a summary as a table.
pub fn render(summary: &Summary) -> String {
    let mut out = format!(
        "{:<32} {:<12} {:>12} {:>12} {:>12}\n",
        "table", "destination", "rows", "tombstones", "withheld"
    );
    for ((table, dest), c) in &summary.counts {
        out.push_str(&format!(
            "{table:<32} {dest:<12} {:>12} {:>12} {:>12}\n",
            c.rows, c.tombstones, c.withheld
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Arc<TableSchema> {
        let col = |name: &str, is_key| ColumnDesc {
            name: name.into(),
            type_oid: 0,
            is_key,
        };
        Arc::new(TableSchema {
            oid: 1,
            table: TableName::new("public", "Orders"),
            columns: vec![col("region", true), col("id", true), col("note", false)],
        })
    }

    fn tx() -> Arc<TxMeta> {
        Arc::new(TxMeta {
            xid: 0,
            commit_lsn: Lsn(1),
            commit_ts_us: 0,
        })
    }

    /// The tables of [`config`], three regions.
    const TABLES: &str = r#"
[[tables]]
name = "sessions"
class = "local"

[[tables]]
name = "products"
class = "global"

[[tables]]
name = "orders"
class = "owned"
owner = "us"
dr = ["eu"]
"#;

    fn config() -> Config {
        crate::config::test_config(&["us", "eu", "cn"], TABLES)
    }

    fn options(to: &[&str], tables: &[&str]) -> Options {
        Options {
            to: to.iter().map(|d| d.to_string()).collect(),
            tables: tables
                .iter()
                .map(|t| TableName::new("public", *t))
                .collect(),
            dry_run: false,
            jobs: 1,
        }
    }

    fn select(to: &[&str], tables: &[&str]) -> Result<(Selection, OutletLayout), String> {
        let config = config();
        let policy = Policy::compile(&config, "us").unwrap();
        let selection = Selection::of(&config, "us", &policy, &options(to, tables))
            .map_err(|e| e.to_string())?;
        let layout = OutletLayout::of(&config, "us", &policy, &selection);
        Ok((selection, layout))
    }

    #[test]
    fn a_run_sends_every_replicated_table_to_every_destination_and_dr_region() {
        let (selection, layout) = select(&[], &[]).unwrap();
        assert_eq!(
            selection.tables,
            vec![
                TableName::new("public", "products"),
                TableName::new("public", "orders")
            ]
        );
        assert_eq!(selection.wanted, vec![0, 1]);
        assert_eq!(
            selection.dr_topics,
            vec![("eu".to_string(), "pgrelay.dr.us.eu".to_string())]
        );
        // live destinations first, then the DR topics
        assert_eq!(layout.regions, ["cn", "eu", "eu"]);
        assert_eq!(
            layout.topics,
            ["pgrelay.us.cn", "pgrelay.us.eu", "pgrelay.dr.us.eu"]
        );
        assert_eq!(
            layout.dr_outlets,
            HashMap::from([(TableName::new("public", "orders"), vec![2])])
        );
    }

    #[test]
    fn to_and_table_narrow_a_run() {
        let (selection, layout) = select(&["cn"], &["products"]).unwrap();
        assert_eq!(selection.tables, vec![TableName::new("public", "products")]);
        assert_eq!(selection.wanted, vec![0]);
        assert!(selection.dr_topics.is_empty());
        assert_eq!(layout.regions, ["cn", "eu"]);
        assert!(layout.dr_outlets.is_empty());
        // a DR region alone is a destination too
        let (selection, layout) = select(&["eu"], &["orders"]).unwrap();
        assert_eq!(selection.wanted, vec![1]);
        assert_eq!(layout.dr_outlets.len(), 1);
    }

    #[test]
    fn unknown_destinations_and_tables_are_refused() {
        let e = select(&["mars"], &[]).unwrap_err();
        assert_eq!(
            e,
            "--to mars: not a destination of region us (destinations: cn, eu)"
        );
        let e = select(&[], &["sessions"]).unwrap_err();
        assert_eq!(
            e,
            "--table public.sessions: not a declared, replicated table"
        );
    }

    #[test]
    fn requests_name_each_table_once_and_known_destinations_only() {
        let config = config();
        let policy = Policy::compile(&config, "us").unwrap();
        let request = |table: &str, to: &str| Resend {
            table: TableName::new("public", table),
            to: to.into(),
            keys: vec![],
            own_only: false,
        };
        let tables = requested_tables(
            "us",
            &policy,
            &[
                request("orders", "eu"),
                request("products", "cn"),
                request("orders", "cn"),
            ],
        )
        .unwrap();
        assert_eq!(
            tables,
            vec![
                TableName::new("public", "orders"),
                TableName::new("public", "products")
            ]
        );
        let e = requested_tables("us", &policy, &[request("orders", "us")]).unwrap_err();
        assert_eq!(e.to_string(), "us: not a destination of region us");
    }

    #[test]
    fn rows_become_inserts_with_their_stamp() {
        let values = [Some("eu"), Some("7"), None, Some("12345")];
        let c = row_change(&schema(), |i| values[i], &tx());
        assert_eq!(c.op, Op::Insert);
        assert_eq!(c.hlc, Hlc::new(12345));
        assert_eq!(
            c.after.unwrap(),
            vec![
                Datum::Text("eu".into()),
                Datum::Text("7".into()),
                Datum::Null
            ]
        );
        // no stamp (written before setup added the column): 0
        let values = [Some("eu"), Some("7"), Some("x"), None];
        assert_eq!(row_change(&schema(), |i| values[i], &tx()).hlc, Hlc::ZERO);
    }

    #[test]
    fn reads_every_column_then_the_stamp() {
        assert_eq!(
            select_sql(
                &TableName::new("public", "Orders"),
                &["id".into(), "a\"b".into()]
            ),
            r#"SELECT "id", "a""b", "_pgrelay_hlc" FROM "public"."Orders""#
        );
    }

    #[test]
    fn block_ranges_cover_the_heap_once_in_at_most_jobs_parts() {
        for blocks in [0u64, 1, 2, 3, 7, 100, 1_000_003] {
            for jobs in [0usize, 1, 2, 3, 8, 64] {
                let ranges = block_ranges(blocks, jobs);
                assert!(
                    !ranges.is_empty() && ranges.len() <= jobs.max(1),
                    "{blocks} {jobs}"
                );
                assert_eq!(ranges[0].from, 0);
                assert_eq!(
                    ranges.last().unwrap().to,
                    None,
                    "the last part is open-ended"
                );
                for pair in ranges.windows(2) {
                    let to = pair[0].to.expect("only the last part is open-ended");
                    assert!(
                        pair[0].from < to,
                        "{blocks} {jobs}: an empty part {ranges:?}"
                    );
                    assert_eq!(
                        to, pair[1].from,
                        "{blocks} {jobs}: a gap or overlap {ranges:?}"
                    );
                }
                if blocks < 2 || jobs <= 1 {
                    assert_eq!(ranges, vec![Blocks::ALL]);
                } else {
                    assert_eq!(ranges.len() as u64, (jobs as u64).min(blocks));
                }
            }
        }
    }

    #[test]
    fn a_part_reads_its_blocks_by_tid_range() {
        let t = TableName::new("public", "t");
        let cols = ["id".to_string()];
        assert_eq!(
            select_part_sql(&t, &cols, Blocks::ALL),
            select_sql(&t, &cols)
        );
        assert_eq!(
            select_part_sql(
                &t,
                &cols,
                Blocks {
                    from: 5,
                    to: Some(9)
                }
            ),
            format!(
                "{} WHERE ctid >= '(5,0)'::tid AND ctid < '(9,0)'::tid",
                select_sql(&t, &cols)
            )
        );
        assert_eq!(
            select_part_sql(&t, &cols, Blocks { from: 9, to: None }),
            format!("{} WHERE ctid >= '(9,0)'::tid", select_sql(&t, &cols))
        );
    }

    #[test]
    fn tombstones_become_key_deletes_or_truncates() {
        let pk = serde_json::json!({"id": "7", "region": "eu"});
        let c = tombstone_change(
            &schema(),
            pk.as_object().unwrap(),
            None,
            Hlc::new(42),
            &tx(),
        )
        .unwrap();
        assert_eq!(c.op, Op::Delete);
        assert_eq!(c.hlc, Hlc::new(42));
        assert_eq!(
            c.before.unwrap(),
            vec![
                Datum::Text("eu".into()),
                Datum::Text("7".into()),
                Datum::Unchanged
            ]
        );
        let all =
            tombstone_change(&schema(), &serde_json::Map::new(), None, Hlc::new(9), &tx()).unwrap();
        assert_eq!(all.op, Op::Truncate);
        // a key that is not the table's (changed since): not sent
        let other = serde_json::json!({"id": "7"});
        assert!(tombstone_change(
            &schema(),
            other.as_object().unwrap(),
            None,
            Hlc::new(1),
            &tx()
        )
        .is_none());
        // a partitioned row's tombstone carries its home in the home column
        let homed = tombstone_change(
            &schema(),
            pk.as_object().unwrap(),
            Some(("note", "us")),
            Hlc::new(43),
            &tx(),
        )
        .unwrap();
        assert_eq!(
            homed.before.unwrap(),
            vec![
                Datum::Text("eu".into()),
                Datum::Text("7".into()),
                Datum::Text("us".into())
            ]
        );
    }
}
