"""A taskbus agent in Python (nats-py), speaking the protocol in docs/PROTOCOL.md.

    pip install nats-py
    TASKBUS_NATS_URL=nats://127.0.0.1:4222 python docs/examples/agent.py default

It pulls from the pool's three durable consumers in priority order (high, normal, low; every
tenth task low while low tasks wait), reports `started`, runs the handler while extending its
lease, publishes the outcome with JetStream and then acks the work message. On SIGTERM (a pod
being scaled down) it takes no new work, finishes the tasks it holds and exits; give the pod a
terminationGracePeriodSeconds longer than your longest task, or what is cut off is redelivered
to another agent after its lease runs out.
"""
import asyncio
import datetime
import json
import os
import signal
import sys
import time

import nats
from nats.errors import TimeoutError as NatsTimeout

POOL = sys.argv[1] if len(sys.argv) > 1 else "default"
AGENT_ID = os.environ.get("TASKBUS_AGENT_ID", f"py-agent-{os.getpid()}")
PREFIX = os.environ.get("TASKBUS_PREFIX", "taskbus")


def now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


async def handle(kind, payload):
    """Your work goes here. Raise to fail the attempt."""
    if kind == "fail":
        raise RuntimeError("asked to fail")
    if kind == "sleep":
        await asyncio.sleep((payload or {}).get("ms", 0) / 1000)
    return {"echo": payload, "by": "python"}


async def run_one(nc, js, msg):
    item = json.loads(msg.data)
    task, attempt = item["task"], item["attempt"]
    tid = task["id"]
    base = {"task_id": tid, "pool": POOL, "attempt": attempt, "agent_id": AGENT_ID}
    subject = f"{PREFIX}.events.{POOL}.{tid}"
    # The producer's W3C trace context, if it sent one: pass it on (and start your spans under it).
    tp = (msg.headers or {}).get("traceparent")
    trace = {"traceparent": tp} if tp else {}
    # Informational, core NATS only.
    await nc.publish(f"{subject}.started", json.dumps({"event": "started", "at": now(), **base}).encode(),
                     headers=trace or None)

    async def keep_lease():  # extend the lease while the handler runs
        while True:
            await asyncio.sleep(5)
            await msg.in_progress()

    lease = asyncio.create_task(keep_lease())
    t0 = time.monotonic()
    try:
        result = await asyncio.wait_for(handle(task["kind"], task.get("payload")), task.get("timeout_ms", 300000) / 1000)
        event = {"event": "succeeded", "result": result}
    except Exception as e:  # noqa: BLE001 - every failure becomes an outcome
        event = {"event": "failed", "error": str(e) or type(e).__name__, "retryable": True}
    finally:
        lease.cancel()
    event.update(base, at=now(), duration_ms=int((time.monotonic() - t0) * 1000))
    # The outcome is durable: publish with JetStream and wait for the ack, then ack the work.
    await js.publish(
        f"{subject}.{event['event']}",
        json.dumps(event).encode(),
        headers={"Nats-Msg-Id": f"{tid}:{attempt}:outcome", **trace},
    )
    await msg.ack()


BANDS = ("high", "normal", "low")
LOW_EVERY = 10


async def next_batch(subs, n, state):
    """Up to n tasks: high first, then normal, then low; low first for every tenth task."""
    owed = min((state["since_low"] + n) // LOW_EVERY, n)
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
    state["since_low"] = min(max(state["since_low"] + other - low * (LOW_EVERY - 1), 0), LOW_EVERY - 1)
    return got


async def main():
    nc = await nats.connect(os.environ.get("TASKBUS_NATS_URL", "nats://127.0.0.1:4222"), name=AGENT_ID)
    js = nc.jetstream()
    stream = f"{PREFIX.upper()}_WORK"
    subs = {b: await js.pull_subscribe_bind(durable=f"work-{POOL}-{b}", stream=stream) for b in BANDS}
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print(f"{AGENT_ID} serving pool {POOL}", flush=True)
    state = {"since_low": 0}
    while not stop.is_set():
        msgs = await next_batch(subs, 4, state)
        await asyncio.gather(*(run_one(nc, js, m) for m in msgs))
    # Every outcome was published with an ack and every work message acked: flush what is
    # buffered and leave (nats-py's drain() can wait forever on pull subscriptions).
    await nc.flush()
    await nc.close()
    print(f"{AGENT_ID} stopped: in-flight tasks finished", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
