//! The journal on PostgreSQL: one schema shared by every replica. Each replica's writer
//! commits through the pool; the rows of `journal_heads`, locked in each transaction, order
//! the replicas' commits, and LISTEN/NOTIFY tells the other replicas what committed.

use std::{collections::HashMap, time::Duration};

use anyhow::Result;
use sqlx::PgPool;
use tokio::sync::mpsc;

use super::legacy::adopt_legacy;
use super::writer::{
    ACK_SQL, ANSWER_SQL, CLOSE_SQL, Close, Dialect, EVENT_COLUMNS, Job, Plan, REJECT_SQL,
    REQUEST_COLUMNS, Written, audit_records, known_answers, known_keys, placed, plan, prune_topics,
    stored_requests,
};
use super::{Group, Holder, Journal, TOPICS};

/// Open requests per INSERT statement (7 parameters each, under PostgreSQL's 65,535).
const OPENS_PER_INSERT: usize = 512;
use crate::audit::{AuditTail, merkle::CompactRange, subjects::BlockEntry};
use crate::policy::Policy;
use crate::store::{JOURNAL_CHANNEL, Reader};

/// The writer's end: the shared database's pool (other replicas write too).
pub(super) struct Pg {
    pub(super) pool: PgPool,
}

/// Opens the journal in the PostgreSQL store at `url` (see [`Journal::open`]).
pub(super) async fn open(
    url: &str,
    pool_max: u32,
    retention: Option<Duration>,
    audit: Option<AuditTail>,
    policy: &Policy,
) -> Result<Journal> {
    let pool = crate::store::pg_pool(url, pool_max, Duration::from_secs(2)).await?;
    crate::store::migrate(&pool).await?;
    {
        let mut tx = pool.begin().await?;
        // One replica of this schema at a time; the others find nothing left.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext(current_schema() || ' civgate adopt'))")
            .execute(&mut *tx)
            .await?;
        adopt_legacy!(&mut *tx, policy).await?;
        tx.commit().await?;
    }
    let mut last = HashMap::new();
    for t in TOPICS {
        last.insert(t, pg_head(&pool, t).await?);
    }
    let journal = Journal::start(
        Reader::Pg(pool.clone()),
        Pg { pool: pool.clone() },
        last,
        retention,
        audit,
    );
    // The follower must not keep the writer alive: it gets a handle whose sender goes
    // nowhere, and stops once the real one is gone.
    let view = Journal {
        tx: mpsc::channel(1).0,
        index_now: mpsc::channel(1).0,
        ..journal.clone()
    };
    tokio::spawn(listen(pool, view, journal.tx.downgrade()));
    Ok(journal)
}

impl Dialect for Pg {
    /// PostgreSQL, shared by replicas, one transaction: lock the heads rows and read them (one
    /// statement; the lock serialises the replicas' writers until commit, and the values read
    /// are the latest committed), look the keys up, assign sequences, write everything and
    /// queue the NOTIFYs in one statement, commit. Sequence order is commit order across
    /// replicas because the rows stay locked until the commit.
    async fn write(
        &mut self,
        last: &mut HashMap<&'static str, u64>,
        batch: &[Job],
        now: i64,
        range: Option<&mut CompactRange>,
    ) -> Result<Written> {
        let mut tx = self.pool.begin().await?;
        let before = last.clone();
        let result = async {
            let heads: Vec<(String, i64)> =
                sqlx::query_as("SELECT topic, head FROM journal_heads ORDER BY topic FOR UPDATE")
                    .fetch_all(&mut *tx)
                    .await?;
            for (t, h) in heads {
                if let Some(topic) = TOPICS.iter().find(|x| **x == t) {
                    last.insert(topic, h as u64);
                }
            }
            let known = known_keys!(&mut *tx, batch).await?;
            // Read under the heads lock: no other replica commits an answer meanwhile.
            let answered = known_answers!(&mut *tx, batch).await?;
            let stored = stored_requests!(&mut *tx, batch).await?;
            let planned = plan(last, batch, known, answered, now);
            planned.write_pg(&mut tx, &planned.closes(&stored)).await?;
            // The audit log's size row is locked after the heads rows, by every replica.
            let (records, at) = audit_records(batch, &planned.outcomes);
            let entries: Vec<BlockEntry> = records.iter().map(BlockEntry::of).collect();
            let mut indexes = vec![None; batch.len()];
            if let Some(range) = range
                && !records.is_empty()
            {
                let first = crate::audit::log::append_pg(&mut tx, range, records).await?;
                indexes = placed(batch.len(), first, at);
            }
            tx.commit().await?;
            Ok::<_, anyhow::Error>((planned.outcomes, indexes, entries))
        }
        .await;
        if result.is_err() {
            *last = before;
        }
        result
    }

