//! Tombstones, and the horizons below which they are gone.
//!
//! A tombstone keeps a late, older change from bringing a deleted row back.
//! Tombstones cannot be kept forever, so they are purged once older than
//! `relay.apply.tombstone_horizon`, and never above the lowest stamp the
//! apply sessions have reached (`pgrelay.watermarks`: a source that is
//! behind may still send changes older than that). Only the sources in the
//! config count: the watermark rows a region removed from it left behind
//! would otherwise hold every purge back forever (they are ignored, with a
//! warning; should the region come back, its changes older than the
//! horizons are parked like any others). Before a table's
//! tombstones go, its horizon in `pgrelay.horizon` is raised to just above
//! the newest of them, and from then on the apply side treats an insert or
//! update stamped below it for a row that does not exist as undecidable:
//! the row may have been deleted by a tombstone that is gone. Such a change
//! is dead-lettered, never applied (DLQ replay, resync, a region cut off
//! longer than the horizon, a replay from the topic's start after
//! `pgrelay.offsets` was lost all end there). A change below the horizon
//! for a row that exists is compared with the row as usual: a row that
//! exists has outlived every tombstone older than it. A table none of whose
//! tombstones was ever purged has no horizon.
//!
//! Raising the horizons holds every key bucket's lock (as an apply batch
//! holds its own), so no batch is between its tombstone check and its
//! commit while they move; a batch reads the horizons after taking its
//! locks — only when one of its changes is older than half the horizon,
//! since a horizon never passes `tombstone_horizon` ago. The tombstones
//! below the horizons are then deleted in chunks, without the locks.

use std::time::Duration;

use tokio_postgres::Client;

use crate::apply::record::{Incoming, TargetTable};
use crate::apply::sql::{buckets_param, KEY_BUCKETS, LOCK_BUCKETS_SQL};
use crate::event::{quote_ident, Op};
use crate::hlc::Hlc;

/// Every table's horizon (a table without one has had nothing purged).
pub const HORIZONS_SQL: &str = "SELECT table_name, hlc FROM pgrelay.horizon";

/// Tombstones deleted per statement of a purge.
const PURGE_CHUNK: i64 = 10_000;

/// The stamp below which tombstones may go: `horizon` ago, and not above
/// the lowest stamp delivered from any source (`lowest_delivered`).
pub fn cutoff(now_ms: u64, horizon: Duration, lowest_delivered: Option<Hlc>) -> Hlc {
    let by_age = Hlc::compose(now_ms.saturating_sub(horizon.as_millis() as u64), 0, 0);
    lowest_delivered.map_or(by_age, |w| w.min(by_age))
}

/// Raises the horizons to cover the tombstones below the cutoff, then
/// deletes those; returns how many were deleted.
pub async fn purge(
    client: &mut Client,
    horizon: Duration,
    now_ms: u64,
    sources: &[String],
) -> Result<u64, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let all: Vec<u32> = (0..KEY_BUCKETS).collect();
    tx.execute(LOCK_BUCKETS_SQL, &[&buckets_param(&all)])
        .await?;
    let lowest: Option<i64> = tx
        .query_one(
            "SELECT min(hlc) FROM pgrelay.watermarks WHERE source_region = ANY($1)",
            &[&sources],
        )
        .await?
        .get(0);
    let cut = cutoff(now_ms, horizon, lowest.map(Hlc::from_sql)).to_sql();
    let raised = tx
        .execute(
            "INSERT INTO pgrelay.horizon AS h (table_name, hlc) \
             SELECT table_name, max(hlc) + 1 FROM pgrelay.tombstones WHERE hlc < $1 \
             GROUP BY table_name \
             ON CONFLICT (table_name) DO UPDATE SET hlc = greatest(h.hlc, EXCLUDED.hlc), \
             raised_at = now()",
            &[&cut],
        )
        .await?;
    tx.commit().await?;
    if raised == 0 {
        return Ok(0);
    }
    // every batch from now on reads the raised horizons: what they cover
    // can go without holding up the apply sessions
    let mut total = 0;
    loop {
        let n = client
            .execute(
                "DELETE FROM pgrelay.tombstones WHERE ctid = ANY (ARRAY(\
                 SELECT t.ctid FROM pgrelay.tombstones t JOIN pgrelay.horizon h \
                 USING (table_name) WHERE t.hlc < h.hlc LIMIT $1))",
                &[&PURGE_CHUNK],
            )
            .await?;
        total += n;
        if (n as i64) < PURGE_CHUNK {
            return Ok(total);
        }
    }
}

/// Sources with watermark rows that are not among `$1` (the config's).
const FORMER_SOURCES_SQL: &str =
    "SELECT source_region FROM pgrelay.watermarks WHERE source_region <> ALL($1) ORDER BY 1";

