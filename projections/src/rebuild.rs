//! Rebuilding a projection from the event store, while the live projector
//! keeps running.
//!
//! 1. **Build aside.** [`rebuild_into`] creates a fresh schema (by default
//!    `rebuild_<projection>`) with a copy of each of the projection's tables
//!    (`CREATE TABLE ... (LIKE public.x INCLUDING ALL)`, indexes renamed to
//!    the live ones' names) and replays the whole global order into it with
//!    `event_store::global::read_after` and the live projector's own apply
//!    code. Nothing live is touched; this can take as long as it takes.
//! 2. **Swap.** [`rebuild`] then opens one transaction and takes the
//!    projection's advisory lock *exclusively*. Every live batch takes the
//!    same lock *shared* before it reads its checkpoint, so once the rebuild
//!    holds it no batch of this projection is in flight and none starts. It
//!    reads the highest live checkpoint C, replays into the aside tables the
//!    events committed since step 1, up to a position P ≥ C, drops the live
//!    tables, moves the rebuilt ones into `public`, sets every partition's
//!    checkpoint to P and commits. The live partitions resume: each reads its
//!    checkpoint in its next batch, skips what is at or before P (already in
//!    the rebuilt tables) and applies what follows.
//!
//! Why P ≥ C can always be reached under the lock: every event up to C was
//! committed before the live partition applied it, hence before this
//! transaction began; `read_after` only waits for transactions older than
//! the oldest one running, and any such transaction already blocked the relay
//! that published C. Every wait here is bounded (`lock_timeout`,
//! [`LOCKED_CATCH_UP_TIMEOUT`]); a rebuild that times out rolls back and
//! leaves the live projection as it was.
//!
//! Readers see either the old tables or the new ones, never a mix: the swap
//! is one transaction. A swap of "listings" also queues every listing for
//! the search index (`search::enqueue_all`) in that transaction. Dead letters found by a rebuild go to
//! `public.dead_letters` like live ones (a letter already parked stays as
//! it was).

use std::time::{Duration, Instant};

use anyhow::Context as _;
use event_store::Position;
use event_store::fanout::partition_of;
use event_store::global::{RecordedEvent, read_after};
use event_store::leader;
use sqlx::{Connection, PgConnection, PgPool};

use crate::engine::{Kind, apply_isolated};
use crate::park::{DeadLetter, park};
use crate::rows::valid_schema;
use crate::runtime::projection_lock_key;

/// Events read from the global order at once.
const READ_BATCH: i64 = 2_000;
/// The longest a rebuild holds the projection's lock to catch up.
pub const LOCKED_CATCH_UP_TIMEOUT: Duration = Duration::from_secs(30);

/// The session lock held by the one rebuild of `kind` that may run.
fn rebuild_lock_key(kind: Kind) -> i64 {
    leader::lock_key(&format!("souk-projection-rebuild:{}", kind.name()))
}

/// What a rebuild did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RebuildReport {
    pub projection: String,
    /// The schema the tables were built in.
    pub schema: String,
    /// The last event the rebuilt tables include (a position token).
    pub position: Position,
    /// Events read from the global order (all aggregate types).
    pub events_read: u64,
    /// Of those, events applied to this projection's tables.
    pub events_applied: u64,
    /// Events this projection could not apply, parked in `dead_letters`.
    pub events_parked: u64,
    /// Whether the rebuilt tables replaced the live ones.
    pub swapped: bool,
}

/// The schema a rebuild of `projection` builds in before the swap.
pub fn rebuild_schema(projection: &str) -> String {
    format!("rebuild_{projection}")
}

fn kind_of(projection: &str) -> anyhow::Result<Kind> {
    Kind::parse(projection).with_context(|| {
        format!(
            "`{projection}` is not a projection (one of {})",
            crate::PROJECTIONS.join(", ")
        )
    })
}

/// Builds `projection` from scratch into `schema` (dropped first if it
/// exists) from every event committed so far, without touching the live
/// tables. `partitions` only labels the dead letters it parks.
pub async fn rebuild_into(
    pool: &PgPool,
    projection: &str,
    schema: &str,
    partitions: u32,
) -> anyhow::Result<RebuildReport> {
    let kind = kind_of(projection)?;
    anyhow::ensure!(
        valid_schema(schema) && schema != "public" && !schema.starts_with("pg_"),
        "`{schema}` cannot hold a rebuild: use a lowercase name other than public"
    );
    let started = Instant::now();
    prepare_schema(pool, kind, schema).await?;
    let mut report = RebuildReport {
        projection: kind.name().to_owned(),
        schema: schema.to_owned(),
        position: Position::START,
        events_read: 0,
        events_applied: 0,
        events_parked: 0,
        swapped: false,
    };
    loop {
        let events = read_after(pool, report.position, READ_BATCH)
            .await
            .context("reading the global order")?;
        if events.is_empty() {
            break;
        }
        let mut conn = pool.acquire().await.context("connecting to Postgres")?;
        let mut tx = conn.begin().await.context("beginning a rebuild batch")?;
        replay(&mut tx, kind, schema, partitions, &events, &mut report).await?;
        tx.commit().await.context("committing a rebuild batch")?;
    }
    tracing::info!(
        projection = kind.name(),
        schema,
        position = %report.position,
        events_applied = report.events_applied,
        events_parked = report.events_parked,
        seconds = started.elapsed().as_secs_f64(),
        "projection rebuilt aside"
    );
    Ok(report)
}

