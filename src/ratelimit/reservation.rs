//! A request's LLM-token reservation (CONTRACT §13), settled exactly once after its
//! answer: to the tokens really used when they are known, or else as reserved.

use std::sync::Arc;

use super::{RateLimiter, Ticket};

/// A reservation the request holds until its answer is known. Settling it (or dropping
/// it) hands the settlement to the limiter, which sends it after the answer (with the
/// same client's next request, or on its own): it never adds a Redis round trip in
/// front of an answer.
#[derive(Debug)]
pub struct Reservation {
    limiter: Arc<RateLimiter>,
    key: Arc<str>,
    /// Boxed: it carries the bucket's policy, and every admitted request's answer path
    /// holds an `Option<Reservation>` (clippy's large-variant check on `Gate`).
    ticket: Box<Ticket>,
    settled: bool,
}

impl Reservation {
    /// The reservation `ticket` made in the bucket at `key`.
    pub fn new(limiter: Arc<RateLimiter>, key: Arc<str>, ticket: Ticket) -> Reservation {
        Reservation {
            limiter,
            key,
            ticket: Box::new(ticket),
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
        self.limiter.settle(self.key.clone(), &self.ticket, used);
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
