//! Read-model rows written as typed columns: each row struct is taken
//! apart by serde into one array per column, bound in Postgres's binary
//! format, so Postgres reads every value as it is (no JSON to parse, no
//! text to convert). The column types come from the catalog, once per
//! table and process.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde::ser::{self, Impossible};
use sqlx::PgConnection;
use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use uuid::Uuid;

/// The Postgres types read-model columns are made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ColumnType {
    Uuid,
    Text,
    /// `smallint`, `integer` or `bigint`: integers travel as `bigint`, and
    /// the insert's assignment cast narrows them, so that Postgres refuses
    /// a value out of the column's range as bad data (its event is
    /// parked), as it did when rows traveled as JSON.
    Integer,
    Float8,
    Bool,
    Timestamptz,
    Json,
    Jsonb,
}

impl ColumnType {
    /// The type `format_type` names, if rows can hold it.
    fn parse(sql_type: &str) -> Option<Self> {
        Some(match sql_type {
            "uuid" => Self::Uuid,
            "text" => Self::Text,
            "smallint" | "integer" | "bigint" => Self::Integer,
            "double precision" => Self::Float8,
            "boolean" => Self::Bool,
            "timestamp with time zone" => Self::Timestamptz,
            "json" => Self::Json,
            "jsonb" => Self::Jsonb,
            _ => return None,
        })
    }

    /// The array the column's values travel in.
    pub fn array(self) -> &'static str {
        match self {
            Self::Uuid => "uuid[]",
            Self::Text | Self::Json | Self::Jsonb => "text[]",
            Self::Integer => "int8[]",
            Self::Float8 => "float8[]",
            Self::Bool => "bool[]",
            Self::Timestamptz => "timestamptz[]",
        }
    }

    /// The cast from the array's element to the column (JSON travels as
    /// its text and is parsed once, by the cast).
    pub fn cast(self) -> &'static str {
        match self {
            Self::Json => "::json",
            Self::Jsonb => "::jsonb",
            _ => "",
        }
    }
}

/// A table's column types by column name.
pub(crate) type ColumnTypes = HashMap<String, ColumnType>;

/// The types of every column of `table`, by name, read from the catalog
/// through `schema.table` the first time and kept for the process (a
/// rebuild's copies are made `LIKE` the live tables, so they share them;
/// a migration that changes a type comes with a restart of the writers).
pub(crate) async fn column_types(
    conn: &mut PgConnection,
    schema: &str,
    table: &'static str,
) -> Result<Arc<ColumnTypes>, sqlx::Error> {
    static KNOWN: OnceLock<Mutex<HashMap<&'static str, Arc<ColumnTypes>>>> = OnceLock::new();
    let known = KNOWN.get_or_init(Mutex::default);
    if let Some(types) = known
        .lock()
        .ok()
        .and_then(|known| known.get(table).cloned())
    {
        return Ok(types);
    }
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT a.attname::text, format_type(a.atttypid, NULL)
           FROM pg_attribute a
          WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped",
    )
    .bind(format!("{schema}.{table}"))
    .fetch_all(&mut *conn)
    .await?;
    let mut types = HashMap::with_capacity(rows.len());
    for (name, sql_type) in rows {
        // A column of another type is only an error if a row struct names it.
        if let Some(column_type) = ColumnType::parse(&sql_type) {
            types.insert(name, column_type);
        }
    }
    let types = Arc::new(types);
    if let Ok(mut known) = known.lock() {
        known.insert(table, Arc::clone(&types));
    }
    Ok(types)
}

/// One column's values, row after row.
#[derive(Debug)]
pub(crate) enum Values {
    Uuid(Vec<Option<Uuid>>),
    Text(Vec<Option<String>>),
    Int8(Vec<Option<i64>>),
    Float8(Vec<Option<f64>>),
    Bool(Vec<Option<bool>>),
    Timestamptz(Vec<Option<DateTime<Utc>>>),
}

