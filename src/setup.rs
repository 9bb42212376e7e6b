//! `pgrelay setup`: the objects a region's database needs, built as SQL
//! (pure, testable) and then executed in one transaction (idempotent).
//!
//! In the `pgrelay` schema: the clock (its sequences and functions, see
//! [`hlc::sql_clock_functions`]), the `tombstones` table, the trigger
//! functions, and the apply side's offset and watermark tables. Every
//! function runs `SECURITY DEFINER` with a pinned `search_path`, owned by
//! the role running setup, so the application's roles need nothing of
//! pgrelay's; `EXECUTE` is revoked from `PUBLIC` on all but `wait_for`.
//!
//! On every declared, non-`local` table: the `_pgrelay_hlc` stamp column,
//! the replica identity (`FULL` on `partitioned` tables, whose routing needs
//! the old row, and on every table with `relay.capture.before_image =
//! "full"`; `DEFAULT` otherwise, so updates and deletes cost no extra WAL), a
//! stamp trigger, tombstone triggers for deletes and truncates (a truncate
//! leaves a table-wide tombstone, key `{}`), a check after inserts and key
//! moves that refuses a row which a concurrent delete of its key overtook,
//! and on `owned` tables outside the owner region a guard that refuses local
//! writes. Then the publication (declared non-local tables plus
//! `pgrelay.tombstones`), the replication slot, and one replication origin
//! per other region.

use crate::config::{Config, TableClass, TableConfig};
use crate::event::{quote_ident, quote_literal, TableName};
use crate::hlc;
use crate::names::{DEFINER, HLC_COLUMN};
use crate::schema;

/// Primary key columns of a table, as read from the catalog.
pub type KeyColumns = Vec<String>;

/// A row trigger function `pgrelay.{name}(key columns…)` that leaves a
/// tombstone for the OLD row's key stamped `stamp` (raising one already
/// there), then returns `returns`. Key values are spelled as the apply side
/// spells them, whatever the writing session's settings (set on the
/// function, restored when it returns).
///
/// An argument `home:{column}` (on `partitioned` tables) names the home
/// column instead of a key column: the OLD row's home is kept with the
/// tombstone, so `resync` can send the delete where the row may have gone.
fn tombstone_function(name: &str, stamp: &str, returns: &str) -> String {
    format!(
        "CREATE OR REPLACE FUNCTION pgrelay.{name}() RETURNS trigger LANGUAGE plpgsql \
         {DEFINER} {settings} AS $fn$
DECLARE
    key_json jsonb := '{{}}'::jsonb;
    home text;
    k text;
    v text;
BEGIN
    FOREACH k IN ARRAY TG_ARGV LOOP
        IF k LIKE 'home:%' THEN
            EXECUTE format('SELECT ($1).%I::text', substr(k, 6)) INTO home USING OLD;
            CONTINUE;
        END IF;
        EXECUTE format('SELECT ($1).%I::text', k) INTO v USING OLD;
        key_json := key_json || jsonb_build_object(k, v);
    END LOOP;
    INSERT INTO pgrelay.tombstones AS ts (table_name, pk, hlc, home)
    VALUES (TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, key_json, {stamp}, home)
    ON CONFLICT (table_name, pk) DO UPDATE SET hlc = greatest(ts.hlc, excluded.hlc), deleted_at = now(),
        home = coalesce(excluded.home, ts.home);
    RETURN {returns};
END
$fn$",
        settings = crate::event::canonical_text_sets(" ")
    )
}

/// `pgrelay.row_key(row, key columns)`: the row's key as the tombstones
/// spell it (`{column: text}`), under the apply side's text settings.
fn row_key_function() -> String {
    format!(
        "CREATE OR REPLACE FUNCTION pgrelay.row_key(r anyelement, keys text[]) RETURNS jsonb \
         LANGUAGE plpgsql STABLE {DEFINER} {settings} AS $fn$
DECLARE
    key_json jsonb := '{{}}'::jsonb;
    k text;
    v text;
BEGIN
    FOREACH k IN ARRAY keys LOOP
        EXECUTE format('SELECT ($1).%I::text', k) INTO v USING r;
        key_json := key_json || jsonb_build_object(k, v);
    END LOOP;
    RETURN key_json;
END
$fn$",
        settings = crate::event::canonical_text_sets(" ")
    )
}

