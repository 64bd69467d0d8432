//! Mutual TLS identity and default-deny policy, over real TLS on loopback with a real gRPC
//! client, against the gateway running in-process.

mod common;

use std::time::{Duration, Instant};

use civgate::{
    client,
    pb::v1::{
        GetCitizenRequest, GetEntriesRequest, audit_client::AuditClient,
        citizens_client::CitizensClient,
    },
};
use common::Env;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

fn lookup() -> GetCitizenRequest {
    GetCitizenRequest {
        case_reference: String::new(),
        personal_id: "031203000123".into(),
        purpose: "BIRTH_REGISTRATION".into(),
    }
}

#[tokio::test]
async fn handshake_refuses_missing_foreign_expired_and_revoked_certificates() {
    let env = Env::new();
    let gw = env.start().await;
    let certs = env.certs();
    for (client, alert) in [
        (None, "CertificateRequired"),
        // Signed by another key claiming the same CA name: the signature does not verify.
        (Some("rogue"), "DecryptError"),
        (Some("expired"), "CertificateExpired"),
        (Some("revoked"), "CertificateRevoked"),
        // Issued by the right CA, but not for client authentication.
        (Some("no-client-auth"), "UnsupportedCertificate"),
        (Some("no-digital-signature"), "UnsupportedCertificate"),
    ] {
        let err = client::probe_handshake(gw.api_addr, &certs, client)
            .await
            .expect_err("handshake must be refused");
        assert!(err.contains(alert), "{client:?}: {err}");
    }
    for ok in ["registry-hp", "population", "auditor", "unknown"] {
        client::probe_handshake(gw.api_addr, &certs, Some(ok))
            .await
            .unwrap_or_else(|e| panic!("{ok} refused: {e}"));
    }
    gw.shutdown().await.unwrap();
}

#[tokio::test]
async fn unknown_agency_is_permission_denied() {
    let env = Env::new();
    let gw = env.start().await;
    let ch = client::connect(gw.api_addr, &env.certs(), Some("unknown"))
        .await
        .unwrap();
    let err = HealthClient::new(ch.clone())
        .check(HealthCheckRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("unknown-agency"), "{err:?}");
    let err = CitizensClient::new(ch)
        .get_citizen(lookup())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    gw.shutdown().await.unwrap();
}

#[tokio::test]
async fn wrong_role_is_permission_denied_before_any_validation() {
    let env = Env::new();
    let gw = env.start().await;
    let ch = client::connect(gw.api_addr, &env.certs(), Some("auditor"))
        .await
        .unwrap();
    // A malformed request still gets PERMISSION_DENIED: policy runs before validation.
    let err = CitizensClient::new(ch.clone())
        .get_citizen(GetCitizenRequest {
            case_reference: String::new(),
            personal_id: "not-an-id".into(),
            purpose: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("auditor"), "{err:?}");

    let reg = client::connect(gw.api_addr, &env.certs(), Some("registry-hp"))
        .await
        .unwrap();
    let err = AuditClient::new(reg)
        .get_entries(GetEntriesRequest { start: 0, end: 1 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    gw.shutdown().await.unwrap();
}

#[tokio::test]
async fn civil_registry_passes_policy_and_health_is_serving() {
    let env = Env::new();
    // Nothing listens on the directory port: policy lets the call through, the directory
    // is what fails.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let gw = env
        .start_with(&common::with_upstream_port(
            civgate::config::DEFAULT_CONFIG,
            closed,
        ))
        .await;
    let ch = client::connect(gw.api_addr, &env.certs(), Some("registry-hp"))
        .await
        .unwrap();
    for service in [
        "",
        "civgate.v1.Citizens",
        "civgate.v1.Exchange",
        "civgate.v1.Audit",
    ] {
        let r = HealthClient::new(ch.clone())
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap();
        // No directory runs here: look-ups are not served, the rest is.
        let want = if service == "civgate.v1.Citizens" {
            ServingStatus::NotServing
        } else {
            ServingStatus::Serving
        };
        assert_eq!(r.get_ref().status(), want, "{service:?}");
    }
    let err = CitizensClient::new(ch)
        .get_citizen(lookup())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    gw.shutdown().await.unwrap();
}

#[tokio::test]
async fn reflection_lists_the_three_services() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let env = Env::new();
    let gw = env.start().await;
    let ch = client::connect(gw.api_addr, &env.certs(), Some("population"))
        .await
        .unwrap();
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(ch)
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().expect("one response");
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection response {resp:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for s in [
        "civgate.v1.Citizens",
        "civgate.v1.Exchange",
        "civgate.v1.Audit",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&s), "{s} missing from {names:?}");
    }
    // v1alpha too (what grpcio-reflection and older grpcurl speak).
    {
        use tonic_reflection::pb::v1alpha::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let ch = client::connect(gw.api_addr, &env.certs(), Some("population"))
            .await
            .unwrap();
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = ServerReflectionClient::new(ch)
            .server_reflection_info(tokio_stream::iter([req]))
            .await
            .unwrap()
            .into_inner();
        let resp = stream.message().await.unwrap().expect("one response");
        let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
            panic!("unexpected reflection response {resp:?}");
        };
        assert!(
            list.service.iter().any(|s| s.name == "civgate.v1.Citizens"),
            "{list:?}"
        );
    }
    gw.shutdown().await.unwrap();
}

#[tokio::test]
async fn idle_tcp_connections_do_not_delay_a_real_client() {
    let env = Env::new();
    let text = civgate::config::DEFAULT_CONFIG
        .replace("handshake_timeout_ms = 5000", "handshake_timeout_ms = 2000");
    let gw = env.start_with(&text).await;
    // From another host than the client's (another loopback address): one source may hold
    // only its share of the pending handshakes.
    let mut idle = Vec::new();
    for _ in 0..200 {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        idle.push(s.connect(gw.api_addr).await.unwrap());
    }
    let started = Instant::now();
    let ch = client::connect(gw.api_addr, &env.certs(), Some("registry-hp"))
        .await
        .unwrap();
    let r = HealthClient::new(ch)
        .check(HealthCheckRequest::default())
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(r.get_ref().status(), ServingStatus::Serving);
    assert!(
        took < Duration::from_secs(2),
        "real client waited {took:?} behind idle sockets"
    );

    // The idle sockets themselves are closed once the handshake timeout passes.
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(20), idle[0].read(&mut buf))
        .await
        .expect("idle connection must be closed by the handshake timeout");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    gw.shutdown().await.unwrap();
}
