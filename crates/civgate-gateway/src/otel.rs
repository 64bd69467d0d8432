//! OpenTelemetry spans, exported over OTLP/gRPC when `[telemetry] otlp_endpoint` is set: one
//! server span per call (its parent the caller's `traceparent`) and one client span per call
//! to the population directory, whose id is the span the directory's `traceparent` names. So
//! a trace shows the caller, the gateway and the directory as one tree.
//!
//! Spans are built with the OpenTelemetry SDK from the call's own context rather than from
//! `tracing` spans: the ids exported are the ids propagated, and a gateway that exports
//! nothing pays nothing per call. Export runs on the SDK's batch thread; a collector that is
//! down or slow loses spans (counted by the SDK, logged), never a call.

use std::{
    sync::Mutex,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result};
use opentelemetry::{
    Context, KeyValue,
    trace::{
        Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
        TraceState, Tracer as _, TracerProvider as _,
    },
};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::{
    Resource,
    trace::{Sampler, SdkTracer, SdkTracerProvider, Span},
};

use crate::config::{Config, TelemetrySection};

/// The gateway's span exporter (one per running gateway). Dropping it does not flush: call
/// [`Exporter::shutdown`].
pub struct Exporter {
    provider: SdkTracerProvider,
}

/// Starts spans of this gateway (cheap to clone).
#[derive(Clone)]
pub struct Spans {
    tracer: SdkTracer,
}

impl std::fmt::Debug for Spans {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Spans")
    }
}

/// Builds the exporter `[telemetry]` asks for, or `None` when it names no endpoint. Must run
/// inside the gateway's Tokio runtime (the gRPC channel's tasks live there).
pub fn start(config: &Config) -> Result<Option<(Spans, Exporter)>> {
    let t: &TelemetrySection = &config.file.telemetry;
    if t.otlp_endpoint.is_empty() {
        return Ok(None);
    }
    let timeout = Duration::from_millis(t.otlp_timeout_ms);
    let mut endpoint = tonic::transport::Endpoint::from_shared(t.otlp_endpoint.clone())
        .context("telemetry.otlp_endpoint")?
        .timeout(timeout)
        .connect_timeout(timeout);
    if let Some(ca) = &t.otlp_ca {
        let path = config.resolve(ca);
        let pem = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        endpoint = endpoint
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(pem)),
            )
            .context("telemetry.otlp_ca")?;
    } else if t.otlp_endpoint.starts_with("https://") {
        endpoint = endpoint
            .tls_config(tonic::transport::ClientTlsConfig::new().with_enabled_roots())
            .context("telemetry.otlp_endpoint")?;
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_channel(endpoint.connect_lazy())
        .with_timeout(timeout)
        .build()
        .context("the OTLP span exporter")?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            t.sample_ratio,
        ))))
        .with_resource(
            Resource::builder()
                .with_service_name(t.service_name.clone())
                .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                .build(),
        )
        .build();
    let tracer = provider.tracer("civgate");
    tracing::info!(
        endpoint = t.otlp_endpoint.as_str(),
        "spans exported over OTLP"
    );
    Ok(Some((Spans { tracer }, Exporter { provider })))
}

impl Exporter {
    /// Sends the spans still queued (within the export timeout) and stops the batch thread.
    /// Blocking work, run off the runtime: the export needs the runtime to progress.
    pub async fn shutdown(self) {
        let provider = self.provider;
        let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if let Ok(Err(e)) = done {
            tracing::warn!(error = %e, "spans left unsent at shutdown");
        }
    }
}

/// The ids of a caller's `traceparent`.
pub(crate) struct Parent<'a> {
    pub trace_id: &'a str,
    pub span_id: &'a str,
    pub flags: &'a str,
}

impl Spans {
    /// The server span of a call to `path`, child of the caller's span if it gave one.
    pub(crate) fn server(&self, path: &str, parent: Option<Parent<'_>>) -> CallSpan {
        let cx = parent
            .and_then(|p| {
                let sc = SpanContext::new(
                    TraceId::from_hex(p.trace_id).ok()?,
                    SpanId::from_hex(p.span_id).ok()?,
                    TraceFlags::new(u8::from_str_radix(p.flags, 16).ok()?),
                    true,
                    TraceState::default(),
                );
                Some(Context::new().with_remote_span_context(sc))
            })
            .unwrap_or_default();
        let name = path.trim_start_matches('/');
        let (service, method) = name.split_once('/').unwrap_or((name, ""));
        let builder = self
            .tracer
            .span_builder(name.to_owned())
            .with_kind(SpanKind::Server)
            .with_start_time(SystemTime::now())
            .with_attributes([
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.service", service.to_owned()),
                KeyValue::new("rpc.method", method.to_owned()),
            ]);
        let span = self.tracer.build_with_context(builder, &cx);
        CallSpan {
            context: span.span_context().clone(),
            span: Mutex::new(Some(span)),
            tracer: self.tracer.clone(),
        }
    }
}

