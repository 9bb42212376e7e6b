//! pgrelay's own tables in each region's database, as numbered,
//! forward-only migrations.
//!
//! Two kinds of object live in schema `pgrelay`: tables that hold state
//! (tombstones, offsets, watermarks, the breaker's state, ...) and objects
//! that follow the config (functions, views, triggers on the replicated
//! tables, the publication, replication origins). The second kind is
//! re-created by every `pgrelay setup` from the config at hand. The first
//! kind cannot be: its rows are the region's state. Its changes are the
//! migrations below, each one idempotent (a database set up before
//! migrations were recorded is brought up to date by running them all), and
//! each one, once run, is recorded in [`VERSION_TABLE`] in the same
//! transaction.
//!
//! Two lines of migrations: `core`, in every database, and `dr`, where a
//! table sends encrypted DR copies (`pgrelay_dr`, see `dr.rs`).
//!
//! A binary refuses a database whose recorded version is newer than the
//! migrations it knows (it would misread state it does not understand);
//! a database behind the binary needs `pgrelay setup` (the sidecar refuses
//! to start until then, `pgrelay check` says so). Pure: SQL text only.

use std::collections::BTreeMap;
use std::fmt;

/// Where each migration run is recorded: one row per component and
/// version.
pub const VERSION_TABLE: &str = "pgrelay.schema_version";

/// Creates [`VERSION_TABLE`] (the first statement of every upgrade).
pub const VERSION_TABLE_SQL: &str = "CREATE TABLE IF NOT EXISTS pgrelay.schema_version (\
    component text NOT NULL, version int NOT NULL, name text NOT NULL, \
    applied_at timestamptz NOT NULL DEFAULT now(), applied_by text NOT NULL, \
    PRIMARY KEY (component, version))";

/// The recorded version of each component (`$1` none): rows of
/// (component, version). Run only where [`VERSION_TABLE`] exists.
pub const READ_SQL: &str =
    "SELECT component, max(version) FROM pgrelay.schema_version GROUP BY component";

/// Whether [`VERSION_TABLE`] exists.
pub const EXISTS_SQL: &str = "SELECT to_regclass('pgrelay.schema_version') IS NOT NULL";

/// A line of migrations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Component {
    /// pgrelay's tables in schema `pgrelay`, in every region.
    Core,
    /// The DR vault and seal counts in schema `pgrelay_dr`, where a table
    /// has DR copies.
    Dr,
}

impl Component {
    pub fn name(self) -> &'static str {
        match self {
            Component::Core => "core",
            Component::Dr => "dr",
        }
    }

    fn from_name(name: &str) -> Option<Component> {
        match name {
            "core" => Some(Component::Core),
            "dr" => Some(Component::Dr),
            _ => None,
        }
    }

    fn migrations(self) -> &'static [Migration] {
        match self {
            Component::Core => CORE,
            Component::Dr => DR,
        }
    }

    /// The newest version this binary knows.
    pub fn latest(self) -> i32 {
        self.migrations().last().map_or(0, |m| m.version)
    }
}

/// One forward-only change of pgrelay's tables.
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub statements: &'static [&'static str],
}

/// The versions a database holds, as read from [`VERSION_TABLE`]; a
/// component absent has none recorded (a new database, or one set up
/// before migrations were recorded).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Installed {
    versions: BTreeMap<Component, i32>,
    /// Components recorded that this binary does not know (a newer one's).
    unknown: Vec<(String, i32)>,
}

impl Installed {
    /// From the rows of [`READ_SQL`].
    pub fn from_rows(rows: impl IntoIterator<Item = (String, i32)>) -> Installed {
        let mut out = Installed::default();
        for (name, version) in rows {
            match Component::from_name(&name) {
                Some(c) => {
                    out.versions.insert(c, version);
                }
                None => out.unknown.push((name, version)),
            }
        }
        out
    }

    pub fn version(&self, c: Component) -> i32 {
        self.versions.get(&c).copied().unwrap_or(0)
    }

