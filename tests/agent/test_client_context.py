"""The agent's TLS client context: ASCII host names skip the IDNA codec, and are still verified."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

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


#: The client of the test below: one TLS echo through ClientContext, then one through a plain
#: SSLContext (the control: it must import the codec), each time saying whether the codec is loaded.
CLIENT = """
import asyncio, ssl, sys
from burrow.agent.config import ClientContext
from burrow.agent.runtime import new_event_loop

async def echo(context):
    reader, writer = await asyncio.open_connection("127.0.0.1", int(sys.argv[2]), ssl=context,
                                                   server_hostname="relay.example")
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"ping"
    writer.close()
    return "encodings.idna" in sys.modules

async def main():
    for kind in (ClientContext, ssl.SSLContext):
        context = kind(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(sys.argv[1])
        print(kind.__name__, await echo(context))

new_event_loop().run_until_complete(main())
"""


@pytest.mark.parametrize("loop", sorted(RUNNERS))
def test_a_connection_on_either_loop_leaves_the_codec_unloaded(loop: str, tmp_path: Path) -> None:
    """The loops (not just wrap_bio called by hand) go through the override: asyncio and uvloop."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("relay.example").configure_cert(server_context)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:  # the server lives here, not in the client's process
        for _ in range(2):
            conn, _ = listener.accept()
            with server_context.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(tls.recv(4))

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    env = {**os.environ, "BURROW_LOOP": loop}
    result = subprocess.run(
        [sys.executable, "-c", CLIENT, str(tmp_path / "ca.pem"), str(port)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    listener.close()
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ClientContext", "False", "SSLContext", "True"]


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
