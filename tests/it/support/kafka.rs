//! Reading every record of a topic, for assertions.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

#[derive(Debug, Clone)]
pub struct Rec {
    pub partition: i32,
    pub offset: i64,
    pub key: serde_json::Value,
    pub value: serde_json::Value,
    pub headers: BTreeMap<String, String>,
    /// Key, value, header names and values, in bytes as stored.
    pub bytes: u64,
}

/// Reads `topic` from the beginning until no record arrives for `idle`
/// (waiting up to 15 s for the first one: fetches are slow under load).
pub fn read_all(brokers: &str, topic: &str, idle: Duration) -> Vec<Rec> {
    read_all_with(brokers, &[], topic, idle)
}

/// [`read_all`] with extra client properties (TLS settings, say).
pub fn read_all_with(
    brokers: &str,
    properties: &[(&str, &str)],
    topic: &str,
    idle: Duration,
) -> Vec<Rec> {
    read_records(brokers, properties, topic, idle)
        .into_iter()
        .filter(|r| !is_progress(r))
        .collect()
}

/// Whether `r` is a progress record (see `publish::envelope::progress`):
/// no row change, so [`read_all`] leaves them out.
pub fn is_progress(r: &Rec) -> bool {
    r.headers.get("pgrelay.op").map(String::as_str) == Some("p")
}

/// Every record of `topic`, progress records included.
pub fn read_records(
    brokers: &str,
    properties: &[(&str, &str)],
    topic: &str,
    idle: Duration,
) -> Vec<Rec> {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers)
        .set("group.id", "pgrelay-test-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false");
    for (k, v) in properties {
        cfg.set(*k, *v);
    }
    let consumer: BaseConsumer = cfg.create().expect("consumer");
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let mut tpl = TopicPartitionList::new();
    for t in md.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                .unwrap();
        }
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let mut last = Instant::now();
    let first_wait = idle.max(Duration::from_secs(15));
    loop {
        let limit = if out.is_empty() { first_wait } else { idle };
        if last.elapsed() >= limit {
            break;
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                last = Instant::now();
                let key = m
                    .key()
                    .map(|k| serde_json::from_slice(k).expect("json key"))
                    .unwrap_or(serde_json::Value::Null);
                let value = m
                    .payload()
                    .map(|v| serde_json::from_slice(v).expect("json value"))
                    .unwrap_or(serde_json::Value::Null);
                let headers = headers_of(&m);
                let bytes = wire_size(&m);
                out.push(Rec {
                    partition: m.partition(),
                    offset: m.offset(),
                    key,
                    value,
                    headers,
                    bytes,
                });
            }
            Some(Err(e)) => panic!("kafka read error on {topic}: {e}"),
            None => {}
        }
    }
    out
}

/// Topic names on the broker.
pub fn topics(brokers: &str) -> Vec<String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("consumer");
    let md = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .expect("metadata");
    md.topics().iter().map(|t| t.name().to_string()).collect()
}

/// A raw record: key and value bytes.
pub type RawRecord = (Option<Vec<u8>>, Option<Vec<u8>>);

/// Produces raw records (key, value) to `topic`, waiting for each ack.
pub fn produce(brokers: &str, topic: &str, records: &[RawRecord]) {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .create()
        .expect("producer");
    for (k, v) in records {
        let mut rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic);
        if let Some(k) = k {
            rec = rec.key(k.as_slice());
        }
        if let Some(v) = v {
            rec = rec.payload(v.as_slice());
        }
        let mut rec = rec;
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((_, r)) => {
                    rec = r;
                    producer.poll(Duration::from_millis(50));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
}

/// Reads every record of `topic` that was there before this call: first
/// writes a marker into each partition, then reads until every marker is
/// back — a positive sign that nothing before them was left unread, however
/// quiet the topic is. Only for topics nobody consumes (dead letters): the
/// markers stay. Returns the records other than the markers.
pub fn read_to_markers(brokers: &str, topic: &str) -> Vec<Rec> {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "pgrelay-test-reader")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    assert!(!partitions.is_empty(), "topic {topic} has no partitions");
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .create()
        .expect("producer");
    let marker = format!(
        "{{\"read_marker\":{}}}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    for p in &partitions {
        let rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic)
            .partition(*p)
            .payload(marker.as_bytes());
        producer.send(rec).map_err(|(e, _)| e).expect("send marker");
    }
    producer
        .flush(Duration::from_secs(30))
        .expect("flush markers");
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < partitions.len() {
        assert!(
            Instant::now() < deadline,
            "markers of {topic} not read back within 60 s"
        );
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                if m.payload() == Some(marker.as_bytes()) {
                    seen.insert(m.partition());
                    continue;
                }
                let value = m
                    .payload()
                    .and_then(|v| serde_json::from_slice(v).ok())
                    .unwrap_or(serde_json::Value::Null);
                let headers = headers_of(&m);
                let bytes = wire_size(&m);
                out.push(Rec {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: serde_json::Value::Null,
                    value,
                    headers,
                    bytes,
                });
            }
            Some(Err(e)) => panic!("kafka read error on {topic}: {e}"),
            None => {}
        }
    }
    out.retain(|r| r.value.get("read_marker").is_none());
    out
}

/// A record's headers as text.
fn wire_size(m: &rdkafka::message::BorrowedMessage<'_>) -> u64 {
    let headers: usize = m
        .headers()
        .map(|h| {
            h.iter()
                .map(|hd| hd.key.len() + hd.value.map_or(0, <[u8]>::len))
                .sum()
        })
        .unwrap_or(0);
    (m.key().map_or(0, <[u8]>::len) + m.payload().map_or(0, <[u8]>::len) + headers) as u64
}

fn headers_of(m: &rdkafka::message::BorrowedMessage<'_>) -> BTreeMap<String, String> {
    let mut headers = BTreeMap::new();
    if let Some(h) = m.headers() {
        for hd in h.iter() {
            headers.insert(
                hd.key.to_string(),
                String::from_utf8_lossy(hd.value.unwrap_or_default()).into_owned(),
            );
        }
    }
    headers
}

/// Every record of `topic` as raw bytes: key, value and each header's name
/// and value in one buffer (for scanning what a topic holds), read from the
/// beginning until no record arrives for `idle`.
pub fn read_raw(brokers: &str, topic: &str, idle: Duration) -> Vec<Vec<u8>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "pgrelay-test-raw-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .expect("consumer");
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let mut tpl = TopicPartitionList::new();
    for t in md.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                .unwrap();
        }
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let mut last = Instant::now();
    while last.elapsed() < idle {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                last = Instant::now();
                let mut bytes = m.key().unwrap_or_default().to_vec();
                bytes.push(b'\n');
                bytes.extend_from_slice(m.payload().unwrap_or_default());
                if let Some(h) = m.headers() {
                    for hd in h.iter() {
                        bytes.push(b'\n');
                        bytes.extend_from_slice(hd.key.as_bytes());
                        bytes.push(b'=');
                        bytes.extend_from_slice(hd.value.unwrap_or_default());
                    }
                }
                out.push(bytes);
            }
            Some(Err(e)) => panic!("kafka read error on {topic}: {e}"),
            None => {}
        }
    }
    out
}
