//! The Redis connections the limiter and the cache share: for a single server, one
//! multiplexed, self-healing `ConnectionManager` per worker thread (see `workers`: a
//! connection used from one thread only never wakes another); for Redis Cluster, the
//! cluster client.
//!
//! Both pipeline concurrent requests on one socket per node, so the hot path never waits
//! for a pool. Both connect lazily and reconnect by themselves, so the gateway starts
//! and keeps serving (under the limiter's failure policy) while Redis is down.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};
use tokio::sync::OnceCell;

use crate::settings::StoreUrl;
use crate::workers::PerWorker;

/// A cheap-to-clone handle on the shared Redis connections.
#[derive(Clone)]
pub enum RedisConn {
    /// One server: a connection per worker thread.
    Single(Arc<PerWorker<ConnectionManager>>),
    /// A Redis Cluster; commands are routed by key slot.
    Cluster(ClusterHandle),
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
                let connections = PerWorker::try_new(workers, || {
                    ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
                })?;
                Ok(Some(RedisConn::Single(Arc::new(connections))))
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

    /// Sends the commands of `pipeline` in one round trip and returns each reply on its
    /// own, so one failing command never fails the others. `Err` only when the round trip
    /// itself failed.
    ///
    /// On one server that is a pipeline. On a cluster the commands' keys may live on
    /// different nodes, and a pipeline across slots fails as a whole (`CrossSlot`), so
    /// each command goes to the node that owns its key, all of them at once: the caller
    /// still waits for one round trip, not one per command.
    pub async fn round_trip(
        &self,
        pipeline: &Pipeline,
    ) -> redis::RedisResult<Vec<redis::RedisResult<Value>>> {
        let mut conn = self.connection();
        match &mut conn {
            RedisConnection::Single(_) => pipeline.query_async(&mut conn).await,
            RedisConnection::Cluster(handle) => {
                let conn = handle.get().await?;
                let calls = pipeline.cmd_iter().map(|cmd| {
                    let mut conn = conn.clone();
                    // A server's error reply arrives as a value here; as an `Err`, like
                    // the pipeline's replies.
                    async move { conn.req_packed_command(cmd).await?.extract_error() }
                });
                Ok(futures_util::future::join_all(calls).await)
            }
        }
    }

    /// The calling thread's connection, for one call.
    pub fn connection(&self) -> RedisConnection {
        match self {
            RedisConn::Single(connections) => RedisConnection::Single(connections.get().clone()),
            RedisConn::Cluster(handle) => RedisConnection::Cluster(handle.clone()),
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
