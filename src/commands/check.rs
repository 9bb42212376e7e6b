//! `pgrelay check`: the config, each database and Kafka cluster, and the
//! residency matrix.

use std::collections::BTreeSet;
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
    // each cluster's topics, asked once and all at once while the databases
    // are checked: an unreachable cluster costs one timeout and one line
    let mut clusters = Clusters::default();
    for region in &regions {
        for (_, cluster) in topics_of(&config, region) {
            clusters.fetch(cluster);
        }
    }
    let mut problems = 0;
    for region in &regions {
        // a sidecar's own secrets: checked for the region it runs
        if only.is_some() && config.sends_dr(region) {
            problems += check_dr_keys(&config, region);
        }
        let dsn = &config.regions[region].dsn;
        problems += check_database(&config, region, dsn).await?;
        problems += check_replication(region, dsn).await;
        problems += check_topics(&config, region, &mut clusters).await;
    }
    println!();
    print!("{}", residency::matrix(&config));
    if problems > 0 {
        println!("\n{problems} problem(s) found");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// The region's DR key, and the old keys `dr restore` may need; returns
/// the problems found.
fn check_dr_keys(config: &config::Config, region: &str) -> usize {
    let mut problems = 0;
    match config.dr_key(region) {
        Ok(key) => println!("region {region}: DR key {} ok", key.id()),
        Err(e) => {
            println!("error: {e}");
            problems += 1;
        }
    }
    // only `dr restore` needs the old keys: unset here is no error
    let old = &config.regions[region].dr_old_keys;
    if !old.is_empty() {
        let ids = old.keys().cloned().collect::<Vec<_>>().join(", ");
        match config.dr_key_ring(region) {
            Ok(_) => println!("region {region}: old DR keys for dr restore ok: {ids}"),
            Err(e) => println!(
                "region {region}: old DR keys {ids} not usable here ({e}); only dr \
                 restore needs them"
            ),
        }
    }
    problems
}

/// The region's database (`dsn`): the connection, the findings of
/// [`check::database`], pgrelay's tables, the slot, failover and the stamp
/// trigger; returns the problems found.
async fn check_database(config: &config::Config, region: &str, dsn: &str) -> Result<usize> {
    let client = match catalog::connect(dsn, region).await {
        Err(e) => {
            println!("error: {e}");
            return Ok(1);
        }
        Ok(client) => client,
    };
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
    let findings = check::database(config, region, &cat, true).await?;
    println!(
        "region {region}: pgrelay's tables at {} (this pgrelay: core {}{})",
        cat.schema_versions().await?,
        crate::schema::Component::Core.latest(),
        if config.has_dr() {
            format!(", dr {}", crate::schema::Component::Dr.latest())
        } else {
            String::new()
        }
    );
    if findings.is_empty() {
        println!(
            "region {region}: database ok ({})",
            catalog::describe_target(dsn)
        );
    }
    let mut problems = 0;
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
    for line in crate::failover::check_lines(config, &cat, dsn, region, &slot).await? {
        println!("{line}");
    }
    println!("{}", stamp_line(config, region, &client).await);
    Ok(problems)
}

/// Whether a replication connection can be made, and is encrypted;
/// returns the problems found.
async fn check_replication(region: &str, dsn: &str) -> usize {
    match catalog::probe_replication(dsn, region).await {
        Ok(Some(version)) => {
            println!("region {region}: replication connection encrypted ({version})");
            0
        }
        Ok(None) => {
            println!("region {region}: replication connection NOT encrypted");
            0
        }
        Err(e) => {
            println!("error: {e}");
            1
        }
    }
}

/// Whether the region's topics exist ([`topics_of`]); returns the problems
/// found.
async fn check_topics(config: &config::Config, region: &str, clusters: &mut Clusters) -> usize {
    let mut problems = 0;
    for (topic, cluster) in topics_of(config, region) {
        match clusters.topics(cluster).await {
            Reply::Topics(existing) if existing.contains(&topic) => {
                println!("region {region}: topic {topic} ok")
            }
            Reply::Topics(_) => {
                println!(
                    "error: region {region}: topic {topic} missing on kafka {}; run pgrelay \
                     setup --region {region}",
                    cluster.brokers
                );
                problems += 1;
            }
            Reply::Failed(e) => {
                println!(
                    "error: region {region}: {e} (its topics, and other regions' on the same \
                     cluster, are not checked)"
                );
                problems += 1;
            }
            // reported where the cluster was first needed
            Reply::FailedAbove => {}
        }
    }
    problems
}

/// How long `check` waits for a Kafka cluster's answer.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);

/// The topics `region` uses, with the cluster each lives on: one to each
/// other region, and the region's dead-letter topic.
fn topics_of<'a>(
    config: &'a config::Config,
    region: &str,
) -> Vec<(String, &'a config::KafkaCluster)> {
    let mut topics: Vec<(String, &config::KafkaCluster)> = config
        .regions
        .keys()
        .filter(|d| *d != region)
        .map(|d| (config.topic(region, d), config.kafka_for(d)))
        .collect();
    topics.push((config.dlq_topic(region), config.kafka_for(region)));
    topics
}

