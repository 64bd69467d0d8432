//! Consumer lag and dead letters, measured when `/metrics` is scraped: per consumer group
//! (stored, or declared in `consumer_groups`), the events addressed to it after its
//! acknowledgement and the age of the oldest of them; per topic, the head (last committed
//! sequence) and the events rejected into dead letters.

use std::sync::Arc;

use super::{address, journal::Journal};
use crate::{policy::Policy, telemetry};

/// Reads the journal's groups and backlogs and sets the gauges. A group whose agency is no
/// longer configured is measured against the whole topic.
pub(crate) async fn observe(journal: &Journal, policy: &Policy) {
    let now = crate::audit::log::now_ms();
    let mut groups = match journal.groups().await {
        Ok(g) => g,
        Err(e) => {
            tracing::warn!(error = %e, "consumer lag: cannot read the groups");
            return;
        }
    };
    // A declared group that never acknowledged lags by everything addressed to it.
    for h in address::holders(policy) {
        if !groups.iter().any(|(t, g, _)| t == h.topic && *g == h.group) {
            groups.push((h.topic.to_owned(), h.group, 0));
        }
    }
    for (topic, group, acked) in groups {
        let scope = group
            .agency
            .parse()
            .ok()
            .and_then(|id| policy.agencies.get(&id).map(|a| (id, a)))
            .and_then(|(id, a)| address::scope_of(&topic, a.role, &id, &a.provinces));
        match journal.backlog(&topic, acked, scope.as_deref()).await {
            Ok((events, oldest)) => {
                let age = oldest.map_or(0.0, |t| (now - t).max(0) as f64 / 1000.0);
                telemetry::exchange_backlog(&topic, &group.agency, &group.name, events, age);
            }
            Err(e) => tracing::warn!(error = %e, %group, "consumer lag: cannot count the backlog"),
        }
    }
    for topic in [
        crate::exchange::validate::CIVIL_STATUS,
        crate::exchange::validate::POPULATION,
        crate::exchange::validate::SOCIAL_INSURANCE,
    ] {
        if let Some(head) = journal.head(topic) {
            metrics::gauge!(telemetry::EXCHANGE_HEAD, "topic" => topic).set(*head.borrow() as f64);
        }
    }
    match journal.dead_letters().await {
        Ok(per_topic) => {
            for (topic, n) in per_topic {
                telemetry::dead_letters(&topic, n);
            }
        }
        Err(e) => tracing::warn!(error = %e, "dead letters: cannot count"),
    }
}

/// The window of answers the answer-time quantiles describe.
const ANSWER_WINDOW_MS: i64 = 7 * 86_400_000;

/// Open and overdue requests, per agency awaited and request kind (zero for every pair a flow
/// asks for), and the answer times and late answers of the last week.
pub(crate) async fn observe_requests(journal: &Journal, snapshot: &crate::state::Snapshot) {
    let now = crate::audit::log::now_ms();
    let stats = match journal.request_stats(now, now - ANSWER_WINDOW_MS).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "open requests: cannot count");
            return;
        }
    };
    let policy = &snapshot.policy;
    let mut open = stats.open;
    for f in snapshot.cases.flows.iter() {
        let awaiting = crate::exchange::cases::answering_topic(f.answer).unwrap_or_default();
        open.entry((awaiting.to_owned(), f.request.to_owned()))
            .or_default();
    }
    for ((awaiting, kind), (n, overdue)) in open {
        for agency in crate::api::cases::awaited_agencies(policy, &awaiting) {
            let labels = [("awaiting_agency", agency), ("kind", kind.clone())];
            metrics::gauge!(telemetry::REQUESTS_OPEN, &labels).set(n as f64);
            metrics::gauge!(telemetry::REQUESTS_OVERDUE, &labels).set(overdue as f64);
        }
    }
    for ((agency, kind), mut ms) in stats.answer_ms {
        for (q, name) in [(0.5, "0.5"), (0.99, "0.99")] {
            if let Some(v) = crate::exchange::journal::quantile(&mut ms, q) {
                let labels = [
                    ("agency", agency.clone()),
                    ("kind", kind.clone()),
                    ("quantile", name.to_owned()),
                ];
                metrics::gauge!(telemetry::REQUEST_ANSWER, &labels).set(v as f64 / 1000.0);
            }
        }
        let late = stats
            .late
            .get(&(agency.clone(), kind.clone()))
            .copied()
            .unwrap_or(0);
        let labels = [("agency", agency), ("kind", kind)];
        metrics::gauge!(telemetry::REQUESTS_LATE, &labels).set(late as f64);
    }
}

/// The hook `/metrics` runs before it renders.
pub(crate) fn scrape_hook(journal: Journal, state: crate::state::Shared) -> telemetry::ScrapeHook {
    Arc::new(move || {
        let (journal, state) = (journal.clone(), state.clone());
        Box::pin(async move {
            let snapshot = state.load_full();
            observe(&journal, &snapshot.policy).await;
            observe_requests(&journal, &snapshot).await;
        })
    })
}
