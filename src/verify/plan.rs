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
    type Slot = (
        TableName,
        Kind,
        String,
        Option<String>,
        String,
        Option<String>,
    );
    let mut grouped: BTreeMap<Slot, (Action, bool, Vec<String>)> = BTreeMap::new();
    let mut add = |d: &Difference, action: Action, from: Option<&str>, to: &str, own: bool| {
        let Ok(table) = TableName::parse(&d.table) else {
            return;
        };
        let slot = (
            table,
            d.kind,
            action_name(&action).to_string(),
            from.map(str::to_string),
            to.to_string(),
            d.column.clone(),
        );
        let entry = grouped.entry(slot).or_insert((action, own, Vec::new()));
        if let Some(k) = &d.key {
            if !entry.2.contains(k) {
                entry.2.push(k.clone());
            }
        }
    };
    let is_verified = |r: &str| verified.iter().any(|v| v == r);
    for d in &report.differences {
        let Some(table) = config.tables.iter().find(|t| t.name.to_string() == d.table) else {
            continue;
        };
        let owner = match &table.class {
            TableClass::Owned { owner } => Some(owner.as_str()),
            _ => None,
        };
        // a copy of a row written elsewhere may have columns a rule altered
        // on its way to `from`: only `from`'s own rows go from there
        let own_only = |from: &str, _to: &str| receives_altered(table, from);
        match d.kind {
            Kind::Leaked if d.column.is_none() => {
                add(d, Action::Remove, None, &d.destination, false);
            }
            Kind::Leaked => {
                if is_verified(&d.source) {
                    add(d, Action::Replace, Some(&d.source), &d.destination, false);
                } else {
                    add(d, Action::Remove, None, &d.destination, false);
                }
            }
            Kind::Missing => {
                if owner.is_some_and(|o| o != d.source) {
                    add(d, Action::Report(OWNER_LACKS), None, &d.destination, false);
                } else {
                    let own = own_only(&d.source, &d.destination);
                    add(d, Action::Resend, Some(&d.source), &d.destination, own);
                }
            }
            Kind::Extra => match owner {
                Some(o) if is_verified(o) => {
                    add(d, Action::Replace, Some(o), &d.destination, false);
                }
                _ => add(
                    d,
                    Action::Report(OWNER_NOT_VERIFIED),
                    None,
                    &d.destination,
                    false,
                ),
            },
            Kind::Diverged => {
                // the authority: the owner, or the writer of the stamp
                let writer = report
                    .found
                    .iter()
                    .find(|(f, _)| same_key(f, d) && f.kind == Kind::Diverged)
                    .and_then(|(_, preferred)| preferred.clone());
                let authority = owner.map(str::to_string).or(writer);
                let targets: Vec<String> = match &authority {
                    Some(a) if is_verified(a) => report
                        .found
                        .iter()
                        .filter(|(f, _)| same_key(f, d) && f.kind == Kind::Diverged)
                        .filter_map(|(f, _)| {
                            if f.source == *a {
                                Some(f.destination.clone())
                            } else if f.destination == *a {
                                Some(f.source.clone())
                            } else {
                                None
                            }
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                if !targets.is_empty() {
                    let a = authority.expect("targets come from the authority");
                    for to in targets {
                        add(d, Action::Replace, Some(&a), &to, own_only(&a, &to));
                    }
                } else if owner.is_some() {
                    add(
                        d,
                        Action::Report(OWNER_NOT_VERIFIED),
                        None,
                        &d.destination,
                        false,
                    );
                } else {
                    // no pair with the writer: the pair's first region wins
                    let own = own_only(&d.source, &d.destination);
                    add(d, Action::Replace, Some(&d.source), &d.destination, own);
                }
            }
        }
    }
    grouped
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
