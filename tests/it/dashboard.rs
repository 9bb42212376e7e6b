//! The Grafana dashboard (`docker/grafana/pgrelay.json`) queries only
//! metrics a running sidecar serves: every metric name in its panels'
//! queries must appear in `/metrics` ([`unserved`], checked by the status
//! page's test once its three regions carried traffic).

use std::collections::BTreeSet;

use crate::support::repo_root;

/// Every `pgrelay_*` metric name the dashboard's queries use.
pub fn queried_metrics() -> BTreeSet<String> {
    let path = repo_root().join("docker/grafana/pgrelay.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    let mut names = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        let targets = panel["targets"].as_array();
        assert!(
            targets.is_some_and(|t| !t.is_empty()),
            "panel {} has no query",
            panel["title"]
        );
        for target in targets.unwrap() {
            let expr = target["expr"].as_str().expect("expr");
            names.extend(metric_names(expr));
        }
    }
    names
}

/// The `pgrelay_*` identifiers of a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("pgrelay_") {
        // not the tail of a longer identifier
        let preceded = rest[..i]
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let len = rest[i..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len() - i);
        if !preceded {
            out.push(rest[i..i + len].to_string());
        }
        rest = &rest[i + len..];
    }
    out
}

/// The metrics the dashboard queries that `metrics` (a `/metrics`
/// response) does not serve.
pub fn unserved(metrics: &str) -> Vec<String> {
    let served: BTreeSet<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("pgrelay_"))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    queried_metrics()
        .into_iter()
        .filter(|m| !served.contains(m.as_str()))
        .collect()
}

#[test]
fn the_dashboard_charts_what_operators_watch() {
    assert_eq!(
        metric_names("sum by (le) (rate(pgrelay_a_bucket[5m])) / x_pgrelay_b + pgrelay_c"),
        ["pgrelay_a_bucket", "pgrelay_c"]
    );
    let queried = queried_metrics();
    for wanted in [
        "pgrelay_apply_lag_seconds",
        "pgrelay_capture_published_total",
        "pgrelay_apply_records_total",
        "pgrelay_capture_bytes_total",
        "pgrelay_dead_letters",
        "pgrelay_apply_conflicts_won_total",
        "pgrelay_slot_retained_wal_bytes",
        "pgrelay_pair_state",
        "pgrelay_breaker_state",
    ] {
        assert!(queried.contains(wanted), "no panel queries {wanted}");
    }
}
