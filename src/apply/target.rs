//! The target's table definitions, read from its catalog, and which
//! records each table admits.

use tokio_postgres::Client;

use crate::config::{Config, TableClass};
use crate::source::catalog::Catalog;

use super::error::ApplyError;
use super::record;
use super::record::{TargetTable, Targets};

/// The declared, non-local tables as they exist in the target database.
pub async fn load_targets(
    config: &Config,
    region: &str,
    client: &Client,
) -> Result<Targets, ApplyError> {
    let cat = Catalog { client, region };
    let mut targets = Targets::new();
    for t in &config.tables {
        if matches!(t.class, TableClass::Local) {
            continue;
        }
        let state = cat
            .table(&t.name)
            .await
            .map_err(|e| ApplyError::transient("", e))?;
        if !state.exists {
            return Err(ApplyError::setup_table(
                &t.name,
                format!(
                    "region {region}: declared table {} does not exist; create it, then run pgrelay setup",
                    t.name
                ),
            ));
        }
        if state.primary_key.is_empty() {
            return Err(ApplyError::setup_table(
                &t.name,
                format!("region {region}: table {} has no primary key", t.name),
            ));
        }
        if !state.has_stamp_column {
            return Err(ApplyError::setup_table(
                &t.name,
                format!(
                    "region {region}: table {} lacks pgrelay's stamp column; run pgrelay setup",
                    t.name
                ),
            ));
        }
        targets.insert(
            t.name.to_string(),
            TargetTable {
                name: t.name.clone(),
                key: state.primary_key,
                columns: state.columns,
                column_types: state.column_types,
                json_columns: state.json_columns,
                admit: admission(config, region, &t.class),
                merge: t.merge.iter().map(|m| (m.column.clone(), m.kind)).collect(),
            },
        );
    }
    Ok(targets)
}

/// What `region` accepts of a table of class `class` (see [`record::Admit`]).
fn admission(config: &Config, region: &str, class: &TableClass) -> record::Admit {
    match class {
        TableClass::Owned { owner } => record::Admit::Owner(owner.clone()),
        TableClass::Partitioned {
            home_column,
            aliases,
            allow,
        } => {
            let mut homes: std::collections::HashMap<String, String> = config
                .regions
                .keys()
                .map(|r| (r.clone(), r.clone()))
                .collect();
            homes.extend(aliases.iter().map(|(v, r)| (v.clone(), r.clone())));
            let allowed = config
                .regions
                .keys()
                .filter(|home| {
                    *home == region || allow.get(*home).is_some_and(|a| a.contains(region))
                })
                .cloned()
                .collect();
            record::Admit::Homes {
                column: home_column.clone(),
                homes,
                allowed,
            }
        }
        _ => record::Admit::Any,
    }
}
