//! Which task gets which GPUs, and when.
//!
//! One allocator serves every pool of a dispatcher process. Its rules (docs/GPU.md):
//! - a task gets whole GPUs that match what it asked for (count, product, memory per GPU) and
//!   are free; a GPU is never given to two tasks;
//! - a pool may have a quota: at most that many of its GPUs in use at once;
//! - pools are ranked in the order they were given; waiting tasks are served in order of
//!   (pool rank, arrival). A task that fits its quota but not the free GPUs blocks every task
//!   behind it (no backfilling), so a task asking for many GPUs is not starved by a stream of
//!   small ones. A task held back by its own pool's quota blocks only that pool;
//! - a task that could never be placed (more matching GPUs than exist, or than its pool's quota)
//!   is refused at once with a sentence saying why.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// One GPU the dispatcher may hand out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    /// What goes into `CUDA_VISIBLE_DEVICES` (an NVML UUID, or an index for declared GPUs).
    pub id: String,
    /// Product name as GPU Feature Discovery spells it (`NVIDIA-H100-80GB-HBM3`); `None`
    /// matches any request (Kubernetes backend: the scheduler checks).
    pub product: Option<String>,
    /// Memory, MiB; `None` matches any request.
    pub memory_mib: Option<u64>,
}

/// What one task asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub pool: String,
    pub gpus: u32,
    pub memory_mib: Option<u64>,
    pub product: Option<String>,
}

/// A pool served by the dispatcher, in rank order (first = served first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolQuota {
    pub pool: String,
    /// Most GPUs the pool may hold at once; `None` = all of them.
    pub quota: Option<u32>,
}

/// GPU product names compare without case, and with spaces as dashes (NVML says
/// `NVIDIA H100 80GB HBM3`, GPU Feature Discovery `NVIDIA-H100-80GB-HBM3`).
pub fn same_product(a: &str, b: &str) -> bool {
    let norm = |s: &str| s.trim().replace(' ', "-").to_ascii_lowercase();
    norm(a) == norm(b)
}

fn matches(gpu: &Gpu, req: &Request) -> bool {
    let product_ok = match (&req.product, &gpu.product) {
        (Some(want), Some(have)) => same_product(want, have),
        _ => true,
    };
    let memory_ok = match (req.memory_mib, gpu.memory_mib) {
        (Some(want), Some(have)) => have >= want,
        _ => true,
    };
    product_ok && memory_ok
}

#[derive(Debug)]
struct Waiter {
    pool: usize,
    req: Request,
    granted: Option<Vec<usize>>,
}

#[derive(Debug)]
struct Inner {
    gpus: Vec<Gpu>,
    busy: Vec<bool>,
    pools: Vec<PoolQuota>,
    used: Vec<u32>,
    /// Waiting tasks by (pool rank, arrival).
    queue: BTreeMap<(usize, u64), Waiter>,
    next: u64,
}

impl Inner {
    fn quota_left(&self, pool: usize) -> u32 {
        match self.pools[pool].quota {
            Some(q) => q.saturating_sub(self.used[pool]),
            None => u32::MAX,
        }
    }

    /// Free GPUs matching `req`, lowest index first, if there are enough.
    fn pick(&self, req: &Request) -> Option<Vec<usize>> {
        let picked: Vec<usize> = (0..self.gpus.len())
            .filter(|&i| !self.busy[i] && matches(&self.gpus[i], req))
            .take(req.gpus as usize)
            .collect();
        (picked.len() == req.gpus as usize).then_some(picked)
    }

    /// Grant waiting tasks in order until one cannot be placed (see the module's rules).
    fn pump(&mut self) {
        let mut quota_held = vec![false; self.pools.len()];
        let keys: Vec<(usize, u64)> = self.queue.keys().copied().collect();
        for key in keys {
            let (pool, gpus) = {
                let w = &self.queue[&key];
                if w.granted.is_some() {
                    continue;
                }
                (w.pool, w.req.gpus)
            };
            if quota_held[pool] {
                continue;
            }
            if self.quota_left(pool) < gpus {
                quota_held[pool] = true;
                continue;
            }
            let Some(picked) = self.pick(&self.queue[&key].req) else {
                return; // head of the line: nothing behind it goes first
            };
            for &i in &picked {
                self.busy[i] = true;
            }
            self.used[pool] += gpus;
            if let Some(w) = self.queue.get_mut(&key) {
                w.granted = Some(picked);
            }
        }
    }

