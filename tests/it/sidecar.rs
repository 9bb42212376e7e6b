//! Three regions end to end: us, eu, cn — each its own PostgreSQL cluster,
//! its own broker (reached through a proxy that can cut or slow the link)
//! and its own sidecar running both sides.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use crate::support::broker::Broker;
use crate::support::kafka::read_all;
use crate::support::pg::{region_dsns, Pg};
use crate::support::proxy::Proxy;
use crate::support::relay::{self, ConfigFile, Relay};
use crate::support::{eventually, free_port, repo_root};

pub const REGIONS: [&str; 3] = ["us", "eu", "cn"];

pub struct World {
    pub pg: BTreeMap<&'static str, Pg>,
    pub brokers: BTreeMap<&'static str, (Broker, Proxy)>,
    pub cfg: BTreeMap<&'static str, ConfigFile>,
    pub http: BTreeMap<&'static str, u16>,
}

impl World {
    pub fn start(durable_brokers: bool) -> World {
        World::start_with(durable_brokers, "", "", &relay::bin())
    }

    /// Three regions with the demo's tables and rules plus `schema` and
    /// `tables` (config text), set up by the pgrelay binary `bin`; no
    /// sidecar runs yet.
    pub fn start_with(
        durable_brokers: bool,
        schema: &str,
        tables: &str,
        bin: &std::path::Path,
    ) -> World {
        let demo = std::fs::read_to_string(repo_root().join("demo/schema.sql")).unwrap();
        let mut pg = BTreeMap::new();
        let mut brokers = BTreeMap::new();
        for r in REGIONS {
            let p = Pg::start();
            p.psql(&demo);
            if !schema.is_empty() {
                p.psql(schema);
            }
            pg.insert(r, p);
            brokers.insert(r, Broker::behind_proxy(durable_brokers));
        }
        let mut cfg = BTreeMap::new();
        let mut http = BTreeMap::new();
        for r in REGIONS {
            let port = free_port();
            http.insert(r, port);
            let text = config(&pg, &brokers, port) + tables;
            cfg.insert(r, ConfigFile::new(&text));
        }
        let w = World {
            pg,
            brokers,
            cfg,
            http,
        };
        for r in REGIONS {
            relay::ok_with(bin, &["setup", "--config", w.cfg_path(r), "--region", r]);
        }
        w
    }

    pub fn cfg_path(&self, region: &str) -> &str {
        self.cfg[region].path.to_str().unwrap()
    }

    pub fn sidecar(&self, region: &str) -> Relay {
        Relay::spawn(&self.cfg[region], region, "all")
    }

    pub fn metrics(&self, region: &str) -> String {
        crate::support::metrics_text(self.http[region])
    }

