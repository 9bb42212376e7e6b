//! The capture side: one region's primary -> residency-filtered Kafka records.
//!
//! ```text
//!  replication slot ──XLogData──▶ pgoutput::decode ──▶ Assembler ──▶ Policy::route (per destination)
//!        ▲                                                                │
//!        │ standby status (confirmed LSN)                                 ▼
//!   AckTracker ◀──────── delivery reports ◀──────── Publisher (idempotent, acks=all)
//! ```
//!
//! One task, one `select!` with explicit priorities: shutdown, then delivery
//! reports (they free capacity and move the confirmed LSN), then the status
//! timer, then the next frame from the server — read only while fewer than
//! `max_in_flight` records await acknowledgement, so a slow Kafka stops
//! reading and the replication slot, not memory, holds the backlog.
//!
//! An insert or update may arrive without the TOASTed columns it left
//! untouched (an update that kept a large value, a row moved to a new key);
//! they are read back from the source before the change is published
//! (`source::fill`), so every published insert and update is a whole row.
//!
//! Error policy: anything that breaks the stream or the producer is
//! transient — the run ends with an error, the caller restarts it with
//! backoff from the slot's confirmed LSN and unacknowledged records are sent
//! again (at-least-once). Problems a restart cannot fix (configuration,
//! wal_level, missing tables or slot, unreachable services at start) are
//! reported by [`preflight`] before streaming begins. One such problem can
//! appear mid-stream: a Relation message showing a table its rules no longer
//! fit (a column a rule names is gone, a `partitioned` table lost replica
//! identity FULL). The capture side then stops with a setup error naming the
//! table — before any row of that shape is routed — after confirming what
//! Kafka acknowledged, so a restart after the fix resumes at that point.
//!
//! Files: this one (pre-flight, start, the primary's identity), `stream`
//! (the loop: frames in, records out, deliveries back), `error`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::check::{self, Severity};
use crate::config::Config;
use crate::dr::DrKey;
use crate::event::{Lsn, TableName};
use crate::metrics::catalog as metric;
use crate::metrics::Metrics;
use crate::publish::acks::AckTracker;
use crate::publish::envelope::Source;
use crate::publish::producer::{Delivery, Outlets};
use crate::residency::Policy;
use crate::source::assemble::Assembler;
use crate::source::catalog::{self, Catalog};
use crate::source::conn::{ConnError, ConnParams, ReplConnection, ReplReader, ReplWriter};
use crate::source::fill::Filler;

mod error;
pub(crate) mod seals;
mod stream;

pub use error::{CaptureError, CaptureErrorKind, Cause};

/// A failure worth a restart while `doing` something before streaming.
fn transient<E: Into<Cause>>(doing: &str) -> impl Fn(E) -> CaptureError + '_ {
    move |e| CaptureError::transient(doing, e)
}

/// Everything checked before streaming: the database (settings, tables,
/// slot, publication) and every Kafka cluster the region publishes to
/// (reachable, topics present).
pub async fn preflight(config: &Config, region: &str) -> Result<(), CaptureError> {
    let dsn = &config.region(region)?.dsn;
    let client = catalog::connect(dsn, region)
        .await
        .map_err(CaptureError::unreachable)?;
    let cat = Catalog {
        client: &client,
        region,
    };
    let findings = check::database(config, region, &cat, true)
        .await
        .map_err(|e| {
            // a database restarting under the check is retried, not fatal
            if e.is_unreachable() {
                CaptureError::unreachable(e)
            } else {
                CaptureError::setup_from(e)
            }
        })?;
    let blocking: Vec<String> = findings
        .iter()
        .filter(|f| f.severity != Severity::Warning)
        .map(|f| f.to_string())
        .collect();
    for f in findings.iter().filter(|f| f.severity == Severity::Warning) {
        tracing::warn!(region, "{}", f.message);
    }
    if !blocking.is_empty() {
        return Err(CaptureError::setup(blocking.join("\n")));
    }
    let home_cluster = &config.kafka_for(region).brokers;
    let live = config
        .regions
        .keys()
        .filter(|r| *r != region)
        .map(|d| (d.clone(), config.topic(region, d)));
    for (dest, topic) in live.chain(config.dr_topics(region)) {
        let dest = &dest;
        let cluster = config.kafka_for(dest);
        match crate::kafka::check_topics(cluster, &[topic], Duration::from_secs(10)).await {
            Ok(()) => {}
            // another region's cluster being down must not keep this
            // sidecar from starting: the capture side waits for it
            Err(e) if e.is_unreachable() && cluster.brokers != *home_cluster => {
                tracing::warn!(region, destination = %dest, error = %e, "destination cluster unreachable; capture will wait for it");
            }
            Err(e) => {
                let unreachable = e.is_unreachable();
                let cause = Cause::Topics {
                    destination: dest.clone(),
                    source: e,
                };
                return Err(if unreachable {
                    CaptureError::unreachable(cause)
                } else {
                    CaptureError::setup_from(cause)
                });
            }
        }
    }
    Ok(())
}

