//! `civgate.v1.Exchange`: two-way event sync. Who consumes which topic is the policy's
//! (`policy::may_consume`, checked before any work); a consumer group is (the caller's
//! agency, its name); who receives which event is `exchange::address`.

use std::pin::Pin;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::pb::v1::{
    AckRequest, AckResponse, GetEventStatusRequest, GetEventStatusResponse,
    ListOpenRequestsRequest, ListOpenRequestsResponse, PublishReceipt, PublishRequest,
    RejectRequest, RejectResponse, SubscribeRequest, SubscribedEvent, exchange_server::Exchange,
};

use prost::Message;
use tonic_types::FieldViolation;

use super::{invalid, principal};
pub use crate::exchange::WINDOW;
use crate::{
    audit::{Call, Draft, Facts, FactsSlot},
    domain::Role,
    exchange::{
        address,
        journal::{Answer, Group, Journal, JournalError, Opens},
        validate::{Refusal, is_topic, notices, subjects, topic_of, validate},
    },
    policy::{self, Principal},
    state::Shared,
};

/// How long an idle subscription waits at most before it checks the policy in force again.
const POLICY_RECHECK: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Clone)]
pub(crate) struct ExchangeService {
    journal: Option<Journal>,
    /// Turns true at graceful shutdown: open subscriptions end with UNAVAILABLE.
    shutdown: tokio::sync::watch::Receiver<bool>,
    window: u64,
    /// The policy (who consumes what, jurisdictions) and the harvesting guard.
    state: Shared,
}

impl ExchangeService {
    pub fn new(
        journal: Option<Journal>,
        shutdown: tokio::sync::watch::Receiver<bool>,
        window: u64,
        state: Shared,
    ) -> Self {
        Self {
            journal,
            shutdown,
            window: window.max(1),
            state,
        }
    }

    fn journal(&self) -> Result<&Journal, Status> {
        self.journal
            .as_ref()
            .ok_or_else(|| Status::unavailable("the journal is not open"))
    }
}

/// The facts slot of a call whose handler has nothing to add to its record, and the draft a
/// journal writer finishes and commits with the call's own write (`Facts.recorded` is then
/// set from the index it returns).
fn draft_of<T>(req: &Request<T>) -> (FactsSlot, Option<Draft>) {
    let draft = Call::of(req).map(|call| Draft {
        call,
        facts: Facts::default(),
    });
    (FactsSlot::of(req), draft)
}

/// The consumer group of a Subscribe/Ack/Reject: the topic must be well formed and one the
/// caller's role consumes (`PERMISSION_DENIED` otherwise, before any work), the name well
/// formed; the group is the caller's own (agency from the certificate, never the request).
fn group_of(
    who: &Principal,
    facts: &FactsSlot,
    method: &'static str,
    topic: &str,
    group: &str,
) -> Result<Group, Status> {
    let mut v = Vec::new();
    if !is_topic(topic) {
        v.push(FieldViolation::new(
            "topic",
            "must be civil-status, population or social-insurance",
        ));
    } else if let Err(denial) = policy::may_consume(who.role, topic) {
        tracing::warn!(
            agency = who.agency.as_str(),
            topic,
            reason = denial.reason(),
            "denied: {denial}"
        );
        crate::telemetry::rpc_denied(method, denial.reason());
        facts.update(|f| f.refusal = denial.reason());
        return Err(denial.to_status());
    }
    if !policy::is_group_name(group) {
        v.push(FieldViolation::new(
            "consumer_group",
            "1-64 characters of A-Z, a-z, 0-9, '-', '_', '.'",
        ));
    }
    if v.is_empty() {
        Ok(Group::new(who.agency.as_str(), group))
    } else {
        Err(invalid(v))
    }
}

/// The scope an open subscription of `agency` reads `topic` with, and the agency's role, under
/// the policy in force; `Err` when the agency may no longer consume the topic.
fn stream_scope(
    state: &Shared,
    agency: &crate::domain::AgencyId,
    topic: &str,
) -> Result<(Option<Vec<String>>, Role), policy::Denial> {
    let snapshot = state.load();
    let a = snapshot
        .policy
        .agencies
        .get(agency)
        .ok_or_else(|| policy::Denial::UnknownAgency(agency.clone()))?;
    policy::may_consume(a.role, topic)?;
    Ok((
        address::scope_of(topic, a.role, agency, &a.provinces),
        a.role,
    ))
}

