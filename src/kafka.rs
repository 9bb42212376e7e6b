//! Kafka administration shared by `setup`, `check` and the preflight:
//! reachability, topic existence, explicit topic creation (pgrelay never
//! relies on broker-side auto-creation).

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use std::sync::Mutex;

use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::metadata::Metadata;
use rdkafka::producer::{BaseProducer, Producer, ProducerContext};

use crate::config::KafkaCluster;

/// How long a metadata request may keep failing with a timeout before the
/// caller gives up: a broker busy serving a region's catch-up can answer one
/// request later than [`METADATA_ATTEMPT`], which is no reason to fail a
/// command or a start.
pub const METADATA_PATIENCE: Duration = Duration::from_secs(60);
/// How long one metadata request waits for its answer.
pub const METADATA_ATTEMPT: Duration = Duration::from_secs(10);

/// Metadata of `topic` (every topic with `None`), asked again while the
/// cluster answers with a timeout or a transport error, for up to
/// `patience`; any other error, or the last one, is returned. Blocking.
pub fn fetch_metadata<C: ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: Option<&str>,
    patience: Duration,
) -> rdkafka::error::KafkaResult<Metadata> {
    let deadline = std::time::Instant::now() + patience;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let result = client.fetch_metadata(
            topic,
            METADATA_ATTEMPT.min(left.max(Duration::from_secs(1))),
        );
        match result {
            Err(e) if is_slow_answer(&e) && std::time::Instant::now() < deadline => {
                tracing::warn!(topic = topic.unwrap_or("*"), error = %e, "kafka metadata slow to come, asking again");
                std::thread::sleep(Duration::from_millis(200));
            }
            other => return other,
        }
    }
}

/// A timed-out or cut request (worth asking again), not an answer.
fn is_slow_answer(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::OperationTimedOut
                | RDKafkaErrorCode::RequestTimedOut
                | RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::AllBrokersDown
        )
    )
}

/// A Kafka administration failure: the cluster cannot be reached (worth
/// retrying), or it answered and something is wrong.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}")]
    Failed(String),
}

impl AdminError {
    pub fn is_unreachable(&self) -> bool {
        matches!(self, AdminError::Unreachable(_))
    }
}

/// Keeps the last error librdkafka reported about a broker connection
/// (a TLS handshake or SASL failure, say), which a timed-out request does
/// not carry.
#[derive(Default)]
pub struct LastBrokerError(Mutex<Vec<String>>);

impl LastBrokerError {
    /// `; last broker error: ...` when one was reported, for messages:
    /// the distinct reasons, the generic "brokers are down" only when there
    /// is nothing better.
    pub fn suffix(&self) -> String {
        let Ok(seen) = self.0.lock() else {
            return String::new();
        };
        let specific: Vec<&str> = seen
            .iter()
            .filter(|m| !m.contains("brokers are down"))
            .map(String::as_str)
            .collect();
        let shown = if specific.is_empty() {
            seen.last().map(|m| vec![m.as_str()]).unwrap_or_default()
        } else {
            specific
        };
        if shown.is_empty() {
            String::new()
        } else {
            format!("; last broker error: {}", shown.join("; "))
        }
    }

    fn keep(&self, reason: String) {
        if let Ok(mut seen) = self.0.lock() {
            let reason = same_failure(&reason).to_string();
            if !seen.contains(&reason) && seen.len() < 3 {
                seen.push(reason);
            }
        }
    }
}

/// A broker failure as one spelling: librdkafka reports each both as a log
/// line (prefixed with its thread, `[thrd:host:port/bootstrap]: `) and as
/// an error event, and again on every reconnection (` (after 0ms in state
/// CONNECT)`).
fn same_failure(reason: &str) -> &str {
    let reason = match reason.strip_prefix("[thrd:") {
        Some(rest) => rest.split_once("]: ").map_or(reason, |(_, r)| r),
        None => reason,
    };
    reason.split(" (after ").next().unwrap_or(reason)
}

impl ProducerContext for LastBrokerError {
    type DeliveryOpaque = ();

    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: ()) {}
}

