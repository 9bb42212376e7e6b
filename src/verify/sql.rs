//! The SQL verify runs in each region (pure). Every statement takes the
//! run's key as `$1` (bytea) and hashes inside the database with core
//! PostgreSQL only (no extension): rows are digested with
//! `sha256(key || row text)`, so a digest cannot be looked up without the
//! key; keys are spread over buckets with PostgreSQL's 64-bit text hash
//! seeded by the run (`$2`), which only places rows and is cheap. What comes
//! back is counts, digests and, in buckets that differ, keys.

use crate::event::{quote_ident, quote_literal, TableName};
use crate::hlc::REGION_BITS;
use crate::names::HLC_COLUMN;

/// A table as both regions of a pair have it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shape {
    pub table: TableName,
    /// Primary key columns with their types.
    pub key: Vec<(String, String)>,
}

/// One region pair's part of a table, as one region computes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    /// Which rows: a boolean SQL expression over the table's columns.
    pub filter: String,
    /// Which columns are compared (the stamp apart).
    pub columns: Vec<String>,
}

/// The home-column test of a partitioned pair's rows.
pub fn home_filter(home_column: &str, values: &[String]) -> String {
    let list = values
        .iter()
        .map(|v| quote_literal(v))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "coalesce(t.{}::text = ANY (ARRAY[{list}]::text[]), false)",
        quote_ident(home_column)
    )
}

/// The key as the tombstones spell it: `{"col": "text value", ...}`.
pub fn key_json(shape: &Shape) -> String {
    let parts = shape
        .key
        .iter()
        .map(|(k, _)| format!("{}, t.{}::text", quote_literal(k), quote_ident(k)))
        .collect::<Vec<_>>()
        .join(", ");
    format!("jsonb_build_object({parts})::text")
}

/// The seeded hash of the key (bigint): places a row in its bucket and
/// orders the rows of a descent. An integer key is hashed as a number
/// (about a third of the cost of its text).
fn key_hash(shape: &Shape) -> String {
    if let [(k, ty)] = shape.key.as_slice() {
        if matches!(ty.as_str(), "bigint" | "integer" | "smallint") {
            return format!("hashint8extended(t.{}::bigint, $2::bigint)", quote_ident(k));
        }
    }
    let cols = shape
        .key
        .iter()
        .map(|(k, _)| format!("t.{}", quote_ident(k)))
        .collect::<Vec<_>>()
        .join(", ");
    format!("hashtextextended(ROW({cols})::text, $2::bigint)")
}

/// The bucket (0..4096) of a key hash expression.
fn bucket_of(kh: &str) -> String {
    format!("({kh} & {})::int", super::BUCKETS - 1)
}

/// A keyed digest of the given columns, as a bigint (the first 8 bytes).
fn digest(columns: &[String]) -> String {
    let cols = columns
        .iter()
        .map(|c| format!("t.{}", quote_ident(c)))
        .collect::<Vec<_>>()
        .join(", ");
    // ROW() of one column is still a record; of none, the empty record
    format!(
        "('x' || encode(substr(sha256($1::bytea || convert_to(ROW({cols})::text, 'UTF8')), 1, 8), 'hex'))::bit(64)::bigint"
    )
}

/// A bucket's share of a row: PostgreSQL's 64-bit text hash, seeded by the
/// run (`$2`), of the columns' texts joined by a separator (NULL spelled as
/// a control character). About as fast as reading the row for `COPY`;
/// only bucket sums of it leave the database.
fn fast_digest(columns: &[String]) -> String {
    let cols = columns
        .iter()
        .map(|c| format!("coalesce(t.{}::text, chr(31))", quote_ident(c)))
        .collect::<Vec<_>>()
        .join(", chr(30), ");
    format!("hashtextextended(concat({cols}), $2::bigint)")
}

/// How bucket sums digest rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BucketDigest {
    /// Seeded 64-bit hash (see [`fast_digest`]).
    #[default]
    Fast,
    /// Keyed SHA-256, as per-row digests always are (about 4x the cost).
    Sha256,
}

fn stamp() -> String {
    format!("coalesce(t.{}, 0)", quote_ident(HLC_COLUMN))
}

