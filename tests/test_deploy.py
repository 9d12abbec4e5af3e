"""The operator guide and the deployment files (docs/operating.md, deploy/) against the code.

Nothing here starts a relay: the systemd unit goes through ``systemd-analyze``,
the Kubernetes manifests through kubernetes-validate (strict), the Containerfile
through a reading of its instructions, and every ``burrow`` command line they
and the guide give through burrow's own argument parser. Each check is also
shown to fail on a broken copy, so that a check that cannot fail goes noticed.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from burrow.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "operating.md"
UNIT = ROOT / "deploy" / "burrow-relay.service"
CONTAINERFILE = ROOT / "deploy" / "Containerfile"
KUBERNETES = ROOT / "deploy" / "kubernetes"
MANIFESTS = sorted(KUBERNETES.glob("*.yaml"))
RELAYS = ("r1", "r2")

#: The Kubernetes release whose API schemas the manifests are held to (kubernetes-validate 1.37 ships them).
KUBERNETES_VERSION = "1.37.0"
#: ``systemd-analyze security`` rates a unit's exposure from 0.0 (locked down) to 10.0; 9.6 for a bare
#: unit, 1.7 for ours. Weakening the sandbox past this fails.
MAX_EXPOSURE = 2.5
#: The NodePort range kube-proxy holds on every node; a relay on hostNetwork must keep its raw ports below.
NODE_PORTS_START = 30000
#: The image runs the relay; the guide runs the image under this tag (``podman build -t``).
IMAGE_TAG = "burrow-relay"

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")


def parse(argv: list[str], where: str) -> argparse.Namespace:
    """``burrow ARGV`` through the real parser (nothing runs); a usage error fails the test, saying where."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: burrow {shlex.join(argv)} does not parse (see the error above)")


# ---------------------------------------------------------------------------------------------- systemd


def unit_lines(text: str) -> dict[str, str]:
    """The unit's settings, continuation lines joined (the last of a repeated key wins)."""
    settings: dict[str, str] = {}
    for line in text.replace("\\\n", " ").splitlines():
        if line.strip() and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


def unit_copy(tmp_path: Path, text: str | None = None) -> Path:
    """A copy of the unit whose ExecStart is this environment's burrow: verify insists the program exists,
    and the unit names where the guide installs it (/opt/burrow/bin/burrow)."""
    text = UNIT.read_text() if text is None else text
    burrow = Path(sys.executable).parent / "burrow"
    assert burrow.exists(), f"{burrow} missing: pip install -e . makes it"
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace("/opt/burrow/bin/burrow", str(burrow)))
    return copy


def verify(unit: Path) -> list[str]:
    """What ``systemd-analyze verify`` says about the unit itself. It exits 0 for settings it could not
    parse (it ignores them, as systemd would), so its lines naming the unit are what counts."""
    assert SYSTEMD_ANALYZE is not None
    done = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=30)
    said = [line for line in (done.stdout + done.stderr).splitlines() if unit.name in line]
    if done.returncode != 0 and not said:
        said = [f"exit status {done.returncode}: {done.stderr.strip()}"]
    return said


@needs_systemd_analyze
def test_unit_verifies(tmp_path: Path) -> None:
    assert verify(unit_copy(tmp_path)) == []


@needs_systemd_analyze
@pytest.mark.parametrize(
    ("setting", "broken"),
    [
        ("Restart=on-failure", "Restart=sometimes"),  # a value systemd cannot parse
        ("ProtectSystem=strict", "ProtectSytem=strict"),  # a misspelt key
        ("ExecReload=/bin/kill", "ExecReload=/no/such/kill"),  # a program that does not exist
    ],
)
def test_verify_catches_a_broken_unit(tmp_path: Path, setting: str, broken: str) -> None:
    text = UNIT.read_text()
    assert setting in text
    assert verify(unit_copy(tmp_path, text.replace(setting, broken))) != []


def exposure_within_limit(unit: Path) -> bool:
    assert SYSTEMD_ANALYZE is not None
    command = [SYSTEMD_ANALYZE, "security", "--offline=true", f"--threshold={round(MAX_EXPOSURE * 10)}"]
    done = subprocess.run([*command, str(unit)], capture_output=True, text=True, timeout=30)
    return done.returncode == 0


@needs_systemd_analyze
def test_unit_sandbox(tmp_path: Path) -> None:
    assert exposure_within_limit(unit_copy(tmp_path))
    # the same unit with its sandbox taken out (capabilities, namespaces, the system call filter, ...)
    sandbox = re.compile(r"^(Ambient|Capability|NoNew|Protect|Private|Restrict|Lock|SystemCall|UMask|Remove)")
    bare = "\n".join(line for line in UNIT.read_text().splitlines() if not sandbox.match(line))
    assert not exposure_within_limit(unit_copy(tmp_path, bare))


