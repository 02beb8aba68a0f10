//! Feeding the search index from `rm_listings`, exactly.
//!
//! - The live listings projection calls [`enqueue`] in the transaction of
//!   each batch with the listings whose Listing events it applied: their row
//!   in `search_pending` is created, or gets a new `seq`, and keeps the
//!   earliest position not yet indexed. So a committed change is either in
//!   the index or pending, never neither. A rebuild's swap calls
//!   [`enqueue_all`] (the rebuilt rows replace the indexed ones).
//! - The [`Indexer`] (a task of the projector process, when it runs the
//!   listings projection) reads batches of up to [`DRAIN_BATCH`] pending rows
//!   with their `rm_listings` row, each in one snapshot, writes those
//!   documents (a listing without a row is removed), and once the index has
//!   made a batch durable deletes the rows whose `seq` it read; several
//!   batches are in flight at once (see [`drain`]). A crash anywhere leaves
//!   the rows to be indexed again, which is harmless: a write replaces a
//!   document by id. It wakes when a listings batch has committed (in
//!   process through a [`CommitSignal`], from other processes on
//!   `NOTIFY souk_search_pending`, sent outside the writing transaction; see
//!   `event_store::signal`), polls every [`IDLE_POLL`] in case a wake-up was
//!   lost, and after a commit pauses [`COMMIT_INTERVAL_MIN`] so changes
//!   arriving meanwhile share the next one.
//! - At start and every [`RECONCILE_INTERVAL`], an index that misses
//!   listings (fewer documents than listings neither indexed nor pending,
//!   e.g. a new index directory or document version, or a Meilisearch index
//!   removed behind Souk's back, which `SearchIndex::ensure` creates and
//!   configures again) is refilled by [`enqueue_all`]; one holding more
//!   documents than there are listings is cleared first.
//! - A read that must include position P waits until no pending row is at
//!   or before P (the query API's `CatchUp::wait_search`).
//!
//! Only one indexer per database writes at a time (a session advisory lock;
//! the embedded index also has tantivy's writer lock): two indexers draining
//! the same rows could write an older document after a newer one. Other
//! projector processes stand by and retry. The embedded index lives on one
//! machine, so with it exactly one projector process should run listings;
//! several need Meilisearch.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use event_store::Position;
use event_store::backoff::Backoff;
use event_store::leader;
use event_store::signal::CommitSignal;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{Connection as _, PgConnection};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use uuid::Uuid;

use super::{Durable, ListingDoc, SearchBackend, SearchConfig, SearchIndex};
use crate::engine::Kind;

/// Most pending rows indexed in one write. A refill of an empty Meilisearch
/// index took 128 s for 100,500 listings in batches of 500 and 24 s in
/// batches of 5,000, one awaited at a time (`read-bench --phases search`,
/// idle, 2026-12-06); with [`IN_FLIGHT`] batches queued, 20-21 s
/// (2026-12-07).
pub const DRAIN_BATCH: i64 = 5_000;
/// Most full batches (a backlog) one drain takes (see [`drain`]) before the
/// indexer looks at its reconcile clock again.
const DRAIN_ROUNDS: usize = 16;
/// Batches submitted to the index and not yet known durable, at most (see
/// [`drain`]). More than one queued lets Meilisearch index several at once
/// (it batches queued document tasks of one index together).
const IN_FLIGHT: usize = 8;
/// The shortest pause between two index commits that did not empty a full
/// batch: it bounds the commits (and fsyncs) per second under load, at the
/// cost of this much staleness for `/search`.
pub const COMMIT_INTERVAL_MIN: Duration = Duration::from_millis(100);
/// How often an idle indexer looks for pending rows without a notification.
pub const IDLE_POLL: Duration = Duration::from_secs(1);
/// How often a running indexer checks that the index holds every listing.
pub const RECONCILE_INTERVAL: Duration = Duration::from_secs(5);
/// The notification channel that wakes the indexer.
pub const CHANNEL: &str = "souk_search_pending";
/// The longest pause after a failed indexer session.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often an indexer standing by tries to take the lead.
const STANDBY_RETRY: Duration = Duration::from_secs(2);
/// Bound on connecting to Postgres.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

