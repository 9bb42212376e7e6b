//! TLS to PostgreSQL with libpq's `sslmode` semantics, on OpenSSL (the one
//! TLS stack of the binary: librdkafka needs OpenSSL for Kafka anyway).
//!
//! Shared by both connection kinds: tokio-postgres' SQL connections get a
//! `postgres_openssl` connector built here, the replication client runs
//! [`handshake`] itself. [`AuthGuard`] watches a plaintext session so that
//! a cleartext or MD5 password is never sent unencrypted unless the DSN
//! says `sslmode=disable`.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::PKey;
use openssl::ssl::{ConnectConfiguration, SslConnector, SslMethod, SslRef, SslVerifyMode};
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::{X509VerifyResult, X509};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_openssl::SslStream;

use super::dsn::{Dsn, SslMode, TlsOptions};

/// A TLS setup or handshake failure, with OpenSSL's reason.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot use {what} {path}: {reason}")]
    File {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("TLS setup: {0}")]
    Setup(#[from] openssl::error::ErrorStack),
    #[error("TLS handshake failed: {0}")]
    Handshake(String),
    #[error("the server does not support TLS (ssl = off), and sslmode={mode} requires it")]
    NotSupported { mode: &'static str },
}

/// Reads the files a DSN's TLS options name (CA, client certificate and
/// key) as a connection would: a missing or unreadable one is a mistake in
/// the configuration, which no retry fixes. A DSN that does not parse is
/// left to the connection, which names the problem.
pub fn check_files(dsn: &str) -> Result<(), TlsError> {
    let Ok(parsed) = Dsn::parse(dsn) else {
        return Ok(());
    };
    if parsed.tls.mode == SslMode::Disable {
        return Ok(());
    }
    connector(&parsed.tls).map(|_| ())
}

/// Builds the OpenSSL connector for a DSN's TLS options: the CA that
/// verifies the server (only it: a given `sslrootcert` replaces the
/// system's trust store), verification on or off, the client certificate.
pub fn connector(opts: &TlsOptions) -> Result<SslConnector, TlsError> {
    let mut builder = SslConnector::builder(SslMethod::tls_client())?;
    if opts.verifies_chain() {
        builder.set_verify(SslVerifyMode::PEER);
        match opts.root_cert.as_deref() {
            None | Some("system") => {}
            Some(path) => {
                let file = |reason: String| TlsError::File {
                    what: "sslrootcert",
                    path: path.to_string(),
                    reason,
                };
                let pem = std::fs::read(path).map_err(|e| file(e.to_string()))?;
                let certs = X509::stack_from_pem(&pem).map_err(|e| file(e.to_string()))?;
                if certs.is_empty() {
                    return Err(file("no PEM certificate in it".into()));
                }
                let mut store = X509StoreBuilder::new()?;
                for cert in certs {
                    store.add_cert(cert)?;
                }
                builder.set_cert_store(store.build());
            }
        }
    } else {
        builder.set_verify(SslVerifyMode::NONE);
    }
    if let (Some(cert), Some(key)) = (&opts.cert, &opts.key) {
        builder
            .set_certificate_chain_file(cert)
            .map_err(|e| TlsError::File {
                what: "sslcert",
                path: cert.clone(),
                reason: e.to_string(),
            })?;
        let key_err = |reason: String| TlsError::File {
            what: "sslkey",
            path: key.clone(),
            reason,
        };
        let pem = std::fs::read(key).map_err(|e| key_err(e.to_string()))?;
        let pkey = match &opts.key_password {
            Some(pass) => PKey::private_key_from_pem_passphrase(&pem, pass.as_bytes()),
            None => PKey::private_key_from_pem(&pem),
        }
        .map_err(|e| key_err(e.to_string()))?;
        builder
            .set_private_key(&pkey)
            .map_err(|e| key_err(e.to_string()))?;
        builder
            .check_private_key()
            .map_err(|_| key_err(format!("the key does not match the certificate {cert}")))?;
    }
    Ok(builder.build())
}

/// One connection's TLS session settings: host name checked only for
/// verify-full.
pub fn configure(
    connector: &SslConnector,
    opts: &TlsOptions,
) -> Result<ConnectConfiguration, TlsError> {
    let mut cfg = connector.configure()?;
    cfg.set_verify_hostname(opts.verifies_host());
    Ok(cfg)
}

/// A tokio-postgres TLS connector for these options.
pub fn make_connector(opts: &TlsOptions) -> Result<postgres_openssl::MakeTlsConnector, TlsError> {
    let mut make = postgres_openssl::MakeTlsConnector::new(connector(opts)?);
    let verify_host = opts.verifies_host();
    make.set_callback(move |cfg, _| {
        cfg.set_verify_hostname(verify_host);
        Ok(())
    });
    Ok(make)
}

/// The TLS handshake on a stream whose server accepted the SSLRequest.
pub async fn handshake<S>(
    connector: &SslConnector,
    opts: &TlsOptions,
    host: &str,
    stream: S,
) -> Result<SslStream<S>, TlsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let ssl = configure(connector, opts)?.into_ssl(host)?;
    let mut stream = SslStream::new(ssl, stream)?;
    match Pin::new(&mut stream).connect().await {
        Ok(()) => Ok(stream),
        Err(e) => {
            let mut reason = super::pg_error::chain(&e);
            let verify = stream.ssl().verify_result();
            if verify != X509VerifyResult::OK {
                reason.push_str(&format!(": {}", verify.error_string()));
            }
            Err(TlsError::Handshake(reason))
        }
    }
}

