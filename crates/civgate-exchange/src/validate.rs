//! Full validation of a published event: which topic it belongs to, whether this producer may
//! publish it, and every field (personal IDs, dates not in the future, NFC names, ID digits
//! consistent with sex and birth year). Plain functions; errors name the field.

use tonic_types::FieldViolation;

use crate::{
    domain::{FullName, PersonalId, Role, parse_date, today},
    pb::v1::{Event, Registration, Sex, event::Payload},
    policy::Principal,
};

pub use crate::domain::topics::{CIVIL_STATUS, POPULATION};

/// The domain's sex of a wire one (`None`: unspecified).
pub fn sex_from_pb(s: Sex) -> Option<crate::domain::Sex> {
    match s {
        Sex::Male => Some(crate::domain::Sex::Male),
        Sex::Female => Some(crate::domain::Sex::Female),
        Sex::Unspecified => None,
    }
}

pub fn is_topic(t: &str) -> bool {
    t == CIVIL_STATUS || t == POPULATION
}

/// The topic an event type belongs to, and the payload's field name.
pub fn topic_of(p: &Payload) -> (&'static str, &'static str) {
    match p {
        Payload::Birth(_) => (CIVIL_STATUS, "birth"),
        Payload::Death(_) => (CIVIL_STATUS, "death"),
        Payload::Marriage(_) => (CIVIL_STATUS, "marriage"),
        Payload::Divorce(_) => (CIVIL_STATUS, "divorce"),
        Payload::CivilStatusChange(_) => (CIVIL_STATUS, "civil_status_change"),
        Payload::ParentChildRecognition(_) => (CIVIL_STATUS, "parent_child_recognition"),
        Payload::Adoption(_) => (CIVIL_STATUS, "adoption"),
        Payload::Guardianship(_) => (CIVIL_STATUS, "guardianship"),
        Payload::PersonalIdAssigned(_) => (POPULATION, "personal_id_assigned"),
        Payload::ResidenceChanged(_) => (POPULATION, "residence_changed"),
        Payload::DeathRecorded(_) => (POPULATION, "death_recorded"),
        Payload::PersonalIdReissued(_) => (POPULATION, "personal_id_reissued"),
        Payload::CitizenDataCorrected(_) => (POPULATION, "citizen_data_corrected"),
    }
}

/// The personal IDs an event concerns (for the audit record's subjects), valid ones only.
pub fn subjects(p: &Payload) -> Vec<String> {
    let ids: Vec<&str> = match p {
        Payload::Birth(b) => [&b.father, &b.mother]
            .into_iter()
            .flatten()
            .filter_map(|x| x.personal_id.as_deref())
            .collect(),
        Payload::Death(d) => vec![&d.personal_id],
        Payload::Marriage(m) => vec![&m.spouse1_personal_id, &m.spouse2_personal_id],
        Payload::Divorce(d) => vec![&d.spouse1_personal_id, &d.spouse2_personal_id],
        Payload::CivilStatusChange(x) => vec![&x.personal_id],
        Payload::ParentChildRecognition(x) => vec![&x.parent_personal_id, &x.child_personal_id],
        Payload::Adoption(x) => std::iter::once(&x.child_personal_id)
            .chain(&x.adoptive_parent_personal_ids)
            .map(String::as_str)
            .collect(),
        Payload::Guardianship(x) => vec![&x.ward_personal_id, &x.guardian_personal_id],
        Payload::PersonalIdAssigned(x) => vec![&x.personal_id],
        Payload::ResidenceChanged(x) => vec![&x.personal_id],
        Payload::DeathRecorded(x) => vec![&x.personal_id],
        Payload::PersonalIdReissued(x) => vec![&x.old_personal_id, &x.new_personal_id],
        Payload::CitizenDataCorrected(x) => vec![&x.personal_id],
    };
    ids.into_iter()
        .filter(|s| PersonalId::parse(s).is_ok())
        .map(str::to_owned)
        .collect()
}

/// Why a publish is refused.
#[derive(Debug)]
pub enum Refusal {
    /// The producer may not publish this (other side's topic, another office).
    NotAllowed(String),
    /// Bad fields.
    Invalid(Vec<FieldViolation>),
}

struct Check {
    v: Vec<FieldViolation>,
    prefix: String,
}