    /// What this binary makes of the database: `dr` whether the config
    /// needs the DR line.
    pub fn verdict(&self, dr: bool) -> Verdict {
        let mut ahead = Vec::new();
        let mut behind = Vec::new();
        for c in [Component::Core, Component::Dr] {
            let (at, latest) = (self.version(c), c.latest());
            if at > latest {
                ahead.push(format!(
                    "{} {at} (this pgrelay knows up to {latest})",
                    c.name()
                ));
            } else if at < latest && (c == Component::Core || dr) {
                behind.push(format!("{} {at} of {latest}", c.name()));
            }
        }
        for (name, v) in &self.unknown {
            ahead.push(format!("{name} {v} (unknown to this pgrelay)"));
        }
        if !ahead.is_empty() {
            Verdict::Ahead(ahead.join(", "))
        } else if !behind.is_empty() {
            Verdict::Behind(behind.join(", "))
        } else {
            Verdict::Current
        }
    }

    /// The migrations to run, in order: `dr` whether the config needs the
    /// DR line.
    pub fn pending(&self, dr: bool) -> Vec<(Component, &'static Migration)> {
        let mut out = Vec::new();
        for c in [Component::Core, Component::Dr] {
            if c == Component::Dr && !dr {
                continue;
            }
            let at = self.version(c);
            out.extend(
                c.migrations()
                    .iter()
                    .filter(|m| m.version > at)
                    .map(|m| (c, m)),
            );
        }
        out
    }
}

impl fmt::Display for Installed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = self
            .versions
            .iter()
            .map(|(c, v)| format!("{} {v}", c.name()))
            .collect();
        parts.extend(self.unknown.iter().map(|(n, v)| format!("{n} {v}")));
        if parts.is_empty() {
            f.write_str("none recorded")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

/// How a database's versions compare with this binary's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Current,
    /// Migrations pending: `pgrelay setup` runs them.
    Behind(String),
    /// Set up by a newer pgrelay: this binary must not run against it.
    Ahead(String),
}

impl Verdict {
    /// What to tell the operator of `region`'s database (`None`: current).
    pub fn problem(&self, region: &str) -> Option<String> {
        match self {
            Verdict::Current => None,
            Verdict::Behind(what) => Some(format!(
                "region {region}: pgrelay's tables are behind this binary ({what}); run pgrelay \
                 setup --region {region}"
            )),
            Verdict::Ahead(what) => Some(format!(
                "region {region}: pgrelay's tables were set up by a newer pgrelay ({what}); run \
                 that version's binary (this is pgrelay {})",
                env!("CARGO_PKG_VERSION")
            )),
        }
    }
}

