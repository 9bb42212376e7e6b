//! Declared tables, their residency class and column rules.

use std::collections::{BTreeMap, BTreeSet};

use crate::event::TableName;

/// One declared table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableConfig {
    pub name: TableName,
    pub class: TableClass,
    /// Column rules, applied before a row leaves the region. At most one
    /// rule per column and destination.
    pub columns: Vec<ColumnRule>,
    /// Columns merged on arrival instead of last-writer-wins (`global`
    /// tables only; never a key column, never under a column rule).
    pub merge: Vec<MergeColumn>,
    /// Regions holding encrypted DR copies of the rows each other region
    /// captures (`crate::dr`); empty: none.
    pub dr: BTreeSet<String>,
}

/// A column the destination merges instead of overwriting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MergeColumn {
    pub column: String,
    pub kind: MergeKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeKind {
    /// A number: each change adds its delta (new - old) at the destination.
    Counter,
    /// An array, a grow-only set: the destination keeps the union.
    Union,
}

impl MergeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MergeKind::Counter => "counter",
            MergeKind::Union => "union",
        }
    }
}

impl TableConfig {
    /// DR regions of the changes `source` captures: none when `source`
    /// does not send the table (another region owns it), never itself.
    pub fn dr_regions<'a>(&'a self, source: &'a str) -> impl Iterator<Item = &'a String> + 'a {
        let sends = match &self.class {
            TableClass::Owned { owner } => owner == source,
            TableClass::Partitioned { .. } => true,
            TableClass::Local | TableClass::Global => false,
        };
        self.dr.iter().filter(move |d| sends && *d != source)
    }
}

/// The data class of a table (brief §3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TableClass {
    /// Never leaves its region.
    Local,
    /// Goes everywhere; any region writes; HLC last-writer-wins.
    Global,
    /// Goes everywhere; only `owner` writes.
    Owned { owner: String },
    /// Each row has a home region, read from `home_column`.
    Partitioned {
        home_column: String,
        /// Column value -> home region. A value equal to a region name is
        /// that region without an alias.
        aliases: BTreeMap<String, String>,
        /// Home region -> extra destinations allowed for rows homed there
        /// (the home region itself is always allowed).
        allow: BTreeMap<String, BTreeSet<String>>,
    },
}

impl TableClass {
    /// The name used in the file (`local`, `global`, ...).
    pub fn as_str(&self) -> &'static str {
        match self {
            TableClass::Local => "local",
            TableClass::Global => "global",
            TableClass::Owned { .. } => "owned",
            TableClass::Partitioned { .. } => "partitioned",
        }
    }
}

/// What happens to one column before it leaves the region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnRule {
    pub column: String,
    /// Earlier names of the column (`formerly`): a relation that still has
    /// one of them (changes written before a rename, published after it)
    /// gets the rule on that column.
    pub formerly: Vec<String>,
    pub action: ColumnAction,
    /// Destinations the rule applies to; `None`: every destination.
    pub to: Option<BTreeSet<String>>,
}

impl ColumnRule {
    pub fn applies_to(&self, destination: &str) -> bool {
        self.to.as_ref().is_none_or(|to| to.contains(destination))
    }

    /// The column's name, then its earlier names.
    pub fn names(&self) -> impl Iterator<Item = &str> + Clone {
        std::iter::once(self.column.as_str()).chain(self.formerly.iter().map(String::as_str))
    }

    /// Whether the rule covers a column of this name (current or earlier).
    pub fn covers(&self, column: &str) -> bool {
        self.names().any(|n| n == column)
    }

    /// Whether a table with these columns has the rule's column under one
    /// of its names.
    pub fn present_in<S: AsRef<str>>(&self, columns: &[S]) -> bool {
        columns.iter().any(|c| self.covers(c.as_ref()))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ColumnAction {
    /// Remove the column.
    Drop,
    /// Replace the value by `{key_id}:` + hex(HMAC-SHA-256(source region's
    /// hash_key, value)).
    Hash,
    /// Replace a non-NULL value by this text.
    Mask(String),
}

impl ColumnAction {
    pub fn as_str(&self) -> &'static str {
        match self {
            ColumnAction::Drop => "drop",
            ColumnAction::Hash => "hash",
            ColumnAction::Mask(_) => "mask",
        }
    }
}

impl TableConfig {
    /// Columns the config names for this table (home column, rule columns)
    /// that are not in `columns` (the table's actual columns). Rules on a
    /// missing column are ignored when routing, so `check` reports these.
    pub fn missing_columns<'a>(&'a self, columns: &[&str]) -> Vec<&'a str> {
        let mut missing = Vec::new();
        if let TableClass::Partitioned { home_column, .. } = &self.class {
            if !columns.contains(&home_column.as_str()) {
                missing.push(home_column.as_str());
            }
        }
        let named = self
            .columns
            .iter()
            .filter(|r| !r.present_in(columns))
            .map(|r| r.column.as_str())
            .chain(self.merge.iter().map(|m| m.column.as_str()));
        for name in named {
            if !columns.contains(&name) && !missing.contains(&name) {
                missing.push(name);
            }
        }
        missing
    }

    /// How column `name` is merged, if it is a merge column.
    pub fn merge_kind(&self, name: &str) -> Option<MergeKind> {
        self.merge.iter().find(|m| m.column == name).map(|m| m.kind)
    }
}
