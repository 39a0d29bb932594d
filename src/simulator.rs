//! The upstream simulator (the `mock-llm` binary, and the upstream of `--demo`): speaks
//! the Ollama, Gemini, OpenAI and Anthropic wire formats.
//!
//! Answers echo the last user message. Offered tools, the mock calls: the one a request
//! forces, else the first, with arguments `{"query": <the last user message>}`; after a
//! tool's result it answers `Tool <name> said: <result>`. Faults can be injected for every request with
//! flags, or per request with headers (when calling the mock directly):
//!
//! ```text
//! mock-llm --port 11434 [--host 127.0.0.1] [--latency-ms N] [--fail-status CODE]
//!          [--fail-rate 0..1] [--hang-rate 0..1] [--reset-rate 0..1] [--chunk-delay-ms N]
//!          [--chunks N] [--fail-after N] [--hang-after N]
//! headers: x-mock-latency-ms: N   x-mock-status: CODE   x-mock-hang: 1
//! streams: x-mock-chunks: N   x-mock-chunk-delay-ms: N   x-mock-fail-after: N
//!          x-mock-hang-after: N
//! ```
//! `--fail-status` alone fails every request; with `--fail-rate` only that fraction
//! (default status 500). A hang never answers; the client's timeout must end it. A reset
//! drops a new connection with a TCP RST before anything is answered.
//!
//! Streams, in each API's own framing: Ollama NDJSON (`"stream": true`), Gemini
//! `:streamGenerateContent?alt=sse`, OpenAI SSE (`"stream": true`, with
//! `stream_options.include_usage`), Anthropic's named events (`/v1/messages`). The answer is split into one chunk per word, or into
//! `x-mock-chunks` chunks, sent `x-mock-chunk-delay-ms` apart; `x-mock-fail-after: N`
//! breaks the connection after N chunks, `x-mock-hang-after: N` stops sending after N
//! chunks and never ends. `GET /_mock/streams` counts streams started, completed and
//! cancelled (the client went away before the end), so tests can see an upstream call
//! cancelled. `POST /v1/traces` accepts OTLP/HTTP trace exports and drops them. The stream flags set the same for every stream; a header wins over a flag.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

#[derive(Debug, Clone, Default)]
struct Faults {
    latency: Duration,
    fail_status: Option<u16>,
    fail_rate: f64,
    hang_rate: f64,
    chunk_delay: Duration,
    /// Stream defaults, for clients that cannot send the `x-mock-*` headers (the
    /// gateway does not forward them).
    chunks: Option<u64>,
    fail_after: Option<u64>,
    hang_after: Option<u64>,
}

/// The mock's shared state: its faults and its stream counters.
#[derive(Default)]
struct Mock {
    faults: Faults,
    streams: StreamCounts,
}

/// Streams started, completed (last byte sent) and cancelled (dropped before the end).
#[derive(Default)]
struct StreamCounts {
    started: AtomicU64,
    completed: AtomicU64,
    cancelled: AtomicU64,
}

#[derive(Debug)]
struct Options {
    host: String,
    port: u16,
    faults: Faults,
    reset_rate: f64,
}

/// A listener that resets a fraction of new connections (SO_LINGER 0, then close).
struct ResettingListener {
    inner: tokio::net::TcpListener,
    reset_rate: f64,
}