    async fn prune(&mut self, cutoff: i64, holders: &[Holder]) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let n = prune_topics!(&mut *tx, true, cutoff, holders).await?;
        tx.commit().await?;
        Ok(n)
    }

    /// One statement: the rows deleted from the queue are the rows inserted. Replicas' passes
    /// skip each other's rows (`SKIP LOCKED`); a request a replica whose clock is behind
    /// queues later with a smaller id is simply moved by a later pass.
    async fn index_cases(&mut self, max: i64) -> Result<u64> {
        let moved = sqlx::query(
            "WITH moved AS (DELETE FROM journal_request_cases_pending WHERE event_id IN \
               (SELECT event_id FROM journal_request_cases_pending ORDER BY event_id LIMIT $1 FOR UPDATE SKIP LOCKED) \
               RETURNING case_reference, event_id) \
             INSERT INTO journal_request_cases (case_reference, event_id) \
             SELECT case_reference, event_id FROM moved ORDER BY 1, 2 \
             ON CONFLICT (case_reference, event_id) DO NOTHING",
        )
        .bind(max)
        .execute(&self.pool)
        .await?;
        Ok(moved.rows_affected())
    }
}

impl Plan<'_> {
    /// The `INSERT` of `n` events with placeholders numbered from 1.
    fn insert_sql(n: usize) -> String {
        let values: Vec<String> = (0..n)
            .map(|i| {
                let b = i * 9;
                let p: Vec<String> = (1..=9).map(|k| format!("${}", b + k)).collect();
                format!("({})", p.join(", "))
            })
            .collect();
        format!("INSERT INTO {EVENT_COLUMNS} VALUES {}", values.join(","))
    }

    /// The highest new sequence per topic of this batch.
    fn heads(&self) -> Vec<(&'static str, u64)> {
        let mut heads: Vec<(&'static str, u64)> = Vec::new();
        for r in &self.rows {
            match heads.iter_mut().find(|(t, _)| *t == r.topic) {
                Some(h) => h.1 = h.1.max(r.seq),
                None => heads.push((r.topic, r.seq)),
            }
        }
        heads
    }

    /// Writes the batch inside `tx` (which holds the `journal_heads` rows locked) and queues the
    /// NOTIFYs PostgreSQL delivers at commit.
    async fn write_pg(
        &self,
        tx: &mut sqlx::PgConnection,
        closes: &[Close],
    ) -> Result<(), sqlx::Error> {
        for (topic, group, seq) in &self.acks {
            sqlx::query(ACK_SQL)
                .bind(*topic)
                .bind(&group.agency)
                .bind(&group.name)
                .bind(*seq as i64)
                .execute(&mut *tx)
                .await?;
            sqlx::query("SELECT pg_notify($1, current_schema() || ' ' || $2)")
                .bind(JOURNAL_CHANNEL)
                .bind(format!("a {topic} {seq} {} {}", group.agency, group.name))
                .execute(&mut *tx)
                .await?;
        }
        for (topic, group, seq, reason) in &self.rejects {
            sqlx::query(REJECT_SQL)
                .bind(*topic)
                .bind(&group.agency)
                .bind(&group.name)
                .bind(*seq as i64)
                .bind(*reason)
                .bind(self.now)
                .execute(&mut *tx)
                .await?;
        }
        let opened = self.open_rows();
        for chunk in opened.chunks(OPENS_PER_INSERT) {
            let values: Vec<String> = (0..chunk.len())
                .map(|i| {
                    let p: Vec<String> = (1..=7).map(|k| format!("${}", 7 * i + k)).collect();
                    format!("({})", p.join(", "))
                })
                .collect();
            // Built only from constants and numbered placeholders.
            let sql = format!(
                "INSERT INTO {REQUEST_COLUMNS} VALUES {} ON CONFLICT (event_id) DO NOTHING",
                values.join(",")
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for r in chunk {
                q = q
                    .bind(r.event_id)
                    .bind(r.producer)
                    .bind(r.opens.kind)
                    .bind(r.opens.case_reference.as_str())
                    .bind(self.now)
                    .bind(r.due_at_ms)
                    .bind(r.steps.as_str());
            }
            q.execute(&mut *tx).await?;
        }
        for (asked, kind, event_id, _) in &self.answers {
            sqlx::query(ANSWER_SQL)
                .bind(*asked)
                .bind(*kind)
                .bind(event_id.as_str())
                .execute(&mut *tx)
                .await?;
        }
        for c in closes {
            sqlx::query(CLOSE_SQL)
                .bind(c.steps.as_str())
                .bind(c.due_at_ms)
                .bind(self.now)
                .bind(c.event_id.as_str())
                .execute(&mut *tx)
                .await?;
        }
        if self.rows.is_empty() {
            return Ok(());
        }
        // One statement: the events, the new heads, and the NOTIFYs sent at commit.
        let heads = self.heads();
        let n = self.rows.len() * 9;
        let head_values: Vec<String> = (0..heads.len())
            .map(|i| format!("(${}, ${})", n + 2 * i + 1, n + 2 * i + 2))
            .collect();
        let m = n + 2 * heads.len();
        let notifies: Vec<String> = (0..heads.len())
            .map(|i| {
                format!(
                    "pg_notify(${}, current_schema() || ' ' || ${})",
                    m + 2 * i + 1,
                    m + 2 * i + 2
                )
            })
            .collect();
        let sql = format!(
            "WITH e AS ({}), h AS (INSERT INTO journal_heads (topic, head) VALUES {} \
             ON CONFLICT (topic) DO UPDATE SET head = excluded.head) SELECT {}",
            Self::insert_sql(self.rows.len()),
            head_values.join(", "),
            notifies.join(", ")
        );
        // Built only from constants and numbered placeholders.
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for r in &self.rows {
            q = q
                .bind(r.topic)
                .bind(r.seq as i64)
                .bind(r.event_id.as_str())
                .bind(r.producer)
                .bind(r.key)
                .bind(r.payload)
                .bind(r.hash.as_slice())
                .bind(self.now)
                .bind(r.audience);
        }
        for (topic, seq) in &heads {
            q = q.bind(*topic).bind(*seq as i64);
        }
        for (topic, seq) in &heads {
            q = q.bind(JOURNAL_CHANNEL).bind(format!("h {topic} {seq}"));
        }
        q.execute(&mut *tx).await?;
        Ok(())
    }
}

/// The committed head of a topic in the shared database.
async fn pg_head(pool: &PgPool, topic: &str) -> Result<u64> {
    let head: Option<i64> = sqlx::query_scalar("SELECT head FROM journal_heads WHERE topic = $1")
        .bind(topic)
        .fetch_optional(pool)
        .await?;
    Ok(head.unwrap_or(0) as u64)
}

/// PostgreSQL: follows what other replicas commit (LISTEN), raising heads and acknowledgements
/// here so subscriptions on this replica wake within milliseconds. The table stays the truth:
/// after the listening connection is lost, and every second anyway, heads are read again.
async fn listen(pool: PgPool, journal: Journal, alive: mpsc::WeakSender<Job>) {
    let (p, j) = (pool.clone(), journal.clone());
    crate::store::follow(
        pool,
        JOURNAL_CHANNEL,
        || alive.upgrade().is_some(),
        |payload| apply_notification(&journal, payload),
        move || {
            let (p, j) = (p.clone(), j.clone());
            async move { resync(&p, &j).await }
        },
    )
    .await;
}

fn apply_notification(journal: &Journal, payload: &str) {
    let mut f = payload.splitn(5, ' ');
    match (
        f.next(),
        f.next(),
        f.next().and_then(|s| s.parse::<u64>().ok()),
        f.next(),
        f.next(),
    ) {
        (Some("h"), Some(topic), Some(seq), None, None) => journal.raise_head(topic, seq),
        (Some("a"), Some(topic), Some(seq), Some(agency), Some(group)) => {
            journal.raise_ack(topic, &Group::new(agency, group), seq)
        }
        _ => tracing::warn!(payload, "journal: unexpected notification"),
    }
}

async fn resync(pool: &PgPool, journal: &Journal) {
    for t in TOPICS {
        if let Ok(h) = pg_head(pool, t).await {
            journal.raise_head(t, h);
        }
    }
}
