//! The writer task: one per journal, the only one to assign sequences. It takes the jobs
//! waiting, plans them as one batch ([`plan`]: sequences, idempotent retries, conflicts) and
//! has the store's [`Dialect`] commit the batch, with the audit records of the calls that
//! carry one, in one transaction.

use std::{collections::HashMap, time::Duration};

use anyhow::Result;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tracing::error;

use super::read::scope_expr;
use super::requests::{Step, answer_step, decode_steps, earliest_open_due, encode_steps};
use super::{Answer, Group, Holder, Journal, JournalError, Published, Receipt};
use crate::audit::{AuditTail, Draft, merkle::CompactRange, subjects::BlockEntry};
use crate::pb::v1::AuditRecord;
use crate::store::drain;

/// What the writer needs of a store, one implementation per dialect (`sqlite.rs`,
/// `postgres.rs`).
pub(super) trait Dialect: Send + 'static {
    /// Commits one batch in one transaction — with the audit records of its jobs that carry a
    /// draft when `range` (the audit log's right edge, locked) is given — continuing the
    /// sequences of `last` (the caller restores `last` and `range` if this fails). Returns
    /// each job's outcome and audit index, and the audit entries appended.
    fn write(
        &mut self,
        last: &mut HashMap<&'static str, u64>,
        batch: &[Job],
        now: i64,
        range: Option<&mut CompactRange>,
    ) -> impl Future<Output = Result<Written>> + Send;

    /// Deletes, in one transaction, what retention may delete ([`prune_sql`]) for `holders`.
    fn prune(
        &mut self,
        cutoff: i64,
        holders: &[Holder],
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Moves the cases of at most `max` queued requests (the oldest) from
    /// `journal_request_cases_pending` into `journal_request_cases`, sorted by case, in one
    /// transaction; returns how many it moved. Commits queue a request's case (a trigger on
    /// `journal_requests`, pages appended in event order) instead of writing an index entry at
    /// a random place of a large index; moved many at a time ([`CASES_QUEUED`]), many entries
    /// share a page. A lookup by case reads both tables in one statement (`requests::list_sql`).
    fn index_cases(&mut self, max: i64) -> impl Future<Output = Result<u64>> + Send;
}

/// Requests' cases moved per pass of [`Dialect::index_cases`] at most.
pub(super) const CASES_PER_PASS: i64 = 262_144;

/// How often the writer moves queued cases into the case index, at the latest.
const CASES_EVERY: Duration = Duration::from_secs(10);

/// Cases this writer has queued since its last pass that start one at once. The larger a
/// pass, the more of its entries share the index's pages (a pass writes each page it touches
/// once); the queue a lookup scans stays below about this size at any publish rate.
const CASES_QUEUED: u64 = 65_536;

/// Asks the writer to index the queued cases now (one pass); answered with how many it moved.
pub(super) type IndexNow = oneshot::Sender<Result<u64, JournalError>>;

/// Retention of one topic: events recorded before `$2`, addressed to at least one holder, that
/// no holder still needs. Holder `i` binds its acknowledged sequence and then its scope's
/// tokens (`scopes[i]` of them; none: it reads every event of the topic); it needs an event
/// after its acknowledgement that is addressed to it. An event addressed to no holder (a
/// province no registry covers now, say while an agency is out of the config) is kept, and so
/// is a population event without an audience (`instr` of NULL).
pub(super) fn prune_sql(pg: bool, scopes: &[usize]) -> String {
    let mut n = 3;
    let mut needed = Vec::with_capacity(scopes.len());
    let mut addressed_any = Vec::with_capacity(scopes.len());
    for &k in scopes {
        let addressed = if k == 0 {
            "TRUE".to_owned()
        } else {
            scope_expr(pg, k, n + 1)
        };
        needed.push(format!("(seq > ${n} AND {addressed})"));
        addressed_any.push(addressed);
        n += 1 + k;
    }
    format!(
        "DELETE FROM journal_events WHERE topic = $1 AND recorded_at_ms < $2 AND ({}) AND NOT ({})",
        addressed_any.join(" OR "),
        needed.join(" OR ")
    )
}

