//! The real `civgate` binary: SIGHUP reload, SIGTERM drain, `config check`, `certs init`,
//! and the admin port's metrics.

mod common;

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use civgate::client;
use common::{Env, http_get};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

fn civgate(args: &[&str], cwd: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_civgate"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run civgate")
}

#[tokio::test]
async fn revocation_on_sighup_refuses_new_connections_and_the_calls_of_open_ones() {
    let env = Env::new();
    let mut gw = env.spawn_binary();
    let certs = env.certs();

    // An established connection with a server stream open before the reload, and a
    // subscription delivering personal data.
    let ch = client::connect(gw.api, &certs, Some("population"))
        .await
        .unwrap();
    let mut health = HealthClient::new(ch.clone());
    let mut watch = health
        .watch(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    let mut events = civgate::pb::v1::exchange_client::ExchangeClient::new(ch)
        .subscribe(civgate::pb::v1::SubscribeRequest {
            topic: "civil-status".into(),
            consumer_group: "population-db".into(),
            from_sequence: None,
        })
        .await
        .unwrap()
        .into_inner();

    // A call whose headers and first bytes arrived before the reload, its body after.
    let mut raw = common::raw_h2(gw.api, &certs, "population", None)
        .await
        .unwrap()
        .ready()
        .await
        .unwrap();
    let (pending, mut body) = raw
        .send_request(
            common::grpc_head("/civgate.v1.Exchange/GetEventStatus"),
            false,
        )
        .unwrap();
    body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 8, 0x0a, 6]), false)
        .unwrap();

    civgate::certs::revoke(&certs, "population").unwrap();
    gw.signal("HUP");
    gw.wait_log("configuration reloaded");

    // Its body completes after the reload: refused, not served.
    body.send_data(bytes::Bytes::from_static(b"e-0001"), true)
        .unwrap();
    let resp = pending.await.unwrap();
    assert_eq!(resp.headers()["grpc-status"], "16", "{resp:?}");

    let err = client::probe_handshake(gw.api, &certs, Some("population"))
        .await
        .expect_err("revoked after reload");
    assert!(err.contains("CertificateRevoked"), "{err}");
    client::probe_handshake(gw.api, &certs, Some("registry-hp"))
        .await
        .expect("others still accepted");

    // The old connection stays open (a reload drops no connection), but its calls are refused…
    let err = health
        .check(HealthCheckRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("revoked"), "{err:?}");
    // …its subscription ends within the policy re-check (2 s)…
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), events.message())
        .await
        .expect("the subscription of a revoked certificate did not end");
    let err = ended.expect_err("ended with an error");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    // …and the health stream opened before is alive: SIGTERM's NOT_SERVING reaches it.
    gw.signal("TERM");
    let next = watch.message().await.unwrap().unwrap();
    assert_eq!(next.status(), ServingStatus::NotServing);
}

#[tokio::test]
async fn broken_config_on_reload_is_refused_and_the_old_one_keeps_serving() {
    let env = Env::new();
    let mut gw = env.spawn_binary();
    let certs = env.certs();

    // Syntax error.
    let good = std::fs::read_to_string(env.config_path()).unwrap();
    env.write_config(&format!("{good}\n[agencies.x\n"));
    gw.signal("HUP");
    let line = gw.wait_log("reload refused");
    assert!(
        line["message"].as_str().unwrap().contains("civgate.toml:"),
        "{line}"
    );

    // Unknown role.
    env.write_config(&good.replace("role = \"auditor\"", "role = \"superuser\""));
    gw.signal("HUP");
    let line = gw.wait_log("reload refused");
    assert!(
        line["message"]
            .as_str()
            .unwrap()
            .contains("agencies.auditor.role"),
        "{line}"
    );

    // Bad PEM for the server certificate.
    env.write_config(&good);
    std::fs::write(
        certs.join("server.pem"),
        "-----BEGIN CERTIFICATE-----\ngarbage\n",
    )
    .unwrap();
    gw.signal("HUP");
    let line = gw.wait_log("reload refused");
    assert!(
        line["message"].as_str().unwrap().contains("tls.cert"),
        "{line}"
    );

    // Still serving with the old TLS config and policy.
    let ch = client::connect(gw.api, &certs, Some("auditor"))
        .await
        .unwrap();
    let r = HealthClient::new(ch)
        .check(HealthCheckRequest::default())
        .await
        .unwrap();
    assert_eq!(r.get_ref().status(), ServingStatus::Serving);

    let (code, body) = http_get(gw.admin, "/metrics");
    assert_eq!(code, 200);
    assert!(
        body.contains("civgate_config_reloads_total{outcome=\"refused\"} 3"),
        "{body}"
    );
}

