//! The IO of `pgrelay verify`: connects to each region, runs the scans,
//! descends into the buckets that differ, looks the suspects up again for
//! a few rounds, and checks each region alone for leaks.
//!
//! Memory: per table and region, the bucket sums (4096 per pair); per pair,
//! the suspect keys (at most [`Options::max_suspects`]); descents are
//! streamed and merged, never loaded whole. Each scan is one statement (or,
//! with a rate, one per block range), so no snapshot is held for long and
//! no lock beyond the ones a SELECT takes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use futures_util::{pin_mut, TryStreamExt};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Row};

use super::classify::{judge, Held, Judgement, Rules, Side};
use super::policy::{self, Form, Share};
use super::sql::{self, BucketDigest, Shape, View};
use super::{dedupe, Difference, Kind, PairSummary, Report, BUCKETS};
use crate::config::{Config, TableClass, TableConfig};
use crate::event::{canonical_text_sets, TableName};
use crate::names::{COUNTS_COLUMN, HLC_COLUMN};
use crate::source::catalog::{self, Catalog, CatalogError};
use crate::source::pg_error;

#[derive(Clone, Debug)]
pub struct Options {
    /// Regions to compare (default: every region).
    pub regions: Vec<String>,
    /// Tables (default: every replicated table).
    pub tables: Vec<TableName>,
    /// Rows read per second per region (default: as fast as the database).
    pub rate: Option<u64>,
    /// How many times a suspect is looked at again.
    pub rounds: u32,
    /// The wait between rounds.
    pub wait: Duration,
    /// Suspect keys kept per table and pair.
    pub max_suspects: usize,
    /// A version older than this that a region still lacks is a
    /// difference, delivered or not (the region is that far behind).
    pub window: Duration,
    /// How bucket sums digest rows.
    pub digest: BucketDigest,
    /// Only the pairs with this region, and only its own leak checks (a
    /// sidecar's periodic verify).
    pub around: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            regions: Vec::new(),
            tables: Vec::new(),
            rate: None,
            rounds: 5,
            wait: Duration::from_secs(2),
            max_suspects: 100_000,
            window: Duration::from_secs(10),
            digest: BucketDigest::Fast,
            around: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("{region} database, table {table}: {context}: {}", pg_error::reason(.source))]
    Query {
        region: String,
        table: String,
        context: &'static str,
        source: tokio_postgres::Error,
    },
    #[error("table {table}: {message}")]
    Shape { table: String, message: String },
    #[error("cannot make the run's key: {0}")]
    Key(String),
}

/// Per bucket, per view: (rows, sum of digests as text).
type Buckets = Vec<Vec<(i64, String)>>;

struct Region<'a> {
    name: &'a str,
    client: Client,
}

/// The table's pairs: (a, b, view).
struct Pairs<'a> {
    list: Vec<(&'a str, &'a str, View)>,
}

