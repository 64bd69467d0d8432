//! A deterministic synthetic population for the reference directory, tests and benchmarks:
//! households of married parents and their children, singles, widowed and divorced adults,
//! the common family names in their real proportions (and a bucket of rarer ones), middle and
//! given names by sex, IDs valid per DOMAIN.md (province of birth registration, century/sex
//! digit, year), residences in today's 34 provinces, ethnicity, religion, blood type, deaths.
//! Households are plausible: a couple married at the legal ages shares a residence, mostly an
//! ethnic group; their children's births are registered where they live, they live with them
//! and have a parent's ethnic group. Same (seed, n) → same people, in the same order.

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use time::Date;

use crate::domain::{PersonalId, Sex, personal_id::provinces};

pub use crate::domain::record::{CitizenRecord, MaritalStatus};

/// Family names and their approximate share of the population (per mille).
const FAMILY: &[(&str, u32)] = &[
    ("Nguyễn", 380),
    ("Trần", 110),
    ("Lê", 95),
    ("Phạm", 70),
    ("Hoàng", 31),
    ("Huỳnh", 20),
    ("Phan", 45),
    ("Vũ", 20),
    ("Võ", 19),
    ("Đặng", 21),
    ("Bùi", 20),
    ("Đỗ", 14),
    ("Hồ", 13),
    ("Ngô", 13),
    ("Dương", 10),
    ("Lý", 5),
    ("Đinh", 8),
    ("Trịnh", 7),
    ("Đoàn", 6),
    ("Lương", 5),
    ("Mai", 5),
    ("Trương", 6),
    ("Lâm", 5),
    ("Tô", 4),
    ("Hà", 5),
    ("Cao", 4),
    ("Chu", 3),
    ("Tạ", 3),
];
/// The remaining 53‰ (the listed names sum to 947‰): rarer Kinh names and the family names of
/// other ethnic groups, equally likely among themselves.
const OTHER_FAMILY: &[&str] = &[
    "Lưu", "Quách", "Kiều", "Thái", "Châu", "Khúc", "Mạc", "Tăng", "La", "Nông", "Lò", "Cầm",
    "Giàng", "Vàng", "Sùng", "Ksor", "Niê", "Triệu", "Thạch", "Danh", "Kim", "Âu", "Ông", "Phùng",
];
const OTHER_FAMILY_PER_MILLE: u32 = 53;
const MIDDLE_MALE: &[&str] = &[
    "Văn", "Văn", "Văn", "Đức", "Minh", "Quang", "Hữu", "Công", "Thanh", "Xuân", "Ngọc", "Trọng",
];
const MIDDLE_FEMALE: &[&str] = &[
    "Thị", "Thị", "Thị", "Ngọc", "Thu", "Thanh", "Kim", "Mai", "Minh", "Hồng", "Phương", "Bảo",
];
const GIVEN_MALE: &[&str] = &[
    "An", "Bình", "Cường", "Dũng", "Đức", "Hùng", "Hải", "Hoàng", "Huy", "Khánh", "Long", "Minh",
    "Nam", "Phong", "Quân", "Sơn", "Tài", "Thắng", "Trung", "Tuấn", "Việt", "Hiếu", "Thành",
    "Tùng",
];
const GIVEN_FEMALE: &[&str] = &[
    "Anh", "Ánh", "Chi", "Dung", "Giang", "Hà", "Hạnh", "Hoa", "Hương", "Lan", "Linh", "Mai",
    "Ngọc", "Nhung", "Phương", "Quỳnh", "Thảo", "Trang", "Vân", "Yến", "Hằng", "Thủy", "Loan",
    "Nga",
];
const ETHNICITY: &[(&str, u32)] = &[
    ("Kinh", 853),
    ("Tày", 19),
    ("Thái", 19),
    ("Mường", 15),
    ("Khmer", 14),
    ("Hoa", 8),
    ("Nùng", 11),
    ("H'Mông", 14),
    ("Dao", 9),
    ("Gia Rai", 5),
    ("Ê Đê", 4),
    ("Chăm", 2),
];
const RELIGION: &[(&str, u32)] = &[
    ("Không", 860),
    ("Phật giáo", 50),
    ("Công giáo", 60),
    ("Cao Đài", 10),
    ("Hòa Hảo", 10),
    ("Tin Lành", 10),
];
const BLOOD: &[(&str, u32)] = &[("O", 42), ("B", 31), ("A", 21), ("AB", 6)];
const STREETS: &[&str] = &[
    "Lê Lợi",
    "Trần Hưng Đạo",
    "Nguyễn Trãi",
    "Hai Bà Trưng",
    "Lý Thường Kiệt",
    "Quang Trung",
    "Điện Biên Phủ",
    "Hùng Vương",
    "Lạch Tray",
    "Cầu Đất",
    "Tô Hiệu",
    "Phan Bội Châu",
];

