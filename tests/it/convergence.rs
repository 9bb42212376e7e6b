//! Regressions of convergence defects, each on its own: two regions, real
//! PostgreSQL clusters, one broker, real sidecars. The random checker
//! (`checker.rs`) covers the same ground with random histories.

use std::time::Duration;

use crate::apply::{pair, SCHEMA};
use crate::support::kafka::{produce, read_to_markers};
use crate::support::pg::Pg;
use crate::support::relay::Relay;
use crate::support::{eventually, until_count};

/// `id -> (price, md5(doc), stamp)`.
async fn rows(pg: &Pg) -> Vec<(i32, Option<String>, Option<String>, i64)> {
    let c = pg.client().await;
    c.query(
        "SELECT id, price::text, md5(doc), _pgrelay_hlc FROM products ORDER BY id",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect()
}

async fn same_rows(a: &Pg, b: &Pg, what: &str) -> Vec<(i32, Option<String>, Option<String>, i64)> {
    eventually(Duration::from_secs(60), what, || async {
        let x = rows(a).await;
        let y = rows(b).await;
        (x == y && !x.is_empty()).then_some(x)
    })
    .await
}

/// Runs us's capture and eu's apply until eu holds us's rows, then stops
/// both (what follows is written while nobody replicates).
async fn replicate_us_to_eu(p: &crate::apply::Pair, what: &str) {
    let _us = Relay::spawn(&p.cfg, "us", "capture");
    let _eu = Relay::spawn(&p.cfg, "eu", "apply");
    same_rows(&p.us, &p.eu, what).await;
}

/// SQL for a poorly compressible text of about `kb` kB (TOASTed out of line).
fn big(kb: usize) -> String {
    format!(
        "(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, {}))",
        kb * 1024 / 32
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_and_update_in_one_batch_keep_the_large_value() {
    let p = pair(SCHEMA);
    // both written before capture starts: the insert and the update that
    // leaves the large value untouched reach eu in one batch
    p.us.psql(&format!(
        "INSERT INTO products SELECT i, 'n', 0, {} FROM generate_series(1, 50) i",
        big(10)
    ));
    p.us.psql("UPDATE products SET price = 1");
    p.us.psql("UPDATE products SET name = 'twice'");
    let _us = Relay::spawn(&p.cfg, "us", "capture");
    let _eu = Relay::spawn(&p.cfg, "eu", "apply");
    let state = same_rows(&p.us, &p.eu, "eu to hold us's rows").await;
    assert_eq!(state.len(), 50);
    assert!(
        state.iter().all(|r| r.2.is_some()),
        "no large value lost: {state:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_partial_updates_leave_one_row_per_stamp() {
    let p = pair(SCHEMA);
    p.us.psql(&format!(
        "INSERT INTO products SELECT i, 'n', 0, {} FROM generate_series(1, 20) i",
        big(10)
    ));
    replicate_us_to_eu(&p, "the rows in both regions").await;
    // nobody replicates: us rewrites the large column, then eu (later,
    // newer stamp) updates another column and leaves the large one alone
    p.us.psql(&format!("UPDATE products SET doc = {}", big(10)));
    tokio::time::sleep(Duration::from_millis(20)).await;
    p.eu.psql("UPDATE products SET price = 7");
    let _us = Relay::spawn(&p.cfg, "us", "all");
    let _eu = Relay::spawn(&p.cfg, "eu", "all");
    // eu's change is the newest of every row: both regions end on eu's row,
    // large value included
    let state = eventually(
        Duration::from_secs(60),
        "both regions on eu's rows",
        || async {
            let x = rows(&p.us).await;
            let y = rows(&p.eu).await;
            (x.iter().all(|r| r.1.as_deref() == Some("7")) && x == y).then_some((x, y))
        },
    )
    .await;
    let eu_docs: Vec<Option<String>> = rows(&p.eu).await.into_iter().map(|r| r.2).collect();
    assert_eq!(
        state.0.iter().map(|r| r.2.clone()).collect::<Vec<_>>(),
        eu_docs
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_delete_racing_an_older_apply_does_not_bring_the_row_back() {
    let p = pair(SCHEMA);
    p.us.psql("INSERT INTO products VALUES (1, 'a', 1)");
    replicate_us_to_eu(&p, "the row in both regions").await;
    let _us = Relay::spawn(&p.cfg, "us", "capture");
    // an older update in us...
    p.us.psql("UPDATE products SET price = 2 WHERE id = 1");
    tokio::time::sleep(Duration::from_millis(20)).await;
    // ...and a newer delete in eu, not yet committed when eu applies it
    let eu = p.eu.client().await;
    eu.batch_execute("BEGIN; DELETE FROM products WHERE id = 1")
        .await
        .unwrap();
    let _eu_apply = Relay::spawn(&p.cfg, "eu", "apply");
    let watch = p.eu.client().await;
    apply_waits_on_a_lock(
        &watch,
        "the apply session to wait for the delete's row lock",
        "",
    )
    .await;
    eu.batch_execute("COMMIT").await.unwrap();
    // positive sign: the update's offset is stored in eu
    eventually(Duration::from_secs(60), "eu to store the update's offset", || async {
        let n: i64 = watch
            .query_one(
                "SELECT coalesce(sum(next_offset), 0)::bigint FROM pgrelay.offsets WHERE topic = 'pgrelay.us.eu'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (n >= 2).then_some(())
    })
    .await;
    let left = rows(&p.eu).await;
    assert!(
        left.is_empty(),
        "the newer local delete wins in eu: {left:?}"
    );
}

/// Changes inserted at their source are first written by a plain insert of
/// the keys the target lacks. A local insert of the same key, open while
/// that insert runs, makes it wait and then fail with a unique violation
/// once it commits: the conditional upsert takes over and the stamps
/// decide, with nothing parked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insert_racing_a_local_insert_of_its_key_is_decided_by_stamp() {
    let p = pair(SCHEMA);
    // eu inserts the key first (the older stamp), and does not commit yet
    let eu = p.eu.client().await;
    eu.batch_execute("BEGIN; INSERT INTO products VALUES (1, 'eu', 1)")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    // us inserts it after (the newer stamp)
    p.us.psql("INSERT INTO products VALUES (1, 'us', 2)");
    let _us = Relay::spawn(&p.cfg, "us", "capture");
    let _eu_apply = Relay::spawn(&p.cfg, "eu", "apply");
    let watch = p.eu.client().await;
    apply_waits_on_a_lock(
        &watch,
        "the plain insert to wait for the local insert of its key",
        " AND query NOT ILIKE '%ON CONFLICT%'",
    )
    .await;
    eu.batch_execute("COMMIT").await.unwrap();
    // the newer row, us's, in both regions
    let both = same_rows(&p.us, &p.eu, "us's newer row in eu").await;
    assert_eq!(both.len(), 1);
    assert_eq!(both[0].1.as_deref(), Some("2"), "{both:?}");
    // applied, not parked
    let parked: i64 = watch
        .query_one("SELECT count(*) FROM pgrelay.parked", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(parked, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_loses_its_last_commits_gets_them_again() {
    let p = pair(SCHEMA);
    // eu keeps commits in memory for up to 10 s (asynchronous commit)
    p.eu.psql("ALTER SYSTEM SET wal_writer_delay = '10s'");
    p.eu.psql("SELECT pg_reload_conf()");
    let _us = Relay::spawn(&p.cfg, "us", "capture");
    let _eu = Relay::spawn(&p.cfg, "eu", "apply");
    let us = p.us.client().await;
    for i in 1..=200 {
        us.execute("INSERT INTO products VALUES ($1, 'x', 1)", &[&i])
            .await
            .unwrap();
    }
    let eu_rows = |pg: &Pg| {
        let dsn = pg.dsn();
        async move {
            let (c, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
                .await
                .ok()?;
            tokio::spawn(conn);
            let n: i64 = c
                .query_one("SELECT count(*) FROM products", &[])
                .await
                .ok()?
                .get(0);
            Some(n)
        }
    };
    eventually(Duration::from_secs(60), "eu to apply the rows", || async {
        (eu_rows(&p.eu).await? == 200).then_some(())
    })
    .await;
    // eu crashes: what it committed in the last seconds is gone, offsets too
    p.eu.stop();
    p.eu.restart();
    let after_crash = eu_rows(&p.eu).await.unwrap_or(0);
    eprintln!("eu holds {after_crash} of 200 rows after the crash");
    assert!(
        after_crash < 200,
        "the crash lost no commit, so this test shows nothing: raise wal_writer_delay"
    );
    eventually(
        Duration::from_secs(60),
        "eu to get the lost rows again",
        || async { (eu_rows(&p.eu).await? == 200).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_records_cannot_bend_the_region_clock() {
    let p = pair(SCHEMA);
    let _us = Relay::spawn(&p.cfg, "us", "all");
    let _eu = Relay::spawn(&p.cfg, "eu", "all");
    let cfg = p.cfg.path.to_str().unwrap();
    // the stamps below are relative to now: take now once both sides stream,
    // so a slow start cannot eat the lead of the record meant to wait
    eventually(Duration::from_secs(60), "both pairs active", || async {
        let out = crate::support::relay::cmd(&["status", "--config", cfg]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (text.matches("active").count() == 2).then_some(())
    })
    .await;
    let now = pgrelay::apply::now_ms();
    let env = |id: i32, hlc: u64, lsn: &str, ts_ms: i64| -> (Option<Vec<u8>>, Option<Vec<u8>>) {
        let v = serde_json::json!({
            "before": null, "after": {"id": id.to_string(), "name": "forged", "price": "1"},
            "op": "c", "ts_ms": ts_ms,
            "source": {"connector":"pgrelay","version":"0","name":"pgrelay","region":"us","db":"postgres",
                       "schema": "public", "table": "products", "txId": 1, "lsn": 1, "ts_ms": 1},
            "pgrelay": {"hlc": hlc, "origin":"us","commit_lsn": lsn,"xid":1,"seq":0,"unchanged":[]}
        });
        (None, Some(v.to_string().into_bytes()))
    };
    let stamp = |ms: u64| pgrelay::hlc::Hlc::compose(ms, 0, 1).get();
    let records = vec![
        // near the top of the range
        env(1, i64::MAX as u64 - 5, "0/1", 1),
        // beyond the range of a bigint
        env(2, u64::MAX - 1, "0/1", 1),
        // ten minutes ahead: past relay.max_stamp_ahead (5 min)
        env(3, stamp(now + 600_000), "0/1", 1),
        // a bad commit LSN, a bad commit time
        env(4, stamp(now), "not-an-lsn", 1),
        env(5, stamp(now), "0/1", -5),
        // twelve seconds ahead (max_clock_skew is 2 s here): waits, then applies
        env(6, stamp(now + 12_000), "0/1", 1),
    ];
    produce(&p.broker.brokers(), "pgrelay.us.eu", &records);
    // while the record ahead waits, the pair is lagging, with the reason
    let held = eventually(
        Duration::from_secs(30),
        "status to show the hold",
        || async {
            let out = crate::support::relay::cmd(&["status", "--config", cfg]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            (text.contains("held for") && text.contains("lagging")).then_some(text)
        },
    )
    .await;
    assert!(held.contains("max_clock_skew"), "{held}");
    let eu = p.eu.client().await;
    until_count(
        &eu,
        "SELECT count(*) FROM products WHERE id = 6",
        1,
        "the record a few seconds ahead",
    )
    .await;
    assert!(
        pgrelay::apply::now_ms() >= now + 10_000,
        "the record ahead was applied before the clock came within max_clock_skew of it"
    );
    let parked = read_to_markers(&p.broker.brokers(), "pgrelay.dlq.eu");
    let mut classes: Vec<String> = parked
        .iter()
        .map(|r| {
            r.headers
                .get("pgrelay.dlq.class")
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    classes.sort();
    assert_eq!(
        classes,
        [
            "out_of_range",
            "out_of_range",
            "out_of_range",
            "stamp_ahead",
            "stamp_ahead"
        ],
        "{:?}",
        parked.iter().map(|r| &r.headers).collect::<Vec<_>>()
    );
    let applied: Vec<i32> = eu
        .query("SELECT id FROM products ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(applied, vec![6]);
    // the clock is where wall time says; local writes still win everywhere
    let row = eu
        .query_one(
            "INSERT INTO products VALUES (6, 'local', 9) ON CONFLICT (id) DO UPDATE SET name = 'local' RETURNING _pgrelay_hlc",
            &[],
        )
        .await
        .unwrap();
    let local: i64 = row.get(0);
    assert!(local > 0);
    let ahead = pgrelay::hlc::Hlc::new(local as u64).ahead_ms(pgrelay::apply::now_ms());
    assert!(ahead < 5_000, "eu's clock was dragged {ahead} ms ahead");
    let us = p.us.client().await;
    until_count(
        &us,
        "SELECT count(*) FROM products WHERE id = 6 AND name = 'local'",
        1,
        "eu's local write in us",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_moved_to_a_new_key_stays_gone_under_its_old_key() {
    let p = pair(SCHEMA);
    p.us.psql("INSERT INTO products VALUES (1, 'a', 1)");
    replicate_us_to_eu(&p, "the row in both regions").await;
    // nobody replicates: eu updates row 1 (older), then us moves it to key
    // 2 (newer): the move deletes key 1 in every region
    p.eu.psql("UPDATE products SET price = 5 WHERE id = 1");
    tokio::time::sleep(Duration::from_millis(20)).await;
    p.us.psql("UPDATE products SET id = 2 WHERE id = 1");
    let _us = Relay::spawn(&p.cfg, "us", "all");
    let _eu = Relay::spawn(&p.cfg, "eu", "all");
    let state = eventually(Duration::from_secs(60), "both regions to agree", || async {
        let x = rows(&p.us).await;
        let y = rows(&p.eu).await;
        // positive sign: eu's update was applied or refused in us (us's
        // watermark of eu is set), and the regions agree
        let us = p.us.client().await;
        let seen: i64 = us
            .query_one(
                "SELECT count(*) FROM pgrelay.watermarks WHERE source_region = 'eu'",
                &[],
            )
            .await
            .ok()?
            .get(0);
        (seen > 0 && x == y).then_some(x)
    })
    .await;
    let ids: Vec<i32> = state.iter().map(|r| r.0).collect();
    assert_eq!(ids, vec![2], "{state:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_older_than_a_purged_tombstone_is_parked_not_resurrected() {
    let p = crate::apply::pair_with(SCHEMA, "tombstone_horizon = \"2s\"");
    p.us.psql("INSERT INTO products VALUES (1, 'a', 1)");
    replicate_us_to_eu(&p, "the row in both regions").await;
    // eu updates the row (older), us deletes it (newer); eu's update reaches
    // us only after us has purged the delete's tombstone
    p.eu.psql("UPDATE products SET price = 5 WHERE id = 1");
    tokio::time::sleep(Duration::from_millis(20)).await;
    p.us.psql("DELETE FROM products WHERE id = 1");
    let _us = Relay::spawn(&p.cfg, "us", "all");
    let us = p.us.client().await;
    eventually(
        Duration::from_secs(60),
        "us to purge the tombstone",
        || async {
            let n: i64 = us
                .query_one("SELECT count(*) FROM pgrelay.tombstones", &[])
                .await
                .ok()?
                .get(0);
            let h: i64 = us
                .query_one("SELECT coalesce(max(hlc), 0) FROM pgrelay.horizon", &[])
                .await
                .ok()?
                .get(0);
            (n == 0 && h > 0).then_some(())
        },
    )
    .await;
    let _eu = Relay::spawn(&p.cfg, "eu", "all");
    // positive sign: eu's update is parked in us, with its reason
    let parked = eventually(
        Duration::from_secs(60),
        "eu's update parked in us",
        || async {
            let parked = read_to_markers(&p.broker.brokers(), "pgrelay.dlq.us");
            (!parked.is_empty()).then_some(parked)
        },
    )
    .await;
    assert_eq!(
        parked[0]
            .headers
            .get("pgrelay.dlq.class")
            .map(String::as_str),
        Some("beyond_horizon"),
        "{:?}",
        parked[0].headers
    );
    let state = same_rows_or_empty(&p.us, &p.eu).await;
    assert!(
        state.is_empty(),
        "the deleted row stays deleted everywhere: {state:?}"
    );
}

/// The watermark rows of a region removed from the config (a source that
/// will never deliver again) do not hold the tombstone purge back: they are
/// ignored, with a warning naming the region.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_regions_watermarks_do_not_hold_the_tombstone_purge_back() {
    let p = crate::apply::pair_with(SCHEMA, "tombstone_horizon = \"2s\"");
    // what a region "gone" left behind in us: a watermark far in the past
    p.us.psql(
        "INSERT INTO pgrelay.watermark_parts (source_region, session, hlc) VALUES ('gone', 0, 1)",
    );
    p.us.psql("INSERT INTO products VALUES (1, 'a', 1)");
    p.us.psql("DELETE FROM products WHERE id = 1");
    let relay = Relay::spawn(&p.cfg, "us", "all");
    let us = p.us.client().await;
    eventually(
        Duration::from_secs(60),
        "us to purge the tombstone",
        || async {
            let n: i64 = us
                .query_one("SELECT count(*) FROM pgrelay.tombstones", &[])
                .await
                .ok()?
                .get(0);
            let h: i64 = us
                .query_one("SELECT coalesce(max(hlc), 0) FROM pgrelay.horizon", &[])
                .await
                .ok()?
                .get(0);
            (n == 0 && h > 0).then_some(())
        },
    )
    .await;
    let log = relay.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("not in the config") && l.contains("gone")),
        "{log}"
    );
}

/// Waits until both regions agree (possibly on no rows at all).
async fn same_rows_or_empty(a: &Pg, b: &Pg) -> Vec<(i32, Option<String>, Option<String>, i64)> {
    eventually(Duration::from_secs(60), "both regions to agree", || async {
        let x = rows(a).await;
        let y = rows(b).await;
        (x == y).then_some(x)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_the_residency_policy_would_not_send_are_parked() {
    use crate::support::broker::Broker;
    use crate::support::relay::{self, ConfigFile};
    let schema = "CREATE TABLE o (id int PRIMARY KEY, n int);
                  CREATE TABLE p (id int PRIMARY KEY, home text NOT NULL, n int);";
    let (us, eu) = (Pg::start(), Pg::start());
    us.psql(schema);
    eu.psql(schema);
    let broker = Broker::start();
    let cfg = ConfigFile::new(&format!(
        r#"
[kafka]
brokers = "{}"

[regions.us]
id = 1
{}

[regions.eu]
id = 2
{}

[[tables]]
name = "public.o"
class = "owned"
owner = "eu"

[[tables]]
name = "public.p"
class = "partitioned"
home_column = "home"
aliases = {{ US = "us", DE = "eu" }}
[tables.allow]
us = []
eu = ["us"]
"#,
        broker.brokers(),
        crate::support::pg::region_dsns(&us.dsn()),
        crate::support::pg::region_dsns(&eu.dsn())
    ));
    let path = cfg.path.to_str().unwrap();
    for r in ["us", "eu"] {
        relay::ok(&["setup", "--config", path, "--region", r]);
    }
    let _eu = Relay::spawn(&cfg, "eu", "apply");
    let stamp = pgrelay::hlc::Hlc::compose(pgrelay::apply::now_ms(), 0, 1);
    let env = |table: &str, after: serde_json::Value| -> (Option<Vec<u8>>, Option<Vec<u8>>) {
        let v = serde_json::json!({
            "before": null, "after": after, "op": "c", "ts_ms": 1,
            "source": {"schema": "public", "table": table},
            "pgrelay": {"hlc": stamp, "origin": "us", "commit_lsn": "0/1"}
        });
        // one key: one partition, so the marker last is processed last
        (Some(b"k".to_vec()), Some(v.to_string().into_bytes()))
    };
    produce(
        &broker.brokers(),
        "pgrelay.us.eu",
        &[
            // eu owns o: us may not write it
            env("o", serde_json::json!({"id": "1", "n": "1"})),
            // a row homed in us may not live in eu, by name or by alias
            env("p", serde_json::json!({"id": "1", "home": "us", "n": "1"})),
            env("p", serde_json::json!({"id": "2", "home": "US", "n": "1"})),
            // no declared home at all
            env("p", serde_json::json!({"id": "3", "home": "XX", "n": "1"})),
            // the marker: homed in eu, welcome
            env("p", serde_json::json!({"id": "4", "home": "DE", "n": "1"})),
        ],
    );
    let c = eu.client().await;
    until_count(
        &c,
        "SELECT count(*) FROM p WHERE id = 4",
        1,
        "the marker row in eu",
    )
    .await;
    let held: i64 = c
        .query_one(
            "SELECT (SELECT count(*) FROM o) + (SELECT count(*) FROM p)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(held, 1, "only the marker was applied");
    let parked = read_to_markers(&broker.brokers(), "pgrelay.dlq.eu");
    let classes: Vec<&str> = parked
        .iter()
        .map(|r| r.headers["pgrelay.dlq.class"].as_str())
        .collect();
    assert_eq!(classes, ["not_admitted"; 4], "{parked:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_clock_refuses_writes_instead_of_wrapping() {
    let p = pair(SCHEMA);
    let us = p.us.client().await;
    us.batch_execute("SELECT setval('pgrelay.hlc_logical', (1::bigint << 57) - 2)")
        .await
        .unwrap();
    // the last logical time a stamp holds is still given out...
    let last: i64 = us
        .query_one(
            "INSERT INTO products VALUES (1, 'a', 1) RETURNING _pgrelay_hlc",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(last > 0 && pgrelay::hlc::Hlc::new(last as u64).logical() == (1 << 57) - 1);
    // ...then the clock refuses, never a negative stamp
    let err = us
        .execute("INSERT INTO products VALUES (2, 'b', 1)", &[])
        .await
        .expect_err("a write past the clock's range");
    assert!(
        format!("{err:?}").contains("region clock is exhausted"),
        "{err:?}"
    );
}

/// Waits until pgrelay's apply session in `watch`'s cluster waits on a lock
/// while inserting into `products` (`also`: a further condition on the
/// query text).
async fn apply_waits_on_a_lock(watch: &tokio_postgres::Client, what: &str, also: &str) {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgrelay' \
         AND wait_event_type = 'Lock' AND query ILIKE 'INSERT INTO%products%'{also}"
    );
    eventually(Duration::from_secs(60), what, || async {
        let n: i64 = watch.query_one(&sql, &[]).await.unwrap().get(0);
        (n > 0).then_some(())
    })
    .await;
}