pub async fn run(config: &Config, opts: &Options) -> Result<Report, VerifyError> {
    let names: Vec<&str> = if opts.regions.is_empty() {
        config.regions.keys().map(String::as_str).collect()
    } else {
        let mut names = Vec::new();
        for r in &opts.regions {
            names.push(config.region(r)?.name.as_str());
        }
        names.sort_unstable();
        names.dedup();
        names
    };
    let mut regions = Vec::new();
    for name in &names {
        let client = catalog::connect(&config.region(name)?.dsn, name).await?;
        client
            .batch_execute(&canonical_text_sets("; "))
            .await
            .map_err(|source| VerifyError::Query {
                region: name.to_string(),
                table: String::new(),
                context: "setting the session's text formats",
                source,
            })?;
        regions.push(Region { name, client });
    }
    // 32 bytes keying the row digests, 8 seeding the key hash
    let mut key = vec![0u8; 40];
    openssl::rand::rand_bytes(&mut key).map_err(|e| VerifyError::Key(e.to_string()))?;
    let ids: BTreeMap<u8, String> = config
        .regions
        .values()
        .map(|r| (r.id, r.name.clone()))
        .collect();

    let mut report = Report::default();
    let mut found: Vec<(Difference, Option<String>)> = Vec::new();
    for table in config.replicated_tables() {
        if !opts.tables.is_empty() && !opts.tables.contains(&table.name) {
            continue;
        }
        let (shape, columns) = shape(table, &regions).await?;
        // leaks: each region alone
        let around = |name: &str| opts.around.as_deref().is_none_or(|c| c == name);
        for region in regions.iter().filter(|r| around(r.name)) {
            leaks(config, table, &shape, &columns, region, &mut found).await?;
        }
        let mut pairs = pairs(config, table, &regions, &columns);
        pairs.list.retain(|(a, b, _)| around(a) || around(b));
        if pairs.list.is_empty() {
            continue;
        }
        let buckets = scan_all(&regions, &pairs, &shape, &key, opts).await?;
        for (i, (a, b, view)) in pairs.list.iter().enumerate() {
            let ra = regions.iter().find(|r| r.name == *a).expect("region");
            let rb = regions.iter().find(|r| r.name == *b).expect("region");
            let (sa, sb) = (&buckets[a], &buckets[b]);
            let view_a = index_in(&pairs, a, i);
            let view_b = index_in(&pairs, b, i);
            let differing: Vec<i32> = (0..BUCKETS)
                .filter(|&k| sa[k][view_a] != sb[k][view_b])
                .map(|k| k as i32)
                .collect();
            report.pairs.push(PairSummary {
                table: table.name.to_string(),
                a: a.to_string(),
                b: b.to_string(),
                rows_a: sa.iter().map(|v| v[view_a].0 as u64).sum(),
                rows_b: sb.iter().map(|v| v[view_b].0 as u64).sum(),
                buckets_differing: differing.len() as u64,
            });
            if differing.is_empty() {
                continue;
            }
            let (suspects, dropped) =
                descend(ra, rb, &shape, view, &key, &differing, opts.max_suspects).await?;
            report.not_examined += dropped;
            let rules = Rules {
                regions: &ids,
                owner: match &table.class {
                    TableClass::Owned { owner } => Some(owner.as_str()),
                    _ => None,
                },
                merges: !table.merge.is_empty(),
            };
            let (diffs, unsettled) = settle(
                config, &regions, ra, rb, &shape, view, &key, suspects, &rules, opts,
            )
            .await?;
            report.unsettled += unsettled;
            found.extend(
                diffs
                    .into_iter()
                    .map(|(kind, source, destination, preferred, k)| {
                        (
                            Difference {
                                table: table.name.to_string(),
                                kind,
                                source,
                                destination,
                                column: None,
                                key: Some(k),
                            },
                            preferred,
                        )
                    }),
            );
        }
    }
    report.differences = dedupe(found.clone());
    report.found = found;
    Ok(report)
}

/// Position of pair `i`'s view among the views `region` computes.
fn index_in(pairs: &Pairs<'_>, region: &str, i: usize) -> usize {
    pairs.list[..i]
        .iter()
        .filter(|(a, b, _)| *a == region || *b == region)
        .count()
}

/// The key and the columns every selected region has.
async fn shape(
    table: &TableConfig,
    regions: &[Region<'_>],
) -> Result<(Shape, Vec<String>), VerifyError> {
    let mut key: Option<Vec<(String, String)>> = None;
    let mut columns: Option<Vec<String>> = None;
    for region in regions {
        let state = Catalog {
            client: &region.client,
            region: region.name,
        }
        .table(&table.name)
        .await?;
        let fail = |message: String| VerifyError::Shape {
            table: table.name.to_string(),
            message,
        };
        if !state.exists {
            return Err(fail(format!("missing in region {}", region.name)));
        }
        if state.primary_key.is_empty() {
            return Err(fail(format!("no primary key in region {}", region.name)));
        }
        let typed: Vec<(String, String)> = state
            .primary_key
            .iter()
            .map(|k| {
                let i = state.columns.iter().position(|c| c == k).unwrap_or(0);
                (k.clone(), state.column_types[i].clone())
            })
            .collect();
        match &key {
            None => key = Some(typed),
            Some(known) if *known != typed => {
                return Err(fail(format!(
                    "its primary key differs in region {} ({})",
                    region.name,
                    state.primary_key.join(", ")
                )))
            }
            Some(_) => {}
        }
        let here: Vec<String> = state
            .columns
            .iter()
            .filter(|c| c.as_str() != HLC_COLUMN)
            .cloned()
            .collect();
        columns = Some(match columns {
            None => here,
            Some(known) => known.into_iter().filter(|c| here.contains(c)).collect(),
        });
    }
    Ok((
        Shape {
            table: table.name.clone(),
            key: key.unwrap_or_default(),
        },
        columns.unwrap_or_default(),
    ))
}

fn pairs<'a>(
    config: &Config,
    table: &TableConfig,
    regions: &[Region<'a>],
    columns: &[String],
) -> Pairs<'a> {
    let mut list = Vec::new();
    for (i, a) in regions.iter().enumerate() {
        for b in &regions[i + 1..] {
            let filter = match policy::share(config, table, a.name, b.name) {
                Share::Nothing => continue,
                Share::All => "true".to_string(),
                Share::Homes(values) => {
                    let TableClass::Partitioned { home_column, .. } = &table.class else {
                        continue;
                    };
                    sql::home_filter(home_column, &values)
                }
            };
            let compared = columns
                .iter()
                .filter(|c| {
                    c.as_str() == COUNTS_COLUMN
                        || !policy::altered_between(table, c, a.name, b.name)
                })
                .cloned()
                .collect();
            list.push((
                a.name,
                b.name,
                View {
                    filter,
                    columns: compared,
                },
            ));
        }
    }
    Pairs { list }
}

