//! What the gateway reports as its health, per service: a plain function of what it knows —
//! whether the store commits (the audit log fails closed, so no call completes without it),
//! whether the population directory answers (look-ups only), whether it is draining. One watch
//! channel holds the conditions; a task applies every change to the gRPC health service (served
//! on the API port, audited, and on the admin port for orchestrators, not audited), and the
//! admin port's `/readyz` reads the same channel.

use std::time::Duration;

use tokio::sync::watch;
use tonic_health::{ServingStatus, server::HealthReporter};

/// The services health reports on, besides the overall `""`.
pub(crate) const SERVICES: &[&str] = &[
    "civgate.v1.Citizens",
    "civgate.v1.Exchange",
    "civgate.v1.Audit",
];

/// The population directory, as the gateway last found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Directory {
    /// No `[upstream]`: look-ups answer UNAVAILABLE.
    NotConfigured,
    /// Not probed yet.
    Unknown,
    Reachable,
    Unreachable,
}

impl Directory {
    /// What one probe found.
    pub fn probed(answered: bool) -> Self {
        if answered {
            Directory::Reachable
        } else {
            Directory::Unreachable
        }
    }
}

/// Everything health depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Conditions {
    pub store_ok: bool,
    pub directory: Directory,
    pub draining: bool,
}

impl Default for Conditions {
    fn default() -> Self {
        Self {
            store_ok: true,
            directory: Directory::Unknown,
            draining: false,
        }
    }
}

/// Whether `service` (`""`: the gateway as a whole) is serving under `c`.
pub(crate) fn serving(c: Conditions, service: &str) -> bool {
    let overall = c.store_ok && !c.draining;
    match service {
        "civgate.v1.Citizens" => overall && c.directory == Directory::Reachable,
        _ => overall,
    }
}

/// `""` and every service with its status, in a fixed order.
pub(crate) fn statuses(c: Conditions) -> impl Iterator<Item = (&'static str, bool)> {
    std::iter::once("")
        .chain(SERVICES.iter().copied())
        .map(move |s| (s, serving(c, s)))
}

/// The gateway's health: the conditions, and where they are reported.
#[derive(Clone)]
pub(crate) struct Health {
    conditions: watch::Sender<Conditions>,
    reporter: HealthReporter,
}

impl Health {
    pub fn new(reporter: HealthReporter, directory: Directory) -> Self {
        let (conditions, _) = watch::channel(Conditions {
            directory,
            ..Conditions::default()
        });
        Self {
            conditions,
            reporter,
        }
    }

    pub fn watch(&self) -> watch::Receiver<Conditions> {
        self.conditions.subscribe()
    }

    pub fn set_store(&self, ok: bool) {
        self.conditions
            .send_if_modified(|c| std::mem::replace(&mut c.store_ok, ok) != ok);
    }

    /// What the last probe found; a change between reachable and unreachable is logged.
    pub fn set_directory(&self, d: Directory) {
        let up = if d == Directory::Reachable { 1.0 } else { 0.0 };
        metrics::gauge!(crate::telemetry::UPSTREAM_UP).set(up);
        let mut was = d;
        let changed = self.conditions.send_if_modified(|c| {
            was = std::mem::replace(&mut c.directory, d);
            was != d
        });
        match (changed, was, d) {
            (true, Directory::Reachable, Directory::Unreachable) => tracing::warn!(
                "the population directory stopped answering: look-ups are NOT_SERVING until it does"
            ),
            (true, Directory::Unreachable, Directory::Reachable) => {
                tracing::info!("the population directory answers again: look-ups are SERVING")
            }
            _ => {}
        }
    }

    /// Draining: every service NOT_SERVING, applied before this returns.
    pub async fn drain(&self) {
        self.conditions.send_modify(|c| c.draining = true);
        self.apply().await;
    }

    /// Reports the current conditions to the gRPC health service.
    pub async fn apply(&self) {
        let c = *self.conditions.borrow();
        for (service, up) in statuses(c) {
            let status = if up {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            self.reporter.set_service_status(service, status).await;
        }
    }

    /// Applies every change until the gateway stops.
    pub fn spawn_reporting(&self) -> tokio::task::JoinHandle<()> {
        let (health, mut rx) = (self.clone(), self.watch());
        tokio::spawn(async move {
            health.apply().await;
            while rx.changed().await.is_ok() {
                rx.borrow_and_update();
                health.apply().await;
            }
        })
    }
}

/// How often the directory is probed, and how long a probe may take.
pub(crate) const PROBE_EVERY: Duration = Duration::from_secs(1);
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_service_serves_when_what_it_needs_does() {
        use Directory::*;
        let c = |store_ok, directory, draining| Conditions {
            store_ok,
            directory,
            draining,
        };
        // (conditions, overall, Citizens, Exchange)
        let rows = [
            (c(true, Reachable, false), true, true, true),
            // The directory down: look-ups only.
            (c(true, Unreachable, false), true, false, true),
            (c(true, Unknown, false), true, false, true),
            (c(true, NotConfigured, false), true, false, true),
            // The store stalled: nothing completes (the audit log fails closed).
            (c(false, Reachable, false), false, false, false),
            // Draining: nothing new.
            (c(true, Reachable, true), false, false, false),
        ];
        for (i, (cond, overall, citizens, exchange)) in rows.into_iter().enumerate() {
            assert_eq!(serving(cond, ""), overall, "row {i}");
            assert_eq!(serving(cond, "civgate.v1.Citizens"), citizens, "row {i}");
            assert_eq!(serving(cond, "civgate.v1.Exchange"), exchange, "row {i}");
            assert_eq!(serving(cond, "civgate.v1.Audit"), exchange, "row {i}");
            assert_eq!(statuses(cond).count(), 4);
        }
    }
}
