//! `pgrelay check`: the config, each database and Kafka cluster, and the
//! residency matrix.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;

use super::{all_clusters, load};
use crate::check::{self, Severity};
use crate::config::{self, Need};
use crate::source::catalog::{self, Catalog};
use crate::{kafka, residency};

pub async fn check(path: &Path, only: Option<&str>) -> Result<ExitCode> {
    let config = load(path)?;
    println!(
        "config {}: ok ({} regions, {} tables)",
        path.display(),
        config.regions.len(),
        config.tables.len()
    );
    let regions: Vec<String> = match only {
        Some(r) => {
            config.region(r)?;
            vec![r.to_string()]
        }
        None => config.regions.keys().cloned().collect(),
    };
    let mut needs: Vec<Need> = regions.iter().map(|r| Need::Database(r)).collect();
    needs.extend(all_clusters(&config));
    config.require(&needs)?;
    let mut problems = 0;
    for region in &regions {
        let dsn = &config.regions[region].dsn;
        match catalog::connect(dsn, region).await {
            Err(e) => {
                println!("error: {e}");
                problems += 1;
            }
            Ok(client) => {
                match catalog::session_tls(&client, region).await? {
                    Some(version) => {
                        println!("region {region}: database connection encrypted ({version})")
                    }
                    None => println!("region {region}: database connection NOT encrypted"),
                }
                let cat = Catalog {
                    client: &client,
                    region,
                };
                let findings = check::database(&config, region, &cat, true).await?;
                if findings.is_empty() {
                    println!(
                        "region {region}: database ok ({})",
                        catalog::describe_target(dsn)
                    );
                }
                for f in &findings {
                    println!("{f}");
                    if f.severity != Severity::Warning {
                        problems += 1;
                    }
                }
                let slot = config.slot_name(region);
                if let Some(s) = cat.slot(&slot).await? {
                    println!(
                        "region {region}: slot {slot} {} confirmed {} (WAL retained {} bytes)",
                        if s.active { "active," } else { "inactive," },
                        s.confirmed_flush,
                        s.retained_bytes
                    );
                }
                for line in crate::failover::check_lines(&config, &cat, dsn, region, &slot).await? {
                    println!("{line}");
                }
                println!("{}", stamp_line(&config, region, &client).await);
            }
        }
        match catalog::probe_replication(dsn, region).await {
            Ok(Some(version)) => {
                println!("region {region}: replication connection encrypted ({version})")
            }
            Ok(None) => println!("region {region}: replication connection NOT encrypted"),
            Err(e) => {
                println!("error: {e}");
                problems += 1;
            }
        }
        let mut topics: Vec<(String, &config::KafkaCluster)> = config
            .regions
            .keys()
            .filter(|d| *d != region)
            .map(|d| (config.topic(region, d), config.kafka_for(d)))
            .collect();
        topics.push((config.dlq_topic(region), config.kafka_for(region)));
        for (topic, cluster) in topics {
            match kafka::check_topics(
                cluster,
                std::slice::from_ref(&topic),
                Duration::from_secs(10),
            )
            .await
            {
                Ok(()) => println!("region {region}: topic {topic} ok"),
                Err(e) => {
                    println!("error: region {region}: {e}");
                    problems += 1;
                }
            }
        }
    }
    println!();
    print!("{}", residency::matrix(&config));
    if problems > 0 {
        println!("\n{problems} problem(s) found");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Which stamp trigger the region's tables carry, and whether `setup`
/// would install the faster one.
async fn stamp_line(
    config: &config::Config,
    region: &str,
    client: &tokio_postgres::Client,
) -> String {
    let tables: Vec<String> = config
        .replicated_tables()
        .map(|t| t.name.quoted())
        .collect();
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE p.proname = 'stamp_row_c'), \
                    count(*) FILTER (WHERE p.proname = 'stamp_row'), \
                    (SELECT count(*) FROM pg_available_extensions WHERE name = 'pgrelay') \
             FROM unnest($1::text[]) AS u(t) \
             JOIN pg_trigger g ON g.tgrelid = to_regclass(u.t) AND g.tgname = 'pgrelay_stamp' \
             JOIN pg_proc p ON p.oid = g.tgfoid",
            &[&tables],
        )
        .await;
    let (c, plpgsql, available) = match row {
        Ok(r) => (
            r.get::<_, i64>(0),
            r.get::<_, i64>(1),
            r.get::<_, i64>(2) > 0,
        ),
        Err(e) => {
            return format!(
                "region {region}: stamp trigger unknown ({})",
                crate::source::pg_error::reason(&e)
            )
        }
    };
    let wants_c = config.capture.stamp_trigger != crate::config::StampTrigger::Plpgsql;
    match (c, plpgsql) {
        (0, 0) => format!("region {region}: no stamp triggers yet (pgrelay setup)"),
        (_, 0) => format!("region {region}: stamp trigger in C (extension pgrelay) on {c} tables"),
        (0, _) if wants_c && available => format!(
            "region {region}: stamp trigger in PL/pgSQL on {plpgsql} tables; the pgrelay extension \
             is installed on the server: pgrelay setup switches to the faster C trigger"
        ),
        (0, _) => format!("region {region}: stamp trigger in PL/pgSQL on {plpgsql} tables"),
        _ => format!(
            "region {region}: stamp triggers mixed: {c} tables in C, {plpgsql} in PL/pgSQL \
             (pgrelay setup makes them one kind)"
        ),
    }
}
