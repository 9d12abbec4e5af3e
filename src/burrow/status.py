"""``burrow status``: a relay's tunnels, read from its admin listener (``burrow relay --metrics``).

The relay answers ``GET /api/status`` with JSON (``burrow.relay.admin``); this
module fetches it (with the admin token as a Bearer header when one is given)
and prints it as a table, or as it came (``--json``). Every failure is one
line saying what to do, never a traceback.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .errors import ConfigurationError, RelayUnavailable

#: Where ``burrow status`` looks when neither ``--admin`` nor ``BURROW_ADMIN`` says.
DEFAULT_ADMIN = "http://127.0.0.1:9090"

#: A relay's admin listener answers at once (it reads counters); one that does not is stuck.
ADMIN_TIMEOUT = 10.0

#: The most of an answer read (a relay lists at most 1,000 tunnels and 10,000 connections).
MAX_ANSWER = 32 * 1024 * 1024


def human_bytes(count: float) -> str:
    """``0 B``, ``999 B``, ``1.2 kB``, ``34.0 MB`` (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def human_age(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``, ``3d04h``."""
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def admin_token(token_file: Path | None) -> str | None:
    """The admin token: ``--token-file``, else ``BURROW_ADMIN_TOKEN``, else none."""
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or "not text"
            raise ConfigurationError(f"cannot read --token-file {token_file} ({reason.lower()})") from None
        if not token:
            raise ConfigurationError(f"--token-file {token_file} is empty")
        return token
    return os.environ.get("BURROW_ADMIN_TOKEN", "").strip() or None


def fetch_status(admin: str, token: str | None) -> dict[str, Any]:
    """The relay's ``/api/status`` answer; one-line errors (:class:`RelayUnavailable`, :class:`ConfigurationError`)."""
    base = admin.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise ConfigurationError(f"--admin {admin} is not a URL; give one like {DEFAULT_ADMIN}")
    request = urllib.request.Request(base + "/api/status", headers={"Accept": "application/json"})
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=ADMIN_TIMEOUT) as response:
            body = response.read(MAX_ANSWER)
    except urllib.error.HTTPError as exc:
        hint = exc.read(512).decode(errors="replace").strip().splitlines()
        said = f": {hint[0]}" if hint else ""
        if exc.code == 401:
            raise ConfigurationError(
                f"the relay at {base} wants its admin token{said}; pass --token-file FILE or set BURROW_ADMIN_TOKEN"
            ) from None
        if exc.code == 403:
            raise ConfigurationError(f"the relay at {base} refused{said}") from None
        if exc.code == 404:
            raise ConfigurationError(
                f"{base} has no /api/status (an older relay, or not a burrow relay's --metrics listener)"
            ) from None
        raise RelayUnavailable(f"the relay at {base} answered HTTP {exc.code}{said}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        reason = getattr(reason, "strerror", None) or str(reason)
        raise RelayUnavailable(
            f"cannot reach a relay's admin listener at {base} ({reason.lower()}); start the relay with "
            "--metrics HOST:PORT and pass --admin http://HOST:PORT (or set BURROW_ADMIN)"
        ) from None
    try:
        status = json.loads(body)
    except ValueError:
        raise RelayUnavailable(f"{base}/api/status did not answer JSON (is it a burrow relay?)") from None
    if not isinstance(status, dict) or not isinstance(status.get("tunnels"), list):
        raise RelayUnavailable(f"{base}/api/status answered JSON of another shape (is it a burrow relay?)")
    return status


#: The table's columns: heading, and how a tunnel's value is shown.
_COLUMNS = ("ID", "KIND", "TENANT", "CONNECTIONS", "IN", "OUT", "AGE")


def _row(tunnel: dict[str, Any]) -> tuple[str, ...]:
    return (
        str(tunnel.get("id", "")),
        str(tunnel.get("kind", "")),
        str(tunnel.get("tenant") or "-"),
        f"{tunnel.get('connections_open', 0)}/{tunnel.get('connections_total', 0)}",
        human_bytes(float(tunnel.get("bytes_in", 0))),
        human_bytes(float(tunnel.get("bytes_out", 0))),
        human_age(float(tunnel.get("age", 0))),
    )


def format_status(status: dict[str, Any]) -> str:
    """The relay's facts in one line, then its tunnels as a table."""
    relay = status.get("relay", {})
    lines = [
        f"relay {relay.get('domain', '?')} ({relay.get('engine', '?')} engine"
        + (", draining" if relay.get("draining") else "")
        + f"), up {human_age(float(relay.get('uptime', 0)))}: {relay.get('sessions', 0)} sessions, "
        f"{relay.get('tunnels', 0)} tunnels, {relay.get('connections_open', 0)} connections open"
    ]
    rows = [_COLUMNS, *(_row(t) for t in status["tunnels"])]
    if len(rows) == 1:
        return "\n".join([*lines, "no tunnels open"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    numeric = {3, 4, 5, 6}  # right-aligned
    for row in rows:
        cells = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    left_out = status.get("tunnels_left_out", 0)
    if left_out:
        lines.append(f"... and {left_out} more tunnels (--json lists the same; the relay lists at most 1000)")
    return "\n".join(lines)
