"""The relay's admin view, on the ``--metrics`` listener: ``/api/status`` (JSON) and a page at ``/``.

``/api/status`` says what the relay carries now: its facts, its tunnels
(id, kind, tenant, counters, age) and each tunnel's oldest open public
connections (client address, bytes each way, age), all bounded (see the
``MAX_*`` names; what is left out is counted). ``burrow status`` prints it.

``/`` renders the same as HTML on the server (readable with JavaScript off);
a few lines of script then refresh it in place every 2 s from
``/api/status``. Tunnel ids, tenants and client addresses are text a peer can
influence: the server escapes them, the script sets them with
``textContent`` only, and a strict Content-Security-Policy lets nothing run
but that script.

The admin endpoints (not ``/metrics`` and ``/healthz``, which Prometheus and
load balancers need) want the admin token (``--admin-token-file``) when the
relay has one: ``Authorization: Bearer <token>`` (``burrow status``, scripts)
or HTTP Basic with the token as the password (a browser asks for it once and
sends it with the page's refreshes; any user name). Never in the URL: a
query string ends up in proxies' logs, browser history and shared links. A
listener beyond loopback without a token keeps them closed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import ipaddress
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import ConfigurationError
from ..status import human_age, human_bytes

if TYPE_CHECKING:
    from .server import Relay

#: Tunnels listed in one answer; more are counted (``tunnels_left_out``). 1,000 rows are what
#: a person or a script reads; the relay's counters (``/metrics``) cover the rest.
MAX_TUNNELS_LISTED = 1000
#: Connections listed per tunnel by default, and at most (``?connections=N``).
CONNECTIONS_LISTED = 20
MAX_CONNECTIONS_LISTED = 1000
#: Connections listed in one answer across its tunnels: keeps an answer near 1 MiB of JSON.
MAX_CONNECTIONS_ANSWER = 10_000
#: The page asks for this many connections per tunnel at each refresh.
PAGE_CONNECTIONS = 50
#: An admin token shorter than this is guessable; ``head -c 24 /dev/urandom | base64`` makes one.
MIN_TOKEN_LENGTH = 16

OK = "200 OK"
UNAUTHORIZED = "401 Unauthorized"
FORBIDDEN = "403 Forbidden"


def is_loopback(host: str) -> bool:
    """True when ``host`` (the ``--metrics`` address) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_admin_token(path: Path) -> str:
    """The admin token in ``path`` (``--admin-token-file``); ConfigurationError if unusable."""
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not text"
        raise ConfigurationError(f"cannot read --admin-token-file {path} ({reason.lower()})") from None
    if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
        raise ConfigurationError(
            f"--admin-token-file {path} must hold one token of {MIN_TOKEN_LENGTH}+ characters "
            "(e.g. head -c 24 /dev/urandom | base64)"
        )
    return token


class Gate:
    """Who may read the admin endpoints (see the module docstring)."""

    def __init__(self, host: str, token: str | None) -> None:
        self.token = token
        self.closed = token is None and not is_loopback(host)

    def refuse(self, headers: Mapping[str, str]) -> tuple[str, bytes] | None:
        """None when the request may be answered; else its status and one-line body."""
        if self.closed:
            return FORBIDDEN, (
                b"the admin endpoints are off: this listener is not on loopback and the relay has no admin "
                b"token; start it with --admin-token-file FILE\n"
            )
        if self.token is None:
            return None
        offered = _offered(headers.get("authorization", ""))
        if offered and hmac.compare_digest(offered, self.token.encode()):
            return None
        return UNAUTHORIZED, (
            b"this relay's admin endpoints want its admin token: burrow status --token-file FILE "
            b"(or BURROW_ADMIN_TOKEN); a browser asks for it (any user name, the token as password)\n"
        )


def _offered(authorization: str) -> bytes:
    """The token an Authorization header offers (Bearer, or Basic's password); b"" if none."""
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() == "bearer":
        return credentials.strip().encode()
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True)
        except ValueError:
            return b""
        return decoded.partition(b":")[2]
    return b""


# ------------------------------------------------------------------ the JSON


def _kind(tcp_port: int | None) -> str:
    return f"tcp:{tcp_port}" if tcp_port is not None else "https"


