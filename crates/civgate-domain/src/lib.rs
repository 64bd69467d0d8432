//! Validated identifiers used across the gateway. Each is built once, at the edge (config
//! file, client certificate, request), and code inside never sees an unchecked string.

pub mod country;
pub mod ethnicity;
pub mod names;
pub mod personal_id;
pub mod record;
pub mod residence;

use std::{fmt, str::FromStr};

use serde::Deserialize;

pub use country::{CountryCode, CountryCodeError};
pub use names::{FullName, NameError, fold};

/// The exchange's topics.
pub mod topics {
    /// Civil-status events: produced by civil registries, consumed by the population database.
    pub const CIVIL_STATUS: &str = "civil-status";
    /// Population events: produced by the population database, consumed by civil registries.
    pub const POPULATION: &str = "population";
    /// Social-insurance events (a health-insurance card issued, a funeral allowance decided):
    /// produced by the social-insurance agency, consumed by civil registries (answers to their
    /// requests).
    pub const SOCIAL_INSURANCE: &str = "social-insurance";
}
pub use personal_id::{PersonalId, PersonalIdError, ProvinceCode};

/// Sex as recorded in the population database (and encoded in digit 4 of a personal ID).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Sex {
    Male,
    Female,
}

impl fmt::Display for Sex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Sex::Male => "male",
            Sex::Female => "female",
        })
    }
}

/// A calendar date in `YYYY-MM-DD`, not in the future when `not_future` is set.
pub fn parse_date(s: &str) -> Result<time::Date, String> {
    let fmt = time::macros::format_description!("[year]-[month]-[day]");
    let b = s.as_bytes();
    // Exactly YYYY-MM-DD: no sign, no fifth year digit (which `[year]` would take).
    let shaped = b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
    let d = shaped
        .then(|| time::Date::parse(s, &fmt).ok())
        .flatten()
        .ok_or_else(|| format!("{s:?} is not a date in YYYY-MM-DD form"))?;
    if d.year() < 1900 {
        return Err(format!(
            "{s:?} is before 1900: civil-status and population records start in 1900"
        ));
    }
    Ok(d)
}

/// Vietnam's offset from UTC (Indochina Time, no daylight saving): civil dates — of birth,
/// death, marriage, registration — are dates in Vietnam.
pub const VIETNAM: time::UtcOffset = time::macros::offset!(+7);

/// Today's date in Vietnam (between 00:00 and 07:00 there, UTC still says yesterday).
pub fn today() -> time::Date {
    today_at(time::OffsetDateTime::now_utc())
}

/// The date in Vietnam at the instant `t`.
pub fn today_at(t: time::OffsetDateTime) -> time::Date {
    t.to_offset(VIETNAM).date()
}

/// The rows of one of the domain's data tables (`*.tsv`): lines that are neither comments
/// (`#`) nor blank, split at tabs, each field trimmed.
pub(crate) fn tsv_rows(text: &'static str) -> impl Iterator<Item = Vec<&'static str>> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split('\t').map(str::trim).collect())
}

/// A comma-separated field of a data table.
pub(crate) fn tsv_list(field: &str) -> Vec<String> {
    field
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A case reference as requests and events carry it (the dossier code of the national
/// public-service portal, mã hồ sơ): empty (none), or 1-64 of A-Z a-z 0-9 . - _ /.
pub fn check_case_reference(s: &str) -> Result<(), String> {
    if s.len() > 64
        || !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'/'))
    {
        return Err("at most 64 of A-Z a-z 0-9 . - _ / (the portal's dossier code)".into());
    }
    // "." or "/" names no case: a code has letters or digits.
    if !s.is_empty() && !s.bytes().any(|b| b.is_ascii_alphanumeric()) {
        return Err("names no case: a dossier code has letters or digits".into());
    }
    Ok(())
}

/// Formats a date as `YYYY-MM-DD`.
pub fn format_date(d: time::Date) -> String {
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// An agency's identifier, as carried in its certificate's URI SAN
/// `urn:civgate:agency:<id>` and used as the key of `[agencies.<id>]` in the config.
///
/// 1–64 characters of lowercase ASCII letters, digits and `-`, not starting or ending with `-`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct AgencyId(String);

/// The URI SAN prefix that names an agency in a client certificate.
pub(crate) const AGENCY_URI_PREFIX: &str = "urn:civgate:agency:";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid agency id {0:?}: expected 1-64 characters of a-z, 0-9 and '-', not starting or ending with '-'"
)]
pub struct InvalidAgencyId(pub String);