/// Every region's bucket sums for its pairs, the regions scanned at once.
async fn scan_all<'a>(
    regions: &[Region<'a>],
    pairs: &Pairs<'a>,
    shape: &Shape,
    key: &[u8],
    opts: &Options,
) -> Result<HashMap<&'a str, Buckets>, VerifyError> {
    let scans = regions.iter().map(|region| async move {
        let views: Vec<View> = pairs
            .list
            .iter()
            .filter(|(a, b, _)| *a == region.name || *b == region.name)
            .map(|(_, _, v)| v.clone())
            .collect();
        let buckets = scan(region, shape, &views, key, opts.rate, opts.digest).await?;
        Ok::<_, VerifyError>((region.name, buckets))
    });
    let done = futures_util::future::join_all(scans).await;
    let mut out = HashMap::new();
    for result in done {
        let (name, buckets) = result?;
        out.insert(name, buckets);
    }
    Ok(out)
}

async fn scan(
    region: &Region<'_>,
    shape: &Shape,
    views: &[View],
    key: &[u8],
    rate: Option<u64>,
    digest: BucketDigest,
) -> Result<Buckets, VerifyError> {
    let mut buckets: Buckets = vec![vec![(0, "0".to_string()); views.len()]; BUCKETS];
    if views.is_empty() {
        return Ok(buckets);
    }
    let err = |context: &'static str| {
        let region = region.name.to_string();
        let table = shape.table.to_string();
        move |source| VerifyError::Query {
            region,
            table,
            context,
            source,
        }
    };
    let mut add = |rows: Vec<Row>| {
        for row in rows {
            let b: i32 = row.get(0);
            let slot = &mut buckets[b as usize];
            for (v, entry) in slot.iter_mut().enumerate() {
                let count: i64 = row.get(1 + 2 * v);
                let sum: String = row.get(2 + 2 * v);
                entry.0 += count;
                entry.1 = add_decimal(&entry.1, &sum);
            }
        }
    };
    // 4096 groups, which the planner cannot know: without this it sorts
    // the whole table (on disk) to group it
    region
        .client
        .batch_execute("SET enable_sort = off")
        .await
        .map_err(err("setting the scan's plan"))?;
    let result = scan_rows(region, shape, views, key, rate, digest, &mut add).await;
    let _ = region.client.batch_execute("RESET enable_sort").await;
    result?;
    Ok(buckets)
}

