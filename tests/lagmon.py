"""Opt-in pytest plugin: report when burrow's event loop (or the whole process) stalls.

``pytest -p tests.lagmon tests/faults`` pings the runtime's loop every 20 ms
from a thread and writes each lag over ``LAGMON_MS`` (default 200 ms) to
``LAGMON_FILE`` (default ``lagmon.txt``), with a ``py-spy dump`` of every
thread once a stall passes 0.5 s (when py-spy is installed).

It found why the blackhole test failed in CI: the agent and the relay share
the test process, and a test helper held the GIL for 2.4 s (the watcher
thread itself could not run: a stall of the whole process, not of the loop),
so a fresh session missed its heartbeat on both sides.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from burrow.agent.runtime import runtime

PING_EVERY = 0.02
DUMP_AFTER = 0.5


def _record(text: str) -> None:
    with open(os.environ.get("LAGMON_FILE", "lagmon.txt"), "a") as out:
        out.write(text + "\n")


def _watch(test: str, stop: threading.Event) -> None:
    threshold = float(os.environ.get("LAGMON_MS", "200")) / 1000
    py_spy = shutil.which("py-spy")
    while not stop.wait(PING_EVERY):
        loop = runtime().loop
        if loop is None or not loop.is_running():
            continue
        answered = threading.Event()
        started = time.monotonic()
        try:
            loop.call_soon_threadsafe(answered.set)
        except RuntimeError:  # the loop closed meanwhile
            continue
        dumped = False
        while not answered.wait(0.05) and not stop.is_set():
            if not dumped and py_spy and time.monotonic() - started > DUMP_AFTER:
                dumped = True
                dump = subprocess.run([py_spy, "dump", "--pid", str(os.getpid())], capture_output=True, text=True)
                _record(f"== {test}: loop stalled for {time.monotonic() - started:.2f} s so far\n{dump.stdout}")
        lag = time.monotonic() - started
        if lag > threshold:
            _record(f"-- {test}: loop answered after {lag:.3f} s")


@pytest.fixture(autouse=True)
def _loop_lag(request: pytest.FixtureRequest) -> Iterator[None]:
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(request.node.nodeid, stop), name="lagmon", daemon=True)
    watcher.start()
    yield
    stop.set()
    watcher.join()
