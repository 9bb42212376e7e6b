//! The procedures of docs/operations.md run as an operator runs them, with the
//! guarantees they state: here, what a lost slot's resync must carry.
//! Two regions (us, eu), real PostgreSQL clusters, one broker, real
//! sidecars.

use std::time::Duration;

use crate::apply::Pair;
use crate::support::broker::Broker;
use crate::support::eventually;
use crate::support::pg::Pg;
use crate::support::relay::{self, ConfigFile, Relay};

const SCHEMA: &str = "
CREATE TABLE products (id int PRIMARY KEY, name text, price numeric, doc text);
CREATE TABLE users (id int PRIMARY KEY, email text);
CREATE TABLE people (id int PRIMARY KEY, home text NOT NULL, name text);
";

/// us and eu with a partitioned table whose us-homed rows may live in eu.
fn partitioned_pair() -> Pair {
    crate::apply::pair_with_tables(
        SCHEMA,
        "
[[tables]]
name = \"public.people\"
class = \"partitioned\"
home_column = \"home\"
[tables.allow]
us = [\"eu\"]
eu = []
",
        "",
    )
}

/// Drops every logical replication slot of `pg` once its walsender has
/// gone (the sidecar was just killed), as a lost slot leaves the region; a
/// standby's physical slot stays.
pub async fn lose_slots(pg: &Pg) {
    let c = pg.client().await;
    eventually(Duration::from_secs(30), "the slots dropped", || async {
        c.batch_execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE NOT active AND slot_type = 'logical'",
        )
        .await
        .ok()?;
        let left: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_type = 'logical'",
                &[],
            )
            .await
            .ok()?
            .get(0);
        (left == 0).then_some(())
    })
    .await;
}

async fn ids(pg: &Pg) -> Vec<i32> {
    let c = pg.client().await;
    c.query("SELECT id FROM people ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// An erasure made while no slot carried it: the resync docs/operations.md
/// prescribes after a lost slot sends the partitioned row's tombstone to
/// the region that held a copy, routed by the home the tombstone kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_delete_no_slot_carried_reaches_the_copy_with_the_resync() {
    let p = partitioned_pair();
    let cfg = p.cfg.path.to_str().unwrap();
    let mut us = Relay::spawn(&p.cfg, "us", "capture");
    let _eu = Relay::spawn(&p.cfg, "eu", "apply");
    p.us.psql("INSERT INTO people VALUES (1, 'us', 'a'), (2, 'us', 'b'), (3, 'us', 'c')");
    eventually(Duration::from_secs(60), "eu holds us's rows", || async {
        (ids(&p.eu).await == [1, 2, 3]).then_some(())
    })
    .await;
    us.kill9();
    lose_slots(&p.us).await;
    // deleted at home while no slot carries it: an erasure eu must follow
    p.us.psql("DELETE FROM people WHERE id = 1; UPDATE people SET id = 4 WHERE id = 3");
    relay::ok(&["setup", "--config", cfg, "--region", "us"]);
    let _us = Relay::spawn(&p.cfg, "us", "capture");
    let out = relay::ok(&["resync", "--config", cfg, "--region", "us"]);
    assert!(out.contains("public.people"), "{out}");
    eventually(Duration::from_secs(60), "eu to follow us", || async {
        (ids(&p.eu).await == [2, 4]).then_some(())
    })
    .await;
    assert_eq!(ids(&p.us).await, [2, 4]);
}

/// `resync --to` a region that is not set up (no topic yet) is refused
/// before anything is sent, and no topic appears on the fly; a name that
/// is no region is refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_to_a_region_not_set_up_is_refused_and_creates_no_topic() {
    let broker = Broker::start();
    let us = Pg::start();
    let eu = Pg::start();
    let ap = Pg::start();
    for pg in [&us, &eu, &ap] {
        pg.psql(SCHEMA);
    }
    let text = crate::apply::config(&us.dsn(), &eu.dsn(), &broker.brokers());
    let two = ConfigFile::new(&text);
    for r in ["us", "eu"] {
        relay::ok(&[
            "setup",
            "--config",
            two.path.to_str().unwrap(),
            "--region",
            r,
        ]);
    }
    // ap added to the config, nothing set up for it yet
    let cfg = ConfigFile::new(&text.replacen(
        "[[tables]]",
        &format!(
            "[regions.ap]\nid = 3\n{}\n\n[[tables]]",
            crate::support::pg::region_dsns(&ap.dsn())
        ),
        1,
    ));
    let path = cfg.path.to_str().unwrap();
    let topics = || {
        crate::support::kafka::topics(&broker.brokers())
            .into_iter()
            .filter(|t| t.ends_with(".ap"))
            .collect::<Vec<_>>()
    };
    let before = topics();
    let out = relay::fails(&["resync", "--config", path, "--region", "us", "--to", "ap"]);
    assert!(out.contains("pgrelay setup --region ap"), "{out}");
    assert!(out.contains("us.ap"), "{out}");
    assert_eq!(topics(), before, "the refused resync made a topic");
    let out = relay::fails(&["resync", "--config", path, "--region", "us", "--to", "zz"]);
    assert!(
        out.contains("--to zz") && (out.contains("eu, ap") || out.contains("ap, eu")),
        "{out}"
    );
}

