//! A Kafka-protocol broker (Tansu) on a free port.
//!
//! `scripts/install-deps.sh` puts the in-memory build in `.tools/bin/tansu`
//! (`.tools` links to `$PGRELAY_TOOLS`, default /opt/pgrelay-tools)
//! and, for durable storage (restart tests), a build with the libsql engine
//! in `.tools/tansu-libsql/bin/tansu`. `PGRELAY_TANSU` and
//! `PGRELAY_TANSU_DURABLE` override the paths.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::proxy::Proxy;
use super::{free_port, repo_root, temp_dir, TempDir};

pub struct Broker {
    pub port: u16,
    advertised: u16,
    durable: bool,
    child: Mutex<Option<Child>>,
    /// Bytes of `broker.log` written before the running process started.
    log_start: Mutex<usize>,
    dir: TempDir,
}

pub fn tansu_bin() -> PathBuf {
    if let Ok(p) = std::env::var("PGRELAY_TANSU") {
        return PathBuf::from(p);
    }
    let p = repo_root().join(".tools/bin/tansu");
    assert!(
        p.exists(),
        "broker binary {} is missing: run scripts/install-deps.sh",
        p.display()
    );
    p
}

pub fn durable_tansu_bin() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("PGRELAY_TANSU_DURABLE") {
        return Some(PathBuf::from(p));
    }
    let p = repo_root().join(".tools/tansu-libsql/bin/tansu");
    p.exists().then_some(p)
}

impl Broker {
    /// An in-memory broker.
    pub fn start() -> Broker {
        let port = free_port();
        Broker::launch(port, port, false)
    }

    /// A broker whose clients all go through a proxy (it advertises the
    /// proxy's address), so the proxy can cut or slow its links.
    pub fn behind_proxy(durable: bool) -> (Broker, Proxy) {
        let port = free_port();
        let proxy = Proxy::start(port);
        let broker = Broker::launch(port, proxy.port, durable);
        (broker, proxy)
    }

    /// A broker that tells clients to use `advertised` (a TLS proxy in
    /// front of it, say).
    pub fn advertising(advertised: u16) -> Broker {
        Broker::launch(free_port(), advertised, false)
    }

    fn launch(port: u16, advertised: u16, durable: bool) -> Broker {
        let b = Broker {
            port,
            advertised,
            durable,
            child: Mutex::new(None),
            log_start: Mutex::new(0),
            dir: temp_dir("pgrelay-broker"),
        };
        b.spawn();
        b
    }

    fn spawn(&self) {
        let bin = if self.durable {
            durable_tansu_bin().expect("durable broker build missing: run scripts/install-deps.sh")
        } else {
            tansu_bin()
        };
        let listen = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = format!("tcp://127.0.0.1:{}", self.advertised);
        let storage = if self.durable {
            "sqlite://broker.db".to_string()
        } else {
            "memory://tansu/".to_string()
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("broker.log"))
            .unwrap();
        *self.log_start.lock().unwrap() = log.metadata().map(|m| m.len() as usize).unwrap_or(0);
        let mut child = Command::new(bin)
            .arg("broker")
            .args([
                "--listener-url",
                &listen,
                "--advertised-listener-url",
                &advertised,
            ])
            .args(["--storage-engine", &storage])
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start tansu");
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(15) {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                *self.child.lock().unwrap() = Some(child);
                return;
            }
            if let Ok(Some(st)) = child.try_wait() {
                let log =
                    std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default();
                panic!("broker exited at start: {st}\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("broker did not listen on {} within 15 s", self.port);
    }

    /// Whether the broker answers on its port, and the end of its log: what
    /// a test prints when a client cannot reach it.
    pub fn diagnose(&self) -> String {
        let listening = std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok();
        let log = std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        format!(
            "broker on port {} {} (durable: {}); the end of its log:\n{}",
            self.port,
            if listening {
                "accepts connections"
            } else {
                "does NOT accept connections"
            },
            self.durable,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }

    pub fn durable(&self) -> bool {
        self.durable
    }

    /// The address clients use.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.advertised)
    }

    pub fn stop(&self) {
        if let Some(mut c) = self.child.lock().unwrap().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// kill -9 and start again on the same port and storage.
    pub fn restart(&self) {
        self.stop();
        self.spawn();
    }

    /// The running process's storage task panicked (Tansu's libsql engine
    /// does so on some idempotent produce requests after client retries):
    /// the broker still accepts connections but answers nothing more. The
    /// panic, if so.
    pub fn storage_panic(&self) -> Option<String> {
        let log = std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default();
        let start = (*self.log_start.lock().unwrap()).min(log.len());
        let since = log.get(start..).unwrap_or_default();
        let at = since.find("panicked at")?;
        let before: Vec<&str> = since[..at].lines().rev().take(12).collect();
        Some(format!(
            "{}\n  after:\n{}",
            since[at..].lines().take(2).collect::<Vec<_>>().join(" "),
            before
                .into_iter()
                .rev()
                .map(|l| &l[..l.len().min(600)])
                .collect::<Vec<_>>()
                .join("\n")
        ))
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}
