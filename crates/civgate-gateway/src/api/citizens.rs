//! `civgate.v1.Citizens`: look-ups, verification and search, forwarded to the population
//! directory and limited to the fields the declared purpose allows.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
    time::Instant,
};

use tonic::{Code, Request, Response, Status};
use tonic_types::FieldViolation;

use crate::{
    audit::FactsSlot,
    convert::{mask, present_fields, sex_from_pb},
    domain::{CitizenField, FullName, PersonalId, PurposeCode, fold, parse_date, personal_id},
    limits::Harvest,
    pb::upstream::v1::GetCitizensResponse,
    pb::v1::{
        AttributeMatch, BatchError, BatchGetCitizensRequest, BatchGetCitizensResponse,
        BatchGetCitizensResult, Citizen, GetCitizenRequest, GetCitizenResponse, MaritalStatus,
        Match, SearchCitizensRequest, SearchCitizensResponse, Sex, VerifyCitizenRequest,
        VerifyCitizenResponse, batch_get_citizens_result, citizens_server::Citizens,
    },
    policy::{
        Principal,
        purposes::{CitizensMethod, purpose_permits},
    },
    state::Shared,
    telemetry,
    upstream::{Upstream, decode},
};

use super::{invalid, principal, wire};

/// Largest `BatchGetCitizens` request.
pub const MAX_BATCH: usize = 100;

/// What `SearchCitizens` returns at most: enough to tell people apart, nothing more.
const SEARCH_FIELDS: [CitizenField; 3] = [
    CitizenField::FullName,
    CitizenField::DateOfBirth,
    CitizenField::Sex,
];

#[derive(Clone)]
pub(crate) struct CitizensService {
    state: Shared,
    upstream: Option<Arc<Upstream>>,
    /// Non-matching verifications per agency and citizen (kept across reloads).
    failed: Arc<crate::policy::guesses::FailedVerifications>,
}

impl CitizensService {
    pub fn new(state: Shared, upstream: Option<Arc<Upstream>>) -> Self {
        Self {
            state,
            upstream,
            failed: Arc::default(),
        }
    }

    fn upstream(&self) -> Result<&Upstream, Status> {
        self.upstream.as_deref().ok_or_else(|| {
            Status::unavailable("no population directory is configured ([upstream])")
        })
    }

