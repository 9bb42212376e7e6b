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
use crate::dr::{hex_bytes, Refusal, Sealed};
use crate::metrics::catalog as metric;
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
/// copy of each row. Records the vault refuses (see
/// [`Sealed::vault_check`]) are returned apart, by their index in the batch.
pub fn vault_rows<'a>(
    records: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    now_ms: u64,
    max_ahead_ms: u64,
) -> (String, Vec<(usize, Refusal)>) {
    let mut newest: BTreeMap<&[u8], Sealed> = BTreeMap::new();
    let mut refused = Vec::new();
    for (i, (key, value)) in records.into_iter().enumerate() {
        let checked = Sealed::decode(value)
            .map_err(|_| Refusal::Malformed)
            .and_then(|s| s.vault_check(key, now_ms, max_ahead_ms).map(|()| s));
        let sealed = match checked {
            Ok(sealed) => sealed,
            Err(why) => {
                refused.push((i, why));
                continue;
            }
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
    (serde_json::Value::Array(rows).to_string(), refused)
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
        store(
            &mut client,
            home,
            &topic,
            &batch,
            metrics,
            region,
            config.max_stamp_ahead,
        )
        .await?;
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
    max_ahead: Duration,
) -> Result<(), ApplyError> {
    let now_ms = super::batch::now_ms();
    let max_ahead_ms = u64::try_from(max_ahead.as_millis()).unwrap_or(u64::MAX);
    let (rows, refused) = vault_rows(
        batch.iter().map(|(_, _, k, v)| (&k[..], &v[..])),
        now_ms,
        max_ahead_ms,
    );
    // only a foreign writer of the DR topic puts these here: counted and
    // skipped, never retried, the rest of the batch stored as usual
    let mut by_reason: BTreeMap<&'static str, (u64, i32, i64)> = BTreeMap::new();
    for (i, why) in &refused {
        let (p, o, _, _) = &batch[*i];
        by_reason.entry(why.reason()).or_insert((0, *p, *o)).0 += 1;
    }
    for (reason, (count, partition, offset)) in by_reason {
        tracing::error!(
            region,
            home,
            topic,
            reason,
            count,
            first_partition = partition,
            first_offset = offset,
            "records on the DR topic that no region sealed (a writer other than {home}'s \
             sidecar?) skipped, not stored in the vault"
        );
        metrics.add(
            &metric::DR_VAULT_REFUSED,
            &[("region", region), ("home", home), ("reason", reason)],
            count,
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
        &metric::DR_VAULT_RECORDS,
        &[("region", region), ("home", home)],
        (batch.len() - refused.len()) as u64,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dr::DrKey;

    #[test]
    fn a_batch_keeps_the_newest_copy_of_each_row_and_refuses_forged_stamps() {
        let k = DrKey::parse("k1", &"11".repeat(32)).unwrap();
        let now_ms = 1_800_000_000_000;
        let at = |ms: u64| crate::hlc::Hlc::compose(ms, 0, 1);
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let seal = |row: &[u8; 32], stamp: u64| {
            k.seal("eu", "t", row, crate::hlc::Hlc::new(stamp), b"x")
                .unwrap()
        };
        let old = seal(&a, at(now_ms - 9).get()).encode();
        let new = seal(&a, at(now_ms - 5).get()).encode();
        let other = seal(&b, at(now_ms - 1).get()).encode();
        let mut far = seal(&a, 0);
        far.stamp = at(now_ms + 600_000);
        let mut huge = seal(&b, 0);
        huge.stamp = crate::hlc::Hlc::new(u64::MAX);
        let (far, huge) = (far.encode(), huge.encode());
        let (rows, refused) = vault_rows(
            [
                (&a[..], &new[..]),
                (&a[..], &far[..]),
                (&a[..], &old[..]),
                (&b[..], &huge[..]),
                (&b[..], &other[..]),
                (&b"row-c"[..], &other[..]),
                (&b[..], &b"not json"[..]),
            ],
            now_ms,
            300_000,
        );
        assert_eq!(
            refused,
            vec![
                (1, Refusal::StampAhead),
                (3, Refusal::StampOutOfRange),
                (5, Refusal::Malformed),
                (6, Refusal::Malformed)
            ]
        );
        let rows: Vec<serde_json::Value> = serde_json::from_str(&rows).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0]["key_hash"], hex_bytes::encode(&a));
        assert_eq!(rows[0]["stamp"], at(now_ms - 5).get());
        assert_eq!(rows[1]["stamp"], at(now_ms - 1).get());
    }
}
