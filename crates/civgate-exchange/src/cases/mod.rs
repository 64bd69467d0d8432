//! Cases with statutory deadlines: which requests wait for which answer, from whom, until when.
//!
//! A **flow** (configuration, `[[flows]]`) says that an event of one kind (`request`, e.g. a
//! birth) must be answered with an event of another (`answer`, e.g. `personal_id_assigned`)
//! within a time limit — N working days in Vietnam's calendar ([`calendar`]) or an elapsed
//! time. When a request is published the gateway opens one **open request** per flow it
//! matches, with its due time, in the transaction that commits the event; the answer
//! (`in_reply_to` the request, of the flow's answer kind) closes it in its own transaction and
//! is recorded as late when it comes after the due time. Events of one linked procedure share
//! a `case_reference` (the portal's dossier code).

pub mod calendar;

use std::collections::BTreeSet;

use time::{Duration, OffsetDateTime};

pub use calendar::{Calendar, Within};

use crate::validate::{CIVIL_STATUS, POPULATION, SOCIAL_INSURANCE};

/// One row of the flow table, as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    /// Names the flow in listings and metrics (1-64 of a-z 0-9 - _).
    pub name: String,
    /// The kind of event that asks (a civil-status payload name, e.g. `birth`).
    pub request: &'static str,
    /// The kind of event that answers (e.g. `personal_id_assigned`).
    pub answer: &'static str,
    pub within: Within,
    /// Only requests that name a case (`case_reference`): the linked procedures.
    pub linked_only: bool,
}

/// The kinds of event a flow may ask with: civil-status events.
pub const REQUEST_KINDS: &[&str] = &[
    "birth",
    "death",
    "marriage",
    "divorce",
    "civil_status_change",
    "parent_child_recognition",
    "adoption",
    "guardianship",
    "court_decision",
    "nationality_change",
    "guardianship_ended",
    "adoption_ended",
    "marital_status_confirmed",
];

/// The kinds of event that answer a request (published `in_reply_to` it), and the topic whose
/// producers publish them: the population database's, the social-insurance agency's.
pub const ANSWERS: &[(&str, &str)] = &[
    ("personal_id_assigned", POPULATION),
    ("residence_changed", POPULATION),
    ("death_recorded", POPULATION),
    ("personal_id_reissued", POPULATION),
    ("citizen_data_corrected", POPULATION),
    ("permanent_residence_registered", POPULATION),
    ("permanent_residence_deleted", POPULATION),
    ("health_insurance_card_issued", SOCIAL_INSURANCE),
    ("funeral_allowance_decided", SOCIAL_INSURANCE),
];

/// The answer kinds (the first column of [`ANSWERS`]).
pub const ANSWER_KINDS: &[&str] = &[
    "personal_id_assigned",
    "residence_changed",
    "death_recorded",
    "personal_id_reissued",
    "citizen_data_corrected",
    "permanent_residence_registered",
    "permanent_residence_deleted",
    "health_insurance_card_issued",
    "funeral_allowance_decided",
];

/// The topic whose producers answer `answer` (the role awaited).
pub fn answering_topic(answer: &str) -> Option<&'static str> {
    ANSWERS.iter().find(|(k, _)| *k == answer).map(|(_, t)| *t)
}

/// The topic whose producers answer `answer` (the population database's for a kind it does
/// not know: what the flow table checks keeps that from happening).
pub fn awaited_topic(answer: &str) -> &'static str {
    answering_topic(answer).unwrap_or(POPULATION)
}

/// The request kinds an answer kind may answer; `None`: any (a fact about a citizen the
/// request names).
pub fn answers_only(answer: &str) -> Option<&'static [&'static str]> {
    match answer {
        "personal_id_assigned"
        | "permanent_residence_registered"
        | "health_insurance_card_issued" => Some(&["birth"]),
        "permanent_residence_deleted" | "funeral_allowance_decided" => Some(&["death"]),
        "personal_id_reissued" => Some(&["civil_status_change"]),
        _ => None,
    }
}

/// The topic a request kind is published on.
pub fn request_topic(request: &str) -> Option<&'static str> {
    REQUEST_KINDS.contains(&request).then_some(CIVIL_STATUS)
}

