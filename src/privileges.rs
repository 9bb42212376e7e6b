//! What the sidecar's own role (the run role) needs in a region's database:
//! one list, which `pgrelay setup` grants and `pgrelay check` verifies.
//!
//! The run role is never a superuser. Beyond `LOGIN REPLICATION` (role
//! attributes, set by an administrator) it needs:
//!
//! - `USAGE` on schema `pgrelay` and the schemas of the replicated tables;
//! - `SELECT, INSERT, UPDATE, DELETE` on the replicated tables (capture
//!   reads rows back, apply writes them) and on pgrelay's own tables;
//! - `EXECUTE` on `pgrelay.observe_hlc(bigint)` (apply moves the clock past
//!   what it applies; the clock's sequences are pgrelay's alone);
//! - `EXECUTE` on `pg_replication_origin_session_setup(text)` (apply writes
//!   under a replication origin, so capture skips what apply wrote);
//! - `SET` on the parameter `session_replication_role` (PostgreSQL 15+:
//!   apply runs as `replica`, so pgrelay's triggers leave applied rows' stamps
//!   alone).
//!
//! Creating the schema, triggers, publication, slot and origins is the setup
//! role's business, not the run role's.

use crate::config::Config;
use crate::event::{quote_ident, TableName};

/// The replication-origin functions the run role calls.
pub const ORIGIN_FUNCTIONS: &[&str] = &["pg_catalog.pg_replication_origin_session_setup(text)"];

/// The clock function the apply side calls ([`crate::hlc::OBSERVE_SQL`]).
pub const CLOCK_FUNCTION: &str = "pgrelay.observe_hlc(bigint)";

/// The parameter the apply side sets (`GRANT SET ON PARAMETER`, PG 15+).
pub const REPLICA_ROLE_PARAMETER: &str = "session_replication_role";

const DML: &[&str] = &["SELECT", "INSERT", "UPDATE", "DELETE"];

/// Something the run role needs privileges on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Object {
    Schema(String),
    Table(TableName),
    Sequence(TableName),
    /// A function signature, `schema.name(argument types)`.
    Function(&'static str),
    Parameter(&'static str),
}

/// Privileges on one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Need {
    pub object: Object,
    pub privileges: &'static [&'static str],
}

impl Need {
    /// The statement granting `privileges` (a subset of this need's) to `role`.
    pub fn grant(&self, privileges: &[String], role: &str) -> String {
        let target = match &self.object {
            Object::Schema(s) => format!("SCHEMA {}", quote_ident(s)),
            Object::Table(t) => format!("TABLE {}", t.quoted()),
            Object::Sequence(s) => format!("SEQUENCE {}", s.quoted()),
            Object::Function(f) => format!("FUNCTION {f}"),
            Object::Parameter(p) => format!("PARAMETER {p}"),
        };
        format!(
            "GRANT {} ON {target} TO {}",
            privileges.join(", "),
            quote_ident(role)
        )
    }

    /// A query returning (as `text[]`) which of `$1` (the privileges) role
    /// `$3` lacks on the object named `$2`; empty when the object does not
    /// exist (other findings report missing objects).
    pub fn missing_sql(&self) -> (&'static str, String) {
        match &self.object {
            Object::Schema(s) => (MISSING_SCHEMA, s.clone()),
            Object::Table(t) => (MISSING_TABLE, t.quoted()),
            Object::Sequence(s) => (MISSING_SEQUENCE, s.quoted()),
            Object::Function(f) => (MISSING_FUNCTION, f.to_string()),
            Object::Parameter(p) => (MISSING_PARAMETER, p.to_string()),
        }
    }

    /// The object as messages name it.
    pub fn describe(&self) -> String {
        match &self.object {
            Object::Schema(s) => format!("schema {s}"),
            Object::Table(t) => format!("table {t}"),
            Object::Sequence(s) => format!("sequence {s}"),
            Object::Function(f) => format!("function {f}"),
            Object::Parameter(p) => format!("parameter {p}"),
        }
    }
}

macro_rules! missing {
    ($check:literal) => {
        concat!(
            "SELECT coalesce(array_agg(p ORDER BY o), '{}') FROM unnest($1::text[]) WITH ORDINALITY AS u(p, o) WHERE NOT ",
            $check
        )
    };
}
const MISSING_SCHEMA: &str = missing!(
    "has_schema_privilege($3::text::name, (SELECT oid FROM pg_namespace WHERE nspname = $2), p)"
);
const MISSING_TABLE: &str = missing!("has_table_privilege($3::text::name, to_regclass($2), p)");
const MISSING_SEQUENCE: &str =
    missing!("has_sequence_privilege($3::text::name, to_regclass($2), p)");
