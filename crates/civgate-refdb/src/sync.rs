//! The reference directory's side of the two-way loop: it consumes `civil-status` through the
//! gateway (as the population database), applies each event to its store and publishes the
//! answers (`personal_id_assigned` for a birth). A conflicting event (the death of a dead
//! citizen, the marriage of a married one) is rejected with the reason, then acknowledged.

use std::{net::SocketAddr, path::Path};

use anyhow::{Context, Result};
use tonic::transport::Channel;
use tracing::{info, warn};

use super::store::DirectoryStore;
use crate::{
    client,
    convert::sex_from_pb,
    domain::{PersonalId, Sex, parse_date},
    pb::v1::{
        AckRequest, Event, PersonalIdAssigned, PublishRequest, RejectRequest, Sex as PbSex,
        SubscribeRequest, SubscribedEvent, event::Payload, exchange_client::ExchangeClient,
    },
    synth::{CitizenRecord, MaritalStatus},
};

pub const GROUP: &str = "population-db";

/// What applying one event produced.
#[derive(Debug)]
pub enum Applied {
    /// Applied; publish this answer (if any).
    Done(Option<Box<Event>>),
    /// Refused: the reason goes to the producer.
    Conflict(String),
}

/// Applies one civil-status event to the directory.
pub async fn apply(store: &DirectoryStore, e: &SubscribedEvent) -> Result<Applied> {
    let Some(payload) = e.event.as_ref().and_then(|ev| ev.payload.as_ref()) else {
        return Ok(Applied::Conflict("event has no payload".into()));
    };
    let one = |id: &str| -> Result<PersonalId> {
        PersonalId::parse(id).map_err(|e| anyhow::anyhow!("{e}"))
    };
    match payload {
        Payload::Birth(b) => {
            let sex = sex_from_pb(PbSex::try_from(b.sex).unwrap_or(PbSex::Unspecified))
                .unwrap_or(Sex::Female);
            let dob = parse_date(&b.date_of_birth).map_err(anyhow::Error::msg)?;
            let parent = |p: &Option<crate::pb::v1::Parent>| {
                p.as_ref()
                    .and_then(|p| p.personal_id.as_deref())
                    .and_then(|s| PersonalId::parse(s).ok())
            };
            // A re-registration (or a late one for someone already known) keeps the ID the
            // person has; a newborn gets a new one.
            let kept = b.personal_id.as_deref().filter(|s| !s.is_empty());
            let known = match kept {
                Some(given) => {
                    let id = one(given)?;
                    let known = store.get_many(std::slice::from_ref(&id)).await?.pop();
                    if let Some(k) = &known
                        && (k.date_of_birth != dob || k.sex != sex)
                    {
                        return Ok(Applied::Conflict(format!(
                            "citizen {id} is recorded as born {} ({}), not {} ({})",
                            crate::domain::format_date(k.date_of_birth),
                            k.sex,
                            b.date_of_birth,
                            sex
                        )));
                    }
                    Some((id, known))
                }
                None => None,
            };
            let id = match &known {
                Some((id, _)) => id.clone(),
                None => {
                    fresh_id(
                        store,
                        &b.birth_registration_province_code,
                        sex,
                        dob,
                        &b.full_name,
                        &e.event_id,
                    )
                    .await?
                }
            };
            let residence = b
                .mother
                .as_ref()
                .or(b.father.as_ref())
                .map(|p| p.residence.clone())
                .unwrap_or_default();
            let record = CitizenRecord {
                personal_id: id.clone(),
                full_name: b.full_name.clone(),
                date_of_birth: dob,
                sex,
                marital_status: MaritalStatus::Single,
                place_of_birth: b.place_of_birth.clone(),
                hometown: b.hometown.clone(),
                ethnicity: b.ethnicity.clone(),
                religion: "Không".into(),
                nationality: b.nationality.clone(),
                blood_type: String::new(),
                father: parent(&b.father),
                mother: parent(&b.mother),
                spouse: None,
                permanent_province: b.birth_registration_province_code.clone(),
                permanent_address: residence.clone(),
                current_province: b.birth_registration_province_code.clone(),
                current_address: residence,
                date_of_death: None,
            };
            // What the population database knew of a re-registered person stays (marital
            // status, spouse, residence, death); the birth record's own data is the registration's.
            let record = match known.and_then(|(_, k)| k) {
                Some(k) => CitizenRecord {
                    marital_status: k.marital_status,
                    spouse: k.spouse,
                    permanent_province: k.permanent_province,
                    permanent_address: k.permanent_address,
                    current_province: k.current_province,
                    current_address: k.current_address,
                    date_of_death: k.date_of_death,
                    religion: k.religion,
                    blood_type: k.blood_type,
                    ..record
                },
                None => record,
            };
            store.upsert(&record).await?;
            let reg = b.registration.clone().unwrap_or_default();
            Ok(Applied::Done(Some(Box::new(Event {
                // The answer belongs to the birth's case.
                case_reference: e
                    .event
                    .as_ref()
                    .map(|ev| ev.case_reference.clone())
                    .unwrap_or_default(),
                occurred_at_unix_ms: crate::audit::log::now_ms(),
                in_reply_to: e.event_id.clone(),
                payload: Some(Payload::PersonalIdAssigned(PersonalIdAssigned {
                    personal_id: id.to_string(),
                    registry_office_code: reg.registry_office_code,
                    book_number: reg.book_number,
                    entry_number: reg.entry_number,
                    ..Default::default()
                })),
            }))))
        }
        Payload::Death(d) => {
            let id = one(&d.personal_id)?;
            let Some(mut c) = store.get_many(std::slice::from_ref(&id)).await?.pop() else {
                return Ok(Applied::Conflict(format!(
                    "no citizen {id} in the population database"
                )));
            };
            if let Some(when) = c.date_of_death {
                return Ok(Applied::Conflict(format!(
                    "citizen {id} is already recorded dead (on {})",
                    crate::domain::format_date(when)
                )));
            }
            c.date_of_death = Some(parse_date(&d.date_of_death).map_err(anyhow::Error::msg)?);
            store.upsert(&c).await?;
            Ok(Applied::Done(None))
        }
        Payload::Marriage(m) => {
            let (a, b) = (one(&m.spouse1_personal_id)?, one(&m.spouse2_personal_id)?);
            let found = store.get_many(&[a.clone(), b.clone()]).await?;
            let get = |id: &PersonalId| found.iter().find(|c| &c.personal_id == id).cloned();
            let (Some(mut x), Some(mut y)) = (get(&a), get(&b)) else {
                return Ok(Applied::Conflict(
                    "a spouse is not in the population database".into(),
                ));
            };
            for c in [&x, &y] {
                if c.marital_status == MaritalStatus::Married {
                    return Ok(Applied::Conflict(format!(
                        "citizen {} is already married",
                        c.personal_id
                    )));
                }
                if c.date_of_death.is_some() {
                    return Ok(Applied::Conflict(format!(
                        "citizen {} is recorded dead",
                        c.personal_id
                    )));
                }
                // The full date of birth decides what the ID's year cannot (Marriage and
                // Family Law 2014, art. 8(1)(a): men from full 20, women from full 18).
                if let Ok(on) = parse_date(&m.date_of_marriage)
                    && let Some(why) = under_marriage_age(c, on)
                {
                    return Ok(Applied::Conflict(why));
                }
            }
            x.marital_status = MaritalStatus::Married;
            y.marital_status = MaritalStatus::Married;
            x.spouse = Some(b);
            y.spouse = Some(a);
            store.upsert(&x).await?;
            store.upsert(&y).await?;
            Ok(Applied::Done(None))
        }
        Payload::Divorce(d) => {
            let ids = [one(&d.spouse1_personal_id)?, one(&d.spouse2_personal_id)?];
            for mut c in store.get_many(&ids).await? {
                c.marital_status = MaritalStatus::Divorced;
                c.spouse = None;
                store.upsert(&c).await?;
            }
            Ok(Applied::Done(None))
        }
        // Recorded by the directory's real counterpart; the reference directory keeps no
        // data these events change.
        _ => Ok(Applied::Done(None)),
    }
}

