//! The crash test: the real `civgate serve` binary is killed with SIGKILL at random moments
//! while 16 producers publish 10,000 events, retrying with their idempotency keys; at the end
//! a consumer has every receipted event, in sequence order, with no gap, exactly once.

mod common;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use civgate::{
    client,
    config::DEFAULT_CONFIG,
    pb::v1::{
        DeathRecorded, Event, PublishRequest, SubscribeRequest, event::Payload,
        exchange_client::ExchangeClient,
    },
};
use common::Env;
use rand::{Rng, SeedableRng};

const PRODUCERS: usize = 16;
const PER_PRODUCER: usize = 625;

fn event(n: usize) -> Event {
    Event {
        occurred_at_unix_ms: n as i64,
        payload: Some(Payload::DeathRecorded(DeathRecorded {
            personal_id: format!("031050{:06}", n % 1_000_000),
            date_of_death: "2026-01-01".into(),
            recording_unit: format!("unit {n}"),
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_and_duplicates_nothing() {
    let env = Env::new();
    env.write_config(&DEFAULT_CONFIG.replace(
        "publishes = { per_second = 500, burst = 1000 }",
        "publishes = { per_second = 1000000, burst = 1000000 }",
    ));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let addr: std::net::SocketAddr = listen.parse().unwrap();
    let gw = Arc::new(Mutex::new(Some(env.spawn_binary_on(&listen))));

    // key -> (event_id, sequence) as receipted.
    let receipts: Arc<Mutex<HashMap<String, (String, u64)>>> = Arc::default();
    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let (receipts, certs) = (receipts.clone(), env.certs());
        producers.push(tokio::spawn(async move {
            let mut client: Option<ExchangeClient<tonic::transport::Channel>> = None;
            for i in 0..PER_PRODUCER {
                let key = format!("p{p}-{i}");
                loop {
                    if client.is_none() {
                        client = client::connect(addr, &certs, Some("population"))
                            .await
                            .ok()
                            .map(ExchangeClient::new);
                    }
                    let Some(c) = client.as_mut() else {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    };
                    match c
                        .publish(PublishRequest {
                            idempotency_key: key.clone(),
                            event: Some(event(p * PER_PRODUCER + i)),
                        })
                        .await
                    {
                        Ok(r) => {
                            let r = r.into_inner();
                            let previous = receipts
                                .lock()
                                .unwrap()
                                .insert(key.clone(), (r.event_id, r.sequence));
                            assert!(previous.is_none());
                            break;
                        }
                        Err(_) => {
                            client = None;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            }
        }));
    }

    // Five times: wait a random moment, kill -9, restart.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(150..600))).await;
        let g = gw.lock().unwrap().take();
        if let Some(mut g) = g {
            g.child.kill().unwrap(); // SIGKILL
            g.child.wait().unwrap();
        }
        *gw.lock().unwrap() = Some(env.spawn_binary_on(&listen));
    }
    for p in producers {
        tokio::time::timeout(Duration::from_secs(240), p)
            .await
            .expect("producers finish")
            .unwrap();
    }
    let receipts = receipts.lock().unwrap().clone();
    assert_eq!(receipts.len(), PRODUCERS * PER_PRODUCER);

    // Everything receipted is there, in order, gap-free, once.
    let mut ex = ExchangeClient::new(
        client::connect(addr, &env.certs(), Some("registry-hp"))
            .await
            .unwrap(),
    );
    let mut stream = ex
        .subscribe(SubscribeRequest {
            topic: "population".into(),
            consumer_group: "crash-check".into(),
            from_sequence: Some(1),
        })
        .await
        .unwrap()
        .into_inner();
    let max = receipts.values().map(|(_, s)| *s).max().unwrap();
    let mut by_id: HashMap<String, u64> = HashMap::new();
    let mut expected = 1;
    let mut acked = 0;
    while expected <= max {
        let m = tokio::time::timeout(Duration::from_secs(20), stream.message())
            .await
            .expect("delivery")
            .unwrap()
            .unwrap();
        assert_eq!(m.sequence, expected, "gap or reorder");
        assert!(
            by_id.insert(m.event_id.clone(), m.sequence).is_none(),
            "event {} delivered twice",
            m.event_id
        );
        expected += 1;
        // Keep the window open.
        if m.sequence - acked >= 128 {
            ex.ack(civgate::pb::v1::AckRequest {
                topic: "population".into(),
                consumer_group: "crash-check".into(),
                sequence: m.sequence,
            })
            .await
            .unwrap();
            acked = m.sequence;
        }
    }
    for (key, (id, seq)) in &receipts {
        assert_eq!(
            by_id.get(id),
            Some(seq),
            "receipted {key} ({id}, #{seq}) not delivered as receipted"
        );
    }
    // One event per idempotency key: exactly once after de-duplication by event_id.
    assert_eq!(
        by_id.len(),
        receipts.len(),
        "{} events for {} keys",
        by_id.len(),
        receipts.len()
    );
}
