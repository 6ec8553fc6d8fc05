"""``python -m taskbus_agent POOL MODULE:FUNCTION``: serve a pool with an async handler."""

import argparse
import asyncio
import importlib
import inspect
import logging
import sys

from . import Agent, ConfigError, ConnectRefused, NatsSettings


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m taskbus_agent",
        description="Serve a taskbus pool with an async Python handler: pull its tasks, run the "
        "handler on each (a Task in, a JSON-encodable result out; raise to fail, raise "
        "taskbus_agent.Permanent to fail without retry) and report the outcomes. Stops on "
        "SIGTERM/SIGINT after the running tasks finish (or the grace period ends).",
        epilog="example: TASKBUS_NATS_URL=nats://nats:4222 python -m taskbus_agent default "
        "myapp.tasks:handle --concurrency 8",
    )
    p.add_argument("pool", help="the pool to serve, e.g. default")
    p.add_argument("handler", help="MODULE:FUNCTION, an async function taking a Task, e.g. myapp.tasks:handle")
    p.add_argument("--nats-url", help="NATS server URL(s), comma separated (default: $TASKBUS_NATS_URL or nats://127.0.0.1:4222)")
    p.add_argument("--agent-id", help="this agent's name in heartbeats and events (default: $TASKBUS_AGENT_ID or py-<host>-<pid>)")
    p.add_argument("--concurrency", type=int, default=4, help="tasks run at once (default 4)")
    p.add_argument("--grace", type=float, default=30.0, help="seconds running tasks get to finish on shutdown before they are handed back (default 30)")
    p.add_argument("--prefix", default="taskbus", help="subject prefix (default taskbus)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    a = p.add_argument_group(
        "NATS credentials and TLS",
        "the same flags and TASKBUS_NATS_* variables as every taskbus service (docs/DEPLOY.md); "
        "each flag's variable is used when the flag is not given",
    )
    a.add_argument("--nats-creds", metavar="FILE", help="credentials file (user JWT and nkey seed, as `nsc generate creds` writes it) for servers in operator/JWT mode ($TASKBUS_NATS_CREDS)")
    a.add_argument("--nats-nkey", metavar="FILE", help="file holding an nkey seed (SU...) ($TASKBUS_NATS_NKEY)")
    a.add_argument("--nats-token", metavar="TOKEN", help="token; prefer the variable, which stays out of `ps` ($TASKBUS_NATS_TOKEN)")
    a.add_argument("--nats-user", metavar="USER", help="user name, with --nats-password ($TASKBUS_NATS_USER)")
    a.add_argument("--nats-password", metavar="PASSWORD", help="password; prefer the variable ($TASKBUS_NATS_PASSWORD)")
    a.add_argument("--nats-tls-ca", metavar="FILE", help="trust only the CA(s) in this PEM file for the server's certificate, and require TLS ($TASKBUS_NATS_TLS_CA)")
    a.add_argument("--nats-tls-cert", metavar="FILE", help="client certificate (PEM) for servers with `tls { verify: true }`, with --nats-tls-key ($TASKBUS_NATS_TLS_CERT)")
    a.add_argument("--nats-tls-key", metavar="FILE", help="the client certificate's private key (PEM) ($TASKBUS_NATS_TLS_KEY)")
    a.add_argument("--nats-tls", action="store_const", const=True, help="refuse to connect without TLS ($TASKBUS_NATS_TLS=true)")
    a.add_argument("--nats-tls-first", action="store_const", const=True, help="TLS before the server's greeting, for `tls { handshake_first: true }` ($TASKBUS_NATS_TLS_FIRST=true)")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # asyncio's TLS transport warns about nats-py's EOF handling on every TLS disconnect; it
    # means nothing to an agent's operator.
    logging.getLogger("asyncio").addFilter(lambda r: "eof_received()" not in r.getMessage())

    module_name, _, func_name = args.handler.partition(":")
    if not module_name or not func_name:
        p.error(f"handler {args.handler!r} must be MODULE:FUNCTION, e.g. myapp.tasks:handle")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        p.error(f"cannot import {module_name!r} for the handler: {e} (is it on PYTHONPATH?)")
    handler = getattr(module, func_name, None)
    if handler is None:
        p.error(f"module {module_name!r} has no {func_name!r}")
    if not inspect.iscoroutinefunction(handler):
        p.error(f"{args.handler} must be an async function (async def {func_name}(task): ...)")
    try:
        connection = NatsSettings.resolve(
            args.nats_url,
            creds=args.nats_creds,
            nkey=args.nats_nkey,
            token=args.nats_token,
            user=args.nats_user,
            password=args.nats_password,
            tls_ca=args.nats_tls_ca,
            tls_cert=args.nats_tls_cert,
            tls_key=args.nats_tls_key,
            tls=args.nats_tls,
            tls_first=args.nats_tls_first,
        )
        agent = Agent(
            args.pool,
            handler,
            connection=connection,
            agent_id=args.agent_id,
            concurrency=args.concurrency,
            grace=args.grace,
            prefix=args.prefix,
        )
    except ConfigError as e:
        p.error(str(e))
    try:
        asyncio.run(agent.run())
    except ConnectRefused as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
