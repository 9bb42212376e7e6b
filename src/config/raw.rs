//! The file as serde sees it: every key optional, unknown keys rejected.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use super::values::{HumanDuration, PropertyValue};

// ---------------------------------------------------------------------------
// raw structs: the file's shape, nothing checked beyond types

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) relay: RawRelay,
    #[serde(default)]
    pub(super) http: RawHttp,
    pub(super) kafka: Option<RawKafka>,
    #[serde(default)]
    pub(super) regions: BTreeMap<String, RawRegion>,
    #[serde(default)]
    pub(super) tables: Vec<RawTable>,
    #[serde(default)]
    pub(super) breakers: Vec<crate::breaker::RawRule>,
    #[serde(default)]
    pub(super) verify: RawVerify,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawVerify {
    pub(super) interval: Option<HumanDuration>,
    pub(super) rate: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRelay {
    pub(super) prefix: Option<String>,
    pub(super) max_clock_skew: Option<HumanDuration>,
    pub(super) max_stamp_ahead: Option<HumanDuration>,
    pub(super) startup_timeout: Option<HumanDuration>,
    /// Replaced by per-region `hash_key`: refused with a pointer to it.
    pub(super) hash_salt: Option<toml::Value>,
    #[serde(default)]
    pub(super) capture: RawCapture,
    #[serde(default)]
    pub(super) apply: RawApply,
    #[serde(default)]
    pub(super) status: RawStatus,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStatus {
    pub(super) lagging_after: Option<HumanDuration>,
    pub(super) lagging_bytes: Option<i64>,
    pub(super) egress_price_per_gb: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCapture {
    pub(super) slot: Option<String>,
    pub(super) publication: Option<String>,
    pub(super) status_interval: Option<HumanDuration>,
    pub(super) max_in_flight: Option<i64>,
    pub(super) topic_partitions: Option<i64>,
    pub(super) topic_replication_factor: Option<i64>,
    pub(super) before_image: Option<String>,
    pub(super) origin_filter: Option<String>,
    pub(super) stamp_trigger: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawApply {
    pub(super) batch_max_records: Option<i64>,
    pub(super) batch_max_wait: Option<HumanDuration>,
    pub(super) max_retries: Option<i64>,
    pub(super) tombstone_horizon: Option<HumanDuration>,
    pub(super) schema_wait: Option<HumanDuration>,
    pub(super) sessions_per_source: Option<i64>,
    pub(super) conflict_log: Option<String>,
    pub(super) conflict_retention: Option<HumanDuration>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHttp {
    pub(super) listen: Option<String>,
    pub(super) token: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKafka {
    pub(super) brokers: String,
    #[serde(default)]
    pub(super) properties: BTreeMap<String, PropertyValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRegion {
    pub(super) id: i64,
    pub(super) dsn: String,
    pub(super) setup_dsn: Option<String>,
    pub(super) run_role: Option<String>,
    pub(super) hash_key: Option<String>,
    pub(super) hash_key_id: Option<String>,
    pub(super) dr_key: Option<String>,
    pub(super) dr_key_id: Option<String>,
    #[serde(default)]
    pub(super) dr_old_keys: BTreeMap<String, String>,
    pub(super) kafka: Option<RawKafka>,
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
    pub(super) fn scoped_values(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for region in self.regions.values() {
            out.push(&region.dsn);
            out.extend(region.setup_dsn.as_deref());
            out.extend(region.hash_key.as_deref());
            out.extend(region.dr_key.as_deref());
            out.extend(region.dr_old_keys.values().map(String::as_str));
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
pub(super) struct RawTable {
    pub(super) name: Spanned<String>,
    pub(super) class: RawClass,
    pub(super) owner: Option<String>,
    pub(super) home_column: Option<String>,
    pub(super) aliases: Option<BTreeMap<String, String>>,
    pub(super) allow: Option<BTreeMap<String, Vec<String>>>,
    #[serde(default)]
    pub(super) columns: Vec<RawColumnRule>,
    pub(super) dr: Option<Vec<String>>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawClass {
    Local,
    Global,
    Owned,
    Partitioned,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawColumnRule {
    pub(super) name: String,
    pub(super) action: Option<RawAction>,
    pub(super) mask: Option<String>,
    pub(super) to: Option<Vec<String>>,
    pub(super) merge: Option<RawMerge>,
    pub(super) formerly: Option<Vec<String>>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawMerge {
    Counter,
    Union,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawAction {
    Drop,
    Hash,
    Mask,
}
