"""Who may use the relay, and how much: tokens, tenants, and the caps on sessions and new tunnels.

Sans-I/O: :class:`Admission` answers the control plane's questions (may this
HELLO in? may this session open a new tunnel?) and keeps the counts behind
the answers, each bounded by the sessions that exist. A *principal* owns
tunnels, tickets and quotas: a plain token's fingerprint, or a tenant (every
token of it) for signed tokens.
"""

from __future__ import annotations

import hmac
import time
from collections import Counter, deque
from dataclasses import dataclass

from .config import RelayConfig
from .tickets import token_fingerprint
from .tokens import CLOCK_SKEW, Revocations, Tenant, TokenInvalid, TokenSigner, is_signed

#: The window of --max-tunnels-per-minute, in seconds.
CREATION_WINDOW = 60.0


@dataclass(frozen=True)
class Refusal:
    """Why a HELLO or a new tunnel is refused: for the agent and the (rate-limited) log."""

    reason: str
    auth: bool  # a token problem (AUTH_FAILED), else a cap (LIMIT)


@dataclass(frozen=True)
class Admitted:
    """A welcomed session's standing."""

    principal: str
    tenant: Tenant | None
    source: str  # the agent's address, without port


class Admission:
    """Tokens checked, sessions counted per principal and per source, new tunnels counted per minute."""

    def __init__(self, config: RelayConfig, signed: TokenSigner | None = None) -> None:
        self.config = config
        self.signed = signed  # tenant tokens are taken when set (--token-secret)
        self.revocations = Revocations(config.revoked)
        self._tokens = [t.encode() for t in config.tokens]
        self.sessions: dict[str, Admitted] = {}  # session id -> its standing, once welcomed
        self._per_principal: Counter[str] = Counter()
        self._per_source: Counter[str] = Counter()
        self._created: dict[str, deque[float]] = {}  # principal -> when it opened its latest new tunnels

    def authenticate(self, token: str) -> tuple[str, Tenant | None]:
        """Who ``token`` speaks for and its tenant, if signed; :class:`TokenInvalid` if refused.
        With no token configured at all, anyone is let in."""
        if self.signed is not None and is_signed(token):
            tenant = self.signed.verify(token)
            if tenant.token_id in self.revocations:
                raise TokenInvalid("token revoked")
            return tenant.principal, tenant
        if self._tokens or self.signed is not None:
            given = token.encode()
            # (every configured token is compared, in constant time: no early exit tells how close a guess was)
            if not sum(hmac.compare_digest(given, t) for t in self._tokens):
                raise TokenInvalid("wrong token")
        return token_fingerprint(token), None

    def hello(self, session_id: str, token: str, peer: str) -> Admitted | Refusal:
        """Admit a session (counted until :meth:`closed`), or say why not."""
        try:
            principal, tenant = self.authenticate(token)
        except TokenInvalid as exc:
            return Refusal(str(exc), auth=True)
        source = source_of(peer)
        if self._per_principal[principal] >= self.config.max_sessions_per_token:
            who = f"tenant {tenant.name}" if tenant is not None else "this token"
            return Refusal(f"{who} has {self.config.max_sessions_per_token} sessions at this relay (the limit)", False)
        if self._per_source[source] >= self.config.max_sessions_per_source:
            return Refusal(
                f"{self.config.max_sessions_per_source} sessions come from {source} already (the limit)", False
            )
        admitted = self.sessions[session_id] = Admitted(principal, tenant, source)
        self._per_principal[principal] += 1
        self._per_source[source] += 1
        return admitted

    def closed(self, session_id: str) -> Admitted | None:
        """A session ended: its places are free again."""
        admitted = self.sessions.pop(session_id, None)
        if admitted is not None:
            _release(self._per_principal, admitted.principal)
            _release(self._per_source, admitted.source)
        return admitted

    def new_tunnel(self, admitted: Admitted, held: int, resumed: bool) -> str | None:
        """Why ``admitted``, holding ``held`` tunnels here, may not open one more; None: it may (then
        :meth:`opened` counts it). A resumed tunnel is not a new one: a reconnect storm must not lock a
        tenant out (a resume needs a ticket of a tunnel the principal opened, and still counts as held)."""
        tenant = admitted.tenant
        who = f"tenant {tenant.name}" if tenant is not None else "this token"
        limit = self.config.max_tunnels_per_token
        if tenant is not None and tenant.max_tunnels is not None:
            limit = min(limit, tenant.max_tunnels)
        if held >= limit:
            return f"{who} has {held} tunnels at this relay (the limit); close some first"
        if resumed:
            return None
        created = self._created.setdefault(admitted.principal, deque())
        now = time.monotonic()
        while created and now - created[0] > CREATION_WINDOW:
            created.popleft()
        if len(created) >= self.config.max_tunnels_per_minute:
            return f"{who} opened {len(created)} tunnels in the last minute (the limit); try again in a minute"
        return None

    def opened(self, admitted: Admitted) -> None:
        """A new tunnel of ``admitted``'s opened: counted toward the minute's cap."""
        self._created.setdefault(admitted.principal, deque()).append(time.monotonic())

    def sweep(self) -> list[tuple[str, Admitted, str]]:
        """Sessions to close now, with why (their token revoked or expired); old counts forgotten."""
        self.revocations.refresh()
        now = time.time()
        ending = []
        for session_id, admitted in self.sessions.items():
            tenant = admitted.tenant
            if tenant is None:
                continue
            if tenant.token_id in self.revocations:
                ending.append((session_id, admitted, "token revoked"))
            elif tenant.expires is not None and now > tenant.expires + CLOCK_SKEW:
                ending.append((session_id, admitted, "token expired"))
        since = time.monotonic() - CREATION_WINDOW
        for principal, created in list(self._created.items()):
            if not created or created[-1] < since:
                del self._created[principal]
        return ending


def source_of(peer: str) -> str:
    """The address of ``peer`` ("203.0.113.5:4711" or "[2001:db8::5]:4711"), without its port."""
    return peer.rpartition(":")[0].strip("[]") or peer


def _release(counts: Counter[str], key: str) -> None:
    """One less for ``key``; a key at zero is dropped, so the counter holds only live ones."""
    counts[key] -= 1
    if counts[key] <= 0:
        del counts[key]
