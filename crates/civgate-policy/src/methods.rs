//! Every method the gateway serves, once: its path, who may call it, and which quota the gate
//! takes for it. Authorization ([`crate::authorize`]), quotas ([`crate::limits::Bucket`]) and
//! metric labels ([`known`]) all read this table; a method not in it is refused.

use civgate_domain::Role;

use crate::limits::Bucket;

/// Who may call a method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Callers {
    /// Every known agency (health checks, reflection).
    Everyone,
    /// Agencies of these roles.
    Roles(&'static [Role]),
}

/// One served method.
#[derive(Clone, Copy, Debug)]
pub struct Method {
    /// The gRPC path, `/package.Service/Method`.
    pub path: &'static str,
    pub callers: Callers,
    /// The quota the gate takes one unit from per call (`None`: none, or the handler takes it
    /// by what the call asks for, see `handler_charges`).
    pub bucket: Option<Bucket>,
    /// The handler takes the call's quota itself (a batch costs the citizens it names).
    pub handler_charges: bool,
}

use Role::{Auditor, CivilRegistry, PopulationDb, SocialInsurance};

const REGISTRY: &[Role] = &[CivilRegistry];
/// One citizen at a time, for a purpose bound to the role: the registries, and the
/// social-insurance agency for the linked procedures' purposes.
const LOOKUPS: &[Role] = &[CivilRegistry, SocialInsurance];
const EXCHANGE: &[Role] = &[CivilRegistry, PopulationDb, SocialInsurance];
const STATUS: &[Role] = &[CivilRegistry, PopulationDb, SocialInsurance, Auditor];
const AUDITORS: &[Role] = &[Auditor];
/// Who lists requests with deadlines: the registries that make them, and auditors.
const CASES: &[Role] = &[CivilRegistry, Auditor];

const fn m(path: &'static str, callers: Callers, bucket: Option<Bucket>) -> Method {
    Method {
        path,
        callers,
        bucket,
        handler_charges: false,
    }
}

/// The table.
pub(crate) const METHODS: &[Method] = &[
    m(
        "/grpc.health.v1.Health/Check",
        Callers::Everyone,
        Some(Bucket::Probes),
    ),
    m(
        "/grpc.health.v1.Health/Watch",
        Callers::Everyone,
        Some(Bucket::Probes),
    ),
    m(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        Callers::Everyone,
        Some(Bucket::Probes),
    ),
    m(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        Callers::Everyone,
        Some(Bucket::Probes),
    ),
    m(
        "/civgate.v1.Citizens/GetCitizen",
        Callers::Roles(LOOKUPS),
        Some(Bucket::Reads),
    ),
    Method {
        path: "/civgate.v1.Citizens/BatchGetCitizens",
        callers: Callers::Roles(REGISTRY),
        bucket: None,
        handler_charges: true,
    },
    m(
        "/civgate.v1.Citizens/VerifyCitizen",
        Callers::Roles(LOOKUPS),
        Some(Bucket::Reads),
    ),
    m(
        "/civgate.v1.Citizens/SearchCitizens",
        Callers::Roles(REGISTRY),
        Some(Bucket::Reads),
    ),
    m(
        "/civgate.v1.Exchange/Publish",
        Callers::Roles(EXCHANGE),
        Some(Bucket::Publishes),
    ),
    m(
        "/civgate.v1.Exchange/Subscribe",
        Callers::Roles(EXCHANGE),
        None,
    ),
    m("/civgate.v1.Exchange/Ack", Callers::Roles(EXCHANGE), None),
    m(
        "/civgate.v1.Exchange/Reject",
        Callers::Roles(EXCHANGE),
        None,
    ),
    m(
        "/civgate.v1.Exchange/GetEventStatus",
        Callers::Roles(STATUS),
        None,
    ),
    m(
        "/civgate.v1.Exchange/ListOpenRequests",
        Callers::Roles(CASES),
        None,
    ),
    m(
        "/civgate.v1.Audit/GetCheckpoint",
        Callers::Roles(AUDITORS),
        None,
    ),
    m(
        "/civgate.v1.Audit/GetEntries",
        Callers::Roles(AUDITORS),
        None,
    ),
    m(
        "/civgate.v1.Audit/GetInclusionProof",
        Callers::Roles(AUDITORS),
        None,
    ),
    m(
        "/civgate.v1.Audit/GetConsistencyProof",
        Callers::Roles(AUDITORS),
        None,
    ),
    m(
        "/civgate.v1.Audit/SearchEntries",
        Callers::Roles(AUDITORS),
        None,
    ),
];

