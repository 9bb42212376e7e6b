//! Whether the source's walsender holds the capture side back for a
//! physical standby (PostgreSQL 17+).
//!
//! With a failover slot, the primary sends no logical change that the
//! standbys named in `synchronized_standby_slots` have not flushed yet. A
//! standby that is down, or far behind, stops every outgoing pair of its
//! region without an error anywhere: the slot stays active, nothing
//! arrives. This reads the setting and those physical slots, so `status`
//! and the `pgrelay_capture_held_by_standby` gauge can say why.

use tokio_postgres::Client;

/// One physical slot the primary knows about and whether it holds the
/// capture side back (`Some(why)`); slots not named in
/// `synchronized_standby_slots` never do (listed so that their gauge
/// drops to 0 once the setting no longer names them).
#[derive(Debug, Clone, PartialEq)]
pub struct StandbySlot {
    pub name: String,
    pub holding: Option<String>,
}

/// The names in a `synchronized_standby_slots` value (a comma-separated
/// list of slot names, each possibly double-quoted).
pub fn parse_setting(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(|n| n.trim().trim_matches('"').to_string())
        .filter(|n| !n.is_empty())
        .collect()
}

/// Why `name` holds the walsender back, from its row in
/// `pg_replication_slots` (`None` when it has no row): its type, whether a
/// standby streams from it, whether it was invalidated, and how many bytes
/// of the primary's WAL it has not reached. A slot that has reached the
/// current WAL position holds nothing back, active or not; an active one
/// holds it back only past `lagging_bytes`.
pub fn hold_reason(name: &str, row: Option<SlotRow>, lagging_bytes: u64) -> Option<String> {
    let prefix = format!("standby slot \"{name}\" (synchronized_standby_slots)");
    let Some(row) = row else {
        return Some(format!("{prefix} does not exist"));
    };
    if !row.physical {
        return Some(format!("{prefix} is not a physical slot"));
    }
    let Some(behind) = row.behind_bytes else {
        return Some(format!("{prefix} is invalidated"));
    };
    if behind <= 0 {
        return None;
    }
    if !row.active {
        return Some(format!("{prefix} is inactive ({behind} bytes behind)"));
    }
    (behind as u64 > lagging_bytes).then(|| format!("{prefix} is {behind} bytes behind"))
}

/// What [`hold_reason`] needs of a slot's row.
#[derive(Debug, Clone, Copy)]
pub struct SlotRow {
    pub physical: bool,
    pub active: bool,
    /// `pg_current_wal_lsn() - restart_lsn`; `None` once invalidated.
    pub behind_bytes: Option<i64>,
}

/// The physical slots of the source whose walsender serves the failover
/// slot `logical_slot`, with their hold reasons. Empty before PostgreSQL 17,
/// when the slot is not a failover slot, or when nothing can be read (the
/// slot's own problems are reported elsewhere).
pub async fn read(client: &Client, logical_slot: &str, lagging_bytes: u64) -> Vec<StandbySlot> {
    let version: i32 = match client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
    {
        Ok(r) => r.get(0),
        Err(_) => return Vec::new(),
    };
    if !crate::source::server::failover_slots(version) {
        return Vec::new();
    }
    let failover = client
        .query_opt(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = $1",
            &[&logical_slot],
        )
        .await
        .ok()
        .flatten()
        .is_some_and(|r| r.get::<_, bool>(0));
    let named = match client
        .query_one("SELECT current_setting('synchronized_standby_slots')", &[])
        .await
    {
        Ok(r) => parse_setting(&r.get::<_, String>(0)),
        Err(_) => return Vec::new(),
    };
    let Ok(rows) = client
        .query(
            "SELECT slot_name::text, slot_type = 'physical', active, \
             CASE WHEN restart_lsn IS NULL OR wal_status = 'lost' THEN NULL \
             ELSE (pg_current_wal_lsn() - restart_lsn)::bigint END \
             FROM pg_replication_slots WHERE slot_type = 'physical' OR slot_name::text = ANY($1::text[])",
            &[&named],
        )
        .await
    else {
        return Vec::new();
    };
    let found: Vec<(String, SlotRow)> = rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                SlotRow {
                    physical: r.get(1),
                    active: r.get(2),
                    behind_bytes: r.get(3),
                },
            )
        })
        .collect();
    let mut out: Vec<StandbySlot> = named
        .iter()
        .map(|name| {
            let row = found.iter().find(|(n, _)| n == name).map(|(_, r)| *r);
            StandbySlot {
                name: name.clone(),
                holding: failover
                    .then(|| hold_reason(name, row, lagging_bytes))
                    .flatten(),
            }
        })
        .collect();
    for (name, _) in found.iter().filter(|(n, _)| !named.contains(n)) {
        out.push(StandbySlot {
            name: name.clone(),
            holding: None,
        });
    }
    out
}

/// The line `status` prints under each outgoing pair of a held region.
pub fn describe(slots: &[StandbySlot]) -> Option<String> {
    let reasons: Vec<&str> = slots.iter().filter_map(|s| s.holding.as_deref()).collect();
    (!reasons.is_empty()).then(|| {
        format!(
            "held: {}; the primary sends no change until the standby has it: start the standby, \
             or ALTER SYSTEM RESET synchronized_standby_slots and reload (no failover guarantee meanwhile)",
            reasons.join("; ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(active: bool, behind: Option<i64>) -> Option<SlotRow> {
        Some(SlotRow {
            physical: true,
            active,
            behind_bytes: behind,
        })
    }

    #[test]
    fn parses_the_setting() {
        assert_eq!(parse_setting(""), Vec::<String>::new());
        assert_eq!(parse_setting("a, \"B c\""), ["a", "B c"]);
    }

    #[test]
    fn names_what_holds_the_walsender() {
        let q = "standby slot \"sb\" (synchronized_standby_slots)";
        assert_eq!(hold_reason("sb", row(false, Some(0)), 100), None);
        assert_eq!(
            hold_reason("sb", row(false, Some(5)), 100),
            Some(format!("{q} is inactive (5 bytes behind)"))
        );
        assert_eq!(hold_reason("sb", row(true, Some(50)), 100), None);
        assert_eq!(
            hold_reason("sb", row(true, Some(500)), 100),
            Some(format!("{q} is 500 bytes behind"))
        );
        assert_eq!(
            hold_reason("sb", row(true, None), 100),
            Some(format!("{q} is invalidated"))
        );
        assert_eq!(
            hold_reason("sb", None, 100),
            Some(format!("{q} does not exist"))
        );
    }
}