/// The transition table of [`check_tombstone_function`]'s statement trigger.
const NEW_ROWS: &str = "pgrelay_new_rows";

/// The trigger function `pgrelay.check_tombstone(key columns…)`, fired after
/// an insert statement (with its new rows as a transition table), or after a
/// row moved to a new key, once the unique checks passed: refuses the write,
/// as a serialization failure the application retries, when a new row's key
/// holds a tombstone at or above the row's stamp. That happens only when a
/// delete of the key committed after the row took its stamp (a tombstone
/// committed before is below every stamp taken since: the clock is past
/// it), and would leave the row below its own region's tombstone: kept
/// here, dropped everywhere else. Its common cost, per statement, is one
/// index probe (the table's newest tombstone) and one pass over the new
/// rows' stamps; keys are compared only when a stamp is not above it. With
/// the extension the trigger is its C fast path, `check_tombstone_c`, which
/// hands this function the call when a stamp is not above that tombstone.
fn check_tombstone_function() -> String {
    format!(
        "CREATE OR REPLACE FUNCTION pgrelay.check_tombstone() RETURNS trigger LANGUAGE plpgsql \
         {DEFINER} AS $fn$
-- the new rows carry the application's column names: a name that is also a
-- variable here means the variable
#variable_conflict use_variable
DECLARE
    name text := TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME;
    found boolean;
BEGIN
    IF TG_LEVEL = 'ROW' THEN
        IF coalesce((SELECT max(t.hlc) FROM pgrelay.tombstones t WHERE t.table_name = name), -1)
                < NEW.{HLC_COLUMN}
            OR NOT EXISTS (
                SELECT 1 FROM pgrelay.tombstones t
                WHERE t.table_name = name AND t.hlc >= NEW.{HLC_COLUMN}
                  AND t.pk IN (pgrelay.row_key(NEW, TG_ARGV), '{{}}'::jsonb)) THEN
            RETURN NULL;
        END IF;
    ELSIF NOT EXISTS (
        SELECT 1 FROM {NEW_ROWS} n
        WHERE n.{HLC_COLUMN} <= (SELECT max(t.hlc) FROM pgrelay.tombstones t WHERE t.table_name = name)) THEN
        RETURN NULL;
    ELSE
        -- the transition table's rows are records: typed as the table's
        -- ((n.*) is the whole row, even where the table has a column n)
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM {NEW_ROWS} n JOIN pgrelay.tombstones t
                ON t.table_name = $1 AND t.hlc >= n.{HLC_COLUMN}
               AND t.pk IN (pgrelay.row_key((n.*)::%s, $2), ''{{}}''::jsonb)
            WHERE n.{HLC_COLUMN} <= (SELECT max(m.hlc) FROM pgrelay.tombstones m
                                    WHERE m.table_name = $1))', TG_RELID::regclass)
            INTO found USING name, TG_ARGV;
        IF NOT found THEN
            RETURN NULL;
        END IF;
    END IF;
    RAISE EXCEPTION 'pgrelay: a delete of a key written to %.% committed after the new row took its stamp',
        TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = 'serialization_failure',
              HINT = 'retry the transaction: it stamps the row anew, above the delete';
END
$fn$"
    )
}

