//! The convergence checker: random histories across regions, with faults,
//! checked against what last-writer-wins must produce.
//!
//! Three regions (us, eu, cn), each its own PostgreSQL cluster, broker (behind
//! a proxy that can cut its link) and sidecar. One writer per region issues
//! random operations ([`Op`]) on a `global` table `g`, an `owned` table `o`
//! (owner us) and a `partitioned` table `p` (home in column `home`; us-homed
//! rows may also live in eu), a second `partitioned` table `q` whose policy
//! changes mid-history ([`Fault::PolicyChange`]), a `global` table `m` with
//! merge columns and a guarded table `b`. Every committed write is logged with the stamp
//! PostgreSQL gave it. The writers log in as an application role holding
//! only what the README says one needs: its tables, nothing of pgrelay's.
//! Each region runs two writers on the same keys, and `g` has an
//! application BEFORE INSERT trigger that sometimes sleeps, so local writes
//! of one key race (an insert overtaken by a delete of its key). Faults ([`Fault`]) are injected while the writers run.
//!
//! The model ([`Model::expected`]) computes, per region and key, the version
//! last-writer-wins must leave there: the highest-stamped version among
//! those the region may see (all of them for `g` and `o`; for `p`, the
//! region's own writes and the changes its residency rules let in, a row
//! moving out of the region arriving as a delete). The check waits until
//! every region holds exactly that (a positive sign that everything was
//! processed), then reads every record of every topic for residency. A
//! failure prints the seed, the key, the expected and found versions and
//! the operations that touched the key.
//!
//! The blast-radius breaker: a `global` table `b` is guarded (more than 3
//! deletes from one source within a minute trip it). Its only deletes are
//! storms ([`Op::StormB`], `DELETE FROM b`), which trip the breaker in the
//! other regions; once the writers are done, each frozen pair is released or
//! discarded (drawn from the seed) while the check waits. The model:
//! released changes apply exactly once (plain last-writer-wins); discarded
//! ones — exactly the records the destination parked with class
//! `breaker_discarded`, read from its dead-letter topic — never apply there.
//!
//! Growing it: a new feature adds its operations to [`Op`] (and
//! [`Writer::run_op`]), and its rules to [`Model::expected`].
//!
//! `PGRELAY_CHECK_SEEDS=1,2,3` and `PGRELAY_CHECK_OPS=N` change the seeds and
//! the history length; `scripts/soak.sh` runs new seeds for as long as asked.
//! `PGRELAY_CHECK_DURABLE=1` runs the brokers on durable storage and draws
//! broker restarts too (that build of the test broker panics now and then;
//! a panicked one is started again and counted).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::broker::{durable_tansu_bin, Broker};
use crate::support::kafka::{read_all, read_to_markers};
use crate::support::pg::Pg;
use crate::support::proxy::Proxy;
use crate::support::relay::{self, ConfigFile, Relay};

pub const REGIONS: [&str; 3] = ["us", "eu", "cn"];

const SCHEMA: &str = "
CREATE TABLE g (id int PRIMARY KEY, n int NOT NULL DEFAULT 0, s text, big text,
                secret text DEFAULT 'SECRET-' || md5(random()::text));
CREATE TABLE o (id int PRIMARY KEY, n int NOT NULL DEFAULT 0, extra text);
CREATE TABLE p (id int PRIMARY KEY, home text NOT NULL, n int NOT NULL DEFAULT 0, big text);
CREATE TABLE b (id int PRIMARY KEY, n int NOT NULL DEFAULT 0);
CREATE TABLE m (id int PRIMARY KEY, c bigint NOT NULL DEFAULT 0, items text[] NOT NULL DEFAULT '{}', s text);
CREATE TABLE q (id int PRIMARY KEY, home text NOT NULL, n int NOT NULL DEFAULT 0);
";

/// `g`'s column that never leaves its region (a `drop` rule): every row
/// gets a value marked [`SECRET_MARK`] where it is inserted, and no record of
/// any topic may carry one. [`Fault::SchemaChange`] renames it in place to
/// [`G_SECRET_RENAMED`] under a backlog, with the rule updated.
const G_SECRET: &str = "secret";
const G_SECRET_RENAMED: &str = "hidden";
const SECRET_MARK: &str = "SECRET-";

/// The tables the check compares.
const TABLES: [&str; 6] = ["g", "o", "p", "b", "m", "q"];

/// us's DR key (32 bytes, hex): the key that seals `o`'s copies in eu's vault.
const DR_KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

/// Which regions may hold a `p` row homed in `home`.
pub fn allowed(home: &str, region: &str) -> bool {
    home == region || (home == "us" && region == "eu")
}

/// `q`'s policy before [`Fault::PolicyChange`] (us's rows may live in eu),
/// as the config spells it.
const Q_POLICY_BEFORE: &str = "cn = []\neu = []\nus = [\"eu\"]\n";
/// `q`'s policy after it: us's rows may no longer live in eu, eu's may now
/// live in cn.
const Q_POLICY_AFTER: &str = "cn = []\neu = [\"cn\"]\nus = []\n";

/// Which regions may hold a `q` row homed in `home`, before or after the
/// policy change.
pub fn q_allowed(home: &str, region: &str, changed: bool) -> bool {
    home == region
        || if changed {
            home == "eu" && region == "cn"
        } else {
            home == "us" && region == "eu"
        }
}

fn config(
    pg: &BTreeMap<&'static str, Pg>,
    brokers: &BTreeMap<&'static str, (Broker, Proxy)>,
) -> String {
    // us seals encrypted DR copies of `o` for eu's vault: only us holds the key
    let regions = crate::sidecar::region_blocks(pg, brokers, |r| {
        if r == "us" {
            format!("dr_key = \"{DR_KEY}\"\n")
        } else {
            String::new()
        }
    });
    format!(
        r#"
[relay]
prefix = "pgrelay"

[relay.capture]
status_interval = "200ms"
topic_partitions = 3

[relay.apply]
batch_max_wait = "20ms"

{regions}
[[tables]]
name = "public.g"
class = "global"
[[tables.columns]]
name = "{G_SECRET}"
action = "drop"

[[tables]]
name = "public.o"
class = "owned"
owner = "us"
dr = ["eu"]

[[tables]]
name = "public.m"
class = "global"
[[tables.columns]]
name = "c"
merge = "counter"
[[tables.columns]]
name = "items"
merge = "union"

[[tables]]
name = "public.p"
class = "partitioned"
home_column = "home"
[tables.allow]
us = ["eu"]
eu = []
cn = []

[[tables]]
name = "public.q"
class = "partitioned"
home_column = "home"
[tables.allow]
{Q_POLICY_BEFORE}
[[tables]]
name = "public.b"
class = "global"

[[breakers]]
table = "public.b"
max_deletes = 3
window = "1m"
truncate = false
"#
    )
}

/// SplitMix64: small, seedable, good enough to draw operations.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    /// `len` characters that compress poorly (so the value is TOASTed
    /// out of line, not just compressed in place).
    pub fn big_text(&mut self, len: usize) -> String {
        const ALPHA: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
        (0..len)
            .map(|_| ALPHA[self.below(ALPHA.len() as u64) as usize] as char)
            .collect()
    }
}

/// One operation a writer may issue (inside one transaction with others).
#[derive(Debug, Clone)]
pub enum Op {
    /// Insert or overwrite `g` row `id` (all columns but `big`, which a new
    /// row gets and an existing row keeps).
    UpsertG {
        id: i32,
        n: i32,
        s: String,
        big: usize,
    },
    /// Add `k` to the counter `m.c` (a new row starts from zero).
    IncM {
        id: i32,
        k: i64,
    },
    /// Add `item` (unique in the history) to the set `m.items`.
    AddM {
        id: i32,
        item: String,
    },
    /// Set `m.s`, a column that stays last-writer-wins.
    SetMS {
        id: i32,
        s: String,
    },
    /// Update `g.n` only (a TOASTed `big` stays untouched).
    SetGN {
        id: i32,
        n: i32,
    },
    /// Replace `g.big` with a new TOASTed value of this length.
    SetGBig {
        id: i32,
        len: usize,
    },
    DeleteG {
        id: i32,
    },
    /// Move a `g` row to a new primary key.
    MoveG {
        id: i32,
        to: i32,
    },
    TruncateG,
    /// A truncate of `p`: stays in its region (homes decide where rows go,
    /// and a truncate has none).
    TruncateP,
    UpsertO {
        id: i32,
        n: i32,
    },
    DeleteO {
        id: i32,
    },
    /// A write to `o` outside its owner: must be refused.
    ForbiddenO {
        id: i32,
    },
    InsertP {
        id: i32,
        home: &'static str,
        big: usize,
    },
    SetPN {
        id: i32,
        n: i32,
    },
    SetPBig {
        id: i32,
        len: usize,
    },
    MoveHomeP {
        id: i32,
        home: &'static str,
    },
    DeleteP {
        id: i32,
    },
    /// Insert or overwrite `b` row `id`.
    UpsertB {
        id: i32,
        n: i32,
    },
    /// `DELETE FROM b`: the only deletes of `b`, a storm when more than 3
    /// rows go.
    StormB,
    /// Insert or update `q` row `id`, homed in the writing region (its key
    /// range is the region's own).
    UpsertQ {
        id: i32,
        n: i32,
    },
    DeleteQ {
        id: i32,
    },
}

impl Op {
    fn table(&self) -> &'static str {
        match self {
            Op::UpsertG { .. }
            | Op::SetGN { .. }
            | Op::SetGBig { .. }
            | Op::DeleteG { .. }
            | Op::MoveG { .. }
            | Op::TruncateG => "g",
            Op::UpsertO { .. } | Op::DeleteO { .. } | Op::ForbiddenO { .. } => "o",
            Op::UpsertB { .. } | Op::StormB => "b",
            Op::IncM { .. } | Op::AddM { .. } | Op::SetMS { .. } => "m",
            Op::UpsertQ { .. } | Op::DeleteQ { .. } => "q",
            _ => "p",
        }
    }
}

/// Draws the next operation of `region`'s writer.
pub fn draw(rng: &mut Rng, region: &'static str, keys: i32, truncates: bool) -> Op {
    let id = rng.below(keys as u64) as i32 + 1;
    let n = rng.below(1_000_000) as i32;
    let home = REGIONS[rng.below(3) as usize];
    let big = if rng.chance(50) {
        9_000 + rng.below(3_000) as usize
    } else {
        0
    };
    // the merged table: no deletes there (a delete racing increments
    // elsewhere is last-writer-wins for the row, not a merge)
    match rng.below(100) {
        0..=5 => {
            return Op::IncM {
                id,
                k: n as i64 % 10 - 3,
            }
        }
        6..=9 => {
            return Op::AddM {
                id,
                item: format!("{region}-{}", rng.next()),
            }
        }
        10..=11 => {
            return Op::SetMS {
                id,
                s: format!("{region}-{n}"),
            }
        }
        // the policy-change table: each region writes rows of its own home
        // only, on keys no other region writes
        12..=15 => {
            let own = 1000 * REGIONS.iter().position(|r| *r == region).unwrap_or(0) as i32 + id;
            return if rng.chance(75) {
                Op::UpsertQ { id: own, n }
            } else {
                Op::DeleteQ { id: own }
            };
        }
        _ => {}
    }
    match rng.below(100) {
        0..=14 => Op::UpsertG {
            id,
            n,
            s: format!("{region}-{n}"),
            big,
        },
        15..=29 => Op::SetGN { id, n },
        30..=36 => Op::SetGBig {
            id,
            len: 9_000 + rng.below(3_000) as usize,
        },
        37..=43 => Op::DeleteG { id },
        44..=47 => Op::MoveG {
            id,
            to: rng.below(keys as u64) as i32 + 1,
        },
        48 if truncates && rng.chance(30) => Op::TruncateG,
        48..=57 if region == "us" => Op::UpsertO { id, n },
        48..=57 => Op::ForbiddenO { id },
        58..=60 if region == "us" => Op::DeleteO { id },
        58..=60 => Op::SetGN { id, n },
        61..=72 => Op::InsertP { id, home, big },
        73..=82 => Op::SetPN { id, n },
        83..=87 => Op::SetPBig {
            id,
            len: 9_000 + rng.below(3_000) as usize,
        },
        88..=93 => Op::MoveHomeP { id, home },
        94 if truncates && rng.chance(30) => Op::TruncateP,
        94..=96 => Op::UpsertB { id, n },
        97 if rng.chance(50) => Op::StormB,
        _ => Op::DeleteP { id },
    }
}

/// A row version as every region must spell it: the columns (text, big as
/// its md5) and the stamp. `None` columns: the version is a delete.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub stamp: i64,
    pub cols: Option<Vec<Option<String>>>,
}

/// One committed write of one row.
#[derive(Debug, Clone)]
pub struct Write {
    pub region: &'static str,
    pub table: &'static str,
    pub key: i32,
    pub version: Version,
    /// `p`: the row's home before and after the write (`None`: no row).
    pub homes: (Option<String>, Option<String>),
    pub op: String,
    /// `m`: what the write added to the counter, and to the set.
    pub delta: i64,
    pub item: Option<String>,
}

/// Everything the writers committed.
#[derive(Default)]
pub struct History {
    pub writes: Vec<Write>,
    /// Truncates: region, table, the stamp of the table-wide tombstone.
    pub truncates: Vec<(&'static str, &'static str, i64)>,
    pub ops: usize,
    pub refused: usize,
    /// Transactions a fenced region refused (nothing of them committed;
    /// the writer tries them again after the fence is lifted).
    pub fenced: usize,
    /// Commits whose answer was lost (a crash, a failover) that the
    /// region's marker row showed committed: in the history.
    pub in_doubt_committed: usize,
    /// Such commits that had not happened: left out.
    pub in_doubt_lost: usize,
    /// Changes a destination parked with `pgrelay breaker discard`:
    /// (destination, table, key, stamp). They never apply there.
    pub discarded: BTreeSet<(&'static str, String, i32, i64)>,
    /// After a `LostSlot` fault: the `p` records each topic carries,
    /// (source, destination, key, stamp). See [`Model::expected`].
    pub delivered_p: Option<BTreeSet<(&'static str, &'static str, i32, i64)>>,
    /// The regions whose slot was lost.
    pub lost_slots: BTreeSet<&'static str>,
    /// `Join`: the newest stamp of `p` and `q` cn held when its database
    /// was replaced.
    pub joined: Option<i64>,
    /// `PolicyChange` ran: `q`'s new policy holds.
    pub policy_changed: bool,
}

pub struct Model<'h>(pub &'h History);

