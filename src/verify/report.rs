//! The output of `pgrelay verify` (pure): a table for people, JSON for
//! machines. Keys appear only when asked for; no other value ever does.

use std::fmt::Write as _;

use serde_json::json;

use super::fix::Outcome;
use super::plan::{action_name, Action, Step};
use super::{Counts, Report};

/// How many differences the text output lists after the table.
const WORST: usize = 20;

pub fn text(report: &Report, show_keys: bool) -> String {
    let mut out = String::new();
    let counts = report.counts();
    let _ = writeln!(
        out,
        "{:<28} {:<6} {:<6} {:>9} {:>9} {:>7} {:>7} {:>7} {:>8}",
        "TABLE", "REGION", "REGION", "ROWS", "ROWS", "LEAKED", "MISSING", "EXTRA", "DIVERGED"
    );
    for pair in &report.pairs {
        // the pair's differences, in both directions
        let mut sum = Counts::default();
        for ((table, source, destination), c) in &counts {
            let matches = *table == pair.table
                && ((*source == pair.a && *destination == pair.b)
                    || (*source == pair.b && *destination == pair.a));
            if matches {
                sum.leaked += c.leaked;
                sum.missing += c.missing;
                sum.extra += c.extra;
                sum.diverged += c.diverged;
            }
        }
        let _ = writeln!(
            out,
            "{:<28} {:<6} {:<6} {:>9} {:>9} {:>7} {:>7} {:>7} {:>8}",
            pair.table,
            pair.a,
            pair.b,
            pair.rows_a,
            pair.rows_b,
            sum.leaked,
            sum.missing,
            sum.extra,
            sum.diverged
        );
    }
    // leaks are found in one region alone: their own lines
    for ((table, source, destination), c) in &counts {
        if c.leaked > 0 {
            let _ = writeln!(
                out,
                "LEAKED {table}: {} row(s) or value(s) from {source} held in {destination}, where the policy forbids them",
                c.leaked
            );
        }
    }
    if report.agrees() {
        out.push_str("every region agrees");
        if report.unsettled > 0 {
            let _ = write!(
                out,
                " ({} key(s) still in flight after every round, not counted)",
                report.unsettled
            );
        }
        out.push('\n');
    } else {
        let _ = writeln!(
            out,
            "{} difference(s); the first {}:",
            report.differences.len(),
            report.differences.len().min(WORST)
        );
        for d in report.differences.iter().take(WORST) {
            let _ = write!(
                out,
                "  {:<8} {} {} -> {}",
                d.kind.as_str(),
                d.table,
                d.source,
                d.destination
            );
            if let Some(column) = &d.column {
                let _ = write!(out, " column {column}");
            }
            if show_keys {
                if let Some(key) = &d.key {
                    let _ = write!(out, " key {key}");
                }
            }
            out.push('\n');
        }
    }
    if report.not_examined > 0 {
        let _ = writeln!(
            out,
            "{} suspect key(s) not examined (more than the cap per pair): run again, or per table",
            report.not_examined
        );
    }
    out
}

pub fn json(report: &Report, show_keys: bool) -> serde_json::Value {
    let counts: Vec<serde_json::Value> = report
        .counts()
        .into_iter()
        .map(|((table, source, destination), c)| {
            json!({
                "table": table, "source": source, "destination": destination,
                "leaked": c.leaked, "missing": c.missing, "extra": c.extra, "diverged": c.diverged,
            })
        })
        .collect();
    let differences: Vec<serde_json::Value> = report
        .differences
        .iter()
        .map(|d| {
            let mut v = json!({
                "table": d.table, "kind": d.kind, "source": d.source, "destination": d.destination,
            });
            if let Some(column) = &d.column {
                v["column"] = json!(column);
            }
            if show_keys {
                if let Some(key) = &d.key {
                    v["key"] = json!(key);
                }
            }
            v
        })
        .collect();
    json!({
        "agree": report.agrees(),
        "pairs": report.pairs,
        "counts": counts,
        "differences": differences,
        "unsettled": report.unsettled,
        "not_examined": report.not_examined,
    })
}

/// What `--repair` does or did (`outcomes` is `None` for a dry run).
pub fn repair_text(steps: &[Step], outcomes: Option<&[Outcome]>, show_keys: bool) -> String {
    let mut out = String::new();
    if steps.is_empty() {
        return out;
    }
    out.push_str(match outcomes {
        None => "repair (dry run, nothing changed); it would:\n",
        Some(_) => "repair:\n",
    });
    for (i, step) in steps.iter().enumerate() {
        let place = match &step.from {
            Some(from) => format!("{from} -> {}", step.to),
            None => format!("in {}", step.to),
        };
        let _ = write!(
            out,
            "  {:<8} {:<8} {} {place}",
            action_name(&step.action),
            step.kind.as_str(),
            step.table
        );
        if let Some(column) = &step.column {
            let _ = write!(out, " column {column}");
        }
        let _ = write!(out, ", {} key(s): ", step.keys.len());
        let from = step.from.as_deref().unwrap_or_default();
        match (&step.action, outcomes.map(|o| &o[i])) {
            (Action::Report(reason), _) => {
                let _ = write!(out, "not repaired: {reason}");
            }
            (_, Some(Outcome { error: Some(e), .. })) => {
                let _ = write!(out, "FAILED: {e}");
            }
            (Action::Resend, None) => {
                let _ = write!(out, "{from} would send its version again");
            }
            (Action::Replace, None) => {
                let _ = write!(
                    out,
                    "{}'s copy would be removed, {from} would send its version again",
                    step.to
                );
            }
            (Action::Remove, None) => {
                let _ = write!(out, "{}'s copy would be removed", step.to);
            }
            (_, Some(o)) => {
                let mut parts = Vec::new();
                if matches!(step.action, Action::Remove | Action::Replace) {
                    parts.push(format!("{} row(s) removed", o.removed));
                }
                if matches!(step.action, Action::Resend | Action::Replace) {
                    parts.push(format!(
                        "{} row(s) and {} tombstone(s) sent again by {from}",
                        o.rows_sent, o.tombstones_sent
                    ));
                }
                if o.not_whole > 0 {
                    parts.push(format!(
                        "{} row(s) not sent: {from}'s copy has columns a rule altered (write them again where they were written)",
                        o.not_whole
                    ));
                }
                out.push_str(&parts.join(", "));
            }
        }
        if show_keys {
            let _ = write!(out, " keys {}", step.keys.join(" "));
        }
        out.push('\n');
    }
    if outcomes.is_some() {
        out.push_str(
            "what was sent is applied as it arrives: run verify again to see every region agree\n",
        );
    }
    out
}

pub fn repair_json(
    steps: &[Step],
    outcomes: Option<&[Outcome]>,
    show_keys: bool,
) -> serde_json::Value {
    let list: Vec<serde_json::Value> = steps
        .iter()
        .enumerate()
        .map(|(i, step)| {
            let mut v = json!({
                "table": step.table.to_string(),
                "kind": step.kind,
                "action": action_name(&step.action),
                "to": step.to,
                "keys": step.keys.len(),
            });
            if let Some(from) = &step.from {
                v["from"] = json!(from);
            }
            if let Some(column) = &step.column {
                v["column"] = json!(column);
            }
            if let Action::Report(reason) = &step.action {
                v["reason"] = json!(reason);
            }
            if let Some(o) = outcomes.map(|o| &o[i]) {
                v["outcome"] = json!(o);
            }
            if show_keys {
                v["key_list"] = json!(step.keys);
            }
            v
        })
        .collect();
    json!({ "dry_run": outcomes.is_none(), "steps": list })
}
