//! What a sidecar shows people: the JSON behind its status page
//! (`/status.json`) and the egress arithmetic.
//!
//! A sidecar holds only its own region's secrets, so its view is the pairs
//! that touch its region: outgoing ones with its slot's numbers (and the
//! bytes it published), incoming ones with its database's watermarks,
//! backlog and dead letters. Pairs between two other regions are not in
//! `pairs`; the page draws them as not seen from here.
//!
//! Numbers only: regions, LSNs, counts, ages, states, error messages about
//! connections. Never a row value.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::Config;
use crate::metrics::catalog as metric;
use crate::metrics::Metrics;
use crate::status::PairStatus;

/// The status page's data.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Overview {
    /// The region whose sidecar collected this view.
    pub region: String,
    /// When it was collected, in milliseconds since the Unix epoch.
    pub collected_at_ms: u64,
    /// Every configured region.
    pub regions: Vec<String>,
    pub pairs: Vec<PairStatus>,
    /// Dead-letter depth per region, where known.
    pub dead_letters: BTreeMap<String, i64>,
    /// Regions refused writes (fenced); rendered when present.
    pub fenced: Vec<String>,
    /// Recent operational events, newest first; rendered when present.
    pub events: Vec<Event>,
    /// `[relay.status] egress_price_per_gb`, if configured.
    pub egress_price_per_gb: Option<f64>,
    pub lagging_after_seconds: f64,
}

/// An operational event (failover, breaker trip, fence...).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Event {
    pub at: String,
    pub region: String,
    pub kind: String,
    pub detail: String,
}

/// Bytes one pair's capture side published.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Egress {
    pub bytes_total: f64,
    /// Over the last [`RATE_WINDOW`]; `None` until two samples exist.
    pub bytes_per_second: Option<f64>,
    /// `bytes_per_second` for 30 days at the configured price.
    pub monthly_cost: Option<f64>,
    /// Read back from `pgrelay.egress`: how old the figures are.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measured_seconds_ago: Option<f64>,
}

/// Span over which egress rates are measured.
pub const RATE_WINDOW: Duration = Duration::from_secs(60);

/// Bytes in the unit transfer is priced in (a GB as clouds bill it, 2^30).
pub const GB: f64 = (1u64 << 30) as f64;

/// Cost of sending `bytes_per_second` for 30 days at `price_per_gb`.
pub fn monthly_cost(bytes_per_second: f64, price_per_gb: f64) -> f64 {
    bytes_per_second * 30.0 * 86_400.0 / GB * price_per_gb
}

/// The rate of a growing counter over a sliding window.
#[derive(Debug)]
pub struct RateWindow {
    window: Duration,
    samples: VecDeque<(Instant, f64)>,
}

impl RateWindow {
    pub fn new(window: Duration) -> Self {
        RateWindow {
            window,
            samples: VecDeque::new(),
        }
    }

    /// Adds a sample of the counter; returns the rate per second between
    /// the oldest sample still in the window and this one.
    pub fn push(&mut self, at: Instant, total: f64) -> Option<f64> {
        // a counter that went down was reset: earlier samples mean nothing
        if self.samples.back().is_some_and(|(_, t)| *t > total) {
            self.samples.clear();
        }
        self.samples.push_back((at, total));
        while self.samples.len() > 2
            && self
                .samples
                .get(1)
                .is_some_and(|(t, _)| at.duration_since(*t) >= self.window)
        {
            self.samples.pop_front();
        }
        let (first_at, first) = *self.samples.front()?;
        let span = at.duration_since(first_at).as_secs_f64();
        (self.samples.len() >= 2 && span > 0.0).then(|| (total - first) / span)
    }
}

/// Keeps the egress windows between collections.
pub struct Collector {
    rates: BTreeMap<String, RateWindow>,
}

impl Default for Collector {
    fn default() -> Self {
        Self::new()
    }
}

impl Collector {
    pub fn new() -> Self {
        Collector {
            rates: BTreeMap::new(),
        }
    }

    /// Builds the overview from the pairs [`crate::status::export_local`]
    /// returned and the capture side's byte counters in `metrics`.
    pub fn build(
        &mut self,
        config: &Config,
        region: &str,
        mut pairs: Vec<PairStatus>,
        metrics: &Metrics,
        at: Instant,
    ) -> Overview {
        let price = config.status.egress_price_per_gb;
        for pair in pairs.iter_mut().filter(|p| p.source == region) {
            let total = metrics
                .get(
                    &metric::CAPTURE_BYTES,
                    &[("source", region), ("destination", &pair.destination)],
                )
                .unwrap_or(0.0);
            let rate = self
                .rates
                .entry(pair.destination.clone())
                .or_insert_with(|| RateWindow::new(RATE_WINDOW))
                .push(at, total);
            pair.egress = Some(Egress {
                bytes_total: total,
                bytes_per_second: rate,
                monthly_cost: rate.zip(price).map(|(r, p)| monthly_cost(r, p)),
                measured_seconds_ago: None,
            });
        }
        let dead_letters = pairs
            .iter()
            .filter(|p| p.destination == region)
            .find_map(|p| p.dead_letters)
            .map(|n| BTreeMap::from([(region.to_string(), n)]))
            .unwrap_or_default();
        Overview {
            region: region.to_string(),
            collected_at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            regions: config.regions.keys().cloned().collect(),
            pairs,
            dead_letters,
            fenced: Vec::new(),
            events: Vec::new(),
            egress_price_per_gb: price,
            lagging_after_seconds: config.status.lagging_after.as_secs_f64(),
        }
    }
}

