//! The open requests of the flow table (cases with statutory deadlines): listed by producer,
//! awaited topic, case, kind, overdue or not; counted for `/metrics`. The same SQL on both
//! stores ([`with_reader`]).

use std::collections::BTreeMap;

use super::{Journal, JournalError};
use crate::store::with_reader;

/// One request a flow asks an answer for, open or answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenRequest {
    pub event_id: String,
    /// The answer kind awaited (e.g. `personal_id_assigned`).
    pub answer: String,
    pub flow: String,
    /// The agency that published the request.
    pub producer: String,
    /// The request's kind (e.g. `birth`).
    pub kind: String,
    pub case_reference: String,
    /// The topic whose producers answer (`population`: the population database).
    pub awaiting: String,
    pub opened_at_ms: i64,
    pub due_at_ms: i64,
    pub answered_at_ms: Option<i64>,
    pub answer_event: Option<String>,
    pub answered_by: Option<String>,
    /// Answered after its due time.
    pub late: bool,
}

impl OpenRequest {
    pub fn is_overdue(&self, now_ms: i64) -> bool {
        self.answered_at_ms.is_none() && self.due_at_ms < now_ms
    }
}

/// Which requests to list (every filter optional), in event order from after `after`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestFilter {
    /// Only this agency's requests.
    pub producer: Option<String>,
    /// Only those awaiting an answer from this topic's producers.
    pub awaiting: Option<String>,
    /// Only the unanswered ones.
    pub open_only: bool,
    /// Only the unanswered ones whose due time is before this (Unix ms).
    pub overdue_at: Option<i64>,
    pub case_reference: Option<String>,
    pub kind: Option<String>,
    /// Resume after this (event id, answer kind).
    pub after: Option<(String, String)>,
    pub limit: u32,
}

/// What `/metrics` shows of the requests.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RequestStats {
    /// (awaited topic, request kind) → (open, of which overdue).
    pub open: BTreeMap<(String, String), (u64, u64)>,
    /// (answering agency, answer kind) → answer times in ms of the answers of the window.
    pub answer_ms: BTreeMap<(String, String), Vec<i64>>,
    /// (answering agency, answer kind) → answers of the window after their due time.
    pub late: BTreeMap<(String, String), u64>,
}

enum Bind {
    Text(String),
    Int(i64),
}

type Row = (
    String,
    String,
    String,
    String,
    String,
    String,
    String,
    i64,
    i64,
    Option<i64>,
    Option<String>,
    Option<String>,
    i64,
);

/// The query for `f` and its binds, in placeholder order. Built only from constants and
/// numbered placeholders.
fn list_sql(f: &RequestFilter) -> (String, Vec<Bind>) {
    let mut conds: Vec<String> = Vec::new();
    let mut binds = Vec::new();
    for (column, value) in [
        ("producer", &f.producer),
        ("awaiting", &f.awaiting),
        ("case_reference", &f.case_reference),
        ("kind", &f.kind),
    ] {
        if let Some(v) = value {
            binds.push(Bind::Text(v.clone()));
            conds.push(format!("{column} = ${}", binds.len()));
        }
    }
    if f.open_only || f.overdue_at.is_some() {
        conds.push("answered_at_ms IS NULL".into());
    }
    if let Some(now) = f.overdue_at {
        binds.push(Bind::Int(now));
        conds.push(format!("due_at_ms < ${}", binds.len()));
    }
    if let Some((e, a)) = &f.after {
        binds.push(Bind::Text(e.clone()));
        binds.push(Bind::Text(a.clone()));
        let n = binds.len();
        conds.push(format!(
            "(event_id > ${} OR (event_id = ${} AND answer > ${}))",
            n - 1,
            n - 1,
            n
        ));
    }
    binds.push(Bind::Int(i64::from(f.limit.max(1))));
    let limit = binds.len();
    let sql = format!(
        "SELECT event_id, answer, flow, producer, kind, case_reference, awaiting, opened_at_ms, \
           due_at_ms, answered_at_ms, answer_event, answered_by, late \
         FROM journal_requests{}{} ORDER BY event_id, answer LIMIT ${limit}",
        if conds.is_empty() { "" } else { " WHERE " },
        conds.join(" AND ")
    );
    (sql, binds)
}

impl Journal {
    /// The event that answers `asked` with an answer of `kind`, if one is stored.
    pub async fn answer_of(&self, asked: &str, kind: &str) -> Result<Option<String>, JournalError> {
        with_reader!(&self.reader, |pool| {
            sqlx::query_scalar::<_, String>(
                "SELECT event_id FROM journal_answers WHERE asked = $1 AND kind = $2",
            )
            .bind(asked)
            .bind(kind)
            .fetch_optional(pool)
            .await
        })
        .map_err(|e| JournalError::Read(e.to_string()))
    }
}

