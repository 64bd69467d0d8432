//! A look-up's answer forwarded as the bytes the directory sent, once they are checked.
//!
//! The directory answers `GetCitizens` for one ID with `GetCitizensResponse { citizens: [c] }`,
//! encoded as `0x0a <len> <c>`. `GetCitizenResponse { citizen: c, withheld_fields }` encodes as
//! the same bytes followed by the withheld names (field 2). So when a scan of `c`'s field tags
//! shows the right personal ID, no field the purpose withholds, nothing unknown and nothing
//! unusual, the gateway answers with those bytes plus the names: no decoding into a dozen
//! `String`s, no masking, no re-encoding. Anything else goes the long way (decode, mask,
//! encode), which drops what it does not know.

use bytes::{BufMut, Bytes, BytesMut};
use prost::encoding::{WireType, decode_varint, encode_key, encode_varint};

use crate::{domain::CitizenField, pb::v1::GetCitizenResponse};

/// `Citizen`'s field number of a field (`personal_id` is 1; the rest follow in declaration
/// order, as in the proto; `field_numbers_follow_the_proto` checks each against prost).
pub(crate) fn field_number(f: CitizenField) -> u32 {
    f as u32 + 2
}

/// The field numbers a purpose releases (bit n = field n), `personal_id` included.
pub(crate) fn allowed_mask(allowed: &std::collections::BTreeSet<CitizenField>) -> u32 {
    allowed
        .iter()
        .fold(1 << 1, |m, f| m | (1 << field_number(*f)))
}

/// What a scan of an encoded `Citizen` found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Scanned<'a> {
    pub personal_id: &'a str,
    /// Bit n set: field n is present.
    pub present: u32,
}

impl Scanned<'_> {
    /// The names of the present fields, as [`crate::convert::present_fields`] gives them.
    pub(crate) fn field_names(&self) -> Vec<&'static str> {
        let mut v = vec!["personal_id"];
        v.extend(
            CitizenField::ALL
                .iter()
                .filter(|f| self.present & (1 << field_number(**f)) != 0)
                .map(|f| f.name()),
        );
        v
    }
}

/// Reads the tags of an encoded `Citizen`. `None` (decode instead) on anything but the plain
/// case: a field number `Citizen` does not have, a wire type that does not match its field, a
/// singular field twice, an enum written out as 0, a string that is not UTF-8, a `Residence`
/// with anything but its two strings, or malformed bytes.
pub(crate) fn scan_citizen(mut b: &[u8]) -> Option<Scanned<'_>> {
    let mut personal_id = None;
    let mut present = 0u32;
    while !b.is_empty() {
        let key = decode_varint(&mut b).ok()?;
        let (field, wire) = (key >> 3, key & 7);
        let field = u32::try_from(field).ok().filter(|f| (1..=18).contains(f))?;
        let repeated = field == 14;
        if present & (1 << field) != 0 && !repeated {
            return None;
        }
        match (field, wire) {
            (4 | 5, 0) => {
                if decode_varint(&mut b).ok()? == 0 {
                    return None;
                }
            }
            (4 | 5, _) => return None,
            // year_of_birth: a uint32 with presence (0 is a value).
            (18, 0) => {
                u32::try_from(decode_varint(&mut b).ok()?).ok()?;
            }
            (_, 2) => {
                let value = length_delimited(&mut b)?;
                if field == 15 || field == 16 {
                    scan_residence(value)?;
                } else {
                    let s = std::str::from_utf8(value).ok()?;
                    if field == 1 {
                        personal_id = Some(s);
                    }
                }
            }
            _ => return None,
        }
        present |= 1 << field;
    }
    Some(Scanned {
        personal_id: personal_id.unwrap_or_default(),
        present: present & !(1 << 1),
    })
}

fn length_delimited<'a>(b: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = usize::try_from(decode_varint(b).ok()?).ok()?;
    let (value, rest) = b.split_at_checked(len)?;
    *b = rest;
    Some(value)
}

/// `Residence { province_code = 1; address = 2 }`: each string at most once.
fn scan_residence(mut b: &[u8]) -> Option<()> {
    let mut seen = 0u8;
    while !b.is_empty() {
        let key = decode_varint(&mut b).ok()?;
        let field = match key {
            0x0a => 1,
            0x12 => 2,
            _ => return None,
        };
        if seen & field != 0 {
            return None;
        }
        seen |= field;
        std::str::from_utf8(length_delimited(&mut b)?).ok()?;
    }
    Some(())
}

/// The one citizen of an encoded `GetCitizensResponse` that holds exactly one (`0x0a <len>
/// <citizen>` and nothing else).
pub(crate) fn single_citizen(mut raw: &[u8]) -> Option<&[u8]> {
    if decode_varint(&mut raw).ok()? != 0x0a {
        return None;
    }
    let c = length_delimited(&mut raw)?;
    raw.is_empty().then_some(c)
}

