//! From routed changes to acknowledged Kafka records: envelope encoding,
//! the producer, and the acknowledgement tracking that decides which LSN may
//! be confirmed.

pub mod acks;
pub mod envelope;
pub mod producer;
pub mod sink;
