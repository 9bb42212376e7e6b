//! A TLS-terminating proxy (socat) in front of a plain-TCP service, for
//! Kafka over TLS: the broker speaks plain TCP and advertises the proxy.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::certs::Issued;

pub struct TlsProxy {
    pub port: u16,
    child: Child,
}

impl TlsProxy {
    /// Listens with TLS on 127.0.0.1:`port` and forwards to `target`;
    /// `client_ca`: require a client certificate issued by this CA.
    pub fn start(port: u16, target: u16, server: &Issued, client_ca: Option<&Path>) -> TlsProxy {
        let found = Command::new("socat").arg("-V").output();
        assert!(
            found.is_ok_and(|o| o.status.success()),
            "socat is missing: run scripts/install-deps.sh (apt-get install socat)"
        );
        let verify = match client_ca {
            Some(ca) => format!("verify=1,cafile={}", ca.display()),
            None => "verify=0".to_string(),
        };
        let listen = format!(
            "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={},key={},{verify}",
            server.cert.display(),
            server.key.display()
        );
        let mut child = Command::new("socat")
            .arg(listen)
            .arg(format!("TCP:127.0.0.1:{target}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start socat");
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return TlsProxy { port, child };
            }
            if let Ok(Some(st)) = child.try_wait() {
                panic!("socat exited at start: {st}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("socat did not listen on {port} within 10 s");
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
