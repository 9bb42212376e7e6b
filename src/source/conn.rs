//! A minimal PostgreSQL wire-protocol client for replication connections.
//!
//! tokio-postgres cannot open a `replication=database` session, so this
//! module speaks the protocol itself on top of postgres-protocol's frontend
//! encoders and SCRAM implementation: TLS negotiation with libpq's
//! `sslmode` semantics (see [`super::dsn::SslMode`]), startup,
//! authentication (trust, cleartext and md5 — never over an unencrypted
//! connection unless `sslmode=disable` —, SCRAM-SHA-256 and, over TLS,
//! SCRAM-SHA-256-PLUS with tls-server-end-point channel binding), simple
//! queries, and the CopyBoth sub-protocol that `START_REPLICATION` switches
//! to.
//!
//! After `start_replication` the connection is split into a [`ReplReader`]
//! (cancel-safe frame reads, so it can sit in a `select!`) and a
//! [`ReplWriter`] (standby status updates), so that feedback never waits
//! behind a read.
//!
//! Over 600 lines on purpose: startup, authentication (SCRAM with channel
//! binding), TLS negotiation and the replication copy stream share one
//! connection state machine.

use std::fmt;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{
    ChannelBinding, ScramSha256, SCRAM_SHA_256, SCRAM_SHA_256_PLUS,
};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::config::ChannelBinding as ChannelBindingMode;

use super::dsn::{Dsn, SslMode, TlsOptions};
use super::tls::{self, InsecureAuth, TlsError};

/// Errors of the replication connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("cannot connect to {target}: {source}")]
    Connect {
        target: String,
        source: std::io::Error,
    },
    #[error("connection to {target} timed out after {timeout:?}")]
    Timeout { target: String, timeout: Duration },
    #[error("invalid connection string: {0}")]
    Dsn(String),
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("server error {code}: {message}")]
    Server { code: String, message: String },
    #[error("connection closed by the server")]
    Closed,
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("io error: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    InsecureAuth(#[from] InsecureAuth),
    #[error("no usable host: {0}")]
    NoHost(String),
    #[error("without TLS: {plain}; with TLS: {tls}")]
    Allow {
        plain: Box<ConnError>,
        tls: Box<ConnError>,
    },
}

impl ConnError {
    /// The SQLSTATE of a server error, if this is one.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ConnError::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// Where and how to connect, parsed from a libpq-style DSN.
#[derive(Clone)]
pub struct ConnParams {
    pub host: Host,
    pub port: u16,
    pub user: String,
    pub password: Option<Vec<u8>>,
    pub dbname: String,
    pub application_name: String,
    pub connect_timeout: Duration,
    pub tls: TlsOptions,
    pub channel_binding: ChannelBindingMode,
    /// The other hosts of a multi-host DSN, tried in order after `host`.
    pub fallbacks: Vec<(Host, u16)>,
    /// `target_session_attrs=read-write`: skip hosts in recovery.
    pub read_write: bool,
}

#[derive(Clone, Debug)]
pub enum Host {
    Tcp(String),
    Unix(std::path::PathBuf),
}

impl fmt::Debug for ConnParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnParams")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("dbname", &self.dbname)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl ConnParams {
    /// Parses a DSN (`host=... port=... user=...` or a `postgres://` URL)
    /// with tokio-postgres' parser (TLS options apart). Several hosts are
    /// tried in order, as libpq does (`fallbacks`).
    pub fn from_dsn(dsn: &str, application_name: &str) -> Result<Self, ConnError> {
        let parsed = Dsn::parse(dsn).map_err(|e| ConnError::Dsn(e.0))?;
        let read_write = parsed.wants_read_write();
        let mut hosts = parsed
            .each_host()
            .map_err(|e| ConnError::Dsn(e.0))?
            .into_iter()
            .map(|d| {
                let host = match d.config.get_hosts().first() {
                    Some(tokio_postgres::config::Host::Tcp(h)) => Host::Tcp(h.clone()),
                    Some(tokio_postgres::config::Host::Unix(p)) => Host::Unix(p.clone()),
                    None => Host::Tcp("localhost".to_string()),
                };
                (host, d.config.get_ports().first().copied().unwrap_or(5432))
            });
        let (host, port) = hosts
            .next()
            .unwrap_or((Host::Tcp("localhost".to_string()), 5432));
        let fallbacks = hosts.collect();
        let Dsn { config, tls } = parsed;
        let user = config
            .get_user()
            .ok_or_else(|| ConnError::Dsn("the DSN names no user (add user=...)".into()))?
            .to_string();
        let dbname = config.get_dbname().unwrap_or(&user).to_string();
        Ok(ConnParams {
            host,
            port,
            user,
            password: config.get_password().map(|p| p.to_vec()),
            dbname,
            application_name: application_name.to_string(),
            connect_timeout: config
                .get_connect_timeout()
                .copied()
                .unwrap_or(Duration::from_secs(10)),
            tls,
            channel_binding: config.get_channel_binding(),
            fallbacks,
            read_write,
        })
    }

