//! One batch in one transaction: parse, plan, execute, store offsets, park
//! what fails definitely.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::SinkExt as _;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::conflicts::ConflictLog;
use crate::hlc::Hlc;

use super::dlq::{DeadLetter, DlqProducer};
use super::error::{at_step, is_transient_db, retryable, BatchError};
use super::record::{Incoming, Targets};
use super::sql;
use super::{horizon, record, Consumed};

/// What applying one batch did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub won: u64,
    pub lost: u64,
    pub dead: Vec<DeadLetter>,
    /// Per table: changes that lost to a newer version (the conflict log's
    /// rule: duplicates and a region's own later writes do not count).
    pub conflicts: BTreeMap<String, u64>,
    /// Changes of upsert statements that wrote rows, by path (see
    /// `UpsertPath`): `fast`, all inserted by a plain insert with no
    /// tombstone as new as any of them; `upserted`, through the
    /// conditional upsert with no such tombstone; `checked`, looked up
    /// again for a tombstone as new as one of them.
    pub fast: u64,
    pub upserted: u64,
    pub checked: u64,
}

impl Outcome {
    fn count_conflicts(&mut self, table: &str, n: u64) {
        if n > 0 {
            *self.conflicts.entry(table.to_string()).or_insert(0) += n;
        }
    }

    fn count_path(&mut self, done: &Executed) {
        match done.path {
            Some(UpsertPath::Fast) => self.fast += done.changes,
            Some(UpsertPath::Upsert) => self.upserted += done.changes,
            Some(UpsertPath::Checked) => self.checked += done.changes,
            None => {}
        }
    }
}

/// How an upsert statement wrote its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpsertPath {
    /// Every change was an insert of a key the target lacked, written by a
    /// plain insert (`Stage::insert`), and the table's newest tombstone is
    /// older than every change: nothing to look up again.
    Fast,
    /// Some rows needed the conditional upsert (their key was there, a
    /// tombstone may have held them back, or the changes were updates);
    /// no tombstone is as new as any of them.
    Upsert,
    /// A tombstone of the table is as new as one of the rows: the rows
    /// were looked up again (`Stage::recheck`).
    Checked,
}

