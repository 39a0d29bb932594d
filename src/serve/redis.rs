//! The Redis connections the limiter and the cache share, and the round trips they share:
//! for a single server, one multiplexed, self-healing `ConnectionManager` per worker
//! thread (see `workers`: a connection used from one thread only never wakes another) and
//! its queue of deferred writes (`deferred`); for Redis Cluster, the cluster client.
//!
//! Both pipeline concurrent requests on one socket per node, so the hot path never waits
//! for a pool. Both connect lazily and reconnect by themselves, so the gateway starts
//! and keeps serving (under the limiter's failure policy) while Redis is down.
//!
//! Commands are opaque here: the limiter sends its script and the cache read it was given
//! in one [`RedisConn::round_trip`], the cache queues its writes with
//! [`RedisConn::write_soon`], and neither knows the other.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};
use tokio::sync::OnceCell;

use super::deferred::{DeferredWrites, TakenWrites, RIDE_ALONG_MAX_BYTES, RIDE_ALONG_WAIT};
use crate::serve::workers::PerWorker;
use crate::settings::StoreUrl;

/// A cheap-to-clone handle on the shared Redis connections.
#[derive(Clone)]
pub enum RedisConn {
    /// One server: a connection and a queue of deferred writes per worker thread.
    Single(Arc<SingleNode>),
    /// A Redis Cluster; commands are routed by key slot.
    Cluster(ClusterHandle),
}

/// One server's connections and deferred writes.
pub struct SingleNode {
    connections: PerWorker<ConnectionManager>,
    deferred: DeferredWrites,
}

/// The connection a call uses: the calling thread's own (see [`RedisConn::connection`]).
pub enum RedisConnection {
    /// One server.
    Single(ConnectionManager),
    /// A Redis Cluster.
    Cluster(ClusterHandle),
}

/// A cluster connection made on first use: the cluster client must reach a seed node to
/// learn the slot map, and start-up must not wait for that.
#[derive(Clone)]
pub struct ClusterHandle {
    client: Arc<ClusterClient>,
    conn: Arc<OnceCell<ClusterConnection>>,
}

impl ClusterHandle {
    async fn get(&self) -> redis::RedisResult<ClusterConnection> {
        self.conn
            .get_or_try_init(|| async { self.client.get_async_connection().await })
            .await
            .cloned()
    }
}

impl RedisConn {
    /// Prepares connections to the store named by `url` for `workers` worker threads
    /// without connecting yet. `timeout` bounds every connect (and, on a cluster, every
    /// response; callers bound their calls on a single node). Must be called within a
    /// tokio runtime.
    pub fn open(
        url: &StoreUrl,
        timeout: Duration,
        workers: usize,
    ) -> redis::RedisResult<Option<RedisConn>> {
        match url {
            StoreUrl::Memory => Ok(None),
            StoreUrl::Redis(url) => {
                let client = redis::Client::open(url.as_str())?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    // Every caller already bounds its call with its own timeout (limiter,
                    // cache, readiness); a second timer inside redis-rs only added timer
                    // wheel work to each call. (A redis-rs timeout never triggered a
                    // reconnect either: it is not an unrecoverable error.)
                    .set_response_timeout(None)
                    // Calls made while reconnecting wait on the reconnect itself, so it must
                    // give up quickly; the next call starts a new one. Retrying without end
                    // here would park every cache call for as long as Redis is down.
                    .set_number_of_retries(1)
                    .set_min_delay(Duration::from_millis(20))
                    .set_max_delay(Duration::from_millis(100));
                // Made once here to report a bad setting at start-up; each worker's own is
                // made on that worker (see `workers`). Making one can fail only on what
                // was just checked, so the checked one stands in should it ever fail.
                let checked =
                    ConnectionManager::new_lazy_with_config(client.clone(), config.clone())?;
                let connections = PerWorker::new(workers, move || {
                    ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
                        .unwrap_or_else(|_| checked.clone())
                });
                Ok(Some(RedisConn::Single(Arc::new(SingleNode {
                    connections,
                    deferred: DeferredWrites::new(workers),
                }))))
            }
            StoreUrl::Cluster(nodes) => {
                let client = ClusterClientBuilder::new(nodes.clone())
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .retries(2)
                    .build()?;
                Ok(Some(RedisConn::Cluster(ClusterHandle {
                    client: Arc::new(client),
                    conn: Arc::new(OnceCell::new()),
                })))
            }
        }
    }

