//! `pgrelay`: command-line parsing, logging, and dispatch to the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use tokio::sync::watch;

use pgrelay::check::{self, Severity};
use pgrelay::config::{self, Config, Need, TableClass};
use pgrelay::event::TableName;
use pgrelay::http::{self, Readiness};
use pgrelay::metrics::Metrics;
use pgrelay::source::catalog::{self, Catalog};
use pgrelay::{apply, capture, kafka, privileges, residency, setup};

/// mimalloc: the capture and apply paths allocate and free small buffers
/// per row, often on different threads (librdkafka's), where it is
/// markedly cheaper than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "pgrelay",
    version,
    about = "Multi-region Postgres replication through Kafka, with data-residency rules"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar for one region.
    Run {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        region: String,
        /// Which side to run (default: both).
        #[arg(long, value_enum, default_value_t = Role::All)]
        role: Role,
    },
    /// Validate the config and each database and Kafka cluster; print the residency matrix.
    Check {
        #[arg(long)]
        config: PathBuf,
        /// Check only this region (default: every region).
        #[arg(long)]
        region: Option<String>,
    },
    /// Create the publication, slot, metadata schema, triggers and topics (idempotent).
    Setup {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        region: String,
    },
    /// Per region pair: source and confirmed LSN, lag, apply watermark, dead letters, state.
    Status {
        #[arg(long)]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Send a region's current rows (and tombstones) again, with their own
    /// stamps: rows that predate setup, a new region, a lost slot. Safe
    /// while the sidecars run; idempotent.
    Resync {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        region: String,
        /// Only to these destination regions (repeatable; default: all).
        #[arg(long)]
        to: Vec<String>,
        /// Only these tables, `schema.table` (repeatable; default: every
        /// replicated table).
        #[arg(long)]
        table: Vec<String>,
        /// Read and route everything, send nothing: print what would go.
        #[arg(long)]
        dry_run: bool,
    },
    /// Inspect or replay the dead-letter topic of a region.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
}

