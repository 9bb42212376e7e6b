//! `pgrelay status`'s text output: the pair table, the egress lines and the
//! DR lines.

use std::fmt::Write as _;

use super::{DrStatus, PairStatus};
use crate::overview::{human_bytes, human_rate, EGRESS_STALE_AFTER};

/// A plain-text table.
pub fn render(rows: &[PairStatus]) -> String {
    let dash = || "-".to_string();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<12} {:<14} {:<14} {:>12} {:>9} {:>9} {:<32} {:>5}  state",
        "pair",
        "source_lsn",
        "confirmed_lsn",
        "lag_bytes",
        "backlog",
        "lag_s",
        "watermark (commit time)",
        "dlq"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<12} {:<14} {:<14} {:>12} {:>9} {:>9} {:<32} {:>5}  {}",
            format!("{}->{}", r.source, r.destination),
            r.source_lsn.clone().unwrap_or_else(dash),
            r.confirmed_lsn.clone().unwrap_or_else(dash),
            r.lag_bytes.map(|b| b.to_string()).unwrap_or_else(dash),
            r.backlog_records
                .map(|b| b.to_string())
                .unwrap_or_else(dash),
            r.lag_seconds
                .map(|s| format!("{s:.1}"))
                .unwrap_or_else(dash),
            r.watermark_commit_time.clone().unwrap_or_else(dash),
            r.dead_letters.map(|n| n.to_string()).unwrap_or_else(dash),
            r.state
        );
        for p in r
            .problems
            .iter()
            .chain(&r.held)
            .chain(&r.source_held)
            .chain(&r.frozen)
            .chain(&r.rebuilding)
        {
            let _ = writeln!(out, "    {p}");
        }
    }
    // per source region, once
    let mut seen = Vec::new();
    for r in rows {
        if seen.contains(&&r.source) {
            continue;
        }
        seen.push(&r.source);
        if let Some(f) = &r.source_fenced {
            let _ = writeln!(out, "region {}: FENCED {f}", r.source);
        }
        if let Some(f) = &r.source_last_failover {
            let _ = writeln!(out, "region {}: last failover {f}", r.source);
        }
    }
    out
}

/// The verify lines: per pair whose destination's sidecar verified it
/// (`[verify] interval`), when it last did and the differences found.
/// Empty when no sidecar has.
pub fn render_verify(rows: &[PairStatus]) -> String {
    let mut out = String::new();
    for r in rows {
        let Some(at) = &r.last_verify else { continue };
        if out.is_empty() {
            out.push_str("verify (each destination's sidecar, [verify] interval):\n");
        }
        let pair = format!("{}->{}", r.source, r.destination);
        let _ = writeln!(
            out,
            "  {pair:<10} last at {at}: {} difference(s)",
            r.verify_differences.unwrap_or(0)
        );
    }
    out
}

/// The egress lines: per outgoing pair whose sidecar left figures, the
/// bytes published since it started, the rate over the last minute and, at
/// `price_per_gb`, the estimated monthly transfer cost. Empty when no
/// sidecar has left any.
pub fn render_egress(rows: &[PairStatus], price_per_gb: Option<f64>) -> String {
    let mut out = String::new();
    let mut total_cost = 0.0;
    let mut priced = 0;
    for r in rows {
        let Some(e) = &r.egress else { continue };
        if out.is_empty() {
            let _ = writeln!(out, "egress (bytes published per destination):");
        }
        let pair = format!("{}->{}", r.source, r.destination);
        let rate = match (e.bytes_per_second, e.measured_seconds_ago) {
            (Some(r), _) => human_rate(r),
            (None, Some(age)) if age > EGRESS_STALE_AFTER.as_secs_f64() => {
                format!("no figures for {age:.0}s (is the sidecar running?)")
            }
            (None, _) => "rate not measured yet".to_string(),
        };
        let cost = match e.monthly_cost {
            Some(c) => {
                total_cost += c;
                priced += 1;
                format!(", about {c:.2} per month")
            }
            None => String::new(),
        };
        let _ = writeln!(
            out,
            "  {pair:<12} {rate:>12}, {} since the sidecar started{cost}",
            human_bytes(e.bytes_total)
        );
    }
    match price_per_gb {
        Some(p) if priced > 0 => {
            let _ = writeln!(
                out,
                "  all pairs: about {total_cost:.2} per month at {p} per GB (relay.status.egress_price_per_gb)"
            );
        }
        None if !out.is_empty() => {
            let _ = writeln!(
                out,
                "  set relay.status.egress_price_per_gb for a monthly cost estimate"
            );
        }
        _ => {}
    }
    out
}

