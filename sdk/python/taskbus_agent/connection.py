"""How an agent reaches NATS: server URLs, credentials and TLS.

The settings and their ``TASKBUS_NATS_*`` variables are the ones every taskbus service and the
``taskbus`` CLI take (docs/DEPLOY.md, "NATS credentials and TLS"), so one Kubernetes Secret and
one set of variables serve Rust and Python pods alike:

======================  ============================  ==========================================
argument                variable                      what it is
======================  ============================  ==========================================
``nats_url``            ``TASKBUS_NATS_URL``          server URL(s), comma separated; may carry
                                                      ``user:password@`` or ``token@``
``creds``               ``TASKBUS_NATS_CREDS``        ``.creds`` file (operator/JWT mode)
``nkey``                ``TASKBUS_NATS_NKEY``         file holding an nkey seed (``SU...``)
``token``               ``TASKBUS_NATS_TOKEN``        token
``user``/``password``   ``TASKBUS_NATS_USER``/        user and password
                        ``TASKBUS_NATS_PASSWORD``
``tls_ca``              ``TASKBUS_NATS_TLS_CA``       trust only these CAs (PEM); requires TLS
``tls_cert``/           ``TASKBUS_NATS_TLS_CERT``/    client certificate and key (mutual TLS)
``tls_key``             ``TASKBUS_NATS_TLS_KEY``
``tls``                 ``TASKBUS_NATS_TLS``          refuse to connect without TLS
``tls_first``           ``TASKBUS_NATS_TLS_FIRST``    TLS before the server's greeting
======================  ============================  ==========================================

Files are read and checked before connecting, so a wrong path or a file of the wrong kind is
reported with the setting that named it rather than as a failed handshake. A ``.creds`` or nkey
file is read again at every reconnect, so credentials rotated by replacing the file (an updated
Secret) are used without a restart. When TLS is required (``tls``, ``tls_first``, a CA, a client
certificate or a ``tls://`` URL), a server that does not speak TLS is refused before any token
or password is sent.
"""

import dataclasses
import os
import ssl
from typing import Any, Dict, List, Optional
from urllib.parse import unquote, urlsplit

import nats.errors

DEFAULT_URL = "nats://127.0.0.1:4222"
# Credential and certificate files are small; anything bigger is the wrong file.
MAX_FILE_BYTES = 1 << 20

_FLAG = {
    "creds": ("--nats-creds", "TASKBUS_NATS_CREDS"),
    "nkey": ("--nats-nkey", "TASKBUS_NATS_NKEY"),
    "token": ("--nats-token", "TASKBUS_NATS_TOKEN"),
    "user": ("--nats-user", "TASKBUS_NATS_USER"),
    "password": ("--nats-password", "TASKBUS_NATS_PASSWORD"),
    "tls_ca": ("--nats-tls-ca", "TASKBUS_NATS_TLS_CA"),
    "tls_cert": ("--nats-tls-cert", "TASKBUS_NATS_TLS_CERT"),
    "tls_key": ("--nats-tls-key", "TASKBUS_NATS_TLS_KEY"),
    "tls": ("--nats-tls", "TASKBUS_NATS_TLS"),
    "tls_first": ("--nats-tls-first", "TASKBUS_NATS_TLS_FIRST"),
}

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")

CREDENTIALS_HINT = (
    "the server refused the credentials: check --nats-creds, --nats-nkey, --nats-token or "
    "--nats-user/--nats-password (or user:password@ in the URL)"
)


class ConfigError(ValueError):
    """An agent setting that cannot work; the message says which and why."""


class ConnectRefused(nats.errors.Error):
    """NATS cannot be used with these settings (credentials refused, TLS failed or missing):
    retrying will not help until the settings or the server change."""


def redact_url(url: str) -> str:
    """``url`` (comma separated) with any password or token replaced by ``***``."""
    out = []
    for part in url.split(","):
        part = part.strip()
        scheme, sep, rest = part.rpartition("://")
        if "@" in rest:
            cred, _, host = rest.rpartition("@")
            user, colon, _ = cred.partition(":")
            cred = f"{user}:***" if colon else "***"
            part = f"{scheme}{sep}{cred}@{host}"
        out.append(part)
    return ",".join(out)


