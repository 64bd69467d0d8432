//! Full validation of a published event: which topic it belongs to, whether this producer may
//! publish it, and every field (personal IDs, dates not in the future, NFC names, ID digits
//! consistent with sex and birth year). Plain functions; errors name the field.
//!
//! What the event itself proves wrong is refused here, citing the rule; what needs the
//! population records (a spouse's full date of birth, an existing marriage) is for the
//! directory, which rejects the event with its reason. Civil dates are dates in Vietnam.

use tonic_types::FieldViolation;

use crate::{
    domain::{FullName, PersonalId, parse_date, today},
    pb::v1::{Event, Registration, Sex, event::Payload},
    policy::Principal,
};

pub use crate::domain::topics::{CIVIL_STATUS, POPULATION, SOCIAL_INSURANCE};

/// The domain's sex of a wire one (`None`: unspecified).
pub fn sex_from_pb(s: Sex) -> Option<crate::domain::Sex> {
    match s {
        Sex::Male => Some(crate::domain::Sex::Male),
        Sex::Female => Some(crate::domain::Sex::Female),
        Sex::Unspecified => None,
    }
}

pub fn is_topic(t: &str) -> bool {
    t == CIVIL_STATUS || t == POPULATION || t == SOCIAL_INSURANCE
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
        Payload::CourtDecision(_) => (CIVIL_STATUS, "court_decision"),
        Payload::NationalityChange(_) => (CIVIL_STATUS, "nationality_change"),
        Payload::GuardianshipEnded(_) => (CIVIL_STATUS, "guardianship_ended"),
        Payload::AdoptionEnded(_) => (CIVIL_STATUS, "adoption_ended"),
        Payload::MaritalStatusConfirmed(_) => (CIVIL_STATUS, "marital_status_confirmed"),
        Payload::PersonalIdAssigned(_) => (POPULATION, "personal_id_assigned"),
        Payload::ResidenceChanged(_) => (POPULATION, "residence_changed"),
        Payload::DeathRecorded(_) => (POPULATION, "death_recorded"),
        Payload::PersonalIdReissued(_) => (POPULATION, "personal_id_reissued"),
        Payload::CitizenDataCorrected(_) => (POPULATION, "citizen_data_corrected"),
        Payload::PermanentResidenceRegistered(_) => (POPULATION, "permanent_residence_registered"),
        Payload::PermanentResidenceDeleted(_) => (POPULATION, "permanent_residence_deleted"),
        Payload::HealthInsuranceCardIssued(_) => (SOCIAL_INSURANCE, "health_insurance_card_issued"),
        Payload::FuneralAllowanceDecided(_) => (SOCIAL_INSURANCE, "funeral_allowance_decided"),
    }
}