/// Every PL/pgSQL function pgrelay's triggers call: none is for anybody
/// else to call (the clock's are revoked by [`hlc::sql_clock_functions`]).
const REVOKE_TRIGGER_FUNCTIONS: &str = "REVOKE ALL ON FUNCTION pgrelay.stamp_row(), \
    pgrelay.record_delete(), pgrelay.record_key_move(), pgrelay.record_truncate(), \
    pgrelay.check_tombstone(), pgrelay.row_key(anyelement, text[]), pgrelay.fence_guard(), \
    pgrelay.refuse_write(), pgrelay.merge_row() FROM PUBLIC";

/// `pgrelay.wait_for(source, lsn, timeout)`: read your writes across
/// regions. Returns true once this region has applied every change `source`
/// committed before `lsn` (a position in the source's WAL, such as
/// `pg_current_wal_insert_lsn()` read there after the write committed),
/// false when `timeout` passes first. Each partition of the source's topic
/// stores how far its changes are applied (`pgrelay.offsets.source_lsn`,
/// moved by changes and by the progress records the source's capture side
/// sends to every partition), so the answer is true when every partition
/// has reached `lsn` and no change `source` committed before `lsn` is
/// parked (`pgrelay.parked`: dead-lettered, not yet applied by `dlq
/// replay`; its partition's position moved past it all the same). Polls
/// every 10 ms; each poll sees what has committed
/// (call it outside a `REPEATABLE READ` transaction). `SECURITY DEFINER`:
/// callers need no privilege on `pgrelay.offsets`.
fn wait_for_function(config: &Config, region: &str) -> String {
    let sources: Vec<String> = config
        .regions
        .keys()
        .filter(|r| r.as_str() != region)
        .map(|r| quote_literal(r))
        .collect();
    let prefix = quote_literal(&format!("{}.", config.prefix));
    let suffix = quote_literal(&format!(".{region}"));
    format!(
        "CREATE OR REPLACE FUNCTION pgrelay.wait_for(source text, lsn pg_lsn, timeout interval DEFAULT '10s') \
         RETURNS boolean LANGUAGE plpgsql {DEFINER} AS $fn$
DECLARE
    deadline timestamptz := clock_timestamp() + timeout;
    reached int;
    known int;
BEGIN
    IF source = {here} THEN
        RETURN true;
    END IF;
    IF source IS NULL OR source <> ALL (ARRAY[{sources}]::text[]) THEN
        RAISE EXCEPTION 'pgrelay.wait_for: % is not a region this region applies changes from (one of: %)',
            source, array_to_string(ARRAY[{sources}]::text[], ', ')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    LOOP
        SELECT count(*) FILTER (WHERE o.source_lsn >= lsn), count(*) INTO reached, known
            FROM pgrelay.offsets o WHERE o.topic = {prefix} || source || {suffix};
        IF reached >= greatest(known, {partitions}) AND NOT EXISTS (
            SELECT 1 FROM pgrelay.parked p
            WHERE p.topic = {prefix} || source || {suffix} AND p.commit_lsn < lsn)
        THEN
            RETURN true;
        END IF;
        IF clock_timestamp() >= deadline THEN
            RETURN false;
        END IF;
        PERFORM pg_sleep(0.01);
    END LOOP;
END
$fn$",
        here = quote_literal(region),
        sources = sources.join(", "),
        partitions = config.capture.topic_partitions,
    )
}

/// Which trigger functions the replicated tables get, the stamp trigger, the
/// fence guard and the insert's tombstone check: C ones from the `pgrelay`
/// extension (the check's rare path still in PL/pgSQL) or PL/pgSQL ones;
/// both kinds compute the same stamps (`hlc.rs`) and refuse the same
/// writes. The caller decides from `relay.capture.stamp_trigger` and what
/// the server offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stamp {
    /// `pgrelay.stamp_row_c`, from the `pgrelay` extension (`extension/`).
    C,
    /// `pgrelay.stamp_row()` in PL/pgSQL.
    Plpgsql,
}

/// The extension providing the C stamp trigger.
pub const EXTENSION: &str = "pgrelay";

