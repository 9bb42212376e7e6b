//! Encrypted DR copies: EU-pinned rows are kept, sealed, in us's vault; us
//! can read none of it; eu is rebuilt from it after its cluster is lost.

use std::time::Duration;

use tokio_postgres::Client;

use crate::support::broker::Broker;
use crate::support::kafka::{produce, read_raw, topics};
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
    config_with(
        eu,
        us,
        eu_broker,
        us_broker,
        &format!("dr_key = \"{DR_KEY}\"\ndr_key_id = \"eu1\""),
    )
}

/// [`config`] with `keys` as eu's DR key settings.
fn config_with(eu: &Pg, us: &Pg, eu_broker: &Broker, us_broker: &Broker, keys: &str) -> String {
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
{keys}
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

/// The vault's copy of eu row `id` of `patients`, as a sealed record a
/// writer of the DR topic can read there and send again: (record key,
/// stamp, the record's JSON).
async fn vault_copy(eu: &Client, us: &Client, id: i64) -> (Vec<u8>, i64, serde_json::Value) {
    let stamp: i64 = eu
        .query_one("SELECT _pgrelay_hlc FROM patients WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    let row = eventually(
        Duration::from_secs(30),
        "the vault holding the row's newest copy",
        || async {
            us.query_opt(
                "SELECT key_hash, stamp, key_id, table_hash, encode(nonce, 'hex'), \
                 encode(ciphertext, 'hex') FROM pgrelay_dr.vault WHERE home = 'eu' AND stamp = $1",
                &[&stamp],
            )
            .await
            .unwrap()
        },
    )
    .await;
    let key: Vec<u8> = row.get(0);
    let sealed = serde_json::json!({
        "key_id": row.get::<_, String>(2),
        "table_hash": row.get::<_, String>(3),
        "stamp": row.get::<_, i64>(1),
        "nonce": row.get::<_, String>(4),
        "ciphertext": row.get::<_, String>(5),
    });
    (key, stamp, sealed)
}

fn restamped(sealed: &serde_json::Value, stamp: u64) -> Option<Vec<u8>> {
    let mut forged = sealed.clone();
    forged["stamp"] = serde_json::json!(stamp);
    Some(forged.to_string().into_bytes())
}

/// Two regions, eu sealing `patients` to us, both sidecars running.
struct Pair {
    eu_pg: Pg,
    us_pg: Pg,
    eu_broker: Broker,
    us_broker: Broker,
    cfg: ConfigFile,
    path: String,
    eu_side: Relay,
    us_side: Relay,
}

fn pair() -> Pair {
    let eu_pg = Pg::start();
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
    let eu_side = Relay::spawn(&cfg, "eu", "all");
    let us_side = Relay::spawn(&cfg, "us", "all");
    Pair {
        eu_pg,
        us_pg,
        eu_broker,
        us_broker,
        cfg,
        path,
        eu_side,
        us_side,
    }
}

/// Whoever may write the DR topic can send a row's old copy again stamped
/// beyond any bigint, or far ahead. The vault refuses both (never retried)
/// and goes on storing every genuine copy after them, of every row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_far_stamps_on_the_dr_topic_do_not_freeze_the_vault() {
    let p = pair();
    let eu = p.eu_pg.client().await;
    let us = p.us_pg.client().await;
    eu.batch_execute("INSERT INTO patients (id, country, name) VALUES (1, 'MKR-HOME-DE', 'v1')")
        .await
        .unwrap();
    let (key, oldest_stamp, oldest) = vault_copy(&eu, &us, 1).await;
    eu.batch_execute("UPDATE patients SET name = 'v2' WHERE id = 1")
        .await
        .unwrap();
    vault_caught_up(&eu, &us, 1).await;

    // the oldest copy again: stamped beyond any bigint, and ten minutes on
    let ten_minutes = 600_000u64 << 16;
    produce(
        &p.us_broker.brokers(),
        "pgrelay.dr.eu.us",
        &[
            (Some(key.clone()), restamped(&oldest, u64::MAX)),
            (
                Some(key.clone()),
                restamped(&oldest, oldest_stamp as u64 + ten_minutes),
            ),
            (Some(key.clone()), Some(b"not a sealed record".to_vec())),
        ],
    );
    // genuine copies after them, of that row and another, are stored
    eu.batch_execute(
        "UPDATE patients SET name = 'v3' WHERE id = 1;
         INSERT INTO patients (id, country, name) VALUES (2, 'MKR-HOME-DE', 'two')",
    )
    .await
    .unwrap();
    vault_caught_up(&eu, &us, 2).await;
    // the forged records were seen and skipped, not stored after all
    eventually(
        Duration::from_secs(30),
        "the vault refusing them",
        || async {
            let log = p.us_side.log_text();
            (log.contains("stamp_out_of_range")
                && log.contains("stamp_ahead")
                && log.contains("malformed"))
            .then_some(())
        },
    )
    .await;
    vault_caught_up(&eu, &us, 2).await;
}

