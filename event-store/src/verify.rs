//! Tamper evidence: what `replay-tool verify` checks, in one pass over the
//! log, in constant memory.
//!
//! - **Chains.** Every aggregate's hash chain is recomputed from the stored
//!   rows: an altered event no longer matches its hash; a removed or
//!   reordered one breaks the sequence or the link to its predecessor.
//! - **Heads.** What a chain alone cannot see (events cut from the end of a
//!   stream, a whole stream removed) the stream heads can: each chain must
//!   end exactly at its head (migration 0010 advances heads in the statement
//!   that appends), and every head must still have its chain.
//! - **Invariants** (optional): the events are replayed through the domain
//!   (`domain::audit`), which names every event that breaks a business
//!   invariant and checks money conservation at the end.
//! - **Anchor** (optional): the running digest of the global order up to the
//!   anchor's position must be the anchor's (see `anchor`).
//! - **Skips**: events an operator chose not to project (recorded in
//!   `dead_letter_actions`) are listed; a skip is a decision, not damage.
//!
//! Everything is read in one `REPEATABLE READ` snapshot, so a log that grows
//! meanwhile is verified as of one instant: each transaction's events (and
//! heads) are either all seen or not at all. The events are streamed in
//! primary-key order with their head merged in (no sort, no page restarts),
//! as binary `COPY` output; a whole log in two halves at once (see
//! [`verify`]).

use futures::TryStreamExt;
use sqlx::postgres::PgPool;
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

use crate::anchor::{self, Anchor};
use crate::record::{ChainedFields, GENESIS_HASH, Position};

/// What is wrong with one event or stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// Its content no longer hashes to its stored hash.
    Altered,
    /// Its `prev_hash` is not the hash of the event before it.
    BrokenLink,
    /// One or more events before it are missing.
    SequenceGap,
    /// The stream's head is further than its last event: events were
    /// removed from its end (the problem names the head's sequence).
    EndRemoved,
    /// The stream has a head but no events at all: it was removed whole.
    StreamRemoved,
    /// The stream's last event is not the one its head recorded (same
    /// sequence, other hash), or is beyond its head: written around the
    /// append path.
    HeadMismatch,
    /// The stream has events but no head: written around the append path.
    NoHead,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    /// The event's place in the global order (none for a missing event).
    pub position: Option<Position>,
    pub kind: ProblemKind,
}

/// An event (or, without a position, the whole log) that breaks a business
/// invariant.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Violation {
    pub position: Option<Position>,
    pub aggregate_type: Option<String>,
    pub aggregate_id: Option<String>,
    pub sequence: Option<i64>,
    pub code: &'static str,
    pub message: String,
}

/// What `verify --anchor` found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AnchorCheck {
    /// The anchor's token.
    pub anchor: String,
    /// The digest of the log as it is now, up to the anchor's position.
    pub recomputed: String,
    pub matches: bool,
}

/// An event an operator chose not to project.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct SkippedEvent {
    pub projection: String,
    pub event_id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub position: Position,
    pub error: String,
    pub operator: String,
    pub db_user: String,
    pub reason: Option<String>,
    pub skipped_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    pub events_checked: u64,
    pub aggregates_checked: u64,
    /// The first problems found (at most [`MAX_PROBLEMS`]).
    pub problems: Vec<Problem>,
    /// How many problems were found in all.
    pub problems_found: u64,
    /// Whether the business invariants were replayed.
    pub invariants_checked: bool,
    /// The first violations found (at most [`MAX_PROBLEMS`]).
    pub violations: Vec<Violation>,
    pub violations_found: u64,
    pub anchor: Option<AnchorCheck>,
    /// Events skipped by an operator (not a failure).
    pub skipped_events: Vec<SkippedEvent>,
}

impl VerifyReport {
    /// No problem, no violation, and the anchor (if any) matches.
    pub fn is_intact(&self) -> bool {
        self.problems_found == 0
            && self.violations_found == 0
            && self.anchor.as_ref().is_none_or(|anchor| anchor.matches)
    }

