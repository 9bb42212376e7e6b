//! Rules that must fail closed or keep data home on the capture side: a
//! column rule whose column is gone, a `partitioned` table that lost its
//! replica identity, declaratively partitioned tables, and truncates of
//! `partitioned` tables.

use std::time::Duration;

use crate::apply;
use crate::capture::{caught_up, fixture, SCHEMA};
use crate::support::broker::Broker;
use crate::support::eventually;
use crate::support::free_port;
use crate::support::kafka::{read_all, Rec};
use crate::support::pg::Pg;
use crate::support::relay::{self, ConfigFile, Relay};

fn table_of(r: &Rec) -> &str {
    r.key["table"].as_str().unwrap_or_default()
}

fn key_id(r: &Rec) -> &str {
    r.key["key"]["id"].as_str().unwrap_or_default()
}

/// Waits for a sidecar to exit by itself; returns its log.
async fn exited(relay: &mut Relay, what: &str) -> String {
    eventually(Duration::from_secs(60), what, || {
        let done = matches!(relay.child.try_wait(), Ok(Some(_)));
        async move { done.then_some(()) }
    })
    .await;
    let status = relay.child.try_wait().unwrap().unwrap();
    let log = relay.log_text();
    assert!(!status.success(), "exit status {status:?}; log:\n{log}");
    log
}

/// Every record of every topic the capture side of `us` writes to.
fn us_topics(brokers: &str) -> Vec<(&'static str, Vec<Rec>)> {
    ["pgrelay.us.eu", "pgrelay.us.cn"]
        .into_iter()
        .map(|t| (t, read_all(brokers, t, Duration::from_secs(2))))
        .collect()
}

/// A column renamed away from its rule stops the capture side before any
/// row of the new shape leaves; `check` reports it as an error; naming the
/// new column in the rule lets the row through, masked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_rule_column_stops_capture_instead_of_leaking() {
    let f = fixture(SCHEMA);
    let cfg = f.cfg.path.to_str().unwrap().to_string();
    let mut relay = Relay::spawn(&f.cfg, "us", "capture");
    let c = f.pg.client().await;
    c.batch_execute("INSERT INTO orders VALUES (1, 'US', 'a@x.org', '4111111111111111', 5)")
        .await
        .unwrap();
    caught_up(&f.pg, Duration::from_secs(30)).await;
    c.batch_execute(
        "ALTER TABLE orders RENAME COLUMN card TO cardnum;
         INSERT INTO orders VALUES (2, 'US', 'b@x.org', '5500000000000004', 6);
         INSERT INTO products VALUES (7, 'after the rename', 1, NULL);",
    )
    .await
    .unwrap();

    // the positive sign: the stream reached the new shape and stopped there
    let log = exited(&mut relay, "the capture side to stop on the renamed column").await;
    assert!(
        log.contains("public.orders") && log.contains("\"card\"") && log.contains("rule"),
        "{log}"
    );
    for (topic, recs) in us_topics(&f.broker.brokers()) {
        let orders: Vec<&Rec> = recs
            .iter()
            .filter(|r| table_of(r) == "public.orders")
            .collect();
        assert_eq!(orders.len(), 1, "{topic}: only the order before the rename");
        assert_eq!(key_id(orders[0]), "1");
        assert_eq!(orders[0].value["after"]["card"], "****", "{topic}");
        for r in &recs {
            let text = r.value.to_string();
            assert!(!text.contains("cardnum"), "{topic}: renamed column left");
            assert!(!text.contains("5500000000000004"), "{topic}: card leaked");
            assert!(!text.contains("4111111111111111"), "{topic}: card leaked");
        }
    }

    // check names it as an error, not a warning
    let out = relay::cmd(&["check", "--config", &cfg, "--region", "us"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.lines().any(|l| l.starts_with("error:")
            && l.contains("public.orders")
            && l.contains("\"card\"")),
        "{stdout}"
    );

    // the fix: the rule names the column's new name; the row goes masked
    let text = std::fs::read_to_string(&f.cfg.path).unwrap();
    std::fs::write(
        &f.cfg.path,
        text.replace("name = \"card\"", "name = \"cardnum\""),
    )
    .unwrap();
    let _relay = Relay::spawn(&f.cfg, "us", "capture");
    caught_up(&f.pg, Duration::from_secs(30)).await;
    let eu = read_all(&f.broker.brokers(), "pgrelay.us.eu", Duration::from_secs(2));
    let two: Vec<&Rec> = eu
        .iter()
        .filter(|r| table_of(r) == "public.orders" && key_id(r) == "2")
        .collect();
    assert_eq!(two.len(), 1, "order 2 after the fix");
    assert_eq!(two[0].value["after"]["cardnum"], "****");
    assert!(eu
        .iter()
        .any(|r| table_of(r) == "public.products" && key_id(r) == "7"));
}