#[tokio::test]
async fn metrics_count_handshake_failures_by_reason_and_rpcs_by_code() {
    let env = Env::new();
    let mut gw = env.spawn_binary();
    // The shipped default (`worker_threads = 0`): single-threaded on up to two cores.
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let expected = if cores <= 2 {
        "single-threaded"
    } else {
        "work-stealing"
    };
    assert_eq!(gw.serving["runtime"], expected, "the shipped default");
    let certs = env.certs();
    for c in [Some("revoked"), Some("expired"), None] {
        assert!(client::probe_handshake(gw.api, &certs, c).await.is_err());
    }
    let ch = client::connect(gw.api, &certs, Some("unknown"))
        .await
        .unwrap();
    let _ = HealthClient::new(ch)
        .check(HealthCheckRequest::default())
        .await;
    let ch = client::connect(gw.api, &certs, Some("registry-hp"))
        .await
        .unwrap();
    HealthClient::new(ch)
        .check(HealthCheckRequest::default())
        .await
        .unwrap();

    // The refusal's log line names the request; every call has an access line.
    let refused = gw.wait_log("refused: ");
    assert!(
        refused["request_id"]
            .as_str()
            .is_some_and(|s| s.len() == 32),
        "{refused}"
    );
    let access = loop {
        let l = gw.wait_log("call");
        if l["target"] == "civgate::access" && l["agency"] == "registry-hp" {
            break l;
        }
    };
    assert_eq!(access["code"], "OK", "{access}");
    assert_eq!(access["method"], "/grpc.health.v1.Health/Check", "{access}");
    assert!(access["ms"].as_f64().is_some(), "{access}");
    assert_eq!(
        access["trace_id"].as_str().map(str::len),
        Some(32),
        "{access}"
    );
    assert!(
        access["request_id"].as_str().is_some_and(|s| s.len() == 32),
        "{access}"
    );
    // A refusal the handler decides (here: another registry's office) is logged too.
    let ch = client::connect(gw.api, &certs, Some("registry-hp"))
        .await
        .unwrap();
    let mut req = tonic::Request::new(civgate::pb::v1::PublishRequest {
        idempotency_key: "other-office".into(),
        event: Some(common::birth("HN-BADINH", "Lê An")),
    });
    req.metadata_mut()
        .insert("x-request-id", "refused-publish-1".parse().unwrap());
    let e = civgate::pb::v1::exchange_client::ExchangeClient::new(ch)
        .publish(req)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let line = gw.wait_log("refused: publish_not_allowed");
    assert_eq!(line["request_id"], "refused-publish-1", "{line}");
    assert_eq!(line["agency"], "registry-hp", "{line}");

    let (code, body) = http_get(gw.admin, "/metrics");
    assert_eq!(code, 200);
    for needle in [
        "civgate_tls_handshake_failures_total{reason=\"revoked\"} 1",
        "civgate_tls_handshake_failures_total{reason=\"expired\"} 1",
        "civgate_tls_handshake_failures_total{reason=\"no_client_certificate\"} 1",
        "civgate_rpc_requests_total{method=\"/grpc.health.v1.Health/Check\",code=\"PERMISSION_DENIED\"} 1",
        "civgate_rpc_requests_total{method=\"/grpc.health.v1.Health/Check\",code=\"OK\"} 1",
        "civgate_rpc_duration_seconds_bucket{method=\"/grpc.health.v1.Health/Check\",code=\"OK\"",
        "civgate_build_info{version=\"",
        "civgate_certificate_not_after_timestamp_seconds{cert=\"server\"}",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
    ] {
        assert!(body.contains(needle), "missing {needle}\n{body}");
    }
    // Every metric says what it is.
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name = line.split(['{', ' ']).next().unwrap_or_default();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|f| {
                body.contains(&format!("# TYPE {f} histogram"))
                    || body.contains(&format!("# TYPE {f} summary"))
            })
            .unwrap_or(name);
        assert!(
            body.contains(&format!("# HELP {family} ")),
            "no # HELP for {family}\n{body}"
        );
    }
    let (code, body) = http_get(gw.admin, "/healthz");
    assert_eq!((code, body.trim()), (200, "SERVING"));
}

