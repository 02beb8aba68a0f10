//! Read your writes: `?after=<position token>` makes a request wait, bounded,
//! until the projections it reads include that write.
//!
//! A projection has caught up with a position when every one of its
//! partitions has: each partition's checkpoint row says up to where it has
//! applied every event of that partition (`caught_up_transaction`,
//! `caught_up_position`, which the projector also advances while the
//! partition is idle). A partition without a row has applied nothing. Events
//! are ordered by `(transaction_id, position)`, so is the comparison.
//!
//! A read of one aggregate's rows (`/listings/{id}`, `/orders/{id}`,
//! `/wallets/{id}`, `/products/{id}/timeline`) waits only for the partition
//! of that aggregate ([`Scope::Partition`]); the projector applies a
//! partition's events in order, so those rows then hold the write. Reads
//! that span aggregates wait for every partition ([`Scope::All`]), which can
//! take a moment longer: an idle partition first has to raise its watermark.
//!
//! A request first checks the checkpoints: it reads them itself, unless
//! other requests are waiting, in which case the poller below refreshes a
//! snapshot every `poll` and that snapshot is enough (under load this saves
//! a read per request). If they do not cover its position, it registers as a
//! waiter and watches that snapshot, which one poller task
//! ([`CatchUp::run`]) refreshes every `poll` while anyone waits, so a
//! thousand waiting requests cost one query per interval, not a thousand. After `timeout` the request is answered 503
//! `not_caught_up` with `Retry-After`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use event_store::Position;
use http_kit::ApiError;
use projections::search::SearchIndex;
use sqlx::PgPool;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

/// The pause of the poller after a failed read.
const ERROR_PAUSE: Duration = Duration::from_millis(250);

/// The read models, named as the projectors name their checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Projection {
    /// `rm_listings`, `rm_reservations`.
    Listings,
    /// `rm_orders`, `rm_seller_stats`.
    Orders,
    /// `rm_wallets`, `rm_wallet_entries`, `rm_escrows`.
    Wallets,
    /// `rm_products`, `rm_timeline`.
    Timelines,
}

impl Projection {
    pub const ALL: [Projection; 4] = [
        Projection::Listings,
        Projection::Orders,
        Projection::Wallets,
        Projection::Timelines,
    ];

    /// The `projection` column of its checkpoints and dead letters.
    pub fn name(self) -> &'static str {
        match self {
            Self::Listings => "listings",
            Self::Orders => "orders",
            Self::Wallets => "wallets",
            Self::Timelines => "timelines",
        }
    }

    /// The aggregate types whose events it applies.
    pub fn aggregate_types(self) -> &'static [&'static str] {
        match self {
            Self::Listings => &["Listing", "Reservation"],
            Self::Orders => &["Order"],
            Self::Wallets => &["Wallet"],
            Self::Timelines => &["ProductTimeline"],
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|projection| projection.name() == name)
    }
}

/// Which partitions of a projection a read depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every partition: reads that span aggregates (lists, filters, stats,
    /// search, notifications).
    All,
    /// One partition: a read of rows that only the events of one aggregate
    /// (or of aggregates sharing its id, as a listing and its stock pool do)
    /// write. Every event of an aggregate goes to its partition, in order, so
    /// that partition having caught up with a position means the rows
    /// include every write of that aggregate up to it, whatever the other
    /// partitions are doing.
    Partition(u32),
}

/// How far each partition of each projection has caught up; `None` for a
/// partition without a checkpoint row (it has applied nothing).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CaughtUp([Vec<Option<Position>>; 4]);

impl CaughtUp {
    /// The least caught-up position over the projection's partitions,
    /// `None` while a partition has no checkpoint.
    pub fn of(&self, projection: Projection) -> Option<Position> {
        let marks = &self.0[projection.index()];
        if marks.iter().any(Option::is_none) {
            return None;
        }
        marks.iter().flatten().min().copied()
    }

    /// How far `scope` of `projection` has caught up.
    pub fn of_scope(&self, projection: Projection, scope: Scope) -> Option<Position> {
        match scope {
            Scope::All => self.of(projection),
            Scope::Partition(partition) => self.0[projection.index()]
                .get(partition as usize)
                .copied()
                .flatten(),
        }
    }

    /// Whether `scope` of every one of `projections` includes `target`.
    pub fn covers(&self, projections: &[Projection], scope: Scope, target: Position) -> bool {
        projections.iter().all(|projection| {
            self.of_scope(*projection, scope)
                .is_some_and(|caught| caught >= target)
        })
    }
}

/// One partition's checkpoint row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CheckpointRow {
    pub projection: String,
    pub partition: i32,
    pub transaction_id: i64,
    pub position: i64,
    pub caught_up_transaction: i64,
    pub caught_up_position: i64,
    pub events_applied: i64,
    pub last_event_recorded_at: Option<chrono::DateTime<chrono::Utc>>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

impl CheckpointRow {
    /// The last event applied.
    pub fn applied(&self) -> Position {
        to_position(self.transaction_id, self.position)
    }