/// The directory's gRPC service (the client spans' `rpc.service`).
const DIRECTORY: &str = "civgate.upstream.v1.PopulationDirectory";

/// The gateway's span of one call.
pub(crate) struct CallSpan {
    context: SpanContext,
    span: Mutex<Option<Span>>,
    tracer: SdkTracer,
}

impl CallSpan {
    pub fn trace_id(&self) -> String {
        format!("{:032x}", self.context.trace_id())
    }

    pub fn flags(&self) -> String {
        format!("{:02x}", self.context.trace_flags().to_u8())
    }

    /// A client span for a call to the population directory, and the `traceparent` that
    /// names it.
    pub fn directory_call(&self) -> (String, ClientSpan) {
        let cx = Context::new().with_remote_span_context(self.context.clone());
        let builder = self
            .tracer
            .span_builder(DIRECTORY)
            .with_kind(SpanKind::Client)
            .with_attributes([
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.service", DIRECTORY),
            ]);
        let span = self.tracer.build_with_context(builder, &cx);
        let sc = span.span_context();
        let traceparent = format!(
            "00-{:032x}-{:016x}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        );
        (traceparent, ClientSpan(Mutex::new(Some(span))))
    }

    /// Ends the span with the call's outcome and who made it (identifiers only: no citizen
    /// value is ever an attribute).
    pub fn finish(
        &self,
        code: tonic::Code,
        agency: &str,
        request_id: &str,
        remote: std::net::SocketAddr,
    ) {
        let Some(mut span) = self.span.lock().ok().and_then(|mut s| s.take()) else {
            return;
        };
        span.set_attribute(KeyValue::new("rpc.grpc.status_code", code as i64));
        span.set_attribute(KeyValue::new("civgate.request_id", request_id.to_owned()));
        span.set_attribute(KeyValue::new("client.address", remote.ip().to_string()));
        span.set_attribute(KeyValue::new("client.port", i64::from(remote.port())));
        if !agency.is_empty() {
            span.set_attribute(KeyValue::new("civgate.agency", agency.to_owned()));
        }
        if server_error(code) {
            span.set_status(Status::error(crate::telemetry::code_name(code)));
        }
        span.end();
    }
}

/// The span of one call to the population directory; ends when finished or dropped.
pub struct ClientSpan(Mutex<Option<Span>>);

impl std::fmt::Debug for ClientSpan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientSpan")
    }
}

impl ClientSpan {
    /// Ends the span: the method, the endpoint that answered last and the outcome.
    pub fn finish(&self, method: &str, endpoint: &str, code: tonic::Code) {
        let Some(mut span) = self.0.lock().ok().and_then(|mut s| s.take()) else {
            return;
        };
        span.update_name(format!("{DIRECTORY}/{method}"));
        span.set_attribute(KeyValue::new("rpc.method", method.to_owned()));
        span.set_attribute(KeyValue::new("server.address", endpoint.to_owned()));
        span.set_attribute(KeyValue::new("rpc.grpc.status_code", code as i64));
        if code != tonic::Code::Ok {
            span.set_status(Status::error(crate::telemetry::code_name(code)));
        }
        span.end();
    }
}

/// The codes OpenTelemetry's gRPC conventions count as a server's error (the others are the
/// caller's: not found, refused, limited).
fn server_error(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Unknown | DeadlineExceeded | Unimplemented | Internal | Unavailable | DataLoss
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_follow_the_grpc_conventions() {
        for (code, error) in [
            (tonic::Code::Ok, false),
            (tonic::Code::NotFound, false),
            (tonic::Code::PermissionDenied, false),
            (tonic::Code::ResourceExhausted, false),
            (tonic::Code::InvalidArgument, false),
            (tonic::Code::Unavailable, true),
            (tonic::Code::Internal, true),
            (tonic::Code::DeadlineExceeded, true),
            (tonic::Code::Unknown, true),
            (tonic::Code::DataLoss, true),
            (tonic::Code::Unimplemented, true),
        ] {
            assert_eq!(server_error(code), error, "{code:?}");
        }
    }
}
