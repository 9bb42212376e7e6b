//! `pgrelay dlq list|replay`.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;

use super::load;
use crate::apply;
use crate::config::Need;

/// `dlq list`: what is parked in the region's dead-letter topic and why.
pub async fn list(path: &Path, region: &str, limit: Option<usize>) -> Result<ExitCode> {
    let config = load(path)?;
    config.region(region)?;
    config.require(&[Need::Kafka(region)])?;
    let letters = apply::dlq::read(
        &config,
        region,
        &Default::default(),
        limit,
        Duration::from_secs(2),
    )?;
    // `dlq replay` stores how far it got, per partition, in the
    // region's database: what is below that was replayed
    let dlq_topic = config.dlq_topic(region);
    let replayed_below =
        match crate::source::catalog::connect(&config.regions[region].dsn, region).await {
            Ok(client) => apply::stored_offsets(&client, &dlq_topic).await.ok(),
            Err(_) => None,
        };
    let state = |p: i32, o: i64| match &replayed_below {
        Some(done) if o < done.get(&p).copied().unwrap_or(0) => "replayed",
        Some(_) => "waiting",
        None => "replay state unknown",
    };
    let waiting = letters
        .iter()
        .filter(|(p, o, _)| state(*p, *o) == "waiting")
        .count();
    println!(
        "{} parked record(s) in {dlq_topic}, {waiting} waiting for replay{}",
        letters.len(),
        if replayed_below.is_none() {
            " (the database is unreachable: replay state unknown)"
        } else {
            ""
        }
    );
    for (p, o, d) in letters {
        println!(
            "{p}:{o}  {}  {}  attempts={}  sqlstate={}  from {}[{}]@{}  {}",
            state(p, o),
            d.class,
            d.attempts,
            if d.sqlstate.is_empty() {
                "-"
            } else {
                &d.sqlstate
            },
            d.topic,
            d.partition,
            d.offset,
            d.message
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `dlq replay`: re-applies parked records (resumable, idempotent).
pub async fn replay(
    path: &Path,
    region: &str,
    dry_run: bool,
    limit: Option<usize>,
) -> Result<ExitCode> {
    let config = load(path)?;
    config.region(region)?;
    config.require(&[Need::Database(region), Need::Kafka(region)])?;
    let results = apply::replay::replay(&config, region, dry_run, limit).await?;
    // a storm an operator discarded stays where it is, for audit
    let is_kept = |r: &apply::replay::Replayed| r.letter.class == apply::breaker::CLASS_DISCARDED;
    let kept = results.iter().filter(|r| is_kept(r)).count();
    let failed = results.iter().filter(|r| r.failure.is_some()).count() - kept;
    for r in &results {
        match &r.failure {
            Some(_) if is_kept(r) => println!(
                "{}:{}  kept for audit: {} (discarded by pgrelay breaker discard), not replayed",
                r.partition, r.offset, r.letter.class
            ),
            None => println!(
                "{}:{}  {}",
                r.partition,
                r.offset,
                if dry_run { "would apply" } else { "applied" }
            ),
            Some(f) => println!(
                "{}:{}  {} {f}",
                r.partition,
                r.offset,
                if dry_run {
                    "would fail:"
                } else {
                    "parked again:"
                }
            ),
        }
    }
    println!(
        "{} record(s) {}, {failed} {}, {kept} discarded by the breaker kept for audit",
        results.len() - failed - kept,
        if dry_run { "would apply" } else { "applied" },
        if dry_run {
            "would fail"
        } else {
            "parked again"
        }
    );
    Ok(ExitCode::SUCCESS)
}
