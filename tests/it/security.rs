//! Least privilege and per-region secrets against a real PostgreSQL 15
//! cluster and broker: the sidecar's run role is no superuser and `check`
//! names each GRANT it lacks; a sidecar runs with only its own region's
//! secrets; keyed pseudonyms carry their key id; `/metrics` wants its token.

use std::io::{Read, Write};
use std::time::Duration;

use crate::capture::{config, HASH_KEY_US, SCHEMA};
use crate::support::broker::Broker;
use crate::support::kafka::read_all;
use crate::support::pg::{Pg, PASSWORD, RUN_ROLE};
use crate::support::relay::{self, ConfigFile, Relay};
use crate::support::{eventually, free_port};

fn check(cfg: &ConfigFile, region: Option<&str>) -> (bool, String) {
    let mut args = vec!["check", "--config", cfg.path.to_str().unwrap()];
    if let Some(r) = region {
        args.extend(["--region", r]);
    }
    let out = relay::cmd(&args);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn setup(cfg: &ConfigFile, region: &str) -> (bool, String) {
    let out = relay::cmd(&[
        "setup",
        "--config",
        cfg.path.to_str().unwrap(),
        "--region",
        region,
    ]);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn setup_grants_the_run_role_and_check_names_each_missing_grant() {
    let pg = Pg::start();
    pg.psql(SCHEMA);
    let broker = Broker::start();
    let cfg = ConfigFile::new(&config(&pg.dsn(), &broker.brokers()));
    assert_eq!(
        pg.psql(&format!(
            "SELECT rolsuper, rolreplication FROM pg_roles WHERE rolname = '{RUN_ROLE}'"
        ))
        .trim(),
        "f|t"
    );

    // before setup the run role may touch nothing of pgrelay's
    let (ok, out) = check(&cfg, Some("us"));
    assert!(!ok, "{out}");

    let (ok, out) = setup(&cfg, "us");
    assert!(ok, "{out}");
    assert!(out.contains(&format!("run role {RUN_ROLE}")), "{out}");
    let (ok, out) = check(&cfg, Some("us"));
    assert!(ok, "{out}");
    assert!(!out.contains("superuser"), "{out}");
    assert!(out.contains("region us: database ok"), "{out}");

    // take privileges away: check names each GRANT
    pg.psql(&format!(
        "REVOKE INSERT, DELETE ON products FROM {RUN_ROLE};
         REVOKE SET ON PARAMETER session_replication_role FROM {RUN_ROLE};
         REVOKE EXECUTE ON FUNCTION pg_replication_origin_session_setup(text) FROM {RUN_ROLE};
         REVOKE EXECUTE ON FUNCTION pgrelay.observe_hlc(bigint) FROM {RUN_ROLE};"
    ));
    let (ok, out) = check(&cfg, Some("us"));
    assert!(!ok, "{out}");
    for grant in [
        format!(r#"GRANT INSERT, DELETE ON TABLE "public"."products" TO "{RUN_ROLE}""#),
        format!(r#"GRANT SET ON PARAMETER session_replication_role TO "{RUN_ROLE}""#),
        format!(
            r#"GRANT EXECUTE ON FUNCTION pg_catalog.pg_replication_origin_session_setup(text) TO "{RUN_ROLE}""#
        ),
        format!(r#"GRANT EXECUTE ON FUNCTION pgrelay.observe_hlc(bigint) TO "{RUN_ROLE}""#),
    ] {
        assert!(out.contains(&grant), "missing {grant}:\n{out}");
    }
    // the sidecar refuses to start on them too
    let mut relay = Relay::spawn(&cfg, "us", "capture");
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = relay.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the sidecar did not stop: {}",
            relay.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    assert!(
        relay.log_text().contains("GRANT INSERT, DELETE ON TABLE"),
        "{}",
        relay.log_text()
    );

    // REPLICATION too
    pg.psql(&format!("ALTER ROLE {RUN_ROLE} NOREPLICATION"));
    let (ok, out) = check(&cfg, Some("us"));
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!("ALTER ROLE \"{RUN_ROLE}\" REPLICATION")),
        "{out}"
    );
    pg.psql(&format!("ALTER ROLE {RUN_ROLE} REPLICATION"));

    // setup gives back exactly what was missing
    let (ok, out) = setup(&cfg, "us");
    assert!(ok, "{out}");
    let (ok, out) = check(&cfg, Some("us"));
    assert!(ok, "{out}");

    // a sidecar connecting as superuser is told so
    let text = config(&pg.dsn(), &broker.brokers())
        .replace(&format!("user={RUN_ROLE} "), "user=postgres ");
    let su = ConfigFile::new(&text);
    let (ok, out) = check(&su, Some("us"));
    assert!(ok, "{out}");
    assert!(
        out.contains("warning: region us: the sidecar connects as superuser postgres"),
        "{out}"
    );
}

#[test]
fn a_setup_role_that_may_not_grant_names_the_statements_for_a_superuser() {
    let pg = Pg::start();
    pg.psql(SCHEMA);
    // a setup role owning the tables, allowed to create the schema and the
    // slot, but holding no grant option on the origin function or parameter
    pg.psql(
        "CREATE ROLE relay_setup LOGIN REPLICATION PASSWORD 'relay-secret';
         GRANT CREATE ON DATABASE postgres TO relay_setup;
         ALTER TABLE users OWNER TO relay_setup;
         ALTER TABLE products OWNER TO relay_setup;
         ALTER TABLE currencies OWNER TO relay_setup;
         ALTER TABLE orders OWNER TO relay_setup;
         GRANT EXECUTE ON FUNCTION pg_replication_origin_create(text) TO relay_setup;",
    );
    let broker = Broker::start();
    let text = config(&pg.dsn(), &broker.brokers());
    let setup_line = text
        .lines()
        .find(|l| l.starts_with("setup_dsn"))
        .unwrap()
        .to_string();
    let text = text.replace(
        &setup_line,
        &format!(
            "run_role = \"{RUN_ROLE}\"\n{}",
            setup_line.replace("user=postgres ", "user=relay_setup ")
        ),
    );
    let cfg = ConfigFile::new(&text);
    let (ok, out) = setup(&cfg, "us");
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!(
            r#"GRANT SET ON PARAMETER session_replication_role TO "{RUN_ROLE}""#
        )),
        "{out}"
    );
    assert!(
        out.contains("a superuser runs the GRANT statements above once"),
        "{out}"
    );
    // the table grants went through: the superuser's part is all that is left
    pg.psql(&format!(
        "GRANT SET ON PARAMETER session_replication_role TO {RUN_ROLE};
         GRANT EXECUTE ON FUNCTION pg_replication_origin_session_setup(text) TO {RUN_ROLE};"
    ));
    let (ok, out) = setup(&cfg, "us");
    assert!(ok, "{out}");
    let (ok, out) = check(&cfg, Some("us"));
    assert!(ok, "{out}");
}

/// The us sidecar's config: eu's password and hash key come from variables
/// nobody set here; an HTTP endpoint on a bare port with a token.
fn config_without_eu_secrets(pg: &Pg, brokers: &str, http_port: u16) -> String {
    config(&pg.dsn(), brokers)
        .replace(
            "dsn = \"host=127.0.0.1 port=1 user=postgres dbname=postgres\"\nhash_key = \"eu-test-hash-key-0123456789abcdef\"",
            "dsn = \"host=127.0.0.1 port=1 user=postgres password=${PGRELAY_IT_UNSET_EU_PASSWORD} dbname=postgres\"\n\
             hash_key = \"${PGRELAY_IT_UNSET_EU_HASH_KEY}\"",
        )
        .replace(
            "[kafka]\n",
            &format!("[http]\nlisten = \"{http_port}\"\ntoken = \"metrics-token-0123456789\"\n\n[kafka]\n"),
        )
}

fn get(port: u16, request: &str) -> String {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.write_all(request.as_bytes());
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_runs_with_its_own_secrets_only() {
    for var in [
        "PGRELAY_IT_UNSET_EU_PASSWORD",
        "PGRELAY_IT_UNSET_EU_HASH_KEY",
    ] {
        assert!(std::env::var_os(var).is_none(), "{var} must be unset");
    }
    let pg = Pg::start();
    pg.psql(SCHEMA);
    let broker = Broker::start();
    let http_port = free_port();
    let text = config_without_eu_secrets(&pg, &broker.brokers(), http_port);
    assert!(text.contains("${PGRELAY_IT_UNSET_EU_PASSWORD}"));
    let cfg = ConfigFile::new(&text);

    // us: setup, check and run need none of eu's secrets
    let (ok, out) = setup(&cfg, "us");
    assert!(ok, "{out}");
    let (ok, out) = check(&cfg, Some("us"));
    assert!(ok, "{out}");

    // whatever touches eu's database names the variable and its line
    let line = text
        .lines()
        .position(|l| l.contains("PGRELAY_IT_UNSET_EU_PASSWORD"))
        .unwrap()
        + 1;
    for args in [
        vec!["check", "--region", "eu"],
        vec!["check"],
        vec!["setup", "--region", "eu"],
        vec!["status"],
        vec!["run", "--region", "eu", "--role", "apply"],
    ] {
        let mut full = vec![args[0], "--config", cfg.path.to_str().unwrap()];
        full.extend(&args[1..]);
        let err = relay::fails(&full);
        assert!(
            err.contains(&format!(
                "line {line}: environment variable PGRELAY_IT_UNSET_EU_PASSWORD is not set"
            )) && err.contains("regions.eu.dsn needs it"),
            "{args:?}: {err}"
        );
    }

    let relay = Relay::spawn(&cfg, "us", "capture");
    pg.psql("INSERT INTO orders VALUES (1, 'US', 'a@x.org', '4111', 5)");
    let records = eventually(
        Duration::from_secs(30),
        "the order on pgrelay.us.cn",
        || {
            let brokers = broker.brokers();
            async move {
                let recs = read_all(&brokers, "pgrelay.us.cn", Duration::from_millis(500));
                (!recs.is_empty()).then_some(recs)
            }
        },
    )
    .await;
    // keyed pseudonym: key id, then HMAC-SHA-256 with us's key
    let email = records
        .iter()
        .find_map(|r| r.value["after"]["email"].as_str())
        .unwrap_or_else(|| panic!("no email in {records:?}"))
        .to_string();
    let expected = hmac_hex(HASH_KEY_US.as_bytes(), b"a@x.org");
    assert_eq!(email, format!("k1:{expected}"), "{}", relay.log_text());

    // the HTTP endpoint: loopback by default, /metrics behind the token
    let metrics = eventually(Duration::from_secs(10), "the http endpoint", || async {
        let r = get(http_port, "GET /healthz HTTP/1.1\r\n\r\n");
        (!r.is_empty()).then_some(())
    });
    metrics.await;
    let r = get(http_port, "GET /metrics HTTP/1.1\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 401 "), "{r}");
    let r = get(
        http_port,
        "GET /metrics HTTP/1.1\r\nAuthorization: Bearer metrics-token-0123456789\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
    assert!(r.contains("pgrelay_"), "{r}");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], http_port));
    let listening = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    // 0100007F is 127.0.0.1 in /proc/net/tcp's byte order
    let port_hex = format!(":{:04X}", addr.port());
    assert!(
        listening
            .lines()
            .any(|l| l.contains(&format!("0100007F{port_hex}"))),
        "not bound to 127.0.0.1"
    );
    assert!(
        !listening
            .lines()
            .any(|l| l.contains(&format!("00000000{port_hex}"))),
        "bound to every address"
    );
}

