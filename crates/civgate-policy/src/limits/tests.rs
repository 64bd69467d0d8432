//! Unit tests of `limits`.

use super::*;
use crate::Agency;
use governor::clock::FakeRelativeClock;

fn policy(ids: &[&str]) -> Policy {
    let mut p = Policy::default();
    for id in ids {
        p.agencies
            .insert(id.parse().unwrap(), Agency::of_role(Role::CivilRegistry));
    }
    p
}

fn rate(per_second: u32, burst: u32) -> Rate {
    Rate {
        per_second: NonZeroU32::new(per_second).unwrap(),
        burst: NonZeroU32::new(burst).unwrap(),
    }
}

fn section(per_second: u32, burst: u32) -> QuotasSection {
    QuotasSection {
        reads: rate(per_second, burst),
        ..Default::default()
    }
}

#[test]
fn exactly_burst_plus_rate_times_t_calls_pass() {
    let clock = FakeRelativeClock::default();
    let a: AgencyId = "registry-hp".parse().unwrap();
    let q = Quotas::build(
        clock.clone(),
        &section(10, 20),
        &policy(&["registry-hp"]),
        None,
    );
    let mut passed = 0;
    // From t = 0 to t = 3 s in 10 ms steps, calling as fast as allowed at every step.
    for step in 0..=300 {
        while q.check(&a, Bucket::Reads) == Decision::Allow {
            passed += 1;
        }
        if step < 300 {
            clock.advance(Duration::from_millis(10));
        }
    }
    // burst 20 + 10/s × 3 s.
    assert_eq!(passed, 50);
    assert!(matches!(
        q.check(&a, Bucket::Reads),
        Decision::Refuse {
            retry_after_secs: 1
        }
    ));
}

#[test]
fn a_batch_takes_all_its_units_or_none() {
    let clock = FakeRelativeClock::default();
    let a: AgencyId = "registry-hp".parse().unwrap();
    let q = Quotas::build(
        clock.clone(),
        &section(100, 200),
        &policy(&["registry-hp"]),
        None,
    );
    let n = |k| NonZeroU32::new(k).unwrap();
    assert_eq!(q.check_n(&a, Bucket::Reads, n(150)), Decision::Allow);
    // 50 left: a batch of 100 is refused whole and takes nothing.
    assert!(matches!(
        q.check_n(&a, Bucket::Reads, n(100)),
        Decision::Refuse {
            retry_after_secs: 1
        }
    ));
    assert_eq!(q.check_n(&a, Bucket::Reads, n(50)), Decision::Allow);
    // More than the burst can never pass; it says when a full bucket is back.
    clock.advance(Duration::from_secs(10));
    assert!(matches!(
        q.check_n(&a, Bucket::Reads, n(201)),
        Decision::Refuse {
            retry_after_secs: 2
        }
    ));
    assert!(Bucket::of_method("/civgate.v1.Citizens/BatchGetCitizens").is_none());
    assert_eq!(
        Bucket::of_method("/grpc.health.v1.Health/Check"),
        Some(Bucket::Probes)
    );
}

#[test]
fn refusals_are_metered_per_certificate() {
    let m = RefusalMeter::new(rate(1, 3));
    let (a, b) = (CertFingerprint([1; 32]), CertFingerprint([2; 32]));
    assert_eq!((0..10).filter(|_| m.record(&a)).count(), 3);
    assert!(m.record(&b));
    assert_eq!(m.tracked(), 2);
}

#[test]
fn retry_after_is_whole_seconds_and_honourable() {
    let clock = FakeRelativeClock::default();
    let a: AgencyId = "registry-hp".parse().unwrap();
    let q = Quotas::build(
        clock.clone(),
        &section(1, 1),
        &policy(&["registry-hp"]),
        None,
    );
    assert_eq!(q.check(&a, Bucket::Reads), Decision::Allow);
    let Decision::Refuse { retry_after_secs } = q.check(&a, Bucket::Reads) else {
        panic!()
    };
    assert_eq!(retry_after_secs, 1);
    clock.advance(Duration::from_secs(retry_after_secs));
    assert_eq!(q.check(&a, Bucket::Reads), Decision::Allow);
}

