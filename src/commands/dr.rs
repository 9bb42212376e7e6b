//! `pgrelay dr restore`: a rebuilt region's rows, back from the sealed
//! copies another region keeps (see `crate::dr`).

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;

use super::load;
use crate::apply::restore::restore as run_restore;
use crate::config::Need;

/// Exit status: 0 when every copy was restored (or the region held it
/// already), 1 when some could not be (each named: altered, not matching its
/// vault row, refused by the table), 3 when the only copies left are sealed
/// under key ids the config does not give (add them to `dr_old_keys`), 2 on
/// an error that stopped the restore (run it again once fixed: it resumes).
pub async fn restore(path: &Path, region: &str, from: &str) -> Result<ExitCode> {
    match run(path, region, from).await {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!("error: {}", crate::source::pg_error::chain(e.as_ref()));
            Ok(ExitCode::from(2))
        }
    }
}

async fn run(path: &Path, region: &str, from: &str) -> Result<ExitCode> {
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
        Need::DrOldKeys(region),
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
        r.not_restored()
    );
    for (table, n) in &r.tables {
        println!("  {table}: {n} copies opened");
    }
    for (id, n) in &r.keys {
        println!("  DR key {id}: {n} copies opened");
    }
    for (id, n) in &r.unknown_keys {
        println!(
            "  failed: {n} copies sealed with DR key id {id}, which regions.{region} has neither \
             as dr_key_id nor in dr_old_keys: add that key as dr_old_keys.{id} and run the \
             restore again"
        );
    }
    for f in &r.failed {
        println!("  failed: {f}");
    }
    Ok(if !r.failed.is_empty() {
        ExitCode::FAILURE
    } else if !r.unknown_keys.is_empty() {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}
