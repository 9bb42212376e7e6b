//! `pgrelay dlq replay`: re-apply parked records after their cause is fixed.
//!
//! Reads the dead-letter topic from the stored progress, then applies each
//! record alone, in one transaction with its progress, under the replication
//! origin `pgrelay_replay` (so the local capture side skips it, like any
//! applied write). A record that fails again is parked
//! again (appended to the topic with the new reason and one more attempt);
//! either way the progress moves past it, so a replay can be interrupted and
//! run again without applying anything twice.

use std::time::Duration;

use crate::apply::dlq::{self, DeadLetter, DlqProducer};
use crate::apply::{
    apply_batch, load_targets, session_with_origin, stored_offsets, ApplyError, ApplyErrorKind,
    BatchOptions, Consumed, ParkedPositions,
};
use crate::config::Config;
use crate::names::REPLAY_ORIGIN;
use crate::source::catalog;

/// One replayed record's fate.
#[derive(Debug, Clone)]
pub struct Replayed {
    pub partition: i32,
    pub offset: i64,
    pub letter: DeadLetter,
    /// `None` when applied (or found redundant), else the new reason.
    pub failure: Option<String>,
}

/// The source region of an apply topic `{prefix}.{source}.{region}`.
fn source_of(config: &Config, topic: &str, region: &str) -> Option<String> {
    let rest = topic.strip_prefix(&format!("{}.", config.prefix))?;
    let source = rest.strip_suffix(&format!(".{region}"))?;
    config
        .regions
        .contains_key(source)
        .then(|| source.to_string())
}

pub async fn replay(
    config: &Config,
    region: &str,
    dry_run: bool,
    limit: Option<usize>,
) -> Result<Vec<Replayed>, ApplyError> {
    let dsn = &config.region(region)?.dsn;
    let client = catalog::connect(dsn, region)
        .await
        .map_err(|e| ApplyError::setup_from(e.to_string(), e))?;
    let targets = load_targets(config, region, &client).await?;
    let dlq_topic = config.dlq_topic(region);
    let start = stored_offsets(&client, &dlq_topic).await?;
    let letters = dlq::read(config, region, &start, limit, Duration::from_secs(2))?;
    let producer = DlqProducer::new(config, region)?;
    let conflict_log = crate::conflicts::ConflictLog::from_config(config, region);
    let fallback = config
        .regions
        .keys()
        .find(|r| *r != region)
        .cloned()
        .unwrap_or_default();
    if letters.is_empty() {
        return Ok(vec![]);
    }
    let mut client = session_with_origin(config, region, REPLAY_ORIGIN)
        .await
        .map_err(|e| {
            let message = format!("another pgrelay dlq replay is running for region {region}: {e}");
            match e.into_kind() {
                ApplyErrorKind::OriginBusy { source, .. } => {
                    ApplyError::setup_from(message, source)
                }
                other => other.into(),
            }
        })?;
    let mut out = Vec::new();
    for (partition, offset, letter) in letters {
        let known = source_of(config, &letter.topic, region);
        let stamp_region = known
            .as_deref()
            .and_then(|s| config.regions.get(s).map(|r| (s, r.id)));
        let source = known.clone().unwrap_or_else(|| fallback.clone());
        let consumed = Consumed {
            topic: letter.topic.clone(),
            partition: letter.partition,
            offset: letter.offset,
            key: letter.key.clone(),
            value: letter.value.clone(),
        };
        let progress = [(dlq_topic.clone(), partition, offset + 1)];
        // a storm an operator discarded stays parked: it is there for audit
        let discarded = letter.class == crate::apply::breaker::CLASS_DISCARDED;
        let outcome = apply_batch(
            &mut client,
            &source,
            None,
            &targets,
            if discarded {
                &[]
            } else {
                std::slice::from_ref(&consumed)
            },
            &producer,
            BatchOptions {
                attempt: letter.attempts,
                extra_offsets: &progress,
                commit: !dry_run,
                max_tries: 1,
                max_skew: config.max_clock_skew,
                max_ahead: config.max_stamp_ahead,
                stamp_region,
                tombstone_horizon: config.apply.tombstone_horizon,
                // loaded at the start of the replay
                targets_checked: true,
                conflict_log: conflict_log.as_ref(),
                parked: ParkedPositions::RecordAndClear,
            },
        )
        .await
        .map_err(|e| {
            ApplyError::transient(
                format!("replaying {dlq_topic} partition {partition} offset {offset}"),
                e,
            )
        })?;
        out.push(Replayed {
            partition,
            offset,
            failure: if discarded {
                Some(format!(
                    "{}: not replayed (discarded by pgrelay breaker discard)",
                    letter.class
                ))
            } else {
                outcome
                    .dead
                    .first()
                    .map(|d| format!("{}: {}", d.class, d.message))
            },
            letter,
        });
    }
    Ok(out)
}
