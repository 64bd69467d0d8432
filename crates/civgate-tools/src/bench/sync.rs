//! `bench publish` and `bench subscribe`: the two-way sync under load.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use clap::Args;
use hdrhistogram::Histogram;

use super::{MEASURE, STOP, WARMUP, clock_ticks_per_second, cpu_ticks};
use crate::client;

#[derive(Args, Clone, Debug)]
pub struct SyncArgs {
    /// Gateway(s): repeat for replicas. publish spreads connections over them; subscribe
    /// consumes through the first and publishes through the last.
    #[arg(long = "addr", default_value = "127.0.0.1:7443")]
    pub addrs: Vec<SocketAddr>,
    #[arg(long, default_value = "certs")]
    pub certs: PathBuf,
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Publishes in flight per connection.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    #[arg(long, default_value_t = 8.0)]
    pub duration: f64,
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// subscribe: publishes per second while measuring delivery latency.
    #[arg(long, default_value_t = 5_000)]
    pub rate: u32,
    /// subscribe: also read this many stored events from sequence 1 and time the catch-up.
    #[arg(long, default_value_t = 0)]
    pub catch_up: u64,
    /// subscribe: the registries that subscribe, each with its own group, at the same time
    /// (repeat). Published events are deaths in Hải Phòng (031) and Hà Nội (001) in turn, so
    /// registry-hp and registry-hn of the default config each receive half of them.
    #[arg(long = "registry", default_values_t = ["registry-hp".to_owned()])]
    pub registries: Vec<String>,
    /// Threads of the load generator's runtime. One leaves the other cores to the gateway it
    /// measures, which shares the machine (2 cores here): a second thread cost the load
    /// generator ~2x the CPU per publish and bought no throughput.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// publish: report the CPU time per publish of these processes (the gateway, say) over the
    /// measured window, from /proc/PID/stat; the load generator's own is always reported.
    #[arg(long = "server-pid")]
    pub server_pids: Vec<u32>,
    /// publish: what is published — `deaths` (the population database's deaths, no request
    /// tracked) or `linked-births` (registry-hp's births, each with its own case reference: the
    /// shipped flow table opens three requests per birth).
    #[arg(long, value_enum, default_value_t = Published::Deaths)]
    pub events: Published,
}

/// What `bench publish` publishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Published {
    Deaths,
    LinkedBirths,
}

impl Published {
    /// The agency that publishes them.
    fn producer(self) -> &'static str {
        match self {
            Published::Deaths => "population",
            Published::LinkedBirths => "registry-hp",
        }
    }

    fn event(self, run: &str, n: u64) -> crate::pb::v1::Event {
        match self {
            Published::Deaths => bench_event(n),
            Published::LinkedBirths => linked_birth(run, n),
        }
    }
}

/// A birth registered in Hải Phòng, in a case of its own (`BENCH-<run>-<n>`).
fn linked_birth(run: &str, n: u64) -> crate::pb::v1::Event {
    use crate::pb::v1::{Birth, Event, Parent, Registration, Sex, event::Payload};
    Event {
        case_reference: format!("BENCH-{run}-{n}"),
        occurred_at_unix_ms: 0,
        in_reply_to: String::new(),
        payload: Some(Payload::Birth(Birth {
            registration: Some(Registration {
                registry_office_code: "HP-LECHAN".into(),
                book_number: "01/2026".into(),
                entry_number: n.to_string(),
                registration_date: "2026-03-02".into(),
                registering_official: "Trần Văn Bình".into(),
                country: String::new(),
            }),
            full_name: "Nguyễn Thị An".into(),
            sex: Sex::Female as i32,
            date_of_birth: "2026-02-27".into(),
            place_of_birth: "Hải Phòng".into(),
            hometown: "Hải Phòng".into(),
            ethnicity: "Kinh".into(),
            nationality: "Việt Nam".into(),
            birth_registration_province_code: "031".into(),
            mother: Some(Parent {
                personal_id: Some("031195000002".into()),
                full_name: "Lê Thị Hoa".into(),
                ..Default::default()
            }),
            ..Default::default()
        })),
    }
}

/// A death, in Hải Phòng (031) for even `n` and Hà Nội (001) for odd.
fn bench_event(n: u64) -> crate::pb::v1::Event {
    use crate::pb::v1::{DeathRecorded, Event, event::Payload};
    let province = if n.is_multiple_of(2) { "031" } else { "001" };
    Event {
        case_reference: String::new(),
        occurred_at_unix_ms: 0,
        in_reply_to: String::new(),
        payload: Some(Payload::DeathRecorded(DeathRecorded {
            personal_id: format!("{province}050{:06}", n % 1_000_000),
            date_of_death: "2026-01-01".into(),
            recording_unit: format!("bench {n}"),
        })),
    }
}

