//! The ledger's request/reply API on the NATS services framework (service `taskbus-ledger`,
//! endpoints under `<prefix>.ledger.`; bodies in [`crate::api`]).
//!
//! Every reply is `{"ok": …}` or `{"error": {"code": …, "error": "sentence"}}`. A request that
//! cannot be read, breaks a limit or names something unknown gets a 4xx error and changes
//! nothing; 503 means the database or JetStream is away and the request may be retried as is
//! (every writing endpoint is idempotent under its key).

use std::sync::Arc;

use async_nats::jetstream::message::PublishMessage;
use async_nats::service::{self, Service, ServiceExt};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use taskbus_proto::api::{
    bad, parse_request as parse, ApiError, HoldRequest, HoldResponse, LEDGER_SERVICE,
};
use taskbus_proto::events::{self, Event, EventKind};
use taskbus_runtime::CancellationToken;
use tracing::warn;

use crate::api::{
    AccountsReply, AccountsRequest, AuditReply, BalanceRequest, MoveRequest, StatementRequest,
    TransfersRequest,
};
use crate::metrics::Metrics;
use crate::store::{HeldRecord, HoldInput, HoldOutcome, OpError};
use crate::{Ctx, LedgerError};

/// Most holds in one request.
pub const MAX_HOLDS_PER_REQUEST: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Hold,
    Deposit,
    Withdraw,
    Balance,
    Statement,
    Transfers,
    Accounts,
    Audit,
}

impl Which {
    fn parse(name: &str) -> Option<Which> {
        Some(match name {
            "hold" => Which::Hold,
            "deposit" => Which::Deposit,
            "withdraw" => Which::Withdraw,
            "balance" => Which::Balance,
            "statement" => Which::Statement,
            "transfers" => Which::Transfers,
            "accounts" => Which::Accounts,
            "audit" => Which::Audit,
            _ => return None,
        })
    }
}

pub(crate) struct Endpoints {
    client: async_nats::Client,
    service: Service,
    endpoints: Vec<(Which, service::endpoint::Endpoint)>,
}

pub(crate) async fn start(
    ctx: &Ctx,
    client: &async_nats::Client,
) -> Result<Endpoints, LedgerError> {
    let service = client
        .service_builder()
        .description("taskbus payment ledger: holds, settlements, balances")
        .start(LEDGER_SERVICE, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(LedgerError::js)?;
    let group = service.group(format!("{}.ledger", ctx.subjects.prefix()));
    let mut endpoints = Vec::new();
    for name in crate::api::ENDPOINTS {
        let which = Which::parse(name)
            .ok_or_else(|| LedgerError::JetStream(format!("unknown endpoint {name}")))?;
        endpoints.push((which, group.endpoint(name).await.map_err(LedgerError::js)?));
    }
    // Only once the server has registered our subscriptions are we ready.
    sync_with_server(client)
        .await
        .map_err(LedgerError::JetStream)?;
    Ok(Endpoints {
        client: client.clone(),
        service,
        endpoints,
    })
}

pub(crate) async fn run(ctx: Arc<Ctx>, ep: Endpoints, shutdown: CancellationToken) {
    let streams = ep
        .endpoints
        .into_iter()
        .map(|(which, e)| e.map(move |r| (which, r)));
    futures::stream::select_all(streams)
        .take_until(shutdown.cancelled())
        .for_each_concurrent(ctx.api_concurrency, |(which, req)| {
            let ctx = ctx.clone();
            async move {
                let body = handle(&ctx, which, &req.message.payload).await;
                if let Err(e) = req.respond(Ok(body)).await {
                    warn!(error = %e, "cannot send API reply");
                }
            }
        })
        .await;
    // Dropping the endpoints unsubscribes them; syncing makes the server see it before we say
    // we have stopped, so no request is routed to a ledger that no longer reads.
    let _ = ep.service.stop().await;
    if let Err(e) = sync_with_server(&ep.client).await {
        warn!(error = %e, "could not confirm the unsubscriptions with the server");
    }
}

/// Wait until the server has processed everything this client sent so far: the server reads
/// one connection in order, so a message we publish to our own fresh inbox comes back only
/// after every earlier (un)subscription took effect.
async fn sync_with_server(client: &async_nats::Client) -> Result<(), String> {
    let inbox = client.new_inbox();
    let mut sub = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| e.to_string())?;
    client
        .publish(inbox, Bytes::new())
        .await
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(std::time::Duration::from_secs(10), sub.next()).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err("subscription closed".into()),
        Err(_) => Err("the server did not echo within 10 s".into()),
    }
}

fn reply<T: Serialize>(r: Result<T, ApiError>) -> Bytes {
    taskbus_proto::api::reply_body(r).into()
}

fn op(e: OpError) -> ApiError {
    bad(e.code(), e.to_string())
}