/// The scope a consumer reads a topic with (`address::scope_of`).
fn scope_for(who: &Principal, topic: &str) -> Option<Vec<String>> {
    address::scope_of(topic, who.role, &who.agency, &who.provinces)
}

/// The facts of the audit record that releases a batch of events to a subscriber: the
/// citizens the events concern (each once, sorted) and their types as `event:<type>`, like
/// the records of their publishes. Events that do not decode add nothing.
fn delivery_facts(batch: &[SubscribedEvent]) -> Facts {
    let mut ids = std::collections::BTreeSet::new();
    let mut types = std::collections::BTreeSet::new();
    for p in batch
        .iter()
        .filter_map(|e| e.event.as_ref()?.payload.as_ref())
    {
        ids.extend(subjects(p));
        types.insert(topic_of(p).1);
    }
    Facts {
        purpose: String::new(),
        subjects: ids.into_iter().collect(),
        fields: types.into_iter().map(|t| format!("event:{t}")).collect(),
        recorded: None,
        refusal: "",
        case_reference: String::new(),
        detail: String::new(),
    }
}

/// The detail of a delivery record: `delivered:<topic>:<group>:<first>-<last>` (sequences).
fn delivery_detail(topic: &str, group: &str, batch: &[SubscribedEvent]) -> String {
    let first = batch.first().map_or(0, |e| e.sequence);
    let last = batch.last().map_or(0, |e| e.sequence);
    format!("delivered:{topic}:{group}:{first}-{last}")
}

