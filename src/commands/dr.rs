//! `pgrelay dr restore`: a rebuilt region's rows, back from the sealed
//! copies another region keeps (see `crate::dr`).

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;

use super::load;
use crate::apply::restore::restore as run_restore;
use crate::config::Need;

pub async fn restore(path: &Path, region: &str, from: &str) -> Result<ExitCode> {
    let config = load(path)?;
    config.region(region)?;
    config.region(from)?;
    if !config.dr_homes(from).iter().any(|h| h == region) {
        anyhow::bail!(
            "no table keeps DR copies of region {region} in {from}: name it in a table's dr list \
             (dr = [\"{from}\"])"
        );
    }
    config.require(&[
        Need::Database(region),
        Need::Database(from),
        Need::Kafka(region),
        Need::DrKey(region),
    ])?;
    let mut progress = crate::progress::Progress::start(
        &format!("dr restore {region} from {from}"),
        "copies",
        None,
    );
    let r = run_restore(&config, region, from, &mut progress).await?;
    println!(
        "region {region}: {} sealed copies in {from}'s vault: {} written, {} already current, {} failed",
        r.copies,
        r.written,
        r.current,
        r.failed.len()
    );
    for (table, n) in &r.tables {
        println!("  {table}: {n} copies opened");
    }
    for f in &r.failed {
        println!("  failed: {f}");
    }
    Ok(if r.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
