//! Serving: the HTTP server loop and its connections (`server`, `conn_io`, `body`), the
//! worker threads that run them (`workers`), and the Redis connections and round trips
//! the limiter and the cache share (`redis`, `deferred`). The speed machinery lives
//! here, below the use case; nothing here knows a client dialect.

pub mod body;
pub mod conn_io;
pub mod deferred;
pub mod redis;
pub mod server;
pub mod workers;
