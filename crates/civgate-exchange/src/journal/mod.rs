//! The journal: events per topic with gap-free sequences in commit order, idempotency on
//! (producer, idempotency key), consumer-group offsets. One writer task assigns sequences and
//! commits batches (SQLite WAL, synchronous FULL), so sequence order is commit order and a
//! reader that stops at the published head can never skip an event that committed late.

//!
//! Code map: this file is the handle every caller holds ([`Journal`]: publish, acknowledge,
//! reject, record); `read.rs` the reads (pages, status, backlog); `writer.rs` the writer task
//! and what it plans for a batch, whatever the store; `sqlite.rs` and `postgres.rs` the one
//! [`writer::Dialect`] each, with their schema upgrades and store-specific reads; `legacy.rs`
//! the adoption of what an earlier release stored.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Result;
use tokio::sync::{mpsc, oneshot, watch};

pub use super::address::{Group, Holder};
use super::validate::{CIVIL_STATUS, POPULATION, SOCIAL_INSURANCE};
use crate::audit::{AuditTail, Draft};
use crate::policy::Policy;
use crate::store::{Reader, Store};
use writer::{Dialect, Job, Writer};

mod legacy;
mod postgres;
mod read;
mod requests;
mod sqlite;
#[cfg(test)]
mod tests;
mod writer;

pub use read::PAGE_BYTES;
pub use requests::{OpenRequest, RequestFilter, RequestStats, quantile};
const TOPICS: [&str; 3] = [CIVIL_STATUS, POPULATION, SOCIAL_INSURANCE];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    pub event_id: String,
    pub topic: String,
    pub sequence: u64,
    pub recorded_at_ms: i64,
}

/// What an answer answers: the event it is `in_reply_to`, and its own kind (the payload's
/// name). A request has at most one answer of each kind, whoever publishes it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Answer {
    pub asked: String,
    pub kind: &'static str,
}

/// What a request opens when it is published: its kind and case, and one open request per
/// flow it matches (`cases::Flows::opened_by`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opens {
    pub kind: &'static str,
    pub case_reference: String,
    pub list: Vec<crate::cases::Opening>,
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("idempotency key already used for a different event (event {0})")]
    Conflict(String),
    #[error(
        "event {asked} already has its {kind} answer: event {by} (one answer of each kind per request)"
    )]
    Answered {
        asked: String,
        kind: &'static str,
        by: String,
    },
    #[error("journal cannot commit: {0}")]
    NotDurable(String),
    #[error("journal read failed: {0}")]
    Read(String),
}

/// What a publish came to: the receipt (or why there is none) and, when the journal committed
/// the call's audit record in the same transaction as the event, that record's index.
#[derive(Debug)]
pub struct Published {
    pub result: Result<Receipt, JournalError>,
    pub audit_index: Option<u64>,
}

impl JournalError {
    fn code(&self) -> tonic::Code {
        match self {
            JournalError::Conflict(_) | JournalError::Answered { .. } => tonic::Code::AlreadyExists,
            _ => tonic::Code::Unavailable,
        }
    }
}

impl From<JournalError> for tonic::Status {
    /// A store's own words (table names, constraint names, paths) are logged, never sent.
    fn from(e: JournalError) -> Self {
        let said = match &e {
            JournalError::Conflict(_) | JournalError::Answered { .. } => {
                return tonic::Status::new(e.code(), e.to_string());
            }
            JournalError::NotDurable(_) => "the journal cannot commit now; retry",
            JournalError::Read(_) => "the journal cannot be read now; retry",
        };
        tracing::error!(error = %e, "journal error answered UNAVAILABLE");
        tonic::Status::new(e.code(), said)
    }
}

/// A page of events read for a subscriber, and how far it looked: every event up to
/// `scanned_to` that the scope selects is in `events` (or was before it).
#[derive(Clone, Debug, Default)]
pub struct Page {
    pub events: Vec<Stored>,
    pub scanned_to: u64,
}

/// One stored event found by its id.
#[derive(Clone, Debug)]
pub struct Found {
    pub topic: String,
    pub seq: u64,
    pub producer: String,
    pub audience: Option<String>,
    pub payload: Vec<u8>,
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

/// Where one event stands for one consumer group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupState {
    Accepted,
    Delivered,
    Acknowledged,
    Rejected(String),
}

/// An event's status: (topic, sequence, producer, audience) and its state per consumer group
/// of the topic (every group: which of them it is addressed to is the caller's to decide).
#[derive(Clone, Debug)]
pub struct EventStatus {
    pub event_id: String,
    pub topic: String,
    pub seq: u64,
    pub producer: String,
    pub audience: Option<String>,
    pub groups: Vec<(Group, GroupState)>,
}

