//! The capture side end to end: declared tables -> residency-filtered,
//! stamped records on the right topics.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use crate::support::broker::Broker;
use crate::support::eventually;
use crate::support::kafka::{read_all, Rec};
use crate::support::pg::{region_dsns, Pg, PgOptions};
use crate::support::relay::{self, ConfigFile, Relay};

pub const SCHEMA: &str = "
CREATE TABLE users (id int PRIMARY KEY, email text, country text);
CREATE TABLE products (id int PRIMARY KEY, name text, price numeric, doc text);
CREATE TABLE currencies (code text PRIMARY KEY, rate numeric);
CREATE TABLE orders (id bigint PRIMARY KEY, country text, email text, card text, amount numeric);
CREATE TABLE scratch (id serial PRIMARY KEY, note text);
";

/// Hash keys of the test configs' regions (32 bytes and more).
pub const HASH_KEY_US: &str = "us-test-hash-key-0123456789abcdef";
pub const HASH_KEY_EU: &str = "eu-test-hash-key-0123456789abcdef";
pub const HASH_KEY_CN: &str = "cn-test-hash-key-0123456789abcdef";

/// A three-region config whose `us` region is `pg`; the other regions'
/// databases are not contacted by the capture side.
pub fn config(us_dsn: &str, brokers: &str) -> String {
    let us_dsns = region_dsns(us_dsn);
    format!(
        r#"
[relay]
prefix = "pgrelay"
max_stamp_ahead = "5m"

[relay.capture]
status_interval = "200ms"

[kafka]
brokers = "{brokers}"

[regions.us]
id = 1
{us_dsns}
hash_key = "{HASH_KEY_US}"

[regions.eu]
id = 2
dsn = "host=127.0.0.1 port=1 user=postgres dbname=postgres"
hash_key = "{HASH_KEY_EU}"

[regions.cn]
id = 3
dsn = "host=127.0.0.1 port=1 user=postgres dbname=postgres"
hash_key = "{HASH_KEY_CN}"

[[tables]]
name = "public.users"
class = "local"

[[tables]]
name = "public.products"
class = "global"

[[tables]]
name = "public.currencies"
class = "owned"
owner = "us"

[[tables]]
name = "public.orders"
class = "partitioned"
home_column = "country"
aliases = {{ DE = "eu", FR = "eu", US = "us", CN = "cn" }}
[tables.allow]
us = ["eu", "cn"]
eu = []
cn = []
[[tables.columns]]
name = "email"
action = "hash"
to = ["cn"]
[[tables.columns]]
name = "card"
action = "mask"
mask = "****"
"#
    )
}

pub struct Fixture {
    pub pg: Pg,
    pub broker: Broker,
    pub cfg: ConfigFile,
}

pub fn fixture(schema: &str) -> Fixture {
    let pg = Pg::start();
    pg.psql(schema);
    let broker = Broker::start();
    let cfg = ConfigFile::new(&config(&pg.dsn(), &broker.brokers()));
    relay::ok(&[
        "setup",
        "--config",
        cfg.path.to_str().unwrap(),
        "--region",
        "us",
    ]);
    Fixture { pg, broker, cfg }
}

pub async fn confirmed_lsn(pg: &Pg) -> u64 {
    let c = pg.client().await;
    let row = c
        .query_one(
            "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint FROM pg_replication_slots WHERE slot_name = 'pgrelay_us'",
            &[],
        )
        .await
        .unwrap();
    row.get::<_, i64>(0) as u64
}

pub async fn current_lsn(pg: &Pg) -> u64 {
    let c = pg.client().await;
    let row = c
        // the insert position: pg_current_wal_lsn() is the write position,
        // which lags behind a commit still in the WAL buffers
        // (synchronous_commit = off)
        .query_one(
            "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint",
            &[],
        )
        .await
        .unwrap();
    row.get::<_, i64>(0) as u64
}

/// Waits until the slot has confirmed everything written so far.
pub async fn caught_up(pg: &Pg, timeout: Duration) {
    let target = current_lsn(pg).await;
    eventually(
        timeout,
        "the slot to confirm the current WAL position",
        || async { (confirmed_lsn(pg).await >= target).then_some(()) },
    )
    .await;
}

