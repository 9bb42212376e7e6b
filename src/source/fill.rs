//! Values the stream did not carry for a row that moved to a new key.
//!
//! An update that changes a primary key reaches the other regions as a
//! delete of the old key and an insert of the new one. PostgreSQL leaves a
//! TOASTed column the update did not touch out of the new tuple, and with
//! REPLICA IDENTITY DEFAULT (`before_image = "key"`) the old tuple holds only
//! the key, so neither has the value: the insert would create the row
//! without it. Those columns are read back from the source by the new key.
//!
//! The read happens after the commit, so it may see a later value of the
//! column; every later change of the row follows with a higher stamp, so the
//! regions still end where the source is. A row that no longer exists under
//! that key (deleted or moved again since) is left as it is: its delete or
//! its next move follows.

use tokio_postgres::{Client, SimpleQueryMessage};

use crate::event::{canonical_text_sets, quote_ident, quote_literal, Change, Datum, Op};

use super::catalog::{self, CatalogError};

/// Why values could not be read back; every case is transient (the change
/// is read again from the slot after a restart).
#[derive(Debug, thiserror::Error)]
pub enum FillError {
    #[error(transparent)]
    Connect(#[from] CatalogError),
    #[error(
        "reading the untouched columns of a moved row of {table}: {}",
        crate::source::pg_error::reason(.source)
    )]
    Query {
        table: String,
        source: tokio_postgres::Error,
    },
}

/// The columns of an insert that the stream left out (`Datum::Unchanged`).
pub fn missing_columns(change: &Change) -> Vec<usize> {
    match (&change.op, &change.after) {
        (Op::Insert, Some(after)) => after
            .iter()
            .enumerate()
            .filter(|(_, d)| **d == Datum::Unchanged)
            .map(|(i, _)| i)
            .collect(),
        _ => Vec::new(),
    }
}

/// `SELECT missing… FROM table WHERE key = …` for the insert's new row,
/// with the key values as untyped literals (each takes its column's type).
/// `None` when there is nothing to read or a key value is not known.
pub fn fill_query(change: &Change, missing: &[usize]) -> Option<String> {
    let columns = &change.schema.columns;
    let row = change.after.as_deref()?;
    let mut conditions = Vec::new();
    for (c, value) in columns.iter().zip(row).filter(|(c, _)| c.is_key) {
        let text = value.as_text()?;
        conditions.push(format!(
            "{} = {}",
            quote_ident(&c.name),
            quote_literal(text)
        ));
    }
    if conditions.is_empty() || missing.is_empty() {
        return None;
    }
    let selected: Vec<String> = missing
        .iter()
        .map(|&i| quote_ident(&columns[i].name))
        .collect();
    Some(format!(
        "SELECT {} FROM {} WHERE {}",
        selected.join(", "),
        change.schema.table.quoted(),
        conditions.join(" AND ")
    ))
}

/// A session on the source database, opened when a moved row first needs
/// one, for [`fill_query`].
pub struct Filler {
    dsn: String,
    region: String,
    client: Option<Client>,
}

impl Filler {
    pub fn new(dsn: &str, region: &str) -> Self {
        Filler {
            dsn: dsn.to_string(),
            region: region.to_string(),
            client: None,
        }
    }

    /// Fills the insert's left-out columns from the source; returns how
    /// many were filled (0 when the row is no longer under that key).
    pub async fn fill(&mut self, change: &mut Change) -> Result<usize, FillError> {
        let missing = missing_columns(change);
        let Some(sql) = fill_query(change, &missing) else {
            return Ok(0);
        };
        let client = match &self.client {
            Some(c) if !c.is_closed() => c,
            _ => {
                let c = catalog::connect(&self.dsn, &self.region).await?;
                // values in the same spelling as the replication stream's
                c.batch_execute(&canonical_text_sets("; "))
                    .await
                    .map_err(|source| FillError::Query {
                        table: change.schema.table.to_string(),
                        source,
                    })?;
                self.client.insert(c)
            }
        };
        let rows = client
            .simple_query(&sql)
            .await
            .map_err(|source| FillError::Query {
                table: change.schema.table.to_string(),
                source,
            })?;
        let Some(row) = rows.iter().find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        }) else {
            return Ok(0);
        };
        let Some(after) = change.after.as_mut() else {
            return Ok(0);
        };
        for (n, &i) in missing.iter().enumerate() {
            after[i] = match row.get(n) {
                Some(text) => Datum::Text(text.to_string()),
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

    #[test]
    fn reads_the_left_out_columns_by_the_new_key() {
        let c = change(
            Op::Insert,
            vec![
                Datum::Text("o'neil".into()),
                Datum::Text("7".into()),
                Datum::Unchanged,
            ],
        );
        let missing = missing_columns(&c);
        assert_eq!(missing, vec![2]);
        assert_eq!(
            fill_query(&c, &missing).unwrap(),
            r#"SELECT "body" FROM "public"."Docs" WHERE "tenant" = 'o''neil' AND "id" = '7'"#
        );
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
        assert!(fill_query(&whole, &[]).is_none());
        // an update keeps the target's value: nothing to read
        let update = change(
            Op::Update,
            vec![
                Datum::Text("a".into()),
                Datum::Text("1".into()),
                Datum::Unchanged,
            ],
        );
        assert!(missing_columns(&update).is_empty());
        let no_key = change(
            Op::Insert,
            vec![Datum::Null, Datum::Text("1".into()), Datum::Unchanged],
        );
        assert!(fill_query(&no_key, &[2]).is_none());
    }
}
