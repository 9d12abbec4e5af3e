"""Everything a bench run talks to: the local services, burrow, sshd/ssh and HAProxy.

A *path* is one way from the measuring client to a local service: ``direct``,
through ``ssh -R`` (two ciphers), through HAProxy terminating TLS in front of
``ssh -R``, or through burrow (its raw TCP address, or its TLS URL). A
*target* is the local service at the end: ``iperf`` (iperf3 -s), ``source``
(endless sender), ``echo``, ``http`` (HAProxy answering a small response),
``redis`` (redis-server), ``postgres`` (a throwaway PostgreSQL cluster with
pgbench's tables).
:meth:`Lab.prepare` starts what a set of (path, target) pairs needs, all on
loopback and free ports; :meth:`Lab.endpoint` says where the client connects.
"""

from __future__ import annotations

import atexit
import datetime
import functools
import getpass
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .clients import Endpoint
from .procs import BenchError, Proc, Procs, free_port, is_listening

#: The server name the bench's own TLS servers (direct TLS, HAProxy) answer to.
BENCH_SNI = "bench.localhost"
GCM = "aes128-gcm@openssh.com"

#: How long a test waits for the iperf3 server to be between tests before it tries anyway.
IPERF_IDLE_WAIT = 10.0
SSHD = "/usr/sbin/sshd"
#: Returns once the process it was made for is ready.
_Wait = Callable[[], None]
#: Every burrow process gets this environment; nothing from the caller's shell leaks in.
BURROW_ENV_CLEAR = ("BURROW_RELAY", "BURROW_TOKEN", "BURROW_TOKEN_FILE", "BURROW_CA", "BURROW_LOOP")

#: What a relay prints once it accepts agents.
RELAY_READY = r"burrow relay ready on \S+:(\d+)"
#: A bench measures capacity: tunnels open as fast as they can, beyond a tenant's default caps.
BENCH_RELAY_FLAGS = ["--max-tunnels-per-minute", "1000000", "--max-sessions-per-token", "100000"]


@functools.cache
def default_ssh_cipher() -> str:
    """The cipher ssh negotiates by default with an OpenSSH server (first of its list)."""
    out = subprocess.run(
        ["ssh", "-F", "/dev/null", "-G", "127.0.0.1"], capture_output=True, text=True, stdin=subprocess.DEVNULL
    ).stdout
    for line in out.splitlines():
        if line.startswith("ciphers "):
            return line.split()[1].split(",")[0]
    return "chacha20-poly1305@openssh.com"


