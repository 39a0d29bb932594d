//! A request's LLM-token reservation (CONTRACT §13), settled exactly once after its
//! answer: to the tokens really used when they are known, or else as reserved.

use std::sync::Arc;

use super::{RateLimiter, Ticket};

/// A reservation the request holds until its answer is known. Settling it (or dropping
/// it) sends the reconciliation in the background, after the answer: it never adds a
/// Redis round trip in front of one.
#[derive(Debug)]
pub struct Reservation {
    limiter: Arc<RateLimiter>,
    key: Arc<str>,
    ticket: Ticket,
    settled: bool,
}

impl Reservation {
    /// The reservation `ticket` made in the bucket at `key`.
    pub fn new(limiter: Arc<RateLimiter>, key: Arc<str>, ticket: Ticket) -> Reservation {
        Reservation {
            limiter,
            key,
            ticket,
            settled: false,
        }
    }

    /// The tokens reserved.
    pub fn reserved(&self) -> u64 {
        self.ticket.reserved
    }

    /// Settles the reservation to `used` tokens (prompt + completion; 0 for an answer
    /// the upstream did not make: a cache hit, a failure).
    pub fn settle(mut self, used: u64) {
        self.send(used);
    }

    fn send(&mut self, used: u64) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (limiter, key, ticket) = (self.limiter.clone(), self.key.clone(), self.ticket);
        runtime.spawn(async move { limiter.reconcile(&key, ticket, used).await });
    }
}

impl Drop for Reservation {
    /// A request that ended without saying what it used (its client went away while the
    /// upstream was answering) is settled as reserved: what it may have cost upstream.
    fn drop(&mut self) {
        let reserved = self.ticket.reserved;
        self.send(reserved);
    }
}
