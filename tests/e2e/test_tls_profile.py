"""The TLS edge as a third-party scanner sees it: Mozilla's "intermediate" profile.

testssl.sh (Debian's) scans the relay's port twice, as an agent's name
(``localhost``) and as a tunnel's (``<id>.localhost``): TLS 1.2 and 1.3
only, and only AEAD suites with forward secrecy; an ``h2`` tunnel offers
ALPN ``h2`` (the agent endpoint's ``burrow/1`` is tested by the agent tests).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import burrow
from burrow.agent.runtime import runtime

from ..helpers import EchoServer

AEAD = ("GCM", "CHACHA20", "POLY1305")


def _scan(host: str, port: int, out: Path) -> dict[str, str]:
    report = out / f"{host}-{port}.json"
    subprocess.run(
        [
            "testssl",
            "--quiet",
            "--color",
            "0",
            "--warnings",
            "off",
            "--ip",
            "127.0.0.1",
            "-p",
            "-E",
            "-P",
            "--jsonfile",
            str(report),
            f"{host}:{port}",
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )
    return {entry["id"]: entry["finding"] for entry in json.loads(report.read_text())}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_tls_edge_meets_the_intermediate_profile(echo: EchoServer, tmp_path: Path) -> None:
    with burrow.forward(echo.port, h2=True) as tunnel:
        shared = runtime().embedded.port  # type: ignore[union-attr]
        # the agent endpoint, a tunnel by name on the shared port, and the tunnel's own
        # loopback port (https://localhost:PORT, native engine) when it has one
        scans = [("localhost", shared, False), (f"{tunnel.id}.localhost", shared, True)]
        if tunnel.port != shared:
            scans.append(("localhost", tunnel.port, True))
        for host, port, is_tunnel in scans:
            findings = _scan(host, port, tmp_path)
            offered = {name: findings.get(name, "") for name in ("SSLv2", "SSLv3", "TLS1", "TLS1_1")}
            assert all(f.startswith("not offered") for f in offered.values()), (host, offered)
            assert findings["TLS1_2"].startswith("offered") and findings["TLS1_3"].startswith("offered"), host
            suites = {k: v for k, v in findings.items() if k.startswith(("cipher-tls1_2_", "cipher-tls1_3_"))}
            assert suites, f"no cipher suite found for {host}"
            weak = [v.split()[-1] for v in suites.values() if not any(a in v.split()[-1] for a in AEAD)]
            assert weak == [], (host, weak)
            assert all("ECDH" in v for k, v in suites.items() if k.startswith("cipher-tls1_2_")), host
            if is_tunnel:  # (testssl.sh's ALPN probe asks for HTTP protocols only)
                assert "h2" in findings.get("ALPN_HTTP2", "") + findings.get("ALPN", ""), findings
