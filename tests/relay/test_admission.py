"""Admission without sockets: tokens, the caps on sessions and new tunnels, and counts that stay bounded."""

from __future__ import annotations

from pathlib import Path

import pytest

from burrow.relay import RelayConfig
from burrow.relay import admission as admission_module
from burrow.relay.admission import Admission, Admitted, Refusal
from burrow.relay.tokens import TokenSigner

SECRET = b"k" * 32


def test_sessions_are_counted_per_principal_and_source_and_forgotten_when_closed() -> None:
    gate = Admission(RelayConfig(max_sessions_per_token=3, max_sessions_per_source=2))
    answers = [gate.hello(f"s{n}", "", f"10.0.0.{n // 2}:{4000 + n}") for n in range(5)]
    assert [isinstance(a, Admitted) for a in answers] == [True, True, True, False, False]
    assert answers[3] == Refusal("this token has 3 sessions at this relay (the limit)", auth=False)
    assert gate.hello("s9", "", "[2001:db8::1]:5") == Refusal(
        "this token has 3 sessions at this relay (the limit)", False
    )
    for n in range(3):
        gate.closed(f"s{n}")
    assert gate.closed("s0") is None  # (twice is harmless)
    # everything a peer made us count is gone with its sessions
    assert gate.sessions == {} and not gate._per_principal and not gate._per_source
    assert isinstance(gate.hello("again", "", "10.0.0.1:1"), Admitted)


def test_tokens_plain_and_signed(tmp_path: Path) -> None:
    signer = TokenSigner(SECRET)
    revoked = tmp_path / "revoked"
    gate = Admission(RelayConfig(tokens=frozenset({"shared"}), revoked=revoked), signer)
    assert isinstance(gate.hello("a", "shared", "10.0.0.1:1"), Admitted)
    assert gate.hello("b", "guess", "10.0.0.1:2") == Refusal("wrong token", auth=True)
    token, tenant = signer.issue("acme", None)
    admitted = gate.hello("c", token, "10.0.0.1:3")
    assert isinstance(admitted, Admitted) and admitted.tenant == tenant and admitted.principal == tenant.principal
    revoked.write_text(tenant.token_id + "\n")
    assert [(s, reason) for s, _, reason in gate.sweep()] == [("c", "token revoked")]
    assert gate.hello("d", token, "10.0.0.1:4") == Refusal("token revoked", auth=True)
    # with no token configured, anyone is let in (the loopback dev relay)
    assert isinstance(Admission(RelayConfig()).hello("e", "anything", "127.0.0.1:1"), Admitted)


def test_new_tunnels_are_capped_per_minute_but_resumes_are_not(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(admission_module.time, "monotonic", lambda: clock[0])
    gate = Admission(RelayConfig(max_tunnels_per_minute=3, max_tunnels_per_token=5))
    admitted = gate.hello("s", "", "10.0.0.1:1")
    assert isinstance(admitted, Admitted)
    for _ in range(3):
        assert gate.new_tunnel(admitted, 0, resumed=False) is None
        gate.opened(admitted)
    assert gate.new_tunnel(admitted, 0, resumed=False) == (
        "this token opened 3 tunnels in the last minute (the limit); try again in a minute"
    )
    assert gate.new_tunnel(admitted, 0, resumed=True) is None  # a reconnect's resume still goes through
    assert (
        gate.new_tunnel(admitted, 5, resumed=True)
        == "this token has 5 tunnels at this relay (the limit); close some first"
    )
    clock[0] += 61
    assert gate.new_tunnel(admitted, 0, resumed=False) is None
    gate.opened(admitted)
    clock[0] += 61
    gate.sweep()
    assert gate._created == {}  # old creation times are forgotten
