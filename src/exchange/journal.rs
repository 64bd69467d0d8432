//! The journal: events per topic with gap-free sequences in commit order, idempotency on
//! (producer, idempotency key), consumer-group offsets. One writer task assigns sequences and
//! commits batches (SQLite WAL, synchronous FULL), so sequence order is commit order and a
//! reader that stops at the published head can never skip an event that committed late.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use sqlx::{Connection, Row, SqliteConnection, SqlitePool, sqlite::SqlitePoolOptions};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::error;

use super::validate::{CIVIL_STATUS, POPULATION};

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
    PRIMARY KEY (topic, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS journal_idempotency ON journal_events (producer, idempotency_key);
CREATE TABLE IF NOT EXISTS journal_rejections (
    topic TEXT NOT NULL,
    grp TEXT NOT NULL,
    seq INTEGER NOT NULL,
    reason TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    PRIMARY KEY (topic, seq, grp)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS journal_heads (
    topic TEXT PRIMARY KEY,
    head INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS journal_groups (
    topic TEXT NOT NULL,
    grp TEXT NOT NULL,
    acked INTEGER NOT NULL,
    PRIMARY KEY (topic, grp)
) WITHOUT ROWID;
";

const TOPICS: [&str; 2] = [CIVIL_STATUS, POPULATION];

/// Retention: events recorded before ?1 that every group of their topic has acknowledged.
const PRUNE: &str = "DELETE FROM journal_events WHERE recorded_at_ms < ?1 AND seq <= \
     (SELECT min(acked) FROM journal_groups g WHERE g.topic = journal_events.topic)";
const MAX_BATCH: usize = 1_024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    pub event_id: String,
    pub topic: String,
    pub sequence: u64,
    pub recorded_at_ms: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("idempotency key already used for a different event (event {0})")]
    Conflict(String),
    #[error("journal cannot commit: {0}")]
    NotDurable(String),
    #[error("journal read failed: {0}")]
    Read(String),
}

impl From<JournalError> for tonic::Status {
    fn from(e: JournalError) -> Self {
        match e {
            JournalError::Conflict(_) => tonic::Status::already_exists(e.to_string()),
            _ => tonic::Status::unavailable(e.to_string()),
        }
    }
}

/// One stored event.
#[derive(Clone, Debug)]
pub struct Stored {
    pub seq: u64,
    pub event_id: String,
    pub producer: String,
    pub payload: Vec<u8>,
    pub recorded_at_ms: i64,
}

enum Job {
    Publish {
        producer: String,
        key: String,
        topic: &'static str,
        payload: Vec<u8>,
        done: oneshot::Sender<Result<Receipt, JournalError>>,
    },
    Ack {
        topic: String,
        group: String,
        seq: u64,
        done: oneshot::Sender<Result<(), JournalError>>,
    },
    Reject {
        topic: String,
        group: String,
        seq: u64,
        reason: String,
        done: oneshot::Sender<Result<(), JournalError>>,
    },
}

/// Where one event stands for one consumer group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupState {
    Accepted,
    Delivered,
    Acknowledged,
    Rejected(String),
}

/// An event's status: (topic, sequence, producer) and its state per consumer group.
#[derive(Clone, Debug)]
pub struct EventStatus {
    pub event_id: String,
    pub topic: String,
    pub seq: u64,
    pub producer: String,
    pub groups: Vec<(String, GroupState)>,
}

#[derive(Clone)]
pub struct Journal {
    tx: mpsc::Sender<Job>,
    reader: SqlitePool,
    heads: Arc<HashMap<&'static str, watch::Sender<u64>>>,
    acks: Arc<Mutex<AckWatches>>,
    /// Highest sequence handed to each (topic, group) by a subscription since start
    /// (in memory: after a restart, "delivered" shows again once redelivered).
    delivered: Arc<Mutex<HashMap<(String, String), u64>>>,
}

/// Per (topic, consumer group): the acknowledged sequence, watched by its subscriptions.
type AckWatches = HashMap<(String, String), watch::Sender<u64>>;

