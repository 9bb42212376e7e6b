//! `pgrelay status`: one row per region pair (source -> destination).
//!
//! Read from the databases themselves, so it works from any host that can
//! reach them, whether or not the sidecars run:
//!
//! - source side: current WAL position, the slot's confirmed LSN, whether
//!   a sidecar is streaming from it, WAL retained by the slot;
//! - destination side: the per-source watermark (`pgrelay.watermarks`) and
//!   the dead-letter depth (records past the replay progress).
//!
//! `backlog` is the number of records in the pair's topic that the
//! destination has not applied yet (topic end minus the offsets stored in
//! the destination). `lag_seconds` is 0 when the source's slot has confirmed
//! everything up to the current WAL position (less than 16 MiB behind:
//! unrelated WAL traffic is always in flight) and the backlog is empty;
//! otherwise it is the age of the newest change the destination applied from
//! that source. State: `failed` when a database is
//! unreachable or no sidecar streams from the slot, `lagging` past the
//! `[relay.status]` thresholds or while the source's primary holds its
//! changes back for a standby (`source_held`, see [`standby`]), else
//! `active`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::config::Config;
use crate::event::Lsn;
use crate::metrics::catalog as metric;
use crate::source::catalog::{self, Catalog};

mod render;
pub mod standby;
pub use render::{render, render_dr, render_egress, render_verify};

const IDLE_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PairStatus {
    pub source: String,
    pub destination: String,
    pub source_lsn: Option<String>,
    pub confirmed_lsn: Option<String>,
    pub lag_bytes: Option<u64>,
    pub lag_seconds: Option<f64>,
    pub retained_wal_bytes: Option<i64>,
    pub watermark_hlc: Option<i64>,
    pub watermark_commit_time: Option<String>,
    /// Records in the pair's topic not yet applied at the destination.
    pub backlog_records: Option<i64>,
    pub dead_letters: Option<i64>,
    pub state: &'static str,
    pub problems: Vec<String>,
    /// Why the destination holds the pair's records back, if it does
    /// (the pair is `lagging` then).
    pub held: Option<String>,
    /// Why the blast-radius breaker holds the pair's changes, if it does
    /// (the pair is `frozen` then).
    pub frozen: Option<String>,
    /// Which side's numbers a sidecar's own view holds (`"source"` or
    /// `"destination"`); absent when both sides were read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seen_from: Option<&'static str>,
    /// Bytes the source's capture side published to the destination (key,
    /// value and headers of each record) since the sidecar started, and
    /// their rate over the last minute; in a sidecar's view only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress: Option<crate::overview::Egress>,
    /// Why the source's primary sends the capture side nothing: a standby
    /// named in `synchronized_standby_slots` is down or far behind (the
    /// pair is `lagging` then).
    pub source_held: Option<String>,
    /// The source region is fenced (`pgrelay fence`): since when, and why.
    pub source_fenced: Option<String>,
    /// The source region's last recorded failover (`pgrelay.events`).
    pub source_last_failover: Option<String>,
    /// Why the pair is `rebuilding` (a failover that lost the slot, until a
    /// resync to the destination has been applied).
    pub rebuilding: Option<String>,
    /// When the destination's sidecar last verified its region against
    /// the source (`[verify] interval`), and the differences it found
    /// between the two.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_verify: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify_differences: Option<u64>,
}

#[derive(Default)]
struct SourceSide {
    current: Option<Lsn>,
    confirmed: Option<Lsn>,
    retained: Option<i64>,
    problem: Option<String>,
    fenced: Option<String>,
    last_failover: Option<String>,
    unrecovered: Option<(String, Vec<String>)>,
    /// The physical slots the walsender may wait for (PostgreSQL 17+).
    standby_slots: Vec<standby::StandbySlot>,
    /// destination -> what the sidecar last left in `pgrelay.egress`
    egress: BTreeMap<String, crate::overview::Egress>,
}

