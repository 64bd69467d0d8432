//! Several gateway replicas on one PostgreSQL database (issue #7): three real `civgate serve`
//! processes share the journal and the audit log; one of them is killed with SIGKILL at random
//! moments while 16 producers publish through all three, retrying with their idempotency keys.
//! At the end a consumer has every receipted event in order, gap-free, exactly once, and the
//! single audit log verifies — through any replica.

mod common;

use std::{net::SocketAddr, time::Duration};

use civgate::{
    audit::{
        auditor::{self, Online},
        note::Verifier,
    },
    client,
};
use common::Env;
use rand::{Rng, SeedableRng};

const REPLICAS: usize = 3;
const PRODUCERS: usize = 16;
const PER_PRODUCER: usize = 400;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_with_one_killed_at_random_lose_and_duplicate_nothing() {
    let Some(env) = Env::postgres("replicas_kill").await else {
        return;
    };
    env.write_config(&common::unthrottled_publishes().replace(
        "checkpoint_interval_ms = 1000",
        "checkpoint_interval_ms = 100",
    ));
    let listens: Vec<String> = (0..REPLICAS)
        .map(|_| format!("127.0.0.1:{}", common::free_port()))
        .collect();
    let addrs: Vec<SocketAddr> = listens.iter().map(|l| l.parse().unwrap()).collect();
    let mut gws: Vec<common::Gateway> = listens.iter().map(|l| env.spawn_binary_on(l)).collect();

    let sync = common::Producers::start(env.certs(), addrs.clone(), PRODUCERS, PER_PRODUCER);
    // Five times: wait a random moment, kill -9 one replica, restart it.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..700))).await;
        let r = rng.random_range(0..REPLICAS);
        gws[r].child.kill().unwrap(); // SIGKILL
        gws[r].child.wait().unwrap();
        gws[r] = env.spawn_binary_on(&listens[r]);
    }
    let receipts = sync.finish(Duration::from_secs(240)).await;
    assert_eq!(receipts.len(), PRODUCERS * PER_PRODUCER);
    // Read through the replica that published the least: it learns of the others' commits.
    common::check_delivery(addrs[2], &env.certs(), &receipts).await;

    // One log: verified through replica 0, then through replica 1 against the state saved
    // from the first (its checkpoint must be consistent with replica 0's).
    let v =
        Verifier::parse(&std::fs::read_to_string(env.certs().join("audit.vkey")).unwrap()).unwrap();
    let state = env.dir.path().join("auditor-state.json");
    let mut sizes = Vec::new();
    for addr in [addrs[0], addrs[1]] {
        let mut online = Online::new(
            client::connect(addr, &env.certs(), Some("auditor"))
                .await
                .unwrap(),
        );
        let report = auditor::verify_online(&mut online, &v, &state)
            .await
            .unwrap_or_else(|e| panic!("audit verify through {addr}: {e:#}"));
        sizes.push(report.size);
    }
    // Every receipted publish has its record (plus retries, refusals, health checks …).
    assert!(sizes[0] >= receipts.len() as u64, "{sizes:?}");
}