/// A rule column renamed in place while the capture side is stopped: its
/// backlog holds changes of both shapes. A rule naming only the new name
/// stops at the old shape and says to add the earlier name; with
/// `formerly`, both shapes leave under the rule and nothing else stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_column_renamed_under_a_backlog_needs_its_earlier_name() {
    let f = fixture(SCHEMA);
    let cfg = f.cfg.path.to_str().unwrap().to_string();
    let c = f.pg.client().await;
    // set up, then stopped: what follows is a backlog
    let mut relay = Relay::spawn(&f.cfg, "us", "capture");
    c.batch_execute("INSERT INTO products VALUES (1, 'before', 1, NULL)")
        .await
        .unwrap();
    caught_up(&f.pg, Duration::from_secs(30)).await;
    relay.kill9();
    c.batch_execute(
        "INSERT INTO orders VALUES (1, 'US', 'a@x.org', '4111111111111111', 5);
         ALTER TABLE orders RENAME COLUMN card TO cardnum;
         INSERT INTO orders VALUES (2, 'US', 'b@x.org', '5500000000000004', 6);
         INSERT INTO products VALUES (7, 'after the rename', 1, NULL);",
    )
    .await
    .unwrap();
    let text = std::fs::read_to_string(&f.cfg.path).unwrap();
    std::fs::write(
        &f.cfg.path,
        text.replace("name = \"card\"", "name = \"cardnum\""),
    )
    .unwrap();
    // the table has the rule's column: check passes, the backlog does not
    let out = relay::cmd(&["check", "--config", &cfg, "--region", "us"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout
            .lines()
            .any(|l| l.starts_with("error:") && l.contains("cardnum")),
        "{stdout}"
    );
    let mut relay = Relay::spawn(&f.cfg, "us", "capture");
    let log = exited(&mut relay, "the capture side to stop at the old shape").await;
    assert!(
        log.contains("public.orders")
            && log.contains("has column \"cardnum\"")
            && log.contains("\"card\", which the table lacks now")
            && log.contains("formerly"),
        "{log}"
    );
    for (topic, recs) in us_topics(&f.broker.brokers()) {
        assert!(
            !recs.iter().any(|r| table_of(r) == "public.orders"),
            "{topic}: an order left before the rule covered both names"
        );
    }
    // the fix the error names: the earlier name too
    let text = std::fs::read_to_string(&f.cfg.path).unwrap();
    std::fs::write(
        &f.cfg.path,
        text.replace(
            "name = \"cardnum\"",
            "name = \"cardnum\"\nformerly = [\"card\"]",
        ),
    )
    .unwrap();
    let check = relay::cmd(&["check", "--config", &cfg, "--region", "us"]);
    assert!(
        String::from_utf8_lossy(&check.stdout).contains("cardnum (formerly card) masked"),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let _relay = Relay::spawn(&f.cfg, "us", "capture");
    caught_up(&f.pg, Duration::from_secs(30)).await;
    for (topic, recs) in us_topics(&f.broker.brokers()) {
        // the positive sign: the change after the backlog's orders
        assert!(
            recs.iter()
                .any(|r| table_of(r) == "public.products" && key_id(r) == "7"),
            "{topic}: the backlog was not published"
        );
        let orders: Vec<&Rec> = recs
            .iter()
            .filter(|r| table_of(r) == "public.orders")
            .collect();
        assert_eq!(orders.len(), 2, "{topic}: both orders");
        // before the rename: the column is gone from the table now, so it
        // is left out (the destination keeps its value); after: masked
        let order = |id: &str| orders.iter().find(|r| key_id(r) == id).unwrap();
        assert!(order("1").value["after"].get("card").is_none(), "{topic}");
        assert_eq!(order("2").value["after"]["cardnum"], "****", "{topic}");
        for r in &recs {
            let text = r.value.to_string();
            assert!(!text.contains("4111111111111111"), "{topic}: card leaked");
            assert!(!text.contains("5500000000000004"), "{topic}: card leaked");
        }
    }
}

/// A `partitioned` table whose replica identity is no longer FULL stops
/// the capture side: an update's old home would be a guess.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_table_without_full_identity_stops_capture() {
    let f = fixture(SCHEMA);
    let mut relay = Relay::spawn(&f.cfg, "us", "capture");
    let c = f.pg.client().await;
    c.batch_execute("INSERT INTO orders VALUES (1, 'US', 'a@x.org', '4111111111111111', 5)")
        .await
        .unwrap();
    caught_up(&f.pg, Duration::from_secs(30)).await;
    // without the old row, a move US -> DE would look like an update of a
    // DE row: eu would get an update, cn would keep the row
    c.batch_execute(
        "ALTER TABLE orders REPLICA IDENTITY DEFAULT;
         UPDATE orders SET country = 'DE' WHERE id = 1;",
    )
    .await
    .unwrap();

    let log = exited(
        &mut relay,
        "the capture side to stop on the replica identity",
    )
    .await;
    assert!(
        log.contains("public.orders") && log.contains("REPLICA IDENTITY FULL"),
        "{log}"
    );
    for (topic, recs) in us_topics(&f.broker.brokers()) {
        let ops: Vec<&str> = recs
            .iter()
            .filter(|r| table_of(r) == "public.orders")
            .map(|r| r.value["op"].as_str().unwrap_or_default())
            .collect();
        assert_eq!(ops, ["c"], "{topic}: only the insert before the change");
    }
}