const MISSING_FUNCTION: &str =
    missing!("has_function_privilege($3::text::name, to_regprocedure($2), p)");
const MISSING_PARAMETER: &str = missing!("has_parameter_privilege($3::text::name, $2, p)");

/// Everything the run role needs in `config`'s databases. `parameters`:
/// whether the server has parameter privileges (PostgreSQL 15+).
pub fn needs(config: &Config, parameters: bool) -> Vec<Need> {
    let pgrelay = |name: &str| TableName::new("pgrelay", name);
    let mut out = vec![Need {
        object: Object::Schema("pgrelay".into()),
        privileges: &["USAGE"],
    }];
    for table in [
        "tombstones",
        "offsets",
        "parked",
        "watermark_parts",
        "horizon",
        "breakers",
        "events",
        "conflicts",
        "primary_identity",
        "egress",
        "columns",
        "verify_runs",
    ] {
        out.push(Need {
            object: Object::Table(pgrelay(table)),
            privileges: DML,
        });
    }
    for view in ["watermarks", "fence", "schema_version"] {
        out.push(Need {
            object: Object::Table(pgrelay(view)),
            privileges: &["SELECT"],
        });
    }
    out.push(Need {
        object: Object::Function(CLOCK_FUNCTION),
        privileges: &["EXECUTE"],
    });
    let counters = config.tables.iter().any(|t| {
        t.merge
            .iter()
            .any(|m| m.kind == crate::config::MergeKind::Counter)
    });
    if counters {
        for f in crate::merge::APPLY_FUNCTIONS {
            out.push(Need {
                object: Object::Function(f),
                privileges: &["EXECUTE"],
            });
        }
    }
    if config.has_dr() {
        out.push(Need {
            object: Object::Schema("pgrelay_dr".into()),
            privileges: &["USAGE"],
        });
        for table in ["vault", "seals"] {
            out.push(Need {
                object: Object::Table(TableName::new("pgrelay_dr", table)),
                privileges: DML,
            });
        }
    }
    let replicated: Vec<&TableName> = config.replicated_tables().map(|t| &t.name).collect();
    let mut schemas: Vec<&str> = Vec::new();
    for t in &replicated {
        if t.schema != "pgrelay" && !schemas.contains(&t.schema.as_str()) {
            schemas.push(&t.schema);
        }
    }
    for s in schemas {
        out.push(Need {
            object: Object::Schema(s.to_string()),
            privileges: &["USAGE"],
        });
    }
    for t in replicated {
        out.push(Need {
            object: Object::Table(t.clone()),
            privileges: DML,
        });
    }
    for f in ORIGIN_FUNCTIONS {
        out.push(Need {
            object: Object::Function(f),
            privileges: &["EXECUTE"],
        });
    }
    if parameters {
        out.push(Need {
            object: Object::Parameter(REPLICA_ROLE_PARAMETER),
            privileges: &["SET"],
        });
    }
    out
}

/// Privileges held on pgrelay's objects by roles that are neither their
/// owner (the setup role), a superuser nor one of `$1` (the run roles): an
/// application role needs none (pgrelay's trigger functions run with their
/// owner's rights), and one that holds them can move the clock, forge
/// tombstones or read deleted keys. Rows: kind (`TABLE`, `SEQUENCE`,
/// `FUNCTION`), object, grantee (`PUBLIC` for everyone), privileges.
/// Functions: those callable at all (not trigger functions), except
/// `wait_for`, which is everyone's, and the extension's.
pub const FOREIGN_GRANTS_SQL: &str = "WITH objects AS (
    SELECT CASE c.relkind WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END AS kind,
           pg_catalog.format('%I.%I', n.nspname, c.relname) AS object,
           c.relowner AS owner, c.relacl AS acl
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname IN ('pgrelay', 'pgrelay_dr') AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
    UNION ALL
    SELECT 'FUNCTION', p.oid::pg_catalog.regprocedure::text, p.proowner,
           coalesce(p.proacl, pg_catalog.acldefault('f', p.proowner))
    FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
    WHERE n.nspname = 'pgrelay' AND p.proname <> 'wait_for'
      AND p.prorettype <> 'pg_catalog.trigger'::pg_catalog.regtype
      AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                      WHERE d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass
                        AND d.objid = p.oid AND d.deptype = 'e')
)
SELECT o.kind, o.object, coalesce(r.rolname::text, 'PUBLIC'),
       array_agg(DISTINCT a.privilege_type ORDER BY a.privilege_type)
