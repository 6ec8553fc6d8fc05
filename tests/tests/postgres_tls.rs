//! PostgreSQL over TLS: the URL parameters `sslmode`, `sslrootcert`, `sslcert` and `sslkey`
//! against a real PostgreSQL that accepts TCP connections over TLS only (a private server from
//! `taskbus_runtime::devservers` with the certificates in `tests/fixtures/tls/`), through the
//! same `taskbus_runtime::db::connect` every service uses; and the coordinator with an agent
//! on such a database.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use serde_json::json;
use taskbus_runtime::db;
use taskbus_runtime::devservers::{PgOptions, PgTls};
use taskbus_tests::stack::Stack;
use taskbus_tests::{tls_fixture, PgServer, TestDb};

/// A private PostgreSQL that takes TCP connections over TLS only (and, with `client_ca`, only
/// from clients whose certificate `ca.pem` signed).
async fn tls_only_server(client_ca: bool) -> PgServer {
    PgServer::start_with(PgOptions {
        tls: Some(PgTls {
            cert: tls_fixture("server.pem"),
            key: tls_fixture("server.key"),
            client_ca: client_ca.then(|| tls_fixture("ca.pem")),
            require: true,
        }),
    })
    .await
    .expect("start a TLS-only PostgreSQL")
}

/// `postgres://postgres@<host>:<port>/postgres?<query>` on `pg`.
fn url(pg: &PgServer, host: &str, query: &str) -> String {
    format!("postgres://postgres@{host}:{}/postgres?{query}", pg.port())
}

/// Whether the pool's connection is encrypted, as the server sees it.
async fn ssl_in_use(pool: &sqlx::PgPool) -> bool {
    sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(pool)
        .await
        .expect("read pg_stat_ssl")
}

async fn connect(url: &str) -> Result<sqlx::PgPool, db::DbError> {
    db::connect(url, 1).await
}

