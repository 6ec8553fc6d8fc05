//! Batches in progress at once, kept apart by task. Admission and outcome recording each let a
//! few batches overlap (while one waits for its commit, the next is written); a batch that
//! shares a task id with one in progress first waits for every batch in progress, so two
//! messages about one task are still handled in the order they were delivered.

use std::collections::{HashMap, HashSet};
use std::future::Future;

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
    running: FuturesUnordered<BoxFuture<'a, (u64, bool)>>,
    ids: HashMap<u64, HashSet<String>>,
    next: u64,
}

impl<'a> Pipeline<'a> {
    pub(crate) fn new() -> Self {
        Self {
            running: FuturesUnordered::new(),
            ids: HashMap::new(),
            next: 0,
        }
    }

    /// Batches in progress.
    pub(crate) fn len(&self) -> usize {
        self.running.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// Wait for the next batch to finish: whether it succeeded, or `None` when none is running.
    pub(crate) async fn finished(&mut self) -> Option<bool> {
        let (n, ok) = self.running.next().await?;
        self.ids.remove(&n);
        Some(ok)
    }

    /// Start `batch` (resolving to whether it succeeded), which touches the tasks `ids`.
    pub(crate) async fn start(
        &mut self,
        ids: HashSet<String>,
        batch: impl Future<Output = bool> + Send + 'a,
    ) {
        if self.ids.values().any(|other| !other.is_disjoint(&ids)) {
            self.drain().await;
        }
        let n = self.next;
        self.next += 1;
        self.ids.insert(n, ids);
        self.running.push(Box::pin(async move { (n, batch.await) }));
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
            }
        }
    }

    /// Wait for every batch in progress.
    pub(crate) async fn drain(&mut self) {
        while self.finished().await.is_some() {}
    }
}
