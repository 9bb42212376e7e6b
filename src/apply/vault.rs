//! The DR region's side of encrypted DR copies: consumes
//! `{prefix}.dr.{home}.{region}` into `pgrelay_dr.vault`, the newest stamp
//! of each row winning, offsets stored in the same transaction (as the
//! apply side stores its own). Nothing is opened here: this region holds no
//! key of the homes whose copies it keeps.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::Message as _;
use tokio::sync::watch;
use tokio_postgres::Client;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::dr::{hex_bytes, Sealed};
use crate::metrics::Metrics;
use crate::source::catalog;

use super::consume::{assign, consumer};
use super::error::ApplyError;
use super::session::stored_offsets;
use super::sql::OFFSETS_SQL;

/// Stores sealed copies of home `$1`; `$2` is a JSON array of
/// `{table_hash, key_hash, stamp, key_id, nonce, ciphertext}` (bytes as hex),
/// one element per row at most.
pub const VAULT_SQL: &str = "INSERT INTO pgrelay_dr.vault AS v \
    (home, table_hash, key_hash, stamp, key_id, nonce, ciphertext) \
    SELECT $1, x.table_hash, decode(x.key_hash, 'hex'), x.stamp, x.key_id, \
    decode(x.nonce, 'hex'), decode(x.ciphertext, 'hex') \
    FROM json_to_recordset($2::text::json) AS x(table_hash text, key_hash text, stamp bigint, \
    key_id text, nonce text, ciphertext text) \
    ON CONFLICT (home, key_hash) DO UPDATE SET table_hash = EXCLUDED.table_hash, \
    stamp = EXCLUDED.stamp, key_id = EXCLUDED.key_id, nonce = EXCLUDED.nonce, \
    ciphertext = EXCLUDED.ciphertext, stored_at = now() \
    WHERE EXCLUDED.stamp > v.stamp";

const MAX_BATCH: usize = 500;

/// The `$2` of [`VAULT_SQL`] for a batch of (record key, value): the newest
/// copy of each row; records that are no sealed copy are counted apart.
pub fn vault_rows<'a>(records: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> (String, usize) {
    let mut newest: BTreeMap<&[u8], Sealed> = BTreeMap::new();
    let mut malformed = 0;
    for (key, value) in records {
        let Ok(sealed) = Sealed::decode(value) else {
            malformed += 1;
            continue;
        };
        match newest.get(key) {
            Some(seen) if seen.stamp >= sealed.stamp => {}
            _ => {
                newest.insert(key, sealed);
            }
        }
    }
    let rows: Vec<serde_json::Value> = newest
        .into_iter()
        .map(|(key, s)| {
            serde_json::json!({
                "table_hash": s.table_hash,
                "key_hash": hex_bytes::encode(key),
                "stamp": s.stamp,
                "key_id": s.key_id,
                "nonce": hex_bytes::encode(&s.nonce),
                "ciphertext": hex_bytes::encode(&s.ciphertext),
            })
        })
        .collect();
    (serde_json::Value::Array(rows).to_string(), malformed)
}