/// Answers counted per window for the answer-time quantiles, at most.
const STATS_ANSWERS: i64 = 100_000;

impl Journal {
    /// The requests `f` selects, in event order (event ids are time-ordered).
    pub async fn requests(&self, f: &RequestFilter) -> Result<Vec<OpenRequest>, JournalError> {
        let (sql, binds) = list_sql(f);
        let rows: Vec<Row> = with_reader!(&self.reader, |pool| {
            let mut q = sqlx::query_as::<_, Row>(sqlx::AssertSqlSafe(sql.clone()));
            for b in &binds {
                q = match b {
                    Bind::Text(t) => q.bind(t.as_str()),
                    Bind::Int(i) => q.bind(*i),
                };
            }
            q.fetch_all(pool).await
        })
        .map_err(|e| JournalError::Read(e.to_string()))?;
        Ok(rows
            .into_iter()
            .map(
                |(
                    event_id,
                    answer,
                    flow,
                    producer,
                    kind,
                    case_reference,
                    awaiting,
                    opened_at_ms,
                    due_at_ms,
                    answered_at_ms,
                    answer_event,
                    answered_by,
                    late,
                )| OpenRequest {
                    event_id,
                    answer,
                    flow,
                    producer,
                    kind,
                    case_reference,
                    awaiting,
                    opened_at_ms,
                    due_at_ms,
                    answered_at_ms,
                    answer_event,
                    answered_by,
                    late: late != 0,
                },
            )
            .collect())
    }

    /// Open and overdue requests at `now_ms`, and the answers given since `since_ms`.
    pub async fn request_stats(
        &self,
        now_ms: i64,
        since_ms: i64,
    ) -> Result<RequestStats, JournalError> {
        let read = |e: sqlx::Error| JournalError::Read(e.to_string());
        let open: Vec<(String, String, i64, i64)> = with_reader!(&self.reader, |pool| {
            sqlx::query_as(
                "SELECT awaiting, kind, count(*), \
                   coalesce(sum(CASE WHEN due_at_ms < $1 THEN 1 ELSE 0 END), 0) \
                 FROM journal_requests WHERE answered_at_ms IS NULL GROUP BY awaiting, kind",
            )
            .bind(now_ms)
            .fetch_all(pool)
            .await
        })
        .map_err(read)?;
        let answered: Vec<(Option<String>, String, i64, i64)> =
            with_reader!(&self.reader, |pool| {
                sqlx::query_as(
                    "SELECT answered_by, answer, answered_at_ms - opened_at_ms, late \
                     FROM journal_requests WHERE answered_at_ms >= $1 \
                     ORDER BY answered_at_ms DESC LIMIT $2",
                )
                .bind(since_ms)
                .bind(STATS_ANSWERS)
                .fetch_all(pool)
                .await
            })
            .map_err(read)?;
        let mut stats = RequestStats::default();
        for (awaiting, kind, n, overdue) in open {
            stats
                .open
                .insert((awaiting, kind), (n.max(0) as u64, overdue.max(0) as u64));
        }
        for (by, answer, ms, late) in answered {
            let key = (by.unwrap_or_default(), answer);
            if late != 0 {
                *stats.late.entry(key.clone()).or_default() += 1;
            }
            stats.answer_ms.entry(key).or_default().push(ms);
        }
        Ok(stats)
    }
}

/// The `q` quantile (0..=1) of `v` (nearest rank), `None` for no values.
pub fn quantile(v: &mut [i64], q: f64) -> Option<i64> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_query_binds_each_filter_in_order() {
        let (sql, binds) = list_sql(&RequestFilter {
            producer: Some("registry-hp".into()),
            overdue_at: Some(5),
            after: Some(("e1".into(), "personal_id_assigned".into())),
            limit: 10,
            ..RequestFilter::default()
        });
        assert!(
            sql.contains("WHERE producer = $1 AND answered_at_ms IS NULL AND due_at_ms < $2 AND (event_id > $3 OR (event_id = $3 AND answer > $4)) ORDER BY event_id, answer LIMIT $5"),
            "{sql}"
        );
        assert_eq!(binds.len(), 5);
        let (sql, binds) = list_sql(&RequestFilter::default());
        assert!(
            sql.ends_with("FROM journal_requests ORDER BY event_id, answer LIMIT $1"),
            "{sql}"
        );
        assert_eq!(binds.len(), 1);
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let mut v = vec![5, 1, 4, 2, 3];
        assert_eq!(quantile(&mut v, 0.5), Some(3));
        assert_eq!(quantile(&mut v, 0.99), Some(5));
        assert_eq!(quantile(&mut v, 0.0), Some(1));
        assert_eq!(quantile(&mut [], 0.5), None);
    }
}