const UPSERT: &str = "ON CONFLICT (listing_id) DO UPDATE
     SET transaction_id = CASE WHEN (EXCLUDED.transaction_id, EXCLUDED.position)
                                    < (search_pending.transaction_id, search_pending.position)
                               THEN EXCLUDED.transaction_id ELSE search_pending.transaction_id END,
         position = CASE WHEN (EXCLUDED.transaction_id, EXCLUDED.position)
                              < (search_pending.transaction_id, search_pending.position)
                         THEN EXCLUDED.position ELSE search_pending.position END,
         seq = nextval('search_pending_seq')";

/// Records that the listings of `changes` changed at these positions, in the
/// caller's transaction.
pub(crate) async fn enqueue(
    conn: &mut PgConnection,
    changes: &[(Uuid, Position)],
) -> Result<(), sqlx::Error> {
    if changes.is_empty() {
        return Ok(());
    }
    // One row per listing: its earliest change.
    let mut earliest: Vec<(Uuid, Position)> = changes.to_vec();
    earliest.sort_unstable();
    earliest.dedup_by_key(|(id, _)| *id);
    let ids: Vec<Uuid> = earliest.iter().map(|(id, _)| *id).collect();
    let transactions: Vec<i64> = earliest
        .iter()
        .map(|(_, at)| at.transaction_id as i64)
        .collect();
    let positions: Vec<i64> = earliest.iter().map(|(_, at)| at.position).collect();
    sqlx::query(&format!(
        "INSERT INTO public.search_pending (listing_id, transaction_id, position)
         SELECT * FROM UNNEST($1::uuid[], $2::bigint[], $3::bigint[]) {UPSERT}"
    ))
    .bind(&ids)
    .bind(&transactions)
    .bind(&positions)
    .execute(&mut *conn)
    .await
    .map(drop)
}

/// Marks every listing as pending at `at` (a full reindex), in the caller's
/// transaction; `event_store::signal::notify` on [`CHANNEL`] after it commits
/// wakes the indexer.
pub async fn enqueue_all(conn: &mut PgConnection, at: Position) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(&format!(
        "INSERT INTO public.search_pending (listing_id, transaction_id, position)
         SELECT listing_id, $1, $2 FROM public.rm_listings {UPSERT}"
    ))
    .bind(at.transaction_id as i64)
    .bind(at.position)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected())
}

/// A pending row with its listing, if it still has one.
#[derive(sqlx::FromRow)]
struct Pending {
    listing_id: Uuid,
    seq: i64,
    transaction_id: i64,
    position: i64,
    title: Option<String>,
    description: Option<String>,
    category: Option<String>,
    condition: Option<String>,
    seller_id: Option<Uuid>,
    status: Option<String>,
    currency: Option<String>,
    price_amount: Option<i64>,
    created_at: Option<DateTime<Utc>>,
}

impl Pending {
    /// The document, or `None` when the listing has no row.
    fn document(self) -> Option<ListingDoc> {
        Some(ListingDoc {
            id: self.listing_id,
            title: self.title?,
            description: self.description?,
            // Compared without case (see `SearchFilters::category`).
            category: self.category?.to_lowercase(),
            condition: self.condition?,
            seller_id: self.seller_id?,
            status: self.status?,
            currency: self.currency?,
            price: self.price_amount?,
            created_at: self.created_at?.timestamp_micros(),
        })
    }
}

/// The task that drains `search_pending` into the index (see the module doc).
#[derive(Debug)]
pub struct Indexer {
    search: SearchConfig,
    connect_options: PgConnectOptions,
    /// Signalled by this process's listings batches.
    pending: CommitSignal,
}

/// Starts the indexer when this projector runs the listings projection and
/// search is on.
pub(crate) fn spawn_indexer(
    search: &SearchConfig,
    connect_options: &PgConnectOptions,
    kinds: &[Kind],
    pending: &CommitSignal,
    stop: watch::Receiver<bool>,
) -> Option<JoinHandle<()>> {
    if search.backend == SearchBackend::Off || !kinds.contains(&Kind::Listings) {
        return None;
    }
    let indexer = Indexer {
        search: search.clone(),
        connect_options: connect_options.clone(),
        pending: pending.clone(),
    };
    Some(tokio::spawn(indexer.run(stop)))
}

