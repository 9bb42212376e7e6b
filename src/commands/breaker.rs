//! `pgrelay breaker release|discard`: resolve what the blast-radius breaker
//! holds (see [`crate::apply::breaker`]).

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;

use super::load;
use crate::apply::breaker::{resolve, CLASS_DISCARDED};
use crate::config::Need;

/// Releases (`discard_until: None`) or discards (`Some(until)`, `"now"` by
/// default) the breaker of `source` in `region`.
pub async fn breaker(
    path: &Path,
    region: &str,
    source: &str,
    discard_until: Option<&str>,
) -> Result<ExitCode> {
    let config = load(path)?;
    config.region(region)?;
    config.require(&[Need::Database(region)])?;
    let r = resolve(&config, region, source, discard_until).await?;
    println!(
        "region {region}: breaker for changes from {source} {}: tripped {} ({})",
        if discard_until.is_some() {
            "discarded"
        } else {
            "released"
        },
        r.tripped_at,
        r.reason
    );
    match discard_until {
        None => println!(
            "changes {source} committed up to {} apply without being counted; counting starts again after them",
            r.until
        ),
        Some(_) => println!(
            "{} changes of {} that {source} committed up to {} go to {} (class {CLASS_DISCARDED}); the rest applies",
            r.kind,
            r.table,
            r.until,
            config.dlq_topic(region),
        ),
    }
    Ok(ExitCode::SUCCESS)
}
