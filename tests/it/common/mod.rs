//! Spawn helpers for black-box tests: a private `redis-server` on a free port, the real
//! gateway on port 0 (in process or as the real binary), and HTTP helpers.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use llm_gateway::app::App;
use llm_gateway::settings::Settings;
use serde_json::{json, Value};
use tokio::sync::oneshot;

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

/// A `redis-server` of our own, in a temp dir, killed on drop.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a fresh server on a free port and waits until it answers PING.
    pub fn start() -> RedisServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut server = RedisServer {
            port: free_port(),
            dir,
            child: None,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server ({e}); install it with `apt-get install redis-server`")
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.try_ping() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "redis-server on port {} did not answer PING within 10 s",
            self.port
        );
    }

    fn try_ping(&self) -> bool {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
            .is_ok()
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// A plain synchronous connection for inspecting and poking the server.
    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
            .expect("connect to test redis")
    }

    /// Kills the server (like a crash).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops and starts the server on the same port: all state (scripts too) is gone.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Every key in the server.
    pub fn keys(&self) -> Vec<String> {
        redis::cmd("KEYS")
            .arg("*")
            .query(&mut self.conn())
            .expect("KEYS")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The gateway running in this process on a free port.
pub struct TestApp {
    pub url: String,
    stop: Option<oneshot::Sender<()>>,
    pub client: reqwest::Client,
    /// The running gateway's state (tests reload it as SIGHUP does).
    pub state: llm_gateway::state::AppState,
}

/// How a test wants its gateway: settings on top of the test defaults (port 0 on
/// 127.0.0.1, the embedded store, fast retries). The one way tests start an in-process
/// gateway.
#[derive(Debug, Clone, Default)]
pub struct TestAppBuilder {
    settings: Vec<(String, String)>,
    /// The `GATEWAY_CONFIG` file, when the test has one.
    config: Option<std::path::PathBuf>,
}

impl TestAppBuilder {
    /// Sets `name` to `value` (a later value of the same name wins).
    pub fn set(mut self, name: &str, value: impl Into<String>) -> Self {
        self.settings.push((name.to_owned(), value.into()));
        self
    }

    /// Sets every pair of `pairs`.
    pub fn settings(self, pairs: &[(&str, &str)]) -> Self {
        pairs
            .iter()
            .fold(self, |builder, (name, value)| builder.set(name, *value))
    }

    /// `REDIS_URL`.
    pub fn store(self, url: &str) -> Self {
        self.set("REDIS_URL", url)
    }

    /// `API_KEYS`.
    pub fn keys(self, keys: &str) -> Self {
        self.set("API_KEYS", keys)
    }

    /// Ollama at `upstream` (a wiremock server).
    pub fn ollama(self, upstream: &wiremock::MockServer) -> Self {
        self.set("OLLAMA_BASE_URL", upstream.uri())
    }

    /// Gemini at `upstream`, with a key.
    pub fn gemini(self, upstream: &wiremock::MockServer, key: &str) -> Self {
        self.set("GEMINI_BASE_URL", upstream.uri())
            .set("GEMINI_API_KEY", key)
    }

    /// `GATEWAY_CONFIG`: the TOML file at `path`.
    pub fn config_file(mut self, path: &Path) -> Self {
        self.config = Some(path.to_owned());
        self
    }

    /// The settings this builder describes.
    pub fn build_settings(&self) -> Result<Settings, llm_gateway::settings::SettingsError> {
        let env = self.settings.iter().cloned().collect();
        Settings::from_sources(self.config.as_deref(), None, env)
    }

    /// Starts the gateway in this process on a free port.
    pub async fn spawn(self) -> TestApp {
        let settings = self.build_settings().expect("test settings");
        let app = App::build(settings).await.expect("build app");
        let state = app.state().clone();
        let url = format!("http://{}", app.local_addr().expect("addr"));
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(app.run_until(async move {
            let _ = stopped.await;
        }));
        TestApp {
            url,
            stop: Some(stop),
            client: reqwest::Client::new(),
            state,
        }
    }
}

impl TestApp {
    /// A builder with the test defaults.
    pub fn builder() -> TestAppBuilder {
        TestAppBuilder::default()
            .set("HOST", "127.0.0.1")
            .set("PORT", "0")
            .set("PROVIDER_RETRY_BASE_MS", "10")
            .store("memory://")
    }

    /// Starts the gateway with the test defaults overridden by `pairs`.
    pub async fn spawn(pairs: &[(&str, &str)]) -> TestApp {
        TestApp::builder().settings(pairs).spawn().await
    }

    /// POSTs a chat body to `path` with `key` (None sends no key).
    pub async fn chat_at(&self, path: &str, key: Option<&str>, body: &Value) -> reqwest::Response {
        let mut request = self.client.post(format!("{}{path}", self.url)).json(body);
        if let Some(key) = key {
            request = request.header("X-API-Key", key);
        }
        request.send().await.expect("request")
    }

    /// POSTs a chat body to `/api/v1/chat` with `key`.
    pub async fn chat(&self, key: &str, body: &Value) -> reqwest::Response {
        self.chat_at("/api/v1/chat", Some(key), body).await
    }

    /// GETs `path`.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .expect("request")
    }

    /// The value of one metric line (`name{labels}`) in `/metrics`, 0 if absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self
            .get("/metrics")
            .await
            .text()
            .await
            .expect("metrics body");
        metric_value(&text, series)
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The value of `series` in Prometheus text, 0 if absent.
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// A chat body with one user message.
pub fn chat_body(content: &str) -> Value {
    json!({ "messages": [{ "role": "user", "content": content }] })
}

/// An Ollama reply as the real server sends it.
pub fn ollama_reply(content: &str) -> Value {
    json!({
        "model": "llama3.1",
        "created_at": "2026-01-01T00:00:00Z",
        "message": { "role": "assistant", "content": content },
        "done": true,
        "prompt_eval_count": 7,
        "eval_count": 3,
    })
}

/// A Gemini reply as the real API sends it.
pub fn gemini_reply(content: &str) -> Value {
    json!({
        "candidates": [{ "content": { "role": "model", "parts": [{ "text": content }] }, "finishReason": "STOP" }],
        "usageMetadata": { "promptTokenCount": 11, "candidatesTokenCount": 4, "totalTokenCount": 15 },
    })
}

/// A wiremock server answering Ollama and Gemini successfully.
pub async fn upstream_ok() -> wiremock::MockServer {
    use wiremock::matchers::{method, path, path_regex};
    use wiremock::{Mock, ResponseTemplate};
    let server = wiremock::MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/chat"))
        .respond_with(ResponseTemplate::new(200).set_body_json(ollama_reply("hi from ollama")))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path_regex(r"^/v1beta/models/[^/]+:generateContent$"))
        .respond_with(ResponseTemplate::new(200).set_body_json(gemini_reply("hi from gemini")))
        .mount(&server)
        .await;
    server
}