def _label(name: str) -> str:
    flag, env = _FLAG[name]
    return f"{flag} ({env})"


def _read(name: str, path: str) -> str:
    where = f"{_label(name)} {path}"
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{where}: cannot read it: {e.strerror or e}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{where}: is larger than 1 MiB; is it the right file?")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: is not a text file; is it the right file?") from None


def _block(text: str, what: str) -> Optional[str]:
    """The first line of the ``-----BEGIN <what>-----`` block of a ``.creds`` file."""
    lines = iter(line.strip() for line in text.splitlines())
    for line in lines:
        if line.startswith("-----BEGIN") and what in line:
            for body in lines:
                if body:
                    return None if body.startswith("--") else body
    return None


def _nkeys():
    try:
        import nkeys  # noqa: F401  (nats-py signs with it)

        return nkeys
    except ImportError:
        raise ConfigError(
            "nkey and .creds credentials need the nkeys package: pip install 'nats-py[nkeys]'"
        ) from None


def _check_seed(name: str, path: str, seed: str, hint: str = "") -> None:
    try:
        _nkeys().from_seed(seed.encode())
    except ConfigError:
        raise
    except Exception as e:  # nkeys raises its own error types, and binascii errors
        raise ConfigError(f"{_label(name)} {path}: holds no valid nkey seed ({e or type(e).__name__}){hint}") from None


def _check_creds(path: str) -> None:
    text = _read("creds", path)
    shape = (
        "it holds a -----BEGIN NATS USER JWT----- block and a -----BEGIN USER NKEY SEED----- "
        "block, as `nsc generate creds` writes it"
    )
    jwt = _block(text, "NATS USER JWT")
    if jwt is None or jwt.count(".") != 2:
        raise ConfigError(f"{_label('creds')} {path}: not a NATS credentials file (no user JWT); {shape}")
    seed = _block(text, "USER NKEY SEED")
    if seed is None:
        raise ConfigError(f"{_label('creds')} {path}: not a NATS credentials file (no seed); {shape}")
    _check_seed("creds", path, seed)


def _check_nkey(path: str) -> None:
    text = _read("nkey", path)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    seed = next((line for line in lines if line.startswith("S")), None)
    if seed is None:
        hint = (
            "; that is the public key (U...): give the seed (SU...), which stays secret"
            if any(line.startswith("U") for line in lines)
            else ""
        )
        raise ConfigError(f"{_label('nkey')} {path}: holds no nkey seed (a line starting with SU){hint}")
    _check_seed("nkey", path, seed)
    if text.strip() != seed:
        raise ConfigError(
            f"{_label('nkey')} {path}: holds more than the seed; nats-py reads the whole file as "
            "the seed, so keep only the SU... line in it"
        )


def _check_pem(name: str, path: str, marker: str, what: str) -> None:
    if marker not in _read(name, path):
        raise ConfigError(f"{_label(name)} {path}: holds no {what}")


def _flag_value(name: str, given: Any) -> Any:
    """An argument, or else its variable (None when neither is set or the variable is empty)."""
    if given is not None:
        return given
    v = os.environ.get(_FLAG[name][1])
    return v if v else None


def _flag_bool(name: str, given: Optional[bool]) -> bool:
    if given is not None:
        if not isinstance(given, bool):
            raise ConfigError(f"{name} must be True or False, not {given!r}")
        return given
    v = os.environ.get(_FLAG[name][1], "").strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ConfigError(f"{_FLAG[name][1]}={v!r}: expected true or false")


