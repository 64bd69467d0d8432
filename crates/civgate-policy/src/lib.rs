//! Who may call what. Plain data and plain functions: the tower layer in `gate` only calls
//! [`authorize`]. Default deny: a method not in the role's table is refused.

use std::{collections::BTreeMap, sync::Arc};

pub mod guesses;
pub mod identity;
pub mod limits;
pub mod methods;
pub mod purposes;

pub use methods::{granted, known as known_method};

use civgate_domain::{
    AgencyId, CertFingerprint, CountryCode, ProvinceCode, RegistryOfficeCode, Role,
    topics::{CIVIL_STATUS, POPULATION, SOCIAL_INSURANCE},
};
use identity::{IdentityError, PeerIdentity};

/// Which roles consume which topic (`Subscribe`, `Ack`, `Reject`): each topic is read by the
/// other side only — civil-status by the population database and (what flows address to it)
/// the social-insurance agency; population and social-insurance events by civil registries.
/// A topic not here is read by nobody. The first reader of a topic is the one earlier
/// releases had (it owns their unrecorded consumer groups).
pub(crate) const TOPIC_READERS: &[(&str, Role)] = &[
    (CIVIL_STATUS, Role::PopulationDb),
    (CIVIL_STATUS, Role::SocialInsurance),
    (POPULATION, Role::CivilRegistry),
    (SOCIAL_INSURANCE, Role::CivilRegistry),
];

/// Which role publishes on which topic.
pub const TOPIC_WRITERS: &[(Role, &str)] = &[
    (Role::CivilRegistry, CIVIL_STATUS),
    (Role::PopulationDb, POPULATION),
    (Role::SocialInsurance, SOCIAL_INSURANCE),
];

/// The topic an agency of `role` publishes on, if any.
pub fn writes(role: Role) -> Option<&'static str> {
    TOPIC_WRITERS
        .iter()
        .find(|(r, _)| *r == role)
        .map(|(_, t)| *t)
}

/// One configured agency.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Agency {
    pub role: Role,
    /// Registry offices a civil registry may publish for (empty for other roles).
    pub registry_offices: Arc<[RegistryOfficeCode]>,
    /// A civil registry's jurisdiction (empty for other roles).
    pub provinces: Arc<[ProvinceCode]>,
    /// Countries whose representative missions' registrations a civil registry publishes
    /// (empty: it registers in Việt Nam only).
    pub countries: Arc<[CountryCode]>,
    /// Consumer group names the config assigns to this agency (for stores of an earlier
    /// release, whose groups had no recorded owner).
    pub consumer_groups: Arc<[String]>,
}

impl Agency {
    /// An agency of `role` with no offices, provinces or declared groups.
    pub fn of_role(role: Role) -> Self {
        Self {
            role,
            registry_offices: Arc::from([]),
            provinces: Arc::from([]),
            countries: Arc::from([]),
            consumer_groups: Arc::from([]),
        }
    }
}

/// The agencies the gateway knows, from the config, and the certificates its CRLs revoke.
/// Replaced whole on reload.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    pub agencies: BTreeMap<AgencyId, Agency>,
    /// Certificates the configured CRLs revoke: a connection made before a reload that revokes
    /// its certificate stays open, but none of its further calls is served.
    pub revoked: Arc<std::collections::HashSet<identity::CertKey>>,
}

/// The caller of one request, after identity and policy: what handlers receive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub agency: AgencyId,
    pub role: Role,
    pub fingerprint: CertFingerprint,
    pub registry_offices: Arc<[RegistryOfficeCode]>,
    pub provinces: Arc<[ProvinceCode]>,
    pub countries: Arc<[CountryCode]>,
}

/// Why a call was refused before any work.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    #[error("client certificate does not identify an agency: {0}")]
    NoIdentity(IdentityError),
    #[error("this connection's client certificate has been revoked; reconnect with a valid one")]
    CertificateRevoked,
    #[error("this connection's client certificate has expired; reconnect with a valid one")]
    CertificateExpired,
    #[error("agency {0} is not known to this gateway")]
    UnknownAgency(AgencyId),
    #[error("role {role} may not call {method}")]
    MethodNotGranted { role: Role, method: String },
    #[error("role {role} may not consume topic {topic}: it is read by {readers}")]
    TopicNotGranted {
        role: Role,
        topic: String,
        readers: &'static str,
    },
}