/// The real `llm-gateway` binary, with its output captured to a file.
pub struct GatewayProcess {
    pub child: Child,
    pub url: String,
    pub log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl GatewayProcess {
    /// Starts the binary with exactly `env` (plus HOST/PORT/LOG_FORMAT) in a temp dir,
    /// and waits for its "listening" line.
    pub fn start(env: &[(&str, &str)]) -> GatewayProcess {
        GatewayProcess::start_with_dotenv(env, None)
    }

    /// Like [`GatewayProcess::start`], with a `.env` file of `dotenv` in the working directory.
    pub fn start_with_dotenv(env: &[(&str, &str)], dotenv: Option<&str>) -> GatewayProcess {
        GatewayProcess::start_with_args(&[], env, dotenv)
    }

    /// Like [`GatewayProcess::start_with_dotenv`], with command-line `args`.
    pub fn start_with_args(
        args: &[&str],
        env: &[(&str, &str)],
        dotenv: Option<&str>,
    ) -> GatewayProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        if let Some(content) = dotenv {
            std::fs::write(dir.path().join(".env"), content).expect(".env");
        }
        let log = dir.path().join("gateway.log");
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_llm-gateway"))
            .args(args)
            .current_dir(dir.path())
            .env_clear()
            .envs([("HOST", "127.0.0.1"), ("PORT", "0"), ("LOG_FORMAT", "json")])
            .envs(env.iter().copied())
            .stdout(file.try_clone().expect("dup"))
            .stderr(file)
            .spawn()
            .expect("spawn llm-gateway");
        let addr = wait_for_line(&log, "llm-gateway listening")
            .and_then(|line| serde_json::from_str::<Value>(&line).ok())
            .and_then(|v| v["addr"].as_str().map(str::to_owned))
            .expect("gateway did not report its address");
        GatewayProcess {
            child,
            url: format!("http://{addr}"),
            log,
            _dir: dir,
        }
    }