impl AgencyId {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The agency named by a certificate URI SAN, if the URI is `urn:civgate:agency:<id>`.
    pub fn from_uri(uri: &str) -> Option<Result<Self, InvalidAgencyId>> {
        uri.strip_prefix(AGENCY_URI_PREFIX).map(Self::from_str)
    }

    pub fn to_uri(&self) -> String {
        format!("{AGENCY_URI_PREFIX}{}", self.0)
    }
}

impl FromStr for AgencyId {
    type Err = InvalidAgencyId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && !s.starts_with('-')
            && !s.ends_with('-')
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidAgencyId(s.to_owned()))
        }
    }
}

impl TryFrom<String> for AgencyId {
    type Error = InvalidAgencyId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl fmt::Display for AgencyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What an agency is, which decides the methods it may call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A civil-status registry system (hệ thống đăng ký hộ tịch), Ministry of Justice.
    CivilRegistry,
    /// The National Population Database (CSDLQG về dân cư), Ministry of Public Security.
    PopulationDb,
    /// An inspector or data-protection officer (thanh tra) reading the audit log.
    Auditor,
    /// The social-insurance agency (Bảo hiểm xã hội Việt Nam): answers the linked procedures'
    /// requests addressed to it (a child's health-insurance card, a funeral allowance).
    SocialInsurance,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::CivilRegistry => "civil_registry",
            Role::PopulationDb => "population_db",
            Role::Auditor => "auditor",
            Role::SocialInsurance => "social_insurance",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A civil-status registry office code (mã cơ quan đăng ký hộ tịch): 1–32 characters of
/// uppercase ASCII letters, digits and `-`. The exact national format is not fixed here;
/// the config lists which codes each civil registry may publish for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct RegistryOfficeCode(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid registry office code {0:?}: expected 1-32 characters of A-Z, 0-9 and '-'")]
pub struct InvalidRegistryOfficeCode(pub String);

impl RegistryOfficeCode {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for RegistryOfficeCode {
    type Err = InvalidRegistryOfficeCode;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = !s.is_empty()
            && s.len() <= 32
            && s.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidRegistryOfficeCode(s.to_owned()))
        }
    }
}

impl TryFrom<String> for RegistryOfficeCode {
    type Error = InvalidRegistryOfficeCode;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// SHA-256 of the client certificate's DER encoding.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CertFingerprint(pub [u8; 32]);

impl CertFingerprint {
    pub fn of_der(der: &[u8]) -> Self {
        use sha2::{Digest, Sha256};
        Self(Sha256::digest(der).into())
    }

