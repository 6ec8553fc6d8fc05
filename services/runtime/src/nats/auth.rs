//! How a service proves who it is to NATS and protects the connection: credentials (a `.creds`
//! file, an nkey seed, a token, or a user and password, also accepted inside the URL as
//! `nats://user:pass@host` or `nats://token@host`) and TLS (a CA to trust, a client certificate
//! for mutual TLS, TLS required or TLS-first).
//!
//! Every service and the CLI flatten [`NatsAuth`] into their flags, so the same
//! `--nats-*` flags and `TASKBUS_NATS_*` variables work everywhere. Files are read and checked
//! before connecting, so a wrong path or a file of the wrong kind is reported with the flag that
//! named it instead of as a failed handshake.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use async_nats::{ConnectErrorKind, ConnectOptions, ServerAddr};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A secret given in a flag or variable: kept out of `Debug` output and logs.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    /// The secret itself, for handing to the client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_string()))
    }
}

/// Credentials and TLS settings for the NATS connection. `Default` is no credentials and TLS
/// only when the URL says `tls://` or the server asks for it.
///
/// At most one of creds file, nkey, token and user/password may be given (or credentials in the
/// URL instead of all four).
#[derive(clap::Args, Debug, Clone, Default, PartialEq, Eq)]
#[command(next_help_heading = "NATS credentials and TLS")]
pub struct NatsAuth {
    /// NATS credentials file (user JWT and nkey seed, as `nsc generate creds` writes it), for
    /// servers in operator/JWT mode.
    #[arg(id = "nats_creds", long = "nats-creds", env = "TASKBUS_NATS_CREDS",
          value_name = "FILE",
          conflicts_with_all = ["nats_nkey", "nats_token", "nats_user"])]
    pub creds: Option<PathBuf>,
    /// File holding an nkey seed (a line starting with `SU`), for servers whose users are nkeys.
    #[arg(id = "nats_nkey", long = "nats-nkey", env = "TASKBUS_NATS_NKEY", value_name = "FILE",
          conflicts_with_all = ["nats_token", "nats_user"])]
    pub nkey: Option<PathBuf>,
    /// Token for servers with `authorization { token: ... }`. Prefer the variable to the flag:
    /// flags show up in `ps`.
    #[arg(
        id = "nats_token",
        long = "nats-token",
        env = "TASKBUS_NATS_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN",
        conflicts_with = "nats_user"
    )]
    pub token: Option<Secret>,
    /// User name for user/password authentication (the password comes from --nats-password).
    #[arg(
        id = "nats_user",
        long = "nats-user",
        env = "TASKBUS_NATS_USER",
        value_name = "USER",
        requires = "nats_password"
    )]
    pub user: Option<String>,
    /// Password for --nats-user. Prefer the variable to the flag: flags show up in `ps`.
    #[arg(
        id = "nats_password",
        long = "nats-password",
        env = "TASKBUS_NATS_PASSWORD",
        hide_env_values = true,
        value_name = "PASSWORD",
        requires = "nats_user"
    )]
    pub password: Option<Secret>,
    /// PEM file of the CA(s) that signed the server's certificate. Requires TLS. Without it, TLS
    /// connections trust the system's CA store.
    #[arg(
        id = "nats_tls_ca",
        long = "nats-tls-ca",
        env = "TASKBUS_NATS_TLS_CA",
        value_name = "FILE"
    )]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with --nats-tls-key). Requires TLS.
    #[arg(
        id = "nats_tls_cert",
        long = "nats-tls-cert",
        env = "TASKBUS_NATS_TLS_CERT",
        value_name = "FILE",
        requires = "nats_tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --nats-tls-cert.
    #[arg(
        id = "nats_tls_key",
        long = "nats-tls-key",
        env = "TASKBUS_NATS_TLS_KEY",
        value_name = "FILE",
        requires = "nats_tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
    /// Refuse to connect without TLS (as a `tls://` URL does).
    #[arg(id = "nats_tls", long = "nats-tls", env = "TASKBUS_NATS_TLS")]
    pub tls: bool,
    /// Start TLS before the server's greeting, for servers configured with
    /// `tls { handshake_first: true }`. Implies --nats-tls.
    #[arg(
        id = "nats_tls_first",
        long = "nats-tls-first",
        env = "TASKBUS_NATS_TLS_FIRST"
    )]
    pub tls_first: bool,
}

/// The hint for failures that are neither credentials nor TLS.
pub(crate) const UNREACHABLE: &str = "is nats-server running (with -js)?";

/// A problem with the NATS credentials or TLS settings, found before connecting.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AuthError(String);

/// Credential and certificate files are small; anything bigger is the wrong file.
const MAX_FILE_BYTES: u64 = 1 << 20;

