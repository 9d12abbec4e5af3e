"""A relay's certificate must cover its domain (agents) and every ``<id>.<domain>`` (tunnels)."""

from __future__ import annotations

import pytest
import trustme

from burrow.certs import uncovered


@pytest.mark.parametrize(
    "names, missing",
    [
        (("r1.example.com", "*.r1.example.com"), None),
        (("*.r1.example.com", "R1.Example.COM"), None),
        (("r1.example.com",), ["*.r1.example.com"]),
        (("*.r1.example.com",), ["r1.example.com"]),
        (("*.example.com",), ["*.r1.example.com"]),  # a wildcard covers one label, not two
        (("other.example.com", "*.other.example.com"), ["r1.example.com", "*.r1.example.com"]),
    ],
)
def test_the_names_a_relay_certificate_lacks(names: tuple[str, ...], missing: list[str] | None) -> None:
    pem = trustme.CA().issue_cert(*names).cert_chain_pems[0].bytes()
    found = uncovered(pem, "r1.example.com")
    assert (found[0] if found else None) == missing
    if found:
        assert found[1] == [n.lower() for n in names]


def test_a_file_without_a_certificate_is_left_to_the_loader() -> None:
    assert uncovered(b"junk", "r1.example.com") is None
