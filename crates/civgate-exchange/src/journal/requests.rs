//! The open requests of the flow table (cases with statutory deadlines): listed by producer,
//! awaited topic, case, kind, overdue or not; counted for `/metrics`. The same SQL on both
//! stores ([`with_reader`]).
//!
//! `journal_requests` holds one row per request event, written with it: its steps (one per
//! answer a flow asks, [`Step`]) in one column, and the earliest due time of those still
//! unanswered in `due_at_ms` (NULL once all are answered), the one column the index of open
//! requests holds. An answer rewrites its request's row in the answer's transaction. A row
//! per step, with the indexes a listing by step would want, cost a linked birth four times
//! the index writes of the birth itself.

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

/// One step of a request, as its row stores it: the flow, the answer awaited, its due time,
/// and once answered, when, by which event, of which agency. In the row's `steps` column as a
/// JSON array of `[flow, answer, due_at_ms]` (open) or `[flow, answer, due_at_ms,
/// answered_at_ms, answer_event, answered_by]` (answered). The awaited topic is the answer
/// kind's ([`crate::cases::awaited_topic`]), not stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Step {
    pub(super) flow: String,
    pub(super) answer: String,
    pub(super) due_at_ms: i64,
    /// (answered at, answering event, its producer).
    pub(super) answered: Option<(i64, String, String)>,
}

impl Step {
    pub(super) fn open(flow: &str, answer: &str, due_at_ms: i64) -> Self {
        Step {
            flow: flow.to_owned(),
            answer: answer.to_owned(),
            due_at_ms,
            answered: None,
        }
    }
}

/// The `steps` column of `steps`. Written without building a JSON value: flow names, answer
/// kinds, event ids and agency ids are plain identifiers (anything else is escaped).
pub(super) fn encode_steps(steps: &[Step]) -> String {
    use std::fmt::Write;
    fn text(out: &mut String, s: &str) {
        if s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            out.push('"');
            out.push_str(s);
            out.push('"');
        } else {
            out.push_str(&serde_json::Value::String(s.to_owned()).to_string());
        }
    }
    let mut out = String::with_capacity(64 * steps.len() + 2);
    out.push('[');
    for (i, s) in steps.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('[');
        text(&mut out, &s.flow);
        out.push(',');
        text(&mut out, &s.answer);
        let _ = write!(out, ",{}", s.due_at_ms);
        if let Some((at, event, by)) = &s.answered {
            let _ = write!(out, ",{at},");
            text(&mut out, event);
            out.push(',');
            text(&mut out, by);
        }
        out.push(']');
    }
    out.push(']');
    out
}

/// The steps of a `steps` column; an error names what is wrong (a row altered by hand, say).
pub(super) fn decode_steps(text: &str) -> Result<Vec<Step>, String> {
    use serde_json::Value;
    let v: Value = serde_json::from_str(text).map_err(|e| format!("steps: {e}"))?;
    let Value::Array(items) = v else {
        return Err("steps: not an array".into());
    };
    items
        .iter()
        .map(|item| {
            let bad = || format!("steps: {item} is not [flow, answer, due] or [flow, answer, due, answered_at, event, agency]");
            let a = item.as_array().ok_or_else(bad)?;
            let text = |i: usize| a.get(i).and_then(Value::as_str).map(str::to_owned).ok_or_else(bad);
            let int = |i: usize| a.get(i).and_then(Value::as_i64).ok_or_else(bad);
            let answered = match a.len() {
                3 => None,
                6 => Some((int(3)?, text(4)?, text(5)?)),
                _ => return Err(bad()),
            };
            Ok(Step {
                flow: text(0)?,
                answer: text(1)?,
                due_at_ms: int(2)?,
                answered,
            })
        })
        .collect()
}

/// The earliest due time of the unanswered steps (`None`: every step is answered): the row's
/// `due_at_ms`, which the index of open requests holds.
pub(super) fn earliest_open_due(steps: &[Step]) -> Option<i64> {
    steps
        .iter()
        .filter(|s| s.answered.is_none())
        .map(|s| s.due_at_ms)
        .min()
}

/// Marks the unanswered step awaiting `kind` answered (at `at_ms` by `event` of `by`); false
/// when there is none (the flow table asked no such answer, or it is answered already).
pub(super) fn answer_step(
    steps: &mut [Step],
    kind: &str,
    at_ms: i64,
    event: &str,
    by: &str,
) -> bool {
    match steps
        .iter_mut()
        .find(|s| s.answer == kind && s.answered.is_none())
    {
        Some(s) => {
            s.answered = Some((at_ms, event.to_owned(), by.to_owned()));
            true
        }
        None => false,
    }
}

enum Bind {
    Text(String),
    Int(i64),
}

/// A request's row: event id, producer, kind, case, opened at, steps.
type Row = (String, String, String, String, i64, String);

