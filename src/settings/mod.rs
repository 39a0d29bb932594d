//! Typed settings: built-in defaults, an optional TOML file, `.env`, then the environment.
//!
//! Every setting is documented in `config/default.toml`, which is compiled in so the
//! defaults hold wherever the binary runs. Validation happens once, at start-up, and
//! every error names the setting it is about.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod registry;
pub mod tiers;

use config::{Config, Environment, File, FileFormat};
use secrecy::SecretString;
use serde::Deserialize;

/// The defaults file, compiled into the binary.
const DEFAULTS_TOML: &str = include_str!("../../config/default.toml");

/// The client key the original service shipped with; start-up warns while it is in use.
pub const SHIPPED_DEFAULT_API_KEY: &str = "sk-gateway-123";

/// What the limiter does when Redis is unreachable, slow or erroring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    /// Keep limiting with an in-process bucket of the same capacity and refill rate.
    Local,
    /// Admit every request.
    Open,
    /// Refuse every request with 503.
    Closed,
}

impl FailureMode {
    /// The label used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureMode::Local => "local",
            FailureMode::Open => "open",
            FailureMode::Closed => "closed",
        }
    }
}

/// The period a token budget counts in (UTC), after which it starts again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BudgetPeriod {
    /// A UTC day.
    #[default]
    Day,
    /// A calendar month (UTC).
    Month,
}

impl BudgetPeriod {
    /// The word used in settings and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetPeriod::Day => "day",
            BudgetPeriod::Month => "month",
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Which store backs the limiter and the cache, parsed from `REDIS_URL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// `memory://`: limiter and cache in process, one instance only.
    Memory,
    /// `redis://` or `rediss://`: one Redis server.
    Redis(String),
    /// `redis+cluster://h:p,h:p`: the seed nodes of a Redis Cluster, as `redis://` URLs.
    Cluster(Vec<String>),
}

