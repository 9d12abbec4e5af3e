"""Real programs through real tunnels: ssh to sshd, psql to PostgreSQL, redis-cli to Redis, curl's 1 GiB.

Each server is a throwaway one on loopback, with its files in a temporary
directory; the client reaches it only through burrow, and the tests compare
the bytes that come out with the bytes that went in.
"""

from __future__ import annotations

import getpass
import glob
import hashlib
import os
import queue
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import burrow

from ..helpers import free_port, sha256

#: A server on loopback with an empty data directory is up in well under a second; CI can be slow.
STARTUP_TIMEOUT = 30.0
#: Any one client run (a command, a query, a 1 MiB round trip).
CLIENT_TIMEOUT = 30.0
#: The 1 GiB download: a few seconds here, and room for a slow CI machine within pytest's 120 s.
DOWNLOAD_TIMEOUT = 90.0

MIB = 1024 * 1024
GIB = 1024 * MIB


def _need(*programs: str) -> None:
    for program in programs:
        if shutil.which(program) is None:
            pytest.skip(f"{program} is not installed")


def _run(argv: list[str], stdin: bytes = b"", **popen: Any) -> bytes:
    """Run a program to completion; its stdout (a failure shows its stderr)."""
    result: subprocess.CompletedProcess[bytes] = subprocess.run(
        argv, input=stdin, capture_output=True, timeout=CLIENT_TIMEOUT, **popen
    )
    assert result.returncode == 0, f"{argv[0]} exited {result.returncode}: {result.stderr.decode(errors='replace')}"
    return result.stdout


@contextmanager
def _server(argv: list[str], log: Path, ready: str, stop: int = signal.SIGTERM, **popen: Any) -> Iterator[None]:
    """Run a server until the block ends; ready when its log (stderr and stdout) says ``ready``."""
    with log.open("wb") as sink:
        # a session of its own: the last resort kills the server's children too
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink, start_new_session=True, **popen
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while ready not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{argv[0]} did not start (exit {proc.returncode}):\n{log.read_text(errors='replace')}")
            time.sleep(0.05)
        yield
    finally:
        proc.send_signal(stop)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


# ------------------------------------------------------------------ OpenSSH


@pytest.fixture(scope="module")
def ssh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """An ssh command line, short of the remote command, that logs in through a raw TCP tunnel."""
    _need("/usr/sbin/sshd", "ssh", "ssh-keygen")
    directory = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "user_key"):
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(directory / key)])
    (directory / "authorized_keys").write_bytes((directory / "user_key.pub").read_bytes())
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    port = free_port()
    config = directory / "sshd_config"
    config.write_text(
        f"""Port {port}
ListenAddress 127.0.0.1
HostKey {directory / "host_key"}
PidFile {directory / "sshd.pid"}
AuthorizedKeysFile {directory / "authorized_keys"}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
UseDNS no
"""
    )
    argv = ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)]
    with _server(argv, directory / "sshd.log", "Server listening on"), burrow.forward(port, unencrypted=True) as tunnel:
        host, tunnel_port = tunnel.tcp_socket
        yield [
            "ssh", "-F", "/dev/null", "-p", str(tunnel_port), "-i", str(directory / "user_key"),
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            f"{getpass.getuser()}@{host}",
        ]  # fmt: skip


def test_ssh_runs_a_command_through_a_raw_tunnel(ssh: list[str]) -> None:
    assert _run([*ssh, "echo hello-$((6*7))"]) == b"hello-42\n"


def test_ssh_carries_1_mib_of_random_bytes_both_ways(ssh: list[str]) -> None:
    payload = os.urandom(MIB)
    assert _run([*ssh, "sha256sum"], payload).split()[0].decode() == sha256(payload)
    assert _run([*ssh, "cat"], payload) == payload


# --------------------------------------------------------------- PostgreSQL


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not found:
        pytest.skip("PostgreSQL is not installed (/usr/lib/postgresql/*/bin/initdb)")
    return Path(found[-1]).parent