#[derive(Default)]
struct DestSide {
    /// source -> (hlc, commit time text, age of the commit in seconds)
    watermarks: BTreeMap<String, (i64, Option<String>, Option<f64>)>,
    /// source -> records in the source's topic not yet applied here
    backlog: BTreeMap<String, i64>,
    dead_letters: Option<i64>,
    /// source -> why its records are held back
    held: BTreeMap<String, String>,
    /// source -> why the breaker holds its changes
    frozen: BTreeMap<String, String>,
    problem: Option<String>,
    /// The region's sidecar's last periodic verify.
    verify: Option<crate::verify::schedule::LastRun>,
}

async fn source_side(config: &Config, region: &str) -> SourceSide {
    let dsn = &config.regions[region].dsn;
    let client = match catalog::connect(dsn, region).await {
        Ok(c) => c,
        Err(e) => {
            return SourceSide {
                problem: Some(e.to_string()),
                ..Default::default()
            }
        }
    };
    let cat = Catalog {
        client: &client,
        region,
    };
    let fenced = match crate::fence::current(&client).await {
        Ok(f) => f.map(|(since, reason)| match reason {
            Some(r) => format!("since {since}: {r}"),
            None => format!("since {since}"),
        }),
        Err(e) => Some(format!("unknown ({})", crate::source::pg_error::reason(&e))),
    };
    let last_failover = crate::failover::last_event(&client).await.ok().flatten();
    let unrecovered = crate::failover::unrecovered(&client).await.ok().flatten();
    let egress = stored_egress(config, &client).await;
    let standby_slots = standby::read(
        &client,
        &config.slot_name(region),
        config.status.lagging_bytes,
    )
    .await;
    let side = slot_side(config, region, &cat).await;
    SourceSide {
        standby_slots,
        fenced,
        last_failover,
        unrecovered,
        egress,
        ..side
    }
}

/// The egress figures a region's sidecar left (none before `setup` made
/// the table, or before a sidecar ran).
async fn stored_egress(
    config: &Config,
    client: &tokio_postgres::Client,
) -> BTreeMap<String, crate::overview::Egress> {
    let Ok(rows) = client.query(crate::overview::EGRESS_READ_SQL, &[]).await else {
        return BTreeMap::new();
    };
    rows.iter()
        .map(|r| {
            let age = Duration::from_secs_f64(r.get::<_, f64>(3).max(0.0));
            let egress = crate::overview::stored_egress(
                r.get(1),
                r.get(2),
                age,
                config.status.egress_price_per_gb,
            );
            (r.get::<_, String>(0), egress)
        })
        .collect()
}

async fn slot_side(config: &Config, region: &str, cat: &Catalog<'_>) -> SourceSide {
    match cat.slot(&config.slot_name(region)).await {
        Ok(Some(s)) => SourceSide {
            current: Some(s.current_wal),
            confirmed: Some(s.confirmed_flush),
            retained: Some(s.retained_bytes),
            fenced: None,
            last_failover: None,
            unrecovered: None,
            standby_slots: Vec::new(),
            egress: BTreeMap::new(),
            problem: if s.is_lost() {
                Some(catalog::lost_slot_message(
                    region,
                    &config.slot_name(region),
                ))
            } else {
                (!s.active).then(|| {
                    format!(
                        "no sidecar is streaming from slot {}",
                        config.slot_name(region)
                    )
                })
            },
        },
        Ok(None) => SourceSide {
            problem: Some(format!(
                "slot {} does not exist; run pgrelay setup --region {region}",
                config.slot_name(region)
            )),
            ..Default::default()
        },
        Err(e) => SourceSide {
            problem: Some(e.to_string()),
            ..Default::default()
        },
    }
}