/// The served method at `path`.
pub fn find(path: &str) -> Option<&'static Method> {
    METHODS.iter().find(|m| m.path == path)
}

/// `path` as the table's `&'static str` (a bounded metric label); `None` for anything else.
pub fn known(path: &str) -> Option<&'static str> {
    find(path).map(|m| m.path)
}

impl Method {
    /// May an agency of `role` call it?
    pub fn allows(&self, role: Role) -> bool {
        match self.callers {
            Callers::Everyone => true,
            Callers::Roles(roles) => roles.contains(&role),
        }
    }
}

/// The methods an agency of `role` may call.
pub fn granted(role: Role) -> impl Iterator<Item = &'static str> {
    METHODS
        .iter()
        .filter(move |m| m.allows(role))
        .map(|m| m.path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The grants, spelled out: a change to the table shows here.
    #[test]
    fn each_role_is_granted_exactly_its_methods() {
        let common = [
            "/grpc.health.v1.Health/Check",
            "/grpc.health.v1.Health/Watch",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ];
        let exchange = [
            "/civgate.v1.Exchange/Publish",
            "/civgate.v1.Exchange/Subscribe",
            "/civgate.v1.Exchange/Ack",
            "/civgate.v1.Exchange/Reject",
            "/civgate.v1.Exchange/GetEventStatus",
        ];
        let citizens = [
            "/civgate.v1.Citizens/GetCitizen",
            "/civgate.v1.Citizens/BatchGetCitizens",
            "/civgate.v1.Citizens/VerifyCitizen",
            "/civgate.v1.Citizens/SearchCitizens",
        ];
        let audit = [
            "/civgate.v1.Audit/GetCheckpoint",
            "/civgate.v1.Audit/GetEntries",
            "/civgate.v1.Audit/GetInclusionProof",
            "/civgate.v1.Audit/GetConsistencyProof",
            "/civgate.v1.Audit/SearchEntries",
            "/civgate.v1.Exchange/GetEventStatus",
            "/civgate.v1.Exchange/ListOpenRequests",
        ];
        let set = |v: Vec<&'static str>| v.into_iter().collect::<std::collections::BTreeSet<_>>();
        let cases: [(Role, Vec<&str>); 4] = [
            (
                CivilRegistry,
                [
                    &common[..],
                    &citizens,
                    &exchange,
                    &["/civgate.v1.Exchange/ListOpenRequests"],
                ]
                .concat(),
            ),
            (PopulationDb, [&common[..], &exchange].concat()),
            (
                SocialInsurance,
                [
                    &common[..],
                    &exchange,
                    &[
                        "/civgate.v1.Citizens/GetCitizen",
                        "/civgate.v1.Citizens/VerifyCitizen",
                    ],
                ]
                .concat(),
            ),
            (Auditor, [&common[..], &audit].concat()),
        ];
        for (role, want) in cases {
            assert_eq!(set(granted(role).collect()), set(want), "{role:?}");
        }
    }

    #[test]
    fn paths_are_unique_and_well_formed() {
        let mut seen = std::collections::HashSet::new();
        for m in METHODS {
            assert!(seen.insert(m.path), "{} twice", m.path);
            assert!(
                m.path.starts_with('/') && m.path.matches('/').count() == 2,
                "{}",
                m.path
            );
            // A handler that charges leaves the gate nothing to take.
            assert!(!(m.handler_charges && m.bucket.is_some()), "{}", m.path);
        }
    }
}
