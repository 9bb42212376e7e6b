//! What a region's database looks like: ordinary SQL connections and the
//! catalog queries that `setup`, `check` and the capture preflight share.

use std::collections::HashMap;

use tokio_postgres::config::{Host, SslMode as PgSslMode};
use tokio_postgres::{Client, Connection, NoTls};

use crate::config::{Config, TableClass};
use crate::event::{Lsn, TableName};
use crate::names::HLC_COLUMN;
use crate::source::conn::{ConnError, ConnParams, ReplConnection};
use crate::source::dsn::{Dsn, SslMode, TlsOptions};
use crate::source::pg_error;
use crate::source::tls::{self, AuthGuard, InsecureAuth};

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("cannot connect to the {region} database ({target}): {reason}")]
    Connect {
        region: String,
        target: String,
        reason: String,
    },
    #[error("{region} database: {context}: {}", pg_error::reason(.source))]
    Query {
        region: String,
        context: String,
        source: tokio_postgres::Error,
    },
}

impl CatalogError {
    /// The database could not be reached or went away (connection lost,
    /// server shutting down or starting up): worth retrying as is.
    pub fn is_unreachable(&self) -> bool {
        match self {
            CatalogError::Connect { .. } => true,
            CatalogError::Query { source, .. } => {
                source.is_closed()
                    || source.code().is_none_or(|c| {
                        let c = c.code();
                        c.starts_with("08") || c.starts_with("57P")
                    })
            }
        }
    }
}

/// Connects with tokio-postgres, TLS as the DSN's `sslmode` asks (libpq's
/// semantics, see [`crate::source::dsn::SslMode`]), and drives the
/// connection in a task.
/// Whether `table` (a qualified name, e.g. `pgrelay.events`) exists: tables
/// a later `setup` adds are absent until it has run.
pub async fn table_exists(client: &Client, table: &str) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT to_regclass($1::text) IS NOT NULL", &[&table])
        .await?
        .get(0))
}

pub async fn connect(dsn: &str, region: &str) -> Result<Client, CatalogError> {
    let target = describe_target(dsn);
    let fail = |reason: String| CatalogError::Connect {
        region: region.to_string(),
        target: target.clone(),
        reason,
    };
    let parsed = Dsn::parse(dsn).map_err(|e| fail(e.to_string()))?;
    let hosts = parsed.each_host().map_err(|e| fail(e.to_string()))?;
    if hosts.len() == 1 && !parsed.wants_read_write() {
        return connect_one(parsed, region).await.map_err(fail);
    }
    // several hosts (or a primary wanted): each in turn, as libpq does
    let mut reasons = Vec::new();
    for one in hosts {
        let host = describe_config(&one.config);
        match connect_one(one, region).await {
            Ok(client) if !parsed.wants_read_write() => return Ok(client),
            Ok(client) => match client.query_one("SHOW transaction_read_only", &[]).await {
                Ok(row) if row.get::<_, String>(0) == "off" => return Ok(client),
                Ok(_) => reasons.push(format!("{host}: read-only (a standby)")),
                Err(e) => reasons.push(format!("{host}: {}", pg_error::reason(&e))),
            },
            Err(reason) => reasons.push(format!("{host}: {reason}")),
        }
    }
    Err(fail(if parsed.wants_read_write() {
        format!("no host is a writable primary ({})", reasons.join("; "))
    } else {
        reasons.join("; ")
    }))
}