pub(super) async fn publish_bench(a: &SyncArgs) -> Result<()> {
    use crate::pb::v1::{PublishReceipt, PublishRequest};
    use prost::Message;
    /// The generated client's path; the calls go through `UnaryLink`, whose client side costs
    /// a fraction of tonic's (the load generator shares the cores with the gateway).
    const PUBLISH: &str = "/civgate.v1.Exchange/Publish";
    const CALL_TIMEOUT: Duration = Duration::from_secs(30);
    let run = format!("{:x}", rand::random::<u64>());
    let phase = Arc::new(AtomicU8::new(WARMUP));
    let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..a.connections.max(1) {
        let addr = a.addrs[c % a.addrs.len().max(1)];
        let link = client::unary_link(addr, &a.certs, Some(a.events.producer())).await?;
        let events = a.events;
        for _ in 0..a.concurrency.max(1) {
            let (c, phase, counter, run) =
                (link.clone(), phase.clone(), counter.clone(), run.clone());
            tasks.push(tokio::spawn(async move {
                let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                let mut errors = 0u64;
                loop {
                    let p = phase.load(Ordering::Relaxed);
                    if p == STOP {
                        break;
                    }
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    let t = Instant::now();
                    let request = PublishRequest {
                        idempotency_key: format!("bench-{run}-{n}"),
                        event: Some(events.event(&run, n)),
                    };
                    let r = c.call(PUBLISH, &request, CALL_TIMEOUT).await.and_then(|b| {
                        PublishReceipt::decode(b)
                            .map_err(|e| tonic::Status::internal(e.to_string()))
                    });
                    if p == MEASURE && phase.load(Ordering::Relaxed) == MEASURE {
                        match r {
                            Ok(_) => {
                                let _ = hist.record(t.elapsed().as_micros().max(1) as u64);
                            }
                            Err(_) => errors += 1,
                        }
                    }
                }
                Ok::<_, anyhow::Error>((hist, errors))
            }));
        }
    }
    tokio::time::sleep(Duration::from_secs_f64(a.warmup)).await;
    let pids: Vec<u32> = std::iter::once(std::process::id())
        .chain(a.server_pids.iter().copied())
        .collect();
    let cpu_before: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p)).collect();
    let t = Instant::now();
    phase.store(MEASURE, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs_f64(a.duration)).await;
    phase.store(STOP, Ordering::Relaxed);
    let secs = t.elapsed().as_secs_f64();
    let cpu_after: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p)).collect();
    let mut total =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut errors = 0;
    for t in tasks {
        let (h, e) = t.await??;
        total.add(&h).map_err(|e| anyhow::anyhow!("{e}"))?;
        errors += e;
    }
    // Every publish the window started, measured or not (in flight at its end), ran on the
    // CPU counted; the histogram's count is close enough for a per-publish figure.
    let hz = clock_ticks_per_second();
    let per_publish = |i: usize| {
        let secs = cpu_after[i].saturating_sub(cpu_before[i]) as f64 / hz;
        secs * 1e6 / (total.len().max(1)) as f64
    };
    let cpu: Vec<String> = (1..pids.len())
        .map(|i| format!("pid {} {:.1} µs", pids[i], per_publish(i)))
        .chain(std::iter::once(format!(
            "load generator {:.1} µs",
            per_publish(0)
        )))
        .collect();
    println!(
        "publish: {} x {} in flight: {:.0} durable publishes/s, p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, {} errors; CPU per publish: {}",
        a.connections,
        a.concurrency,
        total.len() as f64 / secs,
        total.value_at_quantile(0.5) as f64 / 1000.0,
        total.value_at_quantile(0.99) as f64 / 1000.0,
        total.value_at_quantile(0.999) as f64 / 1000.0,
        errors,
        cpu.join(", ")
    );
    Ok(())
}