async fn scan_rows(
    region: &Region<'_>,
    shape: &Shape,
    views: &[View],
    key: &[u8],
    rate: Option<u64>,
    digest: BucketDigest,
    add: &mut impl FnMut(Vec<Row>),
) -> Result<(), VerifyError> {
    let err = |context: &'static str| {
        let region = region.name.to_string();
        let table = shape.table.to_string();
        move |source| VerifyError::Query {
            region,
            table,
            context,
            source,
        }
    };
    // typed: the fast digest leaves the key ($1) unused
    let types = [Type::BYTEA, Type::INT8, Type::TEXT, Type::TEXT];
    let Some(rate) = rate else {
        let statement = region
            .client
            .prepare_typed(&sql::buckets(shape, views, false, digest), &types[..2])
            .await
            .map_err(err("scanning"))?;
        let rows = region
            .client
            .query(&statement, &[&mac(key), &seed(key)])
            .await
            .map_err(err("scanning"))?;
        add(rows);
        return Ok(());
    };
    // throttled: block ranges sized to about a second's worth of rows each
    let size = region
        .client
        .query_one(
            "SELECT (pg_relation_size(c.oid) / current_setting('block_size')::int)::bigint, \
             greatest(c.reltuples, 0)::float8 / greatest(c.relpages, 1) \
             FROM pg_class c WHERE c.oid = $1::text::regclass",
            &[&shape.table.quoted()],
        )
        .await
        .map_err(err("reading the table's size"))?;
    let blocks: i64 = size.get(0);
    let per_block: f64 = size.get::<_, f64>(1).max(1.0);
    let chunk = ((rate as f64 / per_block) as i64).max(1);
    let statement = region
        .client
        .prepare_typed(&sql::buckets(shape, views, true, digest), &types)
        .await
        .map_err(err("scanning a block range"))?;
    let started = Instant::now();
    let mut rows_read: u64 = 0;
    let mut start: i64 = 0;
    loop {
        let last = start + chunk >= blocks;
        let from = format!("({start},0)");
        // the last range is open: rows written since the size was read
        let to = if last {
            "(4294967295,0)".to_string()
        } else {
            format!("({},0)", start + chunk)
        };
        let params: [&(dyn ToSql + Sync); 4] = [&mac(key), &seed(key), &from, &to];
        let rows = region
            .client
            .query(&statement, &params)
            .await
            .map_err(err("scanning a block range"))?;
        rows_read += rows
            .iter()
            .map(|r| {
                (0..views.len())
                    .map(|v| r.get::<_, i64>(1 + 2 * v))
                    .max()
                    .unwrap_or(0) as u64
            })
            .sum::<u64>();
        add(rows);
        if last {
            break;
        }
        start += chunk;
        let due = Duration::from_secs_f64(rows_read as f64 / rate as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
    Ok(())
}

/// The key of the row digests: the run's key's first 32 bytes.
fn mac(key: &[u8]) -> &[u8] {
    &key[..32]
}

/// The seed of the key hash: the run's key's last 8 bytes.
fn seed(key: &[u8]) -> i64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&key[32..40]);
    i64::from_be_bytes(bytes)
}

/// The sum of two non-negative-or-negative decimal integers as text (the
/// sums of 64-bit digests PostgreSQL returns as numeric).
fn add_decimal(a: &str, b: &str) -> String {
    if a == "0" {
        return b.to_string();
    }
    if b == "0" {
        return a.to_string();
    }
    match (a.parse::<i128>(), b.parse::<i128>()) {
        (Ok(x), Ok(y)) => x.wrapping_add(y).to_string(),
        // beyond 2^127: keep both, still comparable as a whole
        _ => format!("{a}+{b}"),
    }
}

