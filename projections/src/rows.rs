//! Moving read-model rows between Postgres and memory in bulk.
//!
//! A batch loads every row its events touch with one query per table, applies
//! the events to those rows in memory, and writes the rows back with one
//! statement per table. Each table is described once (a serde struct and its
//! column list) instead of once per bound column: rows come in as JSON text
//! (`to_json(row)`) and go out as one typed array per column
//! (`INSERT ... SELECT ... FROM UNNEST(...)`, see `columns`), which Postgres
//! reads without parsing a JSON document or converting text.

use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::columns;

/// A read-model table: its name, primary key and the columns a row struct
/// carries (in any order; the names must match the struct's fields).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Table {
    pub name: &'static str,
    pub key: &'static [&'static str],
    pub columns: &'static [&'static str],
}

impl Table {
    /// `schema.name`. Schemas are checked identifiers (see `valid_schema`).
    pub fn qualified(&self, schema: &str) -> String {
        format!("{schema}.{}", self.name)
    }
}

/// Whether `schema` may be spliced into SQL: a lowercase identifier.
pub(crate) fn valid_schema(schema: &str) -> bool {
    !schema.is_empty()
        && schema.len() <= 63
        && schema.starts_with(|c: char| c.is_ascii_lowercase())
        && schema
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// The rows of `table` whose `key_column` is one of `keys`.
pub(crate) async fn load<T: DeserializeOwned>(
    conn: &mut PgConnection,
    schema: &str,
    table: &Table,
    key_column: &str,
    keys: &[Uuid],
) -> Result<Vec<T>, sqlx::Error> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    // Each row as JSON text (`to_json` writes it straight out, where
    // `to_jsonb` would build and sort a jsonb first), parsed straight into
    // the row struct.
    let rows: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT to_json(t)::text FROM {} t WHERE {key_column} = ANY($1)",
        table.qualified(schema)
    ))
    .bind(keys)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|row| {
            serde_json::from_str(row).map_err(|error| {
                sqlx::Error::Decode(
                    format!("a row of {} does not decode: {error}", table.name).into(),
                )
            })
        })
        .collect()
}

/// Inserts `rows`, or updates every column of the rows that already exist.
pub(crate) async fn upsert<T: Serialize>(
    conn: &mut PgConnection,
    schema: &str,
    table: &Table,
    rows: &[T],
) -> Result<(), sqlx::Error> {
    write(conn, schema, table, rows, true).await
}

/// Inserts `rows`; a row that already exists is an error (an append-only
/// table never receives the same row twice unless an event was applied twice).
pub(crate) async fn insert<T: Serialize>(
    conn: &mut PgConnection,
    schema: &str,
    table: &Table,
    rows: &[T],
) -> Result<(), sqlx::Error> {
    write(conn, schema, table, rows, false).await
}

async fn write<T: Serialize>(
    conn: &mut PgConnection,
    schema: &str,
    table: &Table,
    rows: &[T],
    update_existing: bool,
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    // One typed array per column, in Postgres's binary format (see
    // `columns`): Postgres reads the values as they are.
    let types = columns::column_types(conn, schema, table.name).await?;
    let encode = |error: columns::EncodeError| {
        sqlx::Error::Encode(format!("a row of {} does not encode: {error}", table.name).into())
    };
    let mut values =
        columns::Columns::new(table.name, table.columns, &types, rows.len()).map_err(encode)?;
    for row in rows {
        values.push(row).map_err(encode)?;
    }
    let qualified = table.qualified(schema);
    let names = table.columns.join(", ");
    let selected: Vec<String> = values
        .columns
        .iter()
        .map(|(name, column_type, _)| format!("{name}{}", column_type.cast()))
        .collect();
    let arrays: Vec<String> = values
        .columns
        .iter()
        .enumerate()
        .map(|(index, (_, column_type, _))| format!("${}::{}", index + 1, column_type.array()))
        .collect();
    let mut sql = format!(
        "INSERT INTO {qualified} ({names})
         SELECT {} FROM UNNEST({}) AS u({names})",
        selected.join(", "),
        arrays.join(", ")
    );
    if update_existing {
        let updates: Vec<String> = table
            .columns
            .iter()
            .filter(|column| !table.key.contains(column))
            .map(|column| format!("{column} = EXCLUDED.{column}"))
            .collect();
        sql.push_str(&format!(
            " ON CONFLICT ({}) DO UPDATE SET {}",
            table.key.join(", "),
            updates.join(", ")
        ));
    }
    let mut query = sqlx::query(&sql);
    for (_, _, column) in values.columns {
        query = column.bind(query);
    }
    query.execute(conn).await?;
    Ok(())
}

#[cfg(test)]
pub(crate) fn assert_columns_match<T: Serialize>(table: &Table, row: &T) {
    let value = serde_json::to_value(row).expect("a row serializes");
    let mut fields: Vec<&str> = value
        .as_object()
        .expect("a row is an object")
        .keys()
        .map(String::as_str)
        .collect();
    let mut columns = table.columns.to_vec();
    fields.sort_unstable();
    columns.sort_unstable();
    assert_eq!(fields, columns, "the columns of {}", table.name);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_lowercase_schemas_are_spliced_into_sql() {
        assert!(valid_schema("public"));
        assert!(valid_schema("rebuild_listings"));
        assert!(!valid_schema(""));
        assert!(!valid_schema("Public"));
        assert!(!valid_schema("x; DROP TABLE events"));
        assert!(!valid_schema("1abc"));
        assert!(!valid_schema(&"a".repeat(64)));
    }
}
