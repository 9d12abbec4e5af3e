"""The ``burrow`` command: ``relay``, ``forward PORT``, ``run --port PORT -- CMD``, ``status``, ``trust``, ``demo``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

from . import __version__
from .agent.config import parse_relays, read_token_file
from .agent.forward import Forward
from .agent.relay_connection import LOCAL_CONNECT_TIMEOUT
from .agent.runtime import new_event_loop
from .agent.target import LocalTarget
from .connection import TrafficStats
from .errors import BurrowError, ConfigurationError, RelayUnavailable
from .protocol.messages import networks
from .relay.config import DEFAULT_TCP_PORTS, DEV_DOMAIN, DEV_PORT, ENGINES, RelayConfig
from .status import DEFAULT_ADMIN, admin_token, fetch_status, format_status, human_bytes
from .tunnel import TunnelState

#: How often `burrow forward` redraws its status line on a terminal.
STATUS_INTERVAL = 0.5


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that points at --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (e.g. 0.0.0.0:443)")
    return host.strip("[]") or "0.0.0.0", int(port)


def _port_range(text: str) -> tuple[int, int]:
    low, sep, high = text.partition("-")
    if not sep or not low.isdigit() or not high.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a range LOW-HIGH (e.g. 20000-32767)")
    return int(low), int(high)


def _size(text: str) -> int:
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    scale = units.get(text[-1:].lower(), 1)
    digits = text[:-1] if scale != 1 else text
    if not digits.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 1048576, 1024k, 4m)")
    return int(digits) * scale


def build_parser() -> argparse.ArgumentParser:
    """The whole command line."""
    parser = _Parser(prog="burrow", description="Expose a local TCP port to the Internet through a relay.")
    parser.add_argument("--version", action="version", version=f"burrow {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    relay = commands.add_parser(
        "relay",
        help="run a relay (a dev relay on loopback by default)",
        description="Run a relay. With no options: a dev relay on 127.0.0.1:4443 for *.localhost, certificates "
        "from burrow's local dev CA. Agents authenticate with a token from BURROW_TOKEN or --token-file "
        "(required when listening beyond loopback).",
    )
    relay.add_argument(
        "--listen",
        type=_host_port,
        default=("127.0.0.1", DEV_PORT),
        metavar="HOST:PORT",
        help=f"TLS listener for agents and public clients (default 127.0.0.1:{DEV_PORT}; [::]:PORT is IPv4 and IPv6)",
    )
    relay.add_argument("--domain", default=DEV_DOMAIN, help="tunnels are <id>.DOMAIN (default localhost)")
    relay.add_argument(
        "--cert",
        type=Path,
        help="certificate chain (PEM) for DOMAIN and *.DOMAIN; re-read when it changes or on SIGHUP",
    )
    relay.add_argument("--key", type=Path, help="private key (PEM) of --cert")
    relay.add_argument("--public-port", type=int, help="TLS port clients see, if not the listen port (NAT, LB)")
    relay.add_argument(
        "--tcp-ports",
        type=_port_range,
        default=DEFAULT_TCP_PORTS,
        metavar="LOW-HIGH",
        help="ports for raw TCP tunnels (default {}-{})".format(*DEFAULT_TCP_PORTS),
    )
    relay.add_argument("--tcp-listen", metavar="HOST", help="address raw TCP tunnels bind (default: --listen's)")
    relay.add_argument("--tcp-host", metavar="NAME", help="host name given for raw TCP tunnels (default: DOMAIN)")
    relay.add_argument(
        "--token-file", type=Path, help="file with accepted agent tokens, one per line (or set BURROW_TOKEN)"
    )
    relay.add_argument("--window", type=_size, help="per-stream flow-control window (default 2m)")
    relay.add_argument("--max-frame", type=_size, help="largest DATA frame accepted from agents (default 256k)")
    relay.add_argument(
        "--session-budget",
        type=_size,
        help="bytes one agent's streams may have buffered here for clients that do not read, beyond 64k "
        "a stream (default 64m)",
    )
    relay.add_argument("--relay-budget", type=_size, help="the same for all agents together (default 512m)")
    relay.add_argument(
        "--threads", type=int, metavar="N", help="threads that move bytes (default: the cores this process may use)"
    )
    relay.add_argument(
        "--engine",
        choices=ENGINES,
        help="data plane: native (Rust, the default) or asyncio (pure Python); default BURROW_ENGINE, else native",
    )
    relay.add_argument(
        "--ticket-key",
        type=Path,
        metavar="FILE",
        help="key that signs resume tickets (default: ticket.key in burrow's data directory)",
    )
    relay.add_argument(
        "--token-secret",
        type=Path,
        metavar="FILE",
        help="take tenant tokens signed with this secret (burrow token create; the same file on every relay)",
    )
    relay.add_argument(
        "--metrics",
        type=_host_port,
        metavar="HOST:PORT",
        help="serve Prometheus /metrics, /healthz (200, 503 while draining) and the admin view (burrow status, "
        "the page at /) here, e.g. 127.0.0.1:9090",
    )
    relay.add_argument(
        "--admin-token-file",
        type=Path,
        metavar="FILE",
        help="the token burrow status and the admin page must send (required for them when --metrics is not "
        "on loopback; /metrics and /healthz stay open)",
    )
    relay.add_argument(
        "--revoked", type=Path, metavar="FILE", help="revoked tenant token ids, one a line; re-read when it changes"
    )
    limits = relay.add_argument_group("deadlines and limits")
    for flag, field, kind in (
        ("--handshake-timeout", "handshake_timeout", float),
        ("--heartbeat-timeout", "heartbeat_timeout", float),
        ("--grace", "shutdown_grace", float),
        ("--max-pending-handshakes", "max_pending_handshakes", int),
        ("--max-pending-per-source", "max_pending_per_source", int),
        ("--max-streams-per-session", "max_streams_per_session", int),
        ("--max-streams-per-tunnel", "max_streams_per_tunnel", int),
        ("--max-tunnels-per-token", "max_tunnels_per_token", int),
        ("--max-sessions-per-token", "max_sessions_per_token", int),
        ("--max-sessions-per-source", "max_sessions_per_source", int),
        ("--max-tunnels-per-minute", "max_tunnels_per_minute", int),
    ):
        default = getattr(RelayConfig, field)
        unit = " s" if kind is float else ""
        metavar = "SECONDS" if kind is float else "N"
        limits.add_argument(
            flag, dest=field, type=kind, default=default, metavar=metavar, help=f"default {default}{unit}"
        )
    relay.add_argument("-q", "--quiet", action="store_true", help="log warnings only")

    fwd = commands.add_parser(
        "forward",
        help="expose a local port until Ctrl-C",
        description="Expose TARGET (a local port, HOST:PORT or unix:PATH) through a relay (BURROW_RELAY, else an "
        "embedded one) until Ctrl-C. "
        "Token: BURROW_TOKEN or BURROW_TOKEN_FILE; extra CA to trust: BURROW_CA.",
    )
    fwd.add_argument(
        "port",
        metavar="TARGET",
        help="what to expose: a local TCP port (8000), HOST:PORT this machine reaches, or unix:/path/to.sock",
    )
    _tunnel_options(fwd)

    run = commands.add_parser(
        "run",
        help="start a command, tunnel its port once it listens, stop with it",
        description="Start CMD, wait until local PORT accepts connections, open a tunnel to it and print its "
        "address; pass SIGINT, SIGTERM and SIGHUP on to CMD; when CMD ends, close the tunnel and exit with "
        "CMD's exit code. Relay, token and CA as for burrow forward.",
    )
    run.add_argument("--port", type=int, required=True, metavar="PORT", help="the local TCP port CMD listens on")
    run.add_argument(
        "--json",
        action="store_true",
        help='print exactly one line on stdout: {"url", "tls_socket", "tcp_socket"} (CMD\'s stdout goes to stderr)',
    )
    run.add_argument(
        "--ready-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long CMD has to start listening (default 30); then it is stopped",
    )
    _tunnel_options(run)
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ARGS", help="the command to run")

    token = commands.add_parser(
        "token",
        help="make a signed tenant token (for relays run with --token-secret)",
        description="Tenant tokens: any relay holding the signing secret checks them, with no database.",
    )
    token_commands = token.add_subparsers(dest="token_command", metavar="ACTION", parser_class=_Parser)
    token_commands.required = True
    create = token_commands.add_parser(
        "create",
        help="sign a token for a tenant and print it",
        description="Print a token for TENANT on stdout (its id and expiry on stderr; revoke it by putting the "
        "id in the relay's --revoked file). The secret file is made (mode 0600) if it does not exist yet.",
    )
    create.add_argument("--tenant", required=True, help="the tenant's name (a-z, 0-9, '.', '_', '-')")
    create.add_argument(
        "--secret", type=Path, required=True, metavar="FILE", help="the signing secret (the relays' --token-secret)"
    )
    create.add_argument(
        "--ttl",
        type=_duration,
        default=30 * 86400,
        metavar="DURATION",
        help="valid for (30d, 12h, 90m, 0 = until revoked; default 30d)",
    )
    create.add_argument("--max-tunnels", type=int, metavar="N", help="tunnels the tenant may hold at one relay")
    create.add_argument(
        "--max-connections", type=int, metavar="N", help="public connections open at once across the tenant's tunnels"
    )

    trust = commands.add_parser(
        "trust",
        help="trust the dev CA in the system store and the browsers' (undo with --remove)",
        description="Add the dev CA (the embedded relay's and a dev relay's; made if missing) to the system "
        "store (update-ca-certificates or update-ca-trust, through sudo unless root) and, where certutil "
        "exists, to the NSS stores Chromium and Firefox read; say what changed. Run it as yourself, not "
        "with sudo: the CA and the browser stores are your user's.",
    )
    trust.add_argument("--remove", action="store_true", help="take the dev CA out of every store it was put in")

    status = commands.add_parser(
        "status",
        help="a relay's tunnels and connections, from its --metrics listener",
        description="Print a relay's tunnels (id, kind, tenant, connections open/total, bytes in/out, age), "
        "read from the admin view on its --metrics listener.",
    )
    status.add_argument(
        "--admin",
        metavar="URL",
        default=os.environ.get("BURROW_ADMIN") or DEFAULT_ADMIN,
        help=f"the relay's --metrics listener (default: BURROW_ADMIN, else {DEFAULT_ADMIN})",
    )
    status.add_argument(
        "--token-file", type=Path, metavar="FILE", help="the relay's admin token (default: BURROW_ADMIN_TOKEN)"
    )
    status.add_argument("--json", action="store_true", help="print the relay's JSON answer as it came")

    commands.add_parser(
        "demo",
        help="see it work: embedded relay, sample app, tunnel, one HTTPS request",
        description="Start an embedded relay, a small web app and a tunnel to it; make one HTTPS request "
        "through it; print the URL and a curl line; run until Ctrl-C.",
    )
    return parser


def _tunnel_options(parser: argparse.ArgumentParser) -> None:
    """The tunnel's options, shared by ``forward`` and ``run``."""
    parser.add_argument(
        "--relay-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="keep trying a relay that cannot be reached yet for this long (default 30; 0: fail at once)",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="say more on stderr (-vv: everything)")
    parser.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), help="what to log on stderr (default warning)"
    )
    parser.add_argument("--unencrypted", action="store_true", help="also give a raw TCP address on a random port")
    parser.add_argument("--h2", action="store_true", help="negotiate HTTP/2 (ALPN h2) on the TLS address")
    parser.add_argument(
        "--allow",
        action="append",
        metavar="CIDR",
        help="let only clients from this network in (repeat, or comma-separate: 203.0.113.0/24,2001:db8::/32); "
        "the relay refuses others before TLS",
    )
    parser.add_argument(
        "--proxy-protocol",
        type=int,
        choices=(1, 2),
        help="put a PROXY protocol header (version 1: text, 2: binary) before each connection's bytes, "
        "so the service learns the client's address",
    )
    parser.add_argument(
        "--client-ca",
        type=Path,
        metavar="FILE",
        help="require a client certificate issued by these CAs (PEM) on the TLS address (mutual TLS)",
    )
    parser.add_argument(
        "--relay",
        metavar="HOST:PORT[,...]",
        help="the relay, or several (the nearest answering is used) (default: BURROW_RELAY, else embedded)",
    )
    parser.add_argument(
        "--failover-after",
        type=float,
        metavar="SECONDS",
        help="with several relays: move to another after the relay stays away this long "
        "(default 30, BURROW_FAILOVER_AFTER)",
    )
    parser.add_argument(
        "--token-file", type=Path, help="file holding the token (default: BURROW_TOKEN, BURROW_TOKEN_FILE)"
    )
    parser.add_argument("--ca", type=Path, help="CA certificate to trust for the relay (default: BURROW_CA)")
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=LOCAL_CONNECT_TIMEOUT,
        metavar="SECONDS",
        help=f"how long a public connection waits for the local service to accept (default {LOCAL_CONNECT_TIMEOUT:g})",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``burrow`` console script."""
    args = build_parser().parse_args(argv)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "relay": run_relay,
        "forward": run_forward,
        "run": run_run,
        "trust": run_trust,
        "status": run_status,
        "token": run_token,
        "demo": run_demo,
    }
    try:
        return commands[args.command](args)
    except BurrowError as exc:
        command = " ".join(filter(None, (args.command, getattr(args, "token_command", None))))
        print(f"burrow {command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


# ------------------------------------------------------------------------ relay


def run_relay(args: argparse.Namespace) -> int:
    """``burrow relay``: serve until SIGINT or SIGTERM; SIGHUP reloads --cert/--key."""
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    tokens: set[str] = set()
    if args.token_file is not None:
        try:
            tokens.update(args.token_file.read_text().split())
        except OSError as exc:
            raise ConfigurationError(f"cannot read --token-file {args.token_file} ({exc.strerror})") from None
    if os.environ.get("BURROW_TOKEN"):
        tokens.add(os.environ["BURROW_TOKEN"].strip())
    host, port = args.listen
    config = RelayConfig(
        domain=args.domain,
        host=host,
        port=port,
        public_port=args.public_port,
        cert=args.cert,
        key=args.key,
        tcp_host=args.tcp_listen,
        tcp_public_host=args.tcp_host,
        tcp_ports=args.tcp_ports,
        tokens=frozenset(tokens),
        ticket_key=args.ticket_key,
        token_secret=args.token_secret,
        revoked=args.revoked,
        metrics=args.metrics,
        admin_token_file=args.admin_token_file,
        **{name: getattr(args, name) for name in _LIMITS},
    )
    if args.window is not None:
        config.window = args.window
    if args.max_frame is not None:
        config.max_frame = args.max_frame
    config.threads = args.threads
    if args.session_budget is not None:
        config.session_budget = args.session_budget
    if args.relay_budget is not None:
        config.relay_budget = args.relay_budget
    if args.engine is not None:
        config.engine = args.engine
    loop = new_event_loop()
    try:
        return loop.run_until_complete(_serve(config))
    finally:
        loop.close()


_LIMITS = (
    "handshake_timeout",
    "heartbeat_timeout",
    "shutdown_grace",
    "max_pending_handshakes",
    "max_pending_per_source",
    "max_streams_per_session",
    "max_streams_per_tunnel",
    "max_tunnels_per_token",
    "max_sessions_per_token",
    "max_sessions_per_source",
    "max_tunnels_per_minute",
)


async def _serve(config: RelayConfig) -> int:
    from .relay.server import Relay  # ~20 ms to import: `burrow forward` does without

    relay = Relay(config)
    await relay.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():  # a second signal: no more grace
            relay.close()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    loop.add_signal_handler(signal.SIGHUP, relay.reload_certificate, "SIGHUP")  # (certbot's deploy hook)
    where = f"{config.domain}:{relay.public_port}"
    print(f"burrow relay ready on {config.host}:{relay.port} for *.{config.domain}", flush=True)
    print(f"  agents: BURROW_RELAY={where}" + (" BURROW_TOKEN=..." if config.tokens else ""), flush=True)
    if relay.ca_path is not None:
        print(f"  dev CA: {relay.ca_path} (agents on this machine trust it; clients: curl --cacert)", flush=True)
    await stop.wait()
    await relay.shutdown()
    print("burrow relay stopped", flush=True)
    return 0


# ---------------------------------------------------------------------- forward


def status_line(stats: TrafficStats) -> str:
    """``2 open (17 total) · 1.2 MB in · 34.0 kB out``."""
    return (
        f"{stats.open_connections} open ({stats.total_connections} total) · "
        f"{human_bytes(stats.bytes_in)} in · {human_bytes(stats.bytes_out)} out"
    )


#: Between attempts to reach a relay at start: doubling from the first, capped at the last.
RELAY_RETRY_FIRST = 0.5
RELAY_RETRY_CAP = 5.0


@contextlib.contextmanager
def _opened(args: argparse.Namespace, wait: Callable[[float], None] | None = None) -> Iterator[Forward]:
    """The tunnel open (closed at the relay on exit). A relay that cannot be reached yet is tried
    again with backoff for up to ``--relay-timeout`` seconds, saying so at each attempt; settings
    that must change (an untrusted certificate, a refused token) fail at once."""
    deadline = time.monotonic() + args.relay_timeout
    attempt = 0
    while True:
        forward = _open_forward(args)
        try:
            with _signals.waiting():
                forward.open()
            break
        except RelayUnavailable as exc:
            left = deadline - time.monotonic()
            if not exc.transient or left <= 0:
                if attempt:
                    raise RelayUnavailable(f"{exc} (gave up after {args.relay_timeout:g} s, --relay-timeout)") from None
                raise
            delay = min(RELAY_RETRY_FIRST * 2**attempt, RELAY_RETRY_CAP, left)
            note(f"burrow: {exc}; trying again in {delay:.1f} s (--relay-timeout {args.relay_timeout:g})")
            (wait or _signals.sleep)(delay)
            attempt += 1
    try:
        yield forward
    finally:
        forward.close()


def _allow(given: list[str] | None) -> list[str] | None:
    """``--allow`` (repeated, comma-separated) as networks; errors name the flag."""
    if not given:
        return None
    try:
        return list(networks(cidr for text in given for cidr in text.split(",") if cidr.strip()))
    except ValueError as exc:
        raise ConfigurationError(f"--allow: {exc}") from None


def _failover_after(value: float | None) -> float | None:
    if value is not None and not 0 < value < math.inf:
        raise ConfigurationError(f"--failover-after {value:g} is not a positive number of seconds")
    return value


def _open_forward(args: argparse.Namespace) -> Forward:
    if not args.relay_timeout >= 0:
        raise ConfigurationError(f"--relay-timeout {args.relay_timeout:g} is not 0 or more seconds")
    forward = Forward(
        args.port,
        unencrypted=args.unencrypted,
        h2=args.h2,
        relay=parse_relays(args.relay, "--relay") if args.relay is not None else None,
        ca=args.ca,
        connect_timeout=args.connect_timeout,
        allow_cidrs=_allow(args.allow),
        proxy_protocol=args.proxy_protocol,
        client_ca=args.client_ca,
        failover_after=_failover_after(args.failover_after),
    )
    if args.token_file:
        token = read_token_file(args.token_file, "--token-file")
        forward.settings = dataclasses.replace(
            forward.settings, token=token, token_source=f"--token-file ({args.token_file})"
        )
    return forward


class _Stop(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP: leave, closing the tunnels at the relay."""