fn pick<'a>(rng: &mut ChaCha8Rng, table: &[(&'a str, u32)]) -> &'a str {
    let total: u32 = table.iter().map(|(_, w)| w).sum();
    let mut x = rng.random_range(0..total);
    for (v, w) in table {
        if x < *w {
            return v;
        }
        x -= w;
    }
    table[0].0
}

fn pick1<'a>(rng: &mut ChaCha8Rng, list: &[&'a str]) -> &'a str {
    list[rng.random_range(0..list.len())]
}

fn family_name(rng: &mut ChaCha8Rng) -> &'static str {
    if rng.random_range(0..1000) < OTHER_FAMILY_PER_MILLE {
        pick1(rng, OTHER_FAMILY)
    } else {
        pick(rng, FAMILY)
    }
}

/// Youngest birth year that has reached the age of marriage (men 20, women 18) by now.
const MARRIAGEABLE_BY: i32 = 2005;
/// Share (per cent) of people living outside the province where their birth was registered.
const MOVED_AWAY: u32 = 15;

/// Deterministic generator; iterate it for the population, in order.
pub struct Population {
    rng: ChaCha8Rng,
    remaining: usize,
    pending: Vec<CitizenRecord>,
    counters: HashMap<(usize, i32, bool), u32>,
    province_weights: Vec<u32>,
    salt: u32,
}