/// Why `c` could not marry on `on` for want of age (`None`: old enough).
fn under_marriage_age(c: &CitizenRecord, on: time::Date) -> Option<String> {
    let legal = match c.sex {
        Sex::Male => 20,
        Sex::Female => 18,
    };
    let born = c.date_of_birth;
    let mut age = on.year() - born.year();
    if (on.month() as u8, on.day()) < (born.month() as u8, born.day()) {
        age -= 1;
    }
    (age < legal).then(|| {
        format!(
            "citizen {} was {age} on {}, under the age of marriage ({legal}, Marriage and Family Law 2014 art. 8(1)(a))",
            c.personal_id,
            crate::domain::format_date(on)
        )
    })
}

/// The ID for a newborn: province of registration, century/sex digit, year, and a suffix
/// derived from the birth event, so a redelivered birth finds the citizen it created.
async fn fresh_id(
    store: &DirectoryStore,
    province: &str,
    sex: Sex,
    dob: time::Date,
    name: &str,
    event_id: &str,
) -> Result<PersonalId> {
    use sha2::{Digest, Sha256};
    let year = dob.year();
    let d = Sha256::digest(event_id.as_bytes());
    let mut suffix = u32::from_be_bytes([0, d[0], d[1], d[2]]) % 1_000_000;
    for _ in 0..1_000 {
        let id =
            PersonalId::compose(province, sex, year, suffix).map_err(|e| anyhow::anyhow!("{e}"))?;
        match store.get_many(std::slice::from_ref(&id)).await?.pop() {
            None => return Ok(id),
            // This birth, delivered again.
            Some(c) if c.full_name == name && c.date_of_birth == dob => return Ok(id),
            Some(_) => suffix = (suffix + 1) % 1_000_000,
        }
    }
    anyhow::bail!("no free personal ID for {province}/{year}")
}

