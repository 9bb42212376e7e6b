//! The IO of `pgrelay verify --repair`: carries out the steps [`plan`]
//! made. Removals run first, in the region fixed, under pgrelay's replay
//! origin with triggers off (the capture side skips them and no tombstone
//! is left), each guarded by the condition that made it a difference, so
//! a row changed since is left alone. Then each sending region sends its
//! versions of the keys again (`resync::send_keys`).
//!
//! Error policy: a step that fails is reported with its error and the
//! others still run; everything a step does is safe to do again, so the
//! fix for a failed step is to run the repair again.
//!
//! [`plan`]: super::plan

use std::collections::HashMap;

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Client;

use super::plan::{Action, Step};
use super::policy::{self, Form};
use super::sql::{self, Shape};
use super::Kind;
use crate::config::{Config, TableClass};
use crate::names::REPLAY_ORIGIN;
use crate::resync::{self, Resend};
use crate::source::catalog::Catalog;
use crate::source::pg_error;

/// What one step did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Outcome {
    /// Rows removed in the region fixed.
    pub removed: u64,
    /// Rows and tombstones sent again (acknowledged by Kafka).
    pub rows_sent: u64,
    pub tombstones_sent: u64,
    /// Rows not sent: the sender's copy had columns a rule altered.
    pub not_whole: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Carries out `steps` (see the module docs); one outcome per step.
pub async fn carry_out(config: &Config, steps: &[Step]) -> Vec<Outcome> {
    let mut outcomes = vec![Outcome::default(); steps.len()];
    let mut sessions: HashMap<String, Client> = HashMap::new();
    for (i, step) in steps.iter().enumerate() {
        if !matches!(step.action, Action::Remove | Action::Replace) {
            continue;
        }
        match remove(config, step, &mut sessions).await {
            Ok(n) => outcomes[i].removed = n,
            Err(e) => outcomes[i].error = Some(e),
        }
    }
    drop(sessions);
    for (i, step) in steps.iter().enumerate() {
        let (Action::Resend | Action::Replace, Some(from)) = (&step.action, &step.from) else {
            continue;
        };
        if outcomes[i].error.is_some() {
            continue;
        }
        match resend(config, from, step).await {
            Ok(counts) => {
                outcomes[i].rows_sent = counts.rows;
                outcomes[i].tombstones_sent = counts.tombstones;
                outcomes[i].not_whole = counts.partial;
            }
            Err(e) => outcomes[i].error = Some(e),
        }
    }
    outcomes
}

async fn resend(config: &Config, from: &str, step: &Step) -> Result<resync::Counts, String> {
    // never let a send create a topic (as resync)
    let topic = config.topic(from, &step.to);
    crate::kafka::check_topics(
        config.kafka_for(&step.to),
        std::slice::from_ref(&topic),
        std::time::Duration::from_secs(10),
    )
    .await
    .map_err(|e| format!("region {}: {e}; run pgrelay setup", step.to))?;
    let request = Resend {
        table: step.table.clone(),
        to: step.to.clone(),
        keys: step.keys.clone(),
        own_only: step.own_only,
    };
    let summary = resync::send_keys(config, from, std::slice::from_ref(&request), false)
        .await
        .map_err(|e| format!("region {from} sending again: {e}"))?;
    Ok(summary
        .counts
        .get(&(step.table.to_string(), step.to.clone()))
        .copied()
        .unwrap_or_default())
}

