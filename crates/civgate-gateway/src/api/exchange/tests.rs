//! Unit tests of `exchange`.

use super::*;
use crate::pb::v1::{DeathRecorded, Event, Marriage, PersonalIdReissued, event::Payload};

fn delivered(sequence: u64, payload: Option<Payload>) -> SubscribedEvent {
    SubscribedEvent {
        sequence,
        event: payload.map(|p| Event {
            case_reference: String::new(),
            occurred_at_unix_ms: 0,
            in_reply_to: String::new(),
            payload: Some(p),
        }),
        ..Default::default()
    }
}

#[test]
fn a_delivery_record_names_each_citizen_once_and_the_event_types() {
    let batch = [
        delivered(
            7,
            Some(Payload::DeathRecorded(DeathRecorded {
                personal_id: "031095000001".into(),
                ..Default::default()
            })),
        ),
        delivered(
            8,
            Some(Payload::PersonalIdReissued(PersonalIdReissued {
                old_personal_id: "031095000001".into(),
                new_personal_id: "001195000123".into(),
                ..Default::default()
            })),
        ),
        // Does not decode: delivered as is, adds nothing to the record.
        delivered(9, None),
        delivered(
            10,
            Some(Payload::Marriage(Marriage {
                spouse1_personal_id: "not an id".into(),
                spouse2_personal_id: "031195000002".into(),
                ..Default::default()
            })),
        ),
    ];
    let facts = delivery_facts(&batch);
    assert_eq!(
        facts.subjects,
        ["001195000123", "031095000001", "031195000002"]
    );
    assert_eq!(
        facts.fields,
        [
            "event:death_recorded",
            "event:marriage",
            "event:personal_id_reissued"
        ]
    );
    assert!(facts.purpose.is_empty() && facts.recorded.is_none());
    assert_eq!(
        delivery_detail("population", "civil-registry-hp", &batch),
        "delivered:population:civil-registry-hp:7-10"
    );
    assert_eq!(delivery_facts(&[]), Facts::default());
}

/// The ID a `personal_id_assigned` answers a birth with: a newborn's fits the birth's province,
/// sex and year; a re-registration's is the ID the birth named, whatever its province.
#[test]
fn an_assigned_id_fits_the_birth_it_answers() {
    use crate::pb::v1::{Birth, Sex};
    let newborn = Birth {
        sex: Sex::Female as i32,
        date_of_birth: "2026-02-27".into(),
        birth_registration_province_code: "031".into(),
        ..Default::default()
    };
    let again = Birth {
        personal_id: Some("001195000006".into()),
        ..newborn.clone()
    };
    for (birth, id, fits) in [
        (&newborn, "031326000001", true),
        (&newborn, "001326000001", false), // another province
        (&newborn, "031226000001", false), // male
        (&newborn, "031325000001", false), // born 2025
        (&again, "001195000006", true),    // the ID the person has, of Hà Nội
        (&again, "031326000001", false),   // a second ID for the same person
    ] {
        assert_eq!(id_fits_birth(id, birth).is_none(), fits, "{id}");
    }
}

#[test]
fn a_re_issued_number_fits_the_change_it_answers() {
    use crate::pb::v1::CivilStatusChange;
    let change = |field: &str, new: &str| CivilStatusChange {
        personal_id: "031195000002".into(),
        field: field.into(),
        old_value: String::new(),
        new_value: new.into(),
        ..Default::default()
    };
    let reissued = |old: &str, new: &str| PersonalIdReissued {
        old_personal_id: old.into(),
        new_personal_id: new.into(),
        reason: String::new(),
    };
    // (change, answer, the field refused or None)
    let rows = [
        (
            change("sex", "male"),
            reissued("031195000002", "031095000777"),
            None,
        ),
        (
            change("sex", "male"),
            reissued("031195000002", "031195000777"),
            Some("event.personal_id_reissued.new_personal_id"),
        ),
        (
            change("sex", "male"),
            reissued("031195000003", "031095000777"),
            Some("event.personal_id_reissued.old_personal_id"),
        ),
        (
            change("date_of_birth", "1996-04-01"),
            reissued("031195000002", "031196000777"),
            None,
        ),
        (
            change("date_of_birth", "1996-04-01"),
            reissued("031195000002", "031195000777"),
            Some("event.personal_id_reissued.new_personal_id"),
        ),
        (
            change("full_name", "Trần Thị B"),
            reissued("031195000002", "031195000777"),
            Some("event.in_reply_to"),
        ),
        // Another province.
        (
            change("sex", "male"),
            reissued("031195000002", "001095000777"),
            Some("event.personal_id_reissued.new_personal_id"),
        ),
        // A date of birth corrected within the year: the number stays.
        (
            change("date_of_birth", "1995-04-01"),
            reissued("031195000002", "031195000777"),
            Some("event.in_reply_to"),
        ),
    ];
    for (i, (c, r, want)) in rows.iter().enumerate() {
        assert_eq!(id_fits_change(r, c).map(|(f, _)| f), *want, "row {i}");
    }
}