impl Values {
    fn new(column_type: ColumnType, rows: usize) -> Self {
        match column_type {
            ColumnType::Uuid => Self::Uuid(Vec::with_capacity(rows)),
            ColumnType::Text | ColumnType::Json | ColumnType::Jsonb => {
                Self::Text(Vec::with_capacity(rows))
            }
            ColumnType::Integer => Self::Int8(Vec::with_capacity(rows)),
            ColumnType::Float8 => Self::Float8(Vec::with_capacity(rows)),
            ColumnType::Bool => Self::Bool(Vec::with_capacity(rows)),
            ColumnType::Timestamptz => Self::Timestamptz(Vec::with_capacity(rows)),
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::Uuid(v) => v.len(),
            Self::Text(v) => v.len(),
            Self::Int8(v) => v.len(),
            Self::Float8(v) => v.len(),
            Self::Bool(v) => v.len(),
            Self::Timestamptz(v) => v.len(),
        }
    }

    fn push_null(&mut self) {
        match self {
            Self::Uuid(v) => v.push(None),
            Self::Text(v) => v.push(None),
            Self::Int8(v) => v.push(None),
            Self::Float8(v) => v.push(None),
            Self::Bool(v) => v.push(None),
            Self::Timestamptz(v) => v.push(None),
        }
    }

    /// Binds the column to `query` as one array.
    pub fn bind<'q>(
        self,
        query: Query<'q, sqlx::Postgres, PgArguments>,
    ) -> Query<'q, sqlx::Postgres, PgArguments> {
        match self {
            Self::Uuid(v) => query.bind(v),
            Self::Text(v) => query.bind(v),
            Self::Int8(v) => query.bind(v),
            Self::Float8(v) => query.bind(v),
            Self::Bool(v) => query.bind(v),
            Self::Timestamptz(v) => query.bind(v),
        }
    }
}

/// Why a row could not be taken apart into its columns.
#[derive(Debug)]
pub(crate) struct EncodeError(String);

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for EncodeError {}

impl ser::Error for EncodeError {
    fn custom<T: fmt::Display>(message: T) -> Self {
        Self(message.to_string())
    }
}

/// The columns of a batch of rows.
pub(crate) struct Columns {
    /// Name, type and values, in the order of the table's column list.
    pub columns: Vec<(&'static str, ColumnType, Values)>,
    rows: usize,
}

impl Columns {
    /// Empty columns named `names`, typed by `types`.
    pub fn new(
        table: &str,
        names: &[&'static str],
        types: &HashMap<String, ColumnType>,
        rows: usize,
    ) -> Result<Self, EncodeError> {
        let columns = names
            .iter()
            .map(|name| {
                let column_type = types.get(*name).copied().ok_or_else(|| {
                    EncodeError(format!(
                        "{table}.{name} is missing or of a type rows cannot hold"
                    ))
                })?;
                Ok((*name, column_type, Values::new(column_type, rows)))
            })
            .collect::<Result<_, EncodeError>>()?;
        Ok(Self { columns, rows: 0 })
    }

    /// Adds one row: every column must get exactly one value.
    pub fn push<T: Serialize>(&mut self, row: &T) -> Result<(), EncodeError> {
        row.serialize(RowEncoder { columns: self })?;
        self.rows += 1;
        match self
            .columns
            .iter()
            .find(|(_, _, values)| values.len() != self.rows)
        {
            Some((name, ..)) => Err(EncodeError(format!(
                "a row gives column {name} no value or more than one"
            ))),
            None => Ok(()),
        }
    }
}

/// Takes a row struct apart, field by field.
struct RowEncoder<'a> {
    columns: &'a mut Columns,
}

impl ser::SerializeStruct for RowEncoder<'_> {
    type Ok = ();
    type Error = EncodeError;

    fn serialize_field<T: ?Sized + Serialize>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), EncodeError> {
        let Some((_, column_type, values)) = self
            .columns
            .columns
            .iter_mut()
            .find(|(name, ..)| *name == key)
        else {
            return Err(EncodeError(format!("the row's field {key} is no column")));
        };
        if matches!(column_type, ColumnType::Json | ColumnType::Jsonb) {
            let text = serde_json::to_string(value).map_err(ser::Error::custom)?;
            // As with `json_populate_recordset`, a JSON null is SQL NULL.
            match values {
                Values::Text(v) => v.push((text != "null").then_some(text)),
                _ => unreachable!("JSON columns hold text"),
            }
            return Ok(());
        }
        value.serialize(FieldEncoder {
            column: key,
            values,
        })
    }

    fn end(self) -> Result<(), EncodeError> {
        Ok(())
    }
}

