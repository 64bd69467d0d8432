//! The journal's reads: pages of events for subscribers, an event's status, backlogs, dead
//! letters. They run on a reader pool of either store with the same SQL ([`with_reader`]),
//! except a page on SQLite, which comes as one row ([`super::sqlite::page`]).

use tokio::sync::watch;

use super::{EventStatus, Found, Group, GroupState, Journal, JournalError, Page, Stored};
use crate::store::{Reader, with_reader};

/// The query of a page of events, one row each: topic `$1`, sequences `$2..=$3`, at most `$4`;
/// a payload larger than `$5` bytes comes as NULL (`octet_length` reads a size, not the bytes)
/// and is read on its own ([`Journal::read`]). With `scope` tokens (`$6`…), only the events
/// whose audience holds one of them ([`address::matches`], in SQL: `instr` on SQLite, `strpos`
/// on PostgreSQL). Built only from constants and numbered placeholders.
pub(super) fn page_rows(pg: bool, scope: usize) -> String {
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
pub(super) fn scope_expr(pg: bool, n: usize, first: usize) -> String {
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

impl Journal {
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
                let sql = super::sqlite::page(tokens.len());
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
                super::sqlite::parse_page(&page)?
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
pub(super) type EventRow = (i64, String, String, Option<Vec<u8>>, i64);
