//! The apply side end to end: two regions, each a real PostgreSQL cluster,
//! one broker, real sidecars.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::support::broker::Broker;
use crate::support::eventually;
use crate::support::kafka::{produce, read_all, RawRecord};
use crate::support::pg::{region_dsns, Pg};
use crate::support::relay::{self, ConfigFile, Relay};

pub const SCHEMA: &str = "
CREATE TABLE products (id int PRIMARY KEY, name text, price numeric, doc text);
CREATE TABLE users (id int PRIMARY KEY, email text);
";

pub struct Pair {
    pub us: Pg,
    pub eu: Pg,
    pub broker: Broker,
    pub cfg: ConfigFile,
}

pub fn config(us: &str, eu: &str, brokers: &str) -> String {
    let (us, eu) = (region_dsns(us), region_dsns(eu));
    format!(
        r#"
[relay]
prefix = "pgrelay"
max_clock_skew = "2s"

[relay.capture]
status_interval = "200ms"

[relay.apply]
batch_max_records = 2000
batch_max_wait = "50ms"

[kafka]
brokers = "{brokers}"

[regions.us]
id = 1
{us}

[regions.eu]
id = 2
{eu}

[[tables]]
name = "public.products"
class = "global"

[[tables]]
name = "public.users"
class = "local"
"#
    )
}

pub fn pair(schema: &str) -> Pair {
    pair_with(schema, "")
}

/// [`pair`] with more `[relay.apply]` settings.
pub fn pair_with(schema: &str, apply_settings: &str) -> Pair {
    pair_on(schema, apply_settings, Broker::start())
}

/// [`pair_with`] on a given broker.
pub fn pair_on(schema: &str, apply_settings: &str, broker: Broker) -> Pair {
    pair_built(schema, "", broker, |text| {
        text.replace(
            "batch_max_wait = \"50ms\"\n",
            &format!("batch_max_wait = \"50ms\"\n{apply_settings}\n"),
        )
    })
}

/// [`pair`] with more `[[tables]]` declared (TOML appended to the config)
/// and `before` run in us before `setup` (rows older than pgrelay).
pub fn pair_with_tables(schema: &str, tables: &str, before: &str) -> Pair {
    pair_built(schema, before, Broker::start(), |text| text + tables)
}

/// Two clusters with `schema` (and `before` in us), the config `edit`
/// makes of [`config`], both regions set up.
fn pair_built(
    schema: &str,
    before: &str,
    broker: Broker,
    edit: impl FnOnce(String) -> String,
) -> Pair {
    let us = Pg::start();
    let eu = Pg::start();
    us.psql(schema);
    eu.psql(schema);
    if !before.is_empty() {
        us.psql(before);
    }
    let text = edit(config(&us.dsn(), &eu.dsn(), &broker.brokers()));
    let cfg = ConfigFile::new(&text);
    for r in ["us", "eu"] {
        relay::ok(&[
            "setup",
            "--config",
            cfg.path.to_str().unwrap(),
            "--region",
            r,
        ]);
    }
    Pair {
        us,
        eu,
        broker,
        cfg,
    }
}

/// `id -> (price, stamp)` of every row.
pub async fn dump(pg: &Pg) -> BTreeMap<i32, (Option<String>, Option<String>, i64)> {
    let c = pg.client().await;
    c.query(
        "SELECT id, price::text, name, _pgrelay_hlc FROM products ORDER BY id",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| {
        (
            r.get(0),
            (r.get(1), r.get(2), r.get::<_, Option<i64>>(3).unwrap_or(0)),
        )
    })
    .collect()
}