/// Consumes `civil-status` until the stream ends (the caller reconnects).
pub async fn consume(addr: SocketAddr, certs_dir: &Path, store: DirectoryStore) -> Result<()> {
    let channel: Channel = client::connect(addr, certs_dir, Some("population")).await?;
    let mut ex = ExchangeClient::new(channel);
    let mut stream = ex
        .subscribe(SubscribeRequest {
            topic: "civil-status".into(),
            consumer_group: GROUP.into(),
            from_sequence: None,
        })
        .await
        .context("subscribing to civil-status")?
        .into_inner();
    while let Some(e) = stream.message().await? {
        let seq = e.sequence;
        match apply(&store, &e).await? {
            Applied::Done(answer) => {
                if let Some(answer) = answer {
                    // Keyed by the event answered: a redelivered birth is answered once.
                    let r = ex
                        .publish(PublishRequest {
                            idempotency_key: format!("answer-{}", e.event_id),
                            event: Some(*answer),
                        })
                        .await?
                        .into_inner();
                    info!(seq, answer_seq = r.sequence, "applied; answer published");
                }
            }
            Applied::Conflict(reason) => {
                warn!(seq, %reason, "rejected");
                ex.reject(RejectRequest {
                    topic: "civil-status".into(),
                    consumer_group: GROUP.into(),
                    sequence: seq,
                    reason,
                })
                .await?;
            }
        }
        ex.ack(AckRequest {
            topic: "civil-status".into(),
            consumer_group: GROUP.into(),
            sequence: seq,
        })
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_age_of_marriage_is_counted_to_the_day() {
        let mut c = crate::synth::Population::new(1, 10)
            .next()
            .expect("a synthetic citizen");
        use time::macros::date;
        for (sex, born, on, under) in [
            (
                Sex::Female,
                date!(2008 - 06 - 15),
                date!(2026 - 06 - 14),
                true,
            ),
            (
                Sex::Female,
                date!(2008 - 06 - 15),
                date!(2026 - 06 - 15),
                false,
            ),
            (
                Sex::Male,
                date!(2006 - 06 - 15),
                date!(2026 - 06 - 14),
                true,
            ),
            (
                Sex::Male,
                date!(2006 - 06 - 15),
                date!(2026 - 06 - 15),
                false,
            ),
            (
                Sex::Male,
                date!(2000 - 01 - 01),
                date!(2026 - 01 - 01),
                false,
            ),
        ] {
            c.sex = sex;
            c.date_of_birth = born;
            assert_eq!(
                under_marriage_age(&c, on).is_some(),
                under,
                "{sex:?} {born} {on}"
            );
        }
    }
}
