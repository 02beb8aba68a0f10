//! Tamper evidence: recomputes every aggregate's hash chain from the stored
//! rows. An altered event no longer matches its hash; a removed or reordered
//! one breaks the sequence or the link to its predecessor.

use sqlx::postgres::PgPool;
use uuid::Uuid;

use crate::record::{ChainedFields, GENESIS_HASH};

/// What is wrong with one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// Its content no longer hashes to its stored hash.
    Altered,
    /// Its `prev_hash` is not the hash of the event before it.
    BrokenLink,
    /// One or more events before it are missing.
    SequenceGap,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub kind: ProblemKind,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    pub events_checked: u64,
    pub aggregates_checked: u64,
    /// The first problems found (at most [`MAX_PROBLEMS`]).
    pub problems: Vec<Problem>,
    /// How many problems were found in all.
    pub problems_found: u64,
}

impl VerifyReport {
    pub fn is_intact(&self) -> bool {
        self.problems_found == 0
    }
}

pub const MAX_PROBLEMS: usize = 1000;
const PAGE: i64 = 5000;

type Row = (
    String,
    String,
    i64,
    String,
    String,
    String,
    String,
    Uuid,
    i64,
    Vec<u8>,
    Vec<u8>,
);

/// Verifies the chains of every aggregate, or of one when `only` names it
/// (`(aggregate_type, aggregate_id)`). Reads in pages, so memory stays flat.
pub async fn verify_chains(
    pool: &PgPool,
    only: Option<(&str, &str)>,
) -> Result<VerifyReport, sqlx::Error> {
    let mut report = VerifyReport::default();
    let mut cursor: (String, String, i64) = match only {
        Some((aggregate_type, aggregate_id)) => (aggregate_type.into(), aggregate_id.into(), 0),
        None => (String::new(), String::new(), 0),
    };
    let mut current: Option<(String, String)> = None;
    let mut expected_sequence = 1_i64;
    let mut prev_hash = GENESIS_HASH;
    loop {
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT aggregate_type, aggregate_id, sequence, event_type, event_version,
                    payload::text, metadata::text, event_id,
                    (EXTRACT(EPOCH FROM recorded_at) * 1000000)::bigint, prev_hash, hash
               FROM events
              WHERE (aggregate_type, aggregate_id, sequence) > ($1, $2, $3)
                AND ($4::text IS NULL OR (aggregate_type = $4 AND aggregate_id = $5))
              ORDER BY aggregate_type, aggregate_id, sequence
              LIMIT $6",
        )
        .bind(&cursor.0)
        .bind(&cursor.1)
        .bind(cursor.2)
        .bind(only.map(|(t, _)| t))
        .bind(only.map(|(_, i)| i))
        .bind(PAGE)
        .fetch_all(pool)
        .await?;
        let Some(last) = rows.last() else { break };
        cursor = (last.0.clone(), last.1.clone(), last.2);
        for (
            aggregate_type,
            aggregate_id,
            sequence,
            event_type,
            event_version,
            payload,
            metadata,
            event_id,
            recorded_at_micros,
            stored_prev,
            stored_hash,
        ) in rows
        {
            let same_aggregate = current
                .as_ref()
                .is_some_and(|(t, i)| *t == aggregate_type && *i == aggregate_id);
            if !same_aggregate {
                current = Some((aggregate_type.clone(), aggregate_id.clone()));
                report.aggregates_checked += 1;
                expected_sequence = 1;
                prev_hash = GENESIS_HASH;
            }
            report.events_checked += 1;
            let mut found = |kind| {
                report.problems_found += 1;
                if report.problems.len() < MAX_PROBLEMS {
                    report.problems.push(Problem {
                        aggregate_type: aggregate_type.clone(),
                        aggregate_id: aggregate_id.clone(),
                        sequence,
                        kind,
                    });
                }
            };
            if sequence != expected_sequence {
                found(ProblemKind::SequenceGap);
            }
            if stored_prev.as_slice() != prev_hash.as_slice() {
                found(ProblemKind::BrokenLink);
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
                recorded_at_micros,
                payload: &payload,
                metadata: &metadata,
            }
            .hash(&stored_prev_array);
            if recomputed.as_slice() != stored_hash.as_slice() {
                found(ProblemKind::Altered);
            }
            expected_sequence = sequence + 1;
            prev_hash = stored_hash.as_slice().try_into().unwrap_or(GENESIS_HASH);
        }
    }
    Ok(report)
}
