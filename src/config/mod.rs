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
//! Files: `raw` (serde's view of the file), `env` (`${ENV}` interpolation),
//! `load` (file → text → raw → validated), `validate` (raw → [`Config`]),
//! `settings`, `region`, `table` (the validated types), `values`
//! (durations, Kafka properties), `redact` (DSNs in messages), `error`.
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

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use crate::event::TableName;

mod env;
mod error;
mod load;
mod raw;
mod redact;
#[cfg(test)]
mod reference_tests;
mod region;
mod settings;
mod table;
#[cfg(test)]
mod tests;
mod validate;
mod values;

pub use error::ConfigError;
pub use load::{load, parse, parse_with_env};
pub use redact::redact_dsn;
pub use region::*;
pub use settings::*;
pub use table::*;
pub use values::parse_duration;

/// A unit test's config: `[kafka]`, then `regions` numbered from 1 (each
/// with DSN `host={name}`), then `rest` (tables and the like), parsed with
/// no environment; panics with the error.
#[cfg(test)]
pub(crate) fn test_config(regions: &[&str], rest: &str) -> Config {
    let mut text = String::from("[kafka]\nbrokers = \"k:9092\"\n\n");
    for (i, r) in regions.iter().enumerate() {
        text.push_str(&format!(
            "[regions.{r}]\nid = {}\ndsn = \"host={r}\"\n",
            i + 1
        ));
    }
    text.push('\n');
    text.push_str(rest);
    parse_with_env(&text, "relay.toml", |_| None).unwrap_or_else(|e| panic!("{e}"))
}

/// Region names go into topic, slot and origin names: keep them short.
pub const MAX_REGION_NAME_LEN: usize = 40;
/// Region ids are the tie-break of HLC stamps (6 bits, 0 reserved).
pub const REGION_IDS: std::ops::RangeInclusive<i64> = 1..=63;
/// A region name that would make `{prefix}.dlq.{region}` ambiguous.
pub(super) const RESERVED_REGION: &str = "dlq";

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
    /// `[[breakers]]`: blast-radius thresholds (see [`crate::breaker`]).
    pub breakers: Vec<crate::breaker::Rule>,
    pub verify: VerifySettings,
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

impl Config {
    /// The declared tables that replicate: every class but `local`.
    pub fn replicated_tables(&self) -> impl Iterator<Item = &TableConfig> {
        self.tables
            .iter()
            .filter(|t| !matches!(t.class, TableClass::Local))
    }

    /// Whether any table sends encrypted DR copies (schema `pgrelay_dr`).
    pub fn has_dr(&self) -> bool {
        self.tables.iter().any(|t| !t.dr.is_empty())
    }

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

