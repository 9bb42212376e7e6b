//! Loop prevention where the server filters: `relay.capture.origin_filter`.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::apply::{pair_on, SCHEMA};
use crate::support::broker::Broker;
use crate::support::kafka::read_all;
use crate::support::pg;
use crate::support::relay::{self, Relay};
use crate::support::until_count;

/// Ids of `products` published on `topic`.
fn published_ids(brokers: &str, topic: &str) -> BTreeSet<String> {
    read_all(brokers, topic, Duration::from_secs(2))
        .iter()
        .filter(|r| r.key["table"] == "public.products")
        .filter_map(|r| r.key["key"]["id"].as_str().map(str::to_string))
        .collect()
}

/// With `message` the walsender sends pgrelay's applied changes and the
/// capture side skips them, while a change another replication origin wrote
/// (a native subscription) is replicated; with `server` (16+) the walsender
/// drops both before decoding. Neither loops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_origin_filter_drops_applied_and_foreign_origin_changes() {
    if pg::major() < 16 {
        eprintln!(
            "SKIP server_origin_filter_drops_applied_and_foreign_origin_changes: pgoutput's \
             origin option needs PostgreSQL 16+ (this run: {})",
            pg::major()
        );
        return;
    }
    for (mode, foreign_replicated) in [("message", true), ("server", false)] {
        let broker = Broker::start();
        let brokers = broker.brokers();
        let p = pair_on(SCHEMA, "", broker);
        let text = std::fs::read_to_string(&p.cfg.path).unwrap().replace(
            "status_interval = \"200ms\"\n",
            &format!("status_interval = \"200ms\"\norigin_filter = \"{mode}\"\n"),
        );
        std::fs::write(&p.cfg.path, text).unwrap();
        let _us = Relay::spawn(&p.cfg, "us", "all");
        let _eu = Relay::spawn(&p.cfg, "eu", "all");
        let us = p.us.client().await;
        let eu = p.eu.client().await;
        // us's rows are applied in eu (under pgrelay's origin)
        us.batch_execute(
            "INSERT INTO products (id, name, price) SELECT g, 'us', 1 FROM generate_series(1, 50) g",
        )
        .await
        .unwrap();
        until_count(&eu, "SELECT count(*) FROM products", 50, "us's rows in eu").await;
        // a write under another replication origin, then a plain one
        eu.batch_execute(
            "SELECT pg_replication_origin_create('native_sub'); \
             SELECT pg_replication_origin_session_setup('native_sub'); \
             INSERT INTO products (id, name, price) VALUES (100, 'foreign origin', 1); \
             SELECT pg_replication_origin_session_reset(); \
             INSERT INTO products (id, name, price) VALUES (101, 'marker', 1)",
        )
        .await
        .unwrap();
        until_count(
            &us,
            "SELECT count(*) FROM products WHERE id = 101",
            1,
            "eu's marker in us",
        )
        .await;
        let ids = published_ids(&brokers, "pgrelay.eu.us");
        let mut want: BTreeSet<String> = ["101".to_string()].into();
        if foreign_replicated {
            want.insert("100".into());
        }
        assert_eq!(ids, want, "origin_filter = {mode}: what eu published");
        let n: i64 = us
            .query_one("SELECT count(*) FROM products WHERE id = 100", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, i64::from(foreign_replicated), "origin_filter = {mode}");
        // check names the handling, and the origins "server" leaves behind
        let out = relay::cmd(&[
            "check",
            "--config",
            p.cfg.path.to_str().unwrap(),
            "--region",
            "eu",
        ]);
        let out = String::from_utf8_lossy(&out.stdout).into_owned();
        let warned = out.contains("warning: replication origins native_sub write here");
        assert_eq!(warned, !foreign_replicated, "{out}");
        assert!(
            out.contains(if foreign_replicated {
                "loop prevention: the capture side reads each transaction's Origin message"
            } else {
                "loop prevention: the walsender drops every change that carries a replication origin"
            }),
            "{out}"
        );
    }
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // fields after the command name, which is in parentheses
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the whole line
    (ticks(11) + ticks(12)) / 100.0
}