async fn dest_side(config: &Config, region: &str) -> DestSide {
    let dsn = &config.regions[region].dsn;
    let client = match catalog::connect(dsn, region).await {
        Ok(c) => c,
        Err(e) => {
            return DestSide {
                problem: Some(e.to_string()),
                ..Default::default()
            }
        }
    };
    let mut out = DestSide {
        verify: crate::verify::schedule::last_run(&client, region).await,
        ..DestSide::default()
    };
    match client
        .query(
            "SELECT source_region, hlc, commit_time::text, \
             extract(epoch FROM now() - commit_time)::float8 FROM pgrelay.watermarks",
            &[],
        )
        .await
    {
        Ok(rows) => {
            for r in rows {
                out.watermarks
                    .insert(r.get(0), (r.get(1), r.get(2), r.get(3)));
            }
        }
        Err(e) => {
            out.problem = Some(format!(
                "{region} database: reading watermarks: {}",
                crate::source::pg_error::reason(&e)
            ))
        }
    }
    if let Ok(rows) = client
        .query(
            "SELECT source_region, string_agg(held_reason, '; ') FROM pgrelay.watermark_parts \
             WHERE held_reason IS NOT NULL GROUP BY source_region",
            &[],
        )
        .await
    {
        out.held = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    }
    // absent before setup created it: then nothing is frozen
    if let Ok(rows) = client
        .query(
            "SELECT source_region, reason || ' (tripped ' || tripped_at::text || ')' \
             FROM pgrelay.breakers WHERE state = 'frozen'",
            &[],
        )
        .await
    {
        out.frozen = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    }
    let consumed = |topic: String| {
        let client = &client;
        async move {
            client
                .query_one(
                    "SELECT coalesce(sum(next_offset), 0)::bigint FROM pgrelay.offsets WHERE topic = $1",
                    &[&topic],
                )
                .await
                .map(|r| r.get::<_, i64>(0))
                .unwrap_or(0)
        }
    };
    let cluster = config.kafka_for(region);
    let timeout = Duration::from_secs(5);
    let dlq_topic = config.dlq_topic(region);
    let replayed = consumed(dlq_topic.clone()).await;
    match crate::kafka::topic_end(cluster, &dlq_topic, timeout).await {
        Ok(total) => out.dead_letters = Some((total - replayed).max(0)),
        Err(e) => {
            out.problem.get_or_insert(format!("region {region}: {e}"));
            return out;
        }
    }
    for source in config.regions.keys().filter(|s| *s != region) {
        let topic = config.topic(source, region);
        let applied = consumed(topic.clone()).await;
        match crate::kafka::topic_end(cluster, &topic, timeout).await {
            Ok(end) => {
                out.backlog.insert(source.clone(), (end - applied).max(0));
            }
            Err(e) => {
                out.problem.get_or_insert(format!("region {region}: {e}"));
                // the cluster is unreachable: every further call would
                // wait out its timeout too
                break;
            }
        }
        if let Some(lost) = records_lost(&client, cluster, &topic, timeout).await {
            out.problem.get_or_insert(format!(
                "region {region}: {lost}: those changes are lost here; run pgrelay resync --region {source} --to {region}"
            ));
        }
    }
    out
}

/// Names the partitions of `topic` whose next record to apply was deleted by
/// Kafka's retention before it was applied (stored offset below the
/// partition's first offset).
async fn records_lost(
    client: &tokio_postgres::Client,
    cluster: &crate::config::KafkaCluster,
    topic: &str,
    timeout: Duration,
) -> Option<String> {
    let starts = crate::kafka::partition_starts(cluster, topic, timeout)
        .await
        .ok()?;
    let stored: BTreeMap<i32, i64> = client
        .query(
            "SELECT kafka_partition, next_offset FROM pgrelay.offsets WHERE topic = $1",
            &[&topic],
        )
        .await
        .ok()?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let lost: Vec<String> = starts
        .iter()
        .filter_map(|(p, start)| {
            // a partition with nothing stored starts at the oldest record held
            let next = *stored.get(p)?;
            (next < *start).then(|| format!("{topic}[{p}] offsets {next}..{start}"))
        })
        .collect();
    (!lost.is_empty()).then(|| {
        format!(
            "records deleted by Kafka retention before they were applied ({})",
            lost.join(", ")
        )
    })
}

/// 0 active, 1 lagging, 2 failed, 3 frozen, 4 rebuilding (for the
/// `pgrelay_pair_state` gauge).
pub fn state_code(state: &str) -> f64 {
    match state {
        "active" => 0.0,
        "lagging" => 1.0,
        "frozen" => 3.0,
        "rebuilding" => 4.0,
        _ => 2.0,
    }
}