    /// Where this connects (every host of a multi-host DSN).
    pub fn target(&self) -> String {
        std::iter::once((&self.host, self.port))
            .chain(self.fallbacks.iter().map(|(h, p)| (h, *p)))
            .map(|(h, p)| host_target(h, p))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// These parameters for one of the hosts.
    fn for_host(&self, host: &Host, port: u16) -> ConnParams {
        ConnParams {
            host: host.clone(),
            port,
            fallbacks: Vec::new(),
            ..self.clone()
        }
    }
}

fn host_target(host: &Host, port: u16) -> String {
    match host {
        Host::Tcp(h) => format!("{h}:{port}"),
        Host::Unix(p) => format!("{}/.s.PGSQL.{port}", p.display()),
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A connection in the simple-query phase, before `START_REPLICATION`.
pub struct ReplConnection {
    reader: FrameReader<tokio::io::ReadHalf<Box<dyn Stream>>>,
    writer: tokio::io::WriteHalf<Box<dyn Stream>>,
    encrypted: bool,
}

/// How a connection attempt treats TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Negotiation {
    /// No SSLRequest.
    Plain,
    /// SSLRequest; plaintext if the server declines.
    Preferred,
    /// SSLRequest; an error if the server declines.
    Required,
}

enum Negotiated {
    /// Encrypted, with the channel binding data if the certificate allows.
    Tls(Box<dyn Stream>, Option<Vec<u8>>),
    Declined(Box<dyn Stream>),
}

/// Sends an SSLRequest and, if the server accepts, runs the handshake.
async fn negotiate_tls(
    mut stream: Box<dyn Stream>,
    params: &ConnParams,
    negotiation: Negotiation,
) -> Result<Negotiated, ConnError> {
    let mut buf = BytesMut::new();
    frontend::ssl_request(&mut buf);
    stream.write_all(&buf).await?;
    stream.flush().await?;
    let answer = stream.read_u8().await?;
    match answer {
        b'S' => {}
        b'N' if negotiation == Negotiation::Preferred => return Ok(Negotiated::Declined(stream)),
        b'N' => {
            return Err(TlsError::NotSupported {
                mode: params.tls.mode.as_str(),
            }
            .into())
        }
        other => {
            return Err(ConnError::Protocol(format!(
                "unexpected answer {other:#04x} to the SSL request"
            )))
        }
    }
    let connector = tls::connector(&params.tls)?;
    let host = match &params.host {
        Host::Tcp(h) => h.clone(),
        Host::Unix(_) => "localhost".to_string(),
    };
    let tls_stream = tls::handshake(&connector, &params.tls, &host, stream).await?;
    let binding = tls::tls_server_end_point(tls_stream.ssl());
    Ok(Negotiated::Tls(Box::new(tls_stream), binding))
}

/// The startup message of a replication session.
fn startup_message(params: &ConnParams) -> Result<BytesMut, ConnError> {
    let mut buf = BytesMut::new();
    // the walsender prints values with this session's settings: the
    // canonical ones make every region spell a value the same way
    let base = [
        ("user", params.user.as_str()),
        ("database", params.dbname.as_str()),
        ("replication", "database"),
        ("application_name", params.application_name.as_str()),
        ("client_encoding", "UTF8"),
    ];
    frontend::startup_message(
        base.into_iter()
            .chain(crate::event::CANONICAL_TEXT_SETTINGS),
        &mut buf,
    )?;
    Ok(buf)
}

/// The client side of authentication, without IO: each authentication
/// message of the server answered from the DSN's credentials, under
/// libpq's rules (no password over an unencrypted TCP connection unless
/// `sslmode=disable`; `channel_binding`).
struct Authentication<'a> {
    params: &'a ConnParams,
    /// The tls-server-end-point data of an encrypted session.
    binding: Option<Vec<u8>>,
    encrypted: bool,
    scram: Option<ScramSha256>,
    /// Whether SCRAM-SHA-256-PLUS was chosen, and whether its exchange
    /// completed (the server proved it saw the same TLS channel).
    chose_plus: bool,
    bound: bool,
}

impl<'a> Authentication<'a> {
    fn new(params: &'a ConnParams, binding: Option<Vec<u8>>, encrypted: bool) -> Self {
        Authentication {
            params,
            binding,
            encrypted,
            scram: None,
            chose_plus: false,
            bound: false,
        }
    }

