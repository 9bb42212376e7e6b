//! Bad input: each gives one clear message naming what to fix, a non-zero
//! exit, and loses nothing already committed.

use std::time::Duration;

use crate::capture::{caught_up, config, fixture, SCHEMA};
use crate::support::broker::Broker;
use crate::support::free_port;
use crate::support::kafka::read_all;
use crate::support::pg::{Pg, PgOptions};
use crate::support::relay::{fails, ConfigFile, Relay};

/// A config that gives up on unreachable services after one second.
fn quick_start(toml: &str) -> String {
    toml.replacen("[relay]\n", "[relay]\nstartup_timeout = \"1s\"\n", 1)
}

fn check_fails(toml: &str) -> String {
    let cfg = ConfigFile::new(toml);
    fails(&["check", "--config", cfg.path.to_str().unwrap()])
}

#[test]
fn malformed_toml_names_the_line() {
    let text = config("host=127.0.0.1 user=x", "127.0.0.1:1")
        .replace("prefix = \"pgrelay\"", "prefix = \"pgrelay\nbroken");
    let err = check_fails(&text);
    assert!(err.contains("relay.toml"), "{err}");
    assert!(err.contains("line"), "{err}");
}

#[test]
fn unknown_key_is_rejected_with_its_line() {
    let text = config("host=127.0.0.1 user=x", "127.0.0.1:1").replace(
        "max_stamp_ahead = \"5m\"",
        "max_stamp_ahead = \"5m\"\nbatch_szie = 10",
    );
    let err = check_fails(&text);
    assert!(err.contains("batch_szie"), "{err}");
    assert!(err.contains("line 5"), "{err}");
}

#[test]
fn undeclared_region_in_a_rule_is_named() {
    let text =
        config("host=127.0.0.1 user=x", "127.0.0.1:1").replace("to = [\"cn\"]", "to = [\"mars\"]");
    let err = check_fails(&text);
    assert!(err.contains("mars"), "{err}");
    assert!(err.contains("public.orders"), "{err}");
}

/// `check` against brokers it cannot reach says so once per cluster, each
/// broker error once, in about one timeout (10 s) — not once per topic and
/// region, one timeout after another.
#[test]
fn check_against_unreachable_brokers_answers_once_in_one_timeout() {
    let text = config(
        "host=127.0.0.1 port=1 user=postgres dbname=postgres",
        "127.0.0.1:1",
    );
    let started = std::time::Instant::now();
    let out = check_fails(&text);
    let took = started.elapsed();
    assert_eq!(
        out.matches("cannot reach kafka brokers 127.0.0.1:1")
            .count(),
        1,
        "{out}"
    );
    assert_eq!(
        out.matches("Connect to ipv4#127.0.0.1:1 failed").count(),
        1,
        "{out}"
    );
    assert!(out.contains("cannot connect to the us database"), "{out}");
    assert!(took < Duration::from_secs(25), "{took:?}\n{out}");
}

#[test]
fn missing_env_var_is_named() {
    let text = config(
        "host=127.0.0.1 user=x password=${PGRELAY_TEST_UNSET_SECRET}",
        "127.0.0.1:1",
    );
    let err = check_fails(&text);
    assert!(err.contains("PGRELAY_TEST_UNSET_SECRET"), "{err}");
}

#[test]
fn table_without_primary_key_fails_setup() {
    let pg = Pg::start();
    pg.psql(&SCHEMA.replace(
        "CREATE TABLE products (id int PRIMARY KEY,",
        "CREATE TABLE products (id int,",
    ));
    let cfg = ConfigFile::new(&config(&pg.dsn(), "127.0.0.1:1"));
    let err = fails(&[
        "setup",
        "--config",
        cfg.path.to_str().unwrap(),
        "--region",
        "us",
    ]);
    assert!(err.contains("public.products"), "{err}");
    assert!(err.contains("primary key"), "{err}");
    // nothing was installed half-way
    assert_eq!(
        pg.psql("SELECT count(*) FROM pg_namespace WHERE nspname = 'pgrelay'")
            .trim(),
        "0"
    );
}

#[test]
fn wal_level_not_logical_is_reported() {
    let pg = Pg::start_with(PgOptions {
        wal_level: Some("replica"),
        ..Default::default()
    });
    pg.psql(SCHEMA);
    let cfg = ConfigFile::new(&config(&pg.dsn(), "127.0.0.1:1"));
    let err = fails(&[
        "run",
        "--config",
        cfg.path.to_str().unwrap(),
        "--region",
        "us",
        "--role",
        "capture",
    ]);
    assert!(err.contains("wal_level"), "{err}");
    assert!(err.contains("logical"), "{err}");
}

#[test]
fn unreachable_database_is_named() {
    let port = free_port();
    let dsn = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=2");
    let cfg = ConfigFile::new(&quick_start(&config(&dsn, "127.0.0.1:1")));
    let started = std::time::Instant::now();
    let err = fails(&[
        "run",
        "--config",
        cfg.path.to_str().unwrap(),
        "--region",
        "us",
        "--role",
        "capture",
    ]);
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(1),
        "retried for relay.startup_timeout"
    );
    assert!(err.contains("us database"), "{err}");
    assert!(err.contains(&port.to_string()), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_broker_fails_start_and_loses_nothing() {
    let f = fixture(SCHEMA);
    let c = f.pg.client().await;
    c.batch_execute("INSERT INTO products VALUES (1, 'kept', 1, NULL)")
        .await
        .unwrap();
    let dead = format!("127.0.0.1:{}", free_port());
    let bad = ConfigFile::new(&quick_start(&config(&f.pg.dsn(), &dead)));
    let err = fails(&[
        "run",
        "--config",
        bad.path.to_str().unwrap(),
        "--region",
        "us",
        "--role",
        "capture",
    ]);
    assert!(err.contains(&dead), "{err}");
    assert!(err.contains("kafka"), "{err}");
    // the committed row is still delivered once the broker is reachable
    let _relay = Relay::spawn(&f.cfg, "us", "capture");
    caught_up(&f.pg, Duration::from_secs(30)).await;
    let recs = read_all(&f.broker.brokers(), "pgrelay.us.eu", Duration::from_secs(2));
    assert!(recs.iter().any(|r| r.value["after"]["name"] == "kept"));
    drop(Broker::start());
}