/// RFC 5929's tls-server-end-point channel binding: a hash of the server's
/// certificate with its signature's digest (SHA-256 for MD5 and SHA-1).
pub fn tls_server_end_point(ssl: &SslRef) -> Option<Vec<u8>> {
    let cert = ssl.peer_certificate()?;
    let algorithms = cert
        .signature_algorithm()
        .object()
        .nid()
        .signature_algorithms()?;
    let md = match algorithms.digest {
        Nid::MD5 | Nid::SHA1 => MessageDigest::sha256(),
        nid => MessageDigest::from_nid(nid)?,
    };
    cert.digest(md).ok().map(|d| d.to_vec())
}

/// The server asked for a password in a form readable on the wire, on a
/// connection that is not encrypted.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "the server asks for a {method} password over an unencrypted connection and pgrelay will not \
     send it: turn on ssl in the server and use sslmode=require or verify-full, or use \
     scram-sha-256 authentication, or set sslmode=disable in the DSN to allow it"
)]
pub struct InsecureAuth {
    pub method: &'static str,
}

impl InsecureAuth {
    /// The refusal for an authentication request code, if it is one to refuse.
    pub fn for_code(code: i32) -> Option<InsecureAuth> {
        match code {
            3 => Some(InsecureAuth {
                method: "cleartext",
            }),
            5 => Some(InsecureAuth { method: "MD5" }),
            _ => None,
        }
    }

    /// Finds this refusal in an error's source chain.
    pub fn find(e: &(dyn std::error::Error + 'static)) -> Option<InsecureAuth> {
        let mut next = Some(e);
        while let Some(err) = next {
            if let Some(found) = err.downcast_ref::<InsecureAuth>() {
                return Some(found.clone());
            }
            if let Some(found) = err
                .downcast_ref::<io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<InsecureAuth>())
            {
                return Some(found.clone());
            }
            next = err.source();
        }
        None
    }
}

/// What the guard is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Watch {
    /// The one-byte answer to an SSLRequest: `S` (TLS follows, nothing to
    /// watch) or `N` (plaintext follows).
    SslAnswer,
    /// Backend messages up to the end of authentication.
    Authentication,
    /// Authentication is over, or the session is encrypted.
    Done,
}

/// A plaintext stream for tokio-postgres that fails the read carrying an
/// AuthenticationCleartextPassword or AuthenticationMD5Password request,
/// before the client can answer it.
#[derive(Debug)]
pub struct AuthGuard<S> {
    inner: S,
    watch: Watch,
    /// Bytes of backend messages not yet judged (authentication messages
    /// are small; this never holds more than a few of them).
    pending: Vec<u8>,
}

