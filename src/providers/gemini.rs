//! Gemini: `POST {base}/v1beta/models/{model}:generateContent` with `x-goog-api-key`.

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use hyper::header::HeaderName;
use hyper::Uri;

use super::{json_body, Provider, ProviderError, UpstreamClient};
use crate::domain::{ChatRequest, Completion, Usage};

/// The header that carries the API key.
const API_KEY_HEADER: HeaderName = HeaderName::from_static("x-goog-api-key");

/// The Gemini API.
pub struct Gemini {
    client: UpstreamClient,
    base_url: String,
    api_key: SecretString,
}

impl Gemini {
    /// Gemini at `base_url` with `api_key`.
    pub fn new(client: UpstreamClient, base_url: &str, api_key: SecretString) -> Gemini {
        Gemini {
            client,
            base_url: base_url.trim_end_matches('/').to_owned(),
            api_key,
        }
    }
}

/// Gemini's body for a chat, borrowing the message text (no copy of it).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GeminiRequest<'a> {
    contents: Vec<Turn<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_instruction: Option<Instruction<'a>>,
    generation_config: GenerationConfig,
}

#[derive(Serialize)]
struct Turn<'a> {
    role: &'static str,
    parts: [Text<'a>; 1],
}

#[derive(Serialize)]
struct Instruction<'a> {
    parts: Vec<Text<'a>>,
}

#[derive(Serialize)]
struct Text<'a> {
    text: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GenerationConfig {
    temperature: f64,
    max_output_tokens: u64,
}

/// Gemini's body for a chat: assistant turns become role `model`, system turns become
/// `systemInstruction`, everything else is a `user` turn.
pub fn request_body(request: &ChatRequest) -> GeminiRequest<'_> {
    let mut system = Vec::new();
    let mut contents = Vec::new();
    for message in &request.messages {
        let text = Text {
            text: &message.content,
        };
        match message.role.as_str() {
            "system" => system.push(text),
            role => contents.push(Turn {
                role: if role == "assistant" || role == "model" {
                    "model"
                } else {
                    "user"
                },
                parts: [text],
            }),
        }
    }
    GeminiRequest {
        contents,
        system_instruction: (!system.is_empty()).then_some(Instruction { parts: system }),
        generation_config: GenerationConfig {
            temperature: request.temperature,
            max_output_tokens: request.max_tokens,
        },
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GeminiReply {
    #[serde(default)]
    candidates: Vec<Candidate>,
    #[serde(default)]
    usage_metadata: UsageMetadata,
}

#[derive(Deserialize)]
struct Candidate {
    #[serde(default)]
    content: Option<CandidateContent>,
}

#[derive(Deserialize)]
struct CandidateContent {
    #[serde(default)]
    parts: Vec<Part>,
}

#[derive(Deserialize)]
struct Part {
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct UsageMetadata {
    #[serde(default)]
    prompt_token_count: u64,
    #[serde(default)]
    candidates_token_count: u64,
    #[serde(default)]
    total_token_count: u64,
}

#[async_trait]
impl Provider for Gemini {
    fn name(&self) -> &'static str {
        "gemini"
    }

    async fn complete(
        &self,
        request: &ChatRequest,
        model: &str,
    ) -> Result<Completion, ProviderError> {
        let key = self.api_key.expose_secret();
        if key.is_empty() {
            return Err(ProviderError::NotConfigured("GEMINI_API_KEY is empty"));
        }
        // Model names are path segments; reject anything that could change the path.
        if model.is_empty()
            || !model
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
        {
            return Err(ProviderError::Invalid(
                "model name is not a Gemini model id".into(),
            ));
        }
        let url = format!("{}/v1beta/models/{model}:generateContent", self.base_url)
            .parse::<Uri>()
            .map_err(|_| ProviderError::NotConfigured("GEMINI_BASE_URL is not a valid URL"))?;
        let body = json_body(&request_body(request), request.json_size_hint())?;
        let reply: GeminiReply = self
            .client
            .post_json(&url, Some((API_KEY_HEADER, key)), body)
            .await?;
        let content: String = reply
            .candidates
            .into_iter()
            .next()
            .and_then(|c| c.content)
            .map(|c| c.parts.into_iter().filter_map(|p| p.text).collect())
            .unwrap_or_default();
        let usage = reply.usage_metadata;
        let total = if usage.total_token_count > 0 {
            usage.total_token_count
        } else {
            usage.prompt_token_count + usage.candidates_token_count
        };
        Ok(Completion {
            content,
            usage: Usage {
                prompt_tokens: usage.prompt_token_count,
                completion_tokens: usage.candidates_token_count,
                total_tokens: total,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Message;

    #[test]
    fn roles_map_to_gemini_turns_and_system_instruction() {
        let request = ChatRequest {
            messages: vec![
                Message {
                    role: "system".into(),
                    content: "be brief".into(),
                },
                Message {
                    role: "user".into(),
                    content: "hi".into(),
                },
                Message {
                    role: "assistant".into(),
                    content: "hello".into(),
                },
            ],
            model: None,
            model_hint: None,
            max_tokens: 32,
            temperature: 0.5,
            stream: false,
        };
        assert_eq!(
            serde_json::to_value(request_body(&request)).unwrap(),
            serde_json::json!({
                "contents": [
                    {"role": "user", "parts": [{"text": "hi"}]},
                    {"role": "model", "parts": [{"text": "hello"}]},
                ],
                "systemInstruction": {"parts": [{"text": "be brief"}]},
                "generationConfig": {"temperature": 0.5, "maxOutputTokens": 32},
            })
        );
    }
}
