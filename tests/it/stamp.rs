//! The two stamp triggers, the C one (`extension/`) and the PL/pgSQL one,
//! against the clock's rules on the same server and sequence: random single
//! and multi-row writes, rows carrying stamps from the far future (as an
//! applied change leaves them), and a clock driven to its end. Each write's
//! stamp must be exactly what the rules allow between the clock readings
//! taken before and after it.

use pgrelay::hlc::{self, COUNTER_BITS, REGION_BITS};
use pgrelay::names::HLC_COLUMN;
use tokio_postgres::Client;

use crate::support::pg::{major, Pg};

const REGION: u8 = 5;
const TABLES: [(&str, &str); 2] = [("c_rows", "c"), ("p_rows", "plpgsql")];

/// The rows' stamps and the sequence's last value.
async fn stamps(c: &Client, table: &str) -> Vec<(i32, i64)> {
    c.query(
        &format!("SELECT id, {HLC_COLUMN} FROM {table} ORDER BY id"),
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

async fn sequence(c: &Client) -> i64 {
    c.query_one(
        "SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM pgrelay.hlc_logical",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

async fn wall_logical(c: &Client) -> i64 {
    let ms: i64 = c
        .query_one(
            "SELECT floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    ms << COUNTER_BITS
}

/// Sets a row's stamp as the apply side does: triggers off.
async fn forge(c: &Client, table: &str, id: i32, stamp: i64) {
    c.batch_execute(&format!(
        "SET session_replication_role = replica; \
         UPDATE {table} SET {HLC_COLUMN} = {stamp} WHERE id = {id}; \
         SET session_replication_role = origin"
    ))
    .await
    .unwrap();
}

async fn set_up(c: &Client) {
    c.batch_execute(&format!(
        "CREATE SCHEMA pgrelay; CREATE SEQUENCE pgrelay.hlc_logical; \
         CREATE EXTENSION pgrelay SCHEMA pgrelay; {plpgsql}; \
         CREATE TABLE c_rows (id int PRIMARY KEY, v int, {HLC_COLUMN} bigint); \
         CREATE TABLE p_rows (id int PRIMARY KEY, v int, {HLC_COLUMN} bigint); \
         {c_trigger}; {p_trigger}",
        plpgsql = hlc::sql_stamp_row_function(REGION, HLC_COLUMN),
        c_trigger = pgrelay::setup::stamp_trigger_sql("c_rows", pgrelay::setup::Stamp::C, REGION),
        p_trigger =
            pgrelay::setup::stamp_trigger_sql("p_rows", pgrelay::setup::Stamp::Plpgsql, REGION),
    ))
    .await
    .unwrap();
}

/// A small deterministic generator (xorshift), so a failure reruns the same.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_and_plpgsql_stamp_triggers_follow_the_same_clock_rules() {
    if major() != 15 {
        eprintln!(
            "SKIP c_and_plpgsql_stamp_triggers_follow_the_same_clock_rules: the pgrelay \
             extension is built for PostgreSQL 15 here"
        );
        return;
    }
    let pg = Pg::start();
    let c = pg.client().await;
    let available: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'pgrelay'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        available, 1,
        "the pgrelay extension is not installed: run scripts/install-deps.sh"
    );
    set_up(&c).await;
    // rows written before the column had stamps (a table set up with rows
    // in it): NULL, taken as no previous stamp
    for (table, kind) in TABLES {
        c.batch_execute(&format!(
            "SET session_replication_role = replica; \
             INSERT INTO {table} VALUES (100, 0); \
             SET session_replication_role = origin"
        ))
        .await
        .unwrap();
        let seq_before = sequence(&c).await;
        let wall_before = wall_logical(&c).await;
        let stamp: i64 = c
            .query_one(
                &format!("UPDATE {table} SET v = 1 WHERE id = 100 RETURNING {HLC_COLUMN}"),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        let wall_after = wall_logical(&c).await;
        let logical = hlc::logical(stamp as u64) as i64;
        assert_eq!(hlc::region_id(stamp as u64), REGION, "{kind}");
        assert!(
            logical > seq_before
                && logical >= wall_before
                && logical <= (seq_before + 1).max(wall_after + 1),
            "{kind}: a NULL stamp's update got logical {logical} (sequence {seq_before}, \
             wall {wall_before}..{wall_after})"
        );
        c.batch_execute(&format!("DELETE FROM {table} WHERE id = 100"))
            .await
            .unwrap();
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut checked = 0;
    let mut forged = 0;
    for step in 0..400 {
        let (table, kind) = TABLES[rng.below(2) as usize];
        let id = rng.below(20) as i32;
        // now and then a row carries a stamp from ahead of the clock, as an
        // applied change from a region whose clock runs ahead leaves it
        let current = stamps(&c, table).await;
        if let Some((_, p)) = current.iter().find(|(i, _)| *i == id) {
            if rng.below(8) == 0 {
                let ahead = hlc::logical(*p as u64) as i64 + 1 + rng.below(50) as i64 * 1024;
                forge(&c, table, id, (ahead << REGION_BITS) | 9).await;
                forged += 1;
            }
        }
        let before = stamps(&c, table).await;
        let multi = rng.below(6) == 0;
        let seq_before = sequence(&c).await;
        let wall_before = wall_logical(&c).await;
        let sql = if multi {
            format!("UPDATE {table} SET v = v + 1 WHERE id <= {id}")
        } else {
            format!(
                "INSERT INTO {table} VALUES ({id}, 0) ON CONFLICT (id) DO UPDATE SET v = {table}.v + 1"
            )
        };
        c.batch_execute(&sql).await.unwrap();
        let wall_after = wall_logical(&c).await;
        let seq_after = sequence(&c).await;
        let written: Vec<(i32, i64)> = stamps(&c, table)
            .await
            .into_iter()
            .filter(|(i, _)| if multi { *i <= id } else { *i == id })
            .collect();
        let old = |row: i32| {
            before
                .iter()
                .find(|(i, _)| *i == row)
                .map(|(_, s)| hlc::logical(*s as u64) as i64)
                .unwrap_or(0)
        };
        if written.is_empty() {
            assert_eq!(
                seq_after, seq_before,
                "{kind} step {step}: no row, yet the clock moved"
            );
            continue;
        }
        // an upsert of an existing row fires the insert trigger, then the
        // update trigger: two stamps taken, the second kept
        let n = if multi { written.len() as i64 } else { 2 };
        let highest_old = written.iter().map(|(r, _)| old(*r)).max().unwrap_or(0);
        let mut given = Vec::new();
        for (row, stamp) in &written {
            let stamp = *stamp as u64;
            assert_eq!(
                hlc::region_id(stamp),
                REGION,
                "{kind} step {step}: row {row}'s stamp names region {}",
                hlc::region_id(stamp)
            );
            let logical = hlc::logical(stamp) as i64;
            // above the row's own previous stamp, the sequence and the wall
            // clock before the write; no further than the clock allows
            let low = (old(*row) + 1).max(wall_before).max(seq_before + 1);
            let high = (highest_old + n).max(wall_after + n).max(seq_before + n);
            assert!(
                logical >= low && logical <= high,
                "{kind} step {step} ({sql}): row {row} logical {logical} outside [{low}, {high}] \
                 (previous {}, sequence {seq_before}, wall {wall_before}..{wall_after})",
                old(*row)
            );
            given.push(logical);
            checked += 1;
        }
        given.sort_unstable();
        given.dedup();
        assert_eq!(
            given.len(),
            written.len(),
            "{kind} step {step}: two rows share a stamp"
        );
        // the sequence holds the newest logical time given out
        assert_eq!(
            Some(&seq_after),
            given.last(),
            "{kind} step {step}: the sequence is not at the newest stamp"
        );
    }
    assert!(
        checked >= 400 && forged >= 10,
        "{checked} checked, {forged} forged"
    );

    // a row stamped at the clock's last logical time: both refuse with the
    // same error, and neither moves the sequence (setval outlives a rollback)
    let end = (1i64 << (63 - REGION_BITS)) - 1;
    for (table, kind) in TABLES {
        c.batch_execute(&format!(
            "INSERT INTO {table} VALUES (0, 0), (1, 0) ON CONFLICT DO NOTHING"
        ))
        .await
        .unwrap();
        forge(&c, table, 0, (end << REGION_BITS) | 9).await;
        let seq = sequence(&c).await;
        let err = c
            .execute(&format!("UPDATE {table} SET v = v + 1 WHERE id = 0"), &[])
            .await
            .expect_err("a stamp past the clock's range");
        let db = err.as_db_error().expect("a database error");
        assert_eq!(db.code().code(), "22000", "{kind}: {db:?}");
        assert!(
            db.message().contains("the region clock is exhausted"),
            "{kind}: {}",
            db.message()
        );
        assert!(
            sequence(&c).await <= seq + 1,
            "{kind}: the refused write moved the clock"
        );
        // the region keeps writing other rows
        c.execute(&format!("UPDATE {table} SET v = v + 1 WHERE id = 1"), &[])
            .await
            .unwrap_or_else(|e| panic!("{kind}: the clock is stuck after a refusal: {e}"));
    }
    eprintln!(
        "stamps: {checked} writes checked against the clock's rules, {forged} rows forged ahead"
    );
}