/// A batch of events read for a subscriber, and the commit of its audit record (`None`: audit
/// off). The batch goes out only once that record is durable.
struct Released {
    batch: Vec<SubscribedEvent>,
    audited: Option<tokio::task::JoinHandle<Result<Option<u64>, JournalError>>>,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<SubscribedEvent, Status>> + Send>>;

impl ExchangeService {
    /// The audience of an event `who` publishes on `topic` (`address::audience_of`), after
    /// checking the event it answers, if any: it must exist, be on the other topic, and be
    /// addressed to `who`; a `personal_id_assigned` must answer a birth. The same refusal for
    /// an event that does not exist and one that is not `who`'s to answer.
    async fn address(
        &self,
        who: &Principal,
        event: &crate::pb::v1::Event,
        topic: &str,
    ) -> Result<Option<String>, Status> {
        let Some(payload) = &event.payload else {
            return Ok(None);
        };
        if event.in_reply_to.is_empty() {
            return Ok(address::audience_of(payload, None));
        }
        let refused = |why: &str| {
            invalid(vec![FieldViolation::new(
                "event.in_reply_to",
                format!(
                    "{why} (the event_id of an event of the other topic addressed to agency {})",
                    who.agency
                ),
            )])
        };
        let id = &event.in_reply_to;
        if !is_event_id(id) {
            return Err(refused("not an event id"));
        }
        let found = self.journal()?.find(id).await?;
        let Some(found) = found.filter(|f| {
            f.topic != topic
                && policy::may_consume(who.role, &f.topic).is_ok()
                && address::matches(f.audience.as_deref(), scope_for(who, &f.topic).as_deref())
        }) else {
            return Err(refused("no such event"));
        };
        let answered = crate::pb::v1::Event::decode(found.payload.as_slice()).ok();
        // An answer belongs to the case of the event it answers.
        if let Some(asked) = &answered
            && !asked.case_reference.is_empty()
            && asked.case_reference != event.case_reference
        {
            return Err(invalid(vec![FieldViolation::new(
                "event.case_reference",
                format!(
                    "must be {:?}, the case of the event it answers",
                    asked.case_reference
                ),
            )]));
        }
        // A fact about a citizen sent as an answer concerns a citizen the answered event names:
        // an answer cannot carry another citizen's data to the asker.
        if matches!(
            payload,
            crate::pb::v1::event::Payload::DeathRecorded(_)
                | crate::pb::v1::event::Payload::ResidenceChanged(_)
                | crate::pb::v1::event::Payload::CitizenDataCorrected(_)
        ) {
            let named: Vec<String> = answered
                .as_ref()
                .and_then(|e| e.payload.as_ref())
                .map(subjects)
                .unwrap_or_default();
            if let Some(other) = subjects(payload).into_iter().find(|id| !named.contains(id)) {
                return Err(invalid(vec![FieldViolation::new(
                    "event.in_reply_to",
                    format!(
                        "the event answered does not name citizen {other}: an answer concerns a citizen it names"
                    ),
                )]));
            }
        }
        if let crate::pb::v1::event::Payload::PersonalIdAssigned(assigned) = payload {
            let Some(crate::pb::v1::event::Payload::Birth(birth)) =
                answered.as_ref().and_then(|e| e.payload.as_ref())
            else {
                return Err(refused("a personal_id_assigned answers a birth event"));
            };
            if let Some(why) = id_fits_birth(&assigned.personal_id, birth) {
                return Err(invalid(vec![FieldViolation::new(
                    "event.personal_id_assigned.personal_id",
                    why,
                )]));
            }
        }
        if let crate::pb::v1::event::Payload::PersonalIdReissued(reissued) = payload {
            let Some(crate::pb::v1::event::Payload::CivilStatusChange(change)) =
                answered.as_ref().and_then(|e| e.payload.as_ref())
            else {
                return Err(refused(
                    "a personal_id_reissued answers a civil_status_change of sex or date of birth",
                ));
            };
            if let Some((field, why)) = id_fits_change(reissued, change) {
                return Err(invalid(vec![FieldViolation::new(field, why)]));
            }
        }
        // An answer of the linked procedures answers its kind of request only, and concerns
        // the citizen of that request: a death's, or the child whose ID the birth was given.
        use crate::pb::v1::event::Payload as P;
        let (_, kind) = topic_of(payload);
        let asked_kind = answered
            .as_ref()
            .and_then(|e| e.payload.as_ref())
            .map(|p| topic_of(p).1);
        if let Some(only) = crate::exchange::cases::answers_only(kind)
            && !asked_kind.is_some_and(|k| only.contains(&k))
        {
            return Err(refused(&format!(
                "a {kind} answers a {}",
                only.join(" or ")
            )));
        }
        let about = match payload {
            P::PermanentResidenceRegistered(x) => Some(x.personal_id.as_str()),
            P::HealthInsuranceCardIssued(x) => Some(x.personal_id.as_str()),
            P::PermanentResidenceDeleted(x) => Some(x.personal_id.as_str()),
            P::FuneralAllowanceDecided(x) => Some(x.personal_id.as_str()),
            _ => None,
        }
        .filter(|id| !id.is_empty());
        if let Some(id) = about {
            let whose = match answered.as_ref().and_then(|e| e.payload.as_ref()) {
                Some(P::Death(d)) => Some(d.personal_id.clone()),
                Some(P::Birth(b)) => match b.personal_id.as_deref().filter(|s| !s.is_empty()) {
                    Some(kept) => Some(kept.to_owned()),
                    None => self.assigned_to(&event.in_reply_to).await?,
                },
                _ => None,
            };
            // The message never says which ID it should be, nor whether the birth has one
            // yet: the publisher may not be the agency that learned it.
            if whose.as_deref() != Some(id) {
                return Err(invalid(vec![FieldViolation::new(
                    format!("event.{kind}.personal_id"),
                    "is not the citizen of the event it answers (a birth's: the personal ID assigned to it)",
                )]));
            }
        }
        if let Some(asked) = answered.as_ref().and_then(|e| e.payload.as_ref())
            && let Some(v) = crate::exchange::validate::answer_before_request(payload, asked)
        {
            return Err(invalid(vec![v]));
        }
        Ok(address::audience_of(payload, Some(&found.producer)))
    }

