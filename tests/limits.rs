//! Quotas, shadow mode, the harvesting guard and message limits, over real mTLS.

mod common;

use std::time::{Duration, Instant};

use civgate::{
    client,
    config::DEFAULT_CONFIG,
    pb::v1::{GetCitizenRequest, citizens_client::CitizensClient},
};
use common::Env;
use tonic::{Code, transport::Channel};
use tonic_types::StatusExt;

fn get(id: &str) -> GetCitizenRequest {
    GetCitizenRequest {
        case_reference: String::new(),
        personal_id: id.into(),
        purpose: "DEATH_REGISTRATION".into(),
    }
}

async fn registry(env: &Env, addr: std::net::SocketAddr) -> CitizensClient<Channel> {
    CitizensClient::new(
        client::connect(addr, &env.certs(), Some("registry-hp"))
            .await
            .unwrap(),
    )
}

/// The repository config with civil registries' reads limited to `rate`/s, burst `burst`.
fn with_reads(port: u16, rate: u32, burst: u32, extra: &str) -> String {
    let text = common::with_upstream_port(DEFAULT_CONFIG, port).replace(
        "[quotas.roles.civil_registry]\nreads = { per_second = 500, burst = 1000 }",
        &format!(
            "[quotas.roles.civil_registry]\nreads = {{ per_second = {rate}, burst = {burst} }}"
        ),
    );
    assert!(text.contains(&format!("per_second = {rate}, burst = {burst}")));
    format!("{text}\n{extra}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_quota_gets_resource_exhausted_with_an_honourable_retry_after() {
    let env = Env::new();
    let stack = env.start_directory().await;
    let gw = env
        .start_with(&with_reads(stack.directory.addr.port(), 1, 5, ""))
        .await;
    let mut c = registry(&env, gw.api_addr).await;
    let id = stack.people[0].personal_id.to_string();
    for _ in 0..5 {
        c.get_citizen(get(&id)).await.unwrap();
    }
    let err = c.get_citizen(get(&id)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let secs: u64 = err
        .metadata()
        .get("retry-after")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(secs >= 1);
    let retry = err.get_details_retry_info().expect("RetryInfo detail");
    assert_eq!(retry.retry_delay, Some(Duration::from_secs(secs)));
    // Honour it: after that long the call succeeds.
    tokio::time::sleep(Duration::from_secs(secs)).await;
    c.get_citizen(get(&id)).await.unwrap();
    // Other agencies' and other buckets' calls are not affected.
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        client::connect(gw.api_addr, &env.certs(), Some("registry-hp"))
            .await
            .unwrap(),
    );
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
    drop(stack.people);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_refuses_nothing_and_counts_what_it_would_refuse() {
    let env = Env::new();
    let stack = env.start_directory().await;
    let text = with_reads(stack.directory.addr.port(), 1, 3, "")
        .replace("[quotas]\nshadow = false", "[quotas]\nshadow = true");
    assert!(text.contains("shadow = true"));
    let gw = env.start_with(&text).await;
    let mut c = registry(&env, gw.api_addr).await;
    let id = stack.people[1].personal_id.to_string();
    let metric =
        "civgate_rate_limited_total{agency=\"registry-hp\",bucket=\"reads\",mode=\"shadow\"}";
    let count = || {
        civgate::telemetry::prometheus()
            .render()
            .lines()
            .find(|l| l.starts_with(metric))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = count();
    let started = Instant::now();
    for _ in 0..10 {
        c.get_citizen(get(&id)).await.unwrap();
    }
    // Burst 3 at 1/s: 7 (or 6, if a second passed meanwhile) would have been refused.
    let would = count() - before;
    let refill = started.elapsed().as_secs();
    assert!(
        would <= 7 && would + refill >= 7,
        "{would} would-refusals in {refill} s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harvesting_guard_denies_new_citizens_past_the_threshold() {
    let env = Env::new();
    let stack = env.start_directory().await;
    let text = common::with_upstream_port(DEFAULT_CONFIG, stack.directory.addr.port())
        .replace("warn_distinct = 10000", "warn_distinct = 2")
        .replace("deny_distinct = 0", "deny_distinct = 3");
    let gw = env.start_with(&text).await;
    let mut c = registry(&env, gw.api_addr).await;
    let ids: Vec<String> = stack
        .people
        .iter()
        .take(4)
        .map(|p| p.personal_id.to_string())
        .collect();
    for id in &ids[..3] {
        c.get_citizen(get(id)).await.unwrap();
    }
    let err = c.get_citizen(get(&ids[3])).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("harvesting guard"), "{err:?}");
    // Citizens already read in the window stay readable.
    c.get_citizen(get(&ids[0])).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mib_message_is_refused_without_the_gateway_growing_by_that_much() {
    let env = Env::new();
    let gw = env.spawn_binary();
    let hwm = || -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", gw.child.id()))
            .unwrap()
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap()
    };
    let before = hwm();
    let channel = client::connect(gw.api, &env.certs(), Some("registry-hp"))
        .await
        .unwrap();
    let mut c = CitizensClient::new(channel).max_encoding_message_size(200 * 1024 * 1024);
    let huge = "0".repeat(100 * 1024 * 1024);
    let err = c.get_citizen(get(&huge)).await.unwrap_err();
    assert!(
        matches!(
            err.code(),
            Code::ResourceExhausted
                | Code::OutOfRange
                | Code::Internal
                | Code::Cancelled
                | Code::Unavailable
        ),
        "{err:?}"
    );
    let grown_mib = (hwm().saturating_sub(before)) / 1024;
    assert!(grown_mib < 30, "gateway peak RSS grew by {grown_mib} MiB");
    // And it still serves.
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        client::connect(gw.api, &env.certs(), Some("registry-hp"))
            .await
            .unwrap(),
    );
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
}

/// p99 of a set of latencies.
fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

/// One agency's calls at a normal, steady rate; returns their latencies.
async fn steady(
    c: &mut CitizensClient<Channel>,
    ids: &[String],
    per_second: u32,
    n: usize,
) -> Vec<Duration> {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / per_second);
    // After a stall of the machine, carry on at the rate instead of catching up in a burst
    // that would exceed the quiet agency's own quota.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        tick.tick().await;
        let t = Instant::now();
        c.get_citizen(get(&ids[i % ids.len()]))
            .await
            .expect("the quiet agency's calls all succeed");
        out.push(t.elapsed());
    }
    out
}