#[test]
fn agencies_and_buckets_do_not_share_quota() {
    let clock = FakeRelativeClock::default();
    let (a, b): (AgencyId, AgencyId) = ("a".parse().unwrap(), "b".parse().unwrap());
    let q = Quotas::build(clock, &section(1, 2), &policy(&["a", "b"]), None);
    assert_eq!(q.check(&a, Bucket::Reads), Decision::Allow);
    assert_eq!(q.check(&a, Bucket::Reads), Decision::Allow);
    assert!(matches!(
        q.check(&a, Bucket::Reads),
        Decision::Refuse { .. }
    ));
    assert_eq!(q.check(&b, Bucket::Reads), Decision::Allow);
    assert_eq!(q.check(&a, Bucket::Publishes), Decision::Allow);
}

#[test]
fn overrides_beat_role_defaults_beat_the_default() {
    let mut s = section(5, 5);
    s.roles.insert(
        Role::CivilRegistry,
        RateSet {
            reads: Some(rate(50, 50)),
            publishes: None,
            probes: None,
        },
    );
    s.agencies.insert(
        "a".parse().unwrap(),
        RateSet {
            reads: Some(rate(7, 7)),
            publishes: None,
            probes: None,
        },
    );
    assert_eq!(
        s.rate(&"a".parse().unwrap(), Role::CivilRegistry, Bucket::Reads),
        rate(7, 7)
    );
    assert_eq!(
        s.rate(&"b".parse().unwrap(), Role::CivilRegistry, Bucket::Reads),
        rate(50, 50)
    );
    assert_eq!(
        s.rate(&"b".parse().unwrap(), Role::Auditor, Bucket::Reads),
        rate(5, 5)
    );
}

#[test]
fn reload_keeps_buckets_whose_rate_did_not_change() {
    let clock = FakeRelativeClock::default();
    let a: AgencyId = "a".parse().unwrap();
    let p = policy(&["a", "b"]);
    let q1 = Quotas::build(clock.clone(), &section(1, 1), &p, None);
    assert_eq!(q1.check(&a, Bucket::Reads), Decision::Allow);
    let q2 = Quotas::build(clock.clone(), &section(1, 1), &p, Some(&q1));
    assert!(
        matches!(q2.check(&a, Bucket::Reads), Decision::Refuse { .. }),
        "no fresh burst on reload"
    );
    let q3 = Quotas::build(clock, &section(2, 2), &p, Some(&q2));
    assert_eq!(
        q3.check(&a, Bucket::Reads),
        Decision::Allow,
        "a changed rate starts a new bucket"
    );
}

#[test]
fn shadow_mode_refuses_nothing_and_says_what_it_would_refuse() {
    let clock = FakeRelativeClock::default();
    let a: AgencyId = "a".parse().unwrap();
    let mut s = section(1, 3);
    s.shadow = true;
    let q = Quotas::build(clock, &s, &policy(&["a"]), None);
    let outcomes: Vec<_> = (0..10).map(|_| q.check(&a, Bucket::Reads)).collect();
    assert_eq!(
        outcomes.iter().filter(|d| **d == Decision::Allow).count(),
        3
    );
    assert_eq!(
        outcomes
            .iter()
            .filter(|d| matches!(d, Decision::WouldRefuse { .. }))
            .count(),
        7
    );
}

#[test]
fn in_flight_caps_per_agency_and_in_total() {
    let s = QuotasSection {
        max_in_flight_per_agency: 2,
        max_in_flight_total: 3,
        ..Default::default()
    };
    let f = InFlight::new(&s);
    let (a, b): (AgencyId, AgencyId) = ("a".parse().unwrap(), "b".parse().unwrap());
    let admit = |x: &AgencyId| f.admit(x, f.admit_total()?);
    let p1 = admit(&a).unwrap();
    let _p2 = admit(&a).unwrap();
    assert_eq!(admit(&a).err(), Some(Busy::AgencyAtCap));
    let _p3 = admit(&b).unwrap();
    assert_eq!(admit(&b).err(), Some(Busy::Overloaded));
    drop(p1);
    assert!(admit(&b).is_ok());
}

