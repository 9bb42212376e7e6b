//! The status page in a real headless browser (Debian's `chromium`,
//! installed by `scripts/install-deps.sh`), against three running regions:
//! the graph's nodes and edges, a cut link's colour, egress bytes equal to
//! what the topic holds, and every metric the Grafana dashboard queries
//! served. Screenshots go to `target/test-artifacts/`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::sidecar::{workload, World, REGIONS};
use crate::support::kafka::read_all;
use crate::support::relay::Relay;
use crate::support::{eventually, repo_root, temp_dir};

const COLOURS: [(&str, &str); 6] = [
    ("active", "#2ca02c"),
    ("lagging", "#ff7f0e"),
    ("failed", "#d62728"),
    ("frozen", "#1f77b4"),
    ("rebuilding", "#9467bd"),
    ("unknown", "#999999"),
];

fn colour(state: &str) -> &'static str {
    COLOURS
        .iter()
        .find(|(s, _)| *s == state)
        .map(|(_, c)| *c)
        .unwrap_or_else(|| panic!("no colour for state {state}"))
}

fn chromium() -> PathBuf {
    for name in ["chromium", "chromium-browser"] {
        for dir in ["/usr/bin", "/usr/local/bin"] {
            let p = Path::new(dir).join(name);
            if p.exists() {
                return p;
            }
        }
    }
    panic!("chromium not found: run bash scripts/install-deps.sh (it installs Debian's chromium)");
}

/// Runs headless chromium on `url` with `args`, waiting for the page's
/// scripts and fetches (virtual time), and returns stdout.
fn browse(url: &str, args: &[&str]) -> String {
    let profile = temp_dir("pgrelay-chromium");
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--virtual-time-budget=4000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let mut out = String::new();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let _ = stdout.read_to_string(&mut out);
        out
    });
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        // under load (a three-region test beside it) a page with a cut
        // link has taken over 120 s to settle; alone about 10 s
        if start.elapsed() > Duration::from_secs(240) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 240 s on {url}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    reader.join().unwrap()
}

/// The page's DOM after its scripts ran; a screenshot of it goes to
/// `target/test-artifacts/{shot}`.
fn dump_dom(url: &str, shot: &str) -> String {
    let artifacts = repo_root().join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let path = artifacts.join(shot);
    let _ = std::fs::remove_file(&path);
    let began = Instant::now();
    let dom = browse(
        url,
        &[
            "--dump-dom",
            &format!("--screenshot={}", path.display()),
            "--window-size=1100,1100",
            "--hide-scrollbars",
        ],
    );
    eprintln!("chromium drew {shot} in {:?}", began.elapsed());
    let png = std::fs::read(&path).unwrap_or_default();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "no screenshot at {}",
        path.display()
    );
    assert!(
        dom.contains("data-loaded=\"yes\""),
        "the page did not draw /status.json:\n{dom}"
    );
    // newer browsers escape '>' in attribute values
    dom.replace("-&gt;", "->")
}

/// pair -> (data-state, stroke colour) of every edge the graph drew.
fn edges(dom: &str) -> BTreeMap<String, (String, String)> {
    let attr = |s: &str, name: &str| -> Option<String> {
        let start = s.find(&format!("{name}=\""))? + name.len() + 2;
        Some(s[start..start + s[start..].find('"')?].to_string())
    };
    dom.split("<g class=\"edge ")
        .skip(1)
        .map(|g| {
            let head = &g[..g.find("</g>").unwrap_or(g.len())];
            (
                attr(head, "data-pair").expect("data-pair"),
                (
                    attr(head, "data-state").expect("data-state"),
                    attr(head, "stroke").expect("stroke"),
                ),
            )
        })
        .collect()
}

/// `/status.json` of a region's sidecar.
fn view(w: &World, region: &str) -> serde_json::Value {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", w.http[region])) else {
        return serde_json::Value::Null;
    };
    let _ = s.write_all(b"GET /status.json HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_once("\r\n\r\n")
        .and_then(|(_, body)| serde_json::from_str(body).ok())
        .unwrap_or_default()
}