impl Denial {
    pub fn to_status(&self) -> tonic::Status {
        match self {
            Denial::NoIdentity(_) | Denial::CertificateRevoked | Denial::CertificateExpired => {
                tonic::Status::unauthenticated(self.to_string())
            }
            Denial::UnknownAgency(_)
            | Denial::MethodNotGranted { .. }
            | Denial::TopicNotGranted { .. } => tonic::Status::permission_denied(self.to_string()),
        }
    }

    /// A short, bounded label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Denial::NoIdentity(_) => "no_identity",
            Denial::CertificateRevoked => "certificate_revoked",
            Denial::CertificateExpired => "certificate_expired",
            Denial::UnknownAgency(_) => "unknown_agency",
            Denial::MethodNotGranted { .. } => "method_not_granted",
            Denial::TopicNotGranted { .. } => "topic_not_granted",
        }
    }
}

/// Is the certificate this connection began with still good at `now` (Unix seconds)? The
/// handshake checked it; a connection can outlive a reload that revokes it, or its expiry.
pub fn standing(policy: &Policy, peer: &PeerIdentity, now: i64) -> Result<(), Denial> {
    if peer
        .cert
        .as_ref()
        .is_some_and(|k| policy.revoked.contains(k))
    {
        return Err(Denial::CertificateRevoked);
    }
    if peer.not_after.is_some_and(|t| t < now) {
        return Err(Denial::CertificateExpired);
    }
    Ok(())
}

/// Now, in Unix seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// May this peer call this method? Returns the [`Principal`] handlers will see.
pub fn authorize(policy: &Policy, peer: &PeerIdentity, method: &str) -> Result<Principal, Denial> {
    standing(policy, peer, unix_now())?;
    let agency_id = peer
        .agency
        .as_ref()
        .map_err(|e| Denial::NoIdentity(e.clone()))?;
    let agency = policy
        .agencies
        .get(agency_id)
        .ok_or_else(|| Denial::UnknownAgency(agency_id.clone()))?;
    let allowed = methods::find(method).is_some_and(|m| m.allows(agency.role));
    if !allowed {
        return Err(Denial::MethodNotGranted {
            role: agency.role,
            method: method.to_owned(),
        });
    }
    Ok(Principal {
        agency: agency_id.clone(),
        role: agency.role,
        fingerprint: peer.fingerprint,
        registry_offices: agency.registry_offices.clone(),
        provinces: agency.provinces.clone(),
        countries: agency.countries.clone(),
    })
}

/// The role that consumes `topic`, if any.
pub(crate) fn reader_of(topic: &str) -> Option<Role> {
    TOPIC_READERS
        .iter()
        .find(|(t, _)| *t == topic)
        .map(|(_, r)| *r)
}

/// May this role consume (subscribe to, acknowledge, reject events of) this topic? Checked
/// before any work on a `Subscribe`, `Ack` or `Reject` whose topic is well formed.
pub fn may_consume(role: Role, topic: &str) -> Result<(), Denial> {
    if TOPIC_READERS.iter().any(|(t, r)| *t == topic && *r == role) {
        return Ok(());
    }
    Err(Denial::TopicNotGranted {
        role,
        topic: topic.to_owned(),
        readers: match topic {
            CIVIL_STATUS => "population_db and social_insurance agencies",
            POPULATION | SOCIAL_INSURANCE => "civil_registry agencies",
            _ => "nobody",
        },
    })
}

