//! Group commit: the units of work of many lanes in one statement.
//!
//! A unit of work that needs no explicit transaction (no idempotency record
//! follows its events) is one statement, atomic on its own (see
//! `store::write_units`). Issued one by one, each such statement pays the
//! fixed costs of a transaction: a round trip, parse and plan, the two
//! statement triggers of `events` (writers' lock, stream heads) and a WAL
//! flush at commit. Under load those fixed costs are most of Postgres's
//! work per command, and on a small machine Postgres's CPU is what caps the
//! write path.
//!
//! So the lanes hand such units to a [`GroupCommit`]: at most
//! `StoreConfig::writers` statements are in flight, and each takes every
//! unit queued meanwhile (up to `StoreConfig::group_rows` events), in one
//! statement. An idle store adds no wait: a unit that finds a writer free
//! is written at once, alone. A busy one writes many units per commit.
//!
//! One statement is all or nothing. When a group fails (a unique violation
//! because another process wrote one of its streams first, or any error one
//! unit's data causes), each of its units is written again on its own, so
//! each gets its own answer and no unit fails for another's fault. The
//! units of one process never share a stream (a lane writes one unit at a
//! time), and the group's rows are inserted in key order, so two processes'
//! groups lock the same streams' index entries in the same order and cannot
//! deadlock each other.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use sqlx::postgres::PgPool;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::record::Position;
use crate::store::{ExecError, Unit, write_units};

type Written = Result<(Unit, Vec<Position>), ExecError>;

struct Queued {
    unit: Unit,
    reply: oneshot::Sender<Written>,
}

/// Writes units of work, merging those that wait (see the module's doc).
pub(crate) struct GroupCommit {
    pool: PgPool,
    queue: Mutex<VecDeque<Queued>>,
    /// One permit per statement in flight.
    writers: Arc<Semaphore>,
    /// Most events in one statement (a unit larger than this goes alone).
    group_rows: usize,
}

impl GroupCommit {
    pub(crate) fn new(pool: PgPool, writers: usize, group_rows: usize) -> Arc<Self> {
        Arc::new(Self {
            pool,
            queue: Mutex::new(VecDeque::new()),
            writers: Arc::new(Semaphore::new(writers.max(1))),
            group_rows: group_rows.max(1),
        })
    }

    /// Writes `unit` (with the units of other lanes that wait alongside it)
    /// and gives it back with the position of each of its rows.
    pub(crate) async fn write(self: &Arc<Self>, unit: Unit) -> Written {
        let (reply, answer) = oneshot::channel();
        self.lock().push_back(Queued { unit, reply });
        self.start_writer();
        answer
            .await
            .unwrap_or_else(|_| Err(ExecError::Internal("group commit writer stopped".into())))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Queued>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a writer task when a statement may still be put in flight.
    fn start_writer(self: &Arc<Self>) {
        if let Ok(permit) = self.writers.clone().try_acquire_owned() {
            let this = self.clone();
            // Spawned: a caller that goes away cannot cancel a statement
            // that carries other callers' units.
            tokio::spawn(async move { this.drain(permit).await });
        }
    }

    async fn drain(self: Arc<Self>, permit: OwnedSemaphorePermit) {
        loop {
            let group = self.take_group();
            if group.is_empty() {
                break;
            }
            self.commit(group).await;
        }
        drop(permit);
        // A unit queued after the last look found no free writer: look again.
        if !self.lock().is_empty() {
            self.start_writer();
        }
    }

    /// The units waiting, oldest first, up to `group_rows` events (at least
    /// one unit).
    fn take_group(&self) -> Vec<Queued> {
        let mut queue = self.lock();
        let mut rows = 0;
        let mut group = Vec::new();
        while let Some(next) = queue.front() {
            let len = next.unit.rows.len();
            if !group.is_empty() && rows + len > self.group_rows {
                break;
            }
            rows += len;
            group.extend(queue.pop_front());
        }
        group
    }

    async fn commit(&self, group: Vec<Queued>) {
        let (units, replies): (Vec<Unit>, Vec<_>) =
            group.into_iter().map(|q| (q.unit, q.reply)).unzip();
        metrics::histogram!("souk_group_commit_units").record(units.len() as f64);
        match write_units(&self.pool, &units).await {
            Ok(positions) => {
                for ((unit, positions), reply) in units.into_iter().zip(positions).zip(replies) {
                    // The caller may have gone away; its unit is written anyway.
                    let _ = reply.send(Ok((unit, positions)));
                }
            }
            Err(error) if units.len() == 1 || matches!(error, ExecError::Unavailable(_)) => {
                for reply in replies {
                    let _ = reply.send(Err(error.clone()));
                }
            }
            Err(error) => {
                tracing::debug!(%error, units = units.len(), "group failed; writing its units one by one");
                metrics::counter!("souk_group_commit_split_total").increment(1);
                for (unit, reply) in units.into_iter().zip(replies) {
                    let written = write_units(&self.pool, std::slice::from_ref(&unit))
                        .await
                        .map(|mut positions| (unit, positions.pop().unwrap_or_default()));
                    let _ = reply.send(written);
                }
            }
        }
    }
}
