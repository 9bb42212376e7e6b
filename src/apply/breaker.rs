//! The blast-radius breaker on the apply side (thresholds and judgement:
//! [`crate::breaker`]).
//!
//! ```text
//!  batch ──judge each record──▶ prefix before the first record past a threshold: applied
//!                              └▶ that record and all after it: held in Kafka (offsets not stored)
//!  trip: pgrelay.breakers row `frozen` + pgrelay.events row ──▶ pipeline waits, polling the row
//!  release / discard (CLI, in the destination's database) ──▶ pipeline resumes at the stored offsets
//! ```
//!
//! Each destination protects itself: a source region keeps writing and
//! publishing; what it sends waits in the pair's topic until an operator
//! decides. The frozen state lives in the destination's database, so a
//! restart keeps it. A release lets every change the source committed up
//! to the release pass uncounted (the held storm applies), then counting
//! starts again; a discard parks the storm's changes (the tripped table and
//! kind of change, committed up to `--until`) in the dead-letter topic with
//! class `breaker_discarded` — `pgrelay dlq replay` leaves them there — and
//! applies the rest. Counts live in memory: a restart of the pipeline in
//! the middle of a storm starts them again.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_postgres::Client;

use super::pipeline::Pipeline;
use crate::apply::dlq::DeadLetter;
use crate::apply::{db_message, record, ApplyError, Consumed};
use crate::breaker::{Counter, Seen, Trip, Verdict};
use crate::config::Config;
use crate::event::{Op, TableName};
use crate::metrics::catalog as metric;

/// The class of dead letters a discard parks; `dlq replay` skips them.
pub const CLASS_DISCARDED: &str = "breaker_discarded";

/// What `setup` creates for the breaker and the region's event log.
pub const SETUP_SQL: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS pgrelay.breakers (\
        source_region text PRIMARY KEY, state text NOT NULL, reason text NOT NULL, \
        table_name text NOT NULL, kind text NOT NULL, tripped_at timestamptz NOT NULL, \
        resolved_at timestamptz, pass_until timestamptz, discard_until timestamptz)",
    "CREATE TABLE IF NOT EXISTS pgrelay.events (\
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
        at timestamptz NOT NULL DEFAULT now(), region text NOT NULL, kind text NOT NULL, \
        detail jsonb NOT NULL DEFAULT '{}')",
];

const TRIP_SQL: &str = "WITH b AS (INSERT INTO pgrelay.breakers AS b \
        (source_region, state, reason, table_name, kind, tripped_at) \
        VALUES ($1, 'frozen', $2, $3, $4, now()) \
        ON CONFLICT (source_region) DO UPDATE SET state = 'frozen', reason = EXCLUDED.reason, \
        table_name = EXCLUDED.table_name, kind = EXCLUDED.kind, tripped_at = now(), \
        resolved_at = NULL WHERE b.state <> 'frozen' RETURNING 1) \
    INSERT INTO pgrelay.events (region, kind, detail) \
    SELECT $5, 'breaker_trip', jsonb_build_object('source', $1::text, 'reason', $2::text, \
        'table', $3::text, 'kind', $4::text) FROM b";

const STATE_SQL: &str = "SELECT state, reason, table_name, kind, \
    coalesce((extract(epoch FROM pass_until) * 1000)::bigint, 0), \
    coalesce((extract(epoch FROM discard_until) * 1000)::bigint, 0) \
    FROM pgrelay.breakers WHERE source_region = $1";

/// A source's breaker as stored in the destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub state: String,
    pub reason: String,
    pub table: String,
    pub kind: String,
    pub pass_until_ms: i64,
    pub discard_until_ms: i64,
}