impl Population {
    pub fn new(seed: u64, n: usize) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let salt = rng.random_range(0..1_000_000);
        Self {
            rng,
            remaining: n,
            pending: Vec::new(),
            counters: HashMap::new(),
            province_weights: provinces().iter().map(|p| p.weight).collect(),
            salt,
        }
    }

    fn province(&mut self) -> usize {
        let total: u32 = self.province_weights.iter().sum();
        let mut x = self.rng.random_range(0..total);
        for (i, w) in self.province_weights.iter().enumerate() {
            if x < *w {
                return i;
            }
            x -= w;
        }
        0
    }

    /// A fresh ID, unique within this population: per (province, year, sex) prefix a
    /// counter, mapped through a bijection of 0..1,000,000 so suffixes look random.
    fn new_id(&mut self, province: usize, sex: Sex, year: i32) -> PersonalId {
        let c = self
            .counters
            .entry((province, year, sex == Sex::Female))
            .or_insert(0);
        // A per-prefix offset keeps the first citizens of different prefixes from sharing a suffix;
        // multiplying by 736,493 (coprime to 10^6) keeps the map a bijection.
        let offset = (province as u64) * 7_919
            + (year as u64) * 104_729
            + u64::from(sex == Sex::Female) * 15_485_863;
        let suffix = ((u64::from(*c) * 736_493 + u64::from(self.salt) + offset) % 1_000_000) as u32;
        *c += 1;
        let code = &provinces()[province].code;
        // Inputs are in range by construction.
        PersonalId::compose(code, sex, year, suffix).unwrap_or_else(|_| unreachable_id())
    }

    /// A day of `year`, every day equally likely (the 29th-31st included).
    fn date_in(&mut self, year: i32) -> Date {
        let days = if time::util::is_leap_year(year) {
            366
        } else {
            365
        };
        let ordinal = self.rng.random_range(1..=days);
        Date::from_ordinal_date(year, ordinal).unwrap_or(Date::MIN)
    }

    /// Where someone whose birth was registered in `born` lives: mostly there, sometimes
    /// elsewhere; an index into the pre-2025 table (the residence is its successor).
    fn residence_for(&mut self, born: usize) -> usize {
        if self.rng.random_range(0..100) < MOVED_AWAY {
            self.province()
        } else {
            born
        }
    }

    /// A residence in today's provinces (a pre-2025 province's successor).
    fn address_in(&mut self, old: usize) -> (String, String) {
        let old = &provinces()[old];
        let (code, name) = match crate::domain::residence::successor_of(&old.code) {
            Some(now) => (now.code.clone(), now.name.clone()),
            None => (old.code.clone(), old.name.clone()),
        };
        let house = self.rng.random_range(1..400);
        let street = pick1(&mut self.rng, STREETS);
        (code, format!("Số {house} {street}, {name}"))
    }

    fn person(&mut self, sex: Sex, year: i32, family: &str, province: usize) -> CitizenRecord {
        let middle = pick1(
            &mut self.rng,
            if sex == Sex::Male {
                MIDDLE_MALE
            } else {
                MIDDLE_FEMALE
            },
        );
        let given = pick1(
            &mut self.rng,
            if sex == Sex::Male {
                GIVEN_MALE
            } else {
                GIVEN_FEMALE
            },
        );
        let residence = self.residence_for(province);
        let (province_now, address) = self.address_in(residence);
        let p = &provinces()[province];
        CitizenRecord {
            personal_id: self.new_id(province, sex, year),
            full_name: format!("{family} {middle} {given}"),
            date_of_birth: self.date_in(year),
            sex,
            marital_status: MaritalStatus::Single,
            place_of_birth: p.name.clone(),
            hometown: p.name.clone(),
            ethnicity: pick(&mut self.rng, ETHNICITY).to_owned(),
            religion: pick(&mut self.rng, RELIGION).to_owned(),
            nationality: "Việt Nam".to_owned(),
            blood_type: pick(&mut self.rng, BLOOD).to_owned(),
            father: None,
            mother: None,
            spouse: None,
            permanent_province: province_now.clone(),
            permanent_address: address.clone(),
            current_province: province_now,
            current_address: address,
            date_of_death: None,
        }
    }

    /// Makes `who` live at `home`'s residence (a household shares one).
    fn lives_with(who: &mut CitizenRecord, home: &CitizenRecord) {
        who.permanent_province.clone_from(&home.permanent_province);
        who.permanent_address.clone_from(&home.permanent_address);
        who.current_province.clone_from(&home.current_province);
        who.current_address.clone_from(&home.current_address);
    }

    fn household(&mut self) {
        let kind = self.rng.random_range(0..100);
        let province = self.province();
        let family = family_name(&mut self.rng).to_owned();
        if kind < 70 {
            // A couple, married at the legal ages, with 0-3 children.
            let fy = self.rng.random_range(1945..=MARRIAGEABLE_BY - 2);
            let my = (fy + self.rng.random_range(-3..=5)).clamp(1945, MARRIAGEABLE_BY);
            let mother_family = family_name(&mut self.rng).to_owned();
            // Most marry within their province.
            let mother_province = if self.rng.random_range(0..100) < 70 {
                province
            } else {
                self.province()
            };
            let mut father = self.person(Sex::Male, fy, &family, province);
            let mut mother = self.person(Sex::Female, my, &mother_family, mother_province);
            // Mostly of one ethnic group.
            if self.rng.random_range(0..100) < 90 {
                mother.ethnicity.clone_from(&father.ethnicity);
            }
            father.marital_status = MaritalStatus::Married;
            mother.marital_status = MaritalStatus::Married;
            father.spouse = Some(mother.personal_id.clone());
            mother.spouse = Some(father.personal_id.clone());
            if fy < 1955 && self.rng.random_range(0..100) < 30 {
                // He died; she is a widow.
                let y = self.rng.random_range(2005..=2024);
                father.date_of_death = Some(self.date_in(y));
                mother.marital_status = MaritalStatus::Widowed;
            }
            Self::lives_with(&mut mother, &father);
            let children = if kind < 55 {
                self.rng.random_range(1..=3)
            } else {
                0
            };
            // Children's births are registered where the parents live (the old province whose
            // successor that is), and they live with them.
            let home = provinces()
                .iter()
                .position(|p| p.code == father.current_province)
                .unwrap_or(province);
            let mut kids = Vec::new();
            for _ in 0..children {
                let year = (my + self.rng.random_range(20..=38)).min(2025);
                let sex = if self.rng.random_bool(0.51) {
                    Sex::Male
                } else {
                    Sex::Female
                };
                let mut c = self.person(sex, year, &family, home);
                c.father = Some(father.personal_id.clone());
                c.mother = Some(mother.personal_id.clone());
                // A child's ethnicity is a parent's (Civil Code art. 29), and so mostly is
                // the religion.
                let from = if self.rng.random_range(0..100) < 70 {
                    &father
                } else {
                    &mother
                };
                c.ethnicity.clone_from(&from.ethnicity);
                if self.rng.random_range(0..100) < 85 {
                    c.religion.clone_from(&from.religion);
                }
                Self::lives_with(&mut c, &father);
                kids.push(c);
            }
            self.pending.push(father);
            self.pending.push(mother);
            self.pending.extend(kids);
        } else {
            let status = match kind {
                70..=89 => MaritalStatus::Single,
                90..=95 => MaritalStatus::Divorced,
                _ => MaritalStatus::Widowed,
            };
            // Divorced and widowed people were married: of the age of marriage at least.
            let youngest = if status == MaritalStatus::Single {
                2007
            } else {
                MARRIAGEABLE_BY - 2
            };
            let year = self.rng.random_range(1940..=youngest);
            let sex = if self.rng.random_bool(0.5) {
                Sex::Male
            } else {
                Sex::Female
            };
            let mut p = self.person(sex, year, &family, province);
            p.marital_status = status;
            if year < 1950 && self.rng.random_range(0..100) < 25 {
                let y = self.rng.random_range(2010..=2024);
                p.date_of_death = Some(self.date_in(y));
            }
            self.pending.push(p);
        }
        // Emit in household order.
        self.pending.reverse();
    }
}

