"""``burrow relay --metrics HOST:PORT``: Prometheus metrics, a health check, the admin view.

``/metrics`` is the Prometheus text format (prometheus-client), read from the
relay at each scrape: nothing is counted twice and nothing per byte touches
Python. ``/healthz`` answers 200 while the relay takes tunnels and 503 once it
drains. ``/api/status`` and the page at ``/`` are the admin view
(:mod:`burrow.relay.admin`, behind its admin token). Anything else is 404. The
listener is a small asyncio HTTP/1.1 server: one GET per connection, its head
bounded and read under a deadline.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..connection import TrafficStats
from ..errors import ConfigurationError
from . import admin

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from .server import Relay

logger = logging.getLogger("burrow.relay")

#: A scraper's request head is a few hundred bytes; more is not one.
MAX_REQUEST_HEAD = 8 * 1024
#: A scraper sends its request at once; a connection that does not is let go.
REQUEST_TIMEOUT = 5.0


class RelayCollector:
    """The relay's numbers, as Prometheus metric families, read when scraped."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        control, plane = self.relay.control, self.relay.plane
        if control is None or plane is None:
            return
        open_tunnels: dict[str, int] = {}
        live: dict[str, TrafficStats] = {}
        for record in control.registry:
            open_tunnels[record.tenant] = open_tunnels.get(record.tenant, 0) + 1
            stats, total = plane.stats(record.id), live.setdefault(record.tenant, TrafficStats())
            total.open_connections += stats.open_connections
            total.total_connections += stats.total_connections
            total.bytes_in += stats.bytes_in
            total.bytes_out += stats.bytes_out
        tenants = sorted(set(live) | set(control.closed_stats))

        def both(name: str) -> dict[str, int]:
            return {
                t: getattr(live.get(t, TrafficStats()), name)
                + getattr(control.closed_stats.get(t, TrafficStats()), name)
                for t in tenants
            }

        yield _gauge(
            GaugeMetricFamily,
            "burrow_up",
            "1 while the relay takes tunnels, 0 once it drains",
            [],
            [((), 0.0 if self.relay.draining else 1.0)],
        )
        yield _gauge(
            GaugeMetricFamily,
            "burrow_sessions_open",
            "agent sessions welcomed and open",
            [],
            [((), len(control.admission.sessions))],
        )
        yield _gauge(
            GaugeMetricFamily,
            "burrow_tunnels_open",
            "tunnels open, by tenant",
            ["tenant"],
            [((t,), n) for t, n in open_tunnels.items()],
        )
        yield _gauge(
            GaugeMetricFamily,
            "burrow_connections_open",
            "public connections open, by tenant",
            ["tenant"],
            [((t,), s.open_connections) for t, s in live.items()],
        )
        yield _gauge(
            CounterMetricFamily,
            "burrow_connections",
            "public connections served, by tenant",
            ["tenant"],
            [((t,), n) for t, n in both("total_connections").items()],
        )
        bytes_family = CounterMetricFamily(
            "burrow_bytes", "bytes through tunnels, by tenant and direction", labels=["tenant", "direction"]
        )
        for direction, name in (("in", "bytes_in"), ("out", "bytes_out")):
            for tenant, value in both(name).items():
                bytes_family.add_metric([tenant, direction], value)
        yield bytes_family
        refusals = control.refusals.counts + plane.refusals.counts
        yield _gauge(
            CounterMetricFamily,
            "burrow_refusals",
            "refused connections, sessions and requests, by kind (logged or not)",
            ["kind"],
            [((k,), n) for k, n in sorted(refusals.items())],
        )
        yield _gauge(
            CounterMetricFamily,
            "burrow_bind_refusals",
            "tunnels refused, by BindFailure code",
            ["code"],
            [((c,), n) for c, n in sorted(control.bind_refusals.items())],
        )
        yield _gauge(
            CounterMetricFamily,
            "burrow_tls_handshake_failures",
            "TLS handshakes on the relay's ports that failed, by reason: timeout, closed (by the client), "
            "not_tls, no_server_name, unknown_server_name, alpn, client_certificate, client_alert, protocol",
            ["reason"],
            [((r,), n) for r, n in plane.handshake_failures().items()],
        )
        yield _gauge(
            CounterMetricFamily,
            "burrow_agent_auth_failures",
            "agent sessions refused for their token (unknown, expired or revoked)",
            [],
            [((), control.refusals.counts["token"])],
        )
        yield _gauge(
            CounterMetricFamily,
            "burrow_tunnel_resumes",
            "tunnels reopened under their old id and address by a valid resume ticket (an agent came back)",
            [],
            [((), control.resumed_tunnels)],
        )
        yield _gauge(
            CounterMetricFamily,
            "burrow_session_reconnects",
            "agent sessions replaced by a reconnected agent that took their tunnels over before the relay "
            "noticed the old link had died",
            [],
            [((), control.replaced_sessions)],
        )
        latency = plane.open_latency()
        cumulative, buckets = 0, []
        for bound, count in zip((*latency.bounds, float("inf")), latency.counts, strict=True):
            cumulative += count
            buckets.append((_bucket_label(bound), cumulative))
        yield HistogramMetricFamily(
            "burrow_stream_open_seconds",
            "seconds from accepting a public connection to queueing its stream's OPEN for the agent: the TLS "
            "handshake (TLS addresses), routing and the caps; the agent does not answer an OPEN, so its dial "
            "of the local service is not included",
            buckets=buckets,
            sum_value=latency.sum,
        )


