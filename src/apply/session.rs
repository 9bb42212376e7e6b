//! Database sessions under a replication origin, and the offsets they
//! stored.

use std::collections::BTreeMap;

use tokio_postgres::Client;

use crate::config::Config;
use crate::source::catalog::{self};

use crate::names::origin_name;

use super::error::{db_message, is_transient_db, sqlstate, ApplyError, ApplyErrorKind};

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
    let dsn = &config.region(region)?.dsn;
    let client = catalog::connect(dsn, region)
        .await
        .map_err(|e| ApplyError::transient("", e))?;
    client
        .batch_execute(&format!(
            "SET session_replication_role = replica; SET client_min_messages = warning; {}",
            crate::event::canonical_text_sets("; ")
        ))
        .await
        .map_err(|e| {
            if sqlstate(&e) == "42501" {
                let message = format!(
                    "region {region}: the apply role must be allowed to SET session_replication_role \
                     (GRANT SET ON PARAMETER session_replication_role TO the role; pgrelay setup grants it \
                     with a setup_dsn): {}",
                    db_message(&e)
                );
                ApplyError::setup_from(message, e)
            } else {
                ApplyError::transient(format!("region {region}"), e)
            }
        })?;
    client
        .execute("SELECT pg_replication_origin_session_setup($1)", &[&origin])
        .await
        .map_err(|e| {
            if sqlstate(&e) == "55006" {
                ApplyErrorKind::OriginBusy {
                    region: region.to_string(),
                    origin: origin.to_string(),
                    source: e,
                }
                .into()
            } else if is_transient_db(&e) {
                ApplyError::transient(format!("region {region}: replication origin {origin}"), e)
            } else {
                let message = format!(
                    "region {region}: replication origin {origin}: {}; run pgrelay setup",
                    db_message(&e)
                );
                ApplyError::setup_from(message, e)
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
        .map_err(|e| ApplyError::transient("reading stored offsets", e))?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, i32>(0), r.get::<_, i64>(1)))
        .collect())
}