impl Model<'_> {
    /// What `region` must hold of `table`: key -> version.
    pub fn expected(&self, table: &str, region: &str) -> BTreeMap<i32, Version> {
        if table == "m" {
            return self.merged();
        }
        let mut best: BTreeMap<i32, Version> = BTreeMap::new();
        // what cn wrote of `p` before its database was replaced is gone
        // with it where no other region holds it: cn's own versions
        // (other regions' versions of the same keys come back with their
        // resync)
        let lost_with_cn = |region: &str, writer: &str, stamp: i64| {
            (table == "p" || table == "q")
                && region == "cn"
                && writer == "cn"
                && self.0.joined.is_some_and(|j| stamp <= j)
        };
        for w in self.0.writes.iter().filter(|w| w.table == table) {
            if lost_with_cn(region, w.region, w.version.stamp) {
                continue;
            }
            if self.0.discarded.contains(&(
                region_name(region),
                table.to_string(),
                w.key,
                w.version.stamp,
            )) {
                continue;
            }
            // a lost slot's limit (README, "A lost slot"): the resync
            // sends a region's rows as they are, not their history, so a
            // version of a `p` row its region wrote while no slot carried
            // it, and then replaced there (written again, moved, deleted,
            // truncated) before the resync, may never reach another region
            // — what matters for a partitioned row that left a region's
            // homes meanwhile. Such a version counts elsewhere only if its
            // record was published after all; the region's last version of
            // each row must arrive as always.
            if let Some(delivered) = &self.0.delivered_p {
                if table == "p"
                    && w.region != region
                    && self.0.lost_slots.contains(w.region)
                    && !delivered.contains(&(w.region, region_name(region), w.key, w.version.stamp))
                {
                    let replaced = self.0.writes.iter().any(|o| {
                        o.table == "p"
                            && o.region == w.region
                            && o.key == w.key
                            && o.version.stamp > w.version.stamp
                    }) || self
                        .0
                        .truncates
                        .iter()
                        .any(|(r, t, s)| *r == w.region && *t == "p" && *s > w.version.stamp);
                    // a move out of this region's homes reaches it only as
                    // the stream's delete: a resync sends the row where it
                    // may go now, not where it may no longer be
                    let moved_out = w.version.cols.is_some()
                        && w.homes.0.as_deref().is_some_and(|h| allowed(h, region))
                        && !w.homes.1.as_deref().is_some_and(|h| allowed(h, region));
                    if replaced || moved_out {
                        continue;
                    }
                }
            }
            let seen = match table {
                "p" if w.region != region => {
                    let before = w.homes.0.as_deref().is_some_and(|h| allowed(h, region));
                    let after = w.homes.1.as_deref().is_some_and(|h| allowed(h, region));
                    match (before, after, &w.version.cols) {
                        // a delete of a row the region may hold
                        (true, _, None) => Some(w.version.clone()),
                        (_, true, Some(_)) => Some(w.version.clone()),
                        // moved out: a delete there
                        (true, false, Some(_)) => Some(Version {
                            stamp: w.version.stamp,
                            cols: None,
                        }),
                        _ => None,
                    }
                }
                // homed where it was written; the policy in force at the
                // end decides (the procedures move rows as it says)
                "q" if w.region != region => {
                    q_allowed(w.region, region, self.0.policy_changed).then(|| w.version.clone())
                }
                _ => Some(w.version.clone()),
            };
            if let Some(v) = seen {
                let e = best.entry(w.key).or_insert_with(|| Version {
                    stamp: i64::MIN,
                    cols: None,
                });
                if v.stamp > e.stamp {
                    *e = v;
                }
            }
        }
        // a truncate of g reaches every region; one of p stays where it ran
        let truncated = self
            .0
            .truncates
            .iter()
            .filter(|(r, t, s)| {
                *t == table && (table == "g" || *r == region) && !lost_with_cn(region, r, *s)
            })
            .map(|(_, _, s)| *s)
            .max();
        {
            if let Some(t) = truncated {
                for v in best.values_mut() {
                    if v.stamp < t {
                        *v = Version {
                            stamp: t,
                            cols: None,
                        };
                    }
                }
            }
        }
        best.into_iter().filter(|(_, v)| v.cols.is_some()).collect()
    }

    /// What every region must hold of `m`: per row, the counter is the sum
    /// of every region's increments, the set holds every item added, and
    /// the rest (the stamp, `s`) is the newest write's.
    fn merged(&self) -> BTreeMap<i32, Version> {
        let mut rows: BTreeMap<i32, (i64, BTreeSet<String>, Version)> = BTreeMap::new();
        for w in self.0.writes.iter().filter(|w| w.table == "m") {
            let e = rows.entry(w.key).or_insert_with(|| {
                (
                    0,
                    BTreeSet::new(),
                    Version {
                        stamp: i64::MIN,
                        cols: None,
                    },
                )
            });
            e.0 += w.delta;
            e.1.extend(w.item.clone());
            if w.version.stamp > e.2.stamp {
                e.2 = w.version.clone();
            }
        }
        rows.into_iter()
            .map(|(k, (sum, items, newest))| {
                let s = newest.cols.and_then(|c| c.get(2).cloned().flatten());
                let items: Vec<String> = items.into_iter().collect();
                let cols = vec![Some(sum.to_string()), Some(items.join(",")), s];
                (
                    k,
                    Version {
                        stamp: newest.stamp,
                        cols: Some(cols),
                    },
                )
            })
            .collect()
    }

    /// The writes that touched `key` of `table`, for failure reports.
    pub fn trail(&self, table: &str, key: i32) -> String {
        let mut out = String::new();
        for w in self
            .0
            .writes
            .iter()
            .filter(|w| w.table == table && w.key == key)
        {
            let _ = writeln!(
                out,
                "    {} {} stamp {} homes {:?} -> {:?}",
                w.region, w.op, w.version.stamp, w.homes, w.version.cols
            );
        }
        for (r, t, stamp) in &self.0.truncates {
            if *t == table {
                let _ = writeln!(out, "    {r} TRUNCATE {t} stamp {stamp}");
            }
        }
        out
    }
}

fn region_name(region: &str) -> &'static str {
    REGIONS
        .into_iter()
        .find(|r| *r == region)
        .expect("a region of the checker")
}

/// SELECT list giving a [`Version`]'s columns, then the stamp. `g`'s
/// `added` reads as NULL where the column does not exist yet (and nobody
/// writes it before every region has it, see [`Shape`]); `o.extra` is
/// never compared (it is dropped under a backlog, see
/// [`Fault::SchemaChange`]).
fn select_list(table: &str) -> &'static str {
    match table {
        "g" => "id, n::text, s, md5(big), to_jsonb(g) ->> 'added', _pgrelay_hlc",
        "o" | "b" => "id, n::text, _pgrelay_hlc",
        "m" => "id, c::text, array_to_string(ARRAY(SELECT x FROM unnest(items) AS x ORDER BY x COLLATE \"C\"), ','), s, _pgrelay_hlc",
        "q" => "id, home, n::text, _pgrelay_hlc",
        _ => "id, home, n::text, md5(big), _pgrelay_hlc",
    }
}

/// The schema as the history goes. `o` starts with `extra`, a TOASTed
/// column us's writers set on insert and leave untouched on every update;
/// [`Fault::SchemaChange`] drops it under a backlog, then adds `g.added`
/// in one region after another, and only once every region has it do the
/// writers write it (the README's schema-change procedure).
#[derive(Default)]
pub struct Shape {
    extra_dropped: std::sync::atomic::AtomicBool,
    added: std::sync::atomic::AtomicBool,
    /// `g.secret` is `g.hidden` now, and the rule says so.
    renamed: std::sync::atomic::AtomicBool,
}

impl Shape {
    fn extra_dropped(&self) -> bool {
        self.extra_dropped.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn added(&self) -> bool {
        self.added.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn renamed(&self) -> bool {
        self.renamed.load(std::sync::atomic::Ordering::SeqCst)
    }
}

fn version_of(row: &tokio_postgres::Row) -> (i32, Version) {
    let n = row.len();
    let cols = (1..n - 1)
        .map(|i| row.get::<_, Option<String>>(i))
        .collect();
    (
        row.get(0),
        Version {
            stamp: row.get(n - 1),
            cols: Some(cols),
        },
    )
}

/// What a region holds of `table`.
pub async fn actual(c: &tokio_postgres::Client, table: &str) -> BTreeMap<i32, Version> {
    c.query(
        &format!("SELECT {} FROM {table} ORDER BY id", select_list(table)),
        &[],
    )
    .await
    .map(|rows| rows.iter().map(version_of).collect())
    .unwrap_or_default()
}

pub struct Writer {
    pub region: &'static str,
    pub dsn: String,
    pub rng: Rng,
    pub keys: i32,
    pub truncates: bool,
    /// Up to this many ms between transactions (spreads the history over
    /// the faults).
    pub pace_ms: u64,
    pub shape: Arc<Shape>,
    /// Set once every fault is injected: until then the writer goes on
    /// past `ops`, so every fault and procedure runs while regions write.
    pub faults_done: Arc<std::sync::atomic::AtomicBool>,
    /// Held for each transaction (see [`World::gates`]).
    pub gate: Arc<tokio::sync::RwLock<()>>,
}

/// `pgrelay fence` refuses every local write with SQLSTATE 25006.
fn is_fenced(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| c.code() == "25006")
}

fn transient(e: &tokio_postgres::Error) -> bool {
    e.is_closed()
        || e.code().is_none_or(|c| {
            let c = c.code();
            c.starts_with("57P") || c.starts_with("08") || c == "40001" || c == "40P01"
        })
}

impl Writer {
    /// Runs `ops` transactions of 1–3 operations; returns what committed.
    pub async fn run(mut self, ops: usize, history: Arc<Mutex<History>>) {
        let mut client = connect(&self.dsn).await;
        let mut done = 0;
        while done < ops || !self.faults_done.load(std::sync::atomic::Ordering::SeqCst) {
            let n = 1 + self.rng.below(3) as usize;
            let batch: Vec<Op> = (0..n)
                .map(|_| draw(&mut self.rng, self.region, self.keys, self.truncates))
                .collect();
            let mut rng = self.rng.clone();
            let gate = self.gate.clone();
            let open = gate.read().await;
            if client.is_closed() {
                client = connect(&self.dsn).await;
            }
            // the transaction's marker row: whether it committed, when the
            // commit's answer is lost (a crash, a failover mid-commit)
            let mark = TX_MARK.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            // what the transaction wrote, once only its commit is left
            let mut pending = None;
            let result = async {
                let tx = client.transaction().await?;
                tx.execute("INSERT INTO public.checker_tx (id) VALUES ($1)", &[&mark])
                    .await?;
                let mut writes = Vec::new();
                let mut truncates = Vec::new();
                let mut refused = 0;
                for op in &batch {
                    match self.run_op(&tx, op, &mut rng, &mut writes).await? {
                        Outcome::Done => {}
                        Outcome::Truncated(table, t) => truncates.push((table, t)),
                        Outcome::Refused => refused += 1,
                    }
                }
                pending = Some((writes, truncates, refused));
                tx.commit().await?;
                Ok::<_, tokio_postgres::Error>(())
            }
            .await;
            drop(open);
            self.rng = rng;
            let record = |(writes, truncates, refused): Committed| {
                let mut h = history.lock().unwrap();
                h.writes.extend(writes);
                h.truncates.extend(
                    truncates
                        .into_iter()
                        .map(|(table, t)| (self.region, table, t)),
                );
                h.ops += batch.len();
                h.refused += refused;
            };
            match result {
                Ok(()) => {
                    record(pending.take().expect("committed"));
                    done += 1;
                    tokio::time::sleep(Duration::from_millis(self.rng.below(self.pace_ms + 1)))
                        .await;
                }
                // a duplicate key, a moved row's new key taken: nothing committed
                Err(e) if e.code().is_some_and(|c| c.code() == "23505") => done += 1,
                // `o.extra` dropped between choosing the statement and
                // running it: nothing committed, try again (without it)
                Err(e) if e.code().is_some_and(|c| c.code() == "42703") => {}
                // the region is fenced: nothing committed, try again later
                Err(e) if is_fenced(&e) => {
                    history.lock().unwrap().fenced += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) if transient(&e) => {
                    if client.is_closed() {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        client = connect(&self.dsn).await;
                    }
                    // a commit whose answer was lost happened or not: the
                    // database (the promoted standby after a failover) says
                    // which by the marker row; a failure before the commit
                    // committed nothing
                    if let Some(committed) = pending.take() {
                        if self.committed(&mut client, mark).await {
                            record(committed);
                            history.lock().unwrap().in_doubt_committed += 1;
                            done += 1;
                        } else {
                            history.lock().unwrap().in_doubt_lost += 1;
                        }
                    }
                }
                Err(e) => panic!("{} writer: {e:?}", self.region),
            }
        }
    }

    /// Whether the transaction that wrote marker `mark` committed: asked
    /// until the region answers.
    async fn committed(&self, client: &mut tokio_postgres::Client, mark: i64) -> bool {
        loop {
            match client
                .query_opt("SELECT 1 FROM public.checker_tx WHERE id = $1", &[&mark])
                .await
            {
                Ok(row) => return row.is_some(),
                Err(e) if transient(&e) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if client.is_closed() {
                        *client = connect(&self.dsn).await;
                    }
                }
                Err(e) => panic!("{} writer: reading its commit marker: {e:?}", self.region),
            }
        }
    }

