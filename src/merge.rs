//! Merge columns: the `counter` and `union` columns of `global` tables,
//! merged on arrival instead of last-writer-wins. Everything the rule needs
//! in a database lives here — the SQL functions and the row trigger `setup`
//! installs, and the statements the apply side runs — so the rule has one
//! home (pure: SQL text only).
//!
//! # Counters: a state, not deltas
//!
//! Each row of a table with counters carries, in [`COUNTS_COLUMN`] (jsonb),
//! every region's part of each counter with the stamp of that part's last
//! change:
//!
//! ```text
//! {"stock": {"1": [97, 7393846528000065], "2": [-4, 7393846530000066]}}
//!            region id  value  stamp of its last change
//! ```
//!
//! The visible column is the sum of the parts. A local write never touches
//! another region's part: the row trigger (`pgrelay.merge_row`, fired last
//! of the row's BEFORE triggers) sets the writing region's part to
//! `written value - every other part`, stamped with the write's stamp. A
//! destination merges an incoming row's parts into its own: per counter and
//! region, the part with the higher stamp wins (a tie: the higher value).
//! That merge is commutative, associative and idempotent, so every region
//! ends with the same parts and the same sum whatever the order, repetition
//! or path of the rows — the live stream, a resync, a DLQ replay, a DR
//! restore, a new region catching up, a topic read again. No bookkeeping of
//! what was already added is needed.
//!
//! Deletes: a delete stamped `d` (or a truncate) drops every part stamped
//! at or below `d`, wherever the row is, including in a region where the
//! row itself survives because a later write re-created it. So a counter
//! restarts from the parts written after its last delete; a region that
//! incremented concurrently with the delete, after it in stamp order, keeps
//! its whole part. Every region applies the same rule to the same parts,
//! so they agree.
//!
//! Rows written before the counts were kept (no [`COUNTS_COLUMN`]) count
//! their value as a base part (region `0`, stamp `0`) at their first merge
//! or local write.
//!
//! # Unions
//!
//! A `union` column holds the sorted, distinct union of every array written
//! to it. The row trigger keeps the local row so (a local write adds its
//! items to what the row held: removing an item is not replicated and does
//! not happen), and a destination unions what arrives into what it holds;
//! both sort the same way, so regions hold equal arrays, not just equal
//! sets. A delete of the row removes the set.

use crate::apply::record::TargetTable;
use crate::config::{MergeKind, TableConfig};
use crate::event::{quote_ident, quote_literal};
use crate::names::{COUNTS_COLUMN, DEFINER, HLC_COLUMN};

/// The row trigger keeping counters' parts and unions sorted; its name
/// sorts after other BEFORE triggers, so it sees the row as written.
pub const TRIGGER: &str = "zz_pgrelay_merge";

