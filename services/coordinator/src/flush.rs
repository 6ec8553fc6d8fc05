//! Making admission's rows durable without waiting for each batch's own disk flush.
//!
//! Admission writes on connections with asynchronous commit
//! ([`taskbus_runtime::db::Commit::Deferred`]): the INSERT returns once its rows are visible
//! (and, for a known id, once the conflict is found), so the work message is published without
//! waiting for the disk. On this project's 2-core benchmark machine that wait (an `fdatasync`
//! of the WAL, 0.1 ms idle, p99 3.5 ms while nats-server writes its store to the same disk) was
//! the largest part of the p99 submit→start latency.
//!
//! The submit messages are still acked only once their rows are durable: before acking, a
//! batch waits for [`WalFlush::wait`], which notes where the WAL ends and waits until
//! PostgreSQL has flushed it that far (`crate::store::flush_wal`). PostgreSQL does that flush
//! anyway: every synchronous commit (the outcome writes) flushes all WAL before it, and the
//! WAL writer flushes what asynchronous commits leave within `wal_writer_delay`; a flush is
//! forced only when neither happened within [`FLUSH_FORCE_AFTER`]. One such wait is in
//! progress at a time; the batches that finish their writes meanwhile share the next one. At
//! 2,000 tasks/s that is about 43 waits a second (three cheap queries each) instead of one
//! disk flush per admission batch (about 900 a second), and the acks come 10–20 ms later.
//!
//! A batch whose messages are all duplicates of tasks recorded by other messages acks without
//! waiting: it wrote nothing and publishes nothing, and each of those other messages is acked
//! only once its own row is durable (a lost row means that message is redelivered and admitted
//! again, and the duplicate stays dropped). Before, a burst of repeated ids was acked at one
//! batch per flush (about 35 messages a second here).
//!
//! What a PostgreSQL crash can do now: the rows of batches whose flush had not completed are
//! lost although their work was published. A flush that ends after the crash must not vouch
//! for them, so every statement of a batch also reads the server's incarnation token, kept in
//! an unlogged table that crash recovery empties (`crate::store::Incarnations`), and the batch
//! is acked only if the flush began and ended under that same token. Otherwise the batch's
//! submit messages are handed back: they are
//! redelivered and admitted again under the same work message id, which JetStream drops as a
//! duplicate within the work stream's duplicate window (2 minutes); the outcome consumer waits
//! for the row of an outcome it cannot find ([`crate::outcomes`]). Only if PostgreSQL stays
//! down longer than the duplicate window can such a task run a second time.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::PgPool;

use crate::store::{FlushError, Incarnations};

/// How often a waiting flush checks how far PostgreSQL has flushed the WAL.
const FLUSH_POLL: Duration = Duration::from_millis(10);
/// When the WAL has not been flushed far enough by then, force a flush.
const FLUSH_FORCE_AFTER: Duration = Duration::from_millis(300);

/// Shared by the admission batches of one replica.
#[derive(Debug, Default)]
pub(crate) struct WalFlush {
    /// Batches that have asked for a flush so far.
    requested: AtomicU64,
    /// Held by the batch whose flush is in progress; what the last flush covered.
    last: tokio::sync::Mutex<Covered>,
}

#[derive(Debug, Default)]
struct Covered {
    /// Every request up to this one is covered by a completed flush...
    upto: u64,
    /// ...in this incarnation of the server (see [`Incarnations`]).
    token: String,
}

impl WalFlush {
    /// Return once the rows this task wrote or read (`seen`) are on disk.
    pub(crate) async fn wait(&self, db: &PgPool, seen: &Incarnations) -> Result<(), FlushError> {
        let token = self
            .wait_for(|| crate::store::flush_wal(db, FLUSH_POLL, FLUSH_FORCE_AFTER))
            .await?;
        if seen.all_under(&token) {
            Ok(())
        } else {
            Err(FlushError::Restarted)
        }
    }

    /// Wait for a flush that started after this call (run by this caller or by one queued
    /// before it) and return the token it reported; `flush` is run unless such a flush already
    /// completed.
    async fn wait_for<F, Fut, E>(&self, flush: F) -> Result<String, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<String, E>>,
    {
        let me = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        // Fair lock: the waiters queued behind a flush in progress find themselves covered by
        // the next one, which the first of them runs.
        let mut last = self.last.lock().await;
        if last.upto >= me {
            return Ok(last.token.clone());
        }
        // Every request counted so far was made after its writes returned, and this flush
        // starts now: it covers them all.
        let upto = self.requested.load(Ordering::SeqCst);
        let token = flush().await?;
        *last = Covered {
            upto,
            token: token.clone(),
        };
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn waiters_during_a_flush_share_the_next_one() {
        let f = Arc::new(WalFlush::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let slow_flush = |runs: Arc<AtomicUsize>| async move {
            runs.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok::<_, ()>("t1".to_string())
        };
        // The first caller starts a flush; ten more arrive while it runs.
        let first = {
            let (f, r) = (f.clone(), runs.clone());
            tokio::spawn(async move { f.wait_for(|| slow_flush(r)).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        let mut later = Vec::new();
        for _ in 0..10 {
            let (f, r) = (f.clone(), runs.clone());
            later.push(tokio::spawn(
                async move { f.wait_for(|| slow_flush(r)).await },
            ));
        }
        assert_eq!(first.await.unwrap().unwrap(), "t1");
        for h in later {
            assert_eq!(h.await.unwrap().unwrap(), "t1");
        }
        // The first flush started before they asked, so it cannot cover them; one more does.
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        assert_eq!(f.last.lock().await.upto, 11);
    }

    #[tokio::test]
    async fn a_failed_flush_covers_nobody() {
        let f = WalFlush::default();
        let r: Result<String, &str> = f.wait_for(|| async { Err("disk gone") }).await;
        assert_eq!(r, Err("disk gone"));
        assert_eq!(f.last.lock().await.upto, 0);
        // The next caller flushes again rather than trusting the failed one.
        let ran = AtomicUsize::new(0);
        let token = f
            .wait_for(|| async {
                ran.fetch_add(1, Ordering::SeqCst);
                Ok::<_, &str>("t2".to_string())
            })
            .await
            .unwrap();
        assert_eq!((ran.load(Ordering::SeqCst), token.as_str()), (1, "t2"));
        assert_eq!(f.last.lock().await.upto, 2);
    }
}
