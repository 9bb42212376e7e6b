//! Faults across three regions: kill -9 of sidecars, a target PostgreSQL
//! restart, a cut link, a broker restart (durable storage), and distance
//! (added latency). Each ends in convergence with nothing lost.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::sidecar::{
    assert_global, assert_no_loops, assert_residency, orders_settled, rows, workload, World,
    REGIONS,
};
use crate::support::eventually;
use crate::support::relay::{self, Relay};

fn status_states(w: &World) -> BTreeMap<String, String> {
    let out = relay::cmd(&["status", "--config", w.cfg_path("us"), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    (
                        format!(
                            "{}->{}",
                            p["source"].as_str().unwrap_or(""),
                            p["destination"].as_str().unwrap_or("")
                        ),
                        p["state"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_target_restart_and_cut_link_converge_with_nothing_lost() {
    let w = World::start(false);
    let mut sidecars: BTreeMap<&str, Relay> = REGIONS.iter().map(|r| (*r, w.sidecar(r))).collect();
    let mut tasks = Vec::new();
    for r in REGIONS {
        tasks.push((r, tokio::spawn(workload(r, w.pg[r].dsn(), 400))));
    }
    // kill -9 each sidecar at some point of the workload
    for r in REGIONS {
        tokio::time::sleep(Duration::from_millis(700)).await;
        sidecars.get_mut(r).unwrap().kill9();
        tokio::time::sleep(Duration::from_millis(300)).await;
        sidecars.insert(r, w.sidecar(r));
    }
    // a target database restarts under the apply side
    w.pg["eu"].restart();
    // cn's link is cut: its pairs turn lagging/failed in status and metrics
    w.brokers["cn"].1.cut();
    let seen = eventually(
        Duration::from_secs(30),
        "status to show the cut pairs",
        || async {
            let s = status_states(&w);
            let bad: Vec<String> = s
                .iter()
                .filter(|(pair, st)| pair.ends_with("->cn") && *st != "active")
                .map(|(p, st)| format!("{p}={st}"))
                .collect();
            (!bad.is_empty()).then_some(bad)
        },
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "cn's metrics to show failed pairs",
        || async {
            (w.metric_sum("cn", "pgrelay_pair_state", "destination=\"cn\"") > 0.0).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    w.brokers["cn"].1.restore();
    let mut logs = BTreeMap::new();
    for (r, t) in tasks {
        logs.insert(r, t.await.unwrap());
    }
    tokio::time::sleep(Duration::from_secs(20)).await;
    for r in REGIONS {
        let d = rows(
            &w.pg[r],
            "SELECT id, name, _pgrelay_hlc FROM products ORDER BY id",
        )
        .await;
        eprintln!("{r}: {:?}", &d[..5.min(d.len())]);
        eprintln!(
            "{r} log: {}",
            sidecars[r]
                .log_text()
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.starts_with("error"))
                .take(20)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    assert_global(&w, &logs).await;
    orders_settled(&w, &logs).await;
    assert_residency(&w, &logs).await;
    assert_no_loops(&w).await;
    eventually(
        Duration::from_secs(60),
        "every pair back to active",
        || async {
            let s = status_states(&w);
            (s.len() == 6 && s.values().all(|st| st == "active")).then_some(())
        },
    )
    .await;
    eprintln!("during the cut: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_with_durable_storage_loses_nothing() {
    let mut w = World::start(true);
    let _sidecars: Vec<Relay> = REGIONS.iter().map(|r| w.sidecar(r)).collect();
    let mut tasks = Vec::new();
    for r in REGIONS {
        tasks.push((r, tokio::spawn(workload(r, w.pg[r].dsn(), 200))));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    w.brokers.get_mut("eu").unwrap().0.restart();
    tokio::time::sleep(Duration::from_secs(2)).await;
    w.brokers.get_mut("us").unwrap().0.restart();
    let mut logs = BTreeMap::new();
    for (r, t) in tasks {
        logs.insert(r, t.await.unwrap());
    }
    assert_global(&w, &logs).await;
    orders_settled(&w, &logs).await;
    assert_residency(&w, &logs).await;
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distance_between_regions_still_converges_and_lag_is_measured() {
    let w = World::start(false);
    // 80–150 ms round trips between regions
    for (r, one_way) in [("us", 40), ("eu", 60), ("cn", 75)] {
        w.brokers[r]
            .1
            .set_one_way_delay(Duration::from_millis(one_way));
    }
    let _sidecars: Vec<Relay> = REGIONS.iter().map(|r| w.sidecar(r)).collect();
    // lag probe: us writes stamped rows at a steady rate, eu records when each appears
    let us_dsn = w.pg["us"].dsn();
    let eu_dsn = w.pg["eu"].dsn();
    let probes = 300i64;
    let writer = tokio::spawn(async move {
        let (c, conn) = tokio_postgres::connect(&us_dsn, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let start = Instant::now();
        let mut written = Vec::new();
        for i in 0..probes {
            let due = start + Duration::from_millis(20 * i as u64);
            tokio::time::sleep_until(due.into()).await;
            let name = format!("probe-{}", now_us());
            let row = c
                .query_one(
                    "INSERT INTO products VALUES ($1, $2, 0) RETURNING _pgrelay_hlc",
                    &[&(100_000 + i), &name],
                )
                .await
                .unwrap();
            written.push((100_000 + i, name, row.get::<_, i64>(0)));
        }
        written
    });
    let poller = tokio::spawn(async move {
        let (c, conn) = tokio_postgres::connect(&eu_dsn, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        // rows of different keys travel in different partitions and may
        // appear in any order: note the first time each id is visible
        let mut seen = std::collections::HashSet::new();
        let mut lags = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(180);
        while lags.len() < probes as usize && Instant::now() < deadline {
            for r in c
                .query(
                    "SELECT id::bigint, name FROM products WHERE id >= 100000",
                    &[],
                )
                .await
                .unwrap()
            {
                let id: i64 = r.get(0);
                if !seen.insert(id) {
                    continue;
                }
                let name: String = r.get(1);
                let written: i64 = name.trim_start_matches("probe-").parse().unwrap();
                lags.push((now_us() - written) as f64 / 1000.0);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        lags
    });
    let mut tasks = Vec::new();
    for r in REGIONS {
        tasks.push((r, tokio::spawn(workload(r, w.pg[r].dsn(), 100))));
    }
    let probe_log = writer.await.unwrap();
    let mut lags = poller.await.unwrap();
    if lags.len() != probes as usize {
        let recs = crate::support::kafka::read_all(
            &w.brokers["eu"].0.brokers(),
            "pgrelay.us.eu",
            Duration::from_secs(3),
        );
        let probes_in_kafka = recs
            .iter()
            .filter(|r| {
                r.value["after"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("probe"))
            })
            .count();
        let offsets = rows(
            &w.pg["eu"],
            "SELECT topic, kafka_partition, next_offset FROM pgrelay.offsets",
        )
        .await;
        let per_part: Vec<(i32, usize)> = (0..3)
            .map(|p| (p, recs.iter().filter(|r| r.partition == p).count()))
            .collect();
        let us_conf = rows(&w.pg["eu"], "SELECT (SELECT count(*) FROM products WHERE id >= 100000), (SELECT count(*) FROM pgrelay.tombstones), (SELECT string_agg(pk::text || '=' || hlc, ' ') FROM pgrelay.tombstones WHERE pk = '{}'::jsonb OR pk->>'id' >= '100000')").await;
        let dlq = relay::cmd(&[
            "dlq",
            "list",
            "--config",
            w.cfg_path("eu"),
            "--region",
            "eu",
        ]);
        eprintln!("dlq: {}", String::from_utf8_lossy(&dlq.stdout));
        panic!("probes arrived: {} of {probes}; in kafka: {probes_in_kafka}; per partition {per_part:?}; eu offsets {offsets:?}; us slot {us_conf:?}\n{}", lags.len(),
            _sidecars[1].log_text().lines().filter(|l| l.contains("WARN")).take(15).collect::<Vec<_>>().join("\n"));
    }
    let mut logs = BTreeMap::new();
    for (r, t) in tasks {
        logs.insert(r, t.await.unwrap());
    }
    logs.get_mut("us").unwrap().products.extend(probe_log);
    assert_global(&w, &logs).await;
    orders_settled(&w, &logs).await;
    assert_residency(&w, &logs).await;
    lags.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| lags[((lags.len() as f64 - 1.0) * p) as usize];
    let report = format!(
        "end-to-end lag us->eu with 80-150 ms RTT links: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({} probes at 50/s)",
        pct(0.5),
        pct(0.99),
        lags[lags.len() - 1],
        lags.len()
    );
    eprintln!("{report}");
    let _ = std::fs::write(
        crate::support::repo_root().join("target/distance-lag.txt"),
        &report,
    );
}
