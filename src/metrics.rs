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
}

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
                if !labels.is_empty() {
                    out.push('{');
                    for (i, (k, v)) in labels.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        let v = v
                            .replace('\\', "\\\\")
                            .replace('"', "\\\"")
                            .replace('\n', "\\n");
                        let _ = write!(out, "{k}=\"{v}\"");
                    }
                    out.push('}');
                }
                let _ = writeln!(out, " {value}");
            }
        }
        out
    }
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
