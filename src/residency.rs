//! The residency policy: which rows and which column values of a change may
//! go to which destination region.
//!
//! ```text
//!  Config ──compile(source)──▶ Policy
//!  Change ──route(dest)──────▶ Publish(Routed) | Drop(reason)
//! ```
//!
//! A [`Policy`] is compiled once per source region; [`Policy::route`] is a
//! plain synchronous function on the hot path (about one call per row and
//! destination). The per-table, per-destination work (which columns to drop,
//! hash or mask, where the home column is) is resolved once per relation
//! schema and cached by relation oid, so routing a row costs one small map
//! lookup, the home lookup and the copy of the tuples.
//!
//! Rules (brief §3): undeclared tables never leave. Which regions may hold
//! a row, and which changes of a declared table travel at all (`local`
//! never, `owned` from its owner only, a `partitioned` table's truncate
//! never), is the table's [`TableRule`], defined once in `rule.rs` and read
//! alike by routing, the apply side's admission, resync and verify; here it
//! is compiled per source into one bit set of destinations per home value.
//! A row whose home moves is inserted where it becomes allowed and deleted
//! where it stops being allowed. Column rules run last, on both tuples, and
//! fail closed: a table whose rules name a column its relation lacks goes
//! nowhere ([`Policy::check_relation`] lets the caller stop on it first).
//!
//! Nothing here logs or returns row values.
//!
//! Over 600 lines on purpose: the routing of one change is one decision
//! (rows, columns, keys) and reads best in one place.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::{ColumnAction, Config, ConfigError};
use crate::event::{Change, Datum, Op, TableName, TableSchema};

/// What to do with one change for one destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict<'a> {
    Publish(Routed<'a>),
    Drop(DropReason),
}

/// A change as it may leave for one destination: column rules applied, and
/// for a partitioned row whose home moved, possibly turned into an insert or
/// a delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Routed<'a> {
    pub op: Op,
    /// Column names, after dropped columns are removed; tuples are indexed
    /// like this.
    pub columns: Arc<[String]>,
    /// The change's own tuples when no rule alters them (no copy).
    pub before: Option<Cow<'a, [Datum]>>,
    pub after: Option<Cow<'a, [Datum]>>,
}

/// Why a change does not go to a destination (a metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The table is not in the config.
    Undeclared,
    /// The table is `local`.
    Local,
    /// The row's home does not allow this destination.
    HomeNotAllowed,
    /// The row's home column is NULL, missing or names no region.
    UnknownHome,
    /// An `owned` table written outside its owner region.
    NotOwner,
    /// A TRUNCATE of a `partitioned` table: it would empty the table of
    /// rows homed elsewhere too, so it stays home.
    TruncatePartitioned,
    /// A column rule names a column the table does not have (renamed?):
    /// the table's rows stay home (fail closed).
    RuleColumnMissing,
}

impl DropReason {
    pub const ALL: [DropReason; 7] = [
        DropReason::Undeclared,
        DropReason::Local,
        DropReason::HomeNotAllowed,
        DropReason::UnknownHome,
        DropReason::NotOwner,
        DropReason::TruncatePartitioned,
        DropReason::RuleColumnMissing,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Undeclared => "undeclared",
            DropReason::Local => "local",
            DropReason::HomeNotAllowed => "home_not_allowed",
            DropReason::UnknownHome => "unknown_home",
            DropReason::NotOwner => "not_owner",
            DropReason::TruncatePartitioned => "truncate_partitioned",
            DropReason::RuleColumnMissing => "rule_column_missing",
        }
    }
}

/// The residency policy of one source region.
pub struct Policy {
    source: String,
    /// Every other region, sorted; `dest_index` indexes this.
    destinations: Vec<String>,
    tables: HashMap<TableName, Arc<TableRules>>,
    /// HMAC-SHA-256 keyed with the source region's hash key, cloned per
    /// hashed value, and the key's id that prefixes the output.
    keyed: Option<(Hmac<Sha256>, String)>,
    /// Resolved plans by relation oid (see [`SchemaPlan`]).
    plans: Mutex<HashMap<u32, Arc<SchemaPlan>>>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("source", &self.source)
            .field("destinations", &self.destinations)
            .field("tables", &self.tables.len())
            .finish_non_exhaustive()
    }
}

/// One table's rules, compiled for the source region.
#[derive(Debug)]
struct TableRules {
    /// The table's residency rule, as every side reads it.
    rule: TableRule,
    /// The rule compiled for this source: which rows leave, by home value.
    rows: RowRule,
    /// Per destination index: (column, action) of the rules that apply there.
    columns: Vec<Vec<(String, ColumnAction)>>,
    /// Every column some rule names (for any destination), in config order:
    /// its name, then its earlier names (one of them must be there).
    rule_columns: Vec<Vec<String>>,
}

