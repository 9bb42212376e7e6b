//! Connection strings: libpq's `key=value` and `postgres://` URL forms,
//! split into what tokio-postgres' parser understands and the TLS options
//! pgrelay applies itself.
//!
//! tokio-postgres knows `sslmode` only as disable / prefer / require and
//! rejects `sslrootcert`, `sslcert` and `sslkey` outright, so those are taken
//! out of the string before it is parsed, and both connection kinds (SQL and
//! replication) build their TLS from [`TlsOptions`] with libpq's meaning.

use std::fmt;

/// libpq's `sslmode`, in increasing order of protection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SslMode {
    /// Plaintext only.
    Disable,
    /// Plaintext first, TLS if the server refuses plaintext.
    Allow,
    /// TLS if the server offers it, plaintext otherwise (libpq's default).
    Prefer,
    /// TLS or nothing; the certificate is checked only when `sslrootcert`
    /// names a CA.
    Require,
    /// TLS, the certificate chain verified against the CA.
    VerifyCa,
    /// TLS, the chain verified and the certificate issued for the host.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, DsnError> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(DsnError(format!(
                    "sslmode must be one of disable, allow, prefer, require, verify-ca, verify-full (got {other:?})"
                )))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// The TLS settings of a DSN.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsOptions {
    pub mode: SslMode,
    /// CA certificates (PEM) that verify the server, or `system` for the
    /// system's trust store; none means the system's store for the verify
    /// modes and no verification for the others.
    pub root_cert: Option<String>,
    /// Client certificate chain (PEM).
    pub cert: Option<String>,
    /// Client private key (PEM).
    pub key: Option<String>,
    /// Passphrase of an encrypted `key`.
    pub key_password: Option<String>,
}

impl fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsOptions")
            .field("mode", &self.mode)
            .field("root_cert", &self.root_cert)
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl TlsOptions {
    /// Whether the server's certificate chain is checked: always for the
    /// verify modes, and, as in libpq, whenever a root certificate is given.
    pub fn verifies_chain(&self) -> bool {
        self.mode >= SslMode::VerifyCa || self.root_cert.is_some()
    }

    pub fn verifies_host(&self) -> bool {
        self.mode == SslMode::VerifyFull
    }
}

/// A DSN that cannot be used, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid connection string: {0}")]
pub struct DsnError(pub String);

/// A parsed DSN.
#[derive(Debug, Clone)]
pub struct Dsn {
    /// Everything but the TLS options; its own `ssl_mode` is meaningless
    /// (connections set it from `tls`).
    pub config: tokio_postgres::Config,
    pub tls: TlsOptions,
}

const TLS_KEYS: [&str; 5] = ["sslmode", "sslrootcert", "sslcert", "sslkey", "sslpassword"];

impl Dsn {
    pub fn parse(dsn: &str) -> Result<Dsn, DsnError> {
        let (rest, pairs) = match url_parts(dsn) {
            Some((base, query)) => split_url_query(base, query)?,
            None => split_key_values(dsn)?,
        };
        let mut tls = TlsOptions {
            mode: SslMode::Prefer,
            root_cert: None,
            cert: None,
            key: None,
            key_password: None,
        };
        for (key, value) in pairs {
            match key.as_str() {
                "sslmode" => tls.mode = SslMode::parse(&value)?,
                "sslrootcert" => tls.root_cert = Some(value),
                "sslcert" => tls.cert = Some(value),
                "sslkey" => tls.key = Some(value),
                "sslpassword" => tls.key_password = Some(value),
                _ => unreachable!("only TLS keys are split off"),
            }
        }
        if tls.cert.is_some() != tls.key.is_some() {
            return Err(DsnError(
                "sslcert and sslkey go together: name both the client certificate and its key"
                    .into(),
            ));
        }
        let config: tokio_postgres::Config = rest.parse().map_err(|e| {
            DsnError(crate::source::pg_error::reason(&e).replace("invalid connection string: ", ""))
        })?;
        if config.get_ssl_negotiation() == tokio_postgres::config::SslNegotiation::Direct {
            return Err(DsnError(
                "sslnegotiation=direct is not supported (PostgreSQL 17+ only); remove it".into(),
            ));
        }
        Ok(Dsn { config, tls })
    }