/// Request rows read per query while a listing fills its page.
const LIST_CHUNK: i64 = 256;

/// The query of the rows that may hold steps `f` selects, from event `from` (`true`: that
/// event included) on, `chunk` at most, and its binds in placeholder order. The row-level
/// filters (producer, case, kind) are exact; open and overdue select the rows with such a step
/// (the row's `due_at_ms` is its earliest open step's); awaited topic and the page position
/// within an event are checked per step ([`RequestFilter::admits`]). Built only from constants
/// and numbered placeholders.
fn list_sql(f: &RequestFilter, from: Option<(&str, bool)>, chunk: i64) -> (String, Vec<Bind>) {
    let mut conds: Vec<String> = Vec::new();
    let mut binds = Vec::new();
    for (column, value) in [
        ("producer", &f.producer),
        ("case_reference", &f.case_reference),
        ("kind", &f.kind),
    ] {
        if let Some(v) = value {
            binds.push(Bind::Text(v.clone()));
            conds.push(format!("{column} = ${}", binds.len()));
        }
    }
    if let Some(case) = &f.case_reference {
        // The case's requests: those the writer has indexed and those still queued (one
        // statement, one snapshot: a request is in one of the two, `Dialect::index_cases`).
        binds.push(Bind::Text(case.clone()));
        binds.push(Bind::Text(case.clone()));
        conds.push(format!(
            "event_id IN (SELECT event_id FROM journal_request_cases WHERE case_reference = ${} \
             UNION ALL SELECT event_id FROM journal_request_cases_pending WHERE case_reference = ${})",
            binds.len() - 1,
            binds.len()
        ));
    }
    if f.open_only || f.overdue_at.is_some() {
        conds.push("due_at_ms IS NOT NULL".into());
    }
    if let Some(now) = f.overdue_at {
        binds.push(Bind::Int(now));
        conds.push(format!("due_at_ms < ${}", binds.len()));
    }
    if let Some((event, inclusive)) = from {
        binds.push(Bind::Text(event.to_owned()));
        let op = if inclusive { ">=" } else { ">" };
        conds.push(format!("event_id {op} ${}", binds.len()));
    }
    binds.push(Bind::Int(chunk));
    let limit = binds.len();
    let sql = format!(
        "SELECT event_id, producer, kind, case_reference, opened_at_ms, steps \
         FROM journal_requests{}{} ORDER BY event_id LIMIT ${limit}",
        if conds.is_empty() { "" } else { " WHERE " },
        conds.join(" AND ")
    );
    (sql, binds)
}

impl RequestFilter {
    /// Whether the step `r` is one this filter lists (the row-level filters hold already).
    fn admits(&self, r: &OpenRequest) -> bool {
        self.awaiting.as_deref().is_none_or(|t| r.awaiting == t)
            && (!self.open_only || r.answered_at_ms.is_none())
            && self.overdue_at.is_none_or(|now| r.is_overdue(now))
            && self.after.as_ref().is_none_or(|(e, a)| {
                r.event_id.as_str() > e.as_str()
                    || (r.event_id == *e && r.answer.as_str() > a.as_str())
            })
    }
}

/// The steps of a request's row, one listed request each, in answer-kind order. A row whose
/// steps do not decode is an error naming it: a listing never silently leaves requests out.
fn expand(row: Row) -> Result<Vec<OpenRequest>, JournalError> {
    let (event_id, producer, kind, case_reference, opened_at_ms, steps) = row;
    let mut steps =
        decode_steps(&steps).map_err(|e| JournalError::Read(format!("request {event_id}: {e}")))?;
    steps.sort_by(|a, b| a.answer.cmp(&b.answer));
    Ok(steps
        .into_iter()
        .map(|s| {
            let (answered_at_ms, answer_event, answered_by) = match s.answered {
                Some((at, event, by)) => (Some(at), Some(event), Some(by)),
                None => (None, None, None),
            };
            OpenRequest {
                event_id: event_id.clone(),
                awaiting: crate::cases::awaited_topic(&s.answer).to_owned(),
                answer: s.answer,
                flow: s.flow,
                producer: producer.clone(),
                kind: kind.clone(),
                case_reference: case_reference.clone(),
                opened_at_ms,
                due_at_ms: s.due_at_ms,
                late: answered_at_ms.is_some_and(|at| at > s.due_at_ms),
                answered_at_ms,
                answer_event,
                answered_by,
            }
        })
        .collect())
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

    async fn request_rows(&self, sql: &str, binds: &[Bind]) -> Result<Vec<Row>, JournalError> {
        with_reader!(&self.reader, |pool| {
            let mut q = sqlx::query_as::<_, Row>(sqlx::AssertSqlSafe(sql.to_owned()));
            for b in binds {
                q = match b {
                    Bind::Text(t) => q.bind(t.as_str()),
                    Bind::Int(i) => q.bind(*i),
                };
            }
            q.fetch_all(pool).await
        })
        .map_err(|e| JournalError::Read(e.to_string()))
    }
}

