//! Every metric pgrelay exports: name, kind, label names and help text, in
//! one place. Call sites name a constant from here, never a string, so a
//! metric cannot be misspelt, exported under two help texts or left out of
//! `docs/reference.md` (a test reads that file for every entry of [`ALL`]).
//!
//! Labels are regions, tables, slots, key ids and reasons — never keys or
//! row values (residency: metrics leave the region too).

use super::{Counter, Entry, Gauge, Histogram, Metric, LATENCY_BUCKETS, SIZE_BUCKETS};

/// Declares each metric as a constant and lists them all in [`ALL`], so a
/// metric cannot be declared without being listed.
macro_rules! catalog {
    ($($(#[doc = $doc:literal])* $ident:ident: $kind:ty = $value:expr;)*) => {
        $($(#[doc = $doc])* pub const $ident: Metric<$kind> = $value;)*

        /// Every metric above, in declaration order.
        pub const ALL: &[Entry] = &[$($ident.entry()),*];
    };
}

catalog! {
    // -- capture side ---------------------------------------------------------

    CAPTURE_PUBLISHED: Counter = Metric {
        name: "pgrelay_capture_published_total",
        kind: Counter,
        labels: &["source", "destination"],
        help: "Records handed to Kafka, by destination",
    };
    /// Egress: what `status` and the status page turn into a rate and a cost.
    CAPTURE_BYTES: Counter = Metric {
        name: "pgrelay_capture_bytes_total",
        kind: Counter,
        labels: &["source", "destination"],
        help: "Bytes of records handed to Kafka (key, value, headers), by destination",
    };
    CAPTURE_DROPPED: Counter = Metric {
        name: "pgrelay_capture_dropped_total",
        kind: Counter,
        labels: &["table", "destination", "reason"],
        help: "Row changes not published to a destination, by reason",
    };
    CAPTURE_CONFIRMED_LSN: Gauge = Metric {
        name: "pgrelay_capture_confirmed_lsn",
        kind: Gauge,
        labels: &["region"],
        help: "Highest LSN confirmed to PostgreSQL (everything below it is in Kafka)",
    };
    CAPTURE_COLUMNS_GONE: Counter = Metric {
        name: "pgrelay_capture_columns_gone_total",
        kind: Counter,
        labels: &["region", "table"],
        help: "Changes published without a column their table no longer has (dropped or renamed \
               after the change was written): the destinations keep their value of it",
    };
    /// The server's WAL end as last reported (keepalives, `IDENTIFY_SYSTEM`);
    /// read back by the capture side as the old primary's WAL end when it
    /// records a failover.
    CAPTURE_SERVER_WAL_END: Gauge = Metric {
        name: "pgrelay_capture_server_wal_end",
        kind: Gauge,
        labels: &["region"],
        help: "The source server's WAL end as it last reported it",
    };
    SOURCE_TIMELINE: Gauge = Metric {
        name: "pgrelay_source_timeline",
        kind: Gauge,
        labels: &["region"],
        help: "Timeline of the primary the capture side streams from",
    };
    FAILOVERS: Counter = Metric {
        name: "pgrelay_failovers_total",
        kind: Counter,
        labels: &["region"],
        help: "Failovers seen by the capture side (a new primary behind the region)",
    };
    DR_KEY_SEALS: Gauge = Metric {
        name: "pgrelay_dr_key_seals",
        kind: Gauge,
        labels: &["region", "key_id"],
        help: "Records sealed under this DR key, counted ahead in blocks (an upper bound); rotate \
               the key before 2^31",
    };

    // -- gauges refreshed from the databases and Kafka (status) ---------------

    CAPTURE_LAG_BYTES: Gauge = Metric {
        name: "pgrelay_capture_lag_bytes",
        kind: Gauge,
        labels: &["region"],
        help: "WAL bytes the capture side has not confirmed yet",
    };
    SLOT_RETAINED_WAL_BYTES: Gauge = Metric {
        name: "pgrelay_slot_retained_wal_bytes",
        kind: Gauge,
        labels: &["region"],
        help: "WAL retained by the replication slot",
    };
    DEAD_LETTERS: Gauge = Metric {
        name: "pgrelay_dead_letters",
        kind: Gauge,
        labels: &["region"],
        help: "Records parked in the dead-letter topic and not yet replayed",
    };
    CAPTURE_HELD_BY_STANDBY: Gauge = Metric {
        name: "pgrelay_capture_held_by_standby",
        kind: Gauge,
        labels: &["region", "slot"],
        help: "1 while the source's primary holds the capture side back for this standby slot (synchronized_standby_slots)",
    };
    PAIR_REBUILDING: Gauge = Metric {
        name: "pgrelay_pair_rebuilding",
        kind: Gauge,
        labels: &["source", "destination"],
        help: "1 while an outgoing pair waits for the resync a failover without its slot needs",
    };
    /// Set by the periodic refresh, and at once when the breaker trips.
    PAIR_STATE: Gauge = Metric {
        name: "pgrelay_pair_state",
        kind: Gauge,
        labels: &["source", "destination"],
        help: "State of an incoming region pair as this sidecar sees it: 0 active, 1 lagging, 2 failed, 3 frozen by the breaker",
    };
    APPLY_BACKLOG_RECORDS: Gauge = Metric {
        name: "pgrelay_apply_backlog_records",
        kind: Gauge,
        labels: &["source", "destination"],
        help: "Records in the source's topic not yet applied",
    };
    APPLY_LAG_SECONDS: Gauge = Metric {
        name: "pgrelay_apply_lag_seconds",
        kind: Gauge,
        labels: &["source", "destination"],
        help: "Age of the newest applied change while records wait (0 when caught up)",
    };

    // -- apply side -------------------------------------------------------------

    /// A side of the sidecar (capture or apply) restarted.
    RESTARTS: Counter = Metric {
        name: "pgrelay_restarts_total",
        kind: Counter,
        labels: &["region", "side"],
        help: "Runs of a side ended by a transient failure",
    };
    APPLY_RESTARTS: Counter = Metric {
        name: "pgrelay_apply_restarts_total",
        kind: Counter,
        labels: &["region", "source"],
        help: "Apply pipelines restarted after a transient failure",
    };
    APPLY_RECORDS_LOST: Gauge = Metric {
        name: "pgrelay_apply_records_lost",
        kind: Gauge,
        labels: &["region", "source"],
        help: "1 while records of the pair were deleted by Kafka retention before they were applied (run pgrelay resync)",
    };
    APPLY_CLOCK_WAIT_SECONDS: Gauge = Metric {
        name: "pgrelay_apply_clock_wait_seconds",
        kind: Gauge,
        labels: &["region", "source"],
        help: "How long the pair's next batch waits for the local clock to catch up with its stamps",
    };
    APPLY_CLOCK_SKEW: Counter = Metric {
        name: "pgrelay_apply_clock_skew_total",
        kind: Counter,
        labels: &["region", "source"],
        help: "Batches held back because a change is stamped further ahead of the local clock than relay.max_clock_skew",
    };
    APPLY_SCHEMA_WAITS: Counter = Metric {
        name: "pgrelay_apply_schema_waits_total",
        kind: Counter,
        labels: &["region", "source"],
        help: "Batches held because records carry a column the target table lacks",
    };
    APPLY_RETRIES: Counter = Metric {
        name: "pgrelay_apply_retries_total",
        kind: Counter,
        labels: &["region", "source"],
        help: "Batches retried after a transient failure",
    };
    APPLY_RECORDS: Counter = Metric {
        name: "pgrelay_apply_records_total",
        kind: Counter,
        labels: &["region", "source"],
        help: "Records consumed and applied (or found redundant)",
    };
    APPLY_CONFLICTS_WON: Counter = Metric {
        name: "pgrelay_apply_conflicts_won_total",
        kind: Counter,
        labels: &["region", "source"],
        help: "Incoming changes that won last-writer-wins",
    };
    APPLY_CONFLICTS_LOST: Counter = Metric {
        name: "pgrelay_apply_conflicts_lost_total",
        kind: Counter,
        labels: &["region", "source"],
        help: "Incoming changes older than the target row or tombstone",
    };
    APPLY_CONFLICTS: Counter = Metric {
        name: "pgrelay_apply_conflicts_total",
        kind: Counter,
        labels: &["region", "source", "table"],
        help: "Incoming changes that lost to a newer version of their row (the conflict log)",
    };
    APPLY_UPSERTED: Counter = Metric {
        name: "pgrelay_apply_upserted_total",
        kind: Counter,
        labels: &["region", "source", "path"],
        help: "Changes written by upsert statements, by path: fast (plain inserts of keys the target lacked), upsert (the conditional upsert), checked (rows looked up again for a tombstone as new as one of them)",
    };
    APPLY_DEAD_LETTERED: Counter = Metric {
        name: "pgrelay_apply_dead_lettered_total",
        kind: Counter,
        labels: &["region", "source"],
        help: "Records sent to the dead-letter topic",
    };
    APPLY_BATCH_SECONDS: Histogram = Metric {
        name: "pgrelay_apply_batch_seconds",
        kind: Histogram { buckets: LATENCY_BUCKETS },
        labels: &["region", "source"],
        help: "Time to apply one batch (one target transaction)",
    };
    APPLY_BATCH_RECORDS: Histogram = Metric {
        name: "pgrelay_apply_batch_records",
        kind: Histogram { buckets: SIZE_BUCKETS },
        labels: &["region", "source"],
        help: "Records per applied batch",
    };

    // -- blast-radius breaker ---------------------------------------------------

    BREAKER_STATE: Gauge = Metric {
        name: "pgrelay_breaker_state",
        kind: Gauge,
        labels: &["region", "source"],
        help: "1 while the blast-radius breaker holds the source's changes (pgrelay breaker release|discard)",
    };
    BREAKER_TRIPS: Counter = Metric {
        name: "pgrelay_breaker_trips_total",
        kind: Counter,
        labels: &["region", "source", "table", "kind"],
        help: "Times the blast-radius breaker stopped a source",
    };
    BREAKER_DISCARDED: Counter = Metric {
        name: "pgrelay_breaker_discarded_total",
        kind: Counter,
        labels: &["region", "source"],
        help: "Changes parked by pgrelay breaker discard",
    };

    // -- DR vault ---------------------------------------------------------------

    DR_VAULT_RECORDS: Counter = Metric {
        name: "pgrelay_dr_vault_records_total",
        kind: Counter,
        labels: &["region", "home"],
        help: "Sealed DR copies stored in this region's vault",
    };
    DR_VAULT_REFUSED: Counter = Metric {
        name: "pgrelay_dr_vault_refused_total",
        kind: Counter,
        labels: &["region", "home", "reason"],
        help: "Records on a DR topic the vault refused (malformed, stamp out of range or too far \
               ahead): skipped, never stored",
    };

    // -- periodic verify --------------------------------------------------------

    VERIFY_DIFFERENCES: Gauge = Metric {
        name: "pgrelay_verify_differences",
        kind: Gauge,
        labels: &["region", "peer", "table", "kind"],
        help: "differences between the region and a peer found by the last periodic verify, by table and kind",
    };
    VERIFY_ERRORS: Counter = Metric {
        name: "pgrelay_verify_errors_total",
        kind: Counter,
        labels: &["region"],
        help: "periodic verify runs that failed",
    };
    VERIFY_LAST_RUN_TIMESTAMP: Gauge = Metric {
        name: "pgrelay_verify_last_run_timestamp_seconds",
        kind: Gauge,
        labels: &["region"],
        help: "when the last periodic verify finished (unix time)",
    };
    VERIFY_LAST_RUN_SECONDS: Gauge = Metric {
        name: "pgrelay_verify_last_run_seconds",
        kind: Gauge,
        labels: &["region"],
        help: "how long the last periodic verify took",
    };
}
