//! The coordinator's request/reply API on the NATS services framework.
//!
//! Service `taskbus-coordinator` (so `$SRV.PING`, `$SRV.INFO` and `$SRV.STATS` find it), with
//! endpoints under `taskbus.api.`:
//! - `task.get`   `{"id": "..."}`                                → `{"ok": TaskRecord}`
//! - `tasks.list` `{"pool"?: "...", "status"?: "...", "limit"?: n}` → `{"ok": [TaskRecord]}`
//!
//! Every reply is `{"ok": …}` or `{"error": {"code": 400|404|500, "error": "sentence"}}`.

use std::sync::Arc;

use async_nats::service::{self, Service, ServiceExt};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use taskbus_proto::api::{ApiError, Reply, TaskGet, TaskList, COORDINATOR_SERVICE};
use taskbus_runtime::CancellationToken;
use tracing::warn;

use crate::store;
use crate::{CoordinatorError, Ctx};

pub(crate) struct Endpoints {
    service: Service,
    get: service::endpoint::Endpoint,
    list: service::endpoint::Endpoint,
}

pub(crate) async fn start(ctx: &Ctx) -> Result<Endpoints, CoordinatorError> {
    let service = ctx
        .client
        .service_builder()
        .description("taskbus coordinator: task lookup and listing")
        .start(COORDINATOR_SERVICE, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(CoordinatorError::js)?;
    let group = service.group(ctx.subjects.api("").trim_end_matches('.'));
    let get = group
        .endpoint("task.get")
        .await
        .map_err(CoordinatorError::js)?;
    let list = group
        .endpoint("tasks.list")
        .await
        .map_err(CoordinatorError::js)?;
    Ok(Endpoints { service, get, list })
}

enum Which {
    Get,
    List,
}

pub(crate) async fn run(ctx: Arc<Ctx>, ep: Endpoints, shutdown: CancellationToken) {
    let get = ep.get.map(|r| (Which::Get, r));
    let list = ep.list.map(|r| (Which::List, r));
    futures::stream::select(get, list)
        .take_until(shutdown.cancelled())
        .for_each_concurrent(16, |(which, req)| {
            let ctx = ctx.clone();
            async move {
                let body = match which {
                    Which::Get => handle_get(&ctx, &req.message.payload).await,
                    Which::List => handle_list(&ctx, &req.message.payload).await,
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
    let r = match r {
        Ok(v) => Reply::Ok(v),
        Err(e) => Reply::Error(e),
    };
    serde_json::to_vec(&r).unwrap_or_default().into()
}

fn bad(code: u16, msg: impl Into<String>) -> ApiError {
    ApiError {
        code,
        error: msg.into(),
    }
}

fn parse<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, ApiError> {
    let payload = if payload.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        payload
    };
    serde_json::from_slice(payload).map_err(|e| bad(400, format!("bad request body: {e}")))
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
            Ok(None) => Err(bad(404, format!("no task with id {:?}", req.id))),
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