/// The statements running `pending` and recording each: the version table
/// first (idempotent), then each migration's statements and its row.
pub fn upgrade_sql(pending: &[(Component, &'static Migration)]) -> Vec<String> {
    if pending.is_empty() {
        return Vec::new();
    }
    let mut sql = vec![
        "CREATE SCHEMA IF NOT EXISTS pgrelay".to_string(),
        VERSION_TABLE_SQL.to_string(),
    ];
    for (c, m) in pending {
        sql.extend(m.statements.iter().map(|s| s.to_string()));
        sql.push(format!(
            "INSERT INTO {VERSION_TABLE} (component, version, name, applied_by) \
             VALUES ('{}', {}, '{}', 'pgrelay {}') ON CONFLICT DO NOTHING",
            c.name(),
            m.version,
            m.name.replace('\'', "''"),
            env!("CARGO_PKG_VERSION")
        ));
    }
    sql
}

/// The `core` line. Versions 1–11 are the tables as they were when
/// migrations began to be recorded, in the order they came; every
/// statement is idempotent, so a database set up before then runs them all
/// and ends where a new one does.
const CORE: &[Migration] = &[
    Migration {
        version: 1,
        name: "tombstones, horizon, offsets, watermarks, conflict log",
        statements: &[
            "CREATE TABLE IF NOT EXISTS pgrelay.tombstones (\
                table_name text NOT NULL, pk jsonb NOT NULL, hlc bigint NOT NULL, \
                deleted_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (table_name, pk))",
            // a table's newest tombstone, for check_tombstone
            "CREATE INDEX IF NOT EXISTS tombstones_table_hlc ON pgrelay.tombstones (table_name, hlc)",
            // the stamp below which tombstones are gone (see apply::horizon)
            "CREATE TABLE IF NOT EXISTS pgrelay.horizon (\
                table_name text PRIMARY KEY, hlc bigint NOT NULL, \
                raised_at timestamptz NOT NULL DEFAULT now())",
            "CREATE INDEX IF NOT EXISTS tombstones_hlc ON pgrelay.tombstones (hlc)",
            "CREATE TABLE IF NOT EXISTS pgrelay.offsets (\
                topic text NOT NULL, kafka_partition int NOT NULL, next_offset bigint NOT NULL, \
                updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (topic, kafka_partition))",
            "CREATE TABLE IF NOT EXISTS pgrelay.watermark_parts (\
                source_region text NOT NULL, session int NOT NULL, hlc bigint NOT NULL, \
                commit_lsn pg_lsn, commit_time timestamptz, \
                applied_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (source_region, session))",
            // incoming changes that lost to a newer version (see
            // conflicts::losers_sql); one entry per table, key and stamp
            "CREATE TABLE IF NOT EXISTS pgrelay.conflicts (\
                table_name text NOT NULL, pk jsonb NOT NULL, op text NOT NULL, \
                winner_hlc bigint NOT NULL, winner_origin text, \
                loser_hlc bigint NOT NULL, loser_origin text, loser_version jsonb, \
                recorded_at timestamptz NOT NULL DEFAULT now(), \
                PRIMARY KEY (table_name, pk, loser_hlc))",
            "CREATE INDEX IF NOT EXISTS conflicts_recorded_at ON pgrelay.conflicts (recorded_at)",
        ],
    },
    Migration {
        version: 2,
        name: "tombstones keep a partitioned row's home",
        // the deleted row's home, for resync's routing
        statements: &["ALTER TABLE pgrelay.tombstones ADD COLUMN IF NOT EXISTS home text"],
    },
    Migration {
        version: 3,
        name: "counters keep their parts in each row",
        // the per-row high-water marks of the delta scheme are gone
        statements: &["DROP TABLE IF EXISTS pgrelay.merged"],
    },
    Migration {
        version: 4,
        name: "offsets keep the source's commit LSN",
        // per partition: every change the source committed before this LSN
        // is applied (see setup::wait_for_function)
        statements: &["ALTER TABLE pgrelay.offsets ADD COLUMN IF NOT EXISTS source_lsn pg_lsn"],
    },
    Migration {
        version: 5,
        name: "parked changes",
        // changes parked instead of applied, by their original position,
        // until `dlq replay` applies them
        statements: &["CREATE TABLE IF NOT EXISTS pgrelay.parked (\
            topic text NOT NULL, kafka_partition int NOT NULL, kafka_offset bigint NOT NULL, \
            commit_lsn pg_lsn NOT NULL, class text NOT NULL, \
            parked_at timestamptz NOT NULL DEFAULT now(), \
            PRIMARY KEY (topic, kafka_partition, kafka_offset))"],
    },
    Migration {
        version: 6,
        name: "columns the apply side saw",
        // so it knows a column dropped here from one never added here (see
        // apply::target)
        statements: &["CREATE TABLE IF NOT EXISTS pgrelay.columns (\
            table_name text NOT NULL, column_name text NOT NULL, \
            dropped boolean NOT NULL DEFAULT false, \
            PRIMARY KEY (table_name, column_name))"],
    },
    Migration {
        version: 7,
        name: "why a session holds its records back",
        statements: &[
            "ALTER TABLE pgrelay.watermark_parts ADD COLUMN IF NOT EXISTS held_reason text",
        ],
    },
    Migration {
        version: 8,
        name: "breaker state and the region's events",
        statements: &crate::apply::breaker::SETUP_SQL,
    },
    Migration {
        version: 9,
        name: "egress figures",
        statements: &[crate::overview::EGRESS_TABLE_SQL],
    },
    Migration {
        version: 10,
        name: "the last periodic verify",
        statements: &[crate::verify::schedule::RUNS_TABLE_SQL],
    },
    Migration {
        version: 11,
        name: "primary identity and the fence",
        statements: &[
            // the primary the capture side last streamed from
            "CREATE TABLE IF NOT EXISTS pgrelay.primary_identity (\
                region text PRIMARY KEY, system_id text NOT NULL, timeline int NOT NULL, \
                seen_at timestamptz NOT NULL DEFAULT now())",
            // a row here fences the region: local writes to replicated
            // tables are refused (`pgrelay fence`), applied changes still land
            "CREATE TABLE IF NOT EXISTS pgrelay.fence (\
                region text PRIMARY KEY, fenced_at timestamptz NOT NULL DEFAULT now(), \
                reason text)",
        ],
    },
];

/// The `dr` line (schema `pgrelay_dr`).
const DR: &[Migration] = &[Migration {
    version: 1,
    name: "the vault and seal counts",
    statements: &crate::dr::SETUP_SQL,
}];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_numbered_from_one_without_gaps() {
        for c in [Component::Core, Component::Dr] {
            for (i, m) in c.migrations().iter().enumerate() {
                assert_eq!(m.version, i as i32 + 1, "{} {}", c.name(), m.name);
                assert!(!m.statements.is_empty());
            }
        }
    }

    #[test]
    fn every_statement_is_idempotent() {
        // a database set up before versions were recorded runs every
        // migration again over what it has
        for c in [Component::Core, Component::Dr] {
            for m in c.migrations() {
                for s in m.statements {
                    let s = s.to_ascii_uppercase();
                    assert!(
                        s.contains("IF NOT EXISTS") || s.contains("IF EXISTS"),
                        "{} {}: {s}",
                        c.name(),
                        m.version
                    );
                }
            }
        }
    }

    #[test]
    fn pending_runs_what_the_database_lacks_in_order() {
        let new = Installed::default();
        assert_eq!(new.pending(false).len(), CORE.len());
        assert_eq!(new.pending(true).len(), CORE.len() + DR.len());
        assert_eq!(
            new.verdict(false),
            Verdict::Behind(format!("core 0 of {}", CORE.len()))
        );
        let at = Installed::from_rows([("core".to_string(), 9)]);
        let pending: Vec<i32> = at.pending(false).iter().map(|(_, m)| m.version).collect();
        assert_eq!(pending, (10..=CORE.len() as i32).collect::<Vec<_>>());
        let current = Installed::from_rows([("core".to_string(), Component::Core.latest())]);
        assert!(current.pending(false).is_empty());
        assert_eq!(current.verdict(false), Verdict::Current);
        // the DR line matters only where the config has DR copies
        assert!(matches!(current.verdict(true), Verdict::Behind(_)));
        let sql = upgrade_sql(&current.pending(true));
        assert!(sql[1].contains("schema_version"), "{sql:?}");
        assert!(sql.last().unwrap().contains("'dr', 1"), "{sql:?}");
    }

    #[test]
    fn a_database_newer_than_the_binary_is_refused() {
        let ahead = Installed::from_rows([("core".to_string(), Component::Core.latest() + 1)]);
        assert!(matches!(ahead.verdict(false), Verdict::Ahead(m) if m.contains("knows up to")));
        let unknown = Installed::from_rows([
            ("core".to_string(), Component::Core.latest()),
            ("sinks".to_string(), 1),
        ]);
        assert!(matches!(unknown.verdict(false), Verdict::Ahead(m) if m.contains("sinks 1")));
    }
}