/// A relation whose shape the table's rules cannot be applied to safely:
/// its changes must not be routed at all (fail closed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelationError {
    #[error(
        "table {table} has no column {column:?}, which a column rule in [[tables.columns]] \
         names; its changes are not published, so a renamed column cannot leave the region \
         unprotected. Point the rule at the column's current name with formerly = \
         [{column:?}] (changes written before the rename still carry it), or remove the rule if \
         the column was dropped, then restart"
    )]
    MissingRuleColumn { table: TableName, column: String },
    #[error(
        "table {table} has column {column:?}, which a column rule in [[tables.columns]] names, \
         but the stream is at changes written before it had that name (a backlog from before a \
         rename; the shape then had {earlier}); they are not published, so the column cannot \
         leave the region under its earlier name. Add the earlier name to the rule, \
         formerly = [\"<earlier name>\"], then restart"
    )]
    RuleColumnNamedLater {
        table: TableName,
        column: String,
        /// The shape's columns the table no longer has (the earlier name is
        /// one of them), as a readable list.
        earlier: String,
    },
    #[error(
        "table {table} is partitioned (each row's home read from column {home_column:?}) but \
         its replica identity is now {identity}, not FULL: the old home of a changed row is no \
         longer known. Run ALTER TABLE {table} REPLICA IDENTITY FULL (or pgrelay setup); the \
         changes written meanwhile cannot be routed: recreate the slot and resync as for a lost \
         slot (docs/operations.md, Resync)"
    )]
    PartitionedIdentity {
        table: TableName,
        home_column: String,
        identity: &'static str,
    },
}

#[derive(Debug)]
enum RowRule {
    Never(DropReason),
    All,
    Partitioned(Partition),
}

#[derive(Debug)]
struct Partition {
    home_column: String,
    /// Home column value -> bit `d` set when destination `d` may hold rows
    /// whose home column holds that value ([`TableRule::may_hold`]); a
    /// value absent here names no home.
    allowed: HashMap<String, u64>,
}

impl Partition {
    /// Allowed destinations of a row, from its home column value; `None`
    /// when the home is unknown (allowed nowhere).
    fn allowed_for(&self, value: Option<&Datum>) -> Option<u64> {
        match value? {
            Datum::Text(v) => self.allowed.get(v.as_str()).copied(),
            Datum::Null | Datum::Unchanged => None,
        }
    }
}

/// The rules of one table resolved against one relation schema.
#[derive(Debug)]
struct SchemaPlan {
    /// The schema this plan was built for: a cached plan is reused only for
    /// this very schema (same `Arc`, or an equal one).
    schema: Arc<TableSchema>,
    body: PlanBody,
}

#[derive(Debug)]
enum PlanBody {
    Never(DropReason),
    Publish {
        rules: Arc<TableRules>,
        /// Index of the home column in the tuples; `None` for tables that
        /// are not partitioned, or whose stream lacks the home column.
        home_index: Option<usize>,
        dests: Vec<DestPlan>,
    },
}

