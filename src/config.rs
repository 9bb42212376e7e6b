//! The relay's configuration: one TOML file shared by every region.
//!
//! ```text
//!  text ─▶ interpolate ${ENV} ─▶ toml ─▶ Raw* structs ─▶ validate ─▶ Config
//!          (secrets)              (unknown keys rejected   (regions, tables,
//!                                  with their line)         column rules)
//! ```
//!
//! `relay.toml.example` at the repository root documents every key.
//!
//! Error policy: every failure is one [`ConfigError`] naming the file, the
//! line when known, the key, table or region concerned and what to write
//! instead. Messages never quote values that came from the environment (they
//! are secrets) and `Debug` output never shows passwords, hash keys or the
//! HTTP token, because configs end up in logs.
//!
//! Secrets are per region: an unset `${VAR}` inside a region's `dsn`,
//! `setup_dsn` or `hash_key`, a Kafka setting or `http.token` is kept as
//! written and only fails the commands that need that value
//! ([`Config::require`]); anywhere else it fails at once.
//!
//! No IO here except [`load`], which reads the file and calls [`parse`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;
use toml::Spanned;

use crate::event::TableName;

/// Region names go into topic, slot and origin names: keep them short.
pub const MAX_REGION_NAME_LEN: usize = 40;
/// Region ids are the tie-break of HLC stamps (6 bits, 0 reserved).
pub const REGION_IDS: std::ops::RangeInclusive<i64> = 1..=63;
/// A region name that would make `{prefix}.dlq.{region}` ambiguous.
const RESERVED_REGION: &str = "dlq";

// ---------------------------------------------------------------------------
// errors

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{origin}, line {line}: environment variable {var} is not set (or not valid UTF-8); \
         export it, or write $${{ for a literal \"${{\""
    )]
    MissingEnv {
        origin: String,
        line: usize,
        var: String,
    },
    /// A value this command needs holds a variable that is not set.
    #[error(
        "{origin}, line {line}: environment variable {var} is not set (or not valid UTF-8), \
         and {key} needs it for this command; export it"
    )]
    UnsetSecret {
        origin: String,
        line: usize,
        var: String,
        key: String,
    },
    #[error("{origin}, line {line}: {message}")]
    Interpolation {
        origin: String,
        line: usize,
        message: String,
    },
    /// The text is not TOML, a key is unknown, or a value has the wrong type.
    #[error("{}", render_located(.origin, *.line, *.column, .message, .excerpt))]
    Syntax {
        origin: String,
        line: Option<usize>,
        column: Option<usize>,
        message: String,
        /// The offending line as written in the file (before interpolation,
        /// so secrets from the environment never show).
        excerpt: Option<String>,
    },
    /// Well-formed TOML that breaks a rule (undeclared region, missing owner...).
    #[error("{}", render_located(.origin, *.line, None, .message, &None))]
    Invalid {
        origin: String,
        line: Option<usize>,
        message: String,
    },
    #[error("region {region:?} is not declared in {origin}; declared regions: {declared}")]
    UnknownRegion {
        origin: String,
        region: String,
        declared: String,
    },
}

fn render_located(
    origin: &str,
    line: Option<usize>,
    column: Option<usize>,
    message: &str,
    excerpt: &Option<String>,
) -> String {
    let mut out = origin.to_string();
    if let Some(line) = line {
        out.push_str(&format!(", line {line}"));
        if let Some(column) = column {
            out.push_str(&format!(", column {column}"));
        }
    }
    out.push_str(": ");
    out.push_str(message.trim_end());
    if let (Some(line), Some(excerpt)) = (line, excerpt) {
        out.push_str(&format!("\n  {line} | {excerpt}"));
    }
    out
}

// ---------------------------------------------------------------------------
// the validated configuration

/// The validated configuration. Built by [`parse`] / [`load`]; every region
/// named anywhere in it is declared in `regions`.
#[derive(Clone)]
pub struct Config {
    /// Where the config came from (file name), for messages.
    pub origin: String,
    /// Topic prefix: topics are `{prefix}.{source}.{destination}`, dead
    /// letters go to `{prefix}.dlq.{region}`.
    pub prefix: String,
    /// An incoming change stamped further ahead of the local clock than
    /// this waits until the clock has come within this distance of it.
    pub max_clock_skew: Duration,
    /// An incoming change stamped further ahead of the local clock than
    /// this is dead-lettered: the region's clock never follows it.
    pub max_stamp_ahead: Duration,
    /// How long `pgrelay run` keeps retrying an unreachable database or
    /// Kafka cluster at start before it gives up with an error.
    pub startup_timeout: Duration,
    /// Environment variables that were not set, by name (with the line of
    /// their first use). They may only occur in region-scoped secrets (a
    /// region's DSNs and hash key, Kafka settings, the HTTP token): a
    /// command fails on one only when it needs that value (see
    /// [`Config::require`]), so a sidecar holds only its own secrets.
    pub unset: BTreeMap<String, usize>,
    pub capture: CaptureSettings,
    pub apply: ApplySettings,
    pub status: StatusSettings,
    pub http: HttpSettings,
    /// Every region, by name.
    pub regions: BTreeMap<String, Region>,
    /// Declared tables, in file order; names are unique.
    pub tables: Vec<TableConfig>,
}

/// Capture side (`[relay.capture]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureSettings {
    /// Replication slot name; `None` means `pgrelay_{region}`.
    pub slot: Option<String>,
    /// Publication name.
    pub publication: String,
    /// Interval of standby status updates to the primary.
    pub status_interval: Duration,
    /// Bound on records handed to Kafka and not yet acknowledged.
    pub max_in_flight: usize,
    /// Partitions of the topics `setup` creates (a row's history stays in one).
    pub topic_partitions: usize,
    /// Replication factor of the topics `setup` creates; -1: the broker's default.
    pub topic_replication_factor: i32,
    /// What `before` carries for `global` and `owned` tables.
    pub before_image: BeforeImage,
}

/// What the `before` of an update or delete carries (`relay.capture.before_image`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BeforeImage {
    /// The primary key only (deletes; updates that change the key): the
    /// tables keep `REPLICA IDENTITY DEFAULT`, so updates and deletes write
    /// no extra WAL and decode about half as much.
    #[default]
    Key,
    /// The whole old row: `REPLICA IDENTITY FULL`.
    Full,
}

/// Apply side (`[relay.apply]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApplySettings {
    /// A batch (one target transaction) closes at this many records...
    pub batch_max_records: usize,
    /// ...or this long after its first record.
    pub batch_max_wait: Duration,
    /// Attempts on a failing record before it goes to the dead-letter topic.
    pub max_retries: u32,
    /// Tombstones older than this may be purged.
    pub tombstone_horizon: Duration,
    /// How long records naming a column the target does not have (yet)
    /// wait for it before they are dead-lettered.
    pub schema_wait: Duration,
    /// Database sessions applying one source region's records in parallel,
    /// each for its share of the topic's partitions.
    pub sessions_per_source: usize,
}

/// `[relay.status]`: when `pgrelay status` and the metrics call a region
/// pair lagging.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusSettings {
    /// A pair is `lagging` past this many seconds behind...
    pub lagging_after: Duration,
    /// ...or this many bytes of WAL not yet confirmed by the capture side.
    pub lagging_bytes: u64,
}

pub const fn default_lagging_after() -> Duration {
    Duration::from_secs(30)
}
pub const fn default_lagging_bytes() -> u64 {
    256 * 1024 * 1024
}

impl Default for StatusSettings {
    fn default() -> Self {
        StatusSettings {
            lagging_after: default_lagging_after(),
            lagging_bytes: default_lagging_bytes(),
        }
    }
}

/// `[http]`.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct HttpSettings {
    /// Address of `/metrics`, `/healthz`, `/readyz`; `None`: no HTTP server.
    /// A bare port (`"9187"`) binds the loopback address only.
    pub listen: Option<SocketAddr>,
    /// Bearer token `/metrics` requires (`Authorization: Bearer ...`);
    /// `None`: `/metrics` is open to whoever reaches the address.
    pub token: Option<String>,
}

impl fmt::Debug for HttpSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpSettings")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .finish()
    }
}

/// The loopback address a bare `http.listen` port binds.
pub const DEFAULT_HTTP_HOST: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// Shortest `hash_key` accepted, in bytes (HMAC-SHA-256's output size).
pub const MIN_HASH_KEY_LEN: usize = 32;

pub const DEFAULT_PREFIX: &str = "pgrelay";
pub const DEFAULT_PUBLICATION: &str = "pgrelay";

pub const fn default_startup_timeout() -> Duration {
    Duration::from_secs(30)
}
pub const fn default_max_clock_skew() -> Duration {
    Duration::from_millis(500)
}
pub const fn default_max_stamp_ahead() -> Duration {
    Duration::from_secs(300)
}
pub const fn default_status_interval() -> Duration {
    Duration::from_secs(1)
}
pub const fn default_max_in_flight() -> usize {
    100_000
}
pub const fn default_topic_partitions() -> usize {
    6
}
pub const fn default_topic_replication_factor() -> i32 {
    -1
}
pub const fn default_batch_max_records() -> usize {
    5_000
}
pub const fn default_batch_max_wait() -> Duration {
    Duration::from_millis(100)
}
pub const fn default_max_retries() -> u32 {
    5
}
pub const fn default_sessions_per_source() -> usize {
    2
}
pub const fn default_tombstone_horizon() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
pub const fn default_schema_wait() -> Duration {
    Duration::from_secs(600)
}

impl Default for CaptureSettings {
    fn default() -> Self {
        CaptureSettings {
            slot: None,
            publication: DEFAULT_PUBLICATION.to_string(),
            status_interval: default_status_interval(),
            max_in_flight: default_max_in_flight(),
            topic_partitions: default_topic_partitions(),
            topic_replication_factor: default_topic_replication_factor(),
            before_image: BeforeImage::default(),
        }
    }
}

impl Default for ApplySettings {
    fn default() -> Self {
        ApplySettings {
            batch_max_records: default_batch_max_records(),
            batch_max_wait: default_batch_max_wait(),
            max_retries: default_max_retries(),
            tombstone_horizon: default_tombstone_horizon(),
            schema_wait: default_schema_wait(),
            sessions_per_source: default_sessions_per_source(),
        }
    }
}

/// One region: its primary and the Kafka cluster serving it.
#[derive(Clone, PartialEq, Eq)]
pub struct Region {
    pub name: String,
    /// 1..=63, unique, stable forever (the tie-break of HLC stamps).
    pub id: u8,
    /// libpq connection string of the region's primary (may hold a password:
    /// `Debug` redacts it; use [`redact_dsn`] to log it). The sidecar's own
    /// role: `run`, `check`, `status`, `resync` and `dlq` connect with it.
    pub dsn: String,
    /// Connection string `pgrelay setup` uses (a role that may create the
    /// schema, triggers, publication and slot); `None`: `dsn`.
    pub setup_dsn: Option<String>,
    /// The role `pgrelay setup` grants the sidecar's privileges to:
    /// `run_role`, else the user of `dsn` when `setup_dsn` is set.
    pub run_role: Option<String>,
    /// Key of this region's hashed columns (HMAC-SHA-256), at least
    /// [`MIN_HASH_KEY_LEN`] bytes; only this region's sidecar needs it.
    pub hash_key: Option<String>,
    /// Names the key in every hashed value (`{id}:{hex}`), so keys can rotate.
    pub hash_key_id: String,
    /// The cluster holding the topics destined to this region (the region's
    /// own `kafka` table, else the default `[kafka]`).
    pub kafka: KafkaCluster,
}

impl Region {
    /// The connection string `pgrelay setup` uses.
    pub fn setup_dsn(&self) -> &str {
        self.setup_dsn.as_deref().unwrap_or(&self.dsn)
    }

