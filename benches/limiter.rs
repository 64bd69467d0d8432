//! CPU cost of the per-call limit decisions (quota check, in-flight admission, harvesting
//! guard), and the memory they hold with 100,000 agencies.

use std::{hint::black_box, time::Instant};

use civgate::{
    domain::{AgencyId, Role},
    limits::{Bucket, HarvestGuard, HarvestSection, InFlight, Quotas, QuotasSection},
    policy::{Agency, Policy},
};
use criterion::{Criterion, criterion_group, criterion_main};
use governor::clock::DefaultClock;

fn policy(n: usize) -> Policy {
    let mut p = Policy::default();
    for i in 0..n {
        p.agencies.insert(
            format!("agency-{i}").parse().unwrap(),
            Agency::of_role(Role::CivilRegistry),
        );
    }
    p
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn limiter(c: &mut Criterion) {
    let section = QuotasSection::default();
    let p = policy(1_000);
    let quotas = Quotas::build(DefaultClock::default(), &section, &p, None);
    let in_flight = InFlight::new(&section);
    let guard = HarvestGuard::default();
    let harvest = HarvestSection {
        window_secs: 3_600,
        warn_distinct: 1_000_000,
        deny_distinct: 0,
        shadow: false,
    };
    let agencies: Vec<AgencyId> = p.agencies.keys().cloned().collect();
    let mut i = 0usize;
    c.bench_function("quota check (1,000 agencies)", |b| {
        b.iter(|| {
            i = (i + 1) % agencies.len();
            black_box(quotas.check(&agencies[i], Bucket::Reads))
        })
    });
    c.bench_function("in-flight admit + release", |b| {
        b.iter(|| {
            i = (i + 1) % agencies.len();
            black_box(
                in_flight
                    .admit_total()
                    .and_then(|t| in_flight.admit(&agencies[i], t))
                    .ok(),
            )
        })
    });
    let ids: Vec<String> = (0..100_000).map(|n| format!("031203{n:06}")).collect();
    let now = Instant::now();
    c.bench_function("harvesting guard, one citizen", |b| {
        b.iter(|| {
            i = (i + 1) % ids.len();
            black_box(guard.check(
                &harvest,
                &agencies[i % agencies.len()],
                std::slice::from_ref(&ids[i]),
                now,
            ))
        })
    });

    // Memory with 100,000 agencies: quota buckets for all, in-flight slots and a harvesting
    // window with one citizen for each.
    let before = rss_kib();
    let big = policy(100_000);
    let q = Quotas::build(DefaultClock::default(), &section, &big, None);
    let f = InFlight::new(&section);
    let g = HarvestGuard::default();
    for (n, a) in big.agencies.keys().enumerate() {
        let _ = q.check(a, Bucket::Reads);
        drop(f.admit_total().and_then(|t| f.admit(a, t)));
        let _ = g.check(&harvest, a, std::slice::from_ref(&ids[n % ids.len()]), now);
    }
    let after = rss_kib();
    println!(
        "memory: 100,000 agencies (policy + quota buckets + in-flight slots + harvesting windows): {:.1} MiB",
        (after.saturating_sub(before)) as f64 / 1024.0
    );
    black_box((q, f, g, big));
}

criterion_group!(benches, limiter);
criterion_main!(benches);