/// [`connect`] to the one host of `dsn`.
async fn connect_one(dsn: Dsn, region: &str) -> Result<Client, String> {
    let Dsn { mut config, tls } = dsn;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(std::time::Duration::from_secs(10));
    }
    config.application_name("pgrelay");
    let unix = matches!(config.get_hosts().first(), Some(Host::Unix(_)));
    let result = if unix || tls.mode == SslMode::Disable {
        // no TLS over a local socket, as in libpq
        config.ssl_mode(PgSslMode::Disable);
        spawn(config.connect(NoTls).await, region)
    } else if tls.mode >= SslMode::Require {
        connect_tls(&mut config, &tls, region).await
    } else if tls.mode == SslMode::Prefer {
        connect_guarded(&config, &tls, true, region).await
    } else {
        // allow: plaintext first, TLS when the server (or the password
        // guard) refuses it
        match connect_guarded(&config, &tls, false, region).await {
            Ok(client) => Ok(client),
            Err(plain) => connect_tls(&mut config, &tls, region)
                .await
                .map_err(|tls_err| format!("without TLS: {plain}; with TLS: {tls_err}")),
        }
    };
    result
}

/// A TLS connection or an error: sslmode require, verify-ca, verify-full.
async fn connect_tls(
    config: &mut tokio_postgres::Config,
    tls: &TlsOptions,
    region: &str,
) -> Result<Client, String> {
    let make = tls::make_connector(tls).map_err(|e| e.to_string())?;
    config.ssl_mode(PgSslMode::Require);
    spawn(config.connect(make).await, region)
}

/// A connection on our own socket, watched by [`AuthGuard`] while it is in
/// plaintext; `try_tls` sends an SSLRequest first (sslmode=prefer).
async fn connect_guarded(
    config: &tokio_postgres::Config,
    tls: &TlsOptions,
    try_tls: bool,
    region: &str,
) -> Result<Client, String> {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        _ => "localhost".to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let timeout = config
        .get_connect_timeout()
        .copied()
        .unwrap_or(std::time::Duration::from_secs(10));
    let socket = match config.get_hostaddrs().first() {
        Some(addr) => {
            tokio::time::timeout(timeout, tokio::net::TcpStream::connect((*addr, port))).await
        }
        None => {
            tokio::time::timeout(
                timeout,
                tokio::net::TcpStream::connect((host.as_str(), port)),
            )
            .await
        }
    }
    .map_err(|_| format!("timed out after {timeout:?}"))?
    .map_err(|e| e.to_string())?;
    let _ = socket.set_nodelay(true);
    let mut config = config.clone();
    if try_tls {
        let connector = tls::connector(tls).map_err(|e| e.to_string())?;
        let session = tls::configure(&connector, tls).map_err(|e| e.to_string())?;
        config.ssl_mode(PgSslMode::Prefer);
        let tls_connect = postgres_openssl::TlsConnector::new(session, &host);
        spawn(
            config
                .connect_raw(AuthGuard::new(socket, true), tls_connect)
                .await,
            region,
        )
    } else {
        config.ssl_mode(PgSslMode::Disable);
        spawn(
            config
                .connect_raw(AuthGuard::new(socket, false), NoTls)
                .await,
            region,
        )
    }
}

/// Drives a fresh connection in a task; the error as one line with its cause.
fn spawn<S, T>(
    connected: Result<(Client, Connection<S, T>), tokio_postgres::Error>,
    region: &str,
) -> Result<Client, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    match connected {
        Ok((client, connection)) => {
            let region = region.to_string();
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(region = %region, error = %pg_error::reason(&e), "database connection ended");
                }
            });
            Ok(client)
        }
        Err(e) => Err(match InsecureAuth::find(&e) {
            Some(refusal) => refusal.to_string(),
            None => pg_error::reason(&e),
        }),
    }
}

/// The TLS version of this session as the server sees it, `None` when it
/// is not encrypted.
pub async fn session_tls(client: &Client, region: &str) -> Result<Option<String>, CatalogError> {
    let row = client
        .query_one(
            "SELECT CASE WHEN ssl THEN version END FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|source| CatalogError::Query {
            region: region.to_string(),
            context: "reading pg_stat_ssl".into(),
            source,
        })?;
    Ok(row.get(0))
}