    /// The role `pgrelay setup` grants the sidecar's privileges to, if any:
    /// `run_role`, else (with a separate `setup_dsn`) the user of `dsn`.
    pub fn grantee(&self) -> Option<String> {
        if let Some(role) = &self.run_role {
            return Some(role.clone());
        }
        self.setup_dsn.as_ref()?;
        dsn_user(&self.dsn)
    }
}

/// The `user` of a libpq connection string (key/value or URL form).
pub fn dsn_user(dsn: &str) -> Option<String> {
    let trimmed = dsn.trim_start();
    if let Some(rest) = trimmed
        .strip_prefix("postgres://")
        .or_else(|| trimmed.strip_prefix("postgresql://"))
    {
        let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
        if let Some(at) = authority.rfind('@') {
            let user = authority[..at].split(':').next().unwrap_or("");
            if !user.is_empty() {
                return Some(user.to_string());
            }
        }
        let query = rest.split_once('?').map_or("", |(_, q)| q);
        return query
            .split('&')
            .find_map(|p| p.strip_prefix("user="))
            .map(str::to_string);
    }
    trimmed.split_whitespace().find_map(|part| {
        let (k, v) = part.split_once('=')?;
        (k.trim() == "user").then(|| v.trim_matches('\'').to_string())
    })
}

impl fmt::Debug for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Region")
            .field("name", &self.name)
            .field("id", &self.id)
            .field("dsn", &redact_dsn(&self.dsn))
            .field("setup_dsn", &self.setup_dsn.as_deref().map(redact_dsn))
            .field("run_role", &self.run_role)
            .field("hash_key", &self.hash_key.as_ref().map(|_| "***"))
            .field("hash_key_id", &self.hash_key_id)
            .field("kafka", &self.kafka)
            .finish()
    }
}

/// A Kafka cluster: bootstrap brokers and librdkafka properties passed
/// through verbatim.
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaCluster {
    pub brokers: String,
    pub properties: BTreeMap<String, String>,
}

impl fmt::Debug for KafkaCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let properties: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let v = if is_secret_property(k) {
                    "***"
                } else {
                    v.as_str()
                };
                (k.as_str(), v)
            })
            .collect();
        f.debug_struct("KafkaCluster")
            .field("brokers", &self.brokers)
            .field("properties", &properties)
            .finish()
    }
}

/// Refuses librdkafka settings that would send a password in clear, turn
/// off the broker's certificate checks, or need a SASL mechanism this build
/// lacks.
fn kafka_security(properties: &BTreeMap<String, String>) -> Result<(), String> {
    let get = |key: &str| {
        properties
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.trim().to_ascii_lowercase())
    };
    let protocol = get("security.protocol").unwrap_or_else(|| "plaintext".into());
    let mechanism = get("sasl.mechanisms")
        .or_else(|| get("sasl.mechanism"))
        .unwrap_or_else(|| "gssapi".into());
    if protocol.starts_with("sasl_") {
        match mechanism.as_str() {
            "plain" if protocol == "sasl_plaintext" => {
                return Err(
                    "security.protocol = \"sasl_plaintext\" with sasl.mechanisms = \"PLAIN\" \
                     sends the Kafka password in clear: use \"sasl_ssl\", or a SCRAM mechanism \
                     (SCRAM-SHA-256 or SCRAM-SHA-512)"
                        .into(),
                )
            }
            "plain" | "scram-sha-256" | "scram-sha-512" | "oauthbearer" => {}
            other => {
                return Err(format!(
                    "sasl.mechanisms = {other:?} is not supported: use SCRAM-SHA-256, \
                     SCRAM-SHA-512 or PLAIN (GSSAPI/Kerberos is not built in)"
                ))
            }
        }
    }
    if get("enable.ssl.certificate.verification").as_deref() == Some("false") {
        return Err(
            "enable.ssl.certificate.verification = false turns off the broker's certificate \
             check; give the broker's CA in ssl.ca.location instead"
                .into(),
        );
    }
    if get("ssl.endpoint.identification.algorithm").as_deref() == Some("none") {
        return Err(
            "ssl.endpoint.identification.algorithm = \"none\" turns off the broker's host name \
             check; use a certificate issued for the broker's address instead"
                .into(),
        );
    }
    Ok(())
}

fn is_secret_property(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["password", "secret", "token", "sasl.jaas.config"]
        .iter()
        .any(|s| key.contains(s))
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("origin", &self.origin)
            .field("prefix", &self.prefix)
            .field("max_clock_skew", &self.max_clock_skew)
            .field("max_stamp_ahead", &self.max_stamp_ahead)
            .field("unset", &self.unset)
            .field("capture", &self.capture)
            .field("apply", &self.apply)
            .field("http", &self.http)
            .field("regions", &self.regions)
            .field("tables", &self.tables)
            .finish()
    }
}

/// One declared table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableConfig {
    pub name: TableName,
    pub class: TableClass,
    /// Column rules, applied before a row leaves the region. At most one
    /// rule per column and destination.
    pub columns: Vec<ColumnRule>,
}

/// The data class of a table (brief §3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TableClass {
    /// Never leaves its region.
    Local,
    /// Goes everywhere; any region writes; HLC last-writer-wins.
    Global,
    /// Goes everywhere; only `owner` writes.
    Owned { owner: String },
    /// Each row has a home region, read from `home_column`.
    Partitioned {
        home_column: String,
        /// Column value -> home region. A value equal to a region name is
        /// that region without an alias.
        aliases: BTreeMap<String, String>,
        /// Home region -> extra destinations allowed for rows homed there
        /// (the home region itself is always allowed).
        allow: BTreeMap<String, BTreeSet<String>>,
    },
}

impl TableClass {
    /// The name used in the file (`local`, `global`, ...).
    pub fn as_str(&self) -> &'static str {
        match self {
            TableClass::Local => "local",
            TableClass::Global => "global",
            TableClass::Owned { .. } => "owned",
            TableClass::Partitioned { .. } => "partitioned",
        }
    }
}

/// What happens to one column before it leaves the region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnRule {
    pub column: String,
    pub action: ColumnAction,
    /// Destinations the rule applies to; `None`: every destination.
    pub to: Option<BTreeSet<String>>,
}

impl ColumnRule {
    pub fn applies_to(&self, destination: &str) -> bool {
        self.to.as_ref().is_none_or(|to| to.contains(destination))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ColumnAction {
    /// Remove the column.
    Drop,
    /// Replace the value by `{key_id}:` + hex(HMAC-SHA-256(source region's
    /// hash_key, value)).
    Hash,
    /// Replace a non-NULL value by this text.
    Mask(String),
}

impl ColumnAction {
    pub fn as_str(&self) -> &'static str {
        match self {
            ColumnAction::Drop => "drop",
            ColumnAction::Hash => "hash",
            ColumnAction::Mask(_) => "mask",
        }
    }
}

impl TableConfig {
    /// Columns the config names for this table (home column, rule columns)
    /// that are not in `columns` (the table's actual columns). Rules on a
    /// missing column are ignored when routing, so `check` reports these.
    pub fn missing_columns<'a>(&'a self, columns: &[&str]) -> Vec<&'a str> {
        let mut missing = Vec::new();
        if let TableClass::Partitioned { home_column, .. } = &self.class {
            if !columns.contains(&home_column.as_str()) {
                missing.push(home_column.as_str());
            }
        }
        for rule in &self.columns {
            let name = rule.column.as_str();
            if !columns.contains(&name) && !missing.contains(&name) {
                missing.push(name);
            }
        }
        missing
    }
}

impl Config {
    /// The declared table of that name, if any.
    pub fn table(&self, name: &TableName) -> Option<&TableConfig> {
        self.tables.iter().find(|t| t.name == *name)
    }

    /// The region of that name; the error lists the declared ones.
    pub fn region(&self, name: &str) -> Result<&Region, ConfigError> {
        self.regions
            .get(name)
            .ok_or_else(|| ConfigError::UnknownRegion {
                origin: self.origin.clone(),
                region: name.to_string(),
                declared: self.declared_regions(),
            })
    }

    /// Whether a table of `class` needs `REPLICA IDENTITY FULL`: `partitioned` tables
    /// always (a row's old home decides where an update goes), the others
    /// when `relay.capture.before_image = "full"`.
    pub fn needs_full_identity(&self, class: &TableClass) -> bool {
        matches!(class, TableClass::Partitioned { .. })
            || self.capture.before_image == BeforeImage::Full
    }

    /// The Kafka cluster holding the topics destined to `region` (and its
    /// dead-letter topic).
    ///
    /// # Panics
    /// If `region` is not declared: callers pass region names that came
    /// from this config or were checked with [`Config::region`].
    pub fn kafka_for(&self, region: &str) -> &KafkaCluster {
        match self.region(region) {
            Ok(region) => &region.kafka,
            Err(e) => panic!("kafka_for: {e}"),
        }
    }

    /// The topic carrying changes from `source` to `destination`.
    pub fn topic(&self, source: &str, destination: &str) -> String {
        format!("{}.{}.{}", self.prefix, source, destination)
    }

    /// The dead-letter topic of `region`'s apply side.
    pub fn dlq_topic(&self, region: &str) -> String {
        format!("{}.{}.{}", self.prefix, RESERVED_REGION, region)
    }

    /// The replication slot on `region`'s primary.
    pub fn slot_name(&self, region: &str) -> String {
        match &self.capture.slot {
            Some(slot) => slot.clone(),
            None => format!("pgrelay_{region}"),
        }
    }

    pub fn publication_name(&self) -> &str {
        &self.capture.publication
    }

    /// `cn, eu, us`: for messages.
    pub fn declared_regions(&self) -> String {
        join_names(self.regions.keys())
    }

    /// The first unset variable `value` holds, if any.
    pub fn unresolved(&self, value: &str) -> Option<(&str, usize)> {
        if self.unset.is_empty() || !value.contains("${") {
            return None;
        }
        self.unset
            .iter()
            .find(|(var, _)| value.contains(&format!("${{{var}}}")))
            .map(|(var, line)| (var.as_str(), *line))
    }

    /// Fails with the variable to export when a value a command needs
    /// holds an environment variable that is not set.
    pub fn require(&self, needs: &[Need<'_>]) -> Result<(), ConfigError> {
        for need in needs {
            for (key, value) in self.needed_values(need)? {
                if let Some((var, line)) = self.unresolved(value) {
                    return Err(ConfigError::UnsetSecret {
                        origin: self.origin.clone(),
                        line,
                        var: var.to_string(),
                        key,
                    });
                }
            }
        }
        Ok(())
    }

    fn needed_values<'a>(&'a self, need: &Need<'_>) -> Result<Vec<(String, &'a str)>, ConfigError> {
        Ok(match need {
            Need::Database(r) => vec![(format!("regions.{r}.dsn"), self.region(r)?.dsn.as_str())],
            Need::SetupDatabase(r) => {
                let region = self.region(r)?;
                match &region.setup_dsn {
                    Some(dsn) => vec![(format!("regions.{r}.setup_dsn"), dsn.as_str())],
                    None => vec![(format!("regions.{r}.dsn"), region.dsn.as_str())],
                }
            }
            Need::HashKey(r) => self
                .region(r)?
                .hash_key
                .iter()
                .map(|k| (format!("regions.{r}.hash_key"), k.as_str()))
                .collect(),
            Need::Kafka(r) => {
                let cluster = &self.region(r)?.kafka;
                let key = format!("the Kafka cluster of region {r}");
                std::iter::once((format!("{key} (brokers)"), cluster.brokers.as_str()))
                    .chain(
                        cluster
                            .properties
                            .iter()
                            .map(|(k, v)| (format!("{key} (property {k})"), v.as_str())),
                    )
                    .collect()
            }
            Need::HttpToken => self
                .http
                .token
                .iter()
                .map(|t| ("http.token".to_string(), t.as_str()))
                .collect(),
        })
    }