impl axum::serve::Listener for ResettingListener {
    type Io = tokio::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
            if self.reset_rate > 0.0 && rand::random::<f64>() < self.reset_rate {
                let _ = stream.set_zero_linger();
                drop(stream);
                continue;
            }
            return (stream, addr);
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

const USAGE: &str = "usage: mock-llm [--host ADDR] [--port N] [--latency-ms N] [--fail-status CODE] [--fail-rate 0..1] [--hang-rate 0..1] [--reset-rate 0..1] [--chunk-delay-ms N] [--chunks N] [--fail-after N] [--hang-after N]";

fn parse_args(args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut options = Options {
        host: "127.0.0.1".into(),
        port: 11434,
        faults: Faults::default(),
        reset_rate: 0.0,
    };
    let mut args = args.peekable();
    while let Some(flag) = args.next() {
        if flag == "--help" || flag == "-h" {
            return Err(USAGE.into());
        }
        let value = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let bad = |what: &str| format!("{flag}: '{value}' is not {what}\n{USAGE}");
        match flag.as_str() {
            "--host" => options.host = value.clone(),
            "--port" => options.port = value.parse().map_err(|_| bad("a port"))?,
            "--latency-ms" => {
                options.faults.latency =
                    Duration::from_millis(value.parse().map_err(|_| bad("milliseconds"))?)
            }
            "--fail-status" => {
                let status: u16 = value.parse().map_err(|_| bad("an HTTP status"))?;
                if StatusCode::from_u16(status).is_err() {
                    return Err(bad("an HTTP status"));
                }
                options.faults.fail_status = Some(status);
            }
            "--fail-rate" => {
                options.faults.fail_rate =
                    parse_rate(&value).ok_or_else(|| bad("a rate in 0..1"))?
            }
            "--hang-rate" => {
                options.faults.hang_rate =
                    parse_rate(&value).ok_or_else(|| bad("a rate in 0..1"))?
            }
            "--reset-rate" => {
                options.reset_rate = parse_rate(&value).ok_or_else(|| bad("a rate in 0..1"))?
            }
            "--chunk-delay-ms" => {
                options.faults.chunk_delay =
                    Duration::from_millis(value.parse().map_err(|_| bad("milliseconds"))?)
            }
            "--chunks" => options.faults.chunks = Some(value.parse().map_err(|_| bad("a count"))?),
            "--fail-after" => {
                options.faults.fail_after = Some(value.parse().map_err(|_| bad("a count"))?)
            }
            "--hang-after" => {
                options.faults.hang_after = Some(value.parse().map_err(|_| bad("a count"))?)
            }
            _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
        }
    }
    if options.faults.fail_status.is_some() && options.faults.fail_rate == 0.0 {
        options.faults.fail_rate = 1.0;
    }
    Ok(options)
}

fn parse_rate(value: &str) -> Option<f64> {
    value
        .parse::<f64>()
        .ok()
        .filter(|r| (0.0..=1.0).contains(r))
}

/// The text to echo and a rough token count of the whole conversation.
fn echo(messages: &[(String, String)]) -> (String, u64) {
    let last_user = messages
        .iter()
        .rev()
        .find(|(role, _)| role == "user")
        .or(messages.last())
        .map(|(_, text)| text.as_str())
        .unwrap_or("");
    let prompt_tokens = messages
        .iter()
        .map(|(_, t)| t.split_whitespace().count() as u64)
        .sum();
    (format!("Echo: {last_user}"), prompt_tokens)
}

/// What the mock answers a request that may offer tools.
enum Answer {
    /// Text (an echo, or what a tool said).
    Text(String),
    /// A call of `name` with `arguments`.
    Call { name: String, arguments: Value },
}

/// The tool facts of one request, read from its own format.
struct ToolTurn {
    /// Tools offered (none when the request forbids calls).
    offered: Vec<String>,
    /// The tool a request forces.
    forced: Option<String>,
    /// The last turn, when it is a tool's result: the tool and what it said.
    result: Option<(String, String)>,
}

impl ToolTurn {
    fn answer(self, messages: &[(String, String)]) -> (Answer, u64) {
        let (echoed, prompt_tokens) = echo(messages);
        let answer = if let Some((name, said)) = self.result {
            Answer::Text(format!("Tool {name} said: {said}"))
        } else if let Some(name) = self.forced.or_else(|| self.offered.first().cloned()) {
            let query = echoed.trim_start_matches("Echo: ").to_owned();
            Answer::Call {
                name,
                arguments: json!({ "query": query }),
            }
        } else {
            Answer::Text(echoed)
        };
        (answer, prompt_tokens)
    }
}

/// The names at `pointer` in each of `items`.
fn names(items: Option<&Value>, pointer: &str) -> Vec<String> {
    items
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(|i| i.pointer(pointer).and_then(Value::as_str))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn text_of(value: Option<&Value>) -> String {
    match value {
        Some(Value::String(text)) => text.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

fn ollama_tools(body: &Value) -> ToolTurn {
    let last = body
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|m| m.last());
    ToolTurn {
        offered: names(body.get("tools"), "/function/name"),
        forced: None,
        result: last
            .filter(|m| m.get("role").and_then(Value::as_str) == Some("tool"))
            .map(|m| (text_of(m.get("tool_name")), text_of(m.get("content")))),
    }
}

fn gemini_tools(body: &Value) -> ToolTurn {
    let config = body.pointer("/toolConfig/functionCallingConfig");
    let mode = config.and_then(|c| c.get("mode")).and_then(Value::as_str);
    let offered = match mode {
        Some("NONE") => Vec::new(),
        _ => body
            .get("tools")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .flat_map(|tool| names(tool.get("functionDeclarations"), "/name"))
            .collect(),
    };
    let response = body
        .get("contents")
        .and_then(Value::as_array)
        .and_then(|c| c.last())
        .and_then(|turn| turn.get("parts"))
        .and_then(Value::as_array)
        .and_then(|parts| parts.iter().find_map(|p| p.get("functionResponse")));
    ToolTurn {
        offered,
        forced: config
            .and_then(|c| c.pointer("/allowedFunctionNames/0"))
            .and_then(Value::as_str)
            .map(str::to_owned),
        result: response.map(|r| {
            let said = r
                .pointer("/response/output")
                .or_else(|| r.pointer("/response/error"));
            (text_of(r.get("name")), text_of(said))
        }),
    }
}

fn openai_tools(body: &Value) -> ToolTurn {
    let choice = body.get("tool_choice");
    let last = body
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|m| m.last());
    ToolTurn {
        offered: match choice.and_then(Value::as_str) {
            Some("none") => Vec::new(),
            _ => names(body.get("tools"), "/function/name"),
        },
        forced: choice
            .and_then(|c| c.pointer("/function/name"))
            .and_then(Value::as_str)
            .map(str::to_owned),
        result: last
            .filter(|m| m.get("role").and_then(Value::as_str) == Some("tool"))
            .map(|m| (text_of(m.get("tool_call_id")), text_of(m.get("content")))),
    }
}

fn anthropic_tools(body: &Value) -> ToolTurn {
    let choice = body.get("tool_choice");
    let last_blocks = body
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|m| m.last())
        .and_then(|m| m.get("content"))
        .and_then(Value::as_array);
    let result = last_blocks.and_then(|blocks| {
        blocks
            .iter()
            .find(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
    });
    ToolTurn {
        offered: match choice.and_then(|c| c.get("type")).and_then(Value::as_str) {
            Some("none") => Vec::new(),
            _ => names(body.get("tools"), "/name"),
        },
        forced: choice
            .filter(|c| c.get("type").and_then(Value::as_str) == Some("tool"))
            .and_then(|c| c.get("name"))
            .and_then(Value::as_str)
            .map(str::to_owned),
        result: result.map(|r| (text_of(r.get("tool_use_id")), text_of(r.get("content")))),
    }
}

fn words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn header_number(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// Applies latency, hangs and failures; `Some(response)` ends the request early.
async fn inject_faults(faults: &Faults, headers: &HeaderMap) -> Option<Response> {
    let latency = header_number(headers, "x-mock-latency-ms")
        .map(Duration::from_millis)
        .unwrap_or(faults.latency);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let hang = headers.contains_key("x-mock-hang")
        || (faults.hang_rate > 0.0 && rand::random::<f64>() < faults.hang_rate);
    if hang {
        std::future::pending::<()>().await;
    }
    let status = header_number(headers, "x-mock-status")
        .and_then(|s| u16::try_from(s).ok())
        .or_else(|| {
            (faults.fail_rate > 0.0 && rand::random::<f64>() < faults.fail_rate)
                .then(|| faults.fail_status.unwrap_or(500))
        });
    let status = status.and_then(|s| StatusCode::from_u16(s).ok())?;
    if status.is_success() {
        return None;
    }
    Some((status, Json(json!({ "error": { "code": status.as_u16(), "message": "mock-llm injected failure" } }))).into_response())
}

fn pairs(
    messages: Option<&Value>,
    role_key: &str,
    text: impl Fn(&Value) -> String,
) -> Vec<(String, String)> {
    messages
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .map(|m| {
                    (
                        m.get(role_key)
                            .and_then(Value::as_str)
                            .unwrap_or("user")
                            .to_owned(),
                        text(m),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn bad_request(why: &str) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({ "error": why }))).into_response()
}

async fn ollama_chat(
    State(mock): State<Arc<Mock>>,
    headers: HeaderMap,
    body: Json<Value>,
) -> Response {
    if let Some(r) = inject_faults(&mock.faults, &headers).await {
        return r;
    }
    let Some(model) = body.get("model").and_then(Value::as_str) else {
        return bad_request("model is required");
    };
    let messages = pairs(body.get("messages"), "role", |m| {
        m.get("content")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    });
    let (answer, prompt_tokens) = ollama_tools(&body).answer(&messages);
    let (content, calls) = match answer {
        Answer::Text(text) => (text, json!([])),
        Answer::Call { name, arguments } => (
            String::new(),
            json!([{ "function": { "name": name, "arguments": arguments } }]),
        ),
    };
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        let completion_tokens = words(&content);
        let line = |message: Value| {
            let mut line = message.to_string().into_bytes();
            line.push(b'\n');
            Bytes::from(line)
        };
        let chunk = |piece: &str| {
            line(json!({
                "model": model, "created_at": format!("{}", now_secs()),
                "message": { "role": "assistant", "content": piece }, "done": false,
            }))
        };
        let end = line(json!({
            "model": model, "created_at": format!("{}", now_secs()),
            "message": { "role": "assistant", "content": "" }, "done": true,
            "done_reason": "stop", "prompt_eval_count": prompt_tokens,
            "eval_count": completion_tokens,
        }));
        let mut ends = vec![end];
        if calls.as_array().is_some_and(|c| !c.is_empty()) {
            // The call comes whole, in a chunk of its own before the end.
            ends.insert(
                0,
                line(json!({
                    "model": model, "created_at": format!("{}", now_secs()),
                    "message": { "role": "assistant", "content": "", "tool_calls": calls }, "done": false,
                })),
            );
        }
        let plan = StreamPlan::new(&mock.faults, &headers, &content);
        return streamed(&mock, plan, chunk, ends, "application/x-ndjson");
    }
    Json(json!({
        "model": model,
        "created_at": format!("{}", now_secs()),
        "message": { "role": "assistant", "content": content, "tool_calls": calls },
        "done": true,
        "done_reason": "stop",
        "total_duration": 1000,
        "prompt_eval_count": prompt_tokens,
        "eval_count": words(&content),
    }))
    .into_response()
}

async fn gemini_generate(
    State(mock): State<Arc<Mock>>,
    Path(model_action): Path<String>,
    Query(query): Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
    body: Json<Value>,
) -> Response {
    if let Some(r) = inject_faults(&mock.faults, &headers).await {
        return r;
    }
    let (model, stream) = match model_action.split_once(':') {
        Some((model, "generateContent")) => (model, false),
        Some((model, "streamGenerateContent"))
            if query.get("alt").map(String::as_str) == Some("sse") =>
        {
            (model, true)
        }
        _ => {
            return (
                StatusCode::NOT_FOUND,
                Json(json!({ "error": "unknown action" })),
            )
                .into_response()
        }
    };
    if !headers.contains_key("x-goog-api-key") {
        return (
            StatusCode::FORBIDDEN,
            Json(json!({ "error": { "code": 403, "message": "API key missing" } })),
        )
            .into_response();
    }
    let messages = pairs(body.get("contents"), "role", |m| {
        m.get("parts")
            .and_then(Value::as_array)
            .map(|parts| {
                parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect::<String>()
            })
            .unwrap_or_default()
    });
    let (answer, prompt_tokens) = gemini_tools(&body).answer(&messages);
    let (content, call) = match answer {
        Answer::Text(text) => (text, None),
        Answer::Call { name, arguments } => (
            String::new(),
            Some(json!({ "functionCall": { "name": name, "args": arguments } })),
        ),
    };
    let completion_tokens = words(&content);
    let usage = json!({
        "promptTokenCount": prompt_tokens,
        "candidatesTokenCount": completion_tokens,
        "totalTokenCount": prompt_tokens + completion_tokens,
    });
    if stream {
        let chunk = |piece: &str| {
            sse(
                &json!({
                    "candidates": [{ "content": { "role": "model", "parts": [{ "text": piece }] }, "index": 0 }],
                    "modelVersion": model,
                }),
                "\r\n\r\n",
            )
        };
        let end = sse(
            &json!({
                "candidates": [{
                    "content": { "role": "model", "parts": [call.clone().unwrap_or_else(|| json!({ "text": "" }))] },
                    "finishReason": "STOP", "index": 0,
                }],
                "usageMetadata": usage,
                "modelVersion": model,
            }),
            "\r\n\r\n",
        );
        let plan = StreamPlan::new(&mock.faults, &headers, &content);
        return streamed(&mock, plan, chunk, vec![end], "text/event-stream");
    }
    let part = call.unwrap_or_else(|| json!({ "text": content }));
    Json(json!({
        "candidates": [{
            "content": { "role": "model", "parts": [part] },
            "finishReason": "STOP",
            "index": 0,
        }],
        "usageMetadata": {
            "promptTokenCount": prompt_tokens,
            "candidatesTokenCount": completion_tokens,
            "totalTokenCount": prompt_tokens + completion_tokens,
        },
        "modelVersion": model,
    }))
    .into_response()
}

async fn openai_chat(
    State(mock): State<Arc<Mock>>,
    headers: HeaderMap,
    body: Json<Value>,
) -> Response {
    if let Some(r) = inject_faults(&mock.faults, &headers).await {
        return r;
    }
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("gpt-mock")
        .to_owned();
    let messages = pairs(body.get("messages"), "role", |m| {
        m.get("content")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    });
    let (answer, prompt_tokens) = openai_tools(&body).answer(&messages);
    let (content, call) = match answer {
        Answer::Text(text) => (text, None),
        Answer::Call { name, arguments } => (
            String::new(),
            Some(json!({
                "id": format!("call_{}", &uuid::Uuid::new_v4().simple().to_string()[..24]),
                "type": "function",
                "function": { "name": name, "arguments": arguments.to_string() },
            })),
        ),
    };
    let finish_reason = if call.is_some() { "tool_calls" } else { "stop" };
    let completion_tokens = words(&content);
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    });
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        let include_usage = body
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            == Some(true);
        let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
        let created = now_secs();
        let frame = |choices: Value, usage: Option<&Value>| {
            let mut chunk = json!({
                "id": id, "object": "chat.completion.chunk", "created": created,
                "model": model, "choices": choices,
            });
            if include_usage {
                chunk["usage"] = usage.cloned().unwrap_or(Value::Null);
            }
            sse(&chunk, "\n\n")
        };
        let first = std::sync::atomic::AtomicBool::new(true);
        let chunk = |piece: &str| {
            let delta = if first.swap(false, Ordering::Relaxed) {
                json!({ "role": "assistant", "content": piece })
            } else {
                json!({ "content": piece })
            };
            frame(
                json!([{ "index": 0, "delta": delta, "finish_reason": null }]),
                None,
            )
        };
        let mut end = Vec::new();
        if let Some(call) = &call {
            let mut call = call.clone();
            call["index"] = json!(0);
            end.push(frame(
                json!([{ "index": 0, "delta": { "role": "assistant", "content": null, "tool_calls": [call] }, "finish_reason": null }]),
                None,
            ));
        }
        end.push(frame(
            json!([{ "index": 0, "delta": {}, "finish_reason": finish_reason }]),
            None,
        ));
        if include_usage {
            end.push(frame(json!([]), Some(&usage)));
        }
        end.push(Bytes::from_static(b"data: [DONE]\n\n"));
        let plan = StreamPlan::new(&mock.faults, &headers, &content);
        return streamed(&mock, plan, chunk, end, "text/event-stream");
    }
    Json(json!({
        "id": format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        "object": "chat.completion",
        "created": now_secs(),
        "model": model,
        "choices": [{
            "index": 0,
            "message": match &call {
                Some(call) => json!({ "role": "assistant", "content": null, "tool_calls": [call] }),
                None => json!({ "role": "assistant", "content": content }),
            },
            "finish_reason": finish_reason,
        }],
        "usage": usage,
    }))
    .into_response()
}

