//! What a region's database lacks for pgrelay, as a list of findings that
//! each name the thing to fix. `pgrelay check` prints them all; the capture
//! side refuses to start while any blocking one remains.

use std::fmt;

use crate::config::{Config, TableClass, TableConfig};
use crate::event::TableName;
use crate::source::catalog::{Catalog, CatalogError, SlotState, TableState};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Replication cannot run until this is fixed.
    Blocking,
    /// `pgrelay setup` fixes this.
    NeedsSetup,
    Warning,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.severity {
            Severity::Blocking => "error",
            Severity::NeedsSetup => "setup needed",
            Severity::Warning => "warning",
        };
        write!(f, "{tag}: {}", self.message)
    }
}

fn finding(severity: Severity, message: String) -> Finding {
    Finding { severity, message }
}

/// Checks the server settings and every declared table. `after_setup`
/// also checks the objects `pgrelay setup` creates.
pub async fn database(
    config: &Config,
    region: &str,
    catalog: &Catalog<'_>,
    after_setup: bool,
) -> Result<Vec<Finding>, CatalogError> {
    let mut out = server(region, catalog).await?;
    let mut partitioned_roots = Vec::new();
    for (name, class, state) in catalog.tables(config).await? {
        out.extend(table(config, region, &name, &class, &state, after_setup));
        if state.exists && !matches!(class, TableClass::Local) && state.partitioned_root {
            partitioned_roots.push(name);
        }
    }
    // pgrelay's tables: a database set up by a newer pgrelay is refused
    // whether or not setup has run here; one behind needs setup
    let verdict = catalog.schema_versions().await?.verdict(config.has_dr());
    out.extend(schema_version(region, &verdict, after_setup));
    if after_setup {
        out.extend(privileges(config, region, catalog).await?);
        let slot = config.slot_name(region);
        out.extend(slot_finding(
            region,
            &slot,
            catalog.slot(&slot).await?.as_ref(),
        ));
        let publication = config.publication_name();
        let tables = catalog.publication_tables(publication).await?;
        out.extend(publication_findings(
            config,
            region,
            publication,
            tables.as_deref(),
            &partitioned_roots,
        ));
    }
    Ok(out)
}

/// The server settings and role attribute replication needs.
async fn server(region: &str, catalog: &Catalog<'_>) -> Result<Vec<Finding>, CatalogError> {
    let mut out = Vec::new();
    let wal_level = catalog.setting("wal_level").await?;
    if wal_level != "logical" {
        out.push(finding(
            Severity::Blocking,
            format!(
                "region {region}: wal_level is '{wal_level}'; set wal_level = logical in postgresql.conf and restart PostgreSQL"
            ),
        ));
    }
    if catalog.setting("track_commit_timestamp").await? != "on" {
        out.push(finding(
            Severity::Warning,
            format!("region {region}: track_commit_timestamp is off; turn it on to let applications read write times of replicated rows"),
        ));
    }
    if !catalog.can_replicate().await? {
        let (role, _) = catalog.current_role().await?;
        out.push(finding(
            Severity::Blocking,
            format!(
                "region {region}: role {role} lacks the REPLICATION attribute; a superuser \
                 runs: ALTER ROLE {} REPLICATION",
                crate::event::quote_ident(&role)
            ),
        ));
    }
    Ok(out)
}

/// One declared table as the region has it: it exists, is no partitioned
/// root, has a usable key and the columns its rules name; with
/// `after_setup`, what setup gives it too. A local table only needs to
/// exist.
fn table(
    config: &Config,
    region: &str,
    name: &TableName,
    class: &TableClass,
    state: &TableState,
    after_setup: bool,
) -> Vec<Finding> {
    if !state.exists {
        return vec![finding(
            Severity::Blocking,
            format!("region {region}: declared table {name} does not exist; create it or remove it from [[tables]]"),
        )];
    }
    if matches!(class, TableClass::Local) {
        return Vec::new();
    }
    if state.partitioned_root {
        // its changes arrive under each partition's name, its triggers
        // would record partition names: not supported, refused up front
        return vec![finding(
            Severity::Blocking,
            format!(
                "region {region}: table {name} is declaratively partitioned (PARTITION BY); \
                 pgrelay does not replicate partitioned tables: remove it from [[tables]] \
                 or declare it class = \"local\" (or replicate a regular table instead)"
            ),
        )];
    }
    let mut out = Vec::new();
    if state.primary_key.is_empty() {
        out.push(finding(
            Severity::Blocking,
            format!("region {region}: table {name} has no primary key; pgrelay needs one to key records and resolve conflicts (ALTER TABLE {name} ADD PRIMARY KEY (...))"),
        ));
    }
    if let Some(constraint) = &state.deferrable_key {
        out.push(finding(
            Severity::Blocking,
            deferrable_key_message(region, name, constraint, &state.primary_key),
        ));
    }
    if let Some(t) = config.table(name) {
        out.extend(column_rules(region, t, state));
    }
    if after_setup {
        let full = match config.table(name) {
            Some(t) => config.table_needs_full_identity(t),
            None => config.needs_full_identity(class),
        };
        out.extend(replica_identity(region, name, full, state.replica_identity));
        if !state.has_stamp_column
            || !state.triggers.iter().any(|t| t == "pgrelay_stamp")
            || !state.triggers.iter().any(|t| t == "pgrelay_tombstone")
        {
            out.push(finding(
                Severity::NeedsSetup,
                format!("region {region}: table {name} lacks pgrelay's stamp column or triggers; run pgrelay setup"),
            ));
        }
    }
    out
}