    /// Needs of `pgrelay run --region` for the sides it runs: its own
    /// database, its hash key (capture), the clusters of its outgoing
    /// topics (capture) and of its incoming and dead-letter topics (apply).
    pub fn run_needs<'a>(&'a self, region: &'a str, capture: bool, apply: bool) -> Vec<Need<'a>> {
        let mut needs = vec![Need::Database(region)];
        if capture {
            needs.push(Need::HashKey(region));
            needs.extend(
                self.regions
                    .keys()
                    .filter(|d| *d != region)
                    .map(|d| Need::Kafka(d)),
            );
        }
        if apply {
            needs.push(Need::Kafka(region));
        }
        if self.http.listen.is_some() {
            needs.push(Need::HttpToken);
        }
        needs
    }

    /// The hash key of `region`'s hashed columns; an error names the unset
    /// variable it is read from.
    pub fn hash_key(&self, region: &str) -> Result<Option<&str>, ConfigError> {
        self.require(&[Need::HashKey(region)])?;
        Ok(self.region(region)?.hash_key.as_deref())
    }
}

/// A value a command needs (see [`Config::require`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need<'a> {
    /// `regions.X.dsn`.
    Database(&'a str),
    /// `regions.X.setup_dsn` (else its `dsn`).
    SetupDatabase(&'a str),
    /// `regions.X.hash_key`.
    HashKey(&'a str),
    /// The Kafka cluster holding the topics destined to region X.
    Kafka(&'a str),
    /// `http.token`.
    HttpToken,
}

fn join_names<'a>(names: impl IntoIterator<Item = &'a String>) -> String {
    names
        .into_iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Hides the password of a libpq connection string, in key/value form
/// (`password=...`, quoted or not) or URL form (`postgres://u:pw@h/db`,
/// `?password=...`).
pub fn redact_dsn(dsn: &str) -> String {
    let trimmed = dsn.trim_start();
    if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
        redact_dsn_url(dsn)
    } else {
        redact_dsn_key_values(dsn)
    }
}

fn redact_dsn_url(dsn: &str) -> String {
    let mut out = String::with_capacity(dsn.len());
    let scheme_end = dsn.find("://").map_or(0, |i| i + 3);
    let rest = &dsn[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    out.push_str(&dsn[..scheme_end]);
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            match userinfo.find(':') {
                Some(colon) => {
                    out.push_str(&userinfo[..colon]);
                    out.push_str(":***");
                }
                None => out.push_str(userinfo),
            }
            out.push_str(&authority[at..]);
        }
        None => out.push_str(authority),
    }
    let tail = &rest[authority_end..];
    // query parameters: `password=` values end at `&` or `#`
    let mut parts = Vec::new();
    let (path_query, fragment) = match tail.find('#') {
        Some(i) => (&tail[..i], &tail[i..]),
        None => (tail, ""),
    };
    match path_query.split_once('?') {
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            for param in query.split('&') {
                let key = param.split('=').next().unwrap_or("");
                if key.eq_ignore_ascii_case("password") || key.eq_ignore_ascii_case("sslpassword") {
                    parts.push(format!("{key}=***"));
                } else {
                    parts.push(param.to_string());
                }
            }
            out.push_str(&parts.join("&"));
        }
        None => out.push_str(path_query),
    }
    out.push_str(fragment);
    out
}

fn redact_dsn_key_values(dsn: &str) -> String {
    let bytes = dsn.as_bytes();
    let mut out = String::with_capacity(dsn.len());
    let mut i = 0;
    while i < bytes.len() {
        // at the start of a key (after whitespace)?
        let at_key_start = i == 0 || bytes[i - 1].is_ascii_whitespace();
        let key = ["sslpassword", "password"].into_iter().find(|k| {
            at_key_start
                && dsn.len() >= i + k.len()
                && dsn[i..i + k.len()].eq_ignore_ascii_case(k)
                && dsn[i + k.len()..].trim_start().starts_with('=')
        });
        let Some(key) = key else {
            let c = dsn[i..].chars().next().unwrap_or_default();
            out.push(c);
            i += c.len_utf8().max(1);
            continue;
        };
        // copy `key  =  `
        let mut j = i + key.len();
        while j < bytes.len() && bytes[j] != b'=' {
            j += 1;
        }
        j += 1;
        while j < bytes.len() && bytes[j].is_ascii_whitespace() {
            j += 1;
        }
        out.push_str(&dsn[i..j]);
        // skip the value
        if j < bytes.len() && bytes[j] == b'\'' {
            j += 1;
            while j < bytes.len() && bytes[j] != b'\'' {
                j += if bytes[j] == b'\\' { 2 } else { 1 };
            }
            j = (j + 1).min(bytes.len());
            out.push_str("'***'");
        } else {
            while j < bytes.len() && !bytes[j].is_ascii_whitespace() {
                j += if bytes[j] == b'\\' { 2 } else { 1 };
            }
            j = j.min(bytes.len());
            out.push_str("***");
        }
        i = j;
    }
    out
}

// ---------------------------------------------------------------------------
// entry points

/// Reads `path` and parses it with [`parse`].
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text, &path.display().to_string())
}

/// Parses and validates a config; `${VAR}` reads the process environment.
/// `origin` (the file name) prefixes every message.
pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
    parse_with_env(text, origin, |name| std::env::var(name).ok())
}

/// [`parse`] with an explicit environment (tests, tools).
pub fn parse_with_env(
    text: &str,
    origin: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let mut unset = Vec::new();
    let interpolated = interpolate(text, origin, &env, &mut unset)?;
    // an unset variable may be what made the text invalid: name it first
    let first_unset = || {
        unset.first().map(|(var, line)| ConfigError::MissingEnv {
            origin: origin.to_string(),
            line: *line,
            var: var.clone(),
        })
    };
    let raw: RawConfig = toml::from_str(&interpolated).map_err(|e| {
        first_unset().unwrap_or_else(|| syntax_error(e, origin, text, &interpolated))
    })?;
    let mut first_lines: BTreeMap<String, usize> = BTreeMap::new();
    let mut uses: BTreeMap<&str, usize> = BTreeMap::new();
    for (var, line) in &unset {
        first_lines.entry(var.clone()).or_insert(*line);
        *uses.entry(var.as_str()).or_default() += 1;
    }
    // every use of an unset variable must be in a region-scoped secret
    let scoped = raw.scoped_values();
    for (var, count) in &uses {
        let marker = format!("${{{var}}}");
        let in_scope: usize = scoped.iter().map(|v| v.matches(&marker).count()).sum();
        if in_scope < *count {
            return Err(ConfigError::MissingEnv {
                origin: origin.to_string(),
                line: first_lines[*var],
                var: var.to_string(),
            });
        }
    }
    let mut config = Validator {
        origin,
        text: &interpolated,
        unset: &first_lines,
    }
    .validate(raw)
    .map_err(|e| first_unset().unwrap_or(e))?;
    config.unset = first_lines;
    Ok(config)
}

fn syntax_error(e: toml::de::Error, origin: &str, raw: &str, interpolated: &str) -> ConfigError {
    let Some(span) = e.span() else {
        return ConfigError::Syntax {
            origin: origin.to_string(),
            line: None,
            column: None,
            message: e.message().to_string(),
            excerpt: None,
        };
    };
    let (line, column) = line_column(interpolated, span.start);
    // Interpolation keeps line numbers, so the raw line is the same line;
    // show it (not the interpolated one, which may hold secrets), and the
    // column only when interpolation did not change that line.
    let raw_line = raw.lines().nth(line - 1).unwrap_or("");
    let new_line = interpolated.lines().nth(line - 1).unwrap_or("");
    ConfigError::Syntax {
        origin: origin.to_string(),
        line: Some(line),
        column: (raw_line == new_line).then_some(column),
        message: e.message().to_string(),
        excerpt: Some(raw_line.to_string()),
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

// ---------------------------------------------------------------------------
// ${ENV} interpolation

/// Where in the TOML text a `${` occurs: decides how a value is escaped.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Lexical {
    /// Outside strings: the value is inserted verbatim.
    Bare,
    Comment,
    /// `"..."`
    Basic,
    /// `"""..."""`
    MultiBasic,
    /// `'...'`
    Literal,
    /// `'''...'''`
    MultiLiteral,
}

/// Replaces `${VAR}` by the variable's value and `$${` by `${`.
///
/// A variable that is not set is left as written inside a string (and
/// listed in `unset`, with its line): the caller decides whether the value
/// holding it is needed. Outside strings it is an error at once.
///
/// A tiny TOML lexer tracks strings and comments so that a value is escaped
/// for the string it lands in (a password may hold `"` or `\`) and comments
/// are left alone (they may mention `${VAR}` freely). Values never contain a
/// line break after escaping, so line numbers stay those of the file.
fn interpolate(
    text: &str,
    origin: &str,
    env: &dyn Fn(&str) -> Option<String>,
    unset: &mut Vec<(String, usize)>,
) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(text.len());
    let mut state = Lexical::Bare;
    let mut line = 1;
    let mut i = 0;
    while i < text.len() {
        let rest = &text[i..];
        let c = rest.chars().next().unwrap_or_default();
        if state != Lexical::Comment && rest.starts_with("$${") {
            out.push_str("${");
            i += 3;
            continue;
        }
        if state != Lexical::Comment && rest.starts_with("${") {
            let end = rest.find('}').filter(|&e| !rest[..e].contains('\n'));
            let Some(end) = end else {
                return Err(ConfigError::Interpolation {
                    origin: origin.to_string(),
                    line,
                    message: "\"${\" without a closing \"}\" on the same line; \
                              write $${ for a literal \"${\""
                        .to_string(),
                });
            };
            let name = &rest[2..end];
            if !is_env_name(name) {
                return Err(ConfigError::Interpolation {
                    origin: origin.to_string(),
                    line,
                    message: format!(
                        "${{{name}}}: not a variable name (letters, digits and _, \
                         not starting with a digit); write $${{ for a literal \"${{\""
                    ),
                });
            }
            let value = match env(name) {
                Some(value) => value,
                None if matches!(state, Lexical::Bare | Lexical::Comment) => {
                    return Err(ConfigError::MissingEnv {
                        origin: origin.to_string(),
                        line,
                        var: name.to_string(),
                    })
                }
                None => {
                    unset.push((name.to_string(), line));
                    out.push_str(&rest[..=end]);
                    i += end + 1;
                    continue;
                }
            };
            insert_value(&mut out, &value, state).map_err(|why| ConfigError::Interpolation {
                origin: origin.to_string(),
                line,
                message: format!("the value of environment variable {name} {why}"),
            })?;
            i += end + 1;
            continue;
        }
        let (next, consumed) = lex_step(state, rest, c);
        out.push_str(&rest[..consumed]);
        line += rest[..consumed].matches('\n').count();
        state = next;
        i += consumed;
    }
    Ok(out)
}

/// One lexer step from `state` at the start of `rest` (whose first char is
/// `c`): the next state and how many bytes to copy.
fn lex_step(state: Lexical, rest: &str, c: char) -> (Lexical, usize) {
    let one = c.len_utf8();
    match state {
        Lexical::Bare => match c {
            '#' => (Lexical::Comment, one),
            '"' if rest.starts_with("\"\"\"") => (Lexical::MultiBasic, 3),
            '"' => (Lexical::Basic, one),
            '\'' if rest.starts_with("'''") => (Lexical::MultiLiteral, 3),
            '\'' => (Lexical::Literal, one),
            _ => (Lexical::Bare, one),
        },
        Lexical::Comment => match c {
            '\n' => (Lexical::Bare, one),
            _ => (Lexical::Comment, one),
        },
        Lexical::Basic => match c {
            '\\' => (Lexical::Basic, escaped_len(rest)),
            '"' | '\n' => (Lexical::Bare, one),
            _ => (Lexical::Basic, one),
        },
        Lexical::MultiBasic => match c {
            '\\' => (Lexical::MultiBasic, escaped_len(rest)),
            '"' if rest.starts_with("\"\"\"") => (Lexical::Bare, quote_run(rest, '"')),
            _ => (Lexical::MultiBasic, one),
        },
        Lexical::Literal => match c {
            '\'' | '\n' => (Lexical::Bare, one),
            _ => (Lexical::Literal, one),
        },
        Lexical::MultiLiteral => match c {
            '\'' if rest.starts_with("'''") => (Lexical::Bare, quote_run(rest, '\'')),
            _ => (Lexical::MultiLiteral, one),
        },
    }
}