def status(relay: Relay, connections: int = CONNECTIONS_LISTED) -> dict[str, Any]:
    """What ``/api/status`` answers: the relay, its oldest tunnels and their oldest connections."""
    control, plane = relay.control, relay.plane
    now = time.monotonic()
    facts: dict[str, Any] = {
        "version": __version__,
        "domain": relay.config.domain,
        "engine": relay.config.engine,
        "port": relay.port,
        "uptime": round(now - relay.started, 3) if relay.started else 0.0,
        "draining": relay.draining,
        "sessions": 0,
        "tunnels": 0,
        "connections_open": 0,
    }
    answer: dict[str, Any] = {"relay": facts, "tunnels": [], "tunnels_left_out": 0}
    if control is None or plane is None:
        return answer
    records = list(control.registry)
    facts["sessions"] = len(control.admission.sessions)
    facts["tunnels"] = len(records)
    per_tunnel = max(0, min(connections, MAX_CONNECTIONS_LISTED))
    budget = MAX_CONNECTIONS_ANSWER
    open_total = 0
    for index, record in enumerate(records):
        stats = plane.stats(record.id)
        open_total += stats.open_connections
        if index >= MAX_TUNNELS_LISTED:
            continue
        limit = min(per_tunnel, budget)
        count, listed = plane.connections(record.id, limit) if limit else (stats.open_connections, [])
        budget -= len(listed)
        answer["tunnels"].append(
            {
                "id": record.id,
                "kind": _kind(record.tcp_port),
                "host": record.host,
                "tcp_port": record.tcp_port,
                "tenant": record.tenant,
                "session": record.session_id,
                "connections_open": stats.open_connections,
                "connections_total": stats.total_connections,
                "bytes_in": stats.bytes_in,
                "bytes_out": stats.bytes_out,
                "age": round(now - record.opened, 3),
                "connections": [
                    {"client": c.client, "bytes_in": c.bytes_in, "bytes_out": c.bytes_out, "age": round(c.age, 3)}
                    for c in listed
                ],
                "connections_left_out": max(0, count - len(listed)),
            }
        )
    facts["connections_open"] = open_total
    answer["tunnels_left_out"] = max(0, len(records) - MAX_TUNNELS_LISTED)
    return answer


def status_json(relay: Relay, query: Mapping[str, str]) -> bytes:
    """``/api/status?connections=N`` as UTF-8 JSON."""
    try:
        connections = int(query.get("connections", CONNECTIONS_LISTED))
    except ValueError:
        connections = CONNECTIONS_LISTED
    return json.dumps(status(relay, connections), separators=(",", ":")).encode()


