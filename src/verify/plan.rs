//! What `pgrelay verify --repair` does about each difference (pure).
//!
//! Every fix goes the way a change normally goes: the region holding the
//! version that must win sends it again (`resync::send_keys`, so stamps,
//! routing, column rules and last-writer-wins apply as for any change).
//! A copy is removed first, quietly (under pgrelay's replay origin, so no
//! region hears of it, and without a tombstone, so the version sent next
//! applies), only where it must not stay:
//!
//! | kind | what is done |
//! |---|---|
//! | `missing` | the source (the writer of the version when it holds it) sends it again |
//! | `diverged` | the destination's copy is removed, the writer of the stamp (an `owned` table's owner) sends its version again |
//! | `extra` | an `owned` table's row the owner did not write is removed; the owner sends its own version of the key, if it has one |
//! | `leaked` row | removed where it is |
//! | `leaked` column | the row is removed where it is; its writer sends it again, the rule applied |
//!
//! Only reported, nothing changed: a version of an `owned` table that only
//! a non-owner holds (the owner would refuse it from there), and a fix whose
//! authoritative region was not among the regions verified.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{Difference, Kind, Report};
use crate::config::{Config, TableClass, TableConfig};
use crate::event::TableName;

/// What a step does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// `from` sends its version of the keys again to `to`.
    Resend,
    /// `to`'s copies are removed, then `from` sends its version again.
    Replace,
    /// `to`'s copies are removed; nothing is sent.
    Remove,
    /// Nothing is changed, for this reason.
    Report(&'static str),
}

/// One fix: a table, a kind, where, and the keys it covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub table: TableName,
    pub kind: Kind,
    pub action: Action,
    /// The region that sends (`Resend`, `Replace`).
    pub from: Option<String>,
    /// The region whose copies are fixed.
    pub to: String,
    /// The rule column of a `leaked` value.
    pub column: Option<String>,
    /// Send only rows `from` wrote itself (see `resync::Resend::own_only`).
    pub own_only: bool,
    pub keys: Vec<String>,
}

const OWNER_LACKS: &str =
    "only a region other than the owner holds this version, and the owner refuses a copy from \
     elsewhere: write the row again in the owner, or repair it from a backup";
const OWNER_NOT_VERIFIED: &str =
    "the table's owner was not among the regions verified: run again with it";

/// Whether a column rule alters what `region` receives of `table`: its
/// copies of rows written elsewhere are not whole.
fn receives_altered(table: &TableConfig, region: &str) -> bool {
    table.columns.iter().any(|rule| rule.applies_to(region))
}

/// The steps for a report's differences, `verified` the regions compared.
pub fn plan(config: &Config, report: &Report, verified: &[String]) -> Vec<Step> {
    let mut steps = Steps::default();
    for d in &report.differences {
        let Some(table) = config.tables.iter().find(|t| t.name.to_string() == d.table) else {
            continue;
        };
        for fix in fixes(table, d, report, verified) {
            steps.add(d, fix);
        }
    }
    steps.into_steps()
}

/// One fix of one difference; fixes of the same kind, table, action,
/// regions and column are one [`Step`].
#[derive(Debug, PartialEq, Eq)]
struct Fix {
    action: Action,
    from: Option<String>,
    to: String,
    own_only: bool,
}

impl Fix {
    fn new(action: Action, from: Option<&str>, to: &str, own_only: bool) -> Fix {
        Fix {
            action,
            from: from.map(str::to_string),
            to: to.to_string(),
            own_only,
        }
    }
}