impl Indexer {
    /// Runs sessions until `stop` turns true; a failed session is logged and
    /// started again after a backoff.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut backoff = Backoff::new(BACKOFF_MAX);
        while !*stop.borrow() {
            let session = self.session(&mut stop).await;
            self.pending.set_consumer_here(false);
            match session {
                Ok(()) => break,
                Err(error) => {
                    metrics::counter!("souk_search_indexer_errors_total").increment(1);
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "search indexer session failed; starting again"
                    );
                    tokio::select! {
                        _ = stop.wait_for(|stop| *stop) => {}
                        () = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        }
    }

    async fn session(&self, stop: &mut watch::Receiver<bool>) -> anyhow::Result<()> {
        // Held for the session on a connection of its own (see the module doc).
        let mut lock = PgConnection::connect_with(&self.connect_options)
            .await
            .context("connecting to Postgres")?;
        let mut stopped = stop.clone();
        let leads = leader::lead(
            &mut lock,
            leader::lock_key("souk-search-indexer"),
            STANDBY_RETRY,
            async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            },
            || tracing::info!("another search indexer runs on this database; standing by"),
        )
        .await
        .context("taking the indexer lock")?;
        if !leads {
            return Ok(());
        }
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect_with(self.connect_options.clone())
            .await
            .context("connecting to Postgres")?;
        let index = self
            .search
            .open_writer()
            .await
            .context("opening the search index")?
            .context("search is off")?;
        let mut listener = PgListener::connect_with(&pool)
            .await
            .context("listening for pending listings")?;
        listener.listen(CHANNEL).await?;
        // This process's listings batches need not notify while this
        // session indexes: they wake it directly.
        self.pending.set_consumer_here(true);
        let mut wake = Wake {
            listener,
            local: self.pending.local(),
        };
        reconcile(&pool, &*index).await?;
        let mut reconciled = tokio::time::Instant::now();
        tracing::info!(backend = ?self.search.backend, "search indexer running");
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            if reconciled.elapsed() >= RECONCILE_INTERVAL {
                reconcile(&pool, &*index).await?;
                reconciled = tokio::time::Instant::now();
            }
            let taken = drain(&pool, &*index, stop, &mut wake).await?;
            if taken as i64 >= DRAIN_BATCH {
                continue;
            }
            if taken > 0 {
                // Each drain ends in a durable index commit: under a steady
                // stream of changes, gather them for a moment instead of
                // committing for every listings batch.
                tokio::select! {
                    _ = stop.wait_for(|stop| *stop) => return Ok(()),
                    () = tokio::time::sleep(COMMIT_INTERVAL_MIN) => {}
                }
                continue;
            }
            tokio::select! {
                _ = stop.wait_for(|stop| *stop) => return Ok(()),
                woken = wake.next() => woken?,
                () = tokio::time::sleep(IDLE_POLL) => {}
            }
        }
    }
}

/// What tells the indexer that rows were queued: a `NOTIFY` from another
/// process, or this process's listings batches directly.
struct Wake {
    listener: PgListener,
    local: Arc<Notify>,
}

impl Wake {
    /// Returns at the next signal of either.
    async fn next(&mut self) -> anyhow::Result<()> {
        tokio::select! {
            notified = self.listener.recv() => {
                notified.context("waiting for pending listings")?;
            }
            () = self.local.notified() => {}
        }
        Ok(())
    }
}

/// Makes sure every listing is indexed or pending (see the module doc).
async fn reconcile(pool: &PgPool, index: &dyn SearchIndex) -> anyhow::Result<()> {
    index.ensure().await.context("checking the search index")?;
    let indexed = index.count().await.context("counting indexed listings")?;
    let (listings, pending): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM rm_listings), (SELECT count(*) FROM search_pending)",
    )
    .fetch_one(pool)
    .await
    .context("counting listings")?;
    let (listings, pending) = (listings.max(0) as u64, pending.max(0) as u64);
    if indexed > listings {
        tracing::warn!(
            indexed,
            listings,
            "the search index holds listings the read model does not: clearing it"
        );
        index.clear().await.context("clearing the search index")?;
    } else if indexed + pending >= listings {
        return Ok(());
    }
    let mut conn = pool.acquire().await.context("connecting to Postgres")?;
    let mut tx = conn.begin().await?;
    let queued = enqueue_all(&mut tx, Position::START)
        .await
        .context("queueing every listing")?;
    tx.commit().await?;
    tracing::info!(
        indexed,
        listings,
        queued,
        "search index incomplete: every listing queued"
    );
    Ok(())
}

