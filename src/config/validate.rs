//! Raw structs → [`Config`]: every cross-reference and limit checked, with
//! the line of the offending key.
//!
//! Over 600 lines on purpose: one validator walks the whole file, so every
//! cross-reference (regions, tables, columns, clusters) is checked in one pass
//! with the line of the key that breaks it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use crate::event::TableName;

use super::load::line_column;
use super::raw::*;
use super::region::kafka_security;
use super::settings::*;
use super::table::*;
use super::values::HumanDuration;
use super::*;

/// `http.listen`: `"9187"` or `":9187"` (the loopback address), or an IP
/// address and port.
pub(super) fn parse_listen(text: &str) -> Option<SocketAddr> {
    let text = text.trim();
    let port = text.strip_prefix(':').unwrap_or(text);
    if let Ok(port) = port.parse::<u16>() {
        return Some(SocketAddr::new(DEFAULT_HTTP_HOST, port));
    }
    text.parse().ok()
}

// ---------------------------------------------------------------------------
// validation: raw -> Config

pub(super) struct Validator<'a> {
    pub(super) origin: &'a str,
    /// The interpolated text, to turn spans into line numbers.
    pub(super) text: &'a str,
    /// Variables that were not set (values holding them are not checked).
    pub(super) unset: &'a BTreeMap<String, usize>,
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

    pub(super) fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let prefix = self.prefix(raw.relay.prefix)?;
        let (max_clock_skew, max_stamp_ahead) =
            self.clock_limits(raw.relay.max_clock_skew, raw.relay.max_stamp_ahead)?;
        if raw.relay.hash_salt.is_some() {
            return Err(self.invalid(
                None,
                "relay.hash_salt is no longer used: hashed columns are keyed per source \
                 region now (HMAC-SHA-256). Set hash_key (at least 32 bytes, e.g. \
                 hash_key = \"${PGRELAY_US_HASH_KEY}\") and hash_key_id (e.g. \"k1\") under \
                 each [regions.NAME] whose tables hash columns, then remove relay.hash_salt; \
                 docs/security.md, \"Keyed pseudonyms\", explains the migration",
            ));
        }
        let regions = self.regions(raw.regions, raw.kafka)?;
        let capture = self.capture(raw.relay.capture)?;
        let apply = self.apply(raw.relay.apply)?;
        let status = self.status(raw.relay.status)?;
        let http = self.http(raw.http)?;
        let (tables, lines) = self.tables(raw.tables, &regions)?;
        self.hash_keys_declared(&tables, &lines, &regions)?;
        let breakers = self.breakers(raw.breakers, &regions, &tables)?;
        let verify = self.verify(raw.verify)?;
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
            http,
            regions,
            tables,
            breakers,
            verify,
        })
    }

    /// `relay.prefix`: Kafka topic characters only.
    fn prefix(&self, raw: Option<String>) -> Result<String, ConfigError> {
        let prefix = raw.unwrap_or_else(|| DEFAULT_PREFIX.to_string());
        if !is_topic_prefix(&prefix) {
            return Err(self.invalid(
                None,
                format!(
                    "relay.prefix = {prefix:?}: a topic prefix needs letters, digits, '.', '_' \
                     or '-' only (Kafka topic characters)"
                ),
            ));
        }
        Ok(prefix)
    }

    /// `relay.max_clock_skew` and `relay.max_stamp_ahead`: both positive,
    /// the second at least the first.
    fn clock_limits(
        &self,
        max_clock_skew: Option<HumanDuration>,
        max_stamp_ahead: Option<HumanDuration>,
    ) -> Result<(Duration, Duration), ConfigError> {
        let max_clock_skew = self.positive(
            "relay.max_clock_skew",
            max_clock_skew,
            default_max_clock_skew(),
        )?;
        let max_stamp_ahead = self.positive(
            "relay.max_stamp_ahead",
            max_stamp_ahead,
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
        Ok((max_clock_skew, max_stamp_ahead))
    }

    fn status(&self, raw: RawStatus) -> Result<StatusSettings, ConfigError> {
        Ok(StatusSettings {
            lagging_after: self.positive(
                "relay.status.lagging_after",
                raw.lagging_after,
                default_lagging_after(),
            )?,
            lagging_bytes: self.count(
                "relay.status.lagging_bytes",
                raw.lagging_bytes,
                default_lagging_bytes() as usize,
                1,
            )? as u64,
            egress_price_per_gb: match raw.egress_price_per_gb {
                Some(p) if !(p.is_finite() && p >= 0.0) => {
                    return Err(self.invalid(
                        None,
                        format!(
                            "relay.status.egress_price_per_gb = {p}: must be a price of zero or more (e.g. 0.02)"
                        ),
                    ))
                }
                p => p,
            },
        })
    }

    fn http(&self, raw: RawHttp) -> Result<HttpSettings, ConfigError> {
        let listen = match raw.listen {
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
        if let Some(token) = &raw.token {
            if !self.is_unresolved(token) && token.trim().len() < 16 {
                return Err(self.invalid(
                    None,
                    "http.token is shorter than 16 characters: use a long random secret \
                     (e.g. token = \"${METRICS_TOKEN}\"), or remove it to leave /metrics open",
                ));
            }
        }
        Ok(HttpSettings {
            listen,
            token: raw.token,
        })
    }

    /// Every `[[tables]]` entry, and the line each starts on; a table
    /// declared twice is refused with both lines.
    fn tables(
        &self,
        raw: Vec<RawTable>,
        regions: &BTreeMap<String, Region>,
    ) -> Result<(Vec<TableConfig>, Vec<usize>), ConfigError> {
        let mut tables: Vec<TableConfig> = Vec::with_capacity(raw.len());
        let mut lines: Vec<usize> = Vec::with_capacity(raw.len());
        for raw_table in raw {
            let line = line_column(self.text, raw_table.name.span().start).0;
            let table = self.table(raw_table, line, regions)?;
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
        Ok((tables, lines))
    }

    fn verify(&self, raw: RawVerify) -> Result<VerifySettings, ConfigError> {
        Ok(VerifySettings {
            interval: match raw.interval {
                None => None,
                Some(d) => Some(self.positive("verify.interval", Some(d), d.0)?),
            },
            rate: match raw.rate {
                None => None,
                Some(_) => Some(self.count("verify.rate", raw.rate, 0, 1)? as u64),
            },
        })
    }

    fn breakers(
        &self,
        raw: Vec<crate::breaker::RawRule>,
        regions: &BTreeMap<String, Region>,
        tables: &[TableConfig],
    ) -> Result<Vec<crate::breaker::Rule>, ConfigError> {
        let names: Vec<&str> = regions.keys().map(String::as_str).collect();
        let replicated: Vec<&TableName> = tables
            .iter()
            .filter(|t| !matches!(t.class, TableClass::Local))
            .map(|t| &t.name)
            .collect();
        let rules = raw
            .into_iter()
            .enumerate()
            .map(|(i, r)| crate::breaker::Rule::from_raw(r, i, &names, &replicated))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.invalid(None, e))?;
        crate::breaker::check_unique(&rules).map_err(|e| self.invalid(None, e))?;
        Ok(rules)
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
            origin_filter: match raw.origin_filter.as_deref() {
                None | Some("message") => OriginFilter::Message,
                Some("server") => OriginFilter::Server,
                Some(other) => {
                    return Err(self.invalid(
                        None,
                        format!(
                            "relay.capture.origin_filter = {other:?}: use \"message\" (default) \
                             or \"server\" (PostgreSQL 16+; drops changes of every replication origin)"
                        ),
                    ))
                }
            },
            stamp_trigger: match raw.stamp_trigger.as_deref() {
                None | Some("auto") => StampTrigger::Auto,
                Some("c") => StampTrigger::C,
                Some("plpgsql") => StampTrigger::Plpgsql,
                Some(other) => {
                    return Err(self.invalid(
                        None,
                        format!(
                            "relay.capture.stamp_trigger = {other:?}: use \"auto\" (default: the C \
                             trigger where the pgrelay extension is installed), \"c\" or \"plpgsql\""
                        ),
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
            conflict_log_percent: match raw.conflict_log.as_deref() {
                None | Some("all") => 100,
                Some("off") => 0,
                Some(v) => parse_percent(v).ok_or_else(|| {
                    self.invalid(
                        None,
                        format!(
                            "relay.apply.conflict_log = {v:?}: use \"all\", \"off\" or a \
                             percentage of the conflicts to record, such as \"10%\""
                        ),
                    )
                })?,
            },
            conflict_retention: self.positive(
                "relay.apply.conflict_retention",
                raw.conflict_retention,
                default_conflict_retention(),
            )?,
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
        for (name, region) in &raw {
            self.region_name(name)?;
            self.region_id(name, region.id, &mut ids)?;
            if region.dsn.trim().is_empty() {
                return Err(self.invalid(
                    None,
                    format!("regions.{name}.dsn is empty: give the libpq connection string of the region's primary"),
                ));
            }
        }
        let mut regions = BTreeMap::new();
        for (name, region) in raw {
            regions.insert(
                name.clone(),
                self.region(name, region, default_kafka.as_ref())?,
            );
        }
        Ok(regions)
    }

    /// A region's name goes into topic, slot and origin names: a few plain
    /// characters, and none of the names pgrelay keeps for itself.
    fn region_name(&self, name: &str) -> Result<(), ConfigError> {
        if !is_region_name(name) {
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
        if crate::names::origin_name(name, 0) == crate::names::REPLAY_ORIGIN {
            return Err(self.invalid(
                None,
                format!(
                    "region name {name:?} is reserved (`pgrelay dlq replay` writes under \
                     the replication origin pgrelay_replay); pick another name"
                ),
            ));
        }
        Ok(())
    }

    /// A region's id: in range, and not another region's (`ids` holds the
    /// ids seen so far).
    fn region_id<'n>(
        &self,
        name: &'n str,
        id: i64,
        ids: &mut BTreeMap<u8, &'n str>,
    ) -> Result<(), ConfigError> {
        if !REGION_IDS.contains(&id) {
            return Err(self.invalid(
                None,
                format!(
                    "regions.{name}.id = {id}: must be between 1 and 63 (it is the tie-break \
                     of HLC stamps)"
                ),
            ));
        }
        let id = id as u8;
        if let Some(other) = ids.insert(id, name) {
            return Err(self.invalid(
                None,
                format!(
                    "regions.{name}.id = {id} is already the id of region {other}; ids must \
                     be unique and never change"
                ),
            ));
        }
        Ok(())
    }

    /// One region whose name, id and dsn are already checked: its Kafka
    /// cluster (its own or the default), roles and keys.
    fn region(
        &self,
        name: String,
        region: RawRegion,
        default_kafka: Option<&KafkaCluster>,
    ) -> Result<Region, ConfigError> {
        let kafka = match (region.kafka, default_kafka) {
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
        self.region_roles(
            &name,
            region.setup_dsn.as_deref(),
            region.run_role.as_deref(),
        )?;
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
        let dr_key_id = self.dr_keys(
            &name,
            region.dr_key.as_deref(),
            region.dr_key_id,
            &region.dr_old_keys,
        )?;
        let hash_key_id = region.hash_key_id.unwrap_or_else(|| "k1".to_string());
        if !is_key_id(&hash_key_id) {
            return Err(self.invalid(
                None,
                format!(
                    "regions.{name}.hash_key_id = {hash_key_id:?}: use 1 to 16 letters, \
                     digits, '_' or '-' (it prefixes every hashed value, e.g. \"k2\")"
                ),
            ));
        }
        Ok(Region {
            name,
            id: region.id as u8,
            dsn: region.dsn,
            setup_dsn: region.setup_dsn,
            run_role: region.run_role,
            hash_key: region.hash_key,
            hash_key_id,
            dr_key: region.dr_key,
            dr_key_id,
            dr_old_keys: region.dr_old_keys,
            kafka,
        })
    }

    /// `setup_dsn`, when given, is not blank; `run_role` is a role name.
    fn region_roles(
        &self,
        name: &str,
        setup_dsn: Option<&str>,
        run_role: Option<&str>,
    ) -> Result<(), ConfigError> {
        if setup_dsn.is_some_and(|d| d.trim().is_empty()) {
            return Err(self.invalid(
                None,
                format!("regions.{name}.setup_dsn is empty: give the connection string of the setup role, or remove it to set up with dsn"),
            ));
        }
        if let Some(role) = run_role {
            if !is_role_name(role) {
                return Err(self.invalid(
                    None,
                    format!("regions.{name}.run_role = {role:?}: use the name of an existing role (1 to 63 letters, digits, '_' or '-')"),
                ));
            }
        }
        Ok(())
    }

    /// The DR keys of a region: the current key parses, its id (default
    /// `k1`) is well formed, and every old key has another well-formed id
    /// and parses. Returns the current key's id.
    fn dr_keys(
        &self,
        name: &str,
        dr_key: Option<&str>,
        dr_key_id: Option<String>,
        dr_old_keys: &BTreeMap<String, String>,
    ) -> Result<String, ConfigError> {
        if let Some(key) = dr_key {
            if !self.is_unresolved(key) {
                if let Err(e) = crate::dr::DrKey::parse("k", key) {
                    return Err(self.invalid(
                        None,
                        format!("regions.{name}.dr_key: {e} (e.g. `openssl rand -hex 32`)"),
                    ));
                }
            }
        }
        let dr_key_id = dr_key_id.unwrap_or_else(|| "k1".to_string());
        if !is_key_id(&dr_key_id) {
            return Err(self.invalid(
                None,
                format!(
                    "regions.{name}.dr_key_id = {dr_key_id:?}: use 1 to 16 letters, \
                     digits, '_' or '-' (every DR record names its key with it)"
                ),
            ));
        }
        for (id, key) in dr_old_keys {
            if !is_key_id(id) || *id == dr_key_id {
                return Err(self.invalid(
                    None,
                    format!(
                        "regions.{name}.dr_old_keys: key id {id:?} must be 1 to 16 letters, \
                         digits, '_' or '-' and not the current dr_key_id"
                    ),
                ));
            }
            if !self.is_unresolved(key) {
                if let Err(e) = crate::dr::DrKey::parse(id, key) {
                    return Err(self.invalid(None, format!("regions.{name}.dr_old_keys.{id}: {e}")));
                }
            }
        }
        Ok(dr_key_id)
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
        let check = TableCheck {
            validator: self,
            name: &name,
            line,
            regions,
        };
        check.class_keys(&raw)?;
        let class = check.class(
            raw.class,
            raw.owner,
            raw.home_column,
            raw.aliases,
            raw.allow,
        )?;
        let (columns, merge) = check.columns(raw.columns, &class)?;
        let dr = check.dr(raw.dr.unwrap_or_default(), &class)?;
        Ok(TableConfig {
            name,
            class,
            columns,
            merge,
            dr,
        })
    }
}

/// One `[[tables]]` entry under check: every error names the table and the
/// line it starts on.
struct TableCheck<'v> {
    validator: &'v Validator<'v>,
    name: &'v TableName,
    line: Option<usize>,
    regions: &'v BTreeMap<String, Region>,
}

impl TableCheck<'_> {
    fn err(&self, message: String) -> ConfigError {
        self.validator
            .invalid(self.line, format!("table {}: {message}", self.name))
    }

    fn declared(&self) -> String {
        join_names(self.regions.keys())
    }

    fn check_region(&self, what: String, region: &str) -> Result<(), ConfigError> {
        if self.regions.contains_key(region) {
            Ok(())
        } else {
            Err(self.err(format!(
                "{what} names an undeclared region; declared regions: {}",
                self.declared()
            )))
        }
    }

    /// Keys that belong to another class than the table's are refused.
    fn class_keys(&self, raw: &RawTable) -> Result<(), ConfigError> {
        let class_name = match raw.class {
            RawClass::Local => "local",
            RawClass::Global => "global",
            RawClass::Owned => "owned",
            RawClass::Partitioned => "partitioned",
        };
        if raw.class != RawClass::Owned && raw.owner.is_some() {
            return Err(self.err(format!(
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
                    return Err(self.err(format!(
                        "{key} is only for class = \"partitioned\" (this table is {class_name}); remove it"
                    )));
                }
            }
        }
        Ok(())
    }

    /// The class with what it needs: the owner of an owned table, the home
    /// column, aliases and allow lists of a partitioned one.
    fn class(
        &self,
        class: RawClass,
        owner: Option<String>,
        home_column: Option<String>,
        aliases: Option<BTreeMap<String, String>>,
        allow: Option<BTreeMap<String, Vec<String>>>,
    ) -> Result<TableClass, ConfigError> {
        Ok(match class {
            RawClass::Local => TableClass::Local,
            RawClass::Global => TableClass::Global,
            RawClass::Owned => {
                let owner = owner.ok_or_else(|| {
                    self.err(format!(
                        "class = \"owned\" needs owner = \"REGION\" (the only region that writes it; one of {})",
                        self.declared()
                    ))
                })?;
                self.check_region(format!("owner {owner:?}"), &owner)?;
                TableClass::Owned { owner }
            }
            RawClass::Partitioned => {
                let home_column = home_column.filter(|c| !c.is_empty()).ok_or_else(|| {
                    self.err(
                        "class = \"partitioned\" needs home_column = \"COLUMN\" (the column \
                         whose value names the row's home region)"
                            .to_string(),
                    )
                })?;
                let aliases = aliases.unwrap_or_default();
                for (value, region) in &aliases {
                    self.check_region(format!("alias {value} -> {region:?}"), region)?;
                }
                let mut allowed = BTreeMap::new();
                for (home, destinations) in allow.unwrap_or_default() {
                    self.check_region(format!("allow key {home:?}"), &home)?;
                    for destination in &destinations {
                        self.check_region(
                            format!("allow.{home} entry {destination:?}"),
                            destination,
                        )?;
                    }
                    allowed.insert(home, destinations.into_iter().collect());
                }
                TableClass::Partitioned {
                    home_column,
                    aliases,
                    allow: allowed,
                }
            }
        })
    }

    /// The column entries: merge columns (global tables only) and column
    /// rules (at most one per column and destination); no column is both.
    fn columns(
        &self,
        raw: Vec<RawColumnRule>,
        class: &TableClass,
    ) -> Result<(Vec<ColumnRule>, Vec<MergeColumn>), ConfigError> {
        let mut columns: Vec<ColumnRule> = Vec::with_capacity(raw.len());
        let mut merge: Vec<MergeColumn> = Vec::new();
        for rule in raw {
            if rule.name.is_empty() {
                return Err(self.err("a column rule has an empty name".to_string()));
            }
            if let Some(kind) = rule.merge {
                let column = self.merge_column(rule, kind, class, &merge)?;
                merge.push(column);
            } else {
                let rule = self.column_rule(rule, class)?;
                self.one_rule_per_destination(&rule, &columns)?;
                columns.push(rule);
            }
        }
        if let Some(m) = merge
            .iter()
            .find(|m| columns.iter().any(|r| r.covers(&m.column)))
        {
            return Err(self.err(format!(
                "column {}: a merge column cannot also have a column rule (it goes to every \
                 region as it is)",
                m.column
            )));
        }
        Ok((columns, merge))
    }

    /// `merge = "counter"` or `"union"`: on a global table, alone in its
    /// entry, once per column (`merge` holds the merge columns so far).
    fn merge_column(
        &self,
        rule: RawColumnRule,
        kind: RawMerge,
        class: &TableClass,
        merge: &[MergeColumn],
    ) -> Result<MergeColumn, ConfigError> {
        let column = rule.name;
        let kind = match kind {
            RawMerge::Counter => MergeKind::Counter,
            RawMerge::Union => MergeKind::Union,
        };
        if *class != TableClass::Global {
            return Err(self.err(format!(
                "column {column}: merge = \"{}\" is for class = \"global\" tables \
                 (where several regions write one row); this table is {}",
                kind.as_str(),
                class.as_str()
            )));
        }
        if rule.action.is_some() || rule.mask.is_some() || rule.to.is_some() {
            return Err(self.err(format!(
                "column {column}: a merge column goes to every region as it is; remove \
                 action, mask and to from its entry"
            )));
        }
        if rule.formerly.is_some() {
            return Err(self.err(format!(
                "column {column}: formerly is for drop, hash and mask rules (a merge column \
                 cannot be renamed in place; see Schema changes in docs/operations.md)"
            )));
        }
        if merge.iter().any(|m| m.column == column) {
            return Err(self.err(format!("column {column} is declared twice with merge")));
        }
        Ok(MergeColumn { column, kind })
    }

    /// A drop, hash or mask rule, for every destination or those in `to`.
    fn column_rule(
        &self,
        rule: RawColumnRule,
        class: &TableClass,
    ) -> Result<ColumnRule, ConfigError> {
        let column = rule.name;
        let Some(raw_action) = rule.action else {
            return Err(self.err(format!(
                "column {column}: give action = \"drop\", \"hash\" or \"mask\", or \
                 merge = \"counter\" or \"union\""
            )));
        };
        if *class == TableClass::Local {
            return Err(self.err(format!(
                "column rule on {column}: a local table never leaves its region, so column \
                 rules have no effect; remove them"
            )));
        }
        if let TableClass::Partitioned { home_column, .. } = class {
            if *home_column == column {
                return Err(self.err(format!(
                    "column {column} is the home column: it cannot be dropped, hashed or \
                     masked (destinations need it to place the row)"
                )));
            }
        }
        let action = match (raw_action, rule.mask) {
            (RawAction::Mask, Some(mask)) => ColumnAction::Mask(mask),
            (RawAction::Mask, None) => {
                return Err(self.err(format!(
                    "column {column}: action = \"mask\" needs mask = \"...\" (the text that \
                     replaces the value)"
                )))
            }
            (_, Some(_)) => {
                return Err(self.err(format!(
                    "column {column}: mask is only for action = \"mask\"; remove it"
                )))
            }
            (RawAction::Drop, None) => ColumnAction::Drop,
            (RawAction::Hash, None) => ColumnAction::Hash,
        };
        let to = match rule.to {
            None => None,
            Some(to) if to.is_empty() => {
                return Err(self.err(format!(
                    "column {column}: to = [] matches no destination; name regions, or \
                     remove `to` to apply the rule everywhere"
                )))
            }
            Some(to) => {
                for region in &to {
                    self.check_region(format!("column {column}: to entry {region:?}"), region)?;
                }
                Some(to.into_iter().collect::<BTreeSet<_>>())
            }
        };
        let formerly = self.formerly(&column, rule.formerly.unwrap_or_default(), class)?;
        Ok(ColumnRule {
            column,
            formerly,
            action,
            to,
        })
    }

    /// `formerly`: the column's earlier names, each once, none its current
    /// name or the home column.
    fn formerly(
        &self,
        column: &str,
        formerly: Vec<String>,
        class: &TableClass,
    ) -> Result<Vec<String>, ConfigError> {
        let mut out: Vec<String> = Vec::with_capacity(formerly.len());
        for name in formerly {
            if name.is_empty() || name == column || out.contains(&name) {
                return Err(self.err(format!(
                    "column {column}: formerly entry {name:?} must be an earlier name of the \
                     column, non-empty, other than {column:?} and listed once"
                )));
            }
            if let TableClass::Partitioned { home_column, .. } = class {
                if *home_column == name {
                    return Err(self.err(format!(
                        "column {column}: formerly entry {name:?} is the home column; it cannot \
                         be dropped, hashed or masked"
                    )));
                }
            }
            out.push(name);
        }
        Ok(out)
    }

    /// No destination gets two rules for one column (`columns` holds the
    /// rules so far).
    fn one_rule_per_destination(
        &self,
        rule: &ColumnRule,
        columns: &[ColumnRule],
    ) -> Result<(), ConfigError> {
        for region in self.regions.keys() {
            let clash = columns.iter().any(|r| {
                rule.names().any(|n| r.covers(n)) && r.applies_to(region) && rule.applies_to(region)
            });
            if clash {
                return Err(self.err(format!(
                    "column {} has two rules for destination {region}; give each \
                     destination at most one rule (use `to` to split them)",
                    rule.column
                )));
            }
        }
        Ok(())
    }

    /// `dr`: regions that keep encrypted copies of an owned or partitioned
    /// table, each once, never the owner itself.
    fn dr(&self, raw: Vec<String>, class: &TableClass) -> Result<BTreeSet<String>, ConfigError> {
        let mut dr = BTreeSet::new();
        for region in raw {
            self.check_region(format!("dr entry {region:?}"), &region)?;
            match class {
                TableClass::Local => {
                    return Err(self.err(
                        "dr: a local table is not captured; declare it owned (owner = its home) \
                         or partitioned to keep DR copies"
                            .to_string(),
                    ))
                }
                TableClass::Global => {
                    return Err(self.err(
                        "dr: a global table is already copied to every region in clear; \
                         DR copies are for owned and partitioned tables"
                            .to_string(),
                    ))
                }
                TableClass::Owned { owner } if *owner == region => {
                    return Err(self.err(format!(
                        "dr entry {region:?} is the owner, the table's home: name another region"
                    )))
                }
                _ => {}
            }
            if !dr.insert(region.clone()) {
                return Err(self.err(format!("dr names {region} twice")));
            }
        }
        Ok(dr)
    }
}

/// A topic prefix: not empty, Kafka topic characters only.
fn is_topic_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// A region name: 1 to [`MAX_REGION_NAME_LEN`] of a-z, 0-9 and `_`.
fn is_region_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_REGION_NAME_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// A role name as `run_role` takes it: 1 to 63 letters, digits, `_`, `-`.
fn is_role_name(role: &str) -> bool {
    !role.is_empty()
        && role.len() <= 63
        && role
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// A key id (`hash_key_id`, `dr_key_id`, an old DR key's id): 1 to 16
/// letters, digits, `_`, `-`.
fn is_key_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 16
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// `"N%"` with N a whole number from 0 to 100.
fn parse_percent(v: &str) -> Option<u8> {
    let n: u8 = v.strip_suffix('%')?.trim().parse().ok()?;
    (n <= 100).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_prefixes_take_kafka_topic_characters() {
        assert!(is_topic_prefix("pgrelay"));
        assert!(is_topic_prefix("Acme.prod_eu-1"));
        assert!(!is_topic_prefix(""));
        assert!(!is_topic_prefix("acme/prod"));
        assert!(!is_topic_prefix("acme prod"));
    }

    #[test]
    fn region_names_are_short_lowercase_words() {
        assert!(is_region_name("us"));
        assert!(is_region_name("eu_west_1"));
        assert!(is_region_name(&"a".repeat(MAX_REGION_NAME_LEN)));
        assert!(!is_region_name(&"a".repeat(MAX_REGION_NAME_LEN + 1)));
        assert!(!is_region_name(""));
        assert!(!is_region_name("EU"));
        assert!(!is_region_name("eu-west"));
    }

    #[test]
    fn role_names_allow_dashes_up_to_63_bytes() {
        assert!(is_role_name("pgrelay_run"));
        assert!(is_role_name("Relay-Run"));
        assert!(is_role_name(&"r".repeat(63)));
        assert!(!is_role_name(&"r".repeat(64)));
        assert!(!is_role_name(""));
        assert!(!is_role_name("relay run"));
        assert!(!is_role_name("relay\"; drop"));
    }

    #[test]
    fn key_ids_are_up_to_16_plain_characters() {
        assert!(is_key_id("k1"));
        assert!(is_key_id("2026-Q1_a"));
        assert!(is_key_id(&"k".repeat(16)));
        assert!(!is_key_id(&"k".repeat(17)));
        assert!(!is_key_id(""));
        assert!(!is_key_id("k:1"));
    }

    #[test]
    fn percentages_are_whole_numbers_up_to_100() {
        assert_eq!(parse_percent("10%"), Some(10));
        assert_eq!(parse_percent("0%"), Some(0));
        assert_eq!(parse_percent("100%"), Some(100));
        assert_eq!(parse_percent("101%"), None);
        assert_eq!(parse_percent("10"), None);
        assert_eq!(parse_percent("x%"), None);
    }
}
