"""The native ClientHello peeker against real ClientHellos: OpenSSL's, made by Python's ``ssl``.

The relay's TLS port routes by the name and the ALPN a client asks for. The
peeker (``native/src/sni.rs``) must read them from what real clients send,
whole or cut anywhere, and refuse what is not a ClientHello without a
certificate ever being chosen. Its hostile-input properties are cargo tests.
"""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from burrow import _native


def client_hello(server_name: str | None, alpn: list[str], version: ssl.TLSVersion) -> bytes:
    """The first bytes an OpenSSL client sends for these settings."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = context.maximum_version = version
    if alpn:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


labels = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=20)
# (a name of digits and dots is an IP literal, for which clients send no SNI)
names = st.lists(labels, min_size=1, max_size=4).map(".".join).filter(lambda n: any(c.isalpha() for c in n))
alpns = st.lists(st.sampled_from(["burrow/1+early", "burrow/1", "h2", "http/1.1", "x" * 40]), max_size=4, unique=True)
versions = st.sampled_from([ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])


@settings(max_examples=100, deadline=None)
@given(name=names, alpn=alpns, version=versions)
def test_the_peeker_reads_what_openssl_clients_ask_for(name: str, alpn: list[str], version: ssl.TLSVersion) -> None:
    hello = client_hello(name, alpn, version)
    assert _native.peek_client_hello(hello) == (name, [p.encode() for p in alpn])


@settings(max_examples=30, deadline=None)
@given(name=names, data=st.data())
def test_every_cut_of_a_real_hello_asks_for_more(name: str, data: st.DataObject) -> None:
    hello = client_hello(name, ["h2"], ssl.TLSVersion.TLSv1_3)
    cut = data.draw(st.integers(0, len(hello) - 1))
    assert _native.peek_client_hello(hello[:cut]) is None


def test_no_name_and_an_upper_case_name() -> None:
    assert _native.peek_client_hello(client_hello(None, [], ssl.TLSVersion.TLSv1_3)) == (None, [])
    assert _native.peek_client_hello(client_hello("ABC.LocalHost", [], ssl.TLSVersion.TLSv1_3)) == (
        "abc.localhost",
        [],
    )


@pytest.mark.parametrize(
    "first, reason",
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not a TLS handshake record"),
        (b"SSH-2.0-OpenSSH_9.2p1\r\n", "not a TLS handshake record"),
        (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", "not a ClientHello"),
        (b"\x16\x03\x01\x00\x04\x01\xff\xff\xff", "over the limit"),
    ],
)
def test_what_is_not_a_client_hello_is_refused_in_one_line(first: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        _native.peek_client_hello(first)
