"""The ``burrow`` command, run as a user would: subprocesses, real sockets, curl."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from burrow.demo import start_sample_app

from .helpers import free_port, recv_all

BURROW = [sys.executable, "-m", "burrow"]


def run(*args: str, timeout: float = 30, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BURROW, *args], capture_output=True, text=True, timeout=timeout, env=env)


class Background:
    """A burrow command running in the background, read line by line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [*BURROW, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        self.lines: list[str] = []

    def wait_for(self, pattern: str, timeout: float = 20) -> re.Match[str]:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        for line in self.lines:
            if match := re.search(pattern, line):
                return match
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            if match := re.search(pattern, line):
                return match
        raise AssertionError(f"{pattern!r} not in output: {self.lines}")

    def stop(self, sig: int = signal.SIGINT) -> tuple[int, str, str]:
        self.process.send_signal(sig)
        try:
            out, err = self.process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            stacks = _stacks(self.process.pid)  # (where it hangs, for the report)
            self.process.kill()
            out, err = self.process.communicate(timeout=20)
            raise AssertionError(
                f"no exit 20 s after {signal.Signals(sig).name}; stacks:\n{stacks}\nstderr:\n{err}"
            ) from None
        return self.process.returncode, "".join(self.lines) + out, err


def _stacks(pid: int) -> str:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    try:
        done = subprocess.run(
            [py_spy, "dump", "--native", "--pid", str(pid)], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"(py-spy: {exc})"
    return done.stdout + done.stderr


@pytest.fixture
def relay_process() -> Iterator[tuple[Background, int]]:
    relay = Background("relay", "--listen", "127.0.0.1:0")
    port = int(relay.wait_for(r"ready on 127\.0\.0\.1:(\d+)").group(1))
    yield relay, port
    if relay.process.poll() is None:
        relay.stop(signal.SIGTERM)


def _no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


@pytest.mark.parametrize("command", [[], ["relay"], ["forward"], ["run"], ["demo"]])
def test_every_command_has_help(command: list[str]) -> None:
    result = run(*command, "--help")
    assert result.returncode == 0
    assert "usage: burrow" in result.stdout


@pytest.mark.parametrize(
    "args, message, code",
    [
        (["forward", "70000"], "port 70000 is not a TCP port", 1),
        (["forward", "abc"], "'abc' is not a port, HOST:PORT or unix:PATH", 1),
        (["forward", "8000", "--relay", "10.1.2.3:443"], "is an IP address", 1),
        (["relay", "--listen", "0.0.0.0:0"], "without a token; set BURROW_TOKEN", 1),
        (["relay", "--tcp-ports", "9-2"], "starts above its end; write the lower port first, e.g. 2-9", 1),
        (["relay", "--tcp-ports", "0-70000"], "is not within 1-65535", 1),
        (["forward", "8000", "--relay", "localhost:99999"], "--relay='localhost:99999' has a bad port", 1),
        (["relay", "--cert", "/nonexistent.pem", "--key", "/nonexistent.pem"], "cannot read", 1),
        (["forward", "8000", "--token-file", "/nonexistent"], "cannot read --token-file", 1),
        (["bogus"], "invalid choice", 2),
    ],
)
def test_failures_are_one_clear_line(args: list[str], message: str, code: int) -> None:
    result = run(*args)
    assert result.returncode == code
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("flag", [True, False])
def test_forward_to_unreachable_relay_names_the_setting(flag: bool) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "BURROW_RELAY"}
    if flag:
        result = run("forward", "8000", "--relay-timeout", "0", "--relay", f"localhost:{port}", env=env)
    else:
        result = run("forward", "8000", "--relay-timeout", "0", env={**env, "BURROW_RELAY": f"localhost:{port}"})
    assert result.returncode == 1
    setting = "--relay" if flag else "BURROW_RELAY"
    assert f"cannot reach relay localhost:{port} (connection refused); check {setting}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_relay_down_at_start_is_tried_again_until_it_answers() -> None:
    port = free_port()
    env = {**os.environ, "BURROW_RELAY": f"localhost:{port}"}
    app = start_sample_app()
    forward = Background("forward", str(app.port), env=env)
    time.sleep(1.5)  # two or three attempts
    relay = Background("relay", "--listen", f"127.0.0.1:{port}")
    try:
        url = forward.wait_for(r"^(https://\S+)$").group(1)
        assert url.endswith(f".localhost:{port}")
        code, _, err = forward.stop(signal.SIGTERM)
        assert code == 0
        retries = [line for line in err.splitlines() if "trying again in" in line]
        assert retries and all(
            re.fullmatch(
                rf"burrow: cannot reach relay localhost:{port} \(connection refused\); check BURROW_RELAY; "
                r"trying again in \d\.\d s \(--relay-timeout 30\)",
                line,
            )
            for line in retries
        ), retries
        _no_traceback(err)
    finally:
        relay.stop(signal.SIGTERM)
        app.stop()


def test_a_relay_that_never_answers_is_given_up_on() -> None:
    port = free_port()
    started = time.monotonic()
    result = run("forward", "8000", "--relay-timeout", "1", "--relay", f"localhost:{port}")
    assert 1 <= time.monotonic() - started < 10
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == (
        f"burrow forward: error: cannot reach relay localhost:{port} (connection refused); check --relay "
        "(gave up after 1 s, --relay-timeout)"
    )
    assert all("trying again in" in line for line in lines[:-1]) and len(lines) >= 2


def test_two_tokens_are_an_error_not_a_choice(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    env = {**os.environ, "BURROW_TOKEN": "from-env", "BURROW_TOKEN_FILE": str(token_file)}
    result = run("forward", "8000", env=env)
    assert result.returncode == 1
    assert (
        result.stderr == "burrow forward: error: BURROW_TOKEN and BURROW_TOKEN_FILE are both set; unset one of them\n"
    )


def test_agents_do_not_import_the_relay() -> None:
    """``cryptography`` (~70 ms to import) and the relay's server (~20 ms): only relays need them."""
    code = (
        "import sys, burrow, burrow.cli; "
        "print(sorted(m for m in sys.modules if m.startswith(('cryptography', 'burrow.relay.server'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    # and the public name still works
    code = "from burrow.relay import Relay, RelayConfig; print(Relay.__module__, RelayConfig.__module__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["burrow.relay.server", "burrow.relay.config"], result.stderr


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_relay_and_forward_processes(relay_process: tuple[Background, int], sig: signal.Signals) -> None:
    relay, port = relay_process
    app = start_sample_app()
    env = {**os.environ, "BURROW_RELAY": f"localhost:{port}"}
    forward = Background("forward", str(app.port), "--unencrypted", env=env)
    # stdout holds the addresses and nothing else: the URL first (`| head -1`), then tcp://
    url = forward.wait_for(r"^(https://\S+)$").group(1)
    tcp_port = int(forward.wait_for(r"^tcp://localhost:(\d+)$").group(1))
    assert url.endswith(f".localhost:{port}")
    ca = Path(os.environ["BURROW_HOME"]) / "ca.pem"
    result = subprocess.run(
        ["curl", "-sS", "--cacert", str(ca), "--max-time", "10", url + "/"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0 and "Hello from burrow" in result.stdout, result.stderr
    with socket.create_connection(("127.0.0.1", tcp_port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert b"Hello from burrow" in recv_all(sock)
    code, out, err = forward.stop(sig)  # Ctrl-C, SIGTERM and SIGHUP alike: closed at the relay, exit 0
    assert code == 0, err
    assert out.splitlines() == [url, f"tcp://localhost:{tcp_port}"]
    assert f"burrow: forwarding local port {app.port} to {url}" in err
    assert re.search(r"try  curl --cacert \S+ https://\S+/", err)
    assert "burrow: tunnel closed; 0 open (2 total)" in err
    _no_traceback(err)
    code, out, err = relay.stop(signal.SIGTERM)
    assert code == 0 and "burrow relay stopped" in out
    assert re.search(r"tunnel [0-9a-z]{14} opened by session", err)
    assert re.search(r"tunnel [0-9a-z]{14} closed \(closed by the agent\): 2 connections", err)
    _no_traceback(err)
    app.stop()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_forward_keeps_serving_after_head_closes_its_stdout(relay_process: tuple[Background, int]) -> None:
    """``burrow forward 8000 | head -1``: the URL, and burrow serves on without a BrokenPipeError."""
    relay, port = relay_process
    app = start_sample_app()
    env = {**os.environ, "BURROW_RELAY": f"localhost:{port}"}
    forward = Background("forward", str(app.port), "--unencrypted", env=env)
    url = forward.wait_for(r"^(https://\S+)$").group(1)
    assert forward.process.stdout is not None
    forward.process.stdout.close()  # what head does after its line: the tcp:// line meets a closed pipe
    ca = Path(os.environ["BURROW_HOME"]) / "ca.pem"
    for _ in range(2):
        result = subprocess.run(
            ["curl", "-sS", "--cacert", str(ca), "--max-time", "10", url + "/"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0 and "Hello from burrow" in result.stdout, result.stderr
    assert forward.process.poll() is None
    forward.process.send_signal(signal.SIGTERM)
    assert forward.process.stderr is not None
    err = forward.process.stderr.read()
    assert forward.process.wait(20) == 0
    assert "burrow: tunnel closed; 0 open (2 total)" in err
    _no_traceback(err)
    app.stop()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_demo_runs_the_main_job() -> None:
    demo = Background("demo")
    status = demo.wait_for(r"GET (https://\S+)/ -> (\d+)")
    assert status.group(2) == "200"
    curl = demo.wait_for(r"try   (curl .*)$").group(1)
    result = subprocess.run(curl.split(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "Hello from burrow" in result.stdout
    code, out, err = demo.stop(signal.SIGTERM)
    assert code == 0
    _no_traceback(err)
    assert "no BURROW_RELAY set" in err and "curl --cacert" in err  # the hint, once per process


def test_forward_keeps_the_signals_its_starter_ignored_and_stops_on_sigterm() -> None:
    """`nohup burrow forward ... &` in a script: SIGINT and SIGHUP were ignored by whoever started it and
    stay ignored (a Ctrl-C in the script's foreground or a closed terminal leaves it be); SIGTERM stops it."""
    app = start_sample_app()

    def like_nohup_in_the_background() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    process = subprocess.Popen(
        [*BURROW, "forward", str(app.port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=like_nohup_in_the_background,
    )
    try:
        assert process.stdout is not None and process.stdout.readline().startswith("https://")
        for sig in (signal.SIGINT, signal.SIGHUP):
            process.send_signal(sig)
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(1.5)  # still serving
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=20)
        assert process.returncode == 0 and "burrow: tunnel closed" in err, err
        _no_traceback(err)
    finally:
        process.kill()
        process.wait(10)
        app.stop()


def test_a_stop_at_any_moment_after_the_url_closes_cleanly(relay_process: tuple[Background, int]) -> None:
    """SIGTERM, SIGHUP or Ctrl-C while `burrow forward` is still printing (an import, a print, a
    lock taken): taken at the next wait, never raised in the middle; exit 0 at once, tunnel closed."""
    _, port = relay_process
    app = start_sample_app()
    env = {**os.environ, "BURROW_RELAY": f"localhost:{port}"}
    try:
        for n, delay in enumerate([0, 0, 0.001, 0.002, 0.003, 0.005, 0.008, 0.013, 0.021]):
            forward = Background("forward", str(app.port), env=env)
            forward.wait_for(r"^https://\S+$")
            time.sleep(delay)
            started = time.monotonic()
            code, _, err = forward.stop((signal.SIGTERM, signal.SIGHUP, signal.SIGINT)[n % 3])
            assert code == 0, err
            assert time.monotonic() - started < 5
            assert "burrow: tunnel closed; 0 open (0 total)" in err
            _no_traceback(err)
    finally:
        app.stop()


def test_a_stop_while_the_relay_is_tried_again_ends_the_wait_at_once() -> None:
    port = free_port()
    forward = Background("forward", "8000", env={**os.environ, "BURROW_RELAY": f"localhost:{port}"})
    assert forward.process.stderr is not None
    assert "trying again in" in forward.process.stderr.readline()
    started = time.monotonic()
    code, out, err = forward.stop(signal.SIGTERM)
    assert time.monotonic() - started < 2
    assert code == 130 and out == ""
    _no_traceback(err)
