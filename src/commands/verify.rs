//! `pgrelay verify`: compare every region with what the policy says it must
//! hold. Exit 0 when every region agrees, 1 when differences were found, 2
//! on error (the config, a database, a table whose shape differs).

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;

use super::load;
use crate::config::Need;
use crate::event::TableName;
use crate::verify::sql::BucketDigest;
use crate::verify::{report, run};

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
    if args.json {
        println!("{}", report::json(&result, args.show_keys));
    } else {
        print!("{}", report::text(&result, args.show_keys));
    }
    Ok(if result.agrees() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