/// Streams until `shutdown` turns true (then drains and returns `Ok`) or
/// something breaks. `streaming` turns true once the server has answered
/// `START_REPLICATION` (the walsender holds the slot); the caller lowers it.
pub async fn run(
    config: Arc<Config>,
    region: String,
    metrics: Arc<Metrics>,
    streaming: Arc<AtomicBool>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), CaptureError> {
    let region_cfg = config.region(&region)?.clone();
    let client = catalog::connect(&region_cfg.dsn, &region)
        .await
        .map_err(transient("source database"))?;
    let cat = Catalog {
        client: &client,
        region: &region,
    };
    let keys = cat.keys(&config).await.map_err(transient("catalog"))?;
    let db = cat.database_name().await.map_err(transient("catalog"))?;
    let slot_name = config.slot_name(&region);
    let slot = usable_slot(&cat, &region, &slot_name).await?;

    let policy = Policy::compile(&config, &region)?;
    let destinations: Vec<String> = policy.destinations().to_vec();
    let layout = OutletLayout::of(&config, &region, &destinations);
    let dr_key = match layout.has_dr() {
        true => Some(config.dr_key(&region)?),
        false => None,
    };
    let max_in_flight = config.capture.max_in_flight.max(1);
    let outlets =
        tokio::task::block_in_place(|| Outlets::open(&config, &layout.regions, &layout.topics))
            .map_err(transient("kafka producers"))?;

    let declared: HashSet<_> = config.replicated_tables().map(|t| t.name.clone()).collect();
    let mut assembler = Assembler::new(declared, keys, region_cfg.id);
    let mut tracker = AckTracker::new(slot.confirmed_flush);
    let source = Source {
        prefix: config.prefix.clone(),
        region: region.clone(),
        db,
    };

    let mut conn = replication_connection(&region_cfg.dsn, &region).await?;
    let version = cat
        .server_version_num()
        .await
        .map_err(transient("catalog"))?;
    let mut client = client;
    watch_primary(
        &mut conn,
        &mut client,
        &region,
        slot.confirmed_flush,
        &metrics,
    )
    .await?;
    drop(client);
    let command = start_replication_command(
        &slot_name,
        config.publication_name(),
        server_filters_origins(&config, version),
    );
    let (mut reader, mut writer) =
        start_streaming(conn, &command, &slot_name, slot.confirmed_flush).await?;
    tracing::info!(region = %region, slot = %slot_name, from = %slot.confirmed_flush, "capture streaming");
    streaming.store(true, Ordering::Relaxed);

    let mut ctx = Loop {
        config: &config,
        region: &region,
        policy: &policy,
        destinations: &destinations,
        outlets: &outlets,
        source: &source,
        metrics: &metrics,
        tracker: &mut tracker,
        assembler: &mut assembler,
        max_in_flight,
        last_reported: Lsn::ZERO,
        published: vec![0; destinations.len()],
        published_bytes: vec![0; destinations.len()],
        reports: Vec::new(),
        dropped: std::collections::HashMap::new(),
        truncates_kept: HashSet::new(),
        columns_gone: HashSet::new(),
        shape_gone: HashMap::new(),
        filler: Filler::new(&region_cfg.dsn, &region),
        progress_sent: Lsn::ZERO,
        progress_rounds: PROGRESS_ROUNDS,
        progress_at: std::time::Instant::now(),
        counters: counter_columns(&config),
        dr_key: dr_key.as_ref(),
        seals: dr_key
            .as_ref()
            .map(|k| seals::SealLedger::new(&region_cfg.dsn, &region, k)),
        dr_outlets: &layout.dr_outlets,
        at: slot.confirmed_flush,
    };
    let result = ctx.stream(&mut reader, &mut writer, &mut shutdown).await;

    // drain: whatever Kafka has acknowledged gets confirmed before we leave,
    // also when a table's rules stopped the stream — a restart after the
    // fix then resumes at the transaction that stopped it, not before
    if result.as_ref().err().is_none_or(CaptureError::is_setup) {
        ctx.drain(writer).await;
    }
    result
}