/// The error a connection that must fail returns, as its text.
async fn refused(url: &str) -> String {
    match connect(url).await {
        Ok(pool) => panic!(
            "{url} connected (ssl in use: {}), but the server should refuse it",
            ssl_in_use(&pool).await
        ),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn plain_connections_are_refused_with_a_hint_to_use_tls() {
    let pg = tls_only_server(false).await;
    for mode in ["disable", "allow"] {
        // sqlx treats `allow` like `disable` (it never retries with TLS, unlike libpq).
        let e = refused(&url(&pg, "127.0.0.1", &format!("sslmode={mode}"))).await;
        assert!(
            e.contains("pg_hba.conf rejects connection") && e.contains("no encryption"),
            "sslmode={mode}: the server's refusal: {e}"
        );
        assert!(
            e.contains("accepts only TLS connections") && e.contains("sslmode=require"),
            "sslmode={mode}: the error says what to change: {e}"
        );
    }
}

#[tokio::test]
async fn no_sslmode_means_prefer_which_takes_tls_when_the_server_offers_it() {
    let pg = tls_only_server(false).await;
    // No sslmode: sqlx's default, `prefer`, asks for TLS first and the server agrees, without
    // checking its certificate (`url()` has no query string).
    let pool = connect(&pg.url()).await.expect("prefer connects");
    assert!(ssl_in_use(&pool).await, "prefer uses TLS when offered");
    // The same default against a server without TLS stays plain, as before.
    let plain = PgServer::start().await.expect("start a plain PostgreSQL");
    let pool = connect(&plain.url())
        .await
        .expect("prefer connects to a plain server");
    assert!(!ssl_in_use(&pool).await, "no TLS where the server has none");
    // ... and `require` there fails with a hint.
    let e = refused(&plain.tls_url()).await;
    assert!(
        e.contains("does not support TLS") && e.contains("offers no TLS"),
        "{e}"
    );
}

#[tokio::test]
async fn sslmode_require_connects_over_tls_without_checking_the_certificate() {
    let pg = tls_only_server(false).await;
    let pool = connect(&pg.tls_url())
        .await
        .expect("sslmode=require connects");
    assert!(ssl_in_use(&pool).await);
    let version: String =
        sqlx::query_scalar("SELECT version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(version.starts_with("TLSv1."), "{version}");
    // `require` checks nothing, even where `sslrootcert` names a CA that did not sign the
    // server's certificate (libpq would verify the chain here; sqlx does not).
    let other = tls_fixture("other-ca.pem");
    let pool = connect(&url(
        &pg,
        "127.0.0.1",
        &format!("sslmode=require&sslrootcert={}", other.display()),
    ))
    .await
    .expect("require ignores sslrootcert");
    assert!(ssl_in_use(&pool).await);
}

#[tokio::test]
async fn verify_full_checks_the_chain_and_the_host_name() {
    let pg = tls_only_server(false).await;
    let ca = tls_fixture("ca.pem");
    for (host, mode) in [
        ("localhost", "verify-full"),
        ("127.0.0.1", "verify-full"), // the certificate names the IP address too
        ("127.0.0.1", "verify-ca"),
    ] {
        let u = url(
            &pg,
            host,
            &format!("sslmode={mode}&sslrootcert={}", ca.display()),
        );
        let pool = connect(&u).await.unwrap_or_else(|e| panic!("{u}: {e}"));
        assert!(ssl_in_use(&pool).await, "{u}");
    }
    // A CA that signed nothing here.
    let other = tls_fixture("other-ca.pem");
    let e = refused(&url(
        &pg,
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", other.display()),
    ))
    .await;
    assert!(
        e.contains("invalid peer certificate") && e.contains("UnknownIssuer"),
        "{e}"
    );
    assert!(
        e.contains("TLS handshake failed") && e.contains("sslrootcert="),
        "the hint names sslrootcert: {e}"
    );
    // No sslrootcert: only the system's CA store, which does not hold the test CA.
    let e = refused(&url(&pg, "localhost", "sslmode=verify-full")).await;
    assert!(e.contains("UnknownIssuer"), "{e}");
}

#[tokio::test]
async fn mutual_tls_needs_a_client_certificate_signed_by_the_servers_ca() {
    let pg = tls_only_server(true).await;
    let ca = tls_fixture("ca.pem");
    let verify = format!("sslmode=verify-full&sslrootcert={}", ca.display());
    let e = refused(&url(&pg, "localhost", &verify)).await;
    assert!(
        e.contains("requires a valid client certificate"),
        "the server's refusal: {e}"
    );
    assert!(
        e.contains("sslcert=") && e.contains("sslkey="),
        "the hint: {e}"
    );

    // sqlx reads the key whatever its mode (libpq insists on 0600): a world-readable copy.
    let key = std::env::temp_dir().join(format!("taskbus-client-{}.key", ulid::Ulid::new()));
    std::fs::copy(tls_fixture("client.key"), &key).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cert = tls_fixture("client.pem");
    // A certificate without its key is a configuration error caught before any connection.
    let e = refused(&url(
        &pg,
        "localhost",
        &format!("{verify}&sslcert={}", cert.display()),
    ))
    .await;
    assert!(
        e.contains("must be given together") && e.contains("both or neither"),
        "{e}"
    );

    let u = url(
        &pg,
        "localhost",
        &format!(
            "{verify}&sslcert={}&sslkey={}",
            cert.display(),
            key.display()
        ),
    );
    let pool = connect(&u).await.unwrap_or_else(|e| panic!("{u}: {e}"));
    let (ssl, dn): (bool, Option<String>) =
        sqlx::query_as("SELECT ssl, client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&pool)
            .await
            .unwrap();
    let _ = std::fs::remove_file(&key);
    assert!(ssl);
    assert_eq!(dn.as_deref(), Some("/CN=taskbus-client"));
}

#[tokio::test]
async fn coordinator_and_agent_on_a_tls_only_database() {
    let pg = tls_only_server(false).await;
    let admin = url(
        &pg,
        "localhost",
        &format!(
            "sslmode=verify-full&sslrootcert={}",
            tls_fixture("ca.pem").display()
        ),
    );
    let s = Stack::on_database(30_000, TestDb::new_on(&admin).await).await;
    assert!(
        s.coordinator_config()
            .database_url
            .contains("sslmode=verify-full"),
        "the coordinator gets the TLS URL"
    );
    let (_coord, _coord_token) = s.coordinator().await;

    let (_agent, agent_token, _runs) = s.echo_agent("tls-agent", 4);

    s.submit(
        "default",
        json!({"kind": "echo", "id": "t-tls", "payload": {"over": "tls"}}),
    )
    .await;
    let row = s
        .wait_status("t-tls", "succeeded", Duration::from_secs(60))
        .await;
    assert_eq!(row.result, Some(json!({"over": "tls"})));
    assert_eq!(row.agent_id.as_deref(), Some("tls-agent"));

    // Every connection the coordinator holds is encrypted.
    let conns: Vec<(i32, Option<bool>)> = sqlx::query_as(
        "SELECT a.pid, s.ssl FROM pg_stat_activity a LEFT JOIN pg_stat_ssl s USING (pid) \
         WHERE a.application_name = 'taskbus'",
    )
    .fetch_all(&s.pg)
    .await
    .unwrap();
    assert!(
        !conns.is_empty(),
        "the coordinator's connections are listed"
    );
    assert!(
        conns.iter().all(|(_, ssl)| *ssl == Some(true)),
        "every taskbus connection uses TLS: {conns:?}"
    );
    agent_token.cancel();
}
