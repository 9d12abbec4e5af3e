"""Resume tickets: how a tunnel keeps its id across reconnects and relay restarts.

With every BOUND the relay hands the agent a ticket: the tunnel's id and
shape, bound to the agent's token and the relay's domain, signed with the
relay's ticket key (HMAC-SHA256). An agent that reconnects, to the same
process or to a restarted one, presents the ticket in its BIND and gets the
same id back. No relay state has to survive the restart: only the key, kept
in a file. Only the holder of the same token can use a ticket.

Format: ``base64url(json claims) "." base64url(hmac)``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigurationError
from ..paths import write_private

#: A ticket older than this is refused: a day covers a laptop's night asleep.
TICKET_LIFETIME = 24 * 3600

KEY_FILE = "ticket.key"
KEY_BYTES = 32
#: A shorter key would make tickets guessable.
MIN_KEY_BYTES = 16


class TicketInvalid(Exception):
    """The ticket cannot be honoured; the message says why (no secrets in it)."""


@dataclass(frozen=True)
class Claims:
    """What a valid ticket vouches for."""

    tunnel_id: str
    unencrypted: bool
    h2: bool
    tcp_port: int | None
    tls_port: int | None = None  # a tunnel's own loopback TLS port (embedded relay)


def token_fingerprint(token: str) -> str:
    """A short, non-reversible name for a token (for tickets and per-token counts)."""
    return hashlib.sha256(b"burrow-token\x00" + token.encode()).hexdigest()[:32]


def load_or_create_key(path: Path, what: str = "ticket key", setting: str = "--ticket-key or BURROW_HOME") -> bytes:
    """A secret key (the relay's ticket key, a token secret), created once (mode 0600) so restarts keep it."""
    try:
        try:
            key = path.read_bytes()
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_private(path, secrets.token_bytes(KEY_BYTES))
            key = path.read_bytes()
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise ConfigurationError(f"cannot use {what} {path} ({reason}); check {setting}") from None
    if len(key) < MIN_KEY_BYTES:
        raise ConfigurationError(f"{what} {path} is shorter than {MIN_KEY_BYTES} bytes; delete it to make a new one")
    return key


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    """The bytes of :func:`b64`'s text, which is the only spelling accepted.

    Plain base64 decoding ignores a last character's unused bits and skips
    stray characters, so several strings would carry one signed value; a
    token or ticket has one spelling, or it is malformed (``ValueError``).
    """
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64(data) != text:
        raise ValueError("not canonical base64")
    return data


class TicketSigner:
    """Issues and checks tickets for one relay domain."""

    def __init__(self, key: bytes, domain: str) -> None:
        self._key = key
        self.domain = domain

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()

    def issue(self, token_fp: str, claims: Claims, now: float | None = None) -> str:
        """A ticket for ``claims``, usable only by the token whose fingerprint is ``token_fp``."""
        body = {
            "id": claims.tunnel_id,
            "d": self.domain,
            "tok": token_fp,
            "u": claims.unencrypted,
            "h2": claims.h2,
            "tcp": claims.tcp_port,
            "tls": claims.tls_port,
            "iat": int(now if now is not None else time.time()),
        }
        payload = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
        return f"{b64(payload)}.{b64(self._mac(payload))}"

    def verify(self, ticket: str, token_fp: str, now: float | None = None) -> Claims:
        """The claims of a genuine, fresh ticket for that token; else :class:`TicketInvalid`."""
        try:
            payload_text, mac_text = ticket.split(".")
            payload, mac = unb64(payload_text), unb64(mac_text)
        except (ValueError, TypeError):
            raise TicketInvalid("malformed ticket") from None
        if not hmac.compare_digest(mac, self._mac(payload)):
            raise TicketInvalid("ticket not signed by this relay")
        body = json.loads(payload)
        if body.get("d") != self.domain:
            raise TicketInvalid("ticket is for another relay domain")
        if not hmac.compare_digest(str(body.get("tok")), token_fp):
            raise TicketInvalid("ticket belongs to another token")
        age = (now if now is not None else time.time()) - int(body.get("iat", 0))
        if not -300 <= age <= TICKET_LIFETIME:
            raise TicketInvalid("ticket expired")
        tunnel_id = body.get("id")
        if not isinstance(tunnel_id, str):
            raise TicketInvalid("malformed ticket")
        tcp, tls = body.get("tcp"), body.get("tls")
        return Claims(
            tunnel_id,
            bool(body.get("u")),
            bool(body.get("h2")),
            tcp if isinstance(tcp, int) else None,
            tls if isinstance(tls, int) else None,
        )


def default_key_path(data_dir: Path) -> Path:
    """Where a relay keeps its ticket key unless told otherwise."""
    return data_dir / KEY_FILE


__all__ = ["Claims", "TicketInvalid", "TicketSigner", "default_key_path", "load_or_create_key", "token_fingerprint"]
