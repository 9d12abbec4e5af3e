"""Signed tenant tokens: any relay holding the signing secret checks them, with no database.

``burrow token create --tenant NAME`` signs a token that names its tenant,
an expiry and the tenant's quotas; a relay started with ``--token-secret``
(the same file on every relay of a fleet) verifies it with HMAC-SHA256 in
constant time. A tenant, not a token, owns tunnels: resume tickets and quotas
follow the tenant, so a renewed token resumes the tenant's tunnels and two
tenants never touch each other's. Revoking is a line in a file (``--revoked``,
token ids), re-read when it changes; sessions of a revoked or expired token
are closed at once.

Format: ``"burrow1." base64url(json claims) "." base64url(hmac)``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from .tickets import b64, unb64

logger = logging.getLogger("burrow.relay")

PREFIX = "burrow1."
#: Tenant names appear in logs and metrics: one DNS-label-like word, nothing a log could misread.
TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
#: A token is ~200 characters; anything far longer is not one of ours.
MAX_TOKEN_LENGTH = 1024
#: Clocks of agents' relays differ a little; an expiry is honoured this much late.
CLOCK_SKEW = 60
#: The largest number a token may carry (quotas, an expiry in Unix time): what the native engine's
#: counters hold with room to spare, and far beyond any real quota.
MAX_CLAIM = 2**40
#: Token ids in a revocation file: every token ever revoked fits; a file beyond it is refused.
MAX_REVOKED = 1_000_000


class TokenInvalid(Exception):
    """The token cannot be honoured; the message says why, never what the token is."""


@dataclass(frozen=True)
class Tenant:
    """What a valid signed token vouches for."""

    name: str
    token_id: str  # what a revocation file names
    expires: int | None  # Unix time, or None: never
    max_tunnels: int | None = None
    max_connections: int | None = None

    @property
    def principal(self) -> str:
        """Who owns tunnels and quotas: the tenant (every token of it), a fingerprint like a plain token's."""
        # (its own hash prefix: no plain token's fingerprint can ever equal a tenant's)
        return hashlib.sha256(b"burrow-tenant\x00" + self.name.encode()).hexdigest()[:32]


def is_signed(token: str) -> bool:
    """True for a token of this module's shape (a plain shared token never starts so)."""
    return token.startswith(PREFIX)


class TokenSigner:
    """Signs and checks tenant tokens with one secret."""

    def __init__(self, secret: bytes) -> None:
        # a key of its own: the same file could never be mistaken for a ticket key's use
        self._key = hmac.new(secret, b"burrow tenant tokens v1", hashlib.sha256).digest()

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()

    def issue(
        self,
        tenant: str,
        ttl: float | None,
        max_tunnels: int | None = None,
        max_connections: int | None = None,
        now: float | None = None,
    ) -> tuple[str, Tenant]:
        """A token for ``tenant``, valid ``ttl`` seconds (None: until revoked), and what it vouches for."""
        if not TENANT_NAME.fullmatch(tenant):
            raise ValueError(f"tenant {tenant!r} is not a name of a-z, 0-9, '.', '_' and '-' (at most 63)")
        for name, value in (("max tunnels", max_tunnels), ("max connections", max_connections)):
            if value is not None and not 1 <= value <= MAX_CLAIM:
                raise ValueError(f"{name} {value} is not 1 to {MAX_CLAIM}")
        issued = int(now if now is not None else time.time())
        claims = Tenant(tenant, secrets.token_hex(8), issued + int(ttl) if ttl else None, max_tunnels, max_connections)
        body = {
            "ten": claims.name,
            "jti": claims.token_id,
            "iat": issued,
            "exp": claims.expires,
            "mt": claims.max_tunnels,
            "mc": claims.max_connections,
        }
        payload = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
        return f"{PREFIX}{b64(payload)}.{b64(self._mac(payload))}", claims

    def verify(self, token: str, now: float | None = None) -> Tenant:
        """The tenant of a genuine, unexpired token; else :class:`TokenInvalid`."""
        if len(token) > MAX_TOKEN_LENGTH or not is_signed(token):
            raise TokenInvalid("not a signed token")
        try:
            payload_text, mac_text = token[len(PREFIX) :].split(".")
            payload, mac = unb64(payload_text), unb64(mac_text)
        except (ValueError, TypeError):
            raise TokenInvalid("malformed token") from None
        if not hmac.compare_digest(mac, self._mac(payload)):
            raise TokenInvalid("token not signed with this relay's secret")
        try:
            body = json.loads(payload)
            name, token_id, expires = body["ten"], body["jti"], body["exp"]
            limits = body.get("mt"), body.get("mc")
        except (ValueError, KeyError, TypeError):
            raise TokenInvalid("malformed token") from None
        if not (isinstance(name, str) and TENANT_NAME.fullmatch(name) and isinstance(token_id, str)):
            raise TokenInvalid("malformed token")
        if not all(
            limit is None or (isinstance(limit, int) and 0 <= limit <= MAX_CLAIM) for limit in (*limits, expires)
        ):
            raise TokenInvalid("malformed token")
        if expires is not None and (now if now is not None else time.time()) > expires + CLOCK_SKEW:
            raise TokenInvalid("token expired")
        return Tenant(name, token_id, expires, *limits)


class Revocations:
    """Revoked token ids: a file, one id per line (``#`` comments), re-read whenever it changes.

    A file that cannot be read or parsed keeps the last good list in force
    (and says so once): a half-written file must not un-revoke anyone.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.ids: frozenset[str] = frozenset()
        self._seen: tuple[int, int, int] | None = None  # inode, size, mtime of what is loaded

    def __contains__(self, token_id: str) -> bool:
        return token_id in self.ids

    def refresh(self) -> bool:
        """Re-read the file if it changed; True when the list changed."""
        if self.path is None:
            return False
        try:
            stat = os.stat(self.path)
            seen = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
            if seen == self._seen:
                return False
            lines = self.path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            if self._seen != (0, 0, 0):
                logger.warning("revocation list %s unreadable (%s); the last one read stays in force", self.path, exc)
                self._seen = (0, 0, 0)
            return False
        ids = {line.split("#", 1)[0].strip() for line in lines} - {""}
        if len(ids) > MAX_REVOKED:
            logger.warning(
                "revocation list %s has over %d ids; the last one read stays in force", self.path, MAX_REVOKED
            )
            self._seen = seen
            return False
        self._seen = seen
        changed = ids != self.ids
        self.ids = frozenset(ids)
        if changed:
            logger.info("revocation list %s: %d token ids", self.path, len(ids))
        return changed