    fn problem(&mut self, problem: Problem) {
        self.problems_found += 1;
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(problem);
        }
    }

    fn violation(&mut self, violation: Violation) {
        self.violations_found += 1;
        if self.violations.len() < MAX_PROBLEMS {
            self.violations.push(violation);
        }
    }

    /// Appends the report of the streams after this report's: the lists
    /// stay in key order and keep their first [`MAX_PROBLEMS`].
    fn append(&mut self, later: VerifyReport) {
        self.events_checked += later.events_checked;
        self.aggregates_checked += later.aggregates_checked;
        let room = MAX_PROBLEMS.saturating_sub(self.problems.len());
        self.problems.extend(later.problems.into_iter().take(room));
        self.problems_found += later.problems_found;
        let room = MAX_PROBLEMS.saturating_sub(self.violations.len());
        self.violations
            .extend(later.violations.into_iter().take(room));
        self.violations_found += later.violations_found;
    }
}

pub const MAX_PROBLEMS: usize = 1000;

/// What to verify.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions<'a> {
    /// Only this aggregate (`(aggregate_type, aggregate_id)`).
    pub only: Option<(&'a str, &'a str)>,
    /// Replay the business invariants too.
    pub invariants: bool,
    /// Check the log against this anchor.
    pub anchor: Option<Anchor>,
}

/// Messages (a row each) handed from the reading task to the checking one
/// at a time.
const ROWS_PER_BATCH: usize = 1024;
/// Batches in flight between them (what bounds the memory used).
const BATCHES_IN_FLIGHT: usize = 4;

/// The most parts a whole log is verified in at once, each on a connection
/// of its own (fewer when the pool has fewer).
const VERIFY_PARTS: usize = 4;

/// The stream being checked.
struct Stream {
    aggregate_type: String,
    aggregate_id: String,
    expected_sequence: i64,
    prev_hash: [u8; 32],
    last_sequence: i64,
    last_position: Position,
    head: Option<(i64, Vec<u8>)>,
}

/// Verifies the chains of every aggregate, or of one when `only` names it.
pub async fn verify_chains(
    pool: &PgPool,
    only: Option<(&str, &str)>,
) -> Result<VerifyReport, sqlx::Error> {
    verify(
        pool,
        &VerifyOptions {
            only,
            ..VerifyOptions::default()
        },
    )
    .await
}

