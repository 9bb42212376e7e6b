//! TLS everywhere: PostgreSQL with `ssl = on` and certificates made by the
//! test, both connection kinds (SQL and replication) under libpq's
//! `sslmode` rules; passwords never sent in clear; Kafka through a
//! TLS-terminating proxy, with and without client certificates.

use std::time::Duration;

use crate::capture::{config, SCHEMA};
use crate::support::broker::Broker;
use crate::support::certs::{Ca, Issued};
use crate::support::kafka::read_all_with;
use crate::support::pg::{Pg, PgOptions, PASSWORD, RUN_ROLE};
use crate::support::relay::{self, ConfigFile, Relay};
use crate::support::tls_proxy::TlsProxy;
use crate::support::{eventually, free_port};

/// A cluster with `ssl = on` serving `server`; `hba` replaces its TCP rules.
fn tls_pg(ca: &Ca, server: &Issued, hba: Option<&str>) -> Pg {
    let q = |p: &std::path::Path| format!("'{}'", p.display());
    let pg = Pg::start_with(PgOptions {
        extra: vec![
            ("ssl".into(), "on".into()),
            ("ssl_cert_file".into(), q(&server.cert)),
            ("ssl_key_file".into(), q(&server.key)),
            ("ssl_ca_file".into(), q(&ca.cert)),
        ],
        hba: hba.map(str::to_string),
        ..Default::default()
    });
    pg.psql(SCHEMA);
    pg
}

fn dsn(pg: &Pg, host: &str, extra: &str) -> String {
    format!(
        "host={host} port={} user=postgres password={PASSWORD} dbname=postgres connect_timeout=5 {extra}",
        pg.port
    )
}

