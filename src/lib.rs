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
//! `publish::acks`) is separate from IO so each can be tested alone.

pub mod config;
pub mod event;
pub mod hlc;
pub mod pgoutput;
pub mod residency;