/// Verifies what `options` asks, in one snapshot (see the module doc).
///
/// A whole log is checked in two halves at once, each on a connection of
/// its own sharing the first one's snapshot (`pg_export_snapshot`): the
/// streams before a middle key and the streams from it on. Each half has
/// a task that reads the rows (the socket, TLS and the protocol) and a
/// blocking one that checks them (hashes, invariants), with a bounded
/// channel of row batches between them that keeps the memory constant.
/// The halves are disjoint sets of whole streams, so their reports and
/// invariant replays add up to one pass's (`Auditor::merge`).
pub async fn verify(
    pool: &PgPool,
    options: &VerifyOptions<'_>,
) -> Result<VerifyReport, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    begin_reading(&mut tx, None).await?;
    let only_type = options.only.map(|(t, _)| t);
    let only_id = options.only.map(|(_, i)| i);
    let parts = match options.only {
        None => (pool.options().get_max_connections() as usize).clamp(1, VERIFY_PARTS),
        Some(_) => 1,
    };
    let cuts = cut_streams(&mut tx, parts).await?;
    let checked = if cuts.is_empty() {
        check(
            &mut tx,
            Streams {
                only: options.only,
                ..Streams::default()
            },
            options.invariants,
        )
        .await?
    } else {
        let snapshot: String = sqlx::query_scalar("SELECT pg_export_snapshot()")
            .fetch_one(&mut *tx)
            .await?;
        let mut others = Vec::with_capacity(cuts.len());
        for _ in &cuts {
            let mut other = pool.begin().await?;
            begin_reading(&mut other, Some(&snapshot)).await?;
            others.push(other);
        }
        // Part k reads the streams from cut k-1 (the first from the start)
        // until cut k (the last to the end).
        let bounds: Vec<Streams<'_>> = (0..=cuts.len())
            .map(|k| Streams {
                from: k
                    .checked_sub(1)
                    .map(|k| (cuts[k].0.as_str(), cuts[k].1.as_str())),
                until: cuts.get(k).map(|cut| (cut.0.as_str(), cut.1.as_str())),
                ..Streams::default()
            })
            .collect();
        let first = check(&mut tx, bounds[0], options.invariants);
        let rest = futures::future::try_join_all(
            others
                .iter_mut()
                .zip(&bounds[1..])
                .map(|(other, streams)| check(other, *streams, options.invariants)),
        );
        let (first, rest) = tokio::join!(first, rest);
        let (mut first, rest) = (first?, rest?);
        for later in rest {
            first.report.append(later.report);
            if let (Some(auditor), Some(other)) = (first.auditor.as_mut(), later.auditor) {
                auditor.merge(other);
            }
        }
        for other in others {
            other.commit().await?;
        }
        first
    };
    let Checker {
        mut report,
        auditor,
        ..
    } = checked;

    // Heads whose stream has no event left at all.
    let orphans: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT h.aggregate_type, h.aggregate_id, h.sequence FROM stream_heads h
          WHERE ($1::text IS NULL OR (h.aggregate_type = $1 AND h.aggregate_id = $2))
            AND NOT EXISTS (SELECT 1 FROM events e
                             WHERE e.aggregate_type = h.aggregate_type
                               AND e.aggregate_id = h.aggregate_id)
          ORDER BY h.aggregate_type, h.aggregate_id",
    )
    .bind(only_type)
    .bind(only_id)
    .fetch_all(&mut *tx)
    .await?;
    for (aggregate_type, aggregate_id, sequence) in orphans {
        report.problem(Problem {
            aggregate_type,
            aggregate_id,
            sequence,
            position: None,
            kind: ProblemKind::StreamRemoved,
        });
    }

    if let Some(auditor) = auditor.filter(|_| options.only.is_none()) {
        for finding in auditor.finish() {
            report.violation(Violation {
                position: None,
                aggregate_type: None,
                aggregate_id: None,
                sequence: None,
                code: finding.code,
                message: finding.message,
            });
        }
    }

    if let Some(expected) = options.anchor {
        let running = anchor::digest(&mut tx, Some(expected.position)).await?;
        let now = running.anchor();
        let recomputed = Anchor {
            position: expected.position,
            ..now
        };
        report.anchor = Some(AnchorCheck {
            anchor: expected.token(),
            recomputed: recomputed.token(),
            matches: recomputed == expected && now.position == expected.position,
        });
    }

    report.skipped_events = sqlx::query_as(
        "SELECT projection, event_id, aggregate_type, aggregate_id, sequence, event_type,
                transaction_id, position, error, operator, db_user, reason, acted_at
           FROM dead_letter_actions
          WHERE action = 'skipped'
            AND ($1::text IS NULL OR (aggregate_type = $1 AND aggregate_id = $2))
          ORDER BY id
          LIMIT $3",
    )
    .bind(only_type)
    .bind(only_id)
    .bind(MAX_PROBLEMS as i64)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(
        |(
            projection,
            event_id,
            aggregate_type,
            aggregate_id,
            sequence,
            event_type,
            transaction_id,
            position,
            error,
            operator,
            db_user,
            reason,
            skipped_at,
        ): SkipRow| SkippedEvent {
            projection,
            event_id,
            aggregate_type,
            aggregate_id,
            sequence,
            event_type,
            position: Position {
                transaction_id: transaction_id as u64,
                position,
            },
            error,
            operator,
            db_user,
            reason,
            skipped_at,
        },
    )
    .collect();
    tx.commit().await?;
    Ok(report)
}