/// What running one planned statement did.
#[derive(Debug, Clone, Copy)]
struct Executed {
    /// Rows it wrote.
    written: u64,
    /// Of its changes, how many lost.
    lost: u64,
    /// How many changes it applied (its members).
    changes: u64,
    /// An upsert that wrote rows: how they were checked.
    path: Option<UpsertPath>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Runs one planned statement and records its losers in the conflict log
/// (see [`crate::conflicts::losers_sql`]): how many rows it wrote, and how many of
/// its changes lost. `savepoint` was set just before (see [`write`]).
async fn execute(
    tx: &tokio_postgres::Transaction<'_>,
    s: &sql::Statement,
    savepoint: &str,
    staged: &mut HashSet<String>,
    log: Option<&ConflictLog>,
) -> Result<Executed, tokio_postgres::Error> {
    let (written, path) = write(tx, s, savepoint, staged).await?;
    let mut done = Executed {
        written,
        lost: 0,
        changes: s.members.len() as u64,
        path,
    };
    // every change written: none lost (the common case costs nothing)
    let (Some(log), Some(conflicts)) = (log, &s.conflicts) else {
        return Ok(done);
    };
    if written >= s.members.len() as u64 {
        return Ok(done);
    }
    let row = if s.stage.is_some() {
        tx.query_one(conflicts.as_str(), &[&log.sample, &log.regions])
            .await?
    } else {
        tx.query_one(conflicts.as_str(), &[&log.sample, &log.regions, &s.rows])
            .await?
    };
    done.lost = row.get::<_, i64>(0).max(0) as u64;
    Ok(done)
}

/// Why a change's stamp cannot be its source's: a live change stamped with
/// another region's id (see [`BatchOptions::stamp_region`]).
fn foreign_stamp(
    inc: &Incoming<'_>,
    stamp_region: Option<(&str, u8)>,
) -> Option<record::Rejection> {
    let (source, source_id) = stamp_region?;
    let claimed = inc.hlc.region_id();
    if inc.resent || claimed == source_id {
        return None;
    }
    Some(record::Rejection::ForeignStamp {
        stamp: inc.hlc,
        claimed,
        region: source.to_string(),
        source_id,
    })
}

/// Records the changes of `dead` (those that claim a commit LSN) in
/// `pgrelay.parked`; with [`ParkedPositions::RecordAndClear`], forgets the
/// records of `batch` that were applied.
async fn store_parked(
    tx: &tokio_postgres::Transaction<'_>,
    batch: &[Consumed],
    dead: &[DeadLetter],
    mode: ParkedPositions,
) -> Result<(), BatchError> {
    let parked: Vec<serde_json::Value> = dead
        .iter()
        .filter(|d| record::may_be_genuine(&d.class))
        .filter_map(|d| {
            let lsn = record::commit_lsn(d.value.as_deref()?)?;
            Some(serde_json::json!({
                "topic": d.topic, "kafka_partition": d.partition, "kafka_offset": d.offset,
                "commit_lsn": lsn.to_string(), "class": d.class,
            }))
        })
        .collect();
    if !parked.is_empty() {
        tx.execute(
            sql::PARKED_SQL,
            &[&serde_json::Value::Array(parked).to_string()],
        )
        .await
        .map_err(at_step("recording parked changes in pgrelay.parked"))?;
    }
    if mode != ParkedPositions::RecordAndClear {
        return Ok(());
    }
    let applied: Vec<serde_json::Value> = batch
        .iter()
        .filter(|c| {
            !dead
                .iter()
                .any(|d| d.topic == c.topic && d.partition == c.partition && d.offset == c.offset)
        })
        .map(|c| {
            serde_json::json!({
                "topic": c.topic, "kafka_partition": c.partition, "kafka_offset": c.offset,
            })
        })
        .collect();
    if !applied.is_empty() {
        tx.execute(
            sql::UNPARKED_SQL,
            &[&serde_json::Value::Array(applied).to_string()],
        )
        .await
        .map_err(at_step("clearing replayed changes from pgrelay.parked"))?;
    }
    Ok(())
}

/// Copies an upsert's rows into its staging table.
async fn stage_rows(
    tx: &tokio_postgres::Transaction<'_>,
    s: &sql::Statement,
    stage: &sql::Stage,
    staged: &mut HashSet<String>,
) -> Result<(), tokio_postgres::Error> {
    tx.batch_execute(&stage.create).await?;
    if !staged.insert(stage.name.clone()) {
        tx.batch_execute(&stage.clear).await?;
    }
    let sink = tx.copy_in(stage.copy.as_str()).await?;
    let mut sink = std::pin::pin!(sink);
    sink.send(bytes::Bytes::copy_from_slice(s.rows.as_bytes()))
        .await?;
    sink.as_mut().finish().await.map(|_| ())
}

/// Runs one planned statement; an upsert first copies its rows into its
/// staging table. Returns the rows written and, for an upsert that wrote
/// some, how. `savepoint` was set just before: the fast path of inserts
/// returns there when a row of one of its keys committed meanwhile.
async fn write(
    tx: &tokio_postgres::Transaction<'_>,
    s: &sql::Statement,
    savepoint: &str,
    staged: &mut HashSet<String>,
) -> Result<(u64, Option<UpsertPath>), tokio_postgres::Error> {
    let Some(stage) = &s.stage else {
        let written = if s.rows.is_empty() {
            tx.execute(s.sql.as_str(), &[]).await?
        } else {
            tx.execute(s.sql.as_str(), &[&s.rows]).await?
        };
        return Ok((written, None));
    };
    stage_rows(tx, s, stage, staged).await?;
    // changes that were inserts at their source: first the rows the target
    // lacks, as plain inserts; the upsert does the rest (a row the insert
    // wrote is there at the same stamp: the upsert leaves it alone). A row
    // of one of the keys that committed meanwhile fails the insert (a
    // unique violation): back to the savepoint, staged again, and the
    // upsert does it all
    let mut inserted = 0;
    if let Some(insert) = &stage.insert {
        match tx.execute(insert.as_str(), &[]).await {
            Ok(n) => inserted = n,
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                tx.batch_execute(&format!("ROLLBACK TO SAVEPOINT {savepoint}"))
                    .await?;
                stage_rows(tx, s, stage, staged).await?;
            }
            Err(e) => return Err(e),
        }
    }
    let all_inserted = inserted == s.members.len() as u64;
    let upserted = if all_inserted {
        0
    } else {
        tx.execute(s.sql.as_str(), &[]).await?
    };
    let written = inserted + upserted;
    if written == 0 {
        return Ok((0, None));
    }
    // a local delete that committed while the upsert waited for its row
    // lock left a tombstone the upsert's snapshot could not see: take back
    // what it brought back (a new snapshot sees that tombstone now). Only a
    // tombstone at or above one of the rows' stamps can: the table's newest,
    // read now, says whether there is one (the fast path: there is none)
    let newest: i64 = tx
        .query_one(stage.newest_tombstone.as_str(), &[])
        .await?
        .get(0);
    if !sql::needs_recheck(newest, s.oldest) {
        let path = if all_inserted {
            UpsertPath::Fast
        } else {
            UpsertPath::Upsert
        };
        return Ok((written, Some(path)));
    }
    let taken_back = tx.execute(stage.recheck.as_str(), &[]).await?;
    Ok((
        written.saturating_sub(taken_back),
        Some(UpsertPath::Checked),
    ))
}