    /// Lower-case hex, written into one buffer (every audit record carries it; `hex::encode`
    /// collects it character by character).
    pub fn to_hex(&self) -> String {
        let mut buf = [0u8; 64];
        match hex::encode_to_slice(self.0, &mut buf) {
            Ok(()) => String::from_utf8_lossy(&buf).into_owned(),
            Err(_) => hex::encode(self.0),
        }
    }
}

impl fmt::Display for CertFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for CertFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CertFingerprint({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_references_are_short_codes() {
        for ok in [
            "",
            "G22.99-240101-0001",
            "000.00.01.H31-260101-0042",
            "HS/2026/7",
        ] {
            assert!(check_case_reference(ok).is_ok(), "{ok}");
        }
        for bad in ["a b", "mã-hồ-sơ", "x\n", &"9".repeat(65), ".", "/-_."] {
            assert!(check_case_reference(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn dates_are_exactly_yyyy_mm_dd_from_1900() {
        for ok in ["1900-01-01", "2026-02-28", "2024-02-29"] {
            assert!(parse_date(ok).is_ok(), "{ok}");
        }
        for bad in [
            "-2026-12-01",
            "+2026-12-01",
            "1899-12-31",
            "1800-01-01",
            "12026-01-01",
            "2026-1-01",
            "2026-02-30",
            " 2026-01-01",
            "2026/01/01",
            "",
        ] {
            assert!(parse_date(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn civil_dates_are_vietnam_dates() {
        use time::macros::{date, datetime};
        // 00:00-07:00 in Vietnam is still the day before in UTC.
        for (utc, vietnam) in [
            (datetime!(2026-12-06 16:59:59 UTC), date!(2026 - 12 - 06)),
            (datetime!(2026-12-06 17:00:00 UTC), date!(2026 - 12 - 07)),
            (datetime!(2026-12-07 06:59:59 UTC), date!(2026 - 12 - 07)),
            (datetime!(2026-12-31 17:00:00 UTC), date!(2027 - 01 - 01)),
        ] {
            assert_eq!(today_at(utc), vietnam, "{utc}");
        }
    }

    #[test]
    fn fingerprint_hex_is_lower_case_and_matches_hex_encode() {
        let f = CertFingerprint::of_der(b"certificate");
        assert_eq!(f.to_hex(), hex::encode(f.0));
        assert_eq!(f.to_string().len(), 64);
        assert_eq!(CertFingerprint([0xab; 32]).to_hex(), "ab".repeat(32));
    }

    #[test]
    fn agency_id_accepts_lowercase_digits_dashes() {
        assert!("registry-hp".parse::<AgencyId>().is_ok());
        assert!("a".parse::<AgencyId>().is_ok());
        assert!("moj-031-lechan".parse::<AgencyId>().is_ok());
    }

    #[test]
    fn agency_id_refuses_everything_else() {
        for bad in [
            "",
            "-a",
            "a-",
            "Registry",
            "a b",
            "a_b",
            "ả",
            &"a".repeat(65),
        ] {
            assert!(bad.parse::<AgencyId>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn agency_id_from_uri_requires_the_prefix() {
        assert_eq!(
            AgencyId::from_uri("urn:civgate:agency:population"),
            Some(Ok(AgencyId("population".into())))
        );
        assert_eq!(AgencyId::from_uri("https://example.org"), None);
        assert!(matches!(
            AgencyId::from_uri("urn:civgate:agency:BAD"),
            Some(Err(_))
        ));
    }

    #[test]
    fn registry_office_code_validation() {
        assert!("HP-LECHAN".parse::<RegistryOfficeCode>().is_ok());
        assert!("hp".parse::<RegistryOfficeCode>().is_err());
        assert!("".parse::<RegistryOfficeCode>().is_err());
    }
}

/// A purpose code (legal basis) declared by every read, e.g. `BIRTH_REGISTRATION`:
/// 1–64 characters of A-Z, 0-9 and `_`. Which codes exist is decided by the config.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct PurposeCode(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid purpose code {0:?}: expected 1-64 characters of A-Z, 0-9 and '_'")]
pub struct InvalidPurposeCode(pub String);

impl PurposeCode {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for PurposeCode {
    type Err = InvalidPurposeCode;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidPurposeCode(s.to_owned()))
        }
    }
}

impl TryFrom<String> for PurposeCode {
    type Error = InvalidPurposeCode;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// A field of `civgate.v1.Citizen` that a purpose may release (data minimisation).
/// Names match the proto field names (`snake_case`).
/// `personal_id` is always returned: it is what the caller asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CitizenField {
    FullName,
    DateOfBirth,
    Sex,
    MaritalStatus,
    PlaceOfBirth,
    Hometown,
    Ethnicity,
    Religion,
    Nationality,
    BloodType,
    FatherPersonalId,
    MotherPersonalId,
    SpousePersonalIds,
    PermanentResidence,
    CurrentResidence,
    DateOfDeath,
    /// The year of birth alone, where the full date is more than the purpose needs (a
    /// parent's on a birth record, Law 60/2014 art. 14).
    YearOfBirth,
}

impl CitizenField {
    pub const ALL: [CitizenField; 17] = [
        CitizenField::FullName,
        CitizenField::DateOfBirth,
        CitizenField::Sex,
        CitizenField::MaritalStatus,
        CitizenField::PlaceOfBirth,
        CitizenField::Hometown,
        CitizenField::Ethnicity,
        CitizenField::Religion,
        CitizenField::Nationality,
        CitizenField::BloodType,
        CitizenField::FatherPersonalId,
        CitizenField::MotherPersonalId,
        CitizenField::SpousePersonalIds,
        CitizenField::PermanentResidence,
        CitizenField::CurrentResidence,
        CitizenField::DateOfDeath,
        CitizenField::YearOfBirth,
    ];

    /// The proto field name.
    pub fn name(self) -> &'static str {
        match self {
            CitizenField::FullName => "full_name",
            CitizenField::DateOfBirth => "date_of_birth",
            CitizenField::Sex => "sex",
            CitizenField::MaritalStatus => "marital_status",
            CitizenField::PlaceOfBirth => "place_of_birth",
            CitizenField::Hometown => "hometown",
            CitizenField::Ethnicity => "ethnicity",
            CitizenField::Religion => "religion",
            CitizenField::Nationality => "nationality",
            CitizenField::BloodType => "blood_type",
            CitizenField::FatherPersonalId => "father_personal_id",
            CitizenField::MotherPersonalId => "mother_personal_id",
            CitizenField::SpousePersonalIds => "spouse_personal_ids",
            CitizenField::PermanentResidence => "permanent_residence",
            CitizenField::CurrentResidence => "current_residence",
            CitizenField::DateOfDeath => "date_of_death",
            CitizenField::YearOfBirth => "year_of_birth",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == s)
    }
}