#[test]
fn past_half_full_each_agency_in_flight_gets_an_equal_share() {
    let s = QuotasSection {
        max_in_flight_per_agency: 100,
        max_in_flight_total: 10,
        ..Default::default()
    };
    let f = InFlight::new(&s);
    let (a, b): (AgencyId, AgencyId) = ("a".parse().unwrap(), "b".parse().unwrap());
    let admit = |x: &AgencyId| f.admit(x, f.admit_total()?);
    // Alone, a may fill the gateway past half...
    let mut held: Vec<_> = (0..6).map(|_| admit(&a).unwrap()).collect();
    // ...but once b has calls in flight, a's share is 10 / 2 = 5: a is refused, b is not.
    held.push(admit(&b).unwrap());
    assert_eq!(admit(&a).err(), Some(Busy::AgencyAtCap));
    held.push(admit(&b).unwrap());
    assert!(admit(&b).is_ok());
    held.clear();
    assert!(admit(&a).is_ok());
}

#[test]
fn harvesting_guard_warns_then_denies_new_citizens_only() {
    let g = HarvestGuard::default();
    let s = HarvestSection {
        window_secs: 60,
        warn_distinct: 3,
        deny_distinct: 5,
        shadow: false,
    };
    let a: AgencyId = "a".parse().unwrap();
    let t0 = Instant::now();
    let id = |i: u32| vec![format!("0312030{i:05}")];
    for i in 0..3 {
        assert!(matches!(g.check(&s, &a, &id(i), t0), Harvest::Allow { .. }));
    }
    assert_eq!(g.check(&s, &a, &id(3), t0), Harvest::Warn { distinct: 4 });
    assert_eq!(g.check(&s, &a, &id(4), t0), Harvest::Allow { distinct: 5 });
    assert_eq!(g.check(&s, &a, &id(5), t0), Harvest::Deny { distinct: 6 });
    // Someone already read is still readable.
    assert!(matches!(g.check(&s, &a, &id(2), t0), Harvest::Allow { .. }));
    // The window slides: an hour later everything is forgotten.
    let later = t0 + Duration::from_secs(61);
    assert_eq!(
        g.check(&s, &a, &id(5), later),
        Harvest::Allow { distinct: 1 }
    );
    g.retain_recent(&s, later + Duration::from_secs(61));
    assert_eq!(g.agencies(), 0);
}

#[test]
fn deliveries_count_in_the_window_and_are_never_refused() {
    let g = HarvestGuard::default();
    let s = HarvestSection {
        window_secs: 60,
        warn_distinct: 100,
        deny_distinct: 2,
        shadow: false,
    };
    let a: AgencyId = "a".parse().unwrap();
    let now = Instant::now();
    let ids: Vec<String> = (0..3).map(|i| format!("id{i}")).collect();
    assert_eq!(
        g.note(&s, &a, &ids, now),
        Harvest::WouldDeny { distinct: 3 }
    );
    // The look-up of a further citizen is refused; of one delivered, not.
    assert_eq!(
        g.check(&s, &a, &["id9".to_owned()], now),
        Harvest::Deny { distinct: 4 }
    );
    assert!(matches!(
        g.check(&s, &a, &["id1".to_owned()], now),
        Harvest::Allow { .. }
    ));
}

#[test]
fn harvesting_guard_shadow_mode_counts_without_denying() {
    let g = HarvestGuard::default();
    let s = HarvestSection {
        window_secs: 60,
        warn_distinct: 100,
        deny_distinct: 2,
        shadow: true,
    };
    let a: AgencyId = "a".parse().unwrap();
    let now = Instant::now();
    let outcomes: Vec<_> = (0..5)
        .map(|i| g.check(&s, &a, &[format!("id{i}")], now))
        .collect();
    assert_eq!(
        outcomes
            .iter()
            .filter(|h| matches!(h, Harvest::WouldDeny { .. }))
            .count(),
        3
    );
    assert!(!outcomes.iter().any(|h| matches!(h, Harvest::Deny { .. })));
}