/// Target-side CPU per applied change: what the region receiving changes
/// spends in its walsender and its capture side on the rows pgrelay applied
/// into it (which it must not send back). `PGRELAY_PG_MAJOR=15|18`, and
/// `PGRELAY_BENCH_CHANGES` (default 20000):
/// `cargo nextest run --test it --run-ignored only bench_ --no-capture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_target_cpu_per_applied_change() {
    let changes: i32 = std::env::var("PGRELAY_BENCH_CHANGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let modes: &[&str] = if pg::major() >= 16 {
        &["message", "server"]
    } else {
        &["message"]
    };
    for mode in modes {
        let p = pair_on(SCHEMA, "", Broker::start());
        let text = std::fs::read_to_string(&p.cfg.path).unwrap().replace(
            "status_interval = \"200ms\"\n",
            &format!("status_interval = \"200ms\"\norigin_filter = \"{mode}\"\n"),
        );
        std::fs::write(&p.cfg.path, text).unwrap();
        let _us = Relay::spawn(&p.cfg, "us", "capture");
        let eu_capture = Relay::spawn(&p.cfg, "eu", "capture");
        let _eu_apply = Relay::spawn(&p.cfg, "eu", "apply");
        let eu = p.eu.client().await;
        let walsender: i32 = crate::support::eventually(
            Duration::from_secs(60),
            "eu's capture side streaming",
            || async {
                eu.query_one(
                    "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'pgrelay_eu'",
                    &[],
                )
                .await
                .ok()?
                .get::<_, Option<i32>>(0)
            },
        )
        .await;
        // what the two spend idle (keepalives, status updates, timers),
        // subtracted below
        let idle_from = (
            cpu_seconds(walsender as u32),
            cpu_seconds(eu_capture.child.id()),
        );
        tokio::time::sleep(Duration::from_secs(10)).await;
        let before = (
            cpu_seconds(walsender as u32),
            cpu_seconds(eu_capture.child.id()),
        );
        let idle_rate = (
            (before.0 - idle_from.0) / 10.0,
            (before.1 - idle_from.1) / 10.0,
        );
        let started = std::time::Instant::now();
        // 100 rows per transaction, as an application writing in small batches
        p.us.psql(&format!(
            "DO $$ BEGIN FOR i IN 0..{} LOOP \
             INSERT INTO products (id, name, price, doc) \
             SELECT g, 'product ' || g, g, repeat('x', 200) FROM generate_series(i * 100 + 1, i * 100 + 100) g; \
             COMMIT; END LOOP; END $$",
            changes / 100 - 1
        ));
        until_count(
            &eu,
            "SELECT count(*) FROM products",
            i64::from(changes),
            "every change applied in eu",
        )
        .await;
        // eu's capture side has read past everything applied
        let end: String = eu
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        crate::support::eventually(
            Duration::from_secs(120),
            "eu's slot past the applied changes",
            || async {
                let done: bool = eu
                    .query_one(
                        "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots \
                         WHERE slot_name = 'pgrelay_eu'",
                        &[&end],
                    )
                    .await
                    .ok()?
                    .get(0);
                done.then_some(())
            },
        )
        .await;
        let elapsed = started.elapsed().as_secs_f64();
        let walsender_s = cpu_seconds(walsender as u32) - before.0 - idle_rate.0 * elapsed;
        let capture_s = cpu_seconds(eu_capture.child.id()) - before.1 - idle_rate.1 * elapsed;
        let per = |s: f64| s * 1e6 / f64::from(changes);
        println!(
            "BENCH PostgreSQL {} origin_filter={mode}: {changes} applied changes in {elapsed:.0} s; \
             beyond idle: target walsender {walsender_s:.2} s ({:.1} us/change), target capture \
             side {capture_s:.2} s ({:.1} us/change), together {:.1} us/change",
            pg::major(),
            per(walsender_s),
            per(capture_s),
            per(walsender_s + capture_s)
        );
    }
}
