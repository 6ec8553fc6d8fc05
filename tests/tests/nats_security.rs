//! NATS credentials and TLS against real nats-servers configured for them: tokens,
//! users/passwords (flags and URL), nkeys, `.creds` files (operator/JWT mode) and TLS (own CA,
//! mutual TLS, TLS-first), the whole spine (coordinator, agent, producer) over mutual TLS
//! with a token, and the Python agent SDK with the same settings. Each refusal must come back
//! as an error that names what to check.

use std::time::Duration;

use async_nats::jetstream;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use taskbus_agent::handlers::Demo;
use taskbus_agent::{Agent, AgentConfig};
use taskbus_runtime::devservers::{NatsOptions, NatsServer};
use taskbus_runtime::nats::{NatsAuth, NatsError, Secret};
use taskbus_runtime::CancellationToken;
use taskbus_tests::{eventually, tls_fixture, workspace_bin, TestDb};

fn path_str(name: &str) -> String {
    tls_fixture(name).display().to_string()
}

async fn server(config: String) -> NatsServer {
    NatsServer::start_with(NatsOptions {
        config: Some(config),
        ..Default::default()
    })
    .await
    .expect("nats-server starts with the test config")
}

async fn connect(url: &str, auth: &NatsAuth) -> Result<async_nats::Client, NatsError> {
    taskbus_runtime::nats::connect(url, auth, "taskbus-test").await
}

/// Connect, then prove the connection works with a request to the server's own `$SYS`-free
/// round trip (a flush).
async fn works(url: &str, auth: &NatsAuth) {
    let c = connect(url, auth)
        .await
        .unwrap_or_else(|e| panic!("{auth:?} on {url}: {e}"));
    c.flush().await.expect("flush");
}

async fn refused(url: &str, auth: &NatsAuth, want: &[&str]) -> String {
    let err = match connect(url, auth).await {
        Ok(_) => panic!("{auth:?} on {url} was accepted"),
        Err(e) => e.to_string(),
    };
    for w in want {
        assert!(err.contains(w), "{auth:?} on {url}: {err:?} lacks {w:?}");
    }
    assert!(
        !err.contains("s3cr3t") && !err.contains("wrong-token"),
        "secret in {err}"
    );
    err
}

fn token(t: &str) -> NatsAuth {
    NatsAuth {
        token: Some(Secret::new(t)),
        ..Default::default()
    }
}