impl ClientContext for LastBrokerError {
    // librdkafka reports a failed broker connection (TLS, SASL) as an error
    // log line from its own threads; the error event needs a poll that
    // admin requests do not make
    fn log(&self, level: RDKafkaLogLevel, _fac: &str, message: &str) {
        if (level as i32) <= (RDKafkaLogLevel::Error as i32) {
            self.keep(message.to_string());
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.keep(if reason.is_empty() {
            error.to_string()
        } else {
            reason.to_string()
        });
    }
}

fn client_config(cluster: &KafkaCluster) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &cluster.brokers);
    for (k, v) in &cluster.properties {
        cfg.set(k, v);
    }
    // errors reach LastBrokerError (the default context drops them)
    cfg.set_log_level(RDKafkaLogLevel::Error);
    cfg
}

/// librdkafka properties that name a file (or a directory of them).
const FILE_PROPERTIES: [&str; 6] = [
    "ssl.ca.location",
    "ssl.certificate.location",
    "ssl.key.location",
    "ssl.crl.location",
    "ssl.keystore.location",
    "sasl.kerberos.keytab",
];

/// The first file a property names that cannot be opened, as a message
/// with the property and the path (librdkafka reports only an OpenSSL code).
pub fn unreadable_file(cluster: &KafkaCluster) -> Option<String> {
    FILE_PROPERTIES.iter().find_map(|key| {
        let path = cluster.properties.get(*key)?;
        if *key == "ssl.ca.location" && path == "probe" {
            return None;
        }
        let error = std::fs::File::open(path).err()?;
        Some(format!(
            "kafka property {key} = {path:?} for {}: cannot read it ({error})",
            cluster.brokers
        ))
    })
}

/// With TLS asked for (`security.protocol` ssl or sasl_ssl) and no broker
/// error better than "transport failure", the likely cause: a plaintext
/// listener drops a TLS handshake without a word.
fn tls_hint(cluster: &KafkaCluster, suffix: &str) -> String {
    let protocol = cluster
        .properties
        .get("security.protocol")
        .map(|p| p.to_ascii_lowercase())
        .unwrap_or_default();
    if !protocol.ends_with("ssl") || suffix.to_ascii_lowercase().contains("ssl") {
        return String::new();
    }
    format!(
        " (security.protocol = {protocol}: is the listener at {} a TLS one? Against a plaintext \
         listener the TLS handshake fails with nothing but a transport failure; check the port, \
         or use plaintext/sasl_plaintext there)",
        cluster.brokers
    )
}

/// Every topic's metadata, or an error naming the brokers that could not be
/// reached.
pub async fn metadata(cluster: &KafkaCluster, timeout: Duration) -> Result<Metadata, AdminError> {
    if let Some(unreadable) = unreadable_file(cluster) {
        return Err(AdminError::Failed(unreadable));
    }
    let cfg = client_config(cluster);
    let brokers = cluster.brokers.clone();
    let owned = cluster.clone();
    tokio::task::spawn_blocking(move || {
        // a producer, because polling it serves the main queue where
        // librdkafka puts broker errors and logs
        let probe: BaseProducer<LastBrokerError> = cfg
            .create_with_context(LastBrokerError::default())
            .map_err(|e| {
                AdminError::Failed(format!("invalid kafka settings for {brokers}: {e}"))
            })?;
        probe.client().fetch_metadata(None, timeout).map_err(|e| {
            for _ in 0..100 {
                probe.poll(Duration::ZERO);
            }
            let suffix = probe.context().suffix();
            AdminError::Unreachable(format!(
                "cannot reach kafka brokers {brokers} within {timeout:?}: {e}{suffix}{}",
                tls_hint(&owned, &suffix)
            ))
        })
    })
    .await
    .map_err(|e| AdminError::Failed(format!("metadata task failed: {e}")))?
}

/// The names of the topics the cluster has (without an error).
pub async fn existing_topics(
    cluster: &KafkaCluster,
    timeout: Duration,
) -> Result<std::collections::BTreeSet<String>, AdminError> {
    let md = metadata(cluster, timeout).await?;
    Ok(md
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| t.name().to_string())
        .collect())
}

/// Fails unless every topic exists.
pub async fn check_topics(
    cluster: &KafkaCluster,
    topics: &[String],
    timeout: Duration,
) -> Result<(), AdminError> {
    let md = metadata(cluster, timeout).await?;
    let missing: Vec<&str> = topics
        .iter()
        .filter(|t| {
            !md.topics()
                .iter()
                .any(|m| m.name() == t.as_str() && m.error().is_none())
        })
        .map(|t| t.as_str())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(AdminError::Failed(format!(
            "topics missing on kafka {}: {}; run pgrelay setup",
            cluster.brokers,
            missing.join(", ")
        )))
    }
}