impl Check {
    fn bad(&mut self, field: &str, why: impl Into<String>) {
        self.v
            .push(FieldViolation::new(format!("{}.{field}", self.prefix), why));
    }

    fn required(&mut self, field: &str, s: &str) -> bool {
        if s.trim().is_empty() {
            self.bad(field, "required");
            return false;
        }
        true
    }

    fn id(&mut self, field: &str, s: &str) -> Option<PersonalId> {
        if !self.required(field, s) {
            return None;
        }
        PersonalId::parse(s)
            .map_err(|e| self.bad(field, e.to_string()))
            .ok()
    }

    fn optional_id(&mut self, field: &str, s: Option<&str>) {
        if let Some(s) = s.filter(|s| !s.is_empty()) {
            let _ = PersonalId::parse(s).map_err(|e| self.bad(field, e.to_string()));
        }
    }

    fn date(&mut self, field: &str, s: &str) -> Option<time::Date> {
        if !self.required(field, s) {
            return None;
        }
        match parse_date(s) {
            Err(e) => {
                self.bad(field, e);
                None
            }
            Ok(d) if d > today() => {
                self.bad(field, "must not be in the future");
                None
            }
            Ok(d) => Some(d),
        }
    }

    fn name(&mut self, field: &str, s: &str) {
        if self.required(field, s) {
            match FullName::parse(s) {
                Err(e) => self.bad(field, e.to_string()),
                Ok(n) if n.as_str() != s => self.bad(field, "must be Unicode NFC, single-spaced"),
                Ok(_) => {}
            }
        }
    }

    fn registration(&mut self, r: Option<&Registration>) -> Option<String> {
        let Some(r) = r else {
            self.bad("registration", "required");
            return None;
        };
        self.required("registration.book_number", &r.book_number);
        self.required("registration.entry_number", &r.entry_number);
        self.date("registration.registration_date", &r.registration_date);
        self.required("registration.registry_office_code", &r.registry_office_code)
            .then(|| r.registry_office_code.clone())
    }
}

/// The largest event accepted, encoded: real civil-status events are a few hundred bytes.
pub(crate) const MAX_EVENT_BYTES: usize = 16 * 1024;
/// The longest free-text field (a reason, an address, a value before and after a change).
pub(crate) const MAX_TEXT_BYTES: usize = 1024;
/// Adoption is by one person or a married couple.
pub(crate) const MAX_ADOPTIVE_PARENTS: usize = 2;
/// `occurred_at_unix_ms`, when set: after 1900-01-01 and at most a day past the gateway's clock.
const EARLIEST_OCCURRED_MS: i64 = -2_208_988_800_000;
const OCCURRED_LEEWAY_MS: i64 = 24 * 3_600_000;