/// All settings of the gateway, validated.
#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    /// Address to listen on.
    pub host: String,
    /// Port to listen on; 0 picks a free one.
    pub port: u16,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// Open connections at most.
    pub max_connections: usize,
    /// Chat requests served at once at most.
    pub max_concurrent_requests: usize,
    /// Threads serving connections (see `workers`); 0 means one per CPU core.
    pub worker_threads: usize,
    /// Time to send the request head, in seconds.
    pub header_read_timeout_seconds: f64,
    /// Time to send the request body, in seconds.
    pub body_read_timeout_seconds: f64,
    /// Time an idle keep-alive connection stays open between requests, in seconds.
    pub keep_alive_timeout_seconds: f64,
    /// Silence on a streamed answer before a `: keep-alive` comment, in seconds.
    pub stream_keep_alive_seconds: f64,
    /// Bound on the drain after SIGTERM/Ctrl-C, in seconds.
    pub shutdown_grace_seconds: f64,
    /// Comma-separated client keys, as configured (see [`Settings::api_key_list`]).
    pub api_keys: SecretString,
    /// Whether requests without a key are limited per IP instead of refused.
    pub allow_anonymous: bool,
    /// Proxies whose `X-Forwarded-For` is believed, comma-separated IPs or CIDRs.
    pub trusted_proxies: String,
    /// Tier definitions, `name:capacity:refill_rate,...`.
    pub rate_limiter_tiers: String,
    /// Key-to-tier assignments, `key=tier,...`.
    pub api_key_tiers: SecretString,
    /// Bucket size per client.
    pub rate_limiter_capacity: u64,
    /// Tokens per second per client.
    pub rate_limiter_refill_rate: f64,
    /// LLM tokens per minute per client (a second bucket); 0 turns it off.
    pub rate_limiter_tokens_per_minute: u64,
    /// LLM tokens per client per budget period; 0 turns the budget off.
    pub rate_limiter_token_budget: u64,
    /// The budget's period.
    pub rate_limiter_token_budget_period: BudgetPeriod,
    /// The completion tokens a request without `max_tokens` reserves.
    pub rate_limiter_default_max_tokens: u64,
    /// Policy when Redis fails.
    pub rate_limiter_failure_mode: FailureMode,
    /// Consecutive Redis failures that open the limiter's circuit breaker.
    pub rate_limiter_breaker_threshold: u32,
    /// How long the open breaker skips Redis before probing it, in milliseconds.
    pub rate_limiter_breaker_cooldown_ms: u64,
    /// Bound on every Redis call (limiter and cache), in milliseconds.
    pub redis_timeout_ms: u64,
    /// Store URL, see [`StoreUrl`].
    pub redis_url: String,
    /// Cache TTL in seconds; 0 disables the cache.
    pub cache_ttl_seconds: u64,
    /// Timeout of one provider attempt, in seconds.
    pub provider_timeout_seconds: f64,
    /// Retries after the first attempt, transient errors only.
    pub provider_max_retries: u32,
    /// First backoff delay, in milliseconds.
    pub provider_retry_base_ms: u64,
    /// Largest backoff delay, in milliseconds.
    pub provider_retry_max_ms: u64,
    /// Bound on one request's time on upstreams, in seconds; 0 derives it.
    pub provider_deadline_seconds: f64,
    /// Consecutive failures that open a registry provider's breaker.
    pub provider_breaker_threshold: u32,
    /// How long an open provider breaker skips its provider, in seconds.
    pub provider_breaker_cooldown_seconds: f64,
    /// Gemini API key.
    pub gemini_api_key: SecretString,
    /// Gemini API base URL.
    pub gemini_base_url: String,
    /// Default Gemini model.
    pub gemini_model: String,
    /// Ollama base URL.
    pub ollama_base_url: String,
    /// Default Ollama model.
    pub ollama_model: String,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter.
    pub log_level: String,
    /// OTLP collector base URL (`/v1/traces` is appended); empty: no traces.
    pub otel_exporter_otlp_endpoint: String,
    /// OTLP traces URL, used as is; wins over the base URL.
    pub otel_exporter_otlp_traces_endpoint: String,
    /// `http/protobuf` or `http/json`.
    pub otel_exporter_otlp_protocol: String,
    /// Extra export headers, `name=value,...` (may hold a collector's token).
    pub otel_exporter_otlp_headers: SecretString,
    /// Bound on one export, in milliseconds.
    pub otel_exporter_otlp_timeout: u64,
    /// The sampler's name (OpenTelemetry's `OTEL_TRACES_SAMPLER` values).
    pub otel_traces_sampler: String,
    /// The sampler's ratio, for the ratio samplers.
    pub otel_traces_sampler_arg: String,
    /// `service.name` of the spans.
    pub otel_service_name: String,
    /// `otlp`, or `none` for no traces.
    pub otel_traces_exporter: String,
    /// True: no traces whatever else is set.
    pub otel_sdk_disabled: bool,
    /// Longest wait before a batch of spans is sent, in milliseconds.
    pub otel_bsp_schedule_delay: u64,
    /// The provider registry of the `GATEWAY_CONFIG` file, if it has one; without, the
    /// settings above build the default one.
    #[serde(skip)]
    pub registry: Option<registry::RegistryConfig>,
    /// The `[tiers.NAME]` tables of the `GATEWAY_CONFIG` file.
    #[serde(skip)]
    pub file_tiers: Vec<Tier>,
}

/// A setting that could not be loaded or is out of range. Its `Display` is one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingsError(String);

impl fmt::Display for SettingsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration: {}", self.0)
    }
}

impl std::error::Error for SettingsError {}

impl SettingsError {
    /// A registry that could not be built (a provider refused its configuration).
    pub fn registry(problem: String) -> SettingsError {
        SettingsError(format!("GATEWAY_CONFIG: {problem}"))
    }
}

fn invalid(name: &str, problem: impl fmt::Display) -> SettingsError {
    SettingsError(format!("{}: {problem}", name.to_uppercase()))
}

impl Settings {
    /// Loads settings the way the binary does: defaults, `GATEWAY_CONFIG`, `./.env`, then
    /// the process environment.
    pub fn load() -> Result<Settings, SettingsError> {
        let env: HashMap<String, String> = std::env::vars().collect();
        let config_file = lookup(&env, "GATEWAY_CONFIG").map(PathBuf::from);
        Settings::from_sources(config_file.as_deref(), Some(Path::new(".env")), env)
    }