#[test]
fn config_check_names_the_key_and_line() {
    let env = Env::new();
    let ok = civgate(
        &["config", "check", "--config", "civgate.toml"],
        env.dir.path(),
    );
    assert!(ok.status.success(), "{ok:?}");
    assert!(String::from_utf8_lossy(&ok.stdout).contains("OK"));

    let good = std::fs::read_to_string(env.config_path()).unwrap();
    let bad = good.replace("role = \"population_db\"", "role = \"police\"");
    let line = bad.lines().position(|l| l.contains("\"police\"")).unwrap() + 1;
    std::fs::write(env.dir.path().join("bad.toml"), bad).unwrap();
    let out = civgate(&["config", "check", "--config", "bad.toml"], env.dir.path());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("bad.toml:{line}: agencies.population.role")),
        "{err}"
    );

    // Settings from the environment are checked like the file's.
    let run_with = |var: &str, value: &str| {
        Command::new(env!("CARGO_BIN_EXE_civgate"))
            .args(["config", "check", "--config", "civgate.toml"])
            .env(var, value)
            .current_dir(env.dir.path())
            .output()
            .unwrap()
    };
    let out = run_with("CIVGATE_AUDIT__COMMIT_TIMEOUT_MS", "2500");
    assert!(out.status.success(), "{out:?}");
    let out = run_with("CIVGATE_AUDIT__COMMIT_TIMEOUT_MS", "soon");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("CIVGATE_AUDIT__COMMIT_TIMEOUT_MS"),
        "{out:?}"
    );
    let out = run_with("CIVGATE_SERVER__LISTEN", "nowhere");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("server.listen"),
        "{out:?}"
    );

    std::fs::remove_file(env.certs().join("ca.pem")).unwrap();
    let out = civgate(
        &["config", "check", "--config", "civgate.toml"],
        env.dir.path(),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("tls.client_ca") && err.contains("ca.pem"),
        "{err}"
    );
}

#[test]
fn certs_init_refuses_to_overwrite_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let first = civgate(&["certs", "init", "--dir", "certs"], dir.path());
    assert!(first.status.success(), "{first:?}");
    let before = std::fs::read(dir.path().join("certs/ca.pem")).unwrap();
    let again = civgate(&["certs", "init", "--dir", "certs"], dir.path());
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert_eq!(
        before,
        std::fs::read(dir.path().join("certs/ca.pem")).unwrap()
    );
    let forced = civgate(&["certs", "init", "--dir", "certs", "--force"], dir.path());
    assert!(forced.status.success());
    assert_ne!(
        before,
        std::fs::read(dir.path().join("certs/ca.pem")).unwrap()
    );
}

#[test]
fn demo_runs_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let out = civgate(&["demo"], dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("every case behaved as expected"),
        "{stdout}"
    );
    assert!(!stdout.contains('✘'), "{stdout}");
    // Its log goes to a pipe here, not a terminal: no colour codes.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("civgate serving"), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "{stderr}");
}