/// HMAC-SHA-256 (RFC 2104) from the `sha2` crate alone, in hex.
fn hmac_hex(key: &[u8], message: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let mut block = [0u8; 64];
    block[..key.len()].copy_from_slice(key);
    let pad = |b: u8| block.iter().map(|k| k ^ b).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    let outer = Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize();
    outer.iter().map(|b| format!("{b:02x}")).collect()
}

/// The application's role: it may write the replicated tables and holds
/// nothing of pgrelay's, as docs/security.md says it needs.
const APP_ROLE: &str = "app_writer";

/// A region set up by `setup`'s own statements (PL/pgSQL or C triggers),
/// with an application role holding only its tables' privileges.
async fn app_region(pg: &Pg, stamp: pgrelay::setup::Stamp) -> pgrelay::config::Config {
    pg.psql(SCHEMA);
    if stamp == pgrelay::setup::Stamp::C {
        pg.psql(pgrelay::setup::CREATE_EXTENSION_SQL);
    }
    let config = pgrelay::config::parse(&config(&pg.dsn(), "127.0.0.1:1"), "t.toml").unwrap();
    let keys = |t: &pgrelay::event::TableName| {
        vec![if t.name == "currencies" { "code" } else { "id" }.to_string()]
    };
    let plan = pgrelay::setup::plan(&config, "us", &keys, stamp, &Default::default());
    let c = pg.client().await;
    for sql in plan {
        c.batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("{e}: {sql}"));
    }
    pg.psql(&format!(
        "CREATE ROLE {APP_ROLE} LOGIN PASSWORD '{PASSWORD}';
         GRANT USAGE ON SCHEMA public TO {APP_ROLE};
         GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON products, orders TO {APP_ROLE};"
    ));
    config
}

