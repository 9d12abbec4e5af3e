"""Settings of a fleet: relay lists, relays files, failover_after; bad ones are one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import burrow
from burrow.agent.config import FAILOVER_AFTER, AgentSettings, RelayAddress, parse_relays
from burrow.agent.fleet import MAX_FILE_BYTES, MAX_RELAYS, Listed, read_relays_file
from burrow.errors import ConfigurationError


def test_a_list_of_relays_is_a_fleet_and_one_relay_is_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BURROW_RELAY", "r1.example.com, r2.example.com:8443")
    fleet = AgentSettings.resolve()
    assert fleet.is_fleet and fleet.relay is None
    assert fleet.fleet == (RelayAddress("r1.example.com", 443), RelayAddress("r2.example.com", 8443))
    assert fleet.failover_after == FAILOVER_AFTER
    one = AgentSettings.resolve("r1.example.com")
    assert not one.is_fleet and one.relay == RelayAddress("r1.example.com", 443)
    monkeypatch.setenv("BURROW_FAILOVER_AFTER", "5")
    assert AgentSettings.resolve().failover_after == 5.0
    assert AgentSettings.resolve(failover_after=2).failover_after == 2.0


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("r1.example.com,,r2.example.com", "has an empty item"),
        ("r1.example.com,", "has an empty item"),
        ("r1.example.com,r1.example.com:443", "names a relay twice"),
        ("r1.example.com,r2.example.com:99999", "has a bad port"),
        ("r1.example.com,10.0.0.1", "is an IP address"),
        ("r1..example.com,r2.example.com", "is not a valid DNS name"),
        ("r2.example.com," + "a" * 64 + ".example.com", "is not a valid DNS name"),
    ],
)
def test_a_bad_relay_list_says_what_to_write(text: str, says: str) -> None:
    with pytest.raises(ConfigurationError, match=says) as raised:
        parse_relays(text, "BURROW_RELAY")
    assert "\n" not in str(raised.value)


@given(st.text(max_size=200))
def test_any_relay_list_parses_or_is_a_configuration_error(text: str) -> None:
    try:
        relays = parse_relays(text)
    except ConfigurationError as exc:
        assert "\n" not in str(exc)
    else:
        assert relays and len(set(relays)) == len(relays)


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        (
            "relays.toml",
            '[[relay]]\naddress = "r1.example.com"\nregion = "eu"\n[[relay]]\naddress = "r2.example.com:8443"\n',
            [Listed(RelayAddress("r1.example.com"), "eu"), Listed(RelayAddress("r2.example.com", 8443))],
        ),
        (
            "relays.json",
            json.dumps({"relays": [{"address": "r1.example.com", "region": "us"}, "r2.example.com:8443"]}),
            [Listed(RelayAddress("r1.example.com"), "us"), Listed(RelayAddress("r2.example.com", 8443))],
        ),
        ("relays.json", '["r1.example.com"]', [Listed(RelayAddress("r1.example.com"))]),
    ],
)
def test_relays_files_in_toml_and_json(tmp_path: Path, name: str, content: str, expected: list[Listed]) -> None:
    path = tmp_path / name
    path.write_text(content)
    assert read_relays_file(path) == expected


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        ("relays.toml", "[[relay]\n", "is not TOML"),
        ("relays.json", "{", "is not JSON"),
        ("relays.toml", "", "lists no relay"),
        ("relays.json", '{"relays": []}', "lists no relay"),
        ("relays.toml", '[[relay]]\nregion = "eu"\n', "relay 1 needs address"),
        ("relays.json", '[{"address": 7}]', "relay 1 needs address"),
        ("relays.json", '["r1.example.com", "r1.example.com:443"]', "names a relay twice"),
        ("relays.json", json.dumps([f"r{i}.example.com" for i in range(MAX_RELAYS + 1)]), "at most"),
        ("relays.json", " " * (MAX_FILE_BYTES + 1), "larger than"),
        ("relays.json", '["r1.example.com:0"]', "relay 1"),
        ("relays.toml", b"\xff\xfe", "is not TOML"),
    ],
)
def test_a_bad_relays_file_is_one_line(tmp_path: Path, name: str, content: str | bytes, says: str) -> None:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigurationError, match=says) as raised:
        read_relays_file(path)
    assert "\n" not in str(raised.value) and str(path) in str(raised.value)


def test_the_environment_names_a_list_or_a_file_not_both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "relays.toml"
    path.write_text('[[relay]]\naddress = "r1.example.com"\n')
    monkeypatch.setenv("BURROW_RELAYS_FILE", str(path))
    settings = AgentSettings.resolve()
    assert settings.is_fleet and settings.relays_file == path and settings.fleet == ()
    monkeypatch.setenv("BURROW_RELAY", "r1.example.com")
    with pytest.raises(ConfigurationError, match="both set; unset one"):
        AgentSettings.resolve()
    monkeypatch.delenv("BURROW_RELAY")
    monkeypatch.setenv("BURROW_RELAYS_FILE", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigurationError, match="is not a file"):
        AgentSettings.resolve()


def test_a_relays_file_that_is_bad_at_first_use_fails_the_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "relays.toml"
    path.write_text("not toml at all [")
    monkeypatch.setenv("BURROW_RELAYS_FILE", str(path))
    with pytest.raises(ConfigurationError, match="is not TOML"):
        burrow.forward(1).open()


@pytest.mark.parametrize("value", [0, -1, float("inf"), float("nan"), True, "30"])
def test_failover_after_must_be_positive_seconds(value: object, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigurationError, match="failover_after"):
        burrow.forward(1, relay="r1.example.com,r2.example.com", failover_after=value)  # type: ignore[arg-type]
    if not isinstance(value, bool | str):
        monkeypatch.setenv("BURROW_FAILOVER_AFTER", str(value))
        with pytest.raises(ConfigurationError, match="BURROW_FAILOVER_AFTER"):
            AgentSettings.resolve()