/// What one destination gets of a tuple.
#[derive(Debug)]
struct DestPlan {
    columns: Arc<[String]>,
    /// Per schema column; `None` when every column goes as is.
    ops: Option<Box<[ColOp]>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ColOp {
    Keep,
    Drop,
    Hash,
    Mask(String),
}

impl Policy {
    /// Compiles the policy of `source` (a declared region).
    pub fn compile(config: &Config, source: &str) -> Result<Policy, ConfigError> {
        config.region(source)?;
        let regions: Vec<&String> = config.regions.keys().collect();
        let destinations: Vec<String> = regions
            .iter()
            .filter(|r| r.as_str() != source)
            .map(|r| r.to_string())
            .collect();
        if destinations.len() > 64 {
            return Err(ConfigError::Invalid {
                origin: config.origin.clone(),
                line: None,
                message: format!("{} regions: at most 63 are supported", regions.len()),
            });
        }

        let mut tables = HashMap::with_capacity(config.tables.len());
        let mut any_hash = false;
        for table in &config.tables {
            let residency = TableRule::compile(config, table);
            if let Some(region) = residency
                .named_regions()
                .find(|region| !config.regions.contains_key(*region))
            {
                return Err(ConfigError::Invalid {
                    origin: config.origin.clone(),
                    line: None,
                    message: format!(
                        "table {}: region {region:?} is not declared; declared regions: {}",
                        table.name,
                        config.declared_regions()
                    ),
                });
            }
            let rows = match (residency.leaves(source), residency.home_column()) {
                (Err(reason), _) => RowRule::Never(reason),
                (Ok(()), None) => RowRule::All,
                (Ok(()), Some(home_column)) => {
                    // each home value's destinations, as a bit set
                    let allowed = residency
                        .home_values()
                        .map(|(value, _)| {
                            let mask = destinations
                                .iter()
                                .enumerate()
                                .filter(|(_, dest)| residency.may_hold(dest, value).is_ok())
                                .fold(0u64, |mask, (d, _)| mask | 1 << d);
                            (value.to_string(), mask)
                        })
                        .collect();
                    RowRule::Partitioned(Partition {
                        home_column: home_column.to_string(),
                        allowed,
                    })
                }
            };
            let columns = destinations
                .iter()
                .map(|dest| {
                    table
                        .columns
                        .iter()
                        .filter(|rule| rule.applies_to(dest))
                        .flat_map(|rule| {
                            rule.names()
                                .map(|name| (name.to_string(), rule.action.clone()))
                        })
                        .collect::<Vec<_>>()
                })
                .collect::<Vec<_>>();
            any_hash |= table
                .columns
                .iter()
                .any(|rule| rule.action == ColumnAction::Hash);
            let mut rule_columns: Vec<Vec<String>> = Vec::new();
            for rule in &table.columns {
                let names: Vec<String> = rule.names().map(str::to_string).collect();
                if !rule_columns.contains(&names) {
                    rule_columns.push(names);
                }
            }
            tables.insert(
                table.name.clone(),
                Arc::new(TableRules {
                    rule: residency,
                    rows,
                    columns,
                    rule_columns,
                }),
            );
        }
        let keyed = match (config.hash_key(source)?, any_hash) {
            (Some(key), _) => {
                let mac = <Hmac<Sha256> as Mac>::new_from_slice(key.as_bytes()).map_err(|_| {
                    ConfigError::Invalid {
                        origin: config.origin.clone(),
                        line: None,
                        message: format!("regions.{source}.hash_key cannot key HMAC-SHA-256"),
                    }
                })?;
                Some((mac, config.regions[source].hash_key_id.clone()))
            }
            (None, true) => {
                return Err(ConfigError::Invalid {
                    origin: config.origin.clone(),
                    line: None,
                    message: format!(
                    "a column rule uses action = \"hash\" but regions.{source}.hash_key is not set"
                ),
                })
            }
            (None, false) => None,
        };
        Ok(Policy {
            source: source.to_string(),
            destinations,
            tables,
            keyed,
            plans: Mutex::new(HashMap::new()),
        })
    }

    /// The region this policy routes from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Every other region, sorted: `route`'s `dest_index` indexes this.
    pub fn destinations(&self) -> &[String] {
        &self.destinations
    }

    /// The residency rule of a declared table.
    pub fn rule(&self, table: &TableName) -> Option<&TableRule> {
        self.tables.get(table).map(|t| &t.rule)
    }

    /// Declared and not local: changes of this table are worth decoding.
    pub fn is_declared(&self, table: &TableName) -> bool {
        self.tables
            .get(table)
            .is_some_and(|t| !matches!(t.rows, RowRule::Never(DropReason::Local)))
    }

    /// Whether the table's rules can be applied to a relation of this shape:
    /// every column a rule names must exist (a renamed column must not
    /// slip past its rule), and a `partitioned` table must still have
    /// replica identity FULL (`replica_identity` as pgoutput sends it:
    /// `d`, `n`, `f` or `i`; `None` when not known, e.g. for whole rows
    /// read by resync). Undeclared and `local` tables always pass.
    pub fn check_relation<'n>(
        &self,
        table: &TableName,
        columns: impl IntoIterator<Item = &'n str> + Clone,
        replica_identity: Option<u8>,
    ) -> Result<(), RelationError> {
        let Some(rules) = self.tables.get(table) else {
            return Ok(());
        };
        if matches!(rules.rows, RowRule::Never(_)) {
            return Ok(());
        }
        for names in &rules.rule_columns {
            if !columns
                .clone()
                .into_iter()
                .any(|c| names.iter().any(|n| n == c))
            {
                return Err(RelationError::MissingRuleColumn {
                    table: table.clone(),
                    column: names[0].clone(),
                });
            }
        }
        if let (RowRule::Partitioned(p), Some(identity)) = (&rules.rows, replica_identity) {
            if identity != b'f' {
                return Err(RelationError::PartitionedIdentity {
                    table: table.clone(),
                    home_column: p.home_column.clone(),
                    identity: match identity {
                        b'd' => "DEFAULT",
                        b'n' => "NOTHING",
                        b'i' => "USING INDEX",
                        _ => "unknown",
                    },
                });
            }
        }
        Ok(())
    }