/// The region's replication slot, which must exist and not be lost.
async fn usable_slot(
    cat: &Catalog<'_>,
    region: &str,
    slot_name: &str,
) -> Result<catalog::SlotState, CaptureError> {
    let slot = cat
        .slot(slot_name)
        .await
        .map_err(transient("catalog"))?
        .ok_or_else(|| {
            CaptureError::setup(format!(
                "replication slot {slot_name} does not exist in region {region}; run pgrelay setup"
            ))
        })?;
    if slot.is_lost() {
        return Err(CaptureError::setup(catalog::lost_slot_message(
            region, slot_name,
        )));
    }
    Ok(slot)
}

/// Where the records go: one outlet per live destination, then one per DR
/// region (its sealed copies' topic); and per table with DR copies, the
/// outlets of its DR topics.
#[derive(Debug, PartialEq, Eq)]
struct OutletLayout {
    /// The live destinations: the first outlets.
    live: usize,
    /// The region of each outlet.
    regions: Vec<String>,
    /// The topic of each outlet.
    topics: Vec<String>,
    dr_outlets: HashMap<TableName, Vec<usize>>,
}

impl OutletLayout {
    /// `destinations`: the policy's, in its order.
    fn of(config: &Config, region: &str, destinations: &[String]) -> OutletLayout {
        // DR copies: sealed to their own topics, after the live destinations
        let dr_topics = config.dr_topics(region);
        let dr_outlets: HashMap<TableName, Vec<usize>> = config
            .tables
            .iter()
            .map(|t| {
                let outlets = t
                    .dr_regions(region)
                    .filter_map(|d| dr_topics.iter().position(|(r, _)| r == d))
                    .map(|i| destinations.len() + i)
                    .collect::<Vec<_>>();
                (t.name.clone(), outlets)
            })
            .filter(|(_, outlets)| !outlets.is_empty())
            .collect();
        let regions: Vec<String> = destinations
            .iter()
            .cloned()
            .chain(dr_topics.iter().map(|(d, _)| d.clone()))
            .collect();
        let topics: Vec<String> = destinations
            .iter()
            .map(|d| config.topic(region, d))
            .chain(dr_topics.iter().map(|(_, t)| t.clone()))
            .collect();
        OutletLayout {
            live: destinations.len(),
            regions,
            topics,
            dr_outlets,
        }
    }

    /// Whether some outlet holds DR copies (the region's DR key is needed).
    fn has_dr(&self) -> bool {
        self.regions.len() > self.live
    }
}

/// The `counter` merge columns of each table that has some.
fn counter_columns(config: &Config) -> HashMap<TableName, Vec<String>> {
    config
        .tables
        .iter()
        .filter_map(|t| {
            let c: Vec<String> = t
                .merge
                .iter()
                .filter(|m| m.kind == crate::config::MergeKind::Counter)
                .map(|m| m.column.clone())
                .collect();
            (!c.is_empty()).then(|| (t.name.clone(), c))
        })
        .collect()
}

/// The replication connection to the region's primary (`dsn`: the region's).
async fn replication_connection(dsn: &str, region: &str) -> Result<ReplConnection, CaptureError> {
    let params = ConnParams::from_dsn(dsn, &format!("pgrelay_{region}")).map_err(|e| {
        CaptureError::from(CaptureErrorKind::Setup {
            message: format!("region {region} dsn: {e}"),
            table: None,
            source: Some(e.into()),
        })
    })?;
    ReplConnection::connect(&params).await.map_err(|e| {
        CaptureError::transient(
            format!(
                "region {region}: replication connection to {}",
                params.target()
            ),
            e,
        )
    })
}

/// Sends `command` (`START_REPLICATION` of `slot_name`, from `from`): the
/// connection becomes the stream's reader and writer.
async fn start_streaming(
    conn: ReplConnection,
    command: &str,
    slot_name: &str,
    from: Lsn,
) -> Result<(ReplReader, ReplWriter), CaptureError> {
    conn.start_replication(command).await.map_err(|e| {
        let doing = match e.sqlstate() {
            Some("55006") => format!("replication slot {slot_name} is in use by another process"),
            _ => "START_REPLICATION".to_string(),
        };
        CaptureError::from(CaptureErrorKind::Transient {
            doing,
            lsn: Some(from),
            table: None,
            source: e.into(),
        })
    })
}