/// One scan of the table (or of a block range, `$3`..`$4` as tids, when
/// `ranged`): per bucket, for each view, how many rows and the sum of
/// their digests (stamp included) as text.
pub fn buckets(shape: &Shape, views: &[View], ranged: bool, how: BucketDigest) -> String {
    let digest = |cols: &[String]| match how {
        BucketDigest::Fast => fast_digest(cols),
        BucketDigest::Sha256 => digest(cols),
    };
    let mut inner = vec![format!("{} AS _b", bucket_of("t._pgrelay_kh"))];
    let mut outer = vec!["_b".to_string()];
    // one digest per distinct column list, computed for the rows of any
    // view that uses it (pairs of a global table share one)
    let mut digests: Vec<&[String]> = Vec::new();
    for view in views {
        if !digests.contains(&view.columns.as_slice()) {
            digests.push(&view.columns);
        }
    }
    for (j, columns) in digests.iter().enumerate() {
        let mut cols = vec![HLC_COLUMN.to_string()];
        cols.extend(columns.iter().cloned());
        let filters: Vec<&str> = views
            .iter()
            .filter(|v| v.columns == *columns)
            .map(|v| v.filter.as_str())
            .collect();
        let expr = if filters.contains(&"true") {
            digest(&cols)
        } else {
            format!(
                "CASE WHEN {} THEN {} END",
                filters.join(" OR "),
                digest(&cols)
            )
        };
        inner.push(format!("{expr} AS _d{j}"));
    }
    for (i, view) in views.iter().enumerate() {
        let j = digests
            .iter()
            .position(|c| *c == view.columns.as_slice())
            .unwrap_or(0);
        inner.push(format!("({}) AS _f{i}", view.filter));
        outer.push(format!("count(*) FILTER (WHERE _f{i})"));
        outer.push(format!(
            "coalesce(sum(_d{j}) FILTER (WHERE _f{i}), 0)::text"
        ));
    }
    let range = if ranged {
        " WHERE t.ctid >= $3::text::tid AND t.ctid < $4::text::tid"
    } else {
        ""
    };
    format!(
        "SELECT {outer} FROM (SELECT {inner} FROM (SELECT {kh} AS _pgrelay_kh, t.* FROM {table} t{range}) t) s GROUP BY _b",
        outer = outer.join(", "),
        inner = inner.join(", "),
        kh = key_hash(shape),
        table = shape.table.quoted(),
    )
}

/// The rows of one view in the buckets `$3` (int[]), sorted by key hash
/// and key: key hash, key, stamp, content digest.
pub fn descend(shape: &Shape, view: &View) -> String {
    format!(
        "SELECT t._pgrelay_kh, t._pgrelay_key, {stamp}, {digest} FROM \
         (SELECT {kh} AS _pgrelay_kh, {key} AS _pgrelay_key, t.* FROM {table} t) t \
         WHERE ({filter}) AND {bucket} = ANY ($3::int[]) \
         ORDER BY t._pgrelay_kh, convert_to(t._pgrelay_key, 'UTF8')",
        stamp = stamp(),
        digest = digest(&view.columns),
        kh = key_hash(shape),
        key = key_json(shape),
        table = shape.table.quoted(),
        filter = view.filter,
        bucket = bucket_of("t._pgrelay_kh"),
    )
}