/// Where a sidecar leaves its egress figures for `pgrelay status`, which
/// reads databases, not sidecars: per destination, the bytes published since
/// the sidecar started and the rate over the last [`RATE_WINDOW`].
pub const EGRESS_TABLE_SQL: &str = "CREATE TABLE IF NOT EXISTS pgrelay.egress (\
    destination text PRIMARY KEY, bytes_total bigint NOT NULL, \
    bytes_per_second double precision, measured_at timestamptz NOT NULL DEFAULT now())";

/// Upserts one row per destination: `$1` destinations, `$2` byte totals,
/// `$3` rates (NULL until two samples exist).
pub const EGRESS_RECORD_SQL: &str = "INSERT INTO pgrelay.egress \
    (destination, bytes_total, bytes_per_second, measured_at) \
    SELECT d, b, r, now() FROM unnest($1::text[], $2::bigint[], $3::float8[]) AS u(d, b, r) \
    ON CONFLICT (destination) DO UPDATE SET bytes_total = excluded.bytes_total, \
    bytes_per_second = excluded.bytes_per_second, measured_at = excluded.measured_at";

/// Reads the rows back with their age in seconds.
pub const EGRESS_READ_SQL: &str = "SELECT destination, bytes_total, bytes_per_second, \
    extract(epoch FROM now() - measured_at)::float8 FROM pgrelay.egress";

/// A rate older than this was left by a sidecar that stopped: not shown.
pub const EGRESS_STALE_AFTER: Duration = Duration::from_secs(120);

/// The egress of the pairs from `region` in `view`, as [`EGRESS_RECORD_SQL`]'s
/// parameters.
pub fn egress_rows(view: &Overview) -> (Vec<String>, Vec<i64>, Vec<Option<f64>>) {
    let mut out = (Vec::new(), Vec::new(), Vec::new());
    for p in view.pairs.iter().filter(|p| p.source == view.region) {
        if let Some(e) = &p.egress {
            out.0.push(p.destination.clone());
            out.1.push(e.bytes_total as i64);
            out.2.push(e.bytes_per_second);
        }
    }
    out
}

/// A stored row as the status output shows it: the rate only while fresh,
/// the cost from the rate and `price_per_gb`.
pub fn stored_egress(
    bytes_total: i64,
    bytes_per_second: Option<f64>,
    age: Duration,
    price_per_gb: Option<f64>,
) -> Egress {
    let rate = bytes_per_second.filter(|_| age <= EGRESS_STALE_AFTER);
    Egress {
        bytes_total: bytes_total as f64,
        bytes_per_second: rate,
        monthly_cost: rate.zip(price_per_gb).map(|(r, p)| monthly_cost(r, p)),
        measured_seconds_ago: Some(age.as_secs_f64()),
    }
}

/// A byte rate for people: `812 B/s`, `3.4 KiB/s`, `1.2 MiB/s`.
pub fn human_rate(bytes_per_second: f64) -> String {
    human_bytes(bytes_per_second) + "/s"
}

/// A byte count for people, in binary units.
pub fn human_bytes(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_needs_two_samples_and_spans_the_window() {
        let t0 = Instant::now();
        let mut w = RateWindow::new(Duration::from_secs(60));
        assert_eq!(w.push(t0, 100.0), None);
        assert_eq!(w.push(t0 + Duration::from_secs(10), 1100.0), Some(100.0));
        assert_eq!(w.push(t0 + Duration::from_secs(20), 1100.0), Some(50.0));
        // past the window the oldest samples leave: the rate is recent
        let r = w.push(t0 + Duration::from_secs(90), 1100.0).unwrap();
        assert_eq!(r, 0.0);
        assert!(w.samples.len() <= 3);
    }

    #[test]
    fn a_reset_counter_starts_over() {
        let t0 = Instant::now();
        let mut w = RateWindow::new(Duration::from_secs(60));
        w.push(t0, 5000.0);
        assert_eq!(w.push(t0 + Duration::from_secs(5), 10.0), None);
        assert_eq!(w.push(t0 + Duration::from_secs(10), 60.0), Some(10.0));
    }

    #[test]
    fn a_stale_stored_rate_is_not_shown_nor_priced() {
        let fresh = stored_egress(5000, Some(100.0), Duration::from_secs(10), Some(0.02));
        assert_eq!(fresh.bytes_per_second, Some(100.0));
        assert_eq!(fresh.monthly_cost, Some(monthly_cost(100.0, 0.02)));
        let stale = stored_egress(5000, Some(100.0), Duration::from_secs(600), Some(0.02));
        assert_eq!((stale.bytes_per_second, stale.monthly_cost), (None, None));
        assert_eq!(stale.bytes_total, 5000.0);
        let unpriced = stored_egress(5000, Some(100.0), Duration::ZERO, None);
        assert_eq!(unpriced.monthly_cost, None);
    }

    #[test]
    fn byte_figures_read_in_binary_units() {
        assert_eq!(human_rate(812.0), "812 B/s");
        assert_eq!(human_rate(3.5 * 1024.0), "3.5 KiB/s");
        assert_eq!(human_bytes(GB * 2.0), "2.0 GiB");
    }

    #[test]
    fn monthly_cost_is_rate_times_a_month_times_price() {
        // 1 GB every day for 30 days at 0.02 per GB
        let per_second = GB / 86_400.0;
        let cost = monthly_cost(per_second, 0.02);
        assert!((cost - 0.6).abs() < 1e-9, "{cost}");
        assert_eq!(monthly_cost(0.0, 0.09), 0.0);
    }
}