/// A backslash and the character it escapes.
fn escaped_len(rest: &str) -> usize {
    1 + rest[1..].chars().next().map_or(0, char::len_utf8)
}

/// A closing `"""` may be preceded by up to two quotes of content.
fn quote_run(rest: &str, quote: char) -> usize {
    rest.chars().take(5).take_while(|&c| c == quote).count()
}

fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Appends `value` escaped for the lexical context, or says why it can't be.
fn insert_value(out: &mut String, value: &str, state: Lexical) -> Result<(), &'static str> {
    match state {
        Lexical::Basic | Lexical::MultiBasic => {
            for c in value.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
                    c => out.push(c),
                }
            }
        }
        Lexical::Literal => {
            if value.contains(['\'', '\n', '\r']) {
                return Err(
                    "contains a quote or a line break, which a '...' string cannot \
                            hold; use a \"...\" string instead",
                );
            }
            out.push_str(value);
        }
        Lexical::MultiLiteral => {
            if value.contains("'''") || value.contains(['\n', '\r']) {
                return Err("contains ''' or a line break; use a \"...\" string instead");
            }
            out.push_str(value);
        }
        Lexical::Bare => {
            if value.contains(['\n', '\r']) {
                return Err("contains a line break; put ${...} inside a \"...\" string");
            }
            out.push_str(value);
        }
        Lexical::Comment => out.push_str(value),
    }
    Ok(())
}

/// `http.listen`: `"9187"` or `":9187"` (the loopback address), or an IP
/// address and port.
fn parse_listen(text: &str) -> Option<SocketAddr> {
    let text = text.trim();
    let port = text.strip_prefix(':').unwrap_or(text);
    if let Ok(port) = port.parse::<u16>() {
        return Some(SocketAddr::new(DEFAULT_HTTP_HOST, port));
    }
    text.parse().ok()
}

// ---------------------------------------------------------------------------
// durations

/// Parses `"250ms"`, `"5s"`, `"2m"`, `"1h"`, `"7d"`: a whole number and a unit.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(digits);
    let bad = || {
        format!(
            "invalid duration {s:?}: write a whole number followed by ms, s, m, h or d \
             (e.g. \"250ms\", \"5s\", \"2m\", \"1h\", \"7d\")"
        )
    };
    let n: u64 = number.parse().map_err(|_| bad())?;
    let millis_per_unit: u64 = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    n.checked_mul(millis_per_unit)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("duration {s:?} is too large"))
}

/// A duration written as a string; parsed while deserializing so a bad one
/// is reported with its line.
#[derive(Clone, Copy, Debug)]
struct HumanDuration(Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as \"250ms\", \"5s\", \"2m\", \"1h\" or \"7d\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<HumanDuration, E> {
                parse_duration(v).map(HumanDuration).map_err(E::custom)
            }
        }
        d.deserialize_str(Visitor)
    }
}

/// A librdkafka property value: written as a string, number or boolean,
/// always passed on as a string.
#[derive(Clone, Debug)]
struct PropertyValue(String);