def postgres_bin() -> Path:
    """Debian's newest PostgreSQL server programs (/usr/lib/postgresql/VERSION/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(Path(p).parts[-3]))
    if not found:
        raise BenchError("PostgreSQL is not installed (/usr/lib/postgresql/*/bin/postgres): apt-get install postgresql")
    return Path(found[-1]).parent


def short_cipher(name: str) -> str:
    return name.split("@")[0]


@dataclass(frozen=True)
class PathSpec:
    key: str
    kind: str  # direct | ssh | haproxy | burrow
    tls: bool
    cipher: str | None = None  # ssh's cipher, for ssh and haproxy paths

    @property
    def label(self) -> str:
        if self.kind == "direct":
            return "direct, TLS" if self.tls else "direct"
        if self.kind == "burrow":
            return "burrow TLS URL" if self.tls else "burrow raw TCP"
        ssh = f"ssh -R {short_cipher(self.cipher or '')}"
        return f"HAProxy TLS → {ssh}" if self.kind == "haproxy" else ssh

    @property
    def is_peer(self) -> bool:
        """A competing tunnel (not direct, not burrow)."""
        return self.kind in ("ssh", "haproxy")


def paths() -> dict[str, PathSpec]:
    default = default_ssh_cipher()
    return {
        p.key: p
        for p in (
            PathSpec("direct", "direct", False),
            PathSpec("direct-tls", "direct", True),
            PathSpec("ssh", "ssh", False, default),
            PathSpec("ssh-gcm", "ssh", False, GCM),
            PathSpec("haproxy+ssh", "haproxy", True, default),
            PathSpec("haproxy+ssh-gcm", "haproxy", True, GCM),
            PathSpec("burrow", "burrow", False),
            PathSpec("burrow-tls", "burrow", True),
        )
    }


TCP_PATHS = ["direct", "ssh", "ssh-gcm", "burrow"]
TLS_PATHS = ["direct-tls", "haproxy+ssh", "haproxy+ssh-gcm", "burrow-tls"]


@dataclass
class Target:
    name: str
    proc: Proc
    tcp_port: int
    tls_port: int | None = None


@dataclass
class Agent:
    proc: Proc
    host: str  # <id>.localhost
    tcp_port: int


# ------------------------------------------------------------------ certificates


@dataclass(frozen=True)
class BenchCerts:
    ca: Path
    cert: Path  # leaf + CA chain
    key: Path
    combined: Path  # cert chain and key in one file (HAProxy's crt)


def make_certs(directory: Path) -> BenchCerts:
    """A throwaway CA and a P-256 leaf for BENCH_SNI (the same key type burrow's dev CA issues)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=2)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "burrow bench CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, BENCH_SNI)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(BENCH_SNI)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    chain = leaf.public_bytes(pem) + ca.public_bytes(pem)
    certs = BenchCerts(directory / "ca.pem", directory / "leaf.pem", directory / "leaf-key.pem", directory / "both.pem")
    certs.ca.write_bytes(ca.public_bytes(pem))
    certs.cert.write_bytes(chain)
    certs.key.write_bytes(key_pem)
    certs.combined.write_bytes(chain + key_pem)
    return certs


# -------------------------------------------------------------------------- lab


class Lab:
    """Starts, on demand and once, the processes the paths need; hands out endpoints."""

    def __init__(self, workdir: Path, procs: Procs) -> None:
        self.workdir = workdir
        self.procs = procs
        self.paths = paths()
        self.certs = make_certs(workdir / "certs")
        self.burrow_home = workdir / "burrow-home"
        self.burrow_home.mkdir(exist_ok=True)
        self.targets: dict[str, Target] = {}
        self.relay: Proc | None = None
        self.relay_port = 0
        self.agents: dict[str, Agent] = {}
        self.sshd_port = 0
        self.ssh: dict[tuple[str, str], int] = {}  # (cipher, target) -> port sshd listens on
        self.haproxy: dict[tuple[str, str], int] = {}  # (cipher, target) -> TLS port
        self.sshd: Proc | None = None
        self.ssh_clients: dict[tuple[str, str], Proc] = {}  # (cipher, target) -> its ssh -R process
        self.pgbench_scale = 10  # pgbench -i -s: 1M accounts, ~150 MB (the quick run sets 1)

    # ------------------------------------------------------------------ setup

    def prepare(self, needs: Iterable[tuple[str, str]], *, sshd: bool = False, relay: bool = False) -> None:
        """Start everything the (path key, target) pairs need, in parallel where possible.

        ``sshd`` / ``relay``: start those even if no path needs them (scenario 7).
        """
        needs = sorted(set(needs))
        specs = [(self.paths[key], target) for key, target in needs]
        waits = []
        for target in sorted({t for _, t in needs} - set(self.targets)):
            waits.append(self._start_target(target))
        if (sshd or any(p.kind in ("ssh", "haproxy") for p, _ in specs)) and not self.sshd_port:
            waits.append(self._start_sshd())
        if (relay or any(p.kind == "burrow" for p, _ in specs)) and self.relay is None:
            waits.append(self._start_relay())
        _finish(waits)
        waits = []
        for spec, target in specs:
            if spec.kind in ("ssh", "haproxy") and (spec.cipher or "", target) not in self.ssh:
                waits.append(self._start_ssh(spec.cipher or "", target))
            if spec.kind == "burrow" and target not in self.agents:
                waits.append(self._start_agent(target))
        _finish(waits)
        waits = []
        for spec, target in specs:
            if spec.kind == "haproxy" and (spec.cipher or "", target) not in self.haproxy:
                waits.append(self._start_haproxy_front(spec.cipher or "", target))
        _finish(waits)

    def endpoint(self, key: str, target: str) -> Endpoint:
        spec = self.paths[key]
        tgt = self.targets[target]
        loop = "127.0.0.1"
        if spec.kind == "direct":
            if spec.tls:
                if tgt.tls_port is None:
                    raise BenchError(f"target {target} has no TLS listener")
                return Endpoint(loop, tgt.tls_port, BENCH_SNI, str(self.certs.ca))
            return Endpoint(loop, tgt.tcp_port)
        if spec.kind == "ssh":
            return Endpoint(loop, self.ssh[(spec.cipher or "", target)])
        if spec.kind == "haproxy":
            return Endpoint(loop, self.haproxy[(spec.cipher or "", target)], BENCH_SNI, str(self.certs.ca))
        agent = self.agents[target]
        if spec.tls:
            return Endpoint(loop, self.relay_port, agent.host, str(self.burrow_home / "ca.pem"))
        return Endpoint(loop, agent.tcp_port)

    def tunnel_processes(self, key: str, target: str) -> dict[str, tuple[int, bool]]:
        """The processes that carry path ``key``'s bytes to ``target``: {role: (pid, with its descendants)}.

        sshd forks a process per connection: its whole tree is counted (the other
        paths' connections are idle while one path is measured).
        """
        spec = self.paths[key]
        if spec.kind == "burrow" and self.relay is not None:
            return {"relay": (self.relay.pid, False), "agent": (self.agents[target].proc.pid, False)}
        if spec.kind == "ssh" and self.sshd is not None:
            return {"sshd": (self.sshd.pid, True), "ssh": (self.ssh_clients[(spec.cipher or "", target)].pid, False)}
        return {}

    def burrow_env(self, relay: bool = False) -> dict[str, str | None]:
        env: dict[str, str | None] = {name: None for name in BURROW_ENV_CLEAR}
        env["BURROW_HOME"] = str(self.burrow_home)
        if relay:
            env["BURROW_RELAY"] = f"localhost:{self.relay_port}"
        return env

    # ---------------------------------------------------------------- targets

    def iperf_ready(self) -> bool:
        """Make the iperf3 server ready for the next test; True when it had to be restarted.

        iperf3 3.12's server has been seen to go away during scenario 3 (twice in
        one afternoon), which refused every later test: it is restarted on its
        port (every path forwards there). And between two tests it stops
        listening for a moment: a test that began then was refused (through a
        tunnel: the agent's dial was refused, so the client saw its control
        connection closed, in ~3 of 10 quick runs of scenario 3). So this waits
        until the server has announced it listens again after its last test,
        and the port listens.
        """
        target = self.targets.get("iperf")
        if target is None:
            return False
        restarted = False
        if target.proc.popen.poll() is not None:
            print(f"    (the iperf3 server exited with code {target.proc.popen.returncode}; restarting it)", flush=True)
            print("\n".join(f"      | {line}" for line in target.proc.tail(6).splitlines()), flush=True)
            self._start_target("iperf", target.tcp_port)()
            target, restarted = self.targets["iperf"], True
        deadline = time.monotonic() + IPERF_IDLE_WAIT
        while time.monotonic() < deadline:
            log = target.proc.text()
            between_tests = log.count("Server listening") > log.count("Accepted connection")
            if between_tests and is_listening(target.tcp_port):
                break
            time.sleep(0.005)
        return restarted

    def _start_target(self, name: str, port: int = 0) -> _Wait:
        if name == "iperf":
            port = port or free_port()
            proc = self.procs.start("target-iperf", ["iperf3", "-s", "-p", str(port), "--forceflush"])

            def ready() -> None:
                proc.wait_for(r"Server listening")
                self.targets[name] = Target(name, proc, port)

            return ready
        if name == "http":
            return self._start_http_target()
        if name == "redis":
            return self._start_redis()
        if name == "postgres":
            return self._start_postgres()
        argv = [sys.executable, "-m", "bench.services", name, "--tls", str(self.certs.cert), str(self.certs.key)]
        proc = self.procs.start(f"target-{name}", argv, cwd=Path(__file__).resolve().parent.parent)

        def ready_service() -> None:
            match = proc.wait_for(r"ready tcp=(\d+) tls=(\d+)")
            self.targets[name] = Target(name, proc, int(match[1]), int(match[2]))

        return ready_service

    def _start_http_target(self) -> _Wait:
        port, tls_port = free_port(), free_port()
        config = self.workdir / "haproxy-http.cfg"
        config.write_text(
            HAPROXY_GLOBAL
            + f"""
frontend http
    mode http
    bind 127.0.0.1:{port}
    bind 127.0.0.1:{tls_port} ssl crt {self.certs.combined}
    http-request return status 200 content-type text/plain string "hello from the burrow bench\\n"
"""
        )
        proc = self.procs.start("target-http", ["haproxy", "-db", "-f", str(config)], nofile=65536)

        def ready() -> None:
            proc.wait_listening(port)
            proc.wait_listening(tls_port)
            self.targets["http"] = Target("http", proc, port, tls_port)

        return ready

    def _start_redis(self) -> _Wait:
        port = free_port()
        directory = self.workdir / "redis"
        directory.mkdir(exist_ok=True)
        argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)]
        argv += ["--save", "", "--appendonly", "no", "--protected-mode", "no", "--maxclients", "1000"]
        proc = self.procs.start("target-redis", argv, nofile=65536)

        def ready() -> None:
            proc.wait_listening(port)
            self.targets["redis"] = Target("redis", proc, port)

        return ready

    def _start_postgres(self) -> _Wait:
        """A cluster for pgbench (scale ``pgbench_scale``), fsync off: the bench measures the path, not the disk."""
        bin_dir = postgres_bin()
        # not under the work directory, which may be private to root; the cluster is not root's
        directory = Path(tempfile.mkdtemp(prefix="burrow-bench-pg-"))
        atexit.register(shutil.rmtree, directory, True)
        user = None
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            shutil.chown(directory, "postgres", "postgres")
            user = "postgres"
        data = directory / "data"
        initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync"]
        self.procs.run("postgres-initdb", initdb, timeout=120, user=user)
        port = free_port()
        argv = [
            str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(directory),
            "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
            "-c", "max_connections=200",
        ]  # fmt: skip
        proc = self.procs.start("target-postgres", argv, user=user)

        def ready() -> None:
            proc.wait_for(r"ready to accept connections", timeout=60)
            proc.wait_listening(port)
            init = ["pgbench", "-i", "-q", "-s", str(self.pgbench_scale), "-h", "127.0.0.1", "-p", str(port)]
            self.procs.run("pgbench-init", [*init, "-U", "postgres", "postgres"], timeout=300)
            self.targets["postgres"] = Target("postgres", proc, port)

        return ready

    # ----------------------------------------------------------------- burrow

    def _start_relay(self) -> _Wait:
        proc, self.relay_port = self.start_relay("burrow-relay")
        self.relay = proc
        return lambda: proc.wait_for(RELAY_READY)  # (while the targets and sshd start)

    def start_relay(self, name: str, flags: Sequence[str] = ()) -> tuple[Proc, int]:
        """A ``burrow relay`` (with the bench's flags and ``flags``) on a free port; ready once it
        prints :data:`RELAY_READY`."""
        port = free_port()
        argv = [sys.executable, "-m", "burrow", "relay", "--listen", f"127.0.0.1:{port}", *BENCH_RELAY_FLAGS, *flags]
        return self.procs.start(name, argv, env=self.burrow_env(), nofile=65536), port

    def _start_agent(self, target: str) -> _Wait:
        ready = self.start_agent(f"burrow-agent-{target}", self.targets[target].tcp_port, self.relay_port)

        def done() -> None:
            self.agents[target] = ready()

        return done

    def start_agent(self, name: str, port: int, relay_port: int) -> Callable[[], Agent]:
        """``burrow forward PORT --unencrypted`` to the relay on ``relay_port``; returns its wait for the addresses."""
        argv = [sys.executable, "-m", "burrow", "forward", str(port), "--unencrypted"]
        env = self.burrow_env() | {"BURROW_RELAY": f"localhost:{relay_port}"}
        proc = self.procs.start(name, argv, env=env, nofile=65536)

        def ready() -> Agent:
            url = proc.wait_for(r"^https://([^:/\s]+):(\d+)$")
            tcp = proc.wait_for(r"^tcp://\S+:(\d+)$")
            return Agent(proc, url[1], int(tcp[1]))

        return ready

    # -------------------------------------------------------------------- ssh

    def _start_sshd(self) -> _Wait:
        directory = self.workdir / "ssh"
        directory.mkdir(exist_ok=True)
        for key in ("host_key", "user_key"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(directory / key)],
                check=True,
                stdin=subprocess.DEVNULL,
            )
        (directory / "authorized_keys").write_bytes((directory / "user_key.pub").read_bytes())
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
        self.sshd_port = free_port()
        config = directory / "sshd_config"
        config.write_text(
            f"""Port {self.sshd_port}
ListenAddress 127.0.0.1
HostKey {directory / "host_key"}
PidFile {directory / "sshd.pid"}
AuthorizedKeysFile {directory / "authorized_keys"}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding yes
GatewayPorts no
X11Forwarding no
PrintMotd no
UseDNS no
MaxStartups 200:30:400
LogLevel ERROR
"""
        )
        proc = self.sshd = self.procs.start("sshd", [SSHD, "-D", "-e", "-f", str(config)])
        return lambda: proc.wait_listening(self.sshd_port)

    def _start_ssh(self, cipher: str, target: str) -> _Wait:
        directory = self.workdir / "ssh"
        remote = free_port()
        argv = [
            "ssh", "-F", "/dev/null", "-N", "-T",
            "-i", str(directory / "user_key"),
            "-p", str(self.sshd_port),
            "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null",
            "-o", "ExitOnForwardFailure=yes",
            "-o", "LogLevel=ERROR",
            "-c", cipher,
            "-R", f"127.0.0.1:{remote}:127.0.0.1:{self.targets[target].tcp_port}",
            f"{getpass.getuser()}@127.0.0.1",
        ]  # fmt: skip
        proc = self.procs.start(f"ssh-{short_cipher(cipher)}-{target}", argv)
        self.ssh_clients[(cipher, target)] = proc

        def ready() -> None:
            proc.wait_listening(remote)
            self.ssh[(cipher, target)] = remote

        return ready

    # ---------------------------------------------------------------- haproxy

    def _start_haproxy_front(self, cipher: str, target: str) -> _Wait:
        port = free_port()
        config = self.workdir / f"haproxy-{short_cipher(cipher)}-{target}.cfg"
        config.write_text(
            HAPROXY_GLOBAL
            + f"""
frontend tls
    mode tcp
    bind 127.0.0.1:{port} ssl crt {self.certs.combined}
    default_backend ssh_tunnel

backend ssh_tunnel
    mode tcp
    server tunnel 127.0.0.1:{self.ssh[(cipher, target)]}
"""
        )
        name = f"haproxy-{short_cipher(cipher)}-{target}"
        proc = self.procs.start(name, ["haproxy", "-db", "-f", str(config)], nofile=65536)

        def ready() -> None:
            proc.wait_listening(port)
            self.haproxy[(cipher, target)] = port

        return ready


HAPROXY_GLOBAL = """global
    maxconn 9000

defaults
    timeout connect 5s
    timeout client 5m
    timeout server 5m
"""


def _finish(waits: list[_Wait]) -> None:
    for wait in waits:
        wait()
