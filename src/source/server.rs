//! What the connected PostgreSQL major offers a relay, from
//! `server_version_num` (pure; `check` prints it, `setup` and the capture
//! side act on it).
//!
//! - 16+: pgoutput's `origin` option lets the walsender drop changes that
//!   carry a replication origin before decoding them
//!   (`relay.capture.origin_filter = "server"`); before 16 the capture side
//!   reads each transaction's Origin message and skips pgrelay's own.
//! - 17+: failover slots (`pg_create_logical_replication_slot(...,
//!   failover => true)`), kept on physical standbys with
//!   `sync_replication_slots`, so a promoted standby carries the slot.

/// The major of a `server_version_num` (`180006` -> 18).
pub fn major(version_num: i32) -> i32 {
    version_num / 10_000
}

/// `major.minor` of a `server_version_num`.
pub fn display(version_num: i32) -> String {
    format!("{}.{}", major(version_num), version_num % 10_000)
}

/// Whether pgoutput accepts `origin 'none'` (16+).
pub fn origin_filter(version_num: i32) -> bool {
    version_num >= 160_000
}

/// Whether logical slots can be failover slots (17+).
pub fn failover_slots(version_num: i32) -> bool {
    version_num >= 170_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_by_major() {
        assert_eq!(display(150_018), "15.18");
        assert_eq!(display(180_006), "18.6");
        assert!(!origin_filter(150_018) && !failover_slots(150_018));
        assert!(origin_filter(160_000) && !failover_slots(160_009));
        assert!(origin_filter(170_000) && failover_slots(170_000));
        assert!(origin_filter(180_006) && failover_slots(180_006));
    }
}