/// What a batch does with `pgrelay.parked`, the changes parked instead of
/// applied, which `pgrelay.wait_for` does not answer past.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParkedPositions {
    /// Records the changes it parks (the apply pipelines).
    Record,
    /// Records those it parks again and forgets those it applies (`dlq
    /// replay`: the records carry their original positions).
    RecordAndClear,
    /// Leaves the table alone (`dr restore`: no pair's progress).
    Untracked,
}

/// How to apply a batch.
pub struct BatchOptions<'a> {
    /// How many times its records were tried before this batch (0; a
    /// parked record being replayed: its attempts so far). Dead letters
    /// carry this plus the tries of this batch.
    pub attempt: u32,
    /// Further progress to store in the same transaction (replay).
    pub extra_offsets: &'a [(String, i32, i64)],
    /// `false`: roll back at the end and send nothing (dry run).
    pub commit: bool,
    /// Attempts on a record with a definite error before it is parked.
    pub max_tries: u32,
    /// A change stamped more than this far ahead of the local clock holds
    /// the batch back ([`BatchError::Ahead`]) until the clock catches up.
    pub max_skew: Duration,
    /// A change stamped more than this far ahead is dead-lettered.
    pub max_ahead: Duration,
    /// The source region's name and id, which every live change's stamp
    /// must carry (its low bits, [`hlc::region_id`]): a change is stamped
    /// where it is written. One claiming another region is dead-lettered.
    /// Records `resync` sent are exempt (each carries its row's own stamp,
    /// whichever region made it). `None`: any region (DR copies, which
    /// any region may have written, and letters of unknown topics).
    pub stamp_region: Option<(&'a str, u8)>,
    /// `relay.apply.tombstone_horizon`: only changes older than about this
    /// can be below the horizon, so only then is it read.
    pub tombstone_horizon: Duration,
    /// `targets` were just read from the target: a record that does not fit
    /// them may be dead-lettered. `false`: the batch is given up instead
    /// ([`BatchError::Recheck`]), so that a table changed since it was last
    /// read is never the reason for a dead letter.
    pub targets_checked: bool,
    /// Where losing changes are recorded; `None`: nowhere.
    pub conflict_log: Option<&'a ConflictLog>,
    /// Whether parked changes are recorded in `pgrelay.parked`.
    pub parked: ParkedPositions,
}