fn temp_file(text: &str) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), text).unwrap();
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_and_user_password_from_flags_or_url() {
    let tok = server(r#"authorization { token: "s3cr3t-tok" }"#.into()).await;
    let port = tok.port();
    works(&tok.url(), &token("s3cr3t-tok")).await;
    works(
        &format!("nats://s3cr3t-tok@127.0.0.1:{port}"),
        &NatsAuth::default(),
    )
    .await;
    refused(
        &tok.url(),
        &NatsAuth::default(),
        &["refused the credentials"],
    )
    .await;
    refused(
        &tok.url(),
        &token("wrong-token"),
        &["refused the credentials"],
    )
    .await;
    // The URL's token is not echoed back in the error.
    let err = refused(
        &format!("nats://wrong-token@127.0.0.1:{port}"),
        &NatsAuth::default(),
        &["refused the credentials", "***@127.0.0.1"],
    )
    .await;
    assert!(!err.contains("wrong-token"), "{err}");

    let users =
        server(r#"authorization { users: [ { user: "svc", password: "p@ss:s3cr3t/w" } ] }"#.into())
            .await;
    let port = users.port();
    let flags = NatsAuth {
        user: Some("svc".into()),
        password: Some(Secret::new("p@ss:s3cr3t/w")),
        ..Default::default()
    };
    works(&users.url(), &flags).await;
    // In a URL the password is percent-encoded.
    works(
        &format!("nats://svc:p%40ss%3As3cr3t%2Fw@127.0.0.1:{port}"),
        &NatsAuth::default(),
    )
    .await;
    let wrong = NatsAuth {
        password: Some(Secret::new("s3cr3t-not")),
        ..flags.clone()
    };
    refused(&users.url(), &wrong, &["refused the credentials"]).await;
    // Credentials twice (URL and flags) are refused before connecting.
    refused(
        &format!("nats://svc:x@127.0.0.1:{port}"),
        &flags,
        &["carries credentials"],
    )
    .await;
}

/// A server whose one user is the nkey `user`.
async fn nkey_server(user: &nkeys::KeyPair) -> NatsServer {
    server(format!(
        "authorization {{ users: [ {{ nkey: {} }} ] }}",
        user.public_key()
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nkey_seed_file() {
    let user = nkeys::KeyPair::new_user();
    let nats = nkey_server(&user).await;
    let seed = temp_file(&format!("{}\n", user.seed().unwrap()));
    let auth = |p: &std::path::Path| NatsAuth {
        nkey: Some(p.into()),
        ..Default::default()
    };
    works(&nats.url(), &auth(seed.path())).await;

    // Another user's seed: well formed, not allowed.
    let other = temp_file(&nkeys::KeyPair::new_user().seed().unwrap());
    refused(
        &nats.url(),
        &auth(other.path()),
        &["refused the credentials"],
    )
    .await;
    // The public key instead of the seed, garbage, and a missing file: found before connecting.
    let public = temp_file(&user.public_key());
    refused(
        &nats.url(),
        &auth(public.path()),
        &["--nats-nkey", "public key"],
    )
    .await;
    let garbage = temp_file("not a seed\n");
    refused(
        &nats.url(),
        &auth(garbage.path()),
        &["--nats-nkey", "no nkey seed"],
    )
    .await;
    refused(
        &nats.url(),
        &auth(std::path::Path::new("/nonexistent/seed.nk")),
        &["--nats-nkey /nonexistent/seed.nk", "cannot read"],
    )
    .await;
}

/// A NATS JWT: `header.claims.signature`, signed by `issuer` (ed25519 over the first two
/// parts), as `nsc` would write it.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = serde_json::json!({
        "jti": ulid::Ulid::new().to_string(),
        "iat": chrono::Utc::now().timestamp(),
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
    let input = format!("{header}.{body}");
    let sig = URL_SAFE_NO_PAD.encode(issuer.sign(input.as_bytes()).unwrap());
    format!("{input}.{sig}")
}

/// A server in operator (JWT) mode: an operator, a system account, and account `taskbus` whose
/// users the tests create.
struct OperatorMode {
    operator: nkeys::KeyPair,
    system: nkeys::KeyPair,
    account: nkeys::KeyPair,
}

impl OperatorMode {
    fn new() -> Self {
        Self {
            operator: nkeys::KeyPair::new_operator(),
            system: nkeys::KeyPair::new_account(),
            account: nkeys::KeyPair::new_account(),
        }
    }

    /// The server's configuration, with `revoked` users of the account revoked.
    fn config(&self, revoked: &[&nkeys::KeyPair]) -> String {
        let op = &self.operator;
        let op_jwt = jwt(
            op,
            &op.public_key(),
            "test-operator",
            serde_json::json!({"type": "operator", "version": 2}),
        );
        // JetStream in operator mode needs a system account.
        let sys_jwt = jwt(
            op,
            &self.system.public_key(),
            "SYS",
            serde_json::json!({"type": "account", "version": 2}),
        );
        let unlimited = serde_json::json!({
            "subs": -1, "conn": -1, "leaf": -1, "imports": -1, "exports": -1,
            "data": -1, "payload": -1, "wildcards": true,
            "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
        });
        // A revocation holds for the user's JWTs issued up to the given time.
        let until = chrono::Utc::now().timestamp() + 3600;
        let revocations: serde_json::Map<String, serde_json::Value> = revoked
            .iter()
            .map(|u| (u.public_key(), until.into()))
            .collect();
        let acc_jwt = jwt(
            op,
            &self.account.public_key(),
            "taskbus",
            serde_json::json!({
                "limits": unlimited, "revocations": revocations,
                "type": "account", "version": 2,
            }),
        );
        format!(
            "operator: {op_jwt}\nsystem_account: {sys}\nresolver: MEMORY\n\
             resolver_preload: {{\n  {sys}: {sys_jwt}\n  {acc}: {acc_jwt}\n}}\n",
            sys = self.system.public_key(),
            acc = self.account.public_key(),
        )
    }

    /// The text of a `.creds` file for `user`, signed by `signer` (the account, unless a test
    /// wants a stranger).
    fn creds(user: &nkeys::KeyPair, signer: &nkeys::KeyPair) -> String {
        let user_jwt = jwt(
            signer,
            &user.public_key(),
            "taskbus-svc",
            serde_json::json!({
                "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
                "type": "user", "version": 2,
            }),
        );
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().unwrap()
        )
    }
}

fn creds_auth(p: &std::path::Path) -> NatsAuth {
    NatsAuth {
        creds: Some(p.into()),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creds_file_in_operator_mode() {
    let op = OperatorMode::new();
    let nats = server(op.config(&[])).await;
    let user = nkeys::KeyPair::new_user();
    let creds = temp_file(&OperatorMode::creds(&user, &op.account));
    works(&nats.url(), &creds_auth(creds.path())).await;
    // JetStream works for the account, so every service can run with such credentials.
    let c = connect(&nats.url(), &creds_auth(creds.path()))
        .await
        .unwrap();
    let js = jetstream::new(c);
    taskbus_runtime::nats::ensure_streams(
        &js,
        &taskbus_proto::Subjects::default(),
        &Default::default(),
    )
    .await
    .expect("streams in operator mode");

    // A user signed by an account the server does not know.
    let stranger = OperatorMode::creds(&nkeys::KeyPair::new_user(), &nkeys::KeyPair::new_account());
    let bad = temp_file(&stranger);
    refused(
        &nats.url(),
        &creds_auth(bad.path()),
        &["refused the credentials"],
    )
    .await;
    refused(
        &nats.url(),
        &NatsAuth::default(),
        &["refused the credentials"],
    )
    .await;
    let garbage = temp_file("hello\n");
    refused(
        &nats.url(),
        &creds_auth(garbage.path()),
        &["--nats-creds", "not a NATS credentials file"],
    )
    .await;
    // A JWT block without a seed block.
    let half = temp_file(&OperatorMode::creds(&user, &op.account).replace("USER NKEY SEED", "X"));
    refused(&nats.url(), &creds_auth(half.path()), &["no seed"]).await;
}

/// Rotating credentials by replacing the `.creds` file (as an updated Kubernetes Secret does)
/// takes effect at the next reconnect, without a restart: the file is read at every connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_creds_file_is_used_at_the_next_reconnect() {
    let op = OperatorMode::new();
    let mut nats = server(op.config(&[])).await;
    let (old, new) = (nkeys::KeyPair::new_user(), nkeys::KeyPair::new_user());
    let file = temp_file(&OperatorMode::creds(&old, &op.account));
    let client = connect(&nats.url(), &creds_auth(file.path()))
        .await
        .unwrap();
    client.flush().await.unwrap();
    let connected = || client.connection_state() == async_nats::connection::State::Connected;

    // The old user is revoked and the server restarts: with the old file still in place the
    // client cannot get back in...
    nats.rewrite_config(&op.config(&[&old])).unwrap();
    nats.restart().await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!connected(), "reconnected with revoked credentials");

    // ...and once the file holds the new user's credentials, it reconnects by itself.
    std::fs::write(file.path(), OperatorMode::creds(&new, &op.account)).unwrap();
    eventually(
        "a reconnect with the new credentials",
        Duration::from_secs(20),
        || async { connected().then_some(()) },
    )
    .await;
    tokio::time::timeout(Duration::from_secs(5), client.flush())
        .await
        .expect("flush after the reconnect")
        .unwrap();
}

fn tls_block(extra: &str) -> String {
    format!(
        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  {extra}\n}}\n",
        path_str("server.pem"),
        path_str("server.key"),
        path_str("ca.pem"),
    )
}

fn mtls() -> NatsAuth {
    NatsAuth {
        tls_ca: Some(tls_fixture("ca.pem")),
        tls_cert: Some(tls_fixture("client.pem")),
        tls_key: Some(tls_fixture("client.key")),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_own_ca_client_certificates_and_tls_first() {
    // Server TLS only.
    let nats = server(tls_block("")).await;
    let url = nats.url();
    let ca = NatsAuth {
        tls_ca: Some(tls_fixture("ca.pem")),
        ..Default::default()
    };
    works(&url, &ca).await;
    works(&url.replace("nats://", "tls://"), &ca).await;
    // The system store does not know the test CA: the hint says to pass --nats-tls-ca.
    refused(&url, &NatsAuth::default(), &["--nats-tls-ca"]).await;
    let other = NatsAuth {
        tls_ca: Some(tls_fixture("other-ca.pem")),
        ..Default::default()
    };
    refused(&url, &other, &["TLS", "--nats-tls-ca"]).await;
    // A file that is not a certificate, or a key that is not a key, is named before connecting.
    let garbage = temp_file("garbage\n");
    let bad_ca = NatsAuth {
        tls_ca: Some(garbage.path().into()),
        ..Default::default()
    };
    refused(&url, &bad_ca, &["--nats-tls-ca", "no PEM certificate"]).await;
    let bad_key = NatsAuth {
        tls_key: Some(tls_fixture("client.pem")),
        ..mtls()
    };
    refused(&url, &bad_key, &["--nats-tls-key", "no PEM private key"]).await;

    // Mutual TLS: no client certificate, no connection.
    let verify = server(tls_block("verify: true")).await;
    works(&verify.url(), &mtls()).await;
    refused(
        &verify.url(),
        &ca,
        &["client certificate", "--nats-tls-cert"],
    )
    .await;

    // --nats-tls against a server without TLS is refused rather than silently plaintext.
    let plain = server(String::new()).await;
    let required = NatsAuth {
        tls: true,
        ..Default::default()
    };
    refused(&plain.url(), &required, &[]).await;
    refused(&plain.url(), &ca, &[]).await;

    // TLS before the server's greeting.
    let first = server(tls_block("handshake_first: true")).await;
    let tls_first = NatsAuth {
        tls_first: true,
        ..ca.clone()
    };
    works(&first.url(), &tls_first).await;
}

/// The whole path of a task — producer, coordinator, agent — on a server that demands mutual
/// TLS and a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spine_runs_over_mutual_tls_with_a_token() {
    taskbus_tests::init_logging();
    let nats = server(format!(
        "{}authorization {{ token: \"s3cr3t-spine\" }}\n",
        tls_block("verify: true")
    ))
    .await;
    let auth = NatsAuth {
        token: Some(Secret::new("s3cr3t-spine")),
        ..mtls()
    };
    let db = TestDb::new().await;
    let shutdown = CancellationToken::new();

    // Without the credentials the coordinator refuses to start, with a clear error.
    let mut cfg = taskbus_coordinator::Config::new(nats.url(), db.url.clone());
    cfg.nats_auth = NatsAuth {
        token: None,
        ..auth.clone()
    };
    let err = taskbus_coordinator::start(cfg.clone(), shutdown.clone())
        .await
        .err()
        .expect("coordinator without the token");
    assert!(err.to_string().contains("refused the credentials"), "{err}");

    cfg.nats_auth = auth.clone();
    let coordinator = taskbus_coordinator::start(cfg, shutdown.clone())
        .await
        .expect("coordinator over mTLS");
    let mut ac = AgentConfig::new(nats.url(), "default");
    ac.nats_auth = auth.clone();
    ac.agent_id = "tls-agent".into();
    let agent = Agent::new(ac, |t| Demo::Echo.run(t));
    let agent_task = tokio::spawn(agent.run(shutdown.clone()));

    let producer = connect(&nats.url(), &auth).await.unwrap();
    let js = jetstream::new(producer);
    js.publish(
        "taskbus.submit.default",
        r#"{"id":"tls-1","kind":"echo","payload":{"x":1}}"#.into(),
    )
    .await
    .unwrap()
    .await
    .expect("publish ack over TLS");

    let pg = db.pool().await;
    let (status, result): (String, Option<serde_json::Value>) =
        eventually("tls-1 to succeed", Duration::from_secs(20), || async {
            sqlx::query_as::<_, (String, Option<serde_json::Value>)>(
                "SELECT status, result FROM coordinator.tasks WHERE task_id = 'tls-1'",
            )
            .fetch_optional(&pg)
            .await
            .ok()
            .flatten()
            .filter(|(s, _)| s == "succeeded")
        })
        .await;
    assert_eq!(status, "succeeded");
    assert_eq!(result, Some(serde_json::json!({"x": 1})));

    // The CLI takes the same settings, after the subcommand too, and the token from the
    // environment.
    let out = cli()
        .args(["tasks", "list", "--json", "--nats-url", &nats.url()])
        .args(["--nats-tls-ca", &path_str("ca.pem")])
        .args(["--nats-tls-cert", &path_str("client.pem")])
        .args(["--nats-tls-key", &path_str("client.key")])
        .env("TASKBUS_NATS_TOKEN", "s3cr3t-spine")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(r#""tls-1""#), "{stdout}");
    // Without the client certificate it says what to pass.
    let out = cli()
        .args(["tasks", "list", "--nats-url", &nats.url()])
        .args(["--nats-tls-ca", &path_str("ca.pem")])
        .env("TASKBUS_NATS_TOKEN", "s3cr3t-spine")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--nats-tls-cert"), "{stderr}");

    shutdown.cancel();
    coordinator.wait().await;
    agent_task.await.unwrap().expect("agent stops cleanly");
}

fn cli() -> tokio::process::Command {
    let mut c = tokio::process::Command::new(workspace_bin("taskbus"));
    for v in [
        "TASKBUS_NATS_URL",
        "TASKBUS_NATS_TOKEN",
        "TASKBUS_NATS_USER",
        "TASKBUS_NATS_PASSWORD",
        "TASKBUS_NATS_CREDS",
        "TASKBUS_NATS_NKEY",
    ] {
        c.env_remove(v);
    }
    c.kill_on_drop(true);
    c
}

/// Bad combinations of flags are refused by every binary before anything connects, and
/// `--help` never prints a secret taken from the environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flags_are_checked_and_secrets_stay_hidden() {
    let cases: [(&str, &[&str], &str); 5] = [
        (
            "taskbus",
            &[
                "tasks",
                "list",
                "--nats-token",
                "a",
                "--nats-user",
                "b",
                "--nats-password",
                "c",
            ],
            "cannot be used with",
        ),
        (
            "taskbus",
            &["tasks", "list", "--nats-user", "b"],
            "--nats-password",
        ),
        (
            "taskbus-coordinator",
            &[
                "--database-url",
                "postgres://x/y",
                "--nats-tls-cert",
                "/c.pem",
            ],
            "--nats-tls-key",
        ),
        (
            "taskbus-agent",
            &[
                "--pool",
                "p",
                "--handler",
                "echo",
                "--nats-creds",
                "/a",
                "--nats-nkey",
                "/b",
            ],
            "cannot be used with",
        ),
        // `dev` starts its own server only without a URL, and that server has no credentials.
        ("taskbus", &["dev", "--nats-token", "t"], "need --nats-url"),
    ];
    for (bin, args, want) in cases {
        let out = tokio::process::Command::new(workspace_bin(bin))
            .args(args)
            .env_remove("TASKBUS_NATS_URL")
            .env_remove("TASKBUS_DATABASE_URL")
            .kill_on_drop(true)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bin} {args:?} succeeded");
        assert!(stderr.contains(want), "{bin} {args:?}: {stderr}");
    }
    for bin in [
        "taskbus",
        "taskbus-coordinator",
        "taskbus-agent",
        "taskbus-ledger",
        "taskbus-scaler",
    ] {
        let out = tokio::process::Command::new(workspace_bin(bin))
            .arg("--help")
            .env("TASKBUS_NATS_TOKEN", "s3cr3t-in-env")
            .env("TASKBUS_NATS_PASSWORD", "s3cr3t-pw-in-env")
            .output()
            .await
            .unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{bin} --help");
        for flag in ["--nats-creds", "--nats-tls-ca", "TASKBUS_NATS_TOKEN"] {
            assert!(help.contains(flag), "{bin} --help lacks {flag}");
        }
        assert!(
            !help.contains("s3cr3t"),
            "{bin} --help shows a secret:\n{help}"
        );
    }
}

/// `python -m taskbus_agent` (the Python agent SDK) serving `default` with the handlers of
/// tests/python/sdk_handlers.py, with no `TASKBUS_NATS_*` variable but those in `env`.
fn py_agent(
    python: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> tokio::process::Command {
    let mut c = taskbus_tests::python_sdk_agent(python);
    c.args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    for v in [
        "URL",
        "CREDS",
        "NKEY",
        "TOKEN",
        "USER",
        "PASSWORD",
        "TLS_CA",
        "TLS_CERT",
        "TLS_KEY",
        "TLS",
        "TLS_FIRST",
    ] {
        c.env_remove(format!("TASKBUS_NATS_{v}"));
    }
    c.envs(env.iter().copied());
    c
}

/// Run a Python agent that must give up: its exit code and standard error.
async fn py_agent_fails(
    python: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> (i32, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        py_agent(python, args, env).output(),
    )
    .await
    .unwrap_or_else(|_| panic!("the Python agent with {args:?} kept running"))
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} succeeded: {stderr}");
    for secret in ["s3cr3t", "wrong-token"] {
        assert!(!stderr.contains(secret), "{args:?}: a secret in {stderr}");
    }
    assert!(!stderr.contains("Traceback"), "{args:?}: {stderr}");
    (out.status.code().unwrap_or(-1), stderr)
}

/// Start a coordinator with `auth` and submit one echo task with it; the Python agent started
/// by `agent` must complete it.
async fn python_agent_completes_a_task(
    nats: &NatsServer,
    auth: &NatsAuth,
    mut agent: tokio::process::Command,
    id: &str,
) {
    let db = TestDb::new().await;
    let shutdown = CancellationToken::new();
    let mut cfg = taskbus_coordinator::Config::new(nats.url(), db.url.clone());
    cfg.nats_auth = auth.clone();
    let coordinator = taskbus_coordinator::start(cfg, shutdown.clone())
        .await
        .expect("coordinator");
    let mut child = agent.spawn().expect("start the Python agent");
    let js = jetstream::new(connect(&nats.url(), auth).await.unwrap());
    js.publish(
        "taskbus.submit.default",
        format!(r#"{{"id":"{id}","kind":"echo","payload":{{"x":1}}}}"#).into(),
    )
    .await
    .unwrap()
    .await
    .expect("publish ack");
    let pg = db.pool().await;
    let result: Option<serde_json::Value> = eventually(
        &format!("{id} to succeed"),
        Duration::from_secs(30),
        || async {
            sqlx::query_as::<_, (String, Option<serde_json::Value>)>(
                "SELECT status, result FROM coordinator.tasks WHERE task_id = $1",
            )
            .bind(id)
            .fetch_optional(&pg)
            .await
            .ok()
            .flatten()
            .filter(|(s, _)| s == "succeeded")
            .map(|(_, r)| r)
        },
    )
    .await;
    assert_eq!(result.unwrap()["echo"], serde_json::json!({"x": 1}));
    let _ = child.start_kill();
    shutdown.cancel();
    coordinator.wait().await;
}

/// The Python agent SDK takes the same credentials and TLS settings as the Rust services (here
/// from their `TASKBUS_NATS_*` variables and flags), completes tasks with mutual TLS and a token
/// and with a `.creds` file, and gives up at once, saying what to check, when the server refuses
/// its credentials or certificate or does not speak TLS. Settings that cannot work are refused
/// before connecting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_connects_with_tls_tokens_and_creds_files() {
    let Some(python) = taskbus_tests::python_with_nats_or_skip() else {
        return;
    };
    let (ca, cert, key) = (
        path_str("ca.pem"),
        path_str("client.pem"),
        path_str("client.key"),
    );
    let mtls_env = [
        ("TASKBUS_NATS_TLS_CA", ca.as_str()),
        ("TASKBUS_NATS_TLS_CERT", cert.as_str()),
        ("TASKBUS_NATS_TLS_KEY", key.as_str()),
    ];

    // Mutual TLS and a token.
    let nats = server(format!(
        "{}authorization {{ token: \"s3cr3t-py\" }}\n",
        tls_block("verify: true")
    ))
    .await;
    let url = nats.url();
    let mut env = mtls_env.to_vec();
    env.extend([
        ("TASKBUS_NATS_URL", url.as_str()),
        ("TASKBUS_NATS_TOKEN", "s3cr3t-py"),
    ]);
    let auth = NatsAuth {
        token: Some(Secret::new("s3cr3t-py")),
        ..mtls()
    };
    python_agent_completes_a_task(&nats, &auth, py_agent(&python, &[], &env), "py-tls-1").await;

    env.pop();
    let (code, err) = py_agent_fails(&python, &["--nats-token", "wrong-token"], &env).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("refused the credentials") && err.contains("--nats-token"),
        "{err}"
    );
    // The token in the URL instead.
    let in_url = url.replace("nats://", "nats://wrong-token@");
    let (_, err) = py_agent_fails(&python, &["--nats-url", &in_url], &mtls_env).await;
    assert!(err.contains("refused the credentials"), "{err}");
    let ca_only = [
        ("TASKBUS_NATS_URL", url.as_str()),
        ("TASKBUS_NATS_TLS_CA", ca.as_str()),
    ];
    let (_, err) = py_agent_fails(&python, &["--nats-token", "s3cr3t-py"], &ca_only).await;
    assert!(
        err.contains("client certificate") && err.contains("--nats-tls-cert"),
        "{err}"
    );
    let other = path_str("other-ca.pem");
    let (_, err) =
        py_agent_fails(&python, &["--nats-url", &url, "--nats-tls-ca", &other], &[]).await;
    assert!(
        err.contains("TLS failed") && err.contains("--nats-tls-ca"),
        "{err}"
    );

    // A server without TLS gets no token when TLS is required.
    let plain = server("authorization { token: \"s3cr3t-py\" }\n".into()).await;
    let (code, err) = py_agent_fails(
        &python,
        &[
            "--nats-url",
            &plain.url(),
            "--nats-tls",
            "--nats-token",
            "s3cr3t-py",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("does not speak TLS") && err.contains("no credentials were sent"),
        "{err}"
    );

    // Operator (JWT) mode and a .creds file.
    let op = OperatorMode::new();
    let jwt_server = server(op.config(&[])).await;
    let creds = temp_file(&OperatorMode::creds(
        &nkeys::KeyPair::new_user(),
        &op.account,
    ));
    let creds_path = creds.path().display().to_string();
    let agent = py_agent(
        &python,
        &["--nats-url", &jwt_server.url(), "--nats-creds", &creds_path],
        &[],
    );
    python_agent_completes_a_task(&jwt_server, &creds_auth(creds.path()), agent, "py-creds-1")
        .await;
    let stranger = temp_file(&OperatorMode::creds(
        &nkeys::KeyPair::new_user(),
        &nkeys::KeyPair::new_account(),
    ));
    let stranger_path = stranger.path().display().to_string();
    let (_, err) = py_agent_fails(
        &python,
        &[
            "--nats-url",
            &jwt_server.url(),
            "--nats-creds",
            &stranger_path,
        ],
        &[],
    )
    .await;
    assert!(err.contains("refused the credentials"), "{err}");

    // An nkey user, the seed's file named by the variable.
    let user = nkeys::KeyPair::new_user();
    let nkey_server = nkey_server(&user).await;
    let seed = temp_file(&format!("{}\n", user.seed().unwrap()));
    let (nkey_url, seed_path) = (nkey_server.url(), seed.path().display().to_string());
    let env = [
        ("TASKBUS_NATS_URL", nkey_url.as_str()),
        ("TASKBUS_NATS_NKEY", seed_path.as_str()),
    ];
    let auth = NatsAuth {
        nkey: Some(seed.path().into()),
        ..Default::default()
    };
    python_agent_completes_a_task(
        &nkey_server,
        &auth,
        py_agent(&python, &[], &env),
        "py-nkey-1",
    )
    .await;
    let other = temp_file(&nkeys::KeyPair::new_user().seed().unwrap());
    let other_path = other.path().display().to_string();
    let (_, err) = py_agent_fails(
        &python,
        &["--nats-url", &nkey_url, "--nats-nkey", &other_path],
        &[],
    )
    .await;
    assert!(err.contains("refused the credentials"), "{err}");
}

/// Flags, variables, and what the refusal must say.
type BadSettings<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, Vec<&'a str>);

/// Python agent settings that cannot work are refused before connecting (exit 2), naming the
/// flag or variable and what is wrong, without a traceback or the secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_refuses_bad_nats_settings_before_connecting() {
    let Some(python) = taskbus_tests::python_with_nats_or_skip() else {
        return;
    };
    let user = nkeys::KeyPair::new_user();
    let account = nkeys::KeyPair::new_account();
    let garbage = temp_file("hello\n");
    let half = temp_file(&OperatorMode::creds(&user, &account).replace("USER NKEY SEED", "X"));
    let public = temp_file(&format!("{}\n", user.public_key()));
    let big = temp_file(&"x".repeat(2 << 20));
    let noisy = temp_file(&format!("# my seed\n{}\n", user.seed().unwrap()));
    let seed_and_more = noisy.path().display().to_string();
    let (g, h, p, b) = (
        garbage.path().display().to_string(),
        half.path().display().to_string(),
        public.path().display().to_string(),
        big.path().display().to_string(),
    );
    let (ca, cert, key) = (
        path_str("ca.pem"),
        path_str("client.pem"),
        path_str("client.key"),
    );
    let server_key = path_str("server.key");
    let url = "nats://127.0.0.1:1";
    let cases: Vec<BadSettings> = vec![
        (
            vec!["--nats-creds", &g],
            vec![],
            vec!["--nats-creds", "not a NATS credentials file"],
        ),
        (vec!["--nats-creds", &h], vec![], vec!["no seed"]),
        (
            vec![],
            vec![("TASKBUS_NATS_CREDS", "/no/such/file")],
            vec!["TASKBUS_NATS_CREDS", "cannot read it"],
        ),
        (vec!["--nats-creds", &b], vec![], vec!["larger than 1 MiB"]),
        (
            vec!["--nats-nkey", &p],
            vec![],
            vec!["--nats-nkey", "that is the public key"],
        ),
        (vec!["--nats-nkey", &g], vec![], vec!["holds no nkey seed"]),
        (
            vec!["--nats-nkey", &seed_and_more],
            vec![],
            vec!["keep only the SU... line"],
        ),
        (
            vec!["--nats-tls-ca", &g],
            vec![],
            vec!["--nats-tls-ca", "no PEM certificate"],
        ),
        (
            vec!["--nats-tls-cert", &cert, "--nats-tls-key", &cert],
            vec![],
            vec!["--nats-tls-key", "no PEM private key"],
        ),
        (
            vec!["--nats-tls-cert", &cert, "--nats-tls-key", &server_key],
            vec![],
            vec!["not a certificate and its private key"],
        ),
        (
            vec!["--nats-tls-cert", &cert],
            vec![],
            vec!["--nats-tls-key go together"],
        ),
        (
            vec![
                "--nats-token",
                "s3cr3t-a",
                "--nats-user",
                "u",
                "--nats-password",
                "s3cr3t-b",
            ],
            vec![],
            vec!["only one of"],
        ),
        (
            vec!["--nats-user", "u"],
            vec![],
            vec!["--nats-password go together"],
        ),
        (
            vec![
                "--nats-url",
                "nats://s3cr3t-x@h:4222",
                "--nats-token",
                "s3cr3t-y",
            ],
            vec![],
            vec!["carries credentials"],
        ),
        (
            vec!["--nats-url", "nats://a:s3cr3t-1@h:1,nats://a:s3cr3t-2@g:1"],
            vec![],
            vec!["different credentials"],
        ),
        (
            vec!["--nats-url", "http://h:4222"],
            vec![],
            vec!["not a server address"],
        ),
        (
            vec!["--nats-url", "nats://h:99999"],
            vec![],
            vec!["NATS URL"],
        ),
        (
            vec![],
            vec![("TASKBUS_NATS_TLS", "maybe")],
            vec!["TASKBUS_NATS_TLS", "true or false"],
        ),
    ];
    for (args, env, want) in cases {
        let mut all = vec!["--nats-url", url];
        all.extend(args.iter().copied());
        if args.first() == Some(&"--nats-url") {
            all = args.clone();
        }
        let (code, err) = py_agent_fails(&python, &all, &env).await;
        assert_eq!(code, 2, "{all:?} {env:?}: {err}");
        for w in want {
            assert!(err.contains(w), "{all:?} {env:?}: {err:?} lacks {w:?}");
        }
    }
    // Good files pass the checks: the agent then waits for the (absent) server.
    let mut waiting = py_agent(
        &python,
        &[
            "--nats-url",
            url,
            "--nats-tls-ca",
            &ca,
            "--nats-tls-cert",
            &cert,
            "--nats-tls-key",
            &key,
        ],
        &[],
    );
    let mut child = waiting.spawn().unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the agent gave up on a server that is not up yet"
    );
    child.start_kill().unwrap();
}
