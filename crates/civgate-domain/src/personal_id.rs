//! Số định danh cá nhân: the 12-digit personal identification number (Decree 137/2015 art. 13,
//! Circular 59/2021/TT-BCA art. 4). Digits 1–3: province (or country) of birth registration;
//! digit 4: century and sex; digits 5–6: year of birth mod 100; 7–12: random. No check digit.

use std::{fmt, str::FromStr, sync::OnceLock};

use super::Sex;

#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PersonalId([u8; 12]);

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PersonalIdError {
    #[error("must be exactly 12 digits, got {0} characters")]
    Length(usize),
    #[error("must contain only ASCII digits 0-9")]
    NotDigits,
    #[error("province code {0} is not a known province of birth registration")]
    UnknownProvince(String),
    #[error("digit 4 ({digit}) says {id_sex}, but the sex given is {claimed}")]
    SexMismatch {
        digit: u8,
        id_sex: Sex,
        claimed: Sex,
    },
    #[error("digits 4-6 say born in {id_year_hint}, but the year of birth given is {claimed}")]
    YearMismatch { id_year_hint: String, claimed: i32 },
}

/// One row of the province table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Province {
    pub code: String,
    pub name: String,
    /// Relative share in synthetic populations.
    pub weight: u32,
}

/// The province table, parsed once from `provinces.tsv` (data, not code).
pub fn provinces() -> &'static [Province] {
    static TABLE: OnceLock<Vec<Province>> = OnceLock::new();
    TABLE.get_or_init(|| {
        crate::tsv_rows(include_str!("provinces.tsv"))
            .filter_map(|f| {
                Some(Province {
                    code: (*f.first()?).to_owned(),
                    name: (*f.get(1)?).to_owned(),
                    weight: f.get(2)?.parse().ok()?,
                })
            })
            .collect()
    })
}

pub fn is_known_province(code: &str) -> bool {
    provinces().iter().any(|p| p.code == code)
}

/// A province code of the table (3 digits): a civil registry's jurisdiction, the first digits
/// of a personal ID.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct ProvinceCode(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a known province code (3 digits, e.g. \"031\" for Hải Phòng)")]
pub struct UnknownProvinceCode(pub String);

impl ProvinceCode {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ProvinceCode {
    type Err = UnknownProvinceCode;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if is_known_province(s) {
            Ok(Self(s.to_owned()))
        } else {
            Err(UnknownProvinceCode(s.to_owned()))
        }
    }
}