@pytest.fixture(scope="module")
def psql() -> Iterator[list[str]]:
    """A psql command line, short of its commands, connected to a throwaway cluster through a raw TCP tunnel."""
    _need("psql")
    bin_dir = _postgres_bin()
    # not under pytest's temporary directory: that one is private to root, and the cluster is not root's
    directory = Path(tempfile.mkdtemp(prefix="burrow-test-pg-"))
    popen: dict[str, Any] = {"cwd": directory}
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        shutil.chown(directory, "postgres", "postgres")
        popen |= {"user": "postgres", "group": "postgres", "extra_groups": []}
    try:
        data = directory / "data"
        _run([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync"], **popen)
        port = free_port()
        argv = [
            str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(directory),
            "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
        ]  # fmt: skip
        # SIGINT is the fast shutdown: SIGTERM would wait for every client to leave
        with (
            _server(argv, directory / "postgres.log", "ready to accept connections", signal.SIGINT, **popen),
            burrow.forward(port, unencrypted=True) as tunnel,
        ):
            host, tunnel_port = tunnel.tcp_socket
            conninfo = f"host={host} port={tunnel_port} user=postgres dbname=postgres connect_timeout=10"
            yield ["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", conninfo]
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_psql_creates_a_table_inserts_and_reads_back(psql: list[str]) -> None:
    statements = [
        "CREATE TABLE notes (id int PRIMARY KEY, body text)",
        "INSERT INTO notes VALUES (1, 'through burrow'), (2, 'and back')",
        "SELECT body FROM notes ORDER BY id",
    ]
    out = _run([*psql, *(arg for statement in statements for arg in ("-c", statement))])
    assert out == b"through burrow\nand back\n"


def test_psql_stores_and_returns_1_mib_of_random_bytes(psql: list[str]) -> None:
    payload = os.urandom(MIB)
    script = f"""CREATE TABLE blobs (data bytea);
INSERT INTO blobs VALUES (decode('{payload.hex()}', 'hex'));
SELECT encode(sha256(data), 'hex') FROM blobs;
SELECT encode(data, 'hex') FROM blobs;
"""
    server_hash, returned = _run(psql, script.encode()).split()
    assert server_hash.decode() == sha256(payload)  # the server got every byte...
    assert bytes.fromhex(returned.decode()) == payload  # ...and sent every one back


# -------------------------------------------------------------------- Redis


@pytest.fixture(scope="module")
def redis_cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """A redis-cli command line, short of its command, that reaches a throwaway Redis through a raw TCP tunnel."""
    _need("redis-server", "redis-cli")
    directory = tmp_path_factory.mktemp("redis")
    port = free_port()
    argv = [
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
        "--save", "", "--appendonly", "no",
    ]  # fmt: skip
    with (
        _server(argv, directory / "redis.log", "Ready to accept connections"),
        burrow.forward(port, unencrypted=True) as tunnel,
    ):
        host, tunnel_port = tunnel.tcp_socket
        yield ["redis-cli", "-h", host, "-p", str(tunnel_port)]


def test_redis_cli_sets_and_gets_a_key(redis_cli: list[str]) -> None:
    assert _run([*redis_cli, "SET", "greeting", "hello through burrow"]) == b"OK\n"
    assert _run([*redis_cli, "GET", "greeting"]) == b"hello through burrow\n"


def test_redis_cli_round_trips_a_1_mib_random_value(redis_cli: list[str]) -> None:
    payload = os.urandom(MIB)
    assert _run([*redis_cli, "-x", "SET", "blob"], payload) == b"OK\n"  # -x: the value is stdin
    assert _run([*redis_cli, "STRLEN", "blob"]) == f"{MIB}\n".encode()
    assert _run([*redis_cli, "GET", "blob"]) == payload + b"\n"  # not a terminal: the raw bytes


# ---------------------------------------------------------- 1 GiB over TLS


class _StreamServer(ThreadingHTTPServer):
    """Serves 1 GiB of pseudo-random bytes, made as they go out; hands over the SHA-256 of each response sent."""

    #: One seeded block, stamped with its number each time: every block differs, and nothing is held but it.
    BLOCK = MIB
    SEED = 20240607

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _StreamHandler)
        self.digests: queue.Queue[str] = queue.Queue()


class _StreamHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _StreamServer

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(GIB))
        self.end_headers()
        block = bytearray(random.Random(_StreamServer.SEED).randbytes(_StreamServer.BLOCK))
        digest = hashlib.sha256()
        for number in range(GIB // _StreamServer.BLOCK):
            block[:8] = number.to_bytes(8, "big")
            digest.update(block)
            self.wfile.write(block)
        self.server.digests.put(digest.hexdigest())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stream_server() -> Iterator[_StreamServer]:
    server = _StreamServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_curl_downloads_1_gib_through_a_tls_tunnel(stream_server: _StreamServer, ca_file: Path) -> None:
    _need("curl", "sha256sum")
    with burrow.forward(stream_server.server_address[1]) as tunnel:
        argv = [
            "curl", "-sS", "--fail", "--cacert", str(ca_file), "--max-time", str(DOWNLOAD_TIMEOUT),
            "--write-out", "%{stderr}%{size_download}", f"{tunnel.url}/gib",
        ]  # fmt: skip
        curl = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        summer = subprocess.Popen(["sha256sum"], stdin=curl.stdout, stdout=subprocess.PIPE)
        assert curl.stdout is not None
        curl.stdout.close()  # sha256sum is its only reader
        try:
            summed, _ = summer.communicate(timeout=DOWNLOAD_TIMEOUT + 10)
            _, report = curl.communicate(timeout=CLIENT_TIMEOUT)
        finally:
            for proc in (curl, summer):
                proc.kill()
                proc.wait(10)
    assert curl.returncode == 0, report.decode(errors="replace")
    assert report == str(GIB).encode()
    assert summed.split()[0].decode() == stream_server.digests.get(timeout=CLIENT_TIMEOUT)