    /// Sum of a metric's series whose label set contains `filter`.
    pub fn metric_sum(&self, region: &str, name: &str, filter: &str) -> f64 {
        self.metrics(region)
            .lines()
            .filter(|l| {
                l.starts_with(name) && l[name.len()..].starts_with('{') && l.contains(filter)
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// The `[regions.X]` tables of a three-region config: id, the run role's
/// and the setup role's DSNs, `extra(region)` lines, the region's broker.
pub fn region_blocks(
    pg: &BTreeMap<&'static str, Pg>,
    brokers: &BTreeMap<&'static str, (Broker, Proxy)>,
    extra: impl Fn(&str) -> String,
) -> String {
    let mut regions = String::new();
    for (i, r) in REGIONS.iter().enumerate() {
        regions.push_str(&format!(
            "[regions.{r}]\nid = {}\n{}\n{}[regions.{r}.kafka]\nbrokers = \"{}\"\n\n",
            i + 1,
            region_dsns(&pg[r].dsn()),
            extra(r),
            brokers[r].0.brokers()
        ));
    }
    regions
}

pub fn config(
    pg: &BTreeMap<&'static str, Pg>,
    brokers: &BTreeMap<&'static str, (Broker, Proxy)>,
    http_port: u16,
) -> String {
    let regions = region_blocks(pg, brokers, |r| {
        format!("hash_key = \"{r}-sidecar-hash-key-0123456789abcdef\"\n")
    });
    format!(
        r#"
[relay]
prefix = "pgrelay"

[relay.capture]
status_interval = "200ms"
topic_partitions = 3

[relay.apply]
batch_max_wait = "20ms"

[relay.status]
lagging_after = "3s"
egress_price_per_gb = 0.02

[http]
listen = "127.0.0.1:{http_port}"

{regions}
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
aliases = {{ US = "us", CA = "us", DE = "eu", FR = "eu", CN = "cn" }}
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

pub fn home(country: &str) -> &'static str {
    match country {
        "US" | "CA" => "us",
        "DE" | "FR" => "eu",
        _ => "cn",
    }
}

/// Regions an order homed in `h` may reach.
pub fn allowed(h: &str) -> BTreeSet<&'static str> {
    match h {
        "us" => ["us", "eu", "cn"].into_iter().collect(),
        "eu" => ["eu"].into_iter().collect(),
        _ => ["cn"].into_iter().collect(),
    }
}

/// What one region's writer did (for the assertions).
#[derive(Default, Debug)]
pub struct WriteLog {
    /// products: (id, name, stamp)
    pub products: Vec<(i64, String, i64)>,
    /// orders: id -> final country
    pub orders: BTreeMap<i64, String>,
    pub users: BTreeSet<i64>,
}

/// A mixed workload in one region: `n` rounds over every data class, one
/// transaction per round. A round whose connection breaks (the region's
/// database restarting) is retried on a new connection; every statement is
/// idempotent, so a round that committed before the break is harmless to
/// repeat.
pub async fn workload(region: &'static str, dsn: String, n: i64) -> WriteLog {
    let base = match region {
        "us" => 1_000_000,
        "eu" => 2_000_000,
        _ => 3_000_000,
    };
    let countries = ["US", "DE", "FR", "CN", "CA"];
    let mut log = WriteLog::default();
    let mut client = connect_retry(&dsn).await;
    for i in 0..n {
        let id = (i * 13 + base / 1_000_000) % 40 + 1;
        let name = format!("{region}-{i}");
        let oid = base + i;
        let country = countries[(i as usize + region.len()) % countries.len()];
        let moved =
            (i % 5 == 4).then(|| (base + i - 3, countries[(i as usize / 5) % countries.len()]));
        let stamp = loop {
            let attempt = async {
                let tx = client.transaction().await?;
                let row = tx
                    .query_one(
                        "INSERT INTO products VALUES ($1, $2, 1) ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, price = products.price + 1 RETURNING _pgrelay_hlc",
                        &[&id, &name],
                    )
                    .await?;
                tx.execute(
                    "INSERT INTO orders VALUES ($1, $2, $3, '4111111111111111', $4::text::numeric) ON CONFLICT (id) DO NOTHING",
                    &[&oid, &country, &format!("buyer{oid}@example.com"), &rust_decimal_free(i)],
                )
                .await?;
                if let Some((m, to)) = moved {
                    tx.execute("UPDATE orders SET country = $2 WHERE id = $1", &[&m, &to])
                        .await?;
                }
                tx.execute(
                    "INSERT INTO users VALUES ($1, $2, 'XX') ON CONFLICT (id) DO NOTHING",
                    &[&oid, &format!("{region}{i}@example.com")],
                )
                .await?;
                if region == "us" && i % 10 == 0 {
                    tx.execute(
                        "INSERT INTO currencies VALUES ($1, $2::text::numeric) ON CONFLICT (code) DO UPDATE SET rate = EXCLUDED.rate",
                        &[&format!("C{}", i % 7), &format!("{}.5", i)],
                    )
                    .await?;
                }
                tx.commit().await?;
                Ok::<i64, tokio_postgres::Error>(row.get(0))
            };
            match attempt.await {
                Ok(stamp) => break stamp,
                Err(e) => {
                    let transient = e.is_closed()
                        || e.code().is_none_or(|c| {
                            c.code().starts_with("57P") || c.code().starts_with("08")
                        });
                    assert!(transient, "{region} workload: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    client = connect_retry(&dsn).await;
                }
            }
        };
        log.products.push((id, name, stamp));
        log.orders.insert(oid, country.to_string());
        if let Some((m, to)) = moved {
            log.orders.insert(m, to.to_string());
        }
        log.users.insert(oid);
    }
    log
}

async fn connect_retry(dsn: &str) -> tokio_postgres::Client {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match tokio_postgres::connect(dsn, tokio_postgres::NoTls).await {
            Ok((c, conn)) => {
                tokio::spawn(conn);
                return c;
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("cannot reconnect: {e}"),
        }
    }
}

/// The amount column as text (numeric parameter without a decimal crate).
fn rust_decimal_free(i: i64) -> String {
    format!("{}.25", i % 100)
}

pub async fn rows(pg: &Pg, sql: &str) -> Vec<Vec<Option<String>>> {
    let c = pg.client().await;
    c.simple_query(sql)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
            }
            _ => None,
        })
        .collect()
}

/// Waits until `sql` returns the same rows in every region.
pub async fn identical(w: &World, sql: &str, timeout: Duration) -> Vec<Vec<Option<String>>> {
    eventually(
        timeout,
        &format!("identical results of {sql:?} in every region"),
        || async {
            let us = rows(&w.pg["us"], sql).await;
            let eu = rows(&w.pg["eu"], sql).await;
            let cn = rows(&w.pg["cn"], sql).await;
            (us == eu && eu == cn).then_some(us)
        },
    )
    .await
}

/// Every residency rule, in every database and every topic.
pub async fn assert_residency(w: &World, logs: &BTreeMap<&'static str, WriteLog>) {
    for r in REGIONS {
        // local users never leave
        let users: BTreeSet<i64> = rows(&w.pg[r], "SELECT id FROM users")
            .await
            .iter()
            .map(|x| x[0].as_ref().unwrap().parse().unwrap())
            .collect();
        assert_eq!(users, logs[r].users, "{r}: users table holds foreign rows");
        // orders: exactly the rows whose home allows this region, with the
        // column rules applied to foreign ones
        let orders = rows(&w.pg[r], "SELECT id, country, email, card FROM orders").await;
        let mut seen = BTreeSet::new();
        for o in &orders {
            let id: i64 = o[0].as_ref().unwrap().parse().unwrap();
            seen.insert(id);
            let writer = REGIONS
                .iter()
                .find(|x| logs[**x].orders.contains_key(&id))
                .unwrap();
            if *writer == r {
                continue;
            }
            let country = o[1].as_deref().unwrap();
            assert!(
                allowed(home(country)).contains(r),
                "{r}: order {id} homed {country} must not be here"
            );
            assert_eq!(o[3].as_deref(), Some("****"), "{r}: card not masked");
            let email = o[2].as_deref().unwrap();
            if r == "cn" {
                assert!(
                    !email.contains('@') && email.strip_prefix("k1:").map(str::len) == Some(64),
                    "{r}: email not hashed: {email}"
                );
            } else {
                assert!(email.starts_with("buyer"), "{r}: email changed");
            }
        }
        for (writer, log) in logs {
            if *writer == r {
                continue;
            }
            for (id, country) in &log.orders {
                assert_eq!(
                    seen.contains(id),
                    allowed(home(country)).contains(r),
                    "{r}: order {id} (written in {writer}, homed {country})"
                );
            }
        }
    }
    // topics: no local table, no order outside its allowed set
    for s in REGIONS {
        for d in REGIONS.iter().filter(|d| **d != s) {
            let topic = format!("pgrelay.{s}.{d}");
            for rec in read_all(&w.brokers[d].0.brokers(), &topic, Duration::from_secs(1)) {
                let table = rec.key["table"].as_str().unwrap_or_default();
                assert_ne!(table, "public.users", "{topic}: local table leaked");
                if table == "public.orders" && rec.value["op"] != "d" {
                    let country = rec.value["after"]["country"].as_str().unwrap();
                    assert!(
                        allowed(home(country)).contains(d),
                        "{topic}: order homed {country}"
                    );
                    assert_eq!(rec.value["after"]["card"], "****", "{topic}: card leaked");
                }
            }
        }
    }
}

/// Every region holds exactly the orders the policy lets it hold.
pub async fn orders_settled(w: &World, logs: &BTreeMap<&'static str, WriteLog>) {
    eventually(
        Duration::from_secs(120),
        "orders to settle everywhere",
        || async {
            let mut ok = true;
            for r in REGIONS {
                let n = rows(&w.pg[r], "SELECT count(*) FROM orders").await[0][0]
                    .clone()
                    .unwrap();
                let expected: usize = logs
                    .iter()
                    .map(|(writer, log)| {
                        log.orders
                            .values()
                            .filter(|c| *writer == r || allowed(home(c)).contains(r))
                            .count()
                    })
                    .sum();
                ok &= n == expected.to_string();
            }
            ok.then_some(())
        },
    )
    .await;
}

/// Global data converged on the highest stamp written anywhere.
pub async fn assert_global(w: &World, logs: &BTreeMap<&'static str, WriteLog>) {
    let state = identical(
        w,
        "SELECT id, name, _pgrelay_hlc FROM products ORDER BY id",
        Duration::from_secs(120),
    )
    .await;
    let mut best: BTreeMap<i64, (String, i64)> = BTreeMap::new();
    for log in logs.values() {
        for (id, name, stamp) in &log.products {
            let e = best.entry(*id).or_insert((String::new(), i64::MIN));
            if *stamp > e.1 {
                *e = (name.clone(), *stamp);
            }
        }
    }
    for row in &state {
        let id: i64 = row[0].as_ref().unwrap().parse().unwrap();
        let (name, stamp) = &best[&id];
        assert_eq!(row[1].as_deref(), Some(name.as_str()), "product {id}");
        assert_eq!(
            row[2].as_ref().unwrap().parse::<i64>().unwrap(),
            *stamp,
            "product {id}"
        );
    }
    identical(
        w,
        "SELECT code, rate FROM currencies ORDER BY code",
        Duration::from_secs(60),
    )
    .await;
}

/// Waits until a region pair's published-record counters stop moving, then
/// checks they stay flat: applied changes are never captured again.
pub async fn assert_no_loops(w: &World) {
    let total = |w: &World| -> f64 {
        REGIONS
            .iter()
            .map(|r| w.metric_sum(r, "pgrelay_capture_published_total", "destination"))
            .sum()
    };
    let mut last = total(w);
    let start = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now = total(w);
        if now == last && now > 0.0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "published counters never settled: {now}\n{}",
            w.metrics("us")
                .lines()
                .filter(|l| l.contains("capture"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        last = now;
    }
    // positive sign before the negative check: a marker written in each
    // region is applied everywhere, and every capture side has read its WAL
    // past those applies (a loop would publish them again)
    for (i, r) in REGIONS.iter().enumerate() {
        w.pg[r].psql(&format!(
            "INSERT INTO products (id, name, price) VALUES ({}, 'marker-{r}', 1)",
            900_000 + i
        ));
    }
    for r in REGIONS {
        eventually(
            Duration::from_secs(60),
            "the markers in every region",
            || async {
                let n = rows(&w.pg[r], "SELECT count(*) FROM products WHERE id >= 900000").await;
                (n[0][0].as_deref() == Some("3")).then_some(())
            },
        )
        .await;
    }
    for r in REGIONS {
        let target = rows(&w.pg[r], "SELECT pg_current_wal_lsn()::text").await[0][0].clone();
        let slot = format!("pgrelay_{r}");
        eventually(Duration::from_secs(60), "each slot past the markers' applies", || async {
            let ok = rows(
                &w.pg[r],
                &format!(
                    "SELECT confirmed_flush_lsn >= '{}'::pg_lsn FROM pg_replication_slots WHERE slot_name = '{slot}'",
                    target.as_deref().unwrap_or("0/0")
                ),
            )
            .await;
            (ok.first().and_then(|r| r[0].as_deref()) == Some("t")).then_some(())
        })
        .await;
    }
    // each marker goes to the two other regions, and nothing else moves
    let want = last + 6.0;
    eventually(Duration::from_secs(30), "the markers counted", || async {
        (total(w) >= want).then_some(())
    })
    .await;
    assert_eq!(
        total(w),
        want,
        "records keep being published after writes stopped: a loop"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_regions_mixed_workload_converge_with_residency_and_no_loops() {
    let w = World::start(false);
    let _sidecars: Vec<Relay> = REGIONS.iter().map(|r| w.sidecar(r)).collect();
    let mut tasks = Vec::new();
    for r in REGIONS {
        tasks.push((r, tokio::spawn(workload(r, w.pg[r].dsn(), 150))));
    }
    let mut logs = BTreeMap::new();
    for (r, t) in tasks {
        logs.insert(r, t.await.unwrap());
    }
    assert_global(&w, &logs).await;
    // partitioned rows settle too
    orders_settled(&w, &logs).await;
    assert_residency(&w, &logs).await;
    assert_no_loops(&w).await;
    // intentional drops are counted by table, destination and reason
    assert!(
        w.metric_sum(
            "us",
            "pgrelay_capture_dropped_total",
            "destination=\"cn\",reason=\"home_not_allowed\""
        ) > 0.0,
        "{}",
        w.metrics("us")
    );
    // owned: refused outside the owner
    let eu = w.pg["eu"].client().await;
    let err = eu
        .execute("INSERT INTO currencies VALUES ('ZZZ', 1)", &[])
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("owned by region us")
            || format!("{err:?}").contains("owned by region us")
    );
    // status: every pair active
    let out = relay::ok(&["status", "--config", w.cfg_path("us"), "--json"]);
    let pairs: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(pairs.as_array().unwrap().len(), 6);
    for p in pairs.as_array().unwrap() {
        assert_eq!(p["state"], "active", "{p}");
    }
}

/// One `GET path` against a sidecar's HTTP endpoint: the status line, or
/// nothing while it does not listen yet.
fn http_status(port: u16, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines().next().map(str::to_string)
}

/// `/readyz` answers 200 only once the capture side streams (a walsender
/// holds the slot) and the apply side consumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_ready_only_once_both_sides_stream() {
    let port = free_port();
    let p = crate::apply::pair_with_tables(
        crate::apply::SCHEMA,
        &format!("\n[http]\nlisten = \"127.0.0.1:{port}\"\n"),
        "",
    );
    let relay = Relay::spawn(&p.cfg, "us", "all");
    let us = p.us.client().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut answered = 0;
    loop {
        assert!(
            Instant::now() < deadline,
            "/readyz never answered 200:\n{}",
            relay.log_text()
        );
        match http_status(port, "/readyz") {
            Some(line) if line.contains(" 200 ") => break,
            Some(line) => {
                assert!(line.contains(" 503 "), "{line}");
                answered += 1;
            }
            None => {}
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // at the first 200: the slot is held by a walsender, and every apply
    // pipeline has been assigned its partitions
    let walsenders: i64 = us
        .query_one(
            "SELECT count(*) FROM pg_stat_replication r \
             JOIN pg_replication_slots s ON s.active_pid = r.pid \
             WHERE s.slot_name = 'pgrelay_us'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        walsenders,
        1,
        "ready without a walsender on the slot:\n{}",
        relay.log_text()
    );
    let log = relay.log_text();
    assert!(log.contains("capture streaming"), "{log}");
    assert!(log.contains("apply consuming"), "{log}");
    assert!(answered > 0, "the endpoint was never seen not ready");
}