/// The region-independent SQL functions (run by `setup`):
/// - `pgrelay.counts_merge(a, b, floor, ceiling)`: the parts of `a` and `b`,
///   the newer of each, keeping those stamped above `floor` and at most
///   `ceiling`;
/// - `pgrelay.counts_union(parts)`: the aggregate of that merge;
/// - `pgrelay.counts_total(parts, column)`: a counter's sum.
///
/// Each runs with pgrelay's rights ([`DEFINER`]); none is anybody's to call
/// but the apply side's (the run role is granted [`APPLY_FUNCTIONS`]).
pub fn setup_functions() -> Vec<String> {
    vec![
        format!(
            "CREATE OR REPLACE FUNCTION pgrelay.counts_merge(a jsonb, b jsonb, floor bigint, ceiling bigint) \
             RETURNS jsonb LANGUAGE sql IMMUTABLE PARALLEL SAFE {DEFINER} AS $fn$
SELECT coalesce(jsonb_object_agg(col, parts), '{{}}'::jsonb) FROM (
    SELECT col, jsonb_object_agg(rid, jsonb_build_array(v, s)) AS parts FROM (
        SELECT DISTINCT ON (col, rid) col, rid, v, s FROM (
            SELECT c.key AS col, p.key AS rid, (p.value ->> 0)::numeric AS v, (p.value ->> 1)::bigint AS s
            FROM (VALUES (a), (b)) AS src(j),
                 jsonb_each(CASE WHEN jsonb_typeof(src.j) = 'object' THEN src.j ELSE '{{}}'::jsonb END) AS c,
                 jsonb_each(CASE WHEN jsonb_typeof(c.value) = 'object' THEN c.value ELSE '{{}}'::jsonb END) AS p
        ) AS e
        WHERE s > floor AND s <= ceiling AND v IS NOT NULL
        ORDER BY col, rid, s DESC, v DESC
    ) AS w GROUP BY col
) AS g
$fn$"
        ),
        format!(
            "CREATE OR REPLACE FUNCTION pgrelay.counts_merge_pair(a jsonb, b jsonb) RETURNS jsonb \
             LANGUAGE sql IMMUTABLE PARALLEL SAFE {DEFINER} AS $fn$
SELECT pgrelay.counts_merge(a, b, -1, 9223372036854775807)
$fn$"
        ),
        "CREATE OR REPLACE AGGREGATE pgrelay.counts_union(jsonb) \
         (SFUNC = pgrelay.counts_merge_pair, STYPE = jsonb, INITCOND = '{}')"
            .to_string(),
        format!(
            "CREATE OR REPLACE FUNCTION pgrelay.counts_total(parts jsonb, col text) RETURNS numeric \
             LANGUAGE sql IMMUTABLE PARALLEL SAFE {DEFINER} AS $fn$
SELECT coalesce(sum((p.value ->> 0)::numeric), 0)
FROM jsonb_each(CASE WHEN jsonb_typeof(parts -> col) = 'object' THEN parts -> col ELSE '{{}}'::jsonb END) AS p
$fn$"
        ),
        format!(
            "REVOKE ALL ON FUNCTION pgrelay.counts_merge(jsonb, jsonb, bigint, bigint), \
             pgrelay.counts_merge_pair(jsonb, jsonb), {} FROM PUBLIC",
            APPLY_FUNCTIONS[1..].join(", ")
        ),
    ]
}

/// The functions the apply side's statements call ([`counts_sql`]); `setup`
/// grants the run role EXECUTE on them where a table has counters.
pub const APPLY_FUNCTIONS: [&str; 3] = [
    "pgrelay.counts_merge(jsonb, jsonb, bigint, bigint)",
    "pgrelay.counts_union(jsonb)",
    "pgrelay.counts_total(jsonb, text)",
];

/// SQL for the row trigger function `pgrelay.merge_row('c:col' | 'u:col',
/// …)` of region `region_id`: keeps this region's part of each counter
/// (`c:`) and the sorted union of each set (`u:`) on local writes. Runs
/// after the stamp trigger (it reads the write's stamp). Applied changes
/// do not fire it (the apply side runs as `session_replication_role =
/// replica`).
pub fn sql_merge_row_function(region_id: u8) -> String {
    format!(
        "CREATE OR REPLACE FUNCTION pgrelay.merge_row() RETURNS trigger LANGUAGE plpgsql \
         {DEFINER} AS $fn$
DECLARE
    own text := '{region_id}';
    stamp bigint := NEW.{hlc};
    newj jsonb := to_jsonb(NEW);
    oldj jsonb := '{{}}'::jsonb;
    counts jsonb := '{{}}'::jsonb;
    fix jsonb := '{{}}'::jsonb;
    arg text;
    col text;
    parts jsonb;
    written numeric;
    others numeric;
    mine numeric;
    items jsonb;
    counted boolean := false;
BEGIN
    IF TG_OP = 'UPDATE' THEN
        oldj := to_jsonb(OLD);
        -- the parts as they were: a local write never sets them itself
        IF jsonb_typeof(oldj -> {counts_lit}) = 'object' THEN
            counts := oldj -> {counts_lit};
        END IF;
    END IF;
    FOREACH arg IN ARRAY TG_ARGV LOOP
        col := substr(arg, 3);
        IF left(arg, 2) = 'u:' THEN
            IF jsonb_typeof(newj -> col) IS DISTINCT FROM 'array' AND jsonb_typeof(oldj -> col) IS DISTINCT FROM 'array' THEN
                CONTINUE;
            END IF;
            IF TG_OP = 'UPDATE' THEN
                EXECUTE format('SELECT to_jsonb(ARRAY(SELECT DISTINCT e FROM unnest(coalesce($1.%1$I, $2.%1$I[0:0]) || coalesce($2.%1$I, $1.%1$I[0:0])) AS e ORDER BY e))', col)
                    INTO items USING OLD, NEW;
            ELSE
                EXECUTE format('SELECT to_jsonb(ARRAY(SELECT DISTINCT e FROM unnest($1.%1$I) AS e ORDER BY e))', col)
                    INTO items USING NEW;
            END IF;
            IF items IS DISTINCT FROM newj -> col THEN
                fix := fix || jsonb_build_object(col, items);
            END IF;
            CONTINUE;
        END IF;
        counted := true;
        parts := coalesce(counts -> col, '{{}}'::jsonb);
        IF jsonb_typeof(oldj -> {counts_lit}) IS DISTINCT FROM 'object' AND (oldj ->> col) IS NOT NULL THEN
            -- a row from before its parts were kept: what it held is a base part
            parts := jsonb_build_object('0', jsonb_build_array((oldj ->> col)::numeric, 0));
        END IF;
        SELECT coalesce(sum((p.value ->> 0)::numeric), 0) INTO others
            FROM jsonb_each(parts) AS p WHERE p.key <> own;
        mine := coalesce((parts -> own ->> 0)::numeric, 0);
        written := (newj ->> col)::numeric;
        IF written IS NULL THEN
            -- a counter is never NULL: writing NULL leaves its total
            fix := fix || jsonb_build_object(col, others + mine);
        ELSIF written - others <> mine OR NOT parts ? own AND written - others <> 0 THEN
            parts := parts || jsonb_build_object(own, jsonb_build_array(written - others, stamp));
        END IF;
        counts := counts || jsonb_build_object(col, parts);
    END LOOP;
    IF fix <> '{{}}'::jsonb THEN
        NEW := jsonb_populate_record(NEW, fix);
    END IF;
    IF counted THEN
        -- in the form the apply side stores (no empty counters)
        NEW.{counts} := pgrelay.counts_merge('{{}}'::jsonb, counts, -1, 9223372036854775807);
    END IF;
    RETURN NEW;
END
$fn$",
        hlc = quote_ident(HLC_COLUMN),
        counts = quote_ident(COUNTS_COLUMN),
        counts_lit = quote_literal(COUNTS_COLUMN),
    )
}