/// A flow as written in the configuration, before it is checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowSpec {
    pub name: String,
    pub request: String,
    pub answer: String,
    pub working_days: Option<u32>,
    pub hours: Option<u32>,
    pub seconds: Option<u32>,
    pub linked_only: bool,
}

impl FlowSpec {
    /// The flow, or what is wrong with it: (key, message) pairs.
    pub fn check(&self) -> Result<Flow, Vec<(&'static str, String)>> {
        let mut problems = Vec::new();
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !name_ok {
            problems.push(("name", "1-64 of a-z 0-9 - _".to_owned()));
        }
        let request = REQUEST_KINDS.iter().find(|k| **k == self.request);
        if request.is_none() {
            problems.push((
                "request",
                format!(
                    "{:?} is not a civil-status event kind ({})",
                    self.request,
                    REQUEST_KINDS.join(", ")
                ),
            ));
        }
        let answer = ANSWER_KINDS.iter().find(|k| **k == self.answer);
        if answer.is_none() {
            problems.push((
                "answer",
                format!(
                    "{:?} is not an answering event kind ({})",
                    self.answer,
                    ANSWER_KINDS.join(", ")
                ),
            ));
        }
        if let (Some(r), Some(only)) = (request, answers_only(&self.answer))
            && !only.contains(r)
        {
            problems.push((
                "answer",
                format!(
                    "a {} answers a {}, not a {r}",
                    self.answer,
                    only.join(" or ")
                ),
            ));
        }
        let within = match (self.working_days, self.hours, self.seconds) {
            (Some(n), None, None) if n >= 1 => Some(Within::WorkingDays(n)),
            (None, Some(h), None) if h >= 1 => Some(Within::Elapsed(Duration::hours(h.into()))),
            (None, None, Some(s)) if s >= 1 => Some(Within::Elapsed(Duration::seconds(s.into()))),
            _ => {
                problems.push((
                    "working_days",
                    "give exactly one of working_days, hours, seconds, at least 1".to_owned(),
                ));
                None
            }
        };
        match (request, answer, within) {
            (Some(request), Some(answer), Some(within)) if problems.is_empty() => Ok(Flow {
                name: self.name.clone(),
                request,
                answer,
                within,
                linked_only: self.linked_only,
            }),
            _ => Err(problems),
        }
    }
}

/// The checked flow table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Flows(Vec<Flow>);