impl Iterator for Population {
    type Item = CitizenRecord;

    fn next(&mut self) -> Option<CitizenRecord> {
        if self.remaining == 0 {
            return None;
        }
        if self.pending.is_empty() {
            self.household();
        }
        let r = self.pending.pop()?;
        self.remaining -= 1;
        Some(r)
    }
}

#[cold]
fn unreachable_id() -> PersonalId {
    // Only reachable if the province table is empty or a year leaves 1900-2399.
    PersonalId::parse("001000000000").unwrap_or_else(|_| panic!("province table is empty"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn same_seed_same_people_different_seed_different_people() {
        let a: Vec<_> = Population::new(7, 500).collect();
        let b: Vec<_> = Population::new(7, 500).collect();
        let c: Vec<_> = Population::new(8, 500).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 500);
    }

    #[test]
    fn ids_are_unique_valid_and_consistent_with_sex_and_year() {
        let people: Vec<_> = Population::new(1, 50_000).collect();
        let mut seen = HashSet::new();
        for p in &people {
            assert!(
                seen.insert(p.personal_id.clone()),
                "duplicate {:?}",
                p.personal_id
            );
            p.personal_id
                .check_consistency(Some(p.sex), Some(p.date_of_birth.year()))
                .unwrap();
            assert!(crate::domain::FullName::parse(&p.full_name).is_ok());
        }
    }

    #[test]
    fn families_are_consistent() {
        let people: Vec<_> = Population::new(3, 20_000).collect();
        let by_id: HashMap<_, _> = people.iter().map(|p| (p.personal_id.clone(), p)).collect();
        let mut married = 0;
        for p in &people {
            if let Some(s) = &p.spouse
                && let Some(spouse) = by_id.get(s)
            {
                assert_eq!(spouse.spouse.as_ref(), Some(&p.personal_id));
                assert_ne!(spouse.sex, p.sex);
                married += 1;
            }
            if let Some(f) = &p.father
                && let Some(father) = by_id.get(f)
            {
                assert_eq!(father.sex, Sex::Male);
                assert!(father.date_of_birth < p.date_of_birth);
                // Children carry their father's family name.
                assert_eq!(
                    father.full_name.split(' ').next(),
                    p.full_name.split(' ').next()
                );
            }
        }
        assert!(married > 5_000, "{married}");
        let nguyen = people
            .iter()
            .filter(|p| p.full_name.starts_with("Nguyễn "))
            .count();
        let share = nguyen as f64 / people.len() as f64;
        assert!((0.30..0.45).contains(&share), "Nguyễn share {share}");
    }

    /// What a test of addressed delivery or of the province rules needs of households.
    #[test]
    fn households_are_plausible() {
        let people: Vec<_> = Population::new(4, 30_000).collect();
        let by_id: HashMap<_, _> = people.iter().map(|p| (p.personal_id.clone(), p)).collect();
        let (mut children, mut ethnic_ok, mut home_ok, mut registered_home) = (0, 0, 0, 0);
        for p in &people {
            // Residences are in today's provinces.
            assert!(
                crate::domain::residence::current_province(&p.permanent_province).is_some(),
                "{p:?}"
            );
            // Nobody is divorced or widowed below the age of marriage.
            if matches!(
                p.marital_status,
                MaritalStatus::Divorced | MaritalStatus::Widowed | MaritalStatus::Married
            ) {
                let legal = if p.sex == Sex::Male { 20 } else { 18 };
                assert!(p.date_of_birth.year() + legal <= 2026, "{p:?}");
            }
            let (Some(f), Some(m)) = (&p.father, &p.mother) else {
                continue;
            };
            let (Some(father), Some(mother)) = (by_id.get(f), by_id.get(m)) else {
                continue;
            };
            children += 1;
            ethnic_ok +=
                usize::from(p.ethnicity == father.ethnicity || p.ethnicity == mother.ethnicity);
            home_ok += usize::from(p.current_province == father.current_province);
            let registered = crate::domain::residence::successor_of(p.personal_id.province_code())
                .map(|now| now.code.as_str());
            registered_home += usize::from(registered == Some(father.current_province.as_str()));
        }
        assert!(children > 5_000, "{children}");
        assert_eq!(
            ethnic_ok, children,
            "every child has a parent's ethnic group"
        );
        assert_eq!(home_ok, children, "children live with their parents");
        assert_eq!(
            registered_home, children,
            "births registered where the parents live"
        );
        // Every day of the month occurs.
        for day in 29..=31 {
            assert!(
                people.iter().any(|p| p.date_of_birth.day() == day),
                "day {day}"
            );
        }
        // The listed family names are not over-represented: some people have another.
        let listed: std::collections::HashSet<&str> = FAMILY.iter().map(|(n, _)| *n).collect();
        let other = people
            .iter()
            .filter(|p| !listed.contains(p.full_name.split(' ').next().unwrap_or("")))
            .count() as f64
            / people.len() as f64;
        assert!((0.03..0.08).contains(&other), "other family names: {other}");
        // Most live in the province where their birth was registered.
        let at_home = people
            .iter()
            .filter(|p| {
                crate::domain::residence::successor_of(p.personal_id.province_code())
                    .is_some_and(|now| now.code == p.permanent_province)
            })
            .count() as f64
            / people.len() as f64;
        assert!(at_home > 0.6, "living where registered: {at_home}");
    }
}
