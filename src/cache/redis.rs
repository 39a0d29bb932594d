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
}

impl RedisCache {
    /// A cache on `conn`.
    pub fn new(conn: RedisConn) -> RedisCache {
        RedisCache { conn }
    }
}

#[async_trait]
impl Cache for RedisCache {
    async fn get(&self, key: &str) -> Result<Option<Bytes>, CacheError> {
        let mut conn = self.conn.clone();
        let body: Option<Vec<u8>> = conn.get(key).await.map_err(|e| CacheError(e.to_string()))?;
        Ok(body.map(Bytes::from))
    }

    async fn set(&self, key: &str, body: Bytes, ttl: Duration) -> Result<(), CacheError> {
        let mut conn = self.conn.clone();
        conn.set_ex::<_, _, ()>(key, body.as_ref(), ttl.as_secs().max(1))
            .await
            .map_err(|e| CacheError(e.to_string()))
    }
}