impl Flows {
    /// Checks every flow and that no two share a name or a (request, answer) pair: problems
    /// as (index, key, message).
    pub fn new(specs: &[FlowSpec]) -> Result<Self, Vec<(usize, &'static str, String)>> {
        let mut flows = Vec::new();
        let mut problems = Vec::new();
        let (mut names, mut pairs) = (BTreeSet::new(), BTreeSet::new());
        for (i, spec) in specs.iter().enumerate() {
            match spec.check() {
                Ok(f) => {
                    if !names.insert(f.name.clone()) {
                        problems.push((i, "name", format!("{:?} is used twice", f.name)));
                    }
                    if !pairs.insert((f.request, f.answer)) {
                        problems.push((
                            i,
                            "answer",
                            format!("another flow already asks a {} for {}", f.request, f.answer),
                        ));
                    }
                    flows.push(f);
                }
                Err(p) => problems.extend(p.into_iter().map(|(k, m)| (i, k, m))),
            }
        }
        if problems.is_empty() {
            Ok(Self(flows))
        } else {
            Err(problems)
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Flow> {
        self.0.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The requests an event of `kind` (with this case reference) opens, published `at`.
    pub fn opened_by(
        &self,
        kind: &str,
        case_reference: &str,
        at: OffsetDateTime,
        calendar: &Calendar,
    ) -> Vec<Opening> {
        self.0
            .iter()
            .filter(|f| f.request == kind && (!f.linked_only || !case_reference.is_empty()))
            .map(|f| Opening {
                flow: f.name.clone(),
                answer: f.answer,
                awaiting: awaited_topic(f.answer),
                due_at_ms: unix_ms(f.within.due(calendar, at)),
            })
            .collect()
    }
}

/// An open request a publish records with its event: which answer it waits for, from the
/// producers of which topic, until when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opening {
    pub flow: String,
    pub answer: &'static str,
    /// The topic whose producers answer (`population`: the population database).
    pub awaiting: &'static str,
    pub due_at_ms: i64,
}

pub fn unix_ms(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn spec(name: &str, request: &str, answer: &str) -> FlowSpec {
        FlowSpec {
            name: name.into(),
            request: request.into(),
            answer: answer.into(),
            working_days: Some(1),
            ..FlowSpec::default()
        }
    }

    #[test]
    fn flows_are_checked_row_by_row() {
        type Edit = fn(&mut FlowSpec);
        let rows: &[(Edit, &[&str])] = &[
            (|_| {}, &[]),
            (|s| s.name = "Birth ID".into(), &["name"]),
            (|s| s.name = String::new(), &["name"]),
            (|s| s.request = "personal_id_assigned".into(), &["request"]),
            (|s| s.answer = "birth".into(), &["answer"]),
            (|s| s.working_days = None, &["working_days"]),
            (|s| s.working_days = Some(0), &["working_days"]),
            (|s| s.hours = Some(24), &["working_days"]),
            (
                |s| {
                    s.working_days = None;
                    s.hours = Some(24);
                },
                &[],
            ),
            (
                |s| {
                    s.working_days = None;
                    s.seconds = Some(2);
                },
                &[],
            ),
        ];
        for (i, (edit, keys)) in rows.iter().enumerate() {
            let mut s = spec("birth-id", "birth", "personal_id_assigned");
            edit(&mut s);
            let got: Vec<&str> = match s.check() {
                Ok(_) => vec![],
                Err(p) => p.into_iter().map(|(k, _)| k).collect(),
            };
            assert_eq!(got, *keys, "row {i}");
        }
        let twice = Flows::new(&[
            spec("a", "birth", "personal_id_assigned"),
            spec("a", "death", "death_recorded"),
            spec("b", "birth", "personal_id_assigned"),
        ])
        .unwrap_err();
        let keys: Vec<(usize, &str)> = twice.iter().map(|(i, k, _)| (*i, *k)).collect();
        assert_eq!(keys, vec![(1, "name"), (2, "answer")]);
    }

    #[test]
    fn every_answer_kind_has_its_topic_and_fits_its_requests() {
        for k in ANSWER_KINDS {
            assert!(answering_topic(k).is_some(), "{k}");
        }
        assert_eq!(ANSWER_KINDS.len(), ANSWERS.len());
        assert_eq!(
            answering_topic("health_insurance_card_issued"),
            Some(SOCIAL_INSURANCE)
        );
        let mut s = spec("x", "death", "personal_id_assigned");
        assert_eq!(s.check().unwrap_err()[0].0, "answer");
        s.answer = "funeral_allowance_decided".into();
        assert!(s.check().is_ok());
        s.answer = "death_recorded".into();
        assert!(
            s.check().is_ok(),
            "a fact answers any request naming the citizen"
        );
    }

    #[test]
    fn a_request_opens_what_its_flows_ask() {
        let mut linked = spec("birth-residence", "birth", "residence_changed");
        linked.linked_only = true;
        let flows = Flows::new(&[
            spec("birth-id", "birth", "personal_id_assigned"),
            linked,
            spec("death-recorded", "death", "death_recorded"),
        ])
        .unwrap();
        let c = Calendar::embedded();
        let at = datetime!(2026-12-04 10:00 +7);
        let names = |kind, case| -> Vec<String> {
            flows
                .opened_by(kind, case, at, &c)
                .into_iter()
                .map(|o| o.flow)
                .collect()
        };
        assert_eq!(names("birth", ""), ["birth-id"]);
        assert_eq!(
            names("birth", "HP-2026-0001"),
            ["birth-id", "birth-residence"]
        );
        assert_eq!(names("death", ""), ["death-recorded"]);
        assert!(names("marriage", "X").is_empty());
        let o = &flows.opened_by("birth", "", at, &c)[0];
        assert_eq!(o.answer, "personal_id_assigned");
        assert_eq!(o.awaiting, POPULATION);
        assert_eq!(o.due_at_ms, unix_ms(datetime!(2026-12-08 00:00 +7)));
    }
}
