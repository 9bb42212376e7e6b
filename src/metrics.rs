//! Process metrics in Prometheus' text format.
//!
//! A small registry of labelled counters, gauges and histograms. What each
//! metric is — name, kind, labels, help — is declared once, in [`catalog`];
//! the registry takes those declarations, never a bare name. Labels are
//! regions, tables and reasons — never keys or row values (residency:
//! metrics leave the region too). Updates take a short uncontended lock.

pub mod catalog;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

type Labels = Vec<(&'static str, String)>;

/// One metric as [`catalog`] declares it; `K` is its kind ([`Counter`],
/// [`Gauge`] or [`Histogram`]), so a counter cannot be set like a gauge.
#[derive(Debug)]
pub struct Metric<K> {
    pub name: &'static str,
    pub kind: K,
    /// Label names, in the order call sites give them.
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

/// A metric that only goes up ([`Metrics::add`]).
#[derive(Debug)]
pub struct Counter;

/// A metric that is set ([`Metrics::set`]).
#[derive(Debug)]
pub struct Gauge;

/// A distribution of observations ([`Metrics::observe`]) over fixed buckets.
#[derive(Debug)]
pub struct Histogram {
    pub buckets: &'static [f64],
}

/// The Prometheus type name of a metric kind.
pub trait Kind {
    const NAME: &'static str;
}

impl Kind for Counter {
    const NAME: &'static str = "counter";
}

impl Kind for Gauge {
    const NAME: &'static str = "gauge";
}

impl Kind for Histogram {
    const NAME: &'static str = "histogram";
}

/// A metric's description without its kind's type: what [`catalog::ALL`]
/// lists, for the reference documentation and its test.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub name: &'static str,
    pub kind: &'static str,
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

impl<K: Kind> Metric<K> {
    pub const fn entry(&self) -> Entry {
        Entry {
            name: self.name,
            kind: K::NAME,
            labels: self.labels,
            help: self.help,
        }
    }

    /// The series key of `labels`; they must be the declared ones, in order.
    fn key(&self, labels: &[(&'static str, &str)]) -> Labels {
        debug_assert!(
            labels
                .iter()
                .map(|(k, _)| *k)
                .eq(self.labels.iter().copied()),
            "metric {} takes labels {:?}",
            self.name,
            self.labels
        );
        labels.iter().map(|(k, v)| (*k, v.to_string())).collect()
    }
}

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// name -> (help, kind, series)
    families: BTreeMap<&'static str, Family>,
}

struct Family {
    help: &'static str,
    kind: &'static str,
    series: BTreeMap<Labels, f64>,
    /// Histograms only: bucket bounds and, per series, counts and sum.
    buckets: &'static [f64],
    histograms: BTreeMap<Labels, (Vec<u64>, f64, u64)>,
}

/// Bounds for latency histograms, in seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Bounds for batch-size histograms, in records.
pub const SIZE_BUCKETS: &[f64] = &[
    1.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
];

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    fn update<K: Kind>(
        &self,
        metric: &Metric<K>,
        labels: &[(&'static str, &str)],
        f: impl FnOnce(&mut f64),
    ) {
        let key = metric.key(labels);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let family = inner.families.entry(metric.name).or_insert_with(|| Family {
            help: metric.help,
            kind: K::NAME,
            series: BTreeMap::new(),
            buckets: &[],
            histograms: BTreeMap::new(),
        });
        f(family.series.entry(key).or_insert(0.0));
    }

    /// Adds `by` to a counter.
    pub fn add(&self, metric: &Metric<Counter>, labels: &[(&'static str, &str)], by: u64) {
        self.update(metric, labels, |v| *v += by as f64);
    }

    /// Sets a gauge.
    pub fn set(&self, metric: &Metric<Gauge>, labels: &[(&'static str, &str)], value: f64) {
        self.update(metric, labels, |v| *v = value);
    }

    /// Records one observation in a histogram.
    pub fn observe(&self, metric: &Metric<Histogram>, labels: &[(&'static str, &str)], value: f64) {
        let key = metric.key(labels);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let family = inner.families.entry(metric.name).or_insert_with(|| Family {
            help: metric.help,
            kind: Histogram::NAME,
            series: BTreeMap::new(),
            buckets: metric.kind.buckets,
            histograms: BTreeMap::new(),
        });
        let n = family.buckets.len();
        let entry = family
            .histograms
            .entry(key)
            .or_insert_with(|| (vec![0; n], 0.0, 0));
        for (i, bound) in family.buckets.iter().enumerate() {
            if value <= *bound {
                entry.0[i] += 1;
            }
        }
        entry.1 += value;
        entry.2 += 1;
    }

    /// Reads one series of a counter or gauge (tests and `status`).
    pub fn get<K: Kind>(&self, metric: &Metric<K>, labels: &[(&'static str, &str)]) -> Option<f64> {
        let key = metric.key(labels);
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.families.get(metric.name)?.series.get(&key).copied()
    }

    /// The whole registry in Prometheus' text exposition format.
    pub fn render(&self) -> String {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        for (name, family) in &inner.families {
            let _ = writeln!(out, "# HELP {name} {}", family.help);
            let _ = writeln!(out, "# TYPE {name} {}", family.kind);
            for (labels, value) in &family.series {
                out.push_str(name);
                write_labels(&mut out, labels, None);
                let _ = writeln!(out, " {value}");
            }
            for (labels, (counts, sum, count)) in &family.histograms {
                for (bound, c) in family.buckets.iter().zip(counts) {
                    let _ = write!(out, "{name}_bucket");
                    write_labels(&mut out, labels, Some(&bound.to_string()));
                    let _ = writeln!(out, " {c}");
                }
                let _ = write!(out, "{name}_bucket");
                write_labels(&mut out, labels, Some("+Inf"));
                let _ = writeln!(out, " {count}");
                let _ = write!(out, "{name}_sum");
                write_labels(&mut out, labels, None);
                let _ = writeln!(out, " {sum}");
                let _ = write!(out, "{name}_count");
                write_labels(&mut out, labels, None);
                let _ = writeln!(out, " {count}");
            }
        }
        out
    }
}

fn write_labels(out: &mut String, labels: &Labels, le: Option<&str>) {
    if labels.is_empty() && le.is_none() {
        return;
    }
    out.push('{');
    let mut first = true;
    for (k, v) in labels {
        if !first {
            out.push(',');
        }
        first = false;
        let v = v
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n");
        let _ = write!(out, "{k}=\"{v}\"");
    }
    if let Some(le) = le {
        if !first {
            out.push(',');
        }
        let _ = write!(out, "le=\"{le}\"");
    }
    out.push('}');
}

#[cfg(test)]
mod tests {
    use super::*;

    const DROPPED: Metric<Counter> = Metric {
        name: "pgrelay_dropped_total",
        kind: Counter,
        labels: &["table", "destination", "reason"],
        help: "rows not published",
    };
    const CONFIRMED: Metric<Gauge> = Metric {
        name: "pgrelay_confirmed_lsn",
        kind: Gauge,
        labels: &[],
        help: "confirmed",
    };
    const BATCH: Metric<Histogram> = Metric {
        name: "pgrelay_batch_seconds",
        kind: Histogram {
            buckets: LATENCY_BUCKETS,
        },
        labels: &["region"],
        help: "latency",
    };

    #[test]
    fn renders_counters_and_gauges() {
        let m = Metrics::new();
        m.add(
            &DROPPED,
            &[
                ("table", "public.users"),
                ("destination", "eu"),
                ("reason", "local"),
            ],
            2,
        );
        m.set(&CONFIRMED, &[], 5.0);
        let text = m.render();
        assert!(text.contains(
            "pgrelay_dropped_total{table=\"public.users\",destination=\"eu\",reason=\"local\"} 2"
        ));
        assert!(text.contains("# HELP pgrelay_dropped_total rows not published"));
        assert!(text.contains("# TYPE pgrelay_dropped_total counter"));
        assert!(text.contains("# TYPE pgrelay_confirmed_lsn gauge"));
        m.observe(&BATCH, &[("region", "eu")], 0.03);
        let text = m.render();
        assert!(text.contains("# TYPE pgrelay_batch_seconds histogram"));
        assert!(text.contains("pgrelay_batch_seconds_bucket{region=\"eu\",le=\"0.05\"} 1"));
        assert!(text.contains("pgrelay_batch_seconds_bucket{region=\"eu\",le=\"0.025\"} 0"));
        assert!(text.contains("pgrelay_batch_seconds_count{region=\"eu\"} 1"));
        assert_eq!(
            m.get(
                &DROPPED,
                &[
                    ("table", "public.users"),
                    ("destination", "eu"),
                    ("reason", "local")
                ]
            ),
            Some(2.0)
        );
    }

    /// `docs/reference.md` gives each metric a row with its kind, labels
    /// and help text exactly as exported.
    #[test]
    fn every_metric_has_its_entry_in_the_reference() {
        let reference = include_str!("../docs/reference.md");
        let missing: Vec<String> = catalog::ALL
            .iter()
            .map(|m| {
                format!(
                    "| `{}` | {} | {} | {} |",
                    m.name,
                    m.kind,
                    m.labels.join(", "),
                    m.help.replace('|', "\\|")
                )
            })
            .filter(|row| !reference.contains(&format!("\n{row}")))
            .collect();
        assert!(
            missing.is_empty(),
            "docs/reference.md, Metrics, lacks these rows (or they differ):\n{}",
            missing.join("\n")
        );
    }

    #[test]
    fn the_catalogue_names_each_metric_once_and_well() {
        let mut seen = std::collections::BTreeSet::new();
        for m in catalog::ALL {
            assert!(seen.insert(m.name), "{} is declared twice", m.name);
            assert!(m.name.starts_with("pgrelay_"), "{}", m.name);
            assert!(!m.help.is_empty(), "{} has no help text", m.name);
            assert_eq!(
                m.kind == "counter",
                m.name.ends_with("_total"),
                "{}: counters, and only counters, end in _total",
                m.name
            );
        }
    }
}
