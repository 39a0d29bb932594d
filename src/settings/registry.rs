//! The provider registry's configuration: the `[providers.*]` and `[routes.*]` tables of
//! the `GATEWAY_CONFIG` file (read with `toml` itself, as route names such as
//! `"llama3.1"` hold dots that the settings loader would read as paths), validated with
//! every error one line naming what is wrong, and each provider's key taken from the
//! environment variable the file names (never from the file).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use secrecy::SecretString;
use serde::Deserialize;

use super::SettingsError;

/// The API an upstream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKindConfig {
    /// Ollama's `/api/chat`.
    Ollama,
    /// Google's Gemini API.
    Gemini,
    /// Any OpenAI-compatible `/v1/chat/completions` (OpenAI, vLLM, Groq, LM Studio, Azure).
    Openai,
    /// Anthropic's `/v1/messages`.
    Anthropic,
}

/// One provider as the file describes it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderFile {
    kind: ProviderKindConfig,
    base_url: String,
    #[serde(default)]
    api_key_env: Option<String>,
    #[serde(default)]
    timeout_seconds: Option<f64>,
    #[serde(default)]
    max_retries: Option<u32>,
    /// Extra headers on every call (e.g. Azure's `api-version` needs none; OpenRouter's
    /// `HTTP-Referer` does). Values are not secrets: keys go through `api_key_env`.
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteFile {
    #[serde(default)]
    aliases: Vec<String>,
    #[serde(default)]
    targets: Vec<TargetFile>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetFile {
    provider: String,
    model: String,
    #[serde(default = "one")]
    weight: u32,
    #[serde(default)]
    priority: u32,
}

fn one() -> u32 {
    1
}

/// The two tables, the rest of the file being settings.
#[derive(Debug, Default, Deserialize)]
struct RegistryFile {
    #[serde(default)]
    providers: BTreeMap<String, ProviderFile>,
    #[serde(default)]
    routes: BTreeMap<String, RouteFile>,
}

/// A validated provider, its key read.
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    /// Its name: the metrics label, logs, the `provider` of answers.
    pub name: String,
    /// The API it speaks.
    pub kind: ProviderKindConfig,
    /// Where it is.
    pub base_url: String,
    /// Its key, from the variable the file names; empty without one.
    pub api_key: SecretString,
    /// Timeout of one attempt, when not the default.
    pub timeout_seconds: Option<f64>,
    /// Retries after the first attempt, when not the default.
    pub max_retries: Option<u32>,
    /// Extra headers on every call.
    pub headers: Vec<(String, String)>,
}

/// One target of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetConfig {
    /// The provider's name.
    pub provider: String,
    /// The model to ask it for.
    pub model: String,
    /// Its share of its priority group's traffic.
    pub weight: u32,
    /// Its group: 0 first, then 1, ...
    pub priority: u32,
}

/// A validated route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// The model name clients send.
    pub name: String,
    /// Other names for it.
    pub aliases: Vec<String>,
    /// Its targets (at least one).
    pub targets: Vec<TargetConfig>,
}

/// The registry: providers by name, and routes.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// The providers, by name order.
    pub providers: Vec<ProviderConfig>,
    /// The routes, by name order.
    pub routes: Vec<RouteConfig>,
}

fn invalid(problem: impl std::fmt::Display) -> SettingsError {
    SettingsError(format!("GATEWAY_CONFIG: {problem}"))
}

/// The registry of the file at `path`, with keys from `env`; `None` when the file has
/// neither providers nor routes (the original's settings then build the default one).
pub fn load(
    path: &Path,
    env: &HashMap<String, String>,
) -> Result<Option<RegistryConfig>, SettingsError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?;
    parse(&text, env)
}

/// The registry of a file's text (see [`load`]).
pub fn parse(
    text: &str,
    env: &HashMap<String, String>,
) -> Result<Option<RegistryConfig>, SettingsError> {
    let file: RegistryFile = toml::from_str(text).map_err(|e| {
        // toml's message spans several lines (it quotes the source); the first says it.
        let message = e
            .message()
            .lines()
            .next()
            .unwrap_or("not valid TOML")
            .to_owned();
        invalid(message)
    })?;
    if file.providers.is_empty() && file.routes.is_empty() {
        return Ok(None);
    }
    let mut providers = Vec::new();
    for (name, provider) in file.providers {
        providers.push(provider_config(name, provider, env)?);
    }
    let known: HashSet<&str> = providers.iter().map(|p| p.name.as_str()).collect();
    let mut names: HashSet<String> = HashSet::new();
    let mut routes = Vec::new();
    for (name, route) in file.routes {
        if route.targets.is_empty() {
            return Err(invalid(format!("route '{name}' has no targets")));
        }
        for target in &route.targets {
            if !known.contains(target.provider.as_str()) {
                return Err(invalid(format!(
                    "route '{name}' names an unknown provider '{}'",
                    target.provider
                )));
            }
            if target.model.trim().is_empty() {
                return Err(invalid(format!(
                    "route '{name}' has a target without a model"
                )));
            }
            if target.weight == 0 {
                return Err(invalid(format!(
                    "route '{name}': a target's weight must be at least 1"
                )));
            }
        }
        for alias in std::iter::once(&name).chain(&route.aliases) {
            if alias.trim().is_empty() {
                return Err(invalid(format!(
                    "route '{name}' has an empty name or alias"
                )));
            }
            if !names.insert(alias.clone()) {
                return Err(invalid(format!("the model name '{alias}' is given twice")));
            }
        }
        routes.push(RouteConfig {
            name,
            aliases: route.aliases,
            targets: route
                .targets
                .into_iter()
                .map(|t| TargetConfig {
                    provider: t.provider,
                    model: t.model,
                    weight: t.weight,
                    priority: t.priority,
                })
                .collect(),
        });
    }
    if routes.is_empty() {
        return Err(invalid("providers are given but no [routes.\"<model>\"]"));
    }
    Ok(Some(RegistryConfig { providers, routes }))
}