    /// Loads settings from explicit sources: an optional TOML file, an optional `.env`
    /// file (a missing one is fine), and an environment map that wins over both.
    pub fn from_sources(
        config_file: Option<&Path>,
        dotenv_file: Option<&Path>,
        env: HashMap<String, String>,
    ) -> Result<Settings, SettingsError> {
        let mut merged: HashMap<String, String> = HashMap::new();
        if let Some(path) = dotenv_file.filter(|p| p.exists()) {
            let entries = dotenvy::from_path_iter(path)
                .map_err(|e| SettingsError(format!("{}: {e}", path.display())))?;
            for entry in entries {
                let (key, value) =
                    entry.map_err(|e| SettingsError(format!("{}: {e}", path.display())))?;
                merged.insert(key.to_lowercase(), value);
            }
        }
        for (key, value) in env {
            merged.insert(key.to_lowercase(), value);
        }
        // Provider keys come from variables the registry names: read before the
        // environment is narrowed to our own settings.
        let (registry, file_tiers) = match config_file.filter(|p| p.exists()) {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    SettingsError::registry(format!("cannot read {}: {e}", path.display()))
                })?;
                (registry::parse(&text, &merged)?, tiers::parse(&text)?)
            }
            None => (None, Vec::new()),
        };
        // Only our own names are taken from the environment, so unrelated variables
        // (PATH, HOME, ...) can never be misread as settings.
        let known = known_keys()?;
        merged.retain(|key, _| known.iter().any(|k| k == key));

        let mut builder =
            Config::builder().add_source(File::from_str(DEFAULTS_TOML, FileFormat::Toml));
        if let Some(path) = config_file {
            if !path.exists() {
                return Err(invalid(
                    "GATEWAY_CONFIG",
                    format!("file {} does not exist", path.display()),
                ));
            }
            builder = builder.add_source(File::from(path).format(FileFormat::Toml));
        }
        let built = builder
            .add_source(
                Environment::default()
                    .source(Some(merged))
                    .try_parsing(true),
            )
            .build()
            .map_err(|e| SettingsError(e.to_string()))?;
        let mut settings: Settings = built
            .try_deserialize()
            .map_err(|e| SettingsError(e.to_string()))?;
        settings.registry = registry;
        settings.file_tiers = file_tiers;
        settings.validate()?;
        Ok(settings)
    }

    /// These settings as demo mode runs them (`llm-gateway --demo`): the embedded store
    /// instead of Redis, and every provider, the registry's included, at `upstream` (the
    /// simulator), with a placeholder key where one is needed and none is set. Keys,
    /// tiers, routes and limits stay as configured.
    pub fn for_demo(mut self, upstream: &str) -> Settings {
        use secrecy::ExposeSecret;
        let placeholder = || SecretString::from("demo");
        self.redis_url = "memory://".into();
        self.gemini_base_url = upstream.to_owned();
        self.ollama_base_url = upstream.to_owned();
        if self.gemini_api_key.expose_secret().is_empty() {
            self.gemini_api_key = placeholder();
        }
        if let Some(registry) = &mut self.registry {
            for provider in &mut registry.providers {
                provider.base_url = upstream.to_owned();
                if provider.api_key.expose_secret().is_empty() {
                    provider.api_key = placeholder();
                }
            }
        }
        self
    }

    /// Defaults overridden by the given pairs only (no files, no process environment).
    /// Tests and embedders use this.
    pub fn from_pairs(pairs: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        let env = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_sources(None, None, env)
    }

    fn validate(&self) -> Result<(), SettingsError> {
        if self.rate_limiter_capacity == 0 {
            return Err(invalid("rate_limiter_capacity", "must be at least 1"));
        }
        if !(self.rate_limiter_refill_rate.is_finite() && self.rate_limiter_refill_rate > 0.0) {
            return Err(invalid(
                "rate_limiter_refill_rate",
                "must be a number greater than 0",
            ));
        }
        if self.redis_timeout_ms == 0 {
            return Err(invalid("redis_timeout_ms", "must be at least 1"));
        }
        if !(self.provider_timeout_seconds.is_finite() && self.provider_timeout_seconds > 0.0) {
            return Err(invalid(
                "provider_timeout_seconds",
                "must be a number greater than 0",
            ));
        }
        if !(self.shutdown_grace_seconds.is_finite() && self.shutdown_grace_seconds >= 0.0) {
            return Err(invalid(
                "shutdown_grace_seconds",
                "must be a number of seconds, 0 or more",
            ));
        }
        if self.worker_threads > 1024 {
            return Err(invalid(
                "worker_threads",
                "must be at most 1024 (0 means one per CPU core)",
            ));
        }
        if !(self.provider_deadline_seconds.is_finite() && self.provider_deadline_seconds >= 0.0) {
            return Err(invalid(
                "provider_deadline_seconds",
                "must be a number of seconds, 0 or more",
            ));
        }
        if self.provider_breaker_threshold == 0 {
            return Err(invalid("provider_breaker_threshold", "must be at least 1"));
        }
        if !(self.provider_breaker_cooldown_seconds.is_finite()
            && self.provider_breaker_cooldown_seconds > 0.0)
        {
            return Err(invalid(
                "provider_breaker_cooldown_seconds",
                "must be a number of seconds greater than 0",
            ));
        }
        if self.provider_max_retries > 20 {
            return Err(invalid("provider_max_retries", "must be at most 20"));
        }
        for (name, value) in [
            ("max_connections", self.max_connections),
            ("max_concurrent_requests", self.max_concurrent_requests),
        ] {
            if value == 0 {
                return Err(invalid(name, "must be at least 1"));
            }
        }
        for (name, value) in [
            (
                "header_read_timeout_seconds",
                self.header_read_timeout_seconds,
            ),
            ("body_read_timeout_seconds", self.body_read_timeout_seconds),
            (
                "keep_alive_timeout_seconds",
                self.keep_alive_timeout_seconds,
            ),
            ("stream_keep_alive_seconds", self.stream_keep_alive_seconds),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return Err(invalid(name, "must be a number of seconds greater than 0"));
            }
        }
        if self.max_body_bytes == 0 {
            return Err(invalid("max_body_bytes", "must be at least 1"));
        }
        if self.provider_retry_max_ms < self.provider_retry_base_ms {
            return Err(invalid(
                "provider_retry_max_ms",
                "must not be below PROVIDER_RETRY_BASE_MS",
            ));
        }
        for (name, url) in [
            ("gemini_base_url", &self.gemini_base_url),
            ("ollama_base_url", &self.ollama_base_url),
        ] {
            let ok = reqwest::Url::parse(url)
                .map(|u| matches!(u.scheme(), "http" | "https"))
                .unwrap_or(false);
            if !ok {
                return Err(invalid(name, format!("'{url}' is not an http(s) URL")));
            }
        }
        if self.host.parse::<std::net::IpAddr>().is_err() && self.host != "localhost" {
            return Err(invalid(
                "host",
                format!("'{}' is not an IP address", self.host),
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log_level) {
            return Err(invalid("log_level", e));
        }
        self.store_url()?;
        self.tiers()?;
        self.key_tiers()?;
        self.trusted_proxy_nets()?;
        Ok(())
    }

    /// The tier definitions, by name.
    pub fn tiers(&self) -> Result<Vec<Tier>, SettingsError> {
        let mut tiers: Vec<Tier> = Vec::new();
        for (index, entry) in split_list(&self.rate_limiter_tiers).enumerate() {
            let bad = |why: &str| {
                invalid(
                    "rate_limiter_tiers",
                    format!("entry {} ('{entry}'): {why}", index + 1),
                )
            };
            let mut parts = entry.split(':').map(str::trim);
            let (Some(name), Some(capacity), Some(rate), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(bad("expected name:capacity:refill_rate"));
            };
            if !is_tier_name(name) {
                return Err(bad("the name may only hold letters, digits, '-' and '_'"));
            }
            let capacity: u64 = capacity
                .parse()
                .ok()
                .filter(|c| *c >= 1)
                .ok_or_else(|| bad("capacity must be a whole number of at least 1"))?;
            let refill_rate: f64 = rate
                .parse()
                .ok()
                .filter(|r: &f64| r.is_finite() && *r > 0.0)
                .ok_or_else(|| bad("refill_rate must be a number greater than 0"))?;
            if tiers.iter().any(|t| t.name == name) || name == "default" {
                return Err(bad("the name is used twice (or is the reserved 'default')"));
            }
            tiers.push(Tier {
                name: name.to_owned(),
                capacity,
                refill_rate,
                tokens_per_minute: None,
                token_budget: None,
                budget_period: None,
            });
        }
        for tier in &self.file_tiers {
            if tiers.iter().any(|t| t.name == tier.name) || tier.name == "default" {
                return Err(SettingsError::registry(format!(
                    "tier '{}' is defined twice (or is the reserved 'default')",
                    tier.name
                )));
            }
            tiers.push(tier.clone());
        }
        Ok(tiers)
    }

    /// Key-to-tier assignments. Errors never quote a key.
    pub fn key_tiers(&self) -> Result<Vec<(String, String)>, SettingsError> {
        use secrecy::ExposeSecret;
        let tiers = self.tiers()?;
        let keys = self.api_key_list();
        let mut assignments = Vec::new();
        for (index, entry) in split_list(self.api_key_tiers.expose_secret()).enumerate() {
            let bad = |why: String| invalid("api_key_tiers", format!("entry {}: {why}", index + 1));
            let Some((key, tier)) = entry.rsplit_once('=') else {
                return Err(bad("expected key=tier".into()));
            };
            let (key, tier) = (key.trim(), tier.trim());
            if !tiers.iter().any(|t| t.name == tier) {
                return Err(bad(format!(
                    "tier '{tier}' is not defined in RATE_LIMITER_TIERS"
                )));
            }
            if !keys.iter().any(|k| k == key) {
                return Err(bad("the key is not in API_KEYS".into()));
            }
            assignments.push((key.to_owned(), tier.to_owned()));
        }
        Ok(assignments)
    }

    /// The trusted proxy networks.
    pub fn trusted_proxy_nets(&self) -> Result<Vec<ipnet::IpNet>, SettingsError> {
        split_list(&self.trusted_proxies)
            .map(|entry| {
                entry
                    .parse::<ipnet::IpNet>()
                    .or_else(|_| entry.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        invalid(
                            "trusted_proxies",
                            format!("'{entry}' is not an IP address or CIDR network"),
                        )
                    })
            })
            .collect()
    }

    /// The configured client keys: comma-separated, each trimmed, empties dropped.
    pub fn api_key_list(&self) -> Vec<String> {
        use secrecy::ExposeSecret;
        self.api_keys
            .expose_secret()
            .split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Parses `REDIS_URL` into the store it names.
    pub fn store_url(&self) -> Result<StoreUrl, SettingsError> {
        parse_store_url(&self.redis_url)
    }

    /// Timeout of one provider attempt.
    pub fn provider_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.provider_timeout_seconds)
    }

    /// The bound on one request's time on upstreams: `PROVIDER_DEADLINE_SECONDS`, or
    /// when 0, the longest one provider's attempts and backoffs can take.
    pub fn provider_deadline(&self) -> Duration {
        if self.provider_deadline_seconds > 0.0 {
            return Duration::from_secs_f64(self.provider_deadline_seconds);
        }
        let retries = self.provider_max_retries;
        self.provider_timeout() * (retries + 1)
            + Duration::from_millis(self.provider_retry_max_ms) * retries
    }

    /// Bound on every Redis call (limiter and cache).
    pub fn redis_timeout(&self) -> Duration {
        Duration::from_millis(self.redis_timeout_ms)
    }

    /// Bound on the drain after a stop signal.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs_f64(self.shutdown_grace_seconds)
    }
}

