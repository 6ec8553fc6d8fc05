//! Pulling work in priority order.
//!
//! Each pool has one durable consumer per priority band (`work-<pool>-high|normal|low`). The
//! rule (docs/PROTOCOL.md, "Priorities"):
//!
//! - When slots are free the agent asks the bands with no-wait fetches, `high` first, then
//!   `normal`, then `low`, for as many tasks as it has free slots. So while tasks wait in several
//!   bands, `high` ones are taken first.
//! - `low` is not starved: once an agent has taken [`LOW_EVERY`]` - 1` tasks from the other
//!   bands since its last `low` one, its next fetch asks `low` first (for every tenth of the
//!   tasks it is about to take). While `low` tasks wait, at least one in ten tasks an agent
//!   starts is a `low` one.
//! - When every band is empty the agent long-polls all three at once, each for a third of its
//!   free slots (rounded up), and starts what arrives; with free slots there is nothing to
//!   order. While all three polls are out it makes no other requests. A poll that expires
//!   unfilled is renewed at once; one that filled up sends the agent back to fetching in
//!   priority order, since more may be waiting. Only with fewer than three free slots can
//!   more arrive than there are slots; such a task is handed straight back (`nak`) to be
//!   delivered to another agent.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, AckKind};
use futures::stream::{self, SelectAll, Stream, StreamExt};
use taskbus_proto::Priority;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

use crate::{lock, process, BreakerState, Handler, Shared};

/// While `low` tasks wait, at least one in `LOW_EVERY` tasks an agent takes is a `low` one.
pub const LOW_EVERY: usize = 10;

/// Longest wait for the answer to a no-wait fetch.
const FETCH_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// The pool's three work consumers, in priority order.
pub(crate) struct Bands {
    pub consumers: [(Priority, PullConsumer); 3],
}

fn band_index(p: Priority) -> usize {
    match p {
        Priority::High => 0,
        Priority::Normal => 1,
        Priority::Low => 2,
    }
}

/// Which bands to ask, in order, and for how many tasks at most, when `want` slots are free
/// and `since_low` tasks were taken from `high`/`normal` since the last `low` one.
pub(crate) fn plan(want: usize, since_low: usize) -> Vec<(Priority, usize)> {
    let owed = ((since_low + want) / LOW_EVERY).min(want);
    let mut p = Vec::with_capacity(4);
    if owed > 0 {
        p.push((Priority::Low, owed));
    }
    p.extend(Priority::ALL.map(|b| (b, want)));
    p
}

/// The new `since_low` after taking `low` low tasks and `other` tasks from the other bands.
/// Capped so that a long stretch without `low` tasks does not let a later burst of them push
/// ahead of `high` for long.
pub(crate) fn after_take(since_low: usize, low: usize, other: usize) -> usize {
    (since_low + other)
        .saturating_sub(low * (LOW_EVERY - 1))
        .min(LOW_EVERY - 1)
}

enum Polled {
    Msg(Priority, Box<Result<jetstream::Message, async_nats::Error>>),
    Ended(Priority),
}

type PollStream = Pin<Box<dyn Stream<Item = Polled> + Send>>;

/// One band's outstanding long-poll, if any.
#[derive(Debug, Clone, Copy)]
struct BandPoll {
    active: bool,
    asked: usize,
    delivered: usize,
    since: Instant,
}

struct Puller<'a, H> {
    shared: &'a Arc<Shared<H>>,
    bands: &'a Bands,
    tracker: &'a taskbus_runtime::TaskTracker,
    slots: Arc<Semaphore>,
    polls: SelectAll<PollStream>,
    poll: [BandPoll; 3],
    /// A poll ended early without delivering anything (the server refused it): pause before
    /// asking again.
    refused: bool,
    since_low: usize,
}

