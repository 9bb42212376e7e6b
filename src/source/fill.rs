//! Values the stream did not carry, read back from the source.
//!
//! PostgreSQL leaves a TOASTed column that an update did not touch out of
//! the new tuple, and with REPLICA IDENTITY DEFAULT (`before_image = "key"`)
//! the old tuple holds only the key, so the change does not have the value.
//! Last-writer-wins works on whole rows: a change that wins in another
//! region must carry every column, or two regions would hold different
//! values under the same stamp (the destination would keep whatever it had
//! in that column). So every insert or update with a left-out column — an
//! update that kept a large value, or a row moved to a new key, which
//! arrives as a delete and an insert — gets those columns read back from the
//! source by its (new) key before it is published.
//!
//! The read happens after the commit, so it may see a later value of the
//! column; every later change of the row follows with a higher stamp, so the
//! regions still end where the source is. A row that no longer exists under
//! that key (deleted or moved again since) is left as it is: its delete or
//! its next move follows.
//!
//! Key values are passed as parameters (text, cast to the key column's type
//! by the server), never spliced into the statement; values come back
//! through each type's output function (`format('%s', …)`), the spelling
//! the replication stream uses.

use std::collections::HashMap;

use tokio_postgres::types::Type;
use tokio_postgres::Client;

use crate::event::{canonical_text_sets, quote_ident, Change, Datum, Op};

use super::catalog::{self, CatalogError};

/// Why values could not be read back; every case is transient (the change
/// is read again from the slot after a restart).
#[derive(Debug, thiserror::Error)]
pub enum FillError {
    #[error(transparent)]
    Connect(#[from] CatalogError),
    #[error(
        "reading the left-out columns of a row of {table}: {}",
        crate::source::pg_error::reason(.source)
    )]
    Query {
        table: String,
        source: tokio_postgres::Error,
    },
}

/// The columns of an insert or update that the stream left out
/// (`Datum::Unchanged`).
pub fn missing_columns(change: &Change) -> Vec<usize> {
    match (&change.op, &change.after) {
        (Op::Insert | Op::Update, Some(after)) => after
            .iter()
            .enumerate()
            .filter(|(_, d)| **d == Datum::Unchanged)
            .map(|(i, _)| i)
            .collect(),
        _ => Vec::new(),
    }
}

/// `SELECT missing… FROM table WHERE key = $n::text::type …` for the row's
/// key, and the key values in parameter order. `type_name` gives the SQL
/// name of a column type (by oid). `None` when there is nothing to read or
/// a key value is not known.
pub fn fill_query(
    change: &Change,
    missing: &[usize],
    type_name: impl Fn(u32) -> Option<String>,
) -> Option<(String, Vec<String>)> {
    let columns = &change.schema.columns;
    let row = change.after.as_deref()?;
    let mut conditions = Vec::new();
    let mut params = Vec::new();
    for (c, value) in columns.iter().zip(row).filter(|(c, _)| c.is_key) {
        let text = value.as_text()?;
        params.push(text.to_string());
        conditions.push(format!(
            "{} = ${}::text::{}",
            quote_ident(&c.name),
            params.len(),
            type_name(c.type_oid)?
        ));
    }
    if conditions.is_empty() || missing.is_empty() {
        return None;
    }
    let selected: Vec<String> = missing
        .iter()
        .map(|&i| {
            let c = quote_ident(&columns[i].name);
            format!("CASE WHEN {c} IS NULL THEN NULL ELSE format('%s', {c}) END")
        })
        .collect();
    Some((
        format!(
            "SELECT {} FROM {} WHERE {}",
            selected.join(", "),
            change.schema.table.quoted(),
            conditions.join(" AND ")
        ),
        params,
    ))
}

/// A session on the source database, opened when a change first needs
/// one, for [`fill_query`].
pub struct Filler {
    dsn: String,
    region: String,
    client: Option<Client>,
    /// SQL names of key column types, by oid.
    type_names: HashMap<u32, String>,
    /// Prepared reads, by SQL text (dropped with the session).
    statements: HashMap<String, tokio_postgres::Statement>,
}

impl Filler {
    pub fn new(dsn: &str, region: &str) -> Self {
        Filler {
            dsn: dsn.to_string(),
            region: region.to_string(),
            client: None,
            type_names: HashMap::new(),
            statements: HashMap::new(),
        }
    }