/// Creates the extension in schema pgrelay (the setup role needs the right
/// to create an untrusted-language extension: a superuser, usually).
pub const CREATE_EXTENSION_SQL: &str = "CREATE SCHEMA IF NOT EXISTS pgrelay; \
    CREATE EXTENSION IF NOT EXISTS pgrelay SCHEMA pgrelay; ALTER EXTENSION pgrelay UPDATE";

/// The row trigger that stamps `table`'s writes.
pub fn stamp_trigger_sql(table: &str, stamp: Stamp, region_id: u8) -> String {
    let function = match stamp {
        Stamp::C => format!(
            "pgrelay.stamp_row_c('{region_id}', {})",
            quote_literal(HLC_COLUMN)
        ),
        Stamp::Plpgsql => "pgrelay.stamp_row()".to_string(),
    };
    format!(
        "CREATE TRIGGER pgrelay_stamp BEFORE INSERT OR UPDATE ON {table} \
         FOR EACH ROW EXECUTE FUNCTION {function}"
    )
}

/// The statement trigger that refuses local writes while the region is
/// fenced. The C guard reads `pgrelay.fence` with the latest snapshot, so a
/// transaction whose snapshot predates the fence is refused too; the
/// PL/pgSQL one reads it with the statement's snapshot.
pub fn fence_trigger_sql(table: &str, stamp: Stamp) -> String {
    let function = match stamp {
        Stamp::C => "pgrelay.fence_guard_c()",
        Stamp::Plpgsql => "pgrelay.fence_guard()",
    };
    format!(
        "CREATE TRIGGER pgrelay_fence BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON {table} \
         FOR EACH STATEMENT EXECUTE FUNCTION {function}"
    )
}

/// The region's clock: schema `pgrelay`, its two sequences and functions
/// (see [`hlc::sql_clock_functions`]); the first statements of [`plan`].
pub fn clock_sql(region_id: u8) -> Vec<String> {
    let mut sql = vec![
        "CREATE SCHEMA IF NOT EXISTS pgrelay".to_string(),
        format!("CREATE SEQUENCE IF NOT EXISTS {}", hlc::SEQUENCE),
        format!("CREATE SEQUENCE IF NOT EXISTS {}", hlc::GENERATION),
    ];
    sql.extend(hlc::sql_clock_functions(region_id));
    sql
}

/// The SQL statements that bring a region's database up to date. `keys`
/// gives each declared table's primary key (the caller reads the catalog and
/// reports tables without one before calling this); `stamp`, the stamp
/// trigger (with [`Stamp::C`] the extension must exist already);
/// `installed`, the versions of pgrelay's tables the database holds (see
/// [`schema`]): the migrations it lacks come first, then every object that
/// follows the config, re-created.
pub fn plan(
    config: &Config,
    region: &str,
    keys: &dyn Fn(&TableName) -> KeyColumns,
    stamp: Stamp,
    installed: &schema::Installed,
) -> Vec<String> {
    let region_id = config.regions[region].id;
    let mut sql = clock_sql(region_id);
    // pgrelay's tables: the migrations this database lacks
    sql.extend(schema::upgrade_sql(&installed.pending(config.has_dr())));
    sql.extend(functions_sql(config, region, region_id));
    sql.extend(crate::merge::setup_functions());
    let mut published = Vec::new();
    for table in config.replicated_tables() {
        published.push(table.name.quoted());
        sql.extend(table_sql(
            config,
            region,
            table,
            &keys(&table.name),
            stamp,
            region_id,
        ));
    }
    published.push("pgrelay.tombstones".to_string());
    sql.push(publication_sql(config.publication_name(), &published));
    sql.extend(origins_sql(config, region));
    sql
}