    /// The personal ID the population database assigned in answer to the birth `asked`.
    async fn assigned_to(&self, asked: &str) -> Result<Option<String>, Status> {
        let journal = self.journal()?;
        let Some(answer) = journal.answer_of(asked, "personal_id_assigned").await? else {
            return Ok(None);
        };
        let Some(found) = journal.find(&answer).await? else {
            return Ok(None);
        };
        Ok(
            match crate::pb::v1::Event::decode(found.payload.as_slice())
                .ok()
                .and_then(|e| e.payload)
            {
                Some(crate::pb::v1::event::Payload::PersonalIdAssigned(a)) => Some(a.personal_id),
                _ => None,
            },
        )
    }
}

/// Why a number re-issued in answer to a change does not fit it (`None`: it does): the change
/// is of sex or of the date of birth, the old number is the changed person's, and the new one
/// encodes the sex and year of birth after the change.
fn id_fits_change(
    r: &crate::pb::v1::PersonalIdReissued,
    change: &crate::pb::v1::CivilStatusChange,
) -> Option<(&'static str, String)> {
    let old_field = "event.personal_id_reissued.old_personal_id";
    let new_field = "event.personal_id_reissued.new_personal_id";
    if r.old_personal_id != change.personal_id {
        return Some((
            old_field,
            format!(
                "the change answered is of personal ID {}",
                change.personal_id
            ),
        ));
    }
    let (old, new) = (
        crate::domain::PersonalId::parse(&r.old_personal_id).ok()?,
        crate::domain::PersonalId::parse(&r.new_personal_id).ok()?,
    );
    let (sex, year) = match change.field.as_str() {
        "sex" => (
            match change.new_value.as_str() {
                "male" => crate::domain::Sex::Male,
                _ => crate::domain::Sex::Female,
            },
            old.birth_year(),
        ),
        "date_of_birth" => (
            old.sex(),
            crate::domain::parse_date(&change.new_value)
                .ok()
                .map_or(old.birth_year(), |d| d.year()),
        ),
        _ => {
            return Some((
                "event.in_reply_to",
                "a number is re-issued for a change of sex or of the date of birth only".into(),
            ));
        }
    };
    if sex == old.sex() && year == old.birth_year() {
        return Some((
            "event.in_reply_to",
            "the change answered does not alter what the number encodes: nothing to re-issue"
                .into(),
        ));
    }
    if new.province_code() != old.province_code() {
        return Some((
            new_field,
            format!(
                "keeps the province of birth registration of the old number ({})",
                old.province_code()
            ),
        ));
    }
    new.check_consistency(Some(sex), Some(year))
        .err()
        .map(|e| (new_field, format!("{e} (the change answered)")))
}

/// An event id as the journal makes them (32 hex digits; accepted: 1-64 of A-Z, a-z, 0-9, '-').
fn is_event_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Why the personal ID assigned to a newborn does not fit its birth registration (`None`: it
/// does): its digits must name the province of the birth registration, the child's sex and
/// year of birth (Circular 59/2021 art. 4).
fn id_fits_birth(id: &str, birth: &crate::pb::v1::Birth) -> Option<String> {
    // A re-registration keeps the ID the person has: the answer is that ID, whatever province
    // it was first registered in.
    if let Some(kept) = birth.personal_id.as_deref().filter(|s| !s.is_empty()) {
        return (id != kept).then(|| {
            format!("the birth re-registers personal ID {kept}: the answer must keep it")
        });
    }
    let id = crate::domain::PersonalId::parse(id).ok()?;
    if id.province_code() != birth.birth_registration_province_code {
        return Some(format!(
            "province {} differs from the birth registration's ({})",
            id.province_code(),
            birth.birth_registration_province_code
        ));
    }
    let sex = crate::convert::sex_from_pb(
        crate::pb::v1::Sex::try_from(birth.sex).unwrap_or(crate::pb::v1::Sex::Unspecified),
    );
    let year = crate::domain::parse_date(&birth.date_of_birth)
        .ok()
        .map(|d| d.year());
    id.check_consistency(sex, year)
        .err()
        .map(|e| format!("{e} (the birth answered)"))
}

/// Is an event of `topic` with this audience addressed to `group` under `policy` (its agency
/// configured, consuming the topic, and in scope)?
fn addressed_to(
    policy: &policy::Policy,
    topic: &str,
    audience: Option<&str>,
    group: &Group,
) -> bool {
    let Ok(id) = group.agency.parse::<crate::domain::AgencyId>() else {
        return false;
    };
    let Some(agency) = policy.agencies.get(&id) else {
        return false;
    };
    policy::may_consume(agency.role, topic).is_ok()
        && address::matches(
            audience,
            address::scope_of(topic, agency.role, &id, &agency.provinces).as_deref(),
        )
}

#[tonic::async_trait]
impl Exchange for ExchangeService {
    async fn publish(
        &self,
        req: Request<PublishRequest>,
    ) -> Result<Response<PublishReceipt>, Status> {
        let who = principal(&req)?;
        let facts = FactsSlot::of(&req);
        let call = Call::of(&req);
        let r = req.into_inner();
        let key_ok = !r.idempotency_key.is_empty()
            && r.idempotency_key.len() <= 128
            && r.idempotency_key.bytes().all(|b| b.is_ascii_graphic());
        // Whom a refused publish concerned, and its case, are in its audit record too.
        if let Some(e) = r.event.as_ref() {
            let case = e.case_reference.clone();
            let named = e.payload.as_ref().map(subjects).unwrap_or_default();
            facts.update(|f| {
                f.subjects = named;
                if crate::domain::check_case_reference(&case).is_ok() {
                    f.case_reference = case;
                }
            });
        }
        let topic = match validate(r.event.as_ref(), &who) {
            Err(Refusal::NotAllowed(why)) => {
                facts.update(|f| f.refusal = "publish_not_allowed");
                return Err(Status::permission_denied(why));
            }
            Err(Refusal::Invalid(mut v)) => {
                if !key_ok {
                    v.insert(
                        0,
                        FieldViolation::new("idempotency_key", "1-128 visible ASCII characters"),
                    );
                }
                return Err(invalid(v));
            }
            Ok(_) if !key_ok => {
                return Err(invalid(vec![FieldViolation::new(
                    "idempotency_key",
                    "1-128 visible ASCII characters",
                )]));
            }
            Ok(t) => t,
        };
        let event = r.event.unwrap_or_default();
        let notices = notices(&event);
        let audience = self.address(&who, &event, topic).await?;
        let mut told = Facts {
            case_reference: event.case_reference.clone(),
            ..Facts::default()
        };
        if let Some(p) = &event.payload {
            // The citizens the event concerns are the record's subjects; values stay out.
            told.fields = vec![format!("event:{}", topic_of(p).1)];
            told.subjects = subjects(p);
        }
        facts.update(|f| *f = told.clone());
        // One answer of each kind per request: the journal refuses a second in the same
        // transaction that would commit it.
        let answers = event
            .payload
            .as_ref()
            .filter(|_| !event.in_reply_to.is_empty())
            .map(|p| Answer {
                asked: event.in_reply_to.clone(),
                kind: topic_of(p).1,
            });
        // The requests it opens (flows with deadlines), recorded with it.
        let mut audience = audience;
        let opens = event.payload.as_ref().and_then(|p| {
            let kind = topic_of(p).1;
            let cases = &self.state.load().cases;
            let list = cases.flows.opened_by(
                kind,
                &event.case_reference,
                time::OffsetDateTime::now_utc(),
                &cases.calendar,
            );
            (!list.is_empty()).then(|| Opens {
                kind,
                case_reference: event.case_reference.clone(),
                list,
            })
        });
        // A request the social-insurance agency must answer is addressed to it too.
        if topic == crate::exchange::validate::CIVIL_STATUS
            && opens.as_ref().is_some_and(|o| {
                o.list
                    .iter()
                    .any(|x| x.awaiting == crate::exchange::validate::SOCIAL_INSURANCE)
            })
        {
            audience = Some(address::TO_SOCIAL_INSURANCE.to_owned());
        }
        // The call's audit record is committed with the event, in one transaction.
        let draft = call.map(|call| Draft { call, facts: told });
        let published = self
            .journal()?
            .publish_tracked(
                who.agency.as_str(),
                &r.idempotency_key,
                topic,
                event.encode_to_vec(),
                audience,
                answers,
                opens,
                draft,
            )
            .await;
        if let Some(index) = published.audit_index {
            facts.update(|f| f.recorded = Some(index));
        }
        let receipt = published.result?;
        Ok(Response::new(PublishReceipt {
            event_id: receipt.event_id,
            topic: receipt.topic,
            sequence: receipt.sequence,
            recorded_at_unix_ms: receipt.recorded_at_ms,
            notices: notices.into_iter().map(str::to_owned).collect(),
        }))
    }

    type SubscribeStream = EventStream;

    async fn subscribe(
        &self,
        req: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let who = principal(&req)?;
        // With the audit on, every batch of events this stream delivers is audited as a read
        // of the citizens they concern, and sent only once that record is durable (fail
        // closed, as for look-ups); the record of the call itself says the stream opened.
        let call = Call::of(&req);
        let facts = FactsSlot::of(&req);
        // The connection's certificate, checked again at every turn of the stream.
        let peer = req
            .extensions()
            .get::<crate::listener::ConnInfo>()
            .map(|c| c.peer.clone());
        let r = req.into_inner();
        let group = group_of(
            &who,
            &facts,
            "/civgate.v1.Exchange/Subscribe",
            &r.topic,
            &r.consumer_group,
        )?;
        let journal = self.journal()?.clone();
        let mut head = journal
            .head(&r.topic)
            .ok_or_else(|| Status::invalid_argument("unknown topic"))?;
        let mut acked = journal.acked(&r.topic, &group).await?;
        let start = r.from_sequence.unwrap_or(*acked.borrow() + 1).max(1);
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let topic = r.topic;
        let mut shutdown = self.shutdown.clone();
        let window = self.window;
        let (state, agency) = (self.state.clone(), who.agency.clone());
        tokio::spawn(async move {
            // Sends a released batch once its record is durable; false: the stream is over.
            let send = |released: Released| {
                let (tx, journal, topic, group) = (&tx, &journal, &topic, &group);
                async move {
                    if let Some(audited) = released.audited {
                        let why = match audited.await {
                            Ok(Ok(Some(_))) => None,
                            Ok(Ok(None)) => Some("the journal has no audit log".to_owned()),
                            Ok(Err(e)) => Some(e.to_string()),
                            Err(e) => Some(e.to_string()),
                        };
                        if let Some(why) = why {
                            tracing::error!(error = %why, "not delivering events whose audit record is not durable");
                            let status = Status::unavailable(
                                "audit log unavailable: events not delivered; resubscribe",
                            );
                            let _ = tx.send(Err(status)).await;
                            return false;
                        }
                    }
                    // "Delivered" (for `GetEventStatus`) is noted once per batch, up to the
                    // last event handed over, not once per event.
                    let mut sent = None;
                    let mut open = true;
                    for msg in released.batch {
                        let seq = msg.sequence;
                        if tx.send(Ok(msg)).await.is_err() {
                            open = false;
                            break;
                        }
                        sent = Some(seq);
                    }
                    if let Some(seq) = sent {
                        journal.delivered(topic, group, seq);
                    }
                    open
                }
            };
            // The batch read and audited while the one before it is being sent: the record's
            // commit overlaps the sending, so a catch-up does not wait on each in turn.
            let mut ready: Option<Released> = None;
            let mut next = start;
            // Sequences read for this stream and not yet acknowledged: at most `window`. The
            // stream sees the subset of the topic addressed to the group, so the window counts
            // events, not sequence numbers.
            let mut outstanding = std::collections::VecDeque::new();
            loop {
                // Every turn runs under the policy in force — each page read, each wake-up,
                // and at least every `POLICY_RECHECK` while idle: a reload that takes the topic
                // from the agency ends the stream, one that changes its provinces changes what
                // it reads from here on.
                if let Some(peer) = &peer
                    && let Err(denial) =
                        policy::standing(&state.load().policy, peer, policy::unix_now())
                {
                    let _ = tx.send(Err(denial.to_status())).await;
                    return;
                }
                let Ok((scope, role)) = stream_scope(&state, &agency, &topic) else {
                    let _ = tx
                        .send(Err(Status::permission_denied(format!(
                            "agency {agency} may no longer consume {topic}"
                        ))))
                        .await;
                    return;
                };
                let acked_now = *acked.borrow_and_update();
                while outstanding.front().is_some_and(|s| *s <= acked_now) {
                    outstanding.pop_front();
                }
                let head_now = *head.borrow_and_update();
                let room = window.saturating_sub(outstanding.len() as u64);
                if next <= head_now && room > 0 {
                    let page = match journal
                        .read(
                            &topic,
                            next,
                            head_now,
                            room.min(256) as u32,
                            scope.as_deref(),
                        )
                        .await
                    {
                        Ok(p) => p,
                        Err(e) => {
                            if let Some(r) = ready.take() {
                                send(r).await;
                            }
                            let _ = tx.send(Err(Status::from(e))).await;
                            return;
                        }
                    };
                    next = next.max(page.scanned_to.saturating_add(1));
                    if page.events.is_empty() {
                        continue;
                    }
                    let batch: Vec<SubscribedEvent> = page
                        .events
                        .into_iter()
                        .map(|e| SubscribedEvent {
                            event: crate::pb::v1::Event::decode(e.payload.as_slice()).ok(),
                            event_id: e.event_id,
                            sequence: e.seq,
                            producer_agency_id: e.producer,
                            recorded_at_unix_ms: e.recorded_at_ms,
                        })
                        .collect();
                    outstanding.extend(batch.iter().map(|e| e.sequence).filter(|s| *s > acked_now));
                    let facts = delivery_facts(&batch);
                    // What a civil registry receives counts in its harvesting window like its
                    // look-ups.
                    if role == Role::CivilRegistry {
                        note_delivery(&state, &agency, &facts.subjects);
                    }
                    // Committed by the journal's writer, in its next transaction.
                    let audited = call.as_ref().map(|call| {
                        let draft = Draft {
                            call: call.clone(),
                            facts,
                        };
                        let detail = delivery_detail(&topic, &group.name, &batch);
                        let journal = journal.clone();
                        tokio::spawn(async move { journal.record(draft, detail).await })
                    });
                    if let Some(r) = ready.replace(Released { batch, audited })
                        && !send(r).await
                    {
                        return;
                    }
                    continue;
                }
                // Caught up with what may be sent: send what was read before waiting.
                if let Some(r) = ready.take() {
                    if !send(r).await {
                        return;
                    }
                    continue;
                }
                tokio::select! {
                    r = head.changed() => if r.is_err() { return },
                    r = acked.changed() => if r.is_err() { return },
                    // An idle stream, too, is held to a reloaded policy.
                    () = tokio::time::sleep(POLICY_RECHECK) => {}
                    () = tx.closed() => return,
                    () = crate::listener::wait_true(&mut shutdown) => {
                        // Resume after the last ack on another gateway or after the restart.
                        let _ = tx.send(Err(Status::unavailable("gateway shutting down; resubscribe"))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn ack(&self, req: Request<AckRequest>) -> Result<Response<AckResponse>, Status> {
        let who = principal(&req)?;
        let (facts, draft) = draft_of(&req);
        let r = req.into_inner();
        let group = group_of(
            &who,
            &facts,
            "/civgate.v1.Exchange/Ack",
            &r.topic,
            &r.consumer_group,
        )?;
        let journal = self.journal()?;
        let head = journal.head(&r.topic).map(|h| *h.borrow()).unwrap_or(0);
        if r.sequence == 0 || r.sequence > head {
            return Err(invalid(vec![FieldViolation::new(
                "sequence",
                "must be the sequence of an event delivered to the group",
            )]));
        }
        // The call's audit record is committed with the acknowledgement.
        let index = journal
            .ack_audited(&r.topic, &group, r.sequence, draft)
            .await?;
        facts.update(|f| f.recorded = index);
        Ok(Response::new(AckResponse {}))
    }

    async fn reject(
        &self,
        req: Request<RejectRequest>,
    ) -> Result<Response<RejectResponse>, Status> {
        let who = principal(&req)?;
        let (facts, draft) = draft_of(&req);
        let r = req.into_inner();
        let group = group_of(
            &who,
            &facts,
            "/civgate.v1.Exchange/Reject",
            &r.topic,
            &r.consumer_group,
        )?;
        let journal = self.journal()?;
        let head = journal.head(&r.topic).map(|h| *h.borrow()).unwrap_or(0);
        let mut v = Vec::new();
        if r.sequence == 0 || r.sequence > head {
            v.push(FieldViolation::new(
                "sequence",
                "must be the sequence of an event delivered to the group",
            ));
        }
        if r.reason.trim().is_empty()
            || r.reason.chars().count() > 500
            || r.reason.chars().any(char::is_control)
        {
            v.push(FieldViolation::new(
                "reason",
                "1-500 characters, no control characters: why the event is refused",
            ));
        }
        if !v.is_empty() {
            return Err(invalid(v));
        }
        // Only an event addressed to the group can be its dead letter.
        let audience = journal.audience_at(&r.topic, r.sequence).await?;
        let scope = scope_for(&who, &r.topic);
        // One answer for an event removed by retention and one addressed to others: whether
        // another agency's event exists is not the caller's to learn.
        if !audience.is_some_and(|a| address::matches(a.as_deref(), scope.as_deref())) {
            return Err(Status::not_found(format!(
                "no event at sequence {} of {} addressed to agency {} (never, or removed by retention)",
                r.sequence, r.topic, who.agency
            )));
        }
        // The call's audit record is committed with the rejection.
        let index = journal
            .reject_audited(&r.topic, &group, r.sequence, r.reason.trim(), draft)
            .await?;
        facts.update(|f| f.recorded = index);
        Ok(Response::new(RejectResponse {}))
    }

    async fn get_event_status(
        &self,
        req: Request<GetEventStatusRequest>,
    ) -> Result<Response<GetEventStatusResponse>, Status> {
        let who = principal(&req)?;
        let r = req.into_inner();
        if !is_event_id(&r.event_id) {
            return Err(invalid(vec![FieldViolation::new(
                "event_id",
                "1-64 characters of A-Z, a-z, 0-9, '-' (the event_id of a receipt)",
            )]));
        }
        let status = self
            .journal()?
            .status(&r.event_id)
            .await?
            .ok_or_else(|| Status::not_found(format!("no event {:?}", r.event_id)))?;
        // The producer and auditors may see an event's fate; nobody else learns it exists.
        let auditor = who.role == Role::Auditor;
        if status.producer != who.agency.as_str() && !auditor {
            return Err(Status::not_found(format!("no event {:?}", r.event_id)));
        }
        use crate::{
            exchange::journal::GroupState,
            pb::v1::{ConsumerGroupStatus, DeliveryState},
        };
        let snapshot = self.state.load();
        let groups = status
            .groups
            .into_iter()
            // The groups the event is addressed to: another group's cumulative ack says
            // nothing about this event.
            .filter(|(g, _)| {
                addressed_to(
                    &snapshot.policy,
                    &status.topic,
                    status.audience.as_deref(),
                    g,
                )
            })
            .map(|(g, s)| {
                let (state, reason) = match s {
                    GroupState::Accepted => (DeliveryState::Accepted, String::new()),
                    GroupState::Delivered => (DeliveryState::Delivered, String::new()),
                    GroupState::Acknowledged => (DeliveryState::Acknowledged, String::new()),
                    GroupState::Rejected(r) => (DeliveryState::Rejected, r),
                };
                // Another agency's group names are its own business (and the auditors').
                let named = auditor || g.agency == who.agency.as_str();
                ConsumerGroupStatus {
                    consumer_group: if named { g.name } else { String::new() },
                    state: state as i32,
                    reason,
                    consumer_agency_id: g.agency,
                }
            })
            .collect();
        Ok(Response::new(GetEventStatusResponse {
            event_id: status.event_id,
            topic: status.topic,
            sequence: status.seq,
            groups,
        }))
    }

    async fn list_open_requests(
        &self,
        req: Request<ListOpenRequestsRequest>,
    ) -> Result<Response<ListOpenRequestsResponse>, Status> {
        use super::cases;
        let who = principal(&req)?;
        // Whose requests first: nothing is read for a caller who may not list.
        let producer = cases::listing_scope(&who)?;
        let snapshot = self.state.load_full();
        let now_ms = crate::exchange::cases::unix_ms(time::OffsetDateTime::now_utc());
        let r = req.into_inner();
        let mut filter = cases::filter_of(&r, producer, &snapshot.policy, now_ms)?;
        let page = filter.limit as usize;
        filter.limit += 1;
        let mut rows = self.journal()?.requests(&filter).await?;
        let more = rows.len() > page;
        rows.truncate(page);
        let next_page_token = if more {
            rows.last().map(cases::next_token).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListOpenRequestsResponse {
            requests: rows
                .into_iter()
                .map(|x| cases::to_pb(x, &snapshot.policy, now_ms))
                .collect(),
            next_page_token,
        }))
    }
}

/// Counts the citizens of a delivered batch in the receiving registry's harvesting window.
fn note_delivery(state: &Shared, agency: &crate::domain::AgencyId, subjects: &[String]) {
    if subjects.is_empty() {
        return;
    }
    let snapshot = state.load_full();
    if let Some(shared) = snapshot.shared.clone() {
        // Across replicas: noted on the side (a delivery is never refused), in this replica's
        // own window when Redis cannot take it.
        let (agency, subjects) = (agency.clone(), subjects.to_vec());
        tokio::spawn(async move {
            let s = &snapshot.config.file.harvest;
            let outcome = match shared.harvest(s, &agency, &subjects, true).await {
                Ok(h) => h,
                Err(_) => snapshot
                    .harvest
                    .note(s, &agency, &subjects, std::time::Instant::now()),
            };
            warn_on_delivery(s, &agency, outcome);
        });
        return;
    }
    let s = &snapshot.config.file.harvest;
    let outcome = snapshot
        .harvest
        .note(s, agency, subjects, std::time::Instant::now());
    warn_on_delivery(s, agency, outcome);
}

fn warn_on_delivery(
    s: &crate::limits::HarvestSection,
    agency: &crate::domain::AgencyId,
    outcome: crate::limits::Harvest,
) {
    if let crate::limits::Harvest::Warn { distinct } = outcome {
        tracing::warn!(
            agency = agency.as_str(),
            distinct,
            window_secs = s.window_secs,
            "harvesting guard: agency crossed the warning threshold of distinct citizens read (deliveries included)"
        );
        crate::telemetry::harvest(agency.as_str(), "warn");
    }
}

#[cfg(test)]
mod tests;
