//! Where people live: the 34 provinces since 1 July 2025 (`provinces_2025.tsv`, data), and
//! which of them each pre-2025 province (the codes personal IDs keep) became part of.

use std::sync::OnceLock;

/// A province since 1 July 2025.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CurrentProvince {
    /// Three digits, the form the contract uses for province codes.
    pub code: String,
    pub name: String,
    /// The pre-2025 provinces it was formed from (codes of `provinces.tsv`).
    pub former: Vec<String>,
}

/// The 34 provinces, parsed once.
pub fn current_provinces() -> &'static [CurrentProvince] {
    static TABLE: OnceLock<Vec<CurrentProvince>> = OnceLock::new();
    TABLE.get_or_init(|| {
        crate::tsv_rows(include_str!("provinces_2025.tsv"))
            .filter_map(|f| {
                Some(CurrentProvince {
                    code: (*f.first()?).to_owned(),
                    name: (*f.get(1)?).to_owned(),
                    former: crate::tsv_list(f.get(2)?),
                })
            })
            .collect()
    })
}

/// The province `code` names, if it is one of today's.
pub fn current_province(code: &str) -> Option<&'static CurrentProvince> {
    current_provinces().iter().find(|p| p.code == code)
}

/// The province today that a pre-2025 province (an ID's code) is part of.
pub fn successor_of(old_code: &str) -> Option<&'static CurrentProvince> {
    current_provinces()
        .iter()
        .find(|p| p.former.iter().any(|c| c == old_code))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::personal_id::provinces;

    #[test]
    fn every_pre_2025_province_is_part_of_exactly_one_of_the_34() {
        assert_eq!(current_provinces().len(), 34);
        for old in provinces() {
            let into: Vec<_> = current_provinces()
                .iter()
                .filter(|p| p.former.contains(&old.code))
                .collect();
            assert_eq!(into.len(), 1, "{} {}", old.code, old.name);
        }
        let formers: usize = current_provinces().iter().map(|p| p.former.len()).sum();
        assert_eq!(formers, provinces().len());
        // Each keeps the code of one of the provinces it was formed from.
        for p in current_provinces() {
            assert!(p.former.contains(&p.code), "{}", p.name);
        }
    }

    #[test]
    fn an_old_code_leads_to_its_province_today() {
        assert_eq!(successor_of("030").map(|p| p.code.as_str()), Some("031"));
        assert_eq!(successor_of("031").map(|p| p.code.as_str()), Some("031"));
        assert_eq!(
            successor_of("002").map(|p| p.name.as_str()),
            Some("Tuyên Quang")
        );
        assert!(current_province("030").is_none());
        assert!(current_province("001").is_some());
    }
}