/// Rebuilds `projection` from scratch and swaps the result in atomically
/// while the live projector keeps running (see the module doc). `partitions`
/// is the projector's partition count: every partition gets a checkpoint.
pub async fn rebuild(
    pool: &PgPool,
    projection: &str,
    partitions: u32,
) -> anyhow::Result<RebuildReport> {
    let kind = kind_of(projection)?;
    let schema = rebuild_schema(kind.name());
    // One rebuild of a projection at a time: they would share the schema.
    // The lock lives with this connection, closed (and so released) when
    // the rebuild ends, however it ends.
    let mut guard = pool
        .acquire()
        .await
        .context("connecting to Postgres")?
        .detach();
    let alone = leader::try_lead(&mut guard, rebuild_lock_key(kind))
        .await
        .context("taking the rebuild lock")?;
    anyhow::ensure!(alone, "another rebuild of {} is running", kind.name());
    let mut report = rebuild_into(pool, kind.name(), &schema, partitions).await?;

    let mut conn = pool.acquire().await.context("connecting to Postgres")?;
    let mut tx = conn.begin().await.context("beginning the swap")?;
    sqlx::query("SET LOCAL lock_timeout = '30s'")
        .execute(&mut *tx)
        .await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(projection_lock_key(kind))
        .execute(&mut *tx)
        .await
        .context("taking the projection's lock (live batches stop here)")?;
    let live: Option<(i64, i64)> = sqlx::query_as(
        "SELECT transaction_id, position FROM projection_checkpoints
          WHERE projection = $1 ORDER BY transaction_id DESC, position DESC LIMIT 1",
    )
    .bind(kind.name())
    .fetch_optional(&mut *tx)
    .await
    .context("reading the live checkpoints")?;
    let live = live.map_or(Position::START, |(transaction_id, position)| Position {
        transaction_id: transaction_id as u64,
        position,
    });
    let deadline = Instant::now() + LOCKED_CATCH_UP_TIMEOUT;
    loop {
        let events = read_after(pool, report.position, READ_BATCH)
            .await
            .context("reading the global order")?;
        if events.is_empty() {
            if report.position >= live {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the live projection is at {live} but the event store shows nothing after {} \
                 within {LOCKED_CATCH_UP_TIMEOUT:?}; nothing was swapped",
                report.position
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        replay(&mut tx, kind, &schema, partitions, &events, &mut report).await?;
    }
    for table in kind.tables() {
        sqlx::query(&format!("DROP TABLE public.{table}"))
            .execute(&mut *tx)
            .await
            .with_context(|| format!("dropping the live {table}"))?;
        sqlx::query(&format!("ALTER TABLE {schema}.{table} SET SCHEMA public"))
            .execute(&mut *tx)
            .await
            .with_context(|| format!("moving the rebuilt {table} in"))?;
    }
    sqlx::query(&format!("DROP SCHEMA {schema}"))
        .execute(&mut *tx)
        .await
        .context("dropping the rebuild schema")?;
    let at = report.position;
    sqlx::query(
        "INSERT INTO projection_checkpoints AS c
                (projection, partition, transaction_id, position,
                 caught_up_transaction, caught_up_position, updated_at)
         SELECT $1, partition, $3, $4, $3, $4, now()
           FROM generate_series(0, $2 - 1) AS n(partition)
         ON CONFLICT (projection, partition) DO NOTHING",
    )
    .bind(kind.name())
    .bind(partitions.max(1) as i32)
    .bind(at.transaction_id as i64)
    .bind(at.position)
    .execute(&mut *tx)
    .await
    .context("creating checkpoints")?;
    sqlx::query(
        "UPDATE projection_checkpoints
            SET transaction_id = $2,
                position = $3,
                caught_up_transaction = CASE WHEN (caught_up_transaction, caught_up_position) < ($2, $3)
                                             THEN $2 ELSE caught_up_transaction END,
                caught_up_position = CASE WHEN (caught_up_transaction, caught_up_position) < ($2, $3)
                                          THEN $3 ELSE caught_up_position END,
                updated_at = now()
          WHERE projection = $1",
    )
    .bind(kind.name())
    .bind(at.transaction_id as i64)
    .bind(at.position)
    .execute(&mut *tx)
    .await
    .context("moving the checkpoints")?;
    if kind == Kind::Listings {
        // The search index follows the rows it was fed from; they were just
        // replaced, so every listing is indexed again.
        crate::search::enqueue_all(&mut tx, at)
            .await
            .context("queueing the listings for the search index")?;
    }
    tx.commit().await.context("committing the swap")?;
    if kind == Kind::Listings
        && let Err(error) = event_store::signal::notify(pool, crate::search::CHANNEL).await
    {
        // The indexer also polls: it only starts later.
        tracing::warn!(%error, "cannot wake the search indexer");
    }
    let _ = guard.close().await;
    report.swapped = true;
    tracing::info!(
        projection = kind.name(),
        position = %report.position,
        "rebuilt projection swapped in"
    );
    Ok(report)
}

/// Applies `events` (a chunk of the global order) to `schema`, parking what
/// the projection refuses.
async fn replay(
    conn: &mut PgConnection,
    kind: Kind,
    schema: &str,
    partitions: u32,
    events: &[RecordedEvent],
    report: &mut RebuildReport,
) -> anyhow::Result<()> {
    let handled: Vec<&RecordedEvent> = events
        .iter()
        .filter(|event| kind.handles(&event.aggregate_type))
        .collect();
    let refused = apply_isolated(conn, kind, schema, &handled)
        .await
        .context("applying events")?;
    for (index, why) in &refused {
        let event = handled[*index];
        let partition = partition_of(&event.aggregate_id, partitions.max(1)) as i32;
        park(
            conn,
            kind.name(),
            partition,
            &DeadLetter::event(event, why.0.clone()),
        )
        .await
        .context("parking a poison event")?;
    }
    report.events_read += events.len() as u64;
    report.events_applied += (handled.len() - refused.len()) as u64;
    report.events_parked += refused.len() as u64;
    if let Some(last) = events.last() {
        report.position = last.position;
    }
    Ok(())
}

/// Creates `schema` afresh with empty copies of the projection's tables,
/// their indexes named like the live ones (so a swap keeps the names).
async fn prepare_schema(pool: &PgPool, kind: Kind, schema: &str) -> anyhow::Result<()> {
    let mut conn = pool.acquire().await.context("connecting to Postgres")?;
    let mut tx = conn.begin().await?;
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .execute(&mut *tx)
        .await
        .context("dropping an earlier rebuild")?;
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&mut *tx)
        .await
        .context("creating the rebuild schema")?;
    for table in kind.tables() {
        sqlx::query(&format!(
            "CREATE TABLE {schema}.{table} (LIKE public.{table} INCLUDING ALL)"
        ))
        .execute(&mut *tx)
        .await
        .with_context(|| format!("creating {schema}.{table}"))?;
        let live = indexes(&mut tx, "public", table).await?;
        for (name, shape) in indexes(&mut tx, schema, table).await? {
            if let Some((live_name, _)) = live.iter().find(|(_, live_shape)| *live_shape == shape)
                && *live_name != name
            {
                sqlx::query(&format!(
                    "ALTER INDEX {schema}.{} RENAME TO {}",
                    quote(&name),
                    quote(live_name)
                ))
                .execute(&mut *tx)
                .await
                .with_context(|| format!("naming the index {name}"))?;
            }
        }
    }
    tx.commit().await?;
    Ok(())
}

/// The indexes of `schema.table`: each name with its definition minus the
/// name and the table (`UNIQUE ... USING btree (col)`), which is what two
/// copies of a table's index have in common.
async fn indexes(
    conn: &mut PgConnection,
    schema: &str,
    table: &str,
) -> anyhow::Result<Vec<(String, String)>> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT c.relname::text, pg_get_indexdef(c.oid)
           FROM pg_index i
           JOIN pg_class c ON c.oid = i.indexrelid
           JOIN pg_class t ON t.oid = i.indrelid
           JOIN pg_namespace n ON n.oid = t.relnamespace
          WHERE n.nspname = $1 AND t.relname = $2",
    )
    .bind(schema)
    .bind(table)
    .fetch_all(conn)
    .await
    .context("reading index definitions")?;
    Ok(rows
        .into_iter()
        .map(|(name, definition)| {
            let unique = definition.starts_with("CREATE UNIQUE");
            let using = definition
                .split_once(" USING ")
                .map_or(definition.as_str(), |(_, rest)| rest);
            (name, format!("{unique} {using}"))
        })
        .collect())
}

/// A quoted SQL identifier.
fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rebuild_schemas_are_named_after_their_projection() {
        for name in crate::PROJECTIONS {
            assert!(valid_schema(&rebuild_schema(name)));
        }
        assert_eq!(quote("a\"b"), "\"a\"\"b\"");
    }
}
