//! Wake-ups sent after a commit, outside the committing transaction.
//!
//! A `NOTIFY` inside a writing transaction makes Postgres take its one
//! cluster-wide notification lock at COMMIT and hold it through the WAL
//! flush, so every notifying writer commits one after another. At a thousand
//! commands a second that queue was the largest wait on the write path (and,
//! because a writer waiting there still holds the relay's horizon back, on
//! the read path too). So writers never notify in their transaction; after
//! it commits they call [`CommitSignal::committed`], which
//!
//! - wakes the consumer in this process at once (the relay run by
//!   command-api, the search indexer run by the projector), through
//!   [`CommitSignal::local`];
//! - unless that consumer is active here ([`CommitSignal::set_consumer_here`]),
//!   sends one `NOTIFY <channel>` on its own connection for consumers in
//!   other processes. Calls arriving while one is in flight are folded into
//!   the next, so a burst of commits costs a notification or two.
//!
//! A lost wake-up only delays: every consumer also polls.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{Notify, mpsc};

/// Bound on one `NOTIFY`.
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(5);

/// Tells the consumers of `channel` that something was committed. Cheap to
/// clone; clones share their state.
#[derive(Clone)]
pub struct CommitSignal {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    channel: &'static str,
    local: Arc<Notify>,
    consumer_here: AtomicBool,
    /// One pending `NOTIFY` at most; the task starts on the first commit.
    outgoing: OnceLock<mpsc::Sender<()>>,
}

impl std::fmt::Debug for CommitSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommitSignal")
            .field("channel", &self.inner.channel)
            .field(
                "consumer_here",
                &self.inner.consumer_here.load(Ordering::Relaxed),
            )
            .finish_non_exhaustive()
    }
}

impl CommitSignal {
    /// A signal whose notifications go out on `pool` as `NOTIFY channel`.
    pub fn new(pool: PgPool, channel: &'static str) -> Self {
        Self {
            inner: Arc::new(Inner {
                pool,
                channel,
                local: Arc::new(Notify::new()),
                consumer_here: AtomicBool::new(false),
                outgoing: OnceLock::new(),
            }),
        }
    }

    /// The channel its notifications go out on.
    pub fn channel(&self) -> &'static str {
        self.inner.channel
    }

    /// Woken (one stored permit) by every [`CommitSignal::committed`].
    pub fn local(&self) -> Arc<Notify> {
        self.inner.local.clone()
    }

    /// Says whether this process's consumer is the active one (the relay
    /// leads, the indexer holds its lock). While it is, no `NOTIFY` is sent:
    /// the local wake-up reaches it, and no other process consumes.
    pub fn set_consumer_here(&self, here: bool) {
        self.inner.consumer_here.store(here, Ordering::Relaxed);
    }

    /// Call after a transaction that the consumers care about committed.
    /// Must run inside a Tokio runtime (the notifying task starts with the
    /// first call).
    pub fn committed(&self) {
        self.inner.local.notify_one();
        if self.inner.consumer_here.load(Ordering::Relaxed) {
            return;
        }
        let outgoing = self.inner.outgoing.get_or_init(|| {
            let (sender, receiver) = mpsc::channel(1);
            tokio::spawn(send_notifications(
                self.inner.pool.clone(),
                self.inner.channel,
                receiver,
            ));
            sender
        });
        // Full: a notification is already due, and it covers this commit.
        let _ = outgoing.try_send(());
    }
}

/// Sends `NOTIFY channel` on `pool`, in a transaction of its own that writes
/// nothing, so it neither waits on nor adds a WAL flush. Call it after the
/// commit the consumers should hear of, never inside that transaction.
pub async fn notify(pool: &PgPool, channel: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(channel)
        .execute(pool)
        .await
        .map(drop)
}

/// Sends one `NOTIFY` per wake-up until every sender is gone.
async fn send_notifications(pool: PgPool, channel: &'static str, mut due: mpsc::Receiver<()>) {
    while due.recv().await.is_some() {
        let sent = tokio::time::timeout(NOTIFY_TIMEOUT, notify(&pool, channel)).await;
        match sent {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::debug!(channel, %error, "cannot send a commit notification"),
            Err(_) => tracing::debug!(channel, "a commit notification timed out"),
        }
    }
}
