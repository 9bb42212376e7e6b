//! The apply side: other regions' records -> the local primary.
//!
//! ```text
//!  {prefix}.{source}.{self} ──assign at stored offsets──▶ batch (count / time)
//!      ──▶ record::parse (reject: dead-letter) ──▶ sql::plan ──▶ one target transaction:
//!            rows (conditional on HLC stamps) + offsets + watermark + clock
//!      ──▶ dead letters produced and acknowledged before the commit
//! ```
//!
//! One independent pipeline per source region: its own consumer (explicit
//! partition assignment, no consumer group) and its own database session,
//! which runs under the replication origin `pgrelay_{source}` and
//! `session_replication_role = replica`, so the local capture side skips
//! what it writes and user triggers do not fire twice.
//!
//! Exactly-once in effect: the offsets to resume from are stored in the
//! same transaction as the rows, and read back on every start; stamps make
//! re-applying harmless anyway.
//!
//! Error policy: transient failures (connection loss, serialization failure,
//! deadlock, shutdown of the target) are retried with backoff, never
//! skipped. A definite failure (constraint, type, missing column) re-runs
//! the batch change by change under savepoints; only the changes that fail
//! again go to the dead-letter topic, with their reason, and the rest of the
//! batch commits.

pub mod dlq;
pub mod horizon;
pub mod record;
pub mod replay;
pub mod sql;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::SinkExt as _;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;
use tokio_postgres::Client;

use crate::config::{Config, TableClass};
use crate::hlc;
use crate::metrics::Metrics;
use crate::source::assemble::ORIGIN_PREFIX;
use crate::source::catalog::{self, Catalog};

use self::dlq::{DeadLetter, DlqProducer};
use self::record::{Incoming, TargetTable, Targets};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Cannot run until someone fixes something.
    #[error("{0}")]
    Setup(String),
    /// A database or Kafka cluster cannot be reached at start.
    #[error("{0}")]
    Unreachable(String),
    /// Broke; restart with backoff.
    #[error("{0}")]
    Transient(String),
    /// The replication origin is held by another session (SQLSTATE 55006:
    /// a previous process's session not gone yet, or a second process).
    #[error("{0}")]
    OriginBusy(String),
    /// Records to apply were deleted by Kafka's retention first: they are
    /// lost here until someone resyncs the pair.
    #[error("{0}")]
    RecordsLost(String),
}

impl ApplyError {
    pub fn is_transient(&self) -> bool {
        matches!(self, ApplyError::Transient(_) | ApplyError::OriginBusy(_))
    }
}

/// One consumed Kafka record, owned.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
}

/// A batch closes when no record arrived for this long.
const IDLE_GAP: Duration = Duration::from_millis(2);

/// Whether a database error is worth retrying as is.
pub fn is_transient_db(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        None => true, // connection closed, io, timeouts
        Some(code) => {
            let c = code.code();
            c.starts_with("08")
                || c.starts_with("53")
                || c.starts_with("57P")
                || c.starts_with("58")
                || c == "40001"
                || c == "40P01"
                || c == "55P03"
                || c == "55006"
        }
    }
}

pub fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_string()).unwrap_or_default()
}

/// A database error as one line: message, detail, SQLSTATE.
pub fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(d) => format!("{} ({d})", db.message()),
            None => db.message().to_string(),
        },
        None => crate::source::pg_error::reason(e),
    }
}

/// The declared, non-local tables as they exist in the target database.
pub async fn load_targets(
    config: &Config,
    region: &str,
    client: &Client,
) -> Result<Targets, ApplyError> {
    let cat = Catalog { client, region };
    let mut targets = Targets::new();
    for t in &config.tables {
        if matches!(t.class, TableClass::Local) {
            continue;
        }
        let state = cat
            .table(&t.name)
            .await
            .map_err(|e| ApplyError::Transient(e.to_string()))?;
        if !state.exists {
            return Err(ApplyError::Setup(format!(
                "region {region}: declared table {} does not exist; create it, then run pgrelay setup",
                t.name
            )));
        }
        if state.primary_key.is_empty() {
            return Err(ApplyError::Setup(format!(
                "region {region}: table {} has no primary key",
                t.name
            )));
        }
        if !state.has_stamp_column {
            return Err(ApplyError::Setup(format!(
                "region {region}: table {} lacks pgrelay's stamp column; run pgrelay setup",
                t.name
            )));
        }
        targets.insert(
            t.name.to_string(),
            TargetTable {
                name: t.name.clone(),
                key: state.primary_key,
                columns: state.columns,
                column_types: state.column_types,
                json_columns: state.json_columns,
                admit: admission(config, region, &t.class),
            },
        );
    }
    Ok(targets)
}

