"""Signed tenant tokens and the revocation list, without sockets."""

from __future__ import annotations

import os
import string
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from burrow.relay.tickets import b64, unb64
from burrow.relay.tokens import CLOCK_SKEW, PREFIX, Revocations, TokenInvalid, TokenSigner

SECRET = b"s" * 32
NOW = 1_800_000_000.0


def test_a_token_vouches_for_its_tenant_and_quotas() -> None:
    token, issued = TokenSigner(SECRET).issue("acme", 3600, max_tunnels=5, max_connections=100, now=NOW)
    tenant = TokenSigner(SECRET).verify(token, now=NOW + 10)  # another relay holding the same secret
    assert tenant == issued
    assert (tenant.name, tenant.expires, tenant.max_tunnels, tenant.max_connections) == ("acme", NOW + 3600, 5, 100)
    assert len(tenant.token_id) == 16
    # every token of a tenant speaks for the same principal; another tenant's never does
    again, _ = TokenSigner(SECRET).issue("acme", None, now=NOW)
    other, _ = TokenSigner(SECRET).issue("globex", None, now=NOW)
    principals = {TokenSigner(SECRET).verify(t, now=NOW).principal for t in (token, again, other)}
    assert len(principals) == 2


def test_tampered_foreign_and_expired_tokens_are_refused_with_a_reason() -> None:
    signer = TokenSigner(SECRET)
    token, _ = signer.issue("acme", 3600, max_tunnels=5, now=NOW)
    payload, mac = token[len(PREFIX) :].split(".")
    raised = unb64(payload).replace(b'"mt":5', b'"mt":9')  # more tunnels, same signature
    forged = ("B" if mac[0] == "A" else "A") + mac[1:]  # a first character's 6 bits all count
    alphabet = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
    respelled = mac[:-1] + alphabet[alphabet.index(mac[-1]) | 1]  # 43rd character: 2 unused bits; same MAC
    for bad, reason in (
        (f"{PREFIX}{b64(raised)}.{mac}", "not signed with this relay's secret"),
        (f"{PREFIX}{payload}.{forged}", "not signed with this relay's secret"),
        (f"{PREFIX}{payload}.{respelled}", "malformed token"),
        (TokenSigner(b"t" * 32).issue("acme", 3600, now=NOW)[0], "not signed with this relay's secret"),
        (f"{PREFIX}{payload}", "malformed token"),
        ("plain-shared-token", "not a signed token"),
        (PREFIX + "x" * 2000, "not a signed token"),
    ):
        with pytest.raises(TokenInvalid, match=reason):
            signer.verify(bad, now=NOW)
    assert signer.verify(token, now=NOW + 3600 + CLOCK_SKEW).name == "acme"  # a clock a little behind: still fine
    with pytest.raises(TokenInvalid, match="token expired"):
        signer.verify(token, now=NOW + 3600 + CLOCK_SKEW + 1)


def test_tenant_names_are_plain_words() -> None:
    for bad in ("", "Acme", "a b", "a\nb", "-x", "x" * 64, "é"):
        with pytest.raises(ValueError, match="is not a name"):
            TokenSigner(SECRET).issue(bad, None)


@given(st.text(max_size=300))
def test_any_text_is_a_token_or_refused_never_a_crash(text: str) -> None:
    with pytest.raises(TokenInvalid):
        TokenSigner(SECRET).verify(text)


@given(st.binary(max_size=200), st.binary(max_size=40))
def test_any_signed_looking_token_is_refused_unless_ours(payload: bytes, mac: bytes) -> None:
    with pytest.raises(TokenInvalid):
        TokenSigner(SECRET).verify(f"{PREFIX}{b64(payload)}.{b64(mac)}")


def test_the_revocation_list_follows_its_file(tmp_path: Path) -> None:
    path = tmp_path / "revoked"
    revoked = Revocations(path)
    assert not revoked.refresh() and "abc" not in revoked  # no file yet: nobody revoked
    path.write_text("# revoked 2026-12-05\nabc\n\n  def  # a comment\n")
    assert revoked.refresh() and "abc" in revoked and "def" in revoked and "# revoked 2026-12-05" not in revoked
    assert not revoked.refresh()  # unchanged: not read again
    path.write_text("def\n")
    os.utime(path, ns=(1, 1))  # (a change within the same mtime tick is still seen: size, inode)
    assert revoked.refresh() and "abc" not in revoked and "def" in revoked
    path.write_bytes(b"\xff\xfe")  # unreadable: the last good list stays in force
    assert not revoked.refresh() and "def" in revoked
    path.unlink()
    assert not revoked.refresh() and "def" in revoked