/// A named bucket policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Tier {
    /// Name shown in `RateLimit-Policy`.
    pub name: String,
    /// Bucket size.
    pub capacity: u64,
    /// Tokens per second.
    pub refill_rate: f64,
    /// LLM tokens per minute; `None`: `RATE_LIMITER_TOKENS_PER_MINUTE`.
    pub tokens_per_minute: Option<u64>,
    /// LLM tokens per period; `None`: `RATE_LIMITER_TOKEN_BUDGET`.
    pub token_budget: Option<u64>,
    /// The budget's period; `None`: `RATE_LIMITER_TOKEN_BUDGET_PERIOD`.
    pub budget_period: Option<BudgetPeriod>,
}

/// Whether `name` can name a tier: letters, digits, `-` and `_` (so it is a safe token
/// in the `RateLimit` headers).
fn is_tier_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Comma-separated entries, trimmed, empties dropped.
fn split_list(list: &str) -> impl Iterator<Item = &str> {
    list.split(',').map(str::trim).filter(|e| !e.is_empty())
}

/// Every key of `config/default.toml` plus `gateway_config`.
fn known_keys() -> Result<Vec<String>, SettingsError> {
    let table: HashMap<String, config::Value> = Config::builder()
        .add_source(File::from_str(DEFAULTS_TOML, FileFormat::Toml))
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| SettingsError(format!("built-in defaults: {e}")))?;
    Ok(table.into_keys().collect())
}

