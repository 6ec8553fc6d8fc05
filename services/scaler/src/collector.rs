//! The two loops that keep [`Shared`] fresh: a watcher of the pools KV bucket, and the refresh
//! loop that reads every pool's work consumer (`work-<pool>` on `TASKBUS_WORK`) each
//! `refresh_interval` and recomputes its lag (formulas in [`crate::lag`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use chrono::Utc;
use futures::StreamExt;
use taskbus_proto::{Priority, Subjects};
use taskbus_runtime::CancellationToken;
use tracing::{debug, info, warn};

use crate::lag::{desired_replicas, DesiredInput, Estimator, PoolLag, Sample};
use crate::metrics::PoolLabel;
use crate::state::{parse_pool, Pool, Shared};
use crate::ScalerError;

/// Load every pool once (so the scaler is ready with its pools known).
pub async fn load_pools(kv: &kv::Store, shared: &Shared) -> Result<(), ScalerError> {
    let mut keys = kv.keys().await.map_err(ScalerError::js)?;
    let mut names = Vec::new();
    while let Some(k) = keys.next().await {
        names.push(k.map_err(ScalerError::js)?);
    }
    for name in names {
        if let Some(bytes) = kv.get(&name).await.map_err(ScalerError::js)? {
            apply(shared, &name, Some(&bytes));
        }
    }
    Ok(())
}

fn apply(shared: &Shared, name: &str, value: Option<&[u8]>) {
    let Some(bytes) = value else {
        info!(pool = name, "pool deleted");
        shared.remove_pool(name);
        return;
    };
    if !taskbus_proto::ids::is_valid_pool(name) {
        warn!(
            pool = name,
            "ignoring a key of the pools bucket that is not a valid pool name"
        );
        return;
    }
    let entry = parse_pool(bytes);
    if let Err(e) = &entry {
        warn!(pool = name, error = %e, "pool settings cannot be used; requests for the pool get this error");
    }
    shared.set_pool(name, entry);
}

/// Follow the bucket until shutdown, re-subscribing after errors.
pub async fn watch_pools(kv: kv::Store, shared: Arc<Shared>, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        let mut watch = match kv.watch_with_history(">").await {
            Ok(w) => w,
            Err(e) => {
                warn!(error = %e, "cannot watch the pools bucket; retrying");
                pause(&shutdown, Duration::from_secs(1)).await;
                continue;
            }
        };
        loop {
            let next = tokio::select! {
                n = watch.next() => n,
                _ = shutdown.cancelled() => return,
            };
            match next {
                Some(Ok(entry)) => {
                    let value =
                        matches!(entry.operation, kv::Operation::Put).then_some(&entry.value[..]);
                    apply(&shared, &entry.key, value);
                }
                Some(Err(e)) => {
                    warn!(error = %e, "pools bucket watch failed; re-subscribing");
                    break;
                }
                None => break,
            }
        }
        pause(&shutdown, Duration::from_millis(200)).await;
    }
}

/// Settings of the refresh loop.
#[derive(Debug, Clone)]
pub struct RefreshConfig {
    pub interval: Duration,
    /// EWMA time constant of the rates.
    pub smoothing: Duration,
    /// Service time assumed until one is measured.
    pub default_service_time: Duration,
}

struct PoolTrack {
    estimator: Estimator,
    /// Replicas held since the current freeze began.
    held: Option<u32>,
    last_published: Option<u32>,
    /// The last read failed (warned once).
    failing: bool,
}

/// Refresh every pool each interval until shutdown.
pub async fn refresh_loop(
    js: jetstream::Context,
    subjects: Subjects,
    shared: Arc<Shared>,
    cfg: RefreshConfig,
    health: taskbus_runtime::http::Health,
    shutdown: CancellationToken,
) {
    let clock = Instant::now();
    let mut tracks: HashMap<String, PoolTrack> = HashMap::new();
    let mut ticker = tokio::time::interval(cfg.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let pools = shared.pools();
        tracks.retain(|k, _| pools.iter().any(|(p, _)| p == k));
        // Read every pool at once (a few requests each), then fold the results in order.
        let reads = futures::future::join_all(
            pools
                .iter()
                .map(|(name, _)| read_timed(&js, &subjects, name)),
        )
        .await;
        let at_s = clock.elapsed().as_secs_f64();
        let failed = reads.iter().filter(|r| r.is_err()).count();
        // Not ready while no pool can be read (NATS away): KEDA and the HPA then keep the
        // current replica counts instead of acting on stale figures.
        health.set_ready(pools.is_empty() || failed < pools.len());
        for ((name, pool), read) in pools.iter().zip(reads) {
            let track = tracks.entry(name.clone()).or_insert_with(|| PoolTrack {
                estimator: Estimator::new(
                    cfg.smoothing.as_secs_f64(),
                    cfg.default_service_time.as_secs_f64(),
                ),
                held: None,
                last_published: None,
                failing: false,
            });
            match read {
                Ok(read) => {
                    if std::mem::take(&mut track.failing) {
                        info!(pool = %name, "reading the pool's work consumer works again");
                    }
                    let agents = shared.agents.live(name, Instant::now());
                    shared.set_lag(compute(name, pool, track, read, agents, at_s));
                }
                Err(e) => {
                    shared
                        .metrics
                        .refresh_errors
                        .get_or_create(&PoolLabel { pool: name.clone() })
                        .inc();
                    // Warn once per outage; the figures keep their last timestamp meanwhile.
                    if !std::mem::replace(&mut track.failing, true) {
                        warn!(pool = %name, error = %e, "cannot read the pool's work consumer; figures are stale");
                    }
                }
            }
        }
        shared.tick();
    }
}

