//! NATS connection and stream setup.

use std::time::Duration;

use async_nats::jetstream;
use taskbus_proto::streams::{self, StreamOptions};
use taskbus_proto::Subjects;

mod auth;
pub use auth::{redact_url, AuthError, NatsAuth, Secret};

/// Errors while talking to NATS at start-up.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("bad NATS URL {0:?}: {1}")]
    Url(String, String),
    #[error("NATS settings: {0}")]
    Auth(#[from] AuthError),
    /// The client's error is part of the message (and not a `source`, so that printing the
    /// error chain does not repeat it).
    #[error("cannot connect to NATS at {url}: {cause}; {hint}")]
    Connect {
        /// With any password or token replaced by `***`.
        url: String,
        hint: &'static str,
        cause: async_nats::ConnectError,
    },
    #[error("cannot create or update stream {stream}: {message}; is JetStream enabled on the server (nats-server -js)?")]
    Stream { stream: String, message: String },
}

impl NatsError {
    /// Whether connecting failed because no server answered (rather than over credentials,
    /// TLS or settings).
    pub fn unreachable(&self) -> bool {
        matches!(self, NatsError::Connect { hint, .. } if *hint == auth::UNREACHABLE)
    }
}

/// Parse `nats://a:4222,nats://b:4222` into server addresses.
pub fn server_addrs(urls: &str) -> Result<Vec<async_nats::ServerAddr>, String> {
    let addrs: Vec<_> = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse::<async_nats::ServerAddr>()
                .map_err(|e| format!("{:?} is not a NATS URL: {e}", redact_url(u)))
        })
        .collect::<Result<_, _>>()?;
    if addrs.is_empty() {
        return Err("no NATS URL given".into());
    }
    Ok(addrs)
}

/// Connect with a client name (shown by `nats server report connections`), with `auth`'s
/// credentials and TLS settings. Reconnects forever. `url` may list several servers separated
/// by commas.
pub async fn connect(
    url: &str,
    auth: &NatsAuth,
    name: &str,
) -> Result<async_nats::Client, NatsError> {
    connect_with(url, auth, |o| {
        o.name(name)
            .connection_timeout(Duration::from_secs(5))
            .request_timeout(Some(Duration::from_secs(10)))
            .client_capacity(65_536)
            .subscription_capacity(262_144)
    })
    .await
}

/// Connect with `auth`'s credentials and TLS settings, plus what `tune` adds (name, timeouts...).
pub async fn connect_with(
    url: &str,
    auth: &NatsAuth,
    tune: impl FnOnce(async_nats::ConnectOptions) -> async_nats::ConnectOptions,
) -> Result<async_nats::Client, NatsError> {
    let addrs = server_addrs(url).map_err(|e| NatsError::Url(redact_url(url), e))?;
    let opts = tune(auth.options(&addrs).await?);
    opts.connect(addrs.as_slice())
        .await
        .map_err(|cause| NatsError::Connect {
            url: redact_url(url),
            hint: auth.hint(&cause),
            cause,
        })
}

/// Create or update the three taskbus streams.
pub async fn ensure_streams(
    js: &jetstream::Context,
    subjects: &Subjects,
    opts: &StreamOptions,
) -> Result<(), NatsError> {
    for cfg in [
        streams::submit_stream(subjects, opts),
        streams::work_stream(subjects, opts),
        streams::events_stream(subjects, opts),
    ] {
        ensure_stream(js, cfg).await?;
    }
    Ok(())
}

/// Create `cfg`'s stream, or update it when it exists with other settings.
pub async fn ensure_stream(
    js: &jetstream::Context,
    cfg: jetstream::stream::Config,
) -> Result<(), NatsError> {
    let name = cfg.name.clone();
    let err = |e: &dyn std::fmt::Display| NatsError::Stream {
        stream: name.clone(),
        message: e.to_string(),
    };
    match js.get_stream(&name).await {
        Ok(_) => {
            js.update_stream(cfg).await.map_err(|e| err(&e))?;
        }
        Err(_) => {
            // Another replica may create it at the same time: fall back to get on conflict.
            if let Err(e) = js.create_stream(cfg).await {
                js.get_stream(&name).await.map_err(|_| err(&e))?;
            }
        }
    }
    Ok(())
}

/// The pool settings KV bucket (created if missing).
pub async fn pools_bucket(
    js: &jetstream::Context,
    subjects: &Subjects,
    replicas: usize,
) -> Result<jetstream::kv::Store, NatsError> {
    kv_bucket(
        js,
        subjects.pools_bucket(),
        "taskbus pool settings",
        replicas,
    )
    .await
}

/// The schedules KV bucket (recurring tasks, key = schedule name), created when missing.
pub async fn schedules_bucket(
    js: &jetstream::Context,
    subjects: &Subjects,
    replicas: usize,
) -> Result<jetstream::kv::Store, NatsError> {
    kv_bucket(
        js,
        subjects.schedules_bucket(),
        "taskbus schedules (recurring tasks)",
        replicas,
    )
    .await
}

/// Open `bucket`, creating it (5 revisions per key) when missing; a concurrent creator wins.
async fn kv_bucket(
    js: &jetstream::Context,
    bucket: String,
    description: &str,
    replicas: usize,
) -> Result<jetstream::kv::Store, NatsError> {
    if let Ok(kv) = js.get_key_value(&bucket).await {
        return Ok(kv);
    }
    match js
        .create_key_value(jetstream::kv::Config {
            bucket: bucket.clone(),
            description: description.into(),
            history: 5,
            num_replicas: replicas,
            ..Default::default()
        })
        .await
    {
        Ok(kv) => Ok(kv),
        Err(e) => js
            .get_key_value(&bucket)
            .await
            .map_err(|_| NatsError::Stream {
                stream: bucket,
                message: e.to_string(),
            }),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn url_lists() {
        assert_eq!(
            super::server_addrs("nats://a:1, nats://b:2").unwrap().len(),
            2
        );
        assert!(super::server_addrs("").is_err());
        assert!(super::server_addrs("nats://a:notaport").is_err());
    }
}