/// Waits until both regions hold the same rows.
pub async fn converged(
    a: &Pg,
    b: &Pg,
    timeout: Duration,
) -> BTreeMap<i32, (Option<String>, Option<String>, i64)> {
    eventually(timeout, "both regions to hold the same rows", || async {
        let x = dump(a).await;
        let y = dump(b).await;
        (x == y).then_some(x)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_conflicting_updates_converge_on_the_highest_stamp() {
    let p = pair(SCHEMA);
    let _us = Relay::spawn(&p.cfg, "us", "all");
    let _eu = Relay::spawn(&p.cfg, "eu", "all");
    p.us.psql("INSERT INTO products (id, name, price) SELECT g, 'p' || g, 0 FROM generate_series(1, 50) g");
    converged(&p.us, &p.eu, Duration::from_secs(60)).await;

    // writers in both regions hammer the same 50 rows; every write logs its stamp
    let mut writers = Vec::new();
    for (region, dsn) in [("us", p.us.dsn()), ("eu", p.eu.dsn())] {
        writers.push(tokio::spawn(async move {
            let (mut c, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            let mut log = Vec::new();
            for i in 0..1500i32 {
                let id = (i * 7 + if region == "us" { 0 } else { 3 }) % 50 + 1;
                let value = format!("{region}-{i}");
                if i % 10 == 9 {
                    // a delete: its stamp is the tombstone's
                    let tx = c.transaction().await.unwrap();
                    let n = tx.execute("DELETE FROM products WHERE id = $1", &[&id]).await.unwrap();
                    if n == 1 {
                        let row = tx
                            .query_one(
                                "SELECT hlc FROM pgrelay.tombstones WHERE table_name = 'public.products' AND pk = jsonb_build_object('id', $1::int::text)",
                                &[&id],
                            )
                            .await
                            .unwrap();
                        log.push((id, None, row.get::<_, i64>(0)));
                    }
                    tx.commit().await.unwrap();
                    continue;
                }
                let row = c
                    .query_one(
                        "INSERT INTO products (id, name, price) VALUES ($2, $1, 1) \
                         ON CONFLICT (id) DO UPDATE SET name = $1, price = products.price + 1 RETURNING _pgrelay_hlc",
                        &[&value, &id],
                    )
                    .await
                    .unwrap();
                log.push((id, Some(value), row.get::<_, i64>(0)));
            }
            log
        }));
    }
    let mut log = Vec::new();
    for w in writers {
        log.extend(w.await.unwrap());
    }
    let state = converged(&p.us, &p.eu, Duration::from_secs(120)).await;
    // every row holds its highest-stamped write; a row whose highest stamp
    // is a delete is gone everywhere
    let mut expected: BTreeMap<i32, (Option<String>, i64)> = BTreeMap::new();
    for (id, value, stamp) in log {
        let e = expected.entry(id).or_insert((None, i64::MIN));
        if stamp > e.1 {
            *e = (value, stamp);
        }
    }
    let mut deleted = 0;
    for (id, (value, stamp)) in expected {
        match value {
            None => {
                deleted += 1;
                assert!(
                    !state.contains_key(&id),
                    "row {id}: deleted last, yet present"
                );
            }
            Some(value) => {
                let (_, name, row_stamp) = &state[&id];
                assert_eq!(name.as_deref(), Some(value.as_str()), "row {id}");
                assert_eq!(*row_stamp, stamp, "row {id}");
            }
        }
    }
    eprintln!("{deleted} rows ended deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_and_reordered_records_change_nothing() {
    let p = pair(SCHEMA);
    let mut us = Relay::spawn(&p.cfg, "us", "capture");
    let _eu = Relay::spawn(&p.cfg, "eu", "apply");
    p.us.psql(
        "INSERT INTO products (id, name, price) SELECT g, 'p' || g, g FROM generate_series(1, 300) g;
         UPDATE products SET price = price * 2 WHERE id % 3 = 0;
         DELETE FROM products WHERE id % 10 = 0;
         UPDATE products SET name = 'late' WHERE id % 7 = 0;",
    );
    let before = converged(&p.us, &p.eu, Duration::from_secs(60)).await;
    assert_eq!(before.len(), 270);
    us.terminate(Duration::from_secs(20));
    // every record again, twice, newest first
    let recs = read_all(&p.broker.brokers(), "pgrelay.us.eu", Duration::from_secs(2));
    assert!(recs.len() >= 300 + 100 + 30 + 38, "{} records", recs.len());
    let mut again: Vec<RawRecord> = recs
        .iter()
        .rev()
        .map(|r| {
            (
                Some(r.key.to_string().into_bytes()),
                Some(r.value.to_string().into_bytes()),
            )
        })
        .collect();
    again.extend(again.clone());
    produce(&p.broker.brokers(), "pgrelay.us.eu", &again);
    let total = (recs.len() + again.len()) as i64;
    let eu = p.eu.client().await;
    eventually(Duration::from_secs(60), "the applier to consume the re-deliveries", || async {
        let row = eu
            .query_one("SELECT coalesce(sum(next_offset), 0)::bigint FROM pgrelay.offsets WHERE topic = 'pgrelay.us.eu'", &[])
            .await
            .unwrap();
        (row.get::<_, i64>(0) >= total).then_some(())
    })
    .await;
    assert_eq!(dump(&p.eu).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applier_killed_repeatedly_mid_stream_ends_identical() {
    let p = pair(SCHEMA);
    let _us = Relay::spawn(&p.cfg, "us", "capture");
    let mut eu = Relay::spawn(&p.cfg, "eu", "apply");
    let dsn = p.us.dsn();
    let writer = tokio::spawn(async move {
        let (c, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        for b in 0..100i32 {
            c.batch_execute(&format!(
                "INSERT INTO products (id, name, price) SELECT g, 'p' || g, 1 FROM generate_series({}, {}) g",
                b * 1000 + 1,
                b * 1000 + 1000
            ))
            .await
            .unwrap();
        }
    });
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        eu.kill9();
        eu = Relay::spawn(&p.cfg, "eu", "apply");
    }
    writer.await.unwrap();
    let state = converged(&p.us, &p.eu, Duration::from_secs(240)).await;
    assert_eq!(state.len(), 100_000);
    let eu_client = p.eu.client().await;
    let stored: i64 = eu_client
        .query_one(
            "SELECT count(*) FROM pgrelay.offsets WHERE topic = 'pgrelay.us.eu'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(stored > 0, "offsets are stored in the target database");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_against_concurrent_update_converges_and_never_resurrects() {
    let p = pair(SCHEMA);
    // both sides capture, nobody applies yet: the writes are concurrent
    let mut us_cap = Relay::spawn(&p.cfg, "us", "capture");
    let mut eu_cap = Relay::spawn(&p.cfg, "eu", "capture");
    p.us.psql("INSERT INTO products VALUES (1, 'a', 1), (2, 'b', 2)");
    p.eu.psql("INSERT INTO products VALUES (1, 'a', 1), (2, 'b', 2)");
    // row 1: eu updates first (older), us deletes later (newer): delete wins
    p.eu.psql("UPDATE products SET name = 'eu-update' WHERE id = 1");
    tokio::time::sleep(Duration::from_millis(20)).await;
    p.us.psql("DELETE FROM products WHERE id = 1");
    // row 2: us deletes first (older), eu updates later (newer): update wins
    p.us.psql("DELETE FROM products WHERE id = 2");
    tokio::time::sleep(Duration::from_millis(20)).await;
    p.eu.psql("UPDATE products SET name = 'eu-late' WHERE id = 2");
    tokio::time::sleep(Duration::from_secs(2)).await;
    us_cap.terminate(Duration::from_secs(20));
    eu_cap.terminate(Duration::from_secs(20));
    let _us = Relay::spawn(&p.cfg, "us", "all");
    let _eu = Relay::spawn(&p.cfg, "eu", "all");
    let state = converged(&p.us, &p.eu, Duration::from_secs(60)).await;
    assert!(
        !state.contains_key(&1),
        "the newer delete wins in both regions: {state:?}"
    );
    assert_eq!(
        state.get(&2).and_then(|r| r.1.clone()).as_deref(),
        Some("eu-late")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constraint_violation_is_parked_then_replayed_once() {
    let p = pair(SCHEMA);
    p.eu.psql("ALTER TABLE products ADD CONSTRAINT cheap CHECK (price < 100)");
    let _us = Relay::spawn(&p.cfg, "us", "capture");
    let _eu = Relay::spawn(&p.cfg, "eu", "apply");
    p.us.psql("INSERT INTO products VALUES (1, 'ok', 5), (2, 'pricey', 500), (3, 'fine', 7)");
    let eu = p.eu.client().await;
    eventually(
        Duration::from_secs(60),
        "the valid rows to apply",
        || async {
            let n: i64 = eu
                .query_one("SELECT count(*) FROM products", &[])
                .await
                .unwrap()
                .get(0);
            (n == 2).then_some(())
        },
    )
    .await;
    let cfg = p.cfg.path.to_str().unwrap();
    let listed = eventually(Duration::from_secs(30), "the dead letter", || async {
        let out = relay::ok(&["dlq", "list", "--config", cfg, "--region", "eu"]);
        out.contains("constraint_violation").then_some(out)
    })
    .await;
    assert!(listed.contains("23514"), "{listed}");
    assert!(listed.contains("pgrelay.us.eu"), "{listed}");
    // tried relay.apply.max_retries times (the default, 5), then parked
    assert!(
        listed.contains("waiting  constraint_violation  attempts=5"),
        "{listed}"
    );
    assert!(listed.contains("1 waiting for replay"), "{listed}");
    let dry = relay::ok(&[
        "dlq",
        "replay",
        "--config",
        cfg,
        "--region",
        "eu",
        "--dry-run",
    ]);
    assert!(dry.contains("would fail"), "{dry}");
    eu.batch_execute("ALTER TABLE products DROP CONSTRAINT cheap")
        .await
        .unwrap();
    let first = relay::ok(&["dlq", "replay", "--config", cfg, "--region", "eu"]);
    assert!(first.contains("1 record(s) applied"), "{first}");
    let row: String = eu
        .query_one("SELECT name FROM products WHERE id = 2", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(row, "pricey");
    let before = dump(&p.eu).await;
    let second = relay::ok(&["dlq", "replay", "--config", cfg, "--region", "eu"]);
    assert!(second.contains("0 record(s) applied"), "{second}");
    assert_eq!(dump(&p.eu).await, before);
    let listed = relay::ok(&["dlq", "list", "--config", cfg, "--region", "eu"]);
    assert!(
        listed.contains("replayed  constraint_violation"),
        "{listed}"
    );
    assert!(listed.contains("0 waiting for replay"), "{listed}");
}

/// `pgrelay.wait_for` answers for what was applied, not for what was
/// passed: a parked change holds it back (false at its timeout) although a
/// later change of the same source is applied, until `dlq replay` applies
/// it. Positions before the parked change are not held back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_waits_for_a_parked_change_until_it_is_replayed() {
    let p = pair_with(SCHEMA, "max_retries = 1");
    p.eu.psql("ALTER TABLE products ADD CONSTRAINT cheap CHECK (price < 100)");
    let _us = Relay::spawn(&p.cfg, "us", "capture");
    let _eu = Relay::spawn(&p.cfg, "eu", "apply");
    let us = p.us.client().await;
    let eu = p.eu.client().await;
    let write_then_lsn = |sql: &'static str| {
        let us = &us;
        async move {
            us.batch_execute(sql).await.unwrap();
            us.query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
                .await
                .unwrap()
                .get::<_, String>(0)
        }
    };
    let wait_for = |lsn: String, timeout: &'static str| {
        let eu = &eu;
        async move {
            let started = std::time::Instant::now();
            let ok: bool = eu
                .query_one(
                    "SELECT pgrelay.wait_for('us', $1::text::pg_lsn, $2::text::interval)",
                    &[&lsn, &timeout],
                )
                .await
                .unwrap()
                .get(0);
            (ok, started.elapsed())
        }
    };
    let before = write_then_lsn("INSERT INTO products VALUES (1, 'ok', 5)").await;
    assert!(wait_for(before.clone(), "60s").await.0, "the first write");
    // parked in eu (its check constraint), then a change eu applies
    write_then_lsn("INSERT INTO products VALUES (2, 'pricey', 500)").await;
    let after = write_then_lsn("INSERT INTO products VALUES (3, 'fine', 7)").await;
    let cfg = p.cfg.path.to_str().unwrap();
    eventually(
        Duration::from_secs(60),
        "the later change applied and the other parked",
        || async {
            let n: i64 = eu
                .query_one("SELECT count(*) FROM products WHERE id = 3", &[])
                .await
                .unwrap()
                .get(0);
            let out = relay::ok(&["dlq", "list", "--config", cfg, "--region", "eu"]);
            (n == 1 && out.contains("constraint_violation")).then_some(())
        },
    )
    .await;
    let (ok, took) = wait_for(after.clone(), "1s").await;
    assert!(
        !ok,
        "a change committed before {after} is parked, not applied"
    );
    assert!(took >= Duration::from_secs(1), "{took:?}");
    assert!(
        wait_for(before.clone(), "1s").await.0,
        "{before} precedes the parked change"
    );
    eu.batch_execute("ALTER TABLE products DROP CONSTRAINT cheap")
        .await
        .unwrap();
    let replayed = relay::ok(&["dlq", "replay", "--config", cfg, "--region", "eu"]);
    assert!(replayed.contains("1 record(s) applied"), "{replayed}");
    assert!(wait_for(after, "10s").await.0, "applied by the replay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_and_injection_records_are_parked_never_executed() {
    // a column the target lacks is parked at once, not waited for
    let p = pair_with(SCHEMA, "schema_wait = \"0s\"");
    let _eu = Relay::spawn(&p.cfg, "eu", "apply");
    p.eu.psql("INSERT INTO users VALUES (1, 'stays@example.com')");
    let env_at = |schema: &str, table: &str, after: &str, hlc: u64| -> Vec<u8> {
        serde_json::json!({
            "before": null, "after": serde_json::from_str::<serde_json::Value>(after).unwrap(), "op": "c", "ts_ms": 1,
            "source": {"connector":"pgrelay","version":"0","name":"pgrelay","region":"us","db":"postgres",
                       "schema": schema, "table": table, "txId": 1, "lsn": 1, "ts_ms": 1},
            "pgrelay": {"hlc": hlc, "origin":"us","commit_lsn":"0/1","xid":1,"seq":0,"unchanged":[]}
        })
        .to_string()
        .into_bytes()
    };
    // an early stamp of us (region id 1)
    let env =
        |schema: &str, table: &str, after: &str| env_at(schema, table, after, (1u64 << 30) | 1);
    // a stamp an hour ahead of the local clock
    let future = pgrelay::hlc::Hlc::compose(pgrelay::apply::now_ms() + 3_600_000, 0, 1).get();
    let records = vec![
        (None, Some(b"\x00\xffnot json at all".to_vec())),
        (
            None,
            Some(env(
                "public",
                "products\"; DROP TABLE users; --",
                r#"{"id":"1"}"#,
            )),
        ),
        (
            None,
            Some(env("public", "users", r#"{"id":"9","email":"x"}"#)),
        ), // local: not writable
        (
            None,
            Some(env(
                "public",
                "products",
                r#"{"id":"5","name\"; DROP TABLE users; --":"x"}"#,
            )),
        ),
        // a record format newer than this release reads
        (
            None,
            Some({
                let mut v: serde_json::Value = serde_json::from_slice(&env(
                    "public",
                    "products",
                    r#"{"id":"9","name":"newer","price":"3"}"#,
                ))
                .unwrap();
                v["pgrelay"]["format"] = (pgrelay::publish::envelope::FORMAT + 1).into();
                serde_json::to_vec(&v).unwrap()
            }),
        ),
        (
            None,
            Some(env(
                "public",
                "products",
                r#"{"id":"7","name":"valid","price":"3"}"#,
            )),
        ),
        (
            None,
            Some(env_at(
                "public",
                "products",
                r#"{"id":"8","name":"future","price":"3"}"#,
                future,
            )),
        ),
    ];
    produce(&p.broker.brokers(), "pgrelay.us.eu", &records);
    let eu = p.eu.client().await;
    eventually(
        Duration::from_secs(60),
        "the valid record after the bad ones",
        || async {
            let n: i64 = eu
                .query_one("SELECT count(*) FROM products WHERE id = 7", &[])
                .await
                .unwrap()
                .get(0);
            (n == 1).then_some(())
        },
    )
    .await;
    let users: i64 = eu
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(users, 1, "users untouched");
    let cfg = p.cfg.path.to_str().unwrap();
    let listed = relay::ok(&["dlq", "list", "--config", cfg, "--region", "eu"]);
    // the stamp an hour ahead is parked, not applied: the clock never follows it
    assert!(listed.contains("6 parked record(s)"), "{listed}");
    assert!(
        listed.contains("newer_format")
            && listed.contains(&format!(
                "record format {}",
                pgrelay::publish::envelope::FORMAT + 1
            )),
        "{listed}"
    );
    let newer: i64 = eu
        .query_one("SELECT count(*) FROM products WHERE id = 9", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(newer, 0, "a record of a newer format applied");
    assert!(listed.contains("stamp_ahead"), "{listed}");
    assert!(listed.contains("poison"), "{listed}");
    assert_eq!(listed.matches("undeclared_table").count(), 2, "{listed}");
    assert!(listed.contains("unknown_column"), "{listed}");
}

/// A change is stamped where it is written: one in us's topic whose stamp
/// claims eu (or an undeclared region) is parked, never applied, so it can
/// neither pass for eu's write in the conflict log nor outrank eu's own.
/// A record `resync` sent (transaction id 0) carries its row's own stamp,
/// whichever region made it, and is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_stamped_as_another_region_are_parked() {
    let p = pair(SCHEMA);
    let _eu = Relay::spawn(&p.cfg, "eu", "apply");
    let now = pgrelay::apply::now_ms();
    let env = |id: i32, region_id: u8, xid: u64| -> (Option<Vec<u8>>, Option<Vec<u8>>) {
        let v = serde_json::json!({
            "before": null, "after": {"id": id.to_string(), "name": "claimed", "price": "1"},
            "op": "c", "ts_ms": now,
            "source": {"connector":"pgrelay","version":"0","name":"pgrelay","region":"us","db":"postgres",
                       "schema": "public", "table": "products", "txId": xid, "lsn": 1, "ts_ms": now},
            "pgrelay": {"hlc": pgrelay::hlc::Hlc::compose(now, 0, region_id), "origin": "us",
                        "commit_lsn": "0/1", "xid": xid, "seq": 0, "unchanged": []}
        });
        // one key: one partition, so the last record is processed last
        (Some(b"k".to_vec()), Some(v.to_string().into_bytes()))
    };
    produce(
        &p.broker.brokers(),
        "pgrelay.us.eu",
        &[
            // live changes stamped as eu's (id 2) and as an undeclared region's
            env(1, 2, 700),
            env(2, 9, 701),
            // a resync of a row eu wrote, as us holds it
            env(3, 2, 0),
            // us's own
            env(4, 1, 702),
        ],
    );
    let eu = p.eu.client().await;
    eventually(Duration::from_secs(60), "us's own change", || async {
        let n: i64 = eu
            .query_one("SELECT count(*) FROM products WHERE id = 4", &[])
            .await
            .unwrap()
            .get(0);
        (n == 1).then_some(())
    })
    .await;
    let ids: Vec<i32> = eu
        .query("SELECT id FROM products ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, [3, 4], "the resynced row and us's own change only");
    let cfg = p.cfg.path.to_str().unwrap();
    let listed = relay::ok(&["dlq", "list", "--config", cfg, "--region", "eu"]);
    assert!(listed.contains("2 parked record(s)"), "{listed}");
    assert_eq!(listed.matches("foreign_stamp").count(), 2, "{listed}");
    assert!(listed.contains("carries region id 2"), "{listed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_replicates_and_late_older_rows_stay_out() {
    let p = pair(SCHEMA);
    let _us = Relay::spawn(&p.cfg, "us", "all");
    let _eu = Relay::spawn(&p.cfg, "eu", "all");
    p.us.psql(
        "INSERT INTO products (id, name, price) SELECT g, 'old', 1 FROM generate_series(1, 200) g",
    );
    converged(&p.us, &p.eu, Duration::from_secs(60)).await;
    p.us.psql("TRUNCATE products");
    p.us.psql("INSERT INTO products (id, name, price) SELECT g, 'new', 2 FROM generate_series(150, 160) g");
    let state = converged(&p.us, &p.eu, Duration::from_secs(60)).await;
    assert_eq!(state.len(), 11);
    assert!(state.values().all(|r| r.1.as_deref() == Some("new")));
    // a change stamped before the truncate, arriving late, stays out
    let old = read_all(&p.broker.brokers(), "pgrelay.us.eu", Duration::from_secs(2))
        .into_iter()
        .find(|r| r.value["op"] == "c" && r.value["after"]["name"] == "old")
        .unwrap();
    // then, in the same partition, a newer marker: once it is applied, the
    // late record before it was processed
    let mut marker = old.value.clone();
    marker["after"]["id"] = serde_json::json!("999");
    marker["after"]["name"] = serde_json::json!("marker");
    marker["pgrelay"]["hlc"] =
        serde_json::json!(pgrelay::hlc::Hlc::compose(pgrelay::apply::now_ms(), 0, 1));
    produce(
        &p.broker.brokers(),
        "pgrelay.us.eu",
        &[
            (
                Some(old.key.to_string().into_bytes()),
                Some(old.value.to_string().into_bytes()),
            ),
            (
                Some(old.key.to_string().into_bytes()),
                Some(marker.to_string().into_bytes()),
            ),
        ],
    );
    eventually(
        Duration::from_secs(60),
        "the marker after the late record",
        || async { dump(&p.eu).await.contains_key(&999).then_some(()) },
    )
    .await;
    let state = dump(&p.eu).await;
    assert_eq!(state.len(), 12, "{state:?}");
    assert!(state.values().all(|r| r.1.as_deref() != Some("old")));
}

/// json and jsonb values (and domains over them) arrive as the same
/// documents, not as JSON strings holding their text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_documents_replicate_as_documents() {
    let p = pair(
        "CREATE DOMAIN doc_t AS jsonb CHECK (VALUE IS NOT NULL);
         CREATE TABLE products (id int PRIMARY KEY, name text, price numeric, doc text,
             attrs jsonb, raw json, extra doc_t);
         CREATE TABLE users (id int PRIMARY KEY, email text);",
    );
    let _us = Relay::spawn(&p.cfg, "us", "capture");
    let _eu = Relay::spawn(&p.cfg, "eu", "apply");
    p.us.psql(
        r#"INSERT INTO products (id, name, doc, attrs, raw, extra) VALUES
           (1, 'a', '{"k": 1}', '{"k": 1, "tags": ["x", "y"]}', '{"z":  1, "a": [true, null]}', '"just a string"'),
           (2, 'b', NULL, 'null', NULL, '[1, 2.50]')"#,
    );
    p.us.psql(r#"UPDATE products SET attrs = attrs || '{"more": {"n": 2}}' WHERE id = 1"#);
    let want = json_rows(&p.us).await;
    assert_eq!(want[0][3].as_deref(), Some("object"));
    assert_eq!(
        want[0][4].as_deref(),
        Some(r#"{"z":  1, "a": [true, null]}"#)
    );
    assert_eq!(want[1][3].as_deref(), Some("null"));
    assert_eq!(want[1][6].as_deref(), Some("array"));
    let got = eventually(
        Duration::from_secs(60),
        "eu to hold the documents",
        || async {
            let got = json_rows(&p.eu).await;
            (got == want).then_some(got)
        },
    )
    .await;
    assert_eq!(got[0][1].as_deref(), Some(r#"{"k": 1}"#), "text stays text");
}

async fn json_rows(pg: &Pg) -> Vec<Vec<Option<String>>> {
    pg.client()
        .await
        .query(
            "SELECT id, doc, attrs::text, jsonb_typeof(attrs), raw::text, extra::text, \
             jsonb_typeof(extra) FROM products ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let id: i32 = r.get(0);
            let mut v = vec![Some(id.to_string())];
            v.extend((1..7).map(|i| r.get::<_, Option<String>>(i)));
            v
        })
        .collect()
}

/// A value is spelled the same way in every region and session: the
/// capture side prints timestamps in UTC whatever the writer's time zone,
/// and a local delete's tombstone keys the row as the apply side does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_and_tombstone_keys_have_one_spelling() {
    let p = pair(
        "CREATE TABLE products (at timestamptz PRIMARY KEY, name text);
         CREATE TABLE users (id int PRIMARY KEY, email text);",
    );
    let _us = Relay::spawn(&p.cfg, "us", "all");
    let _eu = Relay::spawn(&p.cfg, "eu", "all");
    p.us.psql(
        "SET TimeZone = 'Asia/Tokyo';
         INSERT INTO products VALUES ('2024-01-01 12:00:00+02', 'a')",
    );
    let rec = eventually(Duration::from_secs(60), "the insert in Kafka", || async {
        read_all(&p.broker.brokers(), "pgrelay.us.eu", Duration::from_secs(1))
            .into_iter()
            .find(|r| r.value["op"] == "c")
    })
    .await;
    assert_eq!(rec.value["after"]["at"], "2024-01-01 10:00:00+00");
    let eu = p.eu.client().await;
    eventually(Duration::from_secs(60), "the row in eu", || async {
        let n: i64 = eu
            .query_one(
                "SELECT count(*) FROM products WHERE at = '2024-01-01 10:00:00+00'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (n == 1).then_some(())
    })
    .await;
    eu.batch_execute("SET TimeZone = 'America/New_York'; DELETE FROM products")
        .await
        .unwrap();
    let key: String = eu
        .query_one(
            "SELECT pk->>'at' FROM pgrelay.tombstones WHERE table_name = 'public.products'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(key, "2024-01-01 10:00:00+00");
    // the deleting session keeps its own setting
    let tz: String = eu.query_one("SHOW TimeZone", &[]).await.unwrap().get(0);
    assert_eq!(tz, "America/New_York");
    // and the delete reaches us
    let us = p.us.client().await;
    eventually(Duration::from_secs(60), "the delete in us", || async {
        let n: i64 = us
            .query_one("SELECT count(*) FROM products", &[])
            .await
            .unwrap()
            .get(0);
        (n == 0).then_some(())
    })
    .await;
}

/// Columns added, and widened, in each region at a different time: records
/// that reach a region before its own change wait for it instead of being
/// dead-lettered, and the apply side picks up new definitions without a
/// restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_changes_reach_the_target_without_dead_letters() {
    let p = pair(
        "CREATE TABLE products (id int PRIMARY KEY, name varchar(5));
         CREATE TABLE users (id int PRIMARY KEY, email text);",
    );
    let _us = Relay::spawn(&p.cfg, "us", "capture");
    let _eu = Relay::spawn(&p.cfg, "eu", "apply");
    let eu = p.eu.client().await;
    let row = |id: i32| {
        let eu = &eu;
        async move {
            eu.query_opt(
                "SELECT (to_jsonb(p) - '_pgrelay_hlc')::text FROM products p WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap()
            .map(|r| serde_json::from_str::<serde_json::Value>(r.get(0)).unwrap())
        }
    };
    p.us.psql("INSERT INTO products VALUES (1, 'a'), (2, 'b')");
    eventually(Duration::from_secs(60), "the first rows in eu", || async {
        row(2).await
    })
    .await;

    // a column added in us first: its records wait in eu...
    p.us.psql(
        "ALTER TABLE products ADD COLUMN sku text;
         INSERT INTO products (id, name, sku) VALUES (3, 'c', 'S-3');
         UPDATE products SET sku = 'S-1' WHERE id = 1;",
    );
    // positive sign: eu consumed them and holds them for the column
    eventually(
        Duration::from_secs(60),
        "eu to hold the records for the column",
        || async {
            _eu.log_text()
                .contains("records carry a column the target table lacks")
                .then_some(())
        },
    )
    .await;
    assert_eq!(row(3).await, None, "applied before eu has the column?");
    // ...until eu adds it too: then they apply, with no restart
    p.eu.psql("ALTER TABLE products ADD COLUMN sku text");
    let got = eventually(Duration::from_secs(60), "row 3 in eu", || async {
        row(3).await
    })
    .await;
    assert_eq!(got, serde_json::json!({"id": 3, "name": "c", "sku": "S-3"}));
    eventually(Duration::from_secs(30), "row 1's sku in eu", || async {
        (row(1).await? == serde_json::json!({"id": 1, "name": "a", "sku": "S-1"})).then_some(())
    })
    .await;

    // a column widened in eu, then in us: a value only the new type holds
    // applies (the batches staged before were typed varchar(5))
    p.eu.psql("ALTER TABLE products ALTER COLUMN name TYPE varchar(20)");
    p.us.psql(
        "ALTER TABLE products ALTER COLUMN name TYPE varchar(20);
         INSERT INTO products (id, name, sku) VALUES (4, 'a longer name', 'S-4');",
    );
    let got = eventually(Duration::from_secs(60), "row 4 in eu", || async {
        row(4).await
    })
    .await;
    assert_eq!(
        got,
        serde_json::json!({"id": 4, "name": "a longer name", "sku": "S-4"})
    );
    let parked = read_all(
        &p.broker.brokers(),
        "pgrelay.dlq.eu",
        Duration::from_secs(2),
    );
    assert!(
        parked.is_empty(),
        "dead-lettered: {:?}",
        parked.iter().map(|r| &r.headers).collect::<Vec<_>>()
    );
}

/// Rows both regions held before pgrelay (no stamps), some of them in
/// different versions: resync of one region, then of the other, leaves both
/// identical — the first region's version of a shared row, every row of
/// each — and a second round changes nothing.
/// A column dropped while the capture side is behind on updates that left
/// it out (unchanged TOAST) does not stall the region: those updates are
/// published with the column left out (the destination keeps its value), a
/// warning names it, and what was written after the drop arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_dropped_under_a_backlog_does_not_stall_the_region() {
    let p = pair(SCHEMA);
    let mut us = Relay::spawn(&p.cfg, "us", "all");
    let _eu = Relay::spawn(&p.cfg, "eu", "apply");
    p.us.psql(
        "INSERT INTO products SELECT i, 'v1', 1, \
         (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 4000) g) \
         FROM generate_series(1, 3) i",
    );
    let eu = p.eu.client().await;
    let count = |sql: &'static str| {
        let eu = &eu;
        async move { eu.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    eventually(Duration::from_secs(60), "the TOASTed rows", || async {
        let n = count("SELECT count(*) FROM products WHERE length(doc) = 128000").await;
        (n == 3).then_some(())
    })
    .await;
    // behind: updates that leave the TOASTed doc out of the stream, then
    // doc dropped at the source, then an unrelated row
    us.kill9();
    p.us.psql("UPDATE products SET name = 'v2'");
    p.us.psql("ALTER TABLE products DROP COLUMN doc");
    p.us.psql("INSERT INTO products VALUES (10, 'after the drop', 2)");
    let us = Relay::spawn(&p.cfg, "us", "all");
    eventually(
        Duration::from_secs(60),
        "the updates and the row written after the drop",
        || async {
            let n =
                count("SELECT count(*) FROM products WHERE name IN ('v2', 'after the drop')").await;
            (n == 4).then_some(())
        },
    )
    .await;
    let kept = count("SELECT count(*) FROM products WHERE length(doc) = 128000").await;
    assert_eq!(kept, 3, "eu keeps the values of the dropped column");
    let log = us.log_text();
    assert!(
        log.contains("no longer exists") && log.contains("column=doc"),
        "{log}"
    );
}

/// A column dropped in every region while the capture side is behind on
/// changes that still carry it — inserts with a value, updates that left
/// it out, a delete: the backlog is published without the column (the
/// source no longer has it), so the destination, which dropped it too,
/// applies every change at once instead of waiting for a column that will
/// never come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_dropped_everywhere_under_a_backlog_applies_the_backlog_whole() {
    let p = pair(SCHEMA);
    let mut us = Relay::spawn(&p.cfg, "us", "all");
    let _eu = Relay::spawn(&p.cfg, "eu", "apply");
    p.us.psql(
        "INSERT INTO products SELECT i, 'v1', 1, \
         (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 4000) g) \
         FROM generate_series(1, 3) i",
    );
    let eu = p.eu.client().await;
    let rows = || async {
        eu.query("SELECT id, name FROM products ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get::<_, i32>(0), r.get::<_, String>(1)))
            .collect::<Vec<_>>()
    };
    eventually(Duration::from_secs(60), "the first rows", || async {
        (rows().await.len() == 3).then_some(())
    })
    .await;
    us.kill9();
    p.us.psql(
        "INSERT INTO products VALUES (4, 'new', 4, repeat('x', 100)), (5, 'new', 5, NULL);
         UPDATE products SET name = 'v2' WHERE id <= 2;
         DELETE FROM products WHERE id = 3;",
    );
    for pg in [&p.us, &p.eu] {
        pg.psql("ALTER TABLE products DROP COLUMN doc");
    }
    p.us.psql("INSERT INTO products VALUES (6, 'after the drop', 6)");
    let us = Relay::spawn(&p.cfg, "us", "all");
    let want: Vec<(i32, String)> = [
        (1, "v2"),
        (2, "v2"),
        (4, "new"),
        (5, "new"),
        (6, "after the drop"),
    ]
    .iter()
    .map(|(k, n)| (*k, n.to_string()))
    .collect();
    // well within relay.apply.schema_wait: nothing waited for the column
    eventually(
        Duration::from_secs(60),
        "the whole backlog in eu",
        || async { (rows().await == want).then_some(()) },
    )
    .await;
    let log = us.log_text();
    assert!(
        log.contains("no longer exists at the source") && log.contains("column=doc"),
        "{log}"
    );
}

/// A column dropped in the destination while records written before the
/// drop still wait in Kafka (its apply side stopped): they apply without
/// the column at once — the destination knows it had the column and lost
/// it, so nothing waits for a column that will not come back — while a
/// column the destination never had still makes records wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_carrying_a_column_dropped_here_apply_without_it() {
    let p = pair(SCHEMA);
    let _us = Relay::spawn(&p.cfg, "us", "all");
    let mut eu = Relay::spawn(&p.cfg, "eu", "apply");
    p.us.psql("INSERT INTO products VALUES (1, 'v1', 1, 'doc')");
    let c = p.eu.client().await;
    let rows = || async {
        c.query("SELECT id, name FROM products ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get::<_, i32>(0), r.get::<_, String>(1)))
            .collect::<Vec<_>>()
    };
    eventually(Duration::from_secs(60), "the first row", || async {
        (rows().await.len() == 1).then_some(())
    })
    .await;
    // eu's apply side stops; us writes the column, then every region
    // drops it (records with it are in Kafka by then)
    eu.kill9();
    p.us.psql(
        "INSERT INTO products VALUES (2, 'new', 2, 'doc 2');
         UPDATE products SET name = 'v2', doc = 'doc 1b' WHERE id = 1;",
    );
    // the update is in Kafka, with the column, before any drop
    eventually(Duration::from_secs(60), "the update in Kafka", || async {
        crate::support::kafka::read_all(
            &p.broker.brokers(),
            "pgrelay.us.eu",
            Duration::from_secs(1),
        )
        .iter()
        .any(|r| r.value["after"]["name"] == "v2" && r.value["after"]["doc"] == "doc 1b")
        .then_some(())
    })
    .await;
    for pg in [&p.eu, &p.us] {
        pg.psql("ALTER TABLE products DROP COLUMN doc");
    }
    p.us.psql("INSERT INTO products VALUES (3, 'after the drop', 3)");
    let _eu = Relay::spawn(&p.cfg, "eu", "apply");
    let want: Vec<(i32, String)> = [(1, "v2"), (2, "new"), (3, "after the drop")]
        .iter()
        .map(|(k, n)| (*k, n.to_string()))
        .collect();
    // well within relay.apply.schema_wait
    eventually(Duration::from_secs(60), "every change in eu", || async {
        (rows().await == want).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_brings_regions_with_existing_rows_in_line() {
    let p = pair(SCHEMA);
    // rows as if written before setup: no stamp, never in the stream
    let preexisting = |origin: &str, rows: &str| {
        format!(
            "SET session_replication_role = replica;
             SELECT pg_replication_origin_session_setup('{origin}');
             INSERT INTO products (id, name, price) VALUES {rows};"
        )
    };
    p.us.psql(&preexisting(
        "pgrelay_eu",
        "(1, 'shared-us', 1), (2, 'only-us', 2)",
    ));
    p.eu.psql(&preexisting(
        "pgrelay_us",
        "(1, 'shared-eu', 1), (3, 'only-eu', 3)",
    ));
    let _us = Relay::spawn(&p.cfg, "us", "all");
    let _eu = Relay::spawn(&p.cfg, "eu", "all");
    let cfg = p.cfg.path.to_str().unwrap();
    let want = vec![
        (1, "shared-us".to_string()),
        (2, "only-us".to_string()),
        (3, "only-eu".to_string()),
    ];
    relay::ok(&["resync", "--config", cfg, "--region", "us"]);
    eventually(Duration::from_secs(60), "us's rows in eu", || async {
        (names(&p.eu).await == want).then_some(())
    })
    .await;
    relay::ok(&["resync", "--config", cfg, "--region", "eu"]);
    eventually(Duration::from_secs(60), "eu's rows in us", || async {
        (names(&p.us).await == want).then_some(())
    })
    .await;
    let settled = converged(&p.us, &p.eu, Duration::from_secs(60)).await;
    // a second round is a no-op: once every record it sent is consumed
    // (the offsets stored in each target have moved past them), nothing
    // changed
    let before = (
        consumed(&p.eu, "pgrelay.us.eu").await,
        consumed(&p.us, "pgrelay.eu.us").await,
    );
    let to_eu = sent_to(
        &relay::ok(&["resync", "--config", cfg, "--region", "us"]),
        "eu",
    );
    let to_us = sent_to(
        &relay::ok(&["resync", "--config", cfg, "--region", "eu"]),
        "us",
    );
    assert!(to_eu > 0 && to_us > 0);
    eventually(
        Duration::from_secs(60),
        "the second round consumed",
        || async {
            (consumed(&p.eu, "pgrelay.us.eu").await >= before.0 + to_eu
                && consumed(&p.us, "pgrelay.eu.us").await >= before.1 + to_us)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        converged(&p.us, &p.eu, Duration::from_secs(60)).await,
        settled
    );
    assert_eq!(names(&p.us).await, want);
}

async fn names(pg: &Pg) -> Vec<(i32, String)> {
    pg.client()
        .await
        .query("SELECT id, name FROM products ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, i32>(0), r.get::<_, String>(1)))
        .collect()
}

/// Records of `topic` consumed into `pg` (the sum of its stored offsets).
async fn consumed(pg: &Pg, topic: &str) -> i64 {
    pg.client()
        .await
        .query_one(
            "SELECT coalesce(sum(next_offset), 0)::bigint FROM pgrelay.offsets WHERE topic = $1",
            &[&topic],
        )
        .await
        .unwrap()
        .get(0)
}

/// Records `pgrelay resync` says it sent to `destination` (rows and
/// tombstones of every table).
fn sent_to(output: &str, destination: &str) -> i64 {
    output
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 5 && f[1] == destination)
                .then(|| f[2].parse::<i64>().unwrap_or(0) + f[3].parse::<i64>().unwrap_or(0))
        })
        .sum()
}