    /// Up to where every event of the partition is applied: its caught-up
    /// mark, or the last event applied if that is further (a partition
    /// applies its events in order, so that one implies the others).
    pub fn caught_up(&self) -> Position {
        to_position(self.caught_up_transaction, self.caught_up_position).max(self.applied())
    }
}

fn to_position(transaction_id: i64, position: i64) -> Position {
    Position {
        transaction_id: u64::try_from(transaction_id).unwrap_or(0),
        position: position.max(0),
    }
}

/// Every checkpoint row of partitions `0..partitions`.
pub async fn checkpoints(
    pool: &PgPool,
    partitions: u32,
) -> Result<Vec<CheckpointRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT projection, partition, transaction_id, position, caught_up_transaction,
                caught_up_position, events_applied, last_event_recorded_at, updated_at
           FROM projection_checkpoints
          WHERE partition >= 0 AND partition < $1
          ORDER BY projection, partition",
    )
    .bind(i64::from(partitions))
    .fetch_all(pool)
    .await
}

/// What the checkpoint rows of partitions `0..partitions` say about each
/// projection.
pub fn caught_up(rows: &[CheckpointRow], partitions: u32) -> CaughtUp {
    let mut result = CaughtUp::default();
    for projection in Projection::ALL {
        let marks = &mut result.0[projection.index()];
        *marks = vec![None; partitions as usize];
        for row in rows
            .iter()
            .filter(|row| row.projection == projection.name())
        {
            if let Some(mark) = usize::try_from(row.partition)
                .ok()
                .and_then(|partition| marks.get_mut(partition))
            {
                *mark = Some(row.caught_up());
            }
        }
    }
    result
}

/// The read-your-writes waiter, shared by every request of one app.
#[derive(Debug, Clone)]
pub struct CatchUp {
    pool: PgPool,
    partitions: u32,
    timeout: Duration,
    poll: Duration,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    snapshot: watch::Sender<CaughtUp>,
    waiters: AtomicUsize,
    wake: Notify,
}

/// Counts a request among the waiters while it lives.
struct Waiting<'a>(&'a Shared);

impl<'a> Waiting<'a> {
    fn new(shared: &'a Shared) -> Self {
        shared.waiters.fetch_add(1, Ordering::SeqCst);
        shared.wake.notify_one();
        Self(shared)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiters.fetch_sub(1, Ordering::SeqCst);
    }
}

impl CatchUp {
    pub fn new(pool: PgPool, partitions: u32, timeout: Duration, poll: Duration) -> Self {
        Self {
            pool,
            partitions: partitions.max(1),
            timeout,
            poll: poll.max(Duration::from_millis(1)),
            shared: Arc::new(Shared {
                snapshot: watch::Sender::new(CaughtUp::default()),
                waiters: AtomicUsize::new(0),
                wake: Notify::new(),
            }),
        }
    }

    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// Returns once `scope` of every one of `projections` includes `target`,
    /// or answers 503 `not_caught_up` after the configured timeout.
    pub async fn wait(
        &self,
        projections: &[Projection],
        scope: Scope,
        target: Position,
    ) -> Result<(), ApiError> {
        let started = Instant::now();
        // Subscribed before any read, so no later snapshot is missed.
        let mut snapshots = self.shared.snapshot.subscribe();
        // While others wait, the poller refreshes the snapshot every `poll`:
        // it is fresh enough, and under load this saves a read per request.
        // Otherwise it may be old: read now.
        let covered = if self.shared.waiters.load(Ordering::SeqCst) > 0 {
            snapshots
                .borrow_and_update()
                .covers(projections, scope, target)
        } else {
            let now = self.read().await.map_err(crate::routes::db_error)?;
            let covered = now.covers(projections, scope, target);
            self.publish(now);
            covered
        };
        let outcome = if covered {
            Ok(())
        } else {
            let _waiting = Waiting::new(&self.shared);
            let deadline = started + self.timeout;
            loop {
                tokio::select! {
                    changed = snapshots.changed() => {
                        if changed.is_err() {
                            break Err(ApiError::Unavailable);
                        }
                        if snapshots.borrow_and_update().covers(projections, scope, target) {
                            break Ok(());
                        }
                    }
                    () = tokio::time::sleep_until(deadline) => {
                        break Err(ApiError::NotCaughtUp(target.token()));
                    }
                }
            }
        };
        let waited = started.elapsed().as_secs_f64();
        let result = if outcome.is_ok() {
            "caught_up"
        } else {
            "timed_out"
        };
        metrics::histogram!("souk_query_catch_up_wait_seconds", "result" => result).record(waited);
        if outcome.is_err() {
            tracing::info!(
                position = %target,
                waited_ms = started.elapsed().as_millis() as u64,
                "read models did not catch up in time"
            );
        }
        outcome
    }

