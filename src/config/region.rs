//! Regions and the Kafka clusters they publish to.

use std::collections::BTreeMap;
use std::fmt;

use super::redact::redact_dsn;

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
    /// Key sealing this region's DR copies (AES-256-GCM, 32 bytes as hex or
    /// base64); only this region's sidecar and `dr restore` need it.
    pub dr_key: Option<String>,
    /// Names the DR key in every sealed record, so keys can rotate.
    pub dr_key_id: String,
    /// Keys this region sealed with before a rotation, by key id: only
    /// `dr restore` uses them, to open the copies still sealed under them.
    pub dr_old_keys: BTreeMap<String, String>,
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
            .field("dr_key", &self.dr_key.as_ref().map(|_| "***"))
            .field("dr_key_id", &self.dr_key_id)
            .field("dr_old_keys", &self.dr_old_keys.keys().collect::<Vec<_>>())
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
pub(super) fn kafka_security(properties: &BTreeMap<String, String>) -> Result<(), String> {
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

pub(super) fn is_secret_property(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["password", "secret", "token", "sasl.jaas.config"]
        .iter()
        .any(|s| key.contains(s))
}