    /// One DSN per host of a multi-host DSN (`host=a,b port=5432,5433`), in
    /// order, each with its own port (and `hostaddr`): callers try them in
    /// turn, as libpq does. A single-host DSN gives itself.
    pub fn each_host(&self) -> Result<Vec<Dsn>, DsnError> {
        let c = &self.config;
        let hosts = c.get_hosts();
        if hosts.len() <= 1 {
            return Ok(vec![self.clone()]);
        }
        let ports = c.get_ports();
        if ports.len() > 1 && ports.len() != hosts.len() {
            return Err(DsnError(format!(
                "{} hosts but {} ports: give one port for all hosts or one per host",
                hosts.len(),
                ports.len()
            )));
        }
        let addrs = c.get_hostaddrs();
        Ok(hosts
            .iter()
            .enumerate()
            .map(|(i, host)| {
                let mut one = tokio_postgres::Config::new();
                match host {
                    tokio_postgres::config::Host::Tcp(h) => one.host(h),
                    tokio_postgres::config::Host::Unix(p) => one.host_path(p),
                };
                if let Some(addr) = addrs.get(i) {
                    one.hostaddr(*addr);
                }
                if let Some(port) = ports.get(i).or(ports.first()) {
                    one.port(*port);
                }
                if let Some(u) = c.get_user() {
                    one.user(u);
                }
                if let Some(p) = c.get_password() {
                    one.password(p);
                }
                if let Some(d) = c.get_dbname() {
                    one.dbname(d);
                }
                if let Some(o) = c.get_options() {
                    one.options(o);
                }
                if let Some(a) = c.get_application_name() {
                    one.application_name(a);
                }
                if let Some(t) = c.get_connect_timeout() {
                    one.connect_timeout(*t);
                }
                if let Some(t) = c.get_tcp_user_timeout() {
                    one.tcp_user_timeout(*t);
                }
                one.keepalives(c.get_keepalives());
                one.keepalives_idle(c.get_keepalives_idle());
                if let Some(i) = c.get_keepalives_interval() {
                    one.keepalives_interval(i);
                }
                if let Some(r) = c.get_keepalives_retries() {
                    one.keepalives_retries(r);
                }
                one.target_session_attrs(c.get_target_session_attrs());
                one.channel_binding(c.get_channel_binding());
                Dsn {
                    config: one,
                    tls: self.tls.clone(),
                }
            })
            .collect())
    }

    /// Whether the DSN asks for a primary (`target_session_attrs=read-write`).
    pub fn wants_read_write(&self) -> bool {
        self.config.get_target_session_attrs()
            == tokio_postgres::config::TargetSessionAttrs::ReadWrite
    }
}

fn url_parts(dsn: &str) -> Option<(&str, Option<&str>)> {
    let trimmed = dsn.trim();
    if !(trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://")) {
        return None;
    }
    Some(match trimmed.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (trimmed, None),
    })
}

type Split = (String, Vec<(String, String)>);

/// Takes the TLS parameters out of a URL's query string.
fn split_url_query(base: &str, query: Option<&str>) -> Result<Split, DsnError> {
    let mut kept = Vec::new();
    let mut tls = Vec::new();
    for part in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| DsnError(format!("URL parameter {part:?} has no value")))?;
        let key = percent_decode(key)?;
        if TLS_KEYS.contains(&key.as_str()) {
            tls.push((key, percent_decode(value)?));
        } else {
            kept.push(part);
        }
    }
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, tls))
}

fn percent_decode(s: &str) -> Result<String, DsnError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| DsnError(format!("bad percent-encoding in {s:?}")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| DsnError(format!("{s:?} is not UTF-8 once decoded")))
}

