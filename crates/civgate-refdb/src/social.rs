//! A reference social-insurance agency: it consumes the requests the flow table addresses to
//! it on `civil-status` (a linked birth, a linked death) and answers each on its own topic — a
//! child's health-insurance card, a funeral allowance — then acknowledges. What the demo and
//! the tests run in place of the agency's own system.

use std::{net::SocketAddr, path::Path};

use anyhow::{Context, Result};
use tracing::info;

use crate::{
    client,
    pb::v1::{
        AckRequest, Event, FuneralAllowanceDecided, HealthInsuranceCardIssued, PublishRequest,
        SubscribeRequest, SubscribedEvent, event::Payload, exchange_client::ExchangeClient,
    },
};

/// The consumer group of the reference agency.
pub const GROUP: &str = "social-insurance";

/// The answer the agency gives to a request addressed to it (`None`: nothing it answers).
pub fn answer(e: &SubscribedEvent) -> Option<Event> {
    let event = e.event.as_ref()?;
    let today = crate::domain::today();
    // A number of the event's own: the same request always gets the same card.
    let serial: String = e
        .event_id
        .bytes()
        .filter(u8::is_ascii_digit)
        .take(10)
        .map(char::from)
        .collect();
    let payload = match event.payload.as_ref()? {
        Payload::Birth(b) => {
            let born = crate::domain::parse_date(&b.date_of_birth).ok()?;
            // Free for children under 6 (Law on Health Insurance, art. 12(3)(c)).
            let until = born
                .replace_year(born.year() + 6)
                .unwrap_or(born)
                .previous_day()
                .unwrap_or(born);
            Payload::HealthInsuranceCardIssued(HealthInsuranceCardIssued {
                personal_id: String::new(),
                card_number: format!("TE1{:0>10}", serial),
                valid_from: crate::domain::format_date(today),
                valid_until: crate::domain::format_date(until),
            })
        }
        Payload::Death(d) => Payload::FuneralAllowanceDecided(FuneralAllowanceDecided {
            personal_id: d.personal_id.clone(),
            decision_number: format!("{serial}/QĐ-BHXH"),
            decided_on: crate::domain::format_date(today),
            granted: true,
        }),
        _ => return None,
    };
    Some(Event {
        case_reference: event.case_reference.clone(),
        occurred_at_unix_ms: crate::audit::log::now_ms(),
        in_reply_to: e.event_id.clone(),
        payload: Some(payload),
    })
}

/// Consumes what is addressed to the agency `social-insurance` until the stream ends.
pub async fn consume(addr: SocketAddr, certs_dir: &Path) -> Result<()> {
    let channel = client::connect(addr, certs_dir, Some("social-insurance")).await?;
    let mut ex = ExchangeClient::new(channel);
    let mut stream = ex
        .subscribe(SubscribeRequest {
            topic: "civil-status".into(),
            consumer_group: GROUP.into(),
            from_sequence: None,
        })
        .await
        .context("subscribing to civil-status as the social-insurance agency")?
        .into_inner();
    while let Some(e) = stream.message().await? {
        if let Some(answer) = answer(&e) {
            let r = ex
                .publish(PublishRequest {
                    idempotency_key: format!("si-{}", e.event_id),
                    event: Some(answer),
                })
                .await?
                .into_inner();
            info!(
                seq = e.sequence,
                answer_seq = r.sequence,
                "social insurance answered"
            );
        }
        ex.ack(AckRequest {
            topic: "civil-status".into(),
            consumer_group: GROUP.into(),
            sequence: e.sequence,
        })
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::v1::{Birth, Death};

    fn delivered(payload: Payload) -> SubscribedEvent {
        SubscribedEvent {
            event_id: "0190a1b2c3d4e5f6a7b8c9d0e1f2a3b4".into(),
            sequence: 1,
            event: Some(Event {
                case_reference: "HP-1".into(),
                payload: Some(payload),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_birth_gets_a_card_until_six_and_a_death_an_allowance() {
        let a = answer(&delivered(Payload::Birth(Birth {
            date_of_birth: "2026-02-27".into(),
            ..Default::default()
        })))
        .unwrap();
        assert_eq!(a.case_reference, "HP-1");
        assert_eq!(a.in_reply_to, "0190a1b2c3d4e5f6a7b8c9d0e1f2a3b4");
        let Some(Payload::HealthInsuranceCardIssued(c)) = a.payload else {
            panic!("{a:?}")
        };
        assert_eq!(c.valid_until, "2032-02-26");
        assert_eq!(c.card_number.len(), 13);
        let a = answer(&delivered(Payload::Death(Death {
            personal_id: "031095000001".into(),
            ..Default::default()
        })))
        .unwrap();
        assert!(
            matches!(a.payload, Some(Payload::FuneralAllowanceDecided(f)) if f.personal_id == "031095000001")
        );
        assert!(answer(&delivered(Payload::Marriage(Default::default()))).is_none());
    }
}
