//! The Redis backend: the token-bucket script called with EVALSHA, reloaded on NOSCRIPT.

use async_trait::async_trait;
use redis::{ErrorKind, RedisError, ServerErrorKind, Value};

use std::time::Duration;

use super::{
    BackendError, BucketPolicy, Decision, LimiterBackend, Prefetch, Reserve, ScriptReply,
    SettleBatch,
};
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

    /// The script call for one request (`cost` 1), or for settlements alone (`cost` 0).
    fn invocation(
        command: &str,
        script: &str,
        key: &str,
        policy: &BucketPolicy,
        cost: u64,
        reserve: Reserve,
        settles: Option<&SettleBatch>,
    ) -> redis::Cmd {
        let mut cmd = redis::cmd(command);
        cmd.arg(script)
            .arg(1)
            .arg(key)
            .arg(policy.capacity)
            .arg(policy.refill_rate)
            .arg(cost);
        let limits = policy.tokens;
        if !limits.any() {
            // The request bucket alone: three arguments.
            return cmd;
        }
        cmd.arg(reserve.tokens)
            .arg(limits.per_minute)
            .arg(limits.budget)
            .arg(limits.period.as_str());
        if let Some(batch) = settles {
            cmd.arg(&*batch.instance).arg(batch.seq).arg(batch.llm);
            for (period, surplus) in &batch.budget {
                cmd.arg(period).arg(surplus);
            }
        }
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

/// The script's reply: allowed, milli-tokens left, ms until full, ms until a token;
/// with token limits, seven numbers more (see the script).
fn decision(reply: &[i64], policy: &BucketPolicy) -> Result<Decision, RedisError> {
    let at = |i: usize| reply.get(i).copied().unwrap_or(0).max(0) as u64;
    if reply.len() < 4 || (policy.tokens.any() && reply.len() < 11) {
        return Err(missing_reply());
    }
    let mut decision = Decision::from_millis(reply[0] == 1, at(1), at(2), at(3));
    if policy.tokens.any() {
        let tokens = ScriptReply {
            why: ScriptReply::limit(reply[4]),
            llm_left: at(5),
            llm_to_full_ms: at(6),
            llm_retry_ms: at(7),
            budget_left: at(8),
            period_left_ms: at(9),
            period: reply[10],
        };
        tokens.complete(&mut decision, policy);
    }
    Ok(decision)
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
        reserve: Reserve,
        settles: Option<&SettleBatch>,
        prefetch: Option<&str>,
    ) -> Result<(Decision, Prefetch), BackendError> {
        let call =
            |command, script| Self::invocation(command, script, key, policy, 1, reserve, settles);
        match self
            .run_with(call("EVALSHA", &self.sha), policy, prefetch)
            .await
        {
            Err(error) if is_noscript(&error) => {
                self.metrics.limiter_script_reloads.inc();
                tracing::info!("rate limiter script missing on Redis (NOSCRIPT); reloading");
                self.run_with(call("EVAL", TOKEN_BUCKET_LUA), policy, prefetch)
                    .await
            }
            other => other,
        }
        .map_err(backend_error)
    }

    async fn run_with(
        &self,
        call: redis::Cmd,
        policy: &BucketPolicy,
        prefetch: Option<&str>,
    ) -> Result<(Decision, Prefetch), RedisError> {
        let Some(cache_key) = prefetch else {
            let mut conn = self.conn.connection();
            let reply: Vec<i64> = call.query_async(&mut conn).await?;
            return Ok((decision(&reply, policy)?, Prefetch::NotFetched));
        };
        // Every reply on its own, so a failed read never fails the decision. On one node
        // the round trip also carries the writes waiting on this thread, ahead of the
        // GET; on a cluster the script and the GET go to their own nodes at once.
        let mut get = redis::cmd("GET");
        get.arg(cache_key);
        let mut replies = self.conn.round_trip(vec![call, get]).await?.into_iter();
        let script_reply = replies.next().unwrap_or_else(|| Err(missing_reply()))?;
        let reply: Vec<i64> = redis::from_redis_value(script_reply)?;
        let prefetched = match replies.next() {
            Some(Ok(Value::Nil)) => Prefetch::Missing,
            Some(Ok(value)) => redis::from_redis_value::<Vec<u8>>(value)
                .map(|body| Prefetch::Found(bytes::Bytes::from(body)))
                .unwrap_or(Prefetch::Failed),
            Some(Err(_)) | None => Prefetch::Failed,
        };
        Ok((decision(&reply, policy)?, prefetched))
    }
}

#[async_trait]
impl LimiterBackend for RedisLimiter {
    async fn check(
        &self,
        key: &str,
        policy: &BucketPolicy,
        reserve: Reserve,
        settles: Option<&SettleBatch>,
    ) -> Result<Decision, BackendError> {
        Ok(self.run(key, policy, reserve, settles, None).await?.0)
    }

    async fn check_and_prefetch(
        &self,
        key: &str,
        policy: &BucketPolicy,
        reserve: Reserve,
        settles: Option<&SettleBatch>,
        prefetch: &str,
    ) -> Result<(Decision, Prefetch), BackendError> {
        self.run(key, policy, reserve, settles, Some(prefetch))
            .await
    }

    /// Sends settlements alone (the script with cost 0), riding with the next round
    /// trip of this thread where it can (as the cache's writes do); on NOSCRIPT once
    /// more with EVAL, which loads the script again.
    async fn settle(
        &self,
        key: &str,
        policy: &BucketPolicy,
        settles: &SettleBatch,
        timeout: Duration,
    ) -> Result<(), BackendError> {
        let none = Reserve::default();
        let call = |command, script| {
            Self::invocation(command, script, key, policy, 0, none, Some(settles))
        };
        match self
            .conn
            .write_soon(call("EVALSHA", &self.sha), 64, timeout)
            .await
        {
            Err(error) if error.contains("NOSCRIPT") || error.contains("NoScript") => {
                self.metrics.limiter_script_reloads.inc();
                self.conn
                    .write_soon(call("EVAL", TOKEN_BUCKET_LUA), 64, timeout)
                    .await
            }
            other => other,
        }
        .map_err(|error| {
            if error.contains("timed out") {
                BackendError::Timeout
            } else {
                BackendError::Redis(error)
            }
        })
    }

    fn name(&self) -> &'static str {
        "redis"
    }
}
