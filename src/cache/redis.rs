//! The Redis cache: `GET`, and `SETEX` written soon after the answer has gone (see
//! `serve::redis::RedisConn::write_soon`).

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::AsyncCommands;

use super::{Cache, CacheError};
use crate::serve::redis::RedisConn;

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
}

#[async_trait]
impl Cache for RedisCache {
    async fn get(&self, key: &str) -> Result<Option<Bytes>, CacheError> {
        let mut conn = self.conn.connection();
        match tokio::time::timeout(self.timeout, conn.get::<_, Option<Vec<u8>>>(key)).await {
            Ok(Ok(body)) => Ok(body.map(Bytes::from)),
            Ok(Err(error)) => Err(CacheError(error.to_string())),
            Err(_) => Err(CacheError("timed out".into())),
        }
    }

    async fn set(&self, key: &str, body: Bytes, ttl: Duration) -> Result<(), CacheError> {
        let mut setex = redis::cmd("SETEX");
        setex.arg(key).arg(ttl.as_secs().max(1)).arg(body.as_ref());
        self.conn
            .write_soon(setex, body.len(), self.timeout)
            .await
            .map_err(CacheError)
    }
}