    fn release(&mut self, pool: usize, picked: &[usize]) {
        for &i in picked {
            self.busy[i] = false;
        }
        self.used[pool] = self.used[pool].saturating_sub(picked.len() as u32);
        self.pump();
    }
}

/// The GPUs of one dispatcher and the tasks waiting for them.
#[derive(Debug)]
pub struct Allocator {
    inner: Mutex<Inner>,
    changed: Notify,
}

/// GPUs held by one task; given back when dropped.
#[derive(Debug)]
pub struct Grant {
    alloc: Arc<Allocator>,
    pool: usize,
    picked: Vec<usize>,
    /// The ids of the GPUs, in order.
    pub devices: Vec<String>,
}

impl Drop for Grant {
    fn drop(&mut self) {
        self.alloc.lock().release(self.pool, &self.picked);
        self.alloc.changed.notify_waiters();
    }
}

/// Removes a waiter that stopped waiting (its task was cancelled or handed back), giving back
/// what it may have been granted meanwhile.
struct Queued<'a> {
    alloc: &'a Arc<Allocator>,
    key: Option<(usize, u64)>,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        let Some(key) = self.key else { return };
        let mut inner = self.alloc.lock();
        if let Some(w) = inner.queue.remove(&key) {
            match w.granted {
                Some(picked) => inner.release(w.pool, &picked),
                None => inner.pump(),
            }
            drop(inner);
            self.alloc.changed.notify_waiters();
        }
    }
}

impl Allocator {
    pub fn new(gpus: Vec<Gpu>, pools: Vec<PoolQuota>) -> Arc<Self> {
        let n = gpus.len();
        let p = pools.len();
        Arc::new(Self {
            inner: Mutex::new(Inner {
                gpus,
                busy: vec![false; n],
                pools,
                used: vec![0; p],
                queue: BTreeMap::new(),
                next: 0,
            }),
            changed: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn rank(inner: &Inner, pool: &str) -> Option<usize> {
        inner.pools.iter().position(|p| p.pool == pool)
    }

    /// How many more tasks `pool` may take now: 0 while one of its tasks, or a task of a pool
    /// ranked before it, waits for GPUs; else its free GPUs (within its quota). An upper bound:
    /// a task may ask for several GPUs.
    pub fn room(&self, pool: &str) -> usize {
        let inner = self.lock();
        let Some(rank) = Self::rank(&inner, pool) else {
            return 0;
        };
        // A waiter of a pool ranked first blocks this one only while it waits for GPUs (a
        // waiter held back by its own pool's quota does not).
        let blocked = inner.queue.iter().any(|((r, _), w)| {
            w.granted.is_none()
                && (w.pool == rank || (*r < rank && inner.quota_left(w.pool) >= w.req.gpus))
        });
        if blocked {
            return 0;
        }
        let free = inner.busy.iter().filter(|b| !**b).count();
        free.min(inner.quota_left(rank) as usize)
    }

    /// Why `req` can never be placed here, if it cannot.
    pub fn never(&self, req: &Request) -> Option<String> {
        let inner = self.lock();
        let Some(rank) = Self::rank(&inner, &req.pool) else {
            return Some(format!(
                "this dispatcher does not serve pool {:?}",
                req.pool
            ));
        };
        if req.gpus == 0 {
            return Some("a GPU task needs at least 1 GPU".into());
        }
        if let Some(q) = inner.pools[rank].quota {
            if req.gpus > q {
                return Some(format!(
                    "the task asks for {} GPUs but pool {:?} may use at most {q} at once \
                     (its quota on this dispatcher)",
                    req.gpus, req.pool
                ));
            }
        }
        let matching = inner.gpus.iter().filter(|g| matches(g, req)).count();
        if (req.gpus as usize) > matching {
            let mut want = format!("{} GPU(s)", req.gpus);
            if let Some(p) = &req.product {
                want.push_str(&format!(" of product {p:?}"));
            }
            if let Some(m) = req.memory_mib {
                want.push_str(&format!(" with at least {m} MiB"));
            }
            let have: Vec<String> = inner
                .gpus
                .iter()
                .map(|g| {
                    format!(
                        "{} ({}, {} MiB)",
                        g.id,
                        g.product.as_deref().unwrap_or("any product"),
                        g.memory_mib.map_or("?".into(), |m| m.to_string())
                    )
                })
                .collect();
            return Some(format!(
                "the task asks for {want}; this dispatcher has {matching} such GPU(s) of {}: [{}]",
                inner.gpus.len(),
                have.join(", ")
            ));
        }
        None
    }

    /// Wait until `req` is granted (in the order of the module's rules). `Err` with a sentence
    /// when it never can be. Dropping the future gives up the place in the line.
    pub async fn acquire(self: &Arc<Self>, req: Request) -> Result<Grant, String> {
        if let Some(why) = self.never(&req) {
            return Err(why);
        }
        let mut queued = Queued {
            alloc: self,
            key: None,
        };
        {
            let mut inner = self.lock();
            let rank = Self::rank(&inner, &req.pool).unwrap_or_default();
            let key = (rank, inner.next);
            inner.next += 1;
            inner.queue.insert(
                key,
                Waiter {
                    pool: rank,
                    req,
                    granted: None,
                },
            );
            inner.pump();
            queued.key = Some(key);
        }
        let key = queued.key.unwrap_or_default();
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut inner = self.lock();
                if inner.queue.get(&key).is_some_and(|w| w.granted.is_some()) {
                    let w = inner.queue.remove(&key).expect("checked above");
                    queued.key = None;
                    let picked = w.granted.unwrap_or_default();
                    let devices = picked.iter().map(|&i| inner.gpus[i].id.clone()).collect();
                    return Ok(Grant {
                        alloc: self.clone(),
                        pool: w.pool,
                        picked,
                        devices,
                    });
                }
            }
            changed.await;
        }
    }

    /// GPUs in all, and in use by each pool (for metrics).
    pub fn usage(&self) -> (usize, Vec<(String, u32, usize)>) {
        let inner = self.lock();
        let per_pool = inner
            .pools
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let waiting = inner
                    .queue
                    .values()
                    .filter(|w| w.pool == i && w.granted.is_none())
                    .count();
                (p.pool.clone(), inner.used[i], waiting)
            })
            .collect();
        (inner.gpus.len(), per_pool)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn gpus(n: usize, product: &str, mib: u64) -> Vec<Gpu> {
        (0..n)
            .map(|i| Gpu {
                id: i.to_string(),
                product: Some(product.into()),
                memory_mib: Some(mib),
            })
            .collect()
    }

