//! The Redis backend: the token-bucket script called with EVALSHA, reloaded on NOSCRIPT.

use async_trait::async_trait;
use redis::{ErrorKind, RedisError, ServerErrorKind};

use super::{BackendError, BucketPolicy, Decision, LimiterBackend};
use crate::metrics::Metrics;
use crate::redis_conn::RedisConn;

/// The token-bucket script; see the file for its contract.
pub const TOKEN_BUCKET_LUA: &str = include_str!("token_bucket.lua");

/// Calls the token-bucket script on the shared connection.
pub struct RedisLimiter {
    conn: RedisConn,
    /// SHA1 of the script, computed once.
    sha: String,
    metrics: Metrics,
}

impl RedisLimiter {
    /// A limiter on `conn`.
    pub fn new(conn: RedisConn, metrics: Metrics) -> RedisLimiter {
        RedisLimiter {
            conn,
            sha: redis::Script::new(TOKEN_BUCKET_LUA).get_hash().to_owned(),
            metrics,
        }
    }

    fn invocation(
        &self,
        command: &str,
        script: &str,
        key: &str,
        policy: &BucketPolicy,
    ) -> redis::Cmd {
        let mut cmd = redis::cmd(command);
        cmd.arg(script)
            .arg(1)
            .arg(key)
            .arg(policy.capacity)
            .arg(policy.refill_rate)
            .arg(1);
        cmd
    }
}

fn is_noscript(error: &RedisError) -> bool {
    error.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}

fn backend_error(error: RedisError) -> BackendError {
    if error.is_timeout() {
        BackendError::Timeout
    } else {
        BackendError::Redis(error.to_string())
    }
}

#[async_trait]
impl LimiterBackend for RedisLimiter {
    async fn check(&self, key: &str, policy: &BucketPolicy) -> Result<Decision, BackendError> {
        let mut conn = self.conn.clone();
        let evalsha = self.invocation("EVALSHA", &self.sha, key, policy);
        let reply: Result<(i64, i64, i64, i64), RedisError> = evalsha.query_async(&mut conn).await;
        let (allowed, milli_tokens, reset_ms, retry_ms) = match reply {
            Ok(reply) => reply,
            Err(error) if is_noscript(&error) => {
                // Redis restarted or SCRIPT FLUSH ran. EVAL runs the script and caches it
                // again on the node that owns the key, so this works node by node on a
                // cluster without needing every node to be up.
                self.metrics.limiter_script_reloads.inc();
                tracing::info!("rate limiter script missing on Redis (NOSCRIPT); reloading");
                self.invocation("EVAL", TOKEN_BUCKET_LUA, key, policy)
                    .query_async(&mut conn)
                    .await
                    .map_err(backend_error)?
            }
            Err(error) => return Err(backend_error(error)),
        };
        Ok(Decision::from_millis(
            allowed == 1,
            milli_tokens.max(0) as u64,
            reset_ms.max(0) as u64,
            retry_ms.max(0) as u64,
        ))
    }

    async fn ping(&self) -> Result<(), BackendError> {
        let mut conn = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(drop)
            .map_err(backend_error)
    }

    fn name(&self) -> &'static str {
        "redis"
    }
}