/// What `region` accepts of a table of class `class` (see [`record::Admit`]).
fn admission(config: &Config, region: &str, class: &TableClass) -> record::Admit {
    match class {
        TableClass::Owned { owner } => record::Admit::Owner(owner.clone()),
        TableClass::Partitioned {
            home_column,
            aliases,
            allow,
        } => {
            let mut homes: std::collections::HashMap<String, String> = config
                .regions
                .keys()
                .map(|r| (r.clone(), r.clone()))
                .collect();
            homes.extend(aliases.iter().map(|(v, r)| (v.clone(), r.clone())));
            let allowed = config
                .regions
                .keys()
                .filter(|home| {
                    *home == region || allow.get(*home).is_some_and(|a| a.contains(region))
                })
                .cloned()
                .collect();
            record::Admit::Homes {
                column: home_column.clone(),
                homes,
                allowed,
            }
        }
        _ => record::Admit::Any,
    }
}

/// The replication origin `pgrelay dlq replay` writes under (the sidecar's
/// apply side holds the per-source origins while it runs).
pub const REPLAY_ORIGIN: &str = "pgrelay_replay";

/// The replication origin of apply session `group` for `source`:
/// `pgrelay_{source}` for the first, `pgrelay_{source}.{group}` for the
/// others (region names have no dots, so these never collide).
pub fn origin_name(source: &str, group: usize) -> String {
    if group == 0 {
        format!("{ORIGIN_PREFIX}{source}")
    } else {
        format!("{ORIGIN_PREFIX}{source}.{group}")
    }
}

/// Opens apply session `group` for one source: replica role, origin.
pub async fn session(
    config: &Config,
    region: &str,
    source: &str,
    group: usize,
) -> Result<Client, ApplyError> {
    session_with_origin(config, region, &origin_name(source, group)).await
}

/// Opens an apply session writing under `origin`.
pub async fn session_with_origin(
    config: &Config,
    region: &str,
    origin: &str,
) -> Result<Client, ApplyError> {
    let dsn = &config
        .region(region)
        .map_err(|e| ApplyError::Setup(e.to_string()))?
        .dsn;
    let client = catalog::connect(dsn, region)
        .await
        .map_err(|e| ApplyError::Transient(e.to_string()))?;
    client
        .batch_execute(&format!(
            "SET session_replication_role = replica; SET client_min_messages = warning; {}",
            crate::event::canonical_text_sets("; ")
        ))
        .await
        .map_err(|e| {
            if sqlstate(&e) == "42501" {
                ApplyError::Setup(format!(
                    "region {region}: the apply role must be allowed to SET session_replication_role \
                     (GRANT SET ON PARAMETER session_replication_role TO the role; pgrelay setup grants it \
                     with a setup_dsn): {}",
                    db_message(&e)
                ))
            } else {
                ApplyError::Transient(format!("region {region}: {}", db_message(&e)))
            }
        })?;
    client
        .execute("SELECT pg_replication_origin_session_setup($1)", &[&origin])
        .await
        .map_err(|e| {
            let msg = db_message(&e);
            if sqlstate(&e) == "55006" {
                ApplyError::OriginBusy(format!(
                    "region {region}: replication origin {origin}: {msg}"
                ))
            } else if is_transient_db(&e) {
                ApplyError::Transient(format!(
                    "region {region}: replication origin {origin}: {msg}"
                ))
            } else {
                ApplyError::Setup(format!(
                    "region {region}: replication origin {origin}: {msg}; run pgrelay setup"
                ))
            }
        })?;
    Ok(client)
}

/// Stored next offsets of a topic: partition -> offset.
pub async fn stored_offsets(
    client: &Client,
    topic: &str,
) -> Result<BTreeMap<i32, i64>, ApplyError> {
    let rows = client
        .query(
            "SELECT kafka_partition, next_offset FROM pgrelay.offsets WHERE topic = $1",
            &[&topic],
        )
        .await
        .map_err(|e| {
            ApplyError::Transient(format!("reading stored offsets: {}", db_message(&e)))
        })?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, i32>(0), r.get::<_, i64>(1)))
        .collect())
}

pub fn consumer(config: &Config, region: &str, group: &str) -> Result<StreamConsumer, ApplyError> {
    let cluster = config.kafka_for(region);
    let mut cfg = rdkafka::ClientConfig::new();
    cfg.set("bootstrap.servers", &cluster.brokers)
        // tuning defaults, overridable from the config
        .set("fetch.wait.max.ms", "50")
        .set("isolation.level", "read_committed");
    for (k, v) in &cluster.properties {
        cfg.set(k, v);
    }
    // what exactly-once apply relies on: offsets live in the target database
    cfg.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        // a stored offset Kafka no longer holds means records deleted
        // before they were applied: an error, never a silent jump
        .set("auto.offset.reset", "error");
    cfg.set_log_level(rdkafka::config::RDKafkaLogLevel::Warning);
    cfg.create()
        .map_err(|e| ApplyError::Setup(format!("kafka consumer for region {region}: {e}")))
}

