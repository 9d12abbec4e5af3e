"""``burrow trust``: after it, curl, Python and Chromium reach the URL with no CA option; ``--remove`` undoes it.

The system store is the machine's: each test runs burrow and the clients in a
mount namespace of its own where the store's directories are copies, so the
real store is never touched, even if a test dies half-way.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import burrow
from burrow.relay.config import RelayConfig

from .helpers import page_server

STORE_DIRS = ("/usr/local/share/ca-certificates", "/etc/ssl/certs")
BODY = b"trusted at last\n"

pytestmark = [
    pytest.mark.skipif(
        not (shutil.which("update-ca-certificates") and shutil.which("unshare") and shutil.which("nsenter")),
        reason="needs Debian's update-ca-certificates and util-linux's unshare and nsenter",
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="a private mount namespace needs root"),
    pytest.mark.skipif(RelayConfig().engine != "native", reason="https://localhost:PORT is the native engine's"),
]

Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def url() -> Iterator[str]:
    with page_server(BODY) as port, burrow.forward(port) as tunnel:
        yield tunnel.url + "/"


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    """Run a command in a mount namespace whose system store is a throwaway copy, with HOME in tmp_path."""
    mounts = []
    for number, directory in enumerate(STORE_DIRS):
        copy = tmp_path / f"store{number}"
        shutil.copytree(directory, copy, symlinks=True)
        mounts.append(f"mount --bind {copy} {directory}")
    holder = subprocess.Popen(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            " && ".join([*mounts, "echo ready"]) + " && exec sleep 300",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        home = tmp_path / "home"
        home.mkdir()
        env = {**os.environ, "HOME": str(home)}

        def in_namespace(*argv: str, **overrides: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [shutil.which("nsenter") or "nsenter", "--target", str(holder.pid), "--mount", "--", *argv],
                capture_output=True,
                text=True,
                timeout=60,
                env={**env, **overrides},
            )

        yield in_namespace
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)


def _burrow(run: Run, *args: str) -> list[str]:
    done = run(sys.executable, "-m", "burrow", "trust", *args)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    return done.stdout.splitlines()


def _urllib(run: Run, url: str) -> subprocess.CompletedProcess[str]:
    # the default context: OpenSSL's default paths, i.e. the system store
    return run(sys.executable, "-c", f"import urllib.request; print(urllib.request.urlopen({url!r}).read().decode())")


def _chromium(run: Run, url: str, home: Path) -> str:
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed")
    done = run("chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={home}", "--dump-dom", url)
    return done.stdout


def test_trust_makes_the_url_work_everywhere_and_remove_undoes_it(run: Run, url: str, tmp_path: Path) -> None:
    assert run("curl", "-sS", url).returncode == 60  # not trusted yet: curl's "peer certificate" error
    assert _urllib(run, url).returncode != 0

    added = _burrow(run)
    assert added[0].startswith("burrow trust: dev CA ")
    assert any(
        line.startswith("  system store: added /usr/local/share/ca-certificates/burrow-dev-ca-") for line in added
    )
    assert any("update-ca-certificates" in line for line in added)
    curl = run("curl", "-sS", url)
    assert (curl.returncode, curl.stdout.encode()) == (0, BODY), curl.stderr
    python = _urllib(run, url)
    assert (python.returncode, python.stdout) == (0, BODY.decode() + "\n"), python.stderr
    if shutil.which("certutil"):
        assert any(line.startswith(f"  NSS store {tmp_path / 'home' / '.pki' / 'nssdb'}: added") for line in added)
        assert BODY.decode().strip() in _chromium(run, url, tmp_path / "profile")

    again = _burrow(run)  # twice is harmless, and says so
    assert all("already trusted" in line for line in again[1:]), again

    removed = _burrow(run, "--remove")
    assert any(line.startswith("  system store: removed ") for line in removed), removed
    assert run("curl", "-sS", url).returncode == 60
    assert _urllib(run, url).returncode != 0
    if shutil.which("certutil"):
        assert any(line.startswith("  NSS store ") and "removed" in line for line in removed), removed
        listed = run("certutil", "-L", "-d", f"sql:{tmp_path / 'home' / '.pki' / 'nssdb'}")
        assert "burrow dev CA" not in listed.stdout
        assert BODY.decode().strip() not in _chromium(run, url, tmp_path / "profile2")
    assert all("was not trusted" in line for line in _burrow(run, "--remove")[1:])


def test_the_real_store_is_left_alone(run: Run) -> None:
    """The namespace really is private: what burrow trust adds inside is not outside."""
    before = sorted(os.listdir(STORE_DIRS[0]))
    _burrow(run)
    assert sorted(os.listdir(STORE_DIRS[0])) == before
    assert any(name.startswith("burrow-dev-ca-") for name in run("ls", STORE_DIRS[0]).stdout.split())


def test_no_system_store_is_one_line_that_says_what_to_do(run: Run, tmp_path: Path) -> None:
    bare = tmp_path / "bin"  # a PATH where neither update-ca-certificates nor update-ca-trust exists
    bare.mkdir()
    done = run(sys.executable, "-m", "burrow", "trust", PATH=str(bare))
    assert done.returncode == 1 and done.stdout.startswith("burrow trust: dev CA ")
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("burrow trust: error: found no system certificate")
    assert "security add-trusted-cert" in done.stderr  # and what to do on a Mac


def test_a_half_done_install_is_finished(run: Run, url: str) -> None:
    """The CA's file is in place but the bundle was never rebuilt (sudo declined, Ctrl-C): trust finishes it."""
    added = _burrow(run)
    entry = next(line for line in added if "system store: added " in line).split("added ")[1].split(",")[0]
    ca = Path(os.environ["BURROW_HOME"]) / "ca.pem"
    # out of the bundle, then the file placed again without a rebuild
    assert run("sh", "-c", f"rm -f {entry} && update-ca-certificates --fresh && cp {ca} {entry}").returncode == 0
    assert run("curl", "-sS", url).returncode == 60  # not trusted yet
    again = _burrow(run)
    assert any("was there, ran update-ca-certificates" in line for line in again), again
    assert run("curl", "-sS", url).stdout.encode() == BODY
