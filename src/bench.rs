//! `civgate bench`: closed-loop load generators. `lookup` drives `Citizens.GetCitizen` through
//! the gateway, or the equivalent `GetCitizens` directly against the population directory, so
//! one run on one machine gives the ratio between the two paths.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::{
    client,
    link::Link,
    pb::{
        upstream::v1::{
            GetCitizensRequest, population_directory_client::PopulationDirectoryClient,
        },
        v1::{GetCitizenRequest, citizens_client::CitizensClient},
    },
    synth::Population,
};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Look-ups per second and latency, through the gateway or directly to the directory.
    Lookup(LookupArgs),
    /// Build (or reuse) an audit log of N entries, then time inclusion and consistency proofs.
    AuditProofs(AuditProofArgs),
    /// Durable publishes per second (closed loop), as the population database.
    Publish(SyncArgs),
    /// Publish→delivery latency at a fixed rate, and the catch-up speed of a consumer.
    Subscribe(SyncArgs),
}

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
}

/// A death, in Hải Phòng (031) for even `n` and Hà Nội (001) for odd.
fn bench_event(n: u64) -> crate::pb::v1::Event {
    use crate::pb::v1::{DeathRecorded, Event, event::Payload};
    let province = if n.is_multiple_of(2) { "031" } else { "001" };
    Event {
        occurred_at_unix_ms: 0,
        in_reply_to: String::new(),
        payload: Some(Payload::DeathRecorded(DeathRecorded {
            personal_id: format!("{province}050{:06}", n % 1_000_000),
            date_of_death: "2026-01-01".into(),
            recording_unit: format!("bench {n}"),
        })),
    }
}

async fn publish_bench(a: &SyncArgs) -> Result<()> {
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
        let link = client::unary_link(addr, &a.certs, Some("population")).await?;
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
                        event: Some(bench_event(n)),
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

async fn subscribe_bench(a: &SyncArgs) -> Result<()> {
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

#[derive(Args, Clone, Debug)]
pub struct AuditProofArgs {
    /// Entries the log must hold (appended through the real group-commit writer).
    #[arg(long, default_value_t = 1_000_000)]
    pub entries: u64,
    /// The gateway data directory (its `civgate.sqlite` holds the audit log).
    #[arg(long)]
    pub data_dir: PathBuf,
    #[arg(long, default_value = "certs/audit.key")]
    pub signing_key: PathBuf,
    /// Proofs of each kind to time.
    #[arg(long, default_value_t = 10_000)]
    pub queries: u32,
}

#[derive(Clone, Copy, Debug, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// `civgate serve`: Citizens.GetCitizen (mTLS in, policy, purpose filter, mTLS out).
    Gateway,
    /// `civgate refdb serve` directly: PopulationDirectory.GetCitizens with one ID.
    Directory,
}

#[derive(Args, Clone, Debug)]
pub struct LookupArgs {
    #[arg(long, value_enum, default_value = "gateway")]
    pub target: Target,
    /// Address of the target (defaults: gateway 127.0.0.1:7443, directory 127.0.0.1:7444);
    /// repeat for replicas: connections are spread over them.
    #[arg(long = "addr")]
    pub addrs: Vec<SocketAddr>,
    #[arg(long, default_value = "certs")]
    pub certs: PathBuf,
    /// Client certificate name under certs/clients (defaults: registry-hp / gateway).
    #[arg(long)]
    pub client: Option<String>,
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Calls in flight per connection.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 8.0)]
    pub duration: f64,
    /// Warm-up seconds (not measured).
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// The directory's synthetic population (to draw existing IDs from).
    #[arg(long, default_value_t = 100_000)]
    pub citizens: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long, default_value = "IDENTITY_VERIFICATION")]
    pub purpose: String,
    /// Fields asked of the directory in `directory` mode (the purpose's fields).
    #[arg(
        long,
        default_value = "full_name,date_of_birth,sex",
        value_delimiter = ','
    )]
    pub fields: Vec<String>,
    /// Server processes whose CPU time to attribute per request (repeatable).
    #[arg(long = "server-pid")]
    pub server_pids: Vec<u32>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct LookupReport {
    pub target: Target,
    pub connections: usize,
    pub concurrency: usize,
    pub seconds: f64,
    pub requests: u64,
    pub errors: u64,
    pub requests_per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// Per server PID: CPU microseconds per successful request over the measured window.
    pub server_cpu_us_per_request: Vec<(u32, f64)>,
    pub first_error: Option<String>,
}