/// Streams both sides' rows of the differing buckets, sorted by key hash,
/// and keeps the keys whose stamp or digest differ (or that one side
/// lacks). Returns them and how many were left out past the cap.
async fn descend(
    a: &Region<'_>,
    b: &Region<'_>,
    shape: &Shape,
    view: &View,
    key: &[u8],
    buckets: &[i32],
    max: usize,
) -> Result<(Vec<String>, u64), VerifyError> {
    let statement = sql::descend(shape, view);
    let (sa, sb) = futures_util::future::try_join(
        open_descent(a, shape, &statement, key, buckets),
        open_descent(b, shape, &statement, key, buckets),
    )
    .await?;
    pin_mut!(sa);
    pin_mut!(sb);
    let next = |r: Option<Row>| {
        r.map(|row| {
            (
                row.get::<_, i64>(0),
                row.get::<_, String>(1),
                row.get::<_, i64>(2),
                row.get::<_, i64>(3),
            )
        })
    };
    let read_err = |region: &str| {
        let region = region.to_string();
        let table = shape.table.to_string();
        move |source| VerifyError::Query {
            region,
            table,
            context: "reading the keys of differing buckets",
            source,
        }
    };
    let mut ra = next(sa.try_next().await.map_err(read_err(a.name))?);
    let mut rb = next(sb.try_next().await.map_err(read_err(b.name))?);
    let mut suspects = Vec::new();
    let mut dropped = 0u64;
    let mut suspect = |k: String| {
        if suspects.len() < max {
            suspects.push(k);
        } else {
            dropped += 1;
        }
    };
    loop {
        match (&ra, &rb) {
            (None, None) => break,
            (Some(x), Some(y)) if (x.0, &x.1) == (y.0, &y.1) => {
                if x.2 != y.2 || x.3 != y.3 {
                    suspect(x.1.clone());
                }
                ra = next(sa.try_next().await.map_err(read_err(a.name))?);
                rb = next(sb.try_next().await.map_err(read_err(b.name))?);
            }
            (Some(x), y)
                if y.as_ref()
                    .is_none_or(|y| (x.0, x.1.as_bytes()) < (y.0, y.1.as_bytes())) =>
            {
                suspect(x.1.clone());
                ra = next(sa.try_next().await.map_err(read_err(a.name))?);
            }
            (_, Some(y)) => {
                suspect(y.1.clone());
                rb = next(sb.try_next().await.map_err(read_err(b.name))?);
            }
            (Some(_), None) => unreachable!("handled above"),
        }
    }
    Ok((suspects, dropped))
}

async fn open_descent(
    region: &Region<'_>,
    shape: &Shape,
    statement: &str,
    key: &[u8],
    buckets: &[i32],
) -> Result<tokio_postgres::RowStream, VerifyError> {
    let params: [&(dyn ToSql + Sync); 3] = [&mac(key), &seed(key), &buckets];
    region
        .client
        .query_raw(statement, params)
        .await
        .map_err(|source| VerifyError::Query {
            region: region.name.to_string(),
            table: shape.table.to_string(),
            context: "reading the keys of differing buckets",
            source,
        })
}

type Found = (Kind, String, String, Option<String>, String);

/// Looks the suspects up in both regions, round after round, until each
/// agrees, or shows the same difference twice in a row with every newer
/// version delivered. Returns the differences and how many keys were
/// still in flight at the end.
#[allow(clippy::too_many_arguments)]
async fn settle(
    config: &Config,
    regions: &[Region<'_>],
    a: &Region<'_>,
    b: &Region<'_>,
    shape: &Shape,
    view: &View,
    key: &[u8],
    suspects: Vec<String>,
    rules: &Rules<'_>,
    opts: &Options,
) -> Result<(Vec<Found>, u64), VerifyError> {
    let statement = sql::lookup(shape, view);
    // each key with what it showed last time, if a difference
    type Seen = (Judgement, Held, Held);
    let mut pending: Vec<(String, Option<Seen>)> =
        suspects.into_iter().map(|k| (k, None)).collect();
    let mut found = Vec::new();
    for round in 0..opts.rounds.max(2) {
        if pending.is_empty() {
            break;
        }
        if round > 0 {
            tokio::time::sleep(opts.wait).await;
        }
        // how far each side has applied each source, read before the
        // snapshots the keys are looked up in
        let wal = wal_positions(regions).await?;
        let (caught_a, caught_b) = futures_util::future::try_join(
            caught_up(config, a, &wal, opts.window),
            caught_up(config, b, &wal, opts.window),
        )
        .await?;
        let mut still = Vec::new();
        for chunk in pending.chunks(1000) {
            let keys: Vec<String> = chunk.iter().map(|(k, _)| k.clone()).collect();
            let ((held_a, wm_a), (held_b, wm_b)) = futures_util::future::try_join(
                lookup(config, a, shape, &statement, key, &keys),
                lookup(config, b, shape, &statement, key, &keys),
            )
            .await?;
            for (i, (k, last)) in chunk.iter().enumerate() {
                let side_a = Side {
                    region: a.name,
                    held: held_a[i].clone(),
                    watermarks: &wm_a,
                    caught_up: &caught_a,
                };
                let side_b = Side {
                    region: b.name,
                    held: held_b[i].clone(),
                    watermarks: &wm_b,
                    caught_up: &caught_b,
                };
                let now = judge(&side_a, &side_b, rules);
                match &now {
                    Judgement::Agree => {}
                    Judgement::InFlight => still.push((k.clone(), None)),
                    Judgement::Differ {
                        kind,
                        source,
                        destination,
                        preferred,
                    } => {
                        let seen = (now.clone(), side_a.held.clone(), side_b.held.clone());
                        if last.as_ref() == Some(&seen) {
                            found.push((
                                *kind,
                                source.clone(),
                                destination.clone(),
                                preferred.clone(),
                                k.clone(),
                            ));
                        } else {
                            still.push((k.clone(), Some(seen)));
                        }
                    }
                }
            }
        }
        pending = still;
    }
    Ok((found, pending.len() as u64))
}

/// A change committed this long before a region's WAL position was read
/// is below that position (a transaction commits after it stamps its rows).
const COMMIT_MARGIN_MS: u64 = 2_000;

/// Each region's WAL insert position and clock (ms), read now.
async fn wal_positions<'r>(
    regions: &'r [Region<'_>],
) -> Result<Vec<(&'r str, String, u64)>, VerifyError> {
    let mut out = Vec::with_capacity(regions.len());
    for region in regions {
        let row = region
            .client
            .query_one(
                "SELECT pg_current_wal_insert_lsn()::text, \
                 (extract(epoch FROM clock_timestamp()) * 1000)::bigint",
                &[],
            )
            .await
            .map_err(|source| VerifyError::Query {
                region: region.name.to_string(),
                table: String::new(),
                context: "reading the WAL position",
                source,
            })?;
        let now: i64 = row.get(1);
        out.push((region.name, row.get::<_, String>(0), now.max(0) as u64));
    }
    Ok(out)
}

