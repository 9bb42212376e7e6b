//! The Kafka producer of the capture side.
//!
//! One idempotent producer (`acks=all`) per Kafka cluster. The capture loop
//! polls it itself ([`Publisher::poll`]): delivery reports, with each
//! record's sequence number, are collected on the capture task's own thread
//! and fed to the [`AckTracker`](super::acks::AckTracker) — no polling
//! thread, no channel, no wake-up per report, and librdkafka's message
//! buffers are freed on the thread that allocated them. The reports pending
//! are bounded by the records in flight, which the capture loop caps
//! (`max_in_flight`): backpressure reaches the replication stream, never
//! memory.
//!
//! A delivery failure (after librdkafka's own retries) or a fatal producer
//! error ends the capture run with a transient error: the supervisor builds
//! a new producer and restarts from the last confirmed LSN, re-sending what
//! was not acknowledged (at-least-once; duplicates are harmless downstream).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};

use super::envelope::Record;
use crate::config::Config;

/// What the producer reports back to the capture loop.
#[derive(Debug)]
pub enum Delivery {
    Acked(u64),
    Failed {
        seq: u64,
        error: KafkaError,
    },
    /// The producer cannot go on (librdkafka's `reason` with it).
    Fatal {
        error: KafkaError,
        reason: String,
    },
}

/// Collects what librdkafka reports until the capture loop takes it.
#[derive(Default)]
pub struct ReportingContext {
    reports: Mutex<Vec<Delivery>>,
}

impl ReportingContext {
    fn report(&self, d: Delivery) {
        self.reports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(d);
    }
}

impl ClientContext for ReportingContext {
    fn error(&self, error: KafkaError, reason: &str) {
        let fatal = matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::Fatal)
                | Some(RDKafkaErrorCode::UnknownProducerId)
                | Some(RDKafkaErrorCode::OutOfOrderSequenceNumber)
                | Some(RDKafkaErrorCode::InvalidProducerEpoch)
        );
        if fatal {
            self.report(Delivery::Fatal {
                error,
                reason: reason.to_string(),
            });
        } else {
            tracing::warn!(error = %error, reason, "kafka client error");
        }
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(facility = fac, "librdkafka: {log_message}")
            }
            RDKafkaLogLevel::Warning => tracing::warn!(facility = fac, "librdkafka: {log_message}"),
            _ => tracing::debug!(facility = fac, "librdkafka: {log_message}"),
        }
    }
}

impl ProducerContext for ReportingContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: usize) {
        let report = match result {
            Ok(_) => Delivery::Acked(seq as u64),
            Err((e, _)) => Delivery::Failed {
                seq: seq as u64,
                error: e.clone(),
            },
        };
        self.report(report);
    }
}

/// The producer settings pgrelay insists on, then the user's pass-through
/// properties (which may override tuning but not the safety settings).
///
/// The local queue is bounded in bytes (64 MiB) as well as in records, so
/// wide rows cannot make memory grow with the in-flight count: a full queue
/// makes the capture loop wait for acknowledgements.
pub fn producer_config(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    max_in_flight: usize,
) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers)
        .set("compression.type", "lz4")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("message.timeout.ms", "30000")
        .set(
            "queue.buffering.max.messages",
            (max_in_flight + 1000).to_string(),
        )
        .set("queue.buffering.max.kbytes", "65536");
    for (k, v) in properties {
        cfg.set(k, v);
    }
    // never overridable: these are what make "confirmed LSN" mean "in Kafka"
    cfg.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("max.in.flight.requests.per.connection", "5");
    cfg.set_log_level(RDKafkaLogLevel::Warning);
    cfg
}

pub struct Publisher {
    producer: BaseProducer<ReportingContext>,
}

impl Publisher {
    pub fn new(config: &ClientConfig) -> Result<Self, KafkaError> {
        let producer = config.create_with_context(ReportingContext::default())?;
        Ok(Publisher { producer })
    }