/// Applies one batch in one transaction: admits its records
/// ([`admit`]), locks their key buckets, sets aside what is below its
/// table's tombstone horizon ([`beyond_horizon`]), runs the planned
/// statements ([`run_statements`]), stores offsets, watermark and clock
/// ([`store_progress`]), then sends the dead letters and commits. Returns
/// `Err` for transient failures (the caller retries the whole batch).
pub async fn apply_batch(
    client: &mut Client,
    source: &str,
    session_no: Option<usize>,
    targets: &Targets,
    batch: &[Consumed],
    dlq: &DlqProducer,
    opts: BatchOptions<'_>,
) -> Result<Outcome, BatchError> {
    let mut outcome = Outcome::default();
    let now = now_ms();
    let mut admitted = admit(batch, targets, source, now, &opts, &mut outcome)?;
    if admitted.furthest > opts.max_skew.as_millis() as i64 {
        // applying it would drag this region's clock ahead of the others':
        // wait until the local clock has come within max_clock_skew of it
        return Err(BatchError::Ahead {
            wait: Duration::from_millis(
                (admitted.furthest - opts.max_skew.as_millis() as i64) as u64,
            ),
        });
    }
    let buckets = sql::key_buckets(&admitted.changes);
    let tx = client.transaction().await.map_err(at_step("begin"))?;
    // Sessions applying changes of the same rows (other source regions,
    // other partition groups) take turns: each first locks the key buckets
    // of its batch, in ascending order. Without this, an upsert could
    // check for a tombstone, miss the one a concurrent delete is writing,
    // and bring back a row the newer delete removed. READ COMMITTED: the
    // statements after the lock see what the previous holder committed.
    if !buckets.is_empty() {
        tx.execute(sql::LOCK_BUCKETS_SQL, &[&sql::buckets_param(&buckets)])
            .await
            .map_err(at_step("locking key buckets"))?;
    }
    beyond_horizon(&tx, batch, &mut admitted, now, &opts, &mut outcome).await?;
    sql::fill_from_earlier(&mut admitted.changes);
    let parked = run_statements(&tx, batch, &admitted, &opts, &mut outcome).await?;
    store_progress(
        &tx, source, session_no, batch, &admitted, &parked, &opts, &outcome,
    )
    .await?;
    if !opts.commit {
        tx.rollback().await.map_err(at_step("rollback"))?;
        return Ok(outcome);
    }
    // dead letters must be in Kafka before the offsets that skip them commit
    if !outcome.dead.is_empty() {
        dlq.send_all(&outcome.dead)
            .await
            .map_err(|e| BatchError::DeadLetter(Box::new(e)))?;
    }
    tx.commit().await.map_err(at_step("commit"))?;
    Ok(outcome)
}

/// The changes of a batch that may be applied, with where each came from.
struct Admitted<'a> {
    changes: Vec<Incoming<'a>>,
    /// Per change: its record's index in the batch.
    positions: Vec<usize>,
    /// Per topic and partition: every change committed before this LSN is
    /// in this batch or before it, applied or parked (`pgrelay.parked`,
    /// which `pgrelay.wait_for` reads too).
    source_lsn: HashMap<(&'a str, i32), crate::event::Lsn>,
    /// How far (ms) the furthest change within the hard limit is ahead of
    /// the local clock.
    furthest: i64,
}