/// Serializer methods that refuse what they are given (with `self.refusal()`).
macro_rules! refuse {
    ($($method:ident($($arg:ty),*) -> $ret:ty;)*) => {
        $(fn $method(self, $(_: $arg),*) -> Result<$ret, EncodeError> {
            Err(self.refusal())
        })*
    };
}

impl RowEncoder<'_> {
    fn refusal(&self) -> EncodeError {
        EncodeError("a row must be a struct".to_owned())
    }
}

impl ser::Serializer for RowEncoder<'_> {
    type Ok = ();
    type Error = EncodeError;
    type SerializeSeq = Impossible<(), EncodeError>;
    type SerializeTuple = Impossible<(), EncodeError>;
    type SerializeTupleStruct = Impossible<(), EncodeError>;
    type SerializeTupleVariant = Impossible<(), EncodeError>;
    type SerializeMap = Impossible<(), EncodeError>;
    type SerializeStruct = Self;
    type SerializeStructVariant = Impossible<(), EncodeError>;

    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self, EncodeError> {
        Ok(self)
    }

    fn serialize_some<T: ?Sized + Serialize>(self, _: &T) -> Result<(), EncodeError> {
        Err(self.refusal())
    }

    fn serialize_newtype_struct<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        _: &T,
    ) -> Result<(), EncodeError> {
        Err(self.refusal())
    }

    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<(), EncodeError> {
        Err(self.refusal())
    }

    refuse! {
        serialize_bool(bool) -> ();
        serialize_i8(i8) -> ();
        serialize_i16(i16) -> ();
        serialize_i32(i32) -> ();
        serialize_i64(i64) -> ();
        serialize_u8(u8) -> ();
        serialize_u16(u16) -> ();
        serialize_u32(u32) -> ();
        serialize_u64(u64) -> ();
        serialize_f32(f32) -> ();
        serialize_f64(f64) -> ();
        serialize_char(char) -> ();
        serialize_str(&str) -> ();
        serialize_bytes(&[u8]) -> ();
        serialize_none() -> ();
        serialize_unit() -> ();
        serialize_unit_struct(&'static str) -> ();
        serialize_unit_variant(&'static str, u32, &'static str) -> ();
        serialize_seq(Option<usize>) -> Self::SerializeSeq;
        serialize_tuple(usize) -> Self::SerializeTuple;
        serialize_tuple_struct(&'static str, usize) -> Self::SerializeTupleStruct;
        serialize_tuple_variant(&'static str, u32, &'static str, usize) -> Self::SerializeTupleVariant;
        serialize_map(Option<usize>) -> Self::SerializeMap;
        serialize_struct_variant(&'static str, u32, &'static str, usize) -> Self::SerializeStructVariant;
    }
}

/// Puts one field's value into its column.
struct FieldEncoder<'a> {
    column: &'static str,
    values: &'a mut Values,
}

impl FieldEncoder<'_> {
    fn mismatch(&self, what: &str) -> EncodeError {
        EncodeError(format!("column {} cannot hold {what}", self.column))
    }

    fn refusal(&self) -> EncodeError {
        self.mismatch("a list or an object")
    }

    fn integer(self, value: i64) -> Result<(), EncodeError> {
        match self.values {
            Values::Int8(v) => v.push(Some(value)),
            Values::Float8(v) => v.push(Some(value as f64)),
            _ => return Err(self.mismatch("an integer")),
        }
        Ok(())
    }
}

macro_rules! integers {
    ($($method:ident($type:ty);)*) => {
        $(fn $method(self, value: $type) -> Result<(), EncodeError> {
            self.integer(value.into())
        })*
    };
}

