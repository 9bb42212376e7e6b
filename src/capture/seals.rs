//! How many records a DR key has sealed, kept in `pgrelay_dr.seals` of the
//! sealing region's database.
//!
//! AES-GCM with random 12-byte nonces stays within its safety margin up to
//! about 2^32 records per key; past [`SEALS_WARN`] the capture side warns,
//! in its log and in `pgrelay_dr_key_seals`, that the key is due for
//! rotation. Seals are counted ahead: the capture side reserves a block of
//! [`BLOCK`] seals in the table before it uses them, so a crash can only
//! over-count (by less than a block per start), never forget seals made.
//! A key is known by its fingerprint (see [`DrKey::fingerprint`]), so a key
//! id reused for another key starts its own count.

use tokio_postgres::Client;

use crate::dr::{DrKey, SEALS_WARN};
use crate::metrics::catalog as metric;
use crate::metrics::Metrics;
use crate::source::catalog;

use super::error::{CaptureError, Cause};

/// Seals reserved per write to the table.
pub const BLOCK: u64 = 1 << 16;

/// Adds `$3` seals to the count of the key with fingerprint `$2` (id
/// `$1`); returns the new count.
pub const RESERVE_SQL: &str = "INSERT INTO pgrelay_dr.seals AS s (fingerprint, key_id, seals) \
    VALUES ($2, $1, $3) ON CONFLICT (fingerprint) DO UPDATE \
    SET seals = s.seals + EXCLUDED.seals, key_id = EXCLUDED.key_id, updated_at = now() \
    RETURNING seals";

/// The seal count of one DR key, reserved in blocks.
pub struct SealLedger {
    dsn: String,
    region: String,
    key_id: String,
    fingerprint: String,
    client: Option<Client>,
    /// Seals reserved and not used yet.
    left: u64,
    /// Whether the table was found missing (setup not run since an
    /// upgrade): counted in memory only, said once.
    table_missing: bool,
    /// The count held in memory while the table is missing.
    in_memory: u64,
    /// The count at the last rotation warning.
    warned_at: Option<u64>,
}

impl SealLedger {
    pub fn new(dsn: &str, region: &str, key: &DrKey) -> Self {
        SealLedger {
            dsn: dsn.to_string(),
            region: region.to_string(),
            key_id: key.id().to_string(),
            fingerprint: key.fingerprint(),
            client: None,
            left: 0,
            table_missing: false,
            in_memory: 0,
            warned_at: None,
        }
    }

    /// Counts one seal about to be made, reserving a block first when the
    /// last one is used up.
    pub async fn count(&mut self, metrics: &Metrics) -> Result<(), CaptureError> {
        if self.left == 0 {
            let total = self.reserve().await?;
            self.left = BLOCK;
            self.report(total, metrics);
        }
        self.left -= 1;
        Ok(())
    }

    async fn reserve(&mut self) -> Result<u64, CaptureError> {
        if self.table_missing {
            self.in_memory += BLOCK;
            return Ok(self.in_memory);
        }
        let fail = |e: tokio_postgres::Error| {
            CaptureError::transient("counting DR seals in pgrelay_dr.seals", Cause::from(e))
        };
        if self.client.as_ref().is_none_or(Client::is_closed) {
            let c = catalog::connect(&self.dsn, &self.region)
                .await
                .map_err(|e| CaptureError::transient("counting DR seals", Cause::from(e)))?;
            self.client = Some(c);
        }
        let client = self.client.as_ref().expect("connected above");
        match client
            .query_one(
                RESERVE_SQL,
                &[&self.key_id, &self.fingerprint, &(BLOCK as i64)],
            )
            .await
        {
            Ok(row) => Ok(row.get::<_, i64>(0) as u64),
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
                tracing::warn!(
                    region = %self.region,
                    key_id = %self.key_id,
                    "pgrelay_dr.seals is missing: this key's seals are counted in memory only \
                     until `pgrelay setup --region {}` creates it",
                    self.region
                );
                self.table_missing = true;
                self.in_memory = BLOCK;
                Ok(self.in_memory)
            }
            Err(e) => Err(fail(e)),
        }
    }

    fn report(&mut self, total: u64, metrics: &Metrics) {
        metrics.set(
            &metric::DR_KEY_SEALS,
            &[("region", &self.region), ("key_id", &self.key_id)],
            total as f64,
        );
        // once per start, then every 2^24 seals: not once per block
        let due = self.warned_at.is_none_or(|at| total >= at + (1 << 24));
        if total >= SEALS_WARN && due {
            self.warned_at = Some(total);
            tracing::warn!(
                region = %self.region,
                key_id = %self.key_id,
                seals = total,
                "DR key {} has sealed about {total} records: AES-GCM with random nonces is safe \
                 to about 2^32 per key; rotate it (dr_key, dr_key_id, the old key into \
                 dr_old_keys)",
                self.key_id
            );
        }
    }
}