/// Removes the step's rows in `step.to` that still are what made them a
/// difference; returns how many.
async fn remove(
    config: &Config,
    step: &Step,
    sessions: &mut HashMap<String, Client>,
) -> Result<u64, String> {
    let table = config
        .tables
        .iter()
        .find(|t| t.name == step.table)
        .ok_or_else(|| format!("table {} is not declared", step.table))?;
    let here = i32::from(config.region(&step.to).map_err(|e| e.to_string())?.id);
    let mut stamps: Vec<i64> = vec![0; step.keys.len()];
    let mut keys = step.keys.clone();
    if !sessions.contains_key(&step.to) {
        let client = crate::apply::session::session_with_origin(config, &step.to, REPLAY_ORIGIN)
            .await
            .map_err(|e| format!("region {}: {e}", step.to))?;
        sessions.insert(step.to.clone(), client);
    }
    let client = &sessions[&step.to];
    let shape = shape_in(client, &step.to, &step.table).await?;
    let (guard, id, values): (String, i32, Vec<String>) = match (step.kind, &step.column) {
        (Kind::Leaked, None) => {
            let TableClass::Partitioned { home_column, .. } = &table.class else {
                return Ok(0);
            };
            let forbidden = policy::forbidden_homes(config, table, &step.to);
            (
                sql::guard_homed_elsewhere(home_column),
                here,
                forbidden.into_keys().collect(),
            )
        }
        (Kind::Leaked, Some(column)) => {
            let form =
                policy::arriving_forms(config, table, &step.to, std::slice::from_ref(column))
                    .into_iter()
                    .find(|(c, _)| c == column)
                    .map(|(_, f)| f);
            match form {
                Some(Form::Mask(mask)) => (sql::guard_clear_value(column, true), here, vec![mask]),
                Some(Form::Hash { key_ids }) => (
                    sql::guard_clear_value(column, false),
                    here,
                    vec![sql::hash_pattern(&key_ids)],
                ),
                // the rule is gone: nothing to hold the value to
                None => return Ok(0),
            }
        }
        (Kind::Extra, _) => {
            let TableClass::Owned { owner } = &table.class else {
                return Ok(0);
            };
            let owner_id = i32::from(config.region(owner).map_err(|e| e.to_string())?.id);
            (sql::guard_not_written_by(), owner_id, Vec::new())
        }
        (Kind::Diverged, _) => {
            // the stamp the sender holds now: a copy under another one has
            // moved on and is left to last-writer-wins
            let from = step.from.as_deref().unwrap_or_default();
            let held = stamps_in(config, from, &shape, &step.keys).await?;
            keys.clear();
            stamps.clear();
            for k in &step.keys {
                if let Some(s) = held.get(k) {
                    keys.push(k.clone());
                    stamps.push(*s);
                }
            }
            (sql::guard_same_stamp(), here, Vec::new())
        }
        (Kind::Missing, _) => return Ok(0),
    };
    let statement = client
        .prepare_typed(
            &sql::remove(&shape, &guard),
            &[
                Type::TEXT_ARRAY,
                Type::INT8_ARRAY,
                Type::INT4,
                Type::TEXT_ARRAY,
            ],
        )
        .await
        .map_err(|e| query_error(&step.to, &step.table, "preparing the removal", &e))?;
    let mut removed = 0;
    for (chunk, chunk_stamps) in keys.chunks(1000).zip(stamps.chunks(1000)) {
        let params: [&(dyn ToSql + Sync); 4] = [&chunk, &chunk_stamps, &id, &values];
        removed += client
            .execute(&statement, &params)
            .await
            .map_err(|e| query_error(&step.to, &step.table, "removing rows", &e))?;
    }
    if removed > 0 {
        // what was removed and why, in the region's event log (no key,
        // no value: counts and the reason)
        let why = match (step.kind, &step.column) {
            (Kind::Leaked, None) => "rows homed where the policy does not allow this region",
            (Kind::Leaked, Some(_)) => "rows holding in clear a value the column rule transforms",
            (Kind::Extra, _) => "rows of an owned table its owner did not write",
            _ => "copies differing from the writer's version under its stamp (sent again)",
        };
        let table = step.table.to_string();
        let kind = step.kind.as_str();
        let column = step.column.clone();
        let rows = removed as i64;
        client
            .execute(
                "INSERT INTO pgrelay.events (region, kind, detail) VALUES ($1, 'verify_repair', \
                 jsonb_strip_nulls(jsonb_build_object('table', $2::text, 'difference', $3::text, \
                 'column', $4::text, 'removed', $5::bigint, 'why', $6::text)))",
                &[&step.to, &table, &kind, &column, &rows, &why],
            )
            .await
            .map_err(|e| query_error(&step.to, &step.table, "recording the removal", &e))?;
    }
    Ok(removed)
}

fn query_error(
    region: &str,
    table: &crate::event::TableName,
    what: &str,
    e: &tokio_postgres::Error,
) -> String {
    format!(
        "region {region}, table {table}: {what}: {}",
        pg_error::reason(e)
    )
}

/// The table's key with its types, as `region` has it.
async fn shape_in(
    client: &Client,
    region: &str,
    table: &crate::event::TableName,
) -> Result<Shape, String> {
    let state = Catalog { client, region }
        .table(table)
        .await
        .map_err(|e| e.to_string())?;
    if !state.exists || state.primary_key.is_empty() {
        return Err(format!(
            "region {region}: table {table} is missing or has no primary key"
        ));
    }
    let key = state
        .primary_key
        .iter()
        .map(|k| {
            let i = state.columns.iter().position(|c| c == k).unwrap_or(0);
            (k.clone(), state.column_types[i].clone())
        })
        .collect();
    Ok(Shape {
        table: table.clone(),
        key,
    })
}

/// The stamps `region` holds for `keys`.
async fn stamps_in(
    config: &Config,
    region: &str,
    shape: &Shape,
    keys: &[String],
) -> Result<HashMap<String, i64>, String> {
    let dsn = &config.region(region).map_err(|e| e.to_string())?.dsn;
    let client = crate::source::catalog::connect(dsn, region)
        .await
        .map_err(|e| e.to_string())?;
    client
        .batch_execute(&crate::event::canonical_text_sets("; "))
        .await
        .map_err(|e| query_error(region, &shape.table, "session settings", &e))?;
    let mut out = HashMap::new();
    for chunk in keys.chunks(1000) {
        let rows = client
            .query(&sql::stamps(shape), &[&chunk])
            .await
            .map_err(|e| query_error(region, &shape.table, "reading stamps", &e))?;
        for row in rows {
            out.insert(row.get::<_, String>(0), row.get::<_, i64>(1));
        }
    }
    Ok(out)
}
