//! pgrelay: multi-region Postgres replication through Kafka with
//! data-residency rules.
//!
//! ```text
//!  capture:  source/ (replication connection, pgoutput stream, assembly)
//!              -> residency (route per destination) -> publish/ (envelope, producer, LSN acks)
//!  apply:    apply/ (consume, batch, conditional upsert) -> dlq
//! ```
//!
//! Pure logic (`pgoutput`, `config`, `residency`, `hlc`, `publish::envelope`,
//! `publish::acks`, `source::assemble`, `setup::plan`) is separate from IO so
//! each can be tested alone.

pub mod apply;
pub mod backoff;
pub mod breaker;
pub mod capture;
pub mod check;
pub mod commands;
pub mod config;
pub mod conflicts;
#[cfg(test)]
mod doc_links;
pub mod dr;
pub mod event;
pub mod failover;
pub mod fence;
pub mod hlc;
pub mod http;
pub mod kafka;
pub mod merge;
pub mod metrics;
pub mod names;
pub mod overview;
pub mod pgoutput;
pub mod privileges;
pub mod progress;
pub mod publish;
pub mod repair;
pub mod residency;
pub mod resync;
pub mod schema;
pub mod setup;
pub mod sidecar;
pub mod source;
pub mod status;
pub mod verify;