fn read(flag: &str, path: &Path) -> Result<String, AuthError> {
    use std::io::Read;
    let fail = |why: String| AuthError(format!("{flag} {}: {why}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| fail(format!("cannot read it: {e}")))?;
    let mut text = String::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| fail(format!("cannot read it as text: {e}")))?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(fail("is larger than 1 MiB; is it the right file?".into()));
    }
    Ok(text)
}

fn check_certs(flag: &str, path: &Path) -> Result<(), AuthError> {
    let text = read(flag, path)?;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(text.as_bytes()).collect();
    match certs {
        Ok(c) if !c.is_empty() => Ok(()),
        Ok(_) => Err(AuthError(format!(
            "{flag} {}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ))),
        Err(e) => Err(AuthError(format!(
            "{flag} {}: not a PEM certificate file: {e}",
            path.display()
        ))),
    }
}

fn check_key(flag: &str, path: &Path) -> Result<(), AuthError> {
    let text = read(flag, path)?;
    PrivateKeyDer::from_pem_slice(text.as_bytes())
        .map(|_| ())
        .map_err(|e| {
            AuthError(format!(
                "{flag} {}: holds no PEM private key: {e}",
                path.display()
            ))
        })
}

/// Undo `%XX` escapes of a URL's user or password part.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Credentials written into a URL: `user:pass@` or `token@`.
#[derive(Debug, PartialEq, Eq)]
enum UrlCredentials {
    UserPassword(String, String),
    Token(String),
}

fn url_credentials(addr: &ServerAddr) -> Option<UrlCredentials> {
    let user = percent_decode(addr.username()?);
    Some(match addr.password() {
        Some(p) => UrlCredentials::UserPassword(user, percent_decode(p)),
        None => UrlCredentials::Token(user),
    })
}

/// `url` with any password or token in it replaced by `***`, for messages and logs.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|part| {
            let part = part.trim();
            let Ok(addr) = part.parse::<ServerAddr>() else {
                // Not parseable: hide whatever is before an `@` all the same.
                return match part.rsplit_once('@') {
                    Some((head, tail)) => match head.split_once("://") {
                        Some((scheme, _)) => format!("{scheme}://***@{tail}"),
                        None => format!("***@{tail}"),
                    },
                    None => part.to_string(),
                };
            };
            let mut u = addr.into_inner();
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            } else if !u.username().is_empty() {
                let _ = u.set_username("***");
            }
            u.to_string()
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The text of the first line of the `-----BEGIN <what>-----` block of a `.creds` file.
fn creds_block<'a>(text: &'a str, what: &str) -> Option<&'a str> {
    let mut lines = text.lines().map(str::trim);
    lines.find(|l| l.starts_with("-----BEGIN") && l.contains(what))?;
    lines
        .find(|l| !l.is_empty())
        .filter(|l| !l.starts_with("--"))
}

/// A credential kept in a file and read at each connect.
#[derive(Clone)]
enum FileCredential {
    /// `--nats-creds`: a user JWT and the seed that signs for it.
    Creds(PathBuf),
    /// `--nats-nkey`: an nkey seed.
    Nkey(PathBuf),
}

impl FileCredential {
    /// Read and check the file: the user JWT (creds files only) and the key pair.
    fn load(&self) -> Result<(Option<String>, nkeys::KeyPair), AuthError> {
        match self {
            FileCredential::Creds(path) => {
                let text = read("--nats-creds", path)?;
                let bad = |what: &str| {
                    AuthError(format!(
                        "--nats-creds {}: not a NATS credentials file ({what}); it holds a \
                         -----BEGIN NATS USER JWT----- block and a -----BEGIN USER NKEY SEED----- \
                         block, as `nsc generate creds` writes it",
                        path.display()
                    ))
                };
                let jwt = creds_block(&text, "NATS USER JWT")
                    .filter(|j| j.split('.').count() == 3)
                    .ok_or_else(|| bad("no user JWT"))?;
                let seed = creds_block(&text, "USER NKEY SEED").ok_or_else(|| bad("no seed"))?;
                let kp = nkeys::KeyPair::from_seed(seed)
                    .map_err(|e| bad(&format!("the seed is not valid: {e}")))?;
                Ok((Some(jwt.to_string()), kp))
            }
            FileCredential::Nkey(path) => {
                let text = read("--nats-nkey", path)?;
                let seed = text
                    .lines()
                    .map(str::trim)
                    .find(|l| l.starts_with('S'))
                    .unwrap_or_else(|| text.trim());
                match nkeys::KeyPair::from_seed(seed) {
                    Ok(kp) => Ok((None, kp)),
                    Err(e) => {
                        let public = seed.starts_with('U') || text.trim_start().starts_with('U');
                        let hint = if public {
                            "; that is the public key (U...): give the seed (SU...), which stays \
                             secret"
                        } else {
                            ""
                        };
                        Err(AuthError(format!(
                            "--nats-nkey {}: holds no nkey seed ({e}){hint}",
                            path.display()
                        )))
                    }
                }
            }
        }
    }

