//! The response cache: the `Cache` trait, its key, and its two stores.
//!
//! A cache failure is never a failed request: callers treat errors as misses.

pub mod memory;
pub mod redis;

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::domain::{ChatRequest, ResponseFormat, ToolChoice};

/// Why a cache call failed; callers count it and carry on as a miss.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CacheError(pub String);

/// A store of response bodies with a time to live.
#[async_trait]
pub trait Cache: Send + Sync {
    /// The stored body for `key`, if any.
    async fn get(&self, key: &str) -> Result<Option<Bytes>, CacheError>;
    /// Stores `body` under `key` for `ttl`.
    async fn set(&self, key: &str, body: Bytes, ttl: Duration) -> Result<(), CacheError>;
}

/// The cache key: `cache:` + SHA-256 over the fields that shape the answer, each
/// length-prefixed so that no field boundary can be forged, in a fixed order. Only
/// `role` and `content` of each message count, so unknown fields cannot split or merge
/// entries. Hashing the raw text instead of a JSON rendering of it skips escaping every
/// byte, which was about a third of the gateway's CPU time on 64 KB bodies.
pub fn cache_key(request: &ChatRequest) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"chat/v2");
    hasher.update((request.messages.len() as u64).to_le_bytes());
    for message in &request.messages {
        hash_text(&mut hasher, Some(&message.role));
        hash_text(&mut hasher, Some(&message.content));
    }
    hash_text(&mut hasher, request.model.as_deref());
    hash_text(&mut hasher, request.model_hint.as_deref());
    // The original door always sets it (512 by default), as the key always had.
    hasher.update(request.max_tokens.unwrap_or(0).to_le_bytes());
    // 0.0 and -0.0 are the same temperature.
    let temperature = if request.temperature == 0.0 {
        0.0
    } else {
        request.temperature
    };
    hasher.update(temperature.to_bits().to_le_bytes());
    KeyHasher(hasher).finish()
}

/// The cache key of a door other than the original: `namespace` (the door's, so no two
/// doors' keys meet; each stores its own rendering) and every field of the request that
/// reaches an upstream, length-prefixed in a fixed order, as [`cache_key`] does. What the
/// door read only to frame its answer (`stream`, usage options, end-user ids) is not in
/// the request, so it is not in the key; two bodies that ask the same (content as a
/// string or as text parts, `max_tokens` or `max_completion_tokens`) share an entry.
pub fn request_key(namespace: &str, request: &ChatRequest) -> String {
    let mut key = KeyHasher::new(namespace);
    let hasher = &mut key.0;
    hasher.update((request.messages.len() as u64).to_le_bytes());
    for message in &request.messages {
        hash_text(hasher, Some(&message.role));
        hash_text(hasher, Some(&message.content));
        hasher.update((message.tool_calls.len() as u64).to_le_bytes());
        for call in &message.tool_calls {
            hash_text(hasher, Some(&call.id));
            hash_text(hasher, Some(&call.name));
            hash_text(hasher, Some(&call.arguments));
        }
        match &message.tool_result {
            None => hasher.update([0u8]),
            Some(result) => {
                hasher.update([1u8 + u8::from(result.is_error)]);
                hash_text(hasher, Some(&result.call_id));
                hash_text(hasher, Some(&result.name));
            }
        }
    }
    hash_text(hasher, request.model.as_deref());
    hash_text(hasher, request.model_hint.as_deref());
    hash_number(hasher, request.max_tokens.map(|n| n as f64));
    hash_number(hasher, Some(request.temperature));
    let sampling = &request.sampling;
    hash_number(hasher, sampling.top_p);
    hash_number(hasher, sampling.top_k.map(|k| k as f64));
    hasher.update((sampling.stop.len() as u64).to_le_bytes());
    for stop in &sampling.stop {
        hash_text(hasher, Some(stop));
    }
    hash_text(hasher, sampling.seed.map(|s| s.to_string()).as_deref());
    hash_number(hasher, sampling.presence_penalty);
    hash_number(hasher, sampling.frequency_penalty);
    match &sampling.response_format {
        ResponseFormat::Text => hasher.update([0u8]),
        ResponseFormat::JsonObject => hasher.update([1u8]),
        ResponseFormat::JsonSchema(schema) => {
            hasher.update([2u8]);
            // serde_json's maps keep their keys sorted: one schema, one rendering.
            hash_text(hasher, Some(&schema.to_string()));
        }
    }
    hasher.update((request.tools.len() as u64).to_le_bytes());
    for tool in &request.tools {
        hash_text(hasher, Some(&tool.name));
        hash_text(hasher, tool.description.as_deref());
        hash_text(
            hasher,
            tool.parameters.as_ref().map(|p| p.to_string()).as_deref(),
        );
        hasher.update([u8::from(tool.strict)]);
    }
    // serde_json's maps keep their keys sorted: one body, one rendering. Nearly every
    // request has none, and rendering an empty map cost two allocations per request.
    hasher.update((request.passthrough.len() as u64).to_le_bytes());
    for (name, value) in &request.passthrough {
        hash_text(hasher, Some(name));
        hash_text(hasher, Some(&value.to_string()));
    }
    match &request.tool_choice {
        ToolChoice::Auto => hasher.update([0u8]),
        ToolChoice::None => hasher.update([1u8]),
        ToolChoice::Required => hasher.update([2u8]),
        ToolChoice::Function(name) => {
            hasher.update([3u8]);
            hash_text(hasher, Some(name));
        }
    }
    key.finish()
}

