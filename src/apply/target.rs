//! The target's table definitions, read from its catalog, and which
//! records each table admits.
//!
//! A record may carry a column its target lacks for two reasons: the column
//! was added in the source and not here yet (the record waits for it, see
//! `pipeline`), or it was dropped here while records written before the
//! drop were still on their way (a backlog in Kafka, a held breaker, a
//! stopped sidecar). Those must not wait for a column that will not come
//! back: [`COLUMNS_TABLE`] keeps the columns each table had when the apply
//! side last read it, so a column found there and gone from the catalog was
//! dropped here, and records carrying it apply without it.

use tokio_postgres::Client;

use crate::config::{Config, TableClass};
use crate::event::TableName;
use crate::names::COLUMNS_TABLE;
use crate::residency::TableRule;
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
        let dropped = dropped_columns(client, &t.name, &state.columns).await?;
        targets.insert(
            t.name.to_string(),
            TargetTable {
                name: t.name.clone(),
                key: state.primary_key,
                dropped,
                columns: state.columns,
                column_types: state.column_types,
                json_columns: state.json_columns,
                admit: record::Admit::new(region, TableRule::compile(config, t)),
                merge: t.merge.iter().map(|m| (m.column.clone(), m.kind)).collect(),
            },
        );
    }
    Ok(targets)
}

/// Records `columns` as `table`'s columns now, marks those it had before
/// and lacks now as dropped, and returns every column dropped here (and
/// not added again). A database whose setup predates the record has no
/// such table: then nothing is known dropped (records carrying a column
/// the table lacks wait for it, as before).
async fn dropped_columns(
    client: &Client,
    table: &TableName,
    columns: &[String],
) -> Result<Vec<String>, ApplyError> {
    let name = table.to_string();
    let rows = client
        .query(
            &format!(
                "WITH gone AS (\
                    UPDATE {COLUMNS_TABLE} SET dropped = true \
                    WHERE table_name = $1 AND NOT dropped AND column_name <> ALL($2::text[]) \
                    RETURNING column_name), \
                 seen AS (\
                    INSERT INTO {COLUMNS_TABLE} (table_name, column_name) \
                    SELECT $1, c FROM unnest($2::text[]) AS c \
                    ON CONFLICT (table_name, column_name) DO UPDATE SET dropped = false \
                    WHERE {COLUMNS_TABLE}.dropped) \
                 SELECT column_name FROM gone \
                 UNION SELECT column_name FROM {COLUMNS_TABLE} \
                 WHERE table_name = $1 AND dropped AND column_name <> ALL($2::text[])"
            ),
            &[&name, &columns],
        )
        .await;
    match rows {
        Ok(rows) => Ok(rows.iter().map(|r| r.get(0)).collect()),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
            Ok(Vec::new())
        }
        Err(e) => Err(ApplyError::transient("", e)),
    }
}
