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
use sqlx::{Connection, PgPool, SqliteConnection, sqlite::SqlitePoolOptions};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::error;

pub use super::address::{Group, Holder};
use super::{
    address,
    validate::{CIVIL_STATUS, POPULATION},
};
use crate::audit::{AuditTail, Draft, merkle::CompactRange, subjects::BlockEntry};
use crate::pb::v1::AuditRecord;
use crate::policy::Policy;
use crate::store::{JOURNAL_CHANNEL, Reader, Store, drain, with_reader};

/// The query of a page of events, one row each: topic `$1`, sequences `$2..=$3`, at most `$4`;
/// a payload larger than `$5` bytes comes as NULL (`octet_length` reads a size, not the bytes)
/// and is read on its own ([`Journal::read`]). With `scope` tokens (`$6`…), only the events
/// whose audience holds one of them ([`address::matches`], in SQL: `instr` on SQLite, `strpos`
/// on PostgreSQL). Built only from constants and numbered placeholders.
fn page_rows(pg: bool, scope: usize) -> String {
    format!(
        "SELECT seq, event_id, producer, \
           CASE WHEN octet_length(payload) <= $5 THEN payload END AS payload, recorded_at_ms \
         FROM journal_events WHERE topic = $1 AND seq >= $2 AND seq <= $3{} ORDER BY seq LIMIT $4",
        scope_filter(pg, scope, 6)
    )
}

/// ` AND (audience holds $first or $first+1 …)` for `n` scope tokens; empty for none (every
/// event of the topic).
fn scope_filter(pg: bool, n: usize, first: usize) -> String {
    if n == 0 {
        return String::new();
    }
    format!(" AND {}", scope_expr(pg, n, first))
}

/// `(audience holds $first or $first+1 …)`, `n` ≥ 1 tokens.
fn scope_expr(pg: bool, n: usize, first: usize) -> String {
    let f = if pg { "strpos" } else { "instr" };
    let any: Vec<String> = (0..n)
        .map(|i| format!("{f}(audience, ${}) > 0", first + i))
        .collect();
    format!("({})", any.join(" OR "))
}

/// Most payload bytes a page of [`Journal::read`] starts with: a page holds at most this plus
/// one payload (a message is at most `limits.max_message_bytes`, 4 MiB by default), instead
/// of up to 256 such payloads.
pub const PAGE_BYTES: usize = 4 << 20;

/// Payloads up to this size come with their page's query (256 of them make 16 MiB at most); a
/// larger one is read on its own, only while the page is below [`PAGE_BYTES`].
const INLINE_PAYLOAD: i64 = 64 << 10;

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

/// Brings what an earlier release wrote up to this release's rules, in the caller's
/// transaction (`$conn`: a `&mut` SQLite or PostgreSQL connection):
/// - consumer groups and rejections without an owner (`agency = ''`) are given the agency the
///   policy names for them ([`crate::policy::owner_of_legacy_group`]); if any cannot be, the
///   open fails with what to add to the config, and nothing is changed;
/// - population events without an audience are given theirs ([`address::audience_of`]; an
///   answer goes to the producer of the event it answers, found through `in_reply_to` or the
///   old `birth_event_id`, or by province when that event is gone).
macro_rules! adopt_legacy {
    ($conn:expr, $policy:expr) => {
        async {
            let policy: &Policy = $policy;
            let legacy: Vec<(String, String)> = sqlx::query_as(
                "SELECT topic, grp FROM journal_groups WHERE agency = '' \
                 UNION SELECT topic, grp FROM journal_rejections WHERE agency = ''",
            )
            .fetch_all(&mut *$conn)
            .await?;
            let mut problems = Vec::new();
            let mut owners = Vec::new();
            for (topic, grp) in legacy {
                match crate::policy::owner_of_legacy_group(policy, &topic, &grp) {
                    Ok(a) => owners.push((topic, grp, a)),
                    Err(e) => problems.push(e),
                }
            }
            anyhow::ensure!(
                problems.is_empty(),
                "the journal cannot be opened until its consumer groups have owners:\n  {}",
                problems.join("\n  ")
            );
            for (topic, grp, agency) in &owners {
                sqlx::query("UPDATE journal_groups SET agency = $1 WHERE topic = $2 AND grp = $3 AND agency = ''")
                    .bind(agency.as_str())
                    .bind(topic)
                    .bind(grp)
                    .execute(&mut *$conn)
                    .await?;
                sqlx::query("UPDATE journal_rejections SET agency = $1 WHERE topic = $2 AND grp = $3 AND agency = ''")
                    .bind(agency.as_str())
                    .bind(topic)
                    .bind(grp)
                    .execute(&mut *$conn)
                    .await?;
                tracing::info!(topic, group = grp.as_str(), agency = agency.as_str(), "consumer group of an earlier release assigned to its agency");
            }
            let unaddressed: Vec<(i64, Vec<u8>)> = sqlx::query_as(
                "SELECT seq, payload FROM journal_events \
                 WHERE topic = 'population' AND audience IS NULL ORDER BY seq",
            )
            .fetch_all(&mut *$conn)
            .await?;
            let n = unaddressed.len();
            for (seq, payload) in unaddressed {
                let event = <crate::pb::v1::Event as prost::Message>::decode(payload.as_slice()).ok();
                let mut answered_producer = None;
                if let Some(id) = event.as_ref().and_then(address::answered) {
                    answered_producer = sqlx::query_scalar::<_, String>(
                        "SELECT producer FROM journal_events WHERE event_id = $1",
                    )
                    .bind(id)
                    .fetch_optional(&mut *$conn)
                    .await?;
                }
                // An event that does not decode is kept from everyone.
                let audience = event
                    .as_ref()
                    .and_then(|e| e.payload.as_ref())
                    .and_then(|p| address::audience_of(p, answered_producer.as_deref()))
                    .unwrap_or_else(|| " ".to_owned());
                sqlx::query("UPDATE journal_events SET audience = $1 WHERE topic = 'population' AND seq = $2")
                    .bind(audience)
                    .bind(seq)
                    .execute(&mut *$conn)
                    .await?;
            }
            if n > 0 {
                tracing::info!(events = n, "population events of an earlier release addressed");
            }
            Ok::<_, anyhow::Error>(())
        }
    };
}

const TOPICS: [&str; 2] = [CIVIL_STATUS, POPULATION];

/// Retention of one topic: events recorded before `$2`, addressed to at least one holder, that
/// no holder still needs. Holder `i` binds its acknowledged sequence and then its scope's
/// tokens (`scopes[i]` of them; none: it reads every event of the topic); it needs an event
/// after its acknowledgement that is addressed to it. An event addressed to no holder (a
/// province no registry covers now, say while an agency is out of the config) is kept, and so
/// is a population event without an audience (`instr` of NULL).
fn prune_sql(pg: bool, scopes: &[usize]) -> String {
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
            let holders: &[Holder] = $holders;
            let mut deleted = 0u64;
            for topic in TOPICS {
                let mine: Vec<&Holder> = holders.iter().filter(|h| h.topic == topic).collect();
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
                let mut q = sqlx::query(sqlx::AssertSqlSafe(prune_sql($pg, &scopes)))
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
            JournalError::Conflict(_) => tonic::Code::AlreadyExists,
            _ => tonic::Code::Unavailable,
        }
    }
}