/// Deletes, per topic, what [`prune_sql`] selects for the holders of that topic (a topic with
/// none keeps everything), in the caller's transaction (`$conn`: a `&mut` SQLite or
/// PostgreSQL connection; `$pg`: which). The holders' acknowledgements are read in it.
macro_rules! prune_topics {
    ($conn:expr, $pg:expr, $cutoff:expr, $holders:expr) => {
        async {
            let holders: &[super::Holder] = $holders;
            let mut deleted = 0u64;
            for topic in super::TOPICS {
                let mine: Vec<&super::Holder> = holders.iter().filter(|h| h.topic == topic).collect();
                if mine.is_empty() {
                    continue;
                }
                let mut acked = Vec::with_capacity(mine.len());
                for h in &mine {
                    let a: Option<i64> = sqlx::query_scalar(
                        "SELECT acked FROM journal_groups WHERE topic = $1 AND agency = $2 AND grp = $3",
                    )
                    .bind(topic)
                    .bind(&h.group.agency)
                    .bind(&h.group.name)
                    .fetch_optional(&mut *$conn)
                    .await?;
                    // A group that never acknowledged needs everything addressed to it.
                    acked.push(a.unwrap_or(0));
                }
                let scopes: Vec<usize> = mine
                    .iter()
                    .map(|h| h.scope.as_ref().map_or(0, Vec::len))
                    .collect();
                // Built only from constants and numbered placeholders.
                let mut q = sqlx::query(sqlx::AssertSqlSafe(super::writer::prune_sql($pg, &scopes)))
                    .bind(topic)
                    .bind($cutoff);
                for (h, a) in mine.iter().zip(&acked) {
                    q = q.bind(*a);
                    for t in h.scope.iter().flatten() {
                        q = q.bind(t.as_str());
                    }
                }
                deleted += q.execute(&mut *$conn).await?.rows_affected();
            }
            Ok::<u64, sqlx::Error>(deleted)
        }
    };
}
pub(super) use prune_topics;

pub(super) const MAX_BATCH: usize = 1_024;

pub(super) enum Job {
    Publish {
        producer: String,
        key: String,
        topic: &'static str,
        payload: Vec<u8>,
        /// Who it is addressed to (`address::audience_of`); `None`: every consumer.
        audience: Option<String>,
        /// The request it answers, if it is an answer.
        answers: Option<Answer>,
        /// The requests it opens (flows with deadlines), if it is a request.
        opens: Option<Box<super::Opens>>,
        /// The call's audit record, to be finished with the outcome and committed with it.
        audit: Option<Draft>,
        done: oneshot::Sender<Published>,
    },
    Ack {
        topic: String,
        group: Group,
        seq: u64,
        audit: Option<Draft>,
        done: oneshot::Sender<Result<Option<u64>, JournalError>>,
    },
    Reject {
        topic: String,
        group: Group,
        seq: u64,
        reason: String,
        audit: Option<Draft>,
        done: oneshot::Sender<Result<Option<u64>, JournalError>>,
    },
    /// An audit record and nothing else (what a subscription delivers): committed by this
    /// writer so that it shares the journal's transaction instead of taking turns with it on
    /// the store.
    Record {
        audit: Draft,
        detail: String,
        done: oneshot::Sender<Result<Option<u64>, JournalError>>,
    },
}

impl Job {
    pub(super) fn audit(&self) -> Option<&Draft> {
        match self {
            Job::Publish { audit, .. } | Job::Ack { audit, .. } | Job::Reject { audit, .. } => {
                audit.as_ref()
            }
            Job::Record { audit, .. } => Some(audit),
        }
    }

    /// The detail of the job's audit record.
    pub(super) fn detail(&self) -> &str {
        match self {
            Job::Record { detail, .. } => detail,
            _ => "",
        }
    }
}

