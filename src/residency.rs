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
//! Rules (brief §3): undeclared and `local` tables never leave; `global`
//! tables go everywhere; `owned` tables go everywhere from their owner only;
//! a `partitioned` row goes to its home and to the regions `allow` lists for
//! that home, and a row whose home moves is inserted where it becomes allowed
//! and deleted where it stops being allowed. A truncate of a `partitioned`
//! table has no rows, hence no homes, and stays home: elsewhere it would
//! remove rows homed there. Column rules run last, on both tuples, and fail
//! closed: a table whose rules name a column its relation lacks goes
//! nowhere ([`Policy::check_relation`] lets the caller stop on it first).
//!
//! Nothing here logs or returns row values.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::{ColumnAction, Config, ConfigError, TableClass, TableConfig};
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
    rows: RowRule,
    /// Per destination index: (column, action) of the rules that apply there.
    columns: Vec<Vec<(String, ColumnAction)>>,
    /// Every column some rule names (for any destination), in config order.
    rule_columns: Vec<String>,
}

/// A relation whose shape the table's rules cannot be applied to safely:
/// its changes must not be routed at all (fail closed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelationError {
    #[error(
        "table {table} has no column {column:?}, which a column rule in [[tables.columns]] \
         names; its changes are not published, so a renamed column cannot leave the region \
         unprotected. Point the rule at the column's current name (or remove the rule if the \
         column was dropped), then restart"
    )]
    MissingRuleColumn { table: TableName, column: String },
    #[error(
        "table {table} is partitioned (each row's home read from column {home_column:?}) but \
         its replica identity is now {identity}, not FULL: the old home of a changed row is no \
         longer known. Run ALTER TABLE {table} REPLICA IDENTITY FULL (or pgrelay setup); the \
         changes written meanwhile cannot be routed: recreate the slot and resync as for a lost \
         slot (README, Resync)"
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
    /// Home column value -> home region (index in the sorted region list).
    homes: HashMap<String, usize>,
    /// Per home region: bit `d` is set when destination `d` may receive
    /// rows homed there.
    allowed: Vec<u64>,
}