impl<'de> Deserialize<'de> for PropertyValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = PropertyValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a librdkafka property value (string, number or boolean)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PropertyValue, E> {
                Ok(PropertyValue(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PropertyValue, E> {
                Ok(PropertyValue(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PropertyValue, E> {
                Ok(PropertyValue(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<PropertyValue, E> {
                Ok(PropertyValue(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<PropertyValue, E> {
                Ok(PropertyValue(v.to_string()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

// ---------------------------------------------------------------------------
// raw structs: the file's shape, nothing checked beyond types

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    relay: RawRelay,
    #[serde(default)]
    http: RawHttp,
    kafka: Option<RawKafka>,
    #[serde(default)]
    regions: BTreeMap<String, RawRegion>,
    #[serde(default)]
    tables: Vec<RawTable>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRelay {
    prefix: Option<String>,
    max_clock_skew: Option<HumanDuration>,
    max_stamp_ahead: Option<HumanDuration>,
    startup_timeout: Option<HumanDuration>,
    /// Replaced by per-region `hash_key`: refused with a pointer to it.
    hash_salt: Option<toml::Value>,
    #[serde(default)]
    capture: RawCapture,
    #[serde(default)]
    apply: RawApply,
    #[serde(default)]
    status: RawStatus,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStatus {
    lagging_after: Option<HumanDuration>,
    lagging_bytes: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCapture {
    slot: Option<String>,
    publication: Option<String>,
    status_interval: Option<HumanDuration>,
    max_in_flight: Option<i64>,
    topic_partitions: Option<i64>,
    topic_replication_factor: Option<i64>,
    before_image: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawApply {
    batch_max_records: Option<i64>,
    batch_max_wait: Option<HumanDuration>,
    max_retries: Option<i64>,
    tombstone_horizon: Option<HumanDuration>,
    schema_wait: Option<HumanDuration>,
    sessions_per_source: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    listen: Option<String>,
    token: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKafka {
    brokers: String,
    #[serde(default)]
    properties: BTreeMap<String, PropertyValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegion {
    id: i64,
    dsn: String,
    setup_dsn: Option<String>,
    run_role: Option<String>,
    hash_key: Option<String>,
    hash_key_id: Option<String>,
    kafka: Option<RawKafka>,
}

impl RawKafka {
    fn values(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.brokers.as_str()).chain(self.properties.values().map(|v| v.0.as_str()))
    }
}

impl RawConfig {
    /// The values that may hold unset variables: each region's DSNs and
    /// hash key, the Kafka settings, the HTTP token. Commands check the
    /// ones they use ([`Config::require`]).
    fn scoped_values(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for region in self.regions.values() {
            out.push(&region.dsn);
            out.extend(region.setup_dsn.as_deref());
            out.extend(region.hash_key.as_deref());
            if let Some(kafka) = &region.kafka {
                out.extend(kafka.values());
            }
        }
        if let Some(kafka) = &self.kafka {
            out.extend(kafka.values());
        }
        out.extend(self.http.token.as_deref());
        out
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    name: Spanned<String>,
    class: RawClass,
    owner: Option<String>,
    home_column: Option<String>,
    aliases: Option<BTreeMap<String, String>>,
    allow: Option<BTreeMap<String, Vec<String>>>,
    #[serde(default)]
    columns: Vec<RawColumnRule>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum RawClass {
    Local,
    Global,
    Owned,
    Partitioned,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawColumnRule {
    name: String,
    action: RawAction,
    mask: Option<String>,
    to: Option<Vec<String>>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum RawAction {
    Drop,
    Hash,
    Mask,
}

// ---------------------------------------------------------------------------
// validation: raw -> Config

struct Validator<'a> {
    origin: &'a str,
    /// The interpolated text, to turn spans into line numbers.
    text: &'a str,
    /// Variables that were not set (values holding them are not checked).
    unset: &'a BTreeMap<String, usize>,
}

impl Validator<'_> {
    fn is_unresolved(&self, value: &str) -> bool {
        value.contains("${")
            && self
                .unset
                .keys()
                .any(|var| value.contains(&format!("${{{var}}}")))
    }

    fn invalid(&self, line: Option<usize>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin.to_string(),
            line,
            message: message.into(),
        }
    }

    fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let prefix = raw
            .relay
            .prefix
            .unwrap_or_else(|| DEFAULT_PREFIX.to_string());
        if prefix.is_empty()
            || !prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(self.invalid(
                None,
                format!(
                    "relay.prefix = {prefix:?}: a topic prefix needs letters, digits, '.', '_' \
                     or '-' only (Kafka topic characters)"
                ),
            ));
        }
        let max_clock_skew = self.positive(
            "relay.max_clock_skew",
            raw.relay.max_clock_skew,
            default_max_clock_skew(),
        )?;
        let max_stamp_ahead = self.positive(
            "relay.max_stamp_ahead",
            raw.relay.max_stamp_ahead,
            default_max_stamp_ahead(),
        )?;
        if max_stamp_ahead < max_clock_skew {
            return Err(self.invalid(
                None,
                format!(
                    "relay.max_stamp_ahead ({max_stamp_ahead:?}) is below relay.max_clock_skew \
                     ({max_clock_skew:?}): changes that far ahead are dead-lettered, so it must be \
                     at least the skew they are allowed to wait out"
                ),
            ));
        }
        if raw.relay.hash_salt.is_some() {
            return Err(self.invalid(
                None,
                "relay.hash_salt is no longer used: hashed columns are keyed per source \
                 region now (HMAC-SHA-256). Set hash_key (at least 32 bytes, e.g. \
                 hash_key = \"${PGRELAY_US_HASH_KEY}\") and hash_key_id (e.g. \"k1\") under \
                 each [regions.NAME] whose tables hash columns, then remove relay.hash_salt; \
                 README \"Keyed pseudonyms\" explains the migration",
            ));
        }
        let regions = self.regions(raw.regions, raw.kafka)?;
        let capture = self.capture(raw.relay.capture)?;
        let apply = self.apply(raw.relay.apply)?;
        let status = StatusSettings {
            lagging_after: self.positive(
                "relay.status.lagging_after",
                raw.relay.status.lagging_after,
                default_lagging_after(),
            )?,
            lagging_bytes: self.count(
                "relay.status.lagging_bytes",
                raw.relay.status.lagging_bytes,
                default_lagging_bytes() as usize,
                1,
            )? as u64,
        };
        let listen = match raw.http.listen {
            None => None,
            Some(addr) => Some(parse_listen(&addr).ok_or_else(|| {
                self.invalid(
                    None,
                    format!(
                        "http.listen = {addr:?}: expected a port (\"9187\", bound to 127.0.0.1) \
                         or an IP address and port such as \"127.0.0.1:9187\""
                    ),
                )
            })?),
        };
        if let Some(token) = &raw.http.token {
            if !self.is_unresolved(token) && token.trim().len() < 16 {
                return Err(self.invalid(
                    None,
                    "http.token is shorter than 16 characters: use a long random secret \
                     (e.g. token = \"${METRICS_TOKEN}\"), or remove it to leave /metrics open",
                ));
            }
        }
        let mut tables: Vec<TableConfig> = Vec::with_capacity(raw.tables.len());
        let mut lines: Vec<usize> = Vec::with_capacity(raw.tables.len());
        for raw_table in raw.tables {
            let line = line_column(self.text, raw_table.name.span().start).0;
            let table = self.table(raw_table, line, &regions)?;
            if let Some(i) = tables.iter().position(|t| t.name == table.name) {
                return Err(self.invalid(
                    Some(line),
                    format!(
                        "table {} is declared twice (first on line {}); merge the two entries",
                        table.name, lines[i]
                    ),
                ));
            }
            tables.push(table);
            lines.push(line);
        }
        self.hash_keys_declared(&tables, &lines, &regions)?;
        Ok(Config {
            origin: self.origin.to_string(),
            prefix,
            max_clock_skew,
            max_stamp_ahead,
            startup_timeout: raw
                .relay
                .startup_timeout
                .map_or(default_startup_timeout(), |d| d.0),
            unset: BTreeMap::new(),
            capture,
            apply,
            status,
            http: HttpSettings {
                listen,
                token: raw.http.token,
            },
            regions,
            tables,
        })
    }

    fn positive(
        &self,
        key: &str,
        value: Option<HumanDuration>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let value = value.map_or(default, |d| d.0);
        if value.is_zero() {
            return Err(self.invalid(None, format!("{key} must be greater than zero")));
        }
        Ok(value)
    }

    fn count(
        &self,
        key: &str,
        value: Option<i64>,
        default: usize,
        min: i64,
    ) -> Result<usize, ConfigError> {
        match value {
            None => Ok(default),
            Some(v) if v >= min => usize::try_from(v)
                .map_err(|_| self.invalid(None, format!("{key} = {v} is too large"))),
            Some(v) => Err(self.invalid(None, format!("{key} = {v}: must be at least {min}"))),
        }
    }

    fn capture(&self, raw: RawCapture) -> Result<CaptureSettings, ConfigError> {
        if let Some(slot) = &raw.slot {
            self.pg_name("relay.capture.slot", slot)?;
        }
        let publication = raw
            .publication
            .unwrap_or_else(|| DEFAULT_PUBLICATION.to_string());
        self.pg_name("relay.capture.publication", &publication)?;
        Ok(CaptureSettings {
            slot: raw.slot,
            publication,
            status_interval: self.positive(
                "relay.capture.status_interval",
                raw.status_interval,
                default_status_interval(),
            )?,
            max_in_flight: self.count(
                "relay.capture.max_in_flight",
                raw.max_in_flight,
                default_max_in_flight(),
                1,
            )?,
            topic_partitions: self.count(
                "relay.capture.topic_partitions",
                raw.topic_partitions,
                default_topic_partitions(),
                1,
            )?,
            topic_replication_factor: match raw.topic_replication_factor {
                None => default_topic_replication_factor(),
                Some(v) if v == -1 || (1..=32).contains(&v) => v as i32,
                Some(v) => {
                    return Err(self.invalid(
                        None,
                        format!("relay.capture.topic_replication_factor = {v}: use -1 (broker default) or 1..=32"),
                    ))
                }
            },
            before_image: match raw.before_image.as_deref() {
                None | Some("key") => BeforeImage::Key,
                Some("full") => BeforeImage::Full,
                Some(other) => {
                    return Err(self.invalid(
                        None,
                        format!("relay.capture.before_image = {other:?}: use \"key\" or \"full\""),
                    ))
                }
            },
        })
    }

    fn apply(&self, raw: RawApply) -> Result<ApplySettings, ConfigError> {
        let max_retries = self.count(
            "relay.apply.max_retries",
            raw.max_retries,
            default_max_retries() as usize,
            0,
        )?;
        Ok(ApplySettings {
            batch_max_records: self.count(
                "relay.apply.batch_max_records",
                raw.batch_max_records,
                default_batch_max_records(),
                1,
            )?,
            batch_max_wait: raw.batch_max_wait.map_or(default_batch_max_wait(), |d| d.0),
            max_retries: u32::try_from(max_retries).map_err(|_| {
                self.invalid(None, "relay.apply.max_retries is too large".to_string())
            })?,
            tombstone_horizon: self.positive(
                "relay.apply.tombstone_horizon",
                raw.tombstone_horizon,
                default_tombstone_horizon(),
            )?,
            schema_wait: raw.schema_wait.map_or(default_schema_wait(), |d| d.0),
            sessions_per_source: match self.count(
                "relay.apply.sessions_per_source",
                raw.sessions_per_source,
                default_sessions_per_source(),
                1,
            )? {
                n if n <= 16 => n,
                n => {
                    return Err(self.invalid(
                        None,
                        format!("relay.apply.sessions_per_source = {n}: use 1 to 16"),
                    ))
                }
            },
        })
    }

    /// Slot and publication names: plain lowercase identifiers.
    fn pg_name(&self, key: &str, name: &str) -> Result<(), ConfigError> {
        let ok = !name.is_empty()
            && name.len() <= 63
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if ok {
            return Ok(());
        }
        Err(self.invalid(
            None,
            format!(
                "{key} = {name:?}: use 1 to 63 lowercase letters, digits and '_', \
                 not starting with a digit"
            ),
        ))
    }

    fn kafka(&self, key: &str, raw: RawKafka) -> Result<KafkaCluster, ConfigError> {
        if raw.brokers.trim().is_empty() {
            return Err(self.invalid(
                None,
                format!(
                    "{key}.brokers is empty: list bootstrap brokers as \"host:port,host:port\""
                ),
            ));
        }
        let properties: BTreeMap<String, String> =
            raw.properties.into_iter().map(|(k, v)| (k, v.0)).collect();
        if let Err(problem) = kafka_security(&properties) {
            return Err(self.invalid(None, format!("{key}.properties: {problem}")));
        }
        Ok(KafkaCluster {
            brokers: raw.brokers,
            properties,
        })
    }

    fn regions(
        &self,
        raw: BTreeMap<String, RawRegion>,
        default_kafka: Option<RawKafka>,
    ) -> Result<BTreeMap<String, Region>, ConfigError> {
        if raw.len() < 2 {
            let have = if raw.is_empty() {
                "none".to_string()
            } else {
                join_names(raw.keys())
            };
            return Err(self.invalid(
                None,
                format!(
                    "at least 2 regions are needed (declared: {have}); add a [regions.NAME] \
                     table with id and dsn for each region"
                ),
            ));
        }
        let default_kafka = default_kafka.map(|k| self.kafka("kafka", k)).transpose()?;
        let mut ids: BTreeMap<u8, &str> = BTreeMap::new();
        let mut regions = BTreeMap::new();
        for (name, region) in &raw {
            let valid_name = !name.is_empty()
                && name.len() <= MAX_REGION_NAME_LEN
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !valid_name {
                return Err(self.invalid(
                    None,
                    format!(
                        "region name {name:?}: use 1 to {MAX_REGION_NAME_LEN} characters among \
                         a-z, 0-9 and '_' (it goes into topic and slot names)"
                    ),
                ));
            }
            if name == RESERVED_REGION {
                return Err(self.invalid(
                    None,
                    format!(
                        "region name {name:?} is reserved (dead-letter topics are \
                         {{prefix}}.dlq.{{region}}); pick another name"
                    ),
                ));
            }
            if name == "replay" {
                return Err(self.invalid(
                    None,
                    format!(
                        "region name {name:?} is reserved (`pgrelay dlq replay` writes under \
                         the replication origin pgrelay_replay); pick another name"
                    ),
                ));
            }
            if !REGION_IDS.contains(&region.id) {
                return Err(self.invalid(
                    None,
                    format!(
                        "regions.{name}.id = {}: must be between 1 and 63 (it is the tie-break \
                         of HLC stamps)",
                        region.id
                    ),
                ));
            }
            let id = region.id as u8;
            if let Some(other) = ids.insert(id, name) {
                return Err(self.invalid(
                    None,
                    format!(
                        "regions.{name}.id = {id} is already the id of region {other}; ids must \
                         be unique and never change"
                    ),
                ));
            }
            if region.dsn.trim().is_empty() {
                return Err(self.invalid(
                    None,
                    format!("regions.{name}.dsn is empty: give the libpq connection string of the region's primary"),
                ));
            }
        }
        for (name, region) in raw {
            let kafka = match (region.kafka, &default_kafka) {
                (Some(own), _) => self.kafka(&format!("regions.{name}.kafka"), own)?,
                (None, Some(default)) => default.clone(),
                (None, None) => {
                    return Err(self.invalid(
                        None,
                        format!(
                            "region {name} has no Kafka cluster: add [regions.{name}.kafka] with \
                             brokers, or a default [kafka] table for every region"
                        ),
                    ))
                }
            };
            if region
                .setup_dsn
                .as_deref()
                .is_some_and(|d| d.trim().is_empty())
            {
                return Err(self.invalid(
                    None,
                    format!("regions.{name}.setup_dsn is empty: give the connection string of the setup role, or remove it to set up with dsn"),
                ));
            }
            if let Some(role) = &region.run_role {
                let valid = !role.is_empty()
                    && role.len() <= 63
                    && role
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                if !valid {
                    return Err(self.invalid(
                        None,
                        format!("regions.{name}.run_role = {role:?}: use the name of an existing role (1 to 63 letters, digits, '_' or '-')"),
                    ));
                }
            }
            if let Some(key) = &region.hash_key {
                if !self.is_unresolved(key) && key.len() < MIN_HASH_KEY_LEN {
                    return Err(self.invalid(
                        None,
                        format!(
                            "regions.{name}.hash_key is {} bytes: a hash key needs at least \
                             {MIN_HASH_KEY_LEN} random bytes (e.g. the 64 hex digits of \
                             `openssl rand -hex 32`)",
                            key.len()
                        ),
                    ));
                }
            }
            let hash_key_id = region.hash_key_id.unwrap_or_else(|| "k1".to_string());
            let valid_id = !hash_key_id.is_empty()
                && hash_key_id.len() <= 16
                && hash_key_id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !valid_id {
                return Err(self.invalid(
                    None,
                    format!(
                        "regions.{name}.hash_key_id = {hash_key_id:?}: use 1 to 16 letters, \
                         digits, '_' or '-' (it prefixes every hashed value, e.g. \"k2\")"
                    ),
                ));
            }
            regions.insert(
                name.clone(),
                Region {
                    name,
                    id: region.id as u8,
                    dsn: region.dsn,
                    setup_dsn: region.setup_dsn,
                    run_role: region.run_role,
                    hash_key: region.hash_key,
                    hash_key_id,
                    kafka,
                },
            );
        }
        Ok(regions)
    }

    /// Every region that may send a hashed column declares its hash key:
    /// the owner of an `owned` table, every region for the other classes.
    fn hash_keys_declared(
        &self,
        tables: &[TableConfig],
        lines: &[usize],
        regions: &BTreeMap<String, Region>,
    ) -> Result<(), ConfigError> {
        for (table, line) in tables.iter().zip(lines) {
            let Some(rule) = table
                .columns
                .iter()
                .find(|r| r.action == ColumnAction::Hash)
            else {
                continue;
            };
            let sources: Vec<&String> = match &table.class {
                TableClass::Owned { owner } => vec![owner],
                _ => regions.keys().collect(),
            };
            for source in sources {
                if regions[source].hash_key.is_none() {
                    return Err(self.invalid(
                        Some(*line),
                        format!(
                            "table {}: column {}: action = \"hash\" needs the hash key of \
                             every region that sends the table: set hash_key (at least \
                             {MIN_HASH_KEY_LEN} bytes, e.g. hash_key = \"${{PGRELAY_{}_HASH_KEY}}\") \
                             and hash_key_id under [regions.{source}]",
                            table.name,
                            rule.column,
                            source.to_ascii_uppercase()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn table(
        &self,
        raw: RawTable,
        line: usize,
        regions: &BTreeMap<String, Region>,
    ) -> Result<TableConfig, ConfigError> {
        let line = Some(line);
        let name = TableName::parse(raw.name.get_ref()).map_err(|e| self.invalid(line, e))?;
        let err = |message: String| self.invalid(line, format!("table {name}: {message}"));
        let declared = || join_names(regions.keys());
        let check_region = |what: String, region: &str| {
            if regions.contains_key(region) {
                Ok(())
            } else {
                Err(err(format!(
                    "{what} names an undeclared region; declared regions: {}",
                    declared()
                )))
            }
        };
        let class_name = match raw.class {
            RawClass::Local => "local",
            RawClass::Global => "global",
            RawClass::Owned => "owned",
            RawClass::Partitioned => "partitioned",
        };
        if raw.class != RawClass::Owned && raw.owner.is_some() {
            return Err(err(format!(
                "owner is only for class = \"owned\" (this table is {class_name}); remove it"
            )));
        }
        if raw.class != RawClass::Partitioned {
            for (key, present) in [
                ("home_column", raw.home_column.is_some()),
                ("aliases", raw.aliases.is_some()),
                ("allow", raw.allow.is_some()),
            ] {
                if present {
                    return Err(err(format!(
                        "{key} is only for class = \"partitioned\" (this table is {class_name}); remove it"
                    )));
                }
            }
        }
        let class = match raw.class {
            RawClass::Local => TableClass::Local,
            RawClass::Global => TableClass::Global,
            RawClass::Owned => {
                let owner = raw.owner.ok_or_else(|| {
                    err(format!(
                        "class = \"owned\" needs owner = \"REGION\" (the only region that writes it; one of {})",
                        declared()
                    ))
                })?;
                check_region(format!("owner {owner:?}"), &owner)?;
                TableClass::Owned { owner }
            }
            RawClass::Partitioned => {
                let home_column = raw.home_column.filter(|c| !c.is_empty()).ok_or_else(|| {
                    err(
                        "class = \"partitioned\" needs home_column = \"COLUMN\" (the column \
                         whose value names the row's home region)"
                            .to_string(),
                    )
                })?;
                let aliases = raw.aliases.unwrap_or_default();
                for (value, region) in &aliases {
                    check_region(format!("alias {value} -> {region:?}"), region)?;
                }
                let mut allow = BTreeMap::new();
                for (home, destinations) in raw.allow.unwrap_or_default() {
                    check_region(format!("allow key {home:?}"), &home)?;
                    for destination in &destinations {
                        check_region(format!("allow.{home} entry {destination:?}"), destination)?;
                    }
                    allow.insert(home, destinations.into_iter().collect());
                }
                TableClass::Partitioned {
                    home_column,
                    aliases,
                    allow,
                }
            }
        };
        let mut columns: Vec<ColumnRule> = Vec::with_capacity(raw.columns.len());
        for rule in raw.columns {
            let column = rule.name;
            if column.is_empty() {
                return Err(err("a column rule has an empty name".to_string()));
            }
            if class == TableClass::Local {
                return Err(err(format!(
                    "column rule on {column}: a local table never leaves its region, so column \
                     rules have no effect; remove them"
                )));
            }
            if let TableClass::Partitioned { home_column, .. } = &class {
                if *home_column == column {
                    return Err(err(format!(
                        "column {column} is the home column: it cannot be dropped, hashed or \
                         masked (destinations need it to place the row)"
                    )));
                }
            }
            let action = match (rule.action, rule.mask) {
                (RawAction::Mask, Some(mask)) => ColumnAction::Mask(mask),
                (RawAction::Mask, None) => {
                    return Err(err(format!(
                        "column {column}: action = \"mask\" needs mask = \"...\" (the text that \
                         replaces the value)"
                    )))
                }
                (_, Some(_)) => {
                    return Err(err(format!(
                        "column {column}: mask is only for action = \"mask\"; remove it"
                    )))
                }
                (RawAction::Drop, None) => ColumnAction::Drop,
                (RawAction::Hash, None) => ColumnAction::Hash,
            };
            let to = match rule.to {
                None => None,
                Some(to) if to.is_empty() => {
                    return Err(err(format!(
                        "column {column}: to = [] matches no destination; name regions, or \
                         remove `to` to apply the rule everywhere"
                    )))
                }
                Some(to) => {
                    for region in &to {
                        check_region(format!("column {column}: to entry {region:?}"), region)?;
                    }
                    Some(to.into_iter().collect::<BTreeSet<_>>())
                }
            };
            let rule = ColumnRule { column, action, to };
            for region in regions.keys() {
                let clash = columns.iter().any(|r| {
                    r.column == rule.column && r.applies_to(region) && rule.applies_to(region)
                });
                if clash {
                    return Err(err(format!(
                        "column {} has two rules for destination {region}; give each \
                         destination at most one rule (use `to` to split them)",
                        rule.column
                    )));
                }
            }
            columns.push(rule);
        }
        Ok(TableConfig {
            name,
            class,
            columns,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[relay]
prefix = "pgrelay"

[kafka]
brokers = "localhost:9092"

[regions.us]
id = 1
dsn = "host=us port=5432 user=pgrelay password=s3cret dbname=app"
hash_key = "pepper-pepper-pepper-pepper-pepper"

[regions.eu]
id = 2
dsn = "host=eu dbname=app"
hash_key = "eu-eu-eu-eu-eu-eu-eu-eu-eu-eu-eu-eu"

[regions.cn]
id = 3
dsn = "host=cn dbname=app"
hash_key = "cn-cn-cn-cn-cn-cn-cn-cn-cn-cn-cn-cn"
"#;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn ok(text: &str) -> Config {
        match parse_with_env(text, "relay.toml", no_env) {
            Ok(c) => c,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }

    fn err(text: &str) -> String {
        match parse_with_env(text, "relay.toml", no_env) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    fn with_tables(tables: &str) -> String {
        format!("{BASE}\n{tables}")
    }

    #[track_caller]
    fn assert_err(text: &str, parts: &[&str]) {
        let e = err(text);
        for p in parts {
            assert!(e.contains(p), "error {e:?} should contain {p:?}");
        }
    }

    #[test]
    fn example_file_parses() {
        let text = include_str!("../relay.toml.example");
        let config = parse_with_env(text, "relay.toml.example", |name| {
            Some(format!("value-of-{name}-0123456789abcdef"))
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            config.regions.keys().collect::<Vec<_>>(),
            ["cn", "eu", "us"]
        );
        assert!(config.tables.len() >= 4);
        assert!(config.regions["us"].hash_key.is_some());
    }

    #[test]
    fn defaults_and_helpers() {
        let c = ok(BASE);
        assert_eq!(c.prefix, "pgrelay");
        assert_eq!(c.max_clock_skew, Duration::from_millis(500));
        assert_eq!(c.capture, CaptureSettings::default());
        assert_eq!(c.apply, ApplySettings::default());
        assert_eq!(c.apply.tombstone_horizon, Duration::from_secs(604_800));
        assert_eq!(c.apply.schema_wait, Duration::from_secs(600));
        assert_eq!(c.http.listen, None);
        assert_eq!(c.topic("us", "eu"), "pgrelay.us.eu");
        assert_eq!(c.dlq_topic("eu"), "pgrelay.dlq.eu");
        assert_eq!(c.slot_name("eu"), "pgrelay_eu");
        assert_eq!(c.publication_name(), "pgrelay");
        assert_eq!(c.region("us").unwrap().id, 1);
        assert_eq!(c.kafka_for("cn").brokers, "localhost:9092");
        let e = c.region("xx").unwrap_err().to_string();
        assert_eq!(
            e,
            "region \"xx\" is not declared in relay.toml; declared regions: cn, eu, us"
        );
        let panic = std::panic::catch_unwind(|| c.kafka_for("xx").brokers.clone());
        assert!(panic.is_err());
    }

    #[test]
    fn before_image_defaults_to_key_and_names_bad_values() {
        let c = ok(BASE);
        assert_eq!(c.capture.before_image, BeforeImage::Key);
        assert!(!c.needs_full_identity(&TableClass::Global));
        let err = parse(
            &format!("{BASE}\n[relay.capture]\nbefore_image = \"old\"\n"),
            "t.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("relay.capture.before_image"), "{err}");
        assert!(err.contains("\"key\" or \"full\""), "{err}");
    }

    #[test]
    fn full_settings() {
        let c = ok(&format!(
            r#"{BASE}
[relay.capture]
slot = "my_slot"
publication = "my_pub"
status_interval = "250ms"
max_in_flight = 10
before_image = "full"

[relay.apply]
batch_max_records = 7
batch_max_wait = "0ms"
max_retries = 0
tombstone_horizon = "2h"
schema_wait = "0s"

[http]
listen = "0.0.0.0:9187"
"#
        ));
        assert_eq!(c.slot_name("us"), "my_slot");
        assert_eq!(c.publication_name(), "my_pub");
        assert_eq!(c.capture.status_interval, Duration::from_millis(250));
        assert_eq!(c.capture.max_in_flight, 10);
        assert_eq!(c.capture.before_image, BeforeImage::Full);
        assert!(c.needs_full_identity(&TableClass::Global));
        assert_eq!(c.apply.batch_max_records, 7);
        assert_eq!(c.apply.batch_max_wait, Duration::ZERO);
        assert_eq!(c.apply.max_retries, 0);
        assert_eq!(c.apply.tombstone_horizon, Duration::from_secs(7200));
        assert_eq!(c.apply.schema_wait, Duration::ZERO);
        assert_eq!(c.http.listen, Some("0.0.0.0:9187".parse().unwrap()));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        for bad in ["", "5", "ms", "1.5s", "-1s", "5 parsecs", "5S"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert!(parse_duration("99999999999999999999d").is_err());
        // a bad duration in the file is reported with its line
        let text = format!("{BASE}\n[relay.apply]\nbatch_max_wait = \"soon\"\n");
        let line = text.lines().count();
        assert_err(
            &text,
            &[
                &format!("relay.toml, line {line}, column 18: "),
                "invalid duration \"soon\"",
            ],
        );
        assert_err(
            &format!("{BASE}\n[relay.apply]\nbatch_max_wait = 100\n"),
            &["a duration string"],
        );
        assert_err(
            &BASE.replace("[relay]", "[relay]\nmax_clock_skew = \"0s\""),
            &["relay.max_clock_skew must be greater than zero"],
        );
    }

    #[test]
    fn unknown_key_names_file_and_line() {
        let text = BASE.replace("id = 2", "id = 2\nregion_id = 2");
        let line = text.lines().position(|l| l == "region_id = 2").unwrap() + 1;
        let e = err(&text);
        assert!(
            e.starts_with(&format!("relay.toml, line {line}, column 1: ")),
            "{e}"
        );
        assert!(e.contains("unknown field `region_id`"), "{e}");
        assert!(e.contains(&format!("{line} | region_id = 2")), "{e}");

        let e = err(&format!("{BASE}\n[relay.capture]\nslots = \"x\"\n"));
        assert!(e.contains("unknown field `slots`"), "{e}");
        assert!(e.contains("expected one of"), "{e}");
    }

    #[test]
    fn malformed_toml_names_the_line() {
        let text = BASE.replace("prefix = \"pgrelay\"", "prefix = \"pgrelay\nbroken");
        let line = text
            .lines()
            .position(|l| l == "prefix = \"pgrelay")
            .unwrap()
            + 1;
        let e = err(&text);
        assert!(e.starts_with(&format!("relay.toml, line {line}")), "{e}");
        assert!(
            e.contains(&format!("\n  {line} | prefix = \"pgrelay")),
            "{e}"
        );
    }

    #[test]
    fn syntax_error_does_not_show_interpolated_secret() {
        // the dsn line is broken (missing closing quote) after a secret was inserted
        let text = BASE.replace("password=s3cret dbname=app\"", "password=${PW} dbname=app");
        let e = parse_with_env(&text, "relay.toml", |_| Some("hunter2".into()))
            .unwrap_err()
            .to_string();
        assert!(!e.contains("hunter2"), "{e}");
        assert!(e.contains("${PW}"), "{e}");
    }

    #[test]
    fn env_interpolation() {
        let text = BASE
            .replace("s3cret", "${PG_US_PASSWORD}")
            .replace("\"pepper-pepper-pepper-pepper-pepper\"", "\"${SALT}\"")
            .replace(
                "[kafka]",
                "# brokers can come from ${ANYTHING} too\n[kafka]",
            )
            .replace("\"localhost:9092\"", "\"$${literal}\"");
        let c = parse_with_env(&text, "relay.toml", |name| match name {
            "PG_US_PASSWORD" => Some("pa\"ss\\word".into()),
            "SALT" => Some("salty-salty-salty-salty-salty-salty".into()),
            _ => None,
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            c.regions["us"].dsn,
            "host=us port=5432 user=pgrelay password=pa\"ss\\word dbname=app"
        );
        assert_eq!(
            c.regions["us"].hash_key.as_deref(),
            Some("salty-salty-salty-salty-salty-salty")
        );
        assert_eq!(c.regions["us"].kafka.brokers, "${literal}");
    }

    #[test]
    fn env_interpolation_contexts() {
        let env = |name: &str| match name {
            "N" => Some("42".to_string()),
            "Q" => Some("it's".to_string()),
            "NL" => Some("a\nb".to_string()),
            _ => None,
        };
        let run = |t: &str| interpolate(t, "f.toml", &env, &mut Vec::new());
        assert_eq!(run("x = ${N}\n").unwrap(), "x = 42\n");
        assert_eq!(run("x = '${N}'").unwrap(), "x = '42'");
        assert_eq!(run("x = \"${NL}\"").unwrap(), "x = \"a\\nb\"");
        assert_eq!(
            run("x = \"\"\"\n${Q}\"\"\"").unwrap(),
            "x = \"\"\"\nit's\"\"\""
        );
        assert_eq!(run("x = '''${Q}'''").unwrap(), "x = '''it's'''");
        // an escaped backslash does not hide the ${ that follows
        assert_eq!(run("x = \"\\\\${N}\"").unwrap(), "x = \"\\\\42\"");
        assert_eq!(run("# ${MISSING}\nx = 1").unwrap(), "# ${MISSING}\nx = 1");
        assert_eq!(run("x = \"a#b${N}\"").unwrap(), "x = \"a#b42\"");
        assert_eq!(run("x = \"$5 $${N}\"").unwrap(), "x = \"$5 ${N}\"");
        let e = run("x = 1\ny = '${Q}'").unwrap_err().to_string();
        assert!(
            e.starts_with("f.toml, line 2: the value of environment variable Q"),
            "{e}"
        );
        assert!(!e.contains("it's"), "{e}");
        let e = run("x = ${NL}").unwrap_err().to_string();
        assert!(e.contains("line break"), "{e}");
        let e = run("x = \"${N\"\n}").unwrap_err().to_string();
        assert!(e.contains("without a closing"), "{e}");
        let e = run("x = \"${1X}\"").unwrap_err().to_string();
        assert!(e.contains("not a variable name"), "{e}");
    }

    #[test]
    fn missing_env_var_names_variable_and_line() {
        // outside a region's secrets: an error at once
        let text = BASE.replace("\"pgrelay\"", "\"${PREFIX}\"");
        let line = text.lines().position(|l| l.contains("PREFIX")).unwrap() + 1;
        let e = err(&text);
        assert!(
            e.starts_with(&format!(
                "relay.toml, line {line}: environment variable PREFIX is not set"
            )),
            "{e}"
        );
        // in a region's DSN: an error for the commands that need it only
        let text = BASE.replace("s3cret", "${PG_US_PASSWORD}");
        let line = text
            .lines()
            .position(|l| l.contains("PG_US_PASSWORD"))
            .unwrap()
            + 1;
        let c = ok(&text);
        assert!(c.require(&c.run_needs("eu", true, true)).is_ok());
        assert!(c
            .require(&[Need::Database("cn"), Need::Kafka("us")])
            .is_ok());
        let e = c.require(&[Need::Database("us")]).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "relay.toml, line {line}: environment variable PG_US_PASSWORD is not set \
                 (or not valid UTF-8), and regions.us.dsn needs it for this command; export it"
            )
        );
        let e = c.require(&c.run_needs("us", false, true)).unwrap_err();
        assert!(e.to_string().contains("PG_US_PASSWORD"), "{e}");
        // a hash key: only its own region's capture side needs it
        let text = BASE.replace(
            "\"eu-eu-eu-eu-eu-eu-eu-eu-eu-eu-eu-eu\"",
            "\"${EU_HASH_KEY}\"",
        );
        let c = ok(&text);
        assert!(c.require(&c.run_needs("us", true, true)).is_ok());
        assert!(c.require(&c.run_needs("eu", false, true)).is_ok());
        let e = c.hash_key("eu").unwrap_err().to_string();
        assert!(
            e.contains("EU_HASH_KEY") && e.contains("regions.eu.hash_key"),
            "{e}"
        );
        // unset in a string that also breaks validation: the variable is named
        let text = BASE.replace("\"localhost:9092\"", "\"${BROKERS}\"");
        let c = ok(&text);
        let e = c.require(&[Need::Kafka("cn")]).unwrap_err().to_string();
        assert!(
            e.contains("BROKERS") && e.contains("Kafka cluster of region cn"),
            "{e}"
        );
        // used in a region's DSN and elsewhere: the other use fails at once
        let text = BASE
            .replace("s3cret", "${PW}")
            .replace("\"pgrelay\"", "\"${PW}\"");
        assert!(err(&text).contains("environment variable PW is not set"));
    }

    #[test]
    fn hash_keys_are_per_region_and_long() {
        let short = BASE.replace("pepper-pepper-pepper-pepper-pepper", "short");
        assert_err(
            &short,
            &["regions.us.hash_key is 5 bytes: a hash key needs at least 32"],
        );
        let c = ok(&BASE.replace(
            "hash_key = \"pepper-pepper-pepper-pepper-pepper\"",
            "hash_key = \"pepper-pepper-pepper-pepper-pepper\"\nhash_key_id = \"k2\"",
        ));
        assert_eq!(c.regions["us"].hash_key_id, "k2");
        assert_eq!(c.regions["eu"].hash_key_id, "k1");
        assert_err(
            &BASE.replace("[regions.eu]", "[regions.eu]\nhash_key_id = \"k 2\""),
            &["regions.eu.hash_key_id = \"k 2\""],
        );
        assert_err(
            &BASE.replace("[relay]\nprefix", "[relay]\nhash_salt = \"x\"\nprefix"),
            &["relay.hash_salt is no longer used", "hash_key"],
        );
        let debug = format!("{:?}", ok(BASE));
        assert!(!debug.contains("pepper"), "{debug}");
    }

    #[test]
    fn setup_dsn_and_grantee() {
        let c = ok(BASE);
        assert_eq!(c.regions["us"].setup_dsn(), c.regions["us"].dsn);
        assert_eq!(c.regions["us"].grantee(), None);
        let c = ok(&BASE.replace(
            "[regions.eu]",
            "[regions.eu]\nsetup_dsn = \"host=eu user=admin password=a\"",
        ));
        assert_eq!(c.regions["eu"].setup_dsn(), "host=eu user=admin password=a");
        // the user of dsn, when it has one (eu's dsn names none)
        assert_eq!(c.regions["eu"].grantee(), None);
        let c = ok(&BASE.replace(
            "[regions.us]",
            "[regions.us]\nsetup_dsn = \"host=us user=admin\"",
        ));
        assert_eq!(c.regions["us"].grantee().as_deref(), Some("pgrelay"));
        let c = ok(&BASE.replace("[regions.cn]", "[regions.cn]\nrun_role = \"relay_cn\""));
        assert_eq!(c.regions["cn"].grantee().as_deref(), Some("relay_cn"));
        assert_eq!(dsn_user("postgres://u:p@h/db").as_deref(), Some("u"));
        assert_eq!(dsn_user("postgresql://h/db?user=v").as_deref(), Some("v"));
        assert_eq!(dsn_user("host=a user='w' dbname=b").as_deref(), Some("w"));
    }

    #[test]
    fn http_listen_and_token() {
        let c = ok(&format!("{BASE}\n[http]\nlisten = \"9187\"\n"));
        assert_eq!(c.http.listen, Some("127.0.0.1:9187".parse().unwrap()));
        let c = ok(&format!("{BASE}\n[http]\nlisten = \":9188\"\n"));
        assert_eq!(c.http.listen, Some("127.0.0.1:9188".parse().unwrap()));
        let c = ok(&format!("{BASE}\n[http]\nlisten = \"0.0.0.0:9189\"\n"));
        assert_eq!(c.http.listen, Some("0.0.0.0:9189".parse().unwrap()));
        assert_err(
            &format!("{BASE}\n[http]\ntoken = \"short\"\n"),
            &["http.token is shorter than 16 characters"],
        );
        let c = ok(&format!(
            "{BASE}\n[http]\nlisten = \"9187\"\ntoken = \"${{METRICS_TOKEN}}\"\n"
        ));
        let e = c
            .require(&c.run_needs("us", true, true))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("METRICS_TOKEN") && e.contains("http.token"),
            "{e}"
        );
        assert!(!format!("{:?}", c.http).contains("METRICS"));
    }

    #[test]
    fn dsn_password_is_redacted_in_debug() {
        let c = ok(BASE);
        let debug = format!("{c:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(!debug.contains("pepper"), "{debug}");
        assert!(debug.contains("password=***"), "{debug}");

        let cases = [
            ("host=a password=x dbname=b", "host=a password=*** dbname=b"),
            ("password = 'a b\\' c' host=a", "password = '***' host=a"),
            ("host=a PASSWORD=x", "host=a PASSWORD=***"),
            ("host=a sslpassword=x", "host=a sslpassword=***"),
            ("host=a mypassword=x", "host=a mypassword=x"),
            ("host=a", "host=a"),
            (
                "postgres://u:secret@h:5432/db?sslmode=require&password=p2",
                "postgres://u:***@h:5432/db?sslmode=require&password=***",
            ),
            ("postgresql://u@h/db", "postgresql://u@h/db"),
            ("postgresql://u:p@w@h", "postgresql://u:***@h"),
        ];
        for (dsn, want) in cases {
            assert_eq!(redact_dsn(dsn), want, "{dsn}");
        }
    }

    #[test]
    fn kafka_settings_that_weaken_security_are_refused() {
        let with = |props: &str| {
            BASE.replace(
                "brokers = \"localhost:9092\"",
                &format!("brokers = \"localhost:9092\"\n[kafka.properties]\n{props}"),
            )
        };
        let e = err(&with(
            "\"security.protocol\" = \"SASL_PLAINTEXT\"\n\"sasl.mechanisms\" = \"PLAIN\"",
        ));
        assert!(e.contains("in clear") && e.contains("sasl_ssl"), "{e}");
        let e = err(&with("\"security.protocol\" = \"sasl_ssl\""));
        assert!(e.contains("GSSAPI"), "{e}");
        let e = err(&with("\"enable.ssl.certificate.verification\" = false"));
        assert!(e.contains("ssl.ca.location"), "{e}");
        let e = err(&with(
            "\"ssl.endpoint.identification.algorithm\" = \"none\"",
        ));
        assert!(e.contains("host name"), "{e}");
        for fine in [
            "\"security.protocol\" = \"sasl_ssl\"\n\"sasl.mechanisms\" = \"PLAIN\"",
            "\"security.protocol\" = \"sasl_plaintext\"\n\"sasl.mechanism\" = \"SCRAM-SHA-512\"",
            "\"security.protocol\" = \"ssl\"\n\"ssl.ca.location\" = \"/etc/ca.pem\"",
        ] {
            ok(&with(fine));
        }
    }

    #[test]
    fn kafka_secrets_are_redacted_in_debug() {
        let c = ok(&BASE.replace(
            "brokers = \"localhost:9092\"",
            "brokers = \"localhost:9092\"\n[kafka.properties]\n\"sasl.password\" = \"kpw\"\n\"linger.ms\" = 5\n\"socket.keepalive.enable\" = false",
        ));
        let kafka = c.kafka_for("eu");
        assert_eq!(kafka.properties["linger.ms"], "5");
        assert_eq!(kafka.properties["socket.keepalive.enable"], "false");
        let debug = format!("{kafka:?}");
        assert!(!debug.contains("kpw"), "{debug}");
        assert!(debug.contains("linger.ms"), "{debug}");
    }

    #[test]
    fn per_region_kafka_replaces_the_default() {
        let c = ok(&BASE.replace(
            "hash_key = \"cn-cn-cn-cn-cn-cn-cn-cn-cn-cn-cn-cn\"",
            "hash_key = \"cn-cn-cn-cn-cn-cn-cn-cn-cn-cn-cn-cn\"\n[regions.cn.kafka]\nbrokers = \"kafka.cn:9092\"\n[regions.cn.kafka.properties]\n\"acks\" = \"all\"",
        ));
        assert_eq!(c.kafka_for("cn").brokers, "kafka.cn:9092");
        assert_eq!(c.kafka_for("cn").properties.len(), 1);
        assert_eq!(c.kafka_for("us").brokers, "localhost:9092");
    }

    #[test]
    fn region_without_kafka() {
        let text = BASE.replace("[kafka]\nbrokers = \"localhost:9092\"", "");
        assert_err(
            &text,
            &["region cn has no Kafka cluster", "[regions.cn.kafka]"],
        );
        assert_err(
            &BASE.replace("brokers = \"localhost:9092\"", "brokers = \" \""),
            &["kafka.brokers is empty"],
        );
    }

    #[test]
    fn region_rules() {
        let only_us = "[kafka]\nbrokers = \"k:9092\"\n[regions.us]\nid = 1\ndsn = \"host=us\"\n";
        assert_err(only_us, &["at least 2 regions", "declared: us"]);
        assert_err(
            "[kafka]\nbrokers = \"k:9092\"\n",
            &["at least 2 regions", "declared: none"],
        );
        assert_err(
            &BASE.replace("id = 3", "id = 1"),
            &["regions.us.id = 1 is already the id of region cn"],
        );
        assert_err(
            &BASE.replace("id = 3", "id = 0"),
            &["regions.cn.id = 0: must be between 1 and 63"],
        );
        assert_err(&BASE.replace("id = 3", "id = 64"), &["regions.cn.id = 64"]);
        assert_err(
            &BASE.replace("[regions.cn]", "[regions.CN]"),
            &["region name \"CN\""],
        );
        assert_err(
            &BASE.replace("[regions.cn]", "[regions.\"c-n\"]"),
            &["region name \"c-n\""],
        );
        assert_err(
            &BASE.replace("[regions.cn]", "[regions.dlq]"),
            &["\"dlq\" is reserved"],
        );
        assert_err(
            &BASE.replace("dsn = \"host=cn dbname=app\"", "dsn = \"\""),
            &["regions.cn.dsn is empty"],
        );
        assert_err(&BASE.replace("id = 3\n", ""), &["missing field `id`"]);
    }

    #[test]
    fn relay_rules() {
        assert_err(
            &BASE.replace("prefix = \"pgrelay\"", "prefix = \"a b\""),
            &["relay.prefix = \"a b\""],
        );
        assert_err(
            &format!("{BASE}\n[relay.capture]\nslot = \"Bad-Slot\"\n"),
            &["relay.capture.slot = \"Bad-Slot\""],
        );
        assert_err(
            &format!("{BASE}\n[relay.capture]\npublication = \"\"\n"),
            &["relay.capture.publication"],
        );
        assert_err(
            &format!("{BASE}\n[relay.capture]\nmax_in_flight = 0\n"),
            &["relay.capture.max_in_flight = 0: must be at least 1"],
        );
        assert_err(
            &format!("{BASE}\n[relay.capture]\nstatus_interval = \"0s\"\n"),
            &["status_interval must be greater than zero"],
        );
        assert_err(
            &format!("{BASE}\n[relay.apply]\nbatch_max_records = 0\n"),
            &["batch_max_records = 0"],
        );
        assert_err(
            &format!("{BASE}\n[relay.apply]\nmax_retries = -1\n"),
            &["max_retries = -1"],
        );
        assert_err(
            &format!("{BASE}\n[relay.apply]\ntombstone_horizon = \"0d\"\n"),
            &["tombstone_horizon must be greater than zero"],
        );
        assert_err(
            &format!("{BASE}\n[http]\nlisten = \"localhost\"\n"),
            &["http.listen = \"localhost\""],
        );
    }

    const ORDERS: &str = r#"
[[tables]]
name = "public.users"
class = "local"

[[tables]]
name = "products"
class = "global"

[[tables]]
name = "public.currencies"
class = "owned"
owner = "us"

[[tables]]
name = "public.orders"
class = "partitioned"
home_column = "country"
aliases = { DE = "eu", FR = "eu", US = "us", CN = "cn" }
[tables.allow]
us = ["eu", "cn"]
eu = []

[[tables.columns]]
name = "email"
action = "hash"
to = ["cn"]

[[tables.columns]]
name = "email"
action = "drop"
to = ["eu"]

[[tables.columns]]
name = "card_number"
action = "mask"
mask = "****"
"#;

    #[test]
    fn tables_are_typed() {
        let c = ok(&with_tables(ORDERS));
        assert_eq!(c.tables.len(), 4);
        assert_eq!(c.tables[0].class, TableClass::Local);
        assert_eq!(c.tables[1].name, TableName::new("public", "products"));
        assert_eq!(
            c.table(&TableName::new("public", "currencies"))
                .unwrap()
                .class,
            TableClass::Owned { owner: "us".into() }
        );
        let orders = c.table(&TableName::new("public", "orders")).unwrap();
        let TableClass::Partitioned {
            home_column,
            aliases,
            allow,
        } = &orders.class
        else {
            panic!("{:?}", orders.class)
        };
        assert_eq!(home_column, "country");
        assert_eq!(aliases["DE"], "eu");
        assert_eq!(
            allow["us"],
            ["cn".to_string(), "eu".to_string()].into_iter().collect()
        );
        assert!(allow["eu"].is_empty());
        assert_eq!(orders.columns.len(), 3);
        assert_eq!(orders.columns[0].action, ColumnAction::Hash);
        assert!(orders.columns[0].applies_to("cn"));
        assert!(!orders.columns[0].applies_to("eu"));
        assert_eq!(orders.columns[2].action, ColumnAction::Mask("****".into()));
        assert!(orders.columns[2].applies_to("eu"));
        assert_eq!(
            orders.missing_columns(&["id", "email", "card_number"]),
            ["country"]
        );
        assert!(c.table(&TableName::new("other", "orders")).is_none());
    }

    #[track_caller]
    fn table_err(table: &str, parts: &[&str]) {
        assert_err(&with_tables(table), parts);
    }

    #[test]
    fn undeclared_regions_are_named() {
        let declared = "declared regions: cn, eu, us";
        table_err(
            "[[tables]]\nname = \"public.orders\"\nclass = \"partitioned\"\nhome_column = \"c\"\naliases = { DE = \"xx\" }\n",
            &["table public.orders: alias DE -> \"xx\" names an undeclared region; declared regions: cn, eu, us"],
        );
        table_err(
            "[[tables]]\nname = \"t\"\nclass = \"owned\"\nowner = \"xx\"\n",
            &[
                "table public.t: owner \"xx\" names an undeclared region",
                declared,
            ],
        );
        table_err(
            "[[tables]]\nname = \"t\"\nclass = \"partitioned\"\nhome_column = \"c\"\n[tables.allow]\nxx = []\n",
            &["allow key \"xx\" names an undeclared region", declared],
        );
        table_err(
            "[[tables]]\nname = \"t\"\nclass = \"partitioned\"\nhome_column = \"c\"\n[tables.allow]\nus = [\"eu\", \"yy\"]\n",
            &["allow.us entry \"yy\" names an undeclared region", declared],
        );
        table_err(
            "[[tables]]\nname = \"t\"\nclass = \"global\"\n[[tables.columns]]\nname = \"a\"\naction = \"drop\"\nto = [\"zz\"]\n",
            &["column a: to entry \"zz\" names an undeclared region", declared],
        );
    }

    #[test]
    fn table_rules() {
        let t = "[[tables]]\nname = \"t\"\n";
        table_err(
            &format!("{t}class = \"owned\"\n"),
            &["table public.t: class = \"owned\" needs owner"],
        );
        table_err(
            &format!("{t}class = \"global\"\nowner = \"us\"\n"),
            &["owner is only for class = \"owned\" (this table is global)"],
        );
        for key in ["home_column = \"c\"", "aliases = {}", "allow = {}"] {
            let name = key.split(' ').next().unwrap();
            table_err(
                &format!("{t}class = \"owned\"\nowner = \"us\"\n{key}\n"),
                &[&format!("{name} is only for class = \"partitioned\"")],
            );
        }
        table_err(
            &format!("{t}class = \"partitioned\"\n"),
            &["needs home_column"],
        );
        table_err(
            &format!("{t}class = \"shared\"\n"),
            &["unknown variant `shared`"],
        );
        table_err(
            "[[tables]]\nname = \"a.b.c\"\nclass = \"global\"\n",
            &["invalid table name"],
        );
        // duplicates, also when spelled differently
        let text = with_tables(&format!(
            "{t}class = \"global\"\n[[tables]]\nname = \"public.t\"\nclass = \"local\"\n"
        ));
        let first = text.lines().position(|l| l == "name = \"t\"").unwrap() + 1;
        let second = text
            .lines()
            .position(|l| l == "name = \"public.t\"")
            .unwrap()
            + 1;
        assert_err(
            &text,
            &[&format!(
                "relay.toml, line {second}: table public.t is declared twice (first on line {first})"
            )],
        );
    }

    #[test]
    fn column_rules() {
        let rule = |class: &str, rule: &str| {
            format!("[[tables]]\nname = \"t\"\n{class}\n[[tables.columns]]\n{rule}\n")
        };
        let partitioned = "class = \"partitioned\"\nhome_column = \"country\"";
        table_err(
            &rule("class = \"local\"", "name = \"a\"\naction = \"drop\""),
            &["column rule on a: a local table never leaves its region"],
        );
        table_err(
            &rule(partitioned, "name = \"country\"\naction = \"hash\""),
            &["column country is the home column"],
        );
        table_err(
            &rule("class = \"global\"", "name = \"a\"\naction = \"mask\""),
            &["column a: action = \"mask\" needs mask"],
        );
        table_err(
            &rule(
                "class = \"global\"",
                "name = \"a\"\naction = \"drop\"\nmask = \"x\"",
            ),
            &["column a: mask is only for action = \"mask\""],
        );
        table_err(
            &rule(
                "class = \"global\"",
                "name = \"a\"\naction = \"drop\"\nto = []",
            ),
            &["column a: to = [] matches no destination"],
        );
        table_err(
            &rule("class = \"global\"", "name = \"a\"\naction = \"erase\""),
            &["unknown variant `erase`"],
        );
        table_err(
            &rule("class = \"global\"", "name = \"\"\naction = \"drop\""),
            &["empty name"],
        );
        table_err(
            &format!(
                "{}[[tables.columns]]\nname = \"a\"\naction = \"hash\"\nto = [\"eu\"]\n",
                rule(
                    "class = \"global\"",
                    "name = \"a\"\naction = \"drop\"\nto = [\"cn\", \"eu\"]"
                )
            ),
            &["column a has two rules for destination eu"],
        );
        // hash needs the key of every region that sends the table
        let text = with_tables(&rule(
            "class = \"global\"",
            "name = \"a\"\naction = \"hash\"",
        ))
        .replace("hash_key = \"cn-cn-cn-cn-cn-cn-cn-cn-cn-cn-cn-cn\"\n", "");
        let line = text.lines().position(|l| l == "name = \"t\"").unwrap() + 1;
        assert_err(
            &text,
            &[&format!("relay.toml, line {line}: table public.t: column a: action = \"hash\" needs the hash key of every region that sends the table"), "[regions.cn]"],
        );
        // an owned table: its owner's key only
        let text = with_tables(&rule(
            "class = \"owned\"\nowner = \"us\"",
            "name = \"a\"\naction = \"hash\"",
        ))
        .replace("hash_key = \"cn-cn-cn-cn-cn-cn-cn-cn-cn-cn-cn-cn\"\n", "");
        ok(&text);
    }
}