    /// Serves librdkafka's events without waiting and appends the delivery
    /// reports (and fatal errors) they carried to `out`.
    pub fn poll(&self, out: &mut Vec<Delivery>) {
        // one event per call; a delivery event reports a whole batch
        for _ in 0..64 {
            self.producer.poll(Duration::ZERO);
            let mut reports = self
                .producer
                .context()
                .reports
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if reports.is_empty() {
                break;
            }
            out.append(&mut reports);
        }
    }

    /// How many partitions `topic` has (blocking: a metadata request).
    pub fn partition_count(&self, topic: &str, timeout: Duration) -> Result<i32, OpenError> {
        let md = crate::kafka::fetch_metadata(self.producer.client(), Some(topic), timeout)
            .map_err(|source| OpenError::Metadata {
                topic: topic.to_string(),
                source,
            })?;
        let topic = topic.to_string();
        let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
            return Err(OpenError::NoTopic { topic });
        };
        if let Some(e) = t.error() {
            return Err(OpenError::Topic {
                topic,
                code: e.into(),
            });
        }
        match t.partitions().len() {
            0 => Err(OpenError::NoPartitions { topic }),
            n => Ok(n as i32),
        }
    }

    /// Hands one record to librdkafka, for `partition`. On a full local
    /// queue, returns [`SendError::QueueFull`] so the caller can wait for
    /// acks and retry; other errors are returned as text.
    pub fn send(
        &self,
        topic: &str,
        partition: i32,
        key: &[u8],
        value: &[u8],
        headers: [(&str, &str); 4],
        seq: u64,
    ) -> Result<(), SendError> {
        let mut owned = OwnedHeaders::new_with_capacity(4);
        for (k, v) in headers {
            owned = owned.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let record = BaseRecord::with_opaque_to(topic, seq as usize)
            .partition(partition)
            .key(key)
            .payload(value)
            .headers(owned);
        match self.producer.send(record) {
            Ok(()) => Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                Err(SendError::QueueFull)
            }
            Err((source, _)) => Err(SendError::Kafka {
                record: "record",
                topic: topic.to_string(),
                partition,
                source,
            }),
        }
    }

    /// Waits up to `timeout` for every queued record to be delivered
    /// (blocking); the reports land in the next [`Publisher::poll`].
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.flush(timeout)
    }

    /// Records handed over and not yet delivered or failed (with their
    /// reports not yet served).
    pub fn in_flight(&self) -> u64 {
        self.producer.in_flight_count().max(0) as u64
    }
}

/// Which deliveries the producers report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reports {
    /// Every record's: the capture side confirms positions from them.
    Each,
    /// Failures only: a bulk sender (resync) counts what is still in
    /// flight ([`Outlets::in_flight`]) instead, and librdkafka frees a
    /// delivered record where it learns of it.
    Failures,
}

/// Where one source region's records go: a producer per distinct Kafka
/// cluster, and for each destination its topic, partition count and
/// producer. Records are partitioned by the hash of their key (see
/// `event::row_hash`), which the apply side's lock buckets share.
pub struct Outlets {
    pub topics: Vec<String>,
    pub partitions: Vec<u32>,
    publishers: Vec<(String, Publisher)>,
    dest_publisher: Vec<usize>,
}

impl Outlets {
    /// Creates the producers and reads each topic's partition count
    /// (blocking: metadata requests).
    pub fn open(
        config: &Config,
        destinations: &[String],
        topics: &[String],
    ) -> Result<Outlets, OpenError> {
        Outlets::open_reporting(config, destinations, topics, Reports::Each)
    }

