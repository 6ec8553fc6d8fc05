"""taskbus agent SDK for Python (asyncio, nats-py).

An agent serves one pool: it pulls that pool's tasks, runs your handler on each, and reports the
outcome. Write the handler as an ``async def`` taking a :class:`Task` and returning anything JSON
can encode; raise to fail the attempt::

    import asyncio
    from taskbus_agent import Agent, Permanent

    async def handle(task):
        if task.kind != "summarise":
            raise Permanent(f"cannot do {task.kind!r}")   # failed for good: no retry
        return {"summary": task.payload["text"][:100]}   # succeeded, with this result

    asyncio.run(Agent("default", handle, concurrency=8).run())

or from the shell: ``python -m taskbus_agent default mymodule:handle --concurrency 8``.

What the SDK does for you (the protocol is docs/PROTOCOL.md, "Writing an agent"):

- pulls from the pool's three priority consumers, high before normal before low, with every
  tenth task taken from low while low tasks wait, never holding more tasks than ``concurrency``;
- publishes ``started``, extends the task's lease every third of the consumer's ``ack_wait``
  while the handler runs, publishes the outcome with JetStream (``succeeded``, ``failed``, or
  ``timed_out`` once ``timeout_ms`` is over) and only then acks the work message;
- passes the producer's W3C ``traceparent`` to the handler and onto its events;
- reports a task whose ``deadline`` passed before it ran as ``expired`` without running it;
- follows the pool's ``cancelled`` events (the last hour replayed on start): a cancelled task is
  skipped when pulled, and a running one has ``task.cancelled`` set;
- publishes a heartbeat every 5 s, so ``taskbus agents`` lists the agent;
- on SIGTERM or SIGINT (a pod being scaled down) takes no new work, lets running tasks finish
  within ``grace`` seconds, then sets ``task.cancelled``, cancels the handlers and hands their
  tasks back to the queue so that another agent runs them at once. Give the pod a
  ``terminationGracePeriodSeconds`` longer than ``grace``.

It connects with the credentials and TLS settings every taskbus service takes (``.creds`` and
nkey files, tokens, users, CAs, client certificates; see :mod:`taskbus_agent.connection`).
Unlike the Rust SDK it has no circuit breaker and no placement hooks.
"""

import asyncio
import dataclasses
import datetime
import json
import logging
import os
import re
import signal
import time
from typing import Any, Awaitable, Callable, Dict, Optional

import nats
from nats.aio.client import Client as NatsClient
from nats.errors import TimeoutError as NatsTimeout
from nats.js import api

from .connection import ConfigError, ConnectRefused, NatsSettings, encrypted, fatal

__all__ = ["Agent", "Task", "Permanent", "ConfigError", "ConnectRefused", "NatsSettings", "VERSION"]
VERSION = "0.1.0"

log = logging.getLogger("taskbus_agent")

BANDS = ("high", "normal", "low")
LOW_EVERY = 10
# A subject token: what agent ids and the prefix must be.
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Task ids and pool names, as the coordinator admits them.
_TASK_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_POOL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class Permanent(Exception):
    """Raise from a handler to fail the attempt for good: the task is not retried."""


@dataclasses.dataclass
class Task:
    """One attempt of a task, as the handler sees it."""

    id: str
    pool: str
    kind: str
    payload: Any
    labels: Dict[str, str]
    attempt: int
    max_attempts: int
    #: Seconds the attempt may run (the task's ``timeout_ms``, 300 by default).
    timeout: float
    deadline: Optional[datetime.datetime]
    resources: Optional[Dict[str, Any]]
    #: The producer's W3C trace context: start your spans under it.
    traceparent: Optional[str]
    #: Set when the attempt must stop: the task was cancelled, its timeout is over, or the
    #: agent is shutting down and the grace period ran out. Check it in long loops; the SDK
    #: cancels the handler's coroutine 2 seconds later.
    cancelled: asyncio.Event


