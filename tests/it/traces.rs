//! OpenTelemetry traces (CONTRACT §15), received by an OTLP/HTTP collector in the test
//! that decodes what the gateway binary sends: the spans and their GenAI attributes, a
//! client's trace continued and passed on upstream, nothing secret in any span, the
//! trace id on log lines, and nothing at all when traces are off.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::HeaderMap;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, Span};
use prost::Message;
use serde_json::{json, Value};
use wiremock::matchers::path;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::common::{ollama_reply, GatewayProcess};

const KEY: &str = "sk-trace-secret-key";
const SECRET: &str = "the-message-content-must-not-be-traced";
const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// Every span received, with its service's name.
type Received = Arc<Mutex<Vec<(String, Span)>>>;

/// How many exports came as JSON (the rest as protobuf).
static JSON_EXPORTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// An OTLP/HTTP traces receiver: every span it was sent, decoded, with its service name.
struct Collector {
    url: String,
    spans: Received,
}

impl Collector {
    async fn start() -> Collector {
        let spans: Received = Arc::default();
        let app = axum::Router::new()
            .route(
                "/v1/traces",
                post(
                    |State(spans): State<Received>, headers: HeaderMap, body: Bytes| async move {
                        // Either OTLP/HTTP encoding, as the exporter says it sent.
                        let request = if headers[CONTENT_TYPE] == "application/json" {
                            JSON_EXPORTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            serde_json::from_slice::<ExportTraceServiceRequest>(&body)
                                .expect("OTLP JSON")
                        } else {
                            ExportTraceServiceRequest::decode(body).expect("OTLP protobuf")
                        };
                        for resource in request.resource_spans {
                            let service = resource
                                .resource
                                .iter()
                                .flat_map(|r| r.attributes.iter())
                                .find(|kv| kv.key == "service.name")
                                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                                    Any::StringValue(s) => Some(s.clone()),
                                    _ => None,
                                })
                                .unwrap_or_default();
                            for scope in resource.scope_spans {
                                for span in scope.spans {
                                    spans.lock().unwrap().push((service.clone(), span));
                                }
                            }
                        }
                        "{}"
                    },
                ),
            )
            .with_state(spans.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Collector { url, spans }
    }

    /// The spans received so far.
    fn spans(&self) -> Vec<Span> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .map(|(_, s)| s.clone())
            .collect()
    }

    /// The service names the spans came from.
    fn services(&self) -> Vec<String> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Waits until `done` holds for the spans received, 10 s at most.
    async fn wait_for(&self, what: &str, done: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "never received {what}: {spans:#?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

fn attribute(span: &Span, key: &str) -> Option<Value> {
    let value = span
        .attributes
        .iter()
        .find(|kv| kv.key == key)?
        .value
        .as_ref()?;
    Some(match value.value.as_ref()? {
        Any::StringValue(s) => json!(s),
        Any::IntValue(i) => json!(i),
        Any::BoolValue(b) => json!(b),
        Any::DoubleValue(d) => json!(d),
        other => json!(format!("{other:?}")),
    })
}

fn named<'a>(spans: &'a [Span], name: &str) -> Vec<&'a Span> {
    spans.iter().filter(|s| s.name == name).collect()
}

fn gateway(
    upstream: &MockServer,
    collector: Option<&Collector>,
    extra: &[(&str, &str)],
) -> GatewayProcess {
    let mut env = vec![
        ("API_KEYS", KEY.to_owned()),
        ("REDIS_URL", "memory://".to_owned()),
        ("OLLAMA_BASE_URL", upstream.uri()),
        ("PROVIDER_RETRY_BASE_MS", "10".to_owned()),
        ("OTEL_BSP_SCHEDULE_DELAY", "50".to_owned()),
        ("OTEL_SERVICE_NAME", "gateway-under-test".to_owned()),
    ];
    if let Some(collector) = collector {
        env.push(("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url.clone()));
    }
    let mut pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    pairs.extend_from_slice(extra);
    GatewayProcess::start(&pairs)
}

async fn chat(
    gateway: &GatewayProcess,
    stream: bool,
    traceparent: Option<&str>,
) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gateway.url))
        .bearer_auth(KEY)
        .json(&json!({"model": "llama3.1", "stream": stream,
            "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": format!("{SECRET} {stream}")}]}));
    if let Some(parent) = traceparent {
        request = request.header("traceparent", parent);
    }
    request.send().await.unwrap()
}

/// An Ollama upstream answering every chat with `content`.
async fn ollama_answering(content: &str) -> MockServer {
    let upstream = MockServer::start().await;
    Mock::given(path("/api/chat"))
        .respond_with(ResponseTemplate::new(200).set_body_json(ollama_reply(content)))
        .mount(&upstream)
        .await;
    upstream
}