    /// [`Outlets::open`] with the producers reporting `reports`.
    pub fn open_reporting(
        config: &Config,
        destinations: &[String],
        topics: &[String],
        reports: Reports,
    ) -> Result<Outlets, OpenError> {
        let max_in_flight = config.capture.max_in_flight.max(1);
        let mut publishers: Vec<(String, Publisher)> = Vec::new();
        let mut dest_publisher = Vec::with_capacity(destinations.len());
        for dest in destinations {
            let cluster = config.kafka_for(dest);
            let idx = match publishers.iter().position(|(b, _)| *b == cluster.brokers) {
                Some(i) => i,
                None => {
                    let mut cfg =
                        producer_config(&cluster.brokers, &cluster.properties, max_in_flight);
                    if reports == Reports::Failures {
                        cfg.set("delivery.report.only.error", "true");
                    }
                    let p = Publisher::new(&cfg).map_err(|source| OpenError::Producer {
                        destination: dest.clone(),
                        source,
                    })?;
                    publishers.push((cluster.brokers.clone(), p));
                    publishers.len() - 1
                }
            };
            dest_publisher.push(idx);
        }
        let mut partitions = Vec::with_capacity(topics.len());
        for (topic, &p) in topics.iter().zip(&dest_publisher) {
            let n = publishers[p]
                .1
                .partition_count(topic, crate::kafka::METADATA_PATIENCE)?;
            partitions.push(n as u32);
        }
        Ok(Outlets {
            topics: topics.to_vec(),
            partitions,
            publishers,
            dest_publisher,
        })
    }

    /// Hands `record` to the producer of destination `dest`, for the
    /// partition of its key.
    pub fn send(
        &self,
        dest: usize,
        record: &Record,
        headers: [(&str, &str); 4],
        seq: u64,
    ) -> Result<(), SendError> {
        let partition = (record.key_hash % self.partitions[dest]) as i32;
        self.publishers[self.dest_publisher[dest]].1.send(
            &self.topics[dest],
            partition,
            &record.key,
            &record.value,
            headers,
            seq,
        )
    }

    /// Hands a record to the producer of destination `dest`, for an
    /// explicit `partition` (progress records go to every partition).
    pub fn send_to(
        &self,
        dest: usize,
        partition: i32,
        key: &[u8],
        value: &[u8],
        headers: [(&str, &str); 4],
        seq: u64,
    ) -> Result<(), SendError> {
        self.publishers[self.dest_publisher[dest]].1.send(
            &self.topics[dest],
            partition,
            key,
            value,
            headers,
            seq,
        )
    }

    /// [`Publisher::poll`] of every producer.
    pub fn poll(&self, out: &mut Vec<Delivery>) {
        for (_, p) in &self.publishers {
            p.poll(out);
        }
    }

    /// [`Publisher::in_flight`] of every producer.
    pub fn in_flight(&self) -> u64 {
        self.publishers.iter().map(|(_, p)| p.in_flight()).sum()
    }

    /// [`Publisher::flush`] of every producer (blocking).
    pub fn flush(&self, timeout: Duration) {
        for (_, p) in &self.publishers {
            let _ = p.flush(timeout);
        }
    }
}

/// Why a record was not queued.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// librdkafka's local queue is full: collect deliveries, then again.
    #[error("the producer's queue is full")]
    QueueFull,
    /// Kafka refused the `record` (its kind: a record, a DR record, a
    /// progress record) for `topic` at `partition`.
    #[error("cannot queue a {record} for {topic}: {source}")]
    Kafka {
        record: &'static str,
        topic: String,
        partition: i32,
        #[source]
        source: KafkaError,
    },
}

/// Why the producers of [`Outlets`] could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("kafka producer for {destination}: {source}")]
    Producer {
        destination: String,
        #[source]
        source: KafkaError,
    },
    #[error("kafka metadata for {topic}: {source}")]
    Metadata {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("topic {topic} not in the broker's metadata")]
    NoTopic { topic: String },
    #[error("topic {topic}: {code:?}")]
    Topic {
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error("topic {topic} has no partitions")]
    NoPartitions { topic: String },
}
