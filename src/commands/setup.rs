//! `pgrelay setup`: metadata schema, triggers, publication, slot, topics and
//! the run role's grants, idempotently.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::{all_clusters, load};
use crate::check::{self, Severity};
use crate::config::{Config, Need};
use crate::source::catalog::{self, Catalog};
use crate::{kafka, privileges, setup};

/// How often `setup` tries its transaction when the applications' locks
/// get in its way (each wait bounded by [`SETUP_LOCK_TIMEOUT`]).
const SETUP_ATTEMPTS: u32 = 20;
const SETUP_LOCK_TIMEOUT: &str = "2s";

/// A deadlock, or a lock not granted within the lock timeout.
fn is_lock_conflict(e: &tokio_postgres::Error) -> bool {
    e.code()
        .is_some_and(|c| matches!(c.code(), "40P01" | "55P03"))
}

/// Runs `setup`'s statements in one transaction; on failure the error and
/// the statement that failed (`None`: the commit).
async fn run_setup_transaction(
    client: &mut tokio_postgres::Client,
    statements: &[String],
    progress: &mut crate::progress::Progress,
) -> std::result::Result<(), (tokio_postgres::Error, Option<String>)> {
    let tx = client.transaction().await.map_err(|e| (e, None))?;
    tx.batch_execute(&format!("SET LOCAL lock_timeout = '{SETUP_LOCK_TIMEOUT}'"))
        .await
        .map_err(|e| (e, None))?;
    for sql in statements {
        progress.set_label(&statement_label(sql));
        tx.batch_execute(sql)
            .await
            .map_err(|e| (e, Some(sql.clone())))?;
        progress.inc(1);
    }
    tx.commit().await.map_err(|e| (e, None))
}

pub async fn setup(path: &Path, region: &str, start_at_end: bool) -> Result<ExitCode> {
    let config = load(path)?;
    let region_cfg = config.region(region)?;
    let mut needs = vec![Need::SetupDatabase(region)];
    needs.extend(all_clusters(&config));
    config.require(&needs)?;
    let mut client = catalog::connect(region_cfg.setup_dsn(), region).await?;
    let cat = Catalog {
        client: &client,
        region,
    };
    let findings = check::database(&config, region, &cat, false).await?;
    refuse_blocking(region, &findings)?;
    let keys = cat.keys(&config).await?;
    let stamp = choose_stamp(&config, region, &client).await?;
    let installed = cat.schema_versions().await?;
    let pending = installed.pending(config.has_dr());
    let statements = setup::plan(
        &config,
        region,
        &|t| keys.get(t).cloned().unwrap_or_default(),
        stamp,
        &installed,
    );
    run_statements(&mut client, region, &statements).await?;
    for (component, m) in &pending {
        println!(
            "region {region}: migration {} {} applied ({})",
            component.name(),
            m.version,
            m.name
        );
    }
    if let Some(role) = region_cfg.grantee() {
        grant_run_role(&config, region, &client, &role).await?;
    }
    let cat = Catalog {
        client: &client,
        region,
    };
    println!(
        "region {region}: pgrelay's tables at {}",
        cat.schema_versions().await?
    );
    let lost = ensure_slot(&config, region, region_cfg.setup_dsn(), &client).await?;
    println!(
        "region {region}: stamp trigger {}",
        match stamp {
            setup::Stamp::C => "in C (extension pgrelay)",
            setup::Stamp::Plpgsql => "in PL/pgSQL",
        }
    );
    println!(
        "region {region}: database ready (schema pgrelay, {} replicated tables, publication {}, slot {})",
        config.replicated_tables()
            .count(),
        config.publication_name(),
        config.slot_name(region)
    );
    if lost {
        let slot = config.slot_name(region);
        println!(
            "region {region}: slot {slot} had been invalidated by PostgreSQL (wal_status lost) and was \
             created anew; what was written while it was lost has not reached the other regions: \
             run pgrelay resync --config {} --region {region}",
            path.display()
        );
    }
    create_topics(&config, region).await?;
    if start_at_end {
        start_incoming_at_end(&config, region, &client, path).await?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints the findings that block replication, if any, and fails.
fn refuse_blocking(region: &str, findings: &[check::Finding]) -> Result<()> {
    let blocking: Vec<_> = findings
        .iter()
        .filter(|f| f.severity == Severity::Blocking)
        .collect();
    if !blocking.is_empty() {
        for f in &blocking {
            eprintln!("{f}");
        }
        bail!("region {region}: fix the errors above, then run pgrelay setup again");
    }
    Ok(())
}

/// Runs `setup`'s statements in one transaction, with a progress bar. On a
/// region whose applications keep writing, ALTER TABLE waits for their
/// transactions and may deadlock with one: each lock is waited for a
/// bounded time (a queued ALTER would hold every writer back behind it),
/// then the whole transaction is tried again.
async fn run_statements(
    client: &mut tokio_postgres::Client,
    region: &str,
    statements: &[String],
) -> Result<()> {
    let mut progress = crate::progress::Progress::start(
        &format!("setup {region}"),
        "statements",
        Some(statements.len() as u64),
    );
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match run_setup_transaction(client, statements, &mut progress).await {
            Ok(()) => break,
            Err((e, _)) if attempt < SETUP_ATTEMPTS && is_lock_conflict(&e) => {
                tracing::debug!(region, attempt, error = %e, "setup: lock conflict, trying again");
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
            }
            Err((e, None)) => {
                return Err(
                    anyhow::Error::new(e).context(format!("region {region}: committing setup"))
                )
            }
            Err((e, Some(sql))) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("region {region}: setup statement failed: {sql}")))
            }
        }
    }
    progress.finish();
    Ok(())
}