/// The columns a table's declaration names (column rules, merge columns,
/// the home column), against the table's columns and key.
fn column_rules(region: &str, t: &TableConfig, state: &TableState) -> Vec<Finding> {
    let name = &t.name;
    let mut out = Vec::new();
    for rule in &t.columns {
        if !rule.present_in(&state.columns) {
            // fail closed: the capture side would stop at the table's next change
            out.push(finding(
                Severity::Blocking,
                format!(
                    "region {region}: table {name} has no column {:?}, which a column rule names \
                     (renamed or dropped?); pgrelay publishes nothing of the table until the rule \
                     names the column's current name (formerly = [the old name]) or is removed",
                    rule.column
                ),
            ));
        }
        if rule
            .names()
            .any(|n| state.primary_key.iter().any(|k| k == n))
        {
            out.push(finding(
                Severity::Blocking,
                format!("region {region}: table {name}: column rule on primary key column {:?}; a key cannot be dropped, hashed or masked", rule.column),
            ));
        }
    }
    for m in &t.merge {
        if let Some(problem) = merge_problem(m, state) {
            out.push(finding(
                Severity::Blocking,
                format!("region {region}: table {name}: {problem}"),
            ));
        }
    }
    if let TableClass::Partitioned { home_column, .. } = &t.class {
        if !state.columns.contains(home_column) {
            out.push(finding(
                Severity::Blocking,
                format!("region {region}: table {name} has no home column {home_column:?}"),
            ));
        }
    }
    out
}

/// The replica identity a table has (`identity`: `d`efault, `f`ull,
/// `i`ndex, `n`othing) against the one it needs: FULL when `full`,
/// DEFAULT otherwise.
fn replica_identity(region: &str, name: &TableName, full: bool, identity: char) -> Option<Finding> {
    if full && identity != 'f' {
        Some(finding(
            Severity::NeedsSetup,
            format!("region {region}: table {name} needs REPLICA IDENTITY FULL; run pgrelay setup"),
        ))
    } else if !full && identity == 'f' {
        // works (updates just carry the whole old row): not a reason
        // to stop a sidecar that was set up before
        Some(finding(
            Severity::Warning,
            format!(
                "region {region}: table {name} has REPLICA IDENTITY FULL, which \
                 relay.capture.before_image = \"key\" does not need; run pgrelay setup \
                 to return it to DEFAULT (less WAL and decoding per update)"
            ),
        ))
    } else if !full && identity != 'd' {
        Some(finding(
            Severity::NeedsSetup,
            format!(
                "region {region}: table {name} has REPLICA IDENTITY {}; pgrelay needs \
                 DEFAULT (the primary key) so deletes carry the key; run pgrelay setup",
                match identity {
                    'n' => "NOTHING",
                    'i' => "USING INDEX",
                    _ => "unknown",
                }
            ),
        ))
    } else {
        None
    }
}

/// pgrelay's own tables: ahead of this pgrelay blocks; behind needs setup
/// (reported with `after_setup` only).
fn schema_version(
    region: &str,
    verdict: &crate::schema::Verdict,
    after_setup: bool,
) -> Option<Finding> {
    let message = verdict.problem(region)?;
    match verdict {
        crate::schema::Verdict::Ahead(_) => Some(finding(Severity::Blocking, message)),
        _ if after_setup => Some(finding(Severity::NeedsSetup, message)),
        _ => None,
    }
}