/// Every free-text field of an event, by its name under `event.`.
fn texts(event: &Event) -> Vec<(String, &str)> {
    fn reg<'a>(out: &mut Vec<(String, &'a str)>, p: &str, r: Option<&'a Registration>) {
        if let Some(r) = r {
            for (f, v) in [
                ("registry_office_code", &r.registry_office_code),
                ("book_number", &r.book_number),
                ("entry_number", &r.entry_number),
                ("registering_official", &r.registering_official),
            ] {
                out.push((format!("{p}.registration.{f}"), v.as_str()));
            }
        }
    }
    let mut out: Vec<(String, &str)> = vec![("event.in_reply_to".into(), &event.in_reply_to)];
    let Some(payload) = &event.payload else {
        return out;
    };
    let p = format!("event.{}", topic_of(payload).1);
    match payload {
        Payload::Birth(b) => {
            reg(&mut out, &p, b.registration.as_ref());
            for (f, v) in [
                ("place_of_birth", &b.place_of_birth),
                ("hometown", &b.hometown),
                ("ethnicity", &b.ethnicity),
                ("nationality", &b.nationality),
            ] {
                out.push((format!("{p}.{f}"), v.as_str()));
            }
            for (who, parent) in [("father", &b.father), ("mother", &b.mother)] {
                if let Some(x) = parent {
                    for (f, v) in [
                        ("ethnicity", &x.ethnicity),
                        ("nationality", &x.nationality),
                        ("residence", &x.residence),
                    ] {
                        out.push((format!("{p}.{who}.{f}"), v.as_str()));
                    }
                }
            }
        }
        Payload::Death(d) => {
            reg(&mut out, &p, d.registration.as_ref());
            out.push((format!("{p}.place_of_death"), &d.place_of_death));
            out.push((format!("{p}.cause_category"), &d.cause_category));
        }
        Payload::Marriage(m) => reg(&mut out, &p, m.registration.as_ref()),
        Payload::Divorce(d) => {
            reg(&mut out, &p, d.registration.as_ref());
            out.push((
                format!("{p}.court_decision_number"),
                &d.court_decision_number,
            ));
        }
        Payload::CivilStatusChange(x) => {
            reg(&mut out, &p, x.registration.as_ref());
            for (f, v) in [
                ("field", &x.field),
                ("old_value", &x.old_value),
                ("new_value", &x.new_value),
                ("reason", &x.reason),
            ] {
                out.push((format!("{p}.{f}"), v.as_str()));
            }
        }
        Payload::ParentChildRecognition(x) => reg(&mut out, &p, x.registration.as_ref()),
        Payload::Adoption(x) => reg(&mut out, &p, x.registration.as_ref()),
        Payload::Guardianship(x) => reg(&mut out, &p, x.registration.as_ref()),
        Payload::PersonalIdAssigned(x) => {
            for (f, v) in [
                ("registry_office_code", &x.registry_office_code),
                ("book_number", &x.book_number),
                ("entry_number", &x.entry_number),
            ] {
                out.push((format!("{p}.{f}"), v.as_str()));
            }
        }
        Payload::ResidenceChanged(x) => {
            if let Some(r) = &x.new_residence {
                out.push((format!("{p}.new_residence.address"), &r.address));
            }
        }
        Payload::DeathRecorded(x) => out.push((format!("{p}.recording_unit"), &x.recording_unit)),
        Payload::PersonalIdReissued(x) => out.push((format!("{p}.reason"), &x.reason)),
        Payload::CitizenDataCorrected(x) => {
            for (f, v) in [
                ("field", &x.field),
                ("new_value", &x.new_value),
                ("reason", &x.reason),
            ] {
                out.push((format!("{p}.{f}"), v.as_str()));
            }
        }
    }
    out
}