/// Makes `tx` a read-only `REPEATABLE READ` transaction, on `snapshot` (one
/// exported by another transaction) if given, set for the verify query.
async fn begin_reading(tx: &mut PgConnection, snapshot: Option<&str>) -> Result<(), sqlx::Error> {
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    if let Some(snapshot) = snapshot {
        // The id comes from `pg_export_snapshot` (hex digits and dashes);
        // SET takes no bind parameters.
        if !snapshot.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
            return Err(sqlx::Error::Protocol(format!(
                "`{snapshot}` is not a snapshot id"
            )));
        }
        sqlx::query(&format!("SET TRANSACTION SNAPSHOT '{snapshot}'"))
            .execute(&mut *tx)
            .await?;
    }
    // The rows are wanted in primary-key order, which the primary keys of
    // `events` and `stream_heads` give by a merge join. Left to itself the
    // planner prefers to sort the whole log (on disk, in parallel workers,
    // n log n: it slowed verify down as the log grew). Nor is a JIT worth
    // compiling for one streaming query.
    sqlx::raw_sql(
        "SET LOCAL enable_sort = off; SET LOCAL max_parallel_workers_per_gather = 0;
         SET LOCAL jit = off",
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// The streams where the log is cut into `parts` parts of about as many
/// events each, by the stream heads' counts: cut `k` is the first stream
/// (by key) at or after which `k / parts` of the events are. The heads only
/// balance the parts (whatever they say, the ranges cover every key). None
/// for one part, an empty log, or cuts that would leave a part empty.
async fn cut_streams(
    tx: &mut PgConnection,
    parts: usize,
) -> Result<Vec<(String, String)>, sqlx::Error> {
    if parts < 2 {
        return Ok(Vec::new());
    }
    let total: Option<i64> = sqlx::query_scalar("SELECT sum(sequence)::bigint FROM stream_heads")
        .fetch_one(&mut *tx)
        .await?;
    let Some(total) = total.filter(|total| *total > 1) else {
        return Ok(Vec::new());
    };
    let mut cuts: Vec<(String, String)> = Vec::with_capacity(parts - 1);
    for k in 1..parts as i64 {
        // The running sum streams in key order (the primary key's index),
        // so the scan stops at the cut.
        let cut: Option<(String, String)> = sqlx::query_as(
            "SELECT aggregate_type, aggregate_id
               FROM (SELECT aggregate_type, aggregate_id,
                            sum(sequence) OVER (ORDER BY aggregate_type, aggregate_id) AS upto
                       FROM stream_heads) heads
              WHERE upto * $2 >= $1 * $3
              ORDER BY aggregate_type, aggregate_id
              LIMIT 1",
        )
        .bind(total)
        .bind(parts as i64)
        .bind(k)
        .fetch_optional(&mut *tx)
        .await?;
        match cut {
            // A cut equal to the last one would leave a part with nothing.
            Some(cut) if cuts.last() != Some(&cut) => cuts.push(cut),
            _ => {}
        }
    }
    Ok(cuts)
}

/// Which streams one pass reads: one, or those from a key (inclusive) until
/// another (exclusive); a bound left out is open.
#[derive(Debug, Clone, Copy, Default)]
struct Streams<'a> {
    only: Option<(&'a str, &'a str)>,
    from: Option<(&'a str, &'a str)>,
    until: Option<(&'a str, &'a str)>,
}

/// Reads and checks the rows of `streams` (see [`verify`]).
///
/// The rows come as `COPY ... TO STDOUT (FORMAT binary)`: the reading task
/// only moves the protocol's messages along, and the checker takes each
/// value straight from the bytes Postgres sent (`CopyRows`), with no row
/// object built in between.
async fn check(
    tx: &mut PgConnection,
    streams: Streams<'_>,
    invariants: bool,
) -> Result<Checker, sqlx::Error> {
    let (batches, mut to_check) =
        tokio::sync::mpsc::channel::<Vec<bytes::Bytes>>(BATCHES_IN_FLIGHT);
    let mut checker = Checker {
        report: VerifyReport {
            invariants_checked: invariants,
            ..VerifyReport::default()
        },
        auditor: invariants.then(domain::audit::Auditor::new),
        stream: None,
    };
    let checking = tokio::task::spawn_blocking(move || {
        let mut rows = CopyRows::default();
        while let Some(messages) = to_check.blocking_recv() {
            for message in &messages {
                rows.feed(message, |row| checker.row(row))?;
            }
        }
        rows.finish()?;
        checker.end_stream();
        Ok::<_, sqlx::Error>(checker)
    });
    let read = async {
        let mut messages = tx.copy_out_raw(&verify_query(streams)).await?;
        let mut batch = Vec::with_capacity(ROWS_PER_BATCH);
        while let Some(message) = messages.try_next().await? {
            batch.push(message);
            if batch.len() == ROWS_PER_BATCH {
                let full = std::mem::replace(&mut batch, Vec::with_capacity(ROWS_PER_BATCH));
                if batches.send(full).await.is_err() {
                    // The checker stopped: its error is the one to report.
                    return Ok(());
                }
            }
        }
        if !batch.is_empty() {
            let _ = batches.send(batch).await;
        }
        Ok::<_, sqlx::Error>(())
    };
    let read = read.await;
    drop(batches);
    let checked = checking
        .await
        .map_err(|error| sqlx::Error::Protocol(format!("the verifying task failed: {error}")))?;
    read?;
    checked
}