/// The region's replication slot (`state`: as the catalog has it, if at
/// all): present, not lost, decoding with pgoutput.
fn slot_finding(region: &str, slot: &str, state: Option<&SlotState>) -> Option<Finding> {
    match state {
        None => Some(finding(
            Severity::NeedsSetup,
            format!("region {region}: replication slot {slot} does not exist; run pgrelay setup"),
        )),
        Some(s) if s.is_lost() => Some(finding(
            Severity::NeedsSetup,
            crate::source::catalog::lost_slot_message(region, slot),
        )),
        Some(s) if s.plugin != "pgoutput" => Some(finding(
            Severity::Blocking,
            format!("region {region}: replication slot {slot} uses plugin {}; drop it and run pgrelay setup", s.plugin),
        )),
        Some(_) => None,
    }
}

/// The publication (`tables`: the tables it lists, `None`: it does not
/// exist) lists every replicated table and no local one; partitioned roots,
/// refused already, are not checked.
fn publication_findings(
    config: &Config,
    region: &str,
    publication: &str,
    tables: Option<&[TableName]>,
    partitioned_roots: &[TableName],
) -> Vec<Finding> {
    let Some(tables) = tables else {
        return vec![finding(
            Severity::NeedsSetup,
            format!("region {region}: publication {publication} does not exist; run pgrelay setup"),
        )];
    };
    let mut out = Vec::new();
    for t in config
        .tables
        .iter()
        .filter(|t| !partitioned_roots.contains(&t.name))
    {
        let listed = tables.contains(&t.name);
        let local = matches!(t.class, TableClass::Local);
        if listed == local {
            out.push(finding(
                Severity::NeedsSetup,
                format!(
                    "region {region}: publication {publication} {} table {}; run pgrelay setup",
                    if local { "includes local" } else { "lacks" },
                    t.name
                ),
            ));
        }
    }
    out
}

/// What the connected role (the sidecar's run role) lacks, each finding
/// with the `GRANT` that fixes it; a warning when it is a superuser.
async fn privileges(
    config: &Config,
    region: &str,
    catalog: &Catalog<'_>,
) -> Result<Vec<Finding>, CatalogError> {
    let (role, superuser) = catalog.current_role().await?;
    if superuser {
        let mut out = foreign_grants(config, region, catalog, &role).await?;
        out.push(finding(
            Severity::Warning,
            format!(
                "region {region}: the sidecar connects as superuser {role}; give regions.{region}.dsn \
                 a role with only what it needs (docs/security.md, Roles: least privilege)"
            ),
        ));
        return Ok(out);
    }
    let mut out = foreign_grants(config, region, catalog, &role).await?;
    let parameters = catalog.has_parameter_privileges().await?;
    for need in crate::privileges::needs(config, parameters) {
        let missing = catalog.missing_privileges(&need, &role).await?;
        if missing.is_empty() {
            continue;
        }
        out.push(finding(
            Severity::Blocking,
            format!(
                "region {region}: role {role} lacks {} on {}; run: {} (pgrelay setup grants it \
                 when regions.{region}.setup_dsn is set)",
                missing.join(", "),
                need.describe(),
                need.grant(&missing, &role)
            ),
        ));
    }
    Ok(out)
}

/// Roles other than the setup role (the owner), the run role and superusers
/// that hold privileges on pgrelay's objects, each a warning with the
/// `REVOKE` that takes them back: application roles need none, and with
/// them a role can stop the region's clock or forge tombstones.
async fn foreign_grants(
    config: &Config,
    region: &str,
    catalog: &Catalog<'_>,
    connected: &str,
) -> Result<Vec<Finding>, CatalogError> {
    let mut run_roles = vec![connected.to_string()];
    run_roles.extend(config.regions[region].grantee());
    Ok(catalog
        .foreign_grants(&run_roles)
        .await?
        .into_iter()
        .map(|g| {
            finding(
                Severity::Warning,
                format!(
                    "region {region}: role {} holds {} on {} {}, which only pgrelay's own roles \
                     need (application roles need nothing of pgrelay's); run: {}",
                    g.grantee,
                    g.privileges.join(", "),
                    g.kind.to_lowercase(),
                    g.object,
                    g.revoke()
                ),
            )
        })
        .collect())
}

