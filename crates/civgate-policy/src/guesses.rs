//! Guessing through verification. `VerifyCitizen` answers match or no match, so an agency that
//! may check a date of birth could find it by trying the days of the year the personal ID
//! encodes (a few hundred calls), and a marital status in three. Per agency and citizen, the
//! verifications that did not match are counted in a window; at the limit, further
//! verifications of that citizen by that agency are refused until the window has passed. An
//! agency checking what a citizen told it gets a match, or one or two no-matches; it never
//! comes near the limit.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use civgate_domain::AgencyId;

/// Entries kept before the expired ones are swept (memory stays bounded by the rate of
/// verifications times the window).
const SWEEP_ABOVE: usize = 100_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Window {
    started: Instant,
    failures: u32,
}

/// May another verification go ahead, given the window so far? `Err`: refused, for this long.
fn decide(w: Option<Window>, limit: u32, window: Duration, now: Instant) -> Result<(), Duration> {
    match w {
        _ if limit == 0 => Ok(()),
        Some(w) if now.duration_since(w.started) < window && w.failures >= limit => {
            Err(window.saturating_sub(now.duration_since(w.started)))
        }
        _ => Ok(()),
    }
}

/// Non-matching verifications per (agency, citizen), in fixed windows.
#[derive(Debug, Default)]
pub struct FailedVerifications {
    windows: Mutex<HashMap<(AgencyId, String), Window>>,
}

impl FailedVerifications {
    /// `Err(retry_after)` if `agency` has had `limit` non-matching verifications of `id` in
    /// the current window (`limit` 0: no limit).
    pub fn check(
        &self,
        agency: &AgencyId,
        id: &str,
        limit: u32,
        window: Duration,
        now: Instant,
    ) -> Result<(), Duration> {
        let w = self
            .windows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&(agency.clone(), id.to_owned()))
            .copied();
        decide(w, limit, window, now)
    }

    /// A verification of `id` by `agency` that did not match.
    pub fn failed(&self, agency: &AgencyId, id: &str, window: Duration, now: Instant) {
        let mut map = self
            .windows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() > SWEEP_ABOVE {
            map.retain(|_, w| now.duration_since(w.started) < window);
        }
        let w = map
            .entry((agency.clone(), id.to_owned()))
            .or_insert(Window {
                started: now,
                failures: 0,
            });
        if now.duration_since(w.started) >= window {
            *w = Window {
                started: now,
                failures: 0,
            };
        }
        w.failures = w.failures.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_the_limit_an_agency_may_not_verify_that_citizen_until_the_window_passes() {
        let t0 = Instant::now();
        let day = Duration::from_secs(86_400);
        let w = |failures, ago: u64| {
            Some(Window {
                started: t0,
                failures,
            })
            .map(|w| (w, t0 + Duration::from_secs(ago)))
        };
        // (window so far and now, limit, allowed)
        let rows = [
            (None, 5, true),
            (w(4, 10), 5, true),
            (w(5, 10), 5, false),
            (w(50, 10), 5, false),
            // The window has passed.
            (w(5, 86_400), 5, true),
            // No limit.
            (w(500, 10), 0, true),
        ];
        for (i, (state, limit, allowed)) in rows.into_iter().enumerate() {
            let (win, now) = state.map_or((None, t0), |(w, now)| (Some(w), now));
            assert_eq!(decide(win, limit, day, now).is_ok(), allowed, "row {i}");
        }
    }

    #[test]
    fn failures_count_per_agency_and_citizen() {
        let f = FailedVerifications::default();
        let (a, b): (AgencyId, AgencyId) = (
            "registry-hp".parse().unwrap(),
            "registry-hn".parse().unwrap(),
        );
        let now = Instant::now();
        let hour = Duration::from_secs(3600);
        for _ in 0..3 {
            f.failed(&a, "031095000001", hour, now);
        }
        assert!(f.check(&a, "031095000001", 3, hour, now).is_err());
        // Another citizen, another agency: their own counts.
        assert!(f.check(&a, "031095000002", 3, hour, now).is_ok());
        assert!(f.check(&b, "031095000001", 3, hour, now).is_ok());
        let retry = f.check(&a, "031095000001", 3, hour, now + Duration::from_secs(600));
        assert_eq!(retry, Err(Duration::from_secs(3000)));
        assert!(f.check(&a, "031095000001", 3, hour, now + hour).is_ok());
    }
}
