//! One pipeline per source region and partition group: collect a batch,
//! apply it, retry or wait as its error says, restart after failures.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer as _;
use rdkafka::message::Message as _;
use tokio::sync::watch;
use tokio_postgres::Client;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::metrics::catalog as metric;
use crate::metrics::Metrics;
use crate::source::catalog::{self};

use super::batch::{apply_batch, BatchOptions, Outcome, ParkedPositions};
use super::consume::{assign, consumer, Consumed};
use super::dlq::DlqProducer;
use super::error::{db_message, ApplyError, ApplyErrorKind, BatchError};
use super::record::Targets;
use super::session::{session, stored_offsets};
use super::sql;
use super::target::load_targets;
use crate::conflicts::ConflictLog;

/// A batch closes when no record arrived for this long.
const IDLE_GAP: Duration = Duration::from_millis(2);

/// Runs the apply side of `region` until shutdown: one pipeline per source.
/// `consuming` turns true once every pipeline has been assigned its
/// partitions (or is held by a frozen breaker, or has none); the caller
/// lowers it.
pub async fn run(
    config: Arc<Config>,
    region: String,
    metrics: Arc<Metrics>,
    consuming: Arc<AtomicBool>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ApplyError> {
    let dsn = &config.region(&region)?.dsn;
    let client = catalog::connect(dsn, &region)
        .await
        .map_err(|e| ApplyError::transient("", e))?;
    let targets = Arc::new(load_targets(&config, &region, &client).await?);
    drop(client);
    let dlq = Arc::new(DlqProducer::new(&config, &region)?);
    let mut tasks = tokio::task::JoinSet::new();
    let groups = config.apply.sessions_per_source.max(1);
    let sources = config.regions.keys().filter(|r| **r != region).count();
    let started = Arc::new(Started {
        pending: AtomicUsize::new(sources * groups),
        all: consuming,
    });
    if sources == 0 {
        started.all.store(true, Ordering::Relaxed);
    }
    for source in config.regions.keys().filter(|r| **r != region) {
        let breaker = Arc::new(super::breaker::Shared::default());
        for group in 0..groups {
            let pipeline = Pipeline {
                config: config.clone(),
                region: region.clone(),
                source: source.clone(),
                topic: config.topic(source, &region),
                group,
                groups,
                targets: std::sync::Mutex::new(targets.clone()),
                metrics: metrics.clone(),
                dlq: dlq.clone(),
                breaker: breaker.clone(),
                conflict_log: ConflictLog::from_config(&config, &region),
                started: started.clone(),
                counted: AtomicBool::new(false),
            };
            let shutdown = shutdown.clone();
            tasks.spawn(async move { pipeline.supervise(shutdown).await });
        }
    }
    for home in config.dr_homes(&region) {
        tasks.spawn(super::vault::supervise(
            config.clone(),
            region.clone(),
            home,
            metrics.clone(),
            shutdown.clone(),
        ));
    }
    let mut result = Ok(());
    while let Some(joined) = tasks.join_next().await {
        let r = joined.unwrap_or_else(|e| Err(ApplyError::transient("apply task", e)));
        if let Err(e) = r {
            if result.is_ok() {
                result = Err(e);
            }
            tasks.abort_all();
        }
    }
    result
}

/// After a failed attempt at a batch: try again, or stop (shutdown).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    Retry,
    Stop,
}

/// Waits `delay` before the next attempt, or until shutdown (nothing of
/// the batch is committed: it is consumed again after a restart).
async fn pause(shutdown: &mut watch::Receiver<bool>, delay: Duration) -> Then {
    tokio::select! {
        _ = shutdown.changed() => Then::Stop,
        _ = tokio::time::sleep(delay) => Then::Retry,
    }
}

/// The state of [`Pipeline::apply_with_retry`] across attempts at one batch.
struct Attempts {
    attempt: u32,
    /// Short first waits: most failures are serialization conflicts with
    /// another session, gone on the next attempt.
    backoff: Backoff,
    /// Waits for a column the target lacks.
    schema_backoff: Backoff,
    targets: Arc<Targets>,
    /// The targets were read again after the batch met them: a record that
    /// does not fit them may be dead-lettered.
    targets_checked: bool,
    /// Since when records of this batch have waited for a column.
    waiting_since: Option<Instant>,
    /// Whether the batch waited for the local clock.
    waiting_clock: bool,
}