    /// [`Config::needs_full_identity`] for one table: also every table with
    /// a `counter` column (its delta is new - old, and the old value comes
    /// from the old row).
    pub fn table_needs_full_identity(&self, table: &TableConfig) -> bool {
        self.needs_full_identity(&table.class)
            || table.merge.iter().any(|m| m.kind == MergeKind::Counter)
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
    /// Names every such variable at once.
    pub fn require(&self, needs: &[Need<'_>]) -> Result<(), ConfigError> {
        let mut secrets: Vec<(String, usize, String)> = Vec::new();
        for need in needs {
            for (key, value) in self.needed_values(need)? {
                for (var, line) in self.unresolved_all(value) {
                    if !secrets.iter().any(|(v, _, _)| v == var) {
                        secrets.push((var.to_string(), line, key.clone()));
                    }
                }
            }
        }
        if secrets.len() > 1 {
            secrets.sort_by_key(|(_, line, _)| *line);
            return Err(ConfigError::UnsetSecrets {
                origin: self.origin.clone(),
                secrets,
            });
        }
        match secrets.pop() {
            Some((var, line, key)) => Err(ConfigError::UnsetSecret {
                origin: self.origin.clone(),
                line,
                var,
                key,
            }),
            None => Ok(()),
        }
    }

    /// Every unset variable `value` holds.
    fn unresolved_all<'a>(&'a self, value: &'a str) -> impl Iterator<Item = (&'a str, usize)> {
        self.unset
            .iter()
            .filter(move |(var, _)| value.contains(&format!("${{{var}}}")))
            .map(|(var, line)| (var.as_str(), *line))
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
            Need::DrKey(r) => self
                .region(r)?
                .dr_key
                .iter()
                .map(|k| (format!("regions.{r}.dr_key"), k.as_str()))
                .collect(),
            Need::DrOldKeys(r) => self
                .region(r)?
                .dr_old_keys
                .iter()
                .map(|(id, k)| (format!("regions.{r}.dr_old_keys.{id}"), k.as_str()))
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
            if self.sends_dr(region) {
                needs.push(Need::DrKey(region));
            }
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
    /// Whether `region` seals DR copies of some table.
    pub fn sends_dr(&self, region: &str) -> bool {
        self.tables
            .iter()
            .any(|t| t.dr_regions(region).next().is_some())
    }

    /// The DR topics `source` publishes to, with their destinations.
    pub fn dr_topics(&self, source: &str) -> Vec<(String, String)> {
        let mut regions: Vec<&String> = self
            .tables
            .iter()
            .flat_map(|t| t.dr_regions(source))
            .collect();
        regions.sort();
        regions.dedup();
        regions
            .into_iter()
            .map(|d| (d.clone(), self.dr_topic(source, d)))
            .collect()
    }

    /// The topic of `home`'s DR copies held by `dr`.
    pub fn dr_topic(&self, home: &str, dr: &str) -> String {
        format!("{}.dr.{}.{}", self.prefix, home, dr)
    }

    /// The homes whose DR copies `region` holds.
    pub fn dr_homes(&self, region: &str) -> Vec<String> {
        self.regions
            .keys()
            .filter(|home| {
                *home != region
                    && self
                        .tables
                        .iter()
                        .any(|t| t.dr_regions(home).any(|d| d == region))
            })
            .cloned()
            .collect()
    }

    /// `region`'s DR key; an error names the unset variable, or says the
    /// key is missing.
    pub fn dr_key(&self, region: &str) -> Result<crate::dr::DrKey, ConfigError> {
        self.require(&[Need::DrKey(region)])?;
        let r = self.region(region)?;
        let invalid = |message: String| ConfigError::Invalid {
            origin: self.origin.clone(),
            line: None,
            message,
        };
        let text = r.dr_key.as_deref().ok_or_else(|| {
            invalid(format!(
                "regions.{region}.dr_key is not set: DR copies are sealed with it \
                 (32 random bytes, e.g. dr_key = \"${{PGRELAY_{}_DR_KEY}}\" holding \
                 `openssl rand -hex 32`)",
                region.to_ascii_uppercase()
            ))
        })?;
        crate::dr::DrKey::parse(&r.dr_key_id, text)
            .map_err(|e| invalid(format!("regions.{region}.dr_key: {e}")))
    }

    /// `region`'s DR key and the keys it sealed with before
    /// (`dr_old_keys`), for opening copies.
    pub fn dr_key_ring(&self, region: &str) -> Result<crate::dr::KeyRing, ConfigError> {
        let current = self.dr_key(region)?;
        self.require(&[Need::DrOldKeys(region)])?;
        let old = self
            .region(region)?
            .dr_old_keys
            .iter()
            .map(|(id, text)| {
                crate::dr::DrKey::parse(id, text).map_err(|e| ConfigError::Invalid {
                    origin: self.origin.clone(),
                    line: None,
                    message: format!("regions.{region}.dr_old_keys.{id}: {e}"),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(crate::dr::KeyRing { current, old })
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
    /// `regions.X.dr_key`.
    DrKey(&'a str),
    /// `regions.X.dr_old_keys`.
    DrOldKeys(&'a str),
    /// The Kafka cluster holding the topics destined to region X.
    Kafka(&'a str),
    /// `http.token`.
    HttpToken,
}

pub(super) fn join_names<'a>(names: impl IntoIterator<Item = &'a String>) -> String {
    names
        .into_iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}
