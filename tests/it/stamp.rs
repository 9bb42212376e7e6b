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
        "{clock}; CREATE EXTENSION pgrelay SCHEMA pgrelay; {plpgsql}; \
         CREATE TABLE c_rows (id int PRIMARY KEY, v int, {HLC_COLUMN} bigint); \
         CREATE TABLE p_rows (id int PRIMARY KEY, v int, {HLC_COLUMN} bigint); \
         {c_trigger}; {p_trigger}",
        plpgsql = hlc::sql_stamp_row_function(REGION, HLC_COLUMN),
        clock = pgrelay::setup::clock_sql(REGION).join("; "),
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
        let logical = hlc::Hlc::new(stamp as u64).logical() as i64;
        assert_eq!(hlc::Hlc::new(stamp as u64).region_id(), REGION, "{kind}");
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
                let ahead =
                    hlc::Hlc::new(*p as u64).logical() as i64 + 1 + rng.below(50) as i64 * 1024;
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
                .map(|(_, s)| hlc::Hlc::new(*s as u64).logical() as i64)
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
                hlc::Hlc::new(stamp).region_id(),
                REGION,
                "{kind} step {step}: row {row}'s stamp names region {}",
                hlc::Hlc::new(stamp).region_id()
            );
            let logical = hlc::Hlc::new(stamp).logical() as i64;
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

/// One committed write: which row, its place in that row's history (the
/// row's counter `v`, moved under the row's lock, so commit order) and the
/// stamp it got.
struct Written {
    table: &'static str,
    id: i32,
    order: i32,
    stamp: i64,
}

/// Concurrent sessions racing at millisecond boundaries: writers of both
/// trigger kinds on shared and own rows (single and multi-row statements),
/// sessions taking stamps as the delete and truncate triggers do, and
/// apply-style clock advances just ahead of the wall clock, all on one
/// region's clock. No two committed stamps may be equal, and each row's
/// stamps must increase in commit order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_stamps_never_repeat_and_increase_per_row() {
    if major() != 15 {
        eprintln!(
            "SKIP concurrent_stamps_never_repeat_and_increase_per_row: the pgrelay extension is \
             built for PostgreSQL 15 here"
        );
        return;
    }
    const WRITERS: u64 = 6;
    const SHARED: i32 = 4;
    let pg = Pg::start();
    let c = pg.client().await;
    set_up(&c).await;
    for (table, _) in TABLES {
        c.batch_execute(&format!(
            "INSERT INTO {table} SELECT g, 0 FROM generate_series(1, {SHARED}) g"
        ))
        .await
        .unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(4);
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let client = pg.client().await;
        writers.push(tokio::spawn(async move {
            let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ (w + 1));
            let mut out = Vec::new();
            let mut own = Vec::new();
            let mut next_id = 1_000_000 * (w as i32 + 1);
            while std::time::Instant::now() < deadline {
                let (table, _) = TABLES[rng.below(2) as usize];
                match rng.below(5) {
                    0 | 1 => {
                        let id = 1 + rng.below(SHARED as u64) as i32;
                        let row = client
                            .query_one(
                                &format!(
                                    "UPDATE {table} SET v = v + 1 WHERE id = $1 \
                                     RETURNING v, {HLC_COLUMN}"
                                ),
                                &[&id],
                            )
                            .await
                            .unwrap();
                        out.push(Written {
                            table,
                            id,
                            order: row.get(0),
                            stamp: row.get(1),
                        });
                    }
                    2 => {
                        let ids: Vec<i32> = (0..3).map(|i| next_id + i).collect();
                        next_id += 3;
                        let rows = client
                            .query(
                                &format!(
                                    "INSERT INTO {table} SELECT unnest($1::int[]), 0 \
                                     RETURNING id, {HLC_COLUMN}"
                                ),
                                &[&ids],
                            )
                            .await
                            .unwrap();
                        for row in rows {
                            let id: i32 = row.get(0);
                            own.push((table, id));
                            out.push(Written {
                                table,
                                id,
                                order: 0,
                                stamp: row.get(1),
                            });
                        }
                    }
                    3 if !own.is_empty() => {
                        let (table, id) = own[rng.below(own.len() as u64) as usize];
                        let row = client
                            .query_one(
                                &format!(
                                    "UPDATE {table} SET v = v + 1 WHERE id = $1 \
                                     RETURNING v, {HLC_COLUMN}"
                                ),
                                &[&id],
                            )
                            .await
                            .unwrap();
                        out.push(Written {
                            table,
                            id,
                            order: row.get(0),
                            stamp: row.get(1),
                        });
                    }
                    _ => {
                        // as the delete and truncate triggers take theirs
                        let stamp: i64 = client
                            .query_one("SELECT pgrelay.next_hlc(0)", &[])
                            .await
                            .unwrap()
                            .get(0);
                        out.push(Written {
                            table: "next_hlc",
                            id: 0,
                            order: 0,
                            stamp,
                        });
                    }
                }
            }
            out
        }));
    }
    // the apply side's clock advance, past stamps from a region whose clock
    // runs up to a millisecond ahead
    let observer = pg.client().await;
    let observing = tokio::spawn(async move {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut advances = 0;
        while std::time::Instant::now() < deadline {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as i64;
            let logical = ((now_ms + rng.below(2) as i64) << COUNTER_BITS) + rng.below(8) as i64;
            observer
                .execute(pgrelay::hlc::OBSERVE_SQL, &[&logical.to_string()])
                .await
                .unwrap();
            advances += 1;
        }
        advances
    });
    let mut all = Vec::new();
    for w in writers {
        all.extend(w.await.unwrap());
    }
    let advances = observing.await.unwrap();

    let mut stamps: Vec<i64> = all.iter().map(|w| w.stamp).collect();
    stamps.sort_unstable();
    let repeated: Vec<i64> = stamps
        .windows(2)
        .filter(|p| p[0] == p[1])
        .map(|p| p[0])
        .collect();
    assert!(
        repeated.is_empty(),
        "{} of {} committed stamps repeat one another, e.g. {}",
        repeated.len(),
        stamps.len(),
        hlc::Hlc::new(repeated[0] as u64).readable()
    );
    for w in &all {
        assert_eq!(
            hlc::Hlc::new(w.stamp as u64).region_id(),
            REGION,
            "{}",
            w.table
        );
    }
    let mut rows: std::collections::BTreeMap<(&str, i32), Vec<(i32, i64)>> = Default::default();
    for w in all.iter().filter(|w| w.table != "next_hlc") {
        rows.entry((w.table, w.id))
            .or_default()
            .push((w.order, w.stamp));
    }
    let mut backwards = Vec::new();
    for ((table, id), mut history) in rows {
        history.sort_unstable();
        for p in history.windows(2) {
            if p[1].1 <= p[0].1 {
                backwards.push(format!(
                    "{table} row {id}: write {} stamped {} after write {} stamped {}",
                    p[1].0,
                    hlc::Hlc::new(p[1].1 as u64).readable(),
                    p[0].0,
                    hlc::Hlc::new(p[0].1 as u64).readable()
                ));
            }
        }
    }
    assert!(
        backwards.is_empty(),
        "stamps went backwards in commit order:\n{}",
        backwards.join("\n")
    );
    eprintln!(
        "stamps: {} concurrent writes and {advances} clock advances, no stamp repeated",
        stamps.len()
    );
}