/// Sets the gauges of the pairs that touch `region` (what its sidecar can
/// see: its own database and its Kafka cluster) and returns those pairs:
/// outgoing ones with the source side's numbers, incoming ones with the
/// destination side's.
pub async fn export_local(
    config: &Config,
    region: &str,
    metrics: &crate::metrics::Metrics,
) -> Vec<PairStatus> {
    let src = source_side(config, region).await;
    let dst = dest_side(config, region).await;
    export_region(metrics, region, &src, &dst);
    let mut pairs = outgoing_pairs(config, region, &src, metrics);
    pairs.extend(incoming_pairs(config, region, &dst, metrics));
    pairs
}

/// The region's own gauges: WAL not yet confirmed and retained by its
/// slot, its dead letters, the standby slots holding its changes back.
fn export_region(
    metrics: &crate::metrics::Metrics,
    region: &str,
    src: &SourceSide,
    dst: &DestSide,
) {
    let labels = [("region", region)];
    if let (Some(c), Some(f)) = (src.current, src.confirmed) {
        metrics.set(
            &metric::CAPTURE_LAG_BYTES,
            &labels,
            c.0.saturating_sub(f.0) as f64,
        );
    }
    if let Some(r) = src.retained {
        metrics.set(&metric::SLOT_RETAINED_WAL_BYTES, &labels, r as f64);
    }
    if let Some(n) = dst.dead_letters {
        metrics.set(&metric::DEAD_LETTERS, &labels, n as f64);
    }
    for slot in &src.standby_slots {
        metrics.set(
            &metric::CAPTURE_HELD_BY_STANDBY,
            &[("region", region), ("slot", slot.name.as_str())],
            if slot.holding.is_some() { 1.0 } else { 0.0 },
        );
    }
}

/// The pairs `region` sends to, as its source side sees them; sets each
/// one's rebuilding gauge.
fn outgoing_pairs(
    config: &Config,
    region: &str,
    src: &SourceSide,
    metrics: &crate::metrics::Metrics,
) -> Vec<PairStatus> {
    let source_held = standby::describe(&src.standby_slots);
    let mut pairs = Vec::new();
    for destination in config.regions.keys().filter(|d| *d != region) {
        // a failover that came without the slot, and no resync to this
        // destination since: what it lost is not on its way yet (once the
        // resync is sent, the destination's backlog tells the rest)
        let rebuilding = src
            .unrecovered
            .as_ref()
            .and_then(|u| crate::failover::rebuilding(region, destination, Some(u), Some(0)));
        metrics.set(
            &metric::PAIR_REBUILDING,
            &[("source", region), ("destination", destination.as_str())],
            if rebuilding.is_some() { 1.0 } else { 0.0 },
        );
        pairs.push(outgoing_pair(
            config,
            region,
            destination,
            src,
            source_held.clone(),
            rebuilding,
        ));
    }
    pairs
}

/// One pair `region` sends to, from its source side: `source_held`, why
/// standbys hold the region's changes back; `rebuilding`, what a failover
/// lost that has not been sent again.
fn outgoing_pair(
    config: &Config,
    region: &str,
    destination: &str,
    src: &SourceSide,
    source_held: Option<String>,
    rebuilding: Option<String>,
) -> PairStatus {
    let lag_bytes = match (src.current, src.confirmed) {
        (Some(c), Some(f)) => Some(c.0.saturating_sub(f.0)),
        _ => None,
    };
    let state = if src.problem.is_some() || lag_bytes.is_none() {
        "failed"
    } else if rebuilding.is_some() {
        "rebuilding"
    } else if source_held.is_some() || lag_bytes.unwrap_or(0) > config.status.lagging_bytes {
        "lagging"
    } else {
        "active"
    };
    PairStatus {
        source: region.to_string(),
        destination: destination.to_string(),
        source_lsn: src.current.map(|l| l.to_string()),
        confirmed_lsn: src.confirmed.map(|l| l.to_string()),
        lag_bytes,
        lag_seconds: None,
        retained_wal_bytes: src.retained,
        watermark_hlc: None,
        watermark_commit_time: None,
        backlog_records: None,
        dead_letters: None,
        state,
        problems: src.problem.clone().into_iter().collect(),
        held: None,
        frozen: None,
        seen_from: Some("source"),
        egress: None,
        source_held,
        source_fenced: src.fenced.clone(),
        source_last_failover: src.last_failover.clone(),
        rebuilding,
        last_verify: None,
        verify_differences: None,
    }
}