/// Assigns the partitions `p` of `topic` with `p % groups == group`, each
/// at its stored offset; returns how many.
pub async fn assign(
    consumer: &StreamConsumer,
    topic: &str,
    stored: &BTreeMap<i32, i64>,
    group: usize,
    groups: usize,
) -> Result<usize, ApplyError> {
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|e| ApplyError::Transient(format!("kafka metadata for {topic}: {e}")))?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        // preflight checked it exists: a broker that is restarting may
        // answer without it for a moment
        return Err(ApplyError::Transient(format!(
            "topic {topic} not found; if it persists, run pgrelay setup in the source region"
        )));
    }
    let mine: Vec<i32> = partitions
        .into_iter()
        .filter(|p| (*p as usize) % groups.max(1) == group)
        .collect();
    if mine.is_empty() {
        return Ok(0);
    }
    let mut tpl = TopicPartitionList::new();
    for p in &mine {
        // nothing stored: from the oldest record the cluster holds (a new
        // pair, or stored offsets removed after a resync); a stored offset
        // the cluster no longer holds is an error (auto.offset.reset)
        let offset = match stored.get(p) {
            Some(o) => Offset::Offset(*o),
            None => Offset::Beginning,
        };
        tpl.add_partition_offset(topic, *p, offset)
            .map_err(|e| ApplyError::Transient(e.to_string()))?;
    }
    consumer
        .assign(&tpl)
        .map_err(|e| ApplyError::Transient(format!("assigning {topic}: {e}")))?;
    Ok(mine.len())
}