impl Attempts {
    fn new(group: usize, targets: Arc<Targets>) -> Attempts {
        Attempts {
            attempt: 0,
            backoff: Backoff::new(
                Duration::from_millis(10 + (group as u64) * 7),
                Duration::from_secs(10),
            ),
            schema_backoff: Backoff::new(Duration::from_millis(500), Duration::from_secs(5)),
            targets,
            targets_checked: false,
            waiting_since: None,
            waiting_clock: false,
        }
    }
}

pub(super) struct Pipeline {
    pub(super) config: Arc<Config>,
    pub(super) region: String,
    pub(super) source: String,
    pub(super) topic: String,
    /// This pipeline applies the partitions `p` with `p % groups == group`.
    pub(super) group: usize,
    pub(super) groups: usize,
    /// The target's table definitions as last read (re-read when a batch
    /// does not fit them).
    pub(super) targets: std::sync::Mutex<Arc<Targets>>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) dlq: Arc<DlqProducer>,
    /// The breaker of this source, shared with its other sessions.
    pub(super) breaker: Arc<super::breaker::Shared>,
    pub(super) conflict_log: Option<ConflictLog>,
    /// The apply side's count of pipelines not yet consuming.
    pub(super) started: Arc<Started>,
    /// Whether this pipeline has been counted in `started`.
    pub(super) counted: AtomicBool,
}

/// How many pipelines have yet to consume; the last one raises `all`.
pub(super) struct Started {
    pending: AtomicUsize,
    all: Arc<AtomicBool>,
}

impl Pipeline {
    /// Counts this pipeline as consuming (once, whatever its restarts).
    pub(super) fn mark_consuming(&self) {
        if self.counted.swap(true, Ordering::Relaxed) {
            return;
        }
        if self.started.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.started.all.store(true, Ordering::Relaxed);
        }
    }
}