/// The stored (payload hash, receipt) of each (producer, key) of the batch already in the
/// journal: one query per 400 keys. `conn` is a `&mut` SQLite or PostgreSQL connection.
macro_rules! known_keys {
    ($conn:expr, $batch:expr) => {
        async {
            let keys: Vec<(&str, &str)> = $batch
                .iter()
                .filter_map(|j| match j {
                    super::writer::Job::Publish { producer, key, .. } => Some((producer.as_str(), key.as_str())),
                    _ => None,
                })
                .collect();
            let mut known = super::writer::Known::new();
            for chunk in keys.chunks(400) {
                let values: Vec<String> = (0..chunk.len())
                    .map(|i| format!("(${}, ${})", 2 * i + 1, 2 * i + 2))
                    .collect();
                let sql = format!(
                    "SELECT producer, idempotency_key, payload_hash, event_id, topic, seq, recorded_at_ms \
                     FROM journal_events WHERE (producer, idempotency_key) IN (VALUES {})",
                    values.join(",")
                );
                // Built only from constants and numbered placeholders.
                let mut q = sqlx::query_as::<_, (String, String, Vec<u8>, String, String, i64, i64)>(
                    sqlx::AssertSqlSafe(sql),
                );
                for (p, k) in chunk {
                    q = q.bind(*p).bind(*k);
                }
                for (producer, key, hash, event_id, topic, seq, at) in q.fetch_all(&mut *$conn).await? {
                    known.insert(
                        (producer, key),
                        (
                            hash,
                            super::Receipt {
                                event_id,
                                topic,
                                sequence: seq as u64,
                                recorded_at_ms: at,
                            },
                        ),
                    );
                }
            }
            Ok::<_, anyhow::Error>(known)
        }
    };
}
pub(super) use known_keys;

/// The answers already stored of each (asked event, kind) the batch's answers claim: one query
/// per 400, none for a batch without answers. `conn` is a `&mut` SQLite or PostgreSQL
/// connection.
macro_rules! known_answers {
    ($conn:expr, $batch:expr) => {
        async {
            let claims: Vec<&super::Answer> = $batch
                .iter()
                .filter_map(|j| match j {
                    super::writer::Job::Publish { answers: Some(a), .. } => Some(a),
                    _ => None,
                })
                .collect();
            let mut known = super::writer::KnownAnswers::new();
            for chunk in claims.chunks(400) {
                let values: Vec<String> = (0..chunk.len())
                    .map(|i| format!("(${}, ${})", 2 * i + 1, 2 * i + 2))
                    .collect();
                let sql = format!(
                    "SELECT asked, kind, event_id FROM journal_answers WHERE (asked, kind) IN (VALUES {})",
                    values.join(",")
                );
                // Built only from constants and numbered placeholders.
                let mut q = sqlx::query_as::<_, (String, String, String)>(sqlx::AssertSqlSafe(sql));
                for a in chunk {
                    q = q.bind(a.asked.as_str()).bind(a.kind);
                }
                for (asked, kind, event_id) in q.fetch_all(&mut *$conn).await? {
                    known.insert((asked, kind), event_id);
                }
            }
            Ok::<_, anyhow::Error>(known)
        }
    };
}
pub(super) use known_answers;

pub(super) struct Writer<D> {
    pub(super) conn: D,
    pub(super) last: HashMap<&'static str, u64>,
    pub(super) journal: Journal,
    /// The audit log's right edge: publishes' records are committed with their events.
    pub(super) audit: Option<AuditTail>,
    /// Requests with a case this writer has committed (or tried to) since its last pass of
    /// the case index.
    pub(super) queued_cases: u64,
}