/// The region's replication slot: created if missing, replaced if
/// PostgreSQL invalidated it, made a failover slot where it can be.
/// Returns whether it had been lost (`setup_dsn`: the region's).
async fn ensure_slot(
    config: &Config,
    region: &str,
    setup_dsn: &str,
    client: &tokio_postgres::Client,
) -> Result<bool> {
    let slot = config.slot_name(region);
    let cat = Catalog { client, region };
    let lost = cat.slot(&slot).await?.is_some_and(|s| s.is_lost());
    if lost {
        // an invalidated slot can never stream again: replace it
        client
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
            .with_context(|| format!("region {region}: dropping the lost slot {slot}"))?;
    }
    let version = cat.server_version_num().await?;
    client
        .batch_execute(&setup::slot_sql(config, region, version))
        .await
        .with_context(|| {
            format!(
                "region {region}: creating replication slot {}",
                config.slot_name(region)
            )
        })?;
    if cat.slot_failover(&slot).await? == Some(false) {
        // made before PostgreSQL 17 (an upgrade) or by hand
        match crate::failover::make_failover_slot(setup_dsn, region, &slot).await {
            Ok(()) => println!(
                "region {region}: slot {slot} is now a failover slot (standbys with \
                 sync_replication_slots keep a copy)"
            ),
            Err(e) => println!(
                "region {region}: warning: slot {slot} is not a failover slot and could not be \
                 made one ({e}); stop the sidecar and run pgrelay setup again"
            ),
        }
    }
    Ok(lost)
}

/// The region's topics, created where missing: one per live destination
/// and per DR region (on the destination's cluster), and its dead-letter
/// topic (on its own).
async fn create_topics(config: &Config, region: &str) -> Result<()> {
    let timeout = Duration::from_secs(30);
    let live = config
        .regions
        .keys()
        .filter(|d| *d != region)
        .map(|d| (d.clone(), config.topic(region, d)));
    for (dest, topic) in live.chain(config.dr_topics(region)) {
        let dest = &dest;
        let created = kafka::create_topics(
            config.kafka_for(dest),
            std::slice::from_ref(&topic),
            config.capture.topic_partitions as i32,
            config.capture.topic_replication_factor,
            timeout,
        )
        .await
        .map_err(anyhow::Error::msg)?;
        println!(
            "region {region}: topic {topic} {}",
            if created.is_empty() {
                "exists"
            } else {
                "created"
            }
        );
    }
    let dlq = config.dlq_topic(region);
    let created = kafka::create_topics(
        config.kafka_for(region),
        std::slice::from_ref(&dlq),
        1,
        config.capture.topic_replication_factor,
        timeout,
    )
    .await
    .map_err(anyhow::Error::msg)?;
    println!(
        "region {region}: topic {dlq} {}",
        if created.is_empty() {
            "exists"
        } else {
            "created"
        }
    );
    Ok(())
}