impl Journal {
    /// Opens `dir/journal.sqlite`. With a `retention`, events every consumer group of their
    /// topic has acknowledged are deleted once older than it (checked every minute); without,
    /// the journal keeps everything.
    pub async fn open(dir: &Path, retention: Option<Duration>) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("journal.sqlite");
        let mut conn =
            SqliteConnection::connect_with(&crate::sqlite::options(&path, Duration::from_secs(2))?)
                .await?;
        sqlx::raw_sql(SCHEMA).execute(&mut conn).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(crate::sqlite::options(&path, Duration::from_secs(2))?.read_only(true))
            .await?;
        let mut heads = HashMap::new();
        let mut last = HashMap::new();
        for t in TOPICS {
            // The stored head survives retention deleting every event of a topic.
            let max: Option<i64> = sqlx::query_scalar(
                "SELECT max(h) FROM (SELECT max(seq) AS h FROM journal_events WHERE topic = ?1 \
                 UNION ALL SELECT head FROM journal_heads WHERE topic = ?1)",
            )
            .bind(t)
            .fetch_one(&mut conn)
            .await?;
            let head = max.unwrap_or(0) as u64;
            heads.insert(t, watch::channel(head).0);
            last.insert(t, head);
        }
        let journal = Self {
            tx: mpsc::channel(1).0,
            reader,
            heads: Arc::new(heads),
            acks: Arc::new(Mutex::new(HashMap::new())),
            delivered: Arc::new(Mutex::new(HashMap::new())),
        };
        let (tx, rx) = mpsc::channel(8_192);
        let writer = Writer {
            conn,
            last,
            journal: journal.clone(),
        };
        tokio::spawn(writer.run(rx, retention));
        Ok(Self { tx, ..journal })
    }

    /// Appends an event; the receipt comes once it is durable. A retry with the same
    /// (producer, key) and the same payload gets the original receipt.
    pub async fn publish(
        &self,
        producer: &str,
        key: &str,
        topic: &'static str,
        payload: Vec<u8>,
    ) -> Result<Receipt, JournalError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Job::Publish {
                producer: producer.into(),
                key: key.into(),
                topic,
                payload,
                done,
            })
            .await
            .map_err(|_| JournalError::NotDurable("journal writer stopped".into()))?;
        wait.await
            .map_err(|_| JournalError::NotDurable("journal writer stopped".into()))?
    }

    /// Cumulative acknowledgement, durable when this returns.
    pub async fn ack(&self, topic: &str, group: &str, seq: u64) -> Result<(), JournalError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Job::Ack {
                topic: topic.into(),
                group: group.into(),
                seq,
                done,
            })
            .await
            .map_err(|_| JournalError::NotDurable("journal writer stopped".into()))?;
        wait.await
            .map_err(|_| JournalError::NotDurable("journal writer stopped".into()))?
    }

    /// Moves one event to the dead-letter list of a group, with the consumer's reason.
    pub async fn reject(
        &self,
        topic: &str,
        group: &str,
        seq: u64,
        reason: &str,
    ) -> Result<(), JournalError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Job::Reject {
                topic: topic.into(),
                group: group.into(),
                seq,
                reason: reason.into(),
                done,
            })
            .await
            .map_err(|_| JournalError::NotDurable("journal writer stopped".into()))?;
        wait.await
            .map_err(|_| JournalError::NotDurable("journal writer stopped".into()))?
    }

    /// Notes that a subscription handed `seq` to `group`.
    pub fn delivered(&self, topic: &str, group: &str, seq: u64) {
        let mut map = self.delivered.lock().unwrap_or_else(|p| p.into_inner());
        let v = map.entry((topic.to_owned(), group.to_owned())).or_insert(0);
        *v = (*v).max(seq);
    }

    /// Accepted / delivered / acknowledged / rejected, per consumer group known for the topic.
    pub async fn status(&self, event_id: &str) -> Result<Option<EventStatus>, JournalError> {
        let read = |e: sqlx::Error| JournalError::Read(e.to_string());
        let Some(row) =
            sqlx::query("SELECT topic, seq, producer FROM journal_events WHERE event_id = ?")
                .bind(event_id)
                .fetch_optional(&self.reader)
                .await
                .map_err(read)?
        else {
            return Ok(None);
        };
        let topic: String = row.try_get(0).map_err(read)?;
        let seq = row.try_get::<i64, _>(1).map_err(read)? as u64;
        let producer: String = row.try_get(2).map_err(read)?;
        let mut groups: std::collections::BTreeMap<String, GroupState> =
            std::collections::BTreeMap::new();
        for r in sqlx::query("SELECT grp, acked FROM journal_groups WHERE topic = ?")
            .bind(&topic)
            .fetch_all(&self.reader)
            .await
            .map_err(read)?
        {
            let grp: String = r.try_get(0).map_err(read)?;
            let acked = r.try_get::<i64, _>(1).map_err(read)? as u64;
            let state = if acked >= seq {
                GroupState::Acknowledged
            } else {
                GroupState::Accepted
            };
            groups.insert(grp, state);
        }
        for ((t, g), d) in self
            .delivered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            if *t == topic {
                let e = groups.entry(g.clone()).or_insert(GroupState::Accepted);
                if *e == GroupState::Accepted && *d >= seq {
                    *e = GroupState::Delivered;
                }
            }
        }
        for r in
            sqlx::query("SELECT grp, reason FROM journal_rejections WHERE topic = ? AND seq = ?")
                .bind(&topic)
                .bind(seq as i64)
                .fetch_all(&self.reader)
                .await
                .map_err(read)?
        {
            groups.insert(
                r.try_get(0).map_err(read)?,
                GroupState::Rejected(r.try_get(1).map_err(read)?),
            );
        }
        Ok(Some(EventStatus {
            event_id: event_id.to_owned(),
            topic,
            seq,
            producer,
            groups: groups.into_iter().collect(),
        }))
    }

    /// The highest committed sequence of a topic, as it changes.
    pub fn head(&self, topic: &str) -> Option<watch::Receiver<u64>> {
        self.heads.get(topic).map(watch::Sender::subscribe)
    }

    /// A group's acknowledged sequence, as it changes (starting from the stored one).
    pub async fn acked(
        &self,
        topic: &str,
        group: &str,
    ) -> Result<watch::Receiver<u64>, JournalError> {
        let key = (topic.to_owned(), group.to_owned());
        if let Some(tx) = self
            .acks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Ok(tx.subscribe());
        }
        let stored: Option<i64> =
            sqlx::query_scalar("SELECT acked FROM journal_groups WHERE topic = ? AND grp = ?")
                .bind(topic)
                .bind(group)
                .fetch_optional(&self.reader)
                .await
                .map_err(|e| JournalError::Read(e.to_string()))?;
        let mut map = self.acks.lock().unwrap_or_else(|p| p.into_inner());
        let tx = map
            .entry(key)
            .or_insert_with(|| watch::channel(stored.unwrap_or(0) as u64).0);
        Ok(tx.subscribe())
    }

    /// Events `from..=to` of a topic, at most `limit`.
    pub async fn read(
        &self,
        topic: &str,
        from: u64,
        to: u64,
        limit: u32,
    ) -> Result<Vec<Stored>, JournalError> {
        let rows = sqlx::query(
            "SELECT seq, event_id, producer, payload, recorded_at_ms FROM journal_events \
             WHERE topic = ? AND seq >= ? AND seq <= ? ORDER BY seq LIMIT ?",
        )
        .bind(topic)
        .bind(from as i64)
        .bind(to as i64)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await
        .map_err(|e| JournalError::Read(e.to_string()))?;
        rows.iter()
            .map(|r| {
                Ok(Stored {
                    seq: r.try_get::<i64, _>(0)? as u64,
                    event_id: r.try_get(1)?,
                    producer: r.try_get(2)?,
                    payload: r.try_get(3)?,
                    recorded_at_ms: r.try_get(4)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(|e| JournalError::Read(e.to_string()))
    }
}

struct Writer {
    conn: SqliteConnection,
    last: HashMap<&'static str, u64>,
    journal: Journal,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Job>, retention: Option<Duration>) {
        let mut prune = tokio::time::interval(Duration::from_secs(60));
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                first = rx.recv() => {
                    let Some(first) = first else { break };
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(j) => batch.push(j),
                            Err(_) => break,
                        }
                    }
                    self.commit(batch).await;
                }
                _ = prune.tick(), if retention.is_some() => {
                    if let Some(r) = retention
                        && let Err(e) = self.prune(r).await
                    {
                        error!(error = %e, "journal retention failed");
                    }
                }
            }
        }
    }

    /// Deletes events older than `retention` that every group of their topic acknowledged.
    /// A topic nobody consumes keeps everything.
    async fn prune(&mut self, retention: Duration) -> Result<u64> {
        let cutoff = crate::audit::log::now_ms() - retention.as_millis() as i64;
        let done = sqlx::query(PRUNE)
            .bind(cutoff)
            .execute(&mut self.conn)
            .await?
            .rows_affected();
        if done > 0 {
            tracing::info!(
                deleted = done,
                "journal retention: acknowledged events removed"
            );
        }
        Ok(done)
    }

    async fn commit(&mut self, batch: Vec<Job>) {
        let before = self.last.clone();
        let started = std::time::Instant::now();
        let result = self.write(&batch).await;
        crate::telemetry::store_commit("journal", batch.len(), started.elapsed());
        match result {
            Ok(outcomes) => {
                for (t, seq) in &self.last {
                    if let Some(h) = self.journal.heads.get(t) {
                        h.send_if_modified(|v| std::mem::replace(v, *seq) != *seq);
                    }
                }
                for (job, outcome) in batch.into_iter().zip(outcomes) {
                    match (job, outcome) {
                        (Job::Publish { done, .. }, Outcome::Published(r)) => {
                            let _ = done.send(r);
                        }
                        (Job::Reject { done, .. }, Outcome::Acked) => {
                            let _ = done.send(Ok(()));
                        }
                        (
                            Job::Ack {
                                topic,
                                group,
                                seq,
                                done,
                            },
                            Outcome::Acked,
                        ) => {
                            let map = self.journal.acks.lock().unwrap_or_else(|p| p.into_inner());
                            if let Some(tx) = map.get(&(topic, group)) {
                                tx.send_if_modified(|v| {
                                    let grew = seq > *v;
                                    *v = (*v).max(seq);
                                    grew
                                });
                            }
                            let _ = done.send(Ok(()));
                        }
                        // Each job yields the outcome of its own kind.
                        _ => {}
                    }
                }
            }
            Err(e) => {
                self.last = before;
                error!(error = %e, "journal commit failed");
                for job in batch {
                    let err = || JournalError::NotDurable(e.to_string());
                    match job {
                        Job::Publish { done, .. } => {
                            let _ = done.send(Err(err()));
                        }
                        Job::Ack { done, .. } | Job::Reject { done, .. } => {
                            let _ = done.send(Err(err()));
                        }
                    }
                }
            }
        }
    }

    /// Commits one batch. The common case — no idempotency key of the batch has been seen
    /// before — is one round trip: sequences are assigned and everything is written in one
    /// transaction. A retried key makes that insert fail on the idempotency index; the batch
    /// is then rolled back, the keys are looked up, and the batch is planned again knowing them.
    async fn write(&mut self, batch: &[Job]) -> Result<Vec<Outcome>> {
        let now = crate::audit::log::now_ms();
        let before = self.last.clone();
        let (statements, outcomes) = self.plan(batch, HashMap::new(), now)?;
        match statements.commit(&mut self.conn).await {
            Ok(()) => return Ok(outcomes),
            Err(e) if crate::sqlite::is_unique_violation(&e) => self.last = before,
            Err(e) => return Err(e.into()),
        }
        let known = self.known(batch).await?;
        let (statements, outcomes) = self.plan(batch, known, now)?;
        statements.commit(&mut self.conn).await?;
        Ok(outcomes)
    }

    /// The stored (payload hash, receipt) of each (producer, key) of the batch already in the
    /// journal: one query per 400 keys.
    async fn known(&mut self, batch: &[Job]) -> Result<Known> {
        let keys: Vec<(&str, &str)> = batch
            .iter()
            .filter_map(|j| match j {
                Job::Publish { producer, key, .. } => Some((producer.as_str(), key.as_str())),
                _ => None,
            })
            .collect();
        let mut known = Known::new();
        for chunk in keys.chunks(400) {
            let sql = format!(
                "SELECT producer, idempotency_key, payload_hash, event_id, topic, seq, recorded_at_ms \
                 FROM journal_events WHERE (producer, idempotency_key) IN (VALUES {})",
                vec!["(?, ?)"; chunk.len()].join(",")
            );
            // Built only from constants and `?` placeholders.
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (p, k) in chunk {
                q = q.bind(*p).bind(*k);
            }
            for r in q.fetch_all(&mut self.conn).await? {
                known.insert(
                    (r.try_get(0)?, r.try_get(1)?),
                    (
                        r.try_get(2)?,
                        Receipt {
                            event_id: r.try_get(3)?,
                            topic: r.try_get(4)?,
                            sequence: r.try_get::<i64, _>(5)? as u64,
                            recorded_at_ms: r.try_get(6)?,
                        },
                    ),
                );
            }
        }
        Ok(known)
    }

    /// Assigns sequences to the new events of `batch` (those whose key is not in `known`, nor
    /// earlier in the batch) and returns the statements that store them, with each job's
    /// outcome.
    fn plan(
        &mut self,
        batch: &[Job],
        mut known: Known,
        now: i64,
    ) -> Result<(crate::sqlite::Batch, Vec<Outcome>), sqlx::Error> {
        let mut b = crate::sqlite::Batch::new();
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut rows: Vec<NewRow<'_>> = Vec::new();
        for job in batch {
            match job {
                Job::Publish {
                    producer,
                    key,
                    topic,
                    payload,
                    ..
                } => {
                    let hash: Vec<u8> = Sha256::digest(payload).to_vec();
                    let k = (producer.clone(), key.clone());
                    if let Some((h, receipt)) = known.get(&k) {
                        outcomes.push(Outcome::Published(if *h == hash {
                            Ok(receipt.clone())
                        } else {
                            Err(JournalError::Conflict(receipt.event_id.clone()))
                        }));
                        continue;
                    }
                    let seq = self.last.get(topic).copied().unwrap_or(0) + 1;
                    self.last.insert(topic, seq);
                    // Time-ordered (UUIDv7): new ids land at the right edge of the unique
                    // index instead of dirtying a random page of it per event.
                    let event_id = uuid::Uuid::now_v7().simple().to_string();
                    let receipt = Receipt {
                        event_id: event_id.clone(),
                        topic: (*topic).to_owned(),
                        sequence: seq,
                        recorded_at_ms: now,
                    };
                    known.insert(k, (hash.clone(), receipt.clone()));
                    rows.push((topic, seq, event_id, producer, key, payload, hash));
                    outcomes.push(Outcome::Published(Ok(receipt)));
                }
                Job::Ack {
                    topic, group, seq, ..
                } => {
                    b.statement(
                        "INSERT INTO journal_groups (topic, grp, acked) VALUES (?, ?, ?) \
                         ON CONFLICT (topic, grp) DO UPDATE SET acked = max(acked, excluded.acked)",
                    );
                    b.bind(topic.as_str())?
                        .bind(group.as_str())?
                        .bind(*seq as i64)?;
                    outcomes.push(Outcome::Acked);
                }
                Job::Reject {
                    topic,
                    group,
                    seq,
                    reason,
                    ..
                } => {
                    b.statement(
                        "INSERT INTO journal_rejections (topic, grp, seq, reason, at_ms) VALUES (?, ?, ?, ?, ?) \
                         ON CONFLICT (topic, seq, grp) DO UPDATE SET reason = excluded.reason, at_ms = excluded.at_ms",
                    );
                    b.bind(topic.as_str())?
                        .bind(group.as_str())?
                        .bind(*seq as i64)?
                        .bind(reason.as_str())?
                        .bind(now)?;
                    outcomes.push(Outcome::Acked);
                }
            }
        }
        for chunk in rows.chunks(100) {
            b.statement(&format!(
                "INSERT INTO journal_events (topic, seq, event_id, producer, idempotency_key, payload, payload_hash, recorded_at_ms) VALUES {}",
                vec!["(?, ?, ?, ?, ?, ?, ?, ?)"; chunk.len()].join(",")
            ));
            for (topic, seq, event_id, producer, key, payload, hash) in chunk {
                b.bind(*topic)?
                    .bind(*seq as i64)?
                    .bind(event_id.as_str())?
                    .bind(*producer)?
                    .bind(*key)?
                    .bind(*payload)?
                    .bind(hash.as_slice())?
                    .bind(now)?;
            }
        }
        if !rows.is_empty() {
            for (topic, head) in &self.last {
                b.statement(
                    "INSERT INTO journal_heads (topic, head) VALUES (?, ?) \
                     ON CONFLICT (topic) DO UPDATE SET head = excluded.head",
                );
                b.bind(*topic)?.bind(*head as i64)?;
            }
        }
        Ok((b, outcomes))
    }
}

