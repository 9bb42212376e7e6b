//! The dead-letter topic `{prefix}.dlq.{region}`: records the apply side
//! could not apply, with why, and `pgrelay dlq list|replay`.
//!
//! A dead letter keeps the original key and value; its headers say what
//! went wrong and where the record came from:
//! `pgrelay.dlq.class`, `.message`, `.sqlstate`, `.topic`, `.partition`,
//! `.offset`, `.attempts`. Replay re-applies with the same rules, one record
//! per transaction together with its progress (stored in `pgrelay.offsets`
//! under the dead-letter topic's name), so it is resumable and idempotent.
//! What fails again is parked again with the new reason.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use crate::apply::record::Rejection;
use crate::apply::{db_message, sqlstate, ApplyError, Consumed};
use crate::config::Config;

pub const H_CLASS: &str = "pgrelay.dlq.class";
pub const H_MESSAGE: &str = "pgrelay.dlq.message";
pub const H_SQLSTATE: &str = "pgrelay.dlq.sqlstate";
pub const H_TOPIC: &str = "pgrelay.dlq.topic";
pub const H_PARTITION: &str = "pgrelay.dlq.partition";
pub const H_OFFSET: &str = "pgrelay.dlq.offset";
pub const H_ATTEMPTS: &str = "pgrelay.dlq.attempts";
pub const H_REPLAY_RUN: &str = "pgrelay.dlq.replay_run";

/// One parked record and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub class: String,
    pub message: String,
    pub sqlstate: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub attempts: u32,
    pub replay_run: Option<String>,
}

impl DeadLetter {
    pub fn rejected(c: &Consumed, why: &Rejection, attempts: u32) -> Self {
        DeadLetter {
            key: c.key.clone(),
            value: c.value.clone(),
            class: why.class().to_string(),
            message: why.to_string(),
            sqlstate: String::new(),
            topic: c.topic.clone(),
            partition: c.partition,
            offset: c.offset,
            attempts,
            replay_run: None,
        }
    }

    pub fn failed(c: &Consumed, e: &tokio_postgres::Error, attempts: u32) -> Self {
        let state = sqlstate(e);
        let class = match &state[..state.len().min(2)] {
            "23" => "constraint_violation",
            "22" => "data_exception",
            "42" => "schema_mismatch",
            _ => "database_error",
        };
        DeadLetter {
            key: c.key.clone(),
            value: c.value.clone(),
            class: class.to_string(),
            message: db_message(e),
            sqlstate: state,
            topic: c.topic.clone(),
            partition: c.partition,
            offset: c.offset,
            attempts,
            replay_run: None,
        }
    }

    fn headers(&self) -> OwnedHeaders {
        let partition = self.partition.to_string();
        let offset = self.offset.to_string();
        let attempts = self.attempts.to_string();
        let mut pairs = vec![
            (H_CLASS, self.class.as_str()),
            (H_MESSAGE, self.message.as_str()),
            (H_SQLSTATE, self.sqlstate.as_str()),
            (H_TOPIC, self.topic.as_str()),
            (H_PARTITION, partition.as_str()),
            (H_OFFSET, offset.as_str()),
            (H_ATTEMPTS, attempts.as_str()),
        ];
        if let Some(run) = &self.replay_run {
            pairs.push((H_REPLAY_RUN, run.as_str()));
        }
        let mut h = OwnedHeaders::new_with_capacity(pairs.len());
        for (k, v) in pairs {
            h = h.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        h
    }

    /// Reads a dead letter back from the topic.
    pub fn from_message<M: Message>(m: &M) -> DeadLetter {
        let mut h: BTreeMap<String, String> = BTreeMap::new();
        if let Some(headers) = m.headers() {
            for hd in headers.iter() {
                h.insert(
                    hd.key.to_string(),
                    String::from_utf8_lossy(hd.value.unwrap_or_default()).into_owned(),
                );
            }
        }
        let get = |k: &str| h.get(k).cloned().unwrap_or_default();
        DeadLetter {
            key: m.key().map(|k| k.to_vec()),
            value: m.payload().map(|v| v.to_vec()),
            class: get(H_CLASS),
            message: get(H_MESSAGE),
            sqlstate: get(H_SQLSTATE),
            topic: get(H_TOPIC),
            partition: get(H_PARTITION).parse().unwrap_or(-1),
            offset: get(H_OFFSET).parse().unwrap_or(-1),
            attempts: get(H_ATTEMPTS).parse().unwrap_or(0),
            replay_run: h.get(H_REPLAY_RUN).cloned(),
        }
    }
}

/// Produces dead letters to this region's dead-letter topic and waits for
/// Kafka to acknowledge them.
pub struct DlqProducer {
    producer: FutureProducer,
    pub topic: String,
}

impl DlqProducer {
    pub fn new(config: &Config, region: &str) -> Result<Self, ApplyError> {
        let cluster = config.kafka_for(region);
        let mut cfg = rdkafka::ClientConfig::new();
        cfg.set("bootstrap.servers", &cluster.brokers);
        for (k, v) in &cluster.properties {
            cfg.set(k, v);
        }
        cfg.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "30000");
        cfg.set_log_level(rdkafka::config::RDKafkaLogLevel::Warning);
        let producer = cfg.create().map_err(|e| {
            ApplyError::setup_from(format!("dead-letter producer for region {region}: {e}"), e)
        })?;
        Ok(DlqProducer {
            producer,
            topic: config.dlq_topic(region),
        })
    }