    /// What `change` becomes for destination `destinations()[dest_index]`.
    pub fn route<'c>(&self, change: &'c Change, dest_index: usize) -> Verdict<'c> {
        debug_assert!(dest_index < self.destinations.len());
        let plan = self.plan(&change.schema);
        let (rules, home_index, dest) = match &plan.body {
            PlanBody::Never(reason) => return Verdict::Drop(*reason),
            PlanBody::Publish {
                rules,
                home_index,
                dests,
            } => (rules, *home_index, &dests[dest_index]),
        };
        let before = change.before.as_deref();
        let after = change.after.as_deref();
        let partition = match &rules.rows {
            RowRule::Never(reason) => return Verdict::Drop(*reason),
            RowRule::All => None,
            RowRule::Partitioned(p) => Some(p),
        };
        if let Err(reason) = rules.rule.sends(&self.source, change.op) {
            return Verdict::Drop(reason);
        }
        let Some(partition) = partition else {
            return self.publish(dest, change.op, before, after, None);
        };
        let Some(home) = home_index else {
            return Verdict::Drop(DropReason::UnknownHome);
        };
        let bit = 1u64 << dest_index;
        fn at(row: Option<&[Datum]>, index: usize) -> Option<&Datum> {
            row.and_then(|r| r.get(index))
        }
        let home_value = |row| at(row, home);
        match change.op {
            Op::Insert => match partition.allowed_for(home_value(after)) {
                None => Verdict::Drop(DropReason::UnknownHome),
                Some(mask) if mask & bit == 0 => Verdict::Drop(DropReason::HomeNotAllowed),
                Some(_) => self.publish(dest, Op::Insert, None, after, None),
            },
            Op::Delete => match partition.allowed_for(home_value(before)) {
                None => Verdict::Drop(DropReason::UnknownHome),
                Some(mask) if mask & bit == 0 => Verdict::Drop(DropReason::HomeNotAllowed),
                Some(_) => self.publish(dest, Op::Delete, before, None, None),
            },
            Op::Update => {
                // The new row's home; an unchanged (TOAST) home column keeps
                // the old row's value.
                let new_home = match home_value(after) {
                    Some(Datum::Unchanged) => home_value(before),
                    value => value,
                };
                // The old row's home when the stream carried it, else the
                // home did not change.
                let old_home = match home_value(before) {
                    Some(Datum::Unchanged) | None => new_home,
                    value => value,
                };
                let new_allowed = partition.allowed_for(new_home);
                let old_allowed = partition.allowed_for(old_home);
                let new_ok = new_allowed.is_some_and(|m| m & bit != 0);
                let old_ok = old_allowed.is_some_and(|m| m & bit != 0);
                match (old_ok, new_ok) {
                    (true, true) => self.publish(dest, Op::Update, before, after, None),
                    // the row moved out of this destination's reach
                    (true, false) => self.publish(dest, Op::Delete, before, None, None),
                    // the row moved in: send it whole
                    (false, true) => self.publish(dest, Op::Insert, None, after, before),
                    (false, false) if new_allowed.is_none() => {
                        Verdict::Drop(DropReason::UnknownHome)
                    }
                    (false, false) => Verdict::Drop(DropReason::HomeNotAllowed),
                }
            }
            Op::Truncate => unreachable!("never sent: TableRule::sends"),
        }
    }

    fn publish<'c>(
        &self,
        dest: &DestPlan,
        op: Op,
        before: Option<&'c [Datum]>,
        after: Option<&'c [Datum]>,
        fill_from: Option<&[Datum]>,
    ) -> Verdict<'c> {
        Verdict::Publish(Routed {
            op,
            columns: dest.columns.clone(),
            before: before.map(|row| self.project(dest, row, None)),
            after: after.map(|row| self.project(dest, row, fill_from)),
        })
    }

    /// Applies the destination's column rules to one tuple; `Unchanged`
    /// values are taken from `fill_from` when it has the value.
    fn project<'c>(
        &self,
        dest: &DestPlan,
        row: &'c [Datum],
        fill_from: Option<&[Datum]>,
    ) -> Cow<'c, [Datum]> {
        let value = |i: usize, v: &Datum| -> Datum {
            match (v, fill_from.and_then(|f| f.get(i))) {
                (Datum::Unchanged, Some(filled @ (Datum::Text(_) | Datum::Null))) => filled.clone(),
                _ => v.clone(),
            }
        };
        let Some(ops) = &dest.ops else {
            let fills = fill_from.is_some() && row.contains(&Datum::Unchanged);
            if !fills {
                return Cow::Borrowed(row);
            }
            return Cow::Owned(row.iter().enumerate().map(|(i, v)| value(i, v)).collect());
        };
        let mut out = Vec::with_capacity(dest.columns.len());
        for (i, v) in row.iter().enumerate() {
            match ops.get(i).unwrap_or(&ColOp::Keep) {
                ColOp::Keep => out.push(value(i, v)),
                ColOp::Drop => {}
                ColOp::Hash => out.push(match value(i, v) {
                    Datum::Text(text) => Datum::Text(self.hash(&text)),
                    other => other,
                }),
                ColOp::Mask(mask) => out.push(match value(i, v) {
                    Datum::Text(_) => Datum::Text(mask.clone()),
                    other => other,
                }),
            }
        }
        Cow::Owned(out)
    }

    /// `{key_id}:` and the lowercase hex of HMAC-SHA-256(hash_key, value).
    fn hash(&self, value: &str) -> String {
        let Some((mac, key_id)) = &self.keyed else {
            // compile() refuses hash rules without a key
            unreachable!("hash rule without a key");
        };
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let digest = mac
            .clone()
            .chain_update(value.as_bytes())
            .finalize()
            .into_bytes();
        let mut out = String::with_capacity(key_id.len() + 1 + 2 * digest.len());
        out.push_str(key_id);
        out.push(':');
        for byte in digest {
            out.push(HEX[usize::from(byte >> 4)] as char);
            out.push(HEX[usize::from(byte & 0xf)] as char);
        }
        out
    }

    /// The plan for a relation schema, from the cache when the schema is the
    /// one it was built for.
    fn plan(&self, schema: &Arc<TableSchema>) -> Arc<SchemaPlan> {
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(plan) = plans.get(&schema.oid) {
            if Arc::ptr_eq(&plan.schema, schema) || plan.schema == *schema {
                return plan.clone();
            }
        }
        let plan = Arc::new(self.build_plan(schema));
        plans.insert(schema.oid, plan.clone());
        plan
    }

    fn build_plan(&self, schema: &Arc<TableSchema>) -> SchemaPlan {
        let body = match self.tables.get(&schema.table) {
            None => PlanBody::Never(DropReason::Undeclared),
            Some(rules) => match &rules.rows {
                RowRule::Never(reason) => PlanBody::Never(*reason),
                // fail closed: a rule that matches no column (renamed?)
                // stops the table, it never lets the column through
                _ if rules
                    .rule_columns
                    .iter()
                    .any(|names| names.iter().all(|c| schema.column_index(c).is_none())) =>
                {
                    PlanBody::Never(DropReason::RuleColumnMissing)
                }
                rows => {
                    let home_index = match rows {
                        RowRule::Partitioned(p) => {
                            let index = schema.column_index(&p.home_column);
                            if index.is_none() {
                                tracing::warn!(
                                    table = %schema.table,
                                    column = %p.home_column,
                                    "home column missing from the relation; its rows stay home"
                                );
                            }
                            index
                        }
                        _ => None,
                    };
                    let dests = rules
                        .columns
                        .iter()
                        .map(|col_rules| dest_plan(schema, col_rules))
                        .collect();
                    PlanBody::Publish {
                        rules: rules.clone(),
                        home_index,
                        dests,
                    }
                }
            },
        };
        SchemaPlan {
            schema: schema.clone(),
            body,
        }
    }
}

fn dest_plan(schema: &TableSchema, rules: &[(String, ColumnAction)]) -> DestPlan {
    let ops: Vec<ColOp> = schema
        .columns
        .iter()
        .map(
            |col| match rules.iter().find(|(name, _)| *name == col.name) {
                None => ColOp::Keep,
                Some((_, ColumnAction::Drop)) => ColOp::Drop,
                Some((_, ColumnAction::Hash)) => ColOp::Hash,
                Some((_, ColumnAction::Mask(mask))) => ColOp::Mask(mask.clone()),
            },
        )
        .collect();
    let columns: Arc<[String]> = schema
        .columns
        .iter()
        .zip(&ops)
        .filter(|(_, op)| **op != ColOp::Drop)
        .map(|(col, _)| col.name.clone())
        .collect();
    let identity = ops.iter().all(|op| *op == ColOp::Keep);
    DestPlan {
        columns,
        ops: (!identity).then(|| ops.into_boxed_slice()),
    }
}

mod matrix;
mod rule;
pub use matrix::matrix;
pub use rule::TableRule;

#[cfg(test)]
mod tests;
