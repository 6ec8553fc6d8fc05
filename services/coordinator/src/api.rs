//! The coordinator's request/reply API on the NATS services framework.
//!
//! Service `taskbus-coordinator` (so `$SRV.PING`, `$SRV.INFO` and `$SRV.STATS` find it), with
//! endpoints under `taskbus.api.`:
//! - `task.get`    `{"id": "..."}`                                → `{"ok": TaskRecord}`
//! - `tasks.list`  `{"pool"?: "...", "status"?: "...", "limit"?: n}` → `{"ok": [TaskRecord]}`
//! - `task.cancel` `{"id": "...", "reason"?: "..."}`               → `{"ok": TaskRecord}`
//! - `dlq.replay`  `{"pool"?: "...", "ids"?: [...], "limit"?: n}`   → `{"ok": ReplayResult}`
//! - `agents.list` `{}`                                            → `{"ok": [AgentInfo]}`
//!
//! Every reply is `{"ok": …}` or `{"error": {"code": 400|404|500, "error": "sentence"}}`.

use std::sync::Arc;

use async_nats::service::{self, Service, ServiceExt};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use taskbus_proto::api::{
    bad, parse_request as parse, ApiError, DlqReplay, ReplayResult, TaskCancel, TaskGet, TaskList,
    COORDINATOR_SERVICE,
};
use taskbus_proto::events::{self, Event};
use taskbus_runtime::CancellationToken;
use tracing::warn;

use crate::dispatch::{self, Dispatch};
use crate::outcomes::{announce, confirm_terminal, with_closed};
use crate::registry;
use crate::store::{self, CancelOutcome};
use crate::{CoordinatorError, Ctx};

pub(crate) struct Endpoints {
    service: Service,
    endpoints: Vec<(Which, service::endpoint::Endpoint)>,
}

