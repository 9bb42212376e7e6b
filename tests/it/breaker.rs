//! The blast-radius breaker: a storm of deletes from one region is held in
//! the others until an operator releases or discards it.

use std::time::Duration;

use tokio_postgres::Client;

use crate::sidecar::{identical, World, REGIONS};
use crate::support::kafka::read_all;
use crate::support::relay::{self, Relay};
use crate::support::{eventually, until_count};

/// At most this many deletes of `orders` from `us` apply per minute.
const MAX_DELETES: i64 = 10;
const STORM: i64 = 40;

const RULE: &str = "
[[breakers]]
source = \"us\"
table = \"public.orders\"
max_deletes = 10
window = \"1m\"
";

async fn count(c: &Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap().get(0)
}

async fn insert_orders(us: &Client, ids: std::ops::RangeInclusive<i64>) {
    us.execute(
        "INSERT INTO orders (id, country, email, amount) \
         SELECT i, 'US', 'o' || i || '@example.com', i FROM generate_series($1::bigint, $2::bigint) i",
        &[ids.start(), ids.end()],
    )
    .await
    .unwrap();
}

/// Waits until the breaker of `eu` and `cn` holds `us` (stored state,
/// status, metric), with `trips` trips recorded in each region's events.
async fn frozen_everywhere(w: &World, trips: i64) {
    for r in ["eu", "cn"] {
        let c = w.pg[r].client().await;
        until_count(
            &c,
            "SELECT count(*) FROM pgrelay.breakers WHERE source_region = 'us' AND state = 'frozen' \
             AND reason LIKE 'more than 10 deletes of public.orders from us%'",
            1,
            "the breaker frozen",
        )
        .await;
        assert_eq!(
            count(
                &c,
                "SELECT count(*) FROM pgrelay.events WHERE kind = 'breaker_trip' \
                 AND detail->>'source' = 'us' AND detail->>'table' = 'public.orders'"
            )
            .await,
            trips
        );
        eventually(
            Duration::from_secs(10),
            "pgrelay_breaker_state = 1",
            || async {
                (w.metric_sum(r, "pgrelay_breaker_state", "source=\"us\"") == 1.0).then_some(())
            },
        )
        .await;
    }
    let out = relay::ok(&["status", "--config", w.cfg_path("us"), "--json"]);
    let pairs: serde_json::Value = serde_json::from_str(&out).unwrap();
    for p in pairs.as_array().unwrap() {
        let want = if p["source"] == "us" {
            "frozen"
        } else {
            "active"
        };
        assert_eq!(p["state"], want, "{p}");
        if want == "frozen" {
            assert!(
                p["frozen"]
                    .as_str()
                    .unwrap()
                    .contains("pgrelay breaker release|discard --region"),
                "{p}"
            );
        }
    }
    let text = relay::ok(&["status", "--config", w.cfg_path("us")]);
    assert!(text.contains("frozen"), "{text}");
}

