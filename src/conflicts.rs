//! The region's conflict log, `pgrelay.conflicts`: the statement recording
//! losers, its settings and `pgrelay conflicts list`.
//!
//! The apply side records there every incoming change that lost to a newer
//! version of its row (the statement is [`losers_sql`], run with the
//! settings [`ConflictLog`] gives), in the transaction that applied
//! its batch. This module holds that statement and its settings, and reads
//! the log back.

use std::time::Duration;

use tokio_postgres::Client;

use crate::apply::record::TargetTable;
use crate::config::Config;
use crate::event::{quote_ident, quote_literal};
use crate::hlc::Hlc;
use crate::names::HLC_COLUMN;

/// The conflict log's settings, as the apply statements take them.
#[derive(Debug, Clone)]
pub struct ConflictLog {
    /// The fraction of losers recorded (text, `0..=1`).
    pub sample: String,
    /// Region id -> name (a JSON object, text), and under `local` the id
    /// of the region applying (a copy of its own write that comes back,
    /// e.g. in another region's resync, is its own history, not a
    /// conflict).
    pub regions: String,
}

impl ConflictLog {
    /// `None` when `relay.apply.conflict_log = "off"`.
    pub fn from_config(config: &Config, region: &str) -> Option<ConflictLog> {
        let percent = config.apply.conflict_log_percent;
        if percent == 0 {
            return None;
        }
        let mut regions: serde_json::Map<String, serde_json::Value> = config
            .regions
            .values()
            .map(|r| (r.id.to_string(), serde_json::Value::from(r.name.as_str())))
            .collect();
        if let Some(local) = config.regions.get(region) {
            regions.insert(
                "local".into(),
                serde_json::Value::from(local.id.to_string()),
            );
        }
        Some(ConflictLog {
            sample: (f64::from(percent) / 100.0).to_string(),
            regions: serde_json::Value::Object(regions).to_string(),
        })
    }
}

/// Records the changes of one statement that lost in `pgrelay.conflicts`;
/// run after the statement, in its transaction, so the log commits exactly
/// with the rows and offsets. Returns one row: how many lost.
///
/// A change lost when the row, or a tombstone of its key or of the whole
/// table, now carries a higher stamp. Not conflicts: an equal stamp (a
/// redelivered duplicate of what is there) and a higher stamp made in the
/// change's own region (its own later history, e.g. a record delivered
/// again). `$1` is the sampled fraction (text, `0..=1`), `$2` a JSON object
/// from region id to region name (text); deletes take their rows as `$3`
/// (see `apply::sql::delete_sql`), upserts read them from their staging table (`stage`). A
/// change already recorded (same table, key and stamp: a resync, a replay)
/// is not recorded twice.
pub fn losers_sql(target: &TargetTable, stage: Option<&str>) -> String {
    let t = target.name.quoted();
    let hlc = quote_ident(HLC_COLUMN);
    let tname = quote_literal(&target.name.to_string());
    let region_mask = (1u64 << crate::hlc::REGION_BITS) - 1;
    let (input, op, version) = match stage {
        Some(stage) => (
            format!("{} AS r", quote_ident(stage)),
            "upsert",
            format!("to_jsonb(r) - {}", quote_literal(HLC_COLUMN)),
        ),
        None => {
            let key_cols = target.key_columns_from("x");
            (
                format!(
                    "(SELECT {}, x.{hlc} FROM json_populate_recordset(NULL::{t}, $3::text::json) AS x) AS r",
                    key_cols.join(", ")
                ),
                "delete",
                target.key_json("r"),
            )
        }
    };
    let join: Vec<String> = target
        .key
        .iter()
        .map(|k| format!("cur.{0} = r.{0}", quote_ident(k)))
        .collect();
    format!(
        "WITH lost AS (SELECT {pk} AS pk, r.{hlc} AS loser_hlc, w.hlc AS winner_hlc, {version} AS version          FROM {input} CROSS JOIN LATERAL (SELECT greatest(         (SELECT cur.{hlc} FROM {t} AS cur WHERE {join}),          (SELECT max(ts.hlc) FROM pgrelay.tombstones ts WHERE ts.table_name = {tname}          AND ts.pk IN ({pk}, '{{}}'::jsonb))) AS hlc) AS w          WHERE w.hlc > r.{hlc} AND (w.hlc & {region_mask}) <> (r.{hlc} & {region_mask}) \
         AND (r.{hlc} & {region_mask})::text IS DISTINCT FROM ($2::text::jsonb ->> 'local')),          logged AS (INSERT INTO pgrelay.conflicts          (table_name, pk, op, winner_hlc, winner_origin, loser_hlc, loser_origin, loser_version)          SELECT {tname}, pk, '{op}', winner_hlc, $2::text::jsonb ->> (winner_hlc & {region_mask})::text,          loser_hlc, $2::text::jsonb ->> (loser_hlc & {region_mask})::text, version FROM lost          WHERE $1::text::float8 >= 1 OR random() < $1::text::float8          ON CONFLICT (table_name, pk, loser_hlc) DO NOTHING)          SELECT count(*) FROM lost",
        pk = target.key_json("r"),
        join = join.join(" AND "),
    )
}

