//! A rolling upgrade as docs/operations.md#upgrades tells an operator to
//! run it. Three regions set up and run by an older pgrelay
//! (`PGRELAY_UPGRADE_FROM_BIN`; scripts/upgrade-test.sh builds one from a
//! git revision), every region writing without pause; then one region at a
//! time: SIGTERM its sidecar, `setup` and `check` with the binary under
//! test, start it, wait until `status` shows the region's pairs active.
//! While old and new sidecars run side by side, changes must flow both
//! ways between them, and the demo's residency classes and column rules
//! (sidecar.rs) must hold whichever release sent a row; at the end every
//! region holds the same rows, each counter holds every increment committed
//! anywhere, nothing was parked and `verify` finds no difference.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::sidecar::{
    assert_global, assert_residency, identical, orders_settled, rows, workload, World, WriteLog,
    REGIONS,
};
use crate::support::eventually;
use crate::support::kafka::read_records;
use crate::support::relay::{self, Relay};

/// Next to the demo's tables (demo/schema.sql, sidecar.rs's config).
const SCHEMA: &str = "
CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, price numeric(10,2) NOT NULL, note text);
CREATE TABLE stock (id int PRIMARY KEY, n bigint NOT NULL DEFAULT 0, label text);
";

/// Keys every region's writer picks from (so the regions contend for them).
const ITEM_KEYS: i64 = 60;
/// Counter rows, written in us before the writers start.
const STOCK_ROWS: i32 = 4;
/// Marker rows of the mixed phase: above every writer's key.
const MARKER_BASE: i32 = 100_000;

/// The release to upgrade from, or why the test does not run.
fn old_binary() -> Option<PathBuf> {
    let Some(bin) = std::env::var_os("PGRELAY_UPGRADE_FROM_BIN") else {
        eprintln!("SKIP: set PGRELAY_UPGRADE_FROM_BIN (scripts/upgrade-test.sh builds one)");
        return None;
    };
    let bin = PathBuf::from(bin);
    assert!(
        bin.is_file(),
        "PGRELAY_UPGRADE_FROM_BIN={} is not a file",
        bin.display()
    );
    Some(bin)
}

/// The tables of [`SCHEMA`] in the config.
const TABLES: &str = r#"
[[tables]]
name = "public.items"
class = "global"

[[tables]]
name = "public.stock"
class = "global"
[[tables.columns]]
name = "n"
merge = "counter"
"#;

/// Three regions with the demo's tables and rules (sidecar.rs) and those
/// of [`SCHEMA`], set up by `bin`; no sidecar runs yet.
fn world(bin: &Path) -> World {
    World::start_with(false, SCHEMA, TABLES, bin)
}

/// sidecar.rs's mixed workload (every data class and column rule), `n`
/// rounds in every region at once, added to `logs`. Every round is
/// idempotent, so a later call repeats earlier rows harmlessly.
async fn demo_round(w: &World, n: i64, logs: &mut BTreeMap<&'static str, WriteLog>) {
    let tasks: Vec<_> = REGIONS
        .iter()
        .map(|r| (*r, tokio::spawn(workload(r, w.pg[r].dsn(), n))))
        .collect();
    for (r, t) in tasks {
        let done = t.await.unwrap();
        let log = logs.entry(r).or_default();
        log.products.extend(done.products);
        log.orders.extend(done.orders);
        log.users.extend(done.users);
    }
}

/// What one region's writer committed.
#[derive(Debug, Default)]
struct Written {
    transactions: u64,
    deletes: u64,
    /// stock id -> the sum of the increments committed
    increments: BTreeMap<i32, i64>,
}