pub async fn load(client: &Client, source: &str) -> Result<Option<Stored>, ApplyError> {
    let row = client.query_opt(STATE_SQL, &[&source]).await.map_err(|e| {
        if crate::apply::sqlstate(&e) == "42P01" {
            let message = format!(
                "reading pgrelay.breakers: {}; run pgrelay setup (it creates the breaker's table)",
                db_message(&e)
            );
            ApplyError::setup_from(message, e)
        } else {
            ApplyError::transient("reading pgrelay.breakers", e)
        }
    })?;
    Ok(row.map(|r| Stored {
        state: r.get(0),
        reason: r.get(1),
        table: r.get(2),
        kind: r.get(3),
        pass_until_ms: r.get(4),
        discard_until_ms: r.get(5),
    }))
}

/// The breaker of one source region, shared by its apply sessions.
#[derive(Default)]
pub struct Shared {
    pub counter: Mutex<Counter>,
    /// Row counts of tables here, for `max_fraction`.
    rows: Mutex<HashMap<TableName, RowCount>>,
}

/// A table's rows here, counted for `max_fraction`.
struct RowCount {
    at: Instant,
    /// The rows counted: all of them when `exact`, else a lower bound.
    rows: u64,
    exact: bool,
}

/// How long a row count is reused.
const RECOUNT: Duration = Duration::from_secs(5);

/// How long a batch with deletes or updates of a guarded table waits for
/// more records (the rest of their transaction) before it is judged.
pub const SETTLE: Duration = Duration::from_millis(250);

/// What became of a batch.
pub enum Guarded {
    Applied,
    /// The breaker holds the source: nothing from the held record on was
    /// applied; go on from the stored offsets once it is released.
    Held,
}

