//! Concurrent load on one key, for the exactness tests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{chat_body, TestApp};

/// What hammering one key from many workers produced.
pub struct Hammered {
    pub admitted: f64,
    pub denied: f64,
    /// Seconds from the first send to the last answer.
    pub total: f64,
    /// Seconds from the first answer to the last send: every token refilled in it was
    /// certainly consumed while demand exceeded supply.
    pub window: f64,
    pub unexpected: Vec<u16>,
}

/// Sends chat requests for `key` from `workers` tasks spread over `apps` for `duration`,
/// running `during` once halfway through. The requests ask eight questions in turn, so
/// with the cache on some are misses and most are hits (hits are limited too).
pub async fn hammer(
    apps: &[Arc<TestApp>],
    key: &'static str,
    workers: usize,
    duration: Duration,
    during: impl FnOnce() + Send + 'static,
) -> Hammered {
    let admitted = Arc::new(AtomicU64::new(0));
    let denied = Arc::new(AtomicU64::new(0));
    let unexpected = Arc::new(Mutex::new(Vec::new()));
    let first_response = Arc::new(Mutex::new(None::<Instant>));
    let last_send = Arc::new(Mutex::new(None::<Instant>));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..workers {
        let app = apps[worker % apps.len()].clone();
        let (admitted, denied, unexpected) = (admitted.clone(), denied.clone(), unexpected.clone());
        let (first_response, last_send) = (first_response.clone(), last_send.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while start.elapsed() < duration {
                n += 1;
                let sent = Instant::now();
                let body = chat_body(&format!("load {}", n % 8));
                let status = app.chat(key, &body).await.status().as_u16();
                let done = Instant::now();
                match status {
                    200 => admitted.fetch_add(1, Ordering::Relaxed),
                    429 => denied.fetch_add(1, Ordering::Relaxed),
                    other => {
                        unexpected.lock().unwrap().push(other);
                        0
                    }
                };
                first_response.lock().unwrap().get_or_insert(done);
                let mut last = last_send.lock().unwrap();
                if last.is_none_or(|l| sent > l) {
                    *last = Some(sent);
                }
            }
        }));
    }
    tokio::time::sleep(duration / 2).await;
    tokio::task::spawn_blocking(during).await.unwrap();
    for task in tasks {
        task.await.unwrap();
    }
    let window = last_send.lock().unwrap().unwrap() - first_response.lock().unwrap().unwrap();
    let unexpected = unexpected.lock().unwrap().clone();
    Hammered {
        admitted: admitted.load(Ordering::Relaxed) as f64,
        denied: denied.load(Ordering::Relaxed) as f64,
        total: start.elapsed().as_secs_f64(),
        window: window.as_secs_f64(),
        unexpected,
    }
}

impl Hammered {
    /// Asserts capacity + rate * elapsed (±1), no unexpected status, and prints the figures.
    pub fn assert_exact(&self, label: &str, capacity: f64, rate: f64) {
        let upper = capacity + rate * self.total + 1.0;
        let lower = capacity + rate * self.window - 1.0;
        println!(
            "{label}: admitted {} (bounds {lower:.1}..{upper:.1}), denied {}, over {:.2}s",
            self.admitted, self.denied, self.total
        );
        assert!(
            self.unexpected.is_empty(),
            "{label}: unexpected statuses {:?}",
            self.unexpected
        );
        assert!(
            self.denied > self.admitted,
            "{label}: demand must exceed the limit"
        );
        assert!(
            self.admitted <= upper,
            "{label}: admitted {} > {upper:.2}",
            self.admitted
        );
        assert!(
            self.admitted >= lower,
            "{label}: admitted {} < {lower:.2}",
            self.admitted
        );
    }
}
