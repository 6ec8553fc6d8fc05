//! The GPU dispatcher: the agent of GPU pools.
//!
//! It pulls a task only when it can place it on free GPUs, so it never oversubscribes a GPU,
//! and runs it through a backend: `local` (a child process pinned to its GPUs with
//! `CUDA_VISIBLE_DEVICES`) or `kubernetes` (one `batch/v1` Job per attempt). See docs/GPU.md.
//!
//! Code map:
//! - [`allocator`]: which task gets which GPUs and when (quotas, pool rank, no starvation);
//! - [`inventory`]: the GPUs, from NVML or declared;
//! - [`dispatcher`]: `run(config, shutdown)`, one agent-SDK agent per pool sharing the
//!   allocator, `/metrics`, the Kubernetes sweep;
//! - [`local`] and [`jobs`]: the two backends; [`launch`]: what both get and share.

pub mod allocator;
pub mod dispatcher;
pub mod inventory;
pub mod jobs;
pub mod launch;
pub mod local;

/// Parse `NAME` or `NAME=QUOTA` (the `--pool` flag).
pub fn parse_pool(spec: &str) -> Result<allocator::PoolQuota, String> {
    let (name, quota) = match spec.split_once('=') {
        Some((n, q)) => {
            let q: u32 = q.trim().parse().map_err(|_| {
                format!("the quota in {spec:?} must be a whole number of GPUs, e.g. gpu=4")
            })?;
            if q == 0 {
                return Err(format!("pool quota 0 in {spec:?} would never run a task"));
            }
            (n.trim(), Some(q))
        }
        None => (spec.trim(), None),
    };
    if !taskbus_proto::ids::is_valid_pool(name) {
        return Err(format!(
            "{name:?} is not a valid pool name (a DNS label: a-z, 0-9 and -, at most 63)"
        ));
    }
    Ok(allocator::PoolQuota {
        pool: name.to_string(),
        quota,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_flags() {
        assert_eq!(parse_pool("gpu").unwrap().quota, None);
        let p = parse_pool("gpu-batch=2").unwrap();
        assert_eq!((p.pool.as_str(), p.quota), ("gpu-batch", Some(2)));
        for bad in [
            "", "GPU", "gpu=", "gpu=0", "gpu=-1", "gpu=x", "a b", "gpu=1=2", "-x",
        ] {
            assert!(parse_pool(bad).is_err(), "{bad:?}");
        }
    }
}