@dataclasses.dataclass(frozen=True)
class NatsSettings:
    """Checked connection settings; build them with :meth:`resolve`."""

    urls: List[str]
    creds: Optional[str] = None
    nkey: Optional[str] = None
    token: Optional[str] = dataclasses.field(default=None, repr=False)
    user: Optional[str] = None
    password: Optional[str] = dataclasses.field(default=None, repr=False)
    tls_ca: Optional[str] = None
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    require_tls: bool = False
    tls_first: bool = False

    @classmethod
    def resolve(
        cls,
        nats_url: Optional[str] = None,
        *,
        creds: Optional[str] = None,
        nkey: Optional[str] = None,
        token: Optional[str] = None,
        user: Optional[str] = None,
        password: Optional[str] = None,
        tls_ca: Optional[str] = None,
        tls_cert: Optional[str] = None,
        tls_key: Optional[str] = None,
        tls: Optional[bool] = None,
        tls_first: Optional[bool] = None,
    ) -> "NatsSettings":
        """The settings from the arguments, each missing one from its ``TASKBUS_NATS_*``
        variable; raises :class:`ConfigError` naming the setting that cannot work."""
        url = nats_url or os.environ.get("TASKBUS_NATS_URL") or DEFAULT_URL
        urls, in_url = _parse_urls(url)
        creds, nkey = _flag_value("creds", creds), _flag_value("nkey", nkey)
        token, user = _flag_value("token", token), _flag_value("user", user)
        password = _flag_value("password", password)
        tls_ca, tls_cert = _flag_value("tls_ca", tls_ca), _flag_value("tls_cert", tls_cert)
        tls_key = _flag_value("tls_key", tls_key)
        require_tls, tls_first = _flag_bool("tls", tls), _flag_bool("tls_first", tls_first)

        methods = sum(x is not None for x in (creds, nkey, token, user))
        if in_url and methods:
            raise ConfigError(
                "the NATS URL carries credentials (user:password@ or token@) and --nats-creds, "
                "--nats-nkey, --nats-token or --nats-user is given too; use one of them"
            )
        if methods > 1:
            raise ConfigError("give only one of --nats-creds, --nats-nkey, --nats-token and --nats-user")
        if in_url is not None:
            # Handed over like the flags' credentials: only once TLS is up, when it is required.
            user, password = in_url if in_url[1] is not None else (None, None)
            token = in_url[0] if in_url[1] is None else None
        if (user is None) != (password is None):
            raise ConfigError("--nats-user and --nats-password go together")
        if (tls_cert is None) != (tls_key is None):
            raise ConfigError("--nats-tls-cert and --nats-tls-key go together")
        for name, v in (("token", token), ("user", user), ("password", password)):
            if v is not None and not isinstance(v, str):
                raise ConfigError(f"{_FLAG[name][0]} must be a string")
        if creds is not None:
            _check_creds(creds)
        if nkey is not None:
            _check_nkey(nkey)
        if tls_ca is not None:
            _check_pem("tls_ca", tls_ca, "-----BEGIN CERTIFICATE-----", "PEM certificate (-----BEGIN CERTIFICATE-----)")
            require_tls = True
        if tls_cert is not None:
            _check_pem("tls_cert", tls_cert, "-----BEGIN CERTIFICATE-----", "PEM certificate (-----BEGIN CERTIFICATE-----)")
            _check_pem("tls_key", tls_key, "PRIVATE KEY-----", "PEM private key (-----BEGIN ... PRIVATE KEY-----)")
            require_tls = True
        if tls_first or any(u.startswith("tls://") for u in urls):
            require_tls = True
        s = cls(urls, creds, nkey, token, user, password, tls_ca, tls_cert, tls_key, require_tls, tls_first)
        s.ssl_context()  # a certificate and key that do not belong together fail here
        return s

    @property
    def display_url(self) -> str:
        """The URLs for messages (credentials were taken out of them by :meth:`resolve`)."""
        return ",".join(self.urls)

    def ssl_context(self) -> Optional[ssl.SSLContext]:
        """The TLS context to connect with (None: nats-py's default, used only if the server
        asks for TLS)."""
        if not (self.require_tls or self.tls_ca or self.tls_cert):
            return None
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.tls_ca)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(f"{_label('tls_ca')} {self.tls_ca}: not a usable CA file: {e}") from None
        if self.tls_cert:
            try:
                ctx.load_cert_chain(self.tls_cert, self.tls_key)
            except (ssl.SSLError, OSError) as e:
                raise ConfigError(
                    f"{_label('tls_cert')} {self.tls_cert} and {_label('tls_key')} {self.tls_key}: "
                    f"not a certificate and its private key: {e}"
                ) from None
        return ctx

    def connect_options(self, client) -> Dict[str, Any]:
        """Keyword arguments for ``client.connect``. With TLS required, a token or password is
        handed over only once ``client``'s connection is encrypted."""
        opts: Dict[str, Any] = {"servers": self.urls}
        ctx = self.ssl_context()
        if ctx is not None:
            opts["tls"] = ctx
        if self.tls_first:
            opts["tls_handshake_first"] = True
        if self.creds:
            opts["user_credentials"] = self.creds
        if self.nkey:
            opts["nkeys_seed"] = self.nkey
        for name in ("token", "user", "password"):
            value = getattr(self, name)
            if value is not None:
                opts[name] = self._guarded(client, value) if self.require_tls else value
        return opts

    def _guarded(self, client, value: str):
        def give() -> str:
            if not encrypted(client):
                raise ConnectRefused(
                    "the server does not speak TLS, and TLS is required (--nats-tls, a CA or "
                    "client certificate, or a tls:// URL); no credentials were sent"
                )
            return value

        return give


