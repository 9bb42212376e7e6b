//! The residency matrix for compliance reviewers (`pgrelay check`): which
//! rows and column values of each table go from each region to each other.

use std::fmt::Write as _;

use crate::config::{ColumnAction, Config, TableClass, TableConfig};

use super::TableRule;

/// A plain-text residency matrix: for every declared table and every
/// (source -> destination) pair, which rows may go and what happens to
/// which columns. Stable order (tables by name, regions by name).
pub fn matrix(config: &Config) -> String {
    let regions: Vec<&String> = config.regions.keys().collect();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Residency matrix ({}; regions: {})",
        config.origin,
        config.declared_regions()
    );
    out.push_str(
        "Tables not listed here never leave their region. Rows and columns not shown as \
         going somewhere never reach that region's topics or database.\n",
    );
    let mut tables: Vec<&TableConfig> = config.tables.iter().collect();
    tables.sort_by(|a, b| a.name.cmp(&b.name));
    for table in tables {
        out.push('\n');
        let header = match &table.class {
            TableClass::Local => "local: no row leaves its region".to_string(),
            TableClass::Global => "global: every region writes, every region receives".to_string(),
            TableClass::Owned { owner } => {
                format!("owned by {owner}: only {owner} writes, every region receives")
            }
            TableClass::Partitioned { home_column, .. } => {
                format!("partitioned: each row's home region is read from column {home_column}")
            }
        };
        let _ = writeln!(out, "{}  ({header})", table.name);
        if let TableClass::Partitioned { aliases, .. } = &table.class {
            let _ = writeln!(out, "  home of a row: {}", home_mapping(aliases, &regions));
        }
        if table.class == TableClass::Local {
            continue;
        }
        if !table.merge.is_empty() {
            let merged: Vec<String> = table
                .merge
                .iter()
                .map(|m| {
                    format!(
                        "{} ({})",
                        m.column,
                        match m.kind {
                            crate::config::MergeKind::Counter =>
                                "counter: each region's increments add up",
                            crate::config::MergeKind::Union =>
                                "union: items from every region kept",
                        }
                    )
                })
                .collect();
            let _ = writeln!(out, "  merged, not last-writer-wins: {}", merged.join(", "));
        }
        let rule = TableRule::compile(config, table);
        let mut rows = vec![[
            "FROM".to_string(),
            "TO".to_string(),
            "ROWS".to_string(),
            "COLUMNS".to_string(),
        ]];
        for source in &regions {
            for dest in &regions {
                if source == dest {
                    continue;
                }
                let which_rows = rows_going(&rule, source, dest, &regions);
                let mut columns = if which_rows == "none" {
                    "-".to_string()
                } else {
                    columns_going(table, dest)
                };
                if table.dr_regions(source).any(|d| d == dest.as_str()) {
                    let dr = format!(
                        "DR copy, encrypted: every row {source} captures, every column, sealed \
                         with {source}'s dr_key ({dest} holds no key, reads nothing)"
                    );
                    columns = match columns.as_str() {
                        "-" => dr,
                        _ => format!("{columns}; and a {dr}"),
                    };
                }
                rows.push([source.to_string(), dest.to_string(), which_rows, columns]);
            }
        }
        let widths: Vec<usize> = (0..3)
            .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
            .collect();
        for row in rows {
            let _ = writeln!(
                out,
                "  {:<w0$}  {:<w1$}  {:<w2$}  {}",
                row[0],
                row[1],
                row[2],
                row[3],
                w0 = widths[0],
                w1 = widths[1],
                w2 = widths[2],
            );
        }
    }
    out
}

fn home_mapping(
    aliases: &std::collections::BTreeMap<String, String>,
    regions: &[&String],
) -> String {
    let mut parts: Vec<String> = Vec::new();
    for region in regions {
        let mut values: Vec<String> = aliases
            .iter()
            .filter(|(_, r)| r == region)
            .map(|(v, _)| format!("{v:?}"))
            .collect();
        if !aliases.contains_key(region.as_str()) {
            values.insert(0, format!("{:?}", region.as_str()));
        }
        if !values.is_empty() {
            parts.push(format!("{} -> {region}", values.join(", ")));
        }
    }
    parts.push("NULL or any other value -> no home (the row stays in its region)".to_string());
    parts.join("; ")
}

fn rows_going(rule: &TableRule, source: &str, dest: &str, regions: &[&String]) -> String {
    if rule.leaves(source).is_err() {
        return "none".to_string();
    }
    if rule.home_column().is_none() {
        return "all".to_string();
    }
    let homes: Vec<&str> = regions
        .iter()
        .filter(|home| rule.home_allows(home, dest))
        .map(|home| home.as_str())
        .collect();
    if homes.is_empty() {
        "none".to_string()
    } else {
        format!("rows homed in {}", homes.join(", "))
    }
}

fn columns_going(table: &TableConfig, dest: &str) -> String {
    let rules: Vec<String> = table
        .columns
        .iter()
        .filter(|rule| rule.applies_to(dest))
        .map(|rule| {
            let what = match &rule.action {
                ColumnAction::Drop => "dropped".to_string(),
                ColumnAction::Hash => "hashed".to_string(),
                ColumnAction::Mask(mask) => format!("masked as {mask:?}"),
            };
            if rule.formerly.is_empty() {
                format!("{} {what}", rule.column)
            } else {
                format!(
                    "{} (formerly {}) {what}",
                    rule.column,
                    rule.formerly.join(", ")
                )
            }
        })
        .collect();
    if rules.is_empty() {
        "all columns as they are".to_string()
    } else {
        format!("other columns as they are; {}", rules.join(", "))
    }
}