/// pgrelay's view and functions, re-created: the watermarks view, the
/// stamp, merge, tombstone, fence and ownership trigger functions, then the
/// `REVOKE` that keeps them from `PUBLIC`.
fn functions_sql(config: &Config, region: &str, region_id: u8) -> Vec<String> {
    vec![
        wait_for_function(config, region),
        // per source: what every apply session has reached (the least of
        // them), and when anything was last applied
        "CREATE OR REPLACE VIEW pgrelay.watermarks AS \
            SELECT source_region, min(hlc) AS hlc, min(commit_lsn) AS commit_lsn, \
            min(commit_time) AS commit_time, max(applied_at) AS applied_at \
            FROM pgrelay.watermark_parts GROUP BY source_region"
            .to_string(),
        hlc::sql_stamp_row_function(region_id, HLC_COLUMN),
        crate::merge::sql_merge_row_function(region_id),
        // a deleted row's key keeps the delete's stamp
        tombstone_function(
            "record_delete",
            &format!("pgrelay.next_hlc(OLD.{HLC_COLUMN})"),
            "OLD",
        ),
        // a row moved to a new key: its old key keeps the move's stamp
        tombstone_function("record_key_move", &format!("NEW.{HLC_COLUMN}"), "NEW"),
        row_key_function(),
        check_tombstone_function(),
        record_truncate_function(),
        fence_guard_function(),
        refuse_write_function(),
        REVOKE_TRIGGER_FUNCTIONS.to_string(),
    ]
}