/// What makes merge column `m` impossible on a table of this shape: a key
/// column, a `counter` that is not a number, a `union` that is not an
/// array, a column the table lacks.
pub fn merge_problem(
    m: &crate::config::MergeColumn,
    state: &crate::source::catalog::TableState,
) -> Option<String> {
    use crate::config::MergeKind;
    let column = &m.column;
    let Some(i) = state.columns.iter().position(|c| c == column) else {
        return Some(format!(
            "no column {column:?}, which merge = \"{}\" names (renamed or dropped?)",
            m.kind.as_str()
        ));
    };
    if state.primary_key.contains(column) {
        return Some(format!(
            "column {column:?} is part of the primary key: a key cannot be merged; remove its \
             merge setting"
        ));
    }
    let ty = state.column_types.get(i).map_or("", String::as_str);
    match m.kind {
        MergeKind::Counter if !is_numeric_type(ty) => Some(format!(
            "column {column:?} has type {ty}; merge = \"counter\" needs a number (smallint, \
             integer, bigint, numeric, real, double precision)"
        )),
        MergeKind::Union if !ty.ends_with("[]") => Some(format!(
            "column {column:?} has type {ty}; merge = \"union\" needs an array (text[], \
             integer[], ...)"
        )),
        _ => None,
    }
}

fn is_numeric_type(ty: &str) -> bool {
    let base = ty.split('(').next().unwrap_or("").trim();
    matches!(
        base,
        "smallint" | "integer" | "bigint" | "numeric" | "real" | "double precision"
    )
}

