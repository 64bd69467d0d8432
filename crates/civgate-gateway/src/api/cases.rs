//! `Exchange.ListOpenRequests`: who waits on whom, since when, and who is late. Who may list
//! what is [`listing_scope`] (a civil registry its own requests, an auditor everyone's),
//! decided before the journal is read; the request's filters are checked into a
//! [`RequestFilter`] by [`filter_of`].

use tonic::Status;
use tonic_types::FieldViolation;

use super::invalid;
use crate::{
    domain::Role,
    exchange::{
        cases::{ANSWER_KINDS, REQUEST_KINDS},
        journal::{OpenRequest, RequestFilter},
        validate::CIVIL_STATUS,
    },
    pb::v1 as pb,
    policy::{Policy, Principal},
};

/// Most requests one page lists, and the default.
pub const MAX_PAGE: u32 = 1_000;
const DEFAULT_PAGE: u32 = 100;

/// Whose requests `who` may list: `Some(agency)` — its own only (a civil registry), `None` —
/// everyone's (an auditor). Anyone else is refused (the method table lets no one else call).
pub fn listing_scope(who: &Principal) -> Result<Option<String>, Status> {
    match who.role {
        Role::CivilRegistry => Ok(Some(who.agency.as_str().to_owned())),
        Role::Auditor => Ok(None),
        Role::PopulationDb | Role::SocialInsurance => Err(Status::permission_denied(
            "requests with deadlines are listed by the registries that make them and by auditors",
        )),
    }
}

/// The topic an agency's answers are published on (the requests it is awaited for).
fn answers_on(role: Role) -> Option<&'static str> {
    crate::policy::writes(role).filter(|t| *t != CIVIL_STATUS)
}

/// The agencies whose role answers requests awaiting `topic`'s producers.
pub fn awaited_agencies(policy: &Policy, topic: &str) -> Vec<String> {
    policy
        .agencies
        .iter()
        .filter(|(_, a)| answers_on(a.role) == Some(topic))
        .map(|(id, _)| id.as_str().to_owned())
        .collect()
}

/// The journal filter of a `ListOpenRequests`: the caller's scope, then each field checked
/// (every bad one named at once).
pub fn filter_of(
    r: &pb::ListOpenRequestsRequest,
    producer: Option<String>,
    policy: &Policy,
    now_ms: i64,
) -> Result<RequestFilter, Status> {
    let mut v = Vec::new();
    let awaiting = if r.awaiting_agency_id.is_empty() {
        None
    } else {
        let topic = r
            .awaiting_agency_id
            .parse::<crate::domain::AgencyId>()
            .ok()
            .and_then(|id| policy.agencies.get(&id))
            .and_then(|a| answers_on(a.role));
        if topic.is_none() {
            v.push(FieldViolation::new(
                "awaiting_agency_id",
                "names no configured agency whose role answers requests",
            ));
        }
        topic.map(str::to_owned)
    };
    if !r.case_reference.is_empty()
        && let Err(e) = crate::domain::check_case_reference(&r.case_reference)
    {
        v.push(FieldViolation::new("case_reference", e));
    }
    if !r.kind.is_empty() && !REQUEST_KINDS.contains(&r.kind.as_str()) {
        v.push(FieldViolation::new(
            "kind",
            format!("one of {}", REQUEST_KINDS.join(", ")),
        ));
    }
    if r.page_size > MAX_PAGE {
        v.push(FieldViolation::new(
            "page_size",
            format!("at most {MAX_PAGE} (0: {DEFAULT_PAGE})"),
        ));
    }
    let after = if r.page_token.is_empty() {
        None
    } else {
        let parsed = r.page_token.split_once('.').filter(|(e, a)| {
            !e.is_empty()
                && e.len() <= 64
                && e.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && ANSWER_KINDS.contains(a)
        });
        if parsed.is_none() {
            v.push(FieldViolation::new(
                "page_token",
                "not a next_page_token of ListOpenRequests (<event_id>.<answer kind>)",
            ));
        }
        parsed.map(|(e, a)| (e.to_owned(), a.to_owned()))
    };
    if !v.is_empty() {
        return Err(invalid(v));
    }
    let case = (!r.case_reference.is_empty()).then(|| r.case_reference.clone());
    Ok(RequestFilter {
        producer,
        awaiting,
        // A case's view shows its answered steps too.
        open_only: !r.include_answered && case.is_none(),
        overdue_at: r.overdue_only.then_some(now_ms),
        case_reference: case,
        kind: (!r.kind.is_empty()).then(|| r.kind.clone()),
        after,
        limit: if r.page_size == 0 {
            DEFAULT_PAGE
        } else {
            r.page_size
        },
    })
}