    /// POSTs a chat body to `/v1/chat` with `key`.
    pub async fn chat(&self, key: &str, body: &Value) -> reqwest::Response {
        reqwest::Client::new()
            .post(format!("{}/v1/chat", self.url))
            .header("X-API-Key", key)
            .json(body)
            .send()
            .await
            .expect("request")
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        self.signal("-TERM");
    }

    /// Sends `signal` (as `kill` spells it, e.g. `-HUP`).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Everything the process wrote so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `mock-llm` process on a free port, killed when dropped (also when a test panics,
/// so a failing test leaves no process behind).
pub struct MockLlm {
    child: Child,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    _dir: tempfile::TempDir,
}

impl MockLlm {
    /// Starts `mock-llm` with `args` and waits until it listens.
    pub fn start(args: &[&str]) -> MockLlm {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("mock.log");
        let port = free_port().to_string();
        let child = Command::new(env!("CARGO_BIN_EXE_mock-llm"))
            .args(["--port", &port])
            .args(args)
            .stdout(std::fs::File::create(&log).expect("log file"))
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mock-llm");
        let mock = MockLlm {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        wait_for_line(&log, "listening").expect("mock-llm started");
        mock
    }
}

impl Drop for MockLlm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (10 s at most) for a line containing `needle` in the file at `path`.
pub fn wait_for_line(path: &Path, needle: &str) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(text) = std::fs::read_to_string(path) {
            if let Some(line) = text.lines().find(|l| l.contains(needle)) {
                return Some(line.to_owned());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// A program of the pinned Python environment of `tests/sdk/requirements.txt`
/// (`SDK_VENV` overrides where it is). A missing environment fails the test with the
/// command that makes it; it is never a reason to skip.
pub fn sdk_venv_program(name: &str) -> std::path::PathBuf {
    let venv = std::env::var_os("SDK_VENV")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/sdk-venv"));
    let program = venv.join("bin").join(name);
    assert!(
        program.exists(),
        "{} is missing: run `scripts/test.sh` (it creates the pinned Python environment), or \
         `python3 -m venv target/sdk-venv && target/sdk-venv/bin/pip install -r tests/sdk/requirements.txt`",
        program.display()
    );
    program
}

/// Runs `command` to its end, off the runtime's threads, failing the test past `limit`.
pub async fn output_of(mut command: Command, limit: Duration) -> std::process::Output {
    let program = format!("{:?}", command.get_program());
    tokio::time::timeout(limit, tokio::task::spawn_blocking(move || command.output()))
        .await
        .unwrap_or_else(|_| panic!("{program} did not finish within {limit:?}"))
        .unwrap()
        .unwrap_or_else(|e| panic!("{program} did not start: {e}"))
}

mod cluster;
mod load;
pub mod raw_http;
pub mod webdriver;
pub use cluster::{command_calls, RedisCluster};
pub use load::hammer;

impl RedisServer {
    /// SIGSTOP: the server keeps its sockets but answers nothing, so calls time out
    /// instead of failing fast.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`RedisServer::freeze`].
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("redis running").id().to_string();
        let status = Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// How many times Redis ran `command` (from INFO commandstats).
    pub fn command_calls(&self, command: &str) -> u64 {
        command_calls(&mut self.conn(), command)
    }

    /// The token limits' state of the client hash at `key`, as `token_bucket.lua` packs
    /// it in field `t`: token bucket, budget period, budget used, the expiry the script
    /// set (ms since the epoch), the `last_refill` it wrote. `None` when there is no `t`.
    pub fn token_state(&self, key: &str) -> Option<[f64; 5]> {
        let packed: Option<Vec<u8>> = redis::cmd("HGET")
            .arg(key)
            .arg("t")
            .query(&mut self.conn())
            .unwrap();
        let packed = packed?;
        assert_eq!(packed.len(), 40, "five little-endian doubles");
        let mut state = [0.0; 5];
        for (value, bytes) in state.iter_mut().zip(packed.chunks_exact(8)) {
            *value = f64::from_le_bytes(bytes.try_into().unwrap());
        }
        Some(state)
    }
}