    async fn run_op(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        op: &Op,
        rng: &mut Rng,
        out: &mut Vec<Write>,
    ) -> Result<Outcome, tokio_postgres::Error> {
        let table = op.table();
        let sel = select_list(table);
        let push = |out: &mut Vec<Write>, key: i32, version: Version, homes| {
            out.push(Write {
                region: self.region,
                table,
                key,
                version,
                homes,
                op: format!("{op:?}"),
                delta: match op {
                    Op::IncM { k, .. } => *k,
                    _ => 0,
                },
                item: match op {
                    Op::AddM { item, .. } => Some(item.clone()),
                    _ => None,
                },
            })
        };
        let rows = match op {
            Op::UpsertG { id, n, s, big } => {
                let big = (*big > 0).then(|| rng.big_text(*big));
                // `added` once every region has it
                let added = n % 7;
                if self.shape.added() {
                    tx.query(
                        &format!(
                            "INSERT INTO g (id, n, s, big, added) VALUES ($1, $2, $3, $4, $5) \
                             ON CONFLICT (id) DO UPDATE SET n = EXCLUDED.n, s = EXCLUDED.s, \
                             added = EXCLUDED.added RETURNING {sel}"
                        ),
                        &[id, n, s, &big, &added],
                    )
                    .await?
                } else {
                    tx.query(
                        &format!(
                            "INSERT INTO g (id, n, s, big) VALUES ($1, $2, $3, $4) \
                             ON CONFLICT (id) DO UPDATE SET n = EXCLUDED.n, s = EXCLUDED.s RETURNING {sel}"
                        ),
                        &[id, n, s, &big],
                    )
                    .await?
                }
            }
            Op::IncM { id, k } => {
                tx.query(
                    &format!(
                        "INSERT INTO m (id, c) VALUES ($1, $2) \
                         ON CONFLICT (id) DO UPDATE SET c = m.c + EXCLUDED.c RETURNING {sel}"
                    ),
                    &[id, k],
                )
                .await?
            }
            Op::AddM { id, item } => {
                tx.query(
                    &format!(
                        "INSERT INTO m (id, items) VALUES ($1, ARRAY[$2]) \
                         ON CONFLICT (id) DO UPDATE SET items = array_append(m.items, $2) RETURNING {sel}"
                    ),
                    &[id, item],
                )
                .await?
            }
            Op::SetMS { id, s } => {
                tx.query(
                    &format!(
                        "INSERT INTO m (id, s) VALUES ($1, $2) \
                         ON CONFLICT (id) DO UPDATE SET s = EXCLUDED.s RETURNING {sel}"
                    ),
                    &[id, s],
                )
                .await?
            }
            Op::SetGN { id, n } => {
                tx.query(
                    &format!("UPDATE g SET n = $2 WHERE id = $1 RETURNING {sel}"),
                    &[id, n],
                )
                .await?
            }
            Op::SetGBig { id, len } => {
                let big = rng.big_text(*len);
                tx.query(
                    &format!("UPDATE g SET big = $2 WHERE id = $1 RETURNING {sel}"),
                    &[id, &big],
                )
                .await?
            }
            // a new row of `o` gets a TOASTed `extra` while the column
            // exists; updates leave it alone
            Op::UpsertO { id, n } if !self.shape.extra_dropped() => {
                let extra = rng.big_text(9_000);
                tx.query(
                    &format!(
                        "INSERT INTO o (id, n, extra) VALUES ($1, $2, $3) \
                         ON CONFLICT (id) DO UPDATE SET n = EXCLUDED.n RETURNING {sel}"
                    ),
                    &[id, n, &extra],
                )
                .await?
            }
            Op::UpsertO { id, n } | Op::UpsertB { id, n } => {
                tx.query(
                    &format!(
                        "INSERT INTO {table} (id, n) VALUES ($1, $2) \
                         ON CONFLICT (id) DO UPDATE SET n = EXCLUDED.n RETURNING {sel}"
                    ),
                    &[id, n],
                )
                .await?
            }
            Op::StormB => {
                let gone = tx.query("DELETE FROM b RETURNING id", &[]).await?;
                for r in &gone {
                    let id: i32 = r.get(0);
                    let stamp = tombstone(tx, table, &id.to_string()).await?;
                    push(out, id, Version { stamp, cols: None }, (None, None));
                }
                return Ok(Outcome::Done);
            }
            Op::SetPN { id, n } => {
                let home = p_home(tx, *id).await?;
                let rows = tx
                    .query(
                        &format!("UPDATE p SET n = $2 WHERE id = $1 RETURNING {sel}"),
                        &[id, n],
                    )
                    .await?;
                for r in &rows {
                    let (k, v) = version_of(r);
                    push(out, k, v, (home.clone(), home.clone()));
                }
                return Ok(Outcome::Done);
            }
            Op::SetPBig { id, len } => {
                let home = p_home(tx, *id).await?;
                let big = rng.big_text(*len);
                let rows = tx
                    .query(
                        &format!("UPDATE p SET big = $2 WHERE id = $1 RETURNING {sel}"),
                        &[id, &big],
                    )
                    .await?;
                for r in &rows {
                    let (k, v) = version_of(r);
                    push(out, k, v, (home.clone(), home.clone()));
                }
                return Ok(Outcome::Done);
            }
            Op::MoveHomeP { id, home } => {
                let old = p_home(tx, *id).await?;
                let rows = tx
                    .query(
                        &format!("UPDATE p SET home = $2 WHERE id = $1 RETURNING {sel}"),
                        &[id, home],
                    )
                    .await?;
                for r in &rows {
                    let (k, v) = version_of(r);
                    push(out, k, v, (old.clone(), Some(home.to_string())));
                }
                return Ok(Outcome::Done);
            }
            Op::InsertP { id, home, big } => {
                if p_home(tx, *id).await?.is_some() {
                    return Ok(Outcome::Done);
                }
                let big = (*big > 0).then(|| rng.big_text(*big));
                let rows = tx
                    .query(
                        &format!(
                            "INSERT INTO p (id, home, big) VALUES ($1, $2, $3) RETURNING {sel}"
                        ),
                        &[id, home, &big],
                    )
                    .await?;
                for r in &rows {
                    let (k, v) = version_of(r);
                    push(out, k, v, (None, Some(home.to_string())));
                }
                return Ok(Outcome::Done);
            }
            Op::UpsertQ { id, n } => {
                let rows = tx
                    .query(
                        &format!(
                            "INSERT INTO q (id, home, n) VALUES ($1, $2, $3) \
                             ON CONFLICT (id) DO UPDATE SET n = excluded.n RETURNING {sel}"
                        ),
                        &[id, &self.region, n],
                    )
                    .await?;
                for r in &rows {
                    let (k, v) = version_of(r);
                    let home = Some(self.region.to_string());
                    push(out, k, v, (home.clone(), home));
                }
                return Ok(Outcome::Done);
            }
            Op::DeleteG { id } | Op::DeleteO { id } | Op::DeleteP { id } | Op::DeleteQ { id } => {
                let home = if table == "p" {
                    p_home(tx, *id).await?
                } else {
                    None
                };
                let gone = tx
                    .query(
                        &format!("DELETE FROM {table} WHERE id = $1 RETURNING id"),
                        &[id],
                    )
                    .await?;
                if !gone.is_empty() {
                    let stamp = tombstone(tx, table, &id.to_string()).await?;
                    push(out, *id, Version { stamp, cols: None }, (home, None));
                }
                return Ok(Outcome::Done);
            }
            Op::MoveG { id, to } => {
                if id == to {
                    return Ok(Outcome::Done);
                }
                let rows = tx
                    .query(
                        &format!("UPDATE g SET id = $2 WHERE id = $1 RETURNING {sel}"),
                        &[id, to],
                    )
                    .await?;
                for r in &rows {
                    let (k, v) = version_of(r);
                    // the old key is gone, under the move's stamp
                    push(
                        out,
                        *id,
                        Version {
                            stamp: v.stamp,
                            cols: None,
                        },
                        (None, None),
                    );
                    push(out, k, v, (None, None));
                }
                return Ok(Outcome::Done);
            }
            Op::TruncateG | Op::TruncateP => {
                tx.execute(&format!("TRUNCATE {table}"), &[]).await?;
                return Ok(Outcome::Truncated(table, tombstone(tx, table, "").await?));
            }
            Op::ForbiddenO { id } => {
                tx.execute("SAVEPOINT forbidden", &[]).await?;
                let r = tx
                    .execute("INSERT INTO o (id, n) VALUES ($1, 1)", &[id])
                    .await;
                let err = r.expect_err("a write to an owned table outside its owner must fail");
                if transient(&err) || is_fenced(&err) {
                    // the database went away meanwhile: the transaction is retried
                    return Err(err);
                }
                assert!(
                    format!("{err:?}").contains("owned by region us"),
                    "unexpected refusal: {err:?}"
                );
                tx.execute("ROLLBACK TO SAVEPOINT forbidden", &[]).await?;
                return Ok(Outcome::Refused);
            }
        };
        for r in &rows {
            let (k, v) = version_of(r);
            push(out, k, v, (None, None));
        }
        Ok(Outcome::Done)
    }
}

enum Outcome {
    Done,
    Truncated(&'static str, i64),
    Refused,
}

async fn p_home(
    tx: &tokio_postgres::Transaction<'_>,
    id: i32,
) -> Result<Option<String>, tokio_postgres::Error> {
    Ok(tx
        .query_opt("SELECT home FROM p WHERE id = $1 FOR UPDATE", &[&id])
        .await?
        .map(|r| r.get(0)))
}

/// The stamp of the tombstone a delete (key `id`) or truncate (`""`) left.
async fn tombstone(
    tx: &tokio_postgres::Transaction<'_>,
    table: &str,
    id: &str,
) -> Result<i64, tokio_postgres::Error> {
    let pk = if id.is_empty() {
        "{}".to_string()
    } else {
        serde_json::json!({ "id": id }).to_string()
    };
    // the writers hold no privilege on pgrelay's objects: a probe the test
    // installed reads the tombstone (in the writer's own transaction)
    Ok(tx
        .query_one(
            "SELECT public.checker_tombstone($1, $2::text::jsonb)",
            &[&format!("public.{table}"), &pk],
        )
        .await?
        .get(0))
}

/// The application role the writers run as: it may write the tables and
/// nothing of pgrelay's (the README's roles section), plus the test's probe.
const APP_ROLE: &str = "pgrelay_app";

/// Creates [`APP_ROLE`] in `pg` with only what the README says an
/// application role needs, and the probe [`tombstone`] reads through.
/// The next writer transaction's commit marker (`public.checker_tx`).
static TX_MARK: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(1);

/// What a writer transaction wrote: rows, truncates, refused writes.
type Committed = (Vec<Write>, Vec<(&'static str, i64)>, usize);

fn create_app_role(pg: &Pg) {
    pg.psql(&format!(
        "CREATE ROLE {APP_ROLE} LOGIN PASSWORD '{password}'",
        password = crate::support::pg::PASSWORD
    ));
    create_app_objects(pg);
}

/// The application's grants, the probe and the application's own trigger
/// in `pg`'s database (the role itself is the cluster's).
fn create_app_objects(pg: &Pg) {
    let tables = TABLES.join(", ");
    pg.psql(&format!(
        "GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON {tables} TO {APP_ROLE};
         -- the writers' commit markers (not replicated: no table rule names it)
         CREATE TABLE IF NOT EXISTS public.checker_tx (id bigint PRIMARY KEY);
         GRANT SELECT, INSERT ON public.checker_tx TO {APP_ROLE};
         CREATE FUNCTION public.checker_tombstone(t text, k jsonb) RETURNS bigint
             LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS
             $$ SELECT hlc FROM pgrelay.tombstones WHERE table_name = t AND pk = k $$;
         REVOKE ALL ON FUNCTION public.checker_tombstone(text, jsonb) FROM PUBLIC;
         GRANT EXECUTE ON FUNCTION public.checker_tombstone(text, jsonb) TO {APP_ROLE};
         -- an application's own BEFORE trigger that sometimes takes a while:
         -- it runs after pgrelay's stamp trigger and before the unique check,
         -- so a delete of the key can overtake the insert
         CREATE FUNCTION public.app_slow_insert() RETURNS trigger LANGUAGE plpgsql AS
             $$ BEGIN IF random() < 0.2 THEN PERFORM pg_sleep(0.02); END IF; RETURN NEW; END $$;
         CREATE TRIGGER app_slow_insert BEFORE INSERT ON g
             FOR EACH ROW EXECUTE FUNCTION public.app_slow_insert();"
    ));
}

/// A region's connection string (as [`Pg::dsn`]) for [`APP_ROLE`].
fn app_dsn(dsn: &str) -> String {
    assert!(dsn.contains("user=postgres "), "{dsn}");
    dsn.replacen("user=postgres ", &format!("user={APP_ROLE} "), 1)
}

/// A session whose commits survive a crash of the server (the test
/// clusters commit asynchronously by default, which the apply side's
/// sessions keep: a crash loses their last commits, as the checker wants;
/// a write the model logged as committed must not be lost the same way).
pub async fn connect(dsn: &str) -> tokio_postgres::Client {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match tokio_postgres::connect(dsn, tokio_postgres::NoTls).await {
            Ok((c, conn)) => {
                tokio::spawn(conn);
                if c.batch_execute("SET synchronous_commit = on")
                    .await
                    .is_err()
                {
                    continue;
                }
                return c;
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("cannot connect: {e}"),
        }
    }
}

/// A fault injected while the writers run.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// kill -9 of a region's sidecar, started again after a moment.
    KillSidecar(usize),
    /// kill -9 of one side of cn (capture or apply, separate processes).
    KillSide(usize),
    /// A region's PostgreSQL stopped at once (commits not yet flushed are
    /// lost: asynchronous commit) and started again.
    CrashDatabase(usize),
    /// A region's broker link cut for a few seconds.
    CutLink(usize),
    /// A region's broker killed and started again (durable storage).
    RestartBroker(usize),
    /// `pgrelay fence` of a region for a moment, then `unfence`: its local
    /// writes are refused meanwhile, incoming changes still apply.
    Fence(usize),
    /// Lifecycle, a lost slot: a region's sidecar stops and its slot is
    /// dropped while its writer goes on, then the README's procedure runs —
    /// `setup` (a new slot), the sidecar started again, `resync`. What the
    /// region wrote while no slot carried it (counters, erasures included)
    /// must reach every region that may hold it.
    LostSlot(usize),
    /// Lifecycle, park and replay: a region refuses some of the other
    /// regions' changes of `g` for a while (a CHECK constraint its own rows
    /// always pass), they are parked in its dead-letter topic, the
    /// constraint is dropped, and `pgrelay dlq replay` applies them (run
    /// again at the end until nothing waits). Last-writer-wins as ever.
    ParkReplay(usize),
    /// Lifecycle, schema changes under a backlog (the README's "Schema
    /// changes"): us's sidecar stops while its writers go on (inserts into
    /// `o` carrying `extra`, TOASTed, and updates leaving it untouched pile
    /// Lifecycle, schema changes under a backlog: us's sidecar stops (a
    /// backlog of `o` inserts carrying the TOASTed `extra` and updates leaving
    /// it untouched piles up), `o.extra` is dropped in every region, `g.secret`
    /// (a `drop` rule's column) is renamed in place in every region
    /// ([`World::rename_ruled_column`]: the running capture sides stop, fail
    /// closed, until the rule names both names), the sidecar starts again
    /// and must publish its backlog without either column's values, nothing
    /// waiting anywhere; then `g.added` is added in one region after
    /// another while every region writes, and the writers write it only
    /// once every region has it. Once per history (drawn again, it is a
    /// [`Fault::KillSidecar`]).
    SchemaChange(usize),
    /// Lifecycle, a region joins with an empty database: cn's writers
    /// pause, everything cn committed is applied elsewhere
    /// (`pgrelay.wait_for`), cn's database is replaced by an empty one, and
    /// the README's new-region procedure runs while us and eu write —
    /// `setup`, start the sidecar, `resync --to cn` from every other
    /// region — then cn writes again. cn must end equal to the model:
    /// everything the others hold, counters with cn's own part, minus what
    /// only cn held (its `p` rows homed cn). Once per history.
    Join(usize),
    /// Lifecycle, a policy change of the partitioned table `q` while every
    /// region writes, by the README's procedures: us's rows may no longer
    /// live in eu (us's sidecar restarts first; once eu applied what us
    /// wrote up to then, eu's), eu's may now live in cn (cn's sidecars
    /// restart before eu's), then `resync --region eu --to cn --table
    /// public.q` and `verify --table public.q --repair`. Every region must
    /// end as the new policy says: cn with every row eu holds, eu with none
    /// of us's. Once per history.
    PolicyChange(usize),
    /// Lifecycle, failover: us's primary (with a synchronous physical
    /// standby, both hosts in the config's DSN with
    /// `target_session_attrs=read-write`, the writers' too) stops at once
    /// while every region writes, and the standby is promoted, by the
    /// README's procedure. On PostgreSQL 17+ the failover slot it carries
    /// lets the running sidecar go on by itself: nothing lost, nothing to
    /// do but reset `synchronized_standby_slots`. Below 17 the standby has
    /// no slot: `setup`, the sidecar started again, `resync` — the lost
    /// slot's model from then on. Once per history.
    Failover(usize),
}

/// The sidecar processes of a region, by role.
fn roles(region: &str) -> &'static [&'static str] {
    if region == "cn" {
        &["capture", "apply"]
    } else {
        &["all"]
    }
}

pub struct World {
    pub pg: BTreeMap<&'static str, Pg>,
    pub brokers: BTreeMap<&'static str, (Broker, Proxy)>,
    pub cfg: ConfigFile,
    /// eu's `setup` config (PL/pgSQL triggers).
    pub plpgsql: ConfigFile,
    /// Regions that parked changes and must replay them.
    pub replay: BTreeSet<&'static str>,
    /// Regions whose slot was lost (`LostSlot`).
    pub lost_slots: BTreeSet<&'static str>,
    /// `g`'s schema (`SchemaChange`).
    pub shape: Arc<Shape>,
    /// Per region: its writers hold this for each transaction; a fault
    /// that must stop them takes it exclusively.
    pub gates: BTreeMap<&'static str, Arc<tokio::sync::RwLock<()>>>,
    /// `Join`: the newest stamp of `p` and `q` cn held when its database
    /// was replaced (what cn wrote of them up to it is gone with it).
    pub joined: Option<i64>,
    /// `PolicyChange` ran: `q`'s new policy holds.
    pub policy_changed: bool,
    /// us's synchronous physical standby, until `Failover` promotes it.
    pub standby: Option<Pg>,
    /// us's primary after `Failover` (stopped; kept until the end).
    pub retired: Option<Pg>,
    /// Durable brokers started again after their storage task panicked.
    pub healed: std::sync::atomic::AtomicUsize,
    /// By region and role: the port of the sidecar's metrics endpoint.
    pub http: BTreeMap<(&'static str, &'static str), u16>,
    /// By region and role: us and eu run both sides in one process, cn runs
    /// them as two.
    pub sidecars: BTreeMap<(&'static str, &'static str), Relay>,
}

impl World {
    /// Three regions set up and running, us's primary given a synchronous
    /// physical standby when `standby` (what `Fault::Failover` promotes):
    /// the config's DSNs for us name both hosts.
    pub fn build(durable: bool, standby: bool) -> World {
        let mut pg = BTreeMap::new();
        let mut brokers = BTreeMap::new();
        for r in REGIONS {
            let p = Pg::start();
            p.psql(SCHEMA);
            pg.insert(r, p);
            brokers.insert(r, Broker::behind_proxy(durable));
        }
        let standby = standby.then(|| us_standby(&pg["us"]));
        let mut text = config(&pg, &brokers);
        if let Some(s) = &standby {
            text = both_hosts(&text, &pg["us"], s);
        }
        let cfg = ConfigFile::new(&text);
        // the regions' triggers differ: eu's are PL/pgSQL, the others' C
        // where the extension is installed (PostgreSQL 15 here); the stamps
        // follow the same rules, so the histories converge the same
        let plpgsql = ConfigFile::new(&text.replacen(
            "[relay.capture]\n",
            "[relay.capture]\nstamp_trigger = \"plpgsql\"\n",
            1,
        ));
        for r in REGIONS {
            let file = if r == "eu" { &plpgsql } else { &cfg };
            let out = relay::ok(&[
                "setup",
                "--config",
                file.path.to_str().unwrap(),
                "--region",
                r,
            ]);
            assert!(
                r != "eu" || out.contains("stamp trigger in PL/pgSQL"),
                "{out}"
            );
        }
        for r in REGIONS {
            create_app_role(&pg[r]);
        }
        let http: BTreeMap<(&'static str, &'static str), u16> = REGIONS
            .iter()
            .flat_map(|r| roles(r).iter().map(move |role| (*r, *role)))
            .map(|key| (key, crate::support::free_port()))
            .collect();
        let sidecars = http
            .iter()
            .map(|(&(r, role), &port)| ((r, role), Relay::spawn_listening(&cfg, r, role, port)))
            .collect();
        World {
            pg,
            brokers,
            cfg,
            plpgsql,
            replay: BTreeSet::new(),
            lost_slots: BTreeSet::new(),
            shape: Arc::new(Shape::default()),
            gates: REGIONS
                .iter()
                .map(|r| (*r, Arc::new(tokio::sync::RwLock::new(()))))
                .collect(),
            joined: None,
            policy_changed: false,
            standby,
            retired: None,
            healed: Default::default(),
            http,
            sidecars,
        }
    }