pub(crate) async fn start(ctx: &Ctx) -> Result<Endpoints, CoordinatorError> {
    let service = ctx
        .client
        .service_builder()
        .description("taskbus coordinator: tasks, cancellation, dead letters, agents")
        .start(COORDINATOR_SERVICE, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(CoordinatorError::js)?;
    let group = service.group(ctx.subjects.api("").trim_end_matches('.'));
    let mut endpoints = Vec::new();
    for (which, name) in [
        (Which::Get, "task.get"),
        (Which::List, "tasks.list"),
        (Which::Cancel, "task.cancel"),
        (Which::Replay, "dlq.replay"),
        (Which::Agents, "agents.list"),
    ] {
        endpoints.push((
            which,
            group.endpoint(name).await.map_err(CoordinatorError::js)?,
        ));
    }
    Ok(Endpoints { service, endpoints })
}

#[derive(Clone, Copy)]
enum Which {
    Get,
    List,
    Cancel,
    Replay,
    Agents,
}

pub(crate) async fn run(ctx: Arc<Ctx>, ep: Endpoints, shutdown: CancellationToken) {
    let streams = ep
        .endpoints
        .into_iter()
        .map(|(which, e)| e.map(move |r| (which, r)).boxed());
    futures::stream::select_all(streams)
        .take_until(shutdown.cancelled())
        .for_each_concurrent(16, |(which, req)| {
            let ctx = ctx.clone();
            async move {
                let p = &req.message.payload;
                let body = match which {
                    Which::Get => handle_get(&ctx, p).await,
                    Which::List => handle_list(&ctx, p).await,
                    Which::Cancel => handle_cancel(&ctx, p).await,
                    Which::Replay => handle_replay(&ctx, p).await,
                    Which::Agents => reply(
                        registry::list(&ctx)
                            .await
                            .map_err(|e| bad(500, format!("database error: {e}"))),
                    ),
                };
                if let Err(e) = req.respond(Ok(body)).await {
                    warn!(error = %e, "cannot send API reply");
                }
            }
        })
        .await;
    let _ = ep.service.stop().await;
}

fn reply<T: Serialize>(r: Result<T, ApiError>) -> Bytes {
    taskbus_proto::api::reply_body(r).into()
}

/// 404 for an unknown id; with a retention set, the record may also have been deleted.
fn not_found(ctx: &Ctx, id: &str) -> ApiError {
    if ctx.retention.shortest().is_some() {
        bad(
            404,
            format!(
                "no task with id {id:?}: it was never admitted, or it finished longer ago than \
                 the coordinator's retention and its record was deleted"
            ),
        )
    } else {
        bad(404, format!("no task with id {id:?}"))
    }
}

async fn handle_get(ctx: &Ctx, payload: &[u8]) -> Bytes {
    let r = async {
        let req: TaskGet = parse(payload)?;
        if !taskbus_proto::ids::is_valid_task_id(&req.id) {
            return Err(bad(
                400,
                "id must be 1 to 128 characters from A-Z a-z 0-9 _ -",
            ));
        }
        match store::get(&ctx.db, &req.id).await {
            Ok(Some(t)) => Ok(t),
            Ok(None) => Err(not_found(ctx, &req.id)),
            Err(e) => Err(bad(500, format!("database error: {e}"))),
        }
    }
    .await;
    reply(r)
}

async fn handle_list(ctx: &Ctx, payload: &[u8]) -> Bytes {
    let r = async {
        let req: TaskList = parse(payload)?;
        let limit = req.limit.unwrap_or(50);
        if !(1..=1000).contains(&limit) {
            return Err(bad(400, "limit must be between 1 and 1000"));
        }
        if let Some(s) = req.status.as_deref() {
            if !store::STATUSES.contains(&s) {
                return Err(bad(
                    400,
                    format!(
                        "unknown status {s:?}; use one of {}",
                        store::STATUSES.join(", ")
                    ),
                ));
            }
        }
        store::list(
            &ctx.db,
            req.pool.as_deref(),
            req.status.as_deref(),
            limit as i64,
        )
        .await
        .map_err(|e| bad(500, format!("database error: {e}")))
    }
    .await;
    reply(r)
}

fn valid_id(id: &str) -> Result<(), ApiError> {
    if taskbus_proto::ids::is_valid_task_id(id) {
        Ok(())
    } else {
        Err(bad(
            400,
            "id must be 1 to 128 characters from A-Z a-z 0-9 _ -",
        ))
    }
}

async fn handle_cancel(ctx: &Ctx, payload: &[u8]) -> Bytes {
    let r = async {
        let req: TaskCancel = parse(payload)?;
        valid_id(&req.id)?;
        let reason = req.reason.unwrap_or_else(|| "cancelled by request".into());
        if reason.len() > 1024 {
            return Err(bad(400, "reason must be at most 1024 bytes"));
        }
        let db = |e: sqlx::Error| bad(500, format!("database error: {e}"));
        match store::cancel(&ctx.db, &req.id, &reason).await.map_err(db)? {
            CancelOutcome::Cancelled {
                pool,
                attempt,
                priced,
                traceparent,
                ..
            } => {
                crate::outcomes::count(ctx, "cancelled", 1);
                // Durable event: agents running it cancel the handler; agents that pull it later skip it.
                let ev = Event::Cancelled(events::Cancelled {
                    task_id: req.id.clone(),
                    pool: pool.clone(),
                    at: chrono::Utc::now(),
                    reason: Some(reason),
                });
                let mut terminal = Vec::new();
                let evs = with_closed(ev, priced, attempt);
                let tp = traceparent.as_deref();
                announce(ctx, &pool, &req.id, &evs, tp, &mut terminal).await;
                if !confirm_terminal(ctx, terminal).await.is_empty() {
                    return Err(bad(
                        500,
                        "cancelled, but the event is not stored yet; the coordinator re-sends it",
                    ));
                }
                store::get(&ctx.db, &req.id)
                    .await
                    .map_err(db)?
                    .ok_or_else(|| bad(404, "task vanished"))
            }
            CancelOutcome::Terminal(status) => {
                // A repeated cancel (e.g. the caller's retry after a replica died between the
                // cancellation and its event) needs nothing more: the event outbox re-sends a
                // `cancelled` that never reached JetStream.
                Err(bad(409, format!("task {} is already {status}", req.id)))
            }
            CancelOutcome::NotFound => Err(not_found(ctx, &req.id)),
        }
    }
    .await;
    reply(r)
}

async fn handle_replay(ctx: &Ctx, payload: &[u8]) -> Bytes {
    let r = async {
        let req: DlqReplay = parse(payload)?;
        for id in &req.ids {
            valid_id(id)?;
        }
        if req.ids.len() > 10_000 {
            return Err(bad(400, "at most 10000 ids per request"));
        }
        let limit = req.limit.unwrap_or(1000);
        if !(1..=10_000).contains(&limit) {
            return Err(bad(400, "limit must be between 1 and 10000"));
        }
        let rows = store::replay_dead(&ctx.db, req.pool.as_deref(), &req.ids, limit as i64)
            .await
            .map_err(|e| bad(500, format!("database error: {e}")))?;
        let replayed: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
        dispatch::dispatch_all(ctx, rows.into_iter().map(Dispatch::from).collect()).await;
        let skipped = req
            .ids
            .iter()
            .filter(|id| !replayed.contains(id))
            .cloned()
            .collect();
        Ok(ReplayResult { replayed, skipped })
    }
    .await;
    reply(r)
}