    /// The answer to one authentication message (its body, after the
    /// tag), if it needs one.
    fn answer(&mut self, mut body: Bytes) -> Result<Option<BytesMut>, ConnError> {
        if body.len() < 4 {
            return Err(ConnError::Protocol("short authentication message".into()));
        }
        let code = body.get_i32();
        let params = self.params;
        let mut out = BytesMut::new();
        if !self.encrypted && params.tls.mode != SslMode::Disable {
            if let Some(refusal) = InsecureAuth::for_code(code) {
                if !matches!(params.host, Host::Unix(_)) {
                    return Err(refusal.into());
                }
            }
        }
        // with channel_binding=require, as in libpq: only a completed
        // SCRAM-SHA-256-PLUS exchange may end authentication (not trust,
        // not a password, not plain SCRAM)
        let require_binding = params.channel_binding == ChannelBindingMode::Require;
        match code {
            0 if require_binding && !self.bound => return Err(unbound()),
            0 => return Ok(None),
            3 | 5 if require_binding => return Err(unbound()),
            3 => {
                let pw = self.password()?;
                frontend::password_message(&pw, &mut out)?;
            }
            5 => {
                if body.len() < 4 {
                    return Err(ConnError::Protocol("short md5 salt".into()));
                }
                let mut salt = [0u8; 4];
                body.copy_to_slice(&mut salt);
                let pw = self.password()?;
                let hash = md5_hash(params.user.as_bytes(), &pw, salt);
                frontend::password_message(hash.as_bytes(), &mut out)?;
            }
            10 => self.sasl_start(&body, &mut out)?,
            11 => {
                let s = self.scram.as_mut().ok_or_else(|| {
                    ConnError::Protocol("SASL continue without SASL start".into())
                })?;
                s.update(&body)
                    .map_err(|e| ConnError::Auth(format!("SCRAM: {e}")))?;
                frontend::sasl_response(s.message(), &mut out)?;
            }
            12 => {
                let s = self
                    .scram
                    .as_mut()
                    .ok_or_else(|| ConnError::Protocol("SASL final without SASL start".into()))?;
                s.finish(&body)
                    .map_err(|e| ConnError::Auth(format!("SCRAM: {e}")))?;
                self.bound = self.chose_plus;
                return Ok(None);
            }
            other => {
                return Err(ConnError::Auth(format!(
                    "unsupported authentication method (code {other})"
                )))
            }
        }
        Ok(Some(out))
    }

    fn password(&self) -> Result<Vec<u8>, ConnError> {
        self.params.password.clone().ok_or_else(|| {
            ConnError::Auth(format!(
                "the server asks user {:?} for a password and the DSN has none",
                self.params.user
            ))
        })
    }

