"""The relay's end of one agent session."""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import TYPE_CHECKING

from ..connection import SessionConnection
from ..protocol import events as ev
from ..protocol.frames import ErrorCode, code_name
from ..protocol.session import Role, SessionProtocol, SessionState
from .config import HELLO_TIMEOUT
from .registry import RelayTunnel
from .tickets import token_fingerprint

if TYPE_CHECKING:
    from .server import Relay

logger = logging.getLogger("burrow.relay")


class RelaySession(SessionConnection):
    """One authenticated agent: its tunnels, its streams, its control requests."""

    def __init__(self, relay: Relay, peer: str) -> None:
        config = relay.config
        super().__init__(
            SessionProtocol(Role.RELAY, window=config.window, max_payload=config.max_frame),
            name=secrets.token_hex(4),
            heartbeat_timeout=config.heartbeat_timeout,
        )
        self.relay = relay
        self.peer = peer
        self.token_fp = ""  # fingerprint of the agent's token, once it said HELLO
        self.tunnels: dict[str, RelayTunnel] = {}
        self._hello_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.relay.sessions.add(self)
        self._hello_timer = asyncio.get_running_loop().call_later(HELLO_TIMEOUT, self._hello_timeout)

    def _hello_timeout(self) -> None:
        if self.proto.state is SessionState.HANDSHAKE:
            logger.info("refused agent %s: no HELLO within %.0f s", self.peer, HELLO_TIMEOUT)
            self.close(ErrorCode.TIMEOUT, "no HELLO in time")

    def handle_event(self, event: ev.Event) -> None:
        if isinstance(event, ev.HelloReceived):
            self._on_hello(event)
        elif isinstance(event, ev.BindRequested):
            if self.proto.state is not SessionState.CLOSED:  # (an early BIND behind a refused HELLO: dropped)
                self.relay.spawn(self.relay.bind(self, event))
        elif isinstance(event, ev.UnbindRequested):
            tunnel = self.tunnels.get(event.tunnel_id)
            if tunnel is not None:
                self.relay.close_tunnel(tunnel, "closed by the agent")
            else:
                self.proto.unbound(event.tunnel_id, "unknown tunnel")
        elif isinstance(event, ev.GoAwayReceived):
            logger.info("session %s: agent said goodbye (%s)", self.name, event.reason or code_name(event.code))
            if self.transport is not None:
                self.transport.close()

    def _on_hello(self, event: ev.HelloReceived) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        if not self.relay.token_ok(event.token):
            logger.warning("refused agent %s: wrong token", self.peer)
            self.proto.reject(ErrorCode.AUTH_FAILED, "the relay rejected the token")
            self.flush()
            if self.transport is not None:
                self.transport.close()
            return
        self.token_fp = token_fingerprint(event.token)
        self.proto.welcome(self.name, {"domain": self.relay.config.domain, "tls_port": self.relay.public_port})
        logger.info("session %s opened by agent %s (%s)", self.name, self.peer, event.agent)

    def session_closed(self, exc: Exception | None) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        self.relay.sessions.discard(self)
        for tunnel in list(self.tunnels.values()):
            self.relay.close_tunnel(tunnel, "session ended", notify=False)
        if self.token_fp:
            logger.info("session %s closed", self.name)
