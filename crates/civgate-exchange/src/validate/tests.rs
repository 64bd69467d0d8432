//! Unit tests of `validate`: one row per rule.

use super::*;
use crate::{
    domain::{CertFingerprint, Role},
    pb::v1::{Birth, DeathRecorded, Marriage, Parent},
};
use std::sync::Arc;

fn registry() -> Principal {
    Principal {
        agency: "registry-hp".parse().unwrap(),
        role: Role::CivilRegistry,
        fingerprint: CertFingerprint([0; 32]),
        registry_offices: Arc::from(vec!["HP-LECHAN".parse().unwrap()]),
        provinces: Arc::from(vec!["031".parse().unwrap()]),
        countries: Arc::from([]),
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
        country: String::new(),
    })
}

pub fn birth(office: &str) -> Event {
    Event {
        case_reference: String::new(),
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
            foundling: false,
            personal_id: None,
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
    // One of its offices, but a province not its own (Hà Nội's).
    let mut elsewhere = birth("HP-LECHAN");
    if let Some(Payload::Birth(b)) = &mut elsewhere.payload {
        b.birth_registration_province_code = "001".into();
    }
    assert!(matches!(
        validate(Some(&elsewhere), &registry()),
        Err(Refusal::NotAllowed(why)) if why.contains("province 031 only")
    ));
    let death = Event {
        case_reference: String::new(),
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
        case_reference: String::new(),
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

fn death(id: &str, died: &str) -> Event {
    Event {
        case_reference: String::new(),
        in_reply_to: String::new(),
        occurred_at_unix_ms: 0,
        payload: Some(Payload::Death(crate::pb::v1::Death {
            registration: reg("HP-LECHAN"),
            personal_id: id.into(),
            date_of_death: died.into(),
            place_of_death: "Hải Phòng".into(),
            cause_category: "illness".into(),
            declarant_personal_id: String::new(),
        })),
    }
}

fn marriage(a: &str, b: &str) -> Event {
    Event {
        case_reference: String::new(),
        in_reply_to: String::new(),
        occurred_at_unix_ms: 0,
        payload: Some(Payload::Marriage(Marriage {
            registration: reg("HP-LECHAN"),
            spouse1_personal_id: a.into(),
            spouse1_full_name: "Nguyễn Văn Hùng".into(),
            spouse2_personal_id: b.into(),
            spouse2_full_name: "Trần Thị Lan".into(),
            date_of_marriage: "2026-01-01".into(),
        })),
    }
}

fn moved_to(province: &str) -> Event {
    Event {
        in_reply_to: String::new(),
        occurred_at_unix_ms: 0,
        case_reference: String::new(),
        payload: Some(Payload::ResidenceChanged(crate::pb::v1::ResidenceChanged {
            personal_id: "001195000007".into(),
            new_residence: Some(crate::pb::v1::Residence {
                province_code: province.into(),
                address: "12 Lạch Tray".into(),
            }),
            effective_date: "2026-03-01".into(),
        })),
    }
}

fn with_birth(f: impl FnOnce(&mut Birth)) -> Event {
    let mut e = birth("HP-LECHAN");
    if let Some(Payload::Birth(b)) = &mut e.payload {
        f(b);
    }
    e
}

/// Each rule the law sets that the event itself can prove broken: the event, the field
/// named, and words of the reason (`None`: accepted).
#[test]
fn the_laws_rules_that_an_event_proves_broken_are_refused() {
    let parent = |id: Option<&str>, year: u32| Parent {
        personal_id: id.map(Into::into),
        full_name: "Nguyễn Văn Hùng".into(),
        year_of_birth: year,
        ..Default::default()
    };
    /// The field refused and words of its reason; `None`: accepted.
    type Want = Option<(&'static str, &'static str)>;
    let cases: Vec<(&str, Event, Want)> = vec![
        ("a valid birth", birth("HP-LECHAN"), None),
        (
            "a father whose ID says female",
            with_birth(|b| b.father = Some(parent(Some("031195000002"), 0))),
            Some(("event.birth.father.personal_id", "says female")),
        ),
        (
            "a mother whose ID says male",
            with_birth(|b| b.mother = Some(parent(Some("031095000001"), 0))),
            Some(("event.birth.mother.personal_id", "says male")),
        ),
        (
            "a father's year of birth the ID contradicts",
            with_birth(|b| b.father = Some(parent(Some("031095000001"), 1990))),
            Some(("event.birth.father.personal_id", "born in 1995")),
        ),
        (
            "a parent born after the child",
            with_birth(|b| b.father = Some(parent(None, 2026))),
            Some(("event.birth.father.year_of_birth", "before the child")),
        ),
        (
            "a parent named by nothing",
            with_birth(|b| b.father = Some(Parent::default())),
            Some(("event.birth.father", "personal ID or full name")),
        ),
        (
            "a father born after the child, by his ID",
            with_birth(|b| b.father = Some(parent(Some("031226000001"), 0))),
            Some(("event.birth.father.personal_id", "before the child")),
        ),
        (
            "a parent's ID that is the child's own",
            with_birth(|b| {
                b.personal_id = Some("031095000001".into());
                b.date_of_birth = "1995-01-01".into();
                b.sex = crate::pb::v1::Sex::Male as i32;
                b.father = Some(parent(Some("031095000001"), 0));
            }),
            Some(("event.birth.father.personal_id", "child's own")),
        ),
        (
            "a Vietnamese nationality spelled out, an ethnicity not on the list",
            with_birth(|b| {
                b.nationality = "Vietnamese".into();
                b.ethnicity = "Klingon".into();
            }),
            Some(("event.birth.ethnicity", "54 ethnic groups")),
        ),
        (
            "a parent with a Vietnamese ID and no nationality, an ethnicity not on the list",
            with_birth(|b| {
                if let Some(f) = &mut b.father {
                    f.ethnicity = "Klingon".into();
                }
            }),
            Some(("event.birth.father.ethnicity", "54 ethnic groups")),
        ),
        (
            "a parent's ID encoding a year of birth not come yet",
            with_birth(|b| b.father = Some(parent(Some("031400000001"), 0))),
            Some(("event.birth.father.personal_id", "2100")),
        ),
        (
            "a birth after its registration",
            with_birth(|b| b.date_of_birth = "2026-03-05".into()),
            Some(("event.birth.date_of_birth", "registration date")),
        ),
        (
            "no place of birth",
            with_birth(|b| b.place_of_birth = String::new()),
            Some(("event.birth.place_of_birth", "required")),
        ),
        (
            "an ethnicity not on the national list",
            with_birth(|b| b.ethnicity = "Kinhh".into()),
            Some(("event.birth.ethnicity", "54 ethnic groups")),
        ),
        (
            "an ethnicity by its code",
            with_birth(|b| b.ethnicity = "12".into()),
            None,
        ),
        (
            "a parent's ethnicity not on the list",
            with_birth(|b| {
                if let Some(f) = &mut b.father {
                    f.ethnicity = "Martian".into();
                    f.nationality = "Việt Nam".into();
                }
            }),
            Some(("event.birth.father.ethnicity", "54 ethnic groups")),
        ),
        (
            "a foreign child's ethnicity is not the list's to judge",
            with_birth(|b| {
                b.ethnicity = "Lao Loum".into();
                b.nationality = "Lào".into();
            }),
            None,
        ),
        (
            "no ethnicity",
            with_birth(|b| b.ethnicity = " ".into()),
            Some(("event.birth.ethnicity", "required")),
        ),
        (
            "no nationality",
            with_birth(|b| b.nationality = String::new()),
            Some(("event.birth.nationality", "required")),
        ),
        (
            "no parent, not a foundling",
            with_birth(|b| b.father = None),
            Some(("event.birth.mother", "foundling")),
        ),
        (
            "a foundling",
            with_birth(|b| {
                b.father = None;
                b.foundling = true;
            }),
            None,
        ),
        (
            "a foundling with a father",
            with_birth(|b| b.foundling = true),
            Some(("event.birth.foundling", "unknown")),
        ),
        (
            "a re-registration naming the ID the person has",
            with_birth(|b| b.personal_id = Some("001326000006".into())),
            None,
        ),
        (
            "a re-registration naming an ID of the other sex",
            with_birth(|b| b.personal_id = Some("001226000006".into())),
            Some(("event.birth.personal_id", "says male")),
        ),
        (
            "a re-registration naming an ID of another year",
            with_birth(|b| b.personal_id = Some("001325000006".into())),
            Some(("event.birth.personal_id", "born in 2025")),
        ),
        ("a valid death", death("031095000001", "2026-03-01"), None),
        (
            "a move to a province merged away in 2025",
            moved_to("030"),
            Some((
                "event.residence_changed.new_residence.province_code",
                "Hải Phòng (031)",
            )),
        ),
        ("a move to one of the 34", moved_to("031"), None),
        (
            "a case reference that is not a dossier code",
            Event {
                case_reference: "hồ sơ 1".into(),
                ..death("031095000001", "2026-03-01")
            },
            Some(("event.case_reference", "dossier code")),
        ),
        (
            "a dossier code",
            Event {
                case_reference: "000.00.01.H31-260301-0007".into(),
                ..death("031095000001", "2026-03-01")
            },
            None,
        ),
        (
            "a death before the year of birth in the ID",
            death("031095000001", "1990-05-01"),
            Some(("event.death.date_of_death", "1995")),
        ),
        (
            "a death after its registration",
            death("031095000001", "2026-03-03"),
            Some(("event.death.date_of_death", "registration date")),
        ),
        (
            "a man of 1995 and a woman of 1995",
            marriage("031095000001", "031195000002"),
            None,
        ),
        (
            "two IDs of the same sex",
            marriage("031095000001", "031095000003"),
            Some(("event.marriage.spouse2_personal_id", "same sex")),
        ),
        (
            "a man at most 16",
            marriage("031210000001", "031195000002"),
            Some(("event.marriage.spouse1_personal_id", "from full 20")),
        ),
        (
            "a woman at most 16",
            marriage("031095000001", "031310000002"),
            Some(("event.marriage.spouse2_personal_id", "from full 18")),
        ),
        (
            // Born in 2008: 18 on her birthday in 2026; only the directory knows the day.
            "a woman who may be 18",
            marriage("031095000001", "031308000002"),
            None,
        ),
        (
            "a man who is at most 19",
            marriage("031207000001", "031195000002"),
            Some(("event.marriage.spouse1_personal_id", "at most 19")),
        ),
    ];
    for (what, event, want) in cases {
        let side = event.payload.as_ref().map(|p| topic_of(p).0);
        let producer = if side == Some(POPULATION) {
            population()
        } else {
            registry()
        };
        let got = validate(Some(&event), &producer);
        match (want, got) {
            (None, Ok(_)) => {}
            (Some((field, why)), Err(Refusal::Invalid(v))) => {
                assert!(
                    v.iter()
                        .any(|f| f.field == field && f.description.contains(why)),
                    "{what}: {v:?}"
                );
            }
            (want, got) => panic!("{what}: wanted {want:?}, got {got:?}"),
        }
    }
    // A police record of a death, too.
    let recorded = Event {
        case_reference: String::new(),
        in_reply_to: String::new(),
        occurred_at_unix_ms: 0,
        payload: Some(Payload::DeathRecorded(DeathRecorded {
            personal_id: "031095000001".into(),
            date_of_death: "1994-12-31".into(),
            recording_unit: "Công an phường".into(),
        })),
    };
    assert!(matches!(
        validate(Some(&recorded), &population()),
        Err(Refusal::Invalid(v)) if v[0].field == "event.death_recorded.date_of_death"
    ));
}

#[test]
fn late_registrations_are_noticed_not_refused() {
    let late_birth = with_birth(|b| b.date_of_birth = "2025-12-31".into());
    assert!(validate(Some(&late_birth), &registry()).is_ok());
    assert_eq!(notices(&late_birth), ["late_birth_registration"]);
    // 2026-01-01 → 2026-03-02 is 60 days: within the limit.
    let in_time = with_birth(|b| b.date_of_birth = "2026-01-01".into());
    assert!(notices(&in_time).is_empty());
    assert!(notices(&birth("HP-LECHAN")).is_empty());
    let late_death = death("031095000001", "2026-02-14");
    assert!(validate(Some(&late_death), &registry()).is_ok());
    assert_eq!(notices(&late_death), ["late_death_registration"]);
    assert!(notices(&death("031095000001", "2026-02-15")).is_empty());
}

fn event(payload: Payload) -> Event {
    Event {
        case_reference: String::new(),
        in_reply_to: String::new(),
        occurred_at_unix_ms: 0,
        payload: Some(payload),
    }
}

fn change(kind: crate::pb::v1::ChangeKind, field: &str, old: &str, new: &str) -> Event {
    event(Payload::CivilStatusChange(
        crate::pb::v1::CivilStatusChange {
            registration: reg("HP-LECHAN"),
            personal_id: "031195000002".into(),
            field: field.into(),
            old_value: old.into(),
            new_value: new.into(),
            reason: "theo yêu cầu".into(),
            kind: kind as i32,
        },
    ))
}

fn with_registration_date(date: &str) -> Event {
    let mut e = change(
        crate::pb::v1::ChangeKind::Name,
        "full_name",
        "Trần Thị Lan",
        "Trần Thị Hoa",
    );
    if let Some(Payload::CivilStatusChange(x)) = &mut e.payload
        && let Some(r) = &mut x.registration
    {
        r.registration_date = date.into();
    }
    e
}

fn court(
    kind: crate::pb::v1::CourtDecisionKind,
    other: &str,
    f: impl FnOnce(&mut crate::pb::v1::CourtDecision),
) -> Event {
    let mut d = crate::pb::v1::CourtDecision {
        registration: reg("HP-LECHAN"),
        kind: kind as i32,
        personal_id: "031095000001".into(),
        other_personal_id: other.into(),
        court: "Tòa án nhân dân TP Hải Phòng".into(),
        decision_number: "12/2026/QĐST-HNGĐ".into(),
        effective_date: "2026-02-01".into(),
        missing_since: String::new(),
        date_of_death: String::new(),
    };
    f(&mut d);
    event(Payload::CourtDecision(d))
}

/// The events recorded from decisions and the typed changes: the event, the field refused
/// and words of the reason (`None`: accepted).
#[test]
fn changes_court_decisions_and_the_other_new_events_are_checked() {
    use crate::pb::v1::{
        AdoptionEnded, ChangeKind as C, CourtDecisionKind as D, GuardianshipEnded,
        MaritalStatusConfirmed, NationalityChange, NationalityChangeKind as N,
    };
    type Want = Option<(&'static str, &'static str)>;
    let confirmed = |until: &str| {
        event(Payload::MaritalStatusConfirmed(MaritalStatusConfirmed {
            registration: reg("HP-LECHAN"),
            personal_id: "031195000002".into(),
            marital_status: crate::pb::v1::MaritalStatus::Single as i32,
            intended_use: "kết hôn với Nguyễn Văn Hùng".into(),
            valid_until: until.into(),
        }))
    };
    let guardianship_ended = |ward: &str, guardian: &str| {
        event(Payload::GuardianshipEnded(GuardianshipEnded {
            registration: reg("HP-LECHAN"),
            ward_personal_id: ward.into(),
            guardian_personal_id: guardian.into(),
            effective_date: "2026-02-01".into(),
            reason: "người được giám hộ đã thành niên".into(),
        }))
    };
    let adoption_ended = |child: &str, parents: &[&str]| {
        event(Payload::AdoptionEnded(AdoptionEnded {
            registration: reg("HP-LECHAN"),
            child_personal_id: child.into(),
            adoptive_parent_personal_ids: parents.iter().map(|s| (*s).into()).collect(),
            court_decision_number: "3/2026/QĐ".into(),
            effective_date: "2026-02-01".into(),
        }))
    };
    let nationality = |kind: N| {
        event(Payload::NationalityChange(NationalityChange {
            registration: reg("HP-LECHAN"),
            kind: kind as i32,
            personal_id: "031095000001".into(),
            decision_number: "123/QĐ-CTN".into(),
            effective_date: "2026-01-15".into(),
        }))
    };
    let cases: Vec<(&str, Event, Want)> = vec![
        // Typed changes (Law 60/2014 arts. 26-29).
        (
            "a name change",
            change(C::Name, "full_name", "Trần Thị Lan", "Trần Thị Lan Anh"),
            None,
        ),
        (
            "a change without a kind",
            change(C::Unspecified, "full_name", "A", "B"),
            Some(("event.civil_status_change.kind", "required")),
        ),
        (
            "a name change of another field",
            change(C::Name, "hometown", "Hải Phòng", "Hà Nội"),
            Some(("event.civil_status_change.field", "of full_name")),
        ),
        (
            "a field not on a birth record",
            change(C::Correction, "blood_type", "A", "B"),
            Some(("event.civil_status_change.field", "birth record's field")),
        ),
        (
            "a correction that changes nothing",
            change(C::Correction, "hometown", "Hải Phòng", "Hải Phòng"),
            Some(("event.civil_status_change.new_value", "must differ")),
        ),
        (
            "an addition over a value",
            change(C::Addition, "hometown", "Hải Phòng", "Hà Nội"),
            Some((
                "event.civil_status_change.old_value",
                "leave old_value empty",
            )),
        ),
        (
            "an addition of a missing hometown",
            change(C::Addition, "hometown", "", "Hà Nội"),
            None,
        ),
        (
            "an ethnicity re-determination to a group not on the list",
            change(C::Ethnicity, "ethnicity", "Kinh", "Elf"),
            Some(("event.civil_status_change.new_value", "54 ethnic groups")),
        ),
        (
            "an ethnicity re-determination",
            change(C::Ethnicity, "ethnicity", "Kinh", "Tày"),
            None,
        ),
        (
            "a gender re-determination",
            change(C::Gender, "sex", "female", "male"),
            None,
        ),
        (
            "a gender re-determination from a sex the ID does not encode",
            change(C::Gender, "sex", "male", "female"),
            Some((
                "event.civil_status_change.old_value",
                "the personal ID encodes",
            )),
        ),
        (
            "a sex that is neither",
            change(C::Gender, "sex", "female", "other"),
            Some((
                "event.civil_status_change.new_value",
                "\"male\" or \"female\"",
            )),
        ),
        (
            "a corrected date of birth in the future",
            change(C::Correction, "date_of_birth", "1995-01-01", "2999-01-01"),
            Some(("event.civil_status_change.new_value", "future")),
        ),
        (
            "a corrected father whose ID says female",
            change(
                C::Correction,
                "father_personal_id",
                "031060000001",
                "031160000001",
            ),
            Some(("event.civil_status_change.new_value", "says female")),
        ),
        (
            "an added mother born after the person",
            change(C::Addition, "mother_personal_id", "", "031199000001"),
            Some(("event.civil_status_change.new_value", "born before")),
        ),
        (
            "a corrected name not in NFC",
            change(
                C::Correction,
                "full_name",
                "Lan",
                "Nguye\u{0302}\u{0303}n Lan",
            ),
            Some(("event.civil_status_change.new_value", "NFC")),
        ),
        // Court decisions.
        (
            "a marriage annulled",
            court(D::MarriageAnnulled, "031195000002", |_| {}),
            None,
        ),
        (
            "a marriage recognised between two men",
            court(D::MarriageRecognised, "031090000003", |_| {}),
            Some(("event.court_decision.other_personal_id", "same sex")),
        ),
        (
            "an annulment without the other spouse",
            court(D::MarriageAnnulled, "", |_| {}),
            Some(("event.court_decision.other_personal_id", "required")),
        ),
        (
            "a decision without a kind",
            court(D::Unspecified, "", |_| {}),
            Some(("event.court_decision.kind", "required")),
        ),
        (
            "a declaration of missing without the date",
            court(D::DeclaredMissing, "", |_| {}),
            Some(("event.court_decision.missing_since", "required")),
        ),
        (
            "a declaration of missing",
            court(D::DeclaredMissing, "", |d| {
                d.missing_since = "2020-05-01".into()
            }),
            None,
        ),
        (
            "missing since after the decision",
            court(D::DeclaredMissing, "", |d| {
                d.missing_since = "2026-02-15".into()
            }),
            Some(("event.court_decision.missing_since", "effective date")),
        ),
        (
            "a declaration of death dated before the person's birth year",
            court(D::DeclaredDead, "", |d| {
                d.date_of_death = "1990-01-01".into()
            }),
            Some(("event.court_decision.date_of_death", "year of birth")),
        ),
        (
            "a declaration of death",
            court(D::DeclaredDead, "", |d| {
                d.date_of_death = "2021-01-01".into()
            }),
            None,
        ),
        (
            "a date of death on a decision of another kind",
            court(D::LostCivilCapacity, "", |d| {
                d.date_of_death = "2021-01-01".into()
            }),
            Some((
                "event.court_decision.date_of_death",
                "declaration of death only",
            )),
        ),
        (
            "a decision of one person naming another",
            court(D::LostCivilCapacity, "031195000002", |_| {}),
            Some(("event.court_decision.other_personal_id", "leave it empty")),
        ),
        (
            "a parent born after the child",
            court(D::ParentageDetermined, "031199000001", |_| {}),
            Some(("event.court_decision.other_personal_id", "born before")),
        ),
        (
            "a decision without its number",
            court(D::DeathCancelled, "", |d| d.decision_number.clear()),
            Some(("event.court_decision.decision_number", "required")),
        ),
        // Nationality.
        ("nationality acquired", nationality(N::Acquired), None),
        (
            "a nationality change without a kind",
            nationality(N::Unspecified),
            Some(("event.nationality_change.kind", "required")),
        ),
        // End of guardianship and of adoption.
        (
            "a guardianship ended",
            guardianship_ended("031210000001", "031095000001"),
            None,
        ),
        (
            "one's own guardianship ended",
            guardianship_ended("031095000001", "031095000001"),
            Some((
                "event.guardianship_ended.guardian_personal_id",
                "own guardian",
            )),
        ),
        (
            "an adoption ended",
            adoption_ended("031210000001", &["031095000001"]),
            None,
        ),
        (
            "a child who adopted themself",
            adoption_ended("031210000001", &["031210000001"]),
            Some((
                "event.adoption_ended.adoptive_parent_personal_ids[0]",
                "own adoptive parent",
            )),
        ),
        // Marital status confirmed.
        (
            "a certificate of marital status",
            confirmed("2026-09-01"),
            None,
        ),
        (
            "a certificate valid for more than 6 months",
            confirmed("2026-09-03"),
            Some(("event.marital_status_confirmed.valid_until", "6 months")),
        ),
        (
            "a certificate that expired before it was issued",
            confirmed("2026-03-01"),
            Some((
                "event.marital_status_confirmed.valid_until",
                "before the registration",
            )),
        ),
        // What an outside tester got past the first version of these rules.
        (
            "an addition of a sex the ID does not encode",
            change(C::Addition, "sex", "", "male"),
            Some((
                "event.civil_status_change.new_value",
                "the personal ID encodes",
            )),
        ),
        (
            "a corrected date of birth from a year the ID does not encode",
            change(C::Correction, "date_of_birth", "1950-10-14", "1995-10-15"),
            Some(("event.civil_status_change.old_value", "year of birth")),
        ),
        (
            "a corrected date of birth after the registration",
            change(C::Correction, "date_of_birth", "1995-10-14", "2026-03-05"),
            Some(("event.civil_status_change.new_value", "registration date")),
        ),
        (
            "an ethnicity re-determined to another spelling of the same group",
            change(C::Ethnicity, "ethnicity", "Ê Đê", "Ê-đê"),
            Some(("event.civil_status_change.new_value", "same ethnic group")),
        ),
        (
            "a corrected father whose old ID says female",
            change(
                C::Correction,
                "father_personal_id",
                "031160000001",
                "031060000001",
            ),
            Some(("event.civil_status_change.old_value", "says female")),
        ),
        (
            "a date with a sign",
            with_registration_date("-2026-12-01"),
            Some((
                "event.civil_status_change.registration.registration_date",
                "YYYY-MM-DD",
            )),
        ),
        (
            "a registration in 1800",
            with_registration_date("1800-01-01"),
            Some((
                "event.civil_status_change.registration.registration_date",
                "1900",
            )),
        ),
        (
            "a marriage recognised with a girl of 11",
            court(D::MarriageRecognised, "031315000001", |_| {}),
            Some(("event.court_decision.other_personal_id", "age of marriage")),
        ),
        (
            "a divorce of two men",
            event(Payload::Divorce(crate::pb::v1::Divorce {
                registration: reg("HP-LECHAN"),
                spouse1_personal_id: "031095000001".into(),
                spouse2_personal_id: "031090000003".into(),
                court_decision_number: "1/2026".into(),
                effective_date: "2026-01-01".into(),
            })),
            Some(("event.divorce.spouse2_personal_id", "same sex")),
        ),
        (
            "an adoption by the same person twice",
            adoption_ended("031210000001", &["031095000001", "031095000001"]),
            Some((
                "event.adoption_ended.adoptive_parent_personal_ids[1]",
                "twice",
            )),
        ),
        (
            "an adoption by two men",
            adoption_ended("031210000001", &["031095000001", "031090000003"]),
            Some((
                "event.adoption_ended.adoptive_parent_personal_ids[1]",
                "married couple",
            )),
        ),
        (
            "an adoptive parent younger than the child",
            adoption_ended("031210000001", &["031215000001"]),
            Some((
                "event.adoption_ended.adoptive_parent_personal_ids[0]",
                "born before the child",
            )),
        ),
        (
            "a guardian of 6",
            event(Payload::Guardianship(crate::pb::v1::Guardianship {
                registration: reg("HP-LECHAN"),
                ward_personal_id: "031210000001".into(),
                guardian_personal_id: "031220000001".into(),
                effective_date: "2026-02-01".into(),
            })),
            Some((
                "event.guardianship.guardian_personal_id",
                "a guardian is an adult",
            )),
        ),
        (
            "a guardian of oneself",
            event(Payload::Guardianship(crate::pb::v1::Guardianship {
                registration: reg("HP-LECHAN"),
                ward_personal_id: "031095000001".into(),
                guardian_personal_id: "031095000001".into(),
                effective_date: "2026-02-01".into(),
            })),
            Some((
                "event.guardianship.guardian_personal_id",
                "not their own guardian",
            )),
        ),
        (
            "a guardianship effective after its registration",
            event(Payload::Guardianship(crate::pb::v1::Guardianship {
                registration: reg("HP-LECHAN"),
                ward_personal_id: "031210000001".into(),
                guardian_personal_id: "031095000001".into(),
                effective_date: "2026-04-01".into(),
            })),
            Some((
                "event.guardianship.effective_date",
                "after the registration date",
            )),
        ),
        (
            "an adoption by two people of one sex",
            event(Payload::Adoption(crate::pb::v1::Adoption {
                registration: reg("HP-LECHAN"),
                child_personal_id: "031210000001".into(),
                adoptive_parent_personal_ids: vec!["031095000001".into(), "031090000003".into()],
                effective_date: "2026-02-01".into(),
            })),
            Some((
                "event.adoption.adoptive_parent_personal_ids[1]",
                "married couple",
            )),
        ),
        (
            "an adoption by someone younger than the child",
            event(Payload::Adoption(crate::pb::v1::Adoption {
                registration: reg("HP-LECHAN"),
                child_personal_id: "031210000001".into(),
                adoptive_parent_personal_ids: vec!["031215000001".into()],
                effective_date: "2026-02-01".into(),
            })),
            Some((
                "event.adoption.adoptive_parent_personal_ids[0]",
                "born before the child",
            )),
        ),
        (
            "an adoption effective after its registration",
            event(Payload::Adoption(crate::pb::v1::Adoption {
                registration: reg("HP-LECHAN"),
                child_personal_id: "031210000001".into(),
                adoptive_parent_personal_ids: vec!["031095000001".into()],
                effective_date: "2026-04-01".into(),
            })),
            Some((
                "event.adoption.effective_date",
                "after the registration date",
            )),
        ),
        (
            "a divorce effective after its registration",
            event(Payload::Divorce(crate::pb::v1::Divorce {
                registration: reg("HP-LECHAN"),
                spouse1_personal_id: "031095000001".into(),
                spouse2_personal_id: "031195000002".into(),
                court_decision_number: "1/2026".into(),
                effective_date: "2026-04-01".into(),
            })),
            Some((
                "event.divorce.effective_date",
                "after the registration date",
            )),
        ),
        (
            "a marriage dated after its registration",
            {
                let mut m = marriage("031095000001", "031195000002");
                if let Some(Payload::Marriage(x)) = &mut m.payload {
                    x.date_of_marriage = "2026-04-01".into();
                }
                m
            },
            Some((
                "event.marriage.date_of_marriage",
                "after the registration date",
            )),
        ),
        (
            "a court decision without the court",
            court(D::DeclaredDead, "", |d| {
                d.court.clear();
                d.date_of_death = "2025-06-01".into();
            }),
            Some(("event.court_decision.court", "required")),
        ),
        (
            "a court decision without its effective date",
            court(D::DeclaredDead, "", |d| {
                d.effective_date.clear();
                d.date_of_death = "2025-06-01".into();
            }),
            Some(("event.court_decision.effective_date", "required")),
        ),
        (
            "missing since before the year of birth",
            court(D::DeclaredMissing, "", |d| {
                d.missing_since = "1990-01-01".into();
            }),
            Some((
                "event.court_decision.missing_since",
                "before the year of birth",
            )),
        ),
        (
            "an ethnicity re-determination of the name",
            change(C::Ethnicity, "full_name", "Trần Thị Lan", "Trần Thị Hoa"),
            Some(("event.civil_status_change.field", "of ethnicity")),
        ),
        (
            "a gender re-determination of the hometown",
            change(C::Gender, "hometown", "Hải Phòng", "Hà Nội"),
            Some(("event.civil_status_change.field", "of sex")),
        ),
        // Self-references and parents born after children in the older events.
        (
            "a divorce from oneself",
            event(Payload::Divorce(crate::pb::v1::Divorce {
                registration: reg("HP-LECHAN"),
                spouse1_personal_id: "031095000001".into(),
                spouse2_personal_id: "031095000001".into(),
                court_decision_number: "1/2026".into(),
                effective_date: "2026-01-01".into(),
            })),
            Some(("event.divorce.spouse2_personal_id", "must differ")),
        ),
        (
            "a recognised parent born after the child",
            event(Payload::ParentChildRecognition(
                crate::pb::v1::ParentChildRecognition {
                    registration: reg("HP-LECHAN"),
                    parent_personal_id: "031099000001".into(),
                    child_personal_id: "031095000001".into(),
                    parent_sex: Sex::Male as i32,
                },
            )),
            Some((
                "event.parent_child_recognition.parent_personal_id",
                "not before the child",
            )),
        ),
    ];
    for (what, event, want) in cases {
        match (want, validate(Some(&event), &registry())) {
            (None, Ok(t)) => assert_eq!(t, CIVIL_STATUS, "{what}"),
            (Some((field, why)), Err(Refusal::Invalid(v))) => {
                assert!(
                    v.iter()
                        .any(|f| f.field == field && f.description.contains(why)),
                    "{what}: {v:?}"
                );
            }
            (want, got) => panic!("{what}: wanted {want:?}, got {got:?}"),
        }
    }
}

#[test]
fn six_months_end_on_the_last_day_of_a_shorter_month() {
    use time::macros::date;
    assert_eq!(add_months(date!(2026 - 03 - 02), 6), date!(2026 - 09 - 02));
    assert_eq!(add_months(date!(2026 - 08 - 31), 6), date!(2027 - 02 - 28));
    assert_eq!(add_months(date!(2027 - 08 - 31), 6), date!(2028 - 02 - 29));
    assert_eq!(add_months(date!(2026 - 12 - 15), 1), date!(2027 - 01 - 15));
}

#[test]
fn a_correction_by_the_population_side_names_a_field_and_a_valid_value() {
    let corrected = |field: &str, value: &str| {
        event(Payload::CitizenDataCorrected(
            crate::pb::v1::CitizenDataCorrected {
                personal_id: "031195000002".into(),
                field: field.into(),
                new_value: value.into(),
                reason: "đối chiếu hồ sơ gốc".into(),
            },
        ))
    };
    // (event, the field refused or None)
    let rows = [
        (corrected("ethnicity", "Tày"), None),
        (corrected("place_of_birth", "Hải Phòng"), None),
        (
            corrected("shoe_size", "42"),
            Some("event.citizen_data_corrected.field"),
        ),
        (
            corrected("ethnicity", "Elf"),
            Some("event.citizen_data_corrected.new_value"),
        ),
        (
            corrected("full_name", "Nguye\u{0302}\u{0303}n Lan"),
            Some("event.citizen_data_corrected.new_value"),
        ),
        (
            corrected("mother_personal_id", "031195000002"),
            Some("event.citizen_data_corrected.new_value"),
        ),
        (
            corrected("hometown", ""),
            Some("event.citizen_data_corrected.new_value"),
        ),
        // Sex and year of birth are in the number: a correction of them re-issues it.
        (
            corrected("sex", "male"),
            Some("event.citizen_data_corrected.new_value"),
        ),
        (
            corrected("date_of_birth", "1999-01-01"),
            Some("event.citizen_data_corrected.new_value"),
        ),
        (corrected("date_of_birth", "1995-06-01"), None),
    ];
    for (i, (e, want)) in rows.iter().enumerate() {
        let got = validate(Some(e), &population());
        match (want, got) {
            (None, Ok(t)) => assert_eq!(t, POPULATION),
            (Some(field), Err(Refusal::Invalid(v))) => {
                assert!(v.iter().any(|f| f.field == *field), "row {i}: {v:?}")
            }
            (want, got) => panic!("row {i}: wanted {want:?}, got {got:?}"),
        }
    }
}

#[test]
fn a_number_re_issued_for_another_reason_keeps_what_it_encodes() {
    let reissued = |old: &str, new: &str, reason: &str, in_reply_to: &str| Event {
        case_reference: String::new(),
        in_reply_to: in_reply_to.into(),
        occurred_at_unix_ms: 0,
        payload: Some(Payload::PersonalIdReissued(
            crate::pb::v1::PersonalIdReissued {
                old_personal_id: old.into(),
                new_personal_id: new.into(),
                reason: reason.into(),
            },
        )),
    };
    // (event, the field refused or None)
    let rows = [
        (
            reissued("031043188286", "031043000001", "trùng số", ""),
            None,
        ),
        (
            reissued("031043188286", "001199000123", "trùng số", ""),
            Some("event.personal_id_reissued.new_personal_id"),
        ),
        (
            reissued("031043188286", "031143000001", "trùng số", ""),
            Some("event.personal_id_reissued.new_personal_id"),
        ),
        // Another province only (sex and year kept): still refused.
        (
            reissued("031043188286", "001043000001", "trùng số", ""),
            Some("event.personal_id_reissued.new_personal_id"),
        ),
        (
            reissued("031043188286", "031043000001", "", ""),
            Some("event.personal_id_reissued.reason"),
        ),
        // In reply to a change: checked against the change when published.
        (
            reissued(
                "031043188286",
                "031143000001",
                "xác định lại giới tính",
                "ev1",
            ),
            None,
        ),
    ];
    for (i, (e, want)) in rows.iter().enumerate() {
        match (want, validate(Some(e), &population())) {
            (None, Ok(t)) => assert_eq!(t, POPULATION),
            (Some(field), Err(Refusal::Invalid(v))) => {
                assert!(v.iter().any(|f| f.field == *field), "row {i}: {v:?}")
            }
            (want, got) => panic!("row {i}: wanted {want:?}, got {got:?}"),
        }
    }
}

/// An agency that speaks for Việt Nam's missions in Japan.
fn consular() -> Principal {
    Principal {
        agency: "consular".parse().unwrap(),
        registry_offices: Arc::from(vec!["JP-TOKYO".parse().unwrap()]),
        provinces: Arc::from([]),
        countries: Arc::from(vec!["JP".parse().unwrap()]),
        ..registry()
    }
}

/// `e` registered at `office`, in `country` ("" for Việt Nam).
fn registered_at(mut e: Event, office: &str, country: &str) -> Event {
    let r = match e.payload.as_mut() {
        Some(Payload::Birth(x)) => x.registration.as_mut(),
        Some(Payload::Marriage(x)) => x.registration.as_mut(),
        _ => None,
    };
    if let Some(r) = r {
        r.registry_office_code = office.into();
        r.country = country.into();
    }
    e
}

/// Registrations made abroad by a representative mission (Law 60/2014 art. 3(3)): the country
/// is an ISO code of another country, the producer speaks for it, an agency of missions names
/// it, and a birth abroad keeps an existing personal ID.
#[test]
fn registrations_made_abroad() {
    #[derive(Debug)]
    enum Want {
        Ok,
        Invalid(&'static str),
        NotAllowed(&'static str),
    }
    let marriage_in = |office: &str, country: &str| {
        registered_at(marriage("031095000001", "031195000002"), office, country)
    };
    let kept_id = |e: Event| {
        let mut e = e;
        if let Some(Payload::Birth(b)) = &mut e.payload {
            b.personal_id = Some("031326000009".into());
        }
        e
    };
    let rows: Vec<(&str, Principal, Event, Want)> = vec![
        (
            "a marriage at the embassy in Tokyo",
            consular(),
            marriage_in("JP-TOKYO", "JP"),
            Want::Ok,
        ),
        (
            "a country the agency does not speak for",
            consular(),
            marriage_in("JP-TOKYO", "KR"),
            Want::NotAllowed("country KR"),
        ),
        (
            "a mission's registration without its country",
            consular(),
            marriage_in("JP-TOKYO", ""),
            Want::NotAllowed("registration.country names the country"),
        ),
        (
            "not a country code",
            consular(),
            marriage_in("JP-TOKYO", "XX"),
            Want::Invalid("event.marriage.registration.country"),
        ),
        (
            "Việt Nam as the country abroad",
            consular(),
            marriage_in("JP-TOKYO", "VN"),
            Want::Invalid("event.marriage.registration.country"),
        ),
        (
            "a provincial registry publishing for a mission",
            registry(),
            marriage_in("HP-LECHAN", "JP"),
            Want::NotAllowed("country JP"),
        ),
        (
            "a birth abroad that would need a new ID",
            consular(),
            registered_at(birth("JP-TOKYO"), "JP-TOKYO", "JP"),
            Want::Invalid("event.birth.registration.country"),
        ),
        (
            "a birth abroad that keeps the person's ID",
            consular(),
            kept_id(registered_at(birth("JP-TOKYO"), "JP-TOKYO", "JP")),
            Want::Ok,
        ),
    ];
    for (what, who, e, want) in rows {
        match (&want, validate(Some(&e), &who)) {
            (Want::Ok, Ok(t)) => assert_eq!(t, CIVIL_STATUS, "{what}"),
            (Want::Invalid(field), Err(Refusal::Invalid(v))) => {
                assert!(v.iter().any(|f| f.field == *field), "{what}: {v:?}")
            }
            (Want::NotAllowed(words), Err(Refusal::NotAllowed(why))) => {
                assert!(why.contains(words), "{what}: {why}")
            }
            (_, got) => panic!("{what}: wanted {want:?}, got {got:?}"),
        }
    }
}

fn social_insurance() -> Principal {
    Principal {
        agency: "social-insurance".parse().unwrap(),
        role: Role::SocialInsurance,
        ..population()
    }
}

/// The linked procedures' answers: each an answer (in_reply_to), its fields checked, on its
/// own topic, published by its own side only.
#[test]
fn the_linked_procedures_answers_are_checked() {
    use crate::pb::v1::{
        FuneralAllowanceDecided, HealthInsuranceCardIssued, PermanentResidenceDeleted,
        PermanentResidenceRegistered, Residence,
    };
    let answer = |p: Payload| Event {
        in_reply_to: "0190a1b2c3d4e5f6a7b8c9d0e1f2a3b4".into(),
        ..event(p)
    };
    let registered = |province: &str, date: &str| {
        answer(Payload::PermanentResidenceRegistered(
            PermanentResidenceRegistered {
                personal_id: "031326000001".into(),
                residence: Some(Residence {
                    province_code: province.into(),
                    address: "12 Trần Nguyên Hãn".into(),
                }),
                effective_date: date.into(),
            },
        ))
    };
    let card = |id: &str, number: &str, from: &str, until: &str| {
        answer(Payload::HealthInsuranceCardIssued(
            HealthInsuranceCardIssued {
                personal_id: id.into(),
                card_number: number.into(),
                valid_from: from.into(),
                valid_until: until.into(),
            },
        ))
    };
    let funeral = |number: &str| {
        answer(Payload::FuneralAllowanceDecided(FuneralAllowanceDecided {
            personal_id: "031095000001".into(),
            decision_number: number.into(),
            decided_on: "2026-03-03".into(),
            granted: true,
        }))
    };
    let unanswered = |mut e: Event| {
        e.in_reply_to.clear();
        e
    };
    let deleted = answer(Payload::PermanentResidenceDeleted(
        PermanentResidenceDeleted {
            personal_id: "031095000001".into(),
            effective_date: "2026-03-03".into(),
        },
    ));
    // (who, event, Ok(topic) or Err(the field refused; "" for not allowed))
    let rows: Vec<(Principal, Event, Result<&str, &str>)> = vec![
        (
            population(),
            registered("031", "2026-03-03"),
            Ok(POPULATION),
        ),
        (
            population(),
            registered("030", "2026-03-03"),
            Err("event.permanent_residence_registered.residence.province_code"),
        ),
        (
            population(),
            registered("031", "2099-01-01"),
            Err("event.permanent_residence_registered.effective_date"),
        ),
        (
            population(),
            unanswered(registered("031", "2026-03-03")),
            Err("event.in_reply_to"),
        ),
        (population(), deleted.clone(), Ok(POPULATION)),
        (
            population(),
            unanswered(deleted.clone()),
            Err("event.in_reply_to"),
        ),
        (
            social_insurance(),
            card("", "TE1313126000001", "2026-03-02", "2032-02-26"),
            Ok(SOCIAL_INSURANCE),
        ),
        (
            social_insurance(),
            card(
                "031326000001",
                "TE1313126000001",
                "2026-03-02",
                "2032-02-26",
            ),
            Ok(SOCIAL_INSURANCE),
        ),
        (
            social_insurance(),
            card("0313", "TE1313126000001", "2026-03-02", "2032-02-26"),
            Err("event.health_insurance_card_issued.personal_id"),
        ),
        (
            social_insurance(),
            card("", "te-1", "2026-03-02", "2032-02-26"),
            Err("event.health_insurance_card_issued.card_number"),
        ),
        (
            social_insurance(),
            card("", "TE1313126000001", "2026-03-02", "2026-03-01"),
            Err("event.health_insurance_card_issued.valid_until"),
        ),
        (
            social_insurance(),
            funeral("12/QĐ-BHXH"),
            Ok(SOCIAL_INSURANCE),
        ),
        (
            social_insurance(),
            funeral(""),
            Err("event.funeral_allowance_decided.decision_number"),
        ),
        (
            social_insurance(),
            unanswered(funeral("12/QĐ-BHXH")),
            Err("event.in_reply_to"),
        ),
        // Each side publishes its own topic only.
        (population(), funeral("12/QĐ-BHXH"), Err("")),
        (social_insurance(), deleted, Err("")),
        (
            registry(),
            card("", "TE1313126000001", "2026-03-02", "2032-02-26"),
            Err(""),
        ),
    ];
    for (i, (who, e, want)) in rows.into_iter().enumerate() {
        let got = validate(Some(&e), &who);
        match (want, got) {
            (Ok(topic), Ok(t)) => assert_eq!(t, topic, "row {i}"),
            (Err(""), Err(Refusal::NotAllowed(_))) => {}
            (Err(field), Err(Refusal::Invalid(v))) if !field.is_empty() => {
                assert!(v.iter().any(|f| f.field == field), "row {i}: {v:?}")
            }
            (want, got) => panic!("row {i}: wanted {want:?}, got {got:?}"),
        }
    }
}

/// An answer of a linked procedure does not say it happened before its request.
#[test]
fn a_linked_answer_is_not_dated_before_its_request() {
    use crate::pb::v1::{
        Death, FuneralAllowanceDecided, HealthInsuranceCardIssued, PermanentResidenceDeleted,
        PermanentResidenceRegistered,
    };
    let birth = Payload::Birth(Birth {
        date_of_birth: "2026-12-01".into(),
        ..Default::default()
    });
    let death = Payload::Death(Death {
        date_of_death: "2026-12-05".into(),
        ..Default::default()
    });
    let card = |from: &str| {
        Payload::HealthInsuranceCardIssued(HealthInsuranceCardIssued {
            valid_from: from.into(),
            ..Default::default()
        })
    };
    let funeral = |on: &str| {
        Payload::FuneralAllowanceDecided(FuneralAllowanceDecided {
            decided_on: on.into(),
            ..Default::default()
        })
    };
    let registered = |on: &str| {
        Payload::PermanentResidenceRegistered(PermanentResidenceRegistered {
            effective_date: on.into(),
            ..Default::default()
        })
    };
    let deleted = |on: &str| {
        Payload::PermanentResidenceDeleted(PermanentResidenceDeleted {
            effective_date: on.into(),
            ..Default::default()
        })
    };
    // (answer, request, the field refused or None)
    let rows = [
        (
            card("1901-01-01"),
            &birth,
            Some("event.health_insurance_card_issued.valid_from"),
        ),
        (card("2026-12-01"), &birth, None),
        (
            registered("2026-11-30"),
            &birth,
            Some("event.permanent_residence_registered.effective_date"),
        ),
        (registered("2026-12-02"), &birth, None),
        (
            funeral("2026-01-01"),
            &death,
            Some("event.funeral_allowance_decided.decided_on"),
        ),
        (funeral("2026-12-05"), &death, None),
        (
            deleted("2026-12-04"),
            &death,
            Some("event.permanent_residence_deleted.effective_date"),
        ),
        (deleted("2026-12-06"), &death, None),
        // Another pairing is for the kind check, not this one.
        (funeral("2026-01-01"), &birth, None),
    ];
    for (i, (answer, asked, want)) in rows.iter().enumerate() {
        let got = answer_before_request(answer, asked).map(|v| v.field);
        assert_eq!(got.as_deref(), *want, "row {i}");
    }
}

/// The paths of free-text fields, as violations name them (rendered only then).
#[test]
fn text_fields_are_named_by_their_paths() {
    use super::TextField;
    for (f, want) in [
        (TextField::of("", "", "in_reply_to"), "event.in_reply_to"),
        (
            TextField::of("birth", "", "place_of_birth"),
            "event.birth.place_of_birth",
        ),
        (
            TextField::of("birth", "father.", "residence"),
            "event.birth.father.residence",
        ),
        (
            TextField::of("death", "registration.", "book_number"),
            "event.death.registration.book_number",
        ),
        (
            TextField::of("residence_changed", "new_residence.", "address"),
            "event.residence_changed.new_residence.address",
        ),
    ] {
        assert_eq!(f.to_string(), want);
    }
    let mut e = birth("HP-LECHAN");
    if let Some(Payload::Birth(b)) = &mut e.payload {
        if let Some(m) = &mut b.father {
            m.residence = "Hải\nPhòng".into();
        }
        if let Some(r) = &mut b.registration {
            r.book_number = "x".repeat(MAX_TEXT_BYTES + 1);
        }
    }
    let Err(Refusal::Invalid(v)) = validate(Some(&e), &registry()) else {
        panic!()
    };
    let fields: Vec<&str> = v.iter().map(|f| f.field.as_str()).collect();
    assert!(
        fields.contains(&"event.birth.father.residence"),
        "{fields:?}"
    );
    assert!(
        fields.contains(&"event.birth.registration.book_number"),
        "{fields:?}"
    );
}