/// `[server] worker_threads = 1`: the binary runs on a single-threaded runtime and still
/// serves concurrent look-ups (forwarded to the directory, audited) and durable publishes.
#[tokio::test]
async fn a_single_threaded_gateway_serves_concurrent_lookups_and_publishes() {
    use civgate::pb::v1::{
        GetCitizenRequest, PublishRequest, citizens_client::CitizensClient,
        exchange_client::ExchangeClient,
    };
    let env = Env::new();
    let dir = env.start_directory().await;
    let text =
        common::with_upstream_port(&common::unthrottled_publishes(), dir.directory.addr.port())
            .replace("worker_threads = 0", "worker_threads = 1");
    assert!(
        text.contains("worker_threads = 1"),
        "the shipped config names the key"
    );
    env.write_config(&text);
    let gw = env.spawn_binary();
    assert_eq!(gw.serving["runtime"], "single-threaded", "{}", gw.serving);

    let cfg = civgate::config::Config::parse(&text, "t".into(), ".".into()).unwrap();
    let purpose = cfg.file.purposes.keys().next().unwrap().as_str().to_owned();
    let lookups = CitizensClient::new(
        client::connect(gw.api, &env.certs(), Some("registry-hp"))
            .await
            .unwrap(),
    );
    let publisher = ExchangeClient::new(
        client::connect(gw.api, &env.certs(), Some("population"))
            .await
            .unwrap(),
    );
    let mut calls = tokio::task::JoinSet::new();
    for (n, person) in dir.people.iter().take(64).enumerate() {
        let (mut l, mut p) = (lookups.clone(), publisher.clone());
        let (id, purpose) = (person.personal_id.to_string(), purpose.clone());
        calls.spawn(async move {
            let found = l
                .get_citizen(GetCitizenRequest {
                    case_reference: String::new(),
                    personal_id: id.clone(),
                    purpose,
                })
                .await
                .expect("look-up")
                .into_inner();
            assert_eq!(found.citizen.expect("citizen").personal_id, id);
            let receipt = p
                .publish(PublishRequest {
                    idempotency_key: format!("single-thread-{n}"),
                    event: Some(common::death_event(n)),
                })
                .await
                .expect("publish")
                .into_inner();
            assert!(receipt.sequence > 0);
        });
    }
    while let Some(r) = calls.join_next().await {
        r.expect("call task");
    }
}