async fn app_client(pg: &Pg) -> tokio_postgres::Client {
    let dsn = pg
        .dsn()
        .replacen("user=postgres ", &format!("user={APP_ROLE} "), 1);
    let (client, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// pgrelay's triggers run with pgrelay's rights: an application role with
/// no grant on schema pgrelay writes, deletes and truncates replicated
/// tables, and can neither move the clock nor touch the tombstones. `check`
/// names any other role that holds such grants, with the REVOKE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_role_writes_without_grants_and_cannot_touch_the_clock() {
    let pg = Pg::start();
    let config = app_region(&pg, pgrelay::setup::Stamp::Plpgsql).await;
    let app = app_client(&pg).await;
    app.batch_execute(
        "INSERT INTO products (id, name) VALUES (1, 'a'), (2, 'b');
         UPDATE products SET name = 'c' WHERE id = 1;
         UPDATE products SET id = 3 WHERE id = 2;
         DELETE FROM products WHERE id = 1;
         INSERT INTO orders (id, country) VALUES (1, 'US');
         TRUNCATE orders;",
    )
    .await
    .expect("an application role writes replicated tables with no grant on pgrelay");
    let su = pg.client().await;
    let tombstones: i64 = su
        .query_one("SELECT count(*) FROM pgrelay.tombstones", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        tombstones, 3,
        "delete, key move and truncate leave tombstones"
    );
    for sql in [
        "SELECT setval('pgrelay.hlc_logical', (1::bigint << 57) - 1)",
        "SELECT nextval('pgrelay.hlc_gen')",
        "INSERT INTO pgrelay.tombstones VALUES ('public.products', '{}', 1 << 62)",
        "SELECT pk FROM pgrelay.tombstones",
        "SELECT pgrelay.next_hlc(0)",
        "SELECT pgrelay.advance_hlc(1 << 56)",
        "SELECT pgrelay.observe_hlc(1 << 56)",
    ] {
        let err = app
            .batch_execute(sql)
            .await
            .expect_err(&format!("an application role ran {sql}"));
        assert_eq!(
            err.as_db_error().map(|e| e.code().code()),
            Some("42501"),
            "{sql}: {err}"
        );
    }
    // nor with USAGE on the schema: each object is refused on its own
    pg.psql(&format!("GRANT USAGE ON SCHEMA pgrelay TO {APP_ROLE}"));
    for sql in [
        "SELECT setval('pgrelay.hlc_logical', (1::bigint << 57) - 1)",
        "SELECT pgrelay.next_hlc(0)",
        "SELECT pgrelay.advance_hlc(1 << 56)",
        "SELECT pgrelay.row_key(1, '{}'::text[])",
    ] {
        let err = app.batch_execute(sql).await.expect_err(sql);
        assert_eq!(
            err.as_db_error().map(|e| e.code().code()),
            Some("42501"),
            "{sql}: {err}"
        );
    }

    // check: nothing to say, then each foreign grant with its REVOKE
    let findings = |client| {
        let config = &config;
        async move {
            let cat = pgrelay::source::catalog::Catalog {
                client,
                region: "us",
            };
            pgrelay::check::database(config, "us", &cat, true)
                .await
                .unwrap()
                .into_iter()
                .map(|f| f.to_string())
                .filter(|f| f.contains(APP_ROLE) || f.contains("PUBLIC"))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(findings(&su).await, Vec::<String>::new());
    pg.psql(&format!(
        "GRANT USAGE, UPDATE ON SEQUENCE pgrelay.hlc_logical TO {APP_ROLE};
         GRANT SELECT, INSERT, UPDATE ON pgrelay.tombstones TO {APP_ROLE};
         GRANT EXECUTE ON FUNCTION pgrelay.next_hlc(bigint) TO PUBLIC;"
    ));
    let found = findings(&su).await;
    for revoke in [
        format!(r#"REVOKE UPDATE, USAGE ON SEQUENCE pgrelay.hlc_logical FROM "{APP_ROLE}""#),
        format!(r#"REVOKE INSERT, SELECT, UPDATE ON TABLE pgrelay.tombstones FROM "{APP_ROLE}""#),
        "REVOKE EXECUTE ON FUNCTION pgrelay.next_hlc(bigint) FROM PUBLIC".to_string(),
    ] {
        assert!(
            found
                .iter()
                .any(|f| f.starts_with("warning: ") && f.ends_with(&revoke)),
            "no warning ending in {revoke}: {found:#?}"
        );
    }
}

/// A local insert racing a local delete of the same key: the insert takes
/// its stamp, then waits in an application trigger while another session
/// deletes the key's old row (a tombstone stamped above the insert) and
/// commits. The insert must not commit below its own region's tombstone
/// (kept here, dropped by every other region): it fails as a serialization
/// failure, and its retry is stamped above the tombstone. Both sessions run
/// as an application role with nothing of pgrelay's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insert_racing_a_delete_of_its_key_never_commits_below_the_tombstone() {
    insert_racing_a_delete(pgrelay::setup::Stamp::Plpgsql).await;
}

/// The same race through the C triggers (the check's fast path in C).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insert_racing_a_delete_of_its_key_never_commits_below_the_tombstone_in_c() {
    if crate::support::pg::major() != 15 {
        eprintln!("SKIP: the pgrelay extension is built for PostgreSQL 15 here");
        return;
    }
    insert_racing_a_delete(pgrelay::setup::Stamp::C).await;
}

async fn insert_racing_a_delete(stamp: pgrelay::setup::Stamp) {
    let pg = Pg::start();
    app_region(&pg, stamp).await;
    // the application's own trigger, after pgrelay's stamp (name order);
    // and a column named like the check's own alias for the new rows
    pg.psql(
        "ALTER TABLE products ADD COLUMN n int;
         CREATE FUNCTION public.slow_insert() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_sleep(1); RETURN NEW; END $$;
         CREATE TRIGGER zz_set_updated_at BEFORE INSERT ON products
             FOR EACH ROW WHEN (NEW.name = 'slow') EXECUTE FUNCTION public.slow_insert();",
    );
    let t1 = app_client(&pg).await;
    let t2 = app_client(&pg).await;
    t1.batch_execute("INSERT INTO products (id, name) VALUES (1, 'first')")
        .await
        .unwrap();
    let insert = tokio::spawn(async move {
        let r = t1
            .query_one(
                "INSERT INTO products (id, name) VALUES (1, 'slow') RETURNING _pgrelay_hlc",
                &[],
            )
            .await
            .map(|r| r.get::<_, i64>(0));
        (t1, r)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    t2.batch_execute("DELETE FROM products WHERE id = 1")
        .await
        .unwrap();
    let (t1, inserted) = insert.await.unwrap();
    let su = pg.client().await;
    let tombstone: i64 = su
        .query_one(
            "SELECT hlc FROM pgrelay.tombstones WHERE table_name = 'public.products' \
             AND pk = '{\"id\": \"1\"}'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    match inserted {
        Ok(stamp) => assert!(
            stamp > tombstone,
            "the insert committed at {} below its own region's tombstone {}",
            pgrelay::hlc::Hlc::new(stamp as u64).readable(),
            pgrelay::hlc::Hlc::new(tombstone as u64).readable()
        ),
        Err(e) => assert_eq!(
            e.as_db_error().map(|e| e.code().code()),
            Some("40001"),
            "the racing insert failed otherwise: {e}"
        ),
    }
    // the application retries: stamped above the delete
    let stamp: i64 = t1
        .query_one(
            "INSERT INTO products (id, name) VALUES (1, 'again') \
             ON CONFLICT (id) DO UPDATE SET name = excluded.name RETURNING _pgrelay_hlc",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(stamp > tombstone);
    let below: i64 = su
        .query_one(
            "SELECT count(*) FROM products p JOIN pgrelay.tombstones t \
             ON t.table_name = 'public.products' AND t.pk = jsonb_build_object('id', p.id::text) \
             WHERE t.hlc >= p._pgrelay_hlc",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(below, 0, "a row is kept below its own tombstone");
}

/// A password holding a backslash, a quote and a space, given as the
/// example config does (`password=${VAR}` in a `key=value` DSN, and in a
/// URL): both the SQL session and the replication connection log in.
#[test]
fn dsn_passwords_with_backslash_quote_and_space_log_in_on_both_connection_kinds() {
    let pg = Pg::start();
    pg.psql(SCHEMA);
    let broker = Broker::start();
    let text = config(&pg.dsn(), &broker.brokers());
    let (ok, out) = setup(&ConfigFile::new(&text), "us");
    assert!(ok, "{out}");
    // standard_conforming_strings: the password is  a\b'c d
    let password = "a\\b'c d";
    pg.psql(&format!("ALTER ROLE {RUN_ROLE} PASSWORD 'a\\b''c d'"));
    let run_password = format!("user={RUN_ROLE} password={PASSWORD} ");
    assert!(text.contains(&run_password), "{text}");
    let key_value = text.replacen(
        &run_password,
        &format!("user={RUN_ROLE} password=${{PGRELAY_TEST_RUN_PASSWORD}} "),
        1,
    );
    let url = key_value.replacen(
        &format!(
            "dsn = \"host=127.0.0.1 port={} user={RUN_ROLE} password=${{PGRELAY_TEST_RUN_PASSWORD}} ",
            pg.port
        ),
        &format!(
            "dsn = \"postgres://{RUN_ROLE}:${{PGRELAY_TEST_RUN_PASSWORD}}@127.0.0.1:{}/postgres?",
            pg.port
        ),
        1,
    );
    assert_ne!(url, key_value, "{key_value}");
    // the rest of the URL's line: `dbname=postgres connect_timeout=5"`
    let url = url.replacen(
        "?dbname=postgres connect_timeout=5\"",
        "?connect_timeout=5\"",
        1,
    );
    for (form, text) in [("key=value", key_value), ("URL", url)] {
        let cfg = ConfigFile::new(&text);
        let out = std::process::Command::new(relay::bin())
            .args([
                "check",
                "--config",
                cfg.path.to_str().unwrap(),
                "--region",
                "us",
            ])
            .env("PGRELAY_TEST_RUN_PASSWORD", password)
            .env("PGRELAY_LOG", "warn")
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.contains("region us: database connection NOT encrypted"),
            "{form}: {out}"
        );
        assert!(
            out.contains("region us: replication connection NOT encrypted"),
            "{form}: {out}"
        );
        assert!(
            !out.contains("password authentication failed"),
            "{form}: {out}"
        );
    }
}

/// As the setup role of docs/security.md (no superuser), `setup` cannot create the
/// `pgrelay` extension and falls back to the PL/pgSQL stamp trigger;
/// `check` then gives the superuser's one-time step, and after it `setup`
/// does switch to the C trigger.
#[test]
fn check_gives_the_superuser_step_when_the_setup_role_cannot_create_the_extension() {
    if crate::support::pg::major() != 15 {
        // the extension is built for the PostgreSQL 15 packages only
        return;
    }
    let pg = Pg::start();
    pg.psql(SCHEMA);
    pg.psql(&format!(
        "CREATE ROLE relay_setup LOGIN REPLICATION PASSWORD 'relay-secret';
         GRANT CREATE ON DATABASE postgres TO relay_setup;
         ALTER TABLE users OWNER TO relay_setup;
         ALTER TABLE products OWNER TO relay_setup;
         ALTER TABLE currencies OWNER TO relay_setup;
         ALTER TABLE orders OWNER TO relay_setup;
         GRANT EXECUTE ON FUNCTION pg_replication_origin_create(text) TO relay_setup;
         GRANT SET ON PARAMETER session_replication_role TO {RUN_ROLE};
         GRANT EXECUTE ON FUNCTION pg_replication_origin_session_setup(text) TO {RUN_ROLE};"
    ));
    let broker = Broker::start();
    let text = config(&pg.dsn(), &broker.brokers());
    let setup_line = text
        .lines()
        .find(|l| l.starts_with("setup_dsn"))
        .unwrap()
        .to_string();
    let text = text.replace(
        &setup_line,
        &setup_line.replace("user=postgres ", "user=relay_setup "),
    );
    let cfg = ConfigFile::new(&text);
    let (ok, out) = setup(&cfg, "us");
    assert!(ok, "{out}");
    assert!(out.contains("creating extension pgrelay failed"), "{out}");
    let (ok, out) = check(&cfg, Some("us"));
    assert!(ok, "{out}");
    let stamp = out
        .lines()
        .find(|l| l.contains("stamp trigger"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(stamp.contains("stamp trigger in PL/pgSQL"), "{stamp}");
    assert!(stamp.contains("takes a superuser"), "{stamp}");
    let step = stamp
        .split('`')
        .nth(1)
        .unwrap_or_else(|| panic!("no statement in: {stamp}"));
    assert!(step.contains("CREATE EXTENSION"), "{stamp}");
    // the superuser's step, then setup: the C trigger
    pg.psql(step);
    let (ok, out) = setup(&cfg, "us");
    assert!(ok, "{out}");
    let (ok, out) = check(&cfg, Some("us"));
    assert!(ok, "{out}");
    assert!(
        out.contains("stamp trigger in C (extension pgrelay)"),
        "{out}"
    );
    // and it stamps
    assert_eq!(
        pg.psql(
            "INSERT INTO products (id, name, price) VALUES (1, 'c', 1) RETURNING _pgrelay_hlc > 0"
        )
        .trim(),
        "t"
    );
}

/// Clients that trickle their request heads in cannot hold the HTTP
/// endpoint's connection slots against the probes: with every slot taken
/// by them, `/healthz` and `/readyz` are still answered at once.
#[test]
fn trickling_clients_do_not_keep_the_probes_from_an_answer() {
    let http_port = free_port();
    // nothing to reach: the sidecar retries its start (relay.startup_timeout,
    // 30 s) and serves the probes meanwhile
    let text = config(
        "host=127.0.0.1 port=1 user=postgres dbname=postgres connect_timeout=1",
        "127.0.0.1:1",
    )
    .replace(
        "[kafka]\n",
        &format!("[http]\nlisten = \"127.0.0.1:{http_port}\"\n\n[kafka]\n"),
    );
    let cfg = ConfigFile::new(&text);
    let relay = Relay::spawn(&cfg, "us", "all");
    // positive sign: the endpoint answers
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !get(http_port, "GET /healthz HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200 ") {
        assert!(std::time::Instant::now() < deadline, "{}", relay.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    // 64 clients (every slot) send their heads a byte at a time
    let mut slow: Vec<std::net::TcpStream> = (0..64)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", http_port)).unwrap();
            s.write_all(b"G").unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    for round in 0..3 {
        for s in &mut slow {
            let _ = s.write_all(b"E");
        }
        for path in ["/healthz", "/readyz"] {
            let started = std::time::Instant::now();
            let mut s = std::net::TcpStream::connect(("127.0.0.1", http_port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes())
                .unwrap();
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            assert!(
                out.starts_with("HTTP/1.1 200 ") || out.starts_with("HTTP/1.1 503 "),
                "round {round}: {path} not answered within 1 s (after {:?}): {out:?}",
                started.elapsed()
            );
        }
        // a new wave of slow clients
        for s in slow.iter_mut().take(8) {
            *s = std::net::TcpStream::connect(("127.0.0.1", http_port)).unwrap();
            let _ = s.write_all(b"G");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