/// `setup --start-at-end`: stores, for each partition of each incoming
/// topic that has no stored offset yet, the partition's end as the offset
/// to resume from, so the apply side of a region rebuilt from an empty
/// database does not read the whole history the topics hold (the resync
/// from every other region brings the rows, with their stamps: every
/// record skipped is a change of a row the resync sends as it is now, at
/// a stamp no older). Offsets already stored are never moved.
async fn start_incoming_at_end(
    config: &Config,
    region: &str,
    client: &tokio_postgres::Client,
    path: &Path,
) -> Result<()> {
    let cluster = config.kafka_for(region);
    let sources: Vec<&String> = config.regions.keys().filter(|s| *s != region).collect();
    for source in &sources {
        let topic = config.topic(source, region);
        let ends = kafka::partition_ends(cluster, &topic, kafka::METADATA_PATIENCE)
            .await
            .map_err(|e| anyhow::anyhow!("region {region}: reading where {topic} ends: {e}"))?;
        let (partitions, offsets): (Vec<i32>, Vec<i64>) = ends.into_iter().unzip();
        let stored = client
            .execute(
                "INSERT INTO pgrelay.offsets (topic, kafka_partition, next_offset) \
                 SELECT $1, p, o FROM unnest($2::int[], $3::bigint[]) AS u(p, o) \
                 ON CONFLICT (topic, kafka_partition) DO NOTHING",
                &[&topic, &partitions, &offsets],
            )
            .await
            .with_context(|| format!("region {region}: storing where {topic} ends"))?;
        let skipped: i64 = offsets.iter().sum();
        println!(
            "region {region}: apply starts {topic} at its end ({stored} of {} partition(s) \
             newly set; {skipped} record(s) written so far are not read)",
            partitions.len()
        );
    }
    let resyncs: Vec<String> = sources
        .iter()
        .map(|s| {
            format!(
                "pgrelay resync --config {} --region {s} --to {region}",
                path.display()
            )
        })
        .collect();
    println!(
        "region {region}: start its sidecar, then bring the rows from every other region: {}",
        resyncs.join("; ")
    );
    Ok(())
}

/// Grants the sidecar's run role what it lacks of what it needs
/// ([`privileges::needs`]). A grant the setup role may not give (the
/// replication-origin function, the parameter) is printed for a superuser.
pub async fn grant_run_role(
    config: &Config,
    region: &str,
    client: &tokio_postgres::Client,
    role: &str,
) -> Result<()> {
    let cat = Catalog { client, region };
    let quoted = crate::event::quote_ident(role);
    match cat.role(role).await? {
        None => bail!(
            "region {region}: role {role} (the sidecar's run role) does not exist; create it \
             first: CREATE ROLE {quoted} LOGIN REPLICATION PASSWORD '...'"
        ),
        Some((true, _)) => {
            println!(
                "region {region}: run role {role} is a superuser: nothing to grant (give the \
                 sidecar a role of its own: docs/security.md, Roles: least privilege)"
            );
            return Ok(());
        }
        Some((false, false)) => eprintln!(
            "warning: region {region}: run role {role} lacks the REPLICATION attribute; a \
             superuser runs: ALTER ROLE {quoted} REPLICATION"
        ),
        Some((false, true)) => {}
    }
    let parameters = cat.has_parameter_privileges().await?;
    let mut granted = 0;
    let mut refused = Vec::new();
    for need in privileges::needs(config, parameters) {
        let missing = cat.missing_privileges(&need, role).await?;
        if missing.is_empty() {
            continue;
        }
        let sql = need.grant(&missing, role);
        if let Err(e) = client.batch_execute(&sql).await {
            refused.push(format!("{sql} ({})", crate::source::pg_error::reason(&e)));
            continue;
        }
        // without the grant option PostgreSQL may only warn and grant nothing
        let still = cat.missing_privileges(&need, role).await?;
        if still.is_empty() {
            granted += 1;
        } else {
            refused.push(format!(
                "{} (the setup role lacks the grant option)",
                need.grant(&still, role)
            ));
        }
    }
    println!(
        "region {region}: run role {role}: {granted} grant(s) given, everything else held already"
    );
    if !refused.is_empty() {
        for r in &refused {
            eprintln!("error: region {region}: the setup role may not grant: {r}");
        }
        bail!(
            "region {region}: a superuser runs the GRANT statements above once, then run pgrelay \
             setup again"
        );
    }
    Ok(())
}

