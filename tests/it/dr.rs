//! Encrypted DR copies: EU-pinned rows are kept, sealed, in us's vault; us
//! can read none of it; eu is rebuilt from it after its cluster is lost.

use std::time::Duration;

use tokio_postgres::Client;

use crate::support::broker::Broker;
use crate::support::kafka::{read_raw, topics};
use crate::support::pg::{region_dsns, Pg};
use crate::support::relay::{self, ConfigFile, Relay};
use crate::support::{eventually, until_count};

const SCHEMA: &str = "
CREATE TABLE patients (
    id        bigint PRIMARY KEY,
    country   text NOT NULL,
    name      text,
    diagnosis text,
    born      date,
    score     numeric,
    photo     bytea
);
CREATE TABLE products (id bigint PRIMARY KEY, name text NOT NULL);
";

const DR_KEY: &str = "7d1c1f0a9b6e3d2c5a4f8e7b6a5d4c3b2a1f0e9d8c7b6a5f4e3d2c1b0a9f8e7d";

/// What every EU-only value carries, in one form or another: none of these
/// may appear in us, as text or hex-encoded (bytea and the sealed records'
/// fields are hex). Long enough that random ciphertext never spells one.
const MARKERS: [&str; 8] = [
    "MKR",                        // name, diagnosis, the home column, photo
    "4d4b522d6e616d65",           // "MKR-name" in hex
    "4d6b722d646961676e6f736973", // "Mkr-diagnosis" in hex
    "4d4b522d70686f746f",         // "MKR-photo" in hex
    "4d4b522d484f4d45",           // "MKR-HOME" in hex
    "1911-1",                     // born
    "4242.4242",                  // score
    "73190700",                   // id
];

fn config(eu: &Pg, us: &Pg, eu_broker: &Broker, us_broker: &Broker) -> String {
    format!(
        r#"
[relay]
prefix = "pgrelay"

[relay.capture]
status_interval = "200ms"
topic_partitions = 3

[relay.apply]
batch_max_wait = "20ms"

[regions.eu]
id = 1
{eu_dsns}
dr_key = "{DR_KEY}"
dr_key_id = "eu1"
[regions.eu.kafka]
brokers = "{eu_brokers}"

[regions.us]
id = 2
{us_dsns}
[regions.us.kafka]
brokers = "{us_brokers}"

[[tables]]
name = "public.patients"
class = "partitioned"
home_column = "country"
aliases = {{ "MKR-HOME-DE" = "eu", US = "us" }}
dr = ["us"]
[tables.allow]
eu = []
us = []

[[tables]]
name = "public.products"
class = "global"
"#,
        eu_dsns = region_dsns(&eu.dsn()),
        us_dsns = region_dsns(&us.dsn()),
        eu_brokers = eu_broker.brokers(),
        us_brokers = us_broker.brokers(),
    )
}

async fn one(c: &Client, sql: &str) -> String {
    c.query_one(sql, &[]).await.unwrap().get(0)
}

const CHECKSUM: &str =
    "SELECT coalesce(md5(string_agg(p::text, ',' ORDER BY id)), '') FROM patients p";

/// The deleted rows' keys, as tombstones keep them.
const TOMBSTONES: &str = "SELECT coalesce(string_agg(pk->>'id', ' ' ORDER BY pk->>'id'), '') \
    FROM pgrelay.tombstones WHERE table_name = 'public.patients'";

