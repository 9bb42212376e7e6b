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
            pgrelay::hlc::Hlc::new(us_stamp as u64).readable(),
            pgrelay::hlc::Hlc::new(eu_stamp as u64).readable()
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
pub fn merge_world() -> crate::sidecar::World {
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
    // equal arrays, not only equal sets: the region that wrote last holds
    // the same sorted union as the others
    all_agree(
        &w,
        "SELECT array_to_string(items, ',') FROM carts WHERE id = 1",
        &want,
    )
    .await;
    // removing an item is not a change of the set: the trigger keeps it
    w.pg["eu"].psql("UPDATE carts SET items = items[2:], note = 'trimmed' WHERE id = 1");
    all_agree(&w, "SELECT note FROM carts WHERE id = 1", "trimmed").await;
    all_agree(
        &w,
        "SELECT array_to_string(items, ',') FROM carts WHERE id = 1",
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

const COUNTER_SCHEMA: &str = "
CREATE TABLE products (id int PRIMARY KEY, name text, price numeric, doc text);
CREATE TABLE users (id int PRIMARY KEY, email text);
CREATE TABLE stock (id int PRIMARY KEY, n bigint NOT NULL DEFAULT 0, label text);
";

/// Two regions (us, eu) with the counter table `stock`, one broker; `before`
/// runs in us before `setup` (rows older than pgrelay), then both are set up.
fn counter_pair(before: &str) -> crate::apply::Pair {
    crate::apply::pair_with_tables(
        COUNTER_SCHEMA,
        "
[[tables]]
name = \"public.stock\"
class = \"global\"
[[tables.columns]]
name = \"n\"
merge = \"counter\"
",
        before,
    )
}

/// `id:n` of every row of `stock`, in id order.
async fn counts(pg: &crate::support::pg::Pg) -> String {
    let c = pg.client().await;
    let rows = c
        .query("SELECT id, n FROM stock ORDER BY id", &[])
        .await
        .unwrap();
    rows.iter()
        .map(|r| format!("{}:{}", r.get::<_, i32>(0), r.get::<_, i64>(1)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Waits until `pg`'s counters read `want`.
async fn counts_reach(pg: &crate::support::pg::Pg, want: &str) {
    eventually(
        Duration::from_secs(60),
        &format!("stock at {want}"),
        || async { (counts(pg).await == want).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counter_change_parked_then_replayed_counts_exactly_once() {
    let p = counter_pair("");
    // eu's column refuses what us will reach
    p.eu.psql("ALTER TABLE stock ADD CONSTRAINT small CHECK (n < 10)");
    let _us = Relay::spawn(&p.cfg, "us", "capture");
    let _eu = Relay::spawn(&p.cfg, "eu", "apply");
    p.us.psql("INSERT INTO stock (id, n) VALUES (1, 0), (2, 5)");
    counts_reach(&p.eu, "1:0 2:5").await;
    // both refused in eu and parked; then a later change of row 1 that eu
    // accepts arrives after the parked one
    p.us.psql("UPDATE stock SET n = n + 10");
    let cfg = p.cfg.path.to_str().unwrap();
    let listed = eventually(Duration::from_secs(60), "two changes parked", || async {
        let out = relay::ok(&["dlq", "list", "--config", cfg, "--region", "eu"]);
        out.contains("2 waiting for replay").then_some(out)
    })
    .await;
    // the reason names the constraint, never the row's values
    assert!(listed.contains("violates check constraint"), "{listed}");
    assert!(
        !listed.contains("Failing row") && !listed.contains("15,"),
        "{listed}"
    );
    p.us.psql("UPDATE stock SET n = n - 8 WHERE id = 1");
    counts_reach(&p.eu, "1:2 2:5").await;
    assert_eq!(counts(&p.us).await, "1:2 2:15");
    p.eu.psql("ALTER TABLE stock DROP CONSTRAINT small");
    let first = relay::ok(&["dlq", "replay", "--config", cfg, "--region", "eu"]);
    assert!(first.contains("2 record(s) applied"), "{first}");
    assert_eq!(counts(&p.eu).await, "1:2 2:15", "after the replay");
    let again = relay::ok(&["dlq", "replay", "--config", cfg, "--region", "eu"]);
    assert!(again.contains("0 record(s) applied"), "{again}");
    // every parked record fed through the apply side once more (as a topic
    // read again would): nothing changes
    let brokers = p.broker.brokers();
    let all: Vec<_> = read_all(&brokers, "pgrelay.us.eu", Duration::from_secs(1))
        .into_iter()
        .filter(|r| r.value["source"]["table"] == "stock")
        .map(|r| {
            (
                Some(serde_json::to_vec(&r.key).unwrap()),
                Some(serde_json::to_vec(&r.value).unwrap()),
            )
        })
        .collect();
    assert!(all.len() >= 5, "{} records", all.len());
    // in reverse order: the oldest change arrives last
    let reversed: Vec<_> = all.into_iter().rev().collect();
    produce(&brokers, "pgrelay.us.eu", &reversed);
    consumed_all(&p.eu, &brokers, "pgrelay.us.eu").await;
    assert_eq!(
        counts(&p.eu).await,
        "1:2 2:15",
        "after every record again, reversed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_that_lacked_a_counter_row_gets_its_whole_value_live_and_by_resync() {
    // row 1 is older than pgrelay in us; eu never had it (a new region)
    let p = counter_pair("INSERT INTO stock (id, n) VALUES (1, 100)");
    let _us = Relay::spawn(&p.cfg, "us", "capture");
    let _eu = Relay::spawn(&p.cfg, "eu", "apply");
    // the first change eu sees of row 1 is a decrement
    p.us.psql("UPDATE stock SET n = n - 1 WHERE id = 1");
    counts_reach(&p.eu, "1:99").await;
    let cfg = p.cfg.path.to_str().unwrap();
    relay::ok(&["resync", "--config", cfg, "--region", "us"]);
    p.us.psql(
        "UPDATE stock SET n = n - 1 WHERE id = 1; INSERT INTO products VALUES (9, 'marker', 1)",
    );
    let eu = p.eu.client().await;
    crate::support::until_count(
        &eu,
        "SELECT count(*) FROM products WHERE id = 9",
        1,
        "the marker after the resync",
    )
    .await;
    counts_reach(&p.eu, "1:98").await;
    assert_eq!(counts(&p.us).await, "1:98");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn increments_no_slot_carried_arrive_with_the_resync() {
    let p = counter_pair("");
    let cfg = p.cfg.path.to_str().unwrap();
    let mut us = Relay::spawn(&p.cfg, "us", "capture");
    let _eu = Relay::spawn(&p.cfg, "eu", "apply");
    p.us.psql("INSERT INTO stock (id, n) VALUES (1, 0), (2, 0)");
    counts_reach(&p.eu, "1:0 2:0").await;
    // the slot is lost while us keeps writing
    us.kill9();
    crate::lifecycle::lose_slots(&p.us).await;
    p.us.psql("UPDATE stock SET n = n + 5; UPDATE stock SET n = n + 7 WHERE id = 2");
    // the procedure of docs/operations.md: setup (a new slot), start, resync
    relay::ok(&["setup", "--config", cfg, "--region", "us"]);
    let _us = Relay::spawn(&p.cfg, "us", "capture");
    relay::ok(&["resync", "--config", cfg, "--region", "us"]);
    counts_reach(&p.eu, "1:5 2:12").await;
    p.us.psql("UPDATE stock SET n = n + 1");
    counts_reach(&p.eu, "1:6 2:13").await;
    assert_eq!(counts(&p.us).await, "1:6 2:13");
}

/// The counters' merge as the database runs it (`pgrelay.counts_merge`):
/// random parts of three regions and random deletes, folded in several
/// random orders with repeats, always end at what the rule says — per
/// counter and region the newest part above the last delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_merge_ends_the_same_whatever_the_order() {
    use crate::checker::Rng;
    use std::collections::BTreeMap;
    let pg = crate::support::pg::Pg::start();
    let c = pg.client().await;
    c.batch_execute("CREATE SCHEMA pgrelay").await.unwrap();
    for sql in pgrelay::merge::setup_functions() {
        c.batch_execute(&sql).await.unwrap();
    }
    let merge = c
        .prepare(
            "SELECT pgrelay.counts_merge($1::text::jsonb, $2::text::jsonb, $3::text::bigint, \
             9223372036854775807)::text",
        )
        .await
        .unwrap();
    #[derive(Clone, Debug)]
    enum Event {
        /// Parts of counters `a` and `b`: (column, region, value, stamp).
        Parts(Vec<(&'static str, u8, i64, i64)>),
        Delete(i64),
    }
    let mut rng = Rng::new(7);
    for case in 0..60 {
        let mut events = Vec::new();
        for _ in 0..(3 + rng.below(8)) {
            if rng.chance(20) {
                events.push(Event::Delete(rng.below(100) as i64 + 1));
                continue;
            }
            // one part per counter and region in a row (a few equal
            // stamps across rows on purpose: ties break on the value)
            let mut parts: BTreeMap<(&'static str, u8), (i64, i64)> = BTreeMap::new();
            for _ in 0..(1 + rng.below(4)) {
                let col = if rng.chance(50) { "a" } else { "b" };
                parts.insert(
                    (col, rng.below(3) as u8 + 1),
                    (rng.below(41) as i64 - 20, rng.below(100) as i64 + 1),
                );
            }
            events.push(Event::Parts(
                parts
                    .into_iter()
                    .map(|((c, r), (v, s))| (c, r, v, s))
                    .collect(),
            ));
        }
        // the rule
        let floor = events
            .iter()
            .filter_map(|e| match e {
                Event::Delete(d) => Some(*d),
                _ => None,
            })
            .max()
            .unwrap_or(-1);
        let mut want: BTreeMap<(&str, u8), (i64, i64)> = BTreeMap::new();
        for e in &events {
            if let Event::Parts(ps) = e {
                for &(col, r, v, s) in ps {
                    if s <= floor {
                        continue;
                    }
                    let slot = want.entry((col, r)).or_insert((s, v));
                    if (s, v) > *slot {
                        *slot = (s, v);
                    }
                }
            }
        }
        let mut totals: BTreeMap<&str, i64> = BTreeMap::new();
        for ((col, _), (_, v)) in &want {
            *totals.entry(col).or_default() += v;
        }
        for order in 0..4 {
            let mut seq = events.clone();
            // shuffle, and deliver some twice
            for i in (1..seq.len()).rev() {
                seq.swap(i, rng.below(i as u64 + 1) as usize);
            }
            if order > 0 {
                let extra = seq[rng.below(seq.len() as u64) as usize].clone();
                seq.insert(rng.below(seq.len() as u64) as usize, extra);
            }
            let mut state = String::from("{}");
            let mut deleted: i64 = -1;
            for e in &seq {
                let incoming = match e {
                    Event::Parts(ps) => {
                        let mut obj = serde_json::Map::new();
                        for &(col, r, v, s) in ps {
                            obj.entry(col)
                                .or_insert_with(|| serde_json::json!({}))
                                .as_object_mut()
                                .unwrap()
                                .insert(r.to_string(), serde_json::json!([v, s]));
                        }
                        serde_json::Value::Object(obj).to_string()
                    }
                    Event::Delete(d) => {
                        deleted = deleted.max(*d);
                        "{}".to_string()
                    }
                };
                state = c
                    .query_one(&merge, &[&state, &incoming, &deleted.to_string()])
                    .await
                    .unwrap()
                    .get(0);
            }
            let got: serde_json::Value = serde_json::from_str(&state).unwrap();
            let mut got_totals: BTreeMap<&str, i64> = BTreeMap::new();
            for col in ["a", "b"] {
                if let Some(parts) = got.get(col).and_then(|p| p.as_object()) {
                    let sum: i64 = parts.values().map(|p| p[0].as_i64().unwrap()).sum();
                    got_totals.insert(col, sum);
                    for (r, p) in parts {
                        let r: u8 = r.parse().unwrap();
                        assert_eq!(
                            Some(&(p[1].as_i64().unwrap(), p[0].as_i64().unwrap())),
                            want.get(&(col, r)),
                            "case {case} order {order}: {events:?} -> {state}"
                        );
                    }
                }
            }
            assert_eq!(
                got_totals.values().sum::<i64>(),
                totals.values().sum::<i64>(),
                "case {case} order {order}: {events:?} -> {state}"
            );
            assert_eq!(
                got_totals.len(),
                totals.len(),
                "case {case} order {order}: {events:?} -> {state}"
            );
        }
    }
}