/// A second `civgate serve` on the data directory of a running one refuses to start, saying
/// why, and the first keeps serving.
#[tokio::test]
async fn a_second_gateway_on_the_same_data_directory_refuses_to_start() {
    let env = Env::new();
    let gw = env.spawn_binary();
    let mut second = Command::new(env!("CARGO_BIN_EXE_civgate"))
        .args(["serve", "--config"])
        .arg(env.config_path())
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(env.dir.path().join("data"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run civgate");
    // It must exit on its own; one that keeps running has started.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let exited = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            second.kill().unwrap();
            panic!("a second gateway started on a data directory in use");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(!exited.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(
        stderr.contains("is in use by another civgate process"),
        "{stderr}"
    );
    let mut health = HealthClient::new(
        client::connect(gw.api, &env.certs(), Some("population"))
            .await
            .unwrap(),
    );
    let status = health
        .check(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.status(), ServingStatus::Serving);
}

/// `config check` refuses everything `serve` would refuse, each named with its key.
#[test]
fn config_check_runs_every_check_serve_runs() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let good = std::fs::read_to_string(env.config_path()).unwrap();
    let check = |text: &str| {
        std::fs::write(env.dir.path().join("probe.toml"), text).unwrap();
        let out = civgate(
            &["config", "check", "--config", "probe.toml"],
            env.dir.path(),
        );
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert!(check(&good).0);
    for (what, text, key) in [
        (
            "the API's address as the admin address",
            good.replace(
                "admin_listen = \"127.0.0.1:9095\"",
                "admin_listen = \"127.0.0.1:7443\"",
            ),
            "server.admin_listen",
        ),
        (
            "a plain-HTTP upstream",
            good.replace(
                "url = \"https://localhost:7444\"",
                "url = \"http://localhost:7444\"",
            ),
            "upstream.url",
        ),
        (
            "an upstream timeout of 0",
            good.replace("timeout_ms = 2000", "timeout_ms = 0"),
            "upstream.timeout_ms",
        ),
        (
            "a signing key that is not one",
            good.replace(
                "signing_key = \"certs/audit.key\"",
                "signing_key = \"certs/ca.pem\"",
            ),
            "audit.signing_key",
        ),
    ] {
        let (ok, err) = check(&text);
        assert!(!ok, "{what} passed config check");
        assert!(err.contains(key), "{what}: {err}");
    }
    // A private key others can read.
    let key = env.certs().join("server.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, err) = check(&good);
    assert!(
        !ok && err.contains("tls.key") && err.contains("chmod 600"),
        "{err}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    // A CRL past its nextUpdate: every client would be refused.
    let stale = stale_crl(&env.certs());
    std::fs::write(env.certs().join("crl.pem"), stale).unwrap();
    let (ok, err) = check(&good);
    assert!(
        !ok && err.contains("tls.crls[0]") && err.contains("nextUpdate"),
        "{err}"
    );
}

/// A CRL signed by the development CA whose nextUpdate passed a day ago.
fn stale_crl(certs: &std::path::Path) -> String {
    use rcgen::{CertificateRevocationListParams, Issuer, KeyIdMethod, KeyPair, SerialNumber};
    let key = KeyPair::from_pem(&std::fs::read_to_string(certs.join("ca.key")).unwrap()).unwrap();
    let ca = std::fs::read_to_string(certs.join("ca.pem")).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&ca, key).unwrap();
    let now = time::OffsetDateTime::now_utc();
    CertificateRevocationListParams {
        this_update: now - time::Duration::days(30),
        next_update: now - time::Duration::days(1),
        crl_number: SerialNumber::from_slice(&[1]),
        issuing_distribution_point: None,
        revoked_certs: vec![],
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&issuer)
    .unwrap()
    .pem()
    .unwrap()
}

#[tokio::test]
async fn a_reload_refuses_a_garbage_signing_key_and_names_sections_that_need_a_restart() {
    let env = Env::new();
    let mut gw = env.spawn_binary();
    let good = std::fs::read_to_string(env.config_path()).unwrap();
    std::fs::write(env.certs().join("garbage.key"), "PRIVATE+KEY+nonsense\n").unwrap();
    env.write_config(&good.replace("certs/audit.key", "certs/garbage.key"));
    gw.signal("HUP");
    let line = gw.wait_log("reload refused");
    assert!(
        line["message"]
            .as_str()
            .unwrap()
            .contains("audit.signing_key"),
        "{line}"
    );
    env.write_config(
        &good
            .replace("timeout_ms = 2000", "timeout_ms = 3000")
            .replace("commit_timeout_ms = 2000", "commit_timeout_ms = 2500"),
    );
    gw.signal("HUP");
    let line = gw.wait_log("take effect only after a restart");
    let sections = line["sections"].as_str().unwrap();
    assert!(
        sections.contains("[upstream]") && sections.contains("[audit]"),
        "{line}"
    );
}

#[test]
fn keys_data_and_certificates_get_owner_only_modes_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "umask 000 && exec {} certs init --dir certs",
            env!("CARGO_BIN_EXE_civgate")
        ))
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mode = |p: &str| {
        std::fs::metadata(dir.path().join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("certs"), 0o755);
    assert_eq!(mode("certs/clients"), 0o755);
    assert_eq!(mode("certs/ca.pem"), 0o644);
    assert_eq!(mode("certs/server.key"), 0o600);
    assert_eq!(mode("certs/audit.key"), 0o600);
    assert_eq!(mode("certs/clients/registry-hp.key"), 0o600);
}

#[tokio::test]
async fn the_store_is_readable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let gw = env.start().await;
    let mode = |p: &str| {
        std::fs::metadata(env.dir.path().join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("data"), 0o700);
    assert_eq!(mode("data/civgate.sqlite"), 0o600);
    assert_eq!(mode("data/civgate.sqlite-wal"), 0o600);
    gw.shutdown().await.unwrap();
}

/// `civgate migrate` applies the PostgreSQL schema without serving (again: nothing to do), and
/// says why a SQLite store has nothing to apply.
#[tokio::test]
async fn migrate_applies_the_postgres_schema_and_explains_sqlite() {
    let env = Env::new();
    let sqlite = civgate(&["migrate", "--config", "civgate.toml"], env.dir.path());
    assert!(!sqlite.status.success(), "{sqlite:?}");
    assert!(
        String::from_utf8_lossy(&sqlite.stderr)
            .contains("create their schema when the gateway starts"),
        "{sqlite:?}"
    );
    let Some(url) = civgate::store::test_schema("migrate_cli").await else {
        return;
    };
    for _ in 0..2 {
        let out = civgate(
            &["migrate", "--config", "civgate.toml", "--store-url", &url],
            env.dir.path(),
        );
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "schema at version 11"
        );
    }
    // The URL (a secret: it may hold the password) from a file named by the environment.
    let secret = env.dir.path().join("store-url");
    std::fs::write(&secret, format!("{url}\n")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_civgate"))
        .args(["migrate", "--config", "civgate.toml"])
        .env("CIVGATE_STORE_URL_FILE", &secret)
        .current_dir(env.dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "schema at version 11"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_civgate"))
        .args(["migrate", "--config", "civgate.toml"])
        .env("CIVGATE_STORE_URL_FILE", env.dir.path().join("missing"))
        .current_dir(env.dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot read"),
        "{out:?}"
    );
    civgate::store::drop_test_schema(&url).await;
}

/// Another process that opens and closes the store (an operator's `sqlite3`, a backup script)
/// must find the gateway holding its lock: it then leaves the WAL alone, and every call
/// answered before and after is still in the log when the gateway restarts. (Were the
/// gateway's own locks dropped — any descriptor of the file closed in its process drops them
/// all — that process would checkpoint and delete the WAL under the gateway, and what the
/// gateway committed after that would be gone at restart.)
#[tokio::test]
async fn another_process_reading_the_store_takes_nothing_from_it() {
    use sqlx::Connection;
    let env = Env::new();
    let mut gw = env.spawn_binary();
    let certs = env.certs();
    let store = env.dir.path().join("data/civgate.sqlite");
    let probe = |n: usize| {
        let certs = certs.clone();
        let api = gw.api;
        async move {
            let ch = client::connect(api, &certs, Some("auditor")).await.unwrap();
            let mut health = HealthClient::new(ch);
            for _ in 0..n {
                health
                    .check(HealthCheckRequest::default())
                    .await
                    .expect("a health check, audited");
            }
        }
    };
    probe(3).await;
    // The gateway holds a POSIX lock on the store file itself (SQLite's shared lock, which
    // tells another process's SQLite that the file is in use).
    let inode = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&store).unwrap().ino()
    };
    let locks = std::fs::read_to_string("/proc/locks").unwrap();
    let pid = gw.child.id().to_string();
    assert!(
        locks.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1) == Some(&"POSIX")
                && f.get(4) == Some(&pid.as_str())
                && f.get(5).and_then(|d| d.rsplit(':').next()) == Some(&*inode.to_string())
        }),
        "the gateway (pid {pid}) holds no lock on its store file (inode {inode}):\n{locks}"
    );
    let leaves = || async {
        let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(&store);
        let mut c = sqlx::SqliteConnection::connect_with(&opts).await.unwrap();
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_leaves")
            .fetch_one(&mut c)
            .await
            .unwrap();
        c.close().await.unwrap();
        n
    };
    let seen = leaves().await;
    assert!(seen >= 3, "{seen}");
    assert!(
        std::path::Path::new(&format!("{}-wal", store.display())).exists(),
        "the other process deleted the WAL of a store in use"
    );
    probe(5).await;
    gw.signal("TERM");
    let status = gw.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let after = leaves().await;
    assert!(
        after >= seen + 5,
        "answered calls missing after the restart: {seen} + 5 > {after}"
    );
}