    /// SASL start (`mechanisms`: the server's, NUL-separated): the
    /// SCRAM mechanism `channel_binding` allows, and its first message.
    fn sasl_start(&mut self, mechanisms: &[u8], out: &mut BytesMut) -> Result<(), ConnError> {
        let params = self.params;
        let mechanisms = mechanisms.split(|b| *b == 0).collect::<Vec<_>>();
        let plus = mechanisms.contains(&SCRAM_SHA_256_PLUS.as_bytes());
        let (mechanism, channel) = match &self.binding {
            Some(hash) if plus && params.channel_binding != ChannelBindingMode::Disable => (
                SCRAM_SHA_256_PLUS,
                ChannelBinding::tls_server_end_point(hash.clone()),
            ),
            _ if params.channel_binding == ChannelBindingMode::Require => {
                return Err(ConnError::Auth(
                    "channel_binding=require, and the server offers no \
                     SCRAM-SHA-256-PLUS over TLS"
                        .into(),
                ))
            }
            _ if !mechanisms.contains(&SCRAM_SHA_256.as_bytes()) => {
                return Err(ConnError::Auth(
                    "the server offers no supported SASL mechanism".into(),
                ))
            }
            _ if self.encrypted && params.channel_binding != ChannelBindingMode::Disable => {
                (SCRAM_SHA_256, ChannelBinding::unrequested())
            }
            _ => (SCRAM_SHA_256, ChannelBinding::unsupported()),
        };
        let pw = self.password()?;
        self.chose_plus = mechanism == SCRAM_SHA_256_PLUS;
        let s = ScramSha256::new(&pw, channel);
        frontend::sasl_initial_response(mechanism, s.message(), out)?;
        self.scram = Some(s);
        Ok(())
    }
}

/// Authentication that ended, or went on, without the channel binding
/// `channel_binding=require` asks for.
fn unbound() -> ConnError {
    ConnError::Auth(
        "channel_binding=require, and the server authenticated without channel \
         binding (trust, password or md5 authentication, or SCRAM without -PLUS); \
         use SCRAM-SHA-256 over TLS in pg_hba.conf or remove channel_binding=require"
            .into(),
    )
}

/// One result row of a simple query: text values.
pub type Row = Vec<Option<String>>;

impl ReplConnection {
    /// Connects with `replication=database`, negotiates TLS as `sslmode`
    /// asks, and authenticates. Of several hosts, the first that accepts
    /// (and, with `target_session_attrs=read-write`, is not in recovery).
    pub async fn connect(params: &ConnParams) -> Result<Self, ConnError> {
        if params.fallbacks.is_empty() && !params.read_write {
            return Self::connect_host(params).await;
        }
        let mut reasons = Vec::new();
        let hosts = std::iter::once((&params.host, params.port))
            .chain(params.fallbacks.iter().map(|(h, p)| (h, *p)));
        for (host, port) in hosts {
            let one = params.for_host(host, port);
            match Self::connect_host(&one).await {
                Ok(mut conn) if params.read_write => {
                    match conn.simple_query("SHOW transaction_read_only").await {
                        Ok(rows)
                            if rows
                                .first()
                                .and_then(|r| r.first().cloned().flatten())
                                .as_deref()
                                == Some("off") =>
                        {
                            return Ok(conn)
                        }
                        Ok(_) => reasons.push(format!("{}: read-only (a standby)", one.target())),
                        Err(e) => reasons.push(format!("{}: {e}", one.target())),
                    }
                    drop(conn);
                }
                Ok(conn) => return Ok(conn),
                Err(e) => reasons.push(format!("{}: {e}", one.target())),
            }
        }
        Err(ConnError::NoHost(reasons.join("; ")))
    }

    async fn connect_host(params: &ConnParams) -> Result<Self, ConnError> {
        let local = matches!(params.host, Host::Unix(_));
        match params.tls.mode {
            // no TLS over a local socket, as in libpq
            _ if local => Self::connect_with(params, Negotiation::Plain).await,
            SslMode::Disable => Self::connect_with(params, Negotiation::Plain).await,
            SslMode::Allow => match Self::connect_with(params, Negotiation::Plain).await {
                Ok(conn) => Ok(conn),
                Err(e @ (ConnError::Connect { .. } | ConnError::Timeout { .. })) => Err(e),
                // refused in plaintext (by the server or the password
                // guard): try again with TLS
                Err(plain) => Self::connect_with(params, Negotiation::Required)
                    .await
                    .map_err(|tls| ConnError::Allow {
                        plain: Box::new(plain),
                        tls: Box::new(tls),
                    }),
            },
            SslMode::Prefer => Self::connect_with(params, Negotiation::Preferred).await,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                Self::connect_with(params, Negotiation::Required).await
            }
        }
    }