    fn pools(spec: &[(&str, Option<u32>)]) -> Vec<PoolQuota> {
        spec.iter()
            .map(|(p, q)| PoolQuota {
                pool: p.to_string(),
                quota: *q,
            })
            .collect()
    }

    fn req(pool: &str, gpus: u32) -> Request {
        Request {
            pool: pool.into(),
            gpus,
            memory_mib: None,
            product: None,
        }
    }

    async fn now(a: &Arc<Allocator>, r: Request) -> Grant {
        tokio::time::timeout(Duration::from_millis(200), a.acquire(r))
            .await
            .expect("granted at once")
            .expect("placeable")
    }

    #[tokio::test]
    async fn never_gives_a_gpu_twice() {
        let a = Allocator::new(gpus(4, "A10", 24_000), pools(&[("gpu", None)]));
        let g1 = now(&a, req("gpu", 3)).await;
        assert_eq!(g1.devices, ["0", "1", "2"]);
        assert_eq!(a.room("gpu"), 1);
        let a2 = a.clone();
        let waiting = tokio::spawn(async move { a2.acquire(req("gpu", 2)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "only one GPU is free");
        assert_eq!(a.room("gpu"), 0, "a waiting task means no room");
        drop(g1);
        let g2 = waiting.await.unwrap().unwrap();
        assert_eq!(g2.devices, ["0", "1"]);
        assert_eq!(a.usage().1[0].1, 2);
        drop(g2);
        assert_eq!(a.room("gpu"), 4);
    }

    #[tokio::test]
    async fn big_task_is_not_starved_by_small_ones() {
        let a = Allocator::new(gpus(2, "A10", 24_000), pools(&[("gpu", None)]));
        let small = now(&a, req("gpu", 1)).await;
        let a2 = a.clone();
        let big = tokio::spawn(async move { a2.acquire(req("gpu", 2)).await });
        tokio::time::sleep(Duration::from_millis(30)).await;
        // A later small task waits behind the big one although a GPU is free.
        let a3 = a.clone();
        let later = tokio::spawn(async move { a3.acquire(req("gpu", 1)).await });
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!big.is_finished() && !later.is_finished());
        drop(small);
        let big = big.await.unwrap().unwrap();
        assert_eq!(big.devices.len(), 2);
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!later.is_finished());
        drop(big);
        assert_eq!(later.await.unwrap().unwrap().devices, ["0"]);
    }