/// The pairs `region` receives from, as its destination side sees them;
/// sets each one's state, backlog and lag gauges.
fn incoming_pairs(
    config: &Config,
    region: &str,
    dst: &DestSide,
    metrics: &crate::metrics::Metrics,
) -> Vec<PairStatus> {
    let mut pairs = Vec::new();
    for source in config.regions.keys().filter(|s| *s != region) {
        let labels = [("source", source.as_str()), ("destination", region)];
        let pair = incoming_pair(config, region, source, dst);
        metrics.set(&metric::PAIR_STATE, &labels, state_code(pair.state));
        if let Some(b) = pair.backlog_records {
            metrics.set(&metric::APPLY_BACKLOG_RECORDS, &labels, b as f64);
        }
        if let Some(lag) = apply_lag(dst, source) {
            metrics.set(&metric::APPLY_LAG_SECONDS, &labels, lag);
        }
        pairs.push(pair);
    }
    pairs
}

/// How far `region` is behind `source`, when its watermark is known: 0
/// with nothing left to apply, else the age of the newest change applied.
fn apply_lag(dst: &DestSide, source: &str) -> Option<f64> {
    let (_, _, Some(age)) = dst.watermarks.get(source)? else {
        return None;
    };
    Some(if dst.backlog.get(source).copied().unwrap_or(0) == 0 {
        0.0
    } else {
        *age
    })
}

/// One pair `region` receives from `source`, from its destination side.
fn incoming_pair(config: &Config, region: &str, source: &str, dst: &DestSide) -> PairStatus {
    let backlog = dst.backlog.get(source).copied();
    let age = dst.watermarks.get(source).and_then(|w| w.2);
    let state = if dst.problem.is_some() || backlog.is_none() {
        "failed"
    } else if dst.frozen.contains_key(source) {
        "frozen"
    } else if dst.held.contains_key(source)
        || backlog.unwrap_or(0) > 0
            && age.unwrap_or(f64::MAX) > config.status.lagging_after.as_secs_f64()
    {
        "lagging"
    } else {
        "active"
    };
    let wm = dst.watermarks.get(source);
    // unknown while the backlog cannot be read
    let lag_seconds = apply_lag(dst, source).filter(|_| backlog.is_some());
    PairStatus {
        source: source.to_string(),
        destination: region.to_string(),
        source_lsn: None,
        confirmed_lsn: None,
        lag_bytes: None,
        lag_seconds,
        retained_wal_bytes: None,
        watermark_hlc: wm.map(|w| w.0),
        watermark_commit_time: wm.and_then(|w| w.1.clone()),
        backlog_records: backlog,
        dead_letters: dst.dead_letters,
        state,
        problems: dst.problem.clone().into_iter().collect(),
        held: dst.held.get(source).cloned(),
        frozen: dst.frozen.get(source).map(|reason| {
            format!(
                "breaker: {reason}; pgrelay breaker release|discard --region {region} --source {source}"
            )
        }),
        seen_from: Some("destination"),
        egress: None,
        source_held: None,
        source_fenced: None,
        source_last_failover: None,
        rebuilding: None,
        last_verify: dst.verify.as_ref().map(|v| v.at.clone()),
        verify_differences: dst
            .verify
            .as_ref()
            .and_then(|v| v.by_peer.get(source).copied()),
    }
}