    async fn connect_with(
        params: &ConnParams,
        negotiation: Negotiation,
    ) -> Result<Self, ConnError> {
        let target = params.target();
        let plain: Box<dyn Stream> = tokio::time::timeout(params.connect_timeout, async {
            match &params.host {
                Host::Tcp(h) => TcpStream::connect((h.as_str(), params.port))
                    .await
                    .map(|s| {
                        let _ = s.set_nodelay(true);
                        Box::new(s) as Box<dyn Stream>
                    }),
                Host::Unix(dir) => {
                    let path = dir.join(format!(".s.PGSQL.{}", params.port));
                    tokio::net::UnixStream::connect(path)
                        .await
                        .map(|s| Box::new(s) as Box<dyn Stream>)
                }
            }
        })
        .await
        .map_err(|_| ConnError::Timeout {
            target: target.clone(),
            timeout: params.connect_timeout,
        })?
        .map_err(|source| ConnError::Connect {
            target: target.clone(),
            source,
        })?;
        let (stream, binding) = match negotiation {
            Negotiation::Plain => (plain, None),
            Negotiation::Preferred | Negotiation::Required => {
                match negotiate_tls(plain, params, negotiation).await? {
                    Negotiated::Tls(stream, binding) => (stream, Some(binding)),
                    Negotiated::Declined(stream) => (stream, None),
                }
            }
        };
        let encrypted = binding.is_some();
        let (read, writer) = tokio::io::split(stream);
        let mut conn = ReplConnection {
            reader: FrameReader::new(read),
            writer,
            encrypted,
        };
        conn.startup(params, binding.flatten()).await?;
        Ok(conn)
    }

    /// Whether the session is encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.encrypted
    }

    async fn send(&mut self, buf: &BytesMut) -> Result<(), ConnError> {
        self.writer.write_all(buf).await?;
        self.writer.flush().await?;
        Ok(())
    }

    /// `binding`: the tls-server-end-point data of an encrypted session.
    async fn startup(
        &mut self,
        params: &ConnParams,
        binding: Option<Vec<u8>>,
    ) -> Result<(), ConnError> {
        self.send(&startup_message(params)?).await?;
        let mut auth = Authentication::new(params, binding, self.encrypted);
        loop {
            let (tag, body) = self.reader.next().await?;
            match tag {
                b'R' => {
                    if let Some(out) = auth.answer(body)? {
                        self.send(&out).await?;
                    }
                }
                b'E' => return Err(server_error(&body)),
                b'Z' => return Ok(()),
                // ParameterStatus, BackendKeyData, notices
                _ => continue,
            }
        }
    }

    /// Runs one simple query and returns its rows (text format).
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Row>, ConnError> {
        let mut buf = BytesMut::new();
        frontend::query(sql, &mut buf)?;
        self.send(&buf).await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let (tag, body) = self.reader.next().await?;
            match tag {
                b'D' => rows.push(parse_data_row(body)?),
                b'E' => error = Some(server_error(&body)),
                b'Z' => break,
                _ => continue,
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }

    /// Sends `START_REPLICATION` and switches to CopyBoth mode.
    pub async fn start_replication(
        mut self,
        command: &str,
    ) -> Result<(ReplReader, ReplWriter), ConnError> {
        let mut buf = BytesMut::new();
        frontend::query(command, &mut buf)?;
        self.send(&buf).await?;
        loop {
            let (tag, body) = self.reader.next().await?;
            match tag {
                b'W' => break,
                b'E' => {
                    let err = server_error(&body);
                    return Err(err);
                }
                _ => continue,
            }
        }
        Ok((
            ReplReader {
                reader: self.reader,
            },
            ReplWriter {
                writer: self.writer,
            },
        ))
    }
}

/// The read half of a streaming replication connection.
pub struct ReplReader {
    reader: FrameReader<tokio::io::ReadHalf<Box<dyn Stream>>>,
}

impl ReplReader {
    /// The next CopyData payload if it has already been received whole;
    /// `None` when nothing complete is buffered or the next message is not
    /// CopyData (left for [`ReplReader::next_copy_data`]). Never waits.
    pub fn buffered_copy_data(&mut self) -> Result<Option<Bytes>, ConnError> {
        loop {
            match self.reader.buffered_tag()? {
                Some(b'd') => return Ok(self.reader.take_buffered().map(|(_, body)| body)),
                Some(b'c' | b'E') | None => return Ok(None),
                Some(_) => {
                    self.reader.take_buffered();
                }
            }
        }
    }

    /// The next CopyData payload; `None` when the server ended the stream.
    /// Cancel-safe: partial frames stay buffered.
    pub async fn next_copy_data(&mut self) -> Result<Option<Bytes>, ConnError> {
        loop {
            let (tag, body) = self.reader.next().await?;
            match tag {
                b'd' => return Ok(Some(body)),
                b'c' => return Ok(None),
                b'E' => return Err(server_error(&body)),
                _ => continue,
            }
        }
    }
}

