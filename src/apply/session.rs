//! Database sessions under a replication origin, and the offsets they
//! stored.

use std::collections::BTreeMap;

use tokio_postgres::Client;

use crate::config::Config;
use crate::source::catalog::{self};

use crate::names::origin_name;

use super::error::{db_message, is_transient_db, sqlstate, ApplyError};

/// Opens apply session `group` for one source: replica role, origin.
pub async fn session(
    config: &Config,
    region: &str,
    source: &str,
    group: usize,
) -> Result<Client, ApplyError> {
    session_with_origin(config, region, &origin_name(source, group)).await
}

/// Opens an apply session writing under `origin`.
pub async fn session_with_origin(
    config: &Config,
    region: &str,
    origin: &str,
) -> Result<Client, ApplyError> {
    let dsn = &config
        .region(region)
        .map_err(|e| ApplyError::Setup(e.to_string()))?
        .dsn;
    let client = catalog::connect(dsn, region)
        .await
        .map_err(|e| ApplyError::Transient(e.to_string()))?;
    client
        .batch_execute(&format!(
            "SET session_replication_role = replica; SET client_min_messages = warning; {}",
            crate::event::canonical_text_sets("; ")
        ))
        .await
        .map_err(|e| {
            if sqlstate(&e) == "42501" {
                ApplyError::Setup(format!(
                    "region {region}: the apply role must be allowed to SET session_replication_role \
                     (GRANT SET ON PARAMETER session_replication_role TO the role; pgrelay setup grants it \
                     with a setup_dsn): {}",
                    db_message(&e)
                ))
            } else {
                ApplyError::Transient(format!("region {region}: {}", db_message(&e)))
            }
        })?;
    client
        .execute("SELECT pg_replication_origin_session_setup($1)", &[&origin])
        .await
        .map_err(|e| {
            let msg = db_message(&e);
            if sqlstate(&e) == "55006" {
                ApplyError::OriginBusy(format!(
                    "region {region}: replication origin {origin}: {msg}"
                ))
            } else if is_transient_db(&e) {
                ApplyError::Transient(format!(
                    "region {region}: replication origin {origin}: {msg}"
                ))
            } else {
                ApplyError::Setup(format!(
                    "region {region}: replication origin {origin}: {msg}; run pgrelay setup"
                ))
            }
        })?;
    Ok(client)
}

/// Stored next offsets of a topic: partition -> offset.
pub async fn stored_offsets(
    client: &Client,
    topic: &str,
) -> Result<BTreeMap<i32, i64>, ApplyError> {
    let rows = client
        .query(
            "SELECT kafka_partition, next_offset FROM pgrelay.offsets WHERE topic = $1",
            &[&topic],
        )
        .await
        .map_err(|e| {
            ApplyError::Transient(format!("reading stored offsets: {}", db_message(&e)))
        })?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, i32>(0), r.get::<_, i64>(1)))
        .collect())
}