#[derive(Clone)]
pub struct Journal {
    tx: mpsc::Sender<Job>,
    /// Asks the writer for a pass of the case index now ([`Journal::index_cases`]).
    index_now: mpsc::Sender<writer::IndexNow>,
    reader: Reader,
    heads: Arc<HashMap<&'static str, watch::Sender<u64>>>,
    acks: Arc<Mutex<AckWatches>>,
    /// Highest sequence handed to each (topic, group) by a subscription since start
    /// (in memory: after a restart, "delivered" shows again once redelivered).
    delivered: Arc<Mutex<HashMap<(String, Group), u64>>>,
    /// Whose acknowledgements retention waits for, asked at each pass (none set: nobody's,
    /// so retention keeps everything).
    holders: Arc<Mutex<Option<HoldersFn>>>,
    /// The audit log's tail, whose commit timeout bounds every wait for a commit here (the
    /// journal and the audit log commit to one store).
    bound: Option<AuditTail>,
}

/// The holders under the configuration in force ([`address::holders`] of the current policy).
pub(crate) type HoldersFn = Arc<dyn Fn() -> Vec<Holder> + Send + Sync>;

/// Per (topic, consumer group): the acknowledged sequence, watched by its subscriptions.
type AckWatches = HashMap<(String, Group), watch::Sender<u64>>;

/// Raises a watched sequence to `seq` (never lowers it); watchers wake only if it grew.
fn raise(w: &watch::Sender<u64>, seq: u64) {
    w.send_if_modified(|v| {
        let grew = seq > *v;
        *v = (*v).max(seq);
        grew
    });
}
impl Journal {
    /// Opens the journal (SQLite: in `dir/civgate.sqlite`, beside the audit log). With a
    /// `retention`, events every consumer group of their topic has acknowledged are deleted
    /// once older than it (checked every minute); without, the journal keeps everything.
    ///
    /// With `audit` (the audit log's right edge), a publish that carries its call's audit draft
    /// is committed together with that record, in one transaction, and every journal write
    /// holds the tail's lock (on SQLite both write the one file).
    ///
    /// A store written by an earlier release is brought up to date first ([`adopt_legacy`]):
    /// its consumer groups are assigned to the agencies `policy` names for them (the open
    /// fails, saying what to add to the config, when one cannot be), and its population
    /// events are given their audiences.
    pub async fn open(
        store: &Store,
        retention: Option<Duration>,
        audit: Option<AuditTail>,
        policy: &Policy,
    ) -> Result<Self> {
        match store {
            Store::Sqlite(dir) => sqlite::open(dir, retention, audit, policy).await,
            Store::Postgres { url, pool_max } => {
                postgres::open(url, *pool_max, retention, audit, policy).await
            }
        }
    }

    /// Spawns the writer task; heads start at `last`.
    fn start<D: Dialect>(
        reader: Reader,
        conn: D,
        last: HashMap<&'static str, u64>,
        retention: Option<Duration>,
        audit: Option<AuditTail>,
    ) -> Self {
        let heads = last
            .iter()
            .map(|(t, h)| (*t, watch::channel(*h).0))
            .collect();
        let journal = Self {
            tx: mpsc::channel(1).0,
            index_now: mpsc::channel(1).0,
            reader,
            heads: Arc::new(heads),
            acks: Arc::new(Mutex::new(HashMap::new())),
            delivered: Arc::new(Mutex::new(HashMap::new())),
            holders: Arc::new(Mutex::new(None)),
            bound: audit.clone(),
        };
        let (tx, rx) = mpsc::channel(8_192);
        let (index_now, index_rx) = mpsc::channel(8);
        let writer = Writer {
            conn,
            last,
            journal: journal.clone(),
            audit,
            queued_cases: 0,
        };
        tokio::spawn(writer.run(rx, index_rx, retention));
        Self {
            tx,
            index_now,
            ..journal
        }
    }