class _Signals:
    """Ctrl-C, SIGTERM and SIGHUP as a request to stop, taken only where the main thread waits.

    A handler that raises wherever the main thread happens to be can land in
    the middle of an import or of a lock's bookkeeping and leave it held; the
    way out then waits on it forever (``burrow forward`` stopped by SIGTERM
    just after printing its URL, while it imported what the next line needs,
    once hung in CI). So the exception is raised only inside :meth:`waiting`
    (the blocking waits for the relay, the sleeps between looks); anywhere
    else the request is kept and taken at the next wait.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._armed = False

    def install(self) -> None:
        # a signal ignored when we started stays ignored, as `nohup` and a shell's background jobs
        # (SIGINT, SIGQUIT) expect: stop those with SIGTERM
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) is not signal.SIG_IGN:
                signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signal.Signals(signum).name
        if self._armed:
            raise _Stop(self.received)

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """A blocking wait that a stop request ends at once (raising :class:`_Stop`)."""
        self._armed = True  # (before the look: a signal between the two is not missed)
        try:
            if self.received is not None:
                raise _Stop(self.received)
            yield
        finally:
            self._armed = False

    def sleep(self, seconds: float) -> None:
        with self.waiting():
            time.sleep(seconds)


_signals = _Signals()


def say(text: str) -> None:
    """A line on stdout (the URLs), which may be a pipe its reader closed (``| head -1``): then
    stdout goes to /dev/null and burrow keeps serving."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def note(text: str) -> None:
    """A line for people, on stderr (never glued to the live counters, which it replaces)."""
    print(f"\r\033[K{text}" if sys.stderr.isatty() else text, file=sys.stderr, flush=True)