/// The DR lines of `status`'s text output.
pub fn render_dr(rows: &[DrStatus]) -> String {
    let mut out = String::new();
    for r in rows {
        let state = match (&r.behind_records, &r.problem) {
            (Some(n), _) => format!("{n} records not yet in the vault (recovery point)"),
            (None, Some(p)) => format!("unknown: {p}"),
            (None, None) => "unknown".to_string(),
        };
        out.push_str(&format!(
            "DR copy {} -> {} (encrypted): {state}\n",
            r.home, r.dr
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overview::{monthly_cost, Egress};

    fn pair(source: &str, destination: &str, egress: Option<Egress>) -> PairStatus {
        PairStatus {
            source: source.into(),
            destination: destination.into(),
            source_lsn: None,
            confirmed_lsn: None,
            lag_bytes: None,
            lag_seconds: None,
            retained_wal_bytes: None,
            watermark_hlc: None,
            watermark_commit_time: None,
            backlog_records: None,
            dead_letters: None,
            state: "active",
            problems: Vec::new(),
            held: None,
            frozen: None,
            seen_from: None,
            egress,
            source_held: None,
            source_fenced: None,
            source_last_failover: None,
            rebuilding: None,
            last_verify: None,
            verify_differences: None,
        }
    }

    #[test]
    fn verify_lines_name_the_pair_the_time_and_the_differences() {
        let mut a = pair("us", "eu", None);
        a.last_verify = Some("2026-12-07 08:00:00Z".into());
        a.verify_differences = Some(2);
        let b = pair("eu", "us", None);
        assert_eq!(render_verify(std::slice::from_ref(&b)), "");
        assert_eq!(
            render_verify(&[a, b]),
            "verify (each destination's sidecar, [verify] interval):\n  us->eu     last at 2026-12-07 08:00:00Z: 2 difference(s)\n"
        );
    }

    #[test]
    fn egress_lines_give_rate_total_and_cost_per_pair_and_in_all() {
        let e = |rate: Option<f64>, age: f64| Egress {
            bytes_total: 3.0 * 1024.0 * 1024.0,
            bytes_per_second: rate,
            monthly_cost: rate.map(|r| monthly_cost(r, 0.02)),
            measured_seconds_ago: Some(age),
        };
        let rows = [
            pair("us", "eu", Some(e(Some(2048.0), 3.0))),
            pair("us", "cn", Some(e(None, 600.0))),
            pair("eu", "us", None),
            pair("cn", "us", Some(e(None, 3.0))),
        ];
        let out = render_egress(&rows, Some(0.02));
        assert!(out.contains("us->eu"), "{out}");
        assert!(out.contains("2.0 KiB/s"), "{out}");
        assert!(out.contains("3.0 MiB since the sidecar started"), "{out}");
        assert!(
            out.contains("no figures for 600s (is the sidecar running?)"),
            "{out}"
        );
        assert!(out.contains("rate not measured yet"), "{out}");
        assert!(!out.contains("eu->us"), "{out}");
        let cost = monthly_cost(2048.0, 0.02);
        assert!(
            out.contains(&format!("about {cost:.2} per month at 0.02")),
            "{out}"
        );
        assert_eq!(render_egress(&rows[2..3], Some(0.02)), "");
        assert!(render_egress(&rows[..1], None).contains("egress_price_per_gb"));
    }
}
