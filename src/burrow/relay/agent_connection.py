"""The relay's end of one agent session: the link's I/O, its HELLO deadline, its control requests."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable

from ..connection import SessionConnection
from ..logs import LogLimiter
from ..protocol import events as ev
from ..protocol.frames import ErrorCode, code_name
from ..protocol.session import Role, SessionProtocol, SessionState
from .config import HELLO_TIMEOUT, RelayConfig
from .plane import BindRequest, ControlPlane, Hello

logger = logging.getLogger("burrow.relay")
#: a peer may connect and stay silent, or say goodbye, as often as it likes: those lines are rate-limited
_refusals = LogLimiter(logger)

#: Bytes of randomness in a session id (8 hex digits: a name for logs, not a secret).
SESSION_ID_BYTES = 4


class AgentConnection(SessionConnection):
    """One agent's session at the relay; control requests go up to the :class:`ControlPlane`.

    ``sessions`` is the data plane's table of open sessions by id: the
    connection enters it when it is made and leaves it when it is lost.
    """

    def __init__(
        self,
        config: RelayConfig,
        control: ControlPlane,
        sessions: dict[str, AgentConnection],
        peer: str,
        release: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__(
            SessionProtocol(Role.RELAY, window=config.window, max_payload=config.max_frame),
            name=_unused_id(sessions),
            heartbeat_timeout=config.heartbeat_timeout,
        )
        self.control = control
        self.sessions = sessions
        self.peer = peer
        self.release = release  # frees the pending-handshake slot it holds until welcomed (or gone)
        self._hello_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.sessions[self.name] = self
        self._hello_timer = asyncio.get_running_loop().call_later(HELLO_TIMEOUT, self._hello_timeout)

    def _hello_timeout(self) -> None:
        if self.proto.state is SessionState.HANDSHAKE:
            _refusals.log("hello", logging.INFO, "refused agent %s: no HELLO within %.0f s", self.peer, HELLO_TIMEOUT)
            self.close(ErrorCode.TIMEOUT, "no HELLO in time")

    def handle_event(self, event: ev.Event) -> None:
        if isinstance(event, ev.HelloReceived):
            if self._hello_timer is not None:
                self._hello_timer.cancel()
            self.control.hello(Hello(self.name, self.peer, event.token, event.agent))
        elif isinstance(event, ev.BindRequested):
            if self.proto.state is not SessionState.CLOSED:  # (an early BIND behind a refused HELLO: dropped)
                self.control.bind(
                    BindRequest(
                        self.name, event.request_id, event.port, event.unencrypted, event.h2, event.ticket, event.access
                    )
                )
        elif isinstance(event, ev.UnbindRequested):
            self.control.unbind(self.name, event.tunnel_id)
        elif isinstance(event, ev.GoAwayReceived):
            # (a peer may say goodbye before its HELLO, as often as it connects)
            _refusals.log(
                "goodbye",
                logging.INFO,
                "session %s: agent said goodbye (%s)",
                self.name,
                event.reason or code_name(event.code),
            )
            if self.transport is not None:
                self.transport.close()

    def session_closed(self, exc: Exception | None) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        self.release()
        if self.sessions.get(self.name) is self:
            del self.sessions[self.name]
        self.control.session_closed(self.name)


def _unused_id(sessions: dict[str, AgentConnection]) -> str:
    while True:
        session_id = secrets.token_hex(SESSION_ID_BYTES)
        if session_id not in sessions:
            return session_id
