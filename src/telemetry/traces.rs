//! OpenTelemetry traces over OTLP/HTTP (CONTRACT §15), on only when an endpoint is
//! configured (the standard `OTEL_*` names, read with the other settings).
//!
//! Spans are made with the OpenTelemetry API directly, not through `tracing`, so a
//! gateway without an endpoint has no tracer at all: every span helper in `scope` is a
//! check of an `Option` and nothing more. Spans are batched and exported from the SDK's
//! own thread, never on a request's path.

use std::collections::HashMap;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer};
use opentelemetry_sdk::Resource;
use secrecy::ExposeSecret;

use crate::settings::Settings;

/// The tracer of a gateway that exports traces.
#[derive(Clone)]
pub struct Traces {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

/// Reads a W3C `traceparent` (and `tracestate`) from a request's headers.
struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The OTLP traces URL the settings name, if any: the traces endpoint as is, else the
/// base endpoint with `/v1/traces`. `None` also when traces are switched off.
fn endpoint(settings: &Settings) -> Option<String> {
    if settings.otel_sdk_disabled || settings.otel_traces_exporter.trim() == "none" {
        return None;
    }
    let traces = settings.otel_exporter_otlp_traces_endpoint.trim();
    if !traces.is_empty() {
        return Some(traces.to_owned());
    }
    let base = settings.otel_exporter_otlp_endpoint.trim();
    (!base.is_empty()).then(|| format!("{}/v1/traces", base.trim_end_matches('/')))
}

/// The sampler the settings name (OpenTelemetry's `OTEL_TRACES_SAMPLER` values).
fn sampler(settings: &Settings) -> Result<Sampler, String> {
    let ratio = || {
        let arg = settings.otel_traces_sampler_arg.trim();
        if arg.is_empty() {
            return Ok(1.0);
        }
        arg.parse::<f64>()
            .ok()
            .filter(|r| (0.0..=1.0).contains(r))
            .ok_or_else(|| format!("OTEL_TRACES_SAMPLER_ARG: '{arg}' is not a ratio from 0 to 1"))
    };
    let parent = |root: Sampler| Sampler::ParentBased(Box::new(root));
    Ok(match settings.otel_traces_sampler.trim() {
        "always_on" => Sampler::AlwaysOn,
        "always_off" => Sampler::AlwaysOff,
        "traceidratio" => Sampler::TraceIdRatioBased(ratio()?),
        "" | "parentbased_always_on" => parent(Sampler::AlwaysOn),
        "parentbased_always_off" => parent(Sampler::AlwaysOff),
        "parentbased_traceidratio" => parent(Sampler::TraceIdRatioBased(ratio()?)),
        other => {
            return Err(format!(
                "OTEL_TRACES_SAMPLER: '{other}' is not a sampler this gateway knows"
            ))
        }
    })
}

/// `name=value,name2=value2`, as `OTEL_EXPORTER_OTLP_HEADERS` spells them (values may be
/// percent-encoded).
fn export_headers(list: &str) -> Result<HashMap<String, String>, String> {
    list.split(',')
        .filter(|pair| !pair.trim().is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').ok_or_else(|| {
                "OTEL_EXPORTER_OTLP_HEADERS: expected name=value pairs".to_owned()
            })?;
            Ok((name.trim().to_owned(), percent_decode(value.trim())))
        })
        .collect()
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Traces {
    /// The tracer the settings ask for: `Ok(None)` without an endpoint (no traces, no
    /// cost), an error for settings that cannot work (a gateway must not start believing
    /// it traces when it cannot).
    pub fn from_settings(settings: &Settings) -> Result<Option<Traces>, String> {
        let Some(endpoint) = endpoint(settings) else {
            return Ok(None);
        };
        let protocol = match settings.otel_exporter_otlp_protocol.trim() {
            "" | "http/protobuf" => Protocol::HttpBinary,
            "http/json" => Protocol::HttpJson,
            other => {
                return Err(format!(
                    "OTEL_EXPORTER_OTLP_PROTOCOL: '{other}' is not supported; use http/protobuf or http/json"
                ))
            }
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(endpoint)
            .with_protocol(protocol)
            .with_timeout(Duration::from_millis(settings.otel_exporter_otlp_timeout))
            .with_headers(export_headers(
                settings.otel_exporter_otlp_headers.expose_secret(),
            )?)
            .build()
            .map_err(|e| format!("OTLP exporter: {e}"))?;
        let batches = BatchConfigBuilder::default()
            .with_scheduled_delay(Duration::from_millis(settings.otel_bsp_schedule_delay))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(
                BatchSpanProcessor::builder(exporter)
                    .with_batch_config(batches)
                    .build(),
            )
            .with_sampler(sampler(settings)?)
            .with_resource(
                Resource::builder()
                    .with_service_name(settings.otel_service_name.clone())
                    .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                    .build(),
            )
            .build();
        let tracer = provider.tracer("llm-gateway");
        Ok(Some(Traces { provider, tracer }))
    }

    /// Starts a request's span, continuing the client's trace when its headers carry a
    /// `traceparent`. Returns the context holding it (the span ends when the last clone
    /// of the context is dropped, or when ended). Attributes are set afterwards, and only
    /// on a span that records: an unsampled request costs no attribute at all.
    pub fn start_request(
        &self,
        headers: &HeaderMap,
        name: impl Into<std::borrow::Cow<'static, str>>,
    ) -> Context {
        let parent = TraceContextPropagator::new().extract(&Headers(headers));
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .start_with_context(&self.tracer, &parent);
        parent.with_span(span)
    }

    /// Starts a span under `parent`.
    pub fn start_child(
        &self,
        parent: &Context,
        name: impl Into<std::borrow::Cow<'static, str>>,
        kind: SpanKind,
        attributes: Vec<KeyValue>,
    ) -> Context {
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, parent);
        parent.with_span(span)
    }

    /// The W3C `traceparent` header naming `context`'s span as the parent, for an
    /// upstream; sent for an unsampled span too (flags `00`), so the upstream can join
    /// the same trace id. Written straight into the header's bytes: the propagator's way
    /// (a map of strings) cost four allocations on every upstream call.
    pub fn traceparent(context: &Context) -> Option<HeaderValue> {
        let span = context.span();
        let span = span.span_context();
        if !span.is_valid() {
            return None;
        }
        let mut header = [0u8; 55];
        let mut out = &mut header[..];
        std::io::Write::write_fmt(
            &mut out,
            format_args!(
                "00-{}-{}-{:02x}",
                span.trace_id(),
                span.span_id(),
                span.trace_flags().to_u8()
            ),
        )
        .ok()?;
        HeaderValue::from_bytes(&header).ok()
    }

    /// Sends what is still batched and stops the exporter (at exit).
    pub fn shutdown(&self) {
        if let Err(error) = self.provider.shutdown() {
            tracing::warn!(%error, "traces could not all be exported at exit");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> Settings {
        Settings::from_pairs(pairs).unwrap()
    }

    #[test]
    fn traces_are_off_without_an_endpoint_or_when_switched_off() {
        assert_eq!(endpoint(&settings(&[])), None);
        let base = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/");
        assert_eq!(
            endpoint(&settings(&[base])).as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        assert_eq!(
            endpoint(&settings(&[
                base,
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://other/traces")
            ]))
            .as_deref(),
            Some("http://other/traces")
        );
        assert_eq!(
            endpoint(&settings(&[base, ("OTEL_SDK_DISABLED", "true")])),
            None
        );
        assert_eq!(
            endpoint(&settings(&[base, ("OTEL_TRACES_EXPORTER", "none")])),
            None
        );
    }

    #[test]
    fn a_setting_that_cannot_work_refuses_to_start() {
        let base = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318");
        let refused = |pairs: &[(&str, &str)]| {
            let all: Vec<_> = std::iter::once(base).chain(pairs.iter().copied()).collect();
            Traces::from_settings(&settings(&all)).err().unwrap()
        };
        assert!(refused(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]).contains("grpc"));
        assert!(refused(&[("OTEL_TRACES_SAMPLER", "sometimes")]).contains("sometimes"));
        let ratio = [
            ("OTEL_TRACES_SAMPLER", "traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "2"),
        ];
        assert!(refused(&ratio).contains("ratio"));
        assert!(refused(&[("OTEL_EXPORTER_OTLP_HEADERS", "novalue")]).contains("name=value"));
    }

    #[test]
    fn the_upstream_traceparent_names_the_span_and_its_sampled_flag() {
        use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
        let span = |flags| {
            Context::new().with_remote_span_context(SpanContext::new(
                TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
                SpanId::from_hex("00f067aa0ba902b7").unwrap(),
                flags,
                true,
                TraceState::default(),
            ))
        };
        assert_eq!(
            Traces::traceparent(&span(TraceFlags::SAMPLED)).unwrap(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert_eq!(
            Traces::traceparent(&span(TraceFlags::default())).unwrap(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
        );
        assert_eq!(Traces::traceparent(&Context::new()), None);
    }

    #[test]
    fn export_headers_are_pairs_with_percent_decoded_values() {
        let headers = export_headers("authorization=Bearer%20abc, x-team = search").unwrap();
        assert_eq!(headers["authorization"], "Bearer abc");
        assert_eq!(headers["x-team"], "search");
        assert_eq!(percent_decode("100%"), "100%");
    }
}
