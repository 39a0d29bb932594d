//! The in-process cache for `memory://`: a map of bodies with their expiry instants.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::time::Instant;

use super::{Cache, CacheError};

/// Bodies and their expiry; expired entries are dropped on read and swept on growth.
pub struct MemoryCache {
    entries: Mutex<HashMap<String, (Bytes, Instant)>>,
    max_entries: usize,
}

impl MemoryCache {
    /// A cache that holds at most `max_entries` bodies (oldest-expiring evicted first).
    pub fn new(max_entries: usize) -> MemoryCache {
        MemoryCache {
            entries: Mutex::new(HashMap::new()),
            max_entries: max_entries.max(1),
        }
    }
}

#[async_trait]
impl Cache for MemoryCache {
    async fn get(&self, key: &str) -> Result<Option<Bytes>, CacheError> {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        match entries.get(key) {
            Some((body, expires)) if *expires > now => Ok(Some(body.clone())),
            Some(_) => {
                entries.remove(key);
                Ok(None)
            }
            None => Ok(None),
        }
    }

    async fn set(&self, key: &str, body: Bytes, ttl: Duration) -> Result<(), CacheError> {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= self.max_entries && !entries.contains_key(key) {
            entries.retain(|_, (_, expires)| *expires > now);
            if entries.len() >= self.max_entries {
                // Still full of live entries: drop the one closest to expiring.
                if let Some(oldest) = entries
                    .iter()
                    .min_by_key(|(_, (_, expires))| *expires)
                    .map(|(k, _)| k.clone())
                {
                    entries.remove(&oldest);
                }
            }
        }
        entries.insert(key.to_owned(), (body, now + ttl));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn entries_expire_after_their_ttl() {
        let cache = MemoryCache::new(10);
        cache
            .set("k", Bytes::from_static(b"v"), Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(cache.get("k").await.unwrap().as_deref(), Some(&b"v"[..]));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(cache.get("k").await.unwrap(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_cache_never_grows_past_its_bound() {
        let cache = MemoryCache::new(3);
        for i in 0..10 {
            let ttl = Duration::from_secs(10 + i);
            cache
                .set(&format!("k{i}"), Bytes::from_static(b"v"), ttl)
                .await
                .unwrap();
        }
        assert_eq!(cache.entries.lock().unwrap().len(), 3);
        assert!(cache.get("k9").await.unwrap().is_some());
    }
}