/// Everything checked before consuming: the target tables, the apply
/// session (role, origins), the Kafka cluster and topics.
pub async fn preflight(config: &Config, region: &str) -> Result<(), ApplyError> {
    let dsn = &config
        .region(region)
        .map_err(|e| ApplyError::Setup(e.to_string()))?
        .dsn;
    let client = catalog::connect(dsn, region)
        .await
        .map_err(|e| ApplyError::Unreachable(e.to_string()))?;
    load_targets(config, region, &client)
        .await
        .map_err(|e| match e {
            ApplyError::Transient(m) => ApplyError::Unreachable(m),
            other => other,
        })?;
    let cluster = config.kafka_for(region);
    let mut topics: Vec<String> = config
        .regions
        .keys()
        .filter(|r| *r != region)
        .map(|s| config.topic(s, region))
        .collect();
    topics.push(config.dlq_topic(region));
    crate::kafka::check_topics(cluster, &topics, Duration::from_secs(10))
        .await
        .map_err(|e| {
            let msg = format!("region {region}: {e}");
            if e.is_unreachable() {
                ApplyError::Unreachable(msg)
            } else {
                ApplyError::Setup(msg)
            }
        })?;
    let groups = (0..config.apply.sessions_per_source).flat_map(|g| {
        config
            .regions
            .keys()
            .filter(|r| *r != region)
            .map(move |s| (s, g))
    });
    for (source, group) in groups {
        match session(config, region, source, group).await {
            Ok(_) => {}
            // an origin still held by a previous process's session, or a
            // database that is restarting: the supervisor retries
            Err(ApplyError::Transient(m) | ApplyError::OriginBusy(m)) => {
                tracing::warn!(region, source = %source, "apply session not ready yet: {m}");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Runs the apply side of `region` until shutdown: one pipeline per source.
pub async fn run(
    config: Arc<Config>,
    region: String,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ApplyError> {
    let dsn = &config
        .region(&region)
        .map_err(|e| ApplyError::Setup(e.to_string()))?
        .dsn;
    let client = catalog::connect(dsn, &region)
        .await
        .map_err(|e| ApplyError::Transient(e.to_string()))?;
    let targets = Arc::new(load_targets(&config, &region, &client).await?);
    drop(client);
    let dlq = Arc::new(DlqProducer::new(&config, &region)?);
    let mut tasks = tokio::task::JoinSet::new();
    let groups = config.apply.sessions_per_source.max(1);
    for source in config.regions.keys().filter(|r| **r != region) {
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
            };
            let shutdown = shutdown.clone();
            tasks.spawn(async move { pipeline.supervise(shutdown).await });
        }
    }
    let mut result = Ok(());
    while let Some(joined) = tasks.join_next().await {
        let r = joined.unwrap_or_else(|e| Err(ApplyError::Transient(format!("apply task: {e}"))));
        if let Err(e) = r {
            if result.is_ok() {
                result = Err(e);
            }
            tasks.abort_all();
        }
    }
    result
}

struct Pipeline {
    config: Arc<Config>,
    region: String,
    source: String,
    topic: String,
    /// This pipeline applies the partitions `p` with `p % groups == group`.
    group: usize,
    groups: usize,
    /// The target's table definitions as last read (re-read when a batch
    /// does not fit them).
    targets: std::sync::Mutex<Arc<Targets>>,
    metrics: Arc<Metrics>,
    dlq: Arc<DlqProducer>,
}

/// What applying one batch did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub won: u64,
    pub lost: u64,
    pub dead: Vec<DeadLetter>,
}

impl Pipeline {
    /// Runs the pipeline, restarting it with backoff after transient
    /// failures; the other sources' pipelines are not disturbed.
    async fn supervise(&self, mut shutdown: watch::Receiver<bool>) -> Result<(), ApplyError> {
        let mut backoff = Duration::from_millis(250);
        loop {
            let started = Instant::now();
            match self.run(shutdown.clone()).await {
                Ok(()) => return Ok(()),
                Err(ApplyError::Transient(e) | ApplyError::OriginBusy(e)) => {
                    self.metrics.add(
                        "pgrelay_apply_restarts_total",
                        "Apply pipelines restarted after a transient failure",
                        &[("region", &self.region), ("source", &self.source)],
                        1,
                    );
                    if started.elapsed() > Duration::from_secs(60) {
                        backoff = Duration::from_millis(250);
                    }
                    tracing::warn!(region = %self.region, source = %self.source, error = %e, retry_in = ?backoff, "apply pipeline failed, restarting");
                    tokio::select! {
                        _ = shutdown.changed() => return Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
                Err(ApplyError::RecordsLost(e)) => {
                    self.metrics.set(
                        "pgrelay_apply_records_lost",
                        "1 while records of the pair were deleted by Kafka retention before they were applied (run pgrelay resync)",
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
        let stored = stored_offsets(&client, &self.topic).await?;
        let consumer = consumer(
            &self.config,
            &self.region,
            &format!("pgrelay-apply-{}", self.region),
        )?;
        let n = assign(&consumer, &self.topic, &stored, self.group, self.groups).await?;
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
            while batch.len() < max_records {
                tokio::select! {
                    biased;
                    _ = shutdown.changed() => { stop = true; break; }
                    m = consumer.recv() => {
                        let m = match m {
                            Ok(m) => m,
                            Err(rdkafka::error::KafkaError::MessageConsumption(
                                code @ (rdkafka::types::RDKafkaErrorCode::AutoOffsetReset
                                | rdkafka::types::RDKafkaErrorCode::OffsetOutOfRange),
                            )) => {
                                return Err(ApplyError::RecordsLost(format!(
                                    "region {}: the cluster no longer holds the records of {} this region is to apply next \
                                     (deleted by retention before they were applied, or lost by the cluster: {code}): \
                                     those changes are lost in {}. Run `pgrelay resync --region {} --to {}`, then \
                                     `DELETE FROM pgrelay.offsets WHERE topic = '{}'` in {} to resume from the oldest record Kafka holds",
                                    self.region, self.topic, self.region, self.source, self.region, self.topic, self.region
                                )))
                            }
                            Err(e) => return Err(ApplyError::Transient(format!("consuming {}: {e}", self.topic))),
                        };
                        let now = tokio::time::Instant::now();
                        if batch.is_empty() {
                            deadline.as_mut().reset(now + max_wait);
                        }
                        gap.as_mut().reset(now + IDLE_GAP);
                        batch.push(Consumed {
                            topic: m.topic().to_string(),
                            partition: m.partition(),
                            offset: m.offset(),
                            key: m.key().map(|k| k.to_vec()),
                            value: m.payload().map(|v| v.to_vec()),
                        });
                    }
                    _ = &mut deadline, if !batch.is_empty() => break,
                    _ = &mut gap, if !batch.is_empty() => break,
                    _ = liveness.tick(), if batch.is_empty() => {
                        if client.is_closed() {
                            return Err(ApplyError::Transient(format!(
                                "region {}: the connection to the target database was lost (resuming from the offsets stored there)",
                                self.region
                            )));
                        }
                    }
                }
            }
            if !batch.is_empty() {
                self.apply_with_retry(&mut client, &batch, &mut shutdown)
                    .await?;
            }
            if stop || *shutdown.borrow() {
                return Ok(());
            }
        }
    }

    /// Applies `batch`, retrying what is worth retrying. Returns early,
    /// without applying it, on shutdown while it waits for the local clock
    /// (nothing of it is committed: it is consumed again after a restart).
    async fn apply_with_retry(
        &self,
        client: &mut Client,
        batch: &[Consumed],
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), ApplyError> {
        // short first waits: most failures here are serialization conflicts
        // with another session, gone on the next attempt
        let mut backoff = Duration::from_millis(10 + (self.group as u64) * 7);
        let mut attempt = 0u32;
        let mut targets = self.targets();
        let mut targets_checked = false;
        // since when records of this batch have waited for a column
        let mut waiting_since: Option<Instant> = None;
        // whether the batch waited for the local clock
        let mut waiting_clock = false;
        loop {
            attempt += 1;
            let started = Instant::now();
            match apply_batch(
                client,
                &self.source,
                Some(self.group),
                &targets,
                batch,
                &self.dlq,
                BatchOptions {
                    attempt: 0,
                    extra_offsets: &[],
                    commit: true,
                    max_tries: self.config.apply.max_retries.max(1),
                    max_skew: self.config.max_clock_skew,
                    max_ahead: self.config.max_stamp_ahead,
                    tombstone_horizon: self.config.apply.tombstone_horizon,
                    targets_checked,
                },
            )
            .await
            {
                Ok(outcome) => {
                    self.record(batch, &outcome, started.elapsed());
                    if waiting_clock {
                        self.metrics.set(
                            "pgrelay_apply_clock_wait_seconds",
                            "How long the pair's next batch waits for the local clock to catch up with its stamps",
                            &[("region", &self.region), ("source", &self.source)],
                            0.0,
                        );
                    }
                    return Ok(());
                }
                Err(BatchError::Recheck { unknown_column }) => {
                    match load_targets(&self.config, &self.region, client).await {
                        Ok(fresh) if fresh != *targets => {
                            tracing::info!(region = %self.region, source = %self.source, "target table definitions changed: re-read");
                            targets = Arc::new(fresh);
                            *self.targets.lock().unwrap_or_else(|e| e.into_inner()) =
                                targets.clone();
                            continue;
                        }
                        Ok(_) => {}
                        Err(ApplyError::Setup(e)) => return Err(ApplyError::Setup(e)),
                        Err(e) => {
                            tracing::warn!(region = %self.region, source = %self.source, error = %e, "re-reading the target's table definitions failed, retrying");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(10));
                            continue;
                        }
                    }
                    let Some(column) = unknown_column else {
                        // the definitions are current: what fails now is
                        // the record's own doing
                        targets_checked = true;
                        continue;
                    };
                    let since = *waiting_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= self.config.apply.schema_wait {
                        tracing::warn!(region = %self.region, source = %self.source, column = %column, waited = ?since.elapsed(), "the target still lacks a column records carry: dead-lettering them (relay.apply.schema_wait)");
                        targets_checked = true;
                        continue;
                    }
                    self.metrics.add(
                        "pgrelay_apply_schema_waits_total",
                        "Batches held because records carry a column the target table lacks",
                        &[("region", &self.region), ("source", &self.source)],
                        1,
                    );
                    tracing::warn!(region = %self.region, source = %self.source, column = %column, waited = ?since.elapsed(), "records carry a column the target table lacks: waiting for it (add it here, or see relay.apply.schema_wait)");
                    tokio::time::sleep(backoff).await;
                    backoff =
                        (backoff * 2).clamp(Duration::from_millis(500), Duration::from_secs(5));
                }
                Err(e @ (BatchError::Conflict(_) | BatchError::Transient(_))) => {
                    self.metrics.add(
                        "pgrelay_apply_retries_total",
                        "Batches retried after a transient failure",
                        &[("region", &self.region), ("source", &self.source)],
                        1,
                    );
                    if let BatchError::Conflict(e) = &e {
                        tracing::debug!(region = %self.region, source = %self.source, error = %e, attempt, "apply batch conflicted with another session, retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                        continue;
                    }
                    tracing::warn!(region = %self.region, source = %self.source, error = %e, attempt, "apply batch failed, retrying");
                    if client.is_closed() || attempt % 3 == 0 {
                        // a new session means starting again from the offsets
                        // stored in the target: a target that lost its last
                        // commits (asynchronous commit, failover to a standby
                        // behind it) lost the offsets with them, and those
                        // records must be consumed again
                        return Err(ApplyError::Transient(format!(
                            "{e} (resuming from the offsets stored in the target)"
                        )));
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
                Err(BatchError::Ahead { wait }) => {
                    waiting_clock = true;
                    self.metrics.add(
                        "pgrelay_apply_clock_skew_total",
                        "Batches held back because a change is stamped further ahead of the local clock than relay.max_clock_skew",
                        &[("region", &self.region), ("source", &self.source)],
                        1,
                    );
                    self.metrics.set(
                        "pgrelay_apply_clock_wait_seconds",
                        "How long the pair's next batch waits for the local clock to catch up with its stamps",
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
                    tokio::select! {
                        _ = shutdown.changed() => return Ok(()),
                        _ = tokio::time::sleep(wait.min(Duration::from_secs(5))) => {}
                    }
                }
            }
        }
    }

    fn targets(&self) -> Arc<Targets> {
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
        self.metrics.set(
            "pgrelay_apply_records_lost",
            "1 while records of the pair were deleted by Kafka retention before they were applied (run pgrelay resync)",
            &labels,
            0.0,
        );
        self.metrics.add(
            "pgrelay_apply_records_total",
            "Records consumed and applied (or found redundant)",
            &labels,
            batch.len() as u64,
        );
        self.metrics.add(
            "pgrelay_apply_conflicts_won_total",
            "Incoming changes that won last-writer-wins",
            &labels,
            outcome.won,
        );
        self.metrics.add(
            "pgrelay_apply_conflicts_lost_total",
            "Incoming changes older than the target row or tombstone",
            &labels,
            outcome.lost,
        );
        self.metrics.add(
            "pgrelay_apply_dead_lettered_total",
            "Records sent to the dead-letter topic",
            &labels,
            outcome.dead.len() as u64,
        );
        self.metrics.observe(
            "pgrelay_apply_batch_seconds",
            "Time to apply one batch (one target transaction)",
            &labels,
            crate::metrics::LATENCY_BUCKETS,
            took.as_secs_f64(),
        );
        self.metrics.observe(
            "pgrelay_apply_batch_records",
            "Records per applied batch",
            &labels,
            crate::metrics::SIZE_BUCKETS,
            batch.len() as f64,
        );
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Runs one planned statement; an upsert first copies its rows into its
/// staging table.
async fn execute(
    tx: &tokio_postgres::Transaction<'_>,
    s: &sql::Statement,
    staged: &mut HashSet<String>,
) -> Result<u64, tokio_postgres::Error> {
    let Some(stage) = &s.stage else {
        return if s.rows.is_empty() {
            tx.execute(s.sql.as_str(), &[]).await
        } else {
            tx.execute(s.sql.as_str(), &[&s.rows]).await
        };
    };
    tx.batch_execute(&stage.create).await?;
    if !staged.insert(stage.name.clone()) {
        tx.batch_execute(&stage.clear).await?;
    }
    let sink = tx.copy_in(stage.copy.as_str()).await?;
    let mut sink = std::pin::pin!(sink);
    sink.send(bytes::Bytes::copy_from_slice(s.rows.as_bytes()))
        .await?;
    sink.as_mut().finish().await?;
    let written = tx.execute(s.sql.as_str(), &[]).await?;
    if written == 0 {
        return Ok(0);
    }
    // a local delete that committed while the upsert waited for its row
    // lock left a tombstone the upsert's snapshot could not see: take back
    // what it brought back (a new snapshot sees that tombstone now)
    let taken_back = tx.execute(stage.recheck.as_str(), &[]).await?;
    Ok(written.saturating_sub(taken_back))
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
    /// `relay.apply.tombstone_horizon`: only changes older than about this
    /// can be below the horizon, so only then is it read.
    pub tombstone_horizon: Duration,
    /// `targets` were just read from the target: a record that does not fit
    /// them may be dead-lettered. `false`: the batch is given up instead
    /// ([`BatchError::Recheck`]), so that a table changed since it was last
    /// read is never the reason for a dead letter.
    pub targets_checked: bool,
}

/// Why a batch was not applied (nothing of it was committed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchError {
    /// A lost connection, a shutdown of the target: retry it.
    Transient(String),
    /// A serialization failure or deadlock with another session (SQLSTATE
    /// 40001, 40P01): retry it after a short wait, quietly.
    Conflict(String),
    /// Something would have been dead-lettered under table definitions not
    /// read since: read them again, then retry. `unknown_column` names the
    /// first `table.column` a record has and the definitions lack.
    Recheck { unknown_column: Option<String> },
    /// A change is stamped further ahead of the local clock than
    /// `max_clock_skew`: retry once the clock has come this much closer.
    Ahead { wait: Duration },
}

impl std::fmt::Display for BatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BatchError::Transient(e) | BatchError::Conflict(e) => f.write_str(e),
            BatchError::Recheck {
                unknown_column: Some(c),
            } => write!(f, "records have column {c}, which the target table lacks"),
            BatchError::Recheck { .. } => {
                f.write_str("a statement failed: the target's table definitions are re-read")
            }
            BatchError::Ahead { wait } => write!(
                f,
                "a change is stamped ahead of this region's clock by more than \
                 relay.max_clock_skew: waiting {wait:?} for the clock to catch up"
            ),
        }
    }
}

/// A retryable database error, classified by its SQLSTATE.
fn retryable(e: &tokio_postgres::Error, table: &str) -> BatchError {
    let message = format!("{table}: {}", db_message(e));
    match sqlstate(e).as_str() {
        "40001" | "40P01" => BatchError::Conflict(message),
        _ => BatchError::Transient(message),
    }
}

impl From<String> for BatchError {
    fn from(e: String) -> Self {
        BatchError::Transient(e)
    }
}

/// Applies one batch in one transaction. Returns `Err` for transient
/// failures (the caller retries the whole batch).
pub async fn apply_batch(
    client: &mut Client,
    source: &str,
    session_no: Option<usize>,
    targets: &Targets,
    batch: &[Consumed],
    dlq: &DlqProducer,
    opts: BatchOptions<'_>,
) -> Result<Outcome, BatchError> {
    let BatchOptions {
        attempt,
        extra_offsets,
        commit,
        max_tries,
        max_skew,
        max_ahead,
        tombstone_horizon,
        targets_checked,
    } = opts;
    let mut outcome = Outcome::default();
    let mut changes: Vec<Incoming> = Vec::with_capacity(batch.len());
    let mut positions: Vec<usize> = Vec::with_capacity(batch.len());
    let now = now_ms();
    let skew = max_skew.as_millis() as i64;
    let limit = max_ahead.as_millis() as i64;
    // how far the furthest change within the hard limit is ahead
    let mut furthest = i64::MIN;
    for (i, c) in batch.iter().enumerate() {
        match record::parse(c.value.as_deref(), targets) {
            Ok(inc) => {
                let ahead = hlc::ahead_ms(inc.hlc, now);
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
                if let Err(why) = inc.table.admit.check(source, &inc) {
                    let why = record::Rejection::NotAdmitted(why);
                    outcome
                        .dead
                        .push(DeadLetter::rejected(c, &why, attempt + 1));
                    continue;
                }
                furthest = furthest.max(ahead);
                changes.push(inc);
                positions.push(i);
            }
            Err(rej @ record::Rejection::UnknownColumn { .. }) if !targets_checked => {
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
    if furthest > skew {
        // applying it would drag this region's clock ahead of the others':
        // wait until the local clock has come within max_clock_skew of it
        return Err(BatchError::Ahead {
            wait: Duration::from_millis((furthest - skew) as u64),
        });
    }
    let buckets = sql::key_buckets(&changes);
    let tx = client
        .transaction()
        .await
        .map_err(|e| format!("begin: {}", db_message(&e)))?;
    // Sessions applying changes of the same rows (other source regions,
    // other partition groups) take turns: each first locks the key buckets
    // of its batch, in ascending order. Without this, an upsert could
    // check for a tombstone, miss the one a concurrent delete is writing,
    // and bring back a row the newer delete removed. READ COMMITTED: the
    // statements after the lock see what the previous holder committed.
    if !buckets.is_empty() {
        tx.execute(sql::LOCK_BUCKETS_SQL, &[&sql::buckets_param(&buckets)])
            .await
            .map_err(|e| format!("locking key buckets: {}", db_message(&e)))?;
    }
    // changes below their table's tombstone horizon apply only to rows
    // that exist; the horizon never passes `tombstone_horizon` ago
    // (horizon::cutoff), and half of it again covers the clocks of other
    // hosts that purge
    let recent = now.saturating_sub((tombstone_horizon / 2).as_millis() as u64);
    if changes.iter().any(|c| hlc::wall_ms(c.hlc) < recent) {
        let horizons: HashMap<String, u64> = tx
            .query(horizon::HORIZONS_SQL, &[])
            .await
            .map_err(|e| format!("reading the tombstone horizons: {}", db_message(&e)))?
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1).max(0) as u64))
            .collect();
        let mut i = 0;
        while i < changes.len() {
            let c = &changes[i];
            let horizon = horizons
                .get(&c.table.name.to_string())
                .copied()
                .unwrap_or(0);
            if !horizon::below(c, horizon) {
                i += 1;
                continue;
            }
            let keys: Vec<Option<&str>> = c.key.iter().map(|k| k.as_deref()).collect();
            let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = keys
                .iter()
                .map(|k| k as &(dyn tokio_postgres::types::ToSql + Sync))
                .collect();
            tx.execute("SAVEPOINT horizon", &[])
                .await
                .map_err(|e| format!("savepoint: {}", db_message(&e)))?;
            let dead = match tx
                .query_one(horizon::exists_sql(c.table).as_str(), &params)
                .await
            {
                Ok(row) if row.get::<_, bool>(0) => None,
                Ok(_) => Some(DeadLetter::rejected(
                    &batch[positions[i]],
                    &record::Rejection::BeyondHorizon {
                        stamp: c.hlc,
                        horizon,
                    },
                    attempt + 1,
                )),
                Err(e) if is_transient_db(&e) => {
                    return Err(retryable(&e, &c.table.name.to_string()))
                }
                // a key the table cannot hold: the record's own doing
                Err(e) => {
                    tx.execute("ROLLBACK TO SAVEPOINT horizon", &[])
                        .await
                        .map_err(|e| format!("rollback to savepoint: {}", db_message(&e)))?;
                    Some(DeadLetter::failed(&batch[positions[i]], &e, attempt + 1))
                }
            };
            match dead {
                None => i += 1,
                Some(letter) => {
                    outcome.dead.push(letter);
                    changes.remove(i);
                    positions.remove(i);
                }
            }
        }
    }
    sql::fill_from_earlier(&mut changes);
    let statements = sql::plan(&changes);
    // staging tables filled in this transaction (one filled twice is
    // emptied first)
    let mut staged = HashSet::new();
    // changes dead-lettered one by one: neither the clock nor the
    // watermark moves for them
    let mut parked: HashSet<usize> = HashSet::new();
    for s in &statements {
        tx.execute("SAVEPOINT stmt", &[])
            .await
            .map_err(|e| format!("savepoint: {}", db_message(&e)))?;
        let result = execute(&tx, s, &mut staged).await;
        match result {
            Ok(n) => {
                outcome.won += n;
                outcome.lost +=
                    (s.members.len() as u64).saturating_sub(n) + s.superseded.len() as u64;
            }
            Err(e) if is_transient_db(&e) => return Err(retryable(&e, &s.table)),
            // the transaction is dropped, so rolled back
            Err(_) if !targets_checked => {
                return Err(BatchError::Recheck {
                    unknown_column: None,
                })
            }
            Err(_) => {
                tx.execute("ROLLBACK TO SAVEPOINT stmt", &[])
                    .await
                    .map_err(|e| format!("rollback to savepoint: {}", db_message(&e)))?;
                // one by one: only what fails again is dead-lettered
                outcome.lost += s.superseded.len() as u64;
                for &m in &s.members {
                    let single = sql::plan(std::slice::from_ref(&changes[m]));
                    for one in &single {
                        let mut tries = 0;
                        loop {
                            tries += 1;
                            tx.execute("SAVEPOINT one", &[])
                                .await
                                .map_err(|e| format!("savepoint: {}", db_message(&e)))?;
                            let r = execute(&tx, one, &mut staged).await;
                            match r {
                                Ok(n) => {
                                    outcome.won += n;
                                    outcome.lost += 1u64.saturating_sub(n);
                                    break;
                                }
                                Err(e) if is_transient_db(&e) => {
                                    return Err(retryable(&e, &s.table))
                                }
                                Err(e) => {
                                    tx.execute("ROLLBACK TO SAVEPOINT one", &[])
                                        .await
                                        .map_err(|e| format!("rollback: {}", db_message(&e)))?;
                                    if tries >= max_tries {
                                        // the change alone was tried `tries` times
                                        outcome.dead.push(DeadLetter::failed(
                                            &batch[positions[m]],
                                            &e,
                                            attempt + tries,
                                        ));
                                        parked.insert(m);
                                        break;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    // offsets, watermark, clock
    let mut next: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for c in batch {
        let e = next.entry((c.topic.clone(), c.partition)).or_insert(0);
        *e = (*e).max(c.offset + 1);
    }
    for (topic, partition, offset) in extra_offsets {
        let e = next.entry((topic.clone(), *partition)).or_insert(0);
        *e = (*e).max(*offset);
    }
    let offsets = serde_json::Value::Array(
        next.iter()
            .map(|((t, p), o)| serde_json::json!({"topic": t, "kafka_partition": p, "next_offset": o}))
            .collect(),
    )
    .to_string();
    tx.execute(sql::OFFSETS_SQL, &[&offsets])
        .await
        .map_err(|e| format!("storing offsets: {}", db_message(&e)))?;
    let applied = || {
        changes
            .iter()
            .enumerate()
            .filter(|(i, _)| !parked.contains(i))
            .map(|(_, c)| c)
    };
    if let Some(newest) = applied().max_by_key(|c| c.hlc) {
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
            .map_err(|e| format!("storing watermark: {}", db_message(&e)))?;
        }
        tx.execute(sql::CLOCK_SQL, &[&hlc::logical(newest.hlc).to_string()])
            .await
            .map_err(|e| format!("advancing the clock: {}", db_message(&e)))?;
    }
    if !commit {
        tx.rollback()
            .await
            .map_err(|e| format!("rollback: {}", db_message(&e)))?;
        return Ok(outcome);
    }
    // dead letters must be in Kafka before the offsets that skip them commit
    if !outcome.dead.is_empty() {
        dlq.send_all(&outcome.dead).await?;
    }
    tx.commit()
        .await
        .map_err(|e| format!("commit: {}", db_message(&e)))?;
    Ok(outcome)
}
