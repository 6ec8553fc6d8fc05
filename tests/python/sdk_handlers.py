"""Handlers the Python SDK's test (tests/tests/python_sdk.rs) runs; each prints what it saw."""

import asyncio
import os

from taskbus_agent import Permanent

running = 0
most = 0


def say(*words):
    print(*words, flush=True)


async def handle(task):
    global running, most
    say("start", task.id, task.attempt)
    running += 1
    most = max(most, running)
    try:
        if task.kind == "echo":
            return {"echo": task.payload, "traceparent": task.traceparent, "labels": task.labels}
        if task.kind == "permanent":
            raise Permanent("the input can never work")
        if task.kind == "flaky":
            raise RuntimeError(f"flaky on attempt {task.attempt}")
        if task.kind == "not-json":
            return {"a set": {1, 2}}
        if task.kind == "sleep":
            try:
                ms = min(task.payload["ms"], int(os.environ.get("SLEEP_CAP_MS", "3600000")))
                await asyncio.wait_for(task.cancelled.wait(), ms / 1000)
                say("told to stop", task.id)
                await asyncio.sleep(10)  # a handler that ignores it is cancelled 2 s later
            except asyncio.TimeoutError:
                return {"most_at_once": most}
            except asyncio.CancelledError:
                say("cancelled", task.id)
                raise
        raise Permanent(f"unknown kind {task.kind}")
    finally:
        running -= 1
