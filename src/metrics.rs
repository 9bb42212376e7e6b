//! Process metrics in Prometheus' text format.
//!
//! A small registry of labelled counters and gauges. Labels are regions,
//! tables and reasons — never keys or row values (residency: metrics leave
//! the region too). Updates take a short uncontended lock.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

type Labels = Vec<(&'static str, String)>;

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

    fn update(
        &self,
        name: &'static str,
        help: &'static str,
        kind: &'static str,
        labels: &[(&'static str, &str)],
        f: impl FnOnce(&mut f64),
    ) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let family = inner.families.entry(name).or_insert_with(|| Family {
            help,
            kind,
            series: BTreeMap::new(),
            buckets: &[],
            histograms: BTreeMap::new(),
        });
        let key: Labels = labels.iter().map(|(k, v)| (*k, v.to_string())).collect();
        f(family.series.entry(key).or_insert(0.0));
    }

    /// Adds `by` to a counter.
    pub fn add(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &str)],
        by: u64,
    ) {
        self.update(name, help, "counter", labels, |v| *v += by as f64);
    }

    /// Sets a gauge.
    pub fn set(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &str)],
        value: f64,
    ) {
        self.update(name, help, "gauge", labels, |v| *v = value);
    }

    /// Records one observation in a histogram.
    pub fn observe(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &str)],
        buckets: &'static [f64],
        value: f64,
    ) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let family = inner.families.entry(name).or_insert_with(|| Family {
            help,
            kind: "histogram",
            series: BTreeMap::new(),
            buckets,
            histograms: BTreeMap::new(),
        });
        let key: Labels = labels.iter().map(|(k, v)| (*k, v.to_string())).collect();
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

    /// Reads one series (tests and `status`).
    pub fn get(&self, name: &str, labels: &[(&'static str, &str)]) -> Option<f64> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let key: Labels = labels.iter().map(|(k, v)| (*k, v.to_string())).collect();
        inner.families.get(name)?.series.get(&key).copied()
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

    #[test]
    fn renders_counters_and_gauges() {
        let m = Metrics::new();
        m.add(
            "pgrelay_dropped_total",
            "rows not published",
            &[
                ("table", "public.users"),
                ("destination", "eu"),
                ("reason", "local"),
            ],
            2,
        );
        m.set("pgrelay_confirmed_lsn", "confirmed", &[], 5.0);
        let text = m.render();
        assert!(text.contains(
            "pgrelay_dropped_total{table=\"public.users\",destination=\"eu\",reason=\"local\"} 2"
        ));
        assert!(text.contains("# TYPE pgrelay_confirmed_lsn gauge"));
        m.observe(
            "pgrelay_batch_seconds",
            "latency",
            &[("region", "eu")],
            LATENCY_BUCKETS,
            0.03,
        );
        let text = m.render();
        assert!(text.contains("pgrelay_batch_seconds_bucket{region=\"eu\",le=\"0.05\"} 1"));
        assert!(text.contains("pgrelay_batch_seconds_bucket{region=\"eu\",le=\"0.025\"} 0"));
        assert!(text.contains("pgrelay_batch_seconds_count{region=\"eu\"} 1"));
        assert_eq!(
            m.get(
                "pgrelay_dropped_total",
                &[
                    ("table", "public.users"),
                    ("destination", "eu"),
                    ("reason", "local")
                ]
            ),
            Some(2.0)
        );
    }
}
