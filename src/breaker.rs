//! The blast-radius breaker: thresholds on what one source region may change
//! in a destination within a window, and the judgement of each incoming
//! record against them. Pure: no IO, no clock (times are passed in).
//!
//! The breaker sits on the apply side: each destination protects itself.
//! When a source's changes to a table exceed a threshold, the destination's
//! pipeline for that source stops at the record that crossed it, before
//! that record touches a row; what follows waits in Kafka (see
//! `apply::breaker` for the frozen state, `pgrelay breaker release` and
//! `pgrelay breaker discard`).
//!
//! ```toml
//! [[breakers]]
//! source = "us"            # optional: every source region
//! table = "public.orders"  # optional: every replicated table
//! window = "1m"
//! max_deletes = 1000       # deletes within the window
//! max_updates = 10000      # updates within the window
//! max_fraction = 0.5       # deletes + updates within the window / the table's rows here
//! min_rows = 100           # max_fraction applies from this many changed rows on
//! truncate = true          # any truncate trips
//! ```
//!
//! For one source and table the most specific rule applies (source and
//! table named, then table, then source, then neither). Windows are counted
//! in the source's commit time, so a destination catching up on a backlog of
//! ordinary traffic does not see a storm that never happened.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use serde::Deserialize;

use crate::event::{Op, TableName};

/// `[[breakers]]` as written in the file.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub source: Option<String>,
    pub table: Option<String>,
    pub window: Option<String>,
    pub max_deletes: Option<u64>,
    pub max_updates: Option<u64>,
    pub max_fraction: Option<f64>,
    pub min_rows: Option<u64>,
    pub truncate: Option<bool>,
}

pub const fn default_window() -> Duration {
    Duration::from_secs(60)
}
pub const fn default_min_rows() -> u64 {
    100
}

/// One validated `[[breakers]]` rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub source: Option<String>,
    pub table: Option<TableName>,
    pub window: Duration,
    pub max_deletes: Option<u64>,
    pub max_updates: Option<u64>,
    pub max_fraction: Option<f64>,
    pub min_rows: u64,
    pub truncate: bool,
}

impl Rule {
    /// Validates one rule; `regions` and `tables` are the declared ones.
    /// The message names the key to fix (the caller adds the file).
    pub fn from_raw(
        raw: RawRule,
        index: usize,
        regions: &[&str],
        tables: &[&TableName],
    ) -> Result<Rule, String> {
        let at = format!("breakers[{index}]");
        if let Some(s) = &raw.source {
            if !regions.contains(&s.as_str()) {
                return Err(format!(
                    "{at}.source = {s:?} is not a declared region (declared: {})",
                    regions.join(", ")
                ));
            }
        }
        let table = match &raw.table {
            None => None,
            Some(t) => {
                let name = TableName::parse(t).map_err(|e| format!("{at}.table: {e}"))?;
                if !tables.contains(&&name) {
                    return Err(format!(
                        "{at}.table = {t:?} is not a declared, replicated table"
                    ));
                }
                Some(name)
            }
        };
        let window = match &raw.window {
            None => default_window(),
            Some(w) => {
                crate::config::parse_duration(w).map_err(|e| format!("{at}.window = {w:?}: {e}"))?
            }
        };
        if window < Duration::from_secs(1) {
            return Err(format!("{at}.window must be at least 1s"));
        }
        if let Some(f) = raw.max_fraction {
            if !(f > 0.0 && f <= 1.0) {
                return Err(format!(
                    "{at}.max_fraction = {f}: a fraction of the table's rows, above 0 and at most 1"
                ));
            }
        }
        for (key, v) in [
            ("max_deletes", raw.max_deletes),
            ("max_updates", raw.max_updates),
        ] {
            if v == Some(0) {
                return Err(format!(
                    "{at}.{key} = 0 would trip on the first change; leave it out to allow any number"
                ));
            }
        }
        let truncate = raw.truncate.unwrap_or(true);
        if raw.max_deletes.is_none()
            && raw.max_updates.is_none()
            && raw.max_fraction.is_none()
            && !truncate
        {
            return Err(format!(
                "{at} sets no threshold: give max_deletes, max_updates, max_fraction or truncate = true"
            ));
        }
        Ok(Rule {
            source: raw.source,
            table,
            window,
            max_deletes: raw.max_deletes,
            max_updates: raw.max_updates,
            max_fraction: raw.max_fraction,
            min_rows: raw.min_rows.unwrap_or(default_min_rows()),
            truncate,
        })
    }