/// Collects every pair's status.
pub async fn collect(config: &Config) -> Vec<PairStatus> {
    let mut sources = BTreeMap::new();
    let mut dests = BTreeMap::new();
    for r in config.regions.keys() {
        sources.insert(r.clone(), source_side(config, r).await);
        dests.insert(r.clone(), dest_side(config, r).await);
    }
    let mut out = Vec::new();
    for s in config.regions.keys() {
        for d in config.regions.keys().filter(|d| *d != s) {
            let src = &sources[s];
            let dst = &dests[d];
            let lag_bytes = match (src.current, src.confirmed) {
                (Some(c), Some(f)) => Some(c.0.saturating_sub(f.0)),
                _ => None,
            };
            let wm = dst.watermarks.get(s);
            let backlog = dst.backlog.get(s).copied();
            let lag_seconds = match (lag_bytes, backlog) {
                (Some(b), Some(0)) if b < IDLE_BYTES => Some(0.0),
                (Some(b), None) if b < IDLE_BYTES => Some(0.0),
                _ => wm.and_then(|w| w.2),
            };
            let mut problems = Vec::new();
            problems.extend(src.problem.clone());
            problems.extend(dst.problem.clone());
            let held = dst.held.get(s).cloned();
            let frozen = dst.frozen.get(s).map(|reason| {
                format!(
                    "breaker: {reason}; pgrelay breaker release|discard --region {d} --source {s}"
                )
            });
            let rebuilding = crate::failover::rebuilding(s, d, src.unrecovered.as_ref(), backlog);
            let source_held = standby::describe(&src.standby_slots);
            let state = if !problems.is_empty() {
                "failed"
            } else if frozen.is_some() {
                "frozen"
            } else if rebuilding.is_some() {
                "rebuilding"
            } else if held.is_some()
                || source_held.is_some()
                || lag_bytes.unwrap_or(0) > config.status.lagging_bytes
                || lag_seconds.unwrap_or(0.0) > config.status.lagging_after.as_secs_f64()
            {
                "lagging"
            } else {
                "active"
            };
            out.push(PairStatus {
                source: s.clone(),
                destination: d.clone(),
                source_lsn: src.current.map(|l| l.to_string()),
                confirmed_lsn: src.confirmed.map(|l| l.to_string()),
                lag_bytes,
                lag_seconds,
                retained_wal_bytes: src.retained,
                watermark_hlc: wm.map(|w| w.0),
                watermark_commit_time: wm.and_then(|w| w.1.clone()),
                backlog_records: backlog,
                dead_letters: dst.dead_letters,
                state,
                problems,
                held,
                frozen,
                seen_from: None,
                egress: src.egress.get(d).copied(),
                source_held,
                source_fenced: src.fenced.clone(),
                source_last_failover: src.last_failover.clone(),
                rebuilding,
                last_verify: dst.verify.as_ref().map(|v| v.at.clone()),
                verify_differences: dst.verify.as_ref().and_then(|v| v.by_peer.get(s).copied()),
            });
        }
    }
    out
}

/// One DR pair: how many sealed copies of `home`'s changes the vault in
/// `dr` has not stored yet (the recovery point, in records), `None` when
/// it cannot be read.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DrStatus {
    pub home: String,
    pub dr: String,
    pub behind_records: Option<i64>,
    pub problem: Option<String>,
}