/// Both triggers serve a writer holding nothing of pgrelay's (not even
/// USAGE on the schema): the C one reads and moves the clock as the
/// sequence's owner, the PL/pgSQL one is SECURITY DEFINER; both take the
/// locked advance for a row stamped ahead of the clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_stamp_triggers_serve_a_writer_with_no_grant_on_pgrelay() {
    if major() != 15 {
        eprintln!(
            "SKIP both_stamp_triggers_serve_a_writer_with_no_grant_on_pgrelay: the pgrelay \
             extension is built for PostgreSQL 15 here"
        );
        return;
    }
    let pg = Pg::start();
    let c = pg.client().await;
    set_up(&c).await;
    c.batch_execute(&format!(
        "CREATE ROLE app_writer LOGIN PASSWORD '{}'; \
         GRANT SELECT, INSERT, UPDATE, DELETE ON c_rows, p_rows TO app_writer",
        crate::support::pg::PASSWORD
    ))
    .await
    .unwrap();
    let (app, conn) = tokio_postgres::connect(
        &pg.dsn().replacen("user=postgres ", "user=app_writer ", 1),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    for (table, kind) in TABLES {
        app.batch_execute(&format!(
            "INSERT INTO {table} VALUES (1, 0), (2, 0); UPDATE {table} SET v = 1 WHERE id = 1"
        ))
        .await
        .unwrap_or_else(|e| panic!("{kind}: {e}"));
        // a row stamped a minute ahead: its update takes the locked advance
        let ahead = (wall_logical(&c).await + (60_000 << COUNTER_BITS)) << REGION_BITS | 9;
        forge(&c, table, 2, ahead).await;
        let stamp: i64 = app
            .query_one(
                &format!("UPDATE {table} SET v = 2 WHERE id = 2 RETURNING {HLC_COLUMN}"),
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("{kind}: {e}"))
            .get(0);
        assert_eq!(
            hlc::Hlc::new(stamp as u64).logical(),
            hlc::Hlc::new(ahead as u64).logical() + 1,
            "{kind}"
        );
        assert_eq!(
            sequence(&c).await,
            hlc::Hlc::new(stamp as u64).logical() as i64,
            "{kind}"
        );
        let denied = app
            .batch_execute("SELECT setval('pgrelay.hlc_logical', 1)")
            .await
            .expect_err("the writer moved the clock");
        assert_eq!(denied.code().map(|c| c.code()), Some("42501"), "{denied}");
    }
}

