//! Batches in progress at once, kept apart by task. Admission and outcome recording each let a
//! few batches overlap (while one waits for its commit, the next is written); a batch that
//! shares a task id with one in progress first waits for every batch in progress, so two
//! messages about one task are still handled in the order they were delivered.

use std::collections::{HashMap, HashSet};
use std::future::Future;

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};

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

    /// Wait for every batch in progress.
    pub(crate) async fn drain(&mut self) {
        while self.finished().await.is_some() {}
    }
}
