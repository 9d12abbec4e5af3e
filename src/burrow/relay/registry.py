"""The control plane's one owner of tunnels: by id, by session, counted per token.

Every map the relay keeps about tunnels lives here and changes only through
:meth:`TunnelRegistry.add` and :meth:`TunnelRegistry.remove`, so they cannot
drift apart. Everything in it is bounded by the tunnels open now: nothing is
kept for a tunnel after it closes.
"""

from __future__ import annotations

import secrets
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

ID_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
#: 36**14 > 2**72: unguessable (the reference uses the same shape), and a DNS label.
ID_LENGTH = 14


def new_tunnel_id() -> str:
    """14 base36 characters from the OS CSPRNG."""
    value = secrets.randbelow(len(ID_ALPHABET) ** ID_LENGTH)
    chars = []
    for _ in range(ID_LENGTH):
        value, digit = divmod(value, len(ID_ALPHABET))
        chars.append(ID_ALPHABET[digit])
    return "".join(chars)


@dataclass(frozen=True, slots=True)
class TunnelRecord:
    """What the control plane knows of one open tunnel."""

    id: str
    host: str  # <id>.<domain>
    session_id: str  # the agent session that carries it
    token_fp: str  # fingerprint of the token that opened it (burrow.relay.tickets)
    local_port: int  # the agent's port, for logs
    h2: bool
    unencrypted: bool
    tcp_port: int | None
    tenant: str = ""  # the tenant of a signed token ("" for a plain token), for metrics
    opened: float = field(default_factory=time.monotonic)  # when this relay opened (or resumed) it: its age


class TunnelRegistry:
    """Open tunnels by id and by session, and how many each token holds."""

    def __init__(self) -> None:
        self._tunnels: dict[str, TunnelRecord] = {}
        self._by_session: dict[str, set[str]] = {}
        self._per_token: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._tunnels)

    def __iter__(self) -> Iterator[TunnelRecord]:
        return iter(list(self._tunnels.values()))

    def __contains__(self, tunnel_id: object) -> bool:
        return tunnel_id in self._tunnels

    def get(self, tunnel_id: str) -> TunnelRecord | None:
        """The open tunnel with this id, if any."""
        return self._tunnels.get(tunnel_id)

    def of_session(self, session_id: str) -> list[TunnelRecord]:
        """The tunnels a session carries."""
        return [self._tunnels[t] for t in self._by_session.get(session_id, ())]

    def count_for_token(self, token_fp: str) -> int:
        """How many tunnels the token's holders have open."""
        return self._per_token[token_fp]

    def add(self, record: TunnelRecord) -> None:
        """Register an open tunnel (its id must be free)."""
        if record.id in self._tunnels:
            raise KeyError(f"tunnel {record.id} is already registered")
        self._tunnels[record.id] = record
        self._by_session.setdefault(record.session_id, set()).add(record.id)
        self._per_token[record.token_fp] += 1

    def remove(self, tunnel_id: str) -> TunnelRecord | None:
        """Forget a tunnel; returns its record, or None if it was not open."""
        record = self._tunnels.pop(tunnel_id, None)
        if record is None:
            return None
        ids = self._by_session[record.session_id]
        ids.discard(tunnel_id)
        if not ids:
            del self._by_session[record.session_id]
        self._per_token[record.token_fp] -= 1
        if not self._per_token[record.token_fp]:
            del self._per_token[record.token_fp]
        return record
