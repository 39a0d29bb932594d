//! The Redis cache: `GET` and `SET ... EX` on the shared connection.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::AsyncCommands;

use super::{Cache, CacheError};
use crate::redis_conn::RedisConn;

/// Response bodies in Redis under their `cache:` keys.
pub struct RedisCache {
    conn: RedisConn,
    /// Bound on one cache call: a slow Redis must not slow answers down.
    timeout: Duration,
}

impl RedisCache {
    /// A cache on `conn` whose calls give up after `timeout`.
    pub fn new(conn: RedisConn, timeout: Duration) -> RedisCache {
        RedisCache { conn, timeout }
    }

    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, CacheError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result.map_err(|e| CacheError(e.to_string())),
            Err(_) => Err(CacheError("timed out".into())),
        }
    }
}

#[async_trait]
impl Cache for RedisCache {
    async fn get(&self, key: &str) -> Result<Option<Bytes>, CacheError> {
        let mut conn = self.conn.clone();
        let body: Option<Vec<u8>> = self.bounded(conn.get(key)).await?;
        Ok(body.map(Bytes::from))
    }

    async fn set(&self, key: &str, body: Bytes, ttl: Duration) -> Result<(), CacheError> {
        let mut conn = self.conn.clone();
        self.bounded(conn.set_ex::<_, _, ()>(key, body.as_ref(), ttl.as_secs().max(1)))
            .await
    }
}
