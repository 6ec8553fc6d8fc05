//! Client side of the coordinator's request/reply API.

use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde::de::DeserializeOwned;
use taskbus_proto::api::{Reply, TaskGet, TaskList, TaskRecord};
use taskbus_proto::Subjects;
use taskbus_runtime::nats::{redact_url, NatsAuth, NatsError};

pub async fn connect(url: &str, auth: &NatsAuth) -> anyhow::Result<async_nats::Client> {
    let tune = |o: async_nats::ConnectOptions| {
        o.name("taskbus-cli")
            .connection_timeout(Duration::from_secs(3))
            .request_timeout(Some(Duration::from_secs(10)))
    };
    taskbus_runtime::nats::connect_with(url, auth, tune)
        .await
        .map_err(|e| match e {
            NatsError::Url(..) => anyhow!("--nats-url: {e}"),
            NatsError::Connect { ref cause, .. } if e.unreachable() => anyhow!(
                "cannot reach NATS at {}: {cause}; start one with `taskbus dev` or pass \
                 --nats-url / TASKBUS_NATS_URL",
                redact_url(url)
            ),
            e => e.into(),
        })
}

/// Send a request to `<prefix>.api.<endpoint>` and unwrap the `{"ok"|"error"}` reply.
pub async fn call<T: DeserializeOwned>(
    client: &async_nats::Client,
    prefix: &str,
    endpoint: &str,
    body: &impl serde::Serialize,
) -> anyhow::Result<T> {
    let subject = Subjects::new(prefix).api(endpoint);
    let payload = serde_json::to_vec(body)?;
    let msg = client.request(subject.clone(), payload.into()).await.map_err(|e| {
        use async_nats::RequestErrorKind::*;
        match e.kind() {
            NoResponders => anyhow!("no coordinator answered on {subject}; is taskbus-coordinator (or `taskbus dev`) running against this NATS server?"),
            TimedOut => anyhow!("the coordinator did not answer on {subject} within 10 s"),
            _ => anyhow!("request to {subject} failed: {e}"),
        }
    })?;
    match serde_json::from_slice::<Reply<T>>(&msg.payload)
        .with_context(|| format!("unreadable reply from {subject}"))?
    {
        Reply::Ok(v) => Ok(v),
        Reply::Error(e) => bail!("{} (code {})", e.error, e.code),
    }
}

pub async fn task_get(
    client: &async_nats::Client,
    prefix: &str,
    id: &str,
) -> anyhow::Result<TaskRecord> {
    call(client, prefix, "task.get", &TaskGet { id: id.to_string() }).await
}

pub async fn tasks_list(
    client: &async_nats::Client,
    prefix: &str,
    pool: Option<String>,
    status: Option<String>,
    limit: u32,
) -> anyhow::Result<Vec<TaskRecord>> {
    call(
        client,
        prefix,
        "tasks.list",
        &TaskList {
            pool,
            status,
            limit: Some(limit),
        },
    )
    .await
}