/// What to list.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this table (`schema.table`).
    pub table: Option<String>,
    /// Only entries recorded at or after this: a duration back from now
    /// (`"2h"`) or a timestamp PostgreSQL reads (`"2026-12-04 10:00Z"`).
    pub since: Option<String>,
    pub limit: Option<usize>,
}

/// One entry of the conflict log.
#[derive(Debug, Clone, PartialEq)]
pub struct Conflict {
    pub recorded_at: String,
    pub table: String,
    pub key: serde_json::Value,
    /// `upsert` or `delete`: what the losing change was.
    pub op: String,
    pub winner_hlc: Hlc,
    pub winner_origin: Option<String>,
    pub loser_hlc: Hlc,
    pub loser_origin: Option<String>,
    /// The losing version (an upsert's row as it arrived; a delete's key).
    pub loser_version: Option<serde_json::Value>,
}

const LIST_SQL: &str = "SELECT to_char(recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.MS\"Z\"'), \
    table_name, pk::text, op, winner_hlc, winner_origin, loser_hlc, loser_origin, loser_version::text \
    FROM pgrelay.conflicts \
    WHERE ($1::text IS NULL OR table_name = $1) AND recorded_at >= $2::text::timestamptz \
    ORDER BY recorded_at, table_name, loser_hlc LIMIT $3::text::bigint";

/// Reads the conflict log, oldest first.
pub async fn list(client: &Client, filter: &Filter) -> Result<Vec<Conflict>, String> {
    let since = match filter.since.as_deref() {
        None => "-infinity".to_string(),
        Some(s) => match crate::config::parse_duration(s) {
            Ok(d) => since_duration(d),
            Err(_) => s.to_string(),
        },
    };
    let limit = filter.limit.map_or(i64::MAX, |l| l as i64).to_string();
    let rows = client
        .query(LIST_SQL, &[&filter.table, &since, &limit])
        .await
        .map_err(|e| match e.as_db_error() {
            Some(db) if db.code().code() == "42P01" => {
                "pgrelay.conflicts does not exist: run pgrelay setup for this region".to_string()
            }
            Some(db) if db.code().code() == "22007" || db.code().code() == "22008" => format!(
                "--since {:?}: give a duration (\"2h\") or a timestamp (\"2026-12-04 10:00Z\")",
                filter.since.as_deref().unwrap_or("")
            ),
            _ => format!(
                "reading pgrelay.conflicts: {}",
                crate::apply::db_message(&e)
            ),
        })?;
    let json = |s: Option<String>| s.and_then(|s| serde_json::from_str(&s).ok());
    Ok(rows
        .iter()
        .map(|r| Conflict {
            recorded_at: r.get(0),
            table: r.get(1),
            key: json(r.get(2)).unwrap_or(serde_json::Value::Null),
            op: r.get(3),
            winner_hlc: Hlc::from_sql(r.get(4)),
            winner_origin: r.get(5),
            loser_hlc: Hlc::from_sql(r.get(6)),
            loser_origin: r.get(7),
            loser_version: json(r.get(8)),
        })
        .collect())
}

/// `now() - d` as PostgreSQL reads it.
fn since_duration(d: Duration) -> String {
    let now = crate::apply::now_ms();
    ms_to_timestamp(now.saturating_sub(d.as_millis() as u64))
}

/// An ISO timestamp (UTC) for milliseconds since the epoch.
fn ms_to_timestamp(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// One line per entry: when, table, key, what lost to what (stamps as
/// `wall_ms.counter@region_id` and the regions' names), the losing version.
pub fn format(c: &Conflict) -> String {
    let stamp =
        |h: Hlc, o: &Option<String>| format!("{}({})", h.readable(), o.as_deref().unwrap_or("?"));
    format!(
        "{}  {}  {}  {} {} lost to {}  {}",
        c.recorded_at,
        c.table,
        c.key,
        c.op,
        stamp(c.loser_hlc, &c.loser_origin),
        stamp(c.winner_hlc, &c.winner_origin),
        c.loser_version
            .as_ref()
            .map_or_else(|| "-".to_string(), |v| v.to_string())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_iso_utc() {
        assert_eq!(ms_to_timestamp(0), "1970-01-01 00:00:00.000Z");
        assert_eq!(
            ms_to_timestamp(1_733_318_400_123),
            "2024-12-04 13:20:00.123Z"
        );
        assert_eq!(ms_to_timestamp(951_782_400_000), "2000-02-29 00:00:00.000Z");
    }

    #[test]
    fn a_line_names_both_stamps_and_regions() {
        let c = Conflict {
            recorded_at: "2026-12-04 10:00:00.000Z".into(),
            table: "public.products".into(),
            key: serde_json::json!({"id": "1"}),
            op: "upsert".into(),
            winner_hlc: Hlc::compose(2000, 1, 2),
            winner_origin: Some("eu".into()),
            loser_hlc: Hlc::compose(1000, 0, 1),
            loser_origin: Some("us".into()),
            loser_version: Some(serde_json::json!({"id": 1, "name": "a"})),
        };
        assert_eq!(
            format(&c),
            "2026-12-04 10:00:00.000Z  public.products  {\"id\":\"1\"}  upsert 1000.0@1(us) \
             lost to 2000.1@2(eu)  {\"id\":1,\"name\":\"a\"}"
        );
    }
}
