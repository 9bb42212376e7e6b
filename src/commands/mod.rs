//! One module per command: each takes the config path and its arguments,
//! prints what it did, and returns the process exit code. `pgrelay run`
//! lives in [`crate::sidecar`].

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;

use crate::config::{self, Config, Need};

pub mod breaker;
pub mod check;
pub mod conflicts;
pub mod dlq;
pub mod dr;
pub mod fence;
pub mod repair;
pub mod resync;
pub mod setup;
pub mod status;
pub mod verify;

pub(crate) fn load(path: &Path) -> Result<Arc<Config>> {
    Ok(Arc::new(config::load(path)?))
}

/// Every Kafka cluster: the one serving `region` and those of the regions
/// it sends to.
pub(crate) fn all_clusters(config: &Config) -> Vec<Need<'_>> {
    config.regions.keys().map(|r| Need::Kafka(r)).collect()
}