impl Loop<'_> {
    /// After the stream ended cleanly or on a table's rules: waits briefly
    /// for Kafka, confirms what it acknowledged and closes the stream.
    async fn drain(&mut self, mut writer: ReplWriter) {
        tokio::task::block_in_place(|| self.outlets.flush(Duration::from_secs(10)));
        // a failure here only keeps its record unconfirmed
        let _ = self.poll_deliveries();
        let _ = self.send_status(&mut writer, false).await;
        writer.close().await;
        tracing::info!(region = %self.region, confirmed = %self.tracker.confirmed(), "capture stopped");
    }
}

/// Whether the walsender drops changes that carry a replication origin
/// (`relay.capture.origin_filter = "server"` on PostgreSQL 16+). Otherwise
/// the assembler skips pgrelay's own transactions by their Origin message.
pub fn server_filters_origins(config: &Config, server_version_num: i32) -> bool {
    config.capture.origin_filter == crate::config::OriginFilter::Server
        && crate::source::server::origin_filter(server_version_num)
}

/// `START_REPLICATION` for pgoutput (protocol 1; `origin 'none'` when the
/// server is to drop changes that carry a replication origin).
pub fn start_replication_command(slot: &str, publication: &str, origin_none: bool) -> String {
    format!(
        "START_REPLICATION SLOT {} LOGICAL 0/0 (proto_version '1', publication_names {}{})",
        crate::event::quote_ident(slot),
        crate::event::quote_literal(&crate::event::quote_ident(publication)),
        if origin_none { ", origin 'none'" } else { "" },
    )
}

/// Who the primary is (`IDENTIFY_SYSTEM`), compared with the one streamed
/// from before: a failover is recorded in the region's `pgrelay.events`,
/// counted and logged (see [`crate::failover`]).
async fn watch_primary(
    conn: &mut ReplConnection,
    client: &mut tokio_postgres::Client,
    region: &str,
    confirmed: Lsn,
    metrics: &Metrics,
) -> Result<(), CaptureError> {
    let rows = conn
        .simple_query("IDENTIFY_SYSTEM")
        .await
        .map_err(transient("IDENTIFY_SYSTEM"))?;
    let protocol = |what: String| transient("IDENTIFY_SYSTEM")(ConnError::Protocol(what));
    let (identity, wal_end) = rows
        .first()
        .ok_or_else(|| protocol("no row returned".into()))
        .and_then(|r| crate::failover::parse_identify(r).map_err(protocol))?;
    // the old primary's WAL end as this process last heard it
    let old_wal_end = metrics
        .get(&metric::CAPTURE_SERVER_WAL_END, &[("region", region)])
        .map(|v| Lsn(v as u64));
    // where the current timeline began (a promotion), to tell a carried
    // slot from a new one
    let switchpoint = if identity.timeline > 1 {
        conn.simple_query(&format!("TIMELINE_HISTORY {}", identity.timeline))
            .await
            .ok()
            .and_then(|rows| rows.into_iter().next())
            .and_then(|row| row.get(1).cloned().flatten())
            .and_then(|content| crate::failover::parse_switchpoint(&content))
    } else {
        None
    };
    let event = crate::failover::observe(
        client,
        region,
        &identity,
        confirmed,
        old_wal_end,
        switchpoint,
    )
    .await
    .map_err(transient("recording the primary's identity"))?;
    metrics.set(
        &metric::SOURCE_TIMELINE,
        &[("region", region)],
        identity.timeline as f64,
    );
    metrics.add(
        &metric::FAILOVERS,
        &[("region", region)],
        u64::from(event.is_some()),
    );
    if let Some(e) = &event {
        tracing::warn!(
            region,
            old_system = %e.previous.system_id,
            old_timeline = e.previous.timeline,
            new_system = %e.current.system_id,
            new_timeline = e.current.timeline,
            confirmed = %e.confirmed,
            old_wal_end = ?e.old_wal_end.map(|l| l.to_string()),
            "failover: a new primary behind the region (recorded in pgrelay.events)"
        );
    }
    set_server_wal_end(metrics, region, wal_end);
    Ok(())
}

fn set_server_wal_end(metrics: &Metrics, region: &str, lsn: Lsn) {
    metrics.set(
        &metric::CAPTURE_SERVER_WAL_END,
        &[("region", region)],
        lsn.0 as f64,
    );
}