    fn specificity(&self) -> u8 {
        (self.table.is_some() as u8) * 2 + self.source.is_some() as u8
    }
}

/// Refuses two rules for the same source and table (which would win is not
/// obvious from the file).
pub fn check_unique(rules: &[Rule]) -> Result<(), String> {
    for (i, a) in rules.iter().enumerate() {
        if let Some(j) = rules[..i]
            .iter()
            .position(|b| b.source == a.source && b.table == a.table)
        {
            return Err(format!(
                "breakers[{i}] and breakers[{j}] are both for source {} and table {}: merge them",
                a.source.as_deref().unwrap_or("(any)"),
                a.table
                    .as_ref()
                    .map_or("(any)".to_string(), |t| t.to_string())
            ));
        }
    }
    Ok(())
}

/// The rule for changes of `table` from `source`: the most specific match.
pub fn rule_for<'a>(rules: &'a [Rule], source: &str, table: &TableName) -> Option<&'a Rule> {
    rules
        .iter()
        .filter(|r| r.source.as_deref().is_none_or(|s| s == source))
        .filter(|r| r.table.as_ref().is_none_or(|t| t == table))
        .max_by_key(|r| r.specificity())
}

/// What tripped the breaker: the threshold and the table.
#[derive(Debug, Clone, PartialEq)]
pub struct Trip {
    pub table: TableName,
    /// Which changes the trip is about: `delete`, `update`, `change`
    /// (deletes and updates) or `truncate`.
    pub kind: &'static str,
    pub reason: String,
}

impl Trip {
    /// Whether a change of `table` with `op` is of the kind that tripped
    /// (what `pgrelay breaker discard` parks).
    pub fn covers(table: &TableName, kind: &str, trip_table: &TableName, op: Op) -> bool {
        table == trip_table
            && match kind {
                "delete" => op == Op::Delete,
                "update" => op == Op::Update,
                "change" => matches!(op, Op::Delete | Op::Update),
                "truncate" => op == Op::Truncate,
                _ => false,
            }
    }
}

/// Deletes and updates of one table per second of commit time.
#[derive(Debug, Default, Clone)]
struct Window {
    /// (second, deletes, updates), oldest first
    seconds: VecDeque<(i64, u64, u64)>,
    deletes: u64,
    updates: u64,
}

impl Window {
    fn add(&mut self, second: i64, op: Op, span_s: i64) {
        // expire what fell out of the window ending at the newest second
        let newest = self.seconds.back().map_or(second, |b| b.0.max(second));
        while let Some(&(s, d, u)) = self.seconds.front() {
            if s > newest - span_s {
                break;
            }
            self.seconds.pop_front();
            self.deletes -= d;
            self.updates -= u;
        }
        if second <= newest - span_s {
            // older than the window (a late partition): it counts nowhere
            return;
        }
        let (d, u) = match op {
            Op::Delete => (1, 0),
            Op::Update => (0, 1),
            _ => return,
        };
        match self.seconds.iter_mut().rev().find(|b| b.0 == second) {
            Some(b) => {
                b.1 += d;
                b.2 += u;
            }
            None => {
                let at = self.seconds.partition_point(|b| b.0 < second);
                self.seconds.insert(at, (second, d, u));
            }
        }
        self.deletes += d;
        self.updates += u;
    }
}

/// One change as the breaker sees it.
#[derive(Debug, Clone)]
pub struct Seen<'a> {
    pub table: &'a TableName,
    pub op: Op,
    pub commit_ts_ms: i64,
}