/// What is done about difference `d` of `table` (see the module docs).
fn fixes(table: &TableConfig, d: &Difference, report: &Report, verified: &[String]) -> Vec<Fix> {
    let is_verified = |r: &str| verified.iter().any(|v| v == r);
    let owner = match &table.class {
        TableClass::Owned { owner } => Some(owner.as_str()),
        _ => None,
    };
    // a copy of a row written elsewhere may have columns a rule altered
    // on its way to `from`: only `from`'s own rows go from there
    let own_only = |from: &str| receives_altered(table, from);
    let to = d.destination.as_str();
    match d.kind {
        Kind::Leaked if d.column.is_none() => vec![Fix::new(Action::Remove, None, to, false)],
        Kind::Leaked => {
            if is_verified(&d.source) {
                vec![Fix::new(Action::Replace, Some(&d.source), to, false)]
            } else {
                vec![Fix::new(Action::Remove, None, to, false)]
            }
        }
        Kind::Missing => {
            if owner.is_some_and(|o| o != d.source) {
                vec![Fix::new(Action::Report(OWNER_LACKS), None, to, false)]
            } else {
                let own = own_only(&d.source);
                vec![Fix::new(Action::Resend, Some(&d.source), to, own)]
            }
        }
        Kind::Extra => match owner {
            Some(o) if is_verified(o) => vec![Fix::new(Action::Replace, Some(o), to, false)],
            _ => vec![Fix::new(
                Action::Report(OWNER_NOT_VERIFIED),
                None,
                to,
                false,
            )],
        },
        Kind::Diverged => {
            // the authority: the owner, or the writer of the stamp
            let writer = report
                .found
                .iter()
                .find(|(f, _)| same_key(f, d) && f.kind == Kind::Diverged)
                .and_then(|(_, preferred)| preferred.clone());
            let authority = owner.map(str::to_string).or(writer);
            match authority {
                Some(a) if is_verified(&a) => {
                    let targets = diverged_from(report, d, &a);
                    if !targets.is_empty() {
                        return targets
                            .into_iter()
                            .map(|t| Fix::new(Action::Replace, Some(&a), &t, own_only(&a)))
                            .collect();
                    }
                }
                _ => {}
            }
            if owner.is_some() {
                vec![Fix::new(
                    Action::Report(OWNER_NOT_VERIFIED),
                    None,
                    to,
                    false,
                )]
            } else {
                // no pair with the writer: the pair's first region wins
                let own = own_only(&d.source);
                vec![Fix::new(Action::Replace, Some(&d.source), to, own)]
            }
        }
    }
}

/// The regions whose copy of `d`'s key differs from `authority`'s, by the
/// report's `diverged` findings for the key.
fn diverged_from(report: &Report, d: &Difference, authority: &str) -> Vec<String> {
    report
        .found
        .iter()
        .filter(|(f, _)| same_key(f, d) && f.kind == Kind::Diverged)
        .filter_map(|(f, _)| {
            if f.source == authority {
                Some(f.destination.clone())
            } else if f.destination == authority {
                Some(f.source.clone())
            } else {
                None
            }
        })
        .collect()
}

/// Fixes grouped into steps: by table, kind, action, regions and column,
/// each key once. The first fix of a step decides its action and
/// `own_only`.
#[derive(Default)]
struct Steps {
    grouped: BTreeMap<StepSlot, (Action, bool, Vec<String>)>,
}

/// Table, kind, action name, from, to, column.
type StepSlot = (
    TableName,
    Kind,
    String,
    Option<String>,
    String,
    Option<String>,
);

impl Steps {
    /// Adds `fix` of difference `d` (one of a table that cannot be named is
    /// left out).
    fn add(&mut self, d: &Difference, fix: Fix) {
        let Ok(table) = TableName::parse(&d.table) else {
            return;
        };
        let slot = (
            table,
            d.kind,
            action_name(&fix.action).to_string(),
            fix.from,
            fix.to,
            d.column.clone(),
        );
        let entry = self
            .grouped
            .entry(slot)
            .or_insert((fix.action, fix.own_only, Vec::new()));
        if let Some(k) = &d.key {
            if !entry.2.contains(k) {
                entry.2.push(k.clone());
            }
        }
    }

    fn into_steps(self) -> Vec<Step> {
        self.grouped
            .into_iter()
            .map(
                |((table, kind, _, from, to, column), (action, own_only, keys))| Step {
                    table,
                    kind,
                    action,
                    from,
                    to,
                    column,
                    own_only,
                    keys,
                },
            )
            .collect()
    }
}

fn same_key(a: &Difference, b: &Difference) -> bool {
    a.table == b.table && a.key == b.key && a.key.is_some()
}

pub fn action_name(action: &Action) -> &'static str {
    match action {
        Action::Resend => "resend",
        Action::Replace => "replace",
        Action::Remove => "remove",
        Action::Report(_) => "report",
    }
}
