//! `pgrelay status`: one line per region pair.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;

use super::{all_clusters, load};
use crate::config::Need;

pub async fn status(path: &Path, json: bool) -> Result<ExitCode> {
    let config = load(path)?;
    let mut needs: Vec<Need> = config.regions.keys().map(|r| Need::Database(r)).collect();
    needs.extend(all_clusters(&config));
    config.require(&needs)?;
    let rows = crate::status::collect(&config).await;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", crate::status::render(&rows));
    }
    if rows.iter().any(|r| r.state == "failed") {
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}
