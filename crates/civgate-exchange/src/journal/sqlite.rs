//! The journal on SQLite: its tables in the store file `civgate.sqlite` (beside the audit log),
//! one writer connection (the only writer of the file), a read-only pool, and the upgrades of
//! what earlier releases stored there.

use std::{collections::HashMap, path::Path, time::Duration};

use anyhow::{Context, Result};
use sqlx::{Connection, SqliteConnection, sqlite::SqlitePoolOptions};

use super::legacy::adopt_legacy;
use super::read::{EventRow, page_rows};
use super::writer::{
    ACK_SQL, ANSWER_SQL, CLOSE_SQL, Close, Dialect, EVENT_COLUMNS, Job, Known, KnownAnswers,
    Outcome, Plan, REJECT_SQL, REQUEST_COLUMNS, Written, audit_records, known_answers, known_keys,
    placed, plan, prune_topics, stored_requests,
};
use super::{Holder, Journal, JournalError, TOPICS};
use crate::audit::{AuditTail, merkle::CompactRange, subjects::BlockEntry};
use crate::policy::Policy;
use crate::store::Reader;

/// The writer's end: the one connection that writes the store file.
pub(super) struct Sqlite {
    pub(super) conn: SqliteConnection,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS journal_events (
    topic TEXT NOT NULL,
    seq INTEGER NOT NULL,
    event_id TEXT NOT NULL UNIQUE,
    producer TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    payload BLOB NOT NULL,
    payload_hash BLOB NOT NULL,
    recorded_at_ms INTEGER NOT NULL,
    audience TEXT,
    PRIMARY KEY (topic, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS journal_idempotency ON journal_events (producer, idempotency_key);
CREATE TABLE IF NOT EXISTS journal_rejections (
    topic TEXT NOT NULL,
    agency TEXT NOT NULL,
    grp TEXT NOT NULL,
    seq INTEGER NOT NULL,
    reason TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    PRIMARY KEY (topic, seq, agency, grp)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS journal_heads (
    topic TEXT PRIMARY KEY,
    head INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS journal_groups (
    topic TEXT NOT NULL,
    agency TEXT NOT NULL,
    grp TEXT NOT NULL,
    acked INTEGER NOT NULL,
    PRIMARY KEY (topic, agency, grp)
) WITHOUT ROWID;
";

/// Population events stored by an earlier release, without an audience (empty once they have
/// been given one at open: new population events always have one).
const UNADDRESSED_INDEX: &str = "CREATE INDEX IF NOT EXISTS journal_unaddressed ON journal_events (seq) \
     WHERE topic = 'population' AND audience IS NULL";

/// SQLite: a store of the release before consumer groups had owners. Groups and rejections get
/// an `agency` column ('' until [`adopt_legacy`] assigns them) in their key; events an
/// `audience`.
const SQLITE_OWNED_GROUPS: &str = "
CREATE TABLE journal_groups_owned (
    topic TEXT NOT NULL,
    agency TEXT NOT NULL,
    grp TEXT NOT NULL,
    acked INTEGER NOT NULL,
    PRIMARY KEY (topic, agency, grp)
) WITHOUT ROWID;
INSERT INTO journal_groups_owned (topic, agency, grp, acked) SELECT topic, '', grp, acked FROM journal_groups;
DROP TABLE journal_groups;
ALTER TABLE journal_groups_owned RENAME TO journal_groups;
";
const SQLITE_OWNED_REJECTIONS: &str = "
CREATE TABLE journal_rejections_owned (
    topic TEXT NOT NULL,
    agency TEXT NOT NULL,
    grp TEXT NOT NULL,
    seq INTEGER NOT NULL,
    reason TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    PRIMARY KEY (topic, seq, agency, grp)
) WITHOUT ROWID;
INSERT INTO journal_rejections_owned (topic, agency, grp, seq, reason, at_ms) SELECT topic, '', grp, seq, reason, at_ms FROM journal_rejections;
DROP TABLE journal_rejections;
ALTER TABLE journal_rejections_owned RENAME TO journal_rejections;
";
/// SQLite: a store of the release before one answer per request: which event answers which,
/// filled in from the stored events once ([`adopt_legacy`], while `journal_backfills` names it).
const SQLITE_ANSWERS: &str = "
CREATE TABLE journal_answers (
    asked TEXT NOT NULL,
    kind TEXT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (asked, kind)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS journal_backfills (name TEXT PRIMARY KEY) WITHOUT ROWID;
INSERT INTO journal_backfills (name) VALUES ('answers') ON CONFLICT (name) DO NOTHING;
";

/// The open requests of the flow table, one row per request (see `requests`).
const SQLITE_REQUESTS: &str = "
CREATE TABLE IF NOT EXISTS journal_requests (
    event_id TEXT PRIMARY KEY,
    producer TEXT NOT NULL,
    kind TEXT NOT NULL,
    case_reference TEXT NOT NULL,
    opened_at_ms INTEGER NOT NULL,
    due_at_ms INTEGER,
    answered_at_ms INTEGER,
    steps TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS journal_requests_due ON journal_requests (due_at_ms) WHERE due_at_ms IS NOT NULL;
CREATE INDEX IF NOT EXISTS journal_requests_last_answer ON journal_requests (answered_at_ms) WHERE answered_at_ms IS NOT NULL;
CREATE TABLE IF NOT EXISTS journal_request_cases (
    case_reference TEXT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (case_reference, event_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS journal_request_cases_pending (
    event_id TEXT PRIMARY KEY,
    case_reference TEXT NOT NULL
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS journal_requests_case_pending AFTER INSERT ON journal_requests
WHEN NEW.case_reference <> ''
BEGIN
    INSERT INTO journal_request_cases_pending (event_id, case_reference) VALUES (NEW.event_id, NEW.case_reference)
    ON CONFLICT (event_id) DO NOTHING;
END;
";

/// SQLite: a store of the release whose requests' cases were an index of `journal_requests`
/// (written at each commit): the index is dropped and the cases already stored are indexed
/// (`requests::index_cases` keeps the rest up to date).
const SQLITE_REQUEST_CASES_FROM_ROWS: &str = "
DROP INDEX IF EXISTS journal_requests_by_case;
INSERT INTO journal_request_cases (case_reference, event_id)
SELECT case_reference, event_id FROM journal_requests WHERE case_reference <> '' ORDER BY case_reference, event_id
ON CONFLICT (case_reference, event_id) DO NOTHING;
";

/// SQLite: a store of the release that kept a row per step of a request. Its table is put
/// aside (and its indexes dropped, their names are taken again), [`SQLITE_REQUESTS`] creates
/// the new one, then [`SQLITE_REQUESTS_FROM_STEPS`] fills it, one row per request (the steps
/// in answer order), and drops the old table.
const SQLITE_REQUEST_STEPS_ASIDE: &str = "
DROP INDEX IF EXISTS journal_requests_open;
DROP INDEX IF EXISTS journal_requests_case;
DROP INDEX IF EXISTS journal_requests_producer;
DROP INDEX IF EXISTS journal_requests_answered;
ALTER TABLE journal_requests RENAME TO journal_request_steps;
";
const SQLITE_REQUESTS_FROM_STEPS: &str = "
INSERT INTO journal_requests (event_id, producer, kind, case_reference, opened_at_ms, due_at_ms, answered_at_ms, steps)
SELECT event_id, min(producer), min(kind), min(case_reference), min(opened_at_ms),
       min(CASE WHEN answered_at_ms IS NULL THEN due_at_ms END), max(answered_at_ms),
       json_group_array(json(CASE WHEN answered_at_ms IS NULL THEN json_array(flow, answer, due_at_ms)
            ELSE json_array(flow, answer, due_at_ms, answered_at_ms, answer_event, coalesce(answered_by, '')) END))
FROM (SELECT * FROM journal_request_steps ORDER BY event_id, answer) GROUP BY event_id;
DROP TABLE journal_request_steps;
";

/// Opens the journal in `dir/civgate.sqlite` (see [`Journal::open`]).
pub(super) async fn open(
    dir: &Path,
    retention: Option<Duration>,
    audit: Option<AuditTail>,
    policy: &Policy,
) -> Result<Journal> {
    crate::sqlite::adopt_legacy_audit(dir).await?;
    crate::sqlite::prepare_dir(dir)?;
    let path = crate::sqlite::store_path(dir);
    let mut conn =
        SqliteConnection::connect_with(&crate::sqlite::options(&path, Duration::from_secs(2))?)
            .await
            .with_context(|| format!("opening {}", path.display()))?;
    {
        // The audit log's writer may be writing this file already.
        let _writing = AuditTail::lock_if(audit.as_ref()).await;
        sqlx::raw_sql(SCHEMA).execute(&mut conn).await?;
        adopt_legacy_journal(dir, &mut conn).await?;
        let mut tx = conn.begin().await?;
        upgrade_sqlite(&mut tx).await?;
        adopt_legacy!(&mut *tx, policy).await?;
        tx.commit().await?;
    }
    let reader = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(crate::sqlite::options(&path, Duration::from_secs(2))?.read_only(true))
        .await?;
    let mut last = HashMap::new();
    for t in TOPICS {
        // The stored head survives retention deleting every event of a topic.
        let max: Option<i64> = sqlx::query_scalar(
            "SELECT max(h) FROM (SELECT max(seq) AS h FROM journal_events WHERE topic = $1 \
                 UNION ALL SELECT head FROM journal_heads WHERE topic = $1)",
        )
        .bind(t)
        .fetch_one(&mut conn)
        .await?;
        last.insert(t, max.unwrap_or(0) as u64);
    }
    Ok(Journal::start(
        Reader::Sqlite(reader),
        Sqlite { conn },
        last,
        retention,
        audit,
    ))
}

/// SQLite: the same page as one JSON array of `[seq, event_id, producer, hex(payload) or null,
/// recorded_at_ms]` (`[]` for an empty page).
pub(super) fn page(scope: usize) -> String {
    // hex(NULL) is '', so a NULL payload (too large for the page) is kept NULL.
    format!(
        "SELECT json_group_array(json_array(seq, event_id, producer, \
           CASE WHEN payload IS NULL THEN NULL ELSE hex(payload) END, recorded_at_ms)) FROM ({})",
        page_rows(false, scope)
    )
}

/// The rows of a [`sqlite_page`], in sequence order (an aggregate's input order is not
/// promised, so it is restored here).
pub(super) fn parse_page(page: &str) -> Result<Vec<EventRow>, JournalError> {
    let bad = |what: &dyn std::fmt::Display| JournalError::Read(format!("journal page: {what}"));
    let rows: Vec<(i64, String, String, Option<String>, i64)> =
        serde_json::from_str(page).map_err(|e| bad(&e))?;
    let mut out = rows
        .into_iter()
        .map(|(seq, id, producer, payload, at)| {
            let payload = payload
                .map(|p| hex::decode(p).map_err(|e| bad(&e)))
                .transpose()?;
            Ok((seq, id, producer, payload, at))
        })
        .collect::<Result<Vec<_>, JournalError>>()?;
    out.sort_by_key(|r| r.0);
    Ok(out)
}
impl Dialect for Sqlite {
    /// The common case — no idempotency key of the batch has been seen before, no request it
    /// answers has an answer of that kind — is one round trip: sequences are assigned and
    /// everything is written in one transaction. A retried key or a second answer makes that
    /// insert fail on a unique index; the batch is then rolled back, the keys and answers are
    /// looked up, and the batch is planned again knowing them.
    async fn write(
        &mut self,
        last: &mut HashMap<&'static str, u64>,
        batch: &[Job],
        now: i64,
        mut range: Option<&mut CompactRange>,
    ) -> Result<Written> {
        let conn = &mut self.conn;
        let before = last.clone();
        let range_before = range.as_deref().cloned();
        // The only writer of the file: what it reads between its commits stays true until the
        // next one.
        let stored = stored_requests!(conn, batch).await?;
        let first = plan(last, batch, Known::new(), KnownAnswers::new(), now);
        let mut b = first.sqlite(&first.closes(&stored))?;
        let (indexes, entries) =
            stage_audit_sqlite(&mut b, batch, &first.outcomes, range.as_deref_mut())?;
        match b.commit(conn).await {
            Ok(()) => return Ok((first.outcomes, indexes, entries)),
            Err(e) if crate::sqlite::is_unique_violation(&e) => {
                *last = before;
                if let (Some(r), Some(b)) = (range.as_deref_mut(), range_before) {
                    *r = b;
                }
            }
            Err(e) => return Err(e.into()),
        }
        let known = known_keys!(conn, batch).await?;
        let answered = known_answers!(conn, batch).await?;
        let second = plan(last, batch, known, answered, now);
        let mut b = second.sqlite(&second.closes(&stored))?;
        let (indexes, entries) = stage_audit_sqlite(&mut b, batch, &second.outcomes, range)?;
        b.commit(conn).await?;
        Ok((second.outcomes, indexes, entries))
    }

    /// Records each topic's head in `journal_heads`, then deletes what no holder needs
    /// ([`prune_topics`]), in one transaction. A commit writes no head row (its events are
    /// the head), so the row must be there before retention can delete a topic's last events.
    async fn prune(&mut self, cutoff: i64, holders: &[Holder]) -> Result<u64> {
        let mut tx = self.conn.begin().await?;
        sqlx::query(
            "INSERT INTO journal_heads (topic, head) SELECT topic, max(seq) FROM journal_events \
         WHERE true GROUP BY topic \
         ON CONFLICT (topic) DO UPDATE SET head = max(head, excluded.head)",
        )
        .execute(&mut *tx)
        .await?;
        let deleted = prune_topics!(&mut *tx, false, cutoff, holders).await?;
        tx.commit().await?;
        Ok(deleted)
    }

    /// The writer is SQLite's only one: what is queued up to the bound read first is what
    /// the transaction moves.
    async fn index_cases(&mut self, max: i64) -> Result<u64> {
        let (bound, queued): (Option<String>, i64) = sqlx::query_as(
            "SELECT max(event_id), count(*) FROM (SELECT event_id FROM journal_request_cases_pending \
             ORDER BY event_id LIMIT $1)",
        )
        .bind(max)
        .fetch_one(&mut self.conn)
        .await?;
        let Some(bound) = bound else {
            return Ok(0);
        };
        let mut b = crate::sqlite::Batch::new();
        b.statement(
            "INSERT INTO journal_request_cases (case_reference, event_id) \
             SELECT case_reference, event_id FROM journal_request_cases_pending WHERE event_id <= ? \
             ORDER BY case_reference, event_id ON CONFLICT (case_reference, event_id) DO NOTHING",
        );
        b.bind(bound.as_str())?;
        b.statement("DELETE FROM journal_request_cases_pending WHERE event_id <= ?");
        b.bind(bound.as_str())?;
        b.commit(&mut self.conn).await?;
        Ok(queued as u64)
    }
}

/// SQLite: adds the audit records of the batch's publishes to `b` (given the audit log's right
/// edge); each job's audit index, and the entries staged.
fn stage_audit_sqlite(
    b: &mut crate::sqlite::Batch,
    batch: &[Job],
    outcomes: &[Outcome],
    range: Option<&mut CompactRange>,
) -> Result<(Vec<Option<u64>>, Vec<BlockEntry>)> {
    let (records, at) = audit_records(batch, outcomes);
    match range {
        Some(range) if !records.is_empty() => {
            let entries = records.iter().map(BlockEntry::of).collect();
            let first = crate::audit::log::stage_sqlite(b, range, records)?;
            Ok((placed(batch.len(), first, at), entries))
        }
        _ => Ok((vec![None; batch.len()], Vec::new())),
    }
}

/// SQLite: adds what this release stores to an earlier release's tables (in the caller's
/// transaction): events' `audience`, groups' and rejections' owning `agency` (`''` until
/// [`adopt_legacy`] assigns it), the index of events still without an audience, which event
/// answers which, and the open requests (one row per request).
async fn upgrade_sqlite(conn: &mut SqliteConnection) -> Result<()> {
    async fn has(conn: &mut SqliteConnection, table: &str, column: &str) -> Result<bool> {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pragma_table_info($1) WHERE name = $2")
                .bind(table)
                .bind(column)
                .fetch_one(&mut *conn)
                .await?;
        Ok(n > 0)
    }
    if !has(conn, "journal_events", "audience").await? {
        sqlx::raw_sql("ALTER TABLE journal_events ADD COLUMN audience TEXT")
            .execute(&mut *conn)
            .await?;
    }
    if !has(conn, "journal_groups", "agency").await? {
        sqlx::raw_sql(SQLITE_OWNED_GROUPS)
            .execute(&mut *conn)
            .await?;
    }
    if !has(conn, "journal_rejections", "agency").await? {
        sqlx::raw_sql(SQLITE_OWNED_REJECTIONS)
            .execute(&mut *conn)
            .await?;
    }
    if !has(conn, "journal_answers", "asked").await? {
        sqlx::raw_sql(SQLITE_ANSWERS).execute(&mut *conn).await?;
    }
    let per_step = has(conn, "journal_requests", "answer").await?;
    if per_step {
        sqlx::raw_sql(SQLITE_REQUEST_STEPS_ASIDE)
            .execute(&mut *conn)
            .await?;
    }
    let cases_indexed = has(conn, "journal_request_cases", "event_id").await?;
    sqlx::raw_sql(SQLITE_REQUESTS).execute(&mut *conn).await?;
    if per_step {
        sqlx::raw_sql(SQLITE_REQUESTS_FROM_STEPS)
            .execute(&mut *conn)
            .await?;
    }
    if !cases_indexed {
        sqlx::raw_sql(SQLITE_REQUEST_CASES_FROM_ROWS)
            .execute(&mut *conn)
            .await?;
    }
    sqlx::raw_sql(UNADDRESSED_INDEX).execute(&mut *conn).await?;
    Ok(())
}

/// Before the journal and the audit log shared `civgate.sqlite`, the journal lived in
/// `journal.sqlite`. Its rows are copied into the store file in one transaction (a copy cut
/// short by a crash is simply done again: every insert skips what is there), then the old file
/// is renamed `journal.sqlite.migrated`.
async fn adopt_legacy_journal(dir: &Path, conn: &mut SqliteConnection) -> Result<()> {
    let old = dir.join("journal.sqlite");
    if !old.exists() {
        return Ok(());
    }
    crate::sqlite::settle(&old).await?;
    sqlx::query("ATTACH DATABASE $1 AS legacy")
        .bind(old.to_string_lossy().into_owned())
        .execute(&mut *conn)
        .await
        .with_context(|| format!("attaching {}", old.display()))?;
    let mut copy = crate::sqlite::Batch::new();
    copy.statement(
        "INSERT OR IGNORE INTO journal_events (topic, seq, event_id, producer, idempotency_key, payload, payload_hash, recorded_at_ms) \
         SELECT topic, seq, event_id, producer, idempotency_key, payload, payload_hash, recorded_at_ms FROM legacy.journal_events",
    )
    .statement(
        // Without owners, like every group of that release (`adopt_legacy` assigns them).
        "INSERT OR IGNORE INTO journal_rejections (topic, agency, grp, seq, reason, at_ms) \
         SELECT topic, '', grp, seq, reason, at_ms FROM legacy.journal_rejections",
    )
    .statement(
        "INSERT INTO journal_heads (topic, head) SELECT topic, head FROM legacy.journal_heads WHERE true \
         ON CONFLICT (topic) DO UPDATE SET head = max(head, excluded.head)",
    )
    .statement(
        "INSERT INTO journal_groups (topic, agency, grp, acked) SELECT topic, '', grp, acked FROM legacy.journal_groups WHERE true \
         ON CONFLICT (topic, agency, grp) DO UPDATE SET acked = max(acked, excluded.acked)",
    );
    // One transaction, rolled back whole if any statement fails.
    let copied = copy.commit(&mut *conn).await;
    let detached = sqlx::raw_sql("DETACH DATABASE legacy")
        .execute(&mut *conn)
        .await;
    copied.with_context(|| format!("copying the journal from {}", old.display()))?;
    detached?;
    let moved = dir.join("journal.sqlite.migrated");
    std::fs::rename(&old, &moved)
        .with_context(|| format!("renaming {} to {}", old.display(), moved.display()))?;
    tracing::info!(from = %old.display(), "journal moved into the store file");
    Ok(())
}

impl Plan<'_> {
    /// The batch as one SQLite script (`?` placeholders, bound in order across statements).
    fn sqlite(&self, closes: &[Close]) -> Result<crate::sqlite::Batch, sqlx::Error> {
        use crate::sqlite::anonymous as q;
        let mut b = crate::sqlite::Batch::new();
        for (topic, group, seq) in &self.acks {
            b.statement(&q(ACK_SQL));
            b.bind(*topic)?
                .bind(group.agency.as_str())?
                .bind(group.name.as_str())?
                .bind(*seq as i64)?;
        }
        for (topic, group, seq, reason) in &self.rejects {
            b.statement(&q(REJECT_SQL));
            b.bind(*topic)?
                .bind(group.agency.as_str())?
                .bind(group.name.as_str())?
                .bind(*seq as i64)?
                .bind(*reason)?
                .bind(self.now)?;
        }
        b.insert_rows(EVENT_COLUMNS, 9, &self.rows, |b, r| {
            b.bind(r.topic)?
                .bind(r.seq as i64)?
                .bind(r.event_id.as_str())?
                .bind(r.producer)?
                .bind(r.key)?
                .bind(r.payload)?
                .bind(r.hash.as_slice())?
                .bind(self.now)?
                .bind(r.audience)?;
            Ok(())
        })?;
        b.insert_rows(REQUEST_COLUMNS, 7, &self.open_rows(), |b, r| {
            b.bind(r.event_id)?
                .bind(r.producer)?
                .bind(r.opens.kind)?
                .bind(r.opens.case_reference.as_str())?
                .bind(self.now)?
                .bind(r.due_at_ms)?
                .bind(r.steps.as_str())?;
            Ok(())
        })?;
        for (asked, kind, event_id, _) in &self.answers {
            b.statement(&q(ANSWER_SQL));
            b.bind(*asked)?.bind(*kind)?.bind(event_id.as_str())?;
        }
        for c in closes {
            b.statement(&q(CLOSE_SQL));
            b.bind(c.steps.as_str())?
                .bind(c.due_at_ms)?
                .bind(self.now)?
                .bind(c.event_id.as_str())?;
        }
        // No `journal_heads` row: on SQLite a topic's head is its highest stored sequence, and
        // retention records the heads before it deletes (`prune_sqlite`).
        Ok(b)
    }
}