#[derive(Subcommand)]
enum DlqAction {
    /// Show what is parked and why.
    List {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        region: String,
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Re-apply parked records (resumable, idempotent).
    Replay {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        region: String,
        /// Try each record and roll back: report what would happen.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        limit: Option<usize>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Role {
    All,
    Capture,
    Apply,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PGRELAY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        )
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run {
                config,
                region,
                role,
            } => run(&config, &region, role).await,
            Command::Check { config, region } => check(&config, region.as_deref()).await,
            Command::Setup { config, region } => setup(&config, &region).await,
            Command::Dlq { action } => dlq(action).await,
            Command::Resync {
                config,
                region,
                to,
                table,
                dry_run,
            } => resync(&config, &region, to, &table, dry_run).await,
            Command::Status { config, json } => status(&config, json).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(path: &Path) -> Result<Arc<Config>> {
    Ok(Arc::new(config::load(path)?))
}

/// Every Kafka cluster: the one serving `region` and those of the regions
/// it sends to.
fn all_clusters(config: &Config) -> Vec<Need<'_>> {
    config.regions.keys().map(|r| Need::Kafka(r)).collect()
}

async fn setup(path: &Path, region: &str) -> Result<ExitCode> {
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
    let keys = cat.keys(&config).await?;
    let statements = setup::plan(&config, region, &|t| {
        keys.get(t).cloned().unwrap_or_default()
    });
    let tx = client
        .transaction()
        .await
        .context("starting the setup transaction")?;
    for sql in &statements {
        tx.batch_execute(sql)
            .await
            .with_context(|| format!("region {region}: setup statement failed: {sql}"))?;
    }
    tx.commit().await.context("committing setup")?;
    if let Some(role) = region_cfg.grantee() {
        grant_run_role(&config, region, &client, &role).await?;
    }
    let slot = config.slot_name(region);
    let cat = Catalog {
        client: &client,
        region,
    };
    let lost = cat.slot(&slot).await?.is_some_and(|s| s.is_lost());
    if lost {
        // an invalidated slot can never stream again: replace it
        client
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
            .with_context(|| format!("region {region}: dropping the lost slot {slot}"))?;
    }
    client
        .batch_execute(&setup::slot_sql(&config, region))
        .await
        .with_context(|| {
            format!(
                "region {region}: creating replication slot {}",
                config.slot_name(region)
            )
        })?;
    println!(
        "region {region}: database ready (schema pgrelay, {} replicated tables, publication {}, slot {})",
        config
            .tables
            .iter()
            .filter(|t| !matches!(t.class, TableClass::Local))
            .count(),
        config.publication_name(),
        config.slot_name(region)
    );
    if lost {
        println!(
            "region {region}: slot {slot} had been invalidated by PostgreSQL (wal_status lost) and was \
             created anew; what was written while it was lost has not reached the other regions: \
             run pgrelay resync --config {} --region {region}",
            path.display()
        );
    }
    let timeout = Duration::from_secs(30);
    for dest in config.regions.keys().filter(|d| *d != region) {
        let topic = config.topic(region, dest);
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
    Ok(ExitCode::SUCCESS)
}

/// Grants the sidecar's run role what it lacks of what it needs
/// ([`privileges::needs`]). A grant the setup role may not give (the
/// replication-origin function, the parameter) is printed for a superuser.
async fn grant_run_role(
    config: &Config,
    region: &str,
    client: &tokio_postgres::Client,
    role: &str,
) -> Result<()> {
    let cat = Catalog { client, region };
    let quoted = pgrelay::event::quote_ident(role);
    match cat.role(role).await? {
        None => bail!(
            "region {region}: role {role} (the sidecar's run role) does not exist; create it \
             first: CREATE ROLE {quoted} LOGIN REPLICATION PASSWORD '...'"
        ),
        Some((true, _)) => {
            println!(
                "region {region}: run role {role} is a superuser: nothing to grant (give the \
                 sidecar a role of its own: README, Security)"
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
            refused.push(format!("{sql} ({})", pgrelay::source::pg_error::reason(&e)));
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

async fn check(path: &Path, only: Option<&str>) -> Result<ExitCode> {
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

async fn run(path: &Path, region: &str, role: Role) -> Result<ExitCode> {
    let config = load(path)?;
    config.region(region)?;
    let (with_capture, with_apply) = match role {
        Role::All => (true, true),
        Role::Capture => (true, false),
        Role::Apply => (false, true),
    };
    // only this region's secrets (and the clusters it uses) must be set
    config.require(&config.run_needs(region, with_capture, with_apply))?;
    let metrics = Arc::new(Metrics::new());
    let readiness = Arc::new(Readiness::default());
    readiness
        .wants_capture
        .store(with_capture, Ordering::Relaxed);
    readiness.wants_apply.store(with_apply, Ordering::Relaxed);
    let (shutdown_tx, shutdown) = watch::channel(false);
    if let Some(addr) = &config.http.listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (http.listen)"))?;
        let state = http::State {
            metrics: metrics.clone(),
            readiness: readiness.clone(),
            token: config.http.token.clone(),
        };
        tokio::spawn(http::serve(
            listener,
            state,
            http::Limits::default(),
            shutdown.clone(),
        ));
    }
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested, draining");
        let _ = shutdown_tx.send(true);
    });

    {
        let (config, region, metrics, mut shutdown) = (
            config.clone(),
            region.to_string(),
            metrics.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            loop {
                pgrelay::status::export_local(&config, &region, &metrics).await;
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        });
    }
    tokio::spawn(apply::horizon::keep(
        config.clone(),
        region.to_string(),
        shutdown.clone(),
    ));
    let deadline = Instant::now() + config.startup_timeout;
    loop {
        let result: Result<(), (bool, String)> = async {
            if with_capture {
                capture::preflight(&config, region).await.map_err(|e| {
                    (
                        matches!(e, capture::CaptureError::Unreachable(_)),
                        e.to_string(),
                    )
                })?;
            }
            if with_apply {
                apply::preflight(&config, region).await.map_err(|e| {
                    (
                        matches!(e, apply::ApplyError::Unreachable(_)),
                        e.to_string(),
                    )
                })?;
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => break,
            Err((true, e)) if Instant::now() < deadline => {
                tracing::warn!(region, error = %e, "not reachable yet, retrying (relay.startup_timeout)");
                let mut shutdown = shutdown.clone();
                tokio::select! {
                    _ = shutdown.changed() => return Ok(ExitCode::SUCCESS),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
            Err((_, e)) => bail!("{e}"),
        }
    }
    let mut sides = tokio::task::JoinSet::new();
    if with_capture {
        sides.spawn(supervise(
            Side::Capture,
            config.clone(),
            region.to_string(),
            metrics.clone(),
            readiness.clone(),
            shutdown.clone(),
        ));
    }
    if with_apply {
        sides.spawn(supervise(
            Side::Apply,
            config.clone(),
            region.to_string(),
            metrics.clone(),
            readiness.clone(),
            shutdown.clone(),
        ));
    }
    let mut result = Ok(());
    while let Some(joined) = sides.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                if result.is_ok() {
                    result = Err(e);
                }
                sides.abort_all();
            }
            Err(e) if e.is_cancelled() => {}
            Err(e) => bail!("a side of the sidecar panicked: {e}"),
        }
    }
    result?;
    Ok(ExitCode::SUCCESS)
}

async fn status(path: &Path, json: bool) -> Result<ExitCode> {
    let config = load(path)?;
    let mut needs: Vec<Need> = config.regions.keys().map(|r| Need::Database(r)).collect();
    needs.extend(all_clusters(&config));
    config.require(&needs)?;
    let rows = pgrelay::status::collect(&config).await;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", pgrelay::status::render(&rows));
    }
    if rows.iter().any(|r| r.state == "failed") {
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}

async fn resync(
    path: &Path,
    region: &str,
    to: Vec<String>,
    tables: &[String],
    dry_run: bool,
) -> Result<ExitCode> {
    let config = load(path)?;
    config.region(region)?;
    let mut needs = vec![Need::Database(region), Need::HashKey(region)];
    needs.extend(all_clusters(&config));
    config.require(&needs)?;
    let tables = tables
        .iter()
        .map(|t| TableName::parse(t).map_err(anyhow::Error::msg))
        .collect::<Result<Vec<_>>>()?;
    let opts = pgrelay::resync::Options {
        to,
        tables,
        dry_run,
    };
    let summary = pgrelay::resync::run(&config, region, &opts).await?;
    print!("{}", pgrelay::resync::render(&summary));
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

async fn dlq(action: DlqAction) -> Result<ExitCode> {
    match action {
        DlqAction::List {
            config,
            region,
            limit,
        } => {
            let config = load(&config)?;
            config.region(&region)?;
            config.require(&[Need::Kafka(&region)])?;
            let letters = apply::dlq::read(
                &config,
                &region,
                &Default::default(),
                limit,
                Duration::from_secs(2),
            )?;
            // `dlq replay` stores how far it got, per partition, in the
            // region's database: what is below that was replayed
            let dlq_topic = config.dlq_topic(&region);
            let replayed_below = match pgrelay::source::catalog::connect(
                &config.regions[&region].dsn,
                &region,
            )
            .await
            {
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
        DlqAction::Replay {
            config,
            region,
            dry_run,
            limit,
        } => {
            let config = load(&config)?;
            config.region(&region)?;
            config.require(&[Need::Database(&region), Need::Kafka(&region)])?;
            let results = apply::replay::replay(&config, &region, dry_run, limit).await?;
            let failed = results.iter().filter(|r| r.failure.is_some()).count();
            for r in &results {
                match &r.failure {
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
                "{} record(s) {}, {failed} {}",
                results.len() - failed,
                if dry_run { "would apply" } else { "applied" },
                if dry_run {
                    "would fail"
                } else {
                    "parked again"
                }
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[derive(Clone, Copy)]
enum Side {
    Capture,
    Apply,
}

/// Runs one side, restarting it with backoff after transient failures.
async fn supervise(
    side: Side,
    config: Arc<Config>,
    region: String,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let mut backoff = Duration::from_millis(500);
    let (name, flag) = match side {
        Side::Capture => ("capture", &readiness.capture),
        Side::Apply => ("apply", &readiness.apply),
    };
    loop {
        let started = Instant::now();
        flag.store(true, Ordering::Relaxed);
        let result: Result<(), (bool, String)> = match side {
            Side::Capture => capture::run(
                config.clone(),
                region.clone(),
                metrics.clone(),
                shutdown.clone(),
            )
            .await
            .map_err(|e| (e.is_transient(), e.to_string())),
            Side::Apply => apply::run(
                config.clone(),
                region.clone(),
                metrics.clone(),
                shutdown.clone(),
            )
            .await
            .map_err(|e| (e.is_transient(), e.to_string())),
        };
        flag.store(false, Ordering::Relaxed);
        match result {
            Ok(()) => return Ok(()),
            Err((true, e)) => {
                metrics.add(
                    "pgrelay_restarts_total",
                    "Runs of a side ended by a transient failure",
                    &[("region", &region), ("side", name)],
                    1,
                );
                if started.elapsed() > Duration::from_secs(60) {
                    backoff = Duration::from_millis(500);
                }
                tracing::warn!(region = %region, side = name, error = %e, retry_in = ?backoff, "side failed, restarting");
                tokio::select! {
                    _ = shutdown.changed() => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
            Err((false, e)) => bail!("{e}"),
        }
    }
}