/// Parses each record and admits it, or dead-letters it: stamped too far
/// ahead (`max_stamp_ahead`), stamped by a region other than the source
/// ([`foreign_stamp`]), not admitted by the table's residency rule, or not
/// a change these targets can take. No IO.
fn admit<'a>(
    batch: &'a [Consumed],
    targets: &'a Targets,
    source: &str,
    now: u64,
    opts: &BatchOptions<'_>,
    outcome: &mut Outcome,
) -> Result<Admitted<'a>, BatchError> {
    let attempt = opts.attempt;
    let limit = opts.max_ahead.as_millis() as i64;
    let mut admitted = Admitted {
        changes: Vec::with_capacity(batch.len()),
        positions: Vec::with_capacity(batch.len()),
        source_lsn: HashMap::new(),
        furthest: i64::MIN,
    };
    for (i, c) in batch.iter().enumerate() {
        let mut reached = |lsn: crate::event::Lsn| {
            let e = admitted
                .source_lsn
                .entry((c.topic.as_str(), c.partition))
                .or_default();
            *e = (*e).max(lsn);
        };
        if let Some(lsn) = c
            .value
            .as_deref()
            .and_then(crate::publish::envelope::progress_lsn)
        {
            reached(lsn);
            continue;
        }
        match record::parse(c.value.as_deref(), targets) {
            Ok(inc) => {
                if let Ok(lsn) = inc.commit_lsn.parse() {
                    reached(lsn);
                }
                let ahead = inc.hlc.ahead_ms(now);
                if ahead > limit {
                    // never applied, so the clock never follows it
                    let why = record::Rejection::StampAhead {
                        stamp: inc.hlc,
                        ahead_ms: ahead,
                        limit_ms: limit as u64,
                    };
                    outcome
                        .dead
                        .push(DeadLetter::rejected(c, &why, attempt + 1));
                    continue;
                }
                if let Some(why) = foreign_stamp(&inc, opts.stamp_region) {
                    outcome
                        .dead
                        .push(DeadLetter::rejected(c, &why, attempt + 1));
                    continue;
                }
                if let Err(why) = inc.table.admit.check(source, &inc) {
                    let why = record::Rejection::NotAdmitted(why);
                    outcome
                        .dead
                        .push(DeadLetter::rejected(c, &why, attempt + 1));
                    continue;
                }
                admitted.furthest = admitted.furthest.max(ahead);
                admitted.changes.push(inc);
                admitted.positions.push(i);
            }
            Err(rej @ record::Rejection::UnknownColumn { .. }) if !opts.targets_checked => {
                let record::Rejection::UnknownColumn { table, column } = rej else {
                    unreachable!()
                };
                return Err(BatchError::Recheck {
                    unknown_column: Some(format!("{table}.{column}")),
                });
            }
            Err(rej) => outcome
                .dead
                .push(DeadLetter::rejected(c, &rej, attempt + 1)),
        }
    }
    Ok(admitted)
}

