//! `pgrelay`: command-line parsing, logging, and dispatch to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use pgrelay::commands::{
    breaker, check, conflicts, dlq, dr, fence, repair, resync, setup, status, verify,
};
use pgrelay::sidecar::{self, Role};

/// mimalloc: the capture and apply paths allocate and free small buffers
/// per row, often on different threads (librdkafka's), where it is
/// markedly cheaper than the system allocator. Built with `override`, it is
/// also `malloc` and `free` for the C code in the process (librdkafka's
/// per-record messages and headers, libc, OpenSSL): one allocator for all.
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
        /// A region rebuilt from an empty database: its apply side starts each
        /// incoming topic where it ends now, instead of reading the whole
        /// history there; `pgrelay resync --to REGION` from every other region
        /// then brings the rows. Only where no offset is stored yet.
        #[arg(long)]
        start_at_end: bool,
    },
    /// Per region pair: source and confirmed LSN, lag, apply watermark, dead letters, state.
    Status {
        #[arg(long)]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Refresh every SECONDS (default 2) until interrupted: in place on
        /// a terminal, one table after another otherwise.
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
        watch: Option<u64>,
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
        /// Sessions reading a table at once, each a range of its blocks
        /// under one snapshot, each with its own Kafka producer.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
        jobs: u16,
    },
    /// Refuse local writes to every replicated table of a region (split
    /// brain: an old primary that came back); applied changes still land.
    Fence {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        region: String,
        /// Connect here instead of the region's setup_dsn (e.g. the old
        /// primary, which the region's DSN no longer reaches).
        #[arg(long)]
        dsn: Option<String>,
        /// Why, recorded with the fence and shown in errors and status.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Lift `pgrelay fence`.
    Unfence {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        region: String,
        #[arg(long)]
        dsn: Option<String>,
    },
    /// Compare every region with what the residency policy says it must
    /// hold (missing, extra, diverged and leaked rows), online: rows still
    /// in flight are looked at again, not reported. Exit 0 when every
    /// region agrees, 1 on differences, 2 on error.
    Verify {
        #[arg(long)]
        config: PathBuf,
        /// Only these regions (repeatable; default: every region). With
        /// one, only its own leak checks run.
        #[arg(long)]
        region: Vec<String>,
        /// Only these tables, `schema.table` (repeatable; default: every
        /// replicated table).
        #[arg(long)]
        table: Vec<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Print the primary keys of the differences (never other values).
        #[arg(long)]
        show_keys: bool,
        /// Read at most this many rows per second in each region.
        #[arg(long, value_name = "ROWS_PER_S")]
        rate: Option<u64>,
        /// How many times a suspect key is looked at again before it is
        /// left as still in flight.
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        /// Seconds between those looks.
        #[arg(long, value_name = "SECONDS", default_value_t = 2.0)]
        wait: f64,
        /// A version older than this (seconds) that a region still lacks is
        /// a difference even if not yet delivered: that region is behind.
        #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
        window: f64,
        /// How bucket sums digest rows: `fast` (a seeded 64-bit hash) or
        /// `sha256` (keyed, as per-row digests always are; slower).
        #[arg(long, value_enum, default_value_t = verify::Digest::Fast)]
        digest: verify::Digest,
        /// Fix each difference found: the region holding the version that
        /// must win sends it again; leaked rows and values are removed.
        #[arg(long)]
        repair: bool,
        /// With --repair: print what it would do, change nothing.
        #[arg(long, requires = "repair")]
        dry_run: bool,
    },
    /// Inspect or replay the dead-letter topic of a region.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Write a restored backup's version of the rows a bug changed since a
    /// time, freshly stamped so it wins in every region; rows changed since
    /// by other regions are listed and left alone.
    Repair {
        #[arg(long)]
        config: PathBuf,
        /// The region to write the repair in (it replicates from there).
        #[arg(long)]
        region: String,
        /// Connection string of the restored backup (a copy of the region's
        /// database from before the corruption).
        #[arg(long = "from")]
        backup: String,
        /// Only these tables, `schema.table` (repeatable; default: every
        /// replicated table).
        #[arg(long)]
        table: Vec<String>,
        /// Rows whose current version was written at or after this time
        /// (PostgreSQL's timestamptz syntax; default: every stamped row).
        #[arg(long)]
        since: Option<String>,
        /// Only versions this region wrote; others are listed and left.
        #[arg(long)]
        origin: Option<String>,
        /// Repair versions other regions wrote since, too.
        #[arg(long)]
        include_others: bool,
        /// Compare and report, write nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Encrypted disaster-recovery copies.
    Dr {
        #[command(subcommand)]
        action: DrAction,
    },
    /// Apply or park what the blast-radius breaker holds.
    Breaker {
        #[command(subcommand)]
        action: BreakerAction,
    },
    /// The region's conflict log: incoming changes that lost to a newer version.
    Conflicts {
        #[command(subcommand)]
        action: ConflictsAction,
    },
}

#[derive(Subcommand)]
enum ConflictsAction {
    /// Print the conflict log, oldest first.
    List {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        region: String,
        /// Only this table (`schema.table`).
        #[arg(long)]
        table: Option<String>,
        /// Only entries recorded since: a duration back (`2h`) or a timestamp.
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        limit: Option<usize>,
    },
}

#[derive(Subcommand)]
enum DrAction {
    /// Rebuild a region's rows from the sealed copies another region keeps
    /// (after `setup` on the rebuilt, empty database; needs the region's
    /// dr_key). Idempotent: run it again to resume.
    Restore {
        #[arg(long)]
        config: PathBuf,
        /// The region to restore (whose key opens the copies).
        #[arg(long)]
        region: String,
        /// The region holding the copies.
        #[arg(long)]
        from: String,
    },
}

#[derive(Subcommand)]
enum BreakerAction {
    /// Apply the held changes: what the source committed until now passes
    /// uncounted, then counting starts again.
    Release {
        #[arg(long)]
        config: PathBuf,
        /// The destination region whose breaker tripped.
        #[arg(long)]
        region: String,
        /// The source region whose changes it holds.
        #[arg(long)]
        source: String,
    },
    /// Park the storm's changes (the tripped table and kind of change,
    /// committed up to --until) in the dead-letter topic; apply the rest.
    Discard {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        region: String,
        #[arg(long)]
        source: String,
        /// A time PostgreSQL reads (`2026-12-04 16:40:00+00`; default: now).
        #[arg(long)]
        until: Option<String>,
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

fn main() -> ExitCode {
    init_logging();
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
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            // the error and its causes, each shown once
            eprintln!("error: {}", pgrelay::source::pg_error::chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr, filtered by `PGRELAY_LOG` (default `info`), coloured
/// only on a terminal without `NO_COLOR`.
fn init_logging() {
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
}

/// Runs a subcommand: one arm each, handing its arguments to the module
/// that owns it (long only because the commands are many).
async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run {
            config,
            region,
            role,
        } => sidecar::run(&config, &region, role).await,
        Command::Check { config, region } => check::check(&config, region.as_deref()).await,
        Command::Setup {
            config,
            region,
            start_at_end,
        } => setup::setup(&config, &region, start_at_end).await,
        Command::Verify {
            config,
            region,
            table,
            json,
            show_keys,
            rate,
            rounds,
            wait,
            window,
            digest,
            repair,
            dry_run,
        } => {
            let args = verify::Args {
                digest,
                regions: region,
                tables: table,
                json,
                show_keys,
                rate,
                rounds,
                wait: std::time::Duration::from_secs_f64(wait.max(0.0)),
                window: std::time::Duration::from_secs_f64(window.max(0.0)),
                repair,
                dry_run,
            };
            verify::verify(&config, args).await
        }
        Command::Dlq { action } => match action {
            DlqAction::List {
                config,
                region,
                limit,
            } => dlq::list(&config, &region, limit).await,
            DlqAction::Replay {
                config,
                region,
                dry_run,
                limit,
            } => dlq::replay(&config, &region, dry_run, limit).await,
        },
        Command::Resync {
            config,
            region,
            to,
            table,
            dry_run,
            jobs,
        } => resync::resync(&config, &region, to, &table, dry_run, jobs.into()).await,
        Command::Status {
            config,
            json,
            watch,
        } => status::status(&config, json, watch).await,
        Command::Repair {
            config,
            region,
            backup,
            table,
            since,
            origin,
            include_others,
            dry_run,
        } => {
            repair::repair(
                &config,
                &region,
                &backup,
                &table,
                since,
                origin,
                include_others,
                dry_run,
            )
            .await
        }
        Command::Conflicts {
            action:
                ConflictsAction::List {
                    config,
                    region,
                    table,
                    since,
                    limit,
                },
        } => {
            let filter = pgrelay::conflicts::Filter {
                table,
                since,
                limit,
            };
            conflicts::list(&config, &region, &filter).await
        }
        Command::Dr {
            action:
                DrAction::Restore {
                    config,
                    region,
                    from,
                },
        } => dr::restore(&config, &region, &from).await,
        Command::Breaker { action } => match action {
            BreakerAction::Release {
                config,
                region,
                source,
            } => breaker::breaker(&config, &region, &source, None).await,
            BreakerAction::Discard {
                config,
                region,
                source,
                until,
            } => {
                let until = until.unwrap_or_else(|| "now".into());
                breaker::breaker(&config, &region, &source, Some(&until)).await
            }
        },
        Command::Fence {
            config,
            region,
            dsn,
            reason,
        } => fence::fence(&config, &region, dsn, Some(reason)).await,
        Command::Unfence {
            config,
            region,
            dsn,
        } => fence::fence(&config, &region, dsn, None).await,
    }
}
