//! `pgrelay verify`: compare every region with what the policy says it must
//! hold, and with `--repair` fix what differs. Exit 0 when every region
//! agrees, 1 when differences were found (repaired or not), 2 on error (the
//! config, a database, a table whose shape differs, a repair step failed).

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;

use super::load;
use crate::config::Need;
use crate::event::TableName;
use crate::verify::sql::BucketDigest;
use crate::verify::{fix, plan, report, run};

/// How bucket sums digest rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Digest {
    Fast,
    Sha256,
}

/// What the command line asks for.
pub struct Args {
    pub digest: Digest,
    pub regions: Vec<String>,
    pub tables: Vec<String>,
    pub json: bool,
    pub show_keys: bool,
    pub rate: Option<u64>,
    pub rounds: u32,
    pub wait: Duration,
    pub window: Duration,
    /// Fix what was found (`--repair`); with `dry_run`, only say how.
    pub repair: bool,
    pub dry_run: bool,
}

pub async fn verify(path: &Path, args: Args) -> Result<ExitCode> {
    match compare(path, &args).await {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!("error: {}", crate::source::pg_error::chain(e.as_ref()));
            Ok(ExitCode::from(2))
        }
    }
}

async fn compare(path: &Path, args: &Args) -> Result<ExitCode> {
    let config = load(path)?;
    let regions: Vec<String> = if args.regions.is_empty() {
        config.regions.keys().cloned().collect()
    } else {
        args.regions.clone()
    };
    for r in &regions {
        config.region(r)?;
    }
    let needs: Vec<Need> = regions.iter().map(|r| Need::Database(r)).collect();
    config.require(&needs)?;
    let tables = args
        .tables
        .iter()
        .map(|t| TableName::parse(t).map_err(anyhow::Error::msg))
        .collect::<Result<Vec<_>>>()?;
    for t in &tables {
        if config.replicated_tables().all(|c| c.name != *t) {
            anyhow::bail!("table {t} is not a replicated table of {}", config.origin);
        }
    }
    let opts = run::Options {
        regions,
        tables,
        rate: args.rate,
        rounds: args.rounds,
        wait: args.wait,
        window: args.window,
        digest: match args.digest {
            Digest::Fast => BucketDigest::Fast,
            Digest::Sha256 => BucketDigest::Sha256,
        },
        ..run::Options::default()
    };
    let result = run::run(&config, &opts).await?;
    let steps = if args.repair {
        plan::plan(&config, &result, &opts.regions)
    } else {
        Vec::new()
    };
    let outcomes = if args.repair && !args.dry_run && !steps.is_empty() {
        // the senders' hash keys and the destinations' clusters
        let mut needs: Vec<Need> = Vec::new();
        for step in &steps {
            if let Some(from) = &step.from {
                needs.push(Need::HashKey(from));
                needs.push(Need::Kafka(&step.to));
            }
        }
        config.require(&needs)?;
        Some(fix::carry_out(&config, &steps).await)
    } else {
        None
    };
    if args.json {
        let mut out = report::json(&result, args.show_keys);
        if args.repair {
            out["repair"] = report::repair_json(&steps, outcomes.as_deref(), args.show_keys);
        }
        println!("{out}");
    } else {
        print!("{}", report::text(&result, args.show_keys));
        print!(
            "{}",
            report::repair_text(&steps, outcomes.as_deref(), args.show_keys)
        );
    }
    let failed = outcomes.iter().flatten().any(|o| o.error.is_some());
    Ok(if failed {
        ExitCode::from(2)
    } else if result.agrees() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
