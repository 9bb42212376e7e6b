//! `pgrelay verify`: an online, residency-aware diff of every region.
//!
//! ```text
//!  per region (concurrently), per table: one scan ──▶ buckets of the keyed key hash,
//!        count + sum of keyed row digests, per region pair the policy lets share rows
//!  per pair: buckets that differ ──▶ both sides stream (key hash, key, stamp, digest)
//!        sorted by key hash ──▶ merged ──▶ suspects
//!  suspects ──▶ looked up again by key (rows, tombstones, watermarks in one snapshot)
//!        for a few rounds ──▶ agree | in flight (not reported) | a difference
//!  per region, alone: rows whose home forbids the region, rule columns in clear ──▶ leaked
//! ```
//!
//! What each pair must share comes from the policy: `global` and `owned`
//! tables every row, `partitioned` tables the rows whose home allows both
//! regions ([`policy`]); columns a rule alters for either region are not
//! compared between them, and are checked inside each region instead
//! (masked and hashed values must have the form the rule writes).
//!
//! Row values never leave a database: each database hashes its own rows
//! with a key made for the run (`sha256(key || text)`, core PostgreSQL), so
//! a digest cannot be looked up in a dictionary. Keys (the primary key, as
//! the tombstones spell it) reach the verifier only for rows both regions
//! of a pair may hold, and only in buckets that differ.
//!
//! Pure here: the policy per pair ([`policy`]), the SQL ([`sql`]), the
//! judgement of one key ([`classify`]) and the output ([`report`]); the IO
//! is [`run`].

pub mod classify;
pub mod fix;
pub mod plan;
pub mod policy;
pub mod report;
pub mod run;
pub mod schedule;
pub mod sql;

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

/// Buckets of the key hash (12 bits of it).
pub const BUCKETS: usize = 4096;

/// The kinds of difference, in the order they are reported (leaks first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A row, or a column value in clear, where the policy forbids it.
    Leaked,
    /// A row, a newer version or a delete the destination must hold is not there.
    Missing,
    /// A row the destination holds that no region that may send it holds.
    Extra,
    /// Different content under the same stamp.
    Diverged,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Leaked, Kind::Missing, Kind::Extra, Kind::Diverged];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Leaked => "leaked",
            Kind::Missing => "missing",
            Kind::Extra => "extra",
            Kind::Diverged => "diverged",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One difference: in `destination`, about a row `source` holds (or, for
/// a leak, the row's home or writer). `key` is the primary key as JSON,
/// kept only to print with `--show-keys`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Difference {
    pub table: String,
    pub kind: Kind,
    pub source: String,
    pub destination: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// Counts per kind for one table and one (source, destination) pair.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub leaked: u64,
    pub missing: u64,
    pub extra: u64,
    pub diverged: u64,
}

impl Counts {
    pub fn add(&mut self, kind: Kind) {
        match kind {
            Kind::Leaked => self.leaked += 1,
            Kind::Missing => self.missing += 1,
            Kind::Extra => self.extra += 1,
            Kind::Diverged => self.diverged += 1,
        }
    }

    pub fn total(&self) -> u64 {
        self.leaked + self.missing + self.extra + self.diverged
    }

    pub fn get(&self, kind: Kind) -> u64 {
        match kind {
            Kind::Leaked => self.leaked,
            Kind::Missing => self.missing,
            Kind::Extra => self.extra,
            Kind::Diverged => self.diverged,
        }
    }
}

/// What two regions of one table were compared on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PairSummary {
    pub table: String,
    pub a: String,
    pub b: String,
    /// Rows of the pair's share each side holds.
    pub rows_a: u64,
    pub rows_b: u64,
    /// Buckets whose digests differed (descended into).
    pub buckets_differing: u64,
}

/// The result of a run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub pairs: Vec<PairSummary>,
    /// Differences, deduplicated, leaks first.
    pub differences: Vec<Difference>,
    /// Keys still in flight after every round: not differences.
    pub unsettled: u64,
    /// Keys not examined because a pair had more suspects than the cap.
    pub not_examined: u64,
    /// Every pair's view of each difference, before [`dedupe`], with the
    /// region whose version is authoritative: what `--repair` plans from.
    #[serde(skip)]
    pub found: Vec<(Difference, Option<String>)>,
}

impl Report {
    /// Counts per table and (source, destination).
    pub fn counts(&self) -> BTreeMap<(String, String, String), Counts> {
        let mut out: BTreeMap<(String, String, String), Counts> = BTreeMap::new();
        for d in &self.differences {
            out.entry((d.table.clone(), d.source.clone(), d.destination.clone()))
                .or_default()
                .add(d.kind);
        }
        out
    }

    pub fn agrees(&self) -> bool {
        self.differences.is_empty()
    }
}

/// Keeps one difference per (table, key, kind, destination) found from
/// several pairs, preferring the one whose source is `preferred` (the
/// writer of the version, or an `owned` table's owner); then sorts leaks
/// first. Differences without a key are kept as they are.
pub fn dedupe(found: Vec<(Difference, Option<String>)>) -> Vec<Difference> {
    type Slot = (String, String, Kind, String, Option<String>);
    let mut chosen: BTreeMap<Slot, (Difference, bool)> = BTreeMap::new();
    let mut keyless = Vec::new();
    for (diff, preferred) in found {
        let Some(key) = diff.key.clone() else {
            keyless.push(diff);
            continue;
        };
        // a diverged key is one difference whichever pair saw it
        let destination = if diff.kind == Kind::Diverged {
            String::new()
        } else {
            diff.destination.clone()
        };
        let is_preferred = preferred.as_deref() == Some(diff.source.as_str());
        let slot = (
            diff.table.clone(),
            key,
            diff.kind,
            destination,
            diff.column.clone(),
        );
        match chosen.get(&slot) {
            Some((_, true)) => {}
            Some((_, false)) if !is_preferred => {}
            _ => {
                chosen.insert(slot, (diff, is_preferred));
            }
        }
    }
    let mut out: Vec<Difference> = keyless;
    out.extend(chosen.into_values().map(|(d, _)| d));
    out.sort_by(|x, y| {
        (x.kind, &x.table, &x.source, &x.destination, &x.key).cmp(&(
            y.kind,
            &y.table,
            &y.source,
            &y.destination,
            &y.key,
        ))
    });
    out
}

#[cfg(test)]
mod tests;