# ------------------------------------------------------------------ the page

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1d2330; background: #fff; }
h1 { font-size: 1.4em; margin: 0 0 .2em; } h2 { font-size: 1.1em; margin: 1.4em 0 .4em; }
p { margin: .2em 0; color: #4a5263; }
table { border-collapse: collapse; min-width: 40em; }
th, td { padding: .25em .8em; border-bottom: 1px solid #dde1ea; text-align: left; white-space: nowrap; }
th { background: #f1f3f8; font-weight: 600; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
code { font-family: ui-monospace, monospace; }
"""

_SCRIPT = """
"use strict";
(() => {
  const units = ["B", "kB", "MB", "GB", "TB"];
  const bytes = (n) => {
    let i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
    return i ? n.toFixed(1) + " " + units[i] : n.toFixed(0) + " B";
  };
  const age = (s) => {
    s = Math.floor(s);
    if (s < 60) return s + "s";
    const two = (n) => String(n).padStart(2, "0");
    if (s < 3600) return Math.floor(s / 60) + "m" + two(s % 60) + "s";
    if (s < 86400) return Math.floor(s / 3600) + "h" + two(Math.floor(s / 60) % 60) + "m";
    return Math.floor(s / 86400) + "d" + two(Math.floor(s / 3600) % 24) + "h";
  };
  const cell = (row, text, count) => {
    const td = document.createElement("td");
    td.textContent = text;
    if (count !== undefined) {
      td.className = "n";
      td.dataset.bytes = String(count);
      td.title = count + " bytes";
    }
    row.appendChild(td);
    return td;
  };
  const fill = (id, rows) => {
    const body = document.getElementById(id);
    body.replaceChildren(...rows);
  };
  let refreshes = 0;
  const render = (status) => {
    const relay = status.relay;
    document.getElementById("summary").textContent = summary(relay);
    const tunnels = [], connections = [];
    for (const t of status.tunnels) {
      const row = document.createElement("tr");
      row.dataset.tunnel = t.id;
      cell(row, t.id);
      cell(row, t.kind);
      cell(row, t.tenant || "-");
      cell(row, t.connections_open + "/" + t.connections_total).className = "n";
      cell(row, bytes(t.bytes_in), t.bytes_in);
      cell(row, bytes(t.bytes_out), t.bytes_out);
      cell(row, age(t.age)).className = "n";
      tunnels.push(row);
      for (const c of t.connections) {
        const line = document.createElement("tr");
        line.dataset.tunnel = t.id;
        cell(line, t.id);
        cell(line, c.client);
        cell(line, bytes(c.bytes_in), c.bytes_in);
        cell(line, bytes(c.bytes_out), c.bytes_out);
        cell(line, age(c.age)).className = "n";
        connections.push(line);
      }
    }
    fill("tunnels-body", tunnels);
    fill("connections-body", connections);
    document.getElementById("left-out").textContent = leftOut(status);
    refreshes += 1;
    document.body.dataset.refreshes = String(refreshes);
    document.getElementById("updated").textContent =
      "refreshed every 2 s; last at " + new Date().toLocaleTimeString();
  };
  const summary = (r) => r.tunnels + " tunnels · " + r.sessions + " sessions · " + r.connections_open +
    " connections open · up " + age(r.uptime) + (r.draining ? " · draining" : "");
  const leftOut = (s) => {
    let hidden = 0;
    for (const t of s.tunnels) hidden += t.connections_left_out;
    const parts = [];
    if (s.tunnels_left_out) parts.push(s.tunnels_left_out + " more tunnels not listed");
    if (hidden) parts.push(hidden + " more connections not listed");
    return parts.join(" · ");
  };
  const refresh = async () => {
    try {
      // (from location.origin: a page opened as http://user:token@host/ may not fetch a URL
      // that carries credentials, which a relative one would; the browser adds them itself)
      const url = location.origin + "/api/status?connections=PAGE_CONNECTIONS";
      const response = await fetch(url, { cache: "no-store" });
      if (!response.ok) throw new Error("HTTP " + response.status);
      render(await response.json());
    } catch (error) {
      document.getElementById("updated").textContent = "refresh failed (" + error.message + "); retrying";
    }
  };
  setInterval(refresh, 2000);
})();
""".replace("PAGE_CONNECTIONS", str(PAGE_CONNECTIONS))


def _csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


#: Nothing runs or loads but the page's own script and style (matched by hash), and the
#: script may fetch from this listener only.
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; script-src {_csp_hash(_SCRIPT)}; style-src {_csp_hash(_STYLE)}; "
    "connect-src 'self'; img-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

#: Headers of the page and the JSON: never cached, never framed, the token never sent along.
SECURITY_HEADERS = (
    ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)


def _bytes_cell(count: int) -> str:
    return f'<td class="n" data-bytes="{count}" title="{count} bytes">{html.escape(human_bytes(count))}</td>'


def page(relay: Relay) -> bytes:
    """The admin page, rendered now (the script refreshes it in place)."""
    answer = status(relay, PAGE_CONNECTIONS)
    facts, e = answer["relay"], html.escape
    summary = (
        f"{facts['tunnels']} tunnels · {facts['sessions']} sessions · {facts['connections_open']} connections open"
        f" · up {human_age(facts['uptime'])}" + (" · draining" if facts["draining"] else "")
    )
    tunnel_rows, connection_rows = [], []
    hidden = 0
    for t in answer["tunnels"]:
        tid = e(t["id"])
        tunnel_rows.append(
            f'<tr data-tunnel="{tid}"><td>{tid}</td><td>{e(t["kind"])}</td><td>{e(t["tenant"] or "-")}</td>'
            f'<td class="n">{t["connections_open"]}/{t["connections_total"]}</td>'
            f"{_bytes_cell(t['bytes_in'])}{_bytes_cell(t['bytes_out'])}"
            f'<td class="n">{e(human_age(t["age"]))}</td></tr>'
        )
        hidden += t["connections_left_out"]
        for c in t["connections"]:
            connection_rows.append(
                f'<tr data-tunnel="{tid}"><td>{tid}</td><td>{e(c["client"])}</td>'
                f"{_bytes_cell(c['bytes_in'])}{_bytes_cell(c['bytes_out'])}"
                f'<td class="n">{e(human_age(c["age"]))}</td></tr>'
            )
    left_out = []
    if answer["tunnels_left_out"]:
        left_out.append(f"{answer['tunnels_left_out']} more tunnels not listed")
    if hidden:
        left_out.append(f"{hidden} more connections not listed")
    document = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>burrow relay {e(facts["domain"])}</title><style>{_STYLE}</style></head>
<body data-refreshes="0">
<h1>burrow relay <code>{e(facts["domain"])}</code></h1>
<p id="summary">{e(summary)}</p>
<p id="updated">as the relay rendered it (the page refreshes itself every 2 s when JavaScript runs)</p>
<h2>Tunnels</h2>
<table id="tunnels"><thead><tr><th>id</th><th>kind</th><th>tenant</th><th>connections open/total</th>
<th>in</th><th>out</th><th>age</th></tr></thead><tbody id="tunnels-body">{"".join(tunnel_rows)}</tbody></table>
<h2>Open connections</h2>
<table id="connections"><thead><tr><th>tunnel</th><th>client</th><th>in</th><th>out</th><th>age</th></tr></thead>
<tbody id="connections-body">{"".join(connection_rows)}</tbody></table>
<p id="left-out">{e(" · ".join(left_out))}</p>
<script>{_SCRIPT}</script>
</body></html>
"""
    return document.encode()