fn provider_config(
    name: String,
    file: ProviderFile,
    env: &HashMap<String, String>,
) -> Result<ProviderConfig, SettingsError> {
    let url_ok = reqwest::Url::parse(&file.base_url)
        .map(|u| matches!(u.scheme(), "http" | "https"))
        .unwrap_or(false);
    if !url_ok {
        return Err(invalid(format!(
            "provider '{name}': base_url '{}' is not an http(s) URL",
            file.base_url
        )));
    }
    if let Some(timeout) = file.timeout_seconds {
        if !(timeout.is_finite() && timeout > 0.0) {
            return Err(invalid(format!(
                "provider '{name}': timeout_seconds must be greater than 0"
            )));
        }
    }
    if file.max_retries.is_some_and(|r| r > 20) {
        return Err(invalid(format!(
            "provider '{name}': max_retries must be at most 20"
        )));
    }
    let api_key = match &file.api_key_env {
        Some(variable) => match env
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(variable))
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
        {
            Some(key) => SecretString::from(key.to_owned()),
            None => {
                return Err(invalid(format!(
                    "provider '{name}': the key variable {variable} is not set"
                )))
            }
        },
        None => SecretString::from(String::new()),
    };
    for (header, value) in &file.headers {
        let ok = hyper::header::HeaderName::from_bytes(header.as_bytes()).is_ok()
            && hyper::header::HeaderValue::from_str(value).is_ok();
        if !ok {
            return Err(invalid(format!(
                "provider '{name}': header '{header}' is not a valid HTTP header"
            )));
        }
    }
    Ok(ProviderConfig {
        name,
        kind: file.kind,
        base_url: file.base_url,
        api_key,
        timeout_seconds: file.timeout_seconds,
        max_retries: file.max_retries,
        headers: file.headers.into_iter().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
        port = 8000
        [providers.local]
        kind = "ollama"
        base_url = "http://127.0.0.1:11434"
        [providers.openai]
        kind = "openai"
        base_url = "https://api.openai.com"
        api_key_env = "OPENAI_KEY"
        timeout_seconds = 30
        headers = { "OpenAI-Organization" = "org-1" }
        [routes."gpt-4o"]
        aliases = ["smart"]
        targets = [
          { provider = "openai", model = "gpt-4o", weight = 3 },
          { provider = "local", model = "llama3.1", priority = 1 },
        ]
    "#;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_contracts_shape_parses_with_the_key_from_its_variable() {
        use secrecy::ExposeSecret;
        let registry = parse(FILE, &env(&[("OPENAI_KEY", "sk-up")]))
            .unwrap()
            .unwrap();
        let openai = &registry.providers[1];
        assert_eq!(openai.name, "openai");
        assert_eq!(openai.api_key.expose_secret(), "sk-up");
        assert_eq!(
            openai.headers,
            [("OpenAI-Organization".into(), "org-1".into())]
        );
        assert_eq!(
            registry.routes[0],
            RouteConfig {
                name: "gpt-4o".into(),
                aliases: vec!["smart".into()],
                targets: vec![
                    TargetConfig {
                        provider: "openai".into(),
                        model: "gpt-4o".into(),
                        weight: 3,
                        priority: 0
                    },
                    TargetConfig {
                        provider: "local".into(),
                        model: "llama3.1".into(),
                        weight: 1,
                        priority: 1
                    },
                ],
            }
        );
        assert!(
            parse("port = 1", &env(&[])).unwrap().is_none(),
            "no registry"
        );
    }

    #[test]
    fn each_mistake_is_one_line_naming_it() {
        let key = env(&[("OPENAI_KEY", "sk-up")]);
        for (text, env, expected) in [
            (
                FILE.to_owned(),
                env(&[]),
                "the key variable OPENAI_KEY is not set",
            ),
            (
                FILE.replace("provider = \"local\"", "provider = \"nope\""),
                key.clone(),
                "unknown provider 'nope'",
            ),
            (
                FILE.replace("kind = \"ollama\"", "kind = \"bard\""),
                key.clone(),
                "unknown variant",
            ),
            (
                format!("{FILE}\n[routes.empty]\ntargets = []"),
                key.clone(),
                "route 'empty' has no targets",
            ),
            (
                format!(
                    "{FILE}\n[routes.smart]\ntargets = [{{ provider = \"local\", model = \"m\" }}]"
                ),
                key.clone(),
                "'smart' is given twice",
            ),
            (
                FILE.replace("weight = 3", "weight = 0"),
                key.clone(),
                "weight must be at least 1",
            ),
            (
                FILE.replace("https://api.openai.com", "ftp://x"),
                key.clone(),
                "not an http(s) URL",
            ),
        ] {
            let error = parse(&text, &env).unwrap_err().to_string();
            assert!(error.contains(expected), "{error}");
            assert!(!error.contains('\n'), "one line: {error}");
            assert!(!error.contains("sk-up"), "no key in errors");
        }
    }
}