/// Takes the TLS parameters out of a `key=value` string (libpq's quoting:
/// single quotes, backslash escapes) and writes the others back quoted.
fn split_key_values(dsn: &str) -> Result<Split, DsnError> {
    let mut chars = dsn.chars().peekable();
    let mut kept = String::new();
    let mut tls = Vec::new();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        if key.is_empty() {
            if chars.peek().is_some() {
                return Err(DsnError("a parameter has no name before '='".into()));
            }
            break;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(DsnError(format!("parameter {key:?} has no '=' and value")));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => {
                        return Err(DsnError(format!(
                            "the quoted value of {key:?} has no closing quote"
                        )))
                    }
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        if TLS_KEYS.contains(&key.as_str()) {
            tls.push((key, value));
        } else {
            let quoted = value.replace('\\', "\\\\").replace('\'', "\\'");
            kept.push_str(&format!("{key}='{quoted}' "));
        }
    }
    Ok((kept, tls))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_host_dsns_split_into_one_per_host() {
        let dsn = Dsn::parse(
            "host=a,b port=5432,5433 user=u password=p dbname=d connect_timeout=3 \
             target_session_attrs=read-write sslmode=disable",
        )
        .unwrap();
        assert!(dsn.wants_read_write());
        let each = dsn.each_host().unwrap();
        assert_eq!(each.len(), 2);
        for (one, (host, port)) in each.iter().zip([("a", 5432), ("b", 5433)]) {
            assert_eq!(
                one.config.get_hosts(),
                [tokio_postgres::config::Host::Tcp(host.into())]
            );
            assert_eq!(one.config.get_ports(), [port]);
            assert_eq!(one.config.get_user(), Some("u"));
            assert_eq!(one.config.get_password(), Some(&b"p"[..]));
            assert_eq!(one.config.get_dbname(), Some("d"));
            assert_eq!(
                one.config.get_connect_timeout(),
                Some(&std::time::Duration::from_secs(3))
            );
            assert_eq!(one.tls.mode, SslMode::Disable);
        }
        // one port for every host
        let each = Dsn::parse("host=a,b port=6000 user=u")
            .unwrap()
            .each_host()
            .unwrap();
        assert_eq!(each[1].config.get_ports(), [6000]);
        // URL form
        let each = Dsn::parse("postgres://u@a:1,b:2/d?target_session_attrs=read-write")
            .unwrap()
            .each_host()
            .unwrap();
        assert_eq!(each[1].config.get_ports(), [2]);
        let err = Dsn::parse("host=a,b,c port=1,2 user=u")
            .unwrap()
            .each_host()
            .unwrap_err();
        assert!(err.0.contains("3 hosts but 2 ports"), "{err}");
    }

    #[test]
    fn key_value_tls_options_are_split_off() {
        let d = Dsn::parse(
            "host=db.eu port=5433 user=relay password='p w\\'x' dbname=app \
             sslmode=verify-full sslrootcert=/etc/ca.pem sslcert='/c/client.pem' sslkey=/c/k.pem",
        )
        .unwrap();
        assert_eq!(d.tls.mode, SslMode::VerifyFull);
        assert_eq!(d.tls.root_cert.as_deref(), Some("/etc/ca.pem"));
        assert_eq!(d.tls.cert.as_deref(), Some("/c/client.pem"));
        assert_eq!(d.tls.key.as_deref(), Some("/c/k.pem"));
        assert_eq!(d.config.get_password(), Some(&b"p w'x"[..]));
        assert_eq!(d.config.get_dbname(), Some("app"));
        assert_eq!(d.config.get_ports(), &[5433]);
        assert!(d.tls.verifies_chain() && d.tls.verifies_host());
    }

    #[test]
    fn url_tls_options_are_split_off() {
        let d = Dsn::parse(
            "postgres://relay:s%40cret@db.eu:5433/app?sslmode=verify-ca&application_name=x&sslrootcert=%2Fetc%2Fca.pem",
        )
        .unwrap();
        assert_eq!(d.tls.mode, SslMode::VerifyCa);
        assert_eq!(d.tls.root_cert.as_deref(), Some("/etc/ca.pem"));
        assert_eq!(d.config.get_password(), Some(&b"s@cret"[..]));
        assert_eq!(d.config.get_application_name(), Some("x"));
        assert!(d.tls.verifies_chain() && !d.tls.verifies_host());
    }

    #[test]
    fn default_is_prefer_without_verification() {
        let d = Dsn::parse("host=a user=b").unwrap();
        assert_eq!(d.tls.mode, SslMode::Prefer);
        assert!(!d.tls.verifies_chain());
        let d = Dsn::parse("host=a user=b sslmode=require sslrootcert=/ca").unwrap();
        assert!(d.tls.verifies_chain() && !d.tls.verifies_host());
    }

    #[test]
    fn bad_options_are_named() {
        let e = Dsn::parse("host=a sslmode=verify_full").unwrap_err();
        assert!(e.to_string().contains("verify-full"), "{e}");
        assert!(e.to_string().contains("verify_full"), "{e}");
        let e = Dsn::parse("host=a sslcrl=/x").unwrap_err();
        assert!(e.to_string().contains("sslcrl"), "{e}");
        let e = Dsn::parse("host=a sslcert=/x").unwrap_err();
        assert!(e.to_string().contains("sslkey"), "{e}");
        let e = Dsn::parse("host=a password='open").unwrap_err();
        assert!(e.to_string().contains("password"), "{e}");
    }
}