/// Case-insensitive lookup in an environment map.
fn lookup<'a>(env: &'a HashMap<String, String>, name: &str) -> Option<&'a String> {
    env.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
        .filter(|v| !v.trim().is_empty())
}

fn parse_store_url(url: &str) -> Result<StoreUrl, SettingsError> {
    let url = url.trim();
    let scheme = url.split("://").next().unwrap_or_default().to_lowercase();
    match scheme.as_str() {
        "memory" => Ok(StoreUrl::Memory),
        "redis" | "rediss" => {
            redis::parse_redis_url(url)
                .ok_or_else(|| invalid("redis_url", "is not a valid redis:// URL"))?;
            Ok(StoreUrl::Redis(url.to_owned()))
        }
        "redis+cluster" | "rediss+cluster" => {
            let tls = scheme.starts_with("rediss");
            let rest = &url[scheme.len() + 3..];
            let (auth, hosts) = match rest.rsplit_once('@') {
                Some((auth, hosts)) => (format!("{auth}@"), hosts),
                None => (String::new(), rest),
            };
            let base = if tls { "rediss" } else { "redis" };
            let nodes: Vec<String> = hosts
                .trim_end_matches('/')
                .split(',')
                .map(str::trim)
                .filter(|h| !h.is_empty())
                .map(|h| format!("{base}://{auth}{h}"))
                .collect();
            if nodes.is_empty() {
                return Err(invalid("redis_url", "names no cluster node"));
            }
            for node in &nodes {
                redis::parse_redis_url(node).ok_or_else(|| {
                    invalid("redis_url", "a cluster node is not a valid host:port")
                })?;
            }
            Ok(StoreUrl::Cluster(nodes))
        }
        _ => Err(invalid(
            "redis_url",
            "must start with redis://, rediss://, redis+cluster:// or memory://",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn defaults_match_the_original_service() {
        let s = Settings::from_pairs(&[]).unwrap();
        assert_eq!(s.provider_timeout_seconds, 60.0);
        assert_eq!(s.provider_max_retries, 3);
        assert_eq!(s.cache_ttl_seconds, 60);
        assert_eq!(s.rate_limiter_capacity, 5);
        assert_eq!(s.rate_limiter_refill_rate, 1.0);
        assert_eq!(s.redis_url, "redis://127.0.0.1:6380/0");
        assert_eq!(s.gemini_api_key.expose_secret(), "");
        assert_eq!(s.ollama_base_url, "http://localhost:11434");
        assert_eq!(s.api_key_list(), vec!["sk-gateway-123"]);
        assert_eq!(s.port, 8000);
        assert_eq!(s.host, "0.0.0.0");
        assert_eq!(s.rate_limiter_failure_mode, FailureMode::Local);
        assert_eq!(s.max_body_bytes, 1024 * 1024);
    }

    #[test]
    fn environment_names_are_case_insensitive_and_fractions_accepted() {
        let s = Settings::from_pairs(&[
            ("rate_limiter_refill_rate", "0.5"),
            ("Cache_TTL_Seconds", "0"),
            ("API_KEYS", " a , ,b,"),
        ])
        .unwrap();
        assert_eq!(s.rate_limiter_refill_rate, 0.5);
        assert_eq!(s.cache_ttl_seconds, 0);
        assert_eq!(s.api_key_list(), vec!["a", "b"]);
    }

    #[test]
    fn numeric_looking_keys_stay_strings() {
        let s = Settings::from_pairs(&[("API_KEYS", "12345"), ("GEMINI_API_KEY", "42")]).unwrap();
        assert_eq!(s.api_key_list(), vec!["12345"]);
        assert_eq!(s.gemini_api_key.expose_secret(), "42");
    }

    #[test]
    fn bad_settings_name_the_setting_in_one_line() {
        let cases = [
            ("RATE_LIMITER_CAPACITY", "lots", "rate_limiter_capacity"),
            ("RATE_LIMITER_CAPACITY", "0", "RATE_LIMITER_CAPACITY"),
            ("RATE_LIMITER_REFILL_RATE", "-1", "RATE_LIMITER_REFILL_RATE"),
            (
                "RATE_LIMITER_FAILURE_MODE",
                "maybe",
                "rate_limiter_failure_mode",
            ),
            ("PORT", "99999", "port"),
            ("REDIS_URL", "mysql://x", "REDIS_URL"),
            ("OLLAMA_BASE_URL", "not a url", "OLLAMA_BASE_URL"),
            ("PROVIDER_TIMEOUT_SECONDS", "0", "PROVIDER_TIMEOUT_SECONDS"),
            ("WORKER_THREADS", "5000", "worker_threads"),
            ("WORKER_THREADS", "-1", "worker_threads"),
        ];
        for (name, value, expected) in cases {
            let err = Settings::from_pairs(&[(name, value)])
                .unwrap_err()
                .to_string();
            assert!(
                err.to_lowercase().contains(&expected.to_lowercase()),
                "{name}={value}: {err}"
            );
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn precedence_is_defaults_then_file_then_dotenv_then_environment() {
        let dir = tempfile::tempdir().unwrap();
        let toml = dir.path().join("gw.toml");
        std::fs::write(
            &toml,
            "rate_limiter_capacity = 7\ncache_ttl_seconds = 9\nport = 1\n",
        )
        .unwrap();
        let dotenv = dir.path().join(".env");
        std::fs::write(&dotenv, "CACHE_TTL_SECONDS=11\nPORT=2\n").unwrap();
        let env = HashMap::from([("PORT".to_string(), "3".to_string())]);
        let s = Settings::from_sources(Some(&toml), Some(&dotenv), env).unwrap();
        assert_eq!(s.rate_limiter_capacity, 7);
        assert_eq!(s.cache_ttl_seconds, 11);
        assert_eq!(s.port, 3);
    }

    #[test]
    fn tiers_and_key_assignments_parse_and_validate() {
        let s = Settings::from_pairs(&[
            ("API_KEYS", "sk-a,sk-b"),
            ("RATE_LIMITER_TIERS", "gold:100:10, free:5:0.5"),
            ("API_KEY_TIERS", "sk-a=gold"),
        ])
        .unwrap();
        assert_eq!(
            s.tiers().unwrap()[1],
            Tier {
                name: "free".into(),
                capacity: 5,
                refill_rate: 0.5,
                tokens_per_minute: None,
                token_budget: None,
                budget_period: None,
            }
        );
        assert_eq!(
            s.key_tiers().unwrap(),
            vec![("sk-a".to_string(), "gold".to_string())]
        );
        for (tiers, assignments) in [
            ("gold:0:1", ""),
            ("gold:1", ""),
            ("go ld:1:1", ""),
            ("gold:1:1,gold:2:2", ""),
            ("gold:1:1", "sk-a=silver"),
            ("gold:1:1", "sk-zzz-secret=gold"),
        ] {
            let err = Settings::from_pairs(&[
                ("API_KEYS", "sk-a"),
                ("RATE_LIMITER_TIERS", tiers),
                ("API_KEY_TIERS", assignments),
            ])
            .unwrap_err()
            .to_string();
            assert!(
                err.contains("RATE_LIMITER_TIERS") || err.contains("API_KEY_TIERS"),
                "{err}"
            );
            assert!(
                !err.contains("sk-zzz-secret"),
                "keys never appear in errors: {err}"
            );
        }
    }

    #[test]
    fn trusted_proxies_accept_addresses_and_networks() {
        let s = Settings::from_pairs(&[("TRUSTED_PROXIES", "10.0.0.0/8, 127.0.0.1,::1")]).unwrap();
        assert_eq!(s.trusted_proxy_nets().unwrap().len(), 3);
        assert!(Settings::from_pairs(&[("TRUSTED_PROXIES", "10.0.0.0/33")]).is_err());
    }

    #[test]
    fn store_urls_are_recognised() {
        assert_eq!(parse_store_url("memory://").unwrap(), StoreUrl::Memory);
        assert_eq!(
            parse_store_url("redis+cluster://a:1, b:2").unwrap(),
            StoreUrl::Cluster(vec!["redis://a:1".into(), "redis://b:2".into()])
        );
        assert!(matches!(
            parse_store_url("redis://127.0.0.1:6379/0").unwrap(),
            StoreUrl::Redis(_)
        ));
        assert!(parse_store_url("redis+cluster://").is_err());
    }
}
