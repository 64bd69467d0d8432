//! The 54 ethnic groups of the national code list (`ethnicities.tsv`, data): a birth record's
//! ethnicity is one of them (by its code or a spelling of its name) when the child is a
//! Vietnamese citizen.

use std::sync::OnceLock;

use crate::names::fold;

/// One group of the list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EthnicGroup {
    /// Two digits, `01` (Kinh) to `54` (Rơ Măm).
    pub code: String,
    pub name: String,
    /// Other spellings in use (with or without hyphens, older names).
    pub aliases: Vec<String>,
}

/// The list, parsed once.
pub fn ethnic_groups() -> &'static [EthnicGroup] {
    static TABLE: OnceLock<Vec<EthnicGroup>> = OnceLock::new();
    TABLE.get_or_init(|| {
        crate::tsv_rows(include_str!("ethnicities.tsv"))
            .filter_map(|f| {
                Some(EthnicGroup {
                    code: (*f.first()?).to_owned(),
                    name: (*f.get(1)?).to_owned(),
                    aliases: crate::tsv_list(f.get(2).copied().unwrap_or("")),
                })
            })
            .collect()
    })
}

/// How names are compared: accent- and case-insensitive, hyphens, spaces and apostrophes
/// ignored (`Ê-đê`, `Ê Đê`, `ede`).
fn key(s: &str) -> String {
    fold(s).chars().filter(|c| c.is_alphanumeric()).collect()
}

/// The group `s` names: its two-digit code, its name or another spelling of it.
pub fn ethnic_group(s: &str) -> Option<&'static EthnicGroup> {
    let s = s.trim();
    if s.len() == 2 && s.bytes().all(|b| b.is_ascii_digit()) {
        return ethnic_groups().iter().find(|g| g.code == s);
    }
    let k = key(s);
    if k.is_empty() {
        return None;
    }
    ethnic_groups()
        .iter()
        .find(|g| key(&g.name) == k || g.aliases.iter().any(|a| key(a) == k))
}

/// Whether a nationality as written names Viet Nam: `Việt Nam`, `Vietnam`, `Vietnamese`, the
/// state's full name (`Cộng hòa xã hội chủ nghĩa Việt Nam`), `VN`, `VNM` or `704` (ISO 3166).
pub fn is_vietnamese(nationality: &str) -> bool {
    let k = key(nationality);
    matches!(k.as_str(), "vn" | "vnm" | "704" | "vietnamese") || k.ends_with("vietnam")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_has_54_groups_each_spelling_naming_one() {
        let groups = ethnic_groups();
        assert_eq!(groups.len(), 54);
        for (i, g) in groups.iter().enumerate() {
            assert_eq!(g.code, format!("{:02}", i + 1));
        }
        let mut seen = std::collections::HashMap::new();
        for g in groups {
            for s in std::iter::once(&g.name).chain(&g.aliases) {
                if let Some(other) = seen.insert(key(s), &g.code) {
                    assert_eq!(other, &g.code, "{s:?} names two groups");
                }
            }
        }
    }

    #[test]
    fn a_group_is_found_by_code_or_any_spelling() {
        for (s, code) in [
            ("Kinh", "01"),
            ("kinh", "01"),
            ("01", "01"),
            ("Ê Đê", "12"),
            ("Ê-đê", "12"),
            ("H'Mông", "08"),
            ("Mông", "08"),
            ("Khmer", "05"),
            ("Gia Rai", "10"),
            ("Rơ Măm", "54"),
        ] {
            assert_eq!(ethnic_group(s).map(|g| g.code.as_str()), Some(code), "{s}");
        }
        for s in ["", "00", "55", "Kinhh", "French"] {
            assert!(ethnic_group(s).is_none(), "{s}");
        }
        for (n, vn) in [
            ("Việt Nam", true),
            ("Viet Nam", true),
            ("VN", true),
            ("Lào", false),
        ] {
            assert_eq!(is_vietnamese(n), vn, "{n}");
        }
    }
}