/// A `DEFERRABLE` primary key cannot be a replica identity (so the
/// table's own updates and deletes would fail once published) nor the
/// arbiter of the apply side's `ON CONFLICT`. PostgreSQL cannot alter a
/// key's deferrability in place: the fix recreates the constraint.
fn deferrable_key_message(
    region: &str,
    table: &crate::event::TableName,
    constraint: &str,
    key: &[String],
) -> String {
    use crate::event::quote_ident;
    let t = table.quoted();
    let c = quote_ident(constraint);
    let columns: Vec<String> = key.iter().map(|k| quote_ident(k)).collect();
    format!(
        "region {region}: table {table} has a DEFERRABLE primary key ({constraint}); pgrelay needs \
         it checked at once, to be the table's replica identity and the target of its upserts. \
         Recreate it NOT DEFERRABLE (foreign keys that reference it must be dropped and added \
         back around this): ALTER TABLE {t} DROP CONSTRAINT {c}, ADD CONSTRAINT {c} PRIMARY KEY \
         ({})",
        columns.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{MergeColumn, MergeKind};

    fn state() -> TableState {
        TableState {
            exists: true,
            primary_key: vec!["id".into()],
            deferrable_key: None,
            replica_identity: 'f',
            partitioned_root: false,
            has_stamp_column: true,
            triggers: vec![],
            columns: vec!["id".into(), "n".into(), "label".into(), "tags".into()],
            column_types: vec![
                "integer".into(),
                "numeric(12,2)".into(),
                "text".into(),
                "text[]".into(),
            ],
            json_columns: vec![],
        }
    }

    fn problem(column: &str, kind: MergeKind) -> Option<String> {
        merge_problem(
            &MergeColumn {
                column: column.into(),
                kind,
            },
            &state(),
        )
    }

    const TABLES: &str = r#"
[[tables]]
name = "sessions"
class = "local"

[[tables]]
name = "orders"
class = "owned"
owner = "us"
columns = [{ name = "email", action = "drop" }]
"#;

    fn config() -> Config {
        crate::config::test_config(&["us", "eu"], TABLES)
    }

    fn orders_state() -> TableState {
        TableState {
            replica_identity: 'd',
            triggers: vec!["pgrelay_stamp".into(), "pgrelay_tombstone".into()],
            columns: vec!["id".into(), "email".into()],
            column_types: vec!["integer".into(), "text".into()],
            ..state()
        }
    }

    fn orders(state: &TableState, after_setup: bool) -> Vec<Finding> {
        let config = config();
        let name = TableName::new("public", "orders");
        let class = config.table(&name).unwrap().class.clone();
        table(&config, "us", &name, &class, state, after_setup)
    }

    #[test]
    fn a_table_set_up_as_declared_has_no_findings() {
        assert_eq!(orders(&orders_state(), true), vec![]);
    }

    #[test]
    fn a_missing_or_partitioned_table_gets_one_blocking_finding() {
        let missing = TableState {
            exists: false,
            primary_key: vec![],
            ..orders_state()
        };
        let found = orders(&missing, true);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].severity, Severity::Blocking);
        assert!(found[0].message.contains("does not exist"), "{found:?}");
        let root = TableState {
            partitioned_root: true,
            has_stamp_column: false,
            ..orders_state()
        };
        let found = orders(&root, true);
        assert_eq!(found.len(), 1);
        assert!(found[0].message.contains("PARTITION BY"), "{found:?}");
    }

    #[test]
    fn a_local_table_only_needs_to_exist() {
        let config = config();
        let name = TableName::new("public", "sessions");
        let bare = TableState {
            primary_key: vec![],
            has_stamp_column: false,
            ..state()
        };
        assert_eq!(
            table(&config, "us", &name, &TableClass::Local, &bare, true),
            vec![]
        );
    }

    #[test]
    fn key_rules_and_setup_objects_are_checked_in_order() {
        let state = TableState {
            primary_key: vec!["email".into()],
            triggers: vec!["pgrelay_stamp".into()],
            ..orders_state()
        };
        let found: Vec<(Severity, bool)> = orders(&state, true)
            .into_iter()
            .map(|f| {
                (
                    f.severity,
                    f.message.contains("primary key column \"email\""),
                )
            })
            .collect();
        assert_eq!(
            found,
            vec![(Severity::Blocking, true), (Severity::NeedsSetup, false)]
        );
        // before setup, only what blocks replication
        assert_eq!(orders(&state, false).len(), 1);
        let no_key = TableState {
            primary_key: vec![],
            columns: vec!["id".into()],
            ..orders_state()
        };
        let found = orders(&no_key, false);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].message.contains("has no primary key"));
        assert!(found[1].message.contains("has no column \"email\""));
    }

    #[test]
    fn replica_identity_is_full_only_where_needed() {
        let name = TableName::new("public", "orders");
        let severity =
            |full, identity| replica_identity("us", &name, full, identity).map(|f| f.severity);
        assert_eq!(severity(true, 'f'), None);
        assert_eq!(severity(true, 'd'), Some(Severity::NeedsSetup));
        assert_eq!(severity(false, 'd'), None);
        assert_eq!(severity(false, 'f'), Some(Severity::Warning));
        assert_eq!(severity(false, 'n'), Some(Severity::NeedsSetup));
        let index = replica_identity("us", &name, false, 'i').unwrap();
        assert!(
            index.message.contains("REPLICA IDENTITY USING INDEX"),
            "{index}"
        );
    }

    #[test]
    fn the_slot_must_exist_decode_pgoutput_and_not_be_lost() {
        let slot = |plugin: &str, wal_status: &str| SlotState {
            plugin: plugin.into(),
            active: false,
            confirmed_flush: crate::event::Lsn(0),
            current_wal: crate::event::Lsn(0),
            retained_bytes: 0,
            wal_status: wal_status.into(),
        };
        let severity =
            |state: Option<&SlotState>| slot_finding("us", "s", state).map(|f| f.severity);
        assert_eq!(severity(Some(&slot("pgoutput", "reserved"))), None);
        assert_eq!(severity(None), Some(Severity::NeedsSetup));
        assert_eq!(
            severity(Some(&slot("pgoutput", "lost"))),
            Some(Severity::NeedsSetup)
        );
        assert_eq!(
            severity(Some(&slot("test_decoding", "reserved"))),
            Some(Severity::Blocking)
        );
    }

    #[test]
    fn the_publication_lists_replicated_tables_only() {
        let config = config();
        let orders = TableName::new("public", "orders");
        let sessions = TableName::new("public", "sessions");
        let messages = |tables: Option<&[TableName]>, roots: &[TableName]| -> Vec<String> {
            publication_findings(&config, "us", "pgrelay", tables, roots)
                .into_iter()
                .map(|f| f.message)
                .collect()
        };
        assert_eq!(
            messages(Some(std::slice::from_ref(&orders)), &[]),
            Vec::<String>::new()
        );
        assert_eq!(
            messages(None, &[]),
            ["region us: publication pgrelay does not exist; run pgrelay setup"]
        );
        assert_eq!(
            messages(Some(&[orders.clone(), sessions.clone()]), &[]),
            ["region us: publication pgrelay includes local table public.sessions; run pgrelay setup"]
        );
        assert_eq!(
            messages(Some(&[]), &[]),
            ["region us: publication pgrelay lacks table public.orders; run pgrelay setup"]
        );
        // a partitioned root is refused already
        assert_eq!(messages(Some(&[]), &[orders]), Vec::<String>::new());
    }

    #[test]
    fn merge_columns_must_fit_the_table() {
        assert_eq!(problem("n", MergeKind::Counter), None);
        assert_eq!(problem("tags", MergeKind::Union), None);
        let key = problem("id", MergeKind::Counter).unwrap();
        assert!(key.contains("primary key"), "{key}");
        let text = problem("label", MergeKind::Counter).unwrap();
        assert!(
            text.contains("type text") && text.contains("needs a number"),
            "{text}"
        );
        let scalar = problem("n", MergeKind::Union).unwrap();
        assert!(scalar.contains("needs an array"), "{scalar}");
        let gone = problem("stock", MergeKind::Counter).unwrap();
        assert!(gone.contains("no column \"stock\""), "{gone}");
    }
}
