//! The sidecar's own periodic verify (`[verify] interval`): every interval,
//! its region against each peer whose database it can reach (the pairs
//! with its region only), and its region's own leak checks. The result
//! goes to the metrics (`pgrelay_verify_differences{region,peer,table,kind}`,
//! the time and duration of the last run) and to `pgrelay.verify_runs` in
//! the region's database, where `pgrelay status` reads it.
//!
//! Error policy: a run that fails (a peer unreachable, a table missing) is
//! logged and counted (`pgrelay_verify_errors_total`), the gauges keep the
//! last completed run, and the next interval tries again.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use super::run::{self, Options};
use super::{Kind, Report};
use crate::config::{Config, Need};
use crate::metrics::catalog as metric;
use crate::metrics::Metrics;

/// The table a sidecar leaves its last run in (created by `setup`).
pub const RUNS_TABLE_SQL: &str = "CREATE TABLE IF NOT EXISTS pgrelay.verify_runs (\
    region text PRIMARY KEY, finished_at timestamptz NOT NULL, seconds float8 NOT NULL, \
    counts jsonb NOT NULL)";

/// `$1` region, `$2` seconds the run took, `$3` the counts as JSON text.
pub const RECORD_SQL: &str = "INSERT INTO pgrelay.verify_runs AS v (region, finished_at, seconds, counts) \
    VALUES ($1, now(), $2, $3::text::jsonb) \
    ON CONFLICT (region) DO UPDATE SET finished_at = now(), seconds = EXCLUDED.seconds, counts = EXCLUDED.counts";

/// The last run `$1`'s sidecar left: its time (UTC text), its age in
/// seconds, the counts.
pub const READ_SQL: &str =
    "SELECT to_char(finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS\"Z\"'), \
    extract(epoch FROM now() - finished_at)::float8, counts::text \
    FROM pgrelay.verify_runs WHERE region = $1";

/// Differences between `region` and each peer, by (peer, table, kind):
/// every pair compared with a zero for each kind, then what was found
/// (a leak counts against the region the row or value came from).
pub fn counts(report: &Report, region: &str) -> BTreeMap<(String, String, Kind), u64> {
    let mut out = BTreeMap::new();
    for pair in &report.pairs {
        let peer = if pair.a == region {
            &pair.b
        } else if pair.b == region {
            &pair.a
        } else {
            continue;
        };
        for kind in Kind::ALL {
            out.insert((peer.clone(), pair.table.clone(), kind), 0);
        }
    }
    for d in &report.differences {
        let peer = if d.destination == region {
            &d.source
        } else if d.source == region {
            &d.destination
        } else {
            continue;
        };
        *out.entry((peer.clone(), d.table.clone(), d.kind))
            .or_insert(0) += 1;
    }
    out
}

/// The counts as stored in `pgrelay.verify_runs`:
/// `[{"peer", "table", "kind", "differences"}]`.
pub fn counts_json(counts: &BTreeMap<(String, String, Kind), u64>) -> serde_json::Value {
    counts
        .iter()
        .map(|((peer, table, kind), n)| {
            serde_json::json!({"peer": peer, "table": table, "kind": kind, "differences": n})
        })
        .collect()
}

/// Runs verify every `config.verify.interval` until shutdown.
pub async fn keep(
    config: Arc<Config>,
    region: String,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(interval) = config.verify.interval else {
        return;
    };
    // peers whose database this sidecar may read (their `dsn` is set)
    let mut regions = vec![region.clone()];
    regions.extend(
        config
            .regions
            .keys()
            .filter(|r| **r != region && config.require(&[Need::Database(r)]).is_ok())
            .cloned(),
    );
    let opts = Options {
        regions,
        rate: config.verify.rate,
        around: Some(region.clone()),
        ..Options::default()
    };
    let mut shown: BTreeSet<(String, String, Kind)> = BTreeSet::new();
    let mut recorder: Option<tokio_postgres::Client> = None;
    let mut warned = false;
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let started = Instant::now();
        let result = tokio::select! {
            _ = shutdown.changed() => return,
            r = run::run(&config, &opts) => r,
        };
        let report = match result {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(region = %region, error = %e, "periodic verify failed; trying again at the next interval");
                metrics.add(&metric::VERIFY_ERRORS, &[("region", &region)], 1);
                continue;
            }
        };
        let seconds = started.elapsed().as_secs_f64();
        let counts = counts(&report, &region);
        for gone in shown.iter().filter(|k| !counts.contains_key(*k)) {
            let (peer, table, kind) = gone;
            metrics.set(
                &metric::VERIFY_DIFFERENCES,
                &[
                    ("region", &region),
                    ("peer", peer),
                    ("table", table),
                    ("kind", kind.as_str()),
                ],
                0.0,
            );
        }
        for ((peer, table, kind), n) in &counts {
            metrics.set(
                &metric::VERIFY_DIFFERENCES,
                &[
                    ("region", &region),
                    ("peer", peer),
                    ("table", table),
                    ("kind", kind.as_str()),
                ],
                *n as f64,
            );
        }
        shown.extend(counts.keys().cloned());
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        metrics.set(
            &metric::VERIFY_LAST_RUN_TIMESTAMP,
            &[("region", &region)],
            now,
        );
        metrics.set(
            &metric::VERIFY_LAST_RUN_SECONDS,
            &[("region", &region)],
            seconds,
        );
        let differences: u64 = counts.values().sum();
        tracing::info!(region = %region, differences, seconds, "periodic verify done");
        match record(&config, &region, &mut recorder, seconds, &counts).await {
            Ok(()) => warned = false,
            Err(e) if !warned => {
                warned = true;
                tracing::warn!(region = %region, error = %e, "cannot record the verify in pgrelay.verify_runs (run pgrelay setup if the table is missing); pgrelay status shows no verify until this works");
            }
            Err(_) => {}
        }
    }
}

async fn record(
    config: &Config,
    region: &str,
    client: &mut Option<tokio_postgres::Client>,
    seconds: f64,
    counts: &BTreeMap<(String, String, Kind), u64>,
) -> Result<(), String> {
    if client.as_ref().is_none_or(|c| c.is_closed()) {
        let dsn = &config.region(region).map_err(|e| e.to_string())?.dsn;
        *client = Some(
            crate::source::catalog::connect(dsn, region)
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    let c = client.as_ref().expect("connected above");
    c.execute(
        RECORD_SQL,
        &[&region, &seconds, &counts_json(counts).to_string()],
    )
    .await
    .map_err(|e| crate::source::pg_error::reason(&e))?;
    Ok(())
}

/// What `pgrelay status` shows of a region's last periodic verify.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LastRun {
    /// When it finished (UTC).
    pub at: String,
    pub age_seconds: f64,
    /// Differences with each peer.
    pub by_peer: BTreeMap<String, u64>,
}

/// Reads a region's last run (`None` before one, or before `setup` made
/// the table).
pub async fn last_run(client: &tokio_postgres::Client, region: &str) -> Option<LastRun> {
    let row = client.query_opt(READ_SQL, &[&region]).await.ok()??;
    let counts: serde_json::Value = serde_json::from_str(row.get::<_, &str>(2)).ok()?;
    let mut by_peer: BTreeMap<String, u64> = BTreeMap::new();
    for c in counts.as_array()? {
        let peer = c["peer"].as_str().unwrap_or_default().to_string();
        *by_peer.entry(peer).or_insert(0) += c["differences"].as_u64().unwrap_or(0);
    }
    Some(LastRun {
        at: row.get(0),
        age_seconds: row.get(1),
        by_peer,
    })
}