/// What a cluster answered, as [`Clusters::topics`] hands it out.
enum Reply<'a> {
    Topics(&'a BTreeSet<String>),
    /// Could not be read: the first time, why.
    Failed(String),
    /// Could not be read, said before.
    FailedAbove,
}

type Fetch = tokio::task::JoinHandle<Result<BTreeSet<String>, kafka::AdminError>>;

/// One metadata request per distinct cluster, started by [`Self::fetch`]
/// and awaited by the first [`Self::topics`] that needs it.
#[derive(Default)]
struct Clusters {
    asked: Vec<(config::KafkaCluster, Asked)>,
}

enum Asked {
    Pending(Fetch),
    Topics(BTreeSet<String>),
    Failed { reported: bool, why: String },
}

impl Clusters {
    fn fetch(&mut self, cluster: &config::KafkaCluster) {
        if self.asked.iter().any(|(c, _)| c == cluster) {
            return;
        }
        let owned = cluster.clone();
        let handle =
            tokio::spawn(async move { kafka::existing_topics(&owned, KAFKA_TIMEOUT).await });
        self.asked.push((cluster.clone(), Asked::Pending(handle)));
    }

    async fn topics(&mut self, cluster: &config::KafkaCluster) -> Reply<'_> {
        self.fetch(cluster);
        let i = self
            .asked
            .iter()
            .position(|(c, _)| c == cluster)
            .expect("fetched above");
        let asked = &mut self.asked[i].1;
        if let Asked::Pending(handle) = asked {
            *asked = match handle.await {
                Ok(Ok(topics)) => Asked::Topics(topics),
                Ok(Err(e)) => Asked::Failed {
                    reported: false,
                    why: e.to_string(),
                },
                Err(e) => Asked::Failed {
                    reported: false,
                    why: format!(
                        "kafka {}: the metadata request failed: {e}",
                        cluster.brokers
                    ),
                },
            };
        }
        match asked {
            Asked::Topics(topics) => Reply::Topics(topics),
            Asked::Failed { reported: true, .. } => Reply::FailedAbove,
            Asked::Failed { reported, why } => {
                *reported = true;
                Reply::Failed(why.clone())
            }
            Asked::Pending(_) => unreachable!("awaited above"),
        }
    }
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
                    (SELECT count(*) FROM pg_available_extensions WHERE name = 'pgrelay'), \
                    (SELECT count(*) FROM pg_extension WHERE extname = 'pgrelay') \
             FROM unnest($1::text[]) AS u(t) \
             JOIN pg_trigger g ON g.tgrelid = to_regclass(u.t) AND g.tgname = 'pgrelay_stamp' \
             JOIN pg_proc p ON p.oid = g.tgfoid",
            &[&tables],
        )
        .await;
    let (c, plpgsql, available, created) = match row {
        Ok(r) => (
            r.get::<_, i64>(0),
            r.get::<_, i64>(1),
            r.get::<_, i64>(2) > 0,
            r.get::<_, i64>(3) > 0,
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
        (0, _) if wants_c && created => format!(
            "region {region}: stamp trigger in PL/pgSQL on {plpgsql} tables; the pgrelay extension \
             is created in this database: pgrelay setup switches to the faster C trigger"
        ),
        // setup tried and could not create it: it takes a superuser
        (0, _) if wants_c && available => format!(
            "region {region}: stamp trigger in PL/pgSQL on {plpgsql} tables; the pgrelay extension \
             is installed on the server, and creating it in the database takes a superuser: \
             for the faster C trigger a superuser runs once `{}`, then pgrelay setup switches to it",
            crate::setup::CREATE_EXTENSION_SQL
        ),
        (0, _) => format!("region {region}: stamp trigger in PL/pgSQL on {plpgsql} tables"),
        _ => format!(
            "region {region}: stamp triggers mixed: {c} tables in C, {plpgsql} in PL/pgSQL \
             (pgrelay setup makes them one kind)"
        ),
    }
}
