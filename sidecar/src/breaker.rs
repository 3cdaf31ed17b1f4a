//! An optional bound on concurrent requests, with a bounded queue: a request
//! beyond both is refused at once (503), never queued without bound.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug)]
pub struct Breaker {
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_waiting: usize,
}

/// Decrements the queue length when a waiter leaves, however it leaves.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Breaker {
    pub fn new(max_concurrency: usize, max_waiting: usize) -> Breaker {
        Breaker {
            slots: Arc::new(Semaphore::new(max_concurrency)),
            waiting: AtomicUsize::new(0),
            max_waiting,
        }
    }

    /// A slot, after waiting in the queue if needed; `None` if the queue is
    /// full.
    pub async fn acquire(&self) -> Option<OwnedSemaphorePermit> {
        if let Ok(permit) = Arc::clone(&self.slots).try_acquire_owned() {
            return Some(permit);
        }
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        let _waiting = Waiting(&self.waiting);
        Arc::clone(&self.slots).acquire_owned().await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn beyond_slots_and_queue_requests_are_refused_at_once() {
        let breaker = Arc::new(Breaker::new(2, 1));
        let a = breaker.acquire().await.expect("slot 1");
        let _b = breaker.acquire().await.expect("slot 2");
        let queued = tokio::spawn({
            let breaker = Arc::clone(&breaker);
            async move { breaker.acquire().await.is_some() }
        });
        while breaker.waiting.load(Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
        assert!(breaker.acquire().await.is_none(), "queue full: refused");
        drop(a);
        assert!(queued.await.unwrap(), "the queued request gets the freed slot");
        assert_eq!(breaker.waiting.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_leaves_the_queue() {
        let breaker = Breaker::new(1, 1);
        let _slot = breaker.acquire().await.expect("slot");
        let gave_up = tokio::time::timeout(std::time::Duration::from_millis(20), breaker.acquire()).await;
        assert!(gave_up.is_err());
        assert_eq!(breaker.waiting.load(Ordering::Relaxed), 0);
    }
}