/// `pgrelay.record_truncate()`: a truncate leaves the table-wide tombstone
/// (key `{}`).
fn record_truncate_function() -> String {
    format!("CREATE OR REPLACE FUNCTION pgrelay.record_truncate() RETURNS trigger LANGUAGE plpgsql {DEFINER} AS $fn$
BEGIN
    INSERT INTO pgrelay.tombstones (table_name, pk, hlc)
    VALUES (TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, '{{}}'::jsonb, pgrelay.next_hlc(0))
    ON CONFLICT (table_name, pk) DO UPDATE SET hlc = excluded.hlc, deleted_at = now();
    RETURN NULL;
END
$fn$")
}

/// `pgrelay.fence_guard()`: refuses local writes while the region is
/// fenced. Statement-level, so an unfenced region pays one lookup per
/// statement.
fn fence_guard_function() -> String {
    format!(
        "CREATE OR REPLACE FUNCTION pgrelay.fence_guard() RETURNS trigger LANGUAGE plpgsql \
         {DEFINER} AS $fn$
DECLARE
    f record;
BEGIN
    SELECT region, fenced_at, reason INTO f FROM pgrelay.fence LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'region % is fenced (since %): local writes to %.% are refused',
            f.region, f.fenced_at, TG_TABLE_SCHEMA, TG_TABLE_NAME
            USING ERRCODE = 'read_only_sql_transaction',
                  HINT = coalesce('reason: ' || f.reason || '; ', '')
                      || 'lift it with pgrelay unfence --region ' || f.region;
    END IF;
    RETURN NULL;
END
$fn$"
    )
}

/// `pgrelay.refuse_write(owner)`: refuses writes to an `owned` table
/// outside its owner region.
fn refuse_write_function() -> String {
    format!("CREATE OR REPLACE FUNCTION pgrelay.refuse_write() RETURNS trigger LANGUAGE plpgsql {DEFINER} AS $fn$
BEGIN
    RAISE EXCEPTION 'table %.% is owned by region %: write it there, it replicates here',
        TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_ARGV[0]
        USING ERRCODE = 'insufficient_privilege';
END
$fn$")
}

/// One replicated table's setup (`keys`: its primary key): the stamp
/// column, replica identity, stamp, tombstone, merge, truncate and fence
/// triggers, and the ownership guard.
fn table_sql(
    config: &Config,
    region: &str,
    table: &TableConfig,
    keys: &KeyColumns,
    stamp: Stamp,
    region_id: u8,
) -> Vec<String> {
    let t = table.name.quoted();
    let mut sql = vec![format!(
        "ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {} bigint",
        quote_ident(HLC_COLUMN)
    )];
    let identity = if config.table_needs_full_identity(table) {
        "FULL"
    } else {
        "DEFAULT"
    };
    sql.push(format!("ALTER TABLE {t} REPLICA IDENTITY {identity}"));
    sql.push(format!("DROP TRIGGER IF EXISTS pgrelay_stamp ON {t}"));
    sql.push(stamp_trigger_sql(&t, stamp, region_id));
    sql.extend(tombstone_triggers_sql(&t, table, keys, stamp));
    sql.extend(crate::merge::table_setup(&t, table));
    sql.push(format!("DROP TRIGGER IF EXISTS pgrelay_truncate ON {t}"));
    sql.push(format!(
        "CREATE TRIGGER pgrelay_truncate BEFORE TRUNCATE ON {t} \
         FOR EACH STATEMENT EXECUTE FUNCTION pgrelay.record_truncate()"
    ));
    // fires in local sessions only: apply runs as session_replication_role
    // = replica, so a fenced region still receives the others' changes
    sql.push(format!("DROP TRIGGER IF EXISTS pgrelay_fence ON {t}"));
    sql.push(fence_trigger_sql(&t, stamp));
    sql.extend(owned_guard_sql(&t, table, region));
    sql
}

/// The triggers that keep a table's tombstones (`t`: the quoted table,
/// `keys`: its primary key): on delete, on a key move, and the checks after
/// inserts and key moves.
fn tombstone_triggers_sql(
    t: &str,
    table: &TableConfig,
    keys: &KeyColumns,
    stamp: Stamp,
) -> Vec<String> {
    let home = match &table.class {
        TableClass::Partitioned { home_column, .. } => {
            Some(quote_literal(&format!("home:{home_column}")))
        }
        _ => None,
    };
    let key_args = keys.iter().map(|k| quote_literal(k)).collect::<Vec<_>>();
    let args = key_args
        .iter()
        .cloned()
        .chain(home)
        .collect::<Vec<_>>()
        .join(", ");
    let key_args = key_args.join(", ");
    let check = match stamp {
        Stamp::C => "check_tombstone_c",
        Stamp::Plpgsql => "check_tombstone",
    };
    let mut sql = vec![
        format!("DROP TRIGGER IF EXISTS pgrelay_tombstone ON {t}"),
        format!(
            "CREATE TRIGGER pgrelay_tombstone BEFORE DELETE ON {t} \
             FOR EACH ROW EXECUTE FUNCTION pgrelay.record_delete({args})"
        ),
    ];
    // a row moved to a new key leaves its old key a tombstone under the
    // move's stamp, as the other regions record it from the delete the
    // move is published as (fires after pgrelay_stamp: triggers of one
    // event fire in name order)
    let key_list = keys.iter().map(|k| quote_ident(k)).collect::<Vec<_>>();
    let moved = key_list
        .iter()
        .map(|k| format!("OLD.{k} IS DISTINCT FROM NEW.{k}"))
        .collect::<Vec<_>>()
        .join(" OR ");
    let cols = key_list.join(", ");
    sql.push(format!(
        "DROP TRIGGER IF EXISTS pgrelay_tombstone_key ON {t}"
    ));
    sql.push(format!(
        "CREATE TRIGGER pgrelay_tombstone_key BEFORE UPDATE OF {cols} ON {t} \
         FOR EACH ROW WHEN ({moved}) EXECUTE FUNCTION pgrelay.record_key_move({args})"
    ));
    // after the unique check: a delete of the key that committed after
    // the new row took its stamp refuses the row (check_tombstone)
    sql.push(format!(
        "DROP TRIGGER IF EXISTS pgrelay_tombstone_check ON {t}"
    ));
    sql.push(format!(
        "CREATE TRIGGER pgrelay_tombstone_check AFTER INSERT ON {t} \
         REFERENCING NEW TABLE AS {NEW_ROWS} \
         FOR EACH STATEMENT EXECUTE FUNCTION pgrelay.{check}({key_args})"
    ));
    sql.push(format!(
        "DROP TRIGGER IF EXISTS pgrelay_tombstone_check_key ON {t}"
    ));
    sql.push(format!(
        "CREATE TRIGGER pgrelay_tombstone_check_key AFTER UPDATE OF {cols} ON {t} \
         FOR EACH ROW WHEN ({moved}) EXECUTE FUNCTION pgrelay.{check}({key_args})"
    ));
    sql
}

/// The guard of an `owned` table outside its owner region: local writes
/// and truncates refused. Dropped first everywhere, so a table whose owner
/// changed loses it.
fn owned_guard_sql(t: &str, table: &TableConfig, region: &str) -> Vec<String> {
    let mut sql = vec![
        format!("DROP TRIGGER IF EXISTS pgrelay_owned_guard ON {t}"),
        format!("DROP TRIGGER IF EXISTS pgrelay_owned_guard_truncate ON {t}"),
    ];
    if let TableClass::Owned { owner } = &table.class {
        if owner != region {
            let owner = quote_literal(owner);
            sql.push(format!(
                "CREATE TRIGGER pgrelay_owned_guard BEFORE INSERT OR UPDATE OR DELETE ON {t} \
                 FOR EACH ROW EXECUTE FUNCTION pgrelay.refuse_write({owner})"
            ));
            sql.push(format!(
                "CREATE TRIGGER pgrelay_owned_guard_truncate BEFORE TRUNCATE ON {t} \
                 FOR EACH STATEMENT EXECUTE FUNCTION pgrelay.refuse_write({owner})"
            ));
        }
    }
    sql
}

/// The publication of `published` (quoted table names), created or set.
fn publication_sql(publication_name: &str, published: &[String]) -> String {
    let publication = quote_ident(publication_name);
    let list = published.join(", ");
    format!(
        "DO $do$ BEGIN
    IF EXISTS (SELECT 1 FROM pg_publication WHERE pubname = {name}) THEN
        ALTER PUBLICATION {publication} SET TABLE {list};
    ELSE
        CREATE PUBLICATION {publication} FOR TABLE {list};
    END IF;
END $do$",
        name = quote_literal(publication_name),
    )
}

/// The replication origins the apply side writes under: one per other
/// region and apply session, and the replay origin; each created if
/// missing.
fn origins_sql(config: &Config, region: &str) -> Vec<String> {
    config
        .regions
        .keys()
        .filter(|r| *r != region)
        .flat_map(|r| {
            (0..config.apply.sessions_per_source.max(1))
                .map(move |g| crate::names::origin_name(r, g))
        })
        .chain(std::iter::once(crate::names::REPLAY_ORIGIN.to_string()))
        .map(|origin| {
            let origin = quote_literal(&origin);
            format!(
                "SELECT pg_replication_origin_create({origin}) \
                 WHERE NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = {origin})"
            )
        })
        .collect()
}

/// SQL creating the region's logical replication slot if it is missing.
/// Run outside the setup transaction (a slot cannot be created in a
/// transaction that has written). On PostgreSQL 17+ (`server_version_num`)
/// it is a failover slot: standbys with `sync_replication_slots` keep a
/// copy, so a promoted standby carries it.
pub fn slot_sql(config: &Config, region: &str, server_version_num: i32) -> String {
    let slot = quote_literal(&config.slot_name(region));
    let args = if crate::source::server::failover_slots(server_version_num) {
        // temporary => false, twophase => false, failover => true
        format!("{slot}, 'pgoutput', false, false, true")
    } else {
        format!("{slot}, 'pgoutput'")
    };
    format!(
        "SELECT pg_create_logical_replication_slot({args}) \
         WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = {slot})"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        crate::config::parse(
            &format!(
                r#"
[kafka]
brokers = "127.0.0.1:9092"
[regions.us]
id = 1
dsn = "host=a"
[regions.eu]
id = 2
dsn = "host=b"
[[tables]]
name = "public.products"
class = "global"
[[tables]]
name = "public.orders"
class = "partitioned"
home_column = "country"
{extra}
"#
            ),
            "t.toml",
        )
        .unwrap()
    }

    fn identity(plan: &[String], table: &str) -> String {
        plan.iter()
            .find(|s| s.starts_with(&format!("ALTER TABLE {table} REPLICA IDENTITY")))
            .unwrap_or_else(|| panic!("no replica identity for {table}"))
            .clone()
    }

    #[test]
    fn the_slot_is_a_failover_slot_from_postgresql_17() {
        let c = config("");
        assert!(!slot_sql(&c, "us", 160_004).contains("true"));
        assert!(slot_sql(&c, "us", 170_000).contains("'pgoutput', false, false, true"));
        assert!(slot_sql(&c, "us", 180_006).contains("'pgoutput', false, false, true"));
    }

    #[test]
    fn replica_identity_follows_the_class_and_before_image() {
        let keys = |_: &TableName| vec!["id".to_string()];
        let plan = plan(
            &config(""),
            "us",
            &keys,
            Stamp::Plpgsql,
            &Default::default(),
        );
        assert!(identity(&plan, r#""public"."products""#).ends_with("DEFAULT"));
        assert!(identity(&plan, r#""public"."orders""#).ends_with("FULL"));
        let full = config("[relay.capture]\nbefore_image = \"full\"");
        let plan = super::plan(&full, "us", &keys, Stamp::Plpgsql, &Default::default());
        assert!(identity(&plan, r#""public"."products""#).ends_with("FULL"));
    }

    #[test]
    fn every_function_runs_with_pgrelays_rights_and_only_wait_for_is_public() {
        let keys = |_: &TableName| vec!["id".to_string()];
        let plan = plan(
            &config(""),
            "us",
            &keys,
            Stamp::Plpgsql,
            &Default::default(),
        );
        let functions: Vec<&String> = plan
            .iter()
            .filter(|s| s.starts_with("CREATE OR REPLACE FUNCTION"))
            .collect();
        assert!(functions.len() >= 11, "{functions:#?}");
        let revoked = plan
            .iter()
            .filter(|s| s.starts_with("REVOKE ALL ON FUNCTION"))
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        for f in functions {
            let head = &f[..f.find(" AS $fn$").unwrap()];
            assert!(
                head.contains("SECURITY DEFINER SET search_path = pg_catalog, pg_temp"),
                "{head}"
            );
            let name = head
                .trim_start_matches("CREATE OR REPLACE FUNCTION ")
                .split('(')
                .next()
                .unwrap();
            assert_eq!(
                revoked.contains(&format!("{name}(")),
                name != "pgrelay.wait_for",
                "{name}: {revoked}"
            );
        }
        // the insert path checks the key's tombstone after the unique check
        assert!(plan.iter().any(|s| s.starts_with(
            "CREATE TRIGGER pgrelay_tombstone_check AFTER INSERT ON \"public\".\"products\""
        )));
    }

    #[test]
    fn the_stamp_trigger_is_the_c_or_the_plpgsql_function() {
        let keys = |_: &TableName| vec!["id".to_string()];
        let stamps = |stamp| {
            plan(&config(""), "us", &keys, stamp, &Default::default())
                .into_iter()
                .filter(|s| s.starts_with("CREATE TRIGGER pgrelay_stamp "))
                .collect::<Vec<_>>()
        };
        let c = stamps(Stamp::C);
        let plpgsql = stamps(Stamp::Plpgsql);
        assert_eq!(c.len(), plpgsql.len());
        assert!(!c.is_empty());
        let id = config("").regions["us"].id;
        for s in &c {
            assert!(
                s.ends_with(&format!("pgrelay.stamp_row_c('{id}', '{HLC_COLUMN}')")),
                "{s}"
            );
        }
        assert!(plpgsql.iter().all(|s| s.ends_with("pgrelay.stamp_row()")));
    }
}
