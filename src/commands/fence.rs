//! `pgrelay fence` / `pgrelay unfence`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;

use super::load;
use crate::config::Need;
use crate::fence::Outcome;

/// `fence` (`reason` is `Some`, its content optional) or `unfence`
/// (`reason` is `None`).
pub async fn fence(
    path: &Path,
    region: &str,
    dsn: Option<String>,
    reason: Option<Option<String>>,
) -> Result<ExitCode> {
    let config = load(path)?;
    let region_cfg = config.region(region)?;
    let dsn = match dsn {
        Some(dsn) => dsn,
        None => {
            config.require(&[Need::SetupDatabase(region)])?;
            region_cfg.setup_dsn().to_string()
        }
    };
    let outcome = crate::fence::set(
        &config,
        region,
        &dsn,
        reason.is_some(),
        reason.flatten().as_deref(),
    )
    .await?;
    println!(
        "region {region}: {}",
        match outcome {
            Outcome::Fenced =>
                "fenced: local writes to replicated tables are refused, applied changes still land",
            Outcome::AlreadyFenced => "already fenced",
            Outcome::Unfenced => "unfenced: local writes are allowed again",
            Outcome::WasNotFenced => "was not fenced",
        }
    );
    Ok(ExitCode::SUCCESS)
}