fn table_of(r: &Rec) -> String {
    r.key["table"].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_declared_tables_with_residency_rules() {
    let f = fixture(SCHEMA);
    let mut relay = Relay::spawn(&f.cfg, "us", "capture");
    let c = f.pg.client().await;
    c.batch_execute(
        "INSERT INTO users VALUES (1, 'pii@example.com', 'US');
         INSERT INTO scratch (note) VALUES ('undeclared');
         INSERT INTO products VALUES (1, 'tea', 3.50, NULL), (2, 'cup', 9.99, NULL);
         UPDATE products SET price = 4.00 WHERE id = 1;
         DELETE FROM products WHERE id = 2;
         INSERT INTO currencies VALUES ('EUR', 1.08);
         INSERT INTO orders VALUES (10, 'US', 'a@x.org', '4111111111111111', 5),
                                   (11, 'DE', 'b@x.org', '5500000000000004', 6),
                                   (12, 'CN', 'c@x.org', '340000000000009', 7);",
    )
    .await
    .unwrap();
    // a TOASTed value, then an update that does not touch it
    // (hex digests: too random to compress inline, so stored out of line)
    c.batch_execute(
        "INSERT INTO products SELECT 3, 'book', 20, string_agg(md5(g::text), '') \
         FROM generate_series(1, 4000) g",
    )
    .await
    .unwrap();
    c.batch_execute("UPDATE products SET price = 21 WHERE id = 3")
        .await
        .unwrap();
    // a new primary key: the row moves (delete of 1, insert of 4)
    c.batch_execute("UPDATE products SET id = 4 WHERE id = 1")
        .await
        .unwrap();
    // a move that leaves the TOASTed value untouched: the stream carries it
    // in neither tuple (key-only before image), so it is read back
    c.batch_execute("UPDATE products SET id = 5 WHERE id = 3")
        .await
        .unwrap();
    // order 10 moves home US -> DE: it must leave cn (allowed for US rows only)
    c.batch_execute("UPDATE orders SET country = 'DE' WHERE id = 10")
        .await
        .unwrap();
    // order 11 moves DE -> US: it arrives whole in cn
    c.batch_execute("UPDATE orders SET country = 'US' WHERE id = 11")
        .await
        .unwrap();
    // a transaction applied by pgrelay (replication origin): never published
    c.batch_execute(
        "BEGIN;
         SELECT pg_replication_origin_session_setup('pgrelay_eu');
         INSERT INTO products VALUES (99, 'from-eu', 1, NULL);
         COMMIT;
         SELECT pg_replication_origin_session_reset();",
    )
    .await
    .unwrap();
    c.batch_execute("TRUNCATE currencies").await.unwrap();
    caught_up(&f.pg, Duration::from_secs(30)).await;

    let brokers = f.broker.brokers();
    let eu = read_all(&brokers, "pgrelay.us.eu", Duration::from_secs(2));
    let cn = read_all(&brokers, "pgrelay.us.cn", Duration::from_secs(1));
    assert_eq!(
        relay.terminate(Duration::from_secs(20)),
        Some(0),
        "clean exit on SIGTERM"
    );

    for (dest, recs) in [("eu", &eu), ("cn", &cn)] {
        for r in recs.iter() {
            let t = table_of(r);
            assert!(
                t == "public.products" || t == "public.currencies" || t == "public.orders",
                "{dest}: unexpected table {t}"
            );
            assert_ne!(r.value["after"]["id"], "99", "origin-tagged write leaked");
            assert_eq!(r.value["pgrelay"]["origin"], "us");
            assert_eq!(r.headers["pgrelay.origin"], "us");
            assert_eq!(r.headers["pgrelay.table"], t);
            assert!(r.value["pgrelay"]["hlc"].as_u64().unwrap() > 0);
            assert!(
                !r.value.to_string().contains("pii@example.com"),
                "local row leaked"
            );
            for card in ["4111111111111111", "5500000000000004", "340000000000009"] {
                assert!(
                    !r.value.to_string().contains(card),
                    "{dest}: card number leaked"
                );
            }
            assert!(r.value["after"].get("_pgrelay_hlc").is_none());
        }
    }

    // products: c, c, u, d, c(book), u(book) in order per key, to both
    for recs in [&eu, &cn] {
        let products: Vec<&Rec> = recs
            .iter()
            .filter(|r| table_of(r) == "public.products")
            .collect();
        let ops: Vec<(String, String)> = products
            .iter()
            .map(|r| {
                (
                    r.key["key"]["id"].as_str().unwrap().to_string(),
                    r.value["op"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let per_key = |id: &str| -> Vec<String> {
            ops.iter()
                .filter(|(k, _)| k == id)
                .map(|(_, o)| o.clone())
                .collect()
        };
        assert_eq!(per_key("1"), vec!["c", "u", "d"]);
        assert_eq!(per_key("4"), vec!["c"]);
        assert_eq!(per_key("2"), vec!["c", "d"]);
        assert_eq!(per_key("3"), vec!["c", "u", "d"]);
        assert_eq!(per_key("5"), vec!["c"]);
        let upd = products
            .iter()
            .find(|r| r.key["key"]["id"] == "1" && r.value["op"] == "u")
            .unwrap();
        assert_eq!(upd.value["after"]["price"], "4.00");
        // global tables keep REPLICA IDENTITY DEFAULT (before_image = "key"):
        // no old row for updates, only the key for deletes
        assert!(upd.value["before"].is_null(), "{}", upd.value);
        let del = products
            .iter()
            .find(|r| r.key["key"]["id"] == "2" && r.value["op"] == "d")
            .unwrap();
        assert_eq!(del.value["before"], serde_json::json!({"id": "2"}));
        let moved = products.iter().find(|r| r.key["key"]["id"] == "4").unwrap();
        assert_eq!(moved.value["after"]["name"], "tea");
        assert_eq!(moved.value["after"]["price"], "4.00");
        // stamps of one row only grow
        let stamps: Vec<u64> = products
            .iter()
            .filter(|r| r.key["key"]["id"] == "1")
            .map(|r| r.value["pgrelay"]["hlc"].as_u64().unwrap())
            .collect();
        assert!(stamps[1] > stamps[0]);
        // the TOASTed value the update did not touch is left out (and
        // listed), so the apply side keeps what it has
        let book = products
            .iter()
            .find(|r| r.key["key"]["id"] == "3" && r.value["op"] == "u")
            .unwrap();
        assert!(book.value["after"].get("doc").is_none(), "{}", book.value);
        assert_eq!(
            book.value["pgrelay"]["unchanged"],
            serde_json::json!(["doc"])
        );
        assert_eq!(book.value["after"]["price"], "21");
        let moved_book = products.iter().find(|r| r.key["key"]["id"] == "5").unwrap();
        let doc = moved_book.value["after"]["doc"]
            .as_str()
            .unwrap_or_default();
        assert_eq!(doc.len(), 4000 * 32, "the moved row lost its TOASTed value");
        assert!(doc.starts_with("c4ca4238a0b923820dcc509a6f75849b"));
        assert_eq!(
            moved_book.value["pgrelay"]["unchanged"],
            serde_json::json!([])
        );
        assert_eq!(moved_book.value["after"]["price"], "21");
        // a truncate is keyed by table only, so it may land in another
        // partition than the rows: its stamp orders it after them
        let currency = |op: &str| -> u64 {
            recs.iter()
                .find(|r| table_of(r) == "public.currencies" && r.value["op"] == op)
                .unwrap_or_else(|| panic!("no {op} record for currencies"))
                .value["pgrelay"]["hlc"]
                .as_u64()
                .unwrap()
        };
        assert!(currency("t") > currency("c"));
    }

    // orders: eu gets rows homed US (allowed) and DE (home); cn gets only US-homed
    let orders = |recs: &Vec<Rec>| -> BTreeMap<String, Vec<String>> {
        let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for r in recs.iter().filter(|r| table_of(r) == "public.orders") {
            m.entry(r.key["key"]["id"].as_str().unwrap().to_string())
                .or_default()
                .push(r.value["op"].as_str().unwrap().to_string());
        }
        m
    };
    let eu_orders = orders(&eu);
    let cn_orders = orders(&cn);
    assert_eq!(
        eu_orders.get("10"),
        Some(&vec!["c".to_string(), "u".to_string()])
    );
    assert_eq!(
        eu_orders.get("11"),
        Some(&vec!["c".to_string(), "u".to_string()])
    );
    assert_eq!(eu_orders.get("12"), None, "CN-homed order reached eu");
    assert_eq!(
        cn_orders.get("10"),
        Some(&vec!["c".to_string(), "d".to_string()]),
        "order that left US must be deleted in cn"
    );
    assert_eq!(
        cn_orders.get("11"),
        Some(&vec!["c".to_string()]),
        "order that became US-homed arrives whole in cn"
    );
    assert_eq!(cn_orders.get("12"), Some(&vec!["c".to_string()]));
    // email hashed for cn only, card masked everywhere
    let order = |recs: &Vec<Rec>, id: &str, op: &str| -> serde_json::Value {
        recs.iter()
            .find(|r| {
                table_of(r) == "public.orders" && r.key["key"]["id"] == id && r.value["op"] == op
            })
            .unwrap()
            .value
            .clone()
    };
    let cn11 = order(&cn, "11", "c");
    assert_eq!(cn11["after"]["country"], "US");
    assert_eq!(cn11["after"]["amount"], "6");
    assert_ne!(cn11["after"]["email"], "b@x.org");
    let hashed = cn11["after"]["email"].as_str().unwrap();
    assert_eq!(
        hashed.strip_prefix("k1:").map(str::len),
        Some(64),
        "{hashed}"
    );
    assert_eq!(cn11["after"]["card"], "****");
    let eu10 = order(&eu, "10", "c");
    assert_eq!(eu10["after"]["email"], "a@x.org");
    assert_eq!(eu10["after"]["card"], "****");

    // the drop metric is keyed by table, destination and reason
    let log = relay.log_text();
    assert!(!log.contains("pii@example.com"), "row value in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_advances_with_only_undeclared_traffic() {
    let f = fixture(SCHEMA);
    let _relay = Relay::spawn(&f.cfg, "us", "capture");
    let c = f.pg.client().await;
    // let the capture start streaming
    c.batch_execute("INSERT INTO products VALUES (1, 'tea', 1, NULL)")
        .await
        .unwrap();
    caught_up(&f.pg, Duration::from_secs(30)).await;
    let before = confirmed_lsn(&f.pg).await;
    for i in 0..20 {
        c.batch_execute(&format!(
            "INSERT INTO scratch (note) SELECT 'n{i}' FROM generate_series(1, 500); INSERT INTO users VALUES ({i}, 'x', 'US')"
        ))
        .await
        .unwrap();
    }
    let target = current_lsn(&f.pg).await;
    assert!(target > before);
    eventually(
        Duration::from_secs(30),
        "confirmed_flush_lsn to pass the undeclared traffic",
        || async { (confirmed_lsn(&f.pg).await >= target).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_mid_workload_loses_nothing() {
    let f = fixture(SCHEMA);
    let mut relay = Relay::spawn(&f.cfg, "us", "capture");
    let dsn = f.pg.dsn();
    // 50k inserts then 50k updates, 500 rows per transaction
    let writer = tokio::spawn(async move {
        let (c, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        for b in 0..100i64 {
            c.batch_execute(&format!(
                "INSERT INTO products (id, name, price) SELECT g, 'p' || g, 1 FROM generate_series({}, {}) g",
                b * 500 + 1,
                b * 500 + 500
            ))
            .await
            .unwrap();
        }
        for b in 0..100i64 {
            c.batch_execute(&format!(
                "UPDATE products SET price = 2 WHERE id BETWEEN {} AND {}",
                b * 500 + 1,
                b * 500 + 500
            ))
            .await
            .unwrap();
        }
    });
    // kill -9 while the workload runs, twice
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        relay.kill9();
        relay = Relay::spawn(&f.cfg, "us", "capture");
    }
    writer.await.unwrap();
    caught_up(&f.pg, Duration::from_secs(120)).await;
    drop(relay);

    let recs = read_all(&f.broker.brokers(), "pgrelay.us.eu", Duration::from_secs(3));
    let mut history: HashMap<String, Vec<String>> = HashMap::new();
    for r in recs.iter().filter(|r| table_of(r) == "public.products") {
        history
            .entry(r.key["key"]["id"].as_str().unwrap().to_string())
            .or_default()
            .push(r.value["after"]["price"].as_str().unwrap().to_string());
    }
    assert_eq!(history.len(), 50_000, "every inserted key reached Kafka");
    for (id, prices) in &history {
        // at-least-once: a restart re-sends from the confirmed LSN, so a
        // key's history may repeat, but nothing is missing and the last
        // version is last
        let first_one = prices.iter().position(|p| p == "1");
        let first_two = prices.iter().position(|p| p == "2");
        assert!(first_one.is_some(), "key {id}: insert missing");
        assert!(first_two.is_some(), "key {id}: update missing");
        assert!(first_one < first_two, "key {id}: update before insert");
        assert_eq!(
            prices.last().map(String::as_str),
            Some("2"),
            "key {id}: {prices:?}"
        );
    }
}

#[test]
fn check_reports_the_database_and_prints_the_residency_matrix() {
    let f = fixture(SCHEMA);
    let cfg = f.cfg.path.to_str().unwrap();
    let out = relay::ok(&["check", "--config", cfg, "--region", "us"]);
    assert!(out.contains("region us: database ok"), "{out}");
    assert!(out.contains("topic pgrelay.us.eu ok"), "{out}");
    // the C stamp trigger where the extension is built (15 here), else PL/pgSQL
    let stamp = if crate::support::pg::major() == 15 {
        "stamp trigger in C (extension pgrelay)"
    } else {
        "stamp trigger in PL/pgSQL"
    };
    assert!(out.contains(stamp), "{out}");
    assert!(out.contains("public.orders"), "{out}");
    assert!(out.contains("public.users"), "{out}");
    // a global table left at REPLICA IDENTITY FULL (set up by an older
    // version) still works: a warning, not a failure
    f.pg.psql("ALTER TABLE products REPLICA IDENTITY FULL");
    let out = relay::ok(&["check", "--config", cfg, "--region", "us"]);
    assert!(
        out.contains("products has REPLICA IDENTITY FULL, which relay.capture.before_image"),
        "{out}"
    );
    // one that deletes could not key is refused
    f.pg.psql("ALTER TABLE products REPLICA IDENTITY NOTHING");
    let out = relay::cmd(&["check", "--config", cfg, "--region", "us"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("REPLICA IDENTITY NOTHING"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    f.pg.psql("ALTER TABLE products REPLICA IDENTITY DEFAULT");
    // what setup installs is checked: remove a trigger and check names it
    f.pg.psql("DROP TRIGGER pgrelay_stamp ON products");
    let out = relay::cmd(&["check", "--config", cfg, "--region", "us"]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("public.products") && text.contains("run pgrelay setup"),
        "{text}"
    );
}

/// A DEFERRABLE primary key can be neither the replica identity nor the
/// arbiter of the apply side's upserts: `check` and `setup` refuse the
/// table, naming the fix, and `setup` alters nothing before it is applied.
#[test]
fn a_deferrable_primary_key_is_refused_before_anything_is_altered() {
    let pg = Pg::start();
    pg.psql(&SCHEMA.replace(
        "products (id int PRIMARY KEY,",
        "products (id int PRIMARY KEY DEFERRABLE INITIALLY DEFERRED,",
    ));
    let broker = Broker::start();
    let cfg = ConfigFile::new(&config(&pg.dsn(), &broker.brokers()));
    let path = cfg.path.to_str().unwrap();
    let fix = "ALTER TABLE \"public\".\"products\" DROP CONSTRAINT \"products_pkey\", \
               ADD CONSTRAINT \"products_pkey\" PRIMARY KEY (\"id\")";
    let out = relay::fails(&["check", "--config", path, "--region", "us"]);
    assert!(
        out.contains(
            "error: region us: table public.products has a DEFERRABLE primary key (products_pkey)"
        ),
        "{out}"
    );
    assert!(out.contains(fix), "{out}");
    let out = relay::fails(&["setup", "--config", path, "--region", "us"]);
    assert!(out.contains("DEFERRABLE primary key"), "{out}");
    // refused before anything was altered
    let untouched = pg.psql(
        "SELECT to_regnamespace('pgrelay') IS NULL, \
                (SELECT relreplident FROM pg_class WHERE oid = 'products'::regclass), \
                (SELECT count(*) FROM pg_attribute WHERE attrelid = 'products'::regclass \
                 AND attname = '_pgrelay_hlc')",
    );
    assert_eq!(untouched.trim(), "t|d|0");
    // the fix the message names works; then the table's own writes do
    pg.psql(fix);
    relay::ok(&["setup", "--config", path, "--region", "us"]);
    pg.psql(
        "INSERT INTO products VALUES (1, 'tea', 1, NULL); \
         UPDATE products SET price = 2 WHERE id = 1; DELETE FROM products WHERE id = 1;",
    );
}

/// `pgrelay resync` sends the rows as they are — those that predate setup
/// included — and the tombstones, each with its stamp, through the same
/// residency rules as captured changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_sends_existing_rows_within_residency_rules() {
    let f = fixture(&format!(
        "{SCHEMA}
         INSERT INTO users VALUES (1, 'pii@example.com', 'US');
         INSERT INTO products VALUES (1, 'tea', 3.50, NULL), (2, 'cup', 9.99, NULL);
         INSERT INTO currencies VALUES ('EUR', 1.08);
         INSERT INTO orders VALUES (10, 'US', 'a@x.org', '4111111111111111', 5),
                                   (11, 'DE', 'b@x.org', '5500000000000004', 6);"
    ));
    let c = f.pg.client().await;
    c.batch_execute(
        "INSERT INTO products VALUES (3, 'pot', 20, NULL);
         DELETE FROM products WHERE id = 2;",
    )
    .await
    .unwrap();
    let stamp = |sql: &'static str| {
        let c = &c;
        async move { c.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) as u64 }
    };
    let pot = stamp("SELECT _pgrelay_hlc FROM products WHERE id = 3").await;
    let buried = stamp("SELECT hlc FROM pgrelay.tombstones WHERE pk = '{\"id\": \"2\"}'").await;
    let cfg = f.cfg.path.to_str().unwrap();
    let brokers = f.broker.brokers();

    let dry = relay::ok(&["resync", "--config", cfg, "--region", "us", "--dry-run"]);
    assert!(dry.contains("dry run, nothing sent"), "{dry}");
    assert!(
        read_all(&brokers, "pgrelay.us.eu", Duration::from_secs(1)).is_empty(),
        "a dry run sent records"
    );
    let run = relay::cmd(&["resync", "--config", cfg, "--region", "us"]);
    assert!(run.status.success(), "{run:?}");
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(out.contains("public.orders"), "{out}");
    // progress goes to stderr, as plain lines when it is not a terminal:
    // the 5 rows of products, currencies and orders (tombstones aside)
    let progress = String::from_utf8_lossy(&run.stderr);
    assert!(
        progress.contains("resync us: 5 rows, ") && progress.contains("elapsed, done"),
        "{progress}"
    );
    assert!(!out.contains("rows/s"), "progress on stdout: {out}");

    let eu = read_all(&brokers, "pgrelay.us.eu", Duration::from_secs(2));
    let cn = read_all(&brokers, "pgrelay.us.cn", Duration::from_secs(1));
    let summary = |recs: &[Rec]| -> BTreeMap<(String, String, String), (u64, String)> {
        recs.iter()
            .map(|r| {
                let key = r.key["key"].as_object().unwrap();
                let id = key.values().next().unwrap().as_str().unwrap().to_string();
                let row = if r.value["op"] == "d" {
                    &r.value["before"]
                } else {
                    &r.value["after"]
                };
                (
                    (table_of(r), id, r.value["op"].as_str().unwrap().to_string()),
                    (r.value["pgrelay"]["hlc"].as_u64().unwrap(), row.to_string()),
                )
            })
            .collect()
    };
    let (eu, cn) = (summary(&eu), summary(&cn));
    let key = |t: &str, id: &str, op: &str| (format!("public.{t}"), id.to_string(), op.to_string());
    for (dest, recs) in [("eu", &eu), ("cn", &cn)] {
        // rows from before setup carry stamp 0: older than any write
        assert_eq!(recs[&key("products", "1", "c")].0, 0, "{dest}");
        assert_eq!(recs[&key("products", "3", "c")].0, pot, "{dest}");
        assert_eq!(recs[&key("products", "2", "d")].0, buried, "{dest}");
        assert_eq!(
            recs[&key("products", "2", "d")].1,
            r#"{"id":"2"}"#,
            "{dest}"
        );
        assert!(recs.contains_key(&key("currencies", "EUR", "c")), "{dest}");
        assert!(
            !recs.keys().any(|k| k.0 == "public.users"),
            "{dest}: local rows sent"
        );
        let order = &recs[&key("orders", "10", "c")].1;
        assert!(order.contains(r#""card":"****""#), "{dest}: {order}");
    }
    assert_eq!(eu.len(), 6, "{eu:?}");
    // DE-homed order 11 stays out of cn; cn gets the email hashed
    assert!(eu.contains_key(&key("orders", "11", "c")));
    assert_eq!(cn.len(), 5, "{cn:?}");
    assert!(!cn[&key("orders", "10", "c")].1.contains("a@x.org"));
    assert!(eu[&key("orders", "10", "c")].1.contains("a@x.org"));

    // one destination, one table
    let out = relay::ok(&[
        "resync",
        "--config",
        cfg,
        "--region",
        "us",
        "--to",
        "cn",
        "--table",
        "public.currencies",
    ]);
    assert!(!out.contains("public.products"), "{out}");
    let cn_again = read_all(&brokers, "pgrelay.us.cn", Duration::from_secs(1));
    assert_eq!(cn_again.len(), 6);
    assert_eq!(
        read_all(&brokers, "pgrelay.us.eu", Duration::from_secs(1)).len(),
        6
    );
    // a destination or table that is not one is named
    let bad = relay::fails(&["resync", "--config", cfg, "--region", "us", "--to", "us"]);
    assert!(
        bad.contains("--to us: not a destination of region us"),
        "{bad}"
    );
    let bad = relay::fails(&[
        "resync",
        "--config",
        cfg,
        "--region",
        "us",
        "--table",
        "public.users",
    ]);
    assert!(bad.contains("--table public.users"), "{bad}");
}

/// A table of many blocks is read by several sessions (`--jobs`), each a
/// range of its blocks under the run's one snapshot, each with its own
/// producer: every row goes exactly once, through the same residency and
/// column rules as a serial run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parallel_resync_sends_every_row_once_within_residency_rules() {
    let f = fixture(SCHEMA);
    let c = f.pg.client().await;
    c.batch_execute(
        "INSERT INTO products SELECT g, 'p' || g || repeat('x', 300), g, NULL \
           FROM generate_series(1, 3000) g; \
         INSERT INTO orders SELECT g, CASE WHEN g % 2 = 0 THEN 'US' ELSE 'DE' END, \
           'o' || g || '@x.org', '4111111111111111', g FROM generate_series(1, 2000) g; \
         ANALYZE products, orders",
    )
    .await
    .unwrap();
    let cfg = f.cfg.path.to_str().unwrap();
    let run = std::process::Command::new(relay::bin())
        .args([
            "resync",
            "--config",
            cfg,
            "--region",
            "us",
            "--jobs",
            "3",
            "--table",
            "public.products",
            "--table",
            "public.orders",
        ])
        .env("PGRELAY_LOG", "info")
        .output()
        .unwrap();
    assert!(run.status.success(), "{run:?}");
    let err = String::from_utf8_lossy(&run.stderr);
    // the positive sign that the parts were read by helper sessions
    assert!(
        err.contains("table=public.products parts=3")
            && err.contains("table=public.orders parts=3"),
        "{err}"
    );
    assert!(err.contains("resync us: 5000 rows, "), "{err}");
    let brokers = f.broker.brokers();
    for (dest, want_orders) in [("eu", 2000), ("cn", 1000)] {
        let recs = read_all(
            &brokers,
            &format!("pgrelay.us.{dest}"),
            Duration::from_secs(2),
        );
        let mut seen: BTreeMap<(String, i64), usize> = BTreeMap::new();
        for r in &recs {
            assert_eq!(r.value["op"], "c", "{dest}: {:?}", r.value);
            let id: i64 = r.value["after"]["id"].as_str().unwrap().parse().unwrap();
            *seen.entry((table_of(r), id)).or_default() += 1;
            if table_of(r) == "public.orders" {
                let after = &r.value["after"];
                assert_eq!(after["card"], "****", "{dest}: {after}");
                assert_eq!(
                    after["country"] == "US",
                    dest == "cn" || id % 2 == 0,
                    "{dest}: {after}"
                );
                assert_eq!(
                    after["email"] == format!("o{id}@x.org").as_str(),
                    dest == "eu",
                    "{dest}: {after}"
                );
            }
        }
        assert!(seen.values().all(|n| *n == 1), "{dest}: a row sent twice");
        let count = |t: &str| seen.keys().filter(|(table, _)| table == t).count();
        assert_eq!(count("public.products"), 3000, "{dest}");
        assert_eq!(count("public.orders"), want_orders, "{dest}");
        assert_eq!(recs.len(), 3000 + want_orders, "{dest}");
    }
}

/// A slot PostgreSQL invalidated (it fell more than max_slot_wal_keep_size
/// behind while no sidecar ran) is named with what to do; `setup` creates
/// it anew and `resync` sends what was written meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_slot_is_named_then_setup_and_resync_recover() {
    let pg = Pg::start_with(PgOptions {
        extra: vec![("max_slot_wal_keep_size".into(), "'1MB'".into())],
        ..Default::default()
    });
    pg.psql(SCHEMA);
    let broker = Broker::start();
    let cfg = ConfigFile::new(&config(&pg.dsn(), &broker.brokers()));
    let path = cfg.path.to_str().unwrap();
    relay::ok(&["setup", "--config", path, "--region", "us"]);
    let c = pg.client().await;
    // written while no sidecar runs, then enough WAL to pass the limit
    c.batch_execute("INSERT INTO products VALUES (1, 'gap', 1, NULL)")
        .await
        .unwrap();
    for _ in 0..3 {
        c.batch_execute(
            "INSERT INTO scratch (note) SELECT repeat('x', 1000) FROM generate_series(1, 2000);
             SELECT pg_switch_wal();",
        )
        .await
        .unwrap();
    }
    c.batch_execute("CHECKPOINT").await.unwrap();
    let status: String = c
        .query_one(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'pgrelay_us'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "lost", "the test did not invalidate the slot");

    // the sidecar stops with the reason and the fix, as do check and status
    let mut capture = Relay::spawn(&cfg, "us", "capture");
    let start = std::time::Instant::now();
    let code = loop {
        if let Some(st) = capture.child.try_wait().unwrap() {
            break st.code();
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the sidecar kept running on a lost slot:\n{}",
            capture.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_ne!(code, Some(0));
    let log = capture.log_text();
    assert!(
        log.contains("invalidated by PostgreSQL") && log.contains("pgrelay resync --region us"),
        "{log}"
    );
    let checked = relay::fails(&["check", "--config", path, "--region", "us"]);
    assert!(checked.contains("invalidated by PostgreSQL"), "{checked}");

    // setup replaces the slot and says what is left to do
    let out = relay::ok(&["setup", "--config", path, "--region", "us"]);
    assert!(out.contains("created anew"), "{out}");
    assert!(out.contains("pgrelay resync"), "{out}");
    let status: String = c
        .query_one(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'pgrelay_us'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_ne!(status, "lost");
    // the capture side streams again; resync sends the row of the gap
    let _capture = Relay::spawn(&cfg, "us", "capture");
    c.batch_execute("INSERT INTO products VALUES (2, 'after', 2, NULL)")
        .await
        .unwrap();
    let brokers = broker.brokers();
    eventually(Duration::from_secs(60), "the new row in Kafka", || async {
        read_all(&brokers, "pgrelay.us.eu", Duration::from_secs(1))
            .iter()
            .any(|r| r.value["after"]["name"] == "after")
            .then_some(())
    })
    .await;
    relay::ok(&[
        "resync",
        "--config",
        path,
        "--region",
        "us",
        "--table",
        "public.products",
    ]);
    let recs = read_all(&brokers, "pgrelay.us.eu", Duration::from_secs(1));
    assert!(
        recs.iter().any(|r| r.value["after"]["name"] == "gap"),
        "the row written while the slot was lost was not sent"
    );
}