    /// Moves the queued requests' cases into the case index now (the writer does every
    /// 10 s, or sooner under load, anyway); how many it moved. Lookups by case find a request before and after.
    pub async fn index_cases(&self) -> Result<u64, JournalError> {
        let (done, answer) = oneshot::channel();
        self.index_now
            .send(done)
            .await
            .map_err(|_| JournalError::NotDurable("the journal's writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| JournalError::NotDurable("the journal's writer has stopped".into()))?
    }

    /// Tells retention whose acknowledgements to wait for: `holders` is asked at each pass.
    pub fn retain_for(&self, holders: HoldersFn) {
        *self.holders.lock().unwrap_or_else(|p| p.into_inner()) = Some(holders);
    }

    /// The holders retention waits for now.
    pub fn holders(&self) -> Vec<Holder> {
        let f = self
            .holders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        f.map(|f| f()).unwrap_or_default()
    }

    /// Raises a topic's published head (never lowers it).
    fn raise_head(&self, topic: &str, seq: u64) {
        if let Some(h) = self.heads.get(topic) {
            raise(h, seq);
        }
    }

    /// Raises a group's acknowledged sequence as seen by its subscriptions here.
    fn raise_ack(&self, topic: &str, group: &Group, seq: u64) {
        let map = self.acks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = map.get(&(topic.to_owned(), group.clone())) {
            raise(tx, seq);
        }
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
        self.publish_audited(producer, key, topic, payload, None, None, None)
            .await
            .result
    }

    /// [`Journal::publish_audited`] for an event that may also be a request: the requests it
    /// `opens` (one per flow it matches, see `cases`) are recorded in the transaction that
    /// commits it, and an answer closes the request it answers in its own.
    #[allow(clippy::too_many_arguments)]
    pub async fn publish_tracked(
        &self,
        producer: &str,
        key: &str,
        topic: &'static str,
        payload: Vec<u8>,
        audience: Option<String>,
        answers: Option<Answer>,
        opens: Option<Opens>,
        audit: Option<Draft>,
    ) -> Published {
        let opens = opens.map(Box::new);
        let stopped = || Published {
            result: Err(JournalError::NotDurable("journal writer stopped".into())),
            audit_index: None,
        };
        let (done, wait) = oneshot::channel();
        let job = Job::Publish {
            producer: producer.into(),
            key: key.into(),
            topic,
            payload,
            audience,
            answers,
            opens,
            audit,
            done,
        };
        let answered = self.bounded(async {
            if self.tx.send(job).await.is_err() {
                return stopped();
            }
            wait.await.unwrap_or_else(|_| stopped())
        });
        answered.await.unwrap_or_else(|stalled| Published {
            result: Err(stalled),
            audit_index: None,
        })
    }

    /// Publishes, and — given the call's audit `draft` and an audit log — commits the call's
    /// audit record (finished with the outcome) in the same transaction as the event: one
    /// durable commit for both instead of two in turn. An event that `answers` another is
    /// refused ([`JournalError::Answered`]) when that one already has an answer of its kind;
    /// a retry of the same publish (same key and payload) still gets its receipt.
    #[allow(clippy::too_many_arguments)]
    pub async fn publish_audited(
        &self,
        producer: &str,
        key: &str,
        topic: &'static str,
        payload: Vec<u8>,
        audience: Option<String>,
        answers: Option<Answer>,
        audit: Option<Draft>,
    ) -> Published {
        self.publish_tracked(
            producer, key, topic, payload, audience, answers, None, audit,
        )
        .await
    }

    /// Waits for a commit's answer at most the store's commit timeout (when an audit log
    /// gives one); past it the store is taken as stalled (see [`AuditTail::bounded`]).
    async fn bounded<T>(&self, answer: impl Future<Output = T>) -> Result<T, JournalError> {
        match &self.bound {
            None => Ok(answer.await),
            Some(tail) => tail
                .bounded(answer)
                .await
                .map_err(|e| JournalError::NotDurable(e.to_string())),
        }
    }

    /// Cumulative acknowledgement, durable when this returns.
    pub async fn ack(&self, topic: &str, group: &Group, seq: u64) -> Result<(), JournalError> {
        self.ack_audited(topic, group, seq, None).await.map(drop)
    }

    /// [`ack`](Self::ack), committing the call's audit record (given its `draft` and an audit
    /// log) in the same transaction; returns the record's index.
    pub async fn ack_audited(
        &self,
        topic: &str,
        group: &Group,
        seq: u64,
        audit: Option<Draft>,
    ) -> Result<Option<u64>, JournalError> {
        self.request(|done| Job::Ack {
            topic: topic.into(),
            group: group.clone(),
            seq,
            audit,
            done,
        })
        .await
    }

    /// Moves one event to the dead-letter list of a group, with the consumer's reason.
    pub async fn reject(
        &self,
        topic: &str,
        group: &Group,
        seq: u64,
        reason: &str,
    ) -> Result<(), JournalError> {
        self.reject_audited(topic, group, seq, reason, None)
            .await
            .map(drop)
    }

    /// [`reject`](Self::reject), committing the call's audit record in the same transaction.
    pub async fn reject_audited(
        &self,
        topic: &str,
        group: &Group,
        seq: u64,
        reason: &str,
        audit: Option<Draft>,
    ) -> Result<Option<u64>, JournalError> {
        self.request(|done| Job::Reject {
            topic: topic.into(),
            group: group.clone(),
            seq,
            reason: reason.into(),
            audit,
            done,
        })
        .await
    }

    /// Commits an audit record that goes with no journal write (a subscription's delivery),
    /// in the writer's next transaction; returns its index once it is durable. `None` when
    /// the journal has no audit log to write to.
    pub async fn record(&self, audit: Draft, detail: String) -> Result<Option<u64>, JournalError> {
        self.request(|done| Job::Record {
            audit,
            detail,
            done,
        })
        .await
    }

    /// Hands the writer the job `make` builds around its reply channel, and waits for the
    /// reply.
    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, JournalError>>) -> Job,
    ) -> Result<T, JournalError> {
        let stopped = || JournalError::NotDurable("journal writer stopped".into());
        let (done, wait) = oneshot::channel();
        self.bounded(async {
            self.tx.send(make(done)).await.map_err(|_| stopped())?;
            wait.await.map_err(|_| stopped())?
        })
        .await?
    }

    /// Notes that a subscription handed `seq` to `group`.
    pub fn delivered(&self, topic: &str, group: &Group, seq: u64) {
        let mut map = self.delivered.lock().unwrap_or_else(|p| p.into_inner());
        let v = map.entry((topic.to_owned(), group.clone())).or_insert(0);
        *v = (*v).max(seq);
    }
}
