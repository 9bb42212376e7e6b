//! A TCP proxy on loopback that can add one-way latency and cut the link,
//! standing in for the network between regions.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

pub struct Proxy {
    pub port: u16,
    down: Arc<AtomicBool>,
    delay_ms: Arc<AtomicU64>,
    cut: watch::Sender<u64>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Proxy {
    /// Forwards 127.0.0.1:{port} to `target_port`, on its own runtime (so it
    /// keeps working whatever the test's runtime does).
    pub fn start(target_port: u16) -> Proxy {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        std_listener.set_nonblocking(true).unwrap();
        let port = std_listener.local_addr().unwrap().port();
        let down = Arc::new(AtomicBool::new(false));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let (cut, cut_rx) = watch::channel(0u64);
        let (d, l) = (down.clone(), delay_ms.clone());
        runtime.spawn(async move {
            let listener = TcpListener::from_std(std_listener).expect("proxy listener");
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                if d.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let (l, cut_rx) = (l.clone(), cut_rx.clone());
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(("127.0.0.1", target_port)).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    let a = tokio::spawn(pipe(ri, wo, l.clone(), cut_rx.clone()));
                    let b = tokio::spawn(pipe(ro, wi, l, cut_rx));
                    let _ = tokio::join!(a, b);
                });
            }
        });
        Proxy {
            port,
            down,
            delay_ms,
            cut,
            runtime: Some(runtime),
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Cuts every connection and refuses new ones until `restore`.
    pub fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.cut.send_modify(|g| *g += 1);
    }

    pub fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }

    /// Adds this much delay to each direction (round trip = 2×).
    pub fn set_one_way_delay(&self, d: Duration) {
        self.delay_ms.store(d.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Copies one direction through a delay line: each chunk is written
/// `delay` after it was read, without limiting throughput.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay_ms: Arc<AtomicU64>,
    mut cut: watch::Receiver<u64>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let generation = *cut.borrow();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            changed = cut.changed() => {
                if changed.is_err() || *cut.borrow() != generation {
                    writer.abort();
                    return;
                }
            }
            n = from.read(&mut buf) => {
                let n = match n { Ok(0) | Err(_) => break, Ok(n) => n };
                let at = tokio::time::Instant::now() + Duration::from_millis(delay_ms.load(Ordering::Relaxed));
                if tx.send((at, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}