/// Answers counted per window for the answer-time quantiles, at most.
const STATS_ANSWERS: i64 = 100_000;

impl Journal {
    /// The requests `f` selects, one per step, in event order (event ids are time-ordered)
    /// and answer-kind order within an event; at most `f.limit`.
    pub async fn requests(&self, f: &RequestFilter) -> Result<Vec<OpenRequest>, JournalError> {
        let limit = f.limit.max(1) as usize;
        let mut out = Vec::new();
        let mut from = f.after.as_ref().map(|(e, _)| (e.clone(), true));
        let chunk = LIST_CHUNK.max(limit as i64);
        loop {
            let (sql, binds) = list_sql(f, from.as_ref().map(|(e, i)| (e.as_str(), *i)), chunk);
            let rows = self.request_rows(&sql, &binds).await?;
            let n = rows.len() as i64;
            for row in rows {
                let event = row.0.clone();
                for r in expand(row)? {
                    if f.admits(&r) {
                        out.push(r);
                        if out.len() == limit {
                            return Ok(out);
                        }
                    }
                }
                from = Some((event, false));
            }
            if n < chunk {
                return Ok(out);
            }
        }
    }

    /// Open and overdue requests at `now_ms`, and the answers given since `since_ms`.
    pub async fn request_stats(
        &self,
        now_ms: i64,
        since_ms: i64,
    ) -> Result<RequestStats, JournalError> {
        let read = |e: sqlx::Error| JournalError::Read(e.to_string());
        let open: Vec<(String, String, String)> = with_reader!(&self.reader, |pool| {
            sqlx::query_as(
                "SELECT event_id, kind, steps FROM journal_requests WHERE due_at_ms IS NOT NULL",
            )
            .fetch_all(pool)
            .await
        })
        .map_err(read)?;
        let answered: Vec<(String, i64, String)> = with_reader!(&self.reader, |pool| {
            sqlx::query_as(
                "SELECT event_id, opened_at_ms, steps FROM journal_requests \
                 WHERE answered_at_ms >= $1 ORDER BY answered_at_ms DESC LIMIT $2",
            )
            .bind(since_ms)
            .bind(STATS_ANSWERS)
            .fetch_all(pool)
            .await
        })
        .map_err(read)?;
        // A row that does not decode is left out of the counts (logged), not the whole view:
        // a listing that reaches it names it.
        let decode = |event: &str, steps: &str| {
            decode_steps(steps).unwrap_or_else(|e| {
                tracing::error!(request = event, error = %e, "open request not counted: its row does not decode");
                Vec::new()
            })
        };
        let mut stats = RequestStats::default();
        for (event, kind, steps) in open {
            for s in decode(&event, &steps) {
                if s.answered.is_some() {
                    continue;
                }
                let key = (
                    crate::cases::awaited_topic(&s.answer).to_owned(),
                    kind.clone(),
                );
                let e = stats.open.entry(key).or_default();
                e.0 += 1;
                if s.due_at_ms < now_ms {
                    e.1 += 1;
                }
            }
        }
        for (event, opened, steps) in answered {
            for s in decode(&event, &steps) {
                let Some((at, _, by)) = s.answered else {
                    continue;
                };
                if at < since_ms {
                    continue;
                }
                let key = (by, s.answer);
                if at > s.due_at_ms {
                    *stats.late.entry(key.clone()).or_default() += 1;
                }
                stats.answer_ms.entry(key).or_default().push(at - opened);
            }
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
        let f = RequestFilter {
            producer: Some("registry-hp".into()),
            overdue_at: Some(5),
            after: Some(("e1".into(), "personal_id_assigned".into())),
            limit: 10,
            ..RequestFilter::default()
        };
        let (sql, binds) = list_sql(&f, Some(("e1", true)), 256);
        assert!(
            sql.contains("WHERE producer = $1 AND due_at_ms IS NOT NULL AND due_at_ms < $2 AND event_id >= $3 ORDER BY event_id LIMIT $4"),
            "{sql}"
        );
        assert_eq!(binds.len(), 4);
        let (sql, _) = list_sql(&f, Some(("e2", false)), 256);
        assert!(sql.contains("event_id > $3"), "{sql}");
        let (sql, binds) = list_sql(&RequestFilter::default(), None, 256);
        assert!(
            sql.ends_with("FROM journal_requests ORDER BY event_id LIMIT $1"),
            "{sql}"
        );
        assert_eq!(binds.len(), 1);
        // A case: the two tables that hold requests' cases, both bound.
        let case = RequestFilter {
            case_reference: Some("HP-1".into()),
            kind: Some("birth".into()),
            ..RequestFilter::default()
        };
        let (sql, binds) = list_sql(&case, None, 256);
        assert!(
            sql.contains("WHERE case_reference = $1 AND kind = $2 AND event_id IN (SELECT event_id FROM journal_request_cases WHERE case_reference = $3 UNION ALL SELECT event_id FROM journal_request_cases_pending WHERE case_reference = $4) ORDER BY event_id LIMIT $5"),
            "{sql}"
        );
        assert_eq!(binds.len(), 5);
    }

    fn step(answer: &str, due: i64) -> Step {
        Step::open("f", answer, due)
    }

    #[test]
    fn steps_round_trip_and_bad_ones_are_named() {
        let mut steps = vec![
            step("personal_id_assigned", 10),
            step("health_insurance_card_issued", 20),
        ];
        assert_eq!(decode_steps(&encode_steps(&steps)).unwrap(), steps);
        assert_eq!(
            encode_steps(&steps),
            r#"[["f","personal_id_assigned",10],["f","health_insurance_card_issued",20]]"#
        );
        // What is not a plain identifier is escaped, and comes back as it was.
        let odd = vec![Step {
            answered: Some((-1, "a\"b\\c".into(), "hải phòng\n".into())),
            ..Step::open("flow \u{1}", "x", i64::MIN)
        }];
        assert_eq!(decode_steps(&encode_steps(&odd)).unwrap(), odd);
        assert!(answer_step(
            &mut steps,
            "personal_id_assigned",
            15,
            "ev",
            "population"
        ));
        assert!(
            !answer_step(&mut steps, "personal_id_assigned", 16, "ev2", "population"),
            "answered once"
        );
        assert!(
            !answer_step(&mut steps, "funeral_allowance_decided", 16, "ev2", "x"),
            "not asked"
        );
        assert_eq!(decode_steps(&encode_steps(&steps)).unwrap(), steps);
        for bad in [
            "",
            "{}",
            "[1]",
            "[[\"f\",\"a\"]]",
            "[[\"f\",\"a\",1,2]]",
            "[[\"f\",\"a\",\"x\"]]",
        ] {
            assert!(decode_steps(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_row_is_due_at_its_earliest_open_step() {
        let mut steps = vec![step("a", 30), step("b", 10), step("c", 20)];
        assert_eq!(earliest_open_due(&steps), Some(10));
        answer_step(&mut steps, "b", 5, "e", "x");
        assert_eq!(earliest_open_due(&steps), Some(20));
        answer_step(&mut steps, "a", 5, "e", "x");
        answer_step(&mut steps, "c", 5, "e", "x");
        assert_eq!(earliest_open_due(&steps), None);
    }

    #[test]
    fn a_listing_admits_steps_per_filter() {
        let row: Row = (
            "e1".into(),
            "registry-hp".into(),
            "birth".into(),
            "HS-1".into(),
            0,
            encode_steps(&[
                step("personal_id_assigned", 10),
                Step {
                    answered: Some((30, "e9".into(), "social".into())),
                    ..step("health_insurance_card_issued", 20)
                },
            ]),
        );
        let steps = expand(row).unwrap();
        let answers: Vec<&str> = steps.iter().map(|s| s.answer.as_str()).collect();
        assert_eq!(
            answers,
            ["health_insurance_card_issued", "personal_id_assigned"]
        );
        assert!(steps[0].late && !steps[1].late);
        assert_eq!(steps[0].awaiting, "social-insurance");
        assert_eq!(steps[1].awaiting, "population");
        let admitted = |f: RequestFilter| -> Vec<&str> {
            steps
                .iter()
                .filter(|s| f.admits(s))
                .map(|s| s.answer.as_str())
                .collect()
        };
        assert_eq!(admitted(RequestFilter::default()).len(), 2);
        assert_eq!(
            admitted(RequestFilter {
                open_only: true,
                ..Default::default()
            }),
            ["personal_id_assigned"]
        );
        assert_eq!(
            admitted(RequestFilter {
                overdue_at: Some(11),
                ..Default::default()
            }),
            ["personal_id_assigned"]
        );
        assert!(
            admitted(RequestFilter {
                overdue_at: Some(10),
                ..Default::default()
            })
            .is_empty()
        );
        assert_eq!(
            admitted(RequestFilter {
                awaiting: Some("social-insurance".into()),
                ..Default::default()
            }),
            ["health_insurance_card_issued"]
        );
        assert_eq!(
            admitted(RequestFilter {
                after: Some(("e1".into(), "health_insurance_card_issued".into())),
                ..Default::default()
            }),
            ["personal_id_assigned"]
        );
        assert_eq!(
            admitted(RequestFilter {
                after: Some(("e0".into(), "z".into())),
                ..Default::default()
            })
            .len(),
            2
        );
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
