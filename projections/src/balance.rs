//! How projector processes share the partitions of each projection.
//!
//! A partition is consumed by whoever holds its advisory lock (see
//! `runtime`). Left at that, the first projector process to start takes
//! every partition and the others only stand by. Instead, each process
//! registers as a *member* of every projection it runs, and holds at most its
//! fair share of that projection's partitions: `ceil(partitions / members)`.
//!
//! - **Membership** is a session advisory lock in the two-key form
//!   `(class, member)`: `class` names the stream and projection, `member` is
//!   random per process. All of a process's member locks are held on one
//!   connection of their own, so they vanish exactly when the process (or
//!   that connection) dies. Every `standby_retry` the process counts the
//!   granted locks of each class in `pg_locks`: that count is the number of
//!   live processes running the projection. Nothing is written; there is no
//!   heartbeat table to clean up.
//! - **Taking.** A standing-by partition tries its lock only while the
//!   process holds fewer than its share of that projection.
//! - **Giving back.** When a process holds more than its share (another
//!   process has joined), its highest-numbered partition of that projection
//!   ends its session after its current batch, releasing the lock; the
//!   newcomer, below its share, takes it at its next try. The new holder
//!   resumes from the checkpoint as after any takeover.
//! - **Taking over.** A killed process's partition locks and member locks
//!   go at once; the next count raises the survivors' shares, and they take
//!   the free partitions within about two `standby_retry`.
//!
//! Every process running a projection counts only the members of that
//! projection, so processes running different subsets of projections never
//! leave a partition without a holder: the shares of a projection's members
//! always add up to at least its partition count. Until the first count (or
//! while counting fails) a process counts itself alone, that is, it takes
//! what is free, as a lone process must.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use event_store::backoff::Backoff;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection as _, PgConnection};
use tokio::sync::watch;

use crate::engine::Kind;
use crate::runtime::Readiness;

/// How one process shares each of its projections' partitions with the
/// other processes running it.
#[derive(Debug)]
pub(crate) struct Balance {
    partitions: u32,
    shares: HashMap<Kind, Share>,
    /// Where `/health` learns how many partitions this process holds.
    readiness: watch::Sender<Readiness>,
}

#[derive(Debug)]
struct Share {
    /// Live processes running the projection, this one included (at least 1).
    members: AtomicU32,
    /// The partitions this process holds (or is trying to take).
    held: Mutex<BTreeSet<u32>>,
}

impl Balance {
    pub(crate) fn new(
        kinds: &[Kind],
        partitions: u32,
        readiness: watch::Sender<Readiness>,
    ) -> Self {
        let shares = kinds
            .iter()
            .map(|kind| {
                let share = Share {
                    members: AtomicU32::new(1),
                    held: Mutex::new(BTreeSet::new()),
                };
                (*kind, share)
            })
            .collect();
        let units = partitions * kinds.len() as u32;
        readiness.send_modify(|readiness| readiness.partitions_total = units);
        Self {
            partitions,
            shares,
            readiness,
        }
    }

    fn share(&self, kind: Kind) -> &Share {
        &self.shares[&kind]
    }

    /// This process's fair share of `kind`'s partitions.
    fn fair_share(&self, kind: Kind) -> u32 {
        let members = self.share(kind).members.load(Ordering::Relaxed).max(1);
        self.partitions.div_ceil(members)
    }