/// A row's old copy sent again stamped just newer than its newest copy: the
/// vault cannot tell it from a genuine one and keeps it, but it does not
/// open at restore, which names it and restores the rest: the rebuilt
/// region never gets the row's old version back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restamped_old_dr_copy_does_not_roll_a_row_back_at_restore() {
    let mut p = pair();
    let eu = p.eu_pg.client().await;
    let us = p.us_pg.client().await;
    eu.batch_execute("INSERT INTO patients (id, country, name) VALUES (1, 'MKR-HOME-DE', 'v1')")
        .await
        .unwrap();
    let (key, _, oldest) = vault_copy(&eu, &us, 1).await;
    eu.batch_execute(
        "UPDATE patients SET name = 'v3' WHERE id = 1;
         INSERT INTO patients (id, country, name) VALUES (2, 'MKR-HOME-DE', 'two')",
    )
    .await
    .unwrap();
    vault_caught_up(&eu, &us, 2).await;
    let (_, v3_stamp, _) = vault_copy(&eu, &us, 1).await;
    let forged_stamp = v3_stamp + 1;
    produce(
        &p.us_broker.brokers(),
        "pgrelay.dr.eu.us",
        &[(Some(key.clone()), restamped(&oldest, forged_stamp as u64))],
    );
    until_count(
        &us,
        &format!("SELECT count(*) FROM pgrelay_dr.vault WHERE stamp = {forged_stamp}"),
        1,
        "the vault holding the forged copy",
    )
    .await;

    // eu is lost and rebuilt empty
    p.eu_side.kill9();
    drop(eu);
    p.eu_pg.stop();
    p.eu_pg = Pg::start();
    p.eu_pg.psql(SCHEMA);
    std::fs::write(
        &p.cfg.path,
        config(&p.eu_pg, &p.us_pg, &p.eu_broker, &p.us_broker),
    )
    .unwrap();
    relay::ok(&["setup", "--config", &p.path, "--region", "eu"]);
    let eu = p.eu_pg.client().await;
    let out = relay::cmd(&[
        "dr", "restore", "--config", &p.path, "--region", "eu", "--from", "us",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        one(
            &eu,
            "SELECT coalesce(string_agg(id || '=' || name, ' ' ORDER BY id), '') FROM patients"
        )
        .await,
        "2=two",
        "row 1 rolled back to its old version, or row 2 missing: {stdout}"
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("2 sealed copies"), "{stdout}");
    assert!(stdout.contains("1 written"), "{stdout}");
    assert!(stdout.contains("1 failed"), "{stdout}");
    let copy = pgrelay::dr::hex_bytes::encode(&key);
    assert!(
        stdout.contains(&format!(
            "failed: copy {copy} of public.patients: does not open with DR key eu1"
        )),
        "{stdout}"
    );
}

/// Seals are counted per key in the sealing region, ahead in blocks; a key
/// that sealed 2^31 records is warned about.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seals_are_counted_per_dr_key_and_a_worn_key_is_warned_about() {
    let eu_pg = Pg::start();
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
    let eu = eu_pg.client().await;
    let us = us_pg.client().await;
    // eu1 has sealed 2^31 records already
    let fingerprint = pgrelay::dr::DrKey::parse("eu1", DR_KEY)
        .unwrap()
        .fingerprint();
    eu.execute(
        "INSERT INTO pgrelay_dr.seals (fingerprint, key_id, seals) VALUES ($1, 'eu1', 2147483648)",
        &[&fingerprint],
    )
    .await
    .unwrap();
    let eu_side = Relay::spawn(&cfg, "eu", "all");
    let _us_side = Relay::spawn(&cfg, "us", "all");
    eu.batch_execute(
        "INSERT INTO patients (id, country, name) \
         SELECT i, 'MKR-HOME-DE', 'first-' || i FROM generate_series(1, 20) i",
    )
    .await
    .unwrap();
    vault_caught_up(&eu, &us, 20).await;
    let log = eu_side.log_text();
    assert!(
        log.contains("DR key eu1 has sealed about") && log.contains("rotate it"),
        "{log}"
    );
    // one block reserved for this start's seals
    assert_eq!(
        one(
            &eu,
            "SELECT seals::text FROM pgrelay_dr.seals WHERE key_id = 'eu1'"
        )
        .await,
        (2147483648u64 + 65536).to_string()
    );
}

