"""A process that used forward() and then forks: the child gets a runtime of its own, the parent keeps its tunnels.

Before, the child's forward() waited forever on the parent's loop thread,
which did not survive the fork (multiprocessing's default on Linux, gunicorn
and Celery preforks). Each case runs in a fresh interpreter, since forking
pytest itself (with its threads) proves nothing about a user's process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

PRELUDE = """
import multiprocessing, os, signal, socket, sys, threading
import burrow
from burrow.client import ca_for, connect

signal.alarm(60)  # a hang is a failure, not a stuck test run

def service(reply):
    srv = socket.create_server(("127.0.0.1", 0))
    def serve():
        while True:
            conn, _ = srv.accept()
            conn.sendall(reply)
            conn.close()
    threading.Thread(target=serve, daemon=True).start()
    return srv.getsockname()[1]

def fetch(tunnel):
    with connect(tunnel, ca_for(tunnel)) as sock:
        data = b""
        while chunk := sock.recv(100):
            data += chunk
        return data

parent_tunnel_forward = burrow.forward(service(b"parent"))
parent_tunnel = parent_tunnel_forward.open()
assert fetch(parent_tunnel) == b"parent"
"""

CASES = {
    "os.fork": """
pid = os.fork()
if pid == 0:
    with burrow.forward(service(b"child")) as tunnel:
        assert tunnel.url != parent_tunnel.url
        assert fetch(tunnel) == b"child"
    parent_tunnel_forward.close()  # the parent's to close: a no-op here
    sys.exit(0)  # a normal exit: atexit runs in the child too
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
""",
    "multiprocessing": """
def child(queue):
    with burrow.forward(service(b"worker")) as tunnel:
        queue.put(fetch(tunnel))

ctx = multiprocessing.get_context("fork")
queue = ctx.Queue()
workers = [ctx.Process(target=child, args=(queue,)) for _ in range(2)]
for w in workers:
    w.start()
got = [queue.get(timeout=30) for _ in workers]
for w in workers:
    w.join(30)
assert got == [b"worker", b"worker"] and all(w.exitcode == 0 for w in workers), (got, [w.exitcode for w in workers])
""",
}

EPILOGUE = """
assert fetch(parent_tunnel) == b"parent"  # the parent's tunnel never noticed
parent_tunnel_forward.close()
print("ok")
"""


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_forked_child_forwards_on_its_own_and_the_parent_keeps_its_tunnel(case: str) -> None:
    script = textwrap.dedent(PRELUDE) + textwrap.dedent(CASES[case]) + textwrap.dedent(EPILOGUE)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]