/// The write half of a streaming replication connection.
pub struct ReplWriter {
    writer: tokio::io::WriteHalf<Box<dyn Stream>>,
}

impl ReplWriter {
    pub async fn send_copy_data(&mut self, payload: &[u8]) -> Result<(), ConnError> {
        let mut buf = BytesMut::with_capacity(payload.len() + 5);
        buf.extend_from_slice(b"d");
        buf.extend_from_slice(&((payload.len() + 4) as i32).to_be_bytes());
        buf.extend_from_slice(payload);
        self.writer.write_all(&buf).await?;
        self.writer.flush().await?;
        Ok(())
    }

    /// Ends the copy stream and the session politely.
    pub async fn close(mut self) {
        let mut buf = BytesMut::new();
        frontend::copy_done(&mut buf);
        frontend::terminate(&mut buf);
        let _ = self.writer.write_all(&buf).await;
        let _ = self.writer.shutdown().await;
    }
}

/// Reads whole backend messages (tag + body) from a byte stream.
struct FrameReader<R> {
    read: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    fn new(read: R) -> Self {
        FrameReader {
            read,
            buf: BytesMut::with_capacity(256 * 1024),
        }
    }

    /// The tag of the next message if it is buffered whole.
    fn buffered_tag(&self) -> Result<Option<u8>, ConnError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        if len < 4 {
            return Err(ConnError::Protocol(format!("invalid message length {len}")));
        }
        Ok((self.buf.len() > len as usize).then_some(self.buf[0]))
    }

    /// Takes the next message if it is buffered whole.
    fn take_buffered(&mut self) -> Option<(u8, Bytes)> {
        self.buffered_tag().ok()??;
        let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        let mut frame = self.buf.split_to(len as usize + 1).freeze();
        let tag = frame[0];
        frame.advance(5);
        Some((tag, frame))
    }

    /// Next message. Cancel-safe: bytes read so far stay in `buf`.
    async fn next(&mut self) -> Result<(u8, Bytes), ConnError> {
        loop {
            if self.buf.len() >= 5 {
                let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
                if len < 4 {
                    return Err(ConnError::Protocol(format!("invalid message length {len}")));
                }
                let total = len as usize + 1;
                if self.buf.len() >= total {
                    let mut frame = self.buf.split_to(total).freeze();
                    let tag = frame[0];
                    frame.advance(5);
                    return Ok((tag, frame));
                }
                self.buf.reserve(total - self.buf.len());
            } else {
                self.buf.reserve(64 * 1024);
            }
            let n = self.read.read_buf(&mut self.buf).await?;
            if n == 0 {
                return Err(ConnError::Closed);
            }
        }
    }
}

fn parse_data_row(mut body: Bytes) -> Result<Row, ConnError> {
    let short = || ConnError::Protocol("truncated DataRow".into());
    if body.len() < 2 {
        return Err(short());
    }
    let n = body.get_i16();
    let mut row = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        if body.len() < 4 {
            return Err(short());
        }
        let len = body.get_i32();
        if len < 0 {
            row.push(None);
            continue;
        }
        let len = len as usize;
        if body.len() < len {
            return Err(short());
        }
        let value = body.split_to(len);
        row.push(Some(String::from_utf8_lossy(&value).into_owned()));
    }
    Ok(row)
}

/// Builds a [`ConnError::Server`] from an ErrorResponse body.
fn server_error(body: &[u8]) -> ConnError {
    let mut code = String::new();
    let mut message = String::new();
    let mut detail = String::new();
    let mut hint = String::new();
    let mut rest = body;
    while let Some((&field, tail)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let end = tail.iter().position(|b| *b == 0).unwrap_or(tail.len());
        let value = String::from_utf8_lossy(&tail[..end]).into_owned();
        match field {
            b'C' => code = value,
            b'M' => message = value,
            b'D' => detail = value,
            b'H' => hint = value,
            _ => {}
        }
        rest = tail.get(end + 1..).unwrap_or(&[]);
    }
    if !detail.is_empty() {
        message = format!("{message} ({detail})");
    }
    if !hint.is_empty() {
        message = format!("{message}; hint: {hint}");
    }
    ConnError::Server { code, message }
}

#[cfg(test)]
mod tests;