/// Indexes pending rows, up to [`DRAIN_ROUNDS`] full batches of
/// [`DRAIN_BATCH`] or for [`RECONCILE_INTERVAL`], and none once `stop` is
/// true; returns how many it took.
///
/// Batches are pipelined: up to [`IN_FLIGHT`] are submitted while the index
/// makes the oldest durable, and a batch's rows are deleted once it is (a
/// refill that waited for every batch in turn left the index idle while the
/// next was read, and gave it one batch at a time).
/// - While batches come back full (a backlog), each is read after the last
///   key of the one before.
/// - Once one is not full, the drain has caught up. It then waits for the
///   oldest batch to be durable or for new rows (`wake`), whichever comes
///   first. New rows are read from the first key, leaving out the listings in
///   flight, and submitted at most every [`COMMIT_INTERVAL_MIN`]. So under a
///   steady stream of changes a change is queued on the index while earlier
///   ones are being indexed, not after them (Meilisearch indexes the tasks
///   queued meanwhile together), and the drain does not pause to settle
///   everything before [`RECONCILE_INTERVAL`].
/// - A row that changes while its batch is in flight keeps its key but gets
///   a new `seq`, so its delete misses it; reads from the first key leave it
///   out while its listing is in flight, and the read right after that
///   batch is durable takes it again. A
///   backlog read after a key may still put a listing in flight in a second
///   batch: the index applies batches in the order submitted, so the later
///   document wins.
///
/// The drain ends when nothing is in flight, or after [`DRAIN_ROUNDS`] full
/// batches or [`RECONCILE_INTERVAL`] once every batch it submitted is
/// durable.
async fn drain(
    pool: &PgPool,
    index: &dyn SearchIndex,
    stop: &mut watch::Receiver<bool>,
    wake: &mut Wake,
) -> anyhow::Result<usize> {
    let mut after = (i64::MIN, i64::MIN);
    let mut in_flight: VecDeque<InFlight<'_>> = VecDeque::with_capacity(IN_FLIGHT);
    let mut taken = 0;
    let mut rounds = 0;
    let started = Instant::now();
    let mut submitted_at = started;
    let mut read = true;
    loop {
        if *stop.borrow() {
            // Stopping: the batches in flight stay pending and are indexed
            // again by the next indexer, which is harmless.
            return Ok(taken);
        }
        if read {
            // Read from the first key: none of the listings in flight (read
            // after a batch's last key: none of its rows anyway).
            let busy: Vec<Uuid> = if after.0 == i64::MIN {
                in_flight
                    .iter()
                    .flat_map(|batch| batch.ids.iter().copied())
                    .collect()
            } else {
                Vec::new()
            };
            let rows = read_pending(pool, after, &busy).await?;
            let full = rows.len() as i64 >= DRAIN_BATCH;
            if let Some(last) = rows.last() {
                after = (last.transaction_id, last.position);
                if in_flight.len() == IN_FLIGHT
                    && let Some(oldest) = in_flight.pop_front()
                {
                    taken += settle(pool, oldest).await?;
                }
                in_flight.push_back(submit(index, rows).await?);
                submitted_at = Instant::now();
                rounds += usize::from(full);
            }
            if in_flight.is_empty()
                || rounds >= DRAIN_ROUNDS
                || started.elapsed() >= RECONCILE_INTERVAL
            {
                break;
            }
            if full {
                continue;
            }
            // Caught up: from now on every read starts from the first key.
            after = (i64::MIN, i64::MIN);
        }
        let oldest = &mut in_flight.front_mut().expect("a batch in flight").durable;
        let durable = tokio::select! {
            durable = oldest => Some(durable),
            _ = stop.wait_for(|stop| *stop) => return Ok(taken),
            woken = wake.next() => { woken?; None }
        };
        read = match durable {
            Some(durable) => {
                durable.context("writing to the search index")?;
                let batch = in_flight.pop_front().expect("a batch in flight");
                let (deleted, changed) = delete_indexed(pool, &batch.ids, &batch.seqs).await?;
                taken += deleted;
                if !changed && in_flight.is_empty() {
                    break;
                }
                // Listings that changed while in flight are free again:
                // read them now rather than at the next wake-up.
                changed
            }
            None => true,
        };
        if read {
            // Changes arriving meanwhile share the next batch.
            tokio::time::sleep_until(submitted_at + COMMIT_INTERVAL_MIN).await;
        }
    }
    for batch in in_flight {
        taken += settle(pool, batch).await?;
    }
    Ok(taken)
}