/// Writes in `region` until `stop`: each transaction inserts, updates or
/// deletes one item and increments one counter, now and then relabels a
/// counter row (last writer wins on its other columns). A transaction the
/// database refuses for contention (a deadlock with the apply side, a lock
/// timeout) is retried and counted once it commits.
async fn writer(region: &'static str, dsn: String, stop: Arc<AtomicBool>) -> Written {
    let (mut c, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut rng = match region {
        "us" => 0x9e37_79b9_7f4a_7c15u64,
        "eu" => 0xc2b2_ae3d_27d4_eb4f,
        _ => 0x1656_67b1_9e37_79f9,
    };
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut out = Written::default();
    let mut i = 0i64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let id = (next() % ITEM_KEYS as u64) as i32 + 1;
        let choice = next() % 10;
        let stock = (next() % STOCK_ROWS as u64) as i32 + 1;
        let by = (next() % 5) as i64 + 1;
        let name = format!("{region}-{i}");
        let attempt = async {
            let tx = c.transaction().await?;
            match choice {
                0..=4 => {
                    tx.execute(
                        "INSERT INTO items VALUES ($1, $2, 1, $3) ON CONFLICT (id) DO UPDATE \
                         SET name = EXCLUDED.name, price = items.price + 1",
                        &[&id, &name, &region],
                    )
                    .await?;
                }
                5..=7 => {
                    tx.execute(
                        "UPDATE items SET note = $2, price = price + 0.25 WHERE id = $1",
                        &[&id, &name],
                    )
                    .await?;
                }
                _ => {
                    tx.execute("DELETE FROM items WHERE id = $1", &[&id])
                        .await?;
                }
            }
            tx.execute("UPDATE stock SET n = n + $2 WHERE id = $1", &[&stock, &by])
                .await?;
            if i % 25 == 0 {
                tx.execute(
                    "UPDATE stock SET label = $2 WHERE id = $1",
                    &[&stock, &name],
                )
                .await?;
            }
            tx.commit().await
        };
        match attempt.await {
            Ok(()) => {
                out.transactions += 1;
                out.deletes += u64::from(choice >= 8);
                *out.increments.entry(stock).or_default() += by;
            }
            Err(e) => {
                let code = e.code().map(|c| c.code().to_string()).unwrap_or_default();
                // 40P01 deadlock, 40001 serialization, 55P03 lock timeout
                assert!(
                    code.starts_with("40") || code == "55P03",
                    "{region} writer: {e:?}"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    out
}

/// `pgrelay status --json` by the binary under test: the pairs.
fn status(w: &World) -> Vec<serde_json::Value> {
    let out = relay::cmd(&["status", "--config", w.cfg_path("us"), "--json"]);
    let text = String::from_utf8_lossy(&out.stdout);
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(serde_json::Value::Array(pairs)) => pairs,
        _ => panic!(
            "status --json printed no pairs:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Waits until `status` shows every pair from or to `region` active.
async fn pairs_active(w: &World, region: &str, sidecar: &Relay) {
    let start = Instant::now();
    loop {
        let pairs = status(w);
        let mine: Vec<&serde_json::Value> = pairs
            .iter()
            .filter(|p| p["source"] == region || p["destination"] == region)
            .collect();
        if mine.len() == 4 && mine.iter().all(|p| p["state"] == "active") {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "{region}'s pairs not all active after {:?}:\n{}\n{region}'s sidecar:\n{}",
            start.elapsed(),
            serde_json::to_string_pretty(&mine).unwrap(),
            tail(&sidecar.log_text(), 40)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Writes marker row `id` in `from` and waits until each of `to` holds it.
async fn marker_arrives(w: &World, id: i32, from: &str, to: &[&str]) {
    w.pg[from].psql(&format!(
        "INSERT INTO items VALUES ({id}, 'marker from {from}', 1, NULL)"
    ));
    for r in to {
        eventually(
            Duration::from_secs(90),
            &format!("marker {id} written in {from} to reach {r}"),
            || async {
                let found =
                    rows(&w.pg[r], &format!("SELECT name FROM items WHERE id = {id}")).await;
                (!found.is_empty()).then_some(())
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_upgrade_while_every_region_writes_loses_nothing() {
    let Some(old) = old_binary() else {
        return;
    };
    let started = Instant::now();
    let w = world(&old);
    let mut sidecars: BTreeMap<&str, Relay> = REGIONS
        .iter()
        .map(|r| (*r, Relay::spawn_with(&old, &w.cfg[r], r, "all")))
        .collect();
    let values: Vec<String> = (1..=STOCK_ROWS)
        .map(|id| format!("({id}, 0, 'start')"))
        .collect();
    w.pg["us"].psql(&format!("INSERT INTO stock VALUES {}", values.join(", ")));
    identical(
        &w,
        "SELECT id, n, label FROM stock ORDER BY id",
        Duration::from_secs(90),
    )
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = REGIONS
        .iter()
        .map(|r| tokio::spawn(writer(r, w.pg[r].dsn(), stop.clone())))
        .collect();
    // the old release replicates the writes before anything changes
    eventually(
        Duration::from_secs(60),
        "writes of every region replicated by the old release",
        || async {
            for r in REGIONS {
                let n = rows(&w.pg[r], "SELECT count(DISTINCT note) FROM items").await;
                if n[0][0]
                    .as_deref()
                    .unwrap_or("0")
                    .parse::<i64>()
                    .unwrap_or(0)
                    < 3
                {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;

    let mut demo = BTreeMap::new();
    demo_round(&w, 40, &mut demo).await;

    for (step, region) in REGIONS.iter().enumerate() {
        let phase = Instant::now();
        // stop the old sidecar: it drains and confirms what Kafka holds
        let mut sidecar = sidecars.remove(region).unwrap();
        let code = sidecar.terminate(Duration::from_secs(60));
        assert_eq!(
            code,
            Some(0),
            "{region}'s old sidecar on SIGTERM:\n{}",
            tail(&sidecar.log_text(), 40)
        );
        // the new binary brings the database up to date, then checks it
        let cfg = w.cfg_path(region);
        let out = relay::ok(&["setup", "--config", cfg, "--region", region]);
        assert!(out.contains("pgrelay's tables at core"), "{out}");
        relay::ok(&["check", "--config", cfg, "--region", region]);
        let sidecar = Relay::spawn(&w.cfg[region], region, "all");
        pairs_active(&w, region, &sidecar).await;
        sidecars.insert(region, sidecar);
        eprintln!(
            "upgraded {region} in {:.1}s ({:.0}s into the test)",
            phase.elapsed().as_secs_f64(),
            started.elapsed().as_secs_f64()
        );
        // old and new side by side: each side's changes reach the other
        let (new, old): (Vec<&str>, Vec<&str>) = REGIONS
            .iter()
            .partition(|r| REGIONS.iter().position(|x| x == *r).unwrap() <= step);
        if old.is_empty() {
            continue;
        }
        let base = MARKER_BASE + step as i32 * 10;
        marker_arrives(&w, base, region, &old).await;
        for (i, from) in old.iter().enumerate() {
            marker_arrives(&w, base + 1 + i as i32, from, &new).await;
        }
    }

    stop.store(true, Ordering::Relaxed);
    let mut written = BTreeMap::new();
    for (r, t) in REGIONS.iter().zip(writers) {
        written.insert(*r, t.await.unwrap());
    }
    eprintln!("written: {written:?}");
    for (r, log) in &written {
        assert!(
            log.transactions > 20 && log.deletes > 0,
            "{r} wrote too little to show anything: {log:?}"
        );
    }

    // every region holds the same rows, stamps included
    let items = identical(
        &w,
        "SELECT * FROM items ORDER BY id",
        Duration::from_secs(180),
    )
    .await;
    assert!(items.len() > 6, "{items:?}");
    let stock = identical(
        &w,
        "SELECT * FROM stock ORDER BY id",
        Duration::from_secs(120),
    )
    .await;
    // each counter is the sum of the increments committed in every region
    for row in &stock {
        let id: i32 = row[0].as_deref().unwrap().parse().unwrap();
        let want: i64 = written
            .values()
            .map(|l| l.increments.get(&id).copied().unwrap_or(0))
            .sum();
        assert_eq!(
            row[1].as_deref(),
            Some(want.to_string().as_str()),
            "counter of stock {id}: {stock:?}"
        );
    }

    // the demo's tables: global rows on the highest stamp, partitioned
    // rows only where their home allows, local rows home, column rules
    // applied, in every database and every topic
    assert_global(&w, &demo).await;
    orders_settled(&w, &demo).await;
    assert_residency(&w, &demo).await;

    // nothing parked, nothing in a dead-letter topic, every pair active
    for r in REGIONS {
        let parked = rows(&w.pg[r], "SELECT count(*) FROM pgrelay.parked").await;
        assert_eq!(parked[0][0].as_deref(), Some("0"), "{r} parked changes");
        let dead = read_records(
            &w.brokers[r].0.brokers(),
            &[],
            &format!("pgrelay.dlq.{r}"),
            Duration::from_secs(1),
        );
        assert!(dead.is_empty(), "{r}'s dead-letter topic: {dead:?}");
        let versions = rows(
            &w.pg[r],
            "SELECT max(version) FROM pgrelay.schema_version WHERE component = 'core'",
        )
        .await;
        assert!(versions[0][0].is_some(), "{r}: no migration recorded");
    }
    let pairs = status(&w);
    assert_eq!(pairs.len(), 6, "{pairs:?}");
    for p in &pairs {
        assert_eq!(p["state"], "active", "{p}");
        assert_eq!(p["dead_letters"], 0, "{p}");
    }

    // verify, by the new release, finds the regions agreeing
    let verified = relay::cmd(&["verify", "--config", w.cfg_path("us")]);
    assert!(
        verified.status.success(),
        "verify: exit {:?}\n{}{}",
        verified.status.code(),
        String::from_utf8_lossy(&verified.stdout),
        String::from_utf8_lossy(&verified.stderr)
    );
    eprintln!(
        "rolling upgrade checked in {:.0}s: {} transactions, {} item rows at the end",
        started.elapsed().as_secs_f64(),
        written.values().map(|l| l.transactions).sum::<u64>(),
        items.len()
    );
}
