//! Countries where a Vietnamese representative mission registers civil status (Law 60/2014
//! art. 3(3)): ISO 3166-1 alpha-2 codes, from the `isocountry` crate's table of the standard.

use std::str::FromStr;

/// An ISO 3166-1 alpha-2 code of a country other than Việt Nam (`JP`, `KR`, `DE`): where a
/// representative mission (cơ quan đại diện) registered an event.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct CountryCode(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CountryCodeError {
    #[error("{0:?} is not an ISO 3166-1 alpha-2 country code (two capital letters, e.g. \"JP\")")]
    Unknown(String),
    #[error("\"VN\" is Việt Nam: a registration in Việt Nam names no country (leave it empty)")]
    VietNam,
}

impl CountryCode {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The country's English short name in ISO 3166-1.
    pub fn name(&self) -> &'static str {
        isocountry::CountryCode::for_alpha2(&self.0).map_or("", |c| c.name())
    }
}

impl FromStr for CountryCode {
    type Err = CountryCodeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let shaped = s.len() == 2 && s.bytes().all(|b| b.is_ascii_uppercase());
        if !shaped || isocountry::CountryCode::for_alpha2(s).is_err() {
            return Err(CountryCodeError::Unknown(s.to_owned()));
        }
        if s == "VN" {
            return Err(CountryCodeError::VietNam);
        }
        Ok(Self(s.to_owned()))
    }
}

impl TryFrom<String> for CountryCode {
    type Error = CountryCodeError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl std::fmt::Display for CountryCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_assigned_codes_of_other_countries() {
        for (s, ok) in [
            ("JP", true),
            ("KR", true),
            ("DE", true),
            ("VN", false),
            ("jp", false),
            ("XX", false),
            ("JPN", false),
            ("", false),
            ("J", false),
        ] {
            assert_eq!(s.parse::<CountryCode>().is_ok(), ok, "{s}");
        }
        assert_eq!("VN".parse::<CountryCode>(), Err(CountryCodeError::VietNam));
        assert_eq!("JP".parse::<CountryCode>().unwrap().name(), "Japan");
    }
}
