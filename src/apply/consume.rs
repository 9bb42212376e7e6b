//! Kafka consumers at explicit partitions and stored offsets, and the
//! pre-flight check of what the apply side needs.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::Config;
use crate::source::catalog::{self};

use super::error::{ApplyError, ApplyErrorKind};
use super::session::session;
use super::target::load_targets;

/// One consumed Kafka record, owned.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
}

pub fn consumer(config: &Config, region: &str, group: &str) -> Result<StreamConsumer, ApplyError> {
    let cluster = config.kafka_for(region);
    let mut cfg = rdkafka::ClientConfig::new();
    cfg.set("bootstrap.servers", &cluster.brokers)
        // tuning defaults, overridable from the config
        .set("fetch.wait.max.ms", "50")
        .set("isolation.level", "read_committed");
    for (k, v) in &cluster.properties {
        cfg.set(k, v);
    }
    // what exactly-once apply relies on: offsets live in the target database
    cfg.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        // a stored offset Kafka no longer holds means records deleted
        // before they were applied: an error, never a silent jump
        .set("auto.offset.reset", "error");
    cfg.set_log_level(rdkafka::config::RDKafkaLogLevel::Warning);
    cfg.create()
        .map_err(|e| ApplyError::setup_from(format!("kafka consumer for region {region}: {e}"), e))
}

/// Assigns the partitions `p` of `topic` with `p % groups == group`, each
/// at its stored offset; returns how many.
pub async fn assign(
    consumer: &StreamConsumer,
    topic: &str,
    stored: &BTreeMap<i32, i64>,
    group: usize,
    groups: usize,
) -> Result<usize, ApplyError> {
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|source| ApplyError::kafka("kafka metadata for", topic, None, source))?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        // preflight checked it exists: a broker that is restarting may
        // answer without it for a moment
        return Err(ApplyErrorKind::TopicMissing {
            topic: topic.to_string(),
        }
        .into());
    }
    let mine: Vec<i32> = partitions
        .into_iter()
        .filter(|p| (*p as usize) % groups.max(1) == group)
        .collect();
    if mine.is_empty() {
        return Ok(0);
    }
    let mut tpl = TopicPartitionList::new();
    for p in &mine {
        // nothing stored: from the oldest record the cluster holds (a new
        // pair, or stored offsets removed after a resync); a stored offset
        // the cluster no longer holds is an error (auto.offset.reset)
        let offset = match stored.get(p) {
            Some(o) => Offset::Offset(*o),
            None => Offset::Beginning,
        };
        tpl.add_partition_offset(topic, *p, offset)
            .map_err(|source| ApplyError::kafka("assigning", topic, Some(*p), source))?;
    }
    consumer
        .assign(&tpl)
        .map_err(|source| ApplyError::kafka("assigning", topic, None, source))?;
    Ok(mine.len())
}

/// Everything checked before consuming: the target tables, the apply
/// session (role, origins), the Kafka cluster and topics.
pub async fn preflight(config: &Config, region: &str) -> Result<(), ApplyError> {
    let dsn = &config.region(region)?.dsn;
    let client = catalog::connect(dsn, region)
        .await
        .map_err(ApplyError::unreachable)?;
    load_targets(config, region, &client)
        .await
        .map_err(ApplyError::unreachable_at_start)?;
    // pgrelay's tables as this binary knows them (capture's preflight says
    // the same through `check`; an apply-only process must too)
    let installed = catalog::Catalog {
        client: &client,
        region,
    }
    .schema_versions()
    .await
    .map_err(|e| {
        if e.is_unreachable() {
            ApplyError::unreachable(e).unreachable_at_start()
        } else {
            ApplyError::setup_from(format!("region {region}"), e)
        }
    })?;
    if let Some(message) = installed.verdict(config.has_dr()).problem(region) {
        return Err(ApplyError::setup(message));
    }
    let cluster = config.kafka_for(region);
    let mut topics: Vec<String> = config
        .regions
        .keys()
        .filter(|r| *r != region)
        .map(|s| config.topic(s, region))
        .collect();
    topics.push(config.dlq_topic(region));
    topics.extend(
        config
            .dr_homes(region)
            .iter()
            .map(|h| config.dr_topic(h, region)),
    );
    crate::kafka::check_topics(cluster, &topics, Duration::from_secs(10))
        .await
        .map_err(|e| {
            if e.is_unreachable() {
                ApplyError::transient(format!("region {region}"), e).unreachable_at_start()
            } else {
                ApplyError::setup_from(format!("region {region}: {e}"), e)
            }
        })?;
    let groups = (0..config.apply.sessions_per_source).flat_map(|g| {
        config
            .regions
            .keys()
            .filter(|r| *r != region)
            .map(move |s| (s, g))
    });
    for (source, group) in groups {
        match session(config, region, source, group).await {
            Ok(_) => {}
            // an origin still held by a previous process's session, or a
            // database that is restarting: the supervisor retries
            Err(e) if e.is_transient() => {
                tracing::warn!(region, source = %source, "apply session not ready yet: {e}");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