Handler = Callable[[Task], Awaitable[Any]]


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _iso(t: datetime.datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def _parse_time(s: Optional[str]) -> Optional[datetime.datetime]:
    if s is None:
        return None
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00"))


class _BadWork(Exception):
    """A work message the coordinator did not write."""


def _read_work(data: bytes) -> Dict[str, Any]:
    try:
        item = json.loads(data)
    except ValueError as e:
        raise _BadWork(f"not JSON: {e}") from None
    if not isinstance(item, dict) or not isinstance(item.get("task"), dict):
        raise _BadWork("not a work item: no task object")
    task, attempt = item["task"], item.get("attempt")
    if not isinstance(task.get("id"), str) or not _TASK_ID.match(task["id"]):
        raise _BadWork("the task has no usable id")
    if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 1:
        raise _BadWork("attempt is not a positive integer")
    if not isinstance(task.get("kind"), str):
        raise _BadWork("the task has no kind")
    for key in ("timeout_ms", "max_attempts"):
        v = task.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise _BadWork(f"{key} is not a positive integer")
    try:
        _parse_time(task.get("deadline"))
    except (TypeError, ValueError):
        raise _BadWork("deadline is not an RFC 3339 time") from None
    return item


def _valid_traceparent(v: Optional[str]) -> Optional[str]:
    """The producer's traceparent when well formed (the coordinator already checked it)."""
    if v and re.fullmatch(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-[!-~]*)?", v):
        return v
    return None


class Agent:
    """An agent serving ``pool`` with ``handler``; see the module's documentation."""

    def __init__(
        self,
        pool: str,
        handler: Handler,
        *,
        nats_url: Optional[str] = None,
        agent_id: Optional[str] = None,
        concurrency: int = 4,
        grace: float = 30.0,
        prefix: str = "taskbus",
        heartbeat_every: float = 5.0,
        connection: Optional[NatsSettings] = None,
    ):
        if not isinstance(pool, str) or not _POOL.match(pool):
            raise ConfigError(
                f"pool {pool!r} is not a pool name: a DNS label "
                "(lowercase letters, digits and '-', at most 63), as the coordinator's --pools takes it"
            )
        agent_id = agent_id or os.environ.get("TASKBUS_AGENT_ID") or f"py-{os.uname().nodename}-{os.getpid()}"
        if not _TOKEN.match(agent_id):
            raise ConfigError(
                f"agent id {agent_id!r} must be 1-64 letters, digits, '-' or '_' "
                "(it is a NATS subject token)"
            )
        if not _TOKEN.match(prefix):
            raise ConfigError(f"prefix {prefix!r} must be one NATS subject token, e.g. taskbus")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or not 1 <= concurrency <= 10_000:
            raise ConfigError(f"concurrency must be a whole number from 1 to 10000, not {concurrency!r}")
        if not isinstance(grace, (int, float)) or not 0 <= grace <= 86_400:
            raise ConfigError(f"grace must be 0 to 86400 seconds, not {grace!r}")
        if not callable(handler):
            raise ConfigError("handler must be an async function taking a Task")
        self.pool = pool
        self.handler = handler
        if connection is not None and nats_url is not None:
            raise ConfigError("give nats_url or connection (NatsSettings), not both")
        #: Where and how to connect: URLs, credentials, TLS (see taskbus_agent.connection).
        self.connection = connection or NatsSettings.resolve(nats_url)
        self.agent_id = agent_id
        self.concurrency = concurrency
        self.grace = float(grace)
        self.prefix = prefix
        self.heartbeat_every = heartbeat_every
        #: Counters: succeeded, failed, timed_out, expired, cancelled, handed_back, bad_messages.
        self.stats = dict.fromkeys(
            ("succeeded", "failed", "timed_out", "expired", "cancelled", "handed_back", "bad_messages"), 0
        )
        self._running: Dict[str, asyncio.Event] = {}
        self._cancelled: Dict[str, None] = {}  # ordered set of cancelled ids, bounded
        self._hard = asyncio.Event()  # grace over: hand back what still runs
        self._since_low = 0
        self._lease_every = 10.0

    # -- running -------------------------------------------------------------------------

    async def run(self, stop: Optional[asyncio.Event] = None) -> None:
        """Serve until ``stop`` is set (or, when it is not given, until SIGTERM or SIGINT)."""
        loop = asyncio.get_running_loop()
        if stop is None:
            stop = asyncio.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
        nc = NatsClient()
        refused: "asyncio.Future[str]" = loop.create_future()

        async def nats_error(e):
            why = None if nc.is_connected else fatal(e, self.connection)
            if why is not None:
                if not refused.done():
                    refused.set_result(why)
                return
            log.warning("NATS: %s", e or type(e).__name__)

        # Connecting is retried until it works (NATS may start after the pod) or stop is set;
        # credentials the server refuses or a failed TLS handshake end it at once.
        connecting = asyncio.ensure_future(
            nc.connect(
                **self.connection.connect_options(nc),
                name=self.agent_id,
                max_reconnect_attempts=-1,
                error_cb=nats_error,
            )
        )
        await _first(asyncio.shield(connecting), stop.wait(), asyncio.shield(refused))
        if not connecting.done():
            connecting.cancel()
            await asyncio.gather(connecting, return_exceptions=True)
            await nc.close()
            if refused.done():
                raise ConnectRefused(f"cannot connect to NATS at {self.connection.display_url}: {refused.result()}")
            return
        nc_error = connecting.exception()
        if nc_error is not None:
            why = refused.result() if refused.done() else fatal(nc_error, self.connection)
            await nc.close()
            if why is not None:
                raise ConnectRefused(f"cannot connect to NATS at {self.connection.display_url}: {why}")
            raise nc_error
        if self.connection.require_tls and not encrypted(nc):
            await nc.close()
            raise ConnectRefused(
                f"cannot connect to NATS at {self.connection.display_url}: the server does not speak "
                "TLS, and TLS is required (--nats-tls, a CA or client certificate, or a tls:// URL)"
            )
        self._nc, self._js = nc, nc.jetstream()
        try:
            subs = await self._bind(stop)
            if subs is None:
                return
            watcher = await self._watch_cancellations()
            beats = asyncio.create_task(self._heartbeats(stop))
            log.info("%s serving pool %s (concurrency %d)", self.agent_id, self.pool, self.concurrency)
            inflight: set = set()
            room = asyncio.Event()
            while not stop.is_set():
                free = self.concurrency - len(inflight)
                if free <= 0:
                    room.clear()
                    await _first(room.wait(), stop.wait())
                    continue
                for msg in await self._next_batch(subs, free):
                    t = asyncio.create_task(self._run_one(msg))
                    inflight.add(t)
                    t.add_done_callback(lambda t: (inflight.discard(t), room.set()))
            # Drain: running tasks get the grace period, then are handed back.
            if inflight:
                log.info("stopping: %d tasks running, waiting up to %.0f s", len(inflight), self.grace)
                _, late = await asyncio.wait(inflight, timeout=self.grace)
                if late:
                    self._hard.set()
                    await asyncio.wait(late)
            beats.cancel()
            await watcher.unsubscribe()
            await nc.flush()
        finally:
            await nc.close()
        log.info("%s stopped", self.agent_id)

    async def _bind(self, stop: asyncio.Event):
        """The three work consumers (the coordinator creates them), waiting until they exist."""
        stream = f"{self.prefix.upper()}_WORK"
        warned = set()
        while not stop.is_set():
            try:
                info = await self._js.consumer_info(stream, f"work-{self.pool}-normal")
                self._lease_every = max((info.config.ack_wait or 30.0) / 3, 0.05)
                return {
                    b: await self._js.pull_subscribe_bind(durable=f"work-{self.pool}-{b}", stream=stream)
                    for b in BANDS
                }
            except nats.js.errors.ServiceUnavailableError:
                why = (
                    f"JetStream does not answer at {self.connection.display_url}; is nats-server "
                    "running with -js (JetStream enabled)? waiting"
                )
            except nats.js.errors.NotFoundError:
                why = (
                    f"work consumers of pool {self.pool} not found yet; is the coordinator running "
                    "and the pool configured? waiting"
                )
            if why not in warned:  # each reason once
                log.warning("%s", why)
                warned.add(why)
            await _first(asyncio.sleep(0.5), stop.wait())
        return None

    async def _next_batch(self, subs, n: int):
        """Up to n tasks: high, then normal, then low; low first for every tenth task."""
        owed = min((self._since_low + n) // LOW_EVERY, n)
        order = ([("low", owed)] if owed else []) + [(b, n) for b in BANDS]
        got, low = [], 0
        for band, k in order:
            k = min(k, n - len(got))
            if k <= 0:
                continue
            try:
                msgs = await subs[band].fetch(batch=k, timeout=0.05)
            except (NatsTimeout, asyncio.TimeoutError):  # nats-py raises either when a band is empty
                msgs = []
            got += msgs
            low += len(msgs) if band == "low" else 0
        other = len(got) - low
        self._since_low = min(max(self._since_low + other - low * (LOW_EVERY - 1), 0), LOW_EVERY - 1)
        return got

    # -- one task ------------------------------------------------------------------------

    async def _run_one(self, msg) -> None:
        try:
            item = _read_work(msg.data)
        except _BadWork as e:
            # Not something the coordinator wrote: it can never succeed, so take it off the queue.
            log.warning("unreadable work message on %s terminated: %s", msg.subject, e)
            self.stats["bad_messages"] += 1
            await msg.term()
            return
        t, attempt = item["task"], item["attempt"]
        tid = t["id"]
        if tid in self._cancelled:
            self.stats["cancelled"] += 1
            await msg.ack()
            return
        trace = _valid_traceparent((msg.headers or {}).get("traceparent"))
        deadline = _parse_time(t.get("deadline"))
        if deadline is not None and deadline <= _now():
            event = {"event": "expired", "task_id": tid, "pool": self.pool, "at": _iso(_now()),
                     "deadline": _iso(deadline)}
            await self._settle(msg, tid, attempt, event, trace, "expired")
            return
        base = {"task_id": tid, "pool": self.pool, "attempt": attempt, "agent_id": self.agent_id}
        started = {"event": "started", "at": _iso(_now()), **base}
        await self._nc.publish(self._subject(tid, "started"), json.dumps(started).encode(),
                               headers={"traceparent": trace} if trace else None)
        stop = asyncio.Event()
        self._running[tid] = stop
        task = Task(
            id=tid, pool=self.pool, kind=t["kind"], payload=t.get("payload"),
            labels=t.get("labels") or {}, attempt=attempt, max_attempts=t.get("max_attempts") or 1,
            timeout=(t.get("timeout_ms") or 300_000) / 1000, deadline=deadline,
            resources=t.get("resources"), traceparent=trace, cancelled=stop,
        )
        t0 = time.monotonic()
        try:
            end, value = await self._supervise(msg, task)
        finally:
            self._running.pop(tid, None)
        duration_ms = int((time.monotonic() - t0) * 1000)
        if end == "hand_back":
            self.stats["handed_back"] += 1
            await msg.nak()
            return
        if end == "cancelled":
            # The coordinator already recorded `cancelled`; the message is done.
            self.stats["cancelled"] += 1
            await msg.ack()
            return
        at = _iso(_now())
        if end == "timed_out":
            event, counter = {"event": "timed_out", "at": at, **base}, "timed_out"
        elif isinstance(value, BaseException):
            retryable = not isinstance(value, Permanent)
            error = str(value) or type(value).__name__
            event = {"event": "failed", "error": error, "retryable": retryable,
                     "duration_ms": duration_ms, "at": at, **base}
            counter = "failed"
        else:
            event = {"event": "succeeded", "result": value, "duration_ms": duration_ms, "at": at, **base}
            counter = "succeeded"
        await self._settle(msg, tid, attempt, event, trace, counter)

    async def _supervise(self, msg, task: Task):
        """Run the handler, extending the lease; ("done", result or exception), ("timed_out",
        None), ("cancelled", None) or ("hand_back", None)."""
        work = asyncio.ensure_future(self.handler(task))
        deadline = time.monotonic() + task.timeout
        hard = asyncio.ensure_future(self._hard.wait())
        cancel = asyncio.ensure_future(task.cancelled.wait())
        try:
            while True:
                left = deadline - time.monotonic()
                done, _ = await asyncio.wait(
                    {work, hard, cancel}, timeout=min(self._lease_every, max(left, 0)),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if work in done:
                    try:
                        return "done", _json_or_error(work.result())
                    except Exception as e:  # noqa: BLE001 - every failure becomes an outcome
                        log.debug("task %s failed: %s", task.id, e)
                        return "done", e
                if hard in done:
                    task.cancelled.set()
                    work.cancel()
                    return "hand_back", None
                if cancel in done:
                    await _stop(work)
                    return "cancelled", None
                if time.monotonic() >= deadline:
                    task.cancelled.set()
                    await _stop(work)
                    return "timed_out", None
                try:
                    await msg.in_progress()
                except Exception as e:  # noqa: BLE001 - the next extension may work
                    log.debug("lease extension failed: %s", e)
        finally:
            hard.cancel()
            cancel.cancel()

    async def _settle(self, msg, tid: str, attempt: int, event, trace, counter: str) -> None:
        """Publish the outcome durably, then ack the work; if it is not stored, let it come back."""
        headers = {"Nats-Msg-Id": f"{tid}:{attempt}:outcome", "Taskbus-Attempt": str(attempt)}
        if trace:
            headers["traceparent"] = trace
        body = json.dumps(event).encode()
        for n in range(5):
            try:
                await self._js.publish(self._subject(tid, event["event"]), body, headers=headers)
                break
            except Exception as e:  # noqa: BLE001 - retried, then handed back
                log.warning("outcome of %s not stored (%s); retrying", tid, e)
                await asyncio.sleep(0.1 * 2**n)
        else:
            await msg.nak(delay=1)
            return
        self.stats[counter] += 1
        await msg.ack()

    def _subject(self, tid: str, event: str) -> str:
        return f"{self.prefix}.events.{self.pool}.{tid}.{event}"

    # -- background ----------------------------------------------------------------------

    async def _watch_cancellations(self):
        """Follow the pool's `cancelled` events, replaying the last hour; returns once the
        replay has caught up (up to 5 s), so that no task cancelled before the agent started
        is pulled and run."""
        subject = f"{self.prefix}.events.{self.pool}.*.cancelled"
        since = _now() - datetime.timedelta(hours=1)
        try:
            last = await self._js.get_last_msg(f"{self.prefix.upper()}_EVENTS", subject)
            replay_to = last.seq if last.time is None or last.time >= since else 0
        except nats.js.errors.NotFoundError:
            replay_to = 0
        caught_up = asyncio.Event()
        if not replay_to:
            caught_up.set()

        async def on_cancel(m):
            tid = m.subject.split(".")[-2]
            self._cancelled[tid] = None
            while len(self._cancelled) > 100_000:
                self._cancelled.pop(next(iter(self._cancelled)))
            if tid in self._running:
                self._running[tid].set()
            if m.metadata.sequence.stream >= replay_to:
                caught_up.set()

        sub = await self._js.subscribe(
            subject,
            cb=on_cancel,
            ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.BY_START_TIME,
            config=api.ConsumerConfig(opt_start_time=since),
        )
        try:
            await asyncio.wait_for(caught_up.wait(), 5)
        except asyncio.TimeoutError:
            log.warning("the last hour's cancellations were not all replayed within 5 s; going on")
        return sub

    async def _heartbeats(self, stop: asyncio.Event) -> None:
        subject = f"{self.prefix}.agents.{self.pool}.{self.agent_id}.heartbeat"
        while not stop.is_set():
            beat = {
                "agent_id": self.agent_id, "pool": self.pool, "at": _iso(_now()),
                "capacity": self.concurrency, "in_flight": len(self._running),
                "version": f"python-{VERSION}", "breaker": "closed", "consecutive_failures": 0,
            }
            try:
                await self._nc.publish(subject, json.dumps(beat).encode())
            except Exception as e:  # noqa: BLE001 - the next one may go through
                log.debug("heartbeat not sent: %s", e)
            await _first(asyncio.sleep(self.heartbeat_every), stop.wait())


def _json_or_error(result: Any) -> Any:
    """The result if JSON can encode it; otherwise the attempt fails for good."""
    try:
        json.dumps(result)
    except (TypeError, ValueError) as e:
        raise Permanent(f"the handler's result cannot be sent as JSON: {e}") from None
    return result


async def _stop(work: "asyncio.Future") -> None:
    """Give a handler told to stop 2 seconds to return, then cancel it."""
    try:
        await asyncio.wait_for(asyncio.shield(work), 2)
    except BaseException:  # noqa: BLE001 - its outcome no longer matters
        work.cancel()


async def _first(*aws) -> None:
    """Wait until the first of ``aws`` is done; cancel the rest."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
