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

/// The `/metrics` text a sidecar serves on `port` (empty if it does not
/// answer).
pub fn metrics_text(port: u16) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

pub use tempfile::TempDir;

/// A fresh directory under the system temp dir (`{prefix}-…`), removed on
/// drop.
pub fn temp_dir(prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(&format!("{prefix}-"))
        .tempdir()
        .expect("create a temp dir")
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
