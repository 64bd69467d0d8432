//! The crash test: the real `civgate serve` binary is killed with SIGKILL at random moments
//! while 16 producers publish 10,000 events (deaths in two provinces), retrying with their
//! idempotency keys; at the end each registry has every receipted event addressed to it, in
//! sequence order, exactly once, and nothing else. Then it is killed again while each registry
//! consumes: resumed after its last acknowledgement, every addressed event arrives exactly
//! once after de-duplication.

mod common;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use common::Env;
use rand::{Rng, SeedableRng};

const PRODUCERS: usize = 16;
const PER_PRODUCER: usize = 625;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_and_duplicates_nothing() {
    let env = Env::new();
    env.write_config(&common::unthrottled_publishes());
    let listen = format!("127.0.0.1:{}", common::free_port());
    let addr: std::net::SocketAddr = listen.parse().unwrap();
    let gw = Arc::new(Mutex::new(Some(env.spawn_binary_on(&listen))));

    let sync = common::Producers::start(env.certs(), vec![addr], PRODUCERS, PER_PRODUCER);
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
    let receipts = sync.finish(Duration::from_secs(240)).await;
    assert_eq!(receipts.len(), PRODUCERS * PER_PRODUCER);
    common::check_delivery(addr, &env.certs(), &receipts).await;

    for (registry, _) in common::REGISTRIES {
        let mine: common::Receipts = receipts
            .iter()
            .filter(|(k, _)| common::registry_of_key(k) == registry)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let kill_at = mine.len() / 3 + 7;
        let mut got = common::Delivered::default();
        let mut sub = common::Subscriber::open(addr, &env.certs(), registry, "resume", None).await;
        let mut n = 0;
        while got.by_id.len() < mine.len() {
            let m = sub.next().await.expect("delivery");
            got.take(&m);
            n += 1;
            if n == kill_at {
                // Mid-stream, with events delivered and not acknowledged.
                let g = gw.lock().unwrap().take();
                if let Some(mut g) = g {
                    g.child.kill().unwrap();
                    g.child.wait().unwrap();
                }
                *gw.lock().unwrap() = Some(env.spawn_binary_on(&listen));
                sub = common::Subscriber::open(addr, &env.certs(), registry, "resume", None).await;
                continue;
            }
            sub.ack_every(128, m.sequence).await;
        }
        got.check(&mine);
        assert!(
            got.duplicates > 0,
            "the resumed stream redelivers what was not acknowledged"
        );
    }
}