async fn anthropic_messages(
    State(mock): State<Arc<Mock>>,
    headers: HeaderMap,
    body: Json<Value>,
) -> Response {
    if let Some(r) = inject_faults(&mock.faults, &headers).await {
        return r;
    }
    if !headers.contains_key("anthropic-version") {
        return bad_request("anthropic-version is required");
    }
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("claude-mock")
        .to_owned();
    let messages = pairs(body.get("messages"), "role", |m| match m.get("content") {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(blocks)) => blocks
            .iter()
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    });
    let (answer, prompt_tokens) = anthropic_tools(&body).answer(&messages);
    let (content, call) = match answer {
        Answer::Text(text) => (text, None),
        Answer::Call { name, arguments } => (
            String::new(),
            Some(
                json!({"type": "tool_use", "id": format!("toolu_{}", &uuid::Uuid::new_v4().simple().to_string()[..20]),
                "name": name, "input": arguments}),
            ),
        ),
    };
    let stop_reason = if call.is_some() {
        "tool_use"
    } else {
        "end_turn"
    };
    let completion_tokens = words(&content);
    let id = format!("msg_{}", uuid::Uuid::new_v4().simple());
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        let event =
            |name: &str, data: Value| Bytes::from(format!("event: {name}\ndata: {data}\n\n"));
        let start = event(
            "message_start",
            json!({"type": "message_start", "message": {"id": id, "type": "message",
            "role": "assistant", "content": [], "model": model, "usage": {"input_tokens": prompt_tokens, "output_tokens": 0}}}),
        );
        let open = event(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        );
        let first = std::sync::atomic::AtomicBool::new(true);
        let chunk = |piece: &str| {
            let delta = event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": piece}}),
            );
            if first.swap(false, Ordering::Relaxed) {
                Bytes::from([start.clone(), open.clone(), delta].concat())
            } else {
                delta
            }
        };
        let mut end = Vec::new();
        if content.is_empty() {
            end.push(Bytes::from([start.clone(), open.clone()].concat()));
        }
        end.push(event(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ));
        if let Some(call) = &call {
            let mut opened = call.clone();
            opened["input"] = json!({});
            end.push(event(
                "content_block_start",
                json!({"type": "content_block_start", "index": 1, "content_block": opened}),
            ));
            end.push(event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": call["input"].to_string()}}),
            ));
            end.push(event(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 1}),
            ));
        }
        end.push(event(
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": stop_reason},
            "usage": {"output_tokens": completion_tokens}}),
        ));
        end.push(event("message_stop", json!({"type": "message_stop"})));
        let plan = StreamPlan::new(&mock.faults, &headers, &content);
        return streamed(&mock, plan, chunk, end, "text/event-stream");
    }
    let mut blocks = Vec::new();
    if !content.is_empty() || call.is_none() {
        blocks.push(json!({"type": "text", "text": content}));
    }
    blocks.extend(call);
    Json(json!({
        "id": id, "type": "message", "role": "assistant", "model": model, "content": blocks,
        "stop_reason": stop_reason, "stop_sequence": null,
        "usage": {"input_tokens": prompt_tokens, "output_tokens": completion_tokens},
    }))
    .into_response()
}

