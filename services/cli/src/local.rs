//! Servers `taskbus dev` and `taskbus bench` start for themselves when none are named.

use anyhow::Context;
use taskbus_runtime::devservers::{NatsServer, PgServer};
use taskbus_runtime::nats::NatsAuth;

/// The NATS and PostgreSQL URLs to use, and the private servers behind them (stopped on drop).
pub struct Local {
    pub nats_url: String,
    /// The user's NATS credentials and TLS settings; default for a private server.
    pub nats_auth: NatsAuth,
    pub database_url: String,
    _nats: Option<NatsServer>,
    _pg: Option<PgServer>,
}

/// Use the given URLs; start a private nats-server and/or PostgreSQL for those not given,
/// reporting each start on stderr when `announce` is set. `nats_auth` goes with a given NATS
/// URL; with none, the private server has no authentication and settings are refused.
pub async fn ensure(
    nats_url: Option<String>,
    nats_auth: &NatsAuth,
    database_url: Option<String>,
    announce: bool,
) -> anyhow::Result<Local> {
    if nats_url.is_none() && *nats_auth != NatsAuth::default() {
        anyhow::bail!(
            "--nats-* credential and TLS settings need --nats-url (or TASKBUS_NATS_URL): \
             without one a private nats-server with neither is started"
        );
    }
    let (nats_url, nats) = match nats_url {
        Some(u) => (u, None),
        None => {
            let n = NatsServer::start()
                .await
                .context("cannot start nats-server")?;
            if announce {
                eprintln!("started nats-server (JetStream) at {}", n.url());
            }
            (n.url(), Some(n))
        }
    };
    let (database_url, pg) = match database_url {
        Some(u) => (u, None),
        None => {
            let p = PgServer::start().await.context("cannot start PostgreSQL")?;
            if announce {
                eprintln!("started PostgreSQL at {}", p.url());
            }
            (p.url(), Some(p))
        }
    };
    Ok(Local {
        nats_url,
        nats_auth: nats_auth.clone(),
        database_url,
        _nats: nats,
        _pg: pg,
    })
}