    /// May `who` declare purpose `code` for `method`? Checked first, before any work: a purpose
    /// is bound to methods and roles (`[purposes.X] methods`, `roles`). An unknown or missing
    /// purpose passes here and is refused as invalid by [`Self::purpose`]. A refusal's record
    /// names the valid personal IDs among `ids` (whom the read was about).
    fn bound<'a, T>(
        &self,
        req: &Request<T>,
        who: &Principal,
        method: CitizensMethod,
        code: &str,
        ids: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), Status> {
        let snapshot = self.state.load();
        let Some((code, p)) = code
            .parse::<PurposeCode>()
            .ok()
            .and_then(|c| snapshot.config.file.purposes.get_key_value(&c))
        else {
            return Ok(());
        };
        purpose_permits(code.as_str(), p.binding(), method, who.role).map_err(|denial| {
            let subjects: BTreeSet<String> = ids
                .into_iter()
                .filter_map(|s| PersonalId::parse(s).ok())
                .map(|id| id.to_string())
                .collect();
            FactsSlot::of(req).update(|f| {
                f.purpose = code.as_str().to_owned();
                f.refusal = denial.reason();
                f.subjects = subjects.into_iter().collect();
            });
            Status::permission_denied(denial.to_string())
        })
    }

    /// The fields a purpose releases (for `VerifyCitizen`: may check), or the violation
    /// explaining why the purpose is refused — or why the case reference is (malformed, or
    /// missing where the purpose requires one).
    fn purpose(
        &self,
        method: CitizensMethod,
        code: &str,
        case: &str,
    ) -> Result<(PurposeCode, BTreeSet<CitizenField>), FieldViolation> {
        let (code, fields) = self.purpose_fields(method, code)?;
        crate::domain::check_case_reference(case)
            .map_err(|e| FieldViolation::new("case_reference", e))?;
        let snapshot = self.state.load();
        if case.is_empty()
            && snapshot
                .config
                .file
                .purposes
                .get(&code)
                .is_some_and(|p| p.requires_case_reference)
        {
            return Err(FieldViolation::new(
                "case_reference",
                format!(
                    "required for purpose {}: the dossier code of the case this read serves",
                    code.as_str()
                ),
            ));
        }
        Ok((code, fields))
    }

    fn purpose_fields(
        &self,
        method: CitizensMethod,
        code: &str,
    ) -> Result<(PurposeCode, BTreeSet<CitizenField>), FieldViolation> {
        if code.is_empty() {
            return Err(FieldViolation::new(
                "purpose",
                "required: the legal basis of this read",
            ));
        }
        let snapshot = self.state.load();
        let purposes = &snapshot.config.file.purposes;
        let parsed = code.parse::<PurposeCode>().ok();
        match parsed.as_ref().and_then(|p| purposes.get(p)) {
            Some(p) => Ok((
                parsed.unwrap_or_else(|| unreachable!()),
                if method.releases_values() {
                    p.fields.iter().copied().collect()
                } else {
                    p.verifiable()
                },
            )),
            None => Err(FieldViolation::new(
                "purpose",
                format!(
                    "unknown purpose {code:?}; known: {}",
                    purposes
                        .keys()
                        .map(PurposeCode::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }
}

impl CitizensService {
    /// Takes `n` more citizens from the agency's read quota.
    /// Across replicas when they share limits (this replica's own when Redis cannot say).
    async fn take_reads(&self, who: &Principal, n: std::num::NonZeroU32) -> Result<(), Status> {
        use crate::limits::{Bucket, Decision};
        let snapshot = self.state.load_full();
        let agency = who.agency.as_str();
        let q = &snapshot.config.file.quotas;
        let shared = match &snapshot.shared {
            Some(shared) => shared
                .quota(
                    &who.agency,
                    Bucket::Reads,
                    q.rate(&who.agency, who.role, Bucket::Reads),
                    n.get(),
                    q.shadow,
                )
                .await
                .ok(),
            None => None,
        };
        let decision =
            shared.unwrap_or_else(|| snapshot.quotas.check_n(&who.agency, Bucket::Reads, n));
        match decision {
            Decision::Allow => Ok(()),
            Decision::WouldRefuse { retry_after_secs } => {
                telemetry::rate_limited(agency, Bucket::Reads.as_str(), true);
                tracing::info!(
                    agency,
                    citizens = n.get(),
                    retry_after_secs,
                    "shadow mode: would refuse a batch (over quota)"
                );
                Ok(())
            }
            Decision::Refuse { retry_after_secs } => {
                telemetry::rate_limited(agency, Bucket::Reads.as_str(), false);
                Err(crate::gate::rate_limited(
                    &who.agency,
                    "citizens read",
                    retry_after_secs,
                ))
            }
        }
    }

    /// The harvesting guard: may this agency read these citizens now?
    /// Across replicas when they share limits (this replica's own window when Redis cannot
    /// say).
    async fn harvest(&self, who: &Principal, ids: &[String]) -> Result<(), Status> {
        let snapshot = self.state.load_full();
        let s = &snapshot.config.file.harvest;
        let agency = who.agency.as_str();
        let shared = match &snapshot.shared {
            Some(shared) => shared.harvest(s, &who.agency, ids, false).await.ok(),
            None => None,
        };
        let outcome =
            shared.unwrap_or_else(|| snapshot.harvest.check(s, &who.agency, ids, Instant::now()));
        match outcome {
            Harvest::Allow { .. } => Ok(()),
            Harvest::Warn { distinct } => {
                tracing::warn!(
                    agency,
                    distinct,
                    window_secs = s.window_secs,
                    "harvesting guard: agency crossed the warning threshold of distinct citizens read"
                );
                telemetry::harvest(agency, "warn");
                Ok(())
            }
            Harvest::WouldDeny { distinct } => {
                tracing::warn!(
                    agency,
                    distinct,
                    "harvesting guard (shadow): would refuse further citizens"
                );
                telemetry::harvest(agency, "would_deny");
                Ok(())
            }
            Harvest::Deny { distinct } => {
                telemetry::harvest(agency, "deny");
                Err(Status::permission_denied(format!(
                    "harvesting guard: agency {agency} has read {distinct} distinct citizens within {} s; reads of further citizens are refused",
                    s.window_secs
                )))
            }
        }
    }
}

/// What the audit record of a refused read says: the purpose declared, when it is a
/// well-formed code (known or not), and the valid personal IDs the read named. Never values.
fn note_refused<'a>(
    facts: &FactsSlot,
    purpose: &str,
    ids: impl IntoIterator<Item = Option<&'a str>>,
) {
    let purpose = purpose
        .parse::<PurposeCode>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let subjects: BTreeSet<String> = ids.into_iter().flatten().map(str::to_owned).collect();
    facts.update(|f| {
        f.purpose = purpose;
        f.subjects = subjects.into_iter().collect();
    });
}

fn parse_id(field: &str, s: &str) -> Result<PersonalId, FieldViolation> {
    PersonalId::parse(s).map_err(|e| FieldViolation::new(field, e.to_string()))
}

fn withheld_names(allowed: &BTreeSet<CitizenField>) -> Vec<&'static str> {
    CitizenField::ALL
        .iter()
        .filter(|f| !allowed.contains(f))
        .map(|f| f.name())
        .collect()
}

fn withheld(allowed: &BTreeSet<CitizenField>) -> Vec<String> {
    withheld_names(allowed)
        .into_iter()
        .map(str::to_owned)
        .collect()
}

#[tonic::async_trait]
impl Citizens for CitizensService {
    async fn get_citizen(
        &self,
        req: Request<GetCitizenRequest>,
    ) -> Result<Response<GetCitizenResponse>, Status> {
        let who = principal(&req)?;
        let facts = FactsSlot::of(&req);
        let deadline = crate::upstream::Caller::of(&req);
        self.bound(
            &req,
            &who,
            CitizensMethod::GetCitizen,
            &req.get_ref().purpose,
            [req.get_ref().personal_id.as_str()],
        )?;
        let r = req.into_inner();
        let id = parse_id("personal_id", &r.personal_id);
        let purpose = self.purpose(CitizensMethod::GetCitizen, &r.purpose, &r.case_reference);
        let (id, (code, fields)) = match (id, purpose) {
            (Ok(i), Ok(p)) => (i, p),
            (i, p) => {
                note_refused(
                    &facts,
                    &r.purpose,
                    [i.as_ref().ok().map(PersonalId::as_str)],
                );
                return Err(invalid([i.err(), p.err()].into_iter().flatten().collect()));
            }
        };
        self.harvest(&who, &[id.to_string()]).await?;
        facts.update(|f| {
            f.purpose = code.as_str().to_owned();
            f.case_reference = r.case_reference.clone();
            f.subjects = vec![id.to_string()];
        });
        let raw = self
            .upstream()?
            .get_encoded(std::slice::from_ref(&id), &fields, &deadline)
            .await?;
        // The directory's bytes, if they hold exactly what may be returned (api/wire.rs).
        let withheld_fields = withheld_names(&fields);
        let allowed = wire::allowed_mask(&fields);
        if let Some((resp, names)) = wire::forward(&raw, id.as_str(), allowed, &withheld_fields) {
            facts.update(|f| f.fields = names.iter().map(|s| (*s).to_owned()).collect());
            return Ok(Response::new(resp));
        }
        let mut found = decode::<GetCitizensResponse>(raw)?.citizens;
        let mut citizen = found
            .pop()
            .filter(|c| c.personal_id == id.as_str())
            .ok_or_else(|| Status::not_found(format!("no citizen with personal ID {id}")))?;
        mask(&mut citizen, &fields);
        facts.update(|f| {
            f.fields = present_fields(&citizen)
                .iter()
                .map(|s| (*s).to_owned())
                .collect()
        });
        Ok(Response::new(GetCitizenResponse {
            citizen: Some(citizen),
            withheld_fields: withheld_fields.into_iter().map(str::to_owned).collect(),
            encoded: None,
        }))
    }

    async fn batch_get_citizens(
        &self,
        req: Request<BatchGetCitizensRequest>,
    ) -> Result<Response<BatchGetCitizensResponse>, Status> {
        let who = principal(&req)?;
        let facts = FactsSlot::of(&req);
        let deadline = crate::upstream::Caller::of(&req);
        self.bound(
            &req,
            &who,
            CitizensMethod::BatchGetCitizens,
            &req.get_ref().purpose,
            req.get_ref().personal_ids.iter().map(String::as_str),
        )?;
        let r = req.into_inner();
        let mut violations = Vec::new();
        let purpose = self
            .purpose(
                CitizensMethod::BatchGetCitizens,
                &r.purpose,
                &r.case_reference,
            )
            .map_err(|v| violations.push(v))
            .ok();
        if r.personal_ids.is_empty() {
            violations.push(FieldViolation::new("personal_ids", "must not be empty"));
        } else if r.personal_ids.len() > MAX_BATCH {
            violations.push(FieldViolation::new(
                "personal_ids",
                format!(
                    "at most {MAX_BATCH} IDs per call, got {}",
                    r.personal_ids.len()
                ),
            ));
        }
        let Some((code, fields)) = purpose.filter(|_| violations.is_empty()) else {
            // A malformed batch costs one unit, like any call.
            self.take_reads(&who, std::num::NonZeroU32::MIN).await?;
            note_refused(
                &facts,
                &r.purpose,
                r.personal_ids
                    .iter()
                    .take(MAX_BATCH)
                    .map(|s| PersonalId::parse(s).ok().map(|_| s.as_str())),
            );
            return Err(invalid(violations));
        };
        let parsed: Vec<_> = r
            .personal_ids
            .iter()
            .enumerate()
            .map(|(i, s)| PersonalId::parse(s).map_err(|e| format!("personal_ids[{i}]: {e}")))
            .collect();
        let valid: Vec<PersonalId> = parsed
            .iter()
            .filter_map(|p| p.as_ref().ok().cloned())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let subjects: Vec<String> = valid.iter().map(ToString::to_string).collect();
        // The quota counts citizens: the gate leaves a batch to this handler, which takes
        // one unit per distinct valid ID (at least one), all or nothing, before anyone is
        // looked up. A refused batch costs nothing, so honouring retry-after works.
        let cost = u32::try_from(valid.len().max(1))
            .ok()
            .and_then(std::num::NonZeroU32::new)
            .unwrap_or(std::num::NonZeroU32::MIN);
        if let Err(status) = self.take_reads(&who, cost).await {
            facts.update(|f| f.refusal = "rate_limited:reads");
            return Err(status);
        }
        self.harvest(&who, &subjects).await?;
        facts.update(|f| {
            f.purpose = code.as_str().to_owned();
            f.case_reference = r.case_reference.clone();
            f.subjects = subjects;
        });
        let mut found: HashMap<String, Citizen> = if valid.is_empty() {
            HashMap::new()
        } else {
            self.upstream()?
                .get(&valid, &fields, &deadline)
                .await?
                .into_iter()
                .map(|c| (c.personal_id.clone(), c))
                .collect()
        };
        let results: Vec<BatchGetCitizensResult> = r
            .personal_ids
            .iter()
            .zip(parsed)
            .map(|(raw, p)| {
                let result = match p {
                    Err(message) => batch_get_citizens_result::Result::Error(BatchError {
                        code: Code::InvalidArgument as i32,
                        message,
                    }),
                    Ok(id) => match found.get(id.as_str()) {
                        Some(c) => {
                            let mut c = c.clone();
                            mask(&mut c, &fields);
                            batch_get_citizens_result::Result::Citizen(c)
                        }
                        None => batch_get_citizens_result::Result::Error(BatchError {
                            code: Code::NotFound as i32,
                            message: format!("no citizen with personal ID {id}"),
                        }),
                    },
                };
                BatchGetCitizensResult {
                    personal_id: raw.clone(),
                    result: Some(result),
                }
            })
            .collect();
        found.clear();
        let returned: BTreeSet<&'static str> = results
            .iter()
            .filter_map(|r: &BatchGetCitizensResult| match &r.result {
                Some(batch_get_citizens_result::Result::Citizen(c)) => Some(present_fields(c)),
                _ => None,
            })
            .flatten()
            .collect();
        facts.update(|f| f.fields = returned.iter().map(|s| (*s).to_owned()).collect());
        Ok(Response::new(BatchGetCitizensResponse {
            results,
            withheld_fields: withheld(&fields),
        }))
    }

    async fn verify_citizen(
        &self,
        req: Request<VerifyCitizenRequest>,
    ) -> Result<Response<VerifyCitizenResponse>, Status> {
        let who = principal(&req)?;
        let facts = FactsSlot::of(&req);
        let deadline = crate::upstream::Caller::of(&req);
        self.bound(
            &req,
            &who,
            CitizensMethod::VerifyCitizen,
            &req.get_ref().purpose,
            [req.get_ref().personal_id.as_str()],
        )?;
        let r = req.into_inner();
        let mut violations = Vec::new();
        let id = parse_id("personal_id", &r.personal_id)
            .map_err(|v| violations.push(v))
            .ok();
        let purpose = self
            .purpose(CitizensMethod::VerifyCitizen, &r.purpose, &r.case_reference)
            .map_err(|v| violations.push(v))
            .ok();
        let allowed = purpose.as_ref().map(|(_, f)| f.clone()).unwrap_or_default();

        // Each claimed attribute: parsed, and within the purpose (a match is disclosure too).
        let mut claims: Vec<Claim> = Vec::new();
        let mut need = BTreeSet::new();
        let mut claim = |field: &'static str,
                         cf: CitizenField,
                         c: Result<Claim, String>,
                         violations: &mut Vec<FieldViolation>| {
            match c {
                Err(e) => violations.push(FieldViolation::new(field, e)),
                Ok(c) if purpose.is_some() && !allowed.contains(&cf) => {
                    let _ = c;
                    violations.push(FieldViolation::new(
                        field,
                        "not within the declared purpose",
                    ));
                }
                Ok(c) => {
                    need.insert(cf);
                    claims.push(c);
                }
            }
        };
        if let Some(n) = &r.full_name {
            claim(
                "full_name",
                CitizenField::FullName,
                FullName::parse(n)
                    .map(Claim::Name)
                    .map_err(|e| e.to_string()),
                &mut violations,
            );
        }
        if let Some(d) = &r.date_of_birth {
            claim(
                "date_of_birth",
                CitizenField::DateOfBirth,
                parse_date(d).map(|_| Claim::DateOfBirth(d.clone())),
                &mut violations,
            );
        }
        if let Some(s) = Sex::try_from(r.sex).ok().and_then(sex_from_pb) {
            claim("sex", CitizenField::Sex, Ok(Claim::Sex(s)), &mut violations);
        }
        if let Some(f) = &r.father_personal_id {
            claim(
                "father_personal_id",
                CitizenField::FatherPersonalId,
                PersonalId::parse(f)
                    .map(Claim::Father)
                    .map_err(|e| e.to_string()),
                &mut violations,
            );
        }
        if let Some(m) = &r.mother_personal_id {
            claim(
                "mother_personal_id",
                CitizenField::MotherPersonalId,
                PersonalId::parse(m)
                    .map(Claim::Mother)
                    .map_err(|e| e.to_string()),
                &mut violations,
            );
        }
        if r.marital_status != MaritalStatus::Unspecified as i32 {
            let m = MaritalStatus::try_from(r.marital_status)
                .map_err(|_| "unknown marital status".to_owned());
            claim(
                "marital_status",
                CitizenField::MaritalStatus,
                m.map(Claim::Marital),
                &mut violations,
            );
        }
        if let Some(s) = &r.spouse_personal_id {
            claim(
                "spouse_personal_id",
                CitizenField::SpousePersonalIds,
                PersonalId::parse(s)
                    .map(Claim::Spouse)
                    .map_err(|e| e.to_string()),
                &mut violations,
            );
        }
        // A claimed sex or year of birth that the ID's own digits contradict is bad input.
        if let Some(id) = &id {
            let sex = claims.iter().find_map(|c| match c {
                Claim::Sex(s) => Some(*s),
                _ => None,
            });
            let year = claims.iter().find_map(|c| match c {
                Claim::DateOfBirth(d) => parse_date(d).ok().map(|d| d.year()),
                _ => None,
            });
            if let Err(e) = id.check_consistency(sex, year) {
                violations.push(FieldViolation::new("personal_id", e.to_string()));
            }
        }
        if claims.is_empty() && violations.is_empty() {
            violations.push(FieldViolation::new(
                "",
                "claim at least one attribute to verify (full_name, date_of_birth, sex, ...)",
            ));
        }
        if !violations.is_empty() {
            note_refused(&facts, &r.purpose, [id.as_ref().map(PersonalId::as_str)]);
        }
        let (Some(id), true) = (id, violations.is_empty()) else {
            return Err(invalid(violations));
        };
        // Guessing: past the limit of non-matching answers, no more verifications of this
        // citizen by this agency for the rest of the window.
        let (limit, window) = {
            let l = &self.state.load().config.file.lookups;
            (
                l.max_failed_verifications,
                std::time::Duration::from_secs(l.failed_verifications_window_secs),
            )
        };
        if let Err(retry) =
            self.failed
                .check(&who.agency, id.as_str(), limit, window, Instant::now())
        {
            facts.update(|f| {
                f.refusal = "verification_guessing";
                f.subjects = vec![id.to_string()];
                f.purpose = purpose
                    .as_ref()
                    .map(|(c, _)| c.as_str().to_owned())
                    .unwrap_or_default();
            });
            tracing::warn!(
                agency = who.agency.as_str(),
                limit,
                "verifications of one citizen that did not match reached the limit: refused"
            );
            return Err(Status::permission_denied(format!(
                "{limit} verifications of citizen {id} by agency {} did not match within {} s: further verifications of this citizen are refused for {} s",
                who.agency,
                window.as_secs(),
                retry.as_secs().max(1)
            )));
        }
        self.harvest(&who, &[id.to_string()]).await?;
        facts.update(|f| {
            f.case_reference = r.case_reference.clone();
            f.purpose = purpose
                .as_ref()
                .map(|(c, _)| c.as_str().to_owned())
                .unwrap_or_default();
            f.subjects = vec![id.to_string()];
            // What was compared (only match flags are returned).
            f.fields = claims.iter().map(|c| c.attribute().to_owned()).collect();
        });
        let citizen = self
            .upstream()?
            .get(std::slice::from_ref(&id), &need, &deadline)
            .await?
            .pop()
            .filter(|c| c.personal_id == id.as_str())
            .ok_or_else(|| Status::not_found(format!("no citizen with personal ID {id}")))?;
        let matches: Vec<AttributeMatch> = claims
            .iter()
            .map(|c| AttributeMatch {
                attribute: c.attribute().to_owned(),
                r#match: if c.matches(&citizen) {
                    Match::Yes
                } else {
                    Match::No
                } as i32,
            })
            .collect();
        let missed: Vec<&str> = matches
            .iter()
            .filter(|m| m.r#match == Match::No as i32)
            .map(|m| m.attribute.as_str())
            .collect();
        if !missed.is_empty() {
            self.failed
                .failed(&who.agency, id.as_str(), window, Instant::now());
            // In the record: an auditor sees a run of them.
            let detail = format!("no_match:{}", missed.join(","));
            facts.update(|f| f.detail = detail);
        }
        Ok(Response::new(VerifyCitizenResponse { matches }))
    }

    async fn search_citizens(
        &self,
        req: Request<SearchCitizensRequest>,
    ) -> Result<Response<SearchCitizensResponse>, Status> {
        let who = principal(&req)?;
        let facts = FactsSlot::of(&req);
        let deadline = crate::upstream::Caller::of(&req);
        self.bound(
            &req,
            &who,
            CitizensMethod::SearchCitizens,
            &req.get_ref().purpose,
            [],
        )?;
        let r = req.into_inner();
        let mut violations = Vec::new();
        let name = FullName::parse(&r.full_name)
            .map_err(|e| violations.push(FieldViolation::new("full_name", e.to_string())))
            .ok();
        if let Err(e) = parse_date(&r.date_of_birth) {
            violations.push(FieldViolation::new("date_of_birth", e));
        }
        let purpose = self
            .purpose(
                CitizensMethod::SearchCitizens,
                &r.purpose,
                &r.case_reference,
            )
            .map_err(|v| violations.push(v))
            .ok();
        if let Some(p) = &r.province_code
            && !personal_id::is_known_province(p)
        {
            violations.push(FieldViolation::new(
                "province_code",
                format!("{p:?} is not a known province code"),
            ));
        }
        let (Some(name), Some((code, allowed)), true) = (name, purpose, violations.is_empty())
        else {
            note_refused(&facts, &r.purpose, [None]);
            return Err(invalid(violations));
        };
        let cap = self
            .state
            .load()
            .config
            .file
            .lookups
            .max_search_results
            .max(1);
        let limit = if r.max_results == 0 {
            cap
        } else {
            r.max_results.min(cap)
        };
        let fields: BTreeSet<_> = SEARCH_FIELDS
            .into_iter()
            .filter(|f| allowed.contains(f))
            .collect();
        let mut citizens = self
            .upstream()?
            .search(
                &fold(name.as_str()),
                &r.date_of_birth,
                r.province_code.as_deref(),
                limit + 1,
                &fields,
                &deadline,
            )
            .await?;
        let truncated = citizens.len() > limit as usize;
        citizens.truncate(limit as usize);
        for c in &mut citizens {
            mask(c, &fields);
        }
        // The citizens whose data left are the subjects; the query itself (a name and a date
        // of birth) is personal data and is not recorded.
        let subjects: Vec<String> = citizens.iter().map(|c| c.personal_id.clone()).collect();
        if !subjects.is_empty() {
            self.harvest(&who, &subjects).await?;
        }
        facts.update(|f| {
            f.purpose = code.as_str().to_owned();
            f.case_reference = r.case_reference.clone();
            f.subjects = subjects;
            let returned: BTreeSet<&'static str> =
                citizens.iter().flat_map(present_fields).collect();
            f.fields = returned.iter().map(|s| (*s).to_owned()).collect();
        });
        Ok(Response::new(SearchCitizensResponse {
            citizens,
            truncated,
        }))
    }
}

/// One attribute claimed in `VerifyCitizen`.
enum Claim {
    Name(FullName),
    DateOfBirth(String),
    Sex(crate::domain::Sex),
    Father(PersonalId),
    Mother(PersonalId),
    Marital(MaritalStatus),
    Spouse(PersonalId),
}

impl Claim {
    fn attribute(&self) -> &'static str {
        match self {
            Claim::Name(_) => "full_name",
            Claim::DateOfBirth(_) => "date_of_birth",
            Claim::Sex(_) => "sex",
            Claim::Father(_) => "father_personal_id",
            Claim::Mother(_) => "mother_personal_id",
            Claim::Marital(_) => "marital_status",
            Claim::Spouse(_) => "spouse_personal_id",
        }
    }

    fn matches(&self, c: &Citizen) -> bool {
        match self {
            Claim::Name(n) => c
                .full_name
                .as_deref()
                .and_then(|s| FullName::parse(s).ok())
                .is_some_and(|stored| stored.matches(n)),
            Claim::DateOfBirth(d) => c.date_of_birth.as_deref() == Some(d.as_str()),
            Claim::Sex(s) => Sex::try_from(c.sex).ok().and_then(sex_from_pb) == Some(*s),
            Claim::Father(id) => c.father_personal_id.as_deref() == Some(id.as_str()),
            Claim::Mother(id) => c.mother_personal_id.as_deref() == Some(id.as_str()),
            Claim::Marital(m) => c.marital_status == *m as i32,
            Claim::Spouse(id) => c.spouse_personal_ids.iter().any(|s| s == id.as_str()),
        }
    }
}
