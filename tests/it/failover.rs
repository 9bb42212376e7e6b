//! Split brain and failover: `pgrelay fence|unfence`, failovers recorded
//! in `pgrelay.events`.

use crate::apply::{pair, SCHEMA};
use crate::support::relay::{self, Relay};
use crate::support::until_count;

/// The error a local statement gets, or `None` if it succeeded.
async fn refused(client: &tokio_postgres::Client, sql: &str) -> Option<String> {
    match client.batch_execute(sql).await {
        Ok(()) => None,
        Err(e) => Some(
            e.as_db_error()
                .map(|d| format!("{} {}", d.message(), d.hint().unwrap_or_default()))
                .unwrap_or_else(|| e.to_string()),
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_region_refuses_local_writes_and_still_applies() {
    let p = pair(SCHEMA);
    let cfg = p.cfg.path.to_str().unwrap();
    let _us = Relay::spawn(&p.cfg, "us", "all");
    let _eu = Relay::spawn(&p.cfg, "eu", "all");
    let eu = p.eu.client().await;
    let us = p.us.client().await;
    eu.batch_execute("INSERT INTO products (id, name, price) VALUES (1, 'before', 1)")
        .await
        .unwrap();
    until_count(&us, "SELECT count(*) FROM products", 1, "eu's row in us").await;

    let out = relay::ok(&[
        "fence",
        "--config",
        cfg,
        "--region",
        "eu",
        "--reason",
        "old primary came back",
    ]);
    assert!(out.contains("region eu: fenced"), "{out}");
    let again = relay::ok(&["fence", "--config", cfg, "--region", "eu"]);
    assert!(again.contains("already fenced"), "{again}");

    // every kind of local write to a replicated table is refused, with the fix
    for sql in [
        "INSERT INTO products (id, name, price) VALUES (2, 'fenced', 2)",
        "UPDATE products SET price = 5 WHERE id = 1",
        "DELETE FROM products WHERE id = 1",
        "TRUNCATE products",
        // a statement touching no row is refused too
        "UPDATE products SET price = 5 WHERE id = -1",
    ] {
        let err = refused(&eu, sql)
            .await
            .unwrap_or_else(|| panic!("{sql} succeeded in a fenced region"));
        assert!(
            err.contains("region eu is fenced")
                && err.contains("old primary came back")
                && err.contains("pgrelay unfence --region eu"),
            "{sql}: {err}"
        );
    }
    // a local table is not replicated, hence not fenced
    eu.batch_execute("INSERT INTO users VALUES (1, 'x@example.org')")
        .await
        .unwrap();
    // the other region's changes still land
    us.batch_execute(
        "INSERT INTO products (id, name, price) VALUES (10, 'from us', 10); \
         UPDATE products SET price = 7 WHERE id = 1",
    )
    .await
    .unwrap();
    until_count(
        &eu,
        "SELECT count(*) FROM products WHERE id = 10 OR (id = 1 AND price = 7)",
        2,
        "us's insert and update applied in fenced eu",
    )
    .await;
    let n: i64 = eu
        .query_one("SELECT count(*) FROM products", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2, "the refused writes left nothing behind");

    let status = relay::ok(&["status", "--config", cfg]);
    assert!(
        status.contains("region eu: FENCED since") && status.contains("old primary came back"),
        "{status}"
    );
    assert!(!status.contains("region us: FENCED"), "{status}");

    let out = relay::ok(&["unfence", "--config", cfg, "--region", "eu"]);
    assert!(out.contains("unfenced"), "{out}");
    let out = relay::ok(&["unfence", "--config", cfg, "--region", "eu"]);
    assert!(out.contains("was not fenced"), "{out}");
    eu.batch_execute("INSERT INTO products (id, name, price) VALUES (3, 'after', 3)")
        .await
        .unwrap();
    until_count(
        &us,
        "SELECT count(*) FROM products WHERE id = 3",
        1,
        "eu's write after unfence in us",
    )
    .await;
    let status = relay::ok(&["status", "--config", cfg]);
    assert!(!status.contains("FENCED"), "{status}");

    // both recorded, once each
    let kinds: Vec<String> = eu
        .query(
            "SELECT kind || ':' || coalesce(detail->>'reason', '') FROM pgrelay.events \
             WHERE region = 'eu' ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(kinds, ["fence:old primary came back", "unfence:"]);
}