/// What `setup` does to one replicated table (`t` quoted): the parts
/// column where it has counters, and the row trigger where it has merge
/// columns (dropped where it has none, so a removed rule leaves nothing).
pub fn table_setup(t: &str, table: &TableConfig) -> Vec<String> {
    let mut sql = Vec::new();
    if table.merge.iter().any(|m| m.kind == MergeKind::Counter) {
        sql.push(format!(
            "ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {} jsonb",
            quote_ident(COUNTS_COLUMN)
        ));
    }
    sql.push(format!("DROP TRIGGER IF EXISTS {TRIGGER} ON {t}"));
    if !table.merge.is_empty() {
        let args: Vec<String> = table
            .merge
            .iter()
            .map(|m| {
                let tag = match m.kind {
                    MergeKind::Counter => "c",
                    MergeKind::Union => "u",
                };
                quote_literal(&format!("{tag}:{}", m.column))
            })
            .collect();
        sql.push(format!(
            "CREATE TRIGGER {TRIGGER} BEFORE INSERT OR UPDATE ON {t} \
             FOR EACH ROW EXECUTE FUNCTION pgrelay.merge_row({})",
            args.join(", ")
        ));
    }
    sql
}

/// `{"col": {"0": [value, 0]}, …}` for the counters of the row `alias`: the
/// base part of a row whose parts were never kept.
fn base_parts(alias: &str, counters: &[&str]) -> String {
    let items: Vec<String> = counters
        .iter()
        .map(|c| {
            format!(
                "{lit}, jsonb_build_object('0', jsonb_build_array(coalesce({alias}.{id}::numeric, 0), 0))",
                lit = quote_literal(c),
                id = quote_ident(c)
            )
        })
        .collect();
    format!("jsonb_build_object({})", items.join(", "))
}

/// The parts of the row `alias` as the merge sees them: its kept parts, or,
/// for a row that never kept any (written before `setup` added the
/// column), a base part holding each counter's value.
fn parts_of(alias: &str, counts: &str, counters: &[&str]) -> String {
    format!(
        "(CASE WHEN jsonb_typeof({counts}) = 'object' THEN {counts} ELSE {base} END)",
        base = base_parts(alias, counters)
    )
}