/// How often the horizon moves: a quarter of it, between 1 s and a minute.
pub fn purge_interval(horizon: Duration) -> Duration {
    (horizon / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Removes conflict log entries older than `$1` ms (text): the
/// `relay.apply.conflict_retention`.
pub const PURGE_CONFLICTS_SQL: &str = "DELETE FROM pgrelay.conflicts \
    WHERE recorded_at < now() - make_interval(secs => $1::text::bigint / 1000.0)";

/// Purges tombstones and old conflict log entries of `region` until shutdown (every sidecar process
/// does, whatever its role: tombstones grow nowhere without bound).
pub async fn keep(
    config: std::sync::Arc<crate::config::Config>,
    region: String,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let horizon = config.apply.tombstone_horizon;
    let sources: Vec<String> = config
        .regions
        .keys()
        .filter(|r| **r != region)
        .cloned()
        .collect();
    let mut warned: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut client: Option<Client> = None;
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(purge_interval(horizon)) => {}
        }
        if client.as_ref().is_none_or(Client::is_closed) {
            let Ok(region_cfg) = config.region(&region) else {
                return;
            };
            match crate::source::catalog::connect(&region_cfg.dsn, &region).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    tracing::warn!(region = %region, error = %e, "tombstone purge: cannot connect");
                    continue;
                }
            }
        }
        let c = client.as_mut().expect("connected above");
        if let Ok(rows) = c.query(FORMER_SOURCES_SQL, &[&sources]).await {
            for row in rows {
                let former: String = row.get(0);
                if warned.insert(former.clone()) {
                    tracing::warn!(region = %region, source = %former, "pgrelay.watermarks holds a source that is not in the config: ignored by the tombstone purge (delete its rows from pgrelay.watermark_parts once it is gone for good)");
                }
            }
        }
        match purge(c, horizon, crate::apply::now_ms(), &sources).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(region = %region, purged = n, "tombstones purged"),
            Err(e) => {
                tracing::warn!(region = %region, error = %crate::apply::db_message(&e), "tombstone purge failed")
            }
        }
        let retention = config.apply.conflict_retention.as_millis().to_string();
        match c.execute(PURGE_CONFLICTS_SQL, &[&retention]).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(region = %region, purged = n, "conflict log entries purged"),
            Err(e) => {
                tracing::warn!(region = %region, error = %crate::apply::db_message(&e), "conflict log purge failed")
            }
        }
    }
}

/// Whether `change` is an insert or update stamped below `horizon`: the
/// caller must then check that its row exists before applying it.
pub fn below(change: &Incoming<'_>, horizon: Hlc) -> bool {
    horizon > Hlc::ZERO && change.hlc < horizon && !matches!(change.op, Op::Delete | Op::Truncate)
}

/// `SELECT EXISTS (… WHERE key = $n::text::type …)` for a row of `target`.
pub fn exists_sql(target: &TargetTable) -> String {
    let conditions: Vec<String> = target
        .key
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let ty = target
                .columns
                .iter()
                .position(|c| c == k)
                .and_then(|p| target.column_types.get(p))
                .filter(|t| !t.is_empty())
                .map_or("text", String::as_str);
            format!("{} = ${}::text::{ty}", quote_ident(k), i + 1)
        })
        .collect();
    format!(
        "SELECT EXISTS (SELECT 1 FROM {} WHERE {})",
        target.name.quoted(),
        conditions.join(" AND ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::TableName;

    #[test]
    fn the_cutoff_never_passes_what_a_source_has_not_delivered() {
        let day = Duration::from_secs(86_400);
        let now = 10 * 86_400_000;
        let by_age = Hlc::compose(9 * 86_400_000, 0, 0);
        assert_eq!(cutoff(now, day, None), by_age);
        assert_eq!(cutoff(now, day, Some(Hlc::new(by_age.get() + 5))), by_age);
        assert_eq!(cutoff(now, day, Some(Hlc::new(17))), Hlc::new(17));
        assert_eq!(cutoff(5, day, None), Hlc::ZERO);
    }

    #[test]
    fn the_existence_check_casts_each_key_to_its_type() {
        let t = TargetTable {
            dropped: Vec::new(),
            name: TableName::new("public", "we\"ird"),
            key: vec!["tenant".into(), "id".into()],
            columns: vec!["id".into(), "tenant".into(), "v".into()],
            column_types: vec!["integer".into(), "text".into(), "text".into()],
            json_columns: vec![],
            admit: Default::default(),
            merge: vec![],
        };
        assert_eq!(
            exists_sql(&t),
            r#"SELECT EXISTS (SELECT 1 FROM "public"."we""ird" WHERE "tenant" = $1::text::text AND "id" = $2::text::integer)"#
        );
    }
}