/// `data: <json><end>`: one server-sent event.
fn sse(value: &Value, end: &str) -> Bytes {
    Bytes::from(format!("data: {value}{end}"))
}

/// How a stream is cut into chunks and paced, from the request's headers.
struct StreamPlan {
    pieces: Vec<String>,
    delay: Duration,
    fail_after: Option<usize>,
    hang_after: Option<usize>,
}

impl StreamPlan {
    fn new(faults: &Faults, headers: &HeaderMap, content: &str) -> StreamPlan {
        let pieces = match header_number(headers, "x-mock-chunks").or(faults.chunks) {
            Some(n) if n > 0 => split_evenly(content, n as usize),
            _ => split_words(content),
        };
        let count = |name: &str, default: Option<u64>| {
            header_number(headers, name).or(default).map(|n| n as usize)
        };
        StreamPlan {
            pieces,
            delay: header_number(headers, "x-mock-chunk-delay-ms")
                .map(Duration::from_millis)
                .unwrap_or(faults.chunk_delay),
            fail_after: count("x-mock-fail-after", faults.fail_after),
            hang_after: count("x-mock-hang-after", faults.hang_after),
        }
    }
}

/// `text` as words, each with the spaces that follow it, so they join back to `text`.
fn split_words(text: &str) -> Vec<String> {
    let mut pieces = Vec::new();
    let mut current = String::new();
    for c in text.chars() {
        if !c.is_whitespace() && current.ends_with(char::is_whitespace) {
            pieces.push(std::mem::take(&mut current));
        }
        current.push(c);
    }
    if !current.is_empty() {
        pieces.push(current);
    }
    pieces
}