/// Waits until `us`'s record of the product `id` is in the pair's topic
/// (it was published, so only the breaker keeps it from `dest`).
fn published(w: &World, dest: &str, id: i64) {
    let brokers = w.brokers[dest].0.brokers();
    let found = read_all(
        &brokers,
        &format!("pgrelay.us.{dest}"),
        Duration::from_secs(1),
    )
    .iter()
    .any(|r| {
        r.value["after"]["id"].as_str().and_then(|s| s.parse().ok()) == Some(id)
            && r.value["source"]["table"] == "products"
    });
    assert!(found, "product {id} is not in pgrelay.us.{dest}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_storm_is_held_until_released_or_discarded() {
    let w = World::start(false);
    for r in REGIONS {
        let path = &w.cfg[r].path;
        let text = std::fs::read_to_string(path).unwrap() + RULE;
        std::fs::write(path, text).unwrap();
    }
    let mut sidecars: Vec<Relay> = REGIONS.iter().map(|r| w.sidecar(r)).collect();
    let us = w.pg["us"].client().await;
    let eu = w.pg["eu"].client().await;
    let cn = w.pg["cn"].client().await;

    // 1. release: the held storm applies, then counting starts again
    insert_orders(&us, 1..=STORM).await;
    for c in [&eu, &cn] {
        until_count(c, "SELECT count(*) FROM orders", STORM, "orders replicated").await;
    }
    us.execute("DELETE FROM orders", &[]).await.unwrap();
    us.execute(
        "INSERT INTO products VALUES (900, 'after the storm', 1)",
        &[],
    )
    .await
    .unwrap();
    frozen_everywhere(&w, 1).await;
    let mut kept_rows = std::collections::BTreeMap::new();
    for (r, c) in [("eu", &eu), ("cn", &cn)] {
        published(&w, r, 900);
        // the storm's transaction is held whole; at most the threshold
        // could have passed before it
        let kept = count(c, "SELECT count(*) FROM orders").await;
        assert!(kept >= STORM - MAX_DELETES, "{r} kept {kept} of {STORM}");
        kept_rows.insert(r, kept);
        assert_eq!(
            count(c, "SELECT count(*) FROM products WHERE id = 900").await,
            0
        );
    }
    // a restart keeps it frozen: the new process reads the stored state
    sidecars[1].kill9();
    sidecars[1] = w.sidecar("eu");
    eventually(
        Duration::from_secs(30),
        "eu's new sidecar frozen",
        || async {
            (w.metric_sum("eu", "pgrelay_breaker_state", "source=\"us\"") == 1.0).then_some(())
        },
    )
    .await;
    assert_eq!(
        count(&eu, "SELECT count(*) FROM orders").await,
        kept_rows["eu"]
    );
    // only the pair is frozen: eu's changes still reach us and cn
    eu.execute("INSERT INTO products VALUES (901, 'from eu', 2)", &[])
        .await
        .unwrap();
    for c in [&us, &cn] {
        until_count(
            c,
            "SELECT count(*) FROM products WHERE id = 901",
            1,
            "eu's change",
        )
        .await;
    }
    let out = relay::ok(&[
        "breaker",
        "release",
        "--config",
        w.cfg_path("eu"),
        "--region",
        "eu",
        "--source",
        "us",
    ]);
    assert!(
        out.contains("released") && out.contains("more than 10 deletes"),
        "{out}"
    );
    relay::ok(&[
        "breaker",
        "release",
        "--config",
        w.cfg_path("cn"),
        "--region",
        "cn",
        "--source",
        "us",
    ]);
    let err = relay::fails(&[
        "breaker",
        "release",
        "--config",
        w.cfg_path("cn"),
        "--region",
        "cn",
        "--source",
        "us",
    ]);
    assert!(
        err.contains("no breaker holds the changes from us in cn"),
        "{err}"
    );
    for c in [&eu, &cn] {
        until_count(
            c,
            "SELECT count(*) FROM orders",
            0,
            "the released storm applied",
        )
        .await;
        until_count(
            c,
            "SELECT count(*) FROM products WHERE id = 900",
            1,
            "held change",
        )
        .await;
        assert_eq!(
            count(
                c,
                "SELECT count(*) FROM pgrelay.events WHERE kind = 'breaker_release'"
            )
            .await,
            1
        );
    }
    // ordinary changes flow again, deletes below the threshold included
    insert_orders(&us, 51..=55).await;
    us.batch_execute(
        "DELETE FROM orders WHERE id IN (51, 52); INSERT INTO products VALUES (902, 'later', 3)",
    )
    .await
    .unwrap();
    identical(
        &w,
        "SELECT id, name, price FROM products ORDER BY id",
        Duration::from_secs(60),
    )
    .await;
    let orders = identical(
        &w,
        "SELECT id FROM orders ORDER BY id",
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(orders.len(), 3);
    for r in ["eu", "cn"] {
        let c = w.pg[r].client().await;
        assert_eq!(
            count(
                &c,
                "SELECT count(*) FROM pgrelay.breakers WHERE state = 'frozen'"
            )
            .await,
            0
        );
        assert_eq!(
            w.metric_sum(r, "pgrelay_breaker_state", "source=\"us\""),
            0.0
        );
    }
    // 2. discard: the storm's deletes are parked for audit, nothing is deleted
    insert_orders(&us, 101..=100 + STORM).await;
    for c in [&eu, &cn] {
        until_count(
            c,
            "SELECT count(*) FROM orders WHERE id > 100",
            STORM,
            "orders replicated",
        )
        .await;
    }
    // a backup of us from before the storm, to repair it from afterwards
    let backup_dsn = crate::repair::backup(&w.pg["us"]);
    let storm_at: String = us
        .query_one("SELECT now()::text", &[])
        .await
        .unwrap()
        .get(0);
    us.execute("DELETE FROM orders WHERE id > 100", &[])
        .await
        .unwrap();
    us.execute(
        "INSERT INTO products VALUES (903, 'after the second storm', 4)",
        &[],
    )
    .await
    .unwrap();
    frozen_everywhere(&w, 2).await;
    // the storm's transaction is normally held whole; at most the threshold
    // of it passes before the breaker trips
    let mut kept = std::collections::BTreeMap::new();
    for (r, c) in [("eu", &eu), ("cn", &cn)] {
        let n = count(c, "SELECT count(*) FROM orders WHERE id > 100").await;
        assert!(n >= STORM - MAX_DELETES, "{r} kept {n} of {STORM}");
        kept.insert(r, n);
    }
    for r in ["eu", "cn"] {
        published(&w, r, 903);
        relay::ok(&[
            "breaker",
            "discard",
            "--config",
            w.cfg_path(r),
            "--region",
            r,
            "--source",
            "us",
        ]);
    }
    for (r, c) in [("eu", &eu), ("cn", &cn)] {
        until_count(
            c,
            "SELECT count(*) FROM products WHERE id = 903",
            1,
            "held change",
        )
        .await;
        assert_eq!(
            count(c, "SELECT count(*) FROM orders WHERE id > 100").await,
            kept[r]
        );
        assert_eq!(
            count(
                c,
                "SELECT count(*) FROM pgrelay.events WHERE kind = 'breaker_discard'"
            )
            .await,
            1
        );
    }
    // every held delete of the storm is parked, each once
    let list = relay::ok(&[
        "dlq",
        "list",
        "--config",
        w.cfg_path("eu"),
        "--region",
        "eu",
    ]);
    let parked = list
        .lines()
        .filter(|l| l.contains("breaker_discarded"))
        .count();
    assert_eq!(parked as i64, kept["eu"], "{list}");
    // and a replay leaves them parked
    let out = relay::ok(&[
        "dlq",
        "replay",
        "--config",
        w.cfg_path("eu"),
        "--region",
        "eu",
    ]);
    assert!(out.contains("not replayed"), "{out}");
    assert_eq!(
        count(&eu, "SELECT count(*) FROM orders WHERE id > 100").await,
        kept["eu"]
    );
    // us still lacks the storm's rows: repaired from its backup, they get
    // fresh stamps and reach every region again (also one the storm
    // reached in part), and every region converges
    let out = relay::ok(&[
        "repair",
        "--config",
        w.cfg_path("us"),
        "--region",
        "us",
        "--from",
        &backup_dsn,
        "--table",
        "public.orders",
        "--origin",
        "us",
        "--since",
        &storm_at,
    ]);
    assert!(
        out.contains(&format!(
            "public.orders: {STORM} restored, 0 rewritten, 0 removed"
        )),
        "{out}"
    );
    // ordinary changes flow again
    us.execute(
        "INSERT INTO products VALUES (904, 'after the discard', 5)",
        &[],
    )
    .await
    .unwrap();
    insert_orders(&us, 201..=203).await;
    identical(
        &w,
        "SELECT id, name, price FROM products ORDER BY id",
        Duration::from_secs(60),
    )
    .await;
    for c in [&eu, &cn] {
        until_count(
            c,
            "SELECT count(*) FROM orders WHERE id > 200",
            3,
            "later orders",
        )
        .await;
    }
    let all = identical(
        &w,
        "SELECT id, amount FROM orders ORDER BY id",
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(all.len() as i64, 3 + STORM + 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_storm_trips_by_fraction_and_a_truncate_by_kind() {
    let p = crate::apply::pair(crate::apply::SCHEMA);
    let text = std::fs::read_to_string(&p.cfg.path).unwrap()
        + "\n[[breakers]]\ntable = \"public.products\"\nmax_fraction = 0.5\nmin_rows = 10\n";
    std::fs::write(&p.cfg.path, text).unwrap();
    let cfg = p.cfg.path.to_str().unwrap();
    let _us = Relay::spawn(&p.cfg, "us", "all");
    let _eu = Relay::spawn(&p.cfg, "eu", "all");
    let us = p.us.client().await;
    let eu = p.eu.client().await;
    us.execute(
        "INSERT INTO products (id, name, price) SELECT g, 'p' || g, g FROM generate_series(1, 100) g",
        &[],
    )
    .await
    .unwrap();
    until_count(&eu, "SELECT count(*) FROM products", 100, "rows replicated").await;

    // 60 of eu's 100 rows rewritten within the window: more than half
    us.execute("UPDATE products SET price = 0 WHERE id <= 60", &[])
        .await
        .unwrap();
    until_count(
        &eu,
        "SELECT count(*) FROM pgrelay.breakers WHERE state = 'frozen' \
         AND kind = 'change' AND reason LIKE '% of public.products from us within %, more than 50% of its 100 rows here'",
        1,
        "the breaker frozen by the fraction",
    )
    .await;
    // normally none of the storm applied; at most half of the rows can have
    let early = count(&eu, "SELECT count(*) FROM products WHERE price = 0").await;
    assert!(
        early <= 50,
        "{early} of the 60 updates applied before the breaker tripped"
    );
    relay::ok(&[
        "breaker", "release", "--config", cfg, "--region", "eu", "--source", "us",
    ]);
    until_count(
        &eu,
        "SELECT count(*) FROM products WHERE price = 0",
        60,
        "the release",
    )
    .await;

    // any truncate trips; a discard parks it and the rows stay
    us.batch_execute("TRUNCATE products").await.unwrap();
    until_count(
        &eu,
        "SELECT count(*) FROM pgrelay.breakers WHERE state = 'frozen' AND kind = 'truncate' \
         AND reason = 'a truncate of public.products from us'",
        1,
        "the breaker frozen by the truncate",
    )
    .await;
    relay::ok(&[
        "breaker", "discard", "--config", cfg, "--region", "eu", "--source", "us",
    ]);
    us.execute(
        "INSERT INTO products (id, name, price) VALUES (500, 'later', 5)",
        &[],
    )
    .await
    .unwrap();
    until_count(
        &eu,
        "SELECT count(*) FROM products WHERE id = 500",
        1,
        "a later change",
    )
    .await;
    assert_eq!(count(&eu, "SELECT count(*) FROM products").await, 101);
    let list = relay::ok(&["dlq", "list", "--config", cfg, "--region", "eu"]);
    assert_eq!(
        list.lines()
            .filter(|l| l.contains("breaker_discarded"))
            .count(),
        1,
        "{list}"
    );
    assert_eq!(
        count(
            &eu,
            "SELECT count(*) FROM pgrelay.events WHERE kind LIKE 'breaker_%'"
        )
        .await,
        4
    );
}

/// Two regions under a `max_fraction = 0.5` rule on products, 400 rows
/// replicated to eu, whose planner estimate of them is then set to
/// `estimate` (autovacuum off: the statistics stay stale).
async fn stale_estimate_pair(estimate: i64) -> (crate::apply::Pair, [Relay; 2], Client, Client) {
    let p = crate::apply::pair(crate::apply::SCHEMA);
    let text = std::fs::read_to_string(&p.cfg.path).unwrap()
        + "\n[[breakers]]\ntable = \"public.products\"\nmax_fraction = 0.5\nmin_rows = 10\n";
    std::fs::write(&p.cfg.path, text).unwrap();
    let relays = [
        Relay::spawn(&p.cfg, "us", "all"),
        Relay::spawn(&p.cfg, "eu", "all"),
    ];
    let us = p.us.client().await;
    let eu = p.eu.client().await;
    us.execute(
        "INSERT INTO products (id, name, price) SELECT g, 'p' || g, g FROM generate_series(1, 400) g",
        &[],
    )
    .await
    .unwrap();
    until_count(&eu, "SELECT count(*) FROM products", 400, "rows replicated").await;
    p.eu.psql(&format!(
        "ALTER TABLE products SET (autovacuum_enabled = off); \
         UPDATE pg_class SET reltuples = {estimate} WHERE oid = 'products'::regclass"
    ));
    (p, relays, us, eu)
}

/// `max_fraction` is a share of the rows the destination holds: a stale
/// low estimate (a table filled since it was last analyzed) does not
/// freeze the pair over a few updates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_fraction_ignores_a_stale_low_row_estimate() {
    let (_p, _relays, us, eu) = stale_estimate_pair(2).await;
    // 30 updates: 7.5% of the 400 rows, 1500% of the 2 the planner believes in
    us.execute("UPDATE products SET price = -1 WHERE id <= 30", &[])
        .await
        .unwrap();
    until_count(
        &eu,
        "SELECT count(*) FROM products WHERE price = -1",
        30,
        "the updates applied",
    )
    .await;
    assert_eq!(
        count(
            &eu,
            "SELECT count(*) FROM pgrelay.breakers WHERE state = 'frozen'"
        )
        .await,
        0
    );
}

/// ... and a stale high estimate (a table emptied or never analyzed since
/// it was large) does not let a storm through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_fraction_ignores_a_stale_high_row_estimate() {
    let (_p, _relays, us, eu) = stale_estimate_pair(1_000_000).await;
    // 250 updates: 62.5% of the 400 rows
    us.execute("UPDATE products SET price = 0 WHERE id > 150", &[])
        .await
        .unwrap();
    until_count(
        &eu,
        "SELECT count(*) FROM pgrelay.breakers WHERE state = 'frozen' AND kind = 'change' \
         AND reason LIKE '% of public.products from us within %, more than 50% of its 400 rows here'",
        1,
        "the breaker frozen by the fraction",
    )
    .await;
    let early = count(&eu, "SELECT count(*) FROM products WHERE price = 0").await;
    assert!(
        early <= 200,
        "{early} of the 250 updates applied before the breaker tripped"
    );
}