fn pair<'a>(v: &'a serde_json::Value, p: &str) -> Option<&'a serde_json::Value> {
    v["pairs"].as_array()?.iter().find(|x| {
        format!(
            "{}->{}",
            x["source"].as_str().unwrap_or(""),
            x["destination"].as_str().unwrap_or("")
        ) == p
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_draws_the_region_graph_and_colours_a_cut_link() {
    chromium();
    let started = Instant::now();
    let w = World::start(false);
    // a breaker that never trips: its state gauge is what the dashboard charts
    for r in REGIONS {
        let mut cfg = std::fs::OpenOptions::new()
            .append(true)
            .open(&w.cfg[r].path)
            .unwrap();
        writeln!(
            cfg,
            "\n[[breakers]]\nmax_deletes = 100000000\nmax_updates = 100000000\nmin_rows = 100000000\ntruncate = false\n"
        )
        .unwrap();
        if r == "cn" {
            // cn's sidecar verifies its region against the others
            writeln!(cfg, "\n[verify]\ninterval = \"3s\"\n").unwrap();
        }
    }
    eprintln!("world up after {:?}", started.elapsed());
    let sidecars: Vec<Relay> = REGIONS.iter().map(|r| w.sidecar(r)).collect();
    let mut tasks = Vec::new();
    for r in REGIONS {
        tasks.push(tokio::spawn(workload(r, w.pg[r].dsn(), 30)));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // cn has applied everything us and eu sent: two collections in a row
    // show both pairs active, nothing waiting, the same watermarks
    let settled = |v: &serde_json::Value| -> Option<(u64, Vec<serde_json::Value>)> {
        let mut marks = Vec::new();
        for p in ["us->cn", "eu->cn"] {
            let x = pair(v, p)?;
            if x["state"] != "active" || x["backlog_records"] != 0 || x["watermark_hlc"].is_null() {
                return None;
            }
            marks.push(x["watermark_hlc"].clone());
        }
        Some((v["collected_at_ms"].as_u64()?, marks))
    };
    let mut last: Option<(u64, Vec<serde_json::Value>)> = None;
    eventually(
        Duration::from_secs(90),
        "cn's incoming pairs caught up",
        || {
            let now = settled(&view(&w, "cn"));
            let done = match (&last, &now) {
                (Some((t0, m0)), Some((t1, m1))) => t1 > t0 && m0 == m1,
                _ => false,
            };
            if now.as_ref().map(|n| n.0) != last.as_ref().map(|l| l.0) {
                last = now;
            }
            async move { done.then_some(()) }
        },
    )
    .await;
    eprintln!("caught up after {:?}", started.elapsed());

    // egress: what us's capture side counted is what pgrelay.us.cn holds
    let in_topic: u64 = read_all(
        &w.brokers["cn"].0.brokers(),
        "pgrelay.us.cn",
        Duration::from_secs(2),
    )
    .iter()
    .map(|r| r.bytes)
    .sum();
    assert!(in_topic > 0, "nothing published from us to cn");
    let egress = eventually(
        Duration::from_secs(30),
        "us's egress to cn counted",
        || async {
            let v = view(&w, "us");
            let e = pair(&v, "us->cn")?["egress"].clone();
            (e["bytes_total"].as_f64() == Some(in_topic as f64) && e["monthly_cost"].is_number())
                .then_some(e)
        },
    )
    .await;
    assert_eq!(
        w.metric_sum("us", "pgrelay_capture_bytes_total", "destination=\"cn\""),
        in_topic as f64
    );
    eprintln!("egress us->cn: {egress}");
    // pgrelay status reads the same figures from us's database
    let stored = eventually(
        Duration::from_secs(30),
        "us's egress to cn in pgrelay status --json",
        || async {
            let out = Command::new(crate::support::relay::bin())
                .args(["status", "--config", w.cfg_path("us"), "--json"])
                .env("PGRELAY_LOG", "warn")
                .output()
                .ok()?;
            let rows: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let e = rows
                .as_array()?
                .iter()
                .find(|p| p["source"] == "us" && p["destination"] == "cn")?["egress"]
                .clone();
            (e["bytes_total"].as_f64() == Some(in_topic as f64)
                && e["bytes_per_second"].is_number()
                && e["monthly_cost"].is_number())
            .then_some(e)
        },
    )
    .await;
    eprintln!("egress us->cn in pgrelay status: {stored}");
    // every metric the Grafana dashboard charts is served (gauges appear
    // with the sidecar's next collection)
    let mut missing = Vec::new();
    for _ in 0..100 {
        missing = crate::dashboard::unserved(&w.metrics("cn"));
        if missing.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics the sidecar does not serve: {missing:?}\n{}",
        w.metrics("cn")
    );

    // status --watch prints table after table until stopped
    let mut watch = Command::new(crate::support::relay::bin())
        .args(["status", "--config", w.cfg_path("us"), "--watch", "1"])
        .env("PGRELAY_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("pgrelay status --watch");
    let mut stdout = std::io::BufReader::new(watch.stdout.take().unwrap());
    let mut tables = 0;
    let mut line = String::new();
    let mut seen = String::new();
    while tables < 3 {
        line.clear();
        if std::io::BufRead::read_line(&mut stdout, &mut line).unwrap_or(0) == 0 {
            break;
        }
        tables += usize::from(line.starts_with("-- unix time"));
        seen.push_str(&line);
    }
    let _ = watch.kill();
    let _ = watch.wait();
    assert_eq!(tables, 3, "status --watch printed:\n{seen}");
    assert!(seen.contains("us->cn"), "{seen}");
    assert!(
        seen.contains("egress (bytes published per destination):") && seen.contains("per month"),
        "status prints egress and its cost:\n{seen}"
    );

    let url = format!("http://127.0.0.1:{}/", w.http["cn"]);
    let dom = dump_dom(&url, "status-page.png");
    for r in REGIONS {
        assert!(
            dom.contains(&format!("data-region=\"{r}\"")),
            "no node {r}:\n{dom}"
        );
    }
    let drawn = edges(&dom);
    assert_eq!(drawn.len(), 6, "{drawn:?}");
    for p in ["us->cn", "eu->cn", "cn->us", "cn->eu"] {
        assert_eq!(
            drawn[p],
            ("active".to_string(), colour("active").to_string()),
            "{p}: {}",
            view(&w, "cn")
        );
    }
    // pairs between two other regions are not cn's to see
    for p in ["us->eu", "eu->us"] {
        assert_eq!(
            drawn[p],
            ("unknown".to_string(), colour("unknown").to_string()),
            "{p}"
        );
    }
    assert!(
        dom.contains("data-pair=\"us->cn\""),
        "the table has the pair"
    );
    eprintln!("page checked after {:?}", started.elapsed());

    // cn's periodic verify: the regions agree, then a row deleted in cn
    // where capture does not see it (pgrelay's replay origin) is a
    // difference the next run finds, and the page shows it
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = view(&w, "cn");
        if pair(&v, "us->cn")
            .is_some_and(|p| p["verify_differences"] == 0 && p["last_verify"].is_string())
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cn's verify of us->cn not shown: {}\n{}",
            pair(&v, "us->cn").cloned().unwrap_or_default(),
            sidecars[2].log_text()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let dom = dump_dom(&url, "status-page-verify.png");
    assert!(dom.contains("agree @ "), "{dom}");
    w.pg["cn"].psql(
        "BEGIN; SELECT pg_replication_origin_session_setup('pgrelay_replay'); \
         SET LOCAL session_replication_role = replica; \
         DELETE FROM products WHERE id = (SELECT min(id) FROM products); COMMIT;",
    );
    eventually(
        Duration::from_secs(60),
        "cn's verify finds the missing row",
        || async {
            // counted against the region whose version cn lacks: us or eu
            let v = view(&w, "cn");
            ["us->cn", "eu->cn"]
                .iter()
                .any(|p| {
                    pair(&v, p).is_some_and(|p| p["verify_differences"].as_u64().unwrap_or(0) >= 1)
                })
                .then_some(())
        },
    )
    .await;
    let dom = dump_dom(&url, "status-page-verify-differs.png");
    assert!(dom.contains(" differ @ "), "{dom}");
    assert!(dom.contains("verify found "), "{dom}");

    // cut cn's link: its incoming pairs stop being active, and the page says so
    w.brokers["cn"].1.cut();
    eventually(
        Duration::from_secs(60),
        "cn's view of the cut link",
        || async {
            let v = view(&w, "cn");
            (pair(&v, "us->cn")?["state"] != "active").then_some(())
        },
    )
    .await;
    let asked = Instant::now();
    let _ = view(&w, "cn");
    eprintln!(
        "cut seen after {:?}; /status.json answered in {:?}",
        started.elapsed(),
        asked.elapsed()
    );
    let dom = dump_dom(&url, "status-page-cut-link.png");
    let drawn = edges(&dom);
    let (state, stroke) = &drawn["us->cn"];
    assert!(
        state == "failed" || state == "lagging",
        "us->cn drawn {state}"
    );
    assert_eq!(stroke, colour(state), "us->cn is coloured as {state}");
    assert!(dom.contains("problems"), "{dom}");
    w.brokers["cn"].1.restore();
}
