//! `civgate.v1.Exchange`: two-way event sync (issue #4).

use std::pin::Pin;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::pb::v1::{
    AckRequest, AckResponse, GetEventStatusRequest, GetEventStatusResponse, PublishReceipt,
    PublishRequest, RejectRequest, RejectResponse, SubscribeRequest, SubscribedEvent,
    exchange_server::Exchange,
};

use prost::Message;
use tonic_types::FieldViolation;

use super::{citizens::invalid, principal};
use crate::{
    audit::{Call, Draft, Facts, FactsSlot},
    exchange::{
        journal::{Journal, JournalError},
        validate::{Refusal, is_topic, subjects, topic_of, validate},
    },
};

/// Unacknowledged events a subscription may have outstanding before delivery pauses (the
/// default of `[exchange] max_unacked`).
pub const WINDOW: u64 = 1_024;

#[derive(Clone)]
pub struct ExchangeService {
    journal: Option<Journal>,
    /// Turns true at graceful shutdown: open subscriptions end with UNAVAILABLE.
    shutdown: tokio::sync::watch::Receiver<bool>,
    window: u64,
}

impl ExchangeService {
    pub fn new(
        journal: Option<Journal>,
        shutdown: tokio::sync::watch::Receiver<bool>,
        window: u64,
    ) -> Self {
        Self {
            journal,
            shutdown,
            window: window.max(1),
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

/// Topic and consumer group of a Subscribe/Ack/Reject, validated.
fn group_of(topic: &str, group: &str) -> Result<(), Status> {
    let mut v = Vec::new();
    if !is_topic(topic) {
        v.push(FieldViolation::new(
            "topic",
            "must be civil-status or population",
        ));
    }
    let ok = !group.is_empty()
        && group.len() <= 64
        && group
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !ok {
        v.push(FieldViolation::new(
            "consumer_group",
            "1-64 characters of A-Z, a-z, 0-9, '-', '_', '.'",
        ));
    }
    if v.is_empty() {
        Ok(())
    } else {
        Err(invalid(v))
    }
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
        let topic = match validate(r.event.as_ref(), &who) {
            Err(Refusal::NotAllowed(why)) => return Err(Status::permission_denied(why)),
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
        let mut told = Facts::default();
        if let Some(p) = &event.payload {
            // The citizens the event concerns are the record's subjects; values stay out.
            told.fields = vec![format!("event:{}", topic_of(p).1)];
            told.subjects = subjects(p);
        }
        facts.update(|f| *f = told.clone());
        // The call's audit record is committed with the event, in one transaction.
        let draft = call.map(|call| Draft { call, facts: told });
        let published = self
            .journal()?
            .publish_audited(
                who.agency.as_str(),
                &r.idempotency_key,
                topic,
                event.encode_to_vec(),
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
        }))
    }

    type SubscribeStream = EventStream;

    async fn subscribe(
        &self,
        req: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        principal(&req)?;
        // With the audit on, every batch of events this stream delivers is audited as a read
        // of the citizens they concern, and sent only once that record is durable (fail
        // closed, as for look-ups); the record of the call itself says the stream opened.
        let call = Call::of(&req);
        let r = req.into_inner();
        group_of(&r.topic, &r.consumer_group)?;
        let journal = self.journal()?.clone();
        let mut head = journal
            .head(&r.topic)
            .ok_or_else(|| Status::invalid_argument("unknown topic"))?;
        let mut acked = journal.acked(&r.topic, &r.consumer_group).await?;
        let start = r.from_sequence.unwrap_or(*acked.borrow() + 1).max(1);
        // Outstanding = sent and not acknowledged; counted from the later of the last ack and
        // where this subscription starts.
        let base = start - 1;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let (topic, group) = (r.topic, r.consumer_group);
        let mut shutdown = self.shutdown.clone();
        let window = self.window;
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
            loop {
                let limit = (*head.borrow_and_update())
                    .min((*acked.borrow_and_update()).max(base) + window);
                if next <= limit {
                    let events = match journal.read(&topic, next, limit, 256).await {
                        Ok(e) => e,
                        Err(e) => {
                            if let Some(r) = ready.take() {
                                send(r).await;
                            }
                            let _ = tx.send(Err(Status::from(e))).await;
                            return;
                        }
                    };
                    if let Some(last) = events.last() {
                        next = last.seq + 1;
                        let batch: Vec<SubscribedEvent> = events
                            .into_iter()
                            .map(|e| SubscribedEvent {
                                event: crate::pb::v1::Event::decode(e.payload.as_slice()).ok(),
                                event_id: e.event_id,
                                sequence: e.seq,
                                producer_agency_id: e.producer,
                                recorded_at_unix_ms: e.recorded_at_ms,
                            })
                            .collect();
                        // Committed by the journal's writer, in its next transaction.
                        let audited = call.as_ref().map(|call| {
                            let draft = Draft {
                                call: call.clone(),
                                facts: delivery_facts(&batch),
                            };
                            let detail = delivery_detail(&topic, &group, &batch);
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
                    // Nothing stored up to the head we were told of (it cannot happen with a
                    // correct head): wait for news instead of asking again at once.
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
        principal(&req)?;
        let (facts, draft) = draft_of(&req);
        let r = req.into_inner();
        group_of(&r.topic, &r.consumer_group)?;
        let journal = self.journal()?;
        let head = journal.head(&r.topic).map(|h| *h.borrow()).unwrap_or(0);
        if r.sequence == 0 || r.sequence > head {
            return Err(invalid(vec![FieldViolation::new(
                "sequence",
                format!("must be 1..={head} (the topic's head)"),
            )]));
        }
        // The call's audit record is committed with the acknowledgement.
        let index = journal
            .ack_audited(&r.topic, &r.consumer_group, r.sequence, draft)
            .await?;
        facts.update(|f| f.recorded = index);
        Ok(Response::new(AckResponse {}))
    }

    async fn reject(
        &self,
        req: Request<RejectRequest>,
    ) -> Result<Response<RejectResponse>, Status> {
        principal(&req)?;
        let (facts, draft) = draft_of(&req);
        let r = req.into_inner();
        group_of(&r.topic, &r.consumer_group)?;
        let journal = self.journal()?;
        let head = journal.head(&r.topic).map(|h| *h.borrow()).unwrap_or(0);
        let mut v = Vec::new();
        if r.sequence == 0 || r.sequence > head {
            v.push(FieldViolation::new(
                "sequence",
                format!("must be 1..={head} (the topic's head)"),
            ));
        }
        if r.reason.trim().is_empty() || r.reason.chars().count() > 500 {
            v.push(FieldViolation::new(
                "reason",
                "1-500 characters: why the event is refused",
            ));
        }
        if !v.is_empty() {
            return Err(invalid(v));
        }
        // The call's audit record is committed with the rejection.
        let index = journal
            .reject_audited(
                &r.topic,
                &r.consumer_group,
                r.sequence,
                r.reason.trim(),
                draft,
            )
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
        let status = self
            .journal()?
            .status(&r.event_id)
            .await?
            .ok_or_else(|| Status::not_found(format!("no event {:?}", r.event_id)))?;
        // The producer and auditors may see an event's fate; nobody else learns it exists.
        if status.producer != who.agency.as_str() && who.role != crate::domain::Role::Auditor {
            return Err(Status::not_found(format!("no event {:?}", r.event_id)));
        }
        use crate::{
            exchange::journal::GroupState,
            pb::v1::{ConsumerGroupStatus, DeliveryState},
        };
        let groups = status
            .groups
            .into_iter()
            .map(|(g, s)| {
                let (state, reason) = match s {
                    GroupState::Accepted => (DeliveryState::Accepted, String::new()),
                    GroupState::Delivered => (DeliveryState::Delivered, String::new()),
                    GroupState::Acknowledged => (DeliveryState::Acknowledged, String::new()),
                    GroupState::Rejected(r) => (DeliveryState::Rejected, r),
                };
                ConsumerGroupStatus {
                    consumer_group: g,
                    state: state as i32,
                    reason,
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::v1::{DeathRecorded, Event, Marriage, PersonalIdReissued, event::Payload};

    fn delivered(sequence: u64, payload: Option<Payload>) -> SubscribedEvent {
        SubscribedEvent {
            sequence,
            event: payload.map(|p| Event {
                occurred_at_unix_ms: 0,
                payload: Some(p),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_delivery_record_names_each_citizen_once_and_the_event_types() {
        let batch = [
            delivered(
                7,
                Some(Payload::DeathRecorded(DeathRecorded {
                    personal_id: "031095000001".into(),
                    ..Default::default()
                })),
            ),
            delivered(
                8,
                Some(Payload::PersonalIdReissued(PersonalIdReissued {
                    old_personal_id: "031095000001".into(),
                    new_personal_id: "001195000123".into(),
                    ..Default::default()
                })),
            ),
            // Does not decode: delivered as is, adds nothing to the record.
            delivered(9, None),
            delivered(
                10,
                Some(Payload::Marriage(Marriage {
                    spouse1_personal_id: "not an id".into(),
                    spouse2_personal_id: "031195000002".into(),
                    ..Default::default()
                })),
            ),
        ];
        let facts = delivery_facts(&batch);
        assert_eq!(
            facts.subjects,
            ["001195000123", "031095000001", "031195000002"]
        );
        assert_eq!(
            facts.fields,
            [
                "event:death_recorded",
                "event:marriage",
                "event:personal_id_reissued"
            ]
        );
        assert!(facts.purpose.is_empty() && facts.recorded.is_none());
        assert_eq!(
            delivery_detail("population", "civil-registry-hp", &batch),
            "delivered:population:civil-registry-hp:7-10"
        );
        assert_eq!(delivery_facts(&[]), Facts::default());
    }
}