impl Partition {
    /// Allowed destinations of a row, from its home column value; `None`
    /// when the home is unknown (allowed nowhere).
    fn allowed_for(&self, value: Option<&Datum>) -> Option<u64> {
        match value? {
            Datum::Text(v) => self.homes.get(v.as_str()).map(|&home| self.allowed[home]),
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
        let region_index = |name: &str| regions.iter().position(|r| r.as_str() == name);
        let dest_index = |name: &str| destinations.iter().position(|d| d == name);
        let undeclared = |table: &TableConfig, region: &str| ConfigError::Invalid {
            origin: config.origin.clone(),
            line: None,
            message: format!(
                "table {}: region {region:?} is not declared; declared regions: {}",
                table.name,
                config.declared_regions()
            ),
        };

        let mut tables = HashMap::with_capacity(config.tables.len());
        let mut any_hash = false;
        for table in &config.tables {
            let rows = match &table.class {
                TableClass::Local => RowRule::Never(DropReason::Local),
                TableClass::Global => RowRule::All,
                TableClass::Owned { owner } if owner == source => RowRule::All,
                TableClass::Owned { .. } => RowRule::Never(DropReason::NotOwner),
                TableClass::Partitioned {
                    home_column,
                    aliases,
                    allow,
                } => {
                    let mut homes: HashMap<String, usize> = regions
                        .iter()
                        .enumerate()
                        .map(|(i, r)| (r.to_string(), i))
                        .collect();
                    for (value, region) in aliases {
                        let home = region_index(region).ok_or_else(|| undeclared(table, region))?;
                        homes.insert(value.clone(), home);
                    }
                    let mut allowed = vec![0u64; regions.len()];
                    for (home, mask) in allowed.iter_mut().enumerate() {
                        let home_name = regions[home].as_str();
                        let extra = allow.get(home_name).into_iter().flatten();
                        for region in std::iter::once(home_name).chain(extra.map(String::as_str)) {
                            if region_index(region).is_none() {
                                return Err(undeclared(table, region));
                            }
                            if let Some(d) = dest_index(region) {
                                *mask |= 1 << d;
                            }
                        }
                    }
                    RowRule::Partitioned(Partition {
                        home_column: home_column.clone(),
                        homes,
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
                        .map(|rule| (rule.column.clone(), rule.action.clone()))
                        .collect::<Vec<_>>()
                })
                .collect::<Vec<_>>();
            any_hash |= table
                .columns
                .iter()
                .any(|rule| rule.action == ColumnAction::Hash);
            let mut rule_columns: Vec<String> = Vec::new();
            for rule in &table.columns {
                if !rule_columns.contains(&rule.column) {
                    rule_columns.push(rule.column.clone());
                }
            }
            tables.insert(
                table.name.clone(),
                Arc::new(TableRules {
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
        for rule_column in &rules.rule_columns {
            if !columns.clone().into_iter().any(|c| c == rule_column) {
                return Err(RelationError::MissingRuleColumn {
                    table: table.clone(),
                    column: rule_column.clone(),
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
        let Some(partition) = partition else {
            return self.publish(dest, change.op, before, after, None);
        };
        if change.op == Op::Truncate {
            // a truncate has no rows, hence no homes: at a destination it
            // would remove rows homed there too, which never came from here
            return Verdict::Drop(DropReason::TruncatePartitioned);
        }
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
            Op::Truncate => unreachable!("handled above"),
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
                    .any(|c| schema.column_index(c).is_none()) =>
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

// ---------------------------------------------------------------------------
// the matrix for compliance reviewers

/// A plain-text residency matrix: for every declared table and every
/// (source -> destination) pair, which rows may go and what happens to
/// which columns. Stable order (tables by name, regions by name).
pub fn matrix(config: &Config) -> String {
    let regions: Vec<&String> = config.regions.keys().collect();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Residency matrix ({}; regions: {})",
        config.origin,
        config.declared_regions()
    );
    out.push_str(
        "Tables not listed here never leave their region. Rows and columns not shown as \
         going somewhere never reach that region's topics or database.\n",
    );
    let mut tables: Vec<&TableConfig> = config.tables.iter().collect();
    tables.sort_by(|a, b| a.name.cmp(&b.name));
    for table in tables {
        out.push('\n');
        let header = match &table.class {
            TableClass::Local => "local: no row leaves its region".to_string(),
            TableClass::Global => "global: every region writes, every region receives".to_string(),
            TableClass::Owned { owner } => {
                format!("owned by {owner}: only {owner} writes, every region receives")
            }
            TableClass::Partitioned { home_column, .. } => {
                format!("partitioned: each row's home region is read from column {home_column}")
            }
        };
        let _ = writeln!(out, "{}  ({header})", table.name);
        if let TableClass::Partitioned { aliases, .. } = &table.class {
            let _ = writeln!(out, "  home of a row: {}", home_mapping(aliases, &regions));
        }
        if table.class == TableClass::Local {
            continue;
        }
        let mut rows = vec![[
            "FROM".to_string(),
            "TO".to_string(),
            "ROWS".to_string(),
            "COLUMNS".to_string(),
        ]];
        for source in &regions {
            for dest in &regions {
                if source == dest {
                    continue;
                }
                let which_rows = rows_going(&table.class, source, dest, &regions);
                let columns = if which_rows == "none" {
                    "-".to_string()
                } else {
                    columns_going(table, dest)
                };
                rows.push([source.to_string(), dest.to_string(), which_rows, columns]);
            }
        }
        let widths: Vec<usize> = (0..3)
            .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
            .collect();
        for row in rows {
            let _ = writeln!(
                out,
                "  {:<w0$}  {:<w1$}  {:<w2$}  {}",
                row[0],
                row[1],
                row[2],
                row[3],
                w0 = widths[0],
                w1 = widths[1],
                w2 = widths[2],
            );
        }
    }
    out
}

fn home_mapping(
    aliases: &std::collections::BTreeMap<String, String>,
    regions: &[&String],
) -> String {
    let mut parts: Vec<String> = Vec::new();
    for region in regions {
        let mut values: Vec<String> = aliases
            .iter()
            .filter(|(_, r)| r == region)
            .map(|(v, _)| format!("{v:?}"))
            .collect();
        if !aliases.contains_key(region.as_str()) {
            values.insert(0, format!("{:?}", region.as_str()));
        }
        if !values.is_empty() {
            parts.push(format!("{} -> {region}", values.join(", ")));
        }
    }
    parts.push("NULL or any other value -> no home (the row stays in its region)".to_string());
    parts.join("; ")
}

fn rows_going(class: &TableClass, source: &str, dest: &str, regions: &[&String]) -> String {
    match class {
        TableClass::Local => "none".to_string(),
        TableClass::Global => "all".to_string(),
        TableClass::Owned { owner } if owner == source => "all".to_string(),
        TableClass::Owned { .. } => "none".to_string(),
        TableClass::Partitioned { allow, .. } => {
            let homes: Vec<&str> = regions
                .iter()
                .filter(|home| {
                    home.as_str() == dest
                        || allow.get(home.as_str()).is_some_and(|a| a.contains(dest))
                })
                .map(|home| home.as_str())
                .collect();
            if homes.is_empty() {
                "none".to_string()
            } else {
                format!("rows homed in {}", homes.join(", "))
            }
        }
    }
}

fn columns_going(table: &TableConfig, dest: &str) -> String {
    let rules: Vec<String> = table
        .columns
        .iter()
        .filter(|rule| rule.applies_to(dest))
        .map(|rule| {
            let what = match &rule.action {
                ColumnAction::Drop => "dropped".to_string(),
                ColumnAction::Hash => "hashed".to_string(),
                ColumnAction::Mask(mask) => format!("masked as {mask:?}"),
            };
            format!("{} {what}", rule.column)
        })
        .collect();
    if rules.is_empty() {
        "all columns as they are".to_string()
    } else {
        format!("other columns as they are; {}", rules.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_with_env;
    use crate::event::{ColumnDesc, Lsn, TxMeta};

    const CONFIG: &str = r#"
[kafka]
brokers = "k:9092"

[regions.us]
id = 1
dsn = "host=us"
hash_key = "us-key-0123456789abcdef0123456789"
hash_key_id = "k7"
[regions.eu]
id = 2
dsn = "host=eu"
hash_key = "eu-key-0123456789abcdef0123456789"
[regions.cn]
id = 3
dsn = "host=cn"
hash_key = "cn-key-0123456789abcdef0123456789"

[[tables]]
name = "users"
class = "local"

[[tables]]
name = "products"
class = "global"

[[tables]]
name = "currencies"
class = "owned"
owner = "us"

[[tables]]
name = "orders"
class = "partitioned"
home_column = "country"
aliases = { DE = "eu", FR = "eu", US = "us", CN = "cn" }
[tables.allow]
us = ["eu", "cn"]
eu = []

[[tables.columns]]
name = "email"
action = "hash"
to = ["cn"]

[[tables.columns]]
name = "email"
action = "drop"
to = ["eu"]

[[tables.columns]]
name = "card"
action = "mask"
mask = "****"

"#;

    fn config() -> Config {
        parse_with_env(CONFIG, "relay.toml", |_| None).unwrap_or_else(|e| panic!("{e}"))
    }

    fn policy(source: &str) -> Policy {
        Policy::compile(&config(), source).unwrap()
    }

    fn schema(oid: u32, table: &str, columns: &[&str]) -> Arc<TableSchema> {
        Arc::new(TableSchema {
            oid,
            table: TableName::new("public", table),
            columns: columns
                .iter()
                .enumerate()
                .map(|(i, name)| ColumnDesc {
                    name: name.to_string(),
                    type_oid: 25,
                    is_key: i == 0,
                })
                .collect(),
        })
    }

    fn orders() -> Arc<TableSchema> {
        schema(40, "orders", &["id", "country", "email", "card", "doc"])
    }

    fn t(s: &str) -> Datum {
        Datum::Text(s.to_string())
    }

    fn row(values: &[&str]) -> Vec<Datum> {
        values
            .iter()
            .map(|v| match *v {
                "NULL" => Datum::Null,
                "UNCHANGED" => Datum::Unchanged,
                v => t(v),
            })
            .collect()
    }

    fn change(
        schema: &Arc<TableSchema>,
        op: Op,
        before: Option<Vec<Datum>>,
        after: Option<Vec<Datum>>,
    ) -> Change {
        Change {
            schema: schema.clone(),
            op,
            before,
            after,
            hlc: 1,
            tx: Arc::new(TxMeta {
                xid: 1,
                commit_lsn: Lsn(1),
                commit_ts_us: 0,
            }),
            seq: 0,
        }
    }

    /// Routes to the named destination.
    fn route<'c>(p: &Policy, c: &'c Change, dest: &str) -> Verdict<'c> {
        let i = p.destinations().iter().position(|d| d == dest).unwrap();
        p.route(c, i)
    }

    fn published(v: Verdict) -> Routed {
        match v {
            Verdict::Publish(r) => r,
            Verdict::Drop(reason) => panic!("dropped: {reason:?}"),
        }
    }

    /// What region us (key id k7) sends for `value`.
    fn hash(value: &str) -> String {
        hmac_sha256_hex(b"us-key-0123456789abcdef0123456789", "k7", value)
    }

    fn hmac_sha256_hex(key: &[u8], key_id: &str, value: &str) -> String {
        // RFC 2104 HMAC built on plain SHA-256, independently of the policy code
        use sha2::Digest;
        let mut block = [0u8; 64];
        block[..key.len()].copy_from_slice(key);
        let pad = |b: u8| block.iter().map(|k| k ^ b).collect::<Vec<u8>>();
        let inner = Sha256::new()
            .chain_update(pad(0x36))
            .chain_update(value.as_bytes())
            .finalize();
        let outer = Sha256::new()
            .chain_update(pad(0x5c))
            .chain_update(inner)
            .finalize();
        let hex: String = outer.iter().map(|b| format!("{b:02x}")).collect();
        format!("{key_id}:{hex}")
    }

    #[test]
    fn destinations_exclude_the_source() {
        assert_eq!(policy("us").destinations(), ["cn", "eu"]);
        assert_eq!(policy("eu").destinations(), ["cn", "us"]);
        assert_eq!(policy("eu").source(), "eu");
        let e = Policy::compile(&config(), "xx").unwrap_err().to_string();
        assert!(e.contains("declared regions: cn, eu, us"), "{e}");
    }

    #[test]
    fn declared_tables() {
        let p = policy("us");
        assert!(p.is_declared(&TableName::new("public", "products")));
        assert!(p.is_declared(&TableName::new("public", "orders")));
        assert!(p.is_declared(&TableName::new("public", "currencies")));
        assert!(!p.is_declared(&TableName::new("public", "users")));
        assert!(!p.is_declared(&TableName::new("public", "other")));
        assert!(!p.is_declared(&TableName::new("other", "orders")));
    }

    #[test]
    fn undeclared_and_local_never_leave() {
        let p = policy("us");
        let other = schema(1, "other", &["id"]);
        let users = schema(2, "users", &["id"]);
        for dest in ["eu", "cn"] {
            let c = change(&other, Op::Insert, None, Some(row(&["1"])));
            assert_eq!(route(&p, &c, dest), Verdict::Drop(DropReason::Undeclared));
            for op in [Op::Insert, Op::Update, Op::Delete, Op::Truncate] {
                let c = change(&users, op, Some(row(&["1"])), Some(row(&["1"])));
                assert_eq!(route(&p, &c, dest), Verdict::Drop(DropReason::Local));
            }
        }
    }

    #[test]
    fn global_goes_everywhere_as_is() {
        let products = schema(3, "products", &["id", "name"]);
        for source in ["us", "eu", "cn"] {
            let p = policy(source);
            for i in 0..p.destinations().len() {
                let c = change(
                    &products,
                    Op::Update,
                    Some(row(&["1", "a"])),
                    Some(row(&["1", "UNCHANGED"])),
                );
                let r = published(p.route(&c, i));
                assert_eq!(r.op, Op::Update);
                assert_eq!(&*r.columns, ["id", "name"]);
                assert_eq!(r.before.as_deref(), Some(&row(&["1", "a"])[..]));
                assert_eq!(r.after.as_deref(), Some(&row(&["1", "UNCHANGED"])[..]));
            }
        }
    }

    #[test]
    fn owned_goes_only_from_the_owner() {
        let currencies = schema(4, "currencies", &["code"]);
        let c = change(&currencies, Op::Insert, None, Some(row(&["EUR"])));
        let us = policy("us");
        assert_eq!(
            published(route(&us, &c, "eu")).after.as_deref(),
            Some(&row(&["EUR"])[..])
        );
        assert!(matches!(route(&us, &c, "cn"), Verdict::Publish(_)));
        let eu = policy("eu");
        for dest in ["us", "cn"] {
            assert_eq!(route(&eu, &c, dest), Verdict::Drop(DropReason::NotOwner));
        }
        let t = change(&currencies, Op::Truncate, None, None);
        assert_eq!(published(route(&us, &t, "cn")).op, Op::Truncate);
        assert_eq!(route(&eu, &t, "cn"), Verdict::Drop(DropReason::NotOwner));
    }

    #[test]
    fn partitioned_insert_and_delete_follow_the_home() {
        let p = policy("eu");
        let o = orders();
        let ins = |country: &str| {
            change(
                &o,
                Op::Insert,
                None,
                Some(row(&["1", country, "a@b", "NULL", "d"])),
            )
        };
        // homed in us: allowed to eu and cn (and us)
        assert!(matches!(route(&p, &ins("US"), "us"), Verdict::Publish(_)));
        assert!(matches!(route(&p, &ins("us"), "cn"), Verdict::Publish(_)));
        // homed in eu: nowhere else
        for dest in ["us", "cn"] {
            assert_eq!(
                route(&p, &ins("DE"), dest),
                Verdict::Drop(DropReason::HomeNotAllowed)
            );
            assert_eq!(
                route(&p, &ins("eu"), dest),
                Verdict::Drop(DropReason::HomeNotAllowed)
            );
        }
        // homed in cn: only cn
        assert!(matches!(route(&p, &ins("CN"), "cn"), Verdict::Publish(_)));
        assert_eq!(
            route(&p, &ins("CN"), "us"),
            Verdict::Drop(DropReason::HomeNotAllowed)
        );
        // unknown home: nowhere (values are case-sensitive)
        for value in ["NULL", "XX", "Us", "UNCHANGED"] {
            assert_eq!(
                route(&p, &ins(value), "us"),
                Verdict::Drop(DropReason::UnknownHome),
                "{value}"
            );
        }
        // deletes use the old row
        let del = |country: &str| {
            change(
                &o,
                Op::Delete,
                Some(row(&["1", country, "NULL", "NULL", "NULL"])),
                None,
            )
        };
        let d = del("US");
        let r = published(route(&p, &d, "cn"));
        assert_eq!(r.op, Op::Delete);
        assert_eq!(r.before.unwrap()[1], t("US"));
        assert_eq!(
            route(&p, &del("FR"), "cn"),
            Verdict::Drop(DropReason::HomeNotAllowed)
        );
        assert_eq!(
            route(&p, &del("NULL"), "cn"),
            Verdict::Drop(DropReason::UnknownHome)
        );
        // a truncate has no homes: it stays in its region
        let tr = change(&o, Op::Truncate, None, None);
        assert_eq!(
            route(&p, &tr, "us"),
            Verdict::Drop(DropReason::TruncatePartitioned)
        );
    }

    #[test]
    fn partitioned_update_within_allowed_homes() {
        let p = policy("us");
        let o = orders();
        // us -> us: eu may receive both, update stays an update
        let c = change(
            &o,
            Op::Update,
            Some(row(&["1", "US", "a@b", "1234", "d"])),
            Some(row(&["1", "us", "c@d", "5678", "UNCHANGED"])),
        );
        let r = published(route(&p, &c, "eu"));
        assert_eq!(r.op, Op::Update);
        assert_eq!(&*r.columns, ["id", "country", "card", "doc"]);
        assert_eq!(
            r.before.as_deref(),
            Some(&row(&["1", "US", "****", "d"])[..])
        );
        assert_eq!(
            r.after.as_deref(),
            Some(&row(&["1", "us", "****", "UNCHANGED"])[..])
        );
        // no old tuple: the home is assumed unchanged
        let c = change(
            &o,
            Op::Update,
            None,
            Some(row(&["1", "DE", "x", "NULL", "d"])),
        );
        assert_eq!(
            route(&p, &c, "cn"),
            Verdict::Drop(DropReason::HomeNotAllowed)
        );
        let c = change(
            &o,
            Op::Update,
            None,
            Some(row(&["1", "US", "x", "NULL", "d"])),
        );
        assert_eq!(published(route(&p, &c, "cn")).op, Op::Update);
        // old tuple without the home value (unchanged marker): assumed unchanged
        let c = change(
            &o,
            Op::Update,
            Some(row(&["1", "UNCHANGED", "x", "NULL", "d"])),
            Some(row(&["1", "US", "y", "NULL", "d"])),
        );
        assert_eq!(published(route(&p, &c, "cn")).op, Op::Update);
        // new home column unchanged: taken from the old row
        let c = change(
            &o,
            Op::Update,
            Some(row(&["1", "DE", "x", "NULL", "d"])),
            Some(row(&["1", "UNCHANGED", "y", "NULL", "d"])),
        );
        assert_eq!(
            route(&p, &c, "cn"),
            Verdict::Drop(DropReason::HomeNotAllowed)
        );
        assert_eq!(published(route(&p, &c, "eu")).op, Op::Update);
        // neither home known
        let c = change(
            &o,
            Op::Update,
            None,
            Some(row(&["1", "NULL", "y", "NULL", "d"])),
        );
        assert_eq!(route(&p, &c, "eu"), Verdict::Drop(DropReason::UnknownHome));
    }

    #[test]
    fn home_moving_out_becomes_a_delete() {
        let p = policy("us");
        let o = orders();
        // us -> eu: cn received the row while it was homed in us, must lose it
        let before = row(&["1", "US", "a@b", "1234", "doc"]);
        let c = change(
            &o,
            Op::Update,
            Some(before.clone()),
            Some(row(&["1", "DE", "a@b", "1234", "UNCHANGED"])),
        );
        let r = published(route(&p, &c, "cn"));
        assert_eq!(r.op, Op::Delete);
        assert_eq!(r.after, None);
        assert_eq!(&*r.columns, ["id", "country", "email", "card", "doc"]);
        assert_eq!(
            r.before.as_deref(),
            Some(&vec![t("1"), t("US"), t(&hash("a@b")), t("****"), t("doc")][..])
        );
        // eu is allowed both before and after: a plain update
        assert_eq!(published(route(&p, &c, "eu")).op, Op::Update);
        // moving to an unknown home also removes it
        let c = change(
            &o,
            Op::Update,
            Some(before),
            Some(row(&["1", "NULL", "a@b", "1234", "doc"])),
        );
        assert_eq!(published(route(&p, &c, "cn")).op, Op::Delete);
        assert_eq!(published(route(&p, &c, "eu")).op, Op::Delete);
    }

    #[test]
    fn home_moving_in_becomes_an_insert_of_the_whole_row() {
        let p = policy("eu");
        let o = orders();
        // eu -> us: cn may now receive it; TOAST-unchanged values come from the old row
        let c = change(
            &o,
            Op::Update,
            Some(row(&["1", "DE", "a@b", "NULL", "big document"])),
            Some(row(&["1", "US", "UNCHANGED", "UNCHANGED", "UNCHANGED"])),
        );
        let r = published(route(&p, &c, "cn"));
        assert_eq!(r.op, Op::Insert);
        assert_eq!(r.before, None);
        assert_eq!(
            r.after.as_deref(),
            Some(
                &vec![
                    t("1"),
                    t("US"),
                    t(&hmac_sha256_hex(
                        b"eu-key-0123456789abcdef0123456789",
                        "k1",
                        "a@b"
                    )),
                    Datum::Null,
                    t("big document")
                ][..]
            )
        );
        // us is the new home: also an insert there
        let r = published(route(&p, &c, "us"));
        assert_eq!(r.op, Op::Insert);
        assert_eq!(r.after.unwrap()[4], t("big document"));
        // a value the old row did not carry stays unchanged
        let c = change(
            &o,
            Op::Update,
            Some(row(&["1", "DE", "a@b", "NULL", "UNCHANGED"])),
            Some(row(&["1", "US", "a@b", "NULL", "UNCHANGED"])),
        );
        assert_eq!(
            published(route(&p, &c, "cn")).after.unwrap()[4],
            Datum::Unchanged
        );
        // from an unknown home
        let c = change(
            &o,
            Op::Update,
            Some(row(&["1", "NULL", "a@b", "NULL", "d"])),
            Some(row(&["1", "CN", "a@b", "NULL", "d"])),
        );
        assert_eq!(published(route(&p, &c, "cn")).op, Op::Insert);
        assert_eq!(
            route(&p, &c, "us"),
            Verdict::Drop(DropReason::HomeNotAllowed)
        );
    }

    #[test]
    fn column_rules_per_destination() {
        let p = policy("us");
        let o = orders();
        let c = change(
            &o,
            Op::Insert,
            None,
            Some(vec![t("1"), t("US"), t("a@b"), t("4111"), Datum::Null]),
        );
        // cn: email hashed, card masked
        let r = published(route(&p, &c, "cn"));
        assert_eq!(&*r.columns, ["id", "country", "email", "card", "doc"]);
        assert_eq!(
            r.after.as_deref(),
            Some(&vec![t("1"), t("US"), t(&hash("a@b")), t("****"), Datum::Null][..])
        );
        assert_eq!(
            hash("a@b").len(),
            3 + 64,
            "key id and lowercase hex of HMAC-SHA-256"
        );
        // eu: email dropped, card masked
        let r = published(route(&p, &c, "eu"));
        assert_eq!(&*r.columns, ["id", "country", "card", "doc"]);
        assert_eq!(
            r.after.as_deref(),
            Some(&vec![t("1"), t("US"), t("****"), Datum::Null][..])
        );
        // NULL and unchanged stay as they are under hash and mask
        let c = change(
            &o,
            Op::Update,
            Some(vec![t("1"), t("US"), Datum::Null, Datum::Null, Datum::Null]),
            Some(vec![
                t("1"),
                t("US"),
                Datum::Unchanged,
                Datum::Unchanged,
                Datum::Null,
            ]),
        );
        let r = published(route(&p, &c, "cn"));
        assert_eq!(
            r.before.as_deref(),
            Some(&vec![t("1"), t("US"), Datum::Null, Datum::Null, Datum::Null][..])
        );
        assert_eq!(
            r.after.as_deref(),
            Some(
                &vec![
                    t("1"),
                    t("US"),
                    Datum::Unchanged,
                    Datum::Unchanged,
                    Datum::Null
                ][..]
            )
        );
    }

    #[test]
    fn hash_matches_the_documented_formula() {
        let p = policy("us");
        // k7:hex(HMAC-SHA-256(us's key, "a@b")), computed independently
        assert_eq!(p.hash("a@b"), hash("a@b"));
        assert_ne!(p.hash("a@b"), p.hash("a@c"));
        let hashed = p.hash("x");
        let hex = hashed.strip_prefix("k7:").expect("key id prefix");
        assert_eq!(hex.len(), 64);
        assert!(hex
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)));
        // each source region hashes with its own key
        let eu = policy("eu").hash("a@b");
        assert!(eu.starts_with("k1:"), "{eu}");
        assert_ne!(eu[3..], p.hash("a@b")[3..]);
    }

    #[test]
    fn schema_changes_rebuild_the_plan() {
        let p = policy("us");
        let v1 = schema(40, "orders", &["id", "country", "email", "card"]);
        let c = change(&v1, Op::Insert, None, Some(row(&["1", "US", "a@b", "c"])));
        assert_eq!(
            &*published(route(&p, &c, "eu")).columns,
            ["id", "country", "card"]
        );
        // same oid, new columns (an ALTER TABLE): the cached plan must not be reused
        let v2 = schema(40, "orders", &["id", "email", "country", "note", "card"]);
        let c = change(
            &v2,
            Op::Insert,
            None,
            Some(row(&["1", "a@b", "US", "n", "c"])),
        );
        let r = published(route(&p, &c, "eu"));
        assert_eq!(&*r.columns, ["id", "country", "note", "card"]);
        assert_eq!(
            r.after.as_deref(),
            Some(&row(&["1", "US", "n", "****"])[..])
        );
        // an equal schema in a fresh Arc hits the cache
        let v2b = schema(40, "orders", &["id", "email", "country", "note", "card"]);
        let c = change(
            &v2b,
            Op::Insert,
            None,
            Some(row(&["1", "a@b", "DE", "n", "c"])),
        );
        assert_eq!(
            route(&p, &c, "cn"),
            Verdict::Drop(DropReason::HomeNotAllowed)
        );
        // without the home column, rows stay home
        let v3 = schema(40, "orders", &["id", "email", "card"]);
        let c = change(&v3, Op::Insert, None, Some(row(&["1", "a@b", "c"])));
        assert_eq!(route(&p, &c, "eu"), Verdict::Drop(DropReason::UnknownHome));
        // a rule column renamed away: nothing of the table leaves, whatever the op
        let v4 = schema(40, "orders", &["id", "country", "email", "cardnum"]);
        for op in [Op::Insert, Op::Update, Op::Delete, Op::Truncate] {
            let r = Some(row(&["1", "US", "a@b", "4111"]));
            let (before, after) = match op {
                Op::Insert => (None, r),
                Op::Update => (r.clone(), r),
                Op::Delete => (r, None),
                Op::Truncate => (None, None),
            };
            let c = change(&v4, op, before, after);
            for dest in ["eu", "cn"] {
                assert_eq!(
                    route(&p, &c, dest),
                    Verdict::Drop(DropReason::RuleColumnMissing),
                    "{op:?} to {dest}"
                );
            }
        }
    }

    #[test]
    fn relations_the_rules_cannot_cover_are_refused() {
        let p = policy("us");
        let orders = TableName::new("public", "orders");
        let full = ["id", "country", "email", "card", "doc"];
        assert_eq!(p.check_relation(&orders, full, Some(b'f')), Ok(()));
        assert_eq!(p.check_relation(&orders, full, None), Ok(()));
        let renamed = ["id", "country", "mail", "card"];
        let err = p.check_relation(&orders, renamed, Some(b'f')).unwrap_err();
        assert_eq!(
            err,
            RelationError::MissingRuleColumn {
                table: orders.clone(),
                column: "email".into()
            }
        );
        let msg = err.to_string();
        assert!(
            msg.contains("public.orders") && msg.contains("\"email\""),
            "{msg}"
        );
        let err = p.check_relation(&orders, full, Some(b'd')).unwrap_err();
        assert!(
            matches!(
                err,
                RelationError::PartitionedIdentity {
                    identity: "DEFAULT",
                    ..
                }
            ),
            "{err:?}"
        );
        // other classes need no particular identity; local and undeclared
        // tables are never routed
        let products = TableName::new("public", "products");
        assert_eq!(p.check_relation(&products, ["id"], Some(b'd')), Ok(()));
        let users = TableName::new("public", "users");
        assert_eq!(p.check_relation(&users, ["id"], Some(b'd')), Ok(()));
        let other = TableName::new("public", "other");
        assert_eq!(p.check_relation(&other, ["id"], Some(b'n')), Ok(()));
    }

    #[test]
    fn reasons_have_metric_labels() {
        let labels: Vec<&str> = DropReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            labels,
            [
                "undeclared",
                "local",
                "home_not_allowed",
                "unknown_home",
                "not_owner",
                "truncate_partitioned",
                "rule_column_missing"
            ]
        );
    }

    #[test]
    fn matrix_reads_like_the_policy() {
        let m = matrix(&config());
        assert!(
            m.starts_with("Residency matrix (relay.toml; regions: cn, eu, us)\n"),
            "{m}"
        );
        // tables sorted by name
        let pos = |s: &str| m.find(s).unwrap_or_else(|| panic!("{s:?} not in\n{m}"));
        assert!(pos("public.currencies") < pos("public.orders"));
        assert!(pos("public.orders") < pos("public.products"));
        assert!(pos("public.products") < pos("public.users"));
        assert!(
            m.contains("public.users  (local: no row leaves its region)\n"),
            "{m}"
        );
        let section = |name: &str| -> Vec<String> {
            let start = pos(&format!("{name}  ("));
            m[start..]
                .lines()
                .skip(1)
                .take_while(|l| l.starts_with("  "))
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                .collect()
        };
        let currencies = section("public.currencies");
        assert_eq!(currencies[0], "FROM TO ROWS COLUMNS");
        assert!(
            currencies.contains(&"us eu all all columns as they are".to_string()),
            "{m}"
        );
        assert!(currencies.contains(&"eu cn none -".to_string()), "{m}");
        assert_eq!(currencies.len(), 7);
        let orders = section("public.orders");
        assert_eq!(
            orders[0],
            "home of a row: \"cn\", \"CN\" -> cn; \"eu\", \"DE\", \"FR\" -> eu; \"us\", \"US\" -> us; \
             NULL or any other value -> no home (the row stays in its region)"
        );
        let expected = [
            "FROM TO ROWS COLUMNS",
            "cn eu rows homed in eu, us other columns as they are; email dropped, card masked as \"****\"",
            "cn us rows homed in us other columns as they are; card masked as \"****\"",
            "eu cn rows homed in cn, us other columns as they are; email hashed, card masked as \"****\"",
            "eu us rows homed in us other columns as they are; card masked as \"****\"",
            "us cn rows homed in cn, us other columns as they are; email hashed, card masked as \"****\"",
            "us eu rows homed in eu, us other columns as they are; email dropped, card masked as \"****\"",
        ];
        assert_eq!(orders[1..], expected, "{m}");
        // stable
        assert_eq!(m, matrix(&config()));
    }
}
