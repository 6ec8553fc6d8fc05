"""``python -m taskbus_agent POOL MODULE:FUNCTION``: serve a pool with an async handler."""

import argparse
import asyncio
import importlib
import inspect
import logging
import sys

from . import Agent, ConfigError


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
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

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
        agent = Agent(
            args.pool,
            handler,
            nats_url=args.nats_url,
            agent_id=args.agent_id,
            concurrency=args.concurrency,
            grace=args.grace,
            prefix=args.prefix,
        )
    except ConfigError as e:
        p.error(str(e))
    asyncio.run(agent.run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