    pub async fn send_all(&self, dead: &[DeadLetter]) -> Result<(), DlqSendError> {
        self.send(dead, true).await
    }

    /// [`send_all`](Self::send_all) without a warning per record (a
    /// discarded storm: the caller logs once per batch).
    pub async fn send_quietly(&self, dead: &[DeadLetter]) -> Result<(), DlqSendError> {
        self.send(dead, false).await
    }

    async fn send(&self, dead: &[DeadLetter], warn_each: bool) -> Result<(), DlqSendError> {
        for d in dead {
            let mut rec: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&self.topic).headers(d.headers());
            if let Some(k) = &d.key {
                rec = rec.key(k.as_slice());
            }
            if let Some(v) = &d.value {
                rec = rec.payload(v.as_slice());
            }
            self.producer
                .send(rec, Duration::from_secs(30))
                .await
                .map_err(|(source, _)| DlqSendError {
                    topic: self.topic.clone(),
                    record_topic: d.topic.clone(),
                    partition: d.partition,
                    offset: d.offset,
                    source,
                })?;
            if warn_each {
                tracing::warn!(
                    topic = %d.topic, partition = d.partition, offset = d.offset,
                    class = %d.class, sqlstate = %d.sqlstate, "record dead-lettered"
                );
            }
        }
        Ok(())
    }
}

/// A dead letter Kafka did not take: the record it parks (`record_topic`,
/// `partition`, `offset`) stays unapplied and is consumed again.
#[derive(Debug, thiserror::Error)]
#[error("dead-letter topic {topic}: {source}")]
pub struct DlqSendError {
    pub topic: String,
    pub record_topic: String,
    pub partition: i32,
    pub offset: i64,
    #[source]
    pub source: KafkaError,
}

/// Reads the dead-letter topic from `start` (partition -> offset) until no
/// record arrives for `idle`, or `limit` records were read.
pub fn read(
    config: &Config,
    region: &str,
    start: &BTreeMap<i32, i64>,
    limit: Option<usize>,
    idle: Duration,
) -> Result<Vec<(i32, i64, DeadLetter)>, ApplyError> {
    let topic = config.dlq_topic(region);
    let cluster = config.kafka_for(region);
    let mut cfg = rdkafka::ClientConfig::new();
    cfg.set("bootstrap.servers", &cluster.brokers);
    for (k, v) in &cluster.properties {
        cfg.set(k, v);
    }
    cfg.set("group.id", format!("pgrelay-dlq-{region}"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false");
    cfg.set_log_level(rdkafka::config::RDKafkaLogLevel::Warning);
    let consumer: BaseConsumer = cfg
        .create()
        .map_err(|e| ApplyError::setup_from(format!("kafka consumer: {e}"), e))?;
    let md = crate::kafka::fetch_metadata(
        consumer.client(),
        Some(&topic),
        crate::kafka::METADATA_PATIENCE,
    )
    .map_err(|e| {
        ApplyError::setup_from(format!("cannot read dead-letter topic {topic}: {e}"), e)
    })?;
    let mut tpl = TopicPartitionList::new();
    for t in md
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
    {
        for p in t.partitions() {
            let off = start
                .get(&p.id())
                .map(|o| Offset::Offset(*o))
                .unwrap_or(Offset::Beginning);
            tpl.add_partition_offset(&topic, p.id(), off)
                .map_err(|source| ApplyError::kafka("assigning", &topic, Some(p.id()), source))?;
        }
    }
    if tpl.count() == 0 {
        return Err(ApplyError::setup(format!(
            "dead-letter topic {topic} does not exist; run pgrelay setup --region {region}"
        )));
    }
    consumer
        .assign(&tpl)
        .map_err(|source| ApplyError::kafka("assigning", &topic, None, source))?;
    let mut out = Vec::new();
    let mut last = std::time::Instant::now();
    while last.elapsed() < idle && limit.is_none_or(|l| out.len() < l) {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                last = std::time::Instant::now();
                out.push((m.partition(), m.offset(), DeadLetter::from_message(&m)));
            }
            Some(Err(source)) => return Err(ApplyError::kafka("reading", &topic, None, source)),
            None => {}
        }
    }
    Ok(out)
}
