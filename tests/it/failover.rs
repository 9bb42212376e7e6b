//! Split brain and failover: `pgrelay fence|unfence`, failovers recorded
//! in `pgrelay.events`.

use std::time::Duration;

use crate::apply::{pair, SCHEMA};
use crate::support::broker::Broker;
use crate::support::pg::{self, Pg};
use crate::support::relay::{self, ConfigFile, Relay};
use crate::support::{eventually, until_count};

/// The error a local statement gets, or `None` if it succeeded.
async fn refused(client: &tokio_postgres::Client, sql: &str) -> Option<String> {
    match client.batch_execute(sql).await {
        Ok(()) => None,
        Err(e) => Some(
            e.as_db_error()
                .map(|d| format!("{} {}", d.message(), d.hint().unwrap_or_default()))
                .unwrap_or_else(|| e.to_string()),
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_region_refuses_local_writes_and_still_applies() {
    let p = pair(SCHEMA);
    let cfg = p.cfg.path.to_str().unwrap();
    let _us = Relay::spawn(&p.cfg, "us", "all");
    let _eu = Relay::spawn(&p.cfg, "eu", "all");
    let eu = p.eu.client().await;
    let us = p.us.client().await;
    eu.batch_execute("INSERT INTO products (id, name, price) VALUES (1, 'before', 1)")
        .await
        .unwrap();
    until_count(&us, "SELECT count(*) FROM products", 1, "eu's row in us").await;
    // a transaction whose snapshot was taken before the fence
    let early = p.eu.client().await;
    early
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1")
        .await
        .unwrap();

    let out = relay::ok(&[
        "fence",
        "--config",
        cfg,
        "--region",
        "eu",
        "--reason",
        "old primary came back",
    ]);
    assert!(out.contains("region eu: fenced"), "{out}");
    let again = relay::ok(&["fence", "--config", cfg, "--region", "eu"]);
    assert!(again.contains("already fenced"), "{again}");

    // every kind of local write to a replicated table is refused, with the fix
    for sql in [
        "INSERT INTO products (id, name, price) VALUES (2, 'fenced', 2)",
        "UPDATE products SET price = 5 WHERE id = 1",
        "DELETE FROM products WHERE id = 1",
        "TRUNCATE products",
        // a statement touching no row is refused too
        "UPDATE products SET price = 5 WHERE id = -1",
    ] {
        let err = refused(&eu, sql)
            .await
            .unwrap_or_else(|| panic!("{sql} succeeded in a fenced region"));
        assert!(
            err.contains("region eu is fenced")
                && err.contains("old primary came back")
                && err.contains("pgrelay unfence --region eu"),
            "{sql}: {err}"
        );
    }
    // the C guard reads the fence with the latest snapshot: the early
    // transaction is refused too (the PL/pgSQL guard, on servers without
    // the extension, reads it with the transaction's snapshot)
    if crate::support::pg::major() == 15 {
        let err = refused(&early, "UPDATE products SET price = 7 WHERE id = 1")
            .await
            .expect("a write from a transaction that began before the fence");
        assert!(err.contains("region eu is fenced"), "{err}");
    }
    drop(early);
    // setup again (the trigger is dropped and made anew): still fenced
    relay::ok(&["setup", "--config", cfg, "--region", "eu"]);
    let err = refused(&eu, "UPDATE products SET price = 6 WHERE id = 1")
        .await
        .expect("a write after setup in a fenced region");
    assert!(err.contains("region eu is fenced"), "{err}");
    // a local table is not replicated, hence not fenced
    eu.batch_execute("INSERT INTO users VALUES (1, 'x@example.org')")
        .await
        .unwrap();
    // the other region's changes still land
    us.batch_execute(
        "INSERT INTO products (id, name, price) VALUES (10, 'from us', 10); \
         UPDATE products SET price = 7 WHERE id = 1",
    )
    .await
    .unwrap();
    until_count(
        &eu,
        "SELECT count(*) FROM products WHERE id = 10 OR (id = 1 AND price = 7)",
        2,
        "us's insert and update applied in fenced eu",
    )
    .await;
    let n: i64 = eu
        .query_one("SELECT count(*) FROM products", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2, "the refused writes left nothing behind");

    let status = relay::ok(&["status", "--config", cfg]);
    assert!(
        status.contains("region eu: FENCED since") && status.contains("old primary came back"),
        "{status}"
    );
    assert!(!status.contains("region us: FENCED"), "{status}");

    let out = relay::ok(&["unfence", "--config", cfg, "--region", "eu"]);
    assert!(out.contains("unfenced"), "{out}");
    let out = relay::ok(&["unfence", "--config", cfg, "--region", "eu"]);
    assert!(out.contains("was not fenced"), "{out}");
    eu.batch_execute("INSERT INTO products (id, name, price) VALUES (3, 'after', 3)")
        .await
        .unwrap();
    until_count(
        &us,
        "SELECT count(*) FROM products WHERE id = 3",
        1,
        "eu's write after unfence in us",
    )
    .await;
    let status = relay::ok(&["status", "--config", cfg]);
    assert!(!status.contains("FENCED"), "{status}");

    // both recorded, once each
    let kinds: Vec<String> = eu
        .query(
            "SELECT kind || ':' || coalesce(detail->>'reason', '') FROM pgrelay.events \
             WHERE region = 'eu' ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(kinds, ["fence:old primary came back", "unfence:"]);
}

/// Ids of `products` in `pg`.
async fn ids(client: &tokio_postgres::Client) -> std::collections::BTreeSet<i32> {
    client
        .query("SELECT id FROM products", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// us's primary with a physical standby `us_standby` that syncs the
/// failover slots (the logical walsender sends nothing the standby has not
/// received), and eu; both with [`SCHEMA`].
fn primary_with_standby() -> (Pg, Pg, Pg) {
    let primary = Pg::start();
    let eu = Pg::start();
    primary.psql(SCHEMA);
    eu.psql(SCHEMA);
    primary.psql("ALTER SYSTEM SET synchronized_standby_slots = 'us_standby'");
    primary.psql("SELECT pg_reload_conf()");
    let standby = primary.standby(
        "us_standby",
        &[
            ("sync_replication_slots", "on"),
            ("hot_standby_feedback", "on"),
        ],
    );
    (primary, standby, eu)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_standby_carries_the_failover_slot_and_nothing_is_lost() {
    if pg::major() < 17 {
        eprintln!(
            "SKIP a_promoted_standby_carries_the_failover_slot_and_nothing_is_lost: \
             failover slots need PostgreSQL 17+ (this run: {})",
            pg::major()
        );
        return;
    }
    let (primary, standby, eu) = primary_with_standby();
    let both = both_hosts(&primary, &standby);
    let broker = Broker::start();
    let cfg = ConfigFile::new(&crate::apply::config(&both, &eu.dsn(), &broker.brokers()));
    let path = cfg.path.to_str().unwrap();
    // a slot from before PostgreSQL 17 (an upgrade): setup makes it a failover slot
    primary.psql("SELECT pg_create_logical_replication_slot('pgrelay_us', 'pgoutput')");
    let out = relay::ok(&["setup", "--config", path, "--region", "us"]);
    assert!(
        out.contains("slot pgrelay_us is now a failover slot"),
        "{out}"
    );
    relay::ok(&["setup", "--config", path, "--region", "eu"]);
    let us_relay = Relay::spawn(&cfg, "us", "all");
    let _eu_relay = Relay::spawn(&cfg, "eu", "all");
    let eu_client = eu.client().await;

    // a steady write load on the primary, one row per transaction
    let dsn = primary.dsn();
    let writer = tokio::spawn(async move {
        let (c, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut committed = 0;
        for id in 1..100_000i32 {
            let ok = c
                .execute(
                    "INSERT INTO products (id, name, price) VALUES ($1, 'before', 1)",
                    &[&id],
                )
                .await
                .is_ok();
            if !ok {
                break;
            }
            committed = id;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        committed
    });
    // changes flow before the primary dies
    eventually(Duration::from_secs(60), "rows reaching eu", || async {
        (ids(&eu_client).await.len() >= 200).then_some(())
    })
    .await;
    // the standby's copy of the slot becomes usable once the primary's slot
    // passes the standby's position; a standby snapshot in the primary's
    // WAL (every 15 s on its own) lets it move now
    let sb = standby.client().await;
    let pc = primary.client().await;
    eventually(
        Duration::from_secs(60),
        "the slot synced to the standby",
        || async {
            pc.batch_execute("SELECT pg_log_standby_snapshot()")
                .await
                .unwrap();
            let n: i64 = sb
                .query_one(
                    "SELECT count(*) FROM pg_replication_slots \
                     WHERE slot_name = 'pgrelay_us' AND synced AND NOT temporary",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            (n == 1).then_some(())
        },
    )
    .await;
    let check = relay::ok(&["check", "--config", path, "--region", "us"]);
    assert!(
        check.contains("region us: PostgreSQL 18.")
            && check.contains("slot pgrelay_us is a failover slot")
            && check.contains(&format!(
                "slot pgrelay_us synced to standby 127.0.0.1:{}/postgres",
                standby.port
            )),
        "{check}"
    );
    // more changes flow past the synced copy's position before the kill
    let seen = ids(&eu_client).await.len();
    eventually(Duration::from_secs(60), "more rows reaching eu", || async {
        (ids(&eu_client).await.len() >= seen + 100).then_some(())
    })
    .await;
    primary.stop();
    let committed = writer.await.unwrap();
    assert!(committed >= 200, "the writer committed {committed} rows");
    standby.promote();
    // the new primary has no standby of its own yet: its copy of the old
    // primary's setting would hold every logical walsender back
    standby.psql("ALTER SYSTEM RESET synchronized_standby_slots");
    standby.psql("SELECT pg_reload_conf()");

    // what the standby had is what the region now has: all of it reaches eu
    let survived = ids(&sb).await;
    assert!(
        survived.len() >= 200,
        "{} rows on the standby",
        survived.len()
    );
    sb.batch_execute("INSERT INTO products (id, name, price) VALUES (-1, 'after failover', 2)")
        .await
        .unwrap();
    let lsn: String = sb
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let mut want = survived.clone();
    want.insert(-1);
    // the positive sign: eu applied everything the region committed up to
    // the new row, on every partition (a row in one partition arriving
    // says nothing of the others)
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let got = loop {
        let applied = eu_client
            .query_one(
                "SELECT pgrelay.wait_for('us', $1::text::pg_lsn, '1s')",
                &[&lsn],
            )
            .await
            .map(|r| r.get::<_, bool>(0))
            .unwrap_or(false);
        let got = ids(&eu_client).await;
        if applied && got.contains(&-1) {
            break got;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "eu never got the new primary's row; us sidecar log:\n{}",
            us_relay.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // nothing the standby lacks (the primary waited for it) and nothing lost
    assert_eq!(
        got.difference(&want).collect::<Vec<_>>(),
        Vec::<&i32>::new(),
        "rows in eu the new primary never had"
    );
    assert_eq!(
        want.difference(&got).collect::<Vec<_>>(),
        Vec::<&i32>::new(),
        "rows of the new primary missing in eu"
    );
    // eu's writes reach the new primary too
    eu_client
        .batch_execute("INSERT INTO products (id, name, price) VALUES (-2, 'from eu', 3)")
        .await
        .unwrap();
    until_count(
        &sb,
        "SELECT count(*) FROM products WHERE id = -2",
        1,
        "eu's row on the new primary",
    )
    .await;

    // recorded once: same system, next timeline
    let events = sb
        .query(
            "SELECT detail->>'old_system_id' = detail->>'new_system_id', \
             (detail->>'old_timeline')::int, (detail->>'new_timeline')::int, \
             detail ? 'confirmed_lsn' AND detail ? 'old_wal_end' \
             AND detail->>'slot_carried' = 'true' \
             FROM pgrelay.events WHERE region = 'us' AND kind = 'failover'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(events.len(), 1, "one failover event");
    let e = &events[0];
    assert!(e.get::<_, bool>(0), "same system identifier");
    assert_eq!((e.get::<_, i32>(1), e.get::<_, i32>(2)), (1, 2));
    assert!(e.get::<_, bool>(3), "positions recorded, the slot carried");
    let status = relay::ok(&["status", "--config", path]);
    assert!(
        status.contains("region us: last failover at")
            && status.contains("timeline 1 -> 2")
            && !status.contains("rebuilding"),
        "{status}"
    );
}

/// The value of the gauge `name` whose labels include `labels`, as the
/// sidecar listening on `port` serves it.
fn gauge(port: u16, name: &str, labels: &[&str]) -> Option<f64> {
    crate::support::metrics_text(port)
        .lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|x| l.contains(x)))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
}

/// The `source_held` of the pair us -> eu in `status --json`.
fn source_held(path: &str) -> Option<String> {
    let out = relay::cmd(&["status", "--config", path, "--json"]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    rows.as_array()?
        .iter()
        .find(|r| r["source"] == "us" && r["destination"] == "eu")?["source_held"]
        .as_str()
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_that_is_down_holds_the_region_and_status_says_why() {
    if pg::major() < 17 {
        eprintln!(
            "SKIP a_standby_that_is_down_holds_the_region_and_status_says_why: \
             failover slots need PostgreSQL 17+ (this run: {})",
            pg::major()
        );
        return;
    }
    let (primary, standby, eu) = primary_with_standby();
    let broker = Broker::start();
    let text = crate::apply::config(&primary.dsn(), &eu.dsn(), &broker.brokers());
    let cfg = ConfigFile::new(&text);
    let path = cfg.path.to_str().unwrap();
    // us's sidecar serves its metrics
    let http = crate::support::free_port();
    let us_cfg = ConfigFile::new(&format!("{text}\n[http]\nlisten = \"127.0.0.1:{http}\"\n"));
    for r in ["us", "eu"] {
        relay::ok(&["setup", "--config", path, "--region", r]);
    }
    let _us_relay = Relay::spawn(&us_cfg, "us", "all");
    let _eu_relay = Relay::spawn(&cfg, "eu", "all");
    let pc = primary.client().await;
    let eu_client = eu.client().await;
    let held = ["region=\"us\"", "slot=\"us_standby\""];

    // with the standby up, changes flow and nothing is held
    pc.batch_execute("INSERT INTO products (id, name, price) VALUES (1, 'standby up', 1)")
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while eu_client
        .query_one("SELECT count(*) FROM products WHERE id = 1", &[])
        .await
        .unwrap()
        .get::<_, i64>(0)
        == 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the first row never reached eu; us sidecar log:\n{}\neu sidecar log:\n{}",
            _us_relay.log_text(),
            _eu_relay.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eventually(Duration::from_secs(30), "the held gauge at 0", || async {
        (gauge(http, "pgrelay_capture_held_by_standby", &held) == Some(0.0)).then_some(())
    })
    .await;
    assert_eq!(
        source_held(path),
        None,
        "nothing held while the standby runs"
    );

    // the standby goes down: the primary sends nothing it lacks
    standby.stop();
    pc.batch_execute("INSERT INTO products (id, name, price) VALUES (2, 'standby down', 2)")
        .await
        .unwrap();
    let reason = "standby slot \"us_standby\" (synchronized_standby_slots) is inactive";
    eventually(
        Duration::from_secs(60),
        "status naming the standby",
        || async { source_held(path).filter(|h| h.contains(reason)).map(|_| ()) },
    )
    .await;
    let text =
        String::from_utf8_lossy(&relay::cmd(&["status", "--config", path]).stdout).into_owned();
    let line = text
        .lines()
        .skip_while(|l| !l.starts_with("us->eu"))
        .nth(1)
        .unwrap_or_default()
        .to_string();
    assert!(
        line.contains(&format!("held: {reason}"))
            && line.contains("ALTER SYSTEM RESET synchronized_standby_slots"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("us->eu") && l.ends_with("lagging")),
        "{text}"
    );
    eventually(Duration::from_secs(30), "the held gauge at 1", || async {
        (gauge(http, "pgrelay_capture_held_by_standby", &held) == Some(1.0)).then_some(())
    })
    .await;
    let n: i64 = eu_client
        .query_one("SELECT count(*) FROM products WHERE id = 2", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "a change the standby lacks reached eu");

    // the standby is back: the held change arrives, the reason goes
    standby.restart();
    until_count(
        &eu_client,
        "SELECT count(*) FROM products WHERE id = 2",
        1,
        "the held row in eu",
    )
    .await;
    eventually(
        Duration::from_secs(60),
        "status without the reason",
        || async { source_held(path).is_none().then_some(()) },
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "the held gauge back at 0",
        || async {
            (gauge(http, "pgrelay_capture_held_by_standby", &held) == Some(0.0)).then_some(())
        },
    )
    .await;
    let text =
        String::from_utf8_lossy(&relay::cmd(&["status", "--config", path]).stdout).into_owned();
    assert!(!text.contains("synchronized_standby_slots"), "{text}");
}

/// PostgreSQL 15/16, no failover slots: the promoted standby has no slot;
/// `setup` makes a new one, the sidecar records the failover, and `resync`
/// sends what the old slot had not delivered. Runs on any major (the
/// procedure also works where failover slots exist).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_failover_slots_setup_and_resync_recover_a_promoted_standby() {
    let primary = Pg::start();
    let eu = Pg::start();
    primary.psql(SCHEMA);
    eu.psql(SCHEMA);
    let standby = primary.standby("us_standby", &[("hot_standby_feedback", "on")]);
    let both = both_hosts(&primary, &standby);
    let broker = Broker::start();
    let cfg = ConfigFile::new(&crate::apply::config(&both, &eu.dsn(), &broker.brokers()));
    let path = cfg.path.to_str().unwrap();
    for r in ["us", "eu"] {
        relay::ok(&["setup", "--config", path, "--region", r]);
    }
    let mut us_relay = Relay::spawn(&cfg, "us", "all");
    let _eu_relay = Relay::spawn(&cfg, "eu", "all");
    let eu_client = eu.client().await;
    let dsn = primary.dsn();
    let writer = tokio::spawn(async move {
        let (c, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        for id in 1..100_000i32 {
            let sql = "INSERT INTO products (id, name, price) VALUES ($1, 'before', 1)";
            if c.execute(sql, &[&id]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    eventually(Duration::from_secs(60), "rows reaching eu", || async {
        (ids(&eu_client).await.len() >= 300).then_some(())
    })
    .await;
    // the sidecar is down while the primary dies: the window it missed is
    // what resync must bring
    us_relay.kill9();
    tokio::time::sleep(Duration::from_millis(300)).await;
    primary.stop();
    writer.await.unwrap();
    standby.promote();
    let sb = standby.client().await;
    let survived = ids(&sb).await;
    let slots: i64 = sb
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pgrelay_us'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    if pg::major() < 17 {
        assert_eq!(slots, 0, "no failover slots: the standby has no copy");
    }
    if slots == 0 {
        let err = relay::fails(&["check", "--config", path, "--region", "us"]);
        assert!(err.contains("slot pgrelay_us does not exist"), "{err}");
        relay::ok(&["setup", "--config", path, "--region", "us"]);
    }
    // the new primary's sidecar serves metrics: the pair rebuilding shows there too
    let http = crate::support::free_port();
    let us_cfg = ConfigFile::new(&format!(
        "{}\n[http]\nlisten = \"127.0.0.1:{http}\"\n",
        crate::apply::config(&both, &eu.dsn(), &broker.brokers())
    ));
    let _us_relay = Relay::spawn(&us_cfg, "us", "all");
    let rebuilding_gauge = || {
        crate::support::metrics_text(http)
            .lines()
            .find(|l| {
                l.starts_with("pgrelay_pair_rebuilding{")
                    && l.contains("source=\"us\"")
                    && l.contains("destination=\"eu\"")
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    // the sidecar records the failover; the pair rebuilds until a resync
    until_count(
        &sb,
        "SELECT count(*) FROM pgrelay.events WHERE region = 'us' AND kind = 'failover' \
         AND (detail->>'new_timeline')::int = (detail->>'old_timeline')::int + 1 \
         AND detail->>'slot_carried' = 'false'",
        1,
        "the failover recorded, without the slot",
    )
    .await;
    let status = relay::cmd(&["status", "--config", path]);
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(
        status.contains("rebuilding") && status.contains("run pgrelay resync --region us --to eu"),
        "{status}"
    );
    eventually(
        Duration::from_secs(60),
        "pgrelay_pair_rebuilding{us->eu} = 1",
        || async { (rebuilding_gauge() == Some(1.0)).then_some(()) },
    )
    .await;
    relay::ok(&["resync", "--config", path, "--region", "us", "--to", "eu"]);
    eventually(
        Duration::from_secs(60),
        "pgrelay_pair_rebuilding{us->eu} = 0 once the resync is sent",
        || async { (rebuilding_gauge() == Some(0.0)).then_some(()) },
    )
    .await;
    sb.batch_execute("INSERT INTO products (id, name, price) VALUES (-1, 'after failover', 2)")
        .await
        .unwrap();
    let got = eventually(
        Duration::from_secs(90),
        "eu to hold the new primary's rows",
        || async {
            let got = ids(&eu_client).await;
            (got.contains(&-1) && survived.is_subset(&got)).then_some(got)
        },
    )
    .await;
    // what eu has beyond the new primary came from the old one after the
    // standby's last position: the writes the failover lost
    let newest = survived.iter().max().copied().unwrap_or(0);
    let extra: Vec<&i32> = got
        .iter()
        .filter(|id| **id != -1 && !survived.contains(id))
        .collect();
    assert!(
        extra.iter().all(|id| **id > newest),
        "rows in eu the new primary lacks, older than its newest: {extra:?}"
    );
    // once the resync is applied the pair is no longer rebuilding
    eventually(
        Duration::from_secs(60),
        "us->eu done rebuilding",
        || async {
            let out = relay::cmd(&["status", "--config", path]);
            let out = String::from_utf8_lossy(&out.stdout).into_owned();
            let line = out.lines().find(|l| l.starts_with("us->eu"))?.to_string();
            (!line.ends_with("rebuilding") && !out.contains("rebuilding:")).then_some(())
        },
    )
    .await;
}

/// A DSN naming the primary and its standby, connecting to whichever
/// accepts writes (as an application configures failover).
fn both_hosts(primary: &Pg, standby: &Pg) -> String {
    format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user=postgres password={} dbname=postgres \
         connect_timeout=3 target_session_attrs=read-write",
        primary.port,
        standby.port,
        pg::PASSWORD
    )
}