/// CPU time (user + system, `/proc`, 10 ms ticks) a backend has used, in ms.
fn backend_cpu_ms(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // the fields after the command name, which is in parentheses
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .collect();
    (fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()) * 10
}

/// What pgrelay's triggers cost a writing backend, per written row, with the
/// C and with the PL/pgSQL triggers: the backend's CPU time for `N` single-row
/// INSERT statements, `N` single-row UPDATE statements and one `N`-row
/// INSERT ... SELECT into a table set up by `setup`'s statements, less the
/// same into a table without triggers. Run with
/// `cargo nextest run --test it --run-ignored only bench_trigger --no-capture`
/// (`PGRELAY_BENCH_ROWS`, default 100,000).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_trigger_cpu_per_row() {
    let n: i64 = std::env::var("PGRELAY_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let kinds: &[pgrelay::setup::Stamp] = if major() == 15 {
        &[pgrelay::setup::Stamp::C, pgrelay::setup::Stamp::Plpgsql]
    } else {
        &[pgrelay::setup::Stamp::Plpgsql]
    };
    for &kind in kinds {
        let pg = Pg::start();
        let c = pg.client().await;
        c.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v int); CREATE TABLE b (id int PRIMARY KEY, v int)")
            .await
            .unwrap();
        if kind == pgrelay::setup::Stamp::C {
            c.batch_execute(pgrelay::setup::CREATE_EXTENSION_SQL)
                .await
                .unwrap();
        }
        let config = pgrelay::config::parse(
            "[kafka]\nbrokers = \"127.0.0.1:1\"\n[regions.us]\nid = 1\ndsn = \"host=a\"\n\
             [regions.eu]\nid = 2\ndsn = \"host=b\"\n[[tables]]\nname = \"public.t\"\n\
             class = \"global\"\n",
            "bench.toml",
        )
        .unwrap();
        for sql in pgrelay::setup::plan(
            &config,
            "us",
            &|_| vec!["id".to_string()],
            kind,
            &Default::default(),
        ) {
            c.batch_execute(&sql).await.unwrap();
        }
        let pid: i32 = c
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        let mut cost = Vec::new();
        for table in ["b", "t"] {
            let run = |sql: String| {
                let c = &c;
                async move {
                    let before = backend_cpu_ms(pid);
                    c.batch_execute(&sql).await.unwrap();
                    backend_cpu_ms(pid) - before
                }
            };
            c.batch_execute(&format!("TRUNCATE {table}")).await.unwrap();
            let inserts = run(format!(
                "DO $$ BEGIN FOR i IN 1..{n} LOOP INSERT INTO {table} VALUES (i, 0); END LOOP; END $$"
            ))
            .await;
            let updates = run(format!(
                "DO $$ BEGIN FOR i IN 1..{n} LOOP UPDATE {table} SET v = v + 1 WHERE id = i; END LOOP; END $$"
            ))
            .await;
            c.batch_execute(&format!("TRUNCATE {table}")).await.unwrap();
            let bulk = run(format!(
                "INSERT INTO {table} SELECT g, 0 FROM generate_series(1, {n}) g"
            ))
            .await;
            cost.push([inserts, updates, bulk]);
        }
        let per_row = |i: usize| (cost[1][i] as f64 - cost[0][i] as f64) * 1000.0 / n as f64;
        eprintln!(
            "triggers {kind:?} (PostgreSQL {}): µs of backend CPU per row above a table without \
             triggers: single-row INSERT {:.1}, single-row UPDATE {:.1}, bulk INSERT {:.1} \
             ({n} rows each)",
            major(),
            per_row(0),
            per_row(1),
            per_row(2)
        );
    }
}
