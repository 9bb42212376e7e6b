//! The sidecar's HTTP endpoint: `/metrics` (Prometheus), `/healthz`
//! (the process is serving), `/readyz` (every side it runs is streaming),
//! and a status page for people: `/` with its `/status.css` and
//! `/status.js` (embedded in the binary: no CDN, works offline), which draw
//! `/status.json` ([`crate::overview::Overview`]).
//!
//! A deliberately tiny HTTP/1.1 responder: a few GET routes, one response
//! per connection, no request bodies. It is built to face an untrusted
//! network without help: the request head must arrive within
//! [`Limits::request_timeout`] (a slow client is cut off, never waited on),
//! at most [`Limits::max_connections`] connections are served at once, and
//! when all are taken a new one takes the slot of the oldest still reading
//! its head (see [`serve`]), and with a token `/metrics` answers
//! 401 unless the request carries `Authorization: Bearer TOKEN`, and so does
//! `/status.json` (the page sends the token it finds in its URL's fragment,
//! `/#token=...`, which browsers never send to the server). `/healthz`,
//! `/readyz` and the page's static files stay open: they carry no secrets
//! and reveal nothing. The page's files are served with a content security
//! policy that lets them load only themselves and `/status.json`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch, Semaphore};

use crate::metrics::Metrics;

/// Readiness flags, one per running side. A side raises its own flag once
/// it streams (the capture side when `START_REPLICATION` has answered, the
/// apply side when every pipeline consumes) and its supervisor lowers it
/// when a run ends.
#[derive(Default)]
pub struct Readiness {
    pub capture: Arc<AtomicBool>,
    pub apply: Arc<AtomicBool>,
    pub wants_capture: AtomicBool,
    pub wants_apply: AtomicBool,
}

impl Readiness {
    pub fn ready(&self) -> bool {
        (!self.wants_capture.load(Ordering::Relaxed) || self.capture.load(Ordering::Relaxed))
            && (!self.wants_apply.load(Ordering::Relaxed) || self.apply.load(Ordering::Relaxed))
    }
}

/// Bounds on what one client can hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once; further ones wait to be accepted.
    pub max_connections: usize,
    /// Time for the whole request head to arrive, and again for the
    /// response to be written.
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 64,
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// The largest request head read; a longer one is answered 431.
const MAX_HEAD: usize = 4096;

/// What the routes serve.
pub struct State {
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    /// Bearer token `/metrics` and `/status.json` require, if any.
    pub token: Option<String>,
    /// The latest [`crate::overview::Overview`] as JSON; empty until the
    /// first collection.
    pub overview: watch::Receiver<String>,
}

const PAGE: &str = include_str!("assets/status.html");
const PAGE_CSS: &str = include_str!("assets/status.css");
const PAGE_JS: &str = include_str!("assets/status.js");

/// Headers of the page's files: nothing but themselves and `/status.json`.
const PAGE_HEADERS: &[&str] = &[
    "Content-Security-Policy: default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options: nosniff",
    "Referrer-Policy: no-referrer",
    "Cache-Control: no-cache",
];

/// The connections still reading their request head, oldest first: the
/// ones a new connection may take the slot of.
#[derive(Default)]
struct Reading {
    next: u64,
    waiting: std::collections::BTreeMap<u64, oneshot::Sender<()>>,
}

impl Reading {
    fn lock(this: &Mutex<Reading>) -> std::sync::MutexGuard<'_, Reading> {
        this.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Serves until `shutdown` turns true.
///
/// When every slot is taken, a new connection takes the slot of the oldest
/// one still sending its request head (which is closed without an answer):
/// clients that trickle their heads in cannot keep a probe, which sends its
/// head at once, from being answered. Connections already answered keep
/// their slots until their response is written.
pub async fn serve(
    listener: TcpListener,
    state: State,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    let state = Arc::new(state);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let reading = Arc::new(Mutex::new(Reading::default()));
    loop {
        let stream = tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "http accept failed");
                    // e.g. out of file descriptors: do not spin
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // every slot taken: free the oldest slow reader's, if any
                let oldest = Reading::lock(&reading).waiting.pop_first();
                if let Some((_, evict)) = oldest {
                    let _ = evict.send(());
                }
                tokio::select! {
                    _ = shutdown.changed() => return,
                    permit = slots.clone().acquire_owned() => match permit {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                }
            }
        };
        let (evict_tx, evict) = oneshot::channel();
        let id = {
            let mut r = Reading::lock(&reading);
            let id = r.next;
            r.next += 1;
            r.waiting.insert(id, evict_tx);
            id
        };
        let state = state.clone();
        let reading = reading.clone();
        tokio::spawn(async move {
            respond(stream, &state, limits.request_timeout, evict, || {
                Reading::lock(&reading).waiting.remove(&id);
            })
            .await;
            // (gone already unless the head never came)
            Reading::lock(&reading).waiting.remove(&id);
            drop(permit);
        });
    }
}