/// Per source region (by id): the time before which everything it
/// committed is applied in `side` (`pgrelay.wait_for` at the source's WAL
/// position read by [`wal_positions`]: every partition's applied offsets
/// past it, nothing parked before it), or else before which a version
/// still missing counts as a difference (`window` ago).
async fn caught_up(
    config: &Config,
    side: &Region<'_>,
    wal: &[(&str, String, u64)],
    window: Duration,
) -> Result<BTreeMap<u8, u64>, VerifyError> {
    let mut out = BTreeMap::new();
    let here = wal
        .iter()
        .find(|(r, _, _)| *r == side.name)
        .map_or(0, |(_, _, now)| *now);
    let behind = here.saturating_sub(window.as_millis() as u64);
    for region in config.regions.values() {
        if region.name != side.name {
            out.insert(region.id, behind);
        }
    }
    for (source, lsn, now) in wal {
        if *source == side.name {
            continue;
        }
        let row = side
            .client
            .query_one(
                "SELECT pgrelay.wait_for($1::text, $2::text::pg_lsn, '0s')",
                &[source, lsn],
            )
            .await
            .map_err(|e| VerifyError::Query {
                region: side.name.to_string(),
                table: String::new(),
                context: "asking pgrelay.wait_for how far a source is applied",
                source: e,
            })?;
        if row.get::<_, bool>(0) {
            out.insert(
                config.region(source)?.id,
                now.saturating_sub(COMMIT_MARGIN_MS),
            );
        }
    }
    Ok(out)
}

/// One region's version of each key (in the order given) and its
/// watermarks, read in one snapshot.
async fn lookup(
    config: &Config,
    region: &Region<'_>,
    shape: &Shape,
    statement: &str,
    key: &[u8],
    keys: &[String],
) -> Result<(Vec<Held>, BTreeMap<u8, i64>), VerifyError> {
    let err = |context: &'static str| {
        let region = region.name.to_string();
        let table = shape.table.to_string();
        move |source| VerifyError::Query {
            region,
            table,
            context,
            source,
        }
    };
    let client = &region.client;
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(err("starting a snapshot"))?;
    let result = async {
        let marks = client
            .query(sql::WATERMARKS, &[])
            .await
            .map_err(err("reading the watermarks"))?;
        let table_name = shape.table.to_string();
        let params: [&(dyn ToSql + Sync); 3] = [&mac(key), &keys, &table_name];
        let rows = client
            .query(statement, &params)
            .await
            .map_err(err("looking keys up"))?;
        Ok::<_, VerifyError>((marks, rows))
    }
    .await;
    let _ = client.batch_execute("COMMIT").await;
    let (marks, rows) = result?;
    let mut watermarks = BTreeMap::new();
    for m in marks {
        let source: String = m.get(0);
        let hlc: Option<i64> = m.get(1);
        if let (Some(r), Some(hlc)) = (config.regions.get(&source), hlc) {
            watermarks.insert(r.id, hlc);
        }
    }
    let mut by_key: HashMap<String, Held> = HashMap::with_capacity(rows.len());
    for row in rows {
        let k: String = row.get(0);
        let stamp: Option<i64> = row.get(1);
        let digest: Option<i64> = row.get(2);
        let shared: bool = row.get(3);
        let tomb: Option<i64> = row.get(4);
        let truncated: Option<i64> = row.get(5);
        let held = match (stamp, digest) {
            (Some(stamp), Some(digest)) => Held::Row {
                stamp,
                digest,
                shared,
            },
            _ => Held::Gone {
                tombstone: tomb.unwrap_or(0).max(truncated.unwrap_or(0)),
            },
        };
        by_key.insert(k, held);
    }
    let held = keys
        .iter()
        .map(|k| by_key.remove(k).unwrap_or(Held::Gone { tombstone: 0 }))
        .collect();
    Ok((held, watermarks))
}