def _watch(forward: Forward) -> int:
    """Live counters on a terminal, reconnections always, until Ctrl-C, SIGTERM or SIGHUP; 1 if the
    relay closed the tunnel."""
    tty = sys.stderr.isatty()
    state = forward.state
    relay, url = forward.tunnel.relay, forward.tunnel.url
    try:
        while forward.is_open:
            now = forward.state
            if now is TunnelState.RECONNECTING and state is not now:
                note(f"burrow: link to relay {relay} lost; reconnecting...")
            elif now is TunnelState.OPEN:
                tunnel = forward.tunnel  # (compared each time: a quick move may never be seen RECONNECTING)
                if tunnel.relay != relay:
                    note(f"burrow: moved to relay {tunnel.relay}: {tunnel.url}")
                elif state is not now or tunnel.url != url:
                    note(f"burrow: reconnected: {tunnel.url}")
                if (tunnel.relay, tunnel.url) != (relay, url) or state is not now:
                    relay, url = tunnel.relay, tunnel.url
                    say(url)  # (it may have changed)
            state = now
            if tty:
                print(f"\r  {status_line(forward.stats)}\033[K", end="", file=sys.stderr, flush=True)
            _signals.sleep(STATUS_INTERVAL)
    except _Stop:
        if tty:
            print(file=sys.stderr)
        return 0
    if _signals.received is not None:  # (asked to stop as the tunnel closed)
        return 0
    if not forward.closed_reason:  # (else the agent's log said why, in one line)
        note("burrow: the relay closed the tunnel")
    return 1