/// A latency ratio: meaningful on an optimized build only (a debug build spends most of each
/// call in unoptimized code). `.ci/run` runs it with `cargo test --release`.
///
/// The quiet agency's p99 with the flood must stay within twice its p99 alone. On the shared
/// 2-core machines one 10 s window's p99 swings by 2× by itself (seen in both directions, the
/// build before and after a change alike), so a round is measured up to three times: one
/// round within the bound passes; a gateway that lets the flood slow the quiet agency fails
/// all three.
#[cfg_attr(debug_assertions, ignore = "latency ratio: run with --release")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_agency_does_not_slow_down_another() {
    let env = Env::new();
    let stack = env.start_directory().await;
    // Two civil registries: registry-hp floods, "population" (re-roled for the test) is quiet.
    let text = with_reads(stack.directory.addr.port(), 50, 50, "")
        .replace("role = \"population_db\"", "role = \"civil_registry\"");
    let gw = env.start_with(&text).await;
    let ids: Vec<String> = stack
        .people
        .iter()
        .take(200)
        .map(|p| p.personal_id.to_string())
        .collect();
    let mut quiet = CitizensClient::new(
        client::connect(gw.api_addr, &env.certs(), Some("population"))
            .await
            .unwrap(),
    );
    let flooder = client::connect(gw.api_addr, &env.certs(), Some("registry-hp"))
        .await
        .unwrap();
    let mut rounds = Vec::new();
    for _ in 0..3 {
        let (a, d, refused) = flood_round(&mut quiet, &flooder, &ids).await;
        eprintln!(
            "quiet agency p99 alone {a:?}, during the flood {d:?}; flood refused {refused} calls"
        );
        assert!(refused > 100, "the flood must be over quota");
        rounds.push((a, d));
        if d <= a * 2 {
            return;
        }
    }
    panic!(
        "in every round the flood slowed the quiet agency beyond 2× (p99 alone, during): {rounds:?}"
    );
}

/// The quiet agency's p99 alone, then during a flood by registry-hp, and how many of the
/// flood's calls were refused.
async fn flood_round(
    quiet: &mut CitizensClient<Channel>,
    flooder: &Channel,
    ids: &[String],
) -> (Duration, Duration, u64) {
    let alone = steady(quiet, ids, 40, 400).await;

    // registry-hp: 32 concurrent streams at 10× its quota (500 calls/s in all).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let lost = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut flood = Vec::new();
    for t in 0..32 {
        let (mut c, stop, refused, lost, ids) = (
            CitizensClient::new(flooder.clone()),
            stop.clone(),
            refused.clone(),
            lost.clone(),
            ids.to_vec(),
        );
        flood.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(64));
            let mut i = t;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                match c.get_citizen(get(&ids[i % ids.len()])).await {
                    Err(e) if e.code() == Code::ResourceExhausted => {
                        refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    // The flooder's connection lost on a starved machine (seen once: a broken
                    // pipe) is not what this test measures; tonic reconnects. Counted, bounded
                    // below.
                    Err(e) if e.code() == Code::Unknown && e.message().contains("transport") => {
                        lost.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(e) => panic!("the flood got {e:?}, not RESOURCE_EXHAUSTED"),
                    Ok(_) => {}
                }
                i += 32;
            }
        }));
    }
    let during = steady(quiet, ids, 40, 400).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for f in flood {
        f.await.unwrap();
    }
    let lost = lost.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        lost <= 64,
        "the flood lost {lost} calls to transport errors"
    );
    (
        p99(alone),
        p99(during),
        refused.load(std::sync::atomic::Ordering::Relaxed),
    )
}
