//! The Redis backend: the token-bucket script called with EVALSHA, reloaded on NOSCRIPT.

use async_trait::async_trait;
use redis::{ErrorKind, RedisError, ServerErrorKind, Value};

use super::{BackendError, BucketPolicy, Decision, LimiterBackend, Prefetch};
use crate::serve::redis::RedisConn;
use crate::telemetry::metrics::Metrics;

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

fn missing_reply() -> RedisError {
    RedisError::from((ErrorKind::UnexpectedReturnType, "pipeline reply too short"))
}

fn backend_error(error: RedisError) -> BackendError {
    if error.is_timeout() {
        BackendError::Timeout
    } else {
        BackendError::Redis(error.to_string())
    }
}

/// The script's reply: allowed, milli-tokens left, ms until full, ms until a token.
type ScriptReply = (i64, i64, i64, i64);

fn decision(reply: ScriptReply) -> Decision {
    let (allowed, milli_tokens, reset_ms, retry_ms) = reply;
    Decision::from_millis(
        allowed == 1,
        milli_tokens.max(0) as u64,
        reset_ms.max(0) as u64,
        retry_ms.max(0) as u64,
    )
}

impl RedisLimiter {
    /// Runs the script (and the prefetch GET in the same round trip), and on NOSCRIPT
    /// once more with EVAL. EVAL runs the script and caches it again on the node that
    /// owns the key, so this works node by node on a cluster without needing every node
    /// to be up.
    async fn run(
        &self,
        key: &str,
        policy: &BucketPolicy,
        prefetch: Option<&str>,
    ) -> Result<(Decision, Prefetch), BackendError> {
        match self
            .run_with("EVALSHA", &self.sha, key, policy, prefetch)
            .await
        {
            Err(error) if is_noscript(&error) => {
                self.metrics.limiter_script_reloads.inc();
                tracing::info!("rate limiter script missing on Redis (NOSCRIPT); reloading");
                self.run_with("EVAL", TOKEN_BUCKET_LUA, key, policy, prefetch)
                    .await
            }
            other => other,
        }
        .map_err(backend_error)
    }

    async fn run_with(
        &self,
        command: &str,
        script: &str,
        key: &str,
        policy: &BucketPolicy,
        prefetch: Option<&str>,
    ) -> Result<(Decision, Prefetch), RedisError> {
        let call = self.invocation(command, script, key, policy);
        let Some(cache_key) = prefetch else {
            let mut conn = self.conn.connection();
            let reply: ScriptReply = call.query_async(&mut conn).await?;
            return Ok((decision(reply), Prefetch::NotFetched));
        };
        // Every reply on its own, so a failed read never fails the decision. On one node
        // the round trip also carries the writes waiting on this thread, ahead of the
        // GET; on a cluster the script and the GET go to their own nodes at once.
        let mut get = redis::cmd("GET");
        get.arg(cache_key);
        let mut replies = self.conn.round_trip(vec![call, get]).await?.into_iter();
        let script_reply = replies.next().unwrap_or_else(|| Err(missing_reply()))?;
        let reply: ScriptReply = redis::from_redis_value(script_reply)?;
        let prefetched = match replies.next() {
            Some(Ok(Value::Nil)) => Prefetch::Missing,
            Some(Ok(value)) => redis::from_redis_value::<Vec<u8>>(value)
                .map(|body| Prefetch::Found(bytes::Bytes::from(body)))
                .unwrap_or(Prefetch::Failed),
            Some(Err(_)) | None => Prefetch::Failed,
        };
        Ok((decision(reply), prefetched))
    }
}

#[async_trait]
impl LimiterBackend for RedisLimiter {
    async fn check(&self, key: &str, policy: &BucketPolicy) -> Result<Decision, BackendError> {
        Ok(self.run(key, policy, None).await?.0)
    }

    async fn check_and_prefetch(
        &self,
        key: &str,
        policy: &BucketPolicy,
        prefetch: &str,
    ) -> Result<(Decision, Prefetch), BackendError> {
        self.run(key, policy, Some(prefetch)).await
    }

    fn name(&self) -> &'static str {
        "redis"
    }
}
