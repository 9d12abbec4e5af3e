"""The relay: a control plane and a data plane, started and stopped together.

:class:`Relay` is what ``burrow relay`` and the embedded default run. It owns
the lifecycle (start, graceful shutdown, close) and joins the two planes: the
:class:`~burrow.relay.control.RelayControl` decides, the data plane
(:class:`~burrow.relay.engine.AsyncioPlane`) moves bytes; they talk only
through the interface in :mod:`burrow.relay.plane`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from types import TracebackType

from ..errors import ConfigurationError
from ..paths import data_dir
from ..protocol.frames import ErrorCode
from .certwatch import CertificateWatch
from .config import RelayConfig
from .control import RelayControl
from .descriptors import Descriptors
from .engine import AsyncioPlane
from .metrics import MetricsServer
from .plane import DataPlane
from .tickets import TicketSigner, default_key_path, load_or_create_key
from .tokens import TokenSigner

logger = logging.getLogger("burrow.relay")

#: How often a draining relay looks whether its streams have finished.
DRAIN_POLL = 0.05


class Relay:
    """A burrow relay. ``async with Relay(config) as relay:`` or ``await relay.start()``."""

    def __init__(self, config: RelayConfig | None = None) -> None:
        self.config = config or RelayConfig()
        self.config.check()
        self.descriptors = Descriptors()
        self.control: RelayControl | None = None
        self.plane: DataPlane | None = None
        self.draining = False  # set when shutdown begins: /healthz says 503 from then on
        self.metrics: MetricsServer | None = None
        self.certificates: CertificateWatch | None = None  # with --cert/--key: reloads them
        self.started = 0.0  # time.monotonic() once listening (the admin view's uptime)

    async def start(self) -> Relay:
        """Listen; returns once connections are accepted. Errors are one-line ConfigurationErrors."""
        config = self.config
        key_path = config.ticket_key or default_key_path(config.data_dir or data_dir())
        tickets = TicketSigner(load_or_create_key(Path(key_path)), config.domain)
        tokens = None
        if config.token_secret is not None:
            if not config.token_secret.is_file():
                raise ConfigurationError(
                    f"--token-secret {config.token_secret} does not exist; make it with "
                    f"burrow token create --secret {config.token_secret} --tenant NAME"
                )
            tokens = TokenSigner(load_or_create_key(config.token_secret, "token secret", "--token-secret"))
        if config.revoked is not None:
            if tokens is None:
                raise ConfigurationError("--revoked lists ids of signed tokens; give --token-secret too")
            try:
                config.revoked.read_text()  # (a typo must not leave revoked tokens working: only later
            except (OSError, UnicodeDecodeError) as exc:  # failures keep the last list read)
                reason = getattr(exc, "strerror", None) or "not text"
                raise ConfigurationError(
                    f"cannot read --revoked {config.revoked} ({reason.lower()}); create it (empty is fine)"
                ) from None
        if config.raise_fd_limit:
            self.descriptors.raise_limit()
        control = RelayControl(config, tickets, self.descriptors, tokens)
        plane: DataPlane
        if config.engine == "native":
            from .native_plane import NativePlane

            plane = NativePlane(config, control, self.descriptors)
        else:
            plane = AsyncioPlane(config, control, self.descriptors)
        control.attach(plane)
        await plane.start()
        self.control, self.plane = control, plane
        self.started = time.monotonic()
        control.start()
        if not config.dev:
            self.certificates = CertificateWatch(config, plane)
            self.certificates.start()
        if config.metrics is not None:
            self.metrics = MetricsServer(self, *config.metrics)
            try:
                await self.metrics.start()
            except BaseException:
                self.close()
                raise
        logger.info(
            "relay listening on %s:%d for *.%s (%s certificates)",
            config.host,
            self.port,
            config.domain,
            "dev CA" if config.dev else "operator",
        )
        return self

    @property
    def port(self) -> int:
        """The bound TLS port (0 before :meth:`start`)."""
        return self.plane.ports[0] if self.plane is not None and self.plane.ports else 0

    @property
    def public_port(self) -> int:
        """The TLS port clients are told to use."""
        return self.config.public_port or self.port

    @property
    def ca_path(self) -> Path | None:
        """The dev CA certificate file, when this relay uses the dev CA."""
        return self.plane.ca_path if self.plane is not None else None

    def reload_certificate(self, why: str = "asked to") -> bool:
        """Read ``--cert``/``--key`` again and serve them if good (SIGHUP); False if refused or dev CA."""
        if self.certificates is None:
            logger.info("relay: %s, but this relay has no --cert/--key to reload (dev CA)", why)
            return False
        return self.certificates.reload(why)

    def stop_listening(self) -> None:
        """Accept no new connection: TLS listener and every TCP tunnel listener."""
        if self.control is not None:
            self.control.stop()
        if self.plane is not None:
            self.plane.stop_listening()

    async def shutdown(self, grace: float | None = None) -> None:
        """Graceful stop: refuse new connections, GOAWAY to agents, let streams finish, close."""
        grace = self.config.shutdown_grace if grace is None else grace
        self.draining = True
        self.stop_listening()
        plane = self.plane
        if plane is not None:
            plane.goaway(ErrorCode.SHUTDOWN, "relay shutting down")
            logger.info("relay shutting down: %d open streams get up to %.0f s to finish", plane.open_streams(), grace)
            deadline = time.monotonic() + grace
            # streams end in many places; polling a few times a second during a shutdown is cheap
            while plane.open_streams() and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(DRAIN_POLL)
        self.close()

    def close(self) -> None:
        """Stop now: close listeners and every session (streams are reset)."""
        self.draining = True
        if self.metrics is not None:
            self.metrics.close()
        if self.certificates is not None:
            self.certificates.close()
        self.stop_listening()
        if self.control is not None:
            self.control.close_all("relay shutting down")
        if self.plane is not None:
            self.plane.close()

    async def __aenter__(self) -> Relay:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
