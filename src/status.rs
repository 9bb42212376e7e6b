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
//! `lag_seconds` is 0 when the source's slot has confirmed everything up to
//! the current WAL position (less than 16 MiB behind: unrelated WAL traffic
//! is always in flight); otherwise it is the age of the newest change the
//! destination applied from that source. State: `failed` when a database is
//! unreachable or no sidecar streams from the slot, `lagging` past the
//! `[relay.status]` thresholds, else `active`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::config::Config;
use crate::event::Lsn;
use crate::source::catalog::{self, Catalog};

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
    pub dead_letters: Option<i64>,
    pub state: &'static str,
    pub problems: Vec<String>,
}

#[derive(Default)]
struct SourceSide {
    current: Option<Lsn>,
    confirmed: Option<Lsn>,
    retained: Option<i64>,
    problem: Option<String>,
}

#[derive(Default)]
struct DestSide {
    /// source -> (hlc, commit time text, age of the commit in seconds)
    watermarks: BTreeMap<String, (i64, Option<String>, Option<f64>)>,
    dead_letters: Option<i64>,
    problem: Option<String>,
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
    match cat.slot(&config.slot_name(region)).await {
        Ok(Some(s)) => SourceSide {
            current: Some(s.current_wal),
            confirmed: Some(s.confirmed_flush),
            retained: Some(s.retained_bytes),
            problem: (!s.active).then(|| {
                format!("no sidecar is streaming from slot {}", config.slot_name(region))
            }),
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
    let mut out = DestSide::default();
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
                out.watermarks.insert(r.get(0), (r.get(1), r.get(2), r.get(3)));
            }
        }
        Err(e) => out.problem = Some(format!("{region} database: reading watermarks: {e}")),
    }
    let dlq_topic = config.dlq_topic(region);
    let replayed: i64 = client
        .query_one(
            "SELECT coalesce(sum(next_offset), 0)::bigint FROM pgrelay.offsets WHERE topic = $1",
            &[&dlq_topic],
        )
        .await
        .map(|r| r.get(0))
        .unwrap_or(0);
    if let Ok(total) =
        crate::kafka::topic_end(config.kafka_for(region), &dlq_topic, Duration::from_secs(5)).await
    {
        out.dead_letters = Some((total - replayed).max(0));
    }
    out
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
            let lag_seconds = match lag_bytes {
                Some(b) if b < IDLE_BYTES => Some(0.0),
                _ => wm.and_then(|w| w.2),
            };
            let mut problems = Vec::new();
            problems.extend(src.problem.clone());
            problems.extend(dst.problem.clone());
            let state = if !problems.is_empty() {
                "failed"
            } else if lag_bytes.unwrap_or(0) > config.status.lagging_bytes
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
                dead_letters: dst.dead_letters,
                state,
                problems,
            });
        }
    }
    out
}

/// A plain-text table.
pub fn render(rows: &[PairStatus]) -> String {
    let dash = || "-".to_string();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<12} {:<14} {:<14} {:>12} {:>9} {:<32} {:>5}  state",
        "pair", "source_lsn", "confirmed_lsn", "lag_bytes", "lag_s", "watermark (commit time)", "dlq"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<12} {:<14} {:<14} {:>12} {:>9} {:<32} {:>5}  {}",
            format!("{}->{}", r.source, r.destination),
            r.source_lsn.clone().unwrap_or_else(dash),
            r.confirmed_lsn.clone().unwrap_or_else(dash),
            r.lag_bytes.map(|b| b.to_string()).unwrap_or_else(dash),
            r.lag_seconds.map(|s| format!("{s:.1}")).unwrap_or_else(dash),
            r.watermark_commit_time.clone().unwrap_or_else(dash),
            r.dead_letters.map(|n| n.to_string()).unwrap_or_else(dash),
            r.state
        );
        for p in &r.problems {
            let _ = writeln!(out, "    {p}");
        }
    }
    out
}