/// What one consumer read returned.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConsumerRead {
    pub found: bool,
    pub pending: u64,
    pub ack_pending: u64,
    pub delivered: u64,
    pub delayed: u64,
    pub oldest_age_seconds: f64,
}

/// Longest wait for one pool's read; NATS being away must not stall the loop for the client's
/// 10 s request timeout.
const READ_TIMEOUT: Duration = Duration::from_secs(2);

async fn read_timed(
    js: &jetstream::Context,
    subjects: &Subjects,
    pool: &str,
) -> Result<ConsumerRead, ScalerError> {
    tokio::time::timeout(READ_TIMEOUT, read_consumer(js, subjects, pool))
        .await
        .unwrap_or_else(|_| {
            Err(ScalerError::JetStream(format!(
                "no answer within {READ_TIMEOUT:?}"
            )))
        })
}

async fn read_consumer(
    js: &jetstream::Context,
    subjects: &Subjects,
    pool: &str,
) -> Result<ConsumerRead, ScalerError> {
    let stream = js
        .get_stream_no_info(subjects.work_stream())
        .await
        .map_err(ScalerError::js)?;
    let delayed = count_delayed(&stream, subjects, pool).await;
    // One consumer per priority band: the pool's figures are their sums (the oldest waiting
    // task is the oldest over the bands).
    let mut read = ConsumerRead {
        delayed,
        ..Default::default()
    };
    for priority in Priority::ALL {
        let info = match stream
            .consumer_info(subjects.work_consumer(pool, priority))
            .await
        {
            Ok(i) => i,
            Err(e)
                if matches!(
                    e.kind(),
                    jetstream::context::ConsumerInfoErrorKind::NotFound
                ) =>
            {
                continue;
            }
            Err(e) => return Err(ScalerError::js(e)),
        };
        read.found = true;
        read.pending += info.num_pending;
        read.ack_pending += info.num_ack_pending as u64;
        read.delivered += info.delivered.consumer_sequence;
        if info.num_pending > 0 {
            // The first message of the band after its last delivered one is its oldest waiting.
            let from = info.delivered.stream_sequence.saturating_add(1);
            if let Ok(msg) = stream
                .get_first_raw_message_by_subject(subjects.work(pool, priority), from)
                .await
            {
                let age = Utc::now().signed_duration_since(msg.time);
                let age = (age.num_milliseconds().max(0) as f64) / 1000.0;
                read.oldest_age_seconds = read.oldest_age_seconds.max(age);
            }
        }
    }
    Ok(read)
}

/// Delayed attempts of `pool`: one schedule message per attempt on
/// `<prefix>.sched.<pool>.<task>.<attempt>` in the work stream (the coordinator's retry backoff).
async fn count_delayed(
    stream: &jetstream::stream::Stream<()>,
    subjects: &Subjects,
    pool: &str,
) -> u64 {
    let filter = format!("{}.sched.{pool}.>", subjects.prefix());
    let mut info = match stream.info_with_subjects(filter).await {
        Ok(i) => i,
        Err(e) => {
            debug!(pool, error = %e, "cannot count delayed attempts");
            return 0;
        }
    };
    let mut n = 0u64;
    while let Some(item) = info.next().await {
        match item {
            Ok((_, count)) => n = n.saturating_add(count as u64),
            Err(e) => {
                debug!(pool, error = %e, "cannot count delayed attempts");
                break;
            }
        }
    }
    n
}

fn compute(
    name: &str,
    pool: &Pool,
    track: &mut PoolTrack,
    read: ConsumerRead,
    agents: u32,
    at_s: f64,
) -> PoolLag {
    track.estimator.observe(Sample {
        at_s,
        pending: read.pending,
        ack_pending: read.ack_pending,
        delivered: read.delivered,
    });
    let (service, measured) = track.estimator.service_time();
    let s = &pool.settings;
    let desired = desired_replicas(&DesiredInput {
        backlog: read.pending,
        in_flight: read.ack_pending,
        arrival_rate: track.estimator.arrival_rate(),
        service_time_s: service,
        service_time_measured: measured,
        per_replica: s.target_per_replica,
        target_latency_s: s.target_latency_s,
        min_replicas: s.min_replicas,
        max_replicas: s.max_replicas,
    });
    let now = Utc::now();
    let frozen = crate::freeze::frozen(&pool.windows, now);
    let published = if frozen {
        // Hold the replica count of the moment the freeze began: the live agents when they
        // send heartbeats, else what was published last; a scaler that starts inside a freeze
        // with neither holds the agents busy right now (in flight / per replica), within min/max.
        *track.held.get_or_insert_with(|| {
            let known = (agents > 0).then_some(agents).or(track.last_published);
            known.unwrap_or_else(|| {
                let busy = read
                    .ack_pending
                    .div_ceil(u64::from(s.target_per_replica.max(1)));
                (busy.min(u64::from(u32::MAX)) as u32)
                    .clamp(s.min_replicas, s.max_replicas.max(s.min_replicas))
            })
        })
    } else {
        track.held = None;
        desired
    };
    track.last_published = Some(published);
    PoolLag {
        pool: name.to_string(),
        backlog: read.pending,
        in_flight: read.ack_pending,
        delayed: read.delayed,
        agents,
        oldest_age_seconds: read.oldest_age_seconds,
        arrival_rate: track.estimator.arrival_rate(),
        completion_rate: track.estimator.completion_rate(),
        service_time_seconds: service,
        service_time_measured: measured,
        desired_replicas: desired,
        frozen,
        published_replicas: published,
        consumer_found: read.found,
        updated_at: now,
    }
}

async fn pause(shutdown: &CancellationToken, d: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = shutdown.cancelled() => {}
    }
}