def _listening(port: int) -> bool:
    """Something accepts on loopback ``port`` (IPv4 or IPv6), as the agent will dial it."""
    return LocalTarget(port).accepting()


def run_forward(args: argparse.Namespace) -> int:
    """``burrow forward PORT``: the URLs on stdout, everything else on stderr."""
    _log_level(args)
    _open_forward(args)  # (bad settings: one line, before any waiting)
    _signals.install()
    with _opened(args) as forward:
        stats = forward.stats
        _announce(args, forward)  # (a stop asked for meanwhile is taken by the watch, at once)
        code = _watch(forward)
    note(f"burrow: tunnel closed; {status_line(stats)}")
    return code


def _announce(args: argparse.Namespace, forward: Forward) -> None:
    tunnel = forward.tunnel
    if not forward.target.accepting():  # (once the tunnel is open: a failure stays one line)
        note(
            f"burrow: nothing accepts on {forward.target} yet; public connections wait up to "
            f"{forward.connect_timeout:g} s for it (--connect-timeout)"
        )
    note(f"burrow: forwarding {forward.target} to {tunnel.url} (relay {tunnel.relay})")
    say(tunnel.url)
    if tunnel.unencrypted_port is not None:
        host, port = tunnel.tcp_socket
        note(f"  tcp  {host}:{port}")
        say(f"tcp://{host}:{port}")
    from .client import ca_for  # (http.client: ~7 ms to import, for this line only)

    cafile = ca_for(tunnel)
    note(f"  try  curl {f'--cacert {cafile} ' if cafile else ''}{tunnel.url}/")
    note("  Ctrl-C to stop")