    /// Read the file now and answer the server's challenge with it.
    fn sign(&self, nonce: &[u8]) -> Result<async_nats::Auth, async_nats::AuthError> {
        let (jwt, kp) = self.load().map_err(|e| {
            tracing::error!(error = %e, "cannot read NATS credentials for a reconnect");
            async_nats::AuthError::new(e)
        })?;
        let signature = kp
            .sign(nonce)
            .map_err(|e| async_nats::AuthError::new(format!("signing the server's nonce: {e}")))?;
        let mut auth = async_nats::Auth::new();
        auth.signature = Some(signature);
        match jwt {
            Some(jwt) => auth.jwt = Some(jwt),
            None => auth.nkey = Some(kp.public_key()),
        }
        Ok(auth)
    }
}

impl NatsAuth {
    /// Check the settings and files and build connect options with them (and with any
    /// credentials in `addrs`' URLs); callers add name, timeouts and the like.
    ///
    /// A `.creds` or nkey file is read again at every connect and reconnect (as the Go client
    /// does), so credentials rotated by replacing the file, e.g. an updated Kubernetes Secret,
    /// are used from the next reconnect on without a restart. It is also read once here, so
    /// that a bad file stops the start with a clear error.
    pub async fn options(&self, addrs: &[ServerAddr]) -> Result<ConnectOptions, AuthError> {
        // Credentials in the URLs: all URLs that carry some must carry the same.
        let mut in_url = None;
        for a in addrs {
            if let Some(c) = url_credentials(a) {
                match &in_url {
                    None => in_url = Some(c),
                    Some(prev) if *prev == c => {}
                    Some(_) => {
                        return Err(AuthError(
                            "the NATS URLs carry different credentials; give them once, the same \
                             for every server"
                                .into(),
                        ))
                    }
                }
            }
        }
        // Credential flags given (URL credentials not counted). Direct callers (not through
        // clap) get the same rules as the flags.
        let methods = [
            self.creds.is_some(),
            self.nkey.is_some(),
            self.token.is_some(),
            self.user.is_some(),
        ]
        .into_iter()
        .filter(|m| *m)
        .count();
        if in_url.is_some() && methods > 0 {
            return Err(AuthError(
                "the NATS URL carries credentials (user:password@ or token@) and --nats-creds, \
                 --nats-nkey, --nats-token or --nats-user is given too; use one of them"
                    .into(),
            ));
        }
        if methods > 1 {
            return Err(AuthError(
                "give only one of --nats-creds, --nats-nkey, --nats-token and --nats-user".into(),
            ));
        }
        if self.user.is_some() != self.password.is_some() {
            return Err(AuthError(
                "--nats-user and --nats-password go together".into(),
            ));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(AuthError(
                "--nats-tls-cert and --nats-tls-key go together".into(),
            ));
        }

        let file = match (&self.creds, &self.nkey) {
            (Some(p), _) => Some(FileCredential::Creds(p.clone())),
            (_, Some(p)) => Some(FileCredential::Nkey(p.clone())),
            _ => None,
        };
        let mut opts = match file {
            Some(cred) => {
                cred.load()?;
                ConnectOptions::with_auth_callback(move |nonce: Vec<u8>| {
                    let cred = cred.clone();
                    async move { cred.sign(&nonce) }
                })
            }
            None => ConnectOptions::new(),
        };
        match in_url {
            Some(UrlCredentials::UserPassword(u, p)) => opts = opts.user_and_password(u, p),
            Some(UrlCredentials::Token(t)) => opts = opts.token(t),
            None => {}
        }
        if let Some(t) = &self.token {
            if t.expose().is_empty() {
                return Err(AuthError("--nats-token is empty".into()));
            }
            opts = opts.token(t.expose().to_string());
        }
        if let (Some(u), Some(p)) = (&self.user, &self.password) {
            opts = opts.user_and_password(u.clone(), p.expose().to_string());
        }

        let mut tls = self.tls || self.tls_first;
        if let Some(ca) = &self.tls_ca {
            check_certs("--nats-tls-ca", ca)?;
            opts = opts.add_root_certificates(ca.clone());
            tls = true;
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            check_certs("--nats-tls-cert", cert)?;
            check_key("--nats-tls-key", key)?;
            opts = opts.add_client_certificate(cert.clone(), key.clone());
            tls = true;
        }
        if tls {
            opts = opts.require_tls(true);
        }
        if self.tls_first {
            opts = opts.tls_first();
        }
        Ok(opts)
    }