    /// Fills the change's left-out columns from the source; returns how
    /// many were filled (0 when the row is no longer under that key).
    pub async fn fill(&mut self, change: &mut Change) -> Result<usize, FillError> {
        let missing = missing_columns(change);
        if missing.is_empty() {
            return Ok(0);
        }
        let table = change.schema.table.to_string();
        let query_error = |source: tokio_postgres::Error| FillError::Query {
            table: table.clone(),
            source,
        };
        if self.client.as_ref().is_none_or(Client::is_closed) {
            let c = catalog::connect(&self.dsn, &self.region).await?;
            // values in the same spelling as the replication stream's
            c.batch_execute(&canonical_text_sets("; "))
                .await
                .map_err(query_error)?;
            self.client = Some(c);
            self.statements.clear();
        }
        let client = self.client.as_ref().expect("connected above");
        for c in change.schema.columns.iter().filter(|c| c.is_key) {
            if let std::collections::hash_map::Entry::Vacant(e) = self.type_names.entry(c.type_oid)
            {
                let row = client
                    .query_one("SELECT format_type($1::oid, NULL)", &[&c.type_oid])
                    .await
                    .map_err(query_error)?;
                e.insert(row.get(0));
            }
        }
        let Some((sql, params)) =
            fill_query(change, &missing, |oid| self.type_names.get(&oid).cloned())
        else {
            return Ok(0);
        };
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
            .iter()
            .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let statement = match self.statements.get(&sql) {
            Some(s) => s.clone(),
            None => {
                let s = client
                    .prepare_typed(&sql, &vec![Type::TEXT; params.len()])
                    .await
                    .map_err(query_error)?;
                self.statements.insert(sql, s.clone());
                s
            }
        };
        let Some(row) = client
            .query_opt(&statement, &params)
            .await
            .map_err(query_error)?
        else {
            return Ok(0);
        };
        let Some(after) = change.after.as_mut() else {
            return Ok(0);
        };
        for (n, &i) in missing.iter().enumerate() {
            after[i] = match row.get::<_, Option<String>>(n) {
                Some(text) => Datum::Text(text),
                None => Datum::Null,
            };
        }
        Ok(missing.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{ColumnDesc, Lsn, TableName, TableSchema, TxMeta};
    use std::sync::Arc;

    fn change(op: Op, after: Vec<Datum>) -> Change {
        let col = |name: &str, is_key| ColumnDesc {
            name: name.into(),
            type_oid: 25,
            is_key,
        };
        Change {
            schema: Arc::new(TableSchema {
                oid: 1,
                table: TableName::new("public", "Docs"),
                columns: vec![col("tenant", true), col("id", true), col("body", false)],
            }),
            op,
            before: None,
            after: Some(after),
            hlc: 1,
            tx: Arc::new(TxMeta {
                xid: 1,
                commit_lsn: Lsn(1),
                commit_ts_us: 0,
            }),
            seq: 0,
        }
    }

    fn types(oid: u32) -> Option<String> {
        (oid == 25).then(|| "text".to_string())
    }

    #[test]
    fn reads_the_left_out_columns_by_the_key_with_parameters() {
        let c = change(
            Op::Insert,
            vec![
                Datum::Text("o'neil; DROP TABLE x".into()),
                Datum::Text("7".into()),
                Datum::Unchanged,
            ],
        );
        let missing = missing_columns(&c);
        assert_eq!(missing, vec![2]);
        let (sql, params) = fill_query(&c, &missing, types).unwrap();
        assert_eq!(
            sql,
            r#"SELECT CASE WHEN "body" IS NULL THEN NULL ELSE format('%s', "body") END FROM "public"."Docs" WHERE "tenant" = $1::text::text AND "id" = $2::text::text"#
        );
        // values travel as parameters, never in the statement
        assert_eq!(params, vec!["o'neil; DROP TABLE x".to_string(), "7".into()]);
        // an update that kept a TOASTed value is completed the same way
        let update = change(
            Op::Update,
            vec![
                Datum::Text("a".into()),
                Datum::Text("1".into()),
                Datum::Unchanged,
            ],
        );
        assert_eq!(missing_columns(&update), vec![2]);
    }

    #[test]
    fn nothing_to_read_without_a_gap_or_a_whole_key() {
        let whole = change(
            Op::Insert,
            vec![
                Datum::Text("a".into()),
                Datum::Text("1".into()),
                Datum::Null,
            ],
        );
        assert!(missing_columns(&whole).is_empty());
        assert!(fill_query(&whole, &[], types).is_none());
        let delete = change(
            Op::Delete,
            vec![
                Datum::Text("a".into()),
                Datum::Text("1".into()),
                Datum::Unchanged,
            ],
        );
        assert!(missing_columns(&delete).is_empty());
        let no_key = change(
            Op::Insert,
            vec![Datum::Null, Datum::Text("1".into()), Datum::Unchanged],
        );
        assert!(fill_query(&no_key, &[2], types).is_none());
        // a key type that cannot be named: nothing is guessed
        assert!(fill_query(&no_key, &[2], |_| None).is_none());
    }
}
