//! Test support: throwaway PostgreSQL 15 clusters and a Kafka-protocol
//! broker on free ports, the `pgrelay` binary, and Kafka readers.

#![allow(dead_code)]

pub mod broker;
pub mod certs;
pub mod kafka;
pub mod pg;
pub mod proxy;
pub mod relay;
pub mod tls_proxy;

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A port nobody listens on right now (bound to port 0, then released).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let base = std::env::temp_dir();
        for i in 0..1000u32 {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos();
            let p = base.join(format!("{prefix}-{}-{nanos}-{i}", std::process::id()));
            if std::fs::create_dir(&p).is_ok() {
                return TempDir(p);
            }
        }
        panic!("cannot create a temp dir under {}", base.display());
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls `f` until it returns `Some` or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Root of the repository.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Waits until `sql` (one bigint, e.g. a count) returns `want` on `client`.
pub async fn until_count(client: &tokio_postgres::Client, sql: &str, want: i64, what: &str) {
    eventually(Duration::from_secs(60), what, || async {
        let n: i64 = client.query_one(sql, &[]).await.ok()?.get(0);
        (n == want).then_some(())
    })
    .await
}
