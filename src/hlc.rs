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

/// A stamp. Ordered as its number, and never above `i64::MAX`: it is a
/// PostgreSQL `bigint` in the database ([`Hlc::from_sql`], [`Hlc::to_sql`])
/// and decimal text in records and headers ([`Display`](std::fmt::Display),
/// [`FromStr`](std::str::FromStr)).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(transparent)]
pub struct Hlc(u64);

impl Hlc {
    /// Older than any write (rows from before `setup`).
    pub const ZERO: Hlc = Hlc(0);

    /// A stamp from its number as records carry it.
    pub const fn new(raw: u64) -> Hlc {
        Hlc(raw)
    }

    /// Builds a stamp from its parts.
    pub fn compose(wall_ms: u64, counter: u16, region_id: u8) -> Hlc {
        debug_assert!(region_id <= MAX_REGION_ID);
        debug_assert!((counter as u64) < (1 << COUNTER_BITS));
        Hlc((((wall_ms << COUNTER_BITS) | counter as u64) << REGION_BITS) | region_id as u64)
    }

    /// A stamp read from a `bigint` column (a negative one, which no clock
    /// makes, reads as [`Hlc::ZERO`]).
    pub fn from_sql(value: i64) -> Hlc {
        Hlc(value.max(0) as u64)
    }

    /// The stamp as a `bigint`.
    pub fn to_sql(self) -> i64 {
        self.0 as i64
    }

    /// The stamp's number.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The logical time (wall ms and counter, without the region).
    pub fn logical(self) -> u64 {
        self.0 >> REGION_BITS
    }

    /// The wall-clock milliseconds.
    pub fn wall_ms(self) -> u64 {
        self.0 >> (REGION_BITS + COUNTER_BITS)
    }

    /// The id of the region that made the stamp.
    pub fn region_id(self) -> u8 {
        (self.0 & ((1 << REGION_BITS) - 1)) as u8
    }

    /// Human-readable form: `wall_ms.counter@region`.
    pub fn readable(self) -> String {
        format!(
            "{}.{}@{}",
            self.wall_ms(),
            self.logical() & ((1 << COUNTER_BITS) - 1),
            self.region_id()
        )
    }

    /// How far (ms) the stamp is ahead of the given wall clock; negative if
    /// behind.
    pub fn ahead_ms(self, now_ms: u64) -> i64 {
        self.wall_ms() as i64 - now_ms as i64
    }
}

impl std::fmt::Display for Hlc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::str::FromStr for Hlc {
    type Err = std::num::ParseIntError;

    fn from_str(s: &str) -> Result<Hlc, Self::Err> {
        s.parse().map(Hlc)
    }
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
    pub fn tick(&mut self, now_ms: u64, floor: Hlc) -> Hlc {
        let wall = now_ms << COUNTER_BITS;
        let next = wall.max(self.last_logical + 1).max(floor.logical() + 1);
        self.last_logical = next;
        Hlc((next << REGION_BITS) | self.region_id as u64)
    }

    /// Advances the clock past a stamp received from elsewhere.
    pub fn observe(&mut self, stamp: Hlc) {
        self.last_logical = self.last_logical.max(stamp.logical());
    }
}

/// The sequence holding the region's logical time (the last one given out).
pub const SEQUENCE: &str = "pgrelay.hlc_logical";

/// A sequence counting the clock's locked advances, twice each: odd while
/// one is under way. A stamp taken while it moved is retaken under the lock
/// (see [`sql_clock_functions`]).
pub const GENERATION: &str = "pgrelay.hlc_gen";

/// The session-level advisory lock (class, id) that serializes the clock's
/// advances. The class is the apply side's (its key-bucket locks take ids
/// 0 to 255); the id is none of theirs.
pub const LOCK: (i32, i32) = (1_885_828_709, -1);

/// The first logical time a stamp cannot hold (63 bits less the region's).
const LIMIT: &str = "(1::bigint << 57)";

/// The statement that advances the region's clock past a stamp applied
/// from another region (`$1`, text: the stamp's logical time): the receive
/// rule of the clock, run by the apply side in each batch's transaction
/// (the run role may execute `pgrelay.observe_hlc`, nothing else of the
/// clock).
pub const OBSERVE_SQL: &str = "SELECT pgrelay.observe_hlc($1::text::bigint)";

/// The raise statement of a clock at its end, for the logical time `value`.
fn sql_exhausted(value: &str) -> String {
    format!(
        "RAISE EXCEPTION 'pgrelay: the region clock is exhausted (logical time %)', {value}
            USING ERRCODE = 'data_exception';"
    )
}

