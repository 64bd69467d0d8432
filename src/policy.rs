//! Who may call what. Plain data and plain functions: the tower layer in `gate` only calls
//! [`authorize`]. Default deny: a method not in the role's table is refused.

use std::{collections::BTreeMap, sync::Arc};

use crate::{
    domain::{AgencyId, CertFingerprint, RegistryOfficeCode, Role},
    identity::{IdentityError, PeerIdentity},
};

/// Methods every known agency may call: health checks and reflection.
const COMMON: &[&str] = &[
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
];

const CIVIL_REGISTRY: &[&str] = &[
    "/civgate.v1.Citizens/GetCitizen",
    "/civgate.v1.Citizens/BatchGetCitizens",
    "/civgate.v1.Citizens/VerifyCitizen",
    "/civgate.v1.Citizens/SearchCitizens",
    "/civgate.v1.Exchange/Publish",
    "/civgate.v1.Exchange/Subscribe",
    "/civgate.v1.Exchange/Ack",
    "/civgate.v1.Exchange/Reject",
    "/civgate.v1.Exchange/GetEventStatus",
];

const POPULATION_DB: &[&str] = &[
    "/civgate.v1.Exchange/Publish",
    "/civgate.v1.Exchange/Subscribe",
    "/civgate.v1.Exchange/Ack",
    "/civgate.v1.Exchange/Reject",
    "/civgate.v1.Exchange/GetEventStatus",
];

const AUDITOR: &[&str] = &[
    "/civgate.v1.Audit/GetCheckpoint",
    "/civgate.v1.Audit/GetEntries",
    "/civgate.v1.Audit/GetInclusionProof",
    "/civgate.v1.Audit/GetConsistencyProof",
    "/civgate.v1.Audit/SearchEntries",
    "/civgate.v1.Exchange/GetEventStatus",
];

/// The methods granted to a role, besides [`COMMON`].
pub fn granted(role: Role) -> &'static [&'static str] {
    match role {
        Role::CivilRegistry => CIVIL_REGISTRY,
        Role::PopulationDb => POPULATION_DB,
        Role::Auditor => AUDITOR,
    }
}

/// Every method path the gateway serves, as a `&'static str` (used as a bounded metric label).
pub fn known_method(path: &str) -> Option<&'static str> {
    COMMON
        .iter()
        .chain(CIVIL_REGISTRY)
        .chain(POPULATION_DB)
        .chain(AUDITOR)
        .find(|m| **m == path)
        .copied()
}

/// One configured agency.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Agency {
    pub role: Role,
    /// Registry offices a civil registry may publish for (empty for other roles).
    pub registry_offices: Arc<[RegistryOfficeCode]>,
}

/// The agencies the gateway knows, from the config. Replaced whole on reload.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    pub agencies: BTreeMap<AgencyId, Agency>,
}

/// The caller of one request, after identity and policy: what handlers receive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub agency: AgencyId,
    pub role: Role,
    pub fingerprint: CertFingerprint,
    pub registry_offices: Arc<[RegistryOfficeCode]>,
}

/// Why a call was refused before any work.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    #[error("client certificate does not identify an agency: {0}")]
    NoIdentity(IdentityError),
    #[error("agency {0} is not known to this gateway")]
    UnknownAgency(AgencyId),
    #[error("role {role} may not call {method}")]
    MethodNotGranted { role: Role, method: String },
}

impl Denial {
    pub fn to_status(&self) -> tonic::Status {
        match self {
            Denial::NoIdentity(_) => tonic::Status::unauthenticated(self.to_string()),
            Denial::UnknownAgency(_) | Denial::MethodNotGranted { .. } => {
                tonic::Status::permission_denied(self.to_string())
            }
        }
    }

    /// A short, bounded label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Denial::NoIdentity(_) => "no_identity",
            Denial::UnknownAgency(_) => "unknown_agency",
            Denial::MethodNotGranted { .. } => "method_not_granted",
        }
    }
}

/// May this peer call this method? Returns the [`Principal`] handlers will see.
pub fn authorize(policy: &Policy, peer: &PeerIdentity, method: &str) -> Result<Principal, Denial> {
    let agency_id = peer
        .agency
        .as_ref()
        .map_err(|e| Denial::NoIdentity(e.clone()))?;
    let agency = policy
        .agencies
        .get(agency_id)
        .ok_or_else(|| Denial::UnknownAgency(agency_id.clone()))?;
    let allowed = COMMON.contains(&method) || granted(agency.role).contains(&method);
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
    })
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
            agencies.insert(
                id.parse().unwrap(),
                Agency {
                    role,
                    registry_offices: Arc::from(vec![]),
                },
            );
        }
        Policy { agencies }
    }

    fn peer(agency: &str) -> PeerIdentity {
        PeerIdentity {
            agency: Ok(agency.parse().unwrap()),
            fingerprint: CertFingerprint([7; 32]),
        }
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
    fn certificate_without_agency_is_unauthenticated() {
        let p = PeerIdentity {
            agency: Err(IdentityError::NoAgencyUri),
            fingerprint: CertFingerprint([0; 32]),
        };
        let err = authorize(&policy(), &p, "/grpc.health.v1.Health/Check").unwrap_err();
        assert_eq!(err.to_status().code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn every_role_may_check_health_and_reflect() {
        for a in ["registry-hp", "population", "auditor"] {
            for m in COMMON {
                assert!(authorize(&policy(), &peer(a), m).is_ok(), "{a} {m}");
            }
        }
    }

    #[test]
    fn every_granted_method_is_a_known_method() {
        for role in [Role::CivilRegistry, Role::PopulationDb, Role::Auditor] {
            for m in granted(role) {
                assert_eq!(known_method(m), Some(*m));
            }
        }
    }
}