/// Every row of every table of `pg`'s database (pgrelay's own included),
/// as text.
async fn dump(c: &Client) -> String {
    let tables = c
        .query(
            "SELECT format('%I.%I', table_schema, table_name) FROM information_schema.tables \
             WHERE table_schema NOT IN ('pg_catalog', 'information_schema')",
            &[],
        )
        .await
        .unwrap();
    let mut out = String::new();
    for t in tables {
        let name: String = t.get(0);
        let text: String = c
            .query_one(
                &format!("SELECT coalesce(string_agg(t::text, E'\\n'), '') FROM {name} t"),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        out.push_str(&format!("-- {name}\n{text}\n"));
    }
    out
}

fn assert_no_marker(where_: &str, text: &str) {
    for m in MARKERS {
        assert!(
            !text.to_ascii_lowercase().contains(&m.to_ascii_lowercase()),
            "{where_} holds plaintext marker {m:?}"
        );
    }
}

/// Waits until us's vault holds a copy of each of `rows` eu rows, each at
/// least as new as eu's own (stamps are in clear in the vault).
async fn vault_caught_up(eu: &Client, us: &Client, rows: i64) {
    until_count(
        us,
        "SELECT count(*) FROM pgrelay_dr.vault WHERE home = 'eu'",
        rows,
        "the vault holding every eu row",
    )
    .await;
    let stamps: Vec<i64> = eu
        .query("SELECT _pgrelay_hlc FROM patients", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    eventually(
        Duration::from_secs(30),
        "the vault's newest stamps",
        || async {
            let have: i64 = us
                .query_one(
                    "SELECT count(*) FROM pgrelay_dr.vault WHERE stamp = ANY($1)",
                    &[&stamps],
                )
                .await
                .unwrap()
                .get(0);
            (have == stamps.len() as i64).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_rows_are_sealed_in_the_dr_region_and_restored_from_it() {
    let mut eu_pg = Pg::start();
    let us_pg = Pg::start();
    eu_pg.psql(SCHEMA);
    us_pg.psql(SCHEMA);
    let eu_broker = Broker::start();
    let us_broker = Broker::start();
    let cfg = ConfigFile::new(&config(&eu_pg, &us_pg, &eu_broker, &us_broker));
    let path = cfg.path.to_str().unwrap().to_string();
    for r in ["eu", "us"] {
        relay::ok(&["setup", "--config", &path, "--region", r]);
    }
    let mut eu_side = Relay::spawn(&cfg, "eu", "all");
    let _us_side = Relay::spawn(&cfg, "us", "all");
    let eu = eu_pg.client().await;
    let us = us_pg.client().await;

    // markers in every column; large values (stored out of line), updates
    // that leave them out of the stream, deletes, a us row
    eu.batch_execute(
        "INSERT INTO patients \
         SELECT 731907000 + i, 'MKR-HOME-DE', 'MKR-name-' || i, repeat('Mkr-diagnosis-' || i, 400), \
                date '1911-11-11' + i, 4242.4242 + i, convert_to('MKR-photo-' || i, 'UTF8') \
         FROM generate_series(1, 40) i;
         INSERT INTO patients \
         SELECT 731908000 + i, 'MKR-HOME-DE', 'MKR-small-' || i, NULL, NULL, NULL, NULL \
         FROM generate_series(1, 500) i;
         UPDATE patients SET score = score + 1 WHERE id % 3 = 0;
         UPDATE patients SET name = name || '-renamed' WHERE id % 5 = 0;
         DELETE FROM patients WHERE id % 7 = 0;",
    )
    .await
    .unwrap();
    us.batch_execute("INSERT INTO patients VALUES (1, 'US', 'us row', NULL, NULL, 1, NULL)")
        .await
        .unwrap();
    vault_caught_up(&eu, &us, 540).await;
    // status shows the recovery point: what the vault has not stored yet
    eventually(
        Duration::from_secs(30),
        "status: the vault caught up",
        || async {
            let out = relay::cmd(&["status", "--config", &path]);
            String::from_utf8_lossy(&out.stdout)
                .contains("DR copy eu -> us (encrypted): 0 records not yet in the vault")
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        one(&us, "SELECT count(*)::text FROM patients").await,
        "1",
        "no eu row in us's live table"
    );

    // nothing readable leaves eu: every record of every topic on both
    // clusters, and every table of us's database
    for broker in [&us_broker, &eu_broker] {
        let brokers = broker.brokers();
        for topic in topics(&brokers) {
            for r in read_raw(&brokers, &topic, Duration::from_secs(2)) {
                assert_no_marker(&format!("topic {topic}"), &String::from_utf8_lossy(&r));
            }
        }
    }
    let dr_records = read_raw(
        &us_broker.brokers(),
        "pgrelay.dr.eu.us",
        Duration::from_secs(2),
    );
    assert!(dr_records.len() >= 40 + 13 + 8 + 5, "{}", dr_records.len());
    assert_no_marker("us's database", &dump(&us).await);

    // eu is lost and rebuilt empty; restore brings back the same rows
    let before = one(&eu, CHECKSUM).await;
    let live_before = one(&eu, "SELECT count(*)::text FROM patients").await;
    let tombstones_before = one(&eu, TOMBSTONES).await;
    // every eu row is live or deleted (left a tombstone)
    assert_eq!(
        tombstones_before.split(' ').count() + live_before.parse::<usize>().unwrap(),
        540,
        "{tombstones_before}"
    );
    eu_side.kill9();
    drop(eu);
    eu_pg.stop();
    eu_pg = Pg::start();
    eu_pg.psql(SCHEMA);
    std::fs::write(&cfg.path, config(&eu_pg, &us_pg, &eu_broker, &us_broker)).unwrap();
    relay::ok(&["setup", "--config", &path, "--region", "eu"]);
    let eu = eu_pg.client().await;
    assert_eq!(one(&eu, "SELECT count(*)::text FROM patients").await, "0");
    let out = relay::ok(&[
        "dr", "restore", "--config", &path, "--region", "eu", "--from", "us",
    ]);
    assert!(out.contains("540 sealed copies"), "{out}");
    assert!(out.contains("public.patients"), "{out}");
    assert_eq!(one(&eu, CHECKSUM).await, before);
    assert_eq!(
        one(&eu, "SELECT count(*)::text FROM patients").await,
        live_before
    );
    // deleted rows came back as tombstones, not as rows
    assert_eq!(one(&eu, TOMBSTONES).await, tombstones_before);
    // idempotent: a second run writes nothing new
    let again = relay::ok(&[
        "dr", "restore", "--config", &path, "--region", "eu", "--from", "us",
    ]);
    assert!(again.contains("0 written"), "{again}");
    assert_eq!(one(&eu, CHECKSUM).await, before);

    // replication resumes: eu's new writes reach the vault, us's reach eu
    let _eu_side = Relay::spawn(&cfg, "eu", "all");
    eu.execute(
        "INSERT INTO patients VALUES (731907099, 'MKR-HOME-DE', 'MKR-new', NULL, NULL, NULL, NULL)",
        &[],
    )
    .await
    .unwrap();
    us.execute("INSERT INTO products VALUES (1, 'after the restore')", &[])
        .await
        .unwrap();
    until_count(
        &eu,
        "SELECT count(*) FROM products WHERE id = 1",
        1,
        "us's write in eu",
    )
    .await;
    vault_caught_up(&eu, &us, 541).await;
}