impl Pipeline {
    fn breaker_labels(&self) -> [(&'static str, &str); 2] {
        [
            ("region", self.region.as_str()),
            ("source", self.source.as_str()),
        ]
    }

    fn set_breaker_metric(&self, frozen: bool) {
        self.metrics.set(
            &metric::BREAKER_STATE,
            &self.breaker_labels(),
            if frozen { 1.0 } else { 0.0 },
        );
        // the pair's state gauge follows at once rather than at the next
        // periodic refresh (a release is left to that refresh: the pair
        // may be lagging then)
        if frozen {
            self.metrics.set(
                &metric::PAIR_STATE,
                &[
                    ("source", self.source.as_str()),
                    ("destination", self.region.as_str()),
                ],
                crate::status::state_code("frozen"),
            );
        }
    }

    /// Reads the stored breaker; while it is frozen, waits (polling it) for
    /// a release or a discard. Returns `false` on shutdown.
    pub(super) async fn wait_while_frozen(
        &self,
        client: &Client,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<bool, ApplyError> {
        let mut warned = false;
        loop {
            let stored = load(client, &self.source).await?;
            let Some(stored) = stored else {
                self.set_breaker_metric(false);
                return Ok(true);
            };
            if stored.state != "frozen" {
                let discard = (stored.state == "discarded").then(|| {
                    (
                        TableName::parse(&stored.table).unwrap_or_else(|_| TableName::new("", "")),
                        stored.kind.clone(),
                        stored.discard_until_ms,
                    )
                });
                self.breaker
                    .counter
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .resume(stored.pass_until_ms, discard);
                self.set_breaker_metric(false);
                if warned {
                    tracing::warn!(region = %self.region, source = %self.source, state = %stored.state, "breaker resolved: applying again");
                }
                return Ok(true);
            }
            self.breaker
                .counter
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .frozen = Some(stored.reason.clone());
            self.set_breaker_metric(true);
            // held on purpose: the pipeline is up, waiting for an operator
            self.mark_consuming();
            if !warned {
                tracing::warn!(region = %self.region, source = %self.source, reason = %stored.reason, "breaker frozen: changes from this source are held in Kafka until `pgrelay breaker release` or `discard`");
                warned = true;
            }
            tokio::select! {
                _ = shutdown.changed() => return Ok(false),
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    /// Whether `batch` holds a change a breaker rule counts (a delete,
    /// update or truncate of a table a rule covers).
    pub(super) fn settles(&self, batch: &[Consumed]) -> bool {
        let targets = self.targets();
        batch.iter().any(|c| {
            record::parse(c.value.as_deref(), &targets).is_ok_and(|inc| {
                matches!(inc.op, Op::Delete | Op::Update | Op::Truncate)
                    && crate::breaker::rule_for(
                        &self.config.breakers,
                        &self.source,
                        &inc.table.name,
                    )
                    .is_some()
            })
        })
    }

    /// Row counts of the tables whose rule has a fraction, as far as the
    /// rule needs them: `bounds` holds, per table, the most deletes and
    /// updates the window can count while this batch is judged. The table
    /// is counted (never estimated: the planner's `reltuples` lags behind a
    /// freshly filled or emptied table) up to `bound / fraction + 1` rows;
    /// a count that stops there is a lower bound, enough to know that none
    /// of those changes crosses the fraction. A count is reused for at most
    /// [`RECOUNT`] (and the rule's window), and only if it still decides.
    async fn row_counts(
        &self,
        client: &Client,
        bounds: &HashMap<TableName, u64>,
    ) -> Result<HashMap<TableName, u64>, ApplyError> {
        let mut out = HashMap::new();
        for (t, &bound) in bounds {
            let Some(rule) = crate::breaker::rule_for(&self.config.breakers, &self.source, t)
            else {
                continue;
            };
            let Some(fraction) = rule.max_fraction else {
                continue;
            };
            if bound < rule.min_rows {
                // the fraction is not checked below min_rows
                continue;
            }
            let enough = (bound as f64 / fraction).floor() as u64 + 1;
            let max_age = rule.window.min(RECOUNT);
            let cached = self
                .breaker
                .rows
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(t)
                .filter(|c| c.at.elapsed() < max_age && (c.exact || c.rows >= enough))
                .map(|c| c.rows);
            let n = match cached {
                Some(n) => n,
                None => {
                    let sql = format!(
                        "SELECT count(*) FROM (SELECT 1 FROM {} LIMIT $1) s",
                        t.quoted()
                    );
                    let limit = i64::try_from(enough).unwrap_or(i64::MAX);
                    let n: i64 = client
                        .query_one(sql.as_str(), &[&limit])
                        .await
                        .map_err(|e| ApplyError::transient(format!("counting rows of {t}"), e))?
                        .get(0);
                    let n = n.max(0) as u64;
                    self.breaker
                        .rows
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(
                            t.clone(),
                            RowCount {
                                at: Instant::now(),
                                rows: n,
                                exact: n < enough,
                            },
                        );
                    n
                }
            };
            out.insert(t.clone(), n);
        }
        Ok(out)
    }

    /// Applies what the breaker lets through of `batch`: parks what a
    /// discard covers, stops at the first record past a threshold (the
    /// trip stored first, the tripping transaction held whole).
    pub(super) async fn apply_guarded(
        &self,
        client: &mut Client,
        batch: &[Consumed],
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Guarded, ApplyError> {
        let seen = self.seen(batch);
        let verdicts = self.judge(client, &seen).await?;
        let trip = match verdicts.last() {
            Some(Verdict::Hold(t)) => Some(t.clone()),
            _ => None,
        };
        if let Some(Some(trip)) = &trip {
            // stored before anything of the batch is applied: a crash in
            // between holds more, never less
            self.store_trip(client, trip).await?;
        }
        let cut = held_from(&seen, &verdicts, batch.len());
        let SetAside {
            keep,
            parked,
            extra,
        } = set_aside(&batch[..cut], &verdicts);
        if !parked.is_empty() {
            // in Kafka before the offsets that skip them are stored
            self.dlq
                .send_quietly(&parked)
                .await
                .map_err(|e| ApplyError::transient("", Box::new(e)))?;
            tracing::info!(region = %self.region, source = %self.source, parked = parked.len(), "discarded changes parked in the dead-letter topic");
            self.metrics.add(
                &metric::BREAKER_DISCARDED,
                &self.breaker_labels(),
                parked.len() as u64,
            );
        }
        if !keep.is_empty() || !parked.is_empty() {
            self.apply_with_retry(client, &keep, &extra, shutdown)
                .await?;
        }
        match trip {
            None => Ok(Guarded::Applied),
            Some(_) => Ok(Guarded::Held),
        }
    }

    /// What the breaker judges of each record: (table, op, commit time,
    /// commit LSN). Records that do not parse are left to `apply_batch`,
    /// which parks them. A resync's records are not judged: an operator
    /// sent them (after a lost slot they resend every tombstone, deletes
    /// applied long ago).
    fn seen(&self, batch: &[Consumed]) -> Vec<Option<SeenRecord>> {
        let targets = self.targets();
        batch
            .iter()
            .map(|c| {
                record::parse(c.value.as_deref(), &targets)
                    .ok()
                    .filter(|inc| !inc.resent)
                    .map(|inc| {
                        (
                            inc.table.name.clone(),
                            inc.op,
                            inc.commit_ts_ms,
                            inc.commit_lsn.to_string(),
                        )
                    })
            })
            .collect()
    }

    /// The breaker's verdict on each record, up to and including the first
    /// that holds. The row counts a fraction threshold needs are read only
    /// for tables whose window could reach it: the window's deletes and
    /// updates so far plus the batch's, and a batch of each other session
    /// of this source (they share the window).
    async fn judge(
        &self,
        client: &Client,
        seen: &[Option<SeenRecord>],
    ) -> Result<Vec<Verdict>, ApplyError> {
        let others = (self.groups.saturating_sub(1) * self.config.apply.batch_max_records) as u64;
        let mut bounds: HashMap<TableName, u64> = HashMap::new();
        for s in seen
            .iter()
            .flatten()
            .filter(|s| matches!(s.1, Op::Delete | Op::Update))
        {
            *bounds.entry(s.0.clone()).or_default() += 1;
        }
        {
            let counter = self
                .breaker
                .counter
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            for (t, n) in bounds.iter_mut() {
                *n += counter.changed(t) + others;
            }
        }
        let rows = self.row_counts(client, &bounds).await?;
        let mut verdicts = Vec::with_capacity(seen.len());
        let mut counter = self
            .breaker
            .counter
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for s in seen {
            let v = match s {
                None => Verdict::Pass,
                Some((table, op, ts, _)) => counter.judge(
                    &self.config.breakers,
                    &self.source,
                    &Seen {
                        table,
                        op: *op,
                        commit_ts_ms: *ts,
                    },
                    &mut |t| rows.get(t).copied(),
                ),
            };
            let stop = matches!(v, Verdict::Hold(_));
            verdicts.push(v);
            if stop {
                break;
            }
        }
        Ok(verdicts)
    }

    async fn store_trip(&self, client: &Client, trip: &Trip) -> Result<(), ApplyError> {
        client
            .execute(
                TRIP_SQL,
                &[
                    &self.source,
                    &trip.reason,
                    &trip.table.to_string(),
                    &trip.kind,
                    &self.region,
                ],
            )
            .await
            .map_err(|e| ApplyError::transient("storing the breaker trip", e))?;
        // the source's other sessions hold from now on
        self.breaker
            .counter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .frozen = Some(trip.reason.clone());
        self.set_breaker_metric(true);
        self.metrics.add(
            &metric::BREAKER_TRIPS,
            &[
                ("region", self.region.as_str()),
                ("source", self.source.as_str()),
                ("table", &trip.table.to_string()),
                ("kind", trip.kind),
            ],
            1,
        );
        tracing::warn!(region = %self.region, source = %self.source, table = %trip.table, kind = trip.kind, reason = %trip.reason, "breaker tripped: changes from this source are held in Kafka until `pgrelay breaker release` or `discard`");
        Ok(())
    }
}

/// What `pgrelay breaker release|discard` did.
#[derive(Debug, Clone)]
pub struct Resolution {
    pub reason: String,
    pub table: String,
    pub kind: String,
    pub tripped_at: String,
    pub until: String,
}

/// `pgrelay breaker release` (`discard_until: None`) or `discard`: resolves
/// the frozen breaker of `source` in `region`'s database and records it in
/// the region's events. The sidecar picks it up within a second.
pub async fn resolve(
    config: &Config,
    region: &str,
    source: &str,
    discard_until: Option<&str>,
) -> Result<Resolution, ApplyError> {
    let r = config.region(region)?;
    if region == source || !config.regions.contains_key(source) {
        return Err(ApplyError::setup(format!(
            "--source {source}: name another declared region whose changes {region} applies (declared: {})",
            config.declared_regions()
        )));
    }
    let mut client = crate::source::catalog::connect(&r.dsn, region)
        .await
        .map_err(ApplyError::unreachable)?;
    let tx = client
        .transaction()
        .await
        .map_err(|e| ApplyError::transient(format!("region {region}"), e))?;
    let (state, kind) = match discard_until {
        None => ("released", "breaker_release"),
        Some(_) => ("discarded", "breaker_discard"),
    };
    let until = discard_until.unwrap_or("now");
    let row = tx
        .query_opt(
            "UPDATE pgrelay.breakers SET state = $2, resolved_at = now(), \
                pass_until = $3::text::timestamptz, \
                discard_until = CASE WHEN $2 = 'discarded' THEN $3::text::timestamptz END \
             WHERE source_region = $1 AND state = 'frozen' \
             RETURNING reason, table_name, kind, tripped_at::text, \
                coalesce(discard_until, pass_until)::text",
            &[&source, &state, &until],
        )
        .await
        .map_err(|e| {
            let msg = db_message(&e);
            let message = if crate::apply::sqlstate(&e).starts_with("22") {
                format!(
                    "--until {until:?}: not a time PostgreSQL reads ({msg}); e.g. '2026-12-04 16:40:00+00' or now"
                )
            } else {
                format!("region {region}: pgrelay.breakers: {msg}; run pgrelay setup")
            };
            ApplyError::setup_from(message, e)
        })?;
    let Some(row) = row else {
        return Err(ApplyError::setup(format!(
            "no breaker holds the changes from {source} in {region} (pgrelay status shows frozen pairs)"
        )));
    };
    let out = Resolution {
        reason: row.get(0),
        table: row.get(1),
        kind: row.get(2),
        tripped_at: row.get(3),
        until: row.get(4),
    };
    tx.execute(
        "INSERT INTO pgrelay.events (region, kind, detail) VALUES ($1, $2, \
         jsonb_build_object('source', $3::text, 'reason', $4::text, 'table', $5::text, \
         'kind', $6::text, 'until', $7::text))",
        &[
            &region,
            &kind,
            &source,
            &out.reason,
            &out.table,
            &out.kind,
            &out.until,
        ],
    )
    .await
    .map_err(|e| {
        let message = format!("recording the event: {}", db_message(&e));
        ApplyError::setup_from(message, e)
    })?;
    tx.commit()
        .await
        .map_err(|e| ApplyError::transient(format!("region {region}"), e))?;
    Ok(out)
}

/// (table, op, commit time, commit LSN) of a record the breaker judges.
type SeenRecord = (TableName, Op, i64, String);

/// Where the batch stops: at the first record of the source transaction
/// whose record tripped the breaker (held whole, as far as this batch
/// holds it); the whole batch when nothing holds.
fn held_from(seen: &[Option<SeenRecord>], verdicts: &[Verdict], len: usize) -> usize {
    match verdicts.len().checked_sub(1) {
        Some(last) if matches!(verdicts[last], Verdict::Hold(_)) => {
            let lsn = seen[last].as_ref().map(|s| &s.3);
            seen[..last]
                .iter()
                .position(|s| lsn.is_some() && s.as_ref().map(|s| &s.3) == lsn)
                .unwrap_or(last)
        }
        _ => len,
    }
}

/// Splits the records before the cut: those a discard covers become dead
/// letters (class `breaker_discarded`) with the offsets past them, the
/// rest are kept to apply.
fn set_aside(records: &[Consumed], verdicts: &[Verdict]) -> SetAside {
    let mut keep = Vec::with_capacity(records.len());
    let mut parked = Vec::new();
    let mut extra: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for (c, v) in records.iter().zip(verdicts) {
        if *v == Verdict::Discard {
            parked.push(DeadLetter {
                class: CLASS_DISCARDED.to_string(),
                message: "discarded by pgrelay breaker discard: part of the storm that tripped the breaker"
                    .to_string(),
                sqlstate: String::new(),
                attempts: 0,
                replay_run: None,
                key: c.key.clone(),
                value: c.value.clone(),
                topic: c.topic.clone(),
                partition: c.partition,
                offset: c.offset,
            });
            let e = extra.entry((c.topic.clone(), c.partition)).or_insert(0);
            *e = (*e).max(c.offset + 1);
        } else {
            keep.push(c.clone());
        }
    }
    let extra = extra.into_iter().map(|((t, p), o)| (t, p, o)).collect();
    SetAside {
        keep,
        parked,
        extra,
    }
}

/// The records before the cut, split by [`set_aside`].
struct SetAside {
    keep: Vec<Consumed>,
    parked: Vec<DeadLetter>,
    /// (topic, partition, next offset) past the parked ones.
    extra: Vec<(String, i32, i64)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(offset: i64) -> Consumed {
        Consumed {
            topic: "pgrelay.us.eu".into(),
            partition: (offset % 2) as i32,
            offset,
            key: Some(format!("k{offset}").into_bytes()),
            value: Some(b"{}".to_vec()),
        }
    }

    fn at(lsn: &str) -> Option<SeenRecord> {
        Some((
            TableName::new("public", "t"),
            Op::Delete,
            1,
            lsn.to_string(),
        ))
    }

    #[test]
    fn the_tripping_transaction_is_held_whole() {
        let seen = vec![at("0/1"), at("0/2"), None, at("0/2"), at("0/2")];
        // nothing holds: the whole batch goes on
        let pass = vec![Verdict::Pass; 5];
        assert_eq!(held_from(&seen, &pass, 5), 5);
        // the fourth record trips: its transaction (0/2) began at the second
        let trip = vec![
            Verdict::Pass,
            Verdict::Pass,
            Verdict::Pass,
            Verdict::Hold(None),
        ];
        assert_eq!(held_from(&seen, &trip, 5), 1);
        // a record the breaker could not read trips nothing before it
        let seen = vec![at("0/1"), None];
        assert_eq!(
            held_from(&seen, &[Verdict::Pass, Verdict::Hold(None)], 2),
            1
        );
        assert_eq!(held_from(&seen, &[Verdict::Hold(None)], 2), 0);
    }

    #[test]
    fn discarded_records_become_letters_with_the_offsets_past_them() {
        let records: Vec<Consumed> = (10..15).map(record).collect();
        let verdicts = [
            Verdict::Pass,
            Verdict::Discard,
            Verdict::Discard,
            Verdict::Pass,
            Verdict::Discard,
        ];
        let SetAside {
            keep,
            parked,
            extra,
        } = set_aside(&records, &verdicts);
        assert_eq!(
            keep.iter().map(|c| c.offset).collect::<Vec<_>>(),
            vec![10, 13]
        );
        assert_eq!(
            parked.iter().map(|d| d.offset).collect::<Vec<_>>(),
            vec![11, 12, 14]
        );
        assert!(parked.iter().all(|d| d.class == CLASS_DISCARDED
            && d.attempts == 0
            && d.key.is_some()
            && d.value.is_some()));
        // per partition: past the last discarded record
        assert_eq!(
            extra,
            vec![
                ("pgrelay.us.eu".to_string(), 0, 15),
                ("pgrelay.us.eu".to_string(), 1, 12)
            ]
        );
    }
}