/// Changes below their table's tombstone horizon apply only to rows that
/// exist: the others are dead-lettered and leave `admitted`. The horizon
/// never passes `tombstone_horizon` ago (`horizon::cutoff`), and half of it
/// again covers the clocks of other hosts that purge, so only a batch with
/// a change older than that reads the horizons at all.
async fn beyond_horizon(
    tx: &tokio_postgres::Transaction<'_>,
    batch: &[Consumed],
    admitted: &mut Admitted<'_>,
    now: u64,
    opts: &BatchOptions<'_>,
    outcome: &mut Outcome,
) -> Result<(), BatchError> {
    let recent = now.saturating_sub((opts.tombstone_horizon / 2).as_millis() as u64);
    if !admitted.changes.iter().any(|c| c.hlc.wall_ms() < recent) {
        return Ok(());
    }
    let horizons: HashMap<String, Hlc> = tx
        .query(horizon::HORIZONS_SQL, &[])
        .await
        .map_err(at_step("reading the tombstone horizons"))?
        .iter()
        .map(|r| (r.get::<_, String>(0), Hlc::from_sql(r.get::<_, i64>(1))))
        .collect();
    let mut i = 0;
    while i < admitted.changes.len() {
        let c = &admitted.changes[i];
        let horizon = horizons
            .get(&c.table.name.to_string())
            .copied()
            .unwrap_or(Hlc::ZERO);
        if !horizon::below(c, horizon) {
            i += 1;
            continue;
        }
        let record = &batch[admitted.positions[i]];
        let keys: Vec<Option<&str>> = c.key.iter().map(|k| k.as_deref()).collect();
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = keys
            .iter()
            .map(|k| k as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        tx.execute("SAVEPOINT horizon", &[])
            .await
            .map_err(at_step("savepoint"))?;
        let dead = match tx
            .query_one(horizon::exists_sql(c.table).as_str(), &params)
            .await
        {
            Ok(row) if row.get::<_, bool>(0) => None,
            Ok(_) => Some(DeadLetter::rejected(
                record,
                &record::Rejection::BeyondHorizon {
                    stamp: c.hlc,
                    horizon,
                },
                opts.attempt + 1,
            )),
            Err(e) if is_transient_db(&e) => return Err(retryable(e, &c.table.name.to_string())),
            // a key the table cannot hold: the record's own doing
            Err(e) => {
                tx.execute("ROLLBACK TO SAVEPOINT horizon", &[])
                    .await
                    .map_err(at_step("rollback to savepoint"))?;
                Some(DeadLetter::failed(record, &e, opts.attempt + 1))
            }
        };
        match dead {
            None => i += 1,
            Some(letter) => {
                outcome.dead.push(letter);
                admitted.changes.remove(i);
                admitted.positions.remove(i);
            }
        }
    }
    Ok(())
}

/// Runs the statements planned for the admitted changes, each under a
/// savepoint. A statement that fails for a reason of its own is rolled back
/// and its changes tried one by one ([`one_by_one`]). Returns the changes
/// dead-lettered that way (by index in `admitted.changes`): neither the
/// clock nor the watermark moves for them.
async fn run_statements(
    tx: &tokio_postgres::Transaction<'_>,
    batch: &[Consumed],
    admitted: &Admitted<'_>,
    opts: &BatchOptions<'_>,
    outcome: &mut Outcome,
) -> Result<HashSet<usize>, BatchError> {
    let statements = sql::plan(&admitted.changes);
    // staging tables filled in this transaction (one filled twice is
    // emptied first)
    let mut staged = HashSet::new();
    let mut parked: HashSet<usize> = HashSet::new();
    for s in &statements {
        tx.execute("SAVEPOINT stmt", &[])
            .await
            .map_err(at_step("savepoint"))?;
        match execute(tx, s, "stmt", &mut staged, opts.conflict_log).await {
            Ok(_) if s.kind == sql::Kind::Merge => {}
            Ok(done) => {
                outcome.count_conflicts(&s.table, done.lost);
                outcome.count_path(&done);
                outcome.won += done.written;
                outcome.lost += (s.members.len() as u64).saturating_sub(done.written)
                    + s.superseded.len() as u64;
            }
            Err(e) if is_transient_db(&e) => return Err(retryable(e, &s.table)),
            // the transaction is dropped, so rolled back
            Err(_) if !opts.targets_checked => {
                return Err(BatchError::Recheck {
                    unknown_column: None,
                })
            }
            Err(_) => {
                tx.execute("ROLLBACK TO SAVEPOINT stmt", &[])
                    .await
                    .map_err(at_step("rollback to savepoint"))?;
                outcome.lost += s.superseded.len() as u64;
                for &m in &s.members {
                    let record = &batch[admitted.positions[m]];
                    let change = &admitted.changes[m];
                    if one_by_one(tx, s, change, record, &mut staged, opts, outcome).await? {
                        parked.insert(m);
                    }
                }
            }
        }
    }
    Ok(parked)
}

/// One change of a failed statement `s`, alone: each of its statements
/// tried up to `max_tries` times, the change dead-lettered if one fails
/// every time (returns `true` then). A change's merge runs with its table's merge statement,
/// its upsert or delete with theirs: never twice.
async fn one_by_one(
    tx: &tokio_postgres::Transaction<'_>,
    s: &sql::Statement,
    change: &Incoming<'_>,
    record: &Consumed,
    staged: &mut HashSet<String>,
    opts: &BatchOptions<'_>,
    outcome: &mut Outcome,
) -> Result<bool, BatchError> {
    let single = sql::plan(std::slice::from_ref(change));
    let merging = s.kind == sql::Kind::Merge;
    let mut dead = false;
    for one in single
        .iter()
        .filter(|o| (o.kind == sql::Kind::Merge) == merging)
    {
        let mut tries = 0;
        loop {
            tries += 1;
            tx.execute("SAVEPOINT one", &[])
                .await
                .map_err(at_step("savepoint"))?;
            match execute(tx, one, "one", staged, opts.conflict_log).await {
                Ok(_) if one.kind == sql::Kind::Merge => break,
                Ok(done) => {
                    outcome.count_conflicts(&s.table, done.lost);
                    outcome.count_path(&done);
                    outcome.won += done.written;
                    outcome.lost += 1u64.saturating_sub(done.written);
                    break;
                }
                Err(e) if is_transient_db(&e) => return Err(retryable(e, &s.table)),
                Err(e) => {
                    tx.execute("ROLLBACK TO SAVEPOINT one", &[])
                        .await
                        .map_err(at_step("rollback"))?;
                    if tries >= opts.max_tries {
                        // the change alone was tried `tries` times
                        outcome
                            .dead
                            .push(DeadLetter::failed(record, &e, opts.attempt + tries));
                        dead = true;
                        break;
                    }
                }
            }
        }
    }
    Ok(dead)
}

/// In the batch's transaction: the next offset of each partition (with
/// the source position reached), the parked changes' positions, and —
/// for the changes applied — the session's watermark and the local clock
/// advanced past the newest stamp.
#[allow(clippy::too_many_arguments)]
async fn store_progress(
    tx: &tokio_postgres::Transaction<'_>,
    source: &str,
    session_no: Option<usize>,
    batch: &[Consumed],
    admitted: &Admitted<'_>,
    parked: &HashSet<usize>,
    opts: &BatchOptions<'_>,
    outcome: &Outcome,
) -> Result<(), BatchError> {
    let mut next: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for c in batch {
        let e = next.entry((c.topic.clone(), c.partition)).or_insert(0);
        *e = (*e).max(c.offset + 1);
    }
    for (topic, partition, offset) in opts.extra_offsets {
        let e = next.entry((topic.clone(), *partition)).or_insert(0);
        *e = (*e).max(*offset);
    }
    let offsets = serde_json::Value::Array(
        next.iter()
            .map(|((t, p), o)| {
                let lsn = admitted
                    .source_lsn
                    .get(&(t.as_str(), *p))
                    .map(|l| l.to_string());
                serde_json::json!({"topic": t, "kafka_partition": p, "next_offset": o, "source_lsn": lsn})
            })
            .collect(),
    )
    .to_string();
    tx.execute(sql::OFFSETS_SQL, &[&offsets])
        .await
        .map_err(at_step("storing offsets"))?;
    // the source position moved past the parked changes too: `wait_for`
    // learns of them here, in the same transaction
    if opts.parked != ParkedPositions::Untracked {
        store_parked(tx, batch, &outcome.dead, opts.parked).await?;
    }
    let applied = || {
        admitted
            .changes
            .iter()
            .enumerate()
            .filter(|(i, _)| !parked.contains(i))
            .map(|(_, c)| c)
    };
    let Some(newest) = applied().max_by_key(|c| c.hlc) else {
        return Ok(());
    };
    let commit_ts = applied().map(|c| c.commit_ts_ms).max().unwrap_or(0);
    if let Some(session_no) = session_no {
        tx.execute(
            sql::WATERMARK_SQL,
            &[
                &source,
                &session_no.to_string(),
                &newest.hlc.to_string(),
                &newest.commit_lsn.as_ref(),
                &commit_ts.to_string(),
            ],
        )
        .await
        .map_err(at_step("storing watermark"))?;
    }
    tx.execute(sql::CLOCK_SQL, &[&newest.hlc.logical().to_string()])
        .await
        .map_err(at_step("advancing the clock"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::record::test_targets as targets;
    use crate::event::Lsn;

    /// A record of `products` from us, stamped `hlc`, committed at `lsn`.
    fn record(offset: i64, hlc: Hlc, lsn: &str, after: &str) -> Consumed {
        let value = format!(
            r#"{{"before":null,"after":{after},"op":"c","ts_ms":1,"source":{{"connector":"pgrelay","version":"0","name":"p","region":"us","db":"d","schema":"public","table":"products","txId":1,"lsn":1,"ts_ms":1}},"pgrelay":{{"hlc":{hlc},"origin":"us","commit_lsn":"{lsn}","xid":1,"seq":0,"unchanged":[]}}}}"#
        );
        Consumed {
            topic: "pgrelay.us.eu".into(),
            partition: 0,
            offset,
            key: None,
            value: Some(value.into_bytes()),
        }
    }

    fn options(targets_checked: bool) -> BatchOptions<'static> {
        BatchOptions {
            attempt: 0,
            extra_offsets: &[],
            commit: true,
            max_tries: 1,
            max_skew: Duration::from_secs(2),
            max_ahead: Duration::from_secs(300),
            stamp_region: Some(("us", 1)),
            tombstone_horizon: Duration::from_secs(86_400),
            targets_checked,
            conflict_log: None,
            parked: ParkedPositions::Record,
        }
    }

    /// What `admit` lets through, what it dead-letters and why, how far the
    /// partition's source position goes, and how far ahead the batch is:
    /// no database needed.
    #[test]
    fn admission_sorts_a_batch_before_any_io() {
        let now = 1_800_000_000_000;
        let t = targets();
        let row = r#"{"id":"1","name":"a"}"#;
        let (_, progress) = crate::publish::envelope::progress("us", Lsn(0x90), 5);
        let batch = vec![
            record(0, Hlc::compose(now - 10, 0, 1), "0/10", row),
            // ten minutes ahead: past max_stamp_ahead
            record(1, Hlc::compose(now + 600_000, 0, 1), "0/20", row),
            // stamped by eu on us's topic
            record(2, Hlc::compose(now, 0, 2), "0/30", row),
            // three seconds ahead: admitted, and the batch must wait
            record(3, Hlc::compose(now + 3_000, 0, 1), "0/40", row),
            Consumed {
                value: Some(b"not json".to_vec()),
                ..record(4, Hlc::ZERO, "0/50", row)
            },
            Consumed {
                value: Some(progress),
                ..record(5, Hlc::ZERO, "0/0", row)
            },
        ];
        let mut outcome = Outcome::default();
        let admitted = admit(&batch, &t, "us", now, &options(true), &mut outcome).unwrap();
        assert_eq!(admitted.positions, vec![0, 3]);
        assert_eq!(admitted.furthest, 3_000);
        let dead: Vec<(i64, &str)> = outcome
            .dead
            .iter()
            .map(|d| (d.offset, d.class.as_str()))
            .collect();
        assert_eq!(
            dead,
            vec![(1, "stamp_ahead"), (2, "foreign_stamp"), (4, "poison")]
        );
        // the furthest source position any record of the partition reached
        assert_eq!(
            admitted.source_lsn[&("pgrelay.us.eu", 0)],
            Lsn(0x90),
            "the progress record's"
        );
        // a column the target lacks, before the targets were read again:
        // the whole batch is given up, nothing dead-lettered
        let unknown = [record(
            0,
            Hlc::compose(now, 0, 1),
            "0/10",
            r#"{"id":"1","x":"y"}"#,
        )];
        let mut outcome = Outcome::default();
        match admit(&unknown, &t, "us", now, &options(false), &mut outcome) {
            Err(BatchError::Recheck { unknown_column }) => {
                assert_eq!(unknown_column.as_deref(), Some("public.products.x"))
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("admitted a column the target lacks"),
        }
        assert!(outcome.dead.is_empty());
        // once they were: it is the record's own doing
        admit(&unknown, &t, "us", now, &options(true), &mut outcome).unwrap();
        assert_eq!(outcome.dead.len(), 1);
        assert_eq!(outcome.dead[0].class, "unknown_column");
    }
}