/// An optional number as a presence byte and its bits (0.0 and -0.0 are one value).
fn hash_number(hasher: &mut Sha256, number: Option<f64>) {
    match number {
        None => hasher.update([0u8]),
        Some(n) => {
            hasher.update([1u8]);
            hasher.update((if n == 0.0 { 0.0f64 } else { n }).to_bits().to_le_bytes());
        }
    }
}

/// A cache key being hashed: `cache:` and the hex SHA-256 of what is fed into it.
struct KeyHasher(Sha256);

impl KeyHasher {
    /// A key in `namespace`, so no two doors' keys can meet.
    fn new(namespace: &str) -> KeyHasher {
        let mut hasher = Sha256::new();
        hash_text(&mut hasher, Some(namespace));
        KeyHasher(hasher)
    }

    /// The key.
    fn finish(self) -> String {
        // Into a buffer on the stack: `hex::encode` builds its string through a char
        // iterator and `format!` copies it again, ~2.5k instructions per request
        // (callgrind).
        let mut hex = [0u8; 64];
        let mut key = String::with_capacity(6 + 64);
        key.push_str("cache:");
        if hex::encode_to_slice(self.0.finalize(), &mut hex).is_ok() {
            key.push_str(std::str::from_utf8(&hex).unwrap_or_default());
        }
        key
    }
}

/// An optional string as a presence byte, then its length and bytes.
fn hash_text(hasher: &mut Sha256, text: Option<&str>) {
    match text {
        None => hasher.update([0u8]),
        Some(text) => {
            hasher.update([1u8]);
            hasher.update((text.len() as u64).to_le_bytes());
            hasher.update(text.as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Message;

    fn request() -> ChatRequest {
        ChatRequest {
            messages: vec![Message::text("user", "hello")],
            model: None,
            model_hint: None,
            max_tokens: Some(512),
            temperature: 0.7,
            stream: false,
            sampling: Default::default(),
            tools: Vec::new(),
            tool_choice: Default::default(),
            strict_model: false,
            passthrough: Default::default(),
        }
    }

    #[test]
    fn every_answer_shaping_field_changes_the_key() {
        let base = cache_key(&request());
        assert!(base.starts_with("cache:"));
        assert_eq!(base.len(), "cache:".len() + 64);
        assert!(base["cache:".len()..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_eq!(base, cache_key(&request()));
        let variants = [
            ChatRequest {
                model: Some("llama3".into()),
                ..request()
            },
            ChatRequest {
                model_hint: Some("fast".into()),
                ..request()
            },
            ChatRequest {
                max_tokens: Some(10),
                ..request()
            },
            ChatRequest {
                temperature: 0.2,
                ..request()
            },
            ChatRequest {
                messages: vec![Message::text("system", "hello")],
                ..request()
            },
        ];
        for v in variants {
            assert_ne!(cache_key(&v), base);
        }
        // `stream` does not change the answer, so it does not change the key.
        assert_eq!(
            cache_key(&ChatRequest {
                stream: true,
                ..request()
            }),
            base
        );
    }

    #[test]
    fn field_boundaries_cannot_be_forged() {
        let a = ChatRequest {
            messages: vec![Message::text("user", "a\",\"b")],
            ..request()
        };
        let b = ChatRequest {
            messages: vec![Message::text("user", "a"), Message::text("b", "")],
            ..request()
        };
        assert_ne!(cache_key(&a), cache_key(&b));
        // The same text in the other optional field, or an empty one instead of none.
        let model = ChatRequest {
            model: Some("x".into()),
            ..request()
        };
        let hint = ChatRequest {
            model_hint: Some("x".into()),
            ..request()
        };
        let empty = ChatRequest {
            model: Some(String::new()),
            ..request()
        };
        assert_ne!(cache_key(&model), cache_key(&hint));
        assert_ne!(cache_key(&empty), cache_key(&request()));
        // Text moved from one message's content into the next one's role.
        let split = |first: &str, second_role: &str| ChatRequest {
            messages: vec![
                Message::text("user", first),
                Message::text(second_role, "c"),
            ],
            ..request()
        };
        assert_ne!(
            cache_key(&split("ab", "user")),
            cache_key(&split("a", "buser"))
        );
    }
}
