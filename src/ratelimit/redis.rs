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

fn unexpected_reply() -> RedisError {
    RedisError::from((
        ErrorKind::UnexpectedReturnType,
        "unexpected limiter script reply",
    ))
}

fn backend_error(error: RedisError) -> BackendError {
    if error.is_timeout() {
        BackendError::Timeout
    } else {
        BackendError::Redis(error.to_string())
    }
}

/// The script's reply. For the request bucket alone: allowed, milli-tokens left, ms
/// until full, ms until a token. With token limits, ten little-endian doubles in one
/// string: those three without `allowed`, then seven for the token limits (see the
/// script; one string because the client parses each integer of an array reply at
/// ~700 instructions).
fn decision(reply: Value, policy: &BucketPolicy) -> Result<Decision, RedisError> {
    if !policy.tokens.any() {
        let reply: Vec<i64> = redis::from_redis_value(reply)?;
        if reply.len() < 4 {
            return Err(unexpected_reply());
        }
        let at = |i: usize| reply[i].max(0) as u64;
        return Ok(Decision::from_millis(reply[0] == 1, at(1), at(2), at(3)));
    }
    let packed = match reply {
        Value::BulkString(packed) if packed.len() == 10 * 8 => packed,
        _ => return Err(unexpected_reply()),
    };
    let mut numbers = [0.0f64; 10];
    for (number, bytes) in numbers.iter_mut().zip(packed.chunks_exact(8)) {
        let mut le = [0u8; 8];
        le.copy_from_slice(bytes);
        *number = f64::from_le_bytes(le);
    }
    // Whole numbers within 2^53 as the script computes them; `as` saturates (and maps
    // NaN to 0), so no reply can wrap.
    let at = |i: usize| numbers[i].max(0.0) as u64;
    let why = ScriptReply::limit(numbers[3] as i64);
    let mut decision = Decision::from_millis(why.is_none(), at(0), at(1), at(2));
    let tokens = ScriptReply {
        why,
        llm_left: at(4),
        llm_to_full_ms: at(5),
        llm_retry_ms: at(6),
        budget_left: at(7),
        period_left_ms: at(8),
        period: numbers[9] as i64,
    };
    tokens.complete(&mut decision, policy);
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
            let reply: Value = call.query_async(&mut conn).await?;
            return Ok((decision(reply, policy)?, Prefetch::NotFetched));
        };
        // Every reply on its own, so a failed read never fails the decision. On one node
        // the round trip also carries the writes waiting on this thread, ahead of the
        // GET; on a cluster the script and the GET go to their own nodes at once.
        let mut get = redis::cmd("GET");
        get.arg(cache_key);
        let mut replies = self.conn.round_trip(vec![call, get]).await?.into_iter();
        let script_reply = replies.next().unwrap_or_else(|| Err(missing_reply()))?;
        let prefetched = match replies.next() {
            Some(Ok(Value::Nil)) => Prefetch::Missing,
            Some(Ok(value)) => redis::from_redis_value::<Vec<u8>>(value)
                .map(|body| Prefetch::Found(bytes::Bytes::from(body)))
                .unwrap_or(Prefetch::Failed),
            Some(Err(_)) | None => Prefetch::Failed,
        };
        Ok((decision(script_reply, policy)?, prefetched))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::{Left, Limit, TokenLimits};
    use crate::settings::BudgetPeriod;

    fn policy(per_minute: u64, budget: u64) -> BucketPolicy {
        BucketPolicy {
            tier: "t".into(),
            capacity: 10,
            refill_rate: 1.0,
            tokens: TokenLimits {
                per_minute,
                budget,
                period: BudgetPeriod::Day,
                default_max_tokens: 16,
            },
        }
    }

    fn packed(numbers: &[f64]) -> Value {
        Value::BulkString(numbers.iter().flat_map(|n| n.to_le_bytes()).collect())
    }

    #[test]
    fn a_packed_reply_reads_as_a_decision_with_token_limits() {
        let reply = packed(&[
            9000.0, 1000.0, 0.0, 0.0, 700.0, 18000.0, 0.0, 99700.0, 3600000.0, 20789.0,
        ]);
        let admitted = decision(reply, &policy(1000, 100000)).unwrap();
        assert!(admitted.allowed);
        assert_eq!((admitted.remaining, admitted.reset_ms), (9, 1000));
        assert_eq!(
            admitted.tokens,
            Some(Left {
                remaining: 700,
                reset_ms: 18000
            })
        );
        assert_eq!(
            admitted.budget,
            Some(Left {
                remaining: 99700,
                reset_ms: 3600000
            })
        );
        assert_eq!(admitted.budget_period, Some(20789));

        let denied = packed(&[
            9000.0, 1000.0, 0.0, 2.0, 100.0, 54000.0, 12000.0, 0.0, 0.0, -1.0,
        ]);
        let refused = decision(denied, &policy(1000, 0)).unwrap();
        assert!(!refused.allowed);
        assert_eq!(refused.denied_by, Some(Limit::Tokens));
        assert_eq!(refused.retry_after_ms, 12000);
        assert_eq!(refused.budget, None);
    }

    #[test]
    fn a_reply_of_the_wrong_shape_is_an_error_not_a_panic() {
        let tokens = policy(1000, 0);
        for reply in [
            packed(&[1.0; 9]),
            Value::BulkString(vec![0; 81]),
            Value::Array(vec![Value::Int(1); 4]),
            Value::Nil,
        ] {
            assert!(decision(reply, &tokens).is_err());
        }
        let requests = policy(0, 0);
        assert!(decision(Value::Array(vec![Value::Int(1); 3]), &requests).is_err());
        assert!(decision(packed(&[1.0; 10]), &requests).is_err());
        let admitted = decision(
            Value::Array(vec![
                Value::Int(1),
                Value::Int(4000),
                Value::Int(6000),
                Value::Int(0),
            ]),
            &requests,
        )
        .unwrap();
        assert!(admitted.allowed);
        assert_eq!(admitted.remaining, 4);
    }
}
