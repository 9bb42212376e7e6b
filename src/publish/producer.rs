//! The Kafka producer of the capture side.
//!
//! One idempotent producer (`acks=all`) per Kafka cluster. Delivery reports
//! come back on librdkafka's polling thread and are forwarded, with the
//! record's sequence number, to the capture loop, which feeds them to the
//! [`AckTracker`](super::acks::AckTracker). The channel is unbounded but
//! its length is bounded by the number of records in flight, which the
//! capture loop caps (`max_in_flight`): backpressure reaches the replication
//! stream, never memory.
//!
//! A delivery failure (after librdkafka's own retries) or a fatal producer
//! error ends the capture run with a transient error: the supervisor builds
//! a new producer and restarts from the last confirmed LSN, re-sending what
//! was not acknowledged (at-least-once; duplicates are harmless downstream).

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use tokio::sync::mpsc;

/// What the producer reports back to the capture loop.
#[derive(Debug)]
pub enum Delivery {
    Acked(u64),
    Failed { seq: u64, error: String },
    Fatal(String),
}

pub struct ReportingContext {
    tx: mpsc::UnboundedSender<Delivery>,
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
            let _ = self.tx.send(Delivery::Fatal(format!("{error}: {reason}")));
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
                error: e.to_string(),
            },
        };
        let _ = self.tx.send(report);
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
    producer: ThreadedProducer<ReportingContext>,
}

impl Publisher {
    pub fn new(
        config: &ClientConfig,
        tx: mpsc::UnboundedSender<Delivery>,
    ) -> Result<Self, KafkaError> {
        let producer = config.create_with_context(ReportingContext { tx })?;
        Ok(Publisher { producer })
    }

    /// Hands one record to librdkafka. On a full local queue, returns
    /// `Err(true)` so the caller can wait for acks and retry; other errors
    /// are returned as text.
    pub fn send(
        &self,
        topic: &str,
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
            .key(key)
            .payload(value)
            .headers(owned);
        match self.producer.send(record) {
            Ok(()) => Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                Err(SendError::QueueFull)
            }
            Err((e, _)) => Err(SendError::Other(e.to_string())),
        }
    }

    /// Waits up to `timeout` for every queued record to be delivered.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.flush(timeout)
    }
}

#[derive(Debug)]
pub enum SendError {
    QueueFull,
    Other(String),
}