pub(crate) async fn pull_loop<H: Handler>(
    shared: &Arc<Shared<H>>,
    bands: &Bands,
    tracker: &taskbus_runtime::TaskTracker,
    shutdown: &taskbus_runtime::CancellationToken,
) {
    let mut p = Puller {
        shared,
        bands,
        tracker,
        slots: Arc::new(Semaphore::new(shared.config.concurrency)),
        polls: SelectAll::new(),
        poll: [BandPoll {
            active: false,
            asked: 0,
            delivered: 0,
            since: Instant::now(),
        }; 3],
        refused: false,
        since_low: 0,
    };
    loop {
        if shutdown.is_cancelled() {
            // Outstanding long-polls may still deliver: hand each such task back at once.
            while let Some(polled) = p.polls.next().await {
                if let Polled::Msg(_, m) = polled {
                    let Ok(m) = *m else { continue };
                    hand_back(m).await;
                    shared.stats.handed_back.fetch_add(1, Ordering::Relaxed);
                }
            }
            return;
        }
        let state = lock(&shared.breaker).state(Instant::now());
        let pause = match state {
            BreakerState::Open(until) => Some(until.saturating_duration_since(Instant::now())),
            BreakerState::HalfOpen if shared.stats.in_flight.load(Ordering::Relaxed) > 0 => {
                Some(Duration::from_millis(50))
            }
            _ => None,
        };
        if let Some(d) = pause {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(d) => {}
                Some(polled) = p.polls.next(), if !p.polls.is_empty() => p.on_polled(polled).await,
            }
            continue;
        }
        if room_left(shared) == 0 {
            // The handler has no room (e.g. no free GPU): take nothing until it has.
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = shared.room_freed.notified() => {}
                _ = tokio::time::sleep(ROOM_RECHECK) => {}
                Some(polled) = p.polls.next(), if !p.polls.is_empty() => p.on_polled(polled).await,
            }
            continue;
        }
        if p.poll.iter().all(|b| b.active) {
            // Every band has a long-poll out: arrivals come through them. Fetching as well
            // would only cost requests (what a band holds goes to its poll first).
            tokio::select! {
                _ = shutdown.cancelled() => {}
                polled = p.polls.next() => if let Some(polled) = polled {
                    p.on_polled(polled).await;
                },
            }
            continue;
        }
        let first = tokio::select! {
            _ = shutdown.cancelled() => continue,
            permit = p.slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            Some(polled) = p.polls.next(), if !p.polls.is_empty() => {
                p.on_polled(polled).await;
                continue;
            }
        };
        let want = if state == BreakerState::HalfOpen {
            1
        } else {
            (1 + p.slots.available_permits()).min(room_left(shared).max(1))
        };
        if p.fetch_in_order(want, first, shutdown).await > 0 {
            continue;
        }
        // The bands without a poll are empty: long-poll them (the loop then waits above).
        if std::mem::take(&mut p.refused) || !p.start_polls().await {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }
}