/// One run's streaming state; its methods are in `stream`.
struct Loop<'a> {
    config: &'a Config,
    region: &'a str,
    policy: &'a Policy,
    destinations: &'a [String],
    outlets: &'a Outlets,
    source: &'a Source,
    metrics: &'a Metrics,
    tracker: &'a mut AckTracker,
    assembler: &'a mut Assembler,
    max_in_flight: usize,
    last_reported: Lsn,
    /// Counters kept locally on the hot path, flushed to `metrics` with
    /// each status update.
    published: Vec<u64>,
    /// Bytes of those records (key, value, headers), by destination.
    published_bytes: Vec<u64>,
    /// Delivery reports being handled (kept to reuse the allocation).
    reports: Vec<Delivery>,
    dropped: std::collections::HashMap<(String, usize, &'static str), u64>,
    /// `partitioned` tables whose truncate was kept home (logged once each).
    truncates_kept: HashSet<TableName>,
    /// Left-out columns found gone from their table (`source::fill`),
    /// warned about once each.
    columns_gone: HashSet<(TableName, String)>,
    /// Per table: columns of the stream's current shape that the source's
    /// table no longer has (`Loop::note_columns_gone`), left out of every
    /// change of that shape.
    shape_gone: HashMap<TableName, Vec<String>>,
    /// Reads back what a row moved to a new key left out of the stream.
    filler: Filler,
    /// The LSN of the last progress records sent, and how many more status
    /// ticks may send them (see [`Loop::send_progress`]).
    progress_sent: Lsn,
    progress_rounds: u8,
    /// When the last progress records were sent.
    progress_at: std::time::Instant,
    /// The `counter` merge columns of each table that has some.
    counters: std::collections::HashMap<TableName, Vec<String>>,
    /// This region's DR key, when some table keeps DR copies.
    dr_key: Option<&'a DrKey>,
    /// The count of records sealed under `dr_key`.
    seals: Option<seals::SealLedger>,
    /// Per table with DR copies: the outlets of its DR topics.
    dr_outlets: &'a HashMap<TableName, Vec<usize>>,
    /// Where the stream is: the start of the last WAL data read (before
    /// the first, the slot's confirmed LSN). Errors name it.
    at: Lsn,
}

/// Status ticks after the last published change (and after a start) that
/// send progress records when the confirmed LSN has moved.
const PROGRESS_ROUNDS: u8 = 3;

/// Then, how often progress records go out while the confirmed LSN moves.
const IDLE_PROGRESS: Duration = Duration::from_secs(5);

/// How often delivery reports are collected while records are in flight
/// and nothing else wakes the capture loop.
const ACK_POLL: Duration = Duration::from_millis(5);

/// Replication messages handled per wake-up, at most, before the loop
/// looks at its timers again.
const BURST: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    /// The tables of [`config`], three regions.
    const TABLES: &str = r#"
[[tables]]
name = "stock"
class = "global"
columns = [
    { name = "count", merge = "counter" },
    { name = "tags", merge = "union" },
]

[[tables]]
name = "orders"
class = "owned"
owner = "us"
dr = ["eu", "cn"]

[[tables]]
name = "invoices"
class = "owned"
owner = "us"
dr = ["cn"]
"#;

    fn config() -> Config {
        crate::config::test_config(&["us", "eu", "cn"], TABLES)
    }

    fn destinations(region: &str) -> Vec<String> {
        ["cn", "eu", "us"]
            .into_iter()
            .filter(|d| *d != region)
            .map(String::from)
            .collect()
    }

    #[test]
    fn dr_outlets_follow_the_live_destinations() {
        let config = config();
        let layout = OutletLayout::of(&config, "us", &destinations("us"));
        assert!(layout.has_dr());
        assert_eq!(layout.regions, ["cn", "eu", "cn", "eu"]);
        assert_eq!(
            layout.topics,
            [
                "pgrelay.us.cn",
                "pgrelay.us.eu",
                "pgrelay.dr.us.cn",
                "pgrelay.dr.us.eu"
            ]
        );
        assert_eq!(
            layout.dr_outlets,
            HashMap::from([
                (TableName::new("public", "orders"), vec![2, 3]),
                (TableName::new("public", "invoices"), vec![2]),
            ])
        );
        // a region that owns no table with DR copies seals nothing
        let layout = OutletLayout::of(&config, "eu", &destinations("eu"));
        assert!(!layout.has_dr());
        assert_eq!(layout.regions, ["cn", "us"]);
        assert_eq!(layout.topics, ["pgrelay.eu.cn", "pgrelay.eu.us"]);
        assert!(layout.dr_outlets.is_empty());
    }

    #[test]
    fn counter_columns_are_listed_per_table() {
        let config = config();
        assert_eq!(
            counter_columns(&config),
            HashMap::from([(TableName::new("public", "stock"), vec!["count".to_string()])])
        );
    }
}
