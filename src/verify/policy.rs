//! What two regions must share of a table, and what a region must not
//! hold, by the residency policy: the table's [`TableRule`], which
//! `residency::Policy::route` applies to each change (the tests hold the
//! two to each other).

use std::collections::BTreeMap;

use crate::config::{ColumnAction, Config, TableClass, TableConfig};
use crate::residency::TableRule;

/// Every home column value the policy knows, with its home region: each
/// region's own name, then the aliases (which win, as in routing).
pub fn home_values(config: &Config, table: &TableConfig) -> BTreeMap<String, String> {
    TableRule::compile(config, table)
        .home_values()
        .map(|(value, home)| (value.to_string(), home.to_string()))
        .collect()
}

/// Which rows of `table` regions `a` and `b` must both hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Share {
    /// Every row (`global`, `owned`).
    All,
    /// The rows whose home column holds one of these values.
    Homes(Vec<String>),
    /// None: the pair is not compared.
    Nothing,
}

pub fn share(config: &Config, table: &TableConfig, a: &str, b: &str) -> Share {
    match &table.class {
        TableClass::Local => Share::Nothing,
        TableClass::Global | TableClass::Owned { .. } => Share::All,
        TableClass::Partitioned { .. } => {
            let rule = TableRule::compile(config, table);
            let values: Vec<String> = rule
                .home_values()
                .filter(|(value, _)| {
                    rule.may_hold(a, value).is_ok() && rule.may_hold(b, value).is_ok()
                })
                .map(|(value, _)| value.to_string())
                .collect();
            if values.is_empty() {
                Share::Nothing
            } else {
                Share::Homes(values)
            }
        }
    }
}

/// Home column values whose rows `region` must not hold, with their home.
pub fn forbidden_homes(
    config: &Config,
    table: &TableConfig,
    region: &str,
) -> BTreeMap<String, String> {
    let rule = TableRule::compile(config, table);
    rule.home_values()
        .filter(|(value, _)| rule.may_hold(region, value).is_err())
        .map(|(value, home)| (value.to_string(), home.to_string()))
        .collect()
}

/// Whether a column rule alters `column` for `a` or for `b`: such a column
/// holds different values in the two regions by design and is not compared
/// between them.
pub fn altered_between(table: &TableConfig, column: &str, a: &str, b: &str) -> bool {
    table
        .columns
        .iter()
        .any(|rule| rule.covers(column) && (rule.applies_to(a) || rule.applies_to(b)))
}

/// The form a column must have in `region` when another region wrote the
/// row: masked to this text, or a keyed hash (`{key id}:` + 64 hex digits).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Form {
    Mask(String),
    Hash { key_ids: Vec<String> },
}

/// The rule columns of `table` that arrive in `region` masked or hashed,
/// each under the first of its names (current, then `formerly`) that
/// `columns` (the table's columns) has; a rule none of whose names is
/// there is not checked. Dropped columns are not checked either: the apply
/// side leaves them to their default, which may be anything.
pub fn arriving_forms(
    config: &Config,
    table: &TableConfig,
    region: &str,
    columns: &[String],
) -> Vec<(String, Form)> {
    let key_ids: Vec<String> = config
        .regions
        .values()
        .filter(|r| r.name != region)
        .map(|r| r.hash_key_id.clone())
        .collect();
    let mut out: Vec<(String, Form)> = Vec::new();
    for rule in table.columns.iter().filter(|r| r.applies_to(region)) {
        let Some(name) = rule.names().find(|n| columns.iter().any(|c| c == n)) else {
            continue;
        };
        if out.iter().any(|(c, _)| c == name) {
            continue;
        }
        match &rule.action {
            ColumnAction::Drop => {}
            ColumnAction::Mask(mask) => out.push((name.to_string(), Form::Mask(mask.clone()))),
            ColumnAction::Hash => out.push((
                name.to_string(),
                Form::Hash {
                    key_ids: key_ids.clone(),
                },
            )),
        }
    }
    out
}