    /// Returns once `index` includes every listing change at or before
    /// `target`, or answers 503 `not_caught_up` after the configured
    /// timeout. Call it after [`CatchUp::wait`] for the listings: then every
    /// such change is either indexed or pending, so the index has caught up
    /// when no pending row is at or before `target` and it has been
    /// refreshed. One case is not in `search_pending`: an index lost or new
    /// (empty) while listings exist, until the indexer's start-up check
    /// queues them; that is not caught up either. Each waiting request polls
    /// on its own, every `poll`: search waits are short (one indexer commit).
    pub async fn wait_search(
        &self,
        target: Position,
        index: &dyn SearchIndex,
    ) -> Result<(), ApiError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            if self.search_caught_up(target, index).await? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                tracing::info!(position = %target, "the search index did not catch up in time");
                return Err(ApiError::NotCaughtUp(target.token()));
            }
            tokio::time::sleep(self.poll).await;
        }
    }

    async fn search_caught_up(
        &self,
        target: Position,
        index: &dyn SearchIndex,
    ) -> Result<bool, ApiError> {
        let (pending, listings): (bool, bool) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM search_pending
                             WHERE (transaction_id, position) <= ($1, $2)),
                    EXISTS (SELECT 1 FROM rm_listings)",
        )
        .bind(target.transaction_id as i64)
        .bind(target.position)
        .fetch_one(&self.pool)
        .await
        .map_err(crate::routes::db_error)?;
        if pending {
            return Ok(false);
        }
        index.refresh().await.map_err(crate::routes::search_error)?;
        Ok(!listings || index.count().await.map_err(crate::routes::search_error)? > 0)
    }

    async fn read(&self) -> Result<CaughtUp, sqlx::Error> {
        let rows = checkpoints(&self.pool, self.partitions).await?;
        Ok(caught_up(&rows, self.partitions))
    }

    fn publish(&self, now: CaughtUp) {
        self.shared.snapshot.send_if_modified(|snapshot| {
            let modified = *snapshot != now;
            *snapshot = now;
            modified
        });
    }

    /// The poller: while any request waits, reads the checkpoints every
    /// `poll` and publishes them; otherwise sleeps until one waits. Runs
    /// until aborted.
    pub async fn run(self) {
        loop {
            if self.shared.waiters.load(Ordering::SeqCst) == 0 {
                self.shared.wake.notified().await;
                continue;
            }
            let pause = match self.read().await {
                Ok(now) => {
                    self.publish(now);
                    self.poll
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot read projection checkpoints");
                    // Waiters time out on their own; no need to hammer a
                    // database that is not answering.
                    self.poll.max(ERROR_PAUSE)
                }
            };
            tokio::time::sleep(pause).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(
        projection: &str,
        partition: i32,
        caught: (i64, i64),
        applied: (i64, i64),
    ) -> CheckpointRow {
        CheckpointRow {
            projection: projection.to_owned(),
            partition,
            transaction_id: applied.0,
            position: applied.1,
            caught_up_transaction: caught.0,
            caught_up_position: caught.1,
            events_applied: 0,
            last_event_recorded_at: None,
            updated_at: chrono::Utc::now(),
        }
    }

    fn at(transaction_id: u64, position: i64) -> Position {
        Position {
            transaction_id,
            position,
        }
    }

    #[test]
    fn a_projection_is_as_far_as_its_slowest_partition() {
        let rows = vec![
            row("orders", 0, (10, 5), (0, 0)),
            row("orders", 1, (9, 7), (0, 0)),
            row("wallets", 0, (3, 1), (4, 2)),
        ];
        let caught = caught_up(&rows, 2);
        assert_eq!(caught.of(Projection::Orders), Some(at(9, 7)));
        assert_eq!(
            caught.of(Projection::Wallets),
            None,
            "partition 1 has no row"
        );
        assert!(caught.covers(&[Projection::Orders], Scope::All, at(9, 7)));
        assert!(!caught.covers(&[Projection::Orders], Scope::All, at(9, 8)));
        assert!(!caught.covers(
            &[Projection::Orders, Projection::Wallets],
            Scope::All,
            at(1, 1)
        ));
        let caught = caught_up(&rows, 1);
        assert_eq!(
            caught.of(Projection::Wallets),
            Some(at(4, 2)),
            "the applied event counts"
        );
    }

    #[test]
    fn a_read_of_one_aggregate_waits_only_for_its_partition() {
        let rows = vec![
            row("orders", 0, (10, 5), (0, 0)),
            row("orders", 1, (9, 7), (0, 0)),
            row("orders", 7, (99, 99), (0, 0)),
            row("wallets", 1, (3, 1), (4, 2)),
        ];
        let caught = caught_up(&rows, 2);
        let orders = [Projection::Orders];
        assert!(caught.covers(&orders, Scope::Partition(0), at(10, 5)));
        assert!(!caught.covers(&orders, Scope::All, at(10, 5)));
        assert!(!caught.covers(&orders, Scope::Partition(1), at(10, 5)));
        assert!(
            !caught.covers(&orders, Scope::Partition(7), at(1, 1)),
            "a partition beyond the configured count is not read"
        );
        let wallets = [Projection::Wallets];
        assert!(caught.covers(&wallets, Scope::Partition(1), at(4, 2)));
        assert!(
            !caught.covers(&wallets, Scope::Partition(0), at(0, 1)),
            "partition 0 has no row"
        );
    }
}
