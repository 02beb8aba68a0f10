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
//! primary-key order with their head joined in (no sort, no page restarts).

use futures::TryStreamExt;
use sqlx::Connection;
use sqlx::postgres::PgPool;
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

type Row = (
    String,
    String,
    i64,
    String,
    String,
    String,
    String,
    Uuid,
    chrono::DateTime<chrono::Utc>,
    Vec<u8>,
    Vec<u8>,
    i64,
    i64,
    Option<i64>,
    Option<Vec<u8>>,
);

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
pub async fn verify(
    pool: &PgPool,
    options: &VerifyOptions<'_>,
) -> Result<VerifyReport, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let mut report = VerifyReport {
        invariants_checked: options.invariants,
        ..VerifyReport::default()
    };
    let mut auditor = options.invariants.then(domain::audit::Auditor::new);
    let only_type = options.only.map(|(t, _)| t);
    let only_id = options.only.map(|(_, i)| i);
    {
        let mut rows = sqlx::query_as::<_, Row>(
            "SELECT e.aggregate_type, e.aggregate_id, e.sequence, e.event_type, e.event_version,
                    e.payload::text, e.metadata::text, e.event_id, e.recorded_at, e.prev_hash,
                    e.hash, e.transaction_id::text::bigint, e.position, h.sequence, h.hash
               FROM events e
               LEFT JOIN stream_heads h
                      ON h.aggregate_type = e.aggregate_type AND h.aggregate_id = e.aggregate_id
              WHERE $1::text IS NULL OR (e.aggregate_type = $1 AND e.aggregate_id = $2)
              ORDER BY e.aggregate_type, e.aggregate_id, e.sequence",
        )
        .bind(only_type)
        .bind(only_id)
        .fetch(&mut *tx);
        let mut stream: Option<Stream> = None;
        while let Some(row) = rows.try_next().await? {
            let (
                aggregate_type,
                aggregate_id,
                sequence,
                event_type,
                event_version,
                payload,
                metadata,
                event_id,
                recorded_at,
                stored_prev,
                stored_hash,
                transaction_id,
                position,
                head_sequence,
                head_hash,
            ) = row;
            let at = Position {
                transaction_id: transaction_id as u64,
                position,
            };
            let same = stream.as_ref().is_some_and(|s| {
                s.aggregate_type == aggregate_type && s.aggregate_id == aggregate_id
            });
            if !same {
                if let Some(ended) = stream.take() {
                    end_stream(&mut report, ended);
                }
                report.aggregates_checked += 1;
                if let Some(auditor) = auditor.as_mut()
                    && let Err(finding) = auditor.start(&aggregate_type)
                {
                    report.violation(Violation {
                        position: Some(at),
                        aggregate_type: Some(aggregate_type.clone()),
                        aggregate_id: Some(aggregate_id.clone()),
                        sequence: Some(sequence),
                        code: finding.code,
                        message: finding.message,
                    });
                }
                stream = Some(Stream {
                    aggregate_type: aggregate_type.clone(),
                    aggregate_id: aggregate_id.clone(),
                    expected_sequence: 1,
                    prev_hash: GENESIS_HASH,
                    last_sequence: 0,
                    last_position: at,
                    head: head_sequence.zip(head_hash),
                });
            }
            let Some(current) = stream.as_mut() else {
                continue;
            };
            report.events_checked += 1;
            let problem = |kind| Problem {
                aggregate_type: aggregate_type.clone(),
                aggregate_id: aggregate_id.clone(),
                sequence,
                position: Some(at),
                kind,
            };
            if sequence != current.expected_sequence {
                report.problem(problem(ProblemKind::SequenceGap));
            }
            if stored_prev.as_slice() != current.prev_hash.as_slice() {
                report.problem(problem(ProblemKind::BrokenLink));
            }
            // The link is checked against what is stored, and the content
            // against the stored prev_hash, so each problem is named once.
            let stored_prev_array: [u8; 32] =
                stored_prev.as_slice().try_into().unwrap_or(GENESIS_HASH);
            let recomputed = ChainedFields {
                aggregate_type: &aggregate_type,
                aggregate_id: &aggregate_id,
                sequence,
                event_type: &event_type,
                event_version: &event_version,
                event_id,
                recorded_at_micros: recorded_at.timestamp_micros(),
                payload: &payload,
                metadata: &metadata,
            }
            .hash(&stored_prev_array);
            if recomputed.as_slice() != stored_hash.as_slice() {
                report.problem(problem(ProblemKind::Altered));
            }
            if let Some(auditor) = auditor.as_mut() {
                for finding in auditor.event(&event_type, &event_version, &payload) {
                    report.violation(Violation {
                        position: Some(at),
                        aggregate_type: Some(aggregate_type.clone()),
                        aggregate_id: Some(aggregate_id.clone()),
                        sequence: Some(sequence),
                        code: finding.code,
                        message: finding.message,
                    });
                }
            }
            current.expected_sequence = sequence + 1;
            current.prev_hash = stored_hash.as_slice().try_into().unwrap_or(GENESIS_HASH);
            current.last_sequence = sequence;
            current.last_position = at;
        }
        if let Some(ended) = stream.take() {
            end_stream(&mut report, ended);
        }
    }

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