impl<S> AuthGuard<S> {
    /// `ssl_request`: whether the client starts with an SSLRequest.
    pub fn new(inner: S, ssl_request: bool) -> AuthGuard<S> {
        AuthGuard {
            inner,
            watch: if ssl_request {
                Watch::SslAnswer
            } else {
                Watch::Authentication
            },
            pending: Vec::new(),
        }
    }

    fn inspect(&mut self, mut bytes: &[u8]) -> Result<(), InsecureAuth> {
        if self.watch == Watch::SslAnswer {
            let Some((&answer, rest)) = bytes.split_first() else {
                return Ok(());
            };
            if answer == b'S' {
                self.watch = Watch::Done;
                return Ok(());
            }
            self.watch = Watch::Authentication;
            bytes = rest;
        }
        if self.watch != Watch::Authentication {
            return Ok(());
        }
        self.pending.extend_from_slice(bytes);
        while self.pending.len() >= 5 {
            let tag = self.pending[0];
            let len = i32::from_be_bytes([
                self.pending[1],
                self.pending[2],
                self.pending[3],
                self.pending[4],
            ]);
            match tag {
                b'R' => {
                    if self.pending.len() < 9 {
                        return Ok(());
                    }
                    let code = i32::from_be_bytes([
                        self.pending[5],
                        self.pending[6],
                        self.pending[7],
                        self.pending[8],
                    ]);
                    if let Some(refusal) = InsecureAuth::for_code(code) {
                        return Err(refusal);
                    }
                    if code == 0 {
                        self.done();
                        return Ok(());
                    }
                }
                // an error ends the session; anything after it is the
                // client's business
                b'E' => {
                    self.done();
                    return Ok(());
                }
                _ => {}
            }
            let total = len.max(4) as usize + 1;
            if self.pending.len() < total {
                return Ok(());
            }
            self.pending.drain(..total);
        }
        Ok(())
    }

    fn done(&mut self) {
        self.watch = Watch::Done;
        self.pending = Vec::new();
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthGuard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        if self.watch != Watch::Done {
            let fresh = buf.filled()[before..].to_vec();
            if let Err(refusal) = self.inspect(&fresh) {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    refusal,
                )));
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthGuard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(code: i32, extra: &[u8]) -> Vec<u8> {
        let mut m = vec![b'R'];
        m.extend_from_slice(&((8 + extra.len()) as i32).to_be_bytes());
        m.extend_from_slice(&code.to_be_bytes());
        m.extend_from_slice(extra);
        m
    }

    #[test]
    fn guard_refuses_cleartext_and_md5_after_a_declined_ssl_request() {
        let mut g = AuthGuard::new((), true);
        let mut bytes = vec![b'N'];
        bytes.extend(auth(3, b""));
        assert_eq!(g.inspect(&bytes).unwrap_err().method, "cleartext");

        let mut g = AuthGuard::new((), false);
        let md5 = auth(5, b"salt");
        // split across reads
        g.inspect(&md5[..3]).unwrap();
        assert_eq!(g.inspect(&md5[3..]).unwrap_err().method, "MD5");
    }

    #[test]
    fn guard_lets_scram_and_tls_through() {
        let mut g = AuthGuard::new((), false);
        g.inspect(&auth(10, b"SCRAM-SHA-256\0\0")).unwrap();
        g.inspect(&auth(11, b"r=abc")).unwrap();
        g.inspect(&auth(12, b"v=xyz")).unwrap();
        g.inspect(&auth(0, b"")).unwrap();
        assert_eq!(g.watch, Watch::Done);
        // after authentication nothing is judged
        g.inspect(&auth(3, b"")).unwrap();

        let mut g = AuthGuard::new((), true);
        g.inspect(b"S").unwrap();
        g.inspect(&auth(3, b"")).unwrap();
    }
}
