//! Names both sides and `setup` share: the stamp column, pgrelay's schema
//! and tables, replication origin names. One home, so that the capture side,
//! the apply side and the installer cannot drift apart.

/// The relay-managed stamp column on every replicated table.
pub const HLC_COLUMN: &str = "_pgrelay_hlc";
/// The relay-managed column of tables with `counter` merge columns: each
/// region's part of each counter, with the stamp of its last change (see
/// `merge.rs`).
pub const COUNTS_COLUMN: &str = "_pgrelay_counts";
/// The schema of pgrelay's own objects in each database.
pub const META_SCHEMA: &str = "pgrelay";
/// The table the delete trigger writes stamps (and tombstones) to.
pub const TOMBSTONES_TABLE: &str = "tombstones";
/// The columns the apply side last saw in each replicated table, and which
/// of them were dropped here (see `apply::target`).
pub const COLUMNS_TABLE: &str = "pgrelay.columns";
/// How every function of pgrelay's runs: with the rights of its owner (the
/// setup role), whoever calls or fires it, and with a search path no caller
/// can put objects in (every name in the bodies is schema-qualified or
/// pg_catalog's).
pub const DEFINER: &str = "SECURITY DEFINER SET search_path = pg_catalog, pg_temp";
/// Replication origins of pgrelay's apply side are named with this prefix.
pub const ORIGIN_PREFIX: &str = "pgrelay_";

/// The replication origin `pgrelay dlq replay` writes under (the sidecar's
/// apply side holds the per-source origins while it runs).
pub const REPLAY_ORIGIN: &str = "pgrelay_replay";

/// The replication origin of apply session `group` for `source`:
/// `pgrelay_{source}` for the first, `pgrelay_{source}.{group}` for the
/// others (region names have no dots, so these never collide).
pub fn origin_name(source: &str, group: usize) -> String {
    if group == 0 {
        format!("{ORIGIN_PREFIX}{source}")
    } else {
        format!("{ORIGIN_PREFIX}{source}.{group}")
    }
}