/// The head of a DDL statement, for the progress line.
fn statement_label(sql: &str) -> String {
    let head: String = sql.split_whitespace().collect::<Vec<_>>().join(" ");
    match head.char_indices().nth(60) {
        Some((i, _)) => format!("{}...", &head[..i]),
        None => head,
    }
}

/// Whether the extension offers every C function `setup` uses.
async fn extension_is_current(client: &tokio_postgres::Client) -> bool {
    client
        .query_one(
            "SELECT to_regprocedure('pgrelay.check_tombstone_c()') IS NOT NULL",
            &[],
        )
        .await
        .is_ok_and(|r| r.get::<_, bool>(0))
}

/// The stamp trigger `region` gets (`relay.capture.stamp_trigger`): the C one
/// where the `pgrelay` extension is installed on the server and can be
/// created in the database, else (unless `"c"` was asked for) PL/pgSQL.
async fn choose_stamp(
    config: &Config,
    region: &str,
    client: &tokio_postgres::Client,
) -> Result<setup::Stamp> {
    use crate::config::StampTrigger;
    if config.capture.stamp_trigger == StampTrigger::Plpgsql {
        return Ok(setup::Stamp::Plpgsql);
    }
    let available = client
        .query_opt(
            "SELECT 1 FROM pg_available_extensions WHERE name = $1",
            &[&setup::EXTENSION],
        )
        .await
        .with_context(|| format!("region {region}: reading pg_available_extensions"))?;
    // created already (by a superuser, once) and current: nothing to run,
    // which the setup role may not (ALTER EXTENSION wants its owner)
    let created = client
        .query_opt(
            "SELECT 1 FROM pg_extension WHERE extname = $1",
            &[&setup::EXTENSION],
        )
        .await
        .with_context(|| format!("region {region}: reading pg_extension"))?
        .is_some();
    if created && extension_is_current(client).await {
        return Ok(setup::Stamp::C);
    }
    let why_not = match available {
        Some(_) => match client.batch_execute(setup::CREATE_EXTENSION_SQL).await {
            Ok(()) if extension_is_current(client).await => return Ok(setup::Stamp::C),
            Ok(()) => "the pgrelay extension installed on this server predates this pgrelay \
                       (it lacks pgrelay.check_tombstone_c): install the current one (make -C \
                       extension install, see extension/README.md)"
                .to_string(),
            Err(e) => format!(
                "creating extension pgrelay failed ({}); a superuser can run: {}",
                crate::source::pg_error::reason(&e),
                setup::CREATE_EXTENSION_SQL
            ),
        },
        None => "the pgrelay extension is not installed on this server (make -C extension \
                 install, see extension/README.md)"
            .to_string(),
    };
    if config.capture.stamp_trigger == StampTrigger::C {
        bail!("region {region}: relay.capture.stamp_trigger = \"c\": {why_not}");
    }
    println!("region {region}: {why_not}; the PL/pgSQL stamp trigger is used");
    Ok(setup::Stamp::Plpgsql)
}