/// The `COPY` of the events of `streams` with their heads, in primary-key
/// order. The bounds are on both primary keys, so that each index scan
/// starts and stops at them; `COPY` takes no parameters, so they are
/// literals.
fn verify_query(streams: Streams<'_>) -> String {
    let mut events = Vec::new();
    let mut heads = Vec::new();
    if let Some((aggregate_type, aggregate_id)) = streams.only {
        events.push(format!(
            "e.aggregate_type = {} AND e.aggregate_id = {}",
            literal(aggregate_type),
            literal(aggregate_id)
        ));
    }
    for (bound, operator) in [(streams.from, ">="), (streams.until, "<")] {
        if let Some((aggregate_type, aggregate_id)) = bound {
            let key = format!("({}, {})", literal(aggregate_type), literal(aggregate_id));
            events.push(format!(
                "(e.aggregate_type, e.aggregate_id) {operator} {key}"
            ));
            heads.push(format!(
                "(h.aggregate_type, h.aggregate_id) {operator} {key}"
            ));
        }
    }
    let and = |conditions: &[String]| {
        conditions
            .iter()
            .map(|condition| format!(" AND {condition}"))
            .collect::<String>()
    };
    format!(
        "COPY (SELECT e.aggregate_type, e.aggregate_id, e.sequence, e.event_type, e.event_version,
                      e.payload::text, e.metadata::text, e.event_id, e.recorded_at, e.prev_hash,
                      e.hash, e.transaction_id, e.position, h.sequence, h.hash
                 FROM events e
                 LEFT JOIN stream_heads h
                        ON h.aggregate_type = e.aggregate_type
                       AND h.aggregate_id = e.aggregate_id{}
                WHERE true{}
                ORDER BY e.aggregate_type, e.aggregate_id, e.sequence)
           TO STDOUT (FORMAT binary)",
        and(&heads),
        and(&events)
    )
}