impl TryFrom<String> for ProvinceCode {
    type Error = UnknownProvinceCode;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl PersonalId {
    /// Syntax and province only (12 digits, known province code).
    pub fn parse(s: &str) -> Result<Self, PersonalIdError> {
        let chars = s.chars().count();
        if chars != 12 {
            return Err(PersonalIdError::Length(chars));
        }
        let b = s.as_bytes();
        if b.len() != 12 || !b.iter().all(u8::is_ascii_digit) {
            return Err(PersonalIdError::NotDigits);
        }
        let code = &s[..3];
        if !is_known_province(code) {
            return Err(PersonalIdError::UnknownProvince(code.to_owned()));
        }
        let mut a = [0u8; 12];
        a.copy_from_slice(b);
        Ok(Self(a))
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII digits are ever stored.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    pub fn province_code(&self) -> &str {
        &self.as_str()[..3]
    }

    fn digit(&self, i: usize) -> u8 {
        self.0[i] - b'0'
    }

    /// Sex encoded by digit 4: even = male, odd = female.
    pub fn sex(&self) -> Sex {
        if self.digit(3).is_multiple_of(2) {
            Sex::Male
        } else {
            Sex::Female
        }
    }

    /// Full year of birth encoded by digits 4–6 (1900 + 100 × (digit4 / 2) + yy).
    pub fn birth_year(&self) -> i32 {
        let century = 1900 + 100 * i32::from(self.digit(3) / 2);
        century + i32::from(self.digit(4)) * 10 + i32::from(self.digit(5))
    }

    /// Checks digit 4 and digits 5–6 against a claimed sex and year of birth, when known.
    pub fn check_consistency(
        &self,
        sex: Option<Sex>,
        birth_year: Option<i32>,
    ) -> Result<(), PersonalIdError> {
        if let Some(claimed) = sex
            && claimed != self.sex()
        {
            return Err(PersonalIdError::SexMismatch {
                digit: self.digit(3),
                id_sex: self.sex(),
                claimed,
            });
        }
        if let Some(claimed) = birth_year
            && claimed != self.birth_year()
        {
            return Err(PersonalIdError::YearMismatch {
                id_year_hint: self.birth_year().to_string(),
                claimed,
            });
        }
        Ok(())
    }

    /// Builds an ID from its parts (synthetic data, newborns). `suffix` < 1,000,000.
    pub fn compose(
        province: &str,
        sex: Sex,
        birth_year: i32,
        suffix: u32,
    ) -> Result<Self, PersonalIdError> {
        if !(1900..2400).contains(&birth_year) {
            return Err(PersonalIdError::YearMismatch {
                id_year_hint: "1900-2399".into(),
                claimed: birth_year,
            });
        }
        let century = (birth_year - 1900) / 100;
        let d4 = century * 2 + i32::from(sex == Sex::Female);
        let s = format!(
            "{province}{d4}{:02}{:06}",
            birth_year % 100,
            suffix % 1_000_000
        );
        Self::parse(&s)
    }
}

impl FromStr for PersonalId {
    type Err = PersonalIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for PersonalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for PersonalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PersonalId({})", self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn province_codes_are_those_of_the_table() {
        assert_eq!("031".parse::<ProvinceCode>().unwrap().as_str(), "031");
        for bad in ["003", "31", "0310", "", "abc"] {
            assert!(bad.parse::<ProvinceCode>().is_err(), "{bad}");
        }
    }

    #[test]
    fn table_has_the_63_provinces() {
        assert_eq!(provinces().len(), 63);
        assert!(is_known_province("031"));
        assert!(!is_known_province("003"));
    }

    #[test]
    fn valid_id_decodes_sex_and_year() {
        let id = PersonalId::parse("031203000123").unwrap();
        assert_eq!(id.province_code(), "031");
        assert_eq!(id.sex(), Sex::Male);
        assert_eq!(id.birth_year(), 2003);
        let id = PersonalId::parse("001185000001").unwrap();
        assert_eq!((id.sex(), id.birth_year()), (Sex::Female, 1985));
    }

    #[test]
    fn each_malformed_class_is_named() {
        assert_eq!(
            PersonalId::parse("03120300012"),
            Err(PersonalIdError::Length(11))
        );
        assert_eq!(
            PersonalId::parse("0312030001234"),
            Err(PersonalIdError::Length(13))
        );
        assert_eq!(
            PersonalId::parse("03120300012a"),
            Err(PersonalIdError::NotDigits)
        );
        assert_eq!(
            PersonalId::parse("003203000123"),
            Err(PersonalIdError::UnknownProvince("003".into()))
        );
        let id = PersonalId::parse("031203000123").unwrap();
        assert!(matches!(
            id.check_consistency(Some(Sex::Female), None),
            Err(PersonalIdError::SexMismatch { .. })
        ));
        assert!(matches!(
            id.check_consistency(None, Some(1903)),
            Err(PersonalIdError::YearMismatch { .. })
        ));
        assert!(id.check_consistency(Some(Sex::Male), Some(2003)).is_ok());
    }

    #[test]
    fn fullwidth_digits_are_not_digits() {
        // 12 characters but 36 bytes: refused, never panics on slicing.
        assert_eq!(
            PersonalId::parse("０３１２０３０００１２３"),
            Err(PersonalIdError::NotDigits)
        );
    }

    proptest! {
        #[test]
        fn compose_then_parse_round_trips(
            p in 0usize..63, female in any::<bool>(), year in 1900i32..2400, suffix in 0u32..1_000_000
        ) {
            let province = provinces()[p].code.clone();
            let sex = if female { Sex::Female } else { Sex::Male };
            let id = PersonalId::compose(&province, sex, year, suffix).unwrap();
            prop_assert_eq!(id.sex(), sex);
            prop_assert_eq!(id.birth_year(), year);
            prop_assert_eq!(id.province_code(), province.as_str());
            prop_assert!(id.check_consistency(Some(sex), Some(year)).is_ok());
            prop_assert_eq!(PersonalId::parse(id.as_str()).unwrap(), id);
        }

        #[test]
        fn arbitrary_strings_never_panic(s in ".{0,40}") {
            let _ = PersonalId::parse(&s);
        }

        #[test]
        fn anything_accepted_is_12_digits_with_a_known_province(s in "[0-9]{12}") {
            match PersonalId::parse(&s) {
                Ok(id) => prop_assert!(is_known_province(id.province_code())),
                Err(e) => prop_assert!(matches!(e, PersonalIdError::UnknownProvince(_)), "{:?}", e),
            }
        }
    }
}
