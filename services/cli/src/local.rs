//! Servers `taskbus dev` and `taskbus bench` start for themselves when none are named.

use anyhow::Context;
use taskbus_runtime::devservers::{NatsServer, PgServer};

/// The NATS and PostgreSQL URLs to use, and the private servers behind them (stopped on drop).
pub struct Local {
    pub nats_url: String,
    pub database_url: String,
    _nats: Option<NatsServer>,
    _pg: Option<PgServer>,
}

/// Use the given URLs; start a private nats-server and/or PostgreSQL for those not given,
/// reporting each start on stderr when `announce` is set.
pub async fn ensure(
    nats_url: Option<String>,
    database_url: Option<String>,
    announce: bool,
) -> anyhow::Result<Local> {
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
        database_url,
        _nats: nats,
        _pg: pg,
    })
}
