//! The response cache: the `Cache` trait, its key, and its two stores.
//!
//! A cache failure is never a failed request: callers treat errors as misses.

pub mod memory;
pub mod redis;

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::api::schemas::ChatRequest;

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

/// The cache key: `cache:` + SHA-256 over a canonical JSON form of the fields that shape
/// the answer. Field order is fixed by the struct, and only `role` and `content` of each
/// message count, so unknown fields cannot split or merge entries.
pub fn cache_key(request: &ChatRequest) -> String {
    #[derive(serde::Serialize)]
    struct Canonical<'a> {
        messages: Vec<(&'a str, &'a str)>,
        model: Option<&'a str>,
        model_hint: Option<&'a str>,
        max_tokens: u64,
        temperature: f64,
    }
    let canonical = Canonical {
        messages: request
            .messages
            .iter()
            .map(|m| (m.role.as_str(), m.content.as_str()))
            .collect(),
        model: request.model.as_deref(),
        model_hint: request.model_hint.as_deref(),
        max_tokens: request.max_tokens,
        temperature: request.temperature,
    };
    let mut hasher = Sha256::new();
    // Serialising plain strings and numbers into a hasher cannot fail.
    let _ = serde_json::to_writer(HashWriter(&mut hasher), &canonical);
    format!("cache:{}", hex::encode(hasher.finalize()))
}

/// Streams serde_json output straight into the hasher, so large bodies are not copied.
struct HashWriter<'a>(&'a mut Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::schemas::Message;

    fn request() -> ChatRequest {
        ChatRequest {
            messages: vec![Message {
                role: "user".into(),
                content: "hello".into(),
            }],
            model: None,
            model_hint: None,
            max_tokens: 512,
            temperature: 0.7,
            stream: false,
        }
    }

    #[test]
    fn every_answer_shaping_field_changes_the_key() {
        let base = cache_key(&request());
        assert!(base.starts_with("cache:"));
        assert_eq!(base.len(), "cache:".len() + 64);
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
                max_tokens: 10,
                ..request()
            },
            ChatRequest {
                temperature: 0.2,
                ..request()
            },
            ChatRequest {
                messages: vec![Message {
                    role: "system".into(),
                    content: "hello".into(),
                }],
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
            messages: vec![Message {
                role: "user".into(),
                content: "a\",\"b".into(),
            }],
            ..request()
        };
        let b = ChatRequest {
            messages: vec![
                Message {
                    role: "user".into(),
                    content: "a".into(),
                },
                Message {
                    role: "b".into(),
                    content: "".into(),
                },
            ],
            ..request()
        };
        assert_ne!(cache_key(&a), cache_key(&b));
    }
}
