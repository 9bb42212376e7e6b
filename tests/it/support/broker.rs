//! A Kafka-protocol broker (Tansu, in-memory storage) on a free port.
//! `scripts/install-deps.sh` puts the binary in `.tools/bin/tansu`;
//! `PGRELAY_TANSU` overrides the path.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, repo_root, TempDir};

pub struct Broker {
    pub port: u16,
    child: Child,
    _dir: TempDir,
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

impl Broker {
    pub fn start() -> Broker {
        let dir = TempDir::new("pgrelay-broker");
        for _ in 0..5 {
            let port = free_port();
            let url = format!("tcp://127.0.0.1:{port}");
            let log = std::fs::File::create(dir.path().join("broker.log")).unwrap();
            let mut child = Command::new(tansu_bin())
                .arg("broker")
                .args(["--listener-url", &url, "--advertised-listener-url", &url])
                .args(["--storage-engine", "memory://tansu/"])
                .current_dir(dir.path())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start tansu");
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Broker {
                        port,
                        child,
                        _dir: dir,
                    };
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("broker did not start");
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
