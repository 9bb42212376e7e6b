//! `pgrelay dr restore`: a rebuilt region takes its rows back from the
//! sealed copies another region's vault keeps. Each copy is opened with the
//! region's own DR key and applied as the apply side applies a live record
//! (newest stamp wins, deletes as tombstones), in batches of one
//! transaction each, under the replay origin so that capture does not send
//! the restored rows out again. A second run finds every row current and
//! writes nothing: restore is idempotent, and resumable by running it again.

use std::collections::BTreeMap;

use crate::apply::dlq::DlqProducer;
use crate::apply::{
    apply_batch, load_targets, session_with_origin, ApplyError, BatchOptions, Consumed,
    ParkedPositions,
};
use crate::config::Config;
use crate::dr::{self, Sealed};
use crate::names::REPLAY_ORIGIN;
use crate::source::catalog;

/// What a restore did.
#[derive(Debug, Default)]
pub struct Restored {
    /// Sealed copies of the region's rows found in the vault.
    pub copies: u64,
    /// Per table: copies opened.
    pub tables: BTreeMap<String, u64>,
    /// Rows written (the copy was newer than what the region holds).
    pub written: u64,
    /// Copies older than or as new as what the region holds.
    pub current: u64,
    /// Copies that could not be opened or applied, with why.
    pub failed: Vec<String>,
}

/// Restores `region` from the vault of `from`; `progress` counts the copies
/// read against the vault's count of them.
pub async fn restore(
    config: &Config,
    region: &str,
    from: &str,
    progress: &mut crate::progress::Progress,
) -> Result<Restored, ApplyError> {
    let setup = |e: &dyn std::fmt::Display| ApplyError::setup(e.to_string());
    let key = config.dr_key(region).map_err(|e| setup(&e))?;
    let tables: BTreeMap<String, String> = config
        .tables
        .iter()
        .filter(|t| t.dr.contains(from))
        .map(|t| (key.table_hash(&t.name.to_string()), t.name.to_string()))
        .collect();
    let vault = catalog::connect(&config.region(from).map_err(|e| setup(&e))?.dsn, from)
        .await
        .map_err(ApplyError::unreachable)?;
    let mut client = session_with_origin(config, region, REPLAY_ORIGIN).await?;
    let targets = load_targets(config, region, &client).await?;
    let dlq = DlqProducer::new(config, region)?;
    let topic = config.dr_topic(region, from);
    let mut report = Restored::default();
    let vault_error = |e: tokio_postgres::Error| {
        ApplyError::setup(format!(
            "region {from}: reading the DR vault: {}",
            crate::apply::db_message(&e)
        ))
    };
    let total: i64 = vault
        .query_one(
            "SELECT count(*) FROM pgrelay_dr.vault WHERE home = $1",
            &[&region],
        )
        .await
        .map_err(vault_error)?
        .get(0);
    progress.set_total(total as u64);
    // one page of the vault at a time, in key order: memory stays bounded
    let mut after: Vec<u8> = Vec::new();
    loop {
        let rows = vault
            .query(
                "SELECT key_hash, stamp, key_id, table_hash, nonce, ciphertext \
                 FROM pgrelay_dr.vault WHERE home = $1 AND key_hash > $2 \
                 ORDER BY key_hash LIMIT 500",
                &[&region, &after],
            )
            .await
            .map_err(vault_error)?;
        let Some(last) = rows.last() else {
            break;
        };
        progress.inc(rows.len() as u64);
        after = last.get(0);
        let mut opened: Vec<Consumed> = Vec::with_capacity(rows.len());
        for row in &rows {
            report.copies += 1;
            let key_hash: Vec<u8> = row.get(0);
            let stamp: i64 = row.get(1);
            let sealed = Sealed {
                key_id: row.get(2),
                table_hash: row.get(3),
                stamp: stamp as u64,
                nonce: row.get(4),
                ciphertext: row.get(5),
            };
            let name = dr::hex_bytes::encode(&key_hash);
            let Some(table) = tables.get(&sealed.table_hash) else {
                report.failed.push(format!(
                    "copy {name}: its table is none this config keeps DR copies of in {from}, \
                     or it was sealed with another key"
                ));
                continue;
            };
            let opened_plain = key.open(table, &sealed).and_then(|plain| {
                dr::split_plaintext(&plain).map(|(k, v)| (k.to_vec(), v.to_vec()))
            });
            let (k, v) = match opened_plain {
                Ok(kv) => kv,
                Err(e) => {
                    report.failed.push(format!("copy {name} of {table}: {e}"));
                    continue;
                }
            };
            *report.tables.entry(table.clone()).or_default() += 1;
            opened.push(Consumed {
                topic: topic.clone(),
                partition: 0,
                offset: report.copies as i64 - 1,
                key: Some(k),
                value: Some(v),
            });
        }
        if opened.is_empty() {
            continue;
        }
        let outcome = apply_batch(
            &mut client,
            region,
            None,
            &targets,
            &opened,
            &dlq,
            BatchOptions {
                attempt: 0,
                extra_offsets: &[],
                commit: true,
                max_tries: 1,
                max_skew: config.max_clock_skew,
                max_ahead: config.max_stamp_ahead,
                // a row of this home may have been written in any region
                stamp_region: None,
                tombstone_horizon: config.apply.tombstone_horizon,
                targets_checked: true,
                // an older copy is no conflict: the region is newer already
                conflict_log: None,
                parked: ParkedPositions::Untracked,
            },
        )
        .await
        .map_err(|e| ApplyError::transient(format!("region {region}: restoring"), e))?;
        report.written += outcome.won;
        report.current += outcome.lost;
        report.failed.extend(
            outcome
                .dead
                .iter()
                .map(|d| format!("{} (parked in {})", d.message, config.dlq_topic(region))),
        );
    }
    progress.finish();
    Ok(report)
}