/// Keeps the vault of `home`'s copies up to date until shutdown,
/// restarting after transient failures.
pub async fn supervise(
    config: Arc<Config>,
    region: String,
    home: String,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ApplyError> {
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
    loop {
        match run(&config, &region, &home, &metrics, shutdown.clone()).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_transient() => {
                let delay = backoff.next_delay();
                tracing::warn!(region = %region, home = %home, error = %e, retry_in = ?delay, "DR vault consumer failed, restarting");
                tokio::select! {
                    _ = shutdown.changed() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) => return Err(e),
        }
    }
}

async fn run(
    config: &Config,
    region: &str,
    home: &str,
    metrics: &Metrics,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ApplyError> {
    let dsn = &config.region(region)?.dsn;
    let mut client = catalog::connect(dsn, region)
        .await
        .map_err(|e| ApplyError::transient("", e))?;
    let topic = config.dr_topic(home, region);
    let stored = stored_offsets(&client, &topic).await?;
    let consumer = consumer(config, region, &format!("pgrelay-dr-{region}"))?;
    assign(&consumer, &topic, &stored, 0, 1).await?;
    tracing::info!(region, home, topic = %topic, "DR vault consuming");
    loop {
        let mut batch: Vec<(i32, i64, Vec<u8>, Vec<u8>)> = Vec::new();
        tokio::select! {
            _ = shutdown.changed() => return Ok(()),
            m = consumer.recv() => {
                let m = m.map_err(|e| consuming(&topic, e))?;
                batch.push(owned(&m));
            }
        }
        while batch.len() < MAX_BATCH {
            match tokio::time::timeout(Duration::from_millis(5), consumer.recv()).await {
                Ok(Ok(m)) => batch.push(owned(&m)),
                Ok(Err(e)) => return Err(consuming(&topic, e)),
                Err(_) => break,
            }
        }
        store(&mut client, home, &topic, &batch, metrics, region).await?;
    }
}

fn consuming(topic: &str, source: rdkafka::error::KafkaError) -> ApplyError {
    ApplyError::kafka("consuming", topic, None, source)
}

fn owned(m: &rdkafka::message::BorrowedMessage<'_>) -> (i32, i64, Vec<u8>, Vec<u8>) {
    (
        m.partition(),
        m.offset(),
        m.key().unwrap_or_default().to_vec(),
        m.payload().unwrap_or_default().to_vec(),
    )
}

/// One transaction: the batch's newest copies and the next offsets.
async fn store(
    client: &mut Client,
    home: &str,
    topic: &str,
    batch: &[(i32, i64, Vec<u8>, Vec<u8>)],
    metrics: &Metrics,
    region: &str,
) -> Result<(), ApplyError> {
    let (rows, malformed) = vault_rows(batch.iter().map(|(_, _, k, v)| (&k[..], &v[..])));
    if malformed > 0 {
        // only a foreign writer puts these here: skipped, never stalling
        tracing::error!(
            region,
            home,
            topic,
            malformed,
            "records that are no sealed DR copy skipped"
        );
    }
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    for (p, o, _, _) in batch {
        let e = next.entry(*p).or_insert(0);
        *e = (*e).max(o + 1);
    }
    let offsets = serde_json::Value::Array(
        next.iter()
            .map(|(p, o)| serde_json::json!({"topic": topic, "kafka_partition": p, "next_offset": o}))
            .collect(),
    )
    .to_string();
    let fail = |what: &str, e: tokio_postgres::Error| {
        ApplyError::transient(format!("region {region}: DR vault {what}"), e)
    };
    let tx = client.transaction().await.map_err(|e| fail("begin", e))?;
    tx.execute(VAULT_SQL, &[&home, &rows])
        .await
        .map_err(|e| fail("store", e))?;
    tx.execute(OFFSETS_SQL, &[&offsets])
        .await
        .map_err(|e| fail("offsets", e))?;
    tx.commit().await.map_err(|e| fail("commit", e))?;
    metrics.add(
        "pgrelay_dr_vault_records_total",
        "Sealed DR copies stored in this region's vault",
        &[("region", region), ("home", home)],
        batch.len() as u64,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dr::DrKey;

    #[test]
    fn a_batch_keeps_the_newest_copy_of_each_row() {
        let k = DrKey::parse("k1", &"11".repeat(32)).unwrap();
        let old = k.seal("t", 5, b"old").unwrap().encode();
        let new = k.seal("t", 9, b"new").unwrap().encode();
        let other = k.seal("t", 1, b"other").unwrap().encode();
        let (rows, malformed) = vault_rows([
            (&b"row-a"[..], &new[..]),
            (&b"row-a"[..], &old[..]),
            (&b"row-b"[..], &other[..]),
            (&b"row-c"[..], &b"not json"[..]),
        ]);
        assert_eq!(malformed, 1);
        let rows: Vec<serde_json::Value> = serde_json::from_str(&rows).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0]["key_hash"], hex_bytes::encode(b"row-a"));
        assert_eq!(rows[0]["stamp"], 9);
        assert_eq!(rows[1]["stamp"], 1);
    }
}
