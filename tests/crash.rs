//! The crash test: the real `civgate serve` binary is killed with SIGKILL at random moments
//! while 16 producers publish 10,000 events, retrying with their idempotency keys; at the end
//! a consumer has every receipted event, in sequence order, with no gap, exactly once.

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
}