impl From<JournalError> for tonic::Status {
    /// A store's own words (table names, constraint names, paths) are logged, never sent.
    fn from(e: JournalError) -> Self {
        let said = match &e {
            JournalError::Conflict(_) => return tonic::Status::new(e.code(), e.to_string()),
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

enum Job {
    Publish {
        producer: String,
        key: String,
        topic: &'static str,
        payload: Vec<u8>,
        /// Who it is addressed to (`address::audience_of`); `None`: every consumer.
        audience: Option<String>,
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
    fn audit(&self) -> Option<&Draft> {
        match self {
            Job::Publish { audit, .. } | Job::Ack { audit, .. } | Job::Reject { audit, .. } => {
                audit.as_ref()
            }
            Job::Record { audit, .. } => Some(audit),
        }
    }

    /// The detail of the job's audit record.
    fn detail(&self) -> &str {
        match self {
            Job::Record { detail, .. } => detail,
            _ => "",
        }
    }
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
pub type HoldersFn = Arc<dyn Fn() -> Vec<Holder> + Send + Sync>;

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

/// The writer's connection: one SQLite connection (the only writer of the file), or a pool of
/// the shared PostgreSQL database (other replicas write too; an advisory lock orders them).
enum WriterConn {
    Sqlite(SqliteConnection),
    Pg(PgPool),
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
            Store::Sqlite(dir) => Self::open_sqlite(dir, retention, audit, policy).await,
            Store::Postgres { url, pool_max } => {
                let pool = crate::store::pg_pool(url, *pool_max, Duration::from_secs(2)).await?;
                crate::store::migrate(&pool).await?;
                {
                    let mut tx = pool.begin().await?;
                    // One replica of this schema at a time; the others find nothing left.
                    sqlx::query(
                        "SELECT pg_advisory_xact_lock(hashtext(current_schema() || ' civgate adopt'))",
                    )
                    .execute(&mut *tx)
                    .await?;
                    adopt_legacy!(&mut *tx, policy).await?;
                    tx.commit().await?;
                }
                let mut last = HashMap::new();
                for t in TOPICS {
                    last.insert(t, pg_head(&pool, t).await?);
                }
                let journal = Self::start(
                    Reader::Pg(pool.clone()),
                    WriterConn::Pg(pool.clone()),
                    last,
                    retention,
                    audit,
                );
                // The follower must not keep the writer alive: it gets a handle whose sender
                // goes nowhere, and stops once the real one is gone.
                let view = Self {
                    tx: mpsc::channel(1).0,
                    ..journal.clone()
                };
                tokio::spawn(listen(pool, view, journal.tx.downgrade()));
                Ok(journal)
            }
        }
    }

    async fn open_sqlite(
        dir: &Path,
        retention: Option<Duration>,
        audit: Option<AuditTail>,
        policy: &Policy,
    ) -> Result<Self> {
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
        Ok(Self::start(
            Reader::Sqlite(reader),
            WriterConn::Sqlite(conn),
            last,
            retention,
            audit,
        ))
    }

    /// Spawns the writer task; heads start at `last`.
    fn start(
        reader: Reader,
        conn: WriterConn,
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
            reader,
            heads: Arc::new(heads),
            acks: Arc::new(Mutex::new(HashMap::new())),
            delivered: Arc::new(Mutex::new(HashMap::new())),
            holders: Arc::new(Mutex::new(None)),
            bound: audit.clone(),
        };
        let (tx, rx) = mpsc::channel(8_192);
        let writer = Writer {
            conn,
            last,
            journal: journal.clone(),
            audit,
        };
        tokio::spawn(writer.run(rx, retention));
        Self { tx, ..journal }
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
        self.publish_audited(producer, key, topic, payload, None, None)
            .await
            .result
    }

    /// Publishes, and — given the call's audit `draft` and an audit log — commits the call's
    /// audit record (finished with the outcome) in the same transaction as the event: one
    /// durable commit for both instead of two in turn.
    pub async fn publish_audited(
        &self,
        producer: &str,
        key: &str,
        topic: &'static str,
        payload: Vec<u8>,
        audience: Option<String>,
        audit: Option<Draft>,
    ) -> Published {
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

    /// Accepted / delivered / acknowledged / rejected, per consumer group known for the topic.
    pub async fn status(&self, event_id: &str) -> Result<Option<EventStatus>, JournalError> {
        let read = |e: sqlx::Error| JournalError::Read(e.to_string());
        let Some((topic, seq, producer, audience)) = with_reader!(&self.reader, |pool| {
            sqlx::query_as::<_, (String, i64, String, Option<String>)>(
                "SELECT topic, seq, producer, audience FROM journal_events WHERE event_id = $1",
            )
            .bind(event_id)
            .fetch_optional(pool)
            .await
        })
        .map_err(read)?
        else {
            return Ok(None);
        };
        let seq = seq as u64;
        let mut groups: std::collections::BTreeMap<Group, GroupState> =
            std::collections::BTreeMap::new();
        let acked_by: Vec<(String, String, i64)> = with_reader!(&self.reader, |pool| {
            sqlx::query_as("SELECT agency, grp, acked FROM journal_groups WHERE topic = $1")
                .bind(&topic)
                .fetch_all(pool)
                .await
        })
        .map_err(read)?;
        for (agency, name, acked) in acked_by {
            let acked = acked as u64;
            let state = if acked >= seq {
                GroupState::Acknowledged
            } else {
                GroupState::Accepted
            };
            groups.insert(Group { agency, name }, state);
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
        let rejected: Vec<(String, String, String)> = with_reader!(&self.reader, |pool| {
            sqlx::query_as(
                "SELECT agency, grp, reason FROM journal_rejections WHERE topic = $1 AND seq = $2",
            )
            .bind(&topic)
            .bind(seq as i64)
            .fetch_all(pool)
            .await
        })
        .map_err(read)?;
        for (agency, name, reason) in rejected {
            groups.insert(Group { agency, name }, GroupState::Rejected(reason));
        }
        Ok(Some(EventStatus {
            event_id: event_id.to_owned(),
            topic,
            seq,
            producer,
            audience,
            groups: groups.into_iter().collect(),
        }))
    }

    /// One stored event by its id: where it is, who published it, who it is addressed to.
    pub async fn find(&self, event_id: &str) -> Result<Option<Found>, JournalError> {
        type Row = (String, i64, String, Option<String>, Vec<u8>);
        let row: Option<Row> =
            with_reader!(&self.reader, |pool| {
                sqlx::query_as(
                    "SELECT topic, seq, producer, audience, payload FROM journal_events WHERE event_id = $1",
                )
                .bind(event_id)
                .fetch_optional(pool)
                .await
            })
            .map_err(|e| JournalError::Read(e.to_string()))?;
        Ok(row.map(|(topic, seq, producer, audience, payload)| Found {
            topic,
            seq: seq as u64,
            producer,
            audience,
            payload,
        }))
    }

    /// The audience of the event at `seq` of `topic`: `None` when no event is stored there.
    pub async fn audience_at(
        &self,
        topic: &str,
        seq: u64,
    ) -> Result<Option<Option<String>>, JournalError> {
        with_reader!(&self.reader, |pool| {
            sqlx::query_scalar("SELECT audience FROM journal_events WHERE topic = $1 AND seq = $2")
                .bind(topic)
                .bind(seq as i64)
                .fetch_optional(pool)
                .await
        })
        .map_err(|e| JournalError::Read(e.to_string()))
    }

    /// Every consumer group stored, with its acknowledged sequence: (topic, group, acked).
    pub async fn groups(&self) -> Result<Vec<(String, Group, u64)>, JournalError> {
        let rows: Vec<(String, String, String, i64)> = with_reader!(&self.reader, |pool| {
            sqlx::query_as("SELECT topic, agency, grp, acked FROM journal_groups ORDER BY 1, 2, 3")
                .fetch_all(pool)
                .await
        })
        .map_err(|e| JournalError::Read(e.to_string()))?;
        Ok(rows
            .into_iter()
            .map(|(t, agency, name, a)| (t, Group { agency, name }, a as u64))
            .collect())
    }

    /// Events of `topic` after `acked` that `scope` selects: how many, and when the oldest was
    /// recorded (Unix ms).
    pub async fn backlog(
        &self,
        topic: &str,
        acked: u64,
        scope: Option<&[String]>,
    ) -> Result<(u64, Option<i64>), JournalError> {
        let tokens = scope.unwrap_or_default();
        let pg = matches!(self.reader, Reader::Pg(_));
        // Built only from constants and numbered placeholders.
        let sql = format!(
            "SELECT count(*), min(recorded_at_ms) FROM journal_events WHERE topic = $1 AND seq > $2{}",
            scope_filter(pg, tokens.len(), 3)
        );
        let (n, oldest): (i64, Option<i64>) = with_reader!(&self.reader, |pool| {
            let mut q = sqlx::query_as(sqlx::AssertSqlSafe(sql.as_str()))
                .bind(topic)
                .bind(acked as i64);
            for t in tokens {
                q = q.bind(t.as_str());
            }
            q.fetch_one(pool).await
        })
        .map_err(|e| JournalError::Read(e.to_string()))?;
        Ok((n.max(0) as u64, oldest))
    }

    /// Dead letters (rejected events) per topic.
    pub async fn dead_letters(&self) -> Result<Vec<(String, u64)>, JournalError> {
        let rows: Vec<(String, i64)> = with_reader!(&self.reader, |pool| {
            sqlx::query_as("SELECT topic, count(*) FROM journal_rejections GROUP BY topic")
                .fetch_all(pool)
                .await
        })
        .map_err(|e| JournalError::Read(e.to_string()))?;
        Ok(rows
            .into_iter()
            .map(|(t, n)| (t, n.max(0) as u64))
            .collect())
    }

    /// The highest committed sequence of a topic, as it changes.
    pub fn head(&self, topic: &str) -> Option<watch::Receiver<u64>> {
        self.heads.get(topic).map(watch::Sender::subscribe)
    }

    /// A group's acknowledged sequence, as it changes (starting from the stored one).
    pub async fn acked(
        &self,
        topic: &str,
        group: &Group,
    ) -> Result<watch::Receiver<u64>, JournalError> {
        let key = (topic.to_owned(), group.clone());
        if let Some(tx) = self
            .acks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Ok(tx.subscribe());
        }
        let stored: Option<i64> = with_reader!(&self.reader, |pool| {
            sqlx::query_scalar(
                "SELECT acked FROM journal_groups WHERE topic = $1 AND agency = $2 AND grp = $3",
            )
            .bind(topic)
            .bind(&group.agency)
            .bind(&group.name)
            .fetch_optional(pool)
            .await
        })
        .map_err(|e| JournalError::Read(e.to_string()))?;
        let mut map = self.acks.lock().unwrap_or_else(|p| p.into_inner());
        let tx = map
            .entry(key)
            .or_insert_with(|| watch::channel(stored.unwrap_or(0) as u64).0);
        Ok(tx.subscribe())
    }

    /// Events `from..=to` of a topic that `scope` selects (`None`: all), at most `limit`, in
    /// sequence order; fewer (never none, if there is one) when their payloads pass
    /// [`PAGE_BYTES`]: the page ends before the event that would start past it. The page
    /// says how far it looked.
    pub async fn read(
        &self,
        topic: &str,
        from: u64,
        to: u64,
        limit: u32,
        scope: Option<&[String]>,
    ) -> Result<Page, JournalError> {
        let read_err = |e: sqlx::Error| JournalError::Read(e.to_string());
        let tokens = scope.unwrap_or_default();
        let rows: Vec<EventRow> = match &self.reader {
            Reader::Sqlite(pool) => {
                // One row for the whole page: sqlx hands each result row from its worker
                // thread to this task on its own, and a 1,000,000-event catch-up spent about a
                // third of the gateway's CPU on those hand-overs. SQLite builds the page as a
                // JSON array (payloads in hex) that is parsed here in one go.
                let sql = sqlite_page(tokens.len());
                let mut q = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                    .bind(topic)
                    .bind(from as i64)
                    .bind(to as i64)
                    .bind(i64::from(limit))
                    .bind(INLINE_PAYLOAD);
                for t in tokens {
                    q = q.bind(t.as_str());
                }
                let page: String = q.fetch_one(pool).await.map_err(read_err)?;
                parse_page(&page)?
            }
            Reader::Pg(pool) => {
                let mut q = sqlx::query_as(sqlx::AssertSqlSafe(page_rows(true, tokens.len())))
                    .bind(topic)
                    .bind(from as i64)
                    .bind(to as i64)
                    .bind(i64::from(limit))
                    .bind(INLINE_PAYLOAD);
                for t in tokens {
                    q = q.bind(t.as_str());
                }
                q.fetch_all(pool).await.map_err(read_err)?
            }
        };
        // Fewer rows than asked for: nothing else up to `to` is selected.
        let full = rows.len() >= limit as usize;
        let mut scanned_to = if full {
            rows.last().map_or(to, |r| r.0 as u64)
        } else {
            to
        };
        let mut page = Vec::with_capacity(rows.len());
        let mut bytes = 0;
        for (seq, event_id, producer, payload, recorded_at_ms) in rows {
            if bytes >= PAGE_BYTES {
                // The rest is for the next page.
                scanned_to = seq as u64 - 1;
                break;
            }
            let payload = match payload {
                Some(p) => p,
                None => match self.payload(topic, seq).await? {
                    Some(p) => p,
                    // Deleted since the page was read: retention, so every group has
                    // acknowledged it.
                    None => continue,
                },
            };
            bytes += payload.len();
            page.push(Stored {
                seq: seq as u64,
                event_id,
                producer,
                payload,
                recorded_at_ms,
            });
        }
        Ok(Page {
            events: page,
            scanned_to,
        })
    }

    /// One stored event's payload.
    async fn payload(&self, topic: &str, seq: i64) -> Result<Option<Vec<u8>>, JournalError> {
        with_reader!(&self.reader, |pool| {
            sqlx::query_scalar("SELECT payload FROM journal_events WHERE topic = $1 AND seq = $2")
                .bind(topic)
                .bind(seq)
                .fetch_optional(pool)
                .await
        })
        .map_err(|e| JournalError::Read(e.to_string()))
    }
}

/// An event as read: sequence, event id, producer, payload (`None`: too large to come with its
/// page), recording time.
type EventRow = (i64, String, String, Option<Vec<u8>>, i64);

/// SQLite: the same page as one JSON array of `[seq, event_id, producer, hex(payload) or null,
/// recorded_at_ms]` (`[]` for an empty page).
fn sqlite_page(scope: usize) -> String {
    // hex(NULL) is '', so a NULL payload (too large for the page) is kept NULL.
    format!(
        "SELECT json_group_array(json_array(seq, event_id, producer, \
           CASE WHEN payload IS NULL THEN NULL ELSE hex(payload) END, recorded_at_ms)) FROM ({})",
        page_rows(false, scope)
    )
}

/// The rows of a [`sqlite_page`], in sequence order (an aggregate's input order is not
/// promised, so it is restored here).
fn parse_page(page: &str) -> Result<Vec<EventRow>, JournalError> {
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

/// The stored (payload hash, receipt) of each (producer, key) of the batch already in the
/// journal: one query per 400 keys. `conn` is a `&mut` SQLite or PostgreSQL connection.
macro_rules! known_keys {
    ($conn:expr, $batch:expr) => {
        async {
            let keys: Vec<(&str, &str)> = $batch
                .iter()
                .filter_map(|j| match j {
                    Job::Publish { producer, key, .. } => Some((producer.as_str(), key.as_str())),
                    _ => None,
                })
                .collect();
            let mut known = Known::new();
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
                            Receipt {
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

struct Writer {
    conn: WriterConn,
    last: HashMap<&'static str, u64>,
    journal: Journal,
    /// The audit log's right edge: publishes' records are committed with their events.
    audit: Option<AuditTail>,
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
                    // No linger here (store::linger): producers wait for their receipts, so
                    // at 64 publishes in flight a wait before the commit only delays the
                    // next wave (measured: fewer publishes/s, not more).
                    drain(&mut rx, &mut batch, MAX_BATCH);
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

    /// Deletes events older than `retention` that every holder they are addressed to (under
    /// the configuration in force: [`Journal::retain_for`]) has acknowledged. A topic without
    /// holders keeps everything.
    async fn prune(&mut self, retention: Duration) -> Result<u64> {
        let cutoff = crate::audit::log::now_ms() - retention.as_millis() as i64;
        let holders = self.journal.holders();
        let tail = self.audit.clone();
        let _writing = AuditTail::lock_if(tail.as_ref()).await;
        let done = match &mut self.conn {
            WriterConn::Sqlite(conn) => prune_sqlite(conn, cutoff, &holders).await?,
            WriterConn::Pg(pool) => {
                let mut tx = pool.begin().await?;
                let n = prune_topics!(&mut *tx, true, cutoff, &holders).await?;
                tx.commit().await?;
                n
            }
        };
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
        crate::telemetry::store_commit("journal", batch.len(), started.elapsed());
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
        match &mut self.conn {
            WriterConn::Sqlite(_) => self.write_sqlite(batch, now, range).await,
            WriterConn::Pg(pool) => {
                let pool = pool.clone();
                self.write_pg(&pool, batch, now, range).await
            }
        }
    }

    /// SQLite: the common case — no idempotency key of the batch has been seen before — is one
    /// round trip: sequences are assigned and everything is written in one transaction. A
    /// retried key makes that insert fail on the idempotency index; the batch is then rolled
    /// back, the keys are looked up, and the batch is planned again knowing them.
    async fn write_sqlite(
        &mut self,
        batch: &[Job],
        now: i64,
        mut range: Option<&mut CompactRange>,
    ) -> Result<Written> {
        let WriterConn::Sqlite(conn) = &mut self.conn else {
            anyhow::bail!("not a SQLite journal");
        };
        let before = self.last.clone();
        let range_before = range.as_deref().cloned();
        let first = plan(&mut self.last, batch, Known::new(), now);
        let mut b = first.sqlite()?;
        let (indexes, entries) =
            stage_audit_sqlite(&mut b, batch, &first.outcomes, range.as_deref_mut())?;
        match b.commit(conn).await {
            Ok(()) => return Ok((first.outcomes, indexes, entries)),
            Err(e) if crate::sqlite::is_unique_violation(&e) => {
                self.last = before;
                if let (Some(r), Some(b)) = (range.as_deref_mut(), range_before) {
                    *r = b;
                }
            }
            Err(e) => return Err(e.into()),
        }
        let known = known_keys!(conn, batch).await?;
        let second = plan(&mut self.last, batch, known, now);
        let mut b = second.sqlite()?;
        let (indexes, entries) = stage_audit_sqlite(&mut b, batch, &second.outcomes, range)?;
        b.commit(conn).await?;
        Ok((second.outcomes, indexes, entries))
    }

    /// PostgreSQL, shared by replicas, one transaction: lock the heads rows and read them (one
    /// statement; the lock serialises the replicas' writers until commit, and the values read
    /// are the latest committed), look the keys up, assign sequences, write everything and
    /// queue the NOTIFYs in one statement, commit. Sequence order is commit order across
    /// replicas because the rows stay locked until the commit.
    async fn write_pg(
        &mut self,
        pool: &PgPool,
        batch: &[Job],
        now: i64,
        range: Option<&mut CompactRange>,
    ) -> Result<Written> {
        let mut tx = pool.begin().await?;
        let before = self.last.clone();
        let result = async {
            let heads: Vec<(String, i64)> =
                sqlx::query_as("SELECT topic, head FROM journal_heads ORDER BY topic FOR UPDATE")
                    .fetch_all(&mut *tx)
                    .await?;
            for (t, h) in heads {
                if let Some(topic) = TOPICS.iter().find(|x| **x == t) {
                    self.last.insert(topic, h as u64);
                }
            }
            let known = known_keys!(&mut *tx, batch).await?;
            let planned = plan(&mut self.last, batch, known, now);
            planned.write_pg(&mut tx).await?;
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
            self.last = before;
        }
        result
    }
}

/// SQLite retention: records each topic's head in `journal_heads`, then deletes what no
/// holder needs ([`prune_topics`]), in one transaction. A commit writes no head row (its events
/// are the head), so the row must be there before retention can delete a topic's last events.
async fn prune_sqlite(
    conn: &mut SqliteConnection,
    cutoff: i64,
    holders: &[Holder],
) -> Result<u64, sqlx::Error> {
    let mut tx = conn.begin().await?;
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

/// The audit records of the batch's jobs that carry a draft, finished with their outcomes,
/// and the position in the batch of each.
fn audit_records(batch: &[Job], outcomes: &[Outcome]) -> (Vec<AuditRecord>, Vec<usize>) {
    let mut records = Vec::new();
    let mut at = Vec::new();
    for (i, (job, outcome)) in batch.iter().zip(outcomes).enumerate() {
        let Some(draft) = job.audit() else { continue };
        let code = match outcome {
            Outcome::Published(Err(e)) => e.code(),
            Outcome::Published(Ok(_)) | Outcome::Acked => tonic::Code::Ok,
        };
        records.push(draft.call.record(draft.facts.clone(), code, job.detail()));
        at.push(i);
    }
    (records, at)
}

/// What a commit did: each job's outcome and audit index, and the audit entries it appended
/// (in index order, for the block summaries).
type Written = (Vec<Outcome>, Vec<Option<u64>>, Vec<BlockEntry>);

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

/// Each job's audit index: the records appended from `first` on belong, in order, to the jobs
/// at positions `at`; the other jobs have none.
fn placed(jobs: usize, first: u64, at: Vec<usize>) -> Vec<Option<u64>> {
    let mut indexes = vec![None; jobs];
    for (k, i) in at.into_iter().enumerate() {
        indexes[i] = Some(first + k as u64);
    }
    indexes
}

/// SQLite: adds what this release stores to an earlier release's tables (in the caller's
/// transaction): events' `audience`, groups' and rejections' owning `agency` (`''` until
/// [`adopt_legacy`] assigns it), and the index of events still without an audience.
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

/// What one batch writes: new events with their sequences, acknowledgements, rejections, and
/// each job's outcome.
struct Plan<'a> {
    rows: Vec<NewRow<'a>>,
    acks: Vec<(&'a str, &'a Group, u64)>,
    rejects: Vec<(&'a str, &'a Group, u64, &'a str)>,
    outcomes: Vec<Outcome>,
    now: i64,
}

/// Assigns sequences (continuing `last`) to the new events of `batch` — those whose key is not
/// in `known`, nor earlier in the batch.
fn plan<'a>(
    last: &mut HashMap<&'static str, u64>,
    batch: &'a [Job],
    mut known: Known,
    now: i64,
) -> Plan<'a> {
    let mut p = Plan {
        rows: Vec::new(),
        acks: Vec::new(),
        rejects: Vec::new(),
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

const ACK_SQL: &str = "INSERT INTO journal_groups (topic, agency, grp, acked) VALUES ($1, $2, $3, $4) \
     ON CONFLICT (topic, agency, grp) DO UPDATE SET acked = CASE WHEN excluded.acked > journal_groups.acked \
     THEN excluded.acked ELSE journal_groups.acked END";
const REJECT_SQL: &str = "INSERT INTO journal_rejections (topic, agency, grp, seq, reason, at_ms) VALUES ($1, $2, $3, $4, $5, $6) \
     ON CONFLICT (topic, seq, agency, grp) DO UPDATE SET reason = excluded.reason, at_ms = excluded.at_ms";
/// The columns of a new event, in the order of [`Plan::insert_sql`] and `insert_rows`.
const EVENT_COLUMNS: &str = "journal_events (topic, seq, event_id, producer, idempotency_key, payload, payload_hash, recorded_at_ms, audience)";

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

    /// The batch as one SQLite script (`?` placeholders, bound in order across statements).
    fn sqlite(&self) -> Result<crate::sqlite::Batch, sqlx::Error> {
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
        // No `journal_heads` row: on SQLite a topic's head is its highest stored sequence, and
        // retention records the heads before it deletes (`prune_sqlite`).
        Ok(b)
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

    /// Writes the batch inside `tx` (which holds the journal's advisory lock) and queues the
    /// NOTIFYs PostgreSQL delivers at commit.
    async fn write_pg(&self, tx: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
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

/// (producer, idempotency key) → (payload hash, receipt) of events already stored.
type Known = HashMap<(String, String), (Vec<u8>, Receipt)>;

/// An event to insert.
struct NewRow<'a> {
    topic: &'static str,
    seq: u64,
    event_id: String,
    producer: &'a str,
    key: &'a str,
    payload: &'a [u8],
    hash: Vec<u8>,
    audience: Option<&'a str>,
}

enum Outcome {
    Published(Result<Receipt, JournalError>),
    Acked,
}

#[cfg(test)]
mod tests {

    #[test]
    fn store_errors_are_logged_not_sent() {
        let inner = "permission denied for table journal_events";
        for e in [
            JournalError::NotDurable(inner.into()),
            JournalError::Read(inner.into()),
        ] {
            let status = tonic::Status::from(e);
            assert_eq!(status.code(), tonic::Code::Unavailable);
            assert!(!status.message().contains("journal_events"), "{status:?}");
        }
        let conflict = tonic::Status::from(JournalError::Conflict("e-1".into()));
        assert!(conflict.message().contains("e-1"));
    }
    use super::*;

    /// A journal in `dir` without an audit log, policy or retention.
    async fn open_sqlite_at(dir: &Path) -> Journal {
        Journal::open(&Store::Sqlite(dir.into()), None, None, &Policy::default())
            .await
            .unwrap()
    }

    /// Three journals on one PostgreSQL schema — three replicas — publishing concurrently:
    /// each topic's sequences are gap-free, every receipt is readable, a subscriber-side head
    /// on one replica follows what the others commit, and retries return the original receipt.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_on_postgres_keep_one_gap_free_order() {
        let Some(url) = crate::store::test_schema("journal_replicas").await else {
            return;
        };
        let store = Store::Postgres { url, pool_max: 4 };
        let mut replicas = Vec::new();
        for _ in 0..3 {
            replicas.push(
                Journal::open(&store, None, None, &Policy::default())
                    .await
                    .unwrap(),
            );
        }
        let mut head_on_c = replicas[2].head(POPULATION).unwrap();
        let mut tasks = Vec::new();
        for (r, j) in replicas.iter().take(2).enumerate() {
            for p in 0..4 {
                let j = j.clone();
                tasks.push(tokio::spawn(async move {
                    let mut receipts = Vec::new();
                    for i in 0..50u8 {
                        let key = format!("r{r}-p{p}-{i}");
                        receipts.push(
                            j.publish("population", &key, POPULATION, vec![r as u8, p, i])
                                .await
                                .unwrap(),
                        );
                    }
                    receipts
                }));
            }
        }
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.extend(t.await.unwrap().into_iter().map(|r| r.sequence));
        }
        seqs.sort_unstable();
        assert_eq!(
            seqs,
            (1..=400).collect::<Vec<u64>>(),
            "gap-free, no duplicates"
        );
        // Replica C published nothing, yet its head reaches 400 (NOTIFY, or the 1 s re-read).
        tokio::time::timeout(Duration::from_secs(5), head_on_c.wait_for(|h| *h >= 400))
            .await
            .expect("head on the third replica within 5 s")
            .unwrap();
        let read = replicas[2]
            .read(POPULATION, 1, 400, 1000, None)
            .await
            .unwrap()
            .events;
        assert_eq!(read.len(), 400);
        assert!(read.windows(2).all(|w| w[1].seq == w[0].seq + 1));
        // A retry through another replica gets the original receipt; another payload conflicts.
        let first = &read[0];
        let key = format!(
            "r{}-p{}-{}",
            first.payload[0], first.payload[1], first.payload[2]
        );
        let again = replicas[2]
            .publish("population", &key, POPULATION, first.payload.clone())
            .await
            .unwrap();
        assert_eq!(
            (again.sequence, again.event_id.as_str()),
            (1, first.event_id.as_str())
        );
        assert!(matches!(
            replicas[1]
                .publish("population", &key, POPULATION, vec![9, 9])
                .await,
            Err(JournalError::Conflict(_))
        ));
        // Acks through one replica reach another's watchers.
        let mut acked_on_a = replicas[0]
            .acked(POPULATION, &Group::new("a", "g"))
            .await
            .unwrap();
        replicas[1]
            .ack(POPULATION, &Group::new("a", "g"), 17)
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), acked_on_a.wait_for(|a| *a >= 17))
            .await
            .expect("ack seen on the other replica")
            .unwrap();
        let status = replicas[0]
            .status(&read[5].event_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            status.groups,
            vec![(Group::new("a", "g"), GroupState::Acknowledged)]
        );
        drop(replicas);
        if let Store::Postgres { url, .. } = &store {
            crate::store::drop_test_schema(url).await;
        }
    }

    /// Pages come back from SQLite as one JSON row: every payload byte survives, pages hold
    /// the range asked for in sequence order and no more than the limit, and an empty range
    /// is an empty page.
    /// A subscriber's scope selects the events whose audience holds one of its tokens; a page
    /// says how far it looked, also when it found nothing or filled up.
    async fn scoped_pages_select_by_audience(store: Store) {
        let j = Journal::open(&store, None, None, &Policy::default())
            .await
            .unwrap();
        let audiences = [
            Some(" p:031 "),
            Some(" a:registry-hn "),
            Some(" p:001 p:031 "),
            Some(" p:001 "),
            None,
            Some(" a:registry-hp "),
            Some(" p:048 "),
        ];
        for (i, a) in audiences.iter().enumerate() {
            j.publish_audited(
                "population",
                &format!("k{i}"),
                POPULATION,
                vec![i as u8],
                a.map(str::to_owned),
                None,
            )
            .await
            .result
            .unwrap();
        }
        let hp: Vec<String> = vec![" a:registry-hp ".into(), " p:031 ".into()];
        let hn: Vec<String> = vec![" a:registry-hn ".into(), " p:001 ".into()];
        let seqs = |p: &Page| p.events.iter().map(|e| e.seq).collect::<Vec<_>>();
        let all = j.read(POPULATION, 1, 7, 256, Some(&hp)).await.unwrap();
        assert_eq!((seqs(&all), all.scanned_to), (vec![1, 3, 6], 7));
        let all = j.read(POPULATION, 1, 7, 256, Some(&hn)).await.unwrap();
        assert_eq!((seqs(&all), all.scanned_to), (vec![2, 3, 4], 7));
        // Full at two: looked as far as the second.
        let two = j.read(POPULATION, 1, 7, 2, Some(&hp)).await.unwrap();
        assert_eq!((seqs(&two), two.scanned_to), (vec![1, 3], 3));
        let rest = j.read(POPULATION, 4, 7, 2, Some(&hp)).await.unwrap();
        assert_eq!((seqs(&rest), rest.scanned_to), (vec![6], 7));
        let none = j.read(POPULATION, 7, 7, 2, Some(&hp)).await.unwrap();
        assert_eq!((seqs(&none), none.scanned_to), (vec![], 7));
        // The backlog counts what the scope selects after the acknowledged sequence.
        assert_eq!(j.backlog(POPULATION, 1, Some(&hp)).await.unwrap().0, 2);
        assert_eq!(j.backlog(POPULATION, 0, None).await.unwrap().0, 7);
        // Stored audiences come back with the event.
        let id = &all.events[0].event_id;
        let found = j.find(id).await.unwrap().unwrap();
        assert_eq!(found.audience.as_deref(), Some(" a:registry-hn "));
        assert_eq!(j.audience_at(POPULATION, 5).await.unwrap(), Some(None));
        assert_eq!(j.audience_at(POPULATION, 9).await.unwrap(), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scoped_pages_select_by_audience_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        scoped_pages_select_by_audience(Store::Sqlite(dir.path().into())).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scoped_pages_select_by_audience_on_postgres() {
        crate::store::with_test_postgres("scoped_pages", scoped_pages_select_by_audience).await;
    }

    /// Retention deletes an event only once every holder it is addressed to acknowledged it:
    /// a holder that never acknowledged keeps what is addressed to it, another's ack does not
    /// stand in for it, and an event addressed to no holder is kept.
    async fn retention_waits_for_every_holder_an_event_is_addressed_to(store: Store) {
        let j = Journal::open(&store, None, None, &Policy::default())
            .await
            .unwrap();
        for (i, a) in [
            " p:031 ",
            " p:001 ",
            " a:registry-hp ",
            " p:001 p:031 ",
            " p:048 ",
        ]
        .iter()
        .enumerate()
        {
            j.publish_audited(
                "population",
                &format!("k{i}"),
                POPULATION,
                vec![i as u8],
                Some((*a).to_owned()),
                None,
            )
            .await
            .result
            .unwrap();
        }
        let holder = |agency: &str, province: &str| Holder {
            topic: POPULATION,
            group: Group::new(agency, agency),
            scope: Some(vec![format!(" a:{agency} "), format!(" p:{province} ")]),
        };
        let holders = [holder("registry-hp", "031"), holder("registry-hn", "001")];
        j.ack(POPULATION, &Group::new("registry-hp", "registry-hp"), 4)
            .await
            .unwrap();
        // Another agency's group of the same name holds nothing back.
        j.ack(POPULATION, &Group::new("registry-hp", "registry-hn"), 5)
            .await
            .unwrap();
        let prune = async |holders: &[Holder]| -> u64 {
            match &store {
                Store::Sqlite(dir) => {
                    let mut conn = SqliteConnection::connect(&format!(
                        "sqlite://{}",
                        crate::sqlite::store_path(dir).display()
                    ))
                    .await
                    .unwrap();
                    prune_sqlite(&mut conn, i64::MAX, holders).await.unwrap()
                }
                Store::Postgres { url, .. } => {
                    let pool = crate::store::pg_pool(url, 1, Duration::from_secs(5))
                        .await
                        .unwrap();
                    let mut tx = pool.begin().await.unwrap();
                    let n = prune_topics!(&mut *tx, true, i64::MAX, holders)
                        .await
                        .unwrap();
                    tx.commit().await.unwrap();
                    n
                }
            }
        };
        let stored = async || -> Vec<u64> {
            let mut v = Vec::new();
            for seq in 1..=5 {
                if j.audience_at(POPULATION, seq).await.unwrap().is_some() {
                    v.push(seq);
                }
            }
            v
        };
        assert_eq!(prune(&holders).await, 2);
        assert_eq!(
            stored().await,
            [2, 4, 5],
            "registry-hn never acknowledged; nobody covers 048"
        );
        j.ack(POPULATION, &Group::new("registry-hn", "registry-hn"), 2)
            .await
            .unwrap();
        assert_eq!(prune(&holders).await, 1);
        assert_eq!(stored().await, [4, 5]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retention_waits_for_every_holder_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        retention_waits_for_every_holder_an_event_is_addressed_to(Store::Sqlite(dir.path().into()))
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retention_waits_for_every_holder_on_postgres() {
        crate::store::with_test_postgres(
            "retention_holders",
            retention_waits_for_every_holder_an_event_is_addressed_to,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_pages_return_exact_payloads_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let j = open_sqlite_at(dir.path()).await;
        // Every byte value, an empty-ish and a 64 KiB payload among them.
        let payloads: Vec<Vec<u8>> = (0..300u32)
            .map(|i| match i {
                0 => (0..=255).collect(),
                1 => vec![0],
                2 => vec![0xab; 64 << 10],
                _ => i.to_be_bytes().to_vec(),
            })
            .collect();
        let mut receipts = Vec::new();
        for (i, p) in payloads.iter().enumerate() {
            receipts.push(
                j.publish("population", &format!("k{i}"), POPULATION, p.clone())
                    .await
                    .unwrap(),
            );
        }
        let page = j.read(POPULATION, 1, 300, 256, None).await.unwrap();
        assert_eq!((page.events.len(), page.scanned_to), (256, 256));
        for (e, (p, r)) in page.events.iter().zip(payloads.iter().zip(&receipts)) {
            assert_eq!(
                (e.seq, &e.event_id, &e.payload),
                (r.sequence, &r.event_id, p)
            );
            assert_eq!(
                (e.producer.as_str(), e.recorded_at_ms),
                ("population", r.recorded_at_ms)
            );
        }
        let rest = j.read(POPULATION, 257, 280, 256, None).await.unwrap();
        assert_eq!(
            rest.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            (257..=280).collect::<Vec<_>>()
        );
        assert_eq!(rest.scanned_to, 280);
        let none = j.read(POPULATION, 301, 400, 256, None).await.unwrap();
        assert!(none.events.is_empty() && none.scanned_to == 400);
        assert!(
            j.read(CIVIL_STATUS, 1, 10, 256, None)
                .await
                .unwrap()
                .events
                .is_empty()
        );
    }

    /// A page stops before the event that would start past `PAGE_BYTES` of payloads — the
    /// first event always comes, however large — and the next read goes on from there.
    async fn pages_are_bounded_by_bytes(store: Store) {
        let j = Journal::open(&store, None, None, &Policy::default())
            .await
            .unwrap();
        let mib = 1 << 20;
        // Sizes in MiB; sequences 1..=7.
        let sizes = [1, 2, 1, 5, 0, 3, 2];
        for (i, n) in sizes.iter().enumerate() {
            let payload = vec![i as u8; n * mib + 1];
            j.publish("population", &format!("big{i}"), POPULATION, payload)
                .await
                .unwrap();
        }
        let mut pages = Vec::new();
        let mut next = 1;
        while next <= 7 {
            let page = j.read(POPULATION, next, 7, 256, None).await.unwrap();
            for (e, want) in page.events.iter().zip(next..) {
                assert_eq!(e.seq, want);
                let i = (want - 1) as usize;
                let want = vec![i as u8; sizes[i] * mib + 1];
                // Not assert_eq!: a failure would print megabytes.
                assert!(
                    e.payload == want,
                    "event {}: {} bytes",
                    e.seq,
                    e.payload.len()
                );
            }
            next += page.events.len() as u64;
            pages.push(page.events.iter().map(|e| e.seq).collect::<Vec<_>>());
        }
        // 1+2+1 MiB (and 3 bytes) pass 4 MiB only with the third; 5 MiB alone; 0+3 MiB, then 2.
        assert_eq!(pages, [vec![1, 2, 3], vec![4], vec![5, 6, 7]]);
        // The event count still limits.
        assert_eq!(
            j.read(POPULATION, 5, 7, 2, None)
                .await
                .unwrap()
                .events
                .len(),
            2
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pages_are_bounded_by_bytes_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        pages_are_bounded_by_bytes(Store::Sqlite(dir.path().into())).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pages_are_bounded_by_bytes_on_postgres() {
        crate::store::with_test_postgres("journal_page_bytes", pages_are_bounded_by_bytes).await;
    }

    #[test]
    fn a_page_is_put_back_in_sequence_order_and_bad_pages_are_errors() {
        let rows = parse_page(
            r#"[[3,"c","p","0aff",30],[1,"a","p","",10],[4,"d","p",null,40],[2,"b","q","00",20]]"#,
        )
        .unwrap();
        assert_eq!(
            rows,
            [
                (1, "a".into(), "p".into(), Some(vec![]), 10),
                (2, "b".into(), "q".into(), Some(vec![0]), 20),
                (3, "c".into(), "p".into(), Some(vec![0x0a, 0xff]), 30),
                // Too large to come with the page.
                (4, "d".into(), "p".into(), None, 40),
            ]
        );
        assert!(parse_page("[]").unwrap().is_empty());
        for bad in [
            r#"[[1,"a","p","0g",1]]"#,
            r#"[[1,"a","p"]]"#,
            "{",
            r#"[[1,"a","p","abc",1]]"#,
        ] {
            assert!(
                matches!(parse_page(bad), Err(JournalError::Read(_))),
                "{bad}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn publish_ack_and_retention_keep_what_a_group_still_needs() {
        let dir = tempfile::tempdir().unwrap();
        let j = open_sqlite_at(dir.path()).await;
        for i in 0..5 {
            let r = j
                .publish("population", &format!("k{i}"), POPULATION, vec![i])
                .await
                .unwrap();
            assert_eq!(r.sequence, u64::from(i) + 1);
        }
        j.ack(POPULATION, &Group::new("a", "a"), 4).await.unwrap();
        j.ack(POPULATION, &Group::new("a", "b"), 2).await.unwrap();
        let mut conn = SqliteConnection::connect(&format!(
            "sqlite://{}",
            crate::sqlite::store_path(dir.path()).display()
        ))
        .await
        .unwrap();
        // Both groups read every event of the topic; retention waits for both.
        let holders: Vec<Holder> = ["a", "b"]
            .iter()
            .map(|g| Holder {
                topic: POPULATION,
                group: Group::new("a", g),
                scope: None,
            })
            .collect();
        // Without holders, a topic keeps everything.
        assert_eq!(prune_sqlite(&mut conn, i64::MAX, &[]).await.unwrap(), 0);
        // Everything is old enough; only what both groups acknowledged goes.
        let deleted = prune_sqlite(&mut conn, i64::MAX, &holders).await.unwrap();
        assert_eq!(deleted, 2);
        let left: Vec<i64> = sqlx::query_scalar("SELECT seq FROM journal_events ORDER BY seq")
            .fetch_all(&mut conn)
            .await
            .unwrap();
        assert_eq!(left, vec![3, 4, 5]);
        // Nothing is deleted before it is old enough.
        assert_eq!(prune_sqlite(&mut conn, 0, &holders).await.unwrap(), 0);
        // New events continue the sequence.
        assert_eq!(
            j.publish("population", "k9", POPULATION, vec![9])
                .await
                .unwrap()
                .sequence,
            6
        );
        // ...also after retention removed every event and a restart.
        j.ack(POPULATION, &Group::new("a", "a"), 6).await.unwrap();
        j.ack(POPULATION, &Group::new("a", "b"), 6).await.unwrap();
        assert_eq!(
            prune_sqlite(&mut conn, i64::MAX, &holders).await.unwrap(),
            4
        );
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM journal_events")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(left, 0);
        drop(j);
        let j = open_sqlite_at(dir.path()).await;
        let r = j
            .publish("population", "k10", POPULATION, vec![10])
            .await
            .unwrap();
        assert_eq!(r.sequence, 7);
    }

    /// A publish carrying its call's audit draft commits the event and the record in one
    /// transaction: the record holds the outcome (a retry: OK again; the same key with another
    /// payload: ALREADY_EXISTS), and records appended meanwhile by the audit log's own writer
    /// interleave in one tree that proves every entry. Then both stores reopen where they were.
    async fn publishes_and_their_records_commit_together(store: Store) {
        use crate::audit::{AuditLog, Call, Draft, Facts, note::Signer};
        use prost::Message;

        let open_log = || async {
            AuditLog::open(crate::audit::log::Options {
                store: &store,
                signer: Signer::generate("civgate.test/audit").unwrap(),
                origin: "civgate.test/audit".into(),
                checkpoint_interval: Duration::from_secs(3600),
                commit_timeout: Duration::from_secs(10),
                healthy: watch::channel(true).0,
            })
            .await
            .unwrap()
        };
        let log = open_log().await;
        let journal = Journal::open(&store, None, Some(log.tail()), &Policy::default())
            .await
            .unwrap();
        let agency: crate::domain::AgencyId = "population".parse().unwrap();
        let fingerprint = crate::domain::CertFingerprint([7; 32]);
        let draft_at = |rid: &str, path: &str| Draft {
            call: Arc::new(Call {
                peer: Arc::new(crate::identity::PeerIdentity::of(
                    Ok(agency.clone()),
                    fingerprint,
                )),
                principal: Some(crate::policy::Principal {
                    agency: agency.clone(),
                    role: crate::domain::Role::PopulationDb,
                    fingerprint,
                    registry_offices: Arc::from([]),
                    provinces: Arc::from([]),
                }),
                path: path.into(),
                request_id: rid.into(),
                started: std::time::Instant::now(),
            }),
            facts: Facts {
                subjects: vec!["031200000001".into()],
                fields: vec!["event:personal_id_assigned".into()],
                ..Facts::default()
            },
        };
        let draft = |rid: &str| draft_at(rid, "/civgate.v1.Exchange/Publish");
        let record_at = |log: &AuditLog, i: u64| {
            let log = log.clone();
            async move {
                let leaf = log.entries(i, i + 1).await.unwrap().remove(0);
                AuditRecord::decode(leaf.as_slice()).unwrap()
            }
        };

        let start = log.size();
        let first = journal
            .publish_audited(
                "population",
                "k1",
                POPULATION,
                vec![1],
                None,
                Some(draft("r1")),
            )
            .await;
        let receipt = first.result.unwrap();
        assert_eq!(first.audit_index, Some(start));
        assert_eq!(
            log.size(),
            start + 1,
            "the record is durable with the receipt"
        );
        let rec = record_at(&log, start).await;
        assert_eq!(
            (rec.index, rec.outcome.as_str(), rec.request_id.as_str()),
            (start, "OK", "r1")
        );
        assert_eq!(rec.method, "/civgate.v1.Exchange/Publish");
        assert_eq!(rec.role, "population_db");
        assert_eq!(rec.subject_personal_ids, ["031200000001"]);
        assert_eq!(rec.fields_returned, ["event:personal_id_assigned"]);

        let retry = journal
            .publish_audited(
                "population",
                "k1",
                POPULATION,
                vec![1],
                None,
                Some(draft("r2")),
            )
            .await;
        assert_eq!(retry.result.unwrap(), receipt);
        assert_eq!(
            record_at(&log, retry.audit_index.unwrap()).await.outcome,
            "OK"
        );
        let clash = journal
            .publish_audited(
                "population",
                "k1",
                POPULATION,
                vec![2],
                None,
                Some(draft("r3")),
            )
            .await;
        assert!(matches!(clash.result, Err(JournalError::Conflict(_))));
        let rec = record_at(&log, clash.audit_index.unwrap()).await;
        assert_eq!(
            (rec.outcome.as_str(), rec.request_id.as_str()),
            ("ALREADY_EXISTS", "r3")
        );
        // Without a draft nothing is recorded by the journal.
        let plain = journal
            .publish_audited("population", "k2", POPULATION, vec![3], None, None)
            .await;
        assert_eq!(plain.audit_index, None);
        assert_eq!(plain.result.unwrap().sequence, receipt.sequence + 1);

        // An acknowledgement and a rejection commit their calls' records with them too.
        let bare = |rid: &str, path: &str| Draft {
            facts: Facts::default(),
            ..draft_at(rid, path)
        };
        let acked = journal
            .ack_audited(
                POPULATION,
                &Group::new("a", "g"),
                receipt.sequence,
                Some(bare("r4", "/civgate.v1.Exchange/Ack")),
            )
            .await
            .unwrap();
        assert_eq!(acked, Some(start + 3));
        let rejected = journal
            .reject_audited(
                POPULATION,
                &Group::new("a", "g"),
                receipt.sequence + 1,
                "no such citizen",
                Some(bare("r5", "/civgate.v1.Exchange/Reject")),
            )
            .await
            .unwrap();
        assert_eq!(rejected, Some(start + 4));
        assert_eq!(log.size(), start + 5);
        for (i, rid, method) in [
            (start + 3, "r4", "/civgate.v1.Exchange/Ack"),
            (start + 4, "r5", "/civgate.v1.Exchange/Reject"),
        ] {
            let rec = record_at(&log, i).await;
            assert_eq!(
                (
                    rec.request_id.as_str(),
                    rec.method.as_str(),
                    rec.outcome.as_str()
                ),
                (rid, method, "OK")
            );
            assert!(rec.subject_personal_ids.is_empty());
        }
        // A record alone (a subscription's delivery) commits with its detail, and nothing of
        // the journal changes.
        let heads = journal.head(POPULATION).map(|h| *h.borrow());
        let delivered = journal
            .record(
                draft_at("r6", "/civgate.v1.Exchange/Subscribe"),
                "delivered:population:g:1-2".into(),
            )
            .await
            .unwrap();
        assert_eq!(delivered, Some(start + 5));
        let rec = record_at(&log, start + 5).await;
        assert_eq!(
            (
                rec.method.as_str(),
                rec.outcome.as_str(),
                rec.detail.as_str()
            ),
            (
                "/civgate.v1.Exchange/Subscribe",
                "OK",
                "delivered:population:g:1-2"
            )
        );
        assert_eq!(rec.subject_personal_ids, ["031200000001"]);
        assert_eq!(journal.head(POPULATION).map(|h| *h.borrow()), heads);
        let groups = journal
            .status(&receipt.event_id)
            .await
            .unwrap()
            .unwrap()
            .groups;
        assert!(
            groups.contains(&(Group::new("a", "g"), GroupState::Acknowledged)),
            "{groups:?}"
        );
        // Without a draft, nothing.
        journal
            .ack(POPULATION, &Group::new("a", "g"), receipt.sequence)
            .await
            .unwrap();
        assert_eq!(log.size(), start + 6);

        // Both writers at once: every index once, one tree.
        let mut tasks = Vec::new();
        for t in 0..4u8 {
            let (journal, log) = (journal.clone(), log.clone());
            let drafts: Vec<Draft> = (0..25).map(|i| draft(&format!("t{t}-{i}"))).collect();
            tasks.push(tokio::spawn(async move {
                let mut indexes = Vec::new();
                for (i, d) in drafts.into_iter().enumerate() {
                    let key = format!("c{t}-{i}");
                    let p = journal
                        .publish_audited(
                            "population",
                            &key,
                            POPULATION,
                            vec![t, i as u8],
                            None,
                            Some(d),
                        )
                        .await;
                    p.result.unwrap();
                    indexes.push(p.audit_index.unwrap());
                    let rec = AuditRecord {
                        method: "/civgate.v1.Citizens/GetCitizen".into(),
                        outcome: "OK".into(),
                        ..AuditRecord::default()
                    };
                    indexes.push(log.append(rec).await.unwrap());
                }
                indexes
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all.sort_unstable();
        let size = log.size();
        assert_eq!(all, (start + 6..size).collect::<Vec<u64>>());
        log.assert_every_entry_proves(size).await;
        for i in 0..size {
            assert_eq!(
                record_at(&log, i).await.index,
                i,
                "leaf {i} names its own index"
            );
        }
        drop((journal, log));

        // Reopened: the same log, the same heads.
        let log = open_log().await;
        assert_eq!(log.size(), size);
        let journal = Journal::open(&store, None, Some(log.tail()), &Policy::default())
            .await
            .unwrap();
        assert_eq!(
            *journal.head(POPULATION).unwrap().borrow(),
            receipt.sequence + 101
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn publishes_and_their_records_commit_together_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        publishes_and_their_records_commit_together(Store::Sqlite(dir.path().into())).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn publishes_and_their_records_commit_together_on_postgres() {
        crate::store::with_test_postgres(
            "journal_audited",
            publishes_and_their_records_commit_together,
        )
        .await;
    }

    /// A data directory of an earlier release — the journal in `journal.sqlite` — opens with its
    /// events, heads, acknowledgements and rejections in the store file, and keeps counting.
    #[tokio::test]
    async fn a_journal_in_its_own_file_moves_into_the_store_file() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("journal.sqlite");
        let mut c = SqliteConnection::connect_with(
            &crate::sqlite::options(&old, Duration::from_secs(5)).unwrap(),
        )
        .await
        .unwrap();
        // That release's tables: groups without owners, events without audiences.
        sqlx::raw_sql(
            "CREATE TABLE journal_events (topic TEXT NOT NULL, seq INTEGER NOT NULL, \
               event_id TEXT NOT NULL UNIQUE, producer TEXT NOT NULL, idempotency_key TEXT NOT NULL, \
               payload BLOB NOT NULL, payload_hash BLOB NOT NULL, recorded_at_ms INTEGER NOT NULL, \
               PRIMARY KEY (topic, seq)) WITHOUT ROWID;
             CREATE TABLE journal_rejections (topic TEXT NOT NULL, grp TEXT NOT NULL, seq INTEGER NOT NULL, \
               reason TEXT NOT NULL, at_ms INTEGER NOT NULL, PRIMARY KEY (topic, seq, grp)) WITHOUT ROWID;
             CREATE TABLE journal_heads (topic TEXT PRIMARY KEY, head INTEGER NOT NULL) WITHOUT ROWID;
             CREATE TABLE journal_groups (topic TEXT NOT NULL, grp TEXT NOT NULL, acked INTEGER NOT NULL, \
               PRIMARY KEY (topic, grp)) WITHOUT ROWID;",
        )
        .execute(&mut c)
        .await
        .unwrap();
        for seq in 1..=3i64 {
            sqlx::query(
                "INSERT INTO journal_events (topic, seq, event_id, producer, idempotency_key, \
                 payload, payload_hash, recorded_at_ms) VALUES ($1, $2, $3, 'population', $4, $5, $6, 1)",
            )
            .bind(POPULATION)
            .bind(seq)
            .bind(format!("e{seq}"))
            .bind(format!("k{seq}"))
            .bind(vec![seq as u8])
            .bind(Sha256::digest([seq as u8]).to_vec())
            .execute(&mut c)
            .await
            .unwrap();
        }
        sqlx::raw_sql(
            "INSERT INTO journal_heads VALUES ('population', 3);
             INSERT INTO journal_groups VALUES ('population', 'g', 2);
             INSERT INTO journal_rejections VALUES ('population', 'g', 3, 'no such citizen', 1);",
        )
        .execute(&mut c)
        .await
        .unwrap();
        c.close().await.unwrap();

        let mut policy = Policy::default();
        policy.agencies.insert(
            "registry-hp".parse().unwrap(),
            crate::policy::Agency {
                consumer_groups: Arc::from(["g".to_owned()]),
                ..crate::policy::Agency::of_role(crate::domain::Role::CivilRegistry)
            },
        );
        let j = Journal::open(&Store::Sqlite(dir.path().into()), None, None, &policy)
            .await
            .unwrap();
        assert!(!old.exists() && dir.path().join("journal.sqlite.migrated").exists());
        let events = j.read(POPULATION, 1, 3, 10, None).await.unwrap().events;
        assert_eq!(
            events
                .iter()
                .map(|e| e.event_id.as_str())
                .collect::<Vec<_>>(),
            ["e1", "e2", "e3"]
        );
        assert_eq!(
            *j.acked(POPULATION, &Group::new("registry-hp", "g"))
                .await
                .unwrap()
                .borrow(),
            2
        );
        let status = j.status("e3").await.unwrap().unwrap();
        assert_eq!(
            status.groups,
            [(
                Group::new("registry-hp", "g"),
                GroupState::Rejected("no such citizen".into())
            )]
        );
        // A retry of an old key still finds its receipt; a new event continues the sequence.
        let again = j
            .publish("population", "k2", POPULATION, vec![2])
            .await
            .unwrap();
        assert_eq!((again.event_id.as_str(), again.sequence), ("e2", 2));
        let next = j
            .publish("population", "k4", POPULATION, vec![4])
            .await
            .unwrap();
        assert_eq!(next.sequence, 4);
    }
}