impl<D: Dialect> Writer<D> {
    pub(super) async fn run(
        mut self,
        mut rx: mpsc::Receiver<Job>,
        mut index_now: mpsc::Receiver<IndexNow>,
        retention: Option<Duration>,
    ) {
        let mut prune = tokio::time::interval(Duration::from_secs(60));
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut cases = tokio::time::interval(CASES_EVERY);
        cases.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                first = rx.recv() => {
                    let Some(first) = first else { break };
                    let mut batch = vec![first];
                    // No linger here (store::linger): producers wait for their receipts, so
                    // at 64 publishes in flight a wait before the commit only delays the
                    // next wave (measured: fewer publishes/s, not more).
                    drain(&mut rx, &mut batch, MAX_BATCH);
                    self.queued_cases += batch
                        .iter()
                        .filter(|j| matches!(j, Job::Publish { opens: Some(o), .. } if !o.case_reference.is_empty()))
                        .count() as u64;
                    self.commit(batch).await;
                    if self.queued_cases >= CASES_QUEUED {
                        cases.reset();
                        if let Err(e) = self.index_cases().await {
                            error!(error = %e, "indexing requests' cases failed");
                        }
                    }
                }
                _ = prune.tick(), if retention.is_some() => {
                    if let Some(r) = retention
                        && let Err(e) = self.prune(r).await
                    {
                        error!(error = %e, "journal retention failed");
                    }
                }
                _ = cases.tick() => {
                    if let Err(e) = self.index_cases().await {
                        // The cases stay queued, where lookups find them; the next pass retries.
                        error!(error = %e, "indexing requests' cases failed");
                    }
                }
                Some(done) = index_now.recv() => {
                    let _ = done.send(
                        self.index_cases()
                            .await
                            .map_err(|e| JournalError::NotDurable(e.to_string())),
                    );
                }
            }
        }
    }

    /// One pass of [`Dialect::index_cases`], under the audit tail's lock like every write.
    async fn index_cases(&mut self) -> Result<u64> {
        self.queued_cases = 0;
        let tail = self.audit.clone();
        let _writing = AuditTail::lock_if(tail.as_ref()).await;
        self.conn.index_cases(CASES_PER_PASS).await
    }

    /// Deletes events older than `retention` that every holder they are addressed to (under
    /// the configuration in force: [`Journal::retain_for`]) has acknowledged. A topic without
    /// holders keeps everything.
    async fn prune(&mut self, retention: Duration) -> Result<u64> {
        let cutoff = crate::audit::log::now_ms() - retention.as_millis() as i64;
        let holders = self.journal.holders();
        let tail = self.audit.clone();
        let _writing = AuditTail::lock_if(tail.as_ref()).await;
        let done = self.conn.prune(cutoff, &holders).await?;
        if done > 0 {
            tracing::info!(
                deleted = done,
                "journal retention: acknowledged events removed"
            );
        }
        Ok(done)
    }

    async fn commit(&mut self, batch: Vec<Job>) {
        // Taken before any database lock (see `AuditTail`), for every commit: on SQLite the
        // audit log's writer writes the same file.
        let tail = self.audit.clone();
        let mut range = AuditTail::lock_if(tail.as_ref()).await;
        let range_before = range.as_deref().cloned();
        let before = self.last.clone();
        let started = std::time::Instant::now();
        let result = self.write(&batch, range.as_deref_mut()).await;
        crate::store::store_commit("journal", batch.len(), started.elapsed());
        match result {
            Ok((outcomes, audit_indexes, entries)) => {
                if let (Some(t), Some(r)) = (&tail, range.as_deref())
                    && let Some(first) = audit_indexes.iter().flatten().next()
                {
                    // The records are the drafted jobs', at consecutive indexes in batch order.
                    t.note(*first, &entries);
                    t.committed(r);
                }
                drop(range);
                for (t, seq) in &self.last {
                    self.journal.raise_head(t, *seq);
                }
                for ((job, outcome), audit_index) in
                    batch.into_iter().zip(outcomes).zip(audit_indexes)
                {
                    // Before the draft is let go: a gate whose client went away meanwhile
                    // must see that the record exists.
                    if audit_index.is_some()
                        && let Some(draft) = job.audit()
                    {
                        draft.call.mark_recorded();
                    }
                    match (job, outcome) {
                        (Job::Publish { done, .. }, Outcome::Published(result)) => {
                            let _ = done.send(Published {
                                result,
                                audit_index,
                            });
                        }
                        (Job::Reject { done, .. } | Job::Record { done, .. }, Outcome::Acked) => {
                            let _ = done.send(Ok(audit_index));
                        }
                        (
                            Job::Ack {
                                topic,
                                group,
                                seq,
                                done,
                                ..
                            },
                            Outcome::Acked,
                        ) => {
                            self.journal.raise_ack(&topic, &group, seq);
                            let _ = done.send(Ok(audit_index));
                        }
                        // Each job yields the outcome of its own kind.
                        _ => {}
                    }
                }
            }
            Err(e) => {
                self.last = before;
                if let (Some(r), Some(b)) = (range.as_deref_mut(), range_before) {
                    *r = b;
                }
                drop(range);
                error!(error = %e, "journal commit failed");
                for job in batch {
                    let err = || JournalError::NotDurable(e.to_string());
                    match job {
                        Job::Publish { done, .. } => {
                            let _ = done.send(Published {
                                result: Err(err()),
                                audit_index: None,
                            });
                        }
                        Job::Ack { done, .. }
                        | Job::Reject { done, .. }
                        | Job::Record { done, .. } => {
                            let _ = done.send(Err(err()));
                        }
                    }
                }
            }
        }
    }

    /// Commits one batch — with the audit records of its publishes when `range` (the audit
    /// log's right edge, locked) is given. Returns each job's outcome and audit index.
    async fn write(&mut self, batch: &[Job], range: Option<&mut CompactRange>) -> Result<Written> {
        let now = crate::audit::log::now_ms();
        self.conn.write(&mut self.last, batch, now, range).await
    }
}

