//! `pgrelay verify` against the three-region world of `sidecar.rs`: quiet
//! while every region writes, and each difference planted where capture
//! cannot see it (under a `pgrelay_*` replication origin, triggers off)
//! reported exactly once with its kind, table and pair.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::sidecar::{identical, workload, World, REGIONS};
use crate::support::relay::{self, Relay};

/// Writes in `region` (the mixed workload of `sidecar.rs`, over and over)
/// until `stop` is set.
fn writer(w: &World, region: &'static str, stop: &Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    let dsn = w.pg[region].dsn();
    let stop = stop.clone();
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            workload(region, dsn.clone(), 50).await;
        }
    })
}

/// Runs verify; returns its exit code and its JSON.
async fn verify(w: &World, extra: &[&str]) -> (i32, serde_json::Value, String) {
    let mut args: Vec<String> = [
        "verify",
        "--config",
        w.cfg_path("us"),
        "--json",
        "--rounds",
        "6",
        "--wait",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        relay::cmd(&refs)
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!("verify printed no JSON ({e}):\nstdout: {stdout}\nstderr: {stderr}")
    });
    (out.status.code().unwrap_or(-1), json, stderr)
}

/// (kind, table, source, destination, column, key) of each difference.
fn differences(report: &serde_json::Value) -> BTreeSet<[String; 6]> {
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
    report["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            [
                s(&d["kind"]),
                s(&d["table"]),
                s(&d["source"]),
                s(&d["destination"]),
                s(&d["column"]),
                s(&d["key"]),
            ]
        })
        .collect()
}

/// Runs `sql` in `region` under a replication origin capture skips, with
/// triggers off: a change no other region ever hears of.
async fn unseen(w: &World, region: &str, sql: &str) {
    let c = w.pg[region].client().await;
    c.batch_execute(&format!(
        "SELECT pg_replication_origin_create('pgrelay_planted') \
           WHERE NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = 'pgrelay_planted'); \
         BEGIN; \
         SELECT pg_replication_origin_session_setup('pgrelay_planted'); \
         SET LOCAL session_replication_role = replica; \
         {sql}; \
         COMMIT; \
         SELECT pg_replication_origin_session_reset();"
    ))
    .await
    .unwrap_or_else(|e| panic!("planting in {region}: {e:?}"));
}

