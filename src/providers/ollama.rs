//! Ollama: `POST {base}/api/chat` with `stream: false`.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use hyper::Uri;

use super::{json_body, Provider, ProviderError, UpstreamClient};
use crate::domain::{ChatRequest, Completion, Usage};

/// An Ollama server.
pub struct Ollama {
    client: UpstreamClient,
    /// Parsed once: parsing the URL on every call showed up in profiles.
    url: Uri,
}

impl Ollama {
    /// Ollama at `base_url`, e.g. `http://localhost:11434` (validated by settings).
    pub fn new(client: UpstreamClient, base_url: &str) -> Result<Ollama, String> {
        let url = format!("{}/api/chat", base_url.trim_end_matches('/'));
        let url = url
            .parse::<Uri>()
            .map_err(|e| format!("OLLAMA_BASE_URL: {e}"))?;
        Ok(Ollama { client, url })
    }
}

#[derive(Serialize)]
struct OllamaRequest<'a> {
    model: &'a str,
    messages: &'a [crate::domain::Message],
    stream: bool,
    options: OllamaOptions,
}

#[derive(Serialize)]
struct OllamaOptions {
    temperature: f64,
    num_predict: u64,
}

#[derive(Deserialize)]
struct OllamaReply {
    message: OllamaMessage,
    #[serde(default)]
    prompt_eval_count: u64,
    #[serde(default)]
    eval_count: u64,
}

#[derive(Deserialize)]
struct OllamaMessage {
    #[serde(default)]
    content: String,
}

#[async_trait]
impl Provider for Ollama {
    fn name(&self) -> &'static str {
        "ollama"
    }

    async fn complete(
        &self,
        request: &ChatRequest,
        model: &str,
    ) -> Result<Completion, ProviderError> {
        // Serialised straight from borrowed fields: no intermediate copy of the messages.
        let body = OllamaRequest {
            model,
            messages: &request.messages,
            stream: false,
            options: OllamaOptions {
                temperature: request.temperature,
                num_predict: request.max_tokens,
            },
        };
        let body = json_body(&body, request.json_size_hint())?;
        let reply: OllamaReply = self.client.post_json(&self.url, None, body).await?;
        Ok(Completion {
            content: reply.message.content,
            usage: Usage {
                prompt_tokens: reply.prompt_eval_count,
                completion_tokens: reply.eval_count,
                total_tokens: reply.prompt_eval_count + reply.eval_count,
            },
        })
    }
}