/// The audit records of the batch's jobs that carry a draft, finished with their outcomes,
/// and the position in the batch of each.
pub(super) fn audit_records(batch: &[Job], outcomes: &[Outcome]) -> (Vec<AuditRecord>, Vec<usize>) {
    let mut records = Vec::new();
    let mut at = Vec::new();
    for (i, (job, outcome)) in batch.iter().zip(outcomes).enumerate() {
        let Some(draft) = job.audit() else { continue };
        let (code, detail) = match outcome {
            Outcome::Published(Err(e @ JournalError::Answered { .. })) => {
                (e.code(), "already_answered")
            }
            Outcome::Published(Err(e)) => (e.code(), job.detail()),
            Outcome::Published(Ok(_)) | Outcome::Acked => (tonic::Code::Ok, job.detail()),
        };
        records.push(draft.call.record(draft.facts.clone(), code, detail));
        at.push(i);
    }
    (records, at)
}

/// What a commit did: each job's outcome and audit index, and the audit entries it appended
/// (in index order, for the block summaries).
pub(super) type Written = (Vec<Outcome>, Vec<Option<u64>>, Vec<BlockEntry>);

/// Each job's audit index: the records appended from `first` on belong, in order, to the jobs
/// at positions `at`; the other jobs have none.
pub(super) fn placed(jobs: usize, first: u64, at: Vec<usize>) -> Vec<Option<u64>> {
    let mut indexes = vec![None; jobs];
    for (k, i) in at.into_iter().enumerate() {
        indexes[i] = Some(first + k as u64);
    }
    indexes
}
/// What one batch writes: new events with their sequences, acknowledgements, rejections, and
/// each job's outcome.
pub(super) struct Plan<'a> {
    pub(super) rows: Vec<NewRow<'a>>,
    pub(super) acks: Vec<(&'a str, &'a Group, u64)>,
    pub(super) rejects: Vec<(&'a str, &'a Group, u64, &'a str)>,
    /// (asked event, kind, answering event, its producer) of the new answers.
    pub(super) answers: Vec<(&'a str, &'static str, String, &'a str)>,
    /// (request event, its producer, what it opens) of the new requests.
    pub(super) opens: Vec<(String, &'a str, &'a super::Opens)>,
    pub(super) outcomes: Vec<Outcome>,
    pub(super) now: i64,
}

/// Assigns sequences (continuing `last`) to the new events of `batch` — those whose key is not
/// in `known`, nor earlier in the batch. An answer to a request that has one of its kind (in
/// `answered`, or earlier in the batch) is refused, unless it is a retry of a stored publish.
pub(super) fn plan<'a>(
    last: &mut HashMap<&'static str, u64>,
    batch: &'a [Job],
    mut known: Known,
    mut answered: KnownAnswers,
    now: i64,
) -> Plan<'a> {
    let mut p = Plan {
        rows: Vec::new(),
        acks: Vec::new(),
        rejects: Vec::new(),
        answers: Vec::new(),
        opens: Vec::new(),
        outcomes: Vec::with_capacity(batch.len()),
        now,
    };
    for job in batch {
        match job {
            Job::Publish {
                producer,
                key,
                topic,
                payload,
                audience,
                answers,
                opens,
                ..
            } => {
                let hash: Vec<u8> = Sha256::digest(payload).to_vec();
                let k = (producer.clone(), key.clone());
                if let Some((h, receipt)) = known.get(&k) {
                    p.outcomes.push(Outcome::Published(if *h == hash {
                        Ok(receipt.clone())
                    } else {
                        Err(JournalError::Conflict(receipt.event_id.clone()))
                    }));
                    continue;
                }
                if let Some(a) = answers
                    && let Some(by) = answered.get(&(a.asked.clone(), a.kind.to_owned()))
                {
                    p.outcomes
                        .push(Outcome::Published(Err(JournalError::Answered {
                            asked: a.asked.clone(),
                            kind: a.kind,
                            by: by.clone(),
                        })));
                    continue;
                }
                let seq = last.get(topic).copied().unwrap_or(0) + 1;
                last.insert(topic, seq);
                // Time-ordered (UUIDv7): new ids land at the right edge of the unique index
                // instead of dirtying a random page of it per event.
                let event_id = uuid::Uuid::now_v7().simple().to_string();
                let receipt = Receipt {
                    event_id: event_id.clone(),
                    topic: (*topic).to_owned(),
                    sequence: seq,
                    recorded_at_ms: now,
                };
                known.insert(k, (hash.clone(), receipt.clone()));
                if let Some(a) = answers {
                    answered.insert((a.asked.clone(), a.kind.to_owned()), event_id.clone());
                    p.answers
                        .push((a.asked.as_str(), a.kind, event_id.clone(), producer));
                }
                if let Some(o) = opens.as_deref().filter(|o| !o.list.is_empty()) {
                    p.opens.push((event_id.clone(), producer, o));
                }
                p.rows.push(NewRow {
                    topic,
                    seq,
                    event_id,
                    producer,
                    key,
                    payload,
                    hash,
                    audience: audience.as_deref(),
                });
                p.outcomes.push(Outcome::Published(Ok(receipt)));
            }
            Job::Ack {
                topic, group, seq, ..
            } => {
                p.acks.push((topic, group, *seq));
                p.outcomes.push(Outcome::Acked);
            }
            Job::Reject {
                topic,
                group,
                seq,
                reason,
                ..
            } => {
                p.rejects.push((topic, group, *seq, reason));
                p.outcomes.push(Outcome::Acked);
            }
            // Its record is all it writes.
            Job::Record { .. } => p.outcomes.push(Outcome::Acked),
        }
    }
    p
}