/// Bounds that hold for every event whatever its type: its encoded size, each free-text
/// field's length and characters, and its occurrence time.
fn bounds(event: &Event, now_ms: i64) -> Vec<FieldViolation> {
    use prost::Message;
    let mut v = Vec::new();
    let size = event.encoded_len();
    if size > MAX_EVENT_BYTES {
        v.push(FieldViolation::new(
            "event",
            format!("at most {MAX_EVENT_BYTES} bytes encoded, got {size}"),
        ));
        return v;
    }
    for (field, text) in texts(event) {
        if text.len() > MAX_TEXT_BYTES {
            v.push(FieldViolation::new(
                field,
                format!("at most {MAX_TEXT_BYTES} bytes, got {}", text.len()),
            ));
        } else if text.chars().any(char::is_control) {
            v.push(FieldViolation::new(
                field,
                "must not contain control characters (NUL, line breaks, escapes)",
            ));
        }
    }
    if let Some(Payload::Adoption(a)) = &event.payload
        && a.adoptive_parent_personal_ids.len() > MAX_ADOPTIVE_PARENTS
    {
        v.push(FieldViolation::new(
            "event.adoption.adoptive_parent_personal_ids",
            format!("at most {MAX_ADOPTIVE_PARENTS} adoptive parents (one person or a couple)"),
        ));
    }
    let t = event.occurred_at_unix_ms;
    if t != 0 && !(EARLIEST_OCCURRED_MS..=now_ms.saturating_add(OCCURRED_LEEWAY_MS)).contains(&t) {
        v.push(FieldViolation::new(
            "event.occurred_at_unix_ms",
            "must be after 1900-01-01 and not more than a day ahead of the gateway's clock",
        ));
    }
    v
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Validates `event` for `producer`; returns its topic.
pub fn validate(event: Option<&Event>, producer: &Principal) -> Result<&'static str, Refusal> {
    let Some(event) = event else {
        return Err(Refusal::Invalid(vec![FieldViolation::new(
            "event", "required",
        )]));
    };
    let out_of_bounds = bounds(event, now_ms());
    if !out_of_bounds.is_empty() {
        return Err(Refusal::Invalid(out_of_bounds));
    }
    let Some(payload) = &event.payload else {
        return Err(Refusal::Invalid(vec![FieldViolation::new(
            "event.payload",
            "required: one event type",
        )]));
    };
    let (topic, name) = topic_of(payload);
    let side_ok = match producer.role {
        Role::CivilRegistry => topic == CIVIL_STATUS,
        Role::PopulationDb => topic == POPULATION,
        Role::Auditor => false,
    };
    if !side_ok {
        return Err(Refusal::NotAllowed(format!(
            "a {} may not publish {name} events (topic {topic})",
            producer.role
        )));
    }
    let mut c = Check {
        v: Vec::new(),
        prefix: format!("event.{name}"),
    };
    let office = match payload {
        Payload::Birth(b) => {
            c.name("full_name", &b.full_name);
            c.date("date_of_birth", &b.date_of_birth);
            if sex_from_pb(Sex::try_from(b.sex).unwrap_or(Sex::Unspecified)).is_none() {
                c.bad("sex", "required");
            }
            if !crate::domain::personal_id::is_known_province(&b.birth_registration_province_code) {
                c.bad(
                    "birth_registration_province_code",
                    "not a known province code",
                );
            }
            for (field, parent) in [("father", &b.father), ("mother", &b.mother)] {
                if let Some(p) = parent {
                    c.optional_id(&format!("{field}.personal_id"), p.personal_id.as_deref());
                    if !p.full_name.is_empty() {
                        c.name(&format!("{field}.full_name"), &p.full_name);
                    }
                }
            }
            if b.father.is_none() && b.mother.is_none() {
                c.bad("mother", "at least one parent is required");
            }
            c.registration(b.registration.as_ref())
        }
        Payload::Death(d) => {
            c.id("personal_id", &d.personal_id);
            c.date("date_of_death", &d.date_of_death);
            c.optional_id("declarant_personal_id", Some(&d.declarant_personal_id));
            c.registration(d.registration.as_ref())
        }
        Payload::Marriage(m) => {
            let a = c.id("spouse1_personal_id", &m.spouse1_personal_id);
            let b = c.id("spouse2_personal_id", &m.spouse2_personal_id);
            if a.is_some() && a == b {
                c.bad(
                    "spouse2_personal_id",
                    "must differ from spouse1_personal_id",
                );
            }
            c.name("spouse1_full_name", &m.spouse1_full_name);
            c.name("spouse2_full_name", &m.spouse2_full_name);
            c.date("date_of_marriage", &m.date_of_marriage);
            c.registration(m.registration.as_ref())
        }
        Payload::Divorce(d) => {
            c.id("spouse1_personal_id", &d.spouse1_personal_id);
            c.id("spouse2_personal_id", &d.spouse2_personal_id);
            c.required("court_decision_number", &d.court_decision_number);
            c.date("effective_date", &d.effective_date);
            c.registration(d.registration.as_ref())
        }
        Payload::CivilStatusChange(x) => {
            c.id("personal_id", &x.personal_id);
            c.required("field", &x.field);
            c.required("reason", &x.reason);
            c.registration(x.registration.as_ref())
        }
        Payload::ParentChildRecognition(x) => {
            let parent = c.id("parent_personal_id", &x.parent_personal_id);
            c.id("child_personal_id", &x.child_personal_id);
            if let (Some(p), Some(s)) = (
                parent,
                sex_from_pb(Sex::try_from(x.parent_sex).unwrap_or(Sex::Unspecified)),
            ) {
                let _ = p
                    .check_consistency(Some(s), None)
                    .map_err(|e| c.bad("parent_personal_id", e.to_string()));
            }
            c.registration(x.registration.as_ref())
        }
        Payload::Adoption(x) => {
            c.id("child_personal_id", &x.child_personal_id);
            if x.adoptive_parent_personal_ids.is_empty() {
                c.bad(
                    "adoptive_parent_personal_ids",
                    "at least one adoptive parent",
                );
            }
            for (i, p) in x.adoptive_parent_personal_ids.iter().enumerate() {
                c.id(&format!("adoptive_parent_personal_ids[{i}]"), p);
            }
            c.date("effective_date", &x.effective_date);
            c.registration(x.registration.as_ref())
        }
        Payload::Guardianship(x) => {
            c.id("ward_personal_id", &x.ward_personal_id);
            c.id("guardian_personal_id", &x.guardian_personal_id);
            c.date("effective_date", &x.effective_date);
            c.registration(x.registration.as_ref())
        }
        Payload::PersonalIdAssigned(x) => {
            c.id("personal_id", &x.personal_id);
            #[allow(deprecated)]
            if !x.birth_event_id.is_empty() {
                c.bad(
                    "birth_event_id",
                    "replaced by event.in_reply_to: set that to the birth's event_id instead",
                );
            }
            if event.in_reply_to.is_empty() {
                c.v.push(FieldViolation::new(
                    "event.in_reply_to",
                    "required: the event_id of the birth this personal ID answers",
                ));
            }
            None
        }
        Payload::ResidenceChanged(x) => {
            c.id("personal_id", &x.personal_id);
            match &x.new_residence {
                Some(r) if crate::domain::personal_id::is_known_province(&r.province_code) => {}
                _ => c.bad(
                    "new_residence.province_code",
                    "a known province code is required",
                ),
            }
            c.date("effective_date", &x.effective_date);
            None
        }
        Payload::DeathRecorded(x) => {
            c.id("personal_id", &x.personal_id);
            c.date("date_of_death", &x.date_of_death);
            None
        }
        Payload::PersonalIdReissued(x) => {
            let old = c.id("old_personal_id", &x.old_personal_id);
            let new = c.id("new_personal_id", &x.new_personal_id);
            if old.is_some() && old == new {
                c.bad("new_personal_id", "must differ from old_personal_id");
            }
            None
        }
        Payload::CitizenDataCorrected(x) => {
            c.id("personal_id", &x.personal_id);
            c.required("field", &x.field);
            None
        }
    };
    if !c.v.is_empty() {
        return Err(Refusal::Invalid(c.v));
    }
    if let Some(code) = office
        && !producer.registry_offices.iter().any(|o| o.as_str() == code)
    {
        return Err(Refusal::NotAllowed(format!(
            "agency {} may not publish for registry office {code:?}",
            producer.agency
        )));
    }
    Ok(topic)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        domain::CertFingerprint,
        pb::v1::{Birth, DeathRecorded, Marriage, Parent},
    };
    use std::sync::Arc;

    fn registry() -> Principal {
        Principal {
            agency: "registry-hp".parse().unwrap(),
            role: Role::CivilRegistry,
            fingerprint: CertFingerprint([0; 32]),
            registry_offices: Arc::from(vec!["HP-LECHAN".parse().unwrap()]),
            provinces: Arc::from([]),
        }
    }

    fn population() -> Principal {
        Principal {
            role: Role::PopulationDb,
            registry_offices: Arc::from(vec![]),
            provinces: Arc::from([]),
            ..registry()
        }
    }

    fn reg(office: &str) -> Option<Registration> {
        Some(Registration {
            registry_office_code: office.into(),
            book_number: "01/2026".into(),
            entry_number: "123".into(),
            registration_date: "2026-03-02".into(),
            registering_official: "Trần Văn Bình".into(),
        })
    }

    pub fn birth(office: &str) -> Event {
        Event {
            in_reply_to: String::new(),
            occurred_at_unix_ms: 0,
            payload: Some(Payload::Birth(Birth {
                registration: reg(office),
                full_name: "Nguyễn Thị An".into(),
                sex: Sex::Female as i32,
                date_of_birth: "2026-02-27".into(),
                place_of_birth: "Hải Phòng".into(),
                hometown: "Hải Phòng".into(),
                ethnicity: "Kinh".into(),
                nationality: "Việt Nam".into(),
                birth_registration_province_code: "031".into(),
                father: Some(Parent {
                    personal_id: Some("031095000001".into()),
                    full_name: "Nguyễn Văn Hùng".into(),
                    ..Default::default()
                }),
                mother: None,
            })),
        }
    }

    #[test]
    fn a_valid_birth_goes_to_civil_status() {
        assert!(matches!(
            validate(Some(&birth("HP-LECHAN")), &registry()),
            Ok(CIVIL_STATUS)
        ));
    }

    #[test]
    fn producers_publish_only_their_side_and_their_offices() {
        assert!(matches!(
            validate(Some(&birth("HP-LECHAN")), &population()),
            Err(Refusal::NotAllowed(_))
        ));
        assert!(matches!(
            validate(Some(&birth("HN-BADINH")), &registry()),
            Err(Refusal::NotAllowed(_))
        ));
        let death = Event {
            in_reply_to: String::new(),
            occurred_at_unix_ms: 0,
            payload: Some(Payload::DeathRecorded(DeathRecorded {
                personal_id: "031095000001".into(),
                date_of_death: "2026-01-01".into(),
                recording_unit: "Công an phường".into(),
            })),
        };
        assert!(matches!(
            validate(Some(&death), &registry()),
            Err(Refusal::NotAllowed(_))
        ));
        assert!(matches!(
            validate(Some(&death), &population()),
            Ok(POPULATION)
        ));
    }

    #[test]
    fn bad_fields_are_named() {
        let mut e = birth("HP-LECHAN");
        if let Some(Payload::Birth(b)) = &mut e.payload {
            b.date_of_birth = "2999-01-01".into();
            b.full_name = "Nguye\u{0302}\u{0303}n Thi An".into(); // NFD
            b.birth_registration_province_code = "003".into();
        }
        let Err(Refusal::Invalid(v)) = validate(Some(&e), &registry()) else {
            panic!()
        };
        let fields: Vec<_> = v.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "event.birth.full_name",
                "event.birth.date_of_birth",
                "event.birth.birth_registration_province_code"
            ]
        );
        let m = Event {
            in_reply_to: String::new(),
            occurred_at_unix_ms: 0,
            payload: Some(Payload::Marriage(Marriage {
                registration: reg("HP-LECHAN"),
                spouse1_personal_id: "031095000001".into(),
                spouse1_full_name: "Nguyễn Văn Hùng".into(),
                spouse2_personal_id: "031095000001".into(),
                spouse2_full_name: "Trần Thị Lan".into(),
                date_of_marriage: "2026-01-01".into(),
            })),
        };
        let Err(Refusal::Invalid(v)) = validate(Some(&m), &registry()) else {
            panic!()
        };
        assert_eq!(v[0].field, "event.marriage.spouse2_personal_id");
        assert!(matches!(
            validate(None, &registry()),
            Err(Refusal::Invalid(_))
        ));
    }

    #[test]
    fn free_text_size_characters_and_occurrence_time_are_bounded() {
        let field_of = |e: &Event| match validate(Some(e), &registry()) {
            Err(Refusal::Invalid(v)) => v.iter().map(|f| f.field.clone()).collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        };
        // A 3.9 MB place of birth: refused by the event's size before anything else.
        let mut e = birth("HP-LECHAN");
        if let Some(Payload::Birth(b)) = &mut e.payload {
            b.place_of_birth = "x".repeat(3_900_000);
        }
        assert_eq!(field_of(&e), ["event"]);
        // Just over a field's limit; a NUL byte; a line break.
        for (text, why) in [
            ("x".repeat(MAX_TEXT_BYTES + 1), "at most"),
            ("Hải\0Phòng".to_owned(), "control"),
            ("Hải\nPhòng".to_owned(), "control"),
        ] {
            let mut e = birth("HP-LECHAN");
            if let Some(Payload::Birth(b)) = &mut e.payload {
                b.place_of_birth = text;
            }
            let Err(Refusal::Invalid(v)) = validate(Some(&e), &registry()) else {
                panic!()
            };
            assert_eq!(v[0].field, "event.birth.place_of_birth");
            assert!(v[0].description.contains(why), "{v:?}");
        }
        // Exactly at the limit passes.
        let mut e = birth("HP-LECHAN");
        if let Some(Payload::Birth(b)) = &mut e.payload {
            b.place_of_birth = "x".repeat(MAX_TEXT_BYTES);
        }
        assert!(validate(Some(&e), &registry()).is_ok());
        // Occurrence time: unset or 1900..now+1 day.
        for (t, ok) in [
            (0, true),
            (now_ms(), true),
            (-2_208_988_800_001, false),
            (now_ms() + 2 * OCCURRED_LEEWAY_MS, false),
            (i64::MAX, false),
            (i64::MIN, false),
        ] {
            let mut e = birth("HP-LECHAN");
            e.occurred_at_unix_ms = t;
            assert_eq!(validate(Some(&e), &registry()).is_ok(), ok, "{t}");
        }
    }
}