impl Pipeline {
    /// Runs the pipeline, restarting it with backoff after transient
    /// failures; the other sources' pipelines are not disturbed.
    async fn supervise(&self, mut shutdown: watch::Receiver<bool>) -> Result<(), ApplyError> {
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
        loop {
            let started = Instant::now();
            match self.run(shutdown.clone()).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_transient() => {
                    self.metrics.add(
                        &metric::APPLY_RESTARTS,
                        &[("region", &self.region), ("source", &self.source)],
                        1,
                    );
                    if started.elapsed() > Duration::from_secs(60) {
                        backoff.reset();
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(region = %self.region, source = %self.source, error = %e, retry_in = ?delay, "apply pipeline failed, restarting");
                    tokio::select! {
                        _ = shutdown.changed() => return Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Err(e) if matches!(e.kind(), ApplyErrorKind::RecordsLost { .. }) => {
                    self.metrics.set(
                        &metric::APPLY_RECORDS_LOST,
                        &[("region", &self.region), ("source", &self.source)],
                        1.0,
                    );
                    tracing::error!(region = %self.region, source = %self.source, "{e}");
                    // the pair stays stopped; an operator's fix is picked
                    // up on the next look
                    tokio::select! {
                        _ = shutdown.changed() => return Ok(()),
                        _ = tokio::time::sleep(Duration::from_secs(30)) => {}
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn run(&self, mut shutdown: watch::Receiver<bool>) -> Result<(), ApplyError> {
        let mut client = session(&self.config, &self.region, &self.source, self.group).await?;
        let guarded = !self.config.breakers.is_empty();
        if guarded && !self.wait_while_frozen(&client, &mut shutdown).await? {
            return Ok(());
        }
        let stored = stored_offsets(&client, &self.topic).await?;
        let consumer = consumer(
            &self.config,
            &self.region,
            &format!("pgrelay-apply-{}", self.region),
        )?;
        let n = assign(&consumer, &self.topic, &stored, self.group, self.groups).await?;
        self.mark_consuming();
        if n == 0 {
            // more sessions than partitions: nothing for this one to do
            let _ = shutdown.changed().await;
            return Ok(());
        }
        tracing::info!(region = %self.region, source = %self.source, topic = %self.topic, group = self.group, partitions = n, "apply consuming");
        let max_records = self.config.apply.batch_max_records.max(1);
        let max_wait = self.config.apply.batch_max_wait;
        // an idle pipeline still notices a target that went away: the
        // offsets stored there are where to resume (see apply_with_retry)
        let mut liveness = tokio::time::interval(Duration::from_millis(500));
        liveness.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut batch: Vec<Consumed> = Vec::new();
            // a batch closes at max_records, max_wait after its first record,
            // or as soon as the consumer has had nothing for IDLE_GAP: large
            // batches under load, prompt apply when traffic is light
            let deadline = tokio::time::sleep(max_wait);
            tokio::pin!(deadline);
            let gap = tokio::time::sleep(IDLE_GAP);
            tokio::pin!(gap);
            let mut stop = false;
            // whether the batch may close without waiting for more (see
            // breaker::SETTLE)
            let mut settled = !guarded;
            let mut idle = IDLE_GAP;
            while batch.len() < max_records {
                tokio::select! {
                    biased;
                    _ = shutdown.changed() => { stop = true; break; }
                    m = consumer.recv() => {
                        let m = match m {
                            Ok(m) => m,
                            Err(source @ rdkafka::error::KafkaError::MessageConsumption(
                                rdkafka::types::RDKafkaErrorCode::AutoOffsetReset
                                | rdkafka::types::RDKafkaErrorCode::OffsetOutOfRange,
                            )) => {
                                return Err(ApplyErrorKind::RecordsLost {
                                    region: self.region.clone(),
                                    from: self.source.clone(),
                                    topic: self.topic.clone(),
                                    source,
                                }
                                .into())
                            }
                            Err(source) => return Err(ApplyError::kafka("consuming", &self.topic, None, source)),
                        };
                        let now = tokio::time::Instant::now();
                        if batch.is_empty() {
                            deadline.as_mut().reset(now + max_wait);
                        }
                        gap.as_mut().reset(now + idle);
                        batch.push(Consumed {
                            topic: m.topic().to_string(),
                            partition: m.partition(),
                            offset: m.offset(),
                            key: m.key().map(|k| k.to_vec()),
                            value: m.payload().map(|v| v.to_vec()),
                        });
                    }
                    // a guarded table's deletes and updates wait a little for
                    // the rest of their transaction, so that the breaker
                    // judges a storm of one transaction whole
                    _ = &mut deadline, if !batch.is_empty() => {
                        if settled || !self.settles(&batch) { break; }
                        settled = true;
                        idle = super::breaker::SETTLE;
                        deadline.as_mut().reset(tokio::time::Instant::now() + idle);
                        gap.as_mut().reset(tokio::time::Instant::now() + idle);
                    }
                    _ = &mut gap, if !batch.is_empty() => {
                        if settled || !self.settles(&batch) { break; }
                        settled = true;
                        idle = super::breaker::SETTLE;
                        deadline.as_mut().reset(tokio::time::Instant::now() + idle);
                        gap.as_mut().reset(tokio::time::Instant::now() + idle);
                    }
                    _ = liveness.tick(), if batch.is_empty() => {
                        if client.is_closed() {
                            return Err(ApplyErrorKind::ConnectionLost {
                                region: self.region.clone(),
                            }
                            .into());
                        }
                    }
                }
            }
            if guarded && !batch.is_empty() {
                let held = self
                    .apply_guarded(&mut client, &batch, &mut shutdown)
                    .await?;
                if matches!(held, super::breaker::Guarded::Held) {
                    // held in Kafka until released: then go on from the
                    // offsets stored with what was applied
                    if !self.wait_while_frozen(&client, &mut shutdown).await? {
                        return Ok(());
                    }
                    let stored = stored_offsets(&client, &self.topic).await?;
                    consumer.unassign().map_err(|source| {
                        ApplyError::kafka("unassigning", &self.topic, None, source)
                    })?;
                    assign(&consumer, &self.topic, &stored, self.group, self.groups).await?;
                    continue;
                }
            } else if !batch.is_empty() {
                self.apply_with_retry(&mut client, &batch, &[], &mut shutdown)
                    .await?;
            }
            if stop || *shutdown.borrow() {
                return Ok(());
            }
        }
    }

    /// Applies `batch`, retrying what is worth retrying: a batch that met
    /// changed or missing target columns ([`Pipeline::recheck`]), a failed
    /// or conflicting one ([`Pipeline::failed`]), one stamped ahead of the
    /// local clock ([`Pipeline::held`]). Returns early, without applying
    /// it, on shutdown while it waits (nothing of it is committed: it is
    /// consumed again after a restart).
    pub(super) async fn apply_with_retry(
        &self,
        client: &mut Client,
        batch: &[Consumed],
        extra_offsets: &[(String, i32, i64)],
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), ApplyError> {
        let mut tries = Attempts::new(self.group, self.targets());
        loop {
            tries.attempt += 1;
            let started = Instant::now();
            let options = self.batch_options(extra_offsets, tries.targets_checked);
            let then = match apply_batch(
                client,
                &self.source,
                Some(self.group),
                &tries.targets,
                batch,
                &self.dlq,
                options,
            )
            .await
            {
                Ok(outcome) => {
                    self.record(batch, &outcome, started.elapsed());
                    if tries.waiting_clock {
                        self.metrics.set(
                            &metric::APPLY_CLOCK_WAIT_SECONDS,
                            &[("region", &self.region), ("source", &self.source)],
                            0.0,
                        );
                    }
                    return Ok(());
                }
                Err(BatchError::Recheck { unknown_column }) => {
                    self.recheck(client, unknown_column, &mut tries, shutdown)
                        .await?
                }
                Err(
                    e @ (BatchError::Conflict { .. }
                    | BatchError::Database { .. }
                    | BatchError::DeadLetter(_)),
                ) => self.failed(client, batch, e, &mut tries, shutdown).await?,
                Err(BatchError::Ahead { wait }) => {
                    self.held(client, wait, &mut tries, shutdown).await
                }
            };
            if then == Then::Stop {
                return Ok(());
            }
        }
    }

    /// How [`apply_batch`] runs for this pipeline.
    fn batch_options<'a>(
        &'a self,
        extra_offsets: &'a [(String, i32, i64)],
        targets_checked: bool,
    ) -> BatchOptions<'a> {
        BatchOptions {
            attempt: 0,
            extra_offsets,
            commit: true,
            max_tries: self.config.apply.max_retries.max(1),
            max_skew: self.config.max_clock_skew,
            max_ahead: self.config.max_stamp_ahead,
            stamp_region: self
                .config
                .regions
                .get(&self.source)
                .map(|r| (self.source.as_str(), r.id)),
            tombstone_horizon: self.config.apply.tombstone_horizon,
            targets_checked,
            conflict_log: self.conflict_log.as_ref(),
            parked: ParkedPositions::Record,
        }
    }

    /// A batch that met a target it may have read before a change: read
    /// the definitions again; if they are current, a record carrying a
    /// column the target lacks waits for it (up to `relay.apply.schema_wait`,
    /// then it is dead-lettered), and anything else failing now is the
    /// record's own doing (`targets_checked`).
    async fn recheck(
        &self,
        client: &mut Client,
        unknown_column: Option<String>,
        tries: &mut Attempts,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Then, ApplyError> {
        match load_targets(&self.config, &self.region, client).await {
            Ok(fresh) if fresh != *tries.targets => {
                tracing::info!(region = %self.region, source = %self.source, "target table definitions changed: re-read");
                tries.targets = Arc::new(fresh);
                *self.targets.lock().unwrap_or_else(|e| e.into_inner()) = tries.targets.clone();
                return Ok(Then::Retry);
            }
            Ok(_) => {}
            Err(e) if e.is_setup() => return Err(e),
            Err(e) => {
                tracing::warn!(region = %self.region, source = %self.source, error = %e, "re-reading the target's table definitions failed, retrying");
                tokio::time::sleep(tries.backoff.next_delay()).await;
                return Ok(Then::Retry);
            }
        }
        let Some(column) = unknown_column else {
            // the definitions are current: what fails now is the record's
            // own doing
            tries.targets_checked = true;
            return Ok(Then::Retry);
        };
        let since = *tries.waiting_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= self.config.apply.schema_wait {
            tracing::warn!(region = %self.region, source = %self.source, column = %column, waited = ?since.elapsed(), "the target still lacks a column records carry: dead-lettering them (relay.apply.schema_wait)");
            tries.targets_checked = true;
            return Ok(Then::Retry);
        }
        self.metrics.add(
            &metric::APPLY_SCHEMA_WAITS,
            &[("region", &self.region), ("source", &self.source)],
            1,
        );
        tracing::warn!(region = %self.region, source = %self.source, column = %column, waited = ?since.elapsed(), "records carry a column the target table lacks: waiting for it (add it here, or see relay.apply.schema_wait)");
        // nothing of the batch is committed: a shutdown may end the wait
        // (the records are consumed again later)
        Ok(pause(shutdown, tries.schema_backoff.next_delay()).await)
    }

    /// A batch that failed (a conflict with another session, a database
    /// error, the dead-letter topic out of reach): retried after a backoff;
    /// every third failure, or on a closed session, the pipeline starts
    /// again from the offsets stored in the target (returns the error).
    async fn failed(
        &self,
        client: &Client,
        batch: &[Consumed],
        e: BatchError,
        tries: &mut Attempts,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Then, ApplyError> {
        let attempt = tries.attempt;
        self.metrics.add(
            &metric::APPLY_RETRIES,
            &[("region", &self.region), ("source", &self.source)],
            1,
        );
        if let BatchError::Conflict { .. } = &e {
            tracing::debug!(region = %self.region, source = %self.source, error = %e, attempt, "apply batch conflicted with another session, retrying");
            tokio::time::sleep(tries.backoff.next_delay()).await;
            return Ok(Then::Retry);
        }
        tracing::warn!(region = %self.region, source = %self.source, error = %e, attempt, "apply batch failed, retrying");
        if client.is_closed() || attempt % 3 == 0 {
            // a new session means starting again from the offsets stored in
            // the target: a target that lost its last commits (asynchronous
            // commit, failover to a standby behind it) lost the offsets with
            // them, and those records must be consumed again
            let first = batch.first();
            return Err(ApplyErrorKind::Batch {
                topic: self.topic.clone(),
                partition: first.map(|c| c.partition),
                offset: first.map(|c| c.offset),
                source: e,
            }
            .into());
        }
        Ok(pause(shutdown, tries.backoff.next_delay()).await)
    }

    /// A batch stamped ahead of the local clock by more than
    /// `relay.max_clock_skew`: held (counted, shown in `pgrelay.held`)
    /// until the clock comes within reach, in waits of at most 5 s.
    async fn held(
        &self,
        client: &Client,
        wait: Duration,
        tries: &mut Attempts,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Then {
        tries.waiting_clock = true;
        self.metrics.add(
            &metric::APPLY_CLOCK_SKEW,
            &[("region", &self.region), ("source", &self.source)],
            1,
        );
        self.metrics.set(
            &metric::APPLY_CLOCK_WAIT_SECONDS,
            &[("region", &self.region), ("source", &self.source)],
            wait.as_secs_f64(),
        );
        tracing::warn!(region = %self.region, source = %self.source, wait = ?wait, "changes are stamped ahead of this region's clock by more than relay.max_clock_skew: waiting for the clock");
        let reason = format!(
            "changes stamped ahead of this region's clock by more than relay.max_clock_skew: held for {wait:?}"
        );
        if let Err(e) = client
            .execute(
                sql::HELD_SQL,
                &[&self.source, &self.group.to_string(), &reason],
            )
            .await
        {
            tracing::debug!(error = %db_message(&e), "recording the hold failed");
        }
        pause(shutdown, wait.min(Duration::from_secs(5))).await
    }

    pub(super) fn targets(&self) -> Arc<Targets> {
        self.targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn record(&self, batch: &[Consumed], outcome: &Outcome, took: Duration) {
        let labels = [
            ("region", self.region.as_str()),
            ("source", self.source.as_str()),
        ];
        self.metrics.set(&metric::APPLY_RECORDS_LOST, &labels, 0.0);
        self.metrics
            .add(&metric::APPLY_RECORDS, &labels, batch.len() as u64);
        self.metrics
            .add(&metric::APPLY_CONFLICTS_WON, &labels, outcome.won);
        self.metrics
            .add(&metric::APPLY_CONFLICTS_LOST, &labels, outcome.lost);
        for (table, n) in &outcome.conflicts {
            self.metrics.add(
                &metric::APPLY_CONFLICTS,
                &[
                    ("region", self.region.as_str()),
                    ("source", self.source.as_str()),
                    ("table", table.as_str()),
                ],
                *n,
            );
        }
        for (path, n) in [
            ("fast", outcome.fast),
            ("upsert", outcome.upserted),
            ("checked", outcome.checked),
        ] {
            if n > 0 {
                self.metrics.add(
                    &metric::APPLY_UPSERTED,
                    &[
                        ("region", self.region.as_str()),
                        ("source", self.source.as_str()),
                        ("path", path),
                    ],
                    n,
                );
            }
        }
        self.metrics.add(
            &metric::APPLY_DEAD_LETTERED,
            &labels,
            outcome.dead.len() as u64,
        );
        self.metrics
            .observe(&metric::APPLY_BATCH_SECONDS, &labels, took.as_secs_f64());
        self.metrics
            .observe(&metric::APPLY_BATCH_RECORDS, &labels, batch.len() as f64);
    }
}