/// A sidecar whose apply side waits for a column its table lacks (a
/// schema change under way) stops promptly on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_waiting_for_a_column_stops_on_sigterm() {
    let p = partitioned_pair();
    p.us.psql("ALTER TABLE products ADD COLUMN extra text");
    let _us = Relay::spawn(&p.cfg, "us", "capture");
    let mut eu = Relay::spawn(&p.cfg, "eu", "all");
    p.us.psql("INSERT INTO products (id, name, extra) VALUES (1, 'a', 'x')");
    eventually(Duration::from_secs(60), "eu waiting for the column", || {
        let waiting = eu.log_text().contains("waiting for it");
        async move { waiting.then_some(()) }
    })
    .await;
    let started = std::time::Instant::now();
    let code = eu.terminate(Duration::from_secs(15));
    assert!(
        code.is_some(),
        "still running {:?} after SIGTERM:\n{}",
        started.elapsed(),
        eu.log_text()
    );
}

/// The policy-change procedures of docs/operations.md, while the regions write. A home
/// gains a destination (eu's rows may now live in us too): the
/// destination's sidecar restarts first, then the home's, then the home
/// resyncs its rows to it. A home loses one (us's rows may no longer live
/// in eu): the home's sidecar restarts first, then the destination's, then
/// `verify --repair` removes what the destination may no longer hold —
/// there only, published nowhere — and `verify` finds the regions agreeing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_moves_rows_where_the_new_policy_says() {
    let p = partitioned_pair();
    let cfg = p.cfg.path.to_str().unwrap().to_string();
    let mut us = Relay::spawn(&p.cfg, "us", "all");
    let mut eu = Relay::spawn(&p.cfg, "eu", "all");
    p.us.psql("INSERT INTO people VALUES (1, 'us', 'a'), (2, 'us', 'b')");
    p.eu.psql("INSERT INTO people VALUES (10, 'eu', 'x'), (11, 'eu', 'y')");
    eventually(Duration::from_secs(60), "eu holds us's rows", || async {
        (ids(&p.eu).await == [1, 2, 10, 11]).then_some(())
    })
    .await;
    assert_eq!(ids(&p.us).await, [1, 2], "eu's rows stay in eu");
    // the new policy in every region's config
    let text = std::fs::read_to_string(&p.cfg.path).unwrap();
    let changed = text.replacen("us = [\"eu\"]\neu = []", "us = []\neu = [\"us\"]", 1);
    assert_ne!(text, changed);
    std::fs::write(&p.cfg.path, changed).unwrap();
    // us first: it stops sending its rows to eu, and admits eu's
    us.kill9();
    let _us = Relay::spawn(&p.cfg, "us", "all");
    p.us.psql("INSERT INTO people VALUES (3, 'us', 'c')");
    // then eu: it sends its rows to us from now on
    eu.kill9();
    let _eu = Relay::spawn(&p.cfg, "eu", "all");
    p.eu.psql("INSERT INTO people VALUES (12, 'eu', 'z')");
    let out = relay::ok(&[
        "resync",
        "--config",
        &cfg,
        "--region",
        "eu",
        "--to",
        "us",
        "--table",
        "public.people",
    ]);
    assert!(out.contains("public.people"), "{out}");
    eventually(Duration::from_secs(60), "us holds eu's rows", || async {
        (ids(&p.us).await == [1, 2, 3, 10, 11, 12]).then_some(())
    })
    .await;
    // eu still holds us's old rows, which it may no longer hold
    assert_eq!(ids(&p.eu).await, [1, 2, 10, 11, 12]);
    let found = relay::cmd(&["verify", "--config", &cfg, "--table", "public.people"]);
    let text = String::from_utf8_lossy(&found.stdout);
    assert_eq!(found.status.code(), Some(1), "{text}");
    assert!(text.contains("LEAKED"), "{text}");
    let repaired = relay::cmd(&[
        "verify",
        "--config",
        &cfg,
        "--table",
        "public.people",
        "--repair",
    ]);
    assert_ne!(
        repaired.status.code(),
        Some(2),
        "{}{}",
        String::from_utf8_lossy(&repaired.stdout),
        String::from_utf8_lossy(&repaired.stderr)
    );
    eventually(Duration::from_secs(60), "eu without us's rows", || async {
        (ids(&p.eu).await == [10, 11, 12]).then_some(())
    })
    .await;
    assert_eq!(ids(&p.us).await, [1, 2, 3, 10, 11, 12], "us keeps its rows");
    // the removal is in eu's event log, with why (no key, no value)
    let events: Vec<String> =
        p.eu.client()
            .await
            .query(
                "SELECT detail::text FROM pgrelay.events WHERE kind = 'verify_repair'",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
    assert!(
        events.len() == 1 && events[0].contains("\"removed\": 2") && events[0].contains("leaked"),
        "{events:?}"
    );
    let again = relay::cmd(&["verify", "--config", &cfg, "--table", "public.people"]);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stdout)
    );
}

