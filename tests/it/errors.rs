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

/// `config` with `properties` (TOML lines) in `[kafka.properties]`.
fn with_kafka_properties(toml: &str, properties: &str) -> String {
    let at = toml.find("[regions.us]").expect("a [regions.us] table");
    format!(
        "{}[kafka.properties]\n{properties}\n\n{}",
        &toml[..at],
        &toml[at..]
    )
}

/// `sasl_ssl` against a plaintext listener: librdkafka says only "broker
/// transport failure"; the message points at TLS.
#[test]
fn tls_to_a_plaintext_broker_hints_at_the_protocol() {
    let broker = Broker::start();
    let text = with_kafka_properties(
        &config(
            "host=127.0.0.1 port=1 user=postgres dbname=postgres connect_timeout=1",
            &broker.brokers(),
        ),
        "\"security.protocol\" = \"sasl_ssl\"\n\"sasl.mechanism\" = \"PLAIN\"\n\
         \"sasl.username\" = \"relay\"\n\"sasl.password\" = \"secret\"",
    );
    let err = check_fails(&text);
    let line = err
        .lines()
        .find(|l| l.contains("cannot reach kafka brokers"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(line.contains("security.protocol = sasl_ssl"), "{line}");
    assert!(line.contains("TLS"), "{line}");
    assert!(line.contains(&broker.brokers()), "{line}");
}

/// A CA file that is not there is named with its property and path, at
/// once, by every command that talks to Kafka.
#[test]
fn a_missing_kafka_ca_file_is_named_with_its_path() {
    let missing = "/nonexistent-pgrelay-test/kafka-ca.pem";
    let pg = Pg::start();
    pg.psql(SCHEMA);
    let text = quick_start(&with_kafka_properties(
        &config(&pg.dsn(), "127.0.0.1:1"),
        &format!("\"security.protocol\" = \"ssl\"\n\"ssl.ca.location\" = \"{missing}\""),
    ));
    let cfg = ConfigFile::new(&text);
    let path = cfg.path.to_str().unwrap();
    for args in [
        vec!["check", "--config", path, "--region", "us"],
        vec!["setup", "--config", path, "--region", "us"],
        vec![
            "run", "--config", path, "--region", "us", "--role", "capture",
        ],
    ] {
        let err = fails(&args);
        assert!(
            err.contains(&format!("ssl.ca.location = \"{missing}\"")),
            "{args:?}: {err}"
        );
        assert!(err.contains("No such file"), "{args:?}: {err}");
    }
}

/// `run` with an `sslrootcert` that is not there fails at once, naming the
/// file, instead of retrying for relay.startup_timeout as if the network
/// could bring it.
#[test]
fn run_with_a_missing_sslrootcert_fails_at_once_naming_the_file() {
    let missing = "/nonexistent-pgrelay-test/pg-ca.pem";
    // unreachable, so a retrying sidecar would wait out the default 30 s
    let dsn = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=1 \
         sslmode=verify-full sslrootcert={missing}",
        free_port()
    );
    let cfg = ConfigFile::new(&config(&dsn, "127.0.0.1:1"));
    let mut child = std::process::Command::new(crate::support::relay::bin())
        .args([
            "run",
            "--config",
            cfg.path.to_str().unwrap(),
            "--region",
            "us",
        ])
        .args(["--role", "capture"])
        .env("PGRELAY_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("pgrelay run still retrying after 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    assert!(err.contains(&format!("sslrootcert {missing}")), "{err}");
    assert!(!err.contains("retrying"), "{err}");
}

/// The unknown-key message offers only keys that are in use.
#[test]
fn an_unknown_key_lists_no_retired_key() {
    let text = config("host=127.0.0.1 user=x", "127.0.0.1:1").replacen(
        "[relay]\n",
        "[relay]\nprefx = \"pgrelay\"\n",
        1,
    );
    let err = check_fails(&text);
    assert!(err.contains("unknown field `prefx`"), "{err}");
    assert!(err.contains("`startup_timeout`"), "{err}");
    assert!(!err.contains("hash_salt"), "{err}");
}