fn row(kind: &str, table: &str, source: &str, dest: &str, column: &str, key: &str) -> [String; 6] {
    [kind, table, source, dest, column, key].map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_is_quiet_under_writes_then_reports_each_planted_difference_once() {
    let w = World::start(false);
    let _sidecars: Vec<Relay> = REGIONS.iter().map(|r| w.sidecar(r)).collect();

    // rows the plants start from, written normally and replicated
    let us = w.pg["us"].client().await;
    us.batch_execute(
        "INSERT INTO products VALUES (901, 'lost', 1), (902, 'tampered', 2); \
         INSERT INTO orders VALUES (9002, 'US', 'buyer9002@example.com', '4111', 5)",
    )
    .await
    .unwrap();
    let eu = w.pg["eu"].client().await;
    eu.batch_execute("INSERT INTO orders VALUES (9001, 'DE', 'pinned@example.com', '4222', 7)")
        .await
        .unwrap();
    identical(
        &w,
        "SELECT id, name FROM products WHERE id > 900 ORDER BY id",
        Duration::from_secs(60),
    )
    .await;

    // (a) writes in every region, verify run again and again: nothing
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = REGIONS.iter().map(|r| writer(&w, r, &stop)).collect();
    for run in 0..4 {
        let (code, report, stderr) = verify(&w, &[]).await;
        eprintln!(
            "verify run {run} during writes: unsettled {}, buckets differing {}",
            report["unsettled"],
            report["pairs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["buckets_differing"].as_u64().unwrap())
                .sum::<u64>()
        );
        assert_eq!(
            (code, differences(&report)),
            (0, BTreeSet::new()),
            "a false difference while every region writes:\n{report:#}\n{stderr}"
        );
        assert!(writers.iter().all(|t| !t.is_finished()));
    }
    stop.store(true, Ordering::Relaxed);
    for t in writers {
        t.await.unwrap();
    }
    // every pair of every replicated table was compared (throttled: the
    // tables are read in block ranges)
    let (code, report, stderr) = verify(&w, &["--rate", "5000"]).await;
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    let pairs: BTreeSet<(String, String, String)> = report["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["table"].as_str().unwrap().to_string(),
                p["a"].as_str().unwrap().to_string(),
                p["b"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for table in ["public.products", "public.currencies"] {
        for (a, b) in [("cn", "eu"), ("cn", "us"), ("eu", "us")] {
            assert!(
                pairs.contains(&(table.to_string(), a.to_string(), b.to_string())),
                "{table} {a} {b} not compared: {report:#}"
            );
        }
    }
    // orders: only us-homed rows are shared, by every pair
    assert!(pairs.contains(&("public.orders".into(), "eu".into(), "us".into())));

    // (b) plants, while every region keeps writing
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = REGIONS.iter().map(|r| writer(&w, r, &stop)).collect();
    // missing: eu loses a row us wrote
    unseen(&w, "eu", "DELETE FROM products WHERE id = 901").await;
    // diverged: cn's copy changed under the same stamp
    unseen(
        &w,
        "cn",
        "UPDATE products SET name = 'other' WHERE id = 902",
    )
    .await;
    // leaked: eu's pinned order copied into us, stamp and all
    let stamp: i64 = eu
        .query_one("SELECT _pgrelay_hlc FROM orders WHERE id = 9001", &[])
        .await
        .unwrap()
        .get(0);
    unseen(
        &w,
        "us",
        &format!(
            "INSERT INTO orders VALUES (9001, 'DE', 'pinned@example.com', '4222', 7, {stamp})"
        ),
    )
    .await;
    // leaked column: cn holds a hashed column in clear
    unseen(
        &w,
        "cn",
        "UPDATE orders SET email = 'buyer9002@example.com' WHERE id = 9002",
    )
    .await;
    // extra: a currency in eu the owner (us) never wrote
    unseen(
        &w,
        "eu",
        "INSERT INTO currencies VALUES ('ZZZ', 1, pgrelay.next_hlc(0))",
    )
    .await;

    let (code, report, stderr) = verify(&w, &["--show-keys"]).await;
    let want: BTreeSet<[String; 6]> = [
        row(
            "leaked",
            "public.orders",
            "eu",
            "us",
            "",
            r#"{"id": "9001"}"#,
        ),
        row(
            "leaked",
            "public.orders",
            "us",
            "cn",
            "email",
            r#"{"id": "9002"}"#,
        ),
        row(
            "missing",
            "public.products",
            "us",
            "eu",
            "",
            r#"{"id": "901"}"#,
        ),
        row(
            "extra",
            "public.currencies",
            "us",
            "eu",
            "",
            r#"{"code": "ZZZ"}"#,
        ),
        row(
            "diverged",
            "public.products",
            "us",
            "cn",
            "",
            r#"{"id": "902"}"#,
        ),
    ]
    .into_iter()
    .collect();
    assert_eq!(differences(&report), want, "{report:#}\n{stderr}");
    assert_eq!(code, 1);

    // keys only when asked for
    let (_, report, _) = verify(&w, &["--table", "public.orders"]).await;
    for d in report["differences"].as_array().unwrap() {
        assert!(d.get("key").is_none(), "{d}");
    }
    // one region alone: its own leak checks only
    let (code, report, stderr) = verify(&w, &["--region", "us"]).await;
    assert_eq!(code, 1, "{report:#}\n{stderr}");
    let kinds: Vec<&str> = report["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["leaked"], "{report:#}");
    // text for people: a leak first and loudest
    let text = relay::cmd(&[
        "verify",
        "--config",
        w.cfg_path("us"),
        "--table",
        "public.orders",
    ]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(text.contains("LEAKED public.orders"), "{text}");
    stop.store(true, Ordering::Relaxed);
    for t in writers {
        t.await.unwrap();
    }
}

/// Counters and unions: increments and items added in every region at
/// once are not differences while they merge; a counter changed where
/// capture cannot see it (its parts untouched) is, once every region has
/// applied the others' changes past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_compares_merge_columns_by_their_parts() {
    let w = crate::merge::merge_world();
    let _sidecars: Vec<Relay> = REGIONS.iter().map(|r| w.sidecar(r)).collect();
    let us = w.pg["us"].client().await;
    us.batch_execute(
        "INSERT INTO stock SELECT g, 0, 'start' FROM generate_series(1, 20) g; \
         INSERT INTO carts SELECT g, '{}', 'start' FROM generate_series(1, 20) g",
    )
    .await
    .unwrap();
    identical(&w, "SELECT count(*) FROM stock", Duration::from_secs(60)).await;
    identical(&w, "SELECT count(*) FROM carts", Duration::from_secs(60)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = REGIONS
        .iter()
        .map(|r| {
            let dsn = w.pg[r].dsn();
            let stop = stop.clone();
            let region = *r;
            tokio::spawn(async move {
                let (c, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(conn);
                let mut i = 0i32;
                while !stop.load(Ordering::Relaxed) {
                    let id = i % 20 + 1;
                    c.execute("UPDATE stock SET n = n + 1 WHERE id = $1", &[&id])
                        .await
                        .unwrap();
                    c.execute(
                        "UPDATE carts SET items = items || $2::text WHERE id = $1",
                        &[&id, &format!("{region}-{i}")],
                    )
                    .await
                    .unwrap();
                    i += 1;
                }
            })
        })
        .collect();
    for run in 0..3 {
        let (code, report, stderr) = verify(&w, &[]).await;
        eprintln!("merge verify run {run}: unsettled {}", report["unsettled"]);
        assert_eq!(
            (code, differences(&report)),
            (0, BTreeSet::new()),
            "a false difference while counters merge:\n{report:#}\n{stderr}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    for t in writers {
        t.await.unwrap();
    }
    identical(
        &w,
        "SELECT id, n, _pgrelay_counts::text, items FROM stock JOIN carts USING (id) ORDER BY id",
        Duration::from_secs(90),
    )
    .await;
    let (code, report, stderr) = verify(&w, &[]).await;
    assert_eq!(code, 0, "{report:#}\n{stderr}");

    // us writes row 3 last, then eu's visible sum changes without its parts
    us.execute("UPDATE stock SET label = 'last' WHERE id = 3", &[])
        .await
        .unwrap();
    identical(
        &w,
        "SELECT label FROM stock WHERE id = 3",
        Duration::from_secs(60),
    )
    .await;
    unseen(&w, "eu", "UPDATE stock SET n = n + 5 WHERE id = 3").await;
    // a change from every region after it: every watermark passes its stamp
    for r in REGIONS {
        w.pg[r]
            .client()
            .await
            .execute("UPDATE stock SET label = $1 WHERE id = 20", &[&r])
            .await
            .unwrap();
    }
    let (code, report, stderr) = verify(&w, &["--show-keys", "--window", "3"]).await;
    let found = differences(&report);
    assert_eq!(found.len(), 1, "{report:#}\n{stderr}");
    let d = found.into_iter().next().unwrap();
    assert_eq!(
        d,
        row("diverged", "public.stock", "us", "eu", "", r#"{"id": "3"}"#),
        "{report:#}"
    );
    assert_eq!(code, 1);
}

/// The steps of a `--repair` run: (action, kind, table, from, to).
fn steps(report: &serde_json::Value) -> BTreeSet<[String; 5]> {
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
    report["repair"]["steps"]
        .as_array()
        .unwrap_or_else(|| panic!("no repair steps: {report:#}"))
        .iter()
        .map(|d| {
            [
                s(&d["action"]),
                s(&d["kind"]),
                s(&d["table"]),
                s(&d["from"]),
                s(&d["to"]),
            ]
        })
        .collect()
}

fn step(action: &str, kind: &str, table: &str, from: &str, to: &str) -> [String; 5] {
    [action, kind, table, from, to].map(str::to_string)
}

/// Every kind of difference planted while the regions write; `--repair
/// --dry-run` says what it would do and changes nothing (verify still
/// finds each one afterwards); `--repair` fixes each the way changes
/// normally travel, and verify then reports none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_repair_fixes_every_kind_and_its_dry_run_changes_nothing() {
    let w = World::start(false);
    let _sidecars: Vec<Relay> = REGIONS.iter().map(|r| w.sidecar(r)).collect();
    let us = w.pg["us"].client().await;
    let eu = w.pg["eu"].client().await;
    let cn = w.pg["cn"].client().await;
    us.batch_execute(
        "INSERT INTO products VALUES (901, 'lost', 1), (902, 'tampered', 2), (903, 'deleted', 3); \
         INSERT INTO currencies VALUES ('XAU', 2000); \
         INSERT INTO orders VALUES (9002, 'US', 'buyer9002@example.com', '4111', 5)",
    )
    .await
    .unwrap();
    eu.batch_execute("INSERT INTO orders VALUES (9001, 'DE', 'pinned@example.com', '4222', 7)")
        .await
        .unwrap();
    identical(
        &w,
        "SELECT id, name FROM products WHERE id > 900 ORDER BY id",
        Duration::from_secs(60),
    )
    .await;
    identical(
        &w,
        "SELECT code, rate FROM currencies WHERE code = 'XAU'",
        Duration::from_secs(60),
    )
    .await;
    let stamp_903: i64 = cn
        .query_one("SELECT _pgrelay_hlc FROM products WHERE id = 903", &[])
        .await
        .unwrap()
        .get(0);
    us.execute("DELETE FROM products WHERE id = 903", &[])
        .await
        .unwrap();
    identical(
        &w,
        "SELECT count(*) FROM products WHERE id = 903",
        Duration::from_secs(60),
    )
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = REGIONS.iter().map(|r| writer(&w, r, &stop)).collect();
    // missing row, missing delete, diverged, leaked row and value, extra
    // (one the owner never wrote, one over the owner's own version)
    unseen(&w, "eu", "DELETE FROM products WHERE id = 901").await;
    unseen(
        &w,
        "cn",
        &format!("INSERT INTO products VALUES (903, 'deleted', 3, {stamp_903})"),
    )
    .await;
    unseen(
        &w,
        "cn",
        "UPDATE products SET name = 'other' WHERE id = 902",
    )
    .await;
    let stamp_9001: i64 = eu
        .query_one("SELECT _pgrelay_hlc FROM orders WHERE id = 9001", &[])
        .await
        .unwrap()
        .get(0);
    unseen(
        &w,
        "us",
        &format!(
            "INSERT INTO orders VALUES (9001, 'DE', 'pinned@example.com', '4222', 7, {stamp_9001})"
        ),
    )
    .await;
    unseen(
        &w,
        "cn",
        "UPDATE orders SET email = 'buyer9002@example.com' WHERE id = 9002",
    )
    .await;
    unseen(
        &w,
        "eu",
        "INSERT INTO currencies VALUES ('ZZZ', 1, pgrelay.next_hlc(0))",
    )
    .await;
    unseen(
        &w,
        "eu",
        "UPDATE currencies SET rate = 1, _pgrelay_hlc = pgrelay.next_hlc(0) WHERE code = 'XAU'",
    )
    .await;
    let planted: BTreeSet<[String; 6]> = [
        row(
            "leaked",
            "public.orders",
            "eu",
            "us",
            "",
            r#"{"id": "9001"}"#,
        ),
        row(
            "leaked",
            "public.orders",
            "us",
            "cn",
            "email",
            r#"{"id": "9002"}"#,
        ),
        row(
            "missing",
            "public.products",
            "us",
            "eu",
            "",
            r#"{"id": "901"}"#,
        ),
        row(
            "missing",
            "public.products",
            "us",
            "cn",
            "",
            r#"{"id": "903"}"#,
        ),
        row(
            "extra",
            "public.currencies",
            "us",
            "eu",
            "",
            r#"{"code": "ZZZ"}"#,
        ),
        row(
            "extra",
            "public.currencies",
            "us",
            "eu",
            "",
            r#"{"code": "XAU"}"#,
        ),
        row(
            "diverged",
            "public.products",
            "us",
            "cn",
            "",
            r#"{"id": "902"}"#,
        ),
    ]
    .into_iter()
    .collect();

    // the dry run: the plan, and nothing changed
    let (code, report, stderr) = verify(&w, &["--repair", "--dry-run", "--show-keys"]).await;
    assert_eq!(differences(&report), planted, "{report:#}\n{stderr}");
    assert_eq!(code, 1, "{report:#}\n{stderr}");
    assert_eq!(report["repair"]["dry_run"], true, "{report:#}");
    let want: BTreeSet<[String; 5]> = [
        step("remove", "leaked", "public.orders", "", "us"),
        step("replace", "leaked", "public.orders", "us", "cn"),
        step("resend", "missing", "public.products", "us", "eu"),
        step("resend", "missing", "public.products", "us", "cn"),
        step("replace", "extra", "public.currencies", "us", "eu"),
        step("replace", "diverged", "public.products", "us", "cn"),
    ]
    .into_iter()
    .collect();
    assert_eq!(steps(&report), want, "{report:#}");
    for s in report["repair"]["steps"].as_array().unwrap() {
        assert!(s.get("outcome").is_none(), "{s}");
    }
    // verify, after the dry run, still finds every planted difference
    let (code, report, stderr) = verify(&w, &["--show-keys"]).await;
    assert_eq!(
        (code, differences(&report)),
        (1, planted.clone()),
        "{report:#}\n{stderr}"
    );
    let lost: i64 = eu
        .query_one("SELECT count(*) FROM products WHERE id = 901", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(lost, 0);

    // the repair
    let (code, report, stderr) = verify(&w, &["--repair"]).await;
    assert_eq!(code, 1, "{report:#}\n{stderr}");
    assert_eq!(report["repair"]["dry_run"], false, "{report:#}");
    assert_eq!(steps(&report), want, "{report:#}");
    let outcome = |action: &str, kind: &str, to: &str| -> serde_json::Value {
        report["repair"]["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["action"] == action && s["kind"] == kind && s["to"] == to)
            .unwrap_or_else(|| panic!("no {action} {kind} {to}: {report:#}"))["outcome"]
            .clone()
    };
    assert_eq!(
        outcome("remove", "leaked", "us")["removed"],
        1,
        "{report:#}"
    );
    assert_eq!(
        outcome("replace", "leaked", "cn")["removed"],
        1,
        "{report:#}"
    );
    assert_eq!(
        outcome("replace", "leaked", "cn")["rows_sent"],
        1,
        "{report:#}"
    );
    assert_eq!(
        outcome("resend", "missing", "eu")["rows_sent"],
        1,
        "{report:#}"
    );
    assert_eq!(
        outcome("resend", "missing", "cn")["tombstones_sent"],
        1,
        "{report:#}"
    );
    // both extra keys removed; the owner holds one of them and sends it
    assert_eq!(
        outcome("replace", "extra", "eu")["removed"],
        2,
        "{report:#}"
    );
    assert_eq!(
        outcome("replace", "extra", "eu")["rows_sent"],
        1,
        "{report:#}"
    );
    assert_eq!(
        outcome("replace", "diverged", "cn")["removed"],
        1,
        "{report:#}"
    );
    assert_eq!(
        outcome("replace", "diverged", "cn")["rows_sent"],
        1,
        "{report:#}"
    );
    stop.store(true, Ordering::Relaxed);
    for t in writers {
        t.await.unwrap();
    }

    // once what was sent is applied, every region agrees
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let (code, report, stderr) = verify(&w, &["--show-keys"]).await;
        if code == 0 && differences(&report).is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still differences after the repair:\n{report:#}\n{stderr}"
        );
    }
    let text = |row: tokio_postgres::Row| row.get::<_, Option<String>>(0);
    assert_eq!(
        text(
            eu.query_one("SELECT max(name) FROM products WHERE id = 901", &[])
                .await
                .unwrap()
        ),
        Some("lost".into())
    );
    assert_eq!(
        text(
            cn.query_one("SELECT max(name) FROM products WHERE id = 902", &[])
                .await
                .unwrap()
        ),
        Some("tampered".into())
    );
    assert_eq!(
        text(
            cn.query_one("SELECT max(name) FROM products WHERE id = 903", &[])
                .await
                .unwrap()
        ),
        None
    );
    assert_eq!(
        text(
            us.query_one("SELECT max(email) FROM orders WHERE id = 9001", &[])
                .await
                .unwrap()
        ),
        None
    );
    let email = text(
        cn.query_one("SELECT max(email) FROM orders WHERE id = 9002", &[])
            .await
            .unwrap(),
    )
    .unwrap();
    assert!(email.contains(':'), "{email}");
    assert_ne!(email, "buyer9002@example.com");
    assert_eq!(
        text(
            eu.query_one(
                "SELECT string_agg(code || '=' || rate, ',' ORDER BY code) FROM currencies \
                 WHERE code IN ('XAU', 'ZZZ')",
                &[]
            )
            .await
            .unwrap()
        ),
        Some("XAU=2000".into())
    );
}

/// `[verify] interval`: each sidecar verifies its region against its peers
/// on its own; a planted difference shows in its gauge (in both regions of
/// the pair) and in `pgrelay status`, and goes back to zero once repaired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_verify_shows_differences_in_metrics_and_status() {
    use std::io::Write as _;
    let w = World::start(false);
    for r in REGIONS {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&w.cfg[r].path)
            .unwrap();
        writeln!(f, "\n[verify]\ninterval = \"1s\"\nrate = 100000").unwrap();
    }
    let _sidecars: Vec<Relay> = REGIONS.iter().map(|r| w.sidecar(r)).collect();
    let us = w.pg["us"].client().await;
    us.batch_execute("INSERT INTO products VALUES (901, 'lost', 1)")
        .await
        .unwrap();
    identical(
        &w,
        "SELECT id, name FROM products WHERE id = 901",
        Duration::from_secs(60),
    )
    .await;
    let missing = |region: &str, peer: &str| {
        let filter = format!(
            "region=\"{region}\",peer=\"{peer}\",table=\"public.products\",kind=\"missing\"}} "
        );
        w.metrics(region)
            .lines()
            .find(|l| l.starts_with("pgrelay_verify_differences{") && l.contains(&filter))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    let wait_for = |what: &str, ok: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        while !ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}:\n{}",
                w.metrics("eu")
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    };
    // a run finished, the pair compared and found equal
    wait_for("no periodic verify in eu", &|| {
        missing("eu", "us") == Some(0.0)
            && w.metric_sum("eu", "pgrelay_verify_last_run_timestamp_seconds", "eu") > 0.0
    });

    unseen(&w, "eu", "DELETE FROM products WHERE id = 901").await;
    wait_for("the planted row not reported missing", &|| {
        missing("eu", "us") == Some(1.0) && missing("us", "eu") == Some(1.0)
    });
    let out = relay::ok(&["status", "--config", w.cfg_path("us"), "--json"]);
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    let pair = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["source"] == "us" && p["destination"] == "eu")
        .unwrap()
        .clone();
    assert_eq!(pair["verify_differences"], 1, "{pair:#}");
    assert!(pair["last_verify"].as_str().is_some(), "{pair:#}");
    let text = relay::ok(&["status", "--config", w.cfg_path("us")]);
    assert!(
        text.lines()
            .any(|l| l.contains("us->eu") && l.contains("1 difference(s)")),
        "{text}"
    );

    let (code, report, stderr) = verify(&w, &["--repair", "--table", "public.products"]).await;
    assert_eq!(code, 1, "{report:#}\n{stderr}");
    wait_for("the repaired row still reported missing", &|| {
        missing("eu", "us") == Some(0.0) && missing("us", "eu") == Some(0.0)
    });
}