/// A consumer group name: 1-64 characters of A-Z, a-z, 0-9, '-', '_', '.'. A group is
/// identified by (agency, name): the agency is the caller's, from its certificate.
pub fn is_group_name(group: &str) -> bool {
    !group.is_empty()
        && group.len() <= 64
        && group
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// The agency a consumer group of `topic` named `group`, stored by an earlier release without
/// an owner, belongs to: the one agency that consumes the topic and lists the group in its
/// `consumer_groups`. Otherwise what the operator must add to the config.
pub fn owner_of_legacy_group(
    policy: &Policy,
    topic: &str,
    group: &str,
) -> Result<AgencyId, String> {
    let reader = reader_of(topic);
    let owners: Vec<&AgencyId> = policy
        .agencies
        .iter()
        .filter(|(_, a)| Some(a.role) == reader && a.consumer_groups.iter().any(|g| g == group))
        .map(|(id, _)| id)
        .collect();
    let role = reader.map_or_else(|| "nobody".to_owned(), |r| r.to_string());
    match owners.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(format!(
            "consumer group {group:?} of topic {topic} was created by an earlier release, which did not record its owner, and no {role} agency lists it: add consumer_groups = [\"{group}\"] to the [agencies.<id>] section of the {role} agency that uses it"
        )),
        many => Err(format!(
            "consumer group {group:?} of topic {topic} was created by an earlier release, which did not record its owner, and several {role} agencies list it ({}): keep it in the consumer_groups of the one that uses it",
            many.iter()
                .map(|a| a.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        let mut agencies = BTreeMap::new();
        for (id, role) in [
            ("registry-hp", Role::CivilRegistry),
            ("population", Role::PopulationDb),
            ("auditor", Role::Auditor),
        ] {
            agencies.insert(id.parse().unwrap(), Agency::of_role(role));
        }
        Policy {
            agencies,
            ..Default::default()
        }
    }

    fn peer(agency: &str) -> PeerIdentity {
        PeerIdentity::of(Ok(agency.parse().unwrap()), CertFingerprint([7; 32]))
    }

    #[test]
    fn civil_registry_may_look_up_citizens() {
        let p = authorize(
            &policy(),
            &peer("registry-hp"),
            "/civgate.v1.Citizens/GetCitizen",
        )
        .unwrap();
        assert_eq!(p.role, Role::CivilRegistry);
        assert_eq!(p.agency.as_str(), "registry-hp");
        assert_eq!(p.fingerprint, CertFingerprint([7; 32]));
    }

    #[test]
    fn auditor_may_not_look_up_citizens() {
        let err = authorize(
            &policy(),
            &peer("auditor"),
            "/civgate.v1.Citizens/GetCitizen",
        )
        .unwrap_err();
        assert!(matches!(
            err,
            Denial::MethodNotGranted {
                role: Role::Auditor,
                ..
            }
        ));
        assert_eq!(err.to_status().code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn population_db_may_not_read_the_audit_log_or_citizens() {
        for m in [
            "/civgate.v1.Audit/GetEntries",
            "/civgate.v1.Citizens/SearchCitizens",
        ] {
            assert!(authorize(&policy(), &peer("population"), m).is_err(), "{m}");
        }
    }

    #[test]
    fn unknown_agency_is_denied_even_health() {
        let err = authorize(
            &policy(),
            &peer("unknown-agency"),
            "/grpc.health.v1.Health/Check",
        )
        .unwrap_err();
        assert_eq!(
            err,
            Denial::UnknownAgency("unknown-agency".parse().unwrap())
        );
        assert_eq!(err.to_status().code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn unknown_method_is_denied_by_default() {
        let err = authorize(
            &policy(),
            &peer("registry-hp"),
            "/civgate.v1.Citizens/DropTable",
        )
        .unwrap_err();
        assert_eq!(err.reason(), "method_not_granted");
        assert_eq!(known_method("/civgate.v1.Citizens/DropTable"), None);
    }

    #[test]
    fn a_connection_outliving_its_certificate_is_refused() {
        use identity::CertKey;
        let key = CertKey::new(b"issuer", &[0, 1, 2]);
        let mut p = policy();
        p.revoked = Arc::new([CertKey::new(b"issuer", &[1, 2])].into_iter().collect());
        let peer = |cert: Option<CertKey>, not_after: Option<i64>| PeerIdentity {
            cert,
            not_after,
            ..peer("registry-hp")
        };
        let now = 1_000;
        for (who, want) in [
            (
                peer(Some(key.clone()), None),
                Err(Denial::CertificateRevoked),
            ),
            (peer(Some(CertKey::new(b"other", &[1, 2])), None), Ok(())),
            (peer(Some(CertKey::new(b"issuer", &[1, 3])), None), Ok(())),
            (peer(None, Some(now - 1)), Err(Denial::CertificateExpired)),
            (peer(None, Some(now)), Ok(())),
            (peer(None, None), Ok(())),
        ] {
            assert_eq!(standing(&p, &who, now), want, "{who:?}");
        }
        let err =
            authorize(&p, &peer(Some(key), None), "/grpc.health.v1.Health/Check").unwrap_err();
        assert_eq!(err.to_status().code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn certificate_without_agency_is_unauthenticated() {
        let p = PeerIdentity::of(Err(IdentityError::NoAgencyUri), CertFingerprint([0; 32]));
        let err = authorize(&policy(), &p, "/grpc.health.v1.Health/Check").unwrap_err();
        assert_eq!(err.to_status().code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn every_role_may_check_health_and_reflect() {
        for a in ["registry-hp", "population", "auditor"] {
            for m in [
                "/grpc.health.v1.Health/Check",
                "/grpc.health.v1.Health/Watch",
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            ] {
                assert!(authorize(&policy(), &peer(a), m).is_ok(), "{a} {m}");
            }
        }
    }

    /// Every (role, topic) pair: only the other side consumes a topic; unknown topics nobody.
    #[test]
    fn each_role_publishes_on_its_own_topic_only() {
        for (role, topic) in [
            (Role::CivilRegistry, Some("civil-status")),
            (Role::PopulationDb, Some("population")),
            (Role::SocialInsurance, Some("social-insurance")),
            (Role::Auditor, None),
        ] {
            assert_eq!(writes(role), topic, "{role}");
        }
    }

    #[test]
    fn each_topic_is_consumed_by_the_other_side() {
        let table = [
            (Role::CivilRegistry, "civil-status", false),
            (Role::CivilRegistry, "population", true),
            (Role::PopulationDb, "civil-status", true),
            (Role::PopulationDb, "population", false),
            (Role::Auditor, "civil-status", false),
            (Role::Auditor, "population", false),
            (Role::PopulationDb, "other", false),
            // The social-insurance agency reads civil-status (what is addressed to it) and
            // nothing else; its own topic is read by the registries.
            (Role::SocialInsurance, "civil-status", true),
            (Role::SocialInsurance, "population", false),
            (Role::SocialInsurance, "social-insurance", false),
            (Role::CivilRegistry, "social-insurance", true),
            (Role::PopulationDb, "social-insurance", false),
            (Role::Auditor, "social-insurance", false),
        ];
        for (role, topic, ok) in table {
            let got = may_consume(role, topic);
            assert_eq!(got.is_ok(), ok, "{role} {topic}");
            if let Err(e) = got {
                assert_eq!(e.to_status().code(), tonic::Code::PermissionDenied);
                assert_eq!(e.reason(), "topic_not_granted");
            }
        }
    }

    #[test]
    fn legacy_groups_go_to_the_one_consuming_agency_that_lists_them() {
        let mut p = policy();
        let with = |role, groups: &[&str]| Agency {
            consumer_groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            ..Agency::of_role(role)
        };
        p.agencies.insert(
            "population".parse().unwrap(),
            with(Role::PopulationDb, &["population-db", "shared"]),
        );
        p.agencies.insert(
            "registry-hp".parse().unwrap(),
            with(
                Role::CivilRegistry,
                &["registry-hp", "shared", "population-db"],
            ),
        );
        p.agencies.insert(
            "registry-hn".parse().unwrap(),
            with(Role::CivilRegistry, &["shared"]),
        );
        let owner = |t, g| owner_of_legacy_group(&p, t, g);
        assert_eq!(
            owner("civil-status", "population-db").unwrap().as_str(),
            "population"
        );
        assert_eq!(
            owner("population", "registry-hp").unwrap().as_str(),
            "registry-hp"
        );
        // Only a consumer of the topic can own its group.
        assert!(owner("population", "population-db").unwrap().as_str() == "registry-hp");
        assert_eq!(
            owner("civil-status", "shared").unwrap().as_str(),
            "population"
        );
        let err = owner("population", "shared").unwrap_err();
        assert!(err.contains("registry-hn, registry-hp"), "{err}");
        let err = owner("civil-status", "unknown").unwrap_err();
        assert!(err.contains("consumer_groups = [\"unknown\"]"), "{err}");
    }

    #[test]
    fn group_names() {
        for ok in ["population-db", "a", "A.b_c-1", &"x".repeat(64)] {
            assert!(is_group_name(ok), "{ok}");
        }
        for bad in ["", "a b", "a/b", "a:b", &"x".repeat(65), "é"] {
            assert!(!is_group_name(bad), "{bad}");
        }
    }

    #[test]
    fn every_granted_method_is_a_known_method() {
        for role in [Role::CivilRegistry, Role::PopulationDb, Role::Auditor] {
            for m in granted(role) {
                assert_eq!(known_method(m), Some(m));
            }
        }
    }
}