def encrypted(client) -> bool:
    """Whether ``client``'s current connection is TLS (nats-py keeps its stream writer on the
    transport)."""
    writer = getattr(getattr(client, "_transport", None), "_io_writer", None)
    get = getattr(writer, "get_extra_info", None)
    return bool(get and get("ssl_object") is not None)


def fatal(err: BaseException, settings: NatsSettings) -> Optional[str]:
    """What to tell the user when connecting failed with ``err`` in a way retrying cannot fix
    (None: retry, e.g. the server is not up yet)."""
    if isinstance(err, ConnectRefused):
        return str(err)
    if isinstance(err, nats.errors.AuthorizationError) or "authorization violation" in str(err).lower():
        return CREDENTIALS_HINT
    if isinstance(err, ssl.SSLError):
        text = str(err).lower()
        if "certificate required" in text:
            return "TLS failed: the server asks for a client certificate; pass --nats-tls-cert and --nats-tls-key"
        if settings.tls_ca is None:
            return (
                f"TLS failed ({err.reason or err}): if the server's certificate is signed by your own "
                "CA, pass it with --nats-tls-ca; the URL's host name must be in the certificate"
            )
        return (
            f"TLS failed ({err.reason or err}): check that --nats-tls-ca is the CA that signed the "
            "server's certificate, that the URL's host name is in that certificate, and "
            "--nats-tls-cert/--nats-tls-key if the server asks for a client certificate"
        )
    return None


def _parse_urls(url: str):
    """The URLs of a comma separated list without credentials, and the credentials they carried
    (user and password, or token and None; all URLs that carry some must carry the same)."""
    urls, creds = [], set()
    for part in url.split(","):
        part = part.strip()
        if not part:
            continue
        if "://" not in part:
            part = "nats://" + part
        try:
            u = urlsplit(part)
            port = u.port
        except ValueError as e:
            raise ConfigError(f"NATS URL {redact_url(part)!r}: {e}") from None
        if u.scheme not in ("nats", "tls", "ws", "wss") or not u.hostname:
            raise ConfigError(
                f"NATS URL {redact_url(part)!r} is not a server address: expected "
                "nats://host:port (or tls://, ws://, wss://)"
            )
        if port == 0:
            raise ConfigError(f"NATS URL {redact_url(part)!r}: port 0 is not a server's port")
        if u.username is not None:
            creds.add((unquote(u.username), unquote(u.password) if u.password is not None else None))
            part = part.replace(u.netloc, u.netloc.rpartition("@")[2], 1)
        urls.append(part)
    if not urls:
        raise ConfigError("no NATS URL given: expected nats://host:port")
    if len(creds) > 1:
        raise ConfigError("the NATS URLs carry different credentials; give them once, the same for every server")
    return urls, next(iter(creds), None)
