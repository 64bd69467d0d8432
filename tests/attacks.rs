//! Attacks and abuse against the real binary on loopback: handshake floods from one host,
//! request bodies that never finish, batch floods, floods of refusals and health checks,
//! overlong paths, too many connections, and requests that are not gRPC. Each is bounded
//! (seconds) and asserts what a legitimate client still gets, with generous bounds.

mod common;

use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use civgate::{
    client,
    config::DEFAULT_CONFIG,
    pb::v1::{BatchGetCitizensRequest, GetCitizenRequest, citizens_client::CitizensClient},
};
use common::{Env, grpc_head, http_get, metric, raw_h2, rss_kib};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const ATTACKER: &str = "127.0.0.2";

fn attacker() -> Option<IpAddr> {
    Some(ATTACKER.parse().unwrap())
}

/// The repository config with `extra` lines put at the start of the sections they name.
fn config(replacements: &[(&str, &str)]) -> String {
    let mut text = DEFAULT_CONFIG.to_owned();
    for (from, to) in replacements {
        assert!(text.contains(from), "{from:?} not in the config");
        text = text.replacen(from, to, 1);
    }
    text
}

async fn health(ch: tonic::transport::Channel) -> Result<(), tonic::Status> {
    HealthClient::new(ch)
        .check(HealthCheckRequest::default())
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_flood_from_one_host_does_not_keep_other_clients_out() {
    let env = Env::new();
    env.write_config(&config(&[(
        "probes = { per_second = 20, burst = 40 }",
        "probes = { per_second = 1000, burst = 1000 }",
    )]));
    let gw = env.spawn_binary();
    let api = gw.api;
    // 1,100 connections from one host, then as many again from 20 hosts (55 each: within their
    // per-source share, together past the pool of 1,024), each sending 3 bytes of a
    // ClientHello and nothing more, reopened as soon as the gateway closes them.
    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicUsize::new(0));
    // Connections of the 20 hosts open at once (each counted while it is held).
    let spread = Arc::new(AtomicUsize::new(0));
    let mut flood = Vec::new();
    for n in 0..2_200 {
        let (stop, opened, spread) = (stop.clone(), opened.clone(), spread.clone());
        let source: Option<IpAddr> = if n < 1_100 {
            attacker()
        } else {
            Some(format!("127.0.1.{}", n % 20 + 1).parse().unwrap())
        };
        flood.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut s) = common::tcp_from(api, source).await else {
                    tokio::task::yield_now().await;
                    continue;
                };
                opened.fetch_add(1, Ordering::Relaxed);
                if s.write_all(&[0x16, 0x03, 0x01]).await.is_err() {
                    continue;
                }
                if n >= 1_100 {
                    spread.fetch_add(1, Ordering::Relaxed);
                }
                let mut buf = [0u8; 64];
                // Held until the gateway closes it (or the test ends).
                tokio::select! {
                    _ = s.read(&mut buf) => {}
                    () = async { while !stop.load(Ordering::Relaxed) { tokio::time::sleep(Duration::from_millis(100)).await } } => {}
                }
                if n >= 1_100 {
                    spread.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }));
    }
    // Until the 20 hosts hold most of their connections at once (past the pool of 1,024 with
    // the first host's share).
    let filling = Instant::now();
    while spread.load(Ordering::Relaxed) < 1_000 {
        assert!(
            filling.elapsed() < Duration::from_secs(20),
            "the flood never built up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // 49 legitimate clients from another host, one after another.
    let mut ok = 0;
    let mut worst = Duration::ZERO;
    for _ in 0..49 {
        let started = Instant::now();
        let result = async {
            let ch = client::connect(api, &env.certs(), Some("registry-hp"))
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            health(ch).await
        };
        if tokio::time::timeout(Duration::from_secs(5), result)
            .await
            .is_ok_and(|r| r.is_ok())
        {
            ok += 1;
        }
        worst = worst.max(started.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    let (_, metrics) = http_get(gw.admin, "/metrics");
    let refused = |reason: &str| {
        metric(
            &metrics,
            &format!("civgate_connections_refused_total{{reason=\"{reason}\"}}"),
        )
    };
    println!(
        "handshake flood: {ok}/49 legitimate clients served, slowest {worst:?}, {} attacker connections opened, {} refused at once per source, {} pending handshakes evicted",
        opened.load(Ordering::Relaxed),
        refused("per_source"),
        refused("evicted"),
    );
    assert!(ok >= 47, "only {ok} of 49 legitimate clients were served");
    // Which limit meets the flood first depends on timing (how far the accept loop got):
    // at least one must have.
    assert!(
        refused("per_source") + refused("evicted") + refused("rate") > 0.0,
        "the flood was never refused"
    );
    for f in flood {
        f.abort();
    }
}

/// A gRPC message prefix announcing `len` bytes.
fn prefix(len: u32) -> Bytes {
    let mut b = vec![0u8];
    b.extend_from_slice(&len.to_be_bytes());
    Bytes::from(b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_that_never_finish_are_cut_off_and_their_memory_is_bounded() {
    let env = Env::new();
    env.write_config(&config(&[
        (
            "request_body_timeout_ms = 10000",
            "request_body_timeout_ms = 3000",
        ),
        (
            "max_buffered_request_bytes = 268435456",
            "max_buffered_request_bytes = 33554432",
        ),
    ]));
    let gw = env.spawn_binary();
    let before = rss_kib(gw.child.id());
    // 64 streams, each announcing a message just under 4 MiB and sending all but its last
    // byte: 256 MiB held if nothing bounds it.
    let len: u32 = 4 * 1024 * 1024 - 64;
    let started = Instant::now();
    let mut answers = Vec::new();
    let mut conns = Vec::new();
    for c in 0..4 {
        let send = raw_h2(gw.api, &env.certs(), "registry-hp", None)
            .await
            .unwrap();
        let mut send = send.ready().await.unwrap();
        for _ in 0..16 {
            let (resp, mut body) = send
                .send_request(grpc_head("/civgate.v1.Citizens/GetCitizen"), false)
                .unwrap();
            body.send_data(prefix(len), false).unwrap();
            body.send_data(Bytes::from(vec![b'0'; len as usize - 1]), false)
                .unwrap();
            answers.push(tokio::spawn(async move {
                let _keep = body;
                let r = tokio::time::timeout(Duration::from_secs(20), resp).await;
                let code = match r {
                    Err(_) => None,
                    Ok(Err(_)) => Some(-1),
                    Ok(Ok(resp)) => resp
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok()?.parse::<i32>().ok()),
                };
                (code, started.elapsed())
            }));
            send = send.ready().await.unwrap();
        }
        conns.push((c, send));
    }
    let mut peak = 0;
    let mut codes = Vec::new();
    let mut slowest = Duration::ZERO;
    for a in answers {
        let (code, took) = a.await.unwrap();
        peak = peak.max(rss_kib(gw.child.id()));
        codes.push(code);
        slowest = slowest.max(took);
    }
    // 64 more that send only the 5-byte prefix: the decoder would make room for 4 MiB each.
    let before_prefixes = rss_kib(gw.child.id());
    let mut answers = Vec::new();
    for c in 0..4 {
        let mut send = raw_h2(gw.api, &env.certs(), "population", None)
            .await
            .unwrap()
            .ready()
            .await
            .unwrap();
        for _ in 0..16 {
            let (resp, mut body) = send
                .send_request(grpc_head("/civgate.v1.Exchange/Publish"), false)
                .unwrap();
            body.send_data(prefix(len), false).unwrap();
            answers.push(tokio::spawn(async move {
                let _keep = body;
                let r = tokio::time::timeout(Duration::from_secs(20), resp).await;
                match r {
                    Ok(Ok(resp)) => resp
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok()?.parse::<i32>().ok()),
                    _ => None,
                }
            }));
            send = send.ready().await.unwrap();
        }
        conns.push((c + 4, send));
    }
    let mut prefix_peak = 0;
    let mut prefix_codes = Vec::new();
    for a in answers {
        prefix_codes.push(a.await.unwrap());
        prefix_peak = prefix_peak.max(rss_kib(gw.child.id()));
    }
    let prefix_grown = prefix_peak.saturating_sub(before_prefixes) / 1024;
    let prefix_refused = prefix_codes.iter().filter(|c| **c == Some(8)).count();
    println!(
        "prefix-only bodies: {prefix_refused} of 64 RESOURCE_EXHAUSTED at once, the rest {:?}; RSS grew {prefix_grown} MiB",
        prefix_codes
            .iter()
            .filter(|c| **c != Some(8))
            .collect::<Vec<_>>()
    );
    assert!(prefix_refused >= 48, "{prefix_codes:?}");
    assert!(
        prefix_codes.iter().all(|c| *c == Some(4) || *c == Some(8)),
        "{prefix_codes:?}"
    );
    assert!(
        prefix_grown < 160,
        "prefixes alone grew the gateway by {prefix_grown} MiB"
    );
    // Still serving others.
    let ch = client::connect(gw.api, &env.certs(), Some("registry-hn"))
        .await
        .unwrap();
    health(ch).await.unwrap();
    let grown_mib = peak.saturating_sub(before) / 1024;
    let deadline = codes.iter().filter(|c| **c == Some(4)).count();
    let budget = codes.iter().filter(|c| **c == Some(8)).count();
    println!(
        "unfinished bodies: {deadline} DEADLINE_EXCEEDED, {budget} RESOURCE_EXHAUSTED, slowest answer {slowest:?}, RSS grew {grown_mib} MiB"
    );
    assert!(
        codes.iter().all(|c| *c == Some(4) || *c == Some(8)),
        "every stream answered DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED: {codes:?}"
    );
    assert!(budget > 0, "the byte budget never refused a body");
    assert!(
        slowest < Duration::from_secs(15),
        "slowest answer {slowest:?}"
    );
    assert!(grown_mib < 160, "the gateway grew by {grown_mib} MiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_costs_the_citizens_it_asks_for() {
    let env = Env::new();
    let dir = env.start_directory().await;
    let text = common::with_upstream_port(DEFAULT_CONFIG, dir.directory.addr.port()).replace(
        "[quotas.roles.civil_registry]\nreads = { per_second = 500, burst = 1000 }",
        "[quotas.roles.civil_registry]\nreads = { per_second = 200, burst = 400 }",
    );
    env.write_config(&text);
    let gw = env.spawn_binary();
    let mut c = CitizensClient::new(
        client::connect(gw.api, &env.certs(), Some("registry-hp"))
            .await
            .unwrap(),
    );
    let ids: Vec<String> = dir
        .people
        .iter()
        .take(100)
        .map(|p| p.personal_id.to_string())
        .collect();
    assert_eq!(ids.len(), 100);
    let started = Instant::now();
    let (mut records, mut refused) = (0usize, 0usize);
    while started.elapsed() < Duration::from_secs(3) {
        match c
            .batch_get_citizens(BatchGetCitizensRequest {
                case_reference: String::new(),
                personal_ids: ids.clone(),
                purpose: "DEATH_REGISTRATION".into(),
            })
            .await
        {
            Ok(r) => records += r.into_inner().results.len(),
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert!(e.metadata().get("retry-after").is_some());
                refused += 1;
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let allowed = 400.0 + 200.0 * secs;
    println!(
        "batch flood: {records} citizens returned in {secs:.1} s (quota allows {allowed:.0}), {refused} batches refused"
    );
    assert!(refused > 0);
    assert!(
        (records as f64) <= allowed * 1.1,
        "{records} citizens returned, quota allows {allowed:.0}"
    );
    assert!(
        (records as f64) >= (allowed - 100.0) * 0.9,
        "{records} citizens returned, quota allows {allowed:.0}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_health_checks_are_metered_and_long_paths_are_cut_in_logs() {
    let env = Env::new();
    let mut gw = env.spawn_binary();
    let began = Instant::now();
    // A certificate naming an agency the gateway does not know.
    let mut unknown = CitizensClient::new(
        client::connect(gw.api, &env.certs(), Some("unknown"))
            .await
            .unwrap(),
    );
    for _ in 0..300 {
        let e = unknown
            .get_citizen(GetCitizenRequest {
                case_reference: String::new(),
                personal_id: "031203000001".into(),
                purpose: "DEATH_REGISTRATION".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    }
    // Health checks: 40 at once, then 20/s.
    let ch = client::connect(gw.api, &env.certs(), Some("registry-hp"))
        .await
        .unwrap();
    let started = Instant::now();
    let (mut served, mut limited) = (0usize, 0usize);
    for _ in 0..300 {
        match health(ch.clone()).await {
            Ok(()) => served += 1,
            Err(e) if e.code() == Code::ResourceExhausted => limited += 1,
            Err(e) => panic!("{e:?}"),
        }
    }
    let served_at_most = 40.0 + 20.0 * started.elapsed().as_secs_f64() + 1.0;
    // An 8 KB path (from a certificate not refused yet): refused, and the log line names it cut.
    let mut send = raw_h2(gw.api, &env.certs(), "registry-hn", None)
        .await
        .unwrap()
        .ready()
        .await
        .unwrap();
    let long = format!("/civgate.v1.Citizens/{}", "x".repeat(8_000));
    let (resp, mut body) = send.send_request(grpc_head(&long), false).unwrap();
    body.send_data(prefix(0), true).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.headers()["grpc-status"], "7", "{resp:?}");
    let line = gw.wait_log("method_not_granted");
    let width = line.to_string().len();
    let (_, metrics) = http_get(gw.admin, "/metrics");
    let unrecorded = metric(&metrics, "civgate_refusals_unrecorded_total");
    // Every refusal is answered; those recorded have a log line each.
    let logged = std::iter::from_fn(|| gw.logs.try_recv().ok())
        .chain(std::iter::once(line.clone()))
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("refused:"))
        })
        .count();
    // Two certificates refused: each gets 20 records at once, then 5/s.
    let recorded = (300 + limited + 1) as f64 - unrecorded;
    let recorded_at_most = 2.0 * (20.0 + 5.0 * began.elapsed().as_secs_f64()) + 1.0;
    println!(
        "refusal flood: {} refusals, {recorded} recorded (at most {recorded_at_most:.0} allowed), {unrecorded} only counted, {logged} log lines; health: {served} served, {limited} limited; 8 KB path logged in {width} bytes",
        300 + limited + 1
    );
    assert!(recorded <= recorded_at_most, "{recorded} refusals recorded");
    assert!(logged as f64 <= recorded + 1.0, "{logged} log lines");
    assert!(unrecorded >= 400.0, "{unrecorded}");
    assert!(
        (served as f64) <= served_at_most,
        "{served} health checks served, at most {served_at_most:.0} expected"
    );
    assert!(limited >= 200, "{limited}");
    assert!(width < 1_500, "a log line of {width} bytes: {line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_capped_per_agency_and_in_all_and_accepting_pauses_at_the_cap() {
    let env = Env::new();
    let gw = env
        .start_with(&config(&[
            ("max_connections = 8192", "max_connections = 4"),
            (
                "max_connections_per_agency = 1024",
                "max_connections_per_agency = 2",
            ),
        ]))
        .await;
    let certs = env.certs();
    let api = gw.api_addr;
    let open = |who: &'static str| {
        let certs = certs.clone();
        async move {
            let ch = client::connect(api, &certs, Some(who))
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            health(ch.clone()).await.map(|()| ch)
        }
    };
    let a1 = open("registry-hp").await.unwrap();
    let _a2 = open("registry-hp").await.unwrap();
    let third = open("registry-hp").await;
    assert!(
        third.is_err(),
        "a third connection of one agency was served"
    );
    drop(a1);
    // Its place is given back when the connection closes.
    let mut again = None;
    for _ in 0..50 {
        if let Ok(ch) = open("registry-hp").await {
            again = Some(ch);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(again.is_some(), "the agency's place was not given back");
    // Four open in all: a fifth waits (not refused) until one closes.
    let b1 = open("registry-hn").await.unwrap();
    let _b2 = open("registry-hn").await.unwrap();
    let mut fifth = tokio::spawn(open("population"));
    assert!(
        tokio::time::timeout(Duration::from_millis(700), &mut fifth)
            .await
            .is_err(),
        "a fifth connection was served past the cap"
    );
    drop(b1);
    let served = tokio::time::timeout(Duration::from_secs(5), fifth)
        .await
        .expect("the waiting connection was served once another closed")
        .unwrap();
    assert!(served.is_ok(), "{served:?}");
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_post_with_a_grpc_content_type_is_served() {
    let env = Env::new();
    let gw = env.start().await;
    let mut send = raw_h2(gw.api_addr, &env.certs(), "registry-hp", None)
        .await
        .unwrap()
        .ready()
        .await
        .unwrap();
    let path = "https://localhost/grpc.health.v1.Health/Check";
    for (method, content_type, want) in [
        ("GET", "application/grpc", 405),
        ("PUT", "application/grpc", 405),
        ("POST", "text/plain", 415),
        ("POST", "application/grpcx", 415),
        ("POST", "application/grpc+proto", 200),
        ("POST", "application/grpc", 200),
    ] {
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", content_type)
            .header("te", "trailers")
            .body(())
            .unwrap();
        let (resp, mut body) = send.send_request(req, false).unwrap();
        body.send_data(prefix(0), true).unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.status().as_u16(), want, "{method} {content_type}");
        send = send.ready().await.unwrap();
    }
    gw.shutdown().await.unwrap();
}

/// A body that is not a valid protobuf message is answered INTERNAL (gRPC's code for a
/// request that cannot be parsed), and its audit record says the request was undecodable,
/// so probing with garbage does not pass for a fault of the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_request_is_recorded_as_such() {
    let env = Env::new();
    let gw = env.start().await;
    let mut send = raw_h2(gw.api_addr, &env.certs(), "auditor", None)
        .await
        .unwrap()
        .ready()
        .await
        .unwrap();
    let req = http::Request::builder()
        .method("POST")
        .uri("https://localhost/civgate.v1.Exchange/ListOpenRequests")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (resp, mut body) = send.send_request(req, false).unwrap();
    body.send_data(prefix(4), false).unwrap();
    body.send_data(Bytes::from_static(&[0xff, 0xff, 0xff, 0xff]), true)
        .unwrap();
    let resp = resp.await.unwrap();
    let (head, mut rest) = resp.into_parts();
    let status = match head.headers.get("grpc-status") {
        Some(s) => s.to_str().unwrap().to_owned(),
        None => {
            while rest.data().await.is_some() {}
            rest.trailers().await.unwrap().unwrap()["grpc-status"]
                .to_str()
                .unwrap()
                .to_owned()
        }
    };
    assert_eq!(status, "13");
    let mut audit = civgate::pb::v1::audit_client::AuditClient::new(
        client::connect(gw.api_addr, &env.certs(), Some("auditor"))
            .await
            .unwrap(),
    );
    let found = common::search_records(
        &mut audit,
        civgate::pb::v1::SearchEntriesRequest {
            method: "/civgate.v1.Exchange/ListOpenRequests".into(),
            page_size: 10,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].detail, "undecodable_request");
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_limit_is_resource_exhausted() {
    let env = Env::new();
    let gw = env.start().await;
    let mut c = CitizensClient::new(
        client::connect(gw.api_addr, &env.certs(), Some("registry-hp"))
            .await
            .unwrap(),
    )
    .max_encoding_message_size(8 * 1024 * 1024);
    let err = c
        .get_citizen(GetCitizenRequest {
            case_reference: String::new(),
            personal_id: "0".repeat(5 * 1024 * 1024),
            purpose: "DEATH_REGISTRATION".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_open_file_limit_accepting_pauses_and_a_waiting_client_is_served() {
    let env = Env::new();
    env.write_config(&config(&[
        ("handshake_timeout_ms = 5000", "handshake_timeout_ms = 2000"),
        (
            "first_bytes_timeout_ms = 1000",
            "first_bytes_timeout_ms = 2000",
        ),
    ]));
    // 400 descriptors: the gateway caps itself at 400 - 256 = 144 connections.
    let gw = env.spawn_binary_with_open_files(400);
    assert_eq!(gw.serving["max_connections"], 144, "{}", gw.serving);
    let api = gw.api;
    // Four hosts keep 60 silent connections each open, reopened when closed: 240 > 144.
    let stop = Arc::new(AtomicBool::new(false));
    let mut holders = Vec::new();
    for host in 3..7 {
        for _ in 0..60 {
            let stop = stop.clone();
            let source: IpAddr = format!("127.0.0.{host}").parse().unwrap();
            holders.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(mut s) = common::tcp_from(api, Some(source)).await {
                        let mut buf = [0u8; 16];
                        let _ =
                            tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
                    } else {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }));
        }
    }
    // Wait until the gateway is at its cap.
    let filling = Instant::now();
    while metric(
        &http_get(gw.admin, "/metrics").1,
        "civgate_connections_open",
    ) < 144.0
    {
        assert!(
            filling.elapsed() < Duration::from_secs(10),
            "the cap was never reached"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A legitimate client waits in the kernel's queue and is served once places free up.
    let started = Instant::now();
    let served = tokio::time::timeout(Duration::from_secs(15), async {
        let ch = client::connect(api, &env.certs(), Some("registry-hp"))
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        health(ch).await
    })
    .await;
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (_, metrics) = http_get(gw.admin, "/metrics");
    println!(
        "file limit: a legitimate client served after {took:?}; {} connections open at the end",
        metric(&metrics, "civgate_connections_open")
    );
    assert!(matches!(served, Ok(Ok(()))), "{served:?}");
    let emfile = std::iter::from_fn(|| gw.logs.try_recv().ok()).any(|l| {
        l["message"]
            .as_str()
            .is_some_and(|m| m.contains("accept failed"))
    });
    assert!(!emfile, "accepting failed for lack of a descriptor");
    for h in holders {
        h.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_silent_after_its_handshake_is_closed() {
    let env = Env::new();
    let gw = env.start().await;
    let certs = env.certs();
    let read = |p: std::path::PathBuf| std::fs::read(p).unwrap();
    let cfg = civgate::tls::client_config(
        &read(certs.join("ca.pem")),
        Some((
            &read(certs.join("clients/unknown.pem")),
            &read(certs.join("clients/unknown.key")),
        )),
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(gw.api_addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    // The handshake is done; no HTTP/2 preface follows.
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a silent connection was held for 10 s");
    let took = started.elapsed();
    println!("silent connection closed after {took:?}");
    assert!(took < Duration::from_secs(4), "{took:?}");
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_message_of_a_reflection_stream_costs_a_probe() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest,
    };
    let env = Env::new();
    let gw = env.start().await;
    let ch = client::connect(gw.api_addr, &env.certs(), Some("registry-hp"))
        .await
        .unwrap();
    let requests = (0..200).map(|_| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    });
    let mut stream = ServerReflectionClient::new(ch)
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut answered = 0;
    let end = loop {
        match stream.message().await {
            Ok(Some(_)) => answered += 1,
            Ok(None) => break None,
            Err(e) => break Some(e),
        }
    };
    println!("reflection: {answered} of 200 messages answered, then {end:?}");
    // Refused once over the probes quota: the reflection service ends its answers when its
    // request stream fails (with the error, or as a plain end).
    assert!(
        end.as_ref()
            .is_none_or(|e| e.code() == Code::ResourceExhausted),
        "{end:?}"
    );
    // 40 at once (the call took one), then 20/s; answers in flight may be dropped at the end.
    assert!((20..=60).contains(&answered), "{answered}");
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agency_cannot_take_the_whole_body_budget() {
    let env = Env::new();
    env.write_config(&config(&[(
        "max_buffered_request_bytes = 268435456",
        "max_buffered_request_bytes = 33554432",
    )]));
    let gw = env.spawn_binary();
    // registry-hp announces 16 messages of 4 MiB and sends nothing more: it may hold half.
    let mut hog = raw_h2(gw.api, &env.certs(), "registry-hp", None)
        .await
        .unwrap()
        .ready()
        .await
        .unwrap();
    let mut held = Vec::new();
    let mut refused = Vec::new();
    for _ in 0..16 {
        let (resp, mut body) = hog
            .send_request(grpc_head("/civgate.v1.Citizens/GetCitizen"), false)
            .unwrap();
        body.send_data(prefix(4 * 1024 * 1024 - 64), false).unwrap();
        held.push(body);
        refused.push(resp);
        hog = hog.ready().await.unwrap();
    }
    // Wait until the hog has been refused past its half.
    let mut hog_refused = 0;
    for r in refused {
        if let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_millis(500), r).await
            && resp.headers().get("grpc-status").is_some_and(|v| v == "8")
        {
            hog_refused += 1;
        }
    }
    // Another agency's 1 MB requests still fit.
    let mut other = CitizensClient::new(
        client::connect(gw.api, &env.certs(), Some("registry-hn"))
            .await
            .unwrap(),
    )
    .max_encoding_message_size(2 * 1024 * 1024);
    let mut exhausted = 0;
    for _ in 0..10 {
        let r = other
            .get_citizen(GetCitizenRequest {
                case_reference: String::new(),
                personal_id: "0".repeat(1024 * 1024),
                purpose: "DEATH_REGISTRATION".into(),
            })
            .await;
        if matches!(&r, Err(e) if e.code() == Code::ResourceExhausted) {
            exhausted += 1;
        }
    }
    println!(
        "body budget: the hog refused {hog_refused} of 16 streams; the other agency refused {exhausted} of 10"
    );
    assert!(hog_refused >= 12, "{hog_refused}");
    assert_eq!(
        exhausted, 0,
        "another agency was refused for the hog's bytes"
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_churning_verified_connections_is_held_to_its_connection_rate() {
    let env = Env::new();
    env.write_config(&config(&[(
        "probes = { per_second = 20, burst = 40 }",
        "probes = { per_second = 1000, burst = 1000 }",
    )]));
    let gw = env.spawn_binary();
    let api = gw.api;
    // 100 loops on one host, each completing a handshake with a valid certificate and
    // closing at once.
    let stop = Arc::new(AtomicBool::new(false));
    let completed = Arc::new(AtomicUsize::new(0));
    let certs = env.certs();
    let read = |p: std::path::PathBuf| std::fs::read(p).unwrap();
    let cfg = Arc::new(
        civgate::tls::client_config(
            &read(certs.join("ca.pem")),
            Some((
                &read(certs.join("clients/registry-hp.pem")),
                &read(certs.join("clients/registry-hp.key")),
            )),
        )
        .unwrap(),
    );
    let mut churn = Vec::new();
    for _ in 0..100 {
        let (stop, completed, cfg) = (stop.clone(), completed.clone(), cfg.clone());
        churn.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let Ok(tcp) = common::tcp_from(api, Some("127.0.0.5".parse().unwrap())).await
                else {
                    tokio::task::yield_now().await;
                    continue;
                };
                let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect("localhost".try_into().unwrap(), tcp)
                    .await;
                if tls.is_ok() {
                    completed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    // Meanwhile a legitimate client opens a new connection for each of 30 health checks.
    let mut ok = 0;
    let started = Instant::now();
    for _ in 0..30 {
        let r = tokio::time::timeout(Duration::from_secs(5), async {
            let ch = client::connect(api, &env.certs(), Some("registry-hn"))
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            health(ch).await
        })
        .await;
        if matches!(r, Ok(Ok(()))) {
            ok += 1;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let (_, metrics) = http_get(gw.admin, "/metrics");
    let rate_refused = metric(
        &metrics,
        "civgate_connections_refused_total{reason=\"rate\"}",
    );
    let done = completed.load(Ordering::Relaxed);
    println!(
        "churn: {ok}/30 legitimate connections served in {secs:.1} s; the churning host completed {done} handshakes ({:.0}/s), {rate_refused} connections refused by rate",
        done as f64 / secs
    );
    assert!(ok >= 29, "{ok} of 30");
    assert!(rate_refused > 0.0);
    // 200/s after a burst of 400, plus slack for timing.
    assert!(
        (done as f64) <= 400.0 + 200.0 * secs * 1.2 + 50.0,
        "{done} in {secs:.1} s"
    );
    for c in churn {
        c.abort();
    }
}