const DR_KEY_2: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

/// A key rotation: copies sealed under the old key are restored with the
/// old key in `dr_old_keys`; without it, restore names the key id and exits
/// 3. A resync re-seals every row under the new key, and the old key
/// retires. `check --region` checks the key ring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_under_an_old_dr_key_restore_with_dr_old_keys() {
    let mut eu_pg = Pg::start();
    let us_pg = Pg::start();
    eu_pg.psql(SCHEMA);
    us_pg.psql(SCHEMA);
    let eu_broker = Broker::start();
    let us_broker = Broker::start();
    let old_keys = format!("dr_key = \"{DR_KEY}\"\ndr_key_id = \"eu1\"");
    let new_keys = format!("dr_key = \"{DR_KEY_2}\"\ndr_key_id = \"eu2\"");
    let ring = format!("{new_keys}\ndr_old_keys = {{ eu1 = \"{DR_KEY}\" }}");
    let cfg = ConfigFile::new(&config_with(
        &eu_pg, &us_pg, &eu_broker, &us_broker, &old_keys,
    ));
    let path = cfg.path.to_str().unwrap().to_string();
    for r in ["eu", "us"] {
        relay::ok(&["setup", "--config", &path, "--region", r]);
    }
    let eu = eu_pg.client().await;
    let us = us_pg.client().await;
    let mut eu_side = Relay::spawn(&cfg, "eu", "all");
    let _us_side = Relay::spawn(&cfg, "us", "all");
    eu.batch_execute(
        "INSERT INTO patients (id, country, name) \
         SELECT i, 'MKR-HOME-DE', 'first-' || i FROM generate_series(1, 20) i",
    )
    .await
    .unwrap();
    vault_caught_up(&eu, &us, 20).await;

    // rotation: eu seals under eu2 from its next start
    assert_eq!(eu_side.terminate(Duration::from_secs(30)), Some(0));
    std::fs::write(
        &cfg.path,
        config_with(&eu_pg, &us_pg, &eu_broker, &us_broker, &new_keys),
    )
    .unwrap();
    let _eu_side = Relay::spawn(&cfg, "eu", "all");
    eu.batch_execute(
        "UPDATE patients SET name = 'second-' || id WHERE id <= 5;
         INSERT INTO patients (id, country, name) \
         SELECT i, 'MKR-HOME-DE', 'second-' || i FROM generate_series(21, 25) i",
    )
    .await
    .unwrap();
    // a row's copies under the new key have their own row hashes: next to
    // the old key's copies, not in their place
    until_count(
        &us,
        "SELECT count(*) FROM pgrelay_dr.vault WHERE key_id = 'eu2'",
        10,
        "the vault holding eu2's copies",
    )
    .await;
    assert_eq!(
        one(
            &us,
            "SELECT string_agg(key_id || '=' || n, ' ' ORDER BY key_id) FROM \
                  (SELECT key_id, count(*) n FROM pgrelay_dr.vault GROUP BY key_id) k"
        )
        .await,
        "eu1=20 eu2=10"
    );
    let checked = relay::ok(&["check", "--config", &path, "--region", "eu"]);
    assert!(checked.contains("region eu: DR key eu2 ok"), "{checked}");

    // eu is lost and rebuilt
    let before = one(&eu, CHECKSUM).await;
    drop(_eu_side);
    drop(eu);
    eu_pg.stop();
    eu_pg = Pg::start();
    eu_pg.psql(SCHEMA);
    std::fs::write(
        &cfg.path,
        config_with(&eu_pg, &us_pg, &eu_broker, &us_broker, &new_keys),
    )
    .unwrap();
    relay::ok(&["setup", "--config", &path, "--region", "eu"]);
    let eu = eu_pg.client().await;
    let restore = [
        "dr", "restore", "--config", &path, "--region", "eu", "--from", "us",
    ];
    // without the old key: what it opens is restored, the rest named
    let out = relay::cmd(&restore);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("failed: 20 copies sealed with DR key id eu1")
            && stdout.contains("dr_old_keys.eu1"),
        "{stdout}"
    );
    assert_eq!(out.status.code(), Some(3), "{stdout}");
    assert_eq!(one(&eu, "SELECT count(*)::text FROM patients").await, "10");
    // with it: every copy, exit 0
    std::fs::write(
        &cfg.path,
        config_with(&eu_pg, &us_pg, &eu_broker, &us_broker, &ring),
    )
    .unwrap();
    let checked = relay::ok(&["check", "--config", &path, "--region", "eu"]);
    assert!(
        checked.contains("region eu: DR key eu2 ok")
            && checked.contains("region eu: old DR keys for dr restore ok: eu1"),
        "{checked}"
    );
    let out = relay::ok(&restore);
    // rows 1-5 have an older copy under eu1 and a newer one under eu2
    assert!(
        out.contains("15 written, 15 already current, 0 failed"),
        "{out}"
    );
    assert!(out.contains("DR key eu1: 20 copies opened"), "{out}");
    assert_eq!(one(&eu, CHECKSUM).await, before);

    // re-sealing under eu2: a resync seals every row again; then the
    // vault's eu1 copies are all superseded, can go, and eu1 retires
    let _eu_side = Relay::spawn(&cfg, "eu", "all");
    relay::ok(&["resync", "--config", &path, "--region", "eu", "--to", "us"]);
    until_count(
        &us,
        "SELECT count(*) FROM pgrelay_dr.vault WHERE key_id = 'eu2'",
        25,
        "every row sealed under eu2",
    )
    .await;
    us.execute("DELETE FROM pgrelay_dr.vault WHERE key_id = 'eu1'", &[])
        .await
        .unwrap();
    std::fs::write(
        &cfg.path,
        config_with(&eu_pg, &us_pg, &eu_broker, &us_broker, &new_keys),
    )
    .unwrap();
    let out = relay::ok(&restore);
    assert!(out.contains("25 sealed copies"), "{out}");
    assert!(
        out.contains("0 written, 25 already current, 0 failed"),
        "{out}"
    );

    // check names a sealing region's missing key
    std::fs::write(
        &cfg.path,
        config_with(&eu_pg, &us_pg, &eu_broker, &us_broker, ""),
    )
    .unwrap();
    let out = relay::fails(&["check", "--config", &path, "--region", "eu"]);
    assert!(out.contains("regions.eu.dr_key is not set"), "{out}");
}