/// The rows and tombstones of the keys `$2` (text[] of key JSON), whatever
/// the view: key, stamp (NULL: no row), content digest, whether the row
/// belongs to the view, the key's tombstone stamp, the table's truncate
/// stamp. `$3` is the table's name as the tombstones spell it.
/// `t`'s key equals the key `k.pk` spells (typed, so an index serves).
fn key_match(shape: &Shape) -> String {
    shape
        .key
        .iter()
        .map(|(k, ty)| {
            format!(
                "t.{col} = (k.pk::jsonb ->> {lit})::{ty}",
                col = quote_ident(k),
                lit = quote_literal(k)
            )
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}

pub fn lookup(shape: &Shape, view: &View) -> String {
    let on = key_match(shape);
    format!(
        "SELECT k.pk, CASE WHEN t.ctid IS NULL THEN NULL ELSE {stamp} END, \
         CASE WHEN t.ctid IS NULL THEN NULL ELSE {digest} END, \
         coalesce(t.ctid IS NOT NULL AND ({filter}), false), ts.hlc, \
         (SELECT tt.hlc FROM pgrelay.tombstones tt WHERE tt.table_name = $3 AND tt.pk = '{{}}'::jsonb) \
         FROM unnest($2::text[]) AS k(pk) \
         LEFT JOIN {table} t ON {on} \
         LEFT JOIN pgrelay.tombstones ts ON ts.table_name = $3 AND ts.pk = k.pk::jsonb",
        stamp = stamp(),
        digest = digest(&view.columns),
        filter = view.filter,
        table = shape.table.quoted(),
    )
}

/// The rows of a partitioned table homed where this region may not hold
/// them (`$1`: the forbidden home values) that the region did not write
/// itself (`$2`: its id; a row an application writes in its region stays
/// there, wherever it is homed): home value, key.
pub fn leaked_rows(shape: &Shape, home_column: &str) -> String {
    format!(
        "SELECT t.{home}::text, {key} FROM {table} t WHERE t.{home}::text = ANY ($1::text[]) AND ({stamp} & {mask_bits}) <> $2::int",
        stamp = stamp(),
        mask_bits = (1u64 << REGION_BITS) - 1,
        home = quote_ident(home_column),
        key = key_json(shape),
        table = shape.table.quoted(),
    )
}

/// Rows another region wrote whose `column` is not in the form the rule
/// writes for this region (`$1`: the region's id; `$2`: the mask, or the
/// pattern of a keyed hash): writer id, key.
pub fn clear_values(shape: &Shape, column: &str, mask: bool) -> String {
    let test = if mask {
        "t.{c}::text <> $2::text"
    } else {
        "t.{c}::text !~ $2::text"
    };
    format!(
        "SELECT ({stamp} & {mask_bits})::int, {key} FROM {table} t \
         WHERE ({stamp} & {mask_bits}) <> $1::int AND {stamp} <> 0 AND t.{c} IS NOT NULL AND {test}",
        stamp = stamp(),
        mask_bits = (1u64 << REGION_BITS) - 1,
        key = key_json(shape),
        table = shape.table.quoted(),
        c = quote_ident(column),
        test = test.replace("{c}", &quote_ident(column)),
    )
}

/// The pattern a keyed hash matches, for the given key ids.
pub fn hash_pattern(key_ids: &[String]) -> String {
    let ids = key_ids
        .iter()
        .map(|id| regex_escape(id))
        .collect::<Vec<_>>()
        .join("|");
    format!("^({ids}):[0-9a-f]{{64}}$")
}

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        if !ch.is_ascii_alphanumeric() && ch != '_' && ch != '-' {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

/// Per source region, what this region has applied from it.
pub const WATERMARKS: &str = "SELECT source_region, hlc FROM pgrelay.watermarks";

/// `--repair`: removes the rows of the keys in `$1` (with, in `$2`, the
/// stamp each was seen with) that still meet `guard`. Guards may use `$3`
/// (a region id) and `$4` (text values); every statement declares all four.
pub fn remove(shape: &Shape, guard: &str) -> String {
    format!(
        "DELETE FROM {table} t USING unnest($1::text[], $2::int8[]) AS k(pk, stamp) \
         WHERE {on} AND ({guard})",
        table = shape.table.quoted(),
        on = key_match(shape),
    )
}

/// The stamp of each key of `$1` a region holds a row for.
pub fn stamps(shape: &Shape) -> String {
    format!(
        "SELECT k.pk, {stamp} FROM unnest($1::text[]) AS k(pk) JOIN {table} t ON {on}",
        stamp = stamp(),
        table = shape.table.quoted(),
        on = key_match(shape),
    )
}

/// Guard: a row homed where `$4` lists, not written by region `$3`.
pub fn guard_homed_elsewhere(home_column: &str) -> String {
    format!(
        "t.{home}::text = ANY ($4::text[]) AND ({stamp} & {mask}) <> $3::int",
        home = quote_ident(home_column),
        stamp = stamp(),
        mask = (1u64 << REGION_BITS) - 1,
    )
}

/// Guard: `column` still not in the form a rule writes (`$4[1]`: the mask,
/// or the hash pattern), in a row region `$3` did not write.
pub fn guard_clear_value(column: &str, mask: bool) -> String {
    let c = quote_ident(column);
    let test = if mask { "<>" } else { "!~" };
    format!(
        "({stamp} & {bits}) <> $3::int AND {stamp} <> 0 AND t.{c} IS NOT NULL \
         AND t.{c}::text {test} ($4::text[])[1]",
        stamp = stamp(),
        bits = (1u64 << REGION_BITS) - 1,
    )
}

/// Guard: the row still has the stamp it was seen with.
pub fn guard_same_stamp() -> String {
    format!("{} = k.stamp", stamp())
}

/// Guard: a row region `$3` did not write.
pub fn guard_not_written_by() -> String {
    format!(
        "({stamp} & {bits}) <> $3::int",
        stamp = stamp(),
        bits = (1u64 << REGION_BITS) - 1,
    )
}