/// Creates the topics that do not exist yet.
pub async fn create_topics(
    cluster: &KafkaCluster,
    topics: &[String],
    partitions: i32,
    replication_factor: i32,
    timeout: Duration,
) -> Result<Vec<String>, AdminError> {
    let md = metadata(cluster, timeout).await?;
    let missing: Vec<&String> = topics
        .iter()
        .filter(|t| {
            !md.topics()
                .iter()
                .any(|m| m.name() == t.as_str() && m.error().is_none())
        })
        .collect();
    if missing.is_empty() {
        return Ok(vec![]);
    }
    let admin: AdminClient<DefaultClientContext> =
        client_config(cluster).create().map_err(|e| {
            AdminError::Failed(format!(
                "invalid kafka settings for {}: {e}",
                cluster.brokers
            ))
        })?;
    let new: Vec<NewTopic> = missing
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(replication_factor)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(timeout));
    let results = admin
        .create_topics(new.iter(), &opts)
        .await
        .map_err(|e| AdminError::Failed(format!("creating topics on {}: {e}", cluster.brokers)))?;
    let mut created = Vec::new();
    for r in results {
        match r {
            Ok(name) => created.push(name),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(AdminError::Failed(format!(
                    "cannot create topic {name} on {}: {code}",
                    cluster.brokers
                )))
            }
        }
    }
    Ok(created)
}

/// The sum of the partitions' end offsets of `topic` (records ever written).
pub async fn topic_end(
    cluster: &KafkaCluster,
    topic: &str,
    timeout: Duration,
) -> Result<i64, String> {
    Ok(watermarks(cluster, topic, timeout)
        .await?
        .values()
        .map(|(_, high)| high)
        .sum())
}

/// The next offset of each partition of `topic` (where a reader that skips
/// everything written so far starts).
pub async fn partition_ends(
    cluster: &KafkaCluster,
    topic: &str,
    timeout: Duration,
) -> Result<std::collections::BTreeMap<i32, i64>, String> {
    Ok(watermarks(cluster, topic, timeout)
        .await?
        .into_iter()
        .map(|(p, (_, high))| (p, high))
        .collect())
}

/// The first offset still held of each partition of `topic` (records below
/// it were deleted by retention).
pub async fn partition_starts(
    cluster: &KafkaCluster,
    topic: &str,
    timeout: Duration,
) -> Result<std::collections::BTreeMap<i32, i64>, String> {
    Ok(watermarks(cluster, topic, timeout)
        .await?
        .into_iter()
        .map(|(p, (low, _))| (p, low))
        .collect())
}

/// Each partition's (first held, next) offsets.
async fn watermarks(
    cluster: &KafkaCluster,
    topic: &str,
    timeout: Duration,
) -> Result<std::collections::BTreeMap<i32, (i64, i64)>, String> {
    let cfg = client_config(cluster);
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let consumer: BaseConsumer = cfg
            .create()
            .map_err(|e| format!("invalid kafka settings: {e}"))?;
        let md = fetch_metadata(consumer.client(), Some(&topic), timeout)
            .map_err(|e| format!("kafka metadata for {topic}: {e}"))?;
        let mut out = std::collections::BTreeMap::new();
        for t in md.topics().iter().filter(|t| t.name() == topic) {
            for p in t.partitions() {
                let marks = consumer
                    .fetch_watermarks(&topic, p.id(), timeout)
                    .map_err(|e| format!("watermarks of {topic}[{}]: {e}", p.id()))?;
                out.insert(p.id(), marks);
            }
        }
        Ok(out)
    })
    .await
    .map_err(|e| format!("watermark task failed: {e}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broker_failure_is_kept_once_whichever_way_it_is_reported() {
        let last = LastBrokerError::default();
        let failure =
            "127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed: Connection refused";
        last.keep(format!(
            "[thrd:127.0.0.1:1/bootstrap]: {failure} (after 0ms in state CONNECT)"
        ));
        last.keep(format!("{failure} (after 0ms in state CONNECT)"));
        last.keep(format!(
            "{failure} (after 1001ms in state CONNECT, 1 identical error(s) suppressed)"
        ));
        assert_eq!(last.suffix(), format!("; last broker error: {failure}"));
    }
}