/// One listed request, as the API shows it.
pub fn to_pb(r: OpenRequest, policy: &Policy, now_ms: i64) -> pb::OpenRequest {
    pb::OpenRequest {
        overdue: r.is_overdue(now_ms),
        awaiting_agency_ids: awaited_agencies(policy, &r.awaiting),
        event_id: r.event_id,
        kind: r.kind,
        case_reference: r.case_reference,
        flow: r.flow,
        answer_kind: r.answer,
        producer_agency_id: r.producer,
        opened_at_unix_ms: r.opened_at_ms,
        due_at_unix_ms: r.due_at_ms,
        answered_at_unix_ms: r.answered_at_ms.unwrap_or_default(),
        answer_event_id: r.answer_event.unwrap_or_default(),
        answered_by_agency_id: r.answered_by.unwrap_or_default(),
        late: r.late,
    }
}

/// The token of the page after one that ended with `last`.
pub fn next_token(last: &OpenRequest) -> String {
    format!("{}.{}", last.event_id, last.answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        crate::config::Config::parse(
            crate::config::DEFAULT_CONFIG,
            "civgate.toml".into(),
            ".".into(),
        )
        .unwrap()
        .policy()
    }

    fn who(agency: &str) -> Principal {
        let p = policy();
        let id: crate::domain::AgencyId = agency.parse().unwrap();
        let a = &p.agencies[&id];
        Principal {
            agency: id,
            role: a.role,
            fingerprint: crate::domain::CertFingerprint::of_der(b"test"),
            registry_offices: a.registry_offices.clone(),
            provinces: a.provinces.clone(),
            countries: a.countries.clone(),
        }
    }

    /// Each role's view of the requests: its own, everyone's, or none.
    #[test]
    fn who_lists_whose_requests() {
        for (agency, scope) in [
            ("registry-hp", Ok(Some("registry-hp"))),
            ("registry-hn", Ok(Some("registry-hn"))),
            ("auditor", Ok(None)),
            ("population", Err(tonic::Code::PermissionDenied)),
            ("social-insurance", Err(tonic::Code::PermissionDenied)),
        ] {
            let got = listing_scope(&who(agency));
            match scope {
                Ok(want) => assert_eq!(got.unwrap().as_deref(), want, "{agency}"),
                Err(code) => assert_eq!(got.unwrap_err().code(), code, "{agency}"),
            }
        }
    }

    /// A registry's filter keeps its own scope whatever it asks; bad filters are named.
    #[test]
    fn filters_are_checked_and_scoped() {
        let p = policy();
        let f = filter_of(
            &pb::ListOpenRequestsRequest {
                awaiting_agency_id: "population".into(),
                overdue_only: true,
                kind: "birth".into(),
                ..Default::default()
            },
            Some("registry-hp".into()),
            &p,
            42,
        )
        .unwrap();
        assert_eq!(f.producer.as_deref(), Some("registry-hp"));
        assert_eq!(
            f.awaiting.as_deref(),
            Some(crate::exchange::validate::POPULATION)
        );
        assert_eq!(f.overdue_at, Some(42));
        assert!(f.open_only);
        assert_eq!(f.limit, DEFAULT_PAGE);
        let case = filter_of(
            &pb::ListOpenRequestsRequest {
                case_reference: "HP-2026-0001".into(),
                ..Default::default()
            },
            None,
            &p,
            42,
        )
        .unwrap();
        assert!(!case.open_only, "a case shows its answered steps");
        for (req, field) in [
            (
                pb::ListOpenRequestsRequest {
                    awaiting_agency_id: "registry-hn".into(),
                    ..Default::default()
                },
                "awaiting_agency_id",
            ),
            (
                pb::ListOpenRequestsRequest {
                    awaiting_agency_id: "nobody".into(),
                    ..Default::default()
                },
                "awaiting_agency_id",
            ),
            (
                pb::ListOpenRequestsRequest {
                    kind: "personal_id_assigned".into(),
                    ..Default::default()
                },
                "kind",
            ),
            (
                pb::ListOpenRequestsRequest {
                    case_reference: "no spaces".into(),
                    ..Default::default()
                },
                "case_reference",
            ),
            (
                pb::ListOpenRequestsRequest {
                    page_size: MAX_PAGE + 1,
                    ..Default::default()
                },
                "page_size",
            ),
            (
                pb::ListOpenRequestsRequest {
                    page_token: "abc.birth".into(),
                    ..Default::default()
                },
                "page_token",
            ),
        ] {
            let e = filter_of(&req, None, &p, 0).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().starts_with(field), "{field}: {}", e.message());
        }
    }
}
