//! `pgrelay repair`: a restored backup's version of the rows a bug changed
//! (see [`crate::repair`]).

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;

use super::load;
use crate::config::Need;
use crate::event::TableName;

#[allow(clippy::too_many_arguments)]
pub async fn repair(
    path: &Path,
    region: &str,
    backup: &str,
    tables: &[String],
    since: Option<String>,
    origin: Option<String>,
    include_others: bool,
    dry_run: bool,
) -> Result<ExitCode> {
    let config = load(path)?;
    config.region(region)?;
    config.require(&[Need::Database(region)])?;
    let tables = tables
        .iter()
        .map(|t| TableName::parse(t).map_err(anyhow::Error::msg))
        .collect::<Result<Vec<_>>>()?;
    let opts = crate::repair::Options {
        tables,
        since,
        origin,
        include_others,
        dry_run,
    };
    let mut progress = crate::progress::Progress::start(&format!("repair {region}"), "rows", None);
    let reports = crate::repair::run(&config, region, backup, &opts, &mut progress)
        .await
        .map_err(anyhow::Error::msg)?;
    print!("{}", crate::repair::render(&reports, region, dry_run));
    if dry_run {
        println!("region {region}: dry run, nothing written");
    }
    Ok(ExitCode::SUCCESS)
}
