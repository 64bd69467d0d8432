//! Limits shared by replicas through a real Redis (a `redis-server` of the test's own, so it
//! can be killed): three gateways, one agency spreading its calls over all three, refused at
//! its single quota; one harvesting window and one in-flight cap across replicas; Redis killed
//! mid-run (each replica falls back to its own limits, says so, and serves on) and restarted
//! (shared again).
//!
//! Needs `redis-server` (Debian's redis-server package): skipped with a line saying why where
//! it is missing, unless `CIVGATE_REQUIRE_REDIS=1`.

mod common;

use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use civgate::{
    client,
    config::DEFAULT_CONFIG,
    limits::{Bucket, Decision, HarvestSection, Rate},
    pb::v1::{GetCitizenRequest, citizens_client::CitizensClient},
    server::{self, ConfigSource, Overrides, Running},
    shared::{Admission, SharedLimits, SharedLimitsSection},
};
use common::Env;
use tonic::{Code, transport::Channel};

struct Redis {
    port: u16,
    child: Option<Child>,
}

impl Redis {
    /// A fresh redis-server on `port`, ready, or why not.
    fn start(port: u16) -> Result<Self, String> {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("redis-server: {e}"))?;
        let r = Self {
            port,
            child: Some(child),
        };
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if started.elapsed() > Duration::from_secs(10) {
                return Err("redis-server did not listen within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(r)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn redis_or_skip(port: u16) -> Option<Redis> {
    match Redis::start(port) {
        Ok(r) => Some(r),
        Err(e) if std::env::var("CIVGATE_REQUIRE_REDIS").as_deref() != Ok("1") => {
            println!("skipped: {e}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

/// Starts replica `i` on its own data directory with `text`.
async fn replica(env: &Env, text: &str, i: usize) -> Running {
    server::start(
        ConfigSource::Text {
            text: text.into(),
            base_dir: env.dir.path().to_owned(),
        },
        Overrides {
            data_dir: Some(env.dir.path().join(format!("data-{i}"))),
            ..env.overrides()
        },
    )
    .await
    .expect("replica starts")
}

async fn registry(env: &Env, addr: SocketAddr) -> CitizensClient<Channel> {
    CitizensClient::new(
        client::connect(addr, &env.certs(), Some("registry-hp"))
            .await
            .unwrap(),
    )
}

fn get(id: &str) -> GetCitizenRequest {
    GetCitizenRequest {
        case_reference: String::new(),
        personal_id: id.into(),
        purpose: "DEATH_REGISTRATION".into(),
    }
}

/// Calls spread round-robin over `clients` for `secs`: (served, refused over quota, seconds).
async fn spread(
    clients: &mut [CitizensClient<Channel>],
    id: &str,
    secs: f64,
) -> (usize, usize, f64) {
    let started = Instant::now();
    let (mut ok, mut refused) = (0, 0);
    let mut i = 0;
    while started.elapsed().as_secs_f64() < secs {
        match clients[i % clients.len()].get_citizen(get(id)).await {
            Ok(_) => ok += 1,
            Err(e) if e.code() == Code::ResourceExhausted => refused += 1,
            Err(e) => panic!("{e:?}"),
        }
        i += 1;
    }
    (ok, refused, started.elapsed().as_secs_f64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_enforce_one_quota_and_fall_back_to_their_own_when_redis_dies() {
    let port = common::free_port();
    let Some(mut redis) = redis_or_skip(port) else {
        return;
    };
    let env = Env::new();
    let dir = env.start_directory().await;
    let text = common::with_upstream_port(DEFAULT_CONFIG, dir.directory.addr.port())
        .replace(
            "[quotas.roles.civil_registry]\nreads = { per_second = 500, burst = 1000 }",
            "[quotas.roles.civil_registry]\nreads = { per_second = 20, burst = 40 }",
        )
        .replace(
            "[shared_limits]\nurl = \"\"\nprefix = \"civgate\"",
            &format!(
                "[shared_limits]\nurl = \"{}\"\nprefix = \"quota-test\"",
                redis.url()
            ),
        );
    assert!(text.contains("quota-test"));
    let mut replicas = Vec::new();
    for i in 0..3 {
        replicas.push(replica(&env, &text, i).await);
    }
    let mut clients = Vec::new();
    for r in &replicas {
        clients.push(registry(&env, r.api_addr).await);
    }
    let id = dir.people[0].personal_id.to_string();

    // Shared: one quota across the three (burst 40 + 20/s).
    let (ok, refused, secs) = spread(&mut clients, &id, 3.0).await;
    let allowed = 40.0 + 20.0 * secs;
    println!(
        "shared: {ok} served, {refused} refused in {secs:.1} s across 3 replicas (one quota: {allowed:.0})"
    );
    assert!(
        (ok as f64 - allowed).abs() <= allowed * 0.1 + 2.0,
        "{ok} served across three replicas; one quota allows {allowed:.0}"
    );

    // Redis dies: each replica enforces its own quota (three buckets), and serves on.
    redis.kill();
    let (ok, refused, secs) = spread(&mut clients, &id, 3.0).await;
    let own = 3.0 * (40.0 + 20.0 * secs);
    println!(
        "Redis down: {ok} served, {refused} refused in {secs:.1} s (three own quotas: {own:.0})"
    );
    assert!(
        (ok as f64 - own).abs() <= own * 0.1,
        "{ok} served with Redis down; three own quotas allow {own:.0}"
    );
    assert!(refused > 0, "nothing refused with Redis down");
    let (_, metrics) = common::http_get(replicas[0].admin_addr, "/metrics");
    assert!(metrics.contains("civgate_shared_limits_up 0"), "{metrics}");

    // Back: shared again (a fresh Redis: a fresh bucket).
    assert!(replicas.iter().all(|r| r.shared_limits_up() == Some(false)));
    let _redis = Redis::start(port).unwrap();
    // Each replica's probe finds Redis again within a fraction of a second.
    let started = Instant::now();
    while !replicas.iter().all(|r| r.shared_limits_up() == Some(true)) {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "shared limits not restored"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (ok, refused, secs) = spread(&mut clients, &id, 2.0).await;
    let allowed = 40.0 + 20.0 * secs;
    println!("Redis back: {ok} served, {refused} refused in {secs:.1} s (one quota: {allowed:.0})");
    assert!(
        (ok as f64 - allowed).abs() <= allowed * 0.1 + 2.0,
        "{ok} served after Redis came back; one quota allows {allowed:.0}"
    );
    for r in replicas {
        r.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_harvesting_window_and_one_in_flight_cap_across_replicas() {
    let port = common::free_port();
    let Some(redis) = redis_or_skip(port) else {
        return;
    };
    let section = SharedLimitsSection {
        url: redis.url(),
        prefix: "window-test".into(),
        ..Default::default()
    };
    let key = civgate::shared::hash_key(Some(b"the same signing key"));
    // Two replicas' connections.
    let a: Arc<SharedLimits> = SharedLimits::new(&section, key).unwrap();
    let b: Arc<SharedLimits> = SharedLimits::new(&section, key).unwrap();
    let agency = "registry-hp".parse().unwrap();
    let s = HarvestSection {
        window_secs: 60,
        warn_distinct: 100,
        deny_distinct: 5,
        shadow: false,
    };
    let ids = |r: std::ops::Range<u32>| r.map(|i| format!("03120300{i:04}")).collect::<Vec<_>>();
    use civgate::limits::Harvest;
    assert!(matches!(
        a.harvest(&s, &agency, &ids(0..3), false).await.unwrap(),
        Harvest::Allow { distinct: 3 }
    ));
    assert!(matches!(
        b.harvest(&s, &agency, &ids(3..5), false).await.unwrap(),
        Harvest::Allow { distinct: 5 }
    ));
    // The sixth distinct citizen, through either replica, is refused; one already read is not.
    assert!(matches!(
        a.harvest(&s, &agency, &ids(5..6), false).await.unwrap(),
        Harvest::Deny { distinct: 6 }
    ));
    assert!(matches!(
        b.harvest(&s, &agency, &ids(0..1), false).await.unwrap(),
        Harvest::Allow { .. }
    ));
    // A delivery is never refused but counts.
    assert!(matches!(
        b.harvest(&s, &agency, &ids(6..7), true).await.unwrap(),
        Harvest::WouldDeny { distinct: 6 }
    ));

    // In flight: a cap of 2 across both.
    let first = a.admit(&agency, 2, None).await.unwrap();
    let _second = b.admit(&agency, 2, None).await.unwrap();
    assert!(matches!(
        a.admit(&agency, 2, None).await.unwrap(),
        Admission::AtCap
    ));
    assert!(matches!(
        b.admit(&agency, 2, None).await.unwrap(),
        Admission::AtCap
    ));
    drop(first);
    let started = Instant::now();
    loop {
        if let Admission::Admitted(..) = b.admit(&agency, 2, None).await.unwrap() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the place was not given back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A batch's cost across replicas: 150 of a 200 burst, then 100 more is refused whole.
    let rate = Rate {
        per_second: 10.try_into().unwrap(),
        burst: 200.try_into().unwrap(),
    };
    assert_eq!(
        a.quota(&agency, Bucket::Reads, rate, 150, false)
            .await
            .unwrap(),
        Decision::Allow
    );
    assert!(matches!(
        b.quota(&agency, Bucket::Reads, rate, 100, false)
            .await
            .unwrap(),
        Decision::Refuse {
            retry_after_secs: 5
        }
    ));
    assert_eq!(
        b.quota(&agency, Bucket::Reads, rate, 50, false)
            .await
            .unwrap(),
        Decision::Allow
    );
    // Redis never holds an ID.
    let keys: Vec<String> = {
        let client = redis::Client::open(redis.url()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("KEYS")
            .arg("window-test:harvest:*")
            .query_async(&mut c)
            .await
            .unwrap()
    };
    assert!(!keys.is_empty());
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let members: Vec<String> = redis::cmd("ZRANGE")
        .arg("window-test:harvest:registry-hp")
        .arg(0)
        .arg(-1)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(members.len(), 6);
    assert!(members.iter().all(|m| !m.contains("031203")), "{members:?}");
}