def test_unit_runs_the_relay() -> None:
    settings = unit_lines(UNIT.read_text())
    program, *argv = shlex.split(settings["ExecStart"].replace("${BURROW_DOMAIN}", "r1.example.com"))
    assert program == "/opt/burrow/bin/burrow"
    args = parse(argv, UNIT.name)
    assert args.command == "relay"
    assert args.listen == ("0.0.0.0", 443)
    assert settings["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"  # (443 as a user)
    assert settings["User"] == "burrow" and settings["NoNewPrivileges"] == "yes"
    assert args.metrics is not None and args.metrics[0] == "127.0.0.1"
    # stopping waits out the relay's drain before SIGKILL
    assert settings["KillSignal"] == "SIGTERM"
    assert float(settings["TimeoutStopSec"]) > args.shutdown_grace
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["Environment"] == f"BURROW_HOME=/var/lib/{settings['StateDirectory']}"
    assert int(settings["LimitNOFILE"]) >= 65536


# ---------------------------------------------------------------------------------------------- image


def instructions(text: str) -> list[tuple[str, str]]:
    """The Containerfile's instructions, continuation lines joined, comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    found = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


#: Names that would put a secret into the image's layers or its configuration.
SECRET = re.compile(r"token|secret|ticket|passw|\.pem|\.key\b|private", re.IGNORECASE)


def image_problems(text: str) -> list[str]:
    """What is wrong with a Containerfile for the relay image, as lines; [] when nothing is."""
    steps = instructions(text)
    stages = [i for i, (word, _) in enumerate(steps) if word == "FROM"]
    problems = []
    if len(stages) < 2 or " AS " not in steps[stages[0]][1].upper():
        problems.append("not a multi-stage build with a named build stage")
    final = steps[stages[-1] :] if stages else steps
    users = [rest for word, rest in final if word == "USER"]
    if not users or not re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", users[-1]):
        problems.append(f"the runtime stage's USER is {users[-1:] or 'unset'}, not a numeric non-root user")
    if ("ENTRYPOINT", '["burrow", "relay"]') not in final:
        problems.append("the ENTRYPOINT is not exec-form burrow relay")
    if not any(word == "RUN" and "[metrics]" in rest for word, rest in final):
        problems.append("the metrics extra is not installed (--metrics needs prometheus-client)")
    for word, rest in steps:
        if word in ("ENV", "ARG", "LABEL") and SECRET.search(rest):
            problems.append(f"a secret in the image's configuration: {word} {rest}")
        if word in ("COPY", "ADD") and SECRET.search(rest):
            problems.append(f"a secret copied into a layer: {word} {rest}")
    return problems


def test_containerfile() -> None:
    assert image_problems(CONTAINERFILE.read_text()) == []


@pytest.mark.parametrize(
    ("setting", "broken"),
    [
        ("USER 10001:10001", "USER root"),
        ('ENTRYPOINT ["burrow", "relay"]', "ENTRYPOINT burrow relay"),
        ("ENV BURROW_HOME", "ENV BURROW_TOKEN=hunter2 BURROW_HOME"),
        ("COPY src src", "COPY src src\nCOPY deploy/privkey.pem /etc/burrow/"),
        ("FROM docker.io/library/rust:1-slim-bookworm AS build", "FROM docker.io/library/rust:1-slim-bookworm"),
    ],
)
def test_containerfile_check_can_fail(setting: str, broken: str) -> None:
    text = CONTAINERFILE.read_text()
    assert setting in text
    assert image_problems(text.replace(setting, broken)) != []


# ------------------------------------------------------------------------------------------- Kubernetes


def documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def test_manifests_found() -> None:
    assert {path.name for path in MANIFESTS} >= {"namespace.yaml", "revoked.yaml", "relay-r1.yaml", "relay-r2.yaml"}


@pytest.mark.parametrize("path", MANIFESTS, ids=[path.name for path in MANIFESTS])
def test_manifest_validates(path: Path) -> None:
    for doc in documents(path.read_text()):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_validation_catches_a_misspelt_field() -> None:
    deployment = documents((KUBERNETES / "relay-r1.yaml").read_text())[0]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"]["readOnlyRootFileSystem"] = container["securityContext"].pop("readOnlyRootFilesystem")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_relays_differ_only_in_name() -> None:
    r1, r2 = ((KUBERNETES / f"relay-{relay}.yaml").read_text() for relay in RELAYS)
    assert documents(r2) == documents(r1.replace("r1", "r2"))


def relay_objects(relay: str) -> tuple[dict[str, Any], dict[str, Any]]:
    deployment, service = documents((KUBERNETES / f"relay-{relay}.yaml").read_text())
    assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
    return deployment, service


@pytest.mark.parametrize("relay", RELAYS)
def test_relay_deployment(relay: str) -> None:
    deployment, service = relay_objects(relay)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = parse(["relay", *container["args"]], f"relay-{relay}.yaml")
    assert args.domain == f"{relay}.example.com"
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    assert pod["terminationGracePeriodSeconds"] > args.shutdown_grace

    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"tls": args.listen[1], "metrics": args.metrics[1]}
    (service_port,) = service["spec"]["ports"]
    assert (service_port["port"], service_port["targetPort"]) == (443, "tls") and args.public_port == 443
    assert service["spec"]["externalTrafficPolicy"] == "Local"  # (clients' own addresses)
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert pod["hostNetwork"] and args.tcp_ports[1] < NODE_PORTS_START and args.tcp_host == f"tcp.{relay}.example.com"

    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(args.metrics[1])
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}

    limits = container["resources"]["limits"]
    assert container["resources"]["requests"] == limits and args.threads == int(limits["cpu"])

    security = container["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"] == {"drop": ["ALL"]}

    # every file the relay reads comes from a whole-directory mount (updates reach it) of the right source
    mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
    sources = {volume["name"]: volume for volume in pod["volumes"]}
    assert not any("subPath" in mount for mount in mounts.values())
    for path, volume, source in (
        (args.cert, "tls", f"burrow-{relay}-tls"),
        (args.key, "tls", f"burrow-{relay}-tls"),
        (args.token_secret, "fleet", "burrow-fleet"),
        (args.ticket_key, "fleet", "burrow-fleet"),
        (args.revoked, "revoked", "burrow-revoked"),
    ):
        assert path.parent == Path(mounts[volume]["mountPath"])
        given = sources[volume].get("secret", {}).get("secretName") or sources[volume]["configMap"]["name"]
        assert given == source


def test_revocation_list_is_read() -> None:
    (configmap,) = documents((KUBERNETES / "revoked.yaml").read_text())
    deployment, _ = relay_objects("r1")
    args = parse(["relay", *deployment["spec"]["template"]["spec"]["containers"][0]["args"]], "relay-r1.yaml")
    assert args.revoked.name in configmap["data"]


def test_image_serves_what_the_pods_use() -> None:
    steps = instructions(CONTAINERFILE.read_text())
    exposed = {int(port) for word, rest in steps if word == "EXPOSE" for port in rest.split()}
    for relay in RELAYS:
        (container,) = relay_objects(relay)[0]["spec"]["template"]["spec"]["containers"]
        assert {port["containerPort"] for port in container["ports"]} == exposed
        assert container["image"].rsplit("/", 1)[-1].split(":")[0] == IMAGE_TAG


# ---------------------------------------------------------------------------------------------- guide


def shell_blocks(text: str) -> Iterator[str]:
    """The guide's ```sh blocks."""
    yield from re.findall(r"^```sh\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def burrow_commands(text: str) -> Iterator[tuple[str, list[str]]]:
    """Each ``burrow ...`` command in the guide's shell blocks, as (the line, burrow's argv): ``burrow`` or a
    path ending in /burrow where a command starts (after VAR=value assignments and ``sudo``), up to the end
    of the line or a shell operator. In a ``podman run`` / ``docker run`` line the image's tag stands for
    ``burrow relay`` (the image's ENTRYPOINT)."""
    operators = {"|", "||", "&&", ";", "&", ">", ">>", "<", "(", ")"}
    for block in shell_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            lexer.commenters = "#"
            words = list(lexer)
            runs_image = words[:2] in (["podman", "run"], ["docker", "run"])
            argv: list[str] | None = None
            starts = True  # (a command may start at this word)
            for word in words:
                if argv is not None:
                    if word in operators:
                        yield line.strip(), argv
                        argv, starts = None, True
                    else:
                        argv.append(word)
                elif word in operators:
                    starts = True
                elif starts and (word == "sudo" or re.match(r"[A-Za-z_][A-Za-z0-9_]*=", word)):
                    pass
                elif starts and (word == "burrow" or word.endswith("/burrow")):
                    argv = []
                elif runs_image and word == IMAGE_TAG:
                    argv = ["relay"]
                else:
                    starts = False
            if argv is not None:
                yield line.strip(), argv


def test_guide_commands_parse() -> None:
    commands = list(burrow_commands(GUIDE.read_text()))
    for line, argv in commands:
        parse(argv, f"docs/operating.md: {line}")
    said = {" ".join(argv[:2]) if argv[0] == "token" else argv[0] for _, argv in commands}
    assert said >= {"relay", "token create", "forward"}, said  # (the extraction found them)


def test_guide_check_can_fail() -> None:
    guide = (
        "```sh\n"
        "chgrp burrow /etc/burrow/revoked && sudo BURROW_HOME=/x burrow relay --domain r1.example.com \\\n"
        "    --no-such-flag | tee log  # burrow token create\n"
        "```\n"
    )
    ((line, argv),) = burrow_commands(guide)
    assert argv == ["relay", "--domain", "r1.example.com", "--no-such-flag"]
    with pytest.raises(pytest.fail.Exception):
        parse(argv, line)