/// `text` in `n` pieces of about equal length (some empty when `text` is shorter).
fn split_evenly(text: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    (0..n)
        .map(|i| {
            let (from, to) = (chars.len() * i / n, chars.len() * (i + 1) / n);
            chars[from..to].iter().collect()
        })
        .collect()
}

/// Counts a stream as cancelled unless it reached its end.
struct StreamGuard {
    mock: Arc<Mock>,
    completed: bool,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let counter = if self.completed {
            &self.mock.streams.completed
        } else {
            &self.mock.streams.cancelled
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A streamed answer: `chunk` of each piece of the plan, paced, then `end`.
fn streamed(
    mock: &Arc<Mock>,
    plan: StreamPlan,
    chunk: impl Fn(&str) -> Bytes,
    end: Vec<Bytes>,
    content_type: &'static str,
) -> Response {
    mock.streams.started.fetch_add(1, Ordering::Relaxed);
    let frames: Vec<Bytes> = plan.pieces.iter().map(|p| chunk(p)).collect();
    let guard = StreamGuard {
        mock: mock.clone(),
        completed: false,
    };
    let (delay, fail_after, hang_after) = (plan.delay, plan.fail_after, plan.hang_after);
    let count = frames.len();
    let total = count + end.len();
    let mut frames = frames.into_iter().chain(end);
    let body = futures_util::stream::unfold((0usize, guard), move |(sent, mut guard)| {
        let next = frames.next();
        async move {
            let next = next?;
            if sent > 0 && sent <= count && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if fail_after == Some(sent) {
                return Some((
                    Err(std::io::Error::other("mock-llm: stream broken on purpose")),
                    (sent + 1, guard),
                ));
            }
            if hang_after == Some(sent) {
                std::future::pending::<()>().await;
            }
            if sent + 1 == total {
                guard.completed = true;
            }
            Some((Ok::<_, std::io::Error>(next), (sent + 1, guard)))
        }
    });
    let mut response = Response::new(Body::from_stream(body));
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static(content_type),
    );
    response
}

async fn stream_counts(State(mock): State<Arc<Mock>>) -> Json<Value> {
    let count = |c: &AtomicU64| c.load(Ordering::Relaxed);
    Json(json!({
        "started": count(&mock.streams.started),
        "completed": count(&mock.streams.completed),
        "cancelled": count(&mock.streams.cancelled),
    }))
}

/// Accepts an OTLP/HTTP export and drops it: the empty answer is an empty
/// `ExportTraceServiceResponse` in either encoding's eyes.
async fn accept_traces(_export: Bytes) -> Response {
    (
        StatusCode::OK,
        [(axum::http::header::CONTENT_TYPE, "application/x-protobuf")],
        "",
    )
        .into_response()
}

/// The simulator's routes, with `faults` injected into every request.
fn router(faults: Faults) -> Router {
    Router::new()
        .route("/api/chat", post(ollama_chat))
        .route("/v1beta/models/{model_action}", post(gemini_generate))
        .route("/v1/chat/completions", post(openai_chat))
        .route("/v1/messages", post(anthropic_messages))
        .route("/_mock/streams", get(stream_counts))
        // An OTLP/HTTP traces sink, so benchmarks can export spans somewhere real.
        .route("/v1/traces", post(accept_traces))
        .with_state(Arc::new(Mock {
            faults,
            streams: StreamCounts::default(),
        }))
}

/// Serves the simulator with no faults on `listener` until the task is dropped: the
/// upstream of every provider in demo mode.
pub async fn serve(listener: tokio::net::TcpListener) -> std::io::Result<()> {
    axum::serve(listener, router(Faults::default())).await
}

/// The `mock-llm` command line: parses `args` (without the program name), listens and
/// serves until Ctrl-C.
pub async fn run_cli(args: impl Iterator<Item = String>) -> std::process::ExitCode {
    let options = match parse_args(args) {
        Ok(options) => options,
        Err(message) => {
            eprintln!("mock-llm: {message}");
            return std::process::ExitCode::from(2);
        }
    };
    let addr = format!("{}:{}", options.host, options.port);
    let listener = match tokio::net::TcpListener::bind(&addr).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("mock-llm: cannot listen on {addr}: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    let bound: Option<SocketAddr> = listener.local_addr().ok();
    // Tests and scripts read this line to learn the port when started with --port 0.
    println!(
        "mock-llm listening on {}",
        bound.map(|a| a.to_string()).unwrap_or(addr)
    );
    let listener = ResettingListener {
        inner: listener,
        reset_rate: options.reset_rate,
    };
    let server = axum::serve(listener, router(options.faults)).with_graceful_shutdown(async {
        let _ = tokio::signal::ctrl_c().await;
    });
    match server.await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("mock-llm: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_and_bad_values_are_refused() {
        let o = parse_args(
            ["--port", "0", "--fail-status", "503"]
                .iter()
                .map(|s| s.to_string()),
        )
        .unwrap();
        assert_eq!(o.port, 0);
        assert_eq!(o.faults.fail_status, Some(503));
        assert_eq!(o.faults.fail_rate, 1.0);
        assert!(parse_args(["--fail-rate", "2"].iter().map(|s| s.to_string())).is_err());
        assert!(parse_args(["--bogus", "1"].iter().map(|s| s.to_string())).is_err());
    }

    #[test]
    fn echo_repeats_the_last_user_message() {
        let (text, tokens) = echo(&[
            ("user".into(), "first one".into()),
            ("assistant".into(), "x".into()),
            ("user".into(), "second".into()),
        ]);
        assert_eq!(text, "Echo: second");
        assert_eq!(tokens, 4);
    }
}
