"""The agent's TLS client context: ASCII host names skip the IDNA codec, and are still verified."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys

import pytest
import trustme

from burrow.agent.config import ClientContext

from ..helpers import RUNNERS


def test_an_ascii_name_does_not_import_the_idna_codec() -> None:
    """The codec import is 2.5–5 ms of a cold forward(); a non-ASCII name still gets IDNA-encoded."""
    code = (
        "import ssl, sys\n"
        "from burrow.agent.config import ClientContext\n"
        "ctx = ClientContext(ssl.PROTOCOL_TLS_CLIENT)\n"
        "obj = ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname='relay.example')\n"
        "print(obj.server_hostname, 'encodings.idna' in sys.modules)\n"
        "obj = ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname='b\\u00fccher.example')\n"
        "print(obj.server_hostname)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["relay.example", "False", "xn--bcher-kva.example"]


@pytest.mark.parametrize("loop", sorted(RUNNERS))
def test_the_name_is_sent_and_verified(loop: str) -> None:
    """SNI carries the name, and a certificate for another name is refused, on both loops."""
    ca = trustme.CA()
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("relay.example").configure_cert(server_context)
    seen: list[str | None] = []

    def record(sslobj: ssl.SSLObject, name: str | None, context: ssl.SSLContext) -> None:
        seen.append(name)

    server_context.sni_callback = record
    client_context = ClientContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client_context)

    async def main() -> None:
        class Echo(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def data_received(self, data: bytes) -> None:
                self.transport.write(data)  # type: ignore[attr-defined]

        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, "127.0.0.1", 0, ssl=server_context)
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_context, server_hostname="relay.example"
            )
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            writer.close()
            with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
                await asyncio.open_connection("127.0.0.1", port, ssl=client_context, server_hostname="other.example")
        finally:
            server.close()

    RUNNERS[loop](main())
    assert seen[:2] == ["relay.example", "other.example"]
