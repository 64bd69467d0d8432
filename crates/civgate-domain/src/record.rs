//! A citizen as the population directory holds it: what look-ups are answered from, masked
//! to the declared purpose's fields.

use time::Date;

use crate::{PersonalId, Sex};

/// Tình trạng hôn nhân.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaritalStatus {
    Single,
    Married,
    Divorced,
    Widowed,
}

/// One citizen as the population directory stores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CitizenRecord {
    pub personal_id: PersonalId,
    pub full_name: String,
    pub date_of_birth: Date,
    pub sex: Sex,
    pub marital_status: MaritalStatus,
    pub place_of_birth: String,
    pub hometown: String,
    pub ethnicity: String,
    pub religion: String,
    pub nationality: String,
    pub blood_type: String,
    pub father: Option<PersonalId>,
    pub mother: Option<PersonalId>,
    pub spouse: Option<PersonalId>,
    pub permanent_province: String,
    pub permanent_address: String,
    pub current_province: String,
    pub current_address: String,
    pub date_of_death: Option<Date>,
}