def _log_level(args: argparse.Namespace) -> None:
    """Warnings by default, bare; ``-v``: info, ``-vv`` or ``--log-level debug``: everything, stamped."""
    level = args.log_level.upper() if args.log_level else ("WARNING", "INFO", "DEBUG")[min(args.verbose, 2)]
    plain = level in ("WARNING", "ERROR")
    logging.basicConfig(
        level=level,
        format="%(message)s" if plain else "%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# -------------------------------------------------------------------------- run


def run_run(args: argparse.Namespace) -> int:
    """``burrow run --port P -- CMD ARGS``."""
    from . import run

    command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not command:
        raise ConfigurationError("give the command to run after --, e.g. burrow run --port 8888 -- jupyter lab")
    if not args.ready_timeout > 0:
        raise ConfigurationError(f"--ready-timeout {args.ready_timeout:g} is not a positive number of seconds")
    _log_level(args)
    forward = _open_forward(args)  # (settings are checked before anything starts)
    child = run.start(command, args.json)
    try:
        run.wait_until_listening(child, args.port, args.ready_timeout, _listening)
        with _opened(args, lambda seconds: run.pause(child, seconds)) as forward:
            tunnel = forward.tunnel
            if args.json:
                print(run.address_line(forward), flush=True)
            else:
                print(f"burrow: {command[0]} (pid {child.pid}) listens on local port {args.port}", flush=True)
                print(f"  url  {tunnel.url}", flush=True)
                if tunnel.unencrypted_port is not None:
                    host, port = tunnel.tcp_socket
                    print(f"  tcp  {host}:{port}", flush=True)
            code = run.serve(child, forward)
        print(f"burrow: tunnel closed; {command[0]} exited with code {code}", file=sys.stderr, flush=True)
        return code
    except run.RunFailed as exc:
        print(f"burrow run: error: {exc}", file=sys.stderr, flush=True)
        return exc.code
    finally:
        run.stop(child)


# ------------------------------------------------------------------------- demo


def run_token(args: argparse.Namespace) -> int:
    """``burrow token create``: a signed tenant token on stdout."""
    from .relay.tickets import load_or_create_key
    from .relay.tokens import TokenSigner

    made = not args.secret.exists()
    signer = TokenSigner(load_or_create_key(args.secret, "token secret", "--secret"))
    try:
        token, tenant = signer.issue(args.tenant, args.ttl or None, args.max_tunnels, args.max_connections)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    if made:
        note(f"burrow token: made the secret {args.secret} (mode 0600): give it to every relay as --token-secret")
    expires = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(tenant.expires)) if tenant.expires else "never"
    note(f"burrow token: tenant {tenant.name}, id {tenant.token_id}, expires {expires}")
    say(token)
    return 0


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    scale = units.get(text[-1:].lower(), 1)
    digits = text[:-1] if text[-1:].lower() in units else text
    if not digits.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 30d, 12h, 90m, 3600, 0)")
    return float(int(digits) * scale)


