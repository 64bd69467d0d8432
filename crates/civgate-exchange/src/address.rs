//! Who receives which event: the audience an event is addressed to (decided once, when it is
//! published, and stored with it) and the scope a subscriber reads with. Plain functions; the
//! journal's page query applies the same rule in SQL ([`matches`] is its reference).
//!
//! - `civil-status` events go to every consumer of the topic (the population database): no
//!   audience is stored.
//! - A `population` event that answers another (`Event.in_reply_to`) goes to the agency that
//!   published the answered event: `a:<agency>`. A personal ID assigned or re-issued goes to it
//!   alone; any other answer (a death, a residence, a correction) also goes where the same event
//!   unanswered would, so the registries covering the citizen learn of it too.
//! - Any other `population` event goes to the civil registries whose jurisdiction covers a
//!   citizen it concerns: `p:<province>` for the province of each personal ID it names (the
//!   province of the birth registration) and of the new residence, where it has one.
//!
//! An audience is stored as its tokens, each with a space on both sides
//! (`" p:001 p:031 "`), so that a token is found by a plain substring search.

use std::collections::BTreeSet;

use crate::{
    domain::{AgencyId, PersonalId, ProvinceCode},
    pb::v1::{Event, event::Payload},
};

use super::validate::{CIVIL_STATUS, POPULATION, SOCIAL_INSURANCE, subjects, topic_of};
use crate::domain::Role;
use crate::policy::Policy;

fn agency_token(agency: &str) -> String {
    format!(" a:{agency} ")
}

fn province_token(code: &str) -> String {
    format!(" p:{code} ")
}

/// The audience of a civil-status event a flow addresses to the social-insurance agency (a
/// request it must answer): the population database receives it as every civil-status event;
/// the social-insurance agency receives only these.
pub const TO_SOCIAL_INSURANCE: &str = " r:social_insurance ";

/// The stored audience of an event on `topic`, or `None`: every consumer of the topic.
/// `answered_producer` is the producer of the event this one answers (`in_reply_to`).
pub fn audience_of(payload: &Payload, answered_producer: Option<&str>) -> Option<String> {
    let (topic, _) = topic_of(payload);
    if topic == SOCIAL_INSURANCE {
        // Answers only: to the agency whose request it answers (else to nobody).
        return Some(answered_producer.map_or_else(|| " ".to_owned(), agency_token));
    }
    if topic != POPULATION {
        return None;
    }
    let mut s = String::from(" ");
    if let Some(agency) = answered_producer {
        if matches!(
            payload,
            Payload::PersonalIdAssigned(_)
                | Payload::PersonalIdReissued(_)
                | Payload::PermanentResidenceRegistered(_)
                | Payload::PermanentResidenceDeleted(_)
        ) {
            return Some(agency_token(agency));
        }
        s.push_str("a:");
        s.push_str(agency);
        s.push(' ');
    }
    let mut provinces = BTreeSet::new();
    for id in subjects(payload) {
        if let Ok(id) = PersonalId::parse(&id) {
            provinces.insert(id.province_code().to_owned());
        }
    }
    if let Payload::ResidenceChanged(r) = payload
        && let Some(res) = &r.new_residence
        && crate::domain::personal_id::is_known_province(&res.province_code)
    {
        provinces.insert(res.province_code.clone());
    }
    // Addressed to nobody when it names no province (validation makes that impossible for
    // a new event; an undecodable stored one is kept from everyone).
    for p in provinces {
        s.push_str("p:");
        s.push_str(&p);
        s.push(' ');
    }
    Some(s)
}

/// What a subscriber of a topic reads: `None` — everything (the population database's view of
/// civil-status), or the tokens an event's audience must contain one of.
pub fn scope_of(
    topic: &str,
    role: Role,
    agency: &AgencyId,
    provinces: &[ProvinceCode],
) -> Option<Vec<String>> {
    match topic {
        CIVIL_STATUS if role == Role::SocialInsurance => Some(vec![TO_SOCIAL_INSURANCE.to_owned()]),
        CIVIL_STATUS => None,
        SOCIAL_INSURANCE => Some(vec![agency_token(agency.as_str())]),
        _ => {
            let mut tokens = vec![agency_token(agency.as_str())];
            tokens.extend(provinces.iter().map(|p| province_token(p.as_str())));
            Some(tokens)
        }
    }
}

/// A consumer group: the agency that owns it (the caller's, from its certificate) and its name.
/// Two agencies' groups of the same name are two groups.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Group {
    pub agency: String,
    pub name: String,
}