/// `pgrelay check --region us`: success and everything it printed.
fn check(cfg: &ConfigFile) -> (bool, String) {
    let out = relay::cmd(&[
        "check",
        "--config",
        cfg.path.to_str().unwrap(),
        "--region",
        "us",
    ]);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn setup(cfg: &ConfigFile) {
    relay::ok(&[
        "setup",
        "--config",
        cfg.path.to_str().unwrap(),
        "--region",
        "us",
    ]);
}

/// pgrelay's sessions as the server sees them: `backend_type:ssl:client_dn`.
fn pgrelay_sessions(pg: &Pg) -> Vec<String> {
    pg.psql(
        "SELECT a.backend_type || ':' || s.ssl || ':' || coalesce(s.client_dn, '') \
         FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.application_name LIKE 'pgrelay%' ORDER BY 1",
    )
    .lines()
    .map(str::to_string)
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_with_client_certificate_encrypts_sql_and_replication_sessions() {
    if crate::support::pg::skip_without_tls(
        "verify_full_with_client_certificate_encrypts_sql_and_replication_sessions",
    ) {
        return;
    }
    let ca = Ca::new("pgrelay test CA");
    let server = ca.server("server", &["localhost"], &["127.0.0.1"]);
    let client = ca.client("client", "postgres");
    // clientcert=verify-full: the sidecar's run role needs its own certificate
    let run_client = ca.client("run-client", RUN_ROLE);
    // TLS only, a client certificate and the password both required
    let pg = tls_pg(
        &ca,
        &server,
        Some(
            "hostssl all all 127.0.0.1/32 scram-sha-256 clientcert=verify-full\n\
             hostssl replication all 127.0.0.1/32 scram-sha-256 clientcert=verify-full",
        ),
    );
    let broker = Broker::start();
    // channel_binding=require: SCRAM-SHA-256-PLUS on both connection kinds
    let dsn = dsn(
        &pg,
        "127.0.0.1",
        &format!(
            "sslmode=verify-full sslrootcert={} sslcert={} sslkey={} channel_binding=require",
            ca.cert.display(),
            client.cert.display(),
            client.key.display()
        ),
    );
    // the run role's dsn comes first: give it the run role's certificate
    let text = config(&dsn, &broker.brokers())
        .replacen(
            &client.cert.display().to_string(),
            &run_client.cert.display().to_string(),
            1,
        )
        .replacen(
            &client.key.display().to_string(),
            &run_client.key.display().to_string(),
            1,
        );
    let cfg = ConfigFile::new(&text);
    setup(&cfg);
    let (ok, out) = check(&cfg);
    assert!(ok, "{out}");
    assert!(
        out.contains("region us: database connection encrypted (TLSv1.3)"),
        "{out}"
    );
    assert!(
        out.contains("region us: replication connection encrypted (TLSv1.3)"),
        "{out}"
    );

    let relay = Relay::spawn(&cfg, "us", "capture");
    pg.psql("INSERT INTO products VALUES (1, 'tls', 1.5, 'd')");
    let sessions = eventually(
        Duration::from_secs(30),
        "the capture side's walsender",
        || async {
            let s = pgrelay_sessions(&pg);
            s.iter().any(|l| l.starts_with("walsender:")).then_some(s)
        },
    )
    .await;
    for s in &sessions {
        assert!(
            s.contains(":true:") && s.ends_with(&format!("CN={RUN_ROLE}")),
            "a pgrelay session is not encrypted with the client certificate: {sessions:?}"
        );
    }
    let records =
        crate::support::kafka::read_all(&broker.brokers(), "pgrelay.us.eu", Duration::from_secs(2));
    assert_eq!(records.len(), 1, "{}", relay.log_text());
}

#[test]
fn prefer_ends_up_encrypted_against_a_tls_server() {
    if crate::support::pg::skip_without_tls("prefer_ends_up_encrypted_against_a_tls_server") {
        return;
    }
    let ca = Ca::new("pgrelay test CA");
    let server = ca.server("server", &["localhost"], &["127.0.0.1"]);
    let pg = tls_pg(&ca, &server, None);
    let broker = Broker::start();
    // no sslmode: libpq's default, prefer
    let cfg = ConfigFile::new(&config(&dsn(&pg, "127.0.0.1", ""), &broker.brokers()));
    setup(&cfg);
    let (ok, out) = check(&cfg);
    assert!(ok, "{out}");
    assert!(
        out.contains("region us: database connection encrypted"),
        "{out}"
    );
    assert!(
        out.contains("region us: replication connection encrypted"),
        "{out}"
    );
}

#[test]
fn tls_failures_name_the_database_and_the_reason() {
    if crate::support::pg::skip_without_tls("tls_failures_name_the_database_and_the_reason") {
        return;
    }
    let ca = Ca::new("pgrelay test CA");
    // issued for localhost only
    let server = ca.server("server", &["localhost"], &[]);
    let pg = tls_pg(&ca, &server, None);
    let broker = Broker::start();
    let root = format!("sslrootcert={}", ca.cert.display());
    let target = format!("127.0.0.1:{}", pg.port);

    let run = |host: &str, tls: &str| {
        let cfg = ConfigFile::new(&config(&dsn(&pg, host, tls), &broker.brokers()));
        check(&cfg)
    };

    // the name the certificate was issued for passes; verify-ca does not
    // look at the name
    let (_, out) = run("localhost", &format!("sslmode=verify-full {root}"));
    assert!(out.contains("database connection encrypted"), "{out}");
    assert!(out.contains("replication connection encrypted"), "{out}");
    let (_, out) = run("127.0.0.1", &format!("sslmode=verify-ca {root}"));
    assert!(out.contains("database connection encrypted"), "{out}");
    assert!(out.contains("replication connection encrypted"), "{out}");

    // a host name the certificate does not name
    let (ok, out) = run("127.0.0.1", &format!("sslmode=verify-full {root}"));
    assert!(!ok, "{out}");
    let lower = out.to_lowercase();
    assert!(
        out.contains(&format!(
            "cannot connect to the us database ({target}/postgres)"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("region us: replication connection to {target}")),
        "{out}"
    );
    // OpenSSL says "IP address mismatch" for an address, "hostname
    // mismatch" for a name
    assert_eq!(lower.matches("address mismatch").count(), 2, "{out}");
    assert_eq!(
        lower.matches("certificate verify failed").count(),
        2,
        "{out}"
    );

    // a CA that did not issue the server's certificate
    let other = Ca::new("another CA");
    let (ok, out) = run(
        "localhost",
        &format!("sslmode=verify-full sslrootcert={}", other.cert.display()),
    );
    assert!(!ok, "{out}");
    let lower = out.to_lowercase();
    assert_eq!(
        lower.matches("certificate verify failed").count(),
        2,
        "{out}"
    );

    // require against a server without TLS
    let plain = Pg::start();
    plain.psql(SCHEMA);
    let cfg = ConfigFile::new(&config(
        &dsn(&plain, "127.0.0.1", "sslmode=require"),
        &broker.brokers(),
    ));
    let (ok, out) = check(&cfg);
    assert!(!ok, "{out}");
    assert_eq!(out.matches("does not support TLS").count(), 2, "{out}");
    assert!(
        out.contains(&format!(
            "cannot connect to the us database (127.0.0.1:{}/postgres)",
            plain.port
        )),
        "{out}"
    );
}

/// A server without TLS that asks for the password with `method`.
fn plaintext_password_server(method: &str) -> Pg {
    let pg = Pg::start_with(PgOptions {
        hba: Some(format!(
            "host all all 127.0.0.1/32 {method}\nhost replication all 127.0.0.1/32 {method}"
        )),
        ..Default::default()
    });
    pg.psql(SCHEMA);
    if method == "md5" {
        pg.psql(&format!(
            "SET password_encryption = 'md5'; ALTER ROLE postgres PASSWORD '{PASSWORD}'; \
             ALTER ROLE {RUN_ROLE} PASSWORD '{PASSWORD}'"
        ));
    }
    pg
}

#[test]
fn no_password_in_clear_over_plaintext_unless_sslmode_disable() {
    let broker = Broker::start();
    for (method, shown) in [("password", "cleartext"), ("md5", "MD5")] {
        let pg = plaintext_password_server(method);
        for mode in ["", "sslmode=prefer", "sslmode=allow"] {
            let cfg = ConfigFile::new(&config(&dsn(&pg, "127.0.0.1", mode), &broker.brokers()));
            let (ok, out) = check(&cfg);
            assert!(!ok, "{method} {mode}: {out}");
            let refusal =
                format!("the server asks for a {shown} password over an unencrypted connection");
            assert_eq!(out.matches(&refusal).count(), 2, "{method} {mode}: {out}");
            assert!(out.contains("sslmode=disable"), "{out}");
            assert!(
                out.contains(&format!("127.0.0.1:{}", pg.port)),
                "the message names the host: {out}"
            );
        }
        let cfg = ConfigFile::new(&config(
            &dsn(&pg, "127.0.0.1", "sslmode=disable"),
            &broker.brokers(),
        ));
        setup(&cfg);
        let (ok, out) = check(&cfg);
        assert!(ok, "{method}: {out}");
        assert!(
            out.contains("region us: database connection NOT encrypted"),
            "{out}"
        );
        assert!(
            out.contains("region us: replication connection NOT encrypted"),
            "{out}"
        );
    }
}

#[test]
fn wrong_password_names_the_server_reason() {
    let pg = Pg::start();
    let broker = Broker::start();
    let text = dsn(&pg, "127.0.0.1", "").replace(PASSWORD, "wrong");
    let cfg = ConfigFile::new(&config(&text, &broker.brokers()));
    let (ok, out) = check(&cfg);
    assert!(!ok, "{out}");
    assert_eq!(
        out.matches(&format!(
            "password authentication failed for user \"{RUN_ROLE}\""
        ))
        .count(),
        2,
        "{out}"
    );
    assert!(out.contains("28P01"), "{out}");
}

/// A broker behind a TLS proxy: (broker, proxy).
fn kafka_behind_tls(server: &Issued, client_ca: Option<&std::path::Path>) -> (Broker, TlsProxy) {
    let port = free_port();
    let broker = Broker::advertising(port);
    let proxy = TlsProxy::start(port, broker.port, server, client_ca);
    (broker, proxy)
}

fn with_kafka_properties(toml: &str, properties: &[(&str, String)]) -> String {
    let mut section = String::from("\n[kafka.properties]\n");
    for (k, v) in properties {
        section.push_str(&format!("\"{k}\" = \"{v}\"\n"));
    }
    toml.replacen("\n[regions.us]", &format!("{section}\n[regions.us]"), 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_over_tls_verifies_the_broker_end_to_end() {
    let ca = Ca::new("pgrelay test CA");
    let server = ca.server("kafka", &["localhost"], &["127.0.0.1"]);
    let (_broker, proxy) = kafka_behind_tls(&server, None);
    let pg = Pg::start();
    pg.psql(SCHEMA);
    let ca_path = ca.cert.display().to_string();
    let props = [
        ("security.protocol", "ssl".to_string()),
        ("ssl.ca.location", ca_path.clone()),
    ];
    let cfg = ConfigFile::new(&with_kafka_properties(
        &config(&pg.dsn(), &proxy.addr()),
        &props,
    ));
    setup(&cfg);
    let relay = Relay::spawn(&cfg, "us", "capture");
    pg.psql("INSERT INTO products VALUES (7, 'over tls', 2.5, 'd')");
    let brokers = proxy.addr();
    let records = tokio::task::spawn_blocking(move || {
        read_all_with(
            &brokers,
            &[("security.protocol", "ssl"), ("ssl.ca.location", &ca_path)],
            "pgrelay.us.eu",
            Duration::from_secs(2),
        )
    })
    .await
    .unwrap();
    assert_eq!(records.len(), 1, "{}", relay.log_text());
    assert_eq!(records[0].value["after"]["name"], "over tls");

    // a CA that did not issue the broker's certificate
    let other = Ca::new("another CA");
    let cfg = ConfigFile::new(&with_kafka_properties(
        &config(&pg.dsn(), &proxy.addr()),
        &[
            ("security.protocol", "ssl".to_string()),
            ("ssl.ca.location", other.cert.display().to_string()),
        ],
    ));
    let (ok, out) = check(&cfg);
    assert!(!ok, "{out}");
    assert!(out.contains("certificate verify failed"), "{out}");
    assert!(out.contains(&proxy.addr()), "{out}");
}

#[test]
fn kafka_client_certificate_is_used_and_required() {
    let ca = Ca::new("pgrelay test CA");
    let server = ca.server("kafka", &["localhost"], &["127.0.0.1"]);
    let client = ca.client("relay", "pgrelay");
    let (_broker, proxy) = kafka_behind_tls(&server, Some(&ca.cert));
    let pg = Pg::start();
    pg.psql(SCHEMA);
    let base = [
        ("security.protocol", "ssl".to_string()),
        ("ssl.ca.location", ca.cert.display().to_string()),
    ];

    let cfg = ConfigFile::new(&with_kafka_properties(
        &config(&pg.dsn(), &proxy.addr()),
        &base,
    ));
    let (ok, out) = check(&cfg);
    assert!(!ok, "a broker that wants a client certificate: {out}");
    assert!(out.contains("last broker error"), "{out}");

    let mut props = base.to_vec();
    props.push((
        "ssl.certificate.location",
        client.cert.display().to_string(),
    ));
    props.push(("ssl.key.location", client.key.display().to_string()));
    let cfg = ConfigFile::new(&with_kafka_properties(
        &config(&pg.dsn(), &proxy.addr()),
        &props,
    ));
    setup(&cfg);
    let (ok, out) = check(&cfg);
    assert!(ok, "{out}");
    assert!(out.contains("topic pgrelay.us.eu ok"), "{out}");
}

/// `channel_binding=require` refuses a server that authenticates without
/// it (trust, or a password over TLS) on both connection kinds, as libpq
/// does with `replication=database`.
#[test]
fn channel_binding_require_refuses_trust_and_passwords_on_both_connection_kinds() {
    if crate::support::pg::skip_without_tls(
        "channel_binding_require_refuses_trust_and_passwords_on_both_connection_kinds",
    ) {
        return;
    }
    let ca = Ca::new("pgrelay test CA");
    let server = ca.server("server", &["localhost"], &["127.0.0.1"]);
    let broker = Broker::start();
    for method in ["trust", "password"] {
        let pg = tls_pg(
            &ca,
            &server,
            Some(&format!(
                "hostssl all all 127.0.0.1/32 {method}\n\
                 hostssl replication all 127.0.0.1/32 {method}"
            )),
        );
        // without the requirement both kinds connect, encrypted
        let cfg = ConfigFile::new(&config(
            &dsn(&pg, "127.0.0.1", "sslmode=require"),
            &broker.brokers(),
        ));
        let (_, out) = check(&cfg);
        assert!(
            out.contains("region us: database connection encrypted"),
            "{method}: {out}"
        );
        assert!(
            out.contains("region us: replication connection encrypted"),
            "{method}: {out}"
        );
        let cfg = ConfigFile::new(&config(
            &dsn(&pg, "127.0.0.1", "sslmode=require channel_binding=require"),
            &broker.brokers(),
        ));
        let (ok, out) = check(&cfg);
        assert!(!ok, "{method}: {out}");
        assert!(!out.contains("connection encrypted"), "{method}: {out}");
        assert!(
            out.lines()
                .any(|l| l.contains("replication connection")
                    && l.contains("channel_binding=require")),
            "{method}: {out}"
        );
    }
}