FROM objects o CROSS JOIN LATERAL pg_catalog.aclexplode(o.acl) a
LEFT JOIN pg_catalog.pg_roles r ON r.oid = a.grantee
WHERE a.grantee <> o.owner
  AND (a.grantee = 0 OR (NOT r.rolsuper AND r.rolname::text <> ALL ($1::text[])))
GROUP BY 1, 2, 3 ORDER BY 2, 3";

/// A grant [`FOREIGN_GRANTS_SQL`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForeignGrant {
    pub kind: String,
    pub object: String,
    pub grantee: String,
    pub privileges: Vec<String>,
}

impl ForeignGrant {
    /// The statement that takes the grant back.
    pub fn revoke(&self) -> String {
        let grantee = if self.grantee == "PUBLIC" {
            "PUBLIC".to_string()
        } else {
            quote_ident(&self.grantee)
        };
        format!(
            "REVOKE {} ON {} {} FROM {grantee}",
            self.privileges.join(", "),
            self.kind,
            self.object
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_name_each_object_and_the_role() {
        let config = crate::config::parse(
            r#"
[kafka]
brokers = "k:9092"
[regions.us]
id = 1
dsn = "host=a"
[regions.eu]
id = 2
dsn = "host=b"
[[tables]]
name = "shop.products"
class = "global"
[[tables]]
name = "public.users"
class = "local"
"#,
            "t.toml",
        )
        .unwrap();
        let all = needs(&config, true);
        let grants: Vec<String> = all
            .iter()
            .map(|n| {
                let p: Vec<String> = n.privileges.iter().map(|p| p.to_string()).collect();
                n.grant(&p, "pgrelay_run")
            })
            .collect();
        for expected in [
            r#"GRANT USAGE ON SCHEMA "pgrelay" TO "pgrelay_run""#,
            r#"GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE "pgrelay"."tombstones" TO "pgrelay_run""#,
            r#"GRANT EXECUTE ON FUNCTION pgrelay.observe_hlc(bigint) TO "pgrelay_run""#,
            r#"GRANT USAGE ON SCHEMA "shop" TO "pgrelay_run""#,
            r#"GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE "shop"."products" TO "pgrelay_run""#,
            r#"GRANT EXECUTE ON FUNCTION pg_catalog.pg_replication_origin_session_setup(text) TO "pgrelay_run""#,
            r#"GRANT SET ON PARAMETER session_replication_role TO "pgrelay_run""#,
        ] {
            assert!(
                grants.iter().any(|g| g == expected),
                "{expected}\n{grants:#?}"
            );
        }
        // local tables are never touched by the sidecar
        assert!(!grants.iter().any(|g| g.contains("users")), "{grants:#?}");
        assert!(!needs(&config, false)
            .iter()
            .any(|n| matches!(n.object, Object::Parameter(_))));
        // nothing of the clock but the function that observes a stamp
        assert!(
            !grants.iter().any(|g| g.contains("SEQUENCE")),
            "{grants:#?}"
        );
    }

    #[test]
    fn a_foreign_grant_is_revoked_by_name() {
        let grant = ForeignGrant {
            kind: "SEQUENCE".into(),
            object: "pgrelay.hlc_logical".into(),
            grantee: "App".into(),
            privileges: vec!["UPDATE".into(), "USAGE".into()],
        };
        assert_eq!(
            grant.revoke(),
            r#"REVOKE UPDATE, USAGE ON SEQUENCE pgrelay.hlc_logical FROM "App""#
        );
        let public = ForeignGrant {
            kind: "FUNCTION".into(),
            object: "pgrelay.next_hlc(bigint)".into(),
            grantee: "PUBLIC".into(),
            privileges: vec!["EXECUTE".into()],
        };
        assert_eq!(
            public.revoke(),
            "REVOKE EXECUTE ON FUNCTION pgrelay.next_hlc(bigint) FROM PUBLIC"
        );
    }
}