impl ser::Serializer for FieldEncoder<'_> {
    type Ok = ();
    type Error = EncodeError;
    type SerializeSeq = Impossible<(), EncodeError>;
    type SerializeTuple = Impossible<(), EncodeError>;
    type SerializeTupleStruct = Impossible<(), EncodeError>;
    type SerializeTupleVariant = Impossible<(), EncodeError>;
    type SerializeMap = Impossible<(), EncodeError>;
    type SerializeStruct = Impossible<(), EncodeError>;
    type SerializeStructVariant = Impossible<(), EncodeError>;

    fn serialize_bool(self, value: bool) -> Result<(), EncodeError> {
        match self.values {
            Values::Bool(v) => v.push(Some(value)),
            _ => return Err(self.mismatch("a boolean")),
        }
        Ok(())
    }

    integers! {
        serialize_i8(i8);
        serialize_i16(i16);
        serialize_i32(i32);
        serialize_i64(i64);
        serialize_u8(u8);
        serialize_u16(u16);
        serialize_u32(u32);
    }

    fn serialize_u64(self, value: u64) -> Result<(), EncodeError> {
        let value = i64::try_from(value).map_err(|_| {
            EncodeError(format!(
                "{value} is out of the range of column {}",
                self.column
            ))
        })?;
        self.integer(value)
    }

    fn serialize_f32(self, value: f32) -> Result<(), EncodeError> {
        self.serialize_f64(value.into())
    }

    fn serialize_f64(self, value: f64) -> Result<(), EncodeError> {
        match self.values {
            // JSON has no NaN or infinity: serde_json wrote them as null.
            Values::Float8(v) => v.push(value.is_finite().then_some(value)),
            _ => return Err(self.mismatch("a number")),
        }
        Ok(())
    }

    fn serialize_char(self, value: char) -> Result<(), EncodeError> {
        self.serialize_str(value.encode_utf8(&mut [0; 4]))
    }

    fn serialize_str(self, value: &str) -> Result<(), EncodeError> {
        let unfit = || EncodeError(format!("column {} cannot hold `{value}`", self.column));
        match self.values {
            Values::Text(v) => v.push(Some(value.to_owned())),
            Values::Uuid(v) => v.push(Some(Uuid::parse_str(value).map_err(|_| unfit())?)),
            Values::Timestamptz(v) => v.push(Some(timestamp(value).ok_or_else(unfit)?)),
            _ => return Err(unfit()),
        }
        Ok(())
    }

    fn serialize_bytes(self, _: &[u8]) -> Result<(), EncodeError> {
        Err(self.mismatch("bytes"))
    }

    fn serialize_none(self) -> Result<(), EncodeError> {
        self.values.push_null();
        Ok(())
    }

    fn serialize_some<T: ?Sized + Serialize>(self, value: &T) -> Result<(), EncodeError> {
        value.serialize(self)
    }

    fn serialize_unit(self) -> Result<(), EncodeError> {
        self.serialize_none()
    }

    fn serialize_unit_struct(self, _: &'static str) -> Result<(), EncodeError> {
        self.serialize_none()
    }

    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
    ) -> Result<(), EncodeError> {
        self.serialize_str(variant)
    }

    fn serialize_newtype_struct<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<(), EncodeError> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<(), EncodeError> {
        Err(self.refusal())
    }

    refuse! {
        serialize_seq(Option<usize>) -> Self::SerializeSeq;
        serialize_tuple(usize) -> Self::SerializeTuple;
        serialize_tuple_struct(&'static str, usize) -> Self::SerializeTupleStruct;
        serialize_tuple_variant(&'static str, u32, &'static str, usize) -> Self::SerializeTupleVariant;
        serialize_map(Option<usize>) -> Self::SerializeMap;
        serialize_struct(&'static str, usize) -> Self::SerializeStruct;
        serialize_struct_variant(&'static str, u32, &'static str, usize) -> Self::SerializeStructVariant;
    }
}

/// An RFC 3339 time (as chrono writes a `DateTime`) at the microsecond
/// Postgres stores, rounded the way `timestamptz_in` rounds a longer
/// fraction (`rint` of the fraction, as a double, times a million), so a
/// row written here equals the row the same text would have made.
fn timestamp(text: &str) -> Option<DateTime<Utc>> {
    let parsed = DateTime::parse_from_rfc3339(text).ok()?;
    let nanos = i64::from(parsed.timestamp_subsec_nanos());
    let micros = if nanos % 1_000 == 0 {
        nanos / 1_000
    } else {
        let digits: String = text
            .split_once('.')?
            .1
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        let fraction: f64 = format!("0.{digits}").parse().ok()?;
        (fraction * 1_000_000.0).round_ties_even() as i64
    };
    DateTime::from_timestamp_micros(
        parsed
            .timestamp()
            .checked_mul(1_000_000)?
            .checked_add(micros)?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Row {
        id: Uuid,
        name: Option<String>,
        count: i64,
        small: Option<i16>,
        at: DateTime<Utc>,
        data: serde_json::Value,
        score: f64,
        done: bool,
    }

    fn types() -> HashMap<String, ColumnType> {
        [
            ("id", ColumnType::Uuid),
            ("name", ColumnType::Text),
            ("count", ColumnType::Integer),
            ("small", ColumnType::Integer),
            ("at", ColumnType::Timestamptz),
            ("data", ColumnType::Jsonb),
            ("score", ColumnType::Float8),
            ("done", ColumnType::Bool),
        ]
        .into_iter()
        .map(|(name, t)| (name.to_owned(), t))
        .collect()
    }

    const NAMES: &[&str] = &[
        "id", "name", "count", "small", "at", "data", "score", "done",
    ];

    #[test]
    fn rows_are_taken_apart_into_typed_columns_by_field_name() {
        let at = DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap();
        let mut columns = Columns::new("t", NAMES, &types(), 2).unwrap();
        for (name, data) in [
            (Some("a"), serde_json::json!({"k": 1})),
            (None, serde_json::Value::Null),
        ] {
            columns
                .push(&Row {
                    id: Uuid::nil(),
                    name: name.map(str::to_owned),
                    count: 7,
                    small: None,
                    at,
                    data,
                    score: f64::NAN,
                    done: true,
                })
                .unwrap();
        }
        let by_name = |wanted: &str| {
            &columns
                .columns
                .iter()
                .find(|(n, ..)| *n == wanted)
                .unwrap()
                .2
        };
        assert!(matches!(by_name("id"), Values::Uuid(v) if v == &[Some(Uuid::nil()); 2]));
        assert!(matches!(by_name("name"), Values::Text(v) if v == &[Some("a".to_owned()), None]));
        assert!(matches!(by_name("count"), Values::Int8(v) if v == &[Some(7); 2]));
        assert!(matches!(by_name("small"), Values::Int8(v) if v == &[None, None]));
        assert!(matches!(by_name("at"), Values::Timestamptz(v) if v == &[Some(at); 2]));
        assert!(
            matches!(by_name("data"), Values::Text(v) if v == &[Some("{\"k\":1}".to_owned()), None])
        );
        assert!(matches!(by_name("score"), Values::Float8(v) if v == &[None, None]));
        assert!(matches!(by_name("done"), Values::Bool(v) if v == &[Some(true); 2]));
    }

    #[test]
    fn a_row_that_does_not_fit_its_columns_is_refused() {
        let mut unfit = types();
        unfit.insert("count".to_owned(), ColumnType::Bool);
        let mut columns = Columns::new("t", NAMES, &unfit, 1).unwrap();
        let row = Row {
            id: Uuid::nil(),
            name: None,
            count: 70_000,
            small: None,
            at: Utc::now(),
            data: serde_json::Value::Null,
            score: 1.0,
            done: false,
        };
        assert!(columns.push(&row).is_err());
        assert!(Columns::new("t", &["id", "missing"], &types(), 1).is_err());
        let mut fewer = Columns::new("t", &["id"], &types(), 1).unwrap();
        assert!(fewer.push(&row).is_err(), "a field that is no column");
    }

    #[test]
    fn times_round_to_the_microsecond_like_postgres() {
        let micros = |text: &str| timestamp(text).unwrap().timestamp_micros() % 1_000_000;
        assert_eq!(micros("2026-12-06T17:35:12.123456Z"), 123_456);
        assert_eq!(micros("2026-12-06T17:35:12Z"), 0);
        assert_eq!(micros("2026-12-06T17:35:12.1234564Z"), 123_456);
        assert_eq!(micros("2026-12-06T17:35:12.1234566Z"), 123_457);
        assert_eq!(micros("2026-12-06T17:35:12.123456789Z"), 123_457);
        // A fraction that rounds up to the next second carries.
        assert_eq!(
            timestamp("2026-12-06T17:35:12.9999996Z").unwrap(),
            timestamp("2026-12-06T17:35:13Z").unwrap()
        );
        assert_eq!(
            timestamp("2026-12-06T18:35:12.5+01:00").unwrap(),
            timestamp("2026-12-06T17:35:12.5Z").unwrap()
        );
        assert!(timestamp("yesterday").is_none());
    }
}