/// Merges the parts of the rows in `$1` into the target's rows and sets
/// each counter to its new sum. `$1` is a JSON array with one object per
/// change: the key columns, [`COUNTS_COLUMN`] (the parts as a JSON string,
/// or null: a row without kept parts, whose counters' values are then
/// given), [`HLC_COLUMN`] (the change's stamp: parts claiming a later one
/// are dropped) and `_pgrelay_floor` (the highest stamp of a delete of the
/// key earlier in the batch, or -1).
///
/// Run after the batch's upserts and deletes, so it merges into the rows
/// that exist now; the floor also takes the key's tombstone and the
/// table's into account, so parts older than a delete are dropped even
/// where the row survived it. The new value is computed from `cur` in the
/// `SET` list, so a concurrent local write to the row is re-read, never
/// overwritten.
pub fn counts_sql(target: &TargetTable, counters: &[&str]) -> String {
    let t = target.name.quoted();
    let counts = quote_ident(COUNTS_COLUMN);
    let keys: Vec<String> = target.key.iter().map(|k| quote_ident(k)).collect();
    let join: Vec<String> = keys.iter().map(|k| format!("cur.{k} = d.{k}")).collect();
    let tname = quote_literal(&target.name.to_string());
    let cur_key = target.key_json("cur");
    let merged = format!(
        "pgrelay.counts_merge({cur_parts}, d.counts, greatest(d.floor, \
         (SELECT max(ts.hlc) FROM pgrelay.tombstones ts WHERE ts.table_name = {tname} \
         AND ts.pk IN ({cur_key}, '{{}}'::jsonb)), -1), 9223372036854775807)",
        cur_parts = parts_of("cur", &format!("cur.{counts}"), counters),
    );
    let sets: Vec<String> = std::iter::once(format!("{counts} = {merged}"))
        .chain(counters.iter().map(|c| {
            let ty = target
                .columns
                .iter()
                .position(|n| n == c)
                .and_then(|i| target.column_types.get(i))
                .filter(|t| !t.is_empty())
                .map_or("numeric", String::as_str);
            format!(
                "{id} = pgrelay.counts_total({merged}, {lit})::{ty}",
                id = quote_ident(c),
                lit = quote_literal(c)
            )
        }))
        .collect();
    format!(
        "WITH e AS (SELECT value AS e FROM json_array_elements($1::text::json)), \
         x AS (SELECT {typed}, pgrelay.counts_merge('{{}}'::jsonb, {x_parts}, -1, \
         (e.e ->> {hlc_lit})::bigint) AS counts, (e.e ->> '_pgrelay_floor')::bigint AS floor \
         FROM e CROSS JOIN LATERAL json_populate_record(NULL::{t}, e.e) AS x), \
         d AS (SELECT {keys}, pgrelay.counts_union(x.counts) AS counts, max(x.floor) AS floor \
         FROM x GROUP BY {keys}) \
         UPDATE {t} AS cur SET {sets} FROM d WHERE {join}",
        typed = target.typed_keys("x").join(", "),
        x_parts = parts_of(
            "x",
            &format!("(e.e ->> {})::jsonb", quote_literal(COUNTS_COLUMN)),
            counters
        ),
        hlc_lit = quote_literal(HLC_COLUMN),
        keys = keys.join(", "),
        sets = sets.join(", "),
        join = join.join(" AND "),
    )
}

/// Keeps the sorted union of a row's array and every array of `$1` (one
/// object per change: the key columns and the array).
pub fn union_sql(target: &TargetTable, column: &str) -> String {
    let t = target.name.quoted();
    let c = quote_ident(column);
    let keys: Vec<String> = target.key.iter().map(|k| quote_ident(k)).collect();
    let join: Vec<String> = keys.iter().map(|k| format!("cur.{k} = d.{k}")).collect();
    format!(
        "WITH r AS (SELECT {typed}, x.{c} FROM json_populate_recordset(NULL::{t}, $1::text::json) AS x), \
         d AS (SELECT {keys}, array_agg(DISTINCT e ORDER BY e) AS items FROM r, unnest(r.{c}) AS e GROUP BY {keys}) \
         UPDATE {t} AS cur SET {c} = ARRAY(SELECT DISTINCT y FROM unnest(coalesce(cur.{c}, d.items[0:0]) || d.items) AS y ORDER BY y) \
         FROM d WHERE {join}",
        typed = target.typed_keys("x").join(", "),
        keys = keys.join(", "),
        join = join.join(" AND "),
    )
}