/// The answer to `GetCitizen` for `id` straight from the directory's encoded
/// `GetCitizensResponse`, if its one citizen is `id` and holds only fields `allowed` (a mask
/// from [`allowed_mask`]); with the names of the fields returned.
pub fn forward(
    raw: &Bytes,
    id: &str,
    allowed: u32,
    withheld: &[&str],
) -> Option<(GetCitizenResponse, Vec<&'static str>)> {
    let scanned = scan_citizen(single_citizen(raw)?)?;
    if scanned.personal_id != id || scanned.present & !allowed != 0 {
        return None;
    }
    let suffix: usize = withheld
        .iter()
        .map(|n| 1 + prost::encoding::encoded_len_varint(n.len() as u64) + n.len())
        .sum();
    let mut out = BytesMut::with_capacity(raw.len() + suffix);
    out.put_slice(raw);
    for name in withheld {
        encode_key(2, WireType::LengthDelimited, &mut out);
        encode_varint(name.len() as u64, &mut out);
        out.put_slice(name.as_bytes());
    }
    let resp = GetCitizenResponse {
        encoded: Some(out.freeze()),
        ..Default::default()
    };
    Some((resp, scanned.field_names()))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;
    use crate::{
        convert::{mask, present_fields, record_to_pb},
        pb::{upstream::v1::GetCitizensResponse, v1::Citizen},
    };
    use civgate_dev::synth::Population;
    use prost::Message;

    fn citizens(n: usize) -> Vec<Citizen> {
        Population::new(7, n).map(|r| record_to_pb(&r)).collect()
    }

    fn raw(cs: Vec<Citizen>) -> Bytes {
        Bytes::from(GetCitizensResponse { citizens: cs }.encode_to_vec())
    }

    fn withheld_names(allowed: &BTreeSet<CitizenField>) -> Vec<&'static str> {
        CitizenField::ALL
            .into_iter()
            .filter(|f| !allowed.contains(f))
            .map(CitizenField::name)
            .collect()
    }

    /// The long way: decode, check, mask, encode.
    fn long_way(raw: &Bytes, id: &str, allowed: &BTreeSet<CitizenField>) -> Option<Vec<u8>> {
        let mut r = GetCitizensResponse::decode(raw.clone()).ok()?;
        let mut c = r.citizens.pop().filter(|c| c.personal_id == id)?;
        mask(&mut c, allowed);
        Some(
            GetCitizenResponse {
                citizen: Some(c),
                withheld_fields: withheld_names(allowed)
                    .into_iter()
                    .map(str::to_owned)
                    .collect(),
                encoded: None,
            }
            .encode_to_vec(),
        )
    }

    /// A citizen with every field set.
    fn full() -> Citizen {
        full_from(7)
    }

    fn full_from(seed: u64) -> Citizen {
        let mut c = record_to_pb(
            &Population::new(seed, 1)
                .next()
                .unwrap_or_else(|| unreachable!()),
        );
        let some = |s: &str| Some(s.to_owned());
        c.father_personal_id = some("001200000011");
        c.mother_personal_id = some("001300000012");
        c.spouse_personal_ids = vec!["001300000013".into()];
        c.date_of_death = some("2020-01-02");
        c.sex = crate::pb::v1::Sex::Female as i32;
        c.marital_status = crate::pb::v1::MaritalStatus::Married as i32;
        c
    }

    #[test]
    fn field_numbers_follow_the_proto() {
        for f in CitizenField::ALL {
            let mut only = full();
            mask(&mut only, &[f].into());
            only.personal_id.clear();
            let bytes = only.encode_to_vec();
            let key = decode_varint(&mut bytes.as_slice()).ok();
            assert_eq!(key.map(|k| (k >> 3) as u32), Some(field_number(f)), "{f:?}");
            let scanned = scan_citizen(&bytes).expect("scans");
            assert_eq!(scanned.present, 1 << field_number(f));
            assert_eq!(scanned.field_names(), vec!["personal_id", f.name()]);
        }
        let all = full();
        let bytes = all.encode_to_vec();
        let scanned = scan_citizen(&bytes).expect("scans");
        assert_eq!(scanned.personal_id, all.personal_id);
        assert_eq!(scanned.field_names(), present_fields(&all));
    }

    #[test]
    fn a_citizen_with_only_allowed_fields_is_forwarded_byte_for_byte() {
        let allowed: BTreeSet<_> = [
            CitizenField::FullName,
            CitizenField::DateOfBirth,
            CitizenField::Sex,
            CitizenField::PermanentResidence,
        ]
        .into();
        let mut c = citizens(1).remove(0);
        mask(&mut c, &allowed);
        let id = c.personal_id.clone();
        let r = raw(vec![c.clone()]);
        let w = withheld_names(&allowed);
        let (resp, names) = forward(&r, &id, allowed_mask(&allowed), &w).expect("forwarded");
        let expected = long_way(&r, &id, &allowed).expect("long way");
        assert_eq!(resp.encode_to_vec(), expected);
        assert_eq!(resp.encoded_len(), expected.len());
        assert_eq!(names, present_fields(&c));
        let back = GetCitizenResponse::decode(expected.as_slice()).expect("decodes");
        assert_eq!(back.citizen, Some(c));
        assert_eq!(back.withheld_fields.len(), w.len());
        assert_eq!(back.encoded, None);
    }

    #[test]
    fn anything_unusual_goes_the_long_way() {
        let allowed: BTreeSet<_> = [CitizenField::FullName].into();
        let m = allowed_mask(&allowed);
        let mut c = citizens(1).remove(0);
        let id = c.personal_id.clone();
        // A field the purpose withholds.
        assert!(forward(&raw(vec![c.clone()]), &id, m, &[]).is_none());
        mask(&mut c, &allowed);
        assert!(forward(&raw(vec![c.clone()]), &id, m, &[]).is_some());
        // Another citizen's record, none, or two.
        assert!(forward(&raw(vec![c.clone()]), "001200000009", m, &[]).is_none());
        assert!(forward(&raw(vec![]), &id, m, &[]).is_none());
        assert!(forward(&raw(vec![c.clone(), c.clone()]), &id, m, &[]).is_none());
        // An unknown field, a field twice, bad UTF-8, cut short.
        let mut extra = c.encode_to_vec();
        extra.extend_from_slice(&[0xa0, 0x01, 0x01]); // field 20, varint 1
        let wrap = |b: &[u8]| {
            let mut v = vec![0x0a];
            encode_varint(b.len() as u64, &mut v);
            v.extend_from_slice(b);
            Bytes::from(v)
        };
        assert!(forward(&wrap(&extra), &id, m, &[]).is_none());
        let mut twice = c.encode_to_vec();
        twice.extend_from_slice(&[0x12, 0x01, b'x']); // full_name again
        assert!(forward(&wrap(&twice), &id, m, &[]).is_none());
        let mut bad = c.encode_to_vec();
        let n = bad.len();
        bad[n - 1] = 0xff;
        assert!(forward(&wrap(&bad), &id, m, &[]).is_none());
        let ok = c.encode_to_vec();
        assert!(forward(&wrap(&ok[..ok.len() - 1]), &id, m, &[]).is_none());
        // An enum written out as 0.
        let mut zero = c.encode_to_vec();
        zero.extend_from_slice(&[0x20, 0x00]);
        let with_sex: BTreeSet<_> = [CitizenField::FullName, CitizenField::Sex].into();
        assert!(forward(&wrap(&zero), &id, allowed_mask(&with_sex), &[]).is_none());
    }

    proptest! {
        /// Whenever the short way answers, it answers exactly what the long way does; and for
        /// well-formed records holding only allowed fields it does answer.
        #[test]
        fn forwarding_matches_decode_mask_encode(
            seed in 0u64..500,
            allowed_bits in 0u32..(1 << 17),
            held_bits in 0u32..(1 << 17),
            noise in proptest::collection::vec(any::<u8>(), 0..6),
            at in any::<prop::sample::Index>(),
        ) {
            let pick = |bits: u32| -> BTreeSet<CitizenField> {
                CitizenField::ALL.into_iter().enumerate()
                    .filter(|(i, _)| bits & (1 << i) != 0).map(|(_, f)| f).collect()
            };
            let allowed = pick(allowed_bits);
            let mut c = full_from(seed);
            mask(&mut c, &pick(held_bits));
            let id = c.personal_id.clone();
            let w = withheld_names(&allowed);
            let clean = raw(vec![c.clone()]);
            let short = forward(&clean, &id, allowed_mask(&allowed), &w);
            let long = long_way(&clean, &id, &allowed);
            if pick(held_bits).is_subset(&allowed) {
                let (resp, names) = short.expect("plain record forwarded");
                prop_assert_eq!(Some(resp.encode_to_vec()), long);
                prop_assert_eq!(names, present_fields(&c));
            } else {
                prop_assert!(short.is_none());
            }
            // Damaged bytes: never a different answer from the long way's.
            let mut damaged = clean.to_vec();
            let i = at.index(damaged.len());
            damaged.splice(i..i, noise);
            let damaged = Bytes::from(damaged);
            if let Some((resp, names)) = forward(&damaged, &id, allowed_mask(&allowed), &w) {
                let long = long_way(&damaged, &id, &allowed).expect("the long way answers too");
                let short = GetCitizenResponse::decode(resp.encode_to_vec().as_slice());
                let long = GetCitizenResponse::decode(long.as_slice());
                prop_assert_eq!(&short, &long);
                let c = short.ok().and_then(|r| r.citizen).unwrap_or_default();
                prop_assert_eq!(names, present_fields(&c));
            }
        }
    }
}