/// Opens a replication connection the way the capture side does and returns
/// the session's TLS version as the server sees it (`None`: not
/// encrypted), or the reason it cannot connect.
pub async fn probe_replication(dsn: &str, region: &str) -> Result<Option<String>, String> {
    let params = ConnParams::from_dsn(dsn, &format!("pgrelay_check_{region}"))
        .map_err(|e| format!("region {region}: replication connection: {e}"))?;
    let fail = |e: ConnError| {
        format!(
            "region {region}: replication connection to {}: {e}",
            params.target()
        )
    };
    let mut conn = ReplConnection::connect(&params).await.map_err(fail)?;
    let rows = conn
        .simple_query(
            "SELECT CASE WHEN ssl THEN version END FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        )
        .await
        .map_err(fail)?;
    Ok(rows
        .into_iter()
        .next()
        .and_then(|r| r.into_iter().next().flatten()))
}

/// Where a multi-host DSN's standbys stand with `slot`: for each host in
/// recovery, `host:port` and whether it holds a synced copy of the slot
/// (with the copy's confirmed LSN and whether it is still temporary, i.e.
/// not yet usable after a promotion), or why it could not be read. Hosts
/// that cannot be reached or are primaries are left out.
pub async fn standby_slots(
    dsn: &str,
    region: &str,
    slot: &str,
) -> Vec<(String, Result<Option<(String, bool)>, String>)> {
    let Ok(hosts) = Dsn::parse(dsn).and_then(|d| d.each_host()) else {
        return Vec::new();
    };
    if hosts.len() < 2 {
        return Vec::new();
    }
    let mut out = Vec::new();
    for mut one in hosts {
        let target = describe_config(&one.config);
        one.config
            .target_session_attrs(tokio_postgres::config::TargetSessionAttrs::Any);
        let Ok(client) = connect_one(one, region).await else {
            continue;
        };
        let in_recovery = client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .map(|r| r.get::<_, bool>(0))
            .unwrap_or(false);
        if !in_recovery {
            continue;
        }
        let synced = client
            .query_opt(
                "SELECT coalesce(confirmed_flush_lsn::text, '-'), temporary \
                 FROM pg_replication_slots WHERE slot_name = $1 AND synced",
                &[&slot],
            )
            .await
            .map(|row| row.map(|r| (r.get::<_, String>(0), r.get::<_, bool>(1))))
            .map_err(|e| pg_error::reason(&e));
        out.push((target, synced));
    }
    out
}

/// `host:port/db` of a DSN (every host of a multi-host one, comma
/// separated), without credentials, for messages.
pub fn describe_target(dsn: &str) -> String {
    match Dsn::parse(dsn).and_then(|d| d.each_host()) {
        Ok(hosts) => hosts
            .iter()
            .map(|d| describe_config(&d.config))
            .collect::<Vec<_>>()
            .join(","),
        Err(_) => "unparseable DSN".into(),
    }
}

/// `host:port/db` of a (single-host) config.
fn describe_config(c: &tokio_postgres::Config) -> String {
    let host = match c.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = c.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}/{}", c.get_dbname().unwrap_or(""))
}

/// A declared table as found in the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableState {
    pub exists: bool,
    pub primary_key: Vec<String>,
    /// The primary key constraint's name when it is `DEFERRABLE`: its
    /// uniqueness is checked at commit, too late for `ON CONFLICT` and for
    /// a replica identity.
    pub deferrable_key: Option<String>,
    /// `d`efault, `f`ull, `i`ndex or `n`othing.
    pub replica_identity: char,
    /// A declaratively partitioned table (`PARTITION BY`, relkind `p`).
    pub partitioned_root: bool,
    pub has_stamp_column: bool,
    pub triggers: Vec<String>,
    pub columns: Vec<String>,
    /// The type of each of `columns`, with its modifier
    /// (`character varying(20)`).
    pub column_types: Vec<String>,
    /// Columns of type json or jsonb (or a domain over one), with their
    /// type as SQL.
    pub json_columns: Vec<(String, String)>,
}

pub struct Catalog<'a> {
    pub client: &'a Client,
    pub region: &'a str,
}

