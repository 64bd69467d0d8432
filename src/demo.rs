//! `civgate demo`: the embedded default. Creates dev certificates if missing, starts the
//! gateway on loopback with real mTLS, and walks through what exists so far — today the
//! identity and policy cases of SPEC §6 step 6. Exits non-zero if any case comes out wrong.

use std::path::Path;

use anyhow::{Result, bail};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{
    certs, client,
    config::DEFAULT_CONFIG,
    pb::v1::{GetCitizenRequest, citizens_client::CitizensClient},
    server::{self, ConfigSource, Overrides},
};

pub async fn run(certs_dir: &Path) -> Result<()> {
    if certs_dir.join("ca.pem").exists() {
        println!(
            "• using development certificates in {}",
            certs_dir.display()
        );
    } else {
        certs::init(certs_dir, false)?;
        println!(
            "• created development certificates in {}",
            certs_dir.display()
        );
    }
    let base_dir = certs_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_owned();
    let certs_name = certs_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("certs");
    let text = DEFAULT_CONFIG.replace("\"certs/", &format!("\"{certs_name}/"));
    let data = tempfile_dir()?;
    let overrides = Overrides {
        listen: Some("127.0.0.1:0".parse()?),
        admin_listen: Some("127.0.0.1:0".parse()?),
        data_dir: Some(data.clone()),
    };
    let gw = server::start(
        ConfigSource::Text {
            text: text.into(),
            base_dir,
        },
        overrides,
    )
    .await?;
    println!(
        "• gateway listening on {} (mTLS), admin on http://{}",
        gw.api_addr, gw.admin_addr
    );
    println!();

    let addr = gw.api_addr;
    let mut failures = 0;
    let mut check = |ok: bool, what: &str, got: String| {
        let mark = if ok { "✔" } else { "✘" };
        println!("  {mark} {what:<58} {got}");
        if !ok {
            failures += 1;
        }
    };

    println!("Identity and policy (SPEC §6 step 6):");
    // Allowed: a civil registry checks health, then calls a look-up (not implemented yet).
    match client::connect(addr, certs_dir, Some("registry-hp")).await {
        Ok(ch) => {
            let r = HealthClient::new(ch.clone())
                .check(HealthCheckRequest {
                    service: "civgate.v1.Citizens".into(),
                })
                .await;
            let serving =
                matches!(&r, Ok(resp) if resp.get_ref().status() == ServingStatus::Serving);
            check(
                serving,
                "registry-hp (civil registry) → Health.Check",
                describe_health(&r),
            );
            let r = CitizensClient::new(ch)
                .get_citizen(GetCitizenRequest {
                    personal_id: "031203000123".into(),
                    purpose: "BIRTH_REGISTRATION".into(),
                })
                .await;
            let passed_policy = matches!(&r, Err(s) if s.code() == tonic::Code::Unimplemented);
            check(
                passed_policy,
                "registry-hp → Citizens.GetCitizen (passes policy)",
                format!("{} (look-ups land with issue #3)", describe(&r)),
            );
        }
        Err(e) => check(false, "registry-hp connects", format!("{e:#}")),
    }
    for (name, what) in [
        ("auditor", "auditor → Citizens.GetCitizen (wrong role)"),
        (
            "population",
            "population → Citizens.GetCitizen (wrong role)",
        ),
        ("unknown", "unknown agency → Citizens.GetCitizen"),
    ] {
        let r = match client::connect(addr, certs_dir, Some(name)).await {
            Ok(ch) => CitizensClient::new(ch)
                .get_citizen(GetCitizenRequest {
                    personal_id: "031203000123".into(),
                    purpose: "BIRTH_REGISTRATION".into(),
                })
                .await
                .map(|_| ()),
            Err(e) => Err(tonic::Status::unavailable(format!("{e:#}"))),
        };
        let denied = matches!(&r, Err(s) if s.code() == tonic::Code::PermissionDenied);
        check(denied, what, describe(&r));
    }
    for (name, what) in [
        (Some("revoked"), "revoked certificate (listed in crl.pem)"),
        (Some("expired"), "expired certificate"),
        (Some("rogue"), "certificate from another CA"),
        (None, "no client certificate"),
    ] {
        match client::probe_handshake(addr, certs_dir, name).await {
            Ok(()) => check(false, what, "NOT REFUSED".into()),
            Err(e) => check(true, what, format!("refused at the TLS handshake: {e}")),
        }
    }

    gw.shutdown().await?;
    let _ = std::fs::remove_dir_all(&data);
    println!();
    if failures > 0 {
        bail!("{failures} demo case(s) did not behave as expected");
    }
    println!("demo finished: every case behaved as expected");
    Ok(())
}

fn describe<T>(r: &Result<T, tonic::Status>) -> String {
    match r {
        Ok(_) => "OK".into(),
        Err(s) => crate::telemetry::code_name(s.code()).to_owned(),
    }
}

fn describe_health(
    r: &Result<tonic::Response<tonic_health::pb::HealthCheckResponse>, tonic::Status>,
) -> String {
    match r {
        Ok(resp) => format!("{:?}", resp.get_ref().status()).to_uppercase(),
        Err(s) => describe::<()>(&Err(s.clone())),
    }
}

fn tempfile_dir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("civgate-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
