//! The sidecar's HTTP endpoint: `/metrics` (Prometheus), `/healthz`
//! (the process is serving), `/readyz` (every side it runs is streaming).
//!
//! A deliberately tiny HTTP/1.1 responder: three GET routes, one response
//! per connection, no request bodies.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::Metrics;

/// Readiness flags, one per running side.
#[derive(Default)]
pub struct Readiness {
    pub capture: AtomicBool,
    pub apply: AtomicBool,
    pub wants_capture: AtomicBool,
    pub wants_apply: AtomicBool,
}

impl Readiness {
    pub fn ready(&self) -> bool {
        (!self.wants_capture.load(Ordering::Relaxed) || self.capture.load(Ordering::Relaxed))
            && (!self.wants_apply.load(Ordering::Relaxed) || self.apply.load(Ordering::Relaxed))
    }
}

/// Serves until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (mut stream, _) = tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "http accept failed");
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        let readiness = readiness.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            let mut len = 0;
            while len < buf.len() {
                match tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    stream.read(&mut buf[len..]),
                )
                .await
                {
                    Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                    Ok(Ok(n)) => len += n,
                }
                if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let request = String::from_utf8_lossy(&buf[..len]);
            let path = request.split_whitespace().nth(1).unwrap_or("/");
            let (status, content_type, body) = route(path, &metrics, &readiness);
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

fn route(
    path: &str,
    metrics: &Metrics,
    readiness: &Readiness,
) -> (&'static str, &'static str, String) {
    match path {
        "/metrics" => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
        "/healthz" => ("200 OK", "text/plain", "ok\n".into()),
        "/readyz" if readiness.ready() => ("200 OK", "text/plain", "ready\n".into()),
        "/readyz" => (
            "503 Service Unavailable",
            "text/plain",
            "not ready\n".into(),
        ),
        _ => ("404 Not Found", "text/plain", "not found\n".into()),
    }
}
