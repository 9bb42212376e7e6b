//! `pgrelay resync`: send a region's current rows again.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;

use super::{all_clusters, load};
use crate::config::Need;
use crate::event::TableName;

pub async fn resync(
    path: &Path,
    region: &str,
    to: Vec<String>,
    tables: &[String],
    dry_run: bool,
    jobs: usize,
) -> Result<ExitCode> {
    let config = load(path)?;
    config.region(region)?;
    let mut needs = vec![Need::Database(region), Need::HashKey(region)];
    if config.sends_dr(region) && !dry_run {
        needs.push(Need::DrKey(region));
    }
    needs.extend(all_clusters(&config));
    config.require(&needs)?;
    let tables = tables
        .iter()
        .map(|t| TableName::parse(t).map_err(anyhow::Error::msg))
        .collect::<Result<Vec<_>>>()?;
    for dest in &to {
        if dest == region || !config.regions.contains_key(dest) {
            let others: Vec<&str> = config
                .regions
                .keys()
                .map(String::as_str)
                .filter(|r| *r != region)
                .collect();
            anyhow::bail!(
                "--to {dest}: not a destination of region {region} (destinations: {})",
                others.join(", ")
            );
        }
    }
    if !dry_run {
        // never let a send create a topic: a destination that was never set
        // up has none, and a topic the broker made on the fly has the wrong
        // partition count and nobody consuming it
        let dests: Vec<&String> = if to.is_empty() {
            config.regions.keys().filter(|r| *r != region).collect()
        } else {
            to.iter().collect()
        };
        for dest in dests {
            let topic = config.topic(region, dest);
            crate::kafka::check_topics(
                config.kafka_for(dest),
                std::slice::from_ref(&topic),
                std::time::Duration::from_secs(10),
            )
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "region {dest}: {e}; set the region up first (pgrelay setup --region {dest}, \
                     and --region {region} for the topics {region} sends on), then resync"
                )
            })?;
        }
        for (dest, topic) in config.dr_topics(region) {
            if !to.is_empty() && !to.contains(&dest) {
                continue;
            }
            crate::kafka::check_topics(
                config.kafka_for(&dest),
                std::slice::from_ref(&topic),
                std::time::Duration::from_secs(10),
            )
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "region {dest}: {e}; run pgrelay setup --region {region} (it creates the DR \
                     topic), then resync"
                )
            })?;
        }
    }
    let destinations = to.join(",");
    let opts = crate::resync::Options {
        to,
        tables,
        dry_run,
        jobs,
    };
    let mut progress = crate::progress::Progress::start(&format!("resync {region}"), "rows", None);
    let summary = crate::resync::run(&config, region, &opts, &mut progress).await?;
    print!("{}", crate::resync::render(&summary));
    if !dry_run {
        // ends the `rebuilding` of the pairs it covers once applied (status)
        if let Err(e) = crate::failover::record_resync(&config, region, &destinations).await {
            // the records are in Kafka; only status's `rebuilding` misses it
            eprintln!("warning: {e} (run pgrelay setup --region {region} to grant it)");
        }
    }
    println!(
        "region {region}: {} (every record carries its row's own stamp: newer rows at the destinations stay)",
        if dry_run {
            "dry run, nothing sent"
        } else {
            "resync sent and acknowledged by Kafka"
        }
    );
    Ok(ExitCode::SUCCESS)
}
