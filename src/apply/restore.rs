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
use crate::publish::envelope;
use crate::source::catalog;

/// What a restore did.
#[derive(Debug, Default)]
pub struct Restored {
    /// Sealed copies of the region's rows found in the vault.
    pub copies: u64,
    /// Per table: copies opened.
    pub tables: BTreeMap<String, u64>,
    /// Per DR key id: copies opened with it.
    pub keys: BTreeMap<String, u64>,
    /// Rows written (the copy was newer than what the region holds).
    pub written: u64,
    /// Copies older than or as new as what the region holds.
    pub current: u64,
    /// Copies sealed under a key id the region's key ring lacks, by id.
    pub unknown_keys: BTreeMap<String, u64>,
    /// Copies that could not be opened, did not match their vault row or
    /// could not be applied, with why.
    pub failed: Vec<String>,
}

impl Restored {
    /// Copies not restored.
    pub fn not_restored(&self) -> u64 {
        self.failed.len() as u64 + self.unknown_keys.values().sum::<u64>()
    }
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
    let ring = config.dr_key_ring(region).map_err(|e| setup(&e))?;
    // each key hashes table names its own way
    let tables: BTreeMap<(String, String), String> = ring
        .keys()
        .flat_map(|key| {
            config
                .tables
                .iter()
                .filter(|t| t.dr.contains(from))
                .map(move |t| {
                    let name = t.name.to_string();
                    ((key.id().to_string(), key.table_hash(&name)), name)
                })
        })
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
        let opened = open_page(&rows, &ring, &tables, region, from, &topic, &mut report);
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

/// Opens one page of vault rows (`key_hash, stamp, key_id, table_hash,
/// nonce, ciphertext`) as records the apply side takes, counting each in
/// `report`: a copy under a key id the ring lacks, of a table this config
/// keeps no DR copies of, or that does not open is counted, not applied.
fn open_page(
    rows: &[tokio_postgres::Row],
    ring: &dr::KeyRing,
    tables: &BTreeMap<(String, String), String>,
    region: &str,
    from: &str,
    topic: &str,
    report: &mut Restored,
) -> Vec<Consumed> {
    let mut opened: Vec<Consumed> = Vec::with_capacity(rows.len());
    for row in rows {
        report.copies += 1;
        let key_hash: Vec<u8> = row.get(0);
        let stamp: i64 = row.get(1);
        let sealed = Sealed {
            key_id: row.get(2),
            table_hash: row.get(3),
            stamp: crate::hlc::Hlc::new(stamp as u64),
            nonce: row.get(4),
            ciphertext: row.get(5),
        };
        let name = dr::hex_bytes::encode(&key_hash);
        let Some(key) = ring.get(&sealed.key_id) else {
            *report
                .unknown_keys
                .entry(sealed.key_id.clone())
                .or_default() += 1;
            continue;
        };
        let Some(table) = tables.get(&(sealed.key_id.clone(), sealed.table_hash.clone())) else {
            report.failed.push(format!(
                "copy {name} (DR key {}): its table is none this config keeps DR copies of \
                 in {from}",
                sealed.key_id
            ));
            continue;
        };
        let (k, v) = match open_copy(key, region, table, &key_hash, &sealed) {
            Ok(kv) => kv,
            Err(e) => {
                report.failed.push(format!("copy {name} of {table}: {e}"));
                continue;
            }
        };
        *report.keys.entry(sealed.key_id.clone()).or_default() += 1;
        *report.tables.entry(table.clone()).or_default() += 1;
        opened.push(Consumed {
            topic: topic.to_string(),
            partition: 0,
            offset: report.copies as i64 - 1,
            key: Some(k),
            value: Some(v),
        });
    }
    opened
}

/// Opens one vault copy and checks that what it holds is the vault row's:
/// the row whose hash the vault keys it by, stamped as the vault says.
/// Returns the live record key and value.
fn open_copy(
    key: &dr::DrKey,
    home: &str,
    table: &str,
    key_hash: &[u8],
    sealed: &Sealed,
) -> Result<(Vec<u8>, Vec<u8>), String> {
    let (plain, _format) = key
        .open(home, table, key_hash, sealed)
        .map_err(|e| e.to_string())?;
    let (k, v) = dr::split_plaintext(&plain).map_err(|e| e.to_string())?;
    if key.row_hash(table, k)[..] != *key_hash {
        return Err(format!(
            "opens with DR key {}, but holds another row than the vault row (moved in the \
             vault): not restored",
            key.id()
        ));
    }
    let stamp = envelope::Envelope::decode(v)
        .map_err(|e| match e {
            envelope::DecodeError::NewerFormat(n) => format!(
                "opens, but holds a change of record format {} (this pgrelay reads up to {}): \
                 restore with a release that reads it",
                n.found,
                envelope::FORMAT
            ),
            envelope::DecodeError::Malformed(e) => {
                format!("opens, but holds no change record: {e}")
            }
        })?
        .pgrelay
        .hlc;
    if stamp != sealed.stamp {
        return Err(format!(
            "opens with DR key {}, but its change is stamped {} and the vault row {} \
             (re-stamped in the vault): not restored",
            key.id(),
            stamp.readable(),
            sealed.stamp.readable()
        ));
    }
    Ok((k.to_vec(), v.to_vec()))
}