    /// The fault `inject` runs for a drawn one: a once-per-history
    /// operation drawn again (or where it cannot run) is a sidecar kill.
    pub fn effective(&self, fault: Fault) -> Fault {
        match fault {
            Fault::SchemaChange(i) if self.shape.extra_dropped() => Fault::KillSidecar(i),
            // once, and not where parked changes wait for a replay or a
            // lost slot's limits apply
            Fault::Join(i)
                if self.joined.is_some()
                    || self.replay.contains("cn")
                    || self.lost_slots.contains("cn") =>
            {
                Fault::KillSidecar(i)
            }
            Fault::PolicyChange(i) if self.policy_changed => Fault::KillSidecar(i),
            Fault::Failover(i) if self.standby.is_none() => Fault::KillSidecar(i),
            other => other,
        }
    }

    pub async fn inject(&mut self, fault: Fault) {
        let fault = self.effective(fault);
        match fault {
            Fault::KillSidecar(i) => {
                let r = REGIONS[i % 3];
                for role in roles(r) {
                    self.sidecars.get_mut(&(r, *role)).unwrap().kill9();
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                for role in roles(r) {
                    self.sidecars.insert((r, role), self.spawn(r, role));
                }
            }
            Fault::KillSide(i) => {
                let role = roles("cn")[i % 2];
                self.sidecars.get_mut(&("cn", role)).unwrap().kill9();
                tokio::time::sleep(Duration::from_millis(500)).await;
                self.sidecars.insert(("cn", role), self.spawn("cn", role));
            }
            Fault::CrashDatabase(i) => {
                let pg = &self.pg[REGIONS[i % 3]];
                pg.stop();
                tokio::time::sleep(Duration::from_millis(300)).await;
                pg.restart();
            }
            Fault::CutLink(i) => {
                let proxy = &self.brokers[REGIONS[i % 3]].1;
                proxy.cut();
                tokio::time::sleep(Duration::from_secs(3)).await;
                proxy.restore();
            }
            Fault::RestartBroker(i) => {
                self.brokers[REGIONS[i % 3]].0.restart();
            }
            Fault::Fence(i) => {
                let (cfg, r) = (self.cfg.path.to_str().unwrap(), REGIONS[i % 3]);
                self.ok(&[
                    "fence", "--config", cfg, "--region", r, "--reason", "checker",
                ]);
                tokio::time::sleep(Duration::from_millis(1500)).await;
                self.ok(&["unfence", "--config", cfg, "--region", r]);
            }
            Fault::LostSlot(i) => {
                let r = REGIONS[i % 3];
                for role in roles(r) {
                    self.sidecars.get_mut(&(r, *role)).unwrap().kill9();
                }
                crate::lifecycle::lose_slots(&self.pg[r]).await;
                // the writer goes on while no slot carries its changes
                tokio::time::sleep(Duration::from_millis(1500)).await;
                self.new_slot(r);
            }
            Fault::ParkReplay(i) => {
                let r = REGIONS[i % 3];
                let id = i % 3 + 1;
                let c = connect(&self.pg[r].dsn()).await;
                // other regions' rows of g whose n ends in 1 are refused here
                c.batch_execute(&format!(
                    "SET lock_timeout = '5s'; ALTER TABLE g ADD CONSTRAINT checker_park \
                     CHECK (n % 10 <> 1 OR _pgrelay_hlc IS NULL OR _pgrelay_hlc & 63 = {id}) NOT VALID"
                ))
                .await
                .expect("add the parking constraint");
                // the positive sign: the region's apply parked at least one
                // change the constraint refused (its log says so, sqlstate
                // 23514) before the cause is removed
                let apply = if r == "cn" { "apply" } else { "all" };
                let parked = |w: &World| {
                    w.sidecars[&(r, apply)]
                        .log_text()
                        .lines()
                        .filter(|l| l.contains("record dead-lettered") && l.contains("23514"))
                        .count()
                };
                let before = parked(self);
                let deadline = Instant::now() + Duration::from_secs(60);
                tokio::time::sleep(Duration::from_secs(2)).await;
                while parked(self) == before {
                    // a breaker holding a source's changes here would hold
                    // the ones to park too
                    self.release_frozen(&c, r, None).await;
                    self.heal_brokers();
                    assert!(
                        Instant::now() < deadline,
                        "park_replay: {r} parked nothing in 60 s while the constraint held"
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                eprintln!(
                    "park_replay: {r} parked {} change(s)",
                    parked(self) - before
                );
                c.batch_execute(
                    "SET lock_timeout = '5s'; ALTER TABLE g DROP CONSTRAINT checker_park",
                )
                .await
                .expect("drop the parking constraint");
                // a batch in flight when the constraint went may still park:
                // replay once r applied all the others wrote until now, so
                // nothing parks after the replay read the topic
                for s in REGIONS.into_iter().filter(|s| *s != r) {
                    let lsn: String = connect(&self.pg[s].dsn())
                        .await
                        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
                        .await
                        .expect("the source's WAL position")
                        .get(0);
                    self.wait_passed(s, &lsn, r, &c).await;
                }
                self.ok(&[
                    "dlq",
                    "replay",
                    "--config",
                    self.cfg.path.to_str().unwrap(),
                    "--region",
                    r,
                ]);
                self.replay.insert(r);
            }
            Fault::SchemaChange(_) => {
                // us alone writes `o`: its sidecar stops, and a backlog of
                // inserts carrying `extra` and updates leaving it
                // untouched piles up
                let r = "us";
                for role in roles(r) {
                    self.sidecars.get_mut(&(r, *role)).unwrap().kill9();
                }
                tokio::time::sleep(Duration::from_millis(1500)).await;
                self.shape
                    .extra_dropped
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                for region in REGIONS {
                    alter(&self.pg[region], "ALTER TABLE o DROP COLUMN extra").await;
                }
                self.rename_ruled_column().await;
                for role in roles(r) {
                    self.sidecars.insert((r, role), self.spawn(r, role));
                }
                // a column added in any order while every region writes:
                // records from a region that has it wait where it is missing
                for region in REGIONS.iter().rev() {
                    alter(&self.pg[region], "ALTER TABLE g ADD COLUMN added int").await;
                    tokio::time::sleep(Duration::from_millis(700)).await;
                }
                self.shape
                    .added
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            }
            Fault::Join(_) => self.join().await,
            Fault::PolicyChange(_) => self.change_policy().await,
            Fault::Failover(_) => self.failover().await,
        }
    }
}

impl World {
    /// Replaces `from` by `to` in the config files (the sidecars' and eu's
    /// `setup` one); each must hold `from`.
    fn edit_configs(&self, from: &str, to: &str) {
        for file in [&self.cfg, &self.plpgsql] {
            let text = std::fs::read_to_string(&file.path).expect("read the config");
            let changed = text.replacen(from, to, 1);
            assert_ne!(text, changed, "{from:?} in {}", file.path.display());
            std::fs::write(&file.path, changed).expect("write the config");
        }
    }

    /// A region's sidecar process for `role`, on the config as it is now,
    /// its metrics on its own port.
    fn spawn(&self, r: &'static str, role: &'static str) -> Relay {
        Relay::spawn_listening(&self.cfg, r, role, self.http[&(r, role)])
    }

    /// Changes applied by each path of the apply side (`fast`, `upsert`,
    /// `checked`), summed over every sidecar process running now (each
    /// counts from its own start).
    fn apply_paths(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for port in self.http.values() {
            for line in crate::support::metrics_text(*port).lines() {
                let Some(rest) = line.strip_prefix("pgrelay_apply_upserted_total{") else {
                    continue;
                };
                let Some(path) = rest
                    .split("path=\"")
                    .nth(1)
                    .and_then(|p| p.split('"').next())
                else {
                    continue;
                };
                let n: f64 = line
                    .rsplit(' ')
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0.0);
                *out.entry(path.to_string()).or_insert(0) += n as u64;
            }
        }
        out
    }

    /// The README's rename of a column a rule covers, done the hard way:
    /// renamed in place in every region while us's sidecar is stopped (its
    /// backlog holds changes of `g` under the old name and the new), so
    /// eu's and cn's capture sides stop at their next change of `g` (fail
    /// closed: seen in their logs); then the rule is given the new name with
    /// the old one in `formerly` and every sidecar restarts (us's by the
    /// caller). No record of any topic may carry the column's values
    /// (`residency_of_every_record`), and every region must converge.
    async fn rename_ruled_column(&mut self) {
        for region in REGIONS {
            alter(
                &self.pg[region],
                &format!("ALTER TABLE g RENAME COLUMN {G_SECRET} TO {G_SECRET_RENAMED}"),
            )
            .await;
        }
        self.shape
            .renamed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        for r in ["eu", "cn"] {
            let capture = if r == "cn" { "capture" } else { "all" };
            let stopped = |w: &World| {
                w.sidecars[&(r, capture)]
                    .log_text()
                    .contains(&format!("no column \"{G_SECRET}\", which a column rule"))
            };
            let deadline = Instant::now() + Duration::from_secs(90);
            while !stopped(self) {
                assert!(
                    Instant::now() < deadline,
                    "schema_change: {r}'s capture side published changes of g for 90 s after \
                     {G_SECRET} was renamed under its rule (fail closed expected):\n{}",
                    self.sidecars[&(r, capture)].log_text()
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            eprintln!("schema_change: {r}'s capture side stopped at the renamed rule column");
        }
        self.edit_configs(
            &format!("name = \"{G_SECRET}\"\naction = \"drop\"\n"),
            &format!(
                "name = \"{G_SECRET_RENAMED}\"\nformerly = [\"{G_SECRET}\"]\naction = \"drop\"\n"
            ),
        );
        for r in ["eu", "cn"] {
            for role in roles(r) {
                self.sidecars.insert((r, role), self.spawn(r, role));
            }
        }
    }

    /// A region's connection string as the applications have it: us's
    /// names its primary and its standby while it has one.
    fn hosts(&self, r: &'static str) -> String {
        match &self.standby {
            Some(s) if r == "us" => both_hosts(&self.pg[r].dsn(), &self.pg[r], s),
            _ => self.pg[r].dsn(),
        }
    }

    /// The README's procedure for a region whose slot is gone (lost, or
    /// not carried by a failover): `setup` (a new slot), the sidecar
    /// started again, `resync`. What the region wrote while no slot
    /// carried it must reach every region that may hold it: the lost
    /// slot's model from here on.
    fn new_slot(&mut self, r: &'static str) {
        self.lost_slots.insert(r);
        let setup_cfg = if r == "eu" { &self.plpgsql } else { &self.cfg };
        self.ok(&[
            "setup",
            "--config",
            setup_cfg.path.to_str().unwrap(),
            "--region",
            r,
        ]);
        for role in roles(r) {
            self.sidecars.insert((r, role), self.spawn(r, role));
        }
        resync(
            &[
                "resync",
                "--config",
                self.cfg.path.to_str().unwrap(),
                "--region",
                r,
            ],
            &self.brokers,
        );
    }

    /// `Fault::Failover`: us's primary stops at once while every region
    /// writes, its standby is promoted, and the README's failover
    /// procedure runs.
    async fn failover(&mut self) {
        let r = "us";
        let standby = self.standby.take().expect("us has a standby");
        let carries_slot = crate::support::pg::major() >= 17;
        if carries_slot {
            // the operator's precondition (`check` says the slot is
            // synced): the standby's copy of the failover slot is usable
            let primary = connect(&self.pg[r].dsn()).await;
            let copy = connect(&standby.dsn()).await;
            let deadline = Instant::now() + Duration::from_secs(90);
            loop {
                primary
                    .batch_execute("SELECT pg_log_standby_snapshot()")
                    .await
                    .expect("pg_log_standby_snapshot");
                let synced: i64 = copy
                    .query_one(
                        "SELECT count(*) FROM pg_replication_slots \
                         WHERE slot_name = 'pgrelay_us' AND synced AND NOT temporary",
                        &[],
                    )
                    .await
                    .expect("the standby's slots")
                    .get(0);
                if synced == 1 {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "failover: the standby never had a synced copy of pgrelay_us"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        } else {
            // below 17 the sidecar has nothing to go on with
            for role in roles(r) {
                self.sidecars.get_mut(&(r, *role)).unwrap().kill9();
            }
        }
        // the primary is lost: what its standby did not confirm was never
        // acknowledged to a writer (synchronous replication)
        self.pg[r].stop();
        standby.promote();
        // the new primary has no standby of its own yet: commits must not
        // wait for one, nor the sidecar for a slot it does not have
        let c = connect(&standby.dsn()).await;
        let mut resets = vec!["synchronous_standby_names"];
        if carries_slot {
            resets.push("synchronized_standby_slots");
        }
        for setting in resets {
            c.batch_execute(&format!("ALTER SYSTEM RESET {setting}"))
                .await
                .expect("reset the standby settings on the new primary");
        }
        c.batch_execute("SELECT pg_reload_conf()").await.unwrap();
        let old = self.pg.insert(r, standby).expect("us's primary");
        self.retired = Some(old);
        if !carries_slot {
            self.new_slot(r);
        }
        eprintln!(
            "failover: us's standby promoted ({})",
            if carries_slot {
                "the failover slot carried"
            } else {
                "setup + resync"
            }
        );
    }
}

/// us's synchronous physical standby (`cluster_name` `us_standby`, the
/// name `synchronous_standby_names` gives), syncing failover slots on
/// PostgreSQL 17+. The primary's settings are made after the base backup:
/// the standby does not inherit them.
fn us_standby(primary: &Pg) -> Pg {
    let mut extra = vec![
        ("hot_standby_feedback", "on"),
        ("cluster_name", "'us_standby'"),
    ];
    if crate::support::pg::major() >= 17 {
        extra.push(("sync_replication_slots", "on"));
    }
    let standby = primary.standby("us_standby", &extra);
    if crate::support::pg::major() >= 17 {
        primary.psql("ALTER SYSTEM SET synchronized_standby_slots = 'us_standby'");
    }
    primary.psql("ALTER SYSTEM SET synchronous_standby_names = 'us_standby'");
    primary.psql("SELECT pg_reload_conf()");
    standby
}

/// `config` with us's DSNs naming its primary and its standby, the
/// writable one first found (`target_session_attrs=read-write`).
fn both_hosts(config: &str, primary: &Pg, standby: &Pg) -> String {
    let one = format!("host=127.0.0.1 port={} ", primary.port);
    assert!(config.contains(&one), "{config}");
    config.replace(
        &one,
        &format!(
            "host=127.0.0.1,127.0.0.1 port={},{} target_session_attrs=read-write ",
            primary.port, standby.port
        ),
    )
}

impl World {
    /// Runs a pgrelay command that must succeed; when it does not, says
    /// what became of each broker too.
    fn ok(&self, args: &[&str]) -> String {
        let out = bounded(args, "warn");
        if !out.status.success() {
            panic!(
                "pgrelay {args:?} failed:\nstdout: {}\nstderr: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                brokers_seen(&self.brokers)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A durable test broker whose storage task panicked (see
    /// [`Broker::storage_panic`]) accepts connections and answers nothing:
    /// it is started again on its storage, as a `RestartBroker` fault
    /// would, and counted. An in-memory one cannot be: the history fails.
    fn heal_brokers(&self) {
        for (r, (broker, _)) in &self.brokers {
            if let Some(panic) = broker.storage_panic() {
                assert!(
                    broker.durable(),
                    "{r}'s in-memory test broker panicked: {panic}"
                );
                eprintln!("{r}'s test broker panicked ({panic}): started again on its storage");
                broker.restart();
                self.healed
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }

    /// Releases the breakers frozen at `at` (of `source` only, if given):
    /// an operator running a procedure lets the held changes through,
    /// they were judged before.
    async fn release_frozen(
        &self,
        c: &tokio_postgres::Client,
        at: &'static str,
        source: Option<&str>,
    ) {
        let frozen: Vec<String> = c
            .query(
                "SELECT source_region FROM pgrelay.breakers \
                 WHERE state = 'frozen' AND ($1::text IS NULL OR source_region = $1)",
                &[&source],
            )
            .await
            .map(|rows| rows.iter().map(|row| row.get(0)).collect())
            .unwrap_or_default();
        for source in frozen {
            self.ok(&[
                "breaker",
                "release",
                "--config",
                self.cfg.path.to_str().unwrap(),
                "--region",
                at,
                "--source",
                &source,
            ]);
        }
    }

    /// Waits until every region of `at` applied what `source` committed
    /// before `lsn` (`pgrelay.wait_for`), releasing a breaker that holds
    /// `source`'s changes there (an operator running a procedure lets them
    /// through: they were judged before).
    async fn wait_applied(&self, source: &'static str, lsn: &str, at: &[&'static str]) {
        let r = source;
        for other in at {
            let c = connect(&self.pg[other].dsn()).await;
            let deadline = Instant::now() + Duration::from_secs(90);
            loop {
                // a storm of cn's may hold its changes there: released (an
                // operator rebuilding a region lets its changes through)
                self.release_frozen(&c, other, Some(r)).await;
                self.heal_brokers();
                let done: bool = c
                    .query_one(
                        "SELECT pgrelay.wait_for($2, $1::text::pg_lsn, '5s')",
                        &[&lsn, &r],
                    )
                    .await
                    .map(|row| row.get(0))
                    .unwrap_or(false);
                if done {
                    break;
                }
                if Instant::now() > deadline {
                    let parked = c
                        .query("SELECT topic, kafka_offset, class FROM pgrelay.parked", &[])
                        .await
                        .map(|rows| {
                            rows.iter()
                                .map(|r| {
                                    format!(
                                        "{}@{} {}",
                                        r.get::<_, String>(0),
                                        r.get::<_, i64>(1),
                                        r.get::<_, String>(2)
                                    )
                                })
                                .collect::<Vec<_>>()
                        });
                    let offsets = actual_offsets(&c).await;
                    let logs: String = [r, *other]
                        .iter()
                        .flat_map(|region| roles(region).iter().map(move |role| (*region, *role)))
                        .map(|(region, role)| {
                            let text = self.sidecars[&(region, role)].log_text();
                            let tail: Vec<&str> = text.lines().rev().take(30).collect();
                            format!(
                                "--- sidecar {region} {role}, last lines:\n{}\n",
                                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                            )
                        })
                        .collect();
                    panic!(
                        "{other} did not apply what {r} wrote up to {lsn} within 90 s; parked there: \
                         {parked:?}; offsets: {offsets:?}\n{logs}{}",
                        brokers_seen(&self.brokers)
                    );
                }
            }
        }
    }

    /// Waits until every partition of `source`'s topic at `at` stored a
    /// position at or past `lsn`: applied or parked, unlike `wait_for`,
    /// which waits for parked changes to be replayed too.
    async fn wait_passed(
        &self,
        source: &'static str,
        lsn: &str,
        at: &'static str,
        c: &tokio_postgres::Client,
    ) {
        let topic = format!("pgrelay.{source}.{at}");
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            self.release_frozen(c, at, Some(source)).await;
            self.heal_brokers();
            let reached: i64 = c
                .query_one(
                    "SELECT count(*) FROM pgrelay.offsets \
                     WHERE topic = $1 AND source_lsn >= $2::text::pg_lsn",
                    &[&topic, &lsn],
                )
                .await
                .expect("read pgrelay.offsets")
                .get(0);
            if reached >= 3 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{at} did not pass what {source} wrote up to {lsn} within 90 s: offsets {:?}",
                actual_offsets(c).await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops a region's sidecar processes (SIGTERM, as an operator does)
    /// and starts them again: they read the config anew.
    fn restart(&mut self, region: &'static str) {
        for role in roles(region) {
            let relay = self.sidecars.get_mut(&(region, *role)).unwrap();
            if relay.terminate(Duration::from_secs(30)).is_none() {
                relay.kill9();
            }
            self.sidecars
                .insert((region, role), self.spawn(region, role));
        }
    }

    /// [`Fault::PolicyChange`], by the README's procedures.
    async fn change_policy(&mut self) {
        self.edit_configs(Q_POLICY_BEFORE, Q_POLICY_AFTER);
        let cfg = self.cfg.path.to_str().unwrap().to_string();
        // a home loses a destination: the home first, so it stops sending
        // its rows there; the destination once it applied what the home
        // wrote until then
        self.restart("us");
        let lsn: String = connect(&self.pg["us"].dsn())
            .await
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .expect("us's WAL position")
            .get(0);
        self.wait_applied("us", &lsn, &["eu"]).await;
        // a home gains a destination: the destination first
        self.restart("cn");
        self.restart("eu");
        self.policy_changed = true;
        resync(
            &[
                "resync", "--config", &cfg, "--region", "eu", "--to", "cn", "--table", "public.q",
            ],
            &self.brokers,
        );
        // what eu may no longer hold, removed there (it may report rows
        // still on their way to cn as well, and send them again)
        let repaired = relay::cmd(&[
            "verify", "--config", &cfg, "--table", "public.q", "--repair",
        ]);
        assert_ne!(
            repaired.status.code(),
            Some(2),
            "verify --repair failed: {}{}",
            String::from_utf8_lossy(&repaired.stdout),
            String::from_utf8_lossy(&repaired.stderr)
        );
    }

    /// [`Fault::Join`].
    async fn join(&mut self) {
        let r = "cn";
        let gate = self.gates[r].clone();
        let Ok(paused) = tokio::time::timeout(Duration::from_secs(120), gate.write()).await else {
            let sessions: Vec<String> = connect(&self.pg[r].dsn())
                .await
                .query(
                    "SELECT format('%s %s %s/%s since %s: %s', pid, usename, wait_event_type, \
                     wait_event, xact_start, left(query, 160)) FROM pg_stat_activity \
                     WHERE datname = current_database() AND pid <> pg_backend_pid()",
                    &[],
                )
                .await
                .map(|rows| rows.iter().map(|row| row.get(0)).collect())
                .unwrap_or_default();
            panic!(
                "join: cn's writer did not end its transaction in 120 s; cn's sessions:\n{}",
                sessions.join("\n")
            );
        };
        eprintln!("join: cn's writer paused");
        let cn = connect(&self.pg[r].dsn()).await;
        let lsn: String = cn
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .expect("cn's WAL position")
            .get(0);
        // the positive sign that the others hold all cn wrote: rows,
        // deletes and cn's part of every counter
        let others: Vec<&'static str> = REGIONS.into_iter().filter(|o| *o != r).collect();
        self.wait_applied(r, &lsn, &others).await;
        let newest: i64 = cn
            .query_one(
                "SELECT greatest((SELECT max(_pgrelay_hlc) FROM p), (SELECT max(_pgrelay_hlc) FROM q), \
                 (SELECT max(hlc) FROM pgrelay.tombstones \
                  WHERE table_name IN ('public.p', 'public.q')), 0)",
                &[],
            )
            .await
            .expect("cn's newest stamp of p")
            .get(0);
        drop(cn);
        // a new, empty database in cn's place
        for role in roles(r) {
            self.sidecars.get_mut(&(r, *role)).unwrap().kill9();
        }
        crate::lifecycle::lose_slots(&self.pg[r]).await;
        let admin = connect(
            &self.pg[r]
                .dsn()
                .replace("dbname=postgres", "dbname=template1"),
        )
        .await;
        for sql in [
            "SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin",
            "DROP DATABASE postgres WITH (FORCE)",
            "CREATE DATABASE postgres",
        ] {
            admin
                .batch_execute(sql)
                .await
                .unwrap_or_else(|e| panic!("replace cn's database: {sql}: {e:?}"));
        }
        // the tables as the other regions have them now
        self.pg[r].psql(SCHEMA);
        if self.shape.extra_dropped() {
            self.pg[r].psql("ALTER TABLE o DROP COLUMN extra");
        }
        if self.shape.added() {
            self.pg[r].psql("ALTER TABLE g ADD COLUMN added int");
        }
        if self.shape.renamed() {
            self.pg[r].psql(&format!(
                "ALTER TABLE g RENAME COLUMN {G_SECRET} TO {G_SECRET_RENAMED}"
            ));
        }
        self.joined = Some(newest);
        // the procedure for a region rebuilt from an empty database: its
        // apply side starts at the topics' ends (the resyncs bring the rows)
        let out = self.ok(&[
            "setup",
            "--config",
            self.cfg.path.to_str().unwrap(),
            "--region",
            r,
            "--start-at-end",
        ]);
        assert!(
            out.contains("apply starts pgrelay.us.cn at its end"),
            "{out}"
        );
        create_app_objects(&self.pg[r]);
        for role in roles(r) {
            self.sidecars.insert((r, role), self.spawn(r, role));
        }
        eprintln!("join: cn's database replaced and set up, its sidecars started");
        let us = connect(&self.pg["us"].dsn()).await;
        let m_keys: Vec<i32> = us
            .query("SELECT id FROM m", &[])
            .await
            .expect("us's counter rows")
            .iter()
            .map(|row| row.get(0))
            .collect();
        for source in REGIONS.iter().filter(|o| **o != r) {
            resync(
                &[
                    "resync",
                    "--config",
                    self.cfg.path.to_str().unwrap(),
                    "--region",
                    source,
                    "--to",
                    r,
                ],
                &self.brokers,
            );
        }
        eprintln!("join: us and eu resynced to cn");
        // cn writes again only once its part of each counter is back
        // (a region's part is kept by its stamp: an increment taken from
        // zero before the resync arrived would outrank it)
        let cn = connect(&self.pg[r].dsn()).await;
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            // a storm written since the topics' ends may trip its
            // breakers: released (the operator rebuilding a region lets
            // the others' changes through)
            let frozen: Vec<String> = cn
                .query(
                    "SELECT source_region FROM pgrelay.breakers WHERE state = 'frozen'",
                    &[],
                )
                .await
                .map(|rows| rows.iter().map(|row| row.get(0)).collect())
                .unwrap_or_default();
            for source in &frozen {
                self.ok(&[
                    "breaker",
                    "release",
                    "--config",
                    self.cfg.path.to_str().unwrap(),
                    "--region",
                    r,
                    "--source",
                    source,
                ]);
            }
            let held: i64 = cn
                .query_one("SELECT count(*) FROM m WHERE id = ANY($1)", &[&m_keys])
                .await
                .map(|row| row.get(0))
                .unwrap_or(0);
            if held as usize >= m_keys.len() {
                break;
            }
            if Instant::now() > deadline {
                let parked = cn
                    .query(
                        "SELECT class, count(*) FROM pgrelay.parked GROUP BY class",
                        &[],
                    )
                    .await
                    .map(|rows| {
                        rows.iter()
                            .map(|r| format!("{} {}", r.get::<_, String>(0), r.get::<_, i64>(1)))
                            .collect::<Vec<_>>()
                    });
                let breakers = cn
                    .query("SELECT source_region, state FROM pgrelay.breakers", &[])
                    .await
                    .map(|rows| {
                        rows.iter()
                            .map(|r| format!("{} {}", r.get::<_, String>(0), r.get::<_, String>(1)))
                            .collect::<Vec<_>>()
                    });
                let log = self.sidecars[&(r, "apply")].log_text();
                let warnings: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                    .take(20)
                    .collect();
                panic!(
                    "cn holds {held} of us's {} counter rows 300 s after the resync; parked there: \
                     {parked:?}; breakers: {breakers:?}; offsets: {:?}; cn apply warnings:\n{}",
                    m_keys.len(),
                    actual_offsets(&cn).await,
                    warnings.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        drop(paused);
    }
}

/// What became of each region's broker, for a failure report.
fn brokers_seen(brokers: &BTreeMap<&'static str, (Broker, Proxy)>) -> String {
    brokers
        .iter()
        .map(|(r, (b, _))| format!("{r}: {}", b.diagnose()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs a pgrelay command with `PGRELAY_LOG=log`, killed after 240 s (a
/// command that hangs fails the history with its output, instead of
/// stalling it until the test's own timeout).
fn bounded(args: &[&str], log: &str) -> std::process::Output {
    let out = std::process::Command::new("timeout")
        .args(["--kill-after=5", "240"])
        .arg(relay::bin())
        .args(args)
        .env("PGRELAY_LOG", log)
        .output()
        .expect("run pgrelay under timeout");
    if out.status.code() == Some(124) {
        eprintln!("pgrelay {args:?} timed out after 240 s");
    }
    out
}

/// `pgrelay resync` as an operator runs it (one reading session: the
/// writers' truncates would stop a parallel read, see
/// `resync::PARALLEL_LOCK_TIMEOUT`): safe to run again, so run again (at
/// most three times) when it stopped on an error — a Kafka metadata
/// request that timed out on a loaded machine has been seen.
fn resync(args: &[&str], brokers: &BTreeMap<&'static str, (Broker, Proxy)>) {
    for attempt in 1..=3 {
        let out = bounded(args, "warn");
        if out.status.success() {
            return;
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        if attempt == 3 {
            panic!(
                "pgrelay {args:?} failed three times: {stderr}\n{}",
                brokers_seen(brokers)
            );
        }
        eprintln!("pgrelay {args:?} failed (attempt {attempt}), running it again: {stderr}");
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// Runs one DDL statement as the schema's owner while the writers go on
/// (waiting for their locks at most a second each time, as an operator
/// would: a long wait would queue every writer behind it).
async fn alter(pg: &Pg, ddl: &str) {
    let c = connect(&pg.dsn()).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match c
            .batch_execute(&format!("SET lock_timeout = '1s'; {ddl}"))
            .await
        {
            Ok(()) => return,
            Err(e) if Instant::now() < deadline && transient_ddl(&e) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{ddl}: {e:?}"),
        }
    }
}

/// A lock wait that timed out, a deadlock, a server restarting.
fn transient_ddl(e: &tokio_postgres::Error) -> bool {
    e.code()
        .is_some_and(|c| c.code() == "55P03" || c.code() == "40P01")
        || transient(e)
}

/// One checked history: its size, for the soak's summary.
#[derive(Debug, Default, Clone)]
pub struct Checked {
    /// Faults injected, by kind (`KillSidecar`, `Join`, …).
    pub kinds: BTreeMap<String, usize>,
    pub ops: usize,
    pub writes: usize,
    pub faults: usize,
    pub records: usize,
    /// Breaker trips released or discarded.
    pub trips: usize,
    /// Test brokers started again after their storage task panicked.
    pub healed: usize,
    /// Changes the apply sides applied without the tombstone recheck (the
    /// `fast` and `upsert` paths; counted by the processes running at the
    /// end).
    pub fast: u64,
}

/// Runs one seeded history with faults and checks it. Panics with a
/// report on any divergence from the model.
pub async fn check(seed: u64, ops_per_region: usize) -> Checked {
    // in-memory brokers unless asked: the durable (libsql) build of the
    // test broker panics in its idempotent-produce check after some client
    // retries and then answers nothing (see `Broker::storage_panic`; such a
    // broker is started again when durable). With
    // PGRELAY_CHECK_DURABLE=1 the brokers keep their log across restarts
    // and `restart_broker` is drawn too
    let durable = std::env::var("PGRELAY_CHECK_DURABLE").is_ok_and(|v| v == "1")
        && durable_tansu_bin().is_some();
    let mut w = World::build(durable, true);
    let history = Arc::new(Mutex::new(History::default()));
    let mut rng = Rng::new(seed);
    let keys = 12 + rng.below(12) as i32;
    let mut writers = Vec::new();
    let faults_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for (i, r) in REGIONS.iter().enumerate() {
        let writer = Writer {
            region: r,
            dsn: app_dsn(&w.hosts(r)),
            rng: Rng::new(seed.wrapping_mul(31).wrapping_add(i as u64)),
            keys,
            truncates: rng.chance(50),
            pace_ms: 40,
            shape: w.shape.clone(),
            gate: w.gates[r].clone(),
            faults_done: faults_done.clone(),
        };
        writers.push(tokio::spawn(writer.run(ops_per_region, history.clone())));
        // a second session in the region, on the same keys: local writes
        // of one key race (an insert with a slow BEFORE trigger against a
        // delete of its key, see create_app_role)
        let racer = Writer {
            region: r,
            dsn: app_dsn(&w.hosts(r)),
            rng: Rng::new(seed.wrapping_mul(97).wrapping_add(i as u64 + 7)),
            keys,
            truncates: false,
            pace_ms: 40,
            shape: w.shape.clone(),
            gate: w.gates[r].clone(),
            faults_done: faults_done.clone(),
        };
        writers.push(tokio::spawn(racer.run(ops_per_region / 2, history.clone())));
    }
    // faults while the writers run: three of the six lifecycle
    // procedures in every history (which three follows the seed: seeds 1
    // and 4, CI's, cover all six; seed 1, PostgreSQL 18's, has the
    // failover), the rest drawn from every kind
    let mut faults = Vec::new();
    let n_faults = 4 + rng.below(2);
    let lifecycle = [
        LOST_SLOT,
        PARK_REPLAY,
        FAILOVER,
        SCHEMA_CHANGE,
        JOIN,
        POLICY_CHANGE,
    ];
    for f in 0..n_faults {
        let region = rng.below(3) as usize;
        let kinds = if durable {
            KINDS.len()
        } else {
            KINDS.len() - 1
        };
        let drawn = rng.below(kinds as u64) as usize;
        let drawn = match forced_faults() {
            Some(only) => only[drawn % only.len()],
            None if f < 3 => lifecycle[(seed as usize + f as usize) % lifecycle.len()],
            None => drawn,
        };
        let fault = match KINDS[drawn] {
            "kill_sidecar" => Fault::KillSidecar(region),
            "crash_database" => Fault::CrashDatabase(region),
            "cut_link" => Fault::CutLink(region),
            "kill_side" => Fault::KillSide(region),
            "fence" => Fault::Fence(region),
            "lost_slot" => Fault::LostSlot(region),
            "park_replay" => Fault::ParkReplay(region),
            "schema_change" => Fault::SchemaChange(region),
            "join" => Fault::Join(region),
            "policy_change" => Fault::PolicyChange(region),
            "failover" => Fault::Failover(region),
            _ => Fault::RestartBroker(region),
        };
        tokio::time::sleep(Duration::from_millis(300 + rng.below(1500))).await;
        let fault = w.effective(fault);
        eprintln!("seed {seed}: fault {fault:?}");
        w.heal_brokers();
        w.inject(fault).await;
        w.heal_brokers();
        faults.push(fault);
    }
    faults_done.store(true, std::sync::atomic::Ordering::SeqCst);
    for t in writers {
        t.await.expect("writer");
    }
    let mut history = Arc::try_unwrap(history)
        .ok()
        .expect("writers done")
        .into_inner()
        .unwrap();
    // wait for every region to hold what the model says (the positive
    // sign that every change was processed), then report any difference
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut clients = BTreeMap::new();
    for r in REGIONS {
        clients.insert(r, connect(&w.pg[r].dsn()).await);
    }
    let mut last_diff;
    let mut missing: Vec<Missing>;
    let mut resolved = Vec::new();
    loop {
        // storms trip breakers: release or discard each frozen pair
        // (a discard parks the storm within a second or so: read again
        // until the regions match)
        resolve_breakers(&w, &clients, &mut rng, &mut resolved).await;
        w.heal_brokers();
        // changes parked while a region refused them: replayed (again,
        // for those parked after the last replay; a replay is idempotent)
        for r in &w.replay {
            w.ok(&[
                "dlq",
                "replay",
                "--config",
                w.cfg.path.to_str().unwrap(),
                "--region",
                r,
            ]);
        }
        if resolved.iter().any(|(_, _, action)| *action == "discard") {
            history.discarded = discarded(&w, &resolved);
        }
        if !w.lost_slots.is_empty() {
            history.delivered_p = Some(delivered_p(&w));
            history.lost_slots = w.lost_slots.clone();
        }
        history.joined = w.joined;
        history.policy_changed = w.policy_changed;
        let model = Model(&history);
        last_diff = String::new();
        missing = Vec::new();
        for table in TABLES {
            for r in REGIONS {
                let c = &clients[r];
                if c.is_closed() {
                    clients.insert(r, connect(&w.pg[r].dsn()).await);
                }
                let want = model.expected(table, r);
                let got = actual(&clients[r], table).await;
                if want != got {
                    describe_diff(&mut last_diff, &mut missing, &model, table, r, &want, &got);
                }
            }
        }
        if last_diff.is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if !last_diff.is_empty() {
        eprintln!("breakers resolved: {resolved:?}");
        for ((r, role), sidecar) in &w.sidecars {
            let log = sidecar.log_text();
            let lines: Vec<&str> = log.lines().collect();
            let warnings: Vec<&str> = lines
                .iter()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .take(30)
                .copied()
                .collect();
            let last = &lines[lines.len().saturating_sub(15)..];
            eprintln!(
                "--- {r} {role}: first warnings:\n{}\n--- {r} {role}: last lines:\n{}",
                warnings.join("\n"),
                last.join("\n")
            );
        }
        // where the missing versions got to: in the destination's topics
        // (then the apply side lost them) or not (capture or the broker did)
        for (table, region, stamp) in &missing {
            let mut seen = Vec::new();
            for src in REGIONS.iter().filter(|s| *s != region) {
                let topic = format!("pgrelay.{src}.{region}");
                for rec in read_all(
                    &w.brokers[region].0.brokers(),
                    &topic,
                    Duration::from_secs(1),
                ) {
                    if rec.value["source"]["table"] == *table
                        && rec.value["pgrelay"]["hlc"].as_i64() == Some(*stamp)
                    {
                        seen.push(format!("{topic}[{}]@{}", rec.partition, rec.offset));
                    }
                }
            }
            let stored = actual_offsets(&clients[region]).await;
            eprintln!(
                "missing {table} stamp {stamp} in {region}: records {seen:?}; stored offsets there {stored:?}"
            );
        }
        panic!(
            "seed {seed}: regions differ from last-writer-wins after {} ops, {} writes, faults {faults:?} \
             (rerun: PGRELAY_CHECK_SEEDS={seed} cargo nextest run --test it checker --no-capture)\n{last_diff}",
            history.ops,
            history.writes.len()
        );
    }
    for r in REGIONS {
        if clients[r].is_closed() {
            clients.insert(r, connect(&w.pg[r].dsn()).await);
        }
    }
    let conflicts = conflict_log_matches(&history, &clients, seed).await;
    eprintln!("seed {seed}: {conflicts} conflict log entries, each a write of the history");
    // read again if a broker's storage panicked while it was read: a
    // broker that answers nothing would leave records unread
    let records = loop {
        w.heal_brokers();
        let records = residency_of_every_record(&w, seed);
        if w.brokers.values().all(|(b, _)| b.storage_panic().is_none()) {
            break records;
        }
    };
    dr_vault_holds_the_newest_copies(&w, &history, &clients, seed).await;
    verify_agrees_then_finds_a_planted_difference(&w, &history, &resolved, seed).await;
    eprintln!("seed {seed}: breaker trips resolved: {resolved:?}");
    if history.policy_changed {
        // the model held it already; said here so a reader sees the move
        let count = |r: &'static str, home: &'static str| {
            let c = &clients[r];
            async move {
                c.query_one("SELECT count(*) FROM q WHERE home = $1", &[&home])
                    .await
                    .map(|row| row.get::<_, i64>(0))
                    .unwrap_or(-1)
            }
        };
        eprintln!(
            "seed {seed}: after the policy change cn holds {} of eu's {} rows of q, eu {} of us's {}",
            count("cn", "eu").await,
            count("eu", "eu").await,
            count("eu", "us").await,
            count("us", "us").await
        );
    }
    eprintln!(
        "seed {seed}: {} transaction(s) refused by a fence and retried after it",
        history.fenced
    );
    eprintln!(
        "seed {seed}: commits whose answer was lost: {} committed (kept), {} not (left out)",
        history.in_doubt_committed, history.in_doubt_lost
    );
    // the apply side's fast paths — an upsert with no tombstone recheck
    // (`upsert`: changes newer than every delete of their table) and new
    // keys written by a plain INSERT (`fast`) — must have been taken, and
    // the model above found nothing they got wrong (`checked`: rechecked
    // against tombstones)
    let paths = w.apply_paths();
    eprintln!(
        "seed {seed}: changes applied by path, summed over the sidecars since their last start: \
         {paths:?}"
    );
    let unchecked =
        paths.get("fast").copied().unwrap_or(0) + paths.get("upsert").copied().unwrap_or(0);
    assert!(
        unchecked > 0,
        "seed {seed}: no sidecar applied a change without the tombstone recheck: {paths:?}"
    );
    // owned writes outside the owner were refused, and none of them exists
    let mut kinds = BTreeMap::new();
    for fault in &faults {
        let kind = format!("{fault:?}");
        let kind = kind.split('(').next().unwrap_or_default().to_string();
        *kinds.entry(kind).or_insert(0) += 1;
    }
    Checked {
        kinds,
        fast: unchecked,
        ops: history.ops,
        writes: history.writes.len(),
        faults: faults.len(),
        records,
        trips: resolved.len(),
        healed: w.healed.load(std::sync::atomic::Ordering::SeqCst),
    }
}

/// Releases or discards (drawn from `rng`) every pair a breaker holds.
async fn resolve_breakers(
    w: &World,
    clients: &BTreeMap<&'static str, tokio_postgres::Client>,
    rng: &mut Rng,
    resolved: &mut Vec<(&'static str, String, &'static str)>,
) {
    for r in REGIONS {
        let Ok(rows) = clients[r]
            .query(
                "SELECT source_region FROM pgrelay.breakers WHERE state = 'frozen'",
                &[],
            )
            .await
        else {
            continue;
        };
        for row in rows {
            let source: String = row.get(0);
            let action = if rng.chance(50) { "release" } else { "discard" };
            w.ok(&[
                "breaker",
                action,
                "--config",
                w.cfg.path.to_str().unwrap(),
                "--region",
                r,
                "--source",
                &source,
            ]);
            resolved.push((r, source, action));
        }
    }
}

/// Every record of `region`'s dead-letter topic up to its read markers;
/// when its broker cannot be reached, says what became of the broker.
fn read_dlq(w: &World, region: &str) -> Vec<crate::support::kafka::Rec> {
    let (broker, _) = &w.brokers[region];
    let topic = format!("pgrelay.dlq.{region}");
    let addr = broker.brokers();
    // a broker whose storage panicked meanwhile is started again and read
    // again (the panic may reach its log a moment after the read failed)
    for _ in 0..3 {
        if let Ok(recs) = std::panic::catch_unwind(|| read_to_markers(&addr, &topic)) {
            if broker.storage_panic().is_none() {
                return recs;
            }
        }
        std::thread::sleep(Duration::from_secs(1));
        if broker.storage_panic().is_none() {
            break;
        }
        w.heal_brokers();
    }
    panic!("cannot read {topic}: {}", broker.diagnose())
}

/// Per change (table, key, stamp): the (topic, partition, offset) of its
/// copies.
type Positions = BTreeMap<(String, i32, i64), BTreeSet<(String, i32, i64)>>;

/// What the destinations that discarded a storm never applied:
/// (destination, table, key, stamp). A change is discarded there when every
/// copy of it its topic delivered was parked with class
/// `breaker_discarded` (read back from the destination's dead-letter topic,
/// by original position). A copy not parked was applied: the first deletes
/// of a storm pass before the one that trips the breaker, and a copy
/// published again after a restart of its source may be parked while the
/// first one had applied.
fn discarded(
    w: &World,
    resolved: &[(&'static str, String, &'static str)],
) -> BTreeSet<(&'static str, String, i32, i64)> {
    // (table, key, stamp) of a record's change
    let change = |v: &serde_json::Value| -> Option<(String, i32, i64)> {
        Some((
            v["source"]["table"].as_str()?.to_string(),
            v["before"]["id"].as_str().and_then(|k| k.parse().ok())?,
            v["pgrelay"]["hlc"].as_i64()?,
        ))
    };
    let mut out = BTreeSet::new();
    for r in REGIONS {
        if !resolved.iter().any(|(d, _, a)| *d == r && *a == "discard") {
            continue;
        }
        // parked copies, by change: their original (topic, partition, offset)
        let mut parked: Positions = BTreeMap::new();
        for rec in read_dlq(w, r) {
            if rec.headers.get("pgrelay.dlq.class").map(String::as_str) != Some("breaker_discarded")
            {
                continue;
            }
            let (Some(c), Some(topic), Some(partition), Some(offset)) = (
                change(&rec.value),
                rec.headers.get("pgrelay.dlq.topic"),
                rec.headers
                    .get("pgrelay.dlq.partition")
                    .and_then(|p| p.parse().ok()),
                rec.headers
                    .get("pgrelay.dlq.offset")
                    .and_then(|o| o.parse().ok()),
            ) else {
                continue;
            };
            parked
                .entry(c)
                .or_default()
                .insert((topic.clone(), partition, offset));
        }
        // every copy each topic into r delivered
        let mut copies: Positions = BTreeMap::new();
        for src in REGIONS.iter().filter(|s| **s != r) {
            let topic = format!("pgrelay.{src}.{r}");
            for rec in read_all(&w.brokers[r].0.brokers(), &topic, Duration::from_secs(2)) {
                if let Some(c) = change(&rec.value) {
                    if parked.contains_key(&c) {
                        copies.entry(c).or_default().insert((
                            topic.clone(),
                            rec.partition,
                            rec.offset,
                        ));
                    }
                }
            }
        }
        for (c, at) in parked {
            if copies.get(&c).is_none_or(|all| all.is_subset(&at)) {
                out.insert((r, c.0, c.1, c.2));
            }
        }
    }
    out
}

/// Checks every region's conflict log against the history: each entry's
/// losing version is a write the writers made (same table, key, stamp and
/// region), which lost to a newer stamp of another region; no entry twice.
/// Returns how many entries there are.
async fn conflict_log_matches(
    history: &History,
    clients: &BTreeMap<&'static str, tokio_postgres::Client>,
    seed: u64,
) -> usize {
    let writes: BTreeSet<(&str, String, i64, &str)> = history
        .writes
        .iter()
        .map(|w| (w.table, w.key.to_string(), w.version.stamp, w.region))
        .collect();
    let mut total = 0;
    for (region, c) in clients {
        let rows = c
            .query(
                "SELECT table_name, pk ->> 'id', op, winner_hlc, winner_origin, loser_hlc, loser_origin \
                 FROM pgrelay.conflicts",
                &[],
            )
            .await
            .expect("reading pgrelay.conflicts");
        let mut seen = BTreeSet::new();
        for r in &rows {
            let table: String = r.get(0);
            let key: Option<String> = r.get(1);
            let op: String = r.get(2);
            let (winner, winner_origin): (i64, Option<String>) = (r.get(3), r.get(4));
            let (loser, loser_origin): (i64, Option<String>) = (r.get(5), r.get(6));
            let short = table.trim_start_matches("public.");
            let key = key.unwrap_or_default();
            let entry = format!(
                "seed {seed}: {region} logged {table} id {key} {op} {loser}@{loser_origin:?} \
                 lost to {winner}@{winner_origin:?}"
            );
            let loser_origin = loser_origin.unwrap_or_default();
            assert!(
                writes.contains(&(short, key.clone(), loser, loser_origin.as_str())),
                "{entry}: no such write in the history"
            );
            assert!(winner > loser, "{entry}: the winner is not newer");
            assert_ne!(
                winner_origin.as_deref(),
                Some(loser_origin.as_str()),
                "{entry}: a region's own later write is not a conflict"
            );
            assert_ne!(
                loser_origin, *region,
                "{entry}: a local write never arrives"
            );
            assert!(seen.insert((table, key, loser)), "{entry}: logged twice");
        }
        total += rows.len();
    }
    total
}

/// A version a region should hold and does not: (table, region, stamp).
type Missing = (&'static str, &'static str, i64);

async fn actual_offsets(c: &tokio_postgres::Client) -> Vec<(String, i32, i64)> {
    c.query(
        "SELECT topic, kafka_partition, next_offset FROM pgrelay.offsets ORDER BY 1, 2",
        &[],
    )
    .await
    .map(|rows| {
        rows.iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    })
    .unwrap_or_default()
}

fn describe_diff(
    out: &mut String,
    missing: &mut Vec<Missing>,
    model: &Model<'_>,
    table: &'static str,
    region: &'static str,
    want: &BTreeMap<i32, Version>,
    got: &BTreeMap<i32, Version>,
) {
    let keys: BTreeSet<i32> = want.keys().chain(got.keys()).copied().collect();
    let mut shown = 0;
    for k in keys {
        if want.get(&k) == got.get(&k) {
            continue;
        }
        if let Some(v) = want.get(&k) {
            missing.push((table, region, v.stamp));
        }
        shown += 1;
        if shown > 5 {
            let _ = writeln!(out, "  (more keys differ in {table}@{region})");
            break;
        }
        let discarded: Vec<i64> = model
            .0
            .discarded
            .iter()
            .filter(|(r, t, key, _)| *r == region && t == table && *key == k)
            .map(|(_, _, _, stamp)| *stamp)
            .collect();
        let _ = writeln!(
            out,
            "{table} key {k} in {region}:\n  expected {:?}\n  found    {:?}\n  \
             discarded there (parked by a breaker discard): {discarded:?}\n  writes:\n{}",
            want.get(&k),
            got.get(&k),
            model.trail(table, k)
        );
    }
}

/// Reads every record of every topic; a `p` row (before or after image)
/// may only travel to a region its home allows. Returns the records read.
/// eu's vault holds one sealed copy per key of `o` that us ever wrote, at
/// that key's newest stamp (a delete's copy carries the tombstone's stamp),
/// and every copy on the DR topic is sealed: nothing but the key id, nonce,
/// stamp and ciphertext in clear, none of `o`'s values.
async fn dr_vault_holds_the_newest_copies(
    w: &World,
    history: &History,
    clients: &BTreeMap<&'static str, tokio_postgres::Client>,
    seed: u64,
) {
    let mut newest: BTreeMap<i32, i64> = BTreeMap::new();
    for wr in history.writes.iter().filter(|wr| wr.table == "o") {
        let e = newest.entry(wr.key).or_insert(wr.version.stamp);
        *e = (*e).max(wr.version.stamp);
    }
    let want: Vec<i64> = {
        let mut v: Vec<i64> = newest.values().copied().collect();
        v.sort();
        v
    };
    // a lost slot's limit (README, "A lost slot"): resync does not seal DR
    // copies, so a row us changed while no slot carried it has its copy
    // only from its next change on; what the vault holds must still be
    // copies of us's own writes
    if history.lost_slots.contains("us") {
        let written: BTreeSet<i64> = history
            .writes
            .iter()
            .filter(|wr| wr.table == "o" && wr.region == "us")
            .map(|wr| wr.version.stamp)
            .collect();
        let got: Vec<i64> = clients["eu"]
            .query("SELECT stamp FROM pgrelay_dr.vault WHERE home = 'us'", &[])
            .await
            .expect("reading eu's vault")
            .iter()
            .map(|r| r.get(0))
            .collect();
        for stamp in &got {
            assert!(
                written.contains(stamp),
                "seed {seed}: eu's vault holds a copy stamped {stamp} that us never wrote"
            );
        }
        eprintln!(
            "seed {seed}: us lost its slot: eu's vault holds {} copies of us's writes ({} keys written)",
            got.len(),
            want.len()
        );
        return;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let got = loop {
        let got: Vec<i64> = clients["eu"]
            .query(
                "SELECT stamp FROM pgrelay_dr.vault WHERE home = 'us' ORDER BY stamp",
                &[],
            )
            .await
            .expect("reading eu's vault")
            .iter()
            .map(|r| r.get(0))
            .collect();
        if got == want || std::time::Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(
        got, want,
        "seed {seed}: eu's vault stamps for us's `o` (left) differ from the newest stamp of each key \
         us wrote (right)"
    );
    let sealed = crate::support::kafka::read_raw(
        &w.brokers["eu"].0.brokers(),
        "pgrelay.dr.us.eu",
        Duration::from_secs(2),
    );
    assert!(
        sealed.len() >= newest.len(),
        "seed {seed}: {} sealed copies on pgrelay.dr.us.eu for {} keys",
        sealed.len(),
        newest.len()
    );
    for (i, raw) in sealed.iter().enumerate() {
        // `read_raw` gives key, value and headers in one buffer: the value
        // is the one JSON object in it
        let start = raw
            .windows(2)
            .position(|w| w == b"{\"")
            .unwrap_or_else(|| panic!("seed {seed}: DR record {i} has no JSON value"));
        let v: serde_json::Value = serde_json::Deserializer::from_slice(&raw[start..])
            .into_iter()
            .next()
            .and_then(Result::ok)
            .unwrap_or_else(|| panic!("seed {seed}: DR record {i}'s value is not JSON"));
        let fields: Vec<&String> = v.as_object().expect("a JSON object").keys().collect();
        for f in &fields {
            assert!(
                ["ciphertext", "key_id", "nonce", "stamp", "table_hash"].contains(&f.as_str()),
                "seed {seed}: DR record {i} carries {f} in clear: {fields:?}"
            );
        }
    }
    eprintln!(
        "seed {seed}: eu's vault holds the newest sealed copy of {} `o` keys ({} records on the DR topic)",
        want.len(),
        sealed.len()
    );
}

/// Keys of `p` that some region keeps an older row of than the key's
/// newest write: the newer write's homes (before and after) never routed it
/// there. It happens where regions write one key under homes that route
/// differently without holding each other's versions (the README's limit,
/// "A key written under different homes"); `pgrelay verify` reports such
/// keys, the model keeps them as the product leaves them.
fn stale_by_residency(history: &History) -> BTreeSet<i32> {
    let mut newest: BTreeMap<i32, i64> = BTreeMap::new();
    for w in history.writes.iter().filter(|w| w.table == "p") {
        let e = newest.entry(w.key).or_insert(w.version.stamp);
        *e = (*e).max(w.version.stamp);
    }
    let model = Model(history);
    let mut out = BTreeSet::new();
    for r in REGIONS {
        for (k, v) in model.expected("p", r) {
            if v.cols.is_some() && newest.get(&k).is_some_and(|n| v.stamp < *n) {
                out.insert(k);
            }
        }
    }
    out
}

/// The second oracle: `pgrelay verify`, the command operators run, must
/// find what the model found — every region agrees, save what the model
/// itself allows to differ (a truncate of `p`, which stays in its region,
/// or a lost slot's limit there; storms a region discarded in `b`) — and
/// then, once one silent difference is planted (a
/// row of `g` changed in eu as if by the apply side, which no capture side
/// publishes), report exactly that key: a verify that cannot see a
/// difference could not pass this.
async fn verify_agrees_then_finds_a_planted_difference(
    w: &World,
    history: &History,
    resolved: &[(&'static str, String, &'static str)],
    seed: u64,
) {
    let mut may_differ: BTreeSet<&str> = BTreeSet::new();
    // a truncate of `p` stays in its region (the README's warning: remove
    // rows everywhere with DELETE … WHERE on the home column), so the
    // others keep what it removed: the regions then do differ, and verify
    // says so
    if !history.lost_slots.is_empty() || history.truncates.iter().any(|(_, t, _)| *t == "p") {
        may_differ.insert("public.p");
    }
    if resolved.iter().any(|(_, _, a)| *a == "discard") {
        may_differ.insert("public.b");
    }
    let verify = || {
        let out = relay::cmd(&[
            "verify",
            "--config",
            w.cfg.path.to_str().unwrap(),
            "--json",
            "--show-keys",
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        serde_json::from_str::<serde_json::Value>(&stdout).unwrap_or_else(|e| {
            panic!(
                "seed {seed}: pgrelay verify printed no JSON ({e}):\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    };
    let stale = stale_by_residency(history);
    let stale_key = |d: &serde_json::Value| {
        d["table"] == "public.p"
            && d["key"]
                .as_str()
                .and_then(|k| serde_json::from_str::<serde_json::Value>(k).ok())
                .and_then(|k| k["id"].as_str().and_then(|id| id.parse::<i32>().ok()))
                .is_some_and(|id| stale.contains(&id))
    };
    let report = verify();
    let differences = report["differences"].as_array().expect("differences");
    let unexpected: Vec<&serde_json::Value> = differences
        .iter()
        .filter(|d| !d["table"].as_str().is_some_and(|t| may_differ.contains(t)))
        .filter(|d| !stale_key(d))
        .collect();
    if !stale.is_empty() {
        let reported: BTreeSet<&str> = differences
            .iter()
            .filter(|d| stale_key(d))
            .filter_map(|d| d["key"].as_str())
            .collect();
        eprintln!(
            "seed {seed}: {} `p` key(s) left stale where a newer write's homes did not reach \
             (the README's limit), {} of them reported by verify",
            stale.len(),
            reported.len()
        );
    }
    if !unexpected.is_empty() {
        // what each region holds of those keys, for the report
        let mut held = String::new();
        for d in unexpected.iter().take(5) {
            let (Some(table), Some(key)) = (d["table"].as_str(), d["key"].as_str()) else {
                continue;
            };
            for r in REGIONS {
                let c = connect(&w.pg[r].dsn()).await;
                let rows = c
                    .query(
                        &format!(
                            "SELECT (SELECT (to_jsonb(t) - 'big' - 'extra')::text FROM {table} t \
                                     WHERE t.id = ($2::text::jsonb ->> 'id')::int), \
                             (SELECT hlc FROM pgrelay.tombstones WHERE table_name = $1 AND pk = $2::text::jsonb), \
                             (SELECT hlc FROM pgrelay.tombstones WHERE table_name = $1 AND pk = '{{}}')"
                        ),
                        &[&table, &key],
                    )
                    .await;
                let _ = writeln!(
                    held,
                    "  {table} {key} in {r}: {:?}",
                    rows.map(|rows| rows
                        .iter()
                        .map(|row| {
                            format!(
                                "row {:?} tombstone {:?} truncate {:?}",
                                row.get::<_, Option<String>>(0),
                                row.get::<_, Option<i64>>(1),
                                row.get::<_, Option<i64>>(2)
                            )
                        })
                        .collect::<Vec<_>>())
                );
            }
        }
        panic!(
            "seed {seed}: the model found the regions converged, pgrelay verify reports {} \
             difference(s) it does not allow: {unexpected:?}\n{held}",
            unexpected.len()
        );
    }
    // plant, as the apply side writes (no trigger, pgrelay's replay
    // origin, which no capture side publishes), so nothing will repair it:
    // in eu a value of one `g` row changed under its stamp (diverged) and
    // another `g` row deleted (missing in eu); in cn a `p` row homed us,
    // which cn may not hold (leaked in cn)
    let as_apply = |region: &'static str| {
        let dsn = w.pg[region].dsn();
        async move {
            let c = connect(&dsn).await;
            c.batch_execute(
                "SET session_replication_role = replica; \
                 SELECT pg_replication_origin_session_setup('pgrelay_replay')",
            )
            .await
            .expect("a session as the apply side writes");
            c
        }
    };
    let eu = as_apply("eu").await;
    let ids: Vec<i32> = eu
        .query("SELECT id FROM g ORDER BY id", &[])
        .await
        .expect("eu's g")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let changed = ids.first().copied();
    let deleted = (ids.len() >= 2).then(|| ids[ids.len() - 1]);
    if let Some(k) = changed {
        eu.execute("UPDATE g SET n = n + 1 WHERE id = $1", &[&k])
            .await
            .expect("change a g row in eu");
    }
    if let Some(k) = deleted {
        eu.execute("DELETE FROM g WHERE id = $1", &[&k])
            .await
            .expect("delete a g row in eu");
    }
    let leaked = 1_000_000;
    as_apply("cn")
        .await
        .execute(
            "INSERT INTO p (id, home, n, _pgrelay_hlc) VALUES ($1, 'us', 1, 64 + 1)",
            &[&leaked],
        )
        .await
        .expect("a p row homed us in cn");
    let mut planted: Vec<(&str, i32, &str, &str)> = vec![("public.p", leaked, "leaked", "cn")];
    planted.extend(changed.map(|k| ("public.g", k, "diverged", "")));
    planted.extend(deleted.map(|k| ("public.g", k, "missing", "eu")));
    let report = verify();
    let key_of = |d: &serde_json::Value| -> Option<i32> {
        let k: serde_json::Value = serde_json::from_str(d["key"].as_str()?).ok()?;
        k["id"]
            .as_i64()
            .map(|k| k as i32)
            .or_else(|| k["id"].as_str()?.parse().ok())
    };
    let found: Vec<&serde_json::Value> = report["differences"]
        .as_array()
        .expect("differences")
        .iter()
        .filter(|d| {
            d["table"] == "public.g" || (d["table"] == "public.p" && key_of(d) == Some(leaked))
        })
        .collect();
    for (table, key, kind, destination) in &planted {
        let matching: Vec<&&serde_json::Value> = found
            .iter()
            .filter(|d| {
                d["table"] == *table
                    && key_of(d) == Some(*key)
                    && d["kind"] == *kind
                    && (destination.is_empty() || d["destination"] == *destination)
            })
            .collect();
        assert_eq!(
            matching.len(),
            1,
            "seed {seed}: planted {kind} {table} key {key} (in {destination:?}): pgrelay verify \
             must report it exactly once; it reported {found:?}"
        );
    }
    assert_eq!(
        found.len(),
        planted.len(),
        "seed {seed}: pgrelay verify reported more than what was planted {planted:?}: {found:?}"
    );
    eprintln!(
        "seed {seed}: pgrelay verify agrees with the model ({} difference(s) the model allows), \
         and reports each of the {} differences planted, once, with its kind: {planted:?}",
        differences.len(),
        planted.len()
    );
}

fn residency_of_every_record(w: &World, seed: u64) -> usize {
    let mut total = 0;
    let mut replayed = 0;
    for src in REGIONS {
        for dst in REGIONS.iter().filter(|d| **d != src) {
            let topic = format!("pgrelay.{src}.{dst}");
            let records = read_all(&w.brokers[dst].0.brokers(), &topic, Duration::from_secs(2));
            total += records.len();
            for rec in records {
                let v = &rec.value;
                assert!(
                    !v.to_string().contains(SECRET_MARK),
                    "seed {seed}: topic {topic} offset {} carries a value of g's {G_SECRET} \
                     column, which its drop rule keeps home: {v}",
                    rec.offset
                );
                let table = v["source"]["table"].as_str().unwrap_or("");
                if table != "p" && table != "q" {
                    continue;
                }
                for image in ["before", "after"] {
                    if let Some(home) = v[image]["home"].as_str() {
                        // q: under the policy of before or after its change
                        let may = match table {
                            "p" => allowed(home, dst),
                            _ => q_allowed(home, dst, false) || q_allowed(home, dst, true),
                        };
                        assert!(
                            may,
                            "seed {seed}: topic {topic} offset {} carries a row homed {home} in \
                             its {image} image: {dst} may not hold it",
                            rec.offset
                        );
                    }
                }
            }
        }
        // before the markers below land in the topic
        if w.replay.contains(src) {
            let listed = w.ok(&[
                "dlq",
                "list",
                "--config",
                w.cfg.path.to_str().unwrap(),
                "--region",
                src,
            ]);
            // the read markers this check itself wrote into the topic
            // (`read_to_markers`) are no parked changes: no source position
            let markers = listed
                .lines()
                .filter(|l| l.contains(" waiting ") && l.contains("from [-1]@-1"))
                .count();
            assert!(
                listed.contains(&format!(" {markers} waiting for replay")),
                "seed {seed}: {src} still has parked changes to replay:\n{listed}"
            );
        }
        let mut parked = read_dlq(w, src);
        // a discarded storm is parked for audit: deletes of b only
        parked.retain(|rec| {
            let discarded = rec.headers.get("pgrelay.dlq.class").map(String::as_str)
                == Some("breaker_discarded");
            if discarded {
                assert!(
                    rec.value["source"]["table"] == "b" && rec.value["op"] == "d",
                    "seed {seed}: a discard parked more than the storm's deletes: {:?}",
                    rec.value
                );
            }
            // a region that refused changes for a while parked them;
            // each must have been replayed (checked below)
            let refused = w.replay.contains(src)
                && rec.headers.get("pgrelay.dlq.class").map(String::as_str)
                    == Some("constraint_violation")
                && rec.value["source"]["table"] == "g";
            if refused {
                replayed += 1;
            }
            assert!(
                !rec.value.to_string().contains(SECRET_MARK),
                "seed {seed}: {src}'s dead-letter topic carries a value of g's {G_SECRET}"
            );
            !discarded && !refused
        });
        assert!(
            parked.is_empty(),
            "seed {seed}: {} records dead-lettered in {src}: {:?}",
            parked.len(),
            parked.iter().map(|r| &r.headers).collect::<Vec<_>>()
        );
    }
    if !w.replay.is_empty() {
        eprintln!("seed {seed}: {replayed} change(s) parked by a refusing region, all replayed");
    }
    total
}

/// Every `p` record of every topic from a region whose slot was lost:
/// (source, destination, key, stamp).
fn delivered_p(w: &World) -> BTreeSet<(&'static str, &'static str, i32, i64)> {
    let mut out = BTreeSet::new();
    for src in w.lost_slots.iter().copied() {
        for dst in REGIONS.iter().copied().filter(|d| *d != src) {
            let topic = format!("pgrelay.{src}.{dst}");
            for rec in read_all(&w.brokers[dst].0.brokers(), &topic, Duration::from_secs(1)) {
                if rec.value["source"]["table"] != "p" {
                    continue;
                }
                let row = if rec.value["after"].is_object() {
                    &rec.value["after"]
                } else {
                    &rec.value["before"]
                };
                let key = row["id"]
                    .as_str()
                    .and_then(|k| k.parse().ok())
                    .or_else(|| row["id"].as_i64().map(|k| k as i32));
                if let (Some(key), Some(stamp)) = (key, rec.value["pgrelay"]["hlc"].as_i64()) {
                    out.insert((src, dst, key, stamp));
                }
            }
        }
    }
    out
}

/// The fault kinds by name (`restart_broker` last: drawn only where the
/// broker keeps its log across a restart).
const KINDS: [&str; 12] = [
    "kill_sidecar",
    "crash_database",
    "cut_link",
    "kill_side",
    "fence",
    "lost_slot",
    "park_replay",
    "schema_change",
    "join",
    "policy_change",
    "failover",
    "restart_broker",
];
const LOST_SLOT: usize = 5;
const PARK_REPLAY: usize = 6;
const SCHEMA_CHANGE: usize = 7;
const JOIN: usize = 8;
const POLICY_CHANGE: usize = 9;
const FAILOVER: usize = 10;

/// `PGRELAY_CHECK_FAULTS=lost_slot,park_replay`: draw only these fault
/// kinds (to aim a run at some).
fn forced_faults() -> Option<Vec<usize>> {
    let list = std::env::var("PGRELAY_CHECK_FAULTS").ok()?;
    let kinds: Vec<usize> = list
        .split(',')
        .map(|k| {
            KINDS
                .iter()
                .position(|n| *n == k.trim())
                .unwrap_or_else(|| {
                    panic!("PGRELAY_CHECK_FAULTS: unknown fault {k:?}; one of {KINDS:?}")
                })
        })
        .collect();
    (!kinds.is_empty()).then_some(kinds)
}

fn seeds() -> Vec<u64> {
    match std::env::var("PGRELAY_CHECK_SEEDS") {
        Ok(s) => s.split(',').filter_map(|x| x.trim().parse().ok()).collect(),
        Err(_) => vec![1, 4],
    }
}

fn ops() -> usize {
    std::env::var("PGRELAY_CHECK_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_histories_with_faults_converge_to_last_writer_wins() {
    let mut total = Checked::default();
    for seed in seeds() {
        let c = check(seed, ops()).await;
        eprintln!(
            "CHECKED seed {seed}: {} ops, {} row writes, {} faults, {} records read",
            c.ops, c.writes, c.faults, c.records
        );
        eprintln!("CHECKED faults seed {seed}: {}", kinds_line(&c.kinds));
        for (kind, n) in &c.kinds {
            *total.kinds.entry(kind.clone()).or_insert(0) += n;
        }
        total.ops += c.ops;
        total.writes += c.writes;
        total.faults += c.faults;
        total.records += c.records;
        total.trips += c.trips;
        total.healed += c.healed;
        total.fast += c.fast;
    }
    eprintln!(
        "CHECKED total: {} ops, {} row writes, {} faults, {} records read",
        total.ops, total.writes, total.faults, total.records
    );
    eprintln!("CHECKED faults: {}", kinds_line(&total.kinds));
    eprintln!("CHECKED breaker trips resolved: {}", total.trips);
    eprintln!(
        "CHECKED changes applied without the tombstone recheck (sidecars running at each history's end): {}",
        total.fast
    );
    eprintln!(
        "CHECKED test brokers started again after a storage panic: {}",
        total.healed
    );
}

/// `Kind=n` pairs, space-separated (the soak adds them up).
fn kinds_line(kinds: &BTreeMap<String, usize>) -> String {
    kinds
        .iter()
        .map(|(k, n)| format!("{k}={n}"))
        .collect::<Vec<_>>()
        .join(" ")
}
