//! `pgrelay conflicts list`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;

use super::load;
use crate::config::Need;
use crate::conflicts::{self, Filter};

/// `conflicts list`: the region's conflict log, oldest first.
pub async fn list(path: &Path, region: &str, filter: &Filter) -> Result<ExitCode> {
    let config = load(path)?;
    config.region(region)?;
    config.require(&[Need::Database(region)])?;
    let client = crate::source::catalog::connect(&config.regions[region].dsn, region).await?;
    let entries = conflicts::list(&client, filter)
        .await
        .map_err(anyhow::Error::msg)?;
    println!("{} conflict(s) in region {region}", entries.len());
    for c in &entries {
        println!("{}", conflicts::format(c));
    }
    Ok(ExitCode::SUCCESS)
}
