//! Batches in progress at once, kept apart by task. Admission and outcome recording each let a
//! few batches overlap (while one waits for its commit, the next is written); a batch that
//! shares a task id with one in progress first waits for every batch in progress, so two
//! messages about one task are still handled in the order they were delivered.
//!
//! A batch may also give up its place early ([`Slot::release`]): admission does once its rows
//! are written and its work is published, while it still waits for the WAL flush and the
//! publish acks before acking (see `crate::flush`). Only batches that hold their place count
//! against the depth.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, Stream, StreamExt};
use taskbus_runtime::CancellationToken;

/// What [`Pipeline::next_chunk`] got.
pub(crate) enum Next<T> {
    /// A chunk to start as a batch.
    Chunk(T),
    /// The message stream ended (pull again).
    Ended,
    /// Shutdown: every batch in progress has finished.
    Shutdown,
}

pub(crate) struct Pipeline<'a> {
    /// Each batch resolves to its number, whether it succeeded and whether it gave up its place.
    running: FuturesUnordered<BoxFuture<'a, (u64, bool, bool)>>,
    ids: HashMap<u64, HashSet<String>>,
    places: Arc<Places>,
    next: u64,
}

/// Batches in progress that gave up their place, and a wake-up for the loop waiting for one.
#[derive(Default)]
struct Places {
    released: AtomicUsize,
    freed: tokio::sync::Notify,
}

/// A batch's place among the `depth` batches in progress.
pub(crate) struct Slot {
    flag: Arc<AtomicBool>,
    places: Arc<Places>,
}

impl Slot {
    /// Let the next batch start although this one goes on.
    pub(crate) fn release(&self) {
        if !self.flag.swap(true, Ordering::SeqCst) {
            self.places.released.fetch_add(1, Ordering::SeqCst);
            self.places.freed.notify_one();
        }
    }
}

impl<'a> Pipeline<'a> {
    pub(crate) fn new() -> Self {
        Self {
            running: FuturesUnordered::new(),
            ids: HashMap::new(),
            places: Arc::default(),
            next: 0,
        }
    }

    /// Batches in progress that hold their place.
    pub(crate) fn len(&self) -> usize {
        self.running.len() - self.places.released.load(Ordering::SeqCst)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// Wait for the next batch to finish: whether it succeeded, or `None` when none is running.
    pub(crate) async fn finished(&mut self) -> Option<bool> {
        let (n, ok, released) = self.running.next().await?;
        self.ids.remove(&n);
        if released {
            self.places.released.fetch_sub(1, Ordering::SeqCst);
        }
        Some(ok)
    }

    /// Start the batch `start` makes (resolving to whether it succeeded), which touches the
    /// tasks `ids`; it is given its place, to release early if it can.
    pub(crate) async fn start<F>(&mut self, ids: HashSet<String>, start: impl FnOnce(Slot) -> F)
    where
        F: Future<Output = bool> + Send + 'a,
    {
        if self.ids.values().any(|other| !other.is_disjoint(&ids)) {
            self.drain().await;
        }
        let n = self.next;
        self.next += 1;
        self.ids.insert(n, ids);
        let flag = Arc::new(AtomicBool::new(false));
        let batch = start(Slot {
            flag: flag.clone(),
            places: self.places.clone(),
        });
        self.running.push(Box::pin(async move {
            let ok = batch.await;
            (n, ok, flag.load(Ordering::SeqCst))
        }));
    }

    /// Wait for the next chunk of `chunks` while fewer than `depth` batches are in progress,
    /// finishing batches meanwhile (and pausing 500 ms after one that failed, whose messages
    /// come back by redelivery). On shutdown, the batches in progress are finished first.
    pub(crate) async fn next_chunk<S: Stream + Unpin>(
        &mut self,
        chunks: &mut S,
        depth: usize,
        shutdown: &CancellationToken,
    ) -> Next<S::Item> {
        loop {
            let places = self.places.clone();
            tokio::select! {
                _ = shutdown.cancelled() => {
                    self.drain().await;
                    return Next::Shutdown;
                }
                Some(ok) = self.finished(), if !self.is_empty() => {
                    if !ok {
                        crate::pause(shutdown, Duration::from_millis(500)).await;
                    }
                }
                c = chunks.next(), if self.len() < depth => {
                    return c.map_or(Next::Ended, Next::Chunk);
                }
                _ = places.freed.notified(), if self.len() >= depth => {}
            }
        }
    }

    /// Wait for every batch in progress.
    pub(crate) async fn drain(&mut self) {
        while self.finished().await.is_some() {}
    }
}