impl Group {
    pub fn new(agency: &str, name: &str) -> Self {
        Self {
            agency: agency.to_owned(),
            name: name.to_owned(),
        }
    }
}

impl std::fmt::Display for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.agency, self.name)
    }
}

/// A consumer group whose acknowledgement retention waits for, and the scope it reads with:
/// retention deletes an event only once every holder it is addressed to has acknowledged it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub topic: &'static str,
    pub group: Group,
    pub scope: Option<Vec<String>>,
}

/// The holders under `policy`: every group each agency that consumes a topic lists in its
/// `consumer_groups`. Groups not listed there (a bench's, a test's) hold nothing back; a topic
/// with no holder keeps everything.
pub fn holders(policy: &Policy) -> Vec<Holder> {
    let mut v = Vec::new();
    for topic in [CIVIL_STATUS, POPULATION, SOCIAL_INSURANCE] {
        for (id, agency) in &policy.agencies {
            if crate::policy::may_consume(agency.role, topic).is_err() {
                continue;
            }
            for name in agency.consumer_groups.iter() {
                v.push(Holder {
                    topic,
                    group: Group::new(id.as_str(), name),
                    scope: scope_of(topic, agency.role, id, &agency.provinces),
                });
            }
        }
    }
    v
}

/// Is an event with this stored audience addressed to a subscriber with this scope?
pub fn matches(audience: Option<&str>, scope: Option<&[String]>) -> bool {
    match scope {
        None => true,
        Some(tokens) => audience.is_some_and(|a| tokens.iter().any(|t| a.contains(t.as_str()))),
    }
}