def _bucket_label(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def _gauge(
    kind: type, name: str, documentation: str, labels: list[str], values: list[tuple[tuple[str, ...], float]]
) -> Metric:
    family = kind(name, documentation, labels=labels)
    for label_values, value in values:
        family.add_metric(list(label_values), value)
    return family  # type: ignore[no-any-return]


class MetricsServer:
    """The ``--metrics`` listener."""

    def __init__(self, relay: Relay, host: str, port: int) -> None:
        try:
            from prometheus_client import CollectorRegistry, ProcessCollector
        except ImportError:
            raise ConfigurationError("--metrics needs prometheus-client: pip install 'burrow[metrics]'") from None
        self.relay = relay
        self.host, self.port = host, port
        token_file = relay.config.admin_token_file
        self.gate = admin.Gate(host, admin.read_admin_token(token_file) if token_file is not None else None)
        if self.gate.closed:
            logger.warning(
                "--metrics %s:%d is not on loopback and the relay has no --admin-token-file: /api/status and the "
                "admin page answer 403 (/metrics and /healthz work)",
                host,
                port,
            )
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(RelayCollector(relay))
        # the process's own: resident memory, CPU seconds, open descriptors and their limit (Linux)
        ProcessCollector(registry=self.registry)
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=MAX_REQUEST_HEAD)
        except OSError as exc:
            raise ConfigurationError(f"cannot listen on --metrics {self.host}:{self.port} ({exc.strerror})") from None
        self.port = self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            status, content_type, body, extra = self._answer(*_parse(head))
            lines = [
                f"HTTP/1.1 {status}",
                f"Content-Type: {content_type}",
                f"Content-Length: {len(body)}",
                "Connection: close",
                *(f"{name}: {value}" for name, value in extra),
            ]
            writer.write("\r\n".join(lines).encode() + b"\r\n\r\n" + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # (a scraper that hangs up or never asks: nothing to answer)
        finally:
            writer.close()

    def _answer(self, method: str, path: str, query: dict[str, str], headers: dict[str, str]) -> Answer:
        if method != "GET":
            return "405 Method Not Allowed", "text/plain", b"only GET is served here\n", (("Allow", "GET"),)
        if path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.registry), ()
        if path == "/healthz":
            if self.relay.draining:
                return "503 Service Unavailable", "text/plain", b"draining\n", ()
            return "200 OK", "text/plain", b"ok\n", ()
        if path in ("/", "/api/status"):
            page = path == "/"
            refused = self.gate.refuse(headers)
            if refused is not None:
                status, hint = refused
                # a browser asks for the page's credentials (Basic) once; scripts send Bearer
                scheme = "Basic" if page else "Bearer"
                realm = f'{scheme} realm="burrow relay admin"' + (', charset="UTF-8"' if page else "")
                challenge = (("WWW-Authenticate", realm),) if status == admin.UNAUTHORIZED else ()
                return status, "text/plain; charset=utf-8", hint, challenge
            if page:
                return "200 OK", "text/html; charset=utf-8", admin.page(self.relay), admin.SECURITY_HEADERS
            body = admin.status_json(self.relay, query)
            return "200 OK", "application/json", body, admin.SECURITY_HEADERS
        return "404 Not Found", "text/plain", b"try /metrics, /healthz, /api/status or /\n", ()


#: An answer: status line, content type, body, more headers.
Answer = tuple[str, str, bytes, tuple[tuple[str, str], ...]]


def _parse(head: bytes) -> tuple[str, str, dict[str, str], dict[str, str]]:
    """Method, path, query (first value of each name) and headers (names lower-cased) of a request head."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        return "", "", {}, {}
    target = urllib.parse.urlsplit(parts[1])
    query = {name: value for name, value in reversed(urllib.parse.parse_qsl(target.query))}
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers.setdefault(name.strip().lower(), value.strip())
    return parts[0], target.path, query, headers