/// (producer, idempotency key) → (payload hash, receipt) of events already stored.
type Known = HashMap<(String, String), (Vec<u8>, Receipt)>;

/// An event to insert: topic, sequence, event id, producer, key, payload, payload hash.
type NewRow<'a> = (
    &'static str,
    u64,
    String,
    &'a str,
    &'a str,
    &'a [u8],
    Vec<u8>,
);

enum Outcome {
    Published(Result<Receipt, JournalError>),
    Acked,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn publish_ack_and_retention_keep_what_a_group_still_needs() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path(), None).await.unwrap();
        for i in 0..5 {
            let r = j
                .publish("population", &format!("k{i}"), POPULATION, vec![i])
                .await
                .unwrap();
            assert_eq!(r.sequence, u64::from(i) + 1);
        }
        j.ack(POPULATION, "a", 4).await.unwrap();
        j.ack(POPULATION, "b", 2).await.unwrap();
        let mut conn = SqliteConnection::connect(&format!(
            "sqlite://{}",
            dir.path().join("journal.sqlite").display()
        ))
        .await
        .unwrap();
        // Everything is old enough; only what both groups acknowledged goes.
        let deleted = sqlx::query(PRUNE)
            .bind(i64::MAX)
            .execute(&mut conn)
            .await
            .unwrap()
            .rows_affected();
        assert_eq!(deleted, 2);
        let left: Vec<i64> = sqlx::query_scalar("SELECT seq FROM journal_events ORDER BY seq")
            .fetch_all(&mut conn)
            .await
            .unwrap();
        assert_eq!(left, vec![3, 4, 5]);
        // Nothing is deleted before it is old enough.
        assert_eq!(
            sqlx::query(PRUNE)
                .bind(0i64)
                .execute(&mut conn)
                .await
                .unwrap()
                .rows_affected(),
            0
        );
        // New events continue the sequence.
        assert_eq!(
            j.publish("population", "k9", POPULATION, vec![9])
                .await
                .unwrap()
                .sequence,
            6
        );
        // ...also after retention removed every event and a restart.
        sqlx::query("DELETE FROM journal_events")
            .execute(&mut conn)
            .await
            .unwrap();
        drop(j);
        let j = Journal::open(dir.path(), None).await.unwrap();
        let r = j
            .publish("population", "k10", POPULATION, vec![10])
            .await
            .unwrap();
        assert_eq!(r.sequence, 7);
    }
}