    /// Sends `commands` in one round trip and returns each reply on its own, so one
    /// failing command never fails the others. `Err` only when the round trip itself
    /// failed.
    ///
    /// On one server that is a pipeline, led by the writes waiting on this thread (see
    /// `deferred`), whose replies are handed to their writers. On a cluster the commands'
    /// keys may live on different nodes, and a pipeline across slots fails as a whole
    /// (`CrossSlot`), so each command goes to the node that owns its key, all of them at
    /// once: the caller still waits for one round trip, not one per command.
    pub async fn round_trip(&self, commands: Vec<Cmd>) -> RedisResult<Vec<RedisResult<Value>>> {
        match self {
            RedisConn::Single(node) => node.send(node.deferred.take_for_ride(), commands).await,
            RedisConn::Cluster(handle) => {
                let conn = handle.get().await?;
                let calls = commands.into_iter().map(|cmd| {
                    let mut conn = conn.clone();
                    // A server's error reply arrives as a value here; as an `Err`, like
                    // the pipeline's replies.
                    async move { conn.req_packed_command(&cmd).await?.extract_error() }
                });
                Ok(futures_util::future::join_all(calls).await)
            }
        }
    }

    /// Writes `cmd` (about `bytes` of data) soon, for a caller that does not wait for
    /// it to answer anyone: on one server it rides with the next round trip of this
    /// thread, or writes itself after [`RIDE_ALONG_WAIT`]; on a cluster, and when larger
    /// than [`RIDE_ALONG_MAX_BYTES`], it is sent at once. `timeout` bounds a round trip
    /// of its own.
    pub async fn write_soon(
        &self,
        cmd: Cmd,
        bytes: usize,
        timeout: Duration,
    ) -> Result<(), String> {
        let node = match self {
            RedisConn::Single(node) if bytes <= RIDE_ALONG_MAX_BYTES => node,
            _ => {
                let mut conn = self.connection();
                let call = cmd.query_async::<Value>(&mut conn);
                return match tokio::time::timeout(timeout, call).await {
                    Ok(result) => result.map(drop).map_err(|e| e.to_string()),
                    Err(_) => Err("timed out".into()),
                };
            }
        };
        let mut outcome = node.deferred.push(cmd, bytes);
        let outcome = match tokio::time::timeout(RIDE_ALONG_WAIT, &mut outcome).await {
            Ok(outcome) => outcome,
            Err(_) => {
                // Empty when a round trip took this write just now; its outcome follows.
                let writes = node.deferred.take();
                if !writes.is_empty() {
                    let sent = node.send(writes, Vec::new());
                    if tokio::time::timeout(timeout, sent).await.is_err() {
                        return Err("timed out".into());
                    }
                }
                outcome.await
            }
        };
        outcome.unwrap_or_else(|_| Err("lost with a failed Redis call".into()))
    }

    /// Writes waiting on the calling thread for a round trip to carry them.
    pub fn writes_waiting(&self) -> usize {
        match self {
            RedisConn::Single(node) => node.deferred.len(),
            RedisConn::Cluster(_) => 0,
        }
    }

    /// The calling thread's connection, for one call.
    pub fn connection(&self) -> RedisConnection {
        match self {
            RedisConn::Single(node) => RedisConnection::Single(node.connections.get().clone()),
            RedisConn::Cluster(handle) => RedisConnection::Cluster(handle.clone()),
        }
    }
}

impl SingleNode {
    /// Sends `writes`, then `commands`, in one pipeline whose replies each stand on their
    /// own; hands the writes their replies and returns the commands'.
    async fn send(
        &self,
        mut writes: TakenWrites,
        commands: Vec<Cmd>,
    ) -> RedisResult<Vec<RedisResult<Value>>> {
        let mut pipe = redis::pipe();
        writes.add_to(&mut pipe);
        for cmd in commands {
            pipe.add_command(cmd);
        }
        pipe.ignore_errors();
        let mut conn = self.connections.get().clone();
        match pipe.query_async::<Vec<RedisResult<Value>>>(&mut conn).await {
            Ok(replies) => {
                let mut replies = replies.into_iter();
                writes.finish(&mut replies);
                Ok(replies.collect())
            }
            Err(error) => {
                writes.fail(&error.to_string());
                Err(error)
            }
        }
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConnection::Single(conn) => conn.req_packed_command(cmd),
            RedisConnection::Cluster(handle) => Box::pin(async move {
                let mut conn = handle.get().await?;
                conn.req_packed_command(cmd).await
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConnection::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            RedisConnection::Cluster(handle) => Box::pin(async move {
                let mut conn = handle.get().await?;
                conn.req_packed_commands(pipeline, offset, count).await
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConnection::Single(conn) => conn.get_db(),
            RedisConnection::Cluster(_) => 0,
        }
    }
}