/// What to do with a change.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Apply it.
    Pass,
    /// Park it in the dead-letter topic (`pgrelay breaker discard`).
    Discard,
    /// Stop before it: the breaker trips (or is already open).
    Hold(Option<Trip>),
}

/// The counts of one source region, shared by its apply sessions.
#[derive(Debug, Default)]
pub struct Counter {
    windows: HashMap<TableName, Window>,
    /// Changes committed at the source up to this time (ms) pass uncounted:
    /// set by a release or a discard, so the held storm passes.
    pub pass_until_ms: Option<i64>,
    /// `pgrelay breaker discard`: changes of this table and kind committed
    /// up to this time (ms) are parked.
    pub discard: Option<(TableName, String, i64)>,
    /// Why the source is frozen, if it is.
    pub frozen: Option<String>,
}

impl Counter {
    /// The deletes and updates of `table` the window holds now.
    pub fn changed(&self, table: &TableName) -> u64 {
        self.windows.get(table).map_or(0, |w| w.deletes + w.updates)
    }

    /// Judges one change. `rows` gives the table's row count here (asked
    /// only when a fraction is to be checked).
    pub fn judge(
        &mut self,
        rules: &[Rule],
        source: &str,
        change: &Seen<'_>,
        rows: &mut dyn FnMut(&TableName) -> Option<u64>,
    ) -> Verdict {
        if self.frozen.is_some() {
            return Verdict::Hold(None);
        }
        if self
            .pass_until_ms
            .is_some_and(|until| change.commit_ts_ms <= until)
        {
            if let Some((table, kind, until)) = &self.discard {
                if change.commit_ts_ms <= *until
                    && Trip::covers(change.table, kind, table, change.op)
                {
                    return Verdict::Discard;
                }
            }
            return Verdict::Pass;
        }
        let Some(rule) = rule_for(rules, source, change.table) else {
            return Verdict::Pass;
        };
        let trip = |kind, reason: String| {
            Verdict::Hold(Some(Trip {
                table: change.table.clone(),
                kind,
                reason,
            }))
        };
        if change.op == Op::Truncate {
            if rule.truncate {
                return trip(
                    "truncate",
                    format!("a truncate of {} from {source}", change.table),
                );
            }
            return Verdict::Pass;
        }
        if !matches!(change.op, Op::Delete | Op::Update) {
            return Verdict::Pass;
        }
        let window = self.windows.entry(change.table.clone()).or_default();
        let span = rule.window.as_secs().max(1) as i64;
        let mut probe = window.clone();
        probe.add(change.commit_ts_ms.div_euclid(1000), change.op, span);
        if let Some(max) = rule.max_deletes {
            if probe.deletes > max {
                return trip(
                    "delete",
                    format!(
                        "more than {max} deletes of {} from {source} within {:?}",
                        change.table, rule.window
                    ),
                );
            }
        }
        if let Some(max) = rule.max_updates {
            if probe.updates > max {
                return trip(
                    "update",
                    format!(
                        "more than {max} updates of {} from {source} within {:?}",
                        change.table, rule.window
                    ),
                );
            }
        }
        if let Some(fraction) = rule.max_fraction {
            let changed = probe.deletes + probe.updates;
            if changed >= rule.min_rows {
                if let Some(total) = rows(change.table) {
                    if total > 0 && changed as f64 > fraction * total as f64 {
                        return trip(
                            "change",
                            format!(
                                "{changed} deletes and updates of {} from {source} within {:?}, \
                                 more than {:.0}% of its {total} rows here",
                                change.table,
                                rule.window,
                                fraction * 100.0
                            ),
                        );
                    }
                }
            }
        }
        *window = probe;
        Verdict::Pass
    }

    /// After a release or a discard: counting starts again, and what the
    /// source committed up to `pass_until_ms` passes uncounted.
    pub fn resume(&mut self, pass_until_ms: i64, discard: Option<(TableName, String, i64)>) {
        self.windows.clear();
        self.frozen = None;
        self.pass_until_ms = self.pass_until_ms.max(Some(pass_until_ms));
        if discard.is_some() {
            self.discard = discard;
        }
    }
}

#[cfg(test)]
mod tests;