/// The rows and column values `region` holds where the policy forbids
/// them: rows of a partitioned table homed where the region is not
/// allowed, and rule columns that arrived in clear.
async fn leaks(
    config: &Config,
    table: &TableConfig,
    shape: &Shape,
    columns: &[String],
    region: &Region<'_>,
    found: &mut Vec<(Difference, Option<String>)>,
) -> Result<(), VerifyError> {
    let err = |context: &'static str| {
        let region = region.name.to_string();
        let table = shape.table.to_string();
        move |source| VerifyError::Query {
            region,
            table,
            context,
            source,
        }
    };
    let id = i32::from(config.region(region.name)?.id);
    // a row leaked whole is one difference, not one more per rule column
    let mut leaked_keys: HashSet<String> = HashSet::new();
    if let TableClass::Partitioned { home_column, .. } = &table.class {
        let forbidden = policy::forbidden_homes(config, table, region.name);
        if !forbidden.is_empty() {
            let values: Vec<String> = forbidden.keys().cloned().collect();
            let statement = sql::leaked_rows(shape, home_column);
            let stream = region
                .client
                .query_raw(&statement, [&values as &(dyn ToSql + Sync), &id])
                .await
                .map_err(err("reading rows homed elsewhere"))?;
            pin_mut!(stream);
            while let Some(row) = stream
                .try_next()
                .await
                .map_err(err("reading rows homed elsewhere"))?
            {
                let home_value: String = row.get(0);
                let k: String = row.get(1);
                let home = forbidden.get(&home_value).cloned().unwrap_or_default();
                leaked_keys.insert(k.clone());
                found.push((
                    Difference {
                        table: table.name.to_string(),
                        kind: Kind::Leaked,
                        source: home,
                        destination: region.name.to_string(),
                        column: None,
                        key: Some(k),
                    },
                    None,
                ));
            }
        }
    }
    for (column, form) in policy::arriving_forms(config, table, region.name, columns) {
        let (statement, pattern) = match &form {
            Form::Mask(mask) => (sql::clear_values(shape, &column, true), mask.clone()),
            Form::Hash { key_ids } => (
                sql::clear_values(shape, &column, false),
                sql::hash_pattern(key_ids),
            ),
        };
        let params: [&(dyn ToSql + Sync); 2] = [&id, &pattern];
        let stream = region
            .client
            .query_raw(&statement, params)
            .await
            .map_err(err("reading rule columns"))?;
        pin_mut!(stream);
        while let Some(row) = stream
            .try_next()
            .await
            .map_err(err("reading rule columns"))?
        {
            let writer: i32 = row.get(0);
            let k: String = row.get(1);
            if leaked_keys.contains(&k) {
                continue;
            }
            let source = config
                .regions
                .values()
                .find(|r| i32::from(r.id) == writer)
                .map(|r| r.name.clone())
                .unwrap_or_else(|| format!("region id {writer}"));
            found.push((
                Difference {
                    table: table.name.to_string(),
                    kind: Kind::Leaked,
                    source,
                    destination: region.name.to_string(),
                    column: Some(column.clone()),
                    key: Some(k),
                },
                None,
            ));
        }
    }
    Ok(())
}
