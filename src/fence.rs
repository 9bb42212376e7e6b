//! `pgrelay fence|unfence`: refuse (or allow again) local writes to every
//! replicated table of one region, for split brain — an old primary that
//! came back after its standby was promoted, or a region an operator wants
//! to freeze while the others go on.
//!
//! The mechanism is the owned-table guard's: `setup` installs a
//! statement-level trigger `pgrelay_fence` on every replicated table that
//! raises while `pgrelay.fence` holds a row. Like every pgrelay trigger it
//! fires in local sessions only; the apply side writes as
//! `session_replication_role = replica`, so a fenced region still receives
//! the other regions' changes. Fencing and unfencing are recorded in
//! `pgrelay.events`.

use tokio_postgres::Client;

use crate::config::Config;
use crate::source::catalog::{self, CatalogError};

#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("region {region}: {what}; run pgrelay setup --region {region} first")]
    NotSetUp { region: String, what: String },
    #[error("region {region}: {context}: {source}")]
    Query {
        region: String,
        context: &'static str,
        source: tokio_postgres::Error,
    },
}

/// What a fence or unfence did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Fenced,
    AlreadyFenced,
    Unfenced,
    WasNotFenced,
}

/// Fences (`fenced = true`) or unfences `region`'s database, reached
/// through `dsn` (the region's `setup_dsn` unless the operator names
/// another host, e.g. an old primary that came back).
pub async fn set(
    config: &Config,
    region: &str,
    dsn: &str,
    fenced: bool,
    reason: Option<&str>,
) -> Result<Outcome, FenceError> {
    let mut client = catalog::connect(dsn, region).await?;
    ensure_guarded(config, region, &client).await?;
    let q = |context: &'static str| {
        move |source| FenceError::Query {
            region: region.to_string(),
            context,
            source,
        }
    };
    let tx = client
        .transaction()
        .await
        .map_err(q("starting a transaction"))?;
    let changed = if fenced {
        tx.execute(
            "INSERT INTO pgrelay.fence (region, reason) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&region, &reason],
        )
        .await
        .map_err(q("writing pgrelay.fence"))?
    } else {
        tx.execute("DELETE FROM pgrelay.fence", &[])
            .await
            .map_err(q("clearing pgrelay.fence"))?
    };
    if changed > 0 {
        let kind = if fenced { "fence" } else { "unfence" };
        tx.execute(
            "INSERT INTO pgrelay.events (region, kind, detail) \
             VALUES ($1, $2, jsonb_strip_nulls(jsonb_build_object('reason', $3::text)))",
            &[&region, &kind, &reason],
        )
        .await
        .map_err(q("writing pgrelay.events"))?;
    }
    tx.commit().await.map_err(q("committing"))?;
    Ok(match (fenced, changed > 0) {
        (true, true) => Outcome::Fenced,
        (true, false) => Outcome::AlreadyFenced,
        (false, true) => Outcome::Unfenced,
        (false, false) => Outcome::WasNotFenced,
    })
}

/// Every replicated table carries the fence trigger (a fence that left a
/// table writable would be worse than none).
async fn ensure_guarded(config: &Config, region: &str, client: &Client) -> Result<(), FenceError> {
    let tables: Vec<String> = config
        .replicated_tables()
        .map(|t| t.name.quoted())
        .collect();
    let row = client
        .query_one(
            "SELECT to_regclass('pgrelay.fence') IS NOT NULL, \
             coalesce(array_agg(t ORDER BY t) FILTER (WHERE NOT EXISTS (\
                SELECT 1 FROM pg_trigger WHERE tgrelid = to_regclass(t) AND tgname = 'pgrelay_fence')), '{}') \
             FROM unnest($1::text[]) AS t",
            &[&tables],
        )
        .await
        .map_err(|source| FenceError::Query {
            region: region.to_string(),
            context: "reading the fence triggers",
            source,
        })?;
    let has_table: bool = row.get(0);
    let unguarded: Vec<String> = row.get(1);
    if !has_table {
        return Err(FenceError::NotSetUp {
            region: region.to_string(),
            what: "the database has no pgrelay.fence table".into(),
        });
    }
    if !unguarded.is_empty() {
        return Err(FenceError::NotSetUp {
            region: region.to_string(),
            what: format!("no fence trigger on {}", unguarded.join(", ")),
        });
    }
    Ok(())
}

/// Whether the database `client` is connected to is fenced: since when and
/// why (`None` too before `setup` created the table).
pub async fn current(
    client: &Client,
) -> Result<Option<(String, Option<String>)>, tokio_postgres::Error> {
    if !crate::source::catalog::table_exists(client, "pgrelay.fence").await? {
        return Ok(None);
    }
    let row = client
        .query_opt(
            "SELECT fenced_at::text, reason FROM pgrelay.fence LIMIT 1",
            &[],
        )
        .await?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}
