//! `pgrelay repair`: a corruption that spread to every region is undone
//! from a backup taken before it; newer, good changes stay.

use std::process::Command;
use std::time::Duration;

use crate::sidecar::{identical, World, REGIONS};
use crate::support::pg::Pg;
use crate::support::relay::{self, Relay};
use crate::support::until_count;

/// A copy of `pg`'s database as it is now, restored into a new database
/// `backup` of the same cluster (`pg_dump | psql`); returns its DSN.
pub fn backup(pg: &Pg) -> String {
    pg.psql("CREATE DATABASE backup");
    let to = pg.dsn().replace("dbname=postgres", "dbname=backup");
    let out = Command::new("sh")
        .arg("-c")
        .arg("pg_dump --no-owner \"$FROM\" | psql -X -q -v ON_ERROR_STOP=1 \"$TO\"")
        .env("FROM", pg.dsn())
        .env("TO", &to)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pg_dump | psql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    to
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corruption_spread_everywhere_is_repaired_from_a_backup_keeping_newer_changes() {
    let w = World::start(false);
    let _sidecars: Vec<Relay> = REGIONS.iter().map(|r| w.sidecar(r)).collect();
    let us = w.pg["us"].client().await;
    let eu = w.pg["eu"].client().await;
    let cn = w.pg["cn"].client().await;
    us.execute(
        "INSERT INTO products SELECT i, 'p' || i, i + 0.5 FROM generate_series(1, 20) i",
        &[],
    )
    .await
    .unwrap();
    let sql = "SELECT id, name, price FROM products ORDER BY id";
    let good = identical(&w, sql, Duration::from_secs(60)).await;
    assert_eq!(good.len(), 20);
    let backup_dsn = backup(&w.pg["eu"]);
    let since: String = us
        .query_one("SELECT now()::text", &[])
        .await
        .unwrap()
        .get(0);

    // the corruption, in us: every price zeroed, a row deleted
    us.batch_execute(
        "UPDATE products SET price = 0; DELETE FROM products WHERE id = 20; \
         INSERT INTO products VALUES (21, 'bogus', 0)",
    )
    .await
    .unwrap();
    for c in [&eu, &cn] {
        until_count(
            c,
            "SELECT count(*) FROM products WHERE price = 0",
            20,
            "the corruption spread",
        )
        .await;
    }
    // good changes after it, made in eu and cn
    eu.execute("UPDATE products SET price = 77 WHERE id = 3", &[])
        .await
        .unwrap();
    cn.execute(
        "UPDATE products SET name = 'renamed', price = 55 WHERE id = 4",
        &[],
    )
    .await
    .unwrap();
    for c in [&us, &eu, &cn] {
        until_count(
            c,
            "SELECT count(*) FROM products WHERE (id = 3 AND price = 77) OR (id = 4 AND price = 55)",
            2,
            "the good changes replicated",
        )
        .await;
    }

    let args = |dry: bool| {
        let mut a = vec![
            "repair",
            "--config",
            w.cfg_path("eu"),
            "--region",
            "eu",
            "--from",
            backup_dsn.as_str(),
            "--table",
            "public.products",
            "--since",
            since.as_str(),
            "--origin",
            "us",
        ];
        if dry {
            a.push("--dry-run");
        }
        a
    };
    let out = relay::ok(&args(true));
    assert!(
        out.contains("1 would be restored, 17 would be rewritten, 1 would be removed")
            && out.contains("2 left")
            && out.contains("dry run, nothing written"),
        "{out}"
    );
    assert_eq!(
        eu.query_one("SELECT count(*) FROM products WHERE price = 0", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        18
    );
    let out = relay::ok(&args(false));
    assert!(
        out.contains("public.products: 1 restored, 17 rewritten, 1 removed")
            && out.contains("written by eu")
            && out.contains("written by cn"),
        "{out}"
    );

    // every region converges on the backup's rows, the good changes kept
    let mut want = good.clone();
    want[2][2] = Some("77.00".into());
    want[3][1] = Some("renamed".into());
    want[3][2] = Some("55.00".into());
    for c in [&us, &cn] {
        until_count(
            c,
            "SELECT count(*) FROM products WHERE price = 0",
            0,
            "the repair replicated",
        )
        .await;
    }
    let now = identical(&w, sql, Duration::from_secs(60)).await;
    assert_eq!(now, want);

    // a second run finds nothing left to repair by us
    let out = relay::ok(&args(false));
    assert!(out.contains("0 restored, 0 rewritten, 0 removed"), "{out}");
    assert_eq!(identical(&w, sql, Duration::from_secs(10)).await, want);
    // bad input names what to fix
    let err = relay::fails(&[
        "repair",
        "--config",
        w.cfg_path("eu"),
        "--region",
        "eu",
        "--from",
        backup_dsn.as_str(),
        "--table",
        "public.users",
    ]);
    assert!(
        err.contains("--table public.users is not a declared, replicated table"),
        "{err}"
    );
    let err = relay::fails(&[
        "repair",
        "--config",
        w.cfg_path("eu"),
        "--region",
        "eu",
        "--from",
        backup_dsn.as_str(),
        "--since",
        "yesterday-ish",
    ]);
    assert!(err.contains("--since \"yesterday-ish\""), "{err}");
}