pub async fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::AuditProofs(a) => audit_proofs(&a).await,
        BenchCommand::Publish(a) => publish_bench(&a).await,
        BenchCommand::Subscribe(a) => subscribe_bench(&a).await,
        BenchCommand::Lookup(args) => {
            let report = lookup(&args).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_table(&report);
            }
            Ok(())
        }
    }
}

const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

enum Caller {
    Gateway(CitizensClient<Link>),
    Directory(PopulationDirectoryClient<Link>),
}

pub async fn lookup(args: &LookupArgs) -> Result<LookupReport> {
    let addrs = if args.addrs.is_empty() {
        vec![match args.target {
            Target::Gateway => SocketAddr::from(([127, 0, 0, 1], 7443)),
            Target::Directory => SocketAddr::from(([127, 0, 0, 1], 7444)),
        }]
    } else {
        args.addrs.clone()
    };
    let client_name = args.client.clone().unwrap_or_else(|| {
        match args.target {
            Target::Gateway => "registry-hp",
            Target::Directory => "gateway",
        }
        .to_owned()
    });
    let ids: Arc<Vec<String>> = Arc::new(
        Population::new(args.seed, args.citizens)
            .map(|c| c.personal_id.to_string())
            .collect(),
    );
    anyhow::ensure!(!ids.is_empty(), "--citizens must be at least 1");
    let phase = Arc::new(AtomicU8::new(WARMUP));
    let mut tasks = Vec::new();
    for c in 0..args.connections.max(1) {
        let addr = addrs[c % addrs.len()];
        let link = client::link(addr, &args.certs, Some(&client_name))
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        for t in 0..args.concurrency.max(1) {
            let (l, origin) = (link.clone(), link.origin());
            let caller = match args.target {
                Target::Gateway => Caller::Gateway(CitizensClient::with_origin(l, origin)),
                Target::Directory => {
                    Caller::Directory(PopulationDirectoryClient::with_origin(l, origin))
                }
            };
            let (ids, phase) = (ids.clone(), phase.clone());
            let (purpose, fields) = (args.purpose.clone(), args.fields.clone());
            let seed = (c * 10_000 + t) as u64;
            tasks.push(tokio::spawn(async move {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
                let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                let (mut errors, mut first_error) = (0u64, None);
                let mut caller = caller;
                loop {
                    let p = phase.load(Ordering::Relaxed);
                    if p == STOP {
                        break;
                    }
                    let id = ids[rng.random_range(0..ids.len())].clone();
                    let started = Instant::now();
                    let result = match &mut caller {
                        Caller::Gateway(g) => g
                            .get_citizen(GetCitizenRequest {
                                personal_id: id,
                                purpose: purpose.clone(),
                            })
                            .await
                            .map(|_| ()),
                        Caller::Directory(d) => d
                            .get_citizens(GetCitizensRequest {
                                personal_ids: vec![id],
                                fields: fields.clone(),
                            })
                            .await
                            .map(|_| ()),
                    };
                    if p == MEASURE && phase.load(Ordering::Relaxed) == MEASURE {
                        match result {
                            Ok(()) => {
                                let us = started.elapsed().as_micros().max(1) as u64;
                                let _ = hist.record(us.min(60_000_000));
                            }
                            Err(s) => {
                                errors += 1;
                                first_error.get_or_insert_with(|| {
                                    format!("{:?}: {}", s.code(), s.message())
                                });
                            }
                        }
                    }
                }
                Ok::<_, anyhow::Error>((hist, errors, first_error))
            }));
        }
    }
    tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;
    let cpu_before: Vec<_> = args
        .server_pids
        .iter()
        .map(|p| (*p, cpu_ticks(*p)))
        .collect();
    let window = Instant::now();
    phase.store(MEASURE, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
    phase.store(STOP, Ordering::Relaxed);
    let seconds = window.elapsed().as_secs_f64();
    let cpu_after: Vec<_> = args
        .server_pids
        .iter()
        .map(|p| (*p, cpu_ticks(*p)))
        .collect();

    let mut total =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (mut errors, mut first_error) = (0, None);
    for t in tasks {
        let (h, e, f) = t.await??;
        total.add(&h).map_err(|e| anyhow::anyhow!("{e}"))?;
        errors += e;
        if first_error.is_none() {
            first_error = f;
        }
    }
    let requests = total.len();
    let hz = clock_ticks_per_second();
    let server_cpu_us_per_request = cpu_before
        .iter()
        .zip(&cpu_after)
        .map(|((pid, b), (_, a))| {
            let secs = a.saturating_sub(*b) as f64 / hz;
            (
                *pid,
                if requests > 0 {
                    secs * 1e6 / requests as f64
                } else {
                    0.0
                },
            )
        })
        .collect();
    let ms = |q: f64| total.value_at_quantile(q) as f64 / 1000.0;
    Ok(LookupReport {
        target: args.target,
        connections: args.connections,
        concurrency: args.concurrency,
        seconds,
        requests,
        errors,
        requests_per_second: requests as f64 / seconds,
        p50_ms: ms(0.50),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        server_cpu_us_per_request,
        first_error,
    })
}

/// utime + stime of a process, in clock ticks (0 if unreadable).
fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    num(11) + num(12)
}

fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

pub fn print_table(r: &LookupReport) {
    println!(
        "{:<10} {:>5}x{:<4} {:>10} {:>9} {:>9} {:>9} {:>8}  server CPU µs/req",
        "target", "conn", "infl", "req/s", "p50 ms", "p99 ms", "p99.9 ms", "errors"
    );
    let cpu = r
        .server_cpu_us_per_request
        .iter()
        .map(|(pid, us)| format!("pid {pid}: {us:.1}"))
        .collect::<Vec<_>>()
        .join(", ");
    println!(
        "{:<10} {:>5}x{:<4} {:>10.0} {:>9.2} {:>9.2} {:>9.2} {:>8}  {}",
        format!("{:?}", r.target).to_lowercase(),
        r.connections,
        r.concurrency,
        r.requests_per_second,
        r.p50_ms,
        r.p99_ms,
        r.p999_ms,
        r.errors,
        cpu
    );
    if let Some(e) = &r.first_error {
        println!("first error: {e}");
    }
}

async fn audit_proofs(a: &AuditProofArgs) -> Result<()> {
    use crate::audit::{AuditLog, log::Options, note::Signer};
    let key = std::fs::read_to_string(&a.signing_key)
        .with_context(|| format!("reading {}", a.signing_key.display()))?;
    let (healthy, _) = tokio::sync::watch::channel(true);
    let log = AuditLog::open(Options {
        store: &crate::store::Store::Sqlite(a.data_dir.clone()),
        signer: Signer::parse(&key)?,
        origin: crate::certs::AUDIT_KEY_NAME.into(),
        checkpoint_interval: Duration::from_secs(1),
        commit_timeout: Duration::from_secs(30),
        healthy,
    })
    .await?;
    let have = log.size();
    if have < a.entries {
        let started = Instant::now();
        let todo = a.entries - have;
        let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut tasks = Vec::new();
        for t in 0..256u64 {
            let (log, next) = (log.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= todo {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let rec = crate::pb::v1::AuditRecord {
                        time_unix_ms: crate::audit::log::now_ms(),
                        // One entry in 1,000 from a rare agency (searched for below).
                        agency_id: if n % 1_000 == 0 {
                            "registry-rare".into()
                        } else {
                            "registry-hp".into()
                        },
                        role: "civil_registry".into(),
                        cert_fingerprint: "ab".repeat(32),
                        method: "/civgate.v1.Citizens/GetCitizen".into(),
                        purpose: "IDENTITY_VERIFICATION".into(),
                        subject_personal_ids: vec![format!(
                            "031{:09}",
                            (n * 7919 + t) % 1_000_000_000
                        )],
                        fields_returned: vec!["personal_id".into(), "full_name".into()],
                        outcome: "OK".into(),
                        request_id: format!("{n:032x}"),
                        latency_us: 500,
                        ..Default::default()
                    };
                    log.append(rec).await?;
                }
            }));
        }
        for t in tasks {
            t.await??;
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "appended {todo} entries in {secs:.1} s ({:.0} durable appends/s, 256 in flight)",
            todo as f64 / secs
        );
    }
    let size = log.size();
    println!("log size {size}");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
    let mut inc =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut con = inc.clone();
    for _ in 0..a.queries {
        let i = rng.random_range(0..size);
        let t = Instant::now();
        let p = log.inclusion_proof(i, size).await?;
        let _ = inc.record(t.elapsed().as_micros().max(1) as u64);
        anyhow::ensure!(!p.is_empty() || size == 1);
        let first = rng.random_range(1..=size);
        let t = Instant::now();
        log.consistency_proof(first, size).await?;
        let _ = con.record(t.elapsed().as_micros().max(1) as u64);
    }
    // Searches by subject: the subject filters of every complete block first (built in the
    // background), then citizens who are in the log and citizens who are not.
    let blocks = size / crate::audit::subjects::BLOCK;
    let started = Instant::now();
    tokio::time::timeout(
        Duration::from_secs(600),
        log.filtered_blocks().wait_for(|b| *b >= blocks),
    )
    .await
    .context("subject filters not built within 10 minutes")??;
    println!(
        "subject filters of {blocks} blocks ready {:.1} s after open",
        started.elapsed().as_secs_f64()
    );
    let mut found =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut absent = found.clone();
    for q in 0..(a.queries / 20).max(10) {
        let present = q % 2 == 0;
        let id = if present {
            // An entry's own subject (as appended above, or by any earlier run).
            let i = rng.random_range(0..size);
            let leaf = log.entries(i, i + 1).await?;
            let rec = <crate::pb::v1::AuditRecord as prost::Message>::decode(leaf[0].as_slice())?;
            let Some(id) = rec.subject_personal_ids.first().cloned() else {
                continue;
            };
            id
        } else {
            format!("09{:010}", rng.random_range(0..10_000_000_000u64))
        };
        let t = Instant::now();
        let rows = log
            .search(&crate::audit::Filter {
                subject: Some(id),
                limit: 100,
                ..Default::default()
            })
            .await?;
        let h = if present { &mut found } else { &mut absent };
        let _ = h.record(t.elapsed().as_micros().max(1) as u64);
        anyhow::ensure!(
            rows.is_empty() != present,
            "search for {present:?} subject wrong"
        );
    }
    // Searches by agency and by time, from a random entry on: the next 10 entries of the rare
    // agency, an agency that never called, and the entries of one millisecond.
    let mut rare = found.clone();
    rare.reset();
    let (mut nobody, mut moment) = (rare.clone(), rare.clone());
    for _ in 0..(a.queries / 20).max(10) {
        let after = rng.random_range(0..size);
        let leaf = log.entries(after, after + 1).await?;
        let time = <crate::pb::v1::AuditRecord as prost::Message>::decode(leaf[0].as_slice())?
            .time_unix_ms;
        for (h, agency, window) in [
            (&mut rare, Some("registry-rare"), None),
            (&mut nobody, Some("registry-none"), None),
            (&mut moment, None, Some((time, time + 1))),
        ] {
            let t = Instant::now();
            let rows = log
                .search(&crate::audit::Filter {
                    agency: agency.map(Into::into),
                    from_ms: window.map(|w| w.0),
                    to_ms: window.map(|w| w.1),
                    after: if window.is_some() { 0 } else { after },
                    limit: 10,
                    ..Default::default()
                })
                .await?;
            let _ = h.record(t.elapsed().as_micros().max(1) as u64);
            anyhow::ensure!(
                window.is_none() || !rows.is_empty(),
                "search by time missed entry {after}"
            );
        }
    }
    for (name, h) in [
        ("subject found", &found),
        ("subject absent", &absent),
        ("agency rare", &rare),
        ("agency absent", &nobody),
        ("one ms", &moment),
    ] {
        println!(
            "{name:<14} searches on {size} entries: p50 {} µs, p99 {} µs, max {} µs ({} queries)",
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.max(),
            h.len()
        );
    }
    for (name, h) in [("inclusion", &inc), ("consistency", &con)] {
        println!(
            "{name:<12} proofs on {size} entries: p50 {} µs, p99 {} µs, p99.9 {} µs, max {} µs ({} queries)",
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
            h.max(),
            h.len()
        );
    }
    Ok(())
}
