//! A disk that stops answering: the SQLite store's file system is frozen (`fsfreeze`) under
//! the real binary. Calls must be answered UNAVAILABLE within the commit timeout and health
//! must say NOT_SERVING, then both recover when the disk answers again.
//!
//! Needs root (a loop-mounted ext4 image): skipped with a line saying why elsewhere, unless
//! `CIVGATE_REQUIRE_FSFREEZE=1`.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use civgate::{
    client,
    pb::v1::{PublishRequest, exchange_client::ExchangeClient},
};
use common::{Env, http_get};
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A loop-mounted ext4 file system at `at`, unmounted on drop.
struct Mounted(PathBuf);

impl Mounted {
    fn new(image: &Path, at: &Path) -> Result<Self, String> {
        let f = std::fs::File::create(image).map_err(|e| e.to_string())?;
        f.set_len(64 * 1024 * 1024).map_err(|e| e.to_string())?;
        run("mkfs.ext4", &["-q", "-F", &image.display().to_string()])?;
        std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
        run(
            "mount",
            &[
                "-o",
                "loop",
                &image.display().to_string(),
                &at.display().to_string(),
            ],
        )?;
        Ok(Self(at.to_owned()))
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = run("fsfreeze", &["-u", &self.0.display().to_string()]);
        let _ = run("umount", &["-l", &self.0.display().to_string()]);
    }
}

/// Thaws the file system on drop, before the gateway (declared earlier) is killed: a process
/// blocked on a frozen disk cannot die until it thaws.
struct Frozen(PathBuf);

impl Frozen {
    fn new(at: &Path) -> Self {
        run("fsfreeze", &["-f", &at.display().to_string()]).expect("fsfreeze -f");
        Self(at.to_owned())
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = run("fsfreeze", &["-u", &self.0.display().to_string()]);
    }
}

async fn health(ch: &tonic::transport::Channel) -> Result<(), tonic::Status> {
    let mut req = tonic::Request::new(HealthCheckRequest::default());
    req.set_timeout(Duration::from_secs(30));
    HealthClient::new(ch.clone()).check(req).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_disk_answers_unavailable_within_the_commit_timeout_and_recovers() {
    let env = Env::new();
    let data = env.dir.path().join("data");
    let _mounted = match Mounted::new(&env.dir.path().join("store.img"), &data) {
        Ok(m) => m,
        Err(e) if std::env::var("CIVGATE_REQUIRE_FSFREEZE").as_deref() != Ok("1") => {
            println!("skipped: cannot mount a loop file system to freeze ({e})");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    env.write_config(
        &civgate::config::DEFAULT_CONFIG
            .replace("commit_timeout_ms = 2000", "commit_timeout_ms = 1000"),
    );
    let gw = env.spawn_binary();
    let ch = client::connect(gw.api, &env.certs(), Some("population"))
        .await
        .unwrap();
    health(&ch).await.unwrap();
    let mut exchange = ExchangeClient::new(ch.clone());
    let publish = |n: usize| {
        let mut req = tonic::Request::new(PublishRequest {
            idempotency_key: format!("stall-{n}"),
            event: Some(common::death_event(n)),
        });
        req.set_timeout(Duration::from_secs(30));
        req
    };
    exchange.publish(publish(0)).await.unwrap();

    let frozen = Frozen::new(&data);
    let started = Instant::now();
    let err = health(&ch).await.unwrap_err();
    let health_took = started.elapsed();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let started = Instant::now();
    let err = exchange.publish(publish(1)).await.unwrap_err();
    let publish_took = started.elapsed();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        !err.message().contains("sqlite") && !err.message().contains("journal_"),
        "a store's own words reached the client: {err:?}"
    );
    let (code, body) = http_get(gw.admin, "/healthz");
    println!(
        "frozen disk: health check answered in {health_took:?}, publish in {publish_took:?}; /healthz {code} {}",
        body.trim()
    );
    assert!(health_took < Duration::from_secs(4), "{health_took:?}");
    assert!(publish_took < Duration::from_secs(4), "{publish_took:?}");
    assert_eq!((code, body.trim()), (503, "NOT_SERVING"));

    drop(frozen);
    // Thawed: the gateway recovers by itself (the publish retried with its key is accepted).
    let started = Instant::now();
    loop {
        if exchange.publish(publish(1)).await.is_ok() && health(&ch).await.is_ok() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no recovery after thawing"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(http_get(gw.admin, "/healthz").0, 200);
    drop(gw);
}
