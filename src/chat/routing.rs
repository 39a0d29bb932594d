//! Which provider answers a request, and with which model.

use crate::domain::ChatRequest;

/// The providers the gateway can route to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProviderKind {
    /// Google Gemini `generateContent`.
    Gemini,
    /// Ollama `/api/chat`.
    Ollama,
}

impl ProviderKind {
    /// The name used in responses, metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Gemini => "gemini",
            ProviderKind::Ollama => "ollama",
        }
    }
}

/// Where the original's routing sends a request: the provider and the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyRoute {
    /// The provider.
    pub provider: ProviderKind,
    /// The model to ask the provider for.
    pub model: String,
}

/// Where a request went: the provider (by its registry name) and the model asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The provider's name.
    pub provider: &'static str,
    /// The model the provider was asked for.
    pub model: String,
}

const GEMINI_WORDS: [&str; 3] = ["online", "gemini", "fast"];
const OLLAMA_WORDS: [&str; 3] = ["ollama", "local", "secure"];

/// The model names to list (`/v1/models`): the routing words and the two default
/// models, each with the provider it goes to. Any other name is routed too (to Ollama,
/// as that model), but is not listed.
pub fn listed_models(gemini_model: &str, ollama_model: &str) -> Vec<(String, ProviderKind)> {
    let mut models: Vec<(String, ProviderKind)> = GEMINI_WORDS
        .iter()
        .map(|w| (w.to_string(), ProviderKind::Gemini))
        .chain(
            OLLAMA_WORDS
                .iter()
                .map(|w| (w.to_string(), ProviderKind::Ollama)),
        )
        .collect();
    for (model, kind) in [
        (gemini_model, ProviderKind::Gemini),
        (ollama_model, ProviderKind::Ollama),
    ] {
        if !models.iter().any(|(m, _)| m == model) {
            models.push((model.to_owned(), kind));
        }
    }
    models
}

fn non_empty(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// The model name a request routes by: `model`, else `model_hint` (the original door's),
/// trimmed; `None` when both are empty.
pub fn named_model(request: &ChatRequest) -> Option<&str> {
    non_empty(&request.model).or_else(|| non_empty(&request.model_hint))
}

/// Routes as the original did: `target = model or model_hint`; `online`/`gemini`/`fast`
/// go to Gemini, everything else to Ollama. Beyond it, a target starting with `gemini-`
/// goes to Gemini as that model, and a non-routing `model` is passed to Ollama.
/// Routing words are matched case-insensitively.
pub fn route(request: &ChatRequest, gemini_model: &str, ollama_model: &str) -> LegacyRoute {
    let model = non_empty(&request.model);
    let target = model
        .or_else(|| non_empty(&request.model_hint))
        .unwrap_or_default();
    let lower = target.to_ascii_lowercase();
    if GEMINI_WORDS.contains(&lower.as_str()) {
        return LegacyRoute {
            provider: ProviderKind::Gemini,
            model: gemini_model.to_owned(),
        };
    }
    if lower.starts_with("gemini-") {
        return LegacyRoute {
            provider: ProviderKind::Gemini,
            model: target.to_owned(),
        };
    }
    let explicit = model.filter(|m| !OLLAMA_WORDS.contains(&m.to_ascii_lowercase().as_str()));
    LegacyRoute {
        provider: ProviderKind::Ollama,
        model: explicit.unwrap_or(ollama_model).to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Message;

    fn req(model: Option<&str>, hint: Option<&str>) -> ChatRequest {
        ChatRequest {
            messages: vec![Message::text("user", "x")],
            model: model.map(Into::into),
            model_hint: hint.map(Into::into),
            max_tokens: Some(1),
            temperature: 0.0,
            stream: false,
            sampling: Default::default(),
            tools: Vec::new(),
            tool_choice: Default::default(),
            strict_model: false,
            passthrough: Default::default(),
        }
    }

    #[test]
    fn the_original_routing_table_holds() {
        let cases = [
            (None, None, ProviderKind::Ollama, "llama3.1"),
            (
                None,
                Some("online"),
                ProviderKind::Gemini,
                "gemini-2.5-flash",
            ),
            (
                None,
                Some("gemini"),
                ProviderKind::Gemini,
                "gemini-2.5-flash",
            ),
            (None, Some("fast"), ProviderKind::Gemini, "gemini-2.5-flash"),
            (None, Some("FAST"), ProviderKind::Gemini, "gemini-2.5-flash"),
            (None, Some("ollama"), ProviderKind::Ollama, "llama3.1"),
            (None, Some("local"), ProviderKind::Ollama, "llama3.1"),
            (None, Some("secure"), ProviderKind::Ollama, "llama3.1"),
            (None, Some("whatever"), ProviderKind::Ollama, "llama3.1"),
            (
                Some("fast"),
                Some("local"),
                ProviderKind::Gemini,
                "gemini-2.5-flash",
            ),
            (
                Some("local"),
                Some("fast"),
                ProviderKind::Ollama,
                "llama3.1",
            ),
            (
                Some(""),
                Some("fast"),
                ProviderKind::Gemini,
                "gemini-2.5-flash",
            ),
            (
                Some("mistral:7b"),
                Some("fast"),
                ProviderKind::Ollama,
                "mistral:7b",
            ),
            (
                Some("gemini-1.5-pro"),
                None,
                ProviderKind::Gemini,
                "gemini-1.5-pro",
            ),
        ];
        for (model, hint, provider, expected_model) in cases {
            let r = route(&req(model, hint), "gemini-2.5-flash", "llama3.1");
            assert_eq!(
                (r.provider, r.model.as_str()),
                (provider, expected_model),
                "{model:?} {hint:?}"
            );
        }
    }
}