impl<H: Handler> Puller<'_, H> {
    /// No-wait fetches in priority order for `want` tasks; `first` is a slot already held.
    /// Returns how many tasks were taken.
    async fn fetch_in_order(
        &mut self,
        want: usize,
        first: OwnedSemaphorePermit,
        shutdown: &taskbus_runtime::CancellationToken,
    ) -> usize {
        let mut first = Some(first);
        let (mut low, mut other) = (0, 0);
        for (band, n) in plan(want, self.since_low) {
            let n = n.min(want - low - other);
            if n == 0 || self.poll[band_index(band)].active {
                continue;
            }
            let consumer = &self.bands.consumers[band_index(band)].1;
            let mut batch = match consumer.fetch().max_messages(n).messages().await {
                Ok(b) => b,
                Err(e) => {
                    warn!(band = band.as_str(), error = %e, "pull request failed");
                    continue;
                }
            };
            // A no-wait fetch has no expiry of its own; if its answer is lost (the connection
            // dropped), give up on it rather than wait forever.
            let give_up = tokio::time::sleep(FETCH_ANSWER_TIMEOUT);
            tokio::pin!(give_up);
            loop {
                let msg = tokio::select! {
                    m = batch.next() => match m {
                        Some(m) => m,
                        None => break,
                    },
                    _ = &mut give_up => {
                        warn!(band = band.as_str(), "no answer to a pull request; asking again");
                        break;
                    }
                };
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => {
                        debug!(error = %e, "pull notice");
                        continue;
                    }
                };
                if shutdown.is_cancelled() {
                    hand_back(msg).await;
                    self.shared
                        .stats
                        .handed_back
                        .fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let permit = first
                    .take()
                    .or_else(|| self.slots.clone().try_acquire_owned().ok());
                match permit {
                    Some(permit) => {
                        self.start(msg, permit);
                        if band == Priority::Low {
                            low += 1;
                        } else {
                            other += 1;
                        }
                    }
                    // Cannot happen (only this loop takes slots), but never run over the limit.
                    None => hand_back(msg).await,
                }
            }
        }
        self.since_low = after_take(self.since_low, low, other);
        low + other
    }

    /// Long-poll every band that has no poll outstanding. False when a pull request could
    /// not be made.
    async fn start_polls(&mut self) -> bool {
        let mut ok = true;
        for band in Priority::ALL {
            if !self.poll[band_index(band)].active {
                ok &= self.start_poll(band).await;
            }
        }
        ok
    }

    /// Long-poll one band for a third of the free slots (at least one).
    async fn start_poll(&mut self, band: Priority) -> bool {
        let i = band_index(band);
        let each = self
            .slots
            .available_permits()
            .min(room_left(self.shared))
            .max(1)
            .div_ceil(3);
        let consumer = &self.bands.consumers[i].1;
        match consumer
            .batch()
            .max_messages(each)
            .expires(self.shared.config.pull_expiry)
            .messages()
            .await
        {
            Ok(batch) => {
                let s = batch
                    .map(move |m| Polled::Msg(band, Box::new(m)))
                    .chain(stream::once(async move { Polled::Ended(band) }));
                self.polls.push(Box::pin(s));
                self.poll[i] = BandPoll {
                    active: true,
                    asked: each,
                    delivered: 0,
                    since: Instant::now(),
                };
                true
            }
            Err(e) => {
                warn!(band = band.as_str(), error = %e, "pull request failed; retrying");
                false
            }
        }
    }

    /// A task (or the end) from a long-poll: start it if a slot is free and the breaker lets
    /// it, else hand it back for another agent.
    async fn on_polled(&mut self, polled: Polled) {
        let (band, msg) = match polled {
            Polled::Ended(band) => {
                let i = band_index(band);
                let done = self.poll[i];
                self.poll[i].active = false;
                let closed =
                    lock(&self.shared.breaker).state(Instant::now()) == BreakerState::Closed;
                if done.delivered < done.asked {
                    if done.since.elapsed() >= self.shared.config.pull_expiry / 2 {
                        // It expired with room left, so the band is empty: poll it again
                        // straight away (a full poll may mean more is waiting: the main
                        // loop fetches in priority order first).
                        if closed {
                            self.start_poll(band).await;
                        }
                    } else if done.delivered == 0 {
                        self.refused = true;
                    }
                }
                return;
            }
            Polled::Msg(band, m) => match *m {
                Ok(m) => {
                    self.poll[band_index(band)].delivered += 1;
                    (band, m)
                }
                Err(e) => {
                    debug!(error = %e, "pull notice");
                    return;
                }
            },
        };
        let allowed = match lock(&self.shared.breaker).state(Instant::now()) {
            BreakerState::Closed => true,
            BreakerState::HalfOpen => self.shared.stats.in_flight.load(Ordering::Relaxed) == 0,
            BreakerState::Open(_) => false,
        } && room_left(self.shared) > 0;
        match self.slots.clone().try_acquire_owned() {
            Ok(permit) if allowed => {
                self.start(msg, permit);
                let (low, other) = if band == Priority::Low {
                    (1, 0)
                } else {
                    (0, 1)
                };
                self.since_low = after_take(self.since_low, low, other);
            }
            _ => hand_back(msg).await,
        }
    }

    fn start(&self, msg: jetstream::Message, permit: OwnedSemaphorePermit) {
        let shared = self.shared.clone();
        shared.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        // Until `process` has its placement (see `Waiting` there).
        shared.stats.waiting.fetch_add(1, Ordering::Relaxed);
        self.tracker.spawn(async move {
            process(&shared, msg).await;
            shared.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
}

/// How often the pull loop asks a handler without room whether it has some now. One of this
/// agent's attempts ending wakes it at once; this catches room freed elsewhere (another pool's
/// agent sharing the handler's resources).
const ROOM_RECHECK: Duration = Duration::from_millis(25);

/// How many more tasks the handler lets this agent take: its room, less the tasks already
/// taken and still waiting for a placement.
fn room_left<H: Handler>(shared: &Shared<H>) -> usize {
    shared
        .handler
        .room()
        .saturating_sub(shared.stats.waiting.load(Ordering::Relaxed) as usize)
}

/// Give a task back to the server for immediate redelivery (to any agent).
async fn hand_back(msg: jetstream::Message) {
    if let Err(e) = msg.ack_with(AckKind::Nak(None)).await {
        debug!(error = %e, "hand-back failed; the task returns after ack_wait");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Simulates one agent with one slot taking tasks while every band has some waiting.
    fn take_sequence(n: usize) -> Vec<Priority> {
        let mut since_low = 0;
        let mut out = Vec::new();
        for _ in 0..n {
            let (band, _) = plan(1, since_low)[0];
            let (low, other) = if band == Priority::Low {
                (1, 0)
            } else {
                (0, 1)
            };
            since_low = after_take(since_low, low, other);
            out.push(band);
        }
        out
    }

    #[test]
    fn one_slot_takes_high_with_every_tenth_low() {
        let seq = take_sequence(30);
        for (i, b) in seq.iter().enumerate() {
            let expect = if i % LOW_EVERY == LOW_EVERY - 1 {
                Priority::Low
            } else {
                Priority::High
            };
            assert_eq!(*b, expect, "take {i}");
        }
    }

    #[test]
    fn big_fetch_reserves_a_tenth_for_low() {
        assert_eq!(plan(100, 0)[0], (Priority::Low, 10));
        assert_eq!(plan(5, 0)[0], (Priority::High, 5));
        assert_eq!(plan(5, 5)[0], (Priority::Low, 1));
        assert_eq!(plan(1, 0).len(), 3);
    }

    #[test]
    fn owed_low_is_capped() {
        // 10,000 normal tasks without a low one do not let low jump ahead for long.
        let mut s = 0;
        for _ in 0..10_000 {
            s = after_take(s, 0, 1);
        }
        assert_eq!(s, LOW_EVERY - 1);
        assert_eq!(after_take(s, 1, 0), 0);
        assert_eq!(after_take(0, 3, 5), 0);
    }
}