/// The PL/pgSQL statements that take the next logical time of the region's
/// clock into `l`, at or above `target` (an expression). The fast path
/// takes no lock: one `nextval`, kept when it reached `target` and no
/// locked advance ran meanwhile (the generation read before and after is
/// the same and even). Otherwise the locked advance gives it
/// (`pgrelay.advance_hlc`). A time past what a stamp can hold is refused
/// before the sequence is set (`setval` outlives a rollback). Declares
/// nothing: the caller declares `g`, `l` and `t` bigint.
fn sql_clock_take(target: &str) -> String {
    format!(
        r#"    g := coalesce(pg_catalog.pg_sequence_last_value('{GENERATION}'::pg_catalog.regclass), 0);
    l := pg_catalog.nextval('{SEQUENCE}'::pg_catalog.regclass);
    t := {target};
    IF greatest(l, t) >= {LIMIT} THEN
        {exhausted}
    END IF;
    IF l < t OR g % 2 = 1
        OR g <> coalesce(pg_catalog.pg_sequence_last_value('{GENERATION}'::pg_catalog.regclass), 0) THEN
        l := pgrelay.advance_hlc(t);
    END IF;"#,
        exhausted = sql_exhausted("greatest(l, t)"),
    )
}

/// The wall clock as a logical time (milliseconds since the Unix epoch,
/// floored, shifted past the counter).
fn sql_wall() -> String {
    format!(
        "(floor(extract(epoch FROM pg_catalog.clock_timestamp()) * 1000)::bigint << {COUNTER_BITS})"
    )
}

/// The clock's functions in schema `pgrelay`, each `SECURITY DEFINER`
/// (pgrelay's own rights: no application role holds any on the sequences)
/// with its `search_path` pinned, and callable by nobody else unless
/// granted (`pgrelay.observe_hlc` to the run role, [`crate::privileges`]):
///
/// - `advance_hlc(target)`: the locked advance. Under a session-level
///   advisory lock ([`LOCK`]), the generation made odd, the sequence set to
///   `target` if it is below, the next value taken, the generation made
///   even. Every logical time comes from a `nextval`, so none is given
///   twice, and the sequence never moves back: a `setval` could only undo
///   `nextval`s made while the generation was odd, and those are retaken
///   here. The lock is let go on any error or cancel (a session lock would
///   outlive it); one interrupted after making the generation odd leaves
///   fast paths to this function until the next advance evens it.
/// - `next_hlc(prev)`: a stamp above `prev` (a row's previous stamp, or
///   0), for the delete, key-move and truncate triggers.
/// - `observe_hlc(logical)`: the clock at or past `logical`, the apply
///   side's receive rule ([`OBSERVE_SQL`]).
pub fn sql_clock_functions(region_id: u8) -> Vec<String> {
    let (class, id) = LOCK;
    let settings = crate::names::DEFINER;
    let advance = format!(
        r#"CREATE OR REPLACE FUNCTION pgrelay.advance_hlc(target bigint) RETURNS bigint
LANGUAGE plpgsql VOLATILE {settings} AS $fn$
DECLARE
    l bigint;
    last bigint;
BEGIN
    IF target >= {LIMIT} THEN
        {exhausted_target}
    END IF;
    BEGIN
        PERFORM pg_catalog.pg_advisory_lock({class}, {id});
        IF pg_catalog.nextval('{GENERATION}'::pg_catalog.regclass) % 2 = 0 THEN
            PERFORM pg_catalog.nextval('{GENERATION}'::pg_catalog.regclass);
        END IF;
        SELECT CASE WHEN s.is_called THEN s.last_value ELSE s.last_value - 1 END INTO last
            FROM {SEQUENCE} s;
        IF last < target THEN
            PERFORM pg_catalog.setval('{SEQUENCE}'::pg_catalog.regclass, target, false);
        END IF;
        l := pg_catalog.nextval('{SEQUENCE}'::pg_catalog.regclass);
        PERFORM pg_catalog.nextval('{GENERATION}'::pg_catalog.regclass);
        PERFORM pg_catalog.pg_advisory_unlock({class}, {id});
    EXCEPTION WHEN query_canceled OR others THEN
        IF EXISTS (SELECT 1 FROM pg_catalog.pg_locks k
                   WHERE k.locktype = 'advisory' AND k.pid = pg_catalog.pg_backend_pid()
                     AND k.classid = {class}::oid AND k.objid = {id_oid}::oid
                     AND k.objsubid = 2 AND k.granted) THEN
            IF coalesce(pg_catalog.pg_sequence_last_value('{GENERATION}'::pg_catalog.regclass), 0) % 2 = 1 THEN
                PERFORM pg_catalog.nextval('{GENERATION}'::pg_catalog.regclass);
            END IF;
            PERFORM pg_catalog.pg_advisory_unlock({class}, {id});
        END IF;
        RAISE;
    END;
    IF l >= {LIMIT} THEN
        {exhausted_l}
    END IF;
    RETURN l;
END
$fn$"#,
        exhausted_target = sql_exhausted("target"),
        exhausted_l = sql_exhausted("l"),
        id_oid = id as u32,
    );
    let next = format!(
        r#"CREATE OR REPLACE FUNCTION pgrelay.next_hlc(prev bigint) RETURNS bigint
LANGUAGE plpgsql VOLATILE {settings} AS $fn$
DECLARE
    g bigint;
    l bigint;
    t bigint;
BEGIN
{take}
    RETURN (l << {REGION_BITS}) | {region_id};
END
$fn$"#,
        take = sql_clock_take(&format!(
            "greatest({wall}, coalesce(prev >> {REGION_BITS}, 0) + 1)",
            wall = sql_wall()
        )),
    );
    let observe = format!(
        r#"CREATE OR REPLACE FUNCTION pgrelay.observe_hlc(logical bigint) RETURNS void
LANGUAGE plpgsql VOLATILE {settings} AS $fn$
DECLARE
    g bigint;
    l bigint;
    t bigint;
BEGIN
{take}
END
$fn$"#,
        take = sql_clock_take("logical"),
    );
    vec![
        advance,
        next,
        observe,
        "REVOKE ALL ON FUNCTION pgrelay.advance_hlc(bigint), pgrelay.next_hlc(bigint), \
         pgrelay.observe_hlc(bigint) FROM PUBLIC"
            .to_string(),
    ]
}