pub(super) const ACK_SQL: &str = "INSERT INTO journal_groups (topic, agency, grp, acked) VALUES ($1, $2, $3, $4) \
     ON CONFLICT (topic, agency, grp) DO UPDATE SET acked = CASE WHEN excluded.acked > journal_groups.acked \
     THEN excluded.acked ELSE journal_groups.acked END";
pub(super) const REJECT_SQL: &str = "INSERT INTO journal_rejections (topic, agency, grp, seq, reason, at_ms) VALUES ($1, $2, $3, $4, $5, $6) \
     ON CONFLICT (topic, seq, agency, grp) DO UPDATE SET reason = excluded.reason, at_ms = excluded.at_ms";
/// The columns of a new event, in the order of [`Plan::insert_sql`] and `insert_rows`.
pub(super) const EVENT_COLUMNS: &str = "journal_events (topic, seq, event_id, producer, idempotency_key, payload, payload_hash, recorded_at_ms, audience)";

/// (producer, idempotency key) → (payload hash, receipt) of events already stored.
pub(super) type Known = HashMap<(String, String), (Vec<u8>, Receipt)>;

/// (asked event, kind) → the event that answers it, of answers already stored.
pub(super) type KnownAnswers = HashMap<(String, String), String>;

/// Records which event answers which request, one row per (asked event, kind).
pub(super) const ANSWER_SQL: &str =
    "INSERT INTO journal_answers (asked, kind, event_id) VALUES ($1, $2, $3)";

/// The columns of a new request's row (`requests`: one row per request, its steps in it), in
/// the order [`Plan::open_rows`] binds them; inserted many rows per statement.
pub(super) const REQUEST_COLUMNS: &str = "journal_requests \
     (event_id, producer, kind, case_reference, opened_at_ms, due_at_ms, steps)";

/// One new request's row to insert.
pub(super) struct OpenRow<'a> {
    pub(super) event_id: &'a str,
    pub(super) producer: &'a str,
    pub(super) opens: &'a super::Opens,
    /// The earliest due time of its steps.
    pub(super) due_at_ms: Option<i64>,
    /// Its steps, encoded (`requests::encode_steps`).
    pub(super) steps: String,
}