/// The event_id an event answers: `in_reply_to`, or — in events stored by an earlier release —
/// a `personal_id_assigned`'s `birth_event_id`.
#[allow(deprecated)]
pub fn answered(event: &Event) -> Option<&str> {
    if !event.in_reply_to.is_empty() {
        return Some(&event.in_reply_to);
    }
    match &event.payload {
        Some(Payload::PersonalIdAssigned(a)) if !a.birth_event_id.is_empty() => {
            Some(&a.birth_event_id)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::v1::{DeathRecorded, PersonalIdAssigned, Residence, ResidenceChanged};
    use proptest::prelude::*;

    fn scope(agency: &str, provinces: &[&str]) -> Vec<String> {
        let provinces: Vec<ProvinceCode> = provinces.iter().map(|p| p.parse().unwrap()).collect();
        scope_of(
            POPULATION,
            Role::CivilRegistry,
            &agency.parse().unwrap(),
            &provinces,
        )
        .unwrap()
    }

    #[test]
    fn answers_go_to_the_answered_producer_only() {
        let p = Payload::PersonalIdAssigned(PersonalIdAssigned {
            personal_id: "031326000001".into(),
            ..Default::default()
        });
        let a = audience_of(&p, Some("registry-hp")).unwrap();
        assert!(matches(Some(&a), Some(&scope("registry-hp", &[]))));
        // Not to the registry of the child's province, nor to a prefix of the agency's id.
        assert!(!matches(Some(&a), Some(&scope("registry-hn", &["031"]))));
        assert!(!matches(Some(&a), Some(&scope("registry", &[]))));
        assert!(!matches(Some(&a), Some(&scope("registry-hp-2", &[]))));
        // Any other answer reaches the answered producer and the citizen's registries.
        let died = Payload::DeathRecorded(DeathRecorded {
            personal_id: "001095000001".into(),
            ..Default::default()
        });
        let a = audience_of(&died, Some("registry-hp")).unwrap();
        assert_eq!(a, " a:registry-hp p:001 ");
        assert!(matches(Some(&a), Some(&scope("registry-hp", &["031"]))));
        assert!(matches(Some(&a), Some(&scope("registry-hn", &["001"]))));
        assert!(!matches(Some(&a), Some(&scope("registry-dn", &["048"]))));
    }

    #[test]
    fn other_population_events_go_by_the_provinces_of_ids_and_residence() {
        let moved = Payload::ResidenceChanged(ResidenceChanged {
            personal_id: "001195000007".into(),
            new_residence: Some(Residence {
                province_code: "031".into(),
                address: String::new(),
            }),
            effective_date: String::new(),
        });
        let a = audience_of(&moved, None).unwrap();
        assert_eq!(a, " p:001 p:031 ");
        assert!(matches(Some(&a), Some(&scope("registry-hp", &["031"]))));
        assert!(matches(Some(&a), Some(&scope("registry-hn", &["001"]))));
        assert!(!matches(Some(&a), Some(&scope("registry-dn", &["048"]))));
        let died = Payload::DeathRecorded(DeathRecorded {
            personal_id: "031095000001".into(),
            ..Default::default()
        });
        let a = audience_of(&died, None).unwrap();
        assert!(!matches(Some(&a), Some(&scope("registry-hn", &["001"]))));
        // Civil-status events go to every consumer of their topic.
        let birth = Payload::Birth(Default::default());
        assert_eq!(audience_of(&birth, Some("x")), None);
        assert!(matches(None, None));
        // A population event without an audience reaches nobody.
        assert!(!matches(None, Some(&scope("registry-hp", &["031"]))));
        assert_eq!(
            scope_of(
                CIVIL_STATUS,
                Role::PopulationDb,
                &"population".parse().unwrap(),
                &[]
            ),
            None
        );
        // The social-insurance agency reads only the civil-status events addressed to it.
        let si = scope_of(
            CIVIL_STATUS,
            Role::SocialInsurance,
            &"social-insurance".parse().unwrap(),
            &[],
        );
        assert!(!matches(None, si.as_deref()));
        assert!(matches(Some(TO_SOCIAL_INSURANCE), si.as_deref()));
        assert!(
            matches(Some(TO_SOCIAL_INSURANCE), None),
            "the population database too"
        );
        // Social-insurance answers go to the registry asked, only.
        let card = Payload::HealthInsuranceCardIssued(Default::default());
        let a = audience_of(&card, Some("registry-hp")).unwrap();
        let hp = scope_of(
            SOCIAL_INSURANCE,
            Role::CivilRegistry,
            &"registry-hp".parse().unwrap(),
            &["031".parse().unwrap()],
        );
        assert!(matches(Some(&a), hp.as_deref()));
        assert!(!matches(Some(&a), Some(&scope("registry-hn", &["031"]))));
    }

    #[test]
    fn retention_holders_are_the_declared_groups_of_each_topics_consumers() {
        use crate::policy::Agency;
        let mut policy = Policy::default();
        let with = |role, provinces: &[&str], groups: &[&str]| Agency {
            provinces: provinces.iter().map(|p| p.parse().unwrap()).collect(),
            consumer_groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            ..Agency::of_role(role)
        };
        policy.agencies.insert(
            "registry-hp".parse().unwrap(),
            with(Role::CivilRegistry, &["031"], &["registry-hp", "archive"]),
        );
        policy.agencies.insert(
            "population".parse().unwrap(),
            with(Role::PopulationDb, &[], &["population-db"]),
        );
        policy
            .agencies
            .insert("auditor".parse().unwrap(), with(Role::Auditor, &[], &["x"]));
        let got: Vec<(String, String, Option<Vec<String>>)> = holders(&policy)
            .into_iter()
            .map(|h| (h.topic.to_owned(), h.group.to_string(), h.scope))
            .collect();
        let hp_scope = Some(vec![" a:registry-hp ".to_owned(), " p:031 ".to_owned()]);
        assert_eq!(
            got,
            [
                (
                    "civil-status".into(),
                    "population/population-db".into(),
                    None
                ),
                (
                    "population".into(),
                    "registry-hp/registry-hp".into(),
                    hp_scope.clone()
                ),
                ("population".into(), "registry-hp/archive".into(), hp_scope),
                (
                    "social-insurance".into(),
                    "registry-hp/registry-hp".into(),
                    Some(vec![" a:registry-hp ".to_owned()])
                ),
                (
                    "social-insurance".into(),
                    "registry-hp/archive".into(),
                    Some(vec![" a:registry-hp ".to_owned()])
                ),
            ]
        );
    }

    proptest! {
        /// A registry receives a death exactly when the dead citizen's ID province is one of
        /// its provinces.
        #[test]
        fn a_death_reaches_exactly_the_registries_of_its_province(
            id_province in prop::sample::select(vec!["001", "031", "048", "079", "092"]),
            mine in prop::collection::vec(prop::sample::select(vec!["001", "031", "048", "079", "092"]), 0..4),
        ) {
            let died = Payload::DeathRecorded(DeathRecorded {
                personal_id: format!("{id_province}095000001"),
                ..Default::default()
            });
            let a = audience_of(&died, None).unwrap();
            let got = matches(Some(&a), Some(&scope("registry-x", &mine)));
            prop_assert_eq!(got, mine.contains(&id_province));
        }
    }
}