/// The personal IDs an event concerns (for the audit record's subjects), valid ones only.
pub fn subjects(p: &Payload) -> Vec<String> {
    let ids: Vec<&str> = match p {
        Payload::Birth(b) => [&b.father, &b.mother]
            .into_iter()
            .flatten()
            .filter_map(|x| x.personal_id.as_deref())
            .chain(b.personal_id.as_deref())
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
        Payload::CourtDecision(x) => vec![&x.personal_id, &x.other_personal_id],
        Payload::NationalityChange(x) => vec![&x.personal_id],
        Payload::GuardianshipEnded(x) => vec![&x.ward_personal_id, &x.guardian_personal_id],
        Payload::AdoptionEnded(x) => std::iter::once(&x.child_personal_id)
            .chain(&x.adoptive_parent_personal_ids)
            .map(String::as_str)
            .collect(),
        Payload::MaritalStatusConfirmed(x) => vec![&x.personal_id],
        Payload::PersonalIdAssigned(x) => vec![&x.personal_id],
        Payload::ResidenceChanged(x) => vec![&x.personal_id],
        Payload::DeathRecorded(x) => vec![&x.personal_id],
        Payload::PersonalIdReissued(x) => vec![&x.old_personal_id, &x.new_personal_id],
        Payload::CitizenDataCorrected(x) => vec![&x.personal_id],
        Payload::PermanentResidenceRegistered(x) => vec![&x.personal_id],
        Payload::PermanentResidenceDeleted(x) => vec![&x.personal_id],
        Payload::HealthInsuranceCardIssued(x) => vec![&x.personal_id],
        Payload::FuneralAllowanceDecided(x) => vec![&x.personal_id],
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
        let id = PersonalId::parse(s)
            .map_err(|e| self.bad(field, e.to_string()))
            .ok()?;
        let year = id.birth_year();
        if year > today().year() {
            self.bad(
                field,
                format!("encodes a year of birth ({year}) that has not come yet"),
            );
            return None;
        }
        Some(id)
    }

    fn optional_id(&mut self, field: &str, s: Option<&str>) -> Option<PersonalId> {
        s.filter(|s| !s.is_empty()).and_then(|s| self.id(field, s))
    }

    /// `date` (of the event) must not be after the registration's date.
    fn not_after_registration(
        &mut self,
        field: &str,
        date: Option<time::Date>,
        r: Option<&Registration>,
    ) {
        let registered = r.and_then(|r| parse_date(&r.registration_date).ok());
        if let (Some(d), Some(r)) = (date, registered)
            && d > r
        {
            self.bad(field, "must not be after the registration date");
        }
    }

    /// A Vietnamese citizen's ethnicity is one of the 54 groups of the national list.
    fn ethnicity(&mut self, field: &str, ethnicity: &str, nationality: &str) {
        use crate::domain::ethnicity::{ethnic_group, is_vietnamese};
        if is_vietnamese(nationality) && ethnic_group(ethnicity).is_none() {
            self.bad(
                field,
                "not one of the 54 ethnic groups of the national list: give its code (01-54) or its name",
            );
        }
    }

    /// A death dated before the year of birth its personal ID encodes.
    fn not_before_birth(&mut self, field: &str, id: Option<&PersonalId>, date: Option<time::Date>) {
        if let (Some(id), Some(d)) = (id, date)
            && d.year() < id.birth_year()
        {
            self.bad(
                field,
                format!(
                    "is before the year of birth the personal ID encodes ({})",
                    id.birth_year()
                ),
            );
        }
    }

    /// An answer-only event: `in_reply_to` names the request it answers.
    fn answers(&mut self, event: &Event, what: &str) {
        if event.in_reply_to.is_empty() {
            self.v.push(FieldViolation::new(
                "event.in_reply_to",
                format!("required: the event_id of {what}"),
            ));
        }
    }

    /// A residence: in one of today's 34 provinces (IDs keep the pre-2025 codes).
    fn residence(&mut self, field: &str, r: Option<&crate::pb::v1::Residence>) {
        use crate::domain::residence::{current_province, successor_of};
        let code = format!("{field}.province_code");
        match r {
            Some(r) if current_province(&r.province_code).is_some() => {}
            Some(r) if let Some(now) = successor_of(&r.province_code) => self.bad(
                &code,
                format!(
                    "province {} is part of {} ({}) since 1 July 2025: a residence is in one of the 34 provinces",
                    r.province_code, now.name, now.code
                ),
            ),
            _ => self.bad(&code, "a province code of one of the 34 provinces is required"),
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

    /// A spouse old enough to marry on `on`, as far as the ID's year of birth tells.
    fn marriage_age(&mut self, field: &str, id: Option<&PersonalId>, on: Option<time::Date>) {
        let (Some(id), Some(on)) = (id, on) else {
            return;
        };
        // The ID gives the year of birth only: at most this old on the day.
        let at_most = on.year() - id.birth_year();
        let (legal, who) = match id.sex() {
            crate::domain::Sex::Male => (20, "men"),
            crate::domain::Sex::Female => (18, "women"),
        };
        if at_most < legal {
            self.bad(
                field,
                format!(
                    "under the age of marriage: born in {}, at most {at_most} on {}; {who} marry from full {legal} (Marriage and Family Law 2014, art. 8(1)(a))",
                    id.birth_year(),
                    crate::domain::format_date(on)
                ),
            );
        }
    }

    /// A guardian is an adult (Civil Code 2015 art. 49: full civil capacity), as far as the
    /// ID's year of birth tells.
    fn guardian_of_age(&mut self, guardian: Option<&PersonalId>, on: Option<time::Date>) {
        if let (Some(g), Some(on)) = (guardian, on)
            && on.year() - g.birth_year() < 18
        {
            self.bad(
                "guardian_personal_id",
                format!(
                    "born in {}, under 18 on {}: a guardian is an adult (Civil Code 2015 art. 49)",
                    g.birth_year(),
                    crate::domain::format_date(on)
                ),
            );
        }
    }

    /// A sex or a date of birth agrees with what the personal ID encodes (other fields: no
    /// check).
    fn agrees_with_id(&mut self, at: &str, field: &str, value: &str, id: &PersonalId) {
        match field {
            "sex" => {
                if let Some(s) = parse_sex(value)
                    && s != id.sex()
                {
                    self.bad(at, "is not the sex the personal ID encodes");
                }
            }
            "date_of_birth" => {
                if let Ok(d) = parse_date(value)
                    && d.year() != id.birth_year()
                {
                    self.bad(
                        at,
                        format!(
                            "is not in the year of birth the personal ID encodes ({})",
                            id.birth_year()
                        ),
                    );
                }
            }
            _ => {}
        }
    }

    /// Two IDs of one event that must name different people.
    fn distinct(&mut self, field: &str, a: &Option<PersonalId>, b: &Option<PersonalId>, why: &str) {
        if a.is_some() && a == b {
            self.bad(field, why);
        }
    }

    /// An adopted child and one or two adoptive parents, other people than the child.
    fn adoption_parties(&mut self, child: &str, parents: &[String]) {
        let child = self.id("child_personal_id", child);
        if parents.is_empty() {
            self.bad(
                "adoptive_parent_personal_ids",
                "at least one adoptive parent",
            );
        }
        let mut seen: Vec<PersonalId> = Vec::new();
        for (i, p) in parents.iter().enumerate() {
            let field = format!("adoptive_parent_personal_ids[{i}]");
            let parent = self.id(&field, p);
            self.distinct(
                &field,
                &child,
                &parent,
                "a child is not their own adoptive parent",
            );
            let Some(parent) = parent else { continue };
            if let Some(child) = &child
                && parent != *child
                && parent.birth_year() >= child.birth_year()
            {
                self.bad(
                    &field,
                    "an adoptive parent is born before the child (by the years the IDs encode)",
                );
            }
            if seen.contains(&parent) {
                self.bad(&field, "the same person twice");
            } else if seen.iter().any(|s| s.sex() == parent.sex()) {
                // Two adopt together only as a married couple (Law on Adoption 2010 art. 8).
                self.bad(
                    &field,
                    "two adoptive parents are a married couple: their IDs encode the same sex",
                );
            }
            seen.push(parent);
        }
    }

    /// A date that may lie ahead (an expiry): `YYYY-MM-DD`.
    fn any_date(&mut self, field: &str, s: &str) -> Option<time::Date> {
        if !self.required(field, s) {
            return None;
        }
        parse_date(s).map_err(|e| self.bad(field, e)).ok()
    }

    /// A marital-status certificate is valid for 6 months from its issue (Decree 123/2015
    /// art. 23).
    fn valid_until(&mut self, s: &str, r: Option<&Registration>) {
        let Some(until) = self.any_date("valid_until", s) else {
            return;
        };
        let Some(issued) = r.and_then(|r| parse_date(&r.registration_date).ok()) else {
            return;
        };
        let limit = add_months(issued, 6);
        if until < issued {
            self.bad("valid_until", "must not be before the registration date");
        } else if until > limit {
            self.bad(
                "valid_until",
                format!(
                    "a certificate of marital status is valid for 6 months: at most {} (Decree 123/2015 art. 23)",
                    crate::domain::format_date(limit)
                ),
            );
        }
    }

    /// A typed change of a birth record's field (Law 60/2014 arts. 26-29).
    fn change(&mut self, x: &crate::pb::v1::CivilStatusChange, id: Option<&PersonalId>) {
        use crate::pb::v1::ChangeKind as K;
        let kind = K::try_from(x.kind).unwrap_or(K::Unspecified);
        // The field each kind changes (None: any of CHANGEABLE).
        let only = match kind {
            K::Unspecified => {
                self.bad(
                    "kind",
                    "required: name, correction, addition, ethnicity or gender",
                );
                return;
            }
            K::Name => Some("full_name"),
            K::Ethnicity => Some("ethnicity"),
            K::Gender => Some("sex"),
            K::Correction | K::Addition => None,
        };
        if !CHANGEABLE.contains(&x.field.as_str()) {
            self.bad(
                "field",
                format!("a birth record's field: one of {}", CHANGEABLE.join(", ")),
            );
            return;
        }
        if let Some(f) = only
            && x.field != f
        {
            self.bad(
                "field",
                format!("a {} change is of {f}", kind.as_str_name()),
            );
            return;
        }
        if kind == K::Addition {
            if !x.old_value.is_empty() {
                self.bad(
                    "old_value",
                    "an addition fills what the record left out: leave old_value empty",
                );
            }
        } else if self.required("old_value", &x.old_value) && x.old_value == x.new_value {
            self.bad("new_value", "must differ from old_value");
        }
        if !self.required("new_value", &x.new_value) {
            return;
        }
        self.value(&x.field, &x.new_value, id);
        if let Some(id) = id {
            if kind == K::Addition {
                // What the ID encodes is known: an addition cannot contradict it.
                self.agrees_with_id("new_value", &x.field, &x.new_value, id);
            } else {
                // The old value is the record's: what the ID encodes, for sex and year.
                self.agrees_with_id("old_value", &x.field, &x.old_value, id);
            }
        }
        let addition = kind == K::Addition;
        match x.field.as_str() {
            "sex" if !addition && parse_sex(&x.old_value).is_none() => {
                self.bad("old_value", "\"male\" or \"female\"");
            }
            "date_of_birth" if !addition && parse_date(&x.old_value).is_err() => {
                self.bad("old_value", "a date in YYYY-MM-DD form");
            }
            "date_of_birth" => {
                let d = parse_date(&x.new_value).ok();
                self.not_after_registration("new_value", d, x.registration.as_ref());
            }
            "father_personal_id" | "mother_personal_id" if !x.old_value.is_empty() => {
                let sex = if x.field == "father_personal_id" {
                    crate::domain::Sex::Male
                } else {
                    crate::domain::Sex::Female
                };
                match PersonalId::parse(&x.old_value) {
                    Err(e) => self.bad("old_value", e.to_string()),
                    Ok(old) => {
                        let _ = old
                            .check_consistency(Some(sex), None)
                            .map_err(|e| self.bad("old_value", e.to_string()));
                    }
                }
            }
            "ethnicity" => {
                use crate::domain::ethnicity::ethnic_group;
                if let (Some(a), Some(b)) = (ethnic_group(&x.old_value), ethnic_group(&x.new_value))
                    && a.code == b.code
                {
                    self.bad(
                        "new_value",
                        format!("the same ethnic group as old_value ({})", a.code),
                    );
                }
            }
            _ => {}
        }
    }

    /// A new value of a birth record's `field` for the person `id`, as `new_value`.
    fn value(&mut self, field: &str, v: &str, id: Option<&PersonalId>) {
        match field {
            "full_name" => self.name("new_value", v),
            "date_of_birth" => {
                if let Some(d) = self.date("new_value", v)
                    && d.year() < 1900
                {
                    self.bad("new_value", "must be 1900 or later");
                }
            }
            "sex" if parse_sex(v).is_none() => self.bad("new_value", "\"male\" or \"female\""),
            "ethnicity" if crate::domain::ethnicity::ethnic_group(v).is_none() => {
                self.bad(
                    "new_value",
                    "not one of the 54 ethnic groups of the national list: give its code (01-54) or its name",
                );
            }
            "father_personal_id" | "mother_personal_id" => {
                let sex = if field == "father_personal_id" {
                    crate::domain::Sex::Male
                } else {
                    crate::domain::Sex::Female
                };
                if let Some(parent) = self.id("new_value", v) {
                    let _ = parent
                        .check_consistency(Some(sex), None)
                        .map_err(|e| self.bad("new_value", e.to_string()));
                    if let Some(id) = id {
                        if &parent == id {
                            self.bad("new_value", "is the person's own personal ID");
                        } else if parent.birth_year() >= id.birth_year() {
                            self.bad(
                                "new_value",
                                "the parent must be born before the child's year of birth",
                            );
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// A date a decision of one kind carries (the date of going missing, of death): for that
    /// kind required, not before the person's year of birth nor after the decision's effective
    /// date; for any other kind absent.
    fn decision_date(
        &mut self,
        field: &str,
        value: &str,
        wanted: bool,
        only_for: &str,
        id: Option<&PersonalId>,
        effective: Option<time::Date>,
    ) {
        if !wanted {
            if !value.is_empty() {
                self.bad(field, only_for);
            }
            return;
        }
        let d = self.date(field, value);
        self.not_before_birth(field, id, d);
        if let (Some(d), Some(e)) = (d, effective)
            && d > e
        {
            self.bad(field, "must not be after the decision's effective date");
        }
    }

    /// A court's decision, by kind (Civil Code 2015 arts. 22, 68, 71; Marriage and Family Law
    /// arts. 11, 88-102).
    fn court_decision(&mut self, x: &crate::pb::v1::CourtDecision) {
        use crate::pb::v1::CourtDecisionKind as K;
        let kind = K::try_from(x.kind).unwrap_or(K::Unspecified);
        let id = self.id("personal_id", &x.personal_id);
        self.required("court", &x.court);
        self.required("decision_number", &x.decision_number);
        let effective = self.date("effective_date", &x.effective_date);
        self.not_after_registration("effective_date", effective, x.registration.as_ref());
        let two_people = matches!(
            kind,
            K::MarriageAnnulled | K::MarriageRecognised | K::ParentageDetermined
        );
        let other = if two_people {
            self.id("other_personal_id", &x.other_personal_id)
        } else {
            if !x.other_personal_id.is_empty() {
                self.bad("other_personal_id", "concerns one person: leave it empty");
            }
            None
        };
        self.distinct(
            "other_personal_id",
            &id,
            &other,
            "must name another person than personal_id",
        );
        self.decision_date(
            "missing_since",
            &x.missing_since,
            kind == K::DeclaredMissing,
            "for a declaration of missing only",
            id.as_ref(),
            effective,
        );
        self.decision_date(
            "date_of_death",
            &x.date_of_death,
            kind == K::DeclaredDead,
            "for a declaration of death only",
            id.as_ref(),
            effective,
        );
        match kind {
            K::Unspecified => self.bad("kind", "required: what the court decided"),
            K::MarriageAnnulled | K::MarriageRecognised => {
                if kind == K::MarriageRecognised {
                    // A marriage is recognised only if it could be registered (art. 8).
                    self.marriage_age("personal_id", id.as_ref(), effective);
                    self.marriage_age("other_personal_id", other.as_ref(), effective);
                }
                if let (Some(a), Some(b)) = (&id, &other)
                    && a.sex() == b.sex()
                {
                    self.bad(
                        "other_personal_id",
                        "both IDs encode the same sex: the State does not recognise marriage between people of the same sex (Marriage and Family Law 2014, art. 8(2))",
                    );
                }
            }
            K::ParentageDetermined => {
                if let (Some(child), Some(parent)) = (&id, &other)
                    && parent.birth_year() >= child.birth_year()
                {
                    self.bad(
                        "other_personal_id",
                        "the parent must be born before the child's year of birth",
                    );
                }
            }
            _ => {}
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
        if !r.country.is_empty()
            && let Err(e) = r.country.parse::<crate::domain::CountryCode>()
        {
            self.bad("registration.country", e.to_string());
        }
        self.required("registration.registry_office_code", &r.registry_office_code)
            .then(|| r.registry_office_code.clone())
    }
}

/// `male` / `female`, as a change writes a sex.
fn parse_sex(s: &str) -> Option<crate::domain::Sex> {
    match s {
        "male" => Some(crate::domain::Sex::Male),
        "female" => Some(crate::domain::Sex::Female),
        _ => None,
    }
}

/// The fields of a birth record a `civil_status_change` may change.
pub const CHANGEABLE: [&str; 9] = [
    "full_name",
    "date_of_birth",
    "sex",
    "place_of_birth",
    "hometown",
    "ethnicity",
    "nationality",
    "father_personal_id",
    "mother_personal_id",
];

/// `d` plus `months` calendar months, on the last day of the month where it has fewer days.
fn add_months(d: time::Date, months: u8) -> time::Date {
    let total = d.month() as i32 - 1 + i32::from(months);
    let year = d.year() + total / 12;
    let month = time::Month::try_from((total % 12 + 1) as u8).unwrap_or(time::Month::December);
    let last = time::util::days_in_month(month, year);
    time::Date::from_calendar_date(year, month, d.day().min(last)).unwrap_or(d)
}

/// Days within which a birth is to be registered (Law 60/2014 art. 15) and a death (art. 33).
pub const BIRTH_REGISTRATION_DAYS: i64 = 60;
pub const DEATH_REGISTRATION_DAYS: i64 = 15;

/// What is worth telling about an event that passed [`validate`]: a registration later than
/// the law's time limit (legal, and worth knowing to both sides).
pub fn notices(event: &Event) -> Vec<&'static str> {
    let late = |happened: &str, r: Option<&Registration>, days: i64| {
        let (Ok(h), Some(Ok(r))) = (
            parse_date(happened),
            r.map(|r| parse_date(&r.registration_date)),
        ) else {
            return false;
        };
        (r - h).whole_days() > days
    };
    match &event.payload {
        Some(Payload::Birth(b))
            if late(
                &b.date_of_birth,
                b.registration.as_ref(),
                BIRTH_REGISTRATION_DAYS,
            ) =>
        {
            vec!["late_birth_registration"]
        }
        Some(Payload::Death(d))
            if late(
                &d.date_of_death,
                d.registration.as_ref(),
                DEATH_REGISTRATION_DAYS,
            ) =>
        {
            vec!["late_death_registration"]
        }
        _ => Vec::new(),
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
/// A free-text field's path in an event (`event.birth.father.residence`), rendered only when
/// a violation names it: checking a valid event formats nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TextField {
    /// The payload's name; empty for a field of the event itself.
    payload: &'static str,
    /// What holds the field within the payload, with its dot (`registration.`), or empty.
    within: &'static str,
    name: &'static str,
}

impl TextField {
    const fn of(payload: &'static str, within: &'static str, name: &'static str) -> Self {
        TextField {
            payload,
            within,
            name,
        }
    }
}

impl std::fmt::Display for TextField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.payload.is_empty() {
            write!(f, "event.{}", self.name)
        } else {
            write!(f, "event.{}.{}{}", self.payload, self.within, self.name)
        }
    }
}

fn texts(event: &Event) -> Vec<(TextField, &str)> {
    fn reg<'a>(out: &mut Vec<(TextField, &'a str)>, p: &'static str, r: Option<&'a Registration>) {
        if let Some(r) = r {
            for (f, v) in [
                ("registry_office_code", &r.registry_office_code),
                ("book_number", &r.book_number),
                ("entry_number", &r.entry_number),
                ("registering_official", &r.registering_official),
            ] {
                out.push((TextField::of(p, "registration.", f), v.as_str()));
            }
        }
    }
    let mut out: Vec<(TextField, &str)> =
        vec![(TextField::of("", "", "in_reply_to"), &event.in_reply_to)];
    let Some(payload) = &event.payload else {
        return out;
    };
    let p = topic_of(payload).1;
    match payload {
        Payload::Birth(b) => {
            reg(&mut out, p, b.registration.as_ref());
            for (f, v) in [
                ("place_of_birth", &b.place_of_birth),
                ("hometown", &b.hometown),
                ("ethnicity", &b.ethnicity),
                ("nationality", &b.nationality),
            ] {
                out.push((TextField::of(p, "", f), v.as_str()));
            }
            for (who, parent) in [("father.", &b.father), ("mother.", &b.mother)] {
                if let Some(x) = parent {
                    for (f, v) in [
                        ("ethnicity", &x.ethnicity),
                        ("nationality", &x.nationality),
                        ("residence", &x.residence),
                    ] {
                        out.push((TextField::of(p, who, f), v.as_str()));
                    }
                }
            }
        }
        Payload::Death(d) => {
            reg(&mut out, p, d.registration.as_ref());
            out.push((TextField::of(p, "", "place_of_death"), &d.place_of_death));
            out.push((TextField::of(p, "", "cause_category"), &d.cause_category));
        }
        Payload::Marriage(m) => reg(&mut out, p, m.registration.as_ref()),
        Payload::Divorce(d) => {
            reg(&mut out, p, d.registration.as_ref());
            out.push((
                TextField::of(p, "", "court_decision_number"),
                &d.court_decision_number,
            ));
        }
        Payload::CivilStatusChange(x) => {
            reg(&mut out, p, x.registration.as_ref());
            for (f, v) in [
                ("field", &x.field),
                ("old_value", &x.old_value),
                ("new_value", &x.new_value),
                ("reason", &x.reason),
            ] {
                out.push((TextField::of(p, "", f), v.as_str()));
            }
        }
        Payload::ParentChildRecognition(x) => reg(&mut out, p, x.registration.as_ref()),
        Payload::Adoption(x) => reg(&mut out, p, x.registration.as_ref()),
        Payload::Guardianship(x) => reg(&mut out, p, x.registration.as_ref()),
        Payload::CourtDecision(x) => {
            reg(&mut out, p, x.registration.as_ref());
            out.push((TextField::of(p, "", "court"), &x.court));
            out.push((TextField::of(p, "", "decision_number"), &x.decision_number));
        }
        Payload::NationalityChange(x) => {
            reg(&mut out, p, x.registration.as_ref());
            out.push((TextField::of(p, "", "decision_number"), &x.decision_number));
        }
        Payload::GuardianshipEnded(x) => {
            reg(&mut out, p, x.registration.as_ref());
            out.push((TextField::of(p, "", "reason"), &x.reason));
        }
        Payload::AdoptionEnded(x) => {
            reg(&mut out, p, x.registration.as_ref());
            out.push((
                TextField::of(p, "", "court_decision_number"),
                &x.court_decision_number,
            ));
        }
        Payload::MaritalStatusConfirmed(x) => {
            reg(&mut out, p, x.registration.as_ref());
            out.push((TextField::of(p, "", "intended_use"), &x.intended_use));
        }
        Payload::PersonalIdAssigned(x) => {
            for (f, v) in [
                ("registry_office_code", &x.registry_office_code),
                ("book_number", &x.book_number),
                ("entry_number", &x.entry_number),
            ] {
                out.push((TextField::of(p, "", f), v.as_str()));
            }
        }
        Payload::ResidenceChanged(x) => {
            if let Some(r) = &x.new_residence {
                out.push((TextField::of(p, "new_residence.", "address"), &r.address));
            }
        }
        Payload::DeathRecorded(x) => {
            out.push((TextField::of(p, "", "recording_unit"), &x.recording_unit))
        }
        Payload::PersonalIdReissued(x) => out.push((TextField::of(p, "", "reason"), &x.reason)),
        Payload::CitizenDataCorrected(x) => {
            for (f, v) in [
                ("field", &x.field),
                ("new_value", &x.new_value),
                ("reason", &x.reason),
            ] {
                out.push((TextField::of(p, "", f), v.as_str()));
            }
        }
        Payload::PermanentResidenceRegistered(x) => {
            if let Some(r) = &x.residence {
                out.push((TextField::of(p, "residence.", "address"), &r.address));
            }
        }
        Payload::PermanentResidenceDeleted(_) => {}
        Payload::HealthInsuranceCardIssued(x) => {
            out.push((TextField::of(p, "", "card_number"), &x.card_number));
        }
        Payload::FuneralAllowanceDecided(x) => {
            out.push((TextField::of(p, "", "decision_number"), &x.decision_number));
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
                field.to_string(),
                format!("at most {MAX_TEXT_BYTES} bytes, got {}", text.len()),
            ));
        } else if text.chars().any(char::is_control) {
            v.push(FieldViolation::new(
                field.to_string(),
                "must not contain control characters (NUL, line breaks, escapes)",
            ));
        }
    }
    let (adoptive, name) = match &event.payload {
        Some(Payload::Adoption(a)) => (a.adoptive_parent_personal_ids.len(), "adoption"),
        Some(Payload::AdoptionEnded(a)) => (a.adoptive_parent_personal_ids.len(), "adoption_ended"),
        _ => (0, ""),
    };
    if adoptive > MAX_ADOPTIVE_PARENTS {
        v.push(FieldViolation::new(
            format!("event.{name}.adoptive_parent_personal_ids"),
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
    if let Err(e) = crate::domain::check_case_reference(&event.case_reference) {
        return Err(Refusal::Invalid(vec![FieldViolation::new(
            "event.case_reference",
            e,
        )]));
    }
    let Some(payload) = &event.payload else {
        return Err(Refusal::Invalid(vec![FieldViolation::new(
            "event.payload",
            "required: one event type",
        )]));
    };
    let (topic, name) = topic_of(payload);
    let side_ok = crate::policy::writes(producer.role) == Some(topic);
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
            let born = c.date("date_of_birth", &b.date_of_birth);
            c.not_after_registration("date_of_birth", born, b.registration.as_ref());
            if sex_from_pb(Sex::try_from(b.sex).unwrap_or(Sex::Unspecified)).is_none() {
                c.bad("sex", "required");
            }
            // A birth record's fields (Law 60/2014 art. 14).
            c.required("place_of_birth", &b.place_of_birth);
            c.required("nationality", &b.nationality);
            if c.required("ethnicity", &b.ethnicity) {
                c.ethnicity("ethnicity", &b.ethnicity, &b.nationality);
            }
            if !crate::domain::personal_id::is_known_province(&b.birth_registration_province_code) {
                c.bad(
                    "birth_registration_province_code",
                    "not a known province code",
                );
            }
            for (field, parent, sex) in [
                ("father", &b.father, crate::domain::Sex::Male),
                ("mother", &b.mother, crate::domain::Sex::Female),
            ] {
                let Some(p) = parent else { continue };
                let id_field = format!("{field}.personal_id");
                let given_id = p.personal_id.as_deref().filter(|s| !s.trim().is_empty());
                // A parent named neither by ID nor by name is no parent.
                if given_id.is_none() && p.full_name.trim().is_empty() {
                    c.bad(field, "a parent is given by personal ID or full name");
                }
                let year = (p.year_of_birth != 0)
                    .then(|| i32::try_from(p.year_of_birth).unwrap_or(i32::MAX));
                if let Some(y) = year
                    && y < 1900
                {
                    c.bad(&format!("{field}.year_of_birth"), "must be 1900 or later");
                }
                let parent_id = c.optional_id(&id_field, given_id);
                if let Some(id) = &parent_id {
                    // A father's ID encodes male, a mother's female; a year given agrees.
                    let _ = id
                        .check_consistency(Some(sex), year)
                        .map_err(|e| c.bad(&id_field, format!("the {field}'s ID: {e}")));
                    if b.personal_id.as_deref() == Some(id.as_str()) {
                        c.bad(&id_field, "is the child's own personal ID");
                    }
                }
                // A parent is born before the child: by the year given, or by the ID's.
                let parent_year = year.or(parent_id.as_ref().map(PersonalId::birth_year));
                if let (Some(y), Some(born)) = (parent_year, born)
                    && y >= born.year()
                {
                    let f = if year.is_some() {
                        format!("{field}.year_of_birth")
                    } else {
                        id_field.clone()
                    };
                    c.bad(
                        &f,
                        "the parent must be born before the child's year of birth",
                    );
                }
                if !p.full_name.is_empty() {
                    c.name(&format!("{field}.full_name"), &p.full_name);
                }
                if !p.ethnicity.trim().is_empty() {
                    // A parent with a Vietnamese personal ID is a Vietnamese citizen unless the
                    // nationality says otherwise.
                    let nationality = if p.nationality.trim().is_empty() && parent_id.is_some() {
                        "Việt Nam"
                    } else {
                        p.nationality.as_str()
                    };
                    c.ethnicity(&format!("{field}.ethnicity"), &p.ethnicity, nationality);
                }
            }
            // A re-registration names the ID the person has: it must fit the birth.
            if let (Some(id), Some(born)) =
                (c.optional_id("personal_id", b.personal_id.as_deref()), born)
            {
                let sex = sex_from_pb(Sex::try_from(b.sex).unwrap_or(Sex::Unspecified));
                let _ = id
                    .check_consistency(sex, Some(born.year()))
                    .map_err(|e| c.bad("personal_id", e.to_string()));
            }
            let abroad = b
                .registration
                .as_ref()
                .is_some_and(|r| !r.country.is_empty());
            if abroad && b.personal_id.as_deref().is_none_or(str::is_empty) {
                c.bad(
                    "registration.country",
                    "a birth registered abroad keeps an existing personal ID (personal_id): a new one would begin with the country's code for personal IDs (Circular 59/2021/TT-BCA), which this release does not have",
                );
            }
            let parents = b.father.is_some() || b.mother.is_some();
            if b.foundling && parents {
                c.bad(
                    "foundling",
                    "a foundling's parents are unknown (Decree 123/2015 art. 14): give no father or mother",
                );
            } else if !b.foundling && !parents {
                c.bad(
                    "mother",
                    "at least one parent is required (foundling, for a child found abandoned whose parents are unknown)",
                );
            }
            c.registration(b.registration.as_ref())
        }
        Payload::Death(d) => {
            let id = c.id("personal_id", &d.personal_id);
            let died = c.date("date_of_death", &d.date_of_death);
            c.not_before_birth("date_of_death", id.as_ref(), died);
            c.not_after_registration("date_of_death", died, d.registration.as_ref());
            c.optional_id("declarant_personal_id", Some(&d.declarant_personal_id));
            c.registration(d.registration.as_ref())
        }
        Payload::Marriage(m) => {
            let a = c.id("spouse1_personal_id", &m.spouse1_personal_id);
            let b = c.id("spouse2_personal_id", &m.spouse2_personal_id);
            c.name("spouse1_full_name", &m.spouse1_full_name);
            c.name("spouse2_full_name", &m.spouse2_full_name);
            let married = c.date("date_of_marriage", &m.date_of_marriage);
            c.not_after_registration("date_of_marriage", married, m.registration.as_ref());
            if a.is_some() && a == b {
                c.bad(
                    "spouse2_personal_id",
                    "must differ from spouse1_personal_id",
                );
            } else if let (Some(a), Some(b)) = (&a, &b)
                && a.sex() == b.sex()
            {
                c.bad(
                    "spouse2_personal_id",
                    "both IDs encode the same sex: the State does not recognise marriage between people of the same sex (Marriage and Family Law 2014, art. 8(2))",
                );
            }
            for (field, id) in [("spouse1_personal_id", &a), ("spouse2_personal_id", &b)] {
                c.marriage_age(field, id.as_ref(), married);
            }
            c.registration(m.registration.as_ref())
        }
        Payload::Divorce(d) => {
            let a = c.id("spouse1_personal_id", &d.spouse1_personal_id);
            let b = c.id("spouse2_personal_id", &d.spouse2_personal_id);
            c.distinct(
                "spouse2_personal_id",
                &a,
                &b,
                "must differ from spouse1_personal_id",
            );
            if let (Some(a), Some(b)) = (&a, &b)
                && a != b
                && a.sex() == b.sex()
            {
                c.bad(
                    "spouse2_personal_id",
                    "both IDs encode the same sex: there is no marriage to dissolve (Marriage and Family Law 2014, art. 8(2))",
                );
            }
            c.required("court_decision_number", &d.court_decision_number);
            // Recorded after the court's decision takes effect.
            let on = c.date("effective_date", &d.effective_date);
            c.not_after_registration("effective_date", on, d.registration.as_ref());
            c.registration(d.registration.as_ref())
        }
        Payload::CivilStatusChange(x) => {
            let id = c.id("personal_id", &x.personal_id);
            c.change(x, id.as_ref());
            c.required("reason", &x.reason);
            c.registration(x.registration.as_ref())
        }
        Payload::ParentChildRecognition(x) => {
            let parent = c.id("parent_personal_id", &x.parent_personal_id);
            let child = c.id("child_personal_id", &x.child_personal_id);
            c.distinct(
                "child_personal_id",
                &parent,
                &child,
                "a person is not their own parent",
            );
            // A parent is born before the child (by the years the IDs encode).
            if let (Some(p), Some(ch)) = (&parent, &child)
                && p.birth_year() >= ch.birth_year()
            {
                c.bad(
                    "parent_personal_id",
                    format!(
                        "encodes a year of birth ({}) not before the child's ({})",
                        p.birth_year(),
                        ch.birth_year()
                    ),
                );
            }
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
            c.adoption_parties(&x.child_personal_id, &x.adoptive_parent_personal_ids);
            // An adoption takes effect when it is registered (Law on Adoption 2010 art. 24).
            let on = c.date("effective_date", &x.effective_date);
            c.not_after_registration("effective_date", on, x.registration.as_ref());
            c.registration(x.registration.as_ref())
        }
        Payload::Guardianship(x) => {
            let ward = c.id("ward_personal_id", &x.ward_personal_id);
            let guardian = c.id("guardian_personal_id", &x.guardian_personal_id);
            c.distinct(
                "guardian_personal_id",
                &ward,
                &guardian,
                "a ward is not their own guardian",
            );
            let on = c.date("effective_date", &x.effective_date);
            c.guardian_of_age(guardian.as_ref(), on);
            c.not_after_registration("effective_date", on, x.registration.as_ref());
            c.registration(x.registration.as_ref())
        }
        Payload::CourtDecision(x) => {
            c.court_decision(x);
            c.registration(x.registration.as_ref())
        }
        Payload::NationalityChange(x) => {
            use crate::pb::v1::NationalityChangeKind as K;
            if matches!(
                K::try_from(x.kind).unwrap_or(K::Unspecified),
                K::Unspecified
            ) {
                c.bad(
                    "kind",
                    "required: acquired, renounced, restored or deprived",
                );
            }
            c.id("personal_id", &x.personal_id);
            c.required("decision_number", &x.decision_number);
            let on = c.date("effective_date", &x.effective_date);
            c.not_after_registration("effective_date", on, x.registration.as_ref());
            c.registration(x.registration.as_ref())
        }
        Payload::GuardianshipEnded(x) => {
            let ward = c.id("ward_personal_id", &x.ward_personal_id);
            let guardian = c.id("guardian_personal_id", &x.guardian_personal_id);
            c.distinct(
                "guardian_personal_id",
                &ward,
                &guardian,
                "a ward is not their own guardian",
            );
            let on = c.date("effective_date", &x.effective_date);
            c.not_after_registration("effective_date", on, x.registration.as_ref());
            c.required("reason", &x.reason);
            c.registration(x.registration.as_ref())
        }
        Payload::AdoptionEnded(x) => {
            c.adoption_parties(&x.child_personal_id, &x.adoptive_parent_personal_ids);
            c.required("court_decision_number", &x.court_decision_number);
            let on = c.date("effective_date", &x.effective_date);
            c.not_after_registration("effective_date", on, x.registration.as_ref());
            c.registration(x.registration.as_ref())
        }
        Payload::MaritalStatusConfirmed(x) => {
            use crate::pb::v1::MaritalStatus as M;
            c.id("personal_id", &x.personal_id);
            if matches!(
                M::try_from(x.marital_status).unwrap_or(M::Unspecified),
                M::Unspecified
            ) {
                c.bad("marital_status", "required: the status certified");
            }
            c.required("intended_use", &x.intended_use);
            c.valid_until(&x.valid_until, x.registration.as_ref());
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
            c.residence("new_residence", x.new_residence.as_ref());
            c.date("effective_date", &x.effective_date);
            None
        }
        Payload::DeathRecorded(x) => {
            let id = c.id("personal_id", &x.personal_id);
            let died = c.date("date_of_death", &x.date_of_death);
            c.not_before_birth("date_of_death", id.as_ref(), died);
            None
        }
        Payload::PersonalIdReissued(x) => {
            let old = c.id("old_personal_id", &x.old_personal_id);
            let new = c.id("new_personal_id", &x.new_personal_id);
            c.required("reason", &x.reason);
            match (&old, &new) {
                (Some(o), Some(n)) if o == n => {
                    c.bad("new_personal_id", "must differ from old_personal_id")
                }
                (Some(o), Some(n)) if o.province_code() != n.province_code() => c.bad(
                    "new_personal_id",
                    "keeps the province of birth registration of the old number",
                ),
                // A change of sex or year answers the civil_status_change (in_reply_to),
                // checked against it; any other re-issue keeps both.
                (Some(o), Some(n))
                    if event.in_reply_to.is_empty()
                        && (o.sex() != n.sex() || o.birth_year() != n.birth_year()) =>
                {
                    c.bad(
                        "new_personal_id",
                        "encodes another sex or year of birth: such a number answers the civil_status_change that changed them (in_reply_to)",
                    )
                }
                _ => {}
            }
            None
        }
        Payload::CitizenDataCorrected(x) => {
            let id = c.id("personal_id", &x.personal_id);
            // A field of the citizen's record, its new value valid for it.
            match crate::domain::CitizenField::from_name(&x.field) {
                None => c.bad(
                    "field",
                    "a field of civgate.v1.Citizen (e.g. full_name, ethnicity, place_of_birth)",
                ),
                Some(_) if c.required("new_value", &x.new_value) => {
                    c.value(&x.field, &x.new_value, id.as_ref());
                    // Sex and year of birth are in the number: changing them re-issues it.
                    if let Some(id) = &id {
                        c.agrees_with_id("new_value", &x.field, &x.new_value, id);
                    }
                }
                Some(_) => {}
            }
            c.required("reason", &x.reason);
            None
        }
        Payload::PermanentResidenceRegistered(x) => {
            c.id("personal_id", &x.personal_id);
            c.residence("residence", x.residence.as_ref());
            c.date("effective_date", &x.effective_date);
            c.answers(event, "the birth whose child's residence this is");
            None
        }
        Payload::PermanentResidenceDeleted(x) => {
            c.id("personal_id", &x.personal_id);
            c.date("effective_date", &x.effective_date);
            c.answers(event, "the death this deletion follows");
            None
        }
        Payload::HealthInsuranceCardIssued(x) => {
            // The child's ID when the agency has it; the birth answered names the child.
            if !x.personal_id.is_empty() {
                c.id("personal_id", &x.personal_id);
            }
            let ok = (10..=15).contains(&x.card_number.len())
                && x.card_number
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
            if !ok {
                c.bad("card_number", "10-15 of A-Z 0-9");
            }
            let from = c.any_date("valid_from", &x.valid_from);
            let until = c.any_date("valid_until", &x.valid_until);
            if let (Some(f), Some(u)) = (from, until)
                && u < f
            {
                c.bad("valid_until", "is before valid_from");
            }
            c.answers(event, "the birth of the child it covers");
            None
        }
        Payload::FuneralAllowanceDecided(x) => {
            c.id("personal_id", &x.personal_id);
            c.required("decision_number", &x.decision_number);
            c.date("decided_on", &x.decided_on);
            c.answers(event, "the death it follows");
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
    // Abroad: the producer speaks for that country's missions; an agency that speaks only for
    // missions abroad names the country of each registration.
    let country = registration_of(payload)
        .map(|r| r.country.as_str())
        .filter(|c| !c.is_empty());
    match country {
        Some(c) if !producer.countries.iter().any(|x| x.as_str() == c) => {
            return Err(Refusal::NotAllowed(format!(
                "agency {} may not publish registrations made in country {c} (its [agencies] countries)",
                producer.agency
            )));
        }
        None if payload_has_registration(payload)
            && producer.provinces.is_empty()
            && !producer.countries.is_empty() =>
        {
            return Err(Refusal::NotAllowed(format!(
                "agency {} publishes registrations made abroad: registration.country names the country",
                producer.agency
            )));
        }
        _ => {}
    }
    // A registry's offices are in its provinces: the birth is registered in one of them, and
    // the province decides the child's ID prefix.
    if let Payload::Birth(b) = payload
        && country.is_none()
        && !producer.provinces.is_empty()
        && !producer
            .provinces
            .iter()
            .any(|p| p.as_str() == b.birth_registration_province_code)
    {
        let ours: Vec<&str> = producer.provinces.iter().map(|p| p.as_str()).collect();
        return Err(Refusal::NotAllowed(format!(
            "agency {} registers births in province {} only, not {:?}",
            producer.agency,
            ours.join(", "),
            b.birth_registration_province_code
        )));
    }
    Ok(topic)
}

/// The registration an event of the civil-status topic carries (`None`: a population event).
fn registration_of(p: &Payload) -> Option<&Registration> {
    match p {
        Payload::Birth(x) => x.registration.as_ref(),
        Payload::Death(x) => x.registration.as_ref(),
        Payload::Marriage(x) => x.registration.as_ref(),
        Payload::Divorce(x) => x.registration.as_ref(),
        Payload::CivilStatusChange(x) => x.registration.as_ref(),
        Payload::ParentChildRecognition(x) => x.registration.as_ref(),
        Payload::Adoption(x) => x.registration.as_ref(),
        Payload::Guardianship(x) => x.registration.as_ref(),
        Payload::CourtDecision(x) => x.registration.as_ref(),
        Payload::NationalityChange(x) => x.registration.as_ref(),
        Payload::GuardianshipEnded(x) => x.registration.as_ref(),
        Payload::AdoptionEnded(x) => x.registration.as_ref(),
        Payload::MaritalStatusConfirmed(x) => x.registration.as_ref(),
        Payload::PersonalIdAssigned(_)
        | Payload::ResidenceChanged(_)
        | Payload::DeathRecorded(_)
        | Payload::PersonalIdReissued(_)
        | Payload::CitizenDataCorrected(_)
        | Payload::PermanentResidenceRegistered(_)
        | Payload::PermanentResidenceDeleted(_)
        | Payload::HealthInsuranceCardIssued(_)
        | Payload::FuneralAllowanceDecided(_) => None,
    }
}

/// What a linked procedure's answer says happened before its request did (`None`: nothing):
/// a child's card or residence from before its birth, a deceased's residence deleted or
/// allowance decided before the death.
pub fn answer_before_request(answer: &Payload, asked: &Payload) -> Option<FieldViolation> {
    let (field, date, since, what) = match (answer, asked) {
        (Payload::HealthInsuranceCardIssued(c), Payload::Birth(b)) => {
            ("valid_from", &c.valid_from, &b.date_of_birth, "the birth")
        }
        (Payload::PermanentResidenceRegistered(r), Payload::Birth(b)) => (
            "effective_date",
            &r.effective_date,
            &b.date_of_birth,
            "the birth",
        ),
        (Payload::PermanentResidenceDeleted(r), Payload::Death(d)) => (
            "effective_date",
            &r.effective_date,
            &d.date_of_death,
            "the death",
        ),
        (Payload::FuneralAllowanceDecided(f), Payload::Death(d)) => {
            ("decided_on", &f.decided_on, &d.date_of_death, "the death")
        }
        _ => return None,
    };
    let (Ok(date), Ok(since)) = (parse_date(date), parse_date(since)) else {
        return None;
    };
    (date < since).then(|| {
        FieldViolation::new(
            format!("event.{}.{field}", topic_of(answer).1),
            format!(
                "is before {what} it answers ({})",
                crate::domain::format_date(since)
            ),
        )
    })
}

/// Does an event of this kind carry a registration (every civil-status event does)?
fn payload_has_registration(p: &Payload) -> bool {
    topic_of(p).0 == CIVIL_STATUS
}

#[cfg(test)]
mod tests;