impl Plan<'_> {
    /// The rows of the batch's new requests, one per request.
    pub(super) fn open_rows(&self) -> Vec<OpenRow<'_>> {
        self.opens
            .iter()
            .map(|(event_id, producer, opens)| {
                let steps: Vec<Step> = opens
                    .list
                    .iter()
                    .map(|o| Step::open(&o.flow, o.answer, o.due_at_ms))
                    .collect();
                OpenRow {
                    event_id: event_id.as_str(),
                    producer,
                    opens,
                    due_at_ms: earliest_open_due(&steps),
                    steps: encode_steps(&steps),
                }
            })
            .collect()
    }

    /// The rows of the requests this batch's answers answer, rewritten: each answered step
    /// marked (at the batch's time, by the answering event and its producer), the earliest
    /// due time of the steps still open, the time of the latest answer. `stored` holds the
    /// stored steps of the requests asked (read under the writer's lock: `stored_requests`);
    /// an answer to an event no flow tracks, or to a step answered already, changes nothing.
    /// A row whose steps do not decode is left as it is, with an error logged: the answer is
    /// published all the same.
    pub(super) fn closes(&self, stored: &StoredRequests) -> Vec<Close> {
        let mut touched: Vec<(&str, Vec<Step>)> = Vec::new();
        for (asked, kind, event_id, producer) in &self.answers {
            let asked: &str = asked;
            let at = match touched.iter().position(|(e, _)| *e == asked) {
                Some(i) => i,
                None => {
                    let Some(text) = stored.get(asked) else {
                        continue;
                    };
                    match decode_steps(text) {
                        Ok(steps) => {
                            touched.push((asked, steps));
                            touched.len() - 1
                        }
                        Err(e) => {
                            error!(request = asked, error = %e, "open request not closed: its row does not decode");
                            continue;
                        }
                    }
                }
            };
            answer_step(&mut touched[at].1, kind, self.now, event_id, producer);
        }
        touched
            .into_iter()
            .map(|(event_id, steps)| Close {
                event_id: event_id.to_owned(),
                due_at_ms: earliest_open_due(&steps),
                steps: encode_steps(&steps),
            })
            .collect()
    }
}

/// Event id → `steps` of the stored requests a batch's answers ask.
pub(super) type StoredRequests = HashMap<String, String>;

/// A request's row rewritten by answers ([`Plan::closes`]).
pub(super) struct Close {
    pub(super) event_id: String,
    pub(super) due_at_ms: Option<i64>,
    pub(super) steps: String,
}

/// Rewrites a request's row: steps `$1`, earliest open due `$2`, latest answer at `$3`, of
/// event `$4`.
pub(super) const CLOSE_SQL: &str = "UPDATE journal_requests SET steps = $1, due_at_ms = $2, answered_at_ms = $3 \
     WHERE event_id = $4";

/// The stored `steps` of the requests the batch's answers ask (`StoredRequests`): one query
/// per 400, none for a batch without answers. `conn` is a `&mut` SQLite or PostgreSQL
/// connection.
macro_rules! stored_requests {
    ($conn:expr, $batch:expr) => {
        async {
            let mut asked: Vec<&str> = $batch
                .iter()
                .filter_map(|j| match j {
                    super::writer::Job::Publish {
                        answers: Some(a), ..
                    } => Some(a.asked.as_str()),
                    _ => None,
                })
                .collect();
            asked.sort_unstable();
            asked.dedup();
            let mut stored = super::writer::StoredRequests::new();
            for chunk in asked.chunks(400) {
                let values: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
                let sql = format!(
                    "SELECT event_id, steps FROM journal_requests WHERE event_id IN ({})",
                    values.join(",")
                );
                // Built only from constants and numbered placeholders.
                let mut q = sqlx::query_as::<_, (String, String)>(sqlx::AssertSqlSafe(sql));
                for a in chunk {
                    q = q.bind(*a);
                }
                stored.extend(q.fetch_all(&mut *$conn).await?);
            }
            Ok::<_, anyhow::Error>(stored)
        }
    };
}
pub(super) use stored_requests;

/// An event to insert.
pub(super) struct NewRow<'a> {
    pub(super) topic: &'static str,
    pub(super) seq: u64,
    pub(super) event_id: String,
    pub(super) producer: &'a str,
    pub(super) key: &'a str,
    pub(super) payload: &'a [u8],
    pub(super) hash: Vec<u8>,
    pub(super) audience: Option<&'a str>,
}

pub(super) enum Outcome {
    Published(Result<Receipt, JournalError>),
    Acked,
}