/// The DR pairs of `config` and their vaults' backlog.
pub async fn collect_dr(config: &Config) -> Vec<DrStatus> {
    let mut out = Vec::new();
    for home in config.regions.keys() {
        for (dr, topic) in config.dr_topics(home) {
            let end = crate::kafka::topic_end(
                config.kafka_for(&dr),
                &topic,
                std::time::Duration::from_secs(5),
            )
            .await;
            let stored = async {
                let client = catalog::connect(&config.region(&dr).ok()?.dsn, &dr)
                    .await
                    .ok()?;
                client
                    .query_one(
                        "SELECT coalesce(sum(next_offset), 0)::bigint FROM pgrelay.offsets \
                         WHERE topic = $1",
                        &[&topic],
                    )
                    .await
                    .ok()
                    .map(|r| r.get::<_, i64>(0))
            }
            .await;
            let (behind_records, problem) = match (end, stored) {
                (Ok(end), Some(stored)) => (Some((end - stored).max(0)), None),
                (Err(e), _) => (None, Some(format!("kafka: {e}"))),
                (_, None) => (None, Some(format!("region {dr}'s database unreachable"))),
            };
            out.push(DrStatus {
                home: home.clone(),
                dr,
                behind_records,
                problem,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        crate::config::parse(
            r#"
[kafka]
brokers = "k:9092"

[relay.status]
lagging_after = "30s"
lagging_bytes = 1000

[regions.us]
id = 1
dsn = "host=us"
[regions.eu]
id = 2
dsn = "host=eu"
"#,
            "relay.toml",
        )
        .unwrap()
    }

    fn streaming(behind: u64) -> SourceSide {
        SourceSide {
            current: Some(Lsn(5000 + behind)),
            confirmed: Some(Lsn(5000)),
            ..SourceSide::default()
        }
    }

    #[test]
    fn an_outgoing_pair_is_failed_rebuilding_lagging_or_active() {
        let config = config();
        let state = |src: &SourceSide, held: Option<&str>, rebuilding: Option<&str>| {
            outgoing_pair(
                &config,
                "us",
                "eu",
                src,
                held.map(String::from),
                rebuilding.map(String::from),
            )
            .state
        };
        assert_eq!(state(&streaming(10), None, None), "active");
        assert_eq!(state(&streaming(1001), None, None), "lagging");
        assert_eq!(state(&streaming(10), Some("standby s1"), None), "lagging");
        assert_eq!(state(&streaming(10), None, Some("failover")), "rebuilding");
        assert_eq!(state(&SourceSide::default(), None, None), "failed");
        let broken = SourceSide {
            problem: Some("slot gone".into()),
            ..streaming(10)
        };
        let pair = outgoing_pair(&config, "us", "eu", &broken, None, None);
        assert_eq!(pair.state, "failed");
        assert_eq!(pair.problems, ["slot gone"]);
        assert_eq!(pair.lag_bytes, Some(10));
        assert_eq!(pair.seen_from, Some("source"));
    }

    fn applying(backlog: Option<i64>, age: Option<f64>) -> DestSide {
        DestSide {
            watermarks: BTreeMap::from([("us".to_string(), (7, None, age))]),
            backlog: backlog
                .map(|b| BTreeMap::from([("us".to_string(), b)]))
                .unwrap_or_default(),
            ..DestSide::default()
        }
    }

    #[test]
    fn an_incoming_pair_lags_by_its_newest_change_while_records_wait() {
        let config = config();
        let pair = |dst: &DestSide| incoming_pair(&config, "eu", "us", dst);
        let idle = pair(&applying(Some(0), Some(600.0)));
        assert_eq!((idle.state, idle.lag_seconds), ("active", Some(0.0)));
        let behind = pair(&applying(Some(5), Some(60.0)));
        assert_eq!((behind.state, behind.lag_seconds), ("lagging", Some(60.0)));
        let recent = pair(&applying(Some(5), Some(2.0)));
        assert_eq!((recent.state, recent.lag_seconds), ("active", Some(2.0)));
        // the backlog unread: failed, and the lag unknown (the gauge,
        // counting no backlog, reads 0)
        let dst = applying(None, Some(60.0));
        let unknown = pair(&dst);
        assert_eq!((unknown.state, unknown.lag_seconds), ("failed", None));
        assert_eq!(apply_lag(&dst, "us"), Some(0.0));
        assert_eq!(apply_lag(&applying(Some(5), None), "us"), None);
    }

    #[test]
    fn a_frozen_or_held_incoming_pair_says_why() {
        let config = config();
        let mut dst = applying(Some(0), Some(1.0));
        dst.held.insert("us".into(), "schema wait".into());
        let held = incoming_pair(&config, "eu", "us", &dst);
        assert_eq!(held.state, "lagging");
        assert_eq!(held.held.as_deref(), Some("schema wait"));
        dst.frozen.insert("us".into(), "too many deletes".into());
        let frozen = incoming_pair(&config, "eu", "us", &dst);
        assert_eq!(frozen.state, "frozen");
        assert_eq!(
            frozen.frozen.as_deref(),
            Some(
                "breaker: too many deletes; pgrelay breaker release|discard --region eu --source us"
            )
        );
    }
}