/// Up to [`DRAIN_BATCH`] pending rows with their listings, in key order after
/// `after`, leaving out the listings `busy`.
async fn read_pending(
    pool: &PgPool,
    after: (i64, i64),
    busy: &[Uuid],
) -> anyhow::Result<Vec<Pending>> {
    sqlx::query_as(
        "SELECT p.listing_id, p.seq, p.transaction_id, p.position, l.title, l.description,
                l.category, l.condition, l.seller_id, l.status, l.currency, l.price_amount,
                l.created_at
           FROM search_pending p
           LEFT JOIN rm_listings l ON l.listing_id = p.listing_id
          WHERE (p.transaction_id, p.position) > ($2, $3)
            AND NOT (p.listing_id = ANY($4))
          ORDER BY p.transaction_id, p.position
          LIMIT $1",
    )
    .bind(DRAIN_BATCH)
    .bind(after.0)
    .bind(after.1)
    .bind(busy)
    .fetch_all(pool)
    .await
    .context("reading pending listings")
}

/// A batch handed to the index and not yet deleted from `search_pending`.
struct InFlight<'a> {
    durable: Durable<'a>,
    ids: Vec<Uuid>,
    seqs: Vec<i64>,
}

async fn submit(index: &dyn SearchIndex, rows: Vec<Pending>) -> anyhow::Result<InFlight<'_>> {
    let ids: Vec<Uuid> = rows.iter().map(|row| row.listing_id).collect();
    let seqs: Vec<i64> = rows.iter().map(|row| row.seq).collect();
    let mut upserts = Vec::with_capacity(rows.len());
    let mut deletes = Vec::new();
    for row in rows {
        let id = row.listing_id;
        match row.document() {
            Some(document) => upserts.push(document),
            None => deletes.push(id),
        }
    }
    let durable = index
        .submit(upserts, deletes)
        .await
        .context("writing to the search index")?;
    Ok(InFlight { durable, ids, seqs })
}

/// Waits until `batch` is durable in the index, then deletes its rows (those
/// that did not change meanwhile); returns how many it held.
async fn settle(pool: &PgPool, batch: InFlight<'_>) -> anyhow::Result<usize> {
    batch.durable.await.context("writing to the search index")?;
    let (taken, _) = delete_indexed(pool, &batch.ids, &batch.seqs).await?;
    Ok(taken)
}

/// Deletes the pending rows of a durable batch (those that did not change
/// meanwhile); returns how many the batch held, and whether some changed
/// meanwhile (and stay pending).
async fn delete_indexed(
    pool: &PgPool,
    ids: &[Uuid],
    seqs: &[i64],
) -> anyhow::Result<(usize, bool)> {
    let deleted = sqlx::query(
        "DELETE FROM search_pending p
          USING UNNEST($1::uuid[], $2::bigint[]) AS done(listing_id, seq)
          WHERE p.listing_id = done.listing_id AND p.seq = done.seq",
    )
    .bind(ids)
    .bind(seqs)
    .execute(pool)
    .await
    .context("deleting indexed pending rows")?
    .rows_affected();
    let taken = ids.len();
    metrics::counter!("souk_search_indexed_total").increment(taken as u64);
    Ok((taken, deleted < taken as u64))
}
