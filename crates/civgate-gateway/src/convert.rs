//! Between domain records and `civgate.v1.Citizen`, and data minimisation on the wire type.

use std::collections::BTreeSet;

use crate::{
    domain::{
        CitizenField, Sex, format_date,
        record::{CitizenRecord, MaritalStatus},
    },
    pb::v1::{Citizen, MaritalStatus as PbMarital, Residence, Sex as PbSex},
};

pub(crate) fn sex_to_pb(s: Sex) -> PbSex {
    match s {
        Sex::Male => PbSex::Male,
        Sex::Female => PbSex::Female,
    }
}

pub use civgate_exchange::validate::sex_from_pb;

pub fn marital_to_pb(m: MaritalStatus) -> PbMarital {
    match m {
        MaritalStatus::Single => PbMarital::Single,
        MaritalStatus::Married => PbMarital::Married,
        MaritalStatus::Divorced => PbMarital::Divorced,
        MaritalStatus::Widowed => PbMarital::Widowed,
    }
}

/// A full record as the wire type (every field set).
pub fn record_to_pb(r: &CitizenRecord) -> Citizen {
    Citizen {
        personal_id: r.personal_id.to_string(),
        full_name: Some(r.full_name.clone()),
        date_of_birth: Some(format_date(r.date_of_birth)),
        sex: sex_to_pb(r.sex) as i32,
        marital_status: marital_to_pb(r.marital_status) as i32,
        place_of_birth: Some(r.place_of_birth.clone()),
        hometown: Some(r.hometown.clone()),
        ethnicity: Some(r.ethnicity.clone()),
        religion: Some(r.religion.clone()),
        nationality: Some(r.nationality.clone()),
        blood_type: Some(r.blood_type.clone()),
        father_personal_id: r.father.as_ref().map(ToString::to_string),
        mother_personal_id: r.mother.as_ref().map(ToString::to_string),
        spouse_personal_ids: r.spouse.iter().map(ToString::to_string).collect(),
        permanent_residence: Some(Residence {
            province_code: r.permanent_province.clone(),
            address: r.permanent_address.clone(),
        }),
        current_residence: Some(Residence {
            province_code: r.current_province.clone(),
            address: r.current_address.clone(),
        }),
        date_of_death: r.date_of_death.map(format_date),
        year_of_birth: u32::try_from(r.date_of_birth.year()).ok(),
    }
}

/// Clears every field not in `allowed` (personal_id always stays). Returns the names of the
/// fields the record had and that were cleared — never values.
pub fn mask(c: &mut Citizen, allowed: &BTreeSet<CitizenField>) -> Vec<&'static str> {
    let mut withheld = Vec::new();
    for f in CitizenField::ALL {
        if allowed.contains(&f) {
            continue;
        }
        let had = match f {
            CitizenField::FullName => c.full_name.take().is_some(),
            CitizenField::DateOfBirth => c.date_of_birth.take().is_some(),
            CitizenField::Sex => std::mem::take(&mut c.sex) != 0,
            CitizenField::MaritalStatus => std::mem::take(&mut c.marital_status) != 0,
            CitizenField::PlaceOfBirth => c.place_of_birth.take().is_some(),
            CitizenField::Hometown => c.hometown.take().is_some(),
            CitizenField::Ethnicity => c.ethnicity.take().is_some(),
            CitizenField::Religion => c.religion.take().is_some(),
            CitizenField::Nationality => c.nationality.take().is_some(),
            CitizenField::BloodType => c.blood_type.take().is_some(),
            CitizenField::FatherPersonalId => c.father_personal_id.take().is_some(),
            CitizenField::MotherPersonalId => c.mother_personal_id.take().is_some(),
            CitizenField::SpousePersonalIds => {
                !std::mem::take(&mut c.spouse_personal_ids).is_empty()
            }
            CitizenField::PermanentResidence => c.permanent_residence.take().is_some(),
            CitizenField::CurrentResidence => c.current_residence.take().is_some(),
            CitizenField::DateOfDeath => c.date_of_death.take().is_some(),
            CitizenField::YearOfBirth => c.year_of_birth.take().is_some(),
        };
        if had {
            withheld.push(f.name());
        }
    }
    withheld
}

/// The names of the fields set on a citizen (what an audit record lists as returned).
pub fn present_fields(c: &Citizen) -> Vec<&'static str> {
    let mut v = vec!["personal_id"];
    let checks: [(CitizenField, bool); 17] = [
        (CitizenField::FullName, c.full_name.is_some()),
        (CitizenField::DateOfBirth, c.date_of_birth.is_some()),
        (CitizenField::Sex, c.sex != 0),
        (CitizenField::MaritalStatus, c.marital_status != 0),
        (CitizenField::PlaceOfBirth, c.place_of_birth.is_some()),
        (CitizenField::Hometown, c.hometown.is_some()),
        (CitizenField::Ethnicity, c.ethnicity.is_some()),
        (CitizenField::Religion, c.religion.is_some()),
        (CitizenField::Nationality, c.nationality.is_some()),
        (CitizenField::BloodType, c.blood_type.is_some()),
        (
            CitizenField::FatherPersonalId,
            c.father_personal_id.is_some(),
        ),
        (
            CitizenField::MotherPersonalId,
            c.mother_personal_id.is_some(),
        ),
        (
            CitizenField::SpousePersonalIds,
            !c.spouse_personal_ids.is_empty(),
        ),
        (
            CitizenField::PermanentResidence,
            c.permanent_residence.is_some(),
        ),
        (
            CitizenField::CurrentResidence,
            c.current_residence.is_some(),
        ),
        (CitizenField::DateOfDeath, c.date_of_death.is_some()),
        (CitizenField::YearOfBirth, c.year_of_birth.is_some()),
    ];
    v.extend(checks.iter().filter(|(_, set)| *set).map(|(f, _)| f.name()));
    v
}

/// Field names from the wire, ignoring unknown ones.
pub fn fields_from_names(names: &[String]) -> BTreeSet<CitizenField> {
    names
        .iter()
        .filter_map(|n| CitizenField::from_name(n))
        .collect()
}

pub(crate) fn field_names(fields: &BTreeSet<CitizenField>) -> Vec<String> {
    fields.iter().map(|f| f.name().to_owned()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use civgate_dev::synth::Population;

    #[test]
    fn mask_leaves_exactly_the_allowed_fields() {
        let r = Population::new(1, 1).next().unwrap();
        let allowed: BTreeSet<_> = [CitizenField::FullName, CitizenField::MaritalStatus].into();
        let mut c = record_to_pb(&r);
        let withheld = mask(&mut c, &allowed);
        assert_eq!(
            present_fields(&c),
            vec!["personal_id", "full_name", "marital_status"]
        );
        assert!(withheld.contains(&"blood_type") && withheld.contains(&"religion"));
        assert!(!withheld.contains(&"full_name"));
    }

    #[test]
    fn every_field_can_be_masked_and_present_fields_sees_it() {
        let r = Population::new(2, 1).next().unwrap();
        for f in CitizenField::ALL {
            let mut c = record_to_pb(&r);
            let only: BTreeSet<_> = [f].into();
            mask(&mut c, &only);
            let present = present_fields(&c);
            assert!(present.len() <= 2, "{f:?}: {present:?}");
            assert!(
                present
                    .iter()
                    .all(|p| *p == "personal_id" || *p == f.name())
            );
        }
    }
}
