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
            .and_then(|(id, a)| address::scope_of(&topic, &id, &a.provinces));
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

/// The hook `/metrics` runs before it renders.
pub(crate) fn scrape_hook(journal: Journal, state: crate::state::Shared) -> telemetry::ScrapeHook {
    Arc::new(move || {
        let (journal, state) = (journal.clone(), state.clone());
        Box::pin(async move {
            let policy = state.load().policy.clone();
            observe(&journal, &policy).await;
        })
    })
}