impl Catalog<'_> {
    fn err(
        &self,
        context: impl Into<String>,
    ) -> impl FnOnce(tokio_postgres::Error) -> CatalogError {
        let region = self.region.to_string();
        let context = context.into();
        move |source| CatalogError::Query {
            region,
            context,
            source,
        }
    }

    pub async fn setting(&self, name: &str) -> Result<String, CatalogError> {
        let row = self
            .client
            .query_one("SELECT current_setting($1)", &[&name])
            .await
            .map_err(self.err(format!("reading setting {name}")))?;
        Ok(row.get(0))
    }

    pub async fn database_name(&self) -> Result<String, CatalogError> {
        let row = self
            .client
            .query_one("SELECT current_database()", &[])
            .await
            .map_err(self.err("reading the database name"))?;
        Ok(row.get(0))
    }

    pub async fn table(&self, table: &TableName) -> Result<TableState, CatalogError> {
        let rows = self
            .client
            .query(
                "SELECT c.oid, c.relreplident::text, c.relkind = 'p' FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                &[&table.schema, &table.name],
            )
            .await
            .map_err(self.err(format!("looking up table {table}")))?;
        let Some(row) = rows.first() else {
            return Ok(TableState {
                exists: false,
                primary_key: vec![],
                deferrable_key: None,
                replica_identity: 'd',
                partitioned_root: false,
                has_stamp_column: false,
                triggers: vec![],
                columns: vec![],
                column_types: vec![],
                json_columns: vec![],
            });
        };
        let oid: u32 = row.get(0);
        let ident: String = row.get(1);
        let partitioned_root: bool = row.get(2);
        let pk = self
            .client
            .query(
                "SELECT a.attname::text FROM pg_index i \
                 JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true \
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                 WHERE i.indrelid = $1 AND i.indisprimary ORDER BY k.ord",
                &[&oid],
            )
            .await
            .map_err(self.err(format!("reading the primary key of {table}")))?
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect();
        let deferrable_key = self
            .client
            .query_opt(
                "SELECT conname::text FROM pg_constraint \
                 WHERE conrelid = $1 AND contype = 'p' AND condeferrable",
                &[&oid],
            )
            .await
            .map_err(self.err(format!("reading the primary key of {table}")))?
            .map(|r| r.get::<_, String>(0));
        // a column is "json" when its type, or the type its domain is
        // over, is json or jsonb
        let column_rows = self
            .client
            .query(
                "SELECT a.attname::text, \
                 coalesce(nullif(t.typbasetype, 0), t.oid) IN ('json'::regtype, 'jsonb'::regtype), \
                 format_type(a.atttypid, NULL), format_type(a.atttypid, a.atttypmod) \
                 FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
                 WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
                &[&oid],
            )
            .await
            .map_err(self.err(format!("reading the columns of {table}")))?;
        let columns: Vec<String> = column_rows.iter().map(|r| r.get::<_, String>(0)).collect();
        let column_types: Vec<String> = column_rows.iter().map(|r| r.get::<_, String>(3)).collect();
        let json_columns: Vec<(String, String)> = column_rows
            .iter()
            .filter(|r| r.get::<_, bool>(1))
            .map(|r| (r.get::<_, String>(0), r.get::<_, String>(2)))
            .collect();
        let triggers = self
            .client
            .query(
                "SELECT tgname::text FROM pg_trigger WHERE tgrelid = $1 AND tgname LIKE 'pgrelay%' ORDER BY 1",
                &[&oid],
            )
            .await
            .map_err(self.err(format!("reading the triggers of {table}")))?
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect();
        Ok(TableState {
            exists: true,
            primary_key: pk,
            deferrable_key,
            replica_identity: ident.chars().next().unwrap_or('d'),
            partitioned_root,
            has_stamp_column: columns.iter().any(|c| c == HLC_COLUMN),
            triggers,
            columns,
            column_types,
            json_columns,
        })
    }

    /// Every declared table's state, keyed by name.
    pub async fn tables(
        &self,
        config: &Config,
    ) -> Result<Vec<(TableName, TableClass, TableState)>, CatalogError> {
        let mut out = Vec::new();
        for t in &config.tables {
            out.push((t.name.clone(), t.class.clone(), self.table(&t.name).await?));
        }
        Ok(out)
    }

    pub async fn slot(&self, slot: &str) -> Result<Option<SlotState>, CatalogError> {
        let rows = self
            .client
            .query(
                "SELECT plugin::text, active, confirmed_flush_lsn::text, \
                 pg_current_wal_lsn()::text, \
                 pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, \
                 coalesce(wal_status, '') \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(self.err(format!("reading replication slot {slot}")))?;
        Ok(rows.first().map(|r| SlotState {
            plugin: r.get(0),
            active: r.get(1),
            confirmed_flush: r
                .get::<_, Option<String>>(2)
                .and_then(|s| s.parse().ok())
                .unwrap_or_default(),
            current_wal: r
                .get::<_, Option<String>>(3)
                .and_then(|s| s.parse().ok())
                .unwrap_or_default(),
            retained_bytes: r.get::<_, Option<i64>>(4).unwrap_or(0),
            wal_status: r.get(5),
        }))
    }

    pub async fn publication_tables(
        &self,
        publication: &str,
    ) -> Result<Option<Vec<TableName>>, CatalogError> {
        let exists = self
            .client
            .query(
                "SELECT 1 FROM pg_publication WHERE pubname = $1",
                &[&publication],
            )
            .await
            .map_err(self.err(format!("reading publication {publication}")))?;
        if exists.is_empty() {
            return Ok(None);
        }
        let rows = self
            .client
            .query(
                "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
                &[&publication],
            )
            .await
            .map_err(self.err(format!("reading publication {publication}")))?;
        Ok(Some(
            rows.iter()
                .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
                .collect(),
        ))
    }

    /// Whether the connected role may replicate (superuser or REPLICATION).
    pub async fn can_replicate(&self) -> Result<bool, CatalogError> {
        let row = self
            .client
            .query_one(
                "SELECT rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .await
            .map_err(self.err("reading the role's privileges"))?;
        Ok(row.get(0))
    }

    /// The connected role's name and whether it is a superuser.
    pub async fn current_role(&self) -> Result<(String, bool), CatalogError> {
        let row = self
            .client
            .query_one(
                "SELECT current_user::text, rolsuper FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .await
            .map_err(self.err("reading the connected role"))?;
        Ok((row.get(0), row.get(1)))
    }

    /// Whether `role` exists, and whether it may replicate.
    pub async fn role(&self, role: &str) -> Result<Option<(bool, bool)>, CatalogError> {
        let row = self
            .client
            .query_opt(
                "SELECT rolsuper, rolreplication FROM pg_roles WHERE rolname = $1",
                &[&role],
            )
            .await
            .map_err(self.err(format!("reading role {role}")))?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    /// The versions of pgrelay's tables recorded in the database (none
    /// where the version table does not exist yet).
    pub async fn schema_versions(&self) -> Result<crate::schema::Installed, CatalogError> {
        let exists: bool = self
            .client
            .query_one(crate::schema::EXISTS_SQL, &[])
            .await
            .map_err(self.err("looking for pgrelay's schema version"))?
            .get(0);
        if !exists {
            return Ok(Default::default());
        }
        let rows = self
            .client
            .query(crate::schema::READ_SQL, &[])
            .await
            .map_err(self.err("reading pgrelay's schema version"))?;
        Ok(crate::schema::Installed::from_rows(
            rows.iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, i32>(1))),
        ))
    }

    /// Whether the server knows parameter privileges (PostgreSQL 15+).
    pub async fn has_parameter_privileges(&self) -> Result<bool, CatalogError> {
        Ok(self.server_version_num().await? >= 150_000)
    }

    /// `server_version_num` (e.g. 180006 for 18.6).
    pub async fn server_version_num(&self) -> Result<i32, CatalogError> {
        Ok(self
            .setting("server_version_num")
            .await?
            .parse()
            .unwrap_or(0))
    }

    /// Replication origins that are not pgrelay's (native subscriptions,
    /// other tools).
    pub async fn foreign_origins(&self) -> Result<Vec<String>, CatalogError> {
        let rows = self
            .client
            .query(
                "SELECT roname FROM pg_replication_origin \
                 WHERE roname NOT LIKE 'pgrelay\\_%' ORDER BY roname",
                &[],
            )
            .await
            .map_err(self.err("reading replication origins".to_string()))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Whether `slot` is a failover slot (PostgreSQL 17+; `None` before).
    pub async fn slot_failover(&self, slot: &str) -> Result<Option<bool>, CatalogError> {
        if !crate::source::server::failover_slots(self.server_version_num().await?) {
            return Ok(None);
        }
        let row = self
            .client
            .query_opt(
                "SELECT failover FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(self.err(format!("reading replication slot {slot}")))?;
        Ok(row.map(|r| r.get(0)))
    }

    /// The privileges of `need` that `role` lacks (empty when the object
    /// does not exist).
    pub async fn missing_privileges(
        &self,
        need: &crate::privileges::Need,
        role: &str,
    ) -> Result<Vec<String>, CatalogError> {
        let (sql, name) = need.missing_sql();
        let privileges: Vec<&str> = need.privileges.to_vec();
        let row = self
            .client
            .query_one(sql, &[&privileges, &name, &role])
            .await
            .map_err(self.err(format!(
                "reading the privileges of {role} on {}",
                need.describe()
            )))?;
        Ok(row.get(0))
    }

    /// Grants on pgrelay's objects to roles other than their owner,
    /// superusers and `except` ([`crate::privileges::FOREIGN_GRANTS_SQL`]).
    pub async fn foreign_grants(
        &self,
        except: &[String],
    ) -> Result<Vec<crate::privileges::ForeignGrant>, CatalogError> {
        let rows = self
            .client
            .query(crate::privileges::FOREIGN_GRANTS_SQL, &[&except])
            .await
            .map_err(self.err("reading the grants on schema pgrelay's objects"))?;
        Ok(rows
            .iter()
            .map(|r| crate::privileges::ForeignGrant {
                kind: r.get(0),
                object: r.get(1),
                grantee: r.get(2),
                privileges: r.get(3),
            })
            .collect())
    }

    /// Primary keys of the declared, non-local tables.
    pub async fn keys(
        &self,
        config: &Config,
    ) -> Result<HashMap<TableName, Vec<String>>, CatalogError> {
        let mut keys = HashMap::new();
        for t in &config.tables {
            if matches!(t.class, TableClass::Local) {
                continue;
            }
            keys.insert(t.name.clone(), self.table(&t.name).await?.primary_key);
        }
        Ok(keys)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotState {
    pub plugin: String,
    pub active: bool,
    pub confirmed_flush: Lsn,
    pub current_wal: Lsn,
    pub retained_bytes: i64,
    /// `reserved`, `extended`, `unreserved`, or `lost`: PostgreSQL
    /// invalidated the slot (it fell more than `max_slot_wal_keep_size`
    /// behind) and the WAL it needed is gone.
    pub wal_status: String,
}

impl SlotState {
    pub fn is_lost(&self) -> bool {
        self.wal_status == "lost"
    }
}

/// What to do about a slot PostgreSQL invalidated.
pub fn lost_slot_message(region: &str, slot: &str) -> String {
    format!(
        "region {region}: replication slot {slot} was invalidated by PostgreSQL (wal_status lost: \
         it fell more than max_slot_wal_keep_size behind, and the WAL it needed is gone); \
         run pgrelay setup --region {region} to create it anew, then \
         pgrelay resync --region {region} to send what was written meanwhile"
    )
}
