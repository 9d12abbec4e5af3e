"""The relay's data plane in native code: :class:`NativePlane` drives ``burrow._native.RelayEngine``.

The engine (Rust: tokio and rustls, ``native/src/relay/``) accepts, runs
TLS, routes by SNI and TCP port, and carries the agent sessions and their
streams on every core. This module is its Python face, the
:class:`~burrow.relay.plane.DataPlane` the control plane talks to:

- downwards, routes, answers and counters go to the engine as plain values;
  the control frames (WELCOME, BOUND, GOAWAY, ...) are encoded here, so the
  JSON of the protocol stays in Python;
- upwards, the engine queues the rare events (an agent's HELLO, BIND and
  UNBIND payloads, a session's end, log lines) and wakes this loop through a
  socket; they are decoded here (``burrow.protocol.session``) and handed to
  the :class:`~burrow.relay.plane.ControlPlane`.

Nothing per byte or per public connection crosses.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._native import RelayEngine
from ..connection import TrafficStats
from ..errors import ConfigurationError, RemoteProtocolError
from ..logs import LogLimiter
from ..protocol.frames import ErrorCode, Frame, FrameType, encode_code, encode_json
from ..protocol.messages import BindFailure, TunnelAddress
from ..protocol.session import MIN_WINDOW, HelloMessage, decode_bind, decode_hello, decode_unbind
from .config import BASE_WINDOW, HELLO_TIMEOUT, RelayConfig
from .descriptors import CONNECTION_RESERVE, Descriptors
from .plane import BindRequest, Census, ControlPlane, Hello, LatencyHistogram, LiveConnection, Route

if TYPE_CHECKING:
    from ..certs import DevCA

logger = logging.getLogger("burrow.relay")

#: Dev leaves made ahead of their routes and kept until used (the ready-id pool holds a few).
MAX_PREPARED_LEAVES = 64

#: The names a tunnel's loopback TLS port answers to (its certificate's).
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def data_threads(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The data plane's threads by default: the cores this process may use.

    That is the CPU affinity, and under a cgroup v2 CPU quota (a container's
    ``resources.limits.cpu``, systemd's ``CPUQuota=``) no more threads than the
    quota's cores, rounded up: more would only be throttled.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover (not Linux)
        cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, -(-int(quota) // int(period)))
    except (OSError, ValueError, ZeroDivisionError):
        pass  # (no cgroup v2 here, or no quota)
    return max(1, cores)


class NativePlane:
    """The relay's data plane on the native engine (see the module docstring)."""

    def __init__(self, config: RelayConfig, control: ControlPlane, descriptors: Descriptors) -> None:
        self.config = config
        self.control = control
        self.descriptors = descriptors
        self.refusals = LogLimiter(logger)
        self.engine: RelayEngine | None = None
        self.ca: DevCA | None = None
        self._ports: list[int] = []
        self._watched: socket.socket | None = None
        self._tunnels: set[str] = set()  # ids with a listener or a route in the engine
        self._leaves: OrderedDict[str, bytes] = OrderedDict()
        self._hellos: dict[str, HelloMessage] = {}  # session id -> its HELLO, until welcomed or gone
        self._open: set[str] = set()

    # ---------------------------------------------------------------- lifecycle

    @property
    def base_window(self) -> int:
        """What each stream is granted whatever the budgets (announced in WELCOME)."""
        return max(MIN_WINDOW, min(BASE_WINDOW, self.config.window))

    @property
    def ports(self) -> Sequence[int]:
        return self._ports

    @property
    def per_host_certificates(self) -> bool:
        return self.ca is not None

    @property
    def access_control(self) -> bool:
        return True

    @property
    def ca_path(self) -> Path | None:
        return self.ca.path if self.ca is not None else None

    def _engine_of(self, config: RelayConfig) -> RelayEngine:
        settings: dict[str, Any] = dict(
            domain=config.domain,
            threads=config.threads or data_threads(),
            handshake_timeout=config.handshake_timeout,
            hello_timeout=HELLO_TIMEOUT,
            heartbeat_timeout=config.heartbeat_timeout,
            window=config.window,
            base_window=self.base_window,
            session_budget=config.session_budget,
            relay_budget=config.relay_budget,
            max_frame=config.max_frame,
            max_pending=config.max_pending_handshakes,
            max_pending_per_source=config.max_pending_per_source,
            max_streams_per_session=config.max_streams_per_session,
            max_streams_per_tunnel=config.max_streams_per_tunnel,
            fd_ceiling=self.descriptors.limit - CONNECTION_RESERVE,
        )
        if config.cert is not None and config.key is not None:
            try:
                chain, key = config.cert.read_bytes(), config.key.read_bytes()
                return RelayEngine(chain=chain, key=key, **settings)
            except (OSError, ValueError) as exc:
                reason = getattr(exc, "strerror", None) or str(exc)
                raise ConfigurationError(
                    f"cannot load --cert {config.cert} with --key {config.key} ({reason}); "
                    "give a PEM chain and its private key"
                ) from None
        from ..certs import DevCA  # only a dev relay needs cryptography (~70 ms to import)

        try:
            self.ca = DevCA.load_or_create(config.data_dir)
            agent_leaf = self.ca.issue(config.domain).cert_pem
            # tunnels' own loopback ports: one leaf for every name a client may dial them by
            loopback = self.ca.issue(*LOOPBACK_NAMES).cert_pem if config.loopback_urls else None
            return RelayEngine(dev_key=self.ca.leaf_key_pem, agent_leaf=agent_leaf, loopback_leaf=loopback, **settings)
        except OSError as exc:
            reason = (exc.strerror or str(exc)).lower()
            raise ConfigurationError(
                f"cannot set up the dev CA in {config.data_dir or 'BURROW_HOME'} ({reason}); "
                "check BURROW_HOME, or give --cert and --key"
            ) from None
        except ValueError as exc:  # cryptography: a PEM file that is not a certificate or an EC key
            raise ConfigurationError(
                f"the dev CA in {config.data_dir or 'BURROW_HOME'} is damaged ({str(exc).splitlines()[0]}); "
                "delete its ca.pem and ca-key.pem to make a new one"
            ) from None

    async def start(self) -> None:
        config = self.config
        engine = self._engine_of(config)
        host = "::1" if config.host == "localhost" else config.host
        try:
            port = engine.listen(_address(host), config.port)
        except (OSError, ValueError) as exc:
            engine.close(b"")
            reason = (getattr(exc, "strerror", None) or str(exc)).lower()
            raise ConfigurationError(
                f"cannot listen on {config.host}:{config.port} ({reason}); choose another --listen"
            ) from None
        self._ports.append(port)
        if config.also_ipv6 and config.host == "127.0.0.1" and socket.has_ipv6:
            try:  # so that <id>.localhost works for clients that try ::1 first
                engine.listen("::1", port)
            except OSError:
                pass
        fd = engine.take_watched_fd()
        assert fd is not None
        self._watched = socket.socket(fileno=fd)
        self._watched.setblocking(False)
        asyncio.get_running_loop().add_reader(fd, self._on_events)
        self.engine = engine

    def stop_listening(self) -> None:
        if self.engine is not None:
            self.engine.stop_listening()

    def reload_certificate(self, chain: bytes, key: bytes) -> None:
        if self.engine is not None:
            self.engine.reload_certificate(chain, key)

    def goaway(self, code: ErrorCode, reason: str) -> None:
        if self.engine is not None:
            self.engine.goaway(encode_code(FrameType.GOAWAY, 0, code, reason))

    def open_streams(self) -> int:
        return self.engine.open_streams() if self.engine is not None else 0

    def session_ids(self) -> list[str]:
        return self.engine.session_ids() if self.engine is not None else []

    def census(self) -> Census:
        if self.engine is None:
            return Census(0, 0, 0)
        sessions, tunnels, leaves = self.engine.census()
        # (the engine's leaves include the agent endpoint's, made at start)
        return Census(sessions, tunnels, leaves - 1 + len(self._leaves) if self.ca is not None else 0)

    def buffered(self, tunnel_id: str) -> int:
        return self.engine.buffered(tunnel_id) if self.engine is not None else 0

    def handshake_failures(self) -> dict[str, int]:
        return dict(self.engine.handshake_failures()) if self.engine is not None else {}

    def open_latency(self) -> LatencyHistogram:
        if self.engine is None:
            return LatencyHistogram((), (0,), 0.0)
        bounds, counts, total = self.engine.open_latency()
        return LatencyHistogram(tuple(bounds), tuple(counts), total)

    def connections(self, tunnel_id: str, limit: int) -> tuple[int, list[LiveConnection]]:
        if self.engine is None:
            return 0, []
        count, listed = self.engine.connections(tunnel_id, limit)
        return count, [LiveConnection(*entry) for entry in listed]

    def close(self) -> None:
        engine = self.engine
        if engine is None:
            return
        engine.close(encode_code(FrameType.GOAWAY, 0, ErrorCode.SHUTDOWN, "relay shutting down"))
        self._tunnels.clear()
        if self._watched is not None:
            try:
                asyncio.get_running_loop().remove_reader(self._watched.fileno())
            except RuntimeError:  # (no loop: closed from outside it)
                pass
            self._on_events()  # the sessions' ends
            self._watched.close()
            self._watched = None

    # ------------------------------------------------------------------ events

    def _on_events(self) -> None:
        assert self.engine is not None and self._watched is not None
        try:
            while self._watched.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            return
        for kind, a, b, c in self.engine.take_events():
            try:
                if kind == "log":
                    if a:
                        self.refusals.log(a, b, "%s", c)
                    else:
                        logger.log(b, "%s", c)
                elif kind == "hello":
                    self._hello(a, b, c)
                elif kind == "request":
                    self._request(a, b, c)
                elif kind == "closed":
                    self._hellos.pop(a, None)
                    self._open.discard(a)
                    self.control.session_closed(a)
            except Exception:  # a bug here must not stop the relay's events
                logger.exception("relay: handling %s event failed", kind)

    def _hello(self, session_id: str, peer: str, payload: bytes) -> None:
        try:
            hello = decode_hello(Frame(FrameType.HELLO, 0, payload))
        except RemoteProtocolError as exc:
            self._protocol_error(session_id, exc)
            return
        self._hellos[session_id] = hello
        self.control.hello(Hello(session_id, peer, hello.token, hello.agent))

    def _request(self, session_id: str, kind: int, payload: bytes) -> None:
        frame = Frame(FrameType(kind), 0, payload)
        try:
            if frame.type is FrameType.BIND:
                bind = decode_bind(frame)
                request = BindRequest(
                    session_id, bind.request_id, bind.port, bind.unencrypted, bind.h2, bind.ticket, bind.access
                )
                self.control.bind(request)
            else:
                self.control.unbind(session_id, decode_unbind(frame).tunnel_id)
        except RemoteProtocolError as exc:
            self._protocol_error(session_id, exc)

    def _protocol_error(self, session_id: str, exc: RemoteProtocolError) -> None:
        assert self.engine is not None
        self.refusals.log("protocol", logging.WARNING, "session %s: protocol error from peer: %s", session_id, exc)
        self.engine.close_session(session_id, encode_code(FrameType.GOAWAY, 0, exc.code, str(exc)))

    # ------------------------------------------------------------------ routes

    async def prepare_host(self, host: str) -> None:
        if self.ca is None:
            return
        # a leaf costs ~1 ms of ECDSA signing, which releases the GIL: a worker thread keeps the loop free
        leaf = await asyncio.get_running_loop().run_in_executor(None, self._issue, host)
        self._leaves[host] = leaf
        while len(self._leaves) > MAX_PREPARED_LEAVES:
            self._leaves.popitem(last=False)

    def _issue(self, host: str) -> bytes:
        assert self.ca is not None
        return self.ca.issue(host).cert_pem

    async def listen_tcp(self, tunnel_id: str, ports: Sequence[int]) -> int:
        return await self._listen(tunnel_id, ports, tls=False)

    async def listen_tls(self, tunnel_id: str, ports: Sequence[int]) -> int:
        return await self._listen(tunnel_id, ports, tls=True)

    async def _listen(self, tunnel_id: str, ports: Sequence[int], tls: bool) -> int:
        """A listener of the tunnel's own, raw TCP or TLS (``https://localhost:PORT``), on the first free port.

        (A resumed tunnel's port, still held by its old listener a moment after
        ``remove_route``, is waited for by the engine, which knows when it is let go.)
        """
        assert self.engine is not None
        if tunnel_id in self._tunnels and not tls:  # a rival bind for the same id got here first
            raise OSError(errno.EADDRINUSE, f"tunnel {tunnel_id} already has a route or a listener")
        host = self.config.tcp_host or self.config.host
        hosts = [_address(host)]
        if self.config.also_ipv6 and host == "127.0.0.1" and socket.has_ipv6:
            # the address given is "localhost" (the domain): it must answer on ::1 too
            hosts.append("::1")
        listen = self.engine.listen_tls if tls else self.engine.listen_tcp
        try:
            port: int = listen(tunnel_id, hosts, list(ports))
        except ValueError as exc:
            raise OSError(errno.EINVAL, str(exc)) from None
        self._tunnels.add(tunnel_id)
        return port

    def add_route(self, route: Route) -> None:
        assert self.engine is not None
        leaf = None
        if self.ca is not None:
            leaf = self._leaves.pop(route.host, None) or self._issue(route.host)
        access = route.access
        self.engine.add_route(
            route.tunnel_id,
            route.host,
            route.session_id,
            route.h2,
            leaf,
            list(access.allow),
            access.proxy_protocol,
            route.quota,
            access.client_ca.encode() if access.client_ca is not None else None,
        )
        self._tunnels.add(route.tunnel_id)

    def remove_route(self, tunnel_id: str) -> None:
        self._tunnels.discard(tunnel_id)
        if self.engine is not None:
            self.engine.remove_route(tunnel_id)

    def stats(self, tunnel_id: str) -> TrafficStats:
        if self.engine is None:
            return TrafficStats()
        return TrafficStats(*self.engine.stats(tunnel_id))

    # ---------------------------------------------------------------- sessions

    def session_open(self, session_id: str) -> bool:
        return self.engine is not None and self.engine.session_open(session_id)

    def welcome(self, session_id: str) -> None:
        hello = self._hellos.pop(session_id, None)
        if hello is None or self.engine is None:
            return
        config = self.config
        message = {
            "version": hello.version,
            "session": session_id,
            "window": self.base_window,  # the rest of a window is lent from the budgets
            "max_frame": config.max_frame,
        }
        frame = encode_json(FrameType.WELCOME, message)
        self.engine.welcome(session_id, frame, hello.window, min(config.max_frame, hello.max_frame))

    def reject(self, session_id: str, code: ErrorCode, reason: str) -> None:
        self._hellos.pop(session_id, None)
        if self.engine is not None:
            self.engine.close_session(session_id, encode_code(FrameType.GOAWAY, 0, code, reason))

    def bound(self, session_id: str, request_id: int, tunnel: TunnelAddress) -> None:
        if self.engine is not None:
            frame = encode_json(FrameType.BOUND, {**tunnel.to_message(), "request": request_id})
            self.engine.send_control(session_id, frame)

    def bind_failed(self, session_id: str, request_id: int, code: BindFailure, message: str) -> None:
        if self.engine is not None:
            payload = {"request": request_id, "code": code.value, "message": message}
            self.engine.send_control(session_id, encode_json(FrameType.BIND_FAILED, payload))

    def unbound(self, session_id: str, tunnel_id: str, reason: str) -> None:
        if self.engine is not None:
            self.engine.send_control(session_id, encode_json(FrameType.UNBOUND, {"id": tunnel_id, "reason": reason}))

    def close_session(self, session_id: str, code: ErrorCode, reason: str) -> None:
        if self.engine is not None:
            self.engine.close_session(session_id, encode_code(FrameType.GOAWAY, 0, code, reason))


def _address(host: str) -> str:
    """An IP address for ``host`` (names such as localhost are resolved once, here)."""
    try:
        return str(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0])
    except (OSError, IndexError):
        return host
