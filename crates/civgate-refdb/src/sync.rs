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
                            "citizen {id} is recorded with another date of birth or sex than this birth gives"
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
                // Not on a birth record: unknown until the person declares one.
                religion: String::new(),
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
            // The answer belongs to the birth's case.
            Ok(answer(
                e,
                Payload::PersonalIdAssigned(PersonalIdAssigned {
                    personal_id: id.to_string(),
                    registry_office_code: reg.registry_office_code,
                    book_number: reg.book_number,
                    entry_number: reg.entry_number,
                    ..Default::default()
                }),
            ))
        }
        Payload::Death(d) => {
            let id = one(&d.personal_id)?;
            let Some(mut c) = store.get_many(std::slice::from_ref(&id)).await?.pop() else {
                return Ok(Applied::Conflict(format!(
                    "no citizen {id} in the population database"
                )));
            };
            if c.date_of_death.is_some() {
                return Ok(Applied::Conflict(format!(
                    "citizen {id} is already recorded dead"
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
        Payload::CivilStatusChange(x) => change(store, e, x).await,
        Payload::CourtDecision(x) => court_decision(store, x).await,
        Payload::NationalityChange(x) => {
            use crate::pb::v1::NationalityChangeKind as K;
            let id = one(&x.personal_id)?;
            let Some(mut c) = store.get_many(std::slice::from_ref(&id)).await?.pop() else {
                return Ok(no_citizen(&id));
            };
            c.nationality = match K::try_from(x.kind).unwrap_or(K::Unspecified) {
                K::Acquired | K::Restored => "Việt Nam".into(),
                // The other nationality, if any, is not in the event.
                K::Renounced | K::Deprived => String::new(),
                K::Unspecified => return Ok(Applied::Conflict("no kind of change".into())),
            };
            store.upsert(&c).await?;
            Ok(Applied::Done(None))
        }
        Payload::MaritalStatusConfirmed(x) => {
            // The anti-bigamy check: a certificate must say what the records say.
            let id = one(&x.personal_id)?;
            let Some(c) = store.get_many(std::slice::from_ref(&id)).await?.pop() else {
                return Ok(no_citizen(&id));
            };
            let recorded = crate::convert::marital_to_pb(c.marital_status) as i32;
            if recorded != x.marital_status {
                return Ok(Applied::Conflict(format!(
                    "citizen {id} is recorded with another marital status than {} as certified",
                    name_of_marital(x.marital_status)
                )));
            }
            Ok(Applied::Done(None))
        }
        // Recorded by the directory's real counterpart; the reference directory keeps no
        // data these events change (guardians, adoptive parents).
        Payload::ParentChildRecognition(_)
        | Payload::Adoption(_)
        | Payload::AdoptionEnded(_)
        | Payload::Guardianship(_)
        | Payload::GuardianshipEnded(_) => Ok(Applied::Done(None)),
        Payload::PersonalIdAssigned(_)
        | Payload::ResidenceChanged(_)
        | Payload::DeathRecorded(_)
        | Payload::PersonalIdReissued(_)
        | Payload::CitizenDataCorrected(_)
        | Payload::PermanentResidenceRegistered(_)
        | Payload::PermanentResidenceDeleted(_)
        | Payload::HealthInsuranceCardIssued(_)
        | Payload::FuneralAllowanceDecided(_) => {
            Ok(Applied::Conflict("not a civil-status event".into()))
        }
    }
}

fn no_citizen(id: &PersonalId) -> Applied {
    Applied::Conflict(format!("no citizen {id} in the population database"))
}

fn name_of_marital(m: i32) -> &'static str {
    crate::pb::v1::MaritalStatus::try_from(m)
        .map(|m| m.as_str_name())
        .unwrap_or("MARITAL_STATUS_UNSPECIFIED")
}

/// The linked procedure's second answer (Decree 63/2024), for an event of a case: a birth's
/// child has its permanent residence registered (with the parents'), a dead citizen's is
/// deleted. `first` is the answer already made (the personal ID assigned to a birth).
pub fn linked_answer(e: &SubscribedEvent, first: Option<&Event>) -> Option<Event> {
    use crate::pb::v1::{PermanentResidenceDeleted, PermanentResidenceRegistered, Residence};
    let event = e
        .event
        .as_ref()
        .filter(|ev| !ev.case_reference.is_empty())?;
    let today = crate::domain::format_date(crate::domain::today());
    let payload = match event.payload.as_ref()? {
        Payload::Birth(b) => {
            let Some(Payload::PersonalIdAssigned(id)) = first.and_then(|f| f.payload.as_ref())
            else {
                return None;
            };
            let province =
                crate::domain::residence::current_province(&b.birth_registration_province_code)
                    .map(|p| p.code.clone())
                    .or_else(|| {
                        crate::domain::residence::successor_of(&b.birth_registration_province_code)
                            .map(|p| p.code.clone())
                    })?;
            let address = b
                .mother
                .as_ref()
                .or(b.father.as_ref())
                .map(|p| p.residence.clone())
                .filter(|r| !r.is_empty())
                .unwrap_or_else(|| b.place_of_birth.clone());
            Payload::PermanentResidenceRegistered(PermanentResidenceRegistered {
                personal_id: id.personal_id.clone(),
                residence: Some(Residence {
                    province_code: province,
                    address,
                }),
                effective_date: today,
            })
        }
        Payload::Death(d) => Payload::PermanentResidenceDeleted(PermanentResidenceDeleted {
            personal_id: d.personal_id.clone(),
            effective_date: today,
        }),
        _ => return None,
    };
    match answer(e, payload) {
        Applied::Done(Some(ev)) => Some(*ev),
        _ => None,
    }
}

/// The answer to `e`, of the same case.
fn answer(e: &SubscribedEvent, payload: Payload) -> Applied {
    Applied::Done(Some(Box::new(Event {
        case_reference: e
            .event
            .as_ref()
            .map(|ev| ev.case_reference.clone())
            .unwrap_or_default(),
        occurred_at_unix_ms: crate::audit::log::now_ms(),
        in_reply_to: e.event_id.clone(),
        payload: Some(payload),
    })))
}

/// A typed change of a birth record's field. The record must say what `old_value` says (an
/// addition: that the field is empty). A change of sex or of the year of birth re-issues the
/// personal ID, and the answer says so.
async fn change(
    store: &DirectoryStore,
    e: &SubscribedEvent,
    x: &crate::pb::v1::CivilStatusChange,
) -> Result<Applied> {
    use crate::pb::v1::PersonalIdReissued;
    let id = PersonalId::parse(&x.personal_id).map_err(|e| anyhow::anyhow!("{e}"))?;
    let Some(mut c) = store.get_many(std::slice::from_ref(&id)).await?.pop() else {
        // Delivered again after its re-issue: the same answer.
        if let Some(new) = store.reissued_as(&id).await? {
            return Ok(answer(
                e,
                Payload::PersonalIdReissued(PersonalIdReissued {
                    old_personal_id: id.to_string(),
                    new_personal_id: new.to_string(),
                    reason: reissue_reason(x),
                }),
            ));
        }
        return Ok(no_citizen(&id));
    };
    let opt_id = |p: &Option<PersonalId>| p.as_ref().map(ToString::to_string).unwrap_or_default();
    let now = match x.field.as_str() {
        "full_name" => c.full_name.clone(),
        "date_of_birth" => crate::domain::format_date(c.date_of_birth),
        "sex" => c.sex.to_string(),
        "place_of_birth" => c.place_of_birth.clone(),
        "hometown" => c.hometown.clone(),
        "ethnicity" => c.ethnicity.clone(),
        "nationality" => c.nationality.clone(),
        "father_personal_id" => opt_id(&c.father),
        "mother_personal_id" => opt_id(&c.mother),
        other => {
            return Ok(Applied::Conflict(format!(
                "{other} is not a birth record's field"
            )));
        }
    };
    if now != x.old_value {
        return Ok(Applied::Conflict(format!(
            "citizen {id}'s {} is recorded otherwise than old_value says",
            x.field
        )));
    }
    let v = x.new_value.clone();
    match x.field.as_str() {
        "full_name" => c.full_name = v,
        "date_of_birth" => c.date_of_birth = parse_date(&v).map_err(anyhow::Error::msg)?,
        "sex" => {
            c.sex = match v.as_str() {
                "male" => Sex::Male,
                _ => Sex::Female,
            }
        }
        "place_of_birth" => c.place_of_birth = v,
        "hometown" => c.hometown = v,
        "ethnicity" => c.ethnicity = v,
        "nationality" => c.nationality = v,
        "father_personal_id" => {
            c.father = Some(PersonalId::parse(&v).map_err(|e| anyhow::anyhow!("{e}"))?)
        }
        _ => c.mother = Some(PersonalId::parse(&v).map_err(|e| anyhow::anyhow!("{e}"))?),
    }
    // Does the number still say who the person is?
    if c.sex == id.sex() && c.date_of_birth.year() == id.birth_year() {
        store.upsert(&c).await?;
        return Ok(Applied::Done(None));
    }
    let new = fresh_id(
        store,
        id.province_code(),
        c.sex,
        c.date_of_birth,
        &c.full_name,
        &e.event_id,
    )
    .await?;
    c.personal_id = new.clone();
    store.reissue(&id, &c).await?;
    Ok(answer(
        e,
        Payload::PersonalIdReissued(PersonalIdReissued {
            old_personal_id: id.to_string(),
            new_personal_id: new.to_string(),
            reason: reissue_reason(x),
        }),
    ))
}

fn reissue_reason(x: &crate::pb::v1::CivilStatusChange) -> String {
    if x.field == "sex" {
        "the sex was re-determined".into()
    } else {
        "the year of birth was corrected".into()
    }
}

/// A court's decision applied to the records it changes.
async fn court_decision(
    store: &DirectoryStore,
    x: &crate::pb::v1::CourtDecision,
) -> Result<Applied> {
    use crate::pb::v1::CourtDecisionKind as K;
    let parse = |s: &str| PersonalId::parse(s).map_err(|e| anyhow::anyhow!("{e}"));
    let id = parse(&x.personal_id)?;
    let Some(mut c) = store.get_many(std::slice::from_ref(&id)).await?.pop() else {
        return Ok(no_citizen(&id));
    };
    let other = match x.other_personal_id.as_str() {
        "" => None,
        s => {
            let o = parse(s)?;
            match store.get_many(std::slice::from_ref(&o)).await?.pop() {
                Some(r) => Some(r),
                None => return Ok(no_citizen(&o)),
            }
        }
    };
    match (K::try_from(x.kind).unwrap_or(K::Unspecified), other) {
        (K::MarriageAnnulled, Some(mut o)) => {
            if c.spouse.as_ref() != Some(&o.personal_id) {
                return Ok(Applied::Conflict(format!(
                    "citizens {id} and {} are not recorded as married to each other",
                    o.personal_id
                )));
            }
            for r in [&mut c, &mut o] {
                r.marital_status = MaritalStatus::Single;
                r.spouse = None;
            }
            store.upsert(&c).await?;
            store.upsert(&o).await?;
        }
        (K::MarriageRecognised, Some(mut o)) => {
            for r in [&c, &o] {
                if r.marital_status == MaritalStatus::Married
                    && r.spouse.as_ref()
                        != Some(if r.personal_id == id {
                            &o.personal_id
                        } else {
                            &id
                        })
                {
                    return Ok(Applied::Conflict(format!(
                        "citizen {} is married to someone else",
                        r.personal_id
                    )));
                }
            }
            let (a, b) = (c.personal_id.clone(), o.personal_id.clone());
            c.marital_status = MaritalStatus::Married;
            o.marital_status = MaritalStatus::Married;
            c.spouse = Some(b);
            o.spouse = Some(a);
            store.upsert(&c).await?;
            store.upsert(&o).await?;
        }
        (K::DeclaredDead, _) => {
            if c.date_of_death.is_some() {
                return Ok(Applied::Conflict(format!(
                    "citizen {id} is already recorded dead"
                )));
            }
            c.date_of_death = Some(parse_date(&x.date_of_death).map_err(anyhow::Error::msg)?);
            store.upsert(&c).await?;
        }
        (K::DeathCancelled, _) => {
            if c.date_of_death.is_none() {
                return Ok(Applied::Conflict(format!(
                    "citizen {id} is not recorded dead"
                )));
            }
            c.date_of_death = None;
            store.upsert(&c).await?;
        }
        (K::ParentageDetermined, Some(parent)) => {
            match parent.sex {
                Sex::Male => c.father = Some(parent.personal_id),
                Sex::Female => c.mother = Some(parent.personal_id),
            }
            store.upsert(&c).await?;
        }
        // Missing persons and civil capacity: the reference directory keeps no such data.
        (K::DeclaredMissing | K::MissingCancelled, _)
        | (K::LostCivilCapacity | K::CivilCapacityRestored, _) => {}
        (kind, _) => {
            return Ok(Applied::Conflict(format!(
                "{} without the person it concerns",
                kind.as_str_name()
            )));
        }
    }
    Ok(Applied::Done(None))
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
            "citizen {} had not reached the age of marriage ({legal}, Marriage and Family Law 2014 art. 8(1)(a)) on {}",
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

/// Consumes `civil-status` for good: after the stream ends or fails, again a second later.
pub async fn consume_forever(
    addr: SocketAddr,
    certs_dir: std::path::PathBuf,
    store: DirectoryStore,
) {
    loop {
        match consume(addr, &certs_dir, store.clone()).await {
            Ok(()) => info!("civil-status stream ended; subscribing again"),
            Err(e) => {
                warn!(error = %format!("{e:#}"), "consuming civil-status failed; again in 1 s")
            }
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
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
                let follow = linked_answer(&e, answer.as_deref());
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
                if let Some(follow) = follow {
                    let r = ex
                        .publish(PublishRequest {
                            idempotency_key: format!("residence-{}", e.event_id),
                            event: Some(follow),
                        })
                        .await?
                        .into_inner();
                    info!(
                        seq,
                        answer_seq = r.sequence,
                        "linked procedure: residence answered"
                    );
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
    use crate::pb::v1::{
        ChangeKind, CivilStatusChange, CourtDecision, CourtDecisionKind, MaritalStatusConfirmed,
        Registration,
    };

    fn delivered(id: &str, payload: Payload) -> SubscribedEvent {
        SubscribedEvent {
            event_id: id.into(),
            sequence: 1,
            event: Some(Event {
                case_reference: "HS-1".into(),
                payload: Some(payload),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn registration() -> Option<Registration> {
        Some(Registration {
            registry_office_code: "HP-LECHAN".into(),
            book_number: "1".into(),
            entry_number: "2".into(),
            registration_date: "2026-03-02".into(),
            registering_official: "Trần Văn Bình".into(),
            country: String::new(),
        })
    }

    async fn store_with(n: usize) -> (tempfile::TempDir, DirectoryStore, Vec<CitizenRecord>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = DirectoryStore::open(dir.path()).await.expect("store");
        let people: Vec<_> = crate::synth::Population::new(5, n).collect();
        for p in &people {
            store.upsert(p).await.expect("upsert");
        }
        (dir, store, people)
    }

    #[tokio::test]
    async fn a_gender_re_determination_re_issues_the_id_once() {
        let (_dir, store, people) = store_with(50).await;
        let p = people
            .iter()
            .find(|p| p.date_of_death.is_none())
            .expect("a living citizen");
        let (old, new) = match p.sex {
            Sex::Male => ("male", "female"),
            Sex::Female => ("female", "male"),
        };
        let e = delivered(
            "ev-gender",
            Payload::CivilStatusChange(CivilStatusChange {
                registration: registration(),
                personal_id: p.personal_id.to_string(),
                field: "sex".into(),
                old_value: old.into(),
                new_value: new.into(),
                reason: "quyết định của tòa án".into(),
                kind: ChangeKind::Gender as i32,
            }),
        );
        let first = apply(&store, &e).await.expect("applied");
        let Applied::Done(Some(answer)) = first else {
            panic!("{first:?}")
        };
        assert_eq!(answer.in_reply_to, "ev-gender");
        assert_eq!(answer.case_reference, "HS-1");
        let Some(Payload::PersonalIdReissued(r)) = &answer.payload else {
            panic!("{answer:?}")
        };
        assert_eq!(r.old_personal_id, p.personal_id.as_str());
        let new_id = PersonalId::parse(&r.new_personal_id).expect("a valid new ID");
        assert_ne!(new_id.sex(), p.personal_id.sex());
        assert_eq!(new_id.birth_year(), p.personal_id.birth_year());
        assert_eq!(new_id.province_code(), p.personal_id.province_code());
        // The old number is gone, the new one holds the person.
        assert!(
            store
                .get_many(std::slice::from_ref(&p.personal_id))
                .await
                .unwrap()
                .is_empty()
        );
        let moved = store.get_many(std::slice::from_ref(&new_id)).await.unwrap();
        assert_eq!(moved[0].full_name, p.full_name);
        // Delivered again: the same answer, no third number.
        let again = apply(&store, &e).await.expect("applied");
        let Applied::Done(Some(again)) = again else {
            panic!("{again:?}")
        };
        assert_eq!(again.payload, answer.payload);
    }

    #[tokio::test]
    async fn a_change_must_start_from_what_the_record_says() {
        let (_dir, store, people) = store_with(10).await;
        let p = &people[0];
        let change = |old: &str| {
            delivered(
                "ev-name",
                Payload::CivilStatusChange(CivilStatusChange {
                    registration: registration(),
                    personal_id: p.personal_id.to_string(),
                    field: "full_name".into(),
                    old_value: old.into(),
                    new_value: "Nguyễn Thị Mới".into(),
                    reason: "theo yêu cầu".into(),
                    kind: ChangeKind::Name as i32,
                }),
            )
        };
        let r = apply(&store, &change("Không Phải Tên")).await.unwrap();
        assert!(
            matches!(&r, Applied::Conflict(why) if why.contains("recorded otherwise") && !why.contains(&p.full_name)),
            "{r:?}"
        );
        let r = apply(&store, &change(&p.full_name)).await.unwrap();
        assert!(matches!(r, Applied::Done(None)), "{r:?}");
        let now = store
            .get_many(std::slice::from_ref(&p.personal_id))
            .await
            .unwrap();
        assert_eq!(now[0].full_name, "Nguyễn Thị Mới");
    }

    /// A re-registration keeps the person's ID only when the records agree on the date of
    /// birth and sex; a marriage of someone already married is rejected.
    #[tokio::test]
    async fn re_registrations_and_marriages_meet_the_records() {
        let (_dir, store, people) = store_with(200).await;
        let p = people
            .iter()
            .find(|p| p.date_of_death.is_none())
            .expect("a living citizen");
        let birth = |dob: time::Date| {
            delivered(
                "ev-rereg",
                Payload::Birth(crate::pb::v1::Birth {
                    registration: registration(),
                    full_name: p.full_name.clone(),
                    sex: match p.sex {
                        Sex::Male => PbSex::Male,
                        Sex::Female => PbSex::Female,
                    } as i32,
                    date_of_birth: crate::domain::format_date(dob),
                    place_of_birth: "Hải Phòng".into(),
                    ethnicity: "Kinh".into(),
                    nationality: "Việt Nam".into(),
                    birth_registration_province_code: "031".into(),
                    foundling: true,
                    personal_id: Some(p.personal_id.to_string()),
                    ..Default::default()
                }),
            )
        };
        let other_day = p.date_of_birth.previous_day().expect("a day before");
        let r = apply(&store, &birth(other_day)).await.unwrap();
        assert!(
            matches!(&r, Applied::Conflict(why) if why.contains("another date of birth or sex")),
            "{r:?}"
        );
        let r = apply(&store, &birth(p.date_of_birth)).await.unwrap();
        let Applied::Done(Some(answer)) = r else {
            panic!("{r:?}")
        };
        let Some(Payload::PersonalIdAssigned(a)) = &answer.payload else {
            panic!("{answer:?}")
        };
        assert_eq!(a.personal_id, p.personal_id.as_str(), "the ID is kept");

        let married = people
            .iter()
            .find(|m| m.date_of_death.is_none() && m.marital_status == MaritalStatus::Married)
            .expect("a married citizen");
        let single = people
            .iter()
            .find(|s| {
                s.date_of_death.is_none()
                    && s.marital_status == MaritalStatus::Single
                    && s.sex != married.sex
            })
            .expect("a single citizen of the other sex");
        let marriage = delivered(
            "ev-marriage",
            Payload::Marriage(crate::pb::v1::Marriage {
                registration: registration(),
                spouse1_personal_id: married.personal_id.to_string(),
                spouse1_full_name: married.full_name.clone(),
                spouse2_personal_id: single.personal_id.to_string(),
                spouse2_full_name: single.full_name.clone(),
                date_of_marriage: "2026-03-01".into(),
            }),
        );
        let r = apply(&store, &marriage).await.unwrap();
        assert!(
            matches!(&r, Applied::Conflict(why) if why.contains("already married")),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn court_decisions_and_certificates_meet_the_records() {
        let (_dir, store, people) = store_with(200).await;
        let alive = people
            .iter()
            .find(|p| p.date_of_death.is_none() && p.marital_status == MaritalStatus::Married)
            .expect("a married citizen");
        let decision = |kind: CourtDecisionKind, f: &dyn Fn(&mut CourtDecision)| {
            let mut d = CourtDecision {
                registration: registration(),
                kind: kind as i32,
                personal_id: alive.personal_id.to_string(),
                court: "TAND".into(),
                decision_number: "1".into(),
                effective_date: "2026-02-01".into(),
                ..Default::default()
            };
            f(&mut d);
            delivered("ev-court", Payload::CourtDecision(d))
        };
        // Declared dead, then the declaration cancelled: alive again.
        let dead = decision(CourtDecisionKind::DeclaredDead, &|d| {
            d.date_of_death = "2025-01-01".into()
        });
        assert!(matches!(
            apply(&store, &dead).await.unwrap(),
            Applied::Done(None)
        ));
        assert!(matches!(
            apply(&store, &dead).await.unwrap(),
            Applied::Conflict(_)
        ));
        let undo = decision(CourtDecisionKind::DeathCancelled, &|_| {});
        assert!(matches!(
            apply(&store, &undo).await.unwrap(),
            Applied::Done(None)
        ));
        let rec = store
            .get_many(std::slice::from_ref(&alive.personal_id))
            .await
            .unwrap();
        assert!(rec[0].date_of_death.is_none());
        // A certificate that says single for a married person is refused (bigamy signal).
        let certify = |status: crate::pb::v1::MaritalStatus| {
            delivered(
                "ev-cert",
                Payload::MaritalStatusConfirmed(MaritalStatusConfirmed {
                    registration: registration(),
                    personal_id: alive.personal_id.to_string(),
                    marital_status: status as i32,
                    intended_use: "kết hôn".into(),
                    valid_until: "2026-08-01".into(),
                }),
            )
        };
        let r = apply(&store, &certify(crate::pb::v1::MaritalStatus::Single))
            .await
            .unwrap();
        assert!(
            matches!(&r, Applied::Conflict(why) if why.contains("another marital status") && !why.contains("MARRIED")),
            "{r:?}"
        );
        let r = apply(&store, &certify(crate::pb::v1::MaritalStatus::Married))
            .await
            .unwrap();
        assert!(matches!(r, Applied::Done(None)), "{r:?}");
        // The marriage annulled: both single.
        let spouse = alive.spouse.clone().expect("a spouse");
        let annul = decision(CourtDecisionKind::MarriageAnnulled, &|d| {
            d.other_personal_id = spouse.to_string()
        });
        let r = apply(&store, &annul).await.unwrap();
        if store
            .get_many(std::slice::from_ref(&spouse))
            .await
            .unwrap()
            .is_empty()
        {
            assert!(matches!(r, Applied::Conflict(_)), "{r:?}");
        } else {
            assert!(matches!(r, Applied::Done(None)), "{r:?}");
            let both = store
                .get_many(&[alive.personal_id.clone(), spouse])
                .await
                .unwrap();
            assert!(
                both.iter()
                    .all(|c| c.marital_status == MaritalStatus::Single && c.spouse.is_none())
            );
        }
    }

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
