//! The `[relay]` settings of each side, with their defaults.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

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
    /// Where the changes pgrelay applied are dropped (loop prevention).
    pub origin_filter: OriginFilter,
    /// Which stamp trigger `setup` installs.
    pub stamp_trigger: StampTrigger,
}

/// The stamp trigger `setup` installs on replicated tables
/// (`relay.capture.stamp_trigger`). Both compute the same stamps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum StampTrigger {
    /// The C one where the `pgrelay` extension is installed on the server
    /// and the setup role may create it, else PL/pgSQL.
    #[default]
    Auto,
    /// The C one, or `setup` fails naming what is missing.
    C,
    /// PL/pgSQL: works everywhere, managed services included.
    Plpgsql,
}

/// Where the capture side's loop prevention happens
/// (`relay.capture.origin_filter`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OriginFilter {
    /// The walsender decodes and sends every change; the capture side reads
    /// each transaction's Origin message and skips pgrelay's own. Changes of
    /// other replication origins (a native subscription) are replicated.
    #[default]
    Message,
    /// PostgreSQL 16+: the walsender drops every change that carries a
    /// replication origin before decoding it (pgoutput `origin 'none'`):
    /// less work per applied change, but changes written under any other
    /// origin are not replicated either. On 15 it falls back to `Message`.
    Server,
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
    /// Percentage of losing changes recorded in `pgrelay.conflicts`
    /// (`conflict_log`: "all" = 100, "off" = 0, or "N%").
    pub conflict_log_percent: u8,
    /// Entries of `pgrelay.conflicts` older than this are purged.
    pub conflict_retention: Duration,
}

/// `[relay.status]`: when `pgrelay status` and the metrics call a region
/// pair lagging.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusSettings {
    /// A pair is `lagging` past this many seconds behind...
    pub lagging_after: Duration,
    /// ...or this many bytes of WAL not yet confirmed by the capture side.
    pub lagging_bytes: u64,
    /// Price of one GB (2^30 bytes) of cross-region transfer, for the
    /// monthly egress estimate; `None`: no estimate.
    pub egress_price_per_gb: Option<f64>,
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
            egress_price_per_gb: None,
        }
    }
}

/// `[verify]`: the sidecar's own periodic `pgrelay verify`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifySettings {
    /// How often; `None`: never (the default).
    pub interval: Option<Duration>,
    /// Rows read per second per region (`--rate`); `None`: unthrottled.
    pub rate: Option<u64>,
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
pub const fn default_conflict_retention() -> Duration {
    Duration::from_secs(30 * 24 * 3600)
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
            origin_filter: OriginFilter::default(),
            stamp_trigger: StampTrigger::default(),
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
            conflict_log_percent: 100,
            conflict_retention: default_conflict_retention(),
        }
    }
}