/// `resync` seals DR copies of the rows it sends, as capture does: rows
/// no capture carried (eu's capture side not running here, as after a lost
/// slot) reach the vault, and open at restore.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_seals_dr_copies_of_the_rows_it_sends() {
    let eu_pg = Pg::start();
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
    let _us_side = Relay::spawn(&cfg, "us", "all");
    let eu = eu_pg.client().await;
    let us = us_pg.client().await;
    eu.batch_execute(
        "INSERT INTO patients (id, country, name) \
         SELECT i, 'MKR-HOME-DE', 'MKR-name-' || i FROM generate_series(1, 30) i;
         DELETE FROM patients WHERE id > 25;",
    )
    .await
    .unwrap();
    let out = relay::ok(&["resync", "--config", &path, "--region", "eu"]);
    assert!(out.contains("us (DR)"), "{out}");
    // the vault holds a copy of every live row and of every delete
    until_count(
        &us,
        "SELECT count(*) FROM pgrelay_dr.vault WHERE home = 'eu'",
        30,
        "the vault holding the resent rows and deletes",
    )
    .await;
    vault_caught_up(&eu, &us, 30).await;
    assert_no_marker("us's database", &dump(&us).await);
    let out = relay::ok(&[
        "dr", "restore", "--config", &path, "--region", "eu", "--from", "us",
    ]);
    assert!(out.contains("30 sealed copies"), "{out}");
    assert!(out.contains("0 failed"), "{out}");
}