async fn handle(ctx: &Ctx, which: Which, payload: &[u8]) -> Bytes {
    let l = &ctx.ledger;
    match which {
        Which::Hold => reply(hold(ctx, payload).await),
        Which::Deposit => {
            reply(async { l.deposit(&parse::<MoveRequest>(payload)?).await.map_err(op) }.await)
        }
        Which::Withdraw => reply(
            async {
                l.withdraw(&parse::<MoveRequest>(payload)?)
                    .await
                    .map_err(op)
            }
            .await,
        ),
        Which::Balance => reply(
            async {
                let r: BalanceRequest = parse(payload)?;
                l.balance(&r.account, r.currency.as_deref())
                    .await
                    .map_err(op)
            }
            .await,
        ),
        Which::Statement => reply(
            async {
                let r: StatementRequest = parse(payload)?;
                l.statement(&r.account, r.currency.as_deref(), r.limit.unwrap_or(100))
                    .await
                    .map_err(op)
            }
            .await,
        ),
        Which::Transfers => reply(
            async {
                let r: TransfersRequest = parse(payload)?;
                l.transfers(&r.task_id).await.map_err(op)
            }
            .await,
        ),
        Which::Accounts => reply(
            async {
                let r: AccountsRequest = parse(payload)?;
                let accounts = l
                    .accounts(r.kind.as_deref(), r.limit.unwrap_or(100))
                    .await
                    .map_err(op)?;
                Ok(AccountsReply { accounts })
            }
            .await,
        ),
        Which::Audit => reply(
            async {
                let _: serde_json::Map<String, serde_json::Value> = parse(payload)?;
                let problems = crate::audit::check(l.db())
                    .await
                    .map_err(|e| bad(503, format!("database error: {e}")))?;
                Ok(AuditReply {
                    ok: problems.is_empty(),
                    problems,
                })
            }
            .await,
        ),
    }
}

/// The coordinator's batch hold: one transaction, then the `held` events (awaited), then the
/// reply. A hold that stands gets its `held` event published again on every request (JetStream
/// drops the repeats by `Nats-Msg-Id`), so a reply lost after the commit loses no event.
async fn hold(ctx: &Ctx, payload: &[u8]) -> Result<HoldResponse, ApiError> {
    let req: HoldRequest = parse(payload)?;
    if req.holds.len() > MAX_HOLDS_PER_REQUEST {
        return Err(bad(
            400,
            format!(
                "at most {MAX_HOLDS_PER_REQUEST} holds per request, got {}",
                req.holds.len()
            ),
        ));
    }
    let inputs: Vec<HoldInput> = req.holds.iter().map(HoldInput::from).collect();
    let batch = ctx.ledger.hold(&inputs).await.map_err(|e| {
        ctx.metrics.error("hold");
        bad(
            503,
            format!("the ledger cannot make holds now ({e}); retry later"),
        )
    })?;
    for o in &batch.outcomes {
        let label = match o {
            HoldOutcome::New => "new",
            HoldOutcome::Pending => "repeat",
            HoldOutcome::InsufficientFunds(_) => "insufficient_funds",
            HoldOutcome::Resolved(_) | HoldOutcome::Conflict(_) | HoldOutcome::Invalid(_) => {
                "invalid"
            }
        };
        Metrics::count(&ctx.metrics.holds, label, 1);
    }
    publish_held(ctx, &batch.held).await.map_err(|e| {
        ctx.metrics.error("held_publish");
        bad(
            503,
            format!("holds recorded but their held events were not acknowledged ({e}); retry"),
        )
    })?;
    Ok(HoldResponse {
        results: batch
            .outcomes
            .iter()
            .zip(&req.holds)
            .map(|(o, h)| o.to_result(&h.task_id))
            .collect(),
    })
}

/// The `held` event of a hold.
pub fn held_event(h: &HeldRecord) -> Event {
    Event::Held(events::Held {
        task_id: h.task_id.clone(),
        pool: h.pool.clone(),
        at: h.at,
        payer: h.payer.clone(),
        amount: h.amount.clone(),
        currency: h.currency.clone(),
    })
}

async fn publish_held(ctx: &Ctx, held: &[HeldRecord]) -> Result<(), String> {
    let mut pending = Vec::with_capacity(held.len());
    for h in held {
        let p = PublishMessage::build()
            .payload(held_event(h).to_json().into())
            .message_id(format!("{}:held", h.task_id));
        let f = ctx
            .js
            .send_publish(ctx.subjects.event(&h.pool, &h.task_id, EventKind::Held), p)
            .await
            .map_err(|e| e.to_string())?;
        pending.push(f);
    }
    for r in futures::future::join_all(pending.into_iter().map(|f| async move { f.await })).await {
        r.map_err(|e| e.to_string())?;
    }
    Ok(())
}
