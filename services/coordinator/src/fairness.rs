//! Per-payer fairness: in a pool with `fairness_limit` L > 0, a payer (or, for unpriced tasks,
//! a `tenant` label value) has at most L tasks queued or running at once. Further tasks of that
//! key are recorded as `admitted` (held back) and dispatched, oldest first, as its earlier tasks
//! finish. Tasks with neither are not limited. Promotion runs after admission, after every outcome batch and once a second.

use std::collections::HashSet;

use tracing::warn;

use crate::dispatch::{self, Dispatch};
use crate::{store, Ctx};

/// Promote held tasks of `pools` as far as their limits allow.
pub(crate) async fn promote(ctx: &Ctx, pools: HashSet<String>) {
    for pool in pools {
        let limit = match ctx.pools.get(&pool).map(|p| p.fairness_limit) {
            Some(0) | None => None,
            Some(l) => Some(l.min(i32::MAX as u32) as i32),
        };
        match store::promote_fair(&ctx.db, &pool, limit).await {
            Ok(rows) if !rows.is_empty() => {
                dispatch::dispatch_all(ctx, rows.into_iter().map(Dispatch::from).collect()).await;
            }
            Ok(_) => {}
            Err(e) => {
                warn!(pool = %pool, error = %e, "fairness promotion failed; retried within a second")
            }
        }
    }
}
