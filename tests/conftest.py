"""Shared fixtures: an isolated burrow home, local services to forward, TLS clients."""

from __future__ import annotations

import os
import tempfile

# Before burrow is imported anywhere: the dev CA and every file burrow writes
# go to a throwaway directory, and no relay from the developer's shell leaks in.
os.environ["BURROW_HOME"] = tempfile.mkdtemp(prefix="burrow-test-home-")
for _name in ("BURROW_RELAY", "BURROW_TOKEN", "BURROW_TOKEN_FILE", "BURROW_CA", "BURROW_LOOP"):
    os.environ.pop(_name, None)

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from burrow.paths import dev_ca_path  # noqa: E402

from .helpers import EchoServer, ServiceThread  # noqa: E402


@pytest.fixture(scope="session")
def service_loop() -> Iterator[ServiceThread]:
    """One event loop in its own thread for the local services tests forward."""
    thread = ServiceThread()
    yield thread
    thread.stop()


@pytest.fixture
def echo(service_loop: ServiceThread) -> Iterator[EchoServer]:
    """A TCP echo service on loopback that honours half-close."""
    server = service_loop.echo_server()
    yield server
    service_loop.close_server(server)


@pytest.fixture
def ca_file() -> Path:
    """The dev CA certificate (created by the first relay of the session)."""
    return dev_ca_path()


# The failed tests' names, once more, after everything else: on CI a failure's summary line
# carries its whole assertion message (a diff of a MiB of bytes, once), and whoever reads only
# the log's tail saw no test name.
_failed: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.failed:
        _failed.append(report.nodeid if report.when == "call" else f"{report.nodeid} (at {report.when})")


def pytest_unconfigure(config: pytest.Config) -> None:
    for nodeid in _failed:
        print(f"failed: {nodeid}")
