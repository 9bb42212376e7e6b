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
                    EGRESS_METRIC,
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

/// The capture side's per-destination byte counter.
pub const EGRESS_METRIC: &str = "pgrelay_capture_bytes_total";

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
    fn monthly_cost_is_rate_times_a_month_times_price() {
        // 1 GB every day for 30 days at 0.02 per GB
        let per_second = GB / 86_400.0;
        let cost = monthly_cost(per_second, 0.02);
        assert!((cost - 0.6).abs() < 1e-9, "{cost}");
        assert_eq!(monthly_cost(0.0, 0.09), 0.0);
    }
}
