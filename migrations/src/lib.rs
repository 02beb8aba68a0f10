//! Souk's Postgres schema. The SQL lives in `migrations/sql/`, one file per
//! migration, applied in order by [`MIGRATOR`]. Every binary runs it at start.
//! A migration that has been applied anywhere is never edited: add a new one.

/// All of Souk's migrations, embedded at compile time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./sql");