def run_status(args: argparse.Namespace) -> int:
    """``burrow status``: the relay's tunnels as a table, or its JSON."""
    status = fetch_status(args.admin, admin_token(args.token_file))
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(format_status(status))
    return 0


def run_trust(args: argparse.Namespace) -> int:
    """``burrow trust [--remove]``: the dev CA in (or out of) the stores tools and browsers read."""
    from .certs import DevCA
    from .paths import dev_ca_path
    from .trust import CA, trust

    if args.remove and not dev_ca_path().exists():
        print(f"burrow trust: no dev CA at {dev_ca_path()}, nothing to remove", flush=True)
        return 0
    dev = DevCA.load_or_create()
    if os.geteuid() == 0 and os.environ.get("SUDO_USER"):
        print(f"burrow trust: note: this is root's dev CA; run it without sudo to trust {os.environ['SUDO_USER']}'s")
    ca = CA(dev.path, dev.cert_pem, dev.fingerprint)
    print(f"burrow trust: dev CA {ca.path} (SHA-256 {ca.fingerprint[:16]}...)", flush=True)
    for line in trust(ca, remove=args.remove):
        print(f"  {line}", flush=True)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """``burrow demo``: the whole path on the embedded default."""
    from .client import ca_for, fetch
    from .demo import start_sample_app

    app = start_sample_app()
    forward = Forward(app.port)
    _signals.install()
    with _signals.waiting():
        forward.open()
    try:
        tunnel = forward.tunnel
        print(f"burrow demo: sample web app on 127.0.0.1:{app.port}, tunnel open", flush=True)
        cafile = ca_for(tunnel)
        started = time.monotonic()
        status, body = fetch(tunnel, cafile)
        elapsed = (time.monotonic() - started) * 1000
        first = body.decode(errors="replace").strip().splitlines()[0] if body else ""
        print(f"  GET {tunnel.url}/ -> {status} in {elapsed:.1f} ms: {first!r}", flush=True)
        print(f"  url   {tunnel.url}", flush=True)
        curl = f"curl --cacert {cafile} {tunnel.url}/" if cafile else f"curl {tunnel.url}/"
        print(f"  try   {curl}", flush=True)
        print("  Ctrl-C to stop", flush=True)
        code = _watch(forward)
    finally:
        forward.close()
    app.stop()
    return code


if __name__ == "__main__":  # pragma: no cover
    threading.current_thread().name = "burrow-cli"
    sys.exit(main())