/// `civgate refdb serve --consume` is the population database of a staging setup: it applies
/// the civil-status events a registry publishes and answers them (a birth with the child's
/// personal ID), and rejects what contradicts its records with a reason that releases nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_directory_consumes_civil_status_when_asked() {
    use civgate::pb::v1::{
        GetEventStatusRequest, PublishRequest, event::Payload, exchange_client::ExchangeClient,
    };
    let env = Env::new();
    let gw = env.start().await;
    let mut dir = Command::new(env!("CARGO_BIN_EXE_civgate"))
        .args(["--log-format", "json", "refdb", "serve", "--config"])
        .arg(env.config_path())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--citizens",
            "500",
            "--seed",
            "3",
        ])
        .arg("--data-dir")
        .arg(env.dir.path().join("refdb"))
        .arg("--consume")
        .arg(gw.api_addr.to_string())
        .arg("--certs")
        .arg(env.certs())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut registry = ExchangeClient::new(
        client::connect(gw.api_addr, &env.certs(), Some("registry-hp"))
            .await
            .unwrap(),
    );
    let published = registry
        .publish(PublishRequest {
            idempotency_key: "birth-consumed".into(),
            event: Some(common::birth("HP-LECHAN", "Nguyễn Thị Mai")),
        })
        .await
        .unwrap()
        .into_inner();
    let mut answers = common::Subscriber::open(
        gw.api_addr,
        &env.certs(),
        "registry-hp",
        "registry-hp",
        None,
    )
    .await;
    let answer = tokio::time::timeout(Duration::from_secs(30), answers.next())
        .await
        .expect("the directory answers within 30 s")
        .unwrap();
    let event = answer.event.unwrap();
    assert_eq!(event.in_reply_to, published.event_id);
    let Some(Payload::PersonalIdAssigned(assigned)) = event.payload else {
        panic!("{event:?}")
    };
    assert!(assigned.personal_id.starts_with("0313"), "{assigned:?}");
    // The death of someone the directory does not know: rejected, with its reason.
    let death = registry
        .publish(PublishRequest {
            idempotency_key: "death-unknown".into(),
            event: Some(civgate::pb::v1::Event {
                payload: Some(Payload::Death(civgate::pb::v1::Death {
                    registration: Some(civgate::pb::v1::Registration {
                        registry_office_code: "HP-LECHAN".into(),
                        book_number: "02/2026".into(),
                        entry_number: "9".into(),
                        registration_date: "2026-01-05".into(),
                        registering_official: "Trần Văn Bình".into(),
                        country: String::new(),
                    }),
                    personal_id: "031050999999".into(),
                    date_of_death: "2026-01-01".into(),
                    place_of_death: "Hải Phòng".into(),
                    cause_category: "illness".into(),
                    declarant_personal_id: String::new(),
                })),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = registry
            .get_event_status(GetEventStatusRequest {
                event_id: death.event_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if let Some(g) = status.groups.iter().find(|g| !g.reason.is_empty()) {
            assert!(g.reason.contains("no citizen"), "{g:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{status:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    dir.kill().unwrap();
    let _ = dir.wait();
}

/// `civgate audit` against a gateway reached by host name, with explicit certificate files
/// (not the development PKI's layout): checkpoint, search by calendar dates, an export that
/// log tools can read and that still verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_auditor_cli_reaches_a_gateway_by_name_with_its_own_files() {
    let env = Env::new();
    let gw = env.start().await;
    // Something to audit: two health checks by the population database.
    let mut health = HealthClient::new(
        client::connect(gw.api_addr, &env.certs(), Some("population"))
            .await
            .unwrap(),
    );
    for _ in 0..2 {
        health.check(HealthCheckRequest::default()).await.unwrap();
    }
    let certs = env.certs();
    let p = |rel: &str| certs.join(rel).to_string_lossy().into_owned();
    let addr = format!("localhost:{}", gw.api_addr.port());
    let (ca, cert, key, vkey) = (
        p("ca.pem"),
        p("clients/auditor.pem"),
        p("clients/auditor.key"),
        p("audit.vkey"),
    );
    let dir = env.dir.path().to_owned();
    let run = move |args: Vec<String>| {
        let dir = dir.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let out = Command::new(env!("CARGO_BIN_EXE_civgate"))
                    .args(&args)
                    .current_dir(&dir)
                    .output()
                    .unwrap();
                (
                    out.status.success(),
                    String::from_utf8_lossy(&out.stdout).into_owned(),
                    String::from_utf8_lossy(&out.stderr).into_owned(),
                )
            })
            .await
            .unwrap()
        }
    };
    let with_conn = |cmd: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["audit"].iter().chain(cmd).map(|s| s.to_string()).collect();
        v.extend(
            [
                "--addr",
                &addr,
                "--ca",
                &ca,
                "--cert",
                &cert,
                "--key",
                &key,
                "--verifier-key",
                &vkey,
            ]
            .map(str::to_owned),
        );
        v
    };
    let (ok, out, err) = run(with_conn(&["checkpoint"])).await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("signature OK"), "{out}");
    // Calendar dates, in Vietnam time: today's records.
    let today = civgate::domain::format_date(civgate::domain::today());
    let (ok, out, err) = run(with_conn(&[
        "search",
        "--agency",
        "population",
        "--from",
        &today,
        "--to",
        &today,
    ]))
    .await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("2 entries"), "{out}");
    // A certificate that names another host is refused by the client.
    let mut wrong = with_conn(&["checkpoint"]);
    wrong.extend(["--server-name".to_owned(), "gateway.example".to_owned()]);
    let (ok, _, err) = run(wrong).await;
    assert!(!ok);
    assert!(err.contains("gateway.example"), "{err}");
    // Export for log tools, then verify the same file. (An export holds what the latest
    // checkpoint covers: one is signed every second while the log grows.)
    let file = env.dir.path().join("log.jsonl");
    let f = file.to_string_lossy().into_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (ok, out, err) = run(with_conn(&[
            "export",
            "--out",
            &f,
            "--format",
            "jsonl-decoded",
        ]))
        .await;
        assert!(ok, "{out}{err}");
        let text = std::fs::read_to_string(&file).unwrap();
        let health_records = text
            .lines()
            .skip(1)
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["record"]["method"] == "/grpc.health.v1.Health/Check")
            .count();
        if health_records == 2 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (ok, out, err) = run(with_conn(&["verify", "--export", &f])).await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("audit log verified"), "{out}");
    // keygen takes no connection flags.
    let (ok, out, _) = run(vec!["audit".into(), "keygen".into(), "--help".into()]).await;
    assert!(ok && !out.contains("--addr"), "{out}");
}

/// `civgate migrate` against a PostgreSQL that refuses the connection says so at once, with
/// the cause, instead of waiting out its pool's timeout.
#[test]
fn migrate_reports_a_refused_connection_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let config = dir.path().join("civgate.toml");
    std::fs::write(&config, civgate::config::DEFAULT_CONFIG).unwrap();
    let url = format!("postgres://postgres@127.0.0.1:{port}/test");
    let started = std::time::Instant::now();
    let out = civgate(
        &[
            "migrate",
            "--config",
            config.to_str().unwrap(),
            "--store-url",
            &url,
        ],
        dir.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(stderr.to_lowercase().contains("refused"), "{stderr}");
}
