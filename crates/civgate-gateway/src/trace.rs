//! W3C trace context (`traceparent`): the trace a call belongs to, taken from the caller or
//! started here, written in the call's access log line and carried to the population
//! directory, so one look-up can be followed across the caller's, the gateway's and the
//! directory's logs. When spans are exported ([`crate::otel`]) the call's span and the
//! directory call's span are the ones these ids name.

use crate::otel::{CallSpan, ClientSpan, Parent, Spans};

/// The trace of one call: its id and flags, and its exported span (if spans are exported).
pub(crate) struct TraceContext {
    trace_id: String,
    flags: String,
    span: Option<CallSpan>,
}

impl TraceContext {
    /// The caller's `traceparent` if it is a valid one (version `00`, or a later version's
    /// first four fields; ids of lowercase hex, not all zeros), else a new trace (sampled).
    /// With `spans`, the call's server span starts here (its parent the caller's span).
    pub fn from_headers(headers: &http::HeaderMap, spans: Option<&Spans>, path: &str) -> Self {
        let given = headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(parse);
        if let Some(spans) = spans {
            let span = spans.server(path, given);
            return Self {
                trace_id: span.trace_id(),
                flags: span.flags(),
                span: Some(span),
            };
        }
        match given {
            Some(p) => Self {
                trace_id: p.trace_id.to_owned(),
                flags: p.flags.to_owned(),
                span: None,
            },
            None => Self {
                trace_id: format!("{:032x}", rand::random::<u128>().max(1)),
                flags: "01".into(),
                span: None,
            },
        }
    }

    pub fn trace_id(&self) -> &str {
        &self.trace_id
    }

    /// The `traceparent` for a call the gateway makes within this trace: the same trace id
    /// and flags, a new span id (the exported client span's, when spans are exported).
    pub fn child(&self) -> (String, Option<ClientSpan>) {
        if let Some(span) = &self.span {
            let (traceparent, client) = span.directory_call();
            return (traceparent, Some(client));
        }
        let traceparent = format!(
            "00-{}-{:016x}-{}",
            self.trace_id,
            rand::random::<u64>().max(1),
            self.flags
        );
        (traceparent, None)
    }

    /// The call ended: its exported span (if any) ends with the outcome.
    pub fn finish(
        &self,
        code: tonic::Code,
        agency: &str,
        request_id: &str,
        remote: std::net::SocketAddr,
    ) {
        if let Some(span) = &self.span {
            span.finish(code, agency, request_id, remote);
        }
    }
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn parse(v: &str) -> Option<Parent<'_>> {
    let mut parts = v.trim().split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let ok = is_hex(version, 2)
        && version != "ff"
        && (version != "00" || parts.next().is_none())
        && is_hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && is_hex(parent, 16)
        && parent.bytes().any(|b| b != b'0')
        && is_hex(flags, 2);
    ok.then_some(Parent {
        trace_id: trace,
        span_id: parent,
        flags,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(v: &str) -> TraceContext {
        let mut h = http::HeaderMap::new();
        h.insert("traceparent", v.parse().unwrap());
        TraceContext::from_headers(&h, None, "/x.v1.S/M")
    }

    #[test]
    fn a_valid_traceparent_is_continued_and_anything_else_starts_a_trace() {
        let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = of(given);
        assert_eq!(t.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let (child, span) = t.child();
        assert!(span.is_none(), "no span exported");
        assert!(
            child.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{child}"
        );
        assert!(child.ends_with("-01"));
        assert_ne!(child, given, "a new span id");
        assert!(parse(&child).is_some());
        // A later version may carry more fields; 00 may not.
        assert!(parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x").is_some());
        for bad in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "garbage",
        ] {
            let t = of(bad);
            assert_ne!(t.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736", "{bad}");
            assert!(is_hex(t.trace_id(), 32), "{bad}: a new trace");
        }
        assert!(is_hex(
            TraceContext::from_headers(&http::HeaderMap::new(), None, "/x.v1.S/M").trace_id(),
            32
        ));
    }
}