    /// What to check when a connection fails with `err`, in the user's terms.
    pub fn hint(&self, err: &async_nats::ConnectError) -> &'static str {
        // Certificate problems arrive as I/O errors of the handshake.
        let text = err.to_string().to_lowercase();
        let tls_failure = ["certificate", "tls", "handshake", "alert"]
            .iter()
            .any(|w| text.contains(w));
        let kind = match err.kind() {
            ConnectErrorKind::Io if tls_failure => ConnectErrorKind::Tls,
            k => k,
        };
        match kind {
            ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
                "the server refused the credentials: check --nats-creds, --nats-nkey, \
                 --nats-token or --nats-user/--nats-password (or user:password@ in the URL)"
            }
            ConnectErrorKind::Tls if text.contains("certificaterequired") => {
                "TLS failed: the server asks for a client certificate; pass --nats-tls-cert and \
                 --nats-tls-key"
            }
            ConnectErrorKind::Tls if self.tls_ca.is_none() => {
                "TLS failed: if the server's certificate is signed by your own CA, pass it with \
                 --nats-tls-ca; the URL's host name must be in the certificate"
            }
            ConnectErrorKind::Tls => {
                "TLS failed: check that --nats-tls-ca is the CA that signed the server's \
                 certificate, that the URL's host name is in that certificate, and \
                 --nats-tls-cert/--nats-tls-key if the server asks for a client certificate"
            }
            _ => UNREACHABLE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(s: &str) -> Vec<ServerAddr> {
        crate::nats::server_addrs(s).unwrap()
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let a = NatsAuth {
            token: Some(Secret::new("hunter2")),
            ..Default::default()
        };
        assert!(!format!("{a:?}").contains("hunter2"));
        let b = NatsAuth {
            user: Some("svc".into()),
            password: Some(Secret::new("s3cr3t")),
            ..Default::default()
        };
        assert!(!format!("{b:?}").contains("s3cr3t"));
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("nats://svc:s3cr3t@a:4222, tls://tok@b:4222,nats://c:1"),
            "nats://svc:***@a:4222,tls://***@b:4222,nats://c:1"
        );
        assert!(!redact_url("nats://x:y@bad host:1").contains('y'));
    }

    #[test]
    fn url_credentials_are_decoded() {
        let a = addrs("nats://svc:p%40ss%3Aw@h:4222");
        assert_eq!(
            url_credentials(&a[0]),
            Some(UrlCredentials::UserPassword("svc".into(), "p@ss:w".into()))
        );
        let a = addrs("nats://tok@h:4222");
        assert_eq!(
            url_credentials(&a[0]),
            Some(UrlCredentials::Token("tok".into()))
        );
        assert_eq!(url_credentials(&addrs("nats://h:4222")[0]), None);
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn endless_or_binary_files_are_refused() {
        let e = read("--nats-tls-ca", Path::new("/dev/zero")).unwrap_err();
        assert!(e.to_string().contains("larger than 1 MiB"), "{e}");
        let bin = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(bin.path(), [0xff, 0xfe, 0x00]).unwrap();
        let e = read("--nats-creds", bin.path()).unwrap_err();
        assert!(e.to_string().contains("as text"), "{e}");
    }

    #[tokio::test]
    async fn conflicting_settings_are_refused() {
        let cases: Vec<(NatsAuth, &str, &str)> = vec![
            (
                NatsAuth {
                    token: Some(Secret::new("t")),
                    ..Default::default()
                },
                "nats://u:p@h:1",
                "carries credentials",
            ),
            (
                NatsAuth::default(),
                "nats://u:p@h:1,nats://v:q@h:2",
                "different credentials",
            ),
            (
                NatsAuth {
                    token: Some(Secret::new("t")),
                    nkey: Some("/x".into()),
                    ..Default::default()
                },
                "nats://h:1",
                "only one of",
            ),
            (
                NatsAuth {
                    user: Some("u".into()),
                    ..Default::default()
                },
                "nats://h:1",
                "go together",
            ),
            (
                NatsAuth {
                    tls_key: Some("/k".into()),
                    ..Default::default()
                },
                "nats://h:1",
                "go together",
            ),
            (
                NatsAuth {
                    token: Some(Secret::new("")),
                    ..Default::default()
                },
                "nats://h:1",
                "empty",
            ),
        ];
        for (auth, url, want) in cases {
            let err = auth
                .options(&addrs(url))
                .await
                .err()
                .unwrap_or_else(|| panic!("{auth:?} with {url} accepted"));
            assert!(err.to_string().contains(want), "{auth:?}: {err}");
        }
        // The same URL credentials on every server are fine.
        NatsAuth::default()
            .options(&addrs("nats://u:p@h:1,nats://u:p@h:2"))
            .await
            .unwrap();
    }
}
