//! The judgement of one key of one table between two regions (pure): from
//! what each side holds (a row with its stamp and digest, or a tombstone)
//! and what each side has applied from the others (watermarks, and how far
//! each source's WAL is applied), either
//! they agree, or a newer version is still in flight (looked at again, not
//! reported), or one region lacks what it must hold.

use std::collections::BTreeMap;

use super::Kind;
use crate::hlc::Hlc;

/// What one region holds under a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Held {
    /// A row: its stamp, its content digest, and whether it belongs to the
    /// pair's share (a partitioned row whose home allows both regions).
    Row {
        stamp: i64,
        digest: i64,
        shared: bool,
    },
    /// No row; the stamp of its tombstone (or of a truncate), 0 if none.
    Gone { tombstone: i64 },
}

impl Held {
    fn version(&self) -> i64 {
        match self {
            Held::Row { stamp, .. } => *stamp,
            Held::Gone { tombstone } => *tombstone,
        }
    }
}

/// One side of a pair: its region, what it holds, and per source region
/// (by id) the stamp it has applied up to.
#[derive(Clone, Debug)]
pub struct Side<'a> {
    pub region: &'a str,
    pub held: Held,
    pub watermarks: &'a BTreeMap<u8, i64>,
    /// Per source region (by id): every change it committed before this
    /// wall-clock time (ms) is applied here (read from the source's WAL
    /// position and this region's applied offsets just before `held`).
    pub caught_up: &'a BTreeMap<u8, u64>,
}

impl Side<'_> {
    /// Has this side applied what region `id` wrote under `stamp`?
    fn has_applied(&self, id: u8, stamp: i64) -> bool {
        self.watermarks.get(&id).is_some_and(|&wm| wm >= stamp)
            || self
                .caught_up
                .get(&id)
                .is_some_and(|&t| t > Hlc::from_sql(stamp).wall_ms())
    }
}

/// What a table's class and columns mean for the judgement.
#[derive(Clone, Debug)]
pub struct Rules<'a> {
    /// Region names by id.
    pub regions: &'a BTreeMap<u8, String>,
    /// The owner of an `owned` table.
    pub owner: Option<&'a str>,
    /// Merge columns: one stamp can carry content still merging.
    pub merges: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Judgement {
    Agree,
    /// A version newer than the other side's watermark: look again later.
    InFlight,
    Differ {
        kind: Kind,
        /// The region holding the version the other lacks (or, for
        /// `extra`, the other region of the pair).
        source: String,
        /// Where the difference is (and a repair would write).
        destination: String,
        /// The region whose version is authoritative (its writer, or an
        /// owned table's owner), to pick one pair when several see it.
        preferred: Option<String>,
    },
}

pub fn judge(a: &Side<'_>, b: &Side<'_>, rules: &Rules<'_>) -> Judgement {
    let writer_of = |stamp: i64| -> Option<&str> {
        rules
            .regions
            .get(&Hlc::from_sql(stamp).region_id())
            .map(String::as_str)
    };
    // has `side` applied everything `writer` wrote up to `stamp`?
    let delivered = |side: &Side<'_>, stamp: i64| -> bool {
        match writer_of(stamp) {
            Some(w) if w == side.region => true,
            Some(_) => side.has_applied(Hlc::from_sql(stamp).region_id(), stamp),
            // a stamp no declared region made: nothing will deliver it
            None => true,
        }
    };
    match (&a.held, &b.held) {
        (
            Held::Row {
                stamp: sa,
                digest: da,
                shared: true,
            },
            Held::Row {
                stamp: sb,
                digest: db,
                shared: true,
            },
        ) if sa == sb => {
            if da == db {
                return Judgement::Agree;
            }
            // merge columns: the same stamp may still be merging parts
            // written elsewhere; settled once each side has every region's
            // changes up to it
            if rules.merges {
                let settled = |side: &Side<'_>| {
                    rules
                        .regions
                        .iter()
                        .filter(|(_, name)| name.as_str() != side.region)
                        .all(|(id, _)| side.has_applied(*id, *sa))
                };
                if !settled(a) || !settled(b) {
                    return Judgement::InFlight;
                }
            }
            let writer = writer_of(*sa).map(str::to_string);
            let (source, destination) = if writer.as_deref() == Some(b.region) {
                (b.region, a.region)
            } else {
                (a.region, b.region)
            };
            return Judgement::Differ {
                kind: Kind::Diverged,
                source: source.to_string(),
                destination: destination.to_string(),
                preferred: writer,
            };
        }
        _ => {}
    }
    let (newer, older) = if a.held.version() >= b.held.version() {
        (a, b)
    } else {
        (b, a)
    };
    let in_share = |held: &Held| matches!(held, Held::Row { shared: true, .. });
    if a.held.version() == b.held.version() {
        // both gone, or the same stamp on both sides with different homes
        return match (&a.held, &b.held) {
            (Held::Gone { .. }, Held::Gone { .. }) => Judgement::Agree,
            _ if !in_share(&a.held) && !in_share(&b.held) => Judgement::Agree,
            _ => Judgement::Differ {
                kind: Kind::Diverged,
                source: a.region.to_string(),
                destination: b.region.to_string(),
                preferred: writer_of(a.held.version()).map(str::to_string),
            },
        };
    }
    // the older side must take the newer version, if the pair shares the
    // key on either side
    if !in_share(&older.held) && !in_share(&newer.held) {
        return Judgement::Agree;
    }
    if let Held::Gone { .. } = older.held {
        if !in_share(&newer.held) {
            return Judgement::Agree;
        }
    }
    let stamp = newer.held.version();
    if !delivered(older, stamp) {
        return Judgement::InFlight;
    }
    let writer = writer_of(stamp).map(str::to_string);
    if let (Held::Row { shared: true, .. }, Some(owner)) = (&newer.held, rules.owner) {
        if writer.as_deref() != Some(owner) {
            // a row of an owned table the owner did not write
            return Judgement::Differ {
                kind: Kind::Extra,
                source: older.region.to_string(),
                destination: newer.region.to_string(),
                preferred: Some(owner.to_string()),
            };
        }
    }
    Judgement::Differ {
        kind: Kind::Missing,
        source: newer.region.to_string(),
        destination: older.region.to_string(),
        preferred: writer,
    }
}