/// `text` as an SQL string literal: an escape string, so that neither a
/// quote nor a backslash in it can end it, whatever
/// `standard_conforming_strings` says.
fn literal(text: &str) -> String {
    format!("E'{}'", text.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// One row of the verify query, each value as Postgres sent it in binary.
struct StoredRow<'a> {
    aggregate_type: &'a str,
    aggregate_id: &'a str,
    sequence: i64,
    event_type: &'a str,
    event_version: &'a str,
    payload: &'a str,
    metadata: &'a str,
    event_id: Uuid,
    recorded_at_micros: i64,
    prev_hash: &'a [u8],
    hash: &'a [u8],
    position: Position,
    head: Option<(i64, &'a [u8])>,
}

/// The columns of the verify query.
const COLUMNS: usize = 15;

/// Microseconds from the Unix epoch to Postgres's (2000-01-01).
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

impl<'a> StoredRow<'a> {
    fn decode(values: &[Option<&'a [u8]>; COLUMNS]) -> Result<Self, sqlx::Error> {
        let bad = |what: &str| sqlx::Error::Protocol(format!("verify read {what}"));
        let bytes = |index: usize| values[index].ok_or_else(|| bad("a NULL it did not expect"));
        let text = |index: usize| {
            std::str::from_utf8(bytes(index)?).map_err(|_| bad("text that is not UTF-8"))
        };
        let eight = |value: &[u8]| -> Result<[u8; 8], sqlx::Error> {
            value
                .try_into()
                .map_err(|_| bad("an integer of the wrong size"))
        };
        let int8 = |index: usize| Ok::<_, sqlx::Error>(i64::from_be_bytes(eight(bytes(index)?)?));
        let head = match (values[13], values[14]) {
            (Some(sequence), Some(hash)) => Some((i64::from_be_bytes(eight(sequence)?), hash)),
            _ => None,
        };
        Ok(Self {
            aggregate_type: text(0)?,
            aggregate_id: text(1)?,
            sequence: int8(2)?,
            event_type: text(3)?,
            event_version: text(4)?,
            payload: text(5)?,
            metadata: text(6)?,
            event_id: Uuid::from_slice(bytes(7)?).map_err(|_| bad("a malformed uuid"))?,
            recorded_at_micros: int8(8)?.saturating_add(POSTGRES_EPOCH_MICROS),
            prev_hash: bytes(9)?,
            hash: bytes(10)?,
            position: Position {
                // xid8 travels as an unsigned 64-bit integer.
                transaction_id: u64::from_be_bytes(eight(bytes(11)?)?),
                position: int8(12)?,
            },
            head,
        })
    }
}

/// A reader of `COPY ... (FORMAT binary)` output: fed the protocol's
/// messages in order (Postgres sends one per row, but a row split across
/// messages is put together), it hands each row's values to a callback.
#[derive(Default)]
struct CopyRows {
    header_read: bool,
    ended: bool,
    /// The start of a row whose end has not arrived yet.
    pending: Vec<u8>,
}

/// The signature that starts binary `COPY` output.
const COPY_SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

impl CopyRows {
    fn feed(
        &mut self,
        message: &[u8],
        mut row: impl FnMut(&StoredRow<'_>) -> Result<(), sqlx::Error>,
    ) -> Result<(), sqlx::Error> {
        if self.pending.is_empty() {
            let used = self.rows(message, &mut row)?;
            self.pending.extend_from_slice(&message[used..]);
        } else {
            let mut pending = std::mem::take(&mut self.pending);
            pending.extend_from_slice(message);
            let used = self.rows(&pending, &mut row)?;
            pending.drain(..used);
            self.pending = pending;
        }
        Ok(())
    }

    /// Reads the whole rows at the start of `bytes`; returns how many bytes
    /// they took.
    fn rows(
        &mut self,
        bytes: &[u8],
        row: &mut impl FnMut(&StoredRow<'_>) -> Result<(), sqlx::Error>,
    ) -> Result<usize, sqlx::Error> {
        let bad = |what: &str| sqlx::Error::Protocol(format!("verify read {what}"));
        let mut at = 0;
        if !self.header_read {
            // Signature, flags, then the length of a header extension.
            let fixed = COPY_SIGNATURE.len() + 8;
            if bytes.len() < fixed {
                return Ok(0);
            }
            if &bytes[..COPY_SIGNATURE.len()] != COPY_SIGNATURE {
                return Err(bad("COPY output that is not binary"));
            }
            let extension = be_u32(&bytes[fixed - 4..fixed]) as usize;
            if bytes.len() < fixed + extension {
                return Ok(0);
            }
            at = fixed + extension;
            self.header_read = true;
        }
        let mut values: [Option<&[u8]>; COLUMNS] = [None; COLUMNS];
        while at < bytes.len() {
            if self.ended {
                return Err(bad("data after the end of the COPY"));
            }
            let Some(count) = bytes.get(at..at + 2) else {
                return Ok(at);
            };
            let count = i16::from_be_bytes([count[0], count[1]]);
            if count == -1 {
                self.ended = true;
                at += 2;
                continue;
            }
            if count as usize != COLUMNS {
                return Err(bad(&format!("rows of {count} columns")));
            }
            let mut cursor = at + 2;
            for value in values.iter_mut() {
                let Some(length) = bytes.get(cursor..cursor + 4) else {
                    return Ok(at);
                };
                let length = i32::from_be_bytes([length[0], length[1], length[2], length[3]]);
                cursor += 4;
                if length < 0 {
                    *value = None;
                } else {
                    let Some(data) = bytes.get(cursor..cursor + length as usize) else {
                        return Ok(at);
                    };
                    *value = Some(data);
                    cursor += length as usize;
                }
            }
            row(&StoredRow::decode(&values)?)?;
            at = cursor;
        }
        Ok(at)
    }

    /// Checks that the output ended where it should.
    fn finish(&self) -> Result<(), sqlx::Error> {
        if self.ended && self.pending.is_empty() {
            Ok(())
        } else {
            Err(sqlx::Error::Protocol(
                "verify read a COPY that stopped before its end".to_owned(),
            ))
        }
    }
}

fn be_u32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

/// What the checking task keeps: the report so far, the invariants'
/// replay and the stream being checked.
struct Checker {
    report: VerifyReport,
    auditor: Option<domain::audit::Auditor>,
    stream: Option<Stream>,
}

impl Checker {
    /// Checks one row of the verify query.
    fn row(&mut self, row: &StoredRow<'_>) -> Result<(), sqlx::Error> {
        let StoredRow {
            aggregate_type,
            aggregate_id,
            sequence,
            event_type,
            event_version,
            payload,
            metadata,
            event_id,
            recorded_at_micros,
            prev_hash: stored_prev,
            hash: stored_hash,
            position: at,
            head,
        } = *row;
        let report = &mut self.report;
        // An invariant's finding at this event.
        let violation = |finding: domain::audit::Finding| Violation {
            position: Some(at),
            aggregate_type: Some(aggregate_type.to_owned()),
            aggregate_id: Some(aggregate_id.to_owned()),
            sequence: Some(sequence),
            code: finding.code,
            message: finding.message,
        };
        let same = self
            .stream
            .as_ref()
            .is_some_and(|s| s.aggregate_type == aggregate_type && s.aggregate_id == aggregate_id);
        if !same {
            if let Some(ended) = self.stream.take() {
                end_stream(report, ended);
            }
            report.aggregates_checked += 1;
            if let Some(auditor) = self.auditor.as_mut()
                && let Err(finding) = auditor.start(aggregate_type)
            {
                report.violation(violation(finding));
            }
            self.stream = Some(Stream {
                aggregate_type: aggregate_type.to_owned(),
                aggregate_id: aggregate_id.to_owned(),
                expected_sequence: 1,
                prev_hash: GENESIS_HASH,
                last_sequence: 0,
                last_position: at,
                head: head.map(|(sequence, hash)| (sequence, hash.to_vec())),
            });
        }
        let Some(current) = self.stream.as_mut() else {
            return Ok(());
        };
        report.events_checked += 1;
        let problem = |kind| Problem {
            aggregate_type: aggregate_type.to_owned(),
            aggregate_id: aggregate_id.to_owned(),
            sequence,
            position: Some(at),
            kind,
        };
        if sequence != current.expected_sequence {
            report.problem(problem(ProblemKind::SequenceGap));
        }
        if stored_prev != current.prev_hash.as_slice() {
            report.problem(problem(ProblemKind::BrokenLink));
        }
        // The link is checked against what is stored, and the content
        // against the stored prev_hash, so each problem is named once.
        let stored_prev_array: [u8; 32] = stored_prev.try_into().unwrap_or(GENESIS_HASH);
        let recomputed = ChainedFields {
            aggregate_type,
            aggregate_id,
            sequence,
            event_type,
            event_version,
            event_id,
            recorded_at_micros,
            payload,
            metadata,
        }
        .hash(&stored_prev_array);
        if recomputed.as_slice() != stored_hash {
            report.problem(problem(ProblemKind::Altered));
        }
        if let Some(auditor) = self.auditor.as_mut() {
            for finding in auditor.event(event_type, event_version, payload) {
                report.violation(violation(finding));
            }
        }
        current.expected_sequence = sequence + 1;
        current.prev_hash = stored_hash.try_into().unwrap_or(GENESIS_HASH);
        current.last_sequence = sequence;
        current.last_position = at;
        Ok(())
    }

    /// Ends the last stream.
    fn end_stream(&mut self) {
        if let Some(ended) = self.stream.take() {
            end_stream(&mut self.report, ended);
        }
    }
}

type SkipRow = (
    String,
    Uuid,
    String,
    String,
    i64,
    String,
    i64,
    i64,
    String,
    String,
    String,
    Option<String>,
    chrono::DateTime<chrono::Utc>,
);

/// The checks at the end of a stream: it must end at its head.
fn end_stream(report: &mut VerifyReport, stream: Stream) {
    let problem = |sequence, position, kind| Problem {
        aggregate_type: stream.aggregate_type.clone(),
        aggregate_id: stream.aggregate_id.clone(),
        sequence,
        position,
        kind,
    };
    match &stream.head {
        None => report.problem(problem(
            stream.last_sequence,
            Some(stream.last_position),
            ProblemKind::NoHead,
        )),
        Some((head_sequence, _)) if *head_sequence > stream.last_sequence => {
            report.problem(problem(*head_sequence, None, ProblemKind::EndRemoved));
        }
        Some((head_sequence, head_hash))
            if *head_sequence < stream.last_sequence
                || head_hash.as_slice() != stream.prev_hash.as_slice() =>
        {
            report.problem(problem(
                stream.last_sequence,
                Some(stream.last_position),
                ProblemKind::HeadMismatch,
            ));
        }
        Some(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One row of the verify query as binary `COPY` writes it.
    fn copy_row(aggregate_id: &str, sequence: i64, head: Option<i64>) -> Vec<u8> {
        let hash = [7u8; 32];
        let values: [Option<Vec<u8>>; COLUMNS] = [
            Some(b"Wallet".to_vec()),
            Some(aggregate_id.as_bytes().to_vec()),
            Some(sequence.to_be_bytes().to_vec()),
            Some(b"FundsDeposited".to_vec()),
            Some(b"1".to_vec()),
            Some(b"{\"FundsDeposited\":{}}".to_vec()),
            Some(b"{}".to_vec()),
            Some(Uuid::from_u128(9).as_bytes().to_vec()),
            Some(0i64.to_be_bytes().to_vec()),
            Some(GENESIS_HASH.to_vec()),
            Some(hash.to_vec()),
            Some(901u64.to_be_bytes().to_vec()),
            Some(12i64.to_be_bytes().to_vec()),
            head.map(|sequence| sequence.to_be_bytes().to_vec()),
            head.map(|_| hash.to_vec()),
        ];
        let mut out = (COLUMNS as i16).to_be_bytes().to_vec();
        for value in values {
            match value {
                Some(bytes) => {
                    out.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
                    out.extend_from_slice(&bytes);
                }
                None => out.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        out
    }

    fn copy_output() -> Vec<u8> {
        let mut out = COPY_SIGNATURE.to_vec();
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend(copy_row("a", 1, None));
        out.extend(copy_row("b'", 2, Some(2)));
        out.extend_from_slice(&(-1i16).to_be_bytes());
        out
    }

    /// A row read: aggregate id, sequence, head's sequence, position.
    type Read = (String, i64, Option<i64>, i64);

    /// What `CopyRows` hands on, fed `messages`.
    fn read(messages: &[&[u8]]) -> Result<Vec<Read>, sqlx::Error> {
        let mut rows = CopyRows::default();
        let mut seen = Vec::new();
        for message in messages {
            rows.feed(message, |row| {
                assert_eq!(row.position.transaction_id, 901);
                assert_eq!(row.recorded_at_micros, POSTGRES_EPOCH_MICROS);
                seen.push((
                    row.aggregate_id.to_owned(),
                    row.sequence,
                    row.head.map(|(sequence, _)| sequence),
                    row.position.position,
                ));
                Ok(())
            })?;
        }
        rows.finish()?;
        Ok(seen)
    }

    #[test]
    fn binary_copy_rows_are_read_however_the_messages_cut_them() {
        let output = copy_output();
        let expected = vec![
            ("a".to_owned(), 1, None, 12),
            ("b'".to_owned(), 2, Some(2), 12),
        ];
        assert_eq!(read(&[&output]).unwrap(), expected);
        for cut in 1..output.len() {
            let (first, second) = output.split_at(cut);
            assert_eq!(read(&[first, second]).unwrap(), expected, "cut at {cut}");
        }
        // Cut short, or not binary: an error, never a silent end.
        assert!(read(&[&output[..output.len() - 2]]).is_err());
        assert!(read(&[b"a\tb\n"]).is_err());
    }

    #[test]
    fn keys_in_the_copy_query_are_literals_nothing_can_end() {
        assert_eq!(literal("it's a \\ key"), "E'it\\'s a \\\\ key'");
        let query = verify_query(Streams {
            from: Some(("Wallet", "x' OR true --")),
            ..Streams::default()
        });
        assert!(
            query.contains("(e.aggregate_type, e.aggregate_id) >= (E'Wallet', E'x\\' OR true --')")
        );
        assert!(
            query.contains("(h.aggregate_type, h.aggregate_id) >= (E'Wallet', E'x\\' OR true --')")
        );
        assert!(!verify_query(Streams::default()).contains(">="));
    }
}
