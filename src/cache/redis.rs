//! The Redis cache: `GET` and `SETEX` on the shared connection.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::{AsyncCommands, RedisResult, Value};

use super::pending::{PendingStores, RIDE_ALONG_MAX_BYTES, RIDE_ALONG_WAIT};
use super::{Cache, CacheError};
use crate::redis_conn::RedisConn;

/// Response bodies in Redis under their `cache:` keys.
pub struct RedisCache {
    conn: RedisConn,
    /// Bound on one cache call: a slow Redis must not slow answers down.
    timeout: Duration,
    /// Where stores wait for the limiter's next pipeline; `None` writes them at once.
    pending: Option<Arc<PendingStores>>,
}

impl RedisCache {
    /// A cache on `conn` whose calls give up after `timeout`. With `pending`, stores wait
    /// there for a limiter call to carry them (see `cache::pending`).
    pub fn new(
        conn: RedisConn,
        timeout: Duration,
        pending: Option<Arc<PendingStores>>,
    ) -> RedisCache {
        RedisCache {
            conn,
            timeout,
            pending,
        }
    }

    /// Queues the store and waits for its outcome. When no limiter call takes it within
    /// the wait, writes it (and whatever else waits) in a pipeline of its own.
    async fn store_along(
        &self,
        pending: &PendingStores,
        key: &str,
        body: Bytes,
        ttl_secs: u64,
    ) -> Result<(), CacheError> {
        let mut outcome = pending.push(key, body, ttl_secs);
        let outcome = match tokio::time::timeout(RIDE_ALONG_WAIT, &mut outcome).await {
            Ok(outcome) => outcome,
            Err(_) => {
                // Empty when a limiter call took this store just now; its outcome follows.
                let stores = pending.take();
                if !stores.is_empty() {
                    let mut pipe = redis::pipe();
                    stores.add_to(&mut pipe);
                    pipe.ignore_errors();
                    let mut conn = self.conn.connection();
                    let call = pipe.query_async::<Vec<RedisResult<Value>>>(&mut conn);
                    match self.bounded(call).await {
                        Ok(replies) => stores.finish(&mut replies.into_iter()),
                        Err(error) => stores.fail(&error.0),
                    }
                }
                outcome.await
            }
        };
        match outcome {
            Ok(result) => result.map_err(CacheError),
            Err(_) => Err(CacheError("lost with a failed Redis call".into())),
        }
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
        let mut conn = self.conn.connection();
        let body: Option<Vec<u8>> = self.bounded(conn.get(key)).await?;
        Ok(body.map(Bytes::from))
    }

    async fn set(&self, key: &str, body: Bytes, ttl: Duration) -> Result<(), CacheError> {
        let ttl_secs = ttl.as_secs().max(1);
        if let Some(pending) = self.pending.as_ref() {
            if body.len() <= RIDE_ALONG_MAX_BYTES {
                return self.store_along(pending, key, body, ttl_secs).await;
            }
        }
        let mut conn = self.conn.connection();
        self.bounded(conn.set_ex::<_, _, ()>(key, body.as_ref(), ttl_secs))
            .await
    }
}