/// pgrelay's tables as versioned migrations: `setup` runs what a database
/// lacks and says which, a database set up before versions were recorded
/// is brought up to date without losing its state, a database behind the
/// binary keeps the sidecar from starting until `setup` ran, and one set up
/// by a newer pgrelay is refused by `check`, `setup` and the sidecar alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_runs_the_migrations_a_database_lacks_and_a_newer_one_is_refused() {
    let p = partitioned_pair();
    let cfg = p.cfg.path.to_str().unwrap().to_string();
    let setup = |region: &str| relay::cmd(&["setup", "--config", &cfg, "--region", region]);
    let text = |out: &std::process::Output| {
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    let us = p.us.client().await;
    let latest: i32 = us
        .query_one(
            "SELECT max(version) FROM pgrelay.schema_version WHERE component = 'core'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(latest >= 11, "{latest}");
    // already current: nothing to run
    let again = setup("us");
    assert!(again.status.success(), "{}", text(&again));
    assert!(!text(&again).contains("migration core"), "{}", text(&again));
    assert!(
        text(&again).contains(&format!("pgrelay's tables at core {latest}")),
        "{}",
        text(&again)
    );

    // a database set up before versions were recorded, with state in it
    p.us.psql("INSERT INTO people VALUES (1, 'us', 'a'); DELETE FROM people WHERE id = 1");
    us.batch_execute("DROP TABLE pgrelay.schema_version")
        .await
        .unwrap();
    let upgraded = setup("us");
    assert!(upgraded.status.success(), "{}", text(&upgraded));
    for v in 1..=latest {
        assert!(
            text(&upgraded).contains(&format!("migration core {v} applied")),
            "{}",
            text(&upgraded)
        );
    }
    let kept: i64 = us
        .query_one(
            "SELECT count(*) FROM pgrelay.tombstones WHERE table_name = 'public.people'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 1, "the tombstone survives the migrations");

    // behind the binary: the sidecar does not start until setup ran
    us.batch_execute(&format!(
        "DELETE FROM pgrelay.schema_version WHERE component = 'core' AND version = {latest}"
    ))
    .await
    .unwrap();
    for role in ["capture", "apply"] {
        let refused = relay::fails(&["run", "--config", &cfg, "--region", "us", "--role", role]);
        assert!(
            refused.contains(&format!(
                "behind this binary (core {} of {latest})",
                latest - 1
            )) && refused.contains("run pgrelay setup"),
            "{role}: {refused}"
        );
    }
    let caught_up = setup("us");
    assert!(
        text(&caught_up).contains(&format!("migration core {latest} applied")),
        "{}",
        text(&caught_up)
    );

    // set up by a newer pgrelay: refused everywhere, nothing changed
    us.batch_execute(&format!(
        "INSERT INTO pgrelay.schema_version (component, version, name, applied_by) \
         VALUES ('core', {}, 'from the future', 'pgrelay 99')",
        latest + 1
    ))
    .await
    .unwrap();
    let newer = format!("set up by a newer pgrelay (core {}", latest + 1);
    let checked = relay::fails(&["check", "--config", &cfg, "--region", "us"]);
    assert!(checked.contains(&newer), "{checked}");
    let refused = text(&setup("us"));
    assert!(refused.contains(&newer), "{refused}");
    for role in ["capture", "apply"] {
        let refused = relay::fails(&["run", "--config", &cfg, "--region", "us", "--role", role]);
        assert!(refused.contains(&newer), "{role}: {refused}");
    }
    // eu, untouched, still runs and replicates from a us brought back
    us.batch_execute(&format!(
        "DELETE FROM pgrelay.schema_version WHERE version > {latest}"
    ))
    .await
    .unwrap();
    let _us = Relay::spawn(&p.cfg, "us", "all");
    let _eu = Relay::spawn(&p.cfg, "eu", "all");
    p.us.psql("INSERT INTO people VALUES (2, 'us', 'b')");
    eventually(Duration::from_secs(60), "eu holds us's row", || async {
        (ids(&p.eu).await == [2]).then_some(())
    })
    .await;
}

/// A region rebuilt from an empty database: `setup --start-at-end` has its
/// apply side start each incoming topic at its end (the history there is
/// not read again), stored offsets are never moved back, and the resync
/// from the other region brings every row, while that region writes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuilt_region_starts_at_the_topics_end_and_the_resync_brings_the_rows() {
    let p = partitioned_pair();
    let cfg = p.cfg.path.to_str().unwrap().to_string();
    let _us = Relay::spawn(&p.cfg, "us", "all");
    let mut eu = Relay::spawn(&p.cfg, "eu", "all");
    p.us.psql(
        "INSERT INTO people SELECT i, 'us', 'n' || i FROM generate_series(1, 40) AS i;
         UPDATE people SET name = 'again' WHERE id <= 20; DELETE FROM people WHERE id > 35",
    );
    eventually(Duration::from_secs(60), "eu holds us's rows", || async {
        (ids(&p.eu).await == (1..=35).collect::<Vec<_>>()).then_some(())
    })
    .await;
    // eu's database is lost: an empty one in its place
    eu.kill9();
    lose_slots(&p.eu).await;
    p.eu.psql(
        "SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin;
         DROP SCHEMA pgrelay CASCADE; DROP TABLE people, products, users;",
    );
    p.eu.psql(SCHEMA);
    let out = relay::ok(&[
        "setup",
        "--config",
        &cfg,
        "--region",
        "eu",
        "--start-at-end",
    ]);
    assert!(
        out.contains("apply starts pgrelay.us.eu at its end")
            && out.contains("pgrelay resync --config")
            && out.contains("--region us --to eu"),
        "{out}"
    );
    let c = p.eu.client().await;
    let offsets = || async {
        c.query(
            "SELECT kafka_partition, next_offset FROM pgrelay.offsets \
             WHERE topic = 'pgrelay.us.eu' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, i32>(0), r.get::<_, i64>(1)))
        .collect::<Vec<_>>()
    };
    let ends = offsets().await;
    assert!(
        !ends.is_empty() && ends.iter().map(|(_, o)| o).sum::<i64>() > 0,
        "the history's end is stored: {ends:?}"
    );
    // run again: stored offsets are never moved
    relay::ok(&[
        "setup",
        "--config",
        &cfg,
        "--region",
        "eu",
        "--start-at-end",
    ]);
    assert_eq!(offsets().await, ends);
    let _eu = Relay::spawn(&p.cfg, "eu", "all");
    // us writes on: what comes after the end arrives as ever
    p.us.psql("INSERT INTO people VALUES (50, 'us', 'after')");
    let lsn: String =
        p.us.client()
            .await
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
    // the positive sign: eu applied everything us committed up to now
    eventually(
        Duration::from_secs(60),
        "eu applied us's changes",
        || async {
            c.query_one(
                "SELECT pgrelay.wait_for('us', $1::text::pg_lsn, '1s')",
                &[&lsn],
            )
            .await
            .ok()?
            .get::<_, bool>(0)
            .then_some(())
        },
    )
    .await;
    // and nothing before the end was read: eu holds only what came after it
    assert_eq!(ids(&p.eu).await, [50]);
    relay::ok(&["resync", "--config", &cfg, "--region", "us", "--to", "eu"]);
    let want: Vec<i32> = (1..=35).chain([50]).collect();
    eventually(
        Duration::from_secs(60),
        "eu holds every row again",
        || async { (ids(&p.eu).await == want).then_some(()) },
    )
    .await;
    let names: Vec<String> = c
        .query("SELECT name FROM people WHERE id <= 20 ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(names.iter().all(|n| n == "again"), "{names:?}");
    let verified = relay::cmd(&["verify", "--config", &cfg]);
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stdout)
    );
}
