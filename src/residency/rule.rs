//! The residency rule of one table, read from the config once and asked by
//! every part that decides where a row may be: capture routing
//! ([`super::Policy`], and resync through it), the apply side's admission
//! of incoming changes, `verify`'s expectations and the matrix `check`
//! prints.
//!
//! Two questions, nothing else:
//!
//! - may region R hold a row whose home column holds V? A value names a
//!   home region (a region's own name, or an alias, which wins); rows homed
//!   there may be held by the home and by the regions `allow` lists for it.
//!   A value that names no region has no home: such a row is held nowhere
//!   but where it is written.
//! - is a change of kind K written in region S ever sent? `local` rows
//!   never leave; `owned` rows leave their owner only; a truncate of a
//!   `partitioned` table has no rows, hence no homes, and never leaves: at
//!   a destination it would remove rows homed there, which never came from
//!   its source.
//!
//! Pure: no IO, no logging, no row values kept.

use std::collections::{BTreeMap, BTreeSet};

use crate::config::{Config, TableClass, TableConfig};
use crate::event::Op;

use super::DropReason;

/// Where the rows of one table may be, and which of its changes travel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableRule {
    rows: Rows,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
enum Rows {
    Local,
    #[default]
    Global,
    Owned {
        owner: String,
    },
    Partitioned {
        home_column: String,
        /// Home column value -> home region: each declared region's own
        /// name, then the aliases (which win).
        homes: BTreeMap<String, String>,
        /// Home region -> the other regions that may hold rows homed there.
        allow: BTreeMap<String, BTreeSet<String>>,
    },
}

impl TableRule {
    /// The rule of `table`, one of `config`'s tables.
    pub fn compile(config: &Config, table: &TableConfig) -> TableRule {
        let rows = match &table.class {
            TableClass::Local => Rows::Local,
            TableClass::Global => Rows::Global,
            TableClass::Owned { owner } => Rows::Owned {
                owner: owner.clone(),
            },
            TableClass::Partitioned {
                home_column,
                aliases,
                allow,
            } => {
                let mut homes: BTreeMap<String, String> = config
                    .regions
                    .keys()
                    .map(|r| (r.clone(), r.clone()))
                    .collect();
                for (value, region) in aliases {
                    homes.insert(value.clone(), region.clone());
                }
                Rows::Partitioned {
                    home_column: home_column.clone(),
                    homes,
                    allow: allow.clone(),
                }
            }
        };
        TableRule { rows }
    }

    /// Whether a change of kind `op` written in `source` is ever sent to
    /// another region (and so ever admitted there); `Err` names why not.
    /// A sent change of a partitioned table still goes only where its row
    /// may be held ([`TableRule::may_hold`]).
    pub fn sends(&self, source: &str, op: Op) -> Result<(), DropReason> {
        match &self.rows {
            Rows::Local => Err(DropReason::Local),
            Rows::Owned { owner } if owner != source => Err(DropReason::NotOwner),
            Rows::Partitioned { .. } if op == Op::Truncate => Err(DropReason::TruncatePartitioned),
            _ => Ok(()),
        }
    }

    /// Whether any change written in `source` ever leaves it.
    pub fn leaves(&self, source: &str) -> Result<(), DropReason> {
        self.sends(source, Op::Insert)
    }

    /// The region whose writes are replicated, for an `owned` table.
    pub fn owner(&self) -> Option<&str> {
        match &self.rows {
            Rows::Owned { owner } => Some(owner),
            _ => None,
        }
    }

    /// The column a row's home is read from, for a `partitioned` table.
    pub fn home_column(&self) -> Option<&str> {
        match &self.rows {
            Rows::Partitioned { home_column, .. } => Some(home_column),
            _ => None,
        }
    }

    /// The home region that home column value `value` names; `None` when
    /// it names none (or the table is not partitioned).
    pub fn home_of(&self, value: &str) -> Option<&str> {
        match &self.rows {
            Rows::Partitioned { homes, .. } => homes.get(value).map(String::as_str),
            _ => None,
        }
    }

    /// Whether `region` may hold the rows homed in region `home`: the home
    /// itself and the regions `allow` lists for it. Every region may hold
    /// every row of a table that is not partitioned.
    pub fn home_allows(&self, home: &str, region: &str) -> bool {
        match &self.rows {
            Rows::Partitioned { allow, .. } => {
                home == region || allow.get(home).is_some_and(|a| a.contains(region))
            }
            _ => true,
        }
    }

    /// Whether `region` may hold a row whose home column holds `value`:
    /// `Err(UnknownHome)` when the value names no home, `Err(HomeNotAllowed)`
    /// when its home does not allow `region`.
    pub fn may_hold(&self, region: &str, value: &str) -> Result<(), DropReason> {
        let home = self.home_of(value).ok_or(DropReason::UnknownHome)?;
        if self.home_allows(home, region) {
            Ok(())
        } else {
            Err(DropReason::HomeNotAllowed)
        }
    }

    /// Every home column value that names a home, with its home region,
    /// by value (empty for a table that is not partitioned).
    pub fn home_values(&self) -> impl Iterator<Item = (&str, &str)> {
        let homes = match &self.rows {
            Rows::Partitioned { homes, .. } => Some(homes),
            _ => None,
        };
        homes
            .into_iter()
            .flatten()
            .map(|(value, home)| (value.as_str(), home.as_str()))
    }

    /// Every region the rule names: the owner, alias targets and the
    /// regions `allow` lists (keys and values), for checking they exist.
    pub fn named_regions(&self) -> impl Iterator<Item = &str> {
        let (owner, homes, allow) = match &self.rows {
            Rows::Owned { owner } => (Some(owner), None, None),
            Rows::Partitioned { homes, allow, .. } => (None, Some(homes), Some(allow)),
            _ => (None, None, None),
        };
        let homes = homes.into_iter().flatten().map(|(_, home)| home);
        let allow = allow
            .into_iter()
            .flatten()
            .flat_map(|(home, extra)| std::iter::once(home).chain(extra));
        owner
            .into_iter()
            .chain(homes)
            .chain(allow)
            .map(String::as_str)
    }
}