/// Declaratively partitioned tables are refused by `check` and `setup`
/// with a message naming the table.
#[test]
fn declaratively_partitioned_tables_are_refused() {
    let pg = Pg::start();
    pg.psql(&format!(
        "{SCHEMA}
         CREATE TABLE events (id int, region text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
         CREATE TABLE events_us PARTITION OF events FOR VALUES IN ('us');
         CREATE TABLE events_eu PARTITION OF events FOR VALUES IN ('eu');"
    ));
    let broker = Broker::start();
    let text = crate::capture::config(&pg.dsn(), &broker.brokers())
        + "\n[[tables]]\nname = \"public.events\"\nclass = \"global\"\n";
    let cfg = ConfigFile::new(&text);
    let path = cfg.path.to_str().unwrap();
    for command in ["setup", "check"] {
        let err = relay::fails(&[command, "--config", path, "--region", "us"]);
        assert!(
            err.contains("public.events")
                && err.contains("declaratively partitioned (PARTITION BY)")
                && err.contains("[[tables]]"),
            "{command}: {err}"
        );
        assert!(
            !err.contains("lacks table public.events"),
            "{command}: {err}"
        );
    }
    // setup installed nothing half-way
    assert_eq!(
        pg.psql("SELECT count(*) FROM pg_namespace WHERE nspname = 'pgrelay'")
            .trim(),
        "0"
    );
}

const ACCOUNTS: &str = "CREATE TABLE accounts (id int PRIMARY KEY, home text, note text);";

async fn ids(pg: &Pg) -> Vec<(i32, String)> {
    pg.client()
        .await
        .query("SELECT id, home FROM accounts ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// A truncate of a `partitioned` table stays in its region (rows homed
/// elsewhere are not its to remove), counted and logged; `resync` does not
/// send it either. Global tables keep replicating truncates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_of_a_partitioned_table_stays_home() {
    let p = apply::pair(&format!("{}\n{ACCOUNTS}", apply::SCHEMA));
    // us-homed rows may go to eu; eu-homed rows stay in eu
    let text = std::fs::read_to_string(&p.cfg.path).unwrap()
        + r#"
[[tables]]
name = "public.accounts"
class = "partitioned"
home_column = "home"
[tables.allow]
us = ["eu"]
eu = []
"#;
    std::fs::write(&p.cfg.path, &text).unwrap();
    for r in ["us", "eu"] {
        relay::ok(&[
            "setup",
            "--config",
            p.cfg.path.to_str().unwrap(),
            "--region",
            r,
        ]);
    }
    let port = free_port();
    let us_cfg = ConfigFile::new(&format!("{text}\n[http]\nlisten = \"127.0.0.1:{port}\"\n"));
    let us_relay = Relay::spawn(&us_cfg, "us", "all");
    let _eu = Relay::spawn(&p.cfg, "eu", "all");

    p.us.psql("INSERT INTO accounts VALUES (1, 'us', 'a'); INSERT INTO products VALUES (1, 'tea', 1, NULL);");
    p.eu.psql("INSERT INTO accounts VALUES (2, 'eu', 'b'), (3, 'eu', 'c');");
    eventually(
        Duration::from_secs(60),
        "account 1 and product 1 in eu",
        || async {
            let accounts = ids(&p.eu).await;
            let products = apply::dump(&p.eu).await;
            (accounts.len() == 3 && products.contains_key(&1)).then_some(())
        },
    )
    .await;

    p.us.psql("TRUNCATE accounts; TRUNCATE products;");
    // the marker: written in us after the truncate
    p.us.psql("INSERT INTO accounts VALUES (100, 'us', 'marker');");
    eventually(Duration::from_secs(60), "the marker in eu", || async {
        ids(&p.eu)
            .await
            .iter()
            .any(|(id, _)| *id == 100)
            .then_some(())
    })
    .await;
    // eu's own rows are still there (and so is the us row eu received)
    assert_eq!(
        ids(&p.eu).await,
        vec![
            (1, "us".to_string()),
            (2, "eu".to_string()),
            (3, "eu".to_string()),
            (100, "us".to_string())
        ]
    );
    // the global table's truncate replicated as before
    assert!(apply::dump(&p.eu).await.is_empty());
    eventually(Duration::from_secs(30), "the drop counted", || async {
        crate::support::metrics_text(port)
            .lines()
            .any(|l| {
                l.starts_with("pgrelay_capture_dropped_total{")
                    && l.contains("reason=\"truncate_partitioned\"")
                    && l.contains("table=\"public.accounts\"")
            })
            .then_some(())
    })
    .await;
    let log = us_relay.log_text();
    assert_eq!(
        log.matches("truncate of a partitioned table not replicated")
            .count(),
        1,
        "{log}"
    );

    // resync withholds the table-wide tombstone too
    let out = relay::ok(&[
        "resync",
        "--config",
        p.cfg.path.to_str().unwrap(),
        "--region",
        "us",
    ]);
    assert!(out.contains("public.accounts"), "{out}");

    let brokers = p.broker.brokers();
    for topic in ["pgrelay.us.eu", "pgrelay.eu.us"] {
        for r in read_all(&brokers, topic, Duration::from_secs(2)) {
            if table_of(&r) != "public.accounts" {
                continue;
            }
            assert_ne!(r.value["op"], "t", "{topic}: a partitioned truncate left");
            assert_ne!(
                r.value["after"]["home"], "eu",
                "{topic}: an eu-homed row left eu"
            );
        }
    }
    assert!(ids(&p.eu).await.iter().any(|(id, _)| *id == 2));
}