/// The `traceparent` headers the upstream received, in order.
async fn upstream_traceparents(upstream: &MockServer) -> Vec<Option<String>> {
    upstream
        .received_requests()
        .await
        .unwrap()
        .iter()
        .map(|r| {
            r.headers
                .get("traceparent")
                .map(|v| v.to_str().unwrap().to_owned())
        })
        .collect()
}

#[tokio::test]
async fn a_request_is_one_trace_continuing_the_clients_with_genai_attributes_and_no_secrets() {
    let upstream = MockServer::start().await;
    // The first attempt fails, so the trace shows a retry.
    Mock::given(path("/api/chat"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .mount(&upstream)
        .await;
    Mock::given(path("/api/chat"))
        .respond_with(ResponseTemplate::new(200).set_body_json(ollama_reply("traced answer")))
        .mount(&upstream)
        .await;
    let collector = Collector::start().await;
    let gateway = gateway(&upstream, Some(&collector), &[]);

    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    let answer = chat(&gateway, false, Some(&traceparent)).await;
    assert_eq!(answer.status(), 200);

    let spans = collector
        .wait_for("the request and its children", |spans| {
            spans.iter().any(|s| s.kind == SpanKind::Server as i32) && spans.len() >= 5
        })
        .await;
    let trace_id = hex::decode(CLIENT_TRACE).unwrap();
    assert!(
        spans.iter().all(|s| s.trace_id == trace_id),
        "one trace, the client's"
    );
    assert!(collector
        .services()
        .iter()
        .all(|s| s == "gateway-under-test"));

    let request = named(&spans, "POST /v1/chat/completions");
    assert_eq!(request.len(), 1, "{spans:#?}");
    let request = request[0];
    assert_eq!(request.kind, SpanKind::Server as i32);
    assert_eq!(request.parent_span_id, hex::decode(CLIENT_SPAN).unwrap());
    for (key, value) in [
        ("gen_ai.operation.name", json!("chat")),
        ("gen_ai.request.model", json!("llama3.1")),
        ("gen_ai.response.model", json!("llama3.1")),
        ("gen_ai.provider.name", json!("ollama")),
        ("gen_ai.usage.input_tokens", json!(7)),
        ("gen_ai.usage.output_tokens", json!(3)),
        ("http.response.status_code", json!(200)),
        ("http.route", json!("/v1/chat/completions")),
        ("gateway.cache", json!("MISS")),
    ] {
        assert_eq!(attribute(request, key), Some(value), "{key}: {request:#?}");
    }

    // The limiter, the cache and both provider attempts, under the request's span.
    for name in ["rate_limit", "cache"] {
        let span = named(&spans, name);
        assert_eq!(span.len(), 1, "{name}: {spans:#?}");
        assert_eq!(span[0].parent_span_id, request.span_id, "{name}");
    }
    assert_eq!(
        attribute(named(&spans, "rate_limit")[0], "gateway.rate_limit.allowed"),
        Some(json!(true))
    );
    assert_eq!(
        attribute(named(&spans, "cache")[0], "gateway.cache.hit"),
        Some(json!(false))
    );
    let mut attempts = named(&spans, "chat llama3.1");
    attempts.sort_by_key(|s| s.start_time_unix_nano);
    assert_eq!(attempts.len(), 2, "{spans:#?}");
    for attempt in &attempts {
        assert_eq!(attempt.kind, SpanKind::Client as i32);
        assert_eq!(attempt.parent_span_id, request.span_id);
        assert_eq!(
            attribute(attempt, "gen_ai.provider.name"),
            Some(json!("ollama"))
        );
        assert_eq!(
            attribute(attempt, "gen_ai.request.model"),
            Some(json!("llama3.1"))
        );
    }
    assert_eq!(
        attribute(attempts[0], "error.type"),
        Some(json!("http_5xx"))
    );
    assert_eq!(attribute(attempts[1], "error.type"), None);
    assert_eq!(
        attribute(attempts[1], "gen_ai.usage.output_tokens"),
        Some(json!(3))
    );

    // Each upstream call was told of its attempt as its parent, in the same trace.
    let sent = upstream_traceparents(&upstream).await;
    assert_eq!(sent.len(), 2);
    for (header, attempt) in sent.iter().zip(&attempts) {
        assert_eq!(
            header.as_deref(),
            Some(format!("00-{CLIENT_TRACE}-{}-01", hex::encode(&attempt.span_id)).as_str())
        );
    }

    // No content and no key anywhere in what was exported.
    let exported = format!("{spans:?}");
    assert!(!exported.contains(SECRET) && !exported.contains("traced answer"));
    assert!(!exported.contains(KEY));

    // The request's log line carries the trace id.
    let log = gateway.output();
    let line = log
        .lines()
        .find(|l| l.contains("\"message\":\"request\""))
        .expect("request line");
    assert!(
        line.contains(&format!("\"trace_id\":\"{CLIENT_TRACE}\"")),
        "{line}"
    );
    assert!(!log.contains(SECRET) && !log.contains(KEY));
}

#[tokio::test]
async fn a_stream_is_traced_to_its_end_with_its_usage() {
    let upstream = MockServer::start().await;
    let ndjson = "{\"message\":{\"content\":\"streamed \"},\"done\":false}\n\
                  {\"message\":{\"content\":\"answer\"},\"done\":false}\n\
                  {\"message\":{\"content\":\"\"},\"done\":true,\"prompt_eval_count\":5,\"eval_count\":2}\n";
    Mock::given(path("/api/chat"))
        .respond_with(ResponseTemplate::new(200).set_body_raw(ndjson, "application/x-ndjson"))
        .mount(&upstream)
        .await;
    let collector = Collector::start().await;
    let gateway = gateway(&upstream, Some(&collector), &[]);
    let answer = chat(&gateway, true, None).await;
    assert_eq!(answer.status(), 200);
    assert!(answer.text().await.unwrap().ends_with("data: [DONE]\n\n"));

    let spans = collector
        .wait_for("the streamed request", |spans| {
            spans.iter().any(|s| s.kind == SpanKind::Server as i32)
        })
        .await;
    let request = named(&spans, "POST /v1/chat/completions")[0];
    // A new trace, as no traceparent came with the request.
    assert_eq!(request.parent_span_id, Vec::<u8>::new());
    assert_eq!(
        attribute(request, "gen_ai.usage.input_tokens"),
        Some(json!(5))
    );
    assert_eq!(
        attribute(request, "gen_ai.usage.output_tokens"),
        Some(json!(2))
    );
    assert_eq!(
        attribute(request, "gen_ai.provider.name"),
        Some(json!("ollama"))
    );
    let sent = upstream_traceparents(&upstream).await;
    let header = sent[0].as_deref().expect("traceparent upstream");
    assert!(
        header.starts_with(&format!("00-{}-", hex::encode(&request.trace_id))),
        "{header}"
    );
}

#[tokio::test]
async fn with_sampling_off_nothing_is_exported_but_the_trace_still_reaches_the_upstream() {
    let upstream = ollama_answering("unsampled").await;
    let collector = Collector::start().await;
    let gateway = gateway(
        &upstream,
        Some(&collector),
        &[("OTEL_TRACES_SAMPLER", "parentbased_always_off")],
    );
    assert_eq!(chat(&gateway, false, None).await.status(), 200);
    // A client's sampled trace is still followed.
    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    let answer = chat(&gateway, true, Some(&traceparent)).await;
    assert_eq!(answer.status(), 200);
    answer.text().await.unwrap();
    let spans = collector
        .wait_for("the client's sampled trace", |spans| {
            spans.iter().any(|s| s.kind == SpanKind::Server as i32)
        })
        .await;
    let trace_id = hex::decode(CLIENT_TRACE).unwrap();
    assert!(spans.iter().all(|s| s.trace_id == trace_id), "{spans:#?}");
    let sent = upstream_traceparents(&upstream).await;
    assert!(
        sent[0].as_deref().unwrap().ends_with("-00"),
        "not sampled: {sent:?}"
    );
    assert!(sent[1]
        .as_deref()
        .unwrap()
        .starts_with(&format!("00-{CLIENT_TRACE}-")));
}

#[tokio::test]
async fn without_an_endpoint_nothing_is_traced_or_propagated() {
    let upstream = ollama_answering("untraced").await;
    let gateway = gateway(&upstream, None, &[]);
    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    assert_eq!(
        chat(&gateway, false, Some(&traceparent)).await.status(),
        200
    );
    assert_eq!(upstream_traceparents(&upstream).await, vec![None]);
    assert!(!gateway.output().contains("trace_id"));
}

#[tokio::test]
async fn spans_can_be_sent_as_otlp_json() {
    let upstream = ollama_answering("as json").await;
    let collector = Collector::start().await;
    let gateway = gateway(
        &upstream,
        Some(&collector),
        &[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")],
    );
    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    assert_eq!(
        chat(&gateway, false, Some(&traceparent)).await.status(),
        200
    );
    let spans = collector
        .wait_for("the request as JSON", |spans| {
            spans.iter().any(|s| s.kind == SpanKind::Server as i32)
        })
        .await;
    let request = named(&spans, "POST /v1/chat/completions")[0];
    assert_eq!(request.trace_id, hex::decode(CLIENT_TRACE).unwrap());
    assert_eq!(
        attribute(request, "gen_ai.usage.output_tokens"),
        Some(json!(3))
    );
    // Decoded from JSON (a process-wide count: the other tests' collectors see protobuf).
    assert!(JSON_EXPORTS.load(std::sync::atomic::Ordering::Relaxed) > 0);
}
