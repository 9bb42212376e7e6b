//! Hybrid logical clock stamps.
//!
//! A stamp is one `i64`-compatible integer, comparable as a number:
//!
//! ```text
//!  63      62 ........ 16  15 ....... 6  5 ...... 0
//!  0 (sign) wall-clock ms   counter       region id
//!            (47 bits)      (10 bits)     (6 bits)
//! ```
//!
//! The upper 57 bits are the *logical time* (`wall_ms << 10 | counter`); the
//! region id in the low bits breaks ties, so two regions never produce equal
//! stamps. A new stamp for a row is always above both the clock's last
//! logical time and the row's previous stamp, so a write that follows a
//! replicated write wins over it whatever the wall clocks say.
//!
//! Stamps are made where the write happens, inside PostgreSQL, by the
//! functions that [`sql_stamp_row_function`] and [`sql_next_hlc_function`]
//! build (the row triggers `pgrelay setup` installs); the apply side advances the same clock
//! past every stamp it applies. This module holds the arithmetic, shared by
//! the SQL builder, the capture side and tests.

pub const REGION_BITS: u32 = 6;
pub const COUNTER_BITS: u32 = 10;
pub const MAX_REGION_ID: u8 = (1 << REGION_BITS) - 1;

/// Builds a stamp from its parts.
pub fn compose(wall_ms: u64, counter: u16, region_id: u8) -> u64 {
    debug_assert!(region_id <= MAX_REGION_ID);
    debug_assert!((counter as u64) < (1 << COUNTER_BITS));
    (((wall_ms << COUNTER_BITS) | counter as u64) << REGION_BITS) | region_id as u64
}

/// The logical time of a stamp (wall ms and counter, without the region).
pub fn logical(stamp: u64) -> u64 {
    stamp >> REGION_BITS
}

/// The wall-clock milliseconds of a stamp.
pub fn wall_ms(stamp: u64) -> u64 {
    stamp >> (REGION_BITS + COUNTER_BITS)
}

/// The id of the region that made the stamp.
pub fn region_id(stamp: u64) -> u8 {
    (stamp & ((1 << REGION_BITS) - 1)) as u8
}

/// Human-readable form: `wall_ms.counter@region`.
pub fn display(stamp: u64) -> String {
    format!(
        "{}.{}@{}",
        wall_ms(stamp),
        logical(stamp) & ((1 << COUNTER_BITS) - 1),
        region_id(stamp)
    )
}

/// How far (ms) a stamp is ahead of the given wall clock; negative if behind.
pub fn ahead_ms(stamp: u64, now_ms: u64) -> i64 {
    wall_ms(stamp) as i64 - now_ms as i64
}

/// An in-process HLC, for the stamps pgrelay makes itself (for example a
/// truncate, which has no row to carry one).
#[derive(Debug, Clone)]
pub struct Clock {
    region_id: u8,
    last_logical: u64,
}

impl Clock {
    pub fn new(region_id: u8) -> Self {
        Clock {
            region_id,
            last_logical: 0,
        }
    }

    /// A new stamp above every stamp made or observed so far and above
    /// `floor` (the previous stamp of the same row, or 0).
    pub fn tick(&mut self, now_ms: u64, floor: u64) -> u64 {
        let wall = now_ms << COUNTER_BITS;
        let next = wall.max(self.last_logical + 1).max(logical(floor) + 1);
        self.last_logical = next;
        (next << REGION_BITS) | self.region_id as u64
    }

    /// Advances the clock past a stamp received from elsewhere.
    pub fn observe(&mut self, stamp: u64) {
        self.last_logical = self.last_logical.max(logical(stamp));
    }
}