    #[tokio::test]
    async fn quotas_and_rank() {
        let a = Allocator::new(
            gpus(4, "A10", 24_000),
            pools(&[("train", None), ("batch", Some(2))]),
        );
        assert_eq!(a.room("batch"), 2);
        let b1 = now(&a, req("batch", 2)).await;
        assert_eq!(a.room("batch"), 0, "quota reached");
        assert_eq!(a.room("train"), 2);
        // batch waits on its quota, which does not hold train back.
        let a2 = a.clone();
        let b2 = tokio::spawn(async move { a2.acquire(req("batch", 1)).await });
        tokio::time::sleep(Duration::from_millis(30)).await;
        let t1 = now(&a, req("train", 2)).await;
        assert!(!b2.is_finished());
        // train (ranked first) waiting for GPUs blocks batch, not the other way round.
        let a3 = a.clone();
        let t2 = tokio::spawn(async move { a3.acquire(req("train", 1)).await });
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(a.room("batch"), 0);
        drop(b1); // frees 2 GPUs: train's waiter goes first
        let t2 = t2.await.unwrap().unwrap();
        let b2 = b2.await.unwrap().unwrap();
        let mut all: Vec<String> = [&t1.devices, &t2.devices, &b2.devices]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 4, "4 different GPUs: {all:?}");
        assert_eq!(a.room("nosuch"), 0);
    }

    #[tokio::test]
    async fn unplaceable_requests_say_why() {
        let mut g = gpus(2, "NVIDIA-H100-80GB-HBM3", 81_559);
        g.extend(gpus(1, "NVIDIA A10", 23_028));
        g[2].id = "2".into();
        let a = Allocator::new(g, pools(&[("gpu", None), ("small", Some(1))]));
        let cases = [
            (req("gpu", 4), "4 GPU(s)"),
            (req("small", 2), "at most 1"),
            (req("other", 1), "does not serve"),
            (req("gpu", 0), "at least 1"),
            (
                Request {
                    product: Some("NVIDIA-A10".into()),
                    ..req("gpu", 2)
                },
                "1 such GPU(s)",
            ),
            (
                Request {
                    memory_mib: Some(90_000),
                    ..req("gpu", 1)
                },
                "at least 90000 MiB",
            ),
        ];
        for (r, text) in cases {
            let e = a.acquire(r.clone()).await.unwrap_err();
            assert!(e.contains(text), "{r:?}: {e}");
        }
        // Product names compare as NVML and GFD spell them.
        let h = now(
            &a,
            Request {
                product: Some("nvidia h100 80gb hbm3".into()),
                memory_mib: Some(80_000),
                ..req("gpu", 2)
            },
        )
        .await;
        assert_eq!(h.devices, ["0", "1"]);
        let small = now(
            &a,
            Request {
                product: Some("NVIDIA-A10".into()),
                ..req("gpu", 1)
            },
        )
        .await;
        assert_eq!(small.devices, ["2"]);
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_leaves_no_trace() {
        let a = Allocator::new(gpus(1, "A10", 24_000), pools(&[("gpu", None)]));
        let g = now(&a, req("gpu", 1)).await;
        let gave_up = tokio::time::timeout(Duration::from_millis(30), a.acquire(req("gpu", 1)));
        assert!(gave_up.await.is_err());
        assert_eq!(a.usage().1[0].2, 0, "no one waits any more");
        drop(g);
        assert_eq!(a.room("gpu"), 1);
        let _g = now(&a, req("gpu", 1)).await;
    }

    #[tokio::test]
    async fn many_tasks_at_once_never_oversubscribe() {
        let a = Allocator::new(
            gpus(8, "A10", 24_000),
            pools(&[("p1", Some(5)), ("p2", None)]),
        );
        let busy = Arc::new(Mutex::new([0u32; 8]));
        let mut tasks = Vec::new();
        for i in 0..64u32 {
            let (a, busy) = (a.clone(), busy.clone());
            tasks.push(tokio::spawn(async move {
                let pool = if i % 2 == 0 { "p1" } else { "p2" };
                let g = a.acquire(req(pool, 1 + i % 3)).await.unwrap();
                for d in &g.devices {
                    let mut b = busy.lock().unwrap();
                    let n: usize = d.parse().unwrap();
                    b[n] += 1;
                    assert_eq!(b[n], 1, "GPU {n} given twice");
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
                for d in &g.devices {
                    busy.lock().unwrap()[d.parse::<usize>().unwrap()] -= 1;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(a.room("p2"), 8);
    }
}