pub(super) async fn subscribe_bench(a: &SyncArgs) -> Result<()> {
    use crate::pb::v1::{PublishRequest, SubscribeRequest, exchange_client::ExchangeClient};
    use std::collections::HashMap;
    let group = format!("bench-{:x}", rand::random::<u32>());
    let (first, last) = match (a.addrs.first(), a.addrs.last()) {
        (Some(f), Some(l)) => (*f, *l),
        _ => anyhow::bail!("--addr is required"),
    };
    let mut subs = Vec::new();
    for r in &a.registries {
        subs.push((
            r.clone(),
            ExchangeClient::new(client::connect(first, &a.certs, Some(r)).await?),
        ));
    }
    if a.catch_up > 0 {
        // Every registry at once, each from sequence 1 with a group of its own.
        let mut tasks = tokio::task::JoinSet::new();
        for (registry, sub) in &subs {
            let (mut sub, registry, group, limit) = (
                sub.clone(),
                registry.clone(),
                format!("{group}-catchup"),
                a.catch_up,
            );
            tasks.spawn(async move {
                let mut stream = sub
                    .subscribe(SubscribeRequest {
                        topic: "population".into(),
                        consumer_group: group.clone(),
                        from_sequence: Some(1),
                    })
                    .await?
                    .into_inner();
                let t = Instant::now();
                let (mut n, mut acked, mut last) = (0u64, 0, 0);
                // Up to the last event received: the quiet time that ends a catch-up of fewer
                // events than asked for is not reading.
                let mut read_for = Duration::ZERO;
                while last < limit {
                    let Ok(m) =
                        tokio::time::timeout(Duration::from_secs(2), stream.message()).await
                    else {
                        break;
                    };
                    let Some(m) = m? else { break };
                    n += 1;
                    last = m.sequence;
                    read_for = t.elapsed();
                    acked = ack_every(&mut sub, &group, acked, m.sequence).await?;
                }
                Ok::<_, anyhow::Error>((registry, n, last, read_for.as_secs_f64()))
            });
        }
        while let Some(r) = tasks.join_next().await {
            let (registry, n, last, secs) = r??;
            if n == 0 {
                println!("catch-up {registry}: no stored events");
            } else {
                println!(
                    "catch-up {registry}: {n} events addressed to it among sequences 1..={last} in {secs:.2} s = {:.0} events/s ({:.0} sequences/s; ack every 512)",
                    n as f64 / secs,
                    last as f64 / secs
                );
            }
        }
    }
    // Latency at a fixed publish rate, every registry subscribed.
    let sent: Arc<std::sync::Mutex<HashMap<u64, Instant>>> = Arc::default();
    let pubch = client::connect(last, &a.certs, Some("population")).await?;
    let run = format!("{:x}", rand::random::<u64>());
    let total = (f64::from(a.rate) * (a.duration + a.warmup)) as u64;
    let base = rand::random::<u32>() as u64 * 1_000_000;
    // Subscribe from the current head onwards: publish one marker first.
    let marker = ExchangeClient::new(pubch.clone())
        .publish(PublishRequest {
            idempotency_key: format!("bench-{run}-marker"),
            event: Some(bench_event(base)),
        })
        .await?
        .into_inner();
    let warm_until = Instant::now() + Duration::from_secs_f64(a.warmup);
    let mut consumers = tokio::task::JoinSet::new();
    for (registry, sub) in &subs {
        let mut sub = sub.clone();
        let mut stream = sub
            .subscribe(SubscribeRequest {
                topic: "population".into(),
                consumer_group: group.clone(),
                from_sequence: Some(marker.sequence + 1),
            })
            .await?
            .into_inner();
        let (sent, group, registry) = (sent.clone(), group.clone(), registry.clone());
        consumers.spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let (mut got, mut acked) = (0u64, 0);
            // Until the stream has been quiet for 2 s (the publisher is done).
            while let Ok(m) = tokio::time::timeout(Duration::from_secs(2), stream.message()).await {
                let Some(m) = m? else { break };
                got += 1;
                if let Some(crate::pb::v1::event::Payload::DeathRecorded(d)) =
                    m.event.as_ref().and_then(|e| e.payload.as_ref())
                    && let Some(n) = d
                        .recording_unit
                        .strip_prefix("bench ")
                        .and_then(|v| v.parse::<u64>().ok())
                    && let Some(t) = sent.lock().unwrap_or_else(|p| p.into_inner()).get(&n)
                    && Instant::now() > warm_until
                {
                    let _ = hist.record(t.elapsed().as_micros().max(1) as u64);
                }
                acked = ack_every(&mut sub, &group, acked, m.sequence).await?;
            }
            Ok::<_, anyhow::Error>((registry, got, hist))
        });
    }
    {
        let (sent, run, rate) = (sent.clone(), run.clone(), a.rate);
        let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut inflight = tokio::task::JoinSet::new();
        for i in 1..=total {
            tick.tick().await;
            let n = base + i;
            sent.lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(n, Instant::now());
            let mut c = ExchangeClient::new(pubch.clone());
            let key = format!("bench-{run}-{i}");
            inflight.spawn(async move {
                c.publish(PublishRequest {
                    idempotency_key: key,
                    event: Some(bench_event(n)),
                })
                .await
                .is_ok()
            });
            while inflight.len() > 256 {
                inflight.join_next().await;
            }
        }
        while inflight.join_next().await.is_some() {}
    }
    while let Some(r) = consumers.join_next().await {
        let (registry, got, hist) = r??;
        println!(
            "delivery to {registry} at {} publishes/s: publish→delivery p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms ({} measured of {got} delivered, {total} published)",
            a.rate,
            hist.value_at_quantile(0.5) as f64 / 1000.0,
            hist.value_at_quantile(0.99) as f64 / 1000.0,
            hist.value_at_quantile(0.999) as f64 / 1000.0,
            hist.len()
        );
    }
    Ok(())
}

/// Acknowledges `seq` for `group` once 512 sequences have passed since `acked`; the new
/// acknowledged sequence.
async fn ack_every(
    sub: &mut crate::pb::v1::exchange_client::ExchangeClient<tonic::transport::Channel>,
    group: &str,
    acked: u64,
    seq: u64,
) -> Result<u64> {
    if seq - acked < 512 {
        return Ok(acked);
    }
    sub.ack(crate::pb::v1::AckRequest {
        topic: "population".into(),
        consumer_group: group.into(),
        sequence: seq,
    })
    .await?;
    Ok(seq)
}
