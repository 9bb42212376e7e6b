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
//! A column can be gone by the time its change is read from the slot (a
//! backlog, then `ALTER TABLE … DROP COLUMN` or `RENAME COLUMN`, or the
//! table dropped or renamed): its value no longer exists under that name.
//! Such a column stays left out (`pgrelay.unchanged`: the destination keeps
//! the value it holds), the rest is read back as usual, and the change is
//! published — never retried, since no retry can bring the column back.
//! [`Filled::gone`] names the columns, for a warning and a metric.
//!
//! Key values are passed as parameters (text, cast to the key column's type
//! by the server), never spliced into the statement; values come back
//! through each type's output function (`format('%s', …)`), the spelling
//! the replication stream uses.

use std::collections::HashMap;

use tokio_postgres::types::Type;
use tokio_postgres::Client;

use crate::event::{canonical_text_sets, quote_ident, Change, Datum, Op, TableName};

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

/// What [`Filler::fill`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Filled {
    /// Columns read back.
    pub filled: usize,
    /// Left-out columns that no longer exist under their name (dropped or
    /// renamed since, or their table is): they stay left out.
    pub gone: Vec<String>,
}

/// SQLSTATEs of a read back that names what no longer exists: a column
/// (42703 undefined_column) or the table (42P01 undefined_table).
fn names_what_is_gone(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == tokio_postgres::error::SqlState::UNDEFINED_COLUMN
            || *c == tokio_postgres::error::SqlState::UNDEFINED_TABLE
    })
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

    /// Fills the change's left-out columns from the source: how many were
    /// filled (0 when the row is no longer under that key) and which are
    /// gone from the table (those stay left out).
    /// `skip`: left-out columns known to be gone, not read.
    pub async fn fill(&mut self, change: &mut Change, skip: &[usize]) -> Result<Filled, FillError> {
        let mut missing = missing_columns(change);
        missing.retain(|i| !skip.contains(i));
        if missing.is_empty() {
            return Ok(Filled::default());
        }
        let table = change.schema.table.to_string();
        let query_error = |source: tokio_postgres::Error| FillError::Query {
            table: table.clone(),
            source,
        };
        self.connect(&table).await?;
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
        let mut wanted = missing;
        let mut gone = Vec::new();
        let row = match self.read(change, &wanted).await {
            Ok(row) => row,
            Err(e) if names_what_is_gone(&e) => {
                // the table changed since the change was written: read what
                // still exists, leave the rest out
                let present = self.present_columns(change).await.map_err(query_error)?;
                let columns = &change.schema.columns;
                let key_present = columns
                    .iter()
                    .filter(|c| c.is_key)
                    .all(|c| present.contains(&c.name));
                let (still, lost): (Vec<usize>, Vec<usize>) = wanted
                    .iter()
                    .partition(|&&i| key_present && present.contains(&columns[i].name));
                gone = lost.iter().map(|&i| columns[i].name.clone()).collect();
                wanted = still;
                if wanted.is_empty() {
                    None
                } else {
                    match self.read(change, &wanted).await {
                        Ok(row) => row,
                        // changed again meanwhile: leave it all out
                        Err(e) if names_what_is_gone(&e) => {
                            gone.extend(wanted.iter().map(|&i| columns[i].name.clone()));
                            wanted.clear();
                            None
                        }
                        Err(e) => return Err(query_error(e)),
                    }
                }
            }
            Err(e) => return Err(query_error(e)),
        };
        let (Some(row), Some(after)) = (row, change.after.as_mut()) else {
            return Ok(Filled { filled: 0, gone });
        };
        for (n, &i) in wanted.iter().enumerate() {
            after[i] = match row.get::<_, Option<String>>(n) {
                Some(text) => Datum::Text(text),
                None => Datum::Null,
            };
        }
        Ok(Filled {
            filled: wanted.len(),
            gone,
        })
    }

    /// Reads columns `wanted` of the change's row by its key (`None`: no
    /// such row, or nothing to read). A statement that failed is prepared
    /// again next time.
    async fn read(
        &mut self,
        change: &Change,
        wanted: &[usize],
    ) -> Result<Option<tokio_postgres::Row>, tokio_postgres::Error> {
        let client = self.client.as_ref().expect("connected by fill");
        let Some((sql, params)) =
            fill_query(change, wanted, |oid| self.type_names.get(&oid).cloned())
        else {
            return Ok(None);
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
                    .await?;
                self.statements.insert(sql.clone(), s.clone());
                s
            }
        };
        let result = client.query_opt(&statement, &params).await;
        if result.is_err() {
            self.statements.remove(&sql);
        }
        result
    }

    /// The names of the columns the change's table has now, under its name
    /// (none when no table has that name any more).
    async fn present_columns(&self, change: &Change) -> Result<Vec<String>, tokio_postgres::Error> {
        let client = self.client.as_ref().expect("connected by fill");
        present_columns(client, &change.schema.table).await
    }

    /// The columns `table` has now, by name; empty when the table itself
    /// is gone (dropped or renamed).
    pub async fn columns_now(&mut self, table: &TableName) -> Result<Vec<String>, FillError> {
        let name = table.to_string();
        self.connect(&name).await?;
        let client = self.client.as_ref().expect("connected above");
        present_columns(client, table)
            .await
            .map_err(|source| FillError::Query {
                table: name,
                source,
            })
    }

    async fn connect(&mut self, table: &str) -> Result<(), FillError> {
        if self.client.as_ref().is_some_and(|c| !c.is_closed()) {
            return Ok(());
        }
        let c = catalog::connect(&self.dsn, &self.region).await?;
        // values in the same spelling as the replication stream's
        c.batch_execute(&canonical_text_sets("; "))
            .await
            .map_err(|source| FillError::Query {
                table: table.to_string(),
                source,
            })?;
        self.client = Some(c);
        self.statements.clear();
        Ok(())
    }
}

async fn present_columns(
    client: &Client,
    table: &TableName,
) -> Result<Vec<String>, tokio_postgres::Error> {
    Ok(client
        .query(
            "SELECT a.attname::text FROM pg_attribute a \
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
            &[&table.quoted()],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Marks `columns` (indices into the change's schema) as left out of the
/// change, in both images: they are not published, so every destination
/// keeps the value it holds (or, having dropped the column, has none).
pub fn leave_out(change: &mut Change, columns: &[usize]) {
    for row in [change.before.as_mut(), change.after.as_mut()]
        .into_iter()
        .flatten()
    {
        for &i in columns {
            if let Some(d) = row.get_mut(i) {
                *d = Datum::Unchanged;
            }
        }
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
            hlc: crate::hlc::Hlc::new(1),
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