/// The PL/pgSQL statements that take the next stamp of the region's clock
/// into `stamp`, given `floor` (an expression: the logical time the stamp
/// must exceed, e.g. the row's previous stamp's). The logical time lives in
/// the sequence `pgrelay.hlc_logical` (non-transactional, so concurrent
/// writers never wait on each other); it is moved up to the wall clock and
/// past `floor`, then the region id is appended. Declares nothing: the
/// caller declares `l bigint` and `target bigint`.
fn sql_clock_body(region_id: u8, floor: &str, stamp: &str) -> String {
    format!(
        r#"    l := nextval('pgrelay.hlc_logical');
    target := greatest(
        (floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) << {cb},
        {floor} + 1);
    -- past the last logical time a stamp can hold: refuse rather than wrap,
    -- and before the sequence moves (setval outlives a rollback)
    IF greatest(l, target) >= (1::bigint << (63 - {rb})) THEN
        RAISE EXCEPTION 'pgrelay: the region clock is exhausted (logical time %)',
            greatest(l, target)
            USING ERRCODE = 'data_exception';
    END IF;
    IF l < target THEN
        PERFORM setval('pgrelay.hlc_logical', target);
        l := target;
    END IF;
    {stamp} := (l << {rb}) | {rid};"#,
        cb = COUNTER_BITS,
        rb = REGION_BITS,
        rid = region_id
    )
}

/// SQL for `pgrelay.next_hlc(prev bigint) returns bigint`, the region's
/// clock inside PostgreSQL: the next stamp above `prev` (a row's previous
/// stamp, or 0). Used by the delete and truncate triggers.
pub fn sql_next_hlc_function(region_id: u8) -> String {
    format!(
        "CREATE OR REPLACE FUNCTION pgrelay.next_hlc(prev bigint) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    l bigint;
    target bigint;
    stamp bigint;
BEGIN
{body}
    RETURN stamp;
END
$fn$",
        body = sql_clock_body(
            region_id,
            &format!("coalesce(prev >> {REGION_BITS}, 0)"),
            "stamp"
        )
    )
}

/// SQL for the trigger function `pgrelay.stamp_row()` on every replicated
/// table: stamps `NEW.{column}` on insert and update. The clock's body is
/// inlined rather than calling [`sql_next_hlc_function`]'s function: one
/// PL/pgSQL call per written row instead of two, on the path every write of
/// the application takes.
pub fn sql_stamp_row_function(region_id: u8, column: &str) -> String {
    format!(
        "CREATE OR REPLACE FUNCTION pgrelay.stamp_row() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE
    l bigint;
    target bigint;
    prev bigint := 0;
BEGIN
    IF TG_OP = 'UPDATE' THEN
        prev := coalesce(OLD.{column} >> {REGION_BITS}, 0);
    END IF;
{body}
    RETURN NEW;
END
$fn$",
        body = sql_clock_body(region_id, "prev", &format!("NEW.{column}"))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parts_round_trip() {
        let s = compose(1_700_000_000_123, 5, 3);
        assert_eq!(wall_ms(s), 1_700_000_000_123);
        assert_eq!(region_id(s), 3);
        assert_eq!(logical(s) & 1023, 5);
        assert!(s < i64::MAX as u64);
        assert_eq!(display(s), "1700000000123.5@3");
    }

    #[test]
    fn region_breaks_ties() {
        assert!(compose(10, 0, 2) > compose(10, 0, 1));
        assert!(compose(10, 1, 1) > compose(10, 0, 63));
        assert!(compose(11, 0, 1) > compose(10, 1023, 63));
    }

    #[test]
    fn write_after_replicated_write_wins_despite_slow_clock() {
        let mut eu = Clock::new(2);
        // a stamp from a region whose clock is 10 s ahead
        let remote = compose(1_000_010_000, 0, 1);
        let local = eu.tick(1_000_000_000, remote);
        assert!(local > remote);
        assert_eq!(region_id(local), 2);
    }

    proptest! {
        #[test]
        fn ticks_are_strictly_increasing(
            steps in proptest::collection::vec((0u64..1u64 << 40, any::<u64>(), any::<bool>()), 1..200)
        ) {
            let mut clock = Clock::new(7);
            let mut last = 0u64;
            for (now, floor, observe) in steps {
                let floor = floor >> 8;
                if observe {
                    clock.observe(floor);
                    continue;
                }
                let s = clock.tick(now, floor);
                prop_assert!(s > last);
                prop_assert!(logical(s) > logical(floor));
                prop_assert_eq!(region_id(s), 7);
                last = s;
            }
        }
    }
}