/// SQL for the trigger function `pgrelay.stamp_row()` on every replicated
/// table: stamps `NEW.{column}` on insert and update, above the row's
/// previous stamp. The clock's fast path is inlined rather than calling
/// `pgrelay.next_hlc`: one PL/pgSQL call per written row instead of two,
/// on the path every write of the application takes. `SECURITY DEFINER`,
/// like every pgrelay trigger function: writers need nothing of pgrelay's.
pub fn sql_stamp_row_function(region_id: u8, column: &str) -> String {
    format!(
        "CREATE OR REPLACE FUNCTION pgrelay.stamp_row() RETURNS trigger LANGUAGE plpgsql \
         {definer} AS $fn$
DECLARE
    g bigint;
    l bigint;
    t bigint;
    prev bigint := 0;
BEGIN
    IF TG_OP = 'UPDATE' THEN
        prev := coalesce(OLD.{column} >> {REGION_BITS}, 0);
    END IF;
{take}
    NEW.{column} := (l << {REGION_BITS}) | {region_id};
    RETURN NEW;
END
$fn$",
        take = sql_clock_take(&format!("greatest({}, prev + 1)", sql_wall())),
        definer = crate::names::DEFINER,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parts_round_trip() {
        let s = Hlc::compose(1_700_000_000_123, 5, 3);
        assert_eq!(s.wall_ms(), 1_700_000_000_123);
        assert_eq!(s.region_id(), 3);
        assert_eq!(s.logical() & 1023, 5);
        assert!(s.get() < i64::MAX as u64);
        assert_eq!(s.readable(), "1700000000123.5@3");
        assert_eq!(Hlc::from_sql(s.to_sql()), s);
        assert_eq!(s.to_string().parse::<Hlc>(), Ok(s));
        assert_eq!(Hlc::from_sql(-1), Hlc::ZERO);
    }

    #[test]
    fn region_breaks_ties() {
        assert!(Hlc::compose(10, 0, 2) > Hlc::compose(10, 0, 1));
        assert!(Hlc::compose(10, 1, 1) > Hlc::compose(10, 0, 63));
        assert!(Hlc::compose(11, 0, 1) > Hlc::compose(10, 1023, 63));
    }

    #[test]
    fn write_after_replicated_write_wins_despite_slow_clock() {
        let mut eu = Clock::new(2);
        // a stamp from a region whose clock is 10 s ahead
        let remote = Hlc::compose(1_000_010_000, 0, 1);
        let local = eu.tick(1_000_000_000, remote);
        assert!(local > remote);
        assert_eq!(local.region_id(), 2);
    }

    proptest! {
        #[test]
        fn ticks_are_strictly_increasing(
            steps in proptest::collection::vec((0u64..1u64 << 40, any::<u64>(), any::<bool>()), 1..200)
        ) {
            let mut clock = Clock::new(7);
            let mut last = Hlc::ZERO;
            for (now, floor, observe) in steps {
                let floor = Hlc::new(floor >> 8);
                if observe {
                    clock.observe(floor);
                    continue;
                }
                let s = clock.tick(now, floor);
                prop_assert!(s > last);
                prop_assert!(s.logical() > floor.logical());
                prop_assert_eq!(s.region_id(), 7);
                last = s;
            }
        }
    }
}
