//! Vietnamese full names: stored and compared in Unicode NFC; searched through an
//! accent-insensitive folding ("Nguyễn Văn Đức" → "nguyen van duc"; Đ/đ folds to d).

use std::fmt;

use unicode_normalization::{UnicodeNormalization, char::is_combining_mark};

/// A full name (family, middle, given), NFC-normalised, single-spaced, 1–100 characters of
/// letters, spaces, apostrophes and hyphens. The apostrophe may be typographic (U+2019, or the
/// modifier letter U+02BC): Ê Đê and Gia Rai names are written `H’Hen Niê`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct FullName(String);

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most 100 characters")]
    TooLong,
    #[error("may contain only letters, spaces, apostrophes and hyphens (found {0:?})")]
    BadCharacter(char),
}

impl FullName {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        let nfc: String = s.nfc().collect();
        let normalised = nfc.split_whitespace().collect::<Vec<_>>().join(" ");
        if normalised.is_empty() {
            return Err(NameError::Empty);
        }
        if normalised.chars().count() > 100 {
            return Err(NameError::TooLong);
        }
        if let Some(c) = normalised.chars().find(|c| {
            !(c.is_alphabetic()
                || *c == ' '
                || is_apostrophe(*c)
                || *c == '-'
                || is_combining_mark(*c))
        }) {
            return Err(NameError::BadCharacter(c));
        }
        Ok(Self(normalised))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The accent-insensitive search key.
    pub fn folded(&self) -> String {
        fold(&self.0)
    }

    /// Same name ignoring case and how it is typed, not accents: what `VerifyCitizen`
    /// compares. The old and new placements of a tone mark are the same name (`Hoà` and
    /// `Hòa`, `Thuý` and `Thúy`), and so are the apostrophes (`H'Hen`, `H’Hen`); a different
    /// tone or letter (`Hòa` and `Hóa`, `Hoa`) is another name.
    pub fn matches(&self, other: &FullName) -> bool {
        tone_key(&self.0) == tone_key(&other.0)
    }
}

impl fmt::Display for FullName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for FullName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FullName({:?})", self.0)
    }
}

/// The five tone marks of Vietnamese, as combining characters (NFD): huyền, sắc, ngã, hỏi,
/// nặng.
const TONES: [char; 5] = ['\u{300}', '\u{301}', '\u{303}', '\u{309}', '\u{323}'];

fn is_apostrophe(c: char) -> bool {
    matches!(c, '\'' | '\u{2019}' | '\u{2bc}')
}

/// A name's comparison key: lowercase, NFD, apostrophes as `'`, and in each word the tone mark
/// moved from the vowel that carries it to the end of the word, so that where it was placed
/// does not matter (each syllable has one tone).
fn tone_key(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    for (i, word) in s.split(' ').enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let mut tone = None;
        for c in word.nfd().flat_map(char::to_lowercase) {
            if TONES.contains(&c) {
                tone = Some(c);
            } else if is_apostrophe(c) {
                out.push('\'');
            } else {
                out.push(c);
            }
        }
        if let Some(t) = tone {
            out.push(t);
        }
    }
    out
}

/// Accent-insensitive folding: NFD, drop combining marks, đ→d, lowercase, single spaces.
pub fn fold(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.nfd() {
        if is_combining_mark(c) {
            continue;
        }
        match c {
            'đ' | 'Đ' => out.push('d'),
            c if is_apostrophe(c) => out.push('\''),
            c => out.extend(c.to_lowercase()),
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_match_whatever_the_tone_placement_and_apostrophe() {
        let n = |s: &str| FullName::parse(s).unwrap();
        for (a, b, same) in [
            ("Nguyễn Thị Hoà", "Nguyễn Thị Hòa", true),
            ("Lê Thuý", "Lê Thúy", true),
            ("Trần Khoẻ", "Trần Khỏe", true),
            ("nguyễn thị hòa", "NGUYỄN THỊ HOÀ", true),
            ("H'Hen Niê", "H’Hen Niê", true),
            ("H\u{2bc}Hen Niê", "H’Hen Niê", true),
            // A different tone, or none, is another name.
            ("Nguyễn Thị Hòa", "Nguyễn Thị Hóa", false),
            ("Nguyễn Thị Hòa", "Nguyễn Thị Hoa", false),
            ("Lê Thúy", "Lê Thùy", false),
            // The tone stays with its word.
            ("Hòa An", "Hoa Àn", false),
        ] {
            assert_eq!(n(a).matches(&n(b)), same, "{a} / {b}");
        }
        assert_eq!(fold("H’Hen Niê"), "h'hen nie");
    }

    #[test]
    fn ede_and_gia_rai_names_take_a_typographic_apostrophe() {
        for ok in ["H’Hen Niê", "Y’Kô Niê", "Ksor H'Nhi", "R\u{2bc}Mah Hdruê"] {
            assert!(FullName::parse(ok).is_ok(), "{ok}");
        }
        assert!(matches!(
            FullName::parse("H\u{2018}Hen"),
            Err(NameError::BadCharacter('\u{2018}'))
        ));
    }

    #[test]
    fn nfd_input_is_stored_as_nfc() {
        let nfd: String = "Nguyễn Văn An".nfd().collect();
        assert_ne!(nfd, "Nguyễn Văn An");
        assert_eq!(FullName::parse(&nfd).unwrap().as_str(), "Nguyễn Văn An");
    }

    #[test]
    fn folding_drops_accents_and_dd() {
        assert_eq!(fold("Nguyễn Văn An"), "nguyen van an");
        assert_eq!(fold("Đặng Thị Ánh"), "dang thi anh");
        assert_eq!(fold("  Trần   Đức  "), "tran duc");
    }

    #[test]
    fn bad_names_are_refused() {
        assert_eq!(FullName::parse("   "), Err(NameError::Empty));
        assert!(matches!(
            FullName::parse("Robert'); DROP"),
            Err(NameError::BadCharacter(_))
        ));
        assert_eq!(FullName::parse(&"a".repeat(101)), Err(NameError::TooLong));
    }

    proptest! {
        #[test]
        fn parse_is_idempotent_and_nfc(s in "\\PC{0,60}") {
            if let Ok(n) = FullName::parse(&s) {
                let again = FullName::parse(n.as_str()).unwrap();
                prop_assert_eq!(&again, &n);
                prop_assert!(unicode_normalization::is_nfc(n.as_str()));
            }
        }

        #[test]
        fn nfc_and_nfd_fold_alike(s in "\\PC{0,60}") {
            let nfd: String = s.nfd().collect();
            let nfc: String = s.nfc().collect();
            prop_assert_eq!(fold(&nfd), fold(&nfc));
        }

        #[test]
        fn folding_is_ascii_for_vietnamese_letters(s in "[a-zA-ZàáảãạăằắẳẵặâầấẩẫậèéẻẽẹêềếểễệìíỉĩịòóỏõọôồốổỗộơờớởỡợùúủũụưừứửữựỳýỷỹỵđĐ ]{0,40}") {
            prop_assert!(fold(&s).is_ascii());
        }
    }
}