    fn held(&self, kind: Kind) -> std::sync::MutexGuard<'_, BTreeSet<u32>> {
        self.share(kind)
            .held
            .lock()
            .unwrap_or_else(|error| error.into_inner())
    }

    fn publish_total(&self) {
        let total = self
            .shares
            .values()
            .map(|share| {
                share
                    .held
                    .lock()
                    .unwrap_or_else(|error| error.into_inner())
                    .len() as u32
            })
            .sum();
        self.readiness
            .send_modify(|readiness| readiness.partitions_held = total);
    }

    /// Reserves a place for `partition` of `kind` if this process holds less
    /// than its share: `true` means try its lock now (then
    /// [`Self::release`] it if the try fails), `false` means stand by.
    pub(crate) fn reserve(&self, kind: Kind, partition: u32) -> bool {
        let share = self.fair_share(kind);
        let reserved = {
            let mut held = self.held(kind);
            held.contains(&partition) || (held.len() < share as usize && held.insert(partition))
        };
        if reserved {
            self.publish_total();
        }
        reserved
    }

    /// `partition` of `kind` is no longer held (or was not taken).
    pub(crate) fn release(&self, kind: Kind, partition: u32) {
        let removed = self.held(kind).remove(&partition);
        if removed {
            self.publish_total();
        }
    }

    /// Whether `partition` of `kind` should be given back now: this process
    /// holds more than its share and it is the highest-numbered partition
    /// held, so one partition at a time goes. A `true` forgets it at once.
    pub(crate) fn give_back(&self, kind: Kind, partition: u32) -> bool {
        let share = self.fair_share(kind) as usize;
        let give = {
            let mut held = self.held(kind);
            let give = held.len() > share && held.last() == Some(&partition);
            if give {
                held.remove(&partition);
            }
            give
        };
        if give {
            self.publish_total();
        }
        give
    }

    /// Registers this process as a member of each projection and keeps the
    /// member counts current until `stop`, on a connection of its own; a
    /// lost connection is opened again (bounded backoff), counting meanwhile
    /// on the last figures.
    pub(crate) async fn keep_counting(
        &self,
        connect_options: PgConnectOptions,
        stream: String,
        every: Duration,
        backoff_max: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut backoff = Backoff::new(backoff_max);
        while !*stop.borrow() {
            let session = self.count_session(&connect_options, &stream, every, &mut stop);
            match session.await {
                Ok(()) => return,
                Err(error) => tracing::warn!(
                    error = format!("{error:#}"),
                    "counting the projector processes failed; trying again"
                ),
            }
            tokio::select! {
                _ = stop.wait_for(|stop| *stop) => return,
                () = backoff.wait() => {}
            }
        }
    }

    async fn count_session(
        &self,
        connect_options: &PgConnectOptions,
        stream: &str,
        every: Duration,
        stop: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let mut conn = tokio::time::timeout(
            every.max(Duration::from_secs(5)),
            PgConnection::connect_with(connect_options),
        )
        .await
        .context("connecting to Postgres timed out")?
        .context("connecting to Postgres")?;
        let classes: Vec<(Kind, i32)> = self
            .shares
            .keys()
            .map(|kind| (*kind, member_class(stream, *kind)))
            .collect();
        let member = register(&mut conn, &classes).await?;
        tracing::info!(
            member,
            projections = classes.len(),
            "projector registered to share partitions"
        );
        let class_ids: Vec<i64> = classes.iter().map(|(_, class)| i64::from(*class)).collect();
        loop {
            let counts: Vec<(i64, i64)> = sqlx::query_as(
                "SELECT classid::int8, count(*)
                   FROM pg_locks
                  WHERE locktype = 'advisory' AND objsubid = 2 AND granted
                    AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                    AND classid::int8 = ANY($1)
                  GROUP BY classid",
            )
            .bind(&class_ids)
            .fetch_all(&mut conn)
            .await
            .context("counting the projector processes")?;
            for (kind, class) in &classes {
                let members = counts
                    .iter()
                    .find(|(id, _)| *id == i64::from(*class))
                    .map_or(1, |(_, count)| {
                        (*count).clamp(1, i64::from(u32::MAX)) as u32
                    });
                let before = self.share(*kind).members.swap(members, Ordering::Relaxed);
                if before != members {
                    tracing::info!(
                        projection = kind.name(),
                        members,
                        share = self.partitions.div_ceil(members),
                        "projector processes running this projection changed"
                    );
                }
            }
            tokio::select! {
                _ = stop.wait_for(|stop| *stop) => return Ok(()),
                () = tokio::time::sleep(every) => {}
            }
        }
    }
}

/// The advisory-lock class of the members of `kind` on `stream`: a positive
/// 32-bit key, stable across processes and versions.
fn member_class(stream: &str, kind: Kind) -> i32 {
    let name = format!("souk-projector-members:{stream}:{}", kind.name());
    (event_store::fanout::stable_hash(name.as_bytes()) & 0x7fff_ffff) as i32
}

/// Takes a member lock in every class on `conn` under one random member id
/// (another one if a process already uses it) and returns that id.
async fn register(conn: &mut PgConnection, classes: &[(Kind, i32)]) -> anyhow::Result<i32> {
    let class_ids: Vec<i32> = classes.iter().map(|(_, class)| *class).collect();
    loop {
        let member = (uuid::Uuid::new_v4().as_u128() as u32 & 0x7fff_ffff) as i32;
        let taken: bool = sqlx::query_scalar(
            "SELECT bool_and(pg_try_advisory_lock(class, $2)) FROM UNNEST($1::int4[]) AS c(class)",
        )
        .bind(&class_ids)
        .bind(member)
        .fetch_one(&mut *conn)
        .await
        .context("taking the member locks")?;
        if taken {
            return Ok(member);
        }
        // Another process has this id in some class (1 in 2^31): let go of
        // what was taken and draw again.
        sqlx::query("SELECT pg_advisory_unlock_all()")
            .execute(&mut *conn)
            .await
            .context("letting go of the member locks")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_takes_its_share_and_gives_back_the_highest_partition_first() {
        let readiness = Readiness::channel();
        let balance = Balance::new(&[Kind::Wallets], 4, readiness.clone());
        let held = || readiness.borrow().partitions_held;
        let members = |count| {
            balance
                .share(Kind::Wallets)
                .members
                .store(count, Ordering::Relaxed)
        };
        assert_eq!(readiness.borrow().partitions_total, 4);
        for partition in 0..4 {
            assert!(balance.reserve(Kind::Wallets, partition), "alone: all four");
        }
        assert_eq!(held(), 4);
        // A second process joins: the share is 2, partitions 3 then 2 go.
        members(2);
        assert!(!balance.give_back(Kind::Wallets, 0));
        assert!(!balance.give_back(Kind::Wallets, 2), "3 goes first");
        assert!(balance.give_back(Kind::Wallets, 3));
        assert!(balance.give_back(Kind::Wallets, 2));
        assert!(!balance.give_back(Kind::Wallets, 1), "at its share");
        assert!(!balance.reserve(Kind::Wallets, 3), "no more than its share");
        assert_eq!(held(), 2);
        // Three processes: a share of 2 still (ceil 4/3); alone again: all.
        members(3);
        assert!(!balance.give_back(Kind::Wallets, 1));
        members(1);
        assert!(balance.reserve(Kind::Wallets, 3));
        balance.release(Kind::Wallets, 3);
        assert_eq!(held(), 2);
    }

    #[test]
    fn member_classes_are_positive_and_differ_by_stream_and_projection() {
        let a = member_class("souk", Kind::Wallets);
        assert!(a >= 0);
        assert_eq!(a, member_class("souk", Kind::Wallets));
        assert_ne!(a, member_class("souk2", Kind::Wallets));
        assert_ne!(a, member_class("souk", Kind::Orders));
    }
}