/// Answers one request. `evict` fires while the head is being read when a
/// new connection needs the slot; `head_read` is called once it has come.
async fn respond(
    mut stream: TcpStream,
    state: &State,
    timeout: Duration,
    evict: oneshot::Receiver<()>,
    head_read: impl FnOnce(),
) {
    let head = tokio::select! {
        // the slot went to a newer connection: drop this one without a word
        Ok(()) = evict => return,
        head = tokio::time::timeout(timeout, read_head(&mut stream)) => head,
    };
    head_read();
    let head = match head {
        Ok(Ok(head)) => head,
        Ok(Err(Oversized)) => {
            let response = render("431 Request Header Fields Too Large", "too large\n", &[]);
            let _ = tokio::time::timeout(timeout, async {
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
                // read what the client still sends, so that closing does
                // not reset the connection before it reads the answer
                let mut sink = [0u8; 1024];
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
            return;
        }
        // too slow: drop the connection without a word
        Err(_) => return,
    };
    let request = String::from_utf8_lossy(&head);
    let path = request.split_whitespace().nth(1).unwrap_or("/");
    let path = path.split('?').next().unwrap_or(path);
    let authorized = match &state.token {
        None => true,
        Some(token) => bearer(&request).is_some_and(|t| same(t.as_bytes(), token.as_bytes())),
    };
    let response = route(path, state, authorized);
    let _ = tokio::time::timeout(timeout, async {
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

struct Oversized;

/// Reads until the blank line ending the request head (or EOF).
async fn read_head(stream: &mut TcpStream) -> Result<Vec<u8>, Oversized> {
    let mut buf = vec![0u8; MAX_HEAD];
    let mut len = 0;
    loop {
        if len == buf.len() {
            return Err(Oversized);
        }
        match stream.read(&mut buf[len..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => len += n,
        }
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    buf.truncate(len);
    Ok(buf)
}

/// The token of an `Authorization: Bearer TOKEN` header.
fn bearer(request: &str) -> Option<&str> {
    request.lines().skip(1).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        if !name.trim().eq_ignore_ascii_case("authorization") {
            return None;
        }
        let value = value.trim();
        let (scheme, token) = value.split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then_some(token.trim())
    })
}

/// Compares without an early exit on the first differing byte.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn route(path: &str, state: &State, authorized: bool) -> String {
    match path {
        "/metrics" | "/status.json" if !authorized => render(
            "401 Unauthorized",
            "a bearer token is required\n",
            &["WWW-Authenticate: Bearer realm=\"pgrelay\""],
        ),
        "/metrics" => {
            let body = state.metrics.render();
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        }
        "/status.json" => {
            let body = state.overview.borrow().clone();
            if body.is_empty() {
                return render("503 Service Unavailable", "not collected yet\n", &[]);
            }
            render_as(
                "200 OK",
                "application/json",
                &body,
                &["Cache-Control: no-store", "X-Content-Type-Options: nosniff"],
            )
        }
        "/" => render_as("200 OK", "text/html; charset=utf-8", PAGE, PAGE_HEADERS),
        "/status.css" => render_as("200 OK", "text/css; charset=utf-8", PAGE_CSS, PAGE_HEADERS),
        "/status.js" => render_as(
            "200 OK",
            "text/javascript; charset=utf-8",
            PAGE_JS,
            PAGE_HEADERS,
        ),
        "/healthz" => render("200 OK", "ok\n", &[]),
        "/readyz" if state.readiness.ready() => render("200 OK", "ready\n", &[]),
        "/readyz" => render("503 Service Unavailable", "not ready\n", &[]),
        _ => render("404 Not Found", "not found\n", &[]),
    }
}

fn render(status: &str, body: &str, headers: &[&str]) -> String {
    render_as(status, "text/plain", body, headers)
}

fn render_as(status: &str, content_type: &str, body: &str, headers: &[&str]) -> String {
    let mut extra = String::new();
    for h in headers {
        extra.push_str(h);
        extra.push_str("\r\n");
    }
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn start(
        token: Option<&str>,
        limits: Limits,
    ) -> (std::net::SocketAddr, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        let (overview_tx, overview) = watch::channel(String::new());
        let state = State {
            metrics: Arc::new(Metrics::new()),
            readiness: Arc::new(Readiness::default()),
            token: token.map(str::to_string),
            overview,
        };
        tokio::spawn(serve(listener, state, limits, rx));
        // a collected view, as the sidecar's status loop publishes it; the
        // receiver keeps the last value once the sender is gone
        overview_tx.send_replace("{\"region\":\"eu\"}".to_string());
        (addr, tx)
    }

    async fn get(addr: std::net::SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await;
        out
    }

    #[tokio::test]
    async fn metrics_need_the_bearer_token_when_one_is_set() {
        let (addr, _stop) = start(Some("0123456789abcdef-token"), Limits::default()).await;
        let r = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 401 "), "{r}");
        assert!(r.contains("WWW-Authenticate: Bearer"), "{r}");
        let r = get(
            addr,
            "GET /metrics HTTP/1.1\r\nAuthorization: Bearer wrong-token-0123456\r\n\r\n",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 401 "), "{r}");
        let r = get(
            addr,
            "GET /metrics HTTP/1.1\r\nauthorization: bearer 0123456789abcdef-token\r\n\r\n",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
        assert!(r.contains("version=0.0.4"), "{r}");
        // probes stay open
        let r = get(addr, "GET /healthz HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
        let r = get(addr, "GET /readyz HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
    }

    #[tokio::test]
    async fn the_page_is_open_and_its_data_needs_the_token() {
        let (addr, _stop) = start(Some("0123456789abcdef-token"), Limits::default()).await;
        for (path, kind) in [
            ("/", "text/html"),
            ("/status.css", "text/css"),
            ("/status.js", "text/javascript"),
        ] {
            let r = get(addr, &format!("GET {path} HTTP/1.1\r\n\r\n")).await;
            assert!(r.starts_with("HTTP/1.1 200 "), "{path}: {r}");
            assert!(r.contains(&format!("Content-Type: {kind}")), "{path}: {r}");
            assert!(
                r.contains("Content-Security-Policy: default-src 'none'"),
                "{r}"
            );
            // nothing is loaded from elsewhere (the SVG namespace is a name)
            let body = r.split("\r\n\r\n").nth(1).unwrap();
            let body = body.replace("\"http://www.w3.org/2000/svg\"", "");
            assert!(
                !body.contains("http://") && !body.contains("https://"),
                "{path}"
            );
        }
        let r = get(addr, "GET /status.json HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 401 "), "{r}");
        let r = get(
            addr,
            "GET /status.json HTTP/1.1\r\nAuthorization: Bearer 0123456789abcdef-token\r\n\r\n",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
        assert!(r.contains("Content-Type: application/json"), "{r}");
        assert!(r.ends_with("{\"region\":\"eu\"}"), "{r}");
    }

    #[tokio::test]
    async fn without_a_token_metrics_are_open() {
        let (addr, _stop) = start(None, Limits::default()).await;
        let r = get(addr, "GET /metrics?x=1 HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
        let r = get(addr, "GET /nope HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 404 "), "{r}");
    }

    #[tokio::test]
    async fn slow_clients_are_cut_off_and_never_keep_a_probe_waiting() {
        let limits = Limits {
            max_connections: 2,
            request_timeout: Duration::from_millis(500),
        };
        let (addr, _stop) = start(None, limits).await;
        // two slow clients take every slot...
        let mut slow1 = TcpStream::connect(addr).await.unwrap();
        slow1.write_all(b"GET /hea").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut slow2 = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // ...a probe takes the oldest one's slot and is answered at once
        let started = std::time::Instant::now();
        let r = get(addr, "GET /healthz HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
        assert!(
            started.elapsed() < Duration::from_millis(300),
            "the probe waited for a slot: {:?}",
            started.elapsed()
        );
        // the oldest was closed without an answer, the other is cut off by
        // its deadline
        let mut out = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(2), slow1.read_to_end(&mut out))
            .await
            .expect("closed by the server")
            .unwrap_or(0);
        assert_eq!(n, 0);
        let n = tokio::time::timeout(Duration::from_secs(2), slow2.read_to_end(&mut out))
            .await
            .expect("closed by the server")
            .unwrap_or(0);
        assert_eq!(n, 0);
    }

    #[tokio::test]
    async fn an_oversized_head_is_refused() {
        let (addr, _stop) = start(None, Limits::default()).await;
        let request = format!(
            "GET /healthz HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(MAX_HEAD)
        );
        let mut s = TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(request.as_bytes()).await;
        let mut out = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await;
        assert!(out.starts_with("HTTP/1.1 431 "), "{out}");
    }
}
