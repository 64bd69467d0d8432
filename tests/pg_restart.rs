//! PostgreSQL restarted under load (issue #7): while the database is away the gateway answers
//! UNAVAILABLE and reports itself not ready (`/healthz` 503); when it is back the gateway
//! recovers on its own — no restart of its own.
//!
//! It stops and starts the machine's PostgreSQL cluster (`pg_ctlcluster`), so it lives alone in
//! this test binary: cargo runs test binaries one after another. (A quick `restart` alone can
//! go unnoticed: the pools wait up to their acquire timeout for a connection, and the database
//! is back before that.)

mod common;

use std::{
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use civgate::{
    client,
    pb::v1::{PublishRequest, exchange_client::ExchangeClient},
};
use common::{Env, http_get};
use tonic::Code;

/// The cluster to restart: the only one under /etc/postgresql/<version>/main.
fn cluster_version() -> Option<String> {
    std::fs::read_dir("/etc/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|v| std::path::Path::new(&format!("/etc/postgresql/{v}/main")).is_dir())
}

fn pg_ctl(version: &str, action: &str) -> bool {
    Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", version, "main", action])
        .status()
        .is_ok_and(|s| s.success())
}

/// Starts the cluster when dropped (also when the test panics while the database is stopped).
struct StartOnDrop(String);

impl Drop for StartOnDrop {
    fn drop(&mut self) {
        let running = Command::new("pg_ctlcluster")
            .args(["--skip-systemctl-redirect", &self.0, "main", "status"])
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !running {
            pg_ctl(&self.0, "start");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_reports_unavailable_while_postgres_restarts_and_recovers_alone() {
    let Some(env) = Env::postgres("pg_restart").await else {
        return;
    };
    let Some(version) = cluster_version() else {
        assert!(
            std::env::var("CIVGATE_REQUIRE_POSTGRES").as_deref() != Ok("1"),
            "CIVGATE_REQUIRE_POSTGRES=1 but no local cluster to restart"
        );
        eprintln!("skipping: PostgreSQL is reachable but not a local pg_ctlcluster cluster");
        return;
    };
    env.write_config(
        &common::unthrottled_publishes()
            .replace("commit_timeout_ms = 2000", "commit_timeout_ms = 500"),
    );
    let gw = env.spawn_binary();
    let (api, admin) = (gw.api, gw.admin);

    // Load: four publishers, counting receipts and refusals by code.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let unavailable = Arc::new(AtomicU64::new(0));
    let other = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut tasks = Vec::new();
    for p in 0..4 {
        let (stop, ok, unavailable, other, certs) = (
            stop.clone(),
            ok.clone(),
            unavailable.clone(),
            other.clone(),
            env.certs(),
        );
        tasks.push(tokio::spawn(async move {
            let mut c = ExchangeClient::new(
                client::connect(api, &certs, Some("population"))
                    .await
                    .unwrap(),
            );
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let r = c
                    .publish(PublishRequest {
                        idempotency_key: format!("r{p}-{i}"),
                        event: Some(common::death_event(p * 1_000_000 + i)),
                    })
                    .await;
                match r {
                    Ok(_) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        i += 1;
                    }
                    Err(s) if s.code() == Code::Unavailable => {
                        unavailable.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(s) => {
                        other
                            .lock()
                            .unwrap()
                            .push(format!("{:?}: {}", s.code(), s.message()))
                    }
                }
            }
        }));
    }
    let wait_ok = |n: u64| {
        let ok = ok.clone();
        async move {
            let t = Instant::now();
            while ok.load(Ordering::Relaxed) < n {
                assert!(t.elapsed() < Duration::from_secs(30), "no receipts");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    wait_ok(200).await;
    assert_eq!(http_get(admin, "/healthz").0, 200);

    // Restart the database under load: stop it, and while it is away the gateway must say so
    // (UNAVAILABLE to callers, 503 on /healthz) rather than hang or answer anything else.
    // Whatever happens below, the machine's database is started again.
    let _restart_guard = StartOnDrop(version.clone());
    let v = version.clone();
    assert!(
        tokio::task::spawn_blocking(move || pg_ctl(&v, "stop"))
            .await
            .unwrap(),
        "pg_ctlcluster {version} main stop failed"
    );
    let down = Instant::now();
    let (mut saw_503, mut saw_unavailable) = (false, false);
    while !(saw_503 && saw_unavailable) && down.elapsed() < Duration::from_secs(15) {
        saw_503 |= http_get(admin, "/healthz").0 == 503;
        saw_unavailable |= unavailable.load(Ordering::Relaxed) > 0;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let v = version.clone();
    let started = tokio::task::spawn_blocking(move || pg_ctl(&v, "start"))
        .await
        .unwrap();
    assert!(started, "pg_ctlcluster {version} main start failed");
    assert!(
        saw_unavailable,
        "no UNAVAILABLE while the database was away"
    );
    assert!(
        saw_503,
        "/healthz never said 503 while the database was away"
    );

    // Back: receipts resume without restarting the gateway, and it reports ready again.
    let before = ok.load(Ordering::Relaxed);
    wait_ok(before + 200).await;
    let t = Instant::now();
    while http_get(admin, "/healthz").0 != 200 {
        assert!(t.elapsed() < Duration::from_secs(10), "/healthz stays 503");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        other.lock().unwrap().is_empty(),
        "only UNAVAILABLE while the database is away: {:?}",
        other.lock().unwrap()
    );
    drop(gw);
}
