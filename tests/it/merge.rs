//! Conflicts made visible: the conflict log (`pgrelay.conflicts`,
//! `pgrelay conflicts list`). Two regions, real PostgreSQL clusters, one
//! broker, real sidecars.

use std::time::Duration;

use crate::apply::{pair, SCHEMA};
use crate::support::eventually;
use crate::support::kafka::{produce, read_all, read_records};
use crate::support::relay::{self, Relay};

/// `(table, pk, op, winner_hlc, winner_origin, loser_hlc, loser_origin, loser_version)`.
type Entry = (String, String, String, i64, String, i64, String, String);

async fn conflicts(pg: &crate::support::pg::Pg) -> Vec<Entry> {
    let c = pg.client().await;
    c.query(
        "SELECT table_name, pk::text, op, winner_hlc, winner_origin, loser_hlc, loser_origin, \
         loser_version::text FROM pgrelay.conflicts ORDER BY loser_hlc",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| {
        (
            r.get(0),
            r.get(1),
            r.get(2),
            r.get(3),
            r.get(4),
            r.get(5),
            r.get(6),
            r.get(7),
        )
    })
    .collect()
}

async fn stamp(pg: &crate::support::pg::Pg, id: i32) -> i64 {
    let c = pg.client().await;
    c.query_one("SELECT _pgrelay_hlc FROM products WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0)
}

/// Waits until `region` has stored offsets past every record of `topic`.
async fn consumed_all(pg: &crate::support::pg::Pg, brokers: &str, topic: &str) {
    let total = read_records(brokers, &[], topic, Duration::from_secs(1)).len() as i64;
    let c = pg.client().await;
    eventually(Duration::from_secs(30), "every record consumed", || async {
        let n: i64 = c
            .query_one(
                "SELECT coalesce(sum(next_offset), 0)::bigint FROM pgrelay.offsets WHERE topic = $1",
                &[&topic],
            )
            .await
            .ok()?
            .get(0);
        (n >= total).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_update_that_loses_is_in_the_conflict_log_once() {
    let p = pair(SCHEMA);
    p.us.psql("INSERT INTO products VALUES (1, 'a', 1), (2, 'b', 2)");
    {
        let _us = Relay::spawn(&p.cfg, "us", "capture");
        let _eu = Relay::spawn(&p.cfg, "eu", "apply");
        let c = p.eu.client().await;
        crate::support::until_count(&c, "SELECT count(*) FROM products", 2, "eu holds us's rows")
            .await;
    }
    // nobody replicates: both regions update row 1, eu later (newer stamp);
    // row 2 only in us (no conflict)
    p.us.psql("UPDATE products SET name = 'from us' WHERE id = 1");
    p.us.psql("UPDATE products SET name = 'us only' WHERE id = 2");
    tokio::time::sleep(Duration::from_millis(20)).await;
    p.eu.psql("UPDATE products SET name = 'from eu', price = 9 WHERE id = 1");
    let (us_stamp, eu_stamp) = (stamp(&p.us, 1).await, stamp(&p.eu, 1).await);
    assert!(eu_stamp > us_stamp);
    let _us = Relay::spawn(&p.cfg, "us", "all");
    let _eu = Relay::spawn(&p.cfg, "eu", "all");
    for pg in [&p.us, &p.eu] {
        let c = pg.client().await;
        crate::support::until_count(
            &c,
            "SELECT count(*) FROM products WHERE (id = 1 AND name = 'from eu') OR (id = 2 AND name = 'us only')",
            2,
            "both regions on eu's row 1 and us's row 2",
        )
        .await;
    }
    let brokers = p.broker.brokers();
    consumed_all(&p.eu, &brokers, "pgrelay.us.eu").await;
    consumed_all(&p.us, &brokers, "pgrelay.eu.us").await;
    // us's version lost in eu, where eu's won: recorded there, once, with
    // both stamps and the losing version
    let eu_log = conflicts(&p.eu).await;
    assert_eq!(eu_log.len(), 1, "{eu_log:?}");
    let (table, pk, op, w, wo, l, lo, version) = &eu_log[0];
    assert_eq!(
        (table.as_str(), pk.as_str(), op.as_str()),
        ("public.products", r#"{"id": "1"}"#, "upsert")
    );
    assert_eq!(
        (*w, wo.as_str(), *l, lo.as_str()),
        (eu_stamp, "eu", us_stamp, "us")
    );
    let version: serde_json::Value = serde_json::from_str(version).unwrap();
    assert_eq!(version["name"], "from us");
    // in us, eu's newer version simply won: nothing to record
    assert!(conflicts(&p.us).await.is_empty());

    // redelivered records: us's losing update again (already recorded) and
    // eu's winning one again (a duplicate of what us holds) — no new entry
    for topic in ["pgrelay.us.eu", "pgrelay.eu.us"] {
        let again: Vec<_> = read_all(&brokers, topic, Duration::from_secs(1))
            .into_iter()
            .filter(|r| r.key["key"]["id"] == "1")
            .map(|r| {
                (
                    Some(serde_json::to_vec(&r.key).unwrap()),
                    Some(serde_json::to_vec(&r.value).unwrap()),
                )
            })
            .collect();
        assert!(!again.is_empty());
        produce(&brokers, topic, &again);
    }
    consumed_all(&p.eu, &brokers, "pgrelay.us.eu").await;
    consumed_all(&p.us, &brokers, "pgrelay.eu.us").await;
    assert_eq!(conflicts(&p.eu).await, eu_log);
    assert!(conflicts(&p.us).await.is_empty());

    // the command prints it, and filters by table and time
    let cfg = p.cfg.path.to_str().unwrap();
    let out = relay::ok(&["conflicts", "list", "--config", cfg, "--region", "eu"]);
    assert!(out.contains("1 conflict(s) in region eu"), "{out}");
    let line = out.lines().nth(1).unwrap();
    for part in [
        "public.products",
        r#"{"id":"1"}"#,
        "upsert",
        &format!(
            "{}(us) lost to {}(eu)",
            pgrelay::hlc::display(us_stamp as u64),
            pgrelay::hlc::display(eu_stamp as u64)
        ),
        "from us",
    ] {
        assert!(line.contains(part), "{part:?} in {line}");
    }
    let none = relay::ok(&conflicts_list(cfg, &["--table", "public.users"]));
    assert!(none.contains("0 conflict(s)"), "{none}");
    let recent = relay::ok(&conflicts_list(cfg, &["--since", "10m"]));
    assert!(recent.contains("1 conflict(s)"), "{recent}");
    let future = relay::ok(&conflicts_list(cfg, &["--since", "2999-01-01"]));
    assert!(future.contains("0 conflict(s)"), "{future}");
    let bad = relay::fails(&conflicts_list(cfg, &["--since", "yesterday-ish"]));
    assert!(bad.contains("--since"), "{bad}");
}

/// `pg_current_wal_insert_lsn()` after `sql` committed in `pg`.
async fn write_then_lsn(pg: &crate::support::pg::Pg, sql: &str) -> String {
    let c = pg.client().await;
    c.batch_execute(sql).await.unwrap();
    c.query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .unwrap()
        .get(0)
}

/// `pgrelay.wait_for(source, lsn, timeout)` in `pg`, and how long it took.
async fn wait_for(
    pg: &crate::support::pg::Pg,
    source: &str,
    lsn: &str,
    timeout: &str,
) -> (bool, Duration) {
    let c = pg.client().await;
    let started = std::time::Instant::now();
    let ok: bool = c
        .query_one(
            "SELECT pgrelay.wait_for($1, $2::text::pg_lsn, $3::text::interval)",
            &[&source, &lsn, &timeout],
        )
        .await
        .unwrap()
        .get(0);
    (ok, started.elapsed())
}

async fn has_product(pg: &crate::support::pg::Pg, id: i32) -> bool {
    let c = pg.client().await;
    c.query_one("SELECT count(*) FROM products WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get::<_, i64>(0)
        == 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_returns_once_the_write_is_applied_and_false_at_the_timeout() {
    let p = pair(SCHEMA);
    let mut us = Relay::spawn(&p.cfg, "us", "all");
    let _eu = Relay::spawn(&p.cfg, "eu", "all");
    // one row: one partition of six gets a change, the others only
    // progress records — wait_for needs every partition
    let lsn = write_then_lsn(&p.us, "INSERT INTO products VALUES (1, 'a', 1)").await;
    let (ok, _) = wait_for(&p.eu, "us", &lsn, "60s").await;
    assert!(ok, "wait_for must see the write applied");
    assert!(
        has_product(&p.eu, 1).await,
        "visible once wait_for returned"
    );

    // us's sidecar stopped: its next write cannot arrive, wait_for gives up
    us.kill9();
    let lsn = write_then_lsn(&p.us, "INSERT INTO products VALUES (2, 'b', 2)").await;
    let (ok, took) = wait_for(&p.eu, "us", &lsn, "1s").await;
    assert!(!ok, "nothing applied while us's sidecar is stopped");
    assert!(took >= Duration::from_secs(1), "{took:?}");
    assert!(!has_product(&p.eu, 2).await);

    // back: the write arrives and wait_for says so
    let _us = Relay::spawn(&p.cfg, "us", "all");
    let (ok, _) = wait_for(&p.eu, "us", &lsn, "60s").await;
    assert!(ok);
    assert!(has_product(&p.eu, 2).await);

    // a region's own writes need no wait; an unknown region is an error
    assert!(wait_for(&p.eu, "eu", &lsn, "1s").await.0);
    let c = p.eu.client().await;
    let err = c
        .query_one("SELECT pgrelay.wait_for('xx', '0/1', '1s')", &[])
        .await
        .unwrap_err();
    let msg = err.as_db_error().unwrap().message().to_string();
    assert!(
        msg.contains("xx is not a region") && msg.contains("us"),
        "{msg}"
    );
}

const MERGE_SCHEMA: &str = "
CREATE TABLE stock (id int PRIMARY KEY, n bigint NOT NULL DEFAULT 0, label text);
CREATE TABLE carts (id int PRIMARY KEY, items text[] NOT NULL DEFAULT '{}', note text);
";

/// Three regions (us, eu, cn) with a counter table and a cart table whose
/// items are a grow-only set, set up; no sidecar runs yet.
fn merge_world() -> crate::sidecar::World {
    use crate::sidecar::{region_blocks, World, REGIONS};
    use crate::support::broker::Broker;
    use crate::support::pg::Pg;
    use std::collections::BTreeMap;
    let mut pg = BTreeMap::new();
    let mut brokers = BTreeMap::new();
    for r in REGIONS {
        let p = Pg::start();
        p.psql(MERGE_SCHEMA);
        pg.insert(r, p);
        brokers.insert(r, Broker::behind_proxy(false));
    }
    let mut cfg = BTreeMap::new();
    let mut http = BTreeMap::new();
    for r in REGIONS {
        let port = crate::support::free_port();
        http.insert(r, port);
        let regions = region_blocks(&pg, &brokers, |_| String::new());
        let text = format!(
            r#"
[relay.capture]
status_interval = "200ms"
topic_partitions = 3

[relay.apply]
batch_max_wait = "20ms"

[http]
listen = "127.0.0.1:{port}"

{regions}
[[tables]]
name = "public.stock"
class = "global"
[[tables.columns]]
name = "n"
merge = "counter"

[[tables]]
name = "public.carts"
class = "global"
[[tables.columns]]
name = "items"
merge = "union"
"#
        );
        cfg.insert(r, crate::support::relay::ConfigFile::new(&text));
    }
    let w = World {
        pg,
        brokers,
        cfg,
        http,
    };
    for r in REGIONS {
        relay::ok(&["setup", "--config", w.cfg_path(r), "--region", r]);
    }
    w
}

/// `sql`'s single text value in every region, once all agree on it.
async fn all_agree(w: &crate::sidecar::World, sql: &str, want: &str) {
    eventually(
        Duration::from_secs(90),
        &format!("every region at {want}"),
        || async {
            for pg in w.pg.values() {
                let c = pg.client().await;
                let v: Option<String> = c.query_one(sql, &[]).await.ok()?.get(0);
                if v.as_deref() != Some(want) {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_increments_in_three_regions_add_up_exactly_through_a_kill() {
    let w = merge_world();
    let mut sidecars: std::collections::BTreeMap<&str, Relay> = crate::sidecar::REGIONS
        .iter()
        .map(|r| (*r, w.sidecar(r)))
        .collect();
    w.pg["us"].psql("INSERT INTO stock VALUES (1, 0, 'start')");
    all_agree(&w, "SELECT n::text FROM stock WHERE id = 1", "0").await;

    // each region: 1000 increments of 1..5, one transaction each, and a
    // few label updates (last writer wins on the other columns)
    const N: i64 = 1000;
    let mut writers = Vec::new();
    for (ri, r) in crate::sidecar::REGIONS.iter().enumerate() {
        let dsn = w.pg[r].dsn();
        writers.push(tokio::spawn(async move {
            let (c, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            let mut sum = 0i64;
            for i in 0..N {
                let k = (i + ri as i64) % 5 + 1;
                c.execute("UPDATE stock SET n = n + $1 WHERE id = 1", &[&k])
                    .await
                    .unwrap();
                sum += k;
                if i % 250 == 0 {
                    c.execute(
                        "UPDATE stock SET label = $1 WHERE id = 1",
                        &[&format!("{r}-{i}")],
                    )
                    .await
                    .unwrap();
                }
            }
            sum
        }));
    }
    // kill -9 eu's sidecar while the increments flow, then bring it back
    let us = w.pg["us"].client().await;
    eventually(Duration::from_secs(60), "increments under way", || async {
        let n: i64 = us
            .query_one("SELECT n FROM stock WHERE id = 1", &[])
            .await
            .ok()?
            .get(0);
        (n > 1500).then_some(())
    })
    .await;
    sidecars.get_mut("eu").unwrap().kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    sidecars.insert("eu", w.sidecar("eu"));
    let mut total = 0;
    for t in writers {
        total += t.await.unwrap();
    }
    all_agree(
        &w,
        "SELECT n::text FROM stock WHERE id = 1",
        &total.to_string(),
    )
    .await;
    // the other columns converge by last writer wins
    let labels: std::collections::BTreeSet<Option<String>> = {
        let mut out = std::collections::BTreeSet::new();
        for pg in w.pg.values() {
            let c = pg.client().await;
            out.insert(
                c.query_one("SELECT label FROM stock WHERE id = 1", &[])
                    .await
                    .unwrap()
                    .get(0),
            );
        }
        out
    };
    assert_eq!(labels.len(), 1, "{labels:?}");
    // still exact once everything redelivered has been seen again
    let stamp_sql = "SELECT _pgrelay_hlc::text FROM stock WHERE id = 1";
    let first = w.pg["us"]
        .client()
        .await
        .query_one(stamp_sql, &[])
        .await
        .unwrap();
    all_agree(&w, stamp_sql, first.get(0)).await;
    all_agree(
        &w,
        "SELECT n::text FROM stock WHERE id = 1",
        &total.to_string(),
    )
    .await;

    // concurrent writes of one row: its other columns lost somewhere, and
    // the metric counts them by table and pair
    let conflicts: f64 = ["us", "cn"]
        .iter()
        .map(|r| w.metric_sum(r, "pgrelay_apply_conflicts_total", "table=\"public.stock\""))
        .sum();
    assert!(conflicts > 0.0, "no conflict counted");

    // every increment us sent to eu delivered again (as a restarted capture
    // side would): eu consumes them all and adds nothing
    let brokers = w.brokers["eu"].0.brokers();
    let again: Vec<_> = read_all(&brokers, "pgrelay.us.eu", Duration::from_secs(1))
        .into_iter()
        .filter(|r| r.value["pgrelay"]["merge_from"].is_object())
        .map(|r| {
            (
                Some(serde_json::to_vec(&r.key).unwrap()),
                Some(serde_json::to_vec(&r.value).unwrap()),
            )
        })
        .collect();
    assert!(again.len() >= N as usize, "{} records", again.len());
    produce(&brokers, "pgrelay.us.eu", &again);
    consumed_all(&w.pg["eu"], &brokers, "pgrelay.us.eu").await;
    let n: i64 = w.pg["eu"]
        .client()
        .await
        .query_one("SELECT n FROM stock WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, total, "redelivered increments were added again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_added_concurrently_in_three_regions_are_all_kept() {
    let w = merge_world();
    let _sidecars: Vec<Relay> = crate::sidecar::REGIONS
        .iter()
        .map(|r| w.sidecar(r))
        .collect();
    w.pg["us"].psql("INSERT INTO carts VALUES (1, '{}', 'cart')");
    all_agree(&w, "SELECT note FROM carts WHERE id = 1", "cart").await;
    const N: usize = 100;
    let mut writers = Vec::new();
    for r in crate::sidecar::REGIONS {
        let dsn = w.pg[r].dsn();
        writers.push(tokio::spawn(async move {
            let (c, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            for i in 0..N {
                c.execute(
                    "UPDATE carts SET items = array_append(items, $1) WHERE id = 1",
                    &[&format!("{r}-{i:03}")],
                )
                .await
                .unwrap();
            }
        }));
    }
    for t in writers {
        t.await.unwrap();
    }
    let mut all: Vec<String> = crate::sidecar::REGIONS
        .iter()
        .flat_map(|r| (0..N).map(move |i| format!("{r}-{i:03}")))
        .collect();
    all.sort();
    let want = all.join(",");
    all_agree(
        &w,
        "SELECT string_agg(x, ',' ORDER BY x) FROM carts, unnest(items) AS x WHERE id = 1",
        &want,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counter_table_without_full_identity_stops_capture() {
    let w = merge_world();
    let mut relay = Relay::spawn(&w.cfg["us"], "us", "capture");
    let c = w.pg["us"].client().await;
    c.batch_execute("INSERT INTO stock VALUES (1, 1, 'a')")
        .await
        .unwrap();
    let brokers = w.brokers["eu"].0.brokers();
    let stock_ops = || {
        read_all(&brokers, "pgrelay.us.eu", Duration::from_secs(1))
            .into_iter()
            .filter(|r| r.value["source"]["table"] == "stock")
            .map(|r| r.value["op"].as_str().unwrap_or_default().to_string())
            .collect::<Vec<_>>()
    };
    eventually(Duration::from_secs(30), "the insert published", || {
        let ops = stock_ops();
        async move { (!ops.is_empty()).then_some(()) }
    })
    .await;
    // without the old row an update carries no delta: stop, never lose it
    c.batch_execute(
        "ALTER TABLE stock REPLICA IDENTITY DEFAULT;
         UPDATE stock SET n = n + 1 WHERE id = 1;",
    )
    .await
    .unwrap();
    eventually(Duration::from_secs(60), "the capture side to stop", || {
        let done = matches!(relay.child.try_wait(), Ok(Some(_)));
        async move { done.then_some(()) }
    })
    .await;
    let log = relay.log_text();
    assert!(
        log.contains("public.stock") && log.contains("counter merge columns"),
        "{log}"
    );
    assert_eq!(stock_ops(), ["c"], "only the insert before the change");
}

/// `pgrelay conflicts list` in eu, with `extra` arguments.
fn conflicts_list<'a>(cfg: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["conflicts", "list", "--config", cfg, "--region", "eu"];
    args.extend_from_slice(extra);
    args
}
